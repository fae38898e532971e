"""The ``[registry]``, ``[trust]`` and ``[cache]`` tables of the agent's config, typed.

Every setting has a default that is safe on an edge node: HTTPS only, a
signature required, bounded manifests, a bounded cache. Example::

    [registry]
    stall_timeout_s = 30
    [registry.hosts."registry.example.com"]
    ca_file = "/etc/edge-agent/registry-ca.pem"
    username = "edge"
    password_file = "/etc/edge-agent/registry-password"
    [registry.hosts."127.0.0.1:5000"]
    plain_http = true           # only ever for a host named here (or one command's --plain-http)

    [trust]
    require_signature = true
    [trust.keys]
    release-2024 = "/etc/edge-agent/keys/release-2024.pub"
    release-2025 = "/etc/edge-agent/keys/release-2025.pub"
    [trust.scopes]
    "registry.example.com/models" = ["release-2024", "release-2025"]

    [cache]
    max_size = "2GiB"
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import Config, section_values
from agent.errors import ConfigError


@dataclass(frozen=True)
class HostSettings:
    """How to reach one registry host."""

    plain_http: bool = False
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None

    def credentials(self) -> tuple[str, str] | None:
        if not self.username:
            return None
        if self.password_file is not None:
            try:
                return self.username, self.password_file.read_text().strip()
            except OSError as exc:
                raise ConfigError(f"registry password_file {self.password_file}: {exc.strerror}") from exc
        return self.username, self.password or ""


@dataclass(frozen=True)
class RegistrySettings:
    hosts: dict[str, HostSettings] = field(default_factory=dict)
    connect_timeout_s: float = 10.0
    # A read that waits this long for the next byte counts as a stalled server.
    stall_timeout_s: float = 30.0
    # Attempts per request (first try included) on connection errors, stalls, 5xx and 429.
    attempts: int = 6
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    # 4 MiB is what the OCI distribution spec asks registries to accept at least.
    max_manifest_bytes: int = 4 * 1024 * 1024
    max_config_bytes: int = 4 * 1024 * 1024
    # Signature manifests and simple-signing payloads are tiny; a large one is hostile.
    max_signature_bytes: int = 256 * 1024
    user_agent: str = "edge-agent"

    def host(self, registry: str) -> HostSettings:
        return self.hosts.get(registry, HostSettings())

    @classmethod
    def from_config(cls, config: Config) -> RegistrySettings:
        return cls.from_table(config.section("registry"))

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> RegistrySettings:
        table = dict(table)
        hosts_table = table.pop("hosts", {}) or {}
        if not isinstance(hosts_table, dict):
            raise ConfigError("[registry.hosts] must be a table of host tables")
        hosts = {name: _host(name, value) for name, value in hosts_table.items()}
        values = section_values("registry", table, cls)
        settings = cls(hosts=hosts, **values)
        for name in ("attempts", "max_manifest_bytes", "max_config_bytes", "max_signature_bytes"):
            if getattr(settings, name) < 1:
                raise ConfigError(f"registry.{name} must be at least 1")
        for name in ("connect_timeout_s", "stall_timeout_s", "backoff_max_s"):
            if getattr(settings, name) <= 0:
                raise ConfigError(f"registry.{name} must be positive")
        return settings


@dataclass(frozen=True)
class TrustSettings:
    require_signature: bool = True
    keys: dict[str, str] = field(default_factory=dict)  # name -> PEM file path (or inline PEM)
    scopes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # scope -> key names

    @classmethod
    def from_config(cls, config: Config) -> TrustSettings:
        return cls.from_table(config.section("trust"))

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> TrustSettings:
        table = dict(table)
        keys = table.pop("keys", {}) or {}
        scopes = table.pop("scopes", {}) or {}
        if not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values()):
            raise ConfigError("[trust.keys] must map key names to public key files")
        if not isinstance(scopes, dict):
            raise ConfigError("[trust.scopes] must map registry/repository scopes to lists of key names")
        parsed_scopes: dict[str, tuple[str, ...]] = {}
        for scope, names in scopes.items():
            if isinstance(names, str):
                names = [n.strip() for n in names.split(",") if n.strip()]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ConfigError(f"[trust.scopes] {scope!r} must be a list of key names")
            unknown = [n for n in names if n not in keys]
            if unknown:
                raise ConfigError(
                    f"[trust.scopes] {scope!r} names unknown key(s) {unknown}; define them in [trust.keys]"
                )
            parsed_scopes[scope.rstrip("/")] = tuple(names)
        values = section_values("trust", table, cls)
        return cls(keys=dict(keys), scopes=parsed_scopes, **values)


@dataclass(frozen=True)
class CacheSettings:
    # 0 means no budget. Blobs of active, previous and pinned versions are kept
    # even when they alone exceed it.
    max_bytes: int = 4 * 1024**3
    # Partial downloads untouched this long are dropped by `cache gc`.
    partial_max_age_s: float = 7 * 24 * 3600.0
    # Unreferenced blobs younger than this are spared by gc: a local import may be between
    # writing its blobs and recording its version.
    orphan_grace_s: float = 600.0

    @classmethod
    def from_config(cls, config: Config) -> CacheSettings:
        return cls.from_table(config.section("cache"))

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> CacheSettings:
        table = dict(table)
        if "max_size" in table:
            table["max_bytes"] = parse_size(table.pop("max_size"))
        values = section_values("cache", table, cls)
        settings = cls(**values)
        if settings.max_bytes < 0:
            raise ConfigError("cache.max_bytes must not be negative")
        return settings


_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)


def parse_size(value: Any) -> int:
    """``1073741824``, ``"512MiB"``, ``"2GB"``, ``"1.5G"`` to bytes (``Ki`` = 1024, ``K`` = 1000)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ConfigError(f"cannot read {value!r} as a size; use bytes or e.g. '512MiB', '2GB'")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    letter = unit[:1] if unit[:1] in ("k", "m", "g", "t") else ""
    power = "kmgt".index(letter) + 1 if letter else 0
    factor = (1024 if "i" in unit else 1000) ** power
    return int(number * factor)


def _host(name: str, value: Any) -> HostSettings:
    if not isinstance(value, dict):
        raise ConfigError(f"[registry.hosts.{name!r}] must be a table")
    values = section_values(f"registry.hosts.{name}", dict(value), HostSettings)
    return HostSettings(**values)
