"""The Loopy networks (models/loopy.py and its modules), tiny preset on CPU."""
from __future__ import annotations

import pytest
import torch

from core.sections import ModelConfig, ReaderConfig

B, F, M, H = 2, 4, 6, 8  # clips, clip frames, motion latents, latent side (tiny: 4x8x8)
L, D, W = 2, 32, 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stage1(tiny_weights):
    from models.loopy import LoopyModel

    _, paths = tiny_weights
    torch.manual_seed(0)
    return LoopyModel.from_sd15(paths.unet, ModelConfig(), ReaderConfig(), stage=1).eval()


@pytest.fixture(scope="module")
def stage2(stage1):
    from models.loopy import LoopyModel

    torch.manual_seed(1)
    return LoopyModel.from_stage1(stage1, ModelConfig(), ReaderConfig()).eval()


def make_batch(frames: int = F, batch: int = B, seed: int = 0, **switches) -> dict:
    g = torch.Generator().manual_seed(seed)
    off = torch.zeros(batch, dtype=torch.bool)
    out = dict(
        noisy_latents=torch.randn(batch, frames, 4, H, H, generator=g),
        timesteps=torch.randint(0, 1000, (batch,), generator=g),
        ref_latent=torch.randn(batch, 4, H, H, generator=g),
        motion_latents=torch.randn(batch, M, 4, H, H, generator=g),
        motion_mask=torch.ones(batch, M, dtype=torch.bool),
        audio=torch.randn(batch, frames, W, L, D, generator=g),
        landmarks=torch.rand(batch, frames, 68, 2, generator=g),
        head_motion_var=torch.rand(batch, generator=g) * 1e-3,
        expression_var=torch.rand(batch, generator=g) * 1e-3,
        drop_audio=off.clone(), drop_motion_cond=off.clone(), drop_ref=off.clone(),
        drop_motion_frames=off.clone(), a2l_kind=torch.arange(batch) % 4,
        clip_frame_indices=torch.zeros(batch, frames, dtype=torch.long),
    )
    out.update(switches)
    return out


def perturb_new_modules(model, scale: float = 0.5, seed: int = 3) -> None:
    """Give the zero-initialised stage-2 outputs non-zero weights (as after some training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".processor." in name or name.startswith(("audio_to_latents.out", "resnet_temporal.", "resnet_audio.")):
                if "to_out" in name or name.startswith("audio_to_latents.out"):
                    p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def trained_stage2(stage2):
    import copy

    model = copy.deepcopy(stage2)
    perturb_new_modules(model)
    return model


def test_shapes_through_every_path(stage1, trained_stage2):
    with torch.no_grad():
        eps1 = stage1(**make_batch(frames=1))
        assert eps1.shape == (B, 1, 4, H, H)
        batch = make_batch()
        eps2 = trained_stage2(**batch)
        assert eps2.shape == (B, F, 4, H, H)
        ref = trained_stage2.compute_reference(batch["ref_latent"], batch["motion_latents"], batch["motion_mask"])
        layer = trained_stage2.layer_names[0]
        assert ref.ref_tokens[layer].shape[0] == B and ref.motion_tokens[layer].shape[:2] == (B, M)
        # no motion latents, no audio, no audio-to-latents inputs: still a valid call
        ref0 = trained_stage2.compute_reference(batch["ref_latent"])
        eps = trained_stage2.denoise(batch["noisy_latents"], batch["timesteps"], ref0)
        assert eps.shape == (B, F, 4, H, H) and torch.isfinite(eps).all()
        with pytest.raises(ValueError, match="one frame"):
            stage1(**make_batch(frames=2))
        with pytest.raises(ValueError, match="audio is"):
            trained_stage2(**dict(batch, audio=torch.zeros(B, F, W, L + 1, D)))
        with pytest.raises(ValueError, match="'landmarks'"):
            trained_stage2(**dict(batch, landmarks=torch.zeros(B, F, 60, 2)))
        with pytest.raises(ValueError, match="latent positions"):
            trained_stage2.denoise(torch.zeros(B, F, 4, 2 * H, 2 * H), batch["timesteps"], ref0)


def test_compute_reference_then_denoise_equals_forward(trained_stage2):
    """compute_reference once, denoise at two steps with the cached features = forward each time."""
    batch = make_batch(drop_motion_frames=torch.tensor([False, True]))
    a2l = {k: batch[k] for k in ("audio", "landmarks", "head_motion_var", "expression_var")}
    with torch.no_grad():
        ref = trained_stage2.compute_reference(batch["ref_latent"], batch["motion_latents"], batch["motion_mask"],
                                               batch["drop_ref"], batch["drop_motion_frames"])
        for t in (torch.tensor([10, 10]), torch.tensor([700, 300])):
            eps = trained_stage2.denoise(batch["noisy_latents"], t, ref, batch["audio"], a2l,
                                         batch["a2l_kind"], batch["drop_audio"], batch["drop_motion_cond"])
            full = trained_stage2(**dict(batch, timesteps=t))
            torch.testing.assert_close(eps, full, rtol=0, atol=1e-6)


def test_reference_features_do_not_depend_on_timestep(trained_stage2):
    """The reference net always runs at t = 0: the same features whatever the denoising step."""
    batch = make_batch()
    seen = []

    def capture(module, args, kwargs):
        seen.append(args[1].clone())

    handle = trained_stage2.reference_net.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            trained_stage2(**dict(batch, timesteps=torch.tensor([5, 5])))
            trained_stage2(**dict(batch, timesteps=torch.tensor([900, 900])))
    finally:
        handle.remove()
    assert all(bool((t == 0).all()) for t in seen)
    with torch.no_grad():
        r1 = trained_stage2.compute_reference(batch["ref_latent"], batch["motion_latents"], batch["motion_mask"])
        r2 = trained_stage2.compute_reference(batch["ref_latent"], batch["motion_latents"], batch["motion_mask"])
    for k in r1.ref_tokens:
        assert torch.equal(r1.ref_tokens[k], r2.ref_tokens[k])
        assert torch.equal(r1.motion_tokens[k], r2.motion_tokens[k])


@pytest.mark.parametrize("switch", ["drop_ref", "drop_motion_frames", "drop_audio", "drop_motion_cond"])
def test_switches_change_output_per_sample(trained_stage2, switch):
    base = make_batch()
    flipped = dict(base, **{switch: torch.tensor([False, True])})
    with torch.no_grad():
        a = trained_stage2(**base)
        b = trained_stage2(**flipped)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)  # sample 0 untouched
    assert (a[1] - b[1]).abs().max() > 1e-4  # sample 1 changed


def test_residual_block_temporal_layers_use_motion_frames(stage2):
    """The temporal layers after the attention-free blocks' residual blocks alone (everything else
    fresh) make the output depend on the motion frames; checkpointing stays off in those blocks."""
    import copy

    model = copy.deepcopy(stage2)
    assert model.resnet_sites and set(model.resnet_temporal.keys()) == {s.replace(".", "_") for s in model.resnet_sites}
    with torch.no_grad():
        for name, p in model.resnet_temporal.named_parameters():
            if "to_out" in name:
                p.normal_(0, 0.5)
    base = make_batch()
    with torch.no_grad():
        a = model(**base)
        b = model(**dict(base, drop_motion_frames=torch.tensor([False, True])))
        c = stage2(**base)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)
    assert (a[1] - b[1]).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4
    model.enable_gradient_checkpointing()
    for site in model.resnet_sites:
        assert not model.denoise_unet.get_submodule(site.rsplit(".resnets.", 1)[0]).gradient_checkpointing
    assert model.denoise_unet.down_blocks[0].gradient_checkpointing
    assert not model.denoise_unet.down_blocks[-1].resnets[0]._forward_hooks  # hooks live for one call only


def test_audio_reaches_the_blocks_without_attention(stage2):
    """The audio cross-attention after the attention-free blocks' residual blocks alone (every
    other audio path fresh, i.e. zero) makes the output depend on the audio, and the loss's
    gradient reaches the audio input through them."""
    import copy

    model = copy.deepcopy(stage2)
    assert set(model.resnet_audio.keys()) == {s.replace(".", "_") for s in model.resnet_sites}
    with torch.no_grad():
        for name, p in model.resnet_audio.named_parameters():
            if "to_out" in name:
                p.normal_(0, 0.5)
    base = make_batch()
    with torch.no_grad():
        a = model(**base)
        b = model(**dict(base, drop_audio=torch.tensor([False, True])))
        c = model(**dict(base, audio=make_batch(seed=7)["audio"]))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)
    assert (a[1] - b[1]).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4
    # fresh stage 2: the zero-initialised outputs leave the audio without any effect
    with torch.no_grad():
        torch.testing.assert_close(stage2(**base), stage2(**dict(base, audio=make_batch(seed=7)["audio"])),
                                   rtol=0, atol=1e-6)
    # gradient: only the residual-block audio path is open, so it carries all of d loss / d audio
    audio = base["audio"].clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    model(**dict(base, audio=audio)).square().mean().backward()
    assert audio.grad is not None and audio.grad.abs().max() > 0
    for name, p in model.resnet_audio.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_masking_is_per_sample_not_per_batch(trained_stage2):
    """Sample 0 in a batch where only sample 1 drops its reference = sample 0 alone."""
    batch = make_batch(drop_ref=torch.tensor([False, True]), drop_motion_frames=torch.tensor([False, True]))
    alone = {k: (v[:1] if torch.is_tensor(v) else v) for k, v in batch.items()}
    with torch.no_grad():
        both = trained_stage2(**batch)
        single = trained_stage2(**alone)
    torch.testing.assert_close(both[:1], single, rtol=0, atol=1e-5)


def test_every_trainable_parameter_gets_a_gradient(stage2):
    """DDP without find_unused_parameters: one step with every switch on for all samples still
    reaches every parameter with requires_grad (the reference net's unused tail is frozen)."""
    import copy

    model = copy.deepcopy(stage2).train()
    on = torch.ones(B, dtype=torch.bool)
    for switches in ({}, dict(drop_ref=on, drop_motion_frames=on, drop_audio=on, drop_motion_cond=on)):
        model.zero_grad(set_to_none=True)
        model(**make_batch(**switches)).square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing[:10]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("reference_net.") for n in frozen)
    assert any("conv_out" in n for n in frozen)


def test_ddp_without_find_unused_parameters(stage2, tmp_path):
    """Two DDP steps (gloo, world size 1, find_unused_parameters=False) with every switch on:
    DDP raises on the second step if a parameter it tracks got no gradient in the first."""
    import copy

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(copy.deepcopy(stage2).train(), find_unused_parameters=False)
        on = torch.ones(B, dtype=torch.bool)
        for _ in range(2):
            batch = make_batch(drop_ref=on, drop_motion_frames=on, drop_audio=on, drop_motion_cond=on)
            ddp(**batch).square().mean().backward()
    finally:
        dist.destroy_process_group()


def test_fresh_stage2_equals_stage1(stage1, stage2):
    """Zero-initialised temporal/audio outputs: a fresh stage-2 model on a clip of F frames (with
    motion frames and audio) = the stage-1 model run on each frame alone."""
    batch = make_batch(frames=F)
    with torch.no_grad():
        eps2 = stage2(**batch)
        per_frame = stage1(noisy_latents=batch["noisy_latents"].reshape(B * F, 1, 4, H, H),
                           timesteps=batch["timesteps"].repeat_interleave(F),
                           ref_latent=batch["ref_latent"].repeat_interleave(F, dim=0))
    torch.testing.assert_close(eps2.reshape(B * F, 1, 4, H, H), per_frame, rtol=0, atol=1e-5)
    assert eps2.abs().max() > 1e-3


def test_stage1_to_stage2_weight_transfer(stage1, stage2):
    s1, s2 = stage1.state_dict(), stage2.state_dict()
    for k, v in s1.items():
        assert torch.equal(v, s2[k]), k
    new = [k for k in s2 if k not in s1]
    assert new and all(".processor." in k or k.startswith(("audio_projection.", "audio_to_latents.",
                                                           "resnet_temporal.", "resnet_audio.")) for k in new)
    assert any(k.startswith("resnet_temporal.") for k in new)
    assert any(k.startswith("resnet_audio.") for k in new)
    assert stage2.stage == 2 and stage1.stage == 1


def test_from_sd15_loads_the_sd_unet_into_both_nets(tiny_weights, stage1):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_weights[1].unet)
    for k, v in unet.state_dict().items():
        assert torch.equal(stage1.reference_net.state_dict()[k], v)
        assert torch.equal(stage1.denoise_unet.state_dict()[k], v)


def test_save_load_round_trip_bit_exact(trained_stage2, tmp_path):
    from models.loopy import LoopyModel

    trained_stage2.save_pretrained(tmp_path / "loopy")
    assert (tmp_path / "loopy" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = LoopyModel.from_pretrained(tmp_path / "loopy").eval()
    a, b = trained_stage2.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(trained_stage2(**batch), loaded(**batch))
    assert [n for n, p in loaded.named_parameters() if not p.requires_grad] == \
        [n for n, p in trained_stage2.named_parameters() if not p.requires_grad]


def test_gradient_checkpointing_same_gradients(stage2):
    import copy

    plain = copy.deepcopy(stage2).train()
    perturb_new_modules(plain)
    ckpt = copy.deepcopy(plain)
    ckpt.enable_gradient_checkpointing()
    batch = make_batch()
    plain(**batch).square().mean().backward()
    ckpt(**batch).square().mean().backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_bfloat16_forward(stage2):
    import copy

    model = copy.deepcopy(stage2).to(torch.bfloat16)
    with torch.no_grad():
        eps = model(**make_batch())
    assert eps.dtype == torch.bfloat16 and torch.isfinite(eps.float()).all()


def test_tiny_model_overfits_one_sample(stage2):
    """30 AdamW steps on one fixed (noisy latent, timestep) sample: the loss falls by >= 5x."""
    import copy

    torch.manual_seed(0)
    model = copy.deepcopy(stage2).train()
    batch = make_batch(frames=2, batch=1)
    noise = torch.randn(1, 2, 4, H, H, generator=torch.Generator().manual_seed(7))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        loss = (model(**batch) - noise).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, losses


def test_reference_concat_starts_as_the_paper_model_and_carries_the_reference_by_position(tiny_weights, stage1,
                                                                                           tmp_path):
    """model.reference_concat: conv_in takes [noisy ; reference latent], its reference half zero at
    the start (same output as without); once trained, the output follows the reference latent,
    except where the reference is dropped; stage 2 and a saved package keep it."""
    from models.errors import IncompatibleWeightsError
    from models.loopy import LoopyModel

    _, paths = tiny_weights
    torch.manual_seed(0)
    concat1 = LoopyModel.from_sd15(paths.unet, ModelConfig(reference_concat=True), ReaderConfig(), stage=1).eval()
    assert concat1.denoise_unet.conv_in.in_channels == 8 and concat1.denoise_unet.conv_out.out_channels == 4
    batch = make_batch(frames=1)
    with torch.no_grad():
        torch.testing.assert_close(concat1(**batch), stage1(**batch))
        concat1.denoise_unet.conv_in.weight[:, 4:].normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
        base = concat1(**batch)
        other_ref = dict(batch, ref_latent=batch["ref_latent"].flip(0))
        moved = (concat1(**other_ref) - base).abs().amax(dim=(1, 2, 3, 4))
        assert bool((moved > 1e-3).all())
        dropped = torch.ones(B, dtype=torch.bool)
        torch.testing.assert_close(concat1(**dict(batch, drop_ref=dropped)), concat1(**dict(other_ref, drop_ref=dropped)))

    concat2 = LoopyModel.from_stage1(concat1, ModelConfig(reference_concat=True), ReaderConfig()).eval()
    torch.testing.assert_close(concat2.denoise_unet.conv_in.weight, concat1.denoise_unet.conv_in.weight)
    with pytest.raises(IncompatibleWeightsError, match="reference_concat"):
        LoopyModel.from_stage1(concat1, ModelConfig(reference_concat=False), ReaderConfig())
    concat2.save_pretrained(tmp_path / "loopy")
    loaded = LoopyModel.from_pretrained(str(tmp_path / "loopy")).eval()
    batch2 = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch2), concat2(**batch2), rtol=0, atol=0)
