"""Config section of the training room (``train.*``). Steps are optimizer steps per stage."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class TrainConfig:
    # --- Ray Train scaling (ScalingConfig) ---
    num_workers: int = 2  # DDP workers (processes); CPU + gloo unless use_gpu
    use_gpu: bool = False  # one NCCL worker per GPU
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 0.5  # leaves CPUs for the Ray Data read tasks on a 2-CPU laptop
    # --- data ---
    # "ray_data": the reader's Ray Dataset streamed into each worker (get_dataset_shard);
    # "torch": the reader's torch Dataset sharded by rank (bit-exact resume: every rank always
    # sees the same batches, Ray Data's streaming split assigns blocks to workers dynamically).
    data_loader: Literal["ray_data", "torch"] = "ray_data"
    batch_size: int = 2  # clips per worker per step
    # --- optimisation ---
    lr: float = 1e-5
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10  # linear warm-up, then constant (diffusers "constant_with_warmup")
    max_grad_norm: float = 1.0  # gradient clipping; <= 0 disables
    max_steps: int = 20  # per stage
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast on GPU only
    ema_decay: Optional[float] = None  # e.g. 0.9999; None = no EMA
    find_unused_parameters: bool = False  # DDP; only if the model leaves parameters unused
    seed: int = 0
    # --- noise schedule (diffusers DDPMScheduler, SD-1.5 settings) ---
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    # --- checkpoints, logging, evaluation ---
    checkpoint_every: int = 10  # steps; the last step always checkpoints
    checkpoints_to_keep: int = 2
    log_every: int = 1  # steps between metric reports
    eval_every: int = 10  # steps; the last step always evaluates; 0 = only at the end
    eval_timesteps: list[int] = field(default_factory=lambda: [100, 500, 900])
    eval_max_batches: int = 4  # test-split batches per evaluation
    eval_sample_steps: int = 4  # DDIM steps of the sample video at evaluation (0 = no video)
    max_failures: int = 1  # Ray Train FailureConfig: worker failures recovered from the last checkpoint
    storage_path: str = "work/ray_results"  # relative paths are under the project root
    # --- fault injection (tests / drills only), once per job: before step ``fault_at_step`` rank
    # ``fault_rank`` exits ("exit": a killed worker) or gets a NaN batch ("nan": the NaN guard) ---
    fault_at_step: Optional[int] = None
    fault_rank: int = 1
    fault_kind: Literal["exit", "nan"] = "exit"
