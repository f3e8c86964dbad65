"""Portraits of every pixel format decode to the right 8-bit RGB (pipelines/media/images.py), and a
greyscale or 16-bit PNG portrait is cropped on its face like a colour one (inference/portrait.py)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.config import load_platform_config
from inference.portrait import PortraitCropper, load_image
from pipelines.media.images import image_to_rgb
from pipelines.samples.identities import source_photo


def grey_ramp() -> np.ndarray:
    return np.tile(np.arange(256, dtype=np.uint8), (4, 1))  # [4, 256] 0..255


@pytest.mark.parametrize("mode", ["L", "I;16", "I", "F", "LA", "RGBA", "P"])
def test_each_mode_gives_the_same_8_bit_picture(mode):
    ramp = grey_ramp()
    if mode == "I;16":
        img = Image.fromarray(ramp.astype(np.uint16) * 257)
        assert img.mode.startswith("I;16")
    elif mode == "I":
        img = Image.fromarray(ramp.astype(np.int32) * 257)
    elif mode == "F":
        img = Image.fromarray(ramp.astype(np.float32) / 255.0)
    else:
        img = Image.fromarray(ramp).convert(mode)
    rgb = image_to_rgb(img)
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 256, 3)
    assert np.abs(rgb[..., 0].astype(int) - ramp).max() <= 1, mode
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_transparent_pixels_are_laid_on_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, ..., 3] = 255  # top half opaque red-ish, bottom half fully transparent
    rgb = image_to_rgb(Image.fromarray(rgba, "RGBA"))
    assert (rgb[:4, :, 0] == 200).all() and (rgb[4:] == 255).all()


@pytest.fixture(scope="module")
def cropper():
    return PortraitCropper.from_config(load_platform_config(None, []))


@pytest.mark.parametrize("kind", ["colour", "grey", "grey16", "rgba"])
def test_portrait_of_any_format_is_cropped_on_its_face(tmp_path, cropper, kind):
    photo = source_photo("astronaut").image
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    path = tmp_path / f"{kind}.png"
    if kind == "colour":
        Image.fromarray(photo).save(path)
    elif kind == "grey":
        Image.fromarray(grey).save(path)
    elif kind == "grey16":
        Image.fromarray(grey.astype(np.uint16) * 257).save(path)
        with Image.open(path) as check:
            assert check.mode.startswith("I")  # really a 16-bit file
    else:
        Image.fromarray(np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)]), "RGBA").save(path)
    image = load_image(path)
    assert image.dtype == np.uint8 and image.shape == photo.shape
    if kind in ("grey", "grey16"):
        assert abs(float(image.mean()) - float(grey.mean())) < 1.0  # not clipped to white
    landmarks = cropper.landmarks(image)
    assert landmarks is not None
    want = source_photo("astronaut").landmarks
    assert np.abs(landmarks.mean(0) - want.mean(0)).max() < 8  # the same face, in the same place


@pytest.mark.parametrize("kind", ["grey", "grey16"])
def test_the_services_upload_check_decodes_them_the_same_way(kind):
    """serve.validation.decode_image (the service's 'image' field) gives the pixels load_image gives."""
    import io

    from serve.validation import decode_image

    grey = np.asarray(Image.fromarray(source_photo("astronaut").image).convert("L"))
    img = Image.fromarray(grey.astype(np.uint16) * 257 if kind == "grey16" else grey)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    rgb = decode_image(buf.getvalue())
    assert rgb.shape == (*grey.shape, 3) and np.abs(rgb[..., 1].astype(int) - grey).max() <= 1
