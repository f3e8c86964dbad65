"""Face-centred square crops that follow the head smoothly over time.

``plan_crop_track`` turns per-frame landmarks into one square box per frame (source pixels);
``crop_frames`` cuts and resizes those boxes (antialiased, never a squash of the whole frame);
``landmarks_to_crop`` expresses landmarks in crop coordinates (0..1).

Box rule: the landmark box of a frame (68 points) has centre (cx, cy) and side
``s = max(width, height)``; the crop is a square of side ``s * (1 + 2 * margin)`` centred on
(cx, cy - 0.1 s) (raised a little: the 68 points stop at the brows). Frames without a face take
centre and side interpolated linearly from the nearest frames with one (held at the ends).
Centre and side are smoothed with a Savitzky-Golay filter (order 2) over ``smooth_window_s``,
then rounded to whole pixels.
A box larger than the frame is shrunk to the shorter frame side and a box crossing the border is
shifted inside; ``out_of_frame_ratio`` is the share of frames where that was needed (the "head
not fully in frame" filter).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.faces.landmarks import estimate_yaw_deg

_RAISE = 0.1  # crop centre above the landmark-box centre, in landmark-box sides
_FIT_TOL_PX = 0.5


@dataclass
class CropTrack:
    """One square crop box per frame plus the video-level quality measures.

    boxes: float32 [N, 4] (x0, y0, x1, y1) source pixels, whole-pixel values, square, inside
        the frame.
    out_of_frame_ratio: share of frames whose ideal box had to be shifted or shrunk to fit.
    missing_ratio: share of frames without a detected face (boxes interpolated there).
    head_motion: std of the face centre over the video (sqrt of the summed x / y variances), in
        median face widths (landmark-box width); NaN without any face.
    max_abs_yaw_deg: largest |yaw| over frames with a face (``estimate_yaw_deg``); NaN without.
    """

    boxes: np.ndarray
    out_of_frame_ratio: float
    missing_ratio: float
    head_motion: float
    max_abs_yaw_deg: float


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    from scipy.signal import savgol_filter

    n = len(x)
    window = min(window, n if n % 2 else n - 1)
    if window < 5:
        return x
    return savgol_filter(x, window_length=window, polyorder=2, mode="interp")


def plan_crop_track(landmarks: np.ndarray, found: np.ndarray, frame_wh: tuple[int, int],
                    margin: float, smooth_window_s: float = 0.5, fps: float = 25.0) -> CropTrack:
    """Per-frame landmarks [N, 68, 2] (pixels) and ``found`` [N] -> :class:`CropTrack`.

    ``frame_wh`` = (W, H) of the frames the landmarks are in; ``margin`` = extra context on each
    side of the landmark box, as a fraction of its side; ``smooth_window_s`` seconds at ``fps``.
    Without any face the boxes are the largest centred square and ``missing_ratio`` is 1.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    found = np.asarray(found, dtype=bool)
    if lm.ndim != 3 or lm.shape[1:] != (68, 2) or found.shape != (lm.shape[0],):
        raise ValueError(f"landmarks must be [N, 68, 2] with found [N]; got {lm.shape}, {found.shape}")
    n = lm.shape[0]
    W, H = float(frame_wh[0]), float(frame_wh[1])
    if n == 0:
        raise ValueError("plan_crop_track needs at least one frame")
    found = found & np.isfinite(lm).all(axis=(1, 2))
    if not found.any():
        side = min(W, H)
        box = [(W - side) / 2, (H - side) / 2, (W + side) / 2, (H + side) / 2]
        return CropTrack(np.tile(np.array(box, np.float32), (n, 1)), 0.0, 1.0, float("nan"), float("nan"))

    lo, hi = lm.min(axis=1), lm.max(axis=1)  # [N, 2]
    wh = hi - lo
    s = wh.max(axis=1)
    cx = (lo[:, 0] + hi[:, 0]) / 2
    cy = (lo[:, 1] + hi[:, 1]) / 2 - _RAISE * s
    side = s * (1.0 + 2.0 * margin)

    idx = np.arange(n)
    have = idx[found]
    series = [np.interp(idx, have, v[found]) for v in (cx, cy, side)]
    window = int(round(smooth_window_s * fps)) | 1
    cx_s, cy_s, side_s = (_smooth(v, window) for v in series)

    ideal = np.stack([cx_s - side_s / 2, cy_s - side_s / 2, cx_s + side_s / 2, cy_s + side_s / 2], 1)
    fit_side = np.minimum(side_s, min(W, H))
    x0 = np.clip(cx_s - fit_side / 2, 0.0, W - fit_side)
    y0 = np.clip(cy_s - fit_side / 2, 0.0, H - fit_side)
    fitted = np.stack([x0, y0, x0 + fit_side, y0 + fit_side], axis=1)
    moved = np.abs(fitted - ideal).max(axis=1) > _FIT_TOL_PX
    # whole pixels (what crop_frames cuts), still square and inside the frame
    side_px = np.clip(np.round(fit_side), 1, np.floor(min(W, H)))
    x0_px = np.clip(np.round(cx_s - side_px / 2), 0, np.floor(W) - side_px)
    y0_px = np.clip(np.round(cy_s - side_px / 2), 0, np.floor(H) - side_px)
    boxes = np.stack([x0_px, y0_px, x0_px + side_px, y0_px + side_px], axis=1)

    face_w = float(np.median(wh[found, 0]))
    centre = np.stack([cx[found], cy[found] + _RAISE * s[found]], 1)
    motion = float(np.sqrt(centre.var(axis=0).sum()) / max(face_w, 1e-6))
    yaw = estimate_yaw_deg(lm[found])
    max_yaw = float(np.nanmax(np.abs(yaw))) if np.isfinite(yaw).any() else float("nan")
    return CropTrack(
        boxes=boxes.astype(np.float32),
        out_of_frame_ratio=float(moved.mean()),
        missing_ratio=float(1.0 - found.mean()),
        head_motion=motion,
        max_abs_yaw_deg=max_yaw,
    )


def crop_frames(frames: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Cut each square box [n, 4] (x0, y0, x1, y1 source pixels; rounded to whole pixels, as
    :func:`plan_crop_track` makes them) out of ``frames`` uint8 [n, H, W, 3] and resize it to
    ``size`` x ``size`` -> uint8 [n, size, size, 3].

    Resizing: torch bilinear with antialiasing (the filter widens with the shrink factor), run
    on uint8 directly (about 1 ms for 800 -> 512 px, 6x faster than PIL bicubic here). A box
    reaching outside the frame is an error (never a silent squash or pad)."""
    import torch
    import torch.nn.functional as F

    frames = np.asarray(frames)
    boxes = np.asarray(boxes, dtype=np.float64)
    if frames.ndim != 4 or frames.dtype != np.uint8 or boxes.shape != (frames.shape[0], 4):
        raise ValueError(f"need uint8 frames [n, H, W, 3] and boxes [n, 4]; got {frames.dtype} "
                         f"{frames.shape}, {boxes.shape}")
    H, W = frames.shape[1:3]
    ints = np.round(boxes).astype(np.int64)
    bad = (ints[:, 0] < 0) | (ints[:, 1] < 0) | (ints[:, 2] > W) | (ints[:, 3] > H) | \
          (ints[:, 2] <= ints[:, 0]) | (ints[:, 3] <= ints[:, 1])
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"crop box {boxes[i].tolist()} of frame {i} is empty or outside the {W}x{H} frame")
    out = np.empty((frames.shape[0], size, size, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one small image per call: extra threads only spin (6x the CPU)
    try:
        for i, (x0, y0, x1, y1) in enumerate(ints):
            view = frames[i, y0:y1, x0:x1]  # read-only when it comes from a decoder buffer
            region = torch.from_numpy(view if view.flags.writeable else view.copy())
            region = region.permute(2, 0, 1)[None]  # [1, 3, h, w]
            resized = F.interpolate(region, size=(size, size), mode="bilinear", antialias=True,
                                    align_corners=False)
            out[i] = resized[0].permute(1, 2, 0).numpy()
    finally:
        torch.set_num_threads(threads)
    return out


def landmarks_to_crop(landmarks: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Landmarks [n, 68, 2] in source pixels -> crop coordinates / crop side (0..1 inside the
    crop) for square boxes [n, 4]; float32 [n, 68, 2]."""
    lm = np.asarray(landmarks, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64)
    side = (boxes[:, 2] - boxes[:, 0])[:, None, None]
    return ((lm - boxes[:, None, :2]) / side).astype(np.float32)
