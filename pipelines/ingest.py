#!/usr/bin/env python
"""The ingest job: raw talking-head videos -> training-ready Parquet, on Ray Data.

    python pipelines/ingest.py --input PATH --output DIR [--config FILE] [section.key=value ...]

``PATH`` is a video file, a folder (recursive *.mp4/*.mov/*.mkv/*.avi/*.webm) or a ``.txt`` list
of paths. With no ``--config`` the embedded default runs (tiny preset, local Ray on 127.0.0.1);
under ``ray job submit -- python pipelines/ingest.py ...`` it joins the cluster (RAY_ADDRESS).

Pipeline (Ray Data, streaming; each video is its own input block):

1. driver: expand the input, stable ``video_id`` (hash of path + size + mtime), deterministic
   split (``ingest.split_key``: ``video`` or ``folder``), skip videos finished by an earlier run;
2. ``map(VideoAnalyzer)`` actor pool (``ingest.num_detect_actors``): probe, low-resolution
   detection pass, crop track, 16 kHz audio checked against the video, quality filters;
3. ``map_batches(AudioFeatureStage)`` actor pool (``ingest.num_audio_actors``): wav2vec2
   features of every layer, one vector per 25 fps frame;
4. ``flat_map(decode_and_crop)`` CPU tasks: full-resolution streaming decode in
   ``ingest.chunk_frames`` chunks, face-centred crops -> one row per chunk;
5. ``map_batches(VaeStage)`` actor pool (``ingest.num_vae_actors``, GPUs when ``ingest.use_gpu``):
   VAE latents (fp16), crop pixels dropped;
6. driver: consumes the small per-chunk rows (``iter_rows``) and appends them in frame order to
   ``frames/<video_id>.parquet`` (``FrameFileWriter``: tmp file renamed when complete; chunks
   that arrive early wait in a small buffer), then records the video. At the end
   ``videos.parquet`` (one row per input file) and ``ingest_meta.json``.

Only the driver writes into ``DIR``: workers need no shared filesystem. Any failure of a video in
any stage becomes that video's rejected manifest row (stage + reason naming the file); the job
finishes the rest and exits 0. A wrong ``--input`` or an unwritable ``--output`` is a one-line
error and exit status 2 before Ray starts.
"""
from __future__ import annotations

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:  # run as a file: make the project importable
    sys.path.insert(0, str(_ROOT))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from core.config import ConfigError, PlatformConfig, add_config_arguments, load_platform_config  # noqa: E402
from pipelines.ingest_stages import STAGE_TIMES_KEY  # noqa: E402
from pipelines.manifest import (IngestInputError, InputVideo, RecordStore, clean_partial_files,  # noqa: E402
                                manifest_row, plan_inputs, write_manifest)
from pipelines.schema import (FRAMES_DIR, META_NAME, SCHEMA_VERSION, FrameFileWriter, IngestFormatError,  # noqa: E402
                              IngestMeta, frame_schema, frames_path)
from pipelines.ingest_stages import AudioFeatureStage, VaeStage, VideoAnalyzer, decode_and_crop
from core.weights import resolve_weights
from core.ray_runtime import init_ray
from pipelines.errors import PipelineError

log = logging.getLogger("loopy.ingest")


class IngestOutputError(PipelineError, OSError):
    """``--output`` cannot be created or written."""


@dataclass
class IngestSummary:
    """What one run did. Times in seconds; ``stage_seconds`` sums each stage over the videos
    processed in this run (``frames_processed`` frames), for per-frame costs."""

    output_dir: str
    inputs: int = 0
    ok: int = 0
    rejected: int = 0
    skipped: int = 0  # finished by an earlier run (resume)
    processed: int = 0  # videos sent through the pipeline in this run
    frames_written: int = 0
    frames_processed: int = 0  # frames of the videos ingested in this run
    wall_s: float = 0.0
    stage_seconds: dict = field(default_factory=dict)
    rejections: dict = field(default_factory=dict)  # source -> reason (this run and earlier)


def check_output_dir(out_dir: str | Path, cfg: Optional[PlatformConfig] = None) -> Path:
    """Create ``out_dir`` and prove it is writable; with ``cfg``, also check that an earlier
    ingest there used the same frame rate, crop size and weights preset (a resumed directory must
    hold one format). Raises :class:`IngestOutputError` (one line)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / FRAMES_DIR).mkdir(exist_ok=True)
        probe = out / f".write_test_{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise IngestOutputError(f"--output {out_dir}: not writable ({exc.strerror or exc})") from None
    if cfg is not None and (out / META_NAME).is_file():
        try:
            old = IngestMeta.read(out)
        except (IngestFormatError, TypeError, ValueError) as exc:
            raise IngestOutputError(f"--output {out_dir}: holds an unreadable {META_NAME} ({exc}); use a new "
                              f"output directory") from None
        now = (cfg.ingest.fps, cfg.ingest.crop_size, cfg.weights.preset)
        was = (old.fps, old.crop_size, old.weights.get("preset"))
        if now != was:
            raise IngestOutputError(f"--output {out_dir}: holds an ingest with fps/crop_size/preset {was}, this "
                              f"run has {now}; use a new output directory")
    return out


def _fixed_list(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(values).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), width)


def chunk_table(row: dict, schema: pa.Schema) -> pa.Table:
    """A ``chunk`` row (numpy arrays of n frames) -> the frame table rows (FRAME_SCHEMA)."""
    n = int(row["num_frames"])
    start = int(row["start_index"])
    cols = {
        "video_id": pa.array([row["video_id"]] * n, pa.string()),
        "frame_index": pa.array(np.arange(start, start + n, dtype=np.int32)),
        "time_s": pa.array(np.asarray(row["time_s"], np.float64)),
        "source_time_s": pa.array(np.asarray(row["source_time_s"], np.float64)),
        "latent": _fixed_list(np.asarray(row["latent"], np.float16), int(np.prod(row["latent"].shape[1:]))),
        "audio": _fixed_list(np.asarray(row["features"], np.float16), int(np.prod(row["features"].shape[1:]))),
        "landmarks": _fixed_list(np.asarray(row["landmarks"], np.float32), 136),
        "crop_box": _fixed_list(np.asarray(row["boxes"], np.float32), 4),
        "face_found": pa.array(np.asarray(row["found"], bool)),
    }
    if "jpeg" in schema.names:
        sizes = np.asarray(row["jpeg_sizes"], np.int64)
        blob = np.asarray(row["jpeg"], np.uint8).tobytes()
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        cols["jpeg"] = pa.array([blob[offsets[i]:offsets[i + 1]] for i in range(n)], pa.binary())
    return pa.table(cols).select(schema.names).cast(schema)


class _VideoAssembly:
    """Chunks of one video arriving from the stream, appended to its frame file in order."""

    def __init__(self, out_dir: Path, video_id: str, schema: pa.Schema):
        self.writer = FrameFileWriter(out_dir, video_id, schema)
        self.schema = schema
        self.next_chunk = 0
        self.pending: dict[int, dict] = {}  # chunks that arrived before their predecessors
        self.end: Optional[dict] = None

    def add(self, row: dict) -> None:
        self.pending[int(row["chunk_index"])] = row
        while self.next_chunk in self.pending:
            self.writer.write(chunk_table(self.pending.pop(self.next_chunk), self.schema))
            self.next_chunk += 1

    @property
    def complete(self) -> bool:
        return self.end is not None and self.next_chunk == int(self.end["num_chunks"])


def _info_fields(info: dict) -> dict:
    keys = ("fps_in", "duration_s", "width", "height", "rotation", "audio_offset_s")
    return {k: info[k] for k in keys if k in info and info[k] is not None}


def build_dataset(rows: list[dict], cfg: PlatformConfig, vae: str, wav2vec2: str,
                  local_files_only: bool, dwpose_dir: Optional[str]):
    """The Ray Data pipeline over ``rows`` = [{video_id, path}] (one block per video)."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy


    ing = cfg.ingest
    device = "cuda" if ing.use_gpu else "cpu"
    # Ray Data retries actor tasks forever by default: a file that crashes its worker (a decoder
    # segfault) would loop; after max_task_retries the block fails and max_errored_blocks skips it.
    # Ray 2.60 has no named parameter for these retry limits, only the (deprecated) remote args.
    actor_args = {"max_task_retries": ing.max_task_retries, "max_restarts": -1}
    gpus = {"num_gpus": ing.model_num_gpus} if ing.use_gpu else {}

    def pool(size: int) -> ActorPoolStrategy:
        return ActorPoolStrategy(min_size=1, max_size=max(1, size))

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
        ds = ds.map(VideoAnalyzer, fn_constructor_kwargs={"cfg": ing, "dwpose_dir": dwpose_dir},
                    compute=pool(ing.num_detect_actors), num_cpus=ing.stage_num_cpus, **actor_args)
        ds = ds.map_batches(AudioFeatureStage, batch_size=1,
                            fn_constructor_kwargs={"location": wav2vec2, "local_files_only": local_files_only,
                                                   "device": device, "fps": ing.fps},
                            compute=pool(ing.num_audio_actors), num_cpus=ing.stage_num_cpus, **gpus,
                            **actor_args)
        ds = ds.flat_map(decode_and_crop, fn_kwargs={"cfg": ing}, num_cpus=ing.stage_num_cpus,
                         compute=TaskPoolStrategy(size=ing.num_decode_workers),
                         max_retries=ing.max_task_retries)
        ds = ds.map_batches(VaeStage, batch_size=1,
                            fn_constructor_kwargs={"location": vae, "local_files_only": local_files_only,
                                                   "device": device, "batch_size": ing.model_batch_size,
                                                   "write_jpeg": ing.write_jpeg},
                            compute=pool(ing.num_vae_actors), num_cpus=ing.stage_num_cpus, **gpus,
                            **actor_args)
    return ds


@contextlib.contextmanager
def _ray_data_settings(num_videos: int):
    """Ray Data settings of this job, restored afterwards (other jobs in the process keep theirs)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # a worker that dies on one video (e.g. a decoder crash) loses only that video's block: the
    # video ends as a rejected row ("pipeline: ...") and the rest continues
    wanted = {"enable_progress_bars": False, "print_on_execution_start": False,
              "max_errored_blocks": max(1, num_videos)}
    saved = {k: getattr(ctx, k) for k in wanted if hasattr(ctx, k)}
    for k in saved:
        setattr(ctx, k, wanted[k])
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)
        logger.setLevel(level)


def _vae_scaling_factor(vae: str, local_files_only: bool) -> float:
    local = Path(vae) / "config.json"
    if local.is_file():  # no diffusers/torch import in the driver for local folders
        return float(json.loads(local.read_text()).get("scaling_factor", 0.18215))
    try:
        from diffusers import AutoencoderKL

        loc = Path(vae)
        if loc.exists():
            conf = AutoencoderKL.load_config(str(loc))
        else:
            parts = vae.split("/")
            conf = AutoencoderKL.load_config("/".join(parts[:2]), subfolder="/".join(parts[2:]) or None,
                                             local_files_only=local_files_only)
        return float(conf.get("scaling_factor", 0.18215))
    except Exception:  # noqa: BLE001 - recorded as the SD default
        return 0.18215


def run_ingest(input_path: str | Path, output_dir: str | Path, cfg: Optional[PlatformConfig] = None,
               echo: Callable[[str], None] = print) -> IngestSummary:
    """Run the whole job (see the module docstring). Joins a running Ray (``init_ray``).

    Raises :class:`IngestInputError` / :class:`IngestOutputError` before any work for a bad ``--input`` /
    ``--output``; every per-video failure is recorded instead of raised.
    """

    cfg = cfg or PlatformConfig()
    ing = cfg.ingest
    t_start = time.perf_counter()
    videos = plan_inputs(input_path, ing.test_fraction, ing.split_key)
    out = check_output_dir(output_dir, cfg)
    summary = IngestSummary(output_dir=str(out), inputs=len(videos))

    store = RecordStore(out)
    clean_partial_files(out)
    previous = store.load()
    current_ids = {v.video_id for v in videos}
    current_sources = {v.source for v in videos}
    # a file that changed since an earlier run has a new id: its old record and frames go
    for rec in list(previous.values()):
        if rec["source"] in current_sources and rec["video_id"] not in current_ids:
            frames_path(out, rec["video_id"]).unlink(missing_ok=True)
            (store.dir / f"{rec['video_id']}.json").unlink(missing_ok=True)
            del previous[rec["video_id"]]

    records: dict[str, dict] = {}
    todo: list[InputVideo] = []
    for v in videos:
        rec = previous.get(v.video_id)
        if store.is_finished(rec, ing.retry_rejected):
            rec.update(source=v.source, split=v.split)
            records[v.video_id] = rec
            summary.skipped += 1
        elif not v.path.is_file():
            rec = manifest_row(v, status="rejected", stage="input", reason=f"input: {v.path}: file not found",
                               num_frames=0)
            store.write(rec)
            records[v.video_id] = rec
        else:
            frames_path(out, v.video_id).unlink(missing_ok=True)  # redo from scratch
            todo.append(v)
    if summary.skipped:
        echo(f"[ingest] resume: {summary.skipped} of {len(videos)} videos already finished in {out}")

    weights = resolve_weights(cfg.weights)
    latent_shape = audio_shape = None
    if todo:
        latent_shape, audio_shape = _run_pipeline(todo, cfg, weights, out, store, records, summary, echo)

    # the manifest: this run's inputs plus earlier inputs of the same output directory
    for rec in previous.values():
        if rec["video_id"] not in records and rec["source"] not in current_sources:
            if store.is_finished(rec, retry_rejected=False):
                records[rec["video_id"]] = rec
    rows = list(records.values())
    write_manifest(out, rows)
    _write_meta(out, cfg, weights, latent_shape, audio_shape, rows)

    summary.ok = sum(r["status"] == "ok" for r in rows)
    summary.rejected = sum(r["status"] == "rejected" for r in rows)
    summary.frames_written = sum(int(r["num_frames"] or 0) for r in rows if r["status"] == "ok")
    summary.rejections = {r["source"]: r["reason"] for r in rows if r["status"] == "rejected"}
    summary.wall_s = time.perf_counter() - t_start
    echo(f"[ingest] finished in {summary.wall_s:.1f}s: {summary.ok} ok, {summary.rejected} rejected, "
         f"{summary.skipped} skipped (already done), {summary.frames_written} frames -> {out}")
    for source, reason in sorted(summary.rejections.items()):
        echo(f"[ingest]   rejected {source}: {reason}")
    return summary


def _run_pipeline(todo: list[InputVideo], cfg: PlatformConfig, weights, out: Path, store: RecordStore,
                  records: dict, summary: IngestSummary, echo: Callable[[str], None]):

    init_ray(cfg.ray)
    with _ray_data_settings(len(todo)):
        return _stream(todo, cfg, weights, out, store, records, summary, echo)


def _stream(todo: list[InputVideo], cfg: PlatformConfig, weights, out: Path, store: RecordStore,
            records: dict, summary: IngestSummary, echo: Callable[[str], None]):
    """Build the dataset, consume its rows and assemble the frame files (see module docstring)."""
    ing = cfg.ingest
    by_id = {v.video_id: v for v in todo}
    ds = build_dataset([{"video_id": v.video_id, "path": str(v.path)} for v in todo], cfg,
                       weights.vae, weights.wav2vec2, weights.local_files_only, weights.dwpose_dir)
    assemblies: dict[str, _VideoAssembly] = {}
    shapes: dict[str, Optional[list[int]]] = {"latent": None, "audio": None}
    stage_s: dict[str, float] = {}
    done = 0

    def finish(video_id: str, rec: dict) -> None:
        nonlocal done
        store.write(rec)
        records[video_id] = rec
        done += 1
        what = f"ok, {rec['num_frames']} frames" if rec["status"] == "ok" else f"rejected ({rec['reason']})"
        n_rej = sum(1 for r in records.values() if r["status"] == "rejected" and r["video_id"] in by_id)
        echo(f"[ingest] {done}/{len(todo)} done ({n_rej} rejected): {by_id[video_id].source}: {what}")

    def reject(video_id: str, stage: str, reason: str, info: dict) -> None:
        asm = assemblies.pop(video_id, None)
        if asm is not None:
            asm.writer.abort()
        finish(video_id, manifest_row(by_id[video_id], status="rejected", stage=stage, reason=reason,
                                      num_frames=0, **_info_fields(info)))

    def try_complete(video_id: str) -> None:
        asm = assemblies[video_id]
        if not asm.complete:
            return
        del assemblies[video_id]
        path = asm.writer.close()
        end = asm.end
        info = json.loads(end["info"] or "{}")
        if asm.writer.num_rows != int(end["num_frames"]):
            path.unlink(missing_ok=True)
            reject(video_id, "write", f"write: {path} holds {asm.writer.num_rows} frames, expected "
                                      f"{end['num_frames']}", info)
            return
        for k, v in info.get(STAGE_TIMES_KEY, {}).items():
            stage_s[k] = stage_s.get(k, 0.0) + float(v)
        summary.frames_processed += int(end["num_frames"])
        finish(video_id, manifest_row(by_id[video_id], status="ok", stage=None, reason=None,
                                      num_frames=int(end["num_frames"]),
                                      frames_file=f"{FRAMES_DIR}/{path.name}", **_info_fields(info)))

    echo(f"[ingest] {len(todo)} videos to process -> {out}")
    try:
        for row in ds.iter_rows():
            vid = row["video_id"]
            if vid in records:  # already rejected (e.g. a late chunk after a reject)
                continue
            kind = row["kind"]
            try:
                if kind == "reject":
                    reject(vid, row["stage"] or "pipeline", row["reason"], json.loads(row["info"] or "{}"))
                elif kind == "chunk":
                    stage_s["vae"] = stage_s.get("vae", 0.0) + float(row.get("vae_s", 0.0))
                    lat, aud = list(row["latent"].shape[1:]), list(row["features"].shape[1:])
                    if shapes["latent"] is None:
                        shapes["latent"], shapes["audio"] = lat, aud
                    if [lat, aud] != [shapes["latent"], shapes["audio"]]:
                        raise ValueError(f"latent {lat} / audio {aud} shapes differ from the first "
                                         f"video's {shapes['latent']} / {shapes['audio']}")
                    if vid not in assemblies:
                        assemblies[vid] = _VideoAssembly(out, vid, frame_schema(lat, aud, ing.write_jpeg))
                    assemblies[vid].add(row)
                    try_complete(vid)
                elif kind == "end":
                    if vid not in assemblies:  # zero-chunk video cannot pass the length filter
                        raise ValueError("no frames arrived")
                    assemblies[vid].end = {"num_chunks": row["num_chunks"], "num_frames": row["num_frames"],
                                           "info": row["info"]}
                    try_complete(vid)
            except Exception as exc:  # noqa: BLE001 - writing one video failed: record it
                reject(vid, "write", f"write: {by_id[vid].path}: {type(exc).__name__}: {exc}", {})
    except Exception as exc:  # noqa: BLE001 - the stream itself failed: record what is left
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        echo(f"[ingest] Ray Data stream failed: {type(exc).__name__}: {msg}")
        for vid in by_id:
            if vid not in records:
                reject(vid, "pipeline", f"pipeline: {by_id[vid].path}: not finished, the stream failed "
                                        f"({type(exc).__name__}: {msg})", {})
    for vid in by_id:  # a block lost to a dead worker (max_errored_blocks): no rows came back
        if vid not in records:
            reject(vid, "pipeline", f"pipeline: {by_id[vid].path}: a worker failed on this video "
                                    f"(no result came back)", {})
    summary.processed += len(todo)
    for k, v in stage_s.items():
        summary.stage_seconds[k] = summary.stage_seconds.get(k, 0.0) + v
    return shapes["latent"], shapes["audio"]


def _write_meta(out: Path, cfg: PlatformConfig, weights, latent_shape, audio_shape, rows: list[dict]) -> None:
    """``ingest_meta.json``: shapes seen in this run, else those of an existing frame file or meta."""
    import pyarrow.parquet as pq

    if latent_shape is None:
        for r in rows:
            if r["status"] == "ok":
                md = pq.read_schema(frames_path(out, r["video_id"])).metadata or {}
                latent_shape = json.loads(md[b"loopy.latent_shape"])
                audio_shape = json.loads(md[b"loopy.audio_shape"])
                break
    if latent_shape is None and (out / META_NAME).is_file():
        try:
            old = IngestMeta.read(out)
            latent_shape, audio_shape = old.latent_shape, old.audio_shape
        except IngestFormatError:
            pass
    if latent_shape is None:  # nothing ingested yet: from the model configs
        s = cfg.ingest.crop_size // 8
        latent_shape = [4, s, s]
        try:
            from transformers import AutoConfig

            wc = AutoConfig.from_pretrained(weights.wav2vec2, local_files_only=weights.local_files_only)
            audio_shape = [int(wc.num_hidden_layers), int(wc.hidden_size)]
        except Exception:  # noqa: BLE001
            audio_shape = [0, 0]
    IngestMeta(
        schema_version=SCHEMA_VERSION,
        fps=cfg.ingest.fps,
        crop_size=cfg.ingest.crop_size,
        latent_shape=list(latent_shape),
        audio_shape=list(audio_shape),
        sample_rate=cfg.ingest.sample_rate,
        weights={"preset": cfg.weights.preset, "vae": weights.vae, "wav2vec2": weights.wav2vec2,
                 "detector": cfg.ingest.detector},
        vae_scaling_factor=_vae_scaling_factor(weights.vae, weights.local_files_only),
    ).write(out)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pipelines/ingest.py",
        description="Ingest raw talking-head videos into training-ready Parquet (Ray Data).")
    parser.add_argument("--input", required=True, help="video file, folder, or .txt list of paths")
    parser.add_argument("--output", required=True, help="output directory (resumed if it exists)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_platform_config(args.config, args.overrides)
        plan_inputs(args.input, cfg.ingest.test_fraction, cfg.ingest.split_key)
        check_output_dir(args.output, cfg)
    except (ConfigError, IngestInputError, IngestOutputError) as exc:
        print(f"ingest: error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run_ingest(args.input, args.output, cfg, echo=lambda s: print(s, flush=True))
    finally:
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()  # stop the embedded Ray (or disconnect from the cluster) cleanly
    print(json.dumps({k: v for k, v in asdict(summary).items() if k != "rejections"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
