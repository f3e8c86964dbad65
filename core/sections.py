"""Config sections shared by every job: Ray, pretrained weights, MLflow tracking."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class RayConfig:
    """Where jobs run. ``address: local`` starts an embedded Ray on 127.0.0.1 (laptop, tests);
    ``auto`` or ``ray://host:10001`` joins a cluster. Under ``ray job submit`` the RAY_ADDRESS
    environment variable wins, so the same command line runs on a cluster unchanged."""

    address: str = "local"
    num_cpus: Optional[int] = 2  # embedded Ray only
    num_gpus: Optional[int] = None  # embedded Ray only; None lets Ray detect
    object_store_memory_mb: Optional[int] = 1024  # embedded Ray only
    include_dashboard: bool = False


@dataclass
class WeightsConfig:
    """Pretrained weights. ``tiny``: random tiny models materialised with ``save_pretrained`` under
    ``tiny_dir`` and loaded back with ``from_pretrained`` (no download, tests and demo).
    ``sd15``: real weights from local directories or hub ids (never fetched by tests)."""

    preset: Literal["tiny", "sd15"] = "tiny"
    tiny_dir: str = "work/tiny_weights"  # relative paths are under the project root
    sd15: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # diffusers folder: unet/, vae/
    vae: Optional[str] = None  # e.g. stabilityai/sd-vae-ft-mse; None = <sd15>/vae
    wav2vec2: str = "facebook/wav2vec2-base-960h"
    dwpose_dir: Optional[str] = None  # folder with yolox_l.onnx + dw-ll_ucoco_384.onnx; None = dlib
    local_files_only: bool = True  # never reach a hub unless the user turns this off


@dataclass
class TrackingConfig:
    """MLflow. Default: a sqlite file in the project folder, artifacts beside it."""

    tracking_uri: str = "sqlite:///mlflow.db"  # relative sqlite paths are under the project root
    artifact_root: str = "mlruns"
    experiment: str = "loopy"
    registered_model: str = "loopy"
