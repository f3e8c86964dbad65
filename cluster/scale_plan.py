"""The scale plan's arithmetic: measured per-frame costs -> workers, wall time, storage, training.

    python cluster/scale_plan.py [--bench work/bench_results.json] [--hours 160]

Reads the rows ``python -m benchmarks.run video audio ingest cluster`` wrote to
``work/bench_results.json`` (or ``--bench FILE``; measured on this machine: 2 shared CPU cores, no GPU) and prints the
tables of ``cluster/README.md``. Every number is either **measured** (a benchmark row, named), an
**assumption** (the constants below, each with its reason), or **computed** from those two.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# --- assumptions (not measured here) ---------------------------------------------------------------
FPS = 25.0
A100_BF16_PEAK_TFLOPS = 312.0  # NVIDIA A100 datasheet, dense bf16 tensor cores
A100_MFU = 0.35  # assumed model FLOPs utilisation of a diffusers U-Net / VAE step in bf16
CLUSTER_CPUS = 240 + 3 * 88  # cpu-decode pool (8 x 30) + the CPUs of the three GPU pods (3 x 88)
CHECKPOINT_RECOMPUTE = 1.0  # gradient checkpointing re-runs about one forward per step
STEPS_PER_STAGE = 100_000  # configs/sd15.yaml train.max_steps (the paper gives no step count)
GLOBAL_BATCH = 24  # the paper: batch 24 on 24 A100s

# --- per-frame storage (schema version 1, computed from the shapes) -------------------------------
FRAME_BYTES = {
    "latent fp16 [4, 64, 64]": 4 * 64 * 64 * 2,
    "audio fp16 [12, 768]": 12 * 768 * 2,
    "landmarks f32 [68, 2]": 68 * 2 * 4,
    "crop_box f32 [4], frame_index i32, time_s and source_time_s f64, face_found": 4 * 4 + 4 + 2 * 8 + 1,
}


def measure_ingested(out_dir: Path) -> dict:
    """Bytes on disk per frame of an ingest output, and per column compressed / uncompressed."""
    import pyarrow.parquet as pq

    frames, on_disk, columns = 0, 0, {}
    for path in sorted((out_dir / "frames").glob("*.parquet")):
        meta = pq.ParquetFile(path).metadata
        frames += meta.num_rows
        on_disk += path.stat().st_size
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                col = group.column(c)
                name = col.path_in_schema.split(".")[0]
                comp, raw = columns.get(name, (0, 0))
                columns[name] = (comp + col.total_compressed_size, raw + col.total_uncompressed_size)
    meta = json.loads((out_dir / "ingest_meta.json").read_text())
    return {"frames": frames, "bytes_per_frame": on_disk / max(1, frames), "columns": columns, "meta": meta}


def load_rows(path: Path) -> dict[tuple[str, str], dict]:
    rows = json.loads(path.read_text())
    if isinstance(rows, dict):
        rows = rows.get("rows", [])
    return {(r["benchmark"], r["metric"]): r for r in rows}


def value(rows, benchmark: str, metric: str) -> float | None:
    row = rows.get((benchmark, metric))
    try:
        return float(row["value"]) if row else None
    except (TypeError, ValueError):
        return None


def fmt_hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def plan(rows, hours: float, measured: dict | None = None) -> str:
    frames = hours * 3600 * FPS
    out = [f"Dataset: {hours:g} h x 3600 s x {FPS:g} fps = **{frames / 1e6:.1f} M frames** (computed).", ""]

    # CPU side: decode twice (detection pass at 480 px, full resolution for the crops) + dlib at 480 px
    out += ["### Ingest, CPU stages (per 25 fps frame of a 1080p source)", "",
            "| stage | cost per frame | source |", "| --- | --- | --- |"]
    cpu_s = 0.0
    measured_cpu = {
        "decode_full_1080p_crop512": "full-resolution decode + 25 fps resample + face crop -> 512 px",
        "decode_detect_pass_480": "detection-pass decode, frames scaled to 480 px",
        "dlib_1080p_at_480": "dlib face box at 480 px + 68 landmarks",
    }
    for key, what in measured_cpu.items():
        v = value(rows, "cluster", f"cpu_s_per_frame_{key}")
        if v is not None:
            cpu_s += v
            out.append(f"| {what} | {v * 1000:.1f} ms CPU | measured (CPU time): bench_cluster `cpu_s_per_frame_{key}` |")
    for stage in ("probe", "audio_decode", "crop_plan"):
        v = value(rows, "ingest_stage", f"{stage}_s_per_frame")
        if v is not None:
            cpu_s += v
            out.append(f"| {stage} | {v * 1000:.1f} ms wall | measured (wall, machine under load: an upper bound): "
                       f"bench_ingest `{stage}_s_per_frame`, 320 px samples |")
    out.append(f"| **total** | **{cpu_s * 1000:.0f} ms** | sum |")
    cpu_core_h = cpu_s * frames / 3600
    out += ["", f"CPU work: {cpu_s * 1000:.0f} ms x {frames / 1e6:.1f} M frames = **{cpu_core_h:,.0f} core-hours** "
            f"(computed; assumption: one core here = one cluster vCPU). On the cluster's {CLUSTER_CPUS} CPUs "
            f"(240 decode + 264 on the GPU pods): **{fmt_hours(cpu_s * frames / CLUSTER_CPUS)}**.", ""]

    # GPU side: VAE encode and wav2vec2, FLOP counts at sd15 size
    vae_tf = value(rows, "cluster", "vae_encode_512px_per_frame")
    w2v_tf = value(rows, "cluster", "wav2vec2_base_per_audio_second")
    eff = A100_BF16_PEAK_TFLOPS * A100_MFU
    vae_cpu_fps = value(rows, "vae_encode", "SD-1.5-sized AutoencoderKL, 512 px")
    out += ["### Ingest, GPU stages", "", "| stage | per frame | A100 time per frame | source |", "| --- | --- | --- | --- |"]
    gpu_s = 0.0
    if vae_tf:
        t = vae_tf / eff
        gpu_s += t
        out.append(f"| VAE encode, 512 px | {vae_tf * 1000:.0f} GFLOP | {t * 1000:.1f} ms | measured FLOP count "
                   f"(bench_cluster); time assumes {A100_MFU:.0%} of {A100_BF16_PEAK_TFLOPS:g} TFLOPS |")
    if w2v_tf:
        per_frame = w2v_tf / FPS
        t = per_frame / eff
        gpu_s += t
        out.append(f"| wav2vec2-base, every layer | {per_frame * 1000:.2f} GFLOP | {t * 1000:.3f} ms | measured FLOP count "
                   f"(bench_cluster), same assumption |")
    if vae_cpu_fps:
        out.append(f"| (for scale: the same VAE on this 2-core CPU) | | ({1000 / vae_cpu_fps:.0f} ms on the CPU) | measured: "
                   f"bench_audio `SD-1.5-sized AutoencoderKL, 512 px` |")
    gpu_h = gpu_s * frames / 3600
    out += ["", f"GPU work: **{gpu_h:,.0f} A100-hours** (computed from the assumption); on 24 A100s: "
            f"**{fmt_hours(gpu_s * frames / 24)}**.", ""]
    if cpu_s and gpu_s:
        ratio = cpu_s / gpu_s
        cpu_wall, gpu_wall = cpu_s * frames / CLUSTER_CPUS, gpu_s * frames / 24
        bound = "CPU" if cpu_wall > gpu_wall else "GPU"
        out.append(f"Balance: one A100 encoding at that rate is fed by **{ratio:.0f} CPUs** of decode + detection "
                   f"(computed); 24 A100s busy need {24 * ratio:,.0f} CPUs. The stages stream (Ray Data), so the "
                   f"ingest takes about the longer of the two: **{fmt_hours(max(cpu_wall, gpu_wall))}** on 24 A100s + "
                   f"{CLUSTER_CPUS} CPUs ({bound}-bound), plus the driver writing "
                   f"{sum(FRAME_BYTES.values()) * frames / 1e12:.2f} TB to the shared volume "
                   f"({sum(FRAME_BYTES.values()) * frames / 300e6 / 3600:.1f} h at an assumed 300 MB/s; it overlaps).")
        out.append("")

    # storage
    per_frame_b = sum(FRAME_BYTES.values())
    out += ["### Storage of the Parquet output (computed from the schema's shapes)", "",
            "| column | bytes per frame |", "| --- | --- |"]
    out += [f"| {k} | {v:,} |" for k, v in FRAME_BYTES.items()]
    out += [f"| **total** | **{per_frame_b:,}** ({per_frame_b / 1024:.1f} KiB) |", "",
            f"{frames / 1e6:.1f} M frames x {per_frame_b / 1024:.1f} KiB = **{per_frame_b * frames / 1e12:.2f} TB** "
            f"({per_frame_b * frames / 2**40:.2f} TiB) before compression.", ""]
    if measured:
        cols = measured["columns"]
        ratios = {k: c / r for k, (c, r) in cols.items() if r}
        meta = measured["meta"]
        out += [f"Measured on the demo's ingest output ({measured['frames']} frames, tiny preset: latent "
                f"{meta['latent_shape']}, audio {meta['audio_shape']}): {measured['bytes_per_frame']:,.0f} bytes "
                f"per frame on disk; zstd keeps " + ", ".join(f"{k} {ratios[k]:.0%}" for k in ("latent", "audio", "landmarks")
                                                               if k in ratios)
                + " of the raw bytes (fp16 features barely compress)."]
        big = FRAME_BYTES["latent fp16 [4, 64, 64]"] * ratios.get("latent", 1) + \
            FRAME_BYTES["audio fp16 [12, 768]"] * ratios.get("audio", 1)
        rest = sum(FRAME_BYTES.values()) - FRAME_BYTES["latent fp16 [4, 64, 64]"] - FRAME_BYTES["audio fp16 [12, 768]"]
        est = big + rest
        out += [f"Applying those ratios to the 512 px shapes (assumption: real latents and wav2vec2 features "
                f"compress like the tiny ones): **{est / 1024:.1f} KiB per frame, {est * frames / 1e12:.2f} TB** for "
                f"{hours:g} h. With `ingest.write_jpeg` the 512 px JPEGs add roughly 30-60 KB per frame "
                f"(assumption, quality-dependent): another {30e3 * frames / 1e12:.1f}-{60e3 * frames / 1e12:.1f} TB.", ""]

    # training
    s1 = value(rows, "cluster", "loopy_stage1_train_sample_fwd_bwd")
    s2 = value(rows, "cluster", "loopy_stage2_train_sample_fwd_bwd")
    f1 = value(rows, "cluster", "loopy_stage1_forward")
    f2 = value(rows, "cluster", "loopy_stage2_forward")
    if s1 and s2 and f1 and f2:
        out += ["### Training", "", "| stage | TFLOP per sample (fwd + bwd + recompute) | A100 step time, batch 1 | "
                f"{STEPS_PER_STAGE // 1000}k steps on 24 A100s |", "| --- | --- | --- | --- |"]
        for stage, total, fwd in ((1, s1, f1), (2, s2, f2)):
            per = total + CHECKPOINT_RECOMPUTE * fwd
            t = per / eff
            out.append(f"| {stage} | {per:.1f} | {t:.2f} s | {fmt_hours(t * STEPS_PER_STAGE)} |")
        t2 = (s2 + f2) / eff
        out += ["", "Step times are compute only at the assumed utilisation; stage 1's tiny compute per step means "
                "it will be bound by input and DDP overhead instead (not modelled).", "",
                f"Throughput the schedule needs: stage 2 consumes **{GLOBAL_BATCH / t2:.0f} clips/s** across the cluster "
                f"({GLOBAL_BATCH} per step, one step per {t2:.2f} s) = {GLOBAL_BATCH * 12 / t2:.0f} target frames/s."]
        reader = value(rows, "reader", "samples/s per CPU worker")
        read_mb = value(rows, "reader", "read rate (compressed)")
        if reader:
            out.append(f"The reader measured **{reader:.1f} samples/s per CPU worker** (bench_reader, 512 px shapes), so "
                       f"{GLOBAL_BATCH / t2 / reader:.1f} CPU workers keep stage 2 fed (computed); each GPU pod has 88 CPUs.")
            if read_mb:
                out.append(f"At the measured {read_mb:.0f} MB/s per worker for {reader:.1f} samples/s, the cluster reads "
                           f"{read_mb / reader * GLOBAL_BATCH / t2:.0f} MB/s from the shared volume (computed).")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", type=Path, default=ROOT / "work" / "bench_results.json")
    parser.add_argument("--hours", type=float, default=160.0)
    parser.add_argument("--ingested", type=Path, default=None, help="an ingest output to measure bytes per frame on")
    args = parser.parse_args(argv)
    if not args.bench.is_file():
        print(f"{args.bench}: not found; run `python -m benchmarks.run video audio ingest cluster` first", file=sys.stderr)
        return 2
    measured = measure_ingested(args.ingested) if args.ingested else None
    print(plan(load_rows(args.bench), args.hours, measured))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
