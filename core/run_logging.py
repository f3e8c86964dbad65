"""MLflow run logging on the ground floor: the client, the experiment, and a logger for one run.

Every room that records a run uses these: the ingest job (``pipelines/ingest.py``: one run per
ingest), training (``training/tracking.py`` builds its parent / stage runs on them) and the
evaluation job. Everything goes through :class:`mlflow.tracking.MlflowClient` with explicit run
ids (no global "active run"), so several processes can write to one run. Relative sqlite paths
and artifact roots are resolved against the project root (:mod:`core.paths`).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from core.paths import resolve_artifact_root, resolve_tracking_uri
from core.sections import TrackingConfig
from core.storage import StoragePath, local_copy

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "loopy.stage"
JOB_TAG = "loopy.job"
MAX_PARAM_CHARS = 6000  # MLflow's limit on one param value
INGEST_RUN_FILE = "ingest_run.json"  # written by the ingest job: {"run_id", "tracking_uri", "experiment", "fingerprint"}

log = logging.getLogger(__name__)


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

    def log_artifact(self, path, artifact_path: Optional[str] = None) -> None:
        """Log a local file or folder, or one object of a bucket (``core.storage.StoragePath``:
        copied through a local temp file)."""
        if isinstance(path, StoragePath):
            with local_copy(path) as local:
                self._client().log_artifact(self.run_id, str(local), artifact_path)
            return
        path = Path(path)
        if path.is_dir():
            self._client().log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client().log_artifact(self.run_id, str(path), artifact_path)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self._client().get_metric_history(self.run_id, key)]

    def end(self, status: str = "FINISHED") -> None:
        self._client().set_terminated(self.run_id, status=status)

    def end_quietly(self, status: str) -> None:
        """:meth:`end` on an error path: a tracking outage is logged, never raised over the
        error that ended the run."""
        try:
            self.end(status)
        except Exception:  # noqa: BLE001 - the original error matters more than the bookkeeping
            log.warning("could not mark MLflow run %s %s (tracking store unreachable?)", self.run_id, status,
                        exc_info=True)


def configure_http_client(cfg: TrackingConfig) -> None:
    """Bound the MLflow REST client's own retries / timeout in this process (MLflow reads these
    environment variables at every request). Used in training workers, where
    :class:`AsyncRunLogger` does the retrying, so one call never blocks its thread for minutes."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(int(cfg.http_max_retries))
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(max(1, cfg.http_timeout_s)))
