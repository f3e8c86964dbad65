"""``train_loop_per_worker``: one stage of Loopy training inside a Ray Train DDP worker.

Per worker: build the model (stage 1 from the SD U-Net, stage 2 from a stage-1 package), wrap
it in DDP (``ray.train.torch.prepare_model``: gloo on CPU, NCCL on GPU), AdamW over
``LoopyModel.trainable_parameters()`` with linear warm-up then constant LR, optional EMA; restore
the latest checkpoint when Ray Train hands one over (``--resume`` or a worker failure); then
step until ``train.max_steps``:

* data: ``train.data_loader == "ray_data"``: the reader's Ray Dataset shard of this worker
  (``get_dataset_shard("train")``, all epochs in one pass, position = batches consumed);
  ``"torch"``: the reader's ``LoopyTorchDataset`` of (epoch, rank), position = (epoch, batch);
* every ``checkpoint_every`` steps (and the last): ``ray.train.report(metrics, checkpoint)``;
* every ``log_every`` steps: metrics to Ray Train and (rank 0) to the stage's MLflow run:
  ``loss`` (mean over ranks), ``lr``, ``grad_norm``, ``samples_per_s``, ``data_wait_share``,
  GPU memory when present; rank 0 also prints ``[train] stage S step N/T loss L``;
* every ``eval_every`` steps (and the last), rank 0: validation loss on the test split, the loss
  plot and a sample video as MLflow artifacts (``training/evaluation.py``);
* a non-finite loss: every rank stops at that step (see ``training/step.py``) and returns
  without a new checkpoint; the offending rank's batch provenance goes to the MLflow run (tags
  ``loopy.nan_stop`` / ``loopy.nan`` + ``nan_report_rank<r>.json``); the driver turns that into
  an error (``--resume`` would continue from the last good checkpoint).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from core.paths import resolve_tracking_uri
from core.weights import resolve_weights
from inference.video_io import write_video
from models.loopy import LoopyModel
from models.registry import resolve_model_location, write_model_package
from pipelines.face_detect import make_detector
from pipelines.reader import LoopyTorchDataset, collate, to_torch_batch
from training.checkpointing import TrainState, load_checkpoint, save_checkpoint, unwrap
from training.evaluation import generate_sample, load_test_batches, motion_statistics, plot_losses, validation_loss
from training.step import NonFiniteLossError, make_noise_scheduler, train_step, trainable
from training.tracking import RunLogger, gpu_memory_metrics

log = logging.getLogger(__name__)

# Rank 0 prints ``[train] stage S step N/T loss L`` every ``log_every`` steps (and the last): a
# stable line for consoles and log readers (``demo.py``), independent of Ray's own log format.
PROGRESS_PREFIX = "[train]"


@dataclass
class StageJob:
    """Everything a worker needs for one stage (pickled into ``train_loop_config``)."""

    cfg: object  # core.config.PlatformConfig with reader.stage == stage
    stage: int
    data_dir: str
    steps_per_epoch: int  # batches per rank per epoch (torch loader)
    init_from: Optional[str] = None  # stage 2: package folder or MLflow model URI of stage 1
    run: Optional[RunLogger] = None  # the stage's MLflow run (rank 0 logs to it)
    work_dir: str = ""  # per-stage folder on shared storage (fault-injection markers, temp packages)


def build_model(job: StageJob, device: torch.device):
    """Stage 1: ``LoopyModel.from_sd15`` on the configured U-Net; stage 2: ``from_stage1`` on the
    package ``job.init_from``. Seeded, so every rank builds the same weights."""
    cfg = job.cfg
    torch.manual_seed(cfg.train.seed)
    if job.stage == 1:
        paths = resolve_weights(cfg.weights)
        model = LoopyModel.from_sd15(paths.unet, cfg.model, cfg.reader, stage=1,
                                     local_files_only=paths.local_files_only)
    else:
        dst = Path(tempfile.mkdtemp(prefix="stage1_", dir=job.work_dir or None))
        pkg = resolve_model_location(job.init_from, dst_dir=dst,
                                     tracking_uri=resolve_tracking_uri(cfg.tracking.tracking_uri))
        stage1 = LoopyModel.from_pretrained(str(pkg / "loopy"))
        model = LoopyModel.from_stage1(stage1, cfg.model, cfg.reader)
    return model.to(device)


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
    """This worker's shard of the reader's Ray Dataset (all epochs), first ``skip`` batches skipped."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    it = shard.iter_torch_batches(batch_size=job.cfg.train.batch_size, collate_fn=to_torch_batch,
                                  drop_last=True)
    for i, batch in enumerate(it):
        if i >= skip:
            yield batch


def _maybe_inject_fault(job: StageJob, step: int, rank: int, batch: dict) -> None:
    """Test / drill hook, once per job: before step ``fault_at_step`` rank ``fault_rank`` exits
    (``fault_kind="exit"``, a killed worker) or its batch latents become NaN (``"nan"``)."""
    tc = job.cfg.train
    if tc.fault_at_step is None or rank != tc.fault_rank or step != tc.fault_at_step:
        return
    marker = Path(job.work_dir) / f"fault_injected_stage{job.stage}_step{step}_rank{rank}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(tc.fault_kind)
    log.warning("fault injection: rank %d, step %d: %s", rank, step, tc.fault_kind)
    if tc.fault_kind == "nan":
        batch["latents"] = torch.full_like(batch["latents"], float("nan"))
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


def _report_nan(job: StageJob, rank: int, err: NonFiniteLossError) -> None:
    """Log the stop to the stage's MLflow run: every rank sets the tag ``loopy.nan_stop`` (the
    step; the driver looks for it) and logs ``nan_report_rank<r>.json``; the rank whose own loss
    was non-finite also sets ``loopy.nan`` (step + batch provenance)."""
    log.error("rank %d: %s", rank, err)
    if job.run is None:
        return
    report = {"step": err.step, "what": err.what, "rank": rank, "provenance": err.provenance}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"nan_report_rank{rank}.json"
        path.write_text(json.dumps(report, indent=2))
        job.run.log_artifact(path)
    tags = {"loopy.nan_stop": err.step}
    if err.what.startswith("loss"):
        tags["loopy.nan"] = json.dumps(report)[:4000]
    job.run.set_tags(tags)


class _Evaluator:
    """Rank 0's evaluation: test batches loaded once, metrics + artifacts to MLflow."""

    def __init__(self, job: StageJob, noise_scheduler, device: torch.device):
        self.job, self.noise_scheduler, self.device = job, noise_scheduler, device
        tc = job.cfg.train
        self.batches = load_test_batches(job.data_dir, job.cfg.reader, tc.batch_size, tc.eval_max_batches)
        if not self.batches:
            log.warning("%s has no test-split samples: validation loss skipped", job.data_dir)

    def __call__(self, model: torch.nn.Module, ema, step: int) -> dict[str, float]:
        job, tc = self.job, self.job.cfg.train
        net = unwrap(model)
        if ema is not None:
            ema.store(trainable(net))
            ema.copy_to(trainable(net))
        try:
            metrics = validation_loss(net, self.batches, self.noise_scheduler, tc.eval_timesteps, tc.seed,
                                      self.device, tc.mixed_precision)
            if job.run is not None:
                job.run.log_metrics(metrics, step)
                with tempfile.TemporaryDirectory(dir=job.work_dir or None) as tmp:
                    series = {"loss": job.run.metric_history("loss"),
                              "val_loss": job.run.metric_history("val_loss")}
                    png = plot_losses(series, Path(tmp) / f"loss_step{step:06d}.png",
                                      title=f"stage {job.stage}, step {step}")
                    job.run.log_artifact(png, "eval")
                    metrics.update(self._sample(net, Path(tmp), step))
        finally:
            if ema is not None:
                ema.restore(trainable(net))
        return metrics

    def _sample(self, net, tmp: Path, step: int) -> dict[str, float]:
        """Stage 2: sample video of the first test clip (MLflow artifact) and its Glo / Exp."""
        tc = self.job.cfg.train
        if tc.eval_sample_steps <= 0 or not self.batches or self.job.stage != 2:
            return {}
        try:  # a failed preview never stops training; the traceback is in the worker log
            pkg = write_model_package(tmp / "package", net, self.job.cfg, resolve_weights(self.job.cfg.weights))
            frames = generate_sample(pkg, self.batches[0], tc.eval_sample_steps, seed=tc.seed)
            video = write_video(frames, tmp / f"sample_step{step:06d}.mp4", fps=self.job.cfg.ingest.fps,
                                audio_path=None)
            self.job.run.log_artifact(video, "eval")
            stats = motion_statistics(frames, self.batches[0]["landmarks"][0].numpy(), self._detector())
            self.job.run.log_metrics(stats, step)
            return stats
        except Exception:
            log.exception("sample video / motion statistics at step %d failed", step)
            return {}

    def _detector(self):
        if getattr(self, "_det", None) is None:
            ing = self.job.cfg.ingest
            self._det = make_detector(ing.detector, self.job.cfg.weights.dwpose_dir, ing.detect_max_side)
        return self._det


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; ``config["job"]`` is a :class:`StageJob`."""
    import ray.train
    import ray.train.torch
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    job: StageJob = config["job"]
    tc = job.cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    model = build_model(job, device)
    params = trainable(model)  # == LoopyModel.trainable_parameters(), in module order
    optimizer = torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.adam_betas), weight_decay=tc.weight_decay)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=tc.warmup_steps)
    ema = EMAModel(params, decay=tc.ema_decay) if tc.ema_decay else None
    noise_scheduler = make_noise_scheduler(tc)
    fp16_scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and tc.mixed_precision == "fp16" else None

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
    evaluator = _Evaluator(job, noise_scheduler, device) if rank == 0 else None
    if rank == 0 and job.run is not None and state.step == 0:
        job.run.set_tags({"loopy.world_size": world, "loopy.device": str(device)})

    global_batch = tc.batch_size * world
    ray_skip = state.step  # ray_data: one pass over all epochs; position = batches consumed
    while state.step < tc.max_steps:
        batches = _ray_batches(job, ray_skip) if tc.data_loader == "ray_data" else _torch_batches(job, state, rank, world)
        exhausted = True
        t_wait = time.perf_counter()
        for batch in batches:
            _maybe_inject_fault(job, state.step + 1, rank, batch)
            t_start = time.perf_counter()
            try:  # steps are numbered 1..max_steps (as in the metrics)
                res = train_step(model, batch, optimizer, lr_scheduler, noise_scheduler, tc, state.step + 1, rank,
                                 device, ema=ema, fp16_scaler=fp16_scaler)
            except NonFiniteLossError as err:
                _report_nan(job, rank, err)
                ray.train.report({"nan_step": err.step, "step": state.step})  # every rank: same step
                return
            t_end = time.perf_counter()
            state.step += 1
            state.batch_in_epoch += 1
            state.samples_seen += global_batch
            step_time = t_end - t_wait
            metrics = {
                "step": state.step,
                "epoch": state.epoch,
                "loss": _mean_over_ranks(res.loss, world),
                "lr": res.lr,
                "grad_norm": res.grad_norm,
                "samples_per_s": global_batch / max(step_time, 1e-9),
                "step_time_s": step_time,
                "data_wait_share": (t_start - t_wait) / max(step_time, 1e-9),
                **gpu_memory_metrics(),
            }
            last = state.step >= tc.max_steps
            if rank == 0 and (last or (tc.eval_every > 0 and state.step % tc.eval_every == 0)):
                metrics.update(evaluator(model, ema, state.step))
            if rank == 0 and (last or state.step % tc.log_every == 0):
                # one stable progress line per logged step (read by the demo's console; the
                # metrics themselves go to MLflow)
                print(f"{PROGRESS_PREFIX} stage {job.stage} step {state.step}/{tc.max_steps} "
                      f"loss {metrics['loss']:.6f}", flush=True)
                if job.run is not None:
                    job.run.log_metrics(metrics, state.step)
            if last or state.step % tc.checkpoint_every == 0:
                with tempfile.TemporaryDirectory(dir=job.work_dir or None) as tmp:
                    save_checkpoint(tmp, rank=rank, state=state, model=model, optimizer=optimizer,
                                    lr_scheduler=lr_scheduler, ema=ema, final=last)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            elif state.step % tc.log_every == 0:
                ray.train.report(metrics)
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
