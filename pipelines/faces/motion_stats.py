"""Motion statistics of 68-point face landmarks: Loopy's c_mov / c_exp conditions and the paper's
Glo / Exp evaluation statistics.

Landmarks are ``[..., T, 68, 2]`` in iBUG-300W order, crop coordinates normalised by the crop size
(0..1), ``T`` frames in time order. Variances are population variances (ddof = 0) over the frame
axis; "total variance" of a 2-D point is var(x) + var(y) (units: squared crop fractions).

* ``head_motion_var`` (c_mov, Glo): total variance of the nose tip's absolute position.
* ``expression_var`` (c_exp, Exp): the mean over the 37 upper-face points of the total variance of
  the point's displacement relative to the nose tip (head translation removed, so this measures
  expression, not head motion).

Upper face (docs/METHOD.md, our choice since the paper lists no indices): brows 17-26, nose 27-35,
eyes 36-47 (31 points) plus the six upper jaw points near the ears / temples, 0-2 and 14-16, which
move with the head but not with the mouth: 37 points, mouth (48-67) and lower jaw / chin (3-13)
excluded so speech (a wide-open mouth) does not register as expression. The nose tip itself is one
of the 37 and contributes 0 (its displacement to itself is 0); we keep it so the count matches the
paper's 37.

The same functions serve training (12-frame clips, per sample) and validation (a whole generated or
ground-truth clip: :func:`clip_motion_stats`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

# The 68-point layout (NOSE_TIP = 30, UPPER_FACE = the 37 points above) has one definition, in
# pipelines/faces/landmarks.py; tests/test_motion_stats.py checks it against docs/METHOD.md.
from pipelines.faces.landmarks import NOSE_TIP, NUM_LANDMARKS, UPPER_FACE  # noqa: E402,F401


def _check(landmarks: np.ndarray) -> np.ndarray:
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim < 3 or lm.shape[-2:] != (NUM_LANDMARKS, 2):
        raise ValueError(f"landmarks must be [..., T, 68, 2], got shape {lm.shape}")
    return lm


def head_motion_var(landmarks: np.ndarray) -> np.ndarray:
    """c_mov: total variance over frames of the nose tip's position.
    ``[..., T, 68, 2]`` -> ``[...]`` float32 (a 0-d array for one clip)."""
    nose = _check(landmarks)[..., :, NOSE_TIP, :]  # [..., T, 2]
    return nose.var(axis=-2).sum(axis=-1).astype(np.float32)


def expression_var(landmarks: np.ndarray) -> np.ndarray:
    """c_exp: mean over the 37 upper-face points of the total variance over frames of the point's
    displacement from the nose tip. ``[..., T, 68, 2]`` -> ``[...]`` float32."""
    lm = _check(landmarks)
    rel = lm[..., :, list(UPPER_FACE), :] - lm[..., :, NOSE_TIP:NOSE_TIP + 1, :]  # [..., T, 37, 2]
    return rel.var(axis=-3).sum(axis=-1).mean(axis=-1).astype(np.float32)


@dataclass(frozen=True)
class MotionStats:
    """Glo / Exp of one clip (squared crop fractions) and the frames they were computed on."""

    glo: float
    exp: float
    frames: int


def clip_motion_stats(landmarks: np.ndarray, valid: Optional[np.ndarray] = None) -> MotionStats:
    """The paper's Glo / Exp over a whole clip ``[T, 68, 2]`` (generated or ground truth).

    ``valid`` [T] bool (e.g. the ingest's ``face_found``) excludes frames whose landmarks were
    interpolated or not detected. Fewer than 2 usable frames gives NaN (no variance exists)."""
    lm = _check(landmarks)
    if lm.ndim != 3:
        raise ValueError(f"clip_motion_stats takes one clip [T, 68, 2], got shape {lm.shape}")
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != (lm.shape[0],):
            raise ValueError(f"valid must be [T]={lm.shape[0]}, got shape {valid.shape}")
        lm = lm[valid]
    if lm.shape[0] < 2:
        return MotionStats(float("nan"), float("nan"), int(lm.shape[0]))
    return MotionStats(float(head_motion_var(lm)), float(expression_var(lm)), int(lm.shape[0]))


def motion_stats_ratio(generated: MotionStats, reference: MotionStats) -> dict[str, float]:
    """Generated / ground-truth ratio of Glo and Exp (1.0 = the same amount of motion as the
    reference video; the paper reports both values with the ground truth as reference)."""
    def ratio(a: float, b: float) -> float:
        return float(a / b) if b > 0 else float("nan")
    return {"glo_ratio": ratio(generated.glo, reference.glo),
            "exp_ratio": ratio(generated.exp, reference.exp)}
