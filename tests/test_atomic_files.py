"""core.atomic_files: the target holds the old content or the new, never a torn file, and no
temp file is left behind on success or failure."""
from __future__ import annotations

import json

import pytest

from core.atomic_files import atomic_path, write_json_atomic, write_text_atomic


def test_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "job.json"
    write_text_atomic(target, "old")
    write_json_atomic(target, {"step": 3}, indent=2)
    assert json.loads(target.read_text()) == {"step": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"]


def test_failure_mid_write_keeps_the_old_content(tmp_path):
    target = tmp_path / "videos.parquet"
    write_text_atomic(target, "complete old manifest")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "complete old manifest"
    assert [p.name for p in tmp_path.iterdir()] == ["videos.parquet"]


def test_unserialisable_json_touches_nothing(tmp_path):
    target = tmp_path / "record.json"
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert not target.exists() and not list(tmp_path.iterdir())


def test_temp_names_differ_between_threads(tmp_path):
    import threading

    names = []
    together = threading.Barrier(2)  # both writers inside at once (a finished thread's id may be reused)

    def grab():
        with atomic_path(tmp_path / "x") as tmp:
            names.append(tmp.name)
            tmp.write_text("x")
            together.wait(timeout=10)

    threads = [threading.Thread(target=grab) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 2


def test_not_durable_still_replaces_whole_and_cleans_up(tmp_path):
    target = tmp_path / "0.parquet"
    with atomic_path(target, durable=False) as tmp:
        tmp.write_text("part")
    assert target.read_text() == "part" and [p.name for p in tmp_path.iterdir()] == ["0.parquet"]
    with pytest.raises(OSError):
        with atomic_path(target, durable=False) as tmp:
            raise OSError("killed mid-write")
    assert target.read_text() == "part" and [p.name for p in tmp_path.iterdir()] == ["0.parquet"]
