"""Loopy's temporal segment module: squeeze a long motion-frame history into a few latents.

The motion history of a clip is the ``T`` frames just before it. Counting back from the clip,
segment ``k`` (k = 0 nearest) spans ``s * r**k`` frames and yields ``s`` abstract frames, one per
group of ``r**k`` consecutive frames. With s = 4, r = 2: segments of 4, 8, 16, 32, 64 frames
(T = 124) give 20 motion latents.

Conventions (one implementation, used by the training reader and the sampler alike):

* **Output order is time order**: output 0 is the oldest (farthest) abstract frame, output
  ``M-1`` the one just before the clip. The inter-clip temporal layer concatenates
  ``[motion ; clip]`` along time, so time order keeps that sequence monotonic.
* **Offsets** are negative frame offsets from the clip's first frame: ``-1`` is the frame just
  before the clip, ``-T`` the oldest.
* **Abstraction** ``uniform`` takes, in each group, the frame nearest to the clip (one frame out
  of every ``r**k``); ``mean`` averages the group's valid frames.
* **Missing history** (fewer than ``T`` frames before the clip: the start of a video, the first
  clips at inference): frames before the video start are invalid. An abstract frame with no valid
  source frame takes the ``fill`` latent (the reference latent) and its mask entry is False.
  Training and inference both go through :meth:`TemporalSegmentModule.reduce_groups`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from core.config import ConfigError

Abstraction = Literal["uniform", "mean"]


@dataclass(frozen=True)
class SegmentPlan:
    """Geometry of the segments. ``group_offsets[m]`` lists the source-frame offsets of output m."""

    stride: int
    ratio: int
    num_segments: int
    history_frames: int  # T = sum_k s * r**k
    group_offsets: tuple[tuple[int, ...], ...]  # [M][r**k], negative offsets, time order

    @property
    def num_outputs(self) -> int:
        return self.stride * self.num_segments

    def segment_spans(self) -> list[int]:
        """Frames per segment, nearest first: [s, s*r, s*r**2, ...]."""
        return [self.stride * self.ratio**k for k in range(self.num_segments)]

    def source_offsets(self, abstraction: Abstraction) -> np.ndarray:
        """Offsets actually read per output. ``uniform``: [M] (one each); ``mean``: ragged -> [M, G]
        padded with 0 (0 never names a history frame; :meth:`gather_mask` excludes it)."""
        if abstraction == "uniform":
            return np.array([g[-1] for g in self.group_offsets], dtype=np.int64)
        width = max(len(g) for g in self.group_offsets)
        out = np.zeros((self.num_outputs, width), dtype=np.int64)
        for m, g in enumerate(self.group_offsets):
            out[m, : len(g)] = g
        return out


def make_plan(history_frames: int = 124, stride: int = 4, ratio: int = 2) -> SegmentPlan:
    """Build the plan; ``history_frames`` must equal ``sum_k stride * ratio**k`` for some K."""
    if stride < 1 or ratio < 1:
        raise ConfigError(f"segment stride and ratio must be >= 1, got s={stride}, r={ratio}")
    spans, total = [], 0
    while total < history_frames:
        span = stride * ratio ** len(spans)
        spans.append(span)
        total += span
        if ratio == 1 and len(spans) > history_frames:
            break
    if total != history_frames:
        valid = []
        t = 0
        for k in range(8):
            t += stride * ratio**k
            valid.append(t)
        raise ConfigError(
            f"motion history of {history_frames} frames cannot be cut into segments of "
            f"{stride}*{ratio}**k frames; valid lengths for s={stride}, r={ratio}: {valid}"
        )
    # build groups nearest-first, then reverse into time order
    groups_nearest_first: list[tuple[int, ...]] = []
    start = 0  # frames already covered, counting back from the clip
    for k, span in enumerate(spans):
        size = ratio**k
        for j in range(stride):
            lo = start + j * size  # distance of the group's nearest frame minus one
            # offsets of the group in time order (oldest first): -(lo+size) .. -(lo+1)
            groups_nearest_first.append(tuple(range(-(lo + size), -lo)))
        start += span
    group_offsets = tuple(reversed(groups_nearest_first))
    return SegmentPlan(stride, ratio, len(spans), history_frames, group_offsets)


class TemporalSegmentModule(nn.Module):
    """Squeezes a time-ordered history ``[B, T, C, H, W]`` into ``[B, M, C, H, W]`` + mask ``[B, M]``.

    No parameters; an ``nn.Module`` so it sits in the Loopy model and moves with it.
    """

    def __init__(self, history_frames: int = 124, stride: int = 4, ratio: int = 2,
                 abstraction: Abstraction = "uniform"):
        super().__init__()
        if abstraction not in ("uniform", "mean"):
            raise ConfigError(f"abstraction must be 'uniform' or 'mean', got {abstraction!r}")
        self.plan = make_plan(history_frames, stride, ratio)
        self.abstraction = abstraction
        offsets = self.plan.source_offsets(abstraction)
        if offsets.ndim == 1:
            offsets = offsets[:, None]
        self.register_buffer("offsets", torch.as_tensor(offsets), persistent=False)  # [M, G]
        self.register_buffer("offset_valid", self.offsets < 0, persistent=False)  # [M, G]

    @property
    def num_outputs(self) -> int:
        return self.plan.num_outputs

    def source_indices(self, clip_start: int) -> np.ndarray:
        """Absolute frame indices read for a clip starting at ``clip_start``: [M, G];
        entries < 0 (before the video) or padding are -1."""
        idx = clip_start + self.offsets.cpu().numpy()
        idx[~self.offset_valid.cpu().numpy()] = -1
        idx[idx < 0] = -1
        return idx

    def reduce_groups(self, groups: torch.Tensor, valid: torch.Tensor, fill: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Abstract each group.

        groups: [B, M, G, C, H, W] source latents (any value where invalid)
        valid:  [B, M, G] bool, False for frames before the video start (and padding)
        fill:   [B, C, H, W] latent used where a group has no valid frame (the reference)
        returns motion [B, M, C, H, W], mask [B, M] (True = from real history)
        """
        valid = valid & self.offset_valid.to(valid.device)
        w = valid.to(groups.dtype)[..., None, None, None]  # [B, M, G, 1, 1, 1]
        count = w.sum(dim=2)  # [B, M, 1, 1, 1]
        if self.abstraction == "uniform":
            picked = groups[:, :, 0]
        else:
            picked = (groups * w).sum(dim=2) / count.clamp(min=1)
        mask = count[..., 0, 0, 0] > 0  # [B, M]
        motion = torch.where(mask[..., None, None, None], picked, fill[:, None].to(groups.dtype))
        return motion, mask

    def forward(self, history: torch.Tensor, history_valid: torch.Tensor, fill: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """history: [B, T, C, H, W] time order (index T-1 = frame just before the clip);
        history_valid: [B, T] bool; fill: [B, C, H, W]. Returns ([B, M, C, H, W], [B, M])."""
        b, t = history.shape[:2]
        if t != self.plan.history_frames:
            raise ValueError(f"history has {t} frames, the segment plan needs {self.plan.history_frames}")
        pos = (t + self.offsets).clamp(0, t - 1)  # [M, G]; padding entries are masked below
        groups = history[:, pos]  # [B, M, G, C, H, W]
        valid = history_valid[:, pos]  # [B, M, G]
        return self.reduce_groups(groups, valid, fill)
