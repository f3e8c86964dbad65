"""Face detectors compared on rendered scenes (issue 11) and held-out real photos (issue 23 item
5): recall of the true face, false positives, false tracks and CPU / GPU time per frame, per
detector and detection resolution.

Corpus (pipelines/samples/face_scenes.py, rendered in memory, no encoding): one astronaut face at 5 %,
10 %, 20 %, 40 % and 70 % of the short side, in a 1280x720 landscape and a 1080x1920 portrait
frame, ``FRAMES`` frames each (the head moves); plus a two-person interview (second face 0.55x)
and a face print on a shirt for false positives.

Held-out real faces (:func:`_real_cases`; none of them is the rendered scenes' face): Grace
Hopper's portrait (matplotlib's ``grace_hopper.jpg``, public domain) pasted into a 1280x720 frame
over a real non-face photo (scikit-learn's ``china.jpg``), its face 5, 10, 20, 40 % of the short
side, rolled by +-20 and +40 degrees, darkened (gamma 2.2) and mirrored; the truth box is dlib's 68-point
box on the photo, moved with it. Non-face real frames (false positives): scikit-image's cat,
coffee, rocket, Hubble deep field and scikit-learn's china and flower photos at 1280x720. False tracks
(:func:`_false_tracks`): candidates linked over the frames (``pipelines.faces.tracks.link_tracks``)
on scenes with face-like things that are no face (the astronaut's mission patch on her suit, a face
print on a shirt seen now and then) and on the non-face photos; a track is false when its boxes
match no drawn face in most of its frames; "after the re-score" counts those whose median
calibrated score (the HOG re-score at 100 px) is >= ``ingest.min_face_confidence`` (what the
ingest keeps).

Detectors: dlib HOG (upsample 0 and 1), dlib CNN (MMOD, ``face_recognition_models``), MTCNN
(``pipelines/faces/mtcnn.py``, torch, one CPU thread here; the CUDA rows of :func:`gpu_rows` when
a GPU is present, batch 1 / 8 / 32) and DWPose when ``LOOPY_DWPOSE_DIR`` names a folder with its ONNX files (skipped otherwise, with
the reason in the table). Resolutions: ``480 long side`` (the old fixed ingest setting),
``full`` (display size) and ``scale search`` (what ingest and the portrait do:
face_detect.choose_detection_scale on 3 of the case's frames, then the pass at its scale; the
search's own cost is reported apart).

Recall: share of frames with a candidate whose centre is within 0.5 face widths of the drawn
face centre and whose width is 0.5-2x the drawn width. False positives: candidates on no drawn
face, per frame. ms/frame: wall and CPU (the machine is shared: CPU time is the fairer figure).
The CNN runs on 2 frames per case only (it costs seconds per frame on CPU).
``LOOPY_BENCH_QUICK=1``: 2 frames per case (CNN: 1), HOG upsample 1 and the CNN at the 480 px
setting only. ``LOOPY_BENCH_CNN_ONLY=1``: only the CNN at the searched scale, 1 frame per case.
``LOOPY_BENCH_DETECTORS=hog,mtcnn``: only those (names: hog, hog1, cnn, mtcnn, dwpose).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from core.sections import IngestConfig
from pipelines.faces.detect import (
    DlibCnnDetector,
    DlibDetector,
    DWPoseDetector,
    MtcnnDetector,
    choose_detection_scale,
)
from pipelines.faces.tracks import FaceCandidates, TrackParams, link_tracks
from pipelines.samples.face_scenes import ScenePerson, SceneSpec, render_scene

FRACTIONS = (0.05, 0.10, 0.20, 0.40, 0.70)
SIZES = ((1280, 720), (1080, 1920))


def _cases(frames_per_case: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, frames uint8 [n, H, W, 3], true boxes [n, people, 4]) per case; the subject is
    person 0."""
    cases = []
    seconds = frames_per_case / 25.0
    for w, h in SIZES:
        for frac in FRACTIONS:
            spec = SceneSpec(f"{w}x{h} face {frac:.0%}", w, h, (ScenePerson(0.5, 0.5, frac),), seconds=seconds)
            cases.append((spec.name, *render_scene(spec, seed=int(frac * 100), mouth=np.full(64, 0.4))))
    two = SceneSpec("1280x720 two people", 1280, 720,
                    (ScenePerson(0.3, 0.45, 0.28), ScenePerson(0.75, 0.5, 0.15)), seconds=seconds)
    shirt = SceneSpec("854x480 shirt print", 854, 480,
                      (ScenePerson(0.5, 0.36, 0.24), ScenePerson(0.5, 0.85, 0.26, talking=False)), seconds=seconds)
    for spec in (two, shirt):
        cases.append((spec.name, *render_scene(spec, seed=3, mouth=np.full(64, 0.4))))
    return cases


REAL_SIZE = (1280, 720)


def _photo(name: str) -> np.ndarray:
    """uint8 [h, w, 3] RGB of a photo installed with the project's dependencies."""
    import matplotlib
    from PIL import Image
    from skimage import data

    if name == "hopper":
        return np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB"))
    if name in ("china", "flower"):
        import sklearn.datasets

        return np.asarray(sklearn.datasets.load_sample_image(f"{name}.jpg"))
    img = getattr(data, name)()
    return np.stack([img] * 3, -1) if img.ndim == 2 else img[..., :3]


def _fit_frame(img: np.ndarray, wh: tuple[int, int]) -> np.ndarray:
    """``img`` scaled and centre-cropped to fill w x h."""
    from PIL import Image

    w, h = wh
    s = max(w / img.shape[1], h / img.shape[0])
    big = Image.fromarray(img).resize((int(np.ceil(img.shape[1] * s)), int(np.ceil(img.shape[0] * s))),
                                      Image.Resampling.BILINEAR, reducing_gap=2.0)
    x0, y0 = (big.width - w) // 2, (big.height - h) // 2
    return np.asarray(big.crop((x0, y0, x0 + w, y0 + h)))


def _real_cases(frames_per_case: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, frames uint8 [n, 720, 1280, 3], true boxes [n, 1, 4]): Grace Hopper's portrait
    over the china photo (module docstring), moving 3 px right and 2 px down a frame."""
    from PIL import Image

    photo = _photo("hopper")
    marks, found = DlibDetector(detect_max_side=None).detect(photo[None])
    assert found[0], "dlib finds no face in grace_hopper.jpg"
    marks = marks[0]
    background = _fit_frame(_photo("china"), REAL_SIZE)
    w, h = REAL_SIZE
    variants = [(f"hopper {frac:.0%}", frac, 0.0, 1.0, False) for frac in (0.05, 0.10, 0.20, 0.40)]
    variants += [("hopper 20 % rolled +20 deg", 0.20, 20.0, 1.0, False),
                 ("hopper 20 % rolled -20 deg", 0.20, -20.0, 1.0, False),
                 ("hopper 20 % rolled +40 deg", 0.20, 40.0, 1.0, False),
                 ("hopper 20 % dark (gamma 2.2)", 0.20, 0.0, 2.2, False),
                 ("hopper 20 % mirrored", 0.20, 0.0, 1.0, True)]
    cases = []
    for name, frac, roll, gamma, mirror in variants:
        img, pts = photo, marks.copy()
        if mirror:
            img, pts = img[:, ::-1], np.stack([img.shape[1] - 1 - pts[:, 0], pts[:, 1]], -1)
        if roll:  # about the face centre (PIL rotates counter-clockwise for positive angles)
            c = pts.mean(0)
            img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).rotate(roll, Image.Resampling.BILINEAR,
                                                                               center=tuple(c), fillcolor=(90, 90, 90)))
            a = np.deg2rad(roll)
            rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
            pts = (pts - c) @ rot.T + c
        if gamma != 1.0:
            img = (255 * (img / 255.0) ** gamma).astype(np.uint8)
        face_w = pts[:, 0].max() - pts[:, 0].min()
        s = frac * min(w, h) / face_w
        small = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(
            (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s))), Image.Resampling.BILINEAR,
            reducing_gap=2.0))
        pts = pts * (small.shape[1] / img.shape[1])
        frames, truth = [], []
        for f in range(frames_per_case):
            ox = int(round(0.5 * w - pts[:, 0].mean())) + 3 * f
            oy = int(round(0.45 * h - pts[:, 1].mean())) + 2 * f
            frame = background.copy()
            x0, y0 = max(ox, 0), max(oy, 0)
            x1, y1 = min(ox + small.shape[1], w), min(oy + small.shape[0], h)
            frame[y0:y1, x0:x1] = small[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
            frames.append(frame)
            p = pts + (ox, oy)
            truth.append([[*p.min(0), *p.max(0)]])
        cases.append((name, np.stack(frames), np.asarray(truth, np.float32)))
    return cases


NON_FACE_PHOTOS = ("chelsea", "coffee", "rocket", "hubble_deep_field", "china", "flower")


def _non_face_cases(frames_per_case: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Real photos with no face at 1280x720 (moving 3 px a frame), truth: none."""
    cases = []
    for name in NON_FACE_PHOTOS:
        img = _fit_frame(_photo(name), (REAL_SIZE[0] + 3 * frames_per_case, REAL_SIZE[1]))
        frames = np.stack([img[:, 3 * f:3 * f + REAL_SIZE[0]] for f in range(frames_per_case)])
        cases.append((name, frames, np.full((frames_per_case, 0, 4), np.nan, np.float32)))
    return cases


def _distractor_cases(frames_per_case: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Rendered scenes whose only non-faces are face-like (truth: the real faces only): the
    astronaut down to the chest (her mission patch), and a face print on a shirt seen in every
    other 4-frame block (its truth row is dropped: it is a print)."""
    seconds = frames_per_case / 25.0
    patch = SceneSpec("patch on suit", 360, 640, (ScenePerson(0.5, 0.32, 0.25, body=True, still=True),),
                      seconds=seconds)
    shirt = SceneSpec("shirt print", 854, 480, (ScenePerson(0.5, 0.36, 0.24),
                      ScenePerson(0.5, 0.85, 0.26, talking=False, visible_period=(2, 4))), seconds=seconds)
    cases = []
    for spec, keep in ((patch, 1), (shirt, 1)):
        frames, truth = render_scene(spec, seed=4, mouth=np.full(frames_per_case, 0.4))
        cases.append((spec.name, frames, truth[:, :keep]))
    return cases


def _score(cands, truth: np.ndarray) -> tuple[int, int]:
    """(frames whose subject face was found, candidates on no drawn face)."""
    hits = fps = 0
    for f in range(truth.shape[0]):
        boxes = cands.boxes[cands.frame == f]
        if len(boxes) == 0:
            continue
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        widths = boxes[:, 2] - boxes[:, 0]
        on_face = np.zeros(len(boxes), bool)
        for p, true in enumerate(truth[f]):
            if not np.isfinite(true).all():
                continue
            tw = true[2] - true[0]
            match = (np.linalg.norm(centres - (true[:2] + true[2:]) / 2, axis=1) < 0.5 * tw) & \
                    (widths > 0.5 * tw) & (widths < 2.0 * tw)
            on_face |= match
            if p == 0 and match.any():
                hits += 1
        fps += int((~on_face).sum())
    return hits, fps


def _timed(fn, *args, **kwargs):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - w0, time.process_time() - c0


def _frames_at(frames: np.ndarray, scale: float) -> np.ndarray:
    from PIL import Image

    if abs(scale - 1) < 1e-3:
        return frames
    h, w = frames.shape[1:3]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
                     for f in frames])


def _detect_at(det, frames: np.ndarray, mode: str, cfg: IngestConfig):
    """Candidates of ``frames`` [n, H, W, 3] in their own pixels at ``mode`` ("480 long side",
    "full", "scale search": the ingest's own choice on 3 sample frames) -> (candidates, wall s,
    CPU s, search wall s, search CPU s)."""
    h, w = frames.shape[1:3]
    search_wall = search_cpu = 0.0
    if mode == "480 long side":
        s = min(1.0, 480 / max(w, h))
    elif mode == "full":
        s = 1.0
    else:  # the ingest's own choice (also the portrait's), on 3 sample frames
        def samples(max_side, f=frames, long_side=max(w, h)):  # [3, h', w', 3], long side <= max_side
            return _frames_at(f[:3], 1.0 if max_side is None else min(1.0, max_side / long_side))

        choice, search_wall, search_cpu = _timed(choose_detection_scale, det, samples, (w, h), cfg.detect_face_px,
                                                 cfg.detect_max_pixels, cfg.detect_max_upscale,
                                                 cfg.similar_face_ratio)
        s = choice.scale
    # decode-equivalent: frames shrunk to the scale (the ingest decodes at it), upsampling
    # done by the detector (as in the ingest pass)
    small = _frames_at(frames, min(s, 1.0))
    cands, dw, dc = _timed(det.detect_candidates, small, scale=max(s, 1.0))
    return cands.scaled(w / small.shape[2], h / small.shape[1]), dw, dc, search_wall, search_cpu


def _measure(name: str, det, cases, modes: tuple[str, ...], max_frames: int, cfg: IngestConfig,
             corpus: str = "") -> list[dict]:
    rows = []
    for mode in modes:
        hits = total = fps = 0
        wall = cpu = search_wall = search_cpu = 0.0
        per_case = []
        for case, frames, truth in cases:
            frames, truth = frames[:max_frames], truth[:max_frames]
            cands, dw, dc, sw, sc = _detect_at(det, frames, mode, cfg)
            search_wall, search_cpu = search_wall + sw, search_cpu + sc
            hit, fp = _score(cands, truth)
            hits, total, fps = hits + hit, total + len(frames), fps + fp
            wall, cpu = wall + dw, cpu + dc
            per_case.append(f"{case}: {hit}/{len(frames)}")
        label = f"{name} @ {mode}{corpus}"
        rows.append({"benchmark": "detectors", "metric": f"{label}: recall of the true face",
                     "value": hits / max(total, 1), "unit": "share", "target": "1.0 for 5-80 % faces",
                     "note": "; ".join(c for c in per_case if not c.endswith(f"{max_frames}/{max_frames}")) or
                             f"all {len(cases)} cases found in every frame"})
        rows.append({"benchmark": "detectors", "metric": f"{label}: false positives",
                     "value": fps / max(total, 1), "unit": "per frame", "target": "0", "note": ""})
        rows.append({"benchmark": "detectors", "metric": f"{label}: detect ms/frame",
                     "value": 1000 * wall / max(total, 1), "unit": "ms wall",
                     "target": "", "note": f"{1000 * cpu / max(total, 1):.0f} ms CPU/frame; {total} frames"
                     + (f"; + scale search {1000 * search_cpu / len(cases):.0f} ms CPU per video (3 frames)"
                        if mode == "scale search" else "")})
    return rows


def _on_a_face(boxes: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """bool [k]: each box [k, 4] of one frame matches a true box [p, 4] (centre within 0.5 true
    widths, width 0.5-2x; the recall's rule)."""
    ok = np.zeros(len(boxes), bool)
    centres, widths = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2] - boxes[:, 0]
    for true in truth:
        if np.isfinite(true).all():
            tw = true[2] - true[0]
            ok |= (np.linalg.norm(centres - (true[:2] + true[2:]) / 2, axis=1) < 0.5 * tw) & \
                  (widths > 0.5 * tw) & (widths < 2.0 * tw)
    return ok


def _false_tracks(cands: FaceCandidates, truth: np.ndarray, min_confidence: float) -> tuple[int, int, int]:
    """(false tracks, false tracks seen in >= half the frames, false tracks whose median calibrated
    score passes ``min_confidence``) of ``cands`` linked over the frames; a track is false when
    fewer than half of its boxes are on a true face (truth [n, people, 4])."""
    if len(cands) == 0:
        return 0, 0, 0
    n = truth.shape[0]
    on_face = np.zeros(len(cands), bool)
    for f in range(n):
        rows = np.flatnonzero(cands.frame == f)
        on_face[rows] = _on_a_face(cands.boxes[rows], truth[f])
    false = persistent = kept = 0
    for members in link_tracks(cands.frame, cands.boxes, TrackParams(), cands.scores):
        if on_face[members].mean() >= 0.5:
            continue
        false += 1
        persistent += len(np.unique(cands.frame[members])) >= 0.5 * n
        cal = cands.calibrated[members] if cands.calibrated is not None else np.array([np.nan])
        cal = cal[np.isfinite(cal)]
        kept += (not len(cal)) or float(np.median(cal)) >= min_confidence  # no re-score: kept
    return false, persistent, kept


def _false_track_rows(name: str, det, cases, mode: str, cfg: IngestConfig) -> list[dict]:
    false = persistent = kept = frames_total = 0
    per_case = []
    for case, frames, truth in cases:
        cands = _detect_at(det, frames, mode, cfg)[0]
        fl, pe, ke = _false_tracks(cands, truth, cfg.min_face_confidence)
        false, persistent, kept, frames_total = false + fl, persistent + pe, kept + ke, frames_total + len(frames)
        if fl:
            per_case.append(f"{case}: {fl} ({pe} persistent, {ke} pass the re-score)")
    return [{"benchmark": "detectors", "metric": f"{name} @ {mode}: false tracks",
             "value": false, "unit": f"tracks in {len(cases)} clips",
             "target": "0 after the re-score",
             "note": f"{persistent} persistent, {kept} pass the re-score (>= {cfg.min_face_confidence}); "
                     f"{frames_total} frames; " + ("; ".join(per_case) or "none")}]


def gpu_rows(device: str = "cuda", batch_sizes: tuple[int, ...] = (1, 8, 32), repeats: int = 3) -> list[dict]:
    """MTCNN seconds per frame on ``device`` at each batch size: 32 frames of the 1280x720
    two-person scene (faces 28 % and 15 % of the short side), searched from 20 px faces (scale 1,
    the whole pyramid) and at the pass scale that shows the larger face at 100 px; the cascade
    alone (the GPU part) and the whole ``detect_candidates`` (+ dlib's 68 points and the HOG
    re-score on the CPU). Median of ``repeats`` after one warm-up call."""
    import statistics

    import torch

    spec = SceneSpec("1280x720 two people", 1280, 720, (ScenePerson(0.3, 0.45, 0.28), ScenePerson(0.75, 0.5, 0.15)),
                     seconds=32 / 25)
    frames, _ = render_scene(spec, seed=3, mouth=np.full(32, 0.4))
    det = MtcnnDetector(device=device)
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
    rows = []
    for label, scale in (("scale 1 (faces from 20 px)", 1.0), ("pass scale (larger face at 100 px)", 100 / (0.28 * 720))):
        small = _frames_at(frames, scale)
        for b in batch_sizes:
            det.batch_size = b

            def cascade(d=det, f=small):
                for i in range(0, len(f), d.batch_size):
                    d._mtcnn(f[i:i + d.batch_size], min_face_px=d.PYRAMID_MIN_PX)

            times = {}
            for what, fn in (("cascade", cascade), ("detect_candidates", lambda d=det, f=small: d.detect_candidates(f))):
                fn()  # warm-up (CUDA kernels, allocator)
                walls, cpus = [], []
                for _ in range(repeats):
                    _, wall, cpu = _timed(fn)
                    walls.append(wall)
                    cpus.append(cpu)
                times[what] = (statistics.median(walls) / len(small), statistics.median(cpus) / len(small))
            rows.append({"benchmark": "detectors", "metric": f"MTCNN {device} batch {b} @ {label}: s/frame",
                         "value": times["cascade"][0], "unit": "s wall (cascade)", "target": "",
                         "note": f"{name}; {small.shape[2]}x{small.shape[1]}; cascade CPU {times['cascade'][1]:.4f} s/frame; "
                                 f"detect_candidates (+ dlib 68 points, HOG re-score) {times['detect_candidates'][0]:.4f} s "
                                 f"wall, {times['detect_candidates'][1]:.4f} s CPU per frame"})
    return rows


def run() -> list[dict]:
    import torch

    torch.set_num_threads(1)  # MTCNN on one CPU thread, like dlib: CPU seconds compare like for like
    quick = os.environ.get("LOOPY_BENCH_QUICK") == "1"
    frames = 2 if quick else 6
    track_frames = 8 if quick else 24
    cfg = IngestConfig()
    cases = _cases(frames)
    real = _real_cases(frames)
    non_faces = _non_face_cases(frames)
    distractors = _distractor_cases(track_frames) + _non_face_cases(track_frames)
    chosen = set(os.environ.get("LOOPY_BENCH_DETECTORS", "hog,hog1,cnn,mtcnn,dwpose").split(","))
    rows: list[dict] = []
    all_modes = ("480 long side", "scale search", "full")

    def add(new: list[dict]) -> None:  # printed as measured: a long run keeps what it has
        rows.extend(new)
        for r in new:
            print(f"[bench_detectors] {r['metric']}: {r['value']} {r['unit']} ({r['note']})", flush=True)

    if os.environ.get("LOOPY_BENCH_CNN_ONLY") == "1":  # the CNN at the searched scale, 1 frame a case
        add(_measure("dlib CNN (MMOD)", DlibCnnDetector(), cases, ("scale search",), 1, cfg))
        return rows

    def held_out(name: str, det, mode: str, max_frames: int = frames) -> None:
        """The real-photo rows and the false tracks of ``det`` at ``mode``."""
        add(_measure(name, det, real, (mode,), max_frames, cfg, corpus=" [held-out photos]"))
        add([r for r in _measure(name, det, non_faces, (mode,), max_frames, cfg, corpus=" [non-face photos]")
             if "false positives" in r["metric"]])
        add(_false_track_rows(name, det, distractors, mode, cfg))

    if "hog" in chosen:
        hog = DlibDetector()
        add(_measure("dlib HOG", hog, cases, all_modes, frames, cfg))
        held_out("dlib HOG", hog, "scale search")
    if "hog1" in chosen:
        add(_measure("dlib HOG upsample 1", DlibDetector(upsample=1), cases,
                     all_modes[:1] if quick else (all_modes[0], all_modes[2]), frames, cfg))
    if "mtcnn" in chosen:
        mtcnn = MtcnnDetector()
        add(_measure("MTCNN (CPU)", mtcnn, cases, all_modes, frames, cfg))
        held_out("MTCNN (CPU)", mtcnn, "scale search")
        if torch.cuda.is_available():
            add(gpu_rows("cuda"))
        else:
            add([{"benchmark": "detectors", "metric": "MTCNN CUDA rows", "value": "skipped", "unit": "",
                  "target": "", "note": "no CUDA device (torch.cuda.is_available() is False)"}])
    if "cnn" in chosen:
        # quick: the CNN (seconds per frame on CPU) at the old fixed size only, one frame per case
        add(_measure("dlib CNN (MMOD)", DlibCnnDetector(), cases,
                     all_modes[:1] if quick else all_modes[:2], 1 if quick else 2, cfg))
    dw = os.environ.get("LOOPY_DWPOSE_DIR")
    if "dwpose" not in chosen:
        pass
    elif dw:
        rows += _measure("DWPose", DWPoseDetector(dw), cases, ("full",), frames, cfg)
    else:
        rows.append({"benchmark": "detectors", "metric": "DWPose", "value": "skipped", "unit": "",
                     "target": "", "note": "no weights: set LOOPY_DWPOSE_DIR to a folder with yolox_l.onnx "
                                           "and dw-ll_ucoco_384.onnx (and pip install onnxruntime)"})
    return rows


if __name__ == "__main__":
    from benchmarks.run import print_table

    print_table(run())
