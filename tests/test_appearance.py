"""The reader's appearance augmentation (pipelines/reader/appearance.py) and the latent colour map
it recolours cached latents with (pipelines/encoders/latents.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.sections import ReaderConfig
from pipelines.dataset.schema import META_NAME, IngestFormatError
from pipelines.encoders.latents import LatentColourMap, fit_colour_map
from pipelines.faces.landmarks import MIRROR_ORDER, mirror_landmarks
from pipelines.reader.appearance import AppearanceChange, change_latents, draw_change, hue_rotation, saturation_scale
from pipelines.reader.source import LoopySampleSource
from pipelines.samples.identities import source_photo
from pipelines.samples.synthetic_ingest import synthetic_colour_map, write_synthetic_ingest


def test_hue_rotation_turns_primaries_and_keeps_grey():
    r = hue_rotation(120.0)
    assert np.allclose(r @ np.array([1.0, 0, 0]), [0, 1.0, 0], atol=1e-9)
    assert np.allclose(r @ np.ones(3), np.ones(3))
    assert np.allclose(hue_rotation(0.0), np.eye(3))
    assert np.allclose(saturation_scale(0.0) @ np.array([1.0, 0, 0]), np.full(3, 1 / 3))


def test_mirror_order_swaps_sides_and_is_its_own_inverse():
    order = np.array(MIRROR_ORDER)
    assert np.array_equal(order[order], np.arange(68))
    assert order[36] == 45 and order[48] == 54 and order[8] == 8 and order[30] == 30
    lm = source_photo("astronaut").landmarks / 512.0  # a real frontal face, 0..1
    assert (lm[36, 0] < lm[45, 0]) and (lm[0, 0] < lm[16, 0])
    flipped = mirror_landmarks(lm)
    assert np.allclose(mirror_landmarks(flipped), lm)
    # after the flip, point 36 (outer corner of the image-left eye) is again on the image left
    assert (flipped[36, 0] < flipped[45, 0]) and (flipped[0, 0] < flipped[16, 0])
    assert np.allclose(flipped[8], [1 - lm[8, 0], lm[8, 1]])  # the chin stays the chin


def test_recolour_moves_the_colour_the_map_reads_and_nothing_else():
    cmap = synthetic_colour_map(4)  # colour = channels 0..2
    rng = np.random.default_rng(0)
    z = rng.standard_normal((5, 4, 8, 8)).astype(np.float32)
    m = hue_rotation(90.0) * 1.1
    offset = np.array([0.1, 0.1, 0.1])
    out = cmap.recolour(z, m, offset)
    want = np.einsum("ij,njhw->nihw", m, z[:, :3]) + offset[None, :, None, None]
    assert np.allclose(out[:, :3], want, atol=1e-5) and np.allclose(out[:, 3], z[:, 3])
    flipped = change_latents(z, AppearanceChange(np.eye(3), np.zeros(3), True), cmap)
    assert np.allclose(flipped, z[..., ::-1])


class LinearCodec:
    """A stand-in VAE whose latent is a known affine function of the block colour (plus a fourth
    channel of structure), to check that fit_colour_map recovers it."""

    downsample = 8
    w = np.array([[0.5, 0.2, -0.1], [0.0, 0.7, 0.3], [-0.4, 0.1, 0.6], [0.0, 0.0, 0.0]])
    b = np.array([0.1, -0.2, 0.05, 0.3])

    def encode(self, frames: np.ndarray) -> np.ndarray:
        n, s = frames.shape[0], frames.shape[1]
        rgb = frames.astype(np.float64).reshape(n, s // 8, 8, s // 8, 8, 3).mean(axis=(2, 4)) / 127.5 - 1
        z = rgb @ self.w.T + self.b
        return np.moveaxis(z, -1, 1).astype(np.float16)


def test_fit_colour_map_recovers_a_linear_vae():
    cmap = fit_colour_map(LinearCodec(), size=64, count=24)
    assert cmap.r2_encode > 0.99
    assert np.allclose(cmap.encode[:3, :3], LinearCodec.w[:3], atol=0.02)
    assert cmap.decode.shape == (3, 5) and cmap.encode.shape == (4, 4)
    again = LatentColourMap.from_dict(json.loads(json.dumps(cmap.to_dict())))
    assert np.allclose(again.encode, cmap.encode, atol=1e-5)
    with pytest.raises(ValueError, match="decode"):
        LatentColourMap.from_dict({"decode": [[0.0] * 4] * 3, "encode": [[0.0] * 4] * 4})


def test_draw_change_respects_the_switches():
    rng = np.random.default_rng(0)
    assert draw_change(rng, ReaderConfig(appearance_aug=False)) is None
    assert draw_change(rng, ReaderConfig(aug_prob=0.0)) is None
    changes = [draw_change(rng, ReaderConfig(aug_prob=1.0, aug_flip_prob=0.5)) for _ in range(200)]
    assert all(c is not None for c in changes)
    assert 60 < sum(c.flip for c in changes) < 140
    grey = np.ones(3) * 0.3  # a grey stays grey under hue / saturation; contrast and brightness move it
    moved = [c.matrix @ grey + c.offset for c in changes]
    assert all(np.allclose(v, v[0]) for v in moved)


@pytest.fixture(scope="module")
def still_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("still")
    write_synthetic_ingest(out, num_frames=(60, 60, 60), splits=("train", "train", "test"), num_rejected=0,
                           content="still")
    return out


def _affine_from(before: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(M [3, 3], offset [3], max residual) with after[:3] ~= M @ before[:3] + offset at every position."""
    x = np.moveaxis(before[..., :3, :, :], -3, -1).reshape(-1, 3)
    y = np.moveaxis(after[..., :3, :, :], -3, -1).reshape(-1, 3)
    xa = np.concatenate([x, np.ones((len(x), 1))], 1)
    coef, *_ = np.linalg.lstsq(xa, y, rcond=None)
    return coef[:3].T, coef[3], float(np.abs(xa @ coef - y).max())


@pytest.mark.parametrize("stage", [1, 2])
def test_one_change_for_reference_clip_and_motion_frames(still_dir, stage):
    plain = LoopySampleSource(still_dir, ReaderConfig(stage=stage, appearance_aug=False, motion_frames=28), "train")
    aug = LoopySampleSource(still_dir, ReaderConfig(stage=stage, aug_prob=1.0, motion_frames=28), "train")
    specs = plain.epoch_specs(0)
    flips = 0
    for spec in specs[:6]:
        a, b = plain.load(spec), aug.load(spec)
        assert np.array_equal(aug.load(spec)["ref_latent"], b["ref_latent"])  # deterministic per sample
        # flipped or not: whichever way the reference is an affine recolouring of the plain one
        flip = _affine_from(a["ref_latent"], b["ref_latent"][..., ::-1])[2] < _affine_from(a["ref_latent"], b["ref_latent"])[2]
        flips += flip
        if flip:  # undo the flip, then every frame follows the reference's colour change
            assert np.allclose(b["landmarks"], mirror_landmarks(a["landmarks"]), atol=1e-6)
            b = {k: (v[..., ::-1] if k in ("latents", "ref_latent", "motion_latents") else v) for k, v in b.items()}
        else:
            assert np.array_equal(b["landmarks"], a["landmarks"])
        m, off, resid = _affine_from(a["ref_latent"], b["ref_latent"])
        assert resid < 2e-2  # float16 storage
        assert not np.allclose(m, np.eye(3), atol=1e-3) or not np.allclose(off, 0, atol=1e-3)
        for key in ("latents", "motion_latents"):
            if key not in a:
                continue
            got = np.einsum("ij,...jhw->...ihw", m, a[key][..., :3, :, :]) + off[:, None, None]
            assert np.allclose(b[key][..., :3, :, :], got, atol=2e-2), key
            assert np.allclose(b[key][..., 3, :, :], a[key][..., 3, :, :], atol=1e-2)
    assert 0 < flips < 6 or len(specs) < 6
    evaluation = LoopySampleSource(still_dir, ReaderConfig(stage=stage, aug_prob=1.0, motion_frames=28), "test")
    reference = LoopySampleSource(still_dir, ReaderConfig(stage=stage, appearance_aug=False, motion_frames=28), "test")
    spec = reference.epoch_specs(0)[0]
    assert np.array_equal(evaluation.load(spec)["latents"], reference.load(spec)["latents"])  # never on evaluation


def test_a_dataset_without_a_colour_map_is_refused_by_name(tmp_path):
    write_synthetic_ingest(tmp_path, num_frames=(40,), num_rejected=0)
    meta = json.loads((tmp_path / META_NAME).read_text())
    meta.pop("latent_rgb_map")
    (tmp_path / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(IngestFormatError, match="reader.appearance_aug"):
        LoopySampleSource(tmp_path, ReaderConfig(), "train")
    LoopySampleSource(tmp_path, ReaderConfig(appearance_aug=False), "train")  # works without it


def _with_vae(data_dir, vae: str, r2_decode: float) -> None:
    """Point a synthetic dataset's meta at a VAE and give its colour map the fit quality ``r2_decode``."""
    meta = json.loads((data_dir / META_NAME).read_text())
    meta["weights"]["vae"] = vae
    meta["latent_rgb_map"]["r2_decode"] = r2_decode
    (data_dir / META_NAME).write_text(json.dumps(meta))


def test_pixel_space_goes_through_the_datasets_vae(tmp_path, tiny_weights):
    """``auto`` picks pixels for a VAE whose colour map is poor: every latent of the sample is
    decoded, changed and encoded again by that VAE (so a flip of the frames is a flip of what the
    VAE encodes), and a VAE that cannot be loaded is refused naming the setting."""
    from pipelines.encoders.latents import LatentCodec
    from pipelines.reader.appearance import change_frames

    write_synthetic_ingest(tmp_path, num_frames=(60,), num_rejected=0, content="still")
    _, paths = tiny_weights
    _with_vae(tmp_path, paths.vae, r2_decode=0.2)
    cfg = ReaderConfig(stage=1, aug_prob=1.0, aug_flip_prob=1.0, aug_hue_deg=0.0, aug_saturation=0.0,
                       aug_brightness=0.0, aug_contrast=0.0)  # a pure flip
    source = LoopySampleSource(tmp_path, cfg, "train")
    assert source.codec is not None
    plain = LoopySampleSource(tmp_path, ReaderConfig(stage=1, appearance_aug=False), "train")
    spec = plain.epoch_specs(0)[0]
    a, b = plain.load(spec), source.load(spec)
    codec = LatentCodec(paths.vae)
    want = codec.encode(change_frames(codec.decode(a["ref_latent"][None]), source_change(cfg))).astype(np.float32)[0]
    assert np.allclose(b["ref_latent"], want, atol=2e-2)
    assert not np.allclose(b["ref_latent"], a["ref_latent"], atol=1e-2)
    assert LoopySampleSource(tmp_path, ReaderConfig(stage=1, appearance_space="latent"), "train").codec is None
    _with_vae(tmp_path, str(tmp_path / "no_vae_here"), r2_decode=0.2)
    with pytest.raises(IngestFormatError, match="reader.appearance_space"):
        LoopySampleSource(tmp_path, cfg, "train")


def source_change(cfg: ReaderConfig) -> AppearanceChange:
    """The change ``cfg`` always draws when every range is 0 and both probabilities are 1."""
    change = draw_change(np.random.default_rng(0), cfg)
    assert np.allclose(change.matrix, np.eye(3)) and np.allclose(change.offset, 0) and change.flip
    return change
