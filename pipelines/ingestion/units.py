"""Work units of the ingest: time ranges of a source, not files.

A source longer than ``1.5 x ingest.unit_s`` is split into ranges of about ``unit_s`` seconds
(:func:`plan_ranges`; the last range takes the remainder), and each range goes through the whole
pipeline as its own Ray Data row (analysis, audio features, full-resolution decode, VAE, write),
so the ranges of one 2-hour video run on every worker of the cluster at once. Inside a range the
cut detector splits the frames into shots (``pipelines/media/cuts.py``) and each usable shot is its
own sample.

Ranges are planned from the probe alone (fixed lengths), before any frame is decoded. Each
boundary is then moved to a cut where there is one: the two ranges that share a nominal boundary
``b`` each decode the same window of frames, ``b +- BOUNDARY_SEARCH_S``, the same way (PyAV, seeked
to the same frame, thumbnails at ``BOUNDARY_SIDE`` px), run the cut detector on it and take the
transition nearest ``b`` (:func:`snap_boundary`): both get the same answer without talking to
each other, so the first range ends where the cut begins and the second starts where it ends
(a dissolve's frames belong to neither). With no cut in the window the boundary stays at ``b``
and splits that shot into two samples.

Units are output frames at ``ingest.fps``, counted from the file's first frame; a range is
``[start, end)``. An input-list row with a time range (a clip) is planned the same way over its
part of the file (:func:`clip_frames`); the clip's own edges stay where the row puts them. Ids: a range is ``<source_id>_r<start>_<end>`` (:func:`range_id`), a sample
``<source_id>_<start>_<end>`` (:func:`pipelines.dataset.manifest.sample_id`); a source that is one
range and one shot keeps its content id as its sample id (the layout before ranges existed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

# info key of every analysed row: the range and shot it belongs to
UNIT_KEY = "unit"
BOUNDARY_SEARCH_S = 10.0  # a range boundary moves to the nearest cut within this many seconds
BOUNDARY_SIDE = 96  # long side (px) of the frames the boundary's cut detector sees


def range_id(source_id: str, start: int, end: int) -> str:
    """The id of the range ``[start, end)`` (output frames) of a source."""
    return f"{source_id}_r{int(start):08d}_{int(end):08d}"


@dataclass(frozen=True)
class WorkRange:
    """One work unit: output frames ``[start, end)`` of source ``source_id``; ``whole``: the
    source (the file, or the clip an input-list row asked for) is this one range; ``last``: the
    range ends the file (its audio is read to the end); ``snap_start`` / ``snap_end``: that
    boundary is shared with a neighbouring range and moves to the nearest cut (a clip's own edges
    are where its row says and never move)."""

    unit_id: str
    source_id: str
    start: int
    end: int
    whole: bool = True
    last: bool = True
    snap_start: bool = False
    snap_end: bool = False

    @property
    def num_frames(self) -> int:
        return self.end - self.start

    def to_row(self) -> dict:
        """The fields a pipeline row carries (plain scalars)."""
        return {"unit_id": self.unit_id, "source_id": self.source_id, "range_start": self.start,
                "range_end": self.end, "range_whole": self.whole, "range_last": self.last,
                "range_snap_start": self.snap_start, "range_snap_end": self.snap_end}

    @staticmethod
    def of_row(row: dict, duration_s: float, fps: float) -> "WorkRange":
        """The range a row names, or the whole source (``duration_s``) when it names none."""
        if row.get("range_end") is None:
            vid = str(row["video_id"])
            return WorkRange(vid, vid, 0, clip_frames(duration_s, fps)[1], True, True)
        return WorkRange(str(row["unit_id"]), str(row["source_id"]), int(row["range_start"]),
                         int(row["range_end"]), bool(row["range_whole"]), bool(row["range_last"]),
                         bool(row.get("range_snap_start")), bool(row.get("range_snap_end")))

    def facts(self, start: int, end: int, shots: int, after: Optional[str] = None) -> dict:
        """The :data:`UNIT_KEY` dict of a row: this range, the sample's frames ``[start, end)``,
        how many rows the range gave (``shots``) and what ended the shot (``after``)."""
        return {"unit_id": self.unit_id, "source_id": self.source_id, "range_start": self.start,
                "range_end": self.end, "start": int(start), "end": int(end), "rows": int(shots),
                "after": after}

    def label(self, start: int, end: int, fps: float, shots: int) -> str:
        """How a reason names the frames ``[start, end)``: "" for a whole source of one shot."""
        if self.whole and shots == 1:
            return ""
        return f"range {start / fps:.2f}-{end / fps:.2f} s: "


def snap_boundary(gaps: list[tuple[int, int]], b: int) -> tuple[int, int]:
    """The boundary near nominal frame ``b``: ``(end of the range before, start of the range
    after)`` = the transition of ``gaps`` (``(start, end)`` output frames: a hard cut has start =
    end, a dissolve the frames between) whose middle is nearest ``b`` (ties: the earlier one), or
    ``(b, b)`` when there is none."""
    if not gaps:
        return b, b
    best = min(gaps, key=lambda g: (abs((g[0] + g[1]) / 2 - b), g[0]))
    return int(best[0]), int(best[1])


def clip_frames(duration_s: float, fps: float, start_s: float = 0.0, end_s: Optional[float] = None
                ) -> tuple[int, int, bool]:
    """Output frames ``[first, stop)`` of the part ``start_s .. end_s`` (None: the end) of a source
    of ``duration_s`` seconds, and whether it reaches the file's end (an end past it is cut there)."""
    total = int(math.floor(duration_s * fps + 1e-6))
    first = min(total, max(0, int(math.ceil(start_s * fps - 1e-6))))
    stop = total if end_s is None else min(total, int(math.floor(end_s * fps + 1e-6)))
    return first, max(first, stop), stop >= total


def plan_ranges(source_id: str, duration_s: float, fps: float, unit_s: float,
                start_s: float = 0.0, end_s: Optional[float] = None) -> list[WorkRange]:
    """The ranges of a source of ``duration_s`` seconds (or of its part ``start_s .. end_s``, the
    clip of an input-list row; :func:`clip_frames`): one when the part is at most ``1.5 x unit_s``
    long, else ``round(length / unit_s)`` ranges of equal length (whole frames). Only the
    boundaries between two ranges move to cuts (``snap_start`` / ``snap_end``)."""
    first, stop, to_end = clip_frames(duration_s, fps, start_s, end_s)
    length_s = (stop - first) / fps
    if unit_s <= 0 or length_s <= 1.5 * unit_s or stop <= first:
        return [WorkRange(source_id, source_id, first, stop, True, to_end)]
    count = max(2, int(round(length_s / unit_s)))
    edges = [first + round(i * (stop - first) / count) for i in range(count + 1)]
    return [WorkRange(range_id(source_id, a, b), source_id, a, b, False, i == count - 1 and to_end,
                      snap_start=i > 0, snap_end=i < count - 1)
            for i, (a, b) in enumerate(zip(edges[:-1], edges[1:]))]
