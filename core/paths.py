"""Where things are: the project root, and the one rule for relative paths and tracking URIs.

Every relative path in a config (``weights.tiny_dir``, ``train.storage_path``, ``serve.job_dir``,
``tracking.artifact_root``, a relative ``sqlite:///`` tracking URI, a ``--config`` file given to the
Serve app) means "under the project root", whatever the current directory of the process is: Ray
workers, Serve replicas and ``ray job submit`` drivers do not share one working directory.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Union

from core.config import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "configs"

SQLITE_PREFIX = "sqlite:///"

PathLike = Union[str, "os.PathLike[str]"]


class NotALocalPathError(ConfigError):
    """A URI (``s3://...``) given where a setting needs a local folder: refused, never turned into a
    local folder named ``s3:``."""


def project_path(path: PathLike) -> Path:
    """``path`` as given when absolute, else under :data:`PROJECT_ROOT` (not resolved: no symlinks
    followed). A ``scheme://`` URI raises :class:`NotALocalPathError` (``Path`` would make it the
    relative folder ``s3:/bucket/...``; data paths that may be buckets go through core/storage.py)."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", os.fspath(path)):
        raise NotALocalPathError(f"{os.fspath(path)}: a URI where a local path is needed")
    p = Path(path)
    return p if p.is_absolute() else PROJECT_ROOT / p


def resolve_tracking_uri(uri: str) -> str:
    """An MLflow tracking/registry URI with a relative sqlite path made absolute under the project
    root (``sqlite:///mlflow.db`` -> ``sqlite:////<project>/mlflow.db``); any other URI unchanged."""
    if uri.startswith(SQLITE_PREFIX) and not uri[len(SQLITE_PREFIX):].startswith("/"):
        return SQLITE_PREFIX + str(PROJECT_ROOT / uri[len(SQLITE_PREFIX):])
    return uri


def resolve_artifact_root(root: str) -> str:
    """An MLflow artifact root: a URI (``s3://``, ``file://``) unchanged, a folder -> ``file://`` URI
    under the project root."""
    if "://" in root:
        return root
    return project_path(root).resolve().as_uri()
