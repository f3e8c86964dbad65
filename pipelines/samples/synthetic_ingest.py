"""Synthetic ingest outputs (schema version 1) for tests and benchmarks, written with the real
writers of :mod:`pipelines.dataset.schema` so the reader is exercised on exactly the ingest format.

With ``content="index"`` every value says where it came from, so a test can check which frames a
reader returned:

* ``latent`` [4, h, w]: channel 0 = frame index, channel 1 = video number, channels 2.. = 0.5
  (float16 holds integers exactly up to 2048, so keep videos under 2048 frames).
* ``audio`` [L, D]: layer 0 = frame index, layers 1.. = video number.
* ``landmarks`` [68, 2]: :func:`synthetic_landmarks`, a fixed face layout plus a known head
  translation, a known upper-face expression motion and a large mouth motion (which must not
  count as expression).

``content="random"`` fills latents and audio with seeded Gaussian noise instead (realistic
compression for benchmarks); landmarks are the same.

``content="still"``: each video is one still "picture" (a smooth random latent field, its own
colour per video in channels 0-2, which the synthetic colour map reads as RGB) plus small noise
per frame; a model can only predict a video's frames by reading its reference (the reference-path
tests train on it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.dataset.schema import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA,
    SCHEMA_VERSION,
    FrameFileWriter,
    IngestMeta,
    frame_schema,
    frames_path,
)
from pipelines.encoders.latents import LatentColourMap
from pipelines.faces.motion_stats import NOSE_TIP, UPPER_FACE

FPS = 25.0
_MOUTH = np.arange(48, 68)


@dataclass(frozen=True)
class SyntheticVideo:
    """One written video: ``number`` is the value encoded in its latents / audio."""

    video_id: str
    number: int
    num_frames: int
    split: str
    status: str  # "ok" | "rejected"


def video_id_of(number: int) -> str:
    return f"synth{number:04d}"


def synthetic_colour_map(channels: int) -> LatentColourMap:
    """Synthetic latents have no VAE: their colour is defined as their first three channels
    (RGB = z[:3], exactly), so the reader's appearance augmentation works on them too."""
    decode = np.zeros((3, channels + 1))
    decode[:, :3] = np.eye(3)
    encode = np.zeros((channels, 4))
    encode[:3, :3] = np.eye(3)
    return LatentColourMap(decode, encode, 1.0, 1.0)


def synthetic_landmarks(frame_indices: np.ndarray, number: int) -> np.ndarray:
    """[F] frame indices of video ``number`` -> [F, 68, 2] float32 crop-normalised landmarks.

    Whole face translated by (0.02 sin(2 pi t / 50 + number), 0.0001 t); upper-face points other
    than the nose tip additionally move by 0.003 cos(2 pi t / 17) (1 + i mod 3) in y; mouth points
    by 0.05 sin(2 pi t / 6) in y (speech)."""
    t = np.asarray(frame_indices, dtype=np.float64)[:, None]  # [F, 1]
    i = np.arange(68)
    base = np.stack([0.2 + 0.6 * ((i * 7) % 68) / 67, 0.2 + 0.6 * ((i * 13) % 68) / 67], -1)
    lm = np.broadcast_to(base, (t.shape[0], 68, 2)).copy()
    lm[..., 0] += 0.02 * np.sin(2 * np.pi * t / 50 + number)
    lm[..., 1] += 0.0001 * t
    upper = np.array([p for p in UPPER_FACE if p != NOSE_TIP])
    lm[:, upper, 1] += 0.003 * np.cos(2 * np.pi * t / 17) * (1 + upper % 3)
    lm[:, _MOUTH, 1] += 0.05 * np.sin(2 * np.pi * t / 6)
    return lm.astype(np.float32)


def still_latent(number: int, latent_shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """The picture of video ``number`` for ``content="still"``: float32 [C, h, w], a smooth random
    field (bilinear upsampling of a 3 x 3 grid) of unit scale, deterministic by (seed, number)."""
    from scipy.ndimage import zoom

    c, h, w = (int(x) for x in latent_shape)
    grid = np.random.default_rng([seed, 4242, number]).standard_normal((c, 3, 3))
    return zoom(grid, (1, h / 3, w / 3), order=1)[:, :h, :w].astype(np.float32)


def _fixed_list(values: np.ndarray, arrow_type: pa.DataType) -> pa.FixedSizeListArray:
    n = values.shape[0]
    flat = pa.array(values.reshape(-1), type=arrow_type)
    return pa.FixedSizeListArray.from_arrays(flat, int(values.size // max(n, 1)))


def _frame_table(video: SyntheticVideo, start: int, stop: int, latent_shape, audio_shape,
                 content: str, rng: np.random.Generator, schema: pa.Schema) -> pa.Table:
    idx = np.arange(start, stop)
    n = idx.size
    if content == "still":
        noise = rng.standard_normal((n, *latent_shape), dtype=np.float32)
        lat = (still_latent(video.number, latent_shape)[None] + 0.05 * noise).astype(np.float16)
        aud = rng.standard_normal((n, *audio_shape), dtype=np.float32).astype(np.float16)
    elif content == "index":
        lat = np.full((n, *latent_shape), 0.5, dtype=np.float16)
        lat[:, 0] = idx[:, None, None]
        lat[:, 1] = video.number
        aud = np.full((n, *audio_shape), video.number, dtype=np.float16)
        aud[:, 0] = idx[:, None]
    else:
        lat = rng.standard_normal((n, *latent_shape), dtype=np.float32).astype(np.float16)
        aud = rng.standard_normal((n, *audio_shape), dtype=np.float32).astype(np.float16)
    lm = synthetic_landmarks(idx, video.number)
    crop = np.tile(np.array([10, 20, 10 + 128, 20 + 128], np.float32), (n, 1))
    return pa.table({
        "video_id": pa.array([video.video_id] * n, pa.string()),
        "frame_index": pa.array(idx, pa.int32()),
        "time_s": pa.array(idx / FPS, pa.float64()),
        "source_time_s": pa.array(idx / FPS, pa.float64()),
        "latent": _fixed_list(lat, pa.float16()),
        "audio": _fixed_list(aud, pa.float16()),
        "landmarks": _fixed_list(lm, pa.float32()),
        "crop_box": _fixed_list(crop, pa.float32()),
        "face_found": pa.array(np.ones(n, bool)),
    }, schema=schema)


def write_synthetic_ingest(out_dir: str | Path, num_frames: Sequence[int] = (40, 80, 136, 200),
                           latent_shape: Sequence[int] = (4, 8, 8), audio_shape: Sequence[int] = (2, 4),
                           splits: Optional[Sequence[str]] = None, num_rejected: int = 1,
                           content: Literal["index", "random", "still"] = "index", seed: int = 0,
                           chunk_frames: int = 50) -> list[SyntheticVideo]:
    """Write a complete ingest output to ``out_dir``: one ``ok`` video per entry of ``num_frames``
    (numbers 0, 1, ...; split from ``splits`` or all "train") and ``num_rejected`` rejected rows
    (no frames file, listed first). Frames are written in chunks of ``chunk_frames`` (bounded memory).
    Returns the videos in manifest order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    latent_shape, audio_shape = tuple(int(x) for x in latent_shape), tuple(int(x) for x in audio_shape)
    if content == "index" and max(num_frames, default=0) > 2048:
        raise ValueError("content='index' encodes frame indices in float16: at most 2048 frames")
    splits = list(splits) if splits is not None else ["train"] * len(num_frames)
    if len(splits) != len(num_frames):
        raise ValueError(f"{len(splits)} splits for {len(num_frames)} videos")
    IngestMeta(schema_version=SCHEMA_VERSION, fps=FPS, crop_size=latent_shape[-1] * 8,
               latent_shape=list(latent_shape), audio_shape=list(audio_shape), sample_rate=16000,
               weights={"preset": "synthetic"}, vae_scaling_factor=0.18215,
               latent_rgb_map=synthetic_colour_map(latent_shape[0]).to_dict()).write(out)
    schema = frame_schema(latent_shape, audio_shape)
    rng = np.random.default_rng(seed)
    videos: list[SyntheticVideo] = []
    rows = []
    rejected_videos, rejected_rows = [], []
    for number, (n, split) in enumerate(zip(num_frames, splits)):
        video = SyntheticVideo(video_id_of(number), number, int(n), split, "ok")
        writer = FrameFileWriter(out, video.video_id, schema)
        for start in range(0, n, chunk_frames):
            writer.write(_frame_table(video, start, min(n, start + chunk_frames), latent_shape,
                                      audio_shape, content, rng, schema))
        path = writer.close()
        videos.append(video)
        rows.append(dict(source=f"synthetic/{video.video_id}.mp4", video_id=video.video_id,
                         status="ok", reason=None, stage=None, num_frames=int(n), fps_in=FPS,
                         duration_s=n / FPS, width=256, height=256, rotation=0, audio_offset_s=0.0,
                         split=split, frames_file=str(path.relative_to(out))))
    for k in range(num_rejected):
        number = len(num_frames) + k
        video = SyntheticVideo(video_id_of(number), number, 0, "train", "rejected")
        rejected_videos.append(video)
        rejected_rows.append(dict(source=f"synthetic/{video.video_id}.mp4", video_id=video.video_id,
                         status="rejected", reason="face: no face found", stage="face",
                         num_frames=0, fps_in=FPS, duration_s=1.0, width=256, height=256,
                         rotation=0, audio_offset_s=0.0, split="train", frames_file=None))
    # rejected rows first, so "row among the ok rows" differs from the manifest row
    videos, rows = rejected_videos + videos, rejected_rows + rows
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), out / MANIFEST_NAME)
    assert all(frames_path(out, v.video_id).is_file() for v in videos if v.status == "ok")
    return videos
