"""Attention processors that connect Loopy's reference net to its denoising U-Net.

Both U-Nets are plain diffusers ``UNet2DConditionModel``s (SD-1.5 layout). Their behaviour is
changed only through attention processors, so SD-1.5 weights load unchanged:

* reference net, spatial self-attention (``attn1``): :class:`ReferenceWriteProcessor` records the
  tokens entering the layer (the ``norm1`` output, ``[frames, h*w, C]``) under the layer name, then
  runs ordinary self-attention.
* denoising U-Net, spatial self-attention (``attn1``): :class:`LoopySelfAttnProcessor` attends
  over ``[own tokens ; reference tokens of the same layer]`` (keys/values concatenated along the
  token axis; samples whose reference is dropped attend over their own tokens only: a separate
  unmasked SDPA call, never a boolean mask, see :func:`attend`), and in
  stage 2 adds the audio cross-attention and the temporal layers (see ``audio_modules`` and
  ``temporal_layers``) to the self-attention output.
* both U-Nets, text cross-attention (``attn2``): :class:`ContextAttnProcessor`, SD's attention on
  Loopy's small learnable context (Loopy has no text).

The per-call data travels as ``cross_attention_kwargs={"loopy": LoopyCallContext}``; diffusers
hands it to every processor, so there is no hidden state on the modules between calls.
All attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (SDPA), on CUDA
without an attention mask (so the flash kernel is eligible); :func:`attention_mode` chooses
(``boolean`` = the masked computation before issue 14, for the equivalence tests and benchmarks).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Iterator, Literal, Optional

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


AttentionMode = Literal["auto", "split", "boolean"]
_MODE: ContextVar[str] = ContextVar("loopy_attention_mode", default="auto")


@contextmanager
def attention_mode(mode: AttentionMode) -> Iterator[None]:
    """How masked attention runs inside this block (**ours**, issue 14):

    * ``auto`` (default): ``split`` on CUDA; on CPU one SDPA call with the boolean mask (PyTorch's
      CPU flash kernel takes masks at the same speed, and splitting only adds calls: measured
      2x slower on the tiny model's temporal attention);
    * ``split``: never a mask in SDPA: rows grouped by mask pattern, one unmasked call per group
      over its kept keys, so every row can use the flash kernel on CUDA;
    * ``boolean``: the computation before issue 14: one masked call over all rows, and the
      reference K/V projected per frame in every call (tests and benchmark rows only).
    """
    if mode not in ("auto", "split", "boolean"):
        raise ValueError(f"attention_mode: {mode!r} is not auto, split or boolean")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def boolean_masks():
    """``attention_mode("boolean")``: attention as before issue 14 (see :func:`attention_mode`)."""
    return attention_mode("boolean")


def _split_rows(device: torch.device) -> bool:
    mode = _MODE.get()
    return mode == "split" or (mode == "auto" and device.type == "cuda")


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SDPA of projected q [b, n, C], k / v [b, k, C] over ``heads`` heads -> [b, n, C].
    mask: bool [b, k] (True = attend) or None (then SDPA may pick its flash kernel)."""
    b, n, c = q.shape
    q = q.view(b, n, heads, -1).transpose(1, 2)
    k = k.view(b, k.shape[1], heads, -1).transpose(1, 2)
    v = v.view(b, v.shape[1], heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
    return out.transpose(1, 2).reshape(b, n, -1)


def _output(attn: "Attention | AttentionProjections", out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return attn.to_out[1](attn.to_out[0](out.to(dtype)))


def _keep_in_graph(out: torch.Tensor, *unused: torch.Tensor) -> torch.Tensor:
    """``out`` plus ``0 * sum(unused)`` when gradients are recorded: inputs a split call leaves out
    (keys every row masks, dropped references) still get a gradient, an exact zero, as through a
    masked key, so every parameter gets a gradient in every step whatever the switches (DDP without
    ``find_unused_parameters``; docs/CONTRACTS.md). No-op under ``no_grad`` (the sampler)."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in unused):
        return out
    return out + sum(t.sum() for t in unused).to(out.dtype) * 0.0


def _span(index: torch.Tensor) -> Optional[slice]:
    """``slice(first, last + 1)`` when the sorted long [n] ``index`` is a contiguous range, else None."""
    first, last = int(index[0]), int(index[-1])
    return slice(first, last + 1) if last - first + 1 == index.numel() else None


def _take(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(dim, index)``, as a view (no copy) when ``index`` is a contiguous range."""
    span = _span(index)
    if span is None:
        return x.index_select(dim, index)
    return x[span] if dim == 0 else x[:, span]


def _mask_groups(key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``key_mask`` [b, k] grouped by pattern: (inverse long [b], counts long [g])."""
    if key_mask.shape[1] <= 62:  # one integer per row: a 1-D unique (much cheaper than dim=0)
        weights = torch.ones(key_mask.shape[1], dtype=torch.long, device=key_mask.device)
        weights = weights.cumsum(0).sub(1)
        codes = (key_mask.long() << weights).sum(1)
        _, inverse, counts = torch.unique(codes, return_inverse=True, return_counts=True)
    else:
        _, inverse, counts = torch.unique(key_mask, dim=0, return_inverse=True, return_counts=True)
    return inverse, counts


def attend(attn: "Attention | AttentionProjections", query_in: torch.Tensor, kv_in: torch.Tensor,
           key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-head SDPA with ``attn``'s projections.

    query_in: [b, n, Cq]; kv_in: [b, k, Ckv]; key_mask: bool [b, k] (True = attend) or None.
    Returns [b, n, C_out] (after ``attn.to_out``). Uses ``attn.heads`` and SDPA's default scale
    (head_dim ** -0.5, the same as SD's attention).

    On CUDA a mask is never handed to SDPA (**ours**, issue 14; see :func:`attention_mode`): a
    boolean mask rules out the flash kernel for every row. The rows are grouped by their mask pattern and each group attends,
    unmasked, over only its kept keys (slices, not copies, where rows or keys are contiguous,
    as in the guidance batch); a masked key contributes exp(-inf) = 0 to the softmax, so the
    result is the masked one up to float rounding. An all-True mask is no mask.
    """
    if key_mask is not None and _MODE.get() != "boolean" and bool(key_mask.all()):
        key_mask = None
    if key_mask is None or not _split_rows(query_in.device):
        out = _sdpa(attn.to_q(query_in), attn.to_k(kv_in), attn.to_v(kv_in), attn.heads, key_mask)
        return _output(attn, out, query_in.dtype)
    inverse, counts = _mask_groups(key_mask)
    order = torch.argsort(inverse, stable=True)  # rows of group 0, then group 1, ... (ascending)
    groups = []
    for rows in torch.split(order, counts.tolist()):
        keys = key_mask[int(rows[0])].nonzero().squeeze(1)
        if keys.numel() == 0:
            raise ValueError("attend: a row of key_mask masks every key")
        kv = _take(_take(kv_in, 0, rows), 1, keys)
        out = _sdpa(attn.to_q(_take(query_in, 0, rows)), attn.to_k(kv), attn.to_v(kv), attn.heads)
        groups.append((int(rows[0]), rows, out))
    groups.sort(key=lambda g: g[0])
    if all(_span(rows) is not None for _, rows, _ in groups):  # contiguous ranges: concatenate in order
        out = torch.cat([o for _, _, o in groups], dim=0)
    else:
        out = torch.cat([o for _, _, o in groups], dim=0).index_select(
            0, torch.argsort(torch.cat([rows for _, rows, _ in groups])))
    return _keep_in_graph(_output(attn, out, query_in.dtype), kv_in)


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
    ref_kv[layer]:        ([B, N, C], [B, N, C]) or None: the denoising U-Net layer's key and
                          value projections of ``ref_tokens[layer]`` (timestep-independent, so
                          the sampler computes them once per clip: :func:`with_reference_kv`);
                          None = projected in every call
    ref_latent:           [B, C, h, w] or None: the reference latent itself, kept only for a model
                          built with ``reference_concat`` (it enters the denoising U-Net's input
                          channels beside the noisy latents; zeros where ``ref_keep`` is False)
    """

    ref_tokens: dict[str, torch.Tensor]
    motion_tokens: Optional[dict[str, torch.Tensor]]
    ref_keep: torch.Tensor
    motion_valid: Optional[torch.Tensor]
    motion_keep: Optional[torch.Tensor]
    ref_kv: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None
    ref_latent: Optional[torch.Tensor] = None

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
        kv = None if self.ref_kv is None else {k: (rep(a), rep(b)) for k, (a, b) in self.ref_kv.items()}
        return ReferenceFeatures({k: rep(v) for k, v in self.ref_tokens.items()}, motion,
                                 rep(self.ref_keep), rep(self.motion_valid), rep(self.motion_keep), kv,
                                 rep(self.ref_latent))

    def select(self, rows: torch.Tensor) -> "ReferenceFeatures":
        """The samples ``rows`` (long [b]) of every field (e.g. one guidance condition)."""
        def sel(t):
            return None if t is None else t[rows]
        motion = None if self.motion_tokens is None else {k: sel(v) for k, v in self.motion_tokens.items()}
        kv = None if self.ref_kv is None else {k: (sel(a), sel(b)) for k, (a, b) in self.ref_kv.items()}
        return ReferenceFeatures({k: sel(v) for k, v in self.ref_tokens.items()}, motion, sel(self.ref_keep),
                                 sel(self.motion_valid), sel(self.motion_keep), kv, sel(self.ref_latent))


def with_reference_kv(reference: ReferenceFeatures, denoise_unet: nn.Module) -> ReferenceFeatures:
    """``reference`` with ``ref_kv`` filled: for every layer of ``reference.ref_tokens``, the
    denoising U-Net's ``<layer>.to_k`` / ``.to_v`` of the reference tokens, [B, N, C] each, in the
    U-Net's dtype. They depend only on the reference frame, so the sampler projects them once per
    clip instead of at every step and for every frame of the clip (F times, 3 conditions)."""
    kv = {}
    for layer, tokens in reference.ref_tokens.items():
        attn = denoise_unet.get_submodule(layer)
        tok = tokens.to(attn.to_k.weight.dtype)
        kv[layer] = (attn.to_k(tok), attn.to_v(tok))
    return replace(reference, ref_kv=kv)


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
        if _MODE.get() == "boolean":
            out = self._masked_reference_attention(attn, x, ref, frames, loopy.ref_mask_needed)
        else:
            out = self._reference_attention(attn, x, ref, frames, loopy.ref_mask_needed)
        if self.audio is not None and loopy.audio_tokens is not None:
            out = out + self.audio(x, loopy.audio_tokens)
        if self.temporal is not None:
            motion = None if ref.motion_tokens is None else ref.motion_tokens[self.layer_name]
            out = out + self.temporal(x, frames, motion, ref.motion_keep)
        return out

    def _reference_attention(self, attn: Attention, x: torch.Tensor, ref: ReferenceFeatures, frames: int,
                             some_dropped: bool) -> torch.Tensor:
        """Self-attention over ``[x ; ref]`` without a mask (**ours**, issue 14; on CPU see
        :func:`attention_mode`): the frames whose sample keeps its reference attend over
        ``[own ; reference]`` keys, the others over their own keys only (what a mask of every
        reference key computes); each group is one unmasked SDPA call, so SDPA may use its flash
        kernel. The reference keys / values are projected once
        per sample (``ref.ref_kv`` when the sampler cached them), not once per frame.
        x: [B*F, N, C] -> [B*F, N, C]."""
        if ref.ref_kv is not None and self.layer_name in ref.ref_kv:
            ref_k, ref_v = ref.ref_kv[self.layer_name]
        else:
            tok = ref.ref_tokens[self.layer_name].to(x.dtype)  # [B, Nr, C]
            ref_k, ref_v = attn.to_k(tok), attn.to_v(tok)
        keep = ref.ref_keep.repeat_interleave(frames)  # [B*F]
        kept = keep.nonzero().squeeze(1) if some_dropped else None
        if kept is not None and kept.numel() == 0:  # every reference dropped: plain self-attention
            return _keep_in_graph(attend(attn, x, x), ref_k, ref_v)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        ref_k = ref_k.to(k.dtype).repeat_interleave(frames, dim=0)
        ref_v = ref_v.to(v.dtype).repeat_interleave(frames, dim=0)
        if kept is None or kept.numel() == x.shape[0]:
            out = _sdpa(q, torch.cat([k, ref_k], dim=1), torch.cat([v, ref_v], dim=1), attn.heads)
            return _output(attn, out, x.dtype)
        if not _split_rows(x.device):  # CPU: one masked call (see attention_mode)
            mask = torch.cat([torch.ones(x.shape[:2], dtype=torch.bool, device=x.device),
                              keep[:, None].expand(-1, ref_k.shape[1])], dim=1)
            out = _sdpa(q, torch.cat([k, ref_k], dim=1), torch.cat([v, ref_v], dim=1), attn.heads, mask)
            return _output(attn, out, x.dtype)
        m = kept.numel()
        if int(kept[-1]) == m - 1:  # the kept rows come first (the guidance batch [audio ; ref ; base])
            with_ref = _sdpa(q[:m], torch.cat([k[:m], ref_k[:m]], dim=1), torch.cat([v[:m], ref_v[:m]], dim=1),
                             attn.heads)
            out = torch.cat([with_ref, _sdpa(q[m:], k[m:], v[m:], attn.heads)], dim=0)
            return _keep_in_graph(_output(attn, out, x.dtype), ref_k, ref_v)
        dropped = (~keep).nonzero().squeeze(1)
        with_ref = _sdpa(q[kept], torch.cat([k[kept], ref_k[kept]], dim=1),
                         torch.cat([v[kept], ref_v[kept]], dim=1), attn.heads)
        without = _sdpa(q[dropped], k[dropped], v[dropped], attn.heads)
        out = torch.cat([with_ref, without], dim=0).index_select(0, torch.argsort(torch.cat([kept, dropped])))
        return _keep_in_graph(_output(attn, out, x.dtype), ref_k, ref_v)

    def _masked_reference_attention(self, attn: Attention, x: torch.Tensor, ref: ReferenceFeatures,
                                    frames: int, some_dropped: bool) -> torch.Tensor:
        """The computation before issue 14 (see :func:`boolean_masks`): the reference tokens
        repeated per frame, projected in every call, and one SDPA call with a boolean mask over
        all rows whenever any sample drops its reference."""
        bf, n, _ = x.shape
        ref_tok = ref.ref_tokens[self.layer_name].to(x.dtype).repeat_interleave(frames, dim=0)
        kv = torch.cat([x, ref_tok], dim=1)
        mask = None
        if some_dropped:
            keep = ref.ref_keep.repeat_interleave(frames)[:, None].expand(bf, ref_tok.shape[1])
            mask = torch.cat([torch.ones(bf, n, dtype=torch.bool, device=x.device), keep], dim=1)
        return attend(attn, x, kv, mask)
