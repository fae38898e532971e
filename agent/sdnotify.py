"""systemd's sd_notify protocol: readiness, status, stopping and watchdog pings.

The protocol is one AF_UNIX datagram of ``KEY=VALUE`` lines sent to the
socket named by ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace), so it is implemented here directly rather than through a
dependency. Outside systemd ``NOTIFY_SOCKET`` is unset and every call is a
no-op that returns False.

Watchdog pings come from an asyncio task, never a thread: the point of
``WatchdogSec=`` is to restart an agent whose event loop is stuck, and a
thread would keep pinging while the loop that serves requests is blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import structlog
from structlog.typing import FilteringBoundLogger

if TYPE_CHECKING:
    from agent.events import EventBus
    from agent.models import ModelManager

log = structlog.get_logger("edge_agent.sdnotify")


class Notifier:
    """Sends sd_notify datagrams to one socket; never raises, never blocks."""

    def __init__(self, address: str | bytes | None):
        self.address = address
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        return cls(parse_address(env.get("NOTIFY_SOCKET", "")))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """One datagram with ``lines``; False when there is no socket or the send failed."""
        if self.address is None:
            return False
        payload = "\n".join(lines).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # A full receive queue must cost a lost notification, not a stalled event loop.
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(payload, self.address)
        except OSError as exc:
            # systemd may be restarting, or the socket was never there. Losing a
            # notification is better than failing the agent; say so once.
            if not self._warned:
                log.warning("sd_notify failed", socket=_printable(self.address), error=str(exc))
                self._warned = True
            return False
        self._warned = False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def parse_address(value: str) -> str | bytes | None:
    """NOTIFY_SOCKET to a sendto() address: None when unset or of a kind we cannot use."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace: leading NUL, no terminator
    if value.startswith("/"):
        return value
    # systemd >= 253 also knows vsock:CID:PORT (VMs); not an edge-agent deployment.
    log.warning("NOTIFY_SOCKET not usable, notifications disabled", notify_socket=value)
    return None


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC, as sd_watchdog_enabled advises), or None."""
    env = os.environ if env is None else env
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    owner = env.get("WATCHDOG_PID")
    # WATCHDOG_PID names the process the watchdog is for; a child that inherited
    # the variables must not ping on its parent's behalf.
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("WATCHDOG_USEC is not a number, watchdog pings disabled", watchdog_usec=raw)
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


class SystemdNotifier:
    """Agent service: READY=1 once the agent serves, STATUS= on changes, STOPPING=1, WATCHDOG=1 from the loop.

    Attach it last (``agent.wiring.attach_sdnotify``): the agent loads and warms its
    active models before it starts any service and starts services in the
    order they were attached, so by the time this one starts everything the
    node serves is warm. READY=1 then waits for ``started()`` (the agent's
    ``started``, set right after its last service started), so a client that reacts
    to ``systemctl start`` returning finds /v2/health/ready answering 200.
    Services stop in reverse order, so this one stops first and STOPPING=1
    goes out before the agent drains.

    Without ``models`` (a notifier on its own, as in a test) nothing is announced
    by itself: only the calls made on it are sent.
    """

    # Agent events that change what `systemctl status` should say.
    STATUS_EVENTS = ("model.swapped", "model.rollback", "model.unloaded", "model.broken")

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        models: ModelManager | None = None,
        events: EventBus | None = None,
        started: Callable[[], bool] = lambda: True,
        stopping: Callable[[], bool] = lambda: False,
        log: FilteringBoundLogger | None = None,
    ):
        env = os.environ if env is None else env
        self.models = models  # what STATUS= says the node serves
        self.events = events  # the swaps, rollbacks and breakages that change it
        self.started = started  # the agent's readiness: READY=1 waits for it
        self.is_stopping = stopping
        self.notifier = Notifier.from_env(env)
        self.interval = watchdog_interval(env) if self.notifier.enabled else None
        self._tasks: list[asyncio.Task[None]] = []
        self._queue: asyncio.Queue[Any] | None = None
        self._stopping_sent = False
        self.log = log if log is not None else structlog.get_logger("edge_agent.sdnotify")
        self.pings = 0
        self.ready_sent = False

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled

    async def start(self) -> None:
        if not self.enabled:
            return
        if self.interval is not None:
            self._tasks.append(asyncio.create_task(self._watchdog(self.interval), name="sd-watchdog"))
            self.log.info("systemd watchdog pings started", interval_s=self.interval)
        if self.models is not None:
            self._queue = self.events.subscribe() if self.events is not None else None
            self._tasks.append(asyncio.create_task(self._announce(self.models), name="sd-status"))

    async def stop(self) -> None:
        """STOPPING=1 (if not sent yet), then stop pinging and close the socket."""
        self.stopping(status="draining in-flight requests")
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._queue is not None and self.events is not None:
            self.events.unsubscribe(self._queue)
            self._queue = None
        self.notifier.close()

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        self.ready_sent = self.notifier.send(*lines) or self.ready_sent
        return self.ready_sent

    def status(self, text: str) -> bool:
        return self.notifier.send(f"STATUS={_one_line(text)}")

    def stopping(self, status: str | None = None) -> bool:
        if self._stopping_sent:
            return False
        self._stopping_sent = True
        lines = ["STOPPING=1"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notifier.send(*lines)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start-up (or stop) time, for a node with many models to warm."""
        return self.notifier.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    async def _announce(self, models: ModelManager) -> None:
        # Agent.start() sets `started` in the same step that started this
        # service, so this loop normally runs once; if start-up fails, the
        # agent is stopping and READY=1 is never sent.
        while not self.started():
            if self.is_stopping():
                return
            await asyncio.sleep(0.01)
        self.ready(status=summary(models))
        while self._queue is not None:
            event = await self._queue.get()
            if event.kind in self.STATUS_EVENTS and not self.is_stopping():
                self.status(summary(models))

    async def _watchdog(self, interval: float) -> None:
        while True:
            if self.notifier.send("WATCHDOG=1"):
                self.pings += 1
            await asyncio.sleep(interval)


def summary(models: ModelManager) -> str:
    """One line for `systemctl status`: what the node serves and what is broken."""
    routes = models.routes
    serving = ", ".join(
        f"{name} {'+'.join(m.version for m in route.versions())}" for name, route in sorted(routes.items())
    )
    text = f"serving {len(routes)} model(s)" + (f": {serving}" if serving else "")
    broken = models.broken
    if broken:
        text += f"; broken: {', '.join(sorted(broken))}"
    return text


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment inside the datagram.
    return " ".join(text.split())


def _printable(address: str | bytes) -> str:
    return "@" + address[1:].decode(errors="replace") if isinstance(address, bytes) else address
