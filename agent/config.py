"""Agent configuration: built-in defaults < TOML file < environment < flags.

Core settings are typed fields of :class:`Config`. Each later subsystem (MQTT,
registry, trust, Kubernetes) keeps its own table in the TOML file and parses
it from :meth:`Config.section`, so adding a subsystem never touches this file.

Environment variables: ``EDGE_AGENT_<FIELD>`` for core fields (for example
``EDGE_AGENT_STATE_DIR``, ``EDGE_AGENT_LISTEN``) and
``EDGE_AGENT_<SECTION>__<KEY>`` for a key of a section (for example
``EDGE_AGENT_MQTT__HOST``). ``EDGE_AGENT_CONFIG`` names the TOML file.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_type_hints

from agent.errors import ConfigError

ENV_PREFIX = "EDGE_AGENT_"
# What grpc_listen says to serve no gRPC at all.
GRPC_OFF = ("", "off")
DEFAULT_CONFIG_FILE = Path("/etc/edge-agent/config.toml")


def default_state_dir() -> Path:
    """systemd's StateDirectory when set, else the FHS or XDG location."""
    if state := os.environ.get("STATE_DIRECTORY"):
        return Path(state.split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/edge-agent")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "edge-agent"


def default_compile_cache_dir() -> Path | None:
    """systemd's CacheDirectory when set; None means ``<state_dir>/compiled``."""
    if cache := os.environ.get("CACHE_DIRECTORY"):
        return Path(cache.split(":")[0]) / "compiled"
    return None


@dataclasses.dataclass
class Config:
    """Core settings. Field docs double as the reference in docs/CONFIG.md."""

    state_dir: Path = dataclasses.field(default_factory=default_state_dir)
    listen: str = "127.0.0.1:8080"
    # The gRPC Open Inference Protocol's own port; "" or "off" switches it off.
    grpc_listen: str = "127.0.0.1:8081"
    # PEM files: both set serves gRPC over TLS, neither in plain text (h2c).
    grpc_tls_cert: Path | None = None
    grpc_tls_key: Path | None = None
    # gRPC calls holding work (inference, repository changes, health watches) at once; more get RESOURCE_EXHAUSTED.
    grpc_max_concurrent_rpcs: int = 256
    node_id: str = dataclasses.field(default_factory=socket.gethostname)
    log_level: str = "info"
    log_format: str = "auto"  # auto: readable on a terminal, JSON otherwise
    # The most instances per loaded model version: one is made (and warmed) at load, the
    # others when concurrent requests need them (all at load with eager_instances).
    pool_size: int = 2
    eager_instances: bool = False
    # Live instances across every model of the node (0: no bound); past it, a model that needs
    # one takes the least recently used idle instance of another, else waits, then 503.
    max_instances: int = 4096
    # An instance idle this long is dropped, except each version's last one (0: never).
    instance_idle_s: float = 600.0
    # Per-request wasm deadline; the model's own hint may only lower it.
    request_timeout_ms: int = 1000
    # Per-instance linear-memory cap; the model's own hint may only lower it.
    memory_limit_mb: int = 256
    # Requests whose expected compute time is below this run on the event loop:
    # a hop to a worker thread costs tens of microseconds, more than the model.
    inline_threshold_us: int = 200
    worker_threads: int = 4
    max_body_bytes: int = 8 * 1024 * 1024
    # What one client can make the HTTP server hold; each limit is answered as
    # soon as it is crossed (414, 431, 503), never after buffering.
    max_url_bytes: int = 8 * 1024
    max_header_bytes: int = 64 * 1024  # request line + headers
    max_header_count: int = 100
    # Request bodies held at once across all connections (bodies <= 64 KiB are always admitted).
    max_inflight_body_bytes: int = 64 * 1024 * 1024
    max_connections: int = 512
    # Unsent output above which a connection is no longer read (a client not reading its answers).
    write_buffer_high_bytes: int = 64 * 1024
    # A request head / body not received in full within these gets 408 and the connection is closed.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    # How long SIGTERM waits for in-flight requests before closing anyway.
    drain_timeout_s: float = 10.0
    # Import the bundled reference models into an empty store at start-up.
    seed_bundled: bool = True
    # Bearer token guarding the local control API (repository extension).
    api_token: str = ""
    # Serialized compiled modules: disposable (rebuilt from the store), hence a cache.
    compile_cache_dir: Path | None = dataclasses.field(default_factory=default_compile_cache_dir)
    sections: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_listen(self.listen)

    @property
    def grpc_host_port(self) -> tuple[str, int] | None:
        """The gRPC address, or None when gRPC is switched off."""
        if self.grpc_listen.strip().lower() in GRPC_OFF:
            return None
        try:
            return parse_listen(self.grpc_listen)
        except ConfigError:
            raise ConfigError(f"grpc_listen must be HOST:PORT, or off, got {self.grpc_listen!r}") from None

    def section(self, name: str) -> dict[str, Any]:
        """The raw ``[name]`` table (file values overlaid by the environment)."""
        return dict(self.sections.get(name, {}))

    @classmethod
    def load(
        cls,
        file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Config:
        """Build a config from the layers; ``overrides`` are command-line flags."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {}

        path = Path(file) if file else (Path(env[ENV_PREFIX + "CONFIG"]) if env.get(ENV_PREFIX + "CONFIG") else None)
        if path is None and env.get("CONFIGURATION_DIRECTORY"):
            candidate = Path(env["CONFIGURATION_DIRECTORY"].split(":")[0]) / "config.toml"
            path = candidate if candidate.exists() else None
        if path is None and DEFAULT_CONFIG_FILE.exists():
            path = DEFAULT_CONFIG_FILE
        if path is not None:
            file_values = _read_toml(path)
            agent_table = file_values.pop("agent", {})
            if not isinstance(agent_table, dict):
                raise ConfigError(f"{path}: [agent] must be a table")
            values.update(agent_table)
            for key, value in file_values.items():
                if isinstance(value, dict):
                    sections[key] = dict(value)
                else:
                    values[key] = value  # top-level keys are core fields too

        fields = {f.name for f in dataclasses.fields(cls) if f.name != "sections"}
        for name, raw in env.items():
            if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
                continue
            key = name[len(ENV_PREFIX) :].lower()
            if "__" in key:
                section, _, sub = key.partition("__")
                sections.setdefault(section, {})[sub] = raw
            elif key in fields:
                values[key] = raw
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value

        unknown = set(values) - fields
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        hints = get_type_hints(cls)
        typed = {key: coerce(key, value, hints[key]) for key, value in values.items()}
        config = cls(**typed, sections=sections)
        config.validate()
        return config

    def validate(self) -> None:
        parse_listen(self.listen)
        self._validate_grpc()
        for name in ("pool_size", "request_timeout_ms", "memory_limit_mb", "worker_threads", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        self._validate_http_limits()
        if self.max_instances < 0 or self.instance_idle_s < 0:
            raise ConfigError(
                f"max_instances and instance_idle_s must be 0 or more, got {self.max_instances}, {self.instance_idle_s}"
            )
        if self.log_format not in ("auto", "json", "console"):
            raise ConfigError(f"log_format must be auto, json or console, got {self.log_format!r}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ConfigError(f"log_level must be debug, info, warning, error or critical, got {self.log_level!r}")

    def _validate_grpc(self) -> None:
        self.grpc_host_port  # noqa: B018 - parses, and refuses a bad address
        if self.grpc_max_concurrent_rpcs < 1:
            raise ConfigError(f"grpc_max_concurrent_rpcs must be at least 1, got {self.grpc_max_concurrent_rpcs}")
        if (self.grpc_tls_cert is None) != (self.grpc_tls_key is None):
            raise ConfigError("grpc_tls_cert and grpc_tls_key go together: set both (TLS) or neither (plain text)")

    def _validate_http_limits(self) -> None:
        for name in (
            "max_url_bytes",
            "max_header_bytes",
            "max_header_count",
            "max_inflight_body_bytes",
            "max_connections",
            "write_buffer_high_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("header_timeout_s", "body_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be greater than 0, got {getattr(self, name)}")
        if self.max_url_bytes > self.max_header_bytes:
            raise ConfigError(
                f"max_url_bytes ({self.max_url_bytes}) must not exceed max_header_bytes ({self.max_header_bytes})"
            )
        if self.max_inflight_body_bytes < self.max_body_bytes:
            # else a body the per-request limit allows could never be admitted
            raise ConfigError(
                f"max_inflight_body_bytes ({self.max_inflight_body_bytes}) must be at least "
                f"max_body_bytes ({self.max_body_bytes})"
            )


def parse_listen(listen: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as '[::1]:PORT') to (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen must be HOST:PORT, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def coerce(name: str, value: Any, kind: Any) -> Any:
    """Convert a file or environment value to the field's type, or say why not."""
    kind_name = getattr(kind, "__name__", str(kind))
    try:
        if kind is bool or kind_name == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int or kind_name == "int":
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if kind is float or kind_name == "float":
            return float(value)
        if kind is Path or kind_name == "Path":
            return Path(str(value)).expanduser()
        if Path in getattr(kind, "__args__", ()):  # Path | None: empty means "not set"
            return Path(str(value)).expanduser() if value not in (None, "") else None
        if kind is str or kind_name == "str":
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot use {value!r} as {kind_name}") from exc
    return value


def section_values(
    section: str,
    table: Mapping[str, Any],
    cls: type,
    special: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A subsystem's config table as typed keyword arguments for its settings dataclass.

    Keys the dataclass does not have are refused (a typo must not silently fall back
    to a default); every value is coerced to its field's type, or by ``special[key]``
    (called with the setting's dotted name and the raw value) where a field needs more.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"unknown {section} setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    hints = get_type_hints(cls)
    special = special or {}
    values: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{section}.{key}"
        values[key] = special[key](name, value) if key in special else coerce(name, value, hints[key])
    return values


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc


# -- [wasi_nn] ---------------------------------------------------------------------------------------
# Backend names as config and the environment may spell them (a dot cannot be in an env name).
_NN_BACKEND_ALIASES = {"llama_cpp": "llama.cpp", "llamacpp": "llama.cpp", "onnx": "onnxruntime"}


@dataclasses.dataclass(frozen=True)
class WasiNnSettings:
    """``[wasi_nn]``: which WASI-NN backends this node offers, and each one's options.

    ``backends``: names among the known ones (``onnxruntime``, ``llama.cpp``, ``torchscript``);
    None (the default) is every one whose package is installed. A known backend that is not
    installed is left out (the node cannot offer it), an unknown name is refused. Options are the
    ``[wasi_nn.<backend>]`` tables, handed to the backend as they are (it coerces and checks them).
    Environment: ``EDGE_AGENT_WASI_NN__BACKENDS=onnxruntime,llama.cpp`` and
    ``EDGE_AGENT_WASI_NN__<BACKEND>__<KEY>`` (``llama.cpp`` as ``LLAMA_CPP``).
    """

    backends: tuple[str, ...] | None = None
    options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config, known: tuple[str, ...]) -> WasiNnSettings:
        table = config.section("wasi_nn")
        backends: tuple[str, ...] | None = None
        options: dict[str, dict[str, Any]] = {}
        for key, value in table.items():
            if key == "backends":
                backends = cls._backends(value, known)
                continue
            name, sep, sub = key.partition("__")
            backend = _NN_BACKEND_ALIASES.get(name, name)
            if backend not in known:
                raise ConfigError(
                    f"unknown wasi_nn setting {key!r} (known: backends, and a table per backend: {', '.join(known)})"
                )
            if sep:  # EDGE_AGENT_WASI_NN__ONNXRUNTIME__INTRA_OP_THREADS: one key of the backend's table
                options.setdefault(backend, {})[sub] = value
            elif isinstance(value, dict):
                options.setdefault(backend, {}).update(value)
            else:
                raise ConfigError(f"wasi_nn.{key} must be a table of that backend's options")
        return cls(backends=backends, options=options)

    @staticmethod
    def _backends(value: Any, known: tuple[str, ...]) -> tuple[str, ...]:
        if isinstance(value, str):  # from the environment: comma-separated
            items: list[Any] = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, list):
            items = value
        else:
            raise ConfigError(f"wasi_nn.backends must be a list of backend names, got {value!r}")
        names = []
        for item in items:
            if not isinstance(item, str):
                raise ConfigError(f"wasi_nn.backends must be a list of backend names, got {value!r}")
            name = _NN_BACKEND_ALIASES.get(item.strip().lower(), item.strip().lower())
            if name not in known:
                raise ConfigError(f"wasi_nn.backends: unknown backend {item!r} (known: {', '.join(known)})")
            names.append(name)
        return tuple(dict.fromkeys(names))


# -- [gpu]: the GPU scheduler's settings (agent/wasinn/gpu.py) ----------------------------------------
@dataclasses.dataclass(frozen=True)
class GpuSettings:
    """``[gpu]``: the node's GPUs as a shared resource (admission by memory, a concurrency bound)."""

    # Look for GPUs through NVML; false: none is used (target gpu refused, auto on the CPU), none probed.
    enabled: bool = True
    # MiB admitted per device: one number for every device, or a list by device index; 0 (or absent
    # from the list): 90% of the device's memory.
    memory_budget_mb: tuple[int, ...] = ()
    # Calls running at once on one device, across every model.
    max_concurrency: int = 1
    # How long a call waits for a slot before it fails with gpu_busy.
    wait_s: float = 30.0

    @classmethod
    def from_config(cls, config: Config) -> GpuSettings:
        return cls.from_mapping(config.section("gpu"))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> GpuSettings:
        values = section_values("gpu", raw, cls, special={"memory_budget_mb": _gpu_budgets})
        settings = cls(**values)
        if settings.max_concurrency < 1:
            raise ConfigError(f"gpu.max_concurrency must be at least 1, got {settings.max_concurrency}")
        if settings.wait_s <= 0:
            raise ConfigError(f"gpu.wait_s must be greater than 0, got {settings.wait_s}")
        return settings


def _gpu_budgets(name: str, value: Any) -> tuple[int, ...]:
    """``20000``, ``[20000, 8000]`` (TOML) or ``"20000,8000"`` (the environment)."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    try:
        out = tuple(int(str(item).strip()) for item in items if str(item).strip())
    except ValueError:
        raise ConfigError(f"{name}: cannot use {value!r}: MiB as a number or a list of numbers") from None
    if any(v < 0 for v in out) or any(isinstance(v, bool) for v in items):
        raise ConfigError(f"{name}: cannot use {value!r}: MiB must be 0 (the default share) or more")
    return out
