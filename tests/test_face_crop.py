"""Face landmarks (dlib on the astronaut sample, DWPose layout and error paths), yaw, crops."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.faces.crop import crop_frames, landmarks_to_crop, plan_crop_track
from pipelines.faces.detect import (
    DlibDetector,
    DWPoseDetector,
    FaceCandidateDetector,
    FaceDetectorError,
    FaceLandmarkDetector,
    box_to_pose_input,
    make_detector,
    pose_input_to_image,
    simcc_decode,
)
from pipelines.faces.landmarks import (
    CHIN,
    MOUTH,
    NOSE_TIP,
    UPPER_FACE,
    estimate_yaw_deg,
    wholebody_to_face68,
)


@pytest.fixture(scope="module")
def detector():
    return DlibDetector(detect_max_side=480)


@pytest.fixture(scope="module")
def astronaut_video(tmp_path_factory):
    """1.2 s, 25 fps, 320x320 talking head (one short sample video)."""
    from pipelines.samples.talking_heads import SampleSpec, write_talking_head

    root = tmp_path_factory.mktemp("face")
    spec = SampleSpec("face", "25", 16000, 1, 320, 320)
    return write_talking_head(root / "face.mp4", spec, 1.2, "Hello there, how are you?",
                              np.random.default_rng(5), root)


# ---------------------------------------------------------------- detection
def test_dlib_finds_68_points_where_the_face_was_rendered(detector):
    from pipelines.samples.talking_heads import _FACE_SIZE, TalkingHeadRenderer

    renderer = TalkingHeadRenderer(320, 320, np.random.default_rng(1))
    times = [0.0, 0.7, 1.9, 3.1]
    frames = np.stack([renderer.render(t, 0.5) for t in times])
    landmarks, found = detector.detect(frames)
    assert isinstance(detector, FaceLandmarkDetector)
    assert landmarks.shape == (4, 68, 2) and landmarks.dtype == np.float32
    assert found.all()
    for i, t in enumerate(times):
        dx, dy, _, scale = renderer.pose(t)
        centre = np.array([renderer.centre[0] + dx, renderer.centre[1] + dy])
        box_centre = (landmarks[i].min(0) + landmarks[i].max(0)) / 2
        face = _FACE_SIZE * scale
        assert np.linalg.norm(box_centre - centre) < 0.12 * face
        width = landmarks[i, :, 0].max() - landmarks[i, :, 0].min()
        assert 0.8 * face < width < 1.25 * face
        # iBUG order: chin below the nose tip, nose tip below the brows, mouth below the nose
        assert landmarks[i, CHIN, 1] > landmarks[i, NOSE_TIP, 1] > landmarks[i, 17:27, 1].mean()
        assert landmarks[i, list(MOUTH), 1].mean() > landmarks[i, NOSE_TIP, 1]


def test_detection_on_downscaled_copy_matches_full_size(detector):
    from pipelines.samples.talking_heads import TalkingHeadRenderer

    frame = TalkingHeadRenderer(360, 640, np.random.default_rng(2)).render(0.3, 0.2)[None]
    try:
        detector.detect_max_side = None
        full, found_full = detector.detect(frame)
        detector.detect_max_side = 320
        small, found_small = detector.detect(frame)
    finally:
        detector.detect_max_side = 480
    assert found_full.all() and found_small.all()
    assert np.abs(full - small).max() < 6.0  # points fitted at full size either way


def test_no_face_frame_reports_not_found(detector):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:240]
    gradient = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.uint8)
    noise = rng.integers(0, 255, size=(240, 240, 3), dtype=np.uint8)
    landmarks, found = detector.detect(np.stack([gradient, noise]))
    assert not found.any()
    assert np.isnan(landmarks).all()
    with pytest.raises(ValueError):
        detector.detect(np.zeros((2, 8, 8), np.uint8))


def test_short_video_detect_and_crop(astronaut_video, detector):
    from pipelines.media.video_decode import iter_frames

    lms, founds, frames = [], [], []
    for chunk in iter_frames(astronaut_video, chunk_frames=12):
        lm, ok = detector.detect(chunk.frames)
        lms.append(lm)
        founds.append(ok)
        frames.append(chunk.frames)
    lm, found, frames = np.concatenate(lms), np.concatenate(founds), np.concatenate(frames)
    assert len(found) == 30 and found.all()
    track = plan_crop_track(lm, found, (320, 320), margin=0.6)
    assert track.missing_ratio == 0.0 and track.head_cut_ratio == 0.0
    assert track.adjusted_ratio == 0.0 and track.margin == 0.6 and track.note() is None  # the asked crop fits
    assert 0.0 < track.head_motion < 0.5
    assert track.max_abs_yaw_deg < 20.0
    crops = crop_frames(frames, track.boxes, 64)
    assert crops.shape == (30, 64, 64, 3) and crops.dtype == np.uint8
    norm = landmarks_to_crop(lm, track.boxes)
    assert norm.min() > 0.0 and norm.max() < 1.0
    # the face is centred in the crop
    centre = (norm.min(axis=1) + norm.max(axis=1)) / 2
    assert np.abs(centre - 0.5).max() < 0.15


# ---------------------------------------------------------------- DWPose (no weights here)
def test_wholebody_face_slice_is_points_23_to_90():
    kp = np.stack([np.arange(133), -np.arange(133)], -1).astype(np.float32)[None]
    face = wholebody_to_face68(kp)
    assert face.shape == (1, 68, 2)
    assert face[0, 0, 0] == 23 and face[0, 67, 0] == 90 and face[0, NOSE_TIP, 0] == 53
    with pytest.raises(ValueError):
        wholebody_to_face68(np.zeros((68, 2)))


def test_simcc_decode_and_mapping_back():
    k = 133
    sx = np.zeros((1, k, 576), np.float32)
    sy = np.zeros((1, k, 768), np.float32)
    xs = np.arange(k) * 4 % 576
    ys = np.arange(k) * 5 % 768
    sx[0, np.arange(k), xs] = 1.0
    sy[0, np.arange(k), ys] = 0.8
    pts, score = simcc_decode(sx, sy)
    np.testing.assert_allclose(pts[0, :, 0], xs / 2.0)
    np.testing.assert_allclose(pts[0, :, 1], ys / 2.0)
    np.testing.assert_allclose(score, 0.8)
    centre, scale = box_to_pose_input(np.array([100, 50, 200, 250]))
    assert np.isclose(scale[0] / scale[1], 288 / 384) and scale[1] >= 200 * 1.25 - 1e-3
    # the centre of the model input maps to the box centre, its corners to the region corners
    np.testing.assert_allclose(pose_input_to_image(np.array([144.0, 192.0]), centre, scale), [150, 150])
    np.testing.assert_allclose(pose_input_to_image(np.array([0.0, 0.0]), centre, scale), centre - scale / 2)


def test_dwpose_error_paths(tmp_path):
    with pytest.raises(FaceDetectorError, match="yolox_l.onnx"):
        DWPoseDetector(tmp_path)
    with pytest.raises(FaceDetectorError, match="dwpose_dir"):
        make_detector("dwpose", None)
    with pytest.raises(FaceDetectorError, match="unknown detector"):
        make_detector("mediapipe", None)
    (tmp_path / "yolox_l.onnx").write_bytes(b"x")
    (tmp_path / "dw-ll_ucoco_384.onnx").write_bytes(b"x")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        with pytest.raises(FaceDetectorError, match="onnxruntime"):
            make_detector("dlib", str(tmp_path))
    else:
        with pytest.raises(FaceDetectorError, match="not a loadable ONNX model"):  # not a valid onnx model
            DWPoseDetector(tmp_path)
    assert isinstance(make_detector("dlib", None), DlibDetector)


# ---------------------------------------------------------------- layout, yaw
def test_upper_face_indices():
    assert len(set(UPPER_FACE)) == 37
    assert not set(UPPER_FACE) & set(MOUTH) and CHIN not in UPPER_FACE
    assert set(range(17, 48)) <= set(UPPER_FACE) and {0, 1, 2, 14, 15, 16} <= set(UPPER_FACE)


def _template(nose_shift: float = 0.0) -> np.ndarray:
    """A symmetric synthetic 68-point face (unit width ~100 px) with the nose moved sideways."""
    lm = np.zeros((68, 2), np.float64)
    jaw_angle = np.linspace(np.pi, 0, 17)
    lm[0:17] = np.stack([150 + 50 * np.cos(jaw_angle), 100 + 60 * np.sin(jaw_angle)], -1)
    lm[17:27] = np.stack([np.linspace(110, 190, 10), np.full(10, 80)], -1)
    lm[27:36] = np.stack([np.full(9, 150 + nose_shift), np.linspace(90, 130, 9)], -1)
    lm[36:48] = np.stack([np.r_[np.linspace(115, 135, 6), np.linspace(165, 185, 6)], np.full(12, 95)], -1)
    lm[48:68] = np.stack([np.linspace(130, 170, 20), np.full(20, 145)], -1)
    return lm


def test_estimate_yaw_deg():
    faces = np.stack([_template(s) for s in (0.0, 10.0, 25.0, -25.0)])
    yaw = estimate_yaw_deg(faces)
    assert abs(yaw[0]) < 1.0
    assert 0 < yaw[1] < yaw[2] and np.isclose(yaw[3], -yaw[2], atol=1e-4)
    assert 20 < yaw[2] < 40  # offset 25 of half-width 50: asin(0.5) = 30 degrees


# ---------------------------------------------------------------- crop track
def test_crop_track_square_inside_frame_and_contains_landmarks():
    rng = np.random.default_rng(0)
    n = 60
    base = _template()
    shifts = np.stack([20 * np.sin(np.arange(n) / 9.0), 10 * np.cos(np.arange(n) / 7.0)], -1)
    lm = base[None] + shifts[:, None, :] + rng.normal(0, 1.5, size=(n, 68, 2))
    found = np.ones(n, bool)
    found[[10, 11, 12, 40]] = False
    lm[~found] = np.nan
    W, H = 320, 240
    track = plan_crop_track(lm, found, (W, H), margin=0.4)
    b = track.boxes
    assert b.shape == (n, 4) and b.dtype == np.float32
    np.testing.assert_allclose(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1], atol=1e-3)  # square
    np.testing.assert_array_equal(b, np.round(b))  # whole pixels: what crop_frames cuts
    assert (b[:, :2] >= -1e-3).all() and (b[:, 2] <= W + 1e-3).all() and (b[:, 3] <= H + 1e-3).all()
    ok = found
    inside = ((lm[ok] >= b[ok, None, :2]) & (lm[ok] <= b[ok, None, 2:])).all()
    assert inside
    assert np.isclose(track.missing_ratio, 4 / 60)
    assert track.head_cut_ratio == 0.0 and track.adjusted_ratio == 0.0 and track.shifted_ratio == 0.0
    # interpolated boxes of the missing frames sit between their neighbours
    assert min(b[9, 0], b[13, 0]) - 2 <= b[11, 0] <= max(b[9, 0], b[13, 0]) + 2
    # head motion: std of the centre in face widths (~100 px wide face)
    want = np.sqrt(shifts[found].var(axis=0).sum()) / 100.0
    assert abs(track.head_motion - want) < 0.03
    # smoothing: box centres jitter (second differences) far less than the raw landmark centres
    run = slice(14, 40)  # frames with a face
    raw_c = (lm[run].min(axis=1)[:, 0] + lm[run].max(axis=1)[:, 0]) / 2
    box_c = (b[run, 0] + b[run, 2]) / 2
    assert np.std(np.diff(box_c, n=2)) < 0.5 * np.std(np.diff(raw_c, n=2))


def test_crop_track_head_out_of_frame_and_no_face():
    lm = np.repeat(_template()[None], 20, axis=0) + np.array([140.0, 0.0])  # face centre x = 290
    track = plan_crop_track(lm, np.ones(20, bool), (320, 240), margin=0.4)
    assert track.head_cut_ratio == 1.0 and track.head_cut_parts == {"right side": 1.0}
    assert track.head_cut_text() == "head cut by the frame edge in 100% of frames (right side outside"
    assert (track.boxes[:, 2] <= 320 + 1e-3).all()
    empty = plan_crop_track(np.full((5, 68, 2), np.nan), np.zeros(5, bool), (320, 240), margin=0.4)
    assert empty.missing_ratio == 1.0
    np.testing.assert_allclose(empty.boxes[0], [40, 0, 280, 240])


def test_crop_frames_is_a_face_centred_square_not_a_squash():
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[20:70, 120:170] = (255, 0, 0)  # a 50x50 red square
    frame[45:47, 120:170] = (0, 0, 255)  # with a horizontal blue line through its middle
    box = np.array([[120, 20, 170, 70]], np.float32)
    crop = crop_frames(frame[None], box, 25)
    assert crop.shape == (1, 25, 25, 3)
    assert crop[0, :8, :, 0].min() > 200 and crop[0, :8, :, 2].max() < 40  # red, not the black frame
    assert crop[0, 12, :, 2].mean() > 80  # the blue line stays horizontal in the middle
    lm = np.array([[[120, 20], [170, 70], [145, 45]] + [[145, 45]] * 65], np.float32)
    norm = landmarks_to_crop(lm, box)
    np.testing.assert_allclose(norm[0, :3], [[0, 0], [1, 1], [0.5, 0.5]], atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        crop_frames(frame[None], np.array([[170, 20, 220, 70]], np.float32), 25)


# ---------------------------------------------------------------- candidates and detection scale
def _drawn_centre_and_width(box):
    return (box[:2] + box[2:]) / 2, float(box[2] - box[0])


def test_candidates_are_every_face_with_scores_and_landmarks(detector):
    from pipelines.samples.face_scenes import ScenePerson, SceneSpec, render_scene

    spec = SceneSpec("two", 960, 540, (ScenePerson(0.3, 0.45, 0.3), ScenePerson(0.75, 0.5, 0.2)), seconds=0.08)
    frames, truth = render_scene(spec, mouth=[0.3, 0.3])
    cands = detector.detect_candidates(frames)
    assert isinstance(detector, FaceCandidateDetector)
    assert sorted(cands.frame.tolist()) == [0, 0, 1, 1]
    assert cands.scores.dtype == np.float32 and (cands.scores > 0).all()
    for f in range(2):
        rows = np.flatnonzero(cands.frame == f)
        for person in range(2):
            centre, width = _drawn_centre_and_width(truth[f, person])
            near = [r for r in rows if np.linalg.norm((cands.boxes[r, :2] + cands.boxes[r, 2:]) / 2 - centre)
                    < 0.25 * width]
            assert len(near) == 1, (f, person)
            lm = cands.landmarks[near[0]]
            assert np.linalg.norm((lm.min(0) + lm.max(0)) / 2 - centre) < 0.15 * width


def test_small_face_is_found_at_the_searched_scale(detector):
    from pipelines.faces.detect import pass_scale, search_face_scale
    from pipelines.samples.face_scenes import ScenePerson, SceneSpec, render_scene

    # a face 6 % of the short side of a 1280x720 frame (~43 px): below HOG's window at full size
    spec = SceneSpec("small", 1280, 720, (ScenePerson(0.6, 0.4, 0.06),), seconds=0.12)
    frames, truth = render_scene(spec)
    assert len(detector.detect_candidates(frames[:1])) == 0
    search = search_face_scale(detector, frames, (1280, 720), max_pixels=3_200_000)
    assert search.face_px is not None and search.level == 2
    assert 0.7 * 43 < search.face_px < 1.5 * 43
    scale = pass_scale(search, (1280, 720), 100.0, 3_200_000, min_face_px=detector.min_face_px)
    assert scale > 1.4
    cands = detector.detect_candidates(frames, scale=scale)
    assert sorted(set(cands.frame.tolist())) == [0, 1, 2]
    centre, width = _drawn_centre_and_width(truth[0, 0])
    box = cands.boxes[cands.frame == 0][0]
    assert np.linalg.norm((box[:2] + box[2:]) / 2 - centre) < 0.25 * width


def test_scale_search_samples_the_whole_video_so_a_face_shown_late_is_found(tmp_path):
    """The detection-scale search samples frames spread over the whole video, not only its first
    seconds: a small face (6 % of the short side of 1280x720, ~43 px) shown only after 6 s of an
    empty frame is found and sets the scale (the no-face fallback scale, ~1.1, would miss it)."""
    import subprocess

    from core.sections import IngestConfig
    from pipelines.ingestion.stages import VideoAnalyzer
    from pipelines.media.probe import probe_video
    from pipelines.media.video_decode import plan_from_timestamps
    from pipelines.samples.face_scenes import ScenePerson, SceneSpec, write_scene

    scene, _ = write_scene(tmp_path, SceneSpec("late", 1280, 720, (ScenePerson(0.6, 0.4, 0.06),), seconds=8.0))
    late = tmp_path / "late_face.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(scene), "-vf",
                    "tpad=start_duration=6:start_mode=add:color=gray", "-an", "-c:v", "libx264", "-preset",
                    "ultrafast", "-pix_fmt", "yuv420p", str(late)], check=True, timeout=120)
    analyzer = VideoAnalyzer(IngestConfig())
    probe = probe_video(late)
    assert probe.duration_s == pytest.approx(14.0, abs=0.1)
    info: dict = {}
    scale = analyzer._detection_scale(str(late), probe, plan_from_timestamps(late, probe.timestamps, 25.0), info, {})
    assert info["search_face_px"] is not None, info
    assert 0.7 * 43 < info["search_face_px"] < 1.5 * 43, info
    assert scale > 1.4 and info["detect_scale"] == pytest.approx(scale, abs=1e-4)


def test_large_face_search_stops_at_the_coarse_level(detector):
    from pipelines.faces.detect import pass_scale, search_face_scale
    from pipelines.samples.face_scenes import ScenePerson, SceneSpec, render_scene

    spec = SceneSpec("big", 720, 1280, (ScenePerson(0.5, 0.45, 0.7),), seconds=0.08)
    frames, truth = render_scene(spec)
    search = search_face_scale(detector, frames, (720, 1280), max_pixels=3_200_000)
    assert search.level == 0 and len(search.searched) == 1
    assert abs(search.face_px - 0.7 * 720) < 0.3 * 0.7 * 720
    assert pass_scale(search, (720, 1280), 100.0, 3_200_000) < 0.35


def test_dlib_cnn_detector_finds_the_face():
    from pipelines.faces.detect import DlibCnnDetector
    from pipelines.samples.talking_heads import TalkingHeadRenderer

    cnn = make_detector("dlib_cnn")
    assert isinstance(cnn, DlibCnnDetector) and isinstance(cnn, FaceCandidateDetector)
    renderer = TalkingHeadRenderer(256, 256, np.random.default_rng(3))
    frame = renderer.render(0.2, 0.3)[None]
    cands = cnn.detect_candidates(frame)
    assert len(cands) == 1 and cands.scores[0] > 0.5
    dx, dy, _, _ = renderer.pose(0.2)
    box = cands.boxes[0]
    centre = np.array([renderer.centre[0] + dx, renderer.centre[1] + dy])
    assert (box[:2] < centre).all() and (centre < box[2:]).all()  # MMOD boxes sit higher than HOG's
    lm = cands.landmarks[0]
    assert np.linalg.norm((lm.min(0) + lm.max(0)) / 2 - centre) < 0.15 * (box[2] - box[0])
    with pytest.raises(FaceDetectorError, match="unknown detector"):
        make_detector("yolo")


# --- the portrait (serving): detection at the right scale, one subject ------------------------------


@pytest.mark.parametrize("width,height,face_frac", [(1080, 1920, 0.08), (1920, 1080, 0.07), (400, 400, 0.7)],
                         ids=["phone_portrait_small_face", "landscape_small_face", "face_fills_frame"])
def test_portrait_face_is_found_at_any_scale_and_cropped_around_it(width, height, face_frac):
    """A portrait photo whose face is 7-8 % of the short side (under dlib's window at 480 px, the
    old fixed detection size) or most of the frame: found, and the crop is centred on the true face."""
    from core.sections import IngestConfig
    from inference.portrait import PortraitCropper
    from pipelines.samples.face_scenes import ScenePerson, SceneSpec, render_scene

    spec = SceneSpec("p", width, height, (ScenePerson(0.4, 0.45, face_frac),), seconds=0.04)
    frames, boxes = render_scene(spec, seed=1)
    ic = IngestConfig()
    cropper = PortraitCropper(DlibDetector(), ic.crop_size, ic.crop_margin, ic.fps, ic.detect_face_px,
                              ic.detect_max_pixels, ic.detect_max_upscale, ic.similar_face_ratio)
    lm = cropper.landmarks(frames[0])
    assert lm is not None
    true = boxes[0, 0]
    centre = lm.min(0) / 2 + lm.max(0) / 2
    true_w = float(true[2] - true[0])
    assert np.linalg.norm(centre - (true[:2] + true[2:]) / 2) < 0.25 * true_w
    assert 0.6 < float(np.ptp(lm[:, 0])) / true_w < 1.6
    assert cropper.crop(frames[0]).shape == (ic.crop_size, ic.crop_size, 3)


def test_portrait_with_two_similar_faces_is_refused_and_a_small_background_face_ignored():
    from core.sections import IngestConfig
    from inference.portrait import PortraitCropper, SeveralFacesError
    from pipelines.samples.face_scenes import ScenePerson, SceneSpec, render_scene

    ic = IngestConfig()
    cropper = PortraitCropper(DlibDetector(), ic.crop_size, ic.crop_margin, ic.fps, ic.detect_face_px,
                              ic.detect_max_pixels, ic.detect_max_upscale, ic.similar_face_ratio)
    two = SceneSpec("two", 1280, 720, (ScenePerson(0.28, 0.45, 0.25), ScenePerson(0.72, 0.45, 0.24)), seconds=0.04)
    with pytest.raises(SeveralFacesError, match="2 faces of similar size"):
        cropper.landmarks(render_scene(two, seed=2)[0][0])
    poster = SceneSpec("poster", 1080, 1920, (ScenePerson(0.45, 0.42, 0.2), ScenePerson(0.8, 0.12, 0.09)),
                       seconds=0.04)
    frames, boxes = render_scene(poster, seed=3)
    lm = cropper.landmarks(frames[0])
    subject = boxes[0, 0]
    assert subject[0] - 10 < float(lm[:, 0].mean()) < subject[2] + 10  # the subject, not the poster
