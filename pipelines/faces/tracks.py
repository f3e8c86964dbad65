"""Face tracks: every face candidate of every frame linked across frames, and the choice of the
video's subject (the person whose face is cropped). numpy only (no torch, no dlib). Hand-written:
the rules are a few lines of IoU / distance gating, and tracker libraries (e.g. SORT/ByteTrack
ports) bring Kalman filters and dependencies that static-camera talking heads do not need.

Why: the largest box of each frame jumps between the real face and a face-like patch (a print
on clothing, a poster, a second person) whenever the detector misses the face for a frame or
scores the patch larger, and the "head motion" of that jumping box rejects a steady video.

Rules (units: frames of the output rate, pixels of the frames the boxes are in):

* :func:`link_tracks`: frame by frame, each open track is matched to at most one candidate
  of the next frame (greedy, nearest pair first). A pair
  matches when the box sizes differ by at most ``max_size_ratio`` and either the boxes overlap
  with IoU >= ``min_iou`` or the centres are at most ``max_centre_dist`` track face widths
  apart (plus ``gap_dist_per_frame`` widths per frame of gap). A track left unmatched for more
  than ``max_gap`` frames is closed; gaps up to that are bridged. Afterwards, closed tracks
  that do not overlap in time and meet end-to-start (same rule, any gap) are joined: a face
  hidden for longer than ``max_gap`` stays one track.
* :func:`summarize_tracks`: per track its coverage (share of the N frames with a candidate),
  median box width and median score.
* :func:`choose_subject`: persistent tracks are those with coverage >= ``min_coverage``; the
  subject is the persistent track with the largest coverage x width (ties: higher score).
  Other persistent tracks whose width is >= ``similar_size_ratio`` x the subject's are
  *rivals* (a fact of the tracks; the ingest keeps the person who speaks among the tracks that
  behave like people: ``pipelines.faces.person_tracks``, ``pipelines.faces.speaker``). Without a
  persistent track the best track by the same weight is returned (the missing-face filter then
  speaks). Detections outside every persistent track (spurious boxes) are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

NUM_POINTS = 68


@dataclass
class FaceCandidates:
    """Face candidates of many frames, flat (one row per candidate).

    frame: int64 [M] frame index of each candidate; boxes: float32 [M, 4] (x0, y0, x1, y1)
    pixels; scores: float32 [M] detector confidence (higher = surer; the scale is the
    detector's); landmarks: float32 [M, 68, 2] pixel (x, y), iBUG-68 order; calibrated: float32
    [M] the detector's score of the same face re-scored at a fixed face size
    (``pipelines.faces.person_tracks.CANONICAL_FACE_PX``), so it means the same at every scale
    (NaN where the detector gives none or on the frames it skips; None in the constructor = all
    NaN).
    """

    frame: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray
    calibrated: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        if self.calibrated is None:
            self.calibrated = np.full(len(self.frame), np.nan, np.float32)

    @staticmethod
    def empty() -> "FaceCandidates":
        return FaceCandidates(np.zeros(0, np.int64), np.zeros((0, 4), np.float32),
                              np.zeros(0, np.float32), np.zeros((0, NUM_POINTS, 2), np.float32))

    def __len__(self) -> int:
        return int(len(self.frame))

    @staticmethod
    def concat(parts: list["FaceCandidates"]) -> "FaceCandidates":
        if not parts:
            return FaceCandidates.empty()
        return FaceCandidates(np.concatenate([p.frame for p in parts]).astype(np.int64),
                              np.concatenate([p.boxes for p in parts]).astype(np.float32),
                              np.concatenate([p.scores for p in parts]).astype(np.float32),
                              np.concatenate([p.landmarks for p in parts]).astype(np.float32),
                              np.concatenate([p.calibrated for p in parts]).astype(np.float32))

    def shifted(self, frames: int) -> "FaceCandidates":
        """The same candidates with frame indices + ``frames`` (a chunk's start)."""
        return FaceCandidates(self.frame + int(frames), self.boxes, self.scores, self.landmarks, self.calibrated)

    def scaled(self, sx: float, sy: float) -> "FaceCandidates":
        """Boxes and landmarks with x multiplied by ``sx`` and y by ``sy``."""
        s4 = np.array([sx, sy, sx, sy], np.float32)
        return FaceCandidates(self.frame, self.boxes * s4, self.scores,
                              self.landmarks * np.array([sx, sy], np.float32), self.calibrated)

    def select(self, mask_or_index: np.ndarray) -> "FaceCandidates":
        return FaceCandidates(self.frame[mask_or_index], self.boxes[mask_or_index],
                              self.scores[mask_or_index], self.landmarks[mask_or_index],
                              self.calibrated[mask_or_index])

    def before(self, num_frames: int) -> "FaceCandidates":
        """The candidates of frames < ``num_frames``."""
        return self.select(self.frame < num_frames)


@dataclass(frozen=True)
class TrackParams:
    """Linking and choice thresholds (see the module docstring)."""

    max_gap: int = 12  # frames a track may go unseen and still be continued
    min_iou: float = 0.3
    nms_iou: float = 0.5  # boxes of one frame overlapping this much are one face
    max_centre_dist: float = 0.5  # face widths between consecutive boxes of one track
    gap_dist_per_frame: float = 0.05  # extra face widths allowed per frame of gap
    max_size_ratio: float = 1.5  # larger / smaller box width of one track's consecutive boxes
    min_coverage: float = 0.5  # share of frames a track needs to count as a persistent face
    similar_size_ratio: float = 0.7  # a second persistent face this large (x subject) is a rival


@dataclass
class TrackSummary:
    """One track: ``members`` int64 [k] candidate rows (ascending frame, one per frame);
    coverage (share of the video's N frames), median box ``width`` (pixels), median ``score``,
    first / last frame."""

    members: np.ndarray
    coverage: float
    width: float
    score: float
    first: int
    last: int

    @property
    def weight(self) -> float:
        return self.coverage * self.width


@dataclass
class SubjectChoice:
    """Result of :func:`choose_subject`: ``subject`` index into ``tracks`` (None: no candidate
    at all), ``rivals`` indices of other persistent tracks of similar size, ``persistent``
    number of persistent tracks."""

    tracks: list[TrackSummary]
    subject: Optional[int]
    rivals: list[int] = field(default_factory=list)
    persistent: int = 0


def _widths(boxes: np.ndarray) -> np.ndarray:
    return np.maximum(boxes[..., 2] - boxes[..., 0], 1e-6)


def _centres(boxes: np.ndarray) -> np.ndarray:
    return np.stack([(boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2], -1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [p, 4] against b [q, 4] (x0, y0, x1, y1) -> [p, q]."""
    a, b = np.asarray(a, np.float64)[:, None], np.asarray(b, np.float64)[None]
    ix = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    iy = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = ix * iy
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def _match_cost(last: np.ndarray, gaps: np.ndarray, cand: np.ndarray, p: TrackParams) -> np.ndarray:
    """Cost [t, c] of continuing tracks (last boxes [t, 4], frames since seen [t]) with
    candidates [c, 4]: centre distance in track face widths; ``inf`` where the rule forbids."""
    w_t, w_c = _widths(last)[:, None], _widths(cand)[None]
    dist = np.linalg.norm(_centres(last)[:, None] - _centres(cand)[None], axis=-1) / w_t
    ratio = np.maximum(w_t, w_c) / np.minimum(w_t, w_c)
    near = dist <= p.max_centre_dist + p.gap_dist_per_frame * (gaps[:, None] - 1)
    ok = (ratio <= p.max_size_ratio) & (near | (box_iou(last, cand) >= p.min_iou))
    return np.where(ok, dist, np.inf)


def link_tracks(frame: np.ndarray, boxes: np.ndarray, params: TrackParams = TrackParams(),
                scores: Optional[np.ndarray] = None) -> list[np.ndarray]:
    """Candidates (frame int [M], boxes [M, 4], optional scores [M]) -> tracks, each an int64
    array of candidate rows in ascending frame order (at most one per frame). Every candidate is
    in one track; a box overlapping a surer box of its frame with IoU >= ``nms_iou`` (a duplicate
    detection of the same face) is left as a track of its own."""
    frame = np.asarray(frame, np.int64)
    boxes = np.asarray(boxes, np.float64)
    order = np.argsort(frame, kind="stable")
    sorted_frames = frame[order]
    frames, starts = np.unique(sorted_frames, return_index=True)
    stops = np.append(starts[1:], len(order))
    tracks: list[list[int]] = []
    open_ids: list[int] = []
    scores = np.zeros(len(frame)) if scores is None else np.asarray(scores, np.float64)
    for f, a, b in zip(frames, starts, stops):
        rows = order[a:b]
        if len(rows) > 1:  # duplicates of one face (IoU >= nms_iou) keep the surest box only
            rows = rows[np.argsort(-scores[rows], kind="stable")]
            iou = box_iou(boxes[rows], boxes[rows])
            dup = np.array([(iou[i, :i] >= params.nms_iou).any() for i in range(len(rows))])
            tracks.extend([int(r)] for r in rows[dup])
            rows = rows[~dup]
        open_ids = [t for t in open_ids if f - frame[tracks[t][-1]] <= params.max_gap + 1]
        taken = np.zeros(len(rows), bool)
        if open_ids:
            last = boxes[[tracks[t][-1] for t in open_ids]]
            gaps = np.array([f - frame[tracks[t][-1]] for t in open_ids], np.float64)
            cost = _match_cost(last, gaps, boxes[rows], params)
            # greedy, nearest pair first: a min-sum assignment would rather make two mediocre
            # matches (face -> a nearby spurious box, a spurious track -> the face) than one good one
            used = np.zeros(len(open_ids), bool)
            for flat in np.argsort(cost, axis=None, kind="stable"):
                t, c = divmod(int(flat), len(rows))
                if not np.isfinite(cost[t, c]):
                    break
                if used[t] or taken[c]:
                    continue
                tracks[open_ids[t]].append(int(rows[c]))
                used[t] = taken[c] = True
        for r in rows[~taken]:
            tracks.append([int(r)])
            open_ids.append(len(tracks) - 1)
    return _join_fragments([np.array(t, np.int64) for t in tracks], frame, boxes, params)


def _join_fragments(tracks: list[np.ndarray], frame: np.ndarray, boxes: np.ndarray,
                    p: TrackParams, min_len: int = 3) -> list[np.ndarray]:
    """Join tracks that follow each other in time (the first ends before the second starts) and
    meet end-to-start: centre distance <= ``max_centre_dist`` widths and size ratio <=
    ``max_size_ratio``, whatever the gap. Globally nearest pair first, repeated until no pair
    fits. Tracks shorter than ``min_len`` candidates (spurious boxes) are left alone."""
    short = [t for t in tracks if len(t) < min_len]
    tracks = [t for t in tracks if len(t) >= min_len]
    rule = TrackParams(max_gap=p.max_gap, min_iou=p.min_iou, max_centre_dist=p.max_centre_dist,
                       gap_dist_per_frame=0.0, max_size_ratio=p.max_size_ratio)
    while len(tracks) > 1:
        first = np.array([frame[t[0]] for t in tracks])
        last = np.array([frame[t[-1]] for t in tracks])
        cost = _match_cost(boxes[[t[-1] for t in tracks]], np.ones(len(tracks)),
                           boxes[[t[0] for t in tracks]], rule)  # [i ends, j starts]
        cost[last[:, None] >= first[None, :]] = np.inf
        i, j = np.unravel_index(int(np.argmin(cost)), cost.shape)
        if not np.isfinite(cost[i, j]):
            break
        merged = np.concatenate([tracks[i], tracks[j]])
        tracks = [t for k, t in enumerate(tracks) if k not in (i, j)] + [merged]
    return tracks + short


def summarize_tracks(tracks: list[np.ndarray], cands: FaceCandidates, num_frames: int
                     ) -> list[TrackSummary]:
    """Coverage, median width and score of each track over ``num_frames`` frames."""
    out = []
    for t in tracks:
        out.append(TrackSummary(
            members=np.asarray(t, np.int64),
            coverage=float(len(t) / max(num_frames, 1)),
            width=float(np.median(_widths(cands.boxes[t]))),
            score=float(np.median(cands.scores[t])),
            first=int(cands.frame[t[0]]), last=int(cands.frame[t[-1]]),
        ))
    return out


def choose_subject(tracks: list[TrackSummary], params: TrackParams = TrackParams()) -> SubjectChoice:
    """The subject track and its rivals (see the module docstring)."""
    if not tracks:
        return SubjectChoice(tracks, None)
    order = sorted(range(len(tracks)), key=lambda i: (tracks[i].weight, tracks[i].score), reverse=True)
    persistent = [i for i in order if tracks[i].coverage >= params.min_coverage]
    if not persistent:
        return SubjectChoice(tracks, order[0], [], 0)
    subject = persistent[0]
    rivals = [i for i in persistent[1:] if tracks[i].width >= params.similar_size_ratio * tracks[subject].width]
    return SubjectChoice(tracks, subject, rivals, len(persistent))


def track_landmarks(cands: FaceCandidates, track: TrackSummary, num_frames: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One track's landmarks over ``num_frames`` frames: (float32 [N, 68, 2], NaN where the track
    has no candidate; found bool [N])."""
    lm = np.full((num_frames, NUM_POINTS, 2), np.nan, np.float32)
    found = np.zeros(num_frames, bool)
    rows = track.members[cands.frame[track.members] < num_frames]
    lm[cands.frame[rows]] = cands.landmarks[rows]
    found[cands.frame[rows]] = True
    return lm, found


def subject_track(cands: FaceCandidates, num_frames: int, params: TrackParams = TrackParams()
                  ) -> SubjectChoice:
    """Link ``cands`` (all of frames < ``num_frames``: see :meth:`FaceCandidates.before`) into
    tracks and choose the subject; track members index rows of ``cands``."""
    tracks = summarize_tracks(link_tracks(cands.frame, cands.boxes, params, cands.scores), cands, num_frames)
    return choose_subject(tracks, params)
