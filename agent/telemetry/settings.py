"""The ``[telemetry]`` table: how often the node reports, and whether it looks for a GPU."""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.config import Config, section_values
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
        values = section_values("telemetry", raw, cls)
        settings = cls(**values)
        if settings.interval_s <= 0:
            raise ConfigError(f"telemetry.interval_s must be positive, got {settings.interval_s}")
        return settings
