"""The training reader on synthetic ingest outputs whose values encode (video, frame)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from core.sections import ReaderConfig
from inference.guidance import CONDITIONS, guidance_switches
from pipelines.dataset.schema import META_NAME, IngestFormatError, frames_path
from pipelines.reader.sample_spec import (
    A2L_KINDS,
    SampleSpec,
    VideoEntry,
    draw_video_specs,
    epoch_plan,
    shard,
    valid_clip_starts,
)
from pipelines.reader.source import (
    SAMPLE_DTYPES,
    LoopySampleSource,
    LoopyTorchDataset,
    SampleReadError,
    build_ray_dataset,
    collate,
    load_spec_batch,
    main,
    ray_collate_fn,
)
from pipelines.samples.synthetic_ingest import (
    synthetic_landmarks,
    video_id_of,
    write_synthetic_ingest,
)

# ok videos in manifest order; 20 frames < 12 + 12 is too short, 24 is the minimum; the last is test
FRAMES = (40, 80, 136, 200, 20, 24, 60)
SPLITS = ("train",) * 6 + ("test",)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ingested")
    write_synthetic_ingest(out, FRAMES, splits=SPLITS, num_rejected=2)
    return out


def cfg(**kw) -> ReaderConfig:
    """Reader settings; the appearance augmentation is off unless asked for, because these tests
    read provenance out of the synthetic latents (tests/test_appearance.py tests it on)."""
    kw.setdefault("appearance_aug", False)
    return ReaderConfig(**kw)


def _expected_uniform_sources(clip_start, s=4, r=2, segments=5):
    """Independent restatement of the paper: nearest segment first, segment k spans s*r**k frames,
    one frame (the group's nearest to the clip) per group of r**k; then reversed to time order."""
    out, covered = [], 0
    for k in range(segments):
        for j in range(s):
            out.append(clip_start - (covered + j * r**k) - 1)
        covered += s * r**k
    out = out[::-1]
    return np.array([i if i >= 0 else -1 for i in out])


def _number(source, video_index):
    return int(source.video_id(video_index).removeprefix("synth"))


def test_opens_ingest_output_and_skips_short_videos(data_dir):
    src = LoopySampleSource(data_dir, cfg())
    assert src.num_videos == 5 and src.skipped == 1
    assert src.skipped_videos[0][0] == video_id_of(4) and "20 frames < 24" in src.skipped_videos[0][1]
    assert {v.video_id for v in src.videos} == {video_id_of(i) for i in (0, 1, 2, 3, 5)}
    # video_index = row among the ok rows (the rejected rows come first in the manifest)
    assert all(src.video_id(v.video_index) == v.video_id for v in src.videos)
    assert LoopySampleSource(data_dir, cfg(), split="test").num_videos == 1
    # a longer reference distance makes the 24- and 40-frame videos too short
    assert LoopySampleSource(data_dir, cfg(ref_min_distance=30)).skipped == 3


def test_errors_name_the_problem(data_dir, tmp_path):
    with pytest.raises(IngestFormatError, match="not an ingest output"):
        LoopySampleSource(tmp_path, cfg())
    bad = tmp_path / "v99"
    shutil.copytree(data_dir, bad)
    meta = json.loads((bad / META_NAME).read_text())
    meta["schema_version"] = 99
    (bad / META_NAME).write_text(json.dumps(meta))
    with pytest.raises(IngestFormatError, match="schema version 99"):
        LoopySampleSource(bad, cfg())
    missing = tmp_path / "missing"
    shutil.copytree(data_dir, missing)
    frames_path(missing, video_id_of(1)).unlink()
    src = LoopySampleSource(missing, cfg())
    assert src.skipped == 2 and any("frames file missing" in r for _, r in src.skipped_videos)
    with pytest.raises(ValueError, match="ref_min_distance"):
        LoopySampleSource(data_dir, cfg(ref_min_distance=0))


def test_samples_trace_to_their_source_frames(data_dir):
    c = cfg()
    src = LoopySampleSource(data_dir, c)
    src.store.max_open_files = 2  # files are closed and reopened while sampling 5 videos
    specs = src.epoch_specs(0)
    assert len(specs) == 5 * c.samples_per_video
    for spec in specs:
        s = src.load(spec)
        assert set(s) == set(SAMPLE_DTYPES) and all(s[k].dtype == SAMPLE_DTYPES[k] for k in s)
        assert {k: v.shape for k, v in s.items()} == src.sample_shapes()
        n, number = spec.num_frames, _number(src, spec.video_index)
        clip = np.arange(spec.clip_start, spec.clip_start + 12)
        assert s["latents"].shape == (12, 4, 8, 8)
        np.testing.assert_array_equal(s["clip_frame_indices"], clip)
        # clean latents of exactly these frames (no noise added), from this video
        np.testing.assert_array_equal(s["latents"][:, 0, 0, 0], clip)
        assert (s["latents"][:, 1] == number).all() and (s["latents"][:, 2:] == 0.5).all()
        # reference: its own frame, outside the clip, at least ref_min_distance away
        ref = int(s["ref_frame_index"])
        assert (s["ref_latent"][0] == ref).all() and (s["ref_latent"][1] == number).all()
        assert min(abs(ref - clip)) >= c.ref_min_distance
        # motion latents: time order, uniform abstraction, filled with the reference + mask False
        expected = _expected_uniform_sources(spec.clip_start)
        np.testing.assert_array_equal(s["motion_source_indices"], expected)
        np.testing.assert_array_equal(s["motion_mask"], expected >= 0)
        for m, i in enumerate(expected):
            want = i if i >= 0 else ref
            assert (s["motion_latents"][m, 0] == want).all()
        # audio window t-2..t+2, edge-replicated within the video
        win = np.clip(clip[:, None] + np.arange(-2, 3)[None], 0, n - 1)
        assert s["audio"].shape == (12, 5, 2, 4)
        np.testing.assert_array_equal(s["audio"][:, :, 0, 0], win)
        assert (s["audio"][:, :, 1] == number).all()
        np.testing.assert_allclose(s["landmarks"], synthetic_landmarks(clip, number))
        assert int(s["video_index"]) == spec.video_index
        assert len(src.store._files) <= 2


def test_audio_window_edges_and_empty_history(data_dir):
    src = LoopySampleSource(data_dir, cfg())
    v = next(v for v in src.videos if v.num_frames == 40)
    for start in (0, 40 - 12):
        spec = SampleSpec(v.video_index, v.video_id, 40, start, 12, 30 if start == 0 else 2,
                          False, False, False, False, 0)
        s = src.load(spec)
        first, last = s["audio"][0, :, 0, 0], s["audio"][-1, :, 0, 0]
        if start == 0:
            np.testing.assert_array_equal(first, [0, 0, 0, 1, 2])  # replicated, never zero vectors
            assert not s["motion_mask"].any() and (s["motion_source_indices"] == -1).all()
            assert (s["motion_latents"] == s["ref_latent"][None]).all()
        else:
            np.testing.assert_array_equal(last, [37, 38, 39, 39, 39])
            assert s["motion_mask"].sum() == 12  # 28 history frames = segments 4 + 8 + 16: 12 groups


def test_mean_abstraction_and_other_plan(data_dir):
    src = LoopySampleSource(data_dir, cfg(abstraction="mean"))
    v = next(v for v in src.videos if v.num_frames == 200)
    for start in (30, 150):
        s = src.load(SampleSpec(v.video_index, v.video_id, 200, start, 12, 5 if start > 50 else 100,
                                False, False, False, False, 0))
        # groups nearest first: sizes 1,1,1,1,2,...; mean of the group's frames inside the video
        groups, covered = [], 0
        for k in range(5):
            for j in range(4):
                lo = covered + j * 2**k
                groups.append([start - d - 1 for d in range(lo, lo + 2**k)])
            covered += 4 * 2**k
        groups = groups[::-1]
        for m, g in enumerate(groups):
            g = [i for i in g if i >= 0]
            want = np.mean(g) if g else int(s["ref_frame_index"])
            assert s["motion_latents"][m, 0, 0, 0] == pytest.approx(want, abs=1e-4)
            assert bool(s["motion_mask"][m]) == bool(g)
            assert s["motion_source_indices"][m] == (max(g) if g else -1)
    other = LoopySampleSource(data_dir, cfg(motion_frames=26, segment_stride=2, segment_ratio=3))
    v = next(v for v in other.videos if v.num_frames == 136)
    s = other.load(SampleSpec(v.video_index, v.video_id, 136, 100, 12, 10, False, False, False, False, 0))
    # spans 2, 6, 18: nearest-first picks -1,-2, -3,-6, -9,-18 -> time order
    np.testing.assert_array_equal(s["motion_source_indices"], 100 + np.array([-18, -9, -6, -3, -2, -1]))
    assert s["motion_latents"].shape == (6, 4, 8, 8)


def test_reads_only_the_rows_a_sample_needs(data_dir):
    src = LoopySampleSource(data_dir, cfg())
    calls = []
    real = src.store.read

    def spy(video_id, indices, columns):
        calls.append((list(indices), list(columns)))
        return real(video_id, indices, columns)

    src.store.read = spy
    v = next(v for v in src.videos if v.num_frames == 200)
    src.load(SampleSpec(v.video_index, v.video_id, 200, 180, 12, 3, False, False, False, False, 0))
    lat_rows = {i for idx, cols in calls if "latent" in cols for i in idx}
    other_rows = {i for idx, cols in calls if "latent" not in cols for i in idx}
    assert len(lat_rows) <= 12 + 1 + 20 and set(range(180, 192)) <= lat_rows
    assert other_rows == set(range(178, 194))  # the clip's audio window t-2..t+2
    assert all("audio" not in cols for idx, cols in calls if "latent" in cols)


def test_epoch_plan_is_deterministic(data_dir):
    a, b = LoopySampleSource(data_dir, cfg(seed=7)), LoopySampleSource(data_dir, cfg(seed=7))
    assert a.epoch_specs(3) == b.epoch_specs(3)
    assert a.epoch_specs(3) != a.epoch_specs(4)
    assert a.epoch_specs(3) != LoopySampleSource(data_dir, cfg(seed=8)).epoch_specs(3)
    spec = a.epoch_specs(3)[5]
    sa, sb = a.load(spec), b.load(spec)
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    # a video's samples do not depend on the other videos
    videos = a.videos
    full = {s for s in epoch_plan(videos, a.cfg, 1) if s.video_id == videos[0].video_id}
    alone = set(epoch_plan(videos[:1], a.cfg, 1))
    assert full == alone
    # clip starts cover the video (not always the same frames)
    starts = {s.clip_start for e in range(10) for s in a.epoch_specs(e) if s.num_frames == 200}
    assert len(starts) > 30 and max(starts) > 150


def test_reference_never_in_clip_over_many_draws():
    c = cfg(samples_per_video=1)
    for n in (24, 25, 30, 37, 60, 300):
        specs = draw_video_specs(VideoEntry(0, f"v{n}", n), c, 0, 2000)
        assert specs, n
        for s in specs:
            assert 0 <= s.clip_start <= n - 12 and 0 <= s.ref_index < n
            d = np.abs(s.ref_index - s.clip_frame_indices).min()
            assert d >= c.ref_min_distance, (n, s)
    # 30 frames: starts 7..11 would leave no reference frame 12 away -> never drawn
    assert set(valid_clip_starts(30, 12, 12)) == set(range(0, 7)) | {12, 13, 14, 15, 16, 17, 18}
    assert draw_video_specs(VideoEntry(0, "short", 23), c, 0, 5) == []


def _within(count, n, p, sigmas=5.0):
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p)) + 1


def test_switch_and_start_frequencies():
    c = cfg()
    n = 20000
    specs = draw_video_specs(VideoEntry(0, "long", 400), c, 0, n)
    cnt = lambda f: sum(bool(f(s)) for s in specs)  # noqa: E731
    assert _within(cnt(lambda s: s.drop_audio), n, c.p_drop_audio)
    p_mc = c.p_drop_audio + (1 - c.p_drop_audio) * c.p_drop_motion_cond
    assert _within(cnt(lambda s: s.drop_motion_cond), n, p_mc)
    assert _within(cnt(lambda s: s.drop_ref), n, c.p_drop_ref)
    p_mf = c.p_drop_ref + (1 - c.p_drop_ref) * c.p_drop_motion_frames
    assert _within(cnt(lambda s: s.drop_motion_frames), n, p_mf)
    assert all(s.drop_motion_frames for s in specs if s.drop_ref)
    assert _within(cnt(lambda s: s.drop_audio and s.drop_ref), n, c.p_drop_audio * c.p_drop_ref)
    kinds = Counter(s.a2l_kind for s in specs)
    assert set(kinds) == set(range(len(A2L_KINDS)))
    assert all(_within(kinds[k], n, 0.25) for k in kinds)
    # early starts: p drawn among starts < 124, the rest uniform over all 389 valid starts
    starts = valid_clip_starts(400, 12, 12)
    p_early = c.early_start_prob + (1 - c.early_start_prob) * np.mean(starts < 124)
    assert _within(cnt(lambda s: s.clip_start < 124), n, p_early)
    # evaluation: all off, audio conditions the audio-to-latents module
    ev = draw_video_specs(VideoEntry(0, "long", 400), c, 0, 500, evaluation=True)
    assert not any(s.drop_audio or s.drop_motion_cond or s.drop_ref or s.drop_motion_frames for s in ev)
    assert all(s.a2l_kind == 0 for s in ev)
    with pytest.raises(ValueError, match="p_drop_ref"):
        epoch_plan([], cfg(p_drop_ref=1.5), 0)


def test_guidance_conditions_are_trained():
    """One shared coin drops audio and motion latents together, so each condition the sampler's
    three-way guidance evaluates (inference/guidance.py) is a training condition at the
    predicted rate: e_ref 0.10 x 0.85 x 0.60 = 5.1 %, e_base 0.10 x 0.15 = 1.5 %."""
    c = cfg()
    n = 20000
    specs = draw_video_specs(VideoEntry(0, "long", 400), c, 0, n)
    assert all(s.drop_audio == s.drop_motion_cond for s in specs)  # default: the coin is shared
    sw = guidance_switches(1)
    predicted = {
        "audio": (1 - c.p_drop_audio) * (1 - c.p_drop_ref) * (1 - c.p_drop_motion_frames),
        "ref": c.p_drop_audio * (1 - c.p_drop_ref) * (1 - c.p_drop_motion_frames),
        "base": c.p_drop_audio * c.p_drop_ref,
    }
    for i, name in enumerate(CONDITIONS):
        want = (bool(sw.drop_audio[i]), bool(sw.drop_motion_cond[i]), bool(sw.drop_ref[i]),
                bool(sw.drop_motion_frames[i]))
        count = sum((s.drop_audio, s.drop_motion_cond, s.drop_ref, s.drop_motion_frames) == want for s in specs)
        assert _within(count, n, predicted[name]), (name, count / n)
        assert count / n >= 0.01, name
    # an extra motion-latents-only drop is possible, on top of the shared coin
    extra = cfg(p_drop_motion_cond=0.2)
    specs = draw_video_specs(VideoEntry(0, "long", 400), extra, 0, n)
    assert all(s.drop_motion_cond for s in specs if s.drop_audio)
    only = sum(s.drop_motion_cond and not s.drop_audio for s in specs)
    assert _within(only, n, (1 - extra.p_drop_audio) * 0.2)


def test_ddp_sharding_disjoint_and_complete(data_dir):
    c = cfg(samples_per_video=7)
    full = LoopyTorchDataset(data_dir, c, epoch=2).specs
    shards = [LoopyTorchDataset(data_dir, c, epoch=2, rank=r, world_size=3).specs for r in range(3)]
    assert sum(len(s) for s in shards) == len(full) == 35
    assert Counter(x for s in shards for x in s) == Counter(full)
    positions = [set(range(r, len(full), 3)) for r in range(3)]
    assert all(shards[r] == [full[i] for i in sorted(positions[r])] for r in range(3))
    with pytest.raises(ValueError):
        shard(full, 3, 3)


def test_torch_dataloader_collates_contract_tensors(data_dir):
    ds = LoopyTorchDataset(data_dir, cfg(), epoch=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["latents"].shape == (4, 12, 4, 8, 8) and batch["latents"].dtype == torch.float32
    assert batch["audio"].shape == (4, 12, 5, 2, 4)
    assert batch["motion_latents"].shape == (4, 20, 4, 8, 8) and batch["motion_mask"].dtype == torch.bool
    for k, t in batch.items():
        assert t.is_contiguous() and t.shape[0] == 4
        assert t.dtype == torch.from_numpy(np.zeros(1, SAMPLE_DTYPES[k])).dtype, k
    for k in ("head_motion_var", "expression_var", "drop_ref", "a2l_kind", "video_index", "ref_frame_index"):
        assert batch[k].shape == (4,)


def test_stage1_one_frame_and_reference(data_dir):
    src = LoopySampleSource(data_dir, cfg(stage=1))
    for spec in src.epoch_specs(0):
        s = src.load(spec)
        assert s["latents"].shape == (1, 4, 8, 8)
        assert {k: v.shape for k, v in s.items()} == src.sample_shapes()
        assert not {"motion_latents", "motion_mask", "motion_source_indices", "audio"} & set(s)
        assert s["latents"][0, 0, 0, 0] == spec.clip_start
        assert abs(int(s["ref_frame_index"]) - spec.clip_start) >= 12
        assert s["ref_latent"][0, 0, 0] == spec.ref_index
        assert not s["drop_audio"] and not s["drop_motion_cond"] and s["drop_motion_frames"]
    # the 20-frame video fits one frame + a reference 12 frames away
    assert src.skipped == 0
    batch = collate([src.load(x) for x in src.epoch_specs(0)[:3]])
    assert batch["latents"].shape == (3, 1, 4, 8, 8)


def test_cli_prints_json_lines(data_dir, capsys):
    assert main([str(data_dir), "--show", "2", "reader.seed=3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    info = json.loads(lines[0])
    assert info["video_id"].startswith("synth") and len(info["clip_frame_indices"]) == 12
    assert len(info["motion_source_indices"]) == 20 and len(info["motion_mask"]) == 20
    assert info["tensors"]["audio"] == {"shape": [12, 5, 2, 4], "dtype": "float32"}
    assert set(info["switches"]) == {"drop_audio", "drop_motion_cond", "drop_ref", "drop_motion_frames"}
    assert main([str(data_dir / "frames"), "--show", "1"]) == 2


@pytest.mark.slow
def test_ray_dataset_matches_torch_dataset(data_dir, ray_local):
    c = cfg(samples_per_video=3)
    ds = build_ray_dataset(data_dir, c, epoch=1, batch_size=4)
    got = {}
    for batch in ds.iter_torch_batches(batch_size=5, collate_fn=ray_collate_fn()):
        assert batch["latents"].dtype == torch.float32 and batch["motion_mask"].dtype == torch.bool
        for i in range(len(batch["video_index"])):
            key = (int(batch["video_index"][i]), int(batch["clip_frame_indices"][i, 0]),
                   int(batch["ref_frame_index"][i]), bool(batch["drop_ref"][i]))
            got.setdefault(key, {k: v[i].numpy() for k, v in batch.items()})
    src = LoopySampleSource(data_dir, c)
    specs = src.epoch_specs(1)
    assert len(got) == len({(s.video_index, s.clip_start, s.ref_index, s.drop_ref) for s in specs})
    for spec in specs[:4]:
        want = src.load(spec)
        have = got[(spec.video_index, spec.clip_start, spec.ref_index, spec.drop_ref)]
        assert all(np.array_equal(want[k], have[k]) for k in want)
    assert dataclasses.asdict(c)["stage"] == 2


def test_unreadable_frames_name_the_file_and_ray_batches_go_on(data_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    src = LoopySampleSource(broken, cfg(samples_per_video=2))
    specs = src.epoch_specs(0)
    good = next(s for s in specs if s.video_id != video_id_of(1))
    bad = next(s for s in specs if s.video_id == video_id_of(1))
    frames_path(broken, video_id_of(1)).write_bytes(b"not parquet at all")
    with pytest.raises(SampleReadError, match=f"{video_id_of(1)}.parquet"):
        src.load(bad)
    rows = [good.to_row(), bad.to_row()]
    batch = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    out = load_spec_batch(batch, str(broken), dataclasses.asdict(src.cfg), "train")
    assert out["latents"].shape == (1, 12, 4, 8, 8) and int(out["ref_frame_index"][0]) == good.ref_index
    only_bad = {k: v[1:] for k, v in batch.items()}
    empty = load_spec_batch(only_bad, str(broken), dataclasses.asdict(src.cfg), "train")
    assert set(empty) == set(SAMPLE_DTYPES) and empty["audio"].shape == (0, 12, 5, 2, 4)
    assert empty["motion_mask"].dtype == bool
