"""Shared fixtures: free ports, model directories, in-process and subprocess agents."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from modelkit import make_scale_model
from ports import free_port

from agent.config import Config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def scale_dir(tmp_path: Path) -> Path:
    return make_scale_model(tmp_path / "scale-model")


def http(
    method: str,
    url: str,
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> tuple[int, Any]:
    """A tiny HTTP client returning (status, parsed JSON or bytes), never raising on 4xx/5xx.

    The default timeout is a hang guard for a loaded machine, not a speed check.
    """
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, method=method, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    try:
        return status, json.loads(payload) if payload else None
    except ValueError:
        return status, payload


def control_headers(state_dir: Path) -> dict[str, str]:
    """What a local client sends to the control API: JSON, with the token the agent keeps in its state directory."""
    token = (Path(state_dir) / "api-token").read_text().strip()
    return {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}


# A replaced version stays warm this long in test agents (the default is minutes).
ROLLBACK_GRACE_S = 0.5


class AgentThread:
    """An in-process Agent running on its own event loop in a background thread.

    ``setup(agent)`` runs on the new agent before it starts: it may change the config
    and attach subsystems, in the wiring's order (agent/wiring.py): images before the
    lifecycle, the lifecycle before what drives it (``attach_lifecycle(agent,
    rollback_grace_s=ROLLBACK_GRACE_S)`` then ``attach_mqtt(agent)``). An agent whose
    setup attached no lifecycle gets one afterwards, with the short grace above.
    """

    def __init__(self, config: Config, setup: Any = None, *, gpu_devices: Any = None):
        from agent.daemon import Agent
        from agent.wiring import attach_lifecycle

        self.loop = asyncio.new_event_loop()
        self.agent = Agent(config, gpu_devices=gpu_devices)  # gpu_devices: GpuDevice list, None: NVML's
        if setup is not None:
            setup(self.agent)
        self.lifecycle = self.agent.control or attach_lifecycle(self.agent, rollback_grace_s=ROLLBACK_GRACE_S)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self.agent.start())
        host, port = self.agent.address
        self.url = f"http://{host}:{port}"

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return  # stopped already (a test stopped it before the fixture's teardown)
        with contextlib.suppress(Exception):
            self.call(self.agent.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Any]:
    """Factory: make_agent(setup=fn, **config overrides) -> AgentThread (stopped at teardown)."""
    agents: list[AgentThread] = []

    def factory(setup: Any = None, **overrides: Any) -> AgentThread:
        # A free gRPC port too (used when a test attaches it), so many agents share one process.
        values = {
            "state_dir": tmp_path / "state",
            "listen": "127.0.0.1:0",
            "grpc_listen": "127.0.0.1:0",
            "log_level": "warning",
        }
        values.update(overrides)
        config = Config.load(env={}, overrides=values)
        agent = AgentThread(config, setup)
        agents.append(agent)
        return agent

    yield factory
    for agent in agents:
        agent.stop()


class AgentProcess:
    """``edge-agent run`` as a real subprocess."""

    def __init__(self, state_dir: Path, port: int, extra: list[str] | None = None, env: dict[str, str] | None = None):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = state_dir.parent / f"agent-{port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        full_env.update(env or {})
        # Not the default gRPC port: agents run side by side. A test that sets it keeps its own.
        if "--grpc-listen" not in (extra or []) and "EDGE_AGENT_GRPC_LISTEN" not in full_env:
            extra = ["--grpc-listen", "127.0.0.1:0", *(extra or [])]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "run",
                "--state-dir",
                str(state_dir),
                "--listen",
                f"127.0.0.1:{port}",
                "--log-format",
                "json",
                *(extra or []),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=REPO,
        )

    def wait_ready(self, timeout: float = 60.0) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                status, _ = http("GET", self.url + "/v2/health/ready", timeout=1)
                if status == 200:
                    return time.monotonic() - start
            time.sleep(0.02)
        raise AssertionError(f"agent not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[Any]:
    procs: list[AgentProcess] = []

    def factory(
        state_dir: Path | None = None,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> AgentProcess:
        proc = AgentProcess(state_dir or tmp_path / "state", port or free_port(), extra, env)
        procs.append(proc)
        return proc

    yield factory
    for proc in procs:
        proc.kill()
