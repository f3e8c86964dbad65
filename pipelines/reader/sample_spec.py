"""The plan of an epoch: which clip, which reference frame and which condition switches each
training sample gets, drawn from a seeded generator (no data is read here).

Units are frames at the ingest frame rate (25 fps). For a video of ``N`` frames, a clip of ``F``
frames (``reader.clip_frames``; 1 in stage 1) starting at ``s`` covers frames ``s .. s+F-1``.

Rules (docs/SEED_DEFECTS.md, defects 11, 12, 14):

* **Clip starts** are drawn anywhere in the video. With probability ``early_start_prob`` the start
  is drawn among the starts with fewer than ``motion_frames`` (T = 124) frames of history
  (``s < T``), so the filled-history regime of the temporal segment module is learned; otherwise
  uniformly among all valid starts (which may also be early). Stage 1 has no motion history and
  draws uniformly.
* **Reference frame** is never inside the clip: its distance to the nearest clip frame is at least
  ``ref_min_distance`` (d >= 1) frames, i.e. ``ref <= s - d`` or ``ref >= s + F - 1 + d``; it is
  drawn uniformly among all such frames. A start is only valid if such a frame exists.
* **Cuts**: a video whose manifest row lists ``cut_frames`` is split there into shots, each its
  own :class:`VideoEntry`; every index of a spec counts from its shot's first frame, so no clip,
  reference, motion or audio-window frame is ever drawn across a cut.
* A video (a shot) needs at least ``F + d`` frames for one sample (clip at one end, reference at the
  other); shorter videos are skipped by the reader and counted, never padded.
* **Condition switches** (training only; all off at evaluation, a2l_kind = audio): one shared
  coin ``c`` ~ B(p_drop_audio) drops c_audio and the motion latents together (the paper masks
  "c_audio and motion latents ... with a 10% probability"), so the guidance's e_ref condition is
  trained in p_drop_audio x (1 - p_drop_ref) x (1 - p_drop_motion_frames) = 5.1 % of the samples
  and e_base (everything dropped) in p_drop_audio x p_drop_ref = 1.5 %:
  ``drop_audio`` = c, ``drop_motion_cond`` = c OR B(p_drop_motion_cond) (an extra
  motion-latents-only drop, 0 by default), ``drop_ref`` ~ B(p_drop_ref),
  ``drop_motion_frames`` = drop_ref OR B(p_drop_motion_frames),
  ``a2l_kind`` uniform over {0 audio, 1 landmarks, 2 head_motion_var, 3 expression_var}.
  Stage 1 (no temporal or audio modules): drop_audio = drop_motion_cond = False,
  drop_motion_frames = True (there are none), a2l_kind = 0; drop_ref is still drawn.

Determinism: each video draws from its own generator seeded with (seed, epoch, hash(video_id)),
so a video's samples do not change when other videos are added or removed; the epoch's list is
then shuffled with a generator seeded with (seed, epoch).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from core.config import ConfigError
from core.sections import ReaderConfig

A2L_KINDS = ("audio", "landmarks", "head_motion_var", "expression_var")


@dataclass(frozen=True)
class VideoEntry:
    """One usable video: ``video_index`` = its row among the manifest's ``ok`` rows. A sample
    whose frames hold cuts (manifest ``cut_frames``) is one entry per shot: ``first_frame`` is
    the shot's first row in the frame file and ``num_frames`` its length, so every frame a spec
    draws (clip, reference, motion history, audio window) stays inside the shot."""

    video_index: int
    video_id: str
    num_frames: int
    first_frame: int = 0


@dataclass(frozen=True)
class SampleSpec:
    """Everything that decides one sample, before any frame is read."""

    video_index: int
    video_id: str
    num_frames: int  # frames of the source video
    clip_start: int  # first clip frame
    clip_frames: int  # F
    ref_index: int  # reference frame, outside the clip
    drop_audio: bool
    drop_motion_cond: bool
    drop_ref: bool
    drop_motion_frames: bool
    a2l_kind: int  # index into A2L_KINDS
    # row of the frame file where the shot begins: clip_start, ref_index and num_frames count
    # from it (the reader adds it when reading), so no frame is drawn across a cut
    first_frame: int = 0

    @property
    def clip_frame_indices(self) -> np.ndarray:
        """[F] int64, time order."""
        return np.arange(self.clip_start, self.clip_start + self.clip_frames, dtype=np.int64)

    def to_row(self) -> dict:
        return asdict(self)


def frames_needed(cfg: ReaderConfig) -> int:
    """Frames a video needs for one sample: ``F + ref_min_distance``."""
    return clip_length(cfg) + cfg.ref_min_distance


def clip_length(cfg: ReaderConfig) -> int:
    """F: ``clip_frames`` in stage 2, 1 in stage 1."""
    return 1 if cfg.stage == 1 else cfg.clip_frames


def validate_reader_config(cfg: ReaderConfig) -> None:
    """Raise ValueError naming the ``reader.*`` field that cannot work."""
    if cfg.stage not in (1, 2):
        raise ConfigError(f"reader.stage must be 1 or 2, got {cfg.stage}")
    if cfg.clip_frames < 1:
        raise ConfigError(f"reader.clip_frames must be >= 1, got {cfg.clip_frames}")
    if cfg.ref_min_distance < 1:
        raise ConfigError(f"reader.ref_min_distance must be >= 1 (the reference may never be a clip "
                         f"frame), got {cfg.ref_min_distance}")
    if cfg.samples_per_video < 1:
        raise ConfigError(f"reader.samples_per_video must be >= 1, got {cfg.samples_per_video}")
    for name in ("early_start_prob", "p_drop_audio", "p_drop_motion_cond", "p_drop_ref",
                 "p_drop_motion_frames", "aug_prob", "aug_flip_prob"):
        p = getattr(cfg, name)
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"reader.{name} must be a probability in [0, 1], got {p}")
    for name, top in (("aug_hue_deg", 180.0), ("aug_saturation", 1.0), ("aug_brightness", 1.0), ("aug_contrast", 1.0)):
        v = getattr(cfg, name)
        if not 0.0 <= v <= top:
            raise ConfigError(f"reader.{name} must be in [0, {top:g}], got {v}")


def valid_clip_starts(num_frames: int, clip_frames: int, ref_min_distance: int) -> np.ndarray:
    """Starts ``s`` in ``0 .. N-F`` that leave room for a reference: ``s >= d`` (reference before)
    or ``s <= N - F - d`` (reference after). [K] int64, ascending; empty if the video is too short."""
    last = num_frames - clip_frames
    if last < 0:
        return np.zeros(0, dtype=np.int64)
    s = np.arange(last + 1, dtype=np.int64)
    return s[(s >= ref_min_distance) | (s <= last - ref_min_distance)]


def valid_ref_frames(num_frames: int, clip_start: int, clip_frames: int, ref_min_distance: int
                     ) -> np.ndarray:
    """Frames at least ``d`` frames from every clip frame: [K] int64, ascending."""
    f = np.arange(num_frames, dtype=np.int64)
    clip_last = clip_start + clip_frames - 1
    return f[(f <= clip_start - ref_min_distance) | (f >= clip_last + ref_min_distance)]


def _video_seed(video_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(video_id.encode(), digest_size=8).digest(), "little")


def draw_video_specs(video: VideoEntry, cfg: ReaderConfig, epoch: int, count: int,
                     evaluation: bool = False) -> list[SampleSpec]:
    """``count`` samples of one video for ``epoch``; [] if the video is shorter than one sample."""
    f = clip_length(cfg)
    d = cfg.ref_min_distance
    starts = valid_clip_starts(video.num_frames, f, d)
    if starts.size == 0:
        return []
    early = starts[starts < cfg.motion_frames]
    key = video.video_id if not video.first_frame else f"{video.video_id}@{video.first_frame}"
    rng = np.random.default_rng([cfg.seed, epoch, _video_seed(key)])
    specs = []
    for _ in range(count):
        use_early = cfg.stage == 2 and early.size > 0 and rng.random() < cfg.early_start_prob
        start = int(rng.choice(early if use_early else starts))
        refs = valid_ref_frames(video.num_frames, start, f, d)
        ref = int(rng.choice(refs))
        # switches are always drawn (same number of draws per sample) then masked by mode
        u = rng.random(4)
        kind = int(rng.integers(len(A2L_KINDS)))
        drop_audio = bool(u[0] < cfg.p_drop_audio)  # the shared coin: audio and motion latents
        drop_mcond = drop_audio or bool(u[1] < cfg.p_drop_motion_cond)
        drop_ref = bool(u[2] < cfg.p_drop_ref)
        drop_mframes = drop_ref or bool(u[3] < cfg.p_drop_motion_frames)
        if evaluation:
            drop_audio = drop_mcond = drop_ref = drop_mframes = False
            kind = 0
        if cfg.stage == 1:
            drop_audio = drop_mcond = False
            drop_mframes = True
            kind = 0
        specs.append(SampleSpec(video.video_index, video.video_id, video.num_frames, start, f, ref,
                                drop_audio, drop_mcond, drop_ref, drop_mframes, kind, video.first_frame))
    return specs


def epoch_plan(videos: Sequence[VideoEntry], cfg: ReaderConfig, epoch: int,
               evaluation: bool = False) -> list[SampleSpec]:
    """All samples of one epoch (``samples_per_video`` per video), shuffled; deterministic for
    (cfg.seed, epoch) and the set of videos."""
    validate_reader_config(cfg)
    specs: list[SampleSpec] = []
    for video in videos:
        specs.extend(draw_video_specs(video, cfg, epoch, cfg.samples_per_video, evaluation))
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(specs))
    return [specs[i] for i in order]


def shard(specs: Sequence[SampleSpec], rank: int, world_size: int) -> list[SampleSpec]:
    """This rank's share: ``specs[rank::world_size]``. Disjoint across ranks and complete; shard
    sizes differ by at most one (DDP users who need equal steps truncate to the smallest)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size={world_size})")
    return list(specs[rank::world_size])
