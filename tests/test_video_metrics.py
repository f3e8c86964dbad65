"""Metrics of pipelines/metrics/video_metrics.py on constructed inputs and on a real sample video (issue 12)."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.faces.landmarks import MOUTH
from pipelines.faces.mouth_sync import remove_trend as remove_trend
from pipelines.faces.motion_stats import clip_motion_stats
from pipelines.metrics import video_metrics as vm

FPS = 25.0


# ------------------------------------------------------------------------------- constructed inputs
def _face(width: float = 100.0, gap: float = 0.0, centre=(50.0, 60.0)) -> np.ndarray:
    """A [68, 2] landmark set: jaw points 0 and 16 ``width`` apart, inner lips ``gap`` apart."""
    rng = np.random.default_rng(0)
    lm = rng.uniform(-0.3, 0.3, size=(68, 2)) * width
    lm[0] = (-width / 2, 0.0)
    lm[16] = (width / 2, 0.0)
    for u, v in vm.INNER_LIP_PAIRS:
        lm[u, 1] = lm[v, 1] - gap
        lm[u, 0] = lm[v, 0]
    return lm + np.asarray(centre)


def test_psnr_cap_for_identical_frames_and_known_value():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 250, size=(4, 16, 16, 3), dtype=np.uint8)
    assert vm.psnr(frames, frames.copy()) == vm.PSNR_CAP_DB
    shifted = frames + np.uint8(1)  # MSE exactly 1
    assert vm.psnr(shifted, frames) == pytest.approx(10 * np.log10(255.0 ** 2), abs=1e-9)
    # one identical frame of two: the mean of the cap and the other frame's PSNR
    mixed = frames.copy()
    mixed[1] += 1
    assert vm.psnr(mixed[:2], frames[:2]) == pytest.approx((vm.PSNR_CAP_DB + 10 * np.log10(255.0 ** 2)) / 2)
    with pytest.raises(ValueError, match="same shape"):
        vm.psnr(frames[:, :8], frames)


def test_ssim_identical_is_one_and_noise_lowers_it():
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    assert vm.ssim(frames, frames.copy()) == pytest.approx(1.0)
    noisy = np.clip(frames + rng.normal(0, 40, frames.shape), 0, 255).astype(np.uint8)
    assert vm.ssim(noisy, frames) < 0.9


def test_mouth_opening_is_gap_over_face_width_and_nan_without_face():
    lm = np.stack([_face(100.0, 0.0), _face(100.0, 20.0), _face(200.0, 20.0), np.full((68, 2), np.nan)])
    opening = vm.mouth_opening(lm)
    np.testing.assert_allclose(opening[:3], [0.0, 0.2, 0.1], atol=1e-12)
    assert np.isnan(opening[3])
    with pytest.raises(ValueError, match=r"\[T, 68, 2\]"):
        vm.mouth_opening(np.zeros((3, 67, 2)))


def test_audio_loudness_is_rms_of_each_frame_interval():
    sr = 16000
    t = np.arange(sr) / sr  # 1 s = 25 frames of 640 samples
    amp = np.repeat(np.linspace(0.1, 0.5, 25), 640)
    samples = amp * np.sin(2 * np.pi * 400 * t)  # 400 Hz: whole periods per 40 ms frame
    loud = vm.audio_loudness_per_frame(samples, sr, FPS, 27)
    np.testing.assert_allclose(loud[:25], np.linspace(0.1, 0.5, 25) / np.sqrt(2), rtol=1e-6)
    assert np.isnan(loud[25:]).all()  # past the end of the audio


def test_sync_score_finds_the_lag_and_ignores_constant_signals():
    rng = np.random.default_rng(3)
    loud = rng.uniform(0, 1, 200)
    follows = np.roll(loud, 2)  # the mouth follows the sound by 2 frames
    assert vm.sync_score(follows, loud, max_lag=2) == pytest.approx(1.0, abs=1e-2)
    assert vm.sync_score(follows, loud, max_lag=0) < 0.3  # without the lag search: uncorrelated
    assert vm.sync_score(np.full(200, 0.1), loud) == 0.0  # a still mouth
    assert vm.sync_score(follows, np.zeros(200)) == 0.0  # silence
    assert np.isnan(vm.sync_score(np.full(200, np.nan), loud))  # no face anywhere


def test_detrended_sync_counts_frame_to_frame_following_not_a_shared_slow_drift():
    """A mouth that drifts open over the video while the speech gets louder, with no frame-level
    relation, correlates at every lag (the raw score is high); removing the 1 s moving mean leaves
    chance. A mouth that follows the loudness frame by frame keeps its score through the same
    drift; a still mouth stays 0; NaN frames (no face) stay out of the means."""
    rng = np.random.default_rng(7)
    n, window = 250, 25  # 10 s at 25 fps, 1 s window
    drift = np.linspace(0.0, 1.0, n)
    loud = rng.uniform(0, 1, n) + 3 * drift
    idle_mouth = rng.uniform(0, 1, n) + 3 * drift  # opens slowly, ignores the syllables
    assert vm.sync_score(idle_mouth, loud, max_lag=2) > 0.8
    assert abs(vm.sync_score(idle_mouth, loud, max_lag=2, detrend_frames=window)) < 0.3
    follows = np.roll(loud - 3 * drift, 1) + 5 * drift[::-1]  # follows by a frame, drifts the other way
    follows[0] = follows[1]
    assert vm.sync_score(follows, loud, max_lag=2) < 0.0
    assert vm.sync_score(follows, loud, max_lag=2, detrend_frames=window) > 0.8
    assert vm.sync_score(np.full(n, 0.2), loud, detrend_frames=window) == 0.0
    gappy = follows.copy()
    gappy[::7] = np.nan
    assert vm.sync_score(gappy, loud, max_lag=2, detrend_frames=window) > 0.8
    x = np.array([1.0, 2.0, np.nan, 4.0, 5.0])
    np.testing.assert_allclose(remove_trend(x, 3), [1.0 - 1.5, 2.0 - 1.5, np.nan, 4.0 - 4.5, 5.0 - 4.5])


def test_lmd_is_zero_for_moved_scaled_copies_and_measures_mouth_shape():
    base = np.stack([_face(100.0, 10.0)] * 5)
    moved = np.stack([_face(200.0, 20.0, centre=(300.0, 10.0))] * 5)  # same face, 2x and shifted
    assert vm.lmd(moved, base) == pytest.approx(0.0, abs=1e-9)
    opened = base.copy()
    opened[:, 67, 1] += 10.0  # one inner-lip point moves by 0.1 face width
    # centroid of the 20 mouth points moves by 0.1 / 20: the moved point's distance is 0.1 * 19/20,
    # each of the 19 others 0.1 / 20
    expected = (0.1 * 19 / 20 + 19 * 0.1 / 20) / len(MOUTH)
    assert vm.lmd(opened, base) == pytest.approx(expected, rel=1e-6)
    nan = base.copy()
    nan[2] = np.nan
    assert vm.lmd(nan, base) == pytest.approx(0.0, abs=1e-9)  # frames without a face are left out


def test_motion_variances_match_motion_stats_on_constructed_landmarks():
    rng = np.random.default_rng(4)
    lm = rng.uniform(0.2, 0.8, size=(40, 68, 2))
    ours = vm.motion_variances(lm)
    ref = clip_motion_stats(lm)
    assert ours == {"glo": ref.glo, "exp": ref.exp}
    valid = np.arange(40) % 3 != 0
    lm_nan = lm.copy()
    lm_nan[~valid] = np.nan
    ref_valid = clip_motion_stats(lm, valid=valid)
    assert vm.motion_variances(lm_nan) == {"glo": ref_valid.glo, "exp": ref_valid.exp}


# ------------------------------------------------------------------------------- a real sample video
@pytest.fixture(scope="module")
def sample_video(tmp_path_factory):
    """The first sample video (25 fps, 16 kHz, 320x320, 7 s): frames uint8 [175, 320, 320, 3] and
    its audio (mono 16 kHz); its mouth opens with the loudness of the speech."""
    pytest.importorskip("dlib")
    from pipelines.media.audio_decode import decode_audio
    from pipelines.media.video_decode import iter_frames
    from pipelines.samples.talking_heads import SAMPLE_SPECS, generate_samples

    (path,) = generate_samples(tmp_path_factory.mktemp("metrics_sample"), seconds=7.0, seed=0,
                               specs=SAMPLE_SPECS[:1])
    frames = np.concatenate([c.frames for c in iter_frames(path, fps=FPS)])
    audio = decode_audio(path, 16000)
    return frames, audio.samples, audio.sample_rate


@pytest.fixture(scope="module")
def detector():
    from pipelines.faces.detect import make_detector

    return make_detector("dlib")


def test_real_sample_video_scores_high_sync_and_near_zero_control(sample_video, detector):
    frames, samples, sr = sample_video
    scores = vm.score_video(frames, frames, samples, sr, FPS, detector)
    assert scores["face_found_ratio"] >= 0.95
    assert scores["sync"] >= 0.45, scores
    assert abs(scores["sync_control"]) <= 0.2, scores
    assert scores["sync"] - scores["sync_control"] >= 0.3, scores
    # against itself: capped PSNR, SSIM 1, LMD 0, and the real video's scores equal the generated
    assert scores["psnr"] == vm.PSNR_CAP_DB
    assert scores["ssim"] == pytest.approx(1.0)
    assert scores["lmd"] == pytest.approx(0.0, abs=1e-12)
    assert scores["sync_gt"] == scores["sync"] and scores["glo_gt"] == scores["glo"]


def test_small_crops_are_upscaled_so_the_face_is_found(sample_video, detector):
    """The platform generates 64-256 px crops; dlib finds the face only after the upscale."""
    from PIL import Image

    frames, samples, sr = sample_video
    small = np.stack([np.asarray(Image.fromarray(f[40:280, 40:280]).resize((64, 64), Image.Resampling.BILINEAR))
                      for f in frames[::5]])
    lm, found = vm.detect_landmarks(small, detector)
    assert found.mean() >= 0.9
    assert np.nanmax(lm) <= 1.2 and np.nanmin(lm) >= -0.2  # crop fractions, not pixels


def test_still_video_scores_about_zero_sync(sample_video, detector):
    frames, samples, sr = sample_video
    still = np.repeat(frames[:1], len(frames), axis=0)
    assert vm.score_video(still, None, samples, sr, FPS, detector)["sync"] == 0.0
    # with sensor noise the landmarks jitter a little; the jitter does not follow the audio
    rng = np.random.default_rng(5)
    noisy = np.clip(still + rng.normal(0, 3, still.shape), 0, 255).astype(np.uint8)
    scores = vm.score_video(noisy, None, samples, sr, FPS, detector)
    assert scores["face_found_ratio"] >= 0.95
    assert abs(scores["sync"]) < 0.2, scores


def test_glo_exp_match_motion_stats_on_the_same_landmarks(sample_video, detector):
    frames, samples, sr = sample_video
    lm, found = vm.detect_landmarks(frames, detector)
    ref = clip_motion_stats(np.nan_to_num(lm), valid=found)
    scores = vm.score_video(frames, None, samples, sr, FPS, detector)
    assert (scores["glo"], scores["exp"]) == (ref.glo, ref.exp)
    assert ref.glo > 0 and ref.exp > 0  # the sample head moves
