"""One MQTT v5 connection at a time, re-made forever with backoff and full jitter.

The agent never waits on the broker: :meth:`Link.run` is a background task
that connects, hands the live client to a session coroutine, and when the
link drops (or never comes up) sleeps a random time in
``[0, min(max, min * 2**attempt)]`` before trying again. Full jitter, from
the very first retry, is what spreads a fleet that lost its broker in one
regional outage over the whole window instead of bringing it back as one
wave; the attempt counter only resets once a connection has stayed up
``stable_after_s``, so a broker that accepts and drops at once is not
hammered either.

aiomqtt 2.x keeps to itself what matters here: paho's PUBACK reason code
(a PUBACK with a failure code is not an acknowledgement), the CONNACK's
Receive Maximum (it caps the messages in flight), an incoming message's DUP
flag (a re-delivery is answered from the command log, a replay refused), and
a connection closed before its CONNACK (aiomqtt would wait out the whole
connect timeout). So the link chains its own handlers in front of aiomqtt's
on the paho client.
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import aiomqtt
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.errors import ConfigError
from agent.mqtt.settings import MqttSettings

if TYPE_CHECKING:
    from paho.mqtt.client import (
        CallbackOnConnect_v2,
        CallbackOnDisconnect_v2,
        CallbackOnMessage,
        CallbackOnPublish_v2,
    )

PubackHandler = Callable[[int, ReasonCode], bool]
Session = Callable[[aiomqtt.Client], Awaitable[None]]
# Makes the last will for one connection attempt (it carries the time it was registered); None: no will
# (`edge-agent check`'s probe connection must not leave one).
WillFactory = Callable[[], aiomqtt.Will | None]


@dataclass
class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And Jitter")."""

    base_s: float
    cap_s: float
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * 2 ** min(self.attempt, 62))
        self.attempt += 1
        return self.rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class Link:
    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        will: WillFactory,
        log: Any = None,
        rng: random.Random | None = None,
    ):
        self.settings = settings
        self.client_id = client_id
        self.will = will
        self.log = log or structlog.get_logger("edge_agent.mqtt")
        self.backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s, rng or random.Random())
        self.client: aiomqtt.Client | None = None
        self.receive_maximum = 65535
        self.puback_handlers: list[PubackHandler] = []
        # Packet ids of incoming messages the broker flagged DUP (a re-delivery of the same PUBLISH);
        # aiomqtt's Message does not carry the flag, so it is noted here as paho sees it.
        self.redelivered: set[int] = set()
        self.connects = 0
        self.last_error: str | None = None
        self._warned_cleartext = False

    @property
    def connected(self) -> bool:
        return self.client is not None

    async def run(self, session: Session) -> None:
        """Connect, run ``session`` while connected, back off, repeat; ends only when cancelled."""
        while True:
            up_since: float | None = None
            try:
                tls, password = await asyncio.to_thread(self._load_credentials)
                client = self._client(tls, password)
                async with client:
                    up_since = time.monotonic()
                    self.client = client
                    self.connects += 1
                    self.last_error = None
                    self.log.info(
                        "mqtt connected",
                        broker=f"{self.settings.host}:{self.settings.effective_port}",
                        tls=self.settings.tls,
                        receive_maximum=self.receive_maximum,
                    )
                    try:
                        await session(client)
                    finally:
                        self.client = None
            except (aiomqtt.MqttError, ConnectionError) as exc:
                self._note_failure(exc, up_since)
            except ConfigError as exc:  # a certificate or password file unreadable now; may be fixed later
                self._note_failure(exc, up_since)
            except Exception as exc:  # a bug in a session must not end the channel; log it and reconnect
                self.log.exception("mqtt session failed", error=repr(exc))
                self._note_failure(exc, up_since)
            if up_since is not None and time.monotonic() - up_since >= self.settings.stable_after_s:
                self.backoff.reset()
            delay = self.backoff.next_delay()
            self.log.info("mqtt reconnecting", in_s=round(delay, 3), attempt=self.backoff.attempt)
            await asyncio.sleep(delay)

    def _note_failure(self, exc: BaseException, up_since: float | None) -> None:
        self.last_error = str(exc) or type(exc).__name__
        cause = exc.__cause__ or exc.__context__
        if cause is not None and str(cause) not in self.last_error:
            # aiomqtt wraps the real reason ("Disconnected during message iteration"); say what it was.
            self.last_error += f": {cause or type(cause).__name__}"
        if up_since is None:
            self.log.warning("mqtt connect failed", error=self.last_error, attempt=self.backoff.attempt)
        else:
            self.log.warning("mqtt connection lost", error=self.last_error, up_s=round(time.monotonic() - up_since, 1))

    def publish_nowait(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, properties: Properties | None = None
    ) -> bool:
        """Hand a message to the live connection without waiting for its PUBACK; False when offline."""
        client = self.client
        if client is None:
            return False
        info = client._client.publish(topic, payload, qos, retain, properties)
        return info.rc == 0

    def inflight(self) -> int:
        """QoS 1 messages published on the live connection and not acknowledged yet (paho's own count)."""
        paho = self.paho()
        return int(getattr(paho, "_inflight_messages", 0)) if paho is not None else 0

    def was_redelivered(self, mid: int) -> bool:
        """Whether the incoming message ``mid`` carried the DUP flag (asked once per message)."""
        if mid in self.redelivered:
            self.redelivered.discard(mid)
            return True
        return False

    def paho(self) -> Any:
        """The live paho client, for the forwarder's pipelined publishes (aiomqtt awaits each one)."""
        return self.client._client if self.client is not None else None

    # -- building a client ----------------------------------------------------------------------
    async def make_client(self) -> aiomqtt.Client:
        """A client built as every connect builds one (TLS files and password read now), not connected yet.

        ``edge-agent check`` connects with it, so what it reports is what the agent would do with the
        same settings.
        """
        tls, password = await asyncio.to_thread(self._load_credentials)
        return self._client(tls, password)

    def _load_credentials(self) -> tuple[ssl.SSLContext | None, str | None]:
        """Read certificates and the password file afresh for every attempt: they may be rotated on disk."""
        settings = self.settings
        password = settings.read_password()
        if settings.username and not settings.tls and not self._warned_cleartext:
            self._warned_cleartext = True
            self.log.warning("mqtt credentials are sent without TLS; set mqtt.ca_file to encrypt them")
        if not settings.tls:
            return None, password
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(settings.ca_file))
            if settings.cert_file is not None:
                context.load_cert_chain(str(settings.cert_file), str(settings.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"mqtt TLS files cannot be used: {exc}") from exc
        return context, password

    def _client(self, tls: ssl.SSLContext | None, password: str | None) -> aiomqtt.Client:
        settings = self.settings
        connect_properties = Properties(PacketTypes.CONNECT)
        # A persistent session: commands sent to a node while it is offline wait at the broker.
        connect_properties.SessionExpiryInterval = settings.session_expiry_s
        client = aiomqtt.Client(
            settings.host,
            settings.effective_port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            username=settings.username or None,
            password=password,
            will=self.will(),
            clean_start=False,
            keepalive=settings.keepalive_s,
            timeout=settings.connect_timeout_s,
            tls_context=tls,
            properties=connect_properties,
            # 0: paho does no in-flight accounting of its own (it rescans its queue on every
            # PUBACK); the forwarder keeps its own window, capped by the broker's Receive Maximum.
            max_inflight_messages=0,
            # Neither paho nor aiomqtt turns Nagle off: a command's PUBACK followed by its reply would
            # wait for the broker's delayed ACK (~40 ms) before the reply left.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )
        # Replies and state go out pipelined too; aiomqtt would warn about every pending one past 10.
        client.pending_calls_threshold = 1 << 30
        paho = client._client
        # Commands are acknowledged only once they are recorded (see Dispatcher), so a crash
        # before that leaves them with the broker to deliver again.
        paho.manual_ack_set(True)
        # paho types each handler as "v1 or v2 signature, or unset"; aiomqtt builds its client with
        # CallbackAPIVersion.VERSION2 and installs all four, so they are the v2 ones wrapped here.
        aiomqtt_on_publish = cast("CallbackOnPublish_v2", paho.on_publish)
        aiomqtt_on_connect = cast("CallbackOnConnect_v2", paho.on_connect)
        aiomqtt_on_message = cast("CallbackOnMessage", paho.on_message)
        aiomqtt_on_disconnect = cast("CallbackOnDisconnect_v2", paho.on_disconnect)
        self.redelivered.clear()

        def on_publish(c: Any, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
            for handler in list(self.puback_handlers):
                if handler(mid, reason):
                    return
            aiomqtt_on_publish(c, userdata, mid, reason, properties)

        def on_connect(c: Any, userdata: Any, flags: Any, reason: ReasonCode, properties: Any = None) -> None:
            self.receive_maximum = int(getattr(properties, "ReceiveMaximum", 65535) or 65535)
            aiomqtt_on_connect(c, userdata, flags, reason, properties)

        def on_message(c: Any, userdata: Any, message: Any) -> None:
            if message.dup and message.qos > 0:
                self.redelivered.add(message.mid)
            aiomqtt_on_message(c, userdata, message)

        def on_disconnect(c: Any, userdata: Any, flags: Any, reason: Any, properties: Any = None) -> None:
            # aiomqtt ignores a close that comes before the CONNACK and waits out the whole connect
            # timeout; a load balancer or a broker at its connection limit does exactly that.
            connected = client._connected
            if not connected.done():
                connected.set_exception(aiomqtt.MqttError(f"connection closed before CONNACK ({reason})"))
            aiomqtt_on_disconnect(c, userdata, flags, reason, properties)

        paho.on_publish = on_publish
        paho.on_connect = on_connect
        paho.on_message = on_message
        paho.on_disconnect = on_disconnect
        return client
