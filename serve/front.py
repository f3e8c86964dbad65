"""The service's front listener: bounds every request's head before Serve's proxy reads a byte.

Why it exists: Ray Serve's HTTP proxy runs uvicorn with ``http="auto"`` (httptools, which keeps
every header byte it is sent) and exposes none of uvicorn's parser options, so a request with a
multi-megabyte header is read whole by the proxy (measured figures: docs/SERVICE.md). uvicorn's
``h11_max_incomplete_event_size`` applies only to its h11 protocol, which Serve does not select.
So the public socket (``serve.host:serve.port``) belongs to this listener and Serve's proxy
listens on ``127.0.0.1:<serve.proxy_port>`` behind it.

Per connection, one request (the client's bytes are parsed with h11, a well-kept sans-IO HTTP/1.1
parser, with a bounded receive buffer):

* the request line and headers must fit in ``max_header_bytes`` and hold at most ``max_headers``
  fields, else ``431`` and the connection is closed; they must arrive within
  ``header_timeout_s``, else ``408``; a malformed head (h11 refuses it, e.g. a
  ``Content-Length`` beside ``Transfer-Encoding``) or one without ``Host`` is a ``400``;
* the head is forwarded as h11 re-serialises it, with ``Connection: close`` (the proxy closes the
  connection after its answer, so no second request on the same connection ever reaches it
  unparsed), then the body as h11 frames it (Content-Length or chunked; nothing past its end);
* the proxy's answer is copied back byte for byte until the proxy closes.

Memory per connection is bounded by ``max_header_bytes`` plus one read (64 KiB); the body streams
through with back-pressure. Used by :func:`serve.app.start_service` (``python -m serve.app``, the
demo, the tests) in a thread of the driver process, or on its own:
``python -m serve.front --listen 0.0.0.0:8000 --upstream 127.0.0.1:8001`` (docs/SERVICE.md).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import threading
from dataclasses import dataclass
from typing import Optional

import h11

log = logging.getLogger("loopy.serve.front")
READ_BYTES = 64 * 1024
DISCARD_S = 1.0  # after refusing a head, read and drop what the client still sends this long (no RST)


@dataclass(frozen=True)
class FrontLimits:
    """``max_header_bytes``: request line + headers (bytes); ``max_headers``: header fields;
    ``header_timeout_s``: seconds for the head to arrive."""

    max_header_bytes: int = 16384
    max_headers: int = 64
    header_timeout_s: float = 10.0


def _answer(status: int, reason: str, field: str, message: str) -> bytes:
    body = json.dumps({"field": field, "error": f"{field}: {message}"}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\ncache-control: no-store\r\nx-content-type-options: nosniff\r\n\r\n"
            ).encode() + body


class HeadRefused(Exception):
    def __init__(self, status: int, reason: str, message: str):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class FrontListener:
    """Accepts on ``host:port`` and forwards bounded requests to ``upstream`` (``(host, port)``)."""

    def __init__(self, host: str, port: int, upstream: tuple[str, int], limits: FrontLimits = FrontLimits()):
        self.host, self.port, self.upstream, self.limits = host, port, upstream, limits
        self.refused = 0  # heads answered 431 / 408 / 400 (for tests and logs)
        self._server: Optional[asyncio.AbstractServer] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        # Python 3.11's stream protocol drops its reference to a connection's task when the
        # client goes; without one here a task still closing could be garbage-collected mid-await
        self._tasks: set[asyncio.Task] = set()

    # --- one connection ----------------------------------------------------------------------------
    async def _read_head(self, reader: asyncio.StreamReader, conn: h11.Connection) -> h11.Request:
        lim = self.limits
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431:
                    raise HeadRefused(431, "Request Header Fields Too Large",
                                      f"request headers are larger than {lim.max_header_bytes} bytes") from None
                raise HeadRefused(400, "Bad Request", "malformed HTTP request") from None
            if isinstance(event, h11.Request):
                if len(event.headers) > lim.max_headers:
                    raise HeadRefused(431, "Request Header Fields Too Large",
                                      f"{len(event.headers)} header fields; at most {lim.max_headers}")
                names = [name for name, _ in event.headers]
                if b"host" not in names:  # HTTP/1.0 may omit it; the service needs it
                    raise HeadRefused(400, "Bad Request", "no Host header")
                if b"content-length" in names and b"transfer-encoding" in names:  # the request-smuggling shape
                    raise HeadRefused(400, "Bad Request", "both Content-Length and Transfer-Encoding")
                return event
            if event is h11.NEED_DATA:
                data = await reader.read(READ_BYTES)
                conn.receive_data(data)  # b"" = EOF: h11 then raises or reports ConnectionClosed
                continue
            if isinstance(event, h11.ConnectionClosed):  # closed before a request (a port probe): no answer
                raise ConnectionResetError("closed before a request")
            raise HeadRefused(400, "Bad Request", "no request")

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        up_writer = None
        try:
            try:
                request = await asyncio.wait_for(self._read_head(reader, conn), self.limits.header_timeout_s)
            except asyncio.TimeoutError:
                raise HeadRefused(408, "Request Timeout",
                                  f"request headers not received within {self.limits.header_timeout_s:g} s") from None
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            client = h11.Connection(h11.CLIENT)
            headers = [(name, value) for name, value in request.headers.raw_items()
                       if name.lower() not in (b"connection", b"keep-alive")]
            headers.append((b"connection", b"close"))
            up_writer.write(client.send(h11.Request(method=request.method, target=request.target, headers=headers)))
            forward = asyncio.create_task(self._forward_body(reader, conn, client, up_writer))
            try:
                await self._copy_back(up_reader, writer)  # until the proxy closes (Connection: close)
            finally:
                forward.cancel()  # the answer is out (or the client left): the body no longer matters
                await asyncio.gather(forward, return_exceptions=True)
            await self._finish(reader, writer)
        except HeadRefused as exc:
            self.refused += 1
            try:
                writer.write(_answer(exc.status, exc.reason, "headers" if exc.status != 400 else "request",
                                     exc.message))
                await self._finish(reader, writer)
            except (ConnectionError, OSError):
                pass
        except (ConnectionError, OSError, h11.ProtocolError):
            pass
        finally:
            for w in (up_writer, writer):
                if w is not None:
                    w.close()

    async def _forward_body(self, reader, conn: h11.Connection, client: h11.Connection, up_writer) -> None:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(READ_BYTES)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Data):
                up_writer.write(client.send(h11.Data(data=event.data)))
                await up_writer.drain()
            elif isinstance(event, h11.EndOfMessage):
                up_writer.write(client.send(h11.EndOfMessage()))
                await up_writer.drain()
                return  # one request per connection: nothing after its end is read
            else:
                return

    @staticmethod
    async def _copy_back(up_reader, writer) -> None:
        while True:
            data = await up_reader.read(READ_BYTES)
            if not data:
                return
            writer.write(data)
            await writer.drain()

    async def _finish(self, reader, writer) -> None:
        """End the answer (half-close: the client sees EOF at once), then drop what the client still
        sends before closing."""
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await self._discard(reader)

    @staticmethod
    async def _discard(reader) -> None:
        """Read and drop the client's remaining bytes for up to ``DISCARD_S`` (closing a socket with
        unread data sends a reset, which can destroy the answer before the client reads it)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + DISCARD_S
        try:
            while loop.time() < until:
                if not await asyncio.wait_for(reader.read(READ_BYTES), until - loop.time()):
                    return
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass

    # --- lifetime ------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port, limit=READ_BYTES,
                                                  reuse_address=True)

    def start_in_thread(self) -> "FrontListener":
        """Run the listener on its own event loop in a daemon thread; returns once it listens."""
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self.start())
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                failed.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()
            # stopped: finish what is left on the loop here, so no connection coroutine is left
            # for the garbage collector to close later, inside whatever another thread is doing
            left = asyncio.all_tasks(self._loop)
            for task in left:
                task.cancel()
            if left:
                self._loop.run_until_complete(asyncio.wait(left, timeout=10))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="loopy-front", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failed:
            raise failed[0]
        return self

    def stop(self) -> None:
        """Stop accepting; connections in flight are cancelled (their sockets closed) and the
        loop is closed."""
        if self._loop is None or self._server is None or self._loop.is_closed():
            return

        async def close() -> None:
            self._server.close()
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()

        fut = asyncio.run_coroutine_threadsafe(close(), self._loop)
        try:
            fut.result(timeout=10)
        except Exception:  # noqa: BLE001 - connections still open: the loop goes anyway
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not host:port")
    return host.strip("[]"), int(port)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Bounded front listener for the Loopy service (docs/SERVICE.md)")
    parser.add_argument("--listen", type=_host_port, required=True, help="host:port to accept on")
    parser.add_argument("--upstream", type=_host_port, required=True, help="Serve's HTTP proxy, host:port")
    parser.add_argument("--max-header-bytes", type=int, default=FrontLimits.max_header_bytes)
    parser.add_argument("--max-headers", type=int, default=FrontLimits.max_headers)
    parser.add_argument("--header-timeout-s", type=float, default=FrontLimits.header_timeout_s)
    args = parser.parse_args(argv)
    front = FrontListener(*args.listen, args.upstream,
                          FrontLimits(args.max_header_bytes, args.max_headers, args.header_timeout_s))

    async def run() -> None:
        await front.start()
        print(f"front listener on {args.listen[0]}:{args.listen[1]} -> {args.upstream[0]}:{args.upstream[1]}",
              flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
