"""The portrait: an image of any size -> the square face crop the model was trained on.

Exactly the ingest steps for one frame (same modules, same settings from the package's
``platform.yaml``): the frame is scaled down to ``ingest.detect_max_side`` for detection with
``pipelines.face_detect`` (``ingest.detector``), the landmarks are scaled back to source pixels,
``pipelines.crop.plan_crop_track`` plans the crop box (``ingest.crop_margin``) and
``pipelines.crop.crop_frames`` cuts and resizes it to ``ingest.crop_size``. The VAE encode of the
crop is done by the sampler (same :class:`pipelines.latents.LatentCodec` as ingest).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from inference.errors import BadInputError
from pipelines.crop import crop_frames, plan_crop_track
from pipelines.face_detect import make_detector


class NoFaceError(BadInputError):
    """No face was found in the portrait image."""


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file (any format Pillow reads, EXIF rotation applied) -> uint8 RGB [H, W, 3]."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
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


class PortraitCropper:
    """Face detection + crop of one image with the ingest code and the ingest settings."""

    def __init__(self, detector, crop_size: int, crop_margin: float, detect_max_side: Optional[int],
                 fps: float = 25.0):
        self.detector = detector
        self.crop_size = int(crop_size)
        self.crop_margin = float(crop_margin)
        self.detect_max_side = detect_max_side
        self.fps = fps

    @classmethod
    def from_config(cls, platform_cfg) -> "PortraitCropper":
        """Built from a :class:`core.config.PlatformConfig` (its ``ingest`` and ``weights`` sections)."""
        ic = platform_cfg.ingest
        return cls(make_detector(ic.detector, platform_cfg.weights.dwpose_dir), ic.crop_size,
                   ic.crop_margin, ic.detect_max_side, ic.fps)

    def landmarks(self, image: np.ndarray) -> Optional[np.ndarray]:
        """68 landmarks [68, 2] in source pixels of the image, or None when no face is found."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"portrait must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        small = downscale(image, self.detect_max_side)
        lm, found = self.detector.detect(small[None])
        if not bool(np.asarray(found)[0]):
            return None
        sx, sy = image.shape[1] / small.shape[1], image.shape[0] / small.shape[0]
        return np.asarray(lm, np.float32)[0] * np.array([sx, sy], np.float32)

    def has_face(self, image: np.ndarray) -> bool:
        return self.landmarks(image) is not None

    def crop(self, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> face crop uint8 [S, S, 3] (S = ``ingest.crop_size``).
        Raises :class:`NoFaceError` when no face is found."""
        lm = self.landmarks(image)
        if lm is None:
            raise NoFaceError("no face found in the portrait image")
        h, w = image.shape[:2]
        track = plan_crop_track(lm[None], np.array([True]), (w, h), self.crop_margin, fps=self.fps)
        return np.asarray(crop_frames(image[None], np.asarray(track.boxes)[:1], self.crop_size))[0]
