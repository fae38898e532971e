"""The configuration: it loads (core keys: the config module's own checks) and every section parses.

Each section is parsed by the subsystem that owns it, with the very parser the agent runs at
start-up, so an unknown key or a bad value is reported with the agent's own words. A section no
subsystem reads (``[mqqt]``) is named too: the agent would start and ignore it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from agent.check import CheckOptions, Finding
from agent.config import Config, GpuSettings, WasiNnSettings
from agent.errors import AgentError

# What to do about a configuration that does not load or parse.
FIX_CONFIG = "fix the named setting (docs/CONFIG.md); the agent refuses to start with it (exit 78)"


def _wasi_nn(config: Config) -> Any:
    from agent.wasinn.backend import KNOWN_BACKENDS

    return WasiNnSettings.from_config(config, known=tuple(info.name for info in KNOWN_BACKENDS))


def _parsers() -> dict[str, Callable[[Config], Any]]:
    """Every config section the agent reads, with the parser it reads it with.

    tests/test_check.py keeps this table equal to the ``config.section("...")`` calls in agent/.
    """
    from agent.images.settings import CacheSettings, RegistrySettings, TrustSettings
    from agent.inbox import InboxSettings
    from agent.k8s.settings import KubeSettings
    from agent.lifecycle_settings import LifecycleSettings
    from agent.llm.settings import LlmSettings
    from agent.mqtt.settings import MqttSettings
    from agent.server.batching import parse_batching_config
    from agent.telemetry.settings import TelemetrySettings

    return {
        "mqtt": MqttSettings.from_config,
        "telemetry": TelemetrySettings.from_config,
        "k8s": lambda c: KubeSettings.from_config(c, os.environ),
        "registry": RegistrySettings.from_config,
        "trust": TrustSettings.from_config,
        "cache": CacheSettings.from_config,
        "inbox": InboxSettings.from_config,
        "lifecycle": LifecycleSettings.from_config,
        "batching": lambda c: parse_batching_config(c.section("batching")),
        "wasi_nn": _wasi_nn,
        "gpu": GpuSettings.from_config,
        "llm": LlmSettings.from_config,
    }


def known_sections() -> tuple[str, ...]:
    return tuple(_parsers())


def load(options: CheckOptions) -> tuple[Config | None, list[Finding]]:
    """The config as ``edge-agent run`` would load it (file, environment, --state-dir), and its sections."""
    try:
        config = Config.load(file=options.config_file, overrides={"state_dir": options.state_dir})
    except AgentError as exc:
        return None, [Finding("config", "fail", f"does not load: {exc}", FIX_CONFIG)]
    return config, [sections(config)]


def sections(config: Config) -> Finding:
    errors: list[str] = []
    parsers = _parsers()
    for name, parse in parsers.items():
        try:
            parse(config)
        except AgentError as exc:
            errors.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - a parser's own bug is reported, not a crashed check
            errors.append(f"[{name}]: its parser failed: {type(exc).__name__}: {exc}")
    unknown = sorted(set(config.sections) - set(parsers))
    present = sorted(set(config.sections) & set(parsers))
    if errors:
        return Finding("config", "fail", "; ".join(errors), FIX_CONFIG)
    if unknown:
        listed = ", ".join(f"[{name}]" for name in unknown)
        return Finding(
            "config",
            "warn",
            f"unknown section(s) {listed}: the agent ignores them (a typo?)",
            f"rename or remove them; known sections: {', '.join(sorted(parsers))}",
        )
    shown = ", ".join(f"[{name}]" for name in present) or "none"
    return Finding("config", "pass", f"loads; every key is known (sections: {shown})")
