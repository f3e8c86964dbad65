"""Face detectors compared on rendered scenes (issue 11): recall of the true face, false
positives and ms per frame, per detector and detection resolution.

Corpus (pipelines/samples/face_scenes.py, rendered in memory, no encoding): one astronaut face at 5 %,
10 %, 20 %, 40 % and 70 % of the short side, in a 1280x720 landscape and a 1080x1920 portrait
frame, ``FRAMES`` frames each (the head moves); plus a two-person interview (second face 0.55x)
and a face print on a shirt for false positives.

Detectors: dlib HOG (upsample 0 and 1), dlib CNN (MMOD, ``face_recognition_models``) and
DWPose when ``LOOPY_DWPOSE_DIR`` names a folder with its ONNX files (skipped otherwise, with
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
"""
from __future__ import annotations

import os
import time

import numpy as np

from core.sections import IngestConfig
from pipelines.faces.detect import (
    DlibCnnDetector,
    DlibDetector,
    DWPoseDetector,
    choose_detection_scale,
)
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


def _measure(name: str, det, cases, modes: tuple[str, ...], max_frames: int, cfg: IngestConfig) -> list[dict]:
    rows = []
    for mode in modes:
        hits = total = fps = 0
        wall = cpu = search_wall = search_cpu = 0.0
        per_case = []
        for case, frames, truth in cases:
            frames, truth = frames[:max_frames], truth[:max_frames]
            h, w = frames.shape[1:3]
            if mode == "480 long side":
                s = min(1.0, 480 / max(w, h))
            elif mode == "full":
                s = 1.0
            else:  # the ingest's own choice (also the portrait's), on 3 sample frames
                def samples(max_side, f=frames, long_side=max(w, h)):  # [3, h', w', 3], long side <= max_side
                    return _frames_at(f[:3], 1.0 if max_side is None else min(1.0, max_side / long_side))

                choice, sw, sc = _timed(choose_detection_scale, det, samples, (w, h), cfg.detect_face_px,
                                        cfg.detect_max_pixels, cfg.detect_max_upscale, cfg.similar_face_ratio)
                search_wall, search_cpu = search_wall + sw, search_cpu + sc
                s = choice.scale
            # decode-equivalent: frames shrunk to the scale (the ingest decodes at it), upsampling
            # done by the detector (as in the ingest pass)
            small = _frames_at(frames, min(s, 1.0))
            cands, dw, dc = _timed(det.detect_candidates, small, scale=max(s, 1.0))
            cands = cands.scaled(w / small.shape[2], h / small.shape[1])
            hit, fp = _score(cands, truth)
            hits, total, fps = hits + hit, total + len(frames), fps + fp
            wall, cpu = wall + dw, cpu + dc
            per_case.append(f"{case}: {hit}/{len(frames)}")
        rows.append({"benchmark": "detectors", "metric": f"{name} @ {mode}: recall of the true face",
                     "value": hits / max(total, 1), "unit": "share", "target": "1.0 for 5-80 % faces",
                     "note": "; ".join(c for c in per_case if not c.endswith(f"{max_frames}/{max_frames}")) or
                             f"all {len(cases)} cases found in every frame"})
        rows.append({"benchmark": "detectors", "metric": f"{name} @ {mode}: false positives",
                     "value": fps / max(total, 1), "unit": "per frame", "target": "0", "note": ""})
        rows.append({"benchmark": "detectors", "metric": f"{name} @ {mode}: detect ms/frame",
                     "value": 1000 * wall / max(total, 1), "unit": "ms wall",
                     "target": "", "note": f"{1000 * cpu / max(total, 1):.0f} ms CPU/frame; {total} frames"
                     + (f"; + scale search {1000 * search_cpu / len(cases):.0f} ms CPU per video (3 frames)"
                        if mode == "scale search" else "")})
    return rows


def run() -> list[dict]:
    quick = os.environ.get("LOOPY_BENCH_QUICK") == "1"
    frames = 2 if quick else 6
    cfg = IngestConfig()
    cases = _cases(frames)
    rows: list[dict] = []
    all_modes = ("480 long side", "scale search", "full")

    def add(new: list[dict]) -> None:  # printed as measured: a long run keeps what it has
        rows.extend(new)
        for r in new:
            print(f"[bench_detectors] {r['metric']}: {r['value']} {r['unit']} ({r['note']})", flush=True)

    if os.environ.get("LOOPY_BENCH_CNN_ONLY") == "1":  # the CNN at the searched scale, 1 frame a case
        add(_measure("dlib CNN (MMOD)", DlibCnnDetector(), cases, ("scale search",), 1, cfg))
        return rows
    add(_measure("dlib HOG", DlibDetector(), cases, all_modes, frames, cfg))
    add(_measure("dlib HOG upsample 1", DlibDetector(upsample=1), cases,
                 all_modes[:1] if quick else (all_modes[0], all_modes[2]), frames, cfg))
    # quick: the CNN (seconds per frame on CPU) at the old fixed size only, one frame per case
    add(_measure("dlib CNN (MMOD)", DlibCnnDetector(), cases,
                 all_modes[:1] if quick else all_modes[:2], 1 if quick else 2, cfg))
    dw = os.environ.get("LOOPY_DWPOSE_DIR")
    if dw:
        rows += _measure("DWPose", DWPoseDetector(dw), cases, ("full",), frames, cfg)
    else:
        rows.append({"benchmark": "detectors", "metric": "DWPose", "value": "skipped", "unit": "",
                     "target": "", "note": "no weights: set LOOPY_DWPOSE_DIR to a folder with yolox_l.onnx "
                                           "and dw-ll_ucoco_384.onnx (and pip install onnxruntime)"})
    return rows


if __name__ == "__main__":
    from benchmarks.run import print_table

    print_table(run())
