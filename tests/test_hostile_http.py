"""Hostile HTTP clients against a real in-process agent: the server's memory stays bounded.

Each test speaks raw sockets to the agent's own `HttpServer` and then looks at
the server's side (its connections and their transports, through the agent's
event loop) instead of timing anything: a limit holds when the server answers
before the flood is over and when what it buffers stays small.
"""

from __future__ import annotations

import re
import select
import socket
import sys
import time
from contextlib import ExitStack, suppress
from typing import Any

import pytest
from conftest import control_headers, http

from agent.errors import ConfigError

FLOOD = 16 * 1024 * 1024  # far above every default limit
HANG_GUARD_S = 30.0  # generous: only stops a broken server from hanging the suite


def digits_request() -> dict[str, Any]:
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}


def address(agent: Any) -> tuple[str, int]:
    host, port = agent.url.split("//")[1].split(":")
    return host, int(port)


def digits_answers(agent: Any) -> bool:
    status, body = http("POST", agent.url + "/v2/models/digits/infer", digits_request())
    return status == 200 and body["outputs"][1]["name"] == "label"


def read_reply(sock: socket.socket, until_closed: bool = True) -> bytes:
    """Everything the server sends until it closes (or a reset ends it)."""
    sock.settimeout(HANG_GUARD_S)
    chunks = b""
    with suppress(ConnectionResetError, TimeoutError):
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks += chunk
            if not until_closed and b"\r\n\r\n" in chunks:
                break
    return chunks


def flood(agent: Any, prefix: bytes, filler: bytes, total: int = FLOOD) -> tuple[int, bytes]:
    """Send ``prefix`` then ``filler`` up to ``total`` bytes, stopping once the server answers.

    Returns how many bytes were sent and the server's reply. A server that
    buffers the whole flood never answers mid-way, so ``sent`` reaches ``total``.
    """
    chunk = filler * max(1, 65536 // len(filler))
    with socket.create_connection(address(agent), timeout=HANG_GUARD_S) as sock:
        sock.sendall(prefix)
        sent = len(prefix)
        try:
            while sent < total:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return sent, read_reply(sock)


def on_loop(agent: Any, fn: Any) -> Any:
    """Run ``fn()`` on the agent's event loop (the server's state is only touched there)."""

    async def call() -> Any:
        return fn()

    return agent.call(call())


def server_side(agent: Any, client: socket.socket) -> dict[str, Any] | None:
    """The server's view of the connection whose peer is ``client``."""
    peer = client.getsockname()

    def look() -> dict[str, Any] | None:
        for conn in agent.agent.http.connections:
            transport = conn.transport
            if transport is not None and transport.get_extra_info("peername") == peer:
                return {
                    "write_buffer": transport.get_write_buffer_size(),
                    "reading": transport.is_reading(),
                    "pending": len(conn.pending),
                    "write_paused": conn._write_paused,
                }
        return None

    return on_loop(agent, look)


# -- request line and headers ----------------------------------------------------------------
def test_huge_url_gets_414_before_it_is_all_sent(make_agent):
    agent = make_agent()
    sent, reply = flood(agent, b"GET /", b"a")
    assert reply.startswith(b"HTTP/1.1 414 "), reply[:200]
    assert b"exceeds the limit" in reply
    assert sent < FLOOD, "the server buffered the whole URL before answering"
    assert digits_answers(agent)


def test_huge_header_gets_431_before_it_is_all_sent(make_agent):
    agent = make_agent()
    sent, reply = flood(agent, b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nX-Flood: ", b"b")
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert sent < FLOOD, "the server buffered the whole header before answering"
    assert digits_answers(agent)


def test_many_small_headers_flood_gets_431_before_it_is_all_sent(make_agent):
    agent = make_agent()
    sent, reply = flood(agent, b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n", b"X-A: b\r\n")
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert sent < FLOOD
    assert digits_answers(agent)


def test_too_many_headers_get_431(make_agent):
    agent = make_agent()
    headers = b"".join(b"X-Header-%d: v\r\n" % i for i in range(200))
    with socket.create_connection(address(agent), timeout=HANG_GUARD_S) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n" + headers + b"\r\n")
        reply = read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    assert b"header fields" in reply
    # a request with a normal number of headers on a fresh connection is served
    many = {f"X-Header-{i}": "v" for i in range(50)}
    assert http("GET", agent.url + "/v2/health/live", headers=many)[0] == 200


# -- request bodies ------------------------------------------------------------------------------
def test_bodies_beyond_the_global_budget_get_503_and_small_requests_are_still_served(make_agent):
    agent = make_agent()  # defaults: 8 MiB per body, 64 MiB held across all connections
    server = agent.agent.http
    body_size = 8 * 1024 * 1024
    head = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % body_size
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.create_connection(address(agent), timeout=5)) for _ in range(12)]
        for sock in socks:
            sock.sendall(head + b"[" * 4096)  # the body starts to arrive, then stalls
        replies: dict[int, bytes] = {}
        deadline = time.monotonic() + HANG_GUARD_S
        while len(replies) < 4 and time.monotonic() < deadline:
            readable, _, _ = select.select([s for i, s in enumerate(socks) if i not in replies], [], [], 0.2)
            for sock in readable:
                replies[socks.index(sock)] = read_reply(sock, until_closed=False)
        refused = [r for r in replies.values() if r.startswith(b"HTTP/1.1 503 ")]
        assert len(refused) == 4, replies  # 8 x 8 MiB fill the 64 MiB budget, the other 4 are refused
        assert all(b"\r\nRetry-After: " in r for r in refused)
        assert on_loop(agent, lambda: server.body_bytes_held) <= 64 * 1024 * 1024
        # small requests are not starved by the large uploads holding the budget
        assert digits_answers(agent)
        assert http("GET", agent.url + "/v2/health/ready")[0] == 200
    # the budget is given back when the uploads go away
    deadline = time.monotonic() + HANG_GUARD_S
    while on_loop(agent, lambda: server.body_bytes_held) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert on_loop(agent, lambda: server.body_bytes_held) == 0
    status, _ = http("POST", agent.url + "/v2/models/digits/infer", raw=b"[" * body_size)
    assert status == 400  # admitted and read whole again (then refused as JSON, not for memory)


def test_chunked_bodies_count_against_the_budget(make_agent):
    agent = make_agent(setup=lambda a: setattr(a.http, "max_inflight_body_bytes", 1024 * 1024))
    head = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (256 * 1024, b"[" * 256 * 1024)
    sent, reply = flood(agent, head, chunk)
    assert reply.startswith(b"HTTP/1.1 503 "), reply[:200]
    assert b"\r\nRetry-After: " in reply
    assert sent < FLOOD
    assert digits_answers(agent)


# -- write backpressure -------------------------------------------------------------------------
def send_until_stalled(sock: socket.socket, data: bytes, stall_s: float = 1.0) -> int:
    """Non-blocking send of ``data`` until it is all gone or the peer stops taking it."""
    sock.setblocking(False)
    sent, last_progress = 0, time.monotonic()
    while sent < len(data) and time.monotonic() - last_progress < stall_s:
        try:
            n = sock.send(data[sent : sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
            continue
        sent += n
        last_progress = time.monotonic()
    sock.setblocking(True)
    return sent


def send_until_the_server_holds_back(agent: Any, sock: socket.socket, data: bytes) -> int:
    """Send ``data`` until the server has stopped answering this connection because the client
    does not read (writing paused) and so stopped reading it too.

    Decided by the server's own state, not by how long a send blocks: on a loaded machine a
    server that is merely slow would pass for one that holds back, the client would stop
    mid-request with the server still able to answer everything, and the half-sent head would
    then (rightly) time out.
    """
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        if sent < len(data):
            try:
                sent += sock.send(data[sent : sent + 65536])
                continue
            except BlockingIOError:
                pass
        # Everything sent (the kernel's buffers may take it all), or the socket is full.
        view = server_side(agent, sock)
        assert view is not None, "the server dropped the connection"
        if view["write_paused"] and not view["reading"]:
            break
        time.sleep(0.01)
    sock.setblocking(True)
    return sent


def settled(agent: Any, sock: socket.socket) -> dict[str, Any]:
    """The server's view of the connection once it stops changing."""
    previous, stable = None, 0
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        view = server_side(agent, sock)
        assert view is not None, "the server dropped the connection"
        stable = stable + 1 if view == previous else 0
        if stable >= 3:
            return view
        previous = view
        time.sleep(0.1)
    return view


def test_pipelining_client_that_never_reads_is_paused_and_others_are_served(make_agent):
    agent = make_agent()
    request = b"GET /v2/models/digits HTTP/1.1\r\nHost: t\r\n\r\n"  # ~45 bytes in, ~450 bytes out
    burst = request * (4 * 1024 * 1024 // len(request))
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(address(agent))
        send_until_the_server_holds_back(agent, sock, burst)
        view = settled(agent, sock)
        # the server stopped reading this connection and holds at most about one
        # high-water mark of output for it, not every response to the burst
        assert not view["reading"], view
        assert view["write_buffer"] <= 1024 * 1024, view
        assert view["pending"] <= 1024, view
        assert digits_answers(agent)
        assert http("GET", agent.url + "/v2/health/live")[0] == 200
    deadline = time.monotonic() + HANG_GUARD_S
    while on_loop(agent, lambda: len(agent.agent.http.connections)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert on_loop(agent, lambda: len(agent.agent.http.connections)) == 0
    assert on_loop(agent, lambda: agent.agent.http.body_bytes_held) == 0


def test_pipelined_burst_read_late_is_answered_completely_and_in_order(make_agent):
    agent = make_agent()
    count = 3000
    burst = b"".join(b"GET /nope/%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(count))
    with socket.create_connection(address(agent), timeout=HANG_GUARD_S) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sent = send_until_stalled(sock, burst, stall_s=0.5)  # nothing read yet: the server must hold back
        sock.setblocking(False)
        received = b""
        deadline = time.monotonic() + HANG_GUARD_S
        # Until every reply is in whole: the last status line can arrive before its JSON body.
        while (received.count(b"HTTP/1.1 404 ") < count or not received.endswith(b"}")) and (
            time.monotonic() < deadline
        ):
            writers = [sock] if sent < len(burst) else []
            readable, writable, _ = select.select([sock], writers, [], 0.05)
            if writable:
                with suppress(BlockingIOError):
                    sent += sock.send(burst[sent : sent + 65536])
            if readable:
                chunk = sock.recv(65536)
                assert chunk, "the server closed the connection"
                received += chunk
    numbers = [int(n) for n in re.findall(rb"/nope/(\d+)", received)]
    assert numbers == list(range(count))


# -- connections ----------------------------------------------------------------------------------
def test_connections_beyond_the_maximum_are_refused_and_the_others_served(make_agent):
    agent = make_agent(setup=lambda a: setattr(a.http, "max_connections", 8))
    with ExitStack() as stack:
        held = [stack.enter_context(socket.create_connection(address(agent), timeout=5)) for _ in range(8)]
        # make sure the server has taken all eight before the ninth arrives
        for sock in held:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_reply(sock, until_closed=False).startswith(b"HTTP/1.1 200 ")
        with socket.create_connection(address(agent), timeout=5) as extra:
            reply = read_reply(extra)
        assert reply.startswith(b"HTTP/1.1 503 ") and b"Retry-After: " in reply, reply[:200]
        # the connections already open keep being served
        for sock in held:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_reply(sock, until_closed=False).startswith(b"HTTP/1.1 200 ")
    # once they are gone, new connections are served again
    deadline = time.monotonic() + HANG_GUARD_S
    while on_loop(agent, lambda: len(agent.agent.http.connections)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert digits_answers(agent)


# -- configuration -----------------------------------------------------------------------------
def test_http_limits_come_from_the_config(make_agent):
    agent = make_agent(
        max_url_bytes=1000,
        max_header_bytes=2000,
        max_header_count=10,
        max_inflight_body_bytes=16 * 1024 * 1024,
        max_connections=7,
        write_buffer_high_bytes=4096,
    )
    server = agent.agent.http
    assert (server.max_url_bytes, server.max_header_bytes, server.max_header_count) == (1000, 2000, 10)
    assert (server.max_inflight_body_bytes, server.max_connections, server.write_buffer_high_bytes) == (
        16 * 1024 * 1024,
        7,
        4096,
    )
    headers = {f"X-H-{i}": "v" for i in range(12)}
    assert http("GET", agent.url + "/v2/health/live", headers=headers)[0] == 431
    assert http("GET", agent.url + "/v2/health/live?" + "q" * 1200)[0] == 414


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_url_bytes": 0}, "max_url_bytes must be at least 1"),
        ({"max_connections": 0}, "max_connections must be at least 1"),
        ({"write_buffer_high_bytes": -1}, "write_buffer_high_bytes must be at least 1"),
        ({"max_url_bytes": 70000}, r"max_url_bytes \(70000\) must not exceed max_header_bytes"),
        ({"max_inflight_body_bytes": 1024}, r"max_inflight_body_bytes \(1024\) must be at least max_body_bytes"),
        ({"header_timeout_s": 0}, "header_timeout_s must be greater than 0"),
        ({"body_timeout_s": -1}, "body_timeout_s must be greater than 0"),
    ],
)
def test_http_limits_are_validated(tmp_path, overrides: dict[str, int], message: str):
    from agent.config import Config

    with pytest.raises(ConfigError, match=message):
        Config.load(env={}, overrides={"state_dir": tmp_path, **overrides})


# -- chunked framing, trailers and upgrades ---------------------------------------------------
CHUNKED_HEAD = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_endless_chunked_trailer_gets_413_before_it_is_all_sent(make_agent):
    agent = make_agent()
    sent, reply = flood(agent, CHUNKED_HEAD + b"1\r\na\r\n0\r\nX-T: ", b"a")
    assert reply.startswith(b"HTTP/1.1 413 "), reply[:200]
    assert sent < FLOOD, "the server buffered the whole trailer before answering"
    assert digits_answers(agent)


def test_trailer_fields_do_not_change_the_request_headers(make_agent):
    agent = make_agent()
    authorization = control_headers(agent.agent.config.state_dir)["Authorization"]
    request = (
        b"POST /v2/repository/index HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nAuthorization: %s\r\n\r\n" % authorization.encode()
    )
    with socket.create_connection(address(agent), timeout=HANG_GUARD_S) as sock:
        sock.sendall(request)
        reply = read_reply(sock, until_closed=False)
    # the token in the trailer does not count: the request was sent without one
    assert reply.startswith(b"HTTP/1.1 401 "), reply[:200]


def test_upgrade_request_is_refused_and_never_served(make_agent):
    agent = make_agent()
    authorization = control_headers(agent.agent.config.state_dir)["Authorization"]
    request = (
        b"POST /v2/repository/index HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Authorization: %s\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: 0\r\n\r\n" % authorization.encode()
    )
    with socket.create_connection(address(agent), timeout=HANG_GUARD_S) as sock:
        sock.sendall(request)
        reply = read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert reply.count(b"HTTP/1.1 ") == 1, reply  # answered once: the application never saw it
    assert digits_answers(agent)


def test_tiny_chunks_are_held_compactly(make_agent):
    agent = make_agent()
    server = agent.agent.http
    pieces = 100_000
    body = b"2\r\n[[\r\n" * pieces  # 200 KB of body in 2-byte chunks, and no last chunk
    with socket.create_connection(address(agent), timeout=HANG_GUARD_S) as sock:
        sock.sendall(CHUNKED_HEAD + body)

        def held() -> tuple[int, int] | None:
            for conn in server.connections:
                if conn._body_len:
                    stored = conn._body
                    size = sys.getsizeof(stored)
                    if isinstance(stored, list):
                        size += sum(sys.getsizeof(piece) for piece in stored)
                    return conn._body_len, size
            return None

        deadline = time.monotonic() + HANG_GUARD_S
        seen = on_loop(agent, held)
        while (seen is None or seen[0] < 2 * pieces) and time.monotonic() < deadline:
            time.sleep(0.05)
            seen = on_loop(agent, held)
        assert seen is not None and seen[0] == 2 * pieces, seen
        # what the server holds for the body is about the body, not a Python object per chunk
        assert seen[1] <= 2 * seen[0] + 4096, seen
        assert on_loop(agent, lambda: server.body_bytes_held) == 2 * pieces


# -- slow clients ---------------------------------------------------------------------------------
def test_head_not_complete_in_time_gets_408_and_others_are_served(make_agent):
    agent = make_agent(header_timeout_s=0.5)
    server = agent.agent.http
    with ExitStack() as stack:
        silent = stack.enter_context(socket.create_connection(address(agent), timeout=HANG_GUARD_S))
        trickle = stack.enter_context(socket.create_connection(address(agent), timeout=HANG_GUARD_S))
        # a kept-alive connection: its next head is timed from the previous answer
        second = stack.enter_context(socket.create_connection(address(agent), timeout=HANG_GUARD_S))
        second.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_reply(second, until_closed=False).startswith(b"HTTP/1.1 200 ")
        second.sendall(b"GET /v2/health/live HTTP/1.1\r\nHo")
        head = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"s" * 10_000
        trickle.setblocking(False)
        sent = 0
        deadline = time.monotonic() + HANG_GUARD_S
        # one byte at a time, until the server answers (a server without a head timeout never does)
        while sent < len(head) and time.monotonic() < deadline:
            if select.select([trickle], [], [], 0)[0]:
                break
            with suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                sent += trickle.send(head[sent : sent + 1])
            time.sleep(0.01)
        trickle.setblocking(True)
        for sock in (silent, trickle, second):
            reply = read_reply(sock)
            assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
            assert b"Connection: close" in reply
        assert sent < len(head), "the trickled head was never cut off"
        assert digits_answers(agent)
    assert on_loop(agent, lambda: server.counters["header_timeout"]) == 3


def test_body_not_complete_in_time_gets_408_and_gives_its_budget_back(make_agent):
    agent = make_agent(body_timeout_s=0.5)
    server = agent.agent.http
    head = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (8 * 1024 * 1024)
    with socket.create_connection(address(agent), timeout=HANG_GUARD_S) as sock:
        sock.sendall(head + b"[" * 4096)  # the body starts to arrive, then stalls
        reply = read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    deadline = time.monotonic() + HANG_GUARD_S
    while on_loop(agent, lambda: server.body_bytes_held) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert on_loop(agent, lambda: server.body_bytes_held) == 0
    assert on_loop(agent, lambda: server.counters["body_timeout"]) == 1
    assert digits_answers(agent)
