"""LatentCodec (pipelines/encoders/latents.py): SD's KL autoencoder, scaled posterior mean, uint8 round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.encoders.latents import LatentCodec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def codec(tiny_weights):
    return LatentCodec(tiny_weights[1].vae)


def test_codec_is_kl_autoencoder_with_scaling(codec):
    from diffusers import AutoencoderKL

    assert isinstance(codec.vae, AutoencoderKL)
    assert codec.scaling_factor == pytest.approx(0.18215)
    assert codec.latent_shape(64) == (4, 8, 8) and codec.latent_shape(512) == (4, 64, 64)
    with pytest.raises(ValueError, match="divisible"):
        codec.latent_shape(60)


def test_grey_image_latent_matches_manual_diffusers(codec, tiny_weights):
    """Latents of an all-grey frame = AutoencoderKL(x in [-1, 1]).latent_dist.mean * 0.18215."""
    from diffusers import AutoencoderKL

    frames = np.full((2, 32, 32, 3), 200, np.uint8)
    z = codec.encode(frames)
    assert z.dtype == np.float16 and z.shape == (2, 4, 4, 4)
    vae = AutoencoderKL.from_pretrained(tiny_weights[1].vae).eval()
    x = torch.full((1, 3, 32, 32), 200 / 127.5 - 1.0)
    with torch.no_grad():
        manual = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    np.testing.assert_allclose(z[0].astype(np.float32), manual[0].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(z[0], z[1])
    # not the unscaled mean, not a [0, 1] input: either mistake changes the result
    with torch.no_grad():
        unscaled = vae.encode(x).latent_dist.mean[0].numpy()
        wrong_range = vae.encode(torch.full((1, 3, 32, 32), 200 / 255.0)).latent_dist.mean[0].numpy() * 0.18215
    assert not np.allclose(z[0].astype(np.float32), unscaled, atol=1e-3)
    assert not np.allclose(z[0].astype(np.float32), wrong_range, atol=1e-3)


def test_encode_decode_round_trip_shapes_and_ranges(codec):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
    z = codec.encode(frames, batch_size=2)  # 3 batches, last one partial
    assert z.shape == (5, 4, 8, 8) and z.dtype == np.float16 and np.isfinite(z).all()
    # the mean is deterministic; batching changes it only by float rounding
    np.testing.assert_array_equal(z, codec.encode(frames, batch_size=2))
    np.testing.assert_allclose(z.astype(np.float32), codec.encode(frames, batch_size=16).astype(np.float32),
                               atol=2e-4)
    # sampling differs from the mean (it is a distribution, not a tensor)
    s = codec.encode(frames[:1], sample=True, generator=torch.Generator().manual_seed(0))
    assert not np.array_equal(s, z[:1])
    out = codec.decode(z)
    assert out.shape == (5, 64, 64, 3) and out.dtype == np.uint8
    out_t = codec.decode(torch.from_numpy(z).float()[:2], batch_size=1)
    assert np.abs(out_t.astype(int) - out[:2].astype(int)).max() <= 1  # batch-size rounding only
    # decode divides by the scaling factor: equals the manual diffusers decode of z / 0.18215
    with torch.no_grad():
        manual = codec.vae.decode(torch.from_numpy(z[:1]).float() / 0.18215).sample.clamp(-1, 1)
    manual = ((manual + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(out[:1].astype(int) - manual.astype(int)).max() <= 1


def test_encode_rejects_bad_frames(codec):
    with pytest.raises(ValueError, match="uint8"):
        codec.encode(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[n, H, W, 3\]"):
        codec.encode(np.zeros((1, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="divisible"):
        codec.encode(np.zeros((1, 30, 30, 3), np.uint8))
