"""The learned evaluation metrics FID and FVD: Fréchet distances between features of generated and
real frames (FID) or clips (FVD), from feature networks the user gives by path (never downloaded).

Interface of the networks (docs/EVALUATION.md, "FID and FVD"):

* **FID** (``evaluation.fid_weights_path``): a TorchScript file (``torch.jit.load``) mapping
  float32 frames ``[N, 3, H, W]`` with values in ``[0, 1]`` (RGB), ``H = W =
  evaluation.fid_input_size`` (default 299), to features ``[N, D]`` (``[N, D, 1, 1]`` is
  accepted and flattened). The standard FID network is Inception-v3's pool3 layer (D = 2048,
  299 x 299 input); the network does its own input normalisation (e.g. to ``[-1, 1]``).
* **FVD** (``evaluation.fvd_weights_path``): a TorchScript video network mapping float32 clips
  ``[N, 3, T, H, W]`` with values in ``[-1, 1]``, ``T = evaluation.fvd_clip_frames`` (16),
  ``H = W = evaluation.fvd_input_size`` (224), to features ``[N, D]``. The standard FVD detector
  is the Kinetics-400 I3D distributed as ``i3d_torchscript.pt`` (StyleGAN-V and others), called
  with the keyword arguments ``rescale=False, resize=False, return_features=True`` (the
  400-d logits before the softmax): ``evaluation.fvd_call_convention = "i3d"``; ``"plain"`` calls
  ``net(x)`` for a network of one argument.

Frames are uint8 ``[T, S, S, 3]`` (what the evaluation compares), resized (bilinear) to the
network's input size. FID pools every generated and every real frame of the split (a per-video
FID from a few dozen correlated frames of one face is meaningless); FVD cuts each video into
non-overlapping clips of ``fvd_clip_frames`` frames (a tail shorter than a clip is dropped) and
pools the clips of the split. Features are small (``[frames, D]`` float32 per video), so the job
returns them per video and computes the distances at the end (:func:`learned_metric_values`).

Fréchet distance of two Gaussians (Dowson & Landau 1982; FID: Heusel et al. 2017):
``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``, in squared feature units.

**LSE-D / LSE-C** (``evaluation.syncnet_path``; the Wav2Lip evaluation of ``syncnet_python``),
per video: a TorchScript SyncNet pair ``net(lip, mfcc) -> (lip_emb [B, D], audio_emb [B, D])``
with ``lip`` float32 ``[B, 3, 5, 224, 224]`` (5 consecutive frames, BGR channel order, values
0..255 as ``cv2.imread`` gives them) and ``mfcc`` float32 ``[B, 1, 13, 20]`` (13 MFCCs of
``python_speech_features.mfcc`` on the 16 kHz int16 waveform, 100 steps a second; window ``v``
holds steps ``4v .. 4v+19``, the 0.2 s that go with frames ``v .. v+4`` at 25 fps). For every
window the distance between its lip embedding and the audio embeddings at offsets -15..+15
windows (zero vectors outside the video) is taken, averaged over the windows: LSE-D is the
smallest mean distance, LSE-C the median of the 31 means minus that minimum.
The frames are this evaluation's face crops resized to 224, not SyncNet's own S3FD crops, so the
values compare models on this platform and are close to, not the same as, published figures.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import python_speech_features
import scipy.linalg
import torch
import torch.nn.functional as F

from core.paths import project_path
from core.sections import EvaluationConfig
from inference.errors import InferenceError

#: Added to both covariances' diagonals when the matrix square root of their product is not
#: finite (a singular covariance: fewer samples than feature dimensions); the value of the
#: TTUR / pytorch-fid reference implementations of FID.
FRECHET_EPS = 1e-6
#: Largest imaginary part (relative to the largest real magnitude) of ``sqrtm(S1 S2)``'s diagonal
#: accepted as round-off; beyond it the square root is retried with FRECHET_EPS on the diagonals.
IMAG_TOLERANCE = 1e-3

#: The metrics of this module and the config field that names each network.
WEIGHT_FIELDS = {"fid": "fid_weights_path", "fvd": "fvd_weights_path"}
#: SyncNet's input convention (module docstring): 25 fps video, 16 kHz audio, 5-frame windows of
#: 224 px crops, 20 MFCC steps (4 a frame) a window, offsets -15..+15 searched.
SYNC_FPS, SYNC_SAMPLE_RATE, SYNC_WINDOW, SYNC_SIZE = 25.0, 16000, 5, 224
MFCC_STEPS_PER_FRAME, MFCC_WINDOW, LSE_VSHIFT = 4, 20, 15
#: Per-video keys written by :meth:`SyncNetwork.scores` (``_gt``: the real frames).
LSE_KEYS = ("lse_d", "lse_c", "lse_d_gt", "lse_c_gt")

#: Keyword arguments of each ``evaluation.fvd_call_convention``.
FVD_CALL_KWARGS = {"i3d": {"rescale": False, "resize": False, "return_features": True}, "plain": {}}


class LearnedMetricError(InferenceError, ValueError):
    """A feature network that cannot be used (missing file, not TorchScript, wrong output shape);
    the message names the config field and the path."""


# --- Fréchet distance ------------------------------------------------------------------------------

def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``features`` ``[N, D]``, N >= 2."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features of shape {list(x.shape)}: need [N, D] with N >= 2 for a covariance")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FRECHET_EPS) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2) (means ``[D]``,
    covariances ``[D, D]``): ``|mu1 - mu2|^2 + Tr(s1 + s2 - 2 sqrtm(s1 s2))``, in squared feature
    units, >= 0 up to round-off.

    The matrix square root is ``scipy.linalg.sqrtm`` of the (non-symmetric) product. Two numerical
    cases are handled: (1) a result that is not finite (a singular product, e.g. fewer samples
    than dimensions) is retried with ``eps`` added to both diagonals; (2) round-off gives
    ``sqrtm`` small imaginary parts: the real part is kept when the largest imaginary part on the
    diagonal is below IMAG_TOLERANCE times the largest real magnitude, else the ``eps`` retry is
    taken as well. Raises ValueError when the retry is still unusable."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"means {list(mu1.shape)} / {list(mu2.shape)} and covariances {list(s1.shape)} / "
                         f"{list(s2.shape)} do not match")
    diff = mu1 - mu2

    def trace_sqrt(a: np.ndarray, b: np.ndarray) -> Optional[float]:
        with warnings.catch_warnings():  # "Matrix is singular ...": handled by the checks below
            warnings.simplefilter("ignore")
            root = scipy.linalg.sqrtm(a @ b)
        if not np.all(np.isfinite(root)):
            return None
        if np.iscomplexobj(root):
            diag = np.diagonal(root)
            scale = max(float(np.abs(root.real).max()), 1e-12)
            if float(np.abs(diag.imag).max()) > IMAG_TOLERANCE * scale:
                return None
            root = root.real
        return float(np.trace(root))

    tr = trace_sqrt(s1, s2)
    if tr is None:
        offset = np.eye(s1.shape[0]) * eps
        tr = trace_sqrt(s1 + offset, s2 + offset)
        if tr is None:
            raise ValueError("the matrix square root of the covariance product is not usable, even with "
                             f"{eps} added to the diagonals")
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr)


def frechet_distance_of_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the feature sets ``a`` ``[N, D]`` and ``b`` ``[M, D]`` (NaN when
    either has fewer than 2 rows: no covariance)."""
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


# --- feature networks -------------------------------------------------------------------------------

def load_torchscript(path: str | Path, field: str, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """``torch.jit.load`` of ``path`` onto ``device`` in eval mode; :class:`LearnedMetricError`
    naming ``evaluation.<field>`` and the path when the file is missing or not TorchScript. A
    relative path is under the project root (core/paths.py). (TorchScript is deprecated in recent
    torch, but the standard FVD detector is distributed in it, so it stays the format read here.)"""
    p = project_path(Path(path).expanduser())
    if not p.is_file():
        raise LearnedMetricError(f"evaluation.{field}: no file at {p}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            net = torch.jit.load(str(p), map_location=torch.device(device))
    except Exception as exc:  # noqa: BLE001 - whatever torch.jit.load raises, the file is unusable
        raise LearnedMetricError(f"evaluation.{field}: {p} is not a TorchScript file (torch.jit.load: "
                                 f"{_reason(exc)})") from exc
    return net.eval()


def _reason(exc: BaseException) -> str:
    """One line of an exception: a TorchScript error's last line (its first only says that an
    operation failed in the interpreter), else the first."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[-1] if isinstance(exc, torch.jit.Error) else lines[0]


def _as_features(out, n: int, field: str, path: str) -> torch.Tensor:
    """A network output -> float32 ``[n, D]`` (trailing 1 x 1 dims flattened), else an error."""
    if isinstance(out, (tuple, list)) and len(out) == 1:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise LearnedMetricError(f"evaluation.{field}: {path} returned {type(out).__name__}, expected a tensor [N, D]")
    if out.ndim > 2 and all(s == 1 for s in out.shape[2:]):
        out = out.reshape(out.shape[0], out.shape[1])
    if out.ndim != 2 or out.shape[0] != n or out.shape[1] < 1:
        raise LearnedMetricError(f"evaluation.{field}: {path} returned shape {list(out.shape)} for {n} inputs, "
                                 f"expected features [{n}, D]")
    return out.float()


@dataclass
class FeatureNetwork:
    """One loaded feature network and its input convention (module docstring).

    ``kind``: "frames" (FID: ``[N, 3, S, S]`` in [0, 1]) or "clips" (FVD: ``[N, 3, T, S, S]`` in
    [-1, 1]); ``size``: S, pixels; ``clip_frames``: T (clips only); ``batch``: frames or clips per
    call; ``call_kwargs``: keyword arguments of every call; ``dim``: D, found by the probe."""

    net: torch.jit.ScriptModule
    field: str
    path: str
    kind: str
    size: int
    batch: int
    clip_frames: int = 0
    call_kwargs: Optional[dict] = None
    dim: int = 0

    @property
    def device(self) -> torch.device:
        for t in list(self.net.parameters()) + list(self.net.buffers()):
            return t.device
        return torch.device("cpu")

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self.net(x, **(self.call_kwargs or {}))
        except torch.OutOfMemoryError:
            raise  # infrastructure: the job retries it, the weights are not to blame
        except (RuntimeError, TypeError, torch.jit.Error) as exc:  # the script's own checks: jit.Error
            shape = "x".join(str(s) for s in x.shape)
            raise LearnedMetricError(f"evaluation.{self.field}: {self.path} failed on input [{shape}] "
                                     f"({_reason(exc)})") from exc
        return _as_features(out, x.shape[0], self.field, self.path)

    def probe(self) -> int:
        """Run two blank inputs through the network, check the output is ``[2, D]``; returns D."""
        shape = (2, 3, self.size, self.size) if self.kind == "frames" else \
            (2, 3, self.clip_frames, self.size, self.size)
        with torch.no_grad():
            self.dim = int(self._call(torch.zeros(shape, device=self.device)).shape[1])
        return self.dim

    def _prepare(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> float32 [N, 3, S, S] in [0, 1] on the network's device."""
        x = torch.as_tensor(np.ascontiguousarray(frames), device=self.device).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return x.clamp_(0.0, 1.0)

    @torch.no_grad()
    def features(self, frames: np.ndarray) -> np.ndarray:
        """Features float32 ``[N, D]`` of uint8 frames ``[T, H, W, 3]``: N = T frames ("frames")
        or N = T // clip_frames non-overlapping clips ("clips"; [0, D] when T is shorter)."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        out = []
        if self.kind == "frames":
            for i in range(0, len(frames), self.batch):
                out.append(self._call(self._prepare(frames[i:i + self.batch])).cpu())
        else:
            clips = len(frames) // self.clip_frames
            t = self.clip_frames
            for i in range(0, clips, self.batch):
                j = min(clips, i + self.batch)
                x = self._prepare(frames[i * t: j * t])  # [(j - i) * T, 3, S, S]
                x = x.reshape(j - i, t, 3, self.size, self.size).permute(0, 2, 1, 3, 4)  # [n, 3, T, S, S]
                out.append(self._call(x * 2.0 - 1.0).cpu())
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return torch.cat(out).numpy().astype(np.float32)


@dataclass
class FeatureNetworks:
    """The configured feature networks (None: that metric's weights are not given)."""

    fid: Optional[FeatureNetwork] = None
    fvd: Optional[FeatureNetwork] = None
    syncnet: Optional["SyncNetwork"] = None

    @property
    def any(self) -> bool:
        return self.fid is not None or self.fvd is not None

    def video_features(self, generated: np.ndarray, real: np.ndarray) -> dict[str, np.ndarray]:
        """Per-video features of generated and real frames (uint8 [T, S, S, 3] each, same T):
        ``{"fid_generated", "fid_real"}`` ``[T, D]`` and ``{"fvd_generated", "fvd_real"}``
        ``[T // clip_frames, D]`` for the configured networks."""
        n = min(len(generated), len(real))
        out: dict[str, np.ndarray] = {}
        for name, net in (("fid", self.fid), ("fvd", self.fvd)):
            if net is not None:
                out[f"{name}_generated"] = net.features(generated[:n])
                out[f"{name}_real"] = net.features(real[:n])
        return out


def load_feature_networks(eval_cfg: EvaluationConfig, device: torch.device | str = "cpu") -> FeatureNetworks:
    """The networks named by ``evaluation.fid_weights_path`` / ``fvd_weights_path`` loaded onto
    ``device`` and probed with two blank inputs of the configured size (a wrong file fails here,
    before any video is generated). Raises :class:`LearnedMetricError` naming the field."""
    ev = eval_cfg
    for field in ("fid_input_size", "fvd_input_size", "fvd_clip_frames", "feature_batch_size"):
        if int(getattr(ev, field)) < 1:
            raise LearnedMetricError(f"evaluation.{field}: must be >= 1, got {getattr(ev, field)}")
    if ev.fvd_call_convention not in FVD_CALL_KWARGS:
        raise LearnedMetricError(f"evaluation.fvd_call_convention: {ev.fvd_call_convention!r} is not one of "
                                 f"{sorted(FVD_CALL_KWARGS)}")
    nets = FeatureNetworks()
    if ev.fid_weights_path:
        nets.fid = FeatureNetwork(load_torchscript(ev.fid_weights_path, "fid_weights_path", device),
                                  "fid_weights_path", str(ev.fid_weights_path), "frames", int(ev.fid_input_size),
                                  int(ev.feature_batch_size))
        nets.fid.probe()
    if ev.fvd_weights_path:
        nets.fvd = FeatureNetwork(load_torchscript(ev.fvd_weights_path, "fvd_weights_path", device),
                                  "fvd_weights_path", str(ev.fvd_weights_path), "clips", int(ev.fvd_input_size),
                                  max(1, int(ev.feature_batch_size) // int(ev.fvd_clip_frames)),
                                  int(ev.fvd_clip_frames), FVD_CALL_KWARGS[ev.fvd_call_convention])
        nets.fvd.probe()
    if ev.syncnet_path:
        nets.syncnet = SyncNetwork(load_torchscript(ev.syncnet_path, "syncnet_path", device), str(ev.syncnet_path),
                                   max(1, int(ev.feature_batch_size) // SYNC_WINDOW))
        nets.syncnet.probe()
    return nets


# --- LSE-D / LSE-C (SyncNet) ----------------------------------------------------------------------

def syncnet_mfcc(samples: np.ndarray) -> np.ndarray:
    """SyncNet's audio input: 13 MFCCs ``[13, steps]`` (100 steps a second, float32) of the
    float waveform ``samples`` (16 kHz mono, [-1, 1]) as 16-bit PCM, as ``syncnet_python`` reads
    its wav file (``python_speech_features.mfcc`` defaults: 25 ms windows, 10 ms steps)."""
    pcm = np.round(np.clip(np.asarray(samples, np.float64), -1.0, 1.0) * 32767.0).astype(np.int16)
    return python_speech_features.mfcc(pcm, SYNC_SAMPLE_RATE).T.astype(np.float32)


def lse_from_embeddings(lip: np.ndarray, audio: np.ndarray, vshift: int = LSE_VSHIFT) -> tuple[float, float, int]:
    """``(LSE-D, LSE-C, offset)`` from per-window embeddings ``lip`` and ``audio`` ``[W, D]``
    (window i of both covers the same time): the Euclidean distance of lip[i] to audio[i + k]
    for k in -vshift..vshift (audio zero-padded), averaged over i -> 2 vshift + 1 means; LSE-D is
    their minimum, LSE-C their median minus the minimum, ``offset`` = -k of the minimum (in
    frames, syncnet_python's sign). NaN, NaN, 0 without windows."""
    lip_t = torch.as_tensor(np.asarray(lip, np.float32))
    aud_t = torch.as_tensor(np.asarray(audio, np.float32))
    if lip_t.ndim != 2 or lip_t.shape != aud_t.shape or lip_t.shape[0] < 1:
        return float("nan"), float("nan"), 0
    w = 2 * vshift + 1
    padded = F.pad(aud_t, (0, 0, vshift, vshift))  # [W + 2 vshift, D]
    # dists[i, k]: F.pairwise_distance (its 1e-6 eps included) as syncnet_python computes it
    dists = torch.stack([F.pairwise_distance(lip_t[i:i + 1].expand(w, -1), padded[i:i + w])
                         for i in range(lip_t.shape[0])])  # [W, 2 vshift + 1]
    mdist = dists.mean(dim=0).double().numpy()
    k = int(np.argmin(mdist))
    return float(mdist[k]), float(np.median(mdist) - mdist[k]), vshift - k


@dataclass
class SyncNetwork:
    """A loaded SyncNet pair (module docstring); ``batch`` windows per call."""

    net: torch.jit.ScriptModule
    path: str
    batch: int
    field: str = "syncnet_path"

    @property
    def device(self) -> torch.device:
        for t in list(self.net.parameters()) + list(self.net.buffers()):
            return t.device
        return torch.device("cpu")

    def _call(self, lip: torch.Tensor, mfcc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            out = self.net(lip, mfcc)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, torch.jit.Error) as exc:
            raise LearnedMetricError(f"evaluation.{self.field}: {self.path} failed on lip {list(lip.shape)} / mfcc "
                                     f"{list(mfcc.shape)} ({_reason(exc)})") from exc
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise LearnedMetricError(f"evaluation.{self.field}: {self.path} must return (lip_emb, audio_emb), got "
                                     f"{type(out).__name__}")
        n = lip.shape[0]
        lip_emb, aud_emb = (_as_features(o, n, self.field, self.path) for o in out)
        if lip_emb.shape != aud_emb.shape:
            raise LearnedMetricError(f"evaluation.{self.field}: {self.path} returned embeddings {list(lip_emb.shape)} "
                                     f"and {list(aud_emb.shape)}, expected the same [N, D]")
        return lip_emb, aud_emb

    def probe(self) -> int:
        with torch.no_grad():
            lip, _ = self._call(torch.zeros(2, 3, SYNC_WINDOW, SYNC_SIZE, SYNC_SIZE, device=self.device),
                                torch.zeros(2, 1, 13, MFCC_WINDOW, device=self.device))
        return int(lip.shape[1])

    @torch.no_grad()
    def embeddings(self, frames: np.ndarray, mfcc: np.ndarray, windows: int) -> tuple[np.ndarray, np.ndarray]:
        """Lip and audio embeddings ``[windows, D]`` of the first ``windows`` 5-frame windows of
        uint8 ``frames`` ``[T, H, W, 3]`` (RGB) and ``mfcc`` ``[13, steps]``."""
        lips, auds = [], []
        for i in range(0, windows, self.batch):
            j = min(windows, i + self.batch)
            x = torch.as_tensor(np.ascontiguousarray(frames[i:j + SYNC_WINDOW - 1]), device=self.device)
            x = x.permute(0, 3, 1, 2).float()  # [n + 4, 3, H, W], 0..255
            if x.shape[-2:] != (SYNC_SIZE, SYNC_SIZE):
                x = F.interpolate(x, size=(SYNC_SIZE, SYNC_SIZE), mode="bilinear", align_corners=False,
                                  antialias=True).clamp_(0.0, 255.0)
            x = x.flip(1)  # RGB -> BGR, SyncNet's channel order
            lip = torch.stack([x[v - i:v - i + SYNC_WINDOW] for v in range(i, j)]).permute(0, 2, 1, 3, 4)
            aud = torch.stack([torch.as_tensor(mfcc[:, v * MFCC_STEPS_PER_FRAME:v * MFCC_STEPS_PER_FRAME + MFCC_WINDOW])
                               for v in range(i, j)])[:, None].to(self.device)  # [n, 1, 13, 20]
            lip_emb, aud_emb = self._call(lip.contiguous(), aud.float())
            lips.append(lip_emb.cpu())
            auds.append(aud_emb.cpu())
        return torch.cat(lips).numpy(), torch.cat(auds).numpy()

    def scores(self, generated: np.ndarray, real: np.ndarray, samples: Optional[np.ndarray], sample_rate: int,
               fps: float) -> tuple[dict[str, float], Optional[str]]:
        """``{lse_d, lse_c, lse_d_gt, lse_c_gt}`` of the generated and the real frames (uint8
        [T, S, S, 3]) against ``samples`` (float mono at ``sample_rate``) -> (values, note): NaN
        values and the reason as note without a waveform, at another rate than 16 kHz / 25 fps,
        or with fewer than 6 frames (syncnet_python's ``min(frames, samples / 640) - 5`` windows)."""
        nan = {k: float("nan") for k in LSE_KEYS}
        if samples is None:
            return nan, "LSE NaN: no waveform (source video not found)"
        if int(sample_rate) != SYNC_SAMPLE_RATE or abs(float(fps) - SYNC_FPS) > 1e-6:
            return nan, f"LSE NaN: SyncNet needs 25 fps and 16 kHz, the video has {fps} fps and {sample_rate} Hz"
        windows = min(len(generated), len(real), int(len(samples) // 640)) - SYNC_WINDOW
        if windows < 1:
            return nan, f"LSE NaN: {windows + SYNC_WINDOW} frames with audio, SyncNet needs at least 6"
        mfcc = syncnet_mfcc(samples)
        out = {}
        for suffix, frames in (("", generated), ("_gt", real)):
            d, c, _ = lse_from_embeddings(*self.embeddings(frames, mfcc, windows))
            out[f"lse_d{suffix}"], out[f"lse_c{suffix}"] = d, c
        return out, None


# --- the split's metrics --------------------------------------------------------------------------

def lse_means(records: Sequence[dict], eval_cfg: EvaluationConfig) -> tuple[dict[str, float], dict[str, str]]:
    """Means over the videos of the per-video :data:`LSE_KEYS` (NaN values left out) when
    ``evaluation.syncnet_path`` is set -> ``(values, notes)``; a metric NaN for every video gets the
    first video's note (or "no videos")."""
    if not eval_cfg.syncnet_path:
        return {}, {}
    values, notes = {}, {}
    for key in LSE_KEYS:
        finite = [float(r[key]) for r in records if r.get(key) is not None and math.isfinite(float(r[key]))]
        values[key] = float(np.mean(finite)) if finite else float("nan")
        if not finite and key in ("lse_d", "lse_c"):
            why = next((n for r in records for n in r.get("notes", []) if n.startswith("LSE NaN")), None)
            notes[key] = why or f"NaN: no video with an LSE value ({len(records)} videos)"
    return values, notes


def learned_metric_values(per_video: Sequence[dict[str, np.ndarray]], eval_cfg: EvaluationConfig
                          ) -> tuple[dict[str, float], dict[str, str]]:
    """FID / FVD over the split from the per-video features of :meth:`FeatureNetworks.video_features`
    (pooled over videos). Returns ``(values, notes)``: ``values`` has ``fid`` / ``fvd`` (NaN when
    fewer than 2 frames / clips on either side) and their sample counts ``fid_frames`` /
    ``fvd_clips`` for each configured network; ``notes`` the reason of each NaN value."""
    values: dict[str, float] = {}
    notes: dict[str, str] = {}
    for name, count_key, unit in (("fid", "fid_frames", "frames"), ("fvd", "fvd_clips", "clips")):
        if not getattr(eval_cfg, WEIGHT_FIELDS[name]):
            continue
        gen = [v[f"{name}_generated"] for v in per_video if f"{name}_generated" in v]
        real = [v[f"{name}_real"] for v in per_video if f"{name}_real" in v]
        gen_all = np.concatenate(gen) if gen else np.zeros((0, 1), np.float32)
        real_all = np.concatenate(real) if real else np.zeros((0, 1), np.float32)
        n = min(len(gen_all), len(real_all))
        values[count_key] = float(n)
        if n < 2:
            values[name] = float("nan")
            extra = f" of {eval_cfg.fvd_clip_frames} frames (evaluation.fvd_clip_frames)" if name == "fvd" else ""
            notes[name] = (f"NaN: {n} generated / real {unit}{extra} over {len(per_video)} videos; a covariance "
                           f"needs at least 2")
            continue
        try:
            values[name] = frechet_distance_of_features(gen_all, real_all)
        except ValueError as exc:
            values[name] = float("nan")
            notes[name] = f"NaN: {exc}"
        if not math.isfinite(values[name]) and name not in notes:
            notes[name] = "NaN: the Fréchet distance is not finite"
    return values, notes
