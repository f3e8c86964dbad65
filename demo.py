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
stdout is not a terminal (piped, CI) it is a plain line at every 10 % (tqdm too:
:class:`demo_parts.console.LineBar`). Nothing else of the
children's output reaches the console: all of it is in ``WORK/logs/<step>.log``. A failing step
stops the demo with ``demo failed at step '<step>'`` and the tail of its log. The last line
printed is exactly ``video: PATH``. Everything stays on 127.0.0.1; nothing is downloaded (tiny
weights: random U-Net and wav2vec2, the VAE fitted here).

This script is the order of the steps; their parts are in :mod:`demo_parts` (paths, settings and
command lines; the step runner; the console; checks and summaries; the request and its scores),
the MLflow look-ups in :mod:`training.run_summary`.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from core.config import load_platform_config
from core.paths import resolve_tracking_uri
from demo_parts.console import Console, IngestOutput, JobProgress, TrainOutput
from demo_parts.plan import DemoPaths, DemoSettings, config_overrides, evaluate_command, serve_command, \
    step_commands, videos_under
from demo_parts.request import DEMO_SENTENCE, first_frames, make_request_inputs, pick_request_video, \
    score_demo_video
from demo_parts.results import CODEC_METRICS, VAE_KEY_FILE, check_ingest_output, drop_ingest_of_another_vae, \
    evaluation_means, fitted_vae_key, format_metrics, remove_stale_inputs, short, vae_summary, video_summary
from demo_parts.runner import StepError, background, child_env, free_port, run_step
from serve.client import ClientError, VideoClient
from training.errors import TrainingError
from training.run_summary import loss_summaries, registered_model_uri


@contextlib.contextmanager
def as_step(step: str) -> Iterator[None]:
    """Turn a :class:`serve.client.ClientError` raised inside into a :class:`StepError` of ``step``."""
    try:
        yield
    except ClientError as exc:
        raise StepError(step, str(exc)) from exc


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

    def step(name: str, timeout_s: float, output=None, cmd: Optional[list[str]] = None) -> float:
        return run_step(name, cmd or commands[name], paths.logs / f"{name}.log", timeout_s, env, output)

    say(f"working in {short(paths.work)}; the full output of each step goes to {short(paths.logs)}/<step>.log")

    # sample data: talking heads of 15 people, 3 of them only in the test split
    remove_stale_inputs(paths)
    seconds = step("samples", settings.step_timeout_s)
    say(f"samples: {len(videos_under(paths.samples))} synthetic talking-head videos in {short(paths.samples)} "
        f"({seconds:.0f} s)")

    # the tiny VAE fitted to the training faces (every later step loads it)
    seconds = step("fit_vae", settings.step_timeout_s)
    say(f"fit_vae: {vae_summary(paths.fitted_vae)} -> {short(paths.fitted_vae)} ({seconds:.0f} s)")
    if drop_ingest_of_another_vae(paths):
        say(f"ingest: {short(paths.ingested)} held latents of another VAE: ingesting again")

    # ingest (Ray Data)
    seconds = step("ingest", settings.step_timeout_s, IngestOutput(console))
    say(f"ingest: {check_ingest_output(paths.ingested)} -> {short(paths.ingested)} ({seconds:.0f} s)")
    (paths.ingested / VAE_KEY_FILE).write_text(fitted_vae_key(paths))

    # training, stage 1 then stage 2 (Ray Train); the stage-2 model from the MLflow registry
    since_ms = int(time.time() * 1000)
    train_output = TrainOutput(console, settings.stages, settings.stage_steps())
    train_output.start()
    seconds = step("train", settings.train_timeout_s, train_output)
    say(f"train: {len(settings.stages)} stages with Ray Train in {seconds:.0f} s")
    try:
        model_uri = registered_model_uri(tracking_uri, cfg.tracking.registered_model, settings.stages[-1], since_ms)
        losses = loss_summaries(tracking_uri, cfg.tracking.experiment, since_ms)
    except TrainingError as exc:
        raise StepError("register", str(exc)) from exc
    except Exception as exc:  # MLflow errors: name the step and the store
        raise StepError("register", f"{type(exc).__name__}: {exc} (tracking store {tracking_uri})") from exc
    say(f"register: {model_uri} in the MLflow registry ({tracking_uri})")
    for line in losses:
        say(f"  {line}")

    # evaluation of the test split (evaluate.py)
    seconds = step("evaluate", settings.eval_timeout_s, cmd=evaluate_command(paths, settings, model_uri))
    test_means = evaluation_means(paths.evaluation)
    say(f"evaluate: test split ({short(paths.test_samples)}) mean {format_metrics(test_means)} -> "
        f"{short(paths.evaluation)} ({seconds:.0f} s)")
    say(f"  the VAE's ceiling (real frames through the VAE alone): {format_metrics(test_means, CODEC_METRICS)}")

    # sampling through the service: a test-split portrait and a sentence no sample video says
    port = settings.port or free_port()
    base_url = f"http://127.0.0.1:{port}"
    serve_cmd = serve_command(paths, settings, model_uri, port)
    t0 = time.monotonic()
    with background("serve", serve_cmd, paths.logs / "serve.log", env) as service, \
            VideoClient(base_url) as client:  # loopback service without client tokens (serve.auth)
        with as_step("serve"):
            client.wait_healthy(settings.step_timeout_s, alive=lambda: service.poll() is None, poll_s=1.0)
        say(f"serve: the service is up at {base_url}/ ({time.monotonic() - t0:.0f} s)")
        t0 = time.monotonic()
        request_video = pick_request_video(paths.test_samples)
        image, audio = make_request_inputs(request_video, paths.request, settings.audio_seconds, DEMO_SENTENCE)
        job = JobProgress(console)
        with as_step("generate"):
            job_id = client.submit(image, audio, {"steps": settings.sample_steps})
            try:
                client.wait(job_id, settings.generate_timeout_s, on_update=job)
            finally:
                job.close()
            video = client.download(job_id, paths.video)
        say(f"generate: {short(video)} ({video_summary(video)}; {settings.sample_steps} DDIM steps, the portrait of "
            f"test-split {request_video.name} and {settings.audio_seconds:g} s of a new sentence) in "
            f"{time.monotonic() - t0:.0f} s")

    # the video's own figures: lip sync to its audio, and whose face it shows
    t0 = time.monotonic()
    try:
        others = [p for p in first_frames(paths.test_samples, paths.request / "test_portraits")
                  if p.stem != request_video.stem]
        demo_metrics = score_demo_video(paths.video, audio, image, others)
    except Exception as exc:  # noqa: BLE001 - a metric problem names the step, never a bare traceback
        raise StepError("score", f"{type(exc).__name__}: {exc}") from exc
    say(f"score: {short(paths.video)}: {format_metrics(demo_metrics)} (dlib landmarks and face descriptors, "
        f"{time.monotonic() - t0:.0f} s)")

    mlflow_ui = (f"make mlflow-ui, or {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri "
                 f"{tracking_uri} --host 127.0.0.1 --port 5000; then http://127.0.0.1:5000")
    say(f"done in {(time.monotonic() - t_start) / 60:.1f} min")
    say(f"  video:     {short(paths.video)}: {format_metrics(demo_metrics)}")
    say(f"  test split: {format_metrics(test_means)} ({short(paths.evaluation)})")
    say(f"  MLflow UI: {mlflow_ui}")
    say(f"  logs:      {paths.logs}")
    say(f"  service:   ran at {base_url}/ (stopped); start it again with: {' '.join(serve_cmd)}")
    return paths.video


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python demo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, type=Path, help="folder for everything the demo writes")
    parser.add_argument("--train-steps", type=int, default=DemoSettings.train_steps, help="optimizer steps of stage 2")
    parser.add_argument("--stage1-step-ratio", type=float, default=DemoSettings.stage1_step_ratio,
                        help="stage 1's steps as a multiple of --train-steps")
    parser.add_argument("--mouth-loss-weight", type=float, default=DemoSettings.mouth_loss_weight,
                        help="train.mouth_loss_weight of stage 2 (docs/METHOD.md 8; lip sync in the tiny model: "
                             "--train-steps 1200 --stage1-step-ratio 1 --mouth-loss-weight 4, docs/EVALUATION.md)")
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
    settings = DemoSettings(train_steps=args.train_steps, stage1_step_ratio=args.stage1_step_ratio,
                            mouth_loss_weight=args.mouth_loss_weight, sample_steps=args.sample_steps,
                            vae_steps=args.vae_steps, port=args.port)
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
