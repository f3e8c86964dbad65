"""Timestamp resampling to 25 fps, streaming decode (decord and PyAV), rotation, errors.

Test videos are tiny (32x16) and lossless; every source frame carries its own index in the grey
levels of its two halves, so a test reads back which source frame each output frame took and
checks it against the timestamp rule computed independently (exact fractions)."""
from __future__ import annotations

import math
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from pipelines.media.probe import ProbeError, probe_video
from pipelines.media.video_decode import (
    DecodeError,
    iter_frames,
    num_output_frames,
    plan_resample,
    resample_indices,
)

W, H = 32, 16


def write_indexed_video(path: Path, pts_s: list[Fraction], last_duration: Fraction,
                        size: tuple[int, int] = (W, H), pattern: bool = False) -> Path:
    """Lossless H.264 mp4 whose frame i shows i in its grey levels, at the given pts."""
    import av

    tb = Fraction(1, 90000)
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=Fraction(1) / last_duration)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv444p"
    stream.codec_context.time_base = tb
    stream.time_base = tb
    stream.options = {"qp": "0", "preset": "ultrafast"}
    for i, t in enumerate(pts_s):
        img = np.zeros((size[1], size[0], 3), np.uint8)
        img[:, : size[0] // 2] = (i % 16) * 16 + 8
        img[:, size[0] // 2:] = (i // 16) * 16 + 8
        if pattern:  # asymmetric marker for rotation checks: white top-left block
            img[: size[1] // 4, : size[0] // 4] = 255
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts = int(t / tb)
        frame.time_base = tb
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def read_indices(frames: np.ndarray) -> np.ndarray:
    half = frames.shape[2] // 2
    lo = np.round((frames[:, :, :half].astype(np.float64).mean(axis=(1, 2, 3)) - 8) / 16)
    hi = np.round((frames[:, :, half:].astype(np.float64).mean(axis=(1, 2, 3)) - 8) / 16)
    return (lo + 16 * hi).astype(np.int64)


def expected_indices(pts: list[Fraction], duration: Fraction, fps: int = 25) -> list[int]:
    """The rule, by brute force in exact arithmetic: latest source frame with pts <= k / fps."""
    n_out = math.floor(duration * fps)
    out = []
    for k in range(n_out):
        t = Fraction(k, fps)
        out.append(max([j for j, p in enumerate(pts) if p <= t] or [0]))
    return out


def decode_all(path: Path, backend: str, chunk_frames: int = 7, **kw):
    chunks = list(iter_frames(path, fps=25.0, chunk_frames=chunk_frames, backend=backend, **kw))
    starts = [c.start_index for c in chunks]
    assert starts == list(range(0, sum(len(c) for c in chunks), chunk_frames))[: len(starts)]
    assert all(len(c) <= chunk_frames for c in chunks)
    frames = np.concatenate([c.frames for c in chunks])
    assert frames.dtype == np.uint8
    return (frames, np.concatenate([c.times_s for c in chunks]),
            np.concatenate([c.source_times_s for c in chunks]))


# ---------------------------------------------------------------- the pure rule
def test_resample_indices_rule():
    # 30 fps -> 25 fps: output k takes floor(k * 30 / 25); 1 s of 30 fps -> 25 frames
    pts = np.arange(30) / 30.0
    idx = resample_indices(pts, 25.0, 1.0)
    assert idx.tolist() == [math.floor(Fraction(k * 30, 25)) for k in range(25)]
    assert idx.tolist()[:7] == [0, 1, 2, 3, 4, 6, 7]  # integer skipping would give 0..6
    # 25 fps is the identity, 60 fps takes every 2.4th frame
    assert resample_indices(np.arange(50) / 25.0, 25.0, 2.0).tolist() == list(range(50))
    assert resample_indices(np.arange(120) / 60.0, 25.0, 2.0)[:6].tolist() == [0, 2, 4, 7, 9, 12]
    # 29.97: output frame 25 (t = 1 s) is source frame 29 (29 * 1.001 / 30 = 0.9677 s <= 1 s)
    p2997 = np.arange(60) * 1001 / 30000.0
    assert resample_indices(p2997, 25.0, 60 * 1001 / 30000.0)[25] == 29
    # count = floor(duration * 25), from the duration, not from the number of source frames
    assert len(resample_indices(np.arange(10) / 10.0, 25.0, 1.0)) == 25
    assert len(resample_indices(pts, 25.0, 1.039)) == 25
    assert num_output_frames(7.007, 25.0) == 175
    # variable rate by hand: pts 0, 0.1, 0.11, 0.3 ; outputs at 0, .04, .08, .12, .16, .2, .24, .28, .32
    vfr = np.array([0.0, 0.1, 0.11, 0.3])
    assert resample_indices(vfr, 25.0, 0.35).tolist() == [0, 0, 0, 2, 2, 2, 2, 2]
    # a first frame later than 0 is used for the times before it
    assert resample_indices(np.array([0.05, 0.09]), 25.0, 0.16).tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError):
        resample_indices(np.array([0.0, 0.2, 0.1]), 25.0, 0.3)


# ---------------------------------------------------------------- real files, both backends
RATES = {"25": Fraction(25), "29.97": Fraction(30000, 1001), "30": Fraction(30),
         "50": Fraction(50), "60": Fraction(60)}


@pytest.fixture(scope="module")
def cfr_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfr")
    out = {}
    for name, rate in RATES.items():
        n = int(round(1.6 * rate))
        pts = [Fraction(i) / rate for i in range(n)]
        out[name] = (write_indexed_video(root / f"r{name}.mp4", pts, 1 / rate), pts, n / rate)
    return out


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("rate", list(RATES))
def test_cfr_frames_follow_timestamps(cfr_videos, rate, backend):
    path, pts, duration = cfr_videos[rate]
    frames, times, source_times = decode_all(path, backend)
    want = expected_indices(pts, duration)
    assert len(frames) == len(want) == math.floor(duration * 25)
    assert read_indices(frames).tolist() == want
    np.testing.assert_allclose(times, np.arange(len(want)) / 25.0)
    np.testing.assert_allclose(source_times, [float(pts[j]) for j in want], atol=1e-6)
    assert np.all(source_times <= times + 1e-4)


@pytest.fixture(scope="module")
def vfr_video(tmp_path_factory):
    rng = np.random.default_rng(3)
    steps = rng.choice([Fraction(1, 60), Fraction(1, 30), Fraction(1, 12), Fraction(1, 24)], size=45)
    pts = [Fraction(0)]
    for s in steps[:-1]:
        pts.append(pts[-1] + s)
    last = Fraction(1, 30)
    path = write_indexed_video(tmp_path_factory.mktemp("vfr") / "vfr.mp4", pts, last)
    return path, pts, pts[-1] + last


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_vfr_frames_follow_timestamps(vfr_video, backend):
    path, pts, duration = vfr_video
    assert probe_video(path).is_variable_frame_rate
    frames, times, source_times = decode_all(path, backend, chunk_frames=10)
    want = expected_indices(pts, duration)
    assert len(frames) == math.floor(duration * 25)
    assert read_indices(frames).tolist() == want


def test_plan_matches_decode_and_max_side(cfr_videos):
    path, pts, duration = cfr_videos["30"]
    plan = plan_resample(path, 25.0)
    assert plan.num_frames == math.floor(duration * 25)
    frames, _, _ = decode_all(path, "auto", plan=plan)
    assert read_indices(frames).tolist() == plan.source_indices.tolist()
    small = next(iter_frames(path, chunk_frames=5, max_side=16))
    assert small.frames.shape == (5, 8, 16, 3)


def test_pyav_failure_mid_video_continues_with_decord(cfr_videos, monkeypatch):
    from pipelines.media import video_decode

    path, pts, duration = cfr_videos["60"]
    real = video_decode._iter_pyav
    seen = {"chunks": 0}

    def failing_after_two_chunks(*args, **kwargs):
        for chunk in real(*args, **kwargs):
            if seen["chunks"] == 2:
                raise video_decode._BackendFailure("simulated decoder failure")
            seen["chunks"] += 1
            yield chunk

    monkeypatch.setattr(video_decode, "_iter_pyav", failing_after_two_chunks)
    frames, _, _ = decode_all(path, "auto", chunk_frames=6)
    assert seen["chunks"] == 2  # PyAV gave up at the third chunk, decord did the rest
    assert read_indices(frames).tolist() == expected_indices(pts, duration)
    seen["chunks"] = 0
    with pytest.raises(DecodeError, match=r"r60.mp4: cannot decode output frame 12"):
        list(iter_frames(path, chunk_frames=6, backend="pyav"))


def test_rotation_metadata_is_honoured(tmp_path):
    rate = Fraction(25)
    pts = [Fraction(i) / rate for i in range(20)]
    plain = write_indexed_video(tmp_path / "plain.mp4", pts, 1 / rate, size=(32, 16), pattern=True)
    rotated = tmp_path / "rot90.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(plain), "-c", "copy",
                    "-metadata:s:v:0", "rotate=90", str(rotated)], check=True)
    info = probe_video(rotated)
    assert (info.rotation, info.width, info.height) == (90, 16, 32)
    frames, _, _ = decode_all(rotated, "auto")
    assert frames.shape == (20, 32, 16, 3)
    # ground truth: ffmpeg's own display-orientation decode (autorotate)
    raw = subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(rotated), "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
    truth = np.frombuffer(raw, np.uint8).reshape(-1, 32, 16, 3)
    assert np.abs(frames.astype(int) - truth.astype(int)).max() <= 3
    # the white marker (top-left in storage) is bottom-left once turned 90 degrees counter-clockwise
    assert frames[0, -4:, :4].mean() > 240 and frames[0, :4, :4].mean() < 200
    with pytest.raises(DecodeError, match="rotation"):
        list(iter_frames(rotated, backend="decord"))


def test_decode_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n" * 10)
    for bad in (empty, text):
        with pytest.raises(DecodeError, match=bad.name):
            list(iter_frames(bad))
        with pytest.raises(ProbeError, match=bad.name):
            probe_video(bad)
    with pytest.raises(ValueError):
        list(iter_frames(empty, chunk_frames=0))
    audio_only = tmp_path / "speech.m4a"
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=0.5", "-c:a", "aac", str(audio_only)], check=True)
    with pytest.raises(ProbeError, match="speech.m4a: no video stream"):
        probe_video(audio_only)
    with pytest.raises(DecodeError, match="speech.m4a: no video stream"):
        list(iter_frames(audio_only))
    with pytest.raises(ProbeError, match="does not exist"):
        probe_video(tmp_path / "missing.mp4")
