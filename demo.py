"""The one-command demo (``make demo`` = ``python demo.py --work DIR``).

Runs the whole platform on one machine, each step through the same command line a user or a
cluster job would run, with the venv's Python:

1. ``samples``  - ``python -m pipelines.sample_data --output WORK/samples`` (talking-head videos)
2. ``ingest``   - ``python pipelines/ingest.py --input WORK/samples --output WORK/ingested`` (Ray Data)
3. ``train``    - ``python train.py --data WORK/ingested --stages 1,2`` (Ray Train, tiny preset;
   the model package is logged to MLflow and registered as ``tracking.registered_model``)
4. ``register`` - look the registered version up in MLflow and print each stage's loss curve
5. ``serve``    - start the Serve app on 127.0.0.1 (a free port), wait for ``/healthz``
6. ``generate`` - POST /v1/videos (the first frame and a few seconds of audio of a sample video),
   poll GET /v1/videos/{id}, download GET /v1/videos/{id}/file
7. stop the service; print where the video, the MLflow UI and the service are.

Progress is printed as it goes (each child's output, prefixed with its step); a failing step
stops the demo with ``demo failed at step '<step>'`` and the tail of its log
(``WORK/logs/<step>.log``). The last line printed is exactly ``video: PATH``.
Everything stays on 127.0.0.1; nothing is downloaded (tiny random weights).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from core.paths import PROJECT_ROOT, resolve_tracking_uri
from models.registry import latest_version
from core.config import load_platform_config

STEPS = ("samples", "ingest", "train", "register", "serve", "generate")
TERMINAL_STATES = {"done", "failed"}


class StepError(RuntimeError):
    """A demo step failed; ``step`` names it, ``log`` is its log file (if any)."""

    def __init__(self, step: str, message: str, log: Optional[Path] = None):
        super().__init__(f"demo failed at step '{step}': {message}" + (f" (log: {log})" if log else ""))
        self.step = step
        self.detail = message
        self.log = log


@dataclass(frozen=True)
class DemoPaths:
    """Every file and folder the demo writes, under ``work``."""

    work: Path

    @property
    def samples(self) -> Path:
        return self.work / "samples"

    @property
    def ingested(self) -> Path:
        return self.work / "ingested"

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
    """Sizes of the demo: small enough for 15 minutes on 2 CPU cores."""

    train_steps: int = 100  # optimizer steps per stage
    train_lr: float = 2e-4  # the tiny random model learns visibly in 100 steps (the paper's 1e-5 is for SD-1.5)
    num_cpus: int = 2
    sample_steps: int = 10  # DDIM steps of the generated video
    audio_seconds: float = 3.0  # length of the request's audio
    port: Optional[int] = None  # Serve HTTP port; None = a free one
    step_timeout_s: float = 600.0  # each step but training
    train_timeout_s: float = 1500.0  # both stages
    generate_timeout_s: float = 420.0


# --- argument building ---------------------------------------------------------------------------

def config_overrides(paths: DemoPaths, settings: DemoSettings) -> list[str]:
    """``section.key=value`` overrides every step gets: all files under ``paths.work``, local Ray."""
    return [
        "ray.address=local",
        f"ray.num_cpus={settings.num_cpus}",
        "weights.preset=tiny",
        f"weights.tiny_dir={paths.tiny_weights}",
        f"train.storage_path={paths.ray_results}",
        f"serve.job_dir={paths.serve_jobs}",
    ]


def step_commands(paths: DemoPaths, settings: DemoSettings, python: str = sys.executable) -> dict[str, list[str]]:
    """The command line of each subprocess step (the same CLIs users and cluster jobs run)."""
    common = config_overrides(paths, settings)
    return {
        "samples": [python, "-m", "pipelines.sample_data", "--output", str(paths.samples)],
        "ingest": [python, str(PROJECT_ROOT / "pipelines" / "ingest.py"), "--input", str(paths.samples),
                   "--output", str(paths.ingested), *common],
        "train": [python, str(PROJECT_ROOT / "train.py"), "--data", str(paths.ingested), "--stages", "1,2",
                  *common, f"train.max_steps={settings.train_steps}", f"train.lr={settings.train_lr:g}",
                  f"train.checkpoint_every={settings.train_steps}",
                  f"train.eval_every={settings.train_steps}"],
    }


def serve_command(paths: DemoPaths, settings: DemoSettings, model_uri: str, port: int,
                  python: str = sys.executable) -> list[str]:
    """The Serve app on 127.0.0.1:``port`` serving ``model_uri``."""
    return [python, "-m", "serve.app", *config_overrides(paths, settings), "serve.host=127.0.0.1",
            f"serve.port={port}", f"serve.model={model_uri}"]


def free_port(host: str = "127.0.0.1") -> int:
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
        # the children's output is piped and prefixed: Ray Data's redrawn progress bars are noise there
        "RAY_DATA_DISABLE_PROGRESS_BARS": env.get("RAY_DATA_DISABLE_PROGRESS_BARS", "1"),
    })
    env.pop("RAY_ADDRESS", None)  # the demo never joins a cluster
    Path(env["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    return env


# --- running steps -------------------------------------------------------------------------------

def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _pump(stream, log, prefix: str, tail: deque) -> None:
    for line in iter(stream.readline, ""):
        log.write(line)
        log.flush()
        tail.append(line.rstrip("\n"))
        print(f"  {prefix}| {line.rstrip()}", flush=True)
    stream.close()


def run_step(step: str, cmd: Sequence[str], log_path: Path, timeout_s: float,
             env: Optional[dict] = None) -> None:
    """Run one step's command, echoing its output with a prefix and keeping it in ``log_path``.
    Raises :class:`StepError` naming the step on a non-zero exit, a timeout or a missing program."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    say(f"step {step}: {' '.join(cmd)}")
    tail: deque[str] = deque(maxlen=15)
    t0 = time.monotonic()
    with log_path.open("w") as log:
        try:
            proc = subprocess.Popen(list(cmd), cwd=PROJECT_ROOT, env=env or child_env(), text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            raise StepError(step, f"cannot start {cmd[0]}: {exc}", log_path) from exc
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, step, tail), daemon=True)
        pump.start()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            raise StepError(step, f"no result after {timeout_s:.0f} s", log_path)
        except KeyboardInterrupt:
            stop_process(proc)
            raise
        pump.join(timeout=10)
    if code != 0:
        last = "\n    ".join(tail)
        raise StepError(step, f"exit status {code}; last lines:\n    {last}", log_path)
    say(f"step {step} done in {time.monotonic() - t0:.0f} s")


def stop_process(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a child started in its own session: SIGINT to its group, then SIGKILL."""
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
    """The sample video the request is cut from (the first in name order)."""
    videos = sorted(p for p in samples.rglob("*") if p.suffix.lower() in {".mp4", ".mkv", ".mov", ".webm", ".avi"})
    if not videos:
        raise StepError("generate", f"no sample video found under {samples}")
    return videos[0]


def make_request_inputs(video: Path, out_dir: Path, audio_seconds: float) -> tuple[Path, Path]:
    """A portrait (first frame, PNG) and ``audio_seconds`` of its audio (16 kHz mono WAV) via ffmpeg."""
    out_dir.mkdir(parents=True, exist_ok=True)
    image, audio = out_dir / "portrait.png", out_dir / "speech.wav"
    for cmd in (
        ["ffmpeg", "-v", "error", "-y", "-i", str(video), "-frames:v", "1", str(image)],
        ["ffmpeg", "-v", "error", "-y", "-i", str(video), "-vn", "-ac", "1", "-ar", "16000",
         "-t", f"{audio_seconds:g}", str(audio)],
    ):
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise StepError("generate", f"ffmpeg could not cut the request from {video}: {result.stderr.strip()}")
    return image, audio


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


# --- the HTTP client -----------------------------------------------------------------------------

class VideoClient:
    """Client of the video service: ``submit`` -> job id, ``wait`` (poll), ``download``."""

    def __init__(self, base_url: str, timeout_s: float = 60.0, token: Optional[str] = None):
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url, timeout=timeout_s, headers=headers, trust_env=False)

    def close(self) -> None:
        self.http.close()

    def healthy(self) -> bool:
        import httpx

        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout_s: float, alive: Callable[[], bool] = lambda: True, poll_s: float = 1.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.healthy():
                return
            if not alive():
                raise StepError("serve", "the service exited before it answered /healthz")
            time.sleep(poll_s)
        raise StepError("serve", f"/healthz did not answer 200 within {timeout_s:.0f} s")

    def submit(self, image: Path, audio: Path, options: Optional[dict] = None) -> str:
        with image.open("rb") as img, audio.open("rb") as aud:
            files = {"image": (image.name, img, "application/octet-stream"),
                     "audio": (audio.name, aud, "application/octet-stream")}
            resp = self.http.post("/v1/videos", files=files, data={k: str(v) for k, v in (options or {}).items()})
        if resp.status_code not in (200, 201, 202):
            raise StepError("generate", f"POST /v1/videos answered {resp.status_code}: {resp.text[:500]}")
        body = resp.json()
        job_id = body.get("id") or body.get("job_id")
        if not job_id:
            raise StepError("generate", f"POST /v1/videos gave no job id: {body}")
        return str(job_id)

    def wait(self, job_id: str, timeout_s: float, poll_s: float = 2.0,
             on_update: Callable[[dict], None] = lambda status: None) -> dict:
        """Poll ``GET /v1/videos/{id}`` until the job is done (returns its status) or failed (raises)."""
        deadline = time.monotonic() + timeout_s
        while True:
            resp = self.http.get(f"/v1/videos/{job_id}")
            if resp.status_code != 200:
                raise StepError("generate", f"GET /v1/videos/{job_id} answered {resp.status_code}: {resp.text[:500]}")
            status = resp.json()
            on_update(status)
            state = status.get("state") or status.get("status")
            if state == "done":
                return status
            if state == "failed":
                raise StepError("generate", f"job {job_id} failed: {status.get('error', status)}")
            if state not in {"queued", "running"}:
                raise StepError("generate", f"job {job_id}: unknown state {state!r} in {status}")
            if time.monotonic() > deadline:
                raise StepError("generate", f"job {job_id} not done after {timeout_s:.0f} s (last: {status})")
            time.sleep(poll_s)

    def download(self, job_id: str, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.http.stream("GET", f"/v1/videos/{job_id}/file") as resp:
            if resp.status_code != 200:
                resp.read()
                raise StepError("generate", f"GET /v1/videos/{job_id}/file answered {resp.status_code}: {resp.text[:500]}")
            with dest.open("wb") as fh:
                for chunk in resp.iter_bytes():
                    fh.write(chunk)
        if dest.stat().st_size == 0:
            raise StepError("generate", f"the downloaded video {dest} is empty")
        return dest


def progress_printer() -> Callable[[dict], None]:
    """Print a job's status only when it changes."""
    last: list = [None]

    def show(status: dict) -> None:
        state = status.get("state") or status.get("status")
        key = (state, status.get("clips_done"), status.get("clips_total"))
        if key != last[0]:
            last[0] = key
            extra = f" clip {key[1]}/{key[2]}" if key[2] else ""
            say(f"job {status.get('id', '')}: {state}{extra}")

    return show


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


# --- the demo ------------------------------------------------------------------------------------

def run_demo(work: Path, settings: DemoSettings) -> Path:

    t_start = time.monotonic()
    paths = DemoPaths(work.resolve())
    paths.work.mkdir(parents=True, exist_ok=True)
    env = child_env()
    cfg = load_platform_config(None, config_overrides(paths, settings))
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    commands = step_commands(paths, settings)

    for step in ("samples", "ingest", "train"):
        if step == "train":
            since_ms = int(time.time() * 1000)
        timeout = settings.train_timeout_s if step == "train" else settings.step_timeout_s
        run_step(step, commands[step], paths.logs / f"{step}.log", timeout, env)
        if step == "ingest":
            say(check_ingest_output(paths.ingested))

    say("step register: the model package in the MLflow registry")
    try:
        model_uri = stage2_model_uri(tracking_uri, cfg.tracking.registered_model, since_ms)
        for line in loss_summaries(tracking_uri, cfg.tracking.experiment, since_ms):
            say(line)
    except StepError:
        raise
    except Exception as exc:  # MLflow errors: name the step and the store
        raise StepError("register", f"{type(exc).__name__}: {exc} (tracking store {tracking_uri})") from exc
    say(f"registered model: {model_uri}")

    port = settings.port or free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = serve_command(paths, settings, model_uri, port)
    say(f"step serve: {' '.join(cmd)}")
    serve_log = paths.logs / "serve.log"
    serve_log.parent.mkdir(parents=True, exist_ok=True)
    log = serve_log.open("w")
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    client = VideoClient(base_url, token=cfg.serve.auth_token)
    try:
        client.wait_healthy(settings.step_timeout_s, alive=lambda: proc.poll() is None)
        say(f"service up at {base_url} (log {serve_log})")
        say("step generate: POST /v1/videos, poll, download")
        image, audio = make_request_inputs(pick_request_video(paths.samples), paths.request, settings.audio_seconds)
        job_id = client.submit(image, audio, {"steps": settings.sample_steps})
        say(f"job {job_id} queued")
        client.wait(job_id, settings.generate_timeout_s, on_update=progress_printer())
        video = client.download(job_id, paths.video)
        say(f"video downloaded: {video} ({video_summary(video)})")
    except StepError as exc:
        if exc.log is None:  # point at the service's log, where the server side of the error is
            raise StepError(exc.step, exc.detail, serve_log) from exc
        raise
    finally:
        client.close()
        say("stopping the service")
        stop_process(proc)
        log.close()

    say(f"done in {(time.monotonic() - t_start) / 60:.1f} min")
    say(f"service: ran at {base_url} (stopped); start it again with: {' '.join(cmd)}")
    say(f"MLflow UI: make mlflow-ui  (or {Path(sys.executable).parent / 'mlflow'} ui "
        f"--backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000), model {model_uri}")
    say(f"ingested data: {paths.ingested}; logs: {paths.logs}")
    return paths.video


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python demo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, type=Path, help="folder for everything the demo writes")
    parser.add_argument("--train-steps", type=int, default=DemoSettings.train_steps, help="optimizer steps per stage")
    parser.add_argument("--sample-steps", type=int, default=DemoSettings.sample_steps, help="DDIM steps of the video")
    parser.add_argument("--port", type=int, default=None, help="HTTP port of the service (default: a free one)")
    args = parser.parse_args(argv)
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            print(f"demo failed at step 'setup': {tool} not found (make sysdeps installs it)", file=sys.stderr)
            return 2
    settings = DemoSettings(train_steps=args.train_steps, sample_steps=args.sample_steps, port=args.port)
    try:
        video = run_demo(args.work, settings)
    except StepError as exc:
        print(str(exc), file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 130
    print(f"video: {video}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
