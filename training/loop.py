"""``train_loop_per_worker``: one stage of Loopy training inside a Ray Train DDP worker.

Per worker: build the model (stage 1 from the SD U-Net, stage 2 from a stage-1 package) in
float32 (master weights; ``train.mixed_precision`` autocasts the forward pass on GPU), wrap it in
DDP (``ray.train.torch.prepare_model``: gloo on CPU, NCCL on GPU), AdamW over
``LoopyModel.trainable_parameters()`` with linear warm-up then constant LR, optional EMA; restore
the latest checkpoint when Ray Train hands one over (``--resume`` or a worker failure); then
step until ``train.max_steps``:

* data: ``train.data_loader == "ray_data"``: the driver's Ray Dataset shard of this worker
  (``get_dataset_shard("train")``, all epochs in one pass, batches the driver already dropped
  from the plan on a resume are not read again; the few left are skipped);
  ``"torch"``: the reader's ``LoopyTorchDataset`` of (epoch, rank), position = (epoch, batch);
  either way each batch is awaited at most ``train.batch_timeout_s`` (:func:`watched_batches`):
  a starved or stuck input ends the worker with :class:`InputStalledError`, never a silent hang;
* every ``checkpoint_every`` / ``eval_every`` steps (and the last): the checkpoint is written to
  a local temp folder and ``ray.train.report(metrics, checkpoint, checkpoint_upload_mode=...)``
  uploads it (``train.checkpoint_upload``: sync, or async in a background thread); at ``eval_every`` steps and the last with
  ``validation=True``: Ray Train runs :class:`training.checkpoint_eval.CheckpointEvaluator` as its
  own task while the workers go on. ``ray.train.report`` is called only with checkpoints;
* every ``log_every`` steps (rank 0): metrics to the stage's MLflow run through
  :class:`training.tracking.AsyncRunLogger` (never blocks, never fails training): ``loss`` (mean
  over ranks), ``lr``, ``grad_norm``, ``samples_per_s``, ``data_wait_share``, GPU memory when
  present; rank 0 also writes ``[train] stage S step N/T loss L`` (once: straight to stdout,
  not through ``print``, which Ray Train copies into its logger as well), and at the start
  ``[train] stage S: DDP world size W on N node(s)`` from the process group and Ray's node ids;
* a non-finite loss on any rank: the ranks agree on it (``training/step.py``) and every rank
  stops at that step without a new checkpoint; each rank writes ``nan_stop_rank<r>.json`` to the
  stage's work folder (the driver's signal, independent of MLflow) and, best effort, tags
  ``loopy.nan_stop`` / ``loopy.nan`` + the report as an MLflow artifact; the driver turns that
  into an error (``--resume`` continues from the last good checkpoint).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import torch

from core.atomic_files import write_json_atomic
from core.paths import resolve_tracking_uri
from core.run_logging import RunLogger, client_for, configure_http_client
from core.storage import as_location, is_remote
from core.weights import resolve_weights
from models.loopy import LoopyModel
from models.registry import resolve_model_location
from pipelines.reader.source import LoopyTorchDataset, collate, ray_collate_fn
from training.checkpointing import TrainState, load_checkpoint, save_checkpoint
from training.errors import InputStalledError
from training.step import (
    NonFiniteLossError,
    latent_loss_weights,
    make_noise_scheduler,
    train_step,
    trainable,
)
from training.tracking import AsyncRunLogger, gpu_memory_metrics

log = logging.getLogger(__name__)

# Rank 0 prints ``[train] stage S step N/T loss L`` every ``log_every`` steps (and the last): a
# stable line for consoles and log readers (``demo.py``), independent of Ray's own log format.
PROGRESS_PREFIX = "[train]"
NAN_STOP_PREFIX = "nan_stop_rank"  # <work_dir>/nan_stop_rank<r>.json: the driver's NaN-stop signal
# fault_kind "mlflow_outage": the worker's MLflow client points here (nothing listens on the
# discard port of the loopback interface: every request fails with "connection refused")
DEAD_TRACKING_URI = "http://127.0.0.1:9"


@dataclass
class StageJob:
    """Everything a worker needs for one stage (pickled into ``train_loop_config``)."""

    cfg: object  # core.config.PlatformConfig with reader.stage == stage
    stage: int
    data_dir: str
    steps_per_epoch: int  # batches per rank per epoch (torch loader)
    init_from: Optional[str] = None  # stage 2: package folder or MLflow model URI of stage 1
    run: Optional[RunLogger] = None  # the stage's MLflow run (rank 0 logs to it)
    work_dir: str = ""  # per-stage folder on shared storage (fault-injection markers, NaN-stop reports)
    plan_offset_steps: int = 0  # ray_data: steps whose batches the driver dropped from the dataset plan


def build_model(job: StageJob, device: torch.device):
    """Stage 1: ``LoopyModel.from_sd15`` on the configured U-Net; stage 2: ``from_stage1`` on the
    package ``job.init_from``. Seeded, so every rank builds the same weights. Always float32
    (master weights): ``model.dtype`` is for inference, ``train.mixed_precision`` autocasts.

    With ``train.ema_decay`` stage 1's package holds its EMA weights
    (:func:`training.checkpointing.save_final_model`), so stage 2 starts from those: the stage-1
    model that was registered and evaluated, not the last, noisier raw step. Stage 2's own
    optimizer and EMA start fresh at these weights (its new temporal and audio modules have no
    stage-1 optimizer state to continue)."""
    cfg = job.cfg
    torch.manual_seed(cfg.train.seed)
    if job.stage == 1:
        paths = resolve_weights(cfg.weights)
        model = LoopyModel.from_sd15(paths.unet, cfg.model, cfg.reader, stage=1,
                                     local_files_only=paths.local_files_only)
    else:
        local_work = job.work_dir if job.work_dir and not is_remote(job.work_dir) else None
        dst = Path(tempfile.mkdtemp(prefix="stage1_", dir=local_work))
        pkg = resolve_model_location(job.init_from, dst_dir=dst,
                                     tracking_uri=resolve_tracking_uri(cfg.tracking.tracking_uri))
        stage1 = LoopyModel.from_pretrained(str(pkg / "loopy"))
        model = LoopyModel.from_stage1(stage1, cfg.model, cfg.reader)
    return model.to(device=device, dtype=torch.float32)


def _torch_batches(job: StageJob, state: TrainState, rank: int, world: int) -> Iterator[dict]:
    """Batches of ``state.epoch`` for this rank, from ``state.batch_in_epoch`` on."""
    cfg = job.cfg
    bs = cfg.train.batch_size
    ds = LoopyTorchDataset(job.data_dir, cfg.reader, "train", state.epoch, rank, world)
    first, last = state.batch_in_epoch * bs, job.steps_per_epoch * bs  # equal batch count on every rank
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(first, last)), batch_size=bs,
                                         shuffle=False, collate_fn=collate, num_workers=0)
    yield from loader


def _ray_batches(job: StageJob, skip: int) -> Iterator[dict]:
    """This worker's shard of the driver's Ray Dataset (all epochs), first ``skip`` batches skipped
    (fewer than one block's worth: the driver drops whole rounds of blocks from the plan)."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    it = shard.iter_torch_batches(batch_size=job.cfg.train.batch_size, collate_fn=ray_collate_fn(),
                                  drop_last=True)
    for i, batch in enumerate(it):
        if i >= skip:
            yield batch


def progress_line(text: str) -> None:
    """One ``[train]`` line on this process's stdout. Not ``print``: in a Ray Train worker
    ``print`` is patched to log through Train's logger and also to print when stdout is wrapped,
    which showed every line twice in the driver's output."""
    sys.stdout.write(f"{PROGRESS_PREFIX} {text}\n")
    sys.stdout.flush()


def watched_batches(batches: Iterable, timeout_s: float, stalled: Callable[[float], str],
                    device: Optional[torch.device] = None) -> Iterator:
    """``batches``, each ``next()`` run in a helper thread while this thread waits for it at most
    ``timeout_s`` seconds; longer raises :class:`InputStalledError` with ``stalled(timeout_s)``.

    Hand-written (a queue and a thread) because neither Ray Data's iterator nor torch's
    DataLoader (``num_workers=0``) has a timeout. The helper fetches only on request, so batches
    are read one at a time in the same order as without the watch (the RNG use, and so a resumed
    run, is unchanged); a stalled helper is left blocked (a daemon thread) and the worker ends."""
    it = iter(batches)
    requests: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()

    def pump() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)  # the current device is per thread
        while requests.get() is not None:
            try:
                results.put((True, next(it)))
            except StopIteration:
                results.put((False, None))
                return
            except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread as is
                results.put((None, exc))
                return

    threading.Thread(target=pump, name="loopy-batch-reader", daemon=True).start()
    try:
        while True:
            requests.put(True)
            try:
                ok, item = results.get(timeout=timeout_s)
            except queue.Empty:
                raise InputStalledError(stalled(timeout_s)) from None
            if ok is None:
                raise item
            if not ok:
                return
            yield item
    finally:
        requests.put(None)  # an idle helper exits; a blocked one stays blocked


def _stall_before(batches: Iterable, job: StageJob, rank: int, first_step: int) -> Iterator:
    """Fault ``stall``: the input blocks forever before the batch of step ``fault_at_step``
    (once per stage, like the other faults: a marker in the work folder)."""
    tc = job.cfg.train
    marker = as_location(job.work_dir) / f"fault_injected_stage{job.stage}_step{tc.fault_at_step}_rank{rank}"
    for i, batch in enumerate(batches):
        if first_step + i == tc.fault_at_step and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(tc.fault_kind)
            log.warning("fault injection: rank %d, step %d: stall", rank, first_step + i)
            threading.Event().wait()
        yield batch


def _maybe_inject_fault(job: StageJob, step: int, rank: int, batch: dict,
                        logger: Optional[AsyncRunLogger] = None) -> None:
    """Test / drill hook, once per stage (only in stage ``fault_stage`` when that is set; the
    marker file in the stage's work dir makes it once): before step ``fault_at_step`` rank ``fault_rank`` exits
    (``fault_kind="exit"``, a killed worker), its batch latents become NaN (``"nan"``), or its
    MLflow server becomes unreachable for ``fault_steps`` steps (``"mlflow_outage"``: the
    logger's client points at a dead loopback port, then back)."""
    tc = job.cfg.train
    if (tc.fault_at_step is None or rank != tc.fault_rank or tc.fault_stage not in (None, job.stage)
            or tc.fault_kind == "stall"):
        return
    marker = as_location(job.work_dir) / f"fault_injected_stage{job.stage}_step{tc.fault_at_step}_rank{rank}"
    if tc.fault_kind == "mlflow_outage" and step == tc.fault_at_step + tc.fault_steps and logger is not None:
        if marker.exists() and marker.read_text() == "mlflow_outage":
            logger.run._cached = None  # the next write opens a client on the real store again
            marker.write_text("mlflow_outage ended")
            log.warning("fault injection: rank %d, step %d: MLflow reachable again", rank, step)
        return
    if step != tc.fault_at_step or marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(tc.fault_kind)
    log.warning("fault injection: rank %d, step %d: %s", rank, step, tc.fault_kind)
    if tc.fault_kind == "nan":
        batch["latents"] = torch.full_like(batch["latents"], float("nan"))
    elif tc.fault_kind == "mlflow_outage":
        if logger is not None:
            logger.run._cached = client_for(type(job.cfg.tracking)(tracking_uri=DEAD_TRACKING_URI))
    else:
        os._exit(17)


def _mean_over_ranks(value: float, world: int) -> float:
    if world == 1 or not torch.distributed.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return float(t.item()) / world


def _report_nan(job: StageJob, rank: int, err: NonFiniteLossError, logger: Optional[AsyncRunLogger]) -> None:
    """Every rank writes ``nan_stop_rank<r>.json`` (step, what, batch provenance) to the work
    folder: the driver's signal. Rank 0 (the run's logger) also tags the MLflow run,
    best effort: ``loopy.nan_stop`` (the step), ``loopy.nan`` (the offending rank's report when it is
    rank 0) and the report as an artifact."""
    log.error("rank %d: %s", rank, err)
    report = {"step": err.step, "what": err.what, "rank": rank, "provenance": err.provenance,
              "offending": err.what.startswith("loss (")}
    path = as_location(job.work_dir) / f"{NAN_STOP_PREFIX}{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report, indent=2)
    if logger is not None:
        logger.log_artifact(path)
        tags = {"loopy.nan_stop": err.step}
        if report["offending"]:
            tags["loopy.nan"] = json.dumps(report)[:4000]
        logger.set_tags(tags)


def _make_logger(job: StageJob, rank: int) -> Optional[AsyncRunLogger]:
    if rank != 0 or job.run is None:
        return None
    tr = job.cfg.tracking
    configure_http_client(tr)
    return AsyncRunLogger(RunLogger(job.run.tracking, job.run.run_id), queue_size=tr.async_queue_size,
                          retry_for_s=tr.retry_for_s)


def _report_checkpoint(job: StageJob, rank: int, state: TrainState, model, optimizer, lr_scheduler, ema,
                       metrics: dict, final: bool, validate: bool) -> None:
    """Write this rank's part of the checkpoint to a local temp folder and hand it to Ray Train
    (uploaded to the run's storage; with ``train.checkpoint_upload: async`` in a background thread,
    and Ray deletes the local copy after the upload; with ``sync`` it is deleted here)."""
    import ray.train
    from ray.train import CheckpointUploadMode

    mode = CheckpointUploadMode.ASYNC if job.cfg.train.checkpoint_upload == "async" else CheckpointUploadMode.SYNC
    local = tempfile.mkdtemp(prefix=f"loopy_ckpt_s{job.stage}_{state.step:07d}_r{rank}_")
    try:
        save_checkpoint(local, rank=rank, state=state, model=model, optimizer=optimizer,
                        lr_scheduler=lr_scheduler, ema=ema, final=final)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local),
                         checkpoint_upload_mode=mode, validation=validate)
    finally:
        if mode == CheckpointUploadMode.SYNC:
            shutil.rmtree(local, ignore_errors=True)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; ``config["job"]`` is a :class:`StageJob`."""
    import ray.train
    import ray.train.torch
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    job: StageJob = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    logger = _make_logger(job, rank)
    try:
        _train(job, rank, world, device, logger, get_scheduler, EMAModel)
    finally:
        if logger is not None:
            logger.close(job.cfg.tracking.flush_timeout_s)


def _train(job: StageJob, rank: int, world: int, device: torch.device, logger: Optional[AsyncRunLogger],
           get_scheduler, EMAModel) -> None:
    import ray
    import ray.train
    import ray.train.torch

    tc = job.cfg.train
    model = build_model(job, device)
    params = trainable(model)  # == LoopyModel.trainable_parameters(), in module order
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=tc.warmup_steps)
    # diffusers' default EMA warm-up applies: decay min(ema_decay, (1 + t) / (10 + t)) at step t
    # (shadow = weights at step 1), so early steps are averaged over ~t / 9 steps, never the init.
    # foreach: one fused update over all tensors instead of a Python loop over ~560 of them (same
    # values; measured on the tiny stage-2 model, 1 thread: 7.5 ms a step instead of 14 ms)
    ema = EMAModel(params, decay=tc.ema_decay, foreach=True) if tc.ema_decay else None
    noise_scheduler = make_noise_scheduler(tc)
    channel_weights = latent_loss_weights(tc, job.cfg.weights)  # None: every latent channel alike
    # stage 1 has no audio: the mouth of its target frame is not predictable, so no extra weight
    mouth_weight = tc.mouth_loss_weight if job.stage == 2 else 0.0
    fp16_scaler: Union[torch.amp.GradScaler, None] = (
        torch.amp.GradScaler("cuda") if device.type == "cuda" and tc.mixed_precision == "fp16" else None)

    state = TrainState(stage=job.stage)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder, rank=rank, model=model, optimizer=optimizer,
                                    lr_scheduler=lr_scheduler, ema=ema, map_location=device)
        log.info("rank %d resumed stage %d at step %d", rank, job.stage, state.step)
    else:
        torch.manual_seed(tc.seed + 1000 * rank)  # dropout etc. differ per rank; noise is per-step seeded

    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={
        "find_unused_parameters": tc.find_unused_parameters})
    if ema is not None:
        ema.to(device)
    # the process group as it is (not the config): its size, and the Ray nodes its ranks run on
    ddp_world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    nodes = [None] * ddp_world
    node_id = ray.get_runtime_context().get_node_id()
    if ddp_world > 1:
        torch.distributed.all_gather_object(nodes, node_id)
    else:
        nodes = [node_id]
    if rank == 0:
        progress_line(f"stage {job.stage}: DDP world size {ddp_world} on {len(set(nodes))} node(s)")
    if logger is not None:
        logger.set_tags({"loopy.world_size": ddp_world, "loopy.ddp_nodes": len(set(nodes)),
                         "loopy.device": str(device)})

    global_batch = tc.batch_size * world
    ray_skip = state.step - job.plan_offset_steps  # ray_data: batches of this shard already trained on
    if tc.data_loader == "ray_data" and ray_skip < 0:
        raise RuntimeError(f"stage {job.stage}: checkpoint at step {state.step} is older than the data plan "
                           f"(starts after step {job.plan_offset_steps})")

    def stalled(timeout_s: float) -> str:
        return (f"no training batch for {timeout_s:g} s (train.batch_timeout_s) on rank {rank} before step "
                f"{state.step + 1} of stage {job.stage}; the input (train.data_loader={tc.data_loader}) is stalled: "
                f"its read tasks may have no CPU free to run on (train.reader_cpus, train.cpus_per_worker) "
                f"or its files may be unreachable")

    while state.step < tc.max_steps:
        batches = _ray_batches(job, ray_skip) if tc.data_loader == "ray_data" else _torch_batches(job, state, rank, world)
        if tc.fault_kind == "stall" and tc.fault_at_step is not None and rank == tc.fault_rank \
                and tc.fault_stage in (None, job.stage):
            batches = _stall_before(batches, job, rank, state.step + 1)
        batches = watched_batches(batches, tc.batch_timeout_s, stalled, device)
        exhausted = True
        t_wait = time.perf_counter()
        for batch in batches:
            _maybe_inject_fault(job, state.step + 1, rank, batch, logger)
            t_start = time.perf_counter()
            try:  # steps are numbered 1..max_steps (as in the metrics)
                res = train_step(model, batch, optimizer, lr_scheduler, noise_scheduler, tc, state.step + 1, rank,
                                 device, ema=ema, fp16_scaler=fp16_scaler, channel_weights=channel_weights,
                                 mouth_weight=mouth_weight)
            except NonFiniteLossError as err:  # every rank raises at the same step (agreed flag)
                _report_nan(job, rank, err, logger)
                return
            t_end = time.perf_counter()
            state.step += 1
            state.batch_in_epoch += 1
            state.samples_seen += global_batch
            step_time = t_end - t_wait
            last = state.step >= tc.max_steps
            log_now = last or state.step % tc.log_every == 0
            evaluate = last or (tc.eval_every > 0 and state.step % tc.eval_every == 0)
            checkpoint_now = last or evaluate or state.step % tc.checkpoint_every == 0
            metrics = {
                "step": state.step,
                "epoch": state.epoch,
                "loss": _mean_over_ranks(res.loss, world) if (log_now or checkpoint_now) else res.loss,
                "lr": res.lr,
                "grad_norm": res.grad_norm,
                "samples_per_s": global_batch / max(step_time, 1e-9),
                "step_time_s": step_time,
                "data_wait_share": (t_start - t_wait) / max(step_time, 1e-9),
                **gpu_memory_metrics(),
            }
            if rank == 0 and log_now:
                # one stable progress line per logged step (read by the demo's console; the
                # metrics themselves go to MLflow, asynchronously)
                progress_line(f"stage {job.stage} step {state.step}/{tc.max_steps} loss {metrics['loss']:.6f}")
                if logger is not None:
                    logger.log_metrics(metrics, state.step)
            if checkpoint_now:
                if evaluate and logger is not None:  # the evaluation's loss plot reads the logged curve
                    logger.flush(job.cfg.tracking.flush_timeout_s)
                _report_checkpoint(job, rank, state, model, optimizer, lr_scheduler, ema, metrics,
                                   final=last, validate=evaluate)
            if last:
                exhausted = False
                break
            t_wait = time.perf_counter()
        if state.step >= tc.max_steps:
            break
        if tc.data_loader == "ray_data":
            if exhausted:  # the dataset holds the epochs the driver planned: it ran out early
                log.warning("rank %d: Ray dataset exhausted at step %d < max_steps", rank, state.step)
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
