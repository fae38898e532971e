"""Checks of the node itself: state directory, compile cache, disk against the cache budget, keys, GPU,
the listening addresses and the control API's token. Nothing here changes the node: probes are written
under fresh names and removed, and nothing is created or tightened (``edge-agent run`` does that).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import pwd
import socket
import stat
import uuid
from pathlib import Path
from typing import Any

from agent import apitoken
from agent.check import CheckOptions, Finding, Planned, Status
from agent.config import Config, GpuSettings
from agent.errors import AgentError
from agent.fsmodes import OTHERS

NAMES = ("state_dir", "compile_cache", "disk", "trust_keys", "fleet_keys", "gpu", "listen", "api_token")

# Below this much free space the agent cannot be relied on to write its database, journal or a pull.
MIN_FREE_BYTES = 64 * 1024 * 1024
# A token shorter than this is guessable from the network (the agent's own are 43 characters).
MIN_TOKEN_CHARS = 16
SYNC_TIME = "sync the clock (timedatectl set-ntp true; chrony or systemd-timesyncd)"


def plan(config: Config, options: CheckOptions) -> list[Planned]:
    return [
        Planned(("state_dir",), sync=lambda: state_dir(config)),
        Planned(("compile_cache",), sync=lambda: compile_cache(config)),
        Planned(("disk",), sync=lambda: disk(config)),
        Planned(("trust_keys",), sync=lambda: trust_keys(config)),
        Planned(("fleet_keys",), sync=lambda: fleet_keys(config)),
        Planned(("gpu",), sync=lambda: gpu(config)),
        Planned(("listen",), sync=lambda: listen(config)),
        Planned(("api_token",), sync=lambda: api_token(config)),
    ]


# -- files ----------------------------------------------------------------------------------------
def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _probe_write(directory: Path) -> str | None:
    """Write, fsync, rename and remove a probe file in ``directory``; None when that worked, else why not."""
    name = f".edge-agent-check-{uuid.uuid4().hex}"
    tmp, final = directory / f"{name}.tmp", directory / f"{name}.probe"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        for path in (tmp, final):
            with contextlib.suppress(OSError):
                path.unlink()
    return None


def state_dir(config: Config) -> Finding:
    path = config.state_dir
    try:
        info = path.stat()
    except FileNotFoundError:
        parent = _existing_ancestor(path)
        why = _probe_write(parent) if parent.is_dir() else f"{parent} is not a directory"
        if why is None:
            return Finding(
                "state_dir",
                "warn",
                f"{path} does not exist; the agent creates it (0700) at start",
                f"create it now as the agent's user: install -d -m 0700 {path}",
            )
        return Finding(
            "state_dir",
            "fail",
            f"{path} does not exist and cannot be created in {parent}: {why}",
            f"create it as the agent's user: install -d -m 0700 {path}",
        )
    except OSError as exc:
        return Finding("state_dir", "fail", f"{path} cannot be read: {exc.strerror}", "fix its permissions")
    if not stat.S_ISDIR(info.st_mode):
        return Finding("state_dir", "fail", f"{path} is not a directory", "point state_dir at a directory")
    why = _probe_write(path)
    if why is not None:
        return Finding(
            "state_dir",
            "fail",
            f"{path} is not writable: {why}",
            f"make it writable by the agent's user: chown <user> {path}",
        )
    mode = stat.S_IMODE(info.st_mode)
    warnings = []
    actions = []
    if mode & OTHERS:
        warnings.append(f"mode {mode:04o} lets group/others in; the agent tightens it (and all below) at start")
        actions.append(f"chmod -R go-rwx {path}")
    if info.st_uid != os.geteuid():
        warnings.append(f"owned by {_user(info.st_uid)}, not {_user(os.geteuid())} who runs this check")
        actions.append("run the agent (and this check) as the directory's owner")
    if warnings:
        return Finding("state_dir", "warn", f"{path}: " + "; ".join(warnings), "; ".join(actions))
    return Finding("state_dir", "pass", f"{path}: 0{mode:o}, owned by {_user(info.st_uid)}, writable")


def compile_cache(config: Config) -> Finding:
    path = config.compile_cache_dir or config.state_dir / "compiled"
    if not path.exists():
        parent = _existing_ancestor(path)
        why = _probe_write(parent) if parent.is_dir() else f"{parent} is not a directory"
        if why is None:
            return Finding("compile_cache", "pass", f"{path}: not made yet; the agent creates it (0700) at start")
        return Finding(
            "compile_cache",
            "fail",
            f"{path} cannot be created in {parent}: {why}; the agent will not start",
            "make its parent directory writable by the agent's user, or set compile_cache_dir",
        )
    if not path.is_dir():
        return Finding(
            "compile_cache",
            "fail",
            f"{path} is not a directory; the agent will not start",
            "remove it (the cache is rebuilt), or set compile_cache_dir",
        )
    why = _probe_write(path)
    if why is not None:
        return Finding(
            "compile_cache",
            "warn",
            f"{path}: a compiled module cannot be written ({why}); every load compiles again",
            "make it writable by the agent's user, or free disk space",
        )
    return Finding("compile_cache", "pass", f"{path}: writable (probe written, renamed, removed)")


def _blob_bytes(state: Path) -> int:
    total = 0
    blob_dir = state / "blobs" / "sha256"
    with contextlib.suppress(OSError), os.scandir(blob_dir) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if len(entry.name) == 64 and entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def disk(config: Config) -> Finding:
    from agent.images.settings import CacheSettings

    try:
        budget = CacheSettings.from_config(config).max_bytes
    except AgentError as exc:
        return Finding("disk", "skip", f"not checked: [cache] does not parse ({exc})", "fix [cache] first")
    where = _existing_ancestor(config.state_dir)
    fs = os.statvfs(where)
    free = fs.f_bavail * fs.f_frsize
    used = _blob_bytes(config.state_dir)
    said = f"store {_size(used)}, budget {_size(budget) if budget else 'none'}, {_size(free)} free on {where}"
    if free < MIN_FREE_BYTES:
        return Finding(
            "disk",
            "fail",
            f"{said}: the disk is (nearly) full",
            "free disk space, or run edge-agent cache gc and lower [cache] max_size",
        )
    if budget and used >= budget:
        return Finding(
            "disk",
            "warn",
            f"{said}: the cache budget is full; every pull evicts first, and fails "
            "when only active, previous and pinned versions are left",
            "raise [cache] max_size, or unpin / remove versions (edge-agent cache gc)",
        )
    if budget and free < budget - used:
        return Finding(
            "disk",
            "warn",
            f"{said}: the disk fills before the cache budget does",
            "lower [cache] max_size below the free space, or free disk space",
        )
    if not budget:
        return Finding(
            "disk", "warn", f"{said}: no cache budget; pulls may fill the disk", 'set [cache] max_size (e.g. "4GiB")'
        )
    return Finding("disk", "pass", said)


# -- keys -----------------------------------------------------------------------------------------
def trust_keys(config: Config) -> Finding:
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.images.settings import TrustSettings
    from agent.images.signing import load_public_key

    try:
        trust = TrustSettings.from_config(config)
    except AgentError as exc:
        return Finding("trust_keys", "skip", f"not checked: [trust] does not parse ({exc})", "fix [trust] first")
    if not trust.keys:
        if trust.require_signature:
            return Finding(
                "trust_keys",
                "skip",
                "no [trust.keys]: every image pull is refused (signatures required)",
                "list the fleet's image signing keys in [trust.keys] to pull images",
            )
        return Finding(
            "trust_keys",
            "warn",
            "no [trust.keys] and require_signature = false: unsigned images load",
            "set require_signature = true and list the signing keys in [trust.keys]",
        )
    failures, others, good = [], [], []
    for name, value in sorted(trust.keys.items()):
        try:
            key = load_public_key(name, value).key
        except AgentError as exc:
            failures.append(str(exc))
            continue
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            good.append(name)
        else:
            kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
            others.append(f"{name} ({kind.removeprefix('_')})")
    if failures:
        return Finding(
            "trust_keys",
            "fail",
            "; ".join(failures) + "; the agent will not start",
            "point [trust.keys] at readable PEM public keys (edge-agent keygen / cosign writes them)",
        )
    if others:
        return Finding(
            "trust_keys",
            "warn",
            f"not ECDSA P-256: {', '.join(others)}; accepted, but cosign's default and edge-agent keygen "
            "are P-256 (and fleet commands take P-256 only)",
            "re-key with edge-agent keygen (P-256) unless the publisher signs with this key type",
        )
    note = "" if trust.require_signature else "; require_signature = false: unsigned images load too"
    status: Status = "pass" if trust.require_signature else "warn"
    return Finding(
        "trust_keys",
        status,
        f"{len(good)} readable P-256 key(s): {', '.join(good)}{note}",
        "set [trust] require_signature = true" if note else "",
    )


def fleet_keys(config: Config) -> Finding:
    from agent.mqtt.commands import FleetKeys
    from agent.mqtt.settings import MqttSettings

    try:
        mqtt = MqttSettings.from_config(config)
    except AgentError as exc:
        return Finding("fleet_keys", "skip", f"not checked: [mqtt] does not parse ({exc})", "fix [mqtt] first")
    if not mqtt.enabled:
        return Finding("fleet_keys", "skip", "MQTT is off ([mqtt] host unset): no signed commands to verify")
    missing = [str(p) for p in mqtt.fleet_keys if not p.exists()]
    if missing:
        return Finding(
            "fleet_keys",
            "fail",
            f"mqtt.fleet_keys: {', '.join(missing)} missing",
            "install the fleet's public key(s) there (edge-agent keygen writes fleet.pub)",
        )
    try:
        keys = FleetKeys.load(mqtt.fleet_keys)
    except AgentError as exc:
        return Finding(
            "fleet_keys",
            "fail",
            f"{exc}; the agent will not start",
            "point mqtt.fleet_keys at readable ECDSA P-256 PEM public keys",
        )
    if not len(keys):
        return Finding(
            "fleet_keys",
            "warn",
            "no fleet key found: the node refuses every command",
            "list the fleet's P-256 public keys (files, or directories of *.pem/*.pub) in mqtt.fleet_keys",
        )
    listed = ", ".join(f"{Path(k.name).name} ({k.key_id})" for k in keys.keys)
    return Finding("fleet_keys", "pass", f"{len(keys)} P-256 key(s): {listed}")


# -- GPU ------------------------------------------------------------------------------------------
def gpu(config: Config, nvml_module: Any = None) -> Finding:
    try:
        settings = GpuSettings.from_config(config)
    except AgentError as exc:
        return Finding("gpu", "skip", f"not checked: [gpu] does not parse ({exc})", "fix [gpu] first")
    if not settings.enabled:
        return Finding("gpu", "skip", "[gpu] enabled = false: no GPU is probed or used")
    nvml = nvml_module
    if nvml is None:
        try:
            import pynvml

            nvml = pynvml
        except ImportError:
            return Finding(
                "gpu",
                "warn",
                "no NVML: nvidia-ml-py is not installed; models run on the CPU",
                "install nvidia-ml-py for GPU nodes; on a CPU-only node set [gpu] enabled = false",
            )
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return Finding(
            "gpu",
            "warn",
            f"no NVML ({exc}): no GPU is used, models run on the CPU",
            "install the NVIDIA driver on a GPU node; on a CPU-only node set [gpu] enabled = false",
        )
    try:
        driver = nvml.nvmlSystemGetDriverVersion()
        devices = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(f"{i}: {name} ({_size(memory.free)} free of {_size(memory.total)})")
    except nvml.NVMLError as exc:
        return Finding(
            "gpu",
            "fail",
            f"NVML answers but a device cannot be read: {exc}",
            "check the driver (nvidia-smi); the agent would offer no GPU",
        )
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
    if not devices:
        return Finding(
            "gpu",
            "warn",
            f"NVML (driver {driver}) finds no device",
            "check nvidia-smi and the container's device access; on a CPU node set [gpu] enabled = false",
        )
    return Finding("gpu", "pass", f"NVML, driver {driver}: " + "; ".join(devices))


# -- addresses and the token ----------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _agent_answers(host: str, port: int) -> bool:
    """Whether an edge-agent's API answers on that address (the agent running now holds the port)."""
    import http.client

    target = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    conn = http.client.HTTPConnection(target, port, timeout=3)
    try:
        conn.request("GET", "/v2/health/live")
        resp = conn.getresponse()
        resp.read()
        return resp.status in (200, 503)
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _bind_problem(host: str, port: int) -> tuple[str, int] | None:
    """None when ``host:port`` can be bound now, else (why, errno)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"{host} does not resolve: {exc.strerror}", errno.EADDRNOTAVAIL
    sockaddr = infos[0][4]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the servers bind: SO_REUSEADDR, so a port in TIME_WAIT is not taken for one in use.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            return exc.strerror or str(exc), exc.errno or 0
    return None


def listen(config: Config) -> Finding:
    addresses = [("listen", *config.host_port)]
    grpc = config.grpc_host_port
    if grpc is not None:
        addresses.append(("grpc_listen", *grpc))
    said, fails, exposed = [], [], []
    agent_running = False
    for setting, host, port in addresses:
        shown = f"{setting} {host}:{port}"
        if not _is_loopback(host):
            exposed.append(setting)
        if port == 0:
            said.append(f"{shown} (a free port is picked)")
            continue
        problem = _bind_problem(host, port)
        if problem is None:
            said.append(f"{shown} free")
        elif problem[1] == errno.EADDRINUSE and setting == "listen" and _agent_answers(host, port):
            agent_running = True
            said.append(f"{shown} held by a running edge-agent")
        elif problem[1] == errno.EADDRINUSE and agent_running:
            # gRPC speaks no HTTP/1.1 to ask; with the agent answering on listen, the port is taken to be its own.
            said.append(f"{shown} in use (the running agent's, presumably)")
        else:
            fails.append(f"{shown} cannot be bound: {problem[0]}")
    if fails:
        return Finding(
            "listen",
            "fail",
            "; ".join(fails + said),
            "stop what holds the port, or pick another address (listen, grpc_listen)",
        )
    note = ""
    if exposed:
        note = (
            f"; {', '.join(exposed)} reachable from the network: inference needs no token, "
            "the control API needs the token"
        )
        if "grpc_listen" in exposed and config.grpc_tls_cert is None:
            return Finding(
                "listen",
                "warn",
                "; ".join(said) + note + "; gRPC is served without TLS",
                "set grpc_tls_cert and grpc_tls_key, or bind gRPC to 127.0.0.1",
            )
    return Finding("listen", "pass", "; ".join(said) + note)


def api_token(config: Config) -> Finding:
    host, _ = config.host_port
    public = not _is_loopback(host)
    if config.api_token:
        length = len(config.api_token)
        if length < MIN_TOKEN_CHARS:
            status: Status = "fail" if public else "warn"
            where = f"on {config.listen}, reachable from the network" if public else "on loopback"
            return Finding(
                "api_token",
                status,
                f"api_token is {length} characters ({where}): guessable",
                f"use a random token of {MIN_TOKEN_CHARS}+ characters, or unset api_token to have the agent make one",
            )
        return Finding("api_token", "pass", f"the control API needs the configured api_token ({length} characters)")
    path = apitoken.token_path(config.state_dir)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return Finding("api_token", "pass", f"the control API needs a token; the agent makes {path} (0600) at start")
    except OSError as exc:
        return Finding("api_token", "fail", f"{path} cannot be read: {exc.strerror}", "fix its permissions")
    if not stat.S_ISREG(info.st_mode):
        return Finding(
            "api_token",
            "fail",
            f"{path} is not a regular file: the agent refuses it and will not start",
            f"remove it; the agent makes a fresh token at start ({path})",
        )
    try:
        text = path.read_bytes()[: apitoken.MAX_TOKEN_FILE_BYTES + 1].decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        return Finding(
            "api_token",
            "fail",
            f"{path} cannot be read as a token: {exc}",
            "remove it; the agent makes a fresh token at start",
        )
    if info.st_size > apitoken.MAX_TOKEN_FILE_BYTES or not text:
        return Finding("api_token", "fail", f"{path} holds no usable token", "remove it; the agent makes a fresh one")
    if stat.S_IMODE(info.st_mode) & OTHERS:
        return Finding(
            "api_token",
            "warn",
            f"{path} is mode {stat.S_IMODE(info.st_mode):04o}: others may read the token "
            "(the agent makes it 0600 at start)",
            f"chmod 0600 {path}",
        )
    return Finding("api_token", "pass", f"the control API needs the token in {path} (0600)")
