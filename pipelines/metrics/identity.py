"""Does a video show the person of its reference? Face-descriptor distances and ArcFace similarity.

* :class:`FaceDescriber`: dlib's 128-d face descriptor (the ResNet of ``face_recognition_models``,
  ``dlib_face_recognition_resnet_model_v1.dat``) of the largest face of each frame, found by dlib
  HOG + the 68-point predictor on a copy upscaled to >= ``min_side`` px (the same upscaling as
  the landmark metrics, :func:`pipelines.metrics.video_metrics.upscale_for_detection`). Two photos
  of one person are usually < 0.6 apart (:data:`SAME_PERSON_DISTANCE`, dlib's threshold).
* :func:`video_identity`: ``identity`` = mean distance from the generated frames to the reference
  frame, ``identity_gt`` = the same for the real frames, plus the descriptors that the split-level
  :func:`split_identity` needs for ``identity_control`` (distance to the *other* videos'
  references: what a model that ignores its reference scores) and ``identity_nearest`` (1 when the
  video's own reference is the nearest of the split's references).
* :class:`ArcFaceEmbedder`: ``csim``, the cosine similarity of ArcFace embeddings (a TorchScript
  network given by path, never downloaded; input aligned 112 x 112 RGB in -1..1 by the standard
  five-point template, output [n, 512]).

Frames are uint8 [T, H, W, 3] RGB. Distances are Euclidean in descriptor space (unitless).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pipelines.errors import PipelineError
from pipelines.faces.detect import DlibDetector, dlib_face_descriptor_path, dlib_shape_predictor_path
from pipelines.metrics.video_metrics import MIN_DETECT_SIDE, upscale_for_detection

SAME_PERSON_DISTANCE = 0.6  # dlib's threshold for "the same person" on its descriptor
DESCRIPTOR_DIM = 128
#: ArcFace's 112 x 112 alignment template: left eye, right eye, nose tip, left and right mouth corner
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


class IdentityMetricError(PipelineError, RuntimeError):
    """An identity network that cannot be loaded or run (names the file)."""


class FaceDescriber:
    """dlib's 128-d face descriptor of the largest face in each frame (see the module docstring)."""

    def __init__(self, min_side: int = MIN_DETECT_SIDE):
        import dlib

        self.min_side = int(min_side)
        self.detector = DlibDetector(detect_max_side=None)
        self.predictor = dlib.shape_predictor(str(dlib_shape_predictor_path()))
        self.network = dlib.face_recognition_model_v1(str(dlib_face_descriptor_path()))

    def describe(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(descriptors float64 [T, 128], NaN rows where no face; found bool [T])."""
        import dlib

        big, _ = upscale_for_detection(np.asarray(frames), self.min_side)
        points, found = self.detector.detect(big)
        out = np.full((len(big), DESCRIPTOR_DIM), np.nan)
        for i in np.flatnonzero(found):
            pts = np.asarray(points[i], dtype=np.float64)
            lo, hi = pts.min(0), pts.max(0)
            rect = dlib.rectangle(int(lo[0]), int(lo[1]), int(math.ceil(hi[0])), int(math.ceil(hi[1])))
            shape = dlib.full_object_detection(rect, [dlib.point(int(round(x)), int(round(y))) for x, y in pts])
            out[i] = np.asarray(self.network.compute_face_descriptor(np.ascontiguousarray(big[i]), shape))
        return out, np.asarray(found, dtype=bool)


def mean_distance(descriptors: np.ndarray, reference: np.ndarray) -> float:
    """Mean Euclidean distance of the rows of ``descriptors`` [T, 128] (NaN rows skipped) to
    ``reference`` [128]; NaN when either has no face."""
    d = np.asarray(descriptors, dtype=np.float64)
    ok = np.isfinite(d).all(axis=1)
    if not ok.any() or not np.isfinite(reference).all():
        return float("nan")
    return float(np.linalg.norm(d[ok] - reference, axis=1).mean())


@dataclass
class VideoIdentity:
    """One video's identity figures: ``metrics`` (``identity``, ``identity_gt``,
    ``identity_found_ratio``), and the generated frames' descriptors [k, 128] and the reference's
    [128] for the split-level figures."""

    metrics: dict[str, float]
    generated: np.ndarray
    reference: np.ndarray


def frame_subset(count: int, most: int) -> np.ndarray:
    """At most ``most`` frame indices spread evenly over ``count`` frames."""
    return np.unique(np.linspace(0, count - 1, min(count, most)).round().astype(np.int64)) if count else \
        np.zeros(0, np.int64)


def video_identity(describer: FaceDescriber, generated: np.ndarray, real: Optional[np.ndarray],
                   reference: np.ndarray, most_frames: int = 25) -> VideoIdentity:
    """Identity figures of one video: ``generated`` / ``real`` uint8 [T, H, W, 3] (real may be
    None), ``reference`` uint8 [H, W, 3] the frame the generator was given; ``most_frames``
    frames spread over the video are described (the descriptor costs ~0.1 s a frame on a CPU)."""
    ref_desc, ref_found = describer.describe(np.asarray(reference)[None])
    idx = frame_subset(len(generated), most_frames)
    gen_desc, gen_found = describer.describe(np.asarray(generated)[idx])
    metrics = {"identity": mean_distance(gen_desc, ref_desc[0]),
               "identity_found_ratio": float(gen_found.mean()) if len(gen_found) else float("nan")}
    if real is not None:
        ridx = frame_subset(len(real), most_frames)
        real_desc, _ = describer.describe(np.asarray(real)[ridx])
        metrics["identity_gt"] = mean_distance(real_desc, ref_desc[0])
    return VideoIdentity(metrics, gen_desc, ref_desc[0])


def split_identity(videos: Sequence[VideoIdentity]) -> list[dict[str, float]]:
    """Per video of a split: ``identity_control`` (mean distance of its generated frames to the
    other videos' references; NaN with fewer than two videos) and ``identity_nearest`` (1.0 when
    its own reference is nearer than every other reference, else 0.0; NaN without a face)."""
    out = []
    for i, v in enumerate(videos):
        others = [mean_distance(v.generated, u.reference) for j, u in enumerate(videos) if j != i]
        others = [d for d in others if math.isfinite(d)]
        own = v.metrics.get("identity", float("nan"))
        control = float(np.mean(others)) if others else float("nan")
        nearest = float("nan") if not (others and math.isfinite(own)) else float(own < min(others))
        out.append({"identity_control": control, "identity_nearest": nearest,
                    "identity_margin": control - own if math.isfinite(control) and math.isfinite(own) else float("nan")})
    return out


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """The ArcFace template's five points from 68 landmarks [68, 2]: eye centres, nose tip, mouth corners."""
    lm = np.asarray(landmarks, dtype=np.float64)
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]])


class ArcFaceEmbedder:
    """ArcFace embeddings from a TorchScript file (``evaluation.arcface_path``): faces aligned to
    :data:`ARCFACE_TEMPLATE` by a similarity transform of five landmark points."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        import torch

        self.path = Path(path)
        if not self.path.is_file():
            raise IdentityMetricError(f"ArcFace network {self.path}: no such file")
        try:
            self.net = torch.jit.load(str(self.path), map_location=device).eval()
        except Exception as exc:  # noqa: BLE001 - any load failure is this file's fault
            raise IdentityMetricError(f"ArcFace network {self.path}: cannot load as TorchScript: {exc}") from exc
        self.device = device
        self.detector = DlibDetector(detect_max_side=None)

    def aligned(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 [k, 112, 112, 3] aligned faces, found bool [T]) of ``frames`` [T, H, W, 3]."""
        from skimage.transform import SimilarityTransform, warp

        big, scale = upscale_for_detection(np.asarray(frames), MIN_DETECT_SIDE)
        points, found = self.detector.detect(big)
        faces = []
        for i in np.flatnonzero(found):
            tform = SimilarityTransform.from_estimate(ARCFACE_TEMPLATE, five_points(points[i]))
            face = warp(big[i], tform, output_shape=(112, 112), order=1, preserve_range=True)
            faces.append(face.round().clip(0, 255).astype(np.uint8))
        return (np.stack(faces) if faces else np.zeros((0, 112, 112, 3), np.uint8)), np.asarray(found, bool)

    def embed(self, frames: np.ndarray) -> np.ndarray:
        """L2-normalised embeddings [k, D] of the frames where a face is found."""
        import torch

        faces, _ = self.aligned(frames)
        if not len(faces):
            return np.zeros((0, 0))
        x = torch.from_numpy(faces).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).to(self.device)
        with torch.no_grad():
            e = self.net(x)
        if e.ndim != 2:
            raise IdentityMetricError(f"ArcFace network {self.path}: output shape {tuple(e.shape)}, expected [n, D]")
        e = torch.nn.functional.normalize(e.float(), dim=1)
        return e.cpu().numpy()

    def csim(self, generated: np.ndarray, reference: np.ndarray, most_frames: int = 25) -> float:
        """Mean cosine similarity of the generated frames' embeddings to the reference's; NaN
        when either has no face."""
        ref = self.embed(np.asarray(reference)[None])
        gen = self.embed(np.asarray(generated)[frame_subset(len(generated), most_frames)])
        if not len(ref) or not len(gen):
            return float("nan")
        return float((gen @ ref[0]).mean())
