"""MLflow tracking for training jobs: one parent run per job, one child run per stage.

Everything goes through :class:`mlflow.tracking.MlflowClient` with explicit run ids (no global
"active run"), so the driver (run bookkeeping, registered models) and the rank-0 worker (metrics,
artifacts at evaluation) write to the same runs from different processes.

Embedded default: ``sqlite:///mlflow.db`` under the project folder, artifacts in ``mlruns/``
beside it (``make mlflow-ui`` opens it on 127.0.0.1). Relative sqlite paths and artifact roots are
resolved against the project root.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from core.config import flatten
from core.paths import resolve_artifact_root, resolve_tracking_uri
from core.sections import TrackingConfig

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "loopy.stage"
JOB_TAG = "loopy.job"
MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value


def client_for(cfg: TrackingConfig):
    """An :class:`MlflowClient` on the configured tracking URI (registry on the same store)."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(cfg.tracking_uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(cfg: TrackingConfig) -> str:
    """Id of ``cfg.experiment`` (created with its artifacts under ``cfg.artifact_root``)."""
    client = client_for(cfg)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(cfg.experiment, artifact_location=resolve_artifact_root(cfg.artifact_root))


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


@dataclass
class RunLogger:
    """Writes to one existing MLflow run (picklable: safe to hand to Ray workers)."""

    tracking: TrackingConfig
    run_id: str

    def _client(self):
        if getattr(self, "_cached", None) is None:
            self._cached = client_for(self.tracking)
        return self._cached

    def __getstate__(self):
        return {"tracking": self.tracking, "run_id": self.run_id}

    def __setstate__(self, state):
        self.tracking = state["tracking"]
        self.run_id = state["run_id"]
        self._cached = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; ones already logged (a resumed run) are skipped, not re-written."""
        from mlflow.entities import Param

        existing = self._client().get_run(self.run_id).data.params
        items = [Param(k, _param_value(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self._client().log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log finite numeric metrics at ``step`` (NaN/inf values are dropped, not stored)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, int(step))
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))
        ]
        if items:
            self._client().log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self._client().set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._client().log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client().log_artifact(self.run_id, str(path), artifact_path)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self._client().get_metric_history(self.run_id, key)]

    def end(self, status: str = "FINISHED") -> None:
        self._client().set_terminated(self.run_id, status=status)


class JobTracker:
    """Driver side: the job's parent run and its stage child runs."""

    def __init__(self, cfg: TrackingConfig):
        self.cfg = cfg
        self.client = client_for(cfg)
        self.experiment_id = ensure_experiment(cfg)

    def start_job(self, job_name: str, config: Any, parent_run_id: Optional[str] = None) -> RunLogger:
        """The job's parent run (``parent_run_id`` reopens a resumed job's run) with the full
        resolved config as params (``core.config.flatten``)."""
        if parent_run_id:
            self.client.update_run(parent_run_id, status="RUNNING")
            run_id = parent_run_id
        else:
            run = self.client.create_run(self.experiment_id, run_name=job_name, tags={JOB_TAG: job_name})
            run_id = run.info.run_id
        logger = RunLogger(self.cfg, run_id)
        logger.log_params(flatten(config))
        return logger

    def start_stage(self, parent: RunLogger, stage: int, config: Any, job_name: str,
                    run_id: Optional[str] = None) -> RunLogger:
        """Child run of ``parent`` for one stage (``run_id`` reopens a resumed stage's run)."""
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id, run_name=f"{job_name}-stage{stage}",
                tags={PARENT_TAG: parent.run_id, STAGE_TAG: str(stage), JOB_TAG: job_name},
            )
            run_id = run.info.run_id
        logger = RunLogger(self.cfg, run_id)
        logger.log_params(flatten(config))
        return logger

    def child_runs(self, parent_run_id: str):
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
        )


def gpu_memory_metrics() -> dict[str, float]:
    """Peak / current CUDA memory of this process in MiB (empty without a GPU)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return {}
    if not torch.cuda.is_available():
        return {}
    mib = 1024.0 * 1024.0
    return {
        "gpu_mem_allocated_mib": torch.cuda.memory_allocated() / mib,
        "gpu_mem_peak_mib": torch.cuda.max_memory_allocated() / mib,
    }


def set_process_tracking_uri(cfg: TrackingConfig) -> None:
    """Point this process's fluent ``mlflow`` API (and its registry) at the configured store."""
    import mlflow

    uri = resolve_tracking_uri(cfg.tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
