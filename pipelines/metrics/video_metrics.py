"""Metrics of a generated talking-head video against its audio and (optionally) the real video.

Torch-free (numpy, scikit-image, dlib through :mod:`pipelines.faces.detect`), so the evaluation
job, training callbacks and benchmarks share one definition. Shapes and units:

* frames: uint8 ``[T, H, W, 3]`` RGB, one row per video frame at ``fps`` frames per second;
* landmarks: float ``[T, 68, 2]`` (iBUG-300W order, :mod:`pipelines.faces.landmarks`), any consistent
  unit (pixels or crop fractions); rows of NaN = no face in that frame;
* audio: float ``[n]`` mono samples in -1..1 at ``sample_rate`` Hz, starting with frame 0.

Metrics (docs/EVALUATION.md has the full definitions):

* ``psnr`` (dB, capped at :data:`PSNR_CAP_DB` for identical frames) and ``ssim`` (0..1,
  scikit-image's Gaussian-free 7x7 SSIM over the three channels): mean over frames;
* ``mouth_opening``, ``audio_loudness_per_frame`` and ``sync`` are defined once in
  :mod:`pipelines.faces.mouth_sync` (the ingest uses the same to find who speaks):
* ``mouth_opening``: inner-lip gap / face width per frame (dimensionless);
* ``audio_loudness_per_frame``: RMS of the samples shown with each frame (linear, full scale 1);
* ``sync``: Pearson correlation of mouth opening and loudness, both less their moving mean over
  :data:`SYNC_DETREND_S` (frame-to-frame following only), best lag within +-``max_lag``
  frames; ``sync_control`` the same against the time-reversed audio (what chance gives with the
  same lag search);
* ``lmd``: mouth landmark distance, the 20 mouth points (48-67) relative to their centroid,
  divided by the face width, mean Euclidean distance (dimensionless, fraction of face width);
* ``glo`` / ``exp``: the paper's head-motion and expression variances, exactly
  :func:`pipelines.faces.motion_stats.clip_motion_stats` on crop-normalised landmarks.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from pipelines.faces.detect import FaceLandmarkDetector
from pipelines.faces.landmarks import MOUTH
from pipelines.faces.motion_stats import clip_motion_stats
from pipelines.faces.mouth_sync import (  # noqa: F401 - the evaluation's sync, defined once (re-exported)
    FACE_WIDTH_POINTS,
    INNER_LIP_PAIRS,
    MIN_SYNC_FRAMES,
    _check_landmarks,
    audio_loudness_per_frame,
    face_width,
    mouth_opening,
    sync_score,
)

#: PSNR of identical frames (dB): MSE 0 has no finite PSNR, so every frame's PSNR is capped here.
PSNR_CAP_DB = 100.0
#: Frames are upscaled (bicubic) so their shorter side is at least this many pixels before the
#: dlib landmark detector sees them: its HOG face detector misses faces below ~80 px, and the
#: 64-256 px crops the platform generates are often smaller than that.
MIN_DETECT_SIDE = 256
#: Seconds of the moving mean ``sync`` removes from the mouth opening and the loudness first
#: (:func:`pipelines.faces.mouth_sync.remove_trend`): changes slower than this are not lip sync
#: (a mouth drifting open over a clip, the silence after a sentence) yet correlate at every lag.
#: Syllables come at 3-8 a second, so the speech-rate part of both series passes.
SYNC_DETREND_S = 1.0


def _check_frames(frames: np.ndarray, name: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 [T, H, W, 3] RGB, got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError(f"{name} has no frames")
    return frames


def _pair(gen: np.ndarray, real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gen, real = _check_frames(gen, "gen"), _check_frames(real, "real")
    if gen.shape != real.shape:
        raise ValueError(f"gen {gen.shape} and real {real.shape} frames must have the same shape")
    return gen, real


def psnr(gen: np.ndarray, real: np.ndarray) -> float:
    """Mean over frames of each frame's PSNR (dB, peak 255) between ``gen`` and ``real``, uint8
    ``[T, H, W, 3]`` of the same shape. A frame's PSNR is capped at :data:`PSNR_CAP_DB`, which
    identical frames get exactly."""
    gen, real = _pair(gen, real)
    diff = gen.astype(np.float64) - real.astype(np.float64)
    mse = (diff ** 2).reshape(diff.shape[0], -1).mean(axis=1)  # [T]
    with np.errstate(divide="ignore"):
        per_frame = np.where(mse > 0, 10.0 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-300)), PSNR_CAP_DB)
    return float(np.minimum(per_frame, PSNR_CAP_DB).mean())


def ssim(gen: np.ndarray, real: np.ndarray) -> float:
    """Mean over frames of scikit-image's SSIM (7x7 uniform window, data range 255, averaged over
    the 3 channels) between uint8 ``[T, H, W, 3]`` frames of the same shape; 1.0 = identical.
    Frames need H, W >= 7."""
    from skimage.metrics import structural_similarity

    gen, real = _pair(gen, real)
    if min(gen.shape[1:3]) < 7:
        raise ValueError(f"ssim needs frames of at least 7x7 pixels, got {gen.shape[1:3]}")
    return float(np.mean([structural_similarity(g, r, channel_axis=-1, data_range=255)
                          for g, r in zip(gen, real)]))


def lmd(lm_gen: np.ndarray, lm_real: np.ndarray) -> float:
    """Mouth landmark distance between generated and real landmarks ``[T, 68, 2]``: for each
    frame the 20 mouth points (48-67) are taken relative to their centroid (head translation
    removed) and divided by that frame's face width (scale removed), then the Euclidean distance
    of each gen / real point pair is averaged over points and frames with a face in both.
    Dimensionless (fraction of face width; 0 = the same mouth shape); NaN without common frames."""
    g, r = _check_landmarks(lm_gen, "lm_gen"), _check_landmarks(lm_real, "lm_real")
    if g.shape != r.shape:
        raise ValueError(f"lm_gen {g.shape} and lm_real {r.shape} must have the same shape")

    def normalised(lm: np.ndarray) -> np.ndarray:
        mouth = lm[:, list(MOUTH)]
        return (mouth - mouth.mean(axis=1, keepdims=True)) / face_width(lm)[:, None, None]

    dist = np.linalg.norm(normalised(g) - normalised(r), axis=-1)  # [T, 20]
    ok = np.isfinite(dist).all(axis=1)
    return float(dist[ok].mean()) if ok.any() else float("nan")


def motion_variances(landmarks: np.ndarray, valid: Optional[np.ndarray] = None) -> dict[str, float]:
    """The paper's Glo / Exp of one clip: :func:`pipelines.faces.motion_stats.clip_motion_stats` on
    crop-normalised landmarks ``[T, 68, 2]`` (crop fractions; squared crop fractions out).
    ``valid`` [T] bool selects frames (default: the frames without NaN). Keys ``glo``, ``exp``
    (NaN with fewer than 2 frames)."""
    lm = _check_landmarks(landmarks)
    if valid is None:
        valid = np.isfinite(lm).all(axis=(1, 2))
    stats = clip_motion_stats(np.nan_to_num(lm, nan=0.0), valid=valid)
    return {"glo": stats.glo, "exp": stats.exp}


def upscale_for_detection(frames: np.ndarray, min_side: int = MIN_DETECT_SIDE) -> tuple[np.ndarray, float]:
    """Frames uint8 [T, H, W, 3] resized (bicubic, PIL) so the shorter side is >= ``min_side``;
    returns (frames, scale = new / old; 1.0 when already large enough)."""
    frames = _check_frames(frames, "frames")
    h, w = frames.shape[1:3]
    if min(h, w) >= min_side:
        return frames, 1.0
    from PIL import Image

    scale = min_side / min(h, w)
    size = (int(round(w * scale)), int(round(h * scale)))
    big = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BICUBIC)) for f in frames])
    return big, size[0] / w


def detect_landmarks(frames: np.ndarray, detector: FaceLandmarkDetector,
                     min_side: int = MIN_DETECT_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """68 landmarks of ``frames`` uint8 [T, H, W, 3] found on copies upscaled to >= ``min_side``
    px, returned crop-normalised: (float64 [T, 68, 2] pixel / frame side in the original frame's
    coordinates (x / W, y / H), NaN where no face; found bool [T])."""
    big, scale = upscale_for_detection(frames, min_side)
    pixels, found = detector.detect(big)
    h, w = frames.shape[1:3]
    lm = np.asarray(pixels, dtype=np.float64) / scale / np.array([w, h], dtype=np.float64)
    lm[~np.asarray(found, dtype=bool)] = np.nan
    return lm, np.asarray(found, dtype=bool)


def _resize_like(frames: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Frames [T, H, W, 3] resized (bicubic) to ``shape`` [T, H', W', 3]'s height and width."""
    if frames.shape[1:3] == tuple(shape[1:3]):
        return frames
    from PIL import Image

    size = (int(shape[2]), int(shape[1]))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BICUBIC)) for f in frames])


def score_video(gen_frames: np.ndarray, real_frames: Optional[np.ndarray], samples: np.ndarray,
                sample_rate: int, fps: float, landmark_detector: FaceLandmarkDetector,
                max_lag: int = 2, min_detect_side: int = MIN_DETECT_SIDE,
                detrend_s: Optional[float] = SYNC_DETREND_S) -> dict[str, float]:
    """Every metric of one generated video.

    ``gen_frames`` uint8 [T, H, W, 3] at ``fps``; ``real_frames`` the real video's frames
    [T', H', W', 3] (same crop; resized to gen's size and cut to the common length) or None;
    ``samples`` float [n] mono audio at ``sample_rate`` Hz starting at frame 0;
    ``landmark_detector`` a :class:`pipelines.faces.detect.FaceLandmarkDetector` (dlib by default
    in the platform), run on frames upscaled to >= ``min_detect_side`` px; ``max_lag`` frames is
    the lag search of :func:`sync_score`; ``detrend_s`` seconds its ``detrend_frames`` (None: off).

    Keys (floats; NaN where undefined): ``frames``, ``face_found_ratio``, ``sync``,
    ``sync_control``, ``glo``, ``exp``, and with real frames also ``psnr``, ``ssim``, ``lmd``,
    ``glo_gt``, ``exp_gt``, ``sync_gt``, ``sync_control_gt`` (the real video's own sync: what a
    perfect generator would reach) and ``face_found_ratio_gt``."""
    gen = _check_frames(gen_frames, "gen_frames")
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 1:
        raise ValueError(f"samples must be mono [n], got shape {samples.shape}")
    real = None
    if real_frames is not None:
        real = _check_frames(real_frames, "real_frames")
        n = min(len(gen), len(real))
        gen, real = gen[:n], _resize_like(real[:n], gen.shape)
    t = len(gen)
    loud = audio_loudness_per_frame(samples, sample_rate, fps, t)
    # the audio of the video's own length, time-reversed: frame k gets frame T-1-k's loudness
    loud_rev = loud[::-1].copy()
    detrend = max(1, round(detrend_s * fps)) if detrend_s else None

    def sync_pair(lm: np.ndarray) -> tuple[float, float]:
        opening = mouth_opening(lm)
        return (sync_score(opening, loud, max_lag, detrend),
                sync_score(opening, loud_rev, max_lag, detrend))

    lm_gen, found_gen = detect_landmarks(gen, landmark_detector, min_detect_side)
    out: dict[str, float] = {"frames": float(t), "face_found_ratio": float(found_gen.mean())}
    out["sync"], out["sync_control"] = sync_pair(lm_gen)
    out.update(motion_variances(lm_gen, found_gen))
    if real is not None:
        lm_real, found_real = detect_landmarks(real, landmark_detector, min_detect_side)
        out["psnr"] = psnr(gen, real)
        out["ssim"] = ssim(gen, real)
        out["lmd"] = lmd(lm_gen, lm_real)
        gt = motion_variances(lm_real, found_real)
        out["glo_gt"], out["exp_gt"] = gt["glo"], gt["exp"]
        out["sync_gt"], out["sync_control_gt"] = sync_pair(lm_real)
        out["face_found_ratio_gt"] = float(found_real.mean())
    return out
