"""Loopy sampling: one portrait + one audio track -> a talking video (mp4 with the audio).

Pipeline (all parts are the ingest / training code, loaded from one model package):

1. portrait: face detection + square crop exactly as ingest (:mod:`inference.portrait`), VAE encode
   -> reference latent ``[1, 4, h, w]``;
2. audio: decoded by the ingest decoder (16 kHz mono) and featurised by the ingest wav2vec2
   extractor: ``N = floor(duration_s * fps)`` frames -> ``[N, L, D]`` -> windows ``[N, 5, L, D]``;
3. clip after clip of ``F = reader.clip_frames`` (12) frames: the motion frames of a clip are the
   latents already generated (never decoded and re-encoded), squeezed by the same
   :class:`~core.temporal_segment.TemporalSegmentModule` as training; history before frame 0
   is the reference latent with mask False (as in training). The reference net runs **once per
   clip** (:meth:`LoopyModel.compute_reference`), then DDIM (diffusers ``DDIMScheduler``,
   ``steps`` steps) with Loopy's three-way guidance computed as **one** batched forward of the
   three conditions per step (batch ``3B``, see :mod:`inference.guidance`);
4. the latents are VAE-decoded in blocks and written with the original audio (exactly ``N``
   frames, ``N / fps`` seconds, :mod:`inference.video_io`). A progress callback fires after each clip.

Units: frames at ``fps`` (25), samples at 16 kHz, seconds.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.guiders.guider_utils import rescale_noise_cfg

from core.sections import SamplerConfig
from core.temporal_segment import TemporalSegmentModule
from inference.errors import BadInputError
from inference.guidance import combine_stacked, guidance_switches, stack_conditions
from inference.loading import LoadedPackage, load_package
from inference.portrait import load_image
from inference.video_io import write_video
from models.reference_attention import with_reference_kv
from pipelines.encoders.audio_features import audio_windows, frame_count_for
from pipelines.media.audio_decode import decode_audio

__all__ = ["SD15_SCHEDULER", "ClipProgress", "LoopySampler", "ProgressCallback", "SampleResult", "num_clips"]

# SD-1.5's noise schedule (the one the denoising U-Net is trained with), DDIM as in its pipelines.
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
)


def training_schedule(train_cfg) -> dict:
    """DDIM settings for a package without a ``scheduler/`` folder: SD-1.5's, with the noise
    schedule and ``prediction_type`` its model was trained with (the package's ``train`` section)."""
    return dict(SD15_SCHEDULER, num_train_timesteps=train_cfg.num_train_timesteps, beta_start=train_cfg.beta_start,
                beta_end=train_cfg.beta_end, beta_schedule=train_cfg.beta_schedule,
                prediction_type=train_cfg.prediction_type)


@dataclass(frozen=True)
class ClipProgress:
    """Reported after each generated clip."""

    clips_done: int
    clips_total: int
    frames_done: int
    num_frames: int
    elapsed_s: float


ProgressCallback = Callable[[ClipProgress], None]


@dataclass(frozen=True)
class SampleResult:
    path: Path
    num_frames: int
    fps: float
    duration_s: float  # video length = num_frames / fps
    clips: int
    compute_s: float  # wall time of the whole call


def num_clips(num_frames: int, clip_frames: int) -> int:
    """Clips of ``clip_frames`` needed for ``num_frames`` frames (the last one may be cut)."""
    return math.ceil(num_frames / clip_frames)


class LoopySampler:
    """Generates talking videos with a :class:`models.loopy.LoopyModel` and the ingest code.

    Build with :meth:`from_package` (a trained model package or MLflow model URI). Sampling
    options are a :class:`core.sections.SamplerConfig` (the package's ``sampler`` section by
    default; per request, ``dataclasses.replace`` of it). Thread-unsafe: use one sampler per
    thread / actor.
    """

    def __init__(self, model, codec, audio_extractor, portrait_cropper, platform_cfg,
                 device: torch.device, scheduler_config: Optional[dict] = None):
        self.model = model.to(device).eval()
        self.codec = codec
        self.audio_extractor = audio_extractor
        self.portrait = portrait_cropper
        self.cfg = platform_cfg
        self.device = device
        rc = platform_cfg.reader
        self.clip_frames = rc.clip_frames
        self.audio_radius = rc.audio_window
        self.segment = TemporalSegmentModule(rc.motion_frames, rc.segment_stride, rc.segment_ratio,
                                             rc.abstraction).to(device)
        self.scheduler_config = dict(scheduler_config or training_schedule(platform_cfg.train))
        self.dtype = next(self.model.parameters()).dtype
        self.default_options: SamplerConfig = platform_cfg.sampler

    @classmethod
    def from_loaded(cls, package: LoadedPackage) -> "LoopySampler":
        return cls(package.model, package.codec, package.audio_extractor, package.portrait, package.cfg,
                   package.device, package.scheduler_config)

    @classmethod
    def from_package(cls, location: str | Path, device: str = "auto", platform_overrides: Sequence[str] = (),
                     tracking_uri: Optional[str] = None) -> "LoopySampler":
        """A sampler for a model package folder or MLflow model URI (see
        :func:`inference.loading.load_package`, which does the loading)."""
        return cls.from_loaded(load_package(location, device, platform_overrides, tracking_uri))

    # --- inputs --------------------------------------------------------------------------------
    def prepare_portrait(self, image: np.ndarray, landmarks: Optional[np.ndarray] = None) -> torch.Tensor:
        """uint8 RGB image [H, W, 3] (any size) -> reference latent [1, 4, h, w] on the device.
        ``landmarks``: the face's 68 landmarks [68, 2] in image pixels when already found (the
        face search is then skipped). Raises :class:`inference.portrait.NoFaceError` when no face
        is found."""
        crop = self.portrait.crop(image, landmarks)  # [S, S, 3]
        latent = self.codec.encode(crop[None])  # [1, 4, h, w]
        return torch.as_tensor(np.asarray(latent), dtype=torch.float32).to(self.device)

    def prepare_audio(self, audio_path: str | Path, fps: float, max_audio_s: Optional[float] = None):
        """Decode (ingest decoder, 16 kHz mono) and featurise (ingest wav2vec2 extractor).
        Returns (AudioTrack, features float32 [N, L, D]) with ``N = floor(duration_s * fps)``
        (the ingest rule, :func:`pipelines.encoders.audio_features.frame_count_for`); as in ingest the
        samples are cut to exactly ``N / fps`` seconds before featurising. Audio longer than
        ``max_audio_s`` seconds (None: no limit) is refused with :class:`BadInputError` after
        decoding at most ``max_audio_s + 1`` seconds of it."""
        limit = None if max_audio_s is None else float(max_audio_s) + 1.0
        track = decode_audio(audio_path, sample_rate=self.cfg.ingest.sample_rate, duration_s=limit)
        if max_audio_s is not None and track.duration_s > max_audio_s:
            raise BadInputError(f"{audio_path}: audio is longer than the limit of {max_audio_s:g} s "
                                f"(sampler.max_audio_s)")
        n = frame_count_for(track.duration_s, fps)
        if n < 1:
            raise BadInputError(f"{audio_path}: audio of {track.duration_s:.3f} s is shorter than one frame")
        samples = track.samples[: int(round(n / fps * track.sample_rate))]
        feats = self.audio_extractor(samples, n, fps=fps)
        return track, np.asarray(feats, dtype=np.float32)

    # --- the denoising loop --------------------------------------------------------------------
    def make_scheduler(self, steps: int):
        scheduler = DDIMScheduler(**self.scheduler_config)
        scheduler.set_timesteps(steps, device=self.device)
        return scheduler

    def motion_history(self, generated: torch.Tensor, clip_start: int, ref_latent: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Motion frames of the clip starting at ``clip_start`` from the latents generated so far.

        generated: [N, 4, h, w] (rows < clip_start are filled); ref_latent: [1, 4, h, w].
        Returns motion [1, M, 4, h, w] and mask [1, M] (False where the history is before frame 0:
        those slots hold the reference latent, exactly as in training)."""
        idx = torch.as_tensor(self.segment.source_indices(clip_start), device=generated.device)  # [M, G]
        valid = idx >= 0
        groups = generated[idx.clamp(min=0)]  # [M, G, 4, h, w]
        return self.segment.reduce_groups(groups[None], valid[None], ref_latent)

    def clip_audio(self, windows: torch.Tensor, clip_start: int) -> torch.Tensor:
        """Audio windows of the ``F`` frames of a clip: [1, F, 5, L, D]. Frames past the end of
        the audio (last clip) repeat the last frame's window; they are generated and cut off."""
        n = windows.shape[0]
        rows = torch.arange(clip_start, clip_start + self.clip_frames).clamp(max=n - 1)
        return windows[rows.to(windows.device)][None]

    def reference_for_guidance(self, ref_latent: torch.Tensor, motion: torch.Tensor, motion_mask: torch.Tensor):
        """Reference-net features for the stacked guidance batch: the reference net runs once on
        the ``B`` samples (reference + M motion latents each), the denoising U-Net's key / value
        projections of the reference tokens are computed once (``ref_kv``: they do not depend on
        the timestep), the features are repeated for the three conditions and each copy gets its
        condition's drop switches (no recomputation)."""
        sw = guidance_switches(ref_latent.shape[0], self.device)
        reference = self.model.compute_reference(ref_latent.to(self.dtype), motion.to(self.dtype), motion_mask)
        reference = with_reference_kv(reference, self.model.denoise_unet)  # K/V of the reference: once per clip
        return reference.repeat(3).with_drops(sw.drop_ref, sw.drop_motion_frames)

    @torch.no_grad()
    def denoise_clip(self, ref_latent: torch.Tensor, motion: torch.Tensor, motion_mask: torch.Tensor,
                     audio: torch.Tensor, options: SamplerConfig, generator: torch.Generator,
                     batched: bool = True, cache_reference: bool = True) -> torch.Tensor:
        """DDIM for one clip with three-way guidance -> latents [B, F, 4, h, w].

        ref_latent [B, 4, h, w], motion [B, M, 4, h, w], motion_mask [B, M], audio [B, F, 5, L, D].
        The reference net runs once per clip (``cache_reference``; ``False`` recomputes it at every
        step, for the benchmark). ``batched`` runs the three guidance conditions as one forward of
        batch 3B; ``False`` runs three forwards of batch B (test and benchmark reference path)."""
        b = ref_latent.shape[0]
        sw = guidance_switches(b, self.device)
        audio3 = stack_conditions(audio).to(self.dtype)
        reference = self.reference_for_guidance(ref_latent, motion, motion_mask) if cache_reference else None
        scheduler = self.make_scheduler(options.steps)
        latents, timesteps = self.initial_latents(scheduler, ref_latent, options.reference_init, generator,
                                                  options.noise_scale)
        for t in timesteps:
            if reference is None:
                step_reference = self.reference_for_guidance(ref_latent, motion, motion_mask)
            else:
                step_reference = reference
            x = scheduler.scale_model_input(latents, t)
            if batched:
                eps = self.guidance_forward(stack_conditions(x), t, step_reference, audio3, sw)
            else:
                eps = self.guidance_forward_separately(x, t, step_reference, audio3, sw)
            guided = combine_stacked(eps.float(), options.audio_ratio, options.ref_ratio)
            if options.guidance_rescale > 0:
                # per sample, over frames, channels and positions, towards e_audio's spread
                guided = rescale_noise_cfg(guided, eps[:b].float(), options.guidance_rescale)
            latents = scheduler.step(guided, t, latents).prev_sample
        return latents

    def initial_latents(self, scheduler, ref_latent: torch.Tensor, reference_init: float,
                        generator: torch.Generator, noise_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The clip's starting latents [B, F, C, h, w] and the timesteps left to run.

        ``reference_init`` 0 (the paper): pure noise, every timestep. Above 0 (ours,
        ``sampler.reference_init``): the reference latent of each sample, repeated over the
        clip's frames and noised by the scheduler to the first timestep at or below
        ``reference_init x num_train_timesteps``; the steps above it are skipped (as an
        image-to-image pipeline's ``strength``). The noise is drawn from ``generator`` either way,
        so a seed gives the same video, and multiplied by ``noise_scale`` (ours,
        ``sampler.noise_scale``; 1 = the paper's) before it is used."""
        b, c, h, w = ref_latent.shape
        noise = torch.randn((b, self.clip_frames, c, h, w), generator=generator, dtype=torch.float32).to(self.device)
        noise = noise * float(noise_scale)
        timesteps = scheduler.timesteps
        if reference_init <= 0:
            return noise * scheduler.init_noise_sigma, timesteps
        start = reference_init * scheduler.config.num_train_timesteps
        timesteps = timesteps[timesteps <= start]
        if len(timesteps) == 0:  # below the last step: nothing left to denoise
            timesteps = scheduler.timesteps[-1:]
        clean = ref_latent.float()[:, None].expand(b, self.clip_frames, c, h, w)
        return scheduler.add_noise(clean, noise, timesteps[:1].expand(b)), timesteps

    def guidance_forward(self, x3: torch.Tensor, t: torch.Tensor, reference, audio3: torch.Tensor, sw):
        """ONE model forward of the stacked batch [3B, F, 4, h, w] (conditions audio, ref, base)
        -> eps [3B, F, 4, h, w]. ``reference`` and ``audio3`` are stacked the same way."""
        b3 = x3.shape[0]
        timesteps = t.reshape(1).expand(b3).to(self.device)
        a2l_kind = torch.zeros(b3, dtype=torch.long, device=self.device)  # inference: audio only
        return self.model.denoise(x3.to(self.dtype), timesteps, reference, audio3, {"audio": audio3}, a2l_kind,
                                  sw.drop_audio, sw.drop_motion_cond)

    def guidance_forward_separately(self, x: torch.Tensor, t: torch.Tensor, reference, audio3: torch.Tensor, sw):
        """The three conditions as three forwards of batch B each (same inputs and switches as
        :meth:`guidance_forward`). Returns the stacked eps [3B, F, 4, h, w]."""
        b = x.shape[0]
        out = []
        for i in range(3):
            rows = torch.arange(i * b, (i + 1) * b, device=self.device)
            ref_i = reference.select(rows)
            a = audio3[rows]
            out.append(self.model.denoise(
                x.to(self.dtype), t.reshape(1).expand(b).to(self.device), ref_i, a, {"audio": a},
                torch.zeros(b, dtype=torch.long, device=self.device), sw.drop_audio[rows], sw.drop_motion_cond[rows]))
        return torch.cat(out, dim=0)

    @torch.no_grad()
    def generate_latents(self, ref_latent: torch.Tensor, features: np.ndarray | torch.Tensor,
                         options: Optional[SamplerConfig] = None,
                         progress: Optional[ProgressCallback] = None) -> torch.Tensor:
        """All frames' latents [N, 4, h, w] for audio features [N, L, D], clip after clip."""
        options = options or self.default_options
        started = time.perf_counter()
        feats = torch.as_tensor(np.asarray(features), dtype=torch.float32, device=self.device)
        n = feats.shape[0]
        windows = audio_windows(feats, radius=self.audio_radius)  # [N, 5, L, D]
        total = num_clips(n, self.clip_frames)
        generated = torch.zeros((n,) + tuple(ref_latent.shape[1:]), dtype=torch.float32, device=self.device)
        generator = torch.Generator().manual_seed(int(options.seed))
        for c in range(total):
            start = c * self.clip_frames
            keep = min(self.clip_frames, n - start)
            motion, mask = self.motion_history(generated, start, ref_latent)
            clip = self.denoise_clip(ref_latent, motion, mask, self.clip_audio(windows, start), options, generator)
            generated[start:start + keep] = clip[0, :keep].float()
            if progress is not None:
                progress(ClipProgress(c + 1, total, start + keep, n, time.perf_counter() - started))
        return generated

    def decode_frames(self, latents: torch.Tensor, size: Optional[int] = None, block: int = 12
                      ) -> Iterator[np.ndarray]:
        """VAE-decode latents [N, 4, h, w] in blocks -> uint8 [n, S, S, 3] blocks (resized to ``size``)."""
        for i in range(0, latents.shape[0], block):
            frames = np.asarray(self.codec.decode(latents[i:i + block]))
            if size is not None and frames.shape[1] != size:
                t = torch.as_tensor(frames).permute(0, 3, 1, 2).float()
                t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                                                    align_corners=False)
                frames = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
            yield frames

    def generate(self, image: np.ndarray | str | Path, audio_path: str | Path, out_path: str | Path,
                 options: Optional[SamplerConfig] = None,
                 progress: Optional[ProgressCallback] = None,
                 landmarks: Optional[np.ndarray] = None) -> SampleResult:
        """Portrait (uint8 [H, W, 3] or an image file) + audio file -> mp4 at ``out_path``.
        ``landmarks``: see :meth:`prepare_portrait`."""
        options = options or self.default_options
        started = time.perf_counter()
        if not isinstance(image, np.ndarray):
            image = load_image(image)
        ref_latent = self.prepare_portrait(image, landmarks)
        _, feats = self.prepare_audio(audio_path, options.fps, options.max_audio_s)
        latents = self.generate_latents(ref_latent, feats, options, progress)
        n = latents.shape[0]
        path = write_video(self.decode_frames(latents, options.size), out_path, options.fps, audio_path,
                           num_frames=n)
        return SampleResult(Path(path), n, options.fps, n / options.fps, num_clips(n, self.clip_frames),
                            time.perf_counter() - started)
