"""systemd/edge-agent.service: what it must say, checked by systemd's own tools where they are installed.

``systemd-analyze verify`` needs the ExecStart binary to exist, so the checks
run on a copy of the unit whose ExecStart points at this checkout's
``edge-agent`` (the installed unit names /opt/edge-agent/bin/edge-agent).

No systemd runs as PID 1 here, so the unit cannot be started; the part of its
sandbox most likely to break the agent, the system call filter, is applied to
a real ``edge-agent run`` with libseccomp, from the list systemd itself
expands for the unit's ``SystemCallFilter=`` lines.
"""

from __future__ import annotations

import ctypes.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "edge-agent.service"
SYSUSERS = REPO / "systemd" / "edge-agent.sysusers"
MAX_EXPOSURE = 2.5

needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def directives(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, every value of a repeated key, comments and sections dropped."""
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_unit_says_what_the_deployment_needs() -> None:
    unit = directives(UNIT)

    def one(key: str) -> str:
        assert key in unit, f"{key}= missing"
        return unit[key][-1]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("Restart") == "on-failure"
    assert re.fullmatch(r"\d+s?", one("WatchdogSec")) and int(one("WatchdogSec").rstrip("s")) >= 10
    for key in ("StateDirectory", "CacheDirectory", "ConfigurationDirectory"):
        assert one(key) == "edge-agent"
    assert one("User") == "edge-agent" or one("DynamicUser") == "yes"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert one(key) == "yes", key
    assert one("ProtectSystem") == "strict"
    assert one("CapabilityBoundingSet") == "", "an empty capability set"
    assert set(one("RestrictAddressFamilies").split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "@system-service" in unit["SystemCallFilter"]
    # The wasm JIT maps the code it compiles executable: W^X would break every model load.
    assert one("MemoryDenyWriteExecute") == "no"
    # A bad config (EX_CONFIG) does not heal by restarting.
    assert one("RestartPreventExitStatus") == "78"
    assert one("ExecStart").split()[1:] == ["run"]


@pytest.fixture
def local_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's console script."""
    exe = Path(sys.executable).with_name("edge-agent")
    if not exe.exists():
        pytest.skip(f"{exe} is not installed (pip install -e .)")
    text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={exe}", UNIT.read_text())
    copy = tmp_path / "edge-agent.service"
    copy.write_text(text)
    return copy


@needs_systemd
def test_systemd_analyze_verify_passes(local_unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(local_unit)], capture_output=True, text=True, timeout=60, check=False
    )
    # verify also reports problems of unrelated units on the machine; only ours count.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "edge-agent" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


@needs_systemd
def test_systemd_analyze_security_rates_the_unit_well(local_unit: Path) -> None:
    exposure = security_exposure(local_unit)
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}"


@needs_systemd
def test_the_documented_gpu_drop_in_keeps_the_unit_within_bounds(local_unit: Path) -> None:
    """docs/DEPLOY.md's drop-in for a GPU node, applied the way systemd applies a drop-in."""
    doc = (REPO / "docs" / "DEPLOY.md").read_text()
    section = doc[doc.index("### A node with a GPU") :]
    drop_in = re.search(r"```ini\n(.*?)```", section, re.S)
    assert drop_in, "the GPU drop-in is documented"
    # Later [Service] lines override earlier ones, as a drop-in's do.
    merged = local_unit.read_text().replace("[Install]", drop_in.group(1) + "\n[Install]")
    assert "PrivateDevices=no" in merged
    local_unit.write_text(merged)
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(local_unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert verify.returncode == 0 and "edge-agent" not in verify.stderr, verify.stderr
    exposure = security_exposure(local_unit)
    assert exposure <= MAX_EXPOSURE


def security_exposure(unit: Path) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for edge-agent\.service: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers not installed")
def test_sysusers_creates_a_system_account_without_a_login(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, timeout=60, check=True
    )
    entry = next(
        line for line in (tmp_path / "etc" / "passwd").read_text().splitlines() if line.startswith("edge-agent:")
    )
    _name, _, uid, _gid, _gecos, home, shell = entry.split(":")
    assert int(uid) < 1000, "a system account"
    assert shell == "/usr/sbin/nologin"
    assert home == "/var/lib/edge-agent"


# -- the agent inside the unit's system call filter ------------------------------------------

# Loads the allow-list into the kernel with libseccomp (systemd does the same,
# with EPERM for the rest as SystemCallErrorNumber= says), shows that it holds
# by trying a @privileged call, then becomes the agent.
SECCOMP_EXEC = r"""
import ctypes, ctypes.util, errno, os, sys
lib = ctypes.CDLL(ctypes.util.find_library("seccomp"), use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ctx = lib.seccomp_init(0x00050000 | errno.EPERM)
for name in open(sys.argv[1]).read().split():
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr >= 0:
        lib.seccomp_rule_add(ctx, 0x7FFF0000, nr, 0)
assert lib.seccomp_load(ctx) == 0
try:
    os.setuid(os.getuid())
    print("setuid allowed", flush=True)
except PermissionError:
    print("setuid refused", flush=True)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def expand(group: str, seen: set[str] | None = None) -> set[str]:
    """A systemd syscall group to system call names, nested groups included."""
    seen = seen if seen is not None else set()
    if group in seen:
        return set()
    seen.add(group)
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager", group], capture_output=True, text=True, check=True
    ).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.split("#")[0].strip()
        if word.startswith("@"):
            names |= expand(word, seen)
        elif word:
            names.add(word)
    return names


def unit_syscall_allow_list() -> set[str]:
    allowed: set[str] = set()
    denied: set[str] = set()
    for value in directives(UNIT)["SystemCallFilter"]:
        target, value = (denied, value[1:]) if value.startswith("~") else (allowed, value)
        for item in value.split():
            target |= expand(item) if item.startswith("@") else {item}
    return allowed - denied


@needs_systemd
@pytest.mark.skipif(ctypes.util.find_library("seccomp") is None, reason="libseccomp not installed")
def test_the_agent_compiles_and_serves_inside_the_units_system_call_filter(tmp_path: Path) -> None:
    from conftest import free_port, http

    allowed = unit_syscall_allow_list()
    assert "setuid" not in allowed and "mprotect" in allowed
    names = tmp_path / "allowed.txt"
    names.write_text("\n".join(sorted(allowed)))
    port = free_port()
    log = tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    argv = ["-m", "agent", "run", "--state-dir", str(tmp_path / "state"), "--listen", f"127.0.0.1:{port}"]
    argv += ["--grpc-listen", "127.0.0.1:0"]  # the default gRPC port is one per machine
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SECCOMP_EXEC, str(names), *argv], stdout=out, stderr=subprocess.STDOUT, env=env
        )
        try:
            deadline = time.monotonic() + 60  # a hang guard: the first start compiles under the filter
            while http_status(http, f"http://127.0.0.1:{port}/v2/health/ready") != 200:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            # A fresh state directory: the bundled model was compiled by the JIT
            # under the filter, not deserialized.
            body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
            status, reply = http("POST", f"http://127.0.0.1:{port}/v2/models/digits/infer", body)
            assert status == 200, reply
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    text = log.read_text()
    assert "setuid refused" in text, "the filter was in force"
    assert list((tmp_path / "state" / "compiled").iterdir()), "compiled in the sandbox"


def http_status(http: Any, url: str) -> int:
    try:
        return http("GET", url, timeout=1)[0]
    except OSError:
        return 0
