"""Issue 24: close-ups keep the face that is in the frame; a crop is refused only for a head the
frame cuts, with a reason that says so.

The close-ups are rendered here with the sample renderer's scene API
(``pipelines.samples.face_scenes``: the astronaut talking head pasted at a known place and size,
with its smooth head motion; no downloads): faces of 0.3 to 0.7 of the shorter frame side in
landscape, portrait and square frames, a head whose hair touches the top edge, a frame that cuts
the forehead above the brows (kept: enough forehead is in), and a chin cut off by the bottom edge
(the one that must be rejected). :func:`closeup` places a face by the gap between the top of its
landmark box (the brows) and the frame's top edge, in face sizes.

One ingest run over all of them (``pipelines.ingestion.job.run_ingest`` on the session's local
Ray, the tiny preset, as tests/test_ingest_real_world.py), then the portrait path: the
``PortraitCropper`` the service and the CLI build from a package's config, the service's upload
check (``serve.validation.check_face``: 422 for the cut-off chin), and the CLI ``python -m
inference.sample`` end to end on a close-up selfie (the service itself is not started here: its
sampler crops with the same ``PortraitCropper``). Fast unit tests of the crop rule come first.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from core.config import PlatformConfig, load_platform_config
from core.sections import IngestConfig
from pipelines.faces.crop import (
    CHIN_ALLOWANCE,
    FOREHEAD_ALLOWANCE,
    HEAD_CROP_FACTOR,
    crop_frames,
    landmarks_to_crop,
    plan_crop_track,
)
from pipelines.samples.face_scenes import ScenePerson, SceneSpec, render_scene, write_scene

SECONDS = 2.0  # 50 frames at 25 fps; min_frames is lowered to 40 for these short clips
MARGIN = IngestConfig().crop_margin  # 0.6: the asked margin of every case
HEAD_MARGIN = (HEAD_CROP_FACTOR - 1) / 2  # the smallest margin "reduce" keeps (the crop that holds the head)

# the astronaut's landmark box (brows to chin) is ~0.97 of its width, the hair top ~0.73 of it above the brows
HAIR_ABOVE_BROWS = 0.73


@dataclass(frozen=True)
class Closeup:
    """One close-up: frame size, face width (landmark box) as a fraction of the short side, the
    face centre's x (fraction of the width) and the gap from the frame's top edge to the top of the
    landmark box in face widths; ``reduced``: whether the asked crop (margin 0.6) cannot fit, so
    the margin must be reduced; ``kept``: False for the cut-off chin."""

    name: str
    width: int
    height: int
    face: float
    top_gap: float
    cx: float = 0.5
    reduced: bool = True
    kept: bool = True

    @property
    def face_px(self) -> float:
        return self.face * min(self.width, self.height)

    def spec(self) -> SceneSpec:
        cy = (self.top_gap + 0.5) * self.face_px / self.height  # landmark-box centre (fraction of H)
        return SceneSpec(self.name, self.width, self.height, (ScenePerson(self.cx, cy, self.face),), seconds=SECONDS)


def centred_gap(width: int, height: int, face: float) -> float:
    """The top gap that centres the head box (landmark box + allowances) vertically."""
    s = face * min(width, height)
    head = (1 + FOREHEAD_ALLOWANCE + CHIN_ALLOWANCE) * s
    return (height - head) / 2 / s + FOREHEAD_ALLOWANCE


CASES = (
    Closeup("landscape_640x360_face30", 640, 360, 0.3, centred_gap(640, 360, 0.3), reduced=False),
    Closeup("landscape_640x360_face50", 640, 360, 0.5, centred_gap(640, 360, 0.5)),
    Closeup("landscape_640x360_face70", 640, 360, 0.7, centred_gap(640, 360, 0.7)),
    Closeup("portrait_360x640_face60", 360, 640, 0.6, 0.9),
    Closeup("portrait_360x640_face70", 360, 640, 0.7, 0.8),
    # the case: 512x512 head and shoulders, face 0.4 of the width (the hair top cut a little)
    Closeup("square_512_face40", 512, 512, 0.4, 0.5),
    Closeup("top_edge_hair_640x360_face45", 640, 360, 0.45, HAIR_ABOVE_BROWS),  # the hair touches the top edge
    # the frame cuts the forehead 0.3 face widths above the brows (hair and most of the forehead out)
    Closeup("top_edge_forehead_360x640_face50", 360, 640, 0.5, 0.3),
)
# the chin (the landmark box's bottom) 0.15 face widths below the bottom edge
CHIN_CUT = Closeup("chin_cut_640x360_face45", 640, 360, 0.45, 360 / (0.45 * 360) - 1 + 0.15, kept=False)


def synthetic_face(centre_xy, width: float) -> np.ndarray:
    """A 68-point face [68, 2] whose landmark box is ``width`` x ``width`` around ``centre_xy``:
    jaw (0-16) round the lower half down to the chin (8) at the box bottom, brows (17-26) on the
    box top, eyes, nose and mouth inside."""
    cx, cy = centre_xy
    h = width / 2
    lm = np.zeros((68, 2))
    a = np.linspace(np.pi, 0, 17)
    lm[0:17] = np.stack([cx + h * np.cos(a), cy + h * np.sin(a)], -1)
    lm[17:27] = np.stack([np.linspace(cx - 0.8 * h, cx + 0.8 * h, 10), np.full(10, cy - h)], -1)
    lm[27:36] = np.stack([np.full(9, cx), np.linspace(cy - 0.6 * h, cy + 0.2 * h, 9)], -1)
    lm[36:48] = np.stack([np.r_[np.linspace(cx - 0.7 * h, cx - 0.3 * h, 6), np.linspace(cx + 0.3 * h, cx + 0.7 * h, 6)],
                          np.full(12, cy - 0.5 * h)], -1)
    lm[48:68] = np.stack([np.linspace(cx - 0.4 * h, cx + 0.4 * h, 20), np.full(20, cy + 0.5 * h)], -1)
    return lm


def steady(lm: np.ndarray, n: int = 30) -> tuple[np.ndarray, np.ndarray]:
    return np.repeat(lm[None], n, axis=0), np.ones(n, bool)


# --- the crop rule (fast) ---------------------------------------------------------------------------


def test_close_up_keeps_its_head_with_one_reduced_margin_and_no_fake_pixel():
    """The issue's clip: 512x512, face 0.4 of the width, the whole head in the frame. The asked
    crop (2.2 face widths) does not fit: the head is not cut, the margin is reduced to the largest
    that fits centred on the face, the same in every frame, every box inside the frame."""
    W = H = 512
    s = 0.4 * W
    t = np.arange(40)
    lm = np.stack([synthetic_face((256 + 12 * np.sin(k / 6), 0.5 * s + s / 2 + 6 * np.cos(k / 5)), s) for k in t])
    track = plan_crop_track(lm, np.ones(len(t), bool), (W, H), MARGIN)
    assert track.head_cut_ratio == 0.0 and track.head_cut_parts == {}
    assert track.fill == "reduce" and HEAD_MARGIN <= track.margin < MARGIN
    assert track.adjusted_ratio == 1.0 and track.fill_area_max == 0.0 and track.shifted_ratio == 0.0
    b = track.boxes
    assert (b[:, :2] >= 0).all() and (b[:, 2] <= W).all() and (b[:, 3] <= H).all()
    side = b[:, 2] - b[:, 0]
    # one margin for the whole video: every box is (1 + 2 margin) face widths (rounding and smoothing aside)
    np.testing.assert_allclose(side / s, 1 + 2 * track.margin, atol=0.02)
    norm = landmarks_to_crop(lm, b)
    assert norm.min() > 0.0 and norm.max() < 1.0  # the face is in every crop
    # the margin is the largest that fits: centred on the face, the tightest frame touches an edge
    centre_y = (b[:, 1] + b[:, 3]) / 2
    assert min(b[:, 1].min(), (H - b[:, 3]).min(), b[:, 0].min(), (W - b[:, 2]).min()) <= 2.0
    assert np.abs(centre_y - (lm[:, :, 1].min(1) + lm[:, :, 1].max(1)) / 2 + 0.1 * s).max() < 3.0
    note = track.note()
    assert re.fullmatch(r"crop margin reduced to 0\.\d\d \(asked 0\.6\) in 100% of frames", note), note
    assert track.facts()["crop_margin"] == pytest.approx(track.margin, abs=1e-4)


def test_fill_rules_keep_the_asked_crop_and_fill_its_border():
    W = H = 512
    s = 0.4 * W
    lm, found = steady(synthetic_face((256, 0.5 * s + s / 2), s))
    for fill in ("reflect", "blur", "constant"):
        track = plan_crop_track(lm, found, (W, H), MARGIN, fill=fill)
        assert track.fill == fill and track.margin == MARGIN and track.adjusted_ratio == 1.0
        side = track.boxes[:, 2] - track.boxes[:, 0]
        np.testing.assert_allclose(side, np.round(2.2 * s), atol=1)
        assert track.boxes[:, 1].min() < 0  # the asked crop reaches above the frame
        assert 0.0 < track.fill_area_max < 0.5
        assert re.fullmatch(rf"crop border filled \({fill}\) in 100% of frames \(up to \d+% of a crop, margin 0\.6\)",
                            track.note()), track.note()


def test_allowances_decide_what_is_a_cut_head():
    """The head box = landmark box + FOREHEAD_ALLOWANCE x s above + CHIN_ALLOWANCE x s below: a
    frame edge just beyond them keeps the video, just inside them cuts the head (the part named)."""
    W, H, s = 640, 360, 200.0
    for gap, cut in ((FOREHEAD_ALLOWANCE + 0.02, False), (FOREHEAD_ALLOWANCE - 0.02, True)):
        lm, found = steady(synthetic_face((320, gap * s + s / 2), s))
        track = plan_crop_track(lm, found, (W, H), MARGIN)
        assert (track.head_cut_ratio == 1.0) == cut, (gap, track.head_cut_parts)
        if cut:
            assert track.head_cut_parts == {"forehead": 1.0}
        else:  # kept: the crop holds the head, moved down inside the frame (the face cannot be centred)
            assert track.margin == pytest.approx(HEAD_MARGIN) and track.shifted_ratio == 1.0
            assert (track.boxes[:, 1] == 0).all()
    for gap, cut in ((CHIN_ALLOWANCE + 0.02, False), (CHIN_ALLOWANCE - 0.02, True)):
        lm, found = steady(synthetic_face((320, H - gap * s - s / 2), s))
        track = plan_crop_track(lm, found, (W, H), MARGIN)
        assert (track.head_cut_ratio == 1.0) == cut, (gap, track.head_cut_parts)
        if cut:
            assert track.head_cut_parts == {"chin": 1.0}
    lm, found = steady(synthetic_face((10, 180), 100.0))  # half the face beyond the left edge
    assert plan_crop_track(lm, found, (W, H), MARGIN).head_cut_parts == {"left side": 1.0}


def test_a_chin_cut_in_a_third_of_the_frames_is_rejected_with_what_happened():
    from pipelines.ingestion.quality import check_track

    W, H, s = 640, 360, 150.0
    n = 50
    lm = []
    for k in range(n):
        # bottom 17 of 50 frames (34 %): the chin 0.2 s below the edge, else 0.3 s above it
        bottom = H + 0.2 * s if k >= 33 else H - 0.3 * s
        lm.append(synthetic_face((320, bottom - s / 2), s))
    track = plan_crop_track(np.stack(lm), np.ones(n, bool), (W, H), MARGIN)
    assert track.head_cut_ratio == pytest.approx(17 / 50)
    rej = check_track(track, IngestConfig())
    assert rej is not None and rej.stage == "filter"
    assert rej.why == "head cut by the frame edge in 34% of frames (chin outside; max_out_of_frame_ratio 10%)"
    # under the threshold the video is kept and its note says so
    kept = check_track(track, IngestConfig(max_out_of_frame_ratio=0.5))
    assert kept is None and "head cut by the frame edge in 34% of frames (chin outside)" in track.note()
    # two parts: both named, the larger first
    lm2 = np.stack(lm)
    lm2[:5, :, 1] -= lm2[:5, :, 1].min() - 0.05 * s  # 5 frames with the brows 0.05 s under the top edge
    two = plan_crop_track(lm2, np.ones(n, bool), (W, H), MARGIN)
    assert two.head_cut_text() == "head cut by the frame edge in 44% of frames (chin outside in 34%, forehead in 10%"


def test_crop_frames_fills_only_what_lies_outside():
    frame = np.zeros((1, 100, 100, 3), np.uint8)
    frame[0, :, :50] = (200, 0, 0)  # left half red, right half green
    frame[0, :, 50:] = (0, 200, 0)
    box = np.array([[-50, 0, 50, 100]], np.float32)  # half of it left of the frame
    with pytest.raises(ValueError, match="outside"):
        crop_frames(frame, box, 20)
    with pytest.raises(ValueError, match="outside"):
        crop_frames(frame, box, 20, fill="reduce")  # reduce never fills
    with pytest.raises(ValueError, match="outside"):
        crop_frames(frame, np.array([[-150, 0, -50, 100]], np.float32), 20, fill="reflect")  # nothing in the frame
    constant = crop_frames(frame, box, 20, fill="constant")[0]
    assert constant[:, :9].max() == 0 and constant[:, 11:, 0].min() > 190  # black, then the red half
    reflect = crop_frames(frame, box, 20, fill="reflect")[0]
    assert reflect[:, :9, 0].min() > 190  # the mirror of the red half
    np.testing.assert_array_equal(reflect[:, 11:], constant[:, 11:])  # the real pixels are the same
    frame[0, :, :2] = (0, 0, 250)  # a blue stripe at the left edge: its mirror is sharp, its blur is not
    reflect = crop_frames(frame, box, 20, fill="reflect")[0].astype(int)
    blur = crop_frames(frame, box, 20, fill="blur")[0].astype(int)
    np.testing.assert_array_equal(blur[:, 11:], reflect[:, 11:])
    assert np.abs(np.diff(blur[10, :10, 2])).max() < np.abs(np.diff(reflect[10, :10, 2])).max()


def test_manifest_columns_notes_and_old_records():
    from pipelines.dataset.manifest import InputVideo, manifest_row, note_key, write_manifest
    from pipelines.dataset.schema import MANIFEST_SCHEMA

    for col in ("head_cut_ratio", "crop_fill", "crop_margin", "crop_adjusted_ratio", "crop_fill_max", "note",
                "note_key"):
        assert col in MANIFEST_SCHEMA.names
    assert note_key("crop margin reduced to 0.31 (asked 0.6) in 100% of frames; face off-centre in 4% of frames "
                    "(crop moved inside the frame)") == "crop margin reduced to #; face off-centre in #% of frames"
    video = InputVideo("a.mp4", Path("/x/a.mp4"), "0123456789abcdef", "train")
    row = manifest_row(video, status="ok", num_frames=50, note="crop margin reduced to 0.31 (asked 0.6) in 100% of "
                       "frames", crop_margin=0.31, crop_fill="reduce")
    assert row["note_key"] == "crop margin reduced to #"
    old = {k: v for k, v in row.items() if k not in ("note", "note_key", "crop_margin", "crop_fill")}  # an older record
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        table = pq.read_table(write_manifest(d, [old, {**row, "source": "b.mp4"}])).to_pylist()
    assert table[0]["note"] is None and table[0]["crop_margin"] is None
    assert table[1]["crop_margin"] == 0.31 and table[1]["note_key"] == "crop margin reduced to #"


def test_an_output_folder_written_before_the_fill_rule_is_refused_for_resume(tmp_path, tiny_weights):
    """A folder ingested before this change (its fingerprint has no ``ingest.crop_fill``, and its
    rejections followed the old framing rule) is refused by a resumed run, naming the setting; the
    same settings written now are accepted."""
    from pipelines.ingestion.resume import FINGERPRINT_NAME, IngestOutputError, claim_output_dir, ingest_fingerprint

    weights_cfg, weights = tiny_weights
    now = ingest_fingerprint(PlatformConfig(weights=weights_cfg), weights)
    old_settings = {k: v for k, v in now["settings"].items() if k != "ingest.crop_fill"}
    (tmp_path / FINGERPRINT_NAME).write_text(json.dumps({"fingerprint": "0123456789abcdef", "settings": old_settings}))
    with pytest.raises(IngestOutputError, match=r"ingest\.crop_fill: None -> 'reduce'"):
        claim_output_dir(tmp_path, now)
    fresh = tmp_path / "new"
    fresh.mkdir()
    claim_output_dir(fresh, now)
    claim_output_dir(fresh, now)  # accepted on resume


# --- the portrait (service and CLI) -----------------------------------------------------------------------


def _cropper(**ingest):
    """The cropper the service and the CLI build from a package's config (``PortraitCropper.from_config``)."""
    from inference.portrait import PortraitCropper

    cfg = load_platform_config(None, [f"ingest.{k}={v}" for k, v in ingest.items()])
    return PortraitCropper.from_config(cfg)


@pytest.fixture(scope="module")
def cropper():
    return _cropper()


def _frame(case: Closeup, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    frames, boxes = render_scene(SceneSpec(case.name, case.width, case.height, case.spec().people, seconds=0.04),
                                 seed=seed)
    return frames[0], boxes[0, 0]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_portrait_close_up_is_cropped_on_the_face_with_the_training_rule(case, cropper):
    image, drawn = _frame(case)
    lm = cropper.landmarks(image)
    assert lm is not None
    track = cropper.plan(lm, (case.width, case.height))
    assert track.fill == "reduce" and track.head_cut_ratio == 0.0
    assert (track.margin < MARGIN) == case.reduced, (track.margin, track.note())
    box = track.boxes[0]
    assert box[0] >= 0 and box[1] >= 0 and box[2] <= case.width and box[3] <= case.height
    face_w = float(drawn[2] - drawn[0])
    assert np.linalg.norm((box[:2] + box[2:]) / 2 - (drawn[:2] + drawn[2:]) / 2) < 0.3 * face_w
    norm = landmarks_to_crop(lm[None], box[None])
    assert norm.min() > 0 and norm.max() < 1
    crop = cropper.crop(image, lm)
    assert crop.shape == (cropper.crop_size, cropper.crop_size, 3)


def test_portrait_fill_rule_comes_from_the_config_the_training_data_used(cropper):
    image, _ = _frame(CASES[5])  # square 512, face 0.4: the asked crop reaches above the frame
    lm = cropper.landmarks(image)
    blur = _cropper(crop_fill="blur")
    assert blur.crop_fill == "blur" and cropper.crop_fill == "reduce"
    track = blur.plan(lm, (512, 512))
    assert track.margin == MARGIN and track.fill_area_max > 0 and track.boxes[0, 1] < 0
    reduced = cropper.plan(lm, (512, 512))
    assert reduced.margin < MARGIN and reduced.boxes[0, 1] >= 0
    crops = [c.crop(image, lm) for c in (blur, cropper)]
    assert not np.array_equal(crops[0], crops[1])  # another crop: the asked one with a blurred border
    with pytest.raises(ValueError, match="crop_fill"):
        load_platform_config(None, ["ingest.crop_fill=stretch"])


def test_portrait_with_the_chin_cut_off_is_refused_by_the_service_check(cropper):
    """The service's upload check answers 422 on ``image``; the CLI reports a ``NoFaceError`` as a
    bad ``--image`` (exit 2): a ``HeadCutError`` is one."""
    from inference.portrait import HeadCutError, NoFaceError
    from serve.errors import UploadError
    from serve.validation import check_face

    image, _ = _frame(CHIN_CUT)
    with pytest.raises(HeadCutError, match=r"chin outside") as err:
        cropper.landmarks(image)
    assert isinstance(err.value, NoFaceError)
    with pytest.raises(UploadError) as up:
        check_face(image, cropper.landmarks, "image")
    assert up.value.status == 422 and up.value.field == "image" and "chin outside" in str(up.value)


@pytest.mark.slow
def test_cli_generates_from_a_close_up_selfie(tiny_package, tmp_path):
    """``python -m inference.sample`` with the package's ``ingest`` settings (crop_fill reduce) on a
    close-up selfie (portrait 360x640, face 0.6 of the width: the asked crop does not fit; the old
    rule shrank and shifted it, ingest rejected such videos) makes a video. (The cut-off chin's
    refusal is the ``HeadCutError`` of the test above, a ``NoFaceError`` the CLI reports on
    ``--image``.)"""
    from PIL import Image

    audio = tmp_path / "a.wav"
    subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", str(audio), "synth", "0.3", "sine", "200-700"], check=True)
    image = tmp_path / "selfie.png"
    Image.fromarray(_frame(CASES[3])[0]).save(image)
    out = tmp_path / "selfie.mp4"
    proc = subprocess.run([sys.executable, "-m", "inference.sample", "--image", str(image), "--audio", str(audio),
                           "--out", str(out), "--model", str(tiny_package), "--device", "cpu", "sampler.steps=1"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file() and out.stat().st_size > 0 and "wrote" in proc.stdout


# --- the whole ingest ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def closeup_run(ray_local, tiny_weights, tmp_path_factory):
    from pipelines.ingestion.job import run_ingest

    root = tmp_path_factory.mktemp("closeups")
    inputs, out = root / "inputs", root / "out"
    truth = {}
    for i, case in enumerate((*CASES, CHIN_CUT)):
        path, boxes = write_scene(inputs, case.spec(), seed=i)
        truth[path.name] = boxes[:, 0]
    cfg = PlatformConfig()
    cfg.weights = tiny_weights[0]
    cfg.ingest = IngestConfig(min_frames=40)
    lines: list[str] = []
    summary = run_ingest(inputs, out, cfg, echo=lines.append)
    rows = {Path(r["source"]).name: r for r in pq.read_table(out / "videos.parquet").to_pylist()}
    return out, rows, truth, summary, lines


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_close_up_with_the_head_in_the_frame_is_kept_and_cropped_on_the_face(closeup_run, case):
    out, rows, truth, _, _ = closeup_run
    name = f"{case.name}.mp4"
    r = rows[name]
    assert r["status"] == "ok", (name, r["reason"])
    assert r["num_frames"] == round(SECONDS * 25)
    assert r["head_cut_ratio"] == 0.0 and r["crop_fill"] == "reduce" and r["crop_fill_max"] == 0.0
    if case.reduced:
        assert HEAD_MARGIN - 1e-6 <= r["crop_margin"] < MARGIN and r["crop_adjusted_ratio"] == 1.0
        want = r"crop margin reduced to 0\.\d\d \(asked 0\.6\) in 100% of frames(; .*)?"
        assert re.fullmatch(want, r["note"]), r["note"]
        assert r["note_key"].startswith("crop margin reduced to #")
    else:
        assert r["crop_margin"] == MARGIN and r["crop_adjusted_ratio"] == 0.0 and r["note"] is None
    table = pq.read_table(out / r["frames_file"], columns=["crop_box", "landmarks", "face_found"])
    boxes = np.asarray(table["crop_box"].to_pylist(), np.float32)
    lm = np.asarray(table["landmarks"].to_pylist(), np.float32).reshape(-1, 68, 2)
    found = np.asarray(table["face_found"].to_pylist(), bool)
    assert found.mean() > 0.9
    # every crop inside the frame (reduce: no filled pixel) and holding the whole landmark box
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= case.width).all() and (boxes[:, 3] <= case.height).all()
    assert lm[found].min() > 0.0 and lm[found].max() < 1.0
    # on the face: the crop centre on the drawn face, and one margin for the whole video
    drawn = truth[name]
    face_w = float(np.nanmedian(drawn[:, 2] - drawn[:, 0]))
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    face_c = (drawn[:, :2] + drawn[:, 2:]) / 2
    assert np.abs(centre[:, 0] - face_c[:, 0]).max() < 0.25 * face_w, name
    assert np.median(np.abs(centre[:, 1] - face_c[:, 1])) < 0.35 * face_w, name
    side = boxes[:, 2] - boxes[:, 0]
    ratio = np.median(side) / face_w
    assert abs(ratio - (1 + 2 * r["crop_margin"])) < 0.2, (name, ratio, r["crop_margin"])


@pytest.mark.slow
def test_cut_off_chin_is_rejected_with_what_happened(closeup_run):
    _, rows, _, summary, lines = closeup_run
    r = rows[f"{CHIN_CUT.name}.mp4"]
    assert r["status"] == "rejected" and r["stage"] == "filter"
    assert re.search(r"head cut by the frame edge in \d+% of frames \(chin outside; max_out_of_frame_ratio 10%\)",
                     r["reason"]), r["reason"]
    assert r["head_cut_ratio"] > 0.9 and r["note"] is None
    # the yield report counts both: the rejection by reason, the kept close-ups by note
    assert summary.ok == len(CASES) and summary.rejected == 1
    assert summary.by_reason == {"filter: head cut by the frame edge in #% of frames": 1}
    reduced = sum(c.reduced for c in CASES)
    assert sum(n for k, n in summary.by_note.items() if k.startswith("crop margin reduced to #")) == reduced
    assert sum(1 for line in lines if line.startswith("[ingest]   kept ") and "crop margin reduced" in line) == reduced


def test_full_resolution_crop_stage_fills_with_the_configured_rule(tmp_path):
    """The ingest's decode + crop step (``ChunkCropper``, in ``DecodeStage``'s child) cuts boxes
    that reach outside the frame with ``ingest.crop_fill``; with ``reduce`` such a box is an error
    (plan_crop_track never makes one then)."""
    from pipelines.ingestion.stages import ChunkCropper, decode_source_fields
    from pipelines.media.probe import probe_video

    spec = SceneSpec("fill", 256, 256, (ScenePerson(0.5, 0.5, 0.5),), seconds=0.4)
    path, _ = write_scene(tmp_path, spec)
    probe = probe_video(path)
    pts, source = decode_source_fields(probe)
    n = 10
    boxes = np.tile(np.array([[-64, -64, 192, 192]], np.float32), (n, 1))  # a quarter of each box is outside
    crops = {}
    for fill in ("reflect", "constant"):
        cropper = ChunkCropper(IngestConfig(crop_fill=fill, crop_size=64))
        cropper.open(str(path), n, 256, 256, pts, source, boxes)
        chunk = cropper.next_chunk()
        assert chunk["stop"] == n and chunk["crops"].shape == (n, 64, 64, 3)
        crops[fill] = chunk["crops"]
    assert crops["constant"][:, :15, :15].max() == 0 and crops["reflect"][:, :15, :15].mean() > 30
    np.testing.assert_array_equal(crops["constant"][:, 17:, 17:], crops["reflect"][:, 17:, 17:])
    cropper = ChunkCropper(IngestConfig(crop_fill="reduce", crop_size=64))
    cropper.open(str(path), n, 256, 256, pts, source, boxes)
    with pytest.raises(ValueError, match="outside"):
        cropper.next_chunk()
