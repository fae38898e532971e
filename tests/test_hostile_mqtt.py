"""The fleet channel against hostile senders, with a real Mosquitto and its command-line clients as the peer.

A command names where its reply goes (the MQTT v5 response topic). A sender
must not be able to make the node publish into the fleet's own topic tree —
onto its retained state, into another node's commands — so refusals go only
to the node's own replies topic, and a response topic inside the agent's
tree is never honoured, even for a valid command. Also: the wire code of a
refused ``set-config``, and the last will's timestamp.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROLLBACK_GRACE_S
from cryptography.hazmat.primitives.asymmetric import ec
from mqtt_fixtures import (
    MOSQUITTO_PUB,
    MOSQUITTO_SUB,
    Broker,
    Cable,
    fleet_keypair,
    needs_mosquitto,
    running_broker,
    wait_until,
)

from agent.mqtt.commands import new_command, sign_command
from agent.wiring import attach_lifecycle, attach_mqtt

pytestmark = needs_mosquitto
NODE = "n1"
REPLIES = f"edge/nodes/{NODE}/replies"


@pytest.fixture(scope="module")
def fleet_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    return fleet_keypair(tmp_path_factory.mktemp("fleet"))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with running_broker(tmp_path / "broker") as b:
        yield b


def mqtt_agent(make_agent: Any, port: int, pub: Path, **mqtt: Any) -> Any:
    def setup(agent: Any) -> None:
        agent.config.sections["mqtt"] = {
            "host": "127.0.0.1",
            "port": port,
            "fleet_keys": [str(pub)],
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
            **mqtt,
        }
        agent.config.sections["telemetry"] = {"interval_s": 3600, "gpu": False}
        attach_lifecycle(agent, rollback_grace_s=ROLLBACK_GRACE_S)
        attach_mqtt(agent)

    return make_agent(setup=setup, node_id=NODE)


class Sub:
    """``mosquitto_sub -V 5 -t '#'``: every message on the broker, kept as (topic, correlation data, payload)."""

    def __init__(self, port: int):
        args = [MOSQUITTO_SUB, "-V", "5", "-p", str(port), "-q", "1", "-t", "#", "-F", "%t\t%D\t%p"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.messages: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        # mosquitto_sub says nothing once subscribed: a message of our own on a probe topic tells us.
        probe = f"probe/{uuid.uuid4().hex}"
        wait_until(lambda: pub(port, probe, "probe") or self.on(probe), 10, "mosquitto_sub to subscribe", 0.2)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            topic, corr, payload = line.rstrip("\n").split("\t", 2)
            with self.lock:
                self.messages.append((topic, corr, payload))

    def on(self, topic: str) -> list[tuple[str, str, str]]:
        with self.lock:
            return [m for m in self.messages if m[0] == topic]

    def reply(self, corr: str, timeout: float = 15) -> tuple[str, dict[str, Any]]:
        """The (topic, document) of the first reply carrying ``corr``."""

        def find() -> Any:
            with self.lock:
                for topic, c, payload in self.messages:
                    if c == corr and _is_reply(payload):
                        return topic, json.loads(payload)
            return None

        return wait_until(find, timeout, f"the reply with correlation {corr}")

    def replies_elsewhere(self) -> list[tuple[str, str, str]]:
        """Replies from the node anywhere but on its own replies topic (and the allowed ones given)."""
        with self.lock:
            return [m for m in self.messages if _is_reply(m[2]) and m[0] != REPLIES]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _is_reply(payload: str) -> bool:
    try:
        doc = json.loads(payload)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("node") == NODE and "ok" in doc


def pub(
    port: int, topic: str, payload: str | bytes, response_topic: str | None = None, corr: str | None = None
) -> None:
    text = payload.decode() if isinstance(payload, bytes) else payload
    args = [MOSQUITTO_PUB, "-V", "5", "-p", str(port), "-q", "1", "-t", topic, "-m", text]
    if response_topic is not None:
        args += ["-D", "publish", "response-topic", response_topic]
    if corr is not None:
        args += ["-D", "publish", "correlation-data", corr]
    subprocess.run(args, check=True, timeout=10)


def wait_online(sub: Sub) -> None:
    def online() -> bool:
        states = [json.loads(p) for _, _, p in sub.on(f"edge/nodes/{NODE}/state")]
        return bool(states) and states[-1].get("online") is True

    wait_until(online, 15, "the node to come online")


def flush(port: int, sub: Sub, key: ec.EllipticCurvePrivateKey) -> None:
    """A valid command with no response topic: once its reply is in, whatever the node published before it is too."""
    corr = f"marker-{uuid.uuid4().hex[:8]}"
    pub(port, f"edge/nodes/{NODE}/cmd", sign_command(key, new_command("status", target=f"node:{NODE}")), corr=corr)
    assert sub.reply(corr)[0] == REPLIES


def test_refusals_go_only_to_the_nodes_own_replies_topic(make_agent: Any, broker: Broker, fleet_key: Any) -> None:
    key, public = fleet_key
    sub = Sub(broker.port)
    mqtt_agent(make_agent, broker.port, public)
    wait_online(sub)
    cmd_topic = f"edge/nodes/{NODE}/cmd"
    valid = new_command("unload", {"model": "digits"}, target=f"node:{NODE}")
    stranger = ec.generate_private_key(ec.SECP256R1())
    hostile = {
        # The node's retained state: a refusal there would overwrite what the fleet console shows.
        "unsigned": (json.dumps({"body": json.dumps(valid)}), f"edge/nodes/{NODE}/state", "unsigned"),
        # Another node's command topic, and every node's: the node would speak where commands are read.
        "stranger": (sign_command(stranger, valid).decode(), "edge/nodes/n2/cmd", "bad_signature"),
        "garbage": ('{"body": ', "edge/fleet/cmd", "malformed_json"),
        # Outside the tree too: a refusal is no answer to whoever claims to want one.
        "elsewhere": (json.dumps({"body": json.dumps(valid)}), "ops/replies/attacker", "unsigned"),
        "wrong target": (sign_command(key, {**valid, "target": "node:n2"}).decode(), REPLIES + "/x", "wrong_target"),
    }
    for corr, (payload, response_topic, code) in hostile.items():
        corr = corr.replace(" ", "-")
        pub(broker.port, cmd_topic, payload, response_topic=response_topic, corr=corr)
        topic, doc = sub.reply(corr)
        assert topic == REPLIES, (corr, topic)
        assert doc["ok"] is False and doc["error"]["code"] == code, (corr, doc)
    flush(broker.port, sub, key)
    assert sub.replies_elsewhere() == []
    states = [json.loads(p) for _, _, p in sub.on(f"edge/nodes/{NODE}/state")]
    assert states and all(s["node"] == NODE and "online" in s and "ok" not in s for s in states)
    sub.close()


def test_a_response_topic_inside_the_agents_tree_is_never_honoured(
    make_agent: Any, broker: Broker, fleet_key: Any
) -> None:
    key, public = fleet_key
    sub = Sub(broker.port)
    mqtt_agent(make_agent, broker.port, public)
    wait_online(sub)
    cmd_topic = f"edge/nodes/{NODE}/cmd"

    def status() -> str:
        return sign_command(key, new_command("status", target=f"node:{NODE}")).decode()

    for corr, response_topic in {
        "state": f"edge/nodes/{NODE}/state",
        "own-cmd": cmd_topic,  # the node would read its own reply back as a command
        "other-node": "edge/nodes/n2/cmd",
        "fleet": "edge/fleet/cmd",
        "group": "edge/groups/site-a/cmd",
        "prefix": "edge",
    }.items():
        pub(broker.port, cmd_topic, status(), response_topic=response_topic, corr=corr)
        topic, doc = sub.reply(corr)
        # Valid, so it ran and is answered — on the node's own replies topic, with its correlation data.
        assert topic == REPLIES and doc["ok"] is True, (corr, topic, doc)
    # Outside the tree, and the fleet tools' reply area (docs/MQTT.md), the response topic is honoured.
    for corr, response_topic in {"ops": "ops/replies/me", "tools": "edge/replies/tool-7"}.items():
        pub(broker.port, cmd_topic, status(), response_topic=response_topic, corr=corr)
        topic, doc = sub.reply(corr)
        assert topic == response_topic and doc["ok"] is True
    flush(broker.port, sub, key)
    assert [m[0] for m in sub.replies_elsewhere()] == ["ops/replies/me", "edge/replies/tool-7"]
    sub.close()


def test_set_config_refusals_are_invalid_value_on_the_wire(make_agent: Any, broker: Broker, fleet_key: Any) -> None:
    key, public = fleet_key
    sub = Sub(broker.port)
    running = mqtt_agent(make_agent, broker.port, public)
    wait_online(sub)
    grace = running.lifecycle.rollback_grace_s
    for corr, changes in {
        "fixed": {"max_body_bytes": 1},
        "not-a-number": {"rollback_grace_s": "soon"},
        "negative": {"drain_timeout_s": -1},
        "boolean": {"rollback_grace_s": True},
        "mixed": {"telemetry.interval_s": 5, "rollback_grace_s": "later"},
    }.items():
        body = new_command("set-config", {"changes": changes}, target=f"node:{NODE}")
        pub(broker.port, f"edge/nodes/{NODE}/cmd", sign_command(key, body), response_topic="ops/replies/me", corr=corr)
        _, doc = sub.reply(corr)
        assert doc["ok"] is False and doc["error"]["code"] == "invalid_value", (corr, doc)
    # Nothing was applied, from either side of a refused change.
    assert running.lifecycle.rollback_grace_s == grace and running.agent.mqtt.telemetry_interval_s == 3600
    sub.close()


def test_the_last_will_says_when_it_was_registered(make_agent: Any, broker: Broker, fleet_key: Any) -> None:
    _, public = fleet_key
    cable = Cable(broker.port)
    sub = Sub(broker.port)
    before = time.time()
    running = mqtt_agent(make_agent, cable.port, public)
    wait_online(sub)
    connected = running.agent.mqtt.link.connects
    after_connect = time.time()
    cable.cut()  # the node vanishes: the broker publishes its last will

    def will() -> Any:
        states = [json.loads(p) for _, _, p in sub.on(f"edge/nodes/{NODE}/state")]
        return states[-1] if states and states[-1].get("online") is False else None

    doc = wait_until(will, 15, "the last will")
    assert connected == 1
    # The retained state's format, with the time the will was registered: the connect.
    assert set(doc) == {"node", "online", "reason", "ts"}
    assert doc["node"] == NODE and doc["reason"] == "connection lost"
    assert isinstance(doc["ts"], float) and before - 0.01 <= doc["ts"] <= after_connect + 0.01
    cable.close()
    sub.close()
