"""Ray's temp dir: Unix socket paths under it must fit in an AF_UNIX address (107 bytes on Linux)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from core.ray_runtime import (
    RAY_SOCKET_SUFFIX,
    SOCKET_PATH_MAX,
    RayTempDirError,
    socket_safe_temp_dir,
)

# The longest socket a Ray 2.5x node makes under its temp dir (a 7-digit pid), as in the CI failure
# "Module MetricsHead failed to start" with a 43-byte temp dir.
LONGEST = "/session_2026-12-01_14-54-03_744704_4194304/sockets/dash_TaskEventsHead"


def test_suffix_covers_rays_longest_socket():
    assert RAY_SOCKET_SUFFIX >= len(LONGEST)


def test_short_path_is_used_as_is(tmp_path):
    short = Path("/tmp") / f"lp{os.getpid()}"
    try:
        assert socket_safe_temp_dir(short) == short and short.is_dir()
    finally:
        short.rmdir()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the alias lives in /tmp (Linux)")
def test_deep_path_gets_a_short_alias_to_the_same_folder(tmp_path):
    deep = tmp_path / ("d" * 60) / "ray_tmp"
    assert len(str(deep)) + len(LONGEST) > SOCKET_PATH_MAX  # the path alone would break Ray
    alias = socket_safe_temp_dir(deep)
    try:
        assert alias != deep and alias.is_symlink() and alias.resolve() == deep.resolve()
        assert len(str(alias)) + len(LONGEST) <= SOCKET_PATH_MAX
        (alias / "probe").write_text("x")  # files land in the real folder
        assert (deep / "probe").read_text() == "x"
        assert socket_safe_temp_dir(deep) == alias  # the same alias again, not a new one each start
        reserve = len("/node2_99")  # sub-folders the caller adds (the multi-node test's node dirs)
        assert len(str(socket_safe_temp_dir(deep, reserve=reserve))) + reserve + len(LONGEST) <= SOCKET_PATH_MAX
        with pytest.raises(RayTempDirError, match="no room"):
            socket_safe_temp_dir(deep, reserve=60)
    finally:
        alias.unlink(missing_ok=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the alias lives in /tmp (Linux)")
def test_alias_taken_by_another_folder_is_repointed(tmp_path):
    deep = tmp_path / ("e" * 70)
    alias = socket_safe_temp_dir(deep)
    try:
        alias.unlink()
        other = tmp_path / "other"
        other.mkdir()
        alias.symlink_to(other)  # a stale alias (say a deleted checkout's) at the same name
        assert socket_safe_temp_dir(deep).resolve() == deep.resolve()
    finally:
        alias.unlink(missing_ok=True)


LIST_SOCKETS = """
import json, socket, time
import psutil
from core.ray_runtime import init_ray
from core.sections import RayConfig
import ray

init_ray(RayConfig(num_cpus=1, object_store_memory_mb=100))
ray.get(ray.remote(lambda: 1).remote())  # a worker process too
time.sleep(2.0)  # the agents and metrics endpoints open their ports a moment after init
me = psutil.Process()
out = []
for proc in [me, *me.children(recursive=True)]:
    try:
        for c in proc.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr):
                out.append([proc.name(), c.laddr.ip, c.laddr.port])
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        pass
node_ip = ray.util.get_node_ip_address()
ray.shutdown()
print(json.dumps({"sockets": out, "node_ip": node_ip}))
"""


def test_embedded_ray_listens_on_loopback_only(tmp_path):
    """The Ray that make demo, ingest, training and the service start (init_ray, address local):
    a 127.0.0.1 node whose every listening socket (GCS, raylet, workers, dashboard and runtime-env
    agents, metrics endpoints) is on loopback. Run in a fresh interpreter: its own process tree."""
    import ipaddress
    import json
    import subprocess

    env = {**os.environ, "RAY_TMPDIR": str(socket_safe_temp_dir(tmp_path / "ray"))}
    out = subprocess.run([sys.executable, "-c", LIST_SOCKETS], capture_output=True, text=True, timeout=240,
                         cwd=Path(__file__).resolve().parent.parent, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["node_ip"] == "127.0.0.1"

    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip.split("%")[0])
        return (addr.ipv4_mapped or addr).is_loopback if addr.version == 6 else addr.is_loopback

    names = {name for name, _, _ in result["sockets"]}
    assert {"gcs_server", "raylet"} <= names, result["sockets"]
    exposed = [s for s in result["sockets"] if not loopback(s[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_bounded_state_read_returns_raises_and_gives_up_on_a_hung_call():
    import threading

    from core.ray_runtime import RayStateTimeout, bounded_state_read

    assert bounded_state_read(lambda: {"CPU": 2.0}, "cpus") == {"CPU": 2.0}
    with pytest.raises(KeyError):
        bounded_state_read(lambda: {}["CPU"], "cpus")
    release = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(RayStateTimeout, match="the cluster's nodes within 0.3 s"):
        bounded_state_read(lambda: release.wait(60), "the cluster's nodes", timeout_s=0.3)
    assert time.monotonic() - t0 < 10
    release.set()


def test_screen_window_falls_back_to_the_pool_size_when_ray_state_hangs(monkeypatch):
    import threading

    import ray

    from core.sections import IngestConfig
    from pipelines.ingestion import job

    ing = IngestConfig(num_detect_actors=3, stage_num_cpus=1.0)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    assert job.screen_window(ing) == 8
    release = threading.Event()
    monkeypatch.setattr(ray, "cluster_resources", lambda: release.wait(60))
    real = job.bounded_state_read
    monkeypatch.setattr(job, "bounded_state_read", lambda read, what: real(read, what, timeout_s=0.2))
    with pytest.warns(RuntimeWarning, match="did not answer the cluster's CPUs.*3 videos at once"):
        assert job.screen_window(ing) == 3
    release.set()
