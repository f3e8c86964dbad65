"""An untrained stage-2 model package (tests, benchmarks, and the service before training).

Same layout as training's packages (docs/CONTRACTS.md, :func:`models.registry.write_model_package`):
``loopy/`` + ``platform.yaml`` + copies of the tiny ``vae/`` and ``wav2vec2/`` folders. The
networks are the pretrained preset's U-Net weights with fresh Loopy modules: the output is not a
talking face, but every code path (loading, reference net, guidance, decoding) is the real one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from core.config import load_platform_config
from core.weights import resolve_weights
from models.loopy import LoopyModel
from models.registry import CONFIG_FILE, MODEL_SUBDIR, write_model_package


def write_untrained_package(folder: str | Path, config_path: Optional[str | Path] = None,
                            overrides: Sequence[str] = (), seed: int = 0) -> Path:
    """Build ``LoopyModel.from_sd15(<preset unet>, model, reader, stage=2)`` under the platform
    config (``config_path`` + ``overrides``) and write it as a package at ``folder``.
    Idempotent: an existing package at ``folder`` is returned as is."""
    import torch

    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file() and (folder / MODEL_SUBDIR / "config.json").is_file():
        return folder
    cfg = load_platform_config(config_path, overrides)
    weights = resolve_weights(cfg.weights)
    torch.manual_seed(seed)
    model = LoopyModel.from_sd15(weights.unet, cfg.model, cfg.reader, stage=2,
                                 local_files_only=weights.local_files_only)
    return write_model_package(folder, model, cfg, weights)
