"""Config section of the serving room."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model: Optional[str] = None  # MLflow model URI (models:/loopy/1) or a local path
    num_replicas: int = 1
    gpus_per_replica: float = 0.0
    max_queue: int = 8
    max_upload_mb: int = 20
    max_audio_s: float = 30.0
    auth_token: Optional[str] = None
    job_dir: str = "work/serve_jobs"
    cpus_per_replica: float = 1.0  # CPUs reserved by each sampler worker replica
    job_ttl_s: float = 3600.0  # finished jobs (and their files) are removed after this many seconds
