"""The Ray Serve service end to end over HTTP (tiny untrained model): jobs, every bad request,
per-client tokens, job ownership, deletion, the Origin check, and a hostile polyglot upload."""
from __future__ import annotations

import dataclasses
import errno
import io
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from core.sections import SamplerConfig
from serve.client import RequestRejected, VideoClient
from serve.errors import UploadError
from serve.jobs import JobStore, QueueFullError, parse_job_id
from serve.validation import decode_audio_upload, parse_options

TOKEN = "alice-token-0123456789"
OTHER_TOKEN = "bob-token-9876543210xx"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OTHER = {"Authorization": f"Bearer {OTHER_TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def portrait_bytes(fmt: str = "PNG") -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()[20:280, 80:380]).save(buf, format=fmt)
    return buf.getvalue()


def noise_png(size: int = 200) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def sox_audio(path: Path, seconds: float, silent: bool = False) -> bytes:
    effect = ["trim", "0", f"{seconds}"] if silent else ["synth", f"{seconds}", "sine", "200-700", "tremolo", "5", "80"]
    cmd = ["sox", "-n", "-r", "22050", "-c", "1", str(path)] + (["synth", f"{seconds}", "sine", "0"] if silent else effect)
    subprocess.run(cmd, check=True)
    return path.read_bytes()


def mp3_tone(path: Path, freq: float, seconds: float) -> bytes:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", f"sine=f={freq}:d={seconds}",
                    "-ar", "22050", str(path)], check=True)
    return path.read_bytes()


def playlist(target: Path) -> bytes:
    """An HLS playlist naming the local file ``target`` (what a hostile upload would glue on)."""
    return (f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:10.0,\nfile://{target}\n"
            "#EXT-X-ENDLIST\n").encode()


class FifoWatch:
    """A FIFO that records whether anything opened it for reading (polled: opening its write end
    without blocking succeeds only while a reader has it open)."""

    def __init__(self, path: Path):
        self.path = path
        os.mkfifo(path)
        self.opened = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                assert exc.errno == errno.ENXIO, exc
            else:
                self.opened = True
                os.write(fd, b"\0" * 1024)
                os.close(fd)
            time.sleep(0.005)

    def __enter__(self) -> "FifoWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {
        "image": portrait_bytes("JPEG"),
        "audio": sox_audio(d / "speech.wav", 1.0),
        "silent": sox_audio(d / "silent.wav", 1.0, silent=True),
        "long": sox_audio(d / "long.wav", 4.0),
        "noface": noise_png(),
        "mp3": mp3_tone(d / "speech.mp3", 300.0, 1.0),
        "dir": d,
    }


@pytest.fixture(scope="module")
def service(ray_local, tiny_package, tiny_weights, tmp_path_factory):
    """The service on 127.0.0.1 at a free port (:func:`serve.app.start_service`): two clients
    (alice, bob) from a tokens file, queue bound 2, 1 MB uploads, 3 s audio, 1000 frames x steps.
    Yields the raw ``httpx.Client`` of a :class:`VideoClient` without token (the tests send their
    own headers) and the job folder."""
    from core.config import load_platform_config
    from serve.app import start_service

    port = free_port()
    job_dir = tmp_path_factory.mktemp("serve_jobs")
    tokens = tmp_path_factory.mktemp("secrets") / "tokens"
    tokens.write_text(f"# client tokens\nalice {TOKEN}\nbob {OTHER_TOKEN}  # the second client\n")
    cfg = load_platform_config(None, [
        f"serve.model={tiny_package}", f"serve.job_dir={job_dir}", "serve.max_queue=2", "serve.max_upload_mb=1",
        "serve.max_audio_s=3", f"serve.tokens_file={tokens}", "serve.cpus_per_replica=0", f"serve.port={port}",
        "serve.max_frame_steps=1000", "sampler.steps=2", f"weights.tiny_dir={tiny_weights[0].tiny_dir}",
    ])
    service = start_service(cfg, name="loopy_test")  # Serve's proxy behind the front listener
    api = VideoClient(f"http://127.0.0.1:{port}")  # no token: the tests send their own headers
    api.wait_healthy(120)
    yield api.http, job_dir
    api.close()
    service.stop()


def post(client, image: bytes, audio: bytes, headers=AUTH, **options):
    files = {"image": ("p.img", image, "application/octet-stream"), "audio": ("a.snd", audio, "application/octet-stream")}
    return client.post("/v1/videos", files=files, data={k: str(v) for k, v in options.items()}, headers=headers)


def wait_done(client, job_id: str, timeout_s: float = 120.0, token: str = TOKEN) -> dict:
    """Poll the job (``VideoClient.wait``) until done; its status with ``history``: every status polled."""
    seen: list[dict] = []
    with VideoClient(str(client.base_url), token=token) as api:
        body = api.wait(job_id, timeout_s, poll_s=0.2, on_update=seen.append)
    body["history"] = seen
    return body


def assert_no_server_details(text: str, job_dir: Path) -> None:
    for word in (str(job_dir), "/tmp", "Traceback", "File \"", "ffmpeg", ".py"):
        assert word not in text, (word, text)


# --- unit: job store and options -----------------------------------------------------------------------

def test_job_store_bounds_ids_owners_and_files(tmp_path):
    store = JobStore(tmp_path, max_pending=2, ttl_s=10)
    a = store.create("alice", {"steps": 2})
    b = store.create("bob", {})
    with pytest.raises(QueueFullError) as err:
        store.create("alice", {})
    assert err.value.retry_after_s >= 1
    assert parse_job_id(a.id) == a.id and a.folder.parent == tmp_path
    assert store.get("../../etc/passwd") is None and store.get(a.id.upper()).id == a.id
    assert store.get(a.id, owner="alice") is not None and store.get(a.id, owner="bob") is None
    for job in (a, b):
        job.file("image").write_bytes(b"png")
        job.file("audio").write_bytes(b"wav")
        store.mark_queued(job.id)
    assert store.queue_position(b.id) == 1
    assert store.start(a.id, time.time() + 60)
    store.progress(a.id, 1, 3, 30)
    assert store.get(a.id).progress == pytest.approx(1 / 3)
    a.file("video").write_bytes(b"x")
    assert store.finish(a.id)
    assert sorted(p.name for p in a.folder.iterdir()) == ["result.mp4"]  # inputs go when a job ends
    assert store.pending() == 1
    store.create("alice", {})  # a slot came free
    assert store.sweep(now=time.time() + 100) == 1 and not a.folder.exists()


def test_job_store_caps_disk_bytes(tmp_path):
    from serve.jobs import DiskFullError

    store = JobStore(tmp_path, max_pending=5, max_disk_bytes=1000)
    store.create("alice", {}, reserve_bytes=600)
    with pytest.raises(DiskFullError):
        store.create("alice", {}, reserve_bytes=600)


def test_options_unknown_and_out_of_range_name_the_field():
    base = SamplerConfig()
    assert parse_options({"steps": "3", "seed": "7", "audio_ratio": "4.5"}, base) == dataclasses.replace(
        base, steps=3, seed=7, audio_ratio=4.5)
    assert parse_options({"reference_init": "0.5"}, base).reference_init == 0.5
    assert parse_options({"noise_scale": "0.1"}, base).noise_scale == 0.1
    for raw, field in (({"stepz": "3"}, "stepz"), ({"steps": "0"}, "steps"), ({"steps": "abc"}, "steps"),
                       ({"ref_ratio": "nan"}, "ref_ratio"), ({"size": "63"}, "size"), ({"fps": "1000"}, "fps"),
                       ({"reference_init": "1.5"}, "reference_init"), ({"noise_scale": "2"}, "noise_scale")):
        with pytest.raises(UploadError) as err:
            parse_options(raw, base)
        assert err.value.status == 422 and err.value.field == field


def test_run_within_keeps_a_cancellation_that_lands_after_the_job_ended():
    """A drain cancels the dispatcher as soon as it sees the running job recorded done, which can be
    in the few event-loop steps before the dispatcher resumes. ``asyncio.wait_for`` (Python < 3.12)
    returns the job's result then and drops the cancellation: the dispatcher went back to its queue
    and the drain waited for it forever (test_serve_drain, flaky). ``run_within`` keeps it, and
    still times out and stops the work like ``wait_for``."""
    import asyncio

    from serve.app import run_within

    async def dispatcher_cancelled_just_after_its_job() -> bool:
        me = None

        async def job():
            asyncio.get_running_loop().call_soon(me.cancel)  # runs once job() has returned
            return "done"

        async def dispatcher():
            assert await run_within(job(), 60) == "done"
            await asyncio.Event().wait()  # back at the queue: only a cancellation ends it

        me = asyncio.ensure_future(dispatcher())
        await asyncio.wait({me}, timeout=2)
        lost = not me.done()
        me.cancel()
        return not lost and me.cancelled()

    async def slow_work_times_out_and_stops() -> bool:
        stopped = asyncio.Event()

        async def work():
            try:
                await asyncio.sleep(60)
            finally:
                stopped.set()

        try:
            await run_within(work(), 0.05)
        except asyncio.TimeoutError:
            return stopped.is_set()  # stopped before run_within raised
        return False

    assert asyncio.run(dispatcher_cancelled_just_after_its_job())
    assert asyncio.run(slow_work_times_out_and_stops())


# --- end to end over HTTP -----------------------------------------------------------------------------

def test_submit_poll_download_valid_mp4_with_audio(service, media, tmp_path):
    client, job_dir = service
    assert client.get("/healthz").json()["status"] == "ok"
    resp = post(client, media["image"], media["audio"], steps=2, seed=3)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    assert parse_job_id(job_id) == job_id
    done = wait_done(client, job_id)
    assert done["state"] == "done", done
    assert done["clips_total"] == 3 and done["num_frames"] == 25  # 1 s of audio at 25 fps, 12-frame clips
    assert done["model_version"]
    progress = [h["progress"] for h in done["history"]]
    assert progress == sorted(progress)
    video = client.get(f"/v1/videos/{job_id}/file", headers=AUTH)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    out = tmp_path / "result.mp4"
    out.write_bytes(video.content)
    probe = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                            "stream=codec_type,nb_read_frames", "-of", "csv=p=0", str(out)],
                           capture_output=True, text=True, check=True).stdout.split()
    assert "video,25" in probe and any(line.startswith("audio") for line in probe)
    # the inputs were deleted when the job ended; the result lives only in the job's folder
    assert sorted(p.name for p in (job_dir / job_id).iterdir()) == ["result.mp4"]


def test_bad_requests_name_the_field_and_leak_nothing(service, media):
    client, job_dir = service
    too_big = post(client, media["image"] + b"\0" * (1024 * 1024 + 10), media["audio"])
    assert too_big.status_code == 413 and too_big.json()["field"] == "image"
    cases = [
        (b"this is not an image", media["audio"], {}, "image", "not a decodable"),
        (b"GIF89a" + b"\0" * 64, media["audio"], {}, "image", "not a decodable"),
        (media["noface"], media["audio"], {}, "image", "no face"),
        (media["image"], b"RIFF....not audio at all", {}, "audio", "not decodable audio"),
        (media["image"], media["silent"], {}, "audio", "silent"),
        (media["image"], media["long"], {}, "audio", "longer than"),
        (media["image"], media["audio"], {"colour": "blue"}, "colour", "unknown option"),
        (media["image"], media["audio"], {"steps": "500"}, "steps", "outside the allowed range"),
        (media["image"], media["audio"], {"steps": "100"}, "steps", "frames x 100 steps"),  # 25 x 100 > 1000
    ]
    for image, audio, options, field, words in cases:
        resp = post(client, image, audio, **options)
        assert resp.status_code == 422, (field, resp.text)
        body = resp.json()
        assert body["field"] == field and words in body["error"], body
        assert_no_server_details(resp.text, job_dir)
    missing = client.post("/v1/videos", files={"image": ("p", media["image"])}, headers=AUTH)
    assert missing.status_code == 422 and missing.json()["field"] == "audio"
    unknown = client.get("/v1/videos/0b9a3f5e-1f7e-4a51-9d0b-6b1f1f0f0f0f", headers=AUTH)
    assert unknown.status_code == 404
    assert client.get("/v1/videos/..%2F..%2Fetc%2Fpasswd", headers=AUTH).status_code == 404
    assert client.get("/v1/videos/not-a-uuid/file", headers=AUTH).status_code == 404
    assert client.post("/v1/videos", content=b"x" * 10, headers={**AUTH, "content-type": "text/plain"}).status_code == 415
    assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404
    # rejected uploads leave no folder behind
    assert not [p for p in job_dir.iterdir() if p.is_dir()
                and not (p / "result.mp4").exists()], list(job_dir.iterdir())


def test_tokens_are_per_client_and_jobs_belong_to_their_client(service, media):
    client, _ = service
    assert post(client, media["image"], media["audio"], headers={}).status_code == 401
    wrong = post(client, media["image"], media["audio"], headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/videos/0b9a3f5e-1f7e-4a51-9d0b-6b1f1f0f0f0f").status_code == 401
    assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200
    resp = post(client, media["image"], media["audio"], headers=OTHER, steps=2)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    for method, path in (("GET", f"/v1/videos/{job_id}"), ("GET", f"/v1/videos/{job_id}/file"),
                         ("DELETE", f"/v1/videos/{job_id}")):
        other = client.request(method, path, headers=AUTH)  # alice asks for bob's job
        assert other.status_code == 404, (method, path, other.text)
        assert other.json() == client.get("/v1/videos/0b9a3f5e-1f7e-4a51-9d0b-6b1f1f0f0f0f", headers=AUTH).json()
    assert wait_done(client, job_id, token=OTHER_TOKEN)["state"] == "done"


def test_delete_removes_the_job_and_its_files(service, media):
    client, job_dir = service
    resp = post(client, media["image"], media["audio"], steps=6)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    with VideoClient(str(client.base_url), token=TOKEN) as api:
        api.delete(job_id)  # queued or running: cancelled
        with pytest.raises(RequestRejected) as err:
            api.status(job_id)
        assert err.value.status == 404
        assert not (job_dir / job_id).exists()
        # the worker is free again: the next job finishes
        assert wait_done(client, api.submit(media["image"], media["audio"], {"steps": 2}))["state"] == "done"


def test_cross_origin_browser_posts_are_refused(service, media):
    client, _ = service
    base = str(client.base_url)
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Origin": base, "Sec-Fetch-Site": "cross-site"}):
        resp = post(client, media["image"], media["audio"], headers={**AUTH, **headers})
        assert resp.status_code == 403 and resp.json()["field"] == "origin", headers
    same = post(client, media["image"], media["audio"], headers={**AUTH, "Origin": base,
                                                                  "Sec-Fetch-Site": "same-origin"}, steps=2)
    assert same.status_code == 202, same.text
    assert wait_done(client, same.json()["id"])["state"] == "done"


def test_polyglot_and_playlist_uploads_never_open_another_file(service, media, tmp_path):
    """An HLS playlist naming a local file, glued to real MP3 bytes, and a pure playlist: either
    422 or a video whose audio is the check's own decode; the named file is never opened."""
    from pipelines.media.audio_decode import decode_audio

    client, _ = service
    with FifoWatch(tmp_path / "secret.wav") as fifo:
        pure = post(client, media["image"], playlist(fifo.path))
        assert pure.status_code == 422 and pure.json()["field"] == "audio", pure.text
        glued = playlist(fifo.path) + media["mp3"]
        (tmp_path / "glued.bin").write_bytes(glued)
        resp = post(client, media["image"], glued, steps=2)
        assert resp.status_code in (202, 422), resp.text
        if resp.status_code == 202:
            assert wait_done(client, resp.json()["id"])["state"] == "done"
            video = tmp_path / "out.mp4"
            video.write_bytes(client.get(f"/v1/videos/{resp.json()['id']}/file", headers=AUTH).content)
    assert not fifo.opened, "a file named by the playlist was opened"
    if resp.status_code == 202:
        checked = decode_audio_upload(tmp_path / "glued.bin", 3.0).samples  # what the check decoded
        got = decode_audio(video, sample_rate=16000).samples
        n = min(len(checked), len(got)) - 2000
        best = max(float(np.corrcoef(checked[:n], got[lag:lag + n])[0, 1]) for lag in range(0, 1600, 4))
        assert best > 0.95, best


def test_full_queue_answers_429_with_retry_after_and_loses_nothing(service, media):
    client, _ = service
    results: list = [None] * 5

    def submit(i: int) -> None:
        results[i] = post(client, media["image"], media["audio"], steps=6, seed=i)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert set(codes) <= {202, 429} and codes.count(202) <= 2 and 429 in codes, codes
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["field"] == "queue"
    accepted = [r.json()["id"] for r in results if r.status_code == 202]
    assert accepted
    for job_id in accepted:
        assert wait_done(client, job_id)["state"] == "done"
    # the file endpoint refuses a job that is not done yet (409), then serves it
    resp = post(client, media["image"], media["audio"], steps=2)
    assert resp.status_code == 202
    early = client.get(f"/v1/videos/{resp.json()['id']}/file", headers=AUTH)
    assert early.status_code in (200, 409)
    assert wait_done(client, resp.json()["id"])["state"] == "done"


def test_serve_config_file_builds_the_application(tiny_package):
    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from core.paths import PROJECT_ROOT
    from serve.app import app

    data = yaml.safe_load((PROJECT_ROOT / "serve" / "serve_config.yaml").read_text())
    spec = ServeDeploySchema.model_validate(data).applications[0]
    assert spec.import_path == "serve.app:app" and data["http_options"]["host"] == "127.0.0.1"
    assert data["http_options"]["request_timeout_s"] > 0
    args = dict(spec.args)
    args["overrides"] = list(args["overrides"]) + [f"serve.model={tiny_package}"]
    assert isinstance(app(args), Application)
    with pytest.raises(Exception, match="serve.model"):
        app({"config": args["config"], "overrides": ["serve.model=null"]})


@pytest.mark.parametrize("kind", ["grey", "grey16"])
def test_greyscale_and_16_bit_png_portraits_are_accepted_and_animated(service, media, kind):
    """A greyscale photo and a 16-bit PNG go through the upload check (its face found, not a
    white-clipped picture) and the job finishes."""
    from PIL import Image
    from skimage import data

    grey = np.asarray(Image.fromarray(data.astronaut()[20:280, 80:380]).convert("L"))
    img = Image.fromarray(grey.astype(np.uint16) * 257 if kind == "grey16" else grey)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    client, _ = service
    resp = post(client, buf.getvalue(), media["audio"], steps=1)
    assert resp.status_code == 202, resp.text
    assert wait_done(client, resp.json()["id"])["state"] == "done"
