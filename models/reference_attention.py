"""Attention processors that connect Loopy's reference net to its denoising U-Net.

Both U-Nets are plain diffusers ``UNet2DConditionModel``s (SD-1.5 layout). Their behaviour is
changed only through attention processors, so SD-1.5 weights load unchanged:

* reference net, spatial self-attention (``attn1``): :class:`ReferenceWriteProcessor` records the
  tokens entering the layer (the ``norm1`` output, ``[frames, h*w, C]``) under the layer name, then
  runs ordinary self-attention.
* denoising U-Net, spatial self-attention (``attn1``): :class:`LoopySelfAttnProcessor` attends
  over ``[own tokens ; reference tokens of the same layer]`` (keys/values concatenated along the
  token axis; the reference keys are masked out for samples whose reference is dropped), and in
  stage 2 adds the audio cross-attention and the temporal layers (see ``audio_modules`` and
  ``temporal_layers``) to the self-attention output.
* both U-Nets, text cross-attention (``attn2``): :class:`ContextAttnProcessor`, SD's attention on
  Loopy's small learnable context (Loopy has no text).

The per-call data travels as ``cross_attention_kwargs={"loopy": LoopyCallContext}``; diffusers
hands it to every processor, so there is no hidden state on the modules between calls.
All attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (SDPA).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn


class AttentionProjections(nn.Module):
    """q/k/v/out projections of one multi-head attention (used by Loopy's added layers).

    Same attribute names as diffusers' ``Attention`` (``to_q``, ``to_k``, ``to_v``, ``to_out``,
    ``heads``) so :func:`attend` serves both; a plain module (not an ``Attention``) so diffusers'
    processor bookkeeping (``unet.attn_processors``) does not see it. ``zero_out``: the output
    projection starts at zero (a new residual branch that changes nothing at first).
    """

    def __init__(self, query_dim: int, heads: int, kv_dim: Optional[int] = None, zero_out: bool = True):
        super().__init__()
        kv_dim = query_dim if kv_dim is None else kv_dim
        if query_dim % heads:
            raise ValueError(f"attention width {query_dim} is not divisible by {heads} heads")
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(kv_dim, query_dim, bias=False)
        self.to_v = nn.Linear(kv_dim, query_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(query_dim, query_dim), nn.Identity()])
        if zero_out:
            nn.init.zeros_(self.to_out[0].weight)
            nn.init.zeros_(self.to_out[0].bias)


def attend(attn: "Attention | AttentionProjections", query_in: torch.Tensor, kv_in: torch.Tensor,
           key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head SDPA with ``attn``'s projections.

    query_in: [b, n, Cq]; kv_in: [b, k, Ckv]; key_mask: bool [b, k] (True = attend) or None.
    Returns [b, n, C_out] (after ``attn.to_out``). Uses ``attn.heads`` and SDPA's default scale
    (head_dim ** -0.5, the same as SD's attention).
    """
    b, n, _ = query_in.shape
    heads = attn.heads
    q = attn.to_q(query_in)
    k = attn.to_k(kv_in)
    v = attn.to_v(kv_in)
    q = q.view(b, n, heads, -1).transpose(1, 2)
    k = k.view(b, k.shape[1], heads, -1).transpose(1, 2)
    v = v.view(b, v.shape[1], heads, -1).transpose(1, 2)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = out.transpose(1, 2).reshape(b, n, -1).to(query_in.dtype)
    out = attn.to_out[0](out)
    return attn.to_out[1](out)


@dataclass
class ReferenceFeatures:
    """The reference net's output: per layer, the tokens entering its spatial self-attention.

    Timestep-independent (the reference net always runs at t = 0): compute once per clip and reuse
    at every denoising step.

    ref_tokens[layer]:    [B, N, C]     the reference frame (N = h*w of the layer)
    motion_tokens[layer]: [B, M, N, C]  the M motion latents, time order (None in stage 1 or
                                        when no motion latents were given); also holds, under
                                        their module names, the outputs of the residual blocks
                                        that carry temporal layers (see ``models/loopy.py``)
    ref_keep:             bool [B]      False = the reference is dropped for this sample
    motion_valid:         bool [B, M]   True = motion latent from real history (segment mask)
    motion_keep:          bool [B, M]   motion_valid & ~drop_motion_frames & ~drop_ref
    """

    ref_tokens: dict[str, torch.Tensor]
    motion_tokens: Optional[dict[str, torch.Tensor]]
    ref_keep: torch.Tensor
    motion_valid: Optional[torch.Tensor]
    motion_keep: Optional[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return int(self.ref_keep.shape[0])

    def with_drops(self, drop_ref: torch.Tensor, drop_motion_frames: Optional[torch.Tensor] = None
                   ) -> "ReferenceFeatures":
        """Same features, new per-sample switches (bool [B]); no recomputation. Dropping the
        reference also drops the motion frames (as in training)."""
        drop_ref = drop_ref.to(device=self.ref_keep.device, dtype=torch.bool)
        motion_keep = None
        if self.motion_valid is not None:
            drop_mf = drop_ref if drop_motion_frames is None else (
                drop_motion_frames.to(drop_ref.device, torch.bool) | drop_ref)
            motion_keep = self.motion_valid & ~drop_mf[:, None]
        return replace(self, ref_keep=~drop_ref, motion_keep=motion_keep)

    def repeat(self, times: int) -> "ReferenceFeatures":
        """Batch ``[all B ; all B ; ...]`` (``times`` copies), e.g. for the sampler's guidance
        conditions in one batched call; set the switches afterwards with :meth:`with_drops`."""
        def rep(t):
            return None if t is None else torch.cat([t] * times, dim=0)
        motion = None if self.motion_tokens is None else {k: rep(v) for k, v in self.motion_tokens.items()}
        return ReferenceFeatures({k: rep(v) for k, v in self.ref_tokens.items()}, motion,
                                 rep(self.ref_keep), rep(self.motion_valid), rep(self.motion_keep))


@dataclass
class LoopyCallContext:
    """Per-call data handed to the processors through ``cross_attention_kwargs["loopy"]``.

    Reference-net call: ``store`` is a dict the write processors fill ({layer: [frames, N, C]}).
    Denoising call: ``reference`` (batch B), ``num_frames`` F (the U-Net batch is B*F frames,
    frame-major per sample), ``audio_tokens`` [B*F, W, Ca] or None (stage 1).
    """

    store: Optional[dict[str, torch.Tensor]] = None
    reference: Optional[ReferenceFeatures] = None
    num_frames: int = 1
    audio_tokens: Optional[torch.Tensor] = None
    ref_mask_needed: bool = True  # False when no sample drops its reference: skip the mask


class ContextAttnProcessor(AttnProcessor2_0):
    """SD's cross-attention (``attn2``) unchanged; accepts (and ignores) the Loopy context."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, loopy: Optional[LoopyCallContext] = None, *args, **kwargs):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class ReferenceWriteProcessor(AttnProcessor2_0):
    """Reference net ``attn1``: record the input tokens [frames, N, C] as ``store[layer_name]``,
    then ordinary self-attention."""

    def __init__(self, layer_name: str):
        super().__init__()
        self.layer_name = layer_name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, loopy: Optional[LoopyCallContext] = None, *args, **kwargs):
        if loopy is not None and loopy.store is not None:
            loopy.store[self.layer_name] = hidden_states
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class LoopySelfAttnProcessor(nn.Module):
    """Denoising U-Net ``attn1``: reference-concatenated self-attention (+ stage-2 branches).

    ``audio``: an ``AudioCrossAttention`` (or None); ``temporal``: a ``TemporalLayers`` (or None).
    Input ``hidden_states`` [B*F, N, C] (the block's ``norm1`` output); output [B*F, N, C], which
    the transformer block adds to its residual stream:
    ``self_attn([x ; ref]) + audio_xattn(x, audio) + temporal(x, motion)``.
    Both stage-2 branches end in zero-initialised projections, so a fresh stage-2 model computes
    exactly what its stage-1 parent computes.
    """

    def __init__(self, layer_name: str, audio: Optional[nn.Module] = None,
                 temporal: Optional[nn.Module] = None):
        super().__init__()
        self.layer_name = layer_name
        self.audio = audio
        self.temporal = temporal

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, loopy: Optional[LoopyCallContext] = None,
                 *args, **kwargs) -> torch.Tensor:
        x = hidden_states
        if x.ndim != 3:
            raise ValueError(f"{self.layer_name}: expected tokens [frames, N, C], got {tuple(x.shape)}")
        ref = None if loopy is None else loopy.reference
        if ref is None:
            return attend(attn, x, x)
        frames = loopy.num_frames
        bf, n, _ = x.shape
        b = bf // frames
        if b * frames != bf or ref.batch_size != b:
            raise ValueError(f"{self.layer_name}: U-Net batch {bf} is not B*F with B = reference "
                             f"batch {ref.batch_size}, F = {frames}")
        ref_tok = ref.ref_tokens[self.layer_name].to(x.dtype).repeat_interleave(frames, dim=0)
        kv = torch.cat([x, ref_tok], dim=1)
        mask = None
        if loopy.ref_mask_needed:
            keep = ref.ref_keep.repeat_interleave(frames)[:, None].expand(bf, ref_tok.shape[1])
            mask = torch.cat([torch.ones(bf, n, dtype=torch.bool, device=x.device), keep], dim=1)
        out = attend(attn, x, kv, mask)
        if self.audio is not None and loopy.audio_tokens is not None:
            out = out + self.audio(x, loopy.audio_tokens)
        if self.temporal is not None:
            motion = None if ref.motion_tokens is None else ref.motion_tokens[self.layer_name]
            out = out + self.temporal(x, frames, motion, ref.motion_keep)
        return out
