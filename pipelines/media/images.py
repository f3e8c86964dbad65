"""Still images of any pixel format -> uint8 RGB, the one decoding rule of the portrait (the
service's upload check and the CLI share it).

Pillow's ``convert("RGB")`` is right for 8-bit modes but clips wider ones: a 16-bit greyscale
PNG (mode ``I;16``, values 0..65535) comes out almost white. Here each mode is scaled to 0..255
first: 16-bit integer modes by 1/257, 32-bit integer ``I`` by its range (16-bit data stored as
``I`` by some writers, else 0..2**32-1), float ``F`` as 0..1 when it fits there, else 0..255.
Transparent images (``RGBA``, ``LA``, ``P`` with a transparent colour) are laid on white, as a
viewer shows them. Hand-written because Pillow has no "any mode to 8-bit RGB" call.
"""
from __future__ import annotations

import numpy as np

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def image_to_rgb(img) -> np.ndarray:
    """A ``PIL.Image.Image`` of any mode -> uint8 RGB ``[H, W, 3]`` (see the module docstring)."""
    from PIL import Image

    mode = img.mode
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode in _SIXTEEN_BIT:
            a = a / 257.0
        elif mode == "I" and a.max(initial=0) > 65535:  # full 32-bit range
            a = a / (2 ** 32 - 1) * 255.0
        elif mode == "I" and a.max(initial=0) > 255:  # 16-bit data stored as I
            a = a / 257.0
        elif a.max(initial=0) <= 1.0:  # F: 0..1 floats
            a = a * 255.0
        grey = np.clip(a, 0, 255).round().astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)
