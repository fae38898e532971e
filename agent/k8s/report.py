"""What a node tells the cluster: its entry in a resource's status, and Kubernetes Events.

Pure functions over the agent's own status and events, so what the cluster
sees can be tested without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.events import Event
from agent.k8s.crd import Resource


@dataclass(frozen=True)
class EventSpec:
    reason: str
    type: str  # Normal | Warning
    action: str


# Not from the bus: the watcher's own verdict on a model that set_desired failed.
RECONCILE_FAILED = "k8s.reconcile_failed"

# Agent events worth a Kubernetes Event on the resource that governs the model.
EVENT_SPECS = {
    RECONCILE_FAILED: EventSpec("ReconcileFailed", "Warning", "Reconcile"),
    "model.swapped": EventSpec("Swapped", "Normal", "Swap"),
    "model.rollback": EventSpec("RolledBack", "Warning", "Rollback"),
    "model.swap_failed": EventSpec("SwapFailed", "Warning", "Swap"),
    "model.load_failed": EventSpec("LoadFailed", "Warning", "Load"),
    "model.broken": EventSpec("ModelBroken", "Warning", "Serve"),
    "image.refused": EventSpec("ImageRefused", "Warning", "Pull"),
}
# Events that set (or clear) the error a node reports for a model.
ERROR_KINDS = {RECONCILE_FAILED, "model.swap_failed", "model.load_failed", "model.broken", "image.refused"}
CLEAR_KINDS = {"model.swapped", "model.rollback"}


def event_ref(event: Event) -> str | None:
    """The image reference an event is about, under whichever name its producer used."""
    for key in ("ref", "image", "reference"):
        value = event.fields.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def event_error(event: Event) -> str:
    for key in ("error", "reason", "message"):
        value = event.fields.get(key)
        if value:
            return str(value)
    return event.kind


def event_message(event: Event, node: str) -> str:
    f = event.fields
    model, version = f.get("model", "?"), f.get("version")
    if event.kind == "model.swapped":
        previous = f" (was {f['previous']})" if f.get("previous") else ""
        return f"node {node} serves {model} version {version}{previous}"
    if event.kind == "model.rollback":
        return f"node {node} rolled {model} back to version {version}"
    what = f"{model} version {version}" if version else (event_ref(event) or str(model))
    return f"node {node}: {what}: {event_error(event)}"


def node_entry(resource: Resource, model: dict[str, Any] | None, error: str | None) -> dict[str, Any]:
    """This node's entry for ``resource``, without the ``updated`` stamp (see :func:`stamped`).

    Keys without a value are left out rather than sent as null: in a merge
    patch null means "delete", and the entry must compare equal to what the
    API server hands back.
    """
    entry: dict[str, Any] = {"observedGeneration": resource.generation, "lastError": error or ""}
    if model is not None:
        if model.get("active_version"):
            entry["version"] = str(model["active_version"])
        serving = [str(v) for v in model.get("serving") or []]
        if len(serving) > 1:
            entry["serving"] = serving
    return entry


def unchanged(current: Any, entry: dict[str, Any]) -> bool:
    if not isinstance(current, dict):
        return False
    return {k: v for k, v in current.items() if k != "updated"} == entry


def stamped(entry: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    return {**entry, "updated": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
