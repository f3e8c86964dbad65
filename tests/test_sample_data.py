"""Sample data: the fps / sample-rate mix (checked with the probe), VFR timestamps, bad inputs,
determinism, and mouth motion that follows the speech."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.media.probe import ProbeError, probe_video
from pipelines.samples.talking_heads import (
    SAMPLE_SPECS,
    generate_samples,
    loudness_envelope,
    make_vfr_video,
)

SECONDS = 2.0


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    """The CLI, as ``make sample-data`` runs it (short videos), with the bad inputs."""
    out = tmp_path_factory.mktemp("samples")
    proc = subprocess.run([sys.executable, "-m", "pipelines.samples.talking_heads", "--output", str(out),
                           "--seconds", str(SECONDS), "--with-bad"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    listed = [Path(p) for p in proc.stdout.split()]
    assert all(p.is_file() for p in listed) and len(listed) == len(SAMPLE_SPECS) + 6
    return out


def test_sample_mix_of_frame_rates_and_sample_rates(sample_dir):
    probes = {s.name: probe_video(sample_dir / f"{s.name}.mp4") for s in SAMPLE_SPECS}
    fps = sorted(round(p.fps, 2) for p in probes.values() if not p.is_variable_frame_rate)
    assert {25.0, 29.97, 30.0, 60.0} <= set(fps)
    assert {p.audio_sample_rate for p in probes.values()} == {16000, 22050, 44100, 48000}
    assert any(p.audio_channels == 2 for p in probes.values())
    assert sum(p.is_variable_frame_rate for p in probes.values()) == 1
    for spec in SAMPLE_SPECS:
        p = probes[spec.name]
        assert p.has_audio and p.codec == "h264"
        assert abs(p.duration_s - SECONDS) < 0.02, (spec.name, p.duration_s)
        assert (p.width, p.height, p.rotation) == (spec.width, spec.height, spec.rotation)
        assert p.audio_sample_rate == spec.sample_rate and p.audio_channels == spec.channels
        assert abs(p.audio_duration_s - SECONDS) < 0.1
    rotated = probes["talk_30fps_16k_rot90"]
    assert (rotated.coded_width, rotated.coded_height) == (640, 360)


def test_default_length_covers_a_training_window():
    import inspect

    default = inspect.signature(generate_samples).parameters["seconds"].default
    assert int(default * 25) >= 136  # 12 clip + 124 motion frames at 25 fps


def test_bad_inputs(sample_dir):
    for name, problem in [("bad_empty", "empty file"), ("bad_not_video", "not a readable media file"),
                          ("bad_truncated", "not a readable media file")]:
        with pytest.raises(ProbeError, match=problem) as err:
            probe_video(sample_dir / f"{name}.mp4")
        assert f"{name}.mp4" in str(err.value)
    assert not probe_video(sample_dir / "bad_no_audio.mp4").has_audio
    short = probe_video(sample_dir / "bad_too_short.mp4")
    assert short.has_audio and short.duration_s * 25 < 136
    no_face = probe_video(sample_dir / "bad_no_face.mp4")
    assert no_face.has_audio and no_face.duration_s * 25 >= 136


def test_vfr_video_has_irregular_timestamps(tmp_path):
    path = make_vfr_video(tmp_path / "vfr.mp4", seconds=1.5)
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "packet=pts_time", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, check=True).stdout
    pts = np.sort(np.array([float(x) for x in out.split() if x.strip()]))
    gaps = np.round(np.diff(pts) * 60).astype(int)  # in 1/60 s
    assert set(gaps.tolist()) == {1, 2, 4}  # 60, 30 and 15 fps stretches
    assert probe_video(path).is_variable_frame_rate


def test_generation_is_deterministic_by_seed(tmp_path):
    spec = [s for s in SAMPLE_SPECS if s.name == "talk_60fps_48k_stereo"]
    a = generate_samples(tmp_path / "a", seconds=1.0, seed=7, specs=spec)[0].read_bytes()
    b = generate_samples(tmp_path / "b", seconds=1.0, seed=7, specs=spec)[0].read_bytes()
    c = generate_samples(tmp_path / "c", seconds=1.0, seed=8, specs=spec)[0].read_bytes()
    assert a == b and a != c


def test_loudness_envelope():
    sr = 16000
    t = np.arange(sr) / sr
    audio = np.where(t >= 0.5, 0.5 * np.sin(2 * np.pi * 220 * t), 0.0).astype(np.float32)
    env = loudness_envelope(audio, sr, np.array([0.1, 0.3, 0.7, 0.9]))
    assert env[0] == 0.0 and env[1] == 0.0 and env[2] > 0.9 and env[3] > 0.9


def test_mouth_opens_with_the_speech(sample_dir):
    """Dark mouth-interior pixels per 25 fps frame correlate with the decoded audio's loudness."""
    import av

    from pipelines.media.video_decode import iter_frames

    path = sample_dir / "talk_25fps_16k.mp4"  # mono
    frames = np.concatenate([c.frames for c in iter_frames(path)]).astype(np.int16)
    r, g, b = frames[..., 0], frames[..., 1], frames[..., 2]
    mouth = ((r > 40) & (r < 120) & (g < 50) & (b < 60) & (r - g > 30)).sum(axis=(1, 2))
    with av.open(str(path)) as container:
        sr = container.streams.audio[0].rate
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    hop = sr / 25
    rms = np.array([np.sqrt(np.mean(audio[int(k * hop):int((k + 1) * hop)] ** 2)) for k in range(len(frames))])
    assert np.corrcoef(mouth, rms)[0, 1] > 0.5
