"""``StateDB``: the one owner of ``agent.db``.

It opens the file (agent/state/sqlite.py), brings its schema to the current
version (agent/state/schema.py), and is the only code that runs SQL on it:
models and versions here, the other tables through the accessors it carries
(agent/state/tables.py). Thread-safe: the daemon uses it from the event loop
and from worker threads, one statement or transaction at a time.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.state.schema import META_SCHEMA_VERSION, migrate
from agent.state.sqlite import checkpoint_and_close, open_database, transaction
from agent.state.tables import DesiredTable, ImageTags, SwapJournal, VersionAccess

log = structlog.get_logger("edge_agent.state")


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
    status: str  # "ready" | "broken" | "failed"
    error: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> VersionRecord:
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

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ModelRecord:
        return cls(
            name=row["name"],
            active_version=row["active_version"],
            previous_version=row["previous_version"],
            pinned=bool(row["pinned"]),
            status=row["status"],
            error=row["error"],
            updated_at=row["updated_at"] or 0.0,
        )


_VERSION_COLUMNS = ", ".join(VersionRecord.__dataclass_fields__)


class StateDB:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn = open_database(self.path)
        self._conn.row_factory = sqlite3.Row
        try:
            migrated_from = migrate(self._conn, self.path)
        except BaseException:
            self._conn.close()
            raise
        if migrated_from:  # 0 is a new file: nothing to tell
            log.info("state database migrated", path=str(self.path), from_version=migrated_from)
        self.swaps = SwapJournal(self._conn, self._lock)
        self.desired = DesiredTable(self._conn, self._lock)
        self.image_tags = ImageTags(self._conn, self._lock)
        self.version_access = VersionAccess(self._conn, self._lock)

    def schema_version(self) -> int:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (META_SCHEMA_VERSION,)).fetchone()
        return int(row[0])

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
        """Record a version (replacing a row of the same name) and its model's row if it has none."""
        record = VersionRecord(
            model=model,
            version=version,
            config_digest=config_digest,
            module_digest=module_digest,
            weights_digest=weights_digest,
            manifest_digest=manifest_digest,
            source=source,
            created_at=time.time(),
            status="ready",
            error=None,
        )
        with self._lock, transaction(self._conn) as conn:
            conn.execute(
                f"INSERT INTO versions ({_VERSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(model, version) DO UPDATE SET config_digest = excluded.config_digest, "
                "module_digest = excluded.module_digest, weights_digest = excluded.weights_digest, "
                "manifest_digest = excluded.manifest_digest, source = excluded.source, "
                "created_at = excluded.created_at, status = excluded.status, error = excluded.error",
                tuple(getattr(record, k) for k in VersionRecord.__dataclass_fields__),
            )
            conn.execute(
                "INSERT INTO models (name, pinned, status, updated_at) VALUES (?, 0, 'ok', ?) "
                "ON CONFLICT(name) DO NOTHING",
                (model, time.time()),
            )
        return record

    def get_version(self, model: str, version: str) -> VersionRecord | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_VERSION_COLUMNS} FROM versions WHERE model = ? AND version = ?", (model, version)
            ).fetchone()
        return VersionRecord.from_row(row) if row else None

    def versions(self, model: str | None = None) -> list[VersionRecord]:
        with self._lock:
            if model is None:
                rows = self._conn.execute(f"SELECT {_VERSION_COLUMNS} FROM versions ORDER BY model, created_at")
            else:
                rows = self._conn.execute(
                    f"SELECT {_VERSION_COLUMNS} FROM versions WHERE model = ? ORDER BY created_at", (model,)
                )
            return [VersionRecord.from_row(r) for r in rows]

    # The writes a swap makes are single statements: each costs well under a
    # millisecond, and they run on a worker thread (lifecycle.py).
    def set_version_status(self, model: str, version: str, status: str, error: str | None = None) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE versions SET status = ?, error = ? WHERE model = ? AND version = ?",
                (status, error, model, version),
            )

    def delete_version(self, model: str, version: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM versions WHERE model = ? AND version = ?", (model, version))

    # -- models -----------------------------------------------------------
    def get_model(self, name: str) -> ModelRecord | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
        return ModelRecord.from_row(row) if row else None

    def models(self) -> list[ModelRecord]:
        with self._lock:
            return [ModelRecord.from_row(r) for r in self._conn.execute("SELECT * FROM models ORDER BY name")]

    def set_active(self, model: str, version: str | None) -> None:
        """Record the routed version; the one it replaces becomes ``previous``."""
        with self._lock, transaction(self._conn) as conn:
            row = conn.execute(
                "SELECT active_version, previous_version FROM models WHERE name = ?", (model,)
            ).fetchone()
            previous = row[0] if row else None
            if previous == version and row is not None:
                previous = row[1]
            conn.execute(
                "INSERT INTO models (name, active_version, previous_version, pinned, status, error, updated_at) "
                "VALUES (?, ?, ?, 0, 'ok', NULL, ?) ON CONFLICT(name) DO UPDATE SET "
                "active_version = excluded.active_version, previous_version = excluded.previous_version, "
                "status = 'ok', error = NULL, updated_at = excluded.updated_at",
                (model, version, previous, time.time()),
            )

    def set_model_status(self, model: str, status: str, error: str | None = None) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO models (name, status, error, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET status = excluded.status, error = excluded.error, "
                "updated_at = excluded.updated_at",
                (model, status, error, time.time()),
            )

    def set_pinned(self, model: str, pinned: bool) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE models SET pinned = ?, updated_at = ? WHERE name = ?", (int(pinned), time.time(), model)
            )

    def delete_model(self, model: str) -> None:
        with self._lock, transaction(self._conn) as conn:
            conn.execute("DELETE FROM versions WHERE model = ?", (model,))
            conn.execute("DELETE FROM models WHERE name = ?", (model,))

    def referenced_digests(self) -> set[str]:
        """Every blob digest some recorded version needs (for cache GC)."""
        digests: set[str] = set()
        for rec in self.versions():
            digests.update(rec.digests)
            if rec.manifest_digest:
                digests.add(rec.manifest_digest)
        return digests

    def close(self) -> None:
        with self._lock:
            checkpoint_and_close(self._conn)
