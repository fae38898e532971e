"""The agent's durable state: one SQLite database (WAL) through sqlite-utils.

It records which model versions the node has (and the digests of their
blobs), which version of each model is active, and whatever later subsystems
persist (tags, desired state, outbox) in tables of their own. Start-up reads
only this database and the blob store, never the network.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from agent.fsmodes import create_private_file, private_dirs

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class VersionRecord:
    model: str
    version: str
    config_digest: str  # model.json
    module_digest: str  # model.wasm
    weights_digest: str  # weights.safetensors
    manifest_digest: str | None
    source: str
    created_at: float
    status: str  # "ready" | "broken"
    error: str | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> VersionRecord:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})

    @property
    def digests(self) -> tuple[str, str, str]:
        return self.config_digest, self.module_digest, self.weights_digest


@dataclass(frozen=True)
class ModelRecord:
    name: str
    active_version: str | None
    previous_version: str | None
    pinned: bool
    status: str  # "ok" | "broken"
    error: str | None
    updated_at: float


class StateDB:
    """Thread-safe wrapper: the daemon touches it from the loop and from workers."""

    def __init__(self, path: Path):
        self.path = Path(path)
        private_dirs(self.path.parent)
        # 0600 before SQLite opens it: SQLite gives the -wal and -shm files the database's mode.
        create_private_file(self.path)
        conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0)
        self.db = sqlite_utils.Database(conn)
        self.lock = threading.RLock()
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode is durable across application crashes (kill -9);
        # only an OS crash may lose the last transactions.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    def _migrate(self) -> None:
        with self.lock:
            if "models" not in self.db.table_names():
                self.db["models"].create(
                    {
                        "name": str,
                        "active_version": str,
                        "previous_version": str,
                        "pinned": int,
                        "status": str,
                        "error": str,
                        "updated_at": float,
                    },
                    pk="name",
                    not_null={"name", "status"},
                    defaults={"pinned": 0, "status": "ok"},
                )
            if "versions" not in self.db.table_names():
                self.db["versions"].create(
                    {
                        "model": str,
                        "version": str,
                        "config_digest": str,
                        "module_digest": str,
                        "weights_digest": str,
                        "manifest_digest": str,
                        "source": str,
                        "created_at": float,
                        "status": str,
                        "error": str,
                    },
                    pk=("model", "version"),
                    not_null={"model", "version", "config_digest", "module_digest", "weights_digest"},
                    defaults={"status": "ready"},
                )
            if "meta" not in self.db.table_names():
                self.db["meta"].create({"key": str, "value": str}, pk="key")
                self.db["meta"].insert({"key": "schema_version", "value": str(SCHEMA_VERSION)})

    @contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """Several writes that land together or not at all."""
        with self.lock:
            conn = self.db.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- versions ---------------------------------------------------------
    def add_version(
        self,
        model: str,
        version: str,
        config_digest: str,
        module_digest: str,
        weights_digest: str,
        source: str,
        manifest_digest: str | None = None,
    ) -> VersionRecord:
        row = {
            "model": model,
            "version": version,
            "config_digest": config_digest,
            "module_digest": module_digest,
            "weights_digest": weights_digest,
            "manifest_digest": manifest_digest,
            "source": source,
            "created_at": time.time(),
            "status": "ready",
            "error": None,
        }
        with self.transaction() as db:
            db["versions"].upsert(row, pk=("model", "version"))
            if not list(db["models"].rows_where("name = ?", [model])):
                db["models"].insert({"name": model, "pinned": 0, "status": "ok", "updated_at": time.time()}, pk="name")
        return VersionRecord.from_row(row)

    def get_version(self, model: str, version: str) -> VersionRecord | None:
        with self.lock:
            rows = list(self.db["versions"].rows_where("model = ? and version = ?", [model, version]))
        return VersionRecord.from_row(rows[0]) if rows else None

    def versions(self, model: str | None = None) -> list[VersionRecord]:
        with self.lock:
            if model is None:
                rows = self.db["versions"].rows_where(order_by="model, created_at")
            else:
                rows = self.db["versions"].rows_where("model = ?", [model], order_by="created_at")
            return [VersionRecord.from_row(r) for r in rows]

    # The writes a swap makes are plain SQL: sqlite-utils introspects the table on
    # every call, which costs more than the write and holds the GIL the event loop needs.
    def set_version_status(self, model: str, version: str, status: str, error: str | None = None) -> None:
        with self.lock:
            self.db.conn.execute(
                "UPDATE versions SET status = ?, error = ? WHERE model = ? AND version = ?",
                (status, error, model, version),
            )
            self.db.conn.commit()

    def delete_version(self, model: str, version: str) -> None:
        with self.lock:
            self.db["versions"].delete((model, version))

    # -- models -----------------------------------------------------------
    def get_model(self, name: str) -> ModelRecord | None:
        with self.lock:
            rows = list(self.db["models"].rows_where("name = ?", [name]))
        return self._model(rows[0]) if rows else None

    def models(self) -> list[ModelRecord]:
        with self.lock:
            return [self._model(r) for r in self.db["models"].rows_where(order_by="name")]

    def set_active(self, model: str, version: str | None) -> None:
        """Record the routed version; the one it replaces becomes ``previous``."""
        with self.transaction() as db:
            row = db.conn.execute(
                "SELECT active_version, previous_version FROM models WHERE name = ?", (model,)
            ).fetchone()
            previous = row[0] if row else None
            if previous == version and row is not None:
                previous = row[1]
            db.conn.execute(
                "INSERT INTO models (name, active_version, previous_version, pinned, status, error, updated_at) "
                "VALUES (?, ?, ?, 0, 'ok', NULL, ?) ON CONFLICT(name) DO UPDATE SET "
                "active_version = excluded.active_version, previous_version = excluded.previous_version, "
                "status = 'ok', error = NULL, updated_at = excluded.updated_at",
                (model, version, previous, time.time()),
            )

    def set_model_status(self, model: str, status: str, error: str | None = None) -> None:
        with self.lock:
            self.db["models"].upsert(
                {"name": model, "status": status, "error": error, "updated_at": time.time()}, pk="name"
            )

    def set_pinned(self, model: str, pinned: bool) -> None:
        with self.lock:
            self.db["models"].update(model, {"pinned": int(pinned), "updated_at": time.time()})

    def delete_model(self, model: str) -> None:
        with self.transaction() as db:
            db["versions"].delete_where("model = ?", [model])
            db["models"].delete_where("name = ?", [model])

    def referenced_digests(self) -> set[str]:
        """Every blob digest some recorded version needs (for cache GC)."""
        digests: set[str] = set()
        for rec in self.versions():
            digests.update(rec.digests)
            if rec.manifest_digest:
                digests.add(rec.manifest_digest)
        return digests

    def close(self) -> None:
        with self.lock:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self.db.conn.close()

    @staticmethod
    def _model(row: dict[str, Any]) -> ModelRecord:
        return ModelRecord(
            name=row["name"],
            active_version=row["active_version"],
            previous_version=row["previous_version"],
            pinned=bool(row["pinned"]),
            status=row["status"],
            error=row["error"],
            updated_at=row["updated_at"] or 0.0,
        )
