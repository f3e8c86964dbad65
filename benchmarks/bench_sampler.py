"""Sampler benchmarks.

* real-time factor of the tiny preset on CPU: seconds of video per second of compute, for the
  whole call (portrait crop + VAE encode, audio decode + wav2vec2, DDIM, VAE decode, mp4) and for
  the denoising loop alone;
* the batched three-way guidance (one forward of batch 3B) against three forwards (ratio);
* the reference features cached per clip against recomputing them at every step (ratio), with
  the ratio the measured parts predict;
* issue 14's attention (no boolean SDPA mask on any row, reference K/V projected once per clip)
  against the computation before it (``models.reference_attention.boolean_masks``) (ratio).

The sd15-size rows (512 px, CUDA) are in ``benchmarks/gpu_rows.py`` (run by ``benchmarks.run``).

``LOOPY_BENCH_QUICK=1``: 5 DDIM steps instead of 25 (noted in each row).

Ratios are measured in interleaved pairs (A, B, A, B, ...) and reported as the median of the
per-pair ratios, in this process's CPU seconds with one torch thread (CUDA: wall seconds after a
synchronize). Why: the former rows timed each variant in its own block of wall-clock runs; on this
2-core machine shared by other jobs the same clip took 2.6 s in one block and 9.0 s a few minutes
later, so a block ratio says more about the load than about the code. That is how the "reference
cache speed-up" once read 0.80x: re-measured the old way it read 1.94, 1.55, 1.32 and 1.60 in four
consecutive runs; interleaved in CPU seconds 1.28 (median of 6 pairs), as its parts predict.
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
    from pipelines.encoders.audio_features import audio_windows

    cfg = sampler.model.config
    g = torch.Generator().manual_seed(0)
    ref = torch.randn((1, 4, latent_hw, latent_hw), generator=g).to(device)
    feats = torch.randn((sampler.clip_frames, cfg.audio_layers, cfg.audio_dim), generator=g).to(device)
    audio = sampler.clip_audio(audio_windows(feats, radius=sampler.audio_radius), 0)
    history = torch.randn((12, 4, latent_hw, latent_hw), generator=g).to(device)
    motion, mask = sampler.motion_history(history, 12, ref)
    return ref, motion, mask, audio


def _clock(device) -> float:
    """CUDA: wall seconds after a synchronize; CPU: this process's CPU seconds (load-independent
    with one torch thread)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def _paired(fn_a, fn_b, pairs: int, device) -> tuple[float, float, float]:
    """Interleaved timing: (median ratio t_b / t_a over the pairs, median t_a, median t_b)."""
    ta, tb = [], []
    for _ in range(pairs):
        t0 = _clock(device)
        fn_a()
        t1 = _clock(device)
        fn_b()
        t2 = _clock(device)
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    return statistics.median(b / a for a, b in zip(ta, tb)), statistics.median(ta), statistics.median(tb)


def _guidance_ratios(sampler, latent_hw: int, steps: int, pairs: int, device) -> dict:
    """Ratios of one clip's denoising (``steps`` DDIM steps) between variants, interleaved pairs."""
    from core.sections import SamplerConfig
    from inference.guidance import guidance_switches, stack_conditions
    from models.reference_attention import boolean_masks

    ref, motion, mask, audio = _clip_inputs(sampler, latent_hw, device)
    opts = SamplerConfig(steps=steps)

    def clip(**kw):
        return lambda: sampler.denoise_clip(ref, motion, mask, audio, opts, torch.Generator().manual_seed(0), **kw)

    def before():
        with boolean_masks():
            clip()()

    with torch.no_grad():
        clip()()  # warm-up
        out = {}
        out["three"], out["batched_s"], out["three_s"] = _paired(clip(), clip(batched=False), pairs, device)
        out["recompute"], _, out["recompute_s"] = _paired(clip(), clip(cache_reference=False), pairs, device)
        out["before"], out["new_s"], out["before_s"] = _paired(clip(), before, pairs, device)
        # the parts: one reference computation (per clip) and one guided forward (per step)
        sw = guidance_switches(1, device)
        x3 = stack_conditions(torch.randn(1, sampler.clip_frames, 4, latent_hw, latent_hw).to(device))
        audio3 = stack_conditions(audio)
        t = torch.tensor(500)
        times_r, times_f = [], []
        for _ in range(pairs):
            t0 = _clock(device)
            reference = sampler.reference_for_guidance(ref, motion, mask)
            t1 = _clock(device)
            sampler.guidance_forward(x3, t, reference, audio3, sw)
            t2 = _clock(device)
            times_r.append(t1 - t0)
            times_f.append(t2 - t1)
        r, f = statistics.median(times_r), statistics.median(times_f)
        out["reference_s"], out["forward_s"] = r, f
        out["recompute_expected"] = (steps * f + steps * r) / (steps * f + r)
    return out


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
        r = _guidance_ratios(sampler, 8, RATIO_STEPS, 5, torch.device("cpu"))
        how = f"one 12-frame clip, {RATIO_STEPS} steps, median of 5 interleaved pairs, CPU seconds"
        rows.append(_row("tiny CPU batched guidance speed-up", r["three"], "x (3 calls / 1 call)",
                         "> 1", f"{how}: {r['batched_s']:.3f} s batched vs {r['three_s']:.3f} s as three forwards; "
                                f"on {CPU_THREADS} CPU thread(s) the arithmetic is the same, the gain (fewer "
                                f"launches, larger kernels) is a GPU one"))
        rows.append(_row("tiny CPU reference cache speed-up", r["recompute"], "x (per step / per clip)",
                         "> 1", f"{how}: reference net (1 + 20 motion latents) + reference K/V once per clip "
                                f"{r['batched_s']:.3f} s vs every step {r['recompute_s']:.3f} s; expected from "
                                f"the parts ({r['reference_s']:.3f} s per reference, {r['forward_s']:.3f} s per "
                                f"guided forward): {r['recompute_expected']:.2f}x"))
        rows.append(_row("tiny CPU no-mask attention speed-up", r["before"], "x (before / now)", ">= 1",
                         f"{how}: boolean SDPA masks on every row + reference K/V per frame and call (before "
                         f"issue 14) {r['before_s']:.3f} s vs now {r['new_s']:.3f} s (attention_mode auto: on CPU "
                         f"one masked call, as fast as split there, + reference K/V once per clip; on CUDA split "
                         f"unmasked groups, see gpu_rows)"))
    return rows


def run() -> list[dict]:
    before = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        return _tiny_rows()
    finally:
        torch.set_num_threads(before)
