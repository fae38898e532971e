"""``edge-agent check`` against a real node set-up: mosquitto over mutual TLS, a TLS registry, keys, a state dir.

A healthy set-up exits 0; each fault the check reports (broker down, wrong CA, an unreadable key, a
non-P-256 trust key, a skewed clock published by the fleet through the broker, a full cache budget,
an unknown config key, loose state directory permissions) gives the right check its status and the
run its exit code (0 ok, 1 warnings, 2 failures).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from images_fixtures import HTPASSWD, PASSWORD, REGISTRY_BIN, USER, make_keypair, running_registry
from images_fixtures import make_cert as make_registry_cert
from mqtt_fixtures import HANG_S, TlsFiles, fleet_keypair, make_tls, needs_mosquitto, running_broker
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from ports import free_port

from agent.check import config_checks
from agent.cli import main

AGENT_DIR = Path(__file__).resolve().parent.parent / "agent"
needs_registry = pytest.mark.skipif(not os.path.exists(REGISTRY_BIN), reason="docker-registry is not installed")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The check loads the config as `edge-agent run` does, environment included: keep this machine's out.
    for name in list(os.environ):
        if name.startswith("EDGE_AGENT_") or name in ("STATE_DIRECTORY", "CACHE_DIRECTORY", "CONFIGURATION_DIRECTORY"):
            monkeypatch.delenv(name)


# -- helpers ----------------------------------------------------------------------------------------
def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    lines: list[str] = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines += [f"{json.dumps(k) if '.' in k or ':' in k else k} = {_toml(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def check(config: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, dict[str, dict[str, Any]]]:
    """Run ``edge-agent check --json``; the exit code and each check by name."""
    started = time.monotonic()
    code = main(["check", "--config", str(config), "--json", "--timeout", "20", *extra])
    assert time.monotonic() - started < HANG_S, "the check run is bounded by its timeout"
    doc = json.loads(capsys.readouterr().out)
    assert doc["exit_code"] == code
    return code, {c["name"]: c for c in doc["checks"]}


def publish_clock(broker_port: int, tls: TlsFiles | None, payload: dict[str, Any], expiry_s: int | None) -> None:
    """What the fleet's tooling does: a retained clock message, with a message expiry the broker counts down."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fleet-clock-{free_port()}", protocol=paho.MQTTv5)
    if tls is not None:
        client.tls_set(ca_certs=str(tls.ca), certfile=str(tls.client_cert), keyfile=str(tls.client_key))
    client.connect("localhost", broker_port)
    client.loop_start()
    try:
        props = Properties(PacketTypes.PUBLISH)
        if expiry_s is not None:
            props.MessageExpiryInterval = expiry_s
        info = client.publish("edge/fleet/clock", json.dumps(payload), qos=1, retain=True, properties=props)
        info.wait_for_publish(HANG_S)
    finally:
        client.loop_stop()
        client.disconnect()


@dataclass
class Node:
    """A healthy node's files and services; ``tables`` is its config, which a test may spoil before writing."""

    root: Path
    state: Path
    tables: dict[str, dict[str, Any]]
    tls: TlsFiles
    broker_port: int
    registry_host: str

    def config(self, name: str = "config.toml") -> Path:
        return write_config(self.root / name, self.tables)


@pytest.fixture
def node(tmp_path: Path) -> Any:
    if not os.path.exists(REGISTRY_BIN):
        pytest.skip("docker-registry is not installed")
    if not os.path.exists("/usr/sbin/mosquitto"):
        pytest.skip("mosquitto (Debian package mosquitto) is not installed")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    tls = make_tls(tmp_path / "tls", client_cn="edge-17")
    _, fleet_pub = fleet_keypair(tmp_path / "fleet")
    release = make_keypair(tmp_path, "release")
    reg_ca = make_registry_cert("check-registry-ca", ca=True)
    reg_ca_path, _ = reg_ca.write(tmp_path, "registry-ca")
    reg_cert = make_registry_cert("127.0.0.1", reg_ca, ip="127.0.0.1")
    with (
        running_broker(tmp_path / "broker", tls=tls) as broker,
        running_registry(tmp_path / "registry", tls=reg_cert) as registry,
    ):
        tables = {
            "agent": {
                "state_dir": state,
                "listen": f"127.0.0.1:{free_port()}",
                "grpc_listen": "off",
                "node_id": "edge-17",
            },
            "mqtt": {
                "host": "localhost",
                "port": broker.port,
                "ca_file": tls.ca,
                "cert_file": tls.client_cert,
                "key_file": tls.client_key,
                "fleet_keys": [str(fleet_pub)],
            },
            f'registry.hosts."{registry.host}"': {"ca_file": reg_ca_path},
            "trust": {"require_signature": True},
            "trust.keys": {"release": release.public_path},
            "trust.scopes": {f"{registry.host}/models": ["release"]},
            "cache": {"max_size": "100MiB"},
            # This test machine has no GPU: a CPU node says so, and the check skips NVML.
            "gpu": {"enabled": False},
        }
        publish_clock(broker.port, tls, {"ts": time.time(), "expiry_s": 600}, expiry_s=600)
        yield Node(tmp_path, state, tables, tls, broker.port, registry.host)


# -- a healthy node -----------------------------------------------------------------------------------
@needs_mosquitto
@needs_registry
def test_healthy_node_passes_every_check(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    code, checks = check(node.config(), capsys)
    assert code == 0, [c for c in checks.values() if c["status"] not in ("pass", "skip")]
    for name in ("config", "state_dir", "compile_cache", "disk", "trust_keys", "fleet_keys", "listen", "api_token"):
        assert checks[name]["status"] == "pass", checks[name]
    assert checks["broker"]["status"] == "pass"
    assert "TLS + client certificate" in checks["broker"]["finding"]
    assert checks["clock"]["status"] == "pass", checks["clock"]
    assert checks[f"registry {node.registry_host}"]["status"] == "pass"
    assert checks["gpu"]["status"] == "skip"
    # The probes leave nothing behind, and create nothing the agent would.
    assert sorted(p.name for p in node.state.iterdir()) == []


@needs_mosquitto
@needs_registry
def test_human_output_is_an_aligned_table_with_a_summary(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", "--config", str(node.config()), "--timeout", "20"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split() == ["STATUS", "CHECK", "FINDING"]
    rows = [line for line in out[1:] if line[:6].strip() in ("PASS", "WARN", "FAIL", "SKIP")]
    finding_col = out[0].index("FINDING")
    assert all(len(row) > finding_col and row[finding_col - 2 : finding_col] == "  " for row in rows)
    assert re.fullmatch(r"ok: \d+ passed, 0 warning\(s\), 0 failure\(s\), \d+ skipped", out[-1])


# -- the broker -------------------------------------------------------------------------------------
@needs_mosquitto
@needs_registry
def test_broker_down_fails(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    node.tables["mqtt"]["port"] = free_port()  # nothing listens there
    code, checks = check(node.config(), capsys)
    assert code == 2
    assert checks["broker"]["status"] == "fail"
    assert "nothing accepts connections" in checks["broker"]["finding"]
    assert "start the broker" in checks["broker"]["action"]
    assert checks["clock"]["status"] == "skip"


@needs_mosquitto
@needs_registry
def test_wrong_broker_ca_fails(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    other = make_tls(node.root / "other-tls", client_cn="edge-17")
    node.tables["mqtt"]["ca_file"] = other.ca
    code, checks = check(node.config(), capsys)
    assert code == 2
    assert checks["broker"]["status"] == "fail"
    assert "not trusted" in checks["broker"]["finding"]
    assert "mqtt.ca_file" in checks["broker"]["action"]


@needs_mosquitto
@needs_registry
def test_client_certificate_from_another_ca_is_refused(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    node.tables["mqtt"]["cert_file"] = node.tls.rogue_cert
    node.tables["mqtt"]["key_file"] = node.tls.rogue_key
    code, checks = check(node.config(), capsys)
    assert code == 2
    assert checks["broker"]["status"] == "fail", checks["broker"]


def test_broker_that_never_answers_is_bounded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A listening socket that never accepts: TCP completes from the backlog, the CONNACK never comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        config = write_config(
            tmp_path / "c.toml",
            {
                "agent": {"state_dir": tmp_path / "state", "grpc_listen": "off"},
                "mqtt": {"host": "127.0.0.1", "port": port},
            },
        )
        started = time.monotonic()
        code = main(["check", "--config", str(config), "--json", "--timeout", "2"])
        elapsed = time.monotonic() - started
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert code == 2
    assert checks["broker"]["status"] == "fail"
    assert elapsed < HANG_S


# -- the clock ----------------------------------------------------------------------------------------
@needs_mosquitto
@needs_registry
@pytest.mark.parametrize(("offset_s", "status"), [(-1000.0, "fail"), (1000.0, "fail"), (120.0, "warn")])
def test_skewed_clock_from_the_fleet_clock_message(
    node: Node, capsys: pytest.CaptureFixture[str], offset_s: float, status: str
) -> None:
    # The fleet's clock is offset_s ahead of this node's: as if this node's clock were offset_s behind.
    publish_clock(node.broker_port, node.tls, {"ts": time.time() + offset_s, "expiry_s": 600}, expiry_s=600)
    code, checks = check(node.config(), capsys)
    assert checks["clock"]["status"] == status, checks["clock"]
    assert code == (2 if status == "fail" else 1)
    assert ("behind" if offset_s > 0 else "ahead") in checks["clock"]["finding"]
    assert "timedatectl" in checks["clock"]["action"]


@needs_mosquitto
@needs_registry
def test_clock_message_age_is_taken_from_its_expiry(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    # Published "400 s ago" by the expiry's count: the broker says 200 of its 600 s are left. Without the
    # age the 400 s old timestamp would read as a fail; with it the clocks agree.
    publish_clock(node.broker_port, node.tls, {"ts": time.time() - 400, "expiry_s": 600}, expiry_s=200)
    code, checks = check(node.config(), capsys)
    assert checks["clock"]["status"] == "pass", checks["clock"]
    assert code == 0


@needs_mosquitto
@needs_registry
def test_no_fleet_clock_is_skipped(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    node.tables["mqtt"]["topic_prefix"] = "elsewhere"  # a prefix the clock was not published under
    code, checks = check(node.config(), capsys)
    assert code == 0
    assert checks["clock"]["status"] == "skip"
    assert "elsewhere/fleet/clock" in checks["clock"]["finding"]


# -- registries ---------------------------------------------------------------------------------------
@needs_mosquitto
@needs_registry
def test_registry_with_wrong_ca_fails(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    other = make_registry_cert("another-ca", ca=True)
    other_path, _ = other.write(node.root, "other-ca")
    node.tables[f'registry.hosts."{node.registry_host}"']["ca_file"] = other_path
    code, checks = check(node.config(), capsys)
    assert code == 2
    found = checks[f"registry {node.registry_host}"]
    assert found["status"] == "fail"
    assert "not trusted" in found["finding"]
    assert "ca_file" in found["action"]


# -- keys ---------------------------------------------------------------------------------------------
@needs_mosquitto
@needs_registry
def test_unreadable_keys_fail(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    # Tests run as root, which reads a 0000 file: garbage and a directory are what no one can use.
    garbage = node.root / "garbage.pub"
    garbage.write_bytes(b"\x00\x01 not a key")
    node.tables["trust.keys"]["release"] = node.root  # a directory
    node.tables["mqtt"]["fleet_keys"] = [str(garbage)]
    node.tables["mqtt"]["key_file"] = garbage
    code, checks = check(node.config(), capsys)
    assert code == 2
    assert checks["trust_keys"]["status"] == "fail"
    assert "cannot read" in checks["trust_keys"]["finding"]
    assert checks["fleet_keys"]["status"] == "fail"
    assert "not a PEM public key" in checks["fleet_keys"]["finding"]
    assert checks["broker"]["status"] == "fail"
    assert "TLS files cannot be used" in checks["broker"]["finding"]


def _public_pem(path: Path, key: Any) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return path


@needs_mosquitto
@needs_registry
def test_non_p256_trust_keys(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    # P-384: the agent accepts it for images (cosign does), the check says it is not the P-256 norm.
    node.tables["trust.keys"]["release"] = _public_pem(node.root / "p384.pub", ec.generate_private_key(ec.SECP384R1()))
    code, checks = check(node.config("p384.toml"), capsys)
    assert code == 1
    assert checks["trust_keys"]["status"] == "warn"
    assert "SECP384R1" in checks["trust_keys"]["finding"].upper()
    # secp256k1: a curve cosign does not use, which the agent refuses at start.
    node.tables["trust.keys"]["release"] = _public_pem(node.root / "k1.pub", ec.generate_private_key(ec.SECP256K1()))
    code, checks = check(node.config("k1.toml"), capsys)
    assert code == 2
    assert checks["trust_keys"]["status"] == "fail"
    assert "secp256k1" in checks["trust_keys"]["finding"]


# -- disk and the cache budget ---------------------------------------------------------------------------
def test_full_cache_budget_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    blobs = state / "blobs" / "sha256"
    blobs.mkdir(parents=True, mode=0o700)
    state.chmod(0o700)
    (blobs / ("ab" * 32)).write_bytes(b"x" * 8192)
    config = write_config(
        tmp_path / "c.toml",
        {
            "agent": {"state_dir": state, "grpc_listen": "off", "listen": f"127.0.0.1:{free_port()}"},
            "cache": {"max_size": "4KiB"},
            "gpu": {"enabled": False},
        },
    )
    code, checks = check(config, capsys)
    assert checks["disk"]["status"] == "warn", checks["disk"]
    assert "budget is full" in checks["disk"]["finding"]
    assert "8.0 KiB" in checks["disk"]["finding"]
    assert code == 1


# -- the configuration ---------------------------------------------------------------------------------
def _local(tmp_path: Path, tables: dict[str, dict[str, Any]]) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    base = {
        "agent": {"state_dir": state, "grpc_listen": "off", "listen": f"127.0.0.1:{free_port()}"},
        "gpu": {"enabled": False},
        # Small, so a test machine with little free disk is not told its disk is smaller than the budget.
        "cache": {"max_size": "16MiB"},
    }
    for table, values in tables.items():
        base.setdefault(table, {}).update(values)
    return write_config(tmp_path / "c.toml", base)


def test_minimal_local_node_is_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, checks = check(_local(tmp_path, {}), capsys)
    assert code == 0, [c for c in checks.values() if c["status"] not in ("pass", "skip")]
    assert checks["broker"]["status"] == "skip"


def test_unknown_key_in_a_section_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, checks = check(_local(tmp_path, {"mqtt": {"hots": "broker.local"}}), capsys)
    assert code == 2
    assert checks["config"]["status"] == "fail"
    assert "unknown mqtt setting(s): hots" in checks["config"]["finding"]


def test_unknown_core_key_fails_and_skips_the_rest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, checks = check(_local(tmp_path, {"agent": {"listn": "0.0.0.0:80"}}), capsys)
    assert code == 2
    assert checks["config"]["status"] == "fail"
    assert "listn" in checks["config"]["finding"]
    assert {c["status"] for name, c in checks.items() if name != "config"} == {"skip"}


def test_unknown_section_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, checks = check(_local(tmp_path, {"mqqt": {"host": "broker.local"}}), capsys)
    assert code == 1
    assert checks["config"]["status"] == "warn"
    assert "[mqqt]" in checks["config"]["finding"]


def test_known_sections_are_every_section_the_agent_reads() -> None:
    read = set()
    for path in AGENT_DIR.rglob("*.py"):
        if "check" in path.relative_to(AGENT_DIR).parts:
            continue
        read.update(re.findall(r"""\.section\(\s*["']([a-z0-9_]+)["']\s*\)""", path.read_text()))
    assert read == set(config_checks.known_sections())


# -- the state directory ---------------------------------------------------------------------------------
def test_loose_state_dir_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _local(tmp_path, {})
    (tmp_path / "state").chmod(0o755)
    code, checks = check(config, capsys)
    assert code == 1
    assert checks["state_dir"]["status"] == "warn"
    assert "0755" in checks["state_dir"]["finding"]
    assert "chmod -R go-rwx" in checks["state_dir"]["action"]
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o755, "the check changes nothing"


def test_state_dir_that_is_a_file_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _local(tmp_path, {})
    (tmp_path / "state").rmdir()
    (tmp_path / "state").write_text("not a directory")
    code, checks = check(config, capsys)
    assert code == 2
    assert checks["state_dir"]["status"] == "fail"


# -- addresses and the token ---------------------------------------------------------------------------
def test_listen_address_in_use_fails_and_short_public_token_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, checks = check(_local(tmp_path, {"agent": {"listen": f"127.0.0.1:{port}"}}), capsys)
    assert code == 2
    assert checks["listen"]["status"] == "fail"
    code, checks = check(_local(tmp_path, {"agent": {"listen": f"0.0.0.0:{free_port()}", "api_token": "abc"}}), capsys)
    assert checks["api_token"]["status"] == "fail"
    assert "reachable from the network" in checks["api_token"]["finding"]
    assert "reachable from the network" in checks["listen"]["finding"]


def test_json_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["check", "--config", str(_local(tmp_path, {})), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"status", "exit_code", "summary", "checks"}
    assert doc["status"] in ("pass", "warn", "fail")
    assert set(doc["summary"]) == {"pass", "warn", "fail", "skip"}
    assert sum(doc["summary"].values()) == len(doc["checks"])
    for item in doc["checks"]:
        assert set(item) == {"name", "status", "finding", "action", "elapsed_s"}
        assert item["status"] in ("pass", "warn", "fail", "skip")
        assert isinstance(item["finding"], str) and item["finding"]
    names = [c["name"] for c in doc["checks"]]
    assert names[:2] == ["config", "state_dir"]
    assert {"broker", "clock", "gpu", "disk", "listen", "api_token", "trust_keys", "fleet_keys"} <= set(names)


@needs_registry
@pytest.mark.parametrize(
    ("credentials", "status"),
    [
        (None, "fail"),
        ({"username": USER, "password": "wrong"}, "fail"),
        ({"username": USER, "password": PASSWORD}, "pass"),
    ],
)
def test_registry_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], credentials: dict[str, str] | None, status: str
) -> None:
    if HTPASSWD is None:
        pytest.skip("htpasswd (Debian package apache2-utils) is not installed")
    with running_registry(tmp_path / "registry", htpasswd=True) as registry:
        host_table = {"plain_http": True, **(credentials or {})}
        config = _local(tmp_path, {f'registry.hosts."{registry.host}"': host_table})
        code, checks = check(config, capsys)
    found = checks[f"registry {registry.host}"]
    assert found["status"] == status, found
    if status == "fail":
        assert "username and password_file" in found["action"]
    assert code == (0 if status == "pass" else 2)


def test_check_beside_a_running_agent(tmp_path: Path, agent_process: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """The agent holds its port and has made its token: the check says so rather than failing on them."""
    proc = agent_process(state_dir=tmp_path / "state", extra=["--grpc-listen", "off", "--no-seed"])
    proc.wait_ready()
    try:
        config = write_config(
            tmp_path / "c.toml",
            {
                "agent": {"state_dir": tmp_path / "state", "listen": f"127.0.0.1:{proc.port}", "grpc_listen": "off"},
                "gpu": {"enabled": False},
            },
        )
        code, checks = check(config, capsys)
    finally:
        assert proc.terminate() == 0
    assert checks["listen"]["status"] == "pass", checks["listen"]
    assert "held by a running edge-agent" in checks["listen"]["finding"]
    assert checks["api_token"]["status"] == "pass"
    assert "api-token" in checks["api_token"]["finding"]
    assert checks["state_dir"]["status"] == "pass"
    assert code == 0, [c for c in checks.values() if c["status"] not in ("pass", "skip")]


@needs_mosquitto
@pytest.mark.parametrize(("password", "status"), [("right-pass", "pass"), ("wrong-pass", "fail")])
def test_broker_password_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], password: str, status: str) -> None:
    password_file = tmp_path / "mqtt-password"
    password_file.write_text(password + "\n")
    with running_broker(tmp_path / "broker", passwords={"edge-17": "right-pass"}) as broker:
        config = _local(
            tmp_path,
            {"mqtt": {"host": "127.0.0.1", "port": broker.port, "username": "edge-17", "password_file": password_file}},
        )
        code, checks = check(config, capsys)
    if status == "pass":
        # Connected, but a password over plain TCP is a warning of its own.
        assert checks["broker"]["status"] == "warn", checks["broker"]
        assert "in clear" in checks["broker"]["finding"]
        assert code == 1
    else:
        assert checks["broker"]["status"] == "fail", checks["broker"]
        assert "refused the credentials" in checks["broker"]["finding"]
        assert "password_file" in checks["broker"]["action"]
        assert code == 2
