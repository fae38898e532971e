"""Hostile HTTP floods against a real `edge-agent run`: the agent's RSS before, at peak and after each.

    .venv/bin/python bench/hostile_http_rss.py            # every flood at full size
    .venv/bin/python bench/hostile_http_rss.py --quick    # smaller floods
    .venv/bin/python bench/hostile_http_rss.py --repo /path/to/other/checkout   # e.g. an older version

RSS is VmRSS from /proc/PID/status, sampled every 20 ms while a flood runs
("peak") and read again once the flood's connections are closed and the agent
has had a moment to settle ("after"). After each flood the script checks that
the `digits` model still answers. Each row also counts the status codes the
flood's connections got back ("-" is a connection closed without an answer).
Exit status 1 when RSS did not come back within 64 MB of its value before a
flood, or `digits` stopped answering.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
RSS_SLACK_MB = 64  # after a flood, RSS must be back within this of where it was before


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakSampler:
    """Samples a process's RSS on a thread while a flood runs."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb(self.pid))


def status_of(reply: bytes) -> str:
    return reply[9:12].decode(errors="replace") if reply.startswith(b"HTTP/1.1 ") else "-"


def digits_ok(port: int) -> bool:
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/digits/infer", data=json.dumps(body).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status == 200
    except OSError:
        return False


# -- flood clients --------------------------------------------------------------------------------
def stream_until_answered(socks: list[socket.socket], payloads: list[Iterator[bytes]], deadline: float) -> list[bytes]:
    """Send each socket's payload (non-blocking, interleaved) until it is answered, closed or exhausted.

    Returns what each socket got back (its first reply, read until the head is complete or EOF).
    """
    replies = [b""] * len(socks)
    current: list[memoryview | None] = [None] * len(socks)
    done = [False] * len(socks)
    for sock in socks:
        sock.setblocking(False)
    while not all(done) and time.monotonic() < deadline:
        readers = [s for i, s in enumerate(socks) if not done[i]]
        writers = [s for i, s in enumerate(socks) if not done[i] and payloads[i] is not None]
        readable, writable, _ = select.select(readers, writers, [], 0.5)
        for sock in readable:
            i = socks.index(sock)
            try:
                chunk = sock.recv(65536)
            except OSError:
                chunk = b""
            replies[i] += chunk
            if not chunk or b"\r\n\r\n" in replies[i]:
                done[i] = True
        for sock in writable:
            i = socks.index(sock)
            if done[i]:
                continue
            if current[i] is None or not len(current[i]):
                nxt = next(payloads[i], None)
                if nxt is None:
                    payloads[i] = None  # all sent: now only wait for the answer
                    continue
                current[i] = memoryview(nxt)
            try:
                sent = sock.send(current[i])
                current[i] = current[i][sent:]
            except BlockingIOError:
                pass
            except OSError:
                done[i] = True
    return replies


def repeated(prefix: bytes, filler: bytes, total: int, suffix: bytes = b"") -> Iterator[bytes]:
    yield prefix
    chunk = filler * max(1, 256 * 1024 // len(filler))
    left = total
    while left > 0:
        piece = chunk[:left]
        yield piece
        left -= len(piece)
    if suffix:
        yield suffix


def flood_streams(port: int, streams: list[Iterator[bytes]], timeout: float) -> collections.Counter[str]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.create_connection(("127.0.0.1", port))) for _ in streams]
        replies = stream_until_answered(socks, list(streams), time.monotonic() + timeout)
    return collections.Counter(status_of(r) for r in replies)


def url_flood(port: int, size: int, count: int) -> collections.Counter[str]:
    streams = [repeated(b"GET /", b"a", size, b" HTTP/1.1\r\nHost: t\r\n\r\n") for _ in range(count)]
    return flood_streams(port, streams, 600)


def header_flood(port: int, size: int, count: int) -> collections.Counter[str]:
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nX-Flood: "
    streams = [repeated(head, b"b", size, b"\r\n\r\n") for _ in range(count)]
    return flood_streams(port, streams, 600)


def many_headers_flood(port: int, size: int, count: int) -> collections.Counter[str]:
    head = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n"
    streams = [repeated(head, b"X-A: b\r\n", size, b"\r\n") for _ in range(count)]
    return flood_streams(port, streams, 600)


def body_flood(port: int, size: int, count: int) -> collections.Counter[str]:
    head = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size
    streams = [repeated(head, b"[", size) for _ in range(count)]
    return flood_streams(port, streams, 600)


def pipeline_flood(port: int, size: int, count: int, hold_s: float = 3.0) -> collections.Counter[str]:
    """Clients that pipeline requests and never read an answer; held open for a while, then dropped."""
    request = b"GET /v2/models/digits HTTP/1.1\r\nHost: t\r\n\r\n"
    burst = request * (size // len(request))
    outcome: collections.Counter[str] = collections.Counter()
    with contextlib.ExitStack() as stack:
        socks = []
        for _ in range(count):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.setblocking(False)
            socks.append(stack.enter_context(sock))
        sent = [0] * count
        deadline = time.monotonic() + hold_s
        while time.monotonic() < deadline:
            _, writable, _ = select.select([], [s for i, s in enumerate(socks) if sent[i] < len(burst)], [], 0.1)
            for sock in writable:
                i = socks.index(sock)
                with contextlib.suppress(BlockingIOError, OSError):
                    sent[i] += sock.send(burst[sent[i] : sent[i] + 65536])
        for i in range(count):
            outcome["all sent" if sent[i] >= len(burst) else "stalled"] += 1
    return outcome


def connection_flood(port: int, count: int, hold_s: float = 2.0) -> collections.Counter[str]:
    outcome: collections.Counter[str] = collections.Counter()
    with contextlib.ExitStack() as stack:
        socks = []
        for _ in range(count):
            try:
                socks.append(stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5)))
            except OSError:
                outcome["connect failed"] += 1
        time.sleep(hold_s)
        for sock in socks:
            sock.setblocking(False)
            try:
                data = sock.recv(4096)
                outcome[status_of(data) if data else "closed"] += 1
            except BlockingIOError:
                outcome["open"] += 1
            except OSError:
                outcome["reset"] += 1
    return outcome


# -- the agent ------------------------------------------------------------------------------------
def start_agent(repo: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env["EDGE_AGENT_GRPC_LISTEN"] = "off"  # the default gRPC port is one per machine; older agents ignore it
    cmd = [sys.executable, "-m", "agent", "run", "--state-dir", str(workdir / "state")]
    cmd += ["--listen", f"127.0.0.1:{port}", "--log-level", "warning", "--log-format", "json"]
    log = open(workdir / "agent.log", "wb")  # noqa: SIM115 - the agent process holds it
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"agent exited: {(workdir / 'agent.log').read_text()}")
        ready_url = f"http://127.0.0.1:{port}/v2/health/ready"
        with contextlib.suppress(OSError), urllib.request.urlopen(ready_url, timeout=1) as resp:
            if resp.status == 200:
                return proc, port
        time.sleep(0.05)
    raise SystemExit("agent not ready after 60 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller floods")
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose agent is run (default: this one)")
    parser.add_argument("--only", help="comma-separated flood names to run")
    args = parser.parse_args()
    q = args.quick
    floods: list[tuple[str, Callable[[int], collections.Counter[str]]]] = [
        (
            "10 x 50 MB URL" if not q else "4 x 16 MB URL",
            lambda p: url_flood(p, (16 if q else 50) * MiB, 4 if q else 10),
        ),
        (
            "10 x 250 MiB header" if not q else "4 x 32 MiB header",
            lambda p: header_flood(p, (32 if q else 250) * MiB, 4 if q else 10),
        ),
        ("10 x 64 MiB of small headers", lambda p: many_headers_flood(p, 64 * MiB, 10)),
        (
            "150 x 8 MiB bodies" if not q else "40 x 8 MiB bodies",
            lambda p: body_flood(p, 8 * MiB, 40 if q else 150),
        ),
        ("20 pipelining clients, no reads", lambda p: pipeline_flood(p, 8 * MiB, 20)),
        ("2000 connections", lambda p: connection_flood(p, 2000)),
    ]
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        floods = [f for f in floods if any(w in f[0] for w in wanted)]
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_agent(args.repo.resolve(), Path(tmp))
        try:
            digits_ok(port)
            time.sleep(0.5)
            start = rss_mb(proc.pid)
            print(f"edge-agent ({args.repo}) RSS at start: {start:.0f} MB")
            print(f"{'flood':34} {'before':>8} {'peak':>8} {'after':>8} {'Δ after':>8}  digits  answers")
            for name, run in floods:
                before = rss_mb(proc.pid)
                t0 = time.monotonic()
                with PeakSampler(proc.pid) as sampler:
                    outcome = run(port)
                time.sleep(1.0)  # closed connections are reaped, lingering ones time out
                after = rss_mb(proc.pid)
                ok = digits_ok(port)
                if not ok or after - before >= RSS_SLACK_MB:
                    failed.append(name)
                answers = ", ".join(f"{k}: {v}" for k, v in sorted(outcome.items()))
                print(
                    f"{name:34} {before:7.0f}M {sampler.peak:7.0f}M {after:7.0f}M {after - before:+7.0f}M"
                    f"  {'ok' if ok else 'FAIL':6}  {answers}  ({time.monotonic() - t0:.1f} s)",
                    flush=True,
                )
            print(f"RSS at end: {rss_mb(proc.pid):.0f} MB (start {start:.0f} MB)")
            if failed:
                print(f"FAILED (RSS not back within {RSS_SLACK_MB} MB, or digits not answering): {', '.join(failed)}")
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
