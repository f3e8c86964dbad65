"""core/patch_codec.py: the linear patch codec (DCT unfitted, PCA fitted), its save / load through
the same paths as AutoencoderKL, and what the tiny preset builds around a codec of other latent
channels (a matching U-Net, the ingest's latent shape)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.patch_codec import PatchCodec, dct_basis, patchify, unpatchify
from core.sections import WeightsConfig
from core.weights import load_vae, materialize_tiny_weights, resolve_weights, vae_class
from pipelines.encoders.latents import LatentCodec
from pipelines.ingestion.meta import ModelConfigError, vae_latent_shape

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """[n, 3, size, size] in [-1, 1]: bilinear upsampled random 4 x 4 colour fields plus a stripe
    pattern, so they have structure at several scales."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.rand((n, 3, 4, 4), generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(cells, size=(size, size), mode="bilinear", align_corners=False)
    freq = torch.rand((n, 1, 1, 1), generator=g) * 0.6 + 0.2
    stripes = torch.sin(torch.arange(size).float()[None, None, None, :] * freq) * 0.3
    return (x * 0.7 + stripes).clamp(-1, 1)


def test_patchify_inverts_and_keeps_each_patch_together():
    x = torch.randn(2, 3, 16, 24)
    p = patchify(x, 8)
    assert p.shape == (2, 2, 3, 192)
    assert torch.equal(unpatchify(p, 8), x)
    # patch (1, 2) holds exactly the pixels rows 8..15, columns 16..23, in (row, column, colour) order
    assert torch.equal(p[1, 1, 2], x[1, :, 8:16, 16:24].permute(1, 2, 0).reshape(-1))


def test_dct_basis_is_orthonormal_and_starts_with_the_flat_luma_patch():
    b = dct_basis(8, 48)
    assert b.shape == (48, 192)
    np.testing.assert_allclose(b @ b.T, np.eye(48), atol=1e-10)
    flat = np.full(192, 1.0 / np.sqrt(192))  # equal in every pixel and colour
    assert abs(b[0] @ flat) == pytest.approx(1.0)


def test_unfitted_codec_shapes_and_reconstructs_smooth_images():
    codec = PatchCodec(patch_size=8, latent_channels=48)
    x = smooth_images(4)
    post = codec.encode(x).latent_dist
    assert post.mean.shape == (4, 48, 4, 4)
    assert torch.equal(post.sample(), post.mean) and torch.equal(post.mode(), post.mean)  # deterministic
    y = codec.decode(post.mean).sample
    assert y.shape == x.shape
    psnr = 10 * torch.log10(4.0 / (y - x).pow(2).mean())  # peak-to-peak 2 on [-1, 1]
    assert psnr > 28.0  # the low-frequency DCT keeps smooth images (30.7 dB measured)
    with pytest.raises(ValueError, match="multiples of 8"):
        codec.encode(torch.zeros(1, 3, 20, 20))
    with pytest.raises(ValueError, match=r"\[n, 48, h, w\]"):
        codec.decode(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="latent_channels"):
        PatchCodec(patch_size=4, latent_channels=49)


def test_fit_is_the_best_linear_code_and_whitens_the_latents():
    train, other = smooth_images(64, seed=1), smooth_images(16, seed=2)
    dct = PatchCodec(patch_size=8, latent_channels=12)
    pca = PatchCodec(patch_size=8, latent_channels=12).fit(train)

    def err(codec, x):
        return float((codec.decode(codec.encode(x).latent_dist.mean).sample - x).pow(2).mean())

    # principal components are the best 12-dimensional linear code of the training patches, and
    # they carry over to other images of the same kind
    assert err(pca, train) < err(dct, train) and err(pca, other) < err(dct, other)
    np.testing.assert_allclose((pca.basis @ pca.basis.T).numpy(), np.eye(12), atol=1e-4)
    z = pca.encode(train).latent_dist.mean
    np.testing.assert_allclose(z.std(dim=(0, 2, 3)).numpy(), np.ones(12), rtol=0.02)
    np.testing.assert_allclose(z.mean(dim=(0, 2, 3)).numpy(), np.zeros(12), atol=0.02)
    with pytest.raises(ValueError, match="patches"):
        PatchCodec(patch_size=8, latent_channels=12).fit(smooth_images(1, size=8))


def test_save_and_load_like_an_autoencoder(tmp_path):
    codec = PatchCodec(patch_size=8, latent_channels=16, sample_size=32).fit(smooth_images(32))
    codec.save_pretrained(tmp_path / "codec")
    assert json.loads((tmp_path / "codec" / "config.json").read_text())["_class_name"] == "PatchCodec"
    assert vae_class(str(tmp_path / "codec"), True) is PatchCodec  # by name: core.weights.PROJECT_CODECS
    loaded = load_vae(str(tmp_path / "codec"), True)
    assert isinstance(loaded, PatchCodec)
    x = smooth_images(3, seed=5)
    assert torch.allclose(loaded.encode(x).latent_dist.mean, codec.encode(x).latent_dist.mean, atol=1e-6)

    # the frames <-> latents interface of ingest and the sampler, unchanged for this codec
    lc = LatentCodec(str(tmp_path / "codec"))
    assert lc.latent_shape(64) == (16, 8, 8) and lc.downsample == 8 and lc.scaling_factor == 1.0
    frames = ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    z = lc.encode(frames)
    assert z.shape == (3, 16, 4, 4) and z.dtype == np.float16
    back = lc.decode(z)
    assert back.shape == frames.shape and np.abs(back.astype(int) - frames.astype(int)).mean() < 6


def test_tiny_preset_gives_a_u_net_with_the_codec_channels(tmp_path):
    from diffusers import UNet2DConditionModel

    tiny = str(tmp_path / "tiny")
    PatchCodec(patch_size=8, latent_channels=24, sample_size=64).save_pretrained(tmp_path / "codec")
    paths = resolve_weights(WeightsConfig(preset="tiny", tiny_dir=tiny, vae=str(tmp_path / "codec")))
    assert paths.vae == str(tmp_path / "codec") and paths.unet.endswith("unet_24ch")
    unet = UNet2DConditionModel.from_pretrained(paths.unet)
    assert unet.config.in_channels == 24 and unet.config.out_channels == 24
    # the tiny preset's own 4-channel VAE (or none given) keeps the 4-channel U-Net
    plain = resolve_weights(WeightsConfig(preset="tiny", tiny_dir=tiny))
    assert plain.unet.endswith("sd/unet") and vae_class(plain.vae, True).__name__ == "AutoencoderKL"
    assert resolve_weights(WeightsConfig(preset="tiny", tiny_dir=tiny, vae=plain.vae)).unet == plain.unet


def test_ingest_latent_shape_follows_the_codec(tmp_path):
    root = materialize_tiny_weights(tmp_path / "tiny")
    assert vae_latent_shape(str(root / "sd" / "vae"), True, 64) == [4, 8, 8]
    PatchCodec(patch_size=4, latent_channels=12).save_pretrained(tmp_path / "codec")
    assert vae_latent_shape(str(tmp_path / "codec"), True, 64) == [12, 16, 16]
    with pytest.raises(ModelConfigError, match="not a multiple"):
        vae_latent_shape(str(tmp_path / "codec"), True, 66)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"_class_name": "PatchCodec", "patch_size": 8, "latent_channels": "x"}))
    with pytest.raises(ModelConfigError, match="latent_channels"):
        vae_latent_shape(str(bad), True, 64)


def test_pixel_loss_weight_makes_the_latent_mse_the_decoded_mse(tmp_path):
    """train.latent_loss_weight=pixel: with the codec's weights, the weighted MSE between two latent
    tensors is proportional to the MSE of what they decode to (one factor for any pair), which the
    uniform MSE is not; a KL-VAE (not linear) is refused by name."""
    from core.sections import TrainConfig
    from training.errors import TrainingError
    from training.step import diffusion_loss, latent_loss_weights, make_noise_scheduler

    codec = PatchCodec(patch_size=4, latent_channels=12).fit(smooth_images(16, 32))
    codec.save_pretrained(tmp_path / "codec")
    weights_cfg = WeightsConfig(preset="tiny", tiny_dir=str(tmp_path / "tiny"), vae=str(tmp_path / "codec"))
    assert latent_loss_weights(TrainConfig(), weights_cfg) is None  # uniform: the default
    w = latent_loss_weights(TrainConfig(latent_loss_weight="pixel"), weights_cfg)
    assert w.shape == (12,) and abs(float(w.mean()) - 1) < 1e-5 and float(w[0]) > 10 * float(w[-1])

    sched = make_noise_scheduler(TrainConfig())
    t = torch.tensor([500, 500])

    def losses(latents, prediction):
        class Fixed(torch.nn.Module):
            def forward(self, noisy_latents, timesteps):
                return prediction

        g = torch.Generator().manual_seed(1)
        noise = torch.randn(latents.shape, generator=g)  # the target diffusion_loss draws (epsilon)
        decoded = [codec.decode(x.flatten(0, 1)).sample for x in (prediction, noise)]
        weighted = diffusion_loss(Fixed(), {"latents": latents}, sched, torch.Generator().manual_seed(1), t,
                                  channel_weights=w)
        plain = diffusion_loss(Fixed(), {"latents": latents}, sched, torch.Generator().manual_seed(1), t)
        pixel = float(((decoded[0] - decoded[1]) ** 2).mean())  # the codec's mean cancels
        return float(weighted), float(plain), pixel

    latents = torch.randn(2, 3, 12, 2, 2)
    ratios, plain_ratios = [], []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        scale = torch.rand(12, generator=g)[None, None, :, None, None] * 3  # errors spread unevenly over channels
        prediction = torch.randn(latents.shape, generator=g) * scale
        weighted, plain, pixel = losses(latents, prediction)
        ratios.append(weighted / pixel)
        plain_ratios.append(plain / pixel)
    assert max(ratios) / min(ratios) < 1 + 1e-4
    assert max(plain_ratios) / min(plain_ratios) > 1.2

    from diffusers import AutoencoderKL

    from core.weights import tiny_vae_config
    AutoencoderKL(**tiny_vae_config()).save_pretrained(tmp_path / "kl")
    kl_cfg = WeightsConfig(preset="tiny", tiny_dir=str(tmp_path / "tiny"), vae=str(tmp_path / "kl"))
    with pytest.raises(TrainingError, match="weights.vae"):
        latent_loss_weights(TrainConfig(latent_loss_weight="pixel"), kl_cfg)
