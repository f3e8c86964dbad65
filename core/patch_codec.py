"""A linear patch codec: the tiny preset's image <-> latent map (ours, not the paper's).

Why not a small ``AutoencoderKL``: fitted for minutes on the sample faces, the tiny KL-VAE
decodes the faces of *unseen* people to frames where dlib finds no face (docs/EVALUATION.md), so
no tiny model could draw a person it never saw. A linear map over small patches has no such
problem: its basis describes image patches in general (edges, gradients, colour), not the faces
it was fitted on, so any portrait encodes and decodes alike.

The map (P = ``patch_size``, D = 3 P^2, k = ``latent_channels``):

* ``encode``: image [n, 3, H, W] in [-1, 1] -> cut into non-overlapping P x P patches, each
  flattened to D values (row, column, colour order: :func:`patchify`) -> ``(patch - mean) @ basis.T
  / latent_std`` -> latents [n, k, H/P, W/P].
* ``decode``: ``latents * latent_std @ basis + mean`` -> patches -> image [n, 3, H, W].

``basis`` [k, D] has orthonormal rows, so ``decode(encode(x))`` is the orthogonal projection of
``x``'s patches onto the basis: the best k-dimensional linear code of a patch in the mean-squared
sense when the basis is the patches' principal components (:meth:`PatchCodec.fit`).
``latent_std`` [k] whitens the latents (each channel of unit variance on the fitted data), as
Stable Diffusion's ``scaling_factor`` does with one number for its VAE: the diffusion model's noise
then drowns every channel at the same rate. ``config.scaling_factor`` stays 1.0 for that reason.

An unfitted codec (:meth:`PatchCodec.dct`) uses the 2-D DCT-II of each patch in an orthonormal
luma / chroma colour space, lowest frequencies first, luma before chroma (JPEG's idea): a usable
codec before any fitting, which the tiny preset's random weights use.

The class is a diffusers ``ModelMixin`` + ``ConfigMixin``, so ``save_pretrained`` /
``from_pretrained`` (``config.json`` + safetensors) work as for ``AutoencoderKL``, and its outputs
are diffusers' own (``AutoencoderKLOutput`` with a deterministic ``DiagonalGaussianDistribution``,
``DecoderOutput``): code written for the KL-VAE (``latent_dist.mean``, ``.sample``) runs unchanged.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from torch import nn

# orthonormal opponent colour space (rows: luma, blue-yellow, red-green), for the DCT basis
_COLOUR = np.array([[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]])
_COLOUR = _COLOUR / np.linalg.norm(_COLOUR, axis=1, keepdims=True)
CHROMA_FREQUENCY_COST = 3.0  # a chroma coefficient ranks like a luma one of 3x its frequency


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[n, 3, H, W] -> [n, H/P, W/P, D]: each patch flattened in (row, column, colour) order."""
    n, c, h, w = x.shape
    p = patch_size
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # n, h/p, w/p, row, col, colour
    return x.reshape(n, h // p, w // p, p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: [n, h, w, D] -> [n, 3, h P, w P]."""
    n, h, w, _ = patches.shape
    p = patch_size
    x = patches.reshape(n, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, channels, h * p, w * p)


def dct_basis(patch_size: int, count: int) -> np.ndarray:
    """The ``count`` lowest-frequency rows of the orthonormal 2-D DCT-II of a P x P RGB patch in the
    luma / chroma space ``_COLOUR``: float64 [count, 3 P^2] with orthonormal rows, in
    :func:`patchify`'s order. Rank: u + v, times ``CHROMA_FREQUENCY_COST`` + 1 for chroma."""
    p = patch_size
    k = np.arange(p)
    dct = np.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * p)) * math.sqrt(2.0 / p)  # [freq, pos]
    dct[0] /= math.sqrt(2.0)
    rows, ranks = [], []
    for colour in range(3):
        for u in range(p):
            for v in range(p):
                wave = np.einsum("r,c,k->rck", dct[u], dct[v], _COLOUR[colour])  # row, col, rgb
                rows.append(wave.reshape(-1))
                cost = 1.0 if colour == 0 else CHROMA_FREQUENCY_COST
                ranks.append((u + v + (0 if colour == 0 else 1)) * cost + colour * 1e-3)
    order = np.argsort(np.asarray(ranks), kind="stable")[:count]
    return np.stack(rows)[order]


class PatchCodec(ModelMixin, ConfigMixin):
    """Linear patch codec (module docstring). Shapes: image [n, 3, H, W] in [-1, 1] (H, W
    multiples of ``patch_size``) <-> latents [n, ``latent_channels``, H/P, W/P]."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, patch_size: int = 8, latent_channels: int = 48, in_channels: int = 3,
                 sample_size: int = 64, scaling_factor: float = 1.0):
        super().__init__()
        dim = in_channels * patch_size * patch_size
        if not 1 <= latent_channels <= dim:
            raise ValueError(f"PatchCodec: latent_channels must be in 1..{dim} (3 x patch_size^2), "
                             f"got {latent_channels}")
        self.mean = nn.Parameter(torch.zeros(dim), requires_grad=False)
        self.basis = nn.Parameter(torch.from_numpy(dct_basis(patch_size, latent_channels)).float(),
                                  requires_grad=False)
        self.latent_std = nn.Parameter(torch.ones(latent_channels), requires_grad=False)

    @property
    def downsample(self) -> int:
        return int(self.config.patch_size)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Image [n, 3, H, W] in [-1, 1] -> ``AutoencoderKLOutput`` whose ``latent_dist`` is a
        deterministic Gaussian at the latents [n, k, H/P, W/P] (``mean`` = ``sample()`` = ``mode()``)."""
        p = self.config.patch_size
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"PatchCodec.encode: images must be [n, {self.config.in_channels}, H, W] with H, W "
                             f"multiples of {p}, got {tuple(x.shape)}")
        patches = patchify(x.to(self.basis.dtype), p)
        z = ((patches - self.mean) @ self.basis.T) / self.latent_std  # [n, h, w, k]
        z = z.permute(0, 3, 1, 2)
        dist = DiagonalGaussianDistribution(torch.cat([z, torch.zeros_like(z)], dim=1), deterministic=True)
        if not return_dict:
            return (dist,)
        return AutoencoderKLOutput(latent_dist=dist)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """Latents [n, k, h, w] -> ``DecoderOutput(sample=image [n, 3, h P, w P])`` (not clamped)."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"PatchCodec.decode: latents must be [n, {self.config.latent_channels}, h, w], "
                             f"got {tuple(z.shape)}")
        z = z.to(self.basis.dtype).permute(0, 2, 3, 1)  # n, h, w, k
        patches = (z * self.latent_std) @ self.basis + self.mean
        x = unpatchify(patches, self.config.patch_size, self.config.in_channels)
        if not return_dict:
            return (x,)
        return DecoderOutput(sample=x)

    def pixel_energy(self) -> torch.Tensor:
        """[k]: the squared pixel-space norm of the patch that one latent unit of each channel decodes
        to (``latent_std^2``, the basis rows being orthonormal): the weight that makes a latent-space
        MSE the MSE of the decoded patches (``train.latent_loss_weight=pixel``)."""
        return self.latent_std.detach().double() ** 2

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> "PatchCodec":
        """Set ``mean``, ``basis`` and ``latent_std`` to the principal components of the patches of
        ``images`` [n, 3, H, W] in [-1, 1] (float64 SVD; needs at least ``latent_channels``
        patches). Returns ``self``."""
        k = self.config.latent_channels
        patches = patchify(images.double(), self.config.patch_size).reshape(-1, self.mean.numel())
        if len(patches) < k + 1:
            raise ValueError(f"PatchCodec.fit: {len(patches)} patches, need more than {k}")
        mean = patches.mean(0)
        _, s, vt = torch.linalg.svd(patches - mean, full_matrices=False)
        std = s[:k] / math.sqrt(len(patches) - 1)
        self.mean.copy_(mean.float())
        self.basis.copy_(vt[:k].float())
        self.latent_std.copy_(std.clamp(min=1e-4).float())
        return self
