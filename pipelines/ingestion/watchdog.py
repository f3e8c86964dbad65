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
from typing import Any, BinaryIO, Optional

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


def _read_exact(fd: int, n: int, deadline: Optional[float]) -> Optional[bytes]:
    """``n`` bytes from ``fd``; None at EOF; raises :class:`DeadlineExceeded` past ``deadline``
    (``time.monotonic()`` value, None = wait forever)."""
    parts, got = [], 0
    while got < n:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise DeadlineExceeded("deadline passed")
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
        self._receive(self.start_timeout_s, "starting")

    def ensure_started(self) -> None:
        """:meth:`start` a child when there is none or it has ended (after a timeout or a death);
        a stage calls it before a video's deadline starts, so start-up never counts against it."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def _receive(self, deadline_s: Optional[float], what: str) -> Any:
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        try:
            fd = self.proc.stdout.fileno()
            head = _read_exact(fd, _HEADER.size, deadline)
            body = None if head is None else _read_exact(fd, _HEADER.unpack(head)[0], deadline)
        except DeadlineExceeded:
            self.kill()
            raise DeadlineExceeded(f"{what}: no result after {deadline_s:.1f} s: the worker process was killed") from None
        if body is None:
            code = self.proc.wait()
            self.proc = None
            raise WorkerDied(f"the worker process {describe_exit(code)} while {what}", code)
        status, *payload = pickle.loads(body)
        if status == "ok":
            return payload[0]
        raise RemoteError(*payload)

    def call(self, method: str, *args: Any, deadline_s: Optional[float] = None) -> Any:
        """``getattr(obj, method)(*args)`` in the child (started first when there is none).
        Raises :class:`DeadlineExceeded` (child killed) after ``deadline_s`` seconds,
        :class:`WorkerDied` when the child died, :class:`RemoteError` when the call raised."""
        self.ensure_started()
        try:
            _send(self.proc.stdin, (method, args))
        except BrokenPipeError:
            pass  # the child is gone: _receive reports how it ended
        return self._receive(deadline_s, f"running {method}")

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
