"""Loopy's temporal layers: inter-clip (motion frames + clip) and intra-clip (clip only).

Both are temporal self-attention over the frame axis at every spatial position: the U-Net's
frame batch ``[(B F), N, C]`` is rearranged to ``[(B N), F, C]`` and back. Each layer is
pre-LayerNorm -> attention -> zero-initialised output projection, used as a residual branch, so a
freshly added temporal layer changes nothing (stage 2 starts as stage 1).

Inter-clip: keys/values are ``[motion ; clip]`` along time (motion = the reference net's tokens of
the M motion latents at the same layer, time order), with a learnable type embedding per kind
(row 0 motion, row 1 clip); queries are the clip frames. Motion keys are masked per sample
(invalid history slots, dropped motion frames); masking every motion key equals attending over
the clip alone. Intra-clip: clip frames attend to clip frames.

Position **(ours)**: the paper names only the type embeddings; without positions attention cannot
tell frame order, so both layers add a fixed sinusoidal encoding of the time index
(0..M+F-1 over ``[motion ; clip]``; clip frames keep indices M..M+F-1 in the intra layer too).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from models.reference_attention import AttentionProjections, attend


def sinusoidal_positions(length: int, dim: int, offset: int = 0, device=None, dtype=None) -> torch.Tensor:
    """[length, dim] sin/cos encoding of time indices offset..offset+length-1 (computed, no buffer)."""
    pos = torch.arange(offset, offset + length, device=device, dtype=torch.float32)[:, None]
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / max(half, 1))
    enc = torch.zeros(length, dim, device=device, dtype=torch.float32)
    enc[:, 0:2 * half:2] = torch.sin(pos * freq)
    enc[:, 1:2 * half:2] = torch.cos(pos * freq)
    return enc.to(dtype)


def frames_to_time_major(x: torch.Tensor, frames: int) -> torch.Tensor:
    """[(B F), N, C] -> [(B N), F, C]."""
    bf, n, c = x.shape
    return x.view(bf // frames, frames, n, c).permute(0, 2, 1, 3).reshape(-1, frames, c)


def time_to_frames_major(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[(B N), F, C] -> [(B F), N, C]."""
    bn, f, c = x.shape
    return x.view(batch, bn // batch, f, c).permute(0, 2, 1, 3).reshape(-1, bn // batch, c)


class InterClipTemporalLayer(nn.Module):
    """Clip queries attend over [motion ; clip] along time. Returns the residual delta [(B F), N, C]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.type_embedding = nn.Parameter(torch.randn(2, dim) * 0.02)  # 0: motion, 1: clip
        self.attn = AttentionProjections(dim, heads, zero_out=True)

    def forward(self, x: torch.Tensor, frames: int, motion: Optional[torch.Tensor],
                motion_keep: Optional[torch.Tensor]) -> torch.Tensor:
        """x: [(B F), N, C]; motion: [B, M, N, C] or None; motion_keep: bool [B, M] or None."""
        b = x.shape[0] // frames
        n, c = x.shape[1], x.shape[2]
        m = 0 if motion is None else motion.shape[1]
        clip = frames_to_time_major(self.norm(x), frames)  # [(B N), F, C]
        clip = clip + self.type_embedding[1] + sinusoidal_positions(frames, c, m, x.device, x.dtype)
        if motion is None:
            kv, mask = clip, None
        else:
            mot = self.norm(motion.to(x.dtype)).permute(0, 2, 1, 3).reshape(b * n, m, c)
            mot = mot + self.type_embedding[0] + sinusoidal_positions(m, c, 0, x.device, x.dtype)
            kv = torch.cat([mot, clip], dim=1)
            keep = torch.ones(b, m, dtype=torch.bool, device=x.device) if motion_keep is None else motion_keep
            keep = keep[:, None, :].expand(b, n, m).reshape(b * n, m)
            mask = torch.cat([keep, torch.ones(b * n, frames, dtype=torch.bool, device=x.device)], dim=1)
        out = attend(self.attn, clip, kv, mask)
        return time_to_frames_major(out, b)


class IntraClipTemporalLayer(nn.Module):
    """Temporal self-attention over the clip's own frames. Returns the residual delta [(B F), N, C]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = AttentionProjections(dim, heads, zero_out=True)

    def forward(self, x: torch.Tensor, frames: int, position_offset: int = 0) -> torch.Tensor:
        b = x.shape[0] // frames
        h = frames_to_time_major(self.norm(x), frames)
        h = h + sinusoidal_positions(frames, x.shape[2], position_offset, x.device, x.dtype)
        return time_to_frames_major(attend(self.attn, h, h), b)


class TemporalLayers(nn.Module):
    """Inter-clip then intra-clip, each residual: returns ``x2 - x`` where
    ``x1 = x + inter(x, motion)``, ``x2 = x1 + intra(x1)`` (shapes [(B F), N, C])."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.inter = InterClipTemporalLayer(dim, heads)
        self.intra = IntraClipTemporalLayer(dim, heads)

    def forward(self, x: torch.Tensor, frames: int, motion: Optional[torch.Tensor] = None,
                motion_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        d1 = self.inter(x, frames, motion, motion_keep)
        m = 0 if motion is None else motion.shape[1]
        d2 = self.intra(x + d1, frames, position_offset=m)
        return d1 + d2
