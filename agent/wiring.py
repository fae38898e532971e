"""Attaches the optional subsystems to an :class:`agent.daemon.Agent`.

The core agent serves models from its store and nothing else; ``edge-agent run``
and the fleet simulator call :func:`attach_services` to give it image pulls, the
drop-in folder, the MQTT fleet channel, the Kubernetes watcher and systemd
notification. Each ``attach_*`` reads its own config section and does nothing
when that subsystem is disabled, so an agent on embedded defaults needs no
broker, registry or cluster.
"""

from __future__ import annotations

from typing import Any


def attach_services(agent: Any) -> None:
    """Order matters: services start in this order and stop in reverse."""
    from agent.images.service import attach_images
    from agent.lifecycle import attach_lifecycle

    if agent.control is None:
        attach_lifecycle(agent)
    attach_images(agent)
    # The drop-in folder imports through the puller's trust checks, so it comes after it.
    from agent.inbox import attach_inbox

    attach_inbox(agent)
    # Kubernetes feeds the reconciler, so it comes after it (and after image pulls).
    from agent.k8s import attach_k8s

    attach_k8s(agent)
    from agent.mqtt import attach_mqtt  # the fleet channel feeds the reconciler too; nothing unless [mqtt] host

    attach_mqtt(agent)
    # Last: READY=1 goes out once every other service has started (agent/sdnotify.py),
    # and since services stop in reverse, STOPPING=1 goes out first.
    from agent.sdnotify import attach_sdnotify

    attach_sdnotify(agent)
