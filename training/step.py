"""One training step: noising (one DDPM timestep per clip), epsilon loss, backward, clipping,
optimizer / LR-scheduler / EMA update, and the NaN guard.

Shapes: ``latents`` [B, F, 4, h, w] (F = 12 clip frames, 1 in stage 1); timesteps [B] in
0..num_train_timesteps-1, the same for every frame of a clip (seed defect 17); noise
[B, F, 4, h, w]. The loss is the MSE between the prediction and its target (the noise, or the
velocity with ``train.prediction_type=v_prediction``), each latent channel weighted alike or, with
``train.latent_loss_weight=pixel``, by its decoded pixel energy (:func:`latent_loss_weights`), and in
stage 2 with ``train.mouth_loss_weight`` > 0 each latent cell over the mouth more
(:func:`mouth_region_weights`).

Randomness of a step (timesteps and noise) comes from a generator seeded by (seed, rank, step),
so a resumed run draws exactly the noise the uninterrupted run drew at the same step.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from core.sections import TrainConfig, WeightsConfig
from core.weights import load_vae, resolve_weights
from training.errors import TrainingError

PROVENANCE_KEYS = ("video_index", "clip_frame_indices", "ref_frame_index")


class NonFiniteLossError(TrainingError, RuntimeError):
    """A NaN / inf loss or gradient: carries the step and the batch provenance."""

    def __init__(self, step: int, what: str, provenance: Mapping[str, Any]):
        self.step, self.what, self.provenance = step, what, dict(provenance)
        super().__init__(f"non-finite {what} at step {step}; batch provenance: {self.provenance}")


@dataclass
class StepResult:
    loss: float  # this rank's batch loss (MSE per element)
    grad_norm: float  # total L2 norm of the averaged gradients, before clipping
    lr: float  # learning rate used for this step


def make_noise_scheduler(cfg: TrainConfig):
    """diffusers ``DDPMScheduler`` with the training schedule (SD-1.5's by default) and
    ``train.prediction_type`` (epsilon or v)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                         beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type)


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """CPU generator for the noise of (rank, step): independent of any global RNG state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rank) * 1_000_003 + step)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters with ``requires_grad`` in module order (what AdamW and the EMA track; the
    reference net's unused tail is frozen by the model)."""
    return [p for p in model.parameters() if p.requires_grad]


def batch_provenance(batch: Mapping[str, torch.Tensor]) -> dict[str, list]:
    """Which source frames a batch holds (manifest row, clip frames, reference frame)."""
    return {k: batch[k].tolist() for k in PROVENANCE_KEYS if k in batch}


def _forward_parameters(model: torch.nn.Module) -> Optional[set[str]]:
    """Names the model's ``forward`` accepts, or None when it takes ``**kwargs``."""
    target = model.module if hasattr(model, "module") else model
    params = inspect.signature(target.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def model_inputs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch keys the model's ``forward`` takes (clean ``latents`` never go in)."""
    accepted = _forward_parameters(model)
    return {k: v for k, v in batch.items() if k != "latents" and (accepted is None or k in accepted)}


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def autocast_context(device: torch.device, mixed_precision: str):
    """bf16 / fp16 autocast on CUDA; nothing on CPU (float32)."""
    if device.type != "cuda" or mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def latent_loss_weights(tc: TrainConfig, weights: WeightsConfig) -> Optional[torch.Tensor]:
    """Per-channel weights [C] of the diffusion MSE, mean 1, or None for ``uniform``. ``pixel``: the
    codec's ``pixel_energy()`` (a linear codec: :class:`core.patch_codec.PatchCodec`), so the loss
    is proportional to the MSE of the decoded patches; a codec without it (``AutoencoderKL``: its
    decoder is not linear) is a :class:`TrainingError` naming ``weights.vae``."""
    if tc.latent_loss_weight == "uniform":
        return None
    paths = resolve_weights(weights)
    codec = load_vae(str(paths.vae), paths.local_files_only)
    if not hasattr(codec, "pixel_energy"):
        raise TrainingError(f"train.latent_loss_weight=pixel needs a linear codec with pixel_energy() "
                            f"(training.fit_vae --codec patch); weights.vae {paths.vae} is a {type(codec).__name__}")
    energy = codec.pixel_energy()
    return (energy / energy.mean()).float()


MOUTH_LANDMARKS = slice(48, 68)  # iBUG-300W: outer and inner lip


def mouth_region_weights(landmarks: torch.Tensor, height: int, width: int, weight: float,
                         margin: float) -> torch.Tensor:
    """Per-cell loss weights [B, F, 1, height, width] for ``train.mouth_loss_weight``: 1 + ``weight``
    x the share of each latent cell covered by the mouth box of its frame.

    ``landmarks`` [B, F, 68, 2]: crop-normalised (x, y in 0..1, the reader's, already mirrored with
    the latents). The box is the lip landmarks' (48-67) bounding box grown by ``margin`` x its
    width / height on each side (the jaw and cheeks move with the lips), clipped to the crop.
    Cell (i, j) spans [i / height, (i + 1) / height] x [j / width, (j + 1) / width]; its coverage is
    the product of the box's overlaps along y and x, so a box edge inside a cell weighs it
    partly (no jump when the mouth moves by less than a cell)."""
    lips = landmarks[..., MOUTH_LANDMARKS, :].float()
    lo, hi = lips.amin(dim=-2), lips.amax(dim=-2)  # [B, F, 2] (x, y)
    grow = (hi - lo) * margin
    lo, hi = (lo - grow).clamp(0.0, 1.0), (hi + grow).clamp(0.0, 1.0)

    def overlap(n: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [B, F, n] share of each cell
        edges = torch.arange(n + 1, device=a.device, dtype=torch.float32) / n
        start = torch.maximum(edges[:-1], a.unsqueeze(-1))
        end = torch.minimum(edges[1:], b.unsqueeze(-1))
        return (end - start).clamp(min=0.0) * n

    cover = overlap(height, lo[..., 1], hi[..., 1]).unsqueeze(-1) * overlap(width, lo[..., 0], hi[..., 0]).unsqueeze(-2)
    return (1.0 + weight * cover).unsqueeze(2)


def prediction_and_target(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], noise_scheduler,
                          generator: torch.Generator, timesteps: Optional[torch.Tensor] = None,
                          mixed_precision: str = "no") -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's prediction float32, its target) [B, F, C, h, w] at one timestep per clip
    (``timesteps`` [B], default: uniform draws from ``generator``; then the noise from it): the
    noise added to ``batch["latents"]`` (``epsilon``), or the velocity ``sqrt(a) eps - sqrt(1 - a) x0``
    (``v_prediction``, diffusers' ``get_velocity``), as ``noise_scheduler.config.prediction_type`` says."""
    latents = batch["latents"]
    device = latents.device
    b = latents.shape[0]
    if timesteps is None:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
    timesteps = timesteps.to(device=device, dtype=torch.long)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)  # broadcasts alpha_t over F, C, h, w
    with autocast_context(device, mixed_precision):
        pred = model(**model_inputs(model, batch), noisy_latents=noisy, timesteps=timesteps)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"train.prediction_type {kind!r} is not epsilon or v_prediction")
    return pred.float(), target


def diffusion_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], noise_scheduler,
                   generator: torch.Generator, timesteps: Optional[torch.Tensor] = None,
                   mixed_precision: str = "no", channel_weights: Optional[torch.Tensor] = None,
                   mouth_weight: float = 0.0, mouth_margin: float = 0.5) -> torch.Tensor:
    """MSE between the model's prediction and its target (:func:`prediction_and_target`).
    ``channel_weights`` [C] (mean 1, :func:`latent_loss_weights`) weighs the squared error of
    each latent channel; None: the plain MSE. ``mouth_weight`` > 0: each latent cell's error is
    also weighed by :func:`mouth_region_weights` of ``batch["landmarks"]`` (the mean is still over
    every cell, so the weights add to the loss rather than reshare it)."""
    pred, target = prediction_and_target(model, batch, noise_scheduler, generator, timesteps, mixed_precision)
    if channel_weights is None and mouth_weight <= 0.0:
        return F.mse_loss(pred, target)
    err = (pred - target) ** 2  # [B, F, C, h, w]
    device = err.device
    if channel_weights is not None:
        err = err * channel_weights.to(device=device, dtype=torch.float32).view(1, 1, -1, 1, 1)
    if mouth_weight > 0.0:
        if "landmarks" not in batch:
            raise TrainingError("train.mouth_loss_weight > 0 needs the clip's landmarks in the batch")
        err = err * mouth_region_weights(batch["landmarks"].to(device), err.shape[-2], err.shape[-1],
                                         mouth_weight, mouth_margin)
    return err.mean()


def ranks_agree_bad(local_bad: bool, device: torch.device) -> bool:
    """True when ``local_bad`` is True on any rank (one all-reduce MAX of a flag; every rank of
    the process group must call it at the same step). Without ``torch.distributed``: the flag."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return bool(local_bad)
    flag = torch.tensor([1.0 if local_bad else 0.0],
                        device=device if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item() > 0)


# fp16: a non-finite gradient norm with finite losses on every rank is an overflow of the scaled
# gradients; GradScaler skips that update and halves its scale. Below this scale even the
# unscaled gradients overflow: a real non-finite gradient, the step stops like any NaN.
MIN_FP16_SCALE = 1.0


def train_step(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], optimizer, lr_scheduler,
               noise_scheduler, cfg: TrainConfig, step: int, rank: int, device: torch.device,
               ema=None, fp16_scaler: Optional[torch.amp.GradScaler] = None,
               channel_weights: Optional[torch.Tensor] = None, mouth_weight: float = 0.0) -> StepResult:
    """Step number ``step`` (1-based): forward, backward (DDP averages gradients), clip, update.

    Bad steps are agreed across ranks before any update: each rank's "my loss is not finite" flag
    is all-reduced (MAX), so when one rank's loss is NaN every rank raises
    :class:`NonFiniteLossError` at this step (the offending rank names its batch, the others say
    "loss of another rank") and nobody is left waiting in the next step's all-reduce. A
    non-finite averaged gradient norm (the same on every rank) stops all ranks too; with fp16 it
    is first treated as a loss-scale overflow (skipped update) while the scale is above
    :data:`MIN_FP16_SCALE`. ``mouth_weight``: ``train.mouth_loss_weight`` in stage 2, 0 in stage 1
    (the caller's choice: :func:`diffusion_loss`)."""
    model.train()
    provenance = batch_provenance(batch)
    batch = to_device(batch, device)
    lr = optimizer.param_groups[0]["lr"]
    loss = diffusion_loss(model, batch, noise_scheduler, step_generator(cfg.seed, rank, step),
                          mixed_precision=cfg.mixed_precision, channel_weights=channel_weights,
                          mouth_weight=mouth_weight, mouth_margin=cfg.mouth_loss_margin)
    optimizer.zero_grad(set_to_none=True)
    (fp16_scaler.scale(loss) if fp16_scaler is not None else loss).backward()
    if fp16_scaler is not None:
        fp16_scaler.unscale_(optimizer)
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
    loss_value = float(loss.detach())
    own_bad = not math.isfinite(loss_value)
    if ranks_agree_bad(own_bad, device):
        what = f"loss ({loss_value})" if own_bad else "loss of another rank"
        raise NonFiniteLossError(step, what, provenance)
    if not math.isfinite(grad_norm):
        if fp16_scaler is None or fp16_scaler.get_scale() < MIN_FP16_SCALE:
            raise NonFiniteLossError(step, f"gradient norm ({grad_norm})", provenance)
    if fp16_scaler is not None:
        fp16_scaler.step(optimizer)  # skips the update on an overflow (non-finite scaled gradients)
        fp16_scaler.update()
    else:
        optimizer.step()
    lr_scheduler.step()
    if ema is not None:
        ema.step(trainable(model))
    return StepResult(loss=loss_value, grad_norm=grad_norm, lr=lr)
