"""Bad input never crashes the ingest job: every file ends as exactly one manifest row, rejected
ones with a reason naming the stage and the file; wrong --input / --output fail fast (issue 2)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent

# the stage each bad input must be rejected at
EXPECTED_STAGE = {
    "empty": {"probe"},
    "not_video": {"probe"},
    "truncated": {"probe", "decode"},
    "no_audio": {"probe"},
    "no_face": {"face"},
    "too_short": {"filter"},
}


@pytest.fixture(scope="session")
def bad_run(ray_local, tiny_weights, tmp_path_factory):
    """The shared ingest of good and bad inputs (see ``test_ingest.shared_ingest_run``; pytest puts
    this folder on the import path, the tests having no package)."""
    from test_ingest import shared_ingest_run

    run = shared_ingest_run(tmp_path_factory, tiny_weights)
    rows = {Path(r["source"]).resolve(): r for r in pq.read_table(run["out"] / "videos.parquet").to_pylist()}
    return run["bad"], run["good"], rows, run["summary"], run["messages"]


@pytest.mark.slow
def test_one_manifest_row_per_input_file(bad_run):
    bad, good, rows, summary, _ = bad_run
    inputs = {p.resolve() for p in [*bad.values(), *good]}
    assert set(rows) == inputs
    assert summary.inputs == len(inputs)
    assert summary.ok + summary.rejected == len(inputs)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(EXPECTED_STAGE))
def test_bad_input_rejected_with_stage_and_file(bad_run, case):
    from pipelines.dataset.schema import frames_path

    bad, _, rows, summary, _ = bad_run
    path = bad[case].resolve()
    r = rows[path]
    assert r["status"] == "rejected", (case, r)
    assert r["stage"] in EXPECTED_STAGE[case], (case, r["stage"], r["reason"])
    assert r["reason"].startswith(f"{r['stage']}: ")
    assert path.name in r["reason"]  # the message names the file
    assert r["frames_file"] is None and r["num_frames"] == 0
    assert not frames_path(Path(summary.output_dir), r["video_id"]).exists()


@pytest.mark.slow
def test_specific_reasons(bad_run):
    bad, _, rows, _, _ = bad_run
    reason = {k: rows[p.resolve()]["reason"] for k, p in bad.items()}
    assert "no audio" in reason["no_audio"]
    assert "empty" in reason["empty"] or "0 bytes" in reason["empty"]
    assert "face" in reason["no_face"]
    assert "too short" in reason["too_short"]


@pytest.mark.slow
def test_good_file_ingested_beside_bad_ones(bad_run):
    from pipelines.dataset.schema import FrameStore

    _, good, rows, summary, messages = bad_run
    for path in good:
        r = rows[path.resolve()]
        assert r["status"] == "ok", r["reason"]
        assert FrameStore(Path(summary.output_dir)).num_frames(r["video_id"]) == r["num_frames"] > 0
    assert any("rejected" in m for m in messages)  # progress reports rejections


def _run_cli(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "ingest.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=cwd)
    return proc, time.perf_counter() - t0


def test_wrong_input_path_is_one_line_error(tmp_path):
    proc, _ = _run_cli("--input", str(tmp_path / "nope"), "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--input" in lines[0] and "nope" in lines[0]
    assert "Ray" not in proc.stdout + proc.stderr  # failed before Ray started
    assert not (tmp_path / "out" / "videos.parquet").exists()


def test_unwritable_output_is_one_line_error(tmp_path):
    video = tmp_path / "a.mp4"
    video.write_bytes(b"x")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    proc, _ = _run_cli("--input", str(video), "--output", str(blocker / "out"), cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--output" in lines[0] and "not writable" in lines[0]
    assert "Ray" not in proc.stdout + proc.stderr


def test_bad_override_is_one_line_error(tmp_path):
    video = tmp_path / "a.mp4"
    video.write_bytes(b"x")
    proc, _ = _run_cli("--input", str(video), "--output", str(tmp_path / "o"), "ingest.no_such_key=1", cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "ingest.no_such_key" in lines[0], proc.stderr



def test_output_of_another_format_is_refused(tmp_path):
    """Resuming into a directory ingested with another crop size would mix two formats."""
    from pipelines.dataset.schema import IngestMeta

    out = tmp_path / "o"
    out.mkdir()
    IngestMeta(1, 25.0, 512, [4, 64, 64], [12, 768], 16000, {"preset": "sd15"}, 0.18215).write(out)
    video = tmp_path / "a.mp4"
    video.write_bytes(b"x")
    proc, _ = _run_cli("--input", str(video), "--output", str(out), cwd=tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "new output directory" in lines[0], proc.stderr
