"""Service hardening over real HTTP against the running service (issue 26): bounded request heads
(431 before Serve's proxy reads them), the Host allowlist and the Origin check against it, every
listening socket of the service's process tree on loopback, one client's share of the queue,
browser headers, and form / media edge cases (duplicate fields, ASCII digits, sample-rate floor,
one-frame audio, the Bearer scheme in any case, private job files)."""
from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from test_serve import OTHER_TOKEN, TOKEN, free_port, noise_png, portrait_bytes, post, sox_audio, wait_done

AUTH = {"Authorization": f"Bearer {TOKEN}"}
OTHER = {"Authorization": f"Bearer {OTHER_TOKEN}"}
PUBLIC_NAME = "loopy.example"
HEADER_TIMEOUT_S = 3.0
SHARE = 2  # serve.max_queue_per_client
UNKNOWN_ID = "0b9a3f5e-1f7e-4a51-9d0b-6b1f1f0f0f0f"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("hardening_media")
    subprocess.run(["sox", "-n", "-r", "4000", "-c", "1", str(d / "4k.wav"), "synth", "1", "sine", "300-900"],
                   check=True)
    return {
        "image": portrait_bytes("JPEG"),
        "noface": noise_png(),
        "audio": sox_audio(d / "speech.wav", 1.0),
        "tiny": sox_audio(d / "tiny.wav", 0.02),  # 20 ms: shorter than one 40 ms frame
        "half": sox_audio(d / "half.wav", 0.5),  # shorter than one frame at fps=1
        "4k": (d / "4k.wav").read_bytes(),
    }


@pytest.fixture(scope="module")
def hard_service(ray_local, tiny_package, tiny_weights, tmp_path_factory):
    """The service with two clients, queue 4 with a share of 2 per client, a public name, a 3 s
    header timeout and the default header bounds (16 KiB, 64 fields). Yields (base URL, port,
    job folder, the :class:`serve.app.ServiceHandle`)."""
    from core.config import load_platform_config
    from serve.app import start_service
    from serve.client import VideoClient

    port = free_port()
    job_dir = tmp_path_factory.mktemp("hard_jobs")
    tokens = tmp_path_factory.mktemp("hard_secrets") / "tokens"
    tokens.write_text(f"alice {TOKEN}\nbob {OTHER_TOKEN}\n")
    cfg = load_platform_config(None, [
        f"serve.model={tiny_package}", f"serve.job_dir={job_dir}", "serve.max_queue=4",
        f"serve.max_queue_per_client={SHARE}", "serve.max_upload_mb=1", "serve.max_audio_s=3",
        f"serve.tokens_file={tokens}", "serve.cpus_per_replica=0", f"serve.port={port}",
        f"serve.allowed_hosts=[{PUBLIC_NAME}]", f"serve.header_timeout_s={HEADER_TIMEOUT_S}",
        "sampler.steps=2", f"weights.tiny_dir={tiny_weights[0].tiny_dir}",
    ])
    service = start_service(cfg, name="loopy_hardening")
    base = f"http://127.0.0.1:{port}"
    with VideoClient(base) as api:
        api.wait_healthy(120)
    yield base, port, job_dir, service
    service.stop()


@pytest.fixture()
def http(hard_service):
    import httpx

    with httpx.Client(base_url=hard_service[0], trust_env=False, timeout=60) as client:
        yield client


def raw_request(port: int, head: bytes, body: bytes = b"", timeout_s: float = 20.0) -> bytes:
    """Send ``head`` (+ ``body``) on a new connection; return everything read until the server
    closes (the front answers one request per connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            sock.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused early: the answer is still readable
        out = b""
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            out += data
    return out


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else -1


def proxy_process():
    import psutil

    procs = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("ray::ProxyActor")]
    assert len(procs) == 1, procs
    return procs[0]


# --- item 1: bounded request heads ------------------------------------------------------------------------

def test_oversized_heads_are_431_before_the_proxy_reads_them(hard_service, http):
    _, port, _, service = hard_service
    proxy = proxy_process()
    rss_before = proxy.memory_info().rss
    big = b"Bearer " + b"a" * (8 * 2**20)  # 8 MB, no valid token needed
    head = b"GET /v1/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: " + big + b"\r\n\r\n"
    answers: list = [None, None]

    def attack(i: int) -> None:
        t0 = time.perf_counter()
        answers[i] = (raw_request(port, head), time.perf_counter() - t0)

    attackers = [threading.Thread(target=attack, args=(i,)) for i in range(2)]
    for t in attackers:
        t.start()
    latencies = []
    while any(t.is_alive() for t in attackers) or len(latencies) < 10:
        t0 = time.perf_counter()
        assert http.get("/healthz").status_code == 200
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.02)
    for t in attackers:
        t.join()
    for answer, seconds in answers:
        assert status_of(answer) == 431, answer[:200]
        assert b'"field": "headers"' in answer and seconds < 10, seconds
    assert max(latencies) < 1.0, latencies
    grown_mb = (proxy.memory_info().rss - rss_before) / 2**20
    assert grown_mb < 30, f"Serve's proxy grew by {grown_mb:.0f} MB"  # it never saw the header
    # too many fields (small ones) is a 431 too; the limit itself passes
    many = b"".join(b"X-F%d: 1\r\n" % i for i in range(100))
    assert status_of(raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + many + b"\r\n")) == 431
    fits = b"".join(b"X-F%d: 1\r\n" % i for i in range(60))  # + Host = 61 <= 64
    assert status_of(raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + fits + b"\r\n")) == 200
    assert service.front.refused >= 3


def test_front_refuses_slow_and_malformed_heads_and_one_request_per_connection(hard_service):
    _, port, _, _ = hard_service
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finishes its head
        answer = sock.recv(65536)
    assert status_of(answer) == 408 and HEADER_TIMEOUT_S - 0.5 < time.monotonic() - t0 < HEADER_TIMEOUT_S + 5
    smuggle = (b"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert status_of(raw_request(port, smuggle)) == 400
    assert status_of(raw_request(port, b"GET /healthz HTTP/1.0\r\n\r\n")) == 400  # no Host
    # a second request pipelined behind the first never reaches the proxy: one answer, then close
    pipelined = (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                 b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"b" * 2**20 + b"\r\n\r\n")
    answer = raw_request(port, pipelined)
    assert status_of(answer) == 200 and answer.count(b"HTTP/1.1 ") == 1, answer[:300]


# --- item 2: Host allowlist, Origin against it ------------------------------------------------------------

def test_host_allowlist_refuses_rebound_names(hard_service, http, media):
    _, port, _, _ = hard_service
    for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST",
                 PUBLIC_NAME, f"{PUBLIC_NAME}:8443"):
        assert http.get("/healthz", headers={"Host": host}).status_code == 200, host
    for host in ("rebind.attacker.example", f"rebind.attacker.example:{port}", f"127.0.0.1.attacker.example:{port}",
                 f"{PUBLIC_NAME}.attacker.example", "127.0.0.1:80:80", "user@127.0.0.1", "[::2]:1"):
        for method, path in (("GET", "/"), ("GET", "/healthz"), ("GET", f"/v1/videos/{UNKNOWN_ID}"),
                             ("DELETE", f"/v1/videos/{UNKNOWN_ID}")):
            resp = http.request(method, path, headers={**AUTH, "Host": host})
            assert resp.status_code == 421 and resp.json()["field"] == "host", (host, method, path, resp.text)
    # the attack itself: a page on a rebound name posts with its own Origin and Host
    evil = f"rebind.attacker.example:{port}"
    resp = post(http, media["image"], media["audio"], headers={**AUTH, "Host": evil, "Origin": f"http://{evil}"})
    assert resp.status_code == 421, resp.text


def test_origin_is_compared_with_the_allowlist_not_the_host(hard_service, http, media):
    _, port, _, _ = hard_service

    def origin_check(origin: str, host: str = f"127.0.0.1:{port}") -> int:
        # a photo without a face: past the Origin check it is a 422, before it a 403
        return post(http, media["noface"], media["audio"], headers={**AUTH, "Host": host, "Origin": origin}).status_code

    assert origin_check(f"http://127.0.0.1:{port}") == 422
    assert origin_check(f"http://localhost:{port}") == 422  # another allowed name than the Host sent
    assert origin_check(f"http://{PUBLIC_NAME}", host=PUBLIC_NAME) == 422
    assert origin_check(f"https://{PUBLIC_NAME}", host=f"127.0.0.1:{port}") == 422
    for origin in ("http://127.0.0.1:9", "http://evil.example", f"http://evil.example:{port}", "null",
                   f"http://127.0.0.1:{port}.evil.example", f"file://127.0.0.1:{port}"):
        assert origin_check(origin) == 403, origin
    # the old rule (Origin == Host) let a rebound name through; the allowlist does not
    assert origin_check(f"http://{PUBLIC_NAME}.evil", host=f"{PUBLIC_NAME}.evil") == 421


# --- item 3: every listening socket on loopback -----------------------------------------------------------

def is_loopback_ip(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def listening(root) -> list[tuple[int, str, str, int]]:
    """(pid, process name, ip, port) of every TCP/UDP socket listening in ``root``'s process tree."""
    import psutil

    out = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and not conn.raddr):
                    out.append((proc.pid, proc.name(), conn.laddr.ip, conn.laddr.port))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return out


def test_every_port_of_the_service_listens_on_loopback(hard_service):
    """GCS, raylet, workers, dashboard agent, metrics, Serve controller, proxy and replicas, and
    the front. One documented exception (docs/SERVICE.md): the Serve replica's inter-deployment
    gRPC server, which Ray Serve binds to ``[::]:0`` in code; it exists only with Ray's token
    authentication on, and refuses a call without the cluster token."""
    import grpc
    import psutil
    from ray._private.authentication import authentication_utils

    _, port, _, service = hard_service
    sockets = listening(psutil.Process())
    assert (os.getpid(), psutil.Process().name(), "127.0.0.1", port) in sockets  # the front
    assert any(name.startswith("ray::ProxyActor") and p == service.proxy_port and ip == "127.0.0.1"
               for _, name, ip, p in sockets)
    names = {name for _, name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, names
    exposed = [s for s in sockets if not is_loopback_ip(s[2])]
    replica_ports = [s for s in exposed if s[1].startswith("ray::ServeReplica")]
    assert exposed == replica_ports, f"listening beyond loopback: {exposed}"
    assert len(replica_ports) <= len({pid for pid, name, _, _ in sockets if name.startswith("ray::ServeReplica")})
    if replica_ports:
        assert authentication_utils.is_token_auth_enabled(), "a replica port on [::] needs Ray's token auth"
        for _, _, _, p in replica_ports:
            with grpc.insecure_channel(f"127.0.0.1:{p}") as channel:
                call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
                with pytest.raises(grpc.RpcError) as err:
                    call(b"", timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value


# --- item 4: a client's share of the queue; /healthz says nothing more than ok ----------------------------

def test_one_client_gets_429_while_others_still_get_in(hard_service, http, media):
    from serve.client import VideoClient

    assert http.get("/healthz").json() == {"status": "ok"}  # no counts without a token
    assert http.get("/v1/stats").status_code == 401
    ids = {"alice": [], "bob": []}
    try:
        for _ in range(SHARE):
            resp = post(http, media["image"], media["audio"], steps=40)
            assert resp.status_code == 202, resp.text
            ids["alice"].append(resp.json()["id"])
        refused = post(http, media["image"], media["audio"], steps=40)
        assert refused.status_code == 429 and refused.json()["field"] == "queue", refused.text
        assert "share" in refused.json()["error"] and int(refused.headers["retry-after"]) >= 1
        resp = post(http, media["image"], media["audio"], headers=OTHER, steps=2)  # bob still gets in
        assert resp.status_code == 202, resp.text
        ids["bob"].append(resp.json()["id"])
        stats = http.get("/v1/stats", headers=AUTH).json()
        assert stats["mine"] == SHARE and stats["max_queue_per_client"] == SHARE and stats["max_queue"] == 4
        assert sum(stats["jobs"][s] for s in ("queued", "running")) == SHARE + 1
        assert http.get("/v1/stats", headers=OTHER).json()["mine"] == 1
    finally:
        for owner, token in (("alice", TOKEN), ("bob", OTHER_TOKEN)):
            with VideoClient(str(http.base_url), token=token) as api:
                for job_id in ids[owner]:
                    api.delete(job_id)
    assert http.get("/v1/stats", headers=AUTH).json()["mine"] == 0


# --- item 5: browser headers ------------------------------------------------------------------------------

def test_page_and_api_send_browser_security_headers(hard_service, http):
    page = http.get("/")
    assert page.status_code == 200
    html = page.text
    csp = page.headers["content-security-policy"]
    for block, tag in ((re.search(r"<script>(.*?)</script>", html, re.S).group(1), "script-src"),
                       (re.search(r"<style>(.*?)</style>", html, re.S).group(1), "style-src")):
        digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
        assert f"{tag} 'sha256-{digest}'" in csp, (tag, csp)
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    answers = [page, http.get("/healthz"), http.get(f"/v1/videos/{UNKNOWN_ID}", headers=AUTH),
               http.get(f"/v1/videos/{UNKNOWN_ID}/file", headers=AUTH), http.get("/v1/stats", headers=AUTH),
               http.get("/v1/stats"), http.get("/healthz", headers={"Host": "evil.example"})]
    for resp in answers:
        h = resp.headers
        assert h["x-content-type-options"] == "nosniff" and h["x-frame-options"] == "DENY", resp.request.url
        assert h["referrer-policy"] == "no-referrer" and "frame-ancestors 'none'" in h["content-security-policy"]
    for resp in answers[1:]:
        assert resp.headers["cache-control"] == "no-store", resp.request.url


# --- item 6: form and media edge cases --------------------------------------------------------------------

def test_form_and_media_edge_cases(hard_service, http, media):
    def multipart(fields: dict):
        files = [("image", ("p.img", media["noface"], "application/octet-stream")),
                 ("audio", ("a.snd", media["audio"], "application/octet-stream"))]
        return http.post("/v1/videos", files=files, data=fields, headers=AUTH)

    dup = multipart({"steps": ["2", "3"]})
    assert dup.status_code == 400 and dup.json()["field"] == "steps", dup.text
    dup_file = http.post("/v1/videos", headers=AUTH, files=[  # two files: within the parser's max_files
        ("image", ("a", media["noface"], "image/png")), ("image", ("b", media["image"], "image/jpeg"))])
    assert dup_file.status_code == 400 and dup_file.json()["field"] == "image", dup_file.text
    for field, value in (("steps", "\uff11\uff12"), ("steps", "\u0663"), ("steps", "1_0"), ("steps", "+3"),
                         ("steps", " 3"), ("seed", "-1"), ("audio_ratio", "1e1"), ("audio_ratio", "inf"),
                         ("fps", "25."), ("audio_ratio", "\u0664.5")):
        resp = multipart({field: value})
        assert resp.status_code == 422 and resp.json()["field"] == field, (field, value, resp.text)
        assert "ASCII digits" in resp.json()["error"]
    ok = multipart({"steps": "3", "audio_ratio": "4.5", "fps": "25"})  # past the options: the photo
    assert ok.status_code == 422 and ok.json()["field"] == "image", ok.text  # without a face is refused
    low = post(http, media["image"], media["4k"])
    assert low.status_code == 422 and low.json()["field"] == "audio", low.text
    assert "4000 Hz" in low.json()["error"] and "8000 Hz" in low.json()["error"]
    tiny = post(http, media["image"], media["tiny"])
    assert tiny.status_code == 422 and "shorter than one frame (40 ms at 25 fps)" in tiny.json()["error"], tiny.text
    half = post(http, media["image"], media["half"], fps=1)  # 0.5 s of audio at 1 fps: no frame
    assert half.status_code == 422 and "(1000 ms at 1 fps)" in half.json()["error"], half.text


def test_bearer_scheme_any_case_and_private_job_files(hard_service, http, media):
    _, _, job_dir, _ = hard_service
    for scheme in ("bearer", "BEARER", "BeArEr"):
        assert http.get("/v1/stats", headers={"Authorization": f"{scheme} {TOKEN}"}).status_code == 200, scheme
    for header in (f"Basic {TOKEN}", f"Bearer{TOKEN}", TOKEN):
        assert http.get("/v1/stats", headers={"Authorization": header}).status_code == 401, header
    resp = post(http, media["image"], media["audio"], headers={"Authorization": f"bearer {TOKEN}"}, steps=2)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["id"]
    folder = Path(job_dir) / job_id
    seen_inputs = set()
    deadline = time.monotonic() + 120
    while http.get(f"/v1/videos/{job_id}", headers=AUTH).json()["state"] != "done":
        for path in list(folder.iterdir()) if folder.is_dir() else []:
            try:
                mode = stat.S_IMODE(path.stat().st_mode)
            except FileNotFoundError:
                continue
            assert mode == 0o600, (path.name, oct(mode))
            seen_inputs.add(path.name)
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert wait_done(http, job_id)["state"] == "done"
    assert stat.S_IMODE(Path(job_dir).stat().st_mode) == 0o700
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "result.mp4").stat().st_mode) == 0o600
    assert stat.S_IMODE((Path(job_dir) / "jobs.sqlite").stat().st_mode) == 0o600
    assert seen_inputs, "no input file was seen while the job ran"
