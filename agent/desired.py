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

import time

import orjson

from agent.control import SOURCES, ModelDeployment
from agent.errors import BadRequest
from agent.state import StateDB


class DesiredState:
    def __init__(self, db: StateDB):
        self.db = db
        # Set when this open added held_version: pins recorded the old way (the
        # models.pinned flag alone) are then adopted once by the lifecycle.
        self.upgraded_from_flag_pins = False
        with db.lock:
            if "desired" not in db.db.table_names():
                db.db["desired"].create(
                    {"source": str, "model": str, "spec": str, "updated_at": float, "held_version": str},
                    pk=("source", "model"),
                )
            elif "held_version" not in db.db["desired"].columns_dict:
                # Databases written before pins went through the reconciler.
                db.db["desired"].add_column("held_version", str)
                self.upgraded_from_flag_pins = True

    @staticmethod
    def rank(source: str) -> int:
        if source not in SOURCES:
            raise BadRequest(f"unknown desired-state source {source!r} (one of {', '.join(SOURCES)})")
        return SOURCES.index(source)

    def put(self, source: str, deployment: ModelDeployment) -> None:
        """Record what ``source`` wants for one model; a changed wish drops the version it held."""
        self.rank(source)
        spec = orjson.dumps(deployment.to_dict()).decode()
        with self.db.lock:
            self.db.db.conn.execute(
                "INSERT INTO desired (source, model, spec, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(source, model) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at, "
                "held_version = CASE WHEN desired.spec = excluded.spec THEN desired.held_version END",
                (source, deployment.model, spec, time.time()),
            )
            self.db.db.conn.commit()

    def hold(self, source: str, deployment: ModelDeployment, version: str) -> bool:
        """Record the version ``source``'s pinned ``deployment`` reached.

        Compare-and-set: nothing is recorded when the source's row holds another
        deployment by now (a newer wish must never be held at an older one's
        version). True when recorded.
        """
        spec = orjson.dumps(deployment.to_dict()).decode()
        with self.db.lock:
            cursor = self.db.db.conn.execute(
                "UPDATE desired SET held_version = ? WHERE source = ? AND model = ? AND spec = ?",
                (version, source, deployment.model, spec),
            )
            self.db.db.conn.commit()
            return cursor.rowcount > 0

    def held(self, source: str, model: str) -> str | None:
        with self.db.lock:
            row = self.db.db.conn.execute(
                "SELECT held_version FROM desired WHERE source = ? AND model = ?", (source, model)
            ).fetchone()
        return row[0] if row else None

    def delete(self, source: str, model: str) -> None:
        with self.db.lock:
            self.db.db["desired"].delete_where("source = ? and model = ?", [source, model])

    def replace(self, source: str, deployments: list[ModelDeployment]) -> None:
        """The whole set ``source`` wants now; models it no longer lists are dropped from it.

        A deployment repeated unchanged keeps the version its pin holds.
        """
        self.rank(source)
        with self.db.transaction() as db:
            kept = {
                row[0]: (row[1], row[2])
                for row in db.conn.execute("SELECT model, spec, held_version FROM desired WHERE source = ?", [source])
            }
            db["desired"].delete_where("source = ?", [source])
            now = time.time()
            for dep in deployments:
                spec = orjson.dumps(dep.to_dict()).decode()
                before = kept.get(dep.model)
                db["desired"].insert(
                    {
                        "source": source,
                        "model": dep.model,
                        "spec": spec,
                        "updated_at": now,
                        "held_version": before[1] if before is not None and before[0] == spec else None,
                    },
                    pk=("source", "model"),
                    replace=True,
                )

    def by_source(self, source: str) -> dict[str, ModelDeployment]:
        with self.db.lock:
            rows = list(self.db.db["desired"].rows_where("source = ?", [source]))
        return {r["model"]: ModelDeployment.from_dict(orjson.loads(r["spec"])) for r in rows}

    def effective(self) -> dict[str, tuple[str, ModelDeployment]]:
        """model -> (governing source, what it wants)."""
        with self.db.lock:
            rows = list(self.db.db["desired"].rows)
        best: dict[str, tuple[str, ModelDeployment]] = {}
        for row in sorted(rows, key=lambda r: self.rank(r["source"]), reverse=True):
            best[row["model"]] = (row["source"], ModelDeployment.from_dict(orjson.loads(row["spec"])))
        return best

    def governing_source(self, model: str) -> str | None:
        entry = self.effective().get(model)
        return entry[0] if entry else None
