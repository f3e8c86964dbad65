"""The evaluation job (evaluate.py, training/evaluation_job.py) end to end on the tiny package and a
small ingested split: JSON shape, the MLflow run's metrics and artifacts, the alias policy (issue 12)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# evaluation settings kept small for the laptop: 2 s of each video, one DDIM step
FAST = ["evaluation.max_seconds=2", "evaluation.steps=1"]
NO_THRESHOLDS = ["evaluation.min_sync=null", "evaluation.min_sync_margin=null",
                 "evaluation.min_face_found_ratio=null", "evaluation.max_identity=null",
                 "evaluation.min_identity_margin=null"]


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, tiny_weights, ray_local):
    """One 6 s sample talking head (25 fps, 16 kHz, 192x192) ingested with the tiny weights, in
    the test split (``ingest.test_fraction=1``)."""
    pytest.importorskip("dlib")
    from core.config import load_platform_config
    from pipelines.ingestion.job import run_ingest
    from pipelines.samples.talking_heads import SampleSpec, generate_samples

    root = tmp_path_factory.mktemp("eval_ingest")
    generate_samples(root / "videos", seconds=6.0, seed=3, specs=(SampleSpec("eval_talk", "25", 16000, 1, 192, 192),))
    weights_cfg, _ = tiny_weights
    cfg = load_platform_config(None, [f"weights.tiny_dir={weights_cfg.tiny_dir}", "ingest.test_fraction=1.0",
                                      f"tracking.tracking_uri=sqlite:///{root}/ingest_mlflow.db",
                                      f"tracking.artifact_root={root}/ingest_mlruns"])
    summary = run_ingest(root / "videos", root / "data", cfg, echo=lambda s: None)
    assert summary.ok == 1, summary
    return root / "data"


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_package):
    """An MLflow store with the tiny package registered as version 1 of ``loopy`` (alias stage2)."""
    from mlflow.tracking import MlflowClient

    from models.registry import register_logged_version

    root = tmp_path_factory.mktemp("eval_mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("loopy", artifact_location=str(root / "mlruns"))
    run = client.create_run(experiment, run_name="stage2")
    client.log_artifacts(run.info.run_id, str(tiny_package), "model_package/stage2")
    version = register_logged_version(client, run.info.run_id, "model_package/stage2", "loopy", 2)
    overrides = [f"tracking.tracking_uri={uri}", f"tracking.artifact_root={root}/mlruns"]
    return client, run.info.run_id, version, overrides


@pytest.mark.slow  # an ingest through Ray, generation and dlib on every frame
def test_evaluate_package_scores_the_split_against_the_source_frames(ingested, tiny_package):
    from core.sections import EvaluationConfig
    from inference.evaluate_video import read_eval_video, split_videos
    from pipelines.dataset.schema import FrameStore
    from pipelines.faces.detect import make_detector
    from pipelines.metrics.video_metrics import detect_landmarks
    from training.evaluation import evaluate_package

    result = evaluate_package(tiny_package, ingested, split="test", steps=1, device="cpu",
                              evaluation=EvaluationConfig(max_seconds=2.0))
    assert result["rejected"] == [] and len(result["videos"]) == 1
    video = result["videos"][0]
    assert video["real_from"] == "source" and video["frames"] == 50
    for key in ("psnr", "ssim", "glo_gt", "exp_gt", "sync_gt", "sync_control_gt", "face_found_ratio"):
        assert math.isfinite(video[key]), key
    assert 0 < video["psnr"] < 30  # an untrained model: noise, not the portrait
    # the real crops are the ingested frames: dlib finds the face and their mouth follows the audio
    assert video["face_found_ratio_gt"] >= 0.9
    assert video["sync_gt"] >= 0.3
    assert result["mean"]["videos"] == 1 and result["mean"]["psnr"] == video["psnr"]
    # no weights paths given: the learned metrics are skipped, each reason naming its setting
    assert set(result["skipped"]) == {"lse_c", "lse_d", "fid", "fvd", "csim"}
    assert "evaluation.fid_weights_path" in result["skipped"]["fid"]
    assert "evaluation.arcface_path" in result["skipped"]["csim"]
    # identity: the real frames are the reference's person (dlib's descriptor, same-person < 0.6)
    assert video["identity_gt"] < 0.4 and "identity" in video
    assert math.isnan(video["identity_control"])  # one test video: no other reference to compare with
    assert "evaluation.fvd_weights_path" in result["skipped"]["fvd"]
    # the codec ceiling: this package's VAE is the random tiny one, so its decoded latents are no
    # face at all, and the codec figures say so (a VAE that caps every generated figure)
    for key in ("codec_psnr", "codec_ssim", "codec_face_found_ratio", "codec_identity"):
        assert key in video and key in result["mean"], key
    assert math.isfinite(video["codec_psnr"]) and video["codec_psnr"] < 20
    assert video["codec_face_found_ratio"] < 0.2 < video["face_found_ratio_gt"]

    # the frames decoded from the source line up with the ingest's: landmarks found on them match
    # the stored (crop-normalised) landmarks of the same frames
    (row,) = split_videos(ingested, "test")
    ev = read_eval_video(ingested, row["video_id"], max_seconds=2.0)
    lm, found = detect_landmarks(ev.real_frames, make_detector("dlib"))
    stored = FrameStore(ingested).read(row["video_id"], range(ev.num_frames), ["landmarks"])["landmarks"]
    err = np.abs(lm[found] - stored[found]).mean()
    assert found.mean() >= 0.9 and err < 0.02, err
    assert ev.samples.shape == (32000,)  # 2 s at 16 kHz from the source's audio


@pytest.mark.slow  # an ingest through Ray, generation and dlib on every frame
def test_evaluate_job_logs_to_the_version_run_and_moves_the_alias_only_when_thresholds_pass(
        ingested, registry, tmp_path):
    import evaluate

    client, run_id, version, tracking = registry
    out = tmp_path / "fail.json"
    # a threshold an untrained model cannot pass: the job runs, the alias stays where it is
    rc = evaluate.main(["--model", "models:/loopy@stage2", "--data", str(ingested), "--out", str(out),
                        *tracking, *FAST, *NO_THRESHOLDS, "evaluation.min_psnr=40"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["version"] == version and result["split"] == "test"
    assert len(result["videos"]) == 1 and result["rejected"] == []
    v = result["videos"][0]
    assert {"psnr", "ssim", "lmd", "sync", "sync_control", "glo", "exp", "glo_gt", "exp_gt",
            "face_found_ratio"} <= set(v)
    assert set(result["mean"]) >= {"psnr", "ssim", "lmd", "sync", "sync_control", "glo", "exp", "glo_gt", "exp_gt"}
    assert result["thresholds"] == [{"metric": "psnr", "op": ">=", "threshold": 40.0,
                                     "value": pytest.approx(v["psnr"]), "passed": False}]
    assert result["alias"]["moved"] is False and "psnr" in result["alias"]["reason"]
    assert "champion" not in client.get_registered_model("loopy").aliases
    run = client.get_run(run_id)
    assert run.data.metrics["eval_test_psnr"] == pytest.approx(result["mean"]["psnr"])
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, "evaluation/test")}
    assert out.name in logged
    (mp4,) = result["side_by_side"]
    assert Path(mp4).name in logged and Path(mp4).stat().st_size > 1000

    # thresholds the model passes: the alias moves to the evaluated version
    out2 = tmp_path / "pass.json"
    rc = evaluate.main(["--model", "models:/loopy/1", "--data", str(ingested), "--out", str(out2),
                        *tracking, *FAST, *NO_THRESHOLDS, "evaluation.min_psnr=1", "evaluation.side_by_side_videos=0"])
    assert rc == 0
    result2 = json.loads(out2.read_text())
    assert result2["alias"]["moved"] is True and result2["thresholds"][0]["passed"] is True
    assert int(client.get_model_version_by_alias("loopy", "champion").version) == version


def test_side_by_side_video_has_both_halves_and_the_audio(tmp_path):
    import subprocess

    from inference.evaluate_video import write_side_by_side

    real = np.full((10, 64, 64, 3), 200, np.uint8)
    gen = np.zeros((10, 64, 64, 3), np.uint8)
    samples = np.sin(np.linspace(0, 400 * np.pi, 6400)).astype(np.float32) * 0.5
    path = write_side_by_side(real, gen, tmp_path / "sbs.mp4", 25.0, samples, 16000)
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type,width,height",
                            "-of", "csv=p=0", str(path)], capture_output=True, text=True, check=True).stdout
    assert "video,512,256" in probe and "audio" in probe


def test_thresholds_fail_on_nan_and_skip_unset():
    from core.sections import EvaluationConfig
    from training.evaluation_job import check_thresholds

    ev = EvaluationConfig(min_sync=0.3, min_sync_margin=0.15, min_face_found_ratio=None, max_lmd=0.1,
                          max_identity=None, min_identity_margin=None)
    checks = check_thresholds({"sync": 0.5, "sync_margin": float("nan"), "lmd": 0.05}, ev)
    assert [(c["metric"], c["passed"]) for c in checks] == [("sync", True), ("sync_margin", False), ("lmd", True)]
    assert check_thresholds({"lmd": 0.2}, EvaluationConfig(min_sync=None, min_sync_margin=None,
                                                           min_face_found_ratio=None, max_lmd=0.1, max_identity=None,
                                                           min_identity_margin=None))[0]["passed"] is False
    # identity is part of the alias decision by default: near its reference and clearly nearer
    # than to the other references
    only_identity = EvaluationConfig(min_sync=None, min_sync_margin=None, min_face_found_ratio=None)
    passed = {c["metric"]: c["passed"] for c in check_thresholds({"identity": 0.45, "identity_margin": 0.2}, only_identity)}
    assert passed == {"identity": True, "identity_margin": True}
    passed = {c["metric"]: c["passed"] for c in check_thresholds({"identity": 0.7, "identity_margin": 0.05}, only_identity)}
    assert passed == {"identity": False, "identity_margin": False}


def test_bad_arguments_exit_2_before_ray(tmp_path, capsys, tiny_package):
    import evaluate

    assert evaluate.main(["--model", str(tiny_package), "--data", str(tmp_path / "missing")]) == 2
    assert "--data" in capsys.readouterr().err
    from pipelines.samples.synthetic_ingest import write_synthetic_ingest

    write_synthetic_ingest(tmp_path / "data", num_frames=(40,), splits=["test"])
    assert evaluate.main(["--model", str(tmp_path / "nope"), "--data", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate.py: error: --model") and "nope" in err
    assert evaluate.main(["--model", str(tiny_package), "--data", str(tmp_path / "data"), "--split", "val"]) == 2
    assert "no ok videos in split 'val'" in capsys.readouterr().err


def test_unknown_registered_version_exits_2(tmp_path, capsys, registry):
    import evaluate
    from pipelines.samples.synthetic_ingest import write_synthetic_ingest

    _, _, _, tracking = registry
    write_synthetic_ingest(tmp_path / "data", num_frames=(40,), splits=["test"])
    assert evaluate.main(["--model", "models:/loopy/7", "--data", str(tmp_path / "data"), *tracking]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate.py: error: --model 'models:/loopy/7': not in the registry"), err


@pytest.mark.slow  # an ingest through Ray, generation and dlib on every frame
def test_checkpoint_evaluation_adds_the_evaluation_jobs_metrics(ingested, tiny_weights, tmp_path):
    """``train.eval_videos > 0``: the checkpoint evaluator (the function of Ray Train's validation
    task, called here directly) writes a package of the network it is given and adds the
    evaluation job's ``mean`` metrics as ``eval_<name>`` beside the validation loss."""
    import torch

    from core.config import load_platform_config
    from models.loopy import LoopyModel
    from training.checkpoint_eval import CheckpointEvaluator

    weights_cfg, weights = tiny_weights
    cfg = load_platform_config(None, [f"weights.tiny_dir={weights_cfg.tiny_dir}", "train.eval_videos=1",
                                      "train.eval_sample_steps=1", "train.eval_max_batches=1", *FAST])
    net = LoopyModel.from_sd15(weights.unet, cfg.model, cfg.reader, stage=2).float().eval()
    metrics = CheckpointEvaluator(cfg, stage=2, data_dir=str(ingested)).evaluate(net, 7, torch.device("cpu"), tmp_path)
    assert math.isfinite(metrics["val_loss"])
    for key in ("eval_psnr", "eval_ssim", "eval_sync_gt", "eval_face_found_ratio_gt"):
        assert math.isfinite(metrics[key]), key
    assert metrics["eval_face_found_ratio_gt"] >= 0.9  # the real frames of the ingested video
    assert 0 < metrics["eval_psnr"] < 30  # an untrained network
