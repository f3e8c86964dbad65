"""The demo's parts (``demo_parts``) and the MLflow look-ups it prints (``training.run_summary``) (the whole demo, ``make demo``, is not run in the test suite):
argument building, step running and failure messages, what the console shows of the children's
output (canned logs, no Ray), cutting the request with ffmpeg, and the HTTP client
(:class:`serve.client.VideoClient`) submit / poll / download loop against a fake service on
127.0.0.1, its errors named by the demo's step."""
from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.config import load_platform_config
from demo import as_step, main
from demo_parts.console import Console, IngestOutput, TrainOutput
from demo_parts.plan import DemoPaths, DemoSettings, config_overrides, evaluate_command, serve_command, step_commands
from demo_parts.request import DEMO_SENTENCE, make_request_inputs
from demo_parts.results import (
    VAE_KEY_FILE,
    check_ingest_output,
    drop_ingest_of_another_vae,
    format_metrics,
    remove_stale_inputs,
    video_summary,
)
from demo_parts.runner import StepError, free_port, run_step, stop_process
from pipelines.dataset.manifest import split_for, split_key_of
from pipelines.samples.talking_heads import (
    SENTENCES,
    SPLIT_FOLDERS,
    SPLIT_TEST_FRACTION,
)
from serve.client import JobFailed, RequestRejected, ServiceUnavailable, VideoClient

ROOT = Path(__file__).resolve().parent.parent


def test_overrides_load_and_keep_everything_under_work(tmp_path):
    paths, settings = DemoPaths(tmp_path), DemoSettings(train_steps=7)
    cfg = load_platform_config(None, config_overrides(paths, settings))
    assert cfg.ray.address == "local" and cfg.ray.num_cpus == settings.num_cpus
    assert cfg.weights.preset == "tiny"
    for location in (cfg.weights.tiny_dir, cfg.train.storage_path, cfg.serve.job_dir):
        assert Path(location).is_relative_to(tmp_path)


def test_step_commands_run_the_makefile_clis(tmp_path):
    paths, settings = DemoPaths(tmp_path), DemoSettings(train_steps=7)
    cmds = step_commands(paths, settings, python="/venv/bin/python")
    makefile = (ROOT / "Makefile").read_text()
    assert cmds["samples"][:3] == ["/venv/bin/python", "-m", "pipelines.samples"]
    assert "-m pipelines.samples --output" in makefile
    assert cmds["ingest"][1] == str(ROOT / "pipelines" / "ingest.py") and "pipelines/ingest.py --input" in makefile
    assert cmds["train"][1] == str(ROOT / "train.py") and "train.py --data" in makefile
    ingest, train = cmds["ingest"], cmds["train"]
    assert ingest[ingest.index("--input") + 1] == str(paths.samples)
    assert ingest[ingest.index("--output") + 1] == str(paths.ingested)
    assert train[train.index("--data") + 1] == str(paths.ingested)
    assert train[train.index("--stages") + 1] == "1,2"
    # every trailing key=value is a valid override of the platform config
    for name in ("ingest", "train"):
        overrides = [a for a in cmds[name] if re.fullmatch(r"[a-z0-9_]+\.[a-z0-9_]+=.*", a)]
        cfg = load_platform_config(None, overrides)
        if name == "train":  # stage 2's steps, and stage 1 gets stage1_step_ratio times as many
            assert cfg.train.max_steps == 7 and cfg.train.stage1_max_steps == round(7 * settings.stage1_step_ratio)
            assert cfg.train.mouth_loss_weight == settings.mouth_loss_weight
            assert cfg.model.reference_concat is settings.reference_concat
            # the package's sampler section
            assert (cfg.sampler.reference_init, cfg.sampler.noise_scale, cfg.sampler.ref_ratio) == \
                (settings.reference_init, settings.noise_scale, settings.ref_ratio)
    serve = serve_command(paths, settings, "models:/loopy/3", 8123, python="/venv/bin/python")
    cfg = load_platform_config(None, [a for a in serve if "=" in a])
    assert (cfg.serve.host, cfg.serve.port, cfg.serve.model) == ("127.0.0.1", 8123, "models:/loopy/3")


def test_demo_holds_out_a_test_video_and_fits_the_vae_first(tmp_path):
    """The heldout folder is the test split and the train folder the training split under the
    demo's overrides; the VAE is fitted on the training folder and every step loads it."""
    paths, settings = DemoPaths(tmp_path), DemoSettings(train_steps=7)
    cfg = load_platform_config(None, config_overrides(paths, settings))
    assert cfg.ingest.split_key == "folder" and cfg.ingest.test_fraction == SPLIT_TEST_FRACTION
    test_dir, train_dir = SPLIT_FOLDERS
    for folder, split in ((test_dir, "test"), (train_dir, "train")):
        key = split_key_of(paths.samples / folder / "v.mp4", "id", "folder")
        assert split_for(key, cfg.ingest.test_fraction) == split, folder
    assert cfg.weights.vae == str(paths.fitted_vae)
    cmds = step_commands(paths, settings, python="/venv/bin/python")
    assert list(cmds)[:3] == ["samples", "fit_vae", "ingest"]
    assert "--heldout" in cmds["samples"]
    fit = cmds["fit_vae"]
    assert fit[:3] == ["/venv/bin/python", "-m", "training.fit_vae"]
    assert fit[fit.index("--samples") + 1] == str(paths.train_samples)
    assert fit[fit.index("--out") + 1] == str(paths.fitted_vae)
    assert fit[fit.index("--codec") + 1] == "patch"  # the codec that keeps unseen faces
    ev = evaluate_command(paths, settings, "models:/loopy/3", python="/venv/bin/python")
    assert ev[1] == str(ROOT / "evaluate.py") and ev[ev.index("--split") + 1] == "test"
    ev_cfg = load_platform_config(None, [a for a in ev if re.fullmatch(r"[a-z0-9_]+\.[a-z0-9_]+=.*", a)])
    assert ev_cfg.evaluation.steps == settings.sample_steps
    assert Path(ev_cfg.evaluation.output_dir).is_relative_to(tmp_path)


def test_rerun_drops_stale_samples_and_latents_of_another_vae(tmp_path):
    paths = DemoPaths(tmp_path)
    paths.train_samples.mkdir(parents=True)
    (paths.samples / "old_flat.mp4").write_bytes(b"x")
    (paths.train_samples / "kept.mp4").write_bytes(b"x")
    remove_stale_inputs(paths)
    assert not (paths.samples / "old_flat.mp4").exists() and (paths.train_samples / "kept.mp4").exists()
    paths.fitted_vae.mkdir()
    (paths.fitted_vae / "fit_vae.json").write_text(json.dumps({"key": "fit-a"}))
    assert not drop_ingest_of_another_vae(paths)  # nothing ingested yet
    paths.ingested.mkdir()
    assert drop_ingest_of_another_vae(paths) and not paths.ingested.exists()  # ingest without a key
    paths.ingested.mkdir()
    (paths.ingested / VAE_KEY_FILE).write_text("fit-a")
    assert not drop_ingest_of_another_vae(paths) and paths.ingested.exists()  # same fit: resume
    (paths.fitted_vae / "fit_vae.json").write_text(json.dumps({"key": "fit-b"}))
    assert drop_ingest_of_another_vae(paths) and not paths.ingested.exists()  # refitted: ingest again


def test_demo_sentence_is_never_in_training():
    assert DEMO_SENTENCE not in SENTENCES
    words = lambda t: set(re.findall(r"[a-z]+", t.lower()))  # noqa: E731
    assert all(len(words(DEMO_SENTENCE) & words(t)) <= 4 for t in SENTENCES)  # not a rewording either


def test_metrics_line():
    line = format_metrics({"sync": 0.4123, "sync_control": -0.05, "psnr": 21.3, "face_found_ratio": 1.0, "x": 3})
    assert line == "face_found_ratio 1.000, sync 0.412, sync_control -0.050, psnr 21.30 dB"
    assert format_metrics({}) == "no metrics"


def test_run_step_logs_output_and_names_the_failing_step(tmp_path, capsys):
    ok_log = tmp_path / "ok.log"
    run_step("hello", [sys.executable, "-c", "print('line one'); print('line two')"], ok_log, 30)
    assert ok_log.read_text().splitlines()[1:] == ["line one", "line two"]  # after the command line
    assert "line two" not in capsys.readouterr().out  # the child's output stays in its log
    with pytest.raises(StepError) as info:
        run_step("ingest", [sys.executable, "-c", "import sys; print('bad video x.mp4'); sys.exit(3)"],
                 tmp_path / "bad.log", 30)
    message = str(info.value)
    assert info.value.step == "ingest"
    assert "demo failed at step 'ingest'" in message and "exit status 3" in message and "bad video x.mp4" in message
    with pytest.raises(StepError, match="step 'train'.*cannot start"):
        run_step("train", [str(tmp_path / "no-such-program")], tmp_path / "missing.log", 30)


def test_run_step_timeout_stops_the_child(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(StepError, match="no result after 1 s"):
        run_step("slow", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "slow.log", 1)
    assert time.monotonic() - t0 < 30


def test_stop_process_ends_a_server_child():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    stop_process(proc, grace_s=5)
    assert proc.poll() is not None


# --- the console: canned child output (excerpts of a real run's work/logs/*.log), no Ray -------------

ESC = "\x1b"
RAY_NOISE = [  # what the children print besides their own lines; none of it may reach the console
    "2026-12-01 09:22:09,360\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for "
    "this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    "2026-12-01 09:22:15,017\tINFO worker.py:2038 -- Started a local Ray instance.",
    f"{ESC}[36m(PlacementGroupCleaner pid=15100){ESC}[0m Failed to query Ray Train Controller actor state. "
    "State API may be temporarily unavailable. Continuing to monitor.",
    f"{ESC}[36m(RayTrainWorker pid=15147){ESC}[0m /work/main/.venv/lib/python3.11/site-packages/ray/data/"
    "iterator.py:577: RayDeprecationWarning: Passing a function to `iter_torch_batches(collate_fn)` is deprecated",
    f"{ESC}[36m(SplitCoordinator pid=15482){ESC}[0m Progress bars disabled. To enable, set "
    "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "Downloading artifacts:  62%|██████▎   | 5/8 [00:00<00:00, 11329.83it/s]",
    "Downloading artifacts: 100%|██████████| 8/8 [00:00<00:00, 6467.70it/s]",
    f"{ESC}[36m(PlacementGroupCleaner pid=16147){ESC}[0m Traceback (most recent call last):",
    "ConnectionError: Found multiple active Ray instances: {'192.0.2.2:41647', '192.0.2.2:41329'}.",
]
NOISE_MARKERS = ("WARNING", "INFO", "Failed to query", "Deprecat", "Downloading artifacts", "Traceback",
                 "pid=", "Ray instance", "Progress bars disabled", ESC)


def ingest_lines(total: int = 7, rejected_at: int = 3) -> list[str]:
    lines = [RAY_NOISE[0], RAY_NOISE[1], f"[ingest] {total} videos to process -> /w/ingested", RAY_NOISE[4]]
    rejected = 0
    for k in range(1, total + 1):
        if k == rejected_at:
            rejected += 1
            lines.append(f"[ingest] {k}/{total} done ({rejected} rejected): /w/samples/v{k}.mp4: rejected "
                         f"(probe: no audio stream)")
        else:
            lines.append(f"[ingest] {k}/{total} done ({rejected} rejected): /w/samples/v{k}.mp4: ok, 175 frames")
        lines.append(RAY_NOISE[5])
    lines += [f"[ingest] finished in 60.4s: {total - rejected} ok, {rejected} rejected, 0 skipped (already "
              f"done), 1050 frames -> /w/ingested",
              f"[ingest]   rejected /w/samples/v{rejected_at}.mp4: probe: no audio stream",
              '{"output_dir": "/w/ingested", "inputs": 7, "ok": 6, "rejected": 1}']
    return lines


def report_line(pid: int, step: int, loss: float, rank: int, stage: int, last: bool, repeated: bool = False) -> str:
    checkpoint = (f"Checkpoint(filesystem=local, path=/w/ray_results/loopy-1/stage{stage}/checkpoint_2026-12-01_"
                  f"09-24-28.424090)" if last else "None")
    tail = f"{ESC}[32m [repeated 5x across cluster] (Ray deduplicates logs by default.){ESC}[0m" if repeated else ""
    return (f"{ESC}[36m(RayTrainWorker pid={pid}){ESC}[0m Reporting training result {step}: TrainingReport("
            f"checkpoint={checkpoint}, metrics={{'step': {step}, 'epoch': 0, 'loss': {loss}, 'lr': 4e-05, "
            f"'grad_norm': 2.5, 'samples_per_s': 10.0, 'step_time_s': 0.39}}, validation=False) from rank {rank}{tail}")


def progress_line(pid: int, stage: int, step: int, total: int, loss: float) -> str:
    """The line rank 0 of a training job prints per logged step (``training/loop.py``), as Ray
    forwards it from the worker."""
    return f"{ESC}[36m(RayTrainWorker pid={pid}){ESC}[0m [train] stage {stage} step {step}/{total} loss {loss:.6f}"


def train_lines(steps: int = 20) -> list[str]:
    """Two stages of ``steps`` steps as a training job's output shows them: rank 0's progress line
    per step among Ray's own output (two workers, new processes per stage, Ray Train's report
    lines, the second worker's copy of stage 1's last report arriving after stage 2 began)."""
    lines = list(RAY_NOISE)
    late = ""
    for stage, pids, first_loss in ((1, (15147, 15167), 1.1), (2, (16213, 16178), 0.3)):
        def loss(s: int, first_loss: float = first_loss) -> float:
            return round(first_loss * (1 - 0.5 * s / steps), 4)

        for s in range(1, steps + 1):
            lines.append(progress_line(pids[0], stage, s, steps, loss(s)))
            if s == 1 or s % 3 == 0 or s == steps:
                lines.append(report_line(pids[s % 2], s, loss(s), s % 2, stage, s == steps, repeated=1 < s < steps))
                if stage == 2 and s == 1:
                    lines.append(late)  # stage 1's other worker, late
            lines.append(RAY_NOISE[2])
        if stage == 1:
            late = report_line(pids[1], steps, loss(steps), 1, stage, True)
            lines += RAY_NOISE[5:7]
    lines += ["stage 1: models:/loopy/1  (package /w/stage1_package, MLflow run abc)",
              "stage 2: models:/loopy/2  (package /w/stage2_package, MLflow run def)"]
    return lines


def assert_clean(console_text: str) -> None:
    for marker in NOISE_MARKERS:
        assert marker not in console_text, f"{marker!r} reached the console:\n{console_text}"
    for noise in RAY_NOISE:
        assert noise not in console_text


def test_console_shows_progress_and_losses_but_no_ray_output():
    out = io.StringIO()
    console = Console(out, tty=False)
    ingest = IngestOutput(console)
    for line in ingest_lines():
        ingest.feed(line + "\n")
    ingest.close()
    train = TrainOutput(console, stages=(1, 2), steps=20)
    train.start()
    for line in train_lines(20):
        train.feed(line + "\n")
    train.close()
    text = out.getvalue()
    assert_clean(text)
    assert "\r" not in text  # not a terminal: plain lines, no carriage-return redraws
    lines = text.splitlines()
    assert all(line.startswith("[demo] ") for line in lines)
    ingest_progress = [line for line in lines if re.match(r"\[demo\]   ingest: \d+/7 videos", line)]
    assert ingest_progress[-1] == "[demo]   ingest: 7/7 videos (100%), 1 rejected"
    assert "[demo]   ingest: rejected /w/samples/v3.mp4: probe: no audio stream" in lines
    # one plain line per 10% at most, for each stage's bar
    for stage in (1, 2):
        shown = [line for line in lines if line.startswith(f"[demo]   train stage {stage}/2: ")]
        assert 3 <= len(shown) <= 10 and shown[-1].startswith(f"[demo]   train stage {stage}/2: 20/20 steps (100%)")
    summaries = [line for line in lines if re.match(r"\[demo\] train stage \d/2: 20/20 steps in \d+ s", line)]
    assert len(summaries) == 2, text
    assert summaries[0].endswith("loss 1.0725 (step 1) -> 0.5500 (step 20)")
    assert summaries[1].endswith("loss 0.2925 (step 1) -> 0.1500 (step 20)")
    assert train.lines == [s[len("[demo] "):] for s in summaries]


def test_console_bar_on_a_terminal_is_one_updating_line():
    out = io.StringIO()
    console = Console(out, tty=True)
    train = TrainOutput(console, stages=(1, 2), steps=20)
    train.start()
    for line in train_lines(20):
        train.feed(line)
    train.close()
    text = out.getvalue()
    assert_clean(text.replace(f"{ESC}[A", ""))  # tqdm's own cursor moves are not child output
    assert "\r" in text and "train stage 2/2: 20/20 steps" in text
    finished = [line for line in re.split(r"[\r\n]", text) if " steps in " in line]
    assert len(finished) == 2 and all("loss" in line for line in finished)


def test_run_step_keeps_child_output_in_the_log_and_off_the_console(tmp_path, capsys):
    canned = tmp_path / "child_output.txt"
    canned.write_text("\n".join(ingest_lines() + RAY_NOISE) + "\n")
    log = tmp_path / "logs" / "ingest.log"
    script = f"import sys; sys.stdout.write(open({str(canned)!r}).read())"
    run_step("ingest", [sys.executable, "-c", script], log, 30, output=IngestOutput(Console()))
    console = capsys.readouterr()
    assert_clean(console.out + console.err)
    assert "[demo]   ingest: 7/7 videos (100%), 1 rejected" in console.out
    logged = log.read_text()
    assert all(noise in logged for noise in RAY_NOISE)  # the full child output stays in the log
    # a failure still names the step and shows the log's tail (colour codes removed)
    script_fail = script + "; sys.exit(4)"
    with pytest.raises(StepError) as info:
        run_step("train", [sys.executable, "-c", script_fail], tmp_path / "logs" / "train.log", 30,
                 output=TrainOutput(Console()))
    message = str(info.value)
    assert message.startswith("demo failed at step 'train': exit status 4; last lines:")
    assert "Found multiple active Ray instances" in message and ESC not in message
    assert message.endswith(f"(log: {tmp_path / 'logs' / 'train.log'})")


def test_only_the_jobs_progress_line_moves_the_training_bar():
    """Ray Train's own report lines (their format changes between Ray versions) are never read."""
    out = io.StringIO()
    train = TrainOutput(Console(out, tty=False), stages=(1, 2), steps=4)
    train.start()
    for step in range(1, 5):
        train.feed(report_line(7, step, 9.9, 0, 1, step == 4))
    assert train.lines == [] and train.progress[1].step == 0
    for stage in (1, 2):
        for step in range(1, 5):
            train.feed(progress_line(7, stage, step, 4, 1.0 / step))
    train.close()
    assert train.lines[0].endswith("loss 1.0000 (step 1) -> 0.2500 (step 4)")
    assert train.lines[1].startswith("train stage 2/2: 4/4 steps")
    assert_clean(out.getvalue())


def test_demo_help_runs_as_a_script_and_main_returns_codes(capsys):
    result = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--help"], capture_output=True, text=True,
                            cwd="/", timeout=60)
    assert result.returncode == 0 and "--train-steps" in result.stdout and "--work" in result.stdout
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0


def test_main_names_the_failing_step_and_returns_its_codes(tmp_path, monkeypatch, capsys):
    """A step that fails: one console line before it, its output only in its log, ``demo failed at
    step '<step>'`` with the log's tail on stderr, exit 1; a run that ends: ``video: PATH`` last,
    exit 0; Ctrl-C: 130; without ffmpeg: exit 2 before any step."""
    import demo

    fail = [sys.executable, "-c", "print('samples went wrong'); raise SystemExit(3)"]
    monkeypatch.setattr(demo, "step_commands", lambda paths, settings: {"samples": fail})
    assert main(["--work", str(tmp_path / "w")]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"[demo] working in {tmp_path / 'w'}; the full output of each step goes to "
                                f"{tmp_path / 'w' / 'logs'}/<step>.log"]
    assert err.startswith("demo failed at step 'samples': exit status 3; last lines:")
    assert "samples went wrong" in err and err.rstrip().endswith(f"(log: {tmp_path / 'w' / 'logs' / 'samples.log'})")
    assert "samples went wrong" in (tmp_path / "w" / "logs" / "samples.log").read_text()
    video = tmp_path / "w" / "demo_video.mp4"
    monkeypatch.setattr(demo, "run_demo", lambda work, settings: video)
    assert main(["--work", str(tmp_path / "w")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"video: {video}"  # the last line, exactly

    def interrupted(work, settings):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    assert main(["--work", str(tmp_path / "w")]) == 130
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    assert main(["--work", str(tmp_path / "w2")]) == 2
    assert "demo failed at step 'setup': ffmpeg not found" in capsys.readouterr().err
    assert not (tmp_path / "w2").exists()


def test_request_inputs_cut_from_a_video(tmp_path):
    video = tmp_path / "talk.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=25:duration=2",
                    "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=2",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(video)], check=True)
    image, audio = make_request_inputs(video, tmp_path / "req", audio_seconds=1.0)
    from PIL import Image

    with Image.open(image) as img:
        assert img.size == (64, 64)
    import soundfile

    info = soundfile.info(str(audio))
    assert info.samplerate == 16000 and info.channels == 1
    assert abs(info.duration - 1.0) < 0.05
    assert video_summary(video).startswith("50 frames, 64x64")
    with pytest.raises(StepError, match="step 'generate'"):
        make_request_inputs(tmp_path / "missing.mp4", tmp_path / "req2", 1.0)
    if shutil.which("espeak-ng"):  # the demo's request: the portrait and a new sentence, spoken
        import numpy as np

        image, audio = make_request_inputs(video, tmp_path / "req3", audio_seconds=2.0, sentence=DEMO_SENTENCE)
        samples, rate = soundfile.read(str(audio))
        assert rate == 16000 and samples.ndim == 1 and abs(len(samples) / rate - 2.0) < 0.05
        assert np.abs(samples).max() > 0.05 and image.is_file()  # speech, not the test tone's copy


class FakeService(BaseHTTPRequestHandler):
    """The video API: a job goes queued -> running -> (done | failed) over successive polls."""

    jobs: dict = {}
    uploads: list = []
    auth: list = []
    fail = False
    full = False

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).auth.append(self.headers.get("Authorization"))
        if self.path != "/v1/videos":
            return self._json(404, {"error": "not found"})
        type(self).uploads.append(body)
        if self.full:
            self.send_response(429)
            data = json.dumps({"field": "queue", "error": "queue: full"}).encode()
            self.send_header("Retry-After", "7")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        job_id = f"job{len(self.jobs)}"
        self.jobs[job_id] = 0
        return self._json(202, {"id": job_id, "state": "queued"})

    def do_GET(self):
        if self.path == "/healthz":
            return self._json(200, {"ok": True})
        match = re.fullmatch(r"/v1/videos/(\w+)(/file)?", self.path)
        if not match or match.group(1) not in self.jobs:
            return self._json(404, {"error": "no such job"})
        job_id = match.group(1)
        if match.group(2):
            data = b"\x00\x00\x00\x18ftypmp42fake"
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.jobs[job_id] += 1
        polls = self.jobs[job_id]
        if polls < 3:
            return self._json(200, {"id": job_id, "state": "queued" if polls == 1 else "running",
                                    "clips_done": polls - 1, "clips_total": 2})
        if self.fail:
            return self._json(200, {"id": job_id, "state": "failed", "error": "sampler out of memory"})
        return self._json(200, {"id": job_id, "state": "done", "clips_done": 2, "clips_total": 2})


@pytest.fixture()
def fake_service():
    handler = type("Handler", (FakeService,), {"jobs": {}, "uploads": [], "auth": [], "fail": False, "full": False})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_client_submits_polls_and_downloads(fake_service, tmp_path):
    handler, url = fake_service
    image, audio = tmp_path / "p.png", tmp_path / "a.wav"
    image.write_bytes(b"PNGDATA")
    audio.write_bytes(b"WAVDATA")
    client = VideoClient(url)
    try:
        assert client.wait_healthy(5) == {"ok": True}
        job_id = client.submit(image, audio, {"steps": 4})
        assert b"PNGDATA" in handler.uploads[0] and b"WAVDATA" in handler.uploads[0]
        assert b'name="steps"' in handler.uploads[0]
        seen = []
        status = client.wait(job_id, timeout_s=10, poll_s=0.01, on_update=lambda s: seen.append(s["state"]))
        assert status["state"] == "done" and seen == ["queued", "running", "done"]
        out = client.download(job_id, tmp_path / "out" / "v.mp4")
        assert out.read_bytes().startswith(b"\x00\x00\x00\x18ftyp")
        with pytest.raises(StepError, match="step 'generate'.*404"), as_step("generate"):
            client.wait("nosuchjob", timeout_s=1, poll_s=0.01)
        with pytest.raises(RequestRejected) as info:
            client.download("nosuchjob", tmp_path / "none.mp4")
        assert info.value.status == 404 and "no such job" in str(info.value)
    finally:
        client.close()


def test_client_reports_a_failed_job_and_a_dead_service(fake_service, tmp_path):
    handler, url = fake_service
    handler.fail = True
    (tmp_path / "p.png").write_bytes(b"x")
    (tmp_path / "a.wav").write_bytes(b"y")
    client = VideoClient(url)
    try:
        job_id = client.submit(tmp_path / "p.png", tmp_path / "a.wav")
        with pytest.raises(StepError, match="failed: sampler out of memory"), as_step("generate"):
            client.wait(job_id, timeout_s=10, poll_s=0.01)
        with pytest.raises(JobFailed) as info:
            client.wait(client.submit(b"x", b"y"), timeout_s=10, poll_s=0.01)
        assert info.value.status["error"] == "sampler out of memory"
    finally:
        client.close()
    with VideoClient(f"http://127.0.0.1:{free_port()}") as dead:  # nothing listens there
        assert not dead.is_healthy()
        with pytest.raises(StepError, match="step 'serve'.*exited"), as_step("serve"):
            dead.wait_healthy(5, alive=lambda: False, poll_s=0.01)
        with pytest.raises(StepError, match="within 0 s"), as_step("serve"):
            dead.wait_healthy(0.2, poll_s=0.05)
        with pytest.raises(ServiceUnavailable, match="ConnectError"):
            dead.health()


def test_client_sends_the_bearer_token(fake_service, tmp_path):
    handler, url = fake_service
    with VideoClient(url, token="s3cret") as client:
        client.submit(b"img", b"snd")
    assert handler.auth[-1] == "Bearer s3cret"
    with VideoClient(url) as client:
        client.submit(b"img", b"snd")
        assert handler.auth[-1] is None
        handler.full = True
        with pytest.raises(RequestRejected) as info:
            client.submit(b"img", b"snd")
    assert (info.value.status, info.value.field, info.value.retry_after_s) == (429, "queue", 7.0)
    assert "POST /v1/videos answered 429" in str(info.value)


def test_ingest_check_needs_one_ok_video_and_lists_rejects(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pytest.raises(StepError, match="step 'ingest'.*no manifest"):
        check_ingest_output(tmp_path)
    rows = {"source": ["a.mp4", "b.mp4"], "status": ["rejected", "rejected"],
            "reason": ["face: no face in 80% of frames", "probe: no audio stream"], "num_frames": [0, 0]}
    pq.write_table(pa.table(rows), tmp_path / "videos.parquet")
    with pytest.raises(StepError, match=r"no video was ingested \(2 rejected\)(.|\n)*b.mp4: probe: no audio stream"):
        check_ingest_output(tmp_path)
    rows["status"][0], rows["reason"][0], rows["num_frames"][0] = "ok", None, 150
    pq.write_table(pa.table(rows), tmp_path / "videos.parquet")
    assert check_ingest_output(tmp_path) == "1 videos ingested (150 frames at 25 fps), 1 rejected"


@pytest.mark.slow  # creating an MLflow sqlite store runs its schema migrations (seconds)
def test_register_step_reads_losses_and_the_stage2_version(tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from training.run_summary import NotRegisteredError, loss_summaries, registered_model_uri

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("demo", artifact_location=(tmp_path / "artifacts").as_uri())
    before_ms = int(time.time() * 1000) - 1
    run = client.create_run(exp, run_name="job-stage1")
    for step, loss in enumerate([1.0, 0.9, 0.5, 0.3]):
        client.log_metric(run.info.run_id, "loss", loss, step=step)
    client.log_metric(run.info.run_id, "val_loss", 0.35, step=3)
    client.create_run(exp, run_name="job-parent")  # no loss: no line
    (line,) = loss_summaries(uri, "demo", before_ms)
    assert line.startswith("job-stage1: training loss 1.0000 (first 1 steps) -> 0.3000 (last 1 steps) over 4 steps")
    assert line.endswith("val_loss 0.3500")
    assert loss_summaries(uri, "demo", int(time.time() * 1000) + 60_000) == []
    with pytest.raises(NotRegisteredError, match="no stage-2 version of registered model 'loopy'"):
        registered_model_uri(uri, "loopy", 2, before_ms)
    client.create_registered_model("loopy")
    version = client.create_model_version("loopy", str(tmp_path / "pkg"), run_id=run.info.run_id)
    client.set_registered_model_alias("loopy", "stage2", version.version)
    assert registered_model_uri(uri, "loopy", 2, before_ms) == f"models:/loopy/{version.version}"
    with pytest.raises(NotRegisteredError, match="predates this run"):
        registered_model_uri(uri, "loopy", 2, int(time.time() * 1000) + 60_000)
    mlflow.set_tracking_uri(None)
