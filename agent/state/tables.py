"""Typed accessors for the tables of ``agent.db`` beyond models and versions.

Each is reached through :class:`agent.state.StateDB` (``db.swaps``,
``db.desired``, ``db.image_tags``, ``db.version_access``) and shares its
connection and lock; none creates a table (agent/state/schema.py does).
Writes are plain SQL: one statement is one transaction unless the method
says otherwise.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from agent.state.schema import META_ADOPT_FLAG_PINS
from agent.state.sqlite import transaction

SwapState = Literal["started", "switched", "failed", "abandoned"]


class _Table:
    def __init__(self, conn: sqlite3.Connection, lock: threading.RLock) -> None:
        self._conn = conn
        self._lock = lock

    def _execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._conn.execute(sql, params)

    def _all(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _one(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._conn.execute(sql, params).fetchone()
            return row


# -- swaps: the swap journal ------------------------------------------------------------------------
@dataclass(frozen=True)
class SwapRecord:
    id: int
    model: str
    from_version: str | None
    to_version: str
    source: str
    state: str  # a SwapState
    error: str | None
    started_at: float
    ended_at: float | None


_SWAP_COLUMNS = ", ".join(SwapRecord.__dataclass_fields__)


class SwapJournal(_Table):
    """Each swap gets a row before it starts and is closed when it ends, so a restart sees what a kill cut short."""

    def start(self, model: str, from_version: str | None, to_version: str, source: str) -> int:
        cursor = self._execute(
            "INSERT INTO swaps (model, from_version, to_version, source, state, started_at) "
            "VALUES (?, ?, ?, ?, 'started', ?)",
            (model, from_version, to_version, source, time.time()),
        )
        return int(cursor.lastrowid or 0)

    def end(self, swap_id: int, state: SwapState, error: str | None = None) -> None:
        self._execute(
            "UPDATE swaps SET state = ?, error = ?, ended_at = ? WHERE id = ?", (state, error, time.time(), swap_id)
        )

    def unfinished(self) -> list[SwapRecord]:
        """Swaps still ``started``: interrupted by a restart, oldest first."""
        rows = self._all(f"SELECT {_SWAP_COLUMNS} FROM swaps WHERE state = 'started' ORDER BY id")
        return [SwapRecord(**dict(r)) for r in rows]

    def entries(self) -> list[SwapRecord]:
        """The whole journal, oldest first."""
        return [SwapRecord(**dict(r)) for r in self._all(f"SELECT {_SWAP_COLUMNS} FROM swaps ORDER BY id")]


# -- desired: what each source wants ----------------------------------------------------------------
@dataclass(frozen=True)
class DesiredRow:
    source: str
    model: str
    spec: str  # the ModelDeployment, as JSON
    updated_at: float
    held_version: str | None  # the version a pinned deployment reached


class DesiredTable(_Table):
    """Rows of the ``desired`` table, keyed by (source, model).

    The rule the table keeps: ``held_version`` belongs to one ``spec``; writing a
    different spec for the same (source, model) clears it, writing the same spec keeps it.
    """

    def put(self, source: str, model: str, spec: str) -> None:
        self._execute(
            "INSERT INTO desired (source, model, spec, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(source, model) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at, "
            "held_version = CASE WHEN desired.spec = excluded.spec THEN desired.held_version END",
            (source, model, spec, time.time()),
        )

    def hold(self, source: str, model: str, spec: str, version: str) -> bool:
        """Set ``held_version`` only while the row still holds ``spec`` (compare-and-set); True when set."""
        cursor = self._execute(
            "UPDATE desired SET held_version = ? WHERE source = ? AND model = ? AND spec = ?",
            (version, source, model, spec),
        )
        return cursor.rowcount > 0

    def held(self, source: str, model: str) -> str | None:
        row = self._one("SELECT held_version FROM desired WHERE source = ? AND model = ?", (source, model))
        held: str | None = row[0] if row else None
        return held

    def delete(self, source: str, model: str) -> None:
        self._execute("DELETE FROM desired WHERE source = ? AND model = ?", (source, model))

    def replace(self, source: str, specs: Mapping[str, str]) -> None:
        """``source``'s rows become ``specs`` (model -> spec), in one transaction.

        A spec that is unchanged keeps its held version.
        """
        with self._lock, transaction(self._conn) as conn:
            kept = {
                row[0]: (row[1], row[2])
                for row in conn.execute("SELECT model, spec, held_version FROM desired WHERE source = ?", (source,))
            }
            conn.execute("DELETE FROM desired WHERE source = ?", (source,))
            now = time.time()
            for model, spec in specs.items():
                before = kept.get(model)
                conn.execute(
                    "INSERT OR REPLACE INTO desired (source, model, spec, updated_at, held_version) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (source, model, spec, now, before[1] if before is not None and before[0] == spec else None),
                )

    def rows(self, source: str | None = None) -> list[DesiredRow]:
        if source is None:
            found = self._all("SELECT source, model, spec, updated_at, held_version FROM desired")
        else:
            found = self._all(
                "SELECT source, model, spec, updated_at, held_version FROM desired WHERE source = ?", (source,)
            )
        return [DesiredRow(**dict(r)) for r in found]

    # Pins from before desired.held_version (schema.py, version 2): adopted once by the lifecycle.
    def flag_pins_pending(self) -> bool:
        return self._one("SELECT 1 FROM meta WHERE key = ?", (META_ADOPT_FLAG_PINS,)) is not None

    def set_flag_pins_pending(self, pending: bool) -> None:
        if pending:
            self._execute(
                "INSERT INTO meta (key, value) VALUES (?, '1') ON CONFLICT(key) DO NOTHING", (META_ADOPT_FLAG_PINS,)
            )
        else:
            self._execute("DELETE FROM meta WHERE key = ?", (META_ADOPT_FLAG_PINS,))


# -- image_tags: tag -> digest ----------------------------------------------------------------------
@dataclass(frozen=True)
class TagRecord:
    ref: str  # host/repo:tag
    digest: str
    model: str
    version: str
    updated_at: float


class ImageTags(_Table):
    def record(self, ref: str, digest: str, model: str, version: str) -> None:
        self._execute(
            "INSERT INTO image_tags (ref, digest, model, version, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(ref) DO UPDATE SET digest = excluded.digest, model = excluded.model, "
            "version = excluded.version, updated_at = excluded.updated_at",
            (ref, digest, model, version, time.time()),
        )

    def get(self, ref: str) -> TagRecord | None:
        row = self._one("SELECT ref, digest, model, version, updated_at FROM image_tags WHERE ref = ?", (ref,))
        return TagRecord(**dict(row)) if row else None

    def all(self) -> list[TagRecord]:
        rows = self._all("SELECT ref, digest, model, version, updated_at FROM image_tags ORDER BY ref")
        return [TagRecord(**dict(r)) for r in rows]


# -- version_access: recency for the cache ----------------------------------------------------------
class VersionAccess(_Table):
    """When each version was last used (pulled, imported, switched to)."""

    def touch(self, model: str, version: str, when: float) -> None:
        self._execute(
            "INSERT INTO version_access (model, version, last_used) VALUES (?, ?, ?) "
            "ON CONFLICT(model, version) DO UPDATE SET last_used = excluded.last_used",
            (model, version, when),
        )

    def last_used(self, model: str, version: str) -> float | None:
        row = self._one("SELECT last_used FROM version_access WHERE model = ? AND version = ?", (model, version))
        when: float | None = row[0] if row else None
        return when

    def forget(self, model: str, version: str) -> None:
        self._execute("DELETE FROM version_access WHERE model = ? AND version = ?", (model, version))

    def forget_missing_versions(self) -> None:
        """Drop the rows of versions that no longer exist."""
        self._execute(
            "DELETE FROM version_access WHERE NOT EXISTS (SELECT 1 FROM versions v "
            "WHERE v.model = version_access.model AND v.version = version_access.version)"
        )
