"""Issue 25 item 2: an input list (CSV / Parquet of URIs) with optional start / end times per row,
the way public datasets list clips of long sources.

* parsing: seconds, ``MM:SS`` and ``HH:MM:SS.fff`` (never read as a time of day), empty cells, and
  a malformed or inverted range refused with the list, the row and the column named;
* planning: every clip is its own input (its own id, from the file's content and the range), all
  clips of a file land in one split, a clip that overlaps an earlier one of the same content is a
  duplicate (no frame is ingested twice), the file is hashed once;
* ranges: a clip is planned over its part of the file; its own edges never move to a cut, only
  the boundaries between its ranges do; ``last`` only when it reaches the end of the file;
* the whole job on a rendered 3-shot video listed as clips: each kept sample lies inside its clip,
  the overlapping clip is a duplicate, the clip past the end is rejected by name, and the hours in
  count the clips, not the file once per clip.
"""
from __future__ import annotations

import datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.config import PlatformConfig
from core.sections import IngestConfig


def _csv(path, text: str):
    path.write_text(text)
    return path


def test_list_times_in_seconds_and_clock_notation(tmp_path):
    from pipelines.dataset.manifest import Clip, list_entries

    listing = _csv(tmp_path / "clips.csv", "uri,start,end,speaker\n"
                   "a.mp4,01:02,01:05.5,x\n"          # MM:SS: 62 s (pyarrow alone would read 1 h 2 min)
                   "b.mp4,1:00:00,01:00:02.250,y\n"   # HH:MM:SS.fff
                   "c.mp4,3,4.5,z\n"                  # seconds
                   "d.mp4,,,w\n"                      # no range: the whole file
                   "e.mp4,7.5,,v\n")                  # to the end
    assert list_entries(listing) == [("a.mp4", Clip(62.0, 65.5)), ("b.mp4", Clip(3600.0, 3602.25)),
                                     ("c.mp4", Clip(3.0, 4.5)), ("d.mp4", None), ("e.mp4", Clip(7.5, None))]
    table = pa.table({"path": ["f.mp4", "g.mp4"], "start_time": [datetime.time(0, 0, 1), None],
                      "end_time": [datetime.time(0, 0, 4, 500000), None]})
    pq.write_table(table, tmp_path / "clips.parquet")
    assert list_entries(tmp_path / "clips.parquet") == [("f.mp4", Clip(1.0, 4.5)), ("g.mp4", None)]


@pytest.mark.parametrize("row,match", [
    ("a.mp4,abc,3", r"clips.csv: row 2 start_s: 'abc' is not a time"),
    ("a.mp4,5,4", r"clips.csv: row 2: the range ends \(4 s\) before it starts \(5 s\)"),
    ("a.mp4,1,-4", r"clips.csv: row 2 end_s: '-4' is not a time of the file \(negative"),
    ("a.mp4,2,2", r"row 2: the range ends"),
])
def test_a_bad_range_names_the_list_row_and_column(tmp_path, row, match):
    from pipelines.dataset.manifest import IngestInputError, expand_inputs

    listing = _csv(tmp_path / "clips.csv", "uri,start_s,end_s\nok.mp4,0,1\n" + row + "\n")
    with pytest.raises(IngestInputError, match=match):
        expand_inputs(listing)


def test_clips_are_inputs_of_their_own_and_overlaps_are_duplicates(tmp_path):
    from pipelines.dataset.manifest import Clip, clip_id, duplicate_row, plan_inputs, video_id_for

    for name, data in (("long.mp4", b"x" * 1000), ("copy.mp4", b"x" * 1000), ("other.mp4", b"y" * 10)):
        (tmp_path / name).write_bytes(data)
    listing = _csv(tmp_path / "clips.csv", "uri,start_s,end_s\n"
                   "long.mp4,0,10\n"
                   "long.mp4,10,20\n"      # touches the first: no overlap
                   "long.mp4,0,10\n"       # the same row again: kept once
                   "long.mp4,15,30\n"      # overlaps 10-20: duplicate
                   "copy.mp4,40,50\n"      # the same content under another name, frames nobody has
                   "copy.mp4,45,46\n"      # inside 40-50 of the same content: duplicate
                   "other.mp4,,\n"         # a whole file
                   "other.mp4,1,2\n")      # a clip of a file listed whole: duplicate
    videos = plan_inputs(listing, 0.5)
    content = video_id_for(tmp_path / "long.mp4")
    assert [(v.source, v.clip, v.duplicate_of) for v in videos] == [
        ("long.mp4", Clip(0, 10), None), ("long.mp4", Clip(10, 20), None),
        ("long.mp4", Clip(15, 30), "long.mp4 [10.000-20.000 s]"),
        ("copy.mp4", Clip(40, 50), None), ("copy.mp4", Clip(45, 46), "copy.mp4 [40.000-50.000 s]"),
        ("other.mp4", None, None), ("other.mp4", Clip(1, 2), "other.mp4")]
    assert videos[0].video_id == clip_id(content, Clip(0, 10)) != videos[1].video_id
    assert len({v.video_id for v in videos}) == len(videos)
    assert videos[5].video_id == videos[5].content_id == video_id_for(tmp_path / "other.mp4")
    assert len({v.split for v in videos if v.content_id == content}) == 1  # every clip of the content: one split
    assert {v.content_id for v in videos[:5]} == {content}
    row = duplicate_row(videos[2])
    assert row["status"] == "duplicate" and row["reason"] == "duplicate: overlaps long.mp4 [10.000-20.000 s] (same content)"
    assert (row["clip_start_s"], row["clip_end_s"]) == (15.0, 30.0)


def test_a_clip_is_planned_over_its_part_and_keeps_its_edges():
    from pipelines.ingestion.units import plan_ranges

    (one,) = plan_ranges("c", 100.0, 25.0, 300.0, 10.0, 20.0)
    assert (one.start, one.end, one.whole, one.last, one.snap_start, one.snap_end) == (250, 500, True, False, False, False)
    (tail,) = plan_ranges("c", 100.0, 25.0, 300.0, 90.0, None)
    assert (tail.start, tail.end, tail.last) == (2250, 2500, True)
    (cut,) = plan_ranges("c", 100.0, 25.0, 300.0, 90.0, 500.0)  # an end past the file stops at it
    assert (cut.end, cut.last) == (2500, True)
    ranges = plan_ranges("c", 7200.0, 25.0, 300.0, 600.0, 2400.0)  # a 30-minute clip of a 2-hour source
    assert len(ranges) == 6 and ranges[0].start == 15000 and ranges[-1].end == 60000
    assert all(a.end == b.start for a, b in zip(ranges, ranges[1:]))
    assert [(r.snap_start, r.snap_end) for r in ranges] == [(False, True)] + [(True, True)] * 4 + [(True, False)]
    assert not any(r.last for r in ranges)
    (past,) = plan_ranges("c", 100.0, 25.0, 300.0, 150.0, 160.0)
    assert past.num_frames == 0


def test_hours_in_count_a_clip_not_its_file():
    from pipelines.dataset.losses import hours_by_loss

    rows = [{"status": "ok", "source_id": "c1", "duration_s": 3600.0, "clip_start_s": 10.0, "clip_end_s": 20.0,
             "start_s": 10.0, "end_s": 20.0, "num_frames": 200},
            {"status": "ok", "source_id": "c2", "duration_s": 3600.0, "clip_start_s": 3590.0, "clip_end_s": None,
             "start_s": 3590.0, "end_s": 3600.0, "num_frames": 250}]
    hours_in, kept, lost = hours_by_loss(rows, 25.0)
    assert hours_in == pytest.approx(20.0 / 3600) and kept == pytest.approx(18.0 / 3600)
    assert lost == {"trimmed": pytest.approx(2.0 / 3600)}


# --- the whole job ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clips_run(ray_local, tiny_weights, tmp_path_factory):
    from pipelines.ingestion.job import run_ingest
    from pipelines.samples.face_scenes import write_shots
    from tests.test_ingest_shots import DISSOLVE, SHOTS, TRANSITIONS

    root = tmp_path_factory.mktemp("clips")
    path, bounds = write_shots(root / "raw", "three_shots", SHOTS, TRANSITIONS, DISSOLVE)
    listing = _csv(root / "clips.csv", "uri,start,end\n"
                   "raw/three_shots.mp4,00:00.4,00:02.6\n"  # inside the first face shot
                   "raw/three_shots.mp4,6.4,9\n"             # the second face shot (the file ends at 8.7 s)
                   "raw/three_shots.mp4,1,2\n"               # inside the first clip: a duplicate
                   "raw/three_shots.mp4,20,30\n")            # past the end of the 8.7 s file
    cfg = PlatformConfig()
    cfg.weights = tiny_weights[0]
    cfg.ingest = IngestConfig(min_frames=25)
    out = root / "out"
    summary = run_ingest(listing, out, cfg, echo=lambda _: None)
    return {"rows": pq.read_table(out / "videos.parquet").to_pylist(), "bounds": bounds, "summary": summary,
            "out": out, "path": path}


@pytest.mark.slow
def test_clips_of_a_listed_file_are_ingested_inside_their_ranges(clips_run):
    from pipelines.dataset.schema import FrameStore

    rows = clips_run["rows"]
    by_clip = {(r["clip_start_s"], r["clip_end_s"]): r for r in rows}
    assert set(by_clip) == {(0.4, 2.6), (6.4, 9.0), (1.0, 2.0), (20.0, 30.0)}, rows
    first, second = by_clip[(0.4, 2.6)], by_clip[(6.4, 9.0)]
    for r, (lo, hi) in ((first, (10, 65)), (second, (160, clips_run["bounds"][2][1]))):
        assert r["status"] == "ok", r
        start, end = round(r["start_s"] * 25), round(r["end_s"] * 25)
        assert lo <= start and end <= hi and r["num_frames"] == end - start >= 0.85 * (hi - lo), (r, lo, hi)
        assert FrameStore(clips_run["out"]).num_frames(r["video_id"]) == r["num_frames"]
        assert r["video_id"] == r["source_id"]  # one range, one shot: the clip's id names the sample
    assert first["video_id"] != second["video_id"] and first["split"] == second["split"]
    dup = by_clip[(1.0, 2.0)]
    assert dup["status"] == "duplicate" and "overlaps raw/three_shots.mp4 [0.400-2.600 s]" in dup["reason"]
    past = by_clip[(20.0, 30.0)]
    assert past["status"] == "rejected" and past["stage"] == "input", past
    assert "the clip 20.000-30.000 s is past the end of the video" in past["reason"] and str(clips_run["path"]) in past["reason"]
    s = clips_run["summary"]
    expected_in = (2.6 - 0.4) + (clips_run["bounds"][2][1] / 25 - 6.4)  # the two clips, not the file twice
    assert s.ok == 2 and s.hours_input == pytest.approx(expected_in / 3600, rel=0.02)
