"""GPU benchmark rows at SD-1.5 size (random weights: speed and memory only, no quality).

Rows (one table; ``benchmarks.run`` adds them to ``make bench`` when CUDA is present, else one
row says why they were skipped):

* train step, fp32 master weights + bf16 autocast (``train.mixed_precision=bf16``): seconds per
  step and peak memory, B = 1 clip of 12 frames at 512 px (64 x 64 latents), 20 motion latents,
  12 x 768 audio, gradient checkpointing, AdamW over ``model.trainable_parameters()``, through
  ``training.step.train_step`` (the training loop's step);
* train step with the weights in bf16 (``model.dtype=bfloat16``, no autocast): same batch;
* sampler real-time factor at 512 px: bf16, the denoising loop of ``inference.sampler`` (25 DDIM
  steps, three guidance conditions, motion frames from the generated latents), video seconds per
  compute second (VAE decode excluded), peak memory;
* sampler, issue 14's attention (no boolean SDPA mask on any row, so the flash kernel can run;
  reference K/V once per clip) against the computation before it
  (``models.reference_attention.boolean_masks``): ratio of one clip's time, interleaved pairs;
* sampler, reference features cached per clip against recomputed at every step: ratio;
* (CUDA only) the MTCNN face detector's seconds per frame at batch 1 / 8 / 32 on 1280x720 frames
  (``benchmarks.bench_detectors.gpu_rows``; real weights, from the facenet-pytorch wheel).

``python -m benchmarks.gpu_rows`` (CUDA, sd15 size); ``--quick``: fewer steps and frames (about
2 minutes on one A100-class GPU, model construction included); ``--device cpu --tiny``: the same
code at the tiny preset's size, to check the script on a machine without a GPU (CPU rows then
run in float32 without autocast, which the training step applies on CUDA only);
``--json FILE`` also writes the rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

BENCH = "gpu"


@dataclasses.dataclass(frozen=True)
class Size:
    """Model and input size of a run."""

    name: str
    unet_config: dict
    audio_layers: int  # wav2vec2 layers L
    audio_dim: int  # wav2vec2 width D
    latent_hw: int  # latent side (pixels / 8)

    @property
    def pixels(self) -> int:
        return self.latent_hw * 8


def sd15_size() -> Size:
    from models.loopy import sd15_unet_config

    return Size("sd15", sd15_unet_config(), 12, 768, 64)


def tiny_size() -> Size:
    from core.weights import tiny_unet_config

    return Size("tiny", tiny_unet_config(), 2, 32, 8)


def _row(metric: str, value, unit: str, target: str = "", note: str = "") -> dict:
    return {"benchmark": BENCH, "metric": metric, "value": value, "unit": unit, "target": target, "note": note}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()  # models hold reference cycles (hooks, processors): free them before measuring
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "n/a (CPU)"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def _model(size: Size, device: torch.device, dtype: torch.dtype):
    """A stage-2 LoopyModel of ``size`` with random weights, built directly on ``device``."""
    from models.loopy import LoopyModel

    with torch.device(device):
        model = LoopyModel(size.unet_config, stage=2, audio_layers=size.audio_layers, audio_dim=size.audio_dim,
                           audio_window=5)
    return model.to(dtype)


def _train_batch(size: Size, clip_frames: int, motion: int) -> dict:
    b, f, m, hw = 1, clip_frames, motion, size.latent_hw
    g = torch.Generator().manual_seed(0)
    return {
        "latents": torch.randn((b, f, 4, hw, hw), generator=g), "ref_latent": torch.randn((b, 4, hw, hw), generator=g),
        "motion_latents": torch.randn((b, m, 4, hw, hw), generator=g),
        "motion_mask": torch.ones(b, m, dtype=torch.bool),
        "audio": torch.randn((b, f, 5, size.audio_layers, size.audio_dim), generator=g),
        "landmarks": torch.rand((b, f, 68, 2), generator=g),
        "head_motion_var": torch.rand((b,), generator=g), "expression_var": torch.rand((b,), generator=g),
        "drop_audio": torch.zeros(b, dtype=torch.bool), "drop_motion_cond": torch.zeros(b, dtype=torch.bool),
        "drop_ref": torch.zeros(b, dtype=torch.bool), "drop_motion_frames": torch.zeros(b, dtype=torch.bool),
        "a2l_kind": torch.zeros(b, dtype=torch.long),
        "clip_frame_indices": torch.arange(f)[None], "ref_frame_index": torch.tensor([f + 30]),
        "motion_source_indices": torch.arange(m)[None], "video_index": torch.zeros(b, dtype=torch.long),
    }


def train_step_row(size: Size, device: torch.device, weights: str, steps: int) -> dict:
    """Median seconds of ``steps`` training steps (after 2 warm-up steps); ``weights``:
    ``fp32+bf16-autocast`` (fp32 master weights, bf16 autocast on CUDA) or ``bf16``."""
    from diffusers.optimization import get_scheduler

    from core.sections import ReaderConfig, TrainConfig
    from training.step import make_noise_scheduler, train_step

    bf16_weights = weights == "bf16"
    cfg = TrainConfig(mixed_precision="no" if bf16_weights else "bf16", use_gpu=device.type == "cuda")
    model = _model(size, device, torch.bfloat16 if bf16_weights else torch.float32)
    model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(list(model.trainable_parameters()), lr=1e-5)
    lr_scheduler = get_scheduler("constant", optimizer)
    noise = make_noise_scheduler(cfg)
    reader = ReaderConfig()
    batch = _train_batch(size, reader.clip_frames, 20)
    _reset_peak(device)
    times = []
    for step in range(1, steps + 3):
        def one_step(step: int = step) -> None:
            train_step(model, batch, optimizer, lr_scheduler, noise, cfg, step=step, rank=0, device=device)
        times.append(_timed(one_step, device))
    peak = _peak_gib(device)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    autocast = "bf16 autocast" if (device.type == "cuda" and not bf16_weights) else "no autocast"
    what = "fp32 master + bf16 autocast" if not bf16_weights else "bf16 weights"
    return _row(f"{size.name} train step, {what}", statistics.median(times[2:]), "s / step", "",
                f"{_device_name(device)}; B=1 x {reader.clip_frames} frames at {size.pixels} px, 20 motion latents, "
                f"{size.audio_layers}x{size.audio_dim} audio, grad ckpt, AdamW, {autocast}; {n_params:,.1f} M params; "
                f"median of {steps} steps after 2 warm-up; peak {peak}")


def sampler_rows(size: Size, device: torch.device, steps: int, frames: int, ratio_steps: int, pairs: int
                 ) -> list[dict]:
    """Real-time factor of the denoising loop, and the two ratios (see the module docstring)."""
    from core.config import PlatformConfig
    from core.sections import SamplerConfig
    from inference.sampler import LoopySampler
    from models.reference_attention import boolean_masks

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = _model(size, device, dtype).eval()
    sampler = LoopySampler(model, None, None, None, PlatformConfig(), device)
    g = torch.Generator().manual_seed(0)
    hw = size.latent_hw
    ref = torch.randn((1, 4, hw, hw), generator=g).to(device)
    feats = torch.randn((frames, size.audio_layers, size.audio_dim), generator=g).to(device)
    opts = SamplerConfig(steps=steps)
    with torch.no_grad():
        sampler.generate_latents(ref, feats[: sampler.clip_frames], dataclasses.replace(opts, steps=1))  # warm-up
        _reset_peak(device)
        loop = _timed(lambda: sampler.generate_latents(ref, feats, opts), device)
    name, peak = _device_name(device), _peak_gib(device)
    rows = [_row(f"{size.name} sampler real-time factor, {size.pixels} px", frames / 25.0 / loop,
                 "video s / compute s", "",
                 f"{name}, {str(dtype).removeprefix('torch.')}, random weights, {frames} frames ({frames / 25:g} s), "
                 f"{steps} DDIM steps x 3 guidance conditions, denoising loop only (no VAE); {loop:.1f} s; "
                 f"peak {peak}")]

    # one clip, interleaved pairs: now vs before issue 14, cached vs recomputed reference
    from pipelines.encoders.audio_features import audio_windows

    audio = sampler.clip_audio(audio_windows(feats, radius=sampler.audio_radius), 0)
    history = torch.randn((sampler.clip_frames, 4, hw, hw), generator=g).to(device)
    motion, mask = sampler.motion_history(history, sampler.clip_frames, ref)  # partly real history
    clip_opts = SamplerConfig(steps=ratio_steps)

    def clip(**kw):
        return sampler.denoise_clip(ref, motion, mask, audio, clip_opts, torch.Generator().manual_seed(0), **kw)

    def before():
        with boolean_masks():
            clip()

    def pairs_of(fn_a, fn_b) -> tuple[float, float, float]:
        ta, tb = [], []
        for _ in range(pairs):
            ta.append(_timed(fn_a, device))
            tb.append(_timed(fn_b, device))
        return statistics.median(b / a for a, b in zip(ta, tb)), statistics.median(ta), statistics.median(tb)

    with torch.no_grad():
        clip()
        ratio, now_s, before_s = pairs_of(clip, before)
        rows.append(_row(f"{size.name} sampler no-mask attention speed-up", ratio, "x (before / now)", "> 1",
                         f"{name}; one 12-frame clip, {ratio_steps} steps, median of {pairs} interleaved pairs: "
                         f"boolean SDPA masks + reference K/V per frame and call {before_s:.2f} s vs split "
                         f"unmasked groups + K/V once per clip {now_s:.2f} s"))
        ratio, cached_s, recompute_s = pairs_of(clip, lambda: clip(cache_reference=False))
        rows.append(_row(f"{size.name} sampler reference cache speed-up", ratio, "x (per step / per clip)", "> 1",
                         f"{name}; one clip, {ratio_steps} steps, median of {pairs} pairs: reference once "
                         f"{cached_s:.2f} s vs every step {recompute_s:.2f} s"))
    return rows


def collect(device: torch.device, size: Size, quick: bool) -> list[dict]:
    """Every row for ``size`` on ``device`` (train steps first: they need the most memory)."""
    steps = 3 if quick else 5
    rows = []
    for weights in ("fp32+bf16-autocast", "bf16"):
        rows.append(train_step_row(size, device, weights, steps))
        _reset_peak(device)  # the model and optimizer of the row are gone: release their memory
    rows += sampler_rows(size, device, steps=10 if quick else 25, frames=24 if quick else 50,
                         ratio_steps=3 if quick else 5, pairs=2 if quick else 3)
    if device.type == "cuda":  # the ingest's GPU face detector (ingest.detector=mtcnn with use_gpu)
        from benchmarks.bench_detectors import gpu_rows as detector_rows

        rows += detector_rows(str(device), repeats=2 if quick else 3)
    return rows


def run() -> list[dict]:
    """For ``benchmarks.run``: the sd15 rows on CUDA, else one row saying why they are skipped."""
    if not torch.cuda.is_available():
        return [_row("sd15-size GPU rows", "", "", "",
                     "skipped: no CUDA device (torch.cuda.is_available() is False); "
                     "`python -m benchmarks.gpu_rows --device cpu --tiny` checks the script")]
    import os

    return collect(torch.device("cuda"), sd15_size(), quick=os.environ.get("LOOPY_BENCH_QUICK", "0") not in ("0", ""))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset's size (a check of the script)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and frames")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_rows: no CUDA device here (use --device cpu --tiny to check the script)", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(1)  # see benchmarks/bench_sampler.py: tiny models on a shared machine
    from benchmarks.run import print_table

    rows = collect(device, tiny_size() if args.tiny else sd15_size(), args.quick)
    print_table(rows)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
