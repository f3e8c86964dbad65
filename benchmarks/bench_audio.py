"""Audio features and VAE latents: speed and memory (rows for benchmarks/run.py).

wav2vec2: a base-sized model (12 layers x 768, ``Wav2Vec2Config()`` defaults, random weights: the
cost is the same as the real one) written with ``save_pretrained`` to a temp folder and loaded by
``AudioFeatureExtractor`` exactly as in ingest. Each audio length runs in a fresh spawned process
so its peak RSS is its own: the peak *above* the loaded model and the output array shows that the
windows keep memory flat in the audio length. Beside it, the seed's per-frame method (one model
call per 640-sample snippet, hidden states averaged over time) with the same model.

Default run: 60 s and 3 min of audio, the per-frame method on 4 s. ``LOOPY_BENCH_FULL=1`` adds
10 min of audio and a whole-utterance (no windows) run of 60 s for the memory comparison.
``LOOPY_BENCH_QUICK=1``: 20 s and 60 s only, per-frame method on 2 s, no 512 px VAE.
All on this machine's CPU with ``torch.get_num_threads()`` threads; the note says the load average
(other jobs share the 2 cores).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time

import numpy as np

SR = 16000
FPS = 25.0


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _extract_child(location: str, seconds: float, window_s: float, queue) -> None:
    """In a fresh process: load the extractor, run ``seconds`` of noise, report time and memory."""
    import torch

    from pipelines.audio_features import AudioFeatureExtractor, frame_count_for

    ex = AudioFeatureExtractor(location, window_s=window_s)
    rng = np.random.default_rng(0)
    samples = (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32)
    n = frame_count_for(seconds, FPS)
    ex(samples[: SR * 2], frame_count_for(2.0, FPS))  # warm-up (allocator, oneDNN kernels)
    _reset_peak_rss()
    base_kb = _proc_status_kb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    out = ex(samples, n, FPS)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_kb = _proc_status_kb("VmHWM")
    queue.put(dict(seconds=seconds, wall_s=dt, cpu_s=cpu, base_mb=base_kb / 1024, peak_mb=peak_kb / 1024,
                   out_mb=out.nbytes / 2**20, threads=torch.get_num_threads(), shape=out.shape))


def _run_child(location: str, seconds: float, window_s: float = 20.0) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_extract_child, args=(location, seconds, window_s, q))
    p.start()
    res = q.get(timeout=900)
    p.join()
    return res


def _per_frame_seed_method(model, seconds: float) -> float:
    """The seed's method: one call per 640-sample snippet, each normalised alone, mean over time.
    Returns seconds of compute per second of audio."""
    import torch

    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32)
    hop = int(SR / FPS)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x) - hop + 1, hop):
            snip = x[i:i + hop]
            snip = (snip - snip.mean()) / np.sqrt(snip.var() + 1e-7)
            hs = model(torch.from_numpy(snip)[None], output_hidden_states=True).hidden_states
            torch.stack(hs[1:], dim=0).mean(dim=2)
    return (time.perf_counter() - t0) / seconds


def _vae_rows(quick: bool, full: bool) -> list[dict]:
    import torch
    from diffusers import AutoencoderKL

    from core.sections import WeightsConfig
    from core.weights import resolve_weights
    from pipelines.latents import LatentCodec

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = resolve_weights(WeightsConfig(preset="tiny", tiny_dir=tmp))
        codec = LatentCodec(paths.vae)
        frames = np.random.default_rng(0).integers(0, 256, size=(64, 64, 64, 3), dtype=np.uint8)
        codec.encode(frames[:16])
        t0 = time.perf_counter()
        codec.encode(frames, batch_size=16)
        dt = time.perf_counter() - t0
        rows.append(dict(benchmark="vae_encode", metric="tiny preset, 64 px", value=64 / dt, unit="frames/s",
                         target="", note="64 frames, batch 16, CPU fp32"))
        if quick:
            return rows
        n = 2 if full else 1
        torch.manual_seed(0)
        sd_vae = AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
            norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
        sd_dir = os.path.join(tmp, "sd_vae")
        sd_vae.save_pretrained(sd_dir)
        del sd_vae
        codec = LatentCodec(sd_dir)
        frames = np.random.default_rng(0).integers(0, 256, size=(n, 512, 512, 3), dtype=np.uint8)
        t0 = time.perf_counter()
        z = codec.encode(frames, batch_size=1)
        dt = time.perf_counter() - t0
        rows.append(dict(benchmark="vae_encode", metric="SD-1.5-sized AutoencoderKL, 512 px",
                         value=dt / n, unit="s/frame", target="",
                         note=f"{n} frame(s), batch 1, CPU fp32, random weights; latent {tuple(z.shape[1:])}"))
    return rows


def run() -> list[dict]:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    quick, full = _flag("LOOPY_BENCH_QUICK"), _flag("LOOPY_BENCH_FULL")
    lengths = [20.0, 60.0] if quick else [60.0, 180.0] + ([600.0] if full else [])
    seed_seconds = 2.0 if quick else 4.0
    rows: list[dict] = []
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = Wav2Vec2Model(Wav2Vec2Config()).eval()
        model.save_pretrained(tmp)
        Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True,
                                 return_attention_mask=False).save_pretrained(tmp)
        results = [_run_child(tmp, s) for s in lengths]
        for r in results:
            rows.append(dict(
                benchmark="wav2vec2_base_features", metric=f"{r['seconds']:g} s audio: speed",
                value=r["seconds"] / r["wall_s"], unit="x real time", target=">= 8",
                note=f"windows 20 s / 2 s context, {r['threads']} threads, output {r['shape']}, "
                     f"load avg {load:.1f} on {os.cpu_count()} cores"))
            rows.append(dict(
                benchmark="wav2vec2_base_features", metric=f"{r['seconds']:g} s audio: peak RSS above model+output",
                value=r["peak_mb"] - r["base_mb"] - r["out_mb"], unit="MB", target="flat in length",
                note=f"RSS after load {r['base_mb']:.0f} MB, output {r['out_mb']:.0f} MB (float32)"))
        if full:
            r = _run_child(tmp, 60.0, window_s=10_000.0)
            rows.append(dict(
                benchmark="wav2vec2_base_features", metric="60 s audio, no windows: peak RSS above model+output",
                value=r["peak_mb"] - r["base_mb"] - r["out_mb"], unit="MB", target="(reference)",
                note=f"whole-utterance attention; speed {r['seconds'] / r['wall_s']:.2f}x real time"))
        per_frame = _per_frame_seed_method(model, seed_seconds)
        rows.append(dict(
            benchmark="wav2vec2_base_features", metric="seed per-frame method: speed",
            value=1.0 / per_frame, unit="x real time", target="(reference)",
            note=f"one call per 640-sample snippet, {seed_seconds:g} s audio, same model; "
                 "loses context and every layer but the averaged one"))
        del model
    rows.extend(_vae_rows(quick, full))
    return rows


if __name__ == "__main__":
    from benchmarks.run import print_table

    print_table(run())
