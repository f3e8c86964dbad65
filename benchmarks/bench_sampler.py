"""Sampler benchmarks.

* real-time factor of the tiny preset on CPU: seconds of video per second of compute, for the
  whole call (portrait crop + VAE encode, audio decode + wav2vec2, DDIM, VAE decode, mp4) and for
  the denoising loop alone;
* the batched three-way guidance (one forward of batch 3B) against three forwards (ratio);
* the reference features cached per clip against recomputing them at every step (ratio);
* with CUDA: the sd15-sized model (random weights, SD-1.5 U-Net config, 12 x 768 audio) at 512 px
  (64 x 64 latents), bf16, denoising loop real-time factor (VAE decode excluded).

``LOOPY_BENCH_QUICK=1``: 5 DDIM steps instead of 25 (noted in each row). Timings on a shared
2-core machine are noisy; the ratios are medians of repeated runs.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

QUICK = os.environ.get("LOOPY_BENCH_QUICK", "0") not in ("0", "", "false")
STEPS = 5 if QUICK else 25
RATIO_STEPS = 3 if QUICK else 10  # steps per clip in the ratio measurements
# torch intra-op threads for the CPU rows: on a shared machine OpenMP's spinning threads make the
# tiny model ~10x slower with 2 threads than with 1 (LOOPY_BENCH_THREADS overrides)
CPU_THREADS = int(os.environ.get("LOOPY_BENCH_THREADS", "1"))
BENCH = "sampler"


def _row(metric, value, unit, target="", note=""):
    return {"benchmark": BENCH, "metric": metric, "value": value, "unit": unit, "target": target, "note": note}


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _inputs(folder: Path, seconds: float) -> tuple[Path, Path]:
    from PIL import Image
    from skimage import data

    image = folder / "portrait.png"
    Image.fromarray(data.astronaut()[20:280, 80:380]).save(image)
    audio = folder / "speech.wav"
    subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", str(audio), "synth", f"{seconds}", "sine", "200-600",
                    "tremolo", "5", "80"], check=True)
    return image, audio


def _clip_inputs(sampler, latent_hw: int, device):
    from pipelines.audio_features import audio_windows

    cfg = sampler.model.config
    g = torch.Generator().manual_seed(0)
    ref = torch.randn((1, 4, latent_hw, latent_hw), generator=g).to(device)
    feats = torch.randn((sampler.clip_frames, cfg.audio_layers, cfg.audio_dim), generator=g).to(device)
    audio = sampler.clip_audio(audio_windows(feats, radius=sampler.audio_radius), 0)
    history = torch.randn((12, 4, latent_hw, latent_hw), generator=g).to(device)
    motion, mask = sampler.motion_history(history, 12, ref)
    return ref, motion, mask, audio


def _guidance_ratios(sampler, latent_hw: int, steps: int, repeats: int, device) -> dict:
    from core.sections import SamplerConfig

    ref, motion, mask, audio = _clip_inputs(sampler, latent_hw, device)
    opts = SamplerConfig(steps=steps)

    def clip(**kw):
        return lambda: sampler.denoise_clip(ref, motion, mask, audio, opts, torch.Generator().manual_seed(0), **kw)

    with torch.no_grad():
        clip()()  # warm-up
        batched = _median_time(clip(), repeats)
        three = _median_time(clip(batched=False), repeats)
        recompute = _median_time(clip(cache_reference=False), repeats)
    return {"batched_s": batched, "three_s": three, "recompute_s": recompute}


def _tiny_rows() -> list[dict]:
    from core.sections import SamplerConfig
    from inference.sampler import LoopySampler
    from models.untrained_package import write_untrained_package

    rows = []
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench_sampler_") as tmp:
        tmp = Path(tmp)
        package = write_untrained_package(tmp / "package")
        sampler = LoopySampler.from_package(package, device="cpu")
        seconds = 1.0 if QUICK else 2.0
        image, audio = _inputs(tmp, seconds)
        opts = SamplerConfig(steps=STEPS)
        sampler.generate(image, audio, tmp / "warm.mp4", dataclasses.replace(opts, steps=1))  # warm-up
        t0 = time.perf_counter()
        result = sampler.generate(image, audio, tmp / "out.mp4", opts)
        total = time.perf_counter() - t0
        rows.append(_row("tiny CPU real-time factor, whole call", result.duration_s / total, "video s / compute s",
                         "", f"{result.num_frames} frames ({seconds:g} s audio), {STEPS} DDIM steps, 64 px; "
                             f"{total:.2f} s incl. crop, wav2vec2, VAE, mp4; {CPU_THREADS} torch thread(s)"))
        ref = sampler.prepare_portrait(__import__("inference.portrait", fromlist=["load_image"]).load_image(image))
        _, feats = sampler.prepare_audio(audio, 25.0)
        t0 = time.perf_counter()
        sampler.generate_latents(ref, feats, opts)
        loop = time.perf_counter() - t0
        rows.append(_row("tiny CPU real-time factor, denoising loop", result.duration_s / loop, "video s / compute s",
                         "", f"{result.num_frames} frames, {STEPS} steps, 3 guidance conditions per step"))
        r = _guidance_ratios(sampler, 8, RATIO_STEPS, 3, torch.device("cpu"))
        rows.append(_row("tiny CPU batched guidance speed-up", r["three_s"] / r["batched_s"], "x (3 calls / 1 call)",
                         "> 1", f"one 12-frame clip, {RATIO_STEPS} steps, median of 3: {r['batched_s']:.3f} s batched vs "
                                f"{r['three_s']:.3f} s as three forwards; on {CPU_THREADS} CPU thread(s) the "
                                f"arithmetic is the same, the gain (fewer launches, larger kernels) is a GPU one"))
        rows.append(_row("tiny CPU reference cache speed-up", r["recompute_s"] / r["batched_s"], "x (per step / per clip)",
                         "> 1", f"one clip, {RATIO_STEPS} steps: reference net (1 + 20 motion latents) once "
                                f"{r['batched_s']:.3f} s vs every step {r['recompute_s']:.3f} s"))
    return rows


def _sd15_gpu_rows() -> list[dict]:
    if not torch.cuda.is_available():
        return [_row("sd15-size 512 px real-time factor (GPU)", "", "video s / compute s", "",
                     "skipped: no CUDA device on this machine")]
    from core.config import PlatformConfig
    from models.loopy import LoopyModel, sd15_unet_config
    from core.sections import SamplerConfig
    from inference.sampler import LoopySampler

    device = torch.device("cuda")
    with torch.device("cuda"):
        model = LoopyModel(sd15_unet_config(), stage=2, audio_layers=12, audio_dim=768, audio_window=5)
    model = model.to(torch.bfloat16).eval()
    cfg = PlatformConfig()
    sampler = LoopySampler(model, None, None, None, cfg, device)
    frames = 24 if QUICK else 50
    g = torch.Generator().manual_seed(0)
    ref = torch.randn((1, 4, 64, 64), generator=g).to(device)
    feats = torch.randn((frames, 12, 768), generator=g).to(device)
    opts = SamplerConfig(steps=STEPS)
    torch.cuda.reset_peak_memory_stats()
    sampler.generate_latents(ref, feats[:12], dataclasses.replace(opts, steps=1))  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    sampler.generate_latents(ref, feats, opts)
    torch.cuda.synchronize()
    loop = time.perf_counter() - t0
    name = torch.cuda.get_device_name()
    rows = [_row("sd15-size 512 px real-time factor (GPU)", frames / 25.0 / loop, "video s / compute s", "",
                 f"{name}, bf16, random weights, {frames} frames, {STEPS} steps, denoising loop only; "
                 f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")]
    r = _guidance_ratios(sampler, 64, 3 if QUICK else 10, 3, device)
    rows.append(_row("sd15-size batched guidance speed-up (GPU)", r["three_s"] / r["batched_s"], "x", "> 1", name))
    rows.append(_row("sd15-size reference cache speed-up (GPU)", r["recompute_s"] / r["batched_s"], "x", "> 1", name))
    return rows


def run() -> list[dict]:
    before = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        return _tiny_rows() + _sd15_gpu_rows()
    finally:
        torch.set_num_threads(before)
