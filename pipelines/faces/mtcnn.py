"""MTCNN face detection (Zhang et al. 2016, "Joint Face Detection and Alignment using Multi-task
Cascaded Convolutional Networks") in torch, batched over frames, on CPU or CUDA.

Weights: the three state dicts that ship inside the PyPI wheel ``facenet-pytorch`` (MIT;
``facenet_pytorch/data/{pnet,rnet,onet}.pt``), located with ``importlib.metadata`` and never
imported (the package pins torch < 2.3 and imports torchvision; ``make install`` installs it with
``--no-deps``). The networks and the cascade here are written from the paper:

* P-Net: fully convolutional (conv 3x3 10, max-pool 2, conv 3x3 16, conv 3x3 32; PReLU), a
  12x12 window per output cell at stride 2; heads: face / not-face (2-way softmax) and 4 box
  offsets. Run on an image pyramid (factor 0.709) whose first level maps ``min_face_px`` to 12 px.
* R-Net: 24x24 crops of the P-Net boxes (conv 28, 48, 64 + dense 128): face score + offsets.
* O-Net: 48x48 crops (conv 32, 64, 64, 128 + dense 256): face score + offsets + 5 landmarks.
* Between stages: non-maximum suppression, box regression (offsets x box size), square boxes.
  Input pixels (x - 127.5) / 128. Max-pooling rounds up (Caffe's convention; the dense layers'
  input sizes 576 = 64x3x3 and 1152 = 128x3x3 only come out that way).

Facts of the shipped weights that the paper does not give were found empirically on a rendered
face and two photos (the comment above :data:`_FACE`).

Batching: each pyramid level is one P-Net call over all frames; R-Net and O-Net each run once
over every crop of every frame. Frames of one call share their size (a video's chunk).
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from pipelines.errors import PipelineError

if TYPE_CHECKING:
    import torch

WEIGHTS_PACKAGE = "facenet-pytorch"
WEIGHT_FILES = {"pnet": "facenet_pytorch/data/pnet.pt", "rnet": "facenet_pytorch/data/rnet.pt",
                "onet": "facenet_pytorch/data/onet.pt"}

# Facts of the shipped weights measured on the astronaut, Grace Hopper and a rendered scene (8
# variants: image transposed or not x dense-input order x softmax index; the winner finds exactly
# one box per image, score 1.00, matching dlib's HOG box; every other variant finds 0 or 2-250
# boxes at random places):
# * the image is fed as is ([N, C, H, W], RGB), not transposed;
# * the dense layers' input is flattened in (W, H, C) order (the converted weights keep the
#   original's transposed layout there): :func:`_flatten`;
# * softmax index 1 is "face";
# * box offsets are (x0, y0, x1, y1) x box size; landmarks 5 x then 5 y, fractions of the box.
_FACE = 1


class MtcnnWeightsError(PipelineError, RuntimeError):
    """The cascade cannot be built: a weight file of the MTCNN wheel missing or unreadable (pip
    install --no-deps facenet-pytorch==2.6.0), or CUDA asked for where there is none.
    ``MtcnnDetector`` turns it into a ``FaceDetectorError``."""


def mtcnn_weight_path(net: str) -> Path:
    """Path of ``net``'s ("pnet", "rnet", "onet") state dict inside the installed wheel, found
    without importing the package. Raises :class:`MtcnnWeightsError` naming the file."""
    rel = WEIGHT_FILES[net]
    try:
        path = Path(importlib.metadata.distribution(WEIGHTS_PACKAGE).locate_file(rel))
    except importlib.metadata.PackageNotFoundError:
        raise MtcnnWeightsError(f"MTCNN weights missing: {rel} ({WEIGHTS_PACKAGE} is not installed: "
                                f"pip install --no-deps {WEIGHTS_PACKAGE}==2.6.0)") from None
    if not path.is_file():
        raise MtcnnWeightsError(f"MTCNN weights missing: {path} (pip install --no-deps {WEIGHTS_PACKAGE}==2.6.0)")
    return path


# The architecture (the paper's Fig. 2), as the state-dict shapes it implies: conv (out, in, k, k),
# PReLU (channels,), dense (out, in); dense inputs 576 = 64 x 3 x 3 and 1152 = 128 x 3 x 3 follow
# from 24 / 48 px inputs with max-pooling that rounds up. A file of other shapes is refused.
def _conv(prefix: str, out: int, inp: int, k: int) -> dict:
    return {f"{prefix}.weight": (out, inp, k, k), f"{prefix}.bias": (out,)}


def _dense(prefix: str, out: int, inp: int) -> dict:
    return {f"{prefix}.weight": (out, inp), f"{prefix}.bias": (out,)}


SHAPES = {
    "pnet": {**_conv("conv1", 10, 3, 3), "prelu1.weight": (10,), **_conv("conv2", 16, 10, 3), "prelu2.weight": (16,),
             **_conv("conv3", 32, 16, 3), "prelu3.weight": (32,), **_conv("conv4_1", 2, 32, 1),
             **_conv("conv4_2", 4, 32, 1)},
    "rnet": {**_conv("conv1", 28, 3, 3), "prelu1.weight": (28,), **_conv("conv2", 48, 28, 3), "prelu2.weight": (48,),
             **_conv("conv3", 64, 48, 2), "prelu3.weight": (64,), **_dense("dense4", 128, 576),
             "prelu4.weight": (128,), **_dense("dense5_1", 2, 128), **_dense("dense5_2", 4, 128)},
    "onet": {**_conv("conv1", 32, 3, 3), "prelu1.weight": (32,), **_conv("conv2", 64, 32, 3), "prelu2.weight": (64,),
             **_conv("conv3", 64, 64, 3), "prelu3.weight": (64,), **_conv("conv4", 128, 64, 2),
             "prelu4.weight": (128,), **_dense("dense5", 256, 1152), "prelu5.weight": (256,),
             **_dense("dense6_1", 2, 256), **_dense("dense6_2", 4, 256), **_dense("dense6_3", 10, 256)},
}

# The networks are functions of their weights (dicts of tensors), not nn.Modules: torch is imported
# only when a detector is built, so importing pipelines.faces.detect (every ingest) stays torch-free.


def _cp(w: dict, n: int, x: "torch.Tensor") -> "torch.Tensor":
    """conv{n} then prelu{n}."""
    import torch.nn.functional as F

    return F.prelu(F.conv2d(x, w[f"conv{n}.weight"], w[f"conv{n}.bias"]), w[f"prelu{n}.weight"])


def _dp(w: dict, name: str, n: int, x: "torch.Tensor") -> "torch.Tensor":
    """dense ``name`` then prelu{n}."""
    import torch.nn.functional as F

    return F.prelu(F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"]), w[f"prelu{n}.weight"])


def _face(w: dict, name: str, x: "torch.Tensor") -> "torch.Tensor":
    """Face probability of the 2-way softmax head ``name`` (dense [N, 2] or conv [N, 2, h, w])."""
    import torch
    import torch.nn.functional as F

    logits = F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"]) if x.ndim == 2 else \
        F.conv2d(x, w[f"{name}.weight"], w[f"{name}.bias"])
    return torch.softmax(logits, 1)[:, _FACE]


def _flatten(x: "torch.Tensor") -> "torch.Tensor":
    """Dense-layer input [N, C, H, W] -> [N, W x H x C] in (W, H, C) order (measured, see above:
    ``flatten`` in (C, H, W) order finds boxes at random places)."""
    return x.permute(0, 3, 2, 1).flatten(1)


def pnet(w: dict, x: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """P-Net: [N, 3, h, w] -> (face probability [N, h', w'], offsets [N, 4, h', w']); one output
    cell per 12 x 12 window at stride 2."""
    import torch.nn.functional as F

    x = F.max_pool2d(_cp(w, 1, x), 2, 2, ceil_mode=True)
    x = _cp(w, 3, _cp(w, 2, x))
    return _face(w, "conv4_1", x), F.conv2d(x, w["conv4_2.weight"], w["conv4_2.bias"])


def rnet(w: dict, x: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """R-Net: [N, 3, 24, 24] -> (face probability [N], offsets [N, 4])."""
    import torch.nn.functional as F

    x = F.max_pool2d(_cp(w, 1, x), 3, 2, ceil_mode=True)
    x = F.max_pool2d(_cp(w, 2, x), 3, 2, ceil_mode=True)
    x = _dp(w, "dense4", 4, _flatten(_cp(w, 3, x)))
    return _face(w, "dense5_1", x), F.linear(x, w["dense5_2.weight"], w["dense5_2.bias"])


def onet(w: dict, x: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """O-Net: [N, 3, 48, 48] -> (face probability [N], offsets [N, 4], landmarks [N, 10])."""
    import torch.nn.functional as F

    x = F.max_pool2d(_cp(w, 1, x), 3, 2, ceil_mode=True)
    x = F.max_pool2d(_cp(w, 2, x), 3, 2, ceil_mode=True)
    x = F.max_pool2d(_cp(w, 3, x), 2, 2, ceil_mode=True)
    x = _dp(w, "dense5", 5, _flatten(_cp(w, 4, x)))
    return (_face(w, "dense6_1", x), F.linear(x, w["dense6_2.weight"], w["dense6_2.bias"]),
            F.linear(x, w["dense6_3.weight"], w["dense6_3.bias"]))


def load_weights(device: "str | torch.device" = "cpu") -> dict[str, dict]:
    """{"pnet" | "rnet" | "onet": {name: tensor on ``device``}} from the wheel's files, each checked
    against :data:`SHAPES` (:class:`MtcnnWeightsError` naming the file otherwise)."""
    import torch

    weights = {}
    for net, shapes in SHAPES.items():
        path = mtcnn_weight_path(net)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
            raise MtcnnWeightsError(f"{path}: not a loadable MTCNN {net} state dict ({type(exc).__name__})") from None
        got = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
        if got != shapes:
            raise MtcnnWeightsError(f"{path}: not the MTCNN {net} weights (tensors {sorted(got)[:4]}...)")
        weights[net] = {k: v.float().to(device) for k, v in state.items()}
    return weights


# ---------------------------------------------------------------------------------------------
# Boxes


_NMS_ELEMENTS = 1 << 25  # largest [groups, m, m] overlap matrix of one batched_nms step (~0.5 GB of temporaries)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, threshold: float,
                min_overlap: bool = False) -> torch.Tensor:
    """Greedy non-maximum suppression per group (frame), all groups at once: indices (into
    ``boxes`` [k, 4] x0, y0, x1, y1) of the kept boxes. Overlap = IoU, or intersection / smaller
    area with ``min_overlap``. Written here because torchvision (``batched_nms``) cannot be
    installed beside this torch; no Python loop over boxes (GPU-friendly): the boxes of each group
    are padded into [G, m] and greedy suppression is the fixed point of ``keep[j] = no kept
    higher-scored box overlaps j``, reached in as many rounds as the longest suppression chain."""
    import torch


    k = boxes.shape[0]
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    uniq, counts = torch.unique(groups, return_counts=True)
    m = int(counts.max())
    per_chunk = max(1, _NMS_ELEMENTS // (m * m))
    if len(uniq) > per_chunk:  # bound the [G, m, m] overlap matrices: groups in chunks
        parts = []
        for i in range(0, len(uniq), per_chunk):
            rows = torch.nonzero(torch.isin(groups, uniq[i:i + per_chunk])).flatten()
            parts.append(rows[batched_nms(boxes[rows], scores[rows], groups[rows], threshold, min_overlap)])
        return torch.cat(parts)
    order = torch.argsort(scores, descending=True)
    order = order[torch.argsort(groups[order], stable=True)]  # by group, best first inside
    g = groups[order]
    uniq, counts = torch.unique_consecutive(g, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    gi = torch.repeat_interleave(torch.arange(len(uniq), device=boxes.device), counts)
    rank = torch.arange(k, device=boxes.device) - starts[gi]
    padded = boxes.new_zeros((len(uniq), m, 4))
    valid = torch.zeros((len(uniq), m), dtype=torch.bool, device=boxes.device)
    padded[gi, rank] = boxes[order]
    valid[gi, rank] = True
    area = (padded[..., 2] - padded[..., 0]).clamp(min=0) * (padded[..., 3] - padded[..., 1]).clamp(min=0)
    lt = torch.maximum(padded[:, :, None, :2], padded[:, None, :, :2])
    rb = torch.minimum(padded[:, :, None, 2:], padded[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    denom = torch.minimum(area[:, :, None], area[:, None, :]) if min_overlap else \
        area[:, :, None] + area[:, None, :] - inter
    over = inter / denom.clamp(min=1e-9) > threshold
    over &= torch.ones(m, m, dtype=torch.bool, device=boxes.device).triu(1)  # i suppresses later j only
    over &= valid[:, :, None] & valid[:, None, :]
    keep = valid.clone()
    for _ in range(m):
        new = valid & ~(over & keep[:, :, None]).any(1)
        if torch.equal(new, keep):
            break
        keep = new
    return order[keep[gi, rank]]


def _regress(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Boxes [k, 4] moved by offsets [k, 4] (x0, y0, x1, y1 in box widths / heights)."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + offsets * wh


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes [k, 4] made square (the longer side) about their centres."""
    import torch

    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).max(1, keepdim=True).values / 2
    return torch.cat([c - half, c + half], 1)


def crop_boxes(images: torch.Tensor, frame: torch.Tensor, boxes: torch.Tensor, size: int,
               max_supersample: int = 4) -> torch.Tensor:
    """Crops [k, 3, size, size] of ``images`` [n, 3, H, W] (float pixels 0..255) at ``boxes``
    [k, 4] (pixels, x0, y0, x1, y1) of frames ``frame`` [k]; outside the image: 0 (black), as
    the paper's padding. Bilinear ``grid_sample``, one call per frame over all its boxes (the
    frame expanded, not copied); boxes wider than 1.5 crops are sampled on an up to
    ``max_supersample`` x finer grid and averaged down (an area-like shrink: large faces do not
    alias), the many small ones of P-Net directly."""
    import torch
    import torch.nn.functional as F


    out = images.new_zeros((boxes.shape[0], 3, size, size))
    h, w = images.shape[2:]
    width = boxes[:, 2] - boxes[:, 0]
    for sup in range(1, max_supersample + 1):
        # supersample 1 up to 1.5 crops wide, then the next integer ratio, max_supersample above
        lo = 0.0 if sup == 1 else (1.5 if sup == 2 else float(sup - 1)) * size
        hi = float("inf") if sup == max_supersample else (1.5 if sup == 1 else float(sup)) * size
        band = (width > lo) & (width <= hi)
        if not band.any():
            continue
        s = size * sup
        t = (torch.arange(s, device=images.device, dtype=images.dtype) + 0.5) / s  # cell centres 0..1
        for f in torch.unique(frame[band]).tolist():
            rows = torch.nonzero(band & (frame == f)).flatten()
            b = boxes[rows]
            gx = (b[:, 0:1] + t[None] * (b[:, 2:3] - b[:, 0:1])) / w * 2 - 1  # [m, s] in -1..1
            gy = (b[:, 1:2] + t[None] * (b[:, 3:4] - b[:, 1:2])) / h * 2 - 1
            grid = torch.stack([gx[:, None, :].expand(-1, s, -1), gy[:, :, None].expand(-1, -1, s)], -1)
            crop = F.grid_sample(images[f:f + 1].expand(len(rows), -1, -1, -1), grid, mode="bilinear",
                                 padding_mode="zeros", align_corners=False)
            out[rows] = F.avg_pool2d(crop, sup) if sup > 1 else crop
    return out


def _to_net(x: torch.Tensor) -> torch.Tensor:
    """Pixels [N, 3, h, w] 0..255 -> the networks' input (x - 127.5) / 128."""
    return (x - 127.5) * (1.0 / 128.0)


@dataclass(frozen=True)
class MtcnnFaces:
    """Faces of a batch: ``frame`` int64 [k] (index in the batch), ``boxes`` float32 [k, 4]
    (x0, y0, x1, y1 pixels), ``scores`` float32 [k] (O-Net face probability), ``points`` float32
    [k, 5, 2] (x, y pixels: left eye, right eye, nose, left / right mouth corner as seen)."""

    frame: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    points: np.ndarray


class Mtcnn:
    """The cascade on ``device`` ("cpu", "cuda", "cuda:N"). ``thresholds``: face probability of
    P-Net, R-Net, O-Net (the paper's 0.6, 0.7, 0.7 by default); ``factor``: pyramid step;
    ``min_face_px``: the smallest face searched (pixels of the given frames, shown 12 px to
    P-Net)."""

    def __init__(self, device: str | torch.device = "cpu", min_face_px: float = 20.0,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7), factor: float = 0.709):
        import torch

        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MtcnnWeightsError(f"MTCNN on {device}: no CUDA device here (torch.cuda.is_available() is False)")
        self.weights = load_weights(self.device)
        self.min_face_px = float(min_face_px)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = float(factor)

    def pyramid(self, h: int, w: int, min_face_px: Optional[float] = None) -> list[float]:
        """Scales (level / frame) of the P-Net pyramid of an h x w frame: the first shows
        ``min_face_px`` as 12 px, each next one ``factor`` x smaller, down to 12 px short side."""
        s = 12.0 / (min_face_px or self.min_face_px)
        scales = []
        while min(h, w) * s >= 12:
            scales.append(s)
            s *= self.factor
        return scales

    def __call__(self, frames: np.ndarray | torch.Tensor, min_face_px: Optional[float] = None) -> MtcnnFaces:
        """Faces of ``frames`` uint8 [n, H, W, 3] RGB (numpy or a tensor already on the device)."""
        import torch

        with torch.inference_mode():
            return self._cascade(frames, min_face_px)

    def _cascade(self, frames: np.ndarray | torch.Tensor, min_face_px: Optional[float]) -> MtcnnFaces:
        import torch
        import torch.nn.functional as F

        if isinstance(frames, np.ndarray):  # a writable copy only where needed (torch warns on read-only)
            frames = torch.from_numpy(np.require(frames, np.uint8, ["C", "W"]))
        images = frames.to(self.device).permute(0, 3, 1, 2).float()  # uint8 travels, float on the device
        h, w = images.shape[2:]
        t1, t2, t3 = self.thresholds
        dev = self.device

        # stage 1: P-Net on each pyramid level, all frames in one call per level
        found_b, found_s, found_f = [], [], []
        for s in self.pyramid(h, w, min_face_px):
            hs, ws = int(np.ceil(h * s)), int(np.ceil(w * s))
            level = F.interpolate(images, size=(hs, ws), mode="bilinear", align_corners=False, antialias=True)
            prob, reg = pnet(self.weights["pnet"], _to_net(level))
            f, yy, xx = torch.nonzero(prob > t1, as_tuple=True)
            if len(f) == 0:
                continue
            cell = torch.stack([xx, yy, xx, yy], 1).float() * 2 + torch.tensor([0, 0, 12, 12], device=dev)
            boxes = cell / s
            score = prob[f, yy, xx]
            offs = reg[f, :, yy, xx]
            keep = batched_nms(boxes, score, f, 0.5)
            found_b.append(_regress(boxes[keep], offs[keep]))
            found_s.append(score[keep])
            found_f.append(f[keep])
        if not found_b:
            return _empty()
        boxes, score, f = torch.cat(found_b), torch.cat(found_s), torch.cat(found_f)
        keep = batched_nms(boxes, score, f, 0.7)
        boxes, f = _square(boxes[keep]), f[keep]

        # stage 2: R-Net on every 24 x 24 crop of every frame
        prob, offs = rnet(self.weights["rnet"], _to_net(crop_boxes(images, f, boxes, 24)))
        ok = prob > t2
        boxes, score, offs, f = boxes[ok], prob[ok], offs[ok], f[ok]
        if len(f) == 0:
            return _empty()
        keep = batched_nms(boxes, score, f, 0.7)
        boxes = _square(_regress(boxes[keep], offs[keep]))
        f = f[keep]

        # stage 3: O-Net on 48 x 48 crops: final score, box and 5 landmarks
        prob, offs, marks = onet(self.weights["onet"], _to_net(crop_boxes(images, f, boxes, 48)))
        ok = prob > t3
        boxes, score, offs, marks, f = boxes[ok], prob[ok], offs[ok], marks[ok], f[ok]
        if len(f) == 0:
            return _empty()
        wh = boxes[:, 2:] - boxes[:, :2]
        points = torch.stack([boxes[:, None, 0] + marks[:, :5] * wh[:, None, 0],
                              boxes[:, None, 1] + marks[:, 5:] * wh[:, None, 1]], -1)  # [k, 5, 2]
        boxes = _regress(boxes, offs)
        keep = batched_nms(boxes, score, f, 0.7, min_overlap=True)
        order = keep[torch.argsort(f[keep] * 2 - score[keep], stable=True)]  # by frame, best first
        return MtcnnFaces(f[order].cpu().numpy().astype(np.int64), boxes[order].float().cpu().numpy(),
                          score[order].float().cpu().numpy(), points[order].float().cpu().numpy())


def _empty() -> MtcnnFaces:
    return MtcnnFaces(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                      np.zeros((0, 5, 2), np.float32))
