"""The 68-point face landmark layout (iBUG-300W order) shared by ingest, reader and evaluation.

The same order is DWPose's face block: COCO-WholeBody keypoints 23..90 (0-based), so
``wholebody[:, DWPOSE_FACE_SLICE]`` is a [n, 68, 2] array in this layout.

Index groups (0-based): 0-16 jaw (8 = chin), 17-26 brows, 27-35 nose (30 = nose tip),
36-47 eyes, 48-67 mouth. ``UPPER_FACE`` (37 points, docs/METHOD.md) = brows, nose and eyes (17-47)
plus the upper jaw points near the ears and temples (0-2, 14-16); mouth and chin excluded.
"""
from __future__ import annotations

import numpy as np

NUM_LANDMARKS = 68
JAW = tuple(range(0, 17))
CHIN = 8
BROWS = tuple(range(17, 27))
NOSE = tuple(range(27, 36))
NOSE_TIP = 30
LEFT_EYE = tuple(range(36, 42))  # subject's right eye, image left
RIGHT_EYE = tuple(range(42, 48))
EYES = LEFT_EYE + RIGHT_EYE
MOUTH = tuple(range(48, 68))
INNER_MOUTH = tuple(range(60, 68))
UPPER_FACE = (0, 1, 2) + tuple(range(17, 48)) + (14, 15, 16)
assert len(UPPER_FACE) == 37


def _mirror_order() -> tuple[int, ...]:
    """Index of each point's mirror image across the face's vertical axis (left <-> right)."""
    pairs = [*zip(range(0, 17), range(16, -1, -1)),  # jaw
             *zip(range(17, 27), range(26, 16, -1)),  # brows
             *((i, i) for i in range(27, 31)),  # nose bridge
             *zip(range(31, 36), range(35, 30, -1)),  # nostrils
             *zip((36, 37, 38, 39, 40, 41), (45, 44, 43, 42, 47, 46)),  # eyes (corners, lids)
             *zip(range(48, 55), range(54, 47, -1)), *zip(range(55, 60), range(59, 54, -1)),  # outer lips
             *zip(range(60, 65), range(64, 59, -1)), *zip(range(65, 68), range(67, 64, -1))]  # inner lips
    order = [0] * NUM_LANDMARKS
    for a, b in pairs:
        order[a], order[b] = b, a
    return tuple(order)


#: ``points[MIRROR_ORDER]`` relabels the points of a horizontally flipped face (point i of the
#: flipped face is point MIRROR_ORDER[i] of the original, its x mirrored)
MIRROR_ORDER = _mirror_order()
assert sorted(MIRROR_ORDER) == list(range(NUM_LANDMARKS))


def mirror_landmarks(points: np.ndarray, width: float = 1.0) -> np.ndarray:
    """Landmarks [..., 68, 2] of the horizontally flipped image (``x -> width - x``), relabelled
    so that index i is again point i of the 68-point layout."""
    points = np.asarray(points)
    out = points[..., MIRROR_ORDER, :].copy()
    out[..., 0] = width - out[..., 0]
    return out


# COCO-WholeBody (133 keypoints): 0-16 body, 17-22 feet, 23-90 face (68), 91-132 hands.
WHOLEBODY_NUM_KEYPOINTS = 133
DWPOSE_FACE_SLICE = slice(23, 91)


def wholebody_to_face68(keypoints: np.ndarray) -> np.ndarray:
    """COCO-WholeBody keypoints [..., 133, C] -> the 68 iBUG face points [..., 68, C]."""
    keypoints = np.asarray(keypoints)
    if keypoints.shape[-2] != WHOLEBODY_NUM_KEYPOINTS:
        raise ValueError(
            f"expected {WHOLEBODY_NUM_KEYPOINTS} COCO-WholeBody keypoints on axis -2, "
            f"got shape {keypoints.shape}"
        )
    return keypoints[..., DWPOSE_FACE_SLICE, :]


def estimate_yaw_deg(landmarks: np.ndarray) -> np.ndarray:
    """Rough head yaw from 68 landmarks [n, 68, 2] (pixels) -> degrees [n] (float32).

    Geometric estimate: the nose tip (30) of a frontal face sits halfway between the two
    face sides (jaw points 0-2 and 14-16, at eye/cheek height). With the face modelled as a
    cylinder of radius r = half the side-to-side width w, a yaw of theta moves the nose tip
    sideways by r * sin(theta) relative to the side midpoint, so
    ``yaw = asin(clip(2 * (nose_x - mid_x) / w, -1, 1))``. Sign: positive when the nose is
    right of the midpoint in the image. Accurate to roughly +-10 degrees up to ~60 degrees;
    used only to filter extreme rotations. Frames with a degenerate width give NaN.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim != 3 or lm.shape[1:] != (NUM_LANDMARKS, 2):
        raise ValueError(f"landmarks must be [n, 68, 2], got {lm.shape}")
    left = lm[:, [0, 1, 2], :].mean(axis=1)
    right = lm[:, [14, 15, 16], :].mean(axis=1)
    side = right - left
    width = np.hypot(side[:, 0], side[:, 1])
    mid = (left + right) / 2.0
    # project the nose offset on the side-to-side axis (robust to in-plane roll)
    with np.errstate(invalid="ignore", divide="ignore"):
        axis = side / width[:, None]
        offset = ((lm[:, NOSE_TIP, :] - mid) * axis).sum(axis=1)
        ratio = np.clip(2.0 * offset / width, -1.0, 1.0)
        yaw = np.degrees(np.arcsin(ratio))
    yaw[~(width > 1e-6)] = np.nan
    return yaw.astype(np.float32)
