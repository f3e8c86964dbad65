"""Pretrained-weight presets and where to find them.

``tiny``: random tiny models with the same classes and folder layout as the real ones
(a diffusers SD folder with ``unet/`` and ``vae/``, and a transformers wav2vec2 folder), written
with ``save_pretrained`` once under ``WeightsConfig.tiny_dir`` and always loaded back with
``from_pretrained``. So tests and the demo go through exactly the loading code that real weights
use, without any download.

``weights.vae`` replaces the tiny preset's random VAE when set: the demo points it at the codec
``training.fit_vae`` fitted to the sample faces (a :class:`core.patch_codec.PatchCodec`, or an
``AutoencoderKL`` of ``tiny_vae_config``), so the tiny chain decodes recognisable faces; tests keep
the random one. When that codec's latents have other channels than the tiny U-Net's 4, the tiny
preset's U-Net is a random one of the same architecture with that many input and output channels
(``sd/unet_<C>ch``, written once like the others; its first level at least 4/3 C wide,
:func:`tiny_unet_config`): the U-Net is random either way, and its latent channels must be the
codec's. :func:`load_vae` loads either codec class by its ``config.json``.

``sd15``: the user's SD-1.5 diffusers folder (or hub id) and ``facebook/wav2vec2-base-960h``.
"""
from __future__ import annotations

import fcntl
import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from core.paths import project_path
from core.sections import WeightsConfig

TINY_VERSION = 1  # bump when a tiny config below changes: forces a rebuild of the folder


@dataclass(frozen=True)
class WeightPaths:
    """Resolved locations (local folders or hub ids)."""

    unet: str  # diffusers UNet2DConditionModel folder (SD-1.5 layout: <sd>/unet)
    vae: str  # diffusers AutoencoderKL folder
    wav2vec2: str  # transformers Wav2Vec2Model + feature-extractor folder
    dwpose_dir: Optional[str]
    local_files_only: bool


def tiny_vae_config() -> dict:
    """AutoencoderKL with SD's 8x downsampling (4 levels) and 4 latent channels, few channels."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )


def tiny_unet_config(latent_channels: int = 4) -> dict:
    """A 2-level SD-style UNet2DConditionModel (same block kinds as SD-1.5, tiny widths) for latents
    of ``latent_channels`` channels.

    Widths: [32, 64] for SD's 4 channels. For wider latents (a ``PatchCodec``'s 48) the first level
    gets at least 4/3 of the latent channels, rounded up to 16: its feature map at the latent
    resolution is all the decoder side has to write the noise estimate from, and with fewer
    features than latent values per position it cannot even pass the noise through (measured
    with 48 channels through width 32: the training loss stayed at 0.5 and DDIM's x0 estimates
    blew up to std 5.5 against 0.7 for real latents)."""
    first = max(32, 16 * math.ceil(4 * latent_channels / 3 / 16))
    return dict(
        sample_size=8,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        block_out_channels=[first, max(64, first)],
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_wav2vec2_config() -> dict:
    """Wav2Vec2 with the base model's conv front end (320-sample hop = 50 Hz at 16 kHz),
    2 transformer layers of width 32."""
    return dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=[32] * 7,
        conv_stride=[5, 2, 2, 2, 2, 2, 2],
        conv_kernel=[10, 3, 3, 3, 3, 2, 2],
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="group",
        do_stable_layer_norm=False,
        vocab_size=32,
    )


def _tiny_root(cfg: WeightsConfig) -> Path:
    return project_path(cfg.tiny_dir)


def materialize_tiny_weights(root: Path, seed: int = 0) -> Path:
    """Write the tiny models under ``root`` (idempotent, process-safe). Returns ``root``."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    marker = root / "tiny_weights.json"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and json.loads(marker.read_text()).get("version") == TINY_VERSION:
            return root
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

        torch.manual_seed(seed)
        AutoencoderKL(**tiny_vae_config()).save_pretrained(root / "sd" / "vae")
        UNet2DConditionModel(**tiny_unet_config()).save_pretrained(root / "sd" / "unet")
        w2v = Wav2Vec2Model(Wav2Vec2Config(**tiny_wav2vec2_config()))
        w2v.save_pretrained(root / "wav2vec2")
        Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
            return_attention_mask=False,
        ).save_pretrained(root / "wav2vec2")
        marker.write_text(json.dumps({"version": TINY_VERSION, "seed": seed}))
    return root


def materialize_tiny_unet(root: Path, latent_channels: int, seed: int = 0) -> Path:
    """The tiny U-Net with ``latent_channels`` input and output channels at
    ``root/sd/unet_<C>ch`` (idempotent, process-safe; ``root`` from :func:`materialize_tiny_weights`).
    Returns the folder."""
    import torch
    from diffusers import UNet2DConditionModel

    folder = root / "sd" / f"unet_{int(latent_channels)}ch"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        want = tiny_unet_config(int(latent_channels))
        try:
            have = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            have = {}
        if any(have.get(k) != v for k, v in want.items()):  # none yet, or of an older tiny config
            torch.manual_seed(seed)
            UNet2DConditionModel(**tiny_unet_config(int(latent_channels))).save_pretrained(folder)
    return folder


# codec classes of this project by their config's ``_class_name`` -> module. Imported by name when
# a codec is loaded, so that importing core.weights (every ingest worker does) does not import
# diffusers; the KL-VAE is diffusers' own AutoencoderKL.
PROJECT_CODECS = {"PatchCodec": "core.patch_codec"}


def vae_class(location: str, local_files_only: bool):
    """The diffusers class of the codec at ``location``: the project's class named by its
    ``config.json`` ``_class_name`` (:data:`PROJECT_CODECS`: ``PatchCodec``), else ``AutoencoderKL``."""
    from diffusers import AutoencoderKL

    path = Path(location)
    if path.is_dir():
        try:
            name = json.loads((path / "config.json").read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            name = None  # from_pretrained reports the unreadable config with its path
    else:
        parts = location.split("/")
        try:
            name = AutoencoderKL.load_config("/".join(parts[:2]), subfolder="/".join(parts[2:]) or None,
                                             local_files_only=local_files_only).get("_class_name")
        except (OSError, ValueError):
            name = None
    if name in PROJECT_CODECS:
        return getattr(importlib.import_module(PROJECT_CODECS[name]), name)
    return AutoencoderKL


def load_vae(location: str, local_files_only: bool, **kwargs):
    """The codec at ``location`` (``AutoencoderKL`` or ``PatchCodec``, :func:`vae_class`), loaded with
    :func:`load_pretrained`."""
    return load_pretrained(vae_class(location, local_files_only), location, local_files_only, **kwargs)


def _local_latent_channels(location: Optional[str]) -> Optional[int]:
    """``latent_channels`` of a local codec folder's ``config.json``; None for a hub id or no field."""
    if not location or not (Path(location) / "config.json").is_file():
        return None
    try:
        value = json.loads((Path(location) / "config.json").read_text()).get("latent_channels")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def resolve_weights(cfg: WeightsConfig) -> WeightPaths:
    """Where each pretrained part comes from under this config (tiny ones are created if needed)."""
    if cfg.preset == "tiny":
        root = materialize_tiny_weights(_tiny_root(cfg))
        channels = _local_latent_channels(cfg.vae)
        unet = root / "sd" / "unet"
        if channels is not None and channels != tiny_unet_config()["in_channels"]:
            unet = materialize_tiny_unet(root, channels)
        return WeightPaths(
            unet=str(unet),
            vae=cfg.vae or str(root / "sd" / "vae"),
            wav2vec2=str(root / "wav2vec2"),
            dwpose_dir=cfg.dwpose_dir,
            local_files_only=True,
        )
    sd = cfg.sd15.rstrip("/")
    return WeightPaths(
        unet=f"{sd}/unet",
        vae=cfg.vae or f"{sd}/vae",
        wav2vec2=cfg.wav2vec2,
        dwpose_dir=cfg.dwpose_dir,
        local_files_only=cfg.local_files_only,
    )


def load_pretrained(loader, location: str, local_files_only: bool, **kwargs):
    """``loader.from_pretrained`` for a local folder or a hub id (``org/name/subfolder``).

    A missing local folder with ``local_files_only`` gives one clear error naming the location.
    """
    path = Path(location)
    if path.exists():
        return loader.from_pretrained(str(path), **kwargs)
    parts = location.split("/")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        return loader.from_pretrained(repo, subfolder=sub, local_files_only=local_files_only, **kwargs)
    except (OSError, ValueError) as exc:
        hint = " (local_files_only=true: download it first or give a local folder)" if local_files_only else ""
        raise FileNotFoundError(f"cannot load {loader.__name__} from {location!r}{hint}: {exc}") from exc
