"""Audio features and VAE latents: speed and memory (rows for benchmarks/run.py).

wav2vec2: a base-sized model (12 layers x 768, ``Wav2Vec2Config()`` defaults, random weights: the
cost is the same as the real one) written with ``save_pretrained`` to a temp folder and loaded by
``AudioFeatureExtractor`` exactly as in ingest. Each measurement runs in a fresh spawned process
so its peak RSS is its own; the peak *above* the loaded model and the output array shows that the
windows keep memory flat in the audio length.

How speed is measured: this machine's 2 cores are shared with other jobs, so wall-clock time says
more about the load than about the code. Each process runs with ONE torch thread and its CPU time
is measured: "per core" = seconds of audio per CPU-second; "2 cores" = twice that, i.e. two
single-threaded workers (how Ray Data runs the feature actors); the wall-clock rate under the
current load is in the note. Beside it, the seed's per-frame method (one model call per
640-sample snippet, hidden states averaged) with the same model, measured the same way.

Default: 60 s and 3 min of audio (fp32), 60 s in bfloat16, per-frame method on 2 s, VAE tiny and one
512 px frame of an SD-sized VAE. ``LOOPY_BENCH_FULL=1`` adds 10 min of audio and a whole-utterance
(no windows) run of 60 s for the memory comparison. ``LOOPY_BENCH_QUICK=1``: 20 s and 60 s fp32
only, per-frame method on 1 s, no 512 px VAE.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
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


def _child_setup() -> None:
    """One torch thread; large blocks mmap-ed (glibc ``mallopt``) so freed activations go back to
    the OS at once and the peak RSS measures live memory, not allocator caching."""
    import ctypes

    import torch

    torch.set_num_threads(1)
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass


def _extract_child(location: str, seconds: float, window_s: float, dtype_name: str, queue) -> None:
    """In a fresh process: load the extractor, run ``seconds`` of noise, report time and memory."""
    _child_setup()
    import torch

    from pipelines.encoders.audio_features import AudioFeatureExtractor, frame_count_for

    ex = AudioFeatureExtractor(location, window_s=window_s, dtype=getattr(torch, dtype_name))
    rng = np.random.default_rng(0)
    samples = (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32)
    n = frame_count_for(seconds, FPS)
    ex(samples[: SR * 2], frame_count_for(2.0, FPS))  # warm-up (oneDNN kernels)
    _reset_peak_rss()
    base_kb = _proc_status_kb("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    out = ex(samples, n, FPS)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_kb = _proc_status_kb("VmHWM")
    queue.put(dict(seconds=seconds, wall_s=wall, cpu_s=cpu, base_mb=base_kb / 1024, peak_mb=peak_kb / 1024,
                   out_mb=out.nbytes / 2**20, shape=tuple(out.shape)))


def _per_frame_child(location: str, seconds: float, queue) -> None:
    """The seed's method: one call per 640-sample snippet, each normalised alone, mean over time."""
    _child_setup()
    import torch
    from transformers import Wav2Vec2Model

    model = Wav2Vec2Model.from_pretrained(location).eval()
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(int(seconds * SR))).astype(np.float32)
    hop = int(SR / FPS)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for i in range(0, len(x) - hop + 1, hop):
            snip = x[i:i + hop]
            snip = (snip - snip.mean()) / np.sqrt(snip.var() + 1e-7)
            hs = model(torch.from_numpy(snip)[None], output_hidden_states=True).hidden_states
            torch.stack(hs[1:], dim=0).mean(dim=2)
    queue.put(dict(seconds=seconds, wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0))


def _in_child(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    while True:
        try:
            res = q.get(timeout=5)
            break
        except queue_mod.Empty:
            if not p.is_alive():
                raise RuntimeError(f"benchmark child {target.__name__}{args[1:]} died (exit code {p.exitcode})") from None
    p.join()
    return res


def _speed_rows(r: dict, label: str, load: float) -> list[dict]:
    per_core = r["seconds"] / r["cpu_s"]
    return [
        dict(benchmark="wav2vec2_base_features", metric=f"{label}: speed, 2 cores", value=2 * per_core,
             unit="x real time", target=">= 8",
             note=f"2 x one-thread CPU-time rate ({per_core:.2f}x per core); wall-clock "
                  f"{r['seconds'] / r['wall_s']:.2f}x under load avg {load:.1f}; output {r.get('shape', '')}"),
    ]


def _vae_rows(quick: bool, full: bool) -> list[dict]:
    import torch
    from diffusers import AutoencoderKL

    from core.sections import WeightsConfig
    from core.weights import resolve_weights
    from pipelines.encoders.latents import LatentCodec

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = resolve_weights(WeightsConfig(preset="tiny", tiny_dir=tmp))
        codec = LatentCodec(paths.vae)
        frames = np.random.default_rng(0).integers(0, 256, size=(64, 64, 64, 3), dtype=np.uint8)
        codec.encode(frames[:16])
        t0, c0 = time.perf_counter(), time.process_time()
        codec.encode(frames, batch_size=16)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append(dict(benchmark="vae_encode", metric="tiny preset, 64 px", value=64 / wall, unit="frames/s",
                         target="", note=f"64 frames, batch 16, CPU fp32, {torch.get_num_threads()} threads "
                                         f"(wall clock; {cpu / 64 * 1000:.1f} CPU-ms/frame)"))
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
        t0, c0 = time.perf_counter(), time.process_time()
        z = codec.encode(frames, batch_size=1)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append(dict(benchmark="vae_encode", metric="SD-1.5-sized AutoencoderKL, 512 px",
                         value=cpu / n, unit="CPU-s/frame", target="",
                         note=f"{n} frame(s), batch 1, fp32, random weights, latent {tuple(z.shape[1:])}; "
                              f"wall {wall / n:.1f} s/frame with {torch.get_num_threads()} threads under load"))
    return rows


def run() -> list[dict]:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    quick, full = _flag("LOOPY_BENCH_QUICK"), _flag("LOOPY_BENCH_FULL")
    lengths = [20.0, 60.0] if quick else [60.0, 180.0] + ([600.0] if full else [])
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        Wav2Vec2Model(Wav2Vec2Config()).save_pretrained(tmp)
        Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True,
                                 return_attention_mask=False).save_pretrained(tmp)
        for s in lengths:
            r = _in_child(_extract_child, tmp, s, 20.0, "float32")
            rows += _speed_rows(r, f"{s:g} s audio fp32", os.getloadavg()[0])
            rows.append(dict(
                benchmark="wav2vec2_base_features", metric=f"{s:g} s audio: peak RSS above model+output",
                value=r["peak_mb"] - r["base_mb"] - r["out_mb"], unit="MB", target="flat in length",
                note=f"windows 20 s / 2 s context; RSS after load {r['base_mb']:.0f} MB, "
                     f"output {r['out_mb']:.0f} MB float32"))
        if not quick:
            r = _in_child(_extract_child, tmp, 60.0, 20.0, "bfloat16")
            rows += _speed_rows(r, "60 s audio bf16", os.getloadavg()[0])
        if full:
            r = _in_child(_extract_child, tmp, 60.0, 10_000.0, "float32")
            rows.append(dict(
                benchmark="wav2vec2_base_features", metric="60 s audio, no windows: peak RSS above model+output",
                value=r["peak_mb"] - r["base_mb"] - r["out_mb"], unit="MB", target="(reference)",
                note=f"whole-utterance attention; {2 * r['seconds'] / r['cpu_s']:.2f}x real time on 2 cores"))
        seed_s = 1.0 if quick else 2.0
        r = _in_child(_per_frame_child, tmp, seed_s)
        rows.append(dict(
            benchmark="wav2vec2_base_features", metric="seed per-frame method: speed, 2 cores",
            value=2 * r["seconds"] / r["cpu_s"], unit="x real time", target="(reference)",
            note=f"one call per 640-sample snippet on {seed_s:g} s, same model, same measure; "
                 "also loses context and all layers"))
    rows.extend(_vae_rows(quick, full))
    return rows


if __name__ == "__main__":
    from benchmarks.run import print_table

    print_table(run())
