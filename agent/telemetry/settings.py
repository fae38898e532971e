"""The ``[telemetry]`` table: how often the node reports, and whether it looks for a GPU."""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.config import Config, coerce
from agent.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TelemetrySettings:
    # Seconds between metrics snapshots; may change at run time (set-config telemetry.interval_s).
    interval_s: float = 60.0
    # Look for NVIDIA GPUs through NVML; off skips even the probe.
    gpu: bool = True

    @classmethod
    def from_config(cls, config: Config) -> TelemetrySettings:
        return cls.from_mapping(config.section("telemetry"))

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> TelemetrySettings:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"unknown telemetry setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        values = {
            "interval_s": coerce("telemetry.interval_s", raw.get("interval_s", cls.interval_s), float),
            "gpu": coerce("telemetry.gpu", raw.get("gpu", cls.gpu), bool),
        }
        settings = cls(**values)
        if settings.interval_s <= 0:
            raise ConfigError(f"telemetry.interval_s must be positive, got {settings.interval_s}")
        return settings
