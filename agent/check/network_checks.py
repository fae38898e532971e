"""Checks over the network: the MQTT broker (and the fleet's clock through it), each image registry.

The broker is reached with the agent's own connection builder (:meth:`agent.mqtt.connection.Link.make_client`:
the same TLS context, client certificate, password file, MQTT v5), under a client id of its own (never
the node's: that would take over the running agent's session) and a session that ends with the probe.

MQTT has no broker clock, so the clock is the fleet's: a retained message on ``<prefix>/fleet/clock``,
``{"ts": <unix seconds>, "expiry_s": <its message expiry interval>}`` (docs/MQTT.md, "Fleet clock"),
republished by the fleet's tooling. The broker counts a retained message's remaining expiry down, so
the message's age is ``expiry_s`` minus what is left of it, and the fleet's time now is ``ts`` plus
that age; the difference to this node's clock is the skew that signed commands' ``issued_at`` and
``expires_at`` are judged with.

Registries get ``GET /v2/`` through the pull's own transport (the host's ``ca_file``, credentials,
plain HTTP only where configured), one attempt.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import secrets
import ssl
import time
from collections.abc import Callable
from typing import Any

from agent.check import CheckOptions, Finding, Planned
from agent.config import Config
from agent.errors import AgentError

NAMES = ("broker", "clock", "registries")
CLOCK_TOPIC = "fleet/clock"
# Skew above this is reported as a warning; above the command window (command_max_skew_s) as a failure.
CLOCK_WARN_S = 30.0
# How long a connected probe waits for the retained clock (the broker sends it right after SUBACK).
CLOCK_WAIT_S = 3.0
SYNC_TIME = "sync this node's clock (timedatectl set-ntp true; chrony or systemd-timesyncd)"


def plan(config: Config, options: CheckOptions) -> list[Planned]:
    planned = [Planned(("broker", "clock"), run_async=lambda: broker_and_clock(config, options.timeout_s))]
    hosts = registry_hosts(config)
    if hosts is None or not hosts:
        why = "not checked: [registry] or [trust] does not parse" if hosts is None else "no registry configured"
        planned.append(Planned(("registries",), sync=lambda: Finding("registries", "skip", why)))
    for host in hosts or ():
        planned.append(Planned((f"registry {host}",), sync=_registry_check(config, host, options.timeout_s)))
    return planned


def _registry_check(config: Config, host: str, timeout_s: float) -> Callable[[], Finding]:
    return lambda: registry(config, host, timeout_s)


# -- the broker -----------------------------------------------------------------------------------
class _Quiet:
    """The Link's logger: the check reports what it finds itself, in its own table."""

    def info(self, *args: Any, **kwargs: Any) -> None:
        pass

    def warning(self, *args: Any, **kwargs: Any) -> None:
        pass

    def exception(self, *args: Any, **kwargs: Any) -> None:
        pass


def _describe_mqtt(exc: BaseException) -> tuple[str, str]:
    """(finding, action) for a failed connect, from the exception chain aiomqtt wraps."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = "; ".join(dict.fromkeys(str(e) or type(e).__name__ for e in chain))
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in chain) or "CERTIFICATE_VERIFY_FAILED" in text:
        return (
            f"TLS: the broker's certificate is not trusted ({text})",
            "set mqtt.ca_file to the CA that signed the broker's certificate (and check the host name)",
        )
    if any(isinstance(e, ssl.SSLError) for e in chain) or "SSL" in text or "TLS" in text:
        return (
            f"TLS handshake failed ({text})",
            "check mqtt.ca_file, cert_file/key_file (mutual TLS) and that the port speaks TLS",
        )
    lowered = text.lower()
    if "not authori" in lowered or "bad user" in lowered or "code:134" in lowered or "code:135" in lowered:
        return (f"the broker refused the credentials ({text})", "check mqtt.username and password/password_file")
    if "refused" in lowered:
        return (
            f"nothing accepts connections there ({text})",
            "start the broker, or fix mqtt.host / mqtt.port (firewall?)",
        )
    if "timed out" in lowered or isinstance(exc, TimeoutError):
        return (f"no answer ({text})", "check mqtt.host, mqtt.port and the network path (firewall, proxy)")
    return (text, "check the [mqtt] settings and the broker's log")


async def broker_and_clock(config: Config, timeout_s: float) -> list[Finding]:
    import aiomqtt

    from agent.mqtt.connection import Link
    from agent.mqtt.settings import MqttSettings

    try:
        settings = MqttSettings.from_config(config)
    except AgentError as exc:
        why = f"not checked: [mqtt] does not parse ({exc})"
        return [Finding("broker", "skip", why, "fix [mqtt] first"), Finding("clock", "skip", why)]
    if not settings.enabled:
        return [
            Finding("broker", "skip", "MQTT is off ([mqtt] host unset)"),
            Finding("clock", "skip", "MQTT is off: the clock is not compared with the fleet's", SYNC_TIME),
        ]
    where = f"{settings.host}:{settings.effective_port}"
    # The clock's wait and the connect share the check's time (the connect never more than configured).
    clock_wait = min(CLOCK_WAIT_S, timeout_s / 4)
    probe = dataclasses.replace(
        settings,
        session_expiry_s=0,
        connect_timeout_s=min(settings.connect_timeout_s, timeout_s * 0.9 - clock_wait),
    )
    link = Link(probe, client_id=f"{config.node_id}-check-{secrets.token_hex(4)}", will=lambda: None, log=_Quiet())
    try:
        client = await link.make_client()
    except AgentError as exc:  # an unreadable CA, client key or password file: the agent could not connect either
        return [
            Finding("broker", "fail", f"{where}: {exc}", "fix the [mqtt] TLS/password files named"),
            Finding("clock", "skip", "not checked: the broker is not reachable", SYNC_TIME),
        ]
    how = ("TLS" + (" + client certificate" if settings.cert_file else "")) if settings.tls else "plain TCP"
    if settings.username:
        how += f", user {settings.username}"
    try:
        async with client:
            broker = _broker_finding(where, how, settings)
            clock = await _clock(client, settings, clock_wait)
    except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
        finding, action = _describe_mqtt(exc)
        return [
            Finding("broker", "fail", f"{where} ({how}): {finding}", action),
            Finding("clock", "skip", "not checked: the broker is not reachable", SYNC_TIME),
        ]
    return [broker, clock]


def _broker_finding(where: str, how: str, settings: Any) -> Finding:
    if settings.username and not settings.tls:
        return Finding(
            "broker",
            "warn",
            f"{where}: connected ({how}), but the password crosses the network in clear",
            "set mqtt.ca_file to use TLS",
        )
    if not settings.tls:
        return Finding(
            "broker",
            "warn",
            f"{where}: connected ({how}): commands and telemetry travel unencrypted",
            "set mqtt.ca_file (TLS), and a client certificate or password",
        )
    return Finding("broker", "pass", f"{where}: connected ({how})")


async def _clock(client: Any, settings: Any, wait_s: float) -> Finding:
    topic = f"{settings.topic_prefix}/{CLOCK_TOPIC}"
    await client.subscribe(topic, qos=0)
    try:
        async with asyncio.timeout(wait_s):
            async for message in client.messages:
                if str(message.topic) == topic:
                    return clock_finding(message.payload, message.properties, time.time(), settings, topic)
    except TimeoutError:
        pass
    return Finding(
        "clock",
        "skip",
        f"no retained fleet clock on {topic}: skew not measured",
        f"have the fleet publish one (docs/MQTT.md, Fleet clock), or {SYNC_TIME}",
    )


def clock_finding(payload: Any, properties: Any, now: float, settings: Any, topic: str) -> Finding:
    """The skew between this node's clock and the fleet's clock message, judged against the command window."""
    try:
        doc = json.loads(payload)
        ts = float(doc["ts"])
        expiry = doc.get("expiry_s")
        if not math.isfinite(ts):
            raise ValueError(ts)
    except (ValueError, TypeError, KeyError, AttributeError):
        return Finding(
            "clock",
            "warn",
            f'{topic} is not {{"ts": <unix seconds>, ...}}: skew not measured',
            "publish the fleet clock as docs/MQTT.md says",
        )
    remaining = getattr(properties, "MessageExpiryInterval", None) if properties is not None else None
    age_known = isinstance(expiry, (int, float)) and remaining is not None and 0 <= remaining <= expiry
    age = float(expiry - remaining) if age_known else 0.0
    skew = now - (ts + age)  # > 0: this node is ahead of the fleet
    limit = settings.command_max_skew_s
    if skew > 0:
        effect = f"ahead of the fleet by {skew:.0f} s: commands look {skew:.0f} s older and expire early"
    else:
        effect = (
            f"behind the fleet by {-skew:.0f} s: commands look issued {-skew:.0f} s in the future "
            f"(refused as not_yet_valid beyond mqtt.command_max_skew_s = {limit:g} s)"
        )
    caveat = "" if age_known else " (the message's age is unknown: it carries no expiry)"
    if abs(skew) > limit:
        return Finding("clock", "fail", f"this clock is {effect}{caveat}", SYNC_TIME)
    if abs(skew) > min(CLOCK_WARN_S, limit / 2):
        return Finding("clock", "warn", f"this clock is {effect}{caveat}", SYNC_TIME)
    return Finding("clock", "pass", f"within {abs(skew):.1f} s of the fleet clock on {topic}{caveat}")


# -- registries -----------------------------------------------------------------------------------
def registry_hosts(config: Config) -> list[str] | None:
    """Every registry the node is configured for: ``[registry.hosts]`` and the hosts of ``[trust.scopes]``."""
    from agent.images.settings import RegistrySettings, TrustSettings

    try:
        registry_settings = RegistrySettings.from_config(config)
        trust = TrustSettings.from_config(config)
    except AgentError:
        return None
    hosts = dict.fromkeys(registry_settings.hosts)
    for scope in trust.scopes:
        hosts.setdefault(scope.split("/", 1)[0])
    return list(hosts)


def registry(config: Config, host: str, timeout_s: float) -> Finding:
    from agent.errors import AuthError
    from agent.images.settings import RegistrySettings
    from agent.images.transport import Transport

    name = f"registry {host}"
    settings = RegistrySettings.from_config(config)
    probe = dataclasses.replace(
        settings,
        attempts=1,
        connect_timeout_s=min(settings.connect_timeout_s, timeout_s),
        stall_timeout_s=min(settings.stall_timeout_s, timeout_s),
    )
    host_settings = settings.host(host)
    transport = Transport(host, probe, sleep=lambda _s: None)
    how = (
        "plain HTTP"
        if host_settings.plain_http
        else (f"TLS, ca_file {host_settings.ca_file}" if host_settings.ca_file else "TLS, system CAs")
    )
    try:
        resp = transport.request("GET", "/v2/", scope="", what="GET /v2/", ok=(200, 401), retry=False)
        status = resp.status
        resp.read_limited(64 * 1024, "/v2/ body")
    except AuthError as exc:
        return Finding(name, "fail", f"{how}: {exc}", f'set [registry.hosts."{host}"] username and password_file')
    except AgentError as exc:
        text = str(exc)
        if "not trusted" in text:
            action = f'set [registry.hosts."{host}"] ca_file to the CA that signed its certificate'
        elif "plain HTTP" in text:
            action = f'it speaks plain HTTP: set [registry.hosts."{host}"] plain_http = true (trusted networks only)'
        else:
            action = "check the host name, port and network path to the registry"
        return Finding(name, "fail", f"{how}: {text}", action)
    finally:
        transport.close()
    if status == 401:
        if host_settings.username:
            return Finding(
                name,
                "fail",
                f"{how}: answers, but refuses the configured credentials",
                f'check [registry.hosts."{host}"] username and password_file',
            )
        return Finding(
            name,
            "warn",
            f"{how}: answers, and asks for credentials (none configured); anonymous pulls may still be allowed",
            f'set [registry.hosts."{host}"] username and password_file',
        )
    if host_settings.plain_http and not _loopback_host(host):
        return Finding(
            name,
            "warn",
            f"{how}: answers /v2/ over the network without TLS",
            "serve the registry over TLS and set ca_file instead of plain_http",
        )
    return Finding(name, "pass", f"{how}: answers /v2/")


def _loopback_host(host: str) -> bool:
    import ipaddress

    bare = host.rsplit(":", 1)[0].strip("[]") if not host.endswith("]") else host.strip("[]")
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False
