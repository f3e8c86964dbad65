"""Training on a cluster (issue 27): where the workers go (``train.placement`` -> Ray Train's
placement strategy and per-worker resources), the pre-flight check that the workers and the
reader's tasks fit the nodes at once (one line naming the resource and the figures, before any
MLflow run or worker), the input watchdog (``train.batch_timeout_s``: a stalled input ends the
stage with an error, never a hang), the job-mode path refusal (results that would land in Ray's
temporary copy of a ``--working-dir``) and the quiet fresh start.

The placement checks run on node lists shaped like the issue's clusters (and on the embedded
Ray's real node); the two-node run itself is tests/test_multinode.py. The Ray Train run is slow.
"""
from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from train_setup import train_cfg, train_overrides

import train
from core.job_paths import (
    EVALUATION_RESULT_KEYS,
    RAY_JOB_CONFIG_ENV,
    TRAIN_RESULT_KEYS,
    JobPathError,
    check_job_paths,
)
from core.paths import PROJECT_ROOT
from training.errors import InputStalledError
from training.loop import watched_batches
from training.stages import (
    NodeShape,
    TrainSetupError,
    _scaling,
    check_cluster,
    plan_placement,
    prepare_job,
    resolve_placement,
    resumed_step,
    run_job,
)
from training.tracking import JobTracker


def nodes(*resources: dict) -> list[NodeShape]:
    return [NodeShape(f"node{i}", f"10.0.0.{i + 1}", r) for i, r in enumerate(resources)]


TWO_ONE_CPU = nodes({"CPU": 1.0}, {"CPU": 1.0})  # the cluster: head + one worker, 1 CPU each


@pytest.fixture()
def cfg_of(tmp_path, tiny_weights):
    return lambda *extra: train_cfg(tmp_path, tiny_weights, *extra)


# --- placement ----------------------------------------------------------------------------------

def test_placement_maps_to_ray_train_scaling(cfg_of):
    for placement, strategy in (("pack", "PACK"), ("spread", "SPREAD"), ("strict-spread", "STRICT_SPREAD")):
        sc = _scaling(cfg_of("train.cpus_per_worker=0.75", "train.num_workers=3"), placement)
        assert sc.placement_strategy == strategy and sc.num_workers == 3
        assert sc.resources_per_worker == {"CPU": 0.75} and not sc.use_gpu
    gpu = _scaling(cfg_of("train.use_gpu=true", "train.cpus_per_worker=4"), "pack")
    assert gpu.use_gpu and gpu.resources_per_worker == {"CPU": 4.0, "GPU": 1.0}


def test_auto_placement_follows_the_hardware(cfg_of):
    cpu, gpu = cfg_of(), cfg_of("train.use_gpu=true")
    assert resolve_placement(cpu, TWO_ONE_CPU) == "spread"  # CPU workers: a node's cores each
    one_gpu_nodes = nodes({"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}, {"CPU": 16})
    eight_gpu_nodes = nodes({"CPU": 96, "GPU": 8}, {"CPU": 96, "GPU": 8}, {"CPU": 16})
    assert resolve_placement(gpu, one_gpu_nodes) == "spread"
    assert resolve_placement(gpu, eight_gpu_nodes) == "pack"  # ranks of a node talk over NVLink
    assert resolve_placement(cfg_of("train.placement=pack"), TWO_ONE_CPU) == "pack"


def test_default_spreads_two_workers_over_two_nodes_and_the_reader_fits(cfg_of):
    plan = plan_placement(cfg_of(), TWO_ONE_CPU)
    assert plan.strategy == "SPREAD" and sorted(plan.worker_nodes) == [0, 1]
    assert [left["CPU"] for left in plan.left] == [0.5, 0.5]
    packed = plan_placement(cfg_of("train.placement=pack"), TWO_ONE_CPU)
    assert packed.worker_nodes == [0, 0] and [left["CPU"] for left in packed.left] == [0.0, 1.0]
    eight = plan_placement(cfg_of("train.use_gpu=true", "train.num_workers=16", "train.cpus_per_worker=4"),
                           nodes({"CPU": 96, "GPU": 8}, {"CPU": 96, "GPU": 8}, {"CPU": 16}))
    assert eight.placement == "pack" and sorted(eight.worker_nodes) == [0] * 8 + [1] * 8


def test_starved_reader_is_refused_with_the_resource_and_figures(cfg_of):
    """The issue's hang: 0.75-CPU workers on both 1-CPU nodes leave 0.25 CPU each; a read task
    needs more, so it would wait forever."""
    cfg = cfg_of("train.cpus_per_worker=0.75")
    with pytest.raises(TrainSetupError) as err:
        plan_placement(cfg, TWO_ONE_CPU)
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("CPU 0.5 per read task", "train.reader_cpus", "CPU 0.75", "at most CPU 0.25 free",
                 "train.placement=spread", "10.0.0.1 (CPU 1; CPU 0.25 left)", "train.data_loader=torch"):
        assert part in msg, (part, msg)
    # the ways out it names all work: a smaller read task, the torch loader, packing
    plan_placement(cfg_of("train.cpus_per_worker=0.75", "train.reader_cpus=0.25"), TWO_ONE_CPU)
    plan_placement(cfg_of("train.cpus_per_worker=0.75", "train.data_loader=torch"), TWO_ONE_CPU)
    with pytest.raises(TrainSetupError, match="placement=pack leave at most CPU 0.25 free"):
        plan_placement(cfg_of("train.cpus_per_worker=0.75", "train.placement=pack"), TWO_ONE_CPU)


def test_placements_the_cluster_cannot_hold_are_one_line_errors(cfg_of):
    with pytest.raises(TrainSetupError, match=r"strict-spread puts each of train.num_workers=3 workers on a node "
                                              r"of its own; the cluster has 2 alive node\(s\)"):
        plan_placement(cfg_of("train.placement=strict-spread", "train.num_workers=3"), TWO_ONE_CPU)
    with pytest.raises(TrainSetupError, match=r"no node has GPU \(asked: GPU 1 per worker\)"):
        plan_placement(cfg_of("train.use_gpu=true"), TWO_ONE_CPU)
    with pytest.raises(TrainSetupError, match=r"CPU: 3 x 0.6 asked, the nodes hold 2 \(CPU 2 in all\)"):
        plan_placement(cfg_of("train.num_workers=3", "train.cpus_per_worker=0.6"), TWO_ONE_CPU)
    with pytest.raises(TrainSetupError, match="1 of 2 nodes can hold one"):
        plan_placement(cfg_of("train.placement=strict-spread", "train.cpus_per_worker=2"),
                       nodes({"CPU": 4}, {"CPU": 1}))


def test_gpu_workers_need_whole_gpus(tmp_path, data_dir, tiny_weights):
    with pytest.raises(TrainSetupError, match=r"train.gpus_per_worker=0.5: .*NCCL"):
        prepare_job(train_cfg(tmp_path, tiny_weights, "train.use_gpu=true", "train.gpus_per_worker=0.5"),
                    data_dir, [1])
    with pytest.raises(TrainSetupError, match="train.batch_timeout_s must be > 0"):
        prepare_job(train_cfg(tmp_path, tiny_weights, "train.batch_timeout_s=0"), data_dir, [1])


def test_stage1_has_its_own_step_count_when_set(tmp_path, data_dir, tiny_weights):
    from training.stages import stage_config

    cfg = train_cfg(tmp_path, tiny_weights, "train.max_steps=7", "train.stage1_max_steps=30")
    assert stage_config(cfg, 1).train.max_steps == 30 and stage_config(cfg, 1).reader.stage == 1
    assert stage_config(cfg, 2).train.max_steps == 7 and stage_config(cfg, 2).reader.stage == 2
    plain = train_cfg(tmp_path, tiny_weights, "train.max_steps=7")
    assert stage_config(plain, 1).train.max_steps == 7
    with pytest.raises(TrainSetupError, match="train.stage1_max_steps must be >= 1"):
        prepare_job(train_cfg(tmp_path, tiny_weights, "train.stage1_max_steps=0"), data_dir, [1])

def test_refused_placement_on_the_real_cluster_starts_nothing(tmp_path, data_dir, tiny_weights, ray_local):
    """On the embedded Ray (one node, 2 CPUs): the default plan fits; 1-CPU workers leave no
    CPU for the reader: ``run_job`` refuses before any MLflow run, ``train.py`` exits 2."""
    plan = check_cluster(train_cfg(tmp_path, tiny_weights))
    assert len(plan.nodes) == 1 and plan.worker_nodes == [0, 0]
    starved = train_cfg(tmp_path, tiny_weights, "train.cpus_per_worker=1")
    with pytest.raises(TrainSetupError, match=r"at most CPU 0 free"):
        run_job(prepare_job(starved, data_dir, [1], job_name="starved"))
    assert not (tmp_path / "mlflow.db").exists(), "an MLflow run was started for a refused job"
    assert not (tmp_path / "ray" / "starved").exists()


def test_train_py_refuses_a_starved_reader_with_exit_2(tmp_path, data_dir, tiny_weights, ray_local, capsys):
    rc = train.main(["--data", str(data_dir), "--stage", "1", "--job-name", "cli-starved",
                     *train_overrides(tmp_path, tiny_weights[0].tiny_dir, "train.cpus_per_worker=1")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "train.reader_cpus" in err, err
    assert not (tmp_path / "ray" / "cli-starved" / "stage1").exists()


# --- the input watchdog -------------------------------------------------------------------------

def test_watched_batches_pass_items_in_order_and_errors_through():
    assert list(watched_batches(iter(range(5)), 5.0, lambda t: "stalled")) == [0, 1, 2, 3, 4]

    def broken():
        yield 1
        raise OSError("disk gone")

    got = watched_batches(broken(), 5.0, lambda t: "stalled")
    assert next(got) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(got)


def test_watched_batches_raise_when_the_input_stalls():
    release = threading.Event()

    def stuck():
        yield "first"
        release.wait()  # a read task that never gets a CPU
        yield "late"

    got = watched_batches(stuck(), 0.5, lambda t: f"no batch for {t:g} s (train.batch_timeout_s)")
    assert next(got) == "first"
    start = time.monotonic()
    with pytest.raises(InputStalledError, match=r"no batch for 0.5 s \(train.batch_timeout_s\)"):
        next(got)
    assert time.monotonic() - start < 30
    release.set()


def test_batches_are_read_only_on_request():
    """No read-ahead: the helper reads batch k+1 only once batch k was consumed (the RNG use, and
    so a resumed run, is as without the watch)."""
    reads = []

    def source():
        for i in range(3):
            reads.append(i)
            yield i

    got = watched_batches(source(), 5.0, lambda t: "stalled")
    assert next(got) == 0
    time.sleep(0.2)
    assert reads == [0]
    assert next(got) == 1 and reads == [0, 1]


@pytest.mark.slow
def test_stalled_input_ends_the_stage_with_an_error(tmp_path, data_dir, tiny_weights, ray_local, capsys):
    """Rank 1's input blocks forever before step 2 (fault ``stall``) while rank 0 waits for it in
    the gradient all-reduce: after ``train.batch_timeout_s`` the stage fails with one line naming
    the rank, the step and the setting; ``train.py`` exits 1 (``ray job submit`` exits non-zero
    for a failed job). The torch loader: its first batch is there at once (Ray Data's start on
    a loaded 2-core machine can alone take longer than this short timeout)."""
    rc = train.main(["--data", str(data_dir), "--stage", "1", "--job-name", "stall",
                     *train_overrides(tmp_path, tiny_weights[0].tiny_dir, "train.num_workers=2", "train.max_steps=3",
                                      "train.data_loader=torch",
                                      "train.checkpoint_every=10", "train.eval_every=0", "train.eval_max_batches=1",
                                      "train.eval_sample_steps=0", "train.max_failures=0", "train.fault_at_step=2",
                                      "train.fault_rank=1", "train.fault_kind=stall", "train.batch_timeout_s=10")])
    captured = capsys.readouterr()
    assert rc == 1, captured.err[-3000:]
    line = captured.err.strip().splitlines()[-1]
    assert line.startswith("train.py: error: stage 1 failed: rank 1: "), line
    assert "InputStalledError" in line and "no training batch for 10 s (train.batch_timeout_s) on rank 1 " \
        "before step 2 of stage 1" in line, line
    assert (tmp_path / "ray" / "stall" / "stage1_work" / "fault_injected_stage1_step2_rank1").is_file()
    record = json.loads((tmp_path / "ray" / "stall" / "job.json").read_text())
    client = JobTracker(train_cfg(tmp_path, tiny_weights).tracking).client
    assert client.get_run(record["stages"]["1"]["run_id"]).info.status == "FAILED"


# --- job-mode paths -----------------------------------------------------------------------------

def _job_env(working_dir: bool = True) -> dict:
    runtime_env = {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"} if working_dir else {}
    return {RAY_JOB_CONFIG_ENV: json.dumps({"runtime_env": runtime_env, "metadata": {}})}


def test_relative_result_paths_in_a_working_dir_job_are_refused(tmp_path, tiny_weights, monkeypatch):
    """Ray runs a ``--working-dir`` job in its copy of the checkout (its current directory,
    where the code, and so the project root, now lives): the defaults resolve inside it."""
    from core.config import load_platform_config

    monkeypatch.chdir(PROJECT_ROOT)  # this checkout plays Ray's copy
    defaults = load_platform_config(None, [])
    with pytest.raises(JobPathError) as err:
        check_job_paths(defaults, TRAIN_RESULT_KEYS, _job_env())
    msg = str(err.value)
    assert "\n" not in msg and "temporary copy" in msg
    for key in ("tracking.tracking_uri=sqlite:///mlflow.db", "tracking.artifact_root=mlruns",
                "train.storage_path=work/ray_results"):
        assert key in msg, (key, msg)
    with pytest.raises(JobPathError, match="evaluation.output_dir=work/evaluation"):
        check_job_paths(defaults, EVALUATION_RESULT_KEYS, _job_env())
    # absolute paths elsewhere, a server URI: accepted; no working dir, or no job: nothing checked
    ok = load_platform_config(None, [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                                     "tracking.artifact_root=s3://bucket/mlruns", f"train.storage_path={tmp_path}/r",
                                     f"evaluation.output_dir={tmp_path}/e"])
    check_job_paths(ok, TRAIN_RESULT_KEYS + EVALUATION_RESULT_KEYS, _job_env())
    check_job_paths(load_platform_config(None, ["tracking.tracking_uri=http://127.0.0.1:5000",
                                                f"tracking.artifact_root={tmp_path}/a",
                                                f"train.storage_path={tmp_path}/r"]), TRAIN_RESULT_KEYS, _job_env())
    check_job_paths(defaults, TRAIN_RESULT_KEYS, _job_env(working_dir=False))
    check_job_paths(defaults, TRAIN_RESULT_KEYS, {})
    with pytest.raises(JobPathError, match=r"train.storage_path=" + str(PROJECT_ROOT)):
        check_job_paths(load_platform_config(None, [f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
                                                    f"tracking.artifact_root={tmp_path}/a",
                                                    f"train.storage_path={PROJECT_ROOT}/work/x"]),
                        TRAIN_RESULT_KEYS, _job_env())


def test_train_py_refuses_them_before_work(tmp_path, data_dir, tiny_weights, monkeypatch, capsys):
    monkeypatch.chdir(PROJECT_ROOT)
    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, _job_env()[RAY_JOB_CONFIG_ENV])
    overrides = [o for o in train_overrides(tmp_path, tiny_weights[0].tiny_dir) if not o.startswith("train.storage")]
    rc = train.main(["--data", str(data_dir), "--stage", "1", *overrides])
    err = capsys.readouterr().err
    assert rc == 2 and "train.storage_path=work/ray_results" in err and "absolute" in err, err


# --- logs -----------------------------------------------------------------------------------------

def test_fresh_start_does_not_warn_about_the_latest_checkpoint(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="training.stages"):
        assert resumed_step(tmp_path / "stage1") == 0
    assert not caplog.records
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "checkpoint_manager_snapshot.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="training.stages"):
        assert resumed_step(tmp_path / "stage1") == 0
    assert "cannot read the latest checkpoint's step" in caplog.text
