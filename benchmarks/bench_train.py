"""Training throughput: samples/s of the tiny preset (stage 2) through Ray Train with 1 and 2 CPU
workers (scaling ratio), the data-loader wait as a share of step time (target < 5 %), and with a
GPU the step time of an SD-1.5-sized stage-2 model.

Each Ray Train run trains ``LOOPY_BENCH_TRAIN_STEPS`` steps (default 8; ``LOOPY_BENCH_QUICK=1``: 4)
on a synthetic ingest output (64 px crops, 4x8x8 latents, 2x32 audio); per-step figures are
medians over the steps after the first two (warm-up), read back from the stage's MLflow run.
Samples/s counts clips of 12 frames over all workers together.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

TARGET_WAIT = 0.05


def _steps() -> int:
    if os.environ.get("LOOPY_BENCH_TRAIN_STEPS"):
        return int(os.environ["LOOPY_BENCH_TRAIN_STEPS"])
    return 4 if os.environ.get("LOOPY_BENCH_QUICK") else 8


def _stage1_package(root: Path, cfg) -> Path:
    from core.weights import resolve_weights
    from models.loopy import LoopyModel
    from models.registry import write_model_package

    paths = resolve_weights(cfg.weights)
    model = LoopyModel.from_sd15(paths.unet, cfg.model, cfg.reader, stage=1)
    return write_model_package(root / "stage1_package", model, cfg, paths)


def _tiny_runs(root: Path) -> list[dict]:
    from core.config import load_platform_config
    from pipelines.samples.synthetic_ingest import write_synthetic_ingest
    from training.stages import prepare_job, run_job
    from training.tracking import JobTracker

    data = root / "data"
    write_synthetic_ingest(data, num_frames=(200, 200, 200, 200), latent_shape=(4, 8, 8), audio_shape=(2, 32),
                           splits=["train", "train", "train", "test"], content="random")
    steps = _steps()
    base = [f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", f"tracking.artifact_root={root}/mlruns",
            f"train.storage_path={root}/ray", f"weights.tiny_dir={root}/tiny", f"train.max_steps={steps}",
            f"train.checkpoint_every={steps}", "train.eval_every=0", "train.eval_sample_steps=0",
            "train.eval_max_batches=1", "train.data_loader=ray_data", "reader.samples_per_video=16"]
    init = _stage1_package(root, load_platform_config(None, base))
    rows, per_worker = [], {}
    for workers in (1, 2):
        cfg = load_platform_config(None, base + [f"train.num_workers={workers}"])
        record = run_job(prepare_job(cfg, data, [2], init_from=str(init), job_name=f"bench{workers}"))
        client = JobTracker(cfg.tracking).client
        run_id = record.stages["2"].run_id

        def hist(key: str, client=client, run_id=run_id) -> list[float]:
            values = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            return [v for s, v in values if s > 2] or [v for _, v in values]

        sps = statistics.median(hist("samples_per_s"))
        wait = statistics.median(hist("data_wait_share"))
        per_worker[workers] = sps
        note = f"tiny stage 2, B=2/worker, F=12, {steps} steps, median of steps > 2, CPU (2 cores shared)"
        rows.append({"benchmark": "train", "metric": f"samples_per_s_{workers}w", "value": sps, "unit": "clips/s",
                     "target": "", "note": note})
        rows.append({"benchmark": "train", "metric": f"data_wait_share_{workers}w", "value": wait, "unit": "ratio",
                     "target": f"< {TARGET_WAIT}", "note": "time waiting for the next batch / step time (Ray Data shard), median of steps > 2 (step 1 waits for the pipeline start)"})
    rows.append({"benchmark": "train", "metric": "scaling_2w_over_1w", "value": per_worker[2] / per_worker[1],
                 "unit": "x", "target": "~2 with 2 free cores",
                 "note": "2 DDP workers (gloo) vs 1; this machine's 2 cores are shared by the Ray Data readers"})
    return rows


def _sd15_step_time() -> list[dict]:
    """SD-1.5-sized stage-2 train step on one GPU: B=1 clip of 12 frames at 512 px (latents 64x64),
    20 motion latents, 12 x 768 audio, bf16 autocast, gradient checkpointing, AdamW."""
    import torch

    if not torch.cuda.is_available():
        return [{"benchmark": "train", "metric": "sd15_step_time", "value": "", "unit": "s", "target": "",
                 "note": "skipped: no GPU on this machine"}]
    from diffusers.optimization import get_scheduler

    from core.sections import TrainConfig
    from models.loopy import LoopyModel, sd15_unet_config
    from training.step import make_noise_scheduler, train_step

    dev = torch.device("cuda")
    tc = TrainConfig(mixed_precision="bf16", use_gpu=True)
    model = LoopyModel(unet_config=sd15_unet_config(), stage=2, audio_layers=12, audio_dim=768).to(dev)
    model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(list(model.trainable_parameters()), lr=1e-5)
    sched = get_scheduler("constant", opt)
    b, f, m = 1, 12, 20
    batch = {
        "latents": torch.randn(b, f, 4, 64, 64), "ref_latent": torch.randn(b, 4, 64, 64),
        "motion_latents": torch.randn(b, m, 4, 64, 64), "motion_mask": torch.ones(b, m, dtype=torch.bool),
        "audio": torch.randn(b, f, 5, 12, 768), "landmarks": torch.rand(b, f, 68, 2),
        "head_motion_var": torch.rand(b), "expression_var": torch.rand(b),
        "drop_audio": torch.zeros(b, dtype=torch.bool), "drop_motion_cond": torch.zeros(b, dtype=torch.bool),
        "drop_ref": torch.zeros(b, dtype=torch.bool), "drop_motion_frames": torch.zeros(b, dtype=torch.bool),
        "a2l_kind": torch.zeros(b, dtype=torch.long),
    }
    noise = make_noise_scheduler(tc)
    times = []
    torch.cuda.reset_peak_memory_stats()
    for step in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(model, batch, opt, sched, noise, tc, step=step, rank=0, device=dev)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30
    name = torch.cuda.get_device_name()
    return [
        {"benchmark": "train", "metric": "sd15_step_time", "value": statistics.median(times[2:]), "unit": "s",
         "target": "", "note": f"{name}, B=1 x 12 frames 512px, bf16, grad ckpt, median of steps 3-5"},
        {"benchmark": "train", "metric": "sd15_peak_mem", "value": peak, "unit": "GiB", "target": "< 80",
         "note": name},
    ]


def run() -> list[dict]:
    from core.ray_runtime import init_ray
    from core.sections import RayConfig

    init_ray(RayConfig(num_cpus=2))
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        rows = _tiny_runs(Path(tmp))
    return rows + _sd15_step_time()


if __name__ == "__main__":
    from benchmarks.run import print_table

    print_table(run())
