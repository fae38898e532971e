"""The MQTT fleet channel (docs/MQTT.md): signed commands in, node state, telemetry and events out.

The service is :class:`agent.mqtt.channel.MqttChannel`; ``edge-agent run``
attaches it through :func:`attach_mqtt`. Fleet tools that only sign commands
import :mod:`agent.mqtt.commands` alone, which does not pull in the MQTT
client library.
"""

from __future__ import annotations

from typing import Any


def attach_mqtt(agent: Any) -> Any:
    """Give an agent its fleet channel when ``[mqtt] host`` is set; otherwise do nothing and return None.

    Settings are parsed (and a bad value refused, naming the key) here, at
    start-up; the broker is not contacted until the agent's services start,
    and then only in the background, so the agent serves whether or not the
    broker is reachable.
    """
    from agent.mqtt.settings import MqttSettings

    settings = MqttSettings.from_config(agent.config)
    if not settings.enabled:
        agent.mqtt = None
        return None
    from agent.mqtt.channel import MqttChannel

    channel = MqttChannel(agent, settings)
    agent.mqtt = channel
    agent.services.append(channel)
    return channel
