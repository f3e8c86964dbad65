"""Writing generated frames with the original audio into an mp4.

Timing rule: a video of ``N`` frames at ``fps`` lasts exactly ``N / fps`` seconds (one frame per
40 ms at 25 fps), and the audio track is cut (or padded with silence) to that same duration, so
audio and video end together. The sampler takes ``N`` from the audio with the ingest rule
(:func:`pipelines.audio_features.frame_count_for`: the whole frames the audio covers).

Encoding is done by the ``ffmpeg`` binary (H.264 yuv420p + AAC, ``+faststart`` so browsers can
play while loading); the raw RGB frames go to it through a pipe, the audio is read by ffmpeg
straight from the original file (any container or codec ffmpeg knows).
"""
from __future__ import annotations

import shutil
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Iterable

import numpy as np

from inference.errors import InferenceError


class VideoWriteError(InferenceError, RuntimeError):
    """ffmpeg failed to write the output file."""


def _fps_str(fps: float) -> str:
    return str(Fraction(fps).limit_denominator(1001))


def write_video(frames: Iterable[np.ndarray] | np.ndarray, out_path: str | Path, fps: float,
                audio_path: str | Path | None, num_frames: int | None = None) -> Path:
    """Write uint8 RGB frames ``[N, H, W, 3]`` (an array or an iterable of ``[n, H, W, 3]`` blocks)
    to ``out_path`` (mp4), muxing ``audio_path`` cut or padded to exactly ``N / fps`` seconds.

    ``num_frames`` (N) is required when ``frames`` is an iterable (the audio length depends on it).
    H and W must be even (yuv420p). Returns the output path.
    """
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise VideoWriteError("ffmpeg not found on PATH (install it: make sysdeps)")
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
        num_frames = frames.shape[0]
        blocks: Iterable[np.ndarray] = [frames]
        height, width = frames.shape[1:3]
    else:
        if num_frames is None:
            raise ValueError("num_frames is required when frames is an iterable of blocks")
        iterator = iter(frames)
        first = next(iterator)
        height, width = first.shape[1:3]
        blocks = _chain(first, iterator)
    if height % 2 or width % 2:
        raise ValueError(f"frame size {width}x{height} must be even for yuv420p")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    duration = num_frames / fps
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", _fps_str(fps),
           "-i", "pipe:0"]
    if audio_path is not None:
        cmd += ["-i", str(audio_path), "-map", "0:v:0", "-map", "1:a:0",
                "-af", f"apad=whole_dur={duration:.6f}", "-c:a", "aac", "-b:a", "128k"]
    cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "veryfast", "-crf", "18",
            "-t", f"{duration:.6f}", "-movflags", "+faststart",
            str(out_path)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    written = 0
    try:
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=np.uint8)
            if block.shape[1:] != (height, width, 3):
                raise ValueError(f"frame block of shape {block.shape} differs from {(height, width, 3)}")
            proc.stdin.write(block.tobytes())
            written += block.shape[0]
    except BrokenPipeError:
        pass
    finally:
        proc.stdin.close()
        stderr = proc.stderr.read().decode(errors="replace")
        proc.wait()
    if proc.returncode != 0:
        raise VideoWriteError(f"ffmpeg could not write {out_path}: {stderr.strip()[-2000:]}")
    if written != num_frames:
        raise VideoWriteError(f"{out_path}: got {written} frames, expected {num_frames}")
    return out_path


def _chain(first: np.ndarray, rest: Iterable[np.ndarray]):
    yield first
    yield from rest
