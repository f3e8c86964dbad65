"""The Loopy HTTP service: a Ray Serve application with a FastAPI ingress.

Two deployments:

* ``LoopyIngress`` (one replica, no GPU): the HTTP API and the web page. It authenticates clients
  (:mod:`serve.auth`), checks uploads (:mod:`serve.validation`: client bytes are parsed there,
  once, and only the service's own re-encodings are kept), keeps the jobs in a database
  (:mod:`serve.jobs`) and feeds queued jobs to the workers, at most one job per worker replica at
  a time, so a job is ``queued`` until a worker takes it and ``running`` while it is generated.
  Blocking work (decoding, face detection) runs in threads. Timers: the sweeper removes expired
  jobs and orphan folders every ``serve.sweep_every_s``; each running job has a deadline
  (``serve.job_timeout_s``) after which it fails and its worker is released.
* ``LoopyWorker`` (``serve.num_replicas`` replicas, ``serve.gpus_per_replica`` GPUs each): one
  :class:`inference.sampler.LoopySampler` for the model its Serve ``user_config`` names
  (``{"model": serve.model, "model_poll_s": ...}``, :mod:`serve.model_source`: an alias is pinned
  to its current version and followed when it moves). ``generate`` streams a ``started`` event,
  progress events (one per 12-frame clip) and finally the mp4 bytes back to the ingress through
  Ray (no shared file system needed). A cancelled or overdue job is stopped cooperatively (its
  progress callback raises after the current clip); a job stuck past its deadline plus
  ``serve.hang_grace_s`` fails the replica's health check, so Serve replaces the replica.

HTTP API (``/v1`` needs ``Authorization: Bearer <token>`` when client tokens are set, see
:mod:`serve.auth`; each job is visible only to the client that created it, others get 404):

* ``POST /v1/videos``: multipart ``image`` + ``audio`` files and optional option fields
  (``steps``, ``audio_ratio``, ``ref_ratio``, ``reference_init``, ``noise_scale``, ``seed``, ``fps``, ``size``) -> ``202 {"id": ...}``
  once checked; 413 / 422 naming the field for bad input, 408 for a body not sent in time,
  403 for a cross-origin browser post, 429 + ``Retry-After`` when the queue is full, 503 +
  ``Retry-After`` when the job storage is full;
* ``GET /v1/videos/{id}``: state (queued, running, done, failed), progress (clips), queue position;
* ``GET /v1/videos/{id}/file``: the mp4 (409 until done);
* ``DELETE /v1/videos/{id}``: cancel (if running) and remove the job and its files (204);
* ``GET /v1/stats``: jobs per state, the queue bound and the caller's share of it;
* ``GET /healthz`` (no token: ``{"status": "ok"}`` and nothing else); ``GET /``: the web page
  (``serve/static/index.html``); ``/docs`` only with ``serve.docs=true``.

Every answer goes through :class:`Guard`: a ``Host`` outside the allowlist is 421 (DNS
rebinding); every answer carries ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``,
``Referrer-Policy: no-referrer`` and a Content-Security-Policy (the page's own, with hashes of its
inline script and style; ``default-src 'none'`` for the rest); API answers ``Cache-Control:
no-store``. Request heads are bounded before Serve's proxy reads them by the front listener
(:mod:`serve.front`, started by :func:`start_service`).

Stopping (:func:`run_service`, SIGINT / SIGTERM): the ingress drains (:meth:`LoopyIngress.drain`):
new jobs answer 503, running jobs get ``serve.drain_grace_s`` to finish and are recorded done, the
others are put back as ``interrupted`` without spending an attempt and run after the next start.

Entry points: ``serve run serve/serve_config.yaml`` (application builder :func:`app`, args
``config`` and ``overrides``; no front listener, docs/SERVICE.md), or
``python -m serve.app [--config FILE] [overrides]``.
"""

import argparse
import asyncio
import base64
import dataclasses
import hashlib
import json
import re
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from ray import serve
from starlette.formparsers import MultiPartException, MultiPartParser

from core.config import PlatformConfig, add_config_arguments, load_platform_config
from core.paths import project_path
from core.ray_runtime import init_ray
from core.sections import ServeConfig
from inference.portrait import PortraitCropper
from inference.sampler import LoopySampler, num_clips
from inference.video_io import is_pcm_wav
from serve.auth import Authenticator, HostAllowlist, load_tokens, origin_allowed, require_auth_for
from serve.errors import ServeConfigError, ServeError, UploadError
from serve.front import FrontLimits, FrontListener
from serve.jobs import ClientShareFullError, DiskFullError, JobState, JobStore, QueueFullError, open_private, write_private
from serve.model_source import is_alias, resolve_model
from serve.validation import (
    check_audio,
    check_budget,
    check_content_length,
    check_face,
    check_size,
    decode_audio_upload,
    decode_image,
    encode_png,
    encode_wav,
    frames_for,
    options_to_json,
    parse_form,
    read_png,
)

log = logging.getLogger("loopy.serve")
STATIC_DIR = Path(__file__).resolve().parent / "static"
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and option fields on top of the two files
JOB_DB_ENV = "LOOPY_SERVE_JOB_DB"  # SQLAlchemy URL with a password (a Secret), wins over serve.job_db
BUSY_RETRY_S = 1.0  # wait before offering a job again to a worker whose previous job is still stopping
DRAIN_TASKS_STOP_S = 10.0  # after the grace: how long a drain waits for its cancelled background tasks

# docs, redoc and the OpenAPI schema are off here; routes below serve them only with serve.docs=true
fastapi_app = FastAPI(title="Loopy", description="Audio-driven portrait video generation",
                      docs_url=None, redoc_url=None, openapi_url=None)


class WorkerBusyError(ServeError, RuntimeError):
    """A worker replica's previous job has not stopped yet; the ingress offers the job again."""


class JobStopped(ServeError, RuntimeError):
    """Raised from the sampler's progress callback to stop a cancelled or overdue job."""


def _error(exc: UploadError, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)


async def run_within(coro, timeout_s: float):
    """``await coro`` for at most ``timeout_s`` seconds, else :class:`asyncio.TimeoutError` (the
    coroutine's task is cancelled and has stopped when this raises): ``asyncio.wait_for`` without
    its lost cancellation. Before Python 3.12, a ``wait_for`` whose caller is cancelled after the
    awaited task finished but before the caller resumed returns that task's result and drops the
    cancellation (CPython gh-86296). A drain that saw the running job recorded done and cancelled
    the dispatcher in that window (a few event-loop steps) waited forever: the dispatcher went on
    to ``queue.get()``. Here the caller's cancellation always propagates."""
    task = asyncio.ensure_future(coro)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if done:
            return task.result()
        raise asyncio.TimeoutError()
    finally:
        if not task.done():  # the deadline, or the caller cancelled: stop the task, as wait_for does
            task.cancel()
            await asyncio.wait({task})


def http_options(sc: ServeConfig, proxy_port: Optional[int] = None) -> dict[str, Any]:
    """Serve's HTTP proxy options for ``serve.start``: on 127.0.0.1 at ``proxy_port`` (default
    ``serve.proxy_port``) behind the front listener, which owns ``serve.host:serve.port``; the
    request time limit."""
    port = proxy_port if proxy_port is not None else sc.proxy_port
    if port is None:
        raise ServeConfigError("serve.proxy_port is not set and no port was chosen (start_service picks one)")
    return {"host": "127.0.0.1", "port": port, "request_timeout_s": sc.request_timeout_s}


def _inline_hashes(html: str, tag: str) -> str:
    """CSP source expressions (``'sha256-...'``) of the inline ``<tag>`` blocks of ``html``."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)


def page_csp(html: str) -> str:
    """The web page's Content-Security-Policy: its own inline script and style (by hash) and
    nothing else; fetches to the service only; images and video from ``blob:`` (the chosen portrait
    and the downloaded result); no framing, no plugins, no form posts, no ``<base>``."""
    return (f"default-src 'none'; script-src {_inline_hashes(html, 'script')}; "
            f"style-src {_inline_hashes(html, 'style')}; connect-src 'self'; img-src 'self' blob:; "
            "media-src 'self' blob:; form-action 'none'; base-uri 'none'; object-src 'none'; "
            "frame-ancestors 'none'")


API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]


class Guard:
    """ASGI middleware around every route: the ``Host`` allowlist (421 otherwise, before any
    route runs) and the headers a browser-facing service sends (``nosniff``, no framing, no
    referrer, a CSP; ``Cache-Control: no-store`` on the API: job states, results, stats).
    Hand-written: Starlette's TrustedHostMiddleware answers 400 and cuts ``[::1]:8000`` at the
    first colon; it has no security-header middleware."""

    hosts: Optional[HostAllowlist] = None  # set by the ingress replica from serve.allowed_hosts / serve.port
    page_csp: str = API_CSP

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        is_page = path == "/"
        no_store = not is_page

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", [])
                           if k.lower() not in (b"cache-control", b"content-security-policy")]
                headers += SECURITY_HEADERS
                if path != "/docs":  # Swagger UI (serve.docs=true only) loads its scripts from a CDN
                    headers.append((b"content-security-policy", (self.page_csp if is_page else API_CSP).encode()))
                headers.append((b"cache-control", b"no-store" if no_store else b"no-cache"))
                message = {**message, "headers": headers}
            await send(message)

        hosts = self.hosts
        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), None)
        if hosts is not None and not hosts.host_allowed(host):
            resp = JSONResponse({"field": "host", "error": "host: this service does not answer for that name"},
                                status_code=421)
            return await resp(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)


class RequestDeadline:
    """ASGI middleware: every request ends within ``timeout_s`` seconds (408 if nothing was sent
    yet). Serve's proxy lets a client lift its own timeout (``x-request-timeout-seconds: 0``);
    this limit reads no header. Hand-written: Starlette has no request-time limit."""

    timeout_s: Optional[float] = None  # set by the ingress replica from serve.request_timeout_s

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.timeout_s:
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, tracking_send), self.timeout_s)
        except asyncio.TimeoutError:
            if not started:
                resp = JSONResponse({"field": "request", "error": f"request: not done within {self.timeout_s:g} s"},
                                    status_code=408)
                await resp(scope, receive, send)


fastapi_app.add_middleware(RequestDeadline)
fastapi_app.add_middleware(Guard)  # added last: outermost, so 408 answers get its headers too


# --- the worker ------------------------------------------------------------------------------------

@serve.deployment(name="LoopyWorker", max_ongoing_requests=1, health_check_period_s=2.0,
                  health_check_timeout_s=30.0)
class LoopyWorker:
    """One sampler per replica. ``generate`` streams ``{"started": {...}}``, then
    ``{"progress": {...}}`` per clip, then ``{"video": bytes, "model_version": str}``."""

    def __init__(self, tracking_uri: Optional[str] = None, device: str = "auto", hang_grace_s: float = 30.0,
                 fault_hang_seed: Optional[int] = None):
        self.tracking_uri = tracking_uri
        self.device = device
        self.hang_grace_s = hang_grace_s
        self.fault_hang_seed = fault_hang_seed
        self.sampler: Optional[LoopySampler] = None
        self.model: Optional[str] = None
        self.version: Optional[str] = None
        self._swap = threading.Lock()  # guards (sampler, version)
        self._reload = threading.Lock()  # one load at a time
        self._run_lock = threading.Lock()  # one job thread at a time (the sampler is thread-unsafe)
        self._busy_deadline: Optional[float] = None  # wall clock a running job must end by
        self._poll_stop = threading.Event()
        self._poller: Optional[threading.Thread] = None

    # --- model ---------------------------------------------------------------------------------
    def reconfigure(self, user_config: dict) -> None:
        """Serve ``user_config``: ``model`` (URI or folder) and ``model_poll_s`` (seconds between
        alias look-ups; 0: never). Called at start and on every config change, without restart."""
        model = str(user_config["model"])
        poll_s = float(user_config.get("model_poll_s", 0) or 0)
        self._poll_stop.set()
        if self._poller is not None:
            self._poller.join(timeout=60)
        self.model = model
        self.refresh_model()
        self._poll_stop = threading.Event()
        self._poller = None
        if poll_s > 0 and is_alias(model):
            self._poller = threading.Thread(target=self._poll_loop, args=(poll_s, self._poll_stop),
                                            name="loopy-model-poll", daemon=True)
            self._poller.start()

    def refresh_model(self) -> bool:
        """Load the version ``self.model`` names now if it is not the loaded one; True if loaded."""
        with self._reload:
            choice = resolve_model(self.model, self.tracking_uri)
            if self.sampler is not None and choice.version == self.version:
                return False
            sampler = LoopySampler.from_package(choice.uri, device=self.device, tracking_uri=self.tracking_uri)
            with self._swap:  # jobs running keep the sampler they started with
                self.sampler, self.version = sampler, choice.version
            log.info("serving model %s (%s)", choice.version, self.model)
            return True

    def _poll_loop(self, every_s: float, stop: threading.Event) -> None:
        while not stop.wait(every_s):
            try:
                self.refresh_model()
            except Exception:  # noqa: BLE001 - keep serving the loaded version; retried next poll
                log.exception("could not refresh the model %s", self.model)

    def model_info(self) -> dict:
        return {"model": self.model, "version": self.version}

    # --- jobs ----------------------------------------------------------------------------------
    def _run(self, image_png: bytes, audio_wav: bytes, options: dict, landmarks: Optional[list],
             on_progress) -> bytes:
        with self._swap:
            sampler = self.sampler
        opts = dataclasses.replace(sampler.default_options, **options)
        with tempfile.TemporaryDirectory(prefix="loopy_job_") as tmp:
            audio_path = Path(tmp) / "audio.wav"
            audio_path.write_bytes(audio_wav)
            if not is_pcm_wav(audio_path):  # the ingress sends only the WAV it wrote itself
                raise ServeError("the job's audio is not the service's PCM WAV")
            out = Path(tmp) / "result.mp4"
            face = None if landmarks is None else np.asarray(landmarks, np.float32)  # [68, 2] px
            sampler.generate(read_png(image_png), audio_path, out, opts, on_progress, landmarks=face)
            return out.read_bytes()

    def _run_locked(self, timeout_s: float, *args) -> bytes:
        try:
            self._busy_deadline = time.time() + timeout_s
            return self._run(*args)
        finally:
            self._busy_deadline = None
            self._run_lock.release()

    async def generate(self, image_png: bytes, audio_wav: bytes, options: dict, timeout_s: float,
                       landmarks: Optional[list] = None):
        if not self._run_lock.acquire(blocking=False):
            raise WorkerBusyError("the previous job on this worker is still stopping")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        deadline = time.time() + timeout_s
        hang = self.fault_hang_seed is not None and options.get("seed") == self.fault_hang_seed

        def on_progress(p) -> None:  # runs in the sampler thread after each clip
            if hang:
                time.sleep(3600)  # fault injection: stuck where no callback can stop it
            if stop.is_set():
                raise JobStopped("the job was cancelled")
            if time.time() > deadline:
                raise JobStopped(f"the job ran longer than {timeout_s:g} s")
            loop.call_soon_threadsafe(events.put_nowait, ("progress", {
                "clips_done": p.clips_done, "clips_total": p.clips_total,
                "frames_done": p.frames_done, "num_frames": p.num_frames}))

        try:
            future = loop.run_in_executor(None, self._run_locked, timeout_s, image_png, audio_wav, options,
                                          landmarks, on_progress)
        except BaseException:
            self._run_lock.release()
            raise
        future.add_done_callback(lambda f: events.put_nowait(("done", None)))
        try:
            yield {"started": {"model_version": self.version}}
            while True:
                kind, payload = await events.get()
                if kind == "progress":
                    yield {"progress": payload}
                else:
                    break
            yield {"video": future.result(), "model_version": self.version}  # re-raises the sampler's error
        finally:
            stop.set()  # cancelled (deadline, DELETE) or done: the thread stops after its current clip

    def check_health(self) -> None:
        if self.sampler is None:
            raise RuntimeError("sampler not loaded")
        deadline = self._busy_deadline
        if deadline is not None and time.time() > deadline + self.hang_grace_s:
            raise RuntimeError(f"a job is running {time.time() - deadline:.0f} s past its deadline: "
                               f"the sampler thread is stuck, replace this replica")


# --- the ingress -----------------------------------------------------------------------------------

class BodyTooLarge(Exception):
    pass


@serve.deployment(name="LoopyIngress", num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(fastapi_app)
class LoopyIngress:
    """HTTP API, web page, upload checks, the job store, and dispatch to the workers."""

    def __init__(self, worker, cfg: PlatformConfig):
        self.worker = worker
        self.cfg = cfg
        sc = self.sc = cfg.serve
        tokens = load_tokens(sc.tokens_file)  # read here, in the replica: never in a config or app args
        require_auth_for(sc.host, tokens)
        self.auth = Authenticator(tokens)
        self.hosts = HostAllowlist(sc.allowed_hosts, sc.port)
        Guard.hosts = self.hosts
        Guard.page_csp = page_csp((STATIC_DIR / "index.html").read_text())
        RequestDeadline.timeout_s = sc.request_timeout_s
        self.max_upload_bytes = int(sc.max_upload_mb * 2**20)
        self.max_body_bytes = 2 * self.max_upload_bytes + FORM_OVERHEAD_BYTES
        self.store = JobStore(project_path(sc.job_dir), max_pending=sc.max_queue, ttl_s=sc.job_ttl_s,
                              db_url=os.environ.get(JOB_DB_ENV) or sc.job_db,
                              max_disk_bytes=int(sc.max_disk_mb * 2**20), max_attempts=sc.max_attempts,
                              # one client's share of the queue; without tokens there is one client
                              max_per_client=min(sc.max_queue_per_client, sc.max_queue) if self.auth.enabled else None)
        self.default_options = cfg.sampler
        self.clip_frames = cfg.reader.clip_frames
        self.cropper = PortraitCropper.from_config(cfg)  # face presence: the ingest detector
        self._detect_lock = threading.Lock()
        self.num_dispatchers = max(1, sc.num_replicas)
        self._recovered = self.store.recover()  # jobs of an earlier replica: re-queued or failed
        self._queue: Optional[asyncio.Queue] = None
        self._tasks: list[asyncio.Task] = []
        self._streams: dict[str, Any] = {}  # job id -> the worker's response stream while running
        self._draining = False  # set by drain(): no new jobs are taken or started
        try:
            asyncio.get_running_loop()
            self._ensure_background()
        except RuntimeError:
            pass  # no loop in the constructor: started by the first request or health check

    # --- background: dispatch and the sweeper ---------------------------------------------------
    def _ensure_background(self) -> asyncio.Queue:
        if self._queue is None:
            self._queue = asyncio.Queue()
            for job_id in self._recovered:
                self._queue.put_nowait(job_id)
            self._tasks = [asyncio.create_task(self._dispatch_loop()) for _ in range(self.num_dispatchers)]
            self._tasks.append(asyncio.create_task(self._sweep_loop()))
        return self._queue

    async def check_health(self) -> None:
        self._ensure_background()
        dead = [t for t in self._tasks if t.done()]
        if dead:
            raise RuntimeError(f"{len(dead)} background task(s) of the ingress ended")

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sc.sweep_every_s)
            try:
                await asyncio.to_thread(self._sweep_once)
            except Exception:  # noqa: BLE001 - the timer goes on
                log.exception("job sweep failed")

    def _sweep_once(self) -> None:
        self.store.sweep()
        now = time.time()
        for job_id in self.store.ids(JobState.running):  # lost by its dispatcher (should not happen)
            job = self.store.get(job_id)
            if job is not None and job_id not in self._streams and job.deadline_s is not None \
                    and now > job.deadline_s + self.sc.hang_grace_s:
                self.store.fail(job_id, "the job's worker was lost")

    async def _dispatch_loop(self) -> None:
        while True:
            job_id = await self._queue.get()
            if self._draining:
                continue  # stays queued in the database; the next start's recover() queues it
            try:
                await self._run_job(job_id)
            except Exception as exc:  # noqa: BLE001 - recorded on the job, the loop goes on
                log.exception("job %s failed", job_id)
                self.store.fail(job_id, f"generation failed ({type(exc).__name__})")
            finally:
                self._streams.pop(job_id, None)

    async def _open_stream(self, job_id: str, image: bytes, audio: bytes, options: dict,
                           landmarks: Optional[list] = None):
        """Offer the job to a worker until one takes it (a replica still stopping its previous job,
        or one being replaced, is asked again after ``BUSY_RETRY_S``). Returns (stream, its first
        event), or (None, None) when the job was deleted meanwhile. Raises the last error when
        no worker took it within ``job_timeout_s + hang_grace_s + 120`` seconds."""
        timeout_s = self.sc.job_timeout_s
        give_up = time.monotonic() + timeout_s + self.sc.hang_grace_s + 120.0
        while True:
            if self.store.get(job_id) is None or self._draining:
                return None, None
            stream = self.worker.options(stream=True).generate.remote(image, audio, options, timeout_s, landmarks)
            self._streams[job_id] = stream
            try:
                return stream, await stream.__anext__()
            except (WorkerBusyError, ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if time.monotonic() > give_up:
                    raise
                await asyncio.sleep(BUSY_RETRY_S)

    @staticmethod
    def _face_of(job) -> Optional[list]:
        """The landmarks the upload check found ([68][2] pixels), or None (a job queued by an older
        version of the service, without the file: the worker searches the face itself)."""
        path = job.file("face")
        if not path.is_file():
            return None
        return json.loads(path.read_text())["landmarks"]

    async def _run_job(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None or job.state != JobState.queued:
            return
        image = await asyncio.to_thread(job.file("image").read_bytes)
        audio = await asyncio.to_thread(job.file("audio").read_bytes)
        landmarks = await asyncio.to_thread(self._face_of, job)
        stream, first = await self._open_stream(job_id, image, audio, job.options, landmarks)
        if stream is None:
            return
        timeout_s = self.sc.job_timeout_s
        if not self.store.start(job_id, time.time() + timeout_s):  # deleted meanwhile
            stream.cancel()
            return
        self.store.progress(job_id, 0, job.clips_total, job.num_frames, first["started"]["model_version"])
        try:
            # not asyncio.wait_for: it may drop the drain's cancellation of this task (run_within)
            await run_within(self._follow(job_id, stream), timeout_s)
        except asyncio.TimeoutError:
            stream.cancel()
            self.store.fail(job_id, f"deadline: the job ran longer than {timeout_s:g} s (serve.job_timeout_s)")
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            self._worker_lost(job_id)
        except JobStopped as exc:  # raised by the worker (a RayTaskError that is also a JobStopped)
            cause = getattr(exc, "cause", None) or exc
            reason = cause.args[0] if cause.args else "stopped"
            self.store.fail(job_id, f"deadline: {reason}" if "longer than" in str(reason) else f"stopped: {reason}")
        except Exception as exc:  # noqa: BLE001
            if self.store.get(job_id) is None:  # deleted by its client: the stream was cancelled
                return
            log.exception("job %s failed", job_id)  # the details stay in the server log
            cause = getattr(exc, "cause", None) or exc
            self.store.fail(job_id, f"generation failed ({type(cause).__name__})")

    async def _follow(self, job_id: str, stream) -> None:
        async for event in stream:
            if "progress" in event:
                p = event["progress"]
                self.store.progress(job_id, p["clips_done"], p["clips_total"], p["num_frames"])
            elif "video" in event:
                job = self.store.get(job_id)
                if job is None:
                    return
                await asyncio.to_thread(write_private, job.file("video"), event["video"])
                self.store.progress(job_id, job.clips_done, job.clips_total, 0, event.get("model_version"))
                self.store.finish(job_id)
                return
        raise ServeError("the worker ended without a video")

    def _worker_lost(self, job_id: str) -> None:
        if self.store.requeue(job_id):
            self._queue.put_nowait(job_id)
        else:
            self.store.fail(job_id, "the job's worker was lost")

    # --- helpers -------------------------------------------------------------------------------
    def _client(self, request: Request) -> tuple[Optional[str], Optional[JSONResponse]]:
        client = self.auth.client_for(request.headers.get("authorization"))
        if client is not None:
            return client, None
        return None, JSONResponse({"field": "authorization", "error": "authorization: missing or wrong bearer token"},
                                  status_code=401, headers={"WWW-Authenticate": "Bearer"})

    def _origin_denied(self, request: Request) -> Optional[JSONResponse]:
        h = request.headers
        if origin_allowed(h.get("origin"), self.hosts, self.sc.allowed_origins, h.get("sec-fetch-site")):
            return None
        return JSONResponse({"field": "origin", "error": "origin: cross-origin requests are refused"},
                            status_code=403)

    async def _read_form(self, request: Request):
        """The multipart body, counted while it is read (413 past ``max_body_bytes``) and read
        within ``serve.body_timeout_s`` (408)."""
        limit = self.max_body_bytes

        async def limited():
            total = 0
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise BodyTooLarge()
                yield chunk

        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise UploadError(415, "body", "send a multipart/form-data form")
        parser = MultiPartParser(request.headers, limited(), max_files=2, max_fields=16, max_part_size=64 * 1024)
        try:
            return await asyncio.wait_for(parser.parse(), self.sc.body_timeout_s)
        except BodyTooLarge:
            raise UploadError(413, "body", f"request is larger than the limit of {limit // 2**20} MB") from None
        except asyncio.TimeoutError:
            raise UploadError(408, "body", f"the request body was not received within "
                                           f"{self.sc.body_timeout_s:g} s") from None
        except MultiPartException:
            raise UploadError(400, "body", "not a valid multipart form") from None

    def _check_inputs(self, job, options) -> None:
        """Parse the client's bytes once (runs in a thread), keep only the service's re-encodings."""
        sc = self.sc
        rgb = decode_image(job.file("upload_image").read_bytes(), "image",
                           max_pixels=int(sc.max_image_megapixels * 1e6))
        with self._detect_lock:  # one detector shared by the request threads
            landmarks = check_face(rgb, self.cropper.landmarks, "image")
        audio = decode_audio_upload(job.file("upload_audio"), sc.max_audio_s, "audio",
                                    max_channels=sc.max_audio_channels, max_rate_hz=sc.max_audio_rate_hz,
                                    min_rate_hz=sc.min_audio_rate_hz)
        check_audio(audio, "audio", fps=options.fps)
        num_frames = frames_for(audio.duration_s, options.fps)
        check_budget(num_frames, options.steps, sc.max_frame_steps)
        write_private(job.file("image"), encode_png(rgb))
        write_private(job.file("audio"), encode_wav(audio.samples, audio.sample_rate))
        # the worker crops with these (the PNG holds exactly the pixels searched): the face search
        # is the costly part of the check (seconds for a phone photo), run once per request
        write_private(job.file("face"), json.dumps({"landmarks": landmarks.round(3).tolist()}).encode())
        for kind in ("upload_image", "upload_audio"):
            job.file(kind).unlink(missing_ok=True)
        self.store.set_frames(job.id, num_frames, num_clips(num_frames, self.clip_frames))

    def _find_job(self, job_id: str, request: Request):
        """(job, None) for an authorised request naming one of its client's jobs, else (None, the
        401/404 answer). Another client's job is answered exactly like an unknown id."""
        client, denied = self._client(request)
        if denied:
            return None, denied
        job = self.store.get(job_id, owner=client)
        if job is None or job.state == JobState.checking:
            return None, JSONResponse({"field": "id", "error": "id: no such job"}, status_code=404)
        return job, None

    @staticmethod
    def _retry_later(field: str, exc, status: int) -> JSONResponse:
        return JSONResponse({"field": field, "error": f"{field}: {exc}", "retry_after_s": exc.retry_after_s},
                            status_code=status, headers={"Retry-After": str(exc.retry_after_s)})

    # --- routes --------------------------------------------------------------------------------
    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness for anyone (load balancers, the client's wait): nothing about the jobs."""
        self._ensure_background()
        return {"status": "ok"}

    @fastapi_app.get("/v1/stats")
    async def stats(self, request: Request):
        """Jobs per state, the queue bound, the caller's share of it and its own pending jobs."""
        client, denied = self._client(request)
        if denied:
            return denied
        return {"jobs": self.store.counts(), "max_queue": self.store.max_pending,
                "max_queue_per_client": self.store.max_per_client, "mine": self.store.pending(client),
                "draining": self._draining}

    async def drain(self, grace_s: float) -> dict:
        """Stop taking jobs (submissions answer 503), give the running ones ``grace_s`` seconds to
        finish (recorded done as usual), then stop the rest and put them back as ``interrupted``
        without spending their attempt (:meth:`JobStore.interrupt`). Called by
        :meth:`ServiceHandle.stop` through a deployment handle. Returns the job ids of each kind."""
        self._draining = True
        running = set(self.store.ids(JobState.running))
        until = time.monotonic() + max(0.0, grace_s)
        while self.store.ids(JobState.running) and time.monotonic() < until:
            await asyncio.sleep(0.1)
        streams = list(self._streams.values())
        # dispatchers and the sweeper: no handler runs on a cancelled task. The list is emptied
        # before the await, so a health check meanwhile does not count them as ended by a fault.
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:  # bounded, so the drain returns even if a task does not stop on its cancellation
            _, stuck = await asyncio.wait([asyncio.gather(*tasks, return_exceptions=True)],
                                          timeout=DRAIN_TASKS_STOP_S)
            if stuck:
                log.warning("drain: background tasks did not stop within %.0f s of their cancellation",
                            DRAIN_TASKS_STOP_S)
        interrupted = [job_id for job_id in self.store.ids(JobState.running) if self.store.interrupt(job_id)]
        for stream in streams:
            stream.cancel()  # the worker stops its sampler after the current clip
        finished = [job_id for job_id in running if (job := self.store.get(job_id)) and job.state == JobState.done]
        log.info("drained: %d finished within %.0f s, %d interrupted", len(finished), grace_s, len(interrupted))
        return {"finished": sorted(finished), "interrupted": sorted(interrupted)}

    @fastapi_app.get("/", response_class=HTMLResponse)
    async def index(self) -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text())

    @fastapi_app.get("/openapi.json", include_in_schema=False)
    async def openapi(self):
        if not self.sc.docs:
            return JSONResponse({"error": "not found"}, status_code=404)
        return JSONResponse(fastapi_app.openapi())

    @fastapi_app.get("/docs", include_in_schema=False)
    async def docs(self):
        if not self.sc.docs:
            return JSONResponse({"error": "not found"}, status_code=404)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Loopy API")

    @fastapi_app.post("/v1/videos")
    async def submit(self, request: Request):
        self._ensure_background()
        client, denied = self._client(request)
        if denied:
            return denied
        denied = self._origin_denied(request)
        if denied:
            return denied
        if self._draining:
            return JSONResponse({"field": "service", "error": "service: stopping, not taking jobs",
                                 "retry_after_s": 30}, status_code=503, headers={"Retry-After": "30"})
        try:
            check_content_length(request.headers.get("content-length"), self.max_body_bytes)
        except UploadError as exc:
            return _error(exc)
        share = self.store.max_per_client
        if share is not None and self.store.pending(client) >= share:  # cheap early refusals, before the body
            return self._retry_later("queue", ClientShareFullError(self.store.pending(client), share, 5), 429)
        if self.store.pending() >= self.store.max_pending:
            return self._retry_later("queue", QueueFullError(self.store.pending(), 5), 429)
        job = None
        form = None
        try:
            form = await self._read_form(request)
            parsed = parse_form(form.multi_items(), self.default_options, self.max_upload_bytes)
            job = self.store.create(client, options_to_json(parsed.options), reserve_bytes=self.max_body_bytes)
            for key in ("image", "audio"):
                upload = parsed.files[key]
                check_size(upload.size, key, self.max_upload_bytes)
                await upload.seek(0)
                with open_private(job.file(f"upload_{key}")) as fh:
                    await asyncio.to_thread(shutil.copyfileobj, upload.file, fh)
            await form.close()
            form = None
            await asyncio.to_thread(self._check_inputs, job, parsed.options)
        except UploadError as exc:
            if job is not None:
                self.store.delete(job.id)
            return _error(exc)
        except QueueFullError as exc:
            return self._retry_later("queue", exc, 429)
        except DiskFullError as exc:
            return self._retry_later("storage", exc, 503)
        except Exception:
            if job is not None:
                self.store.delete(job.id)
            raise
        finally:
            if form is not None:
                await form.close()
        self.store.mark_queued(job.id)
        self._ensure_background().put_nowait(job.id)
        body = self.store.get(job.id).to_json(self.store.queue_position(job.id))
        body["status_url"] = f"/v1/videos/{job.id}"
        return JSONResponse(body, status_code=202, headers={"Location": f"/v1/videos/{job.id}"})

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
        if job.state != JobState.done or not job.file("video").is_file():
            return JSONResponse({"field": "id", "error": f"id: job is {job.state.value}, no video yet",
                                 "state": job.state.value}, status_code=409)
        return FileResponse(job.file("video"), media_type="video/mp4", filename=f"loopy-{job.id}.mp4")

    @fastapi_app.delete("/v1/videos/{job_id}")
    async def delete(self, job_id: str, request: Request):
        job, answer = self._find_job(job_id, request)
        if answer is not None:
            return answer
        denied = self._origin_denied(request)
        if denied:
            return denied
        stream = self._streams.get(job.id)
        await asyncio.to_thread(self.store.delete, job.id)
        if stream is not None:
            stream.cancel()  # the worker stops the sampler after its current clip
        return Response(status_code=204)


# --- building the application ----------------------------------------------------------------------

def worker_user_config(sc: ServeConfig) -> dict[str, Any]:
    """The worker deployment's Serve ``user_config``: which model, how often to follow its alias."""
    model = sc.model
    if not model.startswith(("models:/", "runs:/")):
        model = str(project_path(model))
    return {"model": model, "model_poll_s": sc.model_poll_s}


def build_app(cfg: PlatformConfig):
    """The Serve application for ``cfg`` (replicas, GPUs, CPUs and limits from ``cfg.serve``).
    Refuses a non-loopback ``serve.host`` without client tokens (checked here and in the ingress)."""
    sc = cfg.serve
    if not sc.model:
        raise ServeConfigError("serve.model is not set: give an MLflow model URI (models:/loopy/1, "
                               "models:/loopy@stage2) or a model package folder")
    require_auth_for(sc.host, load_tokens(sc.tokens_file))
    device = "cuda" if sc.gpus_per_replica > 0 else "cpu"
    worker = LoopyWorker.options(
        num_replicas=sc.num_replicas,
        ray_actor_options={"num_cpus": sc.cpus_per_replica, "num_gpus": sc.gpus_per_replica},
        user_config=worker_user_config(sc),
    ).bind(cfg.tracking.tracking_uri, device, sc.hang_grace_s, sc.fault_hang_seed)
    return LoopyIngress.options(
        max_ongoing_requests=sc.max_ongoing_requests, max_queued_requests=sc.max_queued_requests,
    ).bind(worker, cfg)


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


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (for Serve's proxy behind the front listener)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class ServiceHandle:
    """A running service: ``url`` (the front listener's), the ``front`` and the Serve app ``name``."""

    url: str
    front: FrontListener
    name: str
    proxy_port: int

    def drain(self, grace_s: float) -> dict:
        """Ask the ingress to drain (:meth:`LoopyIngress.drain`); returns its summary."""
        handle = serve.get_app_handle(self.name)
        return handle.drain.remote(grace_s).result(timeout_s=grace_s + 120)

    def stop(self, drain_s: Optional[float] = None) -> Optional[dict]:
        """Drain for ``drain_s`` seconds (None: no drain), then stop the front and Serve. The front
        keeps answering during the drain, so clients see 503 + Retry-After and can poll."""
        summary = None
        try:
            if drain_s is not None:
                summary = self.drain(drain_s)
        finally:
            self.front.stop()
            serve.shutdown()
        return summary


def start_service(cfg: PlatformConfig, name: str = "loopy") -> ServiceHandle:
    """Start Serve's proxy on ``127.0.0.1:serve.proxy_port`` (a free port when unset), the app, and
    the front listener (:mod:`serve.front`) on ``serve.host:serve.port``. Ray must be up
    (:func:`core.ray_runtime.init_ray`). Returns once the front listens (the app may still load)."""
    sc = cfg.serve
    application = build_app(cfg)
    proxy_port = sc.proxy_port or free_loopback_port()
    serve.start(http_options=http_options(sc, proxy_port))
    serve.run(application, name=name, route_prefix="/", blocking=False)
    front = FrontListener(sc.host, sc.port, ("127.0.0.1", proxy_port),
                          FrontLimits(sc.max_header_bytes, sc.max_headers, sc.header_timeout_s))
    try:
        front.start_in_thread()
    except BaseException:
        serve.shutdown()
        raise
    host = f"[{sc.host}]" if ":" in sc.host else sc.host
    return ServiceHandle(f"http://{host}:{sc.port}", front, name, proxy_port)


def run_service(cfg: PlatformConfig, blocking: bool = True, name: str = "loopy") -> str:
    """Start Ray (``cfg.ray``), the service (:func:`start_service`) and, when ``blocking``, serve
    until SIGINT / SIGTERM, then drain (``serve.drain_grace_s``) and shut Serve and Ray down. A
    second signal during the drain stops at once. Returns the base URL."""
    build_app(cfg)  # refuses bad settings before Ray starts
    init_ray(cfg.ray)
    service = start_service(cfg, name)
    if blocking:
        def stop(signum, frame):  # SIGINT / SIGTERM: drain, then shut Serve and Ray down
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)  # set after ray.init, which may install its own
        print(f"Loopy service at {service.url}/ (Ctrl-C to stop)", flush=True)
        try:
            try:
                while True:
                    time.sleep(1.0)  # short: a signal landing on a Ray thread is handled within 1 s
                    signal.signal(signal.SIGINT, stop)  # Ray's native code may re-take SIGINT
            except KeyboardInterrupt:
                grace = cfg.serve.drain_grace_s
                print(f"stopping the Loopy service: draining (up to {grace:g} s; signal again to stop now)",
                      flush=True)
                signal.signal(signal.SIGINT, stop)
                try:
                    summary = service.stop(drain_s=grace)
                except Exception as exc:  # noqa: BLE001 - e.g. the ingress is gone: stop anyway
                    log.exception("drain failed")
                    print(f"drain failed ({type(exc).__name__}); stopped without it", flush=True)
                else:
                    print(f"drained: {len(summary['finished'])} job(s) finished, {len(summary['interrupted'])} "
                          f"interrupted (they run again after the next start)", flush=True)
        except KeyboardInterrupt:
            print("stopped without waiting for running jobs", flush=True)
            service.front.stop()
            serve.shutdown()
        finally:
            ray.shutdown()
    return service.url


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the Loopy HTTP service (Ray Serve)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    run_service(load_platform_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
