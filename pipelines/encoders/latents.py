"""Frames <-> VAE latents with SD's KL autoencoder (diffusers ``AutoencoderKL``, not a VQ-VAE) or
the tiny preset's linear :class:`core.patch_codec.PatchCodec` (same interface).

One implementation for ingest (encode every crop once, offline) and the sampler (decode generated
latents, encode the reference image).

Conventions:
* Frames: uint8 RGB [n, S, S, 3] (S divisible by 8), mapped to [-1, 1] as ``x / 127.5 - 1``.
* Latents: [n, C, S/d, S/d] = ``latent_dist.mean * scaling_factor`` (0.18215 for SD-1.5), so they
  have roughly unit variance, as the diffusion model expects. C = the codec's ``latent_channels``
  (4 for SD's VAE), d its downsampling (8 for SD's 4-level VAE, ``patch_size`` for a PatchCodec).
* ``encode`` uses the posterior **mean**, not a sample: it is deterministic (the same frame always
  gives the same latent, so stored latents are reproducible) and the posterior's std is tiny for
  SD's VAE (sampling would only add noise of order exp(logvar / 2)). ``encode(..., sample=True)``
  draws ``mean + std * eps`` instead, from a seeded generator.
* ``decode`` divides by the scaling factor, decodes, clamps to [-1, 1] and rounds to uint8.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from core.weights import load_vae


def vae_downsample(config: dict) -> int:
    """Pixels per latent along a side, from a codec's config: ``patch_size`` (PatchCodec), else
    2^(levels - 1) of an ``AutoencoderKL`` (8 for SD's 4 levels; 8 when the field is absent)."""
    if config.get("patch_size"):
        return int(config["patch_size"])
    return 2 ** (len(config.get("block_out_channels") or [0] * 4) - 1)


class LatentCodec:
    """Encode frames to scaled KL-VAE latents and decode them back.

    ``location``: a diffusers ``AutoencoderKL`` or ``PatchCodec`` folder (``resolve_weights(...).vae``:
    the tiny preset or ``<sd15>/vae``), loaded with ``core.weights.load_vae``. Models run under
    ``torch.inference_mode`` on ``device`` in ``dtype``; results come back on the CPU as numpy.
    """

    def __init__(self, location: str, local_files_only: bool = True, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.location = str(location)
        self.device = torch.device(device)
        self.dtype = dtype
        vae = load_vae(self.location, local_files_only, torch_dtype=dtype)
        self.vae = vae.to(device=self.device).eval()
        cfg = self.vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = vae_downsample(dict(cfg))

    def latent_shape(self, size: int) -> tuple[int, int, int]:
        """Latent shape of one S x S frame: (4, S/8, S/8)."""
        if size % self.downsample:
            raise ValueError(f"LatentCodec: frame size {size} is not divisible by {self.downsample}")
        return (self.latent_channels, size // self.downsample, size // self.downsample)

    def _check_frames(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"LatentCodec.encode: frames must be uint8 [n, H, W, 3] RGB, got shape {frames.shape}")
        if frames.dtype != np.uint8:
            raise ValueError(f"LatentCodec.encode: frames must be uint8 (0..255), got {frames.dtype}")
        h, w = frames.shape[1:3]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"LatentCodec.encode: frame size {h}x{w} is not divisible by {self.downsample}")
        return frames

    def encode(self, frames: np.ndarray, batch_size: int = 16, sample: bool = False,
               generator: torch.Generator | None = None) -> np.ndarray:
        """uint8 RGB [n, S, S, 3] -> float16 [n, 4, S/8, S/8] (posterior mean x scaling_factor).

        Batched by ``batch_size`` frames (bounds memory). ``sample=True``: draw from the posterior
        with ``generator`` (a ``torch.Generator``) instead of taking its mean.
        """
        frames = self._check_frames(frames)
        if batch_size < 1:
            raise ValueError(f"LatentCodec.encode: batch_size must be >= 1, got {batch_size}")
        out = np.empty((frames.shape[0], self.latent_channels, frames.shape[1] // self.downsample,
                        frames.shape[2] // self.downsample), dtype=np.float16)
        with torch.inference_mode():
            for i in range(0, frames.shape[0], batch_size):
                x = torch.from_numpy(np.ascontiguousarray(frames[i:i + batch_size])).to(self.device)
                x = x.permute(0, 3, 1, 2).to(self.dtype) / 127.5 - 1.0  # [b, 3, S, S] in [-1, 1]
                dist = self.vae.encode(x).latent_dist
                z = dist.sample(generator=generator) if sample else dist.mean
                out[i:i + batch_size] = (z.float() * self.scaling_factor).cpu().numpy().astype(np.float16)
        return out

    def decode(self, latents: Union[np.ndarray, torch.Tensor], batch_size: int = 16) -> np.ndarray:
        """Scaled latents [n, 4, h, w] (numpy or torch, any float dtype) -> uint8 RGB [n, 8h, 8w, 3]."""
        z = torch.as_tensor(np.asarray(latents) if not isinstance(latents, torch.Tensor) else latents)
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"LatentCodec.decode: latents must be [n, {self.latent_channels}, h, w], got {tuple(z.shape)}")
        chunks = []
        with torch.inference_mode():
            for i in range(0, z.shape[0], batch_size):
                zb = z[i:i + batch_size].to(device=self.device, dtype=self.dtype) / self.scaling_factor
                x = self.vae.decode(zb).sample.float().clamp(-1.0, 1.0)
                x = ((x + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
                chunks.append(x.cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, 0, 0, 3), np.uint8)



@dataclass(frozen=True)
class LatentColourMap:
    """The linear relation between a VAE's scaled latents and colour, per latent position.

    ``decode`` float [3, C + 1]: RGB in -1..1 of the pixel block behind one latent position
    ~= ``decode @ [z; 1]``. ``encode`` float [C, 4]: ``z ~= encode @ [rgb; 1]``. Both are least-squares
    fits (``r2_decode`` / ``r2_encode``: the share of variance they explain) on smooth random colour
    fields, the stimulus that isolates colour from structure. Used by the reader's appearance
    augmentation to recolour cached latents without a VAE (:mod:`pipelines.reader.appearance`).
    """

    decode: np.ndarray
    encode: np.ndarray
    r2_decode: float
    r2_encode: float

    def to_dict(self) -> dict:
        return {"decode": self.decode.round(6).tolist(), "encode": self.encode.round(6).tolist(),
                "r2_decode": round(float(self.r2_decode), 4), "r2_encode": round(float(self.r2_encode), 4)}

    @classmethod
    def from_dict(cls, data: dict) -> "LatentColourMap":
        dec = np.asarray(data["decode"], np.float64)
        enc = np.asarray(data["encode"], np.float64)
        c = enc.shape[0]
        if dec.shape != (3, c + 1) or enc.shape != (c, 4):
            raise ValueError(f"latent colour map: decode {dec.shape} / encode {enc.shape} are not [3, C+1] / [C, 4]")
        return cls(dec, enc, float(data.get("r2_decode", float("nan"))), float(data.get("r2_encode", float("nan"))))

    def recolour(self, latents: np.ndarray, matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """Latents [..., C, h, w] whose colour is ``matrix @ rgb + offset`` (RGB in -1..1,
        ``matrix`` [3, 3], ``offset`` [3]) where it was ``rgb``; float32, same shape."""
        z = np.moveaxis(np.asarray(latents, np.float64), -3, -1)  # [..., h, w, C]
        rgb = z @ self.decode[:, :-1].T + self.decode[:, -1]  # [..., h, w, 3]
        delta = rgb @ (np.asarray(matrix, np.float64) - np.eye(3)).T + np.asarray(offset, np.float64)
        z = z + delta @ self.encode[:, :3].T
        return np.moveaxis(z, -1, -3).astype(np.float32)


def _least_squares(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """W [out, in + 1] with y ~= W @ [x; 1] (rows are samples), and its R^2."""
    xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    w, *_ = np.linalg.lstsq(xa, y, rcond=None)
    resid = y - xa @ w
    r2 = 1.0 - float((resid ** 2).sum() / max(((y - y.mean(0)) ** 2).sum(), 1e-12))
    return w.T, r2


def fit_colour_map(codec: LatentCodec, size: int = 64, count: int = 48, seed: int = 0) -> LatentColourMap:
    """Fit :class:`LatentColourMap` for ``codec``'s VAE on ``count`` smooth random colour fields
    of ``size`` px (the VAE is convolutional, so a small size serves any crop size)."""
    from scipy.ndimage import zoom

    rng = np.random.default_rng(seed)
    cells = rng.uniform(0, 1, size=(count, 4, 4, 3))
    fields = np.stack([zoom(c, (size / 4, size / 4, 1), order=1)[:size, :size] for c in cells])
    frames = (np.clip(fields, 0, 1) * 255 + 0.5).astype(np.uint8)  # [n, S, S, 3]
    z = codec.encode(frames).astype(np.float64)  # [n, C, h, w]
    d = codec.downsample
    h = size // d
    rgb = frames.astype(np.float64).reshape(count, h, d, h, d, 3).mean(axis=(2, 4)) / 127.5 - 1.0  # [n, h, h, 3]
    zr = np.moveaxis(z, 1, -1).reshape(-1, z.shape[1])
    rr = rgb.reshape(-1, 3)
    dec, r2d = _least_squares(zr, rr)
    enc, r2e = _least_squares(rr, zr)
    return LatentColourMap(dec, enc, r2d, r2e)
