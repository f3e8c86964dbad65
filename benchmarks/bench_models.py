"""The Loopy networks (issue 4): step time, memory, and the reference-net cache.

* ``tiny fwd+bwd``: one stage-2 training step (forward + backward, no optimizer) of the tiny
  preset on CPU, B = 1, F = 12 clip frames, M = 20 motion latents, 4x8x8 latents (64 px crops),
  audio 5 x 2 x 32; median CPU seconds of several steps, in a fresh process with one torch thread (on the shared 2-core
  machine two OpenMP threads spin against other processes and are many times slower).
  ``peak RSS``: that process's peak resident memory; ``step peak over loaded``: the peak minus the
  RSS once the model and batch exist (what the step itself needs).
* ``reference cache``: inference as the sampler runs it (three guidance conditions batched,
  B = 3, F = 12, M = 20): ``steps`` denoising steps with the reference features computed once
  against recomputing them at every step; the ratio (recompute / cached) is the cache's speed-up.
* ``sd15``: parameter counts of the SD-1.5-sized stage-2 model (built on the meta device, no
  weights); with CUDA, one training step at 12 frames, 512 px (64x64 latents), M = 20, bf16,
  batch 1: time and peak GPU memory, with and without gradient checkpointing. Without CUDA the
  row says so (this machine has no GPU).

``LOOPY_BENCH_QUICK=1`` runs fewer steps (noted in each row).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
QUICK = os.environ.get("LOOPY_BENCH_QUICK", "0") not in ("0", "", "false")
F, M = 12, 20


def _tiny_model(stage: int = 2):
    from core.sections import ModelConfig, ReaderConfig, WeightsConfig
    from core.weights import resolve_weights
    from models.loopy import LoopyModel

    tiny_dir = os.environ.get("LOOPY_BENCH_TINY_DIR") or str(Path(tempfile.gettempdir()) / "loopy_bench_tiny_weights")
    paths = resolve_weights(WeightsConfig(preset="tiny", tiny_dir=tiny_dir))
    torch.manual_seed(0)
    model = LoopyModel.from_sd15(paths.unet, ModelConfig(), ReaderConfig(), stage=1)
    return model if stage == 1 else LoopyModel.from_stage1(model, ModelConfig(), ReaderConfig())


def make_batch(model, batch: int, frames: int, motion: int, side: int, device="cpu", dtype=torch.float32) -> dict:
    """A random training batch (keys of docs/CONTRACTS.md) for ``model``'s audio sizes."""
    cfg = model.config
    off = torch.zeros(batch, dtype=torch.bool, device=device)

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    return dict(
        noisy_latents=rnd(batch, frames, 4, side, side), timesteps=torch.randint(0, 1000, (batch,), device=device),
        ref_latent=rnd(batch, 4, side, side), motion_latents=rnd(batch, motion, 4, side, side),
        motion_mask=torch.ones(batch, motion, dtype=torch.bool, device=device),
        audio=rnd(batch, frames, cfg.audio_window, cfg.audio_layers, cfg.audio_dim),
        landmarks=torch.rand(batch, frames, 68, 2, device=device, dtype=dtype),
        head_motion_var=torch.rand(batch, device=device, dtype=dtype) * 1e-3,
        expression_var=torch.rand(batch, device=device, dtype=dtype) * 1e-3,
        drop_audio=off, drop_motion_cond=off, drop_ref=off, drop_motion_frames=off,
        a2l_kind=torch.zeros(batch, dtype=torch.long, device=device),
    )


def _clock(cuda: bool) -> float:
    """GPU: wall seconds after a synchronize. CPU: this process's CPU seconds (one torch thread),
    which other processes on the shared machine do not inflate."""
    if cuda:
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def train_step_seconds(model, batch: dict, repeats: int) -> list[float]:
    """Seconds (see :func:`_clock`) of ``repeats`` forward + backward passes after one warm-up."""
    cuda = next(model.parameters()).is_cuda
    times = []
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        t0 = _clock(cuda)
        model(**batch).float().square().mean().backward()
        if i:
            times.append(_clock(cuda) - t0)
    return times


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _child_tiny_step(repeats: int) -> dict:
    """Runs in a fresh process: tiny stage-2 step time and memory."""
    torch.set_num_threads(1)
    model = _tiny_model().train()
    batch = make_batch(model, 1, F, M, 8)
    loaded = _rss_mb()
    times = train_step_seconds(model, batch, repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"median_s": statistics.median(times), "peak_rss_mb": peak, "loaded_rss_mb": loaded,
            "params": sum(p.numel() for p in model.parameters())}


def _reference_cache(steps: int) -> dict:
    """Sampler-like inference: cached reference vs recomputed at every step (tiny, CPU)."""
    torch.set_num_threads(1)
    model = _tiny_model().eval()
    b = make_batch(model, 1, F, M, 8)
    drop_audio = torch.tensor([False, True, True])
    a2l = {"audio": b["audio"].repeat(3, 1, 1, 1, 1)}
    audio = a2l["audio"]
    x = b["noisy_latents"].repeat(3, 1, 1, 1, 1)
    guidance_drop_ref = torch.tensor([False, False, True])

    def reference():
        ref = model.compute_reference(b["ref_latent"], b["motion_latents"], b["motion_mask"])
        return ref.repeat(3).with_drops(guidance_drop_ref)

    with torch.no_grad():
        reference()  # warm-up
        t0 = _clock(False)
        ref = reference()
        for s in range(steps):
            model.denoise(x, torch.full((3,), 999 - 40 * s), ref, audio, a2l, None, drop_audio, None)
        cached = _clock(False) - t0
        t0 = _clock(False)
        for s in range(steps):
            model.denoise(x, torch.full((3,), 999 - 40 * s), reference(), audio, a2l, None, drop_audio, None)
        recomputed = _clock(False) - t0
    return {"cached_s": cached, "recomputed_s": recomputed}


def _sd15_sizes() -> dict:
    from models.loopy import LoopyModel, sd15_unet_config

    with torch.device("meta"):
        model = LoopyModel(sd15_unet_config(), stage=2, audio_layers=12, audio_dim=768, audio_window=5)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.trainable_parameters())
    unet = sum(p.numel() for p in model.reference_net.parameters())
    return {"total": total, "trainable": trainable, "loopy_new": total - 2 * unet - model.null_context.numel()}


def _sd15_gpu_step(checkpointing: bool, repeats: int) -> dict:
    from models.loopy import LoopyModel, sd15_unet_config

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.device("cuda"):
        model = LoopyModel(sd15_unet_config(), stage=2, audio_layers=12, audio_dim=768, audio_window=5)
    model = model.to(torch.bfloat16).train()
    if checkpointing:
        model.enable_gradient_checkpointing()
    batch = make_batch(model, 1, F, M, 64, device="cuda", dtype=torch.bfloat16)
    try:
        times = train_step_seconds(model, batch, repeats)
        return {"median_s": statistics.median(times), "peak_gb": torch.cuda.max_memory_allocated() / 2**30}
    except torch.cuda.OutOfMemoryError:
        return {"median_s": None, "peak_gb": None, "oom": True}
    finally:
        del model
        torch.cuda.empty_cache()


def run() -> list[dict]:
    rows = []
    repeats = 3 if QUICK else 7
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_models", "--child-tiny-step", str(repeats)],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    tiny = json.loads(out.stdout.strip().splitlines()[-1])
    shape = f"stage 2, B=1, F={F}, M={M}, latents 4x8x8, {tiny['params'] / 1e6:.2f} M params, 1 torch thread"
    rows.append({"benchmark": "models tiny", "metric": "fwd+bwd step", "value": tiny["median_s"], "unit": "CPU s",
                 "target": "~1", "note": f"median of {repeats}; {shape}"})
    rows.append({"benchmark": "models tiny", "metric": "peak RSS", "value": tiny["peak_rss_mb"], "unit": "MB",
                 "target": "", "note": "whole process (python + torch + model)"})
    rows.append({"benchmark": "models tiny", "metric": "step peak over loaded", "value":
                 tiny["peak_rss_mb"] - tiny["loaded_rss_mb"], "unit": "MB", "target": "",
                 "note": "peak RSS minus RSS with model and batch loaded"})

    steps = 10 if QUICK else 25
    cache = _reference_cache(steps)
    note = f"tiny, CPU 1 thread, {steps} DDIM-like steps, 3 guidance conditions batched, F={F}, M={M}"
    rows.append({"benchmark": "models ref cache", "metric": "cached", "value": cache["cached_s"], "unit": "CPU s",
                 "target": "", "note": note})
    rows.append({"benchmark": "models ref cache", "metric": "recomputed", "value": cache["recomputed_s"],
                 "unit": "CPU s", "target": "", "note": note})
    rows.append({"benchmark": "models ref cache", "metric": "speed-up (recomputed / cached)",
                 "value": cache["recomputed_s"] / cache["cached_s"], "unit": "x", "target": "> 1",
                 "note": "reference net over 1 + M frames vs denoising 3 x F frames"})

    sizes = _sd15_sizes()
    rows.append({"benchmark": "models sd15", "metric": "params total / trainable / new",
                 "value": f"{sizes['total'] / 1e6:.0f} / {sizes['trainable'] / 1e6:.0f} / {sizes['loopy_new'] / 1e6:.0f}",
                 "unit": "M", "target": "", "note": "stage 2 on the meta device; new = temporal + audio modules"})
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for ckpt in (False, True):
            r = _sd15_gpu_step(ckpt, 2 if QUICK else 5)
            tag = "grad ckpt" if ckpt else "no ckpt"
            note = f"{name}, bf16 weights, B=1, F={F}, M={M}, 512 px" + (" (OOM)" if r.get("oom") else "")
            rows.append({"benchmark": "models sd15", "metric": f"train step ({tag})", "value": r["median_s"],
                         "unit": "s", "target": "", "note": note})
            rows.append({"benchmark": "models sd15", "metric": f"peak GPU memory ({tag})", "value": r["peak_gb"],
                         "unit": "GiB", "target": "", "note": note})
    else:
        rows.append({"benchmark": "models sd15", "metric": "train step", "value": "n/a", "unit": "s", "target": "",
                     "note": "no CUDA device on this machine: not measured"})
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child-tiny-step":
        print(json.dumps(_child_tiny_step(int(sys.argv[2]))))
    else:
        from benchmarks.run import print_table
        print_table(run())
