"""The fleet channel against a real Mosquitto: connection and auth, node state, commands, refusals, telemetry.

Each test starts its own broker (anonymous, password file, TLS with client
certificates, or ACLs) and an in-process agent with the channel attached;
the fleet side is a paho client (``Commander``, ``Recorder``) or the
``mosquitto_pub`` / ``mosquitto_sub`` command-line clients.

Every wait is for a condition under a generous hang guard (``HANG_S``): no
test depends on how fast the machine is.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROLLBACK_GRACE_S, http
from cryptography.hazmat.primitives.asymmetric import ec
from modelkit import make_scale_model
from mqtt_fixtures import (
    HANG_S,
    MOSQUITTO_PUB,
    MOSQUITTO_SUB,
    Broker,
    Cable,
    Commander,
    Recorder,
    check_sequence,
    fleet_keypair,
    needs_mosquitto,
    running_broker,
    wait_until,
)

from agent.mqtt.commands import new_command, sign_command
from agent.wiring import attach_lifecycle, attach_mqtt

pytestmark = needs_mosquitto
NODE = "n1"


@pytest.fixture(scope="module")
def fleet_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    return fleet_keypair(tmp_path_factory.mktemp("fleet"))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with running_broker(tmp_path / "broker") as b:
        yield b


def mqtt_agent(
    make_agent: Any,
    port: int,
    pub: Path,
    *,
    node: str = NODE,
    telemetry_s: float = 3600,
    before: Any = None,
    **mqtt: Any,
) -> Any:
    """An in-process agent with ``[mqtt]`` pointing at ``port`` and the channel attached, as ``edge-agent run`` does."""

    def setup(agent: Any) -> None:
        agent.config.sections["mqtt"] = {
            "host": "127.0.0.1",
            "port": port,
            "fleet_keys": [str(pub)],
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
            **mqtt,
        }
        agent.config.sections["telemetry"] = {"interval_s": telemetry_s, "gpu": False}
        if before is not None:
            before(agent)
        attach_lifecycle(agent, rollback_grace_s=ROLLBACK_GRACE_S)
        attach_mqtt(agent)

    return make_agent(setup=setup, node_id=node)


def stop_agent(running: Any) -> None:
    """Stop the agent (SIGTERM's path) and leave its loop to the fixture's teardown."""
    running.call(running.agent.stop())


def wait_online(recorder: Recorder, node: str = NODE, timeout: float = HANG_S) -> dict[str, Any]:
    """The retained state goes out after the subscriptions are in place: from then on commands are heard."""

    def online() -> Any:
        states = [m.doc for m in recorder.on(f"/nodes/{node}/state") if isinstance(m.doc, dict)]
        return states[-1] if states and states[-1].get("online") else None

    return wait_until(online, timeout, f"{node} to come online")


def x_request(v: float = 1.0) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [v, v, v, v]}]}


def infer_scale(agent: Any) -> tuple[int, Any]:
    return http("POST", agent.url + "/v2/models/scale/infer", x_request())


# -- connection, state, replies -------------------------------------------------------------------------
def test_state_status_reply_and_orderly_goodbye(make_agent: Any, broker: Broker, fleet_key: Any) -> None:
    key, pub = fleet_key
    recorder = Recorder(broker, ["edge/nodes/+/state", "edge/nodes/+/events"])
    running = mqtt_agent(make_agent, broker.port, pub)
    state = wait_online(recorder)
    assert state["health"] == "ok" and state["models"][0]["name"] == "digits"
    assert state["models"][0]["serving"] == ["1"]

    commander = Commander(broker, key)
    reply = commander.call(NODE, "status")
    assert reply["ok"] and reply["node"] == NODE and reply["command"] == "status"
    assert reply["result"]["models"][0]["serving"] == ["1"]
    assert reply["result"]["mqtt"]["connected"] is True

    # A late subscriber gets the node's state from the broker (retained), without asking the node.
    late = Recorder(broker, ["edge/nodes/+/state"])
    wait_until(lambda: late.on("/state"), HANG_S, "the retained state")
    assert late.on("/state")[0].retain and late.on("/state")[0].doc["online"] is True

    stop_agent(running)
    wait_until(lambda: late.on("/state")[-1].doc["online"] is False, HANG_S, "the offline state")
    assert late.on("/state")[-1].doc["reason"] == "stopped"
    for c in (recorder, late, commander):
        c.close()


def test_mosquitto_clients_as_an_independent_peer(make_agent: Any, broker: Broker, fleet_key: Any) -> None:
    """mosquitto_pub sends a signed command with a v5 response topic; mosquitto_sub reads the replies."""
    key, pub = fleet_key
    recorder = Recorder(broker, ["edge/nodes/+/state"])
    mqtt_agent(make_agent, broker.port, pub)
    wait_online(recorder)
    port = str(broker.port)

    def sub(topic: str, count: int) -> subprocess.Popen[bytes]:
        """mosquitto_sub, returned once its subscription is in place.

        With ``-d`` it reports the broker's SUBACK ("Subscribed (mid: 1): 0") on stdout; ``stdbuf -oL``
        makes it say so at once rather than when its pipe buffer fills. ``-W`` is its hang guard.
        """
        argv = [MOSQUITTO_SUB, "-V", "5", "-p", port, "-t", topic, "-C", str(count), "-W", str(int(HANG_S))]
        proc = subprocess.Popen(
            ["stdbuf", "-oL", *argv, "-F", "%t|%D|%p", "-d"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(b"Subscribed"):
                return proc
        raise AssertionError(f"mosquitto_sub never subscribed: {proc.communicate()[1]!r}")

    def received(proc: subprocess.Popen[bytes]) -> tuple[str, str, str]:
        """The one message mosquitto_sub printed (``-F %t|%D|%p``), among its debug lines."""
        assert proc.stdout is not None
        out = proc.stdout.read()  # to the end: it exits after -C messages, or after -W seconds
        err = proc.stderr.read() if proc.stderr is not None else b""
        proc.wait(HANG_S)
        lines = [ln for ln in out.decode().splitlines() if "|" in ln and not ln.startswith(("Client ", "Subscribed"))]
        assert len(lines) == 1, (out, err)
        topic, correlation, body = lines[0].split("|", 2)
        return topic, correlation, body

    reply_sub = sub("ops/replies/#", 1)
    corr = "corr-" + uuid.uuid4().hex[:8]
    payload = sign_command(key, new_command("status", target=f"node:{NODE}"))
    pub_cmd = [MOSQUITTO_PUB, "-V", "5", "-p", port, "-q", "1", "-t", f"edge/nodes/{NODE}/cmd", "-m", payload]
    subprocess.run(
        [*pub_cmd, "-D", "publish", "response-topic", "ops/replies/me", "-D", "publish", "correlation-data", corr],
        check=True,
        timeout=HANG_S,
    )
    topic, correlation, body = received(reply_sub)
    assert topic == "ops/replies/me" and correlation == corr
    assert json.loads(body)["ok"] is True and json.loads(body)["result"]["node"] == NODE

    # No response topic: the reply goes to the node's own replies topic.
    default_sub = sub(f"edge/nodes/{NODE}/replies", 1)
    bad = sign_command(key, new_command("status", target="node:somebody-else"))
    subprocess.run([*pub_cmd[:-1], bad], check=True, timeout=HANG_S)
    doc = json.loads(received(default_sub)[2])
    assert doc["ok"] is False and doc["error"]["code"] == "wrong_target" and doc["error"]["field"] == "body.target"

    # And the retained state, read by mosquitto_sub alone.
    state = subprocess.run(
        [MOSQUITTO_SUB, "-V", "5", "-p", port, "-t", f"edge/nodes/{NODE}/state", "-C", "1", "-W", str(int(HANG_S))],
        capture_output=True,
        timeout=HANG_S + 10,
        check=True,
    )
    assert json.loads(state.stdout)["online"] is True
    recorder.close()


# -- commands drive the reconciler ----------------------------------------------------------------------
def two_scale_versions(tmp_path: Path) -> Any:
    def before(agent: Any) -> None:
        from agent.images.service import open_cache

        agent.repository.import_dir(make_scale_model(tmp_path / "v1", version="1", scale=(1, 1, 1, 1)))
        agent.repository.import_dir(make_scale_model(tmp_path / "v2", version="2", scale=(2, 2, 2, 2)))
        agent.db.set_active("scale", "1")
        agent.cache = open_cache(agent.config, agent.blobs, agent.db)

    return before


def test_every_command_goes_through_the_control_surface(
    make_agent: Any, broker: Broker, fleet_key: Any, tmp_path: Path
) -> None:
    key, pub = fleet_key
    recorder = Recorder(broker, ["edge/nodes/+/state", "edge/nodes/+/events"])
    running = mqtt_agent(
        make_agent, broker.port, pub, before=two_scale_versions(tmp_path), groups=["site-a"], telemetry_s=3600
    )
    wait_online(recorder)
    commander = Commander(broker, key)
    assert infer_scale(running)[1]["model_version"] == "1"

    reply = commander.call(NODE, "deploy", {"ref": "store:scale:2"})
    assert reply["ok"], reply
    assert reply["result"]["version"] == "2" and reply["result"]["previous"] == "1"
    assert infer_scale(running)[1]["model_version"] == "2"

    reply = commander.call(NODE, "rollback", {"model": "scale"})
    assert reply["ok"] and reply["result"]["version"] == "1"
    assert infer_scale(running)[1]["model_version"] == "1"

    assert commander.call(NODE, "pin", {"model": "scale"})["result"]["pinned"] is True
    refused = commander.call(NODE, "deploy", {"ref": "store:scale:2"})
    assert not refused["ok"] and refused["error"]["code"] == "bad_request" and "pinned" in refused["error"]["message"]
    assert commander.call(NODE, "pin", {"model": "scale", "pinned": False})["result"]["pinned"] is False

    # Group and fleet topics: the node answers commands addressed to its group and to the fleet.
    group_body = new_command("status", target="group:site-a")
    corr = commander.send_raw("edge/groups/site-a/cmd", sign_command(key, group_body))
    assert commander.wait_reply(corr)["ok"]
    fleet_body = new_command(
        "set-desired", {"deployments": [{"model": "scale", "ref": "store:scale:2"}]}, target="fleet"
    )
    corr = commander.send_raw("edge/fleet/cmd", sign_command(key, fleet_body))
    assert commander.wait_reply(corr)["ok"]
    assert infer_scale(running)[1]["model_version"] == "2"

    changes = {"rollback_grace_s": 5, "telemetry.interval_s": 120, "mqtt.drain_rate": 300}
    reply = commander.call(NODE, "set-config", {"changes": changes})
    assert reply["ok"] and reply["result"]["applied"] == {k: float(v) for k, v in changes.items()}
    channel = running.agent.mqtt
    assert channel.telemetry_interval_s == 120 and channel.drain_rate == 300
    assert running.lifecycle.rollback_grace_s == 5
    bad = commander.call(NODE, "set-config", {"changes": {"mqtt.host": "elsewhere", "rollback_grace_s": 1}})
    assert not bad["ok"] and bad["error"]["field"] == "body.args.changes.mqtt.host"
    assert running.lifecycle.rollback_grace_s == 5  # nothing applied from a refused change

    verify = commander.call(NODE, "cache-verify")
    assert verify["ok"] and verify["result"]["checked"] >= 6 and verify["result"]["quarantined"] == []
    assert commander.call(NODE, "cache-gc")["ok"]

    assert commander.call(NODE, "unload", {"model": "scale"})["result"] == {"model": "scale", "unloaded": True}
    assert infer_scale(running)[0] == 404

    # The reconciler's events, and the commands' own, reached the events topic; the state followed the changes.
    def kinds() -> list[str]:
        return [m.doc["kind"] for m in recorder.on("/events")]

    wait_until(lambda: "model.unloaded" in kinds(), HANG_S, "the unload event")
    for kind in ("model.swapped", "model.rollback", "model.pinned", "command.executed", "model.unloaded"):
        assert kind in kinds()
    swapped = next(m.doc for m in recorder.on("/events") if m.doc["kind"] == "model.swapped")
    assert swapped["data"]["source"] == "mqtt" and swapped["node"] == NODE
    wait_until(
        lambda: [m for m in recorder.on("/state") if m.doc.get("models") and m.doc["models"][-1]["serving"] == []],
        HANG_S,
        "the state after unload",
    )
    commander.close()
    recorder.close()


def test_bad_input_is_refused_with_a_reply_and_the_agent_is_unaffected(
    make_agent: Any, broker: Broker, fleet_key: Any
) -> None:
    key, pub = fleet_key
    recorder = Recorder(broker, ["edge/nodes/+/state", "edge/nodes/+/events"])
    running = mqtt_agent(make_agent, broker.port, pub, command_max_bytes=16384)
    wait_online(recorder)
    commander = Commander(broker, key)
    topic = commander.node_topic(NODE)
    target = f"node:{NODE}"
    now = time.time()

    def signed(body: Any, with_key: ec.EllipticCurvePrivateKey = key) -> bytes:
        return sign_command(with_key, body)

    valid = new_command("status", target=target)
    stranger = ec.generate_private_key(ec.SECP256R1())
    tampered = json.loads(signed(new_command("pin", {"model": "digits"}, target=target)))
    tampered["body"] = tampered["body"].replace('"pin"', '"unload"').replace(',"args":{"model":"digits"}', "")
    cases: dict[str, tuple[bytes, str, str | None]] = {
        "malformed JSON": (b'{"body": "x", ', "malformed_json", None),
        "not an object": (b'"status"', "wrong_type", "$"),
        "unknown command": (signed(new_command("reboot", target=target)), "unknown_command", "body.command"),
        "missing field": (
            signed({k: v for k, v in valid.items() if k != "expires_at"}),
            "missing_field",
            "body.expires_at",
        ),
        "missing argument": (signed(new_command("rollback", target=target)), "missing_field", "body.args.model"),
        "wrong type": (signed({**valid, "issued_at": "yesterday"}), "wrong_type", "body.issued_at"),
        "wrong argument type": (
            signed(new_command("pin", {"model": "digits", "pinned": "yes"}, target=target)),
            "wrong_type",
            "body.args.pinned",
        ),
        "oversized": (
            signed(new_command("status", target=target, command_id="x" * 100)) + b" " * 20000,
            "too_large",
            None,
        ),
        "expired": (signed({**valid, "issued_at": now - 900, "expires_at": now - 600}), "expired", "body.expires_at"),
        "bad signature": (signed(valid, stranger), "bad_signature", "key_id"),
        "tampered body": (json.dumps(tampered).encode(), "bad_signature", "signature"),
        "unsigned": (json.dumps({"body": json.dumps(valid)}).encode(), "unsigned", "signature"),
    }
    for name, (payload, code, field) in cases.items():
        reply = commander.wait_reply(commander.send_raw(topic, payload))
        assert reply["ok"] is False, name
        assert reply["error"]["code"] == code, (name, reply)
        assert reply["error"].get("field") == field, (name, reply)
        # Unaffected: still serving between every bad command.
        assert http("GET", running.url + "/v2/health/ready")[0] == 200

    # Replayed: the same signed command published a second time is refused; it ran once.
    once = signed(new_command("pin", {"model": "digits"}, target=target))
    first = commander.wait_reply(commander.send_raw(topic, once))
    second = commander.wait_reply(commander.send_raw(topic, once))
    assert first["ok"] and not second["ok"]
    assert second["error"]["code"] == "replayed" and second["original"]["result"]["pinned"] is True
    # An id reused for a different command is refused too.
    reused = signed(new_command("unload", {"model": "digits"}, target=target, command_id=first["id"]))
    third = commander.wait_reply(commander.send_raw(topic, reused))
    assert third["error"]["code"] == "replayed"
    assert infer_digits_ok(running)

    wait_until(
        lambda: sum(m.doc["kind"] == "command.refused" for m in recorder.on("/events")) >= len(cases) + 2,
        HANG_S,
        "a command.refused event for each",
    )
    assert commander.call(NODE, "status")["ok"]
    commander.close()
    recorder.close()


def infer_digits_ok(running: Any) -> bool:
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}
    return http("POST", running.url + "/v2/models/digits/infer", body)[0] == 200


# -- authentication and authorisation --------------------------------------------------------------------
def test_password_auth_and_a_wrong_password_leaves_the_agent_serving(
    make_agent: Any, tmp_path: Path, fleet_key: Any
) -> None:
    key, pub = fleet_key
    with running_broker(tmp_path / "broker", passwords={NODE: "node-secret", "ops": "ops-secret"}) as broker:
        recorder = Recorder(broker, ["edge/nodes/+/state"], username="ops", password="ops-secret")
        secret = tmp_path / "mqtt-password"
        secret.write_text("node-secret\n")
        running = mqtt_agent(make_agent, broker.port, pub, username=NODE, password_file=str(secret))
        wait_online(recorder)
        commander = Commander(broker, key, username="ops", password="ops-secret")
        assert commander.call(NODE, "status")["ok"]
        stop_agent(running)

        wrong = mqtt_agent(make_agent, broker.port, pub, node="n2", username="n2", password="guess")
        wait_until(lambda: wrong.agent.mqtt.link.last_error, HANG_S, "a refused connection")
        assert "authori" in wrong.agent.mqtt.link.last_error.lower()
        assert not wrong.agent.mqtt.link.connected
        assert infer_digits_ok(wrong)  # serving regardless
        wait_until(lambda: wrong.agent.mqtt.link.backoff.attempt >= 2, HANG_S, "more connection attempts")
        assert wrong.agent.mqtt.link.connects == 0  # still trying, and still refused
        commander.close()
        recorder.close()


def test_mutual_tls(make_agent: Any, tmp_path: Path, fleet_key: Any) -> None:
    from mqtt_fixtures import make_tls

    key, pub = fleet_key
    tls = make_tls(tmp_path / "tls", NODE)
    with running_broker(tmp_path / "broker", tls=tls) as broker:
        recorder = Recorder(broker, ["edge/nodes/+/state"])
        running = mqtt_agent(
            make_agent,
            broker.port,
            pub,
            ca_file=str(tls.ca),
            cert_file=str(tls.client_cert),
            key_file=str(tls.client_key),
        )
        wait_online(recorder)
        assert running.agent.mqtt.link.settings.tls
        commander = Commander(broker, key)
        assert commander.call(NODE, "status")["ok"]
        stop_agent(running)

        # A certificate from a CA the broker does not trust: refused at the handshake, the agent still serves.
        rogue = mqtt_agent(
            make_agent,
            broker.port,
            pub,
            node="n3",
            ca_file=str(tls.ca),
            cert_file=str(tls.rogue_cert),
            key_file=str(tls.rogue_key),
        )
        wait_until(lambda: rogue.agent.mqtt.link.last_error, HANG_S, "a refused handshake")
        assert rogue.agent.mqtt.link.connects == 0 and infer_digits_ok(rogue)
        commander.close()
        recorder.close()


ACL = """\
# Nodes (user = node id): their own state, events, telemetry and replies; their command topics.
# Telemetry is left out on purpose here: the broker refuses it and the agent must cope.
pattern write edge/nodes/%u/state
pattern write edge/nodes/%u/events
pattern write edge/nodes/%u/replies
pattern read edge/nodes/%u/cmd
pattern read edge/groups/+/cmd
pattern read edge/fleet/cmd
pattern write edge/replies/#

user ops
topic write edge/nodes/+/cmd
topic write edge/fleet/cmd
topic read edge/replies/#
topic read edge/nodes/#
"""


def test_acl_refusals_are_dropped_and_reported_not_retried_forever(
    make_agent: Any, tmp_path: Path, fleet_key: Any
) -> None:
    key, pub = fleet_key
    with running_broker(tmp_path / "broker", passwords={NODE: "pw", "ops": "ops-pw"}, acl=ACL) as broker:
        recorder = Recorder(broker, ["edge/nodes/+/#"], username="ops", password="ops-pw")
        running = mqtt_agent(make_agent, broker.port, pub, username=NODE, password="pw", telemetry_s=0.1)
        wait_online(recorder)
        commander = Commander(broker, key, username="ops", password="ops-pw")
        assert commander.call(NODE, "status")["ok"]  # replies are allowed
        channel = running.agent.mqtt

        # Mosquitto answers the refused telemetry with PUBACK 0x87 (and then drops the connection): each
        # refused message is dropped, not resent forever, and the next connection reports what was lost.
        def reports() -> list[dict[str, Any]]:
            """Each drop report once (delivery is at least once: a report may arrive twice, same seq)."""
            docs = {m.doc["seq"]: m.doc for m in recorder.on("/events") if m.doc["kind"] == "outbox.dropped"}
            return [docs[seq] for seq in sorted(docs)]

        wait_until(lambda: sum(r["data"]["count"] for r in reports()) >= 5, HANG_S, "drop reports for telemetry")
        assert list(reports()[0]["data"]["reasons"]) == ["refused by broker: not authorized"]
        assert not recorder.on("/telemetry")
        assert any(m.doc["kind"] == "command.executed" for m in recorder.on("/events"))  # the rest still flows
        assert commander.call(NODE, "status")["ok"]

        # Nothing piles up: once telemetry stops, the outbox empties, and every message the node ever wrote
        # is accounted for exactly once: delivered (events), or refused, dropped and reported (telemetry).
        # Refusals resent forever would keep the outbox from emptying; drops never reported would leave
        # numbers unaccounted for; either way the wait below fails.
        running.loop.call_soon_threadsafe(channel.dispatcher.runtime_settings.apply, {"telemetry.interval_s": 3600.0})

        def accounted() -> tuple[set[int], set[int]]:
            dropped = {seq for r in reports() for first, last in r["data"]["ranges"] for seq in range(first, last + 1)}
            return recorder.seqs(), dropped

        def all_accounted() -> bool:
            delivered, dropped = accounted()
            everything = set(range(1, channel.outbox.last_seq + 1))
            return channel.outbox.outbox.rows == 0 and delivered | dropped == everything

        wait_until(all_accounted, HANG_S, "every refused message dropped and reported, and the outbox empty")
        delivered, dropped = accounted()
        assert not delivered & dropped  # a dropped message was never delivered
        assert sum(r["data"]["count"] for r in reports()) == len(dropped)  # each drop reported once
        assert not recorder.on("/telemetry")
        check_sequence(recorder.sequenced())
        commander.close()
        recorder.close()


def test_starts_and_serves_with_no_broker_then_delivers_when_one_appears(
    make_agent: Any, tmp_path: Path, fleet_key: Any
) -> None:
    _, pub = fleet_key
    broker = Broker(tmp_path / "broker")  # configured, not started: nothing listens on its port yet
    # The agent goes through a relay, held shut until the recorder below is subscribed.
    cable = Cable(broker.port)
    cable.cut()
    # Start-up does not wait for the broker: with none reachable, the agent is up and serving. A start-up that
    # waited would never return (nothing listens, the relay is shut); make_agent's own hang guard would fail it.
    running = mqtt_agent(make_agent, cable.port, pub, telemetry_s=0.2)
    try:
        assert infer_digits_ok(running)
        channel = running.agent.mqtt
        assert channel.started and not channel.link.connected
        wait_until(lambda: channel.outbox.outbox.rows >= 3, HANG_S, "telemetry written while offline")
        assert not channel.link.connected and channel.link.last_error
        broker.start()
        recorder = Recorder(broker, [f"edge/nodes/{NODE}/telemetry"])
        cable.mend()
        wait_until(lambda: len(recorder.on("/telemetry")) >= 6, HANG_S, "the backlog and live telemetry")
        report = check_sequence(recorder.sequenced(), set(range(1, 4)))
        assert report.backlog >= 3  # the offline telemetry, delivered as backlog
        snapshot = recorder.on("/telemetry")[0].doc
        assert snapshot["type"] == "telemetry" and snapshot["node"] == NODE
        assert snapshot["data"]["models"][0]["model"] == "digits"
        recorder.close()
    finally:
        cable.close()
        broker.kill()


def test_attach_does_nothing_without_a_host(make_agent: Any) -> None:
    running = make_agent(setup=attach_mqtt)
    assert running.agent.mqtt is None
    assert not any(type(s).__name__ == "MqttChannel" for s in running.agent.services)
