"""The demo's request audio holds the whole demo sentence (issue 12: a voice cut mid-sentence and
a correlation over too few frames made the demo's sync score a weak measurement)."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from demo_parts.plan import DemoSettings
from demo_parts.request import DEMO_SENTENCE, make_request_inputs

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None,
                                reason="needs espeak-ng and ffmpeg (make sysdeps)")

SILENT = 0.01  # |sample| below this is silence (espeak-ng speech peaks near 0.5-1.0)


def _last_voiced_s(samples: np.ndarray, rate: int) -> float:
    voiced = np.nonzero(np.abs(samples) > SILENT)[0]
    return float(voiced[-1]) / rate if len(voiced) else 0.0


def _request(tmp_path, seconds: float):
    import soundfile

    video = tmp_path / "portrait.mp4"
    if not video.is_file():
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=25:duration=1",
                        "-c:v", "libx264", "-pix_fmt", "yuv420p", str(video)], check=True)
    _, audio = make_request_inputs(video, tmp_path / f"req_{seconds:g}", seconds, DEMO_SENTENCE)
    samples, rate = soundfile.read(str(audio), dtype="float32")
    return samples, rate


def test_demo_audio_holds_the_whole_sentence_and_enough_frames(tmp_path):
    settings = DemoSettings()
    full, rate = _request(tmp_path, 10.0)  # long enough for any voice: where the sentence ends
    spoken_until = _last_voiced_s(full, rate)
    assert spoken_until > 3.0  # the old 3 s request cut the voice mid-sentence
    samples, rate = _request(tmp_path, settings.audio_seconds)
    assert len(samples) / rate == pytest.approx(settings.audio_seconds, abs=0.01)
    assert _last_voiced_s(samples, rate) == pytest.approx(spoken_until, abs=0.02)  # nothing cut off
    assert settings.audio_seconds - spoken_until >= 0.5  # margin: another voice speed still fits
    assert settings.audio_seconds * 25 >= 100  # frames the sync correlation is computed over
