"""The Loopy sampler as an MLflow pyfunc model, and the registration of a model package as one.

A registered version (``models:/loopy@stage2``) is an MLflow model directory::

    MLmodel              flavor python_function (loader_module mlflow.pyfunc.model), signature
    python_model.pkl     a :class:`LoopyPyfuncModel` (cloudpickle; refers to this module by name)
    requirements.txt     the project's dependencies pinned to the versions that logged it
    artifacts/package/   the model package (models/registry.py), ALWAYS with vae/ and wav2vec2/:
                         when a package names them by location (sd15) they are copied in at
                         registration, so a version needs nothing outside itself

so ``mlflow.pyfunc.load_model("models:/loopy@stage2")`` gives a model whose ``predict`` turns
portraits + audio into mp4 videos, and :func:`inference.loading.load_package` (the service,
the CLI) finds the package inside the same directory.

Signature (one row per video; binary columns travel base64-encoded in MLflow's JSON input/output)::

    inputs   image: binary (an image file, any format Pillow reads)
             audio: binary (an audio file, any container / codec ffmpeg reads)
    params   steps: long, audio_ratio: double, ref_ratio: double, reference_init: double, noise_scale: double,
             seed: long, fps: double,
             size: long (0 = the model's crop size); defaults = the package's ``sampler`` section
    outputs  video: binary (mp4 with the audio), num_frames: long, fps: double, duration_s: double

Serving (the project must be importable in the serving Python: ``pip install -e .`` or the
cluster image; ``--env-manager local`` uses the current environment instead of building one)::

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db .venv/bin/mlflow models serve \\
        -m models:/loopy@stage2 --env-manager local --host 127.0.0.1 --port 5001
    # POST http://127.0.0.1:5001/invocations
    #   {"dataframe_split": {"columns": ["image", "audio"], "data": [[<b64 png>, <b64 wav>]]},
    #    "params": {"steps": 25}}
    # -> {"predictions": [{"video": <b64 mp4>, "num_frames": 75, "fps": 25.0, "duration_s": 3.0}]}

``LOOPY_DEVICE`` (``auto`` | ``cpu`` | ``cuda``) chooses the device at load time (default: the
package's ``sampler.device``).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import mlflow.pyfunc
import pandas as pd

from core.sections import SamplerConfig
from core.weights import load_pretrained, load_vae, resolve_weights
from inference.errors import BadInputError
from inference.portrait import load_image
from inference.sampler import LoopySampler
from models.registry import (
    CONFIG_FILE,
    PYFUNC_PACKAGE_KEY,
    check_package,
    package_artifact_path,
    read_package_config,
    register_logged_version,
)

__all__ = ["LoopyPyfuncModel", "log_model_package", "model_signature", "save_pyfunc_model",
           "stage_self_contained_package"]

PROJECT_DIST = "loopy-platform"
# request options a client may set (SamplerConfig fields) and their MLflow param types
REQUEST_PARAMS: dict[str, str] = {"steps": "long", "audio_ratio": "double", "ref_ratio": "double",
                                  "reference_init": "double", "noise_scale": "double", "seed": "long", "fps": "double",
                                  "size": "long"}
_PY_TYPES = {"long": int, "double": float}


def model_signature(defaults: SamplerConfig):
    """The pyfunc signature (see the module docstring); param defaults from ``defaults``."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    params = []
    for name, dtype in REQUEST_PARAMS.items():
        value = getattr(defaults, name)
        params.append(ParamSpec(name, dtype, _PY_TYPES[dtype](0 if value is None else value)))
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image"), ColSpec("binary", "audio")]),
        outputs=Schema([ColSpec("binary", "video"), ColSpec("long", "num_frames"), ColSpec("double", "fps"),
                        ColSpec("double", "duration_s")]),
        params=ParamSchema(params),
    )


def request_options(defaults: SamplerConfig, params: Optional[dict]) -> SamplerConfig:
    """``defaults`` with the request's params replaced (``size`` 0 = the model's crop size)."""
    changes: dict[str, Any] = {}
    for name, value in (params or {}).items():
        if name not in REQUEST_PARAMS or value is None:
            continue
        value = _PY_TYPES[REQUEST_PARAMS[name]](value)
        changes[name] = None if (name == "size" and value == 0) else value
    return dataclasses.replace(defaults, **changes)


def _as_bytes(value: Any, row: int, column: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise BadInputError(f"row {row}: column {column!r} must hold the file's bytes, got {type(value).__name__}")


class LoopyPyfuncModel(mlflow.pyfunc.PythonModel):
    """:class:`inference.sampler.LoopySampler` behind MLflow's pyfunc interface.

    ``predict(context, model_input: DataFrame[image, audio], params)`` -> DataFrame with one row
    per input row: ``video`` (mp4 bytes, exactly ``num_frames`` frames at ``fps``, with the
    audio), ``num_frames``, ``fps``, ``duration_s``. Rows are generated one after the other.
    """

    def load_context(self, context) -> None:
        device = os.environ.get("LOOPY_DEVICE", "auto")
        self.sampler = LoopySampler.from_package(context.artifacts[PYFUNC_PACKAGE_KEY], device=device)

    def predict(self, context, model_input, params: Optional[dict] = None) -> pd.DataFrame:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = [c for c in ("image", "audio") if c not in frame.columns]
        if missing:
            raise BadInputError(f"model input lacks the column(s) {', '.join(missing)} (needs image, audio)")
        options = request_options(self.sampler.default_options, params)
        rows = []
        with tempfile.TemporaryDirectory(prefix="loopy_pyfunc_") as tmp:
            for i, (image, audio) in enumerate(zip(frame["image"], frame["audio"])):
                image_path, audio_path = Path(tmp) / f"row{i}_image", Path(tmp) / f"row{i}_audio"
                image_path.write_bytes(_as_bytes(image, i, "image"))
                audio_path.write_bytes(_as_bytes(audio, i, "audio"))
                out = Path(tmp) / f"row{i}.mp4"
                result = self.sampler.generate(load_image(image_path), audio_path, out, options)
                rows.append({"video": out.read_bytes(), "num_frames": int(result.num_frames),
                             "fps": float(result.fps), "duration_s": float(result.duration_s)})
        return pd.DataFrame(rows, columns=["video", "num_frames", "fps", "duration_s"])


# --- registration ------------------------------------------------------------------------------

def _link_or_copy(src: str, dst: str) -> None:
    """Hard link (same file system: no bytes copied; the staged tree is read only), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _materialize(kind: str, location: str, local_files_only: bool, dst: Path) -> None:
    """A local copy of a pretrained folder at ``dst``: the folder itself when ``location`` is one,
    else (a hub id in the local cache) loaded and written back with ``save_pretrained``."""
    if Path(location).is_dir():
        shutil.copytree(location, dst, copy_function=_link_or_copy)
        return
    if kind == "vae":
        load_vae(location, local_files_only).save_pretrained(str(dst))
    else:
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

        load_pretrained(Wav2Vec2Model, location, local_files_only).save_pretrained(str(dst))
        load_pretrained(Wav2Vec2FeatureExtractor, location, local_files_only).save_pretrained(str(dst))


def stage_self_contained_package(folder: str | Path, dst: str | Path) -> Path:
    """A copy of the package ``folder`` at ``dst`` (hard links where possible) that holds
    everything sampling reads: ``vae/`` and ``wav2vec2/`` are added from the package's
    ``weights`` section when the package names them by location (sd15), and ``dwpose/`` when
    its portrait detector is DWPose. Returns ``dst``."""
    folder, dst = check_package(folder), Path(dst)
    shutil.copytree(folder, dst, copy_function=_link_or_copy)
    cfg = read_package_config(folder)
    if not ((dst / "vae").is_dir() and (dst / "wav2vec2").is_dir()):
        weights = resolve_weights(cfg.weights)
        for kind, location in (("vae", weights.vae), ("wav2vec2", weights.wav2vec2)):
            if not (dst / kind).is_dir():
                _materialize(kind, location, weights.local_files_only, dst / kind)
    if cfg.ingest.detector == "dwpose" and cfg.weights.dwpose_dir and not (dst / "dwpose").is_dir():
        shutil.copytree(cfg.weights.dwpose_dir, dst / "dwpose", copy_function=_link_or_copy)
    return dst


def pinned_requirements() -> list[str]:
    """The project's runtime dependencies (its installed metadata) pinned to the installed
    versions; given to MLflow explicitly so it does not load the model to infer them."""
    from packaging.requirements import Requirement

    try:
        declared = metadata.requires(PROJECT_DIST) or []
    except metadata.PackageNotFoundError:
        declared = ["torch", "diffusers", "transformers", "mlflow", "numpy", "pandas", "av", "pyyaml"]
    out = []
    for text in declared:
        req = Requirement(text)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        try:
            out.append(f"{req.name}{extras}=={metadata.version(req.name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{req.name}{extras}{req.specifier}")
    return out


def save_pyfunc_model(package: str | Path, path: str | Path) -> Path:
    """Write the MLflow model directory at ``path`` for a (self-contained) package folder."""
    package = check_package(package)
    defaults = read_package_config(package).sampler
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=LoopyPyfuncModel(),
        artifacts={PYFUNC_PACKAGE_KEY: str(package)},
        signature=model_signature(defaults),
        pip_requirements=pinned_requirements(),
        metadata={"loopy_package": CONFIG_FILE},
    )
    return Path(path)


def log_model_package(folder: str | Path, registered_name: str, stage: int, run_id: Optional[str] = None,
                      tracking_uri: Optional[str] = None, tags: Optional[dict] = None) -> int:
    """Register the package ``folder`` as a pyfunc model version of ``registered_name``.

    The package is staged self-contained (:func:`stage_self_contained_package`), written as an
    MLflow model (:func:`save_pyfunc_model`) and logged as the artifact ``model_package/stage<N>``
    of run ``run_id`` (default: the active fluent run); the new version is tagged
    ``stage=<stage>`` (+ ``tags``) and the alias ``stage<stage>`` moves to it. Returns the
    version number. The staging folders live next to ``folder`` (same file system: hard links)."""
    from mlflow.tracking import MlflowClient

    folder = check_package(folder)
    uri = tracking_uri or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise ValueError("log_model_package: no run_id given and no active MLflow run")
        run_id = active.info.run_id
    artifact_path = package_artifact_path(client, run_id, stage)
    with tempfile.TemporaryDirectory(prefix=".pyfunc_", dir=folder.parent) as tmp:
        staged = stage_self_contained_package(folder, Path(tmp) / "package")
        model_dir = save_pyfunc_model(staged, Path(tmp) / "model")
        client.log_artifacts(run_id, str(model_dir), artifact_path)
    return register_logged_version(client, run_id, artifact_path, registered_name, stage, tags)
