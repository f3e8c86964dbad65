"""Loopy's three-way classifier-free guidance, as one batched forward.

The paper (docs/METHOD.md, "Inference") makes three noise predictions per DDIM step:

* ``e_audio``: every condition (reference, audio, motion frames, audio-to-latents output);
* ``e_ref``: as ``e_audio`` with the audio condition zeroed;
* ``e_base``: audio zeroed and no reference features in self-attention (so, as in training,
  no motion-frame features either: dropping the reference implies dropping the motion frames),

and combines them as ``e = a * (e_audio - e_ref) + r * (e_ref - e_base) + e_base`` with
``a = audio_ratio = 5`` and ``r = ref_ratio = 3``.

**(ours)** "audio zeroed" also zeroes the audio-to-latents output (``drop_motion_cond``): at
inference that output is computed from the audio, so keeping it in ``e_ref`` would leak the audio
into the unconditional-on-audio branch.

The three conditions are stacked along the batch axis in :data:`CONDITIONS` order, giving a batch
of ``3B``; the model's per-sample boolean switches select each condition, so one forward call
serves all three. No row carries an SDPA mask for this (issue 14): the rows that drop the
reference (``base``, last) attend over their own tokens in a separate unmasked call, and since they
come last, the split is two contiguous slices of the batch (``models/reference_attention.py``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

CONDITIONS: tuple[str, str, str] = ("audio", "ref", "base")
"""Order of the three guidance conditions along the stacked batch axis."""


class GuidanceSwitches(NamedTuple):
    """Per-sample condition switches for a stacked batch of ``3B`` (``CONDITIONS`` order), bool [3B]."""

    drop_audio: torch.Tensor
    drop_motion_cond: torch.Tensor
    drop_ref: torch.Tensor
    drop_motion_frames: torch.Tensor


# (drop_audio, drop_motion_cond, drop_ref, drop_motion_frames) per condition
_SWITCHES = {
    "audio": (False, False, False, False),
    "ref": (True, True, False, False),
    "base": (True, True, True, True),
}


def guidance_switches(batch_size: int, device: torch.device | str = "cpu") -> GuidanceSwitches:
    """Switches for ``batch_size`` samples repeated for the three conditions: each bool [3 * batch_size]."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    columns = list(zip(*(_SWITCHES[c] for c in CONDITIONS)))  # 4 x (3 values)
    out = [
        torch.tensor(col, dtype=torch.bool, device=device).repeat_interleave(batch_size)
        for col in columns
    ]
    return GuidanceSwitches(*out)


def stack_conditions(x: torch.Tensor) -> torch.Tensor:
    """Repeat a per-sample tensor ``[B, ...]`` for the three conditions: ``[3B, ...]``
    (rows ``0..B-1`` audio, ``B..2B-1`` ref, ``2B..3B-1`` base)."""
    return torch.cat([x, x, x], dim=0)


def split_conditions(eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a stacked prediction ``[3B, ...]`` into ``(e_audio, e_ref, e_base)``, each ``[B, ...]``."""
    if eps.shape[0] % 3:
        raise ValueError(f"stacked guidance batch must be a multiple of 3, got {eps.shape[0]}")
    e_audio, e_ref, e_base = eps.chunk(3, dim=0)
    return e_audio, e_ref, e_base


def combine_guidance(e_audio: torch.Tensor, e_ref: torch.Tensor, e_base: torch.Tensor,
                     audio_ratio: float = 5.0, ref_ratio: float = 3.0) -> torch.Tensor:
    """``audio_ratio * (e_audio - e_ref) + ref_ratio * (e_ref - e_base) + e_base`` (same shape as inputs)."""
    if not (e_audio.shape == e_ref.shape == e_base.shape):
        raise ValueError(
            f"guidance predictions differ in shape: {tuple(e_audio.shape)}, "
            f"{tuple(e_ref.shape)}, {tuple(e_base.shape)}"
        )
    return audio_ratio * (e_audio - e_ref) + ref_ratio * (e_ref - e_base) + e_base


def combine_stacked(eps: torch.Tensor, audio_ratio: float = 5.0, ref_ratio: float = 3.0) -> torch.Tensor:
    """:func:`combine_guidance` of a stacked ``[3B, ...]`` prediction -> ``[B, ...]``."""
    return combine_guidance(*split_conditions(eps), audio_ratio=audio_ratio, ref_ratio=ref_ratio)
