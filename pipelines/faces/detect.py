"""Face detection with 68-point landmarks: dlib HOG (default), dlib's CNN (MMOD) detector, MTCNN
(torch, batched, CPU or GPU: ``pipelines.faces.mtcnn``) or DWPose (onnxruntime) when its weights
are given; and the choice of the detection scale.

Every detector implements :class:`FaceLandmarkDetector` (the largest face of each frame; used by
single-image inference)::

    detect(frames: uint8 [n, H, W, 3] RGB) -> (landmarks float32 [n, 68, 2], found bool [n])

and :class:`FaceCandidateDetector` (every face of each frame, with scores; used by the ingest
tracker, ``pipelines.faces.tracks``)::

    detect_candidates(frames: uint8 [n, H, W, 3], scale: float = 1.0) -> FaceCandidates

``landmarks`` / boxes are pixel (x, y) in the coordinates of the given frames, iBUG-300W order
(``pipelines.faces.landmarks``); rows where ``found`` is False are NaN. ``scale`` resizes the frames
for the box search only (> 1 finds smaller faces); the 68 points are fitted on the given frames.
Detector objects (dlib models, onnxruntime sessions) are built once per instance, never per
frame; frames are fed as RGB.

Detection scale (:func:`search_face_scale`, :func:`pass_scale`): dlib's detectors scan an
image pyramid downwards from the given size, so one call finds every face from its minimum
window (``min_face_px``, about 64-80 px) up to the image size; faces below it vanish. The
ingest searches a few sampled frames at coarse-to-fine scales (faces >= 25 %, 10 %, 5 % of the
short side), then runs the whole pass at the scale that shows the faces found at
``target_face_px`` (~100 px), within a pixel budget.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, runtime_checkable

import numpy as np

from pipelines.errors import PipelineError
from pipelines.faces.landmarks import NUM_LANDMARKS, wholebody_to_face68
from pipelines.faces.mtcnn import Mtcnn, MtcnnWeightsError
from pipelines.faces.person_tracks import CANONICAL_FACE_PX
from pipelines.faces.tracks import (
    FaceCandidates,
    TrackParams,
    box_iou,
    link_tracks,
    summarize_tracks,
)


class FaceDetectorError(PipelineError, RuntimeError):
    """A detector that cannot be built (missing package, missing weights file)."""


@runtime_checkable
class FaceLandmarkDetector(Protocol):
    def detect(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [n, H, W, 3] RGB -> (float32 [n, 68, 2] pixel x, y (NaN if none), bool [n])."""
        ...


@runtime_checkable
class FaceCandidateDetector(Protocol):
    min_face_px: float  # smallest box width (detection-image pixels) found reliably

    def detect_candidates(self, frames: np.ndarray, scale: float = 1.0) -> FaceCandidates:
        """uint8 [n, H, W, 3] RGB -> every face of every frame (frame = index in ``frames``),
        boxes / landmarks in pixels of ``frames``; ``scale`` resizes for the box search only."""
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


def _resize(frame: np.ndarray, scale: float) -> np.ndarray:
    """Frame resized by ``scale`` (bilinear, antialiased when shrinking); scale 1 -> itself."""
    if abs(scale - 1.0) < 1e-3:
        return frame
    from PIL import Image

    h, w = frame.shape[:2]
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    return np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))


def _face_model_path(name: str, what: str) -> Path:
    """A model file of ``face_recognition_models``, located without importing the package (its
    ``__init__`` imports ``pkg_resources``)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceDetectorError("face_recognition_models is not installed (pip install face_recognition_models)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise FaceDetectorError(f"dlib {what} missing: {path}")
    return path


def dlib_shape_predictor_path() -> Path:
    """``face_recognition_models``' 68-point predictor file."""
    return _face_model_path("shape_predictor_68_face_landmarks.dat", "68-point model")


def dlib_face_descriptor_path() -> Path:
    """``face_recognition_models``' 128-d face descriptor network (a ResNet)."""
    return _face_model_path("dlib_face_recognition_resnet_model_v1.dat", "face descriptor network")


def dlib_cnn_detector_path() -> Path:
    """``face_recognition_models``' MMOD CNN face detector file."""
    return _face_model_path("mmod_human_face_detector.dat", "CNN face detector model")


def canonical_crop(frame: np.ndarray, box: np.ndarray, face_px: float = CANONICAL_FACE_PX,
                   context: float = 1.0) -> np.ndarray:
    """The region of ``frame`` around ``box`` (x0, y0, x1, y1 pixels), ``context`` box widths
    on each side, resized so the box is ``face_px`` wide: uint8 [S, S, 3], S = (1 + 2 x context)
    x face_px (outside the frame: black)."""
    from PIL import Image

    x0, y0, x1, y1 = (float(v) for v in box)
    w = max(x1 - x0, y1 - y0, 1.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = (0.5 + context) * w
    side = int(round((1 + 2 * context) * face_px))
    region = Image.fromarray(frame).crop((int(round(cx - half)), int(round(cy - half)),
                                          int(round(cx + half)), int(round(cy + half))))
    return np.asarray(region.resize((side, side), Image.Resampling.BILINEAR, reducing_gap=2.0))


#: The calibrated score of a face the detector does not find again at the canonical size
#: (dlib's HOG scores run about -1..3; a face it finds scores >= 0).
UNFOUND_SCORE = -1.0


def _canonical_score(frame: np.ndarray, box: np.ndarray, boxes_of) -> float:
    """``boxes_of``' best score on :func:`canonical_crop` of ``box`` among the boxes within half a
    face width of the crop's centre and of 0.67-1.5 x its size; :data:`UNFOUND_SCORE` when none."""
    crop = canonical_crop(frame, box)
    boxes, scores = boxes_of(crop)
    if len(boxes) == 0:
        return UNFOUND_SCORE
    boxes = np.asarray(boxes, np.float64)
    c = crop.shape[0] / 2
    centre = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], -1)
    w = boxes[:, 2] - boxes[:, 0]
    ok = (np.linalg.norm(centre - c, axis=-1) <= 0.5 * CANONICAL_FACE_PX) & (w >= CANONICAL_FACE_PX / 1.5) \
        & (w <= CANONICAL_FACE_PX * 1.5)
    return float(np.max(np.asarray(scores)[ok])) if ok.any() else UNFOUND_SCORE


#: The calibrated score is computed on every this many-th frame of a call (NaN on the others): a
#: track's median needs a sample, not every frame, and each re-score is a HOG run on a 300x300
#: crop (~5-10 ms CPU a box, as much as the box search itself on a 640x360 frame).
CALIBRATE_EVERY = 5


def _candidates_each(frames: np.ndarray, scale: float, boxes_of, fit, rescore=None,
                     rescore_every: int = CALIBRATE_EVERY) -> FaceCandidates:
    """Run ``boxes_of(image) -> (boxes [k, 4] image px, scores [k])`` on each frame resized by
    ``scale`` and ``fit(frame, box [4] frame px) -> [68, 2]`` on the original frame; with
    ``rescore`` (a ``boxes_of`` that reports weak boxes too), the calibrated score
    (:func:`_canonical_score`) of each box of every ``rescore_every``-th frame."""
    frames = _check_frames(frames)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    rows_f, rows_b, rows_s, rows_l, rows_c = [], [], [], [], []
    for i in range(frames.shape[0]):
        frame = np.ascontiguousarray(frames[i])
        boxes, scores = boxes_of(_resize(frame, scale))
        for box, score in zip(np.asarray(boxes, np.float64) / scale, scores):
            rows_f.append(i)
            rows_b.append(box)
            rows_s.append(float(score))
            rows_l.append(np.asarray(fit(frame, box), np.float32))
            calibrate = rescore is not None and i % max(1, rescore_every) == 0
            rows_c.append(_canonical_score(frame, box, rescore) if calibrate else np.nan)
    if not rows_f:
        return FaceCandidates.empty()
    return FaceCandidates(np.asarray(rows_f, np.int64), np.asarray(rows_b, np.float32),
                          np.asarray(rows_s, np.float32), np.stack(rows_l).astype(np.float32),
                          np.asarray(rows_c, np.float32))


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

    :meth:`detect`: the face box is found on a copy downscaled to ``detect_max_side`` (longest
    side, pixels; None = full size) and rescaled; the 68 points are then fitted on the
    full-size frame. ``upsample`` is dlib's pyramid upsampling count (1 finds faces down to
    ~40 px at ~4x cost). :meth:`detect_candidates`: every box with a HOG score >= ``min_score``
    (dlib's ``adjust_threshold``; its scores run about 0..3), with landmarks.
    """

    min_face_px = 64.0  # smallest HOG box found at upsample 0 (measured on the astronaut: ~63-73 px)

    def __init__(self, detect_max_side: Optional[int] = 480, upsample: int = 0, min_score: float = 0.0):
        import dlib

        self.detect_max_side = detect_max_side
        self.upsample = int(upsample)
        self.min_score = float(min_score)
        self.min_face_px = type(self).min_face_px / 2 ** self.upsample  # each upsampling halves it
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(dlib_shape_predictor_path()))
        self._rect = dlib.rectangle

    def detect(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _detect_each(frames, self._detect_one)

    def _boxes(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rects, scores, _ = self._detector.run(image, self.upsample, self.min_score)
        boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], np.float64).reshape(-1, 4)
        return boxes, np.asarray(scores, np.float32)

    def fit(self, frame: np.ndarray, box: np.ndarray) -> np.ndarray:
        """68 points [68, 2] fitted in ``box`` (x0, y0, x1, y1 pixels of ``frame``)."""
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        shape = self._predictor(frame, self._rect(x0, y0, x1, y1))
        return np.array([(shape.part(j).x, shape.part(j).y) for j in range(NUM_LANDMARKS)], np.float32)

    def _weak_boxes(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """HOG boxes down to :data:`UNFOUND_SCORE` (for the calibrated score)."""
        rects, scores, _ = self._detector.run(image, 0, UNFOUND_SCORE)
        boxes = np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in rects], np.float64).reshape(-1, 4)
        return boxes, np.asarray(scores, np.float32)

    def detect_candidates(self, frames: np.ndarray, scale: float = 1.0) -> FaceCandidates:
        """Every box with its landmarks and, on every :data:`CALIBRATE_EVERY`-th frame, its
        calibrated score: the HOG score of the same face re-found on a crop that shows it
        :data:`CANONICAL_FACE_PX` wide (the CNN detector is calibrated the same way, with HOG: its
        own pass at that size would cost seconds)."""
        return _candidates_each(frames, scale, self._boxes, self.fit, rescore=self._weak_boxes)

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


class DlibCnnDetector(DlibDetector):
    """dlib's MMOD CNN face detector (``mmod_human_face_detector.dat`` from
    ``face_recognition_models``) + the same 68-point shape predictor. More robust to pose and
    lighting than HOG, but about 10-50x slower on CPU (benchmarks/bench_detectors.py); scores are
    the CNN confidences (kept >= ``min_score``)."""

    min_face_px = 80.0  # smallest MMOD box found at upsample 0 (measured: faces of ~60 px are missed)

    def __init__(self, detect_max_side: Optional[int] = 480, upsample: int = 0, min_score: float = 0.0):
        import dlib

        super().__init__(detect_max_side, upsample, min_score)
        self._cnn = dlib.cnn_face_detection_model_v1(str(dlib_cnn_detector_path()))

    def _boxes(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found = [d for d in self._cnn(image, self.upsample) if d.confidence >= self.min_score]
        boxes = np.array([[d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()] for d in found],
                         np.float64).reshape(-1, 4)
        return boxes, np.array([d.confidence for d in found], np.float32)

    def _detect_one(self, frame: np.ndarray) -> Optional[list[tuple[int, int]]]:
        frame = np.ascontiguousarray(frame)
        small, scale = _downscale(frame, self.detect_max_side)
        boxes, _ = self._boxes(small)
        if len(boxes) == 0:
            return None
        box = boxes[int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))] / scale
        return self.fit(frame, box)


#: dlib-style box from MTCNN's 5 points (eye centres, nose, mouth corners): centre on the line
#: from the eyes' midpoint to the mouth's at this fraction, side = this many eye-to-mouth
#: distances. Measured against dlib's HOG boxes on the astronaut (0.61, 2.26) and Grace Hopper
#: (0.63, 2.40): the 68-point predictor (trained on HOG boxes) and the calibrated score (a HOG
#: re-score that accepts 0.67-1.5 x the box) both expect HOG-sized boxes; MTCNN's own box is
#: taller (forehead) and differs in size from HOG's from face to face.
_MTCNN_BOX_CENTRE, _MTCNN_BOX_SIDE = 0.62, 2.33


def box_from_five_points(points: np.ndarray) -> np.ndarray:
    """5 points [k, 5, 2] (left eye, right eye, nose, left / right mouth corner) -> dlib-style
    boxes [k, 4] (x0, y0, x1, y1 pixels)."""
    points = np.asarray(points, np.float64).reshape(-1, 5, 2)
    eyes, mouth = points[:, :2].mean(1), points[:, 3:].mean(1)
    d = np.linalg.norm(mouth - eyes, axis=-1, keepdims=True)
    centre = eyes + _MTCNN_BOX_CENTRE * (mouth - eyes)
    half = _MTCNN_BOX_SIDE * d / 2
    return np.concatenate([centre - half, centre + half], -1)


class MtcnnDetector(DlibDetector):
    """MTCNN (``pipelines.faces.mtcnn``: torch, batched, CPU or CUDA) finds the faces and their
    5 points; the 68 points are fitted by dlib's shape predictor in a HOG-sized box made from the
    5 points (:func:`box_from_five_points`), and the calibrated score is the same HOG re-score at
    :data:`CANONICAL_FACE_PX` as the other dlib detectors'. ``score`` = O-Net's face probability.
    ``batch_size`` frames go through the cascade at once (memory: the float copy of the frames and
    the first pyramid level). ``device``: "cpu", "cuda" or "cuda:N"."""

    #: Smallest dlib-style box (detection-image px) counted on: with the pyramid starting at
    #: :attr:`PYRAMID_MIN_PX`, rendered faces of 14, 16, 18, 20, 24, 28, 32 px were found in 4 of 4
    #: frames each (640x360, scale 1); 20 keeps a margin below which the 68 points are poor anyway.
    min_face_px = 20.0
    PYRAMID_MIN_PX = 20.0  # MTCNN box side (detection-image px) shown 12 px to P-Net

    def __init__(self, device: str = "cpu", detect_max_side: Optional[int] = 480, min_score: float = 0.9,
                 batch_size: int = 16):
        super().__init__(detect_max_side)
        self.device = device
        self.min_score = float(min_score)
        self.batch_size = max(1, int(batch_size))
        try:
            self._mtcnn = Mtcnn(device, min_face_px=self.PYRAMID_MIN_PX)
        except MtcnnWeightsError as exc:
            raise FaceDetectorError(str(exc)) from None

    def _cascade(self, frames: np.ndarray, scale: float):
        """MTCNN over ``frames`` in batches -> (frame [k], dlib-style boxes [k, 4], scores [k],
        5 points [k, 5, 2]), pixels of ``frames``; faces from ``PYRAMID_MIN_PX / scale`` px."""
        rows = [(np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))]
        for start in range(0, frames.shape[0], self.batch_size):
            found = self._mtcnn(frames[start:start + self.batch_size], min_face_px=self.PYRAMID_MIN_PX / scale)
            ok = found.scores >= self.min_score
            rows.append((found.frame[ok] + start, box_from_five_points(found.points[ok]), found.scores[ok],
                         found.points[ok]))
        return tuple(np.concatenate(col) for col in zip(*rows))

    def detect_candidates(self, frames: np.ndarray, scale: float = 1.0) -> FaceCandidates:
        """Every face with its landmarks and, on every :data:`CALIBRATE_EVERY`-th frame, its
        calibrated HOG score (as :meth:`DlibDetector.detect_candidates`). ``scale`` sets the
        smallest face searched (``min_face_px / scale`` pixels of ``frames``): the frames are not
        resized, the pyramid starts there."""
        frames = _check_frames(frames)
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        frame_of, boxes, scores, _ = self._cascade(frames, scale)
        if len(frame_of) == 0:
            return FaceCandidates.empty()
        marks, calibrated = [], []
        for f, box in zip(frame_of, boxes):
            frame = np.ascontiguousarray(frames[f])
            marks.append(self.fit(frame, box))
            calibrated.append(_canonical_score(frame, box, self._weak_boxes) if f % CALIBRATE_EVERY == 0 else np.nan)
        return FaceCandidates(frame_of.astype(np.int64), boxes.astype(np.float32), scores.astype(np.float32),
                              np.stack(marks).astype(np.float32), np.asarray(calibrated, np.float32))

    def detect(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The largest face of each frame (boxes searched at ``detect_max_side``)."""
        frames = _check_frames(frames)
        n, h, w = frames.shape[:3]
        scale = min(1.0, self.detect_max_side / max(h, w)) if self.detect_max_side else 1.0
        frame_of, boxes, _, _ = self._cascade(frames, scale)
        landmarks = np.full((n, NUM_LANDMARKS, 2), np.nan, dtype=np.float32)
        found = np.zeros(n, dtype=bool)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) if len(boxes) else np.zeros(0)
        for f in np.unique(frame_of):
            i = np.flatnonzero(frame_of == f)
            landmarks[f] = self.fit(np.ascontiguousarray(frames[f]), boxes[i[np.argmax(area[i])]])
            found[f] = True
        return landmarks, found


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
        sessions = []
        for model in (det, pose):
            try:
                sessions.append(ort.InferenceSession(str(model), providers=providers))
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors
                raise FaceDetectorError(f"{model}: not a loadable ONNX model ({type(exc).__name__})") from None
        self._det, self._pose = sessions
        self._pose_input = self._pose.get_inputs()[0].name
        self._pose_outputs = [o.name for o in self._pose.get_outputs()]
        self.min_score = min_score

    min_face_px = 24.0  # the pose model sees each person at 288x384 px whatever the frame size

    def _person_box(self, frame: np.ndarray) -> Optional[np.ndarray]:
        """Largest person box (x0, y0, x1, y1) in frame pixels from YOLOX, or None."""
        boxes = self._person_boxes(frame)
        if len(boxes) == 0:
            return None
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return boxes[int(np.argmax(areas))]

    def _person_boxes(self, frame: np.ndarray, max_people: int = 4) -> np.ndarray:
        """Person boxes [k, 4] (x0, y0, x1, y1 frame pixels) from YOLOX, largest first, at most
        ``max_people``, after a simple non-maximum suppression (IoU 0.45)."""
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
            return np.zeros((0, 4), np.float32)
        boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)[keep] / ratio
        score = score[keep]
        kept: list[int] = []
        for i in np.argsort(-score):  # greedy NMS: YOLOX's raw output has many boxes per person
            if all(box_iou(boxes[i:i + 1], boxes[j:j + 1])[0, 0] < 0.45 for j in kept):
                kept.append(int(i))
        boxes = boxes[kept]
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return boxes[np.argsort(-areas)[:max_people]].astype(np.float32)

    def detect(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _detect_each(frames, self._detect_one)

    def detect_candidates(self, frames: np.ndarray, scale: float = 1.0) -> FaceCandidates:
        """One candidate per person whose face points score >= ``min_score``: box = the face
        points' bounding box, score = their mean score (``scale`` is not needed: the pose model
        sees each person box at its own input size)."""
        frames = _check_frames(frames)
        rows_f, rows_b, rows_s, rows_l = [], [], [], []
        for i in range(frames.shape[0]):
            frame = np.ascontiguousarray(frames[i])
            for box in self._person_boxes(frame):
                face, mean_score = self._face_points(frame, box)
                if mean_score < self.min_score:
                    continue
                rows_f.append(i)
                rows_b.append([*face.min(axis=0), *face.max(axis=0)])
                rows_s.append(mean_score)
                rows_l.append(face)
        if not rows_f:
            return FaceCandidates.empty()
        scores = np.asarray(rows_s, np.float32)  # the pose model sees every person at one size: calibrated
        return FaceCandidates(np.asarray(rows_f, np.int64), np.asarray(rows_b, np.float32),
                              scores, np.stack(rows_l).astype(np.float32), scores.copy())

    def _detect_one(self, frame: np.ndarray) -> Optional[np.ndarray]:
        box = self._person_box(frame)
        if box is None:
            return None
        face, mean_score = self._face_points(frame, box)
        return face if mean_score >= self.min_score else None

    def _face_points(self, frame: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, float]:
        """The 68 face points [68, 2] (frame pixels) of the person in ``box`` and their mean score."""
        from PIL import Image

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
        return pose_input_to_image(face, centre, scale).astype(np.float32), float(face_scores.mean())


def make_detector(detector: str = "dlib", dwpose_dir: Optional[str] = None,
                  detect_max_side: Optional[int] = 480, device: str = "cpu"):
    """``"dlib"`` (HOG, offline default), ``"dlib_cnn"`` (MMOD CNN), ``"mtcnn"`` (torch, on
    ``device``) or ``"dwpose"``; a given ``dwpose_dir`` selects DWPose. The result implements both
    :class:`FaceLandmarkDetector` and :class:`FaceCandidateDetector`."""
    if dwpose_dir or detector == "dwpose":
        if not dwpose_dir:
            raise FaceDetectorError("detector 'dwpose' needs weights.dwpose_dir (yolox_l.onnx + dw-ll_ucoco_384.onnx)")
        return DWPoseDetector(dwpose_dir)
    if detector == "dlib_cnn":
        return DlibCnnDetector(detect_max_side=detect_max_side)
    if detector == "mtcnn":
        return MtcnnDetector(device=device, detect_max_side=detect_max_side)
    if detector != "dlib":
        raise FaceDetectorError(f"unknown detector {detector!r}: use 'dlib', 'dlib_cnn', 'mtcnn' or 'dwpose'")
    return DlibDetector(detect_max_side=detect_max_side)


# ---------------------------------------------------------------------------------------------
# Detection scale

SEARCH_FACE_FRACTIONS = (0.25, 0.10, 0.05)  # smallest face (x short side) each search level finds


@dataclass(frozen=True)
class ScaleSearch:
    """Outcome of :func:`search_face_scale`: ``face_px`` the width (display pixels) of the
    smallest face that matters (None: no persistent face in the samples), ``level`` the search
    level that found it (index into ``SEARCH_FACE_FRACTIONS``, -1 none), ``searched`` the
    scales tried (detection image / display frame)."""

    face_px: Optional[float]
    level: int
    searched: tuple[float, ...]
    largest_px: Optional[float] = None  # the largest persistent face (display px); None: face_px


def max_detection_scale(display_wh: tuple[int, int], max_pixels: int, max_upscale: float) -> float:
    """Largest scale (detection image / display frame) within ``max_pixels`` and ``max_upscale``."""
    w, h = display_wh
    return float(min(max_upscale, np.sqrt(max_pixels / max(w * h, 1))))


def search_levels(display_wh: tuple[int, int], min_face_px: float, max_pixels: int,
                  max_upscale: float = 2.0) -> list[float]:
    """Scales, coarse to fine, at which a detector with window ``min_face_px`` finds faces of
    ``SEARCH_FACE_FRACTIONS`` x the short side (capped by :func:`max_detection_scale`)."""
    short = min(display_wh)
    cap = max_detection_scale(display_wh, max_pixels, max_upscale)
    levels: list[float] = []
    for frac in SEARCH_FACE_FRACTIONS:
        s = min(cap, min_face_px / (frac * short))
        if not levels or s > levels[-1] * 1.05:
            levels.append(float(s))
    return levels


def search_face_scale(detector: FaceCandidateDetector, frames: np.ndarray, display_wh: tuple[int, int],
                      max_pixels: int, max_upscale: float = 2.0,
                      similar_size_ratio: float = TrackParams.similar_size_ratio) -> ScaleSearch:
    """Find the face size on a few sampled frames uint8 [k, h, w, 3] (any size; ``display_wh``
    is the display frame size they were scaled from), coarse to fine (:func:`search_levels`),
    stopping at the first level with a persistent face (one found in at least half the samples,
    linked with :func:`pipelines.faces.tracks.link_tracks`) whose faces down to
    ``similar_size_ratio`` x the largest it can find (otherwise the next, finer level is searched
    too: a large poster must not hide a smaller speaker). ``face_px`` is the smallest width among
    the persistent faces at least ``similar_size_ratio`` x the largest (the faces that decide the
    subject), in display pixels."""
    frames = _check_frames(frames)
    k, h, w = frames.shape[:3]
    to_display = display_wh[0] / w
    levels = search_levels(display_wh, detector.min_face_px, max_pixels, max_upscale)
    params = TrackParams(max_gap=k, max_centre_dist=1.0, gap_dist_per_frame=0.0, max_size_ratio=1.6)
    found: Optional[ScaleSearch] = None
    for level, s in enumerate(levels):
        cands = detector.detect_candidates(frames, scale=s * to_display)
        if len(cands) == 0:
            continue
        tracks = summarize_tracks(link_tracks(cands.frame, cands.boxes, params, cands.scores), cands, k)
        widths = [t.width * to_display for t in tracks if len(t.members) >= max(1, k / 2)]
        if widths:
            big = max(widths)
            face = min(wd for wd in widths if wd >= similar_size_ratio * big)
            found = ScaleSearch(float(face), level, tuple(levels[:level + 1]), float(big))
            if detector.min_face_px / s <= similar_size_ratio * big * 1.05:  # this level shows them all
                return found
    return found if found is not None else ScaleSearch(None, -1, tuple(levels))


#: The smallest face that matters is shown at least this many detector windows wide (HOG: 80 px).
SMALL_FACE_WINDOWS = 1.25


def pass_scale(search: ScaleSearch, display_wh: tuple[int, int], target_face_px: float,
               max_pixels: int, max_upscale: float = 2.0, min_side: int = 96,
               fallback_fraction: float = 0.10, min_face_px: float = 64.0) -> float:
    """Scale (detection image / display frame) of the whole detection pass: the searched face at
    ``target_face_px``, or (no face in the samples) the scale that finds faces of
    ``fallback_fraction`` x the short side; capped by :func:`max_detection_scale`, and at
    least so large that the short side keeps ``min_side`` pixels. With faces of several sizes
    the largest is shown at ``target_face_px`` and the smallest that matters at least at
    :data:`SMALL_FACE_WINDOWS` x ``min_face_px`` (safely above the detector's window, where its
    68 points are still good), not at ``target_face_px``: that would cost the square of the size
    ratio in pixels for every frame."""
    short = min(display_wh)
    if search.face_px is None:
        s = min_face_px / (fallback_fraction * short)
    else:
        largest = search.largest_px or search.face_px
        s = max(target_face_px / largest, min(target_face_px, SMALL_FACE_WINDOWS * min_face_px) / search.face_px)
    s = max(s, min(1.0, min_side / short))
    return float(min(s, max_detection_scale(display_wh, max_pixels, max_upscale)))


@dataclass(frozen=True)
class DetectionScale:
    """Outcome of :func:`choose_detection_scale`: ``scale`` (detection image / display frame) of
    the detection pass, the ``search`` behind it, and the sampled ``frames`` uint8 [k, h, w, 3]
    it ran on (decoded at most at the ``max_pixels`` budget)."""

    scale: float
    search: ScaleSearch
    frames: np.ndarray


def choose_detection_scale(detector: FaceCandidateDetector, sample_frames: Callable[[Optional[int]], np.ndarray],
                           display_wh: tuple[int, int], target_face_px: float, max_pixels: int,
                           max_upscale: float = 2.0,
                           similar_size_ratio: float = TrackParams.similar_size_ratio) -> DetectionScale:
    """The scale choice of ingest and of the portrait, in one place: ``sample_frames(max_side)``
    gives the sample frames uint8 [k, h, w, 3] with the long side at most ``max_side`` pixels
    (None: display size), here the largest side within ``max_pixels`` (and never upscaled: the
    search scales them itself); :func:`search_face_scale` finds the face size on them and
    :func:`pass_scale` turns it into the scale that shows it at ``target_face_px``."""
    cap = min(1.0, max_detection_scale(display_wh, max_pixels, max_upscale))
    frames = sample_frames(int(round(max(display_wh) * cap)) if cap < 1.0 else None)
    search = search_face_scale(detector, frames, display_wh, max_pixels, max_upscale, similar_size_ratio)
    scale = pass_scale(search, display_wh, target_face_px, max_pixels, max_upscale, min_face_px=detector.min_face_px)
    return DetectionScale(scale, search, frames)
