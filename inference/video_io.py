"""Writing generated frames with the original audio into an mp4.

Timing rule: a video of ``N`` frames at ``fps`` lasts exactly ``N / fps`` seconds (one frame per
40 ms at 25 fps), and the audio track is cut (or padded with silence) to that same duration, so
audio and video end together. The sampler takes ``N`` from the audio with the ingest rule
(:func:`pipelines.encoders.audio_features.frame_count_for`: the whole frames the audio covers).

Encoding is done by the ``ffmpeg`` binary (H.264 yuv420p + AAC, ``+faststart`` so browsers can
play while loading); the raw RGB frames go to it through a pipe. ffmpeg never probes a file: the
audio it reads is always a PCM WAV, opened with ``-f wav`` and ``-protocol_whitelist file`` (a file
that is anything else, e.g. the MP3 a CLI user gives, is first decoded by PyAV into a temporary
WAV, :func:`ensure_wav`), so no playlist or other demuxer can make it open another file or URL.
ffmpeg runs under a time limit and its stderr is read while the frames are written (a chatty
ffmpeg can never fill the 64 KB pipe and block).
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import wave
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from inference.errors import InferenceError
from pipelines.media.audio_decode import decode_audio

DEFAULT_TIMEOUT_S = 600.0  # one ffmpeg call: longer means it hangs
STDERR_KEEP_BYTES = 64 * 1024  # of ffmpeg's stderr kept for the error message
WAV_RATE = 48000  # Hz: decode rate of a non-WAV audio file before muxing


class VideoWriteError(InferenceError, RuntimeError):
    """ffmpeg failed to write the output file."""


def _fps_str(fps: float) -> str:
    return str(Fraction(fps).limit_denominator(1001))


def is_pcm_wav(path: str | Path) -> bool:
    """True when ``path`` is a RIFF/WAVE file of integer PCM (what :mod:`wave` reads)."""
    try:
        with wave.open(str(path), "rb") as w:
            return w.getnframes() >= 0
    except (wave.Error, EOFError, OSError):
        return False


def ensure_wav(audio_path: str | Path, tmp_dir: str | Path) -> Path:
    """``audio_path`` itself when it is a PCM WAV, else its audio decoded by PyAV (mono,
    48 kHz) into ``tmp_dir/audio.wav``."""
    if is_pcm_wav(audio_path):
        return Path(audio_path)
    track = decode_audio(audio_path, sample_rate=WAV_RATE)
    out = Path(tmp_dir) / "audio.wav"
    pcm = np.round(np.clip(track.samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(out), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(WAV_RATE)
        w.writeframes(pcm.tobytes())
    return out


class _StderrReader(threading.Thread):
    """Reads a pipe to its end in the background, keeping the last ``STDERR_KEEP_BYTES``."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe = pipe
        self.tail = b""

    def run(self) -> None:
        for chunk in iter(lambda: self.pipe.read(4096), b""):
            self.tail = (self.tail + chunk)[-STDERR_KEEP_BYTES:]

    def text(self) -> str:
        return self.tail.decode(errors="replace").strip()[-2000:]


def write_video(frames: Iterable[np.ndarray] | np.ndarray, out_path: str | Path, fps: float,
                audio_path: str | Path | None, num_frames: int | None = None,
                timeout_s: Optional[float] = DEFAULT_TIMEOUT_S) -> Path:
    """Write uint8 RGB frames ``[N, H, W, 3]`` (an array or an iterable of ``[n, H, W, 3]`` blocks)
    to ``out_path`` (mp4), muxing ``audio_path`` cut or padded to exactly ``N / fps`` seconds.

    ``num_frames`` (N) is required when ``frames`` is an iterable (the audio length depends on it).
    H and W must be even (yuv420p). ``timeout_s``: ffmpeg is killed after this many seconds
    (:class:`VideoWriteError`; None: no limit). Returns the output path.
    """
    with tempfile.TemporaryDirectory(prefix="loopy_mux_") as tmp:
        wav = None if audio_path is None else ensure_wav(audio_path, tmp)
        return _write_video(frames, Path(out_path), fps, wav, num_frames, timeout_s)


def _write_video(frames, out_path: Path, fps: float, wav: Optional[Path], num_frames: Optional[int],
                 timeout_s: Optional[float]) -> Path:
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
    if wav is not None:
        cmd += ["-f", "wav", "-protocol_whitelist", "file", "-i", f"file:{wav}", "-map", "0:v:0", "-map", "1:a:0",
                "-af", f"apad=whole_dur={duration:.6f}", "-c:a", "aac", "-b:a", "128k"]
    cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "veryfast", "-crf", "18",
            "-t", f"{duration:.6f}", "-movflags", "+faststart",
            str(out_path)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = _StderrReader(proc.stderr)
    stderr.start()
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout_s, kill) if timeout_s else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    written = 0
    complete = False
    try:
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=np.uint8)
            if block.shape[1:] != (height, width, 3):
                raise ValueError(f"frame block of shape {block.shape} differs from {(height, width, 3)}")
            proc.stdin.write(block.tobytes())
            written += block.shape[0]
        complete = True
    except BrokenPipeError:
        complete = True  # ffmpeg exited early: its exit status and stderr say why
    finally:
        if not complete:  # our error (a bad block): do not leave ffmpeg running
            proc.kill()
        try:
            proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill()
            proc.wait()
        if timer is not None:
            timer.cancel()
        stderr.join(timeout=5)
    if timed_out.is_set():
        raise VideoWriteError(f"ffmpeg did not finish {out_path} within {timeout_s:g} s")
    if proc.returncode != 0:
        raise VideoWriteError(f"ffmpeg could not write {out_path}: {stderr.text()}")
    if written != num_frames:
        raise VideoWriteError(f"{out_path}: got {written} frames, expected {num_frames}")
    return out_path


def _chain(first: np.ndarray, rest: Iterable[np.ndarray]):
    yield first
    yield from rest
