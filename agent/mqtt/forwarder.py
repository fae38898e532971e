"""Drains the outbox over one live connection: QoS 1, in order, deleted on PUBACK.

At connect the outbox's last sequence number is the *watermark*. Messages at
or below it are the backlog of the outage; messages written after it are
live. Two lanes share the connection:

- live messages go out as soon as they are written, unthrottled, so a swap
  or a refused command is seen within milliseconds even while an hour of
  backlog is still draining;
- the backlog goes out at ``drain_rate`` messages per second (token bucket),
  leaving the link, the broker and the consumers room for everything else.

Within each lane messages are published in sequence order over the one
connection, which MQTT and the broker keep in order; a live message may
overtake older backlog, and backlog messages carry the MQTT v5 user property
``backlog=1`` so a consumer knows it is looking at history.

Messages are pipelined (up to ``window`` unacknowledged, never more than the
broker's Receive Maximum) through paho directly: aiomqtt's ``publish``
awaits each PUBACK in its own task, which halves the rate. A message is
deleted only after its PUBACK; deletions are batched (every ``flush_s`` or
``flush_batch`` acks), so a crash between PUBACK and deletion re-sends a few
messages: delivery is at least once, and the sequence number tells a
consumer it has seen one before. A PUBACK with a failure reason code is no
acknowledgement: a permanent refusal (not authorised, bad topic) drops the
message and reports it as dropped, anything else ends the connection and
the message is sent again after the reconnect.

Each lane reads up to ``batch`` rows ahead, so a row the outbox bound drops
after it was read may still go out: the drop report then names a message a
consumer also received, which the sequence number makes plain.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.mqtt.outbox import AsyncOutbox, Row

# Reason codes after which sending the same message again can never succeed.
PERMANENT_REFUSALS = {0x87: "not authorized", 0x90: "topic name invalid", 0x99: "payload format invalid"}

# publish(topic, payload, properties) -> packet id; raises ConnectionError when the link is gone.
Publish = Callable[[str, bytes, Properties | None], int]


class BrokerRefused(ConnectionError):
    """The broker answered a publish with a failure that may pass (quota, busy): reconnect and resend."""


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; rate 0 means no limit."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.set_rate(rate)

    def set_rate(self, rate: float) -> None:
        self.rate = rate
        # A tenth of a second's worth: smooth enough for consumers, few enough wake-ups for us.
        self.burst = max(1.0, rate / 10)
        self.tokens = self.burst
        self.stamp = self.clock()

    def available(self) -> int:
        if self.rate <= 0:
            return 1 << 30
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return int(self.tokens)

    def take(self, n: int) -> None:
        if self.rate > 0:
            self.tokens -= n

    def wait_s(self) -> float:
        """Time until one whole token is there."""
        if self.rate <= 0:
            return 0.0
        return max(0.0, (1 - self.tokens) / self.rate)


class _PackedProperties(Properties):
    """Properties packed once: paho packs them again for every PUBLISH, a quarter of the drain's CPU."""

    _packed: bytes

    def __init__(self, user: tuple[str, str]):
        super().__init__(PacketTypes.PUBLISH)
        self.UserProperty = user
        object.__setattr__(self, "_packed", super().pack())  # Properties refuses unknown attribute names

    def pack(self) -> bytes:
        return self._packed


def _backlog_properties() -> Properties:
    return _PackedProperties(("backlog", "1"))


class Forwarder:
    def __init__(
        self,
        outbox: AsyncOutbox,
        publish: Publish,
        *,
        window: int,
        drain_rate: float,
        batch: int = 500,
        flush_s: float = 0.05,
        flush_batch: int = 1000,
        inflight_total: Callable[[], int] | None = None,
        log: Any = None,
    ):
        self.outbox = outbox
        self._publish = publish
        self.window = max(1, window)
        # Every QoS 1 message in flight on the connection, replies and node state included: they
        # share the broker's Receive Maximum with the outbox.
        self._inflight_total = inflight_total or (lambda: 0)
        self.bucket = TokenBucket(drain_rate)
        self.batch = batch
        self.flush_s = flush_s
        self.flush_batch = flush_batch
        self.log = log or structlog.get_logger("edge_agent.mqtt")
        self._inflight: dict[int, int] = {}  # packet id -> seq
        self._acked: list[int] = []
        self._rejected: list[tuple[int, str]] = []
        self._failure: BaseException | None = None
        self._wake = asyncio.Event()
        self._backlog_props = _backlog_properties()
        self.published = 0
        self.acked_total = 0
        self.backlog_left = 0

    # -- called by paho (on the event loop thread) for every PUBACK -------------------------------
    def on_puback(self, mid: int, reason: ReasonCode) -> bool:
        seq = self._inflight.pop(mid, None)
        if seq is None:
            return False  # not ours: a reply or state message published through aiomqtt
        if not reason.is_failure:
            self._acked.append(seq)
        elif reason.value in PERMANENT_REFUSALS:
            self._rejected.append((seq, f"refused by broker: {PERMANENT_REFUSALS[reason.value]}"))
        elif self._failure is None:
            self._failure = BrokerRefused(f"broker refused message {seq}: {reason} (0x{reason.value:02x})")
        self._wake.set()
        return True

    # -- the drain loop ----------------------------------------------------------------------------
    async def run(self, watermark: int | None = None) -> None:
        """Send until cancelled or the link fails; messages above ``watermark`` (default: now) are live."""
        listener = self._wake.set
        self.outbox.listeners.add(listener)
        try:
            await self._run(self.outbox.last_seq if watermark is None else watermark)
        finally:
            self.outbox.listeners.discard(listener)

    async def _run(self, watermark: int) -> None:
        # Each lane reads ahead up to ``batch`` rows, so the outbox thread is asked once per batch,
        # not once per PUBACK: with a broker that allows only 20 messages in flight (Mosquitto's
        # default Receive Maximum) the window refills after every few acknowledgements.
        live: deque[Row] = deque()
        backlog: deque[Row] = deque()
        live_cursor = watermark  # the highest sequence number read into each lane
        oldest = await self.outbox.fetch(0, 1, upto=watermark)
        backlog_cursor = oldest[0].seq - 1 if oldest else watermark
        backlog_open = bool(oldest)
        started = time.monotonic()
        if oldest:
            stats = await self.outbox.stats()
            self.backlog_left = watermark - backlog_cursor  # an upper bound: some numbers may have gone
            self.log.info(
                "mqtt backlog draining",
                up_to_messages=self.backlog_left,
                bytes=stats.bytes,
                rate=self.bucket.rate or "unlimited",
            )
        last_flush = time.monotonic()
        while True:
            self._wake.clear()  # before looking, so a PUBACK or a put from here on wakes the wait below
            if self._failure is not None:
                raise self._failure
            if not live and self.outbox.last_seq > live_cursor:
                rows = await self.outbox.fetch(live_cursor, self.batch)
                live.extend(rows)
                live_cursor = rows[-1].seq if rows else live_cursor
            if not backlog and backlog_cursor < watermark:
                rows = await self.outbox.fetch(backlog_cursor, self.batch, upto=watermark)
                backlog.extend(rows)
                backlog_cursor = rows[-1].seq if rows else watermark
            progressed = False
            room = self.window - max(len(self._inflight), self._inflight_total())
            if room > 0 and live:
                sent = self._send(live, min(room, len(live)), None)
                room -= sent
                progressed = True
            if room > 0 and backlog:
                allowance = self.bucket.available()
                if allowance >= 1:
                    sent = self._send(backlog, min(room, len(backlog), allowance), self._backlog_props)
                    self.bucket.take(sent)
                    self.backlog_left = max(0, self.backlog_left - sent)
                    progressed = True
            if backlog_open and not backlog and backlog_cursor >= watermark:
                backlog_open = False
                self.backlog_left = 0
                self.log.info("mqtt backlog sent", seconds=round(time.monotonic() - started, 2))
            now = time.monotonic()
            if len(self._acked) >= self.flush_batch or (
                (self._acked or self._rejected) and now - last_flush >= self.flush_s
            ):
                await self.flush()
                last_flush = now
                progressed = True
            if progressed:
                await asyncio.sleep(0)  # let PUBACKs and commands in between batches
                continue
            timeout = math.inf
            if backlog and self.window > len(self._inflight):
                timeout = self.bucket.wait_s()
            if self._acked or self._rejected:
                timeout = min(timeout, max(0.0, self.flush_s - (now - last_flush)))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if timeout == math.inf else timeout):
                    await self._wake.wait()

    def _send(self, lane: deque[Row], count: int, properties: Properties | None) -> int:
        """Publish the first ``count`` rows of ``lane``, in order; each leaves the lane once handed to paho."""
        for _ in range(count):
            row = lane[0]
            mid = self._publish(row.topic, row.payload, properties)
            lane.popleft()
            self._inflight[mid] = row.seq
        self.published += count
        return count

    async def flush(self) -> None:
        """Delete what the broker has acknowledged; drop what it refused for good."""
        acked, self._acked = self._acked, []
        rejected, self._rejected = self._rejected, []
        if acked:
            await self.outbox.delete(acked)
            self.acked_total += len(acked)
        for seq, reason in rejected:
            self.log.error("mqtt broker refused a message; dropped", seq=seq, reason=reason)
            await self.outbox.reject([seq], reason)

    def set_drain_rate(self, rate: float) -> None:
        self.bucket.set_rate(rate)
        self._wake.set()

    @property
    def inflight(self) -> int:
        return len(self._inflight)
