"""core.atomic_files: the target holds the old content or the new, never a torn file, and no
temp file is left behind on success or failure."""
from __future__ import annotations

import json

import pytest

from core.atomic_files import (
    AtomicFile,
    atomic_path,
    write_json_atomic,
    write_text_atomic,
)


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


def test_an_open_writer_is_committed_whole_or_discarded(tmp_path):
    """AtomicFile: a writer kept open across calls (a streaming Parquet writer) writes to its
    temp file; the target changes only on commit, whole; discard (or an error inside ``with``)
    leaves the old content and no temp file."""
    target = tmp_path / "frames.parquet"
    write_text_atomic(target, "old")
    pending = AtomicFile(target)
    with open(pending.tmp, "w") as f:
        f.write("chunk 1, ")
        assert target.read_text() == "old"  # nothing visible while writing
        f.write("chunk 2")
    assert pending.commit() == target and target.read_text() == "chunk 1, chunk 2"
    assert [p.name for p in tmp_path.iterdir()] == ["frames.parquet"]
    with pytest.raises(RuntimeError, match="already committed"):
        pending.commit()
    dropped = AtomicFile(target)
    dropped.tmp.write_text("half")
    dropped.discard()
    dropped.discard()  # a second discard is a no-op
    assert target.read_text() == "chunk 1, chunk 2" and [p.name for p in tmp_path.iterdir()] == ["frames.parquet"]
    with pytest.raises(OSError, match="volume gone"):
        with AtomicFile(target) as failing:
            failing.tmp.write_text("x")
            raise OSError("volume gone")
    assert target.read_text() == "chunk 1, chunk 2" and [p.name for p in tmp_path.iterdir()] == ["frames.parquet"]
    with AtomicFile(target, durable=False) as fine:
        fine.tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["frames.parquet"]


def test_temp_files_of_finds_a_writers_temp_and_only_its_own(tmp_path):
    """What a rerun deletes for a redone video: the temp a writer of that file leaves, never
    another file's (glob characters in a name are literal)."""
    from core.atomic_files import temp_files_of

    target = tmp_path / "vid[1].parquet"
    other = tmp_path / "vid1.parquet"
    with atomic_path(target) as tmp, atomic_path(other) as other_tmp:
        tmp.write_text("partial")
        other_tmp.write_text("partial")
        assert temp_files_of(target) == [tmp] and temp_files_of(other) == [other_tmp]
    assert temp_files_of(target) == [] and target.read_text() == "partial"
