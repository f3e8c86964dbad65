"""Generation and scoring of one video of an ingested split: the evaluation job's unit of work.

For a video of an ingest output (``DIR/videos.parquet`` + ``DIR/frames/<id>.parquet``,
docs/CONTRACTS.md) :func:`read_eval_video` collects

* the **reference**: the stored latent of frame ``reference_frame`` (VAE mean x scaling factor,
  the same kind of reference training used), ``[1, 4, h, w]``;
* the **audio condition**: the stored wav2vec2 features of the video's own audio, ``[T, L, D]``
  (the features the model was trained on, one per 25 fps frame);
* the **real frames** ``uint8 [T, S, S, 3]``, from the first source that exists: the stored JPEG
  crops (``ingest.write_jpeg``), else the source video decoded at 25 fps exactly as ingest does
  (same resample plan) and cut with the stored ``crop_box`` of every frame, else the stored
  latents decoded by the package's VAE (``real_from = "latents"``: for ingest outputs without
  their sources, e.g. synthetic test data);
* the **waveform**: the source's audio decoded at 16 kHz mono, aligned to the first video frame as
  ingest aligns it, ``T / fps`` seconds (None without the source: then ``sync`` is NaN).

:func:`evaluate_video` generates ``T`` frames with :class:`inference.sampler.LoopySampler` and
scores them with :func:`pipelines.metrics.video_metrics.score_video`. When the real frames come from
JPEG crops or the source, it also scores the **codec frames**: the stored latents decoded by the
package's VAE, i.e. the best any denoiser could draw through this VAE (``codec_*`` metrics: a VAE
that loses the face caps every generated figure, and these say so). Units: frames at ``fps`` (25),
samples at 16 kHz, pixels.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq
import torch

from core.sections import SamplerConfig
from core.storage import as_location, is_remote, local_copy, parquet_source
from inference.errors import InferenceError
from inference.sampler import LoopySampler
from inference.video_io import write_video
from pipelines.dataset.schema import FrameStore, frames_path
from pipelines.faces.crop import crop_frames
from pipelines.faces.detect import FaceLandmarkDetector
from pipelines.media.audio_decode import decode_audio
from pipelines.media.probe import probe_video
from pipelines.media.video_decode import iter_frames, plan_from_timestamps
from pipelines.metrics.video_metrics import MIN_DETECT_SIDE, SYNC_DETREND_S, score_video


class EvalVideoError(InferenceError, ValueError):
    """A video of the split that cannot be evaluated (unknown id, too short, features that do not
    fit the model); the message names the video and the file."""


@dataclass
class EvalVideo:
    """Everything needed to generate and score one ingested video (see the module docstring)."""

    video_id: str
    source: str  # the manifest's source path, as given to ingest
    fps: float
    reference_frame: int
    ref_latent: np.ndarray  # float32 [1, 4, h, w]
    features: np.ndarray  # float32 [T, L, D]
    real_frames: Optional[np.ndarray]  # uint8 [T, S, S, 3]; None until decoded from latents
    real_from: str  # "jpeg" | "source" | "latents"
    samples: Optional[np.ndarray]  # float32 [round(T / fps * sample_rate)] or None (no source)
    sample_rate: int
    latents: Optional[np.ndarray] = None  # float16 [T, 4, h, w]: the stored latents of the frames
    notes: list[str] = field(default_factory=list)  # why a metric will be missing

    @property
    def num_frames(self) -> int:
        return int(self.features.shape[0])


@dataclass
class VideoEvaluation:
    """One video's metrics (floats, NaN where undefined; keys of
    :func:`pipelines.metrics.video_metrics.score_video` plus ``generate_s`` and ``score_s``) and the frames
    that were compared (uint8 [T, S, S, 3])."""

    video_id: str
    metrics: dict[str, float]
    generated: np.ndarray
    real: np.ndarray
    real_from: str
    notes: list[str]
    codec: Optional[np.ndarray] = None  # uint8 [T, S, S, 3]: the stored latents decoded (None: real_from "latents")


#: score_video keys also computed for the codec frames, stored as ``codec_<key>``.
CODEC_KEYS = ("face_found_ratio", "psnr", "ssim", "sync")


def split_videos(data_dir: str | Path, split: Optional[str] = "test") -> list[dict]:
    """The ``ok`` manifest rows of ``split`` (None = every split), in manifest order, as dicts with
    ``video_id``, ``source``, ``num_frames``, ``split``."""
    table = FrameStore(data_dir).manifest("ok")
    rows = table.select(["video_id", "source", "num_frames", "split"]).to_pylist()
    return [r for r in rows if split is None or r["split"] == split]


def resolve_source(source: Optional[str], data_dir: str | Path) -> Optional[Path]:
    """The source video file of a manifest row: the path as given, else relative to the ingest
    output's parent folder; None when neither exists (moved or synthetic data)."""
    if not source:
        return None
    if is_remote(source):  # an object of a bucket (an ingest from s3://): read through a local copy
        loc = as_location(source)
        return loc if loc.is_file() else None
    path = Path(source).expanduser()
    data = as_location(data_dir).resolve()
    for candidate in (path, data.parent / str(path)) if not path.is_absolute() else (path,):
        if candidate.is_file():
            return candidate
    return None


def source_audio(path: Path, sample_rate: int = 16000, probe=None) -> np.ndarray:
    """The audio of the source video ``path``, mono float32 at ``sample_rate`` Hz, aligned to the
    first video frame as ingest aligns it (leading audio before the first frame skipped)."""
    probe = probe or probe_video(path)
    start_delta = probe.audio_start_s - probe.video_start_s  # > 0: audio begins after the first frame
    return decode_audio(path, sample_rate=sample_rate, start_s=max(0.0, -start_delta)).samples


def decode_source_crops(path: Path, boxes: np.ndarray, crop_size: int, fps: float, probe=None) -> np.ndarray:
    """The source video ``path`` decoded at ``fps`` with ingest's resample plan (from the probe's
    timestamps) and cut with ``boxes`` [T, 4] (the stored crop boxes, source pixels after
    rotation) to ``crop_size`` -> crops uint8 [T, S, S, 3] (the frames ingest encoded)."""
    probe = probe or probe_video(path)
    plan = plan_from_timestamps(path, probe.timestamps, fps)
    n = len(boxes)
    crops = []
    done = 0
    for chunk in iter_frames(path, fps=fps, plan=plan, geometry=probe.geometry):
        stop = min(done + len(chunk), n)
        if stop > done:
            crops.append(crop_frames(chunk.frames[: stop - done], boxes[done:stop], crop_size))
        done = stop
        if done >= n:
            break
    if done < n:
        raise EvalVideoError(f"{path}: decoded {done} frames, the ingest output has {n}")
    return np.concatenate(crops)


def _decode_jpegs(blobs) -> np.ndarray:
    import io

    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])


def read_eval_video(data_dir: str | Path, video_id: str, reference_frame: int = 0,
                    max_seconds: Optional[float] = None, store: Optional[FrameStore] = None,
                    source: Optional[str] = None) -> EvalVideo:
    """Collect one ingested video's reference, audio features, real frames and waveform (module
    docstring). ``max_seconds`` keeps the first ``floor(max_seconds * fps)`` frames (None: all).
    ``source`` is the manifest's source path (looked up when None). Raises
    :class:`EvalVideoError` naming the video."""
    store = store or FrameStore(data_dir)
    fps = float(store.meta.fps)
    if source is None:
        rows = [r for r in split_videos(data_dir, None) if r["video_id"] == video_id]
        if not rows:
            raise EvalVideoError(f"{data_dir}: no ok video {video_id!r} in {as_location(data_dir) / 'videos.parquet'}")
        source = rows[0]["source"]
    total = store.num_frames(video_id)
    n = total if max_seconds is None else min(total, int(np.floor(max_seconds * fps)))
    if not 0 <= reference_frame < total:
        raise EvalVideoError(f"video {video_id}: reference frame {reference_frame} outside 0..{total - 1}")
    if n < 2:
        raise EvalVideoError(f"video {video_id}: {n} frames to evaluate (evaluation.max_seconds {max_seconds})")
    columns = ["audio", "crop_box"]
    has_jpeg = "jpeg" in pq.read_schema(parquet_source(frames_path(store.dir, video_id))).names
    if has_jpeg:
        columns.append("jpeg")
    data = store.read(video_id, range(n), columns)
    ref = store.read(video_id, [reference_frame], ["latent"])["latent"].astype(np.float32)  # [1, 4, h, w]
    notes: list[str] = []
    path = resolve_source(source, data_dir)
    samples, sample_rate = None, int(store.meta.sample_rate)
    real, real_from, latents = None, "latents", None
    if has_jpeg:
        real, real_from = _decode_jpegs(data["jpeg"]), "jpeg"
    if path is not None:
        with local_copy(path) as local:  # a bucket object: one download, removed after
            probe = probe_video(local)
            if real is None:
                real, real_from = decode_source_crops(local, data["crop_box"], store.meta.crop_size, fps,
                                                      probe), "source"
            audio = source_audio(local, sample_rate, probe)
        samples = audio[: int(round(n / fps * sample_rate))].astype(np.float32)
    else:
        notes.append(f"source video {source!r} not found: no waveform, sync metrics are NaN")
    latents = store.read(video_id, range(n), ["latent"])["latent"]
    if real is None:
        notes.append("real frames decoded from the stored latents (no JPEG crops, no source video)")
    return EvalVideo(video_id, str(source), fps, int(reference_frame), ref, data["audio"].astype(np.float32),
                     real, real_from, samples, sample_rate, latents, notes)


def _check_fits(sampler: LoopySampler, video: EvalVideo) -> None:
    mc = sampler.cfg.model
    shape = tuple(video.features.shape[1:])
    if shape != (mc.audio_layers, mc.audio_dim):
        raise EvalVideoError(f"video {video.video_id}: audio features {list(shape)} do not fit the model "
                             f"(model.audio_layers {mc.audio_layers}, model.audio_dim {mc.audio_dim})")
    want = sampler.codec.latent_shape(sampler.cfg.ingest.crop_size)
    if tuple(video.ref_latent.shape[-3:]) != tuple(want):
        raise EvalVideoError(f"video {video.video_id}: latents {list(video.ref_latent.shape[-3:])} do not fit "
                             f"the model's VAE (ingest.crop_size {sampler.cfg.ingest.crop_size} -> {list(want)})")


def generate_frames(sampler: LoopySampler, video: EvalVideo, steps: Optional[int] = None,
                    options: Optional[SamplerConfig] = None) -> np.ndarray:
    """``video.num_frames`` frames uint8 [T, S, S, 3] generated from the video's reference latent
    and its own audio features (``steps`` DDIM steps; None = the options' / package's steps)."""
    _check_fits(sampler, video)
    options = options or sampler.default_options
    if steps is not None:
        options = dataclasses.replace(options, steps=int(steps))
    ref = torch.as_tensor(video.ref_latent, dtype=torch.float32, device=sampler.device)
    latents = sampler.generate_latents(ref, video.features, options)
    return np.concatenate(list(sampler.decode_frames(latents)), axis=0)


def decode_stored_latents(sampler: LoopySampler, video: EvalVideo) -> np.ndarray:
    """``video``'s stored latents decoded by the package's VAE: uint8 [T, S, S, 3]."""
    lat = torch.as_tensor(video.latents.astype(np.float32), device=sampler.device)
    return np.concatenate(list(sampler.decode_frames(lat)), axis=0)


def real_frames_of(sampler: LoopySampler, video: EvalVideo) -> np.ndarray:
    """The real frames of ``video`` (decoded by the package's VAE when they come from latents)."""
    if video.real_frames is None:
        video.real_frames = decode_stored_latents(sampler, video)
    return video.real_frames


def evaluate_video(sampler: LoopySampler, video: EvalVideo, detector: FaceLandmarkDetector,
                   steps: Optional[int] = None, max_lag: int = 2,
                   min_detect_side: int = MIN_DETECT_SIDE, codec: bool = True,
                   detrend_s: Optional[float] = SYNC_DETREND_S) -> VideoEvaluation:
    """Generate ``video`` and score it against its real frames and waveform (``max_lag``,
    ``min_detect_side``, ``detrend_s``: those of :func:`pipelines.metrics.video_metrics.score_video`).
    Without a waveform the sync metrics are NaN (silence of the right length is scored instead,
    so the frame metrics are still computed). With ``codec`` and real frames that are not themselves decoded
    latents, the codec frames are scored too (``codec_`` + :data:`CODEC_KEYS`)."""
    t0 = time.perf_counter()
    generated = generate_frames(sampler, video, steps)
    t1 = time.perf_counter()
    real = real_frames_of(sampler, video)
    samples = video.samples
    if samples is None:
        samples = np.zeros(int(round(video.num_frames / video.fps * video.sample_rate)), np.float32)
    metrics = score_video(generated, real, samples, video.sample_rate, video.fps, detector,
                          max_lag=max_lag, min_detect_side=min_detect_side, detrend_s=detrend_s)
    codec_frames = None
    if codec and video.real_from != "latents" and video.latents is not None:
        codec_frames = decode_stored_latents(sampler, video)
        codec_metrics = score_video(codec_frames, real, samples, video.sample_rate, video.fps, detector,
                                    max_lag=max_lag, min_detect_side=min_detect_side, detrend_s=detrend_s)
        metrics.update({f"codec_{k}": codec_metrics[k] for k in CODEC_KEYS})
    if video.samples is None:
        for key in ("sync", "sync_control", "sync_gt", "sync_control_gt", "codec_sync"):
            if key in metrics:
                metrics[key] = float("nan")
    metrics["generate_s"] = t1 - t0
    metrics["score_s"] = time.perf_counter() - t1
    return VideoEvaluation(video.video_id, metrics, generated, real, video.real_from, list(video.notes),
                           codec_frames)


def write_side_by_side(real: np.ndarray, generated: np.ndarray, out_path: str | Path, fps: float,
                       samples: Optional[np.ndarray], sample_rate: int = 16000, min_height: int = 256) -> Path:
    """An mp4 of ``real | generated`` (uint8 [T, S, S, 3] each, side by side, both resized to the
    generated height or ``min_height`` px if that is larger, so 64 px crops stay watchable) with
    ``samples`` (float mono) as its audio track (None: no audio)."""
    from PIL import Image

    n = min(len(real), len(generated))
    h, w = generated.shape[1:3]
    scale = max(1.0, min_height / h)
    size = (int(round(w * scale)), int(round(h * scale)))

    def fit(frames: np.ndarray) -> np.ndarray:
        if frames.shape[1:3] == (size[1], size[0]):
            return frames
        return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BICUBIC)) for f in frames])

    frames = np.concatenate([fit(real[:n]), fit(generated[:n])], axis=2)
    if frames.shape[1] % 2 or frames.shape[2] % 2:  # yuv420p needs even sides
        frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
    with tempfile.TemporaryDirectory(prefix="loopy_eval_mux_") as tmp:
        wav = None
        if samples is not None:
            wav = Path(tmp) / "audio.wav"
            pcm = np.round(np.clip(np.asarray(samples, np.float64), -1.0, 1.0) * 32767.0).astype("<i2")
            with wave.open(str(wav), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(int(sample_rate))
                w.writeframes(pcm.tobytes())
        return write_video(np.ascontiguousarray(frames), out_path, fps, wav)
