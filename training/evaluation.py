"""Evaluation during training (rank 0): validation loss at fixed timesteps on the test split, the
loss plot, and a short sample video of the current model.

* Validation loss: for every test batch and every timestep in ``train.eval_timesteps`` the
  clip latents are noised with noise drawn from a generator seeded by (seed, batch index), so
  every evaluation of a run scores the same noisy inputs: the numbers are comparable across
  steps. The test split is read with the condition switches all off (``LoopySampleSource``
  with a non-train split). Metrics: ``val_loss`` (mean) and ``val_loss_t<T>`` per timestep.
* Sample video: the first test clip's reference latent and audio, generated with
  :class:`models.sampler.LoopySampler` (``train.eval_sample_steps`` DDIM steps) from a package
  of the current weights, decoded by the package's VAE, written as mp4 (no audio track: the
  ingest output stores features, not waveforms).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from training.step import diffusion_loss, to_device

log = logging.getLogger(__name__)


def load_test_batches(data_dir: str | Path, reader_cfg, batch_size: int, max_batches: int
                      ) -> list[dict[str, torch.Tensor]]:
    """Up to ``max_batches`` batches of the test split (epoch 0, switches off); [] without test videos."""
    from pipelines.reader import LoopySampleSource, collate

    source = LoopySampleSource(data_dir, reader_cfg, split="test")
    specs = source.epoch_specs(0)[: batch_size * max_batches]
    return [collate([source.load(s) for s in specs[i:i + batch_size]]) for i in range(0, len(specs), batch_size)]


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], noise_scheduler,
                    timesteps: Sequence[int], seed: int, device: torch.device,
                    mixed_precision: str = "no") -> dict[str, float]:
    """Mean epsilon-MSE over ``batches`` at each fixed timestep -> ``{"val_loss", "val_loss_t<T>"}``."""
    if not batches:
        return {}
    was_training = model.training
    model.eval()
    try:
        per_t: dict[int, list[float]] = {int(t): [] for t in timesteps}
        for i, batch in enumerate(batches):
            batch = to_device(batch, device)
            b = batch["latents"].shape[0]
            for t in per_t:
                gen = torch.Generator().manual_seed(seed * 7919 + i)
                ts = torch.full((b,), t, dtype=torch.long)
                per_t[t].append(float(diffusion_loss(model, batch, noise_scheduler, gen, ts, mixed_precision)))
    finally:
        model.train(was_training)
    out = {f"val_loss_t{t}": float(np.mean(v)) for t, v in per_t.items()}
    out["val_loss"] = float(np.mean(list(out.values())))
    return out


def plot_losses(series: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """One line per metric (``{name: [(step, value), ...]}``) -> PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in series.items():
        if points:
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, marker="." if len(points) < 50 else None, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def sample_video(package_dir: str | Path, batch: dict[str, torch.Tensor], out_path: str | Path,
                 steps: int, seed: int = 0, fps: float = 25.0) -> Optional[Path]:
    """Generate the first clip of ``batch`` (reference latent + the clip's audio features) with
    :class:`models.sampler.LoopySampler` from ``package_dir`` and write it to ``out_path``.
    Returns None when the batch has no audio (stage 1: the sampler needs a stage-2 model)."""
    if "audio" not in batch:
        return None
    from models.sampler import LoopySampler
    from models.video_io import write_video

    sampler = LoopySampler.from_package(str(package_dir), device="cpu")
    window = batch["audio"].shape[2]
    features = batch["audio"][0, :, window // 2].float().numpy()  # [F, L, D]: each frame's own features
    options = sampler.default_options.replace(steps=int(steps), seed=int(seed))
    latents = sampler.generate_latents(batch["ref_latent"][:1].float(), features, options)
    frames = np.concatenate(list(sampler.decode_frames(latents)), axis=0)
    return write_video(frames, out_path, fps=fps, audio_path=None)

