"""Driver-side assembly of the ingest's per-chunk rows into ``frames/<video_id>.parquet``.

The Ray Data stream delivers each video as ``chunk`` rows (``n`` frames each, possibly out of
order and interleaved with other videos) and one ``end`` row (``num_chunks``, ``num_frames``;
see ``pipelines/ingest_stages.py``). :class:`FrameAssembler` appends every video's chunks to its
frame file in frame order (chunks that arrive early wait in a small per-video buffer) through
:class:`pipelines.schema.FrameFileWriter` (a ``.tmp`` file renamed when complete) and reports the
video finished once its last chunk is written and the row count is the one announced. Only the
driver writes: workers need no shared filesystem.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa

from pipelines.errors import PipelineError
from pipelines.schema import FrameFileWriter, frame_schema


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
    :func:`pipelines.schema.frame_schema`): ``latent`` f16 [n, 4, h, w] and ``features`` f16
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

    def __init__(self, out_dir: Path, video_id: str, schema: pa.Schema):
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
    path: Path
    num_frames: int
    end_info: str


class FrameAssembler:
    """Every video's :class:`VideoAssembly` of one job, and the per-frame shapes they share.

    ``latent_shape`` [4, h, w] / ``audio_shape`` [L, D]: those of the first chunk seen (None
    before); a later chunk with other shapes raises ``ValueError``. :meth:`add_chunk` and
    :meth:`add_end` return the :class:`FinishedVideo` when that row completed its video, raise
    :class:`FrameWriteError` when the finished file has the wrong row count (the file is
    removed) and any other error when writing failed; the caller then calls :meth:`abort`.
    """

    def __init__(self, out_dir: Path, write_jpeg: bool):
        self.out_dir = Path(out_dir)
        self.write_jpeg = write_jpeg
        self.latent_shape: Optional[list[int]] = None
        self.audio_shape: Optional[list[int]] = None
        self._videos: dict[str, VideoAssembly] = {}

    def add_chunk(self, row: dict) -> Optional[FinishedVideo]:
        vid = row["video_id"]
        lat, aud = list(row["latent"].shape[1:]), list(row["features"].shape[1:])
        if self.latent_shape is None:
            self.latent_shape, self.audio_shape = lat, aud
        if [lat, aud] != [self.latent_shape, self.audio_shape]:
            raise ValueError(f"latent {lat} / audio {aud} shapes differ from the first "
                             f"video's {self.latent_shape} / {self.audio_shape}")
        if vid not in self._videos:
            self._videos[vid] = VideoAssembly(self.out_dir, vid, frame_schema(lat, aud, self.write_jpeg))
        self._videos[vid].add(row)
        return self._finish_if_complete(vid)

    def add_end(self, row: dict) -> Optional[FinishedVideo]:
        vid = row["video_id"]
        if vid not in self._videos:  # zero-chunk video cannot pass the length filter
            raise ValueError("no frames arrived")
        self._videos[vid].end = {"num_chunks": row["num_chunks"], "num_frames": row["num_frames"],
                                 "info": row["info"]}
        return self._finish_if_complete(vid)

    def abort(self, video_id: str) -> None:
        """Drop a video's partial frame file (no-op when none is open)."""
        asm = self._videos.pop(video_id, None)
        if asm is not None:
            asm.writer.abort()

    def _finish_if_complete(self, video_id: str) -> Optional[FinishedVideo]:
        asm = self._videos[video_id]
        if not asm.complete:
            return None
        del self._videos[video_id]
        path = asm.writer.close()
        end = asm.end
        if asm.writer.num_rows != int(end["num_frames"]):
            path.unlink(missing_ok=True)
            raise FrameWriteError(f"{path} holds {asm.writer.num_rows} frames, expected {end['num_frames']}",
                                  json.loads(end["info"] or "{}"))
        return FinishedVideo(video_id, path, int(end["num_frames"]), end["info"])
