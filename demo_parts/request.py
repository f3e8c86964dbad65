"""The demo's request and its video's scores: a portrait of a test-split person (a face no
training video shows), a sentence no sample video says (espeak-ng), and what the generated video
scores against them (lip sync to its audio, whose face it shows)."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Optional, Sequence

from demo_parts.plan import videos_under
from demo_parts.runner import StepError
from inference.portrait import load_image
from pipelines.faces.detect import make_detector
from pipelines.media.video_decode import iter_frames
from pipelines.metrics.identity import FaceDescriber, mean_distance, video_identity
from pipelines.metrics.video_metrics import score_video
from pipelines.samples.talking_heads import SampleDataError, synthesize_speech

#: What the demo's voice says: a sentence that is in no sample video (tests/test_demo.py checks it).
DEMO_SENTENCE = "Bright yellow kites were dancing above the harbour while the children laughed."


def pick_request_video(samples: Path) -> Path:
    """The sample video the request's portrait is taken from (the first in name order under
    ``samples``: the demo passes the test-split folder)."""
    videos = videos_under(samples)
    if not videos:
        raise StepError("generate", f"no sample video found under {samples}")
    return videos[0]


def make_request_inputs(video: Path, out_dir: Path, audio_seconds: float,
                        sentence: Optional[str] = None) -> tuple[Path, Path]:
    """A portrait (first frame of ``video``, PNG) and ``audio_seconds`` of speech (16 kHz mono
    WAV): the video's own audio (ffmpeg), or with ``sentence`` that sentence spoken by espeak-ng
    (:func:`pipelines.samples.talking_heads.synthesize_speech`, fixed voice: seed 0)."""
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    image, audio = out_dir / "portrait.png", out_dir / "speech.wav"
    first_frame(video, image, "generate")
    if sentence is None:
        result = subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(video), "-vn", "-ac", "1", "-ar", "16000",
                                 "-t", f"{audio_seconds:g}", str(audio)], capture_output=True, text=True)
        if result.returncode != 0:
            raise StepError("generate", f"ffmpeg could not cut the request from {video}: {result.stderr.strip()}")
    if sentence is not None:
        spoken = out_dir / "speech.espeak.wav"
        try:
            synthesize_speech(sentence, spoken, audio_seconds, np.random.default_rng(0))
        except SampleDataError as exc:
            raise StepError("generate", f"espeak-ng could not speak the demo sentence: {exc}") from exc
        result = subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(spoken), "-ac", "1", "-ar", "16000",
                                 str(audio)], capture_output=True, text=True)
        spoken.unlink(missing_ok=True)
        if result.returncode != 0:
            raise StepError("generate", f"ffmpeg could not resample the demo speech: {result.stderr.strip()}")
    return image, audio


def score_demo_video(video: Path, audio: Path, portrait: Path, other_portraits: Sequence[Path] = (),
                     fps: float = 25.0) -> dict[str, float]:
    """The generated video's own metrics against its request audio (no real frames exist for a
    new sentence): ``face_found_ratio``, ``sync``, ``sync_control``, ``glo``, ``exp`` of
    :func:`pipelines.metrics.video_metrics.score_video` with dlib on frames upscaled to >= 256 px;
    ``identity`` (dlib descriptor distance to the request ``portrait``), ``identity_control`` (mean
    distance to ``other_portraits``: the other test people) and ``identity_nearest`` (1.0 when the
    request portrait is the nearest of them all)."""
    import numpy as np
    import soundfile as sf

    frames = np.concatenate([c.frames for c in iter_frames(video, fps=fps)])
    samples, rate = sf.read(str(audio), dtype="float32", always_2d=True)
    out = score_video(frames, None, samples.mean(axis=1), rate, fps, make_detector("dlib"))
    describer = FaceDescriber()
    own = video_identity(describer, frames, None, load_image(portrait))
    out.update(own.metrics)
    others = [mean_distance(own.generated, describer.describe(load_image(p)[None])[0][0]) for p in other_portraits]
    others = [d for d in others if np.isfinite(d)]
    if others:
        out["identity_control"] = float(np.mean(others))
        out["identity_nearest"] = float(out["identity"] < min(others))
    return out


def first_frames(samples: Path, out_dir: Path) -> list[Path]:
    """The first frame (PNG) of every test-split video under ``samples``, name order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for video in videos_under(samples):
        images.append(first_frame(video, out_dir / f"{video.stem}.png", "score"))
    return images


def first_frame(video: Path, image: Path, step: str) -> Path:
    """The first frame of ``video`` written to ``image`` (PNG, by ffmpeg); a failure is a
    :class:`StepError` of ``step`` naming the video."""
    result = subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(video), "-frames:v", "1", str(image)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise StepError(step, f"ffmpeg could not read the first frame of {video}: {result.stderr.strip()}")
    return image
