"""Fit the tiny preset's VAE to the faces of a folder of videos (``loopy-fit-vae``).

The tiny preset's random AutoencoderKL (``core.weights.tiny_vae_config``) decodes anything to
coloured noise, so nothing a tiny model generates can look like a face. This command fits a codec
on the face crops the ingest would cut from the videos and writes it with ``save_pretrained``;
the tiny preset then uses it through ``weights.vae=DIR`` (``core.weights.resolve_weights``, which
also gives the tiny preset a U-Net with the codec's latent channels), so ingest, training, the
sampler and the model package all go through the usual ``from_pretrained`` path.

Two kinds (``--codec``):

* ``patch`` (default): :class:`core.patch_codec.PatchCodec`, the principal components of the
  8 x 8 patches of the crops (48 of 192 per patch: latents [48, S/8, S/8]), whitened. Fitted in
  seconds by one SVD. It generalises to faces it never saw, because its basis describes patches,
  not faces: on the sample data's three test people (64 px crops) it measured 35-38 dB with dlib
  finding the face in every decoded crop, where the KL-VAE below reached 14-17 dB and lost the
  face of two of them (docs/EVALUATION.md).
* ``kl``: the tiny ``AutoencoderKL`` architecture trained for a short while (latents [4, S/8, S/8]).
  Kept for comparison and for users who want SD's codec family; it learns the training faces,
  not faces in general.

Data: every video under ``--samples`` is decoded at 25 fps (``pipelines.media.video_decode``), faces
are found with dlib on every ``detect_every``-th frame, the crop track is planned and the crops
cut exactly as the ingest does (``pipelines.faces.crop``: ``ingest.crop_margin``, ``ingest.crop_size``
from the config). The last ``holdout_fraction`` of each video's frames are held out: the PSNR
this command reports (and writes to ``fit_vae.json``) is measured on them.

Patch fitting (**ours**): the crops of the training frames plus as many jittered crops (below),
each also mirrored; their patches' mean and principal components (float64 SVD), and each
component's standard deviation as the latent scale (``PatchCodec.fit``).

KL training (**ours**, a short SD-style VAE fit without the adversarial / perceptual terms):
MSE of the reconstruction of a posterior sample on images in [-1, 1], plus ``kl_weight`` x KL;
Adam with a cosine decay; each batch cuts its crops with a small random jitter of the crop box
(shift and scale up to ``jitter`` of its side), so a portrait cropped a little differently at
inference is reconstructed as well. After fitting, ``scaling_factor`` is set to 1 / std of the
posterior means of the training crops (SD's rule: latents of unit variance for the diffusion
model), and saved in the VAE's ``config.json``.

Cache: ``OUT/fit_vae.json`` records a key of the inputs (each video's name, size and a hash of
its first and last MiB, the crop settings, the fitting settings, the architecture); a rerun with
the same key returns at once.

CLI: ``python -m training.fit_vae --samples DIR --out DIR [--steps N] [--config FILE] [overrides]``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from core.config import load_platform_config
from core.patch_codec import PatchCodec
from core.weights import tiny_vae_config
from pipelines.faces.crop import crop_frames, plan_crop_track
from pipelines.faces.detect import make_detector
from pipelines.media.video_decode import iter_frames
from pipelines.metrics.video_metrics import psnr
from training.errors import TrainingError

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi")
RECORD_NAME = "fit_vae.json"
FIT_VERSION = 2  # bump when the fitting procedure changes: invalidates every cache


class VaeFitError(TrainingError, ValueError):
    """The videos give nothing to fit on (no video, no face); the message names the folder."""


@dataclass(frozen=True)
class FitSettings:
    """How long and how the VAE is fitted (the CLI's options; not a platform config section)."""

    codec: str = "patch"  # "patch" (PatchCodec, PCA) or "kl" (AutoencoderKL, trained)
    patch_size: int = 8  # patch codec: pixels per latent along a side (SD's VAE: 8)
    latent_channels: int = 48  # patch codec: components kept of 3 x patch_size^2
    steps: int = 600  # kl: optimizer steps (measured, 64 px crops: 21.7 dB at 100, 25.7 at 200, 27.9 at 400)
    batch_size: int = 8  # crops per step (0.22 CPU s per step on one core)
    lr: float = 2e-3  # Adam, cosine-decayed to 5 % over the steps
    kl_weight: float = 1e-6
    jitter: float = 0.04  # crop-box shift / scale jitter, fraction of the side
    detect_every: int = 3  # dlib runs on every n-th frame; the crop track interpolates the rest
    holdout_fraction: float = 0.15  # last share of each video's frames: held out for the PSNR
    seed: int = 0
    threads: int = 2  # torch intra-op threads


@dataclass
class FaceFrames:
    """Full frames of the videos with their planned crop boxes (what the ingest would cut).

    ``frames``: per video uint8 [n, H, W, 3]; ``boxes``: per video float32 [n, 4] (x0, y0, x1, y1
    pixels); ``names``: the video file names."""

    frames: list[np.ndarray]
    boxes: list[np.ndarray]
    names: list[str]

    def split(self, holdout_fraction: float) -> tuple["FaceFrames", "FaceFrames"]:
        """(train, held out): the last ``holdout_fraction`` of each video's frames held out."""
        train, held = FaceFrames([], [], []), FaceFrames([], [], [])
        for f, b, name in zip(self.frames, self.boxes, self.names):
            cut = max(1, int(round(len(f) * (1.0 - holdout_fraction))))
            for part, sl in ((train, slice(0, cut)), (held, slice(cut, None))):
                if len(f[sl]):
                    part.frames.append(f[sl])
                    part.boxes.append(b[sl])
                    part.names.append(name)
        return train, held

    def crops(self, size: int) -> np.ndarray:
        """All crops at the planned boxes: uint8 [N, size, size, 3]."""
        return np.concatenate([crop_frames(f, b, size) for f, b in zip(self.frames, self.boxes)])


def find_videos(samples: Path) -> list[Path]:
    """The videos under ``samples``, name order. Raises :class:`VaeFitError` when there are none."""
    videos = sorted(p for p in Path(samples).rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise VaeFitError(f"no video ({', '.join(VIDEO_SUFFIXES)}) under {samples}")
    return videos


def load_face_frames(videos: Sequence[Path], crop_margin: float, detect_every: int = 3,
                     fps: float = 25.0, detect_max_side: int = 480) -> FaceFrames:
    """Decode each video at ``fps``, find the face on every ``detect_every``-th frame (dlib) and
    plan the ingest's crop track. Videos without any face are skipped; none at all is an error."""
    detector = make_detector("dlib", detect_max_side=detect_max_side)
    out = FaceFrames([], [], [])
    for path in videos:
        frames = np.concatenate([c.frames for c in iter_frames(path, fps=fps, chunk_frames=50)])
        n = len(frames)
        landmarks = np.full((n, 68, 2), np.nan, dtype=np.float32)
        found = np.zeros(n, dtype=bool)
        picked = np.arange(0, n, max(1, detect_every))
        lm, ok = detector.detect(frames[picked])
        landmarks[picked], found[picked] = lm, ok
        if not found.any():
            continue
        track = plan_crop_track(landmarks, found, (frames.shape[2], frames.shape[1]), crop_margin, fps=fps)
        out.frames.append(frames)
        out.boxes.append(track.boxes)
        out.names.append(path.name)
    if not out.frames:
        raise VaeFitError(f"no face found in any of the {len(videos)} videos under {Path(videos[0]).parent}")
    return out


def _jittered_crops(data: FaceFrames, count: int, size: int, jitter: float, rng: np.random.Generator
                    ) -> np.ndarray:
    """``count`` random frames, each cut at its box shifted / scaled by up to ``jitter`` of the
    side (kept inside the frame): uint8 [count, size, size, 3]."""
    lengths = np.array([len(f) for f in data.frames])
    which = rng.choice(len(lengths), size=count, p=lengths / lengths.sum())
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for k, v in enumerate(which):
        i = int(rng.integers(lengths[v]))
        frame = data.frames[v][i]
        h, w = frame.shape[:2]
        x0, y0, x1, y1 = data.boxes[v][i].astype(np.float64)
        side = (x1 - x0) * (1.0 + rng.uniform(-jitter, jitter))
        side = float(np.clip(round(side), 8, min(h, w)))
        cx = (x0 + x1) / 2 + rng.uniform(-jitter, jitter) * side
        cy = (y0 + y1) / 2 + rng.uniform(-jitter, jitter) * side
        nx = float(np.clip(round(cx - side / 2), 0, w - side))
        ny = float(np.clip(round(cy - side / 2), 0, h - side))
        box = np.array([[nx, ny, nx + side, ny + side]])
        out[k] = crop_frames(frame[None], box, size)[0]
    return out


def to_model_input(crops: np.ndarray) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> float32 [N, 3, S, S] in [-1, 1]."""
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def reconstruct(vae, crops: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Encode (posterior mean) and decode ``crops`` uint8 [N, S, S, 3] -> uint8 [N, S, S, 3]."""
    vae.eval()
    out = []
    for i in range(0, len(crops), batch_size):
        x = to_model_input(crops[i:i + batch_size])
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


CODECS = ("patch", "kl")


def fit(train: FaceFrames, size: int, settings: FitSettings, log=print):
    """The codec of ``settings.codec`` fitted on ``train``'s crops (:func:`fit_patch_codec` or
    :func:`fit_kl_vae`)."""
    if settings.codec == "patch":
        return fit_patch_codec(train, size, settings, log)
    if settings.codec == "kl":
        return fit_kl_vae(train, size, settings, log)
    raise VaeFitError(f"codec {settings.codec!r} is not one of {', '.join(CODECS)}")


def unfitted_codec(size: int, settings: FitSettings):
    """What ``fit`` starts from: the DCT ``PatchCodec`` or a random ``tiny_vae_config`` KL-VAE."""
    torch.manual_seed(settings.seed)
    if settings.codec == "patch":
        return PatchCodec(patch_size=settings.patch_size, latent_channels=settings.latent_channels, sample_size=size)
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**tiny_vae_config(), "sample_size": size})


def fit_patch_codec(train: FaceFrames, size: int, settings: FitSettings, log=print) -> PatchCodec:
    """A ``PatchCodec`` fitted to the patches of every training crop and of as many jittered crops,
    each also mirrored (module docstring)."""
    if size % settings.patch_size:
        raise VaeFitError(f"crop size {size} is not a multiple of the patch size {settings.patch_size}")
    rng = np.random.default_rng(settings.seed)
    crops = train.crops(size)
    crops = np.concatenate([crops, _jittered_crops(train, len(crops), size, settings.jitter, rng)])
    crops = np.concatenate([crops, crops[:, :, ::-1]])
    codec = unfitted_codec(size, settings)
    t0 = time.monotonic()
    codec.fit(to_model_input(crops))
    log(f"[fit_vae] patch codec: {settings.latent_channels} principal components of "
        f"{len(crops) * (size // settings.patch_size) ** 2} patches of {settings.patch_size} px "
        f"({time.monotonic() - t0:.1f} s)")
    return codec.eval()


def fit_kl_vae(train: FaceFrames, size: int, settings: FitSettings, log=print):
    """Train a fresh ``tiny_vae_config()`` AutoencoderKL on ``train``'s crops; returns it with
    ``scaling_factor`` set from the data (see module docstring)."""

    rng = np.random.default_rng(settings.seed)
    vae = unfitted_codec(size, settings)
    opt = torch.optim.Adam(vae.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, settings.steps) / settings.steps)))
    vae.train()
    t0 = time.monotonic()
    for step in range(1, settings.steps + 1):
        x = to_model_input(_jittered_crops(train, settings.batch_size, size, settings.jitter, rng))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        loss = mse + settings.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, settings.steps // 10) == 0 or step == settings.steps:
            log(f"[fit_vae] step {step}/{settings.steps} mse {mse.item():.4f} ({time.monotonic() - t0:.0f} s)")
    vae.eval()
    with torch.no_grad():
        crops = train.crops(size)
        sel = crops[np.random.default_rng(settings.seed).permutation(len(crops))[:256]]
        means = torch.cat([vae.encode(to_model_input(sel[i:i + 64])).latent_dist.mean
                           for i in range(0, len(sel), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std().clamp(min=1e-6)))
    return vae


def cache_key(videos: Sequence[Path], crop_size: int, crop_margin: float, settings: FitSettings) -> str:
    """Hash of everything the fitted VAE depends on (see module docstring)."""
    h = hashlib.sha256()
    for path in videos:
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    fit_fields = {k: v for k, v in asdict(settings).items() if k != "threads"}
    arch = tiny_vae_config() if settings.codec == "kl" else None
    h.update(json.dumps({"crop_size": crop_size, "crop_margin": crop_margin, "fit": fit_fields,
                         "arch": arch, "version": FIT_VERSION}, sort_keys=True).encode())
    return h.hexdigest()


def fit_vae(samples: Path, out: Path, crop_size: int, crop_margin: float,
            settings: FitSettings = FitSettings(), log=print) -> dict:
    """Fit (or reuse, when ``out`` has a fit of the same inputs) and save the VAE to ``out``.

    Returns the record written to ``out/fit_vae.json``: ``psnr_db`` (fitted, held-out frames),
    ``psnr_random_db`` (the random tiny VAE of the same architecture, same frames),
    ``scaling_factor``, ``train_crops`` / ``heldout_crops``, ``seconds``, ``cached``."""

    samples, out = Path(samples), Path(out)
    videos = find_videos(samples)
    key = cache_key(videos, crop_size, crop_margin, settings)
    record_path = out / RECORD_NAME
    if record_path.is_file() and (out / "config.json").is_file():
        record = json.loads(record_path.read_text())
        if record.get("key") == key:
            log(f"[fit_vae] {out} already holds a VAE fitted to these videos (PSNR {record['psnr_db']:.2f} dB)")
            return dict(record, cached=True)
    torch.set_num_threads(max(1, settings.threads))
    t0 = time.monotonic()
    data = load_face_frames(videos, crop_margin, settings.detect_every)
    train, held = data.split(settings.holdout_fraction)
    log(f"[fit_vae] {len(data.names)} videos with a face, {sum(len(f) for f in train.frames)} training and "
        f"{sum(len(f) for f in held.frames)} held-out frames ({time.monotonic() - t0:.0f} s)")
    vae = fit(train, crop_size, settings, log)
    held_crops = held.crops(crop_size)
    random_vae = unfitted_codec(crop_size, settings)
    record = {
        "key": key,
        "codec": settings.codec,
        "psnr_db": psnr(reconstruct(vae, held_crops), held_crops),
        "psnr_random_db": psnr(reconstruct(random_vae, held_crops), held_crops),
        "scaling_factor": float(vae.config.scaling_factor),
        "train_crops": int(sum(len(f) for f in train.frames)),
        "heldout_crops": int(len(held_crops)),
        "crop_size": crop_size,
        "videos": data.names,
        "settings": asdict(settings),
        "seconds": round(time.monotonic() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out)
    record_path.write_text(json.dumps(record, indent=2))
    log(f"[fit_vae] PSNR on held-out frames {record['psnr_db']:.2f} dB (unfitted {settings.codec} codec "
        f"{record['psnr_random_db']:.2f} dB), "
        f"scaling_factor {record['scaling_factor']:.4f}, saved to {out} ({record['seconds']:.0f} s)")
    return dict(record, cached=False)


def build_parser() -> argparse.ArgumentParser:
    d = FitSettings()
    parser = argparse.ArgumentParser(prog="python -m training.fit_vae", description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", required=True, type=Path, help="folder of videos to fit on")
    parser.add_argument("--out", required=True, type=Path, help="folder the VAE is saved to (save_pretrained)")
    parser.add_argument("--config", default=None, help="platform config (ingest.crop_size / crop_margin)")
    parser.add_argument("--codec", choices=CODECS, default=d.codec, help="patch (PCA, default) or kl (trained)")
    parser.add_argument("--latent-channels", type=int, default=d.latent_channels,
                        help="patch codec: principal components kept per patch")
    parser.add_argument("--steps", type=int, default=d.steps, help="kl: optimizer steps")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="crops per step")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch threads")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``loopy-fit-vae``: 0 after saving (or reusing) the VAE, 1 on bad input."""
    args = build_parser().parse_args(argv)
    cfg = load_platform_config(args.config, args.overrides)
    settings = FitSettings(codec=args.codec, latent_channels=args.latent_channels, steps=args.steps,
                           batch_size=args.batch_size, threads=args.threads)
    try:
        fit_vae(args.samples, args.out, cfg.ingest.crop_size, cfg.ingest.crop_margin, settings)
    except VaeFitError as exc:
        print(f"fit_vae: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
