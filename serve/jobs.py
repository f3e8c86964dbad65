"""The service's job store: jobs in a database (SQLAlchemy), their files in one folder each.

* The database is any SQLAlchemy URL: a SQLite file under the job folder by default (laptop,
  tests), PostgreSQL on the cluster (the server MLflow uses). Jobs therefore survive a restart or
  an upgrade of the ingress: :meth:`JobStore.recover` runs on start and re-queues every job whose
  checked inputs are on disk (a job interrupted while running counts one attempt), fails the rest,
  and removes folders no job owns.
* Job ids are server-made UUID4 strings; a client id is only ever *looked up* (after checking it
  is a well-formed UUID), never joined into a path. Each job has an ``owner`` (the client id that
  created it): a lookup by another client finds nothing, exactly like an unknown id.
* Every job owns one folder ``<root>/<uuid>/`` whose file names are fixed by the server
  (:data:`JOB_FILES`): the raw uploads (deleted once checked), the checked inputs (a re-encoded PNG
  and 16 kHz PCM WAV; deleted when the job ends) and the result.
* Bounds: at most ``max_pending`` jobs checking, queued or running (:class:`QueueFullError`), of
  them at most ``max_per_client`` of one client (:class:`ClientShareFullError`: one client cannot
  take the whole queue while others still get in);
  at most ``max_disk_bytes`` recorded on disk (:class:`DiskFullError`); finished jobs and their
  folders are removed ``ttl_s`` seconds after they end (:meth:`JobStore.sweep`, on a timer).
* Privacy on disk: the job root and every job folder are ``0700``, every file the service writes
  there (:func:`write_private`, :func:`open_private`) and a SQLite database are ``0600``.
* A stop of the service (:meth:`JobStore.interrupt`) puts a running job back as ``interrupted``
  without spending its attempt; :meth:`JobStore.recover` queues it again on the next start.

Thread-safe (one lock around every statement); the ingress calls it from its event loop and threads.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import sqlalchemy as sa

from serve.errors import ServeConfigError, ServeError

JOB_FILES = {
    "upload_image": "upload_image.bin",  # the client's bytes, only until checked
    "upload_audio": "upload_audio.bin",
    "image": "portrait.png",  # the checked image, re-encoded by the service
    "audio": "audio.wav",  # the checked audio: 16 kHz mono PCM written by the service
    "face": "face.json",  # the face the check found: 68 landmarks in portrait pixels (no second search)
    "video": "result.mp4",
}
"""The only file names a job folder ever holds (server-chosen)."""
INPUT_FILES = ("upload_image", "upload_audio", "image", "audio", "face")


class JobState(str, Enum):
    checking = "checking"  # uploads being checked; never visible to a client
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"
    interrupted = "interrupted"  # stopped by a service stop; queued again (same attempt) on restart


ACTIVE = (JobState.checking, JobState.queued, JobState.running, JobState.interrupted)


class QueueFullError(ServeError, RuntimeError):
    """The job queue is at its bound; retry after ``retry_after_s`` seconds."""

    def __init__(self, pending: int, retry_after_s: int):
        super().__init__(f"job queue is full ({pending} jobs pending); retry in {retry_after_s} s")
        self.pending = pending
        self.retry_after_s = retry_after_s


class ClientShareFullError(QueueFullError):
    """One client holds its whole share of the queue (``serve.max_queue_per_client``)."""

    def __init__(self, mine: int, share: int, retry_after_s: int):
        RuntimeError.__init__(self, f"you have {mine} jobs pending, your share of the queue is {share}; "
                                    f"retry in {retry_after_s} s")
        self.pending = mine
        self.retry_after_s = retry_after_s


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the service user only (0600, whatever the umask)."""
    with open_private(path) as fh:
        fh.write(data)


def open_private(path: Path):
    """``path`` opened for binary writing (created or truncated), mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    return os.fdopen(fd, "wb")


class DiskFullError(ServeError, RuntimeError):
    """The job folder holds ``serve.max_disk_mb``; retry after ``retry_after_s`` seconds."""

    def __init__(self, used_bytes: int, cap_bytes: int, retry_after_s: int):
        super().__init__(f"the service's job storage is full ({used_bytes // 2**20} of {cap_bytes // 2**20} MB); "
                         f"retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


metadata = sa.MetaData()
jobs_table = sa.Table(
    "loopy_jobs", metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("owner", sa.String(200), nullable=False, index=True),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("options", sa.Text, nullable=False),  # JSON
    sa.Column("created_s", sa.Float, nullable=False),
    sa.Column("started_s", sa.Float),
    sa.Column("finished_s", sa.Float),
    sa.Column("deadline_s", sa.Float),  # wall clock (epoch seconds) a running job must end by
    sa.Column("clips_done", sa.Integer, nullable=False, default=0),
    sa.Column("clips_total", sa.Integer, nullable=False, default=0),
    sa.Column("num_frames", sa.Integer, nullable=False, default=0),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("bytes", sa.BigInteger, nullable=False, default=0),  # on disk (or reserved) now
    sa.Column("model_version", sa.String(200)),
    sa.Column("error", sa.Text),
)


@dataclass
class Job:
    """One generation request (a row of ``loopy_jobs``). Progress counts generated clips of 12 frames."""

    id: str
    owner: str
    folder: Path
    options: dict[str, Any]
    state: JobState
    created_s: float
    started_s: Optional[float] = None
    finished_s: Optional[float] = None
    deadline_s: Optional[float] = None
    clips_done: int = 0
    clips_total: int = 0
    num_frames: int = 0
    attempts: int = 0
    bytes: int = 0
    model_version: Optional[str] = None
    error: Optional[str] = None

    def file(self, kind: str) -> Path:
        """Path of this job's ``kind`` file (a key of :data:`JOB_FILES`)."""
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
            "deadline_s": self.deadline_s,
            "options": self.options,
            "model_version": self.model_version,
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


def default_db_url(root: Path) -> str:
    return f"sqlite:///{(Path(root) / 'jobs.sqlite').resolve()}"


def folder_bytes(folder: Path) -> int:
    """Bytes of the files directly in ``folder`` (0 if it does not exist)."""
    try:
        return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    except FileNotFoundError:
        return 0


class JobStore:
    """Jobs in the database at ``db_url`` (None: SQLite under ``root``), files under ``root``."""

    def __init__(self, root: str | Path, max_pending: int, ttl_s: float = 3600.0,
                 db_url: Optional[str] = None, max_disk_bytes: Optional[int] = None, max_attempts: int = 2,
                 max_per_client: Optional[int] = None):
        if max_pending < 1:
            raise ServeConfigError(f"serve.max_queue must be >= 1, got {max_pending}")
        if max_per_client is not None and max_per_client < 1:
            raise ServeConfigError(f"serve.max_queue_per_client must be >= 1, got {max_per_client}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        self.max_pending = max_pending
        self.max_per_client = max_per_client
        self.ttl_s = ttl_s
        self.max_disk_bytes = max_disk_bytes
        self.max_attempts = max(1, max_attempts)
        url = db_url or default_db_url(self.root)
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True  # a restarted database server is reconnected to
        self.engine = sa.create_engine(url, **kwargs)
        metadata.create_all(self.engine)
        if url == default_db_url(self.root):
            os.chmod(self.root / "jobs.sqlite", 0o600)
        self._lock = threading.Lock()
        self._durations: deque[float] = deque(maxlen=20)

    # --- rows <-> jobs ---------------------------------------------------------------------------
    def _job(self, row) -> Job:
        m = row._mapping
        return Job(id=m["id"], owner=m["owner"], folder=self.root / m["id"], options=json.loads(m["options"]),
                   state=JobState(m["state"]), created_s=m["created_s"], started_s=m["started_s"],
                   finished_s=m["finished_s"], deadline_s=m["deadline_s"], clips_done=m["clips_done"],
                   clips_total=m["clips_total"], num_frames=m["num_frames"], attempts=m["attempts"],
                   bytes=m["bytes"], model_version=m["model_version"], error=m["error"])

    def _update(self, job_id: str, where=None, **values) -> int:
        stmt = sa.update(jobs_table).where(jobs_table.c.id == job_id)
        if where is not None:
            stmt = stmt.where(where)
        with self._lock, self.engine.begin() as conn:
            return conn.execute(stmt.values(**values)).rowcount

    # --- creation and lookup -------------------------------------------------------------------
    def create(self, owner: str, options: dict[str, Any], reserve_bytes: int = 0) -> Job:
        """Reserve a queue slot, ``reserve_bytes`` of disk and a folder for a new job (state
        ``checking``). Raises :class:`QueueFullError` (:class:`ClientShareFullError` for ``owner``'s
        share) / :class:`DiskFullError` at the bounds."""
        now = time.time()
        job_id = str(uuid.uuid4())
        with self._lock, self.engine.begin() as conn:
            pending = self._pending(conn)
            if self.max_per_client is not None:
                mine = self._pending(conn, owner)
                if mine >= self.max_per_client:
                    raise ClientShareFullError(mine, self.max_per_client, self._retry_after(pending))
            if pending >= self.max_pending:
                raise QueueFullError(pending, self._retry_after(pending))
            if self.max_disk_bytes is not None:
                used = self._used_bytes(conn)
                if used + reserve_bytes > self.max_disk_bytes:
                    raise DiskFullError(used, self.max_disk_bytes, self._retry_after(pending))
            conn.execute(sa.insert(jobs_table).values(
                id=job_id, owner=owner, state=JobState.checking.value, options=json.dumps(options),
                created_s=now, clips_done=0, clips_total=0, num_frames=0, attempts=0, bytes=reserve_bytes))
        folder = self.root / job_id  # the row exists first: a folder without a row is an orphan
        folder.mkdir(exist_ok=False, mode=0o700)
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask; the service's folders are its own
        return Job(id=job_id, owner=owner, folder=folder, options=options, state=JobState.checking,
                   created_s=now, bytes=reserve_bytes)

    def get(self, job_id: str, owner: Optional[str] = None) -> Optional[Job]:
        """The job with id ``job_id`` (any spelling of the UUID) owned by ``owner`` (None: any
        owner); None if the id is malformed, unknown, another client's, or still being checked."""
        canonical = parse_job_id(job_id)
        if canonical is None:
            return None
        with self._lock, self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs_table).where(jobs_table.c.id == canonical)).first()
        if row is None:
            return None
        job = self._job(row)
        if owner is not None and job.owner != owner:
            return None
        return job

    def queue_position(self, job_id: str) -> Optional[int]:
        """0-based position among queued jobs (oldest first), or None when not queued."""
        with self._lock, self.engine.connect() as conn:
            row = conn.execute(sa.select(jobs_table.c.state, jobs_table.c.created_s)
                               .where(jobs_table.c.id == job_id)).first()
            if row is None or row.state != JobState.queued.value:
                return None
            return conn.execute(sa.select(sa.func.count()).select_from(jobs_table).where(
                jobs_table.c.state == JobState.queued.value, jobs_table.c.created_s < row.created_s)).scalar_one()

    def pending(self, owner: Optional[str] = None) -> int:
        """Jobs checking, queued or running (of ``owner`` only, when given)."""
        with self._lock, self.engine.connect() as conn:
            return self._pending(conn, owner)

    def used_bytes(self) -> int:
        with self._lock, self.engine.connect() as conn:
            return self._used_bytes(conn)

    def counts(self) -> dict[str, int]:
        """Jobs per visible state (``checking`` and ``interrupted`` count as ``queued``)."""
        with self._lock, self.engine.connect() as conn:
            rows = conn.execute(sa.select(jobs_table.c.state, sa.func.count()).group_by(jobs_table.c.state)).all()
        hidden = (JobState.checking.value, JobState.interrupted.value)
        out = {s.value: 0 for s in JobState if s.value not in hidden}
        for state, n in rows:
            out["queued" if state in hidden else state] += n
        return out

    def ids(self, *states: JobState) -> list[str]:
        """Ids of the jobs in ``states`` (oldest first)."""
        with self._lock, self.engine.connect() as conn:
            return list(conn.execute(sa.select(jobs_table.c.id).where(
                jobs_table.c.state.in_([s.value for s in states])).order_by(jobs_table.c.created_s)).scalars())

    # --- state changes -------------------------------------------------------------------------
    def mark_queued(self, job_id: str) -> None:
        """A checked job enters the queue; its recorded bytes become what is on disk."""
        self._update(job_id, jobs_table.c.state == JobState.checking.value, state=JobState.queued.value,
                     bytes=folder_bytes(self.root / job_id))

    def set_frames(self, job_id: str, num_frames: int, clips_total: int) -> None:
        self._update(job_id, num_frames=num_frames, clips_total=clips_total)

    def start(self, job_id: str, deadline_s: float) -> bool:
        """``queued`` -> ``running`` with a deadline; counts an attempt. False if the job is no
        longer queued (deleted meanwhile)."""
        with self._lock, self.engine.begin() as conn:
            return conn.execute(sa.update(jobs_table).where(
                jobs_table.c.id == job_id, jobs_table.c.state == JobState.queued.value).values(
                state=JobState.running.value, started_s=time.time(), deadline_s=deadline_s,
                attempts=jobs_table.c.attempts + 1, clips_done=0)).rowcount == 1

    def progress(self, job_id: str, clips_done: int, clips_total: int, num_frames: int = 0,
                 model_version: Optional[str] = None) -> None:
        values: dict[str, Any] = {"clips_done": clips_done, "clips_total": clips_total}
        if num_frames:
            values["num_frames"] = num_frames
        if model_version:
            values["model_version"] = model_version
        self._update(job_id, jobs_table.c.state == JobState.running.value, **values)

    def finish(self, job_id: str) -> bool:
        """Mark done (the video must already be at ``file('video')``) and delete the inputs.
        False if the job was deleted or failed meanwhile."""
        now = time.time()
        with self._lock, self.engine.begin() as conn:
            row = conn.execute(sa.select(jobs_table.c.started_s, jobs_table.c.clips_total)
                               .where(jobs_table.c.id == job_id, jobs_table.c.state == JobState.running.value)).first()
            if row is None:
                return False
            conn.execute(sa.update(jobs_table).where(jobs_table.c.id == job_id).values(
                state=JobState.done.value, finished_s=now, clips_done=row.clips_total))
            if row.started_s is not None:
                self._durations.append(now - row.started_s)
        self._remove_inputs(job_id)
        return True

    def fail(self, job_id: str, error: str) -> bool:
        """Mark an active job failed with ``error`` (shown to the client: no server paths) and
        delete its inputs. False if the job is not active (already ended or deleted)."""
        with self._lock, self.engine.begin() as conn:
            n = conn.execute(sa.update(jobs_table).where(
                jobs_table.c.id == job_id, jobs_table.c.state.in_([s.value for s in ACTIVE])).values(
                state=JobState.failed.value, error=error[:500], finished_s=time.time())).rowcount
        self._remove_inputs(job_id)
        return n == 1

    def requeue(self, job_id: str) -> bool:
        """``running`` -> ``queued`` (its worker was lost); False when it has no attempt left or
        its inputs are gone (the caller then fails it)."""
        job = self.get(job_id)
        if job is None or job.attempts >= self.max_attempts or not self._inputs_ready(job):
            return False
        return self._update(job_id, jobs_table.c.state == JobState.running.value, state=JobState.queued.value,
                            started_s=None, deadline_s=None, clips_done=0) == 1

    def interrupt(self, job_id: str) -> bool:
        """``running`` -> ``interrupted`` (the service is stopping): the attempt it was on is given
        back, so a stop never uses up a job's attempts; :meth:`recover` queues it again. False if
        the job is not running."""
        return self._update(job_id, jobs_table.c.state == JobState.running.value, state=JobState.interrupted.value,
                            started_s=None, deadline_s=None, clips_done=0,
                            attempts=sa.case((jobs_table.c.attempts > 0, jobs_table.c.attempts - 1), else_=0)) == 1

    def delete(self, job_id: str) -> None:
        """Forget a job and remove its folder (client DELETE, rejected upload, expiry)."""
        with self._lock, self.engine.begin() as conn:
            conn.execute(sa.delete(jobs_table).where(jobs_table.c.id == job_id))
        shutil.rmtree(self.root / job_id, ignore_errors=True)

    discard = delete

    # --- start-up and the timer ------------------------------------------------------------------
    def recover(self) -> list[str]:
        """After a restart: drop jobs whose uploads were being checked (the client never got their
        id), re-queue queued and interrupted running jobs whose checked inputs are on disk and
        that have an attempt left, fail the others, remove orphan folders. Returns the ids to
        dispatch (oldest first)."""
        for job_id in self.ids(JobState.checking):
            self.delete(job_id)
        for job_id in self.ids(JobState.interrupted):  # stopped by a drain: its attempt was given back
            self._update(job_id, jobs_table.c.state == JobState.interrupted.value, state=JobState.queued.value)
        for job_id in self.ids(JobState.running):
            if not self.requeue(job_id):
                self.fail(job_id, "interrupted by a service restart")
        ready = []
        for job_id in self.ids(JobState.queued):
            job = self.get(job_id)
            if job is not None and self._inputs_ready(job):
                ready.append(job_id)
            else:
                self.fail(job_id, "its inputs were lost in a service restart")
        self.remove_orphans()
        return ready

    def sweep(self, now: Optional[float] = None) -> int:
        """Remove finished jobs older than ``ttl_s`` and orphan folders. Returns the jobs removed."""
        now = time.time() if now is None else now
        with self._lock, self.engine.connect() as conn:
            old = list(conn.execute(sa.select(jobs_table.c.id).where(
                jobs_table.c.finished_s.is_not(None), jobs_table.c.finished_s < now - self.ttl_s)).scalars())
        for job_id in old:
            self.delete(job_id)
        self.remove_orphans()
        return len(old)

    evict_expired = sweep

    def remove_orphans(self) -> int:
        """Remove folders under ``root`` that no job row owns. Returns how many."""
        with self._lock, self.engine.connect() as conn:
            known = set(conn.execute(sa.select(jobs_table.c.id)).scalars())
        removed = 0
        for path in self.root.iterdir():
            if path.is_dir() and parse_job_id(path.name) == path.name and path.name not in known:
                # re-check under the lock: create() inserts the row before making the folder
                if self.get(path.name) is None:
                    shutil.rmtree(path, ignore_errors=True)
                    removed += 1
        return removed

    # --- helpers -------------------------------------------------------------------------------
    def _inputs_ready(self, job: Job) -> bool:
        return job.file("image").is_file() and job.file("audio").is_file()

    def _remove_inputs(self, job_id: str) -> None:
        folder = self.root / job_id
        for kind in INPUT_FILES:
            (folder / JOB_FILES[kind]).unlink(missing_ok=True)
        with self._lock, self.engine.begin() as conn:
            conn.execute(sa.update(jobs_table).where(jobs_table.c.id == job_id).values(bytes=folder_bytes(folder)))

    def _pending(self, conn, owner: Optional[str] = None) -> int:
        stmt = sa.select(sa.func.count()).select_from(jobs_table).where(
            jobs_table.c.state.in_([s.value for s in ACTIVE]))
        if owner is not None:
            stmt = stmt.where(jobs_table.c.owner == owner)
        return conn.execute(stmt).scalar_one()

    def _used_bytes(self, conn) -> int:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(jobs_table.c.bytes), 0))).scalar_one())

    def _retry_after(self, pending: int) -> int:
        mean = sum(self._durations) / len(self._durations) if self._durations else 5.0
        return max(1, math.ceil(mean))
