"""sd_notify against a real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import http

from agent.sdnotify import Notifier, SystemdNotifier, parse_address, watchdog_interval

HANG_S = 60.0  # waits are for conditions; this only guards against a hang on a loaded machine


class FakeSystemd:
    """Receives notify datagrams on a bound socket and timestamps them, like PID 1 does."""

    def __init__(self, address: str | bytes):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, text: str, timeout: float = HANG_S) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [m for _, m in self.messages if text in m.splitlines()]
            if found:
                return found
            time.sleep(0.01)
        raise AssertionError(f"no {text!r} datagram; got {[m for _, m in self.messages]}")

    def ping_times(self) -> list[float]:
        return [t for t, m in self.messages if m == "WATCHDOG=1"]

    def pings(self) -> int:
        return sum(1 for _, m in self.messages if m == "WATCHDOG=1")

    def index_of(self, prefix: str) -> int:
        """Position of the first datagram starting with ``prefix``: datagrams from one sender keep their order."""
        return next(i for i, (_, m) in enumerate(list(self.messages)) if m.startswith(prefix))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="sdn-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def systemd(short_dir: Path) -> Iterator[tuple[FakeSystemd, str]]:
    path = str(short_dir / "notify")
    fake = FakeSystemd(path)
    yield fake, path
    fake.close()


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_ready_status_stopping_reach_the_socket(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd

    async def scenario() -> None:
        notifier = SystemdNotifier(env={"NOTIFY_SOCKET": path})
        await notifier.start()
        assert notifier.ready(status="serving 2 models\nwarm")
        assert notifier.status("draining")
        assert notifier.stopping()
        assert not notifier.stopping(), "STOPPING=1 is sent once"
        await notifier.stop()

    run(scenario())
    ready = fake.wait_for("READY=1")
    # READY and its STATUS travel in one datagram, and a newline in the text
    # cannot smuggle in another assignment.
    assert ready == ["READY=1\nSTATUS=serving 2 models warm"]
    fake.wait_for("STATUS=draining")
    fake.wait_for("STOPPING=1")
    assert sum(m.count("STOPPING=1") for _, m in fake.messages) == 1
    assert not fake.ping_times(), "no WATCHDOG_USEC, no pings"


def test_stop_sends_stopping_when_the_agent_did_not(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd

    async def scenario() -> None:
        notifier = SystemdNotifier(env={"NOTIFY_SOCKET": path})
        await notifier.start()
        await notifier.stop()

    run(scenario())
    fake.wait_for("STOPPING=1")


def test_abstract_namespace_socket() -> None:
    name = f"edge-agent-test-{uuid.uuid4().hex}"
    fake = FakeSystemd(b"\0" + name.encode())
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.send("READY=1")
        fake.wait_for("READY=1")
        notifier.close()
    finally:
        fake.close()


def test_watchdog_pings_at_half_the_interval_and_stop_when_the_loop_is_blocked(
    systemd: tuple[FakeSystemd, str],
) -> None:
    """Pings flow, stop while the event loop is blocked, resume after. Counted, not timed: how many pings a
    stretch of wall-clock time holds depends on the machine's load; that none come from a blocked loop does not."""
    fake, path = systemd
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}
    block_s = 0.6  # twelve ping intervals

    async def until(predicate: Any, what: str) -> None:
        deadline = time.monotonic() + HANG_S
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)

    def blocking_until(predicate: Any, what: str) -> None:
        deadline = time.monotonic() + HANG_S
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)  # blocking the event loop is the point of this test

    async def scenario() -> tuple[int, int, int, int]:
        notifier = SystemdNotifier(env=env)
        assert notifier.interval == pytest.approx(0.05)
        await notifier.start()
        await until(lambda: fake.pings() >= 4, "regular pings from a healthy loop")

        async def stuck() -> tuple[int, int, int, int]:
            # The loop is blocked from here on. Every ping sent so far reaches the socket first...
            sent_before = notifier.pings
            blocking_until(lambda: fake.pings() >= sent_before, "the pings sent so far to arrive")
            received_before = fake.pings()
            time.sleep(block_s)
            # ...so whatever arrived while the loop was stuck did not come from the loop.
            return sent_before, notifier.pings, received_before, fake.pings()

        counts = await stuck()
        await until(lambda: fake.pings() >= counts[3] + 4, "pings to resume once the loop runs again")
        await notifier.stop()
        return counts

    sent_before, sent_after, received_before, received_after = run(scenario())
    assert sent_after == sent_before, "a blocked event loop must not ping the watchdog"
    # Nothing arrived for the whole blocked stretch, which is what lets systemd notice.
    assert received_after == received_before, "no WATCHDOG=1 reached systemd while the loop was stuck"


def test_watchdog_pid_of_another_process_means_no_pings(systemd: tuple[FakeSystemd, str]) -> None:
    fake, path = systemd
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid() + 1)}

    async def scenario() -> None:
        notifier = SystemdNotifier(env=env)
        assert notifier.interval is None
        await notifier.start()
        await asyncio.sleep(0.2)
        notifier.ready()
        await notifier.stop()

    run(scenario())
    fake.wait_for("READY=1")
    assert fake.ping_times() == []


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon"])
def test_unusable_watchdog_usec_disables_pings(usec: str) -> None:
    assert watchdog_interval({"WATCHDOG_USEC": usec}) is None


def test_watchdog_pid_unset_is_ours() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0


def test_without_notify_socket_everything_is_a_quiet_no_op() -> None:
    async def scenario() -> SystemdNotifier:
        notifier = SystemdNotifier(env={"WATCHDOG_USEC": "100000"})
        await notifier.start()
        assert not notifier.enabled
        assert not notifier.ready()
        assert not notifier.status("x")
        await notifier.stop()
        return notifier

    notifier = run(scenario())
    assert notifier.pings == 0


def test_missing_socket_loses_the_notification_not_the_agent(short_dir: Path) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(short_dir / "gone")})
    assert notifier.enabled
    assert notifier.send("READY=1") is False
    assert notifier.send("READY=1") is False
    notifier.close()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", None), ("/run/systemd/notify", "/run/systemd/notify"), ("@x", b"\0x"), ("vsock:2:1234", None)],
)
def test_parse_address(value: str, expected: object) -> None:
    assert parse_address(value) == expected


# -- the agent under a (fake) systemd ---------------------------------------------------------


def test_edge_agent_run_notifies_ready_once_warm_pings_and_says_stopping(
    systemd: tuple[FakeSystemd, str], agent_process: Any
) -> None:
    fake, path = systemd
    proc = agent_process(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    ready = fake.wait_for("READY=1")
    # READY=1 means what `systemctl start` promises: the API answers ready and
    # the active models are loaded and warm.
    assert http("GET", proc.url + "/v2/health/ready")[0] == 200
    assert http("GET", proc.url + "/v2/models/digits/ready")[0] == 200
    assert ready == ["READY=1\nSTATUS=serving 1 model(s): digits 1"]
    # WATCHDOG=1 every WATCHDOG_USEC/2 from the running agent: several of them, however long that takes.
    deadline = time.monotonic() + HANG_S
    while fake.pings() < 3:
        assert time.monotonic() < deadline, "no regular WATCHDOG=1 pings from the running agent"
        time.sleep(0.01)
    # No pings before READY=1: the watchdog guards a running service. Its task is started in the same step
    # as the one that announces READY=1 and runs first, so one ping may lead it by a task switch; a watchdog
    # started any earlier (before the models load and warm) would have sent more.
    ready_at = fake.index_of("READY=1")
    assert sum(1 for _, m in fake.messages[:ready_at] if m == "WATCHDOG=1") <= 1, fake.messages[: ready_at + 1]
    assert proc.terminate(timeout=HANG_S) == 0
    fake.wait_for("STOPPING=1")
    stopping = fake.index_of("STOPPING=1")
    assert not [m for _, m in fake.messages[stopping:] if m == "WATCHDOG=1"], "pings end with STOPPING=1"
    assert sum(m.count("READY=1") for _, m in fake.messages) == 1


def test_agent_without_notify_socket_attaches_no_notifier(tmp_path: Path) -> None:
    from agent.config import Config
    from agent.daemon import Agent
    from agent.wiring import attach_sdnotify

    agent = Agent(Config.load(env={}, overrides={"state_dir": tmp_path / "state", "seed_bundled": False}))
    try:
        assert attach_sdnotify(agent, env={}) is None
        assert agent.services == []
        notifier = attach_sdnotify(agent, env={"NOTIFY_SOCKET": "/run/systemd/notify"})
        assert notifier is not None and agent.services == [notifier]
    finally:
        agent.db.close()
        agent.executor.shutdown()
        agent.runtime.close()
