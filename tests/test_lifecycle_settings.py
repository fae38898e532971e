"""The ``[lifecycle]`` table: parsed once, typed, unknown keys refused."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agent import exitcodes
from agent.config import Config
from agent.errors import ConfigError
from agent.lifecycle_settings import LifecycleSettings

REPO = Path(__file__).resolve().parent.parent


def test_defaults_are_the_lifecycles_own_not_the_sigterm_drain() -> None:
    settings = LifecycleSettings.from_config(Config())
    assert (settings.rollback_grace_s, settings.drain_timeout_s) == (300.0, 30.0)
    # The top-level drain_timeout_s is another setting: how long SIGTERM waits for HTTP requests.
    assert Config().drain_timeout_s == 10.0


def test_values_are_coerced_and_checked() -> None:
    settings = LifecycleSettings.from_mapping({"rollback_grace_s": "600", "drain_timeout_s": 5})
    assert (settings.rollback_grace_s, settings.drain_timeout_s) == (600.0, 5.0)
    with pytest.raises(ConfigError, match=r"lifecycle\.rollback_grace_s: cannot use 'soon'"):
        LifecycleSettings.from_mapping({"rollback_grace_s": "soon"})
    with pytest.raises(ConfigError, match=r"lifecycle\.drain_timeout_s: -1\.0 is not a number of seconds"):
        LifecycleSettings.from_mapping({"drain_timeout_s": -1})
    with pytest.raises(ConfigError, match=r"unknown lifecycle setting\(s\): rollback_grace"):
        LifecycleSettings.from_mapping({"rollback_grace": 10})


def test_run_refuses_an_unknown_lifecycle_key_with_exit_78(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[lifecycle]\nrollback_grace_s = 60\nrolback_grace_s = 600\n")
    with socket.socket() as sock:  # a free port, so nothing else's answer is mistaken for ours
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    args = [
        "run",
        "--config",
        str(config),
        "--state-dir",
        str(tmp_path / "state"),
        "--listen",
        f"127.0.0.1:{port}",
        "--grpc-listen",
        "127.0.0.1:0",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "agent", *args, "--no-seed"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )
    assert run.returncode == exitcodes.CONFIG, (run.returncode, run.stderr)
    assert "rolback_grace_s" in run.stderr, run.stderr
