"""What a finished training job left in MLflow, read back: the model version a stage registered,
and each stage run's loss from its first to its last steps (the demo prints both)."""
from __future__ import annotations

from models.registry import latest_version
from training.errors import TrainingError


class NotRegisteredError(TrainingError, LookupError):
    """The training job registered no (new) model version; the message names the model and store."""


def registered_model_uri(tracking_uri: str, registered_name: str, stage: int, since_ms: int) -> str:
    """``models:/<name>/<version>`` of the version ``stage``'s alias (``stage<N>``) points at,
    checked to be created at or after ``since_ms`` (ms since the epoch: the job's start).
    Raises :class:`NotRegisteredError` when there is none, or only an older one."""
    from mlflow import MlflowClient

    version = latest_version(registered_name, stage, tracking_uri)
    if version is None:
        raise NotRegisteredError(f"no stage-{stage} version of registered model '{registered_name}' in {tracking_uri}")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    created = client.get_model_version(registered_name, str(version)).creation_timestamp
    if created < since_ms:
        raise NotRegisteredError(f"'{registered_name}' version {version} predates this run: training registered nothing")
    return f"models:/{registered_name}/{version}"


def loss_summaries(tracking_uri: str, experiment: str, since_ms: int) -> list[str]:
    """One line per run of ``experiment`` started at or after ``since_ms`` that logged a training
    ``loss``: its mean over the first and the last tenth of the steps, and its last ``val_loss``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    lines = []
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.start_time >= {since_ms}",
                              order_by=["attributes.start_time ASC"])
    for run in runs:
        history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
        if len(history) < 2:
            continue
        k = max(1, len(history) // 10)
        first = sum(m.value for m in history[:k]) / k
        last = sum(m.value for m in history[-k:]) / k
        line = (f"{run.info.run_name or run.info.run_id}: training loss {first:.4f} (first {k} steps) -> "
                f"{last:.4f} (last {k} steps) over {len(history)} steps")
        if "val_loss" in run.data.metrics:
            line += f"; val_loss {run.data.metrics['val_loss']:.4f}"
        lines.append(line)
    return lines
