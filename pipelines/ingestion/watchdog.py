"""Per-video deadlines for work that may hang inside C code (a decoder stuck in FFmpeg or dlib).

A Python thread cannot be stopped while it sits in a C call, and ``signal.alarm`` handlers only
run between bytecodes, so the one reliable way to bound a hung decoder is to run it in another
process and kill that process. Why a child process of the Ray actor, and not a Ray task with
``ray.cancel(force=True)``: the analysis runs in a Ray Data actor pool (the face detector is built
once per actor); force-cancelling is not available for actor tasks, and killing the actor would
look to Ray Data like a lost worker (retried, then an errored block, with no way to say which
video timed out). A child process kept by each actor costs one Python start per actor (and one
per timeout), keeps the detector warm across videos, and turns a hang into an ordinary result:
:class:`DeadlineExceeded` for that video, after which the next call gets a fresh child.

:class:`WatchedWorker` (parent side) starts ``python -m pipelines.ingestion.watchdog``, which builds one
object from a ``module:Class`` factory and then serves method calls. Messages on the pipes are
8-byte little-endian length + pickle. The child dies with its parent (``PR_SET_PDEATHSIG``), so a
killed actor leaves no hung decoder behind. A child that dies (killed by the kernel's OOM killer,
a segfault) raises :class:`WorkerDied` naming the signal: an infrastructure failure, not a bad
file.

A deadline is a :class:`WorkBudget`: seconds counted only while a call is in progress, less the time
the child was runnable but waiting for a CPU (Linux keeps that per thread: the second field of
``/proc/<pid>/task/<tid>/schedstat``, the run-queue wait in ns). Why not plain wall time: on a
loaded node (a training job beside the ingest, more actors than cores) a good video's analysis can
take several times its idle wall time, and a wall-clock deadline then records a good file as a bad
one (stage ``timeout``, kept on a rerun). A hang is still caught at the budget: a decoder blocked
in a read or a lock waits off the run queue, so its clock runs at wall speed; a decoder that spins
is charged for every slice it gets. Each sample takes, per interval, the largest run-queue wait of
any of the child's threads (threads run side by side: their waits overlap). The kernel adds a wait
to schedstat only when the thread gets a CPU again, so a wait can be reported in a later interval
than the one it filled and be longer than that interval: what exceeds an interval is given back in
the intervals that follow (an interval is never given back more than its own length). Where
schedstat is missing (not Linux) the clock is wall time during calls.
"""
from __future__ import annotations

import importlib
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Any, BinaryIO, Optional, Union

_HEADER = struct.Struct("<Q")


class DeadlineExceeded(TimeoutError):
    """The call ran past its deadline; the child was killed."""


class WorkerDied(RuntimeError):
    """The child process died during the call (``returncode`` < 0: killed by that signal)."""

    def __init__(self, message: str, returncode: Optional[int]):
        super().__init__(message)
        self.returncode = returncode


class RemoteError(RuntimeError):
    """The call raised in the child: ``type_name`` and the message of the original exception."""

    def __init__(self, type_name: str, message: str):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name


def _send(stream: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


POLL_S = 0.5  # how often a waiting parent samples its child's clock (a few /proc reads)


def thread_cpu_waits(pid: int) -> dict[int, int]:
    """Run-queue wait (ns) of each thread of process ``pid``: time runnable but not running,
    from ``/proc/<pid>/task/<tid>/schedstat``; {} where that is not available."""
    waits: dict[int, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return waits
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                waits[int(tid)] = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):  # the thread ended, or no schedstat
            continue
    return waits


class WorkBudget:
    """Seconds of work allowed to one piece of work in a watched child, over one or several calls
    (the decode stage spends one budget on all the chunks of a video). Counted only while a call
    is in progress (a parent that is slow to ask for the next chunk costs the video nothing),
    less the time the child waited for a CPU (module docstring). ``used_s`` / ``wall_s`` /
    ``starved_s``: seconds so far, charged / elapsed in calls / given back for CPU waits."""

    def __init__(self, budget_s: float):
        self.budget_s = float(budget_s)
        self.used_s = self.wall_s = self.starved_s = 0.0
        self._pid: Optional[int] = None
        self._t = 0.0
        self._waits: dict[int, int] = {}
        self._pending_s = 0.0  # wait reported but not yet given back (module docstring: reported late)

    def begin(self, pid: int) -> None:
        """A call to process ``pid`` starts: the clock runs from here."""
        self._pid, self._t, self._waits = pid, time.monotonic(), thread_cpu_waits(pid)
        self._pending_s = 0.0  # a wait reported after a call ended belongs to no call

    def tick(self) -> float:
        """Charge the interval since the last tick; seconds left (<= 0: spent)."""
        now = time.monotonic()
        waits = thread_cpu_waits(self._pid) if self._pid is not None else {}
        dt = now - self._t
        reported = max((w - self._waits.get(tid, 0) for tid, w in waits.items()), default=0) / 1e9
        self._pending_s += max(reported, 0.0)
        starved = min(self._pending_s, dt)
        self._pending_s -= starved
        self._t, self._waits = now, waits
        self.wall_s += dt
        self.starved_s += starved
        self.used_s += dt - starved
        return self.budget_s - self.used_s

    def describe(self) -> str:
        return (f"{self.used_s:.1f} s charged of {self.budget_s:.1f} s ({self.wall_s:.1f} s in calls, "
                f"{self.starved_s:.1f} s of it waiting for a CPU, not charged)")


def _read_exact(fd: int, n: int, budget: Optional[WorkBudget]) -> Optional[bytes]:
    """``n`` bytes from ``fd``; None at EOF; raises :class:`DeadlineExceeded` once ``budget``
    (begun by the caller) is spent (None = wait forever)."""
    parts, got = [], 0
    while got < n:
        timeout = None
        if budget is not None:
            left = budget.tick()
            if left <= 0:
                raise DeadlineExceeded("deadline passed")
            timeout = min(left, POLL_S)
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            continue
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def describe_exit(returncode: Optional[int]) -> str:
    """'killed by SIGKILL (out of memory?)' / 'exited with status 3' for a child's return code."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else str(-returncode)
        hint = " (the kernel's OOM killer sends this)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with status {returncode}"


class WatchedWorker:
    """One child process holding ``factory(**kwargs)`` (``factory`` = ``"module:Class"``); calls
    run there with a deadline. Not thread-safe (one call at a time, as in a Ray actor)."""

    def __init__(self, factory: str, kwargs: Optional[dict] = None, start_timeout_s: float = 600.0):
        self.factory, self.kwargs = factory, dict(kwargs or {})
        self.start_timeout_s = start_timeout_s
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0  # children started so far (1 + one per timeout / death)

    def start(self) -> None:
        """Start a child and wait until it has built its object (``start_timeout_s``): the
        start-up (imports, detector) never counts against a video's deadline. Raises
        :class:`WorkerDied` / :class:`RemoteError` when the child cannot start or build."""
        self.kill()
        self.proc = subprocess.Popen([sys.executable, "-m", "pipelines.ingestion.watchdog"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, close_fds=True)
        self.starts += 1
        _send(self.proc.stdin, (self.factory, self.kwargs))
        self._receive(WorkBudget(self.start_timeout_s), "starting")

    def ensure_started(self) -> None:
        """:meth:`start` a child when there is none or it has ended (after a timeout or a death);
        a stage calls it before a video's deadline starts, so start-up never counts against it."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def _receive(self, budget: Optional[WorkBudget], what: str) -> Any:
        if budget is not None:
            budget.begin(self.proc.pid)
        try:
            fd = self.proc.stdout.fileno()
            head = _read_exact(fd, _HEADER.size, budget)
            body = None if head is None else _read_exact(fd, _HEADER.unpack(head)[0], budget)
        except DeadlineExceeded:
            self.kill()
            raise DeadlineExceeded(f"{what}: no result within its budget: {budget.describe()}: "
                                   "the worker process was killed") from None
        finally:
            if budget is not None:
                budget.tick()  # the last interval counts too (a budget shared by several calls)
        if body is None:
            code = self.proc.wait()
            self.proc = None
            raise WorkerDied(f"the worker process {describe_exit(code)} while {what}", code)
        status, *payload = pickle.loads(body)
        if status == "ok":
            return payload[0]
        raise RemoteError(*payload)

    def call(self, method: str, *args: Any, deadline_s: Union[float, WorkBudget, None] = None) -> Any:
        """``getattr(obj, method)(*args)`` in the child (started first when there is none).
        ``deadline_s``: seconds for this call (a fresh :class:`WorkBudget`), a budget shared with
        other calls, or None (no limit). Raises :class:`DeadlineExceeded` (child killed) once the
        budget is spent, :class:`WorkerDied` when the child died, :class:`RemoteError` when the
        call raised."""
        self.ensure_started()
        budget = WorkBudget(deadline_s) if isinstance(deadline_s, (int, float)) else deadline_s
        try:
            _send(self.proc.stdin, (method, args))
        except BrokenPipeError:
            pass  # the child is gone: _receive reports how it ended
        return self._receive(budget, f"running {method}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        self.kill()

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            self.kill()
        except Exception:  # noqa: BLE001
            pass


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (a killed actor leaves no orphan)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):  # not Linux: the child still exits at EOF on stdin
        pass


def serve() -> None:
    """The child's loop: build the object, then answer calls until stdin closes."""
    _die_with_parent()
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything a library prints goes to stderr, never into the channel
    sys.stdout = sys.stderr
    fd = sys.stdin.fileno()

    def receive() -> Optional[Any]:
        head = _read_exact(fd, _HEADER.size, None)
        if head is None:
            return None
        return pickle.loads(_read_exact(fd, _HEADER.unpack(head)[0], None))

    factory, kwargs = receive()
    module, _, name = factory.partition(":")
    try:
        obj = getattr(importlib.import_module(module), name)(**kwargs)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which then stops this child
        _send(channel, ("error", type(exc).__name__, str(exc)))
        return
    _send(channel, ("ok", "ready"))
    while True:
        request = receive()
        if request is None:
            return
        method, args = request
        try:
            _send(channel, ("ok", getattr(obj, method)(*args)))
        except Exception as exc:  # noqa: BLE001 - the parent decides what the error means
            _send(channel, ("error", type(exc).__name__, str(exc)))


if __name__ == "__main__":
    serve()
