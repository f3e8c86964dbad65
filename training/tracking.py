"""MLflow tracking for training jobs: one parent run per job, one child run per stage.

Everything goes through :class:`mlflow.tracking.MlflowClient` with explicit run ids (no global
"active run"), so the driver (run bookkeeping, registered models) and the rank-0 worker (metrics,
artifacts at evaluation) write to the same runs from different processes.

Embedded default: ``sqlite:///mlflow.db`` under the project folder, artifacts in ``mlruns/``
beside it (``make mlflow-ui`` opens it on 127.0.0.1). Relative sqlite paths and artifact roots are
resolved against the project root.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from core.config import flatten
from core.paths import resolve_tracking_uri
from core.run_logging import (
    INGEST_RUN_FILE,
    JOB_TAG,
    PARENT_TAG,
    STAGE_TAG,
    RunLogger,
    client_for,
    ensure_experiment,
)
from core.sections import TrackingConfig
from core.storage import as_location

log = logging.getLogger(__name__)


class AsyncRunLogger:
    """Non-blocking writer to one MLflow run, for training workers.

    Calls (metrics, tags, artifacts) go into a bounded queue and return at once; a daemon thread
    writes them in order through the wrapped :class:`RunLogger`. A failed write (tracking server
    down) is retried with exponential backoff (``retry_wait_s`` doubling up to 30 s) for up to
    ``retry_for_s`` seconds, then dropped with a warning; while it retries, new calls queue up,
    and once ``queue_size`` calls are waiting new ones are dropped (counted, warned). Nothing here
    raises into training. Hand-written (one small thread): the policy for a long outage, bounded
    memory and never an exception into the training loop, has to be ours.
    """

    def __init__(self, run: RunLogger, queue_size: int = 1000, retry_for_s: float = 600.0,
                 retry_wait_s: float = 0.5):
        self.run = run
        self.retry_for_s, self.retry_wait_s = float(retry_for_s), float(retry_wait_s)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
        self.dropped = 0  # calls dropped (queue full or retries spent)
        self.failures = 0  # failed write attempts
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=f"mlflow-{run.run_id[:8]}", daemon=True)
        self._thread.start()

    @property
    def run_id(self) -> str:
        return self.run.run_id

    # --- the calls (same names as RunLogger's) --------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._put(self.run.log_metrics, dict(metrics), int(step))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._put(self.run.set_tags, dict(tags))

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        """``path`` must stay until the write is done (:meth:`flush`)."""
        self._put(self.run.log_artifact, as_location(path), artifact_path)

    def _put(self, fn: Callable, *args) -> None:
        if self._closed:
            return
        try:
            self._queue.put_nowait((fn, args, time.monotonic()))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("MLflow logging queue full (%d waiting): dropped %d call(s) so far for run %s",
                            self._queue.maxsize, self.dropped, self.run.run_id)

    # --- the writer thread ------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            finally:
                self._queue.task_done()

    def _write(self, fn: Callable, args: tuple, queued_at: float) -> None:
        wait = self.retry_wait_s
        while True:
            try:
                fn(*args)
                return
            except Exception as exc:  # noqa: BLE001 - any tracking failure is retried, then dropped
                self.failures += 1
                if time.monotonic() - queued_at + wait > self.retry_for_s:
                    self.dropped += 1
                    log.warning("MLflow write %s to run %s dropped after %.0f s of retries: %s",
                                getattr(fn, "__name__", fn), self.run.run_id, time.monotonic() - queued_at, exc)
                    return
                if self.failures == 1 or self.failures % 20 == 0:
                    log.warning("MLflow write %s failed (%s); retrying for up to %.0f s",
                                getattr(fn, "__name__", fn), exc, self.retry_for_s)
                time.sleep(wait)
                wait = min(2.0 * wait, 30.0)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait up to ``timeout_s`` for the queued calls; False (and a warning) when some remain."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._queue.unfinished_tasks:
            log.warning("MLflow logging: %d call(s) for run %s still pending after %.0f s",
                        self._queue.unfinished_tasks, self.run.run_id, timeout_s)
            return False
        return True

    def close(self, timeout_s: float = 30.0) -> bool:
        """:meth:`flush`, then stop the thread (calls after this are ignored)."""
        done = self.flush(timeout_s)
        self._closed = True
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        return done


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

    def log_dataset_input(self, run_id: str, data_dir: str | Path, context: str = "training") -> dict[str, str]:
        """Log the ingest output ``data_dir`` as an input dataset of run ``run_id``
        (``MlflowClient.log_inputs``). With ``<data_dir>/ingest_run.json`` (the ingest job's MLflow
        run) the dataset is named after that run and its digest is the ingest's fingerprint, with
        the ingest run id as an input tag; otherwise the digest hashes ``videos.parquet``.
        Returns the dataset's name, digest and source."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        data = as_location(data_dir)
        tags = {"mlflow.data.context": context}
        info_file = data / INGEST_RUN_FILE
        info = json.loads(info_file.read_text()) if info_file.is_file() else None
        if info:
            digest = str(info.get("fingerprint") or info.get("run_id"))
            name = f"ingest-{str(info.get('run_id', ''))[:8]}"
            tags.update({"loopy.ingest_run_id": str(info.get("run_id", "")),
                         "loopy.ingest_tracking_uri": str(info.get("tracking_uri", "")),
                         "loopy.ingest_experiment": str(info.get("experiment", ""))})
        else:
            manifest = data / "videos.parquet"
            digest = _file_digest(manifest) if manifest.is_file() else "unknown"
            name = data.name
        dataset = MetaDataset(source=resolve_dataset_source(str(data)), name=name, digest=digest[:36])
        entity = dataset._to_mlflow_entity()
        self.client.log_inputs(run_id, datasets=[DatasetInput(
            dataset=entity, tags=[InputTag(key=k, value=v) for k, v in tags.items()])])
        return {"name": entity.name, "digest": entity.digest, "source": entity.source}

    def child_runs(self, parent_run_id: str):
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'"
        )


def _file_digest(path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
