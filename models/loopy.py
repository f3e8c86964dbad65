"""The Loopy model: reference net + denoising U-Net + Loopy's temporal and audio modules.

Built from two diffusers ``UNet2DConditionModel``s with SD-1.5's configuration, so SD-1.5 weights
load into both directly (``from_sd15``). Loopy's parts are attached as attention processors (see
``models/reference_attention.py``); the U-Nets' own state-dict keys stay SD's.

Data flow (B clips, F frames per clip, M motion latents, latents [4, h, w]):

1. :meth:`LoopyModel.compute_reference`: the reference net runs at timestep 0 on the reference
   latent and (stage 2) on every motion latent as its own frame ([B*(1+M), 4, h, w]); each spatial
   self-attention layer's input tokens are kept -> :class:`ReferenceFeatures`. Timestep-independent:
   cache it per clip at inference.
2. :meth:`LoopyModel.denoise`: the denoising U-Net runs the B*F noisy frames; per layer
   self-attention over [own ; reference] tokens, + audio cross-attention, + inter/intra-clip
   temporal layers (stage 2). Audio-to-latents output is added to the timestep embedding through
   the U-Net's ``class_embed_type="identity"`` (no parameters).

Choices (**ours**):
* No text: SD's cross-attention (``attn2``) in both U-Nets reads ``null_context``, a learnable
  [1, context_tokens, cross_attention_dim] tensor, zero-initialised.
* Temporal layers and audio cross-attention sit in every transformer block of the denoising
  U-Net (16 for SD-1.5), as residual branches of the self-attention step, reading the block's
  ``norm1`` tokens, the same tokens the reference net hands over for the motion frames.
  The blocks without attention (``down_blocks.3`` / ``up_blocks.0`` of SD-1.5, 1/64 resolution)
  get temporal layers and an audio cross-attention (pre-LayerNorm, zero-initialised output) after
  each residual block (5 in SD-1.5), as parallel residual branches of the block's output; the
  temporal layers' motion tokens are the reference net's outputs of the same residual block.
  So the audio reaches every level of the U-Net, the coarsest (head pose, jaw) included.
  These are attached by forward hooks that
  live only for one ``compute_reference`` / ``denoise`` call (no state between calls); gradient
  checkpointing stays off in those two small blocks, so a recomputation never misses a hook.
* DDP: the reference net's layers after its last self-attention input (that transformer block's
  attn1/attn2/ff, its ``proj_out``, ``conv_norm_out``, ``conv_out``) never influence the output;
  they are frozen (``requires_grad=False``) at construction, so DDP needs no
  ``find_unused_parameters``. Every other parameter receives a gradient in every training step
  (switches are masks, and all four audio-to-latents input FCs run for the whole batch).
  Do not call ``model.requires_grad_(True)``; use :meth:`LoopyModel.trainable_parameters`.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from core.temporal_segment import make_plan
from core.weights import load_pretrained
from models.audio_modules import (
    A2L_KINDS,
    AudioCrossAttention,
    AudioProjection,
    AudioToLatents,
)
from models.errors import IncompatibleWeightsError
from models.reference_attention import (
    ContextAttnProcessor,
    LoopyCallContext,
    LoopySelfAttnProcessor,
    ReferenceFeatures,
    ReferenceWriteProcessor,
)
from models.temporal_layers import TemporalLayers

__all__ = ["LoopyModel", "ReferenceFeatures", "sd15_unet_config", "A2L_KINDS"]


def sd15_unet_config() -> dict:
    """Stable Diffusion 1.5's U-Net configuration (for sizing without weights, e.g. benchmarks)."""
    return dict(
        sample_size=64, in_channels=4, out_channels=4,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, norm_num_groups=32,
    )


def _plain_unet_config(config: Any) -> dict:
    """A U-Net config as a JSON-able dict without diffusers' private keys."""
    out = {}
    for k, v in dict(config).items():
        if k.startswith("_"):
            continue
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def _self_attn_layers(unet: UNet2DConditionModel) -> list[str]:
    """Names of the spatial self-attention modules (``...transformer_blocks.i.attn1``)."""
    return [name[: -len(".processor")] for name in unet.attn_processors if name.endswith("attn1.processor")]


def _reference_tail(unet: UNet2DConditionModel) -> list[nn.Module]:
    """Modules of the reference net that run after the input of its last self-attention."""
    last_up = unet.up_blocks[-1]
    if not getattr(last_up, "attentions", None):
        raise IncompatibleWeightsError("the reference net's last up block has no attention: not an SD-1.5 layout")
    last_tf = last_up.attentions[-1]
    block = last_tf.transformer_blocks[-1]
    tail = [m for name, m in block.named_children() if name != "norm1"]
    tail += [last_tf.proj_out, unet.conv_out]
    if unet.conv_norm_out is not None:
        tail.append(unet.conv_norm_out)
    if last_up.upsamplers is not None:
        tail.append(last_up.upsamplers)
    return tail


def _resnet_sites(unet: UNet2DConditionModel) -> list[str]:
    """Residual blocks of the U-Net blocks without attention (``down_blocks.i.resnets.j``, ...)."""
    sites = []
    for prefix in ("down_blocks", "up_blocks"):
        for i, block in enumerate(getattr(unet, prefix)):
            if getattr(block, "attentions", None) is None:
                sites += [f"{prefix}.{i}.resnets.{j}" for j in range(len(block.resnets))]
    return sites


def _site_key(site: str) -> str:
    return site.replace(".", "_")


def _feature_map_tokens(x: torch.Tensor) -> torch.Tensor:
    """[frames, C, h, w] -> [frames, h*w, C]."""
    return x.flatten(2).transpose(1, 2)


class _CallHooks:
    """Forward hooks registered for one call and removed afterwards (``with _CallHooks() as h``)."""

    def __init__(self):
        self.handles = []

    def add(self, module: nn.Module, hook) -> None:
        self.handles.append(module.register_forward_hook(hook))

    def __enter__(self) -> "_CallHooks":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


class LoopyModel(ModelMixin, ConfigMixin):
    """Loopy's networks. ``stage`` 1: reference net + denoising U-Net only (F = 1 frames);
    stage 2: + temporal layers (in the self-attention processors and ``resnet_temporal``),
    audio cross-attention (in the processors and ``resnet_audio``), audio projection,
    audio-to-latents.

    Config (saved in ``config.json``): ``unet_config`` (SD U-Net config dict), ``stage``,
    ``audio_layers`` L, ``audio_dim`` D, ``audio_window`` W (5), ``motion_latent_tokens``
    (audio-to-latents bank size), ``context_tokens``, ``landmark_points`` (68),
    ``reference_concat`` (the reference latent also enters the denoising U-Net's ``conv_in``
    beside the noisy latents: 2C input channels, ``ModelConfig.reference_concat``).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(self, unet_config: dict, stage: int = 1, audio_layers: int = 2, audio_dim: int = 32,
                 audio_window: int = 5, motion_latent_tokens: int = 8, context_tokens: int = 1,
                 landmark_points: int = 68, reference_concat: bool = False):
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        unet_config = _plain_unet_config(unet_config)
        ref_cfg = dict(unet_config)
        ref_cfg.pop("class_embed_type", None)
        self.reference_net = UNet2DConditionModel.from_config(ref_cfg)
        den_cfg = {**ref_cfg, "class_embed_type": "identity"}
        if reference_concat:  # [noisy latents ; reference latent] in, noise prediction (C) out
            den_cfg["in_channels"] = 2 * int(ref_cfg["in_channels"])
            den_cfg["out_channels"] = int(ref_cfg.get("out_channels") or ref_cfg["in_channels"])
        self.denoise_unet = UNet2DConditionModel.from_config(den_cfg)
        cross_dim = self.reference_net.config.cross_attention_dim
        self.null_context = nn.Parameter(torch.zeros(1, context_tokens, cross_dim))

        self.layer_names = _self_attn_layers(self.reference_net)
        time_dim = self.reference_net.time_embedding.linear_2.out_features
        if stage == 2:
            hidden = max(4 * cross_dim, audio_layers * audio_dim // 2)
            self.audio_projection = AudioProjection(audio_layers, audio_dim, audio_window, cross_dim, hidden)
            self.audio_to_latents = AudioToLatents(audio_layers, audio_dim, audio_window, landmark_points,
                                                   motion_latent_tokens, cross_dim, time_dim)
        else:
            self.audio_projection = None
            self.audio_to_latents = None

        self.resnet_sites = _resnet_sites(self.reference_net)
        if stage == 2:
            temporal, audio_xattn = {}, {}
            for site in self.resnet_sites:
                ch = self.denoise_unet.get_submodule(site).out_channels
                heads = 8 if ch % 8 == 0 else 1
                temporal[_site_key(site)] = TemporalLayers(ch, heads)
                audio_xattn[_site_key(site)] = AudioCrossAttention(ch, cross_dim, heads, pre_norm=True)
            self.resnet_temporal = nn.ModuleDict(temporal)
            self.resnet_audio = nn.ModuleDict(audio_xattn)
        else:
            self.resnet_temporal = None
            self.resnet_audio = None

        ref_procs, den_procs = {}, {}
        for name in self.reference_net.attn_processors:
            layer = name[: -len(".processor")]
            if name.endswith("attn1.processor"):
                ref_procs[name] = ReferenceWriteProcessor(layer)
                attn = self.denoise_unet.get_submodule(layer)
                dim, heads = attn.to_q.in_features, attn.heads
                audio = AudioCrossAttention(dim, cross_dim, heads) if stage == 2 else None
                temporal = TemporalLayers(dim, heads) if stage == 2 else None
                den_procs[name] = LoopySelfAttnProcessor(layer, audio, temporal)
            else:
                ref_procs[name] = ContextAttnProcessor()
                den_procs[name] = ContextAttnProcessor()
        self.reference_net.set_attn_processor(ref_procs)
        self.denoise_unet.set_attn_processor(den_procs)
        for module in _reference_tail(self.reference_net):
            module.requires_grad_(False)

    # ------------------------------------------------------------------ construction
    @property
    def stage(self) -> int:
        return int(self.config.stage)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, stage: int, model_cfg=None, **overrides) -> "LoopyModel":
        """Both U-Nets initialised from ``unet``'s weights; Loopy modules fresh."""
        kwargs = {}
        if model_cfg is not None:
            kwargs = dict(audio_layers=model_cfg.audio_layers, audio_dim=model_cfg.audio_dim,
                          motion_latent_tokens=model_cfg.motion_latent_tokens,
                          reference_concat=model_cfg.reference_concat)
        kwargs.update(overrides)
        model = cls(unet_config=_plain_unet_config(unet.config), stage=stage, **kwargs)
        state = {k: v for k, v in unet.state_dict().items()}
        model.reference_net.load_state_dict(state, strict=True)
        den_state = dict(state)
        if model.config.reference_concat:  # conv_in widened: the reference's input weights start at zero
            w = state["conv_in.weight"]
            den_state["conv_in.weight"] = torch.cat([w, torch.zeros_like(w)], dim=1)
        missing, unexpected = model.denoise_unet.load_state_dict(den_state, strict=False)
        bad = [k for k in missing if ".processor." not in k]
        if bad or unexpected:
            raise IncompatibleWeightsError(f"U-Net weights do not fit the denoising U-Net: missing {bad[:5]}, "
                               f"unexpected {unexpected[:5]}")
        if model_cfg is not None:
            model._apply_model_cfg(model_cfg)
        return model

    @classmethod
    def from_sd15(cls, unet_location: str, model_cfg, reader_cfg, stage: int,
                  local_files_only: bool = True) -> "LoopyModel":
        """Build from a diffusers SD U-Net folder (``<sd15>/unet``, or the tiny preset's).

        ``reader_cfg`` gives the audio window (2 * audio_window + 1 frames) and checks that the
        motion-frame plan is valid (M = ``make_plan(...).num_outputs``)."""
        make_plan(reader_cfg.motion_frames, reader_cfg.segment_stride, reader_cfg.segment_ratio)
        unet = load_pretrained(UNet2DConditionModel, unet_location, local_files_only)
        return cls.from_unet(unet, stage, model_cfg, audio_window=2 * reader_cfg.audio_window + 1)

    @classmethod
    def from_stage1(cls, stage1: "LoopyModel", model_cfg=None, reader_cfg=None) -> "LoopyModel":
        """Stage-2 model with stage 1's reference net, denoising U-Net and context; temporal and
        audio modules fresh (zero-initialised outputs: it computes what stage 1 computes)."""
        if stage1.stage != 1:
            raise ValueError(f"from_stage1 needs a stage-1 model, got stage {stage1.stage}")
        cfg = dict(stage1.config)
        kwargs = {k: cfg[k] for k in ("unet_config", "audio_layers", "audio_dim", "audio_window",
                                      "motion_latent_tokens", "context_tokens", "landmark_points")}
        kwargs["reference_concat"] = bool(cfg.get("reference_concat", False))
        if model_cfg is not None and model_cfg.reference_concat != kwargs["reference_concat"]:
            raise IncompatibleWeightsError(f"model.reference_concat={model_cfg.reference_concat} but the stage-1 model "
                                           f"was built with reference_concat={kwargs['reference_concat']}: train stage 1 again")
        if model_cfg is not None:
            kwargs.update(audio_layers=model_cfg.audio_layers, audio_dim=model_cfg.audio_dim,
                          motion_latent_tokens=model_cfg.motion_latent_tokens)
        if reader_cfg is not None:
            kwargs["audio_window"] = 2 * reader_cfg.audio_window + 1
        model = cls(stage=2, **kwargs)
        missing, unexpected = model.load_state_dict(stage1.state_dict(), strict=False)
        new_prefixes = ("audio_projection.", "audio_to_latents.", "resnet_temporal.", "resnet_audio.")
        bad = [k for k in missing if not (k.startswith(new_prefixes) or ".processor." in k)]
        if bad or unexpected:
            raise IncompatibleWeightsError(f"stage-1 weights do not fit stage 2: missing {bad[:5]}, unexpected {unexpected[:5]}")
        if stage1.dtype != model.dtype or stage1.device != model.device:
            model.to(device=stage1.device, dtype=stage1.dtype)
        if model_cfg is not None:
            model._apply_model_cfg(model_cfg)
        return model

    def _apply_model_cfg(self, model_cfg) -> None:
        """Gradient checkpointing only. ``model_cfg.dtype`` is an inference setting (applied when a
        package is loaded, ``inference/loading.py``): parameters stay float32 here, so training
        keeps fp32 master weights under bf16 / fp16 autocast (at lr 1e-5 an AdamW update of a
        bf16 weight above ~4e-3 rounds away)."""
        if model_cfg.gradient_checkpointing:
            self.enable_gradient_checkpointing()

    def enable_gradient_checkpointing(self, *args, **kwargs) -> None:
        """diffusers' gradient checkpointing for both U-Nets, except the denoising U-Net's blocks
        whose residual blocks carry per-call temporal hooks (tiny 1/64-resolution blocks)."""
        super().enable_gradient_checkpointing(*args, **kwargs)
        if self.resnet_temporal is not None:
            for site in self.resnet_sites:
                block = self.denoise_unet.get_submodule(site.rsplit(".resnets.", 1)[0])
                block.gradient_checkpointing = False

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that receive gradients (everything but the reference net's unused tail)."""
        return (p for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ forward paths
    def compute_reference(self, ref_latent: torch.Tensor, motion_latents: Optional[torch.Tensor] = None,
                          motion_mask: Optional[torch.Tensor] = None, drop_ref: Optional[torch.Tensor] = None,
                          drop_motion_frames: Optional[torch.Tensor] = None) -> ReferenceFeatures:
        """Reference net at t = 0 on ref_latent [B, 4, h, w] and (stage 2) motion_latents
        [B, M, 4, h, w] (motion_mask bool [B, M], True = real history). drop_ref /
        drop_motion_frames: bool [B] (None = keep). Stage 1 ignores the motion inputs."""
        b = ref_latent.shape[0]
        dev = ref_latent.device
        use_motion = self.stage == 2 and motion_latents is not None
        frames = ref_latent[:, None]
        if use_motion:
            if motion_latents.shape[0] != b or motion_latents.shape[2:] != ref_latent.shape[1:]:
                raise ValueError(f"motion_latents {tuple(motion_latents.shape)} do not match ref_latent "
                                 f"{tuple(ref_latent.shape)} ([B, M, C, h, w])")
            frames = torch.cat([frames, motion_latents], dim=1)
        per_sample = frames.shape[1]
        x = frames.flatten(0, 1).to(self.dtype)
        t = torch.zeros(x.shape[0], device=dev, dtype=torch.long)
        store: dict[str, torch.Tensor] = {}
        ctx = LoopyCallContext(store=store)
        with _CallHooks() as hooks:
            if use_motion and self.resnet_temporal is not None:
                for site in self.resnet_sites:
                    def record(module, args, output, site=site):
                        store[site] = _feature_map_tokens(output)
                    hooks.add(self.reference_net.get_submodule(site), record)
            self.reference_net(x, t, encoder_hidden_states=self.null_context.expand(x.shape[0], -1, -1),
                               cross_attention_kwargs={"loopy": ctx}, return_dict=False)
        ref_tokens, motion_tokens = {}, ({} if use_motion else None)
        for layer in self.layer_names:
            tok = store[layer].unflatten(0, (b, per_sample))  # [B, 1+M, N, C]
            ref_tokens[layer] = tok[:, 0]
            if use_motion:
                motion_tokens[layer] = tok[:, 1:]
        if use_motion and self.resnet_temporal is not None:
            for site in self.resnet_sites:  # residual-block outputs: only the motion frames are used
                motion_tokens[site] = store[site].unflatten(0, (b, per_sample))[:, 1:]
        motion_valid = None
        if use_motion:
            m = motion_latents.shape[1]
            motion_valid = (torch.ones(b, m, dtype=torch.bool, device=dev) if motion_mask is None
                            else motion_mask.to(device=dev, dtype=torch.bool))
        feats = ReferenceFeatures(ref_tokens, motion_tokens, torch.ones(b, dtype=torch.bool, device=dev),
                                  motion_valid, motion_valid,
                                  ref_latent=ref_latent.to(self.dtype) if self.config.reference_concat else None)
        if drop_ref is None:
            drop_ref = torch.zeros(b, dtype=torch.bool, device=dev)
        return feats.with_drops(drop_ref, drop_motion_frames)

    def denoise(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, reference: ReferenceFeatures,
                audio: Optional[torch.Tensor] = None, a2l_inputs: Optional[dict[str, torch.Tensor]] = None,
                a2l_kind: Optional[torch.Tensor] = None, drop_audio: Optional[torch.Tensor] = None,
                drop_motion_cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Noise prediction eps [B, F, 4, h, w] for noisy_latents [B, F, 4, h, w] at timesteps [B].

        Stage 2: audio [B, F, W, L, D] (None = zero audio, as if dropped); a2l_inputs: any of
        {"audio", "landmarks", "head_motion_var", "expression_var"} (None = no audio-to-latents
        output); a2l_kind long [B] (None = 0, audio); drop_audio / drop_motion_cond bool [B].
        ``drop_audio`` zeroes c_audio for the audio cross-attention and for the audio-to-latents
        audio condition alike; ``drop_motion_cond`` zeroes the audio-to-latents output.
        Stage 1 ignores audio and audio-to-latents inputs."""
        b, f = noisy_latents.shape[:2]
        dev, dtype = noisy_latents.device, self.dtype
        if reference.batch_size != b:
            raise ValueError(f"reference has batch {reference.batch_size}, noisy_latents {b}: use "
                             f"ReferenceFeatures.repeat / with_drops")
        if self.stage == 1 and f != 1:
            raise ValueError(f"a stage-1 model denoises one frame per sample, got F = {f}")
        ref_n = reference.ref_tokens[self.layer_names[0]].shape[1]
        if ref_n != noisy_latents.shape[-2] * noisy_latents.shape[-1]:
            raise ValueError(f"reference features were computed for {ref_n} latent positions, "
                             f"noisy_latents are {tuple(noisy_latents.shape[-2:])}")
        x = noisy_latents.flatten(0, 1).to(dtype)
        if self.config.reference_concat:
            if reference.ref_latent is None:
                raise ValueError("this model concatenates the reference latent to its input, but the reference "
                                 "features carry none (compute them with this model's compute_reference)")
            ref = reference.ref_latent.to(dtype) * reference.ref_keep.to(dtype)[:, None, None, None]
            x = torch.cat([x, ref.repeat_interleave(f, dim=0)], dim=1)  # [B*F, 2C, h, w], frame-major per sample
        t = timesteps.to(dev).reshape(b).repeat_interleave(f)
        time_dim = self.denoise_unet.time_embedding.linear_2.out_features
        class_labels = torch.zeros(b * f, time_dim, device=dev, dtype=dtype)
        audio_tokens = None
        if self.stage == 2:
            cfg = self.config
            if audio is None:
                audio = torch.zeros(b, f, cfg.audio_window, cfg.audio_layers, cfg.audio_dim, device=dev, dtype=dtype)
            expected = (b, f, cfg.audio_window, cfg.audio_layers, cfg.audio_dim)
            if tuple(audio.shape) != expected:
                raise ValueError(f"audio is {tuple(audio.shape)}, expected [B, F, W, L, D] = {expected} "
                                 f"(model config audio_window / audio_layers / audio_dim)")
            audio = audio.to(dtype)
            if drop_audio is not None:
                audio = audio * (~drop_audio.to(dev, torch.bool)).to(dtype)[:, None, None, None, None]
            audio_tokens = self.audio_projection(audio)
            if a2l_inputs and "audio" in a2l_inputs and drop_audio is not None:
                keep = (~drop_audio.to(dev, torch.bool)).to(dtype)[:, None, None, None, None]
                a2l_inputs = dict(a2l_inputs, audio=a2l_inputs["audio"].to(dtype) * keep)
            if a2l_inputs:
                kind = torch.zeros(b, dtype=torch.long, device=dev) if a2l_kind is None else a2l_kind.to(dev)
                drop = torch.zeros(b, dtype=torch.bool, device=dev) if drop_motion_cond is None else drop_motion_cond.to(dev)
                class_labels = self.audio_to_latents(a2l_inputs, kind, drop, f).reshape(b * f, -1).to(dtype)
        ctx = LoopyCallContext(reference=reference, num_frames=f, audio_tokens=audio_tokens,
                               ref_mask_needed=not bool(reference.ref_keep.all()))
        with _CallHooks() as hooks:
            if self.resnet_temporal is not None:
                for site in self.resnet_sites:
                    hooks.add(self.denoise_unet.get_submodule(site),
                              self._resnet_temporal_hook(site, reference, f, audio_tokens))
            eps = self.denoise_unet(x, t, encoder_hidden_states=self.null_context.expand(b * f, -1, -1),
                                    class_labels=class_labels, cross_attention_kwargs={"loopy": ctx},
                                    return_dict=False)[0]
        return eps.unflatten(0, (b, f))

    def _resnet_temporal_hook(self, site: str, reference: ReferenceFeatures, frames: int,
                              audio_tokens: Optional[torch.Tensor] = None):
        """Forward hook adding the temporal layers' and the audio cross-attention's deltas (both
        computed from the same output, audio_tokens [B*F, W, Ca]) to a residual block's output
        [B*F, C, h, w]."""
        layers = self.resnet_temporal[_site_key(site)]
        audio_xattn = self.resnet_audio[_site_key(site)]
        motion = None if reference.motion_tokens is None else reference.motion_tokens.get(site)

        def hook(module, args, output):
            tokens = _feature_map_tokens(output)
            delta = layers(tokens, frames, None if motion is None else motion.to(output.dtype),
                           reference.motion_keep)
            if audio_tokens is not None:
                delta = delta + audio_xattn(tokens, audio_tokens)
            return output + delta.transpose(1, 2).reshape(output.shape)
        return hook

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, ref_latent: torch.Tensor,
                motion_latents: Optional[torch.Tensor] = None, motion_mask: Optional[torch.Tensor] = None,
                audio: Optional[torch.Tensor] = None, landmarks: Optional[torch.Tensor] = None,
                head_motion_var: Optional[torch.Tensor] = None, expression_var: Optional[torch.Tensor] = None,
                drop_audio: Optional[torch.Tensor] = None, drop_motion_cond: Optional[torch.Tensor] = None,
                drop_ref: Optional[torch.Tensor] = None, drop_motion_frames: Optional[torch.Tensor] = None,
                a2l_kind: Optional[torch.Tensor] = None, **provenance: Any) -> torch.Tensor:
        """``denoise(compute_reference(...))`` on a training batch (keys of docs/CONTRACTS.md;
        provenance keys and ``latents`` are accepted and ignored). Returns eps [B, F, 4, h, w]."""
        reference = self.compute_reference(ref_latent, motion_latents, motion_mask, drop_ref, drop_motion_frames)
        a2l_inputs = {k: v for k, v in (("audio", audio), ("landmarks", landmarks),
                                         ("head_motion_var", head_motion_var),
                                         ("expression_var", expression_var)) if v is not None}
        return self.denoise(noisy_latents, timesteps, reference, audio, a2l_inputs or None, a2l_kind,
                            drop_audio, drop_motion_cond)
