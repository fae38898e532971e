"""A small HTTP/1.1 server on asyncio and httptools (the parser uvicorn uses).

Why not a framework: the inference path of a microsecond-scale model is
dominated by per-request framework overhead, and the agent needs only exact
paths, JSON bodies, keep-alive and a clean drain on SIGTERM. This is that and
nothing else: persistent connections, pipelined requests answered in order,
``Expect: 100-continue``, a hard body-size cap (413 before the body is read),
400 on malformed requests, and a drain that lets in-flight requests finish.

The application is a callable taking a :class:`Request` and returning either
a :class:`Response` (answered at once, no task is created) or an awaitable of
one (for work that leaves the event loop).
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools
import orjson
import structlog

log = structlog.get_logger("edge_agent.http")


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, status: int, doc: object) -> Response:
        return cls(status, orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY))

    @classmethod
    def error(cls, status: int, message: str) -> Response:
        return cls(status, orjson.dumps({"error": message}))


App = Callable[[Request], "Response | Awaitable[Response]"]
_REASONS = {s.value: s.phrase for s in HTTPStatus}


class _DateCache:
    """The Date header changes once a second; format it once a second."""

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = email.utils.formatdate(now, usegmt=True).encode()
        return self._value


class HttpServer:
    def __init__(self, app: App, max_body_bytes: int = 8 << 20, idle_timeout_s: float = 75.0):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self.connections: set[_Connection] = set()
        self._servers: list[asyncio.base_events.Server] = []
        self._dates = _DateCache()
        self.closing = False
        self.requests_in_flight = 0
        self._sweeper: asyncio.Future[None] | None = None

    async def _sweep_idle(self) -> None:
        # One timer for all connections: re-arming a timer per request costs
        # more than this sweep, which runs a few times per idle period.
        interval = max(0.05, self.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            deadline = time.monotonic() - self.idle_timeout_s
            for conn in list(self.connections):
                if conn.last_active < deadline:
                    conn.close_when_idle()

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        """Bind and start accepting; returns the bound address (port 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(self), host, port, backlog=1024, reuse_address=True)
        self._servers.append(server)
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep_idle())
        sockname = server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def shutdown(self, timeout: float) -> bool:
        """Stop accepting, let in-flight requests finish; True when all finished in time."""
        self.closing = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.close_when_idle()
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        clean = not self.connections
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.abort()
        for server in self._servers:
            await server.wait_closed()
        return clean


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.pending: collections.deque[Request] = collections.deque()
        self.busy = False
        self.keep_alive = True
        self.last_active = time.monotonic()
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_len = 0
        self._refused = False

    # -- transport events ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed HTTP request: {exc}")

    # -- parser callbacks ---------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_len = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.server.max_body_bytes:
            self._refuse(413, f"request body of {length} bytes exceeds the limit of {self.server.max_body_bytes}")
            return
        if self._headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > self.server.max_body_bytes:
            self._refuse(413, f"request body exceeds the limit of {self.server.max_body_bytes} bytes")
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        url = httptools.parse_url(self._url)
        path = url.path.decode("latin-1")
        query = url.query.decode("latin-1") if url.query else ""
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = Request(self.parser.get_method().decode(), path, query, self._headers, body)
        if not self.parser.should_keep_alive():
            self.keep_alive = False
        if self.busy:
            self.pending.append(request)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        self._dispatch(request)

    # -- dispatch ---------------------------------------------------------------------
    def _dispatch(self, request: Request) -> None:
        self.server.requests_in_flight += 1
        try:
            result = self.server.app(request)
        except Exception:
            log.exception("handler failed", path=request.path)
            result = Response.error(500, "internal error")
        if isinstance(result, Response):
            self._finish(result)
            return
        self.busy = True
        task = asyncio.ensure_future(result)
        task.add_done_callback(self._on_task_done)

    def _on_task_done(self, task: asyncio.Future[Response]) -> None:
        if task.cancelled():
            response = Response.error(503, "request cancelled: the agent is shutting down")
        elif task.exception() is not None:
            log.error("handler failed", error=repr(task.exception()))
            response = Response.error(500, "internal error")
        else:
            response = task.result()
        self.busy = False
        self._finish(response)
        while self.pending and not self.busy and self.transport is not None:
            self._dispatch(self.pending.popleft())
        if not self.pending and self.transport is not None and not self.busy:
            self.transport.resume_reading()

    def _finish(self, response: Response) -> None:
        self.server.requests_in_flight -= 1
        keep_alive = self.keep_alive and not self.server.closing
        self._write(response, keep_alive)
        if not keep_alive and not self.pending and self.transport is not None:
            self.transport.close()
        self.last_active = time.monotonic()

    def _write(self, response: Response, keep_alive: bool) -> None:
        if self.transport is None:
            return
        reason = _REASONS.get(response.status, "Unknown")
        head = [
            f"HTTP/1.1 {response.status} {reason}\r\n".encode(),
            b"Server: edge-agent\r\nDate: ",
            self.server._dates.get(),
            b"\r\nContent-Type: ",
            response.content_type.encode(),
            f"\r\nContent-Length: {len(response.body)}\r\n".encode(),
        ]
        for name, value in response.headers:
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        if not keep_alive:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        head.append(response.body)
        self.transport.write(b"".join(head))

    def _refuse(self, status: int, message: str) -> None:
        """Answer an unparseable or oversized request and close: the stream cannot be trusted."""
        self._refused = True
        self.keep_alive = False
        if self.transport is not None and not self.busy:
            self._write(Response.error(status, message), keep_alive=False)
            self.transport.close()
        elif self.transport is not None:
            self.pending.clear()
            self.transport.close()

    # -- lifecycle ----------------------------------------------------------------------
    def close_when_idle(self) -> None:
        self.keep_alive = False
        if not self.busy and not self.pending and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
