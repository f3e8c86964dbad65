"""Config sections of the model room (networks and sampler)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class ModelConfig:
    """The Loopy networks. ``preset`` picks the U-Net size (tiny for CPU, sd15 for real)."""

    preset: Literal["tiny", "sd15"] = "tiny"
    audio_layers: int = 2  # wav2vec2 hidden layers kept (12 for base)
    audio_dim: int = 32  # wav2vec2 hidden size (768 for base)
    motion_latent_tokens: int = 8  # size of the audio-to-latents embedding bank
    gradient_checkpointing: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class SamplerConfig:
    """DDIM sampling with Loopy's three-way guidance."""

    steps: int = 25
    audio_ratio: float = 5.0
    ref_ratio: float = 3.0
    seed: int = 0
    fps: float = 25.0
    max_audio_s: Optional[float] = 60.0
    device: str = "auto"  # auto | cpu | cuda
