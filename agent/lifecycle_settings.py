"""The ``[lifecycle]`` table: how long a replaced version stays warm, and how long it may drain."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from agent.config import Config, section_values
from agent.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LifecycleSettings:
    # A replaced version stays loaded this long so a rollback is a route flip;
    # may change at run time (set-config rollback_grace_s).
    rollback_grace_s: float = 300.0
    # How long a version that no longer takes traffic may finish its in-flight
    # requests before its instances are closed; may change at run time (set-config
    # drain_timeout_s). Not the top-level drain_timeout_s (10 s), which is how long
    # SIGTERM waits for the HTTP server's open requests.
    drain_timeout_s: float = 30.0

    @classmethod
    def from_config(cls, config: Config) -> LifecycleSettings:
        return cls.from_mapping(config.section("lifecycle"))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> LifecycleSettings:
        settings = cls(**section_values("lifecycle", raw, cls))
        # The same rule set-config applies to these two at run time.
        for field in dataclasses.fields(cls):
            value = getattr(settings, field.name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"lifecycle.{field.name}: {value!r} is not a number of seconds (finite, at least 0)")
        return settings
