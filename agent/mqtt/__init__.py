"""The MQTT fleet channel (docs/MQTT.md): signed commands in, node state, telemetry and events out.

The service is :class:`agent.mqtt.channel.MqttChannel`; ``edge-agent run``
builds it through ``agent.wiring.attach_mqtt`` when ``[mqtt] host`` is set.
Fleet tools that only sign commands import :mod:`agent.mqtt.commands` alone,
which does not pull in the MQTT client library.
"""
