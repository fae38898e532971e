"""The ``[mqtt]`` table of the config, parsed and checked once at start-up.

Values come from the TOML file or from ``EDGE_AGENT_MQTT__<KEY>`` variables
(always strings), so every field is coerced from text as well as from its
TOML type. A wrong value fails start-up with a message naming the key, never
later on the first reconnect.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from agent.config import Config, section_values
from agent.errors import ConfigError

# Characters that would change the meaning of a topic built from a node or group id.
_TOPIC_UNSAFE = set("+#/\x00")


@dataclasses.dataclass(frozen=True)
class MqttSettings:
    # No host means MQTT is off: the agent serves locally and never connects.
    host: str = ""
    port: int = 0  # 0: 8883 with TLS, 1883 without
    username: str = ""
    password: str = ""
    # A file holding the password (a mounted secret); wins over ``password``.
    password_file: Path | None = None
    # TLS is on when a CA is given; a client certificate adds mutual TLS.
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = 30
    # How long a connection attempt (TCP + TLS + CONNACK) may take.
    connect_timeout_s: float = 10.0
    # Reconnect backoff: a random delay in [0, min(max, min * 2**attempt)] ("full jitter").
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 120.0
    # A connection that stayed up this long resets the backoff to its first step.
    stable_after_s: float = 30.0
    # How long the broker keeps this node's session (queued commands) while it is away.
    session_expiry_s: int = 86400
    topic_prefix: str = "edge"
    groups: tuple[str, ...] = ()
    # Outbox bounds: payload bytes held, and age of the oldest message; beyond either the oldest go.
    outbox_max_bytes: int = 64 * 1024 * 1024
    outbox_max_age_s: float = 7 * 86400.0
    # Backlog drain rate after a reconnect, messages per second (0: as fast as the broker acks).
    drain_rate: float = 1000.0
    # QoS 1 messages published and not yet acknowledged; also capped by the broker's Receive Maximum.
    max_inflight: int = 500
    # PEM public keys (files, or directories of *.pem / *.pub) whose signatures commands may carry.
    fleet_keys: tuple[Path, ...] = ()
    command_max_bytes: int = 64 * 1024
    # A command may be issued at most this far in the future (clock skew between fleet and node).
    command_max_skew_s: float = 300.0
    # expires_at - issued_at may not exceed this; it bounds how long ids must be remembered.
    command_max_lifetime_s: float = 7 * 86400.0
    # Bus events waiting to be written to the outbox before the bus drops the oldest.
    event_queue: int = 20000

    @property
    def enabled(self) -> bool:
        return bool(self.host)

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    @property
    def effective_port(self) -> int:
        return self.port or (8883 if self.tls else 1883)

    def read_password(self) -> str | None:
        """The password to send, read from ``password_file`` when one is set."""
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"mqtt.password_file: cannot read {self.password_file}: {exc.strerror}") from exc
        return self.password or None

    @classmethod
    def from_config(cls, config: Config) -> MqttSettings:
        return cls.from_mapping(config.section("mqtt"))

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> MqttSettings:
        values = section_values(
            "mqtt",
            raw,
            cls,
            special={
                "groups": lambda name, value: tuple(_string_list(name, value)),
                "fleet_keys": lambda name, value: tuple(Path(p).expanduser() for p in _string_list(name, value)),
            },
        )
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"mqtt.port must be 0-65535, got {self.port}")
        for name in ("keepalive_s", "max_inflight", "command_max_bytes", "event_queue", "outbox_max_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mqtt.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("connect_timeout_s", "reconnect_max_s", "outbox_max_age_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"mqtt.{name} must be positive, got {getattr(self, name)}")
        if self.reconnect_min_s <= 0 or self.reconnect_min_s > self.reconnect_max_s:
            raise ConfigError(
                f"mqtt.reconnect_min_s must be positive and at most reconnect_max_s ({self.reconnect_max_s}), "
                f"got {self.reconnect_min_s}"
            )
        if self.drain_rate < 0:
            raise ConfigError(f"mqtt.drain_rate must be 0 (unlimited) or positive, got {self.drain_rate}")
        if self.max_inflight > 65535:
            raise ConfigError(f"mqtt.max_inflight must be at most 65535 (MQTT packet ids), got {self.max_inflight}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("mqtt.cert_file and mqtt.key_file go together: set both for a client certificate")
        if self.cert_file is not None and self.ca_file is None:
            raise ConfigError("mqtt.cert_file needs mqtt.ca_file: a client certificate is only sent over TLS")
        if self.password and not self.username:
            raise ConfigError("mqtt.password is set but mqtt.username is not")
        check_topic_segment("mqtt.topic_prefix", self.topic_prefix, allow_slash=True)
        for group in self.groups:
            check_topic_segment("mqtt.groups", group)


def check_topic_segment(name: str, value: str, allow_slash: bool = False) -> None:
    """Refuse ids that would escape their place in a topic (wildcards, separators)."""
    unsafe = _TOPIC_UNSAFE - ({"/"} if allow_slash else set())
    if not value or value.startswith("/") or value.endswith("/") or any(c in unsafe for c in value):
        shown = "".join(sorted(unsafe)).replace("\x00", "NUL")
        raise ConfigError(f"{name}: {value!r} cannot be used in an MQTT topic (empty, or contains one of {shown!r})")


def _string_list(name: str, value: Any) -> list[str]:
    """A TOML array of strings, or (from the environment) a comma-separated string."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ConfigError(f"{name} must be a list of strings or a comma-separated string, got {value!r}")
