"""The demo's orchestration helpers (the whole demo, ``make demo``, is not run in the test suite):
argument building, step running and failure messages, cutting the request with ffmpeg, and the
HTTP client's submit / poll / download loop against a fake service on 127.0.0.1."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.config import load_platform_config
from demo import (DemoPaths, DemoSettings, StepError, VideoClient, config_overrides,
                       make_request_inputs, run_step, serve_command, step_commands, stop_process,
                       video_summary)

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
    assert cmds["samples"][:3] == ["/venv/bin/python", "-m", "pipelines.sample_data"]
    assert "-m pipelines.sample_data --output" in makefile
    assert cmds["ingest"][1] == str(ROOT / "pipelines" / "ingest.py") and "pipelines/ingest.py --input" in makefile
    assert cmds["train"][1] == str(ROOT / "train.py") and "train.py --data" in makefile
    ingest, train = cmds["ingest"], cmds["train"]
    assert ingest[ingest.index("--input") + 1] == str(paths.samples)
    assert ingest[ingest.index("--output") + 1] == str(paths.ingested)
    assert train[train.index("--data") + 1] == str(paths.ingested)
    assert train[train.index("--stages") + 1] == "1,2"
    # every trailing key=value is a valid override of the platform config
    for name in ("ingest", "train"):
        overrides = [a for a in cmds[name] if re.fullmatch(r"[a-z_]+\.[a-z_]+=.*", a)]
        cfg = load_platform_config(None, overrides)
        if name == "train":
            assert cfg.train.max_steps == 7
    serve = serve_command(paths, settings, "models:/loopy/3", 8123, python="/venv/bin/python")
    cfg = load_platform_config(None, [a for a in serve if "=" in a])
    assert (cfg.serve.host, cfg.serve.port, cfg.serve.model) == ("127.0.0.1", 8123, "models:/loopy/3")


def test_run_step_logs_output_and_names_the_failing_step(tmp_path, capsys):
    ok_log = tmp_path / "ok.log"
    run_step("hello", [sys.executable, "-c", "print('line one'); print('line two')"], ok_log, 30)
    assert ok_log.read_text().splitlines() == ["line one", "line two"]
    assert "hello| line two" in capsys.readouterr().out
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


class FakeService(BaseHTTPRequestHandler):
    """The video API: a job goes queued -> running -> (done | failed) over successive polls."""

    jobs: dict = {}
    uploads: list = []
    fail = False

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
        if self.path != "/v1/videos":
            return self._json(404, {"error": "not found"})
        type(self).uploads.append(body)
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
    handler = type("Handler", (FakeService,), {"jobs": {}, "uploads": [], "fail": False})
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
        client.wait_healthy(5)
        job_id = client.submit(image, audio, {"steps": 4})
        assert b"PNGDATA" in handler.uploads[0] and b"WAVDATA" in handler.uploads[0]
        assert b'name="steps"' in handler.uploads[0]
        seen = []
        status = client.wait(job_id, timeout_s=10, poll_s=0.01, on_update=lambda s: seen.append(s["state"]))
        assert status["state"] == "done" and seen == ["queued", "running", "done"]
        out = client.download(job_id, tmp_path / "out" / "v.mp4")
        assert out.read_bytes().startswith(b"\x00\x00\x00\x18ftyp")
        with pytest.raises(StepError, match="step 'generate'.*404"):
            client.wait("nosuchjob", timeout_s=1, poll_s=0.01)
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
        with pytest.raises(StepError, match="failed: sampler out of memory"):
            client.wait(job_id, timeout_s=10, poll_s=0.01)
    finally:
        client.close()
    dead = VideoClient(f"http://127.0.0.1:{_closed_port()}")
    try:
        with pytest.raises(StepError, match="step 'serve'.*exited"):
            dead.wait_healthy(5, alive=lambda: False, poll_s=0.01)
        with pytest.raises(StepError, match="within 0 s"):
            dead.wait_healthy(0.2, poll_s=0.05)
    finally:
        dead.close()


def _closed_port() -> int:
    from demo import free_port

    return free_port()


def test_ingest_check_needs_one_ok_video_and_lists_rejects(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from demo import check_ingest_output

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

    from demo import loss_summaries, stage2_model_uri

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
    with pytest.raises(StepError, match="step 'register'.*no stage-2 version"):
        stage2_model_uri(uri, "loopy", before_ms)
    client.create_registered_model("loopy")
    version = client.create_model_version("loopy", str(tmp_path / "pkg"), run_id=run.info.run_id)
    client.set_registered_model_alias("loopy", "stage2", version.version)
    assert stage2_model_uri(uri, "loopy", before_ms) == f"models:/loopy/{version.version}"
    with pytest.raises(StepError, match="predates this run"):
        stage2_model_uri(uri, "loopy", int(time.time() * 1000) + 60_000)
    mlflow.set_tracking_uri(None)
