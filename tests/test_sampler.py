"""The sampler: guidance arithmetic, batched vs separate guidance forwards, reference computed once
per clip, motion history carried between clips as latents, and output length / mp4 timing."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from core.sections import SamplerConfig
from inference.guidance import (
    CONDITIONS,
    combine_guidance,
    combine_stacked,
    guidance_switches,
    split_conditions,
    stack_conditions,
)
from inference.sampler import LoopySampler, num_clips

# --- helpers ----------------------------------------------------------------------------------------

def make_portrait(path: Path) -> Path:
    """A real face photo shipped with scikit-image, cut to a 300x260 portrait."""
    from PIL import Image
    from skimage import data

    Image.fromarray(data.astronaut()[20:280, 80:380]).save(path)
    return path


def make_audio(path: Path, seconds: float, rate: int = 22050) -> Path:
    """A non-silent test tone (stereo, 22.05 kHz) of ``seconds`` seconds."""
    subprocess.run(["sox", "-n", "-r", str(rate), "-c", "2", str(path), "synth", f"{seconds}",
                    "sine", "220-660", "tremolo", "4", "80"], check=True)
    return path


def probe_streams(path: Path) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                          "stream=codec_type,nb_read_frames,duration", "-of", "json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return {s["codec_type"]: s for s in json.loads(out)["streams"]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def core_sampler(tiny_package):
    """A sampler with the package's model only (no VAE / audio / face parts): the denoising loop."""
    from core.config import load_platform_config
    from models.loopy import LoopyModel

    cfg = load_platform_config(tiny_package / "platform.yaml")
    model = LoopyModel.from_pretrained(str(tiny_package / "loopy"))
    return LoopySampler(model, None, None, None, cfg, torch.device("cpu"))


@pytest.fixture(scope="module")
def full_sampler(tiny_package):
    return LoopySampler.from_package(tiny_package, device="cpu")


def random_inputs(sampler: LoopySampler, num_frames: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = sampler.model.config
    ref = torch.randn((1, 4, 8, 8), generator=g)
    feats = torch.randn((num_frames, cfg.audio_layers, cfg.audio_dim), generator=g)
    return ref, feats


# --- guidance ----------------------------------------------------------------------------------------

def test_guidance_combination_matches_hand_computation():
    e_audio = torch.tensor([1.0, 2.0, -1.0])
    e_ref = torch.tensor([0.5, 1.0, 0.0])
    e_base = torch.tensor([0.25, -1.0, 2.0])
    # a=5, r=3: 5*(e_audio-e_ref) + 3*(e_ref-e_base) + e_base, element by element
    expected = torch.tensor([5 * 0.5 + 3 * 0.25 + 0.25, 5 * 1.0 + 3 * 2.0 - 1.0, 5 * -1.0 + 3 * -2.0 + 2.0])
    assert torch.allclose(combine_guidance(e_audio, e_ref, e_base, 5.0, 3.0), expected)
    assert torch.allclose(combine_stacked(torch.cat([e_audio, e_ref, e_base]), 5.0, 3.0), expected)
    # ratios of 1 reduce to the fully conditioned prediction
    assert torch.allclose(combine_guidance(e_audio, e_ref, e_base, 1.0, 1.0), e_audio)
    with pytest.raises(ValueError):
        combine_guidance(e_audio, e_ref, e_base[:2])


def test_guidance_switches_and_stacking_order():
    assert CONDITIONS == ("audio", "ref", "base")
    sw = guidance_switches(2)
    assert sw.drop_audio.tolist() == [False, False, True, True, True, True]
    assert sw.drop_motion_cond.tolist() == [False, False, True, True, True, True]
    assert sw.drop_ref.tolist() == [False, False, False, False, True, True]
    assert sw.drop_motion_frames.tolist() == [False, False, False, False, True, True]
    x = torch.arange(4.0).reshape(2, 2)
    stacked = stack_conditions(x)
    assert stacked.shape == (6, 2)
    for part in split_conditions(stacked):
        assert torch.equal(part, x)


def test_batched_guidance_forward_equals_three_separate_forwards(core_sampler):
    s = core_sampler
    ref, feats = random_inputs(s, 12, seed=1)
    from pipelines.encoders.audio_features import audio_windows

    windows = audio_windows(feats, radius=s.audio_radius)
    generated = torch.randn(12, 4, 8, 8)
    motion, mask = s.motion_history(generated, 12, ref)  # some real history, some filled
    assert mask.any() and not mask.all()
    sw = guidance_switches(1)
    reference = s.reference_for_guidance(ref, motion, mask)
    x = torch.randn(1, s.clip_frames, 4, 8, 8)
    audio3 = stack_conditions(s.clip_audio(windows, 0))
    t = torch.tensor(500)
    with torch.no_grad():
        batched = s.guidance_forward(stack_conditions(x), t, reference, audio3, sw)
        separate = s.guidance_forward_separately(x, t, reference, audio3, sw)
        # and the plain model call per condition, with its own reference computation
        plain = []
        for i in range(3):
            r = s.model.compute_reference(ref, motion, mask, sw.drop_ref[i:i + 1], sw.drop_motion_frames[i:i + 1])
            a = audio3[i:i + 1]
            plain.append(s.model.denoise(x, t.reshape(1), r, a, {"audio": a}, torch.zeros(1, dtype=torch.long),
                                         sw.drop_audio[i:i + 1], sw.drop_motion_cond[i:i + 1]))
    assert batched.shape == (3, s.clip_frames, 4, 8, 8)
    assert torch.allclose(batched, separate, atol=1e-5, rtol=1e-4)
    assert torch.allclose(batched, torch.cat(plain), atol=1e-5, rtol=1e-4)
    # the three conditions really differ (the switches reach the model)
    e_audio, e_ref, e_base = split_conditions(batched)
    assert not torch.allclose(e_ref, e_base)


def test_reference_net_runs_once_per_clip_and_history_is_carried(core_sampler, monkeypatch):
    s = core_sampler
    n = 30  # 3 clips: 12 + 12 + 6
    ref, feats = random_inputs(s, n, seed=2)
    calls = []
    real = s.model.compute_reference

    def recording(ref_latent, motion_latents=None, motion_mask=None, *args, **kwargs):
        calls.append((motion_latents.clone(), motion_mask.clone()))
        return real(ref_latent, motion_latents, motion_mask, *args, **kwargs)

    monkeypatch.setattr(s.model, "compute_reference", recording)
    progress = []
    out = s.generate_latents(ref, feats, SamplerConfig(steps=3, seed=5), progress.append)
    assert out.shape == (n, 4, 8, 8)
    assert len(calls) == num_clips(n, s.clip_frames) == 3  # once per clip, not per step
    assert [p.clips_done for p in progress] == [1, 2, 3]
    assert [p.frames_done for p in progress] == [12, 24, 30]
    # clip 0: no history: every slot is the reference latent, mask False
    motion0, mask0 = calls[0]
    assert not mask0.any()
    assert torch.allclose(motion0[0], ref.expand_as(motion0[0]))
    # clip 1 and 2: the real slots are exactly the generated latents (no decode / re-encode)
    for clip, (motion, mask) in enumerate(calls[1:], start=1):
        start = clip * s.clip_frames
        idx = s.segment.source_indices(start)[:, 0]  # uniform abstraction: one source per slot
        real_slots = idx >= 0
        assert mask[0].numpy().tolist() == real_slots.tolist()
        assert real_slots.sum() > 0
        assert torch.equal(motion[0, torch.as_tensor(real_slots)], out[torch.as_tensor(idx[real_slots])])
        assert torch.allclose(motion[0, torch.as_tensor(~real_slots)], ref.expand(int((~real_slots).sum()), -1, -1, -1))
    # the newest slot of clip 1 is the last frame of clip 0
    assert torch.equal(calls[1][0][0, -1], out[11])


def test_output_length_for_several_lengths_and_determinism(core_sampler):
    s = core_sampler
    for n in (1, 13):
        ref, feats = random_inputs(s, n, seed=n)
        out = s.generate_latents(ref, feats, SamplerConfig(steps=2, seed=3))
        assert out.shape == (n, 4, 8, 8)
        assert torch.isfinite(out).all()
    ref, feats = random_inputs(s, 12, seed=9)
    a = s.generate_latents(ref, feats, SamplerConfig(steps=2, seed=3))
    b = s.generate_latents(ref, feats, SamplerConfig(steps=2, seed=3))
    c = s.generate_latents(ref, feats, SamplerConfig(steps=2, seed=4))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def denoise_on_every_path(s: LoopySampler, ref: torch.Tensor, feats) -> torch.Tensor:
    """One clip denoised with the reference cached, recomputed and in three separate guidance
    passes: asserts the three agree, returns the first."""
    from pipelines.encoders.audio_features import audio_windows

    audio = s.clip_audio(audio_windows(feats, radius=s.audio_radius), 0)
    motion, mask = s.motion_history(torch.zeros(12, 4, 8, 8), 0, ref)
    opts = SamplerConfig(steps=2, seed=1)
    cached = s.denoise_clip(ref, motion, mask, audio, opts, torch.Generator().manual_seed(0))
    again = s.denoise_clip(ref, motion, mask, audio, opts, torch.Generator().manual_seed(0), cache_reference=False)
    three = s.denoise_clip(ref, motion, mask, audio, opts, torch.Generator().manual_seed(0), batched=False)
    assert torch.allclose(cached, again, atol=1e-5)
    assert torch.allclose(cached, three, atol=1e-4, rtol=1e-4)
    return cached


def test_cached_reference_equals_recomputed_reference(core_sampler):
    ref, feats = random_inputs(core_sampler, 12, seed=4)
    denoise_on_every_path(core_sampler, ref, feats)


def test_reference_concat_model_samples_the_same_on_every_path_and_follows_its_reference(core_sampler):
    """model.reference_concat through the sampler: the batched three-way guidance, the separate
    passes and the uncached reference agree, and another reference latent gives another output."""
    from core.sections import ModelConfig
    from models.loopy import LoopyModel

    base = core_sampler.model
    config = {k: v for k, v in base.config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    stage1 = LoopyModel(**config | {"stage": 1, "reference_concat": True})
    stage1.reference_net.load_state_dict(base.reference_net.state_dict())
    model = LoopyModel.from_stage1(stage1, ModelConfig(reference_concat=True), None).eval()
    with torch.no_grad():
        model.denoise_unet.conv_in.weight[:, 4:].normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    s = LoopySampler(model, None, None, None, core_sampler.cfg, torch.device("cpu"))
    ref, feats = random_inputs(s, 12, seed=4)
    cached = denoise_on_every_path(s, ref, feats)
    other = denoise_on_every_path(s, -ref, feats)
    assert (other - cached).abs().max() > 1e-2


def test_reference_init_starts_from_the_noised_reference_and_skips_the_steps_above_it(core_sampler):
    """sampler.reference_init: the clip starts from the reference latent, repeated over its frames
    and noised to the first DDIM timestep at or below the share asked for, with the steps above
    it skipped; 0 (the paper's default) is pure noise and every step; out of [0, 1] is refused."""
    s = core_sampler
    ref = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    scheduler = s.make_scheduler(10)
    noise_only, all_steps = s.initial_latents(scheduler, ref, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(all_steps, scheduler.timesteps) and noise_only.shape == (2, s.clip_frames, 4, 8, 8)
    started, steps = s.initial_latents(scheduler, ref, 0.5, torch.Generator().manual_seed(1))
    assert steps.tolist() == [t for t in scheduler.timesteps.tolist() if t <= 500] and len(steps) < 10
    a = scheduler.alphas_cumprod[int(steps[0])]
    expected = a.sqrt() * ref[:, None] + (1 - a).sqrt() * noise_only  # the same draw of noise
    assert torch.allclose(started, expected, atol=1e-5)
    # low in the schedule the start is close to the reference; the loop runs from there
    near, _ = s.initial_latents(scheduler, ref, 0.05, torch.Generator().manual_seed(1))
    assert (near - ref[:, None]).std() < 0.35 * (noise_only - ref[:, None]).std()
    ref1, feats = random_inputs(s, 12, seed=4)
    out = s.generate_latents(ref1, feats, SamplerConfig(steps=4, seed=3, reference_init=0.6))
    assert out.shape == (12, 4, 8, 8) and torch.isfinite(out).all()
    assert not torch.allclose(out, s.generate_latents(ref1, feats, SamplerConfig(steps=4, seed=3)))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="sampler.reference_init"):
            SamplerConfig(reference_init=bad)


def test_noise_scale_scales_the_starting_noise_and_zero_makes_the_seed_irrelevant(core_sampler):
    """sampler.noise_scale: the starting noise (pure, or added to the reference) is the same draw
    times the scale; with 0 and a reference start every seed gives the same video (DDIM adds no
    noise after the start), with 1 (the paper's) seeds differ; out of [0, 1] is refused."""
    s = core_sampler
    ref = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    scheduler = s.make_scheduler(10)
    full, _ = s.initial_latents(scheduler, ref, 0.0, torch.Generator().manual_seed(1))
    half, _ = s.initial_latents(scheduler, ref, 0.0, torch.Generator().manual_seed(1), noise_scale=0.5)
    assert torch.allclose(half, 0.5 * full)
    started, steps = s.initial_latents(scheduler, ref, 0.5, torch.Generator().manual_seed(1), noise_scale=0.25)
    a = scheduler.alphas_cumprod[int(steps[0])]
    assert torch.allclose(started, a.sqrt() * ref[:, None] + (1 - a).sqrt() * 0.25 * full, atol=1e-5)
    ref1, feats = random_inputs(s, 12, seed=4)
    quiet = [s.generate_latents(ref1, feats, SamplerConfig(steps=4, seed=seed, reference_init=0.6, noise_scale=0.0))
             for seed in (3, 4)]
    assert torch.equal(quiet[0], quiet[1])
    loud = [s.generate_latents(ref1, feats, SamplerConfig(steps=4, seed=seed, reference_init=0.6)) for seed in (3, 4)]
    assert not torch.allclose(loud[0], loud[1])
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="sampler.noise_scale"):
            SamplerConfig(noise_scale=bad)


def test_guidance_rescale_pulls_the_guided_spread_back_to_the_conditioned_one(core_sampler, monkeypatch):
    """sampler.guidance_rescale: with 1 the guided prediction of each sample has the standard
    deviation of its fully conditioned prediction (e_audio); 0 leaves the paper's guidance as is."""
    import inference.sampler as sampler_module

    seen = []
    real = sampler_module.rescale_noise_cfg

    def spy(guided, conditioned, phi):
        out = real(guided, conditioned, phi)
        seen.append((guided.std(dim=(1, 2, 3, 4)), conditioned.std(dim=(1, 2, 3, 4)), out.std(dim=(1, 2, 3, 4)), phi))
        return out

    monkeypatch.setattr(sampler_module, "rescale_noise_cfg", spy)
    ref, feats = random_inputs(core_sampler, 12, seed=4)
    plain = core_sampler.generate_latents(ref, feats, SamplerConfig(steps=3, seed=3, audio_ratio=5, ref_ratio=3))
    assert seen == []
    rescaled = core_sampler.generate_latents(ref, feats, SamplerConfig(steps=3, seed=3, audio_ratio=5, ref_ratio=3,
                                                                       guidance_rescale=1.0))
    assert len(seen) == 3
    for guided_std, conditioned_std, out_std, phi in seen:
        assert phi == 1.0 and torch.allclose(out_std, conditioned_std, rtol=1e-4)
    assert not torch.allclose(plain, rescaled)
    with pytest.raises(ValueError, match="sampler.guidance_rescale"):
        SamplerConfig(guidance_rescale=2.0)


# --- end to end: image + audio file -> mp4 ----------------------------------------------------------

@pytest.mark.parametrize("seconds, container", [(0.3, "wav"), (1.03, "m4a")])
def test_generate_mp4_one_frame_per_40ms_with_audio(full_sampler, tmp_path, seconds, container):
    from pipelines.media.audio_decode import decode_audio

    image = make_portrait(tmp_path / "portrait.png")
    audio = make_audio(tmp_path / "speech.wav", seconds)
    if container != "wav":  # any common container / codec: AAC in MP4 at 44.1 kHz
        converted = tmp_path / f"speech.{container}"
        subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(audio), "-ar", "44100",
                        "-c:a", "aac", str(converted)], check=True)
        audio = converted
    decoded_s = decode_audio(audio).duration_s
    assert decoded_s == pytest.approx(seconds, abs=0.03)
    progress = []
    result = full_sampler.generate(image, audio, tmp_path / "out.mp4", SamplerConfig(steps=2), progress.append)
    expected = int(np.floor(decoded_s * 25 + 1e-6))  # one frame per whole 40 ms of audio
    assert result.num_frames == expected
    assert [p.clips_done for p in progress] == list(range(1, num_clips(expected, 12) + 1))
    streams = probe_streams(result.path)
    assert int(streams["video"]["nb_read_frames"]) == expected
    assert float(streams["video"]["duration"]) == pytest.approx(expected / 25, abs=1e-3)
    assert "audio" in streams
    assert float(streams["audio"]["duration"]) == pytest.approx(expected / 25, abs=0.03)


def test_portrait_without_face_is_refused(full_sampler, tmp_path):
    from inference.portrait import NoFaceError

    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    with pytest.raises(NoFaceError):
        full_sampler.prepare_portrait(noise)


def test_portrait_with_landmarks_found_earlier_skips_the_search_and_crops_the_same(full_sampler, tmp_path,
                                                                                     monkeypatch):
    """The service searches the face once (upload check) and hands the landmarks to the worker."""
    from inference.portrait import load_image

    image = load_image(make_portrait(tmp_path / "portrait.png"))
    cropper = full_sampler.portrait
    landmarks = cropper.landmarks(image)
    assert landmarks is not None and landmarks.shape == (68, 2)
    searched = cropper.crop(image)

    def no_search(*args, **kwargs):
        raise AssertionError("the face was searched again although its landmarks were given")

    monkeypatch.setattr(cropper, "landmarks", no_search)
    assert np.array_equal(cropper.crop(image, landmarks), searched)
    latent = full_sampler.prepare_portrait(image, landmarks)
    assert latent.shape[0] == 1
    h, w = image.shape[:2]
    for bad in (landmarks[:10], np.full((68, 2), np.nan), landmarks + [w, 0]):
        with pytest.raises(ValueError, match="landmarks"):
            cropper.crop(image, bad)


def test_audio_too_short_or_too_long_is_bad_input_naming_the_file(full_sampler, tmp_path):
    from inference.errors import BadInputError, InferenceError

    short = make_audio(tmp_path / "short.wav", 0.02)  # half a frame at 25 fps
    with pytest.raises(BadInputError, match="short.wav.*shorter than one frame"):
        full_sampler.prepare_audio(short, 25.0)
    long = make_audio(tmp_path / "long.wav", 2.0)
    with pytest.raises(BadInputError, match=r"long.wav.*longer than the limit of 1\.5 s") as err:
        full_sampler.prepare_audio(long, 25.0, max_audio_s=1.5)
    assert isinstance(err.value, InferenceError) and isinstance(err.value, ValueError)
    _, feats = full_sampler.prepare_audio(long, 25.0, max_audio_s=3.0)
    assert feats.shape[0] == 50


def test_cli_writes_video(tiny_package, tmp_path):
    import sys

    image = make_portrait(tmp_path / "p.jpg")
    audio = make_audio(tmp_path / "a.wav", 0.3)
    out = tmp_path / "cli.mp4"
    proc = subprocess.run([sys.executable, "-m", "inference.sample", "--image", str(image), "--audio", str(audio),
                           "--out", str(out), "--model", str(tiny_package), "--device", "cpu", "sampler.steps=2"],
                          capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(probe_streams(out)["video"]["nb_read_frames"]) == 7
    bad = subprocess.run([sys.executable, "-m", "inference.sample", "--image", str(tmp_path / "missing.png"),
                          "--audio", str(audio), "--out", str(out), "--model", str(tiny_package)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "missing.png" in bad.stderr
    too_short = subprocess.run([sys.executable, "-m", "inference.sample", "--image", str(image),
                                "--audio", str(make_audio(tmp_path / "tiny.wav", 0.02)), "--out", str(out),
                                "--model", str(tiny_package), "--device", "cpu"],
                               capture_output=True, text=True, timeout=180)
    assert too_short.returncode == 2 and "tiny.wav" in too_short.stderr and "Traceback" not in too_short.stderr


def test_cli_starts_from_the_package_sampler_section_and_applies_only_the_keys_it_is_given(tiny_package, tmp_path):
    """The CLI samples as the service does (the package's sampler section: what the model was
    trained and evaluated with), with the sampler keys of its own --config file and overrides on
    top; a key it is not given keeps the package's value."""
    import shutil
    import sys

    import yaml

    from inference.sample import given_sampler_keys

    package = tmp_path / "pkg"
    shutil.copytree(tiny_package, package)
    platform = yaml.safe_load((package / "platform.yaml").read_text())
    platform.setdefault("sampler", {})["fps"] = 10.0  # the package's rate: 0.3 s of audio -> 3 frames
    (package / "platform.yaml").write_text(yaml.safe_dump(platform))
    image, audio = make_portrait(tmp_path / "p.jpg"), make_audio(tmp_path / "a.wav", 0.3)
    for extra, frames in (([], 3), (["sampler.fps=25"], 7)):
        out = tmp_path / f"cli{frames}.mp4"
        proc = subprocess.run([sys.executable, "-m", "inference.sample", "--image", str(image), "--audio", str(audio),
                               "--out", str(out), "--model", str(package), "--device", "cpu", "sampler.steps=1",
                               *extra], capture_output=True, text=True, timeout=180,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert int(probe_streams(out)["video"]["nb_read_frames"]) == frames, extra

    config = tmp_path / "c.yaml"
    config.write_text("sampler:\n  seed: 4\ntrain:\n  lr: 0.1\n")
    assert given_sampler_keys(None, ["sampler.steps=3", "train.lr=1", "sampler.reference_init=0.2"]) == \
        {"steps", "reference_init"}
    assert given_sampler_keys(str(config), ["sampler.steps=3"]) == {"steps", "seed"}
    child = tmp_path / "child.yaml"  # a config that names a base file gets the base's sampler keys too
    child.write_text("base: c.yaml\nsampler:\n  fps: 12\n")
    assert given_sampler_keys(str(child), []) == {"seed", "fps"}
    assert given_sampler_keys(None, []) == set()


@pytest.mark.slow
def test_sampler_loads_a_registered_mlflow_model(tiny_package, tmp_path):
    import mlflow

    from inference.mlflow_model import log_model_package

    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    try:
        mlflow.set_tracking_uri(uri)
        exp = mlflow.create_experiment("sampler_test", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp):
            version = log_model_package(tiny_package, "loopy_sampler_test", stage=2, tracking_uri=uri)
        sampler = LoopySampler.from_package(f"models:/loopy_sampler_test/{version}", device="cpu",
                                            tracking_uri=uri)
        assert sampler.model.stage == 2 and sampler.clip_frames == 12
        with pytest.raises(FileNotFoundError, match="no_such_model"):
            LoopySampler.from_package("models:/no_such_model/1", device="cpu", tracking_uri=uri)
    finally:
        mlflow.set_tracking_uri(previous)


# --- issue 14: no boolean masks in SDPA, reference K/V cached per clip ------------------------------

def test_attend_without_mask_equals_boolean_masked_sdpa():
    """Grouping rows by mask pattern (unmasked SDPA over the kept keys) equals SDPA with the
    boolean mask, for mixed, all-True and single-pattern masks, with gradients."""
    from models.reference_attention import (
        AttentionProjections,
        attend,
        attention_mode,
        boolean_masks,
    )

    torch.manual_seed(0)
    attn = AttentionProjections(16, 2, zero_out=False)
    q = torch.randn(7, 5, 16, requires_grad=True)
    kv = torch.randn(7, 9, 16)
    masks = {
        "mixed": torch.rand(7, 9) > 0.4,
        "all": torch.ones(7, 9, dtype=torch.bool),
        "one pattern": torch.tensor([True] * 4 + [False] * 5).expand(7, 9),
    }
    masks["mixed"][:, 0] = True  # every row attends to at least one key
    masks["rows interleaved"] = masks["one pattern"].clone()
    masks["rows interleaved"][1::2, :6] = True  # groups that are not contiguous ranges of rows
    for name, mask in masks.items():
        with attention_mode("split"):  # the CUDA path, forced on CPU
            split = attend(attn, q, kv, mask)
        with boolean_masks():
            masked = attend(attn, q, kv, mask)
        assert torch.allclose(split, masked, atol=1e-6), name
        (g_split,) = torch.autograd.grad(split.square().sum(), q)
        (g_masked,) = torch.autograd.grad(masked.square().sum(), q)
        assert torch.allclose(g_split, g_masked, atol=1e-5), name
    # and the mask matters: masking keys changes the output
    assert not torch.allclose(attend(attn, q, kv, masks["mixed"]), attend(attn, q, kv))


def test_split_attention_and_cached_reference_kv_give_the_same_frames(core_sampler):
    """The guidance forward and a whole clip: split (unmasked) attention with the reference K/V
    projected once per clip == the computation before issue 14 (boolean masks over every row,
    reference K/V projected per frame in every call), with history partly real (mixed motion
    masks) and the base condition dropping the reference."""
    from models.reference_attention import attention_mode, boolean_masks
    from pipelines.encoders.audio_features import audio_windows

    s = core_sampler
    ref, feats = random_inputs(s, 12, seed=6)
    audio = s.clip_audio(audio_windows(feats, radius=s.audio_radius), 0)
    motion, mask = s.motion_history(torch.randn(12, 4, 8, 8), 12, ref)
    assert mask.any() and not mask.all()
    # give the untrained stage-2 modules non-zero outputs so every branch shows in eps
    model = s.model
    with torch.no_grad():
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if ".temporal." in name or "resnet_temporal" in name or ".audio." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    try:
        sw = guidance_switches(1)
        x = torch.randn(1, s.clip_frames, 4, 8, 8)
        audio3 = stack_conditions(audio)
        t = torch.tensor(700)
        with torch.no_grad():
            cached = s.reference_for_guidance(ref, motion, mask)
            assert cached.ref_kv is not None
            uncached = type(cached)(**{**cached.__dict__, "ref_kv": None})
            with boolean_masks():
                old = s.guidance_forward(stack_conditions(x), t, uncached, audio3, sw)
            for mode in ("split", "auto"):  # split: the CUDA path; auto on CPU: masked, K/V cached
                with attention_mode(mode):
                    new = s.guidance_forward(stack_conditions(x), t, cached, audio3, sw)
                    new_uncached = s.guidance_forward(stack_conditions(x), t, uncached, audio3, sw)
                assert torch.allclose(new, old, atol=1e-5, rtol=1e-4), mode
                assert torch.allclose(new_uncached, old, atol=1e-5, rtol=1e-4), mode
        e_audio, e_ref, e_base = split_conditions(new)
        assert not torch.allclose(e_audio, e_ref) and not torch.allclose(e_ref, e_base)

        opts = SamplerConfig(steps=3, seed=1)
        with attention_mode("split"):
            frames_new = s.denoise_clip(ref, motion, mask, audio, opts, torch.Generator().manual_seed(0))
        with boolean_masks():
            frames_old = s.denoise_clip(ref, motion, mask, audio, opts, torch.Generator().manual_seed(0),
                                        cache_reference=False)
        assert torch.allclose(frames_new, frames_old, atol=1e-4, rtol=1e-4)
    finally:
        model.load_state_dict(saved)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("mode", ["auto", "split"])
def test_every_parameter_gets_a_gradient_when_every_sample_drops_its_reference(core_sampler, mode, stage):
    """Split attention leaves dropped references and fully masked keys out of SDPA; they must still
    reach the graph (zero gradient, as through a masked key) or DDP without
    find_unused_parameters breaks on a batch whose samples all drop the reference (in stage 1
    nothing else connects the reference net to the loss)."""
    from models.loopy import LoopyModel
    from models.reference_attention import attention_mode

    if stage == 2:
        model = core_sampler.model
    else:
        torch.manual_seed(0)
        model = LoopyModel(**{k: v for k, v in core_sampler.model.config.items() if not k.startswith("_")} | {"stage": 1})
    b, f = 2, (core_sampler.clip_frames if stage == 2 else 1)
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    yes = torch.ones(b, dtype=torch.bool)
    batch = dict(noisy_latents=torch.randn((b, f, 4, 8, 8), generator=g), timesteps=torch.tensor([10, 900]),
                 ref_latent=torch.randn((b, 4, 8, 8), generator=g), drop_ref=yes, drop_motion_frames=yes)
    if stage == 2:
        batch.update(
            motion_latents=torch.randn((b, 20, 4, 8, 8), generator=g), motion_mask=torch.ones(b, 20, dtype=torch.bool),
            audio=torch.randn((b, f, cfg.audio_window, cfg.audio_layers, cfg.audio_dim), generator=g),
            landmarks=torch.rand((b, f, 68, 2), generator=g), head_motion_var=torch.rand((b,), generator=g),
            expression_var=torch.rand((b,), generator=g), a2l_kind=torch.tensor([1, 3]),
            drop_audio=~yes, drop_motion_cond=~yes)
    model.train()
    try:
        with attention_mode(mode):
            model.zero_grad(set_to_none=True)
            model(**batch).square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing[:5]
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
