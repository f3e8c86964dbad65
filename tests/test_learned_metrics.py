"""FID / FVD / LSE (inference/learned_metrics.py): the Fréchet distance against closed forms, the
LSE offset search, feature networks and a SyncNet given as TorchScript files (tiny ones written
here, nothing downloaded), the errors of a broken weights file, and the wiring into
evaluate_package and the evaluation job."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from core.sections import EvaluationConfig
from inference.learned_metrics import (
    FRECHET_EPS,
    LearnedMetricError,
    frechet_distance,
    frechet_distance_of_features,
    learned_metric_values,
    load_feature_networks,
    lse_from_embeddings,
    syncnet_mfcc,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- tiny feature networks (TorchScript needs their source: defined at module level) --------------

class TinyFrameNet(torch.nn.Module):
    """FID convention: float frames [N, 3, 32, 32] in [0, 1] -> [N, 16] (a fixed random conv, then
    the mean and max of each channel)."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(8, 3, 5, 5, generator=gen) * 0.3)
            self.conv.bias.copy_(torch.randn(8, generator=gen) * 0.1)

    def forward(self, x):
        assert x.shape[1] == 3 and x.shape[2] == 32 and x.shape[3] == 32, "input must be [N, 3, 32, 32]"
        assert bool(x.min() >= 0.0) and bool(x.max() <= 1.0), "input must be in [0, 1]"
        y = torch.relu(self.conv(x))
        return torch.cat([y.mean(dim=(2, 3)), y.amax(dim=(2, 3))], dim=1)


class TinyClipNet(torch.nn.Module):
    """The I3D TorchScript's call convention: clips [N, 3, T, S, S] in [-1, 1] and the keywords
    rescale=False, resize=False, return_features=True -> [N, 9] (colour means, their spread over
    time, and the mean frame-to-frame change)."""

    def forward(self, x, rescale: bool = True, resize: bool = True, return_features: bool = False):
        assert not rescale and not resize and return_features, "called without the I3D keywords"
        assert x.dim() == 5 and x.shape[1] == 3 and x.shape[3] == 24 and x.shape[4] == 24, "input [N, 3, T, 24, 24]"
        assert bool(x.min() >= -1.0) and bool(x.max() <= 1.0), "input must be in [-1, 1]"
        m = x.mean(dim=(3, 4))  # [N, 3, T]
        motion = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=(2, 3, 4))
        return torch.cat([m.mean(dim=2), m.std(dim=2), motion], dim=1)


class TinySyncNet(torch.nn.Module):
    """SyncNet's convention: lip windows [B, 3, 5, 224, 224] (0..255) and MFCC windows
    [B, 1, 13, 20] -> (the 5 frames' brightness, the log energy of the 5 frames' audio), each
    standardised: close when the brightness follows the loudness at the right offset."""

    def forward(self, lip, mfcc):
        assert lip.shape[1] == 3 and lip.shape[2] == 5 and lip.shape[3] == 224 and lip.shape[4] == 224, "lip"
        assert mfcc.shape[1] == 1 and mfcc.shape[2] == 13 and mfcc.shape[3] == 20, "mfcc [B, 1, 13, 20]"
        assert bool(lip.min() >= 0.0) and bool(lip.max() <= 255.0), "lip values 0..255"
        b = lip.mean(dim=(1, 3, 4))
        e = mfcc[:, 0, 0, :].reshape(-1, 5, 4).mean(dim=2)  # coefficient 0: log energy (appendEnergy)
        b = (b - b.mean(dim=1, keepdim=True)) / (b.std(dim=1, keepdim=True) + 1e-3)
        e = (e - e.mean(dim=1, keepdim=True)) / (e.std(dim=1, keepdim=True) + 1e-3)
        return b, e


class WrongShapeNet(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=1)  # [N, H, W]: not features


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    root = tmp_path_factory.mktemp("feature_nets")
    paths = {}
    for name, module in (("frame", TinyFrameNet()), ("clip", TinyClipNet()), ("sync", TinySyncNet()),
                         ("wrong", WrongShapeNet())):
        paths[name] = root / f"{name}.pt"
        torch.jit.script(module.eval()).save(str(paths[name]))
    paths["state_dict"] = root / "state_dict.pt"
    torch.save(TinyFrameNet().state_dict(), paths["state_dict"])
    return paths


def fid_cfg(path, **kw) -> EvaluationConfig:
    return EvaluationConfig(fid_weights_path=str(path), fid_input_size=32, feature_batch_size=8, **kw)


def fvd_cfg(path, **kw) -> EvaluationConfig:
    return EvaluationConfig(**{"fvd_weights_path": str(path), "fvd_input_size": 24, "fvd_clip_frames": 8,
                               "feature_batch_size": 16, **kw})


def noise_frames(n: int, seed: int, low: int = 0, high: int = 256, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, (n, size, size, 3)).astype(np.uint8)


# --- Fréchet distance ------------------------------------------------------------------------------

def test_frechet_distance_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(400, 6))
    assert frechet_distance_of_features(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    """For diagonal covariances sqrtm(S1 S2) = diag(sqrt(s1 s2)), so the distance is
    |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2; a common rotation leaves it unchanged."""
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 0.25, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)  # 6 + 4 + 1 + 0 + 0.5
    assert expected == pytest.approx(11.5)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(4, 4)))
    got = frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-7)
    # sample estimate of the same two Gaussians: close to the closed form
    rng = np.random.default_rng(2)
    a = mu1 + rng.normal(size=(20000, 4)) * np.sqrt(s1)
    b = mu2 + rng.normal(size=(20000, 4)) * np.sqrt(s2)
    assert frechet_distance_of_features(a, b) == pytest.approx(expected, rel=0.03)


def test_shifting_the_mean_adds_its_squared_length():
    x = np.random.default_rng(3).normal(size=(300, 5)) @ np.diag([1.0, 2.0, 0.5, 1.0, 3.0])
    delta = np.array([0.5, -1.0, 2.0, 0.0, 0.25])
    assert frechet_distance_of_features(x, x + delta) == pytest.approx(float(delta @ delta), rel=1e-6)


def test_singular_covariances_give_a_finite_distance_and_too_few_rows_nan():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(5, 20)), rng.normal(size=(5, 20)) + 1.0  # 5 samples in 20 dims: rank 4
    d = frechet_distance_of_features(a, b)
    assert math.isfinite(d) and d > 20 * 0.9  # the mean shift alone is 20
    assert abs(frechet_distance_of_features(a, a)) < 1e3 * FRECHET_EPS
    assert math.isnan(frechet_distance_of_features(a[:1], b))
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# --- feature networks ------------------------------------------------------------------------------

def test_fid_of_a_set_with_itself_is_zero_and_of_a_different_set_positive(nets):
    networks = load_feature_networks(fid_cfg(nets["frame"]))
    assert networks.fid.dim == 16 and networks.fvd is None
    frames = noise_frames(40, seed=0)  # 64 px: resized to the network's 32 px
    same = networks.video_features(frames, frames)
    assert same["fid_generated"].shape == (40, 16) and same["fid_generated"].dtype == np.float32
    other = noise_frames(40, seed=1, low=0, high=80)  # dark frames
    values, notes = learned_metric_values([same], fid_cfg(nets["frame"]))
    assert values["fid"] == pytest.approx(0.0, abs=1e-6) and values["fid_frames"] == 40 and notes == {}
    diff, _ = learned_metric_values([networks.video_features(other, frames)], fid_cfg(nets["frame"]))
    # two noise sets of the same distribution score far closer than noise vs dark frames
    alike, _ = learned_metric_values([networks.video_features(noise_frames(40, seed=2), frames)],
                                     fid_cfg(nets["frame"]))
    assert diff["fid"] > 0.01 and diff["fid"] > 20 * alike["fid"], (diff, alike)
    # pooled over videos: two videos of 40 frames are 80 frames on each side
    pooled, _ = learned_metric_values([same, same], fid_cfg(nets["frame"]))
    assert pooled["fid_frames"] == 80


def test_fvd_uses_the_i3d_convention_and_non_overlapping_clips(nets):
    cfg = fvd_cfg(nets["clip"])
    networks = load_feature_networks(cfg)
    assert networks.fvd.dim == 9 and networks.fid is None
    moving = noise_frames(35, seed=5, size=48)  # 4 clips of 8 frames, 3 frames dropped
    still = np.repeat(noise_frames(1, seed=6, size=48), 35, axis=0)
    feats = networks.video_features(moving, moving)
    assert feats["fvd_generated"].shape == (4, 9)
    values, notes = learned_metric_values([feats], cfg)
    assert values["fvd"] == pytest.approx(0.0, abs=1e-6) and values["fvd_clips"] == 4 and notes == {}
    values, _ = learned_metric_values([networks.video_features(still, moving)], cfg)
    assert values["fvd"] > 0.05, values  # a still video is far from a moving one (the motion feature)
    # a video shorter than two clips: NaN with the reason, not a crash
    short, notes = learned_metric_values([networks.video_features(moving[:12], moving[:12])], cfg)
    assert math.isnan(short["fvd"]) and short["fvd_clips"] == 1
    assert "1 generated / real clips" in notes["fvd"] and "evaluation.fvd_clip_frames" in notes["fvd"]


def test_the_i3d_keywords_are_a_config_choice(nets):
    with pytest.raises(LearnedMetricError, match="evaluation.fvd_weights_path.*failed on input"):
        load_feature_networks(fvd_cfg(nets["clip"], fvd_call_convention="plain"))  # TinyClipNet needs them


def test_broken_weights_files_name_the_field_and_the_path(nets, tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(LearnedMetricError, match=f"evaluation.fid_weights_path: no file at {missing}"):
        load_feature_networks(fid_cfg(missing))
    with pytest.raises(LearnedMetricError, match="evaluation.fid_weights_path: .*state_dict.pt is not a TorchScript"):
        load_feature_networks(fid_cfg(nets["state_dict"]))
    text = tmp_path / "weights.txt"
    text.write_text("not weights")
    with pytest.raises(LearnedMetricError, match="evaluation.fvd_weights_path: .*weights.txt is not a TorchScript"):
        load_feature_networks(fvd_cfg(text))
    wrong = r"evaluation.fid_weights_path: .*wrong.pt returned shape \[2, 32, 32\]"
    with pytest.raises(LearnedMetricError, match=wrong):
        load_feature_networks(fid_cfg(nets["wrong"]))
    with pytest.raises(LearnedMetricError, match="evaluation.fvd_clip_frames: must be >= 1"):
        load_feature_networks(fvd_cfg(nets["clip"], fvd_clip_frames=0))


# --- LSE-D / LSE-C ----------------------------------------------------------------------------------

def test_lse_offset_search_finds_the_shift_and_scores_confidence():
    rng = np.random.default_rng(7)
    lip = rng.normal(size=(60, 8))
    audio = np.zeros_like(lip)
    audio[3:] = lip[:-3]  # the audio embedding of window i + 3 matches the lip embedding of window i
    d, c, offset = lse_from_embeddings(lip, audio)
    assert offset == -3
    d_random, c_random, _ = lse_from_embeddings(lip, rng.normal(size=(60, 8)))
    assert d < 0.5 * d_random and c > 3 * c_random and c > 1.0, (d, c, d_random, c_random)
    assert all(math.isnan(v) for v in lse_from_embeddings(lip[:0], audio[:0])[:2])


def test_syncnet_mfcc_is_13_coefficients_at_100_hz():
    mfcc = syncnet_mfcc(np.random.default_rng(0).normal(scale=0.1, size=16000).astype(np.float32))
    assert mfcc.shape == (13, 99) and mfcc.dtype == np.float32 and np.isfinite(mfcc).all()


def envelope_video(envelope: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames whose brightness is ``envelope`` (one value a 25 fps frame, 0..1) and 16 kHz noise
    whose loudness is the same envelope: a 'mouth' that opens with the audio."""
    frames = np.repeat((envelope * 230 + 10).astype(np.uint8)[:, None, None, None], 32, axis=1)
    frames = np.repeat(np.repeat(frames, 32, axis=2), 3, axis=3)  # [T, 32, 32, 3]
    noise = np.random.default_rng(seed).normal(size=len(envelope) * 640)
    return frames, (noise * np.repeat(envelope, 640) * 0.3).astype(np.float32)


def test_lse_of_a_synced_video_beats_a_shifted_and_a_random_one(nets):
    networks = load_feature_networks(EvaluationConfig(syncnet_path=str(nets["sync"]), feature_batch_size=40))
    rng = np.random.default_rng(8)
    envelope = rng.uniform(0.05, 1.0, 100)
    synced, samples = envelope_video(envelope, seed=9)
    scores, note = networks.syncnet.scores(synced, synced[::-1].copy(), samples, 16000, 25.0)
    assert note is None
    assert scores["lse_c"] > 2.0 * scores["lse_c_gt"] and scores["lse_d"] < scores["lse_d_gt"], scores
    # the offset search finds a 4-frame delay of the picture
    delayed = np.concatenate([synced[:4], synced[:-4]])
    mfcc = syncnet_mfcc(samples)
    _, _, offset = lse_from_embeddings(*networks.syncnet.embeddings(delayed, mfcc, 95))
    _, _, offset0 = lse_from_embeddings(*networks.syncnet.embeddings(synced, mfcc, 95))
    assert offset0 == 0 and offset == 4, (offset0, offset)
    # no waveform / too short: NaN with the reason
    nan, note = networks.syncnet.scores(synced, synced, None, 16000, 25.0)
    assert math.isnan(nan["lse_d"]) and "no waveform" in note
    nan, note = networks.syncnet.scores(synced[:5], synced[:5], samples, 16000, 25.0)
    assert math.isnan(nan["lse_c"]) and "at least 6" in note


def test_a_syncnet_of_the_wrong_convention_names_the_field(nets):
    with pytest.raises(LearnedMetricError, match="evaluation.syncnet_path: .*wrong.pt failed on lip"):
        load_feature_networks(EvaluationConfig(syncnet_path=str(nets["wrong"])))


# --- wiring: evaluate_package and the evaluation job ----------------------------------------------

@pytest.fixture(scope="module")
def synthetic_split(tmp_path_factory):
    """Two test videos (40 and 50 frames) of a synthetic ingest output that fits the tiny package;
    their real frames are the stored latents decoded by the package's VAE (no source videos)."""
    from pipelines.samples.synthetic_ingest import write_synthetic_ingest

    out = tmp_path_factory.mktemp("learned_ingest")
    write_synthetic_ingest(out, num_frames=(40, 50), latent_shape=(4, 8, 8), audio_shape=(2, 32),
                           splits=["test", "test"], num_rejected=0, content="random")
    return out


@pytest.mark.slow  # generation and dlib on every frame
def test_evaluate_package_computes_fid_and_fvd_when_weights_are_given(nets, synthetic_split, tiny_package):
    pytest.importorskip("dlib")
    from training.evaluation import FEATURES_KEY, evaluate_package

    ev = EvaluationConfig(max_seconds=1.0, fid_weights_path=str(nets["frame"]), fid_input_size=32,
                          fvd_weights_path=str(nets["clip"]), fvd_input_size=24, fvd_clip_frames=8,
                          feature_batch_size=16, syncnet_path=str(nets["sync"]))
    result = evaluate_package(tiny_package, synthetic_split, split="test", steps=1, device="cpu", evaluation=ev)
    assert len(result["videos"]) == 2 and result["rejected"] == []
    mean = result["mean"]
    assert mean["fid_frames"] == 2 * 25 and mean["fvd_clips"] == 2 * 3  # 1 s of each video, clips of 8
    assert math.isfinite(mean["fid"]) and mean["fid"] > 0  # an untrained model vs the decoded latents
    assert math.isfinite(mean["fvd"]) and mean["fvd"] > 0
    # synthetic data has no source video, so no waveform: LSE is NaN and skipped says why
    assert math.isnan(mean["lse_d"]) and math.isnan(result["videos"][0]["lse_c"])
    # csim: no ArcFace network given (evaluation.arcface_path)
    assert set(result["skipped"]) == {"lse_c", "lse_d", "csim"} and "no waveform" in result["skipped"]["lse_c"]
    assert any("LSE NaN: no waveform" in n for n in result["videos"][0]["notes"])
    assert all(FEATURES_KEY not in v for v in result["videos"])  # features never reach the JSON

    plain = evaluate_package(tiny_package, synthetic_split, split="test", max_videos=1, steps=1, device="cpu",
                             evaluation=EvaluationConfig(max_seconds=0.4))
    assert set(plain["skipped"]) == {"lse_c", "lse_d", "fid", "fvd", "csim"} and "fid" not in plain["mean"]
    assert "lse_d" not in plain["mean"] and "evaluation.syncnet_path" in plain["skipped"]["lse_d"]
    assert "evaluation.fid_weights_path" in plain["skipped"]["fid"]
    assert "evaluation.fvd_weights_path" in plain["skipped"]["fvd"]


@pytest.mark.slow  # the evaluation job on Ray Data
def test_evaluation_job_pools_the_actors_features_and_rejects_a_broken_path_before_ray(
        nets, synthetic_split, tiny_package, tmp_path, capsys, ray_local):
    pytest.importorskip("dlib")
    import evaluate

    tracking = [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/mlruns"]
    out = tmp_path / "result.json"
    base = ["--model", str(tiny_package), "--data", str(synthetic_split), "--out", str(out), *tracking,
            "evaluation.steps=1", "evaluation.max_seconds=1", "evaluation.side_by_side_videos=0",
            "evaluation.alias=null"]
    assert evaluate.main([*base, f"evaluation.fid_weights_path={tmp_path / 'missing.pt'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate.py: error: evaluation.fid_weights_path: no file at"), err

    assert not out.exists()
    rc = evaluate.main([*base, f"evaluation.fid_weights_path={nets['frame']}",
                        "evaluation.fid_input_size=32", "evaluation.feature_batch_size=16"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["mean"]["fid_frames"] == 50 and result["mean"]["fid"] > 0
    assert set(result["skipped"]) == {"lse_c", "lse_d", "fvd", "csim"}
    assert all("learned_features" not in v for v in result["videos"])
    assert "fid (pooled over the split, 50 frames)" in capsys.readouterr().out
