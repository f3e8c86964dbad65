"""MTCNN (pipelines/faces/mtcnn.py, pipelines/faces/detect.py MtcnnDetector; issue 23 item 5) on
rendered scenes, on the CPU: the faces found where they were drawn, plausible landmarks, nothing on
blank or noise frames, a batch equal to its frames one by one, the NMS against a plain greedy loop,
missing weights named, the scale search, and the ingest's analysis keeping the speaker with
``ingest.detector=mtcnn``. The weights come from the facenet-pytorch wheel that ``make install``
installs (``--no-deps``): without them these tests fail, they are not skipped.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.sections import IngestConfig
from pipelines.faces.detect import FaceDetectorError, MtcnnDetector, make_detector, search_face_scale
from pipelines.faces.tracks import box_iou
from pipelines.samples.face_scenes import ScenePerson, SceneSpec, render_scene, write_scene

FRAMES = 4
TWO = SceneSpec("two", 640, 360, (ScenePerson(0.3, 0.45, 0.3), ScenePerson(0.74, 0.5, 0.16)), seconds=FRAMES / 25)


@pytest.fixture(scope="module")
def detector():
    torch.set_num_threads(1)  # the suite runs two test processes on two cores
    return MtcnnDetector()


@pytest.fixture(scope="module")
def two(detector):
    """(frames uint8 [4, 360, 640, 3], true boxes [4, 2, 4], candidates, raw cascade faces)."""
    frames, truth = render_scene(TWO, seed=2, mouth=np.full(FRAMES, 0.4))
    return frames, truth, detector.detect_candidates(frames), detector._mtcnn(frames)


def test_both_rendered_faces_are_found_where_they_were_drawn(two):
    frames, truth, cands, _ = two
    for f in range(FRAMES):
        boxes = cands.boxes[cands.frame == f]
        assert len(boxes) == 2, (f, boxes)  # the two faces, nothing else
        iou = box_iou(truth[f], boxes)
        assert (iou.max(axis=1) > 0.6).all(), (f, iou)
    assert (cands.scores > 0.9).all()
    calibrated = cands.calibrated[np.isfinite(cands.calibrated)]
    assert len(calibrated) == 2 and (calibrated > 0.3).all()  # frame 0's HOG re-score: real faces


def test_landmarks_are_plausible(two):
    _, truth, cands, raw = two
    for points, box in zip(raw.points, raw.boxes):  # 5 points: eyes above the nose above the mouth
        assert points[:2, 1].max() < points[2, 1] < points[3:, 1].min()
        assert points[0, 0] < points[1, 0] and points[3, 0] < points[4, 0]
        assert ((points >= box[:2]) & (points <= box[2:])).all()
    for marks, box in zip(cands.landmarks, cands.boxes):  # the 68 points fitted in the box
        assert marks[36:48, 1].mean() < marks[30, 1] < marks[48:68, 1].mean()
        w = box[2] - box[0]
        centre = (box[:2] + box[2:]) / 2
        assert np.abs(marks.mean(0) - centre).max() < 0.3 * w


def test_nothing_on_blank_or_noise_frames(detector):
    rng = np.random.default_rng(0)
    frames = np.stack([np.zeros((240, 320, 3), np.uint8), np.full((240, 320, 3), 128, np.uint8),
                       rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)])
    assert len(detector.detect_candidates(frames)) == 0
    landmarks, found = detector.detect(frames)
    assert not found.any() and np.isnan(landmarks).all()


def test_a_batch_equals_its_frames_one_by_one(detector, two):
    frames, _, _, batch = two
    for f in range(FRAMES):
        one = detector._mtcnn(frames[f:f + 1])
        rows = batch.frame == f
        assert len(one.scores) == rows.sum()
        np.testing.assert_allclose(one.boxes, batch.boxes[rows], atol=1e-2)
        np.testing.assert_allclose(one.points, batch.points[rows], atol=1e-2)
        np.testing.assert_allclose(one.scores, batch.scores[rows], atol=1e-4)


def test_detect_gives_the_largest_face(detector, two):
    frames, truth, _, _ = two
    landmarks, found = detector.detect(frames)
    assert found.all()
    centre = landmarks.mean(axis=1)
    big = (truth[:, 0, :2] + truth[:, 0, 2:]) / 2
    assert (np.linalg.norm(centre - big, axis=1) < 0.2 * (truth[:, 0, 2] - truth[:, 0, 0])).all()


@pytest.mark.parametrize("chunked", [False, True])
def test_batched_nms_is_greedy_nms_per_frame(chunked, monkeypatch):
    from pipelines.faces import mtcnn
    from pipelines.faces.mtcnn import batched_nms

    if chunked:  # one frame per overlap matrix, as with many boxes on a big batch
        monkeypatch.setattr(mtcnn, "_NMS_ELEMENTS", 1)

    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 100, (60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 40, (60, 2))], 1)
    scores, groups = rng.uniform(0, 1, 60), rng.integers(0, 3, 60)
    kept = set(batched_nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(groups), 0.3).tolist())
    expect = set()
    for g in range(3):  # the plain loop: best first, drop what overlaps a kept box of its frame
        chosen = []
        for i in sorted(np.flatnonzero(groups == g), key=lambda i: -scores[i]):
            if all(box_iou(boxes[i:i + 1], boxes[j:j + 1])[0, 0] <= 0.3 for j in chosen):
                chosen.append(i)
        expect |= set(int(i) for i in chosen)
    assert kept == expect and 3 < len(kept) < 60


def test_missing_or_wrong_weights_name_the_file(monkeypatch):
    import pipelines.faces.mtcnn as mtcnn

    monkeypatch.setitem(mtcnn.WEIGHT_FILES, "onet", "facenet_pytorch/data/no_such_onet.pt")
    with pytest.raises(FaceDetectorError, match="no_such_onet.pt"):
        make_detector("mtcnn")
    monkeypatch.setitem(mtcnn.WEIGHT_FILES, "onet", mtcnn.WEIGHT_FILES["pnet"])  # a state dict, not O-Net's
    with pytest.raises(FaceDetectorError, match=r"pnet\.pt: not the MTCNN onet weights"):
        make_detector("mtcnn")
    monkeypatch.setattr(mtcnn, "WEIGHTS_PACKAGE", "no-such-package-loopy")
    with pytest.raises(FaceDetectorError, match=r"pnet\.pt.*no-such-package-loopy is not installed"):
        make_detector("mtcnn")


def test_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: nothing to refuse")  # CI has none: this runs there
    with pytest.raises(FaceDetectorError, match="no CUDA device"):
        make_detector("mtcnn", device="cuda")


def test_the_scale_search_finds_the_face_size(detector, two):
    frames, truth, _, _ = two
    search = search_face_scale(detector, frames[:3], (640, 360), max_pixels=3_200_000)
    width = truth[0, 0, 2] - truth[0, 0, 0]
    assert search.largest_px is not None and abs(search.largest_px / width - 1) < 0.2, (search, width)


def test_the_analysis_keeps_the_speaker_with_mtcnn(tmp_path):
    """The ingest's analysis (VideoAnalyzer, as the Ray actor's child runs it) with
    ingest.detector=mtcnn: two people, the smaller right-hand one speaks."""
    from pipelines.ingestion.stages import VideoAnalyzer, analysis_device, analysis_gpus

    cfg = IngestConfig(min_frames=50, detector="mtcnn")
    assert analysis_device(cfg) == "cpu" and analysis_gpus(cfg) == {}
    gpu_cfg = IngestConfig(min_frames=50, detector="mtcnn", use_gpu=True)
    assert analysis_device(gpu_cfg) == "cuda" and analysis_gpus(gpu_cfg) == {"num_gpus": 1.0}
    assert analysis_gpus(IngestConfig(use_gpu=True)) == {}  # dlib: the CPU only
    spec = SceneSpec("two_right_smaller_speaks", 640, 360, (
        ScenePerson(0.74, 0.5, 0.28), ScenePerson(0.27, 0.5, 0.4, mouth="other")), 2.4)
    path, true = write_scene(tmp_path, spec, seed=5)
    (row,) = VideoAnalyzer(cfg)({"video_id": "two", "path": str(path)})
    info = json.loads(row["info"] or "{}")
    assert row["kind"] == "video", row["reason"]
    n = int(row["num_frames"])
    crop, speaker = np.asarray(row["boxes"])[:n], true[:n, 0]
    dx = (crop[:, 0] + crop[:, 2]) / 2 - (speaker[:, 0] + speaker[:, 2]) / 2
    assert np.median(np.abs(dx) / (speaker[:, 2] - speaker[:, 0])) < 0.25, info
    assert info.get("speaker_sync", 0) >= 0.3, info
