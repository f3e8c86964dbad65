"""Audio decode, wav2vec2 feature alignment and the audio window (pipelines/audio_*.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.audio_features import audio_window_indices, audio_windows


def test_audio_window_indices_edge_replication():
    idx = audio_window_indices(np.array([0, 1, 5, 8, 9]), num_frames=10, radius=2)
    assert idx.dtype == np.int64 and idx.shape == (5, 5)
    np.testing.assert_array_equal(idx[0], [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(idx[1], [0, 0, 1, 2, 3])
    np.testing.assert_array_equal(idx[2], [3, 4, 5, 6, 7])
    np.testing.assert_array_equal(idx[3], [6, 7, 8, 9, 9])
    np.testing.assert_array_equal(idx[4], [7, 8, 9, 9, 9])
    # a one-frame video repeats its only frame
    np.testing.assert_array_equal(audio_window_indices(np.array([0]), 1, 3), [[0] * 7])
    with pytest.raises(ValueError, match="lie in"):
        audio_window_indices(np.array([10]), num_frames=10)


def test_audio_windows_replicate_edges_not_zero():
    n, L, D = 6, 3, 4
    feats = (np.arange(n * L * D, dtype=np.float32).reshape(n, L, D) + 1.0)
    win = audio_windows(feats, radius=2)
    assert win.shape == (n, 5, L, D)
    assert (win != 0).all()  # no zero padding anywhere
    np.testing.assert_array_equal(win[0, 0], feats[0])
    np.testing.assert_array_equal(win[0, 1], feats[0])
    np.testing.assert_array_equal(win[0, 2], feats[0])
    np.testing.assert_array_equal(win[0, 4], feats[2])
    np.testing.assert_array_equal(win[3, :, 1], feats[1:6, 1])
    np.testing.assert_array_equal(win[n - 1, 4], feats[n - 1])
    sel = audio_windows(feats, radius=1, frame_indices=np.array([5, 2]))
    assert sel.shape == (2, 3, L, D)
    np.testing.assert_array_equal(sel[0], feats[[4, 5, 5]])
    np.testing.assert_array_equal(sel[1], feats[[1, 2, 3]])
    t = audio_windows(torch.from_numpy(feats), radius=2)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), win)
