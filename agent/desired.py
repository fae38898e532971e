"""Desired state, per source, persisted in SQLite.

Each source (Kubernetes, MQTT, local: CLI / local API / drop-in folder) owns
its own set of :class:`ModelDeployment` rows. For each model the *governing*
source is the highest-precedence one that declares it (``SOURCES`` order);
only that source's wish is reconciled, and lower sources may not change the
model. The table survives restarts, so an offline node resumes the last
state it was told, whichever source told it.
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
        with db.lock:
            if "desired" not in db.db.table_names():
                db.db["desired"].create(
                    {"source": str, "model": str, "spec": str, "updated_at": float}, pk=("source", "model")
                )

    @staticmethod
    def rank(source: str) -> int:
        if source not in SOURCES:
            raise BadRequest(f"unknown desired-state source {source!r} (one of {', '.join(SOURCES)})")
        return SOURCES.index(source)

    def put(self, source: str, deployment: ModelDeployment) -> None:
        self.rank(source)
        with self.db.lock:
            self.db.db.conn.execute(
                "INSERT INTO desired (source, model, spec, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(source, model) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
                (source, deployment.model, orjson.dumps(deployment.to_dict()).decode(), time.time()),
            )
            self.db.db.conn.commit()

    def delete(self, source: str, model: str) -> None:
        with self.db.lock:
            self.db.db["desired"].delete_where("source = ? and model = ?", [source, model])

    def replace(self, source: str, deployments: list[ModelDeployment]) -> None:
        """The whole set ``source`` wants now; models it no longer lists are dropped from it."""
        self.rank(source)
        with self.db.transaction() as db:
            db["desired"].delete_where("source = ?", [source])
            now = time.time()
            for dep in deployments:
                db["desired"].insert(
                    {
                        "source": source,
                        "model": dep.model,
                        "spec": orjson.dumps(dep.to_dict()).decode(),
                        "updated_at": now,
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
