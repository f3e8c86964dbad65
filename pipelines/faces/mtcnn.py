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
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.faces.detect import FaceDetectorError

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
_OFFSETS = [0, 1, 2, 3]  # box-offset outputs -> (x0, y0, x1, y1)
_MARKS_X_FIRST = True  # landmark outputs: 5 x then 5 y


class MtcnnWeightsError(FaceDetectorError):
    """A weight file of the MTCNN wheel is missing or unreadable (pip install --no-deps facenet-pytorch==2.6.0)."""


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


class PNet(nn.Module):
    """[N, 3, h, w] -> (face probability [N, h', w'], offsets [N, 4, h', w']), h' = (h - 10) // 2 - 1 ..."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return torch.softmax(self.conv4_1(x), 1)[:, _FACE], self.conv4_2(x)


def _flatten(x: torch.Tensor) -> torch.Tensor:
    """Dense-layer input [N, C, H, W] -> [N, W x H x C] in (W, H, C) order (measured, see above:
    ``flatten`` in (C, H, W) order finds boxes at random places)."""
    return x.permute(0, 3, 2, 1).flatten(1)


class RNet(nn.Module):
    """[N, 3, 24, 24] -> (face probability [N], offsets [N, 4])."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu4(self.dense4(_flatten(self.prelu3(self.conv3(x)))))
        return torch.softmax(self.dense5_1(x), 1)[:, _FACE], self.dense5_2(x)


class ONet(nn.Module):
    """[N, 3, 48, 48] -> (face probability [N], offsets [N, 4], landmarks [N, 10])."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu5(self.dense5(_flatten(self.prelu4(self.conv4(x)))))
        return torch.softmax(self.dense6_1(x), 1)[:, _FACE], self.dense6_2(x), self.dense6_3(x)


def load_nets(device: str | torch.device = "cpu") -> tuple[PNet, RNet, ONet]:
    """The three networks with the wheel's weights, in eval mode on ``device``."""
    nets = (PNet(), RNet(), ONet())
    for name, net in zip(("pnet", "rnet", "onet"), nets):
        path = mtcnn_weight_path(name)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
            raise MtcnnWeightsError(f"{path}: not a loadable MTCNN {name} state dict ({exc})") from None
        net.eval().to(device)
    return nets


# ---------------------------------------------------------------------------------------------
# Boxes


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, threshold: float,
                min_overlap: bool = False) -> torch.Tensor:
    """Greedy non-maximum suppression per group (frame), all groups at once: indices (into
    ``boxes`` [k, 4] x0, y0, x1, y1) of the kept boxes. Overlap = IoU, or intersection / smaller
    area with ``min_overlap``. Written here because torchvision (``batched_nms``) cannot be
    installed beside this torch; no Python loop over boxes (GPU-friendly): the boxes of each group
    are padded into [G, m] and greedy suppression is the fixed point of ``keep[j] = no kept
    higher-scored box overlaps j``, reached in as many rounds as the longest suppression chain."""
    k = boxes.shape[0]
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True)
    order = order[torch.argsort(groups[order], stable=True)]  # by group, best first inside
    g = groups[order]
    uniq, counts = torch.unique_consecutive(g, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    gi = torch.repeat_interleave(torch.arange(len(uniq), device=boxes.device), counts)
    rank = torch.arange(k, device=boxes.device) - starts[gi]
    m = int(counts.max())
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
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise FaceDetectorError(f"MTCNN on {device}: no CUDA device here (torch.cuda.is_available() is False)")
        self.pnet, self.rnet, self.onet = load_nets(self.device)
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

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray | torch.Tensor, min_face_px: Optional[float] = None) -> MtcnnFaces:
        """Faces of ``frames`` uint8 [n, H, W, 3] RGB (numpy or a tensor already on the device)."""
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
            prob, reg = self.pnet(_to_net(level))
            f, yy, xx = torch.nonzero(prob > t1, as_tuple=True)
            if len(f) == 0:
                continue
            cell = torch.stack([xx, yy, xx, yy], 1).float() * 2 + torch.tensor([0, 0, 12, 12], device=dev)
            boxes = cell / s
            score = prob[f, yy, xx]
            offs = reg[f, :, yy, xx][:, _OFFSETS]
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
        prob, offs = self.rnet(_to_net(crop_boxes(images, f, boxes, 24)))
        offs = offs[:, _OFFSETS]
        ok = prob > t2
        boxes, score, offs, f = boxes[ok], prob[ok], offs[ok], f[ok]
        if len(f) == 0:
            return _empty()
        keep = batched_nms(boxes, score, f, 0.7)
        boxes = _square(_regress(boxes[keep], offs[keep]))
        f = f[keep]

        # stage 3: O-Net on 48 x 48 crops: final score, box and 5 landmarks
        prob, offs, marks = self.onet(_to_net(crop_boxes(images, f, boxes, 48)))
        offs = offs[:, _OFFSETS]
        if not _MARKS_X_FIRST:
            marks = torch.cat([marks[:, 5:], marks[:, :5]], 1)
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
