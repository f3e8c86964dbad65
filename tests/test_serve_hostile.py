"""Hostile input and secrets, without a running service: decode bombs, hostile audio, a polyglot
playlist, ffmpeg's pipes and time limit, client tokens and where they must never appear, and the
job store's recovery after a restart."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from test_serve import FifoWatch, mp3_tone, playlist, portrait_bytes

from serve.auth import (
    Authenticator,
    HostAllowlist,
    is_loopback,
    load_tokens,
    origin_allowed,
    parse_tokens_file,
    require_auth_for,
    split_host,
)
from serve.errors import ServeConfigError, UploadError
from serve.jobs import JobState, JobStore
from serve.validation import decode_audio_upload, decode_image

SECRET = "s3cret-token-that-must-not-leak-0451"


# --- image bombs ----------------------------------------------------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int, rows: int | None = None, one_bit: bool = False) -> bytes:
    """A PNG whose header claims ``width x height`` pixels (RGB, or 1-bit grey); ``rows`` rows of
    zeros are really compressed in (None: all of them), so the file is small and the decode huge
    (a 1-bit image decodes to 1 byte per pixel, and to 3 once converted to RGB)."""
    comp = zlib.compressobj(9)
    row = b"\0" * (1 + ((width + 7) // 8 if one_bit else 3 * width))
    block = row * 256
    count = height if rows is None else rows
    idat = b"".join(comp.compress(block) for _ in range(count // 256)) + comp.compress(row * (count % 256))
    idat += comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1 if one_bit else 8, 0 if one_bit else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose SOF header is patched to claim ``width x height``."""
    data = bytearray(portrait_bytes("JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def other_format(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 100, 50)).save(buf, format=fmt)
    return buf.getvalue()


def measure(script: str, tmp_path: Path) -> dict:
    """Run ``script`` (which prints one JSON line) in a fresh interpreter; its peak RSS in MB is
    added as ``rss_mb``."""
    # VmHWM belongs to the new process image (getrusage's maxrss can carry the parent's over exec)
    code = textwrap.dedent(script) + textwrap.dedent("""
        hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
        result["rss_mb"] = int(hwm.split()[1]) / 1024
        print(json.dumps(result))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_image_bombs_and_other_formats_are_422_fast_with_bounded_memory(tmp_path):
    cases = {
        "png_100k_square_header": png_bomb(100_000, 100_000, rows=1),
        "png_25mp_real": png_bomb(5000, 5000),  # 25 MP of real zeros in a small file
        "png_144mp_1bit": png_bomb(12000, 12000, one_bit=True),  # ~600 MB if decoded to RGB
        "jpeg_60k_square_header": jpeg_claiming(60_000, 60_000),
        "gif": other_format("GIF"),
        "bmp": other_format("BMP"),
        "tiff": other_format("TIFF"),
        "truncated_png": png_bomb(64, 64)[:-30],
        "garbage": os.urandom(4096),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    assert max(len(d) for d in cases.values()) < 200_000
    result = measure(f"""
        import json, time
        from pathlib import Path
        from serve.errors import UploadError
        from serve.validation import decode_image
        result = {{}}
        for path in sorted(Path({str(tmp_path)!r}).iterdir()):
            t0 = time.perf_counter()
            try:
                decode_image(path.read_bytes(), "image", max_pixels=16_000_000)
                result[path.name] = ["decoded", 0.0, ""]
            except UploadError as exc:
                result[path.name] = [exc.status, time.perf_counter() - t0, exc.message]
    """, tmp_path)
    rss = result.pop("rss_mb")
    for name, (status, seconds, message) in result.items():
        assert status == 422, (name, status)
        assert seconds < 2.0, (name, seconds)
        assert str(tmp_path) not in message
    for name in ("png_100k_square_header", "png_25mp_real", "png_144mp_1bit", "jpeg_60k_square_header"):
        assert "megapixels" in result[name][2], (name, result[name])
    assert "JPEG, PNG or WebP" in result["gif"][2]
    assert rss < 400, f"peak RSS {rss:.0f} MB while refusing image bombs"
    # the formats that are allowed still decode (WebP, PNG, JPEG)
    for fmt in ("WEBP", "PNG", "JPEG"):
        assert decode_image(portrait_bytes(fmt)).shape[2] == 3


def write_ogg_with_granule(src: Path, dst: Path, seconds: float) -> None:
    """Copy an Ogg Opus file, rewriting its last page's granule position to claim ``seconds``
    (48 kHz granules) and fixing that page's CRC: a small file whose header says 10 hours."""
    def crc(data: bytes) -> int:  # Ogg's CRC-32: polynomial 0x04C11DB7, not reflected
        c = 0
        for byte in data:
            c ^= byte << 24
            for _ in range(8):
                c = ((c << 1) ^ 0x04C11DB7) if c & 0x80000000 else c << 1
                c &= 0xFFFFFFFF
        return c

    data = bytearray(src.read_bytes())
    pages, i = [], 0
    while i < len(data):
        assert data[i:i + 4] == b"OggS"
        nseg = data[i + 26]
        size = 27 + nseg + sum(data[i + 27:i + 27 + nseg])
        pages.append((i, size))
        i += size
    start, size = pages[-1]
    data[start + 6:start + 14] = struct.pack("<q", int(seconds * 48000))
    data[start + 22:start + 26] = b"\0\0\0\0"
    data[start + 22:start + 26] = struct.pack("<I", crc(bytes(data[start:start + size])))
    dst.write_bytes(bytes(data))


def test_hostile_audio_is_422_fast_with_bounded_memory(tmp_path):
    subprocess.run(["sox", "-n", "-r", "384000", "-c", "8", str(tmp_path / "8ch_384k.wav"), "synth", "1",
                    "sine", "440"], check=True)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=f=300:d=2",
                    "-c:a", "libopus", "-b:a", "16k", str(tmp_path / "short.opus")], check=True)
    write_ogg_with_granule(tmp_path / "short.opus", tmp_path / "10h.opus", 10 * 3600)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=f=300:d=60",
                    "-c:a", "libopus", "-b:a", "8k", "-f", "ogg", str(tmp_path / "long.ogg")], check=True)
    (tmp_path / "playlist.m3u8").write_bytes(playlist(tmp_path / "8ch_384k.wav"))
    (tmp_path / "concat.txt").write_bytes(f"ffconcat version 1.0\nfile '{tmp_path / 'short.opus'}'\n".encode())
    result = measure(f"""
        import json, time
        from pathlib import Path
        from serve.errors import UploadError
        from serve.validation import decode_audio_upload
        result = {{}}
        for name in ("8ch_384k.wav", "10h.opus", "long.ogg", "playlist.m3u8", "concat.txt"):
            t0 = time.perf_counter()
            try:
                decode_audio_upload(Path({str(tmp_path)!r}) / name, 3.0)
                result[name] = ["decoded", 0.0, ""]
            except UploadError as exc:
                result[name] = [exc.status, time.perf_counter() - t0, exc.message]
    """, tmp_path)
    rss = result.pop("rss_mb")
    for name, (status, seconds, message) in result.items():
        assert status == 422, (name, status)
        assert seconds < 2.0, (name, seconds)
        assert str(tmp_path) not in message and "ffmpeg" not in message.lower()
    assert "8 channels" in result["8ch_384k.wav"][2]
    assert "longer than" in result["10h.opus"][2] and "longer than" in result["long.ogg"][2]
    assert rss < 400, f"peak RSS {rss:.0f} MB while refusing hostile audio"
    # the real 2 s Opus file is fine
    assert decode_audio_upload(tmp_path / "short.opus", 3.0).duration_s == pytest.approx(2.0, abs=0.05)


def test_polyglot_check_and_mux_open_no_other_file(tmp_path):
    """The check decodes the MP3 half of an HLS-playlist + MP3 polyglot (or refuses it) and the
    muxer reads only a WAV: the local file the playlist names is never opened."""
    from inference.video_io import write_video
    from pipelines.media.audio_decode import decode_audio

    mp3 = mp3_tone(tmp_path / "tone.mp3", 300.0, 1.0)
    with FifoWatch(tmp_path / "secret.wav") as fifo:
        glued = tmp_path / "glued.bin"
        glued.write_bytes(playlist(fifo.path) + mp3)
        (tmp_path / "pure.m3u8").write_bytes(playlist(fifo.path))
        with pytest.raises(UploadError) as err:
            decode_audio_upload(tmp_path / "pure.m3u8", 3.0)
        assert err.value.status == 422
        checked = decode_audio_upload(glued, 3.0)
        frames = np.zeros((25, 32, 32, 3), np.uint8)
        out = write_video(frames, tmp_path / "out.mp4", 25.0, glued)  # the CLI path: PyAV decodes, ffmpeg reads a WAV
    assert not fifo.opened
    got = decode_audio(out, sample_rate=16000).samples
    spectrum = np.abs(np.fft.rfft(got))
    assert abs(np.argmax(spectrum) * 16000 / len(got) - 300) < 10  # the MP3's tone, nothing else
    assert checked.duration_s == pytest.approx(1.0, abs=0.1)


# --- ffmpeg's pipes and time limit ------------------------------------------------------------------------

def fake_ffmpeg(tmp_path: Path, body: str) -> str:
    path = tmp_path / "ffmpeg"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_ffmpeg_stderr_is_read_while_writing_and_calls_time_out(tmp_path, monkeypatch):
    import inference.video_io as video_io

    frames = np.zeros((50, 64, 64, 3), np.uint8)  # 600 KB: more than a pipe holds
    # 200 KB of stderr before reading any frame: reading stderr only after stdin closes deadlocks
    chatty = fake_ffmpeg(tmp_path, "head -c 200000 /dev/zero | tr '\\0' 'e' >&2; cat > /dev/null; exit 3")
    monkeypatch.setattr(video_io.shutil, "which", lambda name: chatty)
    t0 = time.monotonic()
    with pytest.raises(video_io.VideoWriteError, match="could not write"):
        video_io.write_video(frames, tmp_path / "a.mp4", 25.0, None, timeout_s=20)
    assert time.monotonic() - t0 < 10
    stuck = fake_ffmpeg(tmp_path, "exec sleep 30")  # never reads its input (exec: one process, as ffmpeg)
    monkeypatch.setattr(video_io.shutil, "which", lambda name: stuck)
    t0 = time.monotonic()
    with pytest.raises(video_io.VideoWriteError, match="within 1 s"):
        video_io.write_video(frames, tmp_path / "b.mp4", 25.0, None, timeout_s=1)
    assert time.monotonic() - t0 < 6


# --- tokens: per client, never in a config dump -------------------------------------------------------------

def test_tokens_from_file_and_env_per_client(tmp_path):
    f = tmp_path / "tokens"
    f.write_text("# comment\n\nalice aaaaaaaaaaaaaaaaaaaa  # trailing\nbob bbbbbbbbbbbbbbbbbbbb\n")
    env = {"LOOPY_SERVE_TOKENS_FILE": str(f), "LOOPY_SERVE_TOKENS": "carol:cccccccccccccccccccc"}
    tokens = load_tokens(None, env)
    assert tokens == {"alice": "a" * 20, "bob": "b" * 20, "carol": "c" * 20}
    auth = Authenticator(tokens)
    assert auth.client_for("Bearer " + "b" * 20) == "bob" and auth.client_for("Bearer nope") is None
    assert auth.client_for(None) is None and Authenticator({}).client_for(None) == "local"
    for bad in ({"LOOPY_SERVE_TOKENS": "alice:short"}, {"LOOPY_SERVE_TOKENS": "nocolon"},
                {"LOOPY_SERVE_TOKENS": f"a:{'x' * 20},b:{'x' * 20}"},
                {"LOOPY_SERVE_TOKENS_FILE": str(tmp_path / "missing")}):
        with pytest.raises(ServeConfigError) as err:
            load_tokens(None, bad)
        assert "x" * 20 not in str(err.value)
    with pytest.raises(ServeConfigError, match=":2"):
        parse_tokens_file("ok " + "t" * 20 + "\nthree words here\n", "tokens")


def test_non_loopback_host_needs_tokens_and_origin_rule():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    require_auth_for("127.0.0.1", {})
    require_auth_for("0.0.0.0", {"a": "x" * 20})
    with pytest.raises(ServeConfigError, match="LOOPY_SERVE_TOKENS"):
        require_auth_for("0.0.0.0", {})
    hosts = HostAllowlist(["loopy.example", "api.example:8443"], port=8000)
    assert origin_allowed(None, hosts) and origin_allowed("http://127.0.0.1:8000", hosts, (), "same-origin")
    assert origin_allowed("http://[::1]:8000", hosts) and origin_allowed("https://loopy.example", hosts)
    assert not origin_allowed("http://evil.example", hosts) and not origin_allowed("null", hosts)
    assert not origin_allowed("http://127.0.0.1:9999", hosts)  # another loopback port is another origin
    assert not origin_allowed("https://api.example", hosts) and origin_allowed("https://api.example:8443", hosts)
    assert not origin_allowed(None, hosts, (), "cross-site")
    assert origin_allowed("https://app.example", hosts, ["https://app.example"], "cross-site")
    # the Host allowlist: loopback names at any port, the public names; nothing that merely contains them
    for host in ("127.0.0.1", "127.0.0.1:1", "localhost:8000", "[::1]:8000", "[::1]", "LoopY.example:1234",
                 "api.example:8443"):
        assert hosts.host_allowed(host), host
    for host in (None, "", "evil.example", "127.0.0.1.evil.example", "::1", "127.0.0.1:", "127.0.0.1:x",
                 "a@127.0.0.1", "api.example:8444", "api.example", "loopy.example.evil", "[::1]x"):
        assert not hosts.host_allowed(host), host
    assert split_host("[::1]:80") == ("::1", 80) and split_host("Name") == ("name", None)
    with pytest.raises(ServeConfigError, match="allowed_hosts"):
        HostAllowlist(["bad:host:name"])
    # the Bearer scheme in any case (RFC 7235); the token itself is compared exactly
    auth = Authenticator({"alice": "a" * 20})
    for header in ("Bearer " + "a" * 20, "bearer " + "a" * 20, "BEARER  " + "a" * 20):
        assert auth.client_for(header) == "alice", header
    for header in ("Basic " + "a" * 20, "Bearer " + "A" * 20, "Bearer" + "a" * 20, "a" * 20):
        assert auth.client_for(header) is None, header


def test_token_never_reaches_configs_packages_or_serve_app_args(tmp_path, monkeypatch, tiny_package):
    import cloudpickle
    import yaml
    from ray.serve._private.build_app import build_app as build_serve_app

    from core.config import ConfigError, dump_yaml, flatten, load_platform_config
    from core.paths import PROJECT_ROOT
    from serve.app import build_app

    monkeypatch.setenv("LOOPY_SERVE_TOKENS", f"ops:{SECRET}")
    with pytest.raises(ConfigError):  # there is no config field a token could be put in
        load_platform_config(None, [f"serve.auth_token={SECRET}"])
    cfg = load_platform_config(PROJECT_ROOT / "configs" / "cluster.yaml", [f"serve.model={tiny_package}"])
    assert cfg.serve.host == "0.0.0.0"
    application = build_app(cfg)  # a non-loopback host: allowed because the env holds tokens
    assert SECRET not in dump_yaml(cfg)  # what every model package's platform.yaml is
    assert SECRET not in json.dumps(flatten(cfg), default=str)  # what MLflow params are
    # what Serve sends to its controller: every deployment's init args and deployment config
    built = build_serve_app(application, name="leak_check")
    for deployment in built.deployments:
        sent = cloudpickle.dumps((deployment.init_args, deployment.init_kwargs, deployment.ray_actor_options,
                                  deployment.user_config))
        assert SECRET.encode() not in sent, deployment.name
    assert any(d.user_config and "model" in d.user_config for d in built.deployments)
    serve_cfg = yaml.safe_load((PROJECT_ROOT / "serve" / "serve_config.yaml").read_text())
    assert SECRET not in json.dumps(serve_cfg)
    assert [key for key in flatten(cfg) if key.startswith("serve.") and "token" in key] == ["serve.tokens_file"]
    monkeypatch.delenv("LOOPY_SERVE_TOKENS")
    with pytest.raises(ServeConfigError, match="not a loopback"):
        build_app(cfg)


# --- job store after a restart -------------------------------------------------------------------------

def test_job_store_recover_requeues_fails_and_removes_orphans(tmp_path):
    store = JobStore(tmp_path, max_pending=10, max_attempts=2)

    def job(state: str, inputs: bool = True, attempts: int = 0):
        j = store.create("alice", {})
        if inputs:
            j.file("image").write_bytes(b"png")
            j.file("audio").write_bytes(b"wav")
        if state != "checking":
            store.mark_queued(j.id)
        for _ in range(attempts):
            store.start(j.id, time.time() + 60)
            if state == "queued" or _ < attempts - 1:
                store.requeue(j.id)
        return j.id

    checking = job("checking", inputs=False)
    queued = job("queued")
    lost_inputs = job("queued", inputs=False)
    running = job("running", attempts=1)
    running_twice = job("running", attempts=2)
    orphan = tmp_path / "0b9a3f5e-1f7e-4a51-9d0b-6b1f1f0f0f0f"
    orphan.mkdir()
    (orphan / "audio.wav").write_bytes(b"x")
    restarted = JobStore(tmp_path, max_pending=10, max_attempts=2)  # a new replica, same database
    ready = restarted.recover()
    assert ready == [queued, running]
    assert restarted.get(checking) is None and not (tmp_path / checking).exists()
    assert restarted.get(lost_inputs).state == JobState.failed
    assert restarted.get(running_twice).state == JobState.failed
    assert "restart" in restarted.get(running_twice).error
    assert not orphan.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(
        [queued, lost_inputs, running, running_twice])
    assert not any((tmp_path / i / "audio.wav").exists() for i in (lost_inputs, running_twice))


def test_job_store_share_interrupt_and_private_files(tmp_path):
    """One client's share of the queue; a stop gives the attempt back and recovery queues the job
    again even on its last attempt; folders 0700 and files 0600 whatever the umask."""
    import stat

    from serve.jobs import ClientShareFullError, QueueFullError, write_private

    old_umask = os.umask(0o002)  # a permissive umask: the store must not depend on it
    try:
        store = JobStore(tmp_path / "jobs", max_pending=3, max_attempts=1, max_per_client=2)
        a1, a2 = store.create("alice", {}), store.create("alice", {})
        with pytest.raises(ClientShareFullError, match="share"):
            store.create("alice", {})
        b1 = store.create("bob", {})  # bob still gets in
        with pytest.raises(QueueFullError):
            store.create("carol", {})  # the whole queue is full now
        assert store.pending("alice") == 2 and store.pending("bob") == 1 and store.pending() == 3
        for job in (a1, a2, b1):
            write_private(job.file("image"), b"png")
            write_private(job.file("audio"), b"wav")
            store.mark_queued(job.id)
            assert stat.S_IMODE(job.folder.stat().st_mode) == 0o700
            assert stat.S_IMODE(job.file("image").stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "jobs").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "jobs" / "jobs.sqlite").stat().st_mode) == 0o600
        assert store.start(a1.id, time.time() + 60) and store.get(a1.id).attempts == 1  # its last attempt
        assert store.interrupt(a1.id) and not store.interrupt(a2.id)  # only a running job
        job = store.get(a1.id)
        assert job.state == JobState.interrupted and job.attempts == 0 and job.started_s is None
        assert store.counts()["queued"] == 3 and store.pending() == 3  # still holds its place
        restarted = JobStore(tmp_path / "jobs", max_pending=3, max_attempts=1, max_per_client=2)
        assert restarted.recover() == [a1.id, a2.id, b1.id]  # not failed: the stop spent no attempt
        assert restarted.get(a1.id).state == JobState.queued
        # a crash (no drain) on the last attempt still fails the job, as before
        assert restarted.start(a2.id, time.time() + 60)
        assert JobStore(tmp_path / "jobs", max_pending=3, max_attempts=1).recover() == [a1.id, b1.id]
    finally:
        os.umask(old_umask)
    with pytest.raises(ServeConfigError, match="max_queue_per_client"):
        JobStore(tmp_path / "other", max_pending=3, max_per_client=0)
