"""Per-frame audio features: wav2vec2 hidden states of every transformer layer, one vector per
video frame, plus the 5-frame audio window (t-2..t+2) shared by the training reader and the sampler.

Shapes: ``N`` video frames, ``L`` transformer layers, ``D`` hidden size; ``F`` selected frames.

Alignment rule (one implementation for ingest and inference):

* Video frame ``k`` (0-based, at ``fps``) is on screen during [k/fps, (k+1)/fps); its audio time is
  the centre of that interval, ``t_k = (k + 0.5) / fps`` seconds (for 25 fps: 0.02 s, 0.06 s, ...).
  The number of frames ``N`` always comes from the video, never from the audio length.
* wav2vec2 is run over the whole utterance (long audio: overlapping windows, below). Its output
  vector ``j`` summarises the samples [j*hop, j*hop + rf) of its convolutional front end (hop 320,
  receptive field 400 samples at 16 kHz for the base model: ~50 Hz); it is placed at the centre of
  that span, ``tau_j = (j*hop + rf/2) / sample_rate`` = 0.0125 s + 0.02 s * j.
* The layer outputs are resampled afterwards (not the CNN features before the transformer):
  frame k gets the linear interpolation of the two vectors around ``t_k`` at fractional position
  ``p_k = (t_k*sample_rate - rf/2) / hop``, clamped to [0, T-1] (the first/last vector is repeated
  beyond the ends). Every transformer layer is resampled the same way.
* A click at time t therefore lands mostly on frame ``floor(t * fps)`` (the frame on screen when it
  is heard; a click near a frame boundary is shared by the two frames).
* Audio shorter than the video by more than one frame (N/fps - n/sample_rate > 1/fps) raises
  AudioLengthError; shorter by less, the last vector is repeated; longer audio is ignored beyond the
  last frame. Nothing is silently padded.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from core.weights import load_pretrained
from pipelines.errors import PipelineError


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
    if isinstance(features, torch.Tensor):  # index with a tensor on the same device
        return features[torch.as_tensor(idx, device=features.device)]
    return features[idx]


# ---------------------------------------------------------------------------------------------
# wav2vec2 features aligned to video frames
# ---------------------------------------------------------------------------------------------


class AudioLengthError(PipelineError, ValueError):
    """The audio is shorter than the video by more than one frame."""


def frame_count_for(duration_s: float, fps: float = 25.0) -> int:
    """Number of whole frames at ``fps`` that ``duration_s`` seconds of audio cover:
    ``floor(duration_s * fps)`` (with a 1e-6 tolerance for float rounding). Used when the number of
    frames comes from the audio (inference on an audio clip)."""
    if duration_s < 0 or fps <= 0:
        raise ValueError(f"frame_count_for: need duration_s >= 0 and fps > 0, got {duration_s}, {fps}")
    return int(math.floor(duration_s * fps + 1e-6))


def frame_times(num_frames: int, fps: float = 25.0) -> np.ndarray:
    """Audio time of each video frame in seconds: float64 [num_frames], ``(k + 0.5) / fps``."""
    return (np.arange(num_frames, dtype=np.float64) + 0.5) / fps


def conv_frontend_geometry(conv_kernel, conv_stride) -> tuple[int, int]:
    """(hop, receptive_field) in samples of a stack of 1-D convolutions (wav2vec2 front end)."""
    hop, rf = 1, 1
    for k, s in zip(conv_kernel, conv_stride):
        rf += (int(k) - 1) * hop
        hop *= int(s)
    return hop, rf


def conv_output_length(num_samples: int, conv_kernel, conv_stride) -> int:
    """Number of feature vectors the front end produces for ``num_samples`` samples (0 if too short)."""
    n = int(num_samples)
    for k, s in zip(conv_kernel, conv_stride):
        if n < k:
            return 0
        n = (n - int(k)) // int(s) + 1
    return n


def feature_positions(num_frames: int, fps: float, num_vectors: int, sample_rate: int = 16000,
                      hop: int = 320, receptive_field: int = 400) -> np.ndarray:
    """Fractional index into the wav2vec2 output sequence (length ``num_vectors``) for each frame:
    float64 [num_frames], ``p_k = (t_k*sample_rate - rf/2) / hop`` clamped to [0, num_vectors-1]
    with ``t_k = (k + 0.5) / fps`` (see the module docstring)."""
    if num_vectors < 1:
        raise ValueError("feature_positions: need at least one feature vector")
    pos = (frame_times(num_frames, fps) * sample_rate - receptive_field / 2.0) / hop
    return np.clip(pos, 0.0, num_vectors - 1)


def interpolate_at(sequence: np.ndarray, positions: np.ndarray, offset: int = 0) -> np.ndarray:
    """Linear interpolation of ``sequence`` [T, ...] at fractional ``positions`` [F] (global indices;
    ``sequence[0]`` is global index ``offset``) -> [F, ...]. Positions must lie in
    [offset, offset + T - 1]."""
    lo = np.floor(positions).astype(np.int64)
    hi = np.minimum(lo + 1, offset + sequence.shape[0] - 1)
    w = (positions - lo).astype(sequence.dtype).reshape((-1,) + (1,) * (sequence.ndim - 1))
    a, b = sequence[lo - offset], sequence[hi - offset]
    return a + w * (b - a)


class AudioFeatureExtractor:
    """wav2vec2 hidden states of every transformer layer, one vector per video frame.

    ``location``: a transformers folder or hub id holding ``Wav2Vec2Model`` weights and a
    ``Wav2Vec2FeatureExtractor`` config (the tiny preset folder, ``facebook/wav2vec2-base-960h``),
    loaded with ``core.weights.load_pretrained``.

    ``num_layers`` counts transformer layers only (12 for base, 2 for tiny): ``hidden_states[0]``
    (the CNN features after the feature projection and before any transformer layer) is NOT included.
    ``dim`` is the hidden size (768 for base).

    Long audio is processed in windows of ``window_s`` seconds overlapping by ``context_s`` seconds
    on each side: each window keeps only its centre part (its first/last ``context_s`` are context
    for the attention), and the centres tile the utterance. Memory is thus bounded by one window,
    not by the audio length (attention is quadratic in the window, not in the utterance). The input
    is normalised once over the whole utterance by the feature extractor (zero mean, unit variance)
    before it is cut into windows. Note: the base model's first conv layer uses GroupNorm over time
    (``feat_extract_norm="group"``), so windowed output equals whole-utterance output only
    approximately (same statistics up to the window's).

    Frame alignment: see the module docstring (frame k <-> audio time (k + 0.5) / fps).
    """

    def __init__(self, location: str, local_files_only: bool = True, device: str = "cpu",
                 window_s: float = 20.0, context_s: float = 2.0, dtype: torch.dtype = torch.float32):
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

        if window_s <= 2 * context_s:
            raise ValueError(f"AudioFeatureExtractor: window_s ({window_s}) must exceed 2 * context_s ({context_s})")
        self.location = str(location)
        self.device = torch.device(device)
        self.dtype = dtype
        self.window_s = float(window_s)
        self.context_s = float(context_s)
        self.feature_extractor = load_pretrained(Wav2Vec2FeatureExtractor, self.location, local_files_only)
        model = load_pretrained(Wav2Vec2Model, self.location, local_files_only)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        cfg = self.model.config
        self._conv_kernel = list(cfg.conv_kernel)
        self._conv_stride = list(cfg.conv_stride)
        self.hop_samples, self.receptive_field_samples = conv_frontend_geometry(cfg.conv_kernel, cfg.conv_stride)

    # -- geometry ------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """Transformer layers kept (hidden_states[1:]); the CNN/embedding output is not included."""
        return int(self.model.config.num_hidden_layers)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def sample_rate(self) -> int:
        """Input sample rate in Hz (16000 for wav2vec2)."""
        return int(self.feature_extractor.sampling_rate)

    @property
    def feature_rate_hz(self) -> float:
        return self.sample_rate / self.hop_samples

    def num_vectors(self, num_samples: int) -> int:
        """Length T of the ~50 Hz output sequence for ``num_samples`` input samples."""
        return conv_output_length(num_samples, self._conv_kernel, self._conv_stride)

    # -- extraction ----------------------------------------------------------------------------
    def normalize(self, samples: np.ndarray) -> np.ndarray:
        """The feature extractor's input transform over the whole utterance (zero mean, unit
        variance when its ``do_normalize`` is set): float32 [n]."""
        out = self.feature_extractor(samples, sampling_rate=self.sample_rate, return_tensors="np")
        return np.asarray(out["input_values"][0], dtype=np.float32)

    def _run(self, values: np.ndarray):
        """All transformer layers' hidden states for one span: float32 [T_span, L, D]."""
        x = torch.from_numpy(np.ascontiguousarray(values)).to(device=self.device, dtype=self.dtype)[None]
        out = self.model(x, output_hidden_states=True)
        return torch.stack(out.hidden_states[1:], dim=2)[0].float().cpu().numpy()

    def window_plan(self, num_vectors: int) -> list[tuple[int, int, int, int]]:
        """Windows over the output sequence as (w0, w1, c0, c1) feature indices: the model runs on
        vectors [w0, w1) and keeps the centre [c0, c1). Centres tile [0, num_vectors)."""
        per_s = self.sample_rate / self.hop_samples
        win = max(1, int(round(self.window_s * per_s)))
        ctx = int(round(self.context_s * per_s))
        if num_vectors <= win:
            return [(0, num_vectors, 0, num_vectors)]
        core = win - 2 * ctx
        plan = []
        for c0 in range(0, num_vectors, core):
            c1 = min(num_vectors, c0 + core)
            # right context >= 1 so the interpolation's upper neighbour of the last centre vector is present
            plan.append((max(0, c0 - ctx), min(num_vectors, c1 + max(ctx, 1)), c0, c1))
        return plan

    def __call__(self, samples: np.ndarray, num_frames: int, fps: float = 25.0) -> np.ndarray:
        """Per-frame features of one utterance.

        ``samples``: float32 [n] mono at ``sample_rate`` (16 kHz). ``num_frames``: frames of the
        video (N). Returns float32 [N, num_layers, dim]; row k is frame k's audio (alignment rule: module docstring).
        Raises AudioLengthError when the audio is shorter than N/fps by more than one frame.
        """
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"AudioFeatureExtractor: samples must be mono [n], got shape {samples.shape}")
        if num_frames < 1:
            raise ValueError(f"AudioFeatureExtractor: num_frames must be >= 1, got {num_frames}")
        sr = self.sample_rate
        audio_s, video_s = samples.shape[0] / sr, num_frames / fps
        if video_s - audio_s > 1.0 / fps + 1e-9:
            raise AudioLengthError(
                f"audio is {audio_s:.3f} s ({samples.shape[0]} samples at {sr} Hz) but the video needs "
                f"{video_s:.3f} s ({num_frames} frames at {fps:g} fps): shorter by more than one frame")
        total = self.num_vectors(samples.shape[0])
        if total < 1:
            raise AudioLengthError(
                f"audio is {audio_s:.4f} s ({samples.shape[0]} samples): shorter than wav2vec2's "
                f"receptive field ({self.receptive_field_samples} samples)")
        values = self.normalize(samples)
        pos = feature_positions(num_frames, fps, total, sr, self.hop_samples, self.receptive_field_samples)
        lower = np.floor(pos).astype(np.int64)
        out = np.empty((num_frames, self.num_layers, self.dim), dtype=np.float32)
        hop, rf = self.hop_samples, self.receptive_field_samples
        with torch.inference_mode():
            for w0, w1, c0, c1 in self.window_plan(total):
                sel = np.nonzero((lower >= c0) & (lower < c1))[0]
                if sel.size == 0:
                    continue
                span = values[w0 * hop:(w1 - 1) * hop + rf]
                hidden = self._run(span)  # [w1 - w0, L, D]
                if hidden.shape[0] != w1 - w0:  # geometry guard: the plan must match the model
                    raise RuntimeError(f"wav2vec2 returned {hidden.shape[0]} vectors for a span planned as {w1 - w0}")
                out[sel] = interpolate_at(hidden, pos[sel], offset=w0)
        return out
