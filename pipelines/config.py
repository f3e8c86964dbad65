"""Config sections of the data room (ingest job and training reader)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class IngestConfig:
    """Raw videos -> per-frame Parquet. Units: frames at ``fps``, pixels, seconds, Hz."""

    fps: float = 25.0  # output frame rate; resampling is by timestamp
    crop_size: int = 64  # output portrait side in pixels (512 for sd15)
    crop_margin: float = 0.6  # extra context around the landmark box, as a fraction of its side
    sample_rate: int = 16000  # audio, Hz, mono
    chunk_frames: int = 50  # frames decoded and processed per block: bounds peak memory
    min_frames: int = 136  # 12 clip + 124 motion frames: shorter videos are rejected
    write_jpeg: bool = False  # also store the JPEG of each crop
    detector: Literal["dlib", "dwpose"] = "dlib"
    detect_max_side: int = 480  # frames are downscaled to this longest side for detection
    # quality filters (reasons are recorded in the manifest)
    max_missing_face_ratio: float = 0.2
    max_yaw_deg: float = 60.0
    max_head_motion: float = 0.5  # std of the face centre over the video, in face widths
    max_audio_video_offset_s: float = 0.5
    test_fraction: float = 0.1  # deterministic split by hash of video_id
    num_decode_workers: Optional[int] = None  # None = Ray decides
    model_batch_size: int = 16  # frames per VAE call
    use_gpu: bool = False  # put the VAE / wav2vec2 actors on GPUs
    # ingest job (pipelines/ingest.py): splits, resume, Ray Data stage sizes
    split_key: Literal["video", "folder"] = "video"  # folder: one person's folder never spans both splits
    max_out_of_frame_ratio: float = 0.1  # share of frames whose face crop leaves the frame
    retry_rejected: bool = False  # resume: also redo videos rejected by an earlier run
    num_detect_actors: int = 1  # actor pool: probe + face detection + crop track + audio decode
    num_audio_actors: int = 1  # actor pool: wav2vec2 features
    num_vae_actors: int = 1  # actor pool: VAE latents
    stage_num_cpus: float = 0.25  # logical CPUs reserved per task/actor of each stage
    model_num_gpus: float = 1.0  # GPUs per wav2vec2 / VAE actor when use_gpu
    max_task_retries: int = 1  # a video whose worker dies this often more is recorded as rejected
    max_chunk_mb: int = 128  # full-resolution pass: fewer than chunk_frames frames per chunk for big sources
    # decoders (pipelines.video_decode backends): decord's full-resolution get_batch grew to ~4.5 GB
    # on a 1-minute 1080p file (PyAV: flat ~1 GB), so the full-resolution pass uses PyAV
    detect_decode_backend: Literal["auto", "decord", "pyav"] = "auto"  # low-res detection pass
    decode_backend: Literal["auto", "decord", "pyav"] = "pyav"  # full-resolution crop pass


@dataclass
class ReaderConfig:
    """Ingested Parquet -> Loopy training samples. Units: frames at 25 fps."""

    clip_frames: int = 12
    motion_frames: int = 124
    segment_stride: int = 4  # s: abstract frames per segment
    segment_ratio: int = 2  # r: segment k spans s * r**k frames
    abstraction: Literal["uniform", "mean"] = "uniform"
    audio_window: int = 2  # frames each side: t-2..t+2
    ref_min_distance: int = 12  # frames between the reference and the clip
    samples_per_video: int = 8  # per epoch
    early_start_prob: float = 0.2  # share of clip starts drawn with < motion_frames of history
    p_drop_audio: float = 0.10
    p_drop_motion_cond: float = 0.10
    p_drop_ref: float = 0.15
    p_drop_motion_frames: float = 0.40
    seed: int = 0
    stage: int = 2  # 1: one target frame + reference, no motion frames or audio
    split: str = "train"
