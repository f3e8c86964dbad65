"""The portrait: an image of any size -> the square face crop the model was trained on.

Exactly the ingest steps for one frame (same modules, same settings from the package's
``platform.yaml``): the face size is searched coarse to fine
(:func:`pipelines.faces.detect.search_face_scale`, the ingest's ``detect_max_pixels`` /
``detect_max_upscale`` budget), the image is detected at the scale that shows that face at
``ingest.detect_face_px`` (:func:`pipelines.faces.detect.pass_scale`), so a face of 5 % of a phone
photo's width is found as well as one that fills the frame. The subject is the largest face; a
second face at least ``ingest.similar_face_ratio`` x its width is an error (which person?), as in
ingest. ``pipelines.faces.crop.plan_crop_track`` plans the crop box (``ingest.crop_margin``) and
``pipelines.faces.crop.crop_frames`` cuts and resizes it to ``ingest.crop_size``. The VAE encode of the
crop is done by the sampler (same :class:`pipelines.encoders.latents.LatentCodec` as ingest).

Framing, as in ingest (docs/INGEST.md "Close-ups"): a portrait whose head (the landmark box plus
the forehead and chin allowances of :mod:`pipelines.faces.crop`) leaves the image is refused
(:class:`HeadCutError`, naming the part outside); a close-up whose head is in the image but whose
asked crop is not gets the package's ``ingest.crop_fill`` rule, the one its training data was cut
with (default ``reduce``: a smaller margin, every pixel real).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from inference.errors import BadInputError
from pipelines.faces.crop import FILL_MODES, CropTrack, crop_frames, plan_crop_track
from pipelines.faces.detect import choose_detection_scale, make_detector
from pipelines.media.images import image_to_rgb


class NoFaceError(BadInputError):
    """No face was found in the portrait image."""


class SeveralFacesError(BadInputError):
    """The portrait shows more than one face of similar size: which one should talk is unclear."""


class HeadCutError(NoFaceError):
    """The face is found but the image edge cuts the head (chin, forehead or a side outside): there
    is no whole face to animate. A :class:`NoFaceError` (no usable face), so callers that report
    an unusable portrait image (the CLI's ``--image``, the service's 422 on ``image``) catch it."""


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file (any format Pillow reads, EXIF rotation applied) -> uint8 RGB [H, W, 3]."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return image_to_rgb(img)  # 16-bit, greyscale, transparent: one rule (pipelines/media/images.py)
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not a decodable image ({type(exc).__name__}: {exc})") from exc


def downscale(image: np.ndarray, max_side: Optional[int]) -> np.ndarray:
    """Scale uint8 [H, W, 3] so its longest side is at most ``max_side`` (never up)."""
    from PIL import Image

    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR), dtype=np.uint8)


def check_landmarks(landmarks, image_shape: tuple[int, ...]) -> np.ndarray:
    """``landmarks`` as float32 [68, 2] (x, y pixels) checked against an image of ``image_shape``
    ([H, W, ...]): the shape, finite values, every point within the image (1 px of slack)."""
    lm = np.asarray(landmarks, dtype=np.float32)
    if lm.shape != (68, 2) or not np.all(np.isfinite(lm)):
        raise ValueError(f"landmarks must be 68 finite (x, y) points, got shape {lm.shape}")
    h, w = image_shape[:2]
    if lm[:, 0].min() < -1 or lm[:, 1].min() < -1 or lm[:, 0].max() > w + 1 or lm[:, 1].max() > h + 1:
        raise ValueError(f"landmarks fall outside the {w}x{h} image")
    return lm


class PortraitCropper:
    """Face detection + crop of one image with the ingest code and the ingest settings."""

    def __init__(self, detector, crop_size: int, crop_margin: float, fps: float = 25.0,
                 detect_face_px: float = 100.0, detect_max_pixels: int = 3_200_000,
                 detect_max_upscale: float = 2.0, similar_face_ratio: float = 0.7, crop_fill: str = "reduce"):
        if crop_fill not in FILL_MODES:
            raise ValueError(f"crop_fill must be one of {', '.join(FILL_MODES)}; got {crop_fill!r}")
        self.detector = detector
        self.crop_size = int(crop_size)
        self.crop_margin = float(crop_margin)
        self.crop_fill = crop_fill
        self.fps = fps
        self.detect_face_px = float(detect_face_px)
        self.detect_max_pixels = int(detect_max_pixels)
        self.detect_max_upscale = float(detect_max_upscale)
        self.similar_face_ratio = float(similar_face_ratio)

    @classmethod
    def from_config(cls, platform_cfg) -> "PortraitCropper":
        """Built from a :class:`core.config.PlatformConfig` (its ``ingest`` and ``weights`` sections)."""
        ic = platform_cfg.ingest
        return cls(make_detector(ic.detector, platform_cfg.weights.dwpose_dir), ic.crop_size, ic.crop_margin,
                   ic.fps, ic.detect_face_px, ic.detect_max_pixels, ic.detect_max_upscale, ic.similar_face_ratio,
                   ic.crop_fill)

    def landmarks(self, image: np.ndarray) -> Optional[np.ndarray]:
        """68 landmarks [68, 2] in source pixels of the subject's face, or None when no face is
        found. Raises :class:`SeveralFacesError` when a second face is about as large and
        :class:`HeadCutError` when the image edge cuts the subject's head (:meth:`plan`)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"portrait must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        choice = choose_detection_scale(self.detector, lambda side: downscale(image, side)[None], (w, h),
                                        self.detect_face_px, self.detect_max_pixels, self.detect_max_upscale,
                                        self.similar_face_ratio)
        if choice.search.face_px is None:
            return None
        frames = choice.frames
        to_display = w / frames.shape[2]  # detection frames -> source pixels
        cands = self.detector.detect_candidates(frames, scale=choice.scale * to_display)
        if len(cands) == 0:
            return None
        widths = cands.boxes[:, 2] - cands.boxes[:, 0]
        order = np.argsort(-widths)
        if len(order) > 1 and widths[order[1]] >= self.similar_face_ratio * widths[order[0]]:
            raise SeveralFacesError(f"the portrait shows {int(np.sum(widths >= self.similar_face_ratio * widths[order[0]]))} "
                                    f"faces of similar size; send an image of one person")
        back = np.array([w / frames.shape[2], h / frames.shape[1]], np.float32)
        lm = np.asarray(cands.landmarks[order[0]], np.float32) * back
        self.plan(lm, (w, h))  # a head cut by the image edge is refused here, before any job is queued
        return lm

    def plan(self, landmarks: np.ndarray, image_wh: tuple[int, int]) -> CropTrack:
        """The crop of the face with ``landmarks`` [68, 2] (source pixels) in an image of
        ``image_wh`` = (W, H): ingest's crop track of one frame (``ingest.crop_margin``, the
        ``ingest.crop_fill`` rule; its ``note()`` says what was reduced or filled). Raises
        :class:`HeadCutError` when the head box leaves the image (ingest rejects such frames)."""
        track = plan_crop_track(np.asarray(landmarks, np.float32)[None], np.array([True]), image_wh,
                                self.crop_margin, fps=self.fps, fill=self.crop_fill)
        if track.head_cut_ratio > 0:
            where = " and ".join(track.head_cut_parts)
            raise HeadCutError(f"the image edge cuts the head ({where} outside): send a portrait that shows the "
                               f"whole face, some forehead above the brows and the chin inside the picture")
        return track

    def has_face(self, image: np.ndarray) -> bool:
        return self.landmarks(image) is not None

    def crop(self, image: np.ndarray, landmarks: Optional[np.ndarray] = None) -> np.ndarray:
        """uint8 [H, W, 3] -> face crop uint8 [S, S, 3] (S = ``ingest.crop_size``).

        ``landmarks``: the subject's 68 landmarks [68, 2] in ``image`` pixels when already found
        (by :meth:`landmarks`, e.g. in the service's upload check); the face search, the costly
        part (seconds for a phone photo on a CPU), is then not run again. Raises
        :class:`NoFaceError` when no face is found, :class:`HeadCutError` (a ``NoFaceError``) when
        the image edge cuts the head, ``ValueError`` for landmarks of the wrong shape, not finite,
        or outside the image. A close-up whose asked crop does not fit the image is cut by the
        ``ingest.crop_fill`` rule (:meth:`plan`)."""
        lm = self.landmarks(image) if landmarks is None else check_landmarks(landmarks, image.shape)
        if lm is None:
            raise NoFaceError("no face found in the portrait image")
        h, w = image.shape[:2]
        track = self.plan(lm, (w, h))
        return np.asarray(crop_frames(image[None], np.asarray(track.boxes)[:1], self.crop_size,
                                      fill=self.crop_fill))[0]
