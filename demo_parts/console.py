"""What the demo's console shows: ``[demo]`` lines and at most one progress bar at a time (tqdm),
moved by the jobs' own progress lines. Everything else the children print stays in their logs.

On a terminal a bar is tqdm's one updating line; on a pipe or in CI (stdout not a terminal) it
is :class:`LineBar`, tqdm printing a new plain line (never a carriage return) each time another
tenth of the total is done.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, TextIO

from tqdm import tqdm

from demo_parts.runner import plain

BAR_FORMAT = "{desc}: {n_fmt}/{total_fmt}{unit} |{bar}| {percentage:3.0f}% [{elapsed}<{remaining}]{postfix}"
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt}{unit} ({percentage:.0f}%){postfix}"


class LineBar(tqdm):
    """tqdm for a pipe or a log: each redraw is a new line (tqdm's own redraw is a carriage
    return over the last line, which a log keeps as one ever longer line). tqdm decides when to
    redraw: ``miniters`` (a tenth of the total) with ``mininterval=0``; ``maxinterval=inf`` keeps
    its monitor thread from lowering ``miniters`` to 1 on a slow step. Overriding ``display`` is
    tqdm's documented way to draw elsewhere."""

    def __init__(self, *args, every: float = 0.1, **kwargs):
        total = kwargs.get("total") or 1
        super().__init__(*args, miniters=max(1.0, every * total), mininterval=0, maxinterval=float("inf"),
                         bar_format=LINE_FORMAT, **kwargs)

    def display(self, msg=None, pos=None):
        if msg is not None:  # close() clearing the line: nothing to clear on a pipe
            return False
        if self.n > getattr(self, "_line_n", 0):  # a new line only when something moved
            self._line_n = self.n
            self.fp.write(f"{self}\n")
            self.fp.flush()
        return True


class Console:
    """``[demo] message`` lines on ``stream`` (stdout) and one progress bar at a time.

    ``tty``: draw bars as one updating line (tqdm) instead of plain lines at every tenth
    (default: whether ``stream`` is a terminal and ``TERM`` is not ``dumb``).
    """

    def __init__(self, stream: Optional[TextIO] = None, tty: Optional[bool] = None):
        self.stream = stream if stream is not None else sys.stdout
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"
        self.tty = tty
        self.bar: Optional[tqdm] = None
        self._lock = threading.Lock()

    def say(self, message: str) -> None:
        """One ``[demo] message`` line (above the bar, if one is drawn)."""
        with self._lock:
            if self.tty:  # tqdm clears its bar, writes the line, draws the bar again below it
                tqdm.write(f"[demo] {message}", file=self.stream)
            else:  # no bar line to clear (tqdm.write would write a carriage return for it)
                print(f"[demo] {message}", file=self.stream)
            self.stream.flush()

    def progress(self, label: str, total: int, unit: str) -> tqdm:
        """A new bar of ``total`` ``unit`` (the previous one, if any, is closed)."""
        self.close_bar()
        if self.tty:
            self.bar = tqdm(total=max(1, int(total)), desc=f"[demo] {label}", unit=f" {unit}", file=self.stream,
                            leave=False, dynamic_ncols=True, mininterval=0.5, bar_format=BAR_FORMAT)
        else:
            self.bar = LineBar(total=max(1, int(total)), desc=f"[demo]   {label}", unit=f" {unit}",
                               file=self.stream, leave=False)
        return self.bar

    def close_bar(self) -> None:
        """Show the bar's last state, then remove it (a terminal line is cleared; the caller
        prints the step's result)."""
        if self.bar is not None:
            self.bar.refresh()
            self.bar.close()
            self.bar = None


def advance(bar: Optional[tqdm], n: int, postfix: str = "") -> None:
    """Move ``bar`` forward to ``n`` done (never back, never past its total), ``postfix`` after it."""
    if bar is None or bar.disable:
        return
    n = min(int(n), int(bar.total))
    if postfix != (bar.postfix or ""):
        bar.set_postfix_str(postfix, refresh=False)
    if n > bar.n:
        bar.update(n - bar.n)


# --- what each step's output shows ---------------------------------------------------------------

class IngestOutput:
    """The ingest job's own ``[ingest]`` lines (pipelines/ingest.py): ``N videos to process``
    starts a bar, ``k/N done (r rejected): SOURCE: ...`` moves it, and every rejected video is
    shown with its reason."""

    TODO = re.compile(r"^\[ingest\] (\d+) videos to process")
    DONE = re.compile(r"^\[ingest\] (\d+)/(\d+) done \((\d+) rejected\)")
    REJECTED = re.compile(r"^\[ingest\]\s+rejected (.+)$")
    RESUMED = re.compile(r"^\[ingest\] resume: (.+)$")

    def __init__(self, console: Console):
        self.console = console
        self.bar: Optional[tqdm] = None

    def feed(self, line: str) -> None:
        line = plain(line)
        if m := self.DONE.match(line):
            if self.bar is None:
                self.bar = self.console.progress("ingest", int(m[2]), "videos")
            advance(self.bar, int(m[1]), f"{m[3]} rejected" if int(m[3]) else "")
        elif m := self.TODO.match(line):
            self.bar = self.console.progress("ingest", int(m[1]), "videos")
        elif m := self.REJECTED.match(line) or self.RESUMED.match(line):
            self.console.say(f"  ingest: {'rejected ' if 'rejected' in line else ''}{m[1]}")

    def close(self) -> None:
        if self.bar is not None and self.console.bar is self.bar:
            self.console.close_bar()


@dataclass
class StageLosses:
    """One training stage as its progress lines told it: the latest step, and the (step, loss)
    of the earliest and the latest step seen."""

    stage: int
    total: int
    step: int = 0
    first: Optional[tuple[int, float]] = None
    last: Optional[tuple[int, float]] = None
    done: bool = False

    def add(self, step: int, loss: float) -> None:
        self.step = max(self.step, step)
        if self.first is None or step < self.first[0]:
            self.first = (step, loss)
        if self.last is None or step >= self.last[0]:
            self.last = (step, loss)


class TrainOutput:
    """Training steps from train.py's output: a bar per stage, with the loss, and one line per
    stage at its end (steps, time, loss at the first and last step seen).

    A step is the line rank 0 of every training job prints (``training/loop.py``,
    ``PROGRESS_PREFIX``): ``[train] stage S step N/T loss L``, behind Ray's ``(RayTrainWorker
    pid=P)`` prefix. Nothing else of the child's output is read (Ray's own log lines change
    between versions); a late copy of a finished stage's line is ignored.
    """

    STEP = re.compile(r"\[train\] stage (\d+) step (\d+)/(\d+) loss (\S+)")

    def __init__(self, console: Console, stages: Sequence[int] = (1, 2), steps: int | Mapping[int, int] = 100):
        """``steps``: each stage's step count (one for all, or {stage: steps}); the job's own
        count in its progress lines wins."""
        self.console = console
        self.stages = list(stages)
        per_stage = steps if isinstance(steps, Mapping) else {s: steps for s in self.stages}
        self.progress = {s: StageLosses(s, int(per_stage[s])) for s in self.stages}
        self.index = 0  # position of the current stage in `stages`
        self.started_s = time.monotonic()
        self.bar: Optional[tqdm] = None
        self.lines: list[str] = []  # one per finished stage, as shown

    @property
    def current(self) -> Optional[StageLosses]:
        return self.progress[self.stages[self.index]] if self.index < len(self.stages) else None

    def start(self) -> None:
        """Show the current stage's bar (at 0 while Ray starts its workers)."""
        if (cur := self.current) is not None:
            self.started_s = time.monotonic()
            self.bar = self.console.progress(f"train stage {cur.stage}/{len(self.stages)}", cur.total, "steps")

    def _finish_current(self) -> None:
        cur = self.current
        cur.done = True
        self.console.close_bar()
        line = f"train stage {cur.stage}/{len(self.stages)}: {cur.step}/{cur.total} steps in " \
               f"{time.monotonic() - self.started_s:.0f} s"
        if cur.first and cur.last:
            line += f", loss {cur.first[1]:.4f} (step {cur.first[0]}) -> {cur.last[1]:.4f} (step {cur.last[0]})"
        self.lines.append(line)
        self.console.say(line)
        self.index += 1
        self.start()

    def feed(self, line: str) -> None:
        m = self.STEP.search(plain(line))
        if not m or int(m[1]) not in self.progress:
            return
        stage, step, total = int(m[1]), int(m[2]), int(m[3])
        try:
            loss = float(m[4])
        except ValueError:
            return
        prog = self.progress[stage]
        if prog.done:
            return  # a late line of a finished stage (another worker's copy of its last step)
        while self.current.stage != stage:  # a later stage began
            self._finish_current()
        if self.bar is None:  # the first line, when start() was not called
            self.start()
        if total != prog.total:  # the job's own count wins over the demo's setting
            prog.total = total
            if self.bar is not None:
                self.bar.total = total
        prog.add(step, loss)
        advance(self.bar, prog.step, f"loss {loss:.4f}")
        if prog.step >= prog.total:
            self._finish_current()

    def close(self) -> None:
        if self.current is not None and self.current.step > 0:
            self._finish_current()
        self.console.close_bar()


class JobProgress:
    """``on_update`` of :meth:`serve.client.VideoClient.wait`: a bar of the job's clips."""

    def __init__(self, console: Console):
        self.console = console
        self.bar: Optional[tqdm] = None

    def __call__(self, status: dict) -> None:
        total = status.get("clips_total") or 0
        if total and self.bar is None:
            self.bar = self.console.progress("generate", int(total), "clips")
        advance(self.bar, int(status.get("clips_done") or 0))

    def close(self) -> None:
        if self.bar is not None and self.console.bar is self.bar:
            self.console.close_bar()
