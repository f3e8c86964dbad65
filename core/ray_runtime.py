"""Starting or joining Ray with the same code on a laptop and on a cluster."""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

from core.paths import PROJECT_ROOT
from core.sections import RayConfig

# Ray keeps Unix sockets under a node's temp dir; the longest on Ray 2.5x is
# <temp>/session_<date>_<time>_<usec>_<pid>/sockets/dash_TaskEventsHead, 71 bytes after <temp> with a
# 7-digit pid, and Linux caps an AF_UNIX path at 107 bytes. A dashboard module whose socket path is
# longer dies at start ("Module MetricsHead failed to start"), so a deep checkout needs a short alias.
SOCKET_PATH_MAX = 107
RAY_SOCKET_SUFFIX = 74  # the 71 bytes above, plus room for a longer module name


class RayTempDirError(RuntimeError):
    """No short alias could be made for a temp dir whose Ray socket paths would be too long."""


def socket_safe_temp_dir(path: Path, reserve: int = 0) -> Path:
    """``path`` itself when Ray's socket paths under it (plus ``reserve`` bytes of sub-folders the
    caller adds) fit in an AF_UNIX address; otherwise a short symlink to it in /tmp, named after a
    hash of ``path`` (the files stay in ``path``; the same path always gets the same alias)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if len(os.fsencode(str(path))) + reserve + RAY_SOCKET_SUFFIX <= SOCKET_PATH_MAX:
        return path
    real = path.resolve()
    digest = hashlib.sha1(os.fsencode(str(real))).hexdigest()[:8]
    link = Path("/tmp") / f"lr{os.getuid()}-{digest}"
    if len(os.fsencode(str(link))) + reserve + RAY_SOCKET_SUFFIX > SOCKET_PATH_MAX:
        raise RayTempDirError(f"Ray temp dir {path}: {reserve} bytes of sub-folders leave no room for Ray's "
                              f"socket paths even under {link}")
    if link.is_symlink() and link.resolve() == real:
        return link
    staged = link.with_name(f"{link.name}.{os.getpid()}")
    try:
        staged.unlink(missing_ok=True)
        staged.symlink_to(real, target_is_directory=True)
        os.replace(staged, link)  # atomic: a concurrent start sees the old link or the new one
    except OSError as err:
        raise RayTempDirError(f"Ray temp dir {path}: its socket paths would exceed {SOCKET_PATH_MAX} bytes "
                              f"and no alias could be made at {link} ({err}); set RAY_TMPDIR to a "
                              f"shorter folder") from err
    if link.resolve() != real:
        raise RayTempDirError(f"Ray temp dir alias {link} points elsewhere; set RAY_TMPDIR to a shorter folder")
    return link


def init_ray(cfg: RayConfig) -> None:
    """Join a cluster (``RAY_ADDRESS`` set by ``ray job submit``, or ``cfg.address`` not ``local``),
    else start an embedded Ray as a 127.0.0.1 node (every port it opens listens on loopback only,
    :func:`loopback_node`; the one exception, Serve's replica gRPC port, is in docs/SERVICE.md)
    with its temp dir inside the work tree.
    Idempotent: does nothing when Ray is already up in this process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS") or (None if cfg.address == "local" else cfg.address)
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    tmp = socket_safe_temp_dir(Path(os.environ.get("RAY_TMPDIR") or PROJECT_ROOT / ".ray_tmp"))
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
    with loopback_node():
        ray.init(**kwargs)


@contextmanager
def loopback_node():
    """While inside, ``ray.init(_node_ip_address="127.0.0.1")`` starts a 127.0.0.1 node.

    Ray 2.5x/2.6x replaces a loopback ``_node_ip_address`` by the host's routable address
    (``services.resolve_ip_for_localhost``) unless ``ray_constants.ENABLE_RAY_CLUSTER`` is false
    (the setting behind ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``), and its servers bind to the node
    address: GCS, raylet, core-worker gRPC, dashboard agent, runtime-env agent and the metrics
    endpoints then listen on every interface. Ray reads the constant at call time, so it is set
    around the one ``ray.init`` and restored after (an env variable would be inherited by a
    ``ray start`` this process launches, which then refuses to form a cluster). Processes started
    by the node get ``--node-ip-address=127.0.0.1`` and need nothing else."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


# Ray's cluster-state reads (``ray.cluster_resources()``, ``ray.nodes()``) are blocking C++ calls on
# the driver's own GCS state channel, with no timeout argument. In CI one hung for 900 s (the channel
# had been sent a gRPC GOAWAY "too_many_pings") while the cluster itself went on running tasks, so
# a job must not wait on one forever: the read runs in a daemon thread (a ThreadPoolExecutor's threads
# are joined at interpreter exit, a hung one would hold the process) and is given up after this long.
STATE_READ_TIMEOUT_S = 60.0


class RayStateTimeout(RuntimeError):
    """Ray's state API did not answer in time (an infrastructure fault, not the data's)."""


def bounded_state_read(read, what: str, timeout_s: float = STATE_READ_TIMEOUT_S):
    """``read()`` (a Ray state call such as ``ray.nodes``) within ``timeout_s`` seconds; raises
    :class:`RayStateTimeout` naming ``what`` when it does not return in time (the thread it ran in is
    left behind, a daemon). An exception raised by ``read`` is raised here."""
    import threading

    box: dict = {}

    def run() -> None:
        try:
            box["value"] = read()
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            box["error"] = err

    thread = threading.Thread(target=run, name=f"ray-state-read:{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise RayStateTimeout(f"Ray's state API did not answer {what} within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]
