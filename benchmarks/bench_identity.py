"""Does a long generation keep its person? Identity over a 60 s video of the demo's model.

The demo's stage-2 model (``LOOPY_BENCH_IDENTITY_MODEL``, default ``models:/loopy@stage2`` in the
default MLflow store, the demo's) animates, for the demo under ``LOOPY_BENCH_IDENTITY_WORK``
(default ``work``), the first
frame of the first test-split sample video (``WORK/samples/heldout``) with
``LOOPY_BENCH_IDENTITY_SECONDS`` (default 60) of speech: the demo sentences spoken by espeak-ng
one after the other. dlib's face descriptor distance to the portrait
(:mod:`pipelines.metrics.identity`) is measured over the first and the last 10 s.

Target (issue 22): the last 10 s within 0.05 of the first 10 s (no drift of the person), both
<= 0.6. Not in the test suite: on 2 CPU cores a 60 s video takes several minutes to generate.
Run it after ``make demo``: ``python -m benchmarks.run identity``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

WINDOW_S = 10.0
TARGET_DRIFT = 0.05
TARGET_IDENTITY = 0.6


def long_speech(path: Path, seconds: float) -> Path:
    """``seconds`` of speech (16 kHz mono WAV): the sample sentences spoken one after another."""
    import soundfile as sf

    from pipelines.samples.talking_heads import SENTENCES, synthesize_speech

    parts, rate, total = [], 16000, 0.0
    with tempfile.TemporaryDirectory(prefix="loopy_bench_identity_") as tmp:
        k = 0
        while total < seconds:
            audio, rate = synthesize_speech(SENTENCES[k % len(SENTENCES)], Path(tmp) / f"s{k}.wav", 6.0,
                                            np.random.default_rng(k))
            parts.append(audio)
            total += len(audio) / rate
            k += 1
    audio = np.concatenate(parts)[: int(seconds * rate)]
    sf.write(str(path), audio, rate, subtype="PCM_16")
    return path


def run() -> list[dict]:
    from core.config import load_platform_config
    from core.paths import resolve_tracking_uri
    from demo import DemoPaths, first_frames
    from inference.portrait import load_image as read_image
    from inference.sampler import LoopySampler
    from pipelines.media.video_decode import iter_frames
    from pipelines.metrics.identity import FaceDescriber, video_identity

    work = Path(os.environ.get("LOOPY_BENCH_IDENTITY_WORK", "work")).resolve()
    seconds = float(os.environ.get("LOOPY_BENCH_IDENTITY_SECONDS", 60))
    model = os.environ.get("LOOPY_BENCH_IDENTITY_MODEL", "models:/loopy@stage2")
    paths = DemoPaths(work)
    if not paths.test_samples.is_dir():
        return [{"benchmark": "identity", "metric": "skipped", "value": "", "unit": "", "target": "",
                 "note": f"no demo under {work} (run make demo first)"}]
    out = work / "bench_identity"
    out.mkdir(parents=True, exist_ok=True)
    portrait = first_frames(paths.test_samples, out / "portraits")[0]
    audio = long_speech(out / "speech.wav", seconds)
    tracking_uri = resolve_tracking_uri(load_platform_config(None, []).tracking.tracking_uri)  # the demo's store
    sampler = LoopySampler.from_package(model, device="cpu", tracking_uri=tracking_uri)
    result = sampler.generate(str(portrait), audio, out / "long.mp4")
    fps = result.fps
    frames = np.concatenate([c.frames for c in iter_frames(result.path, fps=fps)])
    describer, reference = FaceDescriber(), read_image(portrait)
    window = int(WINDOW_S * fps)
    first = video_identity(describer, frames[:window], None, reference).metrics["identity"]
    last = video_identity(describer, frames[-window:], None, reference).metrics["identity"]
    note = f"{model}, {len(frames)} frames ({len(frames) / fps:.0f} s), generated in {result.compute_s:.0f} s"
    return [
        {"benchmark": "identity", "metric": "identity, first 10 s", "value": first, "unit": "distance",
         "target": f"<= {TARGET_IDENTITY}", "note": note},
        {"benchmark": "identity", "metric": "identity, last 10 s", "value": last, "unit": "distance",
         "target": f"<= {TARGET_IDENTITY}", "note": ""},
        {"benchmark": "identity", "metric": "drift (last - first)", "value": last - first, "unit": "distance",
         "target": f"<= {TARGET_DRIFT}", "note": ""},
    ]


if __name__ == "__main__":
    from benchmarks.run import print_table

    print_table(run())
