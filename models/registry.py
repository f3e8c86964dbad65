"""Trained model packages and the MLflow model registry.

A package is a folder (layout in docs/CONTRACTS.md)::

    loopy/          LoopyModel.save_pretrained (safetensors + config.json)
    platform.yaml   the resolved PlatformConfig it was trained with
    vae/ wav2vec2/  copies of the tiny preset's pretrained folders (sd15: locations in platform.yaml)

:func:`inference.mlflow_model.log_model_package` registers a package as an MLflow **pyfunc model**
(the sampler as ``mlflow.pyfunc.PythonModel``, the package, with its VAE and wav2vec2, as the
artifact ``package``, and an input/output signature), logged as the artifact
``model_package/stage<N>`` of a run; the version carries the stage in the tag ``stage`` and the
alias ``stage<N>`` points at the newest version of each stage. This module holds the parts that
need no sampler: the artifact path (:func:`package_artifact_path`), the version and alias
(:func:`register_logged_version`), and finding the package again.
A registered version's artifact is an MLflow model directory::

    MLmodel  python_model.pkl  requirements.txt  conda.yaml  python_env.yaml
    artifacts/package/   the package above (always with vae/ and wav2vec2/)

:func:`resolve_model_location` turns ``models:/name/version``, ``models:/name@alias``,
``runs:/<run_id>/<path>``, a local MLflow model directory or a local package folder into a local
package folder.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from core.config import dump_yaml, load_platform_config
from models.errors import ModelError

PACKAGE_ARTIFACT = "model_package"
MODEL_SUBDIR = "loopy"
CONFIG_FILE = "platform.yaml"
STAGE_TAG = "stage"
MLMODEL_FILE = "MLmodel"
PYFUNC_PACKAGE_KEY = "package"  # name of the package in a pyfunc model's artifacts (artifacts/package/)


class ModelPackageError(ModelError, FileNotFoundError):
    """A model location that does not hold a readable model package."""


def stage_alias(stage: int) -> str:
    return f"stage{int(stage)}"


def write_model_package(folder: str | Path, model: Any, config: Any, weight_paths: Any = None) -> Path:
    """Write a package: ``model.save_pretrained(folder/loopy)`` (or a copy of ``model`` when it
    is a folder written by ``save_pretrained``), ``platform.yaml`` from the
    dataclass ``config``, and for the tiny preset copies of ``weight_paths.vae`` / ``.wav2vec2``
    (local folders). Returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, (str, Path)):
        shutil.copytree(model, folder / MODEL_SUBDIR, dirs_exist_ok=True)
    else:
        model.save_pretrained(str(folder / MODEL_SUBDIR))
    (folder / CONFIG_FILE).write_text(dump_yaml(config))
    preset = getattr(getattr(config, "weights", None), "preset", None)
    if preset == "tiny" and weight_paths is not None:
        for name, src in (("vae", weight_paths.vae), ("wav2vec2", weight_paths.wav2vec2)):
            if Path(src).is_dir():
                shutil.copytree(src, folder / name, dirs_exist_ok=True)
    return folder


def check_package(folder: str | Path) -> Path:
    """``folder`` if it holds a package (``loopy/config.json`` and ``platform.yaml``), else a
    :class:`ModelPackageError` naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelPackageError(f"model package {folder} does not exist")
    missing = [p for p in (f"{MODEL_SUBDIR}/config.json", CONFIG_FILE) if not (folder / p).is_file()]
    if missing:
        raise ModelPackageError(f"{folder} is not a Loopy model package: missing {', '.join(missing)}")
    return folder


def read_package_config(folder: str | Path):
    """The :class:`core.config.PlatformConfig` a package was trained with."""
    return load_platform_config(check_package(folder) / CONFIG_FILE)


def _client(tracking_uri: Optional[str]):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or mlflow.get_tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def package_artifact_path(client: Any, run_id: str, stage: int) -> str:
    """A fresh artifact path ``model_package/stage<N>`` of run ``run_id`` (``stage<N>_2``, ... when
    the same stage was logged before in that run: a version is never overwritten)."""
    taken = {Path(f.path).name for f in client.list_artifacts(run_id, PACKAGE_ARTIFACT)}
    name, n = stage_alias(stage), 1
    while name in taken:
        n += 1
        name = f"{stage_alias(stage)}_{n}"
    return f"{PACKAGE_ARTIFACT}/{name}"


def register_logged_version(client: Any, run_id: str, artifact_path: str, registered_name: str, stage: int,
                            tags: Optional[dict] = None) -> int:
    """Register the artifact ``artifact_path`` of run ``run_id`` (already logged) as a new version
    of ``registered_name`` tagged ``stage=<stage>`` (+ ``tags``), and move the alias ``stage<N>``
    to it. Returns the version number. The pyfunc registration
    (:func:`inference.mlflow_model.log_model_package`) logs the MLflow model, then calls this."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(registered_name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    all_tags = {STAGE_TAG: str(int(stage)), **{k: str(v) for k, v in (tags or {}).items()}}
    version = client.create_model_version(registered_name, source, run_id=run_id, tags=all_tags)
    client.set_registered_model_alias(registered_name, stage_alias(stage), version.version)
    return int(version.version)


def package_in_mlflow_model(folder: str | Path) -> Optional[Path]:
    """The package folder inside an MLflow model directory (one with an ``MLmodel`` file whose
    ``python_function`` flavor lists the artifact ``package``), or None when ``folder`` is not an
    MLflow model. Raises :class:`ModelPackageError` for an MLflow model without that artifact."""
    folder = Path(folder)
    if not (folder / MLMODEL_FILE).is_file():
        return None
    from mlflow.models import Model

    flavor = Model.load(str(folder / MLMODEL_FILE)).flavors.get("python_function", {})
    entry = (flavor.get("artifacts") or {}).get(PYFUNC_PACKAGE_KEY)
    if not entry or not entry.get("path"):
        raise ModelPackageError(f"{folder} is an MLflow model without a Loopy package artifact "
                                f"({PYFUNC_PACKAGE_KEY!r} in the python_function flavor of {MLMODEL_FILE})")
    return folder / entry["path"]


def _package_or_self(folder: Path) -> Path:
    inner = package_in_mlflow_model(folder)
    return folder if inner is None else inner


def resolve_model_location(uri_or_path: str | Path, dst_dir: Optional[str | Path] = None,
                           tracking_uri: Optional[str] = None) -> Path:
    """A local package folder for ``models:/name/version``, ``models:/name@alias``,
    ``runs:/<run_id>/<artifact path>`` (MLflow artifacts downloaded to ``dst_dir`` or a temp
    folder) or a local folder (returned as is). Raises :class:`ModelPackageError` with the
    location in the message when it does not exist or holds no package."""
    import mlflow
    from mlflow.exceptions import MlflowException

    text = str(uri_or_path)
    if not (text.startswith("models:/") or text.startswith("runs:/")):
        return check_package(_package_or_self(Path(text).expanduser().resolve()))
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    if dst_dir is not None:
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=None if dst_dir is None else str(dst_dir))
    except (MlflowException, OSError) as exc:
        raise ModelPackageError(f"cannot fetch model {text!r} from {mlflow.get_tracking_uri()}: {exc}") from exc
    path = _package_or_self(Path(local))
    if not (path / CONFIG_FILE).is_file():  # runs:/<id> or runs:/<id>/model_package: one package inside?
        root = path / PACKAGE_ARTIFACT if (path / PACKAGE_ARTIFACT).is_dir() else path
        found = sorted({p.parent for p in root.glob(f"*/{CONFIG_FILE}")}
                       | {p.parent for p in root.glob(f"*/{MLMODEL_FILE}")})
        if len(found) == 1:
            path = _package_or_self(found[0])
        elif len(found) > 1:
            raise ModelPackageError(
                f"{text!r} holds {len(found)} model packages ({', '.join(p.name for p in found)}): "
                f"name one, e.g. {text.rstrip('/')}/{found[0].relative_to(path)}"
            )
    return check_package(path)


def latest_version(registered_name: str, stage: int, tracking_uri: Optional[str] = None) -> Optional[int]:
    """Newest version of ``registered_name`` for ``stage`` (its ``stage<N>`` alias), or None."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        return int(client.get_model_version_by_alias(registered_name, stage_alias(stage)).version)
    except MlflowException:
        return None
