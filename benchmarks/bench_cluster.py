"""Compute per unit of work at the real (sd15) sizes, for the scale plan (cluster/README.md).

No GPU here and no real weights, so these are **FLOP counts, not timings**: the real-size networks
are built on PyTorch's ``meta`` device (shapes only, no memory, no weights) and one call is
counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention;
2 FLOPs per multiply-add). The scale plan turns them into A100 time with a stated utilisation
assumption.

Rows:
* VAE encode of one 512x512 frame (SD-1.5 ``AutoencoderKL`` config), ingest;
* wav2vec2-base over one second of 16 kHz audio, ingest (random weights, run on the CPU);
* Loopy stage 1 and stage 2 training samples (forward + backward; batch 1; stage 2 = 12 clip
  frames, reference + 20 motion latents, audio 5 x 12 x 768), built with
  ``LoopyModel.from_unet(sd15 U-Net config)`` - the model code of this repository, at SD-1.5 size;
* the stage-2 forward alone (gradient checkpointing recomputes about one forward).
"""
from __future__ import annotations

import builtins
import contextlib
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

NOTE = "FLOPs counted on the meta device (not timed; no GPU here)"


def _flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@contextlib.contextmanager
def _meta_truth_values():
    """Model code that branches on a tensor (``bool(mask.all())``) cannot run on meta tensors
    (no values). For counting, such a check on a meta tensor answers True (no masking branch);
    every other ``bool`` call is the builtin. Restored on exit."""
    def meta_bool(value=False):
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            return True
        return builtins.bool(value)

    patched = [m for name, m in list(sys.modules.items()) if name.startswith("models.") and m is not None]
    for module in patched:
        module.bool = meta_bool
    try:
        yield
    finally:
        for module in patched:
            module.__dict__.pop("bool", None)


def vae_encode_tflops(size: int = 512) -> float:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=size,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512])
        frame = torch.empty(1, 3, size, size)
        return _flops(lambda: vae.encode(frame)) / 1e12


def wav2vec2_tflops_per_second(sample_rate: int = 16000) -> float:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    # small enough to run for real on the CPU (its feature encoder reads values, so no meta device)
    torch.manual_seed(0)
    model = Wav2Vec2Model(Wav2Vec2Config()).eval()  # base: 12 layers x 768, random weights
    audio = torch.randn(1, sample_rate)
    with torch.no_grad():
        return _flops(lambda: model(audio, output_hidden_states=True)) / 1e12


def loopy_train_tflops(stage: int) -> tuple[float, float, float]:
    """(forward + backward, forward) TFLOPs of one training sample, and parameters in millions."""
    from diffusers import UNet2DConditionModel

    import models.loopy  # noqa: F401  (loaded before the truth-value patch)
    from models.config import ModelConfig
    from models.loopy import LoopyModel, sd15_unet_config

    cfg = ModelConfig(preset="sd15", audio_layers=12, audio_dim=768)
    f, m, h = (12, 20, 64) if stage == 2 else (1, 0, 64)
    with torch.device("meta"), _meta_truth_values():
        model = LoopyModel.from_unet(UNet2DConditionModel(**sd15_unet_config()), stage, cfg)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        batch = dict(noisy_latents=torch.empty(1, f, 4, h, h), timesteps=torch.tensor([500]),
                     ref_latent=torch.empty(1, 4, h, h))
        if stage == 2:
            no = torch.zeros(1, dtype=torch.bool)
            batch.update(motion_latents=torch.empty(1, m, 4, h, h), motion_mask=torch.ones(1, m, dtype=torch.bool),
                         audio=torch.empty(1, f, 5, cfg.audio_layers, cfg.audio_dim),
                         landmarks=torch.empty(1, f, 68, 2), head_motion_var=torch.empty(1),
                         expression_var=torch.empty(1), drop_audio=no, drop_motion_cond=no, drop_ref=no,
                         drop_motion_frames=no, a2l_kind=torch.zeros(1, dtype=torch.long))
        forward = _flops(lambda: model(**batch)) / 1e12
        total = _flops(lambda: model(**batch).sum().backward()) / 1e12
    return total, forward, params


def run() -> list[dict]:
    rows = []

    def row(metric, value, unit, note=NOTE):
        rows.append({"benchmark": "cluster", "metric": metric, "value": value, "unit": unit, "target": "",
                     "note": note})

    t0 = time.perf_counter()
    row("vae_encode_512px_per_frame", round(vae_encode_tflops(), 4), "TFLOP")
    row("wav2vec2_base_per_audio_second", round(wav2vec2_tflops_per_second(), 4), "TFLOP",
        "FLOPs counted on one CPU call with random weights (not timed)")
    for stage in (1, 2):
        total, forward, params = loopy_train_tflops(stage)
        row(f"loopy_stage{stage}_train_sample_fwd_bwd", round(total, 3), "TFLOP",
            f"{NOTE}; batch 1, {params:.0f} M parameters")
        row(f"loopy_stage{stage}_forward", round(forward, 3), "TFLOP")
    row("flop_count_wall", round(time.perf_counter() - t0, 1), "s", "building the meta models and counting")
    return rows


if __name__ == "__main__":
    from benchmarks.run import print_table

    print_table(run())
