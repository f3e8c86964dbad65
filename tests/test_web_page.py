"""The web page at ``/`` in headless Chromium: upload a portrait and an audio file, watch the
progress, and check that the ``<video>`` element plays the result.

Chromium is driven over the DevTools protocol (``--remote-debugging-port``) with the ``websockets``
client; everything stays on 127.0.0.1.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time

import pytest

from serve.client import VideoClient

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make browser installs it)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.next_id = 0

    def call(self, method: str, timeout_s: float = 30.0, **params) -> dict:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout_s
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        self.ws.close()


@pytest.fixture(scope="module")
def page_service(ray_local, tiny_package, tiny_weights, tmp_path_factory):
    from core.config import load_platform_config
    from serve.app import start_service

    port = free_port()
    cfg = load_platform_config(None, [
        f"serve.model={tiny_package}", f"serve.job_dir={tmp_path_factory.mktemp('page_jobs')}",
        "serve.cpus_per_replica=0", f"serve.port={port}", f"weights.tiny_dir={tiny_weights[0].tiny_dir}",
    ])
    service = start_service(cfg, name="loopy_page")  # the page's CSP and the front listener included
    url = f"http://127.0.0.1:{port}"
    with VideoClient(url) as api:
        api.wait_healthy(120)
    yield url
    service.stop()


@pytest.fixture()
def browser(tmp_path):
    """Headless Chromium with a fresh profile; yields a DevTools client of its first page."""
    import httpx

    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen([
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
        f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
        "about:blank",
    ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tools = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert proc.poll() is None, f"Chromium exited: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        yield tools
    finally:
        if tools is not None:
            tools.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_page_uploads_shows_progress_and_plays_the_video(page_service, browser, tmp_path):
    from PIL import Image
    from skimage import data

    image = tmp_path / "portrait.jpg"
    Image.fromarray(data.astronaut()[20:280, 80:380]).save(image)
    audio = tmp_path / "speech.wav"
    subprocess.run(["sox", "-n", "-r", "16000", "-c", "1", str(audio), "synth", "1.0", "sine", "200-600",
                    "tremolo", "5", "80"], check=True)

    cdp = browser
    cdp.call("Page.enable")
    cdp.call("Page.navigate", url=page_service + "/")
    deadline = time.monotonic() + 30
    while cdp.js("document.readyState") != "complete" or not cdp.js("!!document.getElementById('submit')"):
        assert time.monotonic() < deadline, "page did not load"
        time.sleep(0.2)
    assert "Loopy" in cdp.js("document.title")
    root = cdp.call("DOM.getDocument")["root"]["nodeId"]
    for selector, path in (("#image", image), ("#audio", audio)):
        node = cdp.call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        cdp.call("DOM.setFileInputFiles", nodeId=node, files=[str(path)])
    assert cdp.js("document.getElementById('audio').files.length") == 1
    cdp.js("document.getElementById('steps').value = '2'")
    cdp.js("document.getElementById('submit').click()")

    statuses, progress_values = [], []
    deadline = time.monotonic() + 240
    while True:
        state = cdp.js("""(() => { const v = document.getElementById('video');
            return {status: document.getElementById('status').textContent,
                    error: document.getElementById('error').textContent,
                    progress: document.getElementById('progress').value,
                    ready: v.readyState, duration: v.duration, src: v.src}; })()""")
        assert not state["error"], f"the page shows an error: {state['error']} (statuses {statuses})"
        if not statuses or statuses[-1] != state["status"]:
            statuses.append(state["status"])
        progress_values.append(state["progress"])
        if state["src"] and state["ready"] >= 1 and (state["duration"] or 0) > 0:
            break
        assert time.monotonic() < deadline, f"no playable video; statuses {statuses}"
        time.sleep(0.25)
    assert any(s.startswith(("Submitted", "Queued", "Generating")) for s in statuses), statuses
    assert statuses[-1].startswith("Done"), statuses
    assert progress_values == sorted(progress_values) and progress_values[-1] == 1
    assert state["duration"] == pytest.approx(1.0, abs=0.1)  # 25 frames of 40 ms
    # it plays: currentTime advances (muted so autoplay is allowed everywhere)
    cdp.js("(async () => { const v = document.getElementById('video'); v.muted = true; v.currentTime = 0; await v.play(); })()")
    time.sleep(0.6)
    after = cdp.js("(() => { const v = document.getElementById('video'); return {t: v.currentTime, err: v.error && v.error.code}; })()")
    assert after["err"] is None
    assert after["t"] > 0
