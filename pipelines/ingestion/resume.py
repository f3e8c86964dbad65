"""Resume bookkeeping of the ingest job: the output directory's state across runs.

While a job runs, every finished video (ingested or rejected) is recorded as one small JSON file
``DIR/records/<video_id>.json`` (written atomically after its frame file is complete), so a
crashed or interrupted job resumes from exactly the videos that were finished. The rules
(:func:`plan_resume`):

* a video whose record says ``rejected`` is finished (unless ``ingest.retry_rejected``);
* a video whose record says ``ok`` is finished when its frame file exists and holds exactly
  ``num_frames`` rows; otherwise it is redone from scratch;
* a file whose content changed since the earlier run (hence a new content ``video_id``)
  loses its old record and frame file and is redone;
* a long source is done range by range (``pipelines/ingestion/units.py``): a range is finished
  when its unit record ``DIR/records/units/<range id>.json`` names its samples and each of them
  is finished, and a source when ``DIR/records/sources/<video_id>.json`` names its ranges; a rerun
  screens an unfinished source again and redoes only its unfinished ranges
  (:attr:`ResumePlan.done_units`);
* a listed input that does not exist is recorded as rejected (stage ``input``) without any work;
* ``*.tmp`` frame files a crashed run left behind are removed (:func:`clean_partial_files`);
* the manifest keeps the finished records of earlier inputs of the same directory that this
  run's ``--input`` does not name (:func:`earlier_records`).

:func:`check_output_dir` refuses a directory that cannot be written, or that holds an ingest of
another frame rate / crop size / weights preset (one directory holds one format).
:func:`claim_output_dir` then compares the run's :func:`ingest_fingerprint` (every setting that
changes what is written) with ``DIR/ingest_fingerprint.json``: a directory written with another
configuration is refused, naming the settings that differ; a new directory gets the file at the
START of the run (temp file + rename), so even a run that dies on its first video has claimed it.

Statuses: ``rejected`` (the file is bad) and ``duplicate`` are final; ``failed`` (a worker killed,
a node lost: not the file's fault) is always retried by the next run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq

from core.atomic_files import temp_files_of, write_json_atomic
from core.storage import Location, StoragePath, as_location, check_location, parquet_source, remove_tree
from core.sections import PlatformConfig
from core.weights import WeightPaths
from pipelines.dataset.manifest import InputVideo, manifest_row
from pipelines.dataset.schema import (
    FRAMES_DIR,
    META_NAME,
    SCHEMA_VERSION,
    IngestFormatError,
    IngestMeta,
    frames_path,
)
from pipelines.errors import PipelineError
from pipelines.ingestion.frame_writer import PARTS_SUFFIX

RECORDS_DIR = "records"
UNITS_DIR = "units"  # DIR/records/units/<range id>.json: a finished range and its rows
SOURCES_DIR = "sources"  # DIR/records/sources/<video_id>.json: a source whose ranges are all finished
FINGERPRINT_NAME = "ingest_fingerprint.json"

# IngestConfig fields that change how the job runs, not what it writes (left out of the
# fingerprint); every other field (fps, crop, detector and its scale settings, filters, limits,
# split) is in it, so a field added later is covered unless listed here
RUN_ONLY_FIELDS = frozenset({
    "chunk_frames", "num_decode_workers", "model_batch_size", "use_gpu", "retry_rejected",
    "num_detect_actors", "num_audio_actors", "num_vae_actors", "stage_num_cpus", "model_num_gpus",
    "max_task_retries", "max_chunk_mb", "deadline_base_s", "deadline_per_s", "fault_hang_match",
    "fault_kill_match", "fault_decode_hang_match",
})


class IngestOutputError(PipelineError, OSError):
    """``--output`` cannot be created or written, or holds an ingest of another format."""


def check_output_dir(out_dir: str | Path, cfg: Optional[PlatformConfig] = None) -> Path:
    """Create ``out_dir`` and prove it is writable; with ``cfg``, also check that an earlier
    ingest there used the same frame rate, crop size and weights preset (a resumed directory must
    hold one format). Raises :class:`IngestOutputError` (one line)."""
    out = check_location(out_dir, "--output")  # a bucket URI: scheme, credentials, bucket (core/storage.py)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / FRAMES_DIR).mkdir(exist_ok=True)
        probe = out / f".write_test_{os.getpid()}"
        write_json_atomic(probe, "ok")
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


def weights_id(location: Optional[str]) -> Optional[str]:
    """Id of one set of weights: a hub id as is; a local folder: sha256 of its ``config.json``
    and the names and sizes of its files (not their bytes: gigabytes)."""
    if location is None:
        return None
    folder = Path(location)
    if not folder.exists():
        return location
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            h.update(f"{rel}:{p.stat().st_size}|".encode())
            if p.name == "config.json":
                h.update(p.read_bytes())
    return "sha256:" + h.hexdigest()[:16]


def ingest_fingerprint(cfg: PlatformConfig, weights: WeightPaths) -> dict:
    """``{"fingerprint": hex, "settings": {...}}``: every output-affecting setting (the
    ``ingest`` fields but :data:`RUN_ONLY_FIELDS`, the schema version, the weights preset and
    ids) and the sha256 of their canonical JSON."""
    settings = {f"ingest.{k}": v for k, v in dataclasses.asdict(cfg.ingest).items() if k not in RUN_ONLY_FIELDS}
    settings.update({"schema_version": SCHEMA_VERSION, "weights.preset": cfg.weights.preset,
                     "weights.vae": weights_id(weights.vae), "weights.wav2vec2": weights_id(weights.wav2vec2),
                     "weights.dwpose": weights_id(weights.dwpose_dir)})
    blob = json.dumps(settings, sort_keys=True, default=str)
    return {"fingerprint": hashlib.sha256(blob.encode()).hexdigest()[:16], "settings": json.loads(blob)}


def claim_output_dir(out: Location, fingerprint: dict) -> None:
    """Refuse ``out`` when its ``ingest_fingerprint.json`` differs from ``fingerprint`` (naming
    the settings that differ); write it when absent (atomically). Raises
    :class:`IngestOutputError`."""
    path = as_location(out) / FINGERPRINT_NAME
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            old_fp, old_settings = old["fingerprint"], old.get("settings", {})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IngestOutputError(f"--output {out}: unreadable {FINGERPRINT_NAME} ({exc}); use a new output "
                                    f"directory") from None
        if old_fp != fingerprint["fingerprint"]:
            now = fingerprint["settings"]
            diff = sorted(k for k in set(old_settings) | set(now) if old_settings.get(k) != now.get(k))
            shown = ", ".join(f"{k}: {old_settings.get(k)!r} -> {now.get(k)!r}" for k in diff[:6])
            more = f" and {len(diff) - 6} more" if len(diff) > 6 else ""
            raise IngestOutputError(f"--output {out}: written with another configuration ({shown}{more}); "
                                    f"use a new output directory or the same settings")
        return
    write_json_atomic(path, fingerprint, indent=2, sort_keys=True)


class RecordStore:
    """Per-video records of finished videos under ``DIR/records`` (the resume state). A record
    is a manifest row (``manifest.manifest_row``) as JSON."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = as_location(out_dir)
        self.dir = self.out_dir / RECORDS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        write_json_atomic(self.dir / f"{record['video_id']}.json", record)

    def write_unit(self, unit_id: str, source_id: str, sample_ids: list[str]) -> None:
        """A finished range: the ids of the manifest rows (samples, rejected ranges) it gave."""
        (self.dir / UNITS_DIR).mkdir(exist_ok=True)
        write_json_atomic(self.dir / UNITS_DIR / f"{unit_id}.json",
                          {"unit_id": unit_id, "source_id": source_id, "samples": sorted(sample_ids)})

    def write_source(self, source_id: str, unit_ids: list[str]) -> None:
        """A source whose every range is finished."""
        (self.dir / SOURCES_DIR).mkdir(exist_ok=True)
        write_json_atomic(self.dir / SOURCES_DIR / f"{source_id}.json",
                          {"source_id": source_id, "units": sorted(unit_ids)})

    def _load_dir(self, name: str, key: str) -> dict[str, dict]:
        out = {}
        for p in sorted((self.dir / name).glob("*.json"), key=str):
            try:
                rec = json.loads(p.read_text())
                out[rec[key]] = rec
            except (OSError, json.JSONDecodeError, KeyError):
                continue  # a damaged record: that range is simply redone
        return out

    def load_units(self) -> dict[str, dict]:
        return self._load_dir(UNITS_DIR, "unit_id")

    def load_sources(self) -> dict[str, dict]:
        return self._load_dir(SOURCES_DIR, "source_id")

    def remove(self, video_id: str) -> None:
        (self.dir / f"{video_id}.json").unlink(missing_ok=True)

    def load(self) -> dict[str, dict]:
        records = {}
        for p in sorted(self.dir.glob("*.json"), key=str):
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
        if record["status"] == "failed":  # infrastructure failure: always retried
            return False
        if record["status"] == "rejected":
            return not retry_rejected
        path = frames_path(self.out_dir, record["video_id"])
        if not path.is_file():
            return False
        try:
            return pq.ParquetFile(parquet_source(path)).metadata.num_rows == record["num_frames"]
        except Exception:  # unreadable file: redo it
            return False


def parts_dir(out_dir: str | Location, video_id: str) -> Location:
    """``frames/<video_id>.parts``: where the workers write one video's chunk files."""
    return as_location(out_dir) / FRAMES_DIR / f"{video_id}{PARTS_SUFFIX}"


def remove_video_files(out_dir: str | Path, video_id: str) -> None:
    """A video's frame file, its temp file and its chunk folder (redo or reject)."""
    path = frames_path(out_dir, video_id)
    path.unlink(missing_ok=True)
    for tmp in temp_files_of(path):  # a crashed writer's (core.atomic_files names them)
        tmp.unlink(missing_ok=True)
    remove_tree(parts_dir(out_dir, video_id))


def clean_partial_files(out_dir: str | Path) -> list[Path]:
    """Remove ``*.tmp`` frame files and ``*.parts`` chunk folders a crashed run left behind;
    returns what was removed."""
    removed = []
    out = as_location(out_dir)
    # temp files / keys of crashed writers: frame files, and (in a bucket) records, manifest, meta
    folders = [out / FRAMES_DIR] + ([out, out / RECORDS_DIR] if isinstance(out, StoragePath) else [])
    for folder in folders:
        for p in folder.glob(".*.tmp" if isinstance(out, StoragePath) else "*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
    for p in (out / FRAMES_DIR).glob(f"*{PARTS_SUFFIX}"):
        remove_tree(p)
        removed.append(p)
    return removed


@dataclass
class ResumePlan:
    """What this run does with each input (see the module docstring).

    records: video_id -> manifest record already final for this run (finished earlier, or a
        missing input rejected now); todo: the videos to send through the pipeline; skipped: how
        many were finished by an earlier run; previous: every record found (after dropping those
        of changed files), for :func:`earlier_records`; done_units: source video_id -> {range id:
        its finished records} of the sources in ``todo`` (those ranges are not redone).
    """

    records: dict[str, dict] = field(default_factory=dict)
    todo: list[InputVideo] = field(default_factory=list)
    skipped: int = 0
    previous: dict[str, dict] = field(default_factory=dict)
    done_units: dict[str, dict[str, list[dict]]] = field(default_factory=dict)


def source_of(record: dict) -> str:
    """The content id of the file a manifest record came from (records written before ranges
    existed have no ``source_id``: their ``video_id`` is it)."""
    return record.get("source_id") or record["video_id"]


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
        if rec["source"] in current_sources and source_of(rec) not in current_ids:
            remove_video_files(out, rec["video_id"])
            store.remove(rec["video_id"])
            del previous[rec["video_id"]]
    units, sources = store.load_units(), store.load_sources()

    def finished_unit(unit: dict) -> Optional[list[dict]]:
        recs = [previous.get(sid) for sid in unit["samples"]]
        if recs and all(store.is_finished(r, retry_rejected) for r in recs):
            return recs
        return None

    plan = ResumePlan(previous=previous)
    for v in videos:
        if v.duplicate_of is not None:  # a copy of another input: recorded by the caller, never ingested
            continue
        rec = previous.get(v.video_id)
        src = sources.get(v.video_id)
        src_recs = None
        if src is not None:
            parts = [finished_unit(units[u]) if u in units else None for u in src["units"]]
            src_recs = None if any(p is None for p in parts) else [r for p in parts for r in p]
        if src_recs is not None or (src is None and store.is_finished(rec, retry_rejected)):
            for r in src_recs or [rec]:
                r.update(source=v.source, split=v.split)
                plan.records[r["video_id"]] = r
            plan.skipped += 1
        elif not v.path.is_file():
            rec = manifest_row(v, status="rejected", stage="input", reason=f"input: {v.path}: file not found",
                               num_frames=0)
            store.write(rec)
            plan.records[v.video_id] = rec
        else:
            done = {}
            for uid, unit in units.items():
                if unit.get("source_id") == v.video_id:
                    recs = finished_unit(unit)
                    if recs is not None:
                        done[uid] = recs
            keep = {r["video_id"] for recs in done.values() for r in recs}
            for r in list(previous.values()):  # the rows of unfinished ranges: redone from scratch
                if source_of(r) == v.video_id and r["video_id"] not in keep:
                    remove_video_files(out, r["video_id"])
            if v.video_id not in keep:
                remove_video_files(out, v.video_id)
            plan.done_units[v.video_id] = done
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
