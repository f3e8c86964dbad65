"""Face tracks (pipelines/faces/tracks.py) on constructed candidate sequences: the subject is the
persistent, large track; spurious boxes, a distractor on clothing, a second smaller person and a
poster are ignored; two similar faces are rivals (which one the ingest keeps, the one who
speaks, is tests/test_person_tracks.py's); gaps are bridged. Plus the scale rules of
pipelines/faces/detect.py."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.faces.detect import (
    ScaleSearch,
    max_detection_scale,
    pass_scale,
    search_levels,
)
from pipelines.faces.tracks import (
    FaceCandidates,
    TrackParams,
    box_iou,
    link_tracks,
    subject_track,
    track_landmarks,
)

N = 100


def _box(cx: float, cy: float, w: float) -> list[float]:
    return [cx - w / 2, cy - w / 2, cx + w / 2, cy + w / 2]


def _cands(rows: list[tuple[int, float, float, float, float]]) -> FaceCandidates:
    """rows of (frame, cx, cy, width, score) -> candidates; landmarks = the box corners and
    centre repeated (enough to tell which box a frame's landmarks came from)."""
    frame = np.array([r[0] for r in rows], np.int64)
    boxes = np.array([_box(*r[1:4]) for r in rows], np.float32).reshape(-1, 4)
    scores = np.array([r[4] for r in rows], np.float32)
    lm = np.repeat(((boxes[:, :2] + boxes[:, 2:]) / 2)[:, None], 68, axis=1)
    return FaceCandidates(frame, boxes, scores, lm.astype(np.float32))


def _face(frames, cx=320.0, cy=200.0, w=120.0, score=1.5, wobble=3.0):
    """A steady talking head: the centre wobbles by a few pixels."""
    return [(f, cx + wobble * np.sin(f / 7), cy + wobble * np.cos(f / 9), w, score) for f in frames]


def _subject_centre(cands: FaceCandidates, choice) -> np.ndarray:
    lm, found = track_landmarks(cands, choice.tracks[choice.subject], N)
    return np.nanmedian(lm[found, 0], axis=0)


def test_box_iou():
    a = np.array([_box(0, 0, 10)])
    b = np.array([_box(0, 0, 10), _box(5, 0, 10), _box(100, 0, 10)])
    np.testing.assert_allclose(box_iou(a, b)[0], [1.0, 50 / 150, 0.0], atol=1e-9)


def test_single_face_with_gaps_is_one_track():
    # the face is missed in 8 frames here and there and for 30 frames once (turned away)
    missing = set(range(10, 14)) | {40, 41, 55, 77} | set(range(60, 90))
    cands = _cands(_face([f for f in range(N) if f not in missing]))
    choice = subject_track(cands, N)
    assert len(choice.tracks) == 1 and choice.persistent == 1 and not choice.rivals
    lm, found = track_landmarks(cands, choice.tracks[choice.subject], N)
    assert found.sum() == N - len(missing)
    assert np.isnan(lm[~found]).all() and np.isfinite(lm[found]).all()


def test_distractor_on_clothing_is_ignored():
    # the detector fires on a face-like shirt print below the face in 25 % of the frames, and in
    # 10 of those it misses the real face (so "largest box per frame" would jump to the shirt)
    rng = np.random.default_rng(0)
    shirt = sorted(rng.choice(N, 25, replace=False))
    face_missed = set(shirt[:10])
    rows = _face([f for f in range(N) if f not in face_missed])
    rows += [(f, 330.0, 420.0, 130.0, 0.3) for f in shirt]
    cands = _cands(rows)
    choice = subject_track(cands, N)
    subject = choice.tracks[choice.subject]
    assert choice.persistent == 1 and not choice.rivals
    assert abs(_subject_centre(cands, choice)[1] - 200.0) < 10
    assert len(subject.members) == N - 10


def test_smaller_second_person_and_poster_are_not_the_subject():
    rows = _face(range(N), cx=400, cy=300, w=200)
    rows += _face(range(N), cx=1000, cy=350, w=110, score=2.5)  # second person, clearly smaller
    rows += [(f, 150.0, 120.0, 90.0, 2.0) for f in range(0, N, 2)]  # poster, every other frame
    rows += [(f, 700.0 + 37 * (f % 5), 600.0, 80.0, 0.1) for f in range(3, N, 9)]  # noise
    cands = _cands(rows)
    choice = subject_track(cands, N)
    assert choice.persistent == 3  # subject, second person, poster (50 % of frames)
    assert not choice.rivals
    assert abs(_subject_centre(cands, choice)[0] - 400) < 10
    assert choice.tracks[choice.subject].width == pytest.approx(200, rel=1e-3)


def test_two_similar_people_are_rivals():
    rows = _face(range(N), cx=350, cy=300, w=180)
    rows += _face(range(5, N), cx=900, cy=310, w=170)
    choice = subject_track(_cands(rows), N)
    assert len(choice.rivals) == 1
    subject, rival = choice.tracks[choice.subject], choice.tracks[choice.rivals[0]]
    assert subject.width == pytest.approx(180, rel=1e-3)  # more frames and larger
    assert rival.width == pytest.approx(170, rel=1e-3)


def test_crossing_boxes_keep_their_identity():
    # two faces of different size pass each other: size keeps the assignment apart
    rows = [(f, 100.0 + 6 * f, 300.0, 200.0, 1.0) for f in range(N)]
    rows += [(f, 700.0 - 6 * f, 320.0, 100.0, 1.0) for f in range(N)]
    cands = _cands(rows)
    tracks = link_tracks(cands.frame, cands.boxes, TrackParams())
    assert sorted(len(t) for t in tracks) == [N, N]
    for t in tracks:
        widths = cands.boxes[t, 2] - cands.boxes[t, 0]
        assert np.ptp(widths) < 1e-3


def test_no_candidates_and_no_persistent_track():
    choice = subject_track(FaceCandidates.empty(), N)
    assert choice.subject is None
    # only a face in 20 % of the frames: still the subject (the missing-face filter decides)
    choice = subject_track(_cands(_face(range(20))), N)
    assert choice.subject is not None and choice.persistent == 0
    assert choice.tracks[choice.subject].coverage == pytest.approx(0.2)


def test_candidates_helpers():
    cands = _cands(_face(range(10)))
    moved = cands.shifted(50).scaled(2.0, 3.0)
    assert moved.frame[0] == 50
    np.testing.assert_allclose(moved.boxes[:, 0], cands.boxes[:, 0] * 2)
    np.testing.assert_allclose(moved.landmarks[..., 1], cands.landmarks[..., 1] * 3)
    assert len(FaceCandidates.concat([cands, moved]).before(50)) == 10


# ---------------------------------------------------------------- detection scale
def test_search_levels_and_pass_scale():
    # 1080x1920 portrait: coarse-to-fine levels find faces of 25 %, 10 %, 5 % of 1080 px
    levels = search_levels((1080, 1920), 64.0, max_pixels=3_200_000)
    np.testing.assert_allclose(levels[:2], [64 / 270, 64 / 108], rtol=1e-6)
    assert levels[2] == pytest.approx(min(64 / 54, max_detection_scale((1080, 1920), 3_200_000, 2.0)))
    # a face 216 px wide (1/5 of the width) is shown at 100 px
    s = pass_scale(ScaleSearch(216.0, 0, tuple(levels[:1])), (1080, 1920), 100.0, 3_200_000)
    assert s == pytest.approx(100 / 216)
    # a 36 px face in 720p (5 %): upsampled, within the pixel budget
    s = pass_scale(ScaleSearch(36.0, 2, tuple(levels)), (1280, 720), 100.0, 3_200_000)
    assert 1.5 < s <= 2.0 and (1280 * s) * (720 * s) <= 3_200_000 * 1.0001
    # a face filling 80 % of the short side: the image is not shrunk below 96 px
    s = pass_scale(ScaleSearch(576.0, 0, ()), (1280, 720), 100.0, 3_200_000)
    assert s == pytest.approx(100 / 576) and 720 * s >= 96
    # no face in the samples: the scale that finds faces of 10 % of the short side
    assert pass_scale(ScaleSearch(None, -1, ()), (1280, 720), 100.0, 3_200_000) == pytest.approx(64 / 72)


def test_random_spurious_boxes_and_duplicates_do_not_split_the_face():
    # 15 % of the frames carry a random box of face size anywhere (some land on the face: a
    # duplicate detection of it, or a box half a face away)
    n = 1500
    rng = np.random.default_rng(0)
    noise_frames = rng.choice(n, int(0.15 * n))
    rows = _face(range(n), cx=300, cy=150, w=100)
    rows += [(int(f), float(x), 150.0, 100.0, 0.5) for f, x in zip(noise_frames, rng.uniform(0, 1000, len(noise_frames)))]
    cands = _cands(rows)
    choice = subject_track(cands, n)
    subject = choice.tracks[choice.subject]
    assert subject.coverage == 1.0 and choice.persistent == 1
    lm, found = track_landmarks(cands, subject, n)
    assert np.abs(lm[:, 0, 0] - (300 + 3 * np.sin(np.arange(n) / 7))).max() < 1e-3


def test_a_duplicate_box_on_the_face_does_not_start_a_rival_track():
    # frame 30: the detector also returns a weaker box exactly where the face was one frame
    # before (IoU ~0.9 with the face box): without duplicate suppression the track would take
    # it (nearer) and the face would start a second track
    rows = [(f, 200.0 + 3 * f, 150.0, 100.0, 1.5) for f in range(60)]
    rows.append((30, 200.0 + 3 * 29, 150.0, 100.0, 0.2))
    cands = _cands(rows)
    choice = subject_track(cands, 60)
    subject = choice.tracks[choice.subject]
    assert subject.coverage == 1.0
    lm, _ = track_landmarks(cands, subject, 60)
    np.testing.assert_allclose(lm[:, 0, 0], 200.0 + 3 * np.arange(60))
    without = subject_track(cands, 60, TrackParams(nms_iou=1.01))
    assert without.tracks[without.subject].coverage < 1.0


def test_pass_scale_keeps_a_smaller_face_above_the_window_next_to_a_larger_one():
    # a speaker of 100 px next to a poster of 200 px (display pixels): the poster at 100 px would
    # put the speaker at 50 px, under HOG's window; the speaker is shown at 80 px (1.25 windows)
    s = pass_scale(ScaleSearch(100.0, 1, (), largest_px=200.0), (1280, 720), 100.0, 3_200_000)
    assert s == pytest.approx(80 / 100)
    # one face alone (or faces of one size): at detect_face_px
    assert pass_scale(ScaleSearch(100.0, 1, (), largest_px=100.0), (1280, 720), 100.0, 3_200_000) == pytest.approx(1.0)
