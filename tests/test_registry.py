"""Model packages and the MLflow registry (sqlite in tmp_path; no server, no network)."""
from __future__ import annotations

from pathlib import Path

import pytest

from core.config import PlatformConfig
from core.sections import TrackingConfig
from models.registry import (
    ModelPackageError,
    latest_version,
    log_model_package,
    read_package_config,
    resolve_model_location,
    write_model_package,
)
from training.tracking import JobTracker, resolve_tracking_uri


@pytest.fixture()
def tracking(tmp_path):
    return TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                          artifact_root=str(tmp_path / "mlruns"), experiment="t", registered_model="loopy-test")


def _package(tmp_path: Path, tiny_weights, seed: int) -> tuple[Path, object]:
    import torch
    from diffusers import UNet2DConditionModel

    wcfg, paths = tiny_weights
    torch.manual_seed(seed)
    model = UNet2DConditionModel.from_pretrained(paths.unet)
    with torch.no_grad():  # make each package's weights distinguishable
        model.conv_in.bias.fill_(float(seed))
    cfg = PlatformConfig()
    cfg.weights = wcfg
    cfg.train.lr = 3e-4 + seed
    return write_model_package(tmp_path / f"pkg{seed}", model, cfg, paths), model


def test_package_roundtrip_and_registry_uris(tmp_path, tracking, tiny_weights):
    from diffusers import UNet2DConditionModel

    folder, _ = _package(tmp_path, tiny_weights, seed=1)
    assert (folder / "vae" / "config.json").is_file() and (folder / "wav2vec2" / "config.json").is_file()
    assert read_package_config(folder).train.lr == pytest.approx(3e-4 + 1)

    tracker = JobTracker(tracking)
    uri = resolve_tracking_uri(tracking.tracking_uri)
    run = tracker.start_job("job", PlatformConfig())
    v1 = log_model_package(folder, tracking.registered_model, stage=1, run_id=run.run_id, tracking_uri=uri)
    folder2, _ = _package(tmp_path, tiny_weights, seed=2)
    v2 = log_model_package(folder2, tracking.registered_model, stage=2, run_id=run.run_id, tracking_uri=uri)
    assert (v1, v2) == (1, 2)
    assert latest_version(tracking.registered_model, 1, uri) == 1
    assert latest_version(tracking.registered_model, 2, uri) == 2
    assert latest_version(tracking.registered_model, 3, uri) is None
    mv = tracker.client.get_model_version(tracking.registered_model, "2")
    assert mv.tags["stage"] == "2" and mv.run_id == run.run_id

    for loc, expect in [
        (f"models:/{tracking.registered_model}/1", 1.0),
        (f"models:/{tracking.registered_model}@stage2", 2.0),
        (f"runs:/{run.run_id}/model_package/stage2", 2.0),
        (str(folder), 1.0),
    ]:
        local = resolve_model_location(loc, dst_dir=tmp_path / "dl" / str(abs(hash(loc))), tracking_uri=uri)
        model = UNet2DConditionModel.from_pretrained(local / "loopy")
        assert float(model.conv_in.bias[0].detach()) == expect, loc
        assert read_package_config(local).weights.preset == "tiny"
    with pytest.raises(ModelPackageError, match="2 model packages"):
        resolve_model_location(f"runs:/{run.run_id}/model_package", dst_dir=tmp_path / "dl_all", tracking_uri=uri)


def test_bad_locations_name_the_location(tmp_path, tracking):
    uri = resolve_tracking_uri(tracking.tracking_uri)
    JobTracker(tracking)
    with pytest.raises(ModelPackageError, match="does not exist"):
        resolve_model_location(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPackageError, match="platform.yaml"):
        resolve_model_location(tmp_path / "empty")
    with pytest.raises(ModelPackageError, match="models:/missing/1"):
        resolve_model_location("models:/missing/1", tracking_uri=uri)
