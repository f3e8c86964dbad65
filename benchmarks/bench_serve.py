"""Service benchmark: 20 concurrent clients against the Serve app (tiny untrained model, CPU).

Every client POSTs a portrait + 1 s of audio (a 429 is retried after its ``Retry-After``) and
waits for its video, so a request is "lost" only if it is neither answered nor finished. While
the 20 jobs run, 4 pollers ask ``GET /v1/videos/{id}`` of the accepted jobs as fast as they are
answered (the job store is a SQLite database): reported as status polls per second and their p95
latency. A sampler of ``/healthz`` records the largest number of pending (queued + running)
jobs, which must never exceed ``serve.max_queue``. Also reported: POST latency while jobs run
(ingress responsiveness) and the total wall time. Runs on CPU with the tiny package; not a test.

``LOOPY_BENCH_QUICK=1``: 8 clients instead of 20.
"""
from __future__ import annotations

import io
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from serve.client import ClientError, RequestRejected, VideoClient

QUICK = os.environ.get("LOOPY_BENCH_QUICK", "0") not in ("0", "", "false")
CLIENTS = 8 if QUICK else 20
MAX_QUEUE = 12  # < CLIENTS: the queue bound and its 429s are exercised too
POLLERS = 4
BENCH = "serve"


def _row(metric, value, unit, target="", note=""):
    return {"benchmark": BENCH, "metric": metric, "value": value, "unit": unit, "target": target, "note": note}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run() -> list[dict]:
    from PIL import Image
    from skimage import data

    from core.config import load_platform_config
    from core.ray_runtime import init_ray
    from models.untrained_package import write_untrained_package
    from serve.app import start_service

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        tmp = Path(tmp)
        package = write_untrained_package(tmp / "package")
        buf = io.BytesIO()
        Image.fromarray(data.astronaut()[20:280, 80:380]).save(buf, "JPEG")
        image = buf.getvalue()
        subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", str(tmp / "a.wav"), "synth", "1.0", "sine",
                        "200-600", "tremolo", "5", "80"], check=True)
        audio = (tmp / "a.wav").read_bytes()
        port = _free_port()
        cfg = load_platform_config(None, [f"serve.model={package}", f"serve.job_dir={tmp / 'jobs'}",
                                          f"serve.max_queue={MAX_QUEUE}", "serve.cpus_per_replica=0",
                                          f"serve.port={port}", "sampler.steps=2"])
        init_ray(cfg.ray)
        service = start_service(cfg, name="loopy_bench")
        base = f"http://127.0.0.1:{port}"
        try:
            with VideoClient(base) as probe:
                probe.wait_healthy(180)
            return _load(base, image, audio)
        finally:
            service.stop()


def _load(base: str, image: bytes, audio: bytes) -> list[dict]:
    results: list[dict] = [dict() for _ in range(CLIENTS)]
    post_latency: list[float] = []
    poll_latency: list[float] = []
    accepted: list[str] = []
    stop = threading.Event()
    max_pending = [0]

    def status_poller(k: int) -> None:
        with VideoClient(base, timeout_s=30) as c:
            i = k
            while not stop.is_set():
                if not accepted:
                    time.sleep(0.05)
                    continue
                job = accepted[i % len(accepted)]
                i += 1
                t0 = time.perf_counter()
                try:
                    c.status(job)
                    poll_latency.append(time.perf_counter() - t0)
                except ClientError:
                    pass

    def poller() -> None:
        with VideoClient(base, timeout_s=30) as c:
            while not stop.is_set():
                try:
                    jobs = c.stats()["jobs"]
                    max_pending[0] = max(max_pending[0], jobs["queued"] + jobs["running"])
                except (ClientError, KeyError):
                    pass
                time.sleep(0.1)

    def client(i: int) -> None:
        r = results[i]
        r.update(answered=False, done=False, rejected=0)
        with VideoClient(base, timeout_s=300) as c, tempfile.TemporaryDirectory(prefix="bench_client_") as tmp:
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    job = c.submit(image, audio, {"seed": i})
                except RequestRejected as exc:
                    post_latency.append(time.perf_counter() - t0)
                    r["answered"] = True
                    if exc.status == 429:
                        r["rejected"] += 1
                        time.sleep(1.0 if exc.retry_after_s is None else exc.retry_after_s)
                        continue
                    r["error"] = str(exc)[:200]
                    return
                except ClientError as exc:
                    r["error"] = str(exc)[:200]
                    return
                post_latency.append(time.perf_counter() - t0)
                r["answered"] = True
                accepted.append(job)
                try:
                    c.wait(job, timeout_s=max(0.0, deadline - time.monotonic()), poll_s=0.3)
                    r["done"] = c.download(job, Path(tmp) / "video.mp4").stat().st_size > 0
                except ClientError as exc:  # JobFailed, JobTimeout, a refused download ...
                    r["error"] = str(exc)[:200]
                return

    poll = threading.Thread(target=poller, daemon=True)
    poll.start()
    pollers = [threading.Thread(target=status_poller, args=(k,), daemon=True) for k in range(POLLERS)]
    for t in pollers:
        t.start()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    poll.join(timeout=5)
    for t in pollers:
        t.join(timeout=5)
    answered = sum(r["answered"] for r in results)
    done = sum(r["done"] for r in results)
    rejected = sum(r["rejected"] for r in results)
    errors = [r["error"] for r in results if "error" in r]
    lat = sorted(post_latency)
    p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan")
    polls = sorted(poll_latency)
    poll_p95 = polls[min(len(polls) - 1, int(0.95 * len(polls)))] if polls else float("nan")
    note = f"{CLIENTS} concurrent clients, tiny model on CPU, 2 DDIM steps, 1 s audio, 1 worker replica"
    return [
        _row("requests answered", answered, f"of {CLIENTS}", f"{CLIENTS}", note),
        _row("videos finished and downloaded", done, f"of {CLIENTS}", f"{CLIENTS}",
             "none lost" if done == CLIENTS else f"lost {CLIENTS - done}; errors: {errors[:3]}"),
        _row("largest queue seen (queued + running)", max_pending[0], "jobs", f"<= {MAX_QUEUE}",
             "sampled from /healthz every 0.1 s"),
        _row("429 answers (retried after Retry-After)", rejected, "responses", "> 0 when clients > queue", ""),
        _row("status polls while the jobs run", len(polls) / wall if wall else float("nan"), "requests/s", "",
             f"{POLLERS} pollers, GET /v1/videos/{{id}} of accepted jobs, job store in SQLite"),
        _row("status poll latency p95 / median",
             f"{poll_p95:.4f} / {statistics.median(polls) if polls else float('nan'):.4f}", "s", "< 0.5",
             f"{len(polls)} polls"),
        _row("POST latency p95 / median", f"{p95:.3f} / {statistics.median(lat):.3f}", "s", "",
             "validation (decode, face detection) runs in the ingress while jobs run in the worker"),
        _row("wall time for all clients", wall, "s", "", note),
    ]
