"""The one-command demo (``make demo`` = ``python demo.py --work DIR``).

Runs the whole platform on one machine, each step through the same command line a user or a
cluster job would run, with the venv's Python:

1. ``samples``  - ``python -m pipelines.samples --output WORK/samples --heldout``
   (talking-head videos of 15 people; the 3 test people's videos in ``WORK/samples/heldout`` are
   the test split, the 12 others in ``WORK/samples/train``: ``ingest.split_key=folder``)
2. ``fit_vae``  - ``python -m training.fit_vae --samples WORK/samples/train --out WORK/fitted_vae``
   (the tiny preset's VAE fitted to the training faces, so decoded frames can look like a face;
   cached: a rerun on the same videos returns at once); every later step uses it
   (``weights.vae=WORK/fitted_vae``)
3. ``ingest``   - ``python pipelines/ingest.py --input WORK/samples --output WORK/ingested`` (Ray Data)
4. ``train``    - ``python train.py --data WORK/ingested --stages 1,2`` (Ray Train, tiny preset;
   the model package is logged to MLflow and registered as ``tracking.registered_model``)
5. ``register`` - look the registered version up in MLflow and print each stage's loss curve
6. ``evaluate`` - ``python evaluate.py --model URI --data WORK/ingested --split test`` (every
   test-split video generated from its reference frame and its own audio, compared with the real
   frames: psnr, ssim, lmd, sync, sync_control, ...)
7. ``serve``    - start the Serve app on 127.0.0.1 (a free port), wait for ``/healthz``
8. ``generate`` - POST /v1/videos (the first frame of the test-split video and a sentence that is
   in no sample video, spoken by espeak-ng), poll GET /v1/videos/{id}, download
   GET /v1/videos/{id}/file (:class:`serve.client.VideoClient`)
9. ``score``    - the demo video's own metrics (``pipelines.metrics.video_metrics.score_video``: face found,
   sync and sync_control against its audio, dlib on frames upscaled to >= 256 px) and whose face it
   shows (``pipelines.metrics.identity``: ``identity`` = dlib descriptor distance to the request
   portrait, ``identity_control`` = to the other test people's portraits)
10. stop the service; print the metrics beside the video path, and where the MLflow UI, the logs
    and the service are.

The console shows one line per step (what it made, how long it took), a progress bar for the
ingested videos, the training steps of each stage (with the loss) and the generated clips, and
each stage's loss at its start and end. On a terminal a bar is one updating line (tqdm); when
stdout is not a terminal (piped, CI) it is a plain line at every 10 %. Nothing else of the
children's output reaches the console: all of it is in ``WORK/logs/<step>.log``. A failing step
stops the demo with ``demo failed at step '<step>'`` and the tail of its log. The last line
printed is exactly ``video: PATH``. Everything stays on 127.0.0.1; nothing is downloaded (tiny
weights: random U-Net and wav2vec2, the VAE fitted here).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, TextIO

from core.config import load_platform_config
from core.paths import PROJECT_ROOT, resolve_tracking_uri
from models.registry import latest_version
from pipelines.faces.detect import make_detector
from pipelines.media.video_decode import iter_frames
from pipelines.metrics.identity import FaceDescriber, mean_distance, video_identity
from pipelines.metrics.video_metrics import score_video
from pipelines.samples.talking_heads import (
    SPLIT_FOLDERS,
    SPLIT_TEST_FRACTION,
    SampleDataError,
    synthesize_speech,
)
from serve.client import ClientError, VideoClient

STEPS = ("samples", "fit_vae", "ingest", "train", "register", "evaluate", "serve", "generate", "score")
#: What the demo's voice says: a sentence that is in no sample video (tests/test_demo.py checks it).
DEMO_SENTENCE = "Bright yellow kites were dancing above the harbour while the children laughed."
#: Metrics printed beside the video (keys of pipelines.metrics.video_metrics.score_video / the evaluation JSON).
SHOWN_METRICS = ("face_found_ratio", "sync", "sync_control", "identity", "identity_control", "identity_nearest",
                 "psnr", "ssim", "lmd")
VIDEO_SUFFIXES = {".mp4", ".mkv", ".mov", ".webm", ".avi"}
TAIL_LINES = 15  # of a failing step's log, in its error message
VAE_KEY_FILE = "fitted_vae.key"  # in the ingest folder: the fit whose VAE encoded its latents


class StepError(RuntimeError):
    """A demo step failed; ``step`` names it, ``log`` is its log file (if any)."""

    def __init__(self, step: str, message: str, log: Optional[Path] = None):
        super().__init__(f"demo failed at step '{step}': {message}" + (f" (log: {log})" if log else ""))
        self.step = step
        self.detail = message
        self.log = log


@contextlib.contextmanager
def as_step(step: str, log: Optional[Path] = None) -> Iterator[None]:
    """Turn a :class:`serve.client.ClientError` raised inside into a :class:`StepError` of ``step``
    (pointing at ``log``, the service's log, where the server side of the error is)."""
    try:
        yield
    except ClientError as exc:
        raise StepError(step, str(exc), log) from exc


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
    CPU cores). ``train_steps`` and ``train_lr`` are chosen by measurement
    (``benchmarks/bench_learning.py``, docs/EVALUATION.md "Does the tiny preset learn?"): at
    lr 2e-4 and 100 steps per stage the generated frames are no face (dlib finds none); at 1e-3
    the test video's face is found in >= 90 % of the frames from stage-2 step 200 on."""

    train_steps: int = 400  # optimizer steps per stage
    vae_steps: int = 600  # optimizer steps of the VAE fit (training.fit_vae; 600 x 0.22 CPU s, estimated)
    train_lr: float = 1e-3  # the tiny U-Net learns from random init (the paper's 1e-5 is for SD-1.5 fine-tuning)
    stages: tuple[int, ...] = (1, 2)  # training stages, in order
    num_cpus: int = 2
    sample_steps: int = 10  # DDIM steps of the generated video
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

    def ema_overrides(self) -> list[str]:
        """``["train.ema_decay=D"]`` for the train command (empty without EMA)."""
        return [] if self.ema_decay is None else [f"train.ema_decay={self.ema_decay:g}"]


# --- argument building ---------------------------------------------------------------------------

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
        f"serve.job_dir={paths.serve_jobs}",
    ]


def step_commands(paths: DemoPaths, settings: DemoSettings, python: str = sys.executable) -> dict[str, list[str]]:
    """The command line of each subprocess step (the same CLIs users and cluster jobs run)."""
    common = config_overrides(paths, settings)
    return {
        "samples": [python, "-m", "pipelines.samples", "--output", str(paths.samples), "--heldout"],
        "fit_vae": [python, "-m", "training.fit_vae", "--samples", str(paths.train_samples),
                    "--out", str(paths.fitted_vae), "--steps", str(settings.vae_steps),
                    "--threads", str(settings.num_cpus), *common],
        "ingest": [python, str(PROJECT_ROOT / "pipelines" / "ingest.py"), "--input", str(paths.samples),
                   "--output", str(paths.ingested), *common],
        "train": [python, str(PROJECT_ROOT / "train.py"), "--data", str(paths.ingested),
                  "--stages", ",".join(map(str, settings.stages)),
                  *common, f"train.max_steps={settings.train_steps}", f"train.lr={settings.train_lr:g}",
                  *settings.ema_overrides(), f"train.checkpoint_every={settings.train_steps}",
                  f"train.eval_every={settings.train_steps}"],
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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def child_env() -> dict[str, str]:
    """Environment of every child: offline, Ray local with its temp dir in the work tree."""
    env = dict(os.environ)
    env.update({
        "RAY_TMPDIR": env.get("RAY_TMPDIR", str(PROJECT_ROOT / ".ray_tmp")),
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        # the children's output goes to log files: Ray Data's redrawn progress bars are noise there
        "RAY_DATA_DISABLE_PROGRESS_BARS": env.get("RAY_DATA_DISABLE_PROGRESS_BARS", "1"),
        # every progress line of a job reaches its log as printed (Ray would batch repeated
        # patterns for up to 5 s and print a count instead of the lines)
        "RAY_DEDUP_LOGS": "0",
    })
    env.pop("RAY_ADDRESS", None)  # the demo never joins a cluster
    Path(env["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    return env


# --- the console ---------------------------------------------------------------------------------

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(line: str) -> str:
    """``line`` without terminal colour codes (Ray colours its ``(Actor pid=N)`` prefixes)."""
    return ANSI_ESCAPE.sub("", line).rstrip()


class Console:
    """What the user sees: ``[demo]`` lines and at most one progress bar at a time.

    ``stream``: where it goes (stdout); ``tty``: draw bars as one updating line (tqdm) instead of
    plain lines at every ``every`` fraction (default: whether ``stream`` is a terminal).
    """

    def __init__(self, stream: Optional[TextIO] = None, tty: Optional[bool] = None, every: float = 0.1):
        self.stream = stream if stream is not None else sys.stdout
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"
        self.tty = tty
        self.every = every
        self.bar: Optional[ProgressBar] = None
        self._lock = threading.Lock()

    def say(self, message: str) -> None:
        """One ``[demo] message`` line (above the bar, if one is drawn)."""
        line = f"[demo] {message}"
        with self._lock:
            if self.bar is not None and self.bar.tqdm is not None:
                self.bar.tqdm.write(line, file=self.stream)
            else:
                print(line, file=self.stream, flush=True)

    def progress(self, label: str, total: int, unit: str) -> "ProgressBar":
        """A new bar of ``total`` ``unit`` (the previous one, if any, is closed)."""
        if self.bar is not None:
            self.bar.close()
        self.bar = ProgressBar(self, label, total, unit)
        return self.bar


class ProgressBar:
    """``label: n/total unit``: tqdm on a terminal; otherwise one plain line each time another
    ``console.every`` of the total is reached (never a carriage return)."""

    def __init__(self, console: Console, label: str, total: int, unit: str):
        self.console, self.label, self.total, self.unit = console, label, max(1, int(total)), unit
        self.n = 0
        self.postfix = ""
        self.closed = False
        self._shown_mark = 0  # plain mode: the last multiple of `every` printed
        self.tqdm = None
        if console.tty:
            from tqdm import tqdm

            self.tqdm = tqdm(total=self.total, desc=f"[demo] {label}", unit=f" {unit}", file=console.stream,
                             leave=False, dynamic_ncols=True, mininterval=0.5,
                             bar_format="{desc}: {n_fmt}/{total_fmt}{unit} |{bar}| {percentage:3.0f}% "
                                        "[{elapsed}<{remaining}]{postfix}")

    def update_to(self, n: int, postfix: str = "") -> None:
        """Move the bar to ``n`` done (it never moves back); ``postfix`` is shown after it."""
        if self.closed:
            return
        n = min(max(int(n), self.n), self.total)
        if n == self.n and postfix == self.postfix:
            return
        self.n, self.postfix = n, postfix
        if self.tqdm is not None:
            self.tqdm.n = n
            self.tqdm.set_postfix_str(postfix, refresh=False)
            self.tqdm.refresh()
            return
        mark = int(n / self.total / self.console.every + 1e-9)
        if mark > self._shown_mark:
            self._shown_mark = mark
            extra = f", {postfix}" if postfix else ""
            self.console.say(f"  {self.label}: {n}/{self.total} {self.unit} ({round(100 * n / self.total)}%){extra}")

    def close(self) -> None:
        """Remove the bar (a terminal line is cleared; the caller prints the step's result)."""
        if self.closed:
            return
        self.closed = True
        if self.tqdm is not None:
            self.tqdm.close()
        if self.console.bar is self:
            self.console.bar = None


# --- what each step's output shows ---------------------------------------------------------------

class StepOutput:
    """Gets every line a step's child prints (already in its log) and decides what the console
    shows of it. This base shows nothing: Ray's warnings and the libraries' progress bars stay
    in the log."""

    def __init__(self, console: Optional[Console] = None):
        self.console = console

    def feed(self, line: str) -> None:
        """One line of the child's output, with or without its newline."""

    def close(self) -> None:
        """The child has exited."""


class IngestOutput(StepOutput):
    """The ingest job's own ``[ingest]`` lines (pipelines/ingest.py): ``N videos to process``
    starts a bar, ``k/N done (r rejected): SOURCE: ...`` moves it, and every rejected video is
    shown with its reason."""

    TODO = re.compile(r"^\[ingest\] (\d+) videos to process")
    DONE = re.compile(r"^\[ingest\] (\d+)/(\d+) done \((\d+) rejected\)")
    REJECTED = re.compile(r"^\[ingest\]\s+rejected (.+)$")
    RESUMED = re.compile(r"^\[ingest\] resume: (.+)$")

    def __init__(self, console: Optional[Console] = None):
        super().__init__(console)
        self.bar: Optional[ProgressBar] = None
        self.done = self.total = self.rejected = 0

    def feed(self, line: str) -> None:
        line = plain(line)
        if m := self.DONE.match(line):
            self.done, self.total, self.rejected = int(m[1]), int(m[2]), int(m[3])
            if self.bar is None and self.console is not None:
                self.bar = self.console.progress("ingest", self.total, "videos")
            if self.bar is not None:
                self.bar.update_to(self.done, f"{self.rejected} rejected" if self.rejected else "")
        elif m := self.TODO.match(line):
            self.total = int(m[1])
            if self.console is not None:
                self.bar = self.console.progress("ingest", self.total, "videos")
        elif (m := self.REJECTED.match(line) or self.RESUMED.match(line)) and self.console is not None:
            self.console.say(f"  ingest: {'rejected ' if 'rejected' in line else ''}{m[1]}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class StageProgress:
    """What the output told about one training stage: steps (1..total) and their losses."""

    stage: int
    total: int
    step: int = 0
    first: Optional[tuple[int, float]] = None  # (step, loss) of the earliest step seen
    last: Optional[tuple[int, float]] = None  # (step, loss) of the latest step seen
    started_s: float = field(default_factory=time.monotonic)
    done: bool = False

    def add(self, step: int, loss: Optional[float]) -> None:
        self.step = max(self.step, step)
        if loss is not None:
            if self.first is None or step < self.first[0]:
                self.first = (step, loss)
            if self.last is None or step >= self.last[0]:
                self.last = (step, loss)

    def summary(self, count: int) -> str:
        line = f"train stage {self.stage}/{count}: {self.step}/{self.total} steps in {time.monotonic() - self.started_s:.0f} s"
        if self.first and self.last:
            line += f", loss {self.first[1]:.4f} (step {self.first[0]}) -> {self.last[1]:.4f} (step {self.last[0]})"
        return line


class TrainOutput(StepOutput):
    """Training steps from train.py's output: a bar per stage, with the loss, and one line per
    stage at its end (steps, time, loss at the first and last step seen).

    A step is the line rank 0 of every training job prints (``training/loop.py``,
    ``PROGRESS_PREFIX``): ``[train] stage S step N/T loss L``, behind Ray's ``(RayTrainWorker
    pid=P)`` prefix. Nothing else of the child's output is read (Ray's own log lines change
    between versions).
    """

    EXPLICIT = re.compile(r"\[train\] stage (\d+) step (\d+)/(\d+) loss (\S+)")

    def __init__(self, console: Optional[Console] = None, stages: Sequence[int] = (1, 2), steps: int = 100):
        super().__init__(console)
        self.stages = list(stages)
        self.steps = steps
        self.progress = {s: StageProgress(s, steps) for s in self.stages}
        self.index = 0  # position of the current stage in `stages`
        self.bar: Optional[ProgressBar] = None
        self.lines: list[str] = []  # one per finished stage, as shown

    @property
    def current(self) -> Optional[StageProgress]:
        return self.progress[self.stages[self.index]] if self.index < len(self.stages) else None

    def start(self) -> None:
        """Show the first stage's bar (at 0 while Ray starts its workers)."""
        self._open_bar()

    def _open_bar(self) -> None:
        cur = self.current
        if cur is None or self.console is None:
            return
        cur.started_s = time.monotonic()
        self.bar = self.console.progress(f"train stage {cur.stage}/{len(self.stages)}", cur.total, "steps")

    def _finish_current(self) -> None:
        cur = self.current
        if cur is None:
            return
        cur.done = True
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        line = cur.summary(len(self.stages))
        self.lines.append(line)
        if self.console is not None:
            self.console.say(line)
        self.index += 1

    def feed(self, line: str) -> None:
        if m := self.EXPLICIT.search(plain(line)):
            self._record(int(m[1]), int(m[2]), _float(m[4]), total=int(m[3]))

    def _record(self, stage: int, step: int, loss: Optional[float], total: Optional[int] = None) -> None:
        if stage not in self.progress:
            return
        prog = self.progress[stage]
        if prog.done:
            return  # a late line of a finished stage (another worker's copy of its last step)
        if total:
            prog.total = total
        while self.current is not None and self.current.stage != stage:  # a later stage began
            self._finish_current()
            self._open_bar()
        if self.bar is None:
            self._open_bar()
        prog.add(step, loss)
        if self.bar is not None:
            self.bar.update_to(prog.step, f"loss {loss:.4f}" if loss is not None else "")
        if prog.step >= prog.total:
            self._finish_current()
            self._open_bar()

    def close(self) -> None:
        if self.current is not None and self.current.step > 0:
            self._finish_current()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _float(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


# --- running steps -------------------------------------------------------------------------------

def _pump(stream, log, tail: deque, output: StepOutput) -> None:
    for line in iter(stream.readline, ""):
        log.write(line)
        log.flush()
        tail.append(plain(line))
        try:
            output.feed(line)
        except Exception as exc:  # noqa: BLE001 - a display problem must not stop the step
            log.write(f"[demo] could not show this line: {type(exc).__name__}: {exc}\n")
    stream.close()


def run_step(step: str, cmd: Sequence[str], log_path: Path, timeout_s: float,
             env: Optional[dict] = None, output: Optional[StepOutput] = None) -> float:
    """Run one step's command with all its output in ``log_path``; ``output`` (default: show
    nothing) gets each line to show progress. Returns the seconds it took. Raises
    :class:`StepError` naming the step on a non-zero exit, a timeout (``timeout_s``, seconds) or a
    missing program; its message ends with the last lines of the log."""
    output = output or StepOutput()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    t0 = time.monotonic()
    with log_path.open("w") as log:
        log.write(f"[demo] step {step}: {' '.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(list(cmd), cwd=PROJECT_ROOT, env=env or child_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            output.close()
            raise StepError(step, f"cannot start {cmd[0]}: {exc}", log_path) from exc
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, tail, output), daemon=True)
        pump.start()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            raise StepError(step, f"no result after {timeout_s:.0f} s", log_path) from None
        except KeyboardInterrupt:
            stop_process(proc)
            raise
        finally:
            pump.join(timeout=10)
            output.close()
    if code != 0:
        last = "\n    ".join(tail)
        raise StepError(step, f"exit status {code}; last lines:\n    {last}", log_path)
    return time.monotonic() - t0


def stop_process(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a child started in its own session: SIGINT to its group, then SIGTERM, then SIGKILL
    (``grace_s`` seconds for the SIGINT)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --- request inputs ------------------------------------------------------------------------------

def pick_request_video(samples: Path) -> Path:
    """The sample video the request's portrait is taken from (the first in name order under
    ``samples``: the demo passes the test-split folder)."""
    videos = sorted(p for p in samples.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise StepError("generate", f"no sample video found under {samples}")
    return videos[0]


def make_request_inputs(video: Path, out_dir: Path, audio_seconds: float,
                        sentence: Optional[str] = None) -> tuple[Path, Path]:
    """A portrait (first frame of ``video``, PNG) and ``audio_seconds`` of speech (16 kHz mono
    WAV): the video's own audio (ffmpeg), or with ``sentence`` that sentence spoken by espeak-ng
    (:func:`pipelines.samples.talking_heads.synthesize_speech`, fixed voice: seed 0)."""
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    image, audio = out_dir / "portrait.png", out_dir / "speech.wav"
    cmds = [["ffmpeg", "-v", "error", "-y", "-i", str(video), "-frames:v", "1", str(image)]]
    if sentence is None:
        cmds.append(["ffmpeg", "-v", "error", "-y", "-i", str(video), "-vn", "-ac", "1", "-ar", "16000",
                     "-t", f"{audio_seconds:g}", str(audio)])
    for cmd in cmds:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise StepError("generate", f"ffmpeg could not cut the request from {video}: {result.stderr.strip()}")
    if sentence is not None:
        spoken = out_dir / "speech.espeak.wav"
        try:
            synthesize_speech(sentence, spoken, audio_seconds, np.random.default_rng(0))
        except SampleDataError as exc:
            raise StepError("generate", f"espeak-ng could not speak the demo sentence: {exc}") from exc
        result = subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(spoken), "-ac", "1", "-ar", "16000",
                                 str(audio)], capture_output=True, text=True)
        spoken.unlink(missing_ok=True)
        if result.returncode != 0:
            raise StepError("generate", f"ffmpeg could not resample the demo speech: {result.stderr.strip()}")
    return image, audio


def read_image(path: Path):
    """uint8 RGB [H, W, 3] of an image file."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def score_demo_video(video: Path, audio: Path, portrait: Path, other_portraits: Sequence[Path] = (),
                     fps: float = 25.0) -> dict[str, float]:
    """The generated video's own metrics against its request audio (no real frames exist for a
    new sentence): ``face_found_ratio``, ``sync``, ``sync_control``, ``glo``, ``exp`` of
    :func:`pipelines.metrics.video_metrics.score_video` with dlib on frames upscaled to >= 256 px;
    ``identity`` (dlib descriptor distance to the request ``portrait``), ``identity_control`` (mean
    distance to ``other_portraits``: the other test people) and ``identity_nearest`` (1.0 when the
    request portrait is the nearest of them all)."""
    import numpy as np
    import soundfile as sf

    frames = np.concatenate([c.frames for c in iter_frames(video, fps=fps)])
    samples, rate = sf.read(str(audio), dtype="float32", always_2d=True)
    out = score_video(frames, None, samples.mean(axis=1), rate, fps, make_detector("dlib"))
    describer = FaceDescriber()
    own = video_identity(describer, frames, None, read_image(portrait))
    out.update(own.metrics)
    others = [mean_distance(own.generated, describer.describe(read_image(p)[None])[0][0]) for p in other_portraits]
    others = [d for d in others if np.isfinite(d)]
    if others:
        out["identity_control"] = float(np.mean(others))
        out["identity_nearest"] = float(out["identity"] < min(others))
    return out


def first_frames(samples: Path, out_dir: Path) -> list[Path]:
    """The first frame (PNG) of every test-split video under ``samples``, name order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for video in sorted(p for p in samples.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES):
        image = out_dir / f"{video.stem}.png"
        result = subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(video), "-frames:v", "1", str(image)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise StepError("score", f"ffmpeg could not read the first frame of {video}: {result.stderr.strip()}")
        images.append(image)
    return images


def format_metrics(metrics: dict, keys: Sequence[str] = SHOWN_METRICS) -> str:
    """``key value`` pairs of the ``keys`` present in ``metrics`` (3 decimals; psnr in dB)."""
    parts = []
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{key} {value:.2f} dB" if key == "psnr" else f"{key} {value:.3f}")
    return ", ".join(parts) if parts else "no metrics"


def evaluation_means(path: Path) -> dict:
    """``{"mean": {...}}`` of the evaluation job's JSON (empty when it has none)."""
    import json

    try:
        return dict(json.loads(path.read_text()).get("mean") or {})
    except (OSError, ValueError) as exc:
        raise StepError("evaluate", f"cannot read the evaluation results {path}: {exc}") from exc


def check_ingest_output(ingested: Path) -> str:
    """After the ingest step: at least one video made it (else :class:`StepError` listing the
    reasons of the rejects from the manifest). Returns a one-line summary."""
    import pyarrow.parquet as pq

    manifest_path = ingested / "videos.parquet"
    if not manifest_path.is_file():
        raise StepError("ingest", f"no manifest {manifest_path}")
    rows = pq.read_table(manifest_path, columns=["source", "status", "reason", "num_frames"]).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    rejected = [r for r in rows if r["status"] != "ok"]
    if not ok:
        reasons = "\n    ".join(f"{r['source']}: {r['reason']}" for r in rejected[:10])
        raise StepError("ingest", f"no video was ingested ({len(rejected)} rejected):\n    {reasons}")
    frames = sum(r["num_frames"] or 0 for r in ok)
    return f"{len(ok)} videos ingested ({frames} frames at 25 fps), {len(rejected)} rejected"


# --- MLflow --------------------------------------------------------------------------------------

def stage2_model_uri(tracking_uri: str, registered_name: str, since_ms: int) -> str:
    """``models:/<name>/<version>`` of the stage-2 model registered by this demo's training (the
    version the ``stage2`` alias points at, checked to be newer than ``since_ms``)."""
    from mlflow import MlflowClient

    version = latest_version(registered_name, 2, tracking_uri)
    if version is None:
        raise StepError("register", f"no stage-2 version of registered model '{registered_name}' in {tracking_uri}")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    created = client.get_model_version(registered_name, str(version)).creation_timestamp
    if created < since_ms:
        raise StepError("register", f"'{registered_name}' version {version} predates this run: training registered nothing")
    return f"models:/{registered_name}/{version}"


def loss_summaries(tracking_uri: str, experiment: str, since_ms: int) -> list[str]:
    """One line per stage run started after ``since_ms``: the mean training ``loss`` of its first
    and last tenth of steps, and its last ``val_loss``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    lines = []
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.start_time >= {since_ms}",
                              order_by=["attributes.start_time ASC"])
    for run in runs:
        history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
        if len(history) < 2:
            continue
        k = max(1, len(history) // 10)
        first = sum(m.value for m in history[:k]) / k
        last = sum(m.value for m in history[-k:]) / k
        line = (f"{run.info.run_name or run.info.run_id}: training loss {first:.4f} (first {k} steps) -> "
                f"{last:.4f} (last {k} steps) over {len(history)} steps")
        if "val_loss" in run.data.metrics:
            line += f"; val_loss {run.data.metrics['val_loss']:.4f}"
        lines.append(line)
    return lines


def video_summary(path: Path) -> str:
    """``frames x WxH, seconds`` of a video file (ffprobe), for the final printout."""
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries",
         "stream=nb_read_frames,width,height:format=duration", "-of", "default=nw=1", str(path)],
        capture_output=True, text=True)
    if result.returncode != 0:
        raise StepError("generate", f"{path} is not a readable video: {result.stderr.strip()}")
    info = dict(line.split("=", 1) for line in result.stdout.split() if "=" in line)
    return f"{info.get('nb_read_frames', '?')} frames, {info.get('width')}x{info.get('height')}, {float(info.get('duration', 0)):.2f} s"


def remove_stale_inputs(paths: DemoPaths) -> None:
    """Videos directly in ``paths.samples`` (the layout before the train / heldout folders) would
    be ingested beside the new ones: remove them (the samples step writes the set again)."""
    if paths.samples.is_dir():
        for p in paths.samples.iterdir():
            if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
                p.unlink()


def fitted_vae_key(paths: DemoPaths) -> str:
    """The cache key of the fitted VAE (``training.fit_vae``'s record), "" when there is none."""
    import json

    try:
        return str(json.loads((paths.fitted_vae / "fit_vae.json").read_text()).get("key", ""))
    except (OSError, ValueError):
        return ""


def drop_ingest_of_another_vae(paths: DemoPaths) -> bool:
    """Remove ``paths.ingested`` when its latents were not encoded by the VAE fitted now (another
    fit, or an ingest from before the fit: the ingest's resume would keep their latents).
    Returns whether it was removed."""
    if not paths.ingested.exists():
        return False
    marker = paths.ingested / VAE_KEY_FILE
    if marker.is_file() and marker.read_text() == fitted_vae_key(paths):
        return False
    shutil.rmtree(paths.ingested)
    return True


def vae_summary(folder: Path) -> str:
    """One line from ``training.fit_vae``'s record: held-out PSNR of the fitted and the random VAE."""
    import json

    try:
        record = json.loads((folder / "fit_vae.json").read_text())
    except (OSError, ValueError) as exc:
        raise StepError("fit_vae", f"no fit record in {folder}: {exc}") from exc
    return (f"VAE fitted to the training faces: PSNR {record['psnr_db']:.1f} dB on held-out frames "
            f"(random VAE {record['psnr_random_db']:.1f} dB; fitted in {record['seconds']:.0f} s)")


class JobProgress:
    """``on_update`` of :meth:`serve.client.VideoClient.wait`: a bar of the job's clips."""

    def __init__(self, console: Console):
        self.console = console
        self.bar: Optional[ProgressBar] = None

    def __call__(self, status: dict) -> None:
        total = status.get("clips_total") or 0
        if total and self.bar is None:
            self.bar = self.console.progress("generate", int(total), "clips")
        if self.bar is not None:
            self.bar.update_to(int(status.get("clips_done") or 0))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _short(path: Path) -> str:
    """``path`` relative to the current folder when it is below it (shorter console lines)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --- the demo ------------------------------------------------------------------------------------

def run_demo(work: Path, settings: DemoSettings, console: Optional[Console] = None) -> Path:
    """Run every step (module docstring); returns the downloaded video. Raises :class:`StepError`."""
    console = console or Console()
    say = console.say
    t_start = time.monotonic()
    paths = DemoPaths(work.resolve())
    paths.work.mkdir(parents=True, exist_ok=True)
    env = child_env()
    cfg = load_platform_config(None, config_overrides(paths, settings))
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    commands = step_commands(paths, settings)
    say(f"working in {_short(paths.work)}; the full output of each step goes to {_short(paths.logs)}/<step>.log")

    remove_stale_inputs(paths)
    seconds = run_step("samples", commands["samples"], paths.logs / "samples.log", settings.step_timeout_s, env)
    videos = sorted(p for p in paths.samples.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    say(f"samples: {len(videos)} synthetic talking-head videos in {_short(paths.samples)} ({seconds:.0f} s)")

    seconds = run_step("fit_vae", commands["fit_vae"], paths.logs / "fit_vae.log", settings.step_timeout_s, env)
    say(f"fit_vae: {vae_summary(paths.fitted_vae)} -> {_short(paths.fitted_vae)} ({seconds:.0f} s)")
    if drop_ingest_of_another_vae(paths):
        say(f"ingest: {_short(paths.ingested)} held latents of another VAE: ingesting again")

    seconds = run_step("ingest", commands["ingest"], paths.logs / "ingest.log", settings.step_timeout_s, env,
                       IngestOutput(console))
    say(f"ingest: {check_ingest_output(paths.ingested)} -> {_short(paths.ingested)} ({seconds:.0f} s)")
    (paths.ingested / VAE_KEY_FILE).write_text(fitted_vae_key(paths))

    since_ms = int(time.time() * 1000)
    train_output = TrainOutput(console, settings.stages, settings.train_steps)
    train_output.start()
    seconds = run_step("train", commands["train"], paths.logs / "train.log", settings.train_timeout_s, env,
                       train_output)
    say(f"train: {len(settings.stages)} stages with Ray Train in {seconds:.0f} s")

    try:
        model_uri = stage2_model_uri(tracking_uri, cfg.tracking.registered_model, since_ms)
        losses = loss_summaries(tracking_uri, cfg.tracking.experiment, since_ms)
    except StepError:
        raise
    except Exception as exc:  # MLflow errors: name the step and the store
        raise StepError("register", f"{type(exc).__name__}: {exc} (tracking store {tracking_uri})") from exc
    say(f"register: {model_uri} in the MLflow registry ({tracking_uri})")
    for line in losses:
        say(f"  {line}")

    seconds = run_step("evaluate", evaluate_command(paths, settings, model_uri), paths.logs / "evaluate.log",
                       settings.eval_timeout_s, env)
    test_means = evaluation_means(paths.evaluation)
    say(f"evaluate: test split ({_short(paths.test_samples)}) mean {format_metrics(test_means)} -> "
        f"{_short(paths.evaluation)} ({seconds:.0f} s)")

    port = settings.port or free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = serve_command(paths, settings, model_uri, port)
    serve_log = paths.logs / "serve.log"
    serve_log.parent.mkdir(parents=True, exist_ok=True)
    log = serve_log.open("w")
    log.write(f"[demo] step serve: {' '.join(cmd)}\n")
    log.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    client = VideoClient(base_url)  # loopback service without client tokens (serve.auth)
    job = JobProgress(console)
    try:
        with as_step("serve", serve_log):
            client.wait_healthy(settings.step_timeout_s, alive=lambda: proc.poll() is None, poll_s=1.0)
        say(f"serve: the service is up at {base_url}/ ({time.monotonic() - t0:.0f} s)")
        t0 = time.monotonic()
        request_video = pick_request_video(paths.test_samples)
        image, audio = make_request_inputs(request_video, paths.request, settings.audio_seconds, DEMO_SENTENCE)
        with as_step("generate", serve_log):
            job_id = client.submit(image, audio, {"steps": settings.sample_steps})
            client.wait(job_id, settings.generate_timeout_s, on_update=job)
            job.close()
            video = client.download(job_id, paths.video)
        say(f"generate: {_short(video)} ({video_summary(video)}; {settings.sample_steps} DDIM steps, the portrait of "
            f"test-split {request_video.name} and {settings.audio_seconds:g} s of a new sentence) in "
            f"{time.monotonic() - t0:.0f} s")
    except StepError as exc:
        if exc.log is None:  # point at the service's log, where the server side of the error is
            raise StepError(exc.step, exc.detail, serve_log) from exc
        raise
    finally:
        job.close()
        client.close()
        stop_process(proc)
        log.close()

    t0 = time.monotonic()
    try:
        others = [p for p in first_frames(paths.test_samples, paths.request / "test_portraits")
                  if p.stem != request_video.stem]
        demo_metrics = score_demo_video(paths.video, audio, image, others)
    except Exception as exc:  # noqa: BLE001 - a metric problem names the step, never a bare traceback
        raise StepError("score", f"{type(exc).__name__}: {exc}") from exc
    say(f"score: {_short(paths.video)}: {format_metrics(demo_metrics)} (dlib landmarks and face descriptors, "
        f"{time.monotonic() - t0:.0f} s)")

    mlflow_ui = (f"make mlflow-ui, or {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri "
                 f"{tracking_uri} --host 127.0.0.1 --port 5000; then http://127.0.0.1:5000")
    say(f"done in {(time.monotonic() - t_start) / 60:.1f} min")
    say(f"  video:     {_short(paths.video)}: {format_metrics(demo_metrics)}")
    say(f"  test split: {format_metrics(test_means)} ({_short(paths.evaluation)})")
    say(f"  MLflow UI: {mlflow_ui}")
    say(f"  logs:      {paths.logs}")
    say(f"  service:   ran at {base_url}/ (stopped); start it again with: {' '.join(cmd)}")
    return paths.video


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python demo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, type=Path, help="folder for everything the demo writes")
    parser.add_argument("--train-steps", type=int, default=DemoSettings.train_steps, help="optimizer steps per stage")
    parser.add_argument("--sample-steps", type=int, default=DemoSettings.sample_steps, help="DDIM steps of the video")
    parser.add_argument("--vae-steps", type=int, default=DemoSettings.vae_steps,
                        help="optimizer steps of the tiny VAE's fit to the sample faces")
    parser.add_argument("--port", type=int, default=None, help="HTTP port of the service (default: a free one)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python demo.py`` / ``loopy-demo``: 0 with ``video: PATH`` as the last line, 1 when a step
    failed, 2 without ffmpeg, 130 when interrupted."""
    args = build_parser().parse_args(argv)
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            print(f"demo failed at step 'setup': {tool} not found (make sysdeps installs it)", file=sys.stderr)
            return 2
    settings = DemoSettings(train_steps=args.train_steps, sample_steps=args.sample_steps, vae_steps=args.vae_steps,
                            port=args.port)
    try:
        video = run_demo(args.work, settings)
    except StepError as exc:
        sys.stdout.flush()
        print(str(exc), file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 130
    print(f"video: {video}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
