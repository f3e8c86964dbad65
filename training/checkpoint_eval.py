"""Checkpoint evaluation as its own Ray task (Ray Train V2 validation), not inside the training loop.

The driver passes :class:`CheckpointEvaluator` to the trainer as ``ValidationConfig(fn=...)`` with
its own resources (``train.eval_num_cpus``, and ``train.eval_num_gpus`` on a GPU cluster); the
workers ask for an evaluation by ``ray.train.report(..., checkpoint=..., validation=True)`` at
``eval_every`` steps and at the last step, and go on training while it runs. Ray Train runs one
evaluation at a time and waits for the pending ones before ``fit()`` returns.

One evaluation, on the persisted checkpoint folder:

1. the network is rebuilt from ``model_config.json`` and ``model.pt`` (EMA weights when the run
   keeps an EMA), float32, on the task's device (CUDA when the task has a GPU);
2. validation loss on the test split (``training/evaluation.py``: fixed timesteps and noise, so
   values are comparable across steps) and the loss plot;
3. stage 2: the audio use (``val_audio_gain``: the mouth's prediction error with each clip's own
   audio against another clip's), a sample video of the first test clip and its Glo / Exp statistics; with
   ``train.eval_videos > 0`` the evaluation job's metrics (``evaluate_package``: psnr, ssim, lmd,
   sync, ...; logged as ``eval_<name>`` from its ``mean`` entry) on that many test videos;
4. metrics and artifacts go to the stage's MLflow run at the checkpoint's step; the metrics are
   also returned to Ray Train (attached to the checkpoint). A tracking outage is logged and
   skipped: an evaluation never fails the training run for it.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from core.run_logging import RunLogger
from core.weights import resolve_weights
from inference.video_io import write_video
from models.loopy import LoopyModel
from models.registry import write_model_package
from pipelines.faces.detect import make_detector
from training import evaluation
from training.checkpointing import MODEL_CONFIG_FILE, load_weights
from training.step import latent_loss_weights, make_noise_scheduler

log = logging.getLogger(__name__)


def model_from_checkpoint(folder: str | Path, use_ema: bool = True) -> tuple[LoopyModel, int]:
    """(float32 LoopyModel with the checkpoint's weights, its step) from a checkpoint folder."""
    folder = Path(folder)
    config = json.loads((folder / MODEL_CONFIG_FILE).read_text())
    net = LoopyModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    state = load_weights(folder, net, use_ema=use_ema)
    return net.float().eval(), state.step


@dataclass
class CheckpointEvaluator:
    """``ValidationConfig.fn``: ``evaluator(checkpoint) -> metrics`` in its own Ray task."""

    cfg: Any  # core.config.PlatformConfig of the stage
    stage: int
    data_dir: str
    run: Optional[RunLogger] = None

    def __call__(self, checkpoint, **_: Any) -> dict[str, float]:
        with checkpoint.as_directory() as folder:
            net, step = model_from_checkpoint(folder, use_ema=self.cfg.train.ema_decay is not None)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with tempfile.TemporaryDirectory(prefix="loopy_eval_") as tmp:
            metrics = self.evaluate(net.to(device), step, device, Path(tmp))
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}

    def evaluate(self, net: LoopyModel, step: int, device: torch.device, tmp: Path) -> dict[str, float]:
        tc = self.cfg.train
        batches = evaluation.load_test_batches(self.data_dir, self.cfg.reader, tc.batch_size, tc.eval_max_batches)
        if not batches:
            log.warning("%s has no test-split samples: validation loss skipped", self.data_dir)
        precision = tc.mixed_precision if device.type == "cuda" else "no"
        scheduler = make_noise_scheduler(tc)
        metrics = evaluation.validation_loss(net, batches, scheduler, tc.eval_timesteps, tc.seed,
                                             device, precision, latent_loss_weights(tc, self.cfg.weights))
        if self.stage == 2:
            metrics.update(evaluation.audio_use(net, batches, scheduler, tc.eval_timesteps, tc.seed,
                                                device, precision, tc.mouth_loss_margin))
        self._log(lambda run: run.log_metrics(metrics, step))
        self._log(lambda run: run.log_artifact(self._loss_plot(run, step, tmp), "eval"))
        if self.stage == 2 and batches:
            package = None
            if tc.eval_sample_steps > 0 or tc.eval_videos > 0:
                package = write_model_package(tmp / "package", net.cpu(), self.cfg, resolve_weights(self.cfg.weights))
            if tc.eval_sample_steps > 0:
                metrics.update(self._sample(package, batches[0], step, tmp))
            if tc.eval_videos > 0:
                metrics.update(self._evaluation_job(package, step, device))
        return metrics

    def _log(self, write) -> None:
        """One MLflow write to the stage run; failures (tracking outage) are logged, not raised."""
        if self.run is None:
            return
        try:
            write(self.run)
        except Exception:  # noqa: BLE001 - evaluation results stay in Ray Train's checkpoint metrics
            log.warning("checkpoint evaluation: MLflow write to run %s failed", self.run.run_id, exc_info=True)

    def _loss_plot(self, run: RunLogger, step: int, tmp: Path) -> Path:
        series = {"loss": run.metric_history("loss"), "val_loss": run.metric_history("val_loss")}
        return evaluation.plot_losses(series, tmp / f"loss_step{step:06d}.png",
                                      title=f"stage {self.stage}, step {step}")

    def _sample(self, package: Path, batch: dict, step: int, tmp: Path) -> dict[str, float]:
        """Sample video of the first test clip (MLflow artifact) and its Glo / Exp."""
        tc, ing = self.cfg.train, self.cfg.ingest
        try:  # a failed preview never fails the evaluation; the traceback is in the task log
            frames = evaluation.generate_sample(package, batch, tc.eval_sample_steps, seed=tc.seed)
            video = write_video(frames, tmp / f"sample_step{step:06d}.mp4", fps=ing.fps, audio_path=None)
            self._log(lambda run: run.log_artifact(video, "eval"))
            detector = make_detector(ing.detector, self.cfg.weights.dwpose_dir, ing.detect_max_side)
            stats = evaluation.motion_statistics(frames, batch["landmarks"][0].numpy(), detector)
        except Exception:  # noqa: BLE001
            log.exception("sample video / motion statistics at step %d failed", step)
            return {}
        self._log(lambda run: run.log_metrics(stats, step))
        return stats

    def _evaluation_job(self, package: Path, step: int, device: torch.device) -> dict[str, float]:
        """The evaluation job's metrics (``training.evaluation.evaluate_package``, its ``mean``) on
        the first ``train.eval_videos`` test videos; a failure is logged, never raised."""
        try:
            result = evaluation.evaluate_package(str(package), self.data_dir, split="test",
                                                 max_videos=self.cfg.train.eval_videos,
                                                 steps=self.cfg.train.eval_sample_steps or None, device=device.type)
        except Exception:  # noqa: BLE001 - e.g. an ingest output without frames to compare with
            log.exception("evaluation job metrics at step %d failed", step)
            return {}
        mean = {f"eval_{k}": v for k, v in (result.get("mean") or {}).items()
                if isinstance(v, (int, float)) and math.isfinite(v)}
        self._log(lambda run: run.log_metrics(mean, step))
        return mean
