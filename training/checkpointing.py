"""Training checkpoints: what a resumed run needs to continue exactly where it stopped.

One checkpoint is a folder that every DDP rank writes into (Ray Train merges the ranks' folders
into one checkpoint directory)::

    state.json        TrainState: stage, step (optimizer steps done), data position, samples seen
    model.pt          the unwrapped model's state_dict                          (rank 0)
    optimizer.pt      AdamW state                                               (rank 0)
    lr_scheduler.pt   LR scheduler state                                        (rank 0)
    ema.pt            EMA shadow weights (when EMA is on)                       (rank 0)
    rng_rank<r>.pt    python / numpy / torch (CPU, CUDA) RNG states of rank r   (every rank)
    model_config.json the model's config (``LoopyModel.from_config``: the checkpoint evaluation
                      task rebuilds the network from it)                        (rank 0)
    loopy/            ``LoopyModel.save_pretrained`` (final checkpoint of a stage only; EMA
                      weights when EMA is on): the model that goes into the package

Data position: ``epoch`` and ``batch_in_epoch`` (batches this rank consumed in that epoch), so
the resumed run skips exactly the batches already trained on.

Every ``.pt`` file holds tensors and plain Python types only, and is read back with
``torch.load(weights_only=True)`` (checkpoints live on shared volumes: loading one must not run
pickled code). RNG states are stored as tensors / lists for that reason.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from training.errors import CheckpointError
from training.step import trainable

log = logging.getLogger(__name__)
STATE_FILE = "state.json"
MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
LR_SCHEDULER_FILE = "lr_scheduler.pt"
EMA_FILE = "ema.pt"
MODEL_CONFIG_FILE = "model_config.json"
FINAL_MODEL_DIR = "loopy"


@dataclass
class TrainState:
    """Where a stage is: ``step`` optimizer steps done; the next batch is batch
    ``batch_in_epoch`` of epoch ``epoch`` (per rank)."""

    stage: int
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples_seen: int = 0  # clips, all ranks together


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states of this process (python, numpy, torch CPU and every CUDA device), as
    tensors and plain types (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def save_checkpoint(folder: str | Path, *, rank: int, state: TrainState, model: torch.nn.Module,
                    optimizer, lr_scheduler, ema=None, final: bool = False) -> Path:
    """Write this rank's part of a checkpoint into ``folder`` (see the module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(capture_rng_state(), folder / rng_file(rank))
    if rank != 0:
        return folder
    net = unwrap(model)
    torch.save(net.state_dict(), folder / MODEL_FILE)
    torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    torch.save(lr_scheduler.state_dict(), folder / LR_SCHEDULER_FILE)
    if ema is not None:
        torch.save(ema.state_dict(), folder / EMA_FILE)
    if hasattr(net, "to_json_string"):  # a diffusers ConfigMixin model (LoopyModel)
        (folder / MODEL_CONFIG_FILE).write_text(net.to_json_string())
    if final:
        save_final_model(folder / FINAL_MODEL_DIR, net, ema)
    (folder / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    return folder


def save_final_model(folder: Path, net: torch.nn.Module, ema=None) -> None:
    """``net.save_pretrained(folder)``, with the EMA weights swapped in when EMA is on."""
    if ema is not None:
        ema.store(trainable(net))
        ema.copy_to(trainable(net))
    try:
        net.save_pretrained(str(folder))
    finally:
        if ema is not None:
            ema.restore(trainable(net))


def read_state(folder: str | Path) -> TrainState:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a training checkpoint: {STATE_FILE} is missing")
    return TrainState(**json.loads(path.read_text()))


def load_checkpoint(folder: str | Path, *, rank: int, model: torch.nn.Module, optimizer, lr_scheduler,
                    ema=None, map_location: Optional[torch.device] = None) -> TrainState:
    """Restore model, optimizer, scheduler, EMA and this rank's RNG states; return the state.
    A checkpoint saved by a run with another number of workers restores the model and
    optimizer; ranks without an RNG file keep their seeded state."""
    folder = Path(folder)
    state = read_state(folder)
    loc = map_location or "cpu"
    unwrap(model).load_state_dict(torch.load(folder / MODEL_FILE, map_location=loc, weights_only=True))
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location=loc, weights_only=True))
    lr_scheduler.load_state_dict(torch.load(folder / LR_SCHEDULER_FILE, map_location=loc, weights_only=True))
    if ema is not None:
        restore_ema(folder, ema, unwrap(model), loc)
    rng = folder / rng_file(rank)
    if rng.is_file():
        restore_rng_state(torch.load(rng, weights_only=True))
    return state


def restore_ema(folder: Path, ema, net: torch.nn.Module, map_location: Any = "cpu") -> None:
    """Resume ``ema`` (a diffusers ``EMAModel`` of ``trainable(net)``; ``net`` already holds the
    checkpoint's weights).

    * ``ema.pt`` present: its shadow weights and step count (so the warm-up continues where it
      was). The configured decay is kept: diffusers' ``load_state_dict`` would silently replace
      it with the checkpoint's, and a resume with another ``train.ema_decay`` means that one.
    * no ``ema.pt`` (the run that wrote it had no EMA): the average starts afresh at the restored
      weights. Without this the shadow would stay the weights the model was built with before the
      checkpoint was loaded (stage 1: the initial U-Net), and the package would get them.
    """
    params = trainable(net)
    path = folder / EMA_FILE
    if not path.is_file():
        log.warning("%s has no %s: the EMA starts at the checkpoint's weights", folder, EMA_FILE)
        ema.shadow_params = [p.detach().clone() for p in params]
        ema.optimization_step = 0
        return
    decay = ema.decay
    ema.load_state_dict(torch.load(path, map_location=map_location, weights_only=True))
    check_ema_fits(ema, params, path)
    if ema.decay != decay:
        log.warning("%s: EMA decay %s in the checkpoint, %s configured: using %s", path, ema.decay, decay, decay)
        ema.decay = decay


def check_ema_fits(ema, params: list[torch.nn.Parameter], source: Path) -> None:
    """Raise :class:`CheckpointError` unless ``ema``'s shadow weights match ``params`` one to one
    (``EMAModel.copy_to`` zips them: a shorter list would copy a prefix and leave the rest raw)."""
    shadow = ema.shadow_params
    if len(shadow) != len(params) or any(s.shape != p.shape for s, p in zip(shadow, params)):
        raise CheckpointError(f"{source}: {len(shadow)} EMA weights do not match the model's "
                              f"{len(params)} trainable parameters (another model or stage?)")


def load_weights(folder: str | Path, net: torch.nn.Module, use_ema: bool = True) -> TrainState:
    """Load a checkpoint's model weights into ``net`` (EMA weights swapped in when the checkpoint
    has them and ``use_ema``); weights only, no optimizer. Returns the checkpoint's state."""
    folder = Path(folder)
    state = read_state(folder)
    net.load_state_dict(torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True))
    if use_ema and (folder / EMA_FILE).is_file():
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trainable(net))
        ema.load_state_dict(torch.load(folder / EMA_FILE, map_location="cpu", weights_only=True))
        check_ema_fits(ema, trainable(net), folder / EMA_FILE)
        ema.copy_to(trainable(net))
    return state
