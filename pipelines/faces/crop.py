"""Face-centred square crops that follow the head smoothly over time.

``plan_crop_track`` turns per-frame landmarks into one square box per frame (source pixels);
``crop_frames`` cuts and resizes those boxes (antialiased, never a squash of the whole frame),
filling a border that reaches outside the frame when a fill rule asks for it;
``landmarks_to_crop`` expresses landmarks in crop coordinates (0..1).

Box rule: the landmark box of a frame (68 points) has centre (cx, cy) and side
``s = max(width, height)``; the asked crop is a square of side ``s * (1 + 2 * margin)`` centred on
(cx, cy - 0.1 s) (raised a little: the 68 points stop at the brows). Frames without a face take
centre and side interpolated linearly from the nearest frames with one (held at the ends).
Centre and side are smoothed with a Savitzky-Golay filter (order 2) over ``smooth_window_s``,
then rounded to whole pixels.

The head and the frame (docs/INGEST.md, "Close-ups"): the **head box** of a frame is its landmark
box extended by :data:`FOREHEAD_ALLOWANCE` x s above (the 68 points stop at the brows; this much
forehead must be in the picture) and :data:`CHIN_ALLOWANCE` x s below the lowest point (the chin:
room for the landmarks' error at the chin). A frame whose head box leaves the frame (by more than
half a pixel) has its **head cut**; ``head_cut_ratio`` (share of the frames with a face) is what
the ingest rejects on, ``head_cut_parts`` says which part was outside (forehead, chin, left side,
right side). A crop whose *context margin* does not fit the frame is never a reason to reject: the
fill rule (``fill``, one rule for every frame of a video, so reference, clip and motion frames of
a sample agree) decides:

* ``reduce`` (default): one smaller margin for the whole video, the largest for which the crop
  centred on the face fits the frame in every frame whose head is in it, but never below the
  margin that holds the head box (:data:`HEAD_CROP_FACTOR`); every pixel of every crop is a real
  pixel. Where even that crop cannot be centred (a head near an edge, or cut), the box is
  shifted inside the frame (``shifted_ratio``).
* ``reflect`` / ``blur`` / ``constant``: the asked crop in every frame; the part outside the
  frame is filled by :func:`crop_frames` (mirrored image, a blurred mirror, or black).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pipelines.faces.landmarks import estimate_yaw_deg

_RAISE = 0.1  # crop centre above the landmark-box centre, in landmark-box sides
_FIT_TOL_PX = 0.5
_SHIFT_TOL_PX = 1.0  # a box moved by more than this (beyond rounding) to fit the frame is "shifted"

#: forehead that must be inside the frame above the landmark box (its top: the brows), in landmark-box sides
FOREHEAD_ALLOWANCE = 0.1
#: room that must be inside the frame below the landmark box (its bottom: the chin), in landmark-box sides
CHIN_ALLOWANCE = 0.05
#: crop side / landmark-box side of the smallest crop centred as the asked one that holds the head box
#: (the box reaches 0.5 - raise + forehead above the crop centre, 0.5 + raise + chin below): 1.3
HEAD_CROP_FACTOR = 2.0 * max(0.5, 0.5 - _RAISE + FOREHEAD_ALLOWANCE, 0.5 + _RAISE + CHIN_ALLOWANCE)
#: the fill rules (``ingest.crop_fill``)
FILL_MODES = ("reduce", "reflect", "blur", "constant")
#: head parts named in reasons, in the order of ``head_cut_parts``
HEAD_PARTS = ("forehead", "chin", "left side", "right side")


@dataclass
class CropTrack:
    """One square crop box per frame plus the video-level quality measures.

    boxes: float32 [N, 4] (x0, y0, x1, y1) source pixels, whole-pixel values, square; inside the
        frame with ``fill`` ``reduce``, reaching outside it where the fill rules fill the border.
    head_cut_ratio: share of the frames with a face whose head box (landmark box + forehead and
        chin allowances) leaves the frame.
    head_cut_parts: {part: share of the frames with a face} for each part of :data:`HEAD_PARTS`
        that was outside in at least one frame.
    missing_ratio: share of frames without a detected face (boxes interpolated there).
    head_motion: std of the face centre over the video (sqrt of the summed x / y variances), in
        median face widths (landmark-box width); NaN without any face.
    max_abs_yaw_deg: largest |yaw| over frames with a face (``estimate_yaw_deg``); NaN without.
    fill: the fill rule applied (:data:`FILL_MODES`).
    margin_asked: the margin asked for (landmark-box sides on each side).
    margin: the margin of every crop of the video: ``margin_asked``, or the reduced one (``reduce``).
    adjusted_ratio: share of frames whose crop was reduced (``reduce``: smaller than asked) or
        filled (the fill rules: part of the box outside the frame).
    fill_area_max: largest share of one crop's area that lies outside the frame (filled); 0
        with ``reduce``.
    shifted_ratio: share of frames whose box was moved inside the frame, so the face is off the
        crop's centre (``reduce`` only).
    """

    boxes: np.ndarray
    head_cut_ratio: float
    missing_ratio: float
    head_motion: float
    max_abs_yaw_deg: float
    head_cut_parts: dict = field(default_factory=dict)
    fill: str = "reduce"
    margin_asked: float = 0.0
    margin: float = 0.0
    adjusted_ratio: float = 0.0
    fill_area_max: float = 0.0
    shifted_ratio: float = 0.0

    def head_cut_text(self) -> str:
        """``"head cut by the frame edge in 34% of frames (chin outside"`` (no closing parenthesis:
        callers add their threshold); ``""`` when no frame's head is cut. Several parts:
        ``"(chin outside in 30%, forehead in 4%"``."""
        if self.head_cut_ratio <= 0.0:
            return ""
        parts = sorted(self.head_cut_parts.items(), key=lambda kv: -kv[1])
        if len(parts) == 1:
            where = f"{parts[0][0]} outside"
        else:
            where = ", ".join(f"{name}{' outside' if i == 0 else ''} in {share:.0%}"
                              for i, (name, share) in enumerate(parts))
        return f"head cut by the frame edge in {self.head_cut_ratio:.0%} of frames ({where}"

    def note(self) -> Optional[str]:
        """What was changed on a kept video's crops, for a person (the manifest ``note``), e.g.
        ``"crop margin reduced to 0.31 (asked 0.6) in 100% of frames"``; clauses joined by
        ``"; "``; None when every crop is the asked one, centred, with the whole head."""
        clauses = []
        if self.fill == "reduce" and self.adjusted_ratio > 0:
            clauses.append(f"crop margin reduced to {self.margin:.2f} (asked {self.margin_asked:g}) in "
                           f"{self.adjusted_ratio:.0%} of frames")
        if self.fill != "reduce" and self.adjusted_ratio > 0:
            clauses.append(f"crop border filled ({self.fill}) in {self.adjusted_ratio:.0%} of frames (up to "
                           f"{self.fill_area_max:.0%} of a crop, margin {self.margin_asked:g})")
        if self.shifted_ratio > 0:
            clauses.append(f"face off-centre in {self.shifted_ratio:.0%} of frames (crop moved inside the frame)")
        if self.head_cut_ratio > 0:
            clauses.append(self.head_cut_text() + ")")
        return "; ".join(clauses) or None

    def facts(self) -> dict:
        """The manifest columns of the crop (``pipelines.dataset.schema.MANIFEST_SCHEMA``)."""
        return {"crop_fill": self.fill, "crop_margin": round(float(self.margin), 4),
                "crop_adjusted_ratio": round(float(self.adjusted_ratio), 4),
                "crop_fill_max": round(float(self.fill_area_max), 4),
                "head_cut_ratio": round(float(self.head_cut_ratio), 4), "note": self.note()}


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    from scipy.signal import savgol_filter

    n = len(x)
    window = min(window, n if n % 2 else n - 1)
    if window < 5:
        return x
    return savgol_filter(x, window_length=window, polyorder=2, mode="interp")


def head_cut(landmarks: np.ndarray, frame_wh: tuple[float, float]) -> np.ndarray:
    """Which part of each frame's head box leaves the frame: landmarks [N, 68, 2] (pixels, finite)
    -> bool [N, 4] in :data:`HEAD_PARTS` order (forehead: the box top minus
    :data:`FOREHEAD_ALLOWANCE` x s above the frame; chin: the box bottom plus
    :data:`CHIN_ALLOWANCE` x s below it; left / right side: the box's sides outside; s = the
    landmark box side; half a pixel of tolerance)."""
    lm = np.asarray(landmarks, np.float64)
    W, H = float(frame_wh[0]), float(frame_wh[1])
    lo, hi = lm.min(axis=1), lm.max(axis=1)
    s = (hi - lo).max(axis=1)
    return np.stack([
        lo[:, 1] - FOREHEAD_ALLOWANCE * s < -_FIT_TOL_PX,
        hi[:, 1] + CHIN_ALLOWANCE * s > H + _FIT_TOL_PX,
        lo[:, 0] < -_FIT_TOL_PX,
        hi[:, 0] > W + _FIT_TOL_PX,
    ], axis=1)


def plan_crop_track(landmarks: np.ndarray, found: np.ndarray, frame_wh: tuple[int, int],
                    margin: float, smooth_window_s: float = 0.5, fps: float = 25.0,
                    fill: str = "reduce") -> CropTrack:
    """Per-frame landmarks [N, 68, 2] (pixels) and ``found`` [N] -> :class:`CropTrack`.

    ``frame_wh`` = (W, H) of the frames the landmarks are in; ``margin`` = extra context on each
    side of the landmark box, as a fraction of its side; ``smooth_window_s`` seconds at ``fps``;
    ``fill``: what to do where the asked crop does not fit the frame (:data:`FILL_MODES`, module
    docstring). Without any face the boxes are the largest centred square and ``missing_ratio``
    is 1.
    """
    if fill not in FILL_MODES:
        raise ValueError(f"fill must be one of {', '.join(FILL_MODES)}; got {fill!r}")
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
        return CropTrack(np.tile(np.array(box, np.float32), (n, 1)), 0.0, 1.0, float("nan"), float("nan"),
                         fill=fill, margin_asked=float(margin), margin=float(margin))

    lo, hi = lm.min(axis=1), lm.max(axis=1)  # [N, 2]
    wh = hi - lo
    s = wh.max(axis=1)
    cx = (lo[:, 0] + hi[:, 0]) / 2
    cy = (lo[:, 1] + hi[:, 1]) / 2 - _RAISE * s

    idx = np.arange(n)
    have = idx[found]
    series = [np.interp(idx, have, v[found]) for v in (cx, cy, s)]
    window = int(round(smooth_window_s * fps)) | 1
    cx_s, cy_s, s_s = (_smooth(v, window) for v in series)
    s_s = np.maximum(s_s, 1.0)

    cut_parts = np.zeros((n, len(HEAD_PARTS)), bool)
    cut_parts[found] = head_cut(lm[found], (W, H))
    cut = cut_parts.any(axis=1)  # frames without a face: never counted as cut

    k_asked = 1.0 + 2.0 * float(margin)
    short = min(W, H)
    if fill == "reduce":
        # half side of the largest square centred on the face that lies inside the frame
        room = np.minimum(np.minimum(cx_s, W - cx_s), np.minimum(cy_s, H - cy_s))
        fit_k = 2.0 * room / s_s
        usable = ~cut
        k_fit = float(fit_k[usable].min()) if usable.any() else k_asked
        k = min(k_asked, max(HEAD_CROP_FACTOR, k_fit))
        side_px = np.clip(np.round(k * s_s), 1, np.floor(short))
    else:
        k = k_asked
        side_px = np.maximum(np.round(k * s_s), 1)
    x0_c = np.round(cx_s - side_px / 2)  # centred, whole pixels
    y0_c = np.round(cy_s - side_px / 2)
    if fill == "reduce":
        x0_px = np.clip(x0_c, 0, np.floor(W) - side_px)
        y0_px = np.clip(y0_c, 0, np.floor(H) - side_px)
        shifted = np.maximum(np.abs(x0_px - x0_c), np.abs(y0_px - y0_c)) > _SHIFT_TOL_PX
        adjusted = side_px < np.round(k_asked * s_s) - _FIT_TOL_PX
        fill_area = np.zeros(n)
    else:
        x0_px, y0_px = x0_c, y0_c
        shifted = np.zeros(n, bool)
        inside_w = np.clip(np.minimum(x0_px + side_px, np.floor(W)) - np.maximum(x0_px, 0), 0, None)
        inside_h = np.clip(np.minimum(y0_px + side_px, np.floor(H)) - np.maximum(y0_px, 0), 0, None)
        fill_area = 1.0 - inside_w * inside_h / side_px ** 2
        adjusted = fill_area > 0
    boxes = np.stack([x0_px, y0_px, x0_px + side_px, y0_px + side_px], axis=1)

    face_w = float(np.median(wh[found, 0]))
    centre = np.stack([cx[found], cy[found] + _RAISE * s[found]], 1)
    motion = float(np.sqrt(centre.var(axis=0).sum()) / max(face_w, 1e-6))
    yaw = estimate_yaw_deg(lm[found])
    max_yaw = float(np.nanmax(np.abs(yaw))) if np.isfinite(yaw).any() else float("nan")
    n_found = int(found.sum())
    part_share = cut_parts[found].sum(axis=0) / n_found
    return CropTrack(
        boxes=boxes.astype(np.float32),
        head_cut_ratio=float(cut[found].mean()),
        missing_ratio=float(1.0 - found.mean()),
        head_motion=motion,
        max_abs_yaw_deg=max_yaw,
        head_cut_parts={name: float(v) for name, v in zip(HEAD_PARTS, part_share) if v > 0},
        fill=fill,
        margin_asked=float(margin),
        margin=float(margin) if k >= k_asked else (k - 1.0) / 2.0,
        adjusted_ratio=float(adjusted.mean()),
        fill_area_max=float(fill_area.max()),
        shifted_ratio=float(shifted.mean()),
    )


def _fill_border(region: np.ndarray, pads: tuple[int, int, int, int], fill: str) -> np.ndarray:
    """``region`` uint8 [h, w, 3] (the part of a box inside the frame) padded by (top, bottom,
    left, right) pixels: mirrored (``reflect``, ``blur``: the blur is applied after resizing) or
    black (``constant``)."""
    top, bottom, left, right = pads
    width = ((top, bottom), (left, right), (0, 0))
    if fill == "constant":
        return np.pad(region, width, mode="constant", constant_values=0)
    return np.pad(region, width, mode="reflect" if min(region.shape[:2]) > 1 else "edge")


def crop_frames(frames: np.ndarray, boxes: np.ndarray, size: int, fill: Optional[str] = None) -> np.ndarray:
    """Cut each square box [n, 4] (x0, y0, x1, y1 source pixels; rounded to whole pixels, as
    :func:`plan_crop_track` makes them) out of ``frames`` uint8 [n, H, W, 3] and resize it to
    ``size`` x ``size`` -> uint8 [n, size, size, 3].

    Resizing: torch bilinear with antialiasing (the filter widens with the shrink factor), run
    on uint8 directly (about 1 ms for 800 -> 512 px, 6x faster than PIL bicubic here). A box
    reaching outside the frame is an error (never a silent squash or pad) unless ``fill`` names a
    fill rule (``reflect``: the frame mirrored at its edge; ``blur``: that mirror blurred, a
    Gaussian of sigma ``size / 24`` px after resizing, the real pixels untouched; ``constant``:
    black); ``None`` or ``reduce`` fill nothing. A box with no pixel in the frame is always an
    error."""
    import torch
    import torch.nn.functional as F

    if fill is not None and fill not in FILL_MODES:
        raise ValueError(f"fill must be None or one of {', '.join(FILL_MODES)}; got {fill!r}")
    pad_ok = fill not in (None, "reduce")
    frames = np.asarray(frames)
    boxes = np.asarray(boxes, dtype=np.float64)
    if frames.ndim != 4 or frames.dtype != np.uint8 or boxes.shape != (frames.shape[0], 4):
        raise ValueError(f"need uint8 frames [n, H, W, 3] and boxes [n, 4]; got {frames.dtype} "
                         f"{frames.shape}, {boxes.shape}")
    H, W = frames.shape[1:3]
    ints = np.round(boxes).astype(np.int64)
    outside = (ints[:, 0] < 0) | (ints[:, 1] < 0) | (ints[:, 2] > W) | (ints[:, 3] > H)
    empty = (ints[:, 2] <= ints[:, 0]) | (ints[:, 3] <= ints[:, 1]) | (ints[:, 0] >= W) | (ints[:, 1] >= H) | \
            (ints[:, 2] <= 0) | (ints[:, 3] <= 0)
    bad = empty | (outside & (not pad_ok))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"crop box {boxes[i].tolist()} of frame {i} is empty or outside the {W}x{H} frame")
    out = np.empty((frames.shape[0], size, size, 3), dtype=np.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one small image per call: extra threads only spin (6x the CPU)
    try:
        for i, (x0, y0, x1, y1) in enumerate(ints):
            ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
            view = frames[i, iy0:iy1, ix0:ix1]  # read-only when it comes from a decoder buffer
            if outside[i]:
                view = _fill_border(view, (iy0 - y0, y1 - iy1, ix0 - x0, x1 - ix1), fill)
            region = torch.from_numpy(view if view.flags.writeable else view.copy())
            region = region.permute(2, 0, 1)[None]  # [1, 3, h, w]
            resized = F.interpolate(region, size=(size, size), mode="bilinear", antialias=True,
                                    align_corners=False)
            out[i] = resized[0].permute(1, 2, 0).numpy()
            if outside[i] and fill == "blur":
                out[i] = _blur_outside(out[i], (x0, y0, x1, y1), (ix0, iy0, ix1, iy1))
    finally:
        torch.set_num_threads(threads)
    return out


def _blur_outside(crop: np.ndarray, box: tuple, inner: tuple) -> np.ndarray:
    """``crop`` uint8 [S, S, 3] of ``box`` (source pixels) with its pixels outside ``inner`` (the
    part of the box in the frame) replaced by a Gaussian blur of the crop (sigma S / 24)."""
    from scipy.ndimage import gaussian_filter

    size = crop.shape[0]
    x0, y0, x1, y1 = box
    scale = size / float(x1 - x0)
    a = int(np.floor((inner[0] - x0) * scale)), int(np.floor((inner[1] - y0) * scale))
    b = int(np.ceil((inner[2] - x0) * scale)), int(np.ceil((inner[3] - y0) * scale))
    blurred = gaussian_filter(crop.astype(np.float32), sigma=(size / 24.0, size / 24.0, 0), mode="reflect")
    out = np.clip(blurred + 0.5, 0, 255).astype(np.uint8)
    out[a[1]:b[1], a[0]:b[0]] = crop[a[1]:b[1], a[0]:b[0]]
    return out


def landmarks_to_crop(landmarks: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Landmarks [n, 68, 2] in source pixels -> crop coordinates / crop side (0..1 inside the
    crop) for square boxes [n, 4]; float32 [n, 68, 2]."""
    lm = np.asarray(landmarks, dtype=np.float64)
    boxes = np.asarray(boxes, dtype=np.float64)
    side = (boxes[:, 2] - boxes[:, 0])[:, None, None]
    return ((lm - boxes[:, None, :2]) / side).astype(np.float32)
