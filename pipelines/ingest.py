#!/usr/bin/env python
"""Command line of the ingest job: raw talking-head videos -> training-ready Parquet (Ray Data).

    python pipelines/ingest.py --input PATH --output DIR [--config FILE] [section.key=value ...]
    python -m pipelines.ingest ...        (same; also the console script ``loopy-ingest``)

``PATH`` is a video file, a folder (recursive *.mp4/*.mov/*.mkv/*.avi/*.webm) or a ``.txt`` list
of paths. With no ``--config`` the embedded default runs (tiny preset, local Ray on 127.0.0.1);
under ``ray job submit -- python pipelines/ingest.py ...`` it joins the cluster (RAY_ADDRESS).
Running it as a file needs the project importable: it is pip-installed (editable) here, and
``ray job submit --working-dir`` puts the working directory on ``PYTHONPATH``.

A wrong ``--input``, an unwritable ``--output`` (or one holding another format), a bad config or
an unreadable model config is a one-line error on stderr and exit status 2, before Ray starts.
Otherwise every per-video failure becomes a rejected manifest row, the job finishes the rest,
prints the summary as one JSON line and exits 0. The job itself (stages, resume, output files)
is :func:`pipelines.ingestion.job.run_ingest`; the module layout is:

* ``pipelines/ingestion/job.py``: ``run_ingest``, the Ray Data graph, the driver's stream loop;
* ``pipelines/ingestion/stages.py``: the CPU stages (analysis, decode + crop), no torch;
* ``pipelines/ingestion/model_stages.py``: the model stages (wav2vec2 features, VAE latents);
* ``pipelines/ingestion/frame_writer.py``: per-chunk rows -> ``frames/<video_id>.parquet`` in frame order;
* ``pipelines/ingestion/resume.py``: output-directory checks and the per-video records of finished videos;
* ``pipelines/ingestion/meta.py``: ``ingest_meta.json`` and the model-config facts it records;
* ``pipelines/dataset/manifest.py``: inputs, video ids, splits, ``videos.parquet``;
* ``pipelines/ingestion/watchdog.py``: the per-video deadline (analysis in a killable child process).

Tracking: each run of :func:`main` is an MLflow run (``tracking.*``; tag ``loopy.job=ingest``):
params = the ``ingest``, ``weights`` and ``ray`` sections and the output fingerprint; metrics =
counts by status, stage and reason, hours kept and offered, hours lost per loss key
(``hours_lost.<key>``, pipelines/dataset/losses.py), wall time; artifacts = the manifest,
``ingest_meta.json``, the fingerprint and the summary. ``DIR/ingest_run.json`` (``run_id``,
``tracking_uri``, ``experiment``, ``fingerprint``) is written when the run starts, atomically, so
training can log the dataset as an input of its runs. The run is written with the ground floor's
run logger (:mod:`core.run_logging`), the same one training uses.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

from core.atomic_files import write_json_atomic
from core.config import ConfigError, add_config_arguments, flatten, load_platform_config
from core.paths import resolve_tracking_uri
from core.run_logging import INGEST_RUN_FILE, JOB_TAG, RunLogger, ensure_experiment
from pipelines.dataset.manifest import IngestInputError
from pipelines.dataset.schema import MANIFEST_NAME, META_NAME
from pipelines.errors import PipelineError
from pipelines.ingestion.job import (
    IngestSummary,
    PreparedIngest,
    prepare_ingest,
    run_ingest,
    run_prepared,
)
from pipelines.ingestion.meta import ModelConfigError
from pipelines.ingestion.resume import FINGERPRINT_NAME, IngestOutputError

__all__ = ["IngestInputError", "IngestOutputError", "IngestSummary", "ModelConfigError", "main", "run_ingest",
           "run_tracked"]

RUN_FILE = INGEST_RUN_FILE  # DIR/ingest_run.json: the MLflow run that wrote DIR last


def _metric_key(prefix: str, name: str) -> str:
    """An MLflow metric name (letters, digits, ``_-. /`` only) for a count of ``name``."""
    clean = re.sub(r"[^0-9A-Za-z_\-. /]+", "_", str(name)).strip("_ ")
    return f"{prefix}.{clean[:200]}"


def run_tracked(prepared: PreparedIngest, echo: Callable[[str], None] = print) -> IngestSummary:
    """:func:`run_prepared` as one MLflow run (see the module docstring). The run ends FINISHED,
    FAILED when the job raised, KILLED on Ctrl-C / SystemExit."""
    from mlflow.tracking import MlflowClient

    cfg, out = prepared.cfg, prepared.out
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.create_run(ensure_experiment(cfg.tracking), run_name=f"ingest-{out.name}",
                            tags={JOB_TAG: "ingest", "loopy.output_dir": str(out)})
    logger = RunLogger(cfg.tracking, run.info.run_id)
    fingerprint = prepared.fingerprint.get("fingerprint", "")
    write_json_atomic(out / RUN_FILE, {"run_id": run.info.run_id, "tracking_uri": tracking_uri,
                                       "experiment": cfg.tracking.experiment, "fingerprint": fingerprint})
    params = flatten({"ingest": asdict(cfg.ingest), "weights": asdict(cfg.weights), "ray": asdict(cfg.ray)})
    params.update({"output_dir": str(out), "inputs": len(prepared.videos), "fingerprint": fingerprint})
    logger.log_params(params)
    status = "FAILED"
    try:
        summary = run_prepared(prepared, echo)
        metrics = {"inputs": summary.inputs, "ok": summary.ok, "rejected": summary.rejected,
                   "failed": summary.failed, "duplicates": summary.duplicates, "skipped": summary.skipped,
                   "processed": summary.processed, "frames_written": summary.frames_written,
                   "hours_kept": summary.hours_kept, "hours_input": summary.hours_input, "wall_s": summary.wall_s,
                   "driver_bytes": summary.driver_bytes}
        for prefix, counts in (("status", summary.by_status), ("stage", summary.by_stage),
                               ("reason", summary.by_reason), ("note", summary.by_note),
                               ("hours_lost", summary.hours_lost)):
            for name, n in counts.items():
                metrics[_metric_key(prefix, name)] = n
        logger.log_metrics(metrics, step=0)
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "ingest_summary.json"
            report.write_text(json.dumps(asdict(summary), indent=2, default=str))
            logger.log_artifact(report)
        for name in (MANIFEST_NAME, META_NAME, FINGERPRINT_NAME) if not summary.store_error else ():
            if (out / name).is_file():
                logger.log_artifact(out / name)
        status = "FINISHED"
        return summary
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        logger.end(status)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipelines/ingest.py",
        description="Ingest raw talking-head videos into training-ready Parquet (Ray Data).")
    parser.add_argument("--input", required=True, help="video file, folder, or .txt list of paths")
    parser.add_argument("--output", required=True, help="output directory (resumed if it exists)")
    add_config_arguments(parser)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run the job from command-line arguments (``sys.argv[1:]`` when ``argv`` is None).
    Returns the exit status: 0 done (rejected videos included), 2 bad arguments (one line on
    stderr, nothing started)."""
    args = _parser().parse_args(argv)
    try:
        cfg = load_platform_config(args.config, args.overrides)
        prepared = prepare_ingest(args.input, args.output, cfg)
    except (ConfigError, PipelineError) as exc:
        print(f"ingest: error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run_tracked(prepared, echo=lambda s: print(s, flush=True))
    finally:
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()  # stop the embedded Ray (or disconnect from the cluster) cleanly
    print(json.dumps({k: v for k, v in asdict(summary).items() if k != "rejections"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
