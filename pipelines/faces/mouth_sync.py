"""Does a mouth follow the sound: the inner-lip gap per frame, the loudness per frame, and their
correlation. One definition for the evaluation's ``sync`` (:mod:`pipelines.metrics.video_metrics`)
and the ingest's choice of the person who speaks (:mod:`pipelines.faces.speaker`). numpy only.

Shapes and units: landmarks float ``[T, 68, 2]`` (iBUG-300W order, any consistent unit; rows of
NaN = no face in that frame); audio float ``[n]`` mono in -1..1 at ``sample_rate`` Hz, starting with
frame 0; ``fps`` frames per second.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from pipelines.faces.landmarks import NUM_LANDMARKS

#: Jaw points at the ears (0 and 16): their distance is the face width used to normalise.
FACE_WIDTH_POINTS = (0, 16)
#: Inner-lip pairs (upper, lower) whose mean distance is the mouth opening: 61-67, 62-66, 63-65.
INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))
#: Fewest frames with both a face and audio for a correlation; fewer give NaN.
MIN_SYNC_FRAMES = 8



def _check_landmarks(landmarks: np.ndarray, name: str = "landmarks") -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim != 3 or lm.shape[1:] != (NUM_LANDMARKS, 2):
        raise ValueError(f"{name} must be [T, 68, 2], got shape {lm.shape}")
    return lm


def face_width(landmarks: np.ndarray) -> np.ndarray:
    """Distance between jaw points 0 and 16 (ear to ear) per frame: ``[T, 68, 2]`` -> ``[T]``
    (same unit as the landmarks; NaN where no face or the width is 0)."""
    lm = _check_landmarks(landmarks)
    a, b = FACE_WIDTH_POINTS
    width = np.linalg.norm(lm[:, b] - lm[:, a], axis=-1)
    return np.where(width > 0, width, np.nan)


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """Inner-lip gap / face width per frame: ``[T, 68, 2]`` -> float64 ``[T]`` (dimensionless;
    0 = lips closed, ~0.1-0.3 wide open). The gap is the mean distance of the inner-lip pairs
    61-67, 62-66, 63-65; NaN where the frame has no face."""
    lm = _check_landmarks(landmarks)
    upper = lm[:, [u for u, _ in INNER_LIP_PAIRS]]
    lower = lm[:, [v for _, v in INNER_LIP_PAIRS]]
    gap = np.linalg.norm(upper - lower, axis=-1).mean(axis=1)
    return gap / face_width(lm)


def audio_loudness_per_frame(samples: np.ndarray, sample_rate: int, fps: float, num_frames: int
                             ) -> np.ndarray:
    """RMS loudness of the audio shown with each video frame: frame k covers
    ``[k / fps, (k + 1) / fps)`` seconds. ``samples`` float [n] (mono, -1..1) -> float64
    ``[num_frames]`` (linear RMS, full scale = 1). Frames past the end of the audio get NaN."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 1:
        raise ValueError(f"samples must be mono [n], got shape {samples.shape}")
    if sample_rate <= 0 or fps <= 0:
        raise ValueError(f"sample_rate ({sample_rate}) and fps ({fps}) must be positive")
    edges = np.round(np.arange(num_frames + 1) * (sample_rate / fps)).astype(np.int64)
    lo, hi = np.minimum(edges[:-1], len(samples)), np.minimum(edges[1:], len(samples))
    sq = np.concatenate([[0.0], np.cumsum(samples ** 2)])  # prefix sums: O(n) for every frame
    count = hi - lo
    with np.errstate(invalid="ignore", divide="ignore"):
        rms = np.sqrt((sq[hi] - sq[lo]) / count)
    return np.where(count > 0, rms, np.nan)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation over the pairs where both are finite; 0.0 when either is constant
    (no variation cannot correlate), NaN with fewer than :data:`MIN_SYNC_FRAMES` pairs."""
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < MIN_SYNC_FRAMES:
        return float("nan")
    x, y = x[ok] - x[ok].mean(), y[ok] - y[ok].mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    # relative tolerance: dlib on identical frames gives identical points, but float noise stays
    if denom <= 1e-12 * max(1.0, float(np.abs(x).max()) * float(np.abs(y).max()) * len(x)):
        return 0.0
    return float((x * y).sum() / denom)


def remove_trend(x: np.ndarray, window: int) -> np.ndarray:
    """``x`` [T] minus its centred moving mean over ``window`` frames (NaN-aware: NaN frames are
    left out of the means and stay NaN; near the ends the window is cut to the frames there).
    A high-pass: what changes slower than the window is removed."""
    x = np.asarray(x, dtype=np.float64)
    ok = np.isfinite(x)
    half = max(0, int(window) // 2)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, x, 0.0))])
    ccount = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(len(x))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(x))
    count = ccount[hi] - ccount[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (csum[hi] - csum[lo]) / count
    return np.where(ok, x - mean, np.nan)


def sync_score(opening: np.ndarray, loudness: np.ndarray, max_lag: int = 2,
               detrend_frames: Optional[int] = None) -> float:
    """Best Pearson correlation between ``opening`` [T] and ``loudness`` [T] over lags
    ``-max_lag..max_lag`` frames (lag d pairs opening[t] with loudness[t - d]: positive d = the
    mouth follows the sound). -1..1; 0.0 for a still mouth or silent audio; NaN when fewer than
    :data:`MIN_SYNC_FRAMES` frames have both values. The best-of-lags search is biased upward, so
    compare with the same score against time-reversed audio (``sync_control``).

    ``detrend_frames``: both series first lose their moving mean over that many frames
    (:func:`remove_trend`), so only the frame-to-frame following counts. Without it a mouth that
    slowly opens over a video correlates with speech that slowly gets louder (or the silence at
    the end) at every lag alike: a generated video whose mouth ignored the audio scored 0.6
    against its audio and -0.24 against the reversed audio."""
    opening = np.asarray(opening, dtype=np.float64)
    loudness = np.asarray(loudness, dtype=np.float64)
    if opening.shape != loudness.shape or opening.ndim != 1:
        raise ValueError(f"opening {opening.shape} and loudness {loudness.shape} must both be [T]")
    if detrend_frames:
        opening, loudness = remove_trend(opening, detrend_frames), remove_trend(loudness, detrend_frames)
    n = len(opening)
    best = float("nan")
    for d in range(-int(max_lag), int(max_lag) + 1):
        if d >= 0:
            r = _pearson(opening[d:], loudness[: n - d])
        else:
            r = _pearson(opening[: n + d], loudness[-d:])
        if np.isfinite(r) and not (best >= r):
            best = r
    return best
