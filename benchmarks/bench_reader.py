"""Training reader throughput against its limits (issue 3).

Measured in one process restricted to one CPU thread (torch and pyarrow), i.e. one CPU worker:

* ``samples/s``: :meth:`LoopySampleSource.load` over the epoch plan of a synthetic ingest output
  at 512 px sizes (latent 4x64x64 fp16, audio 12x768 fp16, random values so zstd cannot cheat).
* ``raw limit``: pyarrow ``read_row_groups`` of exactly the row groups and columns those samples
  read (same files, footers cached, no numpy conversion): the reader's I/O floor. Target: the
  reader reaches >= 0.5 of that rate.
* ``MB/s``: compressed Parquet bytes of the touched column chunks per second (and decompressed).
* ``seed approach``: decode the 136 frames (124 motion + 12 clip) of a 512x512 H.264 video with
  decord and VAE-encode them with the tiny VAE, per sample, as the seed loader did (measured on
  fewer frames and scaled linearly to 136; wav2vec per sample not even counted).
* ``peak RSS``: a fresh process reading the same number of samples from datasets of few and many
  videos: peak RSS must stay flat (no whole video is ever loaded).

``LOOPY_BENCH_QUICK=1`` uses fewer videos and samples (noted in each row).
"""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
QUICK = os.environ.get("LOOPY_BENCH_QUICK", "0") not in ("0", "", "false")
LATENT = (4, 64, 64)
AUDIO = (12, 768)


def _reader_cfg(**kw):
    from core.sections import ReaderConfig
    return ReaderConfig(**kw)


def _one_thread():
    import pyarrow as pa
    import torch
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    torch.set_num_threads(1)


def _measure_reader(data_dir: Path, num_samples: int) -> dict:
    from pipelines.dataset.schema import FrameStore
    from pipelines.reader.source import LoopySampleSource

    src = LoopySampleSource(data_dir, _reader_cfg(samples_per_video=64))
    specs = src.epoch_specs(0)[:num_samples]
    reads = []
    real = src.store.read

    def spy(video_id, indices, columns):
        reads.append((video_id, np.asarray(list(indices)), list(columns)))
        return real(video_id, indices, columns)

    src.store.read = spy
    src.load(specs[0])  # warm: footers cached as in a long-running worker
    reads.clear()
    t0 = time.perf_counter()
    for spec in specs:
        src.load(spec)
    reader_s = time.perf_counter() - t0

    # the same row groups and columns, read by pyarrow alone
    store = FrameStore(data_dir, max_open_files=10**6)
    plan, compressed, decompressed = [], 0, 0
    for video_id, idx, columns in reads:
        pf, _starts, stops = store._open(video_id)
        groups = sorted({int(np.searchsorted(stops, i, side="right")) for i in np.unique(idx)})
        cols = list(dict.fromkeys(["frame_index", *columns]))
        names = pf.schema_arrow.names
        for g in groups:
            rg = pf.metadata.row_group(g)
            for c in cols:
                cc = rg.column(names.index(c))
                compressed += cc.total_compressed_size
                decompressed += cc.total_uncompressed_size
        plan.append((pf, groups, cols))
    t0 = time.perf_counter()
    for pf, groups, cols in plan:
        pf.read_row_groups(groups, columns=cols)
    raw_s = time.perf_counter() - t0
    return dict(n=len(specs), reader_s=reader_s, raw_s=raw_s, compressed=compressed,
                decompressed=decompressed)


def _measure_seed(tmp: Path, frames: int) -> float:
    """Seconds per sample of decode + tiny-VAE encode of 136 frames at 512x512 (scaled from
    ``frames`` frames)."""
    import decord
    import torch
    from diffusers import AutoencoderKL

    from core.sections import WeightsConfig
    from core.weights import resolve_weights

    video = tmp / "seed.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=512x512:rate=25", "-t", "6", "-pix_fmt", "yuv420p",
                    "-c:v", "libx264", str(video)], check=True)
    paths = resolve_weights(WeightsConfig(preset="tiny", tiny_dir=str(tmp / "tiny")))
    vae = AutoencoderKL.from_pretrained(paths.vae, local_files_only=True).eval()
    t0 = time.perf_counter()
    vr = decord.VideoReader(str(video), num_threads=1)
    pix = torch.from_numpy(vr.get_batch(list(range(frames))).asnumpy())  # [F, H, W, 3] uint8
    x = pix.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        for chunk in x.split(4):
            vae.encode(chunk).latent_dist.mean * vae.config.scaling_factor
    return (time.perf_counter() - t0) * 136 / frames


def _vm_hwm_mib() -> float:
    """Peak RSS of this process image (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_child(data_dir: str, num_samples: int) -> None:
    """Run in a fresh process: prints peak RSS (MiB) after opening the source and after reading."""
    from pipelines.reader.source import LoopySampleSource

    _one_thread()
    src = LoopySampleSource(data_dir, _reader_cfg(samples_per_video=64))
    base = _vm_hwm_mib()
    for spec in src.epoch_specs(0)[:num_samples]:
        src.load(spec)
    print(f"{base:.1f} {_vm_hwm_mib():.1f}")


def _peak_rss(data_dir: Path, num_samples: int) -> tuple[float, float]:
    code = f"from benchmarks.bench_reader import _rss_child; _rss_child({str(data_dir)!r}, {num_samples})"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.split()
    return float(out[0]), float(out[1])


def run() -> list[dict]:
    from pipelines.samples.synthetic_ingest import write_synthetic_ingest

    n_videos, frames, n_samples = (3, 200, 24) if QUICK else (6, 300, 64)
    few, many = (2, 8) if QUICK else (2, 16)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_reader_", dir=ROOT / "work" if (ROOT / "work").is_dir() else None))
    try:
        main_dir = tmp / "main"
        write_synthetic_ingest(main_dir, [frames] * n_videos, latent_shape=LATENT, audio_shape=AUDIO,
                               num_rejected=0, content="random")
        _one_thread()
        m = _measure_reader(main_dir, n_samples)
        reader_sps, raw_sps = m["n"] / m["reader_s"], m["n"] / m["raw_s"]
        size = f"{n_videos} videos x {frames} frames, latent 4x64x64, audio 12x768, {m['n']} samples"
        rows += [
            dict(benchmark="reader", metric="samples/s per CPU worker", value=reader_sps, unit="samples/s",
                 target="", note=f"stage 2, uniform; {size}; 1 thread"),
            dict(benchmark="reader", metric="raw pyarrow limit", value=raw_sps, unit="samples/s",
                 target="", note="read_row_groups of the same row groups/columns, no numpy"),
            dict(benchmark="reader", metric="fraction of raw limit", value=reader_sps / raw_sps, unit="x",
                 target=">= 0.5", note="reader samples/s / raw samples/s"),
            dict(benchmark="reader", metric="read rate (compressed)", value=m["compressed"] / 1e6 / m["reader_s"],
                 unit="MB/s", target="", note=f"{m['compressed'] / 1e6 / m['n']:.2f} MB on disk per sample"),
            dict(benchmark="reader", metric="read rate (decompressed)", value=m["decompressed"] / 1e6 / m["reader_s"],
                 unit="MB/s", target="", note=f"{m['decompressed'] / 1e6 / m['n']:.2f} MB Arrow per sample"),
        ]
        seed_frames = 8 if QUICK else 17
        seed_s = _measure_seed(tmp, seed_frames)
        rows.append(dict(benchmark="reader", metric="speed-up vs seed approach", value=reader_sps * seed_s,
                         unit="x", target="> 1",
                         note=f"seed: decord decode + tiny-VAE encode of 136 512px frames = {seed_s:.2f} s/sample "
                              f"(timed on {seed_frames} frames, scaled)"))
        rss = {}
        for k in (few, many):
            d = tmp / f"rss{k}"
            write_synthetic_ingest(d, [frames] * k, latent_shape=LATENT, audio_shape=AUDIO,
                                   num_rejected=0, content="random")
            rss[k] = _peak_rss(d, n_samples)
            shutil.rmtree(d)
        for k in (few, many):
            rows.append(dict(benchmark="reader", metric=f"peak RSS, {k} videos", value=rss[k][1], unit="MiB",
                             target="flat", note=f"{rss[k][1] - rss[k][0]:.1f} MiB above the post-import "
                                                 f"baseline; {n_samples} samples, {frames} frames/video"))
        rows.append(dict(benchmark="reader", metric=f"peak RSS ratio {many}/{few} videos",
                         value=rss[many][1] / rss[few][1], unit="x", target="~1.0", note="flat in videos"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


if __name__ == "__main__":
    from benchmarks.run import print_table
    print_table(run())
