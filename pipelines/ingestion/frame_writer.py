"""Frame files of the ingest, written by the workers: chunk rows -> ``frames/<video_id>.parquet``.

The driver never receives frame data (issue 14): the Ray Data stream's last stage,
:func:`write_chunk_parts` (a ``map_batches`` task on any worker), writes each ``chunk`` row
(``n`` frames: latents, audio features, landmarks, boxes, JPEGs) as one Parquet file
``frames/<video_id>.parts/<chunk_index>.parquet`` (temp file + rename, so a retried task just
rewrites it) and passes on a small row: ids, counts and shapes only (:data:`SMALL_COLUMNS`). When
the driver has seen every chunk and the ``end`` row of a video, a Ray task on a worker,
:func:`assemble_frame_file`, concatenates the parts in frame order into the video's frame file
(:class:`pipelines.dataset.schema.FrameFileWriter`: row groups of 25 frames, a ``.tmp`` file renamed
when complete, the layout the reader expects), checks the row count and removes the parts.
Workers and driver share the output directory (a local disk, or a shared volume on a cluster).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.atomic_files import atomic_path
from core.storage import Location, as_location, parquet_source, remove_tree
from pipelines.dataset.schema import (
    FRAMES_DIR,
    FrameFileWriter,
    frame_schema,
    frames_path,
)
from pipelines.errors import PipelineError

PARTS_SUFFIX = ".parts"  # frames/<video_id>.parts/ (pipelines/ingestion/resume.py cleans leftovers)

# the columns of the rows that reach the driver (scalars and short strings only)
SMALL_COLUMNS = ("kind", "video_id", "path", "stage", "reason", "info", "chunk_index", "start_index",
                 "num_frames", "num_chunks", "latent_shape", "audio_shape", "vae_s")


class FrameWriteError(PipelineError, RuntimeError):
    """A video's frame file came out wrong (e.g. fewer rows than announced); the message names
    the file. ``info`` holds the video's probe facts (for its manifest row)."""

    def __init__(self, message: str, info: Optional[dict] = None):
        super().__init__(message)
        self.info = info or {}


def _fixed_list(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(values).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), width)


def chunk_table(row: dict, schema: pa.Schema) -> pa.Table:
    """A ``chunk`` row (numpy arrays of n frames) -> its n frame-table rows (``schema``, a
    :func:`pipelines.dataset.schema.frame_schema`): ``latent`` f16 [n, 4, h, w] and ``features`` f16
    [n, L, D] flattened per frame, ``landmarks`` f32 [n, 68, 2], ``boxes`` f32 [n, 4], times in
    seconds; ``jpeg`` bytes split by ``jpeg_sizes`` when the schema has the column."""
    n = int(row["num_frames"])
    start = int(row["start_index"])
    cols = {
        "video_id": pa.array([row["video_id"]] * n, pa.string()),
        "frame_index": pa.array(np.arange(start, start + n, dtype=np.int32)),
        "time_s": pa.array(np.asarray(row["time_s"], np.float64)),
        "source_time_s": pa.array(np.asarray(row["source_time_s"], np.float64)),
        "latent": _fixed_list(np.asarray(row["latent"], np.float16), int(np.prod(row["latent"].shape[1:]))),
        "audio": _fixed_list(np.asarray(row["features"], np.float16), int(np.prod(row["features"].shape[1:]))),
        "landmarks": _fixed_list(np.asarray(row["landmarks"], np.float32), 136),
        "crop_box": _fixed_list(np.asarray(row["boxes"], np.float32), 4),
        "face_found": pa.array(np.asarray(row["found"], bool)),
    }
    if "jpeg" in schema.names:
        sizes = np.asarray(row["jpeg_sizes"], np.int64)
        blob = np.asarray(row["jpeg"], np.uint8).tobytes()
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        cols["jpeg"] = pa.array([blob[offsets[i]:offsets[i + 1]] for i in range(n)], pa.binary())
    return pa.table(cols).select(schema.names).cast(schema)


class VideoAssembly:
    """Chunks of one video arriving from the stream, appended to its frame file in order.

    ``end``: the video's ``end`` facts (``num_chunks``, ``num_frames``, ``info``) once its end
    row arrived; ``complete`` when every announced chunk is written."""

    def __init__(self, out_dir: Location, video_id: str, schema: pa.Schema):
        self.writer = FrameFileWriter(out_dir, video_id, schema)
        self.schema = schema
        self.next_chunk = 0
        self.pending: dict[int, dict] = {}  # chunks that arrived before their predecessors
        self.end: Optional[dict] = None

    def add(self, row: dict) -> None:
        self.pending[int(row["chunk_index"])] = row
        while self.next_chunk in self.pending:
            self.writer.write(chunk_table(self.pending.pop(self.next_chunk), self.schema))
            self.next_chunk += 1

    @property
    def complete(self) -> bool:
        return self.end is not None and self.next_chunk == int(self.end["num_chunks"])


@dataclass
class FinishedVideo:
    """A complete frame file: ``path`` holds ``num_frames`` rows; ``end_info`` is the JSON
    ``info`` of the video's ``end`` row (probe facts and stage seconds)."""

    video_id: str
    path: Location
    num_frames: int
    end_info: str


def part_path(out_dir: Location, video_id: str, chunk_index: int) -> Location:
    return as_location(out_dir) / FRAMES_DIR / f"{video_id}{PARTS_SUFFIX}" / f"{int(chunk_index):06d}.parquet"


def small_row(row: dict, **extra) -> dict:
    """The :data:`SMALL_COLUMNS` of ``row`` (shapes as JSON strings), updated with ``extra``."""
    out = {k: row.get(k, "") for k in SMALL_COLUMNS}
    out.update(latent_shape="", audio_shape="", vae_s=float(row.get("vae_s", 0.0) or 0.0))
    out.update(extra)
    for k in ("chunk_index", "start_index", "num_frames", "num_chunks"):
        out[k] = int(out[k] or 0)
    for k in ("kind", "video_id", "path", "stage", "reason", "info"):
        out[k] = str(out[k] or "")
    return out


def write_chunk_part(out_dir: Location, row: dict, write_jpeg: bool) -> dict:
    """Write one ``chunk`` row as its part file (temp + rename); the small row for the driver."""
    lat, aud = list(row["latent"].shape[1:]), list(row["features"].shape[1:])
    schema = frame_schema(lat, aud, write_jpeg)
    path = part_path(out_dir, row["video_id"], row["chunk_index"])
    path.parent.mkdir(parents=True, exist_ok=True)
    # not synced: a part is intermediate (no record names the video until its frame file is
    # assembled), and a sync per chunk would slow the hot path on a network volume
    with atomic_path(path, durable=False) as tmp:
        pq.write_table(chunk_table(row, schema), tmp, compression="zstd")
    return small_row(row, latent_shape=json.dumps(lat), audio_shape=json.dumps(aud))


def write_chunk_parts(batch: dict, out_dir: str, write_jpeg: bool) -> dict:
    """Ray Data ``map_batches`` UDF (``batch_size=1``): a ``chunk`` row is written as its part
    file; every row leaves as a small row (:data:`SMALL_COLUMNS`). A failed write becomes a
    ``failed`` row (disk full, volume gone: not the file's fault)."""
    row = {k: (v[0].item() if isinstance(v[0], np.generic) else v[0]) for k, v in batch.items()}
    if row["kind"] != "chunk":
        out = small_row(row)
    else:
        try:
            out = write_chunk_part(as_location(out_dir), row, write_jpeg)
        except Exception as exc:  # noqa: BLE001 - recorded as this video's failure
            out = small_row(row, kind="failed", stage="write",
                            reason=f"failed: write: {row['path']}: {type(exc).__name__}: {exc}")
    return {k: np.array([v]) for k, v in out.items()}


def assemble_frame_file(out_dir: str, video_id: str, num_chunks: int, num_frames: int) -> dict:
    """Concatenate a video's ``num_chunks`` part files in order into ``frames/<video_id>.parquet``
    (runs as a Ray task on a worker). Returns ``{"video_id", "num_frames"}``; raises
    :class:`FrameWriteError` when the rows are not ``num_frames`` (the file is removed). The
    parts folder is removed once the file is complete."""
    out = as_location(out_dir)
    parts = [part_path(out, video_id, i) for i in range(num_chunks)]
    writer = None
    try:
        for p in parts:
            table = pq.read_table(parquet_source(p))
            if writer is None:
                writer = FrameFileWriter(out, video_id, table.schema)
            writer.write(table)
        if writer is None:
            raise FrameWriteError(f"{frames_path(out, video_id)}: no chunk files")
        path = writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer.num_rows != num_frames:
        path.unlink(missing_ok=True)
        raise FrameWriteError(f"{path} holds {writer.num_rows} frames, expected {num_frames}")
    remove_tree(parts[0].parent)
    return {"video_id": video_id, "num_frames": int(writer.num_rows)}


@dataclass
class VideoProgress:
    """What the driver knows of one video's chunks: the indices written, the ``end`` row."""

    chunks: set = field(default_factory=set)
    end: Optional[dict] = None

    @property
    def complete(self) -> bool:
        return self.end is not None and len(self.chunks) == int(self.end["num_chunks"])


class PartsTracker:
    """Driver side, no frame data: which chunks of each video the workers wrote, and the
    per-frame shapes of this run (``latent_shape`` [4, h, w] / ``audio_shape`` [L, D], those of
    the first chunk; a later chunk with other shapes raises ``ValueError``). :meth:`add` returns
    the video's ``end`` facts when that small row completed it."""

    def __init__(self):
        self.latent_shape: Optional[list[int]] = None
        self.audio_shape: Optional[list[int]] = None
        self._videos: dict[str, VideoProgress] = {}

    def add(self, row: dict) -> Optional[dict]:
        vid = row["video_id"]
        prog = self._videos.setdefault(vid, VideoProgress())
        if row["kind"] == "chunk":
            lat, aud = json.loads(row["latent_shape"]), json.loads(row["audio_shape"])
            if self.latent_shape is None:
                self.latent_shape, self.audio_shape = lat, aud
            if [lat, aud] != [self.latent_shape, self.audio_shape]:
                raise ValueError(f"latent {lat} / audio {aud} shapes differ from the first "
                                 f"video's {self.latent_shape} / {self.audio_shape}")
            prog.chunks.add(int(row["chunk_index"]))
        elif row["kind"] == "end":
            if int(row["num_chunks"]) == 0:
                raise ValueError("no frames arrived")
            prog.end = {"num_chunks": int(row["num_chunks"]), "num_frames": int(row["num_frames"]),
                        "info": row["info"]}
        if prog.complete:
            del self._videos[vid]
            return prog.end
        return None

    def drop(self, video_id: str) -> None:
        self._videos.pop(video_id, None)
