"""Real components for the MQTT tests: a Mosquitto broker, a cuttable TCP path, a recording subscriber, a commander.

The broker is the system's ``/usr/sbin/mosquitto`` run as a process on a free
loopback port with a configuration written per test: anonymous, a password
file made with ``mosquitto_passwd``, TLS with a CA and certificates generated
here with ``cryptography`` (client certificates required), and ACL files. It
can be killed (SIGKILL or SIGTERM) and started again on the same port.

The recorder subscribes (MQTT v5, QoS 1, its own thread) and keeps every
message with its sequence number, epoch and whether it was sent as backlog;
:func:`check_sequence` is the delivery check every fault test ends with.

Test modules import what they use from here (conftest puts tests/ on the path).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from ports import free_port

from agent.mqtt.commands import new_command, sign_command

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"

needs_mosquitto = pytest.mark.skipif(
    not os.path.exists(MOSQUITTO), reason="mosquitto (Debian package mosquitto) is not installed"
)


# Waits in these tests are hang guards, not speed checks: generous enough for a loaded 2-core CI machine.
HANG_S = 60.0


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- certificates ---------------------------------------------------------------------------------
@dataclass
class Cert:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return cert_path, key_path


def make_cert(common_name: str, issuer: Cert | None = None, ca: bool = False, server: bool = False) -> Cert:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    signer = issuer.key if issuer else key
    return Cert(key, builder.sign(signer, hashes.SHA256()))


@dataclass
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    # A certificate from a CA the broker does not trust.
    rogue_cert: Path
    rogue_key: Path


def make_tls(directory: Path, client_cn: str) -> TlsFiles:
    ca = make_cert("edge-test-ca", ca=True)
    ca_path, _ = ca.write(directory, "ca")
    server_cert, server_key = make_cert("localhost", ca, server=True).write(directory, "server")
    client_cert, client_key = make_cert(client_cn, ca).write(directory, "client")
    rogue_ca = make_cert("rogue-ca", ca=True)
    rogue_cert, rogue_key = make_cert(client_cn, rogue_ca).write(directory, "rogue")
    return TlsFiles(ca_path, server_cert, server_key, client_cert, client_key, rogue_cert, rogue_key)


# -- the broker -----------------------------------------------------------------------------------
class Broker:
    """One mosquitto process; ``restart`` brings it back on the same port with the same config."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        passwords: dict[str, str] | None = None,
        acl: str | None = None,
        tls: TlsFiles | None = None,
        persistence: bool = False,
        extra: str = "",
    ):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "mosquitto.log"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            # The tests' subscribers must see every message, however far behind they fall.
            "max_queued_messages 0",
            "max_queued_bytes 0",
            "max_inflight_messages 0",
            # Without it a command's PUBACK and its reply to the fleet tool wait on each other (Nagle).
            "set_tcp_nodelay true",
        ]
        if os.geteuid() == 0:
            # Started as root, mosquitto drops to the "mosquitto" user, which cannot read pytest's 0700 tmp dirs.
            lines.append("user root")
        if persistence:
            lines += [
                "persistence true",
                f"persistence_location {workdir}/",
                "persistence_file mosquitto.db",
                "autosave_interval 3600",
            ]
        if passwords is not None:
            pwfile = workdir / "passwd"
            pwfile.write_text("")
            for user, password in passwords.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(pwfile), user, password], check=True)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        elif tls is None:
            lines.append("allow_anonymous true")
        if tls is not None:
            lines += [
                f"cafile {tls.ca}",
                f"certfile {tls.server_cert}",
                f"keyfile {tls.server_key}",
                "require_certificate true",
                "use_identity_as_username true",
            ]
            if passwords is None:
                lines.append("allow_anonymous false")
        if acl is not None:
            acl_path = workdir / "acl"
            acl_path.write_text(acl)
            lines.append(f"acl_file {acl_path}")
        if extra:
            lines.append(extra)
        self.config_path = workdir / "mosquitto.conf"
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = HANG_S) -> Broker:
        assert self.proc is None or self.proc.poll() is not None, "broker already running"
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the process, closed with it
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.config_path)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited with {self.proc.returncode}:\n{self.log()}")
            # Its own word that it listens, not just "something accepts on the port": a port picked
            # free earlier may have been taken by another program meanwhile, and then mosquitto
            # fails to bind while a probe would connect to that other program.
            started = self.log_path.read_bytes()[offset:]
            if b" running" in started:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            time.sleep(0.02)
        raise AssertionError(f"mosquitto not listening after {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self, sig: int = signal.SIGKILL) -> None:
        self.stop(sig)
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def running_broker(workdir: Path, **kwargs: Any) -> Iterator[Broker]:
    broker = Broker(workdir, **kwargs).start()
    try:
        yield broker
    finally:
        broker.kill()


# -- a cuttable path between the agent and the broker -----------------------------------------------
class Cable:
    """A TCP relay on its own port: ``cut()`` is a network partition (connections reset, new ones refused)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._up = True
        self._closed = False
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            self._up = False
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    sock.close()

    def mend(self) -> None:
        with self._lock:
            self._up = True

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                up = self._up
            if not up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        socks = [a, b]
        try:
            while True:
                ready, _, _ = select.select(socks, [], [], 1.0)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (b if sock is a else a).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in socks:
                with contextlib.suppress(OSError):
                    sock.close()


# -- MQTT clients for the tests --------------------------------------------------------------------
def _client(client_id: str, broker: Broker, username: str | None = None, password: str | None = None) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    if username:
        client.username_pw_set(username, password)
    if broker.tls is not None:
        client.tls_set(str(broker.tls.ca), str(broker.tls.client_cert), str(broker.tls.client_key))
    client.reconnect_delay_set(0.05, 0.5)
    return client


@dataclass
class Received:
    topic: str
    doc: Any
    backlog: bool
    retain: bool
    at: float
    raw: bytes = b""


class Recorder:
    """A subscriber on its own thread; a persistent session, so it misses nothing across its reconnects."""

    def __init__(
        self,
        broker: Broker,
        topics: list[str],
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
    ):
        self.messages: list[Received] = []
        self.lock = threading.Lock()
        self.topics = topics
        self.client = _client(client_id or f"recorder-{uuid.uuid4().hex[:8]}", broker, username, password)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.connected = threading.Event()  # set once the broker has acknowledged the subscriptions
        self._subscribe_mid: int | None = None
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", broker.port, keepalive=5, clean_start=True, properties=props)
        self.client.loop_start()
        wait_until(self.connected.is_set, HANG_S, "the recorder to subscribe")

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
        if reason.is_failure:
            return
        # Later connects resume the session: subscribing again is harmless and covers a broker without persistence.
        # The SUBACK (``_on_subscribe``, on this same network thread, so it cannot come before the mid is kept)
        # says the subscription is in place; only then may the test go on.
        _, self._subscribe_mid = client.subscribe([(t, 1) for t in self.topics])

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any = None) -> None:
        if mid == self._subscribe_mid:
            self.connected.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        user = dict(getattr(props, "UserProperty", []) or [])
        try:
            doc = json.loads(msg.payload) if msg.payload else None
        except ValueError:
            doc = msg.payload
        with self.lock:
            self.messages.append(
                Received(msg.topic, doc, user.get("backlog") == "1", bool(msg.retain), time.monotonic(), msg.payload)
            )

    def on(self, topic_suffix: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if m.topic.endswith(topic_suffix)]

    def sequenced(self) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if isinstance(m.doc, dict) and "seq" in m.doc]

    def seqs(self) -> set[int]:
        return {m.doc["seq"] for m in self.sequenced()}

    def wait_for_seqs(self, wanted: set[int], timeout: float) -> None:
        def done() -> bool:
            return wanted <= self.seqs()

        try:
            wait_until(done, timeout, "every sequence number", interval=0.1)
        except AssertionError:
            missing = sorted(wanted - self.seqs())
            raise AssertionError(f"{len(missing)} sequence numbers missing, first {missing[:20]}") from None

    def close(self) -> None:
        self.client.loop_stop()
        with contextlib.suppress(Exception):
            self.client.disconnect()


@dataclass
class SequenceReport:
    first_arrivals: list[int] = field(default_factory=list)
    duplicates: int = 0
    backlog: int = 0


def check_sequence(messages: list[Received], expected: set[int] | None = None) -> SequenceReport:
    """The delivery check: one epoch; each expected number arrived; within each lane, first arrivals ascend.

    Delivery is at least once, so a number may come twice (a message whose PUBACK was lost is sent
    again); only its first arrival counts. Live messages may overtake the backlog (they are not
    throttled), so order is checked within the backlog lane and within the live lane, each of which
    the agent publishes in sequence order over one connection.
    """
    report = SequenceReport()
    epochs = {m.doc["epoch"] for m in messages}
    assert len(epochs) <= 1, f"several outbox epochs: {epochs}"
    seen: set[int] = set()
    last = {True: 0, False: 0}
    for m in messages:
        seq = m.doc["seq"]
        if seq in seen:
            report.duplicates += 1
            continue
        seen.add(seq)
        assert seq > last[m.backlog], (
            f"{'backlog' if m.backlog else 'live'} message {seq} arrived after {last[m.backlog]}"
        )
        last[m.backlog] = seq
        report.backlog += m.backlog
        report.first_arrivals.append(seq)
    if expected is not None:
        missing = expected - seen
        assert not missing, f"{len(missing)} messages never arrived, first {sorted(missing)[:20]}"
    return report


class Commander:
    """A fleet tool: signs commands, publishes them with a v5 response topic and correlation data, awaits replies."""

    def __init__(self, broker: Broker, private_key: ec.EllipticCurvePrivateKey, prefix: str = "edge", **auth: Any):
        self.key = private_key
        self.prefix = prefix
        self.client_id = f"fleet-{uuid.uuid4().hex[:8]}"
        self.reply_topic = f"{prefix}/replies/{self.client_id}"
        self.replies: dict[bytes, list[Any]] = {}
        self.cond = threading.Condition()
        self.client = _client(self.client_id, broker, auth.get("username"), auth.get("password"))
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a, **k: subscribed.set()
        self.client.connect("127.0.0.1", broker.port, keepalive=10)
        self.client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.loop_start()
        # Refusals never go to a response topic, only to the refusing node's own replies topic (docs/MQTT.md).
        self.client.subscribe([(self.reply_topic, 1), (f"{prefix}/nodes/+/replies", 1)])
        wait_until(subscribed.is_set, HANG_S, "the commander's subscription")

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None) or b""
        with self.cond:
            self.replies.setdefault(corr, []).append(json.loads(msg.payload))
            self.cond.notify_all()

    def command(self, node: str, name: str, args: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        return new_command(name, args, target=f"node:{node}", **kw)

    def send_raw(self, topic: str, payload: bytes, correlation: bytes | None = None) -> bytes:
        corr = correlation or uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = corr
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(HANG_S)
        return corr

    def wait_reply(self, corr: bytes, timeout: float = HANG_S, count: int = 1) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.replies.get(corr, [])) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no reply within {timeout}s")
                self.cond.wait(left)
            return self.replies[corr][count - 1]

    def node_topic(self, node: str) -> str:
        return f"{self.prefix}/nodes/{node}/cmd"

    def send(self, node: str, body: dict[str, Any] | str, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
        return self.send_raw(self.node_topic(node), sign_command(key or self.key, body))

    def call(self, node: str, name: str, args: dict[str, Any] | None = None, timeout: float = HANG_S) -> Any:
        corr = self.send(node, self.command(node, name, args))
        return self.wait_reply(corr, timeout)

    def close(self) -> None:
        self.client.loop_stop()
        with contextlib.suppress(Exception):
            self.client.disconnect()


def fleet_keypair(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    """A fleet signing key (written the way ``edge-agent keygen`` writes one) and its public key file."""
    from agent.images.signing import generate_keypair, load_private_key

    directory.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = generate_keypair(directory / "fleet", None)
    return load_private_key(key_path, lambda _confirm: b""), pub_path
