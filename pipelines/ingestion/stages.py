"""The CPU stages of the ingest job: analysis and full-resolution decode + crop (the two model
stages, wav2vec2 and VAE, are :mod:`pipelines.ingestion.model_stages`, so these workers never import
torch); ``pipelines/ingestion/job.py`` wires them together.

Every stage passes a failing video on as a ``reject`` row (stage + a reason naming the file)
instead of raising, so one bad file never stops the batch (docs/SEED_DEFECTS.md, defect 20).

Row kinds flowing through the pipeline (one Ray Data row each):

* from :func:`screen_video` (a plain Ray task per video, before the pipeline is built): a
  ``screened`` row (the probe as JSON + ``stream_pts_s``) that becomes the pipeline's input, or a
  ``reject`` row the driver records at once;
* after :class:`VideoAnalyzer` (one row per video): ``kind`` = ``video`` or ``reject``;
  ``num_frames`` (frames at ``fps`` that will be written), per-frame arrays of the crop track
  ``boxes`` f32 [N, 4] (x0, y0, x1, y1 source pixels), ``landmarks`` f32 [N, 68, 2] (crop
  coordinates / crop size), ``found`` bool [N], the audio ``samples`` f32 [K] (16 kHz mono,
  exactly ``N / fps`` seconds), and what the full-resolution decode needs from the probe so it
  does not probe the file again: ``stream_pts_s`` f64 [n_src] (presentation time of every source
  frame, seconds from the first) and ``info["decode_source"]`` (:data:`DECODE_SOURCE_KEY`);
* after ``AudioFeatureStage`` (:mod:`pipelines.ingestion.model_stages`): ``samples`` replaced by ``features`` f16 [N, L, D];
* after :class:`DecodeStage` (many rows per video): ``chunk`` rows (``chunk_index``,
  ``start_index``, ``crops`` u8 [n, S, S, 3] and the chunk's slices of every per-frame array),
  then one ``end`` row (``num_chunks``, ``num_frames``), or a ``reject`` row;
* after ``VaeStage`` (:mod:`pipelines.ingestion.model_stages`): ``crops`` replaced by ``latent`` f16 [n, 4, S/8, S/8] (and JPEGs when
  asked: ``jpeg`` u8 [bytes] concatenated, ``jpeg_sizes`` i64 [n]).

Every row carries every column (empty arrays of the right rank where unused) so Ray Data blocks
of mixed kinds share one schema. ``info`` is a JSON string of the probe facts for the manifest.

File opens per video (PyAV ``av.open`` / decord ``VideoReader``): :func:`screen_video` opens it
once, for the probe (one demux pass: timestamps, stream start times, geometry incl. rotation),
and passes the probe on in its row; :class:`VideoAnalyzer` then opens it three times, once per
pass that must read it: the scale-search sample decode, the detection decode and the audio
decode; :class:`DecodeStage` opens it once (its decoder), taking timestamps and geometry from the
row. No file handle is held across Ray tasks.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from core.sections import IngestConfig
from core.storage import StorageUnavailableError, is_remote, local_copy
from pipelines.dataset.manifest import sample_id
from pipelines.faces.crop import crop_frames, landmarks_to_crop, plan_crop_track
from pipelines.faces.detect import choose_detection_scale, make_detector
from pipelines.faces.mouth_sync import audio_loudness_per_frame
from pipelines.faces.person_tracks import PersonParams, judge_track
from pipelines.faces.speaker import SpeakerParams, choose_speaker
from pipelines.faces.tracks import (
    FaceCandidates,
    TrackParams,
    TrackSummary,
    subject_track,
    track_landmarks,
)
from pipelines.ingestion.quality import (
    RejectedVideo,
    check_length,
    check_limits,
    check_silence,
    check_streams,
    check_track,
    frames_covered_by_audio,
)
from pipelines.ingestion.units import BOUNDARY_SEARCH_S, BOUNDARY_SIDE, UNIT_KEY, WorkRange, snap_boundary
from pipelines.ingestion.watchdog import (
    DeadlineExceeded,
    RemoteError,
    WatchedWorker,
    WorkBudget,
    WorkerDied,
)
from pipelines.media.audio_decode import AudioDecodeError, decode_audio, is_silent
from pipelines.media.cuts import Shot, find_shots, thumbnails
from pipelines.media.probe import (
    FrameGeometry,
    ProbeError,
    ProbeLimitError,
    VideoProbe,
    VideoTimestamps,
    probe_video,
)
from pipelines.media.video_decode import (
    DecodeError,
    ResamplePlan,
    iter_frames,
    plan_from_timestamps,
    range_plan,
)

# --- row helpers ----------------------------------------------------------------------------------

STAGE_TIMES_KEY = "stage_seconds"  # JSON dict {stage: seconds} carried for the benchmark
# info key of the probe facts the full-resolution decode needs besides ``stream_pts_s``:
# {coded_width, coded_height (pixels, as stored), rotation (ccw degrees), start_ticks (pts of the
# first frame, stream time-base units), time_base (s per tick), last_duration_s (s)}
DECODE_SOURCE_KEY = "decode_source"


def _empty_video_arrays() -> dict[str, np.ndarray]:
    return {
        "boxes": np.zeros((0, 4), np.float32),
        "landmarks": np.zeros((0, 68, 2), np.float32),
        "found": np.zeros((0,), bool),
        "time_s": np.zeros((0,), np.float64),
        "source_time_s": np.zeros((0,), np.float64),
        "stream_pts_s": np.zeros((0,), np.float64),
    }


def reject_row(video_id: str, path: str, stage: str, why: str, info: Optional[dict] = None, key: str = "") -> dict:
    """A ``reject`` row with the same columns as every other row (empty arrays); ``key`` (the
    rejection's loss key, ``pipelines.dataset.losses``) goes to ``info["loss_key"]``."""
    info = {**(info or {}), **({"loss_key": key} if key else {})}
    return {
        "kind": "reject", "video_id": video_id, "path": path, "stage": stage,
        "reason": f"{stage}: {why}", "info": json.dumps(info),
        "chunk_index": -1, "start_index": 0, "num_frames": 0, "num_chunks": 0,
        **_empty_video_arrays(),
        "samples": np.zeros((0,), np.float32),
    }


def failed_row(video_id: str, path: str, stage: str, why: str) -> dict:
    """A ``failed`` row: the video could not be processed for a reason that is not the file's
    (a worker killed, a node lost). Recorded with status ``failed``; a rerun retries it."""
    row = reject_row(video_id, path, stage, why)
    row["kind"] = "failed"
    row["reason"] = f"failed: {stage}: {why}"
    return row


def error_text(path: str, exc: BaseException) -> str:
    """One line naming the file and the error (the file name is prefixed when missing)."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if path not in msg:
        msg = f"{path}: {type(exc).__name__}: {msg}"
    return msg


def _source_named(row: dict, local: str, uri: str) -> dict:
    """``row`` of a stage that read the local copy ``local`` of ``uri``, naming ``uri`` again
    (its ``path``, and the reason / info text of a rejection)."""
    out = dict(row)
    for k in ("path", "reason", "info"):
        if isinstance(out.get(k), str):
            out[k] = out[k].replace(local, uri)
    return out


def with_local_copy(video_id: str, uri: str, stage: str, work) -> Iterator[dict]:
    """Rows of ``work(row_path)`` for a video that may be a bucket object: a local file is passed
    as it is; an object is copied whole to a local temp file for this work unit (one streamed GET,
    see ``core.storage.local_copy`` for why not ranged reads), removed after, and the rows name the
    URI again. A missing object is this video's ``reject`` (stage ``input``); a download that fails
    (the store unreachable) a ``failed`` row at ``stage`` (not the file's fault: a rerun retries
    it). ``work`` returns an iterator of rows."""
    if not is_remote(uri):
        yield from work(uri)
        return
    try:
        with local_copy(uri) as local:
            for row in work(str(local)):
                yield _source_named(row, str(local), uri)
    except FileNotFoundError:
        yield reject_row(video_id, uri, "input", f"{uri}: file not found")
    except StorageUnavailableError as exc:
        yield failed_row(video_id, uri, stage, f"{uri}: reading the object failed: {exc}")


def first_value(batch: dict, key: str) -> Any:
    """Row 0 of a ``batch_size=1`` numpy batch (object arrays of ragged tensors unwrapped)."""
    value = batch[key][0]
    return value.item() if isinstance(value, np.generic) else value


def as_batch(row: dict) -> dict:
    """A row dict -> a one-row numpy batch."""
    out = {}
    for k, v in row.items():
        if isinstance(v, np.ndarray):
            out[k] = v[None]
        else:
            out[k] = np.array([v])
    return out


def decode_source_fields(probe: VideoProbe) -> tuple[np.ndarray, dict]:
    """What a later task needs to decode the probed file without probing it again:
    (``stream_pts_s`` f64 [n_src] seconds, the :data:`DECODE_SOURCE_KEY` dict of scalars)."""
    stamps = probe.timestamps
    return np.asarray(stamps.pts_s, np.float64), {
        "coded_width": probe.coded_width, "coded_height": probe.coded_height, "rotation": probe.rotation,
        "start_ticks": int(stamps.start_ticks), "time_base": float(stamps.time_base),
        "last_duration_s": float(stamps.last_duration_s),
    }


def decode_source_of(stream_pts_s: np.ndarray, fields: dict) -> tuple[VideoTimestamps, FrameGeometry]:
    """Inverse of :func:`decode_source_fields`: the probe's timestamps and geometry."""
    stamps = VideoTimestamps(np.asarray(stream_pts_s, np.float64), float(fields["last_duration_s"]),
                             int(fields["start_ticks"]), float(fields["time_base"]))
    geometry = FrameGeometry(int(fields["coded_width"]), int(fields["coded_height"]), int(fields["rotation"]))
    return stamps, geometry


def interpolate_missing(landmarks: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Fill frames without a detection by linear interpolation over time (edges: nearest found
    frame). landmarks [N, 68, 2], found bool [N] -> [N, 68, 2] (a copy)."""
    out = np.array(landmarks, dtype=np.float32, copy=True)
    idx = np.flatnonzero(found)
    if idx.size == 0 or idx.size == len(found):
        return out
    t = np.arange(len(found))
    flat = out.reshape(len(found), -1)
    for j in range(flat.shape[1]):
        flat[:, j] = np.interp(t, idx, flat[idx, j])
    return out


# --- stage 0: the cheap checks (probe + limits), before any actor exists -----------------------------


def probe_info(probe: VideoProbe) -> dict:
    """The probe facts every row's ``info`` carries (for the manifest)."""
    return {"fps_in": probe.fps, "duration_s": probe.duration_s, "width": probe.width,
            "height": probe.height, "rotation": probe.rotation}


def header_audio_s(probe: VideoProbe) -> Optional[float]:
    """The audio duration the stream header gives, measured from the video's first frame
    (None when the container records none)."""
    if probe.audio_duration_s is None:
        return None
    return float(probe.audio_duration_s) - max(0.0, probe.video_start_s - probe.audio_start_s)


def screen_probe(path: str, cfg: IngestConfig, info: dict, times: dict) -> VideoProbe:
    """Open and probe the file (the only probe of it in the whole job), then the limits before
    anything is decoded: pixels per frame from the stream header, streams, a cheap length check
    from the container (the exact count is checked after decoding), max duration, frozen /
    sparse frames, audio length from the headers. ``info`` collects the manifest facts
    (``_stage``: the step running), ``times["probe"]`` the seconds. Raises
    :class:`RejectedVideo`."""
    info["_stage"] = "input"
    if not Path(path).is_file():
        raise RejectedVideo("input", f"{path}: file not found")
    info["_stage"] = "probe"
    t0 = time.perf_counter()
    try:
        probe = probe_video(path, max_pixels=cfg.max_pixels)
    except ProbeLimitError as exc:
        raise RejectedVideo("limits", error_text(path, exc)) from None
    except ProbeError as exc:
        raise RejectedVideo("probe", error_text(path, exc)) from None
    info.update(probe_info(probe))
    rej = check_streams(True, probe.has_audio)
    if rej:
        raise RejectedVideo(rej.stage, f"{path}: {rej.why}", rej.key)
    est = int(np.floor(probe.duration_s * cfg.fps + 1e-6))
    rej = check_length(est, cfg)
    if rej:
        raise RejectedVideo(rej.stage, f"{path}: {rej.why}", rej.key)
    # limits before work: duration, frozen / sparse frames, audio length from the headers
    rej = check_limits(probe.duration_s, probe.timestamps.pts_s, header_audio_s(probe), cfg,
                       coded_pixels=probe.coded_width * probe.coded_height)
    if rej:
        raise RejectedVideo(rej.stage, f"{path}: {rej.why}", rej.key)
    times["probe"] = time.perf_counter() - t0
    return probe


def screen_video(row: dict, cfg: IngestConfig) -> dict:
    """The job's first phase for one video (a plain Ray task, no actor, no model, no torch):
    :func:`screen_probe`. Returns ``{kind: "screened", video_id, path, probe (JSON of the probe,
    :meth:`pipelines.media.probe.VideoProbe.to_record`), stream_pts_s f64 [n_src], probe_s (s)}`` for a
    video that passed (the row the analysis stage takes, so it never probes the file again), or
    a ``reject`` row (:func:`reject_row`, stage + reason naming the file). Any exception that
    escapes is the worker's, not the file's (the caller records it as ``failed``)."""
    video_id, path = str(row["video_id"]), str(row["path"])
    info: dict = {}
    times: dict[str, float] = {}
    try:
        probe = screen_probe(path, cfg, info, times)
    except RejectedVideo as rej:
        return reject_row(video_id, path, rej.rejection.stage, rej.rejection.why, _public(info), rej.rejection.key)
    except Exception as exc:  # noqa: BLE001 - an error reading this file: its rejection, as in the analysis
        return reject_row(video_id, path, info.get("_stage", "probe"), error_text(path, exc), _public(info))
    facts, pts = probe.to_record()
    return {"kind": "screened", "video_id": video_id, "path": path, "probe": facts, "stream_pts_s": pts,
            "probe_s": float(times.get("probe", 0.0))}


def screen_video_steps(row: dict, cfg: IngestConfig) -> Iterator[dict]:
    """:func:`screen_video` as a Ray generator task: first ``{"kind": "started"}`` (the worker
    is up and this module imported), then the result. The job's per-video deadline starts at the
    first item, so a worker's start-up on a loaded machine is never counted against the file (as
    :class:`AnalyzerStage` starts its child outside the deadline)."""
    yield {"kind": "started"}
    for out in with_local_copy(str(row["video_id"]), str(row["path"]), "probe",
                               lambda local: [screen_video({**row, "path": local}, cfg)]):
        if out["kind"] == "failed":  # the driver's failed rows are plain
            out = {k: out[k] for k in ("kind", "stage", "reason", "info")}
        yield out


def _public(info: dict) -> dict:
    """``info`` without its private (``_``-prefixed) keys."""
    return {k: v for k, v in info.items() if not k.startswith("_")}


# --- stage 1: probe, detection pass, audio, crop track, filters ------------------------------------


@dataclass
class Detections:
    """The detection pass over every output frame (N frames at ``fps``).

    candidates: every face candidate of every frame (:class:`pipelines.faces.tracks.FaceCandidates`:
    frame index, box, score, iBUG-68 landmarks), in source (display) pixels; num_frames: N;
    source_times_s: f64 [N] presentation time of the source frame each output frame shows (s);
    scale: detection image / display frame of the pass.
    """

    candidates: FaceCandidates
    num_frames: int
    source_times_s: np.ndarray
    scale: float = 1.0
    thumbs: Optional[np.ndarray] = None  # f32 [N, s, s, 3] thumbnails for the cut detector


@dataclass
class AlignedAudio:
    """Audio cut to the frames it covers: ``samples`` f32 [K] mono at the ingest sample rate,
    exactly ``num_frames / fps`` seconds; ``offset_s`` = audio duration - video duration (s)."""

    samples: np.ndarray
    num_frames: int
    offset_s: float


@dataclass
class CropTrack:
    """The face-centred crop of each of N frames: ``boxes`` f32 [N, 4] (x0, y0, x1, y1 source
    pixels), ``landmarks`` f32 [N, 68, 2] (crop coordinates / crop size, missing frames
    interpolated), ``found`` bool [N]."""

    boxes: np.ndarray
    landmarks: np.ndarray
    found: np.ndarray


def analysis_device(cfg: IngestConfig) -> str:
    """Device of the analysis' face detector: "cuda" for MTCNN with ``use_gpu`` (the job gives
    those actors a GPU: :func:`analysis_gpus`), else "cpu" (dlib runs on the CPU only)."""
    return "cuda" if cfg.use_gpu and cfg.detector == "mtcnn" else "cpu"


def analysis_gpus(cfg: IngestConfig) -> dict:
    """Ray resources of an analysis actor beyond its CPUs: ``model_num_gpus`` GPUs where
    :func:`analysis_device` is "cuda" (its watched child inherits the actor's CUDA_VISIBLE_DEVICES)."""
    return {"num_gpus": cfg.model_num_gpus} if analysis_device(cfg) == "cuda" else {}


class VideoAnalyzer:
    """Ray Data ``map`` UDF (callable class: the face detector is built once per actor).

    In: ``{video_id, path}``, with the probe of :func:`screen_video` (``probe``, ``stream_pts_s``,
    ``probe_s``) in the job. Out: a ``video`` row (crop track + audio samples + the probe's
    decode facts) or a ``reject`` row. The steps, each its own method: :meth:`begin` (the probe
    of :func:`screen_video` from the row, or :func:`screen_probe`: the only probe of the file,
    passed on to every later step), :meth:`_detection_pass`, :meth:`_audio`,
    :meth:`_length_filter`, :meth:`_crop_track`. Decoding for detection is a streaming pass at
    the scale that shows the face at ``detect_face_px`` (a scale search on a few frames first),
    so memory does not grow with the video's length beyond the small per-frame arrays.
    """

    def __init__(self, cfg: IngestConfig, dwpose_dir: Optional[str] = None):

        self.cfg = cfg
        self.detector = make_detector(cfg.detector, dwpose_dir, detect_max_side=cfg.detect_max_side,
                                      device=analysis_device(cfg))

    def __call__(self, row: dict) -> list[dict]:
        """The whole analysis of one video (or one range of it) in this process (no deadline):
        :meth:`begin` then :meth:`finish`. The job runs it through :class:`AnalyzerStage` instead
        (deadline)."""
        first = self.begin(row)
        return [first] if first["kind"] != "probed" else self.finish(row)

    def begin(self, row: dict) -> dict:
        """Step 1 (cheap, before any decoding): the probe and the limits (:func:`screen_probe`),
        or, when ``row`` carries the probe of :func:`screen_video` (``probe`` JSON +
        ``stream_pts_s``), that probe (the file is not probed again). Returns a ``probed`` row
        ``{kind, video_id, duration_s}`` (the probe is kept for :meth:`finish`) or a ``reject``
        row. ``duration_s`` is that of the row's range (:class:`WorkRange`) when it names one."""
        video_id, path = str(row["video_id"]), str(row["path"])
        self._pending = None
        info: dict = {}
        times: dict[str, float] = {}

        def work() -> dict:
            if row.get("probe"):
                probe = VideoProbe.from_record(str(row["probe"]), np.asarray(row["stream_pts_s"], np.float64))
                info.update(probe_info(probe))
                times["probe"] = float(row.get("probe_s") or 0.0)
            else:
                probe = screen_probe(path, self.cfg, info, times)
            self._pending = (video_id, probe, info, times)
            rng = WorkRange.of_row(row, probe.duration_s, self.cfg.fps)
            return {"kind": "probed", "video_id": video_id, "duration_s": rng.num_frames / self.cfg.fps}

        return self._guarded(video_id, path, info, work)

    def finish(self, row: dict) -> list[dict]:
        """Step 2: detection pass (with the cut detector), audio, then per shot the crop track and
        filters, on the probe of :meth:`begin`, over the row's range (:class:`WorkRange`; the
        whole video when the row names none). Returns one row per shot: ``video`` (a sample,
        ``video_id`` = :func:`~pipelines.dataset.manifest.sample_id`) or ``reject`` (a rejected
        range), or a single ``reject`` row for the whole range. Every row's ``info`` carries
        :data:`UNIT_KEY` (the range, the shot and how many rows the range gave)."""
        video_id, path = str(row["video_id"]), str(row["path"])
        if self._pending is None or self._pending[0] != video_id:
            raise RuntimeError(f"{path}: finish() without begin() for this video")
        _, probe, info, times = self._pending
        self._pending = None
        rng = WorkRange.of_row(row, probe.duration_s, self.cfg.fps)
        info[UNIT_KEY] = rng.facts(rng.start, rng.end, 1)

        def work() -> list[dict]:
            outs = self._analyze(video_id, path, probe, info, times, rng)
            info[STAGE_TIMES_KEY] = times
            return outs

        out = self._guarded(video_id, path, info, work)
        return out if isinstance(out, list) else [out]

    @staticmethod
    def _guarded(video_id: str, path: str, info: dict, work) -> dict:
        """``work()``, with a rejection or any error turned into this video's ``reject`` row."""
        try:
            return work()
        except RejectedVideo as rej:
            return reject_row(video_id, path, rej.rejection.stage, rej.rejection.why, _public(info), rej.rejection.key)
        except Exception as exc:  # noqa: BLE001 - recorded as this video's rejection
            stage = info.get("_stage", "analyze")
            return reject_row(video_id, path, stage, error_text(path, exc), info)

    def _analyze(self, video_id: str, path: str, probe: VideoProbe, info: dict, times: dict,
                 rng: "WorkRange") -> list[dict]:
        """The steps after the probe, in order; ``info`` collects the manifest facts (``_stage``:
        the step running, for errors), ``times`` the seconds of each step. Raises
        :class:`RejectedVideo` for the whole range (before the shots are known); a shot that
        fails its filters is its own ``reject`` row."""
        cfg = self.cfg
        if cfg.fault_hang_match and cfg.fault_hang_match in Path(path).name:
            info["_stage"] = "decode"
            time.sleep(24 * 3600)  # fault injection: a decoder that never returns
        rng = self._snap_range(path, probe, rng, info, times)
        info[UNIT_KEY] = rng.facts(rng.start, rng.end, 1)  # a rejection of the whole range names it
        detections = self._detection_pass(path, probe, info, times, rng)
        audio = self._audio(path, probe, detections.num_frames, info, times, rng)
        n = audio.num_frames
        t0 = time.perf_counter()
        shots = find_shots(detections.thumbs[:n], cfg.cut_threshold, cfg.cut_ratio, cfg.dissolve_frames)
        times["cuts"] = time.perf_counter() - t0
        info["shots"] = len(shots)
        stream_pts_s, info[DECODE_SOURCE_KEY] = decode_source_fields(probe)
        whole = rng.whole and len(shots) == 1 and shots[0].start == 0
        if len(shots) == 1 and shots[0].start == 0 and shots[0].end == n:
            self._length_filter(path, n, info)  # one shot: the range itself (reason as before shots existed)
        outs = []
        for shot in shots:
            a, b = rng.start + shot.start, rng.start + shot.end  # source output frames
            sid = video_id if whole else sample_id(rng.source_id, a, b)
            shot_info = {**info, UNIT_KEY: rng.facts(a, b, len(shots), shot.after)}
            k = shot.num_frames
            per = int(round(cfg.sample_rate / cfg.fps))
            lo = int(round(shot.start / cfg.fps * cfg.sample_rate))
            samples = audio.samples[lo: lo + int(round(k / cfg.fps * cfg.sample_rate))]
            if len(samples) < k * per - per:  # the audio cut to the shot covers it (never padded)
                outs.append(reject_row(sid, path, "audio", f"{path}: the audio does not cover {rng.label(a, b, cfg.fps, 2)}",
                                       _public(shot_info), "audio"))
                continue
            try:
                self._length_filter(path, shot.num_frames, shot_info, rng.label(a, b, cfg.fps, len(shots)))
                track = self._crop_track(path, probe, detections, shot, samples, shot_info, times,
                                         rng.label(a, b, cfg.fps, len(shots)))
            except RejectedVideo as rej:
                key = rej.rejection.key
                if key == "too_short" and len(shots) > 1:
                    key = "cut_too_short"  # a shot between cuts, not the whole video
                outs.append(reject_row(sid, path, rej.rejection.stage, rej.rejection.why, _public(shot_info), key))
                continue
            shot_info["num_frames"] = k
            outs.append({
                "kind": "video", "video_id": sid, "path": path, "stage": "", "reason": "",
                "info": json.dumps(_public(shot_info)), "chunk_index": -1, "start_index": 0, "num_frames": k,
                "num_chunks": 0,
                "boxes": track.boxes,
                "landmarks": track.landmarks,
                "found": track.found,
                "time_s": np.arange(k, dtype=np.float64) / cfg.fps,
                "source_time_s": detections.source_times_s[shot.start:shot.end],
                "stream_pts_s": stream_pts_s,
                "samples": np.ascontiguousarray(samples, np.float32),
            })
        # the range's analysis times go with its first sample only (the job sums them over samples)
        first = next((r for r in outs if r["kind"] == "video"), None)
        if first is not None:
            first["info"] = json.dumps({**json.loads(first["info"]), STAGE_TIMES_KEY: times})
        return outs

    def _snap_range(self, path: str, probe: VideoProbe, rng: WorkRange, info: dict, times: dict) -> WorkRange:
        """``rng`` with each boundary it shares with a neighbouring range moved to the nearest cut
        (:func:`pipelines.ingestion.units.snap_boundary`: both neighbours decode the same window
        the same way and agree). A whole source is returned as it is."""
        if not (rng.snap_start or rng.snap_end):
            return rng
        cfg = self.cfg
        info["_stage"] = "decode"
        t0 = time.perf_counter()
        plan = plan_from_timestamps(path, probe.timestamps, cfg.fps)
        start, end = rng.start, rng.end
        if rng.snap_start:
            start = self._boundary(path, probe, plan, rng.start)[1]
        if rng.snap_end:
            end = self._boundary(path, probe, plan, rng.end)[0]
        times["boundary_cuts"] = time.perf_counter() - t0
        if end - start < 1:  # two cuts closer than the window: keep the planned range
            return rng
        info["range_snapped"] = [int(start), int(end)]
        return replace(rng, start=int(start), end=int(end))

    def _boundary(self, path: str, probe: VideoProbe, plan: ResamplePlan, b: int) -> tuple[int, int]:
        """(end of the range before, start of the range after) the planned boundary frame ``b``:
        the cuts of the frames ``b +- BOUNDARY_SEARCH_S`` (decoded with PyAV at ``BOUNDARY_SIDE``
        px, the same in both neighbouring ranges)."""
        cfg = self.cfg
        m = int(round(BOUNDARY_SEARCH_S * cfg.fps))
        lo, hi = max(0, b - m), min(plan.num_frames, b + m)
        try:
            thumbs = np.concatenate([thumbnails(c.frames) for c in iter_frames(
                path, fps=cfg.fps, chunk_frames=cfg.chunk_frames, max_side=BOUNDARY_SIDE, backend="pyav",
                plan=range_plan(plan, lo, hi), geometry=probe.geometry)])
        except DecodeError as exc:
            raise RejectedVideo("decode", error_text(path, exc)) from None
        shots = find_shots(thumbs, cfg.cut_threshold, cfg.cut_ratio, cfg.dissolve_frames)
        gaps = [(lo + a.end, lo + c.start) for a, c in zip(shots, shots[1:])]
        return snap_boundary(gaps, b)

    def _detection_pass(self, path: str, probe: VideoProbe, info: dict, times: dict,
                        rng: Optional["WorkRange"] = None) -> Detections:
        """Detection at the right scale on every output frame: :meth:`_detection_scale` picks the
        scale, then one streaming decode at that scale (plan and geometry from the probe) gives
        every face candidate of every frame (boxes, scores, 68 points), scaled back to source
        (display) pixels, and each frame's thumbnail for the cut detector
        (:func:`pipelines.media.cuts.thumbnails`). Only the output frames of ``rng`` (all when
        None) are decoded; frame indices are then relative to its start. The subject track is
        chosen later, per shot, on the frames the audio covers."""
        cfg = self.cfg
        plan = plan_from_timestamps(path, probe.timestamps, cfg.fps)
        if rng is not None:
            plan = range_plan(plan, rng.start, rng.end)
        scale = self._detection_scale(path, probe, plan, info, times)
        info["_stage"] = "decode"
        t_decode = t_detect = 0.0
        parts, src_t, thumbs = [], [], []
        small_wh = None
        display_long = max(probe.width, probe.height)
        decode_side = int(round(display_long * scale)) if scale < 1.0 else None
        t0 = time.perf_counter()
        try:
            for chunk in iter_frames(path, fps=cfg.fps, chunk_frames=cfg.chunk_frames,
                                     max_side=decode_side, backend=cfg.detect_decode_backend,
                                     plan=plan, geometry=probe.geometry):
                t1 = time.perf_counter()
                t_decode += t1 - t0
                small_wh = (chunk.frames.shape[2], chunk.frames.shape[1])
                # what the decoder's whole-pixel size left of the scale (> 1: upsampling)
                rest = scale * probe.width / small_wh[0]
                info["_stage"] = "face"
                found = self.detector.detect_candidates(chunk.frames, scale=1.0 if abs(rest - 1) < 0.02 else rest)
                info["_stage"] = "decode"
                parts.append(found.shifted(chunk.start_index))
                thumbs.append(thumbnails(chunk.frames))
                src_t.append(np.asarray(chunk.source_times_s, np.float64))
                t0 = time.perf_counter()
                t_detect += t0 - t1
        except DecodeError as exc:
            raise RejectedVideo("decode", error_text(path, exc)) from None
        times["decode_detect_pass"] = t_decode
        times["detect"] = t_detect
        if not src_t:
            raise RejectedVideo("decode", f"{path}: no frames decoded")
        source_times = np.concatenate(src_t)
        info["video_frames"] = len(source_times)
        # detection ran on frames of small_wh: back to source (display) pixels
        cands = FaceCandidates.concat(parts).scaled(probe.width / small_wh[0], probe.height / small_wh[1])
        return Detections(cands, len(source_times), source_times, scale, np.concatenate(thumbs))

    def _detection_scale(self, path: str, probe: VideoProbe, plan: ResamplePlan, info: dict, times: dict
                         ) -> float:
        """The detection pass's scale (detection image / display frame), by the scale choice the
        portrait uses too (:func:`pipelines.faces.detect.choose_detection_scale`) on
        ``scale_search_frames`` frames spread over the whole video (a face that shows up only
        after the first seconds is still found; decoded at most at the ``detect_max_pixels``
        budget, see :meth:`_sample_frames`)."""
        cfg = self.cfg
        info["_stage"] = "decode"
        t0 = time.perf_counter()
        if plan.num_frames == 0:
            raise RejectedVideo("decode", f"{path}: no frames to decode")
        sel = np.unique(np.linspace(0, plan.num_frames - 1, max(1, cfg.scale_search_frames)).round().astype(np.int64))
        sub = replace(plan, source_indices=plan.source_indices[sel], times_s=plan.times_s[sel])

        def sample(side: Optional[int]) -> np.ndarray:
            frames = self._sample_frames(path, sub, side, probe.geometry)
            info["_stage"] = "face"
            return frames

        choice = choose_detection_scale(self.detector, sample, (probe.width, probe.height), cfg.detect_face_px,
                                        cfg.detect_max_pixels, cfg.detect_max_upscale, cfg.person_face_ratio)
        search = choice.search
        info.update(detect_scale=round(choice.scale, 4),
                    search_face_px=None if search.face_px is None else round(search.face_px, 1))
        times["scale_search"] = time.perf_counter() - t0
        return choice.scale

    def _sample_frames(self, path: str, sub: ResamplePlan, side: Optional[int], geometry: FrameGeometry
                       ) -> np.ndarray:
        """The frames of ``sub`` (a few output frames spread over the video) uint8 [k, h, w, 3],
        long side at most ``side``. decord first: it seeks to each frame (from its key frame), where
        the sequential PyAV decoder would decode the whole video for frames spread over it; PyAV
        (``detect_decode_backend``) when decord cannot (rotation, a codec or index it does not
        handle). Raises :class:`RejectedVideo` (stage ``decode``) when neither decodes them."""
        cfg = self.cfg

        def decode(backend: str) -> np.ndarray:
            return np.concatenate([c.frames for c in iter_frames(
                path, fps=cfg.fps, chunk_frames=sub.num_frames, max_side=side, backend=backend, plan=sub,
                geometry=geometry)])

        if cfg.detect_decode_backend == "auto" and not geometry.rotation:
            try:
                return decode("decord")
            except DecodeError:
                pass  # the configured decoder below
        try:
            return decode(cfg.detect_decode_backend)
        except DecodeError as exc:
            raise RejectedVideo("decode", error_text(path, exc)) from None

    def _audio(self, path: str, probe: VideoProbe, video_frames: int, info: dict, times: dict,
               rng: Optional["WorkRange"] = None) -> AlignedAudio:
        """16 kHz mono aligned to the video stream's start (stream start times from the probe),
        never padded: the frames it covers, the audio/video offset, the silence check. With a
        range (``rng``) only its audio (from its first frame) is decoded; the offset is then
        measured against the range (a range that is not the last ends before the audio does)."""
        cfg = self.cfg
        info["_stage"] = "audio"
        t0 = time.perf_counter()
        start_delta = probe.audio_start_s - probe.video_start_s  # > 0: audio begins after the first frame
        first_s = rng.start / cfg.fps if rng is not None else 0.0
        last = rng is None or rng.last
        try:
            audio = decode_audio(path, sample_rate=cfg.sample_rate, start_s=max(0.0, first_s - start_delta),
                                 duration_s=None if last else video_frames / cfg.fps + 1.0)
        except AudioDecodeError as exc:
            raise RejectedVideo("audio", error_text(path, exc)) from None
        if start_delta > cfg.max_audio_video_offset_s:
            raise RejectedVideo("audio", f"{path}: audio starts {start_delta:.3f} s after the video "
                                         f"(max_audio_video_offset_s {cfg.max_audio_video_offset_s:g})")
        num_frames, offset, rej = frames_covered_by_audio(video_frames, audio.duration_s, cfg)
        info["audio_offset_s"] = offset
        if rej:
            raise RejectedVideo(rej.stage, f"{path}: {rej.why}", rej.key)
        samples = audio.samples[: int(round(num_frames / cfg.fps * cfg.sample_rate))]
        rej = check_silence(is_silent(samples))
        if rej:
            raise RejectedVideo(rej.stage, f"{path}: {rej.why}", rej.key)
        times["audio_decode"] = time.perf_counter() - t0
        return AlignedAudio(samples, num_frames, offset)

    def _length_filter(self, path: str, num_frames: int, info: dict, where: str = "") -> None:
        """The exact length check on the frames that will be written (``min_frames``); ``where``
        names the shot ("shot 2/3 (10.00-12.40 s)") in the reason."""
        info["_stage"] = "filter"
        rej = check_length(num_frames, self.cfg)
        if rej:
            raise RejectedVideo(rej.stage, f"{path}: {where}{rej.why}", rej.key)

    def _crop_track(self, path: str, probe: VideoProbe, detections: Detections, shot: Shot,
                    samples: np.ndarray, info: dict, times: dict, where: str = "") -> CropTrack:
        """The subject's face track over the frames of ``shot`` (each shot is tracked on its own;
        ``where`` names it in the reasons; ``samples`` f32: the shot's audio at ``ingest.sample_rate``)
        (:func:`choose_subject_track`: the person who speaks), its
        crop track (``ingest.crop_margin`` with the ``ingest.crop_fill`` rule, one rule for the
        whole video) and the quality filters on it (missing face, head cut by the frame edge, yaw,
        head motion: all on the chosen track only). ``info`` gets the track facts and
        ``head_cut_ratio`` and, for a kept video, the crop's manifest facts (:meth:`pipelines.faces.crop.CropTrack.facts`:
        ``crop_fill``, ``crop_margin``, ``crop_adjusted_ratio``, ``crop_fill_max``, ``note``)."""
        cfg = self.cfg
        info["_stage"] = "crop"
        t0 = time.perf_counter()
        num_frames = shot.num_frames
        all_cands = detections.candidates
        cands = all_cands.select((all_cands.frame >= shot.start) & (all_cands.frame < shot.end)).shifted(-shot.start)
        try:
            subject, notes = choose_subject_track(path, cands, num_frames, samples, cfg, info)
        except RejectedVideo as rej:  # name the shot in the reason
            r = rej.rejection
            raise RejectedVideo(r.stage, r.why.replace(f"{path}: ", f"{path}: {where}", 1) if where else r.why,
                                r.key) from None
        landmarks, found = track_landmarks(cands, subject, num_frames)
        track = plan_crop_track(landmarks, found, (probe.width, probe.height), cfg.crop_margin, fps=cfg.fps,
                                fill=cfg.crop_fill)
        info["head_cut_ratio"] = round(track.head_cut_ratio, 4)
        rej = check_track(track, cfg)
        if rej:
            raise RejectedVideo(rej.stage, f"{path}: {where}{rej.why}", rej.key)
        facts = track.facts()  # the crop's manifest columns: margin, fill, share adjusted, note
        facts["note"] = "; ".join(n for n in [facts.get("note"), *notes] if n) or None
        info.update(facts)
        filled = interpolate_missing(landmarks, found)
        lm_crop = np.asarray(landmarks_to_crop(filled, track.boxes), np.float32)
        times["crop_plan"] = times.get("crop_plan", 0.0) + time.perf_counter() - t0
        return CropTrack(np.asarray(track.boxes, np.float32), lm_crop, found.astype(bool))


def _track_record(cands: FaceCandidates, track: TrackSummary) -> dict:
    """Where a track is and how much of the video it covers (for the ingest record)."""
    boxes = cands.boxes[track.members]
    return {"frames": [track.first, track.last], "coverage": round(track.coverage, 3),
            "width_px": round(track.width, 1),
            "centre_px": [round(float(np.median((boxes[:, 0] + boxes[:, 2]) / 2)), 1),
                          round(float(np.median((boxes[:, 1] + boxes[:, 3]) / 2)), 1)],
            "score": round(track.score, 3)}


def choose_subject_track(path: str, cands: FaceCandidates, num_frames: int, samples: np.ndarray,
                         cfg: IngestConfig, info: dict) -> tuple[TrackSummary, list[str]]:
    """The subject: among the persistent face tracks (``ingest.min_track_coverage``) those that
    look like faces (:func:`pipelines.faces.person_tracks.judge_track`: calibrated detector
    confidence, landmark shape); one alone must move its mouth, and among two or more the one who
    speaks is chosen (:func:`pipelines.faces.speaker.choose_speaker` on the audio ``samples`` f32
    [K] at ``ingest.sample_rate``; it must move its mouth too). Without any persistent track the
    best track is returned (the missing-face filter then speaks). Returns (the subject track,
    note clauses for the kept video). ``info`` gets ``face_tracks``, ``persistent_face_tracks``,
    ``speaker_sync`` (the subject's sync) and ``ignored_tracks`` (JSON: every persistent track not
    chosen, with its figures, its ``verdict``: ``not a person`` / ``face that does not speak`` /
    ``person`` (on a ``no_speaker`` rejection), and ``why``).
    Raises :class:`RejectedVideo`: no face at all (``no_face``); persistent faces but none behaves
    like a person (``distractor``); two or more people and none speaks clearly (``no_speaker``).
    Called per shot (:meth:`VideoAnalyzer._crop_track`): the shot's candidates (``cands.select``
    of its frames, ``shifted`` to start at 0), its frame count and its audio samples."""
    params = TrackParams(max_gap=max(1, int(round(cfg.track_max_gap_s * cfg.fps))),
                         min_coverage=cfg.min_track_coverage)
    choice = subject_track(cands, num_frames, params)
    info.update(face_tracks=len(choice.tracks), persistent_face_tracks=choice.persistent)
    if choice.subject is None:
        raise RejectedVideo("face", f"{path}: no face found in any frame", "no_face")
    persistent = [i for i, t in enumerate(choice.tracks) if t.coverage >= cfg.min_track_coverage]
    if not persistent:
        return choice.tracks[choice.subject], []
    judge = PersonParams(min_confidence=cfg.min_face_confidence, max_shape_error=cfg.max_face_shape_error,
                         min_mouth_motion=cfg.min_mouth_motion)
    evidence = {i: judge_track(cands, choice.tracks[i], judge) for i in persistent}
    records = {i: {**_track_record(cands, choice.tracks[i]), **evidence[i].facts()} for i in persistent}
    faces = [i for i in persistent if evidence[i].face_like]
    if len(faces) == 1 and evidence[faces[0]].still:
        faces = []  # one face, and it never moves its mouth: a poster or a photo with the sound of another
    ignored: list[dict] = [{**records[i], "verdict": "not a person", "why": "; ".join(evidence[i].why)}
                           for i in persistent if i not in faces]

    def described(i: int) -> str:
        t = choice.tracks[i]
        return f"{t.width:.0f} px face in {t.coverage:.0%} of frames: {'; '.join(evidence[i].why)}"

    info["ignored_tracks"] = json.dumps(ignored) if ignored else None
    if not faces:
        raise RejectedVideo("face", f"{path}: no face track behaves like a person ("
                                    + " | ".join(described(i) for i in persistent) + ")", "distractor")
    notes = []
    if ignored:
        notes.append(f"distractor face tracks ignored ({len(ignored)}: "
                     + " | ".join(described(i) for i in persistent if i not in faces) + ")")
    # two or more faces: the one whose mouth follows the audio (a still face's sync is ~0)
    loudness = audio_loudness_per_frame(samples, cfg.sample_rate, cfg.fps, num_frames)
    landmarks = [track_landmarks(cands, choice.tracks[i], num_frames)[0] for i in faces]
    spoke = choose_speaker(landmarks, loudness, 0, num_frames,
                           SpeakerParams(min_sync=cfg.min_speaker_sync, margin=cfg.speaker_sync_margin))
    for i, sync in zip(faces, spoke.syncs):
        records[i]["sync"] = None if not np.isfinite(sync) else round(float(sync), 4)
    if spoke.speaker is None or evidence[faces[spoke.speaker]].still:
        info["ignored_tracks"] = json.dumps(ignored + [{**records[i], "verdict": "person", "why": ""} for i in faces])
        why = spoke.why or f"the face whose sync leads never moves its mouth ({evidence[faces[spoke.speaker]].still})"
        raise RejectedVideo("face", f"{path}: {why}", "no_speaker")
    subject = faces[spoke.speaker]
    info["speaker_sync"] = records[subject]["sync"]
    others = [i for i in faces if i != subject]
    if others:
        ignored += [{**records[i], "verdict": "face that does not speak",
                     "why": "; ".join([f"sync {records[i]['sync']} vs the speaker's {records[subject]['sync']}",
                                       *([evidence[i].still] if evidence[i].still else [])])} for i in others]
        info["ignored_tracks"] = json.dumps(ignored)
        notes.append(f"faces that do not speak ignored ({len(others)}: sync "
                     + ", ".join(f"{records[i]['sync']}" for i in others)
                     + f" vs the speaker's {records[subject]['sync']})")
    return choice.tracks[subject], notes


class AnalyzerStage:
    """Ray Data ``map`` UDF of the analysis with a per-video deadline: :class:`VideoAnalyzer`
    runs in a child process of the actor (:class:`pipelines.ingestion.watchdog.WatchedWorker`, built once
    per actor, the detector kept warm). :meth:`VideoAnalyzer.begin` (probe + limits) gets
    ``deadline_base_s``; :meth:`VideoAnalyzer.finish` gets ``deadline_base_s + deadline_per_s x
    duration``. Past a deadline the child is killed and the video becomes a ``reject`` row at
    stage ``timeout``; a child that dies (OOM killer, segfault) gives a ``failed`` row (an
    infrastructure failure: a rerun retries it). A replacement child is started (and built)
    before the next video's deadline starts. Rows as :class:`VideoAnalyzer`'s."""

    def __init__(self, cfg: IngestConfig, dwpose_dir: Optional[str] = None):
        self.cfg = cfg
        self.worker = WatchedWorker("pipelines.ingestion.stages:VideoAnalyzer", {"cfg": cfg, "dwpose_dir": dwpose_dir})
        self.worker.start()  # start-up (imports, detector) here, not inside a video's deadline

    def __call__(self, row: dict) -> Iterator[dict]:
        """Ray Data ``flat_map``: one work range of one video -> the rows of
        :meth:`VideoAnalyzer.finish` (one per shot), or one ``reject`` / ``failed`` row for the
        whole range; an object of a bucket is read from a local copy made here, outside the
        child's deadline (:func:`with_local_copy`)."""
        yield from with_local_copy(str(row["video_id"]), str(row["path"]), "analyze",
                                   lambda local: iter(self._rows({**row, "path": local})))

    def _rows(self, row: dict) -> list[dict]:
        cfg = self.cfg
        video_id, path = str(row["video_id"]), str(row["path"])
        if cfg.fault_kill_match and cfg.fault_kill_match in Path(path).name:
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: this actor dies (as under the OOM killer)
        plain = {"video_id": video_id, "path": path,
                 **{k: row[k] for k in ("unit_id", "source_id", "range_start", "range_end", "range_whole",
                                        "range_last", "range_snap_start", "range_snap_end") if k in row}}
        # the probe of screen_video, when the row carries it (the job's rows do): not probed again
        screened = {k: row[k] for k in ("probe", "stream_pts_s", "probe_s") if k in row}
        clock = WorkBudget(cfg.deadline_base_s)  # charged as in watchdog.WorkBudget: CPU waits are free
        try:
            self.worker.ensure_started()  # after a timeout / death: outside the deadline
        except (DeadlineExceeded, WorkerDied, RemoteError) as exc:
            return [failed_row(video_id, path, "analyze", f"{path}: the analysis process did not start: {exc}")]
        try:
            first = self.worker.call("begin", {**plain, **screened}, deadline_s=clock)
            if first["kind"] != "probed":
                return [first]
            clock = WorkBudget(cfg.deadline_base_s + cfg.deadline_per_s * float(first["duration_s"]))
            return self.worker.call("finish", plain, deadline_s=clock)
        except DeadlineExceeded:
            return [reject_row(video_id, path, "timeout",
                               f"{path}: analysis not finished within its deadline of {clock.budget_s:.1f} s "
                               f"(deadline_base_s {cfg.deadline_base_s:g} + deadline_per_s "
                               f"{cfg.deadline_per_s:g} x duration; {clock.describe()}): its process was killed")]
        except WorkerDied as exc:
            return [failed_row(video_id, path, "analyze", f"{path}: {exc}")]
        except RemoteError as exc:
            return [reject_row(video_id, path, "analyze", f"{path}: {exc}")]


# --- stage 3: full-resolution decode and crop, one row per chunk ---------------------------------


def chunk_row(row: dict, kind: str, **extra) -> dict:
    base = {
        "kind": kind, "video_id": row["video_id"], "path": row["path"], "stage": "", "reason": "",
        "info": row["info"], "chunk_index": -1, "start_index": 0, "num_frames": 0, "num_chunks": 0,
        **_empty_video_arrays(),
        "features": np.zeros((0, 1, 1), np.float16),
        "crops": np.zeros((0, 1, 1, 3), np.uint8),
    }
    base.update(extra)
    return base


def frames_per_chunk(cfg: IngestConfig, width: int, height: int) -> int:
    """Frames per full-resolution chunk: ``chunk_frames``, fewer when that many uint8 RGB frames of
    ``width`` x ``height`` would exceed ``max_chunk_mb`` (e.g. 21 frames for 1080p at 128 MB)."""
    if width <= 0 or height <= 0:
        return cfg.chunk_frames
    fit = (cfg.max_chunk_mb * 1024 * 1024) // (width * height * 3)
    return int(max(1, min(cfg.chunk_frames, fit)))


class ChunkCropper:
    """The full-resolution decode + crop of one video at a time, in :class:`DecodeStage`'s child
    process. :meth:`open` plans the decode from the analyzer's probe facts (the file is opened
    once, by the decoder); each :meth:`next_chunk` decodes and crops the next chunk."""

    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg
        self._chunks: Optional[Iterator[dict]] = None
        self._path = ""
        self._served = 0  # chunks of the open video returned so far

    def open(self, path: str, n_total: int, width: int, height: int, stream_pts_s: np.ndarray,
             decode_source: dict, boxes: np.ndarray, first: int = 0) -> None:
        """``boxes`` f32 [n_total, 4]: the crop track (source pixels) of every output frame; a box
        reaching outside the frame (``ingest.crop_fill`` reflect / blur / constant) is filled.
        ``first``: the sample's first output frame in the source (a shot or a range of a long
        source: the decoder seeks there)."""
        cfg = self.cfg
        chunk_frames = frames_per_chunk(cfg, width, height)
        stamps, geometry = decode_source_of(stream_pts_s, decode_source)
        plan = plan_from_timestamps(path, stamps, cfg.fps)
        if first:
            plan = range_plan(plan, first, first + n_total)
        self._path, self._served = path, 0
        self._chunks = self._crops(path, n_total, chunk_frames, plan, geometry, np.asarray(boxes, np.float32))

    def _crops(self, path: str, n_total: int, chunk_frames: int, plan: ResamplePlan, geometry: FrameGeometry,
               boxes: np.ndarray) -> Iterator[dict]:
        written = 0
        t0 = time.perf_counter()
        for chunk in iter_frames(path, fps=self.cfg.fps, chunk_frames=chunk_frames, backend=self.cfg.decode_backend,
                                 plan=plan, geometry=geometry):
            t1 = time.perf_counter()
            start = int(chunk.start_index)
            if start != written:
                raise RuntimeError(f"{path}: decoder chunk starts at frame {start}, expected {written}")
            stop = min(start + len(chunk.frames), n_total)
            if stop <= start:
                return
            crops = crop_frames(chunk.frames[: stop - start], boxes[start:stop], self.cfg.crop_size,
                                fill=self.cfg.crop_fill)
            t2 = time.perf_counter()
            yield {"start": start, "stop": stop, "crops": np.ascontiguousarray(crops, np.uint8),
                   "source_times_s": np.asarray(chunk.source_times_s[: stop - start], np.float64),
                   "decode_s": t1 - t0, "crop_s": t2 - t1}
            written = stop
            if written >= n_total:
                return
            t0 = time.perf_counter()

    def next_chunk(self) -> Optional[dict]:
        """The next chunk: ``start``, ``stop`` (output frame indices), ``crops`` u8 [n, S, S, 3],
        ``source_times_s`` f64 [n], ``decode_s`` / ``crop_s`` (seconds); None after the last."""
        if self._chunks is None:
            raise RuntimeError("next_chunk before open")
        hang = self.cfg.fault_decode_hang_match
        if hang and hang in Path(self._path).name and self._served >= 1:
            time.sleep(24 * 3600)  # fault injection: a decoder that never returns, after one chunk
        chunk = next(self._chunks, None)
        self._served += 1
        if chunk is None:
            self._chunks = None
        return chunk


class DecodeStage:
    """Ray Data ``flat_map`` UDF (actor pool) of the full-resolution decode and crop, with the same
    per-video deadline as the analysis (``deadline_base_s + deadline_per_s x duration``, see
    :class:`AnalyzerStage` and pipelines/ingestion/watchdog.py for why a child process): :class:`ChunkCropper`
    runs in a watched child of the actor. Yields one ``chunk`` row per chunk
    (:func:`frames_per_chunk`) and then one ``end`` row; a video whose decode fails is a ``reject``
    row at stage ``decode``, one past its deadline a ``reject`` at stage ``timeout`` (the child is
    killed; a fresh one serves the next video), one whose child died (OOM killer) a ``failed`` row.
    Chunks already passed on for a video that then fails are discarded by the writer. Memory: one
    chunk of source frames at a time, in the child."""

    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg
        # started on the first video, outside its deadline (a job whose videos were all refused
        # by the analysis never starts one)
        self.worker = WatchedWorker("pipelines.ingestion.stages:ChunkCropper", {"cfg": cfg})

    def __call__(self, row: dict) -> Iterator[dict]:
        if row["kind"] != "video":  # reject / failed rows pass on as they are
            yield chunk_row(row, row["kind"], stage=row["stage"], reason=row["reason"])
            return
        # an object of a bucket: decoded from a local copy made here, outside the deadline
        for out in with_local_copy(str(row["video_id"]), str(row["path"]), "decode",
                                   lambda local: self._decode_local({**row, "path": local})):
            if out["kind"] in ("reject", "failed") and "crops" not in out:  # the copy's own rows
                out = chunk_row(row, out["kind"], stage=out["stage"], reason=out["reason"])
            yield out

    def _decode_local(self, row: dict) -> Iterator[dict]:
        cfg = self.cfg
        path, n_total = str(row["path"]), int(row["num_frames"])
        info = json.loads(row["info"])
        budget = cfg.deadline_base_s + cfg.deadline_per_s * n_total / cfg.fps
        boxes, lms, found, feats = row["boxes"], row["landmarks"], row["found"], row["features"]
        written = chunk_index = 0
        t_decode = t_crop = 0.0
        try:  # a child that cannot start is the machine's fault, never the file's
            self.worker.ensure_started()  # first video, or after a timeout / death: outside the deadline
        except (DeadlineExceeded, WorkerDied, RemoteError) as exc:
            yield chunk_row(row, "failed", stage="decode",
                            reason=f"failed: decode: {path}: the decode process did not start: {exc}")
            return
        # one budget for all of this video's calls, charged only while a call runs (a downstream
        # that is slow to take the next chunk costs the video nothing) and not for the child's
        # waits for a CPU (watchdog.WorkBudget)
        clock = WorkBudget(budget)
        try:
            self.worker.call("open", path, n_total, int(info["width"]), int(info["height"]), row["stream_pts_s"],
                             info[DECODE_SOURCE_KEY], np.asarray(boxes, np.float32),
                             int((info.get(UNIT_KEY) or {}).get("start", 0)), deadline_s=clock)
            while written < n_total:
                chunk = self.worker.call("next_chunk", deadline_s=clock)
                if chunk is None:
                    break
                start, stop = int(chunk["start"]), int(chunk["stop"])
                t_decode += chunk["decode_s"]
                t_crop += chunk["crop_s"]
                yield chunk_row(
                    row, "chunk", chunk_index=chunk_index, start_index=start, num_frames=stop - start,
                    boxes=np.asarray(boxes[start:stop], np.float32),
                    landmarks=np.asarray(lms[start:stop], np.float32),
                    found=np.asarray(found[start:stop], bool),
                    time_s=np.arange(start, stop, dtype=np.float64) / cfg.fps,
                    source_time_s=chunk["source_times_s"],
                    features=np.asarray(feats[start:stop], np.float16),
                    crops=chunk["crops"],
                )
                written = stop
                chunk_index += 1
        except DeadlineExceeded:
            yield chunk_row(row, "reject", stage="timeout",
                            reason=f"timeout: {path}: full-resolution decode not finished within its deadline of "
                                   f"{budget:.1f} s (deadline_base_s {cfg.deadline_base_s:g} + deadline_per_s "
                                   f"{cfg.deadline_per_s:g} x duration; {clock.describe()}): its process was killed")
            return
        except WorkerDied as exc:
            yield chunk_row(row, "failed", stage="decode", reason=f"failed: decode: {path}: {exc}")
            return
        except RemoteError as exc:
            yield chunk_row(row, "reject", stage="decode", reason=f"decode: {error_text(path, exc)}")
            return
        if written != n_total:
            yield chunk_row(row, "reject", stage="decode",
                            reason=f"decode: {path}: full-resolution decode gave {written} frames, the "
                                   f"detection pass {n_total}")
            return
        info.setdefault(STAGE_TIMES_KEY, {}).update(decode_full=t_decode, crop=t_crop)
        yield chunk_row(row, "end", num_frames=written, num_chunks=chunk_index, info=json.dumps(info))


# --- stage 4: VAE latents --------------------------------------------------------------------------
