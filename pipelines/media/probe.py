"""Container facts of one video file (PyAV): duration, frame rate, size, rotation, timestamps,
stream start times, audio.

``probe_video(path) -> VideoProbe`` opens the file **once** and reads everything the later ingest
steps need from the container (so they do not open it again to ask): one demux pass over the
video packets gives every frame's presentation time (``VideoProbe.timestamps``) and, by decoding
packets only until the first frame comes out, the coded size and rotation. It never returns a
half-filled result: any problem raises :class:`ProbeError` whose message starts with the file
path and says what is wrong (empty file, not a media file, no video stream, undecodable first
frame, no frames).

Stream start times: ``VideoProbe.video_start_s`` / ``audio_start_s`` are the streams' own start
offsets in the container. Rule for a stream whose container records no start time: it is taken
to start at 0.0 s (FFmpeg's convention for such streams); this is logged, never silent.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from pipelines.errors import PipelineError

log = logging.getLogger(__name__)

# A stream is called variable frame rate when its frame intervals spread by more than this
# share of the median interval (ignoring container rounding of one time-base tick).
VFR_TOLERANCE = 0.05


class ProbeError(PipelineError, ValueError):
    """A file that cannot be used as a video; the message names the file and the problem."""


class ProbeLimitError(ProbeError):
    """A file over a limit that the stream header shows before anything is decoded (pixels per
    frame); the ingest records it at stage ``limits``."""


def header_pixels(stream) -> int:
    """Coded width x height of a PyAV video stream from its header (codec parameters), 0 when the
    header does not say; nothing is decoded."""
    ctx = stream.codec_context
    return int(ctx.width or 0) * int(ctx.height or 0)


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


@dataclass(frozen=True)
class FrameGeometry:
    """Size of the frames as stored (pixels, before rotation) and the display rotation
    (degrees counter-clockwise: 0, 90, 180 or 270)."""

    coded_width: int
    coded_height: int
    rotation: int

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) in pixels after the rotation."""
        if self.rotation in (90, 270):
            return self.coded_height, self.coded_width
        return self.coded_width, self.coded_height


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
    video_start_s: float = 0.0  # video stream start in the container (s; 0.0 when not recorded)
    audio_start_s: float = 0.0  # audio stream start in the container (s; 0.0 when not recorded/no audio)
    # every video frame's presentation time (the decoders' resample plan is built from it)
    timestamps: Optional[VideoTimestamps] = field(default=None, repr=False, compare=False)

    @property
    def geometry(self) -> FrameGeometry:
        return FrameGeometry(self.coded_width, self.coded_height, self.rotation)

    def to_dict(self) -> dict:
        """The scalar facts (the per-frame ``timestamps`` left out)."""
        out = asdict(self)
        out.pop("timestamps", None)
        return out

    def to_record(self) -> tuple[str, np.ndarray]:
        """The whole probe as (JSON of the scalars incl. the timestamps' ``last_duration_s`` /
        ``start_ticks`` / ``time_base``, ``pts_s`` f64 [n] seconds), for a row of a later task
        that must not probe the file again; :meth:`from_record` is the inverse."""
        facts = self.to_dict()
        stamps = self.timestamps
        if stamps is not None:
            facts["timestamps"] = {"last_duration_s": float(stamps.last_duration_s),
                                   "start_ticks": int(stamps.start_ticks), "time_base": float(stamps.time_base)}
            pts = np.asarray(stamps.pts_s, np.float64)
        else:
            pts = np.zeros((0,), np.float64)
        return json.dumps(facts), pts

    @classmethod
    def from_record(cls, facts_json: str, pts_s: np.ndarray) -> "VideoProbe":
        """Inverse of :meth:`to_record`."""
        facts = json.loads(facts_json)
        ts = facts.pop("timestamps", None)
        stamps = None if ts is None else VideoTimestamps(np.asarray(pts_s, np.float64), float(ts["last_duration_s"]),
                                                         int(ts["start_ticks"]), float(ts["time_base"]))
        return cls(**facts, timestamps=stamps)


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


def _timestamps(path: Path, pts: list[int], durs: list[int], tb: float) -> VideoTimestamps:
    """Packet pts / durations (ticks, decode order) -> sorted :class:`VideoTimestamps`."""
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


def _demux_video(container, path: Path, decode_first: bool
                 ) -> tuple[VideoTimestamps, Optional[FrameGeometry]]:
    """One pass over the video packets of ``container``: their timestamps, and with
    ``decode_first`` the geometry of the first frame (packets are decoded only until it comes
    out). Raises :class:`ProbeError` naming the file."""
    stream = container.streams.video[0]
    tb = float(stream.time_base)
    pts, durs = [], []
    geometry: Optional[FrameGeometry] = None
    decode_error: Optional[Exception] = None
    try:
        for packet in container.demux(stream):
            if decode_first and geometry is None and decode_error is None:
                try:  # the flush packet at the end (size 0) drains a decoder with delay
                    frames = packet.decode()
                except Exception as exc:  # noqa: BLE001 - reported below, as before: first frame
                    decode_error = exc
                    frames = []
                if frames:
                    geometry = frame_geometry(frames[0], path)
            if packet.pts is None or packet.size == 0:
                continue
            pts.append(packet.pts)
            durs.append(packet.duration or 0)
    except ProbeError:
        raise
    except Exception as exc:
        raise ProbeError(
            f"{path}: demuxing failed after {len(pts)} video packets ({type(exc).__name__}: {exc})"
        ) from exc
    if decode_first and geometry is None:
        if decode_error is not None:
            raise ProbeError(f"{path}: first video frame cannot be decoded "
                             f"({type(decode_error).__name__}: {decode_error})") from decode_error
        raise ProbeError(f"{path}: the video stream has no decodable frame")
    return _timestamps(path, pts, durs, tb), geometry


def read_video_pts(path: str | Path) -> VideoTimestamps:
    """Presentation times of every video frame, by demuxing packets (no decoding). One open.

    Raises :class:`ProbeError` naming the file (empty, not media, no video, no frames)."""
    path = Path(path)
    container = open_media(path)
    try:
        if not container.streams.video:
            raise ProbeError(f"{path}: no video stream")
        return _demux_video(container, path, decode_first=False)[0]
    finally:
        container.close()


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


def frame_geometry(frame, path: Path) -> FrameGeometry:
    """:class:`FrameGeometry` of one decoded PyAV video frame (``frame.rotation`` is the display
    matrix's counter-clockwise rotation). Raises :class:`ProbeError` naming the file when the
    rotation is not a multiple of 90 degrees."""
    rotation = int(round(getattr(frame, "rotation", 0) or 0)) % 360
    if rotation % 90:
        raise ProbeError(f"{path}: unsupported rotation {rotation} degrees (multiples of 90 only)")
    return FrameGeometry(int(frame.width), int(frame.height), rotation)


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
    g = frame_geometry(frame, path)
    return g.coded_width, g.coded_height, g.rotation


def _stream_start_s(stream, path: Path, what: str) -> float:
    """A stream's start offset in the container (s). Not recorded: 0.0 (the rule in the module
    docstring), with a log line."""
    if stream.start_time is None or not stream.time_base:
        log.warning("%s: the %s stream records no start time: taken as 0.0 s", path, what)
        return 0.0
    return float(stream.start_time * stream.time_base)


def probe_video(path: str | Path, max_pixels: Optional[int] = None) -> VideoProbe:
    """Probe one file, opening it once (see the module docstring). Raises :class:`ProbeError`
    naming the file and the problem; with ``max_pixels``, :class:`ProbeLimitError` when the
    stream header's coded width x height exceeds it (checked before any packet is read or decoded:
    a decode bomb costs nothing)."""
    path = Path(path)
    container = open_media(path)
    try:
        if not container.streams.video:
            raise ProbeError(f"{path}: no video stream")
        vs = container.streams.video[0]
        pixels = header_pixels(vs)
        if max_pixels is not None and pixels > max_pixels:
            ctx = vs.codec_context
            raise ProbeLimitError(f"{path}: {ctx.width}x{ctx.height} = {pixels} pixels per frame > max_pixels "
                                  f"{max_pixels} (stream header, nothing decoded)")
        codec = vs.codec_context.name
        tick = float(vs.time_base) if vs.time_base else 0.0
        video_start = _stream_start_s(vs, path, "video")
        audio = container.streams.audio[0] if container.streams.audio else None
        a_rate = a_ch = a_dur = None
        audio_start = 0.0
        if audio is not None:
            a_rate = int(audio.codec_context.sample_rate or audio.rate or 0) or None
            a_ch = int(audio.codec_context.channels) if audio.codec_context.channels else None
            if audio.duration is not None and audio.time_base:
                a_dur = float(audio.duration * audio.time_base)
            audio_start = _stream_start_s(audio, path, "audio")
        stamps, geometry = _demux_video(container, path, decode_first=True)
    finally:
        container.close()

    pts = stamps.pts_s
    duration = stamps.duration_s
    if duration <= 0:
        raise ProbeError(f"{path}: video duration is zero")
    n = len(pts)
    width, height = geometry.display_size
    return VideoProbe(
        path=str(path),
        duration_s=duration,
        fps=n / duration,
        num_frames_est=n,
        width=int(width),
        height=int(height),
        rotation=geometry.rotation,
        has_audio=audio is not None,
        audio_sample_rate=a_rate,
        audio_channels=a_ch,
        audio_duration_s=a_dur,
        codec=codec,
        is_variable_frame_rate=is_variable_rate(pts, tick),
        coded_width=geometry.coded_width,
        coded_height=geometry.coded_height,
        video_start_s=video_start,
        audio_start_s=audio_start,
        timestamps=stamps,
    )
