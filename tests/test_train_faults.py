"""Training under faults (issue 13 item 7) and fp32 master weights (issue 12): a NaN on one rank
stops every rank, an MLflow outage does not stop training, interrupted / failed jobs leave their
MLflow runs KILLED / FAILED, checkpoints load with ``weights_only=True``, ``job.json`` is never torn,
and bf16 training at lr 1e-5 still moves a pretrained weight of 0.05.

Unit-level checks run without Ray; the Ray runs (1 worker, a few steps) are marked slow."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from train_setup import train_cfg, train_overrides

from training.stages import JobRecord, StageRecord, prepare_job, run_job
from training.tracking import JobTracker

ROOT = Path(__file__).resolve().parent.parent




# --- fp32 master weights (issue 12) ----------------------------------------------------------------

def test_sd15_precision_step_moves_a_pretrained_weight(tmp_path, data_dir, tiny_weights):
    """The sd15 config's precision settings (model.dtype bfloat16, train.mixed_precision bf16,
    lr 1e-5) on the tiny model: parameters stay float32 and one AdamW step moves a weight of
    0.05 by ~lr (in bf16 the update is below half a bf16 step there and rounds away). On CPU
    the forward runs in float32 (autocast is CUDA-only); on a GPU under bf16 autocast."""
    import dataclasses

    from diffusers.optimization import get_scheduler

    from pipelines.reader.source import LoopyTorchDataset, collate
    from training.loop import StageJob, build_model
    from training.step import make_noise_scheduler, train_step

    sd15 = yaml.safe_load((ROOT / "configs" / "sd15.yaml").read_text())
    dtype, precision, lr = sd15["model"]["dtype"], sd15["train"]["mixed_precision"], float(sd15["train"]["lr"])
    assert dtype == "bfloat16" and lr == 1e-5  # the production setting this test is about
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = [f"train.mixed_precision={precision}", "train.use_gpu=true"] if device.type == "cuda" else []
    cfg = train_cfg(tmp_path, tiny_weights, f"model.dtype={dtype}", f"train.lr={lr:.1e}", "train.warmup_steps=0", *gpu)
    model = build_model(StageJob(cfg=cfg, stage=1, data_dir=str(data_dir), steps_per_epoch=1), device)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    weight = model.denoise_unet.conv_in.weight
    with torch.no_grad():
        weight[0, 0, 0, 0] = 0.05
    opt = torch.optim.AdamW(list(model.trainable_parameters()), lr=lr, weight_decay=cfg.train.weight_decay)
    sched = get_scheduler("constant", opt)
    ds = LoopyTorchDataset(data_dir, dataclasses.replace(cfg.reader, stage=1), "train")
    batch = collate([ds[i] for i in range(2)])
    train_step(model, batch, opt, sched, make_noise_scheduler(cfg.train), cfg.train, step=1, rank=0, device=device)
    moved = abs(float(weight[0, 0, 0, 0]) - 0.05)
    assert moved > 0.5 * lr, f"a weight of 0.05 moved by {moved:g} at lr {lr:g}"


# --- NaN on one rank: every rank stops at the same step -------------------------------------------

class _TinyDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, noisy_latents, timesteps, ref_latent):
        b, f = noisy_latents.shape[:2]
        return self.conv(noisy_latents.flatten(0, 1) + ref_latent.repeat_interleave(f, 0)).unflatten(0, (b, f))


def _nan_rank_worker(rank: int, world: int, out_dir: str, use_scaler: bool) -> None:
    """One gloo rank: 3 steps of train_step on a DDP model; rank 1's step-2 batch is NaN.
    The ranks meet through a file store (no port to race for) and talk over loopback only. A rank
    still working after 240 s prints every thread's stack to its stderr and exits (its outcome file
    is then missing: the test fails with the stacks in its output); teardown gets 30 s."""
    import datetime
    import faulthandler

    from diffusers.optimization import get_scheduler

    from core.sections import TrainConfig
    from training.step import NonFiniteLossError, make_noise_scheduler, train_step

    faulthandler.dump_traceback_later(240, exit=True)
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.distributed.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=20))
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(_TinyDenoiser())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = get_scheduler("constant", opt)
    tc = TrainConfig()
    scaler = torch.amp.GradScaler("cpu") if use_scaler else None
    outcome = {"rank": rank, "steps_done": 0}
    try:
        for step in (1, 2, 3):
            batch = {"latents": torch.randn(2, 1, 4, 8, 8), "ref_latent": torch.randn(2, 4, 8, 8),
                     "video_index": torch.tensor([rank, rank])}
            if rank == 1 and step == 2:
                batch["latents"][:] = float("nan")
            train_step(model, batch, opt, sched, make_noise_scheduler(tc), tc, step, rank, torch.device("cpu"),
                       fp16_scaler=scaler)
            outcome["steps_done"] = step
    except NonFiniteLossError as err:
        outcome.update(stopped_at=err.step, what=err.what)
    except Exception as exc:  # noqa: BLE001 - e.g. a gloo timeout: recorded for the assertion
        outcome.update(error=f"{type(exc).__name__}: {exc}")
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcome))
    faulthandler.dump_traceback_later(30, exit=True)  # the outcome is out; teardown gets 30 s
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("use_scaler", [True, False], ids=["fp16_scaler", "fp32"])
def test_nan_on_one_rank_stops_every_rank_at_that_step(tmp_path, use_scaler):
    """Two gloo processes: rank 1's loss is NaN at step 2. Both ranks raise NonFiniteLossError at
    step 2 (agreed flag), with fp16's GradScaler too: none goes on into step 3's all-reduce (where
    it would wait for the stopped rank until gloo's 20 s timeout: recorded as an error)."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_nan_rank_worker, args=(2, str(tmp_path), use_scaler), nprocs=2,
                             join=False, start_method="spawn")
    outcome_files = [tmp_path / f"rank{r}.json" for r in (0, 1)]
    # A guard only: a rank left waiting in a collective errors after gloo's 20 s, and the workers'
    # own 240 s faulthandler deadline ends a stuck rank with its stacks on stderr.
    deadline = time.monotonic() + 300
    exited = False
    while not exited and time.monotonic() < deadline:
        try:
            exited = ctx.join(timeout=1)
        except mp.ProcessExitedException:  # a faulthandler deadline: judged by the outcome files
            break
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    missing = [f.name for f in outcome_files if not f.is_file()]
    assert not missing, f"no outcome from {missing} within 300 s (see the ranks' stderr for their stacks)"
    outcomes = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)}
    for r, o in outcomes.items():
        assert o.get("stopped_at") == 2 and o["steps_done"] == 1, (r, o)
    assert outcomes[1]["what"].startswith("loss (nan")
    assert outcomes[0]["what"] == "loss of another rank"


# --- checkpoints: weights only; job.json: atomic -----------------------------------------------------

def test_checkpoint_files_load_with_weights_only(tmp_path, tiny_weights):
    """Every .pt of a checkpoint (model, optimizer, scheduler, EMA, RNG states) loads with
    ``torch.load(weights_only=True)``; the evaluation task rebuilds the EMA model from it."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from core.sections import ModelConfig, ReaderConfig
    from models.loopy import LoopyModel
    from training.checkpoint_eval import model_from_checkpoint
    from training.checkpointing import TrainState, load_checkpoint, save_checkpoint
    from training.step import trainable

    net = LoopyModel.from_sd15(tiny_weights[1].unet, ModelConfig(), ReaderConfig(), stage=1)
    opt = torch.optim.AdamW(trainable(net), lr=0.1)
    sched = get_scheduler("constant", opt)
    ema = EMAModel(trainable(net), decay=0.5)
    for p in trainable(net):
        p.grad = torch.ones_like(p)
    opt.step()
    ema.step(trainable(net))
    state = TrainState(stage=1, step=5)
    save_checkpoint(tmp_path, rank=0, state=state, model=net, optimizer=opt, lr_scheduler=sched, ema=ema)
    files = sorted(tmp_path.glob("*.pt"))
    assert {f.name for f in files} >= {"model.pt", "optimizer.pt", "lr_scheduler.pt", "ema.pt", "rng_rank0.pt"}
    for f in files:
        torch.load(f, weights_only=True)  # raises for anything but tensors and plain types
    assert load_checkpoint(tmp_path, rank=0, model=net, optimizer=opt, lr_scheduler=sched, ema=ema) == state
    rebuilt, step = model_from_checkpoint(tmp_path, use_ema=True)
    assert step == 5
    shadow = dict(zip([n for n, p in net.named_parameters() if p.requires_grad], ema.shadow_params))
    name = next(iter(shadow))
    assert torch.equal(dict(rebuilt.named_parameters())[name], shadow[name])


def test_job_record_write_is_atomic(tmp_path):
    """A write that fails part-way (file size limit: a full disk) leaves the previous job.json."""
    JobRecord(name="job", parent_run_id="abc").save(tmp_path)
    before = (tmp_path / "job.json").read_text()
    big = JobRecord(name="job", parent_run_id="abc",
                    stages={str(i): StageRecord(run_id="r" * 200, package_dir="p" * 400) for i in range(40)})
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 100, hard))
    try:
        with pytest.raises(OSError):
            big.save(tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert (tmp_path / "job.json").read_text() == before
    assert JobRecord.load(tmp_path).parent_run_id == "abc"
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"]  # no temp file left behind


# --- dataset lineage -----------------------------------------------------------------------------------

def test_dataset_logged_as_training_input(tmp_path, data_dir, tiny_weights):
    import shutil

    cfg = train_cfg(tmp_path, tiny_weights)
    tracker = JobTracker(cfg.tracking)
    run = tracker.client.create_run(tracker.experiment_id)
    plain = tracker.log_dataset_input(run.info.run_id, data_dir)
    with_ingest = tmp_path / "ingest_out"
    shutil.copytree(data_dir, with_ingest)
    (with_ingest / "ingest_run.json").write_text(json.dumps(
        {"run_id": "0123456789abcdef", "tracking_uri": "sqlite:///x.db", "experiment": "loopy-ingest",
         "fingerprint": "f" * 64}))
    tracked = tracker.log_dataset_input(run.info.run_id, with_ingest)
    inputs = tracker.client.get_run(run.info.run_id).inputs.dataset_inputs
    by_digest = {d.dataset.digest: d for d in inputs}
    assert plain["digest"] in by_digest and tracked["digest"] == "f" * 36
    tags = {t.key: t.value for t in by_digest["f" * 36].tags}
    assert tags["loopy.ingest_run_id"] == "0123456789abcdef" and tags["mlflow.data.context"] == "training"
    assert str(with_ingest) in by_digest["f" * 36].dataset.source


def test_plan_offset_drops_whole_rounds_of_blocks():
    from training.stages import plan_offset_steps

    assert plan_offset_steps(1000, batch_size=1, block_rows=16) == 992
    assert plan_offset_steps(2, batch_size=2, block_rows=2) == 2
    assert plan_offset_steps(3, batch_size=2, block_rows=16) == 0
    assert plan_offset_steps(20, batch_size=3, block_rows=16) == 16  # lcm 48 samples = 16 steps
    for step in range(0, 60):
        off = plan_offset_steps(step, 3, 16)
        assert off <= step and (step - off) * 3 < 48 and (off * 3) % 16 == 0


# --- MLflow runs end FAILED / KILLED -------------------------------------------------------------------

class _FakeResult:
    def __init__(self, checkpoint):
        self.checkpoint, self.metrics = checkpoint, {}


def _fake_trainer(behaviour: str, ckpt_dir: Path):
    """A stand-in for TorchTrainer whose fit() raises, or returns a checkpoint with a final model."""
    import ray.train

    class FakeTrainer:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            if behaviour == "interrupt":
                raise KeyboardInterrupt
            (ckpt_dir / "loopy").mkdir(parents=True, exist_ok=True)
            return _FakeResult(ray.train.Checkpoint.from_directory(str(ckpt_dir)))
    return FakeTrainer


@pytest.mark.parametrize("behaviour,status", [("interrupt", "KILLED"), ("package_error", "FAILED")])
def test_runs_end_killed_or_failed(tmp_path, data_dir, tiny_weights, monkeypatch, behaviour, status):
    """An interrupt during fit() -> stage and parent runs KILLED; an error after fit() (writing
    the package) -> FAILED. Neither is left RUNNING."""
    import ray.train.torch

    import training.stages as stages

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", _fake_trainer(behaviour, tmp_path / "ckpt"))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(stages, "write_model_package", disk_full)
    monkeypatch.setattr(stages, "init_ray", lambda cfg: None)  # fit() is the stand-in: no Ray needed
    cfg = train_cfg(tmp_path, tiny_weights, "train.num_workers=1", "train.data_loader=torch")
    prep = prepare_job(cfg, data_dir, [1], job_name=f"fake-{behaviour}")
    with pytest.raises((KeyboardInterrupt, OSError)):
        run_job(prep)
    client = JobTracker(cfg.tracking).client
    record = JobRecord.load(prep.job_dir)
    assert client.get_run(record.stages["1"].run_id).info.status == status
    assert client.get_run(record.parent_run_id).info.status == status


SIGTERM_SCRIPT = """
import sys, time
from pathlib import Path
import ray.train.torch

class BlockingTrainer:
    def __init__(self, *args, **kwargs):
        pass
    def fit(self):
        Path(sys.argv[1]).write_text("fitting")
        time.sleep(300)

ray.train.torch.TorchTrainer = BlockingTrainer
import training.stages
training.stages.init_ray = lambda cfg: None  # no Ray needed: fit() is the stand-in above
# ... nor its nodes: the placement is planned on one node like the embedded Ray's
training.stages.check_cluster = lambda cfg: training.stages.plan_placement(
    cfg, [training.stages.NodeShape("node", "127.0.0.1", {"CPU": 2.0})])
import train
sys.exit(train.main(sys.argv[2:]))
"""


def test_sigterm_marks_runs_killed(tmp_path, data_dir, tiny_weights):
    """``train.py`` gets SIGTERM while training: exit code 143, stage and parent runs KILLED."""
    flag = tmp_path / "fitting"
    args = ["--data", str(data_dir), "--stage", "1", "--job-name", "sigterm",
            *train_overrides(tmp_path, tiny_weights[0].tiny_dir, "train.num_workers=1", "train.data_loader=torch")]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(flag), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not flag.exists():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "train.py never reached fit()"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    cfg = train_cfg(tmp_path, tiny_weights)
    client = JobTracker(cfg.tracking).client
    record = JobRecord.load(Path(cfg.train.storage_path) / "sigterm")
    assert client.get_run(record.stages["1"].run_id).info.status == "KILLED"
    assert client.get_run(record.parent_run_id).info.status == "KILLED"


# --- MLflow outage during a Ray Train run ---------------------------------------------------------------

@pytest.mark.slow
def test_mlflow_outage_does_not_stop_training(tmp_path, data_dir, tiny_weights, ray_local):
    """Rank 0's MLflow server is unreachable (a dead 127.0.0.1 port) for steps 2-3 of 5: training
    finishes, the package is registered, and the metrics queued during the outage arrive once
    the server is back (the async logger retried them). Also: the stage run has the training
    data as its input."""
    cfg = train_cfg(tmp_path, tiny_weights, "train.num_workers=1", "train.max_steps=5", "train.checkpoint_every=5",
               "train.eval_every=0", "train.eval_sample_steps=0", "train.eval_max_batches=1",
               "train.data_loader=torch", "train.max_failures=0", "train.fault_kind=mlflow_outage",
               "train.fault_at_step=2", "train.fault_steps=2", "train.fault_rank=0",
               "tracking.http_max_retries=0", "tracking.http_timeout_s=2")
    record = run_job(prepare_job(cfg, data_dir, [1], job_name="outage"))
    client = JobTracker(cfg.tracking).client
    run = client.get_run(record.stages["1"].run_id)
    assert run.info.status == "FINISHED" and record.stages["1"].version is not None
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == [1, 2, 3, 4, 5]
    marker = Path(cfg.train.storage_path) / "outage" / "stage1_work" / "fault_injected_stage1_step2_rank0"
    assert marker.read_text() == "mlflow_outage ended"
    assert "val_loss" in run.data.metrics  # the evaluation task logged too
    assert [d.dataset.source for d in run.inputs.dataset_inputs] and str(data_dir) in run.inputs.dataset_inputs[0].dataset.source
