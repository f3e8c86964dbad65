"""Config helpers shared by the training tests (tests/test_train.py, tests/test_train_faults.py);
their synthetic ingest is the ``data_dir`` fixture in conftest.py."""
from __future__ import annotations

from pathlib import Path

from core.config import load_platform_config

#: Reader settings that fit the synthetic 60-frame videos.
TINY_READER = ["reader.motion_frames=28", "reader.ref_min_distance=4", "reader.samples_per_video=4"]


def train_overrides(root: Path, tiny_dir: str, *extra: str) -> list[str]:
    """Overrides that keep a training job's MLflow store, artifacts and Ray storage under ``root``."""
    return [f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", f"tracking.artifact_root={root}/mlruns",
            f"train.storage_path={root}/ray", f"weights.tiny_dir={tiny_dir}", *TINY_READER, *extra]


def train_cfg(root: Path, tiny_weights, *extra: str):
    """The platform config of :func:`train_overrides` (``tiny_weights``: the conftest fixture)."""
    return load_platform_config(None, train_overrides(root, tiny_weights[0].tiny_dir, *extra))
