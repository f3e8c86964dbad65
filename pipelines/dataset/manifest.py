"""Input discovery, stable video ids, deterministic splits and the manifest of an ingest run.

The manifest is ``DIR/videos.parquet`` (``schema.MANIFEST_SCHEMA``), one row per sample (a shot
of a source, ``video_id`` = :func:`sample_id`; ``source_id``, ``start_s``, ``end_s`` name the
range) or per rejected range / refused file.
The per-video records a running job keeps for resuming (``DIR/records/``) are
``pipelines/ingestion/resume.py``'s.
"""
from __future__ import annotations

import csv
import datetime
import hashlib
import io
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, NamedTuple, Optional

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
class Clip:
    """The part of a file an input-list row asks for: seconds from the file's first video frame,
    ``end_s`` None = to the end of the file."""

    start_s: float
    end_s: Optional[float] = None

    def label(self) -> str:
        return f"{self.start_s:.3f}-{'end' if self.end_s is None else f'{self.end_s:.3f}'} s"

    def overlaps(self, other: "Clip") -> bool:
        a_end = float("inf") if self.end_s is None else self.end_s
        b_end = float("inf") if other.end_s is None else other.end_s
        return self.start_s < b_end and other.start_s < a_end


@dataclass(frozen=True)
class InputVideo:
    """One input of the job: a whole file, or one clip of it (an input-list row with a time range).

    ``video_id`` names the input everywhere in the job (records, ranges, sample ids): the file's
    content id for a whole file, :func:`clip_id` for a clip. ``content_id`` is always the file's
    (what the split and the duplicate check go by)."""

    source: str  # the path as given (list entries: as written in the list)
    path: Location  # resolved absolute path or bucket object (may not exist for a list entry: rejected as "input")
    video_id: str  # 16 hex digits: the content id (video_id_for), or clip_id for a clip
    split: str  # "train" | "test"
    duplicate_of: Optional[str] = None  # source of an earlier input with the same content (and clip)
    # a duplicate whose frames only overlap the earlier input's (a clip on either side), not a copy
    duplicate_overlaps: bool = False
    clip: Optional[Clip] = None  # the time range an input-list row asked for; None = the whole file
    content_id: Optional[str] = None  # the file's content id (None: the same as video_id)


class InputEntry(NamedTuple):
    """One entry of ``--input``: the source as given, its resolved location and the clip its
    input-list row names (None: the whole file)."""

    source: str
    path: Location
    clip: Optional[Clip] = None


def clip_id(content_id: str, clip: Clip) -> str:
    """The id of a clip of a file: 16 hex digits of sha256 over the file's content id and the
    clip's start and end in milliseconds (the same row gives the same id in every run)."""
    end = "end" if clip.end_s is None else str(int(round(clip.end_s * 1000)))
    key = f"{content_id}|{int(round(clip.start_s * 1000))}|{end}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


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
#: pairs of columns that give each row a time range (as public datasets list clips); the first
#: pair with a column present is used. Values: seconds (``12.5``) or ``[HH:]MM:SS[.fff]``.
RANGE_COLUMNS = (("start_s", "end_s"), ("start", "end"), ("start_time", "end_time"))
_TIME = re.compile(r"^(?:(\d+):)?(\d+):(\d+(?:\.\d*)?)$")


def parse_time(value, where: str) -> Optional[float]:
    """Seconds from a list cell: a number, ``"12.5"`` or ``"[HH:]MM:SS[.fff]"``; None for an empty
    cell. Raises :class:`IngestInputError` naming ``where`` (the list, row and column)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, datetime.timedelta):  # a Parquet duration column
        seconds = value.total_seconds()
    elif isinstance(value, datetime.time):  # a Parquet time-of-day column: hours into the file
        seconds = value.hour * 3600 + value.minute * 60 + value.second + value.microsecond / 1e6
    else:
        text = str(value).strip()
        if not text:
            return None
        m = _TIME.match(text)
        try:
            seconds = (int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))) if m else float(text)
        except ValueError:
            raise IngestInputError(f"{where}: {text!r} is not a time (seconds or [HH:]MM:SS[.fff])") from None
    if not (seconds >= 0.0) or seconds == float("inf"):
        raise IngestInputError(f"{where}: {value!r} is not a time of the file (negative or not finite)")
    return seconds


def _clip_of(start, end, where: str, columns: tuple[Optional[str], Optional[str]]) -> Optional[Clip]:
    """The clip of a row (None: no range, the whole file); ``end`` must be after ``start``;
    ``columns``: the names of the start and end columns (for the error)."""
    start_s, end_s = parse_time(start, f"{where} {columns[0]}"), parse_time(end, f"{where} {columns[1]}")
    if start_s is None and end_s is None:
        return None
    clip = Clip(start_s or 0.0, end_s)
    if clip.end_s is not None and clip.end_s <= clip.start_s:
        raise IngestInputError(f"{where}: the range ends ({clip.end_s:g} s) before it starts ({clip.start_s:g} s)")
    return clip


def list_entries(listing: Location) -> list[tuple[str, Optional[Clip]]]:
    """The entries of an input list, each (file as written, clip or None): a ``.txt`` (one path or
    URI per line, the whole file; blank lines and ``#`` comments skipped) or a ``.csv`` /
    ``.parquet`` table (the column ``uri``, ``path``, ``source``, ``url`` or ``video``, and optional
    time ranges in ``start_s`` / ``end_s``, ``start`` / ``end`` or ``start_time`` / ``end_time``,
    the way public datasets are distributed; a row with both empty is the whole file). Raises
    :class:`IngestInputError` naming the list, the row (1 = the first data row) and the column."""
    if listing.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in listing.read_text().splitlines()]
        return [(ln, None) for ln in lines if ln and not ln.startswith("#")]
    import pyarrow.csv as pacsv

    try:
        if listing.suffix.lower() == ".parquet":
            table = pq.read_table(parquet_source(listing))
        else:
            # every column read as text: pyarrow would type "01:02" as time32 (1 h 2 min), not 62 s
            data = listing.read_bytes()
            header = next(csv.reader(io.StringIO(data.split(b"\n", 1)[0].decode("utf-8", "replace"))), [])
            table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in header}, strings_can_be_null=True))
    except (pa.ArrowInvalid, OSError) as exc:
        raise IngestInputError(f"--input {listing}: unreadable list ({str(exc).splitlines()[0]})") from None
    names = {n.lower(): n for n in table.column_names}
    column = next((names[c] for c in LIST_COLUMNS if c in names), None)
    if column is None:
        raise IngestInputError(f"--input {listing}: no column naming the files (one of {', '.join(LIST_COLUMNS)}); "
                               f"columns: {', '.join(table.column_names)}")
    pair = next(((names.get(a), names.get(b)) for a, b in RANGE_COLUMNS if a in names or b in names), (None, None))
    files = table[column].to_pylist()
    starts = table[pair[0]].to_pylist() if pair[0] else [None] * len(files)
    ends = table[pair[1]].to_pylist() if pair[1] else [None] * len(files)
    out = []
    for n, (value, start, end) in enumerate(zip(files, starts, ends), start=1):
        if value is None or not str(value).strip():
            continue
        out.append((str(value).strip(), _clip_of(start, end, f"--input {listing}: row {n}", pair)))
    return out


def expand_inputs(input_path: str | Path) -> list[InputEntry]:
    """``--input`` -> [:class:`InputEntry` (source as given, resolved path, clip)].

    * a folder: every file with a video extension below it (recursive), sorted; whole files;
    * a ``.txt`` file: one path per line (blank lines and ``#`` comments skipped; relative paths
      are relative to the list's folder), or a ``.csv`` / ``.parquet`` table of paths / URIs with
      optional time ranges (:func:`list_entries`); listed files that do not exist are kept (they
      end as a rejected manifest row);
    * any other file: that one file.
    ``input_path`` and the list's entries may be bucket URIs (``s3://bucket/raw/``: every video
    object under the prefix; core/storage.py).
    Raises :class:`IngestInputError` when ``input_path`` does not exist or yields no file, or a
    list row's range is malformed, and :class:`core.storage.StorageError` for an unusable URI
    (scheme, bucket, credentials).
    """
    given = check_location(input_path, "--input")
    if not given.exists():
        raise IngestInputError(f"--input {input_path}: no such file or directory")
    out: list[InputEntry] = []
    if given.is_dir():
        for p in sorted(given.rglob("*"), key=str):  # a prefix's listing holds objects only
            if p.suffix.lower() in VIDEO_EXTENSIONS and (isinstance(p, StoragePath) or p.is_file()):
                out.append(InputEntry(str(p), p.resolve()))
        if not out:
            raise IngestInputError(f"--input {input_path}: folder holds no video files ({', '.join(VIDEO_EXTENSIONS)})")
    elif given.suffix.lower() in (".txt", ".csv", ".parquet"):
        for line, clip in list_entries(given):
            p = check_location(line, f"--input {input_path}: entry")
            if not p.is_absolute():
                p = given.parent / str(p)
            out.append(InputEntry(line, p.resolve(), clip))
        if not out:
            raise IngestInputError(f"--input {input_path}: the list names no files")
    else:
        out.append(InputEntry(str(given), given.resolve()))
    return out


def plan_inputs(input_path: str | Path, test_fraction: float,
                split_key: Literal["video", "folder"] = "video", hash_threads: int = 8) -> list[InputVideo]:
    """Expand ``--input`` and give every distinct input its id and split. An entry named twice
    (the same path and clip) is kept once. A second file with the same content (a copy), or a
    second clip of a file that overlaps an earlier clip of the same content (or a whole file and
    a clip of it), is kept with ``duplicate_of`` = the earlier one's source (it is recorded as a
    duplicate and never ingested: no frame is ingested twice, and one content never lands in both
    splits). The split goes by the file's content id (or folder), so every clip of a file is in
    the same split. Files are hashed once each, on ``hash_threads`` threads (reading is I/O bound;
    hashlib releases the GIL)."""
    entries, seen = [], set()
    for entry in expand_inputs(input_path):
        if (entry.path, entry.clip) not in seen:
            seen.add((entry.path, entry.clip))
            entries.append(entry)
    paths = list(dict.fromkeys(e.path for e in entries))
    with ThreadPoolExecutor(max_workers=max(1, hash_threads)) as pool:
        content = dict(zip(paths, pool.map(video_id_for, paths)))
    taken: dict[str, list[InputVideo]] = {}  # content id -> its inputs kept so far
    videos = []
    for entry in entries:
        cid = content[entry.path]
        vid = cid if entry.clip is None else clip_id(cid, entry.clip)
        earlier = taken.get(cid, [])
        whole = Clip(0.0)
        clash = next((v for v in earlier if (v.clip or whole).overlaps(entry.clip or whole)), None)
        if clash is not None:
            what = clash.source if clash.clip is None else f"{clash.source} [{clash.clip.label()}]"
            videos.append(InputVideo(source=entry.source, path=entry.path, video_id=vid, split=clash.split,
                                     duplicate_of=what, clip=entry.clip, content_id=cid,
                                     duplicate_overlaps=clash.clip is not None or entry.clip is not None))
            continue
        split = earlier[0].split if earlier else split_for(split_key_of(entry.path, cid, split_key), test_fraction)
        video = InputVideo(source=entry.source, path=entry.path, video_id=vid, split=split, clip=entry.clip,
                           content_id=cid)
        taken.setdefault(cid, []).append(video)
        videos.append(video)
    return videos


def duplicate_row(video: InputVideo) -> dict:
    """The manifest row of a copy of another input (status ``duplicate``, naming the original)."""
    if video.duplicate_overlaps:  # a clip, or a whole file, overlapping an earlier input's frames
        reason = f"duplicate: overlaps {video.duplicate_of} (same content)"
    else:
        reason = f"duplicate: same content as {video.duplicate_of}"
    return manifest_row(video, status="duplicate", stage="duplicate", reason=reason, num_frames=0,
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
    if video.clip is not None:
        row.update(clip_start_s=video.clip.start_s, clip_end_s=video.clip.end_s)
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
