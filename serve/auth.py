"""Who may use the service: client tokens, the loopback rule, and the browser Origin check.

* Tokens are per client and never part of the platform config (which is dumped to MLflow params,
  model packages and the Serve app args). They are read, in the ingress replica, from:

  - ``LOOPY_SERVE_TOKENS_FILE``: path of a file with one ``client_id token`` per line
    (``#`` starts a comment; blank lines are skipped) - a mounted Kubernetes Secret on the cluster;
  - ``LOOPY_SERVE_TOKENS``: inline ``client_id:token,client2:token2``;
  - ``serve.tokens_file``: a file path in the config (the path only; the env variables win).

  All sources are merged. A request sends ``Authorization: Bearer <token>`` and is then that
  client; each job belongs to the client that created it.
* Without any token the service runs only on a loopback host (``127.0.0.1``, ``::1``,
  ``localhost``), every request being the client :data:`LOCAL_CLIENT`; on any other host it
  refuses to start (:func:`require_auth_for`).
* Host allowlist (:class:`HostAllowlist`), in both modes: a request whose ``Host`` is not a
  loopback name (``127.0.0.1``, ``localhost``, ``[::1]``, with any port) or one of
  ``serve.allowed_hosts`` is refused (421), so a page whose name was rebound to 127.0.0.1 (DNS
  rebinding) reaches nothing: its requests carry its own name as ``Host``.
* Browsers: a state-changing request (POST, DELETE) whose ``Origin`` is not the service's own
  (a loopback name at ``serve.port``, or an allowed public name; compared with the allowlist,
  never with the request's ``Host``) or one of ``serve.allowed_origins`` is refused, so a web page
  elsewhere cannot drive a service on the user's loopback (:func:`origin_allowed`).
"""
from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence
from urllib.parse import urlsplit

from serve.errors import ServeConfigError

TOKENS_FILE_ENV = "LOOPY_SERVE_TOKENS_FILE"
TOKENS_ENV = "LOOPY_SERVE_TOKENS"
LOCAL_CLIENT = "local"
"""The client id of every request to a loopback service that has no tokens."""


def parse_tokens_file(text: str, source: str) -> dict[str, str]:
    """``client_id token`` lines -> ``{client_id: token}``; the error names ``source`` and the
    line number (never the token)."""
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ServeConfigError(f"{source}:{number}: expected 'client_id token', got {len(parts)} words")
        out[parts[0]] = parts[1]
    return out


def parse_tokens_inline(text: str, source: str = TOKENS_ENV) -> dict[str, str]:
    """``client_id:token,client2:token2`` -> ``{client_id: token}``."""
    out: dict[str, str] = {}
    for number, item in enumerate(text.split(","), 1):
        item = item.strip()
        if not item:
            continue
        client, sep, token = item.partition(":")
        if not sep or not client.strip() or not token.strip():
            raise ServeConfigError(f"{source}: item {number} is not 'client_id:token'")
        out[client.strip()] = token.strip()
    return out


def load_tokens(tokens_file: Optional[str] = None, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Merge the tokens of ``tokens_file``, ``$LOOPY_SERVE_TOKENS_FILE`` and ``$LOOPY_SERVE_TOKENS``
    (later sources win per client). Raises :class:`ServeConfigError` for a missing file, a
    malformed line, a short token (< 16 characters) or one token shared by two clients."""
    tokens: dict[str, str] = {}
    for path in (tokens_file, environ.get(TOKENS_FILE_ENV)):
        if path:
            file = Path(path)
            if not file.is_file():
                raise ServeConfigError(f"tokens file {file} does not exist")
            tokens.update(parse_tokens_file(file.read_text(), str(file)))
    inline = environ.get(TOKENS_ENV)
    if inline:
        tokens.update(parse_tokens_inline(inline))
    for client, token in tokens.items():
        if len(token) < 16:
            raise ServeConfigError(f"the token of client {client!r} is shorter than 16 characters")
    if len(set(tokens.values())) != len(tokens):
        raise ServeConfigError("two clients share one token; give every client its own")
    return tokens


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (``127.0.0.0/8``, ``::1``)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def require_auth_for(host: str, tokens: Mapping[str, str]) -> None:
    """Refuse (``ServeConfigError``) to serve a non-loopback ``host`` without client tokens."""
    if not tokens and not is_loopback(host):
        raise ServeConfigError(
            f"serve.host={host} is not a loopback address and no client tokens are set: give them in "
            f"${TOKENS_FILE_ENV} (a file of 'client_id token' lines) or ${TOKENS_ENV} "
            f"('client_id:token,...'), or bind to 127.0.0.1")


class Authenticator:
    """Maps an ``Authorization`` header to a client id (``tokens``: ``{client_id: token}``)."""

    def __init__(self, tokens: Mapping[str, str]):
        self._tokens = [(client, token.encode()) for client, token in tokens.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def client_for(self, header: Optional[str]) -> Optional[str]:
        """The client id for ``Bearer <token>`` (the scheme in any case), :data:`LOCAL_CLIENT` when
        auth is off, else None.
        Every token is compared in constant time, so the answer time does not tell which matched."""
        if not self._tokens:
            return LOCAL_CLIENT
        if not header:
            return None
        scheme, _, sent_text = header.strip().partition(" ")
        if scheme.lower() != "bearer":  # auth schemes are case-insensitive (RFC 7235, section 2.1)
            return None
        sent = sent_text.strip().encode()
        found = None
        for client, token in self._tokens:
            if hmac.compare_digest(sent, token):
                found = client
        return found


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def split_host(value: str) -> Optional[tuple[str, Optional[int]]]:
    """A ``Host`` header or URL netloc -> (lower-case name without brackets, port or None); None
    when malformed (``a:b:c``, a port that is not a number, user info, an empty name)."""
    value = value.strip().lower()
    if not value or "@" in value or "/" in value:
        return None
    if value.startswith("["):  # [v6]:port
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, sep, port_text = value.partition(":")
        if ":" in port_text:
            return None  # an IPv6 address must be in brackets
        port_text = port_text if sep else None
    if not name:
        return None
    if port_text is not None:
        if not port_text.isdigit() or not port_text.isascii() or not 0 < int(port_text) < 65536:
            return None
        return name, int(port_text)
    return name, None


class HostAllowlist:
    """The ``Host`` values a service answers: the loopback names with any port, and ``public``
    (``serve.allowed_hosts``: ``name`` for any port or ``name:port``). ``port``: the service's
    public port (``serve.port``), the one loopback port a browser origin may have."""

    def __init__(self, public: Sequence[str] = (), port: Optional[int] = None):
        self.port = port
        self.public: list[tuple[str, Optional[int]]] = []
        for entry in public:
            parsed = split_host(entry)
            if parsed is None:
                raise ServeConfigError(f"serve.allowed_hosts: {entry!r} is not a host name or name:port")
            self.public.append(parsed)

    def _public_match(self, name: str, port: Optional[int]) -> bool:
        return any(name == n and (p is None or p == port) for n, p in self.public)

    def host_allowed(self, host: Optional[str]) -> bool:
        """May a request with this ``Host`` header be answered?"""
        parsed = split_host(host or "")
        if parsed is None:
            return False
        name, port = parsed
        return name in LOOPBACK_NAMES or self._public_match(name, port)

    def origin_is_own(self, origin: str) -> bool:
        """Is ``origin`` (``scheme://host[:port]``) the service's own page? A loopback name at the
        service's port (another local port is another site), or an allowed public name."""
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or parts.path or parts.query:
            return False
        parsed = split_host(parts.netloc)
        if parsed is None:
            return False
        name, port = parsed
        if name in LOOPBACK_NAMES:
            return port is not None and port == self.port
        return self._public_match(name, port)


def origin_allowed(origin: Optional[str], hosts: HostAllowlist, allowed: Sequence[str] = (),
                   fetch_site: Optional[str] = None) -> bool:
    """May a request with these headers change state? ``origin``: the ``Origin`` header (absent
    for non-browser clients: allowed); ``hosts``: the service's own names (compared with the
    origin; the request's ``Host`` plays no part, a rebound name would match it); ``allowed``:
    extra origins (``https://app.example``); ``fetch_site``: ``Sec-Fetch-Site`` (``cross-site`` is
    refused unless the origin is listed)."""
    if origin is None:
        return fetch_site not in ("cross-site", "same-site")
    if origin in allowed:
        return True
    if origin == "null":
        return False
    if fetch_site in ("cross-site", "same-site"):
        return False
    return hosts.origin_is_own(origin)
