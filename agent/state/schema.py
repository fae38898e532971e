"""Every table of ``agent.db``, its schema version, and the migrations that reach it.

``TABLES`` is the schema now: a new database is made from it in one
transaction. A database written by an older agent carries an older
``meta.schema_version`` and is brought forward by ``MIGRATIONS`` in order, in
one transaction, when it is opened, so an agent upgraded in the field keeps
its models, pins and journal. A database from a *newer* agent (a downgrade) is
refused, never written: an older agent cannot know what the newer columns
mean.

The rule for a schema change: edit ``TABLES`` to the new shape, add the step
from the previous version to ``MIGRATIONS`` (its own SQL, never a reference to
``TABLES``, which will move on), bump ``SCHEMA_VERSION``, and describe it in
docs/ARCHITECTURE.md ("The database"). tests/test_statedb_migrations.py checks
that a migrated database ends up with exactly the tables and columns of a new one.

Versions:

1. ``models``, ``versions`` and ``meta`` made by the state module; ``desired``,
   ``swaps``, ``image_tags`` and ``version_access`` made on first use by the
   modules that wrote them (so any may be missing); ``desired.held_version``
   missing in databases from before pins went through the reconciler.
2. One owner: every table exists; ``desired.held_version`` exists.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from agent.errors import StateDirError

SCHEMA_VERSION = 2

# Keys of the meta table.
META_SCHEMA_VERSION = "schema_version"
# Set by the migration that added desired.held_version: pins recorded the old way
# (the models.pinned flag alone) wait to be adopted as desired state by the lifecycle.
META_ADOPT_FLAG_PINS = "adopt_flag_pins"

# The column spelling (nullable primary-key columns included) is what the
# version-1 code wrote through sqlite-utils, so a new database and a migrated one
# have the same shape.
TABLES: dict[str, str] = {
    # One row per model: what serves it and what it rolls back to.
    "models": """
        CREATE TABLE models (
            name TEXT PRIMARY KEY NOT NULL,
            active_version TEXT,
            previous_version TEXT,
            pinned INTEGER DEFAULT 0,
            status TEXT NOT NULL DEFAULT 'ok',
            error TEXT,
            updated_at REAL
        )""",
    # One row per stored version: the digests of its three blobs (and of its image manifest).
    "versions": """
        CREATE TABLE versions (
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            config_digest TEXT NOT NULL,
            module_digest TEXT NOT NULL,
            weights_digest TEXT NOT NULL,
            manifest_digest TEXT,
            source TEXT,
            created_at REAL,
            status TEXT DEFAULT 'ready',
            error TEXT,
            PRIMARY KEY (model, version)
        )""",
    # The swap journal: a row before a swap starts, closed when it ends.
    "swaps": """
        CREATE TABLE swaps (
            id INTEGER PRIMARY KEY,
            model TEXT,
            from_version TEXT,
            to_version TEXT,
            source TEXT,
            state TEXT,
            error TEXT,
            started_at REAL,
            ended_at REAL
        )""",
    # Desired state per source; spec is a ModelDeployment as JSON.
    "desired": """
        CREATE TABLE desired (
            source TEXT,
            model TEXT,
            spec TEXT,
            updated_at REAL,
            held_version TEXT,
            PRIMARY KEY (source, model)
        )""",
    # What each host/repo:tag pointed at when last pulled (offline resolution).
    "image_tags": """
        CREATE TABLE image_tags (
            ref TEXT PRIMARY KEY NOT NULL,
            digest TEXT NOT NULL,
            model TEXT,
            version TEXT,
            updated_at REAL
        )""",
    # When each version was last used: the cache evicts least recently used first.
    "version_access": """
        CREATE TABLE version_access (
            model TEXT,
            version TEXT,
            last_used REAL,
            PRIMARY KEY (model, version)
        )""",
    "meta": """
        CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value TEXT
        )""",
}


def _to_v2(conn: sqlite3.Connection) -> None:
    """Version 1 -> 2: make the tables other modules used to make on first use; add held_version."""
    # A version-1 first open cut short could leave versions and meta unmade too.
    conn.execute(
        "CREATE TABLE IF NOT EXISTS versions (model TEXT NOT NULL, version TEXT NOT NULL, "
        "config_digest TEXT NOT NULL, module_digest TEXT NOT NULL, weights_digest TEXT NOT NULL, "
        "manifest_digest TEXT, source TEXT, created_at REAL, status TEXT DEFAULT 'ready', error TEXT, "
        "PRIMARY KEY (model, version))"
    )
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS swaps (id INTEGER PRIMARY KEY, model TEXT, from_version TEXT, "
        "to_version TEXT, source TEXT, state TEXT, error TEXT, started_at REAL, ended_at REAL)"
    )
    conn.execute(
        "CREATE TABLE IF NOT EXISTS image_tags (ref TEXT PRIMARY KEY NOT NULL, digest TEXT NOT NULL, "
        "model TEXT, version TEXT, updated_at REAL)"
    )
    conn.execute(
        "CREATE TABLE IF NOT EXISTS version_access (model TEXT, version TEXT, last_used REAL, "
        "PRIMARY KEY (model, version))"
    )
    if _has_table(conn, "desired"):
        columns = {row[1] for row in conn.execute("PRAGMA table_info(desired)")}
        if "held_version" not in columns:
            # From before pins went through the reconciler: a pin was the models.pinned
            # flag alone; the lifecycle adopts those once (Lifecycle._adopt_legacy_pins).
            conn.execute("ALTER TABLE desired ADD COLUMN held_version TEXT")
            _set_meta(conn, META_ADOPT_FLAG_PINS, "1")
    else:
        conn.execute(
            "CREATE TABLE desired (source TEXT, model TEXT, spec TEXT, updated_at REAL, held_version TEXT, "
            "PRIMARY KEY (source, model))"
        )


# MIGRATIONS[n] brings a database at version n - 1 to version n.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    2: _to_v2,
}


def migrate(conn: sqlite3.Connection, path: Path) -> int | None:
    """Bring the database on ``conn`` to ``SCHEMA_VERSION``; returns the version it had, or None if current.

    ``path`` only names the file in the error. Raises :class:`StateDirError` for a
    database from a newer agent, leaving it untouched.
    """
    if schema_version(conn) == SCHEMA_VERSION:
        return None  # the usual open: no write lock taken
    conn.execute("BEGIN IMMEDIATE")  # another process may be migrating the same file: read again under the lock
    try:
        found = schema_version(conn)
        if found == SCHEMA_VERSION:  # another process migrated it while this one waited for the lock
            conn.execute("COMMIT")
            return None
        if found > SCHEMA_VERSION:
            raise StateDirError(
                f"{path} has schema version {found}, newer than this agent's {SCHEMA_VERSION}: it was written by "
                "a newer edge-agent, and this one refuses to open it rather than corrupt it "
                "(run the newer agent, or move the state directory aside)"
            )
        if found == 0:
            for ddl in TABLES.values():
                conn.execute(ddl)
        else:
            for version in range(found + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[version](conn)
        _set_meta(conn, META_SCHEMA_VERSION, str(SCHEMA_VERSION))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return found


def schema_version(conn: sqlite3.Connection) -> int:
    """The version recorded in ``meta``; 0 for an empty file."""
    if not _has_table(conn, "meta"):
        # Version 1 made meta after models, in a transaction of its own: a first open cut
        # short in between left a version-1 database without it.
        return 1 if _has_table(conn, "models") else 0
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (META_SCHEMA_VERSION,)).fetchone()
    if row is None:
        return 1
    try:
        return int(row[0])
    except (TypeError, ValueError):
        raise StateDirError(f"schema version {row[0]!r} in the meta table is not a number") from None


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def _set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (key, value),
    )
