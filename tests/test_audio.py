"""Audio decode, wav2vec2 feature alignment and the audio window (pipelines/audio_*.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.encoders.audio_features import audio_window_indices, audio_windows


def test_audio_window_indices_edge_replication():
    idx = audio_window_indices(np.array([0, 1, 5, 8, 9]), num_frames=10, radius=2)
    assert idx.dtype == np.int64 and idx.shape == (5, 5)
    np.testing.assert_array_equal(idx[0], [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(idx[1], [0, 0, 1, 2, 3])
    np.testing.assert_array_equal(idx[2], [3, 4, 5, 6, 7])
    np.testing.assert_array_equal(idx[3], [6, 7, 8, 9, 9])
    np.testing.assert_array_equal(idx[4], [7, 8, 9, 9, 9])
    # a one-frame video repeats its only frame
    np.testing.assert_array_equal(audio_window_indices(np.array([0]), 1, 3), [[0] * 7])
    with pytest.raises(ValueError, match="lie in"):
        audio_window_indices(np.array([10]), num_frames=10)


def test_audio_windows_replicate_edges_not_zero():
    n, L, D = 6, 3, 4
    feats = (np.arange(n * L * D, dtype=np.float32).reshape(n, L, D) + 1.0)
    win = audio_windows(feats, radius=2)
    assert win.shape == (n, 5, L, D)
    assert (win != 0).all()  # no zero padding anywhere
    np.testing.assert_array_equal(win[0, 0], feats[0])
    np.testing.assert_array_equal(win[0, 1], feats[0])
    np.testing.assert_array_equal(win[0, 2], feats[0])
    np.testing.assert_array_equal(win[0, 4], feats[2])
    np.testing.assert_array_equal(win[3, :, 1], feats[1:6, 1])
    np.testing.assert_array_equal(win[n - 1, 4], feats[n - 1])
    sel = audio_windows(feats, radius=1, frame_indices=np.array([5, 2]))
    assert sel.shape == (2, 3, L, D)
    np.testing.assert_array_equal(sel[0], feats[[4, 5, 5]])
    np.testing.assert_array_equal(sel[1], feats[[1, 2, 3]])
    t = audio_windows(torch.from_numpy(feats), radius=2)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), win)


# ---------------------------------------------------------------------------------------------
# decode_audio
# ---------------------------------------------------------------------------------------------
import subprocess  # noqa: E402

from pipelines.encoders.audio_features import (  # noqa: E402
    AudioFeatureExtractor,
    AudioLengthError,
    feature_positions,
    frame_count_for,
    frame_times,
)
from pipelines.media.audio_decode import (  # noqa: E402
    AudioDecodeError,
    audio_level_dbfs,
    decode_audio,
    is_silent,
)

TONE_HZ = 440.0
DURATION_S = 1.5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", *args], check=True)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    """Stereo test files: left = 0.5 * sin(2 pi 440 t), right = silence (mono mean: 0.25 amplitude)."""
    d = tmp_path_factory.mktemp("media")
    for rate in (44100, 48000, 22050):
        src = f"aevalsrc=0.5*sin(2*PI*{TONE_HZ:g}*t)|0:s={rate}:d={DURATION_S}"
        _ffmpeg("-f", "lavfi", "-i", src, str(d / f"tone{rate}.wav"))
        # an mp4 with a video track and AAC audio, as the raw talking-head videos come
        _ffmpeg("-f", "lavfi", "-i", f"color=c=gray:s=32x32:r=25:d={DURATION_S}", "-f", "lavfi", "-i", src,
                "-c:v", "mpeg4", "-c:a", "aac", "-shortest", str(d / f"tone{rate}.mp4"))
    for ext in ("mkv", "mp3", "flac", "ogg"):
        _ffmpeg("-i", str(d / "tone48000.wav"), str(d / f"tone48000.{ext}"))
    # 6 channels at 8 kHz (tone on channel 0 only): mean downmix -> amplitude 0.5 / 6
    _ffmpeg("-f", "lavfi", "-i", f"aevalsrc=0.5*sin(2*PI*{TONE_HZ:g}*t)|0|0|0|0|0:s=8000:d={DURATION_S}",
            "-c:a", "flac", str(d / "six8k.mkv"))
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=32x32:rate=25:d=1", "-c:v", "mpeg4", str(d / "no_audio.mp4"))
    (d / "zero.mp4").write_bytes(b"")
    (d / "notes.mp4").write_text("this is not a video\n" * 20)
    return d


def _dominant_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec) * sr / len(x))


@pytest.mark.parametrize("name", [f"tone{r}.{e}" for r in (44100, 48000, 22050) for e in ("wav", "mp4")]
                         + [f"tone48000.{e}" for e in ("mkv", "mp3", "flac", "ogg")])
def test_decode_audio_to_16k_mono(media_dir, name):
    track = decode_audio(media_dir / name)
    lossless = name.endswith((".wav", ".flac"))
    assert track.sample_rate == 16000 and track.samples.dtype == np.float32 and track.samples.ndim == 1
    assert track.source_channels == 2
    assert track.source_sample_rate == int(name[4:name.index(".")])
    # length: exact for lossless, within one 25 fps frame (codec priming/padding) for lossy
    tol = 1 if lossless else 640
    assert abs(track.num_samples - DURATION_S * 16000) <= tol, track.num_samples
    assert track.duration_s == pytest.approx(track.num_samples / 16000)
    assert np.abs(track.samples).max() <= 1.0
    # pitch preserved (rate conversion right) and channels averaged (0.25 amplitude sine: -15.05 dBFS)
    assert _dominant_hz(track.samples, 16000) == pytest.approx(TONE_HZ, abs=2.0)
    expected_db = 20 * np.log10(0.25 / np.sqrt(2))
    assert audio_level_dbfs(track.samples) == pytest.approx(expected_db, abs=0.1 if lossless else 1.0)


def test_decode_audio_many_channels_and_trim(media_dir):
    track = decode_audio(media_dir / "six8k.mkv")
    assert (track.source_channels, track.source_sample_rate) == (6, 8000)
    assert track.num_samples == int(DURATION_S * 16000)
    assert audio_level_dbfs(track.samples) == pytest.approx(20 * np.log10(0.5 / 6 / np.sqrt(2)), abs=0.1)
    full = decode_audio(media_dir / "tone48000.wav")
    part = decode_audio(media_dir / "tone48000.wav", start_s=0.5, duration_s=0.5)
    assert part.num_samples == 8000
    np.testing.assert_allclose(part.samples, full.samples[8000:16000], atol=2e-3)
    tail = decode_audio(media_dir / "tone48000.wav", start_s=1.0, duration_s=5.0)  # never padded
    assert tail.num_samples == int(0.5 * 16000)


@pytest.mark.parametrize("name, problem", [
    ("no_audio.mp4", "no audio stream"),
    ("zero.mp4", "empty file"),
    ("notes.mp4", "not a decodable media file"),
    ("missing.wav", "does not exist"),
])
def test_decode_audio_errors_name_the_file(media_dir, name, problem):
    with pytest.raises(AudioDecodeError) as err:
        decode_audio(media_dir / name)
    assert str(media_dir / name) in str(err.value)
    assert problem in str(err.value)


def test_level_and_silence():
    t = np.arange(16000) / 16000
    sine = np.sin(2 * np.pi * 100 * t).astype(np.float32)
    assert audio_level_dbfs(sine) == pytest.approx(-3.01, abs=0.01)
    assert audio_level_dbfs(np.zeros(10, np.float32)) == float("-inf")
    assert is_silent(np.zeros(100, np.float32))
    assert is_silent(1e-4 * sine) and not is_silent(1e-2 * sine)  # -83 dB vs -43 dB at -50 dB threshold


# ---------------------------------------------------------------------------------------------
# frame alignment
# ---------------------------------------------------------------------------------------------
def test_frame_time_mapping():
    np.testing.assert_allclose(frame_times(3, 25.0), [0.02, 0.06, 0.10])
    # base geometry: vector j sits at 0.0125 s + 0.02 s * j; frame k at (k + 0.5) / 25
    pos = feature_positions(4, 25.0, num_vectors=100, sample_rate=16000, hop=320, receptive_field=400)
    np.testing.assert_allclose(pos, [0.375, 2.375, 4.375, 6.375])
    assert feature_positions(2, 25.0, num_vectors=2)[-1] == 1.0  # clamped at the last vector
    # the mapped time of each frame equals its audio time wherever it is not clamped
    pos = feature_positions(50, 30.0, num_vectors=1000)
    np.testing.assert_allclose(0.0125 + 0.02 * pos, frame_times(50, 30.0))
    assert frame_count_for(2.0, 25.0) == 50 and frame_count_for(2.039, 25.0) == 50
    assert frame_count_for(2.04, 25.0) == 51 and frame_count_for(0.0, 25.0) == 0


@pytest.fixture(scope="module")
def extractor(tiny_weights):
    return AudioFeatureExtractor(tiny_weights[1].wav2vec2)


def test_extractor_geometry(extractor):
    assert (extractor.num_layers, extractor.dim) == (2, 32)
    assert (extractor.hop_samples, extractor.receptive_field_samples, extractor.sample_rate) == (320, 400, 16000)
    assert extractor.num_vectors(16000) == 49


@pytest.mark.parametrize("windowed", [False, True])
def test_clicks_land_on_their_frames(tiny_weights, extractor, windowed):
    """A click heard during frame k changes that frame's features far more than any other's."""
    ex = AudioFeatureExtractor(tiny_weights[1].wav2vec2, window_s=1.6, context_s=0.4) if windowed else extractor
    fps, n = 25.0, 100
    rng = np.random.default_rng(0)
    base = (0.1 * rng.standard_normal(int(n / fps * 16000))).astype(np.float32)
    ref = ex(base, n, fps)
    # windowed: 0.8 s centres, so frame 20 (0.80-0.84 s) straddles the first window seam at 0.81 s
    clicks = [(20, 0.3), (62, 0.75), (96, 0.25)] if windowed else [
        (3, 0.5), (10, 0.2), (25, 0.8), (47, 0.5), (62, 0.75), (96, 0.25)]
    for k, frac in clicks:
        t = (k + frac) / fps
        y = base.copy()
        i = int(round(t * 16000))
        y[i:i + 8] += 0.5
        change = ((ex(y, n, fps) - ref) ** 2).sum(axis=(1, 2))
        assert int(np.argmax(change)) == k, (t, np.argmax(change))
        others = np.delete(change, k)
        assert others.max() < 0.2 * change[k]


@pytest.mark.parametrize("num_frames", [1, 7, 50, 51, 74])
def test_feature_shapes_exact_frame_count(extractor, num_frames):
    rng = np.random.default_rng(1)
    samples = (0.1 * rng.standard_normal(int(np.ceil(num_frames / 25 * 16000)))).astype(np.float32)
    feats = extractor(samples, num_frames, 25.0)
    assert feats.shape == (num_frames, 2, 32) and feats.dtype == np.float32
    assert np.isfinite(feats).all()
    assert not np.allclose(feats[:, 0], feats[:, 1])  # two different layers are kept


def test_audio_too_short_raises(extractor):
    samples = np.zeros(int(1.9 * 16000), np.float32)
    with pytest.raises(AudioLengthError, match=r"1\.900 s.*2\.000 s \(50 frames"):
        extractor(samples, 50, 25.0)
    # shorter by less than one frame is accepted (last vector repeated)
    assert extractor(np.full(int(1.97 * 16000), 0.1, np.float32), 50, 25.0).shape[0] == 50
    with pytest.raises(AudioLengthError, match="receptive field"):
        extractor(np.zeros(300, np.float32), 1, 100.0)


def test_windowed_equals_whole_utterance(tiny_weights, extractor):
    """Windows of 3 s (1 s context each side) reproduce the whole-utterance features, and the model
    never sees more than one window (memory flat in audio length)."""
    rng = np.random.default_rng(2)
    n = 300  # 12 s at 25 fps
    samples = (0.1 * rng.standard_normal(n * 640)).astype(np.float32)
    whole = extractor(samples, n)
    win = AudioFeatureExtractor(tiny_weights[1].wav2vec2, window_s=3.0, context_s=1.0)
    spans = []
    real_run = win._run
    win._run = lambda values: (spans.append(len(values)), real_run(values))[1]
    windowed = win(samples, n)
    assert len(spans) >= 4 and max(spans) <= 3.0 * 16000 + 400
    plan = win.window_plan(win.num_vectors(len(samples)))
    assert plan[0][2] == 0 and plan[-1][3] == win.num_vectors(len(samples))
    assert all(a[3] == b[2] for a, b in zip(plan, plan[1:]))  # centres tile the sequence
    err = np.abs(windowed - whole)
    assert err.mean() < 0.03 * np.abs(whole).mean()
    assert err.max() < 0.25 * np.abs(whole).max()
    # per-utterance normalisation: a louder copy gives the same features (not per-snippet stats)
    np.testing.assert_allclose(extractor(3.0 * samples, n), whole, atol=1e-3)
