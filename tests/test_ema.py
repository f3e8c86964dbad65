"""EMA of the weights (``train.ema_decay``): its schedule, what the checkpoint, the resume, the
checkpoint evaluation and the package do with it, and the demo's decay rule.

Small models only (an ``nn.Linear`` or the tiny stage-1 LoopyModel); no Ray, no training job."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _linear(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    from diffusers.optimization import get_scheduler

    torch.manual_seed(seed)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    return net, opt, get_scheduler("constant", opt)


def _steps(net, opt, ema, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        net(torch.randn(8, 4)).square().sum().backward()
        opt.step()
        if ema is not None:
            ema.step(list(net.parameters()))


def _trained_checkpoint(folder, ema_decay=None, steps: int = 20):
    """A linear model trained ``steps`` steps (with an EMA of ``ema_decay`` unless None) and saved
    as a rank-0 checkpoint in ``folder``. Returns (net, ema or None)."""
    from diffusers.training_utils import EMAModel

    from training.checkpointing import TrainState, save_checkpoint

    net, opt, sched = _linear()
    ema = EMAModel(list(net.parameters()), decay=ema_decay) if ema_decay is not None else None
    _steps(net, opt, ema, steps)
    save_checkpoint(folder, rank=0, state=TrainState(stage=1, step=steps), model=net, optimizer=opt,
                    lr_scheduler=sched, ema=ema)
    return net, ema


def test_ema_warm_up_caps_the_decay_of_a_short_run():
    """diffusers' EMAModel (as training/loop.py builds it) uses decay min(d, (1 + t) / (10 + t)):
    in a 400-step run 0.9999 averages exactly like 0.99 (the warm-up is below both), and the
    shadow is the weights after step 1, not the initial weights."""
    from diffusers.training_utils import EMAModel

    net = torch.nn.Linear(2, 2)
    ema = EMAModel(list(net.parameters()), decay=0.9999)
    assert ema.get_decay(1) == 0.0  # first step: shadow = weights
    assert ema.get_decay(400) == pytest.approx(400 / 409)
    assert EMAModel(list(net.parameters()), decay=0.99).get_decay(400) == ema.get_decay(400)
    assert EMAModel(list(net.parameters()), decay=0.975).get_decay(400) == 0.975


def test_foreach_ema_update_equals_the_loop():
    from diffusers.training_utils import EMAModel

    net, opt, _ = _linear()
    loop = EMAModel(list(net.parameters()), decay=0.9)
    fused = EMAModel(list(net.parameters()), decay=0.9, foreach=True)
    for _ in range(5):
        _steps(net, opt, None, 1)
        loop.step(list(net.parameters()))
        fused.step(list(net.parameters()))
    assert all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(loop.shadow_params, fused.shadow_params))
    assert not torch.equal(loop.shadow_params[0], net.weight.detach())


def test_ema_follows_the_weights_and_is_smoother_than_them():
    """After 300 noisy steps the EMA differs from the initial weights by about what the raw
    weights moved, and from one step to the next it moves less than the raw weights."""
    from diffusers.training_utils import EMAModel

    net, opt, _ = _linear()
    init = net.weight.detach().clone()
    ema = EMAModel(list(net.parameters()), decay=0.975)
    _steps(net, opt, ema, 300)
    before_raw, before_ema = net.weight.detach().clone(), ema.shadow_params[0].clone()
    _steps(net, opt, ema, 1)
    raw_move = (net.weight - before_raw).norm()
    ema_move = (ema.shadow_params[0] - before_ema).norm()
    assert ema_move < 0.5 * raw_move
    travelled = (net.weight - init).norm()
    assert (ema.shadow_params[0] - init).norm() > 0.5 * travelled


@pytest.mark.parametrize("foreach", [False, True])  # training/loop.py builds it with foreach=True
def test_save_final_model_writes_ema_weights_and_keeps_the_raw_ones(tmp_path, tiny_weights, foreach):
    """The package's model (``loopy/``) holds the EMA weights; the training model keeps its
    raw weights afterwards (training goes on with them)."""
    from diffusers.training_utils import EMAModel

    from core.sections import ModelConfig, ReaderConfig
    from models.loopy import LoopyModel
    from training.checkpointing import save_final_model
    from training.step import trainable

    net = LoopyModel.from_sd15(tiny_weights[1].unet, ModelConfig(), ReaderConfig(), stage=1)
    ema = EMAModel(trainable(net), decay=0.5, foreach=foreach)
    with torch.no_grad():
        for p in trainable(net):
            p.add_(1.0)  # raw weights move away from the shadow (= the initial weights)
    raw = {n: p.detach().clone() for n, p in net.named_parameters()}
    save_final_model(tmp_path / "loopy", net, ema)
    saved = LoopyModel.from_pretrained(str(tmp_path / "loopy"))
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    for name, shadow in zip(names, ema.shadow_params):
        assert torch.equal(dict(saved.named_parameters())[name], shadow)
        assert torch.equal(dict(net.named_parameters())[name], raw[name])
    assert not torch.equal(dict(saved.named_parameters())[names[0]], raw[names[0]])


def test_resume_restores_ema_state_and_keeps_the_configured_decay(tmp_path, caplog):
    from diffusers.training_utils import EMAModel

    from training.checkpointing import load_checkpoint

    net, ema = _trained_checkpoint(tmp_path, ema_decay=0.9)
    net2, opt2, sched2 = _linear(seed=1)
    ema2 = EMAModel(list(net2.parameters()), decay=0.95)
    with caplog.at_level(logging.WARNING, logger="training.checkpointing"):
        load_checkpoint(tmp_path, rank=0, model=net2, optimizer=opt2, lr_scheduler=sched2, ema=ema2)
    assert all(torch.equal(a, b) for a, b in zip(ema2.shadow_params, ema.shadow_params))
    assert ema2.optimization_step == 20  # the warm-up continues, it does not restart
    assert ema2.decay == 0.95 and "0.95" in caplog.text


def test_resume_without_ema_file_starts_the_ema_at_the_restored_weights(tmp_path):
    """A checkpoint of a run without EMA, resumed with EMA on: the average starts at the
    checkpoint's weights, not at the weights the model was built with."""
    from diffusers.training_utils import EMAModel

    from training.checkpointing import load_checkpoint

    net, _ = _trained_checkpoint(tmp_path)
    net2, opt2, sched2 = _linear(seed=1)
    ema2 = EMAModel(list(net2.parameters()), decay=0.9)  # built before the checkpoint is loaded
    load_checkpoint(tmp_path, rank=0, model=net2, optimizer=opt2, lr_scheduler=sched2, ema=ema2)
    assert torch.equal(ema2.shadow_params[0], net.weight.detach())
    assert ema2.optimization_step == 0
    net2.weight.data.add_(1.0)  # the shadow is a copy, not the parameter itself
    assert torch.equal(ema2.shadow_params[0], net.weight.detach())


def test_load_weights_swaps_in_ema_and_rejects_an_ema_of_another_model(tmp_path):
    from training.checkpointing import load_weights
    from training.errors import CheckpointError

    net, ema = _trained_checkpoint(tmp_path, ema_decay=0.9)
    fresh, _, _ = _linear(seed=2)
    load_weights(tmp_path, fresh, use_ema=True)
    assert torch.equal(fresh.weight, ema.shadow_params[0]) and not torch.equal(fresh.weight, net.weight)
    load_weights(tmp_path, fresh, use_ema=False)
    assert torch.equal(fresh.weight, net.weight)
    fresh.bias.requires_grad_(False)  # one trainable tensor fewer than the EMA tracks
    with pytest.raises(CheckpointError, match="EMA weights do not match"):
        load_weights(tmp_path, fresh, use_ema=True)


def test_stage2_starts_from_the_stage1_package_ema_weights(tmp_path, tiny_weights):
    """training/loop.py builds stage 2 from stage 1's package, whose model is the EMA one."""
    from diffusers.training_utils import EMAModel

    from core.config import load_platform_config
    from core.sections import ModelConfig, ReaderConfig
    from models.loopy import LoopyModel
    from models.registry import write_model_package
    from training.checkpointing import save_final_model
    from training.loop import StageJob, build_model
    from training.step import trainable

    weights_cfg, paths = tiny_weights
    cfg = load_platform_config(None, ["weights.preset=tiny", f"weights.tiny_dir={weights_cfg.tiny_dir}"])
    stage1 = LoopyModel.from_sd15(paths.unet, ModelConfig(), ReaderConfig(), stage=1)
    ema = EMAModel(trainable(stage1), decay=0.5)
    with torch.no_grad():
        for p in trainable(stage1):
            p.add_(0.5)
    save_final_model(tmp_path / "final", stage1, ema)
    package = write_model_package(tmp_path / "package", tmp_path / "final", cfg, paths)
    job = StageJob(cfg=cfg, stage=2, data_dir="", steps_per_epoch=1, init_from=str(package),
                   work_dir=str(tmp_path / "work"))
    (tmp_path / "work").mkdir()
    stage2 = dict(build_model(job, torch.device("cpu")).named_parameters())
    names = [n for n, p in stage1.named_parameters() if p.requires_grad]
    for name, shadow in list(zip(names, ema.shadow_params))[:20]:
        assert torch.equal(stage2[name], shadow), name
        assert not torch.equal(stage2[name], dict(stage1.named_parameters())[name])


def test_demo_ema_decay_follows_the_run_length():
    """The demo's rule: the EMA window is a tenth of a stage's steps (not tuned on a video)."""
    from demo import DemoPaths, DemoSettings, step_commands

    assert DemoSettings(train_steps=400).ema_decay == pytest.approx(0.975)
    assert DemoSettings(train_steps=1000).ema_decay == pytest.approx(0.99)
    assert DemoSettings(train_steps=10).ema_decay is None  # nothing to average in a test's few steps
    train = step_commands(DemoPaths(Path("/nonexistent/demo_work")), DemoSettings(train_steps=400))["train"]
    assert "train.ema_decay=0.975" in train
    assert not any(a.startswith("train.ema_decay") for a in
                   step_commands(DemoPaths(Path("/nonexistent/demo_work")), DemoSettings(train_steps=3))["train"])
