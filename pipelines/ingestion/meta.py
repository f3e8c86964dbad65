"""``DIR/ingest_meta.json`` of an ingest run, and the model facts it records.

Where each value comes from (nothing is replaced by a guess):

* ``vae_scaling_factor``: the VAE's ``config.json`` field ``scaling_factor``
  (:func:`vae_scaling_factor`). Rule: a config without the field gets diffusers'
  ``AutoencoderKL`` default :data:`DIFFUSERS_VAE_SCALING_FACTOR` (0.18215), which is the value the
  VAE stage then encodes with, so it is the right one; this is logged. A config that cannot be
  read, or a field that is not a positive number, is a :class:`ModelConfigError` naming the file
  and the field.
* ``latent_rgb_map``: the linear latent <-> RGB relation of this VAE
  (:func:`pipelines.encoders.latents.fit_colour_map`, fitted on smooth colour fields when the
  meta is written; the reader's appearance augmentation recolours cached latents with it).
* ``latent_shape`` [C, S/d, S/d] and ``audio_shape`` [L, D] (L transformer layers of wav2vec2,
  width D): those of this run's frames; else those recorded in an existing frame file of the
  directory; else those of an existing ``ingest_meta.json``; else (nothing ingested at all) the
  model configs': the VAE's ``latent_channels`` and downsampling (:func:`vae_latent_shape`) and wav2vec2's ``config.json`` fields
  ``num_hidden_layers`` / ``hidden_size`` (:func:`wav2vec2_feature_shape`; missing or unreadable:
  :class:`ModelConfigError` naming the file and field).

:func:`read_model_facts` reads both configs before the job does any work, so a bad weights
folder fails at the start (one line), not after the last video.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq

from core.sections import PlatformConfig
from core.storage import parquet_source
from core.weights import WeightPaths
from pipelines.encoders.latents import LatentCodec, fit_colour_map, vae_downsample
from pipelines.dataset.schema import (
    META_NAME,
    SCHEMA_VERSION,
    IngestFormatError,
    IngestMeta,
    frames_path,
)
from pipelines.errors import PipelineError

log = logging.getLogger(__name__)

# diffusers AutoencoderKL(scaling_factor=0.18215): the value a VAE config without the field loads with
DIFFUSERS_VAE_SCALING_FACTOR = 0.18215


class ModelConfigError(PipelineError, ValueError):
    """A model config the ingest must read (VAE / wav2vec2 ``config.json``) is missing, unreadable
    or lacks a field; the message names the file (or hub location) and the field."""


def _hub_parts(location: str) -> tuple[str, Optional[str]]:
    """``org/name[/subfolder...]`` -> (repo id, subfolder or None)."""
    parts = location.split("/")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def _local_config(folder: Path, what: str) -> tuple[dict, str]:
    """(``folder/config.json`` as a dict, its path) or :class:`ModelConfigError`."""
    path = folder / "config.json"
    try:
        conf = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelConfigError(f"{what} config {path}: cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(conf, dict):
        raise ModelConfigError(f"{what} config {path}: not a JSON object")
    return conf, str(path)


def vae_config(vae: str, local_files_only: bool) -> tuple[dict, str]:
    """(the ``config.json`` of the VAE at ``vae`` as a dict, where it was read). A local diffusers
    folder is read as JSON without importing diffusers, a hub id ``org/name[/subfolder]`` through
    ``AutoencoderKL.load_config``. Raises :class:`ModelConfigError`."""
    folder = Path(vae)
    if folder.exists():
        return _local_config(folder, "VAE")
    from diffusers import AutoencoderKL

    repo, sub = _hub_parts(vae)
    try:
        conf = AutoencoderKL.load_config(repo, subfolder=sub, local_files_only=local_files_only)
    except Exception as exc:  # noqa: BLE001 - OSError, EnvironmentError, ValueError per hub state
        raise ModelConfigError(f"VAE config of {vae!r}: cannot be loaded ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return conf, f"{vae} config.json"


def vae_scaling_factor(vae: str, local_files_only: bool) -> float:
    """The latent scaling factor of the VAE at ``vae`` (:func:`vae_config`). See the module docstring
    for the rule when the field is absent. Raises :class:`ModelConfigError`."""
    conf, where = vae_config(vae, local_files_only)
    if "scaling_factor" not in conf:
        log.warning("%s: no scaling_factor: using diffusers' AutoencoderKL default %g (the value the VAE "
                    "encodes with)", where, DIFFUSERS_VAE_SCALING_FACTOR)
        return DIFFUSERS_VAE_SCALING_FACTOR
    value = conf["scaling_factor"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ModelConfigError(f"{where}: field scaling_factor is {value!r}, not a positive number")
    return float(value)


def vae_latent_shape(vae: str, local_files_only: bool, crop_size: int) -> list[int]:
    """[C, S/d, S/d] of one ``crop_size`` frame's latent under the VAE at ``vae``: C its
    ``latent_channels`` (4 when absent, diffusers' default), d its downsampling
    (:func:`pipelines.encoders.latents.vae_downsample`). Raises :class:`ModelConfigError` when a
    field is not a positive integer or the crop is not a multiple of d."""
    conf, where = vae_config(vae, local_files_only)
    channels = conf.get("latent_channels", 4)
    if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
        raise ModelConfigError(f"{where}: field latent_channels is {channels!r}, not a positive integer")
    try:
        d = vae_downsample(conf)
    except (TypeError, ValueError):
        raise ModelConfigError(f"{where}: fields patch_size / block_out_channels do not give a "
                               f"downsampling factor") from None
    if d <= 0 or crop_size % d:
        raise ModelConfigError(f"ingest.crop_size {crop_size} is not a multiple of the VAE's downsampling "
                               f"{d} ({where})")
    return [channels, crop_size // d, crop_size // d]


def wav2vec2_feature_shape(location: str, local_files_only: bool) -> list[int]:
    """[L, D] of the audio features the wav2vec2 model at ``location`` gives: L =
    ``num_hidden_layers`` (every transformer layer is stored), D = ``hidden_size``. A local
    folder's ``config.json`` is read as JSON; a hub id through ``transformers.AutoConfig``.
    Raises :class:`ModelConfigError` naming the file and field."""
    folder = Path(location)
    if folder.exists():
        conf, where = _local_config(folder, "wav2vec2")
    else:
        from transformers import AutoConfig

        try:
            conf = AutoConfig.from_pretrained(location, local_files_only=local_files_only).to_dict()
        except Exception as exc:  # noqa: BLE001 - OSError, ValueError per hub state
            raise ModelConfigError(f"wav2vec2 config of {location!r}: cannot be loaded ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        where = f"{location} config.json"
    shape = []
    for name in ("num_hidden_layers", "hidden_size"):
        value = conf.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelConfigError(f"{where}: field {name} is {value!r}, not a positive integer")
        shape.append(value)
    return shape


@dataclass(frozen=True)
class ModelFacts:
    """What the model configs say about the ingest's output: ``vae_scaling_factor``;
    ``latent_shape`` [C, S/d, S/d] (:func:`vae_latent_shape`) and ``audio_shape`` [L, D] of one frame."""

    vae_scaling_factor: float
    latent_shape: list[int]
    audio_shape: list[int]


def read_model_facts(cfg: PlatformConfig, weights: WeightPaths) -> ModelFacts:
    """Read the VAE and wav2vec2 configs of ``weights`` (before any work). Raises
    :class:`ModelConfigError`."""
    return ModelFacts(
        vae_scaling_factor=vae_scaling_factor(weights.vae, weights.local_files_only),
        latent_shape=vae_latent_shape(weights.vae, weights.local_files_only, cfg.ingest.crop_size),
        audio_shape=wav2vec2_feature_shape(weights.wav2vec2, weights.local_files_only),
    )


def write_ingest_meta(out: Path, cfg: PlatformConfig, weights: WeightPaths, facts: ModelFacts,
                      latent_shape: Optional[list[int]], audio_shape: Optional[list[int]],
                      rows: list[dict]) -> IngestMeta:
    """Write ``out/ingest_meta.json``. ``latent_shape`` / ``audio_shape``: those of this run's
    frames (None when none were written); the other sources in the module docstring's order."""
    if latent_shape is None:
        for r in rows:
            if r["status"] == "ok":
                md = pq.read_schema(parquet_source(frames_path(out, r["video_id"]))).metadata or {}
                latent_shape = json.loads(md[b"loopy.latent_shape"])
                audio_shape = json.loads(md[b"loopy.audio_shape"])
                break
    if latent_shape is None and (out / META_NAME).is_file():
        try:
            old = IngestMeta.read(out)
            latent_shape, audio_shape = old.latent_shape, old.audio_shape
        except IngestFormatError:  # unreadable: the next source (the model configs)
            pass
    if latent_shape is None:  # nothing ingested yet: from the model configs
        latent_shape, audio_shape = facts.latent_shape, facts.audio_shape
    meta = IngestMeta(
        schema_version=SCHEMA_VERSION,
        fps=cfg.ingest.fps,
        crop_size=cfg.ingest.crop_size,
        latent_shape=list(latent_shape),
        audio_shape=list(audio_shape),
        sample_rate=cfg.ingest.sample_rate,
        weights={"preset": cfg.weights.preset, "vae": weights.vae, "wav2vec2": weights.wav2vec2,
                 "detector": cfg.ingest.detector},
        vae_scaling_factor=facts.vae_scaling_factor,
        latent_rgb_map=fit_colour_map(LatentCodec(weights.vae, cfg.weights.local_files_only)).to_dict(),
    )
    meta.write(out)
    return meta
