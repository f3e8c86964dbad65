"""Quality filters of the ingest job: each check returns a :class:`Rejection` with the stage and
a reason a person can act on, or ``None`` when the video passes.

Stages named in reasons: ``probe`` (container/streams), ``audio`` (audio track), ``face``
(detection), ``filter`` (quality thresholds: length, framing (the head cut by the frame edge),
rotation, head motion).
Thresholds come from :class:`core.sections.IngestConfig`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from core.sections import IngestConfig
from pipelines.errors import PipelineError
from pipelines.faces.crop import CropTrack


@dataclass(frozen=True)
class Rejection:
    """``key``: the stable loss key of the yield report (``pipelines.dataset.losses.LOSS_KEYS``;
    empty: derived from the stage and reason)."""

    stage: str
    why: str
    key: str = ""

    @property
    def reason(self) -> str:
        """The manifest ``reason``: ``"<stage>: <why>"``."""
        return f"{self.stage}: {self.why}"


class RejectedVideo(PipelineError):
    """Raised inside a stage to end one video's processing with a recorded rejection."""

    def __init__(self, stage: str, why: str, key: str = ""):
        super().__init__(f"{stage}: {why}")
        self.rejection = Rejection(stage, why, key)


def check_streams(has_video: bool, has_audio: bool) -> Optional[Rejection]:
    if not has_video:
        return Rejection("probe", "no video stream", "unreadable")
    if not has_audio:
        return Rejection("probe", "no audio track", "audio")
    return None


def check_length(num_frames: int, cfg: IngestConfig) -> Optional[Rejection]:
    """Too short for one training sample (``min_frames`` = 12 clip + 124 motion frames)."""
    if num_frames < cfg.min_frames:
        return Rejection(
            "filter",
            f"too short: {num_frames} frames at {cfg.fps:g} fps < min_frames {cfg.min_frames} "
            f"({cfg.min_frames / cfg.fps:.2f} s)", "too_short",
        )
    return None


def frames_covered_by_audio(video_frames: int, audio_duration_s: float, cfg: IngestConfig
                            ) -> tuple[int, float, Optional[Rejection]]:
    """Frames usable given the audio length: ``(num_frames, audio_offset_s, rejection)``.

    ``audio_offset_s`` = audio duration - video duration (both in seconds, video duration =
    ``video_frames / fps``). Audio longer than the video: all frames are kept (the audio is cut
    to them). Audio shorter by at most ``max_audio_video_offset_s``: only the frames the audio
    covers are kept (never padded with silence). Shorter by more: rejected (stage ``audio``).
    """
    video_s = video_frames / cfg.fps
    offset = audio_duration_s - video_s
    if offset >= 0:
        return video_frames, offset, None
    if -offset > cfg.max_audio_video_offset_s:
        return 0, offset, Rejection(
            "audio",
            f"audio is {audio_duration_s:.3f} s, video {video_s:.3f} s: {-offset:.3f} s shorter "
            f"(max_audio_video_offset_s {cfg.max_audio_video_offset_s:g})", "audio",
        )
    covered = int(math.floor(audio_duration_s * cfg.fps + 1e-6))
    return min(video_frames, covered), offset, None


def check_track(track: CropTrack, cfg: IngestConfig) -> Optional[Rejection]:
    """Thresholds on the subject's crop track (:func:`pipelines.faces.crop.plan_crop_track`):
    missing face (share of frames), head cut by the frame edge (share of the frames with a face
    whose head box, the landmark box plus the forehead and chin allowances, leaves the frame:
    ``max_out_of_frame_ratio``; a crop margin that does not fit is never a rejection, the fill
    rule handles it), yaw (degrees), head motion (face widths)."""
    if track.missing_ratio >= 1.0:
        return Rejection("face", "no face found in any frame", "no_face")
    if track.missing_ratio > cfg.max_missing_face_ratio:
        return Rejection(
            "face",
            f"face lost in {track.missing_ratio:.0%} of frames (max_missing_face_ratio "
            f"{cfg.max_missing_face_ratio:.0%})", "face_lost",
        )
    if track.head_cut_ratio > cfg.max_out_of_frame_ratio:
        return Rejection("filter", f"{track.head_cut_text()}; max_out_of_frame_ratio {cfg.max_out_of_frame_ratio:.0%})",
                         "framing")
    if not math.isfinite(track.max_abs_yaw_deg) or track.max_abs_yaw_deg > cfg.max_yaw_deg:
        return Rejection(
            "filter", f"extreme rotation: |yaw| up to {track.max_abs_yaw_deg:.0f} deg (max_yaw_deg {cfg.max_yaw_deg:g})", "pose"
        )
    if track.head_motion > cfg.max_head_motion:
        return Rejection(
            "filter",
            f"excessive head motion: {track.head_motion:.2f} face widths (max_head_motion {cfg.max_head_motion:g})", "head_motion",
        )
    return None


def check_silence(silent: bool) -> Optional[Rejection]:
    if silent:
        return Rejection("audio", "audio track is silent", "audio")
    return None


# --- limits before work: checks on the probe's facts, before any frame is decoded ------------------


def distinct_source_frames(pts_s, num_out: int, fps: float) -> int:
    """How many different source frames a ``fps`` expansion to ``num_out`` frames shows: output
    frame k shows the last source frame with ``pts <= k / fps`` (the decoders' timestamp rule).
    ``pts_s`` f64 [n_src] sorted, seconds from the first frame. O(num_out log n_src), no decoding."""
    import numpy as np

    if num_out <= 0 or len(pts_s) == 0:
        return 0
    t = np.arange(num_out, dtype=np.float64) / fps
    idx = np.searchsorted(np.asarray(pts_s, np.float64), t + 1e-9, side="right") - 1
    return int(np.unique(idx[idx >= 0]).size)


def check_limits(duration_s: float, pts_s, audio_duration_s: Optional[float], cfg: IngestConfig,
                 coded_pixels: Optional[int] = None) -> Optional[Rejection]:
    """The cheap checks on a probed file (stage ``limits``, or ``audio`` for the length check), in
    order: duration over ``max_duration_s`` (a guard against absurd timestamps, 24 h by default:
    a long source is split into time ranges, never refused for its length); the decoding work,
    source frames (``pts_s``) x ``coded_pixels``, over ``max_decode_gpixels``; a frozen / sparse video whose ``fps`` expansion
    would mostly repeat frames (distinct source frames / output frames below
    ``min_source_frames_ratio``, e.g. two frames an hour apart); audio (stream header duration,
    when the container records one) shorter than the video by more than
    ``max_audio_video_offset_s``. The exact audio check still runs after decoding."""
    if duration_s > cfg.max_duration_s:
        return Rejection("limits", f"video is {duration_s:.1f} s > max_duration_s {cfg.max_duration_s:g}", "limits")
    if coded_pixels:  # the decoding work the file asks for: every source frame at its coded size
        gpix = len(pts_s) * float(coded_pixels) / 1e9
        if gpix > cfg.max_decode_gpixels:
            return Rejection("limits", f"decoding work {gpix:.0f} Gpixels ({len(pts_s)} source frames x "
                                       f"{int(coded_pixels)} pixels) > max_decode_gpixels {cfg.max_decode_gpixels:g}", "limits")
    num_out = int(math.floor(duration_s * cfg.fps + 1e-6))
    if num_out > 0:
        distinct = distinct_source_frames(pts_s, num_out, cfg.fps)
        ratio = distinct / num_out
        if ratio < cfg.min_source_frames_ratio:
            return Rejection("limits", f"frozen or sparse video: {distinct} distinct source frames for {num_out} "
                                       f"frames at {cfg.fps:g} fps ({ratio:.1%} < min_source_frames_ratio "
                                       f"{cfg.min_source_frames_ratio:.0%})", "limits")
    if audio_duration_s is not None and num_out > 0:
        _, _, rej = frames_covered_by_audio(num_out, audio_duration_s, cfg)
        if rej is not None:
            return Rejection(rej.stage, f"{rej.why} (stream headers, before decoding)", rej.key)
    return None
