"""Starting or joining Ray with the same code on a laptop and on a cluster."""
from __future__ import annotations

import os
from pathlib import Path

from core.paths import PROJECT_ROOT
from core.sections import RayConfig


def init_ray(cfg: RayConfig) -> None:
    """Join a cluster (``RAY_ADDRESS`` set by ``ray job submit``, or ``cfg.address`` not ``local``),
    else start an embedded Ray on 127.0.0.1 with its temp dir inside the work tree.
    Idempotent: does nothing when Ray is already up in this process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS") or (None if cfg.address == "local" else cfg.address)
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    tmp = Path(os.environ.get("RAY_TMPDIR") or PROJECT_ROOT / ".ray_tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["RAY_TMPDIR"] = str(tmp)
    kwargs = dict(
        num_cpus=cfg.num_cpus,
        include_dashboard=cfg.include_dashboard,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(tmp),
    )
    if cfg.num_gpus is not None:
        kwargs["num_gpus"] = cfg.num_gpus
    if cfg.object_store_memory_mb:
        kwargs["object_store_memory"] = cfg.object_store_memory_mb * 1024 * 1024
    ray.init(**kwargs)
