"""Does the tiny preset learn? ``sync``, ``sync_control``, ``identity``, ``identity_control`` and
``psnr`` of the test split against the training steps of stage 2, as a table and a PNG plot
logged to MLflow.

Set-up: the demo's own first steps (``demo.step_commands``: sample videos with one held out as the
test split, the tiny VAE fitted to the training faces, the ingest), then one ``train.py`` run of
stage 1 and stage 2 (``LOOPY_BENCH_LEARNING_STEPS`` stage-2 steps, default the demo's
``DemoSettings.train_steps``, and ``DemoSettings.stage1_step_ratio`` times as many in stage 1) with the
demo's learning rate and EMA decay (``DemoSettings.ema_decay``: from the step count; the checkpoint
evaluator scores the EMA weights, as the package holds them), evaluated every ``LOOPY_BENCH_LEARNING_EVERY`` steps (default 100) by the
checkpoint evaluator with ``train.eval_videos=3`` (the three test people, so that
``identity_control`` has other references to compare with): the evaluation job's metrics
(``training.evaluation.evaluate_package``: the first ``DemoSettings.audio_seconds`` (5 s, 125
frames) of the test video generated from its reference frame and its own audio, the demo's DDIM steps, dlib landmarks
on frames upscaled to >= 256 px) land in the stage-2 MLflow run as ``eval_face_found_ratio``,
``eval_sync``, ``eval_sync_control``, ``eval_identity``, ``eval_identity_control``, ``eval_psnr``
at each evaluated step (``eval_sync`` is
missing at a step where no face was found: NaN is not logged). The table has one row per (step,
metric), with ``val_audio_gain`` beside them (the checkpoint evaluation's measure of the audio path
alone: ``training.evaluation.audio_use``); the plot (``learning_curve.png``) goes to that run's artifacts.
``LOOPY_BENCH_LEARNING_OVERRIDES`` adds ``section.key=value`` overrides to the train command
(e.g. ``train.lr=0.0002``, ``sampler.audio_ratio=1`` or ``train.ema_decay=0.99``) for another
point of the design space.

Targets (issues 12 and 22, on the demo's output): ``sync`` >= 0.30 and >= 0.15 above
``sync_control``; ``identity`` <= 0.6 and >= 0.1 below ``identity_control``.
Everything is written under ``LOOPY_BENCH_LEARNING_WORK`` (default: a temporary folder; point it
at a demo's ``--work`` folder to reuse its samples, fitted VAE and ingest). Not in the test suite:
on 2 CPU cores the default schedule (1200 + 200 steps, evaluated every 100 stage-2 steps) takes
about 17 minutes after the set-up (``LOOPY_BENCH_QUICK=1``: 40 stage-2 steps, evaluated every 20).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

CURVE_METRICS = ("eval_face_found_ratio", "eval_sync", "eval_sync_control", "eval_identity", "eval_identity_control",
                 "eval_psnr", "eval_codec_face_found_ratio", "eval_codec_identity", "eval_codec_psnr",
                 "val_audio_gain")
TARGET_IDENTITY = 0.6
TARGET_IDENTITY_MARGIN = 0.1
TARGET_SYNC = 0.30
TARGET_MARGIN = 0.15
TARGET_FACE_FOUND = 0.90
UNITS = {"eval_psnr": "dB", "eval_face_found_ratio": "share", "eval_codec_psnr": "dB",
         "eval_codec_face_found_ratio": "share", "val_audio_gain": "share"}
UNITS.update({"eval_identity": "distance", "eval_identity_control": "distance", "eval_codec_identity": "distance"})
TARGETS = {"eval_sync": f">= {TARGET_SYNC}", "eval_face_found_ratio": f">= {TARGET_FACE_FOUND}",
           "eval_identity": f"<= {TARGET_IDENTITY}"}


def _schedule() -> tuple[int, int]:
    """(stage-2 steps, evaluate every) from the environment."""
    from demo import DemoSettings

    quick = bool(os.environ.get("LOOPY_BENCH_QUICK"))
    steps = int(os.environ.get("LOOPY_BENCH_LEARNING_STEPS", 40 if quick else DemoSettings.train_steps))
    every = int(os.environ.get("LOOPY_BENCH_LEARNING_EVERY", 20 if quick else 100))
    return steps, every


def _run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd[:3])} failed with status {code} (log {log}):\n{tail}")


def _extra_overrides() -> list[str]:
    """``LOOPY_BENCH_LEARNING_OVERRIDES``: space-separated ``section.key=value`` overrides added to
    the train command (e.g. ``sampler.audio_ratio=1 train.lr=0.001``); the last one of a key wins."""
    return os.environ.get("LOOPY_BENCH_LEARNING_OVERRIDES", "").split()


def prepare(work: Path, steps: int, every: int) -> tuple[list[str], list[str]]:
    """The demo's samples / fit_vae / ingest steps under ``work`` (skipped when their output is
    there) and the train command. Returns (train command, common overrides)."""
    from demo import DemoPaths, DemoSettings, config_overrides, step_commands

    paths = DemoPaths(work)
    settings = DemoSettings(train_steps=steps)
    tracking = [f"tracking.tracking_uri=sqlite:///{work}/mlflow.db", f"tracking.artifact_root={work}/mlruns"]
    common = config_overrides(paths, settings) + tracking
    cmds = step_commands(paths, settings)
    if not paths.test_samples.is_dir():
        _run(cmds["samples"], paths.logs / "samples.log")
    _run(cmds["fit_vae"], paths.logs / "fit_vae.log")  # cached when already fitted
    if not (paths.ingested / "videos.parquet").is_file():
        _run(cmds["ingest"] + tracking, paths.logs / "ingest.log")
    train = [sys.executable, "train.py", "--data", str(paths.ingested), "--stages", "1,2", *common,
             *settings.train_overrides(),
             f"train.checkpoint_every={every}",
             f"train.eval_every={every}", "train.eval_videos=3", f"train.eval_sample_steps={settings.sample_steps}",
             f"evaluation.max_seconds={settings.audio_seconds:g}", *_extra_overrides()]
    return train, common


def curve(tracking_uri: str, experiment: str) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    """(run id, {metric: [(step, value), ...]}) of the newest stage-2 run's evaluation metrics."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise RuntimeError(f"no MLflow experiment {experiment!r} in {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    for run in runs:  # eval_sync is not logged while no face is found (NaN): look for eval_psnr
        if "eval_psnr" in run.data.metrics:
            hist = {m: sorted((h.step, h.value) for h in client.get_metric_history(run.info.run_id, m))
                    for m in CURVE_METRICS}
            return run.info.run_id, hist
    raise RuntimeError(f"no run in {tracking_uri} has eval_psnr (train.eval_videos=1 did not evaluate)")


def _panel(ax, hist: dict[str, list[tuple[int, float]]], series, target: float, target_name: str,
           ylabel: str) -> None:
    """One panel: each (metric, line style) of ``series`` against the stage-2 step, and the target."""
    for name, style in series:
        if hist.get(name):
            steps, values = zip(*hist[name])
            ax.plot(steps, values, style, label=name.removeprefix("eval_"))
    ax.axhline(target, color="grey", lw=0.8, ls=":", label=f"target {target_name} {target}")
    ax.set_xlabel("stage-2 training step")
    ax.set_ylabel(ylabel)
    ax.legend()


def plot(hist: dict[str, list[tuple[int, float]]], out: Path) -> Path:
    """Three panels: sync and sync_control (left), identity and identity_control (middle), psnr
    (right), against the stage-2 step; the codec ceiling (``codec_*``: the real frames through the
    VAE alone) in black dash-dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    _panel(left, hist, (("eval_face_found_ratio", "^:"), ("eval_sync", "o-"), ("eval_sync_control", "s--"),
                        ("eval_codec_face_found_ratio", "k^-.")),
           TARGET_SYNC, "sync", "correlation / share of frames")
    _panel(middle, hist, (("eval_identity", "o-"), ("eval_identity_control", "s--"), ("eval_codec_identity", "k-.")),
           TARGET_IDENTITY, "identity", "face descriptor distance (lower: nearer)")
    for name, style in (("eval_psnr", "o-"), ("eval_codec_psnr", "k-.")):
        if hist.get(name):
            steps, values = zip(*hist[name])
            right.plot(steps, values, style, label=name.removeprefix("eval_"))
    right.legend()
    right.set_xlabel("stage-2 training step")
    right.set_ylabel("PSNR vs real frames (dB)")
    fig.suptitle("tiny preset: test-split metrics against training steps")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run() -> list[dict]:
    from mlflow import MlflowClient

    from demo import DemoSettings

    steps, every = _schedule()
    given = os.environ.get("LOOPY_BENCH_LEARNING_WORK")
    tmp = None if given else tempfile.TemporaryDirectory(prefix="loopy_bench_learning_")
    work = Path(given or tmp.name).resolve()
    try:
        train, _ = prepare(work, steps, every)
        _run(train, work / "logs" / "train.log")
        tracking_uri = f"sqlite:///{work}/mlflow.db"
        run_id, hist = curve(tracking_uri, "loopy")
        png = plot(hist, work / "learning_curve.png")
        MlflowClient(tracking_uri=tracking_uri).log_artifact(run_id, str(png), "bench")
        rows = []
        for name in CURVE_METRICS:
            for step, value in hist[name]:
                rows.append({"benchmark": "learning", "metric": f"{name.removeprefix('eval_')} @ step {step}",
                             "value": value, "unit": UNITS.get(name, "corr"), "target": TARGETS.get(name, ""),
                             "note": f"tiny preset, {steps} stage-2 steps (stage 1: {DemoSettings.stage1_step_ratio}x), 3 test videos"})
        if hist.get("eval_sync") and hist.get("eval_sync_control"):
            last_sync, last_ctrl = hist["eval_sync"][-1][1], hist["eval_sync_control"][-1][1]
            rows.append({"benchmark": "learning", "metric": "sync - sync_control (last)",
                         "value": last_sync - last_ctrl, "unit": "corr", "target": f">= {TARGET_MARGIN}",
                         "note": f"plot: MLflow run {run_id} artifact bench/learning_curve.png"})
        if hist.get("eval_identity") and hist.get("eval_identity_control"):
            rows.append({"benchmark": "learning", "metric": "identity_control - identity (last)",
                         "value": hist["eval_identity_control"][-1][1] - hist["eval_identity"][-1][1],
                         "unit": "distance", "target": f">= {TARGET_IDENTITY_MARGIN}", "note": ""})
        return rows
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    from benchmarks.run import print_table

    print_table(run())
