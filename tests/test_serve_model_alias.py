"""The worker serves a registry alias pinned to a version, follows the alias when it moves, and
takes a new model through its Serve ``user_config`` (``reconfigure``) without a restart."""
from __future__ import annotations

import time

import pytest

from serve.model_source import is_alias, resolve_model


@pytest.fixture()
def registry(tmp_path, tiny_package):
    """A throw-away MLflow registry (SQLite + local artifacts) with the tiny package as versions
    1 and 2 of ``loopy``; the alias ``stage2`` points at version 1."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("serve_alias", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_registered_model("loopy")
    for _ in range(2):
        run = client.create_run(experiment)
        client.log_artifacts(run.info.run_id, str(tiny_package), "package")
        client.create_model_version("loopy", f"{run.info.artifact_uri}/package", run_id=run.info.run_id)
        client.set_terminated(run.info.run_id)
    client.set_registered_model_alias("loopy", "stage2", "1")
    previous = mlflow.get_tracking_uri()
    yield uri, client
    mlflow.set_tracking_uri(previous)


def test_alias_is_pinned_and_followed_and_user_config_swaps_the_model(registry):
    from serve.app import LoopyWorker

    uri, client = registry
    assert is_alias("models:/loopy@stage2") and not is_alias("models:/loopy/2")
    assert resolve_model("models:/loopy@stage2", uri).uri == "models:/loopy/1"
    worker = LoopyWorker.func_or_class(uri, "cpu")  # the replica's class, without Serve
    worker.reconfigure({"model": "models:/loopy@stage2", "model_poll_s": 0.5})
    try:
        assert worker.model_info() == {"model": "models:/loopy@stage2", "version": "loopy/1"}
        first = worker.sampler
        worker.check_health()
        client.set_registered_model_alias("loopy", "stage2", "2")  # training registered a new version
        deadline = time.monotonic() + 120
        while worker.version != "loopy/2":
            assert time.monotonic() < deadline, "the worker did not follow the alias"
            time.sleep(0.2)
        assert worker.sampler is not first
        # an operator pins a version through user_config: applied in place by reconfigure
        worker.reconfigure({"model": "models:/loopy/1", "model_poll_s": 0.5})
        assert worker.model_info() == {"model": "models:/loopy/1", "version": "loopy/1"}
        assert worker._poller is None  # a pinned version is not polled
        again = worker.sampler
        assert worker.refresh_model() is False and worker.sampler is again  # same version: no reload
    finally:
        worker._poll_stop.set()
