"""Results that would vanish with Ray's copy of a job's working directory are refused up front.

``ray job submit --working-dir DIR -- python train.py ...`` uploads DIR, unpacks it into the
head's session folder (``.../runtime_resources/working_dir_files/_ray_pkg_<hash>/``) and runs the
entrypoint there. The code then lives in that copy, so the project root of ``core/paths.py`` is
the copy, and every relative path of a config (a ``sqlite:///mlflow.db`` tracking URI, the
artifact root, ``train.storage_path``, ``evaluation.output_dir``) resolves inside it: the model is
registered in a throwaway ``mlflow.db`` and the checkpoints go with it when Ray cleans the
session. :func:`check_job_paths` names each such setting before any work starts, so the user
makes it absolute (on storage every node shares) or a server / bucket URI.

A job is recognised by the job config Ray's job supervisor hands its entrypoint
(``RAY_JOB_CONFIG_JSON_ENV_VAR``: ``{"runtime_env": {"working_dir": ...}, ...}``); the copy is the
entrypoint's current directory, where the supervisor starts it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence
from urllib.parse import urlparse

from core.config import ConfigError, PlatformConfig
from core.paths import SQLITE_PREFIX, project_path

RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's JobSupervisor for the entrypoint

#: the settings each entry point writes results to (dotted config keys)
TRAIN_RESULT_KEYS = ("tracking.tracking_uri", "tracking.artifact_root", "train.storage_path")
EVALUATION_RESULT_KEYS = ("tracking.tracking_uri", "tracking.artifact_root", "evaluation.output_dir")
EXAMPLES = {"tracking.tracking_uri": "tracking.tracking_uri=http://MLFLOW_HOST:5000 or sqlite:////mnt/shared/mlflow.db",
            "tracking.artifact_root": "tracking.artifact_root=s3://BUCKET/mlruns or /mnt/shared/mlruns",
            "train.storage_path": "train.storage_path=s3://BUCKET/ray_results or /mnt/shared/ray_results",
            "evaluation.output_dir": "evaluation.output_dir=/mnt/shared/evaluation"}


class JobPathError(ConfigError):
    """A result path that would land in Ray's temporary copy of the job's working directory."""


def job_working_dir(environ: Optional[dict] = None) -> Optional[Path]:
    """Ray's copy of the working directory when this process is the entrypoint of a Ray job
    submitted with one (``--working-dir`` / ``runtime_env.working_dir``), else None."""
    env = os.environ if environ is None else environ
    raw = env.get(RAY_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        runtime_env = (json.loads(raw) or {}).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    if not runtime_env.get("working_dir"):
        return None
    return Path.cwd().resolve()


def _local_path(key: str, value: str) -> Optional[Path]:
    """Where the setting ``key`` = ``value`` writes on this machine, None for a server or bucket URI."""
    if key == "tracking.tracking_uri":
        if value.startswith(SQLITE_PREFIX):
            return project_path(value[len(SQLITE_PREFIX):])
        if "://" not in value and not value.startswith("file:"):  # MLflow's plain folder store
            return project_path(value)
    if value.startswith("file:"):
        return Path(urlparse(value).path)
    if "://" in value:
        return None
    return project_path(value)


def setting(cfg: PlatformConfig, key: str) -> str:
    section, name = key.split(".", 1)
    return str(getattr(getattr(cfg, section), name))


def check_job_paths(cfg: PlatformConfig, keys: Sequence[str], environ: Optional[dict] = None) -> None:
    """Raise :class:`JobPathError` naming every setting of ``keys`` that would resolve inside
    Ray's copy of the job's working directory; nothing outside a Ray job with a working dir."""
    copy = job_working_dir(environ)
    if copy is None:
        return
    inside = []
    for key in keys:
        value = setting(cfg, key)
        path = _local_path(key, value)
        if path is None:
            continue
        resolved = Path(os.path.abspath(path)).resolve()
        if resolved == copy or copy in resolved.parents:
            inside.append(f"{key}={value} (-> {resolved})")
    if inside:
        raise JobPathError(
            f"this Ray job runs in Ray's temporary copy of its working directory ({copy}), deleted with the "
            f"session, and {'; '.join(inside)} would be written there: give "
            f"{'it' if len(inside) == 1 else 'them'} as absolute paths on storage every node shares (or a "
            f"tracking server / bucket URI), e.g. {EXAMPLES.get(inside[0].split('=')[0], '/mnt/shared/...')}")
