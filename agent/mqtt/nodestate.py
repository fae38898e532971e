"""The retained node-state message: online or not, versions served, health.

Published retained on every connect and whenever a model changes, so a fleet
console that subscribes to ``<prefix>/nodes/+/state`` sees every node's
current state at once; the connection's last will overwrites it with an
offline record if the node vanishes without saying goodbye.
"""

from __future__ import annotations

import time
from typing import Any

import orjson


def online_state(node: str, status: dict[str, Any] | None, groups: tuple[str, ...], error: str | None = None) -> bytes:
    """``status`` is :meth:`agent.control.Control.status`; None when it could not be read."""
    models = []
    broken = False
    for model in (status or {}).get("models", []):
        state = model.get("status", "ok")
        broken = broken or state != "ok"
        models.append(
            {
                "name": model.get("name"),
                "active_version": model.get("active_version"),
                "serving": model.get("serving", []),
                "pinned": model.get("pinned", False),
                "status": state,
                **({"error": model["error"]} if model.get("error") else {}),
            }
        )
    if status is None:
        health = "unknown"
    elif broken or not status.get("ready", True):
        health = "degraded"
    else:
        health = "ok"
    doc: dict[str, Any] = {
        "node": node,
        "online": True,
        "ts": round(time.time(), 3),
        "health": health,
        "groups": list(groups),
        "models": models,
    }
    if error is not None:
        doc["error"] = error
    return orjson.dumps(doc, default=str)


def offline_state(node: str, reason: str) -> bytes:
    return orjson.dumps({"node": node, "online": False, "ts": round(time.time(), 3), "reason": reason})


def will_payload(node: str, registered_at: float) -> bytes:
    """The last will, made afresh for each connection.

    The broker keeps it from the CONNECT and publishes it when the node vanishes, so
    the only time it can carry is ``registered_at``: when the will was registered (the
    connect), not when the node was lost. Otherwise it is an offline state like any.
    """
    return orjson.dumps({"node": node, "online": False, "reason": "connection lost", "ts": round(registered_at, 3)})
