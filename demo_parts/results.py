"""What the demo's steps left on disk: checks that name the failing step, and the one-line
summaries the console shows."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from demo_parts.plan import VIDEO_SUFFIXES, DemoPaths
from demo_parts.runner import StepError

#: Metrics printed beside the video (keys of pipelines.metrics.video_metrics.score_video / the evaluation JSON).
SHOWN_METRICS = ("face_found_ratio", "sync", "sync_control", "identity", "identity_control", "identity_nearest",
                 "psnr", "ssim", "lmd")
#: The codec ceiling of the test split (the stored latents decoded by the VAE; docs/EVALUATION.md).
CODEC_METRICS = ("codec_face_found_ratio", "codec_identity", "codec_psnr")
VAE_KEY_FILE = "fitted_vae.key"  # in the ingest folder: the fit whose VAE encoded its latents


def format_metrics(metrics: dict, keys: Sequence[str] = SHOWN_METRICS) -> str:
    """``key value`` pairs of the ``keys`` present in ``metrics`` (3 decimals; psnr in dB)."""
    parts = []
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{key} {value:.2f} dB" if key.endswith("psnr") else f"{key} {value:.3f}")
    return ", ".join(parts) if parts else "no metrics"


def evaluation_means(path: Path) -> dict:
    """``{"mean": {...}}`` of the evaluation job's JSON (empty when it has none)."""
    try:
        return dict(json.loads(path.read_text()).get("mean") or {})
    except (OSError, ValueError) as exc:
        raise StepError("evaluate", f"cannot read the evaluation results {path}: {exc}") from exc


def check_ingest_output(ingested: Path) -> str:
    """After the ingest step: at least one video made it (else :class:`StepError` listing the
    reasons of the rejects from the manifest). Returns a one-line summary."""
    import pyarrow.parquet as pq

    manifest_path = ingested / "videos.parquet"
    if not manifest_path.is_file():
        raise StepError("ingest", f"no manifest {manifest_path}")
    rows = pq.read_table(manifest_path, columns=["source", "status", "reason", "num_frames"]).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    rejected = [r for r in rows if r["status"] != "ok"]
    if not ok:
        reasons = "\n    ".join(f"{r['source']}: {r['reason']}" for r in rejected[:10])
        raise StepError("ingest", f"no video was ingested ({len(rejected)} rejected):\n    {reasons}")
    frames = sum(r["num_frames"] or 0 for r in ok)
    return f"{len(ok)} videos ingested ({frames} frames at 25 fps), {len(rejected)} rejected"


def video_summary(path: Path) -> str:
    """``frames x WxH, seconds`` of a video file (ffprobe), for the final printout."""
    result = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries",
         "stream=nb_read_frames,width,height:format=duration", "-of", "default=nw=1", str(path)],
        capture_output=True, text=True)
    if result.returncode != 0:
        raise StepError("generate", f"{path} is not a readable video: {result.stderr.strip()}")
    info = dict(line.split("=", 1) for line in result.stdout.split() if "=" in line)
    return f"{info.get('nb_read_frames', '?')} frames, {info.get('width')}x{info.get('height')}, {float(info.get('duration', 0)):.2f} s"


def remove_stale_inputs(paths: DemoPaths) -> None:
    """Videos directly in ``paths.samples`` (the layout before the train / heldout folders) would
    be ingested beside the new ones: remove them (the samples step writes the set again)."""
    if paths.samples.is_dir():
        for p in paths.samples.iterdir():
            if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
                p.unlink()


def fitted_vae_key(paths: DemoPaths) -> str:
    """The cache key of the fitted VAE (``training.fit_vae``'s record), "" when there is none."""
    try:
        return str(json.loads((paths.fitted_vae / "fit_vae.json").read_text()).get("key", ""))
    except (OSError, ValueError):
        return ""


def drop_ingest_of_another_vae(paths: DemoPaths) -> bool:
    """Remove ``paths.ingested`` when its latents were not encoded by the VAE fitted now (another
    fit, or an ingest from before the fit: the ingest's resume would keep their latents).
    Returns whether it was removed."""
    if not paths.ingested.exists():
        return False
    marker = paths.ingested / VAE_KEY_FILE
    if marker.is_file() and marker.read_text() == fitted_vae_key(paths):
        return False
    shutil.rmtree(paths.ingested)
    return True


def vae_summary(folder: Path) -> str:
    """One line from ``training.fit_vae``'s record: held-out PSNR of the fitted and the unfitted codec."""
    try:
        record = json.loads((folder / "fit_vae.json").read_text())
    except (OSError, ValueError) as exc:
        raise StepError("fit_vae", f"no fit record in {folder}: {exc}") from exc
    return (f"VAE fitted to the training faces: PSNR {record['psnr_db']:.1f} dB on held-out frames "
            f"(unfitted {record.get('codec', 'kl')} codec {record['psnr_random_db']:.1f} dB; fitted in {record['seconds']:.0f} s)")


def short(path: Path) -> str:
    """``path`` relative to the current folder when it is below it (shorter console lines)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
