"""The ingest output format (schema version 1): the contract between ingest and the reader.

Layout of an ingest output directory ``DIR``::

    DIR/videos.parquet            manifest, one row per sample (a shot of a source) or per
                                  rejected range / file (MANIFEST_SCHEMA)
    DIR/frames/<video_id>.parquet per-frame table of one video, in frame order (FRAME_SCHEMA),
                                  row groups of ``ROW_GROUP_FRAMES`` frames, so a reader fetches
                                  any frame range by row-group statistics without the whole video
    DIR/ingest_meta.json          schema version, fps, crop size, latent / audio shapes, weights

Per-frame arrays are stored flat (``fixed_size_list``) with their shapes in the file's key-value
metadata (``loopy.latent_shape``, ``loopy.audio_shape``):

* ``latent``: float16 [4, S/8, S/8], the VAE posterior **mean** times the scaling factor
  (deterministic; the std is not stored).
* ``audio``: float16 [L, D], wav2vec2 hidden states of every transformer layer (L = 12, D = 768
  for base), one vector per 25 fps frame.
* ``landmarks``: float32 [68, 2], iBUG-300W order, crop pixel coordinates / crop size (0..1).
* ``crop_box``: float32 [4], x0, y0, x1, y1 of the square crop in source pixels (after rotation);
  inside the frame, except with ``ingest.crop_fill`` reflect / blur / constant, where it may reach
  outside (the part outside was filled; the manifest's ``crop_fill_max`` says how much).

Version rule (docs/CONTRACTS.md): ``SCHEMA_VERSION`` changes when a reader of the previous version
would misread an output of this one (a frame-file column or layout changed, a manifest column
renamed, retyped or given another meaning). New nullable manifest columns do not change it: an
older output reads with them null.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.atomic_files import AtomicFile, write_text_atomic
from core.storage import Location, as_location, parquet_source
from pipelines.errors import PipelineError

SCHEMA_VERSION = 1
ROW_GROUP_FRAMES = 25
MANIFEST_NAME = "videos.parquet"
META_NAME = "ingest_meta.json"
FRAMES_DIR = "frames"


class IngestFormatError(PipelineError, ValueError):
    """A directory or file that is not a readable ingest output of this schema version."""


@dataclass
class IngestMeta:
    """``DIR/ingest_meta.json``: what every frame file of the directory shares."""

    schema_version: int
    fps: float
    crop_size: int
    latent_shape: list[int]  # [4, h, w]
    audio_shape: list[int]  # [layers, dim]
    sample_rate: int
    weights: dict  # where the VAE / wav2vec2 came from
    vae_scaling_factor: float
    # the VAE's linear latent <-> RGB relation (pipelines.encoders.latents.LatentColourMap.to_dict);
    # None in directories written before it existed (the reader's appearance augmentation needs it)
    latent_rgb_map: Optional[dict] = None

    def write(self, out_dir: Location) -> None:
        write_text_atomic(as_location(out_dir) / META_NAME, json.dumps(asdict(self), indent=2))

    @classmethod
    def read(cls, out_dir: Location) -> "IngestMeta":
        path = as_location(out_dir) / META_NAME
        if not path.is_file():
            raise IngestFormatError(f"{out_dir} is not an ingest output: {META_NAME} is missing")
        data = json.loads(path.read_text())
        if data.get("schema_version") != SCHEMA_VERSION:
            raise IngestFormatError(
                f"{path}: schema version {data.get('schema_version')} does not match this "
                f"platform's version {SCHEMA_VERSION}; re-run the ingest job"
            )
        return cls(**data)


MANIFEST_SCHEMA = pa.schema([
    ("source", pa.string()),  # input path as given
    ("video_id", pa.string()),  # content id: hash of size + first and last MBs (manifest.video_id_for)
    # "ok" | "rejected" (a bad file) | "failed" (infrastructure: a rerun retries it) |
    # "duplicate" (same content as the input named in duplicate_of; not ingested again)
    ("status", pa.string()),
    ("reason", pa.string()),  # null when ok; "<stage>: <why>" when rejected, "failed: ..." when failed
    ("stage", pa.string()),  # stage that rejected it (probe, decode, face, audio, filter, ...)
    ("num_frames", pa.int64()),  # frames at 25 fps written (0 if rejected early)
    ("fps_in", pa.float64()),  # source average frame rate
    ("duration_s", pa.float64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("rotation", pa.int32()),  # degrees, from container metadata
    ("audio_offset_s", pa.float64()),  # audio duration - video duration (s)
    ("split", pa.string()),  # "train" | "test", by hash of video_id
    ("frames_file", pa.string()),  # relative to DIR, null when rejected
    ("duplicate_of", pa.string()),  # status duplicate: source of the input with the same content
    ("reason_key", pa.string()),  # the reason without file names and numbers, for counting
    # --- the crop (pipelines/faces/crop.py; docs/INGEST.md "Close-ups"); null on rows of outputs
    # written before these columns existed and on rows rejected before the crop was planned ---
    # share of the frames with a face whose head (landmark box + forehead / chin allowances) left the frame
    ("head_cut_ratio", pa.float64()),
    ("crop_fill", pa.string()),  # the rule where the asked crop did not fit: reduce | reflect | blur | constant
    # margin of every crop of the video (landmark-box sides on each side): ingest.crop_margin, or
    # the reduced one (crop_fill reduce)
    ("crop_margin", pa.float64()),
    ("crop_adjusted_ratio", pa.float64()),  # share of frames whose crop was reduced or filled (0..1)
    ("crop_fill_max", pa.float64()),  # largest share of one crop's area filled (0 with reduce)
    # ok rows: what was changed on the kept video, for a person ("crop margin reduced to 0.31
    # (asked 0.6) in 100% of frames"); null when nothing
    ("note", pa.string()),
    ("note_key", pa.string()),  # the note without numbers, each "; " clause cut at its "(" (counting)
    # --- where the hours go and who was chosen (docs/INGEST.md "Persistent distractors and the person
    # who speaks", "What a run reports"); null on rows of outputs written before these columns ---
    ("loss_key", pa.string()),  # rejected / failed rows: the stable key of the loss (pipelines/dataset/losses.py)
    # the subject's mouth-audio sync (the evaluation's sync), when it had a persistent track
    ("speaker_sync", pa.float64()),
    # JSON list: every persistent face track not chosen, with its figures (coverage, width_px,
    # centre_px, confidence, shape_error, mouth_motion, landmark_noise, sync), verdict and why
    ("ignored_tracks", pa.string()),
    # --- shots and ranges (docs/INGEST.md "Shots and time ranges"): a row is a sample (one shot,
    # or the part of a shot inside one work range) or a rejected range of a source; null on rows
    # of outputs written before these columns existed (then the row is the whole file) ---
    # the input the row came from: the file's content id (manifest.video_id_for), or for a clip
    # of an input-list row its clip id (manifest.clip_id)
    ("source_id", pa.string()),
    ("start_s", pa.float64()),  # the row's range in the source: output frame start / fps (s)
    ("end_s", pa.float64()),  # end (exclusive) / fps (s); null for a file refused as a whole
    # frames of this sample (0-based, in its frame file) where a new shot begins: the reader never
    # draws a clip, reference or motion frame across one. The ingest writes one shot per sample
    # (empty list); a dataset joined from several shots lists its cuts here
    ("cut_frames", pa.list_(pa.int64())),
    # the time range (s) the input-list row asked for (docs/INGEST.md "Input lists with time
    # ranges"); null for a whole file (clip_end_s also when the row gave no end: to the end)
    ("clip_start_s", pa.float64()),
    ("clip_end_s", pa.float64()),
])


def frame_schema(latent_shape: Sequence[int], audio_shape: Sequence[int], with_jpeg: bool = False
                 ) -> pa.Schema:
    """Per-frame table schema with shapes recorded in the metadata."""
    fields = [
        ("video_id", pa.string()),
        ("frame_index", pa.int32()),  # 0-based at 25 fps
        ("time_s", pa.float64()),  # frame_index / 25
        ("source_time_s", pa.float64()),  # timestamp of the source frame used
        ("latent", pa.list_(pa.float16(), int(np.prod(latent_shape)))),
        ("audio", pa.list_(pa.float16(), int(np.prod(audio_shape)))),
        ("landmarks", pa.list_(pa.float32(), 136)),
        ("crop_box", pa.list_(pa.float32(), 4)),
        ("face_found", pa.bool_()),  # False where landmarks were interpolated
    ]
    if with_jpeg:
        fields.append(("jpeg", pa.binary()))
    meta = {
        "loopy.schema_version": str(SCHEMA_VERSION),
        "loopy.latent_shape": json.dumps(list(latent_shape)),
        "loopy.audio_shape": json.dumps(list(audio_shape)),
    }
    return pa.schema(fields, metadata=meta)


def frames_path(out_dir: Location, video_id: str) -> Location:
    return as_location(out_dir) / FRAMES_DIR / f"{video_id}.parquet"


class FrameFileWriter:
    """Writes one video's frames in order, one row group per ``ROW_GROUP_FRAMES`` frames.

    Writes to a temp file beside it and renames it on :meth:`close`
    (:class:`core.atomic_files.AtomicFile`), so a crashed job never leaves a file that looks
    complete (resume relies on it); :meth:`abort` removes the temp file.
    """

    def __init__(self, out_dir: Location, video_id: str, schema: pa.Schema):
        self.path = frames_path(out_dir, video_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = AtomicFile(self.path)
        self.tmp = self._file.tmp
        self.schema = schema
        try:
            self._writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        except BaseException:
            self._file.discard()
            raise
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.num_rows = 0

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        while self._pending_rows >= ROW_GROUP_FRAMES:
            self._flush(ROW_GROUP_FRAMES)

    def _flush(self, rows: int) -> None:
        merged = pa.concat_tables(self._pending)
        head, tail = merged.slice(0, rows), merged.slice(rows)
        self._writer.write_table(head, row_group_size=rows)
        self.num_rows += head.num_rows
        self._pending = [tail] if tail.num_rows else []
        self._pending_rows = tail.num_rows

    def close(self) -> Path:
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._writer.close()
        return self._file.commit()

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._file.discard()


class FrameStore:
    """Random access to frame ranges of one ingest output directory.

    Opens each video's file lazily and keeps its footer (row-group frame ranges) cached; reading
    frames touches only the row groups that cover them.
    """

    def __init__(self, out_dir: str | Location, max_open_files: int = 64):
        self.dir = as_location(out_dir)  # a folder or a bucket prefix (core/storage.py)
        if not self.dir.is_dir():
            raise IngestFormatError(f"{self.dir} is not a directory")
        self.meta = IngestMeta.read(self.dir)
        # least recently used files are closed beyond this (a worker sampling 10k videos must not
        # hold 10k file descriptors)
        self.max_open_files = max_open_files
        self._files: dict[str, tuple[pq.ParquetFile, np.ndarray, np.ndarray]] = {}

    def manifest(self, status: Optional[str] = "ok") -> pa.Table:
        path = self.dir / MANIFEST_NAME
        if not path.is_file():
            raise IngestFormatError(f"{self.dir} is not an ingest output: {MANIFEST_NAME} is missing")
        table = pq.read_table(parquet_source(path))
        if status is not None:
            table = table.filter(pc.equal(table["status"], status))
        return table

    def _open(self, video_id: str):
        if video_id not in self._files:
            path = frames_path(self.dir, video_id)
            if not path.is_file():
                raise IngestFormatError(f"frames of video {video_id} missing: {path}")
            pf = pq.ParquetFile(parquet_source(path))  # an object: ranged reads of the row groups asked for
            md = pf.metadata
            col = pf.schema_arrow.get_field_index("frame_index")
            starts, stops = [], []
            for i in range(md.num_row_groups):
                st = md.row_group(i).column(col).statistics
                starts.append(st.min)
                stops.append(st.max + 1)
            self._files[video_id] = (pf, np.array(starts), np.array(stops))
            while len(self._files) > self.max_open_files:
                self._files.pop(next(iter(self._files)))[0].close()
        else:
            self._files[video_id] = self._files.pop(video_id)  # most recently used last
        return self._files[video_id]

    def num_frames(self, video_id: str) -> int:
        return int(self._open(video_id)[2][-1])

    def read(self, video_id: str, frame_indices: Iterable[int], columns: Sequence[str]) -> dict[str, np.ndarray]:
        """Rows for ``frame_indices`` (any order, repeats allowed) -> {column: array[len(indices), ...]}.

        Array columns come back reshaped to their per-frame shape (latent [4,h,w], audio [L,D],
        landmarks [68,2], crop_box [4]) in their stored dtype.
        """
        pf, starts, stops = self._open(video_id)
        idx = np.asarray(list(frame_indices), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= stops[-1]):
            raise IndexError(f"video {video_id}: frames {idx.min()}..{idx.max()} outside 0..{stops[-1] - 1}")
        groups = sorted({int(np.searchsorted(stops, i, side="right")) for i in np.unique(idx)})
        cols = list(dict.fromkeys(["frame_index", *columns]))
        table = pf.read_row_groups(groups, columns=cols)
        fi = table["frame_index"].to_numpy()
        pos = np.searchsorted(fi, idx)
        out = {}
        for c in columns:
            out[c] = self._column_array(table[c], c)[pos]
        return out

    def _column_array(self, col: pa.ChunkedArray, name: str) -> np.ndarray:
        col = col.combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            flat = col.values.to_numpy(zero_copy_only=False)
            shape = self.shape_of(name)
            return flat.reshape(len(col), *shape)
        return col.to_numpy(zero_copy_only=False)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return {
            "latent": tuple(self.meta.latent_shape),
            "audio": tuple(self.meta.audio_shape),
            "landmarks": (68, 2),
            "crop_box": (4,),
        }[name]
