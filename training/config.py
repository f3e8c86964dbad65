"""Config section of the training room."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainConfig:
    num_workers: int = 2
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    batch_size: int = 2  # per worker
    lr: float = 1e-5
    weight_decay: float = 1e-2
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    max_steps: int = 20  # per stage
    checkpoint_every: int = 10
    eval_every: int = 10
    mixed_precision: str = "no"  # no | bf16 | fp16 (GPU)
    ema_decay: Optional[float] = None
    max_failures: int = 1
    seed: int = 0
    storage_path: str = "work/ray_results"
