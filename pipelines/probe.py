"""Container facts of one video file (PyAV): duration, frame rate, size, rotation, audio.

``probe_video(path) -> VideoProbe`` never returns a half-filled result: any problem raises
:class:`ProbeError` whose message starts with the file path and says what is wrong (empty file,
not a media file, no video stream, undecodable first frame).
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from pipelines.errors import PipelineError

# A stream is called variable frame rate when its frame intervals spread by more than this
# share of the median interval (ignoring container rounding of one time-base tick).
VFR_TOLERANCE = 0.05


class ProbeError(PipelineError, ValueError):
    """A file that cannot be used as a video; the message names the file and the problem."""


@dataclass
class VideoProbe:
    """What the container says about one video. Units: seconds, frames/s, pixels, Hz, degrees."""

    path: str
    duration_s: float  # video stream: last frame end - first frame start, from timestamps
    fps: float  # average frame rate: frames / duration
    num_frames_est: int  # source frames (counted from the packet timestamps)
    width: int  # display width (after rotation)
    height: int  # display height (after rotation)
    rotation: int  # degrees counter-clockwise to apply for display (0, 90, 180, 270)
    has_audio: bool
    audio_sample_rate: Optional[int]  # Hz, None without audio
    audio_channels: Optional[int]
    audio_duration_s: Optional[float]  # from the audio stream header, None when unknown
    codec: str  # video codec name, e.g. "h264"
    is_variable_frame_rate: bool
    coded_width: int = 0  # as stored, before rotation
    coded_height: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def open_media(path: Path):
    """``av.open`` for reading, after checking the file exists and is not empty; raises
    :class:`ProbeError` naming the file."""
    import av

    if not path.exists():
        raise ProbeError(f"{path}: file does not exist")
    if not path.is_file():
        raise ProbeError(f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise ProbeError(f"{path}: empty file (0 bytes)")
    try:
        return av.open(str(path), mode="r")
    except Exception as exc:  # PyAV raises InvalidDataError, OSError, ... per format
        raise ProbeError(f"{path}: not a readable media file ({type(exc).__name__}: {exc})") from exc


@dataclass
class VideoTimestamps:
    """Presentation times of the video frames of one file.

    pts_s: float64 [n] sorted, seconds, relative to the first frame (``pts_s[0] == 0``).
    last_duration_s: duration of the last frame (its packet duration, else the median interval).
    start_ticks: pts of the first frame in ``time_base`` units (``pts_s = (pts - start) * tb``).
    time_base: seconds per tick of the video stream.
    """

    pts_s: np.ndarray
    last_duration_s: float
    start_ticks: int
    time_base: float

    @property
    def duration_s(self) -> float:
        return float(self.pts_s[-1] + self.last_duration_s)


def read_video_pts(path: str | Path) -> VideoTimestamps:
    """Presentation times of every video frame, by demuxing packets (no decoding).

    Raises :class:`ProbeError` naming the file (empty, not media, no video, no frames)."""
    path = Path(path)
    container = open_media(path)
    try:
        if not container.streams.video:
            raise ProbeError(f"{path}: no video stream")
        stream = container.streams.video[0]
        tb = float(stream.time_base)
        pts, durs = [], []
        try:
            for packet in container.demux(stream):
                if packet.pts is None or packet.size == 0:
                    continue
                pts.append(packet.pts)
                durs.append(packet.duration or 0)
        except Exception as exc:
            raise ProbeError(
                f"{path}: demuxing failed after {len(pts)} video packets ({type(exc).__name__}: {exc})"
            ) from exc
    finally:
        container.close()
    if not pts:
        raise ProbeError(f"{path}: the video stream has no frames")
    order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
    ticks = np.asarray(pts, dtype=np.int64)[order]
    last_dur_ticks = int(np.asarray(durs, dtype=np.int64)[order][-1])
    times = (ticks - ticks[0]).astype(np.float64) * tb
    if last_dur_ticks > 0:
        last = last_dur_ticks * tb
    elif len(times) > 1:
        last = float(np.median(np.diff(times)))
    else:
        last = 0.04
    return VideoTimestamps(times, float(last), int(ticks[0]), tb)


def is_variable_rate(pts_s: np.ndarray, tick_s: float = 0.0) -> bool:
    """True when the frame intervals of ``pts_s`` [n] (seconds) are not all equal (within
    ``VFR_TOLERANCE`` of the median plus one time-base tick ``tick_s``)."""
    if len(pts_s) < 3:
        return False
    d = np.diff(pts_s)
    med = float(np.median(d))
    if med <= 0:
        return True
    return bool(np.max(np.abs(d - med)) > VFR_TOLERANCE * med + tick_s)


def first_frame_geometry(container, path: Path) -> tuple[int, int, int]:
    """(coded width, coded height, rotation in counter-clockwise degrees) from the first decoded
    frame of ``container``'s first video stream (the container must have one).

    Raises :class:`ProbeError` naming the file when no frame decodes or the rotation is not a
    multiple of 90 degrees."""
    try:
        frame = next(container.decode(video=0))
    except StopIteration:
        raise ProbeError(f"{path}: the video stream has no decodable frame") from None
    except Exception as exc:
        raise ProbeError(f"{path}: first video frame cannot be decoded ({type(exc).__name__}: {exc})") from exc
    rotation = int(round(getattr(frame, "rotation", 0) or 0)) % 360
    if rotation % 90:
        raise ProbeError(f"{path}: unsupported rotation {rotation} degrees (multiples of 90 only)")
    return frame.width, frame.height, rotation


def probe_video(path: str | Path) -> VideoProbe:
    """Probe one file. Raises :class:`ProbeError` naming the file and the problem."""
    path = Path(path)
    container = open_media(path)
    try:
        if not container.streams.video:
            raise ProbeError(f"{path}: no video stream")
        vs = container.streams.video[0]
        codec = vs.codec_context.name
        tick = float(vs.time_base) if vs.time_base else 0.0
        coded_w, coded_h, rotation = first_frame_geometry(container, path)
        audio = container.streams.audio[0] if container.streams.audio else None
        a_rate = a_ch = a_dur = None
        if audio is not None:
            a_rate = int(audio.codec_context.sample_rate or audio.rate or 0) or None
            a_ch = int(audio.codec_context.channels) if audio.codec_context.channels else None
            if audio.duration is not None and audio.time_base:
                a_dur = float(audio.duration * audio.time_base)
    finally:
        container.close()

    stamps = read_video_pts(path)
    pts = stamps.pts_s
    duration = stamps.duration_s
    if duration <= 0:
        raise ProbeError(f"{path}: video duration is zero")
    n = len(pts)
    width, height = (coded_h, coded_w) if rotation in (90, 270) else (coded_w, coded_h)
    return VideoProbe(
        path=str(path),
        duration_s=duration,
        fps=n / duration,
        num_frames_est=n,
        width=int(width),
        height=int(height),
        rotation=rotation,
        has_audio=audio is not None,
        audio_sample_rate=a_rate,
        audio_channels=a_ch,
        audio_duration_s=a_dur,
        codec=codec,
        is_variable_frame_rate=is_variable_rate(pts, tick),
        coded_width=int(coded_w),
        coded_height=int(coded_h),
    )
