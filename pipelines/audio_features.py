"""Per-frame audio features: wav2vec2 hidden states of every transformer layer, one vector per
video frame, plus the 5-frame audio window (t-2..t+2) shared by the training reader and the sampler.

Shapes: ``N`` video frames, ``L`` transformer layers, ``D`` hidden size; ``F`` selected frames.
"""
from __future__ import annotations

import numpy as np


def audio_window_indices(frame_indices: np.ndarray, num_frames: int, radius: int = 2) -> np.ndarray:
    """Frame indices of the audio window around each frame, edge-replicated.

    ``frame_indices``: int [F] (0-based frames of one video at 25 fps). Returns int64
    [F, 2*radius+1] = ``frame_indices[:, None] + arange(-radius, radius+1)`` clamped to
    ``[0, num_frames-1]``: before the first frame the first frame repeats, after the last frame
    the last frame repeats (never zero vectors: zero is a real feature value).
    """
    if num_frames < 1:
        raise ValueError(f"audio_window_indices: num_frames must be >= 1, got {num_frames}")
    if radius < 0:
        raise ValueError(f"audio_window_indices: radius must be >= 0, got {radius}")
    idx = np.asarray(frame_indices, dtype=np.int64)
    if idx.ndim != 1:
        raise ValueError(f"audio_window_indices: frame_indices must be 1-D [F], got shape {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= num_frames):
        raise ValueError(
            f"audio_window_indices: frame indices must lie in [0, {num_frames - 1}], "
            f"got min {idx.min()} max {idx.max()}"
        )
    offsets = np.arange(-radius, radius + 1, dtype=np.int64)
    return np.clip(idx[:, None] + offsets[None, :], 0, num_frames - 1)


def audio_windows(features: np.ndarray, radius: int = 2, frame_indices: np.ndarray | None = None
                  ) -> np.ndarray:
    """The audio window of each frame: features [N, L, D] -> [F, 2*radius+1, L, D].

    Window ``w`` of frame ``t`` is the feature of frame ``t - radius + w`` with edge replication
    (see :func:`audio_window_indices`). ``frame_indices`` selects the frames (default: all N,
    F = N); ``features`` must then be the whole video's features so the neighbours are the real
    neighbours. Works for numpy arrays and torch tensors (same indexing).
    """
    num_frames = int(features.shape[0])
    if frame_indices is None:
        frame_indices = np.arange(num_frames)
    idx = audio_window_indices(frame_indices, num_frames, radius)
    if not isinstance(features, np.ndarray):  # torch.Tensor: index with a tensor of the same device
        import torch

        return features[torch.as_tensor(idx, device=features.device)]
    return features[idx]
