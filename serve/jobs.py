"""The service's job store: ids, states, progress and files of video-generation jobs.

* Job ids are server-made UUID4 strings; a client id is only ever *looked up* (after checking it
  is a well-formed UUID), never joined into a path.
* Every job owns one folder ``<root>/<uuid>/`` whose file names are fixed by the server
  (:data:`JOB_FILES`); uploads are written there under those names, whatever the client called
  them.
* The store is bounded: at most ``max_pending`` jobs queued or running at once; ``create`` raises
  :class:`QueueFullError` (with a ``Retry-After`` estimate in seconds) beyond that.
* Finished jobs are forgotten, and their folders removed, ``ttl_s`` seconds after they end.

Thread-safe (one lock); the ingress calls it from its event loop and from worker callbacks.
"""
from __future__ import annotations

import math
import shutil
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from serve.errors import ServeConfigError, ServeError

JOB_FILES = {"image": "portrait.img", "audio": "audio.bin", "video": "result.mp4"}
"""The only file names a job folder ever holds (server-chosen)."""


class JobState(str, Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


class QueueFullError(ServeError, RuntimeError):
    """The job queue is at its bound; retry after ``retry_after_s`` seconds."""

    def __init__(self, pending: int, retry_after_s: int):
        super().__init__(f"job queue is full ({pending} jobs pending); retry in {retry_after_s} s")
        self.pending = pending
        self.retry_after_s = retry_after_s


@dataclass
class Job:
    """One generation request. Progress counts generated clips of 12 frames."""

    id: str
    folder: Path
    options: dict[str, Any]
    state: JobState = JobState.queued
    created_s: float = field(default_factory=time.time)
    started_s: Optional[float] = None
    finished_s: Optional[float] = None
    clips_done: int = 0
    clips_total: int = 0
    num_frames: int = 0
    error: Optional[str] = None

    def file(self, kind: str) -> Path:
        """Path of this job's ``kind`` file (``image``, ``audio`` or ``video``)."""
        return self.folder / JOB_FILES[kind]

    @property
    def progress(self) -> float:
        """Fraction of clips done, 0..1 (1 once the job is done)."""
        if self.state == JobState.done:
            return 1.0
        return self.clips_done / self.clips_total if self.clips_total else 0.0

    def to_json(self, queue_position: Optional[int] = None) -> dict[str, Any]:
        out = {
            "id": self.id,
            "state": self.state.value,
            "progress": round(self.progress, 4),
            "clips_done": self.clips_done,
            "clips_total": self.clips_total,
            "num_frames": self.num_frames,
            "created_s": self.created_s,
            "started_s": self.started_s,
            "finished_s": self.finished_s,
            "options": self.options,
            "error": self.error,
        }
        if queue_position is not None:
            out["queue_position"] = queue_position
        if self.state == JobState.done:
            out["file"] = f"/v1/videos/{self.id}/file"
        return out


def parse_job_id(text: str) -> Optional[str]:
    """The canonical form of a UUID string, or None if ``text`` is not one."""
    try:
        return str(uuid.UUID(text))
    except (ValueError, AttributeError, TypeError):
        return None


class JobStore:
    """Bounded in-memory registry of jobs with their folders under ``root``."""

    def __init__(self, root: str | Path, max_pending: int, ttl_s: float = 3600.0):
        if max_pending < 1:
            raise ServeConfigError(f"serve.max_queue must be >= 1, got {max_pending}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_pending = max_pending
        self.ttl_s = ttl_s
        self._jobs: dict[str, Job] = {}
        self._queued: deque[str] = deque()
        self._lock = threading.Lock()
        self._durations: deque[float] = deque(maxlen=20)

    # --- creation and lookup -------------------------------------------------------------------
    def create(self, options: dict[str, Any]) -> Job:
        """Reserve a queue slot and a folder for a new job (state ``queued``).
        Raises :class:`QueueFullError` when ``max_pending`` jobs are queued or running."""
        self.evict_expired()
        with self._lock:
            pending = self._pending_locked()
            if pending >= self.max_pending:
                raise QueueFullError(pending, self._retry_after_locked(pending))
            job_id = str(uuid.uuid4())
            folder = self.root / job_id
            folder.mkdir(parents=True)
            job = Job(id=job_id, folder=folder, options=dict(options))
            self._jobs[job_id] = job
            self._queued.append(job_id)
            return job

    def get(self, job_id: str) -> Optional[Job]:
        """The job with this id, or None (unknown or malformed id)."""
        canonical = parse_job_id(job_id)
        if canonical is None:
            return None
        with self._lock:
            return self._jobs.get(canonical)

    def queue_position(self, job_id: str) -> Optional[int]:
        """0-based place among queued jobs, None when not queued."""
        with self._lock:
            try:
                return self._queued.index(job_id)
            except ValueError:
                return None

    def pending(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return self._pending_locked()

    def counts(self) -> dict[str, int]:
        with self._lock:
            out = {s.value: 0 for s in JobState}
            for job in self._jobs.values():
                out[job.state.value] += 1
            return out

    # --- state changes -------------------------------------------------------------------------
    def start(self, job_id: str) -> None:
        with self._lock:
            job = self._jobs[job_id]
            job.state = JobState.running
            job.started_s = time.time()
            if job_id in self._queued:
                self._queued.remove(job_id)

    def progress(self, job_id: str, clips_done: int, clips_total: int, num_frames: int = 0) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None:
                job.clips_done, job.clips_total = clips_done, clips_total
                if num_frames:
                    job.num_frames = num_frames

    def finish(self, job_id: str) -> None:
        """Mark done; the video must already be at ``job.file('video')``."""
        with self._lock:
            job = self._jobs[job_id]
            job.state = JobState.done
            job.finished_s = time.time()
            job.clips_done = job.clips_total
            if job.started_s is not None:
                self._durations.append(job.finished_s - job.started_s)

    def fail(self, job_id: str, error: str) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return
            job.state = JobState.failed
            job.error = error
            job.finished_s = time.time()
            if job_id in self._queued:
                self._queued.remove(job_id)

    def discard(self, job_id: str) -> None:
        """Forget a job that never entered the queue properly (rejected upload) and remove its folder."""
        with self._lock:
            job = self._jobs.pop(job_id, None)
            if job_id in self._queued:
                self._queued.remove(job_id)
        if job is not None:
            shutil.rmtree(job.folder, ignore_errors=True)

    def evict_expired(self, now: Optional[float] = None) -> int:
        """Remove finished jobs older than ``ttl_s`` (and their folders). Returns how many."""
        now = time.time() if now is None else now
        with self._lock:
            old = [j for j in self._jobs.values()
                   if j.finished_s is not None and now - j.finished_s > self.ttl_s]
            for job in old:
                del self._jobs[job.id]
        for job in old:
            shutil.rmtree(job.folder, ignore_errors=True)
        return len(old)

    # --- helpers -------------------------------------------------------------------------------
    def _pending_locked(self) -> int:
        return sum(1 for j in self._jobs.values() if j.state in (JobState.queued, JobState.running))

    def _retry_after_locked(self, pending: int) -> int:
        mean = sum(self._durations) / len(self._durations) if self._durations else 5.0
        return max(1, math.ceil(mean))
