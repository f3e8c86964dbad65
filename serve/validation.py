"""Checks of what a client sends, before a job is queued. Client bytes are parsed here, once.

Every check raises :class:`UploadError` with the HTTP status and the name of the offending form
field, so the client gets e.g. ``422 {"field": "audio", "error": "audio: audio is silent ..."}``.
Messages never carry a server path, a traceback or a decoder's own text (only its error class).

* sizes: each upload at most ``max_upload_mb`` (413);
* ``image`` (:func:`decode_image`): JPEG, PNG or WebP only (Pillow's ``formats=``), its pixel count
  read from the header and capped **before** any pixel is decoded, every decoder error mapped to
  422; it must show a face (the ingest detector, :mod:`inference.portrait`). The service keeps
  only its own re-encoding (:func:`encode_png`), never the client's bytes;
* ``audio`` (:func:`decode_audio_upload`): opened by PyAV with a demuxer whitelist
  (:data:`AUDIO_DEMUXERS`: no playlists, no ``concat``, nothing that opens other URLs) and a
  ``file``-only protocol whitelist; channels, sample rate and the claimed duration are checked
  from the header before decoding; at most ``max_audio_s + 1`` seconds are decoded, within a wall
  time limit; it must not be silent. The service keeps only the decoded 16 kHz mono PCM as a WAV
  it writes itself (:func:`encode_wav`): the worker and its ``ffmpeg`` read nothing else;
* options: only the known names, each at most once (400 naming it), written in ASCII digits
  (``12``, ``4.5``: no signs, exponents, underscores or other scripts' digits), parsed and
  range-checked (422 naming the option), and the request's frames x steps within
  ``serve.max_frame_steps`` (:func:`check_budget`); the audio must be sampled at
  ``serve.min_audio_rate_hz`` or more and last at least one frame at the request's fps (422).
"""
from __future__ import annotations

import dataclasses
import io
import math
import re
import time
import wave
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

from core.sections import SamplerConfig
from inference.errors import BadInputError
from pipelines.media.images import image_to_rgb
from serve.errors import UploadError

IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
"""Pillow decoders a client image may use (the only ones Pillow is allowed to try)."""
AUDIO_DEMUXERS = ("wav", "mp3", "ogg", "flac", "mov", "mp4", "m4a", "matroska", "webm", "aac", "aiff")
"""FFmpeg demuxers a client audio file may use: single-file formats that open no other URL."""
AUDIO_RATE = 16000  # Hz: what the service stores and the sampler decodes to
MAX_DECODE_S = 10.0  # wall-time limit of decoding one upload's audio


def check_size(num_bytes: int, field: str, max_bytes: int) -> None:
    """413 when an upload is larger than ``max_bytes``; 422 when empty."""
    if num_bytes > max_bytes:
        raise UploadError(413, field, f"upload is larger than the limit of {max_bytes // (1024 * 1024)} MB")
    if num_bytes == 0:
        raise UploadError(422, field, "upload is empty")


# --- image -----------------------------------------------------------------------------------------

def decode_image(data: bytes, field: str = "image", max_pixels: int = 16_000_000) -> np.ndarray:
    """Decode JPEG / PNG / WebP bytes (EXIF orientation applied, first frame of an animation) to
    uint8 RGB ``[H, W, 3]``. 422 for any other format, a header above ``max_pixels``, any decoder
    error, or an image under 16x16 pixels."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            width, height = img.size  # from the header; nothing decoded yet
            if width * height > max_pixels:
                raise UploadError(422, field, f"image of {width}x{height} pixels is larger than "
                                              f"{max_pixels / 1e6:g} megapixels")
            img.load()
            upright = ImageOps.exif_transpose(img)  # phone photos: apply the EXIF orientation
            if upright.size[0] * upright.size[1] > max_pixels:
                raise UploadError(422, field, "image is larger than the pixel limit")
            rgb = image_to_rgb(upright)  # 16-bit, greyscale, transparent: pipelines/media/images.py
    except UploadError:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard, at twice its MAX_IMAGE_PIXELS
        raise UploadError(422, field, f"image is larger than {max_pixels / 1e6:g} megapixels") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the client's bytes: 422
        raise UploadError(422, field, f"not a decodable JPEG, PNG or WebP image ({type(exc).__name__})") from None
    if rgb.ndim != 3 or min(rgb.shape[:2]) < 16:
        raise UploadError(422, field, f"image of shape {rgb.shape} is too small (at least 16x16 pixels)")
    return rgb


def encode_png(rgb: np.ndarray) -> bytes:
    """uint8 RGB ``[H, W, 3]`` -> PNG bytes (the service's own encoding of a checked image)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def read_png(data: bytes) -> np.ndarray:
    """The service's own PNG (:func:`encode_png`) -> uint8 RGB ``[H, W, 3]``; PNG only."""
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=("PNG",)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def check_face(image: np.ndarray, find_landmarks: Callable[[np.ndarray], Optional[np.ndarray]],
               field: str = "image") -> np.ndarray:
    """The subject's 68 landmarks [68, 2] (pixels of ``image``, uint8 [H, W, 3]) found by the
    ingest face detector (``find_landmarks``: :meth:`inference.portrait.PortraitCropper.landmarks`).
    422 when it finds no face, or several faces of similar size
    (:class:`inference.portrait.SeveralFacesError`, a message with no path)."""
    try:
        found = find_landmarks(image)
    except BadInputError as exc:
        raise UploadError(422, field, str(exc)) from None
    if found is None:
        raise UploadError(422, field, "no face found in the image (a frontal portrait is needed)")
    return np.asarray(found, np.float32)


# --- audio -----------------------------------------------------------------------------------------

@dataclass
class CheckedAudio:
    """A client's audio after the check: float32 mono ``samples`` at ``sample_rate`` Hz."""

    samples: np.ndarray
    sample_rate: int
    source_rate: int
    source_channels: int
    format: str

    @property
    def duration_s(self) -> float:
        return self.samples.shape[0] / self.sample_rate


def decode_audio_upload(path: str | Path, max_audio_s: float, field: str = "audio", max_channels: int = 2,
                        max_rate_hz: int = 96000, sample_rate: int = AUDIO_RATE,
                        max_decode_s: float = MAX_DECODE_S, min_rate_hz: int = 8000) -> CheckedAudio:
    """Decode the first audio stream of the client file ``path`` to mono float32 at
    ``sample_rate`` Hz. 422 for a demuxer outside :data:`AUDIO_DEMUXERS`, no audio stream, more
    than ``max_channels`` channels, a rate above ``max_rate_hz`` or below ``min_rate_hz`` Hz (a
    phone line is 8 kHz; less holds no intelligible speech), a claimed duration above ``max_audio_s``,
    a decode error, more than ``max_audio_s`` seconds of decoded audio (at most ``max_audio_s + 1``
    seconds are decoded), or a decode slower than ``max_decode_s`` seconds."""
    import av

    options = {"format_whitelist": ",".join(AUDIO_DEMUXERS), "protocol_whitelist": "file",
               "probesize": str(5 * 2**20), "analyzeduration": str(5_000_000)}
    try:
        container = av.open(str(path), mode="r", options=options, timeout=max_decode_s)
    except Exception as exc:  # noqa: BLE001
        raise UploadError(422, field, "not decodable audio (not a WAV, MP3, Ogg, FLAC, AAC, AIFF, "
                                      f"MP4 or Matroska file; {type(exc).__name__})") from None
    started = time.monotonic()
    try:
        if not container.streams.audio:
            raise UploadError(422, field, "not decodable audio (the file has no audio stream)")
        stream = container.streams.audio[0]
        ctx = stream.codec_context
        channels = int(ctx.channels or 0)
        rate = int(ctx.sample_rate or 0)
        if channels > max_channels:
            raise UploadError(422, field, f"audio has {channels} channels; at most {max_channels} are accepted")
        if rate > max_rate_hz:
            raise UploadError(422, field, f"audio sample rate of {rate} Hz is above the limit of {max_rate_hz} Hz")
        if rate < min_rate_hz:
            raise UploadError(422, field, f"audio sample rate of {rate} Hz is below the floor of {min_rate_hz} Hz")
        claimed = _claimed_duration_s(container, stream)
        if claimed is not None and claimed > max_audio_s + 1.0:
            raise UploadError(422, field, f"audio is longer than the limit of {max_audio_s:g} s")
        keep = int(round((max_audio_s + 1.0) * sample_rate))
        chunks: list[np.ndarray] = []
        kept = 0
        resampler = None
        for frame in container.decode(stream):
            if frame.layout.nb_channels > max_channels or not min_rate_hz <= frame.sample_rate <= max_rate_hz:
                raise UploadError(422, field, f"audio changes to {frame.layout.nb_channels} channels at "
                                              f"{frame.sample_rate} Hz mid-stream")
            if resampler is None:
                resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
                kept += chunks[-1].shape[0]
            if kept > keep:
                break
            if time.monotonic() - started > max_decode_s:
                raise UploadError(422, field, f"audio took longer than {max_decode_s:g} s to decode")
        if resampler is not None and kept <= keep:
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
    except UploadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the client's bytes: 422
        raise UploadError(422, field, f"not decodable audio ({type(exc).__name__})") from None
    finally:
        container.close()
    samples = np.clip(np.concatenate(chunks) if chunks else np.zeros(0, np.float32), -1.0, 1.0)
    if samples.shape[0] > int(round(max_audio_s * sample_rate)):
        raise UploadError(422, field, f"audio is longer than the limit of {max_audio_s:g} s")
    return CheckedAudio(samples, sample_rate, rate, channels, container.format.name)


def _claimed_duration_s(container, stream) -> Optional[float]:
    """The duration the header claims (stream, else container), in seconds, or None."""
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def check_audio(audio: CheckedAudio, field: str = "audio", silence_dbfs: float = -50.0, fps: float = 25.0) -> None:
    """422 when the decoded audio is shorter than one video frame at ``fps`` (40 ms at 25 fps; the
    video would have no frame) or silent (RMS below ``silence_dbfs``)."""
    if frames_for(audio.duration_s, fps) < 1:
        raise UploadError(422, field, f"audio of {audio.duration_s:.3f} s is shorter than one frame "
                                      f"({1000.0 / fps:.0f} ms at {fps:g} fps)")
    rms = float(np.sqrt(np.mean(np.square(audio.samples, dtype=np.float64))))
    if rms <= 0 or 20 * math.log10(rms) < silence_dbfs:
        raise UploadError(422, field, f"audio is silent (RMS level below {silence_dbfs:g} dBFS)")


def encode_wav(samples: np.ndarray, sample_rate: int) -> bytes:
    """float32 mono samples in [-1, 1] -> 16-bit PCM WAV bytes (written by the service)."""
    pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


# --- options ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OptionRule:
    kind: type
    lo: float
    hi: float


INT_TEXT = re.compile(r"[0-9]{1,12}", re.ASCII)
NUMBER_TEXT = re.compile(r"[0-9]{1,12}(\.[0-9]{1,12})?", re.ASCII)
"""The only spellings an option value may have (all ranges are non-negative)."""

OPTION_RULES: dict[str, OptionRule] = {
    "steps": OptionRule(int, 1, 200),
    "audio_ratio": OptionRule(float, 0.0, 20.0),
    "ref_ratio": OptionRule(float, 0.0, 20.0),
    "reference_init": OptionRule(float, 0.0, 1.0),  # 0 = from pure noise (docs/METHOD.md 9)
    "noise_scale": OptionRule(float, 0.0, 1.0),  # the starting noise's scale; 1 = the paper's (docs/METHOD.md 9)
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
            raise UploadError(422, name[:64], f"unknown option; valid options: {', '.join(sorted(OPTION_RULES))}")
        rule = OPTION_RULES[name]
        if value is None or (isinstance(value, str) and value == ""):
            continue
        text = str(value)
        # Python's int() / float() also take other scripts' digits, '_', signs, spaces, 'inf', '1e3'
        pattern = INT_TEXT if rule.kind is int else NUMBER_TEXT
        if not pattern.fullmatch(text):
            raise UploadError(422, name, f"expected {'an integer' if rule.kind is int else 'a number'} in ASCII "
                                        f"digits{'' if rule.kind is int else ' (like 4.5)'}, got {text[:40]!r}")
        parsed: Any = int(text) if rule.kind is int else float(text)
        if not rule.lo <= parsed <= rule.hi:
            raise UploadError(422, name, f"{parsed} is outside the allowed range [{rule.lo:g}, {rule.hi:g}]")
        if name == "size" and parsed % 2:
            raise UploadError(422, name, f"size must be even (video encoders need it), got {parsed}")
        values[name] = parsed
    return dataclasses.replace(defaults, **values)


def options_to_json(options: SamplerConfig) -> dict[str, Any]:
    """The client-settable fields of a request's options (what a job records and a worker reads)."""
    return {name: getattr(options, name) for name in OPTION_RULES}


def frames_for(duration_s: float, fps: float) -> int:
    """Frames the sampler makes for ``duration_s`` of audio (the ingest rule: whole frames)."""
    return int(math.floor(duration_s * fps + 1e-9))


def check_budget(num_frames: int, steps: int, max_frame_steps: int) -> None:
    """422 (field ``steps``) when ``num_frames x steps`` exceeds ``serve.max_frame_steps``."""
    if num_frames * steps > max_frame_steps:
        raise UploadError(422, "steps", f"{num_frames} frames x {steps} steps = {num_frames * steps} is above "
                                        f"the limit of {max_frame_steps} per request; use fewer steps or "
                                        f"shorter audio")


FILE_FIELDS = ("image", "audio")


@dataclass
class ParsedForm:
    """A multipart form split into its two uploads (``files["image"]``, ``files["audio"]``: the
    parser's upload objects) and the request's sampling options."""

    files: dict[str, Any]
    options: SamplerConfig


def check_content_length(header: Optional[str], limit_bytes: int) -> None:
    """413 when a ``Content-Length`` is not a number or above ``limit_bytes`` (the body is
    counted again while it is read: a missing or false header does not get past the limit)."""
    if header is None:
        return
    if not header.isdigit() or int(header) > limit_bytes:
        raise UploadError(413, "body", f"request is larger than the limit of {limit_bytes // (1024 * 1024)} MB")


def parse_form(items: Iterable[tuple[str, Any]], defaults: SamplerConfig, max_upload_bytes: int) -> ParsedForm:
    """``items``: the form's ``(name, value)`` pairs (``FormData.multi_items()``); an upload has a
    ``read`` method and a ``size`` (bytes, or None when the parser does not know it).
    400 for a field given twice (which one would count is the client's guess, not ours); 422 for a
    file field other than ``image`` / ``audio``, a missing one, or a bad option; 413 for an upload
    whose known size is above ``max_upload_bytes`` (checked again after reading)."""
    files: dict[str, Any] = {}
    raw_options: dict[str, Any] = {}
    for key, value in items:
        if key in files or key in raw_options:
            raise UploadError(400, key[:64], "field given more than once")
        if hasattr(value, "read"):
            if key not in FILE_FIELDS:
                raise UploadError(422, key[:64], "unexpected file field; send 'image' and 'audio'")
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
