"""Input discovery, stable video ids, deterministic splits and the manifest of an ingest run.

The manifest is ``DIR/videos.parquet`` (``schema.MANIFEST_SCHEMA``), one row per input file.
The per-video records a running job keeps for resuming (``DIR/records/``) are
``pipelines/resume.py``'s.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.errors import PipelineError
from pipelines.schema import MANIFEST_NAME, MANIFEST_SCHEMA

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".avi", ".webm")


class IngestInputError(PipelineError, ValueError):
    """The ``--input`` argument names nothing usable (missing path, empty folder or list)."""


@dataclass(frozen=True)
class InputVideo:
    """One input file of the job."""

    source: str  # the path as given (list entries: as written in the list)
    path: Path  # resolved absolute path (may not exist for a list entry: rejected as "input")
    video_id: str  # 16 hex digits, stable while the file is unchanged
    split: str  # "train" | "test"


def video_id_for(path: Path) -> str:
    """Stable id of a file: hash of its resolved path, size and mtime (ns). 16 hex digits.

    A changed file (new size or mtime) gets a new id, so resume re-ingests it.
    """
    path = Path(path).resolve()
    try:
        st = path.stat()
        key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        key = f"{path}|missing"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def split_for(key: str, test_fraction: float) -> str:
    """Deterministic split: ``test`` when the hash of ``key`` falls below ``test_fraction``."""
    h = int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / float(1 << 64)
    return "test" if h < test_fraction else "train"


def split_key_of(path: Path, video_id: str, split_key: Literal["video", "folder"]) -> str:
    """What the split hashes: the video id, or the parent folder's name (one person per folder
    never lands in both splits)."""
    if split_key == "folder":
        return f"folder:{Path(path).parent.name}"
    return f"video:{video_id}"


def expand_inputs(input_path: str | Path) -> list[tuple[str, Path]]:
    """``--input`` -> [(source as given, resolved path)].

    * a folder: every file with a video extension below it (recursive), sorted;
    * a ``.txt`` file: one path per line (blank lines and ``#`` comments skipped; relative paths
      are relative to the list's folder); listed files that do not exist are kept (they end as a
      rejected manifest row);
    * any other file: that one file.
    Raises :class:`IngestInputError` when ``input_path`` does not exist or yields no file.
    """
    given = Path(input_path)
    if not given.exists():
        raise IngestInputError(f"--input {input_path}: no such file or directory")
    out: list[tuple[str, Path]] = []
    if given.is_dir():
        for p in sorted(given.rglob("*")):
            if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS:
                out.append((str(p), p.resolve()))
        if not out:
            raise IngestInputError(f"--input {input_path}: folder holds no video files ({', '.join(VIDEO_EXTENSIONS)})")
    elif given.suffix.lower() == ".txt":
        for line in given.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line)
            if not p.is_absolute():
                p = given.parent / p
            out.append((line, p.resolve()))
        if not out:
            raise IngestInputError(f"--input {input_path}: the list names no files")
    else:
        out.append((str(given), given.resolve()))
    return out


def plan_inputs(input_path: str | Path, test_fraction: float,
                split_key: Literal["video", "folder"] = "video") -> list[InputVideo]:
    """Expand ``--input`` and give every distinct file its id and split (duplicates dropped)."""
    seen: set[str] = set()
    videos = []
    for source, path in expand_inputs(input_path):
        vid = video_id_for(path)
        if vid in seen:
            continue
        seen.add(vid)
        split = split_for(split_key_of(path, vid, split_key), test_fraction)
        videos.append(InputVideo(source=source, path=path, video_id=vid, split=split))
    return videos


def manifest_row(video: InputVideo, **fields) -> dict:
    """A manifest record with every MANIFEST_SCHEMA column (missing ones null)."""
    row = {name: None for name in MANIFEST_SCHEMA.names}
    row.update(source=video.source, video_id=video.video_id, split=video.split)
    for key, value in fields.items():
        if key not in row:
            raise KeyError(f"manifest has no column {key!r}")
        row[key] = value
    return row


def write_manifest(out_dir: str | Path, rows: Iterable[dict]) -> Path:
    """Write ``DIR/videos.parquet`` atomically (MANIFEST_SCHEMA), rows sorted by source."""
    rows = sorted(rows, key=lambda r: (r["source"], r["video_id"]))
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    path = Path(out_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path
