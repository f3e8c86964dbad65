"""The evaluation job (``evaluate.py``): a model scored on every video of an ingested split, on Ray
Data, with the results in the model version's MLflow run and a registry alias that moves only when
the configured thresholds pass (docs/EVALUATION.md).

1. :func:`prepare_evaluation` (no Ray): the model URI resolved to a package, its registered
   version and MLflow run looked up, the split's videos listed; every problem a user can fix is a
   :class:`EvaluationSetupError` before Ray starts (a broken FID / FVD / SyncNet weights file included).
2. :func:`run_evaluation`: ``ray.data.from_items(videos).map_batches(VideoEvaluator)``, an actor
   pool of ``evaluation.num_actors`` samplers (``evaluation.gpus_per_actor`` GPUs each when
   ``evaluation.use_gpu``; on a laptop CPU actors). Each actor loads the package once (from the
   model URI, so actors on other nodes fetch it themselves) and runs
   :func:`training.evaluation.evaluate_row` per video; a video that cannot be evaluated becomes a
   ``rejected`` row with its reason, an actor that dies is restarted and its video retried
   (``max_task_retries``). The first ``evaluation.side_by_side_videos`` videos also come back as
   a real | generated mp4 (with the video's audio). With FID / FVD networks configured, each
   video's generated and real features (``[frames or clips, D]`` float32, never the frames) come
   back as an npz beside the record and the distances are computed over the split on the driver.
3. The JSON (per-video metrics, ``mean``, ``rejected``, ``skipped``, ``thresholds``, ``alias``)
   is written, logged with the metrics (``eval_<split>_<metric>``) and the mp4s to the version's
   run (a new run in ``tracking.experiment`` for a plain package folder), and the alias
   (``evaluation.alias``, default ``champion``) moves to the version only when every configured
   threshold passes on the mean.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from core.config import to_dict
from core.paths import project_path, resolve_tracking_uri
from core.ray_runtime import init_ray
from core.run_logging import client_for, ensure_experiment
from core.sections import EvaluationConfig, PlatformConfig
from core.storage import Location, StorageError, check_location
from inference.evaluate_video import split_videos, write_side_by_side
from inference.learned_metrics import LearnedMetricError, load_feature_networks
from inference.loading import package_root
from inference.sampler import LoopySampler
from models.registry import ModelPackageError, read_package_config
from pipelines.dataset.schema import IngestFormatError, IngestMeta
from training.errors import TrainingError
from training.evaluation import (
    FEATURES_KEY,
    evaluate_row,
    IdentityScorer,
    add_split_identity,
    learned_metric_results,
    mean_metrics,
    metric_detector,
)

log = logging.getLogger(__name__)

#: Columns of a result row coming back from an actor (one video): a fixed schema whatever the
#: video's outcome, the per-video dict as JSON, its FID / FVD features as npz bytes (b"" when none).
RESULT_COLUMNS = ("video_id", "record_json", "side_by_side_mp4", "features_npz")


class EvaluationSetupError(TrainingError, ValueError):
    """The evaluation cannot start: unknown model, not an ingest output, no videos in the split."""


@dataclass
class ModelVersionRef:
    """Where a model URI points in the registry: ``version`` None for runs:/ URIs and folders;
    ``run_id`` None for a plain folder (the job then starts a run of its own)."""

    uri: str
    registered_name: Optional[str]
    version: Optional[int]
    run_id: Optional[str]


@dataclass
class PreparedEvaluation:
    cfg: PlatformConfig  # the job's config: ray, tracking, evaluation
    model_uri: str
    package_dir: Optional[Path]  # the package folder checked on the driver (None for a registered version)
    data_dir: Location  # a folder or a bucket prefix
    split: str
    videos: list[dict]  # manifest rows (video_id, source, num_frames, split)
    ref: ModelVersionRef
    out_path: Path


def lookup_model_version(uri: str, cfg: PlatformConfig) -> ModelVersionRef:
    """The registered version and run of ``models:/name/version``, ``models:/name@alias`` or
    ``runs:/<id>/...``; a local folder has neither. Raises :class:`EvaluationSetupError`."""
    from mlflow.exceptions import MlflowException

    if uri.startswith("runs:/"):
        return ModelVersionRef(uri, None, None, uri[len("runs:/"):].split("/")[0])
    if not uri.startswith("models:/"):
        return ModelVersionRef(uri, None, None, None)
    rest = uri[len("models:/"):].strip("/")
    client = client_for(cfg.tracking)
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, version = rest.partition("/")
            if not version.isdigit():
                raise EvaluationSetupError(f"--model {uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
            mv = client.get_model_version(name, version)
    except MlflowException as exc:
        raise EvaluationSetupError(f"--model {uri!r}: not in the registry at "
                                   f"{resolve_tracking_uri(cfg.tracking.tracking_uri)}: {exc.message}") from exc
    return ModelVersionRef(uri, name, int(mv.version), mv.run_id)


def prepare_evaluation(model_uri: str, data_dir: str | Path, cfg: PlatformConfig, split: Optional[str] = None,
                       out_path: Optional[str | Path] = None) -> PreparedEvaluation:
    """Every check that needs no Ray (module docstring, step 1)."""
    ev = cfg.evaluation
    split = split or ev.split
    try:
        data_dir = check_location(data_dir, "--data")  # a bucket URI: scheme, credentials, bucket (core/storage.py)
    except StorageError as exc:
        raise EvaluationSetupError(str(exc)) from None
    try:
        IngestMeta.read(data_dir)
        videos = split_videos(data_dir, split)
    except IngestFormatError as exc:
        raise EvaluationSetupError(f"--data {data_dir}: {exc}") from exc
    if ev.max_videos is not None:
        videos = videos[: ev.max_videos]
    if not videos:
        raise EvaluationSetupError(f"--data {data_dir}: no ok videos in split {split!r}")
    try:  # the FID / FVD / SyncNet files load and give [N, D] outputs (CPU here; the actors use theirs)
        load_feature_networks(ev, "cpu")
    except LearnedMetricError as exc:
        raise EvaluationSetupError(str(exc)) from exc
    ref = lookup_model_version(str(model_uri), cfg)
    root = None
    # a registered version was checked by the lookup (the actors fetch it themselves); a folder or
    # a runs:/ URI is resolved here, to check that it holds a package
    if ref.version is None:
        try:
            root = package_root(str(model_uri), cfg.tracking.tracking_uri)
            read_package_config(root)
        except ModelPackageError as exc:
            raise EvaluationSetupError(f"--model {model_uri}: {exc}") from exc
    if out_path is None:
        stem = ref.uri.replace(":/", "_").replace("/", "_").replace("@", "_") if ref.version is None else \
            f"{ref.registered_name}_v{ref.version}"
        out_path = project_path(ev.output_dir) / f"{Path(stem).name}_{split}.json"
    return PreparedEvaluation(cfg, str(model_uri), root, data_dir, split, videos, ref, Path(out_path))


class VideoEvaluator:
    """Ray Data actor: one sampler and one landmark detector, built once, scoring one video per
    call (batch of one row: ``video_id``, ``source``, ``side_by_side``)."""

    def __init__(self, model_uri: str, tracking_uri: str, data_dir: str, eval_cfg: dict):
        self.eval_cfg = EvaluationConfig(**eval_cfg)
        self.data_dir = data_dir
        self.sampler = LoopySampler.from_package(model_uri, device=self.eval_cfg.device, tracking_uri=tracking_uri)
        self.detector = metric_detector(self.eval_cfg, self.sampler.cfg.weights.dwpose_dir)
        self.networks = load_feature_networks(self.eval_cfg, self.sampler.device)
        self.identity = IdentityScorer.build(self.eval_cfg, self.sampler.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {c: [] for c in RESULT_COLUMNS}
        for i in range(len(batch["video_id"])):
            row = {"video_id": str(batch["video_id"][i]), "source": str(batch["source"][i])}
            want_video = bool(batch["side_by_side"][i])
            record = evaluate_row(self.sampler, self.detector, self.data_dir, row, self.eval_cfg,
                                  keep_frames=want_video, networks=self.networks, identity=self.identity)
            features = b""
            if FEATURES_KEY in record:
                buf = io.BytesIO()
                np.savez(buf, **record.pop(FEATURES_KEY))
                features = buf.getvalue()
            mp4 = b""
            if want_video and record["status"] == "ok":
                ev = record.pop("evaluation")
                with tempfile.TemporaryDirectory(prefix="loopy_eval_") as tmp:
                    path = write_side_by_side(ev.real, ev.generated, Path(tmp) / "side_by_side.mp4",
                                              record.pop("fps"), record.pop("samples"), record.pop("sample_rate"))
                    mp4 = path.read_bytes()
            out["video_id"].append(row["video_id"])
            out["record_json"].append(json.dumps(_json_safe(record)))
            out["side_by_side_mp4"].append(mp4)
            out["features_npz"].append(features)
        return out


def _json_safe(value: Any) -> Any:
    """NaN / inf -> None (strict JSON), numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def evaluate_on_ray(prep: PreparedEvaluation) -> list[tuple[dict, bytes]]:
    """The per-video records (manifest order; FID / FVD features under ``FEATURES_KEY``) and
    side-by-side mp4 bytes (b"" when none)."""
    import ray
    from ray.data import ActorPoolStrategy

    ev = prep.cfg.evaluation
    items = [{"video_id": v["video_id"], "source": v["source"] or "", "side_by_side": i < ev.side_by_side_videos}
             for i, v in enumerate(prep.videos)]
    init_ray(prep.cfg.ray)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-10 s progress dumps: the table says it all
    gpus = {"num_gpus": ev.gpus_per_actor} if ev.use_gpu else {}
    # an actor that dies (OOM, lost node) is restarted and its video retried once; Ray 2.60 takes
    # these limits only as (deprecated) remote args, as in the ingest job
    retry = {"max_task_retries": 1, "max_restarts": -1}
    eval_dict = dataclasses.asdict(ev)
    if ev.use_gpu and eval_dict["device"] == "auto":
        eval_dict["device"] = "cuda"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(VideoEvaluator, batch_size=1, batch_format="numpy",
                            fn_constructor_kwargs={"model_uri": prep.model_uri,
                                                   "tracking_uri": resolve_tracking_uri(prep.cfg.tracking.tracking_uri),
                                                   "data_dir": str(prep.data_dir.resolve()), "eval_cfg": eval_dict},
                            compute=ActorPoolStrategy(min_size=1, max_size=max(1, min(ev.num_actors, len(items)))),
                            num_cpus=ev.cpus_per_actor, **gpus, **retry)
        rows = ds.take_all()
    by_id = {}
    for r in rows:
        record = json.loads(r["record_json"])
        if r["features_npz"]:
            with np.load(io.BytesIO(bytes(r["features_npz"]))) as npz:
                record[FEATURES_KEY] = {k: npz[k] for k in npz.files}
        by_id[str(r["video_id"])] = (record, bytes(r["side_by_side_mp4"] or b""))
    return [by_id[v["video_id"]] for v in prep.videos if v["video_id"] in by_id]


def check_thresholds(mean: dict[str, float], ev: EvaluationConfig) -> list[dict[str, Any]]:
    """One check per configured threshold on the mean metrics: ``{"metric", "op", "threshold",
    "value", "passed"}``; a NaN / missing value fails."""
    specs = (("sync", ">=", ev.min_sync), ("sync_margin", ">=", ev.min_sync_margin),
             ("face_found_ratio", ">=", ev.min_face_found_ratio), ("psnr", ">=", ev.min_psnr),
             ("lmd", "<=", ev.max_lmd), ("identity", "<=", ev.max_identity),
             ("identity_margin", ">=", ev.min_identity_margin))
    checks = []
    for metric, op, threshold in specs:
        if threshold is None:
            continue
        value = mean.get(metric)
        finite = value is not None and math.isfinite(value)
        passed = finite and (value >= threshold if op == ">=" else value <= threshold)
        checks.append({"metric": metric, "op": op, "threshold": float(threshold),
                       "value": float(value) if finite else None, "passed": bool(passed)})
    return checks


def decide_alias(prep: PreparedEvaluation, checks: Sequence[dict]) -> dict[str, Any]:
    """Move ``evaluation.alias`` to the evaluated version when every check passed (and at least
    one threshold is configured); returns ``{"name", "moved", "reason"}``."""
    ev, ref = prep.cfg.evaluation, prep.ref
    if not ev.alias:
        return {"name": None, "moved": False, "reason": "evaluation.alias is not set"}
    if ref.version is None:
        return {"name": ev.alias, "moved": False,
                "reason": f"{ref.uri} is not a registered model version (use models:/NAME/VERSION or @ALIAS)"}
    if not checks:
        return {"name": ev.alias, "moved": False, "reason": "no threshold configured"}
    failed = [c for c in checks if not c["passed"]]
    if failed:
        text = ", ".join(f"{c['metric']} {c['value'] if c['value'] is None else round(c['value'], 4)} "
                         f"not {c['op']} {c['threshold']}" for c in failed)
        return {"name": ev.alias, "moved": False, "reason": f"thresholds failed: {text}"}
    client_for(prep.cfg.tracking).set_registered_model_alias(ref.registered_name, ev.alias, str(ref.version))
    return {"name": ev.alias, "moved": True,
            "reason": f"every threshold passed: {ref.registered_name} version {ref.version} is now @{ev.alias}"}


def log_to_mlflow(prep: PreparedEvaluation, result: dict, json_path: Path, videos: Sequence[tuple[str, Path]]
                  ) -> str:
    """Metrics ``eval_<split>_<metric>`` (the mean), the JSON and the side-by-side mp4s as
    artifacts ``evaluation/<split>/`` of the version's run (a new run when there is none).
    Returns the run id."""
    client = client_for(prep.cfg.tracking)
    run_id = prep.ref.run_id
    if run_id is None:
        experiment_id = ensure_experiment(prep.cfg.tracking)
        name = prep.package_dir.name if prep.package_dir is not None else "model"
        run = client.create_run(experiment_id, run_name=f"evaluate-{name}",
                                tags={"loopy.evaluated_model": prep.model_uri})
        run_id = run.info.run_id
        client.set_terminated(run_id)
    step = int(time.time())
    for key, value in result["mean"].items():
        if isinstance(value, (int, float)) and math.isfinite(value):
            client.log_metric(run_id, f"eval_{prep.split}_{key}", float(value), step=step)
    artifact_dir = f"evaluation/{prep.split}"
    client.log_artifact(run_id, str(json_path), artifact_dir)
    for _, path in videos:
        client.log_artifact(run_id, str(path), artifact_dir)
    client.set_tag(run_id, f"loopy.eval_{prep.split}", json.dumps(
        {"model": prep.model_uri, "videos": len(result["videos"]), "alias": result["alias"]}))
    return run_id


def format_table(result: dict) -> str:
    """Per-video rows and the mean of the main metrics as a fixed-width text table."""
    cols = ("psnr", "ssim", "lmd", "sync", "sync_control", "sync_gt", "identity", "identity_control", "identity_gt",
            "identity_nearest", "glo", "exp", "glo_gt", "exp_gt", "face_found_ratio")
    short = {"face_found_ratio": "face", "identity_control": "id_control", "identity_gt": "id_gt",
             "identity_nearest": "id_nearest"}
    head = ["video"] + [short.get(c, c) for c in cols]

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "-"
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.3f}"

    rows = [[str(v["video_id"])[:24]] + [cell(v.get(c)) for c in cols] for v in result["videos"]]
    rows.append(["mean"] + [cell(result["mean"].get(c)) for c in cols])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in rows]
    for rej in result["rejected"]:
        lines.append(f"rejected {rej['video_id']}: {rej['reason']}")
    for name, count in (("fid", "fid_frames"), ("fvd", "fvd_clips")):
        if name in result["mean"]:
            n = int(result["mean"].get(count) or 0)
            lines.append(f"{name} (pooled over the split, {n} {count.split('_')[1]}): {cell(result['mean'][name])}")
    for name in ("lse_d", "lse_c"):
        if name in result["mean"]:
            lines.append(f"{name} (mean over videos): {cell(result['mean'][name])} "
                         f"(real frames: {cell(result['mean'].get(name + '_gt'))})")
    for name, reason in result["skipped"].items():
        lines.append(f"skipped {name}: {reason}")
    return "\n".join(lines)


def run_evaluation(prep: PreparedEvaluation, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Steps 2 and 3 of the module docstring; returns the result dict written to the JSON."""
    ev = prep.cfg.evaluation
    echo(f"[evaluate] {prep.model_uri}: {len(prep.videos)} videos of split {prep.split!r} in {prep.data_dir}")
    started = time.perf_counter()
    records = evaluate_on_ray(prep)
    ok = [r for r, _ in records if r["status"] == "ok"]
    rejected = [r for r, _ in records if r["status"] != "ok"]
    missing = {v["video_id"] for v in prep.videos} - {r["video_id"] for r, _ in records}
    rejected += [{"video_id": vid, "status": "rejected", "reason": "no result came back from Ray Data"}
                 for vid in sorted(missing)]
    learned, skipped = learned_metric_results(ev, ok)  # pops the features from the records
    add_split_identity(ok)  # pops the identity descriptors from the records
    mean = mean_metrics([{k: (float("nan") if v is None else v) for k, v in r.items()} for r in ok])
    mean.update(learned)
    checks = check_thresholds(mean, ev)
    result: dict[str, Any] = {
        "model": prep.model_uri, "registered_model": prep.ref.registered_name, "version": prep.ref.version,
        "data": str(prep.data_dir), "split": prep.split, "videos": ok, "mean": mean, "rejected": rejected,
        "skipped": skipped, "thresholds": checks, "evaluation": to_dict(ev),
        "wall_s": time.perf_counter() - started,
    }
    result["alias"] = decide_alias(prep, checks)
    prep.out_path.parent.mkdir(parents=True, exist_ok=True)
    video_files = []
    for (record, mp4) in records:
        if mp4:
            path = prep.out_path.with_name(f"{prep.out_path.stem}_{record['video_id']}_side_by_side.mp4")
            path.write_bytes(mp4)
            video_files.append((record["video_id"], path))
    result["side_by_side"] = [str(p) for _, p in video_files]
    prep.out_path.write_text(json.dumps(_json_safe(result), indent=2))
    result["run_id"] = log_to_mlflow(prep, result, prep.out_path, video_files)
    prep.out_path.write_text(json.dumps(_json_safe(result), indent=2))
    echo(format_table(result))
    echo(f"[evaluate] alias: {result['alias']['reason']}")
    echo(f"[evaluate] results: {prep.out_path} (MLflow run {result['run_id']})")
    return result
