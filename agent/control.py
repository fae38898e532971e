"""The one control surface of an agent, shared by every front end.

The CLI, the local repository API, the drop-in folder, MQTT fleet commands
and the Kubernetes watcher all drive the node through :class:`Control`, and
every change ends up in the single reconciler, so precedence and persistence
are decided in one place (docs/ARCHITECTURE.md, "Desired state").

Each operation returns a JSON-serialisable result dict and raises
:class:`agent.errors.AgentError` subclasses on failure; callers report the
error's message and never need to know which component failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

# Sources of desired state, highest precedence first (docs/ARCHITECTURE.md).
SOURCES = ("k8s", "mqtt", "local")


@dataclass(frozen=True)
class ModelDeployment:
    """What one source wants for one model."""

    model: str
    ref: str  # OCI reference (tag or @sha256 digest) or "store:<version>" for a stored version
    pinned: bool = False
    # Canary split: version -> weight. Empty means all traffic to ``ref``.
    traffic: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "ref": self.ref, "pinned": self.pinned, "traffic": dict(self.traffic)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ModelDeployment:
        return cls(
            model=str(doc["model"]),
            ref=str(doc["ref"]),
            pinned=bool(doc.get("pinned", False)),
            traffic={str(k): int(v) for k, v in (doc.get("traffic") or {}).items()},
        )


class Control(Protocol):
    async def deploy(self, ref: str, *, source: str = "local", model: str | None = None) -> dict[str, Any]:
        """Pull (when remote), verify, load, warm and switch to ``ref``."""

    async def rollback(self, model: str, *, source: str = "local") -> dict[str, Any]:
        """Switch back to the previous version, kept warm for a grace period."""

    async def pin(self, model: str, pinned: bool = True, *, source: str = "local") -> dict[str, Any]:
        """Hold (or release) the active version against automatic changes."""

    async def unload(self, model: str, *, source: str = "local") -> dict[str, Any]:
        """Stop serving a model (its blobs stay cached)."""

    async def set_desired(self, source: str, deployments: list[ModelDeployment]) -> dict[str, Any]:
        """Replace everything ``source`` wants with ``deployments`` and reconcile."""

    async def status(self) -> dict[str, Any]:
        """Node state: models, versions served, health, cache use."""

    async def cache_gc(self) -> dict[str, Any]: ...

    async def cache_verify(self) -> dict[str, Any]: ...

    async def set_config(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Change the settings that may change at run time."""
