"""Many distinct people for the sample data, made offline from two real portrait photos.

Sources (both public domain, both installed with the project's own dependencies, neither from a
face-analysis package):

* ``astronaut``: Eileen Collins, NASA portrait (``skimage.data.astronaut()``, scikit-image; NASA
  photographs are in the public domain);
* ``hopper``: Commodore Grace M. Hopper, US Navy portrait (``grace_hopper.jpg`` in matplotlib's
  ``mpl-data/sample_data``; a work of the US government, public domain).

Two photos are two people, so the other identities are made with identity-changing transforms,
each one applied to the still photo before any frame is rendered (so the reference, clip and
motion frames of a video always show one person):

1. **face morph**: the face inside the landmark hull is a piecewise-affine morph of the two
   photos at weight ``morph`` (0 = the base photo's face, 1 = the other photo's face, aligned to
   the base by a similarity transform of the landmarks); hair, body and background stay the base
   photo's;
2. **face-shape warp**: the landmarks are moved (face width and height, jaw width, eye spacing)
   and the image follows by the same piecewise-affine warp, held fixed at 1.7 face sizes;
3. **colours**: skin (a Lab shift in the face region), hair (a new hue and lightness in the head
   region around the face), clothing (a hue rotation below the chin) and a new background (a
   two-colour gradient with soft low-frequency texture) outside a head-and-shoulders mask;
4. **mirroring**.

Region masks are geometric (ellipses and polygons from the 68 landmarks, feathered), not a
segmentation: the samples must look like different people to a face network and to the model,
not be photo-real composites. Everything is deterministic: an identity is a frozen
:class:`IdentitySpec`. Units: pixels of the source photo, landmarks float [68, 2] (x, y).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from pipelines.errors import PipelineError
from pipelines.faces.detect import DlibDetector

PhotoName = Literal["astronaut", "hopper"]
PHOTO_SOURCES = {
    "astronaut": "Eileen Collins, NASA portrait; skimage.data.astronaut() (scikit-image); public domain",
    "hopper": "Grace M. Hopper, US Navy portrait; matplotlib mpl-data/sample_data/grace_hopper.jpg; public domain",
}
_JAW = np.arange(0, 17)
_BROWS = np.arange(17, 27)
_EYES = np.arange(36, 48)


class IdentityError(PipelineError, RuntimeError):
    """An identity could not be built (no face found in a source photo or in the result)."""


@dataclass(frozen=True)
class IdentitySpec:
    """One synthetic person. Colours are RGB 0..255; ``skin_lab`` is a (dL, da, db) shift;
    ``clothing_hue_deg`` rotates the clothing's hue; ``split`` is the data split it belongs to
    (a ``test`` identity never appears in a training video)."""

    name: str
    base: PhotoName
    morph: float = 0.0  # 0..1, weight of the other photo's face
    face_width: float = 1.0  # horizontal scale of the face about its centre
    face_height: float = 1.0
    jaw_width: float = 1.0  # extra horizontal scale of the lower jaw
    eye_spacing: float = 1.0
    skin_lab: tuple[float, float, float] = (0.0, 0.0, 0.0)
    hair_rgb: tuple[int, int, int] | None = None  # None keeps the photo's hair
    clothing_hue_deg: float = 0.0
    background: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None  # gradient top, bottom
    mirror: bool = False
    split: Literal["train", "test"] = "train"


#: 12 training people and 3 test people. Test identities differ from every training one in face
#: morph weight, face shape, skin, hair, clothing and background (tests/test_sample_data.py
#: checks that a face network tells them apart from the training people).
IDENTITIES: tuple[IdentitySpec, ...] = (
    IdentitySpec("id00", "astronaut"),
    IdentitySpec("id01", "hopper"),
    IdentitySpec("id02", "astronaut", morph=0.25, face_width=1.08, skin_lab=(-12, 6, 14), hair_rgb=(25, 20, 18),
                 clothing_hue_deg=120, background=((40, 70, 120), (15, 25, 50))),
    IdentitySpec("id03", "hopper", morph=0.2, face_height=1.06, jaw_width=0.92, skin_lab=(4, 8, 4),
                 hair_rgb=(150, 95, 45), clothing_hue_deg=200, background=((200, 190, 170), (120, 110, 95)), mirror=True),
    IdentitySpec("id04", "hopper", morph=0.65, face_width=0.93, eye_spacing=1.06, skin_lab=(-15, 10, 18),
                 hair_rgb=(15, 12, 10), clothing_hue_deg=60, background=((90, 140, 90), (30, 60, 40))),
    IdentitySpec("id05", "hopper", morph=0.75, face_width=1.1, jaw_width=1.1, skin_lab=(6, 2, -2),
                 hair_rgb=(210, 170, 90), clothing_hue_deg=300, background=((60, 60, 70), (20, 20, 25))),
    IdentitySpec("id06", "astronaut", morph=0.45, face_height=0.94, eye_spacing=0.95, skin_lab=(-6, 12, 10),
                 hair_rgb=(120, 30, 20), clothing_hue_deg=240, background=((230, 230, 235), (170, 175, 185)), mirror=True),
    IdentitySpec("id07", "hopper", morph=0.5, face_width=0.95, face_height=1.08, skin_lab=(-18, 8, 16),
                 hair_rgb=(40, 30, 25), clothing_hue_deg=30, background=((150, 80, 60), (60, 30, 25))),
    IdentitySpec("id08", "astronaut", morph=0.1, jaw_width=1.12, eye_spacing=0.96, skin_lab=(8, 0, -4),
                 hair_rgb=(230, 220, 200), clothing_hue_deg=160, background=((100, 100, 160), (40, 40, 90))),
    IdentitySpec("id09", "hopper", morph=0.35, face_width=1.05, jaw_width=0.9, skin_lab=(-30, 12, 22),
                 hair_rgb=(20, 15, 12), clothing_hue_deg=90, background=((180, 150, 200), (90, 60, 110)), mirror=True),
    IdentitySpec("id10", "astronaut", morph=0.6, face_height=1.1, eye_spacing=1.04, skin_lab=(2, 14, 8),
                 hair_rgb=(95, 60, 35), clothing_hue_deg=270, background=((60, 120, 130), (20, 50, 60)), mirror=True),
    IdentitySpec("id11", "hopper", morph=0.9, face_width=0.9, face_height=0.96, skin_lab=(-10, 4, 12),
                 hair_rgb=(70, 50, 40), clothing_hue_deg=330, background=((210, 200, 120), (130, 110, 50))),
    # test people
    IdentitySpec("test0", "astronaut", morph=0.0, face_width=1.12, face_height=0.95, jaw_width=1.05,
                 skin_lab=(-20, 14, 18), hair_rgb=(180, 60, 30), clothing_hue_deg=180,
                 background=((70, 90, 70), (25, 35, 25)), mirror=True, split="test"),
    IdentitySpec("test1", "hopper", morph=0.1, face_width=0.92, face_height=1.1, eye_spacing=1.07,
                 skin_lab=(5, 6, 0), hair_rgb=(30, 25, 20), clothing_hue_deg=100,
                 background=((120, 150, 200), (50, 70, 110)), split="test"),
    IdentitySpec("test2", "astronaut", morph=0.5, face_width=1.02, jaw_width=0.88, eye_spacing=0.94,
                 skin_lab=(-35, 10, 24), hair_rgb=(200, 190, 160), clothing_hue_deg=45,
                 background=((200, 120, 130), (100, 50, 60)), split="test"),
)


@dataclass(frozen=True)
class FacePhoto:
    """A still photo of one person and where its face is: ``image`` uint8 [H, W, 3] RGB,
    ``landmarks`` float [68, 2] (x, y pixels, dlib's 68-point layout)."""

    image: np.ndarray
    landmarks: np.ndarray

    @property
    def face_centre(self) -> tuple[float, float]:
        lo, hi = self.landmarks.min(0), self.landmarks.max(0)
        return float((lo[0] + hi[0]) / 2), float((lo[1] + hi[1]) / 2)

    @property
    def face_size(self) -> float:
        """Side of the landmark box (the larger of width and height), pixels."""
        return float((self.landmarks.max(0) - self.landmarks.min(0)).max())

    @property
    def mouth_centre(self) -> tuple[float, float]:
        c = self.landmarks[60:68].mean(0)
        return float(c[0]), float(c[1])

    @property
    def mouth_width(self) -> float:
        return float(np.linalg.norm(self.landmarks[54] - self.landmarks[48]))


def _landmarks_of(image: np.ndarray, what: str) -> np.ndarray:
    lm, found = DlibDetector(detect_max_side=None).detect(image[None])
    if not found[0]:
        raise IdentityError(f"{what}: no face found by dlib")
    return lm[0].astype(np.float64)


@lru_cache(maxsize=None)
def source_photo(name: PhotoName) -> FacePhoto:
    """One of the two source photos with its landmarks (found once per process)."""
    from PIL import Image

    if name == "astronaut":
        from skimage import data

        image = np.ascontiguousarray(data.astronaut()[..., :3])
    elif name == "hopper":
        from matplotlib import cbook

        with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
            image = np.asarray(im.convert("RGB"))
    else:
        raise ValueError(f"unknown source photo {name!r}: one of {sorted(PHOTO_SOURCES)}")
    return FacePhoto(image, _landmarks_of(image, f"source photo {name}"))


def _ring(centre: np.ndarray, radius: float, n: int = 16) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return centre + radius * np.stack([np.cos(a), np.sin(a)], axis=1)


def _warp_to(image: np.ndarray, src_pts: np.ndarray, dst_pts: np.ndarray, centre: np.ndarray,
             radius: float) -> np.ndarray:
    """``image`` (float [H, W, 3]) warped so that ``src_pts`` move to ``dst_pts`` by a piecewise
    affine map that is the identity on a ring of ``radius`` px around ``centre`` (and so outside
    it): only the square window holding the ring is resampled."""
    from skimage.transform import PiecewiseAffineTransform, warp

    h, w = image.shape[:2]
    x0, y0 = (max(0, int(centre[i] - radius - 2)) for i in (0, 1))
    x1, y1 = min(w, int(centre[0] + radius + 3)), min(h, int(centre[1] + radius + 3))
    ring = _ring(centre, radius)
    offset = np.array([x0, y0], np.float64)
    corners = np.array([[x0, y0], [x1 - 1, y0], [x0, y1 - 1], [x1 - 1, y1 - 1]], np.float64)
    src = np.concatenate([src_pts, ring, corners]) - offset
    dst = np.concatenate([dst_pts, ring, corners]) - offset
    # warp() maps output coordinates to input ones: the transform goes from dst to src
    tform = PiecewiseAffineTransform.from_estimate(dst, src)
    if not tform:
        raise IdentityError("piecewise-affine warp could not be estimated")
    out = image.copy()
    out[y0:y1, x0:x1] = warp(image[y0:y1, x0:x1], tform, order=1, mode="edge")
    return out


def _feather(mask: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return np.clip(gaussian_filter(mask.astype(np.float64), sigma), 0.0, 1.0)


def _polygon_mask(shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    from skimage.draw import polygon

    mask = np.zeros(shape, dtype=bool)
    rr, cc = polygon(points[:, 1], points[:, 0], shape)
    mask[rr, cc] = True
    return mask


def _ellipse_mask(shape: tuple[int, int], centre: tuple[float, float], axes: tuple[float, float]) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return ((xx - centre[0]) / axes[0]) ** 2 + ((yy - centre[1]) / axes[1]) ** 2 <= 1.0


@dataclass(frozen=True)
class RegionMasks:
    """Soft masks float [H, W] in 0..1 of one photo: ``face`` (landmark hull raised to the
    forehead), ``hair`` (head ellipse around the face), ``clothing`` (below the chin) and
    ``person`` (head and shoulders; the background is ``1 - person``)."""

    face: np.ndarray
    hair: np.ndarray
    clothing: np.ndarray
    person: np.ndarray


def region_masks(shape: tuple[int, int], landmarks: np.ndarray) -> RegionMasks:
    lo, hi = landmarks.min(0), landmarks.max(0)
    size = float((hi - lo).max())
    cx = float((lo[0] + hi[0]) / 2)
    brow_top = float(landmarks[_BROWS, 1].min())
    chin = float(landmarks[8, 1])
    forehead = landmarks[_BROWS[::-1]].copy()
    forehead[:, 1] -= 0.3 * size
    face = _polygon_mask(shape, np.concatenate([landmarks[_JAW], forehead]))
    head_c = (cx, (brow_top + chin) / 2 - 0.12 * size)
    head = _ellipse_mask(shape, head_c, (0.78 * size, 0.95 * size))
    neck_y = chin + 0.05 * size
    h = shape[0]
    body_pts = np.array([[cx - 0.32 * size, neck_y - 0.2 * size], [cx + 0.32 * size, neck_y - 0.2 * size],
                         [cx + 0.45 * size, neck_y + 0.35 * size], [cx + 1.7 * size, neck_y + 0.8 * size],
                         [cx + 1.9 * size, h + 1], [cx - 1.9 * size, h + 1],
                         [cx - 1.7 * size, neck_y + 0.8 * size], [cx - 0.45 * size, neck_y + 0.35 * size]])
    body = _polygon_mask(shape, body_pts)
    sigma = 0.04 * size
    face_s = _feather(face, sigma)
    person = _feather(head | body | face, sigma * 1.5)
    rows = np.arange(shape[0])[:, None]  # y of each pixel row, broadcast over the columns
    hair = _feather(head & ~face & (rows < chin), sigma) * (1 - face_s)
    below = rows > chin + 0.3 * size
    clothing = _feather(body & below, sigma) * (1 - face_s)
    return RegionMasks(face_s, np.clip(hair, 0, 1), np.clip(clothing, 0, 1), person)


def _lab(image: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(image)


def _rgb(lab: np.ndarray) -> np.ndarray:
    """Lab -> sRGB 0..1; colours outside the gamut are clipped (expected after a recolouring)."""
    import warnings

    from skimage.color import lab2rgb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "negative Z values clipped": out-of-gamut colours
        return np.clip(lab2rgb(lab), 0.0, 1.0)


def _background(shape: tuple[int, int], top: tuple[int, int, int], bottom: tuple[int, int, int],
                rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter, zoom

    h, w = shape
    t = np.linspace(0, 1, h)[:, None, None]
    grad = (1 - t) * np.asarray(top, np.float64) / 255 + t * np.asarray(bottom, np.float64) / 255
    small = rng.normal(0, 1, size=(8, 8, 3))
    tex = zoom(small, (h / 8, w / 8, 1), order=3)[:h, :w]
    tex = gaussian_filter(tex, (h / 40, w / 40, 0))
    return np.clip(np.broadcast_to(grad, (h, w, 3)) + 0.06 * tex, 0, 1)


def build_identity(spec: IdentitySpec) -> FacePhoto:
    """The still photo of ``spec``'s person (deterministic), with its landmarks found again by
    dlib on the result (an identity whose face dlib cannot find is an :class:`IdentityError`)."""
    base = source_photo(spec.base)
    if spec == IdentitySpec(spec.name, spec.base, split=spec.split):
        return base  # the photo as it is
    other = source_photo("hopper" if spec.base == "astronaut" else "astronaut")
    img = base.image.astype(np.float64) / 255.0
    h, w = img.shape[:2]
    lm = base.landmarks
    centre = lm.mean(0)
    size = float((lm.max(0) - lm.min(0)).max())

    # target landmarks: morph, then face shape
    target = lm.copy()
    if spec.morph > 0:
        from skimage.transform import SimilarityTransform, warp

        sim = SimilarityTransform.from_estimate(other.landmarks, lm)
        other_img = warp(other.image.astype(np.float64) / 255.0, sim.inverse, output_shape=(h, w), mode="edge")
        other_lm = sim(other.landmarks)
        target = (1 - spec.morph) * lm + spec.morph * other_lm
    c = target.mean(0)
    target = c + (target - c) * np.array([spec.face_width, spec.face_height])
    jaw_c = target[_JAW].mean(0)
    lower = _JAW[3:14]
    target[lower, 0] = jaw_c[0] + (target[lower, 0] - jaw_c[0]) * spec.jaw_width
    eye_c = target[_EYES].mean(0)
    for idx in (np.arange(36, 42), np.arange(42, 48), np.arange(17, 22), np.arange(22, 27)):
        shift = (target[idx].mean(0)[0] - eye_c[0]) * (spec.eye_spacing - 1)
        target[idx, 0] += shift
    out = _warp_to(img, lm, target, centre, 1.7 * size)
    if spec.morph > 0:
        theirs = _warp_to(other_img, other_lm, target, centre, 1.7 * size)
        face = region_masks((h, w), target).face[..., None]
        out = out * (1 - spec.morph * face) + theirs * (spec.morph * face)

    masks = region_masks((h, w), target)
    lab = _lab(out)
    lab += masks.face[..., None] * np.asarray(spec.skin_lab, np.float64)
    if spec.hair_rgb is not None:
        hair_lab = _lab(np.asarray(spec.hair_rgb, np.float64).reshape(1, 1, 3) / 255.0)[0, 0]
        m = masks.hair[..., None]
        # keep the hair's texture (lightness detail), move its mean lightness and colour
        new = np.empty_like(lab)
        new[..., 0] = hair_lab[0] + 0.6 * (lab[..., 0] - 50.0)
        new[..., 1:] = hair_lab[1:]
        lab = lab * (1 - m) + new * m
    if spec.clothing_hue_deg:
        a = np.radians(spec.clothing_hue_deg)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        ab = lab[..., 1:] @ rot.T * 1.3
        m = masks.clothing[..., None]
        lab[..., 1:] = lab[..., 1:] * (1 - m) + ab * m
    out = _rgb(lab)
    if spec.background is not None:
        rng = np.random.default_rng([ord(ch) for ch in spec.name])
        bg = _background((h, w), spec.background[0], spec.background[1], rng)
        p = masks.person[..., None]
        out = out * p + bg * (1 - p)
    image = (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
    if spec.mirror:
        image = np.ascontiguousarray(image[:, ::-1])
        target = target.copy()
        target[:, 0] = w - 1 - target[:, 0]
    found = _landmarks_of(image, f"identity {spec.name}")
    miss = np.linalg.norm(found.mean(0) - target.mean(0))
    if miss > 0.25 * size:  # dlib found something else (a badge, a patch) rather than the face
        raise IdentityError(f"identity {spec.name}: dlib's face is {miss:.0f} px from the built face "
                            f"(face size {size:.0f} px)")
    return FacePhoto(image, found)


@lru_cache(maxsize=None)
def identity_photo(name: str) -> FacePhoto:
    """:func:`build_identity` of the identity called ``name`` in :data:`IDENTITIES`, built once
    per process."""
    for spec in IDENTITIES:
        if spec.name == name:
            return build_identity(spec)
    raise ValueError(f"unknown identity {name!r}: one of {[s.name for s in IDENTITIES]}")
