"""Loopy's audio modules: audio projection, audio cross-attention, audio-to-latents.

Shapes: B clips, F frames per clip, W = 5 audio frames per video frame (t-2..t+2), L wav2vec2
layers, D wav2vec2 width (tiny 2 x 32, base 12 x 768).

* :class:`AudioProjection`: ``audio [B, F, W, L, D] -> tokens [(B F), W, Ca]``: per window slot,
  LayerNorm over the concatenated layers (L*D) -> Linear -> SiLU -> Linear, plus a learnable
  embedding of the slot (-2..+2). One projection shared by every U-Net layer.
* :class:`AudioCrossAttention`: query = the U-Net layer's tokens, key/value = the frame's audio
  tokens; zero-initialised output (added to the self-attention output by the processor, or to a
  residual block's output in the attention-free levels, there after its own LayerNorm).
* :class:`AudioToLatents`: a bank of learnable embeddings; a condition -> FC -> query; the bank
  gives keys and values; output FC (zero-initialised) -> added to the timestep embedding, one
  vector per frame ``[B, F, T]`` (T = time-embedding width). One input FC per condition kind.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from models.reference_attention import AttentionProjections, attend

A2L_KINDS = ("audio", "landmarks", "head_motion_var", "expression_var")  # index = a2l_kind
VARIANCE_EPS = 1e-6


class AudioProjection(nn.Module):
    """[B, F, W, L, D] -> [(B F), W, out_dim]."""

    def __init__(self, audio_layers: int, audio_dim: int, window: int, out_dim: int, hidden: int):
        super().__init__()
        self.window = window
        in_dim = audio_layers * audio_dim
        self.norm = nn.LayerNorm(in_dim)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))
        self.slot_embedding = nn.Parameter(torch.randn(window, out_dim) * 0.02)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        b, f, w, n_layers, d = audio.shape
        if w != self.window:
            raise ValueError(f"audio window has {w} frames, the model expects {self.window}")
        x = self.norm(audio.reshape(b * f, w, n_layers * d))
        return self.net(x) + self.slot_embedding


class AudioCrossAttention(nn.Module):
    """x [(B F), N, C] attends to audio tokens [(B F), W, Ca] -> [(B F), N, C] (zero at init).

    ``pre_norm``: LayerNorm the queries first. Off inside transformer blocks (the processor hands
    over the block's ``norm1`` tokens, already normalised); on after the residual blocks of the
    attention-free levels, whose raw feature maps have no norm of their own."""

    def __init__(self, dim: int, token_dim: int, heads: int, pre_norm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(dim) if pre_norm else None
        self.attn = AttentionProjections(dim, heads, kv_dim=token_dim, zero_out=True)

    def forward(self, x: torch.Tensor, audio_tokens: torch.Tensor) -> torch.Tensor:
        query = x if self.norm is None else self.norm(x)
        return attend(self.attn, query, audio_tokens.to(x.dtype))


class AudioToLatents(nn.Module):
    """Condition -> per-frame vector added to the timestep embedding.

    Inputs (``conditions`` dict, any subset of :data:`A2L_KINDS`):
      audio [B, F, W, L, D]; landmarks [B, F, P, 2] (crop-normalised, centred at 0.5 before the FC);
      head_motion_var [B], expression_var [B] (enter as log(var + 1e-6), **ours**: the raw
      variances are ~1e-4..1e-2, a linear layer on them would see almost a constant).
    ``kind`` long [B] picks each sample's condition; every given kind is projected for the whole
    batch and selected by a one-hot mask (no Python branching), so in training (all four given)
    all four input FCs take part in every step. ``drop`` bool [B] zeroes the output per sample.
    Returns [B, F, out_dim].
    """

    def __init__(self, audio_layers: int, audio_dim: int, window: int, landmark_points: int,
                 bank_size: int, dim: int, out_dim: int, heads: int = 4):
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.bank = nn.Parameter(torch.randn(bank_size, dim) / math.sqrt(dim))
        self.query = nn.ModuleDict({
            "audio": nn.Sequential(nn.LayerNorm(window * audio_layers * audio_dim),
                                   nn.Linear(window * audio_layers * audio_dim, dim)),
            "landmarks": nn.Linear(landmark_points * 2, dim),
            "head_motion_var": nn.Linear(1, dim),
            "expression_var": nn.Linear(1, dim),
        })
        self.attn = AttentionProjections(dim, heads, zero_out=False)
        self.out = nn.Linear(dim, out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _features(self, name: str, value: torch.Tensor, frames: int) -> torch.Tensor:
        """Condition -> [B, F, in_dim] of the kind's FC."""
        if name in ("audio", "landmarks"):
            if value.shape[1] != frames:
                raise ValueError(f"a2l input {name!r} has {value.shape[1]} frames, expected {frames}")
            flat = value.reshape(value.shape[0], frames, -1)
            return flat - 0.5 if name == "landmarks" else flat
        if value.ndim != 1:
            raise ValueError(f"a2l input {name!r} must be [B], got {tuple(value.shape)}")
        logv = torch.log(value.float().clamp(min=0) + VARIANCE_EPS).to(value.dtype)
        return logv[:, None, None].expand(value.shape[0], frames, 1)

    def forward(self, conditions: dict[str, torch.Tensor], kind: torch.Tensor, drop: torch.Tensor,
                frames: int) -> torch.Tensor:
        unknown = set(conditions) - set(A2L_KINDS)
        if unknown:
            raise ValueError(f"unknown audio-to-latents inputs {sorted(unknown)}; known: {A2L_KINDS}")
        dtype = self.bank.dtype
        b = kind.shape[0]
        query = torch.zeros(b, frames, self.bank.shape[1], dtype=dtype, device=self.bank.device)
        covered = torch.zeros(b, dtype=torch.bool, device=kind.device)
        for idx, name in enumerate(A2L_KINDS):
            if name not in conditions:
                continue
            sel = kind == idx
            covered = covered | sel
            feats = self._features(name, conditions[name].to(dtype), frames)
            first = self.query[name][-1] if isinstance(self.query[name], nn.Sequential) else self.query[name]
            if feats.shape[-1] != first.in_features:
                raise ValueError(f"a2l input {name!r} {tuple(conditions[name].shape)} gives {feats.shape[-1]} "
                                 f"features per frame, the model expects {first.in_features}")
            q = self.query[name](feats)
            query = query + q * sel.to(dtype)[:, None, None]
        if not bool(covered.all()):
            missing = sorted({A2L_KINDS[int(k)] for k in kind[~covered].tolist() if 0 <= int(k) < 4})
            raise ValueError(f"a2l_kind asks for {missing or 'an unknown kind'} but a2l_inputs has only "
                             f"{sorted(conditions)}")
        bank = self.bank[None].expand(b * frames, -1, -1)
        latents = attend(self.attn, query.reshape(b * frames, 1, -1), bank).view(b, frames, -1)
        out = self.out(latents)
        return out * (~drop.to(torch.bool)).to(dtype)[:, None, None]
