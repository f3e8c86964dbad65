"""The ingest job: raw talking-head videos -> training-ready Parquet, on Ray Data.

:func:`run_ingest` is the job (``pipelines/ingest.py`` is its command line and its MLflow run).
Pipeline:

1. driver: expand the input, content ``video_id`` (hash of size + first and last MBs: a copy in
   another folder is recorded as ``duplicate`` and never ingested twice), deterministic split
   (``ingest.split_key``: ``video`` or ``folder``) (``pipelines/dataset/manifest.py``); read the model
   configs (``pipelines/ingestion/meta.py``); refuse an output directory written with another
   configuration and claim a new one with the run's fingerprint, before any work; skip videos
   finished by an earlier run (``pipelines/ingestion/resume.py``);
2. plain Ray tasks, one per video, before any actor exists (:func:`screen_inputs`): probe (the
   file's only probe) and the limits (pixels from the stream header, duration, frozen/sparse
   frames, audio length from the headers) before anything is decoded, each within
   ``deadline_base_s`` (past it: the task's worker is killed, stage ``timeout``); the driver
   records the rejects at once. Only the videos that pass go on, with their probe, each split
   into work ranges (``pipelines/ingestion/units.py``: about ``ingest.unit_s`` seconds each, one
   range for a short video; ranges finished by an earlier run are skipped): the pipeline below is
   built for those ranges alone (one-range-per-actor pools sized by their number) and not at all
   when none is left (a job of hostile files starts no actor, no model). Steps 3-7 are that
   Ray Data pipeline (streaming; each range is its own input block, so the ranges of one long
   video run on every worker at once):
3. ``flat_map(AnalyzerStage)`` actor pool (``ingest.num_detect_actors``): in a watched child process
   per actor (``pipelines/ingestion/watchdog.py``; per-range deadline ``deadline_base_s + deadline_per_s x
   duration``, past it: stage ``timeout``): on the probe of step 2, the range's boundaries moved to
   the nearest cuts, the detection-scale search and the detection pass over the range (with the
   cut detector, ``pipelines/media/cuts.py``), 16 kHz audio checked against the video, then per
   shot the crop track and quality filters: one row per shot (a sample, or a rejected range);
4. ``map_batches(AudioFeatureStage)`` actor pool (``ingest.num_audio_actors``): wav2vec2
   features of every layer, one vector per 25 fps frame;
5. ``flat_map(DecodeStage)`` actor pool (``ingest.num_decode_workers``): full-resolution
   streaming decode in ``ingest.chunk_frames`` chunks (timestamps and geometry from the probe),
   face-centred crops -> one row per chunk; in a watched child process per actor with the same
   per-video deadline as the analysis (past it: stage ``timeout``);
6. ``map_batches(VaeStage)`` actor pool (``ingest.num_vae_actors``, GPUs when ``ingest.use_gpu``):
   VAE latents (fp16), crop pixels dropped;
7. ``map_batches(write_chunk_parts)`` tasks: each chunk written by the worker as a part file
   (``pipelines/ingestion/frame_writer.py``); only small rows (ids, counts, shapes) go on;
8. driver: consumes the small rows (``iter_rows``: no frame data); when a sample's chunks are all
   written, a Ray task on a worker assembles ``frames/<video_id>.parquet``; the driver records
   the sample (``DIR/records``), a range when all its rows are in (``records/units``) and a source
   when all its ranges are (``records/sources``). At the end ``videos.parquet`` (one row per
   sample, rejected range or refused file) and ``ingest_meta.json``.

Workers write into ``DIR`` (on a cluster: a volume every node mounts at the same path). Status of
each input: ``ok``; ``rejected`` (the file is bad: stage + reason naming the file; the job
finishes the rest); ``failed`` (a worker killed by the OOM killer, a lost node, a failed write:
not the file's fault; the next run retries it); ``duplicate``. A wrong input / output / weights
config raises before any work and before Ray starts.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from core.ray_runtime import RayStateTimeout, bounded_state_read, init_ray
from core.sections import PlatformConfig
from core.storage import StorageUnavailableError
from core.weights import WeightPaths, resolve_weights
from pipelines.dataset.losses import hours_by_loss
from pipelines.dataset.manifest import (
    InputVideo,
    duplicate_row,
    manifest_row,
    plan_inputs,
    write_manifest,
)
from pipelines.dataset.schema import FRAMES_DIR
from pipelines.ingestion.frame_writer import (
    FrameWriteError,
    PartsTracker,
    assemble_frame_file,
    write_chunk_parts,
)
from pipelines.ingestion.meta import read_model_facts, write_ingest_meta
from pipelines.ingestion.model_stages import AudioFeatureStage, VaeStage
from pipelines.ingestion.resume import (
    RecordStore,
    check_output_dir,
    claim_output_dir,
    earlier_records,
    ingest_fingerprint,
    plan_resume,
    remove_video_files,
    source_of,
)
from pipelines.ingestion.stages import (
    STAGE_TIMES_KEY,
    AnalyzerStage,
    DecodeStage,
    analysis_gpus,
    screen_video_steps,
)
from pipelines.ingestion.units import UNIT_KEY, WorkRange, plan_ranges


@dataclass
class IngestSummary:
    """What one run did. Times in seconds; ``stage_seconds`` sums each stage over the videos
    processed in this run (``frames_processed`` frames), for per-frame costs."""

    output_dir: str
    inputs: int = 0
    ok: int = 0
    rejected: int = 0
    failed: int = 0  # infrastructure failures (retried by the next run)
    duplicates: int = 0  # copies of another input (not ingested again)
    skipped: int = 0  # finished by an earlier run (resume)
    processed: int = 0  # videos sent through the pipeline in this run
    frames_written: int = 0
    frames_processed: int = 0  # frames of the videos ingested in this run
    hours_kept: float = 0.0  # video kept: ok frames / fps, hours
    hours_input: float = 0.0  # video offered: probed durations of the non-duplicate inputs, hours
    hours_lost: dict = field(default_factory=dict)  # loss_key -> hours (pipelines/dataset/losses.py)
    wall_s: float = 0.0
    fingerprint: str = ""  # of the output-affecting settings (DIR/ingest_fingerprint.json)
    by_status: dict = field(default_factory=dict)  # status -> count (every row of the manifest)
    by_stage: dict = field(default_factory=dict)  # stage -> count (rejected and failed rows)
    by_reason: dict = field(default_factory=dict)  # reason_key -> count (rejected and failed rows)
    by_note: dict = field(default_factory=dict)  # note_key -> count (ok rows kept with a note: crop reduced / filled)
    driver_bytes: int = 0  # bytes of the rows the driver received from the stream (no frame data)
    driver_columns: list = field(default_factory=list)  # the columns of those rows
    stage_seconds: dict = field(default_factory=dict)
    rejections: dict = field(default_factory=dict)  # source -> reason (this run and earlier)
    # the output's object store became unreachable: what could not be recorded there (the
    # manifest, records); the videos it hit are failed and the next run redoes them
    store_error: str = ""


def _manifest_facts(info: dict) -> dict:
    """The probe facts of a stage's ``info`` that go into the manifest row."""
    keys = ("fps_in", "duration_s", "width", "height", "rotation", "audio_offset_s", "head_cut_ratio", "crop_fill",
            "crop_margin", "crop_adjusted_ratio", "crop_fill_max", "note",  # the crop's: stages.VideoAnalyzer._crop_track
            "loss_key", "speaker_sync", "ignored_tracks")  # stages.choose_subject_track, quality.Rejection.key
    return {k: info[k] for k in keys if k in info and info[k] is not None}


def actor_pool_strategy(size: Optional[int], one_task_per_actor: bool = False):
    """Ray Data actor pool of up to ``size`` actors (at least 1).

    ``one_task_per_actor``: each actor holds one video at a time, so a killed actor (OOM, lost
    node) takes only the video it was working on, not the ones queued behind it. Such a pool is
    fixed at ``size``: Ray Data's autoscaler adds actors only past 175 % utilisation (in-flight
    tasks per actor slot), which one task per actor never reaches, so a ``1..size`` pool would stay
    at one actor however large ``size`` is (Ray logs "will not allow it to scale up"). The caller
    caps ``size`` at the number of videos (one actor per video at most)."""
    from ray.data import ActorPoolStrategy

    n = max(1, int(size or 1))
    if one_task_per_actor:
        return ActorPoolStrategy(size=n, max_tasks_in_flight_per_actor=1)
    return ActorPoolStrategy(min_size=1, max_size=n)


def decode_pool_size(ing) -> int:
    """Actors of the full-resolution decode pool: ``ingest.num_decode_workers``, or as many as the
    analysis pool when unset."""
    return int(ing.num_decode_workers or ing.num_detect_actors)


def screen_window(ing) -> int:
    """How many probe tasks of :func:`screen_inputs` run at once: the tasks the cluster's CPUs
    hold at ``ingest.stage_num_cpus`` each (at least 1). Bounded, so each task's deadline, counted
    from its submission, is spent running and not waiting in Ray's queue. When Ray's state API does
    not answer (:func:`core.ray_runtime.bounded_state_read`), the analysis pool's size
    (``ingest.num_detect_actors``) stands in, with a warning: a smaller window is slower, never wrong."""
    import ray

    try:
        cpus = float(bounded_state_read(ray.cluster_resources, "the cluster's CPUs").get("CPU", 1.0))
    except RayStateTimeout as err:
        fallback = max(1, int(ing.num_detect_actors))
        warnings.warn(f"{err}; screening {fallback} videos at once (ingest.num_detect_actors)",
                      RuntimeWarning, stacklevel=2)
        return fallback
    return max(1, int(cpus / max(float(ing.stage_num_cpus), 1e-3)))


SCREEN_START_TIMEOUT_S = 600.0  # a probe task not running after this long: failed (no worker came)


def screen_inputs(todo: list[InputVideo], ing) -> Iterator[tuple[InputVideo, dict]]:
    """Phase 1 of the job: :func:`pipelines.ingestion.stages.screen_video` (probe + limits, before
    anything is decoded) as one plain Ray task per video (a generator task,
    :func:`~pipelines.ingestion.stages.screen_video_steps`), no actor and no model, at most
    :func:`screen_window` at once. Yields (video, result) as they finish, result one of

    * the ``screened`` dict of ``screen_video`` (the probe, for the pipeline's input row);
    * a ``reject`` row (the file is bad: stage + reason naming it, as ``screen_video`` gave it);
    * a ``reject`` at stage ``timeout`` when the probe ran past ``ingest.deadline_base_s``,
      counted from the task's first item (worker start-up excluded): a probe hung in FFmpeg; its
      worker is killed with ``ray.cancel(force=True)``, which Ray offers for tasks, not for actor
      methods (why the analysis stage needs a watched child process and this phase does not);
    * a ``failed`` row when the task was lost (worker killed by the OOM killer, node lost: Ray
      retried it ``ingest.max_task_retries`` times first) or never started
      (:data:`SCREEN_START_TIMEOUT_S`): not the file's fault, retried by the next run.

    Rows are plain dicts with ``kind``, ``stage``, ``reason`` and ``info`` (JSON)."""
    import ray

    task = ray.remote(num_cpus=ing.stage_num_cpus, max_retries=ing.max_task_retries)(screen_video_steps)
    waiting = deque(todo)
    window = screen_window(ing)
    running: dict = {}  # ObjectRefGenerator -> [video, deadline (time.monotonic()), started]
    while waiting or running:
        while waiting and len(running) < window:
            video = waiting.popleft()
            gen = task.remote({"video_id": video.video_id, "path": str(video.path)}, ing)
            running[gen] = [video, time.monotonic() + SCREEN_START_TIMEOUT_S, False]
        first_deadline = min(d for _, d, _ in running.values())
        ready, _ = ray.wait(list(running), num_returns=1, timeout=max(0.0, first_deadline - time.monotonic()))
        for gen in ready:
            video, _, started = running[gen]
            try:
                item = ray.get(next(gen))
            except Exception as exc:  # noqa: BLE001 - screen_video returns every file error as a row
                msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
                item = _plain_row("failed", "probe", f"failed: probe: {video.path}: the probe task was lost "
                                                     f"({type(exc).__name__}: {msg[:300]})")
            if item["kind"] == "started":  # the probe runs from now on: its deadline starts
                if not started:
                    running[gen][1:] = [time.monotonic() + ing.deadline_base_s, True]
                continue
            del running[gen]
            yield video, item
        now = time.monotonic()
        for gen, (video, deadline, started) in list(running.items()):
            if now < deadline:
                continue
            ray.cancel(gen, force=True)
            del running[gen]
            if started:
                yield video, _plain_row("reject", "timeout",
                                        f"timeout: {video.path}: probe not finished within its deadline of "
                                        f"{ing.deadline_base_s:.1f} s (deadline_base_s {ing.deadline_base_s:g}): "
                                        f"its worker was killed")
            else:
                yield video, _plain_row("failed", "probe", f"failed: probe: {video.path}: the probe task did not "
                                                           f"start within {SCREEN_START_TIMEOUT_S:g} s")


def _plain_row(kind: str, stage: str, reason: str) -> dict:
    return {"kind": kind, "stage": stage, "reason": reason, "info": "{}"}


def build_dataset(rows: list[dict], cfg: PlatformConfig, vae: str, wav2vec2: str,
                  local_files_only: bool, dwpose_dir: Optional[str], out_dir: str):
    """The Ray Data pipeline over ``rows`` = the ``screened`` rows of :func:`screen_inputs`
    ({video_id, path, probe, stream_pts_s, probe_s}: the videos that passed the limits, one block
    per video); its rows are the small rows of ``pipelines/ingestion/frame_writer.py`` (``SMALL_COLUMNS``).
    The one-video-per-actor pools are sized by ``len(rows)`` (never more actors than videos)."""
    import ray

    ing = cfg.ingest
    device = "cuda" if ing.use_gpu else "cpu"
    # Ray Data retries actor tasks forever by default: a file that crashes its worker (a decoder
    # segfault) would loop; after max_task_retries the block fails and max_errored_blocks skips it
    # (the driver records the video as failed). Ray 2.60 has no named parameter for these retry
    # limits, only the (deprecated) remote args.
    actor_args = {"max_task_retries": ing.max_task_retries, "max_restarts": -1}
    gpus = {"num_gpus": ing.model_num_gpus} if ing.use_gpu else {}

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
        ds = ds.flat_map(AnalyzerStage, fn_constructor_kwargs={"cfg": ing, "dwpose_dir": dwpose_dir},
                    compute=actor_pool_strategy(min(ing.num_detect_actors, len(rows)), one_task_per_actor=True),
                    num_cpus=ing.stage_num_cpus, **analysis_gpus(ing), **actor_args)
        ds = ds.map_batches(AudioFeatureStage, batch_size=1,
                            fn_constructor_kwargs={"location": wav2vec2, "local_files_only": local_files_only,
                                                   "device": device, "fps": ing.fps},
                            compute=actor_pool_strategy(ing.num_audio_actors), num_cpus=ing.stage_num_cpus, **gpus,
                            **actor_args)
        ds = ds.flat_map(DecodeStage, fn_constructor_kwargs={"cfg": ing},
                         compute=actor_pool_strategy(min(decode_pool_size(ing), len(rows)), one_task_per_actor=True),
                         num_cpus=ing.stage_num_cpus, **actor_args)
        ds = ds.map_batches(VaeStage, batch_size=1,
                            fn_constructor_kwargs={"location": vae, "local_files_only": local_files_only,
                                                   "device": device, "batch_size": ing.model_batch_size,
                                                   "write_jpeg": ing.write_jpeg},
                            compute=actor_pool_strategy(ing.num_vae_actors), num_cpus=ing.stage_num_cpus, **gpus,
                            **actor_args)
        ds = ds.map_batches(write_chunk_parts, batch_size=1,
                            fn_kwargs={"out_dir": str(out_dir), "write_jpeg": ing.write_jpeg},
                            num_cpus=ing.stage_num_cpus, max_retries=ing.max_task_retries)
    return ds


class RayDataErrors(logging.Handler):
    """Collects the errors Ray Data logs for the blocks it skips (``max_errored_blocks``): a
    lost worker or node; the driver names them in the ``failed`` rows of the videos with no
    result."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = str(exc).strip().splitlines()
            self.errors.append(f"{type(exc).__name__}: {text[0] if text else ''}"[:300])

    def summary(self) -> str:
        if not self.errors:
            return "no error reported by Ray"
        kinds = sorted(set(self.errors))
        return "; ".join(kinds[:3]) + (f" (+{len(kinds) - 3} more)" if len(kinds) > 3 else "")


@contextlib.contextmanager
def ray_data_settings(num_videos: int):
    """Ray Data settings of this job, restored afterwards (other jobs in the process keep theirs).
    Yields the :class:`RayDataErrors` handler collecting the errors of skipped blocks."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    # a worker that dies on one video (OOM killer, decoder crash, lost node) loses only that
    # video's block: the video ends as a failed row ("failed: pipeline: ...") and the rest continues
    wanted = {"enable_progress_bars": False, "print_on_execution_start": False,
              # every block is one work range and the driver records each lost one as failed;
              # the ranges are planned after the probes, so their number is not known here
              "max_errored_blocks": -1}
    saved = {k: getattr(ctx, k) for k in wanted if hasattr(ctx, k)}
    for k in saved:
        setattr(ctx, k, wanted[k])
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.WARNING)
    errors = RayDataErrors()
    logger.addHandler(errors)
    try:
        yield errors
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)
        logger.setLevel(level)
        logger.removeHandler(errors)


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
    fingerprint: dict = field(default_factory=dict)  # resume.ingest_fingerprint, written to DIR


def prepare_ingest(input_path: str | Path, output_dir: str | Path,
                   cfg: Optional[PlatformConfig] = None) -> PreparedIngest:
    """Every check that needs no Ray and reads no video. Raises
    :class:`~pipelines.dataset.manifest.IngestInputError` / :class:`~pipelines.ingestion.resume.IngestOutputError` /
    :class:`~pipelines.ingestion.meta.ModelConfigError` for a bad ``--input`` / ``--output`` / weights
    config (the CLI turns them into one line and exit status 2)."""
    started = time.perf_counter()
    cfg = cfg or PlatformConfig()
    videos = plan_inputs(input_path, cfg.ingest.test_fraction, cfg.ingest.split_key)
    out = check_output_dir(output_dir, cfg)
    weights = resolve_weights(cfg.weights)
    facts = read_model_facts(cfg, weights)
    fingerprint = ingest_fingerprint(cfg, weights)
    claim_output_dir(out, fingerprint)  # refuses another configuration's directory; claims a new one
    return PreparedIngest(cfg, videos, out, weights, facts, started, fingerprint)


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
    summary = IngestSummary(output_dir=str(out), inputs=len(videos),
                            fingerprint=prep.fingerprint.get("fingerprint", ""))

    store = RecordStore(out)
    plan = plan_resume(videos, store, ing.retry_rejected)
    records = dict(plan.records)
    duplicates = [duplicate_row(v) for v in videos if v.duplicate_of is not None]
    summary.skipped = plan.skipped
    if summary.skipped:
        echo(f"[ingest] resume: {summary.skipped} of {len(videos)} videos already finished in {out}")
    if duplicates:
        echo(f"[ingest] {len(duplicates)} inputs are copies of another input (recorded as duplicates)")

    latent_shape = audio_shape = None
    if plan.todo:
        init_ray(cfg.ray)
        with ray_data_settings(len(plan.todo)) as ray_errors:
            latent_shape, audio_shape = _stream(plan.todo, cfg, weights, out, store, records, summary, echo,
                                                ray_errors, plan.done_units)

    # the manifest: this run's inputs plus earlier inputs of the same output directory
    rows = list(records.values()) + duplicates
    try:
        for rec in earlier_records(plan, records, videos, store):
            records[rec["video_id"]] = rec
        rows = list(records.values()) + duplicates
        write_manifest(out, rows)
        write_ingest_meta(out, cfg, weights, facts, latent_shape, audio_shape, rows)
    except StorageUnavailableError as exc:  # the bucket went away: report, the next run redoes the rest
        summary.store_error = summary.store_error or str(exc)
        echo(f"[ingest] the output store is unreachable, the manifest was not written ({exc}); rerun when it "
             f"is back: finished videos are kept, the others redone")
    if summary.store_error:
        echo(f"[ingest] the output store failed during the run ({summary.store_error}): the videos it hit are "
             f"failed and the next run redoes them")
    fill_yield(summary, rows, ing.fps)
    summary.wall_s = time.perf_counter() - t_start
    echo(f"[ingest] finished in {summary.wall_s:.1f}s: {summary.ok} ok, {summary.rejected} rejected, "
         f"{summary.failed} failed (retried by the next run), {summary.duplicates} duplicates, "
         f"{summary.skipped} skipped (already done), {summary.frames_written} frames; kept "
         f"{summary.hours_kept:.3f} h of {summary.hours_input:.3f} h of video -> {out}")
    for source, reason in sorted(summary.rejections.items()):
        echo(f"[ingest]   rejected {source}: {reason}")
    for r in sorted((r for r in rows if r["status"] == "ok" and r.get("note")), key=lambda r: r["source"]):
        echo(f"[ingest]   kept {r['source']}: {r['note']}")  # a crop reduced / filled (docs/INGEST.md "Close-ups")
    echo(yield_line(summary))
    return summary


def yield_line(summary: IngestSummary) -> str:
    """The yield report in one line: hours in, kept, and lost per loss key (largest first)."""
    lost = ", ".join(f"{k} {h:.3f} h" for k, h in summary.hours_lost.items()) or "nothing"
    return (f"[ingest] yield: {summary.hours_input:.3f} h in, {summary.hours_kept:.3f} h kept; lost: {lost}")


def fill_yield(summary: IngestSummary, rows: list[dict], fps: float) -> None:
    """The yield report of ``summary`` from the manifest ``rows``: counts by status, by stage and
    by reason (``reason_key``), kept videos by note (``note_key``), frames and hours kept, hours offered."""
    def count(key) -> dict:
        out: dict = {}
        for r in rows:
            k = key(r)
            if k is not None:
                out[k] = out.get(k, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], str(kv[0]))))

    bad = ("rejected", "failed")
    summary.by_status = count(lambda r: r["status"])
    summary.by_stage = count(lambda r: r["stage"] if r["status"] in bad else None)
    summary.by_reason = count(lambda r: r.get("reason_key") if r["status"] in bad else None)
    summary.by_note = count(lambda r: r.get("note_key") if r["status"] == "ok" else None)
    summary.ok = summary.by_status.get("ok", 0)
    summary.rejected = summary.by_status.get("rejected", 0)
    summary.failed = summary.by_status.get("failed", 0)
    summary.duplicates = summary.by_status.get("duplicate", 0)
    summary.frames_written = sum(int(r["num_frames"] or 0) for r in rows if r["status"] == "ok")
    summary.hours_input, summary.hours_kept, summary.hours_lost = hours_by_loss(rows, fps)
    per_source: dict = {}
    for r in rows:
        per_source[r["source"]] = per_source.get(r["source"], 0) + 1

    def where(r: dict) -> str:  # a source with several rows (shots, ranges): each row by its range
        if per_source[r["source"]] == 1 or r.get("start_s") is None:
            return r["source"]
        return f"{r['source']} [{r['start_s']:.2f}-{r['end_s']:.2f} s]"

    summary.rejections = {where(r): r["reason"] for r in rows if r["status"] in bad}


def _row_bytes(row) -> int:
    """Approximate size of one row the driver received (array bytes + string lengths)."""
    total = 0
    for v in row.values():
        total += getattr(v, "nbytes", None) or (len(v) if isinstance(v, (str, bytes)) else 8)
    return int(total)


@dataclass
class _UnitProgress:
    """Driver side: one work range (``pipelines/ingestion/units.py``) and the rows it finished."""

    video: InputVideo
    rng: WorkRange
    expected: Optional[int] = None  # rows the range gives (known from its first analysed row)
    done: set = field(default_factory=set)  # ids of its finished rows

    @property
    def complete(self) -> bool:
        return self.expected is not None and len(self.done) >= self.expected


def _stream(todo: list[InputVideo], cfg: PlatformConfig, weights: WeightPaths, out: Path, store: RecordStore,
            records: dict, summary: IngestSummary, echo: Callable[[str], None],
            ray_errors: Optional[RayDataErrors] = None,
            done_units: Optional[dict] = None) -> tuple[Optional[list[int]], Optional[list[int]]]:
    """Screen every video of ``todo``, split those that pass into work ranges
    (:func:`pipelines.ingestion.units.plan_ranges`; the ranges of ``done_units`` are reused, not
    redone), build the dataset over the ranges, consume its small rows, have every complete
    sample's frame file assembled on a worker, and record every row (sample, rejected range,
    refused file; ok, rejected or failed) in ``records`` and ``store``, with the unit and source
    records of resume. Returns the (latent, audio) per-frame shapes of this run's frames (None,
    None when none were written)."""
    import ray

    ing = cfg.ingest
    done_units = done_units or {}
    by_source = {v.video_id: v for v in todo}
    units: dict[str, _UnitProgress] = {}
    pending_sources: dict[str, set] = {}  # source id -> ids of its ranges not finished yet
    tracker = PartsTracker()
    assemble = ray.remote(num_cpus=ing.stage_num_cpus, max_retries=3)(assemble_frame_file)
    assembling: dict = {}  # ObjectRef -> (sample id, end facts)
    stage_s: dict[str, float] = {}
    columns: set[str] = set()
    done = 0
    unscreened = len(todo)  # videos whose probe has not come back (their ranges are not known yet)

    def stored(action, *args) -> None:
        """A resume-state write or a removal; when the output store is gone it is reported
        (``summary.store_error``) and left to the next run, which redoes what it does not find."""
        try:
            action(*args)
        except StorageUnavailableError as exc:
            summary.store_error = summary.store_error or str(exc)

    def unit_of(row_id: str, info: dict) -> tuple[_UnitProgress, dict]:
        """The range a row belongs to and its :data:`UNIT_KEY` facts (a row without them is the
        whole range, named by the range id)."""
        facts = info.get(UNIT_KEY)
        unit = units[facts["unit_id"]] if facts else units[row_id]
        if not facts:
            facts = unit.rng.facts(unit.rng.start, unit.rng.end, 1)
        return unit, facts

    def range_fields(facts: dict) -> dict:
        return {"start_s": facts["start"] / ing.fps, "end_s": facts["end"] / ing.fps}

    def finish(sample: str, rec: dict, unit: _UnitProgress, expected: int) -> None:
        nonlocal done
        try:
            store.write(rec)
        except StorageUnavailableError as exc:  # the output bucket went away: reported, not recorded
            summary.store_error = summary.store_error or str(exc)
            if rec["status"] == "ok":  # not recorded, so not finished: the next run redoes it
                rec = {**rec, "status": "failed", "stage": "write", "frames_file": None,
                       "reason": f"failed: write: {unit.video.path}: the record could not be written ({exc})",
                       "reason_key": "failed: write: the record could not be written"}
        records[sample] = rec
        unit.expected = expected
        unit.done.add(sample)
        if rec["status"] == "ok":
            what = f"ok, {rec['num_frames']} frames"
        else:
            what = f"{rec['status']} ({rec['reason']})"
        if not unit.complete:
            echo(f"[ingest] {unit.video.source} [{rec['start_s'] or 0:.1f}-{rec['end_s'] or 0:.1f} s]: {what}")
            return
        done += 1
        finished_unit(unit)
        mine = [r["status"] for r in records.values() if source_of(r) in by_source]
        n_rej, n_failed = mine.count("rejected"), mine.count("failed")  # a bad file / an infrastructure failure
        failed = f", {n_failed} failed" if n_failed else ""  # "(r rejected)" stays as the demo's console reads it
        where = "" if unit.rng.whole else f" [{unit.rng.start / ing.fps:.1f}-{unit.rng.end / ing.fps:.1f} s]"
        echo(f"[ingest] {done}/{len(units) + unscreened} done ({n_rej} rejected){failed}: {unit.video.source}{where}: "
             f"{what}")

    def finished_unit(unit: _UnitProgress) -> None:
        """Resume state: the range's rows, then the source when all its ranges are finished (a
        range with a failed row is left unrecorded: the next run redoes it)."""
        if any(records[s]["status"] == "failed" for s in unit.done):
            return
        stored(store.write_unit, unit.rng.unit_id, unit.rng.source_id, list(unit.done))
        left = pending_sources.get(unit.rng.source_id)
        if left is not None:
            left.discard(unit.rng.unit_id)
            if not left:
                stored(store.write_source, unit.rng.source_id, [u.rng.unit_id for u in units.values()
                                                                if u.rng.source_id == unit.rng.source_id])

    def whole_file(video: InputVideo, status: str, stage: str, reason: str, info: dict) -> None:
        """A file refused or failed before it was split into ranges (the probe and the limits)."""
        stored(remove_video_files, out, video.video_id)
        rng = WorkRange(video.video_id, video.video_id, 0, 0)
        unit = units[video.video_id] = _UnitProgress(video, rng)
        rec = manifest_row(video, status=status, stage=stage, reason=reason, num_frames=0, **_manifest_facts(info))
        if status != "failed":
            pending_sources[video.video_id] = {video.video_id}
        finish(video.video_id, rec, unit, 1)

    def reject(sample: str, stage: str, reason: str, info: dict, status: str = "rejected") -> None:
        unit, facts = unit_of(sample, info)
        tracker.drop(sample)
        stored(remove_video_files, out, sample)
        finish(sample, manifest_row(unit.video, video_id=sample, status=status, stage=stage, reason=reason,
                                    num_frames=0, **range_fields(facts), **_manifest_facts(info)),
               unit, int(facts.get("rows", 1)))

    def fail(sample: str, stage: str, reason: str, info: Optional[dict] = None) -> None:
        reject(sample, stage, reason, info or {}, status="failed")

    def accept(sample: str, num_frames: int, end: dict) -> None:
        info = json.loads(end["info"] or "{}")
        unit, facts = unit_of(sample, info)
        for k, v in info.get(STAGE_TIMES_KEY, {}).items():
            stage_s[k] = stage_s.get(k, 0.0) + float(v)
        summary.frames_processed += num_frames
        finish(sample, manifest_row(unit.video, video_id=sample, status="ok", stage=None, reason=None,
                                    num_frames=num_frames, frames_file=f"{FRAMES_DIR}/{sample}.parquet",
                                    cut_frames=[], **range_fields(facts), **_manifest_facts(info)),
               unit, int(facts.get("rows", 1)))

    def collect(wait: bool) -> None:
        if not assembling:
            return
        ready, _ = ray.wait(list(assembling), num_returns=len(assembling), timeout=None if wait else 0)
        for ref in ready:
            sid, end = assembling.pop(ref)
            info = json.loads(end["info"] or "{}")
            path = unit_of(sid, info)[0].video.path
            try:
                result = ray.get(ref)
            except FrameWriteError as exc:  # the assembled file is wrong: a bad result for this file
                reject(sid, "write", f"write: {path}: {str(exc).splitlines()[-1]}", info)
                continue
            except Exception as exc:  # noqa: BLE001 - a lost worker / disk: retryable
                msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
                fail(sid, "write", f"failed: write: {path}: assembling the frame file failed "
                                   f"({type(exc).__name__}: {msg[:300]})", info)
                continue
            accept(sid, int(result["num_frames"]), end)

    echo(f"[ingest] {len(todo)} videos to process -> {out}")
    passed = []  # the work ranges of the screened videos: the pipeline's input
    for video, row in screen_inputs(todo, ing):
        unscreened -= 1
        if row["kind"] == "screened":
            probe = {k: row[k] for k in ("path", "probe", "stream_pts_s", "probe_s")}
            duration = float(json.loads(row["probe"])["duration_s"])
            clip = video.clip
            ranges = plan_ranges(video.video_id, duration, ing.fps, ing.unit_s,
                                 *((clip.start_s, clip.end_s) if clip is not None else ()))
            if ranges[0].num_frames <= 0:  # a clip wholly past the end of its file
                whole_file(video, "rejected", "input", f"input: {video.path}: the clip {clip.label()} is past the end "
                                                       f"of the video ({duration:.3f} s)", {})
                continue
            pending_sources[video.video_id] = {r.unit_id for r in ranges}
            reused = done_units.get(video.video_id, {})
            for rng in ranges:
                unit = units[rng.unit_id] = _UnitProgress(video, rng)
                if rng.unit_id in reused:  # finished by an earlier run (resume per range)
                    for rec in reused[rng.unit_id]:
                        rec.update(source=video.source, split=video.split)
                        records[rec["video_id"]] = rec
                        unit.done.add(rec["video_id"])
                    unit.expected = len(unit.done)
                    pending_sources[video.video_id].discard(rng.unit_id)
                    continue
                passed.append({"video_id": rng.unit_id, **probe, **rng.to_row()})
            if not pending_sources[video.video_id]:
                stored(store.write_source, video.video_id, [r.unit_id for r in ranges])
        elif row["kind"] == "failed":
            whole_file(video, "failed", row["stage"], row["reason"], json.loads(row["info"] or "{}"))
        else:
            whole_file(video, "rejected", row["stage"], row["reason"], json.loads(row["info"] or "{}"))
    n_sources = len({r["source_id"] for r in passed})
    reused_n = sum(1 for u in units.values() if u.complete)
    echo(f"[ingest] {n_sources} of {len(todo)} videos passed the probe and the limits: {len(passed)} ranges to "
         f"process" + (f" ({reused_n} finished by an earlier run)" if reused_n else ""))
    # no range left: the model pipeline is never built, so no actor pool starts (torch, wav2vec2,
    # the VAE and the analysis processes cost more than the whole job otherwise)
    ds = build_dataset(passed, cfg, weights.vae, weights.wav2vec2, weights.local_files_only, weights.dwpose_dir,
                       str(out)) if passed else None
    try:
        for row in (ds.iter_rows() if ds is not None else ()):
            summary.driver_bytes += _row_bytes(row)
            columns.update(row.keys())
            vid = row["video_id"]
            if vid in records:  # already finished (e.g. a late chunk after a reject)
                continue
            kind = row["kind"]
            info = json.loads(row["info"] or "{}")
            try:
                if kind == "reject":
                    reject(vid, row["stage"] or "pipeline", row["reason"], info)
                elif kind == "failed":
                    fail(vid, row["stage"] or "pipeline", row["reason"], info)
                elif kind in ("chunk", "end"):
                    if kind == "chunk":
                        stage_s["vae"] = stage_s.get("vae", 0.0) + float(row.get("vae_s", 0.0))
                    end = tracker.add(row)
                    if end is not None:
                        ref = assemble.remote(str(out), vid, end["num_chunks"], end["num_frames"])
                        assembling[ref] = (vid, end)
            except Exception as exc:  # noqa: BLE001 - this sample's rows do not fit: record it
                path = unit_of(vid, info)[0].video.path if (info.get(UNIT_KEY) or vid in units) else row["path"]
                reject(vid, "write", f"write: {path}: {type(exc).__name__}: {exc}", info)
            collect(wait=False)
    except Exception as exc:  # noqa: BLE001 - the stream itself failed: what is left is retryable
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        echo(f"[ingest] Ray Data stream failed: {type(exc).__name__}: {msg}")
        in_assembly = {v for v, _ in assembling.values()}
        for uid, unit in list(units.items()):
            if not unit.complete and not (unit.done or in_assembly & {uid}):
                fail(uid, "pipeline", f"failed: pipeline: {unit.video.path}: not finished, the stream failed "
                                      f"({type(exc).__name__}: {msg})")
    collect(wait=True)
    errors = ray_errors.summary() if ray_errors is not None else "no error reported by Ray"
    for uid, unit in list(units.items()):  # a block lost to a dead worker or node: not every row came back
        if not unit.complete:
            lost = [s for s in unit.done if records[s]["status"] == "ok"]
            for s in lost:  # the range is redone as a whole by the next run
                stored(remove_video_files, out, s)
            reason = (f"failed: pipeline: {unit.video.path}: no result came back: a worker or node was lost on "
                      f"this video (Ray: {errors})")
            if unit.rng.unit_id in records:
                continue
            unit.expected = len(unit.done) + 1
            fail(uid, "pipeline", reason)
            for s in lost:
                records[s] = {**records[s], "status": "failed", "reason": reason, "stage": "pipeline",
                              "frames_file": None, "num_frames": 0}
                stored(store.write, records[s])
    for sid, rec in records.items():  # chunks a late writer task left for rows that did not end ok
        if source_of(rec) in by_source and rec["status"] != "ok":
            stored(remove_video_files, out, sid)
    summary.processed += len(todo)
    summary.driver_columns = sorted(columns | set(summary.driver_columns))
    for k, v in stage_s.items():
        summary.stage_seconds[k] = summary.stage_seconds.get(k, 0.0) + v
    return tracker.latent_shape, tracker.audio_shape
