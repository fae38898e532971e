"""The MQTT channel's parts on their own: settings, backoff, topics, command checks, command log, outbox, forwarder.

No broker here (test_mqtt_channel.py and test_mqtt_faults.py use a real one);
these pin down each rule with exact inputs, fast.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from mqtt_fixtures import fleet_keypair
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import BadRequest, ConfigError
from agent.events import EventBus
from agent.mqtt.commandlog import CommandLog
from agent.mqtt.commands import (
    CommandRefused,
    FleetKeys,
    Limits,
    key_id,
    new_command,
    parse_command,
    sign_command,
)
from agent.mqtt.connection import Backoff
from agent.mqtt.dispatch import Dispatcher, Incoming, error_code_of
from agent.mqtt.forwarder import BrokerRefused, Forwarder, TokenBucket
from agent.mqtt.nodestate import offline_state, online_state
from agent.mqtt.outbox import AsyncOutbox, Outbox
from agent.mqtt.settings import MqttSettings
from agent.mqtt.topics import Topics
from agent.telemetry.settings import TelemetrySettings

NODE = "edge-7"
TARGET = f"node:{NODE}"


# -- settings ---------------------------------------------------------------------------------------
def test_settings_from_environment_strings(tmp_path: Path) -> None:
    # EDGE_AGENT_MQTT__* values arrive as text; every field takes them.
    s = MqttSettings.from_mapping(
        {
            "host": "broker.local",
            "port": "1884",
            "keepalive_s": "20",
            "groups": "site-a, gpu",
            "fleet_keys": f"{tmp_path}/a.pub,{tmp_path}/b.pub",
            "drain_rate": "250.5",
            "username": "edge",
            "password": "pw",
        }
    )
    assert (s.host, s.port, s.keepalive_s, s.drain_rate) == ("broker.local", 1884, 20, 250.5)
    assert s.groups == ("site-a", "gpu")
    assert s.fleet_keys == (tmp_path / "a.pub", tmp_path / "b.pub")
    assert s.enabled and not s.tls and s.effective_port == 1884
    assert MqttSettings.from_mapping({"host": "b", "ca_file": "/ca.pem"}).effective_port == 8883
    assert not MqttSettings.from_mapping({}).enabled


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"hots": "x"}, "unknown mqtt setting"),
        ({"host": "b", "port": "eighty"}, "mqtt.port"),
        ({"host": "b", "cert_file": "/c.pem"}, "go together"),
        ({"host": "b", "cert_file": "/c.pem", "key_file": "/k.pem"}, "needs mqtt.ca_file"),
        ({"host": "b", "groups": ["ok", "bad/group"]}, "mqtt.groups"),
        ({"host": "b", "groups": ["a+"]}, "mqtt.groups"),
        ({"host": "b", "password": "pw"}, "username is not"),
        ({"host": "b", "max_inflight": 70000}, "65535"),
        ({"host": "b", "reconnect_min_s": 10, "reconnect_max_s": 5}, "reconnect_min_s"),
        ({"host": "b", "drain_rate": -1}, "drain_rate"),
    ],
)
def test_settings_refused_naming_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MqttSettings.from_mapping(raw)


def test_telemetry_settings() -> None:
    assert TelemetrySettings.from_mapping({}) == TelemetrySettings(60.0, True)
    assert TelemetrySettings.from_mapping({"interval_s": "0.5", "gpu": "false"}) == TelemetrySettings(0.5, False)
    with pytest.raises(ConfigError, match="interval_s must be positive"):
        TelemetrySettings.from_mapping({"interval_s": 0})
    with pytest.raises(ConfigError, match="unknown telemetry setting"):
        TelemetrySettings.from_mapping({"intervl_s": 1})


def test_password_file_wins_and_is_read_each_time(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("first\n")
    s = MqttSettings.from_mapping({"host": "b", "username": "u", "password": "inline", "password_file": str(pw)})
    assert s.read_password() == "first"
    pw.write_text("rotated")
    assert s.read_password() == "rotated"
    pw.unlink()
    with pytest.raises(ConfigError, match="password_file"):
        s.read_password()


# -- backoff ----------------------------------------------------------------------------------------
def test_backoff_is_exponential_with_full_jitter() -> None:
    backoff = Backoff(1.0, 60.0, random.Random(7))
    ceilings = [min(60.0, 2**n) for n in range(12)]
    for ceiling in ceilings:
        delay = backoff.next_delay()
        assert 0 <= delay <= ceiling
    backoff.reset()
    assert backoff.attempt == 0 and backoff.next_delay() <= 1.0


def test_a_fleet_reconnecting_spreads_over_the_whole_window() -> None:
    """1,000 nodes that lost the broker at once: their 6th retries cover [0, 32 s] evenly, no wave."""
    delays = []
    for node in range(1000):
        backoff = Backoff(1.0, 120.0, random.Random(node))
        for _ in range(5):
            backoff.next_delay()
        delays.append(backoff.next_delay())
    assert max(delays) <= 32.0
    buckets = [0] * 8
    for d in delays:
        buckets[min(7, int(d / 4))] += 1
    # Uniform would be 125 a bucket; no bucket gets a wave, none is empty.
    assert all(80 < b < 170 for b in buckets), buckets


# -- topics -----------------------------------------------------------------------------------------
def test_topics_and_targets() -> None:
    t = Topics("edge", NODE, ("site-a",))
    assert t.command_topics() == [f"edge/nodes/{NODE}/cmd", "edge/groups/site-a/cmd", "edge/fleet/cmd"]
    assert t.target_of(f"edge/nodes/{NODE}/cmd") == TARGET
    assert t.target_of("edge/groups/site-a/cmd") == "group:site-a"
    assert t.target_of("edge/fleet/cmd") == "fleet"
    assert t.target_of("edge/groups/other/cmd") is None
    assert (t.state, t.telemetry, t.events, t.replies) == tuple(
        f"edge/nodes/{NODE}/{x}" for x in ("state", "telemetry", "events", "replies")
    )
    for bad in ("a/b", "a+", "#", ""):
        with pytest.raises(ConfigError):
            Topics("edge", bad)


# -- commands: signing and checking ------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[ec.EllipticCurvePrivateKey, FleetKeys]:
    key, pub = fleet_keypair(tmp_path_factory.mktemp("fleet"))
    return key, FleetKeys.load([pub])


def parse(payload: bytes, keys: FleetKeys, now: float | None = None, **limits: Any) -> Any:
    return parse_command(payload, keys=keys, expected_target=TARGET, limits=Limits(**limits), now=now)


def refusal(payload: bytes, keys: FleetKeys, **kw: Any) -> CommandRefused:
    with pytest.raises(CommandRefused) as info:
        parse(payload, keys, **kw)
    return info.value


def test_a_signed_command_parses(fleet: Any) -> None:
    key, keys = fleet
    body = new_command("pin", {"model": "digits", "pinned": False}, target=TARGET)
    cmd = parse(sign_command(key, body), keys)
    assert (cmd.id, cmd.name, cmd.args, cmd.target) == (body["id"], "pin", {"model": "digits", "pinned": False}, TARGET)
    assert cmd.expires_at - cmd.issued_at == pytest.approx(300)
    assert cmd.key.endswith("fleet.pub")


def test_signature_is_over_the_exact_body_bytes(fleet: Any) -> None:
    """Any JSON text is signed as sent: no canonical form to disagree about."""
    key, keys = fleet
    now = time.time()
    # Odd spacing and key order on purpose: the bytes as sent are what is signed.
    text = f'{{ "target":"node:edge-7", "command":"status", "id":"x1", "issued_at": {now}, "expires_at": {now + 60} }}'
    assert parse(sign_command(key, text), keys).id == "x1"
    # Re-serialised (same object, other bytes): the signature no longer matches.
    envelope = json.loads(sign_command(key, text))
    envelope["body"] = json.dumps(json.loads(text))
    assert refusal(json.dumps(envelope).encode(), keys).code == "bad_signature"


def test_an_encrypted_keygen_key_signs_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same key tooling as images: `edge-agent keygen` writes a cosign-encrypted key; it signs commands."""
    from agent.images.signing import generate_keypair

    key_path, pub_path = generate_keypair(tmp_path / "ops", b"correct horse")
    monkeypatch.setenv("COSIGN_PASSWORD", "correct horse")
    payload = sign_command(key_path, new_command("status", target=TARGET))
    assert parse(payload, FleetKeys.load([tmp_path])).name == "status"  # a directory of keys
    assert json.loads(payload)["key_id"] == key_id(
        serialization.load_pem_public_key(pub_path.read_bytes())  # type: ignore[arg-type]
    )


def test_fleet_keys_must_be_p256_pem(tmp_path: Path) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    (tmp_path / "p384.pub").write_bytes(
        p384.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigError, match="not an ECDSA P-256"):
        FleetKeys.load([tmp_path / "p384.pub"])
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(ConfigError, match=r"junk\.pub"):
        FleetKeys.load([tmp_path / "junk.pub"])
    with pytest.raises(ConfigError, match=r"missing\.pub"):
        FleetKeys.load([tmp_path / "missing.pub"])


def _envelope(key: ec.EllipticCurvePrivateKey, body: Any) -> dict[str, Any]:
    return json.loads(sign_command(key, body))


def test_every_refusal_names_its_code_and_field(fleet: Any, tmp_path: Path) -> None:
    key, keys = fleet
    now = time.time()
    good = new_command("rollback", {"model": "digits"}, target=TARGET, now=now)
    other_key = ec.generate_private_key(ec.SECP256R1())

    def with_body(**changes: Any) -> bytes:
        body = {**good, **changes}
        body = {k: v for k, v in body.items() if v is not ...}
        return sign_command(key, body)

    def env(**changes: Any) -> bytes:
        e = _envelope(key, good)
        e.update(changes)
        return json.dumps({k: v for k, v in e.items() if v is not ...}).encode()

    cases: list[tuple[bytes, str, str | None]] = [
        (b"x" * 70_000, "too_large", None),
        (b"{not json", "malformed_json", None),
        (b"[1, 2]", "wrong_type", "$"),
        (env(body=...), "missing_field", "body"),
        (env(signature=...), "unsigned", "signature"),
        (env(extra=1), "unknown_field", "extra"),
        (env(body=5), "wrong_type", "body"),
        (env(signature="***"), "bad_signature", "signature"),
        (sign_command(other_key, good), "bad_signature", "key_id"),
        # No key id: every fleet key is tried, none verifies.
        (env(key_id=..., signature=_envelope(other_key, good)["signature"]), "bad_signature", "signature"),
        (with_body(id=...), "missing_field", "body.id"),
        (with_body(id=""), "invalid_value", "body.id"),
        (with_body(command="reboot"), "unknown_command", "body.command"),
        (with_body(command=7), "wrong_type", "body.command"),
        (with_body(issued_at="now"), "wrong_type", "body.issued_at"),
        (with_body(expires_at=True), "wrong_type", "body.expires_at"),
        (with_body(args=[]), "wrong_type", "body.args"),
        (with_body(args={}), "missing_field", "body.args.model"),
        (with_body(args={"model": 3}), "wrong_type", "body.args.model"),
        (with_body(args={"model": "m", "force": True}), "unknown_field", "body.args.force"),
        (with_body(target="node:other"), "wrong_target", "body.target"),
        (with_body(issued_at=now - 600, expires_at=now - 300), "expired", "body.expires_at"),
        (with_body(issued_at=now + 3600, expires_at=now + 3700), "not_yet_valid", "body.issued_at"),
        (with_body(expires_at=now + 30 * 86400), "invalid_value", "body.expires_at"),
        (with_body(expires_at=now - 1), "invalid_value", "body.expires_at"),
        (with_body(surprise=1), "unknown_field", "body.surprise"),
    ]
    for payload, code, field in cases:
        refused = refusal(payload, keys, now=now)
        assert (refused.code, refused.field) == (code, field), (payload[:120], str(refused))
        assert str(refused)  # a message a person can act on
    # The body is checked only once the signature holds: an unsigned body is never parsed.
    unsigned_garbage = json.dumps({"body": "{not json"}).encode()
    assert refusal(unsigned_garbage, keys).code == "unsigned"
    assert refusal(sign_command(key, "{not json"), keys).code == "malformed_json"
    assert refusal(sign_command(key, good), FleetKeys([])).code == "no_fleet_keys"


def test_set_desired_and_set_config_args_are_checked(fleet: Any) -> None:
    key, keys = fleet

    def sd(deployments: Any) -> CommandRefused:
        return refusal(sign_command(key, new_command("set-desired", {"deployments": deployments}, target=TARGET)), keys)

    assert sd([5]).field == "body.args.deployments[0]"
    assert sd([{"model": "m"}]).field == "body.args.deployments[0].ref"
    assert sd([{"model": "m", "ref": "r", "traffic": {"1": -5}}]).field == "body.args.deployments[0].traffic.1"
    empty = refusal(sign_command(key, new_command("set-config", {"changes": {}}, target=TARGET)), keys)
    assert (empty.code, empty.field) == ("invalid_value", "body.args.changes")


# -- command log ------------------------------------------------------------------------------------
def test_command_log_remembers_ids_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "cmds.db"
    log = CommandLog(path)
    far = time.time() + 3600
    assert log.admit("a", "d1", "status", far) == ("new", None)
    assert log.admit("a", "d1", "status", far) == ("running", None)
    assert log.admit("a", "d2", "status", far) == ("conflict", None)
    log.finish("a", b'{"ok":true}')
    log.close()
    log = CommandLog(path)
    assert log.admit("a", "d1", "status", far) == ("done", b'{"ok":true}')
    log.admit("old", "d", "status", time.time() - 1)
    assert log.prune() == 1 and log.count() == 1
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    log.close()


# -- dispatcher (fake control; the real one is driven in test_mqtt_channel.py) -------------------------
class CountingControl:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def pin(self, model: str, pinned: bool = True, *, source: str = "local") -> dict[str, Any]:
        self.calls.append(("pin", (model, pinned, source)))
        await self.gate.wait()
        return {"model": model, "pinned": pinned}

    async def rollback(self, model: str, *, source: str = "local") -> dict[str, Any]:
        self.calls.append(("rollback", model))
        raise BadRequest(f"model {model} has no previous version")

    async def status(self) -> dict[str, Any]:
        self.calls.append(("status", None))
        return {"node": NODE, "models": []}

    async def set_config(self, changes: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("set_config", changes))
        return {"applied": changes}


class Harness:
    def __init__(self, tmp_path: Path, keys: FleetKeys):
        self.control = CountingControl()
        self.replies: list[tuple[str, dict[str, Any], bytes | None]] = []
        self.acks = 0
        self.link_up = True
        self.events = EventBus()
        self.log = CommandLog(tmp_path / "cmds.db")
        self.dispatcher = Dispatcher(
            topics=Topics("edge", NODE),
            keys=keys,
            limits=Limits(),
            commands=self.log,
            control=lambda: self.control,  # type: ignore[arg-type, return-value]
            events=self.events,
            reply=self._reply,
        )

    def _reply(self, topic: str, payload: bytes, corr: bytes | None) -> bool:
        self.replies.append((topic, json.loads(payload), corr))
        return self.link_up

    def incoming(self, payload: bytes, redelivered: bool = False, corr: bytes = b"c1") -> Incoming:
        def ack() -> None:
            self.acks += 1

        return Incoming(f"edge/nodes/{NODE}/cmd", payload, "fleet/replies", corr, redelivered, ack)

    async def until(self, predicate: Any, what: str) -> None:
        """Let the dispatcher's tasks run until ``predicate()`` holds (a hang guard, not a speed check)."""
        await wait_async(predicate, what)

    async def replies_for(self, *corrs: bytes) -> None:
        await self.until(lambda: set(corrs) <= {corr for _, _, corr in self.replies}, f"replies to {corrs}")


async def wait_async(predicate: Any, what: str, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def test_redelivery_runs_once_and_a_replay_is_refused(fleet: Any, tmp_path: Path) -> None:
    key, keys = fleet

    async def scenario() -> Harness:
        h = Harness(tmp_path, keys)
        await h.dispatcher.start()
        payload = sign_command(key, new_command("pin", {"model": "m"}, target=TARGET, command_id="cmd-1"))
        h.control.gate.clear()  # the command is still running when its re-delivery arrives
        await h.dispatcher.handle(h.incoming(payload))
        await h.until(lambda: h.control.calls, "the pin to start")
        await h.dispatcher.handle(h.incoming(payload, redelivered=True, corr=b"c2"))
        assert not h.replies  # both wait for the one run
        h.control.gate.set()
        await h.replies_for(b"c1", b"c2")
        await h.dispatcher.handle(h.incoming(payload, redelivered=True, corr=b"c3"))  # after it finished
        await h.dispatcher.handle(h.incoming(payload, redelivered=False, corr=b"c4"))  # replayed by someone
        await h.replies_for(b"c3", b"c4")
        await h.dispatcher.stop()
        return h

    h = asyncio.run(scenario())
    assert [c[0] for c in h.control.calls] == ["pin"]  # ran once
    assert h.acks == 4  # every delivery acknowledged once recorded
    by_corr = {corr: doc for _, doc, corr in h.replies}
    assert by_corr[b"c1"]["ok"] and by_corr[b"c2"]["ok"] and by_corr[b"c3"]["ok"]
    assert by_corr[b"c1"]["result"] == by_corr[b"c3"]["result"] == {"model": "m", "pinned": True}
    assert by_corr[b"c4"]["error"]["code"] == "replayed" and by_corr[b"c4"]["error"]["field"] == "body.id"
    assert by_corr[b"c4"]["original"]["result"] == {"model": "m", "pinned": True}
    # Replies to the command go where it asked; the refusal of the replay only to the node's own replies topic.
    topics = {corr: topic for topic, _, corr in h.replies}
    assert topics == {
        b"c1": "fleet/replies",
        b"c2": "fleet/replies",
        b"c3": "fleet/replies",
        b"c4": f"edge/nodes/{NODE}/replies",
    }


def test_a_reply_lost_to_the_link_is_given_when_the_broker_delivers_again(fleet: Any, tmp_path: Path) -> None:
    """No PUBACK until the reply is out: the broker re-delivers (DUP) after the reconnect and gets the reply."""
    key, keys = fleet
    payload = sign_command(key, new_command("pin", {"model": "m"}, target=TARGET))

    async def scenario() -> tuple[Harness, int]:
        h = Harness(tmp_path, keys)
        await h.dispatcher.start()
        h.link_up = False
        await h.dispatcher.handle(h.incoming(payload, corr=b"lost"))
        await h.replies_for(b"lost")  # the reply was offered to a link that could not take it
        acks_while_down = h.acks
        h.link_up = True
        await h.dispatcher.handle(h.incoming(payload, redelivered=True, corr=b"again"))
        await h.replies_for(b"again")
        await h.dispatcher.stop()
        return h, acks_while_down

    h, acks_while_down = asyncio.run(scenario())
    assert acks_while_down == 0 and h.acks == 1
    assert [c[0] for c in h.control.calls] == ["pin"]
    assert h.replies[-1][2] == b"again" and h.replies[-1][1]["result"] == {"model": "m", "pinned": True}


def test_a_command_cut_short_by_a_crash_answers_interrupted(fleet: Any, tmp_path: Path) -> None:
    key, keys = fleet
    payload = sign_command(key, new_command("pin", {"model": "m"}, target=TARGET, command_id="cmd-9"))
    body = json.loads(json.loads(payload)["body"])
    import hashlib

    # What a kill -9 between "recorded" and "finished" leaves behind.
    CommandLog(tmp_path / "cmds.db").admit(
        "cmd-9", hashlib.sha256(json.loads(payload)["body"].encode()).hexdigest(), "pin", body["expires_at"] + 300
    )

    async def scenario() -> Harness:
        h = Harness(tmp_path, keys)
        await h.dispatcher.start()
        await h.dispatcher.handle(h.incoming(payload, redelivered=True))
        await h.replies_for(b"c1")
        await h.dispatcher.stop()
        return h

    h = asyncio.run(scenario())
    assert h.control.calls == []
    assert h.replies[0][1]["error"]["code"] == "interrupted"


def test_agent_errors_become_error_replies_and_events(fleet: Any, tmp_path: Path) -> None:
    key, keys = fleet

    async def scenario() -> tuple[Harness, list[Any]]:
        h = Harness(tmp_path, keys)
        queue = h.events.subscribe()
        await h.dispatcher.start()
        await h.dispatcher.handle(h.incoming(sign_command(key, new_command("rollback", {"model": "m"}, target=TARGET))))
        await h.dispatcher.handle(h.incoming(b"garbage", corr=b"c2"))
        await h.replies_for(b"c1", b"c2")
        await h.dispatcher.stop()
        return h, [queue.get_nowait() for _ in range(queue.qsize())]

    h, events = asyncio.run(scenario())
    by_corr = {corr: doc for _, doc, corr in h.replies}
    first, second = by_corr[b"c1"], by_corr[b"c2"]
    assert first["error"] == {"code": "bad_request", "message": "model m has no previous version"}
    assert second["error"]["code"] == "malformed_json" and second["id"] is None
    kinds = [e.kind for e in events]
    assert kinds.count("command.executed") == 1 and kinds.count("command.refused") == 1
    assert error_code_of(BadRequest("x")) == "bad_request"


# -- outbox -----------------------------------------------------------------------------------------
def test_outbox_numbers_are_monotonic_across_restarts_and_empty_tables(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    box = Outbox(path, 10**9, 10**9)
    epoch = box.epoch
    assert box.put_many([("t", {"n": i}) for i in range(3)]) == 3
    box.delete([1, 2, 3])
    box.close()
    box = Outbox(path, 10**9, 10**9)
    assert box.epoch == epoch and box.rows == 0
    assert box.put_many([("t", {"n": 4})]) == 4  # never reused, even with the table empty
    row = box.fetch(0, 10)[0]
    assert json.loads(row.payload) == {"seq": 4, "epoch": epoch, "n": 4}
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    box.close()
    path.unlink()
    assert Outbox(path, 10**9, 10**9).epoch != epoch  # a new file is a new stream


def test_outbox_byte_bound_drops_the_oldest_and_reports_once(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=2000, max_age_s=10**9)
    for i in range(100):
        box.put_many([("t", {"pad": "x" * 50, "i": i})])
    stats = box.stats()
    assert stats.bytes <= 2000 and stats.rows > 0
    kept = [r.seq for r in box.fetch(0, 1000)]
    assert kept == list(range(101 - stats.rows, 101))  # the newest survive, in order
    summary = box.report_dropped("ev", {"kind": "outbox.dropped"})
    assert summary is not None and summary.count == 100 - stats.rows
    assert summary.ranges == [[1, 100 - stats.rows]]
    report = json.loads(box.fetch(100, 1)[0].payload)
    assert report["kind"] == "outbox.dropped" and report["data"]["count"] == summary.count
    assert box.report_dropped("ev", {}) is None  # reported once


def test_outbox_age_bound(tmp_path: Path) -> None:
    clock = [1000.0]
    box = Outbox(tmp_path / "o.db", max_bytes=10**9, max_age_s=60, clock=lambda: clock[0])
    box.put_many([("t", {"i": i}) for i in range(5)])
    clock[0] += 30
    box.put_many([("t", {"i": i}) for i in range(5, 8)])
    clock[0] += 45  # the first five are 75 s old, the last three 45 s
    box.prune()
    assert [r.seq for r in box.fetch(0, 100)] == [6, 7, 8]
    summary = box.report_dropped("ev", {})
    assert summary is not None and summary.count == 5 and "older than 60s" in next(iter(summary.reasons))


def test_outbox_reject_is_reported_as_dropped(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", 10**9, 10**9)
    box.put_many([("t", {"i": i}) for i in range(4)])
    box.reject([2, 3], "refused by broker: not authorized")
    assert [r.seq for r in box.fetch(0, 10)] == [1, 4]
    assert [r.seq for r in box.fetch(0, 10, upto=3)] == [1]
    summary = box.report_dropped("ev", {})
    assert summary is not None and summary.ranges == [[2, 3]]


# -- forwarder ----------------------------------------------------------------------------------------
def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(100.0, clock=lambda: now[0])
    assert bucket.available() == 10  # a tenth of a second's worth at most
    bucket.take(10)
    assert bucket.available() == 0 and bucket.wait_s() == pytest.approx(0.01)
    now[0] += 0.05
    assert bucket.available() == 5
    assert TokenBucket(0).available() > 10**6  # 0 = unlimited


def test_forwarder_deletes_on_ack_drops_permanent_refusals_and_fails_on_transient_ones(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[int], list[int], BaseException | None]:
        box = AsyncOutbox(Outbox(tmp_path / "o.db", 10**9, 10**9))
        await box.put_many([("t", {"i": i}) for i in range(6)])
        sent: list[tuple[int, str]] = []

        def publish(topic: str, payload: bytes, props: Any) -> int:
            sent.append((json.loads(payload)["seq"], topic))
            return 100 + len(sent)

        fwd = Forwarder(box, publish, window=10, drain_rate=0, flush_s=0.0)
        task = asyncio.create_task(fwd.run(watermark=0))
        await wait_async(lambda: len(sent) == 6, "all six published")
        ok, not_authorized, quota = (
            ReasonCode(4, identifier=0),
            ReasonCode(4, identifier=0x87),
            ReasonCode(4, identifier=0x97),
        )
        for mid in (101, 102, 103, 104):
            fwd.on_puback(mid, ok)
        fwd.on_puback(105, not_authorized)
        assert not fwd.on_puback(999, ok)  # not one of ours
        # The acks and the refusal reach the outbox (the forwarder flushes them) before the quota failure ends it.
        await wait_async(lambda: box.outbox.rows == 1, "acked rows deleted and the refused one dropped")
        fwd.on_puback(106, quota)
        error: BaseException | None = None
        try:
            await asyncio.wait_for(task, 60)  # a hang guard
        except BrokerRefused as exc:
            error = exc
        remaining = [r.seq for r in await box.fetch(0, 100)]
        summary = await box.report_dropped("ev", {})
        await box.close()
        assert summary is not None
        return remaining, summary.ranges[0], error

    remaining, dropped, error = asyncio.run(scenario())
    assert remaining == [6]  # acked ones deleted, the refused one dropped, the quota one kept for the resend
    assert dropped == [5, 5]
    assert isinstance(error, BrokerRefused)


# -- node state -------------------------------------------------------------------------------------
def test_node_state_documents() -> None:
    ok = json.loads(
        online_state(NODE, {"ready": True, "models": [{"name": "m", "status": "ok", "serving": ["1"]}]}, ("g",))
    )
    assert ok["online"] and ok["health"] == "ok" and ok["groups"] == ["g"] and ok["models"][0]["serving"] == ["1"]
    broken = {"ready": True, "models": [{"name": "m", "status": "broken", "error": "corrupt blob"}]}
    assert json.loads(online_state(NODE, broken, ()))["health"] == "degraded"
    assert json.loads(online_state(NODE, None, (), "status unavailable"))["health"] == "unknown"
    assert json.loads(offline_state(NODE, "stopped")) == {
        "node": NODE,
        "online": False,
        "ts": pytest.approx(time.time(), abs=5),
        "reason": "stopped",
    }
