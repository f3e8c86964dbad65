"""Synthetic talking-head videos for tests and the demo (offline, deterministic by seed).

Each sample shows one person of :data:`pipelines.samples.identities.IDENTITIES` (15 people made
from two public-domain portrait photos: 12 for training, 3 only in the test split) with smooth
head motion (small translation, in-plane rotation and scale over time) and a mouth that opens
with the loudness of the speech track, so audio and motion correlate. Framing (the face's share
of the frame) differs between videos. Speech comes
from espeak-ng (a different sentence per video). Frames are rendered with PIL and encoded with
ffmpeg (libx264 + AAC) from a raw RGB pipe.

The default set (``SAMPLE_SPECS``) mixes frame rates (25, 30, 29.97, 60 fps, and one variable
frame rate), audio sample rates (16, 22.05, 44.1, 48 kHz, one stereo), sizes (320x320 and a
360x640 portrait) and one file whose pixels are stored sideways with a 90 degree rotation in
the container's display matrix.

CLI: ``python -m pipelines.samples --output DIR [--seconds S] [--seed N] [--with-bad]
[--heldout]``. ``--heldout`` writes the videos of the test identities to ``DIR/heldout/`` and the
rest to ``DIR/train/``: ingested with ``ingest.split_key=folder ingest.test_fraction=0.5`` the
``heldout`` folder is the test split and ``train`` the training split (``folder:heldout`` hashes
to 0.357, ``folder:train`` to 0.919; :data:`SPLIT_FOLDERS`), whatever bytes the local ffmpeg
writes (a split by content hash would move with the encoder version).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pipelines.errors import PipelineError
from pipelines.samples.identities import IDENTITIES, FacePhoto, identity_photo

log = logging.getLogger(__name__)

# Face geometry in skimage.data.astronaut() (512x512), from dlib's 68 landmarks on the photo.
_FACE_CENTRE = (225.0, 132.0)  # x, y: middle of the landmark box
_FACE_SIZE = 95.0  # landmark box side, pixels
_MOUTH_CENTRE = (223.0, 146.0)  # inner-mouth centre (landmarks 60-67)
_MOUTH_WIDTH = 42.0  # outer mouth corners 48..54
_PAD = 256  # reflect-padding of the photo so motion never shows an empty border

#: (test folder, training folder) of ``--heldout`` and the ``ingest.test_fraction`` that splits them
#: that way under ``ingest.split_key=folder`` (tests/test_sample_data.py checks the hashes).
SPLIT_FOLDERS = ("heldout", "train")
SPLIT_TEST_FRACTION = 0.5

SENTENCES = (
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the hills.",
    "Every morning I walk along the river and listen to the birds singing in the old trees.",
    "Please remember to bring the blue notebook and two pencils to the meeting tomorrow.",
    "Sound travels faster in water than in air, which surprises many people who hear it.",
    "We built a small wooden boat last summer and sailed it across the quiet lake.",
    "Numbers like seven, twelve and forty two appear in many stories and old songs.",
    "A gentle rain fell on the city while the lights came on one by one in the evening.",
    "Learning to play the piano takes patience, practice and a lot of happy mistakes.",
    "The museum opens at nine, closes at five, and is free for everyone on Sundays.",
)


@dataclass(frozen=True)
class SampleSpec:
    """One generated video. ``fps`` is an ffmpeg rate string ("30000/1001"); ``vfr`` renders at
    ``fps`` and keeps an irregular subset of frames; ``rotation`` (0 or 90, counter-clockwise)
    stores the pixels rotated and writes the display matrix so players show them upright."""

    name: str
    fps: str
    sample_rate: int
    channels: int
    width: int  # display size
    height: int
    rotation: int = 0
    vfr: bool = False
    audio: bool = True
    identity: str = "id00"  # a name in IDENTITIES (id00 is the astronaut photo as it is)
    face_frac: float = 0.38  # landmark-box side / the frame's shorter side

    @property
    def split(self) -> str:
        """``test`` when the video's person is a test identity, else ``train``."""
        return next(s.split for s in IDENTITIES if s.name == self.identity)


#: One video per identity (15 people: the 12 training people, then the 3 test people), with the
#: frame-rate / sample-rate / size / rotation mix spread over them.
SAMPLE_SPECS: tuple[SampleSpec, ...] = (
    SampleSpec("talk_25fps_16k", "25", 16000, 1, 320, 320, identity="id00"),
    SampleSpec("talk_30fps_22k", "30", 22050, 1, 320, 320, identity="id01", face_frac=0.34),
    SampleSpec("talk_29.97fps_44k", "30000/1001", 44100, 1, 320, 320, identity="id02", face_frac=0.42),
    SampleSpec("talk_60fps_48k_stereo", "60", 48000, 2, 320, 320, identity="id03", face_frac=0.36),
    SampleSpec("talk_25fps_48k_portrait", "25", 48000, 1, 360, 640, identity="id04", face_frac=0.40),
    SampleSpec("talk_30fps_16k_rot90", "30", 16000, 1, 360, 640, rotation=90, identity="id05", face_frac=0.36),
    SampleSpec("talk_vfr_44k", "60", 44100, 1, 320, 320, vfr=True, identity="id06", face_frac=0.40),
    SampleSpec("talk_25fps_22k_id07", "25", 22050, 1, 320, 320, identity="id07", face_frac=0.32),
    SampleSpec("talk_30fps_48k_id08", "30", 48000, 1, 320, 320, identity="id08", face_frac=0.44),
    SampleSpec("talk_25fps_44k_id09", "25", 44100, 1, 360, 640, identity="id09", face_frac=0.34),
    SampleSpec("talk_29.97fps_16k_id10", "30000/1001", 16000, 1, 320, 320, identity="id10", face_frac=0.38),
    SampleSpec("talk_25fps_16k_id11", "25", 16000, 2, 320, 320, identity="id11", face_frac=0.41),
    SampleSpec("talk_25fps_16k_test0", "25", 16000, 1, 320, 320, identity="test0", face_frac=0.38),
    SampleSpec("talk_30fps_44k_test1", "30", 44100, 1, 320, 320, identity="test1", face_frac=0.36),
    SampleSpec("talk_25fps_22k_test2", "25", 22050, 1, 360, 640, identity="test2", face_frac=0.40),
)


class SampleDataError(PipelineError, RuntimeError):
    """A tool (ffmpeg, espeak-ng) failed while writing a sample; the message names the file."""


def _run(cmd: Sequence[str], out: Path, stdin: Optional[bytes] = None) -> None:
    proc = subprocess.run(list(cmd), input=stdin, capture_output=True)
    if proc.returncode != 0:
        raise SampleDataError(f"{out}: {cmd[0]} failed ({proc.returncode}): "
                              f"{proc.stderr.decode(errors='replace')[-800:]}")


def _require_tools() -> None:
    for tool in ("ffmpeg", "espeak-ng"):
        if shutil.which(tool) is None:
            raise SampleDataError(f"{tool} is not installed (make sysdeps installs it)")


def synthesize_speech(text: str, wav_path: Path, seconds: float, rng: np.random.Generator
                      ) -> tuple[np.ndarray, int]:
    """espeak-ng speech of ``text``, trimmed or zero-padded to ``seconds``; written to
    ``wav_path`` (16-bit mono) and returned as (float32 [samples] in -1..1, sample rate Hz)."""
    import soundfile as sf

    raw = wav_path.with_suffix(".espeak.wav")
    speed = int(rng.integers(150, 185))  # words per minute
    pitch = int(rng.integers(30, 70))
    _run(["espeak-ng", "-s", str(speed), "-p", str(pitch), "-w", str(raw), text], wav_path)
    audio, sr = sf.read(str(raw), dtype="float32", always_2d=False)
    raw.unlink(missing_ok=True)
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    lead = int(0.25 * sr)  # a short pause before speaking
    total = int(round(seconds * sr))
    out = np.zeros(total, dtype=np.float32)
    body = audio[: max(0, total - lead)]
    out[lead:lead + len(body)] = body
    sf.write(str(wav_path), out, sr, subtype="PCM_16")
    return out, sr


def loudness_envelope(audio: np.ndarray, sr: int, times_s: np.ndarray, window_s: float = 0.06
                      ) -> np.ndarray:
    """RMS loudness of ``audio`` [samples] around each time in ``times_s`` [n] -> [n] in 0..1
    (normalised by the 95th percentile of the voiced frames)."""
    half = max(1, int(window_s * sr / 2))
    centres = np.clip((times_s * sr).astype(np.int64), 0, len(audio) - 1)
    sq = np.concatenate([[0.0], np.cumsum(audio.astype(np.float64) ** 2)])
    lo = np.clip(centres - half, 0, len(audio))
    hi = np.clip(centres + half, 0, len(audio))
    rms = np.sqrt((sq[hi] - sq[lo]) / np.maximum(hi - lo, 1))
    ref = np.percentile(rms[rms > 1e-4], 95) if np.any(rms > 1e-4) else 1.0
    return np.clip(rms / max(ref, 1e-6), 0.0, 1.0)


class TalkingHeadRenderer:
    """Renders frames of one moving face; motion is a smooth function of time.

    ``photo``: the person (a :class:`~pipelines.samples.identities.FacePhoto`); None is the
    astronaut photo with its measured face geometry. ``face_frac``: the face's landmark-box side
    as a share of the frame's shorter side (before the small scale motion)."""

    def __init__(self, width: int, height: int, rng: np.random.Generator, photo: Optional[FacePhoto] = None,
                 face_frac: float = 0.38):
        from PIL import Image

        if photo is None:
            from skimage import data

            image = data.astronaut()
            self.face_centre, self.face_size = _FACE_CENTRE, _FACE_SIZE
            self.mouth_centre, self.mouth_width = _MOUTH_CENTRE, _MOUTH_WIDTH
        else:
            image = photo.image
            self.face_centre, self.face_size = photo.face_centre, photo.face_size
            self.mouth_centre, self.mouth_width = photo.mouth_centre, photo.mouth_width
        padded = np.pad(image, ((_PAD, _PAD), (_PAD, _PAD), (0, 0)), mode="edge")  # reflect would mirror a second face in
        self.photo = Image.fromarray(padded)
        self.width, self.height = width, height
        self.base_scale = face_frac * min(width, height) / self.face_size
        self.centre = (width / 2.0, height * (0.5 if height <= width else 0.42))
        # motion: amplitudes (pixels in face sizes, degrees, relative scale) and random phases
        self.freq = rng.uniform(0.15, 0.35, size=4)  # Hz
        self.phase = rng.uniform(0, 2 * np.pi, size=4)
        self.amp = np.array([0.12, 0.08, 4.0, 0.04]) * rng.uniform(0.7, 1.0, size=4)

    def pose(self, t: float) -> tuple[float, float, float, float]:
        """(dx px, dy px, angle deg ccw, scale) at time ``t`` seconds."""
        w = np.sin(2 * np.pi * self.freq * t + self.phase) * self.amp
        face_px = self.face_size * self.base_scale
        return float(w[0] * face_px), float(w[1] * face_px), float(w[2]), float(self.base_scale * (1 + w[3]))

    def render(self, t: float, mouth_open: float) -> np.ndarray:
        """uint8 [height, width, 3] RGB frame at time ``t`` with the mouth ``mouth_open`` (0..1)."""
        from PIL import Image, ImageDraw

        dx, dy, angle, scale = self.pose(t)
        a = np.radians(angle)
        cos, sin = np.cos(a), np.sin(a)
        cx, cy = self.centre[0] + dx, self.centre[1] + dy
        sx, sy = self.face_centre[0] + _PAD, self.face_centre[1] + _PAD
        # output o = c + scale * R(angle) (p - s)  =>  p = s + R(-angle) (o - c) / scale
        inv = 1.0 / scale
        coeffs = (cos * inv, -sin * inv, sx - (cos * cx - sin * cy) * inv,
                  sin * inv, cos * inv, sy - (sin * cx + cos * cy) * inv)
        img = self.photo.transform((self.width, self.height), Image.Transform.AFFINE, coeffs,
                                   resample=Image.Resampling.BILINEAR)
        # the mouth: a dark opening whose height follows the loudness
        mx, my = self.mouth_centre[0] - self.face_centre[0], self.mouth_centre[1] - self.face_centre[1]
        ox = cx + scale * (cos * mx + sin * my)
        oy = cy + scale * (-sin * mx + cos * my)
        half_w = 0.36 * self.mouth_width * scale
        h = float(np.clip(mouth_open, 0, 1)) * 0.45 * self.mouth_width * scale
        if h > 1.0:
            draw = ImageDraw.Draw(img)
            draw.ellipse([ox - half_w, oy - h * 0.3, ox + half_w, oy + h * 0.7],
                         fill=(70, 18, 24), outline=(150, 70, 70))
        return np.asarray(img)


def photo_of(identity: str) -> Optional[FacePhoto]:
    """The still photo of ``identity``; None for ``id00``, the astronaut photo as it is (the
    renderer's measured default geometry)."""
    return None if identity == "id00" else identity_photo(identity)


def write_talking_head(out: Path, spec: SampleSpec, seconds: float, sentence: str,
                       rng: np.random.Generator, work: Path) -> Path:
    """Render and encode one talking-head video described by ``spec`` to ``out`` (mp4)."""
    rate = Fraction(spec.fps)
    n_frames = int(round(seconds * rate))
    times = np.arange(n_frames, dtype=np.float64) / float(rate)
    wav = work / f"{out.stem}.wav"
    audio, sr = synthesize_speech(sentence, wav, seconds, rng)
    mouth = loudness_envelope(audio, sr, times)
    renderer = TalkingHeadRenderer(spec.width, spec.height, rng, photo=photo_of(spec.identity),
                                   face_frac=spec.face_frac)
    k = (spec.rotation // 90) % 4
    coded_w, coded_h = (spec.height, spec.width) if k % 2 else (spec.width, spec.height)
    cmd = ["ffmpeg", "-nostdin", "-y", "-loglevel", "error",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{coded_w}x{coded_h}",
           "-framerate", spec.fps, "-i", "-"]
    if spec.audio:
        cmd += ["-i", str(wav), "-map", "0:v", "-map", "1:a"]
    vf = []
    if spec.vfr:
        vf.append("select='" + _vfr_select_expr(seconds) + "'")
    if vf:
        cmd += ["-vf", ",".join(vf), "-fps_mode", "vfr"]
    cmd += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p",
            "-g", "50", "-threads", "1"]  # one thread: bit-exact reruns
    if spec.audio:
        cmd += ["-c:a", "aac", "-b:a", "96k", "-ar", str(spec.sample_rate),
                "-ac", str(spec.channels)]
    encoded = work / f"{out.stem}.norot.mp4" if spec.rotation else out
    cmd += ["-map_metadata", "-1", "-fflags", "+bitexact", "-flags", "+bitexact", str(encoded)]
    frames = bytearray()
    for t, m in zip(times, mouth):
        frame = renderer.render(float(t), float(m))
        if k:
            frame = np.rot90(frame, k=-k)  # stored sideways; the display matrix turns it back
        frames += np.ascontiguousarray(frame).tobytes()
    _run(cmd, out, stdin=bytes(frames))
    if spec.rotation:  # ffmpeg 5 writes the display matrix only when copying streams
        _run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(encoded), "-map", "0",
              "-c", "copy", "-metadata:s:v:0", f"rotate={spec.rotation}", "-fflags", "+bitexact",
              str(out)], out)
        encoded.unlink()
    return out


def _vfr_select_expr(seconds: float) -> str:
    """ffmpeg select filter: every 4th frame in the first third of the video, every frame in the
    second, every 2nd in the last (15 / 60 / 30 fps from a 60 fps render); timestamps kept."""
    third = seconds / 3.0
    return (f"if(lt(t\\,{third:.6f})\\,not(mod(n\\,4))\\,"
            f"if(lt(t\\,{2 * third:.6f})\\,1\\,not(mod(n\\,2))))")


def generate_samples(out_dir: Path, seconds: float = 7.0, seed: int = 0,
                     specs: Sequence[SampleSpec] = SAMPLE_SPECS, heldout: bool = False,
                     workers: int = 2) -> list[Path]:
    """Write the talking-head sample set (``SAMPLE_SPECS``) to ``out_dir``; returns the mp4 paths.

    ``heldout``: the videos of test identities go to ``out_dir/heldout/``, the others to
    ``out_dir/train/`` (:data:`SPLIT_FOLDERS`), so no training video shows a test person; False:
    all directly in ``out_dir``. Deterministic for a given ``seed`` (motion, voice speed / pitch,
    sentence choice), whatever ``workers`` (processes writing videos at once)."""
    _require_tools()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if heldout and len({s.split for s in specs}) < 2:
        raise ValueError("heldout needs videos of both training and test identities in specs")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(SENTENCES))
    jobs = []
    for i, spec in enumerate(specs):
        folder = out_dir if not heldout else out_dir / SPLIT_FOLDERS[0 if spec.split == "test" else 1]
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{spec.name}.mp4", spec, seconds, SENTENCES[order[i % len(order)]], [seed, i]))
    with tempfile.TemporaryDirectory(prefix="loopy_samples_") as tmp:
        if workers <= 1 or len(jobs) == 1:
            return [_write_job(job, tmp) for job in jobs]
        # each video has its own generator and one-thread ffmpeg, so the bytes do not depend on
        # which process writes it; a process (not a thread) per video because building a person
        # and rendering frames is numpy / PIL work that holds the GIL
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            return list(pool.map(_write_job, jobs, [tmp] * len(jobs)))


def _write_job(job: tuple, tmp: str) -> Path:
    """One video of :func:`generate_samples` (a picklable unit for its process pool)."""
    out, spec, seconds, sentence, seed = job
    return write_talking_head(out, spec, seconds, sentence, np.random.default_rng(seed), Path(tmp))


def make_vfr_video(path: Path, seconds: float = 7.0, seed: int = 0, size: tuple[int, int] = (320, 320),
                   render_fps: int = 60, sample_rate: int = 16000) -> Path:
    """A variable-frame-rate talking head: rendered at ``render_fps`` and thinned to 1/4, 1/1
    and 1/2 of it in the three thirds of the video (15 / 60 / 30 fps at 60), timestamps kept."""
    _require_tools()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = SampleSpec(path.stem, str(render_fps), sample_rate, 1, size[0], size[1], vfr=True)
    rng = np.random.default_rng([seed, 1000])
    with tempfile.TemporaryDirectory(prefix="loopy_vfr_") as tmp:
        return write_talking_head(path, spec, seconds, SENTENCES[seed % len(SENTENCES)], rng, Path(tmp))


def _write_noise_video(out: Path, seconds: float, rng: np.random.Generator, work: Path,
                       size: int = 160, fps: int = 25) -> Path:
    """A face-free video: a moving colour gradient with smooth noise, plus speech audio."""
    n = int(round(seconds * fps))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    noise = rng.uniform(0, 1, size=(size // 8, size // 8, 3)).astype(np.float32)
    noise = np.kron(noise, np.ones((8, 8, 1), np.float32))
    frames = bytearray()
    for i in range(n):
        t = i / fps
        r = 0.5 + 0.5 * np.sin(2 * np.pi * (xx + 0.3 * t))
        g = 0.5 + 0.5 * np.sin(2 * np.pi * (yy - 0.2 * t))
        b = np.roll(noise, shift=i, axis=1)[..., 2]
        img = np.stack([r, g, b], axis=-1) * 0.7 + 0.3 * np.roll(noise, shift=i, axis=0)
        frames += (np.clip(img, 0, 1) * 255).astype(np.uint8).tobytes()
    wav = work / f"{out.stem}.wav"
    synthesize_speech(SENTENCES[0], wav, seconds, rng)
    cmd = ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{size}x{size}", "-framerate", str(fps), "-i", "-", "-i", str(wav),
           "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-preset", "veryfast", "-crf", "23",
           "-pix_fmt", "yuv420p", "-c:a", "aac", "-ar", "16000", "-map_metadata", "-1",
           "-fflags", "+bitexact", "-flags", "+bitexact", str(out)]
    _run(cmd, out, stdin=bytes(frames))
    return out


def make_bad_inputs(out_dir: Path, seed: int = 0, seconds: float = 6.0) -> dict[str, Path]:
    """Inputs every stage must reject with a recorded reason (never a crash). Keys:

    ``empty`` (0-byte .mp4), ``not_video`` (a text file named .mp4), ``truncated`` (the first
    half of a good mp4: the index at the end is missing), ``no_audio`` (talking head without an
    audio track), ``no_face`` (moving gradient and noise, with speech), ``too_short`` (2 s
    talking head: fewer than 136 frames at 25 fps)."""
    _require_tools()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 2000])
    paths = {
        "empty": out_dir / "bad_empty.mp4",
        "not_video": out_dir / "bad_not_video.mp4",
        "truncated": out_dir / "bad_truncated.mp4",
        "no_audio": out_dir / "bad_no_audio.mp4",
        "no_face": out_dir / "bad_no_face.mp4",
        "too_short": out_dir / "bad_too_short.mp4",
    }
    paths["empty"].write_bytes(b"")
    paths["not_video"].write_text("This is a text file, not a video.\n" * 20)
    with tempfile.TemporaryDirectory(prefix="loopy_bad_") as tmp:
        work = Path(tmp)
        small = SampleSpec("short", "25", 16000, 1, 160, 160)
        full = work / "full.mp4"
        write_talking_head(full, small, 3.0, SENTENCES[1], rng, work)
        data = full.read_bytes()
        paths["truncated"].write_bytes(data[: len(data) // 2])
        write_talking_head(paths["no_audio"], SampleSpec("no_audio", "25", 16000, 1, 160, 160, audio=False),
                           seconds, SENTENCES[2], rng, work)
        _write_noise_video(paths["no_face"], seconds, rng, work)
        write_talking_head(paths["too_short"], small, 2.0, SENTENCES[3], rng, work)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, type=Path, help="folder for the mp4 files")
    parser.add_argument("--seconds", type=float, default=7.0, help="length of each video (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-bad", action="store_true",
                        help="also write the bad inputs (bad_*.mp4) into the same folder")
    parser.add_argument("--heldout", action="store_true",
                        help="videos of the test identities to OUTPUT/heldout/ (test split), the rest to OUTPUT/train/")
    parser.add_argument("--workers", type=int, default=2, help="processes writing videos at once")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths = generate_samples(args.output, seconds=args.seconds, seed=args.seed, heldout=args.heldout,
                             workers=args.workers)
    if args.with_bad:
        paths += list(make_bad_inputs(args.output, seed=args.seed).values())
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
