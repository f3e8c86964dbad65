"""Model packages and the MLflow registry (sqlite in tmp_path; no server, no network): registered
versions are pyfunc models that load with ``mlflow.pyfunc.load_model``, predict videos, and need
nothing outside themselves."""
from __future__ import annotations

from pathlib import Path

import pytest

from core.config import PlatformConfig
from core.paths import resolve_tracking_uri
from core.sections import TrackingConfig
from inference.mlflow_model import log_model_package
from models.registry import (
    ModelPackageError,
    latest_version,
    read_package_config,
    resolve_model_location,
    write_model_package,
)
from training.tracking import JobTracker


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


# --- registered versions are self-contained pyfunc models ------------------------------------------

def _sd15_style_package(tiny_package: Path, tiny_weights, dst: Path, weights_copy: Path) -> Path:
    """The tiny package as an sd15-style one: no vae/ or wav2vec2/ inside, platform.yaml names them
    by location (a copy of the tiny weights at ``weights_copy``, removed after registering)."""
    import shutil

    from core.config import dump_yaml, load_platform_config

    _, paths = tiny_weights
    shutil.copytree(Path(paths.unet).parent, weights_copy / "sd")
    shutil.copytree(paths.wav2vec2, weights_copy / "wav2vec2")
    shutil.copytree(tiny_package, dst, ignore=shutil.ignore_patterns("vae", "wav2vec2"))
    cfg = load_platform_config(dst / "platform.yaml", [
        "weights.preset=sd15", f"weights.sd15={weights_copy / 'sd'}", f"weights.vae={weights_copy / 'sd' / 'vae'}",
        f"weights.wav2vec2={weights_copy / 'wav2vec2'}", "weights.local_files_only=true"])
    (dst / "platform.yaml").write_text(dump_yaml(cfg))
    return dst


def _probe_frames(path: Path) -> int:
    import json
    import subprocess

    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                          "stream=nb_read_frames", "-of", "json", str(path)], check=True, capture_output=True,
                         text=True).stdout
    return int(json.loads(out)["streams"][0]["nb_read_frames"])


def test_registered_version_is_a_self_contained_pyfunc_model(tmp_path, tracking, tiny_package, tiny_weights):
    import shutil
    import subprocess

    import mlflow
    import pandas as pd
    import torch
    from mlflow.models import Model
    from PIL import Image
    from skimage import data

    from inference.loading import load_package

    weights_copy = tmp_path / "outside_weights"
    package = _sd15_style_package(tiny_package, tiny_weights, tmp_path / "sd15_style", weights_copy)
    tracker = JobTracker(tracking)
    uri = resolve_tracking_uri(tracking.tracking_uri)
    run = tracker.start_job("job", PlatformConfig())
    name = tracking.registered_model
    version = log_model_package(package, name, stage=2, run_id=run.run_id, tracking_uri=uri)
    shutil.rmtree(weights_copy)  # the version must not need the weights it was registered from

    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # the MLflow model directory: pyfunc flavor, signature, the package with VAE + wav2vec2 inside
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@stage2", dst_path=str(tmp_path / "dl")))
        meta = Model.load(str(local / "MLmodel"))
        assert "python_function" in meta.flavors
        assert meta.signature.inputs.input_names() == ["image", "audio"]
        assert meta.signature.outputs.input_names() == ["video", "num_frames", "fps", "duration_s"]
        assert {p.name for p in meta.signature.params.params} >= {"steps", "seed", "audio_ratio", "ref_ratio"}
        pkg_rel = meta.flavors["python_function"]["artifacts"]["package"]["path"]
        assert not Path(pkg_rel).is_absolute() and (local / pkg_rel / "vae" / "config.json").is_file()
        assert (local / pkg_rel / "wav2vec2" / "config.json").is_file()
        for f in local.rglob("*"):  # no file of the version is a link to somewhere else
            assert not f.is_symlink(), f
        assert str(weights_copy) not in (local / "MLmodel").read_text()

        # mlflow.pyfunc.load_model by alias, predict on a tiny input: an mp4 of the right length
        model = mlflow.pyfunc.load_model(f"models:/{name}@stage2")
        image = tmp_path / "portrait.png"
        Image.fromarray(data.astronaut()[20:280, 80:380]).save(image)
        audio = tmp_path / "speech.wav"
        subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", str(audio), "synth", "0.5", "sine", "200-600"],
                       check=True)
        out = model.predict(pd.DataFrame({"image": [image.read_bytes()], "audio": [audio.read_bytes()]}),
                            params={"steps": 1})
        assert list(out.columns) == ["video", "num_frames", "fps", "duration_s"] and len(out) == 1
        assert int(out["num_frames"][0]) == 12  # floor(0.5 s * 25 fps)
        video = tmp_path / "pred.mp4"
        video.write_bytes(out["video"][0])
        assert _probe_frames(video) == 12
        assert float(out["duration_s"][0]) == pytest.approx(12 / 25)

        # `mlflow models serve`'s app (the same FastAPI scoring app, in process): base64 JSON in/out
        import base64

        from fastapi.testclient import TestClient
        from mlflow.pyfunc import scoring_server

        b64 = [base64.b64encode(p.read_bytes()).decode() for p in (image, audio)]
        body = {"dataframe_split": {"columns": ["image", "audio"], "data": [b64]}, "params": {"steps": 1, "seed": 2}}
        response = TestClient(scoring_server.init(model)).post("/invocations", json=body)
        assert response.status_code == 200, response.text[:500]
        row = response.json()["predictions"][0]
        assert row["num_frames"] == 12
        (tmp_path / "http.mp4").write_bytes(base64.b64decode(row["video"]))
        assert _probe_frames(tmp_path / "http.mp4") == 12

        # the service's loader: by alias and by path (the package inside the MLflow model dir)
        for location in (f"models:/{name}@stage2", f"models:/{name}/{version}", str(local)):
            loaded = load_package(location, device="cpu", tracking_uri=uri)
            assert loaded.model.stage == 2 and loaded.codec.location.startswith(str(loaded.root)), location
            assert loaded.audio_extractor.location.startswith(str(loaded.root)), location
    finally:
        torch.set_num_threads(before)
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
