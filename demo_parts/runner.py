"""Running the demo's steps as child processes: all of a child's output goes to its log file
(``WORK/logs/<step>.log``); a reader (:mod:`demo_parts.console`) sees each line to show progress.

Hand-written on :mod:`subprocess` because the demo needs three things together that no library
call gives: every line teed to the log as it comes (a long job's log is readable while it runs),
each line handed to a progress reader, and the child's whole process group stopped on a timeout
or Ctrl-C (Ray and Serve start grandchildren).
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from core.paths import PROJECT_ROOT

TAIL_LINES = 15  # of a failing step's log, in its error message
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain(line: str) -> str:
    """``line`` without terminal colour codes (Ray colours its ``(Actor pid=N)`` prefixes)."""
    return ANSI_ESCAPE.sub("", line).rstrip()


class StepError(RuntimeError):
    """A demo step failed; ``step`` names it, ``detail`` says why, ``log`` is its log file (if any)."""

    def __init__(self, step: str, message: str, log: Optional[Path] = None):
        super().__init__(f"demo failed at step '{step}': {message}" + (f" (log: {log})" if log else ""))
        self.step = step
        self.detail = message
        self.log = log


def child_env() -> dict[str, str]:
    """Environment of every child: offline, Ray local with its temp dir in the work tree."""
    env = dict(os.environ)
    env.update({
        "RAY_TMPDIR": env.get("RAY_TMPDIR", str(PROJECT_ROOT / ".ray_tmp")),
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        # the children's output goes to log files: Ray Data's redrawn progress bars are noise there
        "RAY_DATA_DISABLE_PROGRESS_BARS": env.get("RAY_DATA_DISABLE_PROGRESS_BARS", "1"),
        # every progress line of a job reaches its log as printed (Ray would batch repeated
        # patterns for up to 5 s and print a count instead of the lines)
        "RAY_DEDUP_LOGS": "0",
    })
    env.pop("RAY_ADDRESS", None)  # the demo never joins a cluster
    Path(env["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it). Here, not serve.app's
    ``free_loopback_port``: importing serve.app loads Ray Serve and FastAPI into the demo."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _pump(stream, log, tail: deque, on_line: Callable[[str], None]) -> None:
    for line in iter(stream.readline, ""):
        log.write(line)
        log.flush()
        tail.append(line.rstrip())
        try:
            on_line(line)
        except Exception as exc:  # noqa: BLE001 - a display problem must not stop the step
            log.write(f"[demo] could not show this line: {type(exc).__name__}: {exc}\n")
    stream.close()


def run_step(step: str, cmd: Sequence[str], log_path: Path, timeout_s: float, env: Optional[dict] = None,
             output=None) -> float:
    """Run one step's command with all its output in ``log_path``; ``output`` (an object with
    ``feed(line)`` and ``close()``, default: show nothing) gets each line to show progress.
    Returns the seconds it took. Raises :class:`StepError` naming the step on a non-zero exit, a
    timeout (``timeout_s``, seconds) or a missing program; its message ends with the last lines
    of the log (terminal colour codes removed)."""
    feed = output.feed if output is not None else (lambda line: None)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    t0 = time.monotonic()
    try:
        with log_path.open("w") as log:
            log.write(f"[demo] step {step}: {' '.join(cmd)}\n")
            log.flush()
            try:
                proc = subprocess.Popen(list(cmd), cwd=PROJECT_ROOT, env=env or child_env(), text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                raise StepError(step, f"cannot start {cmd[0]}: {exc}", log_path) from exc
            pump = threading.Thread(target=_pump, args=(proc.stdout, log, tail, feed), daemon=True)
            pump.start()
            try:
                code = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise StepError(step, f"no result after {timeout_s:.0f} s", log_path) from None
            finally:
                stop_process(proc)  # a timeout or Ctrl-C: the whole group; after an exit: nothing left
                pump.join(timeout=10)
    finally:
        if output is not None:
            output.close()
    if code != 0:
        last = "\n    ".join(plain(line) for line in tail)
        raise StepError(step, f"exit status {code}; last lines:\n    {last}", log_path)
    return time.monotonic() - t0


def stop_process(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a child started in its own session: SIGINT to its group, then SIGTERM, then SIGKILL
    (``grace_s`` seconds for the SIGINT)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def background(step: str, cmd: Sequence[str], log_path: Path, env: Optional[dict] = None
               ) -> Iterator[subprocess.Popen]:
    """A long-running child (the service) with all its output in ``log_path``, stopped (its
    whole process group) when the block ends. :class:`StepError` of ``step`` inside the block
    points at ``log_path`` when it names no log of its own (the server side of an error is there)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        log.write(f"[demo] step {step}: {' '.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.Popen(list(cmd), cwd=PROJECT_ROOT, env=env or child_env(), stdout=log,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
        except OSError as exc:
            raise StepError(step, f"cannot start {cmd[0]}: {exc}", log_path) from exc
        try:
            yield proc
        except StepError as exc:
            if exc.log is None:
                raise StepError(exc.step, exc.detail, log_path) from exc
            raise
        finally:
            stop_process(proc)
