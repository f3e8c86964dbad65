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
is :func:`pipelines.ingest_job.run_ingest`; the module layout is:

* ``pipelines/ingest_job.py``: ``run_ingest``, the Ray Data graph, the driver's stream loop;
* ``pipelines/ingest_stages.py``: the CPU stages (analysis, decode + crop), no torch;
* ``pipelines/ingest_model_stages.py``: the model stages (wav2vec2 features, VAE latents);
* ``pipelines/frame_writer.py``: per-chunk rows -> ``frames/<video_id>.parquet`` in frame order;
* ``pipelines/resume.py``: output-directory checks and the per-video records of finished videos;
* ``pipelines/ingest_meta.py``: ``ingest_meta.json`` and the model-config facts it records;
* ``pipelines/manifest.py``: inputs, video ids, splits, ``videos.parquet``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Optional

from core.config import ConfigError, add_config_arguments, load_platform_config
from pipelines.errors import PipelineError
from pipelines.ingest_job import IngestSummary, prepare_ingest, run_ingest, run_prepared
from pipelines.ingest_meta import ModelConfigError
from pipelines.manifest import IngestInputError
from pipelines.resume import IngestOutputError

__all__ = ["IngestInputError", "IngestOutputError", "IngestSummary", "ModelConfigError", "main", "run_ingest"]


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
        summary = run_prepared(prepared, echo=lambda s: print(s, flush=True))
    finally:
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()  # stop the embedded Ray (or disconnect from the cluster) cleanly
    print(json.dumps({k: v for k, v in asdict(summary).items() if k != "rejections"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
