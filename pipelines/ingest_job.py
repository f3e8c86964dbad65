"""The ingest job: raw talking-head videos -> training-ready Parquet, on Ray Data.

:func:`run_ingest` is the job (``pipelines/ingest.py`` is its command line). Pipeline (Ray Data,
streaming; each video is its own input block):

1. driver: expand the input, stable ``video_id`` (hash of path + size + mtime), deterministic
   split (``ingest.split_key``: ``video`` or ``folder``) (``pipelines/manifest.py``); read the
   model configs (``pipelines/ingest_meta.py``); skip videos finished by an earlier run
   (``pipelines/resume.py``);
2. ``map(VideoAnalyzer)`` actor pool (``ingest.num_detect_actors``): probe (the file's only
   probe), low-resolution detection pass, 16 kHz audio checked against the video, crop track,
   quality filters;
3. ``map_batches(AudioFeatureStage)`` actor pool (``ingest.num_audio_actors``): wav2vec2
   features of every layer, one vector per 25 fps frame;
4. ``flat_map(decode_and_crop)`` CPU tasks: full-resolution streaming decode in
   ``ingest.chunk_frames`` chunks (timestamps and geometry from the probe), face-centred crops ->
   one row per chunk;
5. ``map_batches(VaeStage)`` actor pool (``ingest.num_vae_actors``, GPUs when ``ingest.use_gpu``):
   VAE latents (fp16), crop pixels dropped;
6. driver: consumes the small per-chunk rows (``iter_rows``) and appends them in frame order to
   ``frames/<video_id>.parquet`` (``pipelines/frame_writer.py``), then records the video
   (``DIR/records``). At the end ``videos.parquet`` (one row per input file) and
   ``ingest_meta.json``.

Only the driver writes into ``DIR``: workers need no shared filesystem. Any failure of a video in
any stage becomes that video's rejected manifest row (stage + reason naming the file); the job
finishes the rest. A wrong input / output / weights config raises before any work and before Ray
starts.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from core.ray_runtime import init_ray
from core.sections import PlatformConfig
from core.weights import WeightPaths, resolve_weights
from pipelines.frame_writer import FinishedVideo, FrameAssembler, FrameWriteError
from pipelines.ingest_meta import read_model_facts, write_ingest_meta
from pipelines.ingest_model_stages import AudioFeatureStage, VaeStage
from pipelines.ingest_stages import STAGE_TIMES_KEY, VideoAnalyzer, decode_and_crop
from pipelines.manifest import InputVideo, manifest_row, plan_inputs, write_manifest
from pipelines.resume import RecordStore, check_output_dir, earlier_records, plan_resume
from pipelines.schema import FRAMES_DIR


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


def _manifest_facts(info: dict) -> dict:
    """The probe facts of a stage's ``info`` that go into the manifest row."""
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
def ray_data_settings(num_videos: int):
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


@dataclass
class PreparedIngest:
    """A job whose inputs, output directory and model configs were checked (no Ray, no video
    read yet): the videos to consider, the output folder, the resolved weights and the model facts
    ``ingest_meta.json`` records. ``started_s``: ``time.perf_counter()`` when the checks began."""

    cfg: PlatformConfig
    videos: list[InputVideo]
    out: Path
    weights: WeightPaths
    facts: dict
    started_s: float


def prepare_ingest(input_path: str | Path, output_dir: str | Path,
                   cfg: Optional[PlatformConfig] = None) -> PreparedIngest:
    """Every check that needs no Ray and reads no video. Raises
    :class:`~pipelines.manifest.IngestInputError` / :class:`~pipelines.resume.IngestOutputError` /
    :class:`~pipelines.ingest_meta.ModelConfigError` for a bad ``--input`` / ``--output`` / weights
    config (the CLI turns them into one line and exit status 2)."""
    started = time.perf_counter()
    cfg = cfg or PlatformConfig()
    videos = plan_inputs(input_path, cfg.ingest.test_fraction, cfg.ingest.split_key)
    out = check_output_dir(output_dir, cfg)
    weights = resolve_weights(cfg.weights)
    return PreparedIngest(cfg, videos, out, weights, read_model_facts(cfg, weights), started)


def run_ingest(input_path: str | Path, output_dir: str | Path, cfg: Optional[PlatformConfig] = None,
               echo: Callable[[str], None] = print) -> IngestSummary:
    """Run the whole job (see the module docstring): :func:`prepare_ingest` (raises before any
    work for a bad ``--input`` / ``--output`` / weights config), then :func:`run_prepared`; every
    per-video failure is recorded instead of raised."""
    return run_prepared(prepare_ingest(input_path, output_dir, cfg), echo)


def run_prepared(prep: PreparedIngest, echo: Callable[[str], None] = print) -> IngestSummary:
    """Run a checked job. Joins a running Ray (``init_ray``) when there is a video to process."""
    cfg, videos, out, weights, facts = prep.cfg, prep.videos, prep.out, prep.weights, prep.facts
    ing = cfg.ingest
    t_start = prep.started_s
    summary = IngestSummary(output_dir=str(out), inputs=len(videos))

    store = RecordStore(out)
    plan = plan_resume(videos, store, ing.retry_rejected)
    records = dict(plan.records)
    summary.skipped = plan.skipped
    if summary.skipped:
        echo(f"[ingest] resume: {summary.skipped} of {len(videos)} videos already finished in {out}")

    latent_shape = audio_shape = None
    if plan.todo:
        init_ray(cfg.ray)
        with ray_data_settings(len(plan.todo)):
            latent_shape, audio_shape = _stream(plan.todo, cfg, weights, out, store, records, summary, echo)

    # the manifest: this run's inputs plus earlier inputs of the same output directory
    for rec in earlier_records(plan, records, videos, store):
        records[rec["video_id"]] = rec
    rows = list(records.values())
    write_manifest(out, rows)
    write_ingest_meta(out, cfg, weights, facts, latent_shape, audio_shape, rows)

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


def _stream(todo: list[InputVideo], cfg: PlatformConfig, weights: WeightPaths, out: Path, store: RecordStore,
            records: dict, summary: IngestSummary, echo: Callable[[str], None]
            ) -> tuple[Optional[list[int]], Optional[list[int]]]:
    """Build the dataset, consume its rows into the frame files and record every video of
    ``todo`` (ok or rejected) in ``records`` and ``store``. Returns the (latent, audio) per-frame
    shapes of this run's frames (None, None when none were written)."""
    by_id = {v.video_id: v for v in todo}
    ds = build_dataset([{"video_id": v.video_id, "path": str(v.path)} for v in todo], cfg,
                       weights.vae, weights.wav2vec2, weights.local_files_only, weights.dwpose_dir)
    frames = FrameAssembler(out, cfg.ingest.write_jpeg)
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
        frames.abort(video_id)
        finish(video_id, manifest_row(by_id[video_id], status="rejected", stage=stage, reason=reason,
                                      num_frames=0, **_manifest_facts(info)))

    def accept(video: FinishedVideo) -> None:
        info = json.loads(video.end_info or "{}")
        for k, v in info.get(STAGE_TIMES_KEY, {}).items():
            stage_s[k] = stage_s.get(k, 0.0) + float(v)
        summary.frames_processed += video.num_frames
        finish(video.video_id, manifest_row(by_id[video.video_id], status="ok", stage=None, reason=None,
                                            num_frames=video.num_frames,
                                            frames_file=f"{FRAMES_DIR}/{video.path.name}",
                                            **_manifest_facts(info)))

    echo(f"[ingest] {len(todo)} videos to process -> {out}")
    try:
        for row in ds.iter_rows():
            vid = row["video_id"]
            if vid in records:  # already rejected (e.g. a late chunk after a reject)
                continue
            kind = row["kind"]
            try:
                finished = None
                if kind == "reject":
                    reject(vid, row["stage"] or "pipeline", row["reason"], json.loads(row["info"] or "{}"))
                elif kind == "chunk":
                    stage_s["vae"] = stage_s.get("vae", 0.0) + float(row.get("vae_s", 0.0))
                    finished = frames.add_chunk(row)
                elif kind == "end":
                    finished = frames.add_end(row)
                if finished is not None:
                    accept(finished)
            except FrameWriteError as exc:  # the finished file is wrong: recorded with its facts
                reject(vid, "write", f"write: {exc}", exc.info)
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
    return frames.latent_shape, frames.audio_shape
