import numpy as np
import pytest
import torch

from core.temporal_segment import TemporalSegmentModule, make_plan


def test_paper_plan_s4_r2():
    plan = make_plan(124, 4, 2)
    assert plan.segment_spans() == [4, 8, 16, 32, 64]
    assert plan.num_outputs == 20
    # every history frame is in exactly one group
    allofs = sorted(o for g in plan.group_offsets for o in g)
    assert allofs == list(range(-124, 0))
    # time order: groups go from oldest to newest, sizes 64/16=... nearest segment last
    sizes = [len(g) for g in plan.group_offsets]
    assert sizes == [16] * 4 + [8] * 4 + [4] * 4 + [2] * 4 + [1] * 4
    assert plan.group_offsets[-1] == (-1,)
    assert plan.group_offsets[0] == tuple(range(-124, -108))
    # uniform picks the group's nearest frame
    uni = plan.source_offsets("uniform")
    assert list(uni[-4:]) == [-4, -3, -2, -1]
    assert list(uni[:4]) == [-109, -93, -77, -61]


@pytest.mark.parametrize("s,r,t,spans", [(2, 3, 26, [2, 6, 18]), (3, 1, 9, [3, 3, 3]), (1, 2, 7, [1, 2, 4])])
def test_other_plans(s, r, t, spans):
    plan = make_plan(t, s, r)
    assert plan.segment_spans() == spans
    assert plan.num_outputs == s * len(spans)
    assert sorted(o for g in plan.group_offsets for o in g) == list(range(-t, 0))


def test_invalid_history_length():
    with pytest.raises(ValueError, match="valid lengths"):
        make_plan(100, 4, 2)


def _history(b=2, t=124, c=1, h=1, w=1):
    # value = time position, so outputs reveal which frames were taken
    x = torch.arange(t, dtype=torch.float32).view(1, t, 1, 1, 1).expand(b, t, c, h, w).clone()
    return x


def test_uniform_and_mean_full_history():
    hist = _history()
    valid = torch.ones(2, 124, dtype=torch.bool)
    fill = torch.full((2, 1, 1, 1), -5.0)
    uni, mask = TemporalSegmentModule(124, 4, 2, "uniform")(hist, valid, fill)
    assert uni.shape == (2, 20, 1, 1, 1) and mask.all()
    # position p corresponds to offset p - 124; uniform takes each group's nearest frame
    expect = [124 + o for o in make_plan().source_offsets("uniform")]
    assert uni[0, :, 0, 0, 0].tolist() == expect
    mean, mask = TemporalSegmentModule(124, 4, 2, "mean")(hist, valid, fill)
    expect_mean = [np.mean([124 + o for o in g]) for g in make_plan().group_offsets]
    assert np.allclose(mean[0, :, 0, 0, 0].numpy(), expect_mean)


def test_short_history_is_filled_with_reference_and_masked():
    hist = _history()
    valid = torch.zeros(2, 124, dtype=torch.bool)
    valid[:, -11:] = True  # only 11 frames precede the clip
    fill = torch.full((2, 1, 1, 1), -5.0)
    for abstraction in ("uniform", "mean"):
        out, mask = TemporalSegmentModule(124, 4, 2, abstraction)(hist, valid, fill)
        # outputs whose groups reach into the last 10 frames are valid
        plan = make_plan()
        expect_mask = [any(o >= -11 for o in g) if abstraction == "mean" else g[-1] >= -11
                       for g in plan.group_offsets]
        assert mask[0].tolist() == expect_mask
        assert (out[0, ~mask[0], 0, 0, 0] == -5.0).all()
        if abstraction == "mean":
            # group (-12, -11) is half valid: mean of its valid frame only
            m = [i for i, g in enumerate(plan.group_offsets) if g == (-12, -11)][0]
            assert out[0, m, 0, 0, 0].item() == pytest.approx(113.0)


def test_source_indices_near_video_start():
    mod = TemporalSegmentModule(124, 4, 2, "uniform")
    idx = mod.source_indices(clip_start=5)
    assert idx.shape == (20, 1)
    assert idx[-4:, 0].tolist() == [1, 2, 3, 4]
    assert (idx[:-5] == -1).all()
