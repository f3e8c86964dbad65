"""Two-stage Loopy training on Ray Train, tracked in MLflow.

    python train.py --data DIR [--config FILE] [--stage 1|2 | --stages 1,2] [--resume]
                    [--init-from PATH|MLFLOW_URI] [--job-name NAME] [section.key=value ...]

Without ``--config`` the embedded laptop setting is used (tiny preset, local Ray on 127.0.0.1
with 2 CPU workers, MLflow on ``sqlite:///mlflow.db`` in the project folder). The same command
runs on a cluster under ``ray job submit -- python train.py ...`` (RAY_ADDRESS is honoured by
``core.ray_runtime.init_ray``). Config, dataset and stage-1-model problems, result paths that
would land in Ray's temporary copy of a ``--working-dir`` (``core/job_paths.py``) and a
placement the cluster cannot hold (workers and the reader's tasks; docs/TRAINING.md) are
reported in one line before any worker starts (exit code 2); a stage that fails (a stalled
input, a NaN stop, workers lost beyond ``train.max_failures``) in one line with exit code 1, so
``ray job submit`` exits non-zero too.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Optional, Sequence

from core.config import ConfigError, add_config_arguments, load_platform_config
from core.job_paths import TRAIN_RESULT_KEYS, check_job_paths
from training.errors import TerminatedError, TrainingError
from training.stages import TrainSetupError, prepare_job, run_job


def parse_stages(args: argparse.Namespace) -> list[int]:
    if args.stage is not None and args.stages is not None:
        raise SystemExit("give --stage or --stages, not both")
    if args.stage is not None:
        return [args.stage]
    text = args.stages or "1,2"
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--stages {text!r}: expected a comma-separated list such as 1,2") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="ingest output directory (pipelines/ingest.py)")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=None, help="train one stage")
    parser.add_argument("--stages", default=None, help="comma-separated stages in order (default 1,2)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the latest job (or --job-name) from its last checkpoint")
    parser.add_argument("--init-from", default=None,
                        help="stage-1 model for stage 2: package folder, models:/NAME/VERSION, models:/NAME@ALIAS, runs:/...")
    parser.add_argument("--job-name", default=None, help="name of the job (default: loopy-<time>)")
    add_config_arguments(parser)
    return parser


def _raise_terminated(signum, frame) -> None:
    raise TerminatedError(f"received signal {signal.Signals(signum).name}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        cfg = load_platform_config(args.config, args.overrides)
        check_job_paths(cfg, TRAIN_RESULT_KEYS)
        prep = prepare_job(cfg, args.data, parse_stages(args), resume=args.resume,
                           init_from=args.init_from, job_name=args.job_name)
    except (ConfigError, TrainSetupError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    # SIGTERM (Kubernetes, `ray job stop`, kill) becomes an exception in the main thread: the
    # MLflow runs are marked KILLED on the way out instead of staying RUNNING
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        record = run_job(prep)
    except TerminatedError as exc:
        print(f"train.py: stopped: {exc}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except TrainSetupError as exc:  # the cluster cannot hold the placement: before any worker
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:  # a stage that stopped or failed (Ray Train logged the tracebacks)
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    for stage, rec in sorted(record.stages.items()):
        print(f"stage {stage}: {rec.model_uri}  (package {rec.package_dir}, MLflow run {rec.run_id})")
    print(f"job {record.name}: MLflow parent run {record.parent_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
