"""What object storage costs the ingest and the reader (issue 25), against moto's S3 server on
127.0.0.1 (tests/s3_server.py): loopback, no network latency, a Python server (slower per request
than S3), so the figures are the client's overhead and an upper bound on per-request cost here,
not a cloud bucket's throughput.

* ``local copy per work unit``: ``core.storage.local_copy`` of one sample talking head (the
  download each of the ingest's three work units of a video does: probe, analysis, decode), next
  to the probe of the same local file (the cheapest of the three units) and the whole video's
  ingest CPU per frame budget.
* ``reader read``: ``FrameStore.read`` of one stage-2 sample's frames (clip + motion frames, the
  ``latent`` column) from the bucket vs the same files on disk (row groups fetched by ranged reads).
* ``atomic publish``: ``write_json_atomic`` of a record (temp key + server-side move) vs on disk.

Medians of a few repeats. ``LOOPY_BENCH_QUICK=1``: fewer repeats.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICK = os.environ.get("LOOPY_BENCH_QUICK", "0") not in ("0", "", "false")


def _median_s(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run() -> list[dict]:
    import numpy as np

    from tests.s3_server import S3Server, server_env

    reps = 3 if QUICK else 7
    srv = S3Server().start()
    rows = []
    try:
        with server_env(srv):
            from core.atomic_files import write_json_atomic
            from core.storage import StoragePath, local_copy
            from pipelines.dataset.schema import FrameStore
            from pipelines.media.probe import probe_video
            from pipelines.samples.synthetic_ingest import write_synthetic_ingest
            from pipelines.samples.talking_heads import SAMPLE_SPECS, generate_samples

            c = srv.client()
            c.create_bucket(Bucket="bench")
            with tempfile.TemporaryDirectory(prefix="bench_s3_") as tmp:
                tmp = Path(tmp)
                video = generate_samples(tmp / "raw", seconds=6.0, seed=0, specs=[SAMPLE_SPECS[0]])[0]
                c.upload_file(str(video), "bench", "raw/a.mp4")
                size_mb = video.stat().st_size / 1e6

                def copy():
                    with local_copy("s3://bench/raw/a.mp4") as local:
                        assert local.stat().st_size == video.stat().st_size

                copy_s = _median_s(copy, reps)
                probe_s = _median_s(lambda: probe_video(video), reps)
                rows += [
                    dict(benchmark="object_storage", metric="local copy per work unit", value=copy_s * 1e3, unit="ms",
                         target="", note=f"one GET of a {size_mb:.2f} MB 6 s 320x320 sample ({size_mb / copy_s:.0f} MB/s); "
                                         f"3 per video (probe, analysis, decode)"),
                    dict(benchmark="object_storage", metric="local copy / probe of the same file", value=copy_s / probe_s,
                         unit="x", target="", note=f"probe {probe_s * 1e3:.0f} ms; the analysis and decode units cost "
                                                   f"far more than the probe"),
                ]

                data = tmp / "ingested"
                write_synthetic_ingest(data, [200, 200], latent_shape=(4, 64, 64), audio_shape=(12, 768),
                                       num_rejected=0, content="random")
                for p in data.rglob("*"):
                    if p.is_file():
                        c.upload_file(str(p), "bench", f"ingested/{p.relative_to(data).as_posix()}")
                local_store, bucket_store = FrameStore(data), FrameStore("s3://bench/ingested")
                vid = local_store.manifest()["video_id"][0].as_py()
                frames = list(range(40, 40 + 12)) + list(range(0, 40, 2))  # clip + motion frames of one sample
                local_store.read(vid, frames, ["latent"])
                bucket_store.read(vid, frames, ["latent"])  # footers cached, as a reader worker has them
                rng = np.random.default_rng(0)

                def read(store):
                    start = int(rng.integers(40, 180))
                    store.read(vid, list(range(start, start + 12)) + list(range(start - 40, start, 2)), ["latent"])

                local_read = _median_s(lambda: read(local_store), reps * 3)
                bucket_read = _median_s(lambda: read(bucket_store), reps * 3)
                rows += [
                    dict(benchmark="object_storage", metric="reader sample read, bucket", value=bucket_read * 1e3,
                         unit="ms", target="", note="32 frames of latent 4x64x64 fp16: ranged reads of their row groups"),
                    dict(benchmark="object_storage", metric="reader sample read, bucket / disk", value=bucket_read / local_read,
                         unit="x", target="", note=f"disk {local_read * 1e3:.1f} ms"),
                ]
                rec = {"video_id": "0" * 16, "status": "ok", "num_frames": 100}
                obj = StoragePath("s3://bench/records/x.json")
                bucket_put = _median_s(lambda: write_json_atomic(obj, rec), reps)
                disk_put = _median_s(lambda: write_json_atomic(tmp / "x.json", rec), reps)
                rows.append(dict(benchmark="object_storage", metric="atomic publish of a record", value=bucket_put * 1e3,
                                 unit="ms", target="", note=f"temp key + copy + delete; disk (fsync + rename) "
                                                            f"{disk_put * 1e3:.1f} ms"))
    finally:
        srv.stop()
    return rows


if __name__ == "__main__":
    from benchmarks.run import print_table

    print_table(run())
