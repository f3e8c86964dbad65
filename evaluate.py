#!/usr/bin/env python
"""The evaluation job: a trained model scored on every video of an ingested split (Ray Data).

    python evaluate.py --model URI --data DIR [--split test] [--out FILE.json]
                       [--config FILE] [section.key=value ...]

``URI`` is a model package folder, ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or
``runs:/...``; ``DIR`` an ingest output (pipelines/ingest.py). Every video of the split is
generated from its reference frame and its own audio and compared with the real frames
(psnr, ssim, lmd, sync, sync_control, glo / exp and their ground truth; docs/EVALUATION.md).
The JSON (per-video metrics and ``{"mean": {...}}``) goes to ``--out`` (default
``evaluation.output_dir``), the metrics, the JSON and a real | generated mp4 to the model
version's MLflow run, and the alias ``evaluation.alias`` (``champion``) moves to the version only
when the configured thresholds pass. Under ``ray job submit -- python evaluate.py ...`` it runs
on the cluster (RAY_ADDRESS; ``evaluation.use_gpu=true`` puts the samplers on GPUs).
Also the console script ``loopy-evaluate``. Exit status: 0 done (rejected videos included),
2 bad arguments (one line on stderr, before Ray starts).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from core.config import ConfigError, add_config_arguments, load_platform_config
from core.job_paths import EVALUATION_RESULT_KEYS, check_job_paths
from training.evaluation_job import (
    EvaluationSetupError,
    prepare_evaluation,
    run_evaluation,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="package folder, models:/NAME/VERSION, models:/NAME@ALIAS or runs:/...")
    parser.add_argument("--data", required=True, help="ingest output directory (pipelines/ingest.py)")
    parser.add_argument("--split", default=None, help="split to evaluate (default evaluation.split: test)")
    parser.add_argument("--out", default=None, help="JSON file of the results (default under evaluation.output_dir)")
    add_config_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        cfg = load_platform_config(args.config, args.overrides)
        check_job_paths(cfg, EVALUATION_RESULT_KEYS)  # results outside Ray's copy of a --working-dir
        prep = prepare_evaluation(args.model, args.data, cfg, split=args.split, out_path=args.out)
    except (ConfigError, EvaluationSetupError) as exc:
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 2
    import ray

    ours = not ray.is_initialized()  # stop only a Ray this call started (embedded or joined)
    try:
        run_evaluation(prep, echo=lambda s: print(s, flush=True))
    finally:
        if ours and ray.is_initialized():
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
