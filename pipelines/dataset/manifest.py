"""Input discovery, stable video ids, deterministic splits and the manifest of an ingest run.

The manifest is ``DIR/videos.parquet`` (``schema.MANIFEST_SCHEMA``), one row per sample (a shot
of a source, ``video_id`` = :func:`sample_id`; ``source_id``, ``start_s``, ``end_s`` name the
range) or per rejected range / refused file.
The per-video records a running job keeps for resuming (``DIR/records/``) are
``pipelines/ingestion/resume.py``'s.
"""
from __future__ import annotations

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from core.atomic_files import atomic_path
from core.storage import (
    Location,
    StoragePath,
    StorageUnavailableError,
    as_location,
    check_location,
    parquet_source,
)
from pipelines.dataset.losses import loss_key_for
from pipelines.dataset.schema import MANIFEST_NAME, MANIFEST_SCHEMA
from pipelines.errors import PipelineError

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm")


class IngestInputError(PipelineError, ValueError):
    """The ``--input`` argument names nothing usable (missing path, empty folder or list)."""


@dataclass(frozen=True)
class InputVideo:
    """One input file of the job."""

    source: str  # the path as given (list entries: as written in the list)
    path: Location  # resolved absolute path or bucket object (may not exist for a list entry: rejected as "input")
    video_id: str  # 16 hex digits, from the file's content (video_id_for)
    split: str  # "train" | "test"
    duplicate_of: Optional[str] = None  # source of an earlier input with the same content


# bytes of the file hashed for its id: the head (container header and first seconds) and the tail
ID_HEAD_BYTES = 4 * 1024 * 1024
ID_TAIL_BYTES = 1024 * 1024


def video_id_for(path: Location) -> str:
    """Content id of a file: sha256 of its size, its first ``ID_HEAD_BYTES`` and its last
    ``ID_TAIL_BYTES``; 16 hex digits. The same bytes in two folders (a copy) get the same id and a
    changed file a new one; renaming, moving or touching a file does not change it. Why not the
    duration as well: it needs a demux of the whole file on the driver; size + tail already tell
    apart cuts of one source that share their first megabytes. A file that cannot be read gets
    an id from its path (it is rejected as ``input``)."""
    path = as_location(path).resolve()
    h = hashlib.sha256()
    try:
        size = path.stat().st_size
        h.update(f"size:{size}|".encode())
        with path.open("rb") as f:  # an object: two ranged reads
            h.update(f.read(ID_HEAD_BYTES))
            if size > ID_HEAD_BYTES:
                f.seek(max(ID_HEAD_BYTES, size - ID_TAIL_BYTES))
                h.update(f.read(ID_TAIL_BYTES))
    except StorageUnavailableError:
        raise  # the store is down: not a missing file (the job stops before any work)
    except OSError:
        h = hashlib.sha256(f"missing:{path}".encode())
    return h.hexdigest()[:16]


def sample_id(source_id: str, start: int, end: int) -> str:
    """The id of the sample made of output frames ``[start, end)`` (end exclusive, frames at
    ``ingest.fps`` from the source's first frame) of the source whose content id is
    ``source_id``: ``<source_id>_<start>_<end>`` (7 digits each). A sample is one shot (or the
    part of a shot inside one work range); its manifest row keeps ``source_id``, ``start_s`` and
    ``end_s``."""
    return f"{source_id}_{int(start):07d}_{int(end):07d}"


def split_for(key: str, test_fraction: float) -> str:
    """Deterministic split: ``test`` when the hash of ``key`` falls below ``test_fraction``."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / float(1 << 64)
    return "test" if h < test_fraction else "train"


def split_key_of(path: Location, video_id: str, split_key: Literal["video", "folder"]) -> str:
    """What the split hashes: the video id, or the parent folder's name (one person per folder
    never lands in both splits)."""
    if split_key == "folder":
        return f"folder:{as_location(path).parent.name}"
    return f"video:{video_id}"


#: columns a CSV / Parquet input list may name its files in (the first one present is used)
LIST_COLUMNS = ("uri", "path", "source", "url", "video")
#: columns of a time range per entry (as public datasets list clips): not supported yet
RANGE_COLUMNS = ("start", "end", "start_s", "end_s", "start_time", "end_time")


def list_entries(listing: Location) -> list[str]:
    """The file entries of an input list: a ``.txt`` (one path or URI per line; blank lines and
    ``#`` comments skipped) or a ``.csv`` / ``.parquet`` table (the column ``uri``, ``path``,
    ``source``, ``url`` or ``video``, the way public datasets are distributed). A table whose rows
    carry a time range (``start`` / ``end`` ...) is refused: one video per file is ingested whole
    (time-range work units are not part of this job yet). Raises :class:`IngestInputError`."""
    if listing.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in listing.read_text().splitlines()]
        return [ln for ln in lines if ln and not ln.startswith("#")]
    import pyarrow.csv as pacsv

    try:
        table = (pq.read_table(parquet_source(listing)) if listing.suffix.lower() == ".parquet"
                 else pacsv.read_csv(parquet_source(listing)))
    except (pa.ArrowInvalid, OSError) as exc:
        raise IngestInputError(f"--input {listing}: unreadable list ({str(exc).splitlines()[0]})") from None
    names = {n.lower(): n for n in table.column_names}
    column = next((names[c] for c in LIST_COLUMNS if c in names), None)
    if column is None:
        raise IngestInputError(f"--input {listing}: no column naming the files (one of {', '.join(LIST_COLUMNS)}); "
                               f"columns: {', '.join(table.column_names)}")
    ranges = [names[c] for c in RANGE_COLUMNS if c in names and table[names[c]].null_count < table.num_rows]
    if ranges:
        raise IngestInputError(f"--input {listing}: rows with time ranges ({', '.join(ranges)}) are not supported: "
                               f"the job ingests whole files (cut the clips first, or list whole files)")
    return [str(v).strip() for v in table[column].to_pylist() if v is not None and str(v).strip()]


def expand_inputs(input_path: str | Path) -> list[tuple[str, Location]]:
    """``--input`` -> [(source as given, resolved path)].

    * a folder: every file with a video extension below it (recursive), sorted;
    * a ``.txt`` file: one path per line (blank lines and ``#`` comments skipped; relative paths
      are relative to the list's folder), or a ``.csv`` / ``.parquet`` table of paths / URIs
      (:func:`list_entries`); listed files that do not exist are kept (they end as a rejected
      manifest row);
    * any other file: that one file.
    ``input_path`` and the list's entries may be bucket URIs (``s3://bucket/raw/``: every video
    object under the prefix; core/storage.py).
    Raises :class:`IngestInputError` when ``input_path`` does not exist or yields no file, and
    :class:`core.storage.StorageError` for an unusable URI (scheme, bucket, credentials).
    """
    given = check_location(input_path, "--input")
    if not given.exists():
        raise IngestInputError(f"--input {input_path}: no such file or directory")
    out: list[tuple[str, Path]] = []
    if given.is_dir():
        for p in sorted(given.rglob("*"), key=str):  # a prefix's listing holds objects only
            if p.suffix.lower() in VIDEO_EXTENSIONS and (isinstance(p, StoragePath) or p.is_file()):
                out.append((str(p), p.resolve()))
        if not out:
            raise IngestInputError(f"--input {input_path}: folder holds no video files ({', '.join(VIDEO_EXTENSIONS)})")
    elif given.suffix.lower() in (".txt", ".csv", ".parquet"):
        for line in list_entries(given):
            p = check_location(line, f"--input {input_path}: entry")
            if not p.is_absolute():
                p = given.parent / str(p)
            out.append((line, p.resolve()))
        if not out:
            raise IngestInputError(f"--input {input_path}: the list names no files")
    else:
        out.append((str(given), given.resolve()))
    return out


def plan_inputs(input_path: str | Path, test_fraction: float,
                split_key: Literal["video", "folder"] = "video", hash_threads: int = 8) -> list[InputVideo]:
    """Expand ``--input`` and give every distinct file its content id and split. A path named
    twice is kept once; a second file with the same content (a copy) is kept with
    ``duplicate_of`` = the first one's source and the first one's id and split (it is recorded as
    a duplicate and never ingested, so one content never lands in both splits). Files are hashed
    on ``hash_threads`` threads (reading is I/O bound; hashlib releases the GIL)."""
    expanded, seen_paths = [], set()
    for source, path in expand_inputs(input_path):
        if path not in seen_paths:
            seen_paths.add(path)
            expanded.append((source, path))
    with ThreadPoolExecutor(max_workers=max(1, hash_threads)) as pool:
        ids = list(pool.map(lambda sp: video_id_for(sp[1]), expanded))
    first: dict[str, InputVideo] = {}
    videos = []
    for (source, path), vid in zip(expanded, ids):
        if vid in first:
            orig = first[vid]
            videos.append(InputVideo(source=source, path=path, video_id=vid, split=orig.split,
                                     duplicate_of=orig.source))
            continue
        split = split_for(split_key_of(path, vid, split_key), test_fraction)
        first[vid] = InputVideo(source=source, path=path, video_id=vid, split=split)
        videos.append(first[vid])
    return videos


def duplicate_row(video: InputVideo) -> dict:
    """The manifest row of a copy of another input (status ``duplicate``, naming the original)."""
    return manifest_row(video, status="duplicate", stage="duplicate",
                        reason=f"duplicate: same content as {video.duplicate_of}", num_frames=0,
                        duplicate_of=video.duplicate_of)


def reason_key(reason: Optional[str], source: Optional[str] = None) -> Optional[str]:
    """A reason without what is particular to one file, for counting: the file's path and every
    number removed (``"filter: too short: # frames at # fps < min_frames #"``), cut at the first
    parenthesis. None for None."""
    if not reason:
        return None
    text = reason
    for p in {source, str(Path(source).resolve()) if source else None} - {None}:
        text = text.replace(p, "")
    text = re.sub(r"(/[^\s:,()]+)+", "", text)  # any other path
    text = re.sub(r"\d+(\.\d+)?", "#", text.split("(")[0])
    text = re.sub(r"\s*:\s*(:\s*)+", ": ", text)
    return re.sub(r"\s+", " ", text).strip(" :")


def note_key(note: Optional[str]) -> Optional[str]:
    """A kept video's ``note`` without numbers, for counting: each ``"; "`` clause through
    :func:`reason_key` (``"crop margin reduced to #"``). None for None."""
    if not note:
        return None
    return "; ".join(k for k in (reason_key(part) for part in note.split("; ")) if k)


def manifest_row(video: InputVideo, **fields) -> dict:
    """A manifest record with every MANIFEST_SCHEMA column (missing ones null)."""
    row = {name: None for name in MANIFEST_SCHEMA.names}
    row.update(source=video.source, video_id=video.video_id, split=video.split, source_id=video.video_id)
    for key, value in fields.items():
        if key not in row:
            raise KeyError(f"manifest has no column {key!r}")
        row[key] = value
    row["reason_key"] = reason_key(row["reason"], video.source)
    row["note_key"] = note_key(row["note"])
    row["loss_key"] = row["loss_key"] or loss_key_for(row["status"], row["stage"], row["reason"])
    return row


def write_manifest(out_dir: str | Path, rows: Iterable[dict]) -> Path:
    """Write ``DIR/videos.parquet`` atomically (MANIFEST_SCHEMA), rows sorted by source."""
    rows = sorted(rows, key=lambda r: (r["source"], r["video_id"]))
    # records of an earlier schema lack the newer columns: null (reason_key / note_key derived)
    rows = [{**{n: None for n in MANIFEST_SCHEMA.names}, **r} for r in rows]
    for r in rows:
        if r["reason_key"] is None and r["reason"]:
            r["reason_key"] = reason_key(r["reason"], r["source"])
        if r["note_key"] is None and r["note"]:
            r["note_key"] = note_key(r["note"])
        if r["loss_key"] is None:
            r["loss_key"] = loss_key_for(r["status"], r["stage"], r["reason"])
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    path = as_location(out_dir) / MANIFEST_NAME
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path
