"""Driver side of a training job: checks, one Ray Train run per stage, MLflow runs, packages.

A job trains stage 1, stage 2 or both (in that order). Layout under ``train.storage_path``::

    <storage>/latest_job                 name of the newest job (``--resume`` continues it)
    <storage>/<job>/job.json             JobRecord: MLflow parent run, per stage its run / version
    <storage>/<job>/stage<N>/            Ray Train run (``RunConfig(name=..., storage_path=...)``):
                                         checkpoints; re-running the same name resumes from the
                                         latest one (Ray Train restores its checkpoint manager)
    <storage>/<job>/stage<N>_package/    the stage's model package (models/registry.py)

Every check that can fail without training (config values, the dataset, the stage-1 model a
stage-2 run starts from) runs in :func:`prepare_job` before any worker starts, and fails with one
:class:`TrainSetupError` naming the file, key or URI.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from core.config import PlatformConfig
from core.paths import project_path, resolve_tracking_uri
from core.ray_runtime import init_ray
from core.weights import resolve_weights
from models.registry import (
    ModelPackageError,
    latest_version,
    log_model_package,
    resolve_model_location,
    write_model_package,
)
from pipelines.reader import LoopySampleSource, build_ray_dataset
from pipelines.schema import IngestFormatError
from training.checkpointing import FINAL_MODEL_DIR
from training.errors import StageResultError, TrainingError
from training.loop import StageJob, train_loop_per_worker
from training.tracking import JobTracker, RunLogger

log = logging.getLogger(__name__)
JOB_FILE = "job.json"
LATEST_FILE = "latest_job"


class TrainSetupError(TrainingError, ValueError):
    """A training job that cannot start: bad config value, dataset, or stage-1 model."""


class TrainingStoppedError(TrainingError, RuntimeError):
    """A stage stopped on a non-finite loss (step and batch provenance in the message)."""


@dataclass
class StageRecord:
    run_id: Optional[str] = None
    done: bool = False
    version: Optional[int] = None  # registered model version
    model_uri: Optional[str] = None  # models:/<name>/<version>
    package_dir: Optional[str] = None


@dataclass
class JobRecord:
    """What a job did so far (``job.json``): lets ``--resume`` continue it."""

    name: str
    parent_run_id: Optional[str] = None
    stages: dict[str, StageRecord] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / JOB_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Path) -> "JobRecord":
        data = json.loads((folder / JOB_FILE).read_text())
        return cls(name=data["name"], parent_run_id=data.get("parent_run_id"),
                   stages={k: StageRecord(**v) for k, v in data.get("stages", {}).items()})


def storage_root(cfg: PlatformConfig) -> Path:
    return project_path(cfg.train.storage_path).resolve()


def stage_config(cfg: PlatformConfig, stage: int) -> PlatformConfig:
    """``cfg`` with ``reader.stage`` set to ``stage`` (stage 1: one target frame, no motion/audio)."""
    return dataclasses.replace(cfg, reader=dataclasses.replace(cfg.reader, stage=stage))


def _check_train_config(cfg: PlatformConfig) -> None:
    tc = cfg.train
    positive = ("num_workers", "batch_size", "max_steps", "checkpoint_every", "log_every", "checkpoints_to_keep")
    for name in positive:
        if getattr(tc, name) < 1:
            raise TrainSetupError(f"train.{name} must be >= 1, got {getattr(tc, name)}")
    if tc.lr <= 0:
        raise TrainSetupError(f"train.lr must be > 0, got {tc.lr}")
    if tc.warmup_steps < 0 or tc.eval_every < 0 or tc.eval_sample_steps < 0 or tc.max_failures < -1:
        raise TrainSetupError("train.warmup_steps, eval_every, eval_sample_steps must be >= 0, max_failures >= -1")
    bad_t = [t for t in tc.eval_timesteps if not 0 <= t < tc.num_train_timesteps]
    if bad_t:
        raise TrainSetupError(f"train.eval_timesteps {bad_t} outside 0..{tc.num_train_timesteps - 1}")
    if tc.ema_decay is not None and not 0.0 < tc.ema_decay < 1.0:
        raise TrainSetupError(f"train.ema_decay must be in (0, 1), got {tc.ema_decay}")
    if tc.mixed_precision != "no" and not tc.use_gpu:
        raise TrainSetupError(f"train.mixed_precision={tc.mixed_precision} needs train.use_gpu=true")


def steps_per_epoch(cfg: PlatformConfig, data_dir: Path, stage: int) -> int:
    """Batches per rank per epoch of the train split (equal on every rank). Raises
    :class:`TrainSetupError` for a directory that is not an ingest output or has no samples."""
    scfg = stage_config(cfg, stage)
    try:
        source = LoopySampleSource(data_dir, scfg.reader, "train")
    except (IngestFormatError, ValueError, OSError) as exc:
        raise TrainSetupError(f"--data {data_dir}: {exc}") from exc
    specs = len(source.epoch_specs(0))
    n = specs // cfg.train.num_workers // cfg.train.batch_size
    if n < 1:
        raise TrainSetupError(
            f"--data {data_dir}: {specs} train samples per epoch ({source.num_videos} videos, {source.skipped} "
            f"skipped as too short) is less than one batch of {cfg.train.batch_size} for each of "
            f"{cfg.train.num_workers} workers")
    return n


def check_stage1_package(location: str, cfg: PlatformConfig, dst: Path) -> None:
    """Fail unless ``location`` resolves to a package holding a stage-1 LoopyModel."""
    try:
        pkg = resolve_model_location(location, dst_dir=dst, tracking_uri=resolve_tracking_uri(cfg.tracking.tracking_uri))
    except ModelPackageError as exc:
        raise TrainSetupError(f"stage 2 init: {exc}") from exc
    stage = json.loads((pkg / "loopy" / "config.json").read_text()).get("stage")
    if stage != 1:
        raise TrainSetupError(f"stage 2 init: {location} holds a stage-{stage} model, not stage 1")


@dataclass
class PreparedJob:
    cfg: PlatformConfig
    data_dir: Path
    stages: list[int]
    record: JobRecord
    job_dir: Path
    steps_per_epoch: dict[int, int]
    init_from: Optional[str]  # stage-1 model for stage 2 when stage 1 is not part of the job


def prepare_job(cfg: PlatformConfig, data_dir: str | Path, stages: Sequence[int], resume: bool = False,
                init_from: Optional[str] = None, job_name: Optional[str] = None) -> PreparedJob:
    """All checks, before Ray or any worker starts; picks or creates the job record."""
    stages = sorted(set(int(s) for s in stages))
    if not stages or any(s not in (1, 2) for s in stages):
        raise TrainSetupError(f"stages must be 1, 2 or 1,2; got {stages}")
    _check_train_config(cfg)
    data = Path(data_dir).expanduser().resolve()
    if not data.is_dir():
        raise TrainSetupError(f"--data {data}: no such directory")
    per_epoch = {s: steps_per_epoch(cfg, data, s) for s in stages}
    # Tiny preset: materialise the weights here, never in a DDP worker (transformers'
    # save_pretrained writes nothing on a rank other than 0 once torch.distributed is up).

    resolve_weights(cfg.weights)
    root = storage_root(cfg)
    if resume:
        name = job_name or ((root / LATEST_FILE).read_text().strip() if (root / LATEST_FILE).is_file() else None)
        if not name or not (root / name / JOB_FILE).is_file():
            raise TrainSetupError(f"--resume: no job {'named ' + name if name else ''} to resume under {root}")
        record = JobRecord.load(root / name)
    else:
        name = job_name or time.strftime("loopy-%Y%m%d-%H%M%S")
        if (root / name / JOB_FILE).is_file():
            raise TrainSetupError(f"job {name} already exists under {root}: use --resume or another --job-name")
        record = JobRecord(name=name)
    job_dir = root / name
    if 2 in stages and 1 not in stages:
        done1 = record.stages.get("1")
        init_from = init_from or (done1.model_uri if done1 and done1.done else None)
        if init_from is None:
            version = latest_version(cfg.tracking.registered_model, 1, resolve_tracking_uri(cfg.tracking.tracking_uri))
            if version is None:
                raise TrainSetupError(
                    f"stage 2 needs a stage-1 model: none registered as '{cfg.tracking.registered_model}' "
                    f"(alias stage1) in {cfg.tracking.tracking_uri}; run --stage 1 first or pass "
                    f"--init-from PATH|models:/NAME/VERSION")
            init_from = f"models:/{cfg.tracking.registered_model}/{version}"
        check_stage1_package(init_from, cfg, job_dir / "init_check")
    return PreparedJob(cfg, data, stages, record, job_dir, per_epoch, init_from)


def _scaling(cfg: PlatformConfig):
    from ray.train import ScalingConfig

    tc = cfg.train
    resources = {"CPU": tc.cpus_per_worker}
    if tc.use_gpu:
        resources["GPU"] = tc.gpus_per_worker
    return ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=resources)


def _ray_dataset(cfg: PlatformConfig, data_dir: Path, per_epoch: int):
    """The reader's Ray Dataset over as many epochs as ``max_steps`` needs (one pass)."""
    epochs = math.ceil(cfg.train.max_steps / per_epoch)
    parts = [build_ray_dataset(data_dir, cfg.reader, "train", epoch=e, batch_size=cfg.train.batch_size)
             for e in range(epochs)]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def run_stage(prep: PreparedJob, stage: int, tracker: JobTracker, parent: RunLogger) -> StageRecord:
    """One Ray Train run for ``stage``, then its package logged and registered in MLflow."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    cfg = stage_config(prep.cfg, stage)
    rec = prep.record.stages.setdefault(str(stage), StageRecord())
    run = tracker.start_stage(parent, stage, cfg, prep.record.name, run_id=rec.run_id)
    if rec.run_id:  # a resumed stage: a previous NaN stop is history, not this attempt's outcome
        old_tags = tracker.client.get_run(run.run_id).data.tags
        if "loopy.nan_stop" in old_tags:
            run.set_tags({"loopy.previous_nan_stop": old_tags["loopy.nan_stop"]})
            tracker.client.delete_tag(run.run_id, "loopy.nan_stop")
    rec.run_id = run.run_id
    prep.record.save(prep.job_dir)
    init_from = None
    if stage == 2:
        init_from = prep.record.stages["1"].model_uri if "1" in prep.record.stages else prep.init_from
        run.set_tags({"loopy.init_from": init_from})
    work_dir = prep.job_dir / f"stage{stage}_work"
    work_dir.mkdir(parents=True, exist_ok=True)
    job = StageJob(cfg=cfg, stage=stage, data_dir=str(prep.data_dir), steps_per_epoch=prep.steps_per_epoch[stage],
                   init_from=init_from, run=run, work_dir=str(work_dir))
    datasets, dataset_config = None, None
    if cfg.train.data_loader == "ray_data":
        datasets = {"train": _ray_dataset(cfg, prep.data_dir, prep.steps_per_epoch[stage])}
        # preserve_order makes the blocks, and so each worker's shard, the same in every run:
        # a resumed run that skips the batches already trained on sees exactly the rest
        from ray.data import ExecutionOptions
        from ray.train import DataConfig

        dataset_config = DataConfig(execution_options=ExecutionOptions(preserve_order=True),
                                    enable_shard_locality=False)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=_scaling(cfg),
        run_config=RunConfig(
            name=f"stage{stage}", storage_path=str(prep.job_dir),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
        ),
        datasets=datasets,
        dataset_config=dataset_config,
    )
    try:
        result = trainer.fit()
    except Exception:
        run.end("FAILED")
        raise
    # A NaN stop ends the workers without a new checkpoint (Ray Train's result then shows the last
    # checkpoint's metrics), so the workers' MLflow tag is the signal.
    tags = tracker.client.get_run(run.run_id).data.tags
    if "loopy.nan_stop" in tags or "nan_step" in (result.metrics or {}):
        run.end("FAILED")
        step = tags.get("loopy.nan_stop") or (result.metrics or {}).get("nan_step")
        raise TrainingStoppedError(f"stage {stage} stopped: non-finite loss at step {step}; "
                                   f"{tags.get('loopy.nan', 'see nan_report_rank*.json in MLflow run ' + run.run_id)}")
    if result.checkpoint is None:
        run.end("FAILED")
        raise StageResultError(f"stage {stage}: Ray Train returned no checkpoint")
    package = prep.job_dir / f"stage{stage}_package"
    with result.checkpoint.as_directory() as folder:
        final = Path(folder) / FINAL_MODEL_DIR
        if not final.is_dir():
            run.end("FAILED")
            raise StageResultError(f"stage {stage}: the last checkpoint {folder} holds no final model ({FINAL_MODEL_DIR}/)")
        write_model_package(package, final, cfg, resolve_weights(cfg.weights))
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    version = log_model_package(package, cfg.tracking.registered_model, stage, run_id=run.run_id, tracking_uri=uri,
                                tags={"job": prep.record.name, "steps": cfg.train.max_steps})
    rec.version = version
    rec.model_uri = f"models:/{cfg.tracking.registered_model}/{version}"
    rec.package_dir = str(package)
    rec.done = True
    run.set_tags({"loopy.registered_version": version, "loopy.model_uri": rec.model_uri})
    run.end("FINISHED")
    prep.record.save(prep.job_dir)
    return rec


def run_job(prep: PreparedJob) -> JobRecord:
    """Run the job's stages in order (stages already done in a resumed job are skipped)."""
    tracker = JobTracker(prep.cfg.tracking)
    parent = tracker.start_job(prep.record.name, prep.cfg, parent_run_id=prep.record.parent_run_id)
    prep.record.parent_run_id = parent.run_id
    prep.record.save(prep.job_dir)
    (prep.job_dir.parent / LATEST_FILE).write_text(prep.record.name)
    parent.set_tags({"loopy.stages": ",".join(map(str, prep.stages)), "loopy.data": str(prep.data_dir)})
    init_ray(prep.cfg.ray)
    try:
        for stage in prep.stages:
            rec = prep.record.stages.get(str(stage))
            if rec is not None and rec.done:
                log.info("stage %d already done in job %s (%s)", stage, prep.record.name, rec.model_uri)
                continue
            run_stage(prep, stage, tracker, parent)
    except BaseException:
        parent.end("FAILED")
        raise
    parent.end("FINISHED")
    return prep.record
