"""Where the input hours go: a stable key for every reason video is lost, and the yield report's
hours in, hours kept and hours lost per key, from the manifest rows.

``loss_key`` is coarser than ``reason_key`` (which keeps the wording of the reason) and does not
change when a reason is reworded: the stage that rejects a video names its key
(``pipelines.ingestion.quality.Rejection.key``); rows without one (an error text from a decoder,
records of an older run) get :func:`loss_key_for` from their stage and reason. The keys:

========================  ============================================================================
``unreadable``            not a video / a decoder error / a missing file (stages input, probe, decode)
``limits``                refused before work: too long, too many pixels, frozen / sparse frames
``audio``                 no audio track, silent, or audio shorter than the video
``no_face``               no face in any frame
``face_lost``             the subject's face missing in too many frames
``distractor``            persistent faces, none behaves like a person (prints, posters, screens)
``no_speaker``            two or more people and none speaks clearly more than the others
``framing``               the head cut by the frame edge
``pose``                  extreme head rotation
``head_motion``           too much head motion
``too_short``             the whole video shorter than ``ingest.min_frames``
``cut_too_short``         a shot (between cuts) shorter than ``ingest.min_frames`` (for shot-level rows)
``timeout``               past the per-video deadline
``write``                 the frame file could not be written correctly
``failed``                not the file's fault (a lost worker or node): the next run retries it
``trimmed``               kept videos: the part not written (audio shorter than the video, the last
                          partial frame)
``other``                 anything else
========================  ============================================================================
"""
from __future__ import annotations

from typing import Iterable, Optional

LOSS_KEYS = ("unreadable", "limits", "audio", "no_face", "face_lost", "distractor", "no_speaker", "framing",
             "pose", "head_motion", "too_short", "cut_too_short", "timeout", "write", "failed", "trimmed", "other")

_BY_STAGE = {"input": "unreadable", "probe": "unreadable", "decode": "unreadable", "analyze": "unreadable",
             "limits": "limits", "audio": "audio", "timeout": "timeout", "write": "write", "face": "no_face"}
# (words of a filter reason, key): the reasons pipelines/ingestion/quality.py writes
_FILTER_WORDS = (("too short", "too_short"), ("head cut", "framing"), ("rotation", "pose"),
                 ("head motion", "head_motion"), ("face lost", "face_lost"),
                 ("behaves like a person", "distractor"), ("speaks clearly", "no_speaker"))


def loss_key_for(status: str, stage: Optional[str], reason: Optional[str]) -> Optional[str]:
    """The loss key of a manifest row without an explicit one: None for ``ok`` and ``duplicate``
    rows, ``failed`` for failed ones, else from the stage (and for ``face`` / ``filter`` the
    reason's words)."""
    if status in ("ok", "duplicate"):
        return None
    if status == "failed":
        return "failed"
    text = (reason or "").lower()
    for words, key in _FILTER_WORDS:
        if words in text:
            return key
    return _BY_STAGE.get(stage or "", "other")


def hours_by_loss(rows: Iterable[dict], fps: float) -> tuple[float, float, dict[str, float]]:
    """(hours in, hours kept, hours lost per loss key) of manifest ``rows``. Hours in: the probed
    ``duration_s`` of every source once (its rows: the samples and rejected ranges of its shots
    and work ranges, or one row for a whole file; of a clip of an input-list row only its part of
    the file; duplicates left out; a file refused before its probe has none and counts 0); kept: ``num_frames / fps`` of the ``ok`` rows; lost: each
    rejected or failed row's span (``end_s - start_s``, else the source's duration) under its
    ``loss_key``, each kept row's untaken rest of its span and the part of a source in none of its
    rows (the frames of a dissolve between shots) under ``trimmed``. The buckets add up to hours
    in - hours kept (within the rounding to whole frames)."""
    kept = 0.0
    lost: dict[str, float] = {}
    duration: dict[str, float] = {}  # source -> seconds
    covered: dict[str, float] = {}  # source -> seconds in its rows' spans

    def add(key: str, seconds: float, always: bool = False) -> None:
        if seconds > 0 or always:  # a lost row's key is listed even at 0 h (refused before its probe)
            lost[key] = lost.get(key, 0.0) + max(seconds, 0.0) / 3600.0

    for n, r in enumerate(rows):
        if r.get("status") == "duplicate":
            continue
        source = r.get("source_id") or r.get("video_id") or f"row {n}"
        whole = float(r.get("duration_s") or 0.0)
        if r.get("clip_start_s") is not None and whole > 0:  # a clip: only its part of the file is in
            end = whole if r.get("clip_end_s") is None else min(whole, float(r["clip_end_s"]))
            whole = max(0.0, end - float(r["clip_start_s"]))
        duration[source] = max(duration.get(source, 0.0), whole)
        start, end = r.get("start_s"), r.get("end_s")
        span = float(end) - float(start) if start is not None and end is not None else whole
        covered[source] = covered.get(source, 0.0) + span
        if r.get("status") == "ok":
            got = float(r.get("num_frames") or 0) / fps
            kept += got / 3600.0
            add("trimmed", span - got)
            continue
        add(r.get("loss_key") or loss_key_for(r.get("status", ""), r.get("stage"), r.get("reason")) or "other", span,
            always=True)
    for source, seconds in duration.items():
        add("trimmed", seconds - covered.get(source, 0.0))
    hours_in = sum(duration.values()) / 3600.0
    return hours_in, kept, dict(sorted(lost.items(), key=lambda kv: (-kv[1], kv[0])))
