"""Loading a model package for sampling: everything the sampler needs, built once.

A model package (written by :func:`models.registry.write_model_package`) is a folder with
``loopy/`` (the :class:`~models.loopy.LoopyModel`), ``platform.yaml`` (the platform config it was
trained with), and, for the tiny preset and every registered version, ``vae/`` + ``wav2vec2/``
(+ ``dwpose/`` with the DWPose detector); otherwise the VAE and wav2vec2 locations come from
``platform.yaml``'s ``weights`` section. A registered version (an MLflow pyfunc model directory,
:mod:`inference.mlflow_model`) holds its package under ``artifacts/package/``; MLflow URIs
(``models:/loopy@stage2``) and local MLflow model directories are both accepted. ``scheduler/`` (a diffusers
scheduler config) is optional: without it the sampler uses SD-1.5's schedule.

This module only loads; the denoising loop is :class:`inference.sampler.LoopySampler`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from core.config import load_platform_config
from core.paths import resolve_tracking_uri
from core.sections import PlatformConfig
from core.weights import resolve_weights
from inference.portrait import PortraitCropper
from models.loopy import LoopyModel
from models.registry import ModelPackageError, resolve_model_location
from pipelines.encoders.audio_features import AudioFeatureExtractor
from pipelines.encoders.latents import LatentCodec


@dataclass
class LoadedPackage:
    """The parts of a model package, on ``device``: the network, the VAE codec, the wav2vec2
    extractor, the portrait cropper, the package's platform config and its scheduler config
    (``None``: SD-1.5's DDIM settings)."""

    model: LoopyModel
    codec: LatentCodec
    audio_extractor: AudioFeatureExtractor
    portrait: PortraitCropper
    cfg: PlatformConfig
    device: torch.device
    scheduler_config: Optional[dict]
    root: Path


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; any other name as given (``cpu``, ``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def package_root(location: str | Path, tracking_uri: Optional[str] = None) -> Path:
    """A local package folder for ``location``: a folder, or an MLflow model URI
    (``models:/name/version``, ``models:/name@alias``, ``runs:/...``, a pyfunc model directory:
    its ``artifacts/package``) fetched from ``tracking_uri``
    (a relative sqlite URI is under the project root). Raises :class:`ModelPackageError` when the
    folder is not a Loopy package (needs ``loopy/`` and ``platform.yaml``)."""
    if tracking_uri is not None and str(location).startswith(("models:/", "runs:/")):
        tracking_uri = resolve_tracking_uri(tracking_uri)
    root = Path(resolve_model_location(str(location), tracking_uri=tracking_uri))
    if not (root / "loopy").is_dir() or not (root / "platform.yaml").is_file():
        raise ModelPackageError(f"{root}: not a Loopy model package (needs loopy/ and platform.yaml)")
    return root


def read_scheduler_config(root: Path) -> Optional[dict]:
    """The package's ``scheduler/scheduler_config.json`` without diffusers' private ``_`` keys, or None."""
    path = root / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return None
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def load_package(location: str | Path, device: str = "auto", platform_overrides: Sequence[str] = (),
                 tracking_uri: Optional[str] = None) -> LoadedPackage:
    """Load every part of a model package onto ``device`` (``auto``: the package's
    ``sampler.device``, itself ``auto`` = CUDA when available). ``platform_overrides``:
    ``section.key=value`` applied over the package's ``platform.yaml``. On CUDA the network is cast
    to ``model.dtype`` (bf16 / fp16); on CPU it stays float32."""
    root = package_root(location, tracking_uri)
    cfg = load_platform_config(root / "platform.yaml", platform_overrides)
    dev = resolve_device(cfg.sampler.device if device == "auto" else device)
    model = LoopyModel.from_pretrained(str(root / "loopy"))
    if dev.type == "cuda" and cfg.model.dtype != "float32":
        model = model.to(getattr(torch, cfg.model.dtype))
    vae, w2v = root / "vae", root / "wav2vec2"
    if vae.is_dir() and w2v.is_dir():  # self-contained package (tiny preset)
        vae_loc, w2v_loc, local_only = str(vae), str(w2v), True
    else:
        weights = resolve_weights(cfg.weights)
        vae_loc = str(vae) if vae.is_dir() else weights.vae
        w2v_loc = str(w2v) if w2v.is_dir() else weights.wav2vec2
        local_only = weights.local_files_only
    codec = LatentCodec(vae_loc, local_files_only=local_only, device=str(dev))
    extractor = AudioFeatureExtractor(w2v_loc, local_files_only=local_only, device=str(dev))
    if (root / "dwpose").is_dir():  # a registered version carries its DWPose models
        cfg = dataclasses.replace(cfg, weights=dataclasses.replace(cfg.weights, dwpose_dir=str(root / "dwpose")))
    return LoadedPackage(model, codec, extractor, PortraitCropper.from_config(cfg), cfg, dev,
                         read_scheduler_config(root), root)
