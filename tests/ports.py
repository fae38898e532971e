"""Ports for the servers tests start: never one the kernel could hand a client as its source port."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def free_port() -> int:
    """A free port below the kernel's ephemeral range.

    Tests restart servers on the ports they picked and poll ports nothing listens on yet. Were such
    a port in the ephemeral range, a client connecting to it while nothing listens could be given
    that very port as its own source port (a TCP self-connect); the socket's TIME_WAIT would then
    keep the server from binding its port for a minute ("Address already in use").
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(max(1024, low - 20000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below the ephemeral range (which starts at {low})")
