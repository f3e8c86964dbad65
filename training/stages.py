"""Driver side of a training job: checks, one Ray Train run per stage, MLflow runs, packages.

A job trains stage 1, stage 2 or both (in that order). Layout under ``train.storage_path``::

    <storage>/latest_job                 name of the newest job (``--resume`` continues it)
    <storage>/<job>/job.json             JobRecord: MLflow parent run, per stage its run / version
    <storage>/<job>/stage<N>/            Ray Train run (``RunConfig(name=..., storage_path=...)``):
                                         checkpoints; re-running the same name resumes from the
                                         latest one (Ray Train restores its checkpoint manager)
    <storage>/<job>/stage<N>_package/    the stage's model package (models/registry.py)
    <storage>/<job>/stage<N>_work/       fault-injection markers, NaN-stop reports (nan_stop_rank<r>.json)

MLflow: the stage run is FINISHED only when its package is registered; any error leaves it (and
the job's parent run) FAILED, an interrupt (Ctrl-C, SIGTERM via ``train.py``) KILLED. Checkpoint
evaluation runs as Ray Train validation tasks (``training/checkpoint_eval.py``) beside the workers.
The training data (``videos.parquet`` / ``ingest_run.json``) is logged as an input of each stage run.

Every check that can fail without training (config values, the dataset, the stage-1 model a
stage-2 run starts from) runs in :func:`prepare_job` before any worker starts, and fails with one
:class:`TrainSetupError` naming the file, key or URI. :func:`run_job` then joins Ray and checks,
before any MLflow run or worker starts, that the workers (``train.placement``, per-worker
resources) and the reader's tasks fit the cluster's nodes at once (:func:`plan_placement`); a
placement the cluster cannot hold is one :class:`TrainSetupError` naming the resource and the
figures, never a placement group that waits forever (docs/TRAINING.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from core.atomic_files import write_text_atomic
from core.config import PlatformConfig
from core.paths import project_path, resolve_tracking_uri
from core.ray_runtime import bounded_state_read, init_ray
from core.run_logging import RunLogger
from core.storage import Location, StorageError, StoragePath, check_location, pyarrow_filesystem
from core.weights import resolve_weights
from inference.mlflow_model import (
    log_model_package,  # registers the package as a pyfunc model
)
from models.registry import (
    ModelPackageError,
    latest_version,
    resolve_model_location,
    write_model_package,
)
from pipelines.dataset.schema import IngestFormatError
from pipelines.reader.source import LoopySampleSource, load_spec_batch
from training.checkpoint_eval import CheckpointEvaluator
from training.checkpointing import FINAL_MODEL_DIR, STATE_FILE
from training.errors import (
    StageFailedError,
    StageResultError,
    TerminatedError,
    TrainingError,
)
from training.loop import (
    NAN_STOP_PREFIX,
    PROGRESS_PREFIX,
    StageJob,
    train_loop_per_worker,
)
from training.tracking import JobTracker

log = logging.getLogger(__name__)
JOB_FILE = "job.json"
LATEST_FILE = "latest_job"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints


def run_status(exc: BaseException) -> str:
    """MLflow status for a run ended by ``exc``: KILLED for an interrupt or SIGTERM, else FAILED."""
    return "KILLED" if isinstance(exc, (KeyboardInterrupt, TerminatedError)) else "FAILED"


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

    def save(self, folder: Location) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / JOB_FILE, json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, folder: Location) -> "JobRecord":
        data = json.loads((folder / JOB_FILE).read_text())
        return cls(name=data["name"], parent_run_id=data.get("parent_run_id"),
                   stages={k: StageRecord(**v) for k, v in data.get("stages", {}).items()})


def storage_root(cfg: PlatformConfig) -> Location:
    """``train.storage_path``: a bucket prefix (checked: scheme, credentials, bucket; raises
    :class:`TrainSetupError`), or a folder (relative: under the project root)."""
    try:
        loc = check_location(cfg.train.storage_path, "train.storage_path")
    except StorageError as exc:
        raise TrainSetupError(str(exc)) from None
    return loc if isinstance(loc, StoragePath) else project_path(loc).resolve()


def stage_config(cfg: PlatformConfig, stage: int) -> PlatformConfig:
    """``cfg`` with ``reader.stage`` set to ``stage`` (stage 1: one target frame, no motion/audio)
    and, in stage 1, ``train.max_steps`` from ``train.stage1_max_steps`` when that is set."""
    train = cfg.train
    if stage == 1 and train.stage1_max_steps is not None:
        train = dataclasses.replace(train, max_steps=int(train.stage1_max_steps))
    return dataclasses.replace(cfg, reader=dataclasses.replace(cfg.reader, stage=stage), train=train)


def _check_train_config(cfg: PlatformConfig) -> None:
    tc = cfg.train
    positive = ("num_workers", "batch_size", "max_steps", "checkpoint_every", "log_every", "checkpoints_to_keep",
                "block_rows", "fault_steps")
    for name in positive:
        if getattr(tc, name) < 1:
            raise TrainSetupError(f"train.{name} must be >= 1, got {getattr(tc, name)}")
    if tc.stage1_max_steps is not None and tc.stage1_max_steps < 1:
        raise TrainSetupError(f"train.stage1_max_steps must be >= 1 (or null: train.max_steps), got {tc.stage1_max_steps}")
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
    for name in ("cpus_per_worker", "reader_cpus", "eval_num_cpus"):
        if getattr(tc, name) < 0:
            raise TrainSetupError(f"train.{name} must be >= 0, got {getattr(tc, name)}")
    if tc.batch_timeout_s <= 0:
        raise TrainSetupError(f"train.batch_timeout_s must be > 0 seconds, got {tc.batch_timeout_s}")
    if tc.placement_retries < -1:
        raise TrainSetupError(f"train.placement_retries must be >= -1, got {tc.placement_retries}")
    if tc.use_gpu and (tc.gpus_per_worker < 1 or tc.gpus_per_worker != int(tc.gpus_per_worker)):
        # NCCL refuses two ranks of one process group on one device ("Duplicate GPU detected")
        raise TrainSetupError(f"train.gpus_per_worker={tc.gpus_per_worker}: a DDP worker needs whole GPUs of "
                              f"its own (NCCL runs one rank per GPU); use 1")


def steps_per_epoch(cfg: PlatformConfig, data_dir: Location, stage: int) -> int:
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


def check_stage1_package(location: str, cfg: PlatformConfig, dst: Location) -> None:
    """Fail unless ``location`` resolves to a package holding a stage-1 LoopyModel."""
    if isinstance(dst, StoragePath):  # a bucket job folder: the check's copy is local and temporary
        dst = Path(tempfile.mkdtemp(prefix="loopy_init_check_"))
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
    data_dir: Location
    stages: list[int]
    record: JobRecord
    job_dir: Location  # a folder, or a bucket prefix (train.storage_path=s3://...)
    steps_per_epoch: dict[int, int]
    init_from: Optional[str]  # stage-1 model for stage 2 when stage 1 is not part of the job


def prepare_job(cfg: PlatformConfig, data_dir: str | Path, stages: Sequence[int], resume: bool = False,
                init_from: Optional[str] = None, job_name: Optional[str] = None) -> PreparedJob:
    """All checks, before Ray or any worker starts; picks or creates the job record."""
    stages = sorted(set(int(s) for s in stages))
    if not stages or any(s not in (1, 2) for s in stages):
        raise TrainSetupError(f"stages must be 1, 2 or 1,2; got {stages}")
    _check_train_config(cfg)
    try:
        data = check_location(data_dir, "--data")  # a bucket URI: scheme, credentials, bucket (core/storage.py)
    except StorageError as exc:
        raise TrainSetupError(str(exc)) from None
    data = data.expanduser().resolve()
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


# train.placement -> Ray's placement group strategy (ScalingConfig.placement_strategy)
PLACEMENT_STRATEGIES = {"pack": "PACK", "spread": "SPREAD", "strict-spread": "STRICT_SPREAD"}
_EPS = 1e-6  # Ray's logical resources are fixed-point (1/10000): compare with a little slack


@dataclass(frozen=True)
class NodeShape:
    """One alive Ray node: its id, address and total logical resources (``ray.nodes()``)."""

    node_id: str
    address: str
    resources: dict


@dataclass
class PlacementPlan:
    """Where a stage's workers go (one node index per worker, in ``nodes`` order) and what each
    node has left for the reader's tasks and the checkpoint evaluation task."""

    placement: str  # pack | spread | strict-spread (``auto`` resolved)
    strategy: str  # Ray's name: PACK | SPREAD | STRICT_SPREAD
    worker: dict  # resources of one worker
    nodes: list
    worker_nodes: list
    left: list  # per node: resources left once the workers are placed

    def describe(self) -> str:
        used = sorted({self.nodes[i].address for i in self.worker_nodes})
        return (f"{len(self.worker_nodes)} workers ({_fmt(self.worker)} each), placement {self.placement} "
                f"({self.strategy}) -> {len(used)} node(s): {', '.join(used)}")


def _fmt(resources: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()))


def worker_resources(cfg: PlatformConfig) -> dict:
    """One DDP worker's reservation (``ScalingConfig.resources_per_worker``)."""
    tc = cfg.train
    resources = {"CPU": float(tc.cpus_per_worker)}
    if tc.use_gpu:
        resources["GPU"] = float(tc.gpus_per_worker)
    return resources


def cluster_nodes() -> list[NodeShape]:
    """The alive nodes of the connected Ray cluster with their total logical resources. Raises
    :class:`core.ray_runtime.RayStateTimeout` when Ray's state API does not answer (the job stops
    with that reason before any MLflow run, instead of waiting forever; a rerun resumes it)."""
    import ray

    nodes = bounded_state_read(ray.nodes, "the cluster's nodes")
    return [NodeShape(n["NodeID"], n.get("NodeManagerAddress", "?"), dict(n.get("Resources") or {}))
            for n in nodes if n.get("Alive")]


def resolve_placement(cfg: PlatformConfig, nodes: Sequence[NodeShape]) -> str:
    """``train.placement`` with ``auto`` resolved: CPU workers spread (each gets a node's cores
    to itself); GPU workers spread when every GPU node has one GPU, else pack (ranks of one node
    talk over NVLink / PCIe, not the network)."""
    tc = cfg.train
    if tc.placement != "auto":
        return tc.placement
    if not tc.use_gpu:
        return "spread"
    gpus = [n.resources.get("GPU", 0.0) for n in nodes if n.resources.get("GPU", 0.0) > 0]
    return "spread" if gpus and max(gpus) <= 1 else "pack"


def _fits(free: dict, need: dict) -> bool:
    return all(free.get(k, 0.0) + _EPS >= v for k, v in need.items() if v > 0)


def _take(free: dict, need: dict) -> None:
    for k, v in need.items():
        free[k] = free.get(k, 0.0) - v


def _nodes_text(nodes: Sequence[NodeShape], keys: Sequence[str], left: Optional[list] = None) -> str:
    parts = []
    for i, n in enumerate(nodes):
        total = ", ".join(f"{k} {n.resources.get(k, 0.0):g}" for k in keys)
        parts.append(f"{n.address} ({total}" + (f"; {_fmt({k: left[i].get(k, 0.0) for k in keys})} left"
                                                if left is not None else "") + ")")
    return "; ".join(parts)


def _short_resource(nodes: Sequence[NodeShape], need: dict, count: int) -> str:
    """The resource that keeps ``count`` reservations of ``need`` off the nodes, with its figures."""
    keys = sorted(k for k, v in need.items() if v > 0)
    for k in keys:
        total = sum(n.resources.get(k, 0.0) for n in nodes)
        if total <= 0:
            return f"no node has {k} (asked: {k} {need[k]:g} per worker)"
    for k in keys:
        per_node = sum(int((n.resources.get(k, 0.0) + _EPS) // need[k]) for n in nodes)
        if per_node < count:
            return (f"{k}: {count} x {need[k]:g} asked, the nodes hold {per_node} "
                    f"({k} {sum(n.resources.get(k, 0.0) for n in nodes):g} in all)")
    return "no node holds all of one worker's resources at once"


def plan_placement(cfg: PlatformConfig, nodes: Sequence[NodeShape]) -> PlacementPlan:
    """Where Ray will put the workers and whether the reader fits beside them, from the nodes'
    total resources; :class:`TrainSetupError` (one line, resource and figures) otherwise.

    Mirrors Ray's placement group strategies on the nodes' totals: ``strict-spread`` one worker
    per node (more workers than nodes that can hold one is refused), ``spread`` round-robin over
    the nodes that still fit one, ``pack`` as few nodes as possible (fullest first). With
    ``train.data_loader=ray_data`` one read task (``train.reader_cpus``) must fit on a node beside
    the workers: Ray Data's tasks are scheduled outside the workers' placement group, and a task no
    node can hold waits forever. Resources other jobs hold at the moment are not counted: Ray
    Train's start timeout (``train.placement_retries``) and ``train.batch_timeout_s`` cover those."""
    tc = cfg.train
    placement = resolve_placement(cfg, nodes)
    need = worker_resources(cfg)
    keys = sorted(need)
    n = tc.num_workers
    if not nodes:
        raise TrainSetupError("the Ray cluster has no alive node")
    if placement == "strict-spread" and n > len(nodes):
        raise TrainSetupError(f"train.placement=strict-spread puts each of train.num_workers={n} workers on a "
                              f"node of its own; the cluster has {len(nodes)} alive node(s): "
                              f"{_nodes_text(nodes, keys)}")
    free = [dict(node.resources) for node in nodes]
    on_node = [0] * len(nodes)
    assigned: list[int] = []
    for _ in range(n):
        if placement == "pack":  # stay on the node already used when it still fits, else the roomiest
            order = sorted(range(len(nodes)), key=lambda i: (-on_node[i], -free[i].get("GPU", 0.0),
                                                             -free[i].get("CPU", 0.0)))
        else:  # spread: the node with the fewest workers so far
            order = sorted(range(len(nodes)), key=lambda i: (on_node[i], -free[i].get("CPU", 0.0)))
        if placement == "strict-spread":
            order = [i for i in order if on_node[i] == 0]
        chosen = next((i for i in order if _fits(free[i], need)), None)
        if chosen is None:
            what = (f"{sum(1 for i in range(len(nodes)) if _fits(nodes[i].resources, need))} of "
                    f"{len(nodes)} nodes can hold one" if placement == "strict-spread"
                    else _short_resource(nodes, need, n))
            raise TrainSetupError(
                f"train.num_workers={n} workers of {_fmt(need)} each (train.cpus_per_worker"
                f"{', train.gpus_per_worker' if tc.use_gpu else ''}) do not fit the cluster with "
                f"train.placement={placement}: {what}; nodes: {_nodes_text(nodes, keys)}")
        _take(free[chosen], need)
        on_node[chosen] += 1
        assigned.append(chosen)
    plan = PlacementPlan(placement, PLACEMENT_STRATEGIES[placement], need, list(nodes), assigned, free)
    if tc.data_loader == "ray_data":
        reader = {"CPU": float(tc.reader_cpus)}
        if not any(_fits(f, reader) for f in free):
            best = max(f.get("CPU", 0.0) for f in free)
            raise TrainSetupError(
                f"the training data reader (train.data_loader=ray_data) needs CPU {tc.reader_cpus:g} per read "
                f"task (train.reader_cpus) beside the workers, but {n} workers of CPU {tc.cpus_per_worker:g} "
                f"with train.placement={placement} leave at most CPU {max(best, 0.0):g} free on any node "
                f"({_nodes_text(nodes, ['CPU'], free)}): lower train.cpus_per_worker or train.reader_cpus, "
                f"add a node, or use train.data_loader=torch (the workers read their own samples)")
    return plan


def evaluation_fits(cfg: PlatformConfig, plan: PlacementPlan) -> bool:
    """Whether the checkpoint evaluation task fits beside the workers and one read task."""
    res = _evaluation_resources(cfg)
    need = {"CPU": float(res["num_cpus"]), "GPU": float(res["num_gpus"])}
    reader = {"CPU": float(cfg.train.reader_cpus) if cfg.train.data_loader == "ray_data" else 0.0}
    for j, left in enumerate(plan.left):
        if not _fits(left, need):
            continue
        after = dict(left)
        _take(after, need)
        if any(_fits(after if i == j else f, reader) for i, f in enumerate(plan.left)):
            return True
    return False


def check_cluster(cfg: PlatformConfig) -> PlacementPlan:
    """The placement plan on the connected cluster (Ray must be up), printed as one line."""
    plan = plan_placement(cfg, cluster_nodes())
    print(f"{PROGRESS_PREFIX} {plan.describe()}", flush=True)
    if not evaluation_fits(cfg, plan):  # the last step always evaluates
        log.warning("the checkpoint evaluation task (train.eval_num_cpus=%g, train.eval_num_gpus=%g) does not "
                    "fit beside the workers and the reader: it waits until resources are free",
                    cfg.train.eval_num_cpus, cfg.train.eval_num_gpus if cfg.train.use_gpu else 0)
    return plan


def _scaling(cfg: PlatformConfig, placement: str):
    from ray.train import ScalingConfig

    tc = cfg.train
    return ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu, resources_per_worker=worker_resources(cfg),
                         placement_strategy=PLACEMENT_STRATEGIES[placement])


def plan_offset_steps(done_steps: int, batch_size: int, block_rows: int) -> int:
    """Steps whose samples a resumed ``ray_data`` run drops from the plan: whole rounds of blocks.

    Ray Train's split hands the blocks (``block_rows`` samples each, in plan order) to the worker
    with the fewest rows so far, i.e. round-robin, so rank r reads blocks r, r + W, r + 2W, ... A
    rank that trained ``done_steps`` batches has consumed whole blocks of the plan's first
    ``k = floor(done_steps * batch_size / L)`` rounds of L = lcm(block_rows, batch_size) samples
    per rank; dropping those rounds leaves every rank the same remaining sequence, and it skips the
    ``done_steps - offset`` batches left (fewer than L / batch_size) by reading them."""
    per_rank = math.lcm(block_rows, batch_size)
    return (done_steps * batch_size) // per_rank * per_rank // batch_size


def _ray_dataset(cfg: PlatformConfig, data_dir: Path, offset_steps: int):
    """The training plan (epochs 0, 1, ... of spec rows, as many as ``max_steps`` needs) minus the
    first ``offset_steps`` steps' rows, as a Ray Dataset of ``train.block_rows``-sample blocks
    whose samples are read in Ray Data tasks (``pipelines.reader.source.load_spec_batch``). The block
    count follows the plan length, not the batch size."""
    import ray.data

    tc = cfg.train
    world, bs, rows_per_block = tc.num_workers, tc.batch_size, tc.block_rows
    source = LoopySampleSource(data_dir, cfg.reader, "train")
    # rank r needs ceil((max_steps - offset) * B / R) of its blocks; the plan has W of them per round
    need = world * rows_per_block * math.ceil((tc.max_steps - offset_steps) * bs / rows_per_block)
    start = offset_steps * world * bs
    rows: list[dict] = []
    epoch = 0
    while len(rows) < start + need:
        specs = source.epoch_specs(epoch)
        if not specs:
            raise TrainSetupError(f"--data {data_dir}: no train samples")
        rows += [s.to_row() for s in specs]
        epoch += 1
    rows = rows[start:start + need]
    ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / rows_per_block))
    # num_cpus: Ray Data's default of 1 CPU a task is more than a node beside a worker may have
    # left (plan_placement checks train.reader_cpus fits)
    return ds.map_batches(load_spec_batch, batch_size=rows_per_block, batch_format="numpy", num_cpus=tc.reader_cpus,
                          fn_kwargs=dict(data_dir=str(data_dir), reader_cfg=dataclasses.asdict(cfg.reader),
                                         split="train"))


def resumed_step(run_dir: Path) -> int:
    """Step of the checkpoint Ray Train will resume ``run_dir`` from (its checkpoint manager's
    snapshot, then our ``state.json`` in that checkpoint); 0 for a new run (no snapshot yet, no
    warning) or an unreadable record (a warning)."""
    if not (run_dir / RAY_SNAPSHOT_FILE).exists():
        return 0
    try:
        snapshot = json.loads((run_dir / RAY_SNAPSHOT_FILE).read_text())
        name = (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
        if not name:
            return 0
        return int(json.loads((run_dir / name / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s: cannot read the latest checkpoint's step; the data plan starts at step 0", run_dir)
        return 0


def _nan_reports(work_dir: Location) -> list[dict]:
    reports = []
    for path in sorted(work_dir.glob(f"{NAN_STOP_PREFIX}*.json"), key=str):
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            reports.append({"step": None, "what": f"unreadable {path.name}"})
    return reports


def _archive_nan_reports(work_dir: Location) -> list[dict]:
    """A resumed stage: move the previous attempt's NaN-stop reports to ``nan_stop_history/``."""
    reports = _nan_reports(work_dir)
    if reports:
        history = work_dir / "nan_stop_history" / time.strftime("%Y%m%d-%H%M%S")
        history.mkdir(parents=True, exist_ok=True)
        for path in list(work_dir.glob(f"{NAN_STOP_PREFIX}*.json")):
            if isinstance(path, StoragePath):
                path.move_to(history / path.name)
            else:
                shutil.move(str(path), history / path.name)
    return reports


def _evaluation_resources(cfg: PlatformConfig) -> dict:
    tc = cfg.train
    return {"num_cpus": tc.eval_num_cpus, "num_gpus": tc.eval_num_gpus if tc.use_gpu else 0}


def run_stage(prep: PreparedJob, stage: int, tracker: JobTracker, parent: RunLogger,
              placement: str) -> StageRecord:
    """One Ray Train run for ``stage``, then its package logged and registered in MLflow. Any
    error leaves the stage run FAILED (KILLED for an interrupt) and is raised."""
    cfg = stage_config(prep.cfg, stage)
    rec = prep.record.stages.setdefault(str(stage), StageRecord())
    resumed = rec.run_id is not None
    run = tracker.start_stage(parent, stage, cfg, prep.record.name, run_id=rec.run_id)
    rec.run_id = run.run_id
    prep.record.save(prep.job_dir)
    try:
        return _run_stage(prep, stage, cfg, rec, run, tracker, resumed, placement)
    except BaseException as exc:
        run.end_quietly(run_status(exc))
        raise


def _run_stage(prep: PreparedJob, stage: int, cfg: PlatformConfig, rec: StageRecord, run: RunLogger,
               tracker: JobTracker, resumed: bool, placement: str) -> StageRecord:
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        RunConfig,
        TrainingFailedError,
        ValidationConfig,
    )
    from ray.train.torch import TorchTrainer

    work_dir = prep.job_dir / f"stage{stage}_work"
    work_dir.mkdir(parents=True, exist_ok=True)
    if resumed:  # a previous NaN stop is history, not this attempt's outcome
        previous = _archive_nan_reports(work_dir)
        old_tags = tracker.client.get_run(run.run_id).data.tags
        if previous or "loopy.nan_stop" in old_tags:
            run.set_tags({"loopy.previous_nan_stop": old_tags.get("loopy.nan_stop", previous[0].get("step"))})
        if "loopy.nan_stop" in old_tags:
            tracker.client.delete_tag(run.run_id, "loopy.nan_stop")
    else:
        try:
            tracker.log_dataset_input(run.run_id, prep.data_dir)
        except Exception:  # noqa: BLE001 - lineage is bookkeeping: never a reason not to train
            log.warning("could not log %s as an input of MLflow run %s", prep.data_dir, run.run_id, exc_info=True)
    init_from = None
    if stage == 2:
        init_from = prep.record.stages["1"].model_uri if "1" in prep.record.stages else prep.init_from
        run.set_tags({"loopy.init_from": init_from})
    run_dir = prep.job_dir / f"stage{stage}"
    offset = 0
    datasets, dataset_config = None, None
    if cfg.train.data_loader == "ray_data":
        offset = plan_offset_steps(resumed_step(run_dir), cfg.train.batch_size, cfg.train.block_rows)
        datasets = {"train": _ray_dataset(cfg, prep.data_dir, offset)}
        # preserve_order makes the blocks, and so each worker's shard, the same in every run:
        # a resumed run that drops / skips the batches already trained on sees exactly the rest
        from ray.data import ExecutionOptions

        dataset_config = DataConfig(execution_options=ExecutionOptions(preserve_order=True),
                                    enable_shard_locality=False)
    job = StageJob(cfg=cfg, stage=stage, data_dir=str(prep.data_dir), steps_per_epoch=prep.steps_per_epoch[stage],
                   init_from=init_from, run=run, work_dir=str(work_dir), plan_offset_steps=offset)
    # a bucket: Ray Train writes the checkpoints through the same pyarrow client (endpoint and
    # credentials from the environment, core/storage.py); a folder: no filesystem (local / shared)
    storage_fs, storage_path = pyarrow_filesystem(prep.job_dir)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=_scaling(cfg, placement),
        run_config=RunConfig(
            name=f"stage{stage}", storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures,
                                         controller_failure_limit=cfg.train.placement_retries),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
        ),
        datasets=datasets,
        dataset_config=dataset_config,
        validation_config=ValidationConfig(fn=CheckpointEvaluator(cfg, stage, str(prep.data_dir), run),
                                           ray_remote_kwargs=_evaluation_resources(cfg)),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:  # Ray's report is a long traceback per rank: one line first
        raise StageFailedError(f"stage {stage} failed: {failure_summary(exc)}") from exc
    # A NaN stop ends the workers without a new checkpoint (Ray Train's result then shows the last
    # checkpoint's metrics); the ranks' reports in the work folder are the signal.
    reports = _nan_reports(work_dir)
    if reports:
        run.set_tags({"loopy.nan_stop": reports[0].get("step")})
        worst = next((r for r in reports if r.get("offending")), reports[0])
        raise TrainingStoppedError(f"stage {stage} stopped: non-finite loss at step {worst.get('step')}; "
                                   f"{json.dumps(worst)[:4000]}")
    if result.checkpoint is None:
        raise StageResultError(f"stage {stage}: Ray Train returned no checkpoint")
    package = prep.job_dir / f"stage{stage}_package"
    with contextlib.ExitStack() as stack:
        # a bucket job folder: the package is built in a local temp folder, registered from there
        # and then copied under the job's prefix
        local_package = (Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loopy_package_"))) / "package"
                         if isinstance(package, StoragePath) else package)
        with result.checkpoint.as_directory() as folder:
            final = Path(folder) / FINAL_MODEL_DIR
            if not final.is_dir():
                raise StageResultError(f"stage {stage}: the last checkpoint {folder} holds no final model ({FINAL_MODEL_DIR}/)")
            write_model_package(local_package, final, cfg, resolve_weights(cfg.weights))
        uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
        version = log_model_package(local_package, cfg.tracking.registered_model, stage, run_id=run.run_id,
                                    tracking_uri=uri, tags={"job": prep.record.name, "steps": cfg.train.max_steps})
        if isinstance(package, StoragePath):
            package.upload_tree(local_package)
    rec.version = version
    rec.model_uri = f"models:/{cfg.tracking.registered_model}/{version}"
    rec.package_dir = str(package)
    rec.done = True
    run.set_tags({"loopy.registered_version": version, "loopy.model_uri": rec.model_uri})
    run.end("FINISHED")
    prep.record.save(prep.job_dir)
    return rec


def failure_summary(exc: BaseException) -> str:
    """One line per failed rank of Ray Train's error: the last line of each rank's traceback
    (``InputStalledError: rank 1: no training batch for ...``), or Ray's own message."""
    failures = getattr(exc, "worker_failures", None) or {}
    lines = []
    for rank, err in sorted(failures.items()):
        text = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        last = text[-1] if text else ""
        name = type(err).__name__
        if not last.startswith(name):
            last = f"{name}: {last}" if last else name
        lines.append(f"rank {rank}: {last}")
    if not lines:
        text = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        lines.append(text[-1] if text else type(exc).__name__)
    return "; ".join(lines)[:4000]


def run_job(prep: PreparedJob) -> JobRecord:
    """Join Ray and check the placement (before any MLflow run), then run the job's stages in
    order (stages already done in a resumed job are skipped)."""
    init_ray(prep.cfg.ray)
    plan = check_cluster(prep.cfg)
    tracker = JobTracker(prep.cfg.tracking)
    parent = tracker.start_job(prep.record.name, prep.cfg, parent_run_id=prep.record.parent_run_id)
    prep.record.parent_run_id = parent.run_id
    prep.record.save(prep.job_dir)
    write_text_atomic(prep.job_dir.parent / LATEST_FILE, prep.record.name)
    parent.set_tags({"loopy.stages": ",".join(map(str, prep.stages)), "loopy.data": str(prep.data_dir),
                     "loopy.placement": plan.placement})
    try:
        for stage in prep.stages:
            rec = prep.record.stages.get(str(stage))
            if rec is not None and rec.done:
                log.info("stage %d already done in job %s (%s)", stage, prep.record.name, rec.model_uri)
                continue
            run_stage(prep, stage, tracker, parent, plan.placement)
    except BaseException as exc:
        parent.end_quietly(run_status(exc))
        raise
    parent.end("FINISHED")
    return prep.record
