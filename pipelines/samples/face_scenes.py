"""Synthetic real-world-like videos with known faces, for the ingest tests and the detector
benchmark (offline, deterministic by seed).

A scene is a textured background with one or more "people": each is a talking-head patch of
``pipelines.samples.talking_heads.TalkingHeadRenderer`` (the astronaut photo, which dlib detects; smooth
head motion, the mouth following the speech loudness) pasted with a soft elliptical edge at a
known place and size. A person can be shown only in some frames (``visible_period`` /
``visible_frames``): a face-like print that the detector sees now and then (the distractor on
clothing of issue 11). The persistent distractors of issue 23 and the second speaker:

* ``body=True``: the person shown down to the chest (4 x 6 face widths), so the astronaut photo's
  mission patch, a face-like print on the suit that dlib finds, moves rigidly with the body;
* ``still=True``: no head motion at all (a poster or a framed photo on the wall);
* ``screen=True``: a hard-edged picture in a dark bezel (a face on a TV or monitor);
* ``mouth``: ``"speech"`` follows the video's audio track (the speaker), ``"other"`` follows
  another utterance that is not in the audio (a second person talking out of sync, a TV),
  ``"closed"`` never moves (a listener, a print);
* ``identity``: one of :data:`pipelines.samples.identities.IDENTITIES` (None: the astronaut photo).

:func:`render_scene` returns the frames and, per frame and person, the
true face box; :func:`write_scene` encodes them (H.264/AAC mp4, VP9/Opus webm, or HEVC 10-bit
with a rotation in the display matrix) with espeak-ng speech a little longer than the video.

Face sizes are landmark-box widths (the 68-point box side, as in ``pipelines.faces.crop``).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from pipelines.samples.talking_heads import (
    _FACE_SIZE,
    SENTENCES,
    TalkingHeadRenderer,
    _require_tools,
    _run,
    loudness_envelope,
    photo_of,
    synthesize_speech,
)

_FACE_IN_PATCH = 0.38  # TalkingHeadRenderer: face side / patch short side


@dataclass(frozen=True)
class ScenePerson:
    """One face in a scene: centre (fractions of the display width / height), width as a
    fraction of the display short side, and when it is visible: in frames ``f`` with
    ``(f // visible_period[1]) % visible_period[0] == 0`` (None: always)."""

    cx: float
    cy: float
    face_frac: float
    talking: bool = True  # False: the mouth stays closed (same as mouth="closed")
    visible_period: Optional[tuple[int, int]] = None  # (every k-th block, block length in frames)
    mouth: Literal["speech", "other", "closed"] = "speech"
    identity: Optional[str] = None
    still: bool = False
    body: bool = False
    screen: bool = False

    def mouth_open(self, speech: float, other: float) -> float:
        """The mouth opening (0..1) of this person given the two envelopes of the frame."""
        if not self.talking or self.mouth == "closed":
            return 0.0
        return other if self.mouth == "other" else speech

    def visible(self, frame: int) -> bool:
        if self.visible_period is None:
            return True
        k, block = self.visible_period
        return (frame // block) % k == 0


@dataclass(frozen=True)
class SceneSpec:
    """A video: display size, people (the first one is the subject), frame rate, codec and the
    display rotation stored in the container (0 or 90 ccw; the pixels are then stored sideways)."""

    name: str
    width: int
    height: int
    people: tuple[ScenePerson, ...]
    seconds: float = 3.0
    fps: int = 25
    codec: Literal["h264", "vp9", "hevc10"] = "h264"
    rotation: int = 0

    @property
    def suffix(self) -> str:
        return ".webm" if self.codec == "vp9" else ".mp4"


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A static room-like backdrop: smooth colour gradient + blurred noise, uint8 [H, W, 3]."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([0.45 + 0.2 * xx / width, 0.4 + 0.15 * yy / height, 0.35 + 0.1 * (xx + yy) / (width + height)], -1)
    cells = rng.uniform(-0.08, 0.08, size=(height // 32 + 2, width // 32 + 2, 3)).astype(np.float32)
    noise = np.kron(cells, np.ones((32, 32, 1), np.float32))[:height, :width]
    return (np.clip(base + noise, 0, 1) * 255).astype(np.uint8)


class SceneRenderer:
    """Frames of a :class:`SceneSpec` (display orientation) and the true face boxes."""

    def __init__(self, spec: SceneSpec, seed: int = 0):
        self.spec = spec
        rng = np.random.default_rng([seed, 7])
        self.background = _background(spec.width, spec.height, rng)
        short = min(spec.width, spec.height)
        self.heads, self.masks, self.origins, self.bezels = [], [], [], []
        for i, person in enumerate(spec.people):
            face_px = person.face_frac * short
            if person.body:  # down to the chest: 4 x 6 face widths, the face in the upper part
                pw, ph, frac = int(round(4 * face_px)), int(round(6 * face_px)), 0.25
            else:
                pw = ph = int(round(face_px / _FACE_IN_PATCH))
                frac = _FACE_IN_PATCH
            photo = None if person.identity is None else photo_of(person.identity)
            head = TalkingHeadRenderer(pw, ph, np.random.default_rng([seed, 100 + i]), photo=photo, face_frac=frac)
            yy, xx = (np.mgrid[0:ph, 0:pw].astype(np.float32) + 0.5) / np.array([ph, pw], np.float32)[:, None, None] - 0.5
            if person.screen:  # a hard-edged picture in a dark bezel of 6 % of its side
                inner = (np.abs(xx) < 0.44) & (np.abs(yy) < 0.44)
                self.masks.append(np.ones((ph, pw, 1), np.float32))
                self.bezels.append(~inner)
            elif person.body:  # a soft rounded box
                edge = np.minimum(0.5 - np.abs(xx), 0.5 - np.abs(yy))
                self.masks.append(np.clip(edge / 0.04, 0, 1)[..., None])
                self.bezels.append(None)
            else:
                r = np.sqrt((xx / 0.48) ** 2 + (yy / 0.5) ** 2)
                self.masks.append(np.clip((1.0 - r) / 0.08, 0, 1)[..., None])  # soft elliptical edge
                self.bezels.append(None)
            self.heads.append(head)
            self.origins.append((person.cx * spec.width - head.centre[0], person.cy * spec.height - head.centre[1]))

    def face_box(self, person: int, t: float) -> np.ndarray:
        """True landmark box (x0, y0, x1, y1 display px) of ``person`` at time ``t``."""
        head = self.heads[person]
        dx, dy, _, scale = head.pose(0.0 if self.spec.people[person].still else t)
        ox, oy = self.origins[person]
        cx, cy = ox + head.centre[0] + dx, oy + head.centre[1] + dy
        w = _FACE_SIZE * scale
        return np.array([cx - w / 2, cy - w / 2, cx + w / 2, cy + w / 2], np.float32)

    def render(self, frame: int, mouth_open: float, other_open: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 [H, W, 3] frame, true boxes float32 [people, 4] with NaN rows for people not
        visible in this frame). ``mouth_open``: the speech envelope at this frame (0..1);
        ``other_open``: the other utterance's (people with ``mouth="other"``)."""
        spec = self.spec
        t = frame / spec.fps
        img = self.background.copy()
        boxes = np.full((len(spec.people), 4), np.nan, np.float32)
        for i, person in enumerate(spec.people):
            if not person.visible(frame):
                continue
            patch = self.heads[i].render(0.0 if person.still else t,
                                         person.mouth_open(mouth_open, other_open)).astype(np.float32)
            if self.bezels[i] is not None:
                patch[self.bezels[i]] = (24.0, 24.0, 28.0)
            ox, oy = (int(round(v)) for v in self.origins[i])
            ph, pw = patch.shape[:2]
            x0, y0 = max(0, ox), max(0, oy)
            x1, y1 = min(spec.width, ox + pw), min(spec.height, oy + ph)
            if x1 <= x0 or y1 <= y0:
                continue
            sub = (slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox))
            m = self.masks[i][sub]
            region = img[y0:y1, x0:x1].astype(np.float32)
            img[y0:y1, x0:x1] = (region * (1 - m) + patch[sub] * m + 0.5).astype(np.uint8)
            boxes[i] = self.face_box(i, 0.0 if person.still else t) + np.array([ox - self.origins[i][0], oy - self.origins[i][1]] * 2)
        return img, boxes


def render_scene(spec: SceneSpec, seed: int = 0, mouth: Optional[Sequence[float]] = None,
                 other: Optional[Sequence[float]] = None) -> tuple[np.ndarray, np.ndarray]:
    """All frames uint8 [n, H, W, 3] and true boxes float32 [n, people, 4] (NaN: not visible);
    ``mouth`` / ``other``: the speech and other-utterance envelopes per frame (0..1; None: 0)."""
    n = int(round(spec.seconds * spec.fps))
    renderer = SceneRenderer(spec, seed)
    mouth = np.zeros(n) if mouth is None else np.asarray(mouth)
    other = np.zeros(n) if other is None else np.asarray(other)
    frames, boxes = zip(*(renderer.render(i, float(mouth[i]), float(other[i])) for i in range(n)))
    return np.stack(frames), np.stack(boxes)


def _codec_args(spec: SceneSpec) -> list[str]:
    if spec.codec == "vp9":
        return ["-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "1500k",
                "-pix_fmt", "yuv420p", "-threads", "1", "-c:a", "libopus", "-b:a", "64k", "-ar", "48000"]
    if spec.codec == "hevc10":
        return ["-c:v", "libx265", "-preset", "ultrafast", "-pix_fmt", "yuv420p10le",
                "-x265-params", "log-level=error:pools=1:frame-threads=1", "-tag:v", "hvc1",
                "-c:a", "aac", "-b:a", "96k", "-ar", "44100"]
    return ["-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p", "-threads", "1",
            "-c:a", "aac", "-b:a", "96k", "-ar", "16000"]


def write_scene(out_dir: str | Path, spec: SceneSpec, seed: int = 0) -> tuple[Path, np.ndarray]:
    """Render and encode ``spec`` to ``out_dir/<name><suffix>``; returns (path, true boxes
    float32 [n, people, 4] in display pixels, NaN where a person is not shown). The speech
    track is 0.4 s longer than the video, so every video frame is covered."""
    _require_tools()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{spec.name}{spec.suffix}"
    rng = np.random.default_rng([seed, 3])
    n = int(round(spec.seconds * spec.fps))
    with tempfile.TemporaryDirectory(prefix="loopy_scene_") as tmp:
        work = Path(tmp)
        wav = work / "speech.wav"
        audio, sr = synthesize_speech(SENTENCES[seed % len(SENTENCES)], wav, spec.seconds + 0.4, rng)
        mouth = loudness_envelope(audio, sr, np.arange(n) / spec.fps)
        other = np.zeros(n)
        if any(p.mouth == "other" for p in spec.people):  # an utterance that is not in the audio track
            other_audio, other_sr = synthesize_speech(SENTENCES[(seed + 4) % len(SENTENCES)], work / "other.wav",
                                                      spec.seconds + 0.4, np.random.default_rng([seed, 5]))
            other = loudness_envelope(other_audio, other_sr, np.arange(n) / spec.fps)
        renderer = SceneRenderer(spec, seed)
        k = (spec.rotation // 90) % 4
        coded_w, coded_h = (spec.height, spec.width) if k % 2 else (spec.width, spec.height)
        raw = bytearray()
        boxes = []
        for i in range(n):
            frame, b = renderer.render(i, float(mouth[i]), float(other[i]))
            boxes.append(b)
            if k:
                frame = np.rot90(frame, k=-k)  # stored sideways; the display matrix turns it back
            raw += np.ascontiguousarray(frame).tobytes()
        encoded = work / f"norot{spec.suffix}" if k else out
        cmd = ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{coded_w}x{coded_h}", "-framerate", str(spec.fps), "-i", "-", "-i", str(wav),
               "-map", "0:v", "-map", "1:a", *_codec_args(spec), "-g", str(2 * spec.fps),
               "-map_metadata", "-1", str(encoded)]
        _run(cmd, out, stdin=bytes(raw))
        if k:  # ffmpeg writes the display matrix when copying streams
            _run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(encoded), "-map", "0",
                  "-c", "copy", "-metadata:s:v:0", f"rotate={spec.rotation}", str(out)], out)
    return out, np.stack(boxes)


def render_shots(shots: Sequence[SceneSpec], transitions: Sequence[str], dissolve_frames: int = 8,
                 seed: int = 0, mouth: Optional[Sequence[float]] = None) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """An edited video: the frames of each shot (``SceneSpec`` s of one display size and frame
    rate, each rendered with its own seed, so backgrounds and framings differ) joined by
    ``transitions[i]`` between shot i and i + 1: ``"cut"`` (hard cut) or ``"dissolve"`` (a
    ``dissolve_frames`` long cross-fade of the last frames of shot i with the first frames of
    shot i + 1, which replaces both). Returns (uint8 [n, H, W, 3], the true ``(start, end)`` frames of each shot
    outside the transitions)."""
    if len(transitions) != len(shots) - 1:
        raise ValueError(f"{len(shots)} shots need {len(shots) - 1} transitions, got {len(transitions)}")
    mouth_all = None if mouth is None else np.asarray(mouth, np.float32)
    parts, bounds, pos = [], [], 0
    for i, spec in enumerate(shots):
        n = int(round(spec.seconds * spec.fps))
        m = None if mouth_all is None else mouth_all[pos:pos + n]
        frames, _ = render_scene(spec, seed=seed + 17 * i, mouth=m)
        parts.append(frames)
        pos += n
    out = [parts[0]]
    start = 0
    for i, kind in enumerate(transitions):
        prev, nxt = out[-1], parts[i + 1]
        if kind == "dissolve":
            L = dissolve_frames
            w = (np.arange(1, L + 1, dtype=np.float32) / (L + 1))[:, None, None, None]
            blend = (prev[-L:].astype(np.float32) * (1 - w) + nxt[:L].astype(np.float32) * w).round().astype(np.uint8)
            end = start + len(prev) - L
            bounds.append((start, end))
            out[-1] = prev[:-L]
            out.append(blend)
            out.append(nxt[L:])
            start = end + L
        elif kind == "cut":
            bounds.append((start, start + len(prev)))
            out.append(nxt)
            start += len(prev)
        else:
            raise ValueError(f"transition must be cut or dissolve, got {kind!r}")
    bounds.append((start, start + len(out[-1])))
    return np.concatenate(out), bounds


def write_shots(out_dir: str | Path, name: str, shots: Sequence[SceneSpec], transitions: Sequence[str],
                dissolve_frames: int = 8, seed: int = 0) -> tuple[Path, list[tuple[int, int]]]:
    """:func:`render_shots` encoded as ``out_dir/<name>.mp4`` (H.264/AAC, one speech track over
    the whole video, 0.4 s longer); returns (path, true shot bounds in frames)."""
    _require_tools()
    spec0 = shots[0]
    out = Path(out_dir) / f"{name}.mp4"
    out.parent.mkdir(parents=True, exist_ok=True)
    total_s = sum(s.seconds for s in shots)
    with tempfile.TemporaryDirectory(prefix="loopy_shots_") as tmp:
        wav = Path(tmp) / "speech.wav"
        rng = np.random.default_rng([seed, 3])
        audio, sr = synthesize_speech(" ".join(SENTENCES[:3]), wav, total_s + 0.4, rng)
        mouth = loudness_envelope(audio, sr, np.arange(int(round(total_s * spec0.fps))) / spec0.fps)
        frames, bounds = render_shots(shots, transitions, dissolve_frames, seed, mouth)
        cmd = ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{spec0.width}x{spec0.height}", "-framerate", str(spec0.fps), "-i", "-", "-i", str(wav),
               "-map", "0:v", "-map", "1:a", *_codec_args(spec0), "-g", str(2 * spec0.fps),
               "-map_metadata", "-1", str(out)]
        _run(cmd, out, stdin=np.ascontiguousarray(frames).tobytes())
    return out, bounds
