"""training/fit_vae.py: a short fit of the tiny VAE to sample faces beats the random tiny VAE on
held-out frames, is cached, and is what the tiny preset loads through ``weights.vae``."""
from __future__ import annotations

import json
import shutil

import pytest

from core.sections import WeightsConfig
from core.weights import resolve_weights
from pipelines.samples.talking_heads import SAMPLE_SPECS, generate_samples
from training.fit_vae import FitSettings, VaeFitError, fit_vae, main

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("espeak-ng") is None,
                       reason="needs ffmpeg and espeak-ng (make sysdeps)"),
]

QUICK = FitSettings(steps=60, batch_size=8, lr=3e-3, detect_every=4, holdout_fraction=0.25, threads=1)


@pytest.fixture(scope="module")
def two_videos(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae_samples")
    generate_samples(out, seconds=2.0, seed=3, specs=SAMPLE_SPECS[:2])
    return out


def test_fitted_vae_beats_the_random_one_on_held_out_frames(two_videos, tmp_path):
    out = tmp_path / "vae"
    record = fit_vae(two_videos, out, crop_size=64, crop_margin=0.6, settings=QUICK, log=lambda s: None)
    assert not record["cached"] and record["heldout_crops"] > 0 and record["train_crops"] > record["heldout_crops"]
    # the random tiny VAE decodes noise (~10 dB); 60 steps already reconstruct the face much better
    assert record["psnr_db"] > record["psnr_random_db"] + 3.0, record
    assert record["scaling_factor"] > 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["_class_name"] == "AutoencoderKL" and saved["scaling_factor"] == pytest.approx(record["scaling_factor"])
    # a rerun on the same videos and settings reuses the fit
    again = fit_vae(two_videos, out, crop_size=64, crop_margin=0.6, settings=QUICK, log=lambda s: None)
    assert again["cached"] and again["psnr_db"] == record["psnr_db"]
    # the tiny preset loads it in place of its random VAE
    assert resolve_weights(WeightsConfig(preset="tiny", tiny_dir=str(tmp_path / "tiny"), vae=str(out))).vae == str(out)
    assert resolve_weights(WeightsConfig(preset="tiny", tiny_dir=str(tmp_path / "tiny"))).vae.endswith("sd/vae")


def test_no_video_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(VaeFitError, match=str(tmp_path)):
        fit_vae(tmp_path, tmp_path / "out", 64, 0.6, QUICK)
    assert main(["--samples", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert "no video" in capsys.readouterr().err
