"""The reader's appearance augmentation: one random look per training sample.

Why (our choice, not the paper's; docs/METHOD.md): when the training videos show few people, a
model can lower its loss by memorising their looks and never read the reference. Here each
training sample gets one random change, the same for its reference, clip and motion frames:

* colour: contrast and saturation scales, a hue rotation about the grey axis and a brightness
  offset, as one affine map of RGB (``matrix`` [3, 3], ``offset`` [3]; RGB in -1..1);
* geometry: a horizontal flip (latents flipped along width, landmarks mirrored and relabelled).

The look of the target frames is then only knowable from the reference, so memorising any one
look cannot lower the loss.

Where (``reader.appearance_space``): the dataset stores VAE latents, no pixels, so the change is
made one of two ways:

* ``latent``: on the cached latents, through the dataset's
  :class:`~pipelines.encoders.latents.LatentColourMap` (a linear latent <-> RGB fit of the same
  VAE, in ``ingest_meta.json``): each latent moves by the encoder-side image of the RGB change.
  No VAE in the reader, so it costs nothing; right only for a VAE whose latents are close to
  linear in colour (SD's KL-VAE is; the fit's ``r2_decode`` says how close).
* ``pixel``: decode the sample's latents with the dataset's VAE, change the pixels, encode them
  again ("applied before encoding"): exact for any VAE, at the cost of one decode and one encode
  per frame of the sample (the tiny preset's 64 px VAE: ~0.13 CPU s for a stage-2 sample's 33
  latents), and the VAE's round-trip error on the changed samples.
* ``auto`` (default): ``latent`` when the map explains the colour (``r2_decode`` >=
  :data:`LINEAR_ENOUGH`), else ``pixel``. The tiny preset's fitted VAE is far from linear
  (``r2_decode`` ~0.2: a latent-space recolouring does not change its decoded colour at all), so
  it gets ``pixel``; synthetic test data (colour = latent channels 0-2, exactly) gets ``latent``.

The flip is exact in pixels and, in latent space, up to the VAE's own left-right asymmetry.
Evaluation samples are never changed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from core.sections import ReaderConfig
from pipelines.encoders.latents import LatentCodec, LatentColourMap
from pipelines.faces.landmarks import mirror_landmarks


@dataclass(frozen=True)
class AppearanceChange:
    """One sample's change: RGB' = ``matrix`` @ RGB + ``offset`` (RGB in -1..1), then a
    horizontal flip when ``flip``."""

    matrix: np.ndarray
    offset: np.ndarray
    flip: bool


def hue_rotation(degrees: float) -> np.ndarray:
    """[3, 3] rotation of RGB about the grey axis (1, 1, 1) by ``degrees``."""
    a = np.radians(degrees)
    u = np.ones(3) / np.sqrt(3.0)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)


def saturation_scale(s: float) -> np.ndarray:
    """[3, 3]: the grey part of RGB kept, the colour part scaled by ``s``."""
    grey = np.full((3, 3), 1.0 / 3.0)
    return grey + s * (np.eye(3) - grey)


def draw_change(rng: np.random.Generator, cfg: ReaderConfig) -> Optional[AppearanceChange]:
    """A random :class:`AppearanceChange` from the ``reader.aug_*`` ranges, or None (with
    probability 1 - ``aug_prob``, or when ``appearance_aug`` is off)."""
    if not cfg.appearance_aug or rng.random() >= cfg.aug_prob:
        return None
    contrast = rng.uniform(1 - cfg.aug_contrast, 1 + cfg.aug_contrast)
    matrix = contrast * hue_rotation(rng.uniform(-cfg.aug_hue_deg, cfg.aug_hue_deg)) @ \
        saturation_scale(rng.uniform(1 - cfg.aug_saturation, 1 + cfg.aug_saturation))
    offset = np.full(3, rng.uniform(-cfg.aug_brightness, cfg.aug_brightness))
    return AppearanceChange(matrix, offset, bool(rng.random() < cfg.aug_flip_prob))


def change_latents(latents: np.ndarray, change: AppearanceChange, colour_map: LatentColourMap) -> np.ndarray:
    """Latents [..., C, h, w] (float) under ``change``; float32, same shape."""
    out = colour_map.recolour(latents, change.matrix, change.offset)
    return np.ascontiguousarray(out[..., ::-1]) if change.flip else out


def change_frames(frames: np.ndarray, change: AppearanceChange) -> np.ndarray:
    """uint8 RGB frames [n, H, W, 3] under ``change`` (colour in -1..1, clipped; then the flip)."""
    x = np.asarray(frames, np.float32) / 127.5 - 1.0
    x = np.clip(x @ change.matrix.T.astype(np.float32) + change.offset.astype(np.float32), -1.0, 1.0)
    out = ((x + 1.0) * 127.5).round().astype(np.uint8)
    return np.ascontiguousarray(out[:, :, ::-1]) if change.flip else out


def change_latents_in_pixels(latents: np.ndarray, change: AppearanceChange, codec: LatentCodec) -> np.ndarray:
    """Latents [n, C, h, w] decoded by ``codec``, changed in pixels (:func:`change_frames`) and
    encoded again (posterior mean x scaling factor); float32 [n, C, h, w]."""
    frames = codec.decode(np.asarray(latents, np.float32), batch_size=64)
    return codec.encode(change_frames(frames, change), batch_size=64).astype(np.float32)


LINEAR_ENOUGH = 0.9  # r2_decode of the colour map above which ``auto`` works in latent space


def appearance_space(cfg: ReaderConfig, colour_map: LatentColourMap) -> str:
    """``latent`` or ``pixel`` for ``reader.appearance_space`` (``auto`` decided by the map's fit)."""
    if cfg.appearance_space != "auto":
        return cfg.appearance_space
    return "latent" if colour_map.r2_decode >= LINEAR_ENOUGH else "pixel"


def change_landmarks(landmarks: np.ndarray, change: AppearanceChange) -> np.ndarray:
    """Crop-normalised landmarks [..., 68, 2] (0..1) under ``change`` (only the flip moves them)."""
    return mirror_landmarks(landmarks, 1.0).astype(np.float32) if change.flip else landmarks
