"""The Python client of the Loopy HTTP service (:mod:`serve.app`), used by the demo, the service
tests and the serve benchmark.

One :class:`VideoClient` per service (``base_url`` such as ``http://127.0.0.1:8000``)::

    with VideoClient("http://127.0.0.1:8000", token="secret") as client:
        client.wait_healthy(timeout_s=120)                  # GET /healthz until it answers 200
        job_id = client.submit(Path("face.png"), Path("speech.wav"), {"steps": 10})
        client.wait(job_id, timeout_s=600)                   # poll GET /v1/videos/{id}
        client.download(job_id, Path("out.mp4"))             # GET /v1/videos/{id}/file

Every failure is a :class:`ClientError` (a :class:`serve.errors.ServeError`) whose message names
the request and what the service answered:

* :class:`ServiceUnavailable` - the service cannot be reached, or did not become healthy in time;
* :class:`RequestRejected` - a non-2xx answer; ``status`` (HTTP code), ``field`` (the form field
  the service names, if any), ``retry_after_s`` (a 429's ``Retry-After``, seconds);
* :class:`JobFailed` - the job ended in state ``failed`` (``status`` holds its last status body);
* :class:`JobTimeout` - the job was not done within the caller's time limit.

All times are in seconds. The client never reads proxy settings from the environment
(``trust_env=False``): the service is on 127.0.0.1 and a proxy would only get in the way.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import httpx

from serve.errors import ServeError

ACCEPTED = (200, 201, 202)
ACTIVE_STATES = frozenset({"queued", "running", "interrupted"})  # interrupted: by a stop, runs again
MAX_BODY_CHARS = 500  # of an error answer quoted in a message


class ClientError(ServeError):
    """A request to the service failed; the message names the request and the answer."""


class ServiceUnavailable(ClientError):
    """The service could not be reached, or ``/healthz`` did not answer 200 in time."""


class RequestRejected(ClientError):
    """The service answered a request with a non-2xx status.

    ``status``: the HTTP status code; ``field``: the form field the answer names (``image``,
    ``audio``, an option, ``queue`` ...) or None; ``retry_after_s``: seconds to wait before retrying
    (a 429's ``Retry-After``) or None; ``body``: the answer's text (at most 500 characters).
    """

    def __init__(self, request: str, response: httpx.Response):
        self.status = response.status_code
        self.body = response.text[:MAX_BODY_CHARS]
        self.field: Optional[str] = None
        try:
            data = response.json()
            if isinstance(data, dict) and isinstance(data.get("field"), str):
                self.field = data["field"]
        except ValueError:
            pass
        retry = response.headers.get("retry-after")
        self.retry_after_s: Optional[float] = float(retry) if retry and retry.replace(".", "", 1).isdigit() else None
        super().__init__(f"{request} answered {self.status}: {self.body}")


class JobFailed(ClientError):
    """A job ended in state ``failed``; ``job_id`` and ``status`` (its last status body)."""

    def __init__(self, job_id: str, status: Mapping[str, Any]):
        self.job_id = job_id
        self.status = dict(status)
        super().__init__(f"job {job_id} failed: {status.get('error') or status}")


class JobTimeout(ClientError):
    """A job was not done within the time limit; ``job_id`` and ``status`` (its last status body)."""

    def __init__(self, job_id: str, timeout_s: float, status: Mapping[str, Any]):
        self.job_id = job_id
        self.status = dict(status)
        super().__init__(f"job {job_id} not done after {timeout_s:.0f} s (last: {dict(status)})")


def job_state(status: Mapping[str, Any]) -> Optional[str]:
    """The state (``queued``, ``running``, ``done``, ``failed``) of a status body."""
    return status.get("state") or status.get("status")


class VideoClient:
    """Client of one Loopy service: health, submit, poll, download.

    ``base_url``: the service root (``http://127.0.0.1:8000``); ``token``: this client's bearer
    token (one of the service's client tokens, :mod:`serve.auth`), sent as
    ``Authorization: Bearer <token>`` on every request (None: no header, for a loopback service
    without tokens); ``timeout_s``: limit of one request (reading the answer, seconds; an upload of a few
    MB and the service's checks of it fit in the default 60 s); ``connect_timeout_s``: limit of
    opening the connection (seconds). ``http`` is the underlying :class:`httpx.Client`, for
    requests this class has no method for. Use it as a context manager or call :meth:`close`.
    """

    def __init__(self, base_url: str, token: Optional[str] = None, timeout_s: float = 60.0,
                 connect_timeout_s: float = 10.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, headers=headers, trust_env=False,
                                 timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s))

    # --- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connections."""
        self.http.close()

    def __enter__(self) -> "VideoClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- plumbing --------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One request; a transport failure becomes :class:`ServiceUnavailable`."""
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnavailable(f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}") from exc

    def _json(self, method: str, path: str, accept=(200,), **kwargs) -> dict:
        resp = self._request(method, path, **kwargs)
        if resp.status_code not in accept:
            raise RequestRejected(f"{method} {path}", resp)
        try:
            body = resp.json()
        except ValueError as exc:
            raise ClientError(f"{method} {path} answered {resp.status_code} with no JSON: "
                              f"{resp.text[:MAX_BODY_CHARS]}") from exc
        if not isinstance(body, dict):
            raise ClientError(f"{method} {path} answered {resp.status_code} with {body!r}, not an object")
        return body

    # --- health ----------------------------------------------------------------------------------
    def health(self) -> dict:
        """``GET /healthz`` (no token needed): ``{"status": "ok"}``."""
        return self._json("GET", "/healthz")

    def stats(self) -> dict:
        """``GET /v1/stats`` (this client's token): ``{"jobs": {state: count}, "max_queue": N,
        "max_queue_per_client": M or None, "mine": this client's pending jobs}``."""
        return self._json("GET", "/v1/stats")

    def is_healthy(self) -> bool:
        """True when ``GET /healthz`` answers 200 now (any error: False)."""
        try:
            self.health()
            return True
        except ClientError:
            return False

    def wait_healthy(self, timeout_s: float, alive: Optional[Callable[[], bool]] = None,
                     poll_s: float = 0.5) -> dict:
        """Poll ``/healthz`` every ``poll_s`` seconds until it answers 200 (returns its body).

        ``alive``: called between polls; when it returns False (the process serving the app has
        exited) waiting stops at once. Raises :class:`ServiceUnavailable` then, or after
        ``timeout_s`` seconds.
        """
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while True:
            try:
                return self.health()
            except ClientError as exc:
                last = str(exc)
            if alive is not None and not alive():
                raise ServiceUnavailable(f"the service exited before it answered /healthz ({self.base_url}; "
                                         f"last: {last})")
            if time.monotonic() >= deadline:
                raise ServiceUnavailable(f"{self.base_url}/healthz did not answer 200 within {timeout_s:.0f} s "
                                         f"(last: {last})")
            time.sleep(poll_s)

    # --- jobs ------------------------------------------------------------------------------------
    def submit(self, image: Path | bytes, audio: Path | bytes, options: Optional[Mapping[str, Any]] = None) -> str:
        """``POST /v1/videos`` with the portrait ``image`` and the ``audio`` (a file path or the
        bytes) and sampler ``options`` (``steps``, ``seed``, ``audio_ratio``, ``ref_ratio``, ``reference_init``, ``noise_scale``, ``fps``,
        ``size``; sent as form fields). Returns the job id. A refusal (413 / 422 naming the field,
        429 with ``retry_after_s`` when the queue is full, 503 when its storage is full, 401)
        raises :class:`RequestRejected`."""
        def part(value: Path | bytes, name: str):
            if isinstance(value, (bytes, bytearray)):
                return (name, bytes(value), "application/octet-stream")
            return (Path(value).name, Path(value).read_bytes(), "application/octet-stream")

        files = {"image": part(image, "image"), "audio": part(audio, "audio")}
        data = {k: str(v) for k, v in (options or {}).items()}
        body = self._json("POST", "/v1/videos", accept=ACCEPTED, files=files, data=data)
        job_id = body.get("id") or body.get("job_id")
        if not job_id:
            raise ClientError(f"POST /v1/videos gave no job id: {body}")
        return str(job_id)

    def status(self, job_id: str) -> dict:
        """``GET /v1/videos/{id}``: ``state``, ``progress`` (0..1), ``clips_done`` / ``clips_total``,
        ``queue_position``, ``error`` ... An unknown id raises :class:`RequestRejected` (404)."""
        return self._json("GET", f"/v1/videos/{job_id}")

    def delete(self, job_id: str) -> None:
        """``DELETE /v1/videos/{id}``: cancel the job if it runs and remove it and its files.
        An unknown id (or another client's) raises :class:`RequestRejected` (404)."""
        resp = self._request("DELETE", f"/v1/videos/{job_id}")
        if resp.status_code != 204:
            raise RequestRejected(f"DELETE /v1/videos/{job_id}", resp)

    def wait(self, job_id: str, timeout_s: float, poll_s: float = 2.0,
             on_update: Optional[Callable[[dict], None]] = None) -> dict:
        """Poll the job every ``poll_s`` seconds until it is ``done`` (returns its status body).

        ``on_update`` gets every status body polled. Raises :class:`JobFailed` for a failed job,
        :class:`JobTimeout` after ``timeout_s`` seconds, :class:`ClientError` for a state the
        client does not know.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status(job_id)
            if on_update is not None:
                on_update(status)
            state = job_state(status)
            if state == "done":
                return status
            if state == "failed":
                raise JobFailed(job_id, status)
            if state not in ACTIVE_STATES:
                raise ClientError(f"job {job_id}: unknown state {state!r} in {status}")
            if time.monotonic() >= deadline:
                raise JobTimeout(job_id, timeout_s, status)
            time.sleep(poll_s)

    def download(self, job_id: str, dest: Path) -> Path:
        """``GET /v1/videos/{id}/file`` streamed to ``dest`` (folders created). Returns ``dest``.
        A job not done yet raises :class:`RequestRejected` (409); an empty file :class:`ClientError`."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        path = f"/v1/videos/{job_id}/file"
        try:
            with self.http.stream("GET", path) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise RequestRejected(f"GET {path}", resp)
                with dest.open("wb") as fh:
                    for chunk in resp.iter_bytes():
                        fh.write(chunk)
        except httpx.TransportError as exc:
            raise ServiceUnavailable(f"GET {self.base_url}{path}: {type(exc).__name__}: {exc}") from exc
        if dest.stat().st_size == 0:
            raise ClientError(f"the downloaded video {dest} is empty")
        return dest

    def generate(self, image: Path | bytes, audio: Path | bytes, dest: Path,
                 options: Optional[Mapping[str, Any]] = None, timeout_s: float = 600.0, poll_s: float = 2.0,
                 on_update: Optional[Callable[[dict], None]] = None) -> Path:
        """:meth:`submit`, :meth:`wait` (``timeout_s`` seconds) and :meth:`download` to ``dest``."""
        job_id = self.submit(image, audio, options)
        self.wait(job_id, timeout_s, poll_s=poll_s, on_update=on_update)
        return self.download(job_id, dest)
