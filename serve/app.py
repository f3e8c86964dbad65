"""The Loopy HTTP service: a Ray Serve application with a FastAPI ingress.

Two deployments:

* ``LoopyIngress`` (one replica, no GPU): the HTTP API and the web page. It checks uploads
  (:mod:`serve.validation`), keeps the bounded job store (:mod:`serve.jobs`) and feeds queued jobs
  to the workers, at most one job per worker replica at a time, so a job is ``queued`` until a
  worker is free and ``running`` while it is generated. Blocking work (decoding, face detection)
  runs in threads: the ingress stays responsive while videos are generated elsewhere.
* ``LoopyWorker`` (``serve.num_replicas`` replicas, ``serve.gpus_per_replica`` GPUs each): one
  :class:`inference.sampler.LoopySampler` loaded from ``serve.model`` (an MLflow model URI or a
  package folder). Its ``generate`` streams progress events (one per 12-frame clip) and finally the
  mp4 bytes back to the ingress through Ray (no shared file system needed).

HTTP API (``/v1`` needs ``Authorization: Bearer <serve.auth_token>`` when a token is configured):

* ``POST /v1/videos``: multipart ``image`` + ``audio`` files and optional option fields
  (``steps``, ``audio_ratio``, ``ref_ratio``, ``seed``, ``fps``, ``size``) -> ``202 {"id": ...}``
  at once; 413 / 422 naming the field for bad input, 429 + ``Retry-After`` when the queue is full;
* ``GET /v1/videos/{id}``: state (queued, running, done, failed), progress (clips), queue position;
* ``GET /v1/videos/{id}/file``: the mp4 (409 until done);
* ``GET /healthz``; ``GET /``: the web page (``serve/static/index.html``).

Entry points: ``serve run serve/serve_config.yaml`` (application builder :func:`app`, args
``config`` and ``overrides``), or ``python -m serve.app [--config FILE] [overrides]``.
"""

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import ray
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from ray import serve

from core.config import PlatformConfig, add_config_arguments, load_platform_config
from core.paths import project_path
from core.ray_runtime import init_ray
from inference.portrait import PortraitCropper
from inference.sampler import LoopySampler
from serve.errors import ServeConfigError, UploadError
from serve.jobs import JobState, JobStore, QueueFullError
from serve.validation import (
    check_audio,
    check_content_length,
    check_face,
    check_size,
    decode_image,
    optional_bearer_ok,
    options_to_json,
    parse_form,
)

log = logging.getLogger("loopy.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and option fields on top of the two files

fastapi_app = FastAPI(title="Loopy", description="Audio-driven portrait video generation")


def _error(exc: UploadError) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.status)


@serve.deployment(name="LoopyWorker", max_ongoing_requests=1)
class LoopyWorker:
    """One sampler per replica; ``generate`` streams ``{"progress": {...}}`` events then ``{"video": bytes}``."""

    def __init__(self, model: str, tracking_uri: Optional[str] = None, device: str = "auto"):
        self.sampler = LoopySampler.from_package(model, device=device, tracking_uri=tracking_uri)

    def _run(self, image: bytes, audio: bytes, options: dict, on_progress) -> bytes:
        opts = dataclasses.replace(self.sampler.default_options, **options)
        with tempfile.TemporaryDirectory(prefix="loopy_job_") as tmp:
            audio_path = Path(tmp) / "audio.bin"
            audio_path.write_bytes(audio)
            out = Path(tmp) / "result.mp4"
            self.sampler.generate(decode_image(image, "image"), audio_path, out, opts, on_progress)
            return out.read_bytes()

    async def generate(self, image: bytes, audio: bytes, options: dict):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_progress(p) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("progress", {
                "clips_done": p.clips_done, "clips_total": p.clips_total,
                "frames_done": p.frames_done, "num_frames": p.num_frames}))

        future = loop.run_in_executor(None, self._run, image, audio, options, on_progress)
        future.add_done_callback(lambda f: events.put_nowait(("done", None)))
        while True:
            kind, payload = await events.get()
            if kind == "progress":
                yield {"progress": payload}
            else:
                break
        yield {"video": future.result()}  # re-raises the sampler's error, if any

    def check_health(self) -> None:
        if self.sampler is None:
            raise RuntimeError("sampler not loaded")


@serve.deployment(name="LoopyIngress", num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(fastapi_app)
class LoopyIngress:
    """HTTP API, web page, upload checks, the bounded job queue, and dispatch to the workers."""

    def __init__(self, worker, cfg: PlatformConfig):
        self.worker = worker
        self.cfg = cfg
        sc = cfg.serve
        self.store = JobStore(project_path(sc.job_dir), max_pending=sc.max_queue, ttl_s=sc.job_ttl_s)
        self.max_upload_bytes = int(sc.max_upload_mb * 1024 * 1024)
        self.default_options = cfg.sampler
        self.cropper = PortraitCropper.from_config(cfg)  # face presence: the ingest detector
        self._detect_lock = threading.Lock()
        self.num_dispatchers = max(1, sc.num_replicas)
        self._queue: Optional[asyncio.Queue] = None
        self._dispatchers: list[asyncio.Task] = []

    # --- dispatch ------------------------------------------------------------------------------
    def _ensure_dispatchers(self) -> asyncio.Queue:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._dispatchers = [asyncio.create_task(self._dispatch_loop())
                                 for _ in range(self.num_dispatchers)]
        return self._queue

    async def _dispatch_loop(self) -> None:
        while True:
            job_id = await self._queue.get()
            try:
                await self._run_job(job_id)
            except Exception as exc:  # noqa: BLE001 - recorded on the job, the loop goes on
                log.exception("job %s failed", job_id)
                self.store.fail(job_id, f"{type(exc).__name__}: {exc}")

    async def _run_job(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None:
            return
        image = await asyncio.to_thread(job.file("image").read_bytes)
        audio = await asyncio.to_thread(job.file("audio").read_bytes)
        self.store.start(job_id)
        stream = self.worker.options(stream=True).generate.remote(image, audio, job.options)
        async for event in stream:
            if "progress" in event:
                p = event["progress"]
                self.store.progress(job_id, p["clips_done"], p["clips_total"], p["num_frames"])
            elif "video" in event:
                await asyncio.to_thread(job.file("video").write_bytes, event["video"])
                self.store.finish(job_id)
                return
        raise RuntimeError("the worker ended without a video")

    # --- helpers -------------------------------------------------------------------------------
    def _auth(self, request: Request) -> Optional[JSONResponse]:
        if optional_bearer_ok(request.headers.get("authorization"), self.cfg.serve.auth_token):
            return None
        return JSONResponse({"field": "authorization", "error": "authorization: missing or wrong bearer token"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})

    def _validate_files(self, job) -> None:
        """Decode-to-check both uploads (runs in a thread)."""
        image = decode_image(job.file("image").read_bytes(), "image")
        with self._detect_lock:  # one detector shared by the request threads
            check_face(image, self.cropper.has_face, "image")
        check_audio(job.file("audio"), self.cfg.serve.max_audio_s, "audio")

    # --- routes --------------------------------------------------------------------------------
    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "jobs": self.store.counts(), "max_queue": self.store.max_pending}

    @fastapi_app.get("/", response_class=HTMLResponse)
    async def index(self) -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text())

    @fastapi_app.post("/v1/videos")
    async def submit(self, request: Request):
        denied = self._auth(request)
        if denied:
            return denied
        try:
            check_content_length(request.headers.get("content-length"),
                                 2 * self.max_upload_bytes + FORM_OVERHEAD_BYTES)
        except UploadError as exc:
            return _error(exc)
        if self.store.pending() >= self.store.max_pending:  # cheap early refusal before parsing
            return self._queue_full(QueueFullError(self.store.pending(), 5))
        try:
            form = await request.form(max_files=2, max_fields=16)
        except Exception as exc:  # noqa: BLE001 - malformed multipart
            return _error(UploadError(400, "body", f"not a valid multipart form ({type(exc).__name__})"))
        try:
            parsed = parse_form(form.multi_items(), self.default_options, self.max_upload_bytes)
        except UploadError as exc:
            await form.close()
            return _error(exc)
        files = parsed.files
        try:
            job = self.store.create(options_to_json(parsed.options))
        except QueueFullError as exc:
            await form.close()
            return self._queue_full(exc)
        try:
            for key in ("image", "audio"):
                data = await files[key].read(self.max_upload_bytes + 1)
                check_size(len(data), key, self.max_upload_bytes)
                await asyncio.to_thread(job.file(key).write_bytes, data)
            await form.close()
            await asyncio.to_thread(self._validate_files, job)
        except UploadError as exc:
            self.store.discard(job.id)
            return _error(exc)
        except Exception:
            self.store.discard(job.id)
            raise
        self._ensure_dispatchers().put_nowait(job.id)
        body = job.to_json(self.store.queue_position(job.id))
        body["status_url"] = f"/v1/videos/{job.id}"
        return JSONResponse(body, status_code=202, headers={"Location": f"/v1/videos/{job.id}"})

    def _queue_full(self, exc: QueueFullError) -> JSONResponse:
        return JSONResponse({"field": "queue", "error": f"queue: {exc}", "retry_after_s": exc.retry_after_s},
                            status_code=429, headers={"Retry-After": str(exc.retry_after_s)})

    def _find_job(self, job_id: str, request: Request):
        """(job, None) for an authorised request naming a known job, else (None, the 401/404 answer)."""
        denied = self._auth(request)
        if denied:
            return None, denied
        job = self.store.get(job_id)
        if job is None:
            return None, JSONResponse({"field": "id", "error": f"id: no job {job_id[:64]!r}"}, status_code=404)
        return job, None

    @fastapi_app.get("/v1/videos/{job_id}")
    async def status(self, job_id: str, request: Request):
        job, answer = self._find_job(job_id, request)
        if answer is not None:
            return answer
        return job.to_json(self.store.queue_position(job.id))

    @fastapi_app.get("/v1/videos/{job_id}/file")
    async def file(self, job_id: str, request: Request):
        job, answer = self._find_job(job_id, request)
        if answer is not None:
            return answer
        if job.state != JobState.done:
            return JSONResponse({"field": "id", "error": f"id: job is {job.state.value}, no video yet",
                                 "state": job.state.value}, status_code=409)
        return FileResponse(job.file("video"), media_type="video/mp4", filename=f"loopy-{job.id}.mp4")


# --- building the application ----------------------------------------------------------------------

def build_app(cfg: PlatformConfig):
    """The Serve application for ``cfg`` (replicas, GPUs and CPUs from ``cfg.serve``)."""
    sc = cfg.serve
    if not sc.model:
        raise ServeConfigError("serve.model is not set: give an MLflow model URI (models:/loopy/1, "
                         "models:/loopy@stage2) or a model package folder")
    model = sc.model
    if not model.startswith(("models:/", "runs:/")):
        model = str(project_path(model))
    device = "cuda" if sc.gpus_per_replica > 0 else "cpu"
    worker = LoopyWorker.options(
        num_replicas=sc.num_replicas,
        ray_actor_options={"num_cpus": sc.cpus_per_replica, "num_gpus": sc.gpus_per_replica},
    ).bind(model, cfg.tracking.tracking_uri, device)
    return LoopyIngress.bind(worker, cfg)


def app(args: dict[str, Any]):
    """Serve application builder (``import_path: serve.app:app``). ``args``: ``config`` (a YAML
    file, relative paths under the project root) and ``overrides`` (list of ``section.key=value``)."""
    config = args.get("config")
    if config and not Path(config).is_absolute() and not Path(config).exists():
        config = str(project_path(config))
    overrides = args.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    return build_app(load_platform_config(config, overrides))


def run_service(cfg: PlatformConfig, blocking: bool = True, name: str = "loopy") -> str:
    """Start Ray (``cfg.ray``), Serve's HTTP proxy on ``serve.host:serve.port`` and the app.
    Returns the base URL."""
    init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(cfg), name=name, route_prefix="/", blocking=False)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    if blocking:
        def stop(signum, frame):  # SIGINT / SIGTERM: shut Serve and Ray down cleanly
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)  # set after ray.init, which may install its own
        print(f"Loopy service at {url}/ (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(1.0)  # short: a signal landing on a Ray thread is handled within 1 s
                signal.signal(signal.SIGINT, stop)  # Ray's native code may re-take SIGINT
        except KeyboardInterrupt:
            print("stopping the Loopy service", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    return url


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the Loopy HTTP service (Ray Serve)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    run_service(load_platform_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
