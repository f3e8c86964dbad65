"""68-point face landmarks per frame (largest face), dlib by default, DWPose (onnxruntime) when
its weights are given.

Every detector implements :class:`FaceLandmarkDetector`::

    detect(frames: uint8 [n, H, W, 3] RGB) -> (landmarks float32 [n, 68, 2], found bool [n])

``landmarks`` are pixel (x, y) in the coordinates of the given frames, iBUG-300W order
(``pipelines.landmarks``); rows where ``found`` is False are NaN. Detector objects (dlib models,
onnxruntime sessions) are built once per instance, never per frame; frames are fed as RGB.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

import numpy as np

from pipelines.errors import PipelineError
from pipelines.landmarks import NUM_LANDMARKS, wholebody_to_face68


class FaceDetectorError(PipelineError, RuntimeError):
    """A detector that cannot be built (missing package, missing weights file)."""


@runtime_checkable
class FaceLandmarkDetector(Protocol):
    def detect(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [n, H, W, 3] RGB -> (float32 [n, 68, 2] pixel x, y (NaN if none), bool [n])."""
        ...


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [n, H, W, 3] RGB, got {frames.dtype} {frames.shape}")
    return frames


def _downscale(frame: np.ndarray, max_side: Optional[int]) -> tuple[np.ndarray, float]:
    """Frame resized so its longest side is <= max_side; returns (image, scale = new / old)."""
    h, w = frame.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return frame, 1.0
    from PIL import Image

    scale = max_side / max(h, w)
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    small = np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
    return small, size[0] / w


def dlib_shape_predictor_path() -> Path:
    """``face_recognition_models``' 68-point predictor file, located without importing the
    package (its ``__init__`` imports ``pkg_resources``)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceDetectorError("face_recognition_models is not installed (pip install face_recognition_models)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "shape_predictor_68_face_landmarks.dat"
    if not path.is_file():
        raise FaceDetectorError(f"dlib 68-point model missing: {path}")
    return path


def _detect_each(frames: np.ndarray, detect_one) -> tuple[np.ndarray, np.ndarray]:
    """Run ``detect_one(frame [H, W, 3]) -> [68, 2] pixel points or None`` over ``frames``
    [n, H, W, 3] RGB -> (landmarks float32 [n, 68, 2], NaN where no face; found bool [n])."""
    frames = _check_frames(frames)
    n = frames.shape[0]
    landmarks = np.full((n, NUM_LANDMARKS, 2), np.nan, dtype=np.float32)
    found = np.zeros(n, dtype=bool)
    for i in range(n):
        points = detect_one(frames[i])
        if points is not None:
            landmarks[i] = points
            found[i] = True
    return landmarks, found


class DlibDetector:
    """dlib HOG frontal face detector + 68-point shape predictor.

    The face box is found on a copy downscaled to ``detect_max_side`` (longest side, pixels;
    None = full size) and rescaled; the 68 points are then fitted on the full-size frame.
    ``upsample`` is dlib's pyramid upsampling count (1 finds faces down to ~40 px at 2x cost).
    """

    def __init__(self, detect_max_side: Optional[int] = 480, upsample: int = 0):
        import dlib

        self.detect_max_side = detect_max_side
        self.upsample = int(upsample)
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(dlib_shape_predictor_path()))
        self._rect = dlib.rectangle

    def detect(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _detect_each(frames, self._detect_one)

    def _detect_one(self, frame: np.ndarray) -> Optional[list[tuple[int, int]]]:
        frame = np.ascontiguousarray(frame)  # RGB, as dlib expects
        small, scale = _downscale(frame, self.detect_max_side)
        rects = self._detector(small, self.upsample)
        if len(rects) == 0:
            return None
        r = max(rects, key=lambda q: q.width() * q.height())
        inv = 1.0 / scale
        full = self._rect(int(round(r.left() * inv)), int(round(r.top() * inv)),
                          int(round(r.right() * inv)), int(round(r.bottom() * inv)))
        shape = self._predictor(frame, full)
        return [(shape.part(j).x, shape.part(j).y) for j in range(NUM_LANDMARKS)]


# ---------------------------------------------------------------------------------------------
# DWPose (YOLOX-L person boxes + RTMPose-style whole-body model, SimCC heads), onnxruntime.
DWPOSE_DET_FILE = "yolox_l.onnx"
DWPOSE_POSE_FILE = "dw-ll_ucoco_384.onnx"
_DET_INPUT = (640, 640)  # h, w
_POSE_INPUT = (384, 288)  # h, w
_SIMCC_SPLIT = 2.0  # SimCC bins per input pixel
_POSE_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
_POSE_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)


def simcc_decode(simcc_x: np.ndarray, simcc_y: np.ndarray, split: float = _SIMCC_SPLIT
                 ) -> tuple[np.ndarray, np.ndarray]:
    """SimCC logits [n, K, Wx], [n, K, Wy] -> (keypoints float32 [n, K, 2] in model-input pixels,
    scores float32 [n, K]) by arg-max over the bins (bins / ``split`` = pixels)."""
    x = np.argmax(simcc_x, axis=-1).astype(np.float32) / split
    y = np.argmax(simcc_y, axis=-1).astype(np.float32) / split
    score = np.minimum(simcc_x.max(axis=-1), simcc_y.max(axis=-1)).astype(np.float32)
    return np.stack([x, y], axis=-1), score


def box_to_pose_input(box: np.ndarray, padding: float = 1.25) -> tuple[np.ndarray, np.ndarray]:
    """Person box (x0, y0, x1, y1) -> (centre [2], scale [2] = (w, h) of the region fed to the pose
    model, enlarged by ``padding`` and matched to its 3:4 aspect)."""
    x0, y0, x1, y1 = [float(v) for v in box]
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2], dtype=np.float32)
    w, h = (x1 - x0) * padding, (y1 - y0) * padding
    aspect = _POSE_INPUT[1] / _POSE_INPUT[0]
    if w > h * aspect:
        h = w / aspect
    else:
        w = h * aspect
    return centre, np.array([w, h], dtype=np.float32)


def pose_input_to_image(points: np.ndarray, centre: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Keypoints [..., 2] in pose-input pixels (w=288, h=384) -> source image pixels."""
    size = np.array([_POSE_INPUT[1], _POSE_INPUT[0]], dtype=np.float32)
    return (points / size - 0.5) * scale + centre


class DWPoseDetector:
    """DWPose whole-body keypoints; the face points are COCO-WholeBody 23..90 (the 68 iBUG points).

    ``weights_dir`` must hold ``yolox_l.onnx`` (person boxes) and ``dw-ll_ucoco_384.onnx``
    (pose). onnxruntime is imported here, lazily (``pip install onnxruntime``). The largest
    person box is used; a face counts as found when the mean face-point score >= ``min_score``.
    Not exercised with real weights in this repository's tests (none are shipped).
    """

    def __init__(self, weights_dir: str | Path, min_score: float = 0.3, providers: Optional[list[str]] = None):
        self.weights_dir = Path(weights_dir)
        det, pose = self.weights_dir / DWPOSE_DET_FILE, self.weights_dir / DWPOSE_POSE_FILE
        missing = [str(p) for p in (det, pose) if not p.is_file()]
        if missing:
            raise FaceDetectorError(f"DWPose weights missing: {', '.join(missing)} (weights.dwpose_dir)")
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise FaceDetectorError(
                "DWPose needs onnxruntime: pip install onnxruntime (or set weights.dwpose_dir: null for dlib)"
            ) from exc
        providers = providers or ["CPUExecutionProvider"]
        self._det = ort.InferenceSession(str(det), providers=providers)
        self._pose = ort.InferenceSession(str(pose), providers=providers)
        self._pose_input = self._pose.get_inputs()[0].name
        self._pose_outputs = [o.name for o in self._pose.get_outputs()]
        self.min_score = min_score

    def _person_box(self, frame: np.ndarray) -> Optional[np.ndarray]:
        """Largest person box (x0, y0, x1, y1) in frame pixels from YOLOX, or None."""
        from PIL import Image

        h, w = frame.shape[:2]
        ratio = min(_DET_INPUT[0] / h, _DET_INPUT[1] / w)
        resized = np.asarray(Image.fromarray(frame).resize((int(w * ratio), int(h * ratio)), Image.Resampling.BILINEAR))
        canvas = np.full((_DET_INPUT[0], _DET_INPUT[1], 3), 114, dtype=np.float32)
        canvas[: resized.shape[0], : resized.shape[1]] = resized
        blob = canvas.transpose(2, 0, 1)[None]
        out = self._det.run(None, {self._det.get_inputs()[0].name: blob})[0][0]  # [A, 5 + classes]
        grids, strides = [], []
        for stride in (8, 16, 32):
            gh, gw = _DET_INPUT[0] // stride, _DET_INPUT[1] // stride
            yv, xv = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
            grids.append(np.stack([xv, yv], -1).reshape(-1, 2))
            strides.append(np.full((gh * gw, 1), stride))
        grid, stride = np.concatenate(grids), np.concatenate(strides)
        xy = (out[:, :2] + grid) * stride
        wh = np.exp(out[:, 2:4]) * stride
        score = out[:, 4] * out[:, 5]  # objectness x person class
        keep = score > 0.3
        if not keep.any():
            return None
        boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)[keep] / ratio
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return boxes[int(np.argmax(areas))]

    def detect(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _detect_each(frames, self._detect_one)

    def _detect_one(self, frame: np.ndarray) -> Optional[np.ndarray]:
        from PIL import Image

        box = self._person_box(frame)
        if box is None:
            return None
        centre, scale = box_to_pose_input(box)
        x0, y0 = centre - scale / 2
        region = (float(x0), float(y0), float(x0 + scale[0]), float(y0 + scale[1]))
        crop = Image.fromarray(frame).transform(
            (_POSE_INPUT[1], _POSE_INPUT[0]), Image.Transform.EXTENT, region, Image.Resampling.BILINEAR)
        blob = ((np.asarray(crop, dtype=np.float32) - _POSE_MEAN) / _POSE_STD).transpose(2, 0, 1)[None]
        sx, sy = self._pose.run(self._pose_outputs, {self._pose_input: blob})[:2]
        pts, scores = simcc_decode(sx, sy)
        face = wholebody_to_face68(pts[0])
        face_scores = wholebody_to_face68(scores[0][:, None])[:, 0]
        if float(face_scores.mean()) < self.min_score:
            return None
        return pose_input_to_image(face, centre, scale)


def make_detector(detector: str = "dlib", dwpose_dir: Optional[str] = None,
                  detect_max_side: Optional[int] = 480) -> FaceLandmarkDetector:
    """``"dlib"`` (offline default) or ``"dwpose"``; a given ``dwpose_dir`` selects DWPose."""
    if dwpose_dir or detector == "dwpose":
        if not dwpose_dir:
            raise FaceDetectorError("detector 'dwpose' needs weights.dwpose_dir (yolox_l.onnx + dw-ll_ucoco_384.onnx)")
        return DWPoseDetector(dwpose_dir)
    if detector != "dlib":
        raise FaceDetectorError(f"unknown detector {detector!r}: use 'dlib' or 'dwpose'")
    return DlibDetector(detect_max_side=detect_max_side)
