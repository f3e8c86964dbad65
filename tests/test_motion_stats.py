import math

import numpy as np
import pytest

from pipelines.faces.motion_stats import (
    NOSE_TIP,
    UPPER_FACE,
    MotionStats,
    clip_motion_stats,
    expression_var,
    head_motion_var,
    motion_stats_ratio,
)


def test_layout_matches_paper_definition():
    # docs/METHOD.md: brows, nose and eyes 17-47 plus jaw points 0-2 and 14-16; 30 = nose tip
    assert NOSE_TIP == 30
    assert len(UPPER_FACE) == 37 == len(set(UPPER_FACE))
    assert set(UPPER_FACE) == set(range(17, 48)) | {0, 1, 2, 14, 15, 16}
    assert not set(UPPER_FACE) & set(range(48, 68))  # mouth excluded
    assert not set(UPPER_FACE) & set(range(3, 14))  # lower jaw / chin excluded


def test_head_motion_var_by_hand():
    lm = np.zeros((3, 68, 2), np.float32)
    lm[:, NOSE_TIP, 0] = [0.1, 0.2, 0.3]
    lm[:, NOSE_TIP, 1] = [0.5, 0.5, 0.8]
    # var x = mean((-.1, 0, .1)^2) = 0.02/3 ; var y: mean 0.6 -> (.01 + .01 + .04)/3 = 0.02
    expected = 0.02 / 3 + 0.02
    assert float(head_motion_var(lm)) == pytest.approx(expected, rel=1e-5)
    lm[:, 0, :] += np.array([[0.0, 0.0], [0.3, 0.1], [0.9, 0.9]])  # other points: no effect
    assert float(head_motion_var(lm)) == pytest.approx(expected, rel=1e-5)


def _expression_var_loops(lm):
    total = 0.0
    for p in UPPER_FACE:
        for c in range(2):
            rel = [lm[t, p, c] - lm[t, NOSE_TIP, c] for t in range(lm.shape[0])]
            m = sum(rel) / len(rel)
            total += sum((r - m) ** 2 for r in rel) / len(rel)
    return total / len(UPPER_FACE)


def test_expression_var_against_loops():
    rng = np.random.default_rng(3)
    lm = rng.random((12, 68, 2)).astype(np.float32)
    assert float(expression_var(lm)) == pytest.approx(_expression_var_loops(lm.astype(np.float64)), rel=1e-5)


def test_expression_ignores_head_translation_and_mouth():
    rng = np.random.default_rng(0)
    lm = (0.5 + 0.01 * rng.standard_normal((12, 68, 2))).astype(np.float64)
    exp0, mov0 = float(expression_var(lm)), float(head_motion_var(lm))
    moved = lm + rng.standard_normal((12, 1, 2)) * 0.05  # whole face moves per frame
    assert float(expression_var(moved)) == pytest.approx(exp0, rel=1e-4)
    assert float(head_motion_var(moved)) > 10 * mov0
    talking = lm.copy()
    talking[:, 48:68, 1] += 0.1 * np.sin(np.arange(12))[:, None]  # mouth opens and closes
    assert float(expression_var(talking)) == pytest.approx(exp0, rel=1e-6)
    raised = lm.copy()
    raised[:, 17:27, 1] += 0.05 * np.sin(np.arange(12))[:, None]  # brows move
    assert float(expression_var(raised)) > 2 * exp0


def test_batched_shapes_and_errors():
    rng = np.random.default_rng(1)
    lm = rng.random((3, 12, 68, 2))
    mov, exp = head_motion_var(lm), expression_var(lm)
    assert mov.shape == (3,) and exp.shape == (3,) and mov.dtype == np.float32
    assert mov[1] == pytest.approx(float(head_motion_var(lm[1])))
    with pytest.raises(ValueError, match="68, 2"):
        head_motion_var(np.zeros((12, 5, 2)))


def test_clip_stats_with_valid_mask():
    rng = np.random.default_rng(2)
    lm = rng.random((40, 68, 2))
    valid = np.ones(40, bool)
    valid[::3] = False
    st = clip_motion_stats(lm, valid)
    assert st.frames == int(valid.sum())
    assert st.glo == pytest.approx(float(head_motion_var(lm[valid])), rel=1e-6)
    assert st.exp == pytest.approx(float(expression_var(lm[valid])), rel=1e-6)
    one = clip_motion_stats(lm[:1])
    assert math.isnan(one.glo) and math.isnan(one.exp)
    ratio = motion_stats_ratio(MotionStats(2.0, 1.0, 10), MotionStats(4.0, 0.0, 10))
    assert ratio["glo_ratio"] == 0.5 and math.isnan(ratio["exp_ratio"])
