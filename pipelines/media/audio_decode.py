"""Audio decoding with a real demuxer (PyAV / FFmpeg): any container (mp4, mkv, mov, wav, mp3,
flac, ogg, ...), any sample rate and channel count -> mono float32 at a chosen rate (16 kHz for
wav2vec2).

Rules:
* Resampling is done by FFmpeg's resampler (``av.AudioResampler``, keeping the source channel
  layout); the downmix to mono is then the plain mean of the channels, so the result stays in
  [-1, 1] (it is clipped there after resampling to remove filter overshoot).
* Times (``start_s``, ``duration_s``) are seconds from the audio stream's first sample. The stream's
  own start offset in the container is returned as ``AudioTrack.start_time_s`` so the caller can
  compare it with the video stream's start (audio/video offset).
* Every failure raises :class:`AudioDecodeError` whose message names the file and the problem (no
  audio stream, not decodable, empty). Nothing is silently replaced by zeros.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.errors import PipelineError


class AudioDecodeError(PipelineError, RuntimeError):
    """The audio of a file cannot be decoded; the message names the file and the problem."""


@dataclass
class AudioTrack:
    """Decoded mono audio.

    samples: float32 [n] in [-1, 1] at ``sample_rate`` Hz; ``duration_s`` = n / sample_rate.
    source_sample_rate / source_channels: of the audio stream in the file.
    start_time_s: the audio stream's start offset in the container (seconds, 0.0 if unknown);
    samples[0] is at container time ``start_time_s + start_s`` of the decode call.
    """

    samples: np.ndarray
    sample_rate: int
    duration_s: float
    source_sample_rate: int
    source_channels: int
    start_time_s: float
    path: str = ""

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[0])


def _open(path: str):
    import av

    if not os.path.exists(path):
        raise AudioDecodeError(f"{path}: file does not exist")
    if os.path.getsize(path) == 0:
        raise AudioDecodeError(f"{path}: empty file (0 bytes)")
    try:
        return av.open(path, mode="r")
    except Exception as exc:  # av.error.FFmpegError and subclasses, OSError
        raise AudioDecodeError(f"{path}: not a decodable media file ({type(exc).__name__}: {exc})") from exc


def decode_audio(path, sample_rate: int = 16000, start_s: float = 0.0,
                 duration_s: float | None = None) -> AudioTrack:
    """Decode the first audio stream of ``path`` to mono float32 at ``sample_rate`` Hz.

    ``start_s``: seconds from the stream's first sample to start at (the container is seeked, then
    the decoded audio is trimmed by frame timestamps). ``duration_s``: seconds to keep (None: to the
    end; the result is shorter if the file ends first, never padded).
    Raises :class:`AudioDecodeError` naming the file for: missing/empty file, no audio stream,
    undecodable data, or no samples decoded.
    """
    import av

    path = str(Path(path))
    if sample_rate <= 0:
        raise ValueError(f"decode_audio({path}): sample_rate must be > 0, got {sample_rate}")
    if start_s < 0 or (duration_s is not None and duration_s < 0):
        raise ValueError(f"decode_audio({path}): start_s and duration_s must be >= 0")
    container = _open(path)
    try:
        if not container.streams.audio:
            raise AudioDecodeError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        ctx = stream.codec_context
        src_rate = int(ctx.sample_rate or stream.rate or 0)
        src_channels = int(ctx.layout.nb_channels) if ctx.layout is not None else 0
        tb = stream.time_base
        stream_start = float(stream.start_time * tb) if (stream.start_time is not None and tb) else 0.0

        if start_s > 0 and tb:
            try:
                # 0.1 s early: the resampler's filter gets history before the first kept sample
                target = stream_start + max(0.0, start_s - 0.1)
                container.seek(int(target / tb), stream=stream, backward=True)
            except av.error.FFmpegError:
                container.seek(0)  # unseekable: decode from the start and trim by timestamps

        max_keep = None if duration_s is None else int(round(duration_s * sample_rate))
        chunks: list[np.ndarray] = []
        kept = 0
        first_time: float | None = None  # seconds from stream start of the first decoded frame
        resampler = None
        drop = 0  # output samples to drop before start_s

        def take(frames) -> None:
            nonlocal kept, drop
            for f in frames:
                arr = f.to_ndarray()  # planar float: [channels, n]
                mono = arr.mean(axis=0) if arr.shape[0] > 1 else arr[0]
                if drop:
                    cut = min(drop, mono.shape[0])
                    mono, drop = mono[cut:], drop - cut
                chunks.append(np.asarray(mono, dtype=np.float32))
                kept += mono.shape[0]

        try:
            for frame in container.decode(stream):
                if resampler is None:
                    t = frame.time
                    first_time = (float(t) - stream_start) if t is not None else 0.0
                    drop = max(0, int(round((start_s - first_time) * sample_rate)))
                    if first_time > start_s + 0.5 and start_s > 0:
                        raise AudioDecodeError(
                            f"{path}: seek to {start_s:.3f}s landed at {first_time:.3f}s")
                    src_channels = src_channels or frame.layout.nb_channels
                    src_rate = src_rate or frame.sample_rate
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=sample_rate)
                take(resampler.resample(frame))
                if max_keep is not None and kept >= max_keep + sample_rate:  # margin for resampler delay
                    break
            if resampler is not None:
                take(resampler.resample(None))  # flush the resampler's buffered tail
        except AudioDecodeError:
            raise
        except Exception as exc:
            raise AudioDecodeError(
                f"{path}: audio stream {stream.index} ({ctx.name}) is not decodable "
                f"({type(exc).__name__}: {exc})") from exc
    finally:
        container.close()

    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if max_keep is not None:
        samples = samples[:max_keep]
    if samples.size == 0:
        where = f" after {start_s:.3f}s" if start_s else ""
        raise AudioDecodeError(f"{path}: no audio samples decoded{where} (empty audio stream)")
    if not np.isfinite(samples).all():
        raise AudioDecodeError(f"{path}: decoded audio contains NaN or inf")
    np.clip(samples, -1.0, 1.0, out=samples)
    return AudioTrack(
        samples=np.ascontiguousarray(samples), sample_rate=int(sample_rate),
        duration_s=samples.shape[0] / sample_rate, source_sample_rate=src_rate,
        source_channels=src_channels, start_time_s=stream_start, path=path,
    )


def audio_level_dbfs(samples: np.ndarray) -> float:
    """RMS level in dB relative to full scale (amplitude 1.0): a full-scale sine is -3.01 dBFS,
    digital silence is ``-inf``, an empty array is ``-inf``."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        return float("-inf")
    rms = math.sqrt(float(np.mean(x * x)))
    return 20.0 * math.log10(rms) if rms > 0 else float("-inf")


def is_silent(samples: np.ndarray, threshold_dbfs: float = -50.0) -> bool:
    """True when the RMS level (:func:`audio_level_dbfs`) is below ``threshold_dbfs``."""
    return audio_level_dbfs(samples) < threshold_dbfs
