"""A small HTTP/1.1 server on asyncio and httptools (the parser uvicorn uses).

Why not a framework: the inference path of a microsecond-scale model is
dominated by per-request framework overhead, and the agent needs only exact
paths, JSON bodies, keep-alive and a clean drain on SIGTERM. This is that and
nothing else: persistent connections, pipelined requests answered in order,
``Expect: 100-continue``, 400 on malformed requests, and a drain that lets
in-flight requests finish.

Every byte a client can make the server hold is bounded, each limit answered
as soon as it is crossed rather than after buffering:

* request target: 414 beyond ``max_url_bytes``; request line + headers: 431
  beyond ``max_header_bytes`` or ``max_header_count`` fields;
* a body: 413 beyond ``max_body_bytes`` (from ``Content-Length`` alone); a
  chunked body is also refused with 413 when its raw bytes (framing included)
  pass ``max_body_bytes + max_header_bytes``, or when more than
  ``max_header_bytes`` arrive without a byte of body (endless chunk extensions
  or trailers). Trailer fields are read and dropped: they never change the
  request's headers;
* time: a request head not complete within ``header_timeout_s`` (from the
  connection's start, or from the previous answer) and a body not complete
  within ``body_timeout_s`` (from the end of its head) get 408 and the
  connection is closed, so slow clients cannot hold connection slots or the
  body budget;
* bodies held across all connections: 503 + ``Retry-After`` beyond
  ``max_inflight_body_bytes`` (bodies up to 64 KiB are always admitted, so
  health checks and small inferences go on while large uploads fill it);
* output: a connection whose transport holds more than
  ``write_buffer_high_bytes`` unsent is neither read nor parsed until the
  client catches up, so pipelining without reading cannot grow memory;
* connections: beyond ``max_connections`` a new one gets 503 and is closed;
* protocol upgrades (``Upgrade``, ``CONNECT``): 400, never handed to the application.

A refused request is answered, then the connection is shut for writing and
what the client still sends is read and dropped for a moment ("lingering
close"), so the kernel does not answer unread bytes with a reset that would
destroy the answer.

The application is a callable taking a :class:`Request` and returning either
a :class:`Response` (answered at once, no task is created) or an awaitable of
one (for work that leaves the event loop).

A :class:`StreamingResponse` (a language model's tokens as server-sent events)
is sent as it is made, chunked: each piece is written when its producer yields
it, and while the transport holds more than ``write_buffer_high_bytes`` unsent
the producer is not asked for the next one, so a client that stops reading
holds one high-water mark plus one piece, never the whole body. When the client
goes away the producer is cancelled; long work that answers with a plain
response can learn of it too (:meth:`Request.on_disconnect`).
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools
import orjson
import structlog

log = structlog.get_logger("edge_agent.http")

# Bytes fed to the parser between checks for backpressure and the head limit.
# It bounds what one check can let through: requests parsed from one slice
# (a pipelining client), and how far the head limit can be overshot.
_SLICE = 16 * 1024
# Bodies up to this size skip the global body budget: max_connections bounds
# their total, and refusing them would starve health checks during a flood.
_SMALL_BODY = 64 * 1024
# How long a refused connection reads and drops what its client still sends.
_LINGER_S = 2.0
_RETRY_AFTER = [("Retry-After", "1")]
# How often the sweeper looks for idle and slow connections, at most.
_SWEEP_S = 1.0
# Response head templates kept (statuses x content types the application uses: a handful).
_LEADS_KEPT = 64
# What a connection is receiving, for the head and body timeouts.
_IDLE, _HEAD, _BODY = 0, 1, 2


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    # The connection it came on (None for a request made by hand): see on_disconnect.
    connection: _Connection | None = field(default=None, repr=False, compare=False)

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name, default)

    def on_disconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the loop if the client's connection closes before this request is answered.

        At once when it is closed already. For long work (a language model generating) that
        should stop when nobody waits for its answer; forgotten once the answer is sent.
        """
        if self.connection is not None:
            self.connection.watch_disconnect(callback)


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


@dataclass(kw_only=True)
class StreamingResponse(Response):
    """A response whose body is sent as ``chunks`` yields it (chunked; to the close for HTTP/1.0).

    ``body`` is unused. The producer is asked for a piece only while the client reads
    (backpressure), and is cancelled when the client goes away; a producer that raises
    ends the connection (the body's end is then missing, so the client sees it cut).
    """

    chunks: AsyncIterator[bytes]


App = Callable[[Request], "Response | Awaitable[Response]"]
_REASONS = {s.value: s.phrase for s in HTTPStatus}


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing a stream that crossed a limit."""


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
    """The listening sockets and their connections; every limit is an attribute read per use."""

    def __init__(
        self,
        app: App,
        max_body_bytes: int = 8 << 20,
        idle_timeout_s: float = 75.0,
        *,
        max_url_bytes: int = 8 << 10,
        max_header_bytes: int = 64 << 10,
        max_header_count: int = 100,
        max_inflight_body_bytes: int = 64 << 20,
        max_connections: int = 512,
        write_buffer_high_bytes: int = 64 << 10,
        header_timeout_s: float = 10.0,
        body_timeout_s: float = 30.0,
    ):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self.max_url_bytes = max_url_bytes
        self.max_header_bytes = max_header_bytes
        self.max_header_count = max_header_count
        self.max_inflight_body_bytes = max_inflight_body_bytes
        self.max_connections = max_connections
        self.write_buffer_high_bytes = write_buffer_high_bytes
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.connections: set[_Connection] = set()
        self._servers: list[asyncio.base_events.Server] = []
        self._dates = _DateCache()
        # Response heads up to the Date and the length, by (status, content type): see _write.
        self._leads: dict[tuple[int, str], tuple[bytes, bytes]] = {}
        self.closing = False
        self.requests_in_flight = 0
        # Request bodies held right now across all connections: being received,
        # queued behind a pipelined request, or in the application's hands.
        self.body_bytes_held = 0
        # Refusals and backpressure events by kind, for logs and tests.
        self.counters: collections.Counter[str] = collections.Counter()
        self._sweeper: asyncio.Future[None] | None = None

    async def _sweep_idle(self) -> None:
        # One timer for all connections: re-arming a timer per request costs
        # more than this sweep, which runs a few times per timeout, and at
        # least every _SWEEP_S so a slow head or body is cut close to its limit.
        while True:
            interval = min(_SWEEP_S, self.idle_timeout_s, self.header_timeout_s, self.body_timeout_s) / 4
            await asyncio.sleep(max(0.05, interval))
            now = time.monotonic()
            deadline = now - self.idle_timeout_s
            head_deadline = now - self.header_timeout_s
            body_deadline = now - self.body_timeout_s
            for conn in list(self.connections):
                phase = conn.phase
                if phase == _HEAD and conn.phase_since < head_deadline:
                    conn.time_out("request head", self.header_timeout_s, "header_timeout")
                elif phase == _BODY and conn.phase_since < body_deadline:
                    conn.time_out("request body", self.body_timeout_s, "body_timeout")
                elif conn.last_active < deadline:
                    conn.expire()

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
        # Parsed requests waiting for the one ahead of them (or for the client
        # to read), each with the body budget it holds.
        self.pending: collections.deque[tuple[Request, int]] = collections.deque()
        self.busy = False
        self.keep_alive = True
        self.last_active = time.monotonic()
        # The first head is timed from the connection's start (header_timeout_s).
        self.phase = _HEAD
        self.phase_since = self.last_active
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_count = 0
        # One received piece as it came (no copy for a body that arrives in one
        # read); from the second piece on, one bytearray: a bytes object per tiny
        # chunk would cost ~20 times the body.
        self._body: bytes | bytearray = b""
        self._body_len = 0
        self._chunked = False  # a chunked body (or its trailers) being received
        self._chunked_raw = 0  # raw bytes of it fed so far, framing included
        self._chunked_gap = 0  # raw bytes fed since its body last grew
        self._body_left = 0  # of a Content-Length body being received
        self._head_open = False  # request line or headers being received
        self._head_bytes = 0
        self._message = 0  # numbers messages, to tell one head from the next
        self._reserved = 0  # body budget held by the message being received
        self._dispatched = 0  # body budget held by the request in the application's hands
        self._unparsed = b""  # received, not parsed: the connection is stalled
        self._write_paused = False
        self._reading_paused = False
        self._refused = False  # the stream is abandoned: what arrives is dropped
        self._refusal: Response | None = None  # the answer to a refused stream, not yet sent
        self._refusal_kind = ""
        self._linger: asyncio.TimerHandle | None = None
        # A streaming response being sent, and the wait for its client to read (resume_writing).
        self._stream: asyncio.Future[bool] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        # Callbacks of the request in the application's hands for the client going away (on_disconnect).
        self._disconnect_watchers: list[Callable[[], None]] | None = None

    # -- transport events ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self.server
        if len(server.connections) >= server.max_connections:
            server.counters["connections_refused"] += 1
            self._refused = True
            self._write(Response(503, b'{"error":"too many connections"}', headers=_RETRY_AFTER), keep_alive=False)
            transport.close()
            return
        transport.set_write_buffer_limits(high=server.write_buffer_high_bytes)
        server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self._linger is not None:
            self._linger.cancel()
        # What the application holds is given back when it answers (_finish).
        self._release(self._reserved + sum(held for _, held in self.pending))
        self._reserved = 0
        self.pending.clear()
        self._unparsed = b""
        self.transport = None
        if self._stream is not None:
            self._stream.cancel()  # its producer stops: nobody reads what it makes
        watchers, self._disconnect_watchers = self._disconnect_watchers, None
        for callback in watchers or ():
            try:
                callback()
            except Exception:
                log.exception("disconnect callback failed")

    def watch_disconnect(self, callback: Callable[[], None]) -> None:
        """See :meth:`Request.on_disconnect`."""
        if self.transport is None:
            asyncio.get_running_loop().call_soon(callback)
            return
        if self._disconnect_watchers is None:
            self._disconnect_watchers = []
        self._disconnect_watchers.append(callback)

    def pause_writing(self) -> None:
        # The client is not reading as fast as we answer: stop parsing its
        # requests (data_received holds them raw, then reading pauses).
        self._write_paused = True
        self.server.counters["write_paused"] += 1

    def resume_writing(self) -> None:
        self._write_paused = False
        self.last_active = time.monotonic()  # the client reads: it is slow, not gone
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # a streaming response goes on
        self._advance()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering after a refusal: drop it
        if self._unparsed or self.busy or self._write_paused or self.pending:
            self._hold(data)
            return
        if not self._head_open and not self._chunked and len(data) <= (self._body_left or _SLICE):
            # The common case, one read holding whole requests: what _feed
            # would do in one step, without its bookkeeping.
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self._refuse(Response.error(400, "protocol upgrades are not supported"), "malformed")
            except httptools.HttpParserError as exc:
                self._parse_failed(exc)
            return
        self._feed(data)

    # -- feeding the parser ---------------------------------------------------------
    def _hold(self, data: bytes) -> None:
        """Keep received bytes unparsed and stop reading: at most one read per stall."""
        self._unparsed = self._unparsed + data if self._unparsed else data
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _feed(self, data: bytes) -> None:
        view: memoryview | None = None
        pos, end = 0, len(data)
        while pos < end:
            step = end - pos
            if self._body_left:
                # Feed exactly to the end of a known-length body: a large body
                # goes in one piece, and the next message starts a feed of its own.
                step = min(step, self._body_left)
            elif step > _SLICE:
                step = _SLICE
            if step == end:
                piece: bytes | memoryview = data
            else:
                view = view if view is not None else memoryview(data)
                piece = view[pos : pos + step]
            message, counting, chunked, body_len = self._message, self._head_open, self._chunked, self._body_len
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                self._refuse(Response.error(400, "protocol upgrades are not supported"), "malformed")
                return
            except httptools.HttpParserError as exc:
                self._parse_failed(exc)
                return
            pos += step
            if self._refused or self.transport is None or self.transport.is_closing():
                return
            # A head is counted from the feed after the one it started in: never
            # more than its real size, so a head is refused at most one slice
            # past the limit and never below it.
            if counting and self._head_open and message == self._message:
                self._head_bytes += step
                if self._head_bytes > self.server.max_header_bytes:
                    limit = self.server.max_header_bytes
                    message_text = f"request line and headers exceed the limit of {limit} bytes"
                    self._refuse(Response.error(431, message_text), "headers_too_large")
                    return
            # A chunked message is counted raw, like a head: its framing and
            # trailers are not body, so on_body alone would not bound them.
            if chunked and self._chunked and message == self._message and self._count_chunked(step, body_len):
                return
            if pos < end and (self.busy or self._write_paused or self.pending):
                assert view is not None
                self._hold(bytes(view[pos:]))
                return

    def _count_chunked(self, step: int, body_len: int) -> bool:
        """Charge ``step`` raw bytes to the chunked message; True when it was refused for them."""
        server = self.server
        self._chunked_raw += step
        self._chunked_gap = 0 if self._body_len > body_len else self._chunked_gap + step
        if self._chunked_gap > server.max_header_bytes:
            limit = server.max_header_bytes
            message = f"chunk framing or trailers exceed the limit of {limit} bytes"
        elif self._chunked_raw > server.max_body_bytes + server.max_header_bytes:
            message = f"chunked request body exceeds the limit of {server.max_body_bytes} bytes"
        else:
            return False
        self._refuse(Response.error(413, message), "body_too_large")
        return True

    def _parse_failed(self, exc: httptools.HttpParserError) -> None:
        if self._refusal is None:
            self._refuse(Response.error(400, f"malformed HTTP request: {exc}"), "malformed")
        else:  # a callback crossed a limit (_stop)
            self._refuse(self._refusal, self._refusal_kind)

    def _stop(self, status: int, message: str, kind: str, headers: list[tuple[str, str]] | None = None) -> None:
        """From a parser callback: refuse this stream (the parser raises, _feed answers)."""
        self._refusal = Response(status, orjson.dumps({"error": message}), headers=headers or [])
        self._refusal_kind = kind
        raise _Refused(message)

    # -- parser callbacks ---------------------------------------------------------
    def on_message_begin(self) -> None:
        # _body, _body_left and _head_bytes are already reset by the end of
        # the previous message (or by __init__).
        self._url = b""
        self._headers = {}
        self._header_count = 0
        self._body_len = 0
        self._head_open = True
        self._message += 1
        if self.phase != _HEAD:  # the first head is timed from connection_made
            self.phase = _HEAD
            self.phase_since = time.monotonic()

    def on_url(self, url: bytes) -> None:
        # Called with each piece of the target as it arrives, so the limit
        # holds before the target is buffered, not after.
        if len(self._url) + len(url) > self.server.max_url_bytes:
            self._stop(414, f"request target exceeds the limit of {self.server.max_url_bytes} bytes", "uri_too_long")
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._head_open:
            return  # a trailer field: dropped, it must not change what the head said
        self._header_count += 1
        if self._header_count > self.server.max_header_count:
            limit = self.server.max_header_count
            self._stop(431, f"request has more than {limit} header fields", "too_many_headers")
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._head_bytes = 0
        self.phase = _BODY
        self.phase_since = time.monotonic()
        if self.parser.should_upgrade():
            # Refused here, not after on_message_complete: the application must
            # not act on a request whose connection then changes protocol.
            self._stop(400, "protocol upgrades are not supported", "malformed")
        server = self.server
        length = self._headers.get("content-length")
        if length is not None and length.isdigit():
            size = int(length)
            if size > server.max_body_bytes:
                message = f"request body of {length} bytes exceeds the limit of {server.max_body_bytes}"
                self._stop(413, message, "body_too_large")
            # Reserved from the header alone: refused before a byte of it is read.
            if size > _SMALL_BODY and server.body_bytes_held + size > server.max_inflight_body_bytes:
                self._over_budget()
            server.body_bytes_held += size
            self._reserved += size
            self._body_left = size
        elif "transfer-encoding" in self._headers:
            self._chunked = True
            self._chunked_raw = self._chunked_gap = 0
        if self._headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        size = len(body)
        if self._body_left:
            self._body_left -= size
        else:  # chunked: no size was declared, so the budget is taken as it arrives
            server = self.server
            self._body_len += size
            if self._body_len > server.max_body_bytes:
                limit = server.max_body_bytes
                self._stop(413, f"request body exceeds the limit of {limit} bytes", "body_too_large")
            if self._body_len > _SMALL_BODY and server.body_bytes_held + size > server.max_inflight_body_bytes:
                self._over_budget()
            server.body_bytes_held += size
            self._reserved += size
        stored = self._body
        if not stored:
            self._body = body
        elif isinstance(stored, bytearray):
            stored += body
        else:
            self._body = bytearray(stored) + body

    def on_message_complete(self) -> None:
        if self._refused:
            return
        url = httptools.parse_url(self._url)
        path = url.path.decode("latin-1")
        query = url.query.decode("latin-1") if url.query else ""
        self.phase = _IDLE
        self._chunked = False
        stored = self._body
        body = stored if isinstance(stored, bytes) else bytes(stored)
        request = Request(self.parser.get_method().decode(), path, query, self._headers, body, self)
        held, self._reserved = self._reserved, 0
        self._body = b""
        if not self.parser.should_keep_alive():
            self.keep_alive = False
        if self.busy or self._write_paused or self.pending:
            self.pending.append((request, held))
            return
        self._dispatch(request, held)

    # -- the body budget ---------------------------------------------------------
    def _over_budget(self) -> None:
        message = "the server holds too many request bodies right now; retry later"
        self._stop(503, message, "body_budget", headers=_RETRY_AFTER)

    def _release(self, size: int) -> None:
        self.server.body_bytes_held -= size

    # -- dispatch ---------------------------------------------------------------------
    def _dispatch(self, request: Request, held: int) -> None:
        self.server.requests_in_flight += 1
        self._dispatched = held
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
        self._advance()

    def _advance(self) -> None:
        """Go on after a stall (an answer finished, or the client read): queued, held, then reading."""
        while self.pending and not self.busy and not self._write_paused and self.transport is not None:
            request, held = self.pending.popleft()
            self._dispatch(request, held)
        transport = self.transport
        if transport is None or transport.is_closing() or self.busy or self._write_paused or self.pending:
            return
        if self._refusal is not None and self._refused:
            self._send_refusal()
            return
        if self._refused:
            return
        if self._unparsed:
            data, self._unparsed = self._unparsed, b""
            self._feed(data)
            if self._unparsed or self._refused:
                return
        if self._reading_paused and not transport.is_closing():
            self._reading_paused = False
            transport.resume_reading()

    def _finish(self, response: Response) -> None:
        if self._dispatched:
            self.server.body_bytes_held -= self._dispatched
            self._dispatched = 0
        if isinstance(response, StreamingResponse):
            self._start_stream(response)
            return
        self.server.requests_in_flight -= 1
        self._disconnect_watchers = None
        keep_alive = self.keep_alive and not self.server.closing
        self._write(response, keep_alive)
        if not keep_alive and not self.pending and self._refusal is None and self.transport is not None:
            self.transport.close()
        self.last_active = now = time.monotonic()
        if self.phase != _IDLE:
            # The next head (or body) was waiting on this answer, not on its client.
            self.phase_since = now

    def _write(self, response: Response, keep_alive: bool) -> None:
        if self.transport is None:
            return
        server = self.server
        key = (response.status, response.content_type)
        lead = server._leads.get(key)
        if lead is None:
            # The bytes around the Date and the length, made once per status and content type.
            reason = _REASONS.get(response.status, "Unknown")
            lead = (
                f"HTTP/1.1 {response.status} {reason}\r\nServer: edge-agent\r\nDate: ".encode(),
                b"\r\nContent-Type: " + response.content_type.encode() + b"\r\nContent-Length: ",
            )
            if len(server._leads) < _LEADS_KEPT:
                server._leads[key] = lead
        head = [lead[0], server._dates.get(), lead[1], b"%d\r\n" % len(response.body)]
        for name, value in response.headers:
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        if not keep_alive:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        head.append(response.body)
        self.transport.write(b"".join(head))

    # -- streaming responses ---------------------------------------------------------------
    def _start_stream(self, response: StreamingResponse) -> None:
        """Send ``response`` as its producer makes it; the connection is busy until it ends."""
        self.busy = True
        self._stream = asyncio.ensure_future(self._send_stream(response))
        self._stream.add_done_callback(self._on_stream_done)

    async def _send_stream(self, response: StreamingResponse) -> bool:
        """Write the head, then each piece; True when the whole body went out."""
        chunks = response.chunks
        try:
            transport = self.transport
            if transport is None or transport.is_closing():
                return False
            # HTTP/1.0 has no chunked framing: the body ends with the connection.
            framed = self.parser.get_http_version() != "1.0"
            if not framed:
                self.keep_alive = False
            reason = _REASONS.get(response.status, "Unknown")
            head = [
                f"HTTP/1.1 {response.status} {reason}\r\nServer: edge-agent\r\nDate: ".encode(),
                self.server._dates.get(),
                b"\r\nContent-Type: " + response.content_type.encode("latin-1") + b"\r\n",
            ]
            if framed:
                head.append(b"Transfer-Encoding: chunked\r\n")
            for name, value in response.headers:
                head.append(f"{name}: {value}\r\n".encode("latin-1"))
            if not (self.keep_alive and not self.server.closing):
                head.append(b"Connection: close\r\n")
            head.append(b"\r\n")
            transport.write(b"".join(head))
            async for piece in chunks:
                transport = self.transport
                if transport is None or transport.is_closing():
                    return False
                if not piece:
                    continue  # an empty chunk would end a chunked body
                transport.write(b"%x\r\n%b\r\n" % (len(piece), piece) if framed else piece)
                self.last_active = time.monotonic()
                if self._write_paused:
                    # Backpressure: the next piece is asked for once the client has read.
                    self._drain_waiter = asyncio.get_running_loop().create_future()
                    try:
                        await self._drain_waiter
                    finally:
                        self._drain_waiter = None
            transport = self.transport
            if transport is None or transport.is_closing():
                return False
            if framed:
                transport.write(b"0\r\n\r\n")
            return True
        finally:
            if isinstance(chunks, AsyncGenerator):
                await chunks.aclose()  # the producer's cleanup runs now, not when collected

    def _on_stream_done(self, task: asyncio.Future[bool]) -> None:
        self._stream = None
        self.server.requests_in_flight -= 1
        self._disconnect_watchers = None
        self.busy = False
        self.last_active = now = time.monotonic()
        if self.phase != _IDLE:
            self.phase_since = now
        completed = False
        if not task.cancelled():
            exc = task.exception()
            if exc is not None:
                log.error("streaming response failed", error=repr(exc))
            else:
                completed = task.result()
        transport = self.transport
        if transport is None:
            return
        if not completed:
            # The body was cut: only closing tells the client so.
            self.keep_alive = False
            transport.close()
            return
        keep_alive = self.keep_alive and not self.server.closing
        if not keep_alive and not self.pending and self._refusal is None:
            transport.close()
            return
        self._advance()

    # -- refusals ------------------------------------------------------------------------
    def _refuse(self, response: Response, kind: str) -> None:
        """Answer an unparseable or over-limit request and close: the stream cannot be trusted.

        Requests parsed before it are still answered first, in order.
        """
        self.server.counters[kind] += 1
        self._refused = True
        self._refusal = response
        self.phase = _IDLE  # no longer timed: the linger timer ends it
        self._release(self._reserved)
        self._reserved = 0
        self._body = b""
        self._unparsed = b""
        if not self.busy and not self.pending and not self._write_paused:
            self._send_refusal()

    def _send_refusal(self) -> None:
        transport = self.transport
        response, self._refusal = self._refusal, None
        if transport is None or response is None:
            return
        self._write(response, keep_alive=False)
        if not transport.can_write_eof():
            transport.close()
            return
        # Lingering close: our side is shut (the client sees the answer, then
        # EOF); what it still sends is read and dropped until it closes too,
        # or for _LINGER_S at most.
        transport.write_eof()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        self._linger = asyncio.get_running_loop().call_later(_LINGER_S, self.abort)

    # -- lifecycle ----------------------------------------------------------------------
    def expire(self) -> None:
        """Idle past the timeout: close, or drop outright one stuck on a client that stopped reading."""
        transport = self.transport
        if transport is not None and (self._write_paused or transport.is_closing()):
            transport.abort()
        else:
            self.close_when_idle()

    def time_out(self, what: str, limit: float, kind: str) -> None:
        """A head or body that did not arrive in time: 408 and close (it holds a slot, maybe budget)."""
        if self._refused or self.busy or self.pending or self._write_paused:
            # Waiting on the server or on a client that does not read: the idle
            # timeout deals with those.
            if self.last_active < time.monotonic() - self.server.idle_timeout_s:
                self.expire()
            return
        self.phase = _IDLE
        self._refuse(Response.error(408, f"{what} not complete within {limit:g} s"), kind)

    def close_when_idle(self) -> None:
        self.keep_alive = False
        if not self.busy and not self.pending and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
