"""Training: setup errors, the NaN guard, and tiny Ray Train runs (2 CPU workers) tracked in MLflow
(sqlite in tmp; no server). The Ray runs are marked slow."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from train_setup import train_cfg, train_overrides

import train
from core.config import ConfigError
from core.paths import resolve_tracking_uri
from training.stages import JobRecord, TrainSetupError, prepare_job, run_job
from training.tracking import JobTracker

# --- checks before any worker starts -------------------------------------------------------------

def test_setup_errors_are_reported_before_training(tmp_path, data_dir, tiny_weights, capsys):
    cfg = train_cfg(tmp_path, tiny_weights)
    with pytest.raises(TrainSetupError, match="no such directory"):
        prepare_job(cfg, tmp_path / "missing", [1])
    (tmp_path / "not_ingest").mkdir()
    with pytest.raises(TrainSetupError, match="ingest_meta.json"):
        prepare_job(cfg, tmp_path / "not_ingest", [1])
    with pytest.raises(TrainSetupError, match="stage 2 needs a stage-1 model"):
        prepare_job(cfg, data_dir, [2])
    with pytest.raises(TrainSetupError, match="does not exist"):
        prepare_job(cfg, data_dir, [2], init_from=str(tmp_path / "no_package"))
    with pytest.raises(TrainSetupError, match="less than one batch"):
        prepare_job(train_cfg(tmp_path, tiny_weights, "train.batch_size=64"), data_dir, [1])
    with pytest.raises(TrainSetupError, match="train.max_steps"):
        prepare_job(train_cfg(tmp_path, tiny_weights, "train.max_steps=0"), data_dir, [1])
    with pytest.raises(ConfigError, match="train.no_such_key"):
        train_cfg(tmp_path, tiny_weights, "train.no_such_key=1")
    # the CLI: one clear line, exit code 2, nothing started
    rc = train.main(["--data", str(tmp_path / "missing"), "--stage", "1",
                     *train_overrides(tmp_path, tiny_weights[0].tiny_dir)])
    assert rc == 2 and "no such directory" in capsys.readouterr().err
    assert not (tmp_path / "ray").exists() or not any((tmp_path / "ray").iterdir())


# --- the training step ---------------------------------------------------------------------------

def _stage1_batch(data_dir, cfg, n=2):
    import dataclasses

    from pipelines.reader.source import LoopyTorchDataset, collate

    ds = LoopyTorchDataset(data_dir, dataclasses.replace(cfg.reader, stage=1), "train")
    return collate([ds[i] for i in range(n)])


def test_nan_guard_stops_with_step_and_provenance(tmp_path, data_dir, tiny_weights):
    from diffusers.optimization import get_scheduler

    from models.loopy import LoopyModel
    from training.step import NonFiniteLossError, make_noise_scheduler, train_step

    cfg = train_cfg(tmp_path, tiny_weights)
    model = LoopyModel.from_sd15(tiny_weights[1].unet, cfg.model, cfg.reader, stage=1)
    opt = torch.optim.AdamW(list(model.trainable_parameters()), lr=1e-3)
    sched = get_scheduler("constant", opt)
    noise = make_noise_scheduler(cfg.train)
    batch = _stage1_batch(data_dir, cfg)
    ok = train_step(model, batch, opt, sched, noise, cfg.train, step=0, rank=0, device=torch.device("cpu"))
    assert ok.loss > 0 and ok.grad_norm > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch["latents"][1] = float("nan")
    with pytest.raises(NonFiniteLossError) as info:
        train_step(model, batch, opt, sched, noise, cfg.train, step=7, rank=0, device=torch.device("cpu"))
    err = info.value
    assert err.step == 7 and "loss" in err.what
    assert err.provenance["video_index"] == batch["video_index"].tolist()
    assert err.provenance["clip_frame_indices"] == batch["clip_frame_indices"].tolist()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "no update after NaN"


def test_one_timestep_per_clip(tmp_path, data_dir, tiny_weights):
    """Every frame of a clip is noised at the clip's timestep (seed defect 17)."""
    from training.step import make_noise_scheduler

    cfg = train_cfg(tmp_path, tiny_weights)
    noise_scheduler = make_noise_scheduler(cfg.train)
    latents = torch.randn(3, 5, 4, 8, 8)
    noise = torch.randn_like(latents)
    t = torch.tensor([10, 500, 990])
    noisy = noise_scheduler.add_noise(latents, noise, t)
    a = noise_scheduler.alphas_cumprod[t].sqrt()
    expect = a[:, None, None, None, None] * latents + (1 - a**2).sqrt()[:, None, None, None, None] * noise
    assert torch.allclose(noisy, expect, atol=1e-5)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_loss_target_follows_the_prediction_type(kind):
    """train.prediction_type picks the target: a model that returns exactly it has loss 0, and the
    sampler's DDIM (a package without a scheduler folder) uses the same type and schedule."""
    from core.sections import PlatformConfig, TrainConfig
    from inference.sampler import training_schedule
    from training.step import diffusion_loss, make_noise_scheduler

    cfg = TrainConfig(prediction_type=kind)
    sched = make_noise_scheduler(cfg)
    latents = torch.randn(2, 3, 6, 4, 4)
    t = torch.tensor([20, 980])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=g)  # what diffusion_loss draws first from the same seed
    a = sched.alphas_cumprod[t].sqrt()[:, None, None, None, None]
    target = noise if kind == "epsilon" else a * noise - (1 - a**2).sqrt() * latents

    class Oracle(torch.nn.Module):
        def forward(self, noisy_latents, timesteps):
            return target

    loss = diffusion_loss(Oracle(), {"latents": latents}, sched, torch.Generator().manual_seed(0), t)
    assert float(loss) < 1e-10
    other = "v_prediction" if kind == "epsilon" else "epsilon"
    assert float(diffusion_loss(Oracle(), {"latents": latents}, make_noise_scheduler(TrainConfig(prediction_type=other)),
                                torch.Generator().manual_seed(0), t)) > 0.1
    ddim = training_schedule(PlatformConfig(train=cfg).train)
    assert ddim["prediction_type"] == kind and ddim["beta_schedule"] == cfg.beta_schedule


def test_mouth_region_weights_cover_the_lip_box_on_the_latent_grid():
    """train.mouth_loss_weight: cells fully inside the grown lip box weigh 1 + w, cells outside 1,
    a cell the box edge cuts in half 1 + w / 2; the box follows each frame's own landmarks."""
    from training.step import mouth_region_weights

    lm = torch.full((1, 2, 68, 2), 0.5)
    lips = torch.tensor([[0.25, 0.5], [0.5, 0.75]])  # frame 0: lips span x 0.25-0.5, y 0.5-0.75
    lm[0, 0, 48:68] = lips.repeat(10, 1)
    lm[0, 1, 48:68] = lips.repeat(10, 1) - torch.tensor([0.25, 0.5])  # frame 1: top-left quarter
    w = mouth_region_weights(lm, 4, 4, weight=3.0, margin=0.0)
    assert w.shape == (1, 2, 1, 4, 4)
    expect0 = torch.ones(4, 4)
    expect0[2, 1] = 4.0  # cell rows 0.5-0.75, cols 0.25-0.5
    assert torch.allclose(w[0, 0, 0], expect0)
    expect1 = torch.ones(4, 4)
    expect1[0, 0] = 4.0
    assert torch.allclose(w[0, 1, 0], expect1)
    # grown by half its size on each side: x 0.125-0.625, y 0.375-0.875; cell [1, 0] is half covered
    # along y and half along x: a quarter
    grown = mouth_region_weights(lm[:, :1], 4, 4, weight=2.0, margin=0.5)[0, 0, 0]
    assert torch.allclose(grown[2, 1], torch.tensor(3.0)) and torch.allclose(grown[1, 0], torch.tensor(1.5))
    assert torch.allclose(grown[0], torch.ones(4)) and torch.allclose(grown[:, 3], torch.ones(4))


def test_mouth_loss_weight_adds_the_mouth_cells_error_and_only_there():
    """An error only outside the mouth gives the same loss with or without the mouth weight; an
    error only inside it is counted 1 + w times; no landmarks in the batch is a named error."""
    from core.sections import TrainConfig
    from training.errors import TrainingError
    from training.step import diffusion_loss, make_noise_scheduler

    sched = make_noise_scheduler(TrainConfig())
    latents = torch.zeros(1, 2, 4, 4, 4)
    t = torch.tensor([500])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=g)
    lm = torch.full((1, 2, 68, 2), 0.5)
    lm[..., 48:68, :] = torch.tensor([[0.25, 0.5], [0.5, 0.75]]).repeat(10, 1)  # the cell [2, 1]
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[2, 1] = True

    class Off(torch.nn.Module):  # the target plus an error of 1 on the cells of ``where``
        def __init__(self, where):
            super().__init__()
            self.where = where

        def forward(self, noisy_latents, timesteps):
            return noise + self.where.float()

    batch = {"latents": latents, "landmarks": lm}
    for where, factor in ((~inside, 1.0), (inside, 4.0)):
        plain = diffusion_loss(Off(where), batch, sched, torch.Generator().manual_seed(0), t)
        weighted = diffusion_loss(Off(where), batch, sched, torch.Generator().manual_seed(0), t,
                                  mouth_weight=3.0, mouth_margin=0.0)
        assert float(weighted) == pytest.approx(float(plain) * factor, rel=1e-5)
    with pytest.raises(TrainingError, match="mouth_loss_weight"):
        diffusion_loss(Off(inside), {"latents": latents}, sched, torch.Generator().manual_seed(0), t, mouth_weight=1.0)


def test_audio_use_is_zero_for_a_model_that_ignores_the_audio_and_one_for_one_that_needs_it():
    """val_audio_gain (training.evaluation.audio_use): the mouth error with each clip's own audio
    against another clip's. A model blind to the audio scores exactly 0; a model that predicts the
    target only with the right audio (error 1 everywhere with another) scores 1."""
    from core.sections import TrainConfig
    from training.evaluation import audio_use
    from training.step import make_noise_scheduler

    sched = make_noise_scheduler(TrainConfig())  # epsilon: the target is the noise
    latents = torch.randn(3, 2, 4, 4, 4)
    audio = torch.randn(3, 2, 5, 2, 8)
    lm = torch.full((3, 2, 68, 2), 0.5)
    lm[..., 48:68, :] = torch.tensor([[0.3, 0.5], [0.7, 0.8]]).repeat(10, 1)
    batch = {"latents": latents, "audio": audio, "landmarks": lm}
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))  # seed 0, batch 0

    class Blind(torch.nn.Module):
        def forward(self, noisy_latents, timesteps, audio):
            return noisy_latents * 0.5

    class Listens(torch.nn.Module):
        def forward(self, noisy_latents, timesteps, audio):
            right = torch.tensor([float(torch.equal(a, b)) for a, b in zip(audio, batch["audio"])])
            return noise + (1.0 - right).view(-1, 1, 1, 1, 1)

    blind = audio_use(Blind(), [batch], sched, [100, 900], 0, torch.device("cpu"))
    assert blind["val_audio_gain"] == 0.0 and blind["val_mouth_loss"] > 0
    listens = audio_use(Listens(), [batch], sched, [100, 900], 0, torch.device("cpu"))
    assert listens["val_mouth_loss"] == pytest.approx(0.0, abs=1e-9)
    assert listens["val_mouth_loss_other_audio"] == pytest.approx(1.0)
    assert listens["val_audio_gain"] == pytest.approx(1.0)
    assert audio_use(Blind(), [{"latents": latents}], sched, [100], 0, torch.device("cpu")) == {}  # stage 1


# --- Ray Train runs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_stage_job(tmp_path_factory, data_dir, tiny_weights, ray_local):
    """Both stages, 2 workers, the reader's Ray Dataset; rank 1 is killed before stage-1 step 2
    and recovered by FailureConfig(max_failures=1) from the step-1 checkpoint (stage 1 only: a
    second restart in stage 2 would test nothing new and cost a worker-group start)."""
    root = tmp_path_factory.mktemp("two_stage")
    cfg = train_cfg(root, tiny_weights, "train.num_workers=2", "train.max_steps=3", "train.checkpoint_every=1",
               "train.eval_every=0", "train.eval_sample_steps=2", "train.data_loader=ray_data",
               "train.fault_at_step=2", "train.fault_rank=1", "train.fault_stage=1", "train.max_failures=1",
               "train.warmup_steps=1",
               "train.lr=0.001")
    prep = prepare_job(cfg, data_dir, [1, 2], job_name="e2e")
    record = run_job(prep)
    return cfg, prep, record


@pytest.mark.slow
def test_two_stages_tracked_and_registered(two_stage_job):
    cfg, prep, record = two_stage_job
    tracker = JobTracker(cfg.tracking)
    client = tracker.client
    parent = client.get_run(record.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.num_workers"] == "2" and parent.data.params["train.lr"] == "0.001"
    children = {r.data.tags["loopy.stage"]: r for r in tracker.child_runs(record.parent_run_id)}
    assert set(children) == {"1", "2"}
    for stage, run in children.items():
        assert run.info.status == "FINISHED"
        assert run.data.params["reader.stage"] == stage
        for key in ("loss", "lr", "grad_norm", "samples_per_s", "data_wait_share", "val_loss"):
            assert key in run.data.metrics, (stage, key)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert sorted(set(steps)) == [1, 2, 3]
        mv = client.get_model_version(cfg.tracking.registered_model, str(record.stages[stage].version))
        assert mv.tags["stage"] == stage and mv.run_id == run.info.run_id
        arts = [a.path for a in client.list_artifacts(run.info.run_id, "eval")]
        assert any(p.endswith(".png") for p in arts)
    assert any(a.path.endswith(".mp4") for a in client.list_artifacts(children["2"].info.run_id, "eval"))
    for stage in ("1", "2"):  # complete packages (tiny preset: vae/ and wav2vec2/ copies with weights)
        pkg = Path(record.stages[stage].package_dir)
        for part in ("loopy/config.json", "platform.yaml", "vae/config.json", "wav2vec2/config.json"):
            assert (pkg / part).is_file(), (stage, part)
        assert list((pkg / "wav2vec2").glob("*.safetensors")) and list((pkg / "loopy").glob("*.safetensors"))
    # the failure really happened (rank 1 exited once) and the stage still finished; only in stage 1
    assert (prep.job_dir / "stage1_work" / "fault_injected_stage1_step2_rank1").is_file()
    assert not list((prep.job_dir / "stage2_work").glob("fault_injected_*"))


@pytest.mark.slow
def test_stage2_starts_from_stage1_weights(two_stage_job, tmp_path):
    from models.loopy import LoopyModel
    from models.registry import resolve_model_location
    from training.loop import StageJob, build_model
    from training.stages import stage_config

    cfg, prep, record = two_stage_job
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    stage1 = LoopyModel.from_pretrained(str(resolve_model_location(record.stages["1"].model_uri,
                                                                   tmp_path / "s1", uri) / "loopy"))
    job = StageJob(cfg=stage_config(cfg, 2), stage=2, data_dir=str(prep.data_dir), steps_per_epoch=1,
                   init_from=record.stages["1"].model_uri, work_dir=str(tmp_path))
    model2 = build_model(job, torch.device("cpu"))
    assert model2.stage == 2
    s1, s2 = stage1.state_dict(), model2.state_dict()
    shared = [k for k in s1 if k.startswith(("reference_net.", "denoise_unet.")) and ".processor." not in k]
    assert len(shared) > 50
    assert all(torch.equal(s1[k], s2[k]) for k in shared)
    # and stage 1 really trained: its weights differ from the SD initialisation
    fresh = LoopyModel.from_sd15(tiny_weights_unet(cfg), cfg.model, cfg.reader, stage=1)
    assert any(not torch.equal(fresh.state_dict()[k], s1[k]) for k in shared)


def tiny_weights_unet(cfg) -> str:
    from core.weights import resolve_weights

    return resolve_weights(cfg.weights).unet


@pytest.mark.slow
@pytest.mark.parametrize("loader,workers", [("torch", 1), ("ray_data", 2)])
def test_nan_stop_then_resume_matches_uninterrupted(tmp_path, data_dir, tiny_weights, ray_local, loader, workers):
    """Same job twice: uninterrupted, and stopped by the NaN guard at step 3 (a NaN batch injected
    once, on the last rank) then ``--resume``d from the step-2 checkpoint. The NaN stop names the
    step and the batch; with 2 workers both ranks stop (the other rank's loss was finite) within a
    minute of the fault, and the stage run is FAILED; the loss curves and the final (EMA)
    weights agree. Both data paths: the torch Dataset, and the Ray Dataset sharded over 2
    workers by Ray Train (2-sample blocks, so the resume drops the trained blocks from the plan)."""
    import time

    from training.stages import TrainingStoppedError

    common = [f"train.num_workers={workers}", "train.max_steps=4", "train.checkpoint_every=2", "train.eval_every=0",
              f"train.data_loader={loader}", "train.warmup_steps=1", "train.lr=0.001", "train.max_failures=0",
              "train.eval_max_batches=1", "train.ema_decay=0.9", "train.block_rows=2"]
    cfg = train_cfg(tmp_path, tiny_weights, *common)
    full = run_job(prepare_job(cfg, data_dir, [1], job_name="full"))
    cut_cfg = train_cfg(tmp_path, tiny_weights, *common, "train.fault_at_step=3", f"train.fault_rank={workers - 1}",
                   "train.fault_kind=nan")
    cut_prep = prepare_job(cut_cfg, data_dir, [1], job_name="cut")
    with pytest.raises(TrainingStoppedError, match=r"step 3.*video_index"):
        run_job(cut_prep)
    stopped_at = time.time()
    work = cut_prep.job_dir / "stage1_work"
    fault_at = (work / f"fault_injected_stage1_step3_rank{workers - 1}").stat().st_mtime
    assert stopped_at - fault_at < 60
    reports = {r: json.loads((work / f"nan_stop_rank{r}.json").read_text()) for r in range(workers)}
    assert all(rep["step"] == 3 for rep in reports.values())  # every rank stopped at the bad step
    assert reports[workers - 1]["offending"] and not any(reports[r]["offending"] for r in range(workers - 1))
    client = JobTracker(cfg.tracking).client
    cut_record = JobRecord.load(cut_prep.job_dir)
    assert client.get_run(cut_record.stages["1"].run_id).info.status == "FAILED"
    assert client.get_run(cut_record.parent_run_id).info.status == "FAILED"
    resumed = run_job(prepare_job(cut_cfg, data_dir, [1], resume=True, job_name="cut"))

    def curve(record):
        hist = client.get_metric_history(record.stages["1"].run_id, "loss")
        return {m.step: m.value for m in hist}

    a, b = curve(full), curve(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    assert a[3] != a[1]  # the curve moves: equal values are not an artefact of a frozen model
    # the final models (EMA weights, restored across the interruption) agree too
    from safetensors.torch import load_file

    wa = load_file(next((Path(full.stages["1"].package_dir) / "loopy").glob("*.safetensors")))
    wb = load_file(next((Path(resumed.stages["1"].package_dir) / "loopy").glob("*.safetensors")))
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


class _KnownLandmarks:
    """A detector answering fixed pixel landmarks (the statistics, not detection, are under test)."""

    def __init__(self, pixels, found):
        self.pixels, self.found = pixels, found

    def detect(self, frames):
        assert frames.dtype == np.uint8 and frames.shape[0] == len(self.found)
        return self.pixels, self.found


def test_glo_exp_of_generated_vs_ground_truth():
    from pipelines.faces.motion_stats import clip_motion_stats
    from training.evaluation import motion_statistics

    rng = np.random.default_rng(0)
    gt = rng.uniform(0.3, 0.7, size=(12, 68, 2)).astype(np.float32)
    gen = (gt + rng.normal(0, 0.02, size=gt.shape)).astype(np.float32)
    frames = np.zeros((12, 64, 64, 3), np.uint8)
    stats = motion_statistics(frames, gt, _KnownLandmarks(gen * 64, np.ones(12, bool)))
    ref_gen, ref_gt = clip_motion_stats(gen), clip_motion_stats(gt)
    assert stats["glo_gen"] == pytest.approx(ref_gen.glo, rel=1e-4)
    assert stats["exp_gt"] == pytest.approx(ref_gt.exp, rel=1e-4)
    assert stats["glo_ratio"] == pytest.approx(ref_gen.glo / ref_gt.glo, rel=1e-4)
    assert stats["face_found_share"] == 1.0
    none = motion_statistics(frames, gt, _KnownLandmarks(np.full_like(gen, np.nan), np.zeros(12, bool)))
    assert np.isnan(none["glo_gen"]) and none["face_found_share"] == 0.0 and none["glo_gt"] == stats["glo_gt"]


def test_checkpoint_restores_weights_optimizer_scheduler_rng_and_position(tmp_path):
    import random

    from diffusers.optimization import get_scheduler

    from training.checkpointing import TrainState, load_checkpoint, save_checkpoint

    def make():
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(net.parameters(), lr=0.1)
        return net, opt, get_scheduler("constant_with_warmup", opt, num_warmup_steps=5)

    net, opt, sched = make()
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(2, 4)).square().sum().backward()
        opt.step()
        sched.step()
    state = TrainState(stage=2, step=3, epoch=1, batch_in_epoch=2, samples_seen=12)
    save_checkpoint(tmp_path, rank=0, state=state, model=net, optimizer=opt, lr_scheduler=sched)
    save_checkpoint(tmp_path, rank=1, state=state, model=net, optimizer=opt, lr_scheduler=sched)
    expect_draws = (torch.rand(3), np.random.rand(), random.random())
    net2, opt2, sched2 = make()
    torch.rand(5)  # move the RNGs on
    got = load_checkpoint(tmp_path, rank=0, model=net2, optimizer=opt2, lr_scheduler=sched2)
    assert got == state
    assert torch.equal(net.weight, net2.weight) and sched2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    draws = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(draws[0], expect_draws[0]) and draws[1:] == expect_draws[1:]
    assert (tmp_path / "rng_rank1.pt").is_file() and not (tmp_path / "loopy").exists()
