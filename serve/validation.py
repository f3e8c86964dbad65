"""Checks of what a client sends, before a job is queued.

Every check raises :class:`UploadError` with the HTTP status and the name of the offending form
field, so the client gets e.g. ``422 {"field": "audio", "error": "audio is silent ..."}``.
Content is checked by decoding it (never by file name or extension):

* sizes: each upload at most ``max_upload_mb`` (413);
* ``image``: decodes as an image (Pillow, decompression-bomb guard), and shows a face, found by the
  same detector as ingest (:mod:`inference.portrait`) (422);
* ``audio``: decodes with the ingest decoder (:func:`pipelines.audio_decode.decode_audio`), is not
  silent, and lasts at most ``max_audio_s`` seconds (422);
* options: only the known names, each parsed and range-checked (422 naming the option);
* the form itself: exactly the file fields ``image`` and ``audio`` plus option fields
  (:func:`parse_form`), and a ``Content-Length`` within the limit (:func:`check_content_length`).
"""
from __future__ import annotations

import dataclasses
import hmac
import io
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

from core.sections import SamplerConfig
from pipelines.audio_decode import AudioDecodeError, decode_audio, is_silent
from serve.errors import UploadError

MAX_IMAGE_PIXELS = 40_000_000  # 40 MP; larger images are refused before decoding the pixels


def check_size(num_bytes: int, field: str, max_bytes: int) -> None:
    """413 when an upload is larger than ``max_bytes``; 422 when empty."""
    if num_bytes > max_bytes:
        raise UploadError(413, field, f"upload is larger than the limit of {max_bytes // (1024 * 1024)} MB")
    if num_bytes == 0:
        raise UploadError(422, field, "upload is empty")


def decode_image(data: bytes, field: str = "image") -> np.ndarray:
    """Decode image bytes (any format Pillow reads, EXIF orientation applied) to uint8 RGB
    ``[H, W, 3]``; 422 if not an image."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise UploadError(422, field, f"image of {width}x{height} pixels is larger than "
                                             f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels")
            img.load()
            upright = ImageOps.exif_transpose(img)  # phone photos: apply the EXIF orientation
            rgb = np.asarray(upright.convert("RGB"), dtype=np.uint8)
    except UploadError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UploadError(422, field, f"not a decodable image ({type(exc).__name__})") from exc
    if rgb.ndim != 3 or min(rgb.shape[:2]) < 16:
        raise UploadError(422, field, f"image of shape {rgb.shape} is too small (at least 16x16 pixels)")
    return rgb


def check_face(image: np.ndarray, has_face: Callable[[np.ndarray], bool], field: str = "image") -> None:
    """422 when the ingest face detector finds no face in ``image`` (uint8 [H, W, 3])."""
    if not has_face(image):
        raise UploadError(422, field, "no face found in the image (a frontal portrait is needed)")


def check_audio(path: str | Path, max_audio_s: float, field: str = "audio",
                silence_dbfs: float = -50.0):
    """Decode ``path`` with the ingest decoder; 422 when not audio, silent, or longer than
    ``max_audio_s`` seconds. Returns the decoded :class:`pipelines.audio_decode.AudioTrack`
    (16 kHz mono). At most ``max_audio_s + 1`` seconds are decoded (bounded memory)."""
    try:
        track = decode_audio(path, sample_rate=16000, duration_s=max_audio_s + 1.0)
    except AudioDecodeError as exc:
        reason = str(exc).split(": ", 1)[-1]  # drop the server-side path from the message
        raise UploadError(422, field, f"not decodable audio ({reason})") from exc
    if track.duration_s > max_audio_s:
        raise UploadError(422, field, f"audio is longer than the limit of {max_audio_s:g} s")
    if track.duration_s < 0.04:
        raise UploadError(422, field, f"audio of {track.duration_s:.3f} s is shorter than one frame (40 ms)")
    if is_silent(track.samples, silence_dbfs):
        raise UploadError(422, field, f"audio is silent (RMS level below {silence_dbfs:g} dBFS)")
    return track


# --- options ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OptionRule:
    kind: type
    lo: float
    hi: float


OPTION_RULES: dict[str, OptionRule] = {
    "steps": OptionRule(int, 1, 200),
    "audio_ratio": OptionRule(float, 0.0, 20.0),
    "ref_ratio": OptionRule(float, 0.0, 20.0),
    "seed": OptionRule(int, 0, 2**31 - 1),
    "fps": OptionRule(float, 1.0, 60.0),
    "size": OptionRule(int, 16, 1024),
}
"""Options a client may set (names of :class:`core.sections.SamplerConfig` fields) and their closed ranges."""


def parse_options(raw: Mapping[str, Any], defaults: SamplerConfig) -> SamplerConfig:
    """Build the request's :class:`SamplerConfig` from form values (strings) over ``defaults``.
    422 naming the option for an unknown name, a value of the wrong type, or one out of range."""
    known = {f.name for f in fields(SamplerConfig)}
    assert set(OPTION_RULES) <= known
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in OPTION_RULES:
            raise UploadError(422, name, f"unknown option; valid options: {', '.join(sorted(OPTION_RULES))}")
        rule = OPTION_RULES[name]
        if value is None or (isinstance(value, str) and value.strip() == ""):
            continue
        try:
            if rule.kind is int:
                parsed: Any = int(str(value).strip())
            else:
                parsed = float(str(value).strip())
                if parsed != parsed:  # NaN
                    raise ValueError("NaN")
        except ValueError:
            raise UploadError(422, name, f"expected {'an integer' if rule.kind is int else 'a number'}, "
                                        f"got {str(value)[:40]!r}") from None
        if not rule.lo <= parsed <= rule.hi:
            raise UploadError(422, name, f"{parsed} is outside the allowed range [{rule.lo:g}, {rule.hi:g}]")
        if name == "size" and parsed % 2:
            raise UploadError(422, name, f"size must be even (video encoders need it), got {parsed}")
        values[name] = parsed
    return dataclasses.replace(defaults, **values)


def options_to_json(options: SamplerConfig) -> dict[str, Any]:
    """The client-settable fields of a request's options (what a job records and a worker reads)."""
    return {name: getattr(options, name) for name in OPTION_RULES}


FILE_FIELDS = ("image", "audio")


@dataclass
class ParsedForm:
    """A multipart form split into its two uploads (``files["image"]``, ``files["audio"]``: the
    parser's upload objects, not read yet) and the request's sampling options."""

    files: dict[str, Any]
    options: SamplerConfig


def check_content_length(header: Optional[str], limit_bytes: int) -> None:
    """411 without a ``Content-Length``; 413 when it is not a number or above ``limit_bytes``."""
    if header is None:
        raise UploadError(411, "body", "Content-Length is required")
    if not header.isdigit() or int(header) > limit_bytes:
        raise UploadError(413, "body", f"request is larger than the limit of {limit_bytes // (1024 * 1024)} MB")


def parse_form(items: Iterable[tuple[str, Any]], defaults: SamplerConfig, max_upload_bytes: int) -> ParsedForm:
    """``items``: the form's ``(name, value)`` pairs (``FormData.multi_items()``); an upload has a
    ``read`` method and a ``size`` (bytes, or None when the parser does not know it).
    422 for a file field other than ``image`` / ``audio``, a missing one, or a bad option; 413 for
    an upload whose known size is above ``max_upload_bytes`` (checked again after reading)."""
    files: dict[str, Any] = {}
    raw_options: dict[str, Any] = {}
    for key, value in items:
        if hasattr(value, "read"):
            if key not in FILE_FIELDS:
                raise UploadError(422, key, "unexpected file field; send 'image' and 'audio'")
            files[key] = value
        else:
            raw_options[key] = value
    options = parse_options(raw_options, defaults)
    for key in FILE_FIELDS:
        if key not in files:
            raise UploadError(422, key, "missing file field")
        if files[key].size is not None:
            check_size(files[key].size, key, max_upload_bytes)
    return ParsedForm(files, options)


def optional_bearer_ok(header: Optional[str], token: Optional[str]) -> bool:
    """True when no token is configured, or ``header`` is ``Bearer <token>`` (constant-time compare)."""
    if not token:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), token.encode())
