"""End-to-end ingest job through Ray Data with the tiny preset (issue 2).

One session-scoped run ingests a handful of generated talking-head videos (25, 30, 29.97 fps,
a rotated portrait and a variable-frame-rate file, 6 s each); the tests check the manifest, the
frame files (through FrameStore), the split, the 25 fps frame counts and resume.
"""
from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from core.config import PlatformConfig
from core.sections import IngestConfig

ROOT = Path(__file__).resolve().parent.parent
SECONDS = 6.0
GOOD_SPECS = ("talk_25fps_16k", "talk_30fps_22k", "talk_29.97fps_44k", "talk_30fps_16k_rot90", "talk_vfr_44k")


def ingest_config(weights_cfg, **ingest) -> PlatformConfig:
    cfg = PlatformConfig()
    cfg.weights = weights_cfg
    cfg.ingest = IngestConfig(**ingest)
    return cfg


def shared_ingest_run(tmp_path_factory, tiny_weights) -> dict:
    """One ingest of good and bad inputs for this file and ``test_ingest_bad_input.py``.

    Inputs: ``person_a/`` and ``person_b/`` (talking heads at 25, 30, 29.97 fps, a rotated
    portrait, VFR; 6 s each) and ``bad/`` (every bad-input case). Cached on disk under the session's
    base temp dir: a second caller finds the finished output and re-runs the job, which then only
    resumes (nothing left to do, no Ray work).
    """
    from pipelines.ingest import run_ingest
    from pipelines.samples.talking_heads import (
        SAMPLE_SPECS,
        generate_samples,
        make_bad_inputs,
    )

    base = tmp_path_factory.getbasetemp()
    inputs, out = base / "ingest_shared_inputs", base / "ingest_shared_out"
    specs = [s for s in SAMPLE_SPECS if s.name in GOOD_SPECS]
    assert len(specs) == len(GOOD_SPECS)
    marker = inputs / "READY"
    if not marker.is_file():
        shutil.rmtree(inputs, ignore_errors=True)
        generate_samples(inputs / "person_a", seconds=SECONDS, seed=0, specs=specs[:3])
        generate_samples(inputs / "person_b", seconds=SECONDS, seed=1, specs=specs[3:])
        make_bad_inputs(inputs / "bad", seconds=SECONDS)
        marker.write_text("ok")
    good = sorted((inputs / "person_a").glob("*.mp4")) + sorted((inputs / "person_b").glob("*.mp4"))
    bad = {k: inputs / "bad" / f"bad_{k}.mp4" for k in ("empty", "not_video", "truncated", "no_audio",
                                                           "no_face", "too_short")}
    cfg = ingest_config(tiny_weights[0], split_key="folder", test_fraction=0.5)
    messages: list[str] = []
    summary = run_ingest(inputs, out, cfg, echo=messages.append)
    return {"inputs": inputs, "out": out, "good": good, "bad": bad, "cfg": cfg, "summary": summary,
            "messages": messages}


@pytest.fixture(scope="session")
def shared_run(ray_local, tiny_weights, tmp_path_factory) -> dict:
    return shared_ingest_run(tmp_path_factory, tiny_weights)


@pytest.fixture(scope="session")
def good_videos(shared_run) -> list[Path]:
    return shared_run["good"]


@pytest.fixture(scope="session")
def ingested(shared_run):
    return shared_run["out"], shared_run["summary"], shared_run["cfg"]


def _manifest(out: Path):
    return pq.read_table(out / "videos.parquet").to_pylist()


def _expected_frames(path: Path, fps: float = 25.0) -> int:
    """floor(duration * 25) of the video, limited to the frames the audio covers."""
    from pipelines.media.audio_decode import decode_audio
    from pipelines.media.probe import probe_video

    video = math.floor(probe_video(path).duration_s * fps + 1e-6)
    audio = math.floor(decode_audio(path).duration_s * fps + 1e-6)
    return min(video, audio)


@pytest.mark.slow
def test_every_good_video_is_ingested_with_25fps_frame_count(ingested, good_videos):
    out, summary, _ = ingested
    rows = {Path(r["source"]).name: r for r in _manifest(out)}
    for path in good_videos:
        r = rows[path.name]
        assert r["status"] == "ok", (path.name, r["reason"])
        assert r["reason"] is None and r["stage"] is None
        expected = _expected_frames(path)
        assert r["num_frames"] == expected, (path.name, r["num_frames"], expected)
        # not the source frame count: 30 / 60 fps and VFR inputs are resampled by timestamp
        assert abs(r["num_frames"] - SECONDS * 25) <= 2, path.name
        assert (out / r["frames_file"]).is_file()
    assert summary.ok == len(good_videos)


@pytest.mark.slow
def test_fps_in_and_rotation_recorded(ingested):
    out, _, _ = ingested
    rows = {Path(r["source"]).stem: r for r in _manifest(out)}
    assert rows["talk_30fps_22k"]["fps_in"] == pytest.approx(30.0, rel=0.01)
    assert rows["talk_29.97fps_44k"]["fps_in"] == pytest.approx(29.97, rel=0.01)
    assert rows["talk_25fps_16k"]["fps_in"] == pytest.approx(25.0, rel=0.01)
    rot = rows["talk_30fps_16k_rot90"]
    assert rot["rotation"] in (90, 270)
    assert (rot["width"], rot["height"]) == (360, 640)  # display size
    assert abs(rows["talk_25fps_16k"]["audio_offset_s"]) < 0.2


@pytest.mark.slow
def test_frame_files_hold_latents_audio_landmarks(ingested):
    from pipelines.dataset.schema import FrameStore

    out, _, cfg = ingested
    store = FrameStore(out)
    meta = store.meta
    assert meta.latent_shape == [4, cfg.ingest.crop_size // 8, cfg.ingest.crop_size // 8]
    assert meta.audio_shape == [2, 32]  # tiny wav2vec2: every one of its 2 transformer layers, width 32
    assert meta.fps == 25.0 and meta.vae_scaling_factor == pytest.approx(0.18215)
    for r in store.manifest("ok").to_pylist():
        vid, n = r["video_id"], r["num_frames"]
        assert store.num_frames(vid) == n
        idx = np.arange(n)
        data = store.read(vid, idx, ["frame_index", "time_s", "source_time_s", "latent", "audio",
                                     "landmarks", "crop_box", "face_found"])
        np.testing.assert_array_equal(data["frame_index"], idx)
        np.testing.assert_allclose(data["time_s"], idx / 25.0)
        assert np.all(np.diff(data["source_time_s"]) >= 0)
        # the source frame shown is never later than the output time (timestamp resampling)
        assert np.all(data["source_time_s"] <= data["time_s"] + 1e-3)
        assert data["latent"].shape == (n, *meta.latent_shape) and data["latent"].dtype == np.float16
        assert np.isfinite(data["latent"]).all() and data["latent"].std() > 0
        assert data["audio"].shape == (n, *meta.audio_shape) and data["audio"].dtype == np.float16
        assert np.isfinite(data["audio"]).all()
        # features differ over time (real per-frame features, not one vector repeated)
        assert np.abs(np.diff(data["audio"].astype(np.float32), axis=0)).mean() > 0
        lm = data["landmarks"]
        assert lm.shape == (n, 68, 2) and lm.dtype == np.float32
        assert lm.min() >= 0.0 and lm.max() <= 1.0
        assert data["face_found"].mean() > 0.9
        box = data["crop_box"]
        assert np.allclose(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1], rtol=1e-3)  # square
        # random frame ranges read back identically to the full read
        sub = store.read(vid, [n - 1, 3, 40], ["latent"])["latent"]
        np.testing.assert_array_equal(sub, data["latent"][[n - 1, 3, 40]])


@pytest.mark.slow
def test_workers_write_the_frames_the_driver_gets_only_small_rows(ingested):
    out, summary, _ = ingested
    assert not {"latent", "features", "crops", "jpeg", "samples"} & set(summary.driver_columns)
    frame_bytes = sum(p.stat().st_size for p in (out / "frames").glob("*.parquet"))
    if summary.processed:  # (a second caller of the shared run only resumes)
        assert 0 < summary.driver_bytes < 0.05 * frame_bytes
    assert (out / "ingest_fingerprint.json").is_file()
    assert summary.by_status.get("ok") == summary.ok and sum(summary.by_status.values()) == summary.inputs


@pytest.mark.slow
def test_split_is_deterministic_and_by_folder(ingested, good_videos):
    from pipelines.dataset.manifest import plan_inputs, split_for

    out, _, cfg = ingested
    rows = {r["source"]: r for r in _manifest(out)}
    again = {v.source: v for v in plan_inputs(good_videos[0].parent.parent, 0.5, "folder")}
    assert set(again) == set(rows)
    for source, r in rows.items():
        assert r["split"] == again[source].split
        folder = Path(source).parent.name
        assert r["split"] == split_for(f"folder:{folder}", 0.5)
    by_folder: dict[str, set] = {}
    for source, r in rows.items():
        by_folder.setdefault(Path(source).parent.name, set()).add(r["split"])
    assert all(len(s) == 1 for s in by_folder.values())  # one person never spans both splits


@pytest.mark.slow
def test_resume_skips_finished_redoes_deleted_and_survives_a_worker_crash(ingested, good_videos, tmp_path,
                                                                          monkeypatch):
    """Resume: a second run skips every finished video (no duplicate rows). Third run: a deleted
    frame file is redone, a crashed writer's tmp file and chunk folder are cleaned, and a new
    input whose worker process dies (as in a native decoder crash) ends as ``failed`` (an
    infrastructure failure, not a rejection) while the job finishes normally."""
    import os

    import pipelines.ingestion.job as ingest_job
    from pipelines.dataset.schema import FrameStore

    out_src, _, cfg = ingested
    out = tmp_path / "resumed"
    shutil.copytree(out_src, out)
    before = _manifest(out)
    inputs = good_videos[0].parent.parent

    again = ingest_job.run_ingest(inputs, out, cfg, echo=lambda s: None)
    assert again.processed == 0 and again.skipped == len(before)
    after = _manifest(out)
    assert len(after) == len(before)
    assert sorted(r["video_id"] for r in after) == sorted(r["video_id"] for r in before)

    victim = next(r for r in before if r["status"] == "ok")
    frames = out / victim["frames_file"]
    frames.unlink()
    (frames.parent / "crashed.parquet.tmp").write_bytes(b"half written")  # a crashed writer's leftover
    (frames.parent / "crashed.parts").mkdir()  # a crashed run's chunk folder
    (frames.parent / "crashed.parts" / "000000.parquet").write_bytes(b"x")
    crasher = tmp_path / "crashes_its_worker.mp4"  # new bytes, same streams (a plain copy is a duplicate)
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(good_videos[0]), "-map", "0",
                    "-c", "copy", "-metadata", "title=crasher", str(crasher)], check=True, timeout=120)
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join([r["source"] for r in before] + [str(crasher)]) + "\n")
    real_build = ingest_job.build_dataset

    def build_with_a_crash(*args, **kwargs):
        def die_on_crasher(batch):
            if any(Path(str(p)).name == crasher.name for p in batch["path"]):
                os._exit(1)  # the worker process dies
            return batch

        return real_build(*args, **kwargs).map_batches(die_on_crasher, batch_size=1, max_retries=1)

    monkeypatch.setattr(ingest_job, "build_dataset", build_with_a_crash)
    third = ingest_job.run_ingest(listing, out, cfg, echo=lambda s: None)
    assert third.processed == 2 and third.skipped == len(before) - 1
    final = _manifest(out)
    assert len(final) == len(before) + 1
    assert len({r["video_id"] for r in final}) == len(final)
    row = next(r for r in final if r["video_id"] == victim["video_id"])
    assert row["status"] == "ok" and row["num_frames"] == victim["num_frames"]
    assert FrameStore(out).num_frames(victim["video_id"]) == victim["num_frames"]
    assert not list(frames.parent.glob("*.tmp")) and not list(frames.parent.glob("*.parts"))
    crashed = next(r for r in final if r["source"] == str(crasher))
    assert crashed["status"] == "failed" and crashed["stage"] == "pipeline"
    assert crasher.name in crashed["reason"] and crashed["reason"].startswith("failed: ")


def _tracking_args(tmp_path: Path) -> list[str]:
    return [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/mlruns",
            "tracking.experiment=ingest-test"]


def test_cli_runs_as_a_file_without_ray_for_a_list_of_missing_files(tmp_path):
    """The script runs as a file (the project is importable as installed: no sys.path edit); a
    list naming a missing file gives a rejected row (stage ``input``), exit 0, and needs no Ray.
    The run is an MLflow run (params, counts, the manifest artifact) named in ``ingest_run.json``."""
    import json

    from mlflow.tracking import MlflowClient

    listing = tmp_path / "videos.txt"
    listing.write_text("# one missing file\nnot_there.mp4\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "ingest.py"), "--input", str(listing),
                           "--output", str(out), *_tracking_args(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = _manifest(out)
    assert len(rows) == 1
    assert rows[0]["status"] == "rejected" and rows[0]["stage"] == "input"
    assert "not_there.mp4" in rows[0]["reason"]
    assert (out / "ingest_meta.json").is_file()
    info = json.loads((out / "ingest_run.json").read_text())
    fingerprint = json.loads((out / "ingest_fingerprint.json").read_text())["fingerprint"]
    assert info["experiment"] == "ingest-test" and info["fingerprint"] == fingerprint
    run = MlflowClient(tracking_uri=info["tracking_uri"]).get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["loopy.job"] == "ingest"
    assert run.data.params["ingest.fps"] == "25.0" and run.data.params["fingerprint"] == fingerprint
    assert run.data.metrics["rejected"] == 1 and run.data.metrics["status.rejected"] == 1
    assert run.data.metrics["stage.input"] == 1 and run.data.metrics["hours_kept"] == 0
    # where the hours went (a file refused before its probe has no duration: 0 h, but its key is counted)
    assert run.data.metrics["hours_lost.unreadable"] == 0 and rows[0]["loss_key"] == "unreadable"
    assert "[ingest] yield: 0.000 h in, 0.000 h kept; lost: unreadable 0.000 h" in proc.stdout
    arts = {a.path for a in MlflowClient(tracking_uri=info["tracking_uri"]).list_artifacts(info["run_id"])}
    assert {"videos.parquet", "ingest_meta.json", "ingest_fingerprint.json", "ingest_summary.json"} <= arts
    assert not any("auth_token" in k for k in run.data.params)  # no serve section (tokens) in params


def test_cli_runs_as_a_module_and_main_returns_the_exit_status(tmp_path, capsys):
    """``python -m pipelines.ingest`` works like the file; ``main(argv)`` (the console-script entry
    point) returns 2 with one line for a bad ``--input``."""
    from pipelines.ingest import main

    listing = tmp_path / "videos.txt"
    listing.write_text("not_there.mp4\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pipelines.ingest", "--input", str(listing), "--output", str(out),
                           *_tracking_args(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [r["stage"] for r in _manifest(out)] == ["input"]
    assert main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--input" in err[0]


# --- the model facts of ingest_meta.json: an error naming the file/field, or a stated rule ---------


def _write_config(folder: Path, **fields) -> Path:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(fields))
    return folder


def test_vae_scaling_factor_is_read_or_the_stated_diffusers_default(tmp_path, caplog):
    import inspect
    import logging

    from diffusers import AutoencoderKL

    from pipelines.ingestion.meta import (
        DIFFUSERS_VAE_SCALING_FACTOR,
        ModelConfigError,
        vae_scaling_factor,
    )

    assert vae_scaling_factor(str(_write_config(tmp_path / "a", scaling_factor=0.13025)), True) == 0.13025
    # the rule: no field -> the value diffusers loads the VAE with (so the one the latents used), logged
    assert DIFFUSERS_VAE_SCALING_FACTOR == inspect.signature(AutoencoderKL.__init__).parameters["scaling_factor"].default
    with caplog.at_level(logging.WARNING, logger="pipelines.ingestion.meta"):
        assert vae_scaling_factor(str(_write_config(tmp_path / "b", latent_channels=4)), True) == 0.18215
    assert any("no scaling_factor" in r.getMessage() and "b/config.json" in r.getMessage() for r in caplog.records)
    # no silent 0.18215 any more: unreadable config, bad field, unknown location are errors naming them
    bad_json = tmp_path / "c"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match=r"c/config.json: cannot be read"):
        vae_scaling_factor(str(bad_json), True)
    with pytest.raises(ModelConfigError, match=r"d/config.json: field scaling_factor is 'x'"):
        vae_scaling_factor(str(_write_config(tmp_path / "d", scaling_factor="x")), True)
    (tmp_path / "e").mkdir()  # a folder without config.json
    with pytest.raises(ModelConfigError, match=r"e/config.json: cannot be read"):
        vae_scaling_factor(str(tmp_path / "e"), True)
    with pytest.raises(ModelConfigError, match=r"no-such-org/no-such-vae"):
        vae_scaling_factor("no-such-org/no-such-vae", True)


def test_audio_shape_of_an_empty_ingest_comes_from_the_wav2vec2_config_never_0_0(tmp_path, tiny_weights):
    """With nothing ingested the meta's audio shape is the wav2vec2 config's [layers, width]; a
    config without those fields is an error naming the file and field (once ``[0, 0]``)."""
    from pipelines.ingestion.meta import (
        ModelConfigError,
        read_model_facts,
        wav2vec2_feature_shape,
        write_ingest_meta,
    )

    weights_cfg, weights = tiny_weights
    assert wav2vec2_feature_shape(weights.wav2vec2, True) == [2, 32]
    with pytest.raises(ModelConfigError, match=r"w/config.json: field hidden_size is None"):
        wav2vec2_feature_shape(str(_write_config(tmp_path / "w", num_hidden_layers=12)), True)
    cfg = ingest_config(weights_cfg)
    facts = read_model_facts(cfg, weights)
    meta = write_ingest_meta(tmp_path, cfg, weights, facts, None, None, rows=[])
    side = cfg.ingest.crop_size // 8
    assert meta.audio_shape == [2, 32] and meta.latent_shape == [4, side, side]
    assert meta.vae_scaling_factor == pytest.approx(0.18215)


def test_cli_refuses_an_unreadable_model_config_before_any_work(tmp_path):
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text("{broken")
    listing = tmp_path / "videos.txt"
    listing.write_text("not_there.mp4\n")
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "ingest.py"), "--input", str(listing),
                           "--output", str(tmp_path / "out"), "weights.preset=sd15", f"weights.vae={vae}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(vae / "config.json") in lines[0], proc.stderr
    assert not (tmp_path / "out" / "videos.parquet").exists()


# --- fast unit tests of the driver's helpers (no Ray) ----------------------------------------------


def test_video_id_is_stable_and_changes_with_the_content(tmp_path):
    """Content ids (issue 13): touching or copying a file keeps its id; new bytes give a new one."""
    import os

    from pipelines.dataset.manifest import video_id_for

    f = tmp_path / "a.mp4"
    f.write_bytes(b"1234")
    vid = video_id_for(f)
    assert vid == video_id_for(tmp_path / "." / "a.mp4") and len(vid) == 16
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert video_id_for(f) == vid
    (tmp_path / "copy.mp4").write_bytes(b"1234")
    assert video_id_for(tmp_path / "copy.mp4") == vid
    f.write_bytes(b"1235")
    assert video_id_for(f) != vid


def test_expand_inputs_folder_list_and_split(tmp_path):
    from pipelines.dataset.manifest import (
        IngestInputError,
        expand_inputs,
        plan_inputs,
        split_for,
    )

    (tmp_path / "p1").mkdir()
    (tmp_path / "p1" / "x.MP4").write_bytes(b"a")
    (tmp_path / "p1" / "notes.txt").write_text("ignored")
    (tmp_path / "y.webm").write_bytes(b"b")
    found = [e.path.name for e in expand_inputs(tmp_path)]
    assert found == ["x.MP4", "y.webm"]
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\np1/x.MP4\n\ny.webm\np1/x.MP4\nmissing.mp4\n")
    planned = plan_inputs(listing, 0.5)
    assert [v.source for v in planned] == ["p1/x.MP4", "y.webm", "missing.mp4"]  # duplicate dropped
    with pytest.raises(IngestInputError):
        expand_inputs(tmp_path / "nothing_here")
    # splits: deterministic, and roughly test_fraction of many keys
    keys = [f"video:{i}" for i in range(2000)]
    frac = np.mean([split_for(k, 0.1) == "test" for k in keys])
    assert 0.07 < frac < 0.13
    assert [split_for(k, 0.1) for k in keys[:50]] == [split_for(k, 0.1) for k in keys[:50]]


def test_audio_coverage_rule():
    from pipelines.ingestion.quality import frames_covered_by_audio

    cfg = IngestConfig(max_audio_video_offset_s=0.5)
    assert frames_covered_by_audio(150, 6.2, cfg)[:2] == (150, pytest.approx(0.2))  # longer audio: all frames
    n, off, rej = frames_covered_by_audio(150, 5.8, cfg)  # 0.2 s short: only covered frames, no padding
    assert (n, rej) == (145, None) and off == pytest.approx(-0.2)
    n, off, rej = frames_covered_by_audio(150, 5.0, cfg)  # 1 s short: rejected
    assert n == 0 and rej.stage == "audio" and "shorter" in rej.reason


def test_chunk_rows_become_frame_rows_in_order_with_jpeg(tmp_path):
    """The driver's writer: chunks arriving out of order land in frame order; JPEG bytes of each
    crop survive the (blob + sizes) transport."""
    import io

    from PIL import Image

    from pipelines.dataset.schema import FrameStore, IngestMeta, frame_schema
    from pipelines.ingestion.frame_writer import VideoAssembly
    from pipelines.ingestion.model_stages import encode_jpegs

    rng = np.random.default_rng(0)
    n_chunks, per = 3, 10
    schema = frame_schema([4, 2, 2], [2, 3], with_jpeg=True)
    asm = VideoAssembly(tmp_path, "vid", schema)
    crops_all = []
    rows = []
    for c in range(n_chunks):
        crops = rng.integers(0, 255, size=(per, 16, 16, 3), dtype=np.uint8)
        crops_all.append(crops)
        blob, sizes = encode_jpegs(crops)
        start = c * per
        rows.append({"video_id": "vid", "chunk_index": c, "start_index": start, "num_frames": per,
                     "time_s": np.arange(start, start + per) / 25.0, "source_time_s": np.arange(start, start + per) / 30.0,
                     "latent": np.full((per, 4, 2, 2), c, np.float16), "features": rng.normal(size=(per, 2, 3)).astype(np.float16),
                     "landmarks": rng.uniform(size=(per, 68, 2)).astype(np.float32),
                     "boxes": np.tile(np.array([0, 0, 16, 16], np.float32), (per, 1)),
                     "found": np.ones(per, bool), "jpeg": blob, "jpeg_sizes": sizes})
    for c in (2, 0, 1):  # out of order
        asm.add(rows[c])
    asm.end = {"num_chunks": n_chunks}
    assert asm.complete
    frames_dir = tmp_path / "frames"
    assert not (frames_dir / "vid.parquet").exists()  # a temp file until closed (core.atomic_files)
    asm.writer.close()
    assert [p.name for p in frames_dir.iterdir()] == ["vid.parquet"]
    aborted = VideoAssembly(tmp_path, "gone", schema)
    aborted.add(rows[0])
    aborted.writer.abort()
    assert [p.name for p in frames_dir.iterdir()] == ["vid.parquet"]  # nothing left of the aborted file
    IngestMeta(1, 25.0, 16, [4, 2, 2], [2, 3], 16000, {}, 0.18215).write(tmp_path)
    store = FrameStore(tmp_path)
    data = store.read("vid", range(n_chunks * per), ["frame_index", "latent", "audio"])
    np.testing.assert_array_equal(data["frame_index"], np.arange(n_chunks * per))
    np.testing.assert_array_equal(data["latent"][:, 0, 0, 0], np.repeat(np.arange(n_chunks), per))
    np.testing.assert_array_equal(data["audio"][per:2 * per], rows[1]["features"])
    jpegs = store.read("vid", [per + 3], ["jpeg"])["jpeg"]
    img = np.asarray(Image.open(io.BytesIO(jpegs[0])))
    assert img.shape == (16, 16, 3)
    assert np.abs(img.astype(int) - crops_all[1][3].astype(int)).mean() < 60  # lossy, same picture


def test_the_cpu_stages_never_import_torch():
    """The analysis / decode workers (hundreds on a cluster) stay light: only the wav2vec2 and VAE
    actors (pipelines/ingestion/model_stages.py) load torch."""
    import subprocess
    import sys

    code = ("import sys, pipelines.ingestion.stages; "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
