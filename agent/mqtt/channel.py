"""The MQTT fleet channel: an agent service tying connection, commands, telemetry and outbox together.

``MqttChannel`` (built by ``agent.wiring.attach_mqtt`` when ``[mqtt] host``
is set) is started and stopped by the agent like its other services.
``start`` never touches the network: it opens the outbox and the command
log, loads the fleet keys (a bad key file fails start-up with a message
naming it), and starts three background tasks:

- the link (:class:`Link`): connect, subscribe, publish the retained node
  state, drain the outbox, receive commands; on any failure back off and
  connect again, for as long as the agent runs;
- the event pump: every event on the agent's bus goes to the outbox, in
  batches, whether or not the broker is reachable;
- the telemetry clock: every ``[telemetry] interval_s`` a metrics snapshot
  goes to the outbox.

So the agent serves inference identically with the broker up, down or
flapping; what it would have said in the meantime waits in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import paho.mqtt.client as paho_mqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from structlog.typing import FilteringBoundLogger

from agent.control import Control
from agent.events import Event, EventBus
from agent.mqtt.commandlog import CommandLog
from agent.mqtt.commands import CommandRefused, FleetKeys, Limits
from agent.mqtt.connection import Link
from agent.mqtt.dispatch import Dispatcher, Incoming
from agent.mqtt.forwarder import Forwarder
from agent.mqtt.nodestate import offline_state, online_state, will_payload
from agent.mqtt.outbox import AsyncOutbox, Outbox
from agent.mqtt.settings import MqttSettings
from agent.mqtt.topics import Topics
from agent.telemetry.gpu import GpuProbe, GpuReader
from agent.telemetry.settings import TelemetrySettings
from agent.telemetry.snapshot import CacheSize, CpuMeter, build_snapshot, node_gauges

if TYPE_CHECKING:
    from agent.cas import BlobStore
    from agent.metrics import Metrics
    from agent.models import ModelManager
    from agent.wasinn.backend import BackendRegistry

OUTBOX_FILE = "mqtt-outbox.db"
COMMANDS_FILE = "mqtt-commands.db"
STATE_DEBOUNCE_S = 0.2  # a swap emits several model events; publish the state once after them
MAX_EVENT_BATCH = 5000
GOODBYE_TIMEOUT_S = 2.0
RESERVED_INFLIGHT = 2


class MqttChannel:
    def __init__(
        self,
        *,
        settings: MqttSettings,
        telemetry: TelemetrySettings,
        node_id: str,
        state_dir: Path,
        control: Control,
        events: EventBus,
        metrics: Metrics,
        models: ModelManager,
        blobs: BlobStore,
        cache: CacheSize | None,
        gpu: GpuReader | None = None,  # the agent's GPU scheduler: devices with the versions they hold
        log: FilteringBoundLogger | None = None,
        nn_backends: BackendRegistry | None = None,
    ):
        self.settings = settings
        self.nn_backends = nn_backends  # the node's WASI-NN backends, listed in telemetry
        self.node = node_id
        self.topics = Topics(self.settings.topic_prefix, self.node, self.settings.groups)
        self.log = (log or structlog.get_logger("edge_agent")).bind(subsystem="mqtt")
        self.state_dir = state_dir  # the outbox and the command log live here
        self.control = control
        self.events = events
        self.metrics = metrics
        # For telemetry: what is served, and the bytes the store holds (the image cache's count when pulls are on).
        self.models = models
        self.blobs = blobs
        self.cache = cache
        # Settings that ``set-config`` may change while running.
        self.telemetry_interval_s = telemetry.interval_s
        self.drain_rate = self.settings.drain_rate
        self.gpu: GpuReader = gpu if gpu is not None and telemetry.gpu else GpuProbe(self.log, enabled=telemetry.gpu)
        self.cpu = CpuMeter()
        self.link = Link(
            self.settings,
            self.node,
            lambda: aiomqtt.Will(self.topics.state, will_payload(self.node, time.time()), qos=1, retain=True),
            self.log,
        )
        self.outbox: AsyncOutbox | None = None
        self.command_log: CommandLog | None = None
        self.dispatcher: Dispatcher | None = None
        self.forwarder: Forwarder | None = None
        self._events: asyncio.Queue[Event] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._state_dirty = asyncio.Event()
        self._interval_changed = asyncio.Event()
        self._collector: _ChannelCollector | None = None
        self.started = False

    # -- service lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if not self.settings.enabled:
            self.log.info("mqtt disabled: no mqtt.host configured")
            return
        settings = self.settings
        keys = await asyncio.to_thread(FleetKeys.load, settings.fleet_keys)
        if not len(keys):
            self.log.warning("mqtt has no fleet keys (mqtt.fleet_keys): every command will be refused")
        outbox = await asyncio.to_thread(
            Outbox, self.state_dir / OUTBOX_FILE, settings.outbox_max_bytes, settings.outbox_max_age_s
        )
        self.outbox = AsyncOutbox(outbox)
        self.command_log = await asyncio.to_thread(CommandLog, self.state_dir / COMMANDS_FILE)
        self.dispatcher = Dispatcher(
            topics=self.topics,
            keys=keys,
            limits=Limits(settings.command_max_bytes, settings.command_max_skew_s, settings.command_max_lifetime_s),
            commands=self.command_log,
            control=lambda: self.control,
            events=self.events,
            reply=self._reply,
            runtime_settings=_RuntimeSettings(self),
            extra_status=self.describe,
            log=self.log,
        )
        await self.dispatcher.start()
        self._events = self.events.subscribe(maxsize=settings.event_queue)
        self._tasks = [
            asyncio.create_task(self.link.run(self._session), name="mqtt-link"),
            asyncio.create_task(self._event_pump(), name="mqtt-events"),
            asyncio.create_task(self._telemetry_clock(), name="mqtt-telemetry"),
        ]
        self._collector = _ChannelCollector(self)
        self.metrics.registry.register(self._collector)
        self.started = True
        self.log.info(
            "mqtt channel started",
            broker=f"{settings.host}:{settings.effective_port}",
            node_topic=self.topics.base,
            outbox_messages=outbox.rows,
            fleet_keys=len(keys),
        )

    async def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        if self._collector is not None:
            self.metrics.registry.unregister(self._collector)
            self._collector = None
        await self._say_goodbye()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._events is not None:
            self.events.unsubscribe(self._events)
            await self._write_events(_drain(self._events, MAX_EVENT_BATCH * 10))  # nothing said is lost at shutdown
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        if self.outbox is not None:
            await self.outbox.close()
        if self.command_log is not None:
            await asyncio.to_thread(self.command_log.close)
        await asyncio.to_thread(self.gpu.close)

    async def _say_goodbye(self) -> None:
        """An orderly stop publishes "offline, stopped" itself; the last will is only for vanishing."""
        client = self.link.client
        if client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError, ConnectionError):
            await client.publish(
                self.topics.state, offline_state(self.node, "stopped"), qos=1, retain=True, timeout=GOODBYE_TIMEOUT_S
            )

    # -- one connection -------------------------------------------------------------------------------
    async def _session(self, client: aiomqtt.Client) -> None:
        assert self.outbox is not None
        forwarder = Forwarder(
            self.outbox,
            self._publish_outbox_message,
            # A couple of the broker's slots stay free for replies and the node state.
            window=min(self.settings.max_inflight, max(1, self.link.receive_maximum - RESERVED_INFLIGHT)),
            drain_rate=self.drain_rate,
            inflight_total=self.link.inflight,
            log=self.log,
        )
        self.forwarder = forwarder
        self.link.puback_handlers.append(forwarder.on_puback)
        try:
            await self.outbox.prune()
            watermark = self.outbox.last_seq
            # Written after the watermark, so it goes out live, ahead of the backlog it describes.
            dropped = await self.outbox.report_dropped(self.topics.events, self._event_body("outbox.dropped", {}))
            if dropped is not None:
                self.log.warning(
                    "mqtt outbox dropped messages while offline", count=dropped.count, reasons=dropped.reasons
                )
            await self._subscribe(client)
            self._state_dirty.clear()
            await self._publish_state()
            await _until_first_failure(self._receive(client), forwarder.run(watermark), self._state_updates())
        finally:
            self.link.puback_handlers.remove(forwarder.on_puback)
            self.forwarder = None
            await forwarder.flush()

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        topics = self.topics.command_topics()
        granted = await client.subscribe([(topic, 1) for topic in topics])
        for topic, code in zip(topics, granted, strict=False):
            if getattr(code, "is_failure", False):
                self.log.error("mqtt subscription refused by the broker", topic=topic, reason=str(code))

    async def _receive(self, client: aiomqtt.Client) -> None:
        assert self.dispatcher is not None
        paho = client._client
        async for message in client.messages:
            props = message.properties
            payload = message.payload
            incoming = Incoming(
                topic=message.topic.value,
                payload=payload if isinstance(payload, bytes) else str(payload or "").encode(),
                response_topic=getattr(props, "ResponseTopic", None),
                correlation=getattr(props, "CorrelationData", None),
                redelivered=self.link.was_redelivered(message.mid),
                ack=_acker(paho, message.mid, message.qos),
            )
            await self.dispatcher.handle(incoming)
        raise ConnectionError("mqtt message stream ended")

    def _publish_outbox_message(self, topic: str, payload: bytes, properties: Properties | None) -> int:
        paho = self.link.paho()
        if paho is None:
            raise ConnectionError("mqtt link is down")
        info = paho.publish(topic, payload, 1, False, properties)
        if info.rc != paho_mqtt.MQTT_ERR_SUCCESS:
            raise ConnectionError(f"mqtt publish failed: {paho_mqtt.error_string(info.rc)}")
        return info.mid

    def _reply(self, topic: str, payload: bytes, correlation: bytes | None) -> bool:
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        if correlation is not None:
            props.CorrelationData = correlation
        try:
            sent = self.link.publish_nowait(topic, payload, 1, False, props)
        except ValueError as exc:  # a response topic with wildcards, or empty: no retry can send it
            self.log.warning("mqtt reply not sent: bad response topic", topic=topic, error=str(exc))
            return True
        if not sent:
            self.log.info("mqtt reply waits for the reconnect (the command comes back unacknowledged)", topic=topic)
        return sent

    # -- node state -------------------------------------------------------------------------------------
    async def _publish_state(self) -> None:
        status, error = None, None
        try:
            status = await self.control.status()
        except Exception as exc:  # noqa: BLE001 - the state must still go out, saying what is wrong
            error = f"status unavailable: {exc}"
        self.link.publish_nowait(
            self.topics.state, online_state(self.node, status, self.settings.groups, error), 1, True
        )

    async def _state_updates(self) -> None:
        while True:
            await self._state_dirty.wait()
            await asyncio.sleep(STATE_DEBOUNCE_S)
            self._state_dirty.clear()
            await self._publish_state()

    # -- events and telemetry into the outbox -----------------------------------------------------------
    def _event_body(self, kind: str, fields: dict[str, Any], ts: float | None = None) -> dict[str, Any]:
        return {"node": self.node, "ts": round(ts or time.time(), 6), "type": "event", "kind": kind, "data": fields}

    async def _event_pump(self) -> None:
        assert self._events is not None
        while True:
            first = await self._events.get()
            await self._write_events([first, *_drain(self._events, MAX_EVENT_BATCH - 1)])

    async def _write_events(self, events: list[Event]) -> None:
        if not events or self.outbox is None:
            return
        if any(e.kind.startswith("model.") for e in events):
            self._state_dirty.set()
        messages = [(self.topics.events, self._event_body(e.kind, e.fields, e.ts)) for e in events]
        try:
            await self.outbox.put_many(messages)
        except Exception as exc:  # noqa: BLE001 - disk full, database locked: say so, keep the pump alive
            self.log.error("mqtt events could not be stored; lost", count=len(messages), error=repr(exc))

    async def _telemetry_clock(self) -> None:
        assert self.outbox is not None
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.telemetry_interval_s
        while True:
            self._interval_changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_at):
                    await self._interval_changed.wait()
                    next_at = loop.time() + self.telemetry_interval_s  # a new interval starts now
                    continue
            try:
                snapshot = await asyncio.to_thread(self.snapshot)
                await self.outbox.put(
                    self.topics.telemetry,
                    {"node": self.node, "ts": round(time.time(), 3), "type": "telemetry", "data": snapshot},
                )
            except Exception as exc:  # noqa: BLE001 - a failed snapshot must not stop the next one
                self.log.error("mqtt telemetry snapshot failed", error=repr(exc))
            # Skip ticks missed while busy rather than firing a burst of stale snapshots.
            next_at = max(next_at + self.telemetry_interval_s, loop.time())

    def snapshot(self) -> dict[str, Any]:
        """One telemetry snapshot (blocking: NVML, /proc and the blob store); run it off the loop."""
        metrics = self.metrics
        serving = node_gauges(self.models, metrics, cache=self.cache, blobs=self.blobs)
        snap = build_snapshot(
            metrics.snapshot(),
            started=metrics.started,
            gpu=self.gpu.read(),
            cpu=self.cpu,
            serving=serving,
            wasi_nn=self.nn_backends.describe() if self.nn_backends is not None else None,
        )
        snap["mqtt"] = self.describe()
        return snap

    # -- introspection --------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        outbox = self.outbox.outbox if self.outbox is not None else None
        forwarder = self.forwarder
        return {
            "connected": self.link.connected,
            "broker": f"{self.settings.host}:{self.settings.effective_port}",
            "connects": self.link.connects,
            "last_error": self.link.last_error,
            "outbox_messages": outbox.rows if outbox else 0,
            "outbox_bytes": outbox.bytes if outbox else 0,
            "last_seq": outbox.last_seq if outbox else 0,
            "inflight": forwarder.inflight if forwarder else 0,
            "backlog_left": forwarder.backlog_left if forwarder else None,
            "telemetry_interval_s": self.telemetry_interval_s,
            "drain_rate": self.drain_rate,
        }


class _ChannelCollector:
    """The channel's state on the agent's ``/metrics``, read from counters it keeps in memory anyway."""

    def __init__(self, channel: MqttChannel):
        self.channel = channel

    def collect(self) -> Iterator[Metric]:
        channel = self.channel
        outbox = channel.outbox.outbox if channel.outbox is not None else None
        forwarder = channel.forwarder
        yield GaugeMetricFamily(
            "edge_agent_mqtt_connected", "1 while connected to the broker", value=int(channel.link.connected)
        )
        yield CounterMetricFamily("edge_agent_mqtt_connects", "Connections made to the broker", channel.link.connects)
        yield GaugeMetricFamily(
            "edge_agent_mqtt_outbox_messages", "Messages waiting for the broker", value=outbox.rows if outbox else 0
        )
        yield GaugeMetricFamily(
            "edge_agent_mqtt_outbox_bytes", "Payload bytes waiting for the broker", value=outbox.bytes if outbox else 0
        )
        yield GaugeMetricFamily(
            "edge_agent_mqtt_last_seq",
            "Last sequence number given to a message",
            value=outbox.last_seq if outbox else 0,
        )
        yield GaugeMetricFamily(
            "edge_agent_mqtt_inflight",
            "Messages published, not yet acknowledged",
            value=forwarder.inflight if forwarder else 0,
        )


class _RuntimeSettings:
    """The ``set-config`` keys this channel owns: ``telemetry.interval_s`` and ``mqtt.drain_rate``."""

    prefixes = ("mqtt.", "telemetry.")
    keys = ("telemetry.interval_s", "mqtt.drain_rate")

    def __init__(self, channel: MqttChannel):
        self.channel = channel

    def check(self, changes: dict[str, Any]) -> dict[str, float]:
        checked: dict[str, float] = {}
        for key, value in changes.items():
            where = f"body.args.changes.{key}"
            if key not in self.keys:
                raise CommandRefused(
                    "invalid_value", f"{key} cannot change at run time (allowed: {', '.join(self.keys)})", where
                )
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise CommandRefused("wrong_type", f"{key} must be a number", where)
            if (key == "telemetry.interval_s" and value <= 0) or (key == "mqtt.drain_rate" and value < 0):
                raise CommandRefused("invalid_value", f"{key} out of range: {value}", where)
            checked[key] = float(value)
        return checked

    def apply(self, checked: dict[str, float]) -> None:
        channel = self.channel
        if "telemetry.interval_s" in checked:
            channel.telemetry_interval_s = checked["telemetry.interval_s"]
            channel._interval_changed.set()
        if "mqtt.drain_rate" in checked:
            channel.drain_rate = checked["mqtt.drain_rate"]
            if channel.forwarder is not None:
                channel.forwarder.set_drain_rate(channel.drain_rate)
        channel.log.info("settings changed at run time", changes=checked)


def _acker(paho: Any, mid: int, qos: int) -> Any:
    def ack() -> None:
        if qos > 0:
            paho.ack(mid, qos)

    return ack


def _drain(queue: asyncio.Queue[Event], limit: int) -> list[Event]:
    items: list[Event] = []
    while len(items) < limit and not queue.empty():
        items.append(queue.get_nowait())
    return items


async def _until_first_failure(*coros: Coroutine[Any, Any, None]) -> None:
    """Run the session's loops together; the first to fail (the link dropped) ends them all."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        raise ConnectionError("an mqtt session loop ended")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
