"""Resume bookkeeping of the ingest job: the output directory's state across runs.

While a job runs, every finished video (ingested or rejected) is recorded as one small JSON file
``DIR/records/<video_id>.json`` (written atomically after its frame file is complete), so a
crashed or interrupted job resumes from exactly the videos that were finished. The rules
(:func:`plan_resume`):

* a video whose record says ``rejected`` is finished (unless ``ingest.retry_rejected``);
* a video whose record says ``ok`` is finished when its frame file exists and holds exactly
  ``num_frames`` rows; otherwise it is redone from scratch;
* a file that changed since the earlier run (new size or mtime, hence a new ``video_id``)
  loses its old record and frame file and is redone;
* a listed input that does not exist is recorded as rejected (stage ``input``) without any work;
* ``*.tmp`` frame files a crashed run left behind are removed (:func:`clean_partial_files`);
* the manifest keeps the finished records of earlier inputs of the same directory that this
  run's ``--input`` does not name (:func:`earlier_records`).

:func:`check_output_dir` refuses a directory that cannot be written, or that holds an ingest of
another frame rate / crop size / weights preset (one directory holds one format).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq

from core.sections import PlatformConfig
from pipelines.errors import PipelineError
from pipelines.manifest import InputVideo, manifest_row
from pipelines.schema import FRAMES_DIR, META_NAME, IngestFormatError, IngestMeta, frames_path

RECORDS_DIR = "records"


class IngestOutputError(PipelineError, OSError):
    """``--output`` cannot be created or written, or holds an ingest of another format."""


def check_output_dir(out_dir: str | Path, cfg: Optional[PlatformConfig] = None) -> Path:
    """Create ``out_dir`` and prove it is writable; with ``cfg``, also check that an earlier
    ingest there used the same frame rate, crop size and weights preset (a resumed directory must
    hold one format). Raises :class:`IngestOutputError` (one line)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / FRAMES_DIR).mkdir(exist_ok=True)
        probe = out / f".write_test_{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise IngestOutputError(f"--output {out_dir}: not writable ({exc.strerror or exc})") from None
    if cfg is not None and (out / META_NAME).is_file():
        try:
            old = IngestMeta.read(out)
        except (IngestFormatError, TypeError, ValueError) as exc:
            raise IngestOutputError(f"--output {out_dir}: holds an unreadable {META_NAME} ({exc}); use a new "
                                    f"output directory") from None
        now = (cfg.ingest.fps, cfg.ingest.crop_size, cfg.weights.preset)
        was = (old.fps, old.crop_size, old.weights.get("preset"))
        if now != was:
            raise IngestOutputError(f"--output {out_dir}: holds an ingest with fps/crop_size/preset {was}, this "
                                    f"run has {now}; use a new output directory")
    return out


class RecordStore:
    """Per-video records of finished videos under ``DIR/records`` (the resume state). A record
    is a manifest row (``manifest.manifest_row``) as JSON."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / RECORDS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        path = self.dir / f"{record['video_id']}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)

    def remove(self, video_id: str) -> None:
        (self.dir / f"{video_id}.json").unlink(missing_ok=True)

    def load(self) -> dict[str, dict]:
        records = {}
        for p in sorted(self.dir.glob("*.json")):
            try:
                rec = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # a damaged record: the video is simply redone
            records[rec["video_id"]] = rec
        return records

    def is_finished(self, record: Optional[dict], retry_rejected: bool = False) -> bool:
        """True when ``record`` needs no work: rejected (unless ``retry_rejected``), or ok with a
        complete frame file holding exactly ``num_frames`` rows."""
        if record is None:
            return False
        if record["status"] == "rejected":
            return not retry_rejected
        path = frames_path(self.out_dir, record["video_id"])
        if not path.is_file():
            return False
        try:
            return pq.ParquetFile(path).metadata.num_rows == record["num_frames"]
        except Exception:  # unreadable file: redo it
            return False


def clean_partial_files(out_dir: str | Path) -> list[Path]:
    """Remove ``*.tmp`` frame files a crashed run left behind; returns what was removed."""
    removed = []
    for p in (Path(out_dir) / FRAMES_DIR).glob("*.tmp"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@dataclass
class ResumePlan:
    """What this run does with each input (see the module docstring).

    records: video_id -> manifest record already final for this run (finished earlier, or a
        missing input rejected now); todo: the videos to send through the pipeline; skipped: how
        many were finished by an earlier run; previous: every record found (after dropping those
        of changed files), for :func:`earlier_records`.
    """

    records: dict[str, dict] = field(default_factory=dict)
    todo: list[InputVideo] = field(default_factory=list)
    skipped: int = 0
    previous: dict[str, dict] = field(default_factory=dict)


def plan_resume(videos: list[InputVideo], store: RecordStore, retry_rejected: bool) -> ResumePlan:
    """Compare this run's inputs with the records of ``store``'s directory and prepare it: removes
    leftover ``*.tmp`` files, the records and frame files of changed inputs and the frame files of
    videos about to be redone; records missing inputs as rejected (stage ``input``)."""
    out = store.out_dir
    clean_partial_files(out)
    previous = store.load()
    current_ids = {v.video_id for v in videos}
    current_sources = {v.source for v in videos}
    # a file that changed since an earlier run has a new id: its old record and frames go
    for rec in list(previous.values()):
        if rec["source"] in current_sources and rec["video_id"] not in current_ids:
            frames_path(out, rec["video_id"]).unlink(missing_ok=True)
            store.remove(rec["video_id"])
            del previous[rec["video_id"]]

    plan = ResumePlan(previous=previous)
    for v in videos:
        rec = previous.get(v.video_id)
        if store.is_finished(rec, retry_rejected):
            rec.update(source=v.source, split=v.split)
            plan.records[v.video_id] = rec
            plan.skipped += 1
        elif not v.path.is_file():
            rec = manifest_row(v, status="rejected", stage="input", reason=f"input: {v.path}: file not found",
                               num_frames=0)
            store.write(rec)
            plan.records[v.video_id] = rec
        else:
            frames_path(out, v.video_id).unlink(missing_ok=True)  # redo from scratch
            plan.todo.append(v)
    return plan


def earlier_records(plan: ResumePlan, records: dict[str, dict], videos: list[InputVideo],
                    store: RecordStore) -> list[dict]:
    """Finished records of earlier inputs of the directory that this run neither names nor has
    in ``records`` (they stay in the manifest)."""
    current_sources = {v.source for v in videos}
    return [rec for rec in plan.previous.values()
            if rec["video_id"] not in records and rec["source"] not in current_sources
            and store.is_finished(rec, retry_rejected=False)]
