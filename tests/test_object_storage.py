"""Data on object storage (issue 25): ingest from a bucket to a bucket, the reader and training on
it, bad URIs refused before any work, a store outage recorded as ``failed``.

One real S3-protocol server for the module (moto's standalone server on 127.0.0.1, a separate
process: ``tests/s3_server.py``); the platform reaches it only through the standard variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...). Tiny data: three 3 s talking heads and one bad
file.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from core.config import PlatformConfig
from core.paths import PROJECT_ROOT
from core.sections import IngestConfig
from tests.s3_server import S3Server, server_env

RAW, DATA = "loopy-raw", "loopy-data"
SECONDS = 3.0
SPECS = ("talk_25fps_16k", "talk_30fps_22k", "talk_29.97fps_44k")


def restart_ray() -> None:
    """Ray's workers take the environment of the process that started Ray: restart the session's
    Ray (tests/conftest.py ``ray_local``) after the environment changed."""
    import ray

    from core.ray_runtime import init_ray
    from core.sections import RayConfig

    ray.shutdown()
    init_ray(RayConfig(num_cpus=2))


@pytest.fixture(scope="module")
def s3(tmp_path_factory, ray_local):
    """The server, its environment set for this module (restored after), buckets RAW and DATA;
    Ray restarted so its workers see the environment (as a cluster's pods get it from their spec)."""
    srv = S3Server(log=tmp_path_factory.mktemp("s3log") / "moto.log").start()
    with server_env(srv):
        restart_ray()
        c = srv.client()
        c.create_bucket(Bucket=RAW)
        c.create_bucket(Bucket=DATA)
        yield srv
        srv.stop()
    restart_ray()


@pytest.fixture(scope="module")
def raw_videos(tmp_path_factory) -> dict:
    """Three good talking heads and one bad file (local), uploaded by the tests that need them."""
    from pipelines.samples.talking_heads import SAMPLE_SPECS, generate_samples

    folder = tmp_path_factory.mktemp("raw")
    specs = [s for s in SAMPLE_SPECS if s.name in SPECS]
    good = generate_samples(folder / "person_a", seconds=SECONDS, seed=3, specs=specs)
    bad = folder / "person_a" / "bad_not_video.mp4"
    bad.write_bytes(b"this is not a video file at all" * 100)
    return {"good": sorted(good), "bad": bad}


def upload(srv: S3Server, bucket: str, prefix: str, files) -> list[str]:
    c = srv.client()
    uris = []
    for f in files:
        key = f"{prefix}/{Path(f).name}"
        c.upload_file(str(f), bucket, key)
        uris.append(f"s3://{bucket}/{key}")
    return uris


def ingest_cfg(tiny_weights) -> PlatformConfig:
    cfg = PlatformConfig()
    cfg.weights = tiny_weights[0]
    cfg.ingest = IngestConfig(split_key="video", test_fraction=0.34, min_frames=50)
    return cfg


def no_uri_folders() -> list[Path]:
    """Local folders named after a URI scheme (``s3:``) in the places a path would land."""
    found = []
    for base in (PROJECT_ROOT, Path.cwd()):
        found += [p for p in base.glob("*:") if p.is_dir()]
        found += [p for p in base.glob("*/*:") if p.is_dir()]
    return found


@pytest.fixture(scope="module")
def bucket_ingest(s3, raw_videos, tiny_weights):
    from pipelines.ingest import run_ingest

    upload(s3, RAW, "raw/person_a", raw_videos["good"] + [raw_videos["bad"]])
    messages: list[str] = []
    summary = run_ingest(f"s3://{RAW}/raw/", f"s3://{DATA}/ingested", ingest_cfg(tiny_weights), echo=messages.append)
    return {"summary": summary, "messages": messages}


def test_ingest_bucket_to_bucket(s3, bucket_ingest):
    from core.storage import StoragePath
    from pipelines.dataset.schema import FrameStore

    summary = bucket_ingest["summary"]
    assert (summary.inputs, summary.ok, summary.rejected, summary.failed) == (4, 3, 1, 0), bucket_ingest["messages"]
    keys = s3.keys(DATA, "ingested/")
    assert not [k for k in keys if k.endswith(".tmp") or ".parts/" in k], keys  # no temp key, no part left
    manifest = pq.read_table(StoragePath(f"s3://{DATA}/ingested/videos.parquet").open()).to_pylist()
    assert sorted(r["source"] for r in manifest) == sorted(
        f"s3://{RAW}/raw/person_a/{n}" for n in [*(s + ".mp4" for s in SPECS), "bad_not_video.mp4"])
    bad = [r for r in manifest if r["status"] != "ok"]
    assert [(r["status"], r["stage"]) for r in bad] == [("rejected", "probe")]
    assert f"s3://{RAW}/raw/person_a/bad_not_video.mp4" in bad[0]["reason"]  # the reason names the URI
    assert "loopy_obj_" not in bad[0]["reason"]  # never the local copy
    for r in manifest:
        if r["status"] == "ok":
            assert f"ingested/{r['frames_file']}" in keys
            assert f"ingested/records/{r['video_id']}.json" in keys
    # the reader side: ranged reads of row groups from the bucket
    store = FrameStore(f"s3://{DATA}/ingested")
    ok = [r for r in manifest if r["status"] == "ok"]
    got = store.read(ok[0]["video_id"], [0, 30, 5], ["latent", "landmarks"])
    assert got["latent"].shape == (3, *store.meta.latent_shape) and got["landmarks"].shape == (3, 68, 2)
    assert store.num_frames(ok[0]["video_id"]) == ok[0]["num_frames"]
    assert not no_uri_folders()


def test_rerun_resumes_from_the_bucket(s3, bucket_ingest, tiny_weights):
    from pipelines.ingest import run_ingest

    messages: list[str] = []
    summary = run_ingest(f"s3://{RAW}/raw/", f"s3://{DATA}/ingested", ingest_cfg(tiny_weights), echo=messages.append)
    assert (summary.skipped, summary.processed, summary.ok, summary.rejected) == (4, 0, 3, 1), messages


@pytest.mark.parametrize("args, needle", [
    (["--input", "ftp://host/raw/", "--output", "OUT"], "ftp://host/raw/: unknown storage scheme ftp://"),
    (["--input", "s3://no-such-bucket/raw/", "--output", "OUT"], "bucket no-such-bucket does not exist"),
    (["--input", "RAW", "--output", "s3://no-such-bucket/out"], "--output s3://no-such-bucket/out: bucket"),
    (["--input", "RAW", "--output", "gopher://x/out"], "--output gopher://x/out: unknown storage scheme"),
])
def test_bad_uri_is_one_line_before_any_work(s3, raw_videos, tmp_path, capsys, args, needle):
    from pipelines.ingest import main

    args = [str(raw_videos["good"][0]) if a == "RAW" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    before = s3.keys(DATA) + s3.keys(RAW)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert s3.keys(DATA) + s3.keys(RAW) == before  # nothing written
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not no_uri_folders()


def test_missing_credentials_is_one_line(s3, raw_videos, tmp_path, capsys, monkeypatch):
    from pipelines.ingest import main

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    assert main(["--input", f"s3://{RAW}/raw/", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and f"s3://{RAW}/raw/: no credentials found" in err, err


def test_unknown_scheme_is_never_a_local_folder(tmp_path, monkeypatch):
    """``Path("s3://b/k")`` would be the folder ``s3:/b/k``; the storage layer refuses or routes it."""
    from core.storage import StorageError, StoragePath, as_location

    monkeypatch.chdir(tmp_path)
    assert isinstance(as_location("s3://b/k"), StoragePath)
    assert as_location("file:///tmp/x") == Path("/tmp/x")
    with pytest.raises(StorageError, match="hdfs2://b/k"):
        as_location("hdfs2://b/k")
    with pytest.raises(TypeError):
        Path(StoragePath("s3://b/k"))  # no __fspath__: local-only code fails instead of making s3:
    assert not list(tmp_path.iterdir())


def test_atomic_object_write_never_shows_half(s3):
    """An object is published whole (temp key, then move) or not at all; an error leaves the old
    object and no temporary key."""
    import json

    from core.atomic_files import atomic_path, write_json_atomic
    from core.storage import StoragePath

    target = StoragePath(f"s3://{DATA}/atomic/x.json")
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError, match="writer died"):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("writer died")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [k for k in s3.keys(DATA, "atomic/") if not k.endswith("/")] == ["atomic/x.json"]


def test_training_refuses_bad_uris_before_any_work(s3, bucket_ingest, tiny_weights, tmp_path):
    from tests.train_setup import train_cfg
    from training.stages import TrainSetupError, prepare_job

    cfg = train_cfg(tmp_path, tiny_weights, "train.storage_path=s3://no-such-bucket/ray")
    with pytest.raises(TrainSetupError, match="--data ftp://x/ingested: unknown storage scheme ftp://"):
        prepare_job(cfg, "ftp://x/ingested", [1])
    with pytest.raises(TrainSetupError, match="--data s3://no-such-bucket/ingested: bucket no-such-bucket does not"):
        prepare_job(cfg, "s3://no-such-bucket/ingested", [1])
    with pytest.raises(TrainSetupError, match="train.storage_path s3://no-such-bucket/ray: bucket no-such-bucket"):
        prepare_job(cfg, f"s3://{DATA}/ingested", [1])
    assert not no_uri_folders() and not list(tmp_path.glob("*:"))


# --- training and evaluation on the bucket --------------------------------------------------------

@pytest.fixture(scope="module")
def bucket_training(s3, bucket_ingest, tiny_weights, tmp_path_factory):
    """Both stages (2 steps each, one worker) from ``--data s3://...``, Ray Train checkpoints at
    ``train.storage_path=s3://...``, MLflow artifacts at ``tracking.artifact_root=s3://...``; only
    the MLflow database is local."""
    from tests.train_setup import train_cfg
    from training.stages import prepare_job, run_job

    root = tmp_path_factory.mktemp("bucket_train")
    cfg = train_cfg(root, tiny_weights, f"train.storage_path=s3://{DATA}/ray", f"tracking.artifact_root=s3://{DATA}/mlruns",
                    "train.num_workers=1", "train.max_steps=2", "train.checkpoint_every=1", "train.eval_every=0",
                    "train.eval_sample_steps=0", "train.warmup_steps=1")
    prep = prepare_job(cfg, f"s3://{DATA}/ingested", [1, 2], job_name="bucket")
    record = run_job(prep)
    return {"cfg": cfg, "prep": prep, "record": record, "root": root}


@pytest.mark.slow
def test_train_from_the_bucket_to_the_bucket(s3, bucket_training):
    from core.config import flatten

    record, cfg = bucket_training["record"], bucket_training["cfg"]
    assert record.stages["1"].done and record.stages["2"].done
    keys = s3.keys(DATA, "ray/")
    assert "ray/bucket/job.json" in keys and "ray/latest_job" in keys
    for stage in ("1", "2"):
        assert any(k.startswith(f"ray/bucket/stage{stage}/checkpoint_") for k in keys), keys  # Ray Train's
        assert f"ray/bucket/stage{stage}_package/loopy/config.json" in keys
    assert record.stages["2"].package_dir == f"s3://{DATA}/ray/bucket/stage2_package"
    assert any(k.startswith("mlruns/") and k.endswith("MLmodel") for k in s3.keys(DATA, "mlruns/"))
    assert not [k for k in keys if k.endswith(".tmp")]
    assert not (bucket_training["root"] / "ray").exists()
    # no credential in the config MLflow records
    assert not any("testing" == str(v) for v in flatten(cfg).values())
    assert not no_uri_folders()


@pytest.mark.slow
def test_registered_model_loads_where_training_never_ran(s3, bucket_training, tmp_path):
    """``mlflow.pyfunc.load_model`` in a fresh process, in another folder, with only the tracking
    database and the bucket (the package comes from the bucket's artifacts)."""
    import subprocess
    import sys

    db = bucket_training["root"] / "mlflow.db"
    code = ("import mlflow, sys; mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_registry_uri(sys.argv[1]); "
            "m = mlflow.pyfunc.load_model('models:/loopy@stage2'); "
            "print('LOADED', m.metadata.artifact_path, m.metadata.run_id)")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    out = subprocess.run([sys.executable, "-c", code, f"sqlite:///{db}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "LOADED" in out.stdout, out.stderr[-3000:]
    assert not list(tmp_path.glob("*:"))


@pytest.mark.slow
def test_evaluate_from_the_bucket(s3, bucket_training, tmp_path):
    import json

    import evaluate

    root = bucket_training["root"]
    out = tmp_path / "eval.json"
    tracking = [f"tracking.tracking_uri=sqlite:///{root}/mlflow.db", f"tracking.artifact_root=s3://{DATA}/mlruns",
                f"weights.tiny_dir={bucket_training['cfg'].weights.tiny_dir}"]
    rc = evaluate.main(["--model", "models:/loopy@stage2", "--data", f"s3://{DATA}/ingested", "--split", "train",
                        "--out", str(out), *tracking, "evaluation.max_seconds=1", "evaluation.steps=1",
                        "evaluation.max_videos=1", "evaluation.min_sync=null", "evaluation.min_sync_margin=null",
                        "evaluation.min_face_found_ratio=null", "evaluation.max_identity=null",
                        "evaluation.min_identity_margin=null", f"evaluation.output_dir={tmp_path}"])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["data"] == f"s3://{DATA}/ingested" and len(result["videos"]) == 1 and not result["rejected"]
    video = result["videos"][0]
    # the source video (waveform for the sync metrics) was read from the raw bucket
    assert not [n for n in video["notes"] if "not found" in n], video["notes"]


def test_input_lists_name_bucket_objects(s3, raw_videos, tmp_path):
    """A CSV / Parquet list of URIs (the way public datasets are distributed), read from the
    bucket, with time ranges per row (clips; tests/test_input_clips.py ingests them)."""
    import pyarrow as pa

    from core.storage import StoragePath
    from pipelines.dataset.manifest import Clip, IngestInputError, expand_inputs

    uris = upload(s3, RAW, "lists/videos", raw_videos["good"][:2])
    csv = tmp_path / "list.csv"
    csv.write_text("uri,speaker\n" + "".join(f"{u},x\n" for u in uris))
    s3.client().upload_file(str(csv), RAW, "lists/list.csv")
    got = expand_inputs(f"s3://{RAW}/lists/list.csv")
    assert [(e.source, str(e.path), e.clip) for e in got] == [(u, u, None) for u in uris]
    assert all(isinstance(e.path, StoragePath) for e in got)
    pq.write_table(pa.table({"path": ["videos/" + Path(u).name for u in uris]}), tmp_path / "rel.parquet")
    s3.client().upload_file(str(tmp_path / "rel.parquet"), RAW, "lists/rel.parquet")
    assert [str(e.path) for e in expand_inputs(f"s3://{RAW}/lists/rel.parquet")] == uris  # relative to the list
    pq.write_table(pa.table({"uri": uris, "start_s": [0.0, 1.0], "end_s": [2.0, None]}), tmp_path / "ranges.parquet")
    s3.client().upload_file(str(tmp_path / "ranges.parquet"), RAW, "lists/ranges.parquet")
    got = expand_inputs(f"s3://{RAW}/lists/ranges.parquet")
    assert [(str(e.path), e.clip) for e in got] == [(uris[0], Clip(0.0, 2.0)), (uris[1], Clip(1.0, None))]
    pq.write_table(pa.table({"uri": uris, "start_s": [3.0, 1.0], "end_s": [2.0, None]}), tmp_path / "bad.parquet")
    with pytest.raises(IngestInputError, match=r"bad.parquet: row 1: the range ends \(2 s\) before it starts \(3 s\)"):
        expand_inputs(tmp_path / "bad.parquet")


# --- the store goes away in the middle of a job (last: it restarts the module's server) -----------

@pytest.mark.slow  # two ingests through Ray
def test_store_outage_is_failed_and_a_rerun_finishes(s3, raw_videos, tiny_weights):
    """The S3 server is stopped in the middle of the stream, the moment the first video is
    finished (its frame file and record are in the bucket; the others are being analysed, decoded
    or written by the workers): the finished one stays ok, every other one is ``failed`` at an
    infrastructure stage, none ``rejected``. The server comes back with the state it had when it
    stopped (moto keeps none: the test snapshots it and restores it), half-written parts
    included; the rerun keeps the finished video, finishes the others and leaves no temporary key."""
    from pipelines.ingest import run_ingest

    good = raw_videos["good"][:3]
    upload(s3, RAW, "fault", good)
    src, out = f"s3://{RAW}/fault/", f"s3://{DATA}/fault_out"
    snap: dict = {}
    messages: list[str] = []

    def echo(msg: str) -> None:
        messages.append(msg)
        if re.match(rf"\[ingest\] 1/{len(good)} done", msg) and not snap:
            snap.update(s3.snapshot())
            s3.stop()

    summary = run_ingest(src, out, ingest_cfg(tiny_weights), echo=echo)
    assert snap, messages
    assert summary.ok >= 1 and summary.failed >= 1 and summary.rejected == 0, messages
    assert summary.ok + summary.failed == len(good), summary.by_status
    assert all(r.startswith("failed: ") and f"s3://{RAW}/fault/" in r for r in summary.rejections.values()), \
        summary.rejections
    assert summary.store_error and any("the output store is unreachable, the manifest was not written" in m
                                       for m in messages), messages
    finished_before = summary.ok

    s3.start()
    s3.restore(snap)
    messages = []
    summary = run_ingest(src, out, ingest_cfg(tiny_weights), echo=messages.append)
    assert (summary.ok, summary.failed, summary.rejected, summary.skipped) == (len(good), 0, 0, finished_before), \
        messages
    keys = s3.keys(DATA, "fault_out/")
    assert "fault_out/videos.parquet" in keys and not [k for k in keys if k.endswith(".tmp") or ".parts/" in k]

