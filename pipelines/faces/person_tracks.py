"""Which face tracks are people: a track is a person only if it behaves like one. numpy only.

A persistent face track (``pipelines.faces.tracks``) may be a real person or a face-like thing that
stays in the picture: a mission patch or a face printed on a T-shirt, a poster or a framed photo on
the wall, a logo. Size says nothing about which is which (a poster may be larger than the
speaker, a print about as large), so each track is judged on three kinds of evidence, each over
all of its frames:

* **calibrated detector confidence**: every candidate is re-scored by the detector on a crop that
  shows the box at :data:`CANONICAL_FACE_PX` (``FaceCandidates.calibrated``, filled by
  ``pipelines.faces.detect``), so the score means the same whatever the face's size in the video
  or the pass scale; the track's median must reach ``min_confidence``. Why not the raw score:
  dlib's HOG score grows with the face's size over the detector window, so a small real face
  and a large patch could score alike;
* **landmark plausibility**: the 68 points, aligned to :data:`MEAN_SHAPE` by a similarity
  transform (Procrustes), leave a residual (RMS, in units of the shape's own RMS radius) whose
  median must stay under ``max_shape_error``; a patch or logo gets points the shape model bent
  out of a face's proportions;
* **it moves like a face**: a print, poster or photo is rigid, it can move with the body or the
  camera but never changes shape. The non-rigid motion measured is the mouth: the spread
  (90th - 10th percentile) of the inner-lip gap / face width (``pipelines.faces.mouth_sync``)
  must reach ``min_mouth_motion`` and ``mouth_noise_factor`` x the spread of a rigid ratio of
  the same track (eye-centre distance / face width): the landmark noise of that track at its
  size, so a small, noisy track does not pass on jitter alone. A real person who holds still for
  a while still passes: the spread is over the whole track.

A track that fails the confidence or shape test is not a face (:attr:`PersonEvidence.face_like`);
one that passes them but fails the motion test is a still face (a poster, a photo, a listener).
How the ingest uses them (``pipelines.ingestion.stages.choose_subject_track``): a lone face-like
track must move its mouth; among two or more face-like tracks the audio decides
(``pipelines.faces.speaker``), so a real speaker whose landmarks are noisy is never dropped for
a non-speaker that happened to pass. Ignored tracks are recorded with their figures
(docs/INGEST.md "Persistent distractors and the person who speaks").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.faces.mouth_sync import face_width, mouth_opening
from pipelines.faces.tracks import FaceCandidates, TrackSummary

#: The face's box width (pixels) in the crop the calibrated score is computed on.
CANONICAL_FACE_PX = 100.0

#: Mean 68-point shape (iBUG order), centred, unit RMS radius: the mean of the two public-domain
#: photos the sample people are built from (the astronaut and Grace Hopper, dlib's points),
#: each normalised the same way. Rounded to 3 decimals.
MEAN_SHAPE = np.array([
    [-1.278, -0.611], [-1.25, -0.274], [-1.199, 0.05], [-1.149, 0.38], [-1.027, 0.696], [-0.847, 0.947],
    [-0.596, 1.162], [-0.323, 1.327], [0.007, 1.377], [0.33, 1.327], [0.639, 1.169], [0.912, 0.968],
    [1.12, 0.71], [1.264, 0.415], [1.328, 0.078], [1.371, -0.274], [1.407, -0.626], [-1.142, -0.898],
    [-0.999, -1.107], [-0.769, -1.164], [-0.525, -1.121], [-0.302, -1.021], [0.265, -1.028], [0.488, -1.129],
    [0.739, -1.15], [0.983, -1.107], [1.141, -0.92], [-0.022, -0.705], [-0.015, -0.482], [-0.008, -0.252],
    [-0.008, -0.023], [-0.316, 0.1], [-0.166, 0.136], [-0.008, 0.186], [0.143, 0.15], [0.287, 0.107],
    [-0.862, -0.676], [-0.726, -0.769], [-0.546, -0.776], [-0.388, -0.64], [-0.553, -0.618], [-0.74, -0.611],
    [0.38, -0.647], [0.538, -0.762], [0.71, -0.769], [0.861, -0.698], [0.725, -0.619], [0.553, -0.626],
    [-0.589, 0.452], [-0.388, 0.409], [-0.173, 0.394], [-0.036, 0.437], [0.114, 0.401], [0.344, 0.416],
    [0.588, 0.423], [0.351, 0.667], [0.136, 0.753], [-0.036, 0.774], [-0.187, 0.76], [-0.395, 0.66],
    [-0.503, 0.466], [-0.18, 0.509], [-0.029, 0.523], [0.122, 0.502], [0.509, 0.452], [0.122, 0.602],
    [-0.022, 0.609], [-0.18, 0.609],
], np.float64)

_LEFT_EYE, _RIGHT_EYE = slice(36, 42), slice(42, 48)


@dataclass(frozen=True)
class PersonParams:
    """Thresholds of :func:`judge_track` (see the module docstring; ``ingest.*`` of the same names)."""

    min_confidence: float = 0.3  # median calibrated detector score (dlib HOG: faces ~1-3, patches ~0)
    max_shape_error: float = 0.25  # median Procrustes residual / shape RMS radius
    min_mouth_motion: float = 0.015  # spread (p90 - p10) of inner-lip gap / face width
    mouth_noise_factor: float = 1.0  # ... and at least this many times the track's rigid-ratio spread


@dataclass(frozen=True)
class PersonEvidence:
    """What :func:`judge_track` measured on one track: ``confidence`` (median calibrated score;
    NaN when the detector gives none), ``shape_error`` (median Procrustes residual),
    ``mouth_motion`` (spread of the inner-lip gap / face width), ``noise`` (spread of the rigid
    eye-distance ratio), ``not_a_face`` (the failed confidence / shape tests with their figures)
    and ``still`` (the failed motion test with its figures; empty: the mouth moves)."""

    confidence: float
    shape_error: float
    mouth_motion: float
    noise: float
    not_a_face: tuple[str, ...]
    still: str = ""

    @property
    def face_like(self) -> bool:
        """Passes the confidence and shape tests (a poster does; a patch or logo does not)."""
        return not self.not_a_face

    @property
    def is_person(self) -> bool:
        """Face-like and its mouth moves."""
        return not self.not_a_face and not self.still

    @property
    def why(self) -> tuple[str, ...]:
        """Every failed test with its figures (empty: a person)."""
        return self.not_a_face + ((self.still,) if self.still else ())

    def facts(self) -> dict:
        """The figures, rounded, for the ingest record."""
        r = lambda v: None if not np.isfinite(v) else round(float(v), 4)  # noqa: E731
        return {"confidence": r(self.confidence), "shape_error": r(self.shape_error),
                "mouth_motion": r(self.mouth_motion), "landmark_noise": r(self.noise)}


def shape_error(landmarks: np.ndarray) -> np.ndarray:
    """Per frame, the RMS distance of the 68 points [T, 68, 2] to :data:`MEAN_SHAPE` after the
    best similarity transform (translation, rotation, scale: Procrustes), in units of the
    points' own RMS radius -> float64 [T] (0 = a mean face; NaN where the frame has no points)."""
    lm = np.asarray(landmarks, np.float64)
    x = lm - lm.mean(axis=1, keepdims=True)
    radius = np.sqrt((x ** 2).sum(-1).mean(-1))  # [T]
    x = x / np.where(radius > 0, radius, np.nan)[:, None, None]
    # Procrustes as complex numbers: the best rotation + scale of the template onto x is a = <t, x> / <t, t>
    xc = x[..., 0] + 1j * x[..., 1]
    tc = MEAN_SHAPE[:, 0] + 1j * MEAN_SHAPE[:, 1]
    a = (np.conj(tc)[None] * xc).sum(-1) / (np.abs(tc) ** 2).sum()
    resid = xc - a[:, None] * tc[None]
    return np.sqrt((np.abs(resid) ** 2).mean(-1))


def spread(values: np.ndarray) -> float:
    """90th - 10th percentile of the finite values (NaN with fewer than 2)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return float("nan")
    lo, hi = np.percentile(v, [10, 90])
    return float(hi - lo)


def judge_track(cands: FaceCandidates, track: TrackSummary, params: PersonParams = PersonParams()
                ) -> PersonEvidence:
    """The evidence that ``track`` (rows of ``cands``) is a person (see the module docstring)."""
    rows = track.members
    lm = np.asarray(cands.landmarks[rows], np.float64)
    calibrated = np.asarray(cands.calibrated[rows], np.float64)
    confidence = float(np.median(calibrated[np.isfinite(calibrated)])) if np.isfinite(calibrated).any() else np.nan
    err = float(np.nanmedian(shape_error(lm))) if len(rows) else np.nan
    mouth = spread(mouth_opening(lm))
    eyes = np.linalg.norm(lm[:, _RIGHT_EYE].mean(1) - lm[:, _LEFT_EYE].mean(1), axis=-1) / face_width(lm)
    noise = spread(eyes)
    why = []
    if np.isfinite(confidence) and confidence < params.min_confidence:
        why.append(f"detector confidence {confidence:.2f} < {params.min_confidence:g}")
    if not err <= params.max_shape_error:
        why.append(f"landmarks off a face's shape by {err:.2f} > {params.max_shape_error:g}")
    need = max(params.min_mouth_motion, params.mouth_noise_factor * (noise if np.isfinite(noise) else 0.0))
    still = "" if mouth >= need else f"mouth never moves: spread {mouth:.3f} < {need:.3f}"
    return PersonEvidence(confidence, err, mouth, noise, tuple(why), still)
