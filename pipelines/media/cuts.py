"""Shot boundaries (hard cuts and short dissolves) from decoded frames, before any face tracking.

Runs on the frames the ingest's detection pass decodes anyway (``pipelines/ingestion/stages.py``),
so finding cuts costs no second decode: each frame is reduced to a small colour thumbnail
(:func:`thumbnails`, block means, ``THUMB_SIDE`` x ``THUMB_SIDE`` x 3) and the shots come from
differences of thumbnails (:func:`find_shots`). Units: frames (output frames at the ingest rate),
grey levels 0..255 for differences.

* **Hard cut** before frame ``t``: the mean absolute difference ``d[t]`` of the thumbnails of
  frames ``t-1`` and ``t`` is at least ``cut_threshold`` and at least ``cut_ratio`` x (1 + the
  median of ``d`` over the ``LOCAL_FRAMES`` frames each side): an adaptive threshold, so a shot
  with steady motion (a walking camera) raises its own baseline and a static shot does not hide
  a cut between two similar framings.
* **Dissolve** (a gradual transition up to ``dissolve_frames`` long): the windowed difference
  ``D[t]`` between frames ``t-h`` and ``t+h`` (``h = dissolve_frames // 2 + 1``) is at least
  ``cut_threshold`` and at least ``DISSOLVE_RATIO`` x (1 + the largest ``D`` on either side,
  ``2h .. 5h`` frames away: the most the two shots change by motion alone over the same gap; the
  largest, not the median, because a swaying head changes by 5 at the turn and by 25 mid-swing),
  and frame ``t`` is a mixture
  of its window's ends: ``|T[t] - (T[t-h] + T[t+h]) / 2| <= MAX_MIX_RESIDUAL x D[t]`` (a cross-fade
  gives ~0.1 at its centre; motion and a hard cut inside the window give 0.2-0.5). The centre is
  the frame of least residual in a run of such frames, with no hard cut within ``2h``; the
  ``2h`` frames around it are mixtures of two shots and belong to neither shot.

Why hand-written and not PySceneDetect (which implements the same content / adaptive detectors):
PySceneDetect opens and decodes the file itself (OpenCV / PyAV backends); here the detection
pass's frames are already in memory at a small scale, in the project's own timestamp-resampled
frame order, and the whole detector is a few array operations.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

THUMB_SIDE = 24  # thumbnail side (px): small enough that a talking mouth barely changes it
LOCAL_FRAMES = 12  # frames each side whose median difference is the adaptive baseline
DISSOLVE_RATIO = 2.0  # a dissolve's windowed difference / (1 + the largest of it on either side)
MAX_MIX_RESIDUAL = 0.25  # |middle - mean(ends)| / |end - start| at a dissolve's centre (0: a pure cross-fade)


@dataclass(frozen=True)
class Shot:
    """Output frames ``start .. end - 1`` of one shot (``end`` exclusive); ``after`` tells what
    ended it: ``"cut"``, ``"dissolve"`` or ``"end"`` (the end of the frames looked at)."""

    start: int
    end: int
    after: str = "end"

    @property
    def num_frames(self) -> int:
        return self.end - self.start


def thumbnails(frames: np.ndarray, side: int = THUMB_SIDE) -> np.ndarray:
    """uint8 [n, H, W, 3] -> float32 [n, s, s, 3] block means (s = min(side, H, W))."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [n, H, W, 3], got {frames.shape}")
    n, h, w, _ = frames.shape
    s = max(1, min(side, h, w))
    ys = np.linspace(0, h, s + 1).astype(np.int64)
    xs = np.linspace(0, w, s + 1).astype(np.int64)
    sums = np.add.reduceat(np.add.reduceat(frames.astype(np.float32), ys[:-1], axis=1), xs[:-1], axis=2)
    area = (np.diff(ys)[:, None] * np.diff(xs)[None, :]).astype(np.float32)
    return sums / area[None, :, :, None]


def _local_median(values: np.ndarray, half: int) -> np.ndarray:
    """Median of ``values`` over ``[t - half, t + half]`` without ``t`` itself, for every t."""
    n = len(values)
    out = np.zeros(n, np.float32)
    for t in range(n):
        lo, hi = max(0, t - half), min(n, t + half + 1)
        window = np.concatenate([values[lo:t], values[t + 1:hi]])
        out[t] = float(np.median(window)) if window.size else 0.0
    return out


def frame_differences(thumbs: np.ndarray, gap: int = 1) -> np.ndarray:
    """float32 [n]: mean |thumb[t] - thumb[t - gap]| (grey levels); 0 for t < gap."""
    thumbs = np.asarray(thumbs, np.float32)
    out = np.zeros(len(thumbs), np.float32)
    if len(thumbs) > gap:
        out[gap:] = np.abs(thumbs[gap:] - thumbs[:-gap]).mean(axis=(1, 2, 3))
    return out


def _dissolves(thumbs: np.ndarray, dissolve_frames: int, cut_threshold: float, hard: list[int]
               ) -> list[tuple[int, int, str]]:
    """The ``(start, end, "dissolve")`` frame ranges of the gradual transitions (see the module
    docstring): windowed difference ``D``, the mixing residual ``r`` and the side baselines."""
    n = len(thumbs)
    h = dissolve_frames // 2 + 1
    if n <= 2 * h:
        return []
    wide = np.zeros(n, np.float32)
    resid = np.ones(n, np.float32)
    before, after = thumbs[:-2 * h], thumbs[2 * h:]
    wide[h:n - h] = np.abs(after - before).mean(axis=(1, 2, 3))
    mid = np.abs(thumbs[h:n - h] - (before + after) / 2).mean(axis=(1, 2, 3))
    resid[h:n - h] = mid / np.maximum(wide[h:n - h], 1e-3)
    side = np.zeros(n, np.float32)
    for t in range(h, n - h):
        left, right = wide[max(h, t - 5 * h):max(h, t - 2 * h)], wide[t + 2 * h + 1:min(n - h, t + 5 * h + 1)]
        side[t] = max([float(np.max(x)) for x in (left, right) if x.size] or [0.0])
    cand = ((wide >= cut_threshold) & (wide >= DISSOLVE_RATIO * (1.0 + side)) & (resid <= MAX_MIX_RESIDUAL))
    hard_arr = np.asarray(hard, np.int64)
    out: list[tuple[int, int, str]] = []
    t = h
    while t < n - h:
        if not cand[t]:
            t += 1
            continue
        run_end = t
        while run_end + 1 < n - h and cand[run_end + 1]:
            run_end += 1
        centre = t + int(np.argmin(resid[t:run_end + 1]))
        if not (hard_arr.size and np.min(np.abs(hard_arr - centre)) <= 2 * h):
            out.append((centre - h, centre + h, "dissolve"))
        t = run_end + 1
    return out


def find_shots(thumbs: np.ndarray, cut_threshold: float = 20.0, cut_ratio: float = 3.0,
               dissolve_frames: int = 12) -> list[Shot]:
    """The shots of ``thumbs`` (float32 [N, s, s, 3], :func:`thumbnails` of consecutive output
    frames), in order, covering ``0 .. N`` except the frames inside dissolves. ``dissolve_frames``
    0 finds hard cuts only."""
    n = len(thumbs)
    if n == 0:
        return []
    d = frame_differences(thumbs)
    base = _local_median(d, LOCAL_FRAMES)
    hard = [t for t in range(1, n) if d[t] >= cut_threshold and d[t] >= cut_ratio * (1.0 + base[t])]
    # (start, end, kind) of the frames no shot keeps: empty for a hard cut
    gaps: list[tuple[int, int, str]] = [(t, t, "cut") for t in hard]
    if dissolve_frames > 0:
        gaps.extend(_dissolves(np.asarray(thumbs, np.float32), dissolve_frames, cut_threshold, hard))
    shots: list[Shot] = []
    pos = 0
    for start, end, kind in sorted(gaps):
        if start > pos:
            shots.append(Shot(pos, start, kind))
        pos = max(pos, end)
    if pos < n:
        shots.append(Shot(pos, n, "end"))
    return shots
