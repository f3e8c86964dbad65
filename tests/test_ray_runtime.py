"""Ray's temp dir: Unix socket paths under it must fit in an AF_UNIX address (107 bytes on Linux)."""
from __future__ import annotations

import os
import sys
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
