"""Desired state, per source, persisted in SQLite.

Each source (Kubernetes, MQTT, local: CLI / local API / drop-in folder) owns
its own set of :class:`ModelDeployment` rows. For each model the *governing*
source is the highest-precedence one that declares it (``SOURCES`` order);
only that source's wish is reconciled, and lower sources may not change the
model. The table survives restarts, so an offline node resumes the last
state it was told, whichever source told it.

A deployment with ``pinned`` set holds the version it brought the model to:
``held_version`` records it once reached, and stays while that source's
deployment is unchanged, so a restart or a re-resolved moving tag does not move
the model. A new deployment from that source clears it.
"""

from __future__ import annotations

import orjson

from agent.control import SOURCES, ModelDeployment
from agent.errors import BadRequest
from agent.state import StateDB


class DesiredState:
    """Each source's wishes, through the ``desired`` table's accessor (agent/state)."""

    def __init__(self, db: StateDB):
        self.rows = db.desired

    @property
    def upgraded_from_flag_pins(self) -> bool:
        """True while pins recorded the old way (the ``models.pinned`` flag alone) wait to be adopted.

        Set by the schema migration that added ``held_version``; kept in the database,
        so an upgrade first opened by the CLI still has its pins adopted by the next
        agent start. The lifecycle clears it once it has adopted them.
        """
        return self.rows.flag_pins_pending()

    @upgraded_from_flag_pins.setter
    def upgraded_from_flag_pins(self, pending: bool) -> None:
        self.rows.set_flag_pins_pending(pending)

    @staticmethod
    def rank(source: str) -> int:
        if source not in SOURCES:
            raise BadRequest(f"unknown desired-state source {source!r} (one of {', '.join(SOURCES)})")
        return SOURCES.index(source)

    def put(self, source: str, deployment: ModelDeployment) -> None:
        """Record what ``source`` wants for one model; a changed wish drops the version it held."""
        self.rank(source)
        self.rows.put(source, deployment.model, _spec(deployment))

    def hold(self, source: str, deployment: ModelDeployment, version: str) -> bool:
        """Record the version ``source``'s pinned ``deployment`` reached.

        Compare-and-set: nothing is recorded when the source's row holds another
        deployment by now (a newer wish must never be held at an older one's
        version). True when recorded.
        """
        return self.rows.hold(source, deployment.model, _spec(deployment), version)

    def held(self, source: str, model: str) -> str | None:
        return self.rows.held(source, model)

    def delete(self, source: str, model: str) -> None:
        self.rows.delete(source, model)

    def replace(self, source: str, deployments: list[ModelDeployment]) -> None:
        """The whole set ``source`` wants now; models it no longer lists are dropped from it.

        A deployment repeated unchanged keeps the version its pin holds.
        """
        self.rank(source)
        # A model listed twice: the last one wins, as it always has.
        self.rows.replace(source, {dep.model: _spec(dep) for dep in deployments})

    def by_source(self, source: str) -> dict[str, ModelDeployment]:
        return {row.model: _deployment(row.spec) for row in self.rows.rows(source)}

    def effective(self) -> dict[str, tuple[str, ModelDeployment]]:
        """model -> (governing source, what it wants)."""
        best: dict[str, tuple[str, ModelDeployment]] = {}
        for row in sorted(self.rows.rows(), key=lambda r: self.rank(r.source), reverse=True):
            best[row.model] = (row.source, _deployment(row.spec))
        return best

    def governing_source(self, model: str) -> str | None:
        entry = self.effective().get(model)
        return entry[0] if entry else None


def _spec(deployment: ModelDeployment) -> str:
    """The stored form of a deployment; equal specs are equal wishes (held_version's rule)."""
    return orjson.dumps(deployment.to_dict()).decode()


def _deployment(spec: str) -> ModelDeployment:
    return ModelDeployment.from_dict(orjson.loads(spec))
