"""Streaming video decode, resampled to a fixed frame rate (25 fps) **by timestamp**.

The rule (``resample_indices``):

* Source times are the presentation timestamps of the video frames, relative to the first
  frame (``pts[0] == 0``), sorted.
* The source duration is ``pts[-1] + duration of the last frame`` (its packet duration, else the
  median frame interval).
* The output has ``N = floor(duration_s * fps + 1e-6)`` frames; output frame ``k`` shows time
  ``t_k = k / fps`` seconds and takes the source frame whose presentation interval contains
  ``t_k``: the latest source frame with ``pts <= t_k + EPS_S`` (``EPS_S`` = 0.1 ms absorbs
  time-base rounding). This is correct for 25, 29.97, 30, 50, 60 fps and variable frame rate;
  it never drifts because every output frame is placed by its own time, not by counting.

Decoding (``iter_frames``) streams: frames are produced in chunks of ``chunk_frames`` output
frames (uint8 RGB), only the needed source frames are converted to RGB, and peak memory is
bounded by one chunk (the whole video is never held). Backends: PyAV (default: sequential
threaded decode, frames picked by pts, flat memory) and decord (``get_batch`` of the needed
source indices). ``backend="auto"`` starts with PyAV and, if PyAV fails part-way, continues with
decord from the failing output frame. decord is not the default because, measured here
(benchmarks/bench_video.py), its read-ahead makes memory grow far beyond one chunk (upstream
issues dmlc/decord#157, #208) and it was slower; it cannot read rotated videos either (decord 0.6
ignores the display matrix and returns a wrongly shaped buffer), so those use PyAV only.
decord's timestamps are checked against the container's before use. Rotation metadata is
honoured: frames come out in display orientation.

Opens per ``iter_frames`` call: one for the decoding itself, plus one to read the timestamps
(``plan``) and one to read the first frame's geometry (``geometry``) unless the caller passes
them; the ingest passes both from its one :func:`pipelines.media.probe.probe_video` of the file
(:func:`plan_from_timestamps`, ``VideoProbe.geometry``), so each of its decode passes opens the
file once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from pipelines.errors import PipelineError
from pipelines.media.probe import (
    FrameGeometry,
    ProbeError,
    VideoTimestamps,
    first_frame_geometry,
    open_media,
    read_video_pts,
)

log = logging.getLogger(__name__)

EPS_S = 1e-4  # seconds: tolerance of "pts <= t" for time-base rounding
_TS_AGREE_S = 2e-3  # decord and container timestamps must agree within this (seconds)


class DecodeError(PipelineError, RuntimeError):
    """A video that cannot be decoded; the message names the file and the frame position."""


@dataclass
class FrameChunk:
    """``n`` consecutive output frames.

    start_index: output index of ``frames[0]`` (frames at ``fps``, 0-based).
    frames: uint8 [n, H, W, 3] RGB, display orientation (rotation applied), possibly downsized.
    times_s: float64 [n] output times ``(start_index + i) / fps`` (seconds).
    source_times_s: float64 [n] presentation time of the source frame used (seconds, relative
        to the first source frame).
    """

    start_index: int
    frames: np.ndarray
    times_s: np.ndarray
    source_times_s: np.ndarray

    def __len__(self) -> int:
        return int(self.frames.shape[0])


@dataclass
class ResamplePlan:
    """Which source frame each output frame takes.

    source_pts_s: float64 [n_src] sorted source times (s, first frame = 0).
    source_indices: int64 [N] source frame (presentation order) for output frame k.
    times_s: float64 [N] output times k / fps.
    duration_s: source duration from the timestamps (s).
    """

    path: str
    fps: float
    source_pts_s: np.ndarray
    source_indices: np.ndarray
    times_s: np.ndarray
    duration_s: float
    start_ticks: int = 0  # pts of the first source frame, stream time-base units

    @property
    def num_frames(self) -> int:
        return int(len(self.source_indices))


def num_output_frames(duration_s: float, fps_out: float) -> int:
    """``floor(duration_s * fps_out)`` (with a 1e-6 frame tolerance for float rounding)."""
    return max(0, int(np.floor(duration_s * fps_out + 1e-6)))


def resample_indices(source_pts_s: np.ndarray, fps_out: float, duration_s: float) -> np.ndarray:
    """The timestamp rule: int64 [N] source index for each output frame.

    ``source_pts_s``: float64 [n] presentation times in seconds, sorted, first frame at 0 (a
    first frame later than 0 is used for the output times before it). ``N =
    num_output_frames(duration_s, fps_out)``; output frame k (time k / fps_out) takes the latest
    source frame with ``pts <= k / fps_out + EPS_S``.
    """
    pts = np.asarray(source_pts_s, dtype=np.float64)
    if pts.ndim != 1 or len(pts) == 0:
        raise ValueError("source_pts_s must be a non-empty 1-D array of seconds")
    if np.any(np.diff(pts) < 0):
        raise ValueError("source_pts_s must be sorted (presentation order)")
    if fps_out <= 0:
        raise ValueError(f"fps_out must be > 0, got {fps_out}")
    n_out = num_output_frames(duration_s, fps_out)
    times = np.arange(n_out, dtype=np.float64) / fps_out
    idx = np.searchsorted(pts, times + EPS_S, side="right") - 1
    return np.clip(idx, 0, len(pts) - 1).astype(np.int64)


def plan_resample(path: str | Path, fps: float = 25.0) -> ResamplePlan:
    """Container timestamps of ``path`` (PyAV demux, no decoding) -> :class:`ResamplePlan`.

    Raises :class:`DecodeError` (naming the file) when the file cannot be demuxed."""
    try:
        stamps = read_video_pts(path)
    except ProbeError as exc:
        raise DecodeError(str(exc)) from exc
    return plan_from_timestamps(path, stamps, fps)


def plan_from_timestamps(path: str | Path, stamps: VideoTimestamps, fps: float = 25.0) -> ResamplePlan:
    """The :class:`ResamplePlan` of already-read timestamps (e.g. ``VideoProbe.timestamps``):
    no file access. ``stamps.pts_s`` float64 [n] seconds from the first frame; ``fps`` output
    frames per second."""
    duration = stamps.duration_s
    idx = resample_indices(stamps.pts_s, fps, duration)
    times = np.arange(len(idx), dtype=np.float64) / fps
    return ResamplePlan(str(path), float(fps), np.asarray(stamps.pts_s, np.float64), idx, times, duration,
                        int(stamps.start_ticks))


def range_plan(plan: ResamplePlan, start: int, end: int) -> ResamplePlan:
    """The output frames ``[start, end)`` of ``plan`` (times stay the source's: ``times_s[0]``
    = ``start / fps``); the decoders seek to the range (PyAV to the key frame before it)."""
    start, end = max(0, int(start)), min(plan.num_frames, int(end))
    return replace(plan, source_indices=plan.source_indices[start:end], times_s=plan.times_s[start:end])


def _display_size(coded_w: int, coded_h: int, rotation: int, max_side: Optional[int]) -> tuple[int, int]:
    """Coded (w, h) to decode to so that the display frame's longest side is <= max_side."""
    if not max_side or max(coded_w, coded_h) <= max_side:
        return coded_w, coded_h
    scale = max_side / max(coded_w, coded_h)
    return max(2, int(round(coded_w * scale))), max(2, int(round(coded_h * scale)))


def _rotate(frames: np.ndarray, rotation: int) -> np.ndarray:
    """Apply a counter-clockwise display rotation (degrees) to [..., H, W, 3] frames."""
    k = (rotation // 90) % 4
    if k == 0:
        return frames
    return np.ascontiguousarray(np.rot90(frames, k=k, axes=(-3, -2)))


def _container_facts(path: Path) -> FrameGeometry:
    """Coded size and rotation (ccw degrees) from the first decoded frame (opens the file)."""
    container = open_media(path)
    try:
        if not container.streams.video:
            raise DecodeError(f"{path}: no video stream")
        return FrameGeometry(*first_frame_geometry(container, path))
    except ProbeError as exc:
        raise DecodeError(str(exc)) from exc
    finally:
        container.close()


def iter_frames(path: str | Path, fps: float = 25.0, chunk_frames: int = 50,
                max_side: Optional[int] = None, backend: str = "auto",
                plan: Optional[ResamplePlan] = None,
                geometry: Optional[FrameGeometry] = None) -> Iterator[FrameChunk]:
    """Decode ``path`` resampled to ``fps`` by timestamp, in chunks of ``chunk_frames`` frames.

    Yields :class:`FrameChunk` (uint8 RGB [n, H, W, 3], display orientation); ``max_side``
    downsizes so that the longest side is at most that many pixels (aspect kept). ``backend``:
    ``"auto"`` (PyAV, then decord from the failing frame on if PyAV fails), ``"pyav"`` or
    ``"decord"`` (alone). ``plan`` reuses a :func:`plan_resample` / :func:`plan_from_timestamps`
    result and ``geometry`` a probe's :class:`~pipelines.media.probe.FrameGeometry` (coded size and
    rotation); each one given saves an open of the file. Raises :class:`DecodeError` naming the
    file and the output frame where decoding failed.
    """
    path = Path(path)
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    order = {"auto": ["pyav", "decord"], "pyav": ["pyav"], "decord": ["decord"]}.get(backend)
    if order is None:
        raise ValueError(f"backend must be auto, decord or pyav, got {backend!r}")
    if plan is None:
        plan = plan_resample(path, fps)
    if geometry is None:
        geometry = _container_facts(path)
    coded_w, coded_h, rotation = geometry.coded_width, geometry.coded_height, geometry.rotation
    if rotation and "decord" in order:
        if backend == "decord":
            raise DecodeError(f"{path}: decord does not honour rotation ({rotation} degrees); use PyAV")
        order.remove("decord")
    out_w, out_h = _display_size(coded_w, coded_h, rotation, max_side)

    start = 0
    failures = []
    for name in order:
        try:
            if name == "pyav":
                chunks = _iter_pyav(path, plan, chunk_frames, out_w, out_h, rotation)
            else:
                chunks = _iter_decord(path, plan, chunk_frames, out_w, out_h, coded_w, coded_h, start)
            for chunk in chunks:
                yield chunk
                start = chunk.start_index + len(chunk)
            return
        except _BackendFailure as exc:
            failures.append(f"{name}: {exc}")
            log.warning("%s: %s failed at output frame %d (%s)", path, name, start, exc)
    raise DecodeError(f"{path}: cannot decode output frame {start} (t={start / plan.fps:.3f}s): "
                      + "; ".join(failures))


_SEEK_MARGIN_S = 0.5  # a late plan seeks this far before its first frame (then back to its key frame)


class _BackendFailure(Exception):
    """One backend cannot go on; ``iter_frames`` resumes with the next one or gives up."""


def _iter_decord(path: Path, plan: ResamplePlan, chunk_frames: int, out_w: int, out_h: int,
                 coded_w: int, coded_h: int, start: int) -> Iterator[FrameChunk]:
    """decord ``get_batch`` of the needed source indices, chunk by chunk. Note: decord 0.6 reads
    ahead on a thread and its memory is not bounded by the chunk (hundreds of MB at 1080p)."""
    try:
        import decord

        resize = (out_w, out_h) != (coded_w, coded_h)
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), width=out_w if resize else -1,
                                height=out_h if resize else -1, num_threads=0)
        n = len(vr)
        if n != len(plan.source_pts_s):
            raise _BackendFailure(f"decord sees {n} frames, the container {len(plan.source_pts_s)}")
        ts = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64)[:, 0]
        ts = ts - ts[0]
        if np.max(np.abs(ts - plan.source_pts_s)) > _TS_AGREE_S:
            raise _BackendFailure("decord timestamps disagree with the container's")
    except _BackendFailure:
        raise
    except Exception as exc:
        raise _BackendFailure(f"{type(exc).__name__}: {exc}") from exc

    for k0 in range(start, plan.num_frames, chunk_frames):
        idx = plan.source_indices[k0:k0 + chunk_frames]
        uniq, inverse = np.unique(idx, return_inverse=True)
        try:
            batch = vr.get_batch(uniq.tolist()).asnumpy()
        except Exception as exc:
            raise _BackendFailure(f"get_batch of source frames {uniq[0]}..{uniq[-1]}: {exc}") from exc
        if batch.shape[1:] != (out_h, out_w, 3):
            raise _BackendFailure(f"unexpected frame shape {batch.shape[1:]}, wanted {(out_h, out_w, 3)}")
        frames = batch[inverse] if len(uniq) != len(idx) else batch
        yield FrameChunk(k0, frames, plan.times_s[k0:k0 + len(idx)], plan.source_pts_s[idx])


def _iter_pyav(path: Path, plan: ResamplePlan, chunk_frames: int, out_w: int, out_h: int,
               rotation: int) -> Iterator[FrameChunk]:
    """Sequential PyAV decode (threaded), keeping only the frames the plan needs. Each chunk is
    written into one preallocated uint8 array: memory = the chunk + the decoder's buffers."""
    import av

    n_out = plan.num_frames
    targets = plan.source_pts_s[plan.source_indices]  # source time wanted by each output frame
    swap = (rotation // 90) % 2 == 1
    disp_h, disp_w = (out_w, out_h) if swap else (out_h, out_w)
    k = 0
    buf: Optional[np.ndarray] = None
    filled = 0

    def put(rgb: np.ndarray) -> Optional[FrameChunk]:
        """Store output frame k; return the chunk when it is full."""
        nonlocal buf, filled, k
        if buf is None:
            buf = np.empty((min(chunk_frames, n_out - k), disp_h, disp_w, 3), dtype=np.uint8)
            filled = 0
        buf[filled] = _rotate(rgb, rotation) if rotation else rgb
        filled += 1
        k += 1
        if filled == len(buf):
            k0 = k - filled
            chunk = FrameChunk(k0, buf, plan.times_s[k0:k], targets[k0:k])
            buf = None
            return chunk
        return None

    try:
        container = av.open(str(path))
    except Exception as exc:
        raise _BackendFailure(f"cannot open ({type(exc).__name__}: {exc})") from exc
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        tb = float(stream.time_base)
        t0_ticks = plan.start_ticks

        prev = None  # (time_s, VideoFrame) of the last decoded frame
        cache: dict[int, np.ndarray] = {}  # pts -> RGB of the last converted frame

        def convert(frame) -> np.ndarray:
            key = frame.pts
            if key not in cache:
                cache.clear()
                cache[key] = frame.reformat(width=out_w, height=out_h, format="rgb24",
                                            interpolation="AREA").to_ndarray()
            return cache[key]

        # a plan that starts late (a work range of a long source, range_plan) seeks to the key
        # frame before its first frame instead of decoding everything before it
        seek_s = float(targets[0]) - _SEEK_MARGIN_S if n_out else 0.0
        seeked = False
        if seek_s > 0:
            try:
                container.seek(int(t0_ticks + seek_s / tb), stream=stream, backward=True, any_frame=False)
                seeked = True
            except Exception:  # noqa: BLE001 - unseekable: decode from the start
                container.close()
                container = av.open(str(path))
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
        frames_iter = container.decode(stream)
        while k < n_out:
            try:
                frame = next(frames_iter)
            except StopIteration:
                break
            except Exception as exc:
                raise _BackendFailure(
                    f"decoding failed after source time {prev[0] if prev else 0.0:.3f}s "
                    f"({type(exc).__name__}: {exc})") from exc
            if frame.pts is None:
                continue
            t = (frame.pts - t0_ticks) * tb
            if seeked and prev is None and t > targets[0] + EPS_S:
                # the seek landed after the first wanted frame (a file without a usable index):
                # decode from the start
                container.close()
                container = av.open(str(path))
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                frames_iter = container.decode(stream)
                seeked = False
                continue
            # outputs whose wanted source frame lies before this frame take the previous one
            while k < n_out and prev is not None and targets[k] < t - EPS_S:
                chunk = put(convert(prev[1]))
                if chunk is not None:
                    yield chunk
            while k < n_out and targets[k] <= t + EPS_S:
                chunk = put(convert(frame))
                if chunk is not None:
                    yield chunk
            prev = (t, frame)
        if k < n_out:
            if prev is None:
                raise _BackendFailure("no frame decoded")
            if targets[k] > prev[0] + EPS_S:
                raise _BackendFailure(f"stream ended at source time {prev[0]:.3f}s, output frame {k} "
                                      f"needs source time {targets[k]:.3f}s")
            while k < n_out:
                chunk = put(convert(prev[1]))
                if chunk is not None:
                    yield chunk
    finally:
        container.close()
