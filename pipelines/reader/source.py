"""The training reader: an ingest output directory (``pipelines/dataset/schema.py``) -> Loopy samples.

One sample (stage 2; F = ``clip_frames`` = 12, M = motion latents = 20, L x D audio, h = w =
crop/8), keys and dtypes as in docs/CONTRACTS.md "A training batch" (without the batch axis):

=========================  =======  ==================  =============================================
key                        dtype    shape               meaning
=========================  =======  ==================  =============================================
``latents``                float32  [F, 4, h, w]        clean clip latents (no noise, no timestep)
``ref_latent``             float32  [4, h, w]           reference frame, >= ref_min_distance away
``motion_latents``         float32  [M, 4, h, w]        temporal segment module output, time order
``motion_mask``            bool     [M]                 True where from real history
``audio``                  float32  [F, 5, L, D]        frames t-2..t+2, edge-replicated
``landmarks``              float32  [F, 68, 2]          crop-normalised
``head_motion_var``        float32  []                  c_mov (pipelines.faces.motion_stats)
``expression_var``         float32  []                  c_exp (pipelines.faces.motion_stats)
``drop_audio`` ...         bool     []                  condition switches (pipelines.reader.sample_spec)
``a2l_kind``               int64    []                  0 audio, 1 landmarks, 2 c_mov, 3 c_exp
``clip_frame_indices``     int64    [F]                 provenance
``ref_frame_index``        int64    []                  provenance
``motion_source_indices``  int64    [M]                 frame behind each motion latent, -1 filled
``video_index``            int64    []                  row among the manifest's ok rows
=========================  =======  ==================  =============================================

Stage 1 (``reader.stage == 1``): F = 1 and the keys ``motion_latents``, ``motion_mask``,
``motion_source_indices`` and ``audio`` are **absent** (nothing is read for them); the variances
are 0 (one frame) and the switches are fixed as documented in :mod:`pipelines.reader.sample_spec`.

Reading: a sample reads only the row groups holding its frames (``FrameStore.read``): latents of
the clip, the reference and the motion source frames (20 frames for ``uniform``, the 124-frame
history for ``mean``), audio and landmarks of the clip's audio window. Nothing else of the video
is loaded. Missing history (clip start < 124) is filled by the temporal segment module's one rule
(reference latent, mask False). Motion source index for ``mean``: the group's nearest valid frame.

Three front ends share :meth:`LoopySampleSource.load`: :class:`LoopyTorchDataset` + :func:`collate`
(plain torch / DDP), :func:`build_ray_dataset` (Ray Data / Ray Train), and the inspection CLI
``python -m pipelines.reader DIR --show N``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from core.config import ConfigError, add_config_arguments, load_platform_config
from core.sections import ReaderConfig
from core.storage import as_location
from core.temporal_segment import TemporalSegmentModule
from pipelines.dataset.schema import FrameStore, IngestFormatError, frames_path
from pipelines.encoders.audio_features import audio_window_indices
from pipelines.errors import PipelineError
from pipelines.encoders.latents import LatentCodec, LatentColourMap
from pipelines.faces.motion_stats import expression_var, head_motion_var
from pipelines.reader.appearance import (
    appearance_space,
    change_landmarks,
    change_latents,
    change_latents_in_pixels,
    draw_change,
)
from pipelines.reader.sample_spec import (
    SampleSpec,
    VideoEntry,
    clip_length,
    epoch_plan,
    frames_needed,
    shard,
    validate_reader_config,
)

#: dtype of every sample key (the contract with the train step and the model)
SAMPLE_DTYPES: dict[str, np.dtype] = {
    "latents": np.dtype(np.float32),
    "ref_latent": np.dtype(np.float32),
    "motion_latents": np.dtype(np.float32),
    "motion_mask": np.dtype(bool),
    "audio": np.dtype(np.float32),
    "landmarks": np.dtype(np.float32),
    "head_motion_var": np.dtype(np.float32),
    "expression_var": np.dtype(np.float32),
    "drop_audio": np.dtype(bool),
    "drop_motion_cond": np.dtype(bool),
    "drop_ref": np.dtype(bool),
    "drop_motion_frames": np.dtype(bool),
    "a2l_kind": np.dtype(np.int64),
    "clip_frame_indices": np.dtype(np.int64),
    "ref_frame_index": np.dtype(np.int64),
    "motion_source_indices": np.dtype(np.int64),
    "video_index": np.dtype(np.int64),
}
STAGE2_ONLY_KEYS = ("motion_latents", "motion_mask", "motion_source_indices", "audio")
_MANIFEST_COLUMNS = ("video_id", "status", "num_frames", "split")
log = logging.getLogger(__name__)


def shot_bounds(num_frames: int, cut_frames: Sequence[int]) -> list[tuple[int, int]]:
    """``[(first, end)]`` of the shots of a frame file of ``num_frames`` rows whose manifest
    ``cut_frames`` lists the rows where a new shot begins (end exclusive; cuts outside
    ``1 .. num_frames - 1`` are ignored)."""
    edges = sorted({int(c) for c in cut_frames if 0 < int(c) < num_frames})
    starts = [0, *edges]
    return list(zip(starts, [*edges, num_frames]))


class SampleReadError(PipelineError, RuntimeError):
    """A sample whose frames could not be read (names the frames file and the frames)."""


def sample_keys(stage: int) -> list[str]:
    """The keys a sample of ``stage`` carries."""
    return [k for k in SAMPLE_DTYPES if stage == 2 or k not in STAGE2_ONLY_KEYS]


class LoopySampleSource:
    """Opens one ingest output and turns :class:`SampleSpec` s into samples.

    ``split``: manifest split to use ("train", "test"; None = all). ``evaluation``: condition
    switches all off (default: on for "train" only). Videos shorter than one sample
    (``clip + ref_min_distance`` frames) or without their frames file are skipped:
    ``.skipped`` counts them, ``.skipped_videos`` lists (video_id, reason).

    Raises :class:`IngestFormatError` for a directory that is not an ingest output or has another
    schema version.
    """

    def __init__(self, data_dir: str | Path, reader_cfg: ReaderConfig, split: Optional[str] = "train",
                 evaluation: Optional[bool] = None):
        validate_reader_config(reader_cfg)
        self.cfg = reader_cfg
        self.data_dir = as_location(data_dir)  # a folder or a bucket prefix (core/storage.py)
        self.split = split
        self.evaluation = (split != "train") if evaluation is None else bool(evaluation)
        self.store = FrameStore(self.data_dir)  # checks ingest_meta.json and its schema version
        manifest = self.store.manifest(status="ok")
        missing = [c for c in _MANIFEST_COLUMNS if c not in manifest.column_names]
        if missing:
            raise IngestFormatError(f"{self.data_dir / 'videos.parquet'}: manifest lacks columns {missing}")
        self.colour_map: Optional[LatentColourMap] = None
        if reader_cfg.appearance_aug and not self.evaluation:
            if self.store.meta.latent_rgb_map is None:
                raise IngestFormatError(
                    f"{self.data_dir / 'ingest_meta.json'}: no latent colour map (latent_rgb_map), which "
                    f"reader.appearance_aug needs: re-run the ingest job on this folder, or set "
                    f"reader.appearance_aug=false")
            self.colour_map = LatentColourMap.from_dict(self.store.meta.latent_rgb_map)
        self.codec: Optional[LatentCodec] = None  # the dataset's VAE, for appearance_space "pixel"
        if self.colour_map is not None and appearance_space(reader_cfg, self.colour_map) == "pixel":
            vae = (self.store.meta.weights or {}).get("vae")
            try:
                self.codec = _cached_codec(str(vae))
            except Exception as exc:  # noqa: BLE001 - any load failure: say which setting needs what
                raise IngestFormatError(
                    f"{self.data_dir / 'ingest_meta.json'}: the appearance augmentation in pixels "
                    f"(reader.appearance_space={reader_cfg.appearance_space}) needs the dataset's VAE "
                    f"{vae!r}, which cannot be loaded ({type(exc).__name__}: {exc}); set "
                    f"reader.appearance_space=latent or reader.appearance_aug=false") from exc
        self.segment: Optional[TemporalSegmentModule] = None
        if reader_cfg.stage == 2:
            self.segment = TemporalSegmentModule(reader_cfg.motion_frames, reader_cfg.segment_stride,
                                                 reader_cfg.segment_ratio, reader_cfg.abstraction)
        need = frames_needed(reader_cfg)
        self.videos: list[VideoEntry] = []
        self.skipped_videos: list[tuple[str, str]] = []
        self._ids: list[str] = manifest["video_id"].to_pylist()
        cuts = (manifest["cut_frames"].to_pylist() if "cut_frames" in manifest.column_names
                else [None] * manifest.num_rows)  # outputs written before cut_frames existed: none
        rows = zip(self._ids, manifest["num_frames"].to_pylist(), manifest["split"].to_pylist(), cuts)
        for index, (video_id, num_frames, vsplit, cut) in enumerate(rows):
            if split is not None and vsplit != split:
                continue
            if num_frames is None or num_frames < need:
                self.skipped_videos.append((video_id, f"{num_frames} frames < {need} needed for one "
                                                      f"sample ({clip_length(reader_cfg)} clip + "
                                                      f"{reader_cfg.ref_min_distance} to the reference)"))
            elif not frames_path(self.data_dir, video_id).is_file():
                self.skipped_videos.append((video_id, f"frames file missing: "
                                                      f"{frames_path(self.data_dir, video_id)}"))
            else:
                for first, end in shot_bounds(int(num_frames), cut or []):
                    if end - first < need:
                        self.skipped_videos.append((video_id, f"shot of frames {first}-{end - 1}: {end - first} "
                                                              f"frames < {need} needed for one sample"))
                    else:
                        self.videos.append(VideoEntry(index, video_id, end - first, first))

    @property
    def num_videos(self) -> int:
        return len(self.videos)

    @property
    def skipped(self) -> int:
        return len(self.skipped_videos)

    def video_id(self, video_index: int) -> str:
        """The id behind a sample's ``video_index``."""
        return self._ids[video_index]

    def epoch_specs(self, epoch: int) -> list[SampleSpec]:
        """The epoch's samples, shuffled; deterministic for (reader.seed, epoch)."""
        return epoch_plan(self.videos, self.cfg, epoch, self.evaluation)

    def sample_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample shape of every key this source produces (no batch axis)."""
        f, lat = clip_length(self.cfg), tuple(self.store.meta.latent_shape)
        shapes = {"latents": (f, *lat), "ref_latent": lat, "landmarks": (f, 68, 2),
                  "clip_frame_indices": (f,)}
        if self.segment is not None:
            m = self.segment.num_outputs
            shapes.update(motion_latents=(m, *lat), motion_mask=(m,), motion_source_indices=(m,),
                          audio=(f, 2 * self.cfg.audio_window + 1, *self.store.meta.audio_shape))
        return {k: shapes.get(k, ()) for k in sample_keys(self.cfg.stage)}

    def load(self, spec: SampleSpec) -> dict[str, np.ndarray]:
        """Read one sample (contract keys, :data:`SAMPLE_DTYPES`). Raises :class:`SampleReadError`
        naming the frames file when its rows cannot be read."""
        try:
            return self._load(spec)
        except (OSError, IndexError, ValueError, KeyError, pa.ArrowException) as exc:
            raise SampleReadError(
                f"{frames_path(self.data_dir, spec.video_id)}: cannot read the sample at clip start "
                f"{spec.clip_start} (reference {spec.ref_index}): {type(exc).__name__}: {exc}") from exc

    @torch.no_grad()
    def _load(self, spec: SampleSpec) -> dict[str, np.ndarray]:
        cfg, vid = self.cfg, spec.video_id
        clip = spec.clip_frame_indices  # from the shot's first frame, as every index below
        off = int(spec.first_frame)  # the shot's first row in the frame file
        out: dict[str, np.ndarray] = {}
        if self.segment is None:
            rows = self.store.read(vid, np.asarray([*clip, spec.ref_index]) + off, ["latent", "landmarks"])
            lat, lm = rows["latent"], rows["landmarks"][:-1]
            out["latents"], out["ref_latent"] = lat[:-1], lat[-1]
        else:
            src = self.segment.source_indices(spec.clip_start)  # [M, G], -1 invalid
            valid = src >= 0
            rows = np.unique(np.concatenate([clip, [spec.ref_index], src[valid]]))
            lat = self.store.read(vid, rows + off, ["latent"])["latent"]  # [K, 4, h, w] fp16
            ref = lat[np.searchsorted(rows, spec.ref_index)].astype(np.float32)
            gpos = np.searchsorted(rows, np.where(valid, src, rows[0]))  # [M, G] rows of lat
            groups = lat[gpos].astype(np.float32)  # [M, G, 4, h, w], any value where invalid
            motion, mask = self.segment.reduce_groups(torch.from_numpy(groups)[None],
                                                      torch.from_numpy(valid)[None],
                                                      torch.from_numpy(ref)[None])
            window = audio_window_indices(clip, spec.num_frames, cfg.audio_window)  # [F, 5]
            wrows = np.unique(window)
            av = self.store.read(vid, wrows + off, ["audio", "landmarks"])
            lm = av["landmarks"][np.searchsorted(wrows, clip)]
            out["latents"], out["ref_latent"] = lat[np.searchsorted(rows, clip)], ref
            out["motion_latents"], out["motion_mask"] = motion[0].numpy(), mask[0].numpy()
            out["motion_source_indices"] = np.where(valid, src + off, -1).max(axis=1)
            out["audio"] = av["audio"][np.searchsorted(wrows, window)]  # [F, 5, L, D]
        out["landmarks"] = lm
        out["head_motion_var"] = head_motion_var(lm)
        out["expression_var"] = expression_var(lm)
        if self.colour_map is not None:  # one look for the whole sample (pipelines/reader/appearance.py)
            change = draw_change(np.random.default_rng([cfg.seed, 7919, spec.video_index, spec.clip_start,
                                                        spec.ref_index]), cfg)
            if change is not None:
                keys = [k for k in ("latents", "ref_latent", "motion_latents") if k in out]
                if self.codec is not None:  # one VAE round trip for every frame of the sample
                    flat = [np.asarray(out[k], np.float32).reshape(-1, *out["ref_latent"].shape) for k in keys]
                    changed = np.split(change_latents_in_pixels(np.concatenate(flat), change, self.codec),
                                       np.cumsum([len(f) for f in flat])[:-1])
                    for k, v in zip(keys, changed):
                        out[k] = v.reshape(np.shape(out[k]))
                else:
                    for k in keys:
                        out[k] = change_latents(out[k], change, self.colour_map)
                out["landmarks"] = change_landmarks(lm, change)
        for name in ("drop_audio", "drop_motion_cond", "drop_ref", "drop_motion_frames", "a2l_kind"):
            out[name] = np.asarray(getattr(spec, name))
        out["clip_frame_indices"] = clip + off  # rows of the frame file
        out["ref_frame_index"] = np.asarray(spec.ref_index + off)
        out["video_index"] = np.asarray(spec.video_index)
        return {k: np.asarray(out[k], dtype=SAMPLE_DTYPES[k], order="C") for k in sample_keys(cfg.stage)}


# --- plain torch ------------------------------------------------------------------------------

class LoopyTorchDataset(torch.utils.data.Dataset):
    """The samples of one epoch for one DDP rank: ``specs[rank::world_size]`` of the shuffled epoch
    plan (disjoint across ranks, complete together). Items are numpy dicts; use :func:`collate`.
    Call :meth:`set_epoch` before each epoch."""

    def __init__(self, data_dir: str | Path, reader_cfg: ReaderConfig, split: Optional[str] = "train",
                 epoch: int = 0, rank: int = 0, world_size: int = 1):
        self.source = LoopySampleSource(data_dir, reader_cfg, split)
        self.rank, self.world_size = rank, world_size
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.specs = shard(self.source.epoch_specs(epoch), self.rank, self.world_size)

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.source.load(self.specs[i])


def collate(samples: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack samples into contiguous batch-first tensors with the contract's dtypes."""
    if not samples:
        raise ValueError("collate: empty batch")
    keys = list(samples[0])
    for s in samples[1:]:
        if list(s) != keys:
            raise ValueError(f"collate: samples with different keys {sorted(keys)} vs {sorted(s)}")
    return {k: torch.from_numpy(np.ascontiguousarray(np.stack([s[k] for s in samples]),
                                                     dtype=SAMPLE_DTYPES[k])) for k in keys}


# --- Ray Data ---------------------------------------------------------------------------------

_SOURCES: dict[tuple, LoopySampleSource] = {}  # per worker process: open FrameStores are reused
_SPEC_FIELDS = [f.name for f in dataclasses.fields(SampleSpec)]


@functools.lru_cache(maxsize=2)
def _cached_codec(location: str) -> LatentCodec:
    """The dataset's VAE, loaded once per process (reader tasks are long-lived workers)."""
    return LatentCodec(location, local_files_only=True)


def _cached_source(data_dir: str, cfg_dict: dict, split: Optional[str]) -> LoopySampleSource:
    key = (data_dir, json.dumps(cfg_dict, sort_keys=True), split)
    if key not in _SOURCES:
        _SOURCES[key] = LoopySampleSource(data_dir, ReaderConfig(**cfg_dict), split)
    return _SOURCES[key]


def specs_from_batch(batch: dict[str, np.ndarray]) -> list[SampleSpec]:
    """Columns of spec rows (as :meth:`SampleSpec.to_row` wrote them) -> specs."""
    n = len(batch["video_id"])
    return [SampleSpec(**{f: (str(batch[f][i]) if f == "video_id" else batch[f][i].item())
                          for f in _SPEC_FIELDS}) for i in range(n)]


def load_spec_batch(batch: dict[str, np.ndarray], data_dir: str, reader_cfg: dict,
                    split: Optional[str]) -> dict[str, np.ndarray]:
    """``map_batches`` function: spec rows -> stacked sample columns (no string columns).
    A sample whose frames cannot be read is logged with its file and dropped; the rest go on."""
    source = _cached_source(data_dir, reader_cfg, split)
    samples = []
    for spec in specs_from_batch(batch):
        try:
            samples.append(source.load(spec))
        except SampleReadError as exc:
            log.warning("dropped sample: %s", exc)
    if not samples:
        return {k: np.zeros((0, *shape), SAMPLE_DTYPES[k]) for k, shape in source.sample_shapes().items()}
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


def build_ray_dataset(data_dir: str | Path, reader_cfg: ReaderConfig, split: Optional[str] = "train",
                      epoch: int = 0, batch_size: int = 4):
    """A ``ray.data.Dataset`` of one epoch's samples (contract keys as tensor columns).

    Rows start as the epoch plan's spec rows (one block per ``batch_size`` specs); ``map_batches``
    reads each block's frame rows in the worker. Shard it on the training side with Ray Train's
    ``get_dataset_shard`` and iterate with ``iter_torch_batches(collate_fn=ray_collate_fn())``
    (or the default conversion: every column is numeric / bool)."""
    import ray.data

    source = LoopySampleSource(data_dir, reader_cfg, split)
    rows = [s.to_row() for s in source.epoch_specs(epoch)]
    if not rows:
        raise ValueError(f"{data_dir}: no samples for split {split!r} "
                         f"({source.num_videos} videos, {source.skipped} skipped)")
    ds = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / batch_size)))
    return ds.map_batches(load_spec_batch, batch_size=batch_size, batch_format="numpy",
                          fn_kwargs=dict(data_dir=str(data_dir), reader_cfg=dataclasses.asdict(reader_cfg),
                                         split=split))


def to_torch_batch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Numpy columns -> contiguous, writable contract tensors (copies only read-only buffers)."""
    out = {}
    for k, v in batch.items():
        arr = np.ascontiguousarray(v, dtype=SAMPLE_DTYPES[k])
        out[k] = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    return out


def ray_collate_fn():
    """``collate_fn`` for ``iter_torch_batches`` (a ``NumpyBatchCollateFn``, as Ray asks since
    2.47) applying :func:`to_torch_batch`."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class _ContractCollate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return to_torch_batch(batch)

    return _ContractCollate()


# --- inspection CLI ---------------------------------------------------------------------------

def describe_sample(spec: SampleSpec, sample: dict[str, np.ndarray]) -> dict:
    """JSON-able view of one sample: provenance, mask, switches, shape and dtype of every tensor."""
    info = {
        "video_id": spec.video_id,
        "video_index": spec.video_index,
        "clip_frame_indices": sample["clip_frame_indices"].tolist(),
        "ref_frame_index": int(sample["ref_frame_index"]),
        "motion_source_indices": sample["motion_source_indices"].tolist() if "motion_source_indices" in sample else None,
        "motion_mask": sample["motion_mask"].astype(int).tolist() if "motion_mask" in sample else None,
        "switches": {k: bool(sample[k]) for k in ("drop_audio", "drop_motion_cond", "drop_ref", "drop_motion_frames")},
        "a2l_kind": int(sample["a2l_kind"]),
        "head_motion_var": float(sample["head_motion_var"]),
        "expression_var": float(sample["expression_var"]),
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sample.items()},
    }
    return info


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.reader",
                                     description="Print training samples of an ingest output as JSON lines.")
    parser.add_argument("data_dir", help="ingest output directory")
    parser.add_argument("--show", type=int, default=3, help="number of samples to print")
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--split", default=None, help="manifest split (default: reader.split)")
    add_config_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_platform_config(args.config, args.overrides).reader
        source = LoopySampleSource(args.data_dir, cfg, args.split or cfg.split)
    except (ConfigError, IngestFormatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"# {source.num_videos} videos, {source.skipped} skipped", file=sys.stderr)
    for video_id, reason in source.skipped_videos:
        print(f"# skipped {video_id}: {reason}", file=sys.stderr)
    for spec in source.epoch_specs(args.epoch)[: args.show]:
        print(json.dumps(describe_sample(spec, source.load(spec))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
