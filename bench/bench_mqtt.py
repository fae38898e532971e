"""MQTT fleet channel benchmark: outbox drain, offline enqueue, 24 h offline, command round trip.

    .venv/bin/python bench/bench_mqtt.py            # full runs
    .venv/bin/python bench/bench_mqtt.py --quick    # smaller counts

A local Mosquitto (``/usr/sbin/mosquitto``: its defaults, so a Receive Maximum
of 20 messages in flight, plus a loopback listener and ``set_tcp_nodelay
true``, see docs/MQTT.md) and an in-process agent with the channel attached,
as ``edge-agent run`` attaches it. Printed, each beside its target from the
issue:

* drain rate: an outbox pre-filled with telemetry-sized messages (a real
  snapshot of the agent) published at QoS 1 and deleted on PUBACK, from the
  moment the connection is up until the outbox is empty (target >= 5,000/s);
  delivery on to subscribers is the broker's part and is checked by the tests
  (tests/test_mqtt_faults.py), not timed here;
* enqueue while offline: the broker down, events published on the agent's bus
  until they are committed to the SQLite outbox (target >= 10,000/s); and the
  outbox alone, one transaction per message and batched;
* outbox size after 24 simulated hours offline at the default telemetry
  interval (60 s): rows, payload bytes, file size, and how long the default
  64 MiB bound lasts;
* command round trip for ``status``: signed, published, verified, executed,
  replied (MQTT v5 response topic + correlation data), reply received
  (target p50 < 20 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import structlog

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from agent.config import Config  # noqa: E402
from agent.daemon import Agent  # noqa: E402
from agent.images.signing import generate_keypair, load_private_key  # noqa: E402
from agent.mqtt.commands import new_command, sign_command  # noqa: E402
from agent.mqtt.outbox import Outbox  # noqa: E402
from agent.mqtt.settings import MqttSettings  # noqa: E402
from agent.wiring import attach_lifecycle, attach_mqtt  # noqa: E402

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
NODE = "bench-node"
DAY_S = 86400
DEFAULT_INTERVAL_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


class Mosquitto:
    def __init__(self, workdir: Path):
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "set_tcp_nodelay true"]
        if os.geteuid() == 0:
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def listening() -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return True
            return False

        wait_for(listening, 10, "mosquitto", 0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class AgentThread:
    """An in-process agent on its own loop: the channel exactly as `edge-agent run` attaches it."""

    def __init__(self, state: Path, port: int, fleet_pub: Path, drain_rate: float):
        config = Config.load(
            env={},
            overrides={"state_dir": state, "listen": "127.0.0.1:0", "node_id": NODE, "log_level": "warning"},
        )
        config.sections["mqtt"] = {
            "host": "127.0.0.1",
            "port": port,
            "fleet_keys": [str(fleet_pub)],
            "drain_rate": drain_rate,
            "reconnect_min_s": 0.02,
            "reconnect_max_s": 0.2,
        }
        config.sections["telemetry"] = {"interval_s": DEFAULT_INTERVAL_S, "gpu": False}
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.agent = Agent(config)
        attach_lifecycle(self.agent)
        self.channel = attach_mqtt(self.agent)
        self.call(self.agent.start())

    def call(self, coro: Any, timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.agent.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)


# -- the measurements ---------------------------------------------------------------------------------
def telemetry_body(snapshot: dict[str, Any]) -> dict[str, Any]:
    return {"node": NODE, "ts": round(time.time(), 3), "type": "telemetry", "data": snapshot}


def bench_outbox_enqueue(workdir: Path, body: dict[str, Any], count: int) -> dict[str, float]:
    """The outbox alone: one commit per message (a quiet node) and 100 per commit (a burst)."""
    topic = f"edge/nodes/{NODE}/telemetry"
    results = {}
    for name, batch in (("one message per transaction", 1), ("100 messages per transaction", 100)):
        box = Outbox(workdir / f"enqueue-{batch}.db", 1 << 40, 1e12)
        t0 = time.perf_counter()
        for _ in range(count // batch):
            box.put_many([(topic, body)] * batch)
        results[name] = count / (time.perf_counter() - t0)
        box.close()
    return results


def bench_bus_enqueue(running: AgentThread, count: int, chunk: int = 5000) -> float:
    """Events on the agent's bus (the way swaps and refusals arrive) until committed to the outbox, offline.

    Published in bursts of ``chunk`` (under the bus queue's bound, which would otherwise drop the oldest),
    each waited for, so this is the sustained rate, not a burst absorbed by the queue.
    """
    channel = running.channel
    events = running.agent.events
    t0 = time.perf_counter()
    for start in range(0, count, chunk):
        target = channel.outbox.last_seq + min(chunk, count - start)
        for i in range(start, min(start + chunk, count)):
            events.publish("bench.event", i=i, model="digits", version="1")
        wait_for(lambda target=target: channel.outbox.last_seq >= target, 60, "the events in the outbox")
    return count / (time.perf_counter() - t0)


def simulate_offline_day(workdir: Path, snapshot: dict[str, Any], days: float = 1.0) -> dict[str, float]:
    """24 h of telemetry at the default interval, plus an event an hour, with a simulated clock."""
    settings = MqttSettings()
    clock = [1_700_000_000.0]
    box = Outbox(workdir / "day.db", settings.outbox_max_bytes, settings.outbox_max_age_s, clock=lambda: clock[0])
    ticks = int(days * DAY_S / DEFAULT_INTERVAL_S)
    for tick in range(ticks):
        snap = dict(snapshot, uptime_s=tick * DEFAULT_INTERVAL_S)
        messages = [(f"edge/nodes/{NODE}/telemetry", telemetry_body(snap))]
        if tick % 60 == 0:
            messages.append(
                (
                    f"edge/nodes/{NODE}/events",
                    {"node": NODE, "type": "event", "kind": "model.swapped", "data": {"model": "digits"}},
                )
            )
        box.put_many(messages)
        clock[0] += DEFAULT_INTERVAL_S
    stats = box.stats()
    box.checkpoint()
    file_bytes = sum(p.stat().st_size for p in workdir.glob("day.db*"))
    box.close()
    return {
        "rows": stats.rows,
        "payload_bytes": stats.bytes,
        "file_bytes": file_bytes,
        "days_to_bound": settings.outbox_max_bytes / stats.bytes * days,
        "age_bound_days": settings.outbox_max_age_s / DAY_S,
    }


def bench_drain(workdir: Path, broker: Mosquitto, fleet_pub: Path, snapshot: dict[str, Any], count: int) -> Any:
    """Pre-fill the outbox offline, bring the broker up, time QoS 1 publish + PUBACK + delete until empty."""
    state = workdir / "drain-state"
    state.mkdir()
    box = Outbox(state / "mqtt-outbox.db", 1 << 40, 1e12)
    body = telemetry_body(snapshot)
    for _ in range(count // 500):
        box.put_many([(f"edge/nodes/{NODE}/telemetry", body)] * 500)
    payload_bytes = box.bytes
    box.close()
    broker.start()
    running = AgentThread(state, broker.port, fleet_pub, drain_rate=0)
    channel = running.channel
    wait_for(lambda: channel.link.connected, 10, "the connection")
    t0 = time.perf_counter()
    wait_for(lambda: channel.outbox.outbox.rows == 0, 120, "the outbox to drain")
    drained = time.perf_counter() - t0
    return running, {
        "rate": count / drained,
        "seconds": drained,
        "message_bytes": payload_bytes / count,
        "window": channel.forwarder.window if channel.forwarder else 0,
        "receive_maximum": channel.link.receive_maximum,
    }


class Fleet:
    """The fleet side: a paho client that signs status commands and waits for each reply."""

    def __init__(self, port: int, key: Any):
        self.key = key
        self.reply_topic = f"edge/replies/bench-{uuid.uuid4().hex[:6]}"
        self.cond = threading.Condition()
        self.replies: dict[bytes, float] = {}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-fleet", protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a, **k: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as a fleet tool should
        self.client.loop_start()
        self.client.subscribe(self.reply_topic, qos=1)
        subscribed.wait(10)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.perf_counter()
        with self.cond:
            self.replies[msg.properties.CorrelationData] = now
            self.cond.notify_all()

    def round_trip(self, payload: bytes) -> float:
        corr = uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = corr
        t0 = time.perf_counter()
        self.client.publish(f"edge/nodes/{NODE}/cmd", payload, qos=1, properties=props)
        with self.cond:
            if not self.cond.wait_for(lambda: corr in self.replies, 10):
                raise RuntimeError("no reply to a status command")
            return self.replies[corr] - t0

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def bench_round_trip(port: int, key: Any, count: int) -> list[float]:
    fleet = Fleet(port, key)
    # Signed beforehand: the fleet tool's signing is not the node's round trip.
    payloads = [sign_command(key, new_command("status", target=f"node:{NODE}")) for _ in range(count + 20)]
    for payload in payloads[:20]:  # warm-up
        fleet.round_trip(payload)
    samples = [fleet.round_trip(payload) for payload in payloads[20:]]
    fleet.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller counts")
    args = parser.parse_args()
    drain_n, enqueue_n, rtt_n = (20_000, 10_000, 200) if args.quick else (100_000, 50_000, 1000)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    workdir = Path(tempfile.mkdtemp(prefix="edge-bench-mqtt-"))
    broker = Mosquitto(workdir)
    running: AgentThread | None = None
    try:
        key_path, pub = generate_keypair(workdir / "fleet", None)
        key = load_private_key(key_path, lambda _confirm: b"")
        print(f"edge-agent MQTT benchmark ({os.cpu_count()} CPUs, {MOSQUITTO} on loopback, QoS 1, MQTT v5)\n")

        # A real telemetry snapshot of an agent that has served requests, for realistic message sizes.
        probe = AgentThread(workdir / "probe-state", free_port(), pub, drain_rate=0)
        requests, latency = probe.agent.metrics.model_children("digits", "1")
        for i in range(500):
            requests.inc()
            latency.observe(0.00002 * (1 + i % 40))
        probe.agent.metrics.errors.labels("digits", "1", "timeout").inc()
        snapshot = probe.channel.snapshot()
        probe.stop()

        running, drain = bench_drain(workdir, broker, pub, snapshot, drain_n)
        print(f"Outbox drain to the broker ({drain_n} telemetry messages of {drain['message_bytes']:.0f} B)")
        rate, seconds = drain["rate"], drain["seconds"]
        print(f"  published, acknowledged, deleted  {rate:9.0f} msg/s   target >= 5,000   ({seconds:.2f} s)")
        window, receive_max = drain["window"], drain["receive_maximum"]
        print(f"  ({window} in flight at most: the broker's Receive Maximum is {receive_max})\n")

        samples = bench_round_trip(broker.port, key, rtt_n)
        p50, p99 = pct(samples, 50) * 1000, pct(samples, 99) * 1000
        print(f"Command round trip, status ({rtt_n} sequential, signed ECDSA P-256, reply via response topic)")
        mean = statistics.fmean(samples) * 1000
        print(f"  p50 {p50:6.2f} ms   p99 {p99:6.2f} ms   mean {mean:6.2f} ms   target p50 < 20 ms\n")

        broker.stop()
        wait_for(lambda: not running.channel.link.connected, 10, "the link to drop")
        bus_rate = bench_bus_enqueue(running, enqueue_n)
        direct = bench_outbox_enqueue(workdir, telemetry_body(snapshot), enqueue_n)
        print(f"Enqueue while offline ({enqueue_n} messages)")
        print(f"  events on the bus -> SQLite outbox   {bus_rate:9.0f} msg/s   target >= 10,000")
        for name, rate in direct.items():
            print(f"  outbox, {name:29} {rate:9.0f} msg/s")
        print()

        day = simulate_offline_day(workdir, snapshot)
        print("Outbox after 24 h offline (telemetry every 60 s, an event an hour)")
        payload_mib, file_mib = day["payload_bytes"] / 2**20, day["file_bytes"] / 2**20
        print(f"  {day['rows']:.0f} messages, {payload_mib:.2f} MiB payload, {file_mib:.2f} MiB on disk")
        print(
            f"  the default bound (64 MiB) holds {day['days_to_bound']:.0f} days of it; "
            f"the default age bound drops what is older than {day['age_bound_days']:.0f} days"
        )
    finally:
        if running is not None:
            with contextlib.suppress(Exception):
                running.stop()
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
