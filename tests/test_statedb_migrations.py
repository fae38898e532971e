"""agent.db across agent versions: an older database is migrated and reads back whole; a newer one is refused.

``tests/data/agent-schema1.db`` is a real database written by the agent at
schema version 1 (the code before one module owned the database), not built by
hand: an agent imported ``scale`` 1, 2, 3 and ``other`` 7 and seeded ``digits``;
``deploy store:scale:2`` from the local source (a journalled swap), then MQTT's
``set-desired`` of ``store:scale:3`` pinned (a second swap; the pin held at 3);
a tag record for ``registry.example:5000/models/scale:stable``, cache recency for
scale 3 and 1 at fixed times, and a swap journal entry left ``started`` as by a
``kill -9``; then the agent stopped and the file was VACUUMed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from agent.cas import BlobStore
from agent.desired import DesiredState
from agent.errors import StateDirError
from agent.images.cache import ImageCache
from agent.images.settings import CacheSettings
from agent.images.tags import TagStore
from agent.mqtt.commandlog import CommandLog
from agent.mqtt.outbox import Outbox
from agent.state import SCHEMA_VERSION, StateDB
from agent.state.schema import TABLES
from agent.state.sqlite import open_database

FIXTURE = Path(__file__).parent / "data" / "agent-schema1.db"


@pytest.fixture
def v1_db(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "agent.db"
    path.parent.mkdir(mode=0o700)
    shutil.copyfile(FIXTURE, path)
    return path


def raw(path: Path) -> closing[sqlite3.Connection]:
    return closing(sqlite3.connect(path))


def columns(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """table -> (name, type, notnull, default, pk) of each column: the shape, whatever the DDL's spelling."""
    with raw(path) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: [tuple(c[1:]) for c in conn.execute(f"PRAGMA table_info({t})")] for t in tables}


def test_the_fixture_is_a_schema_1_database(v1_db: Path) -> None:
    with raw(v1_db) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("1",)


def test_a_schema_1_database_is_migrated_and_everything_reads_back(v1_db: Path) -> None:
    db = StateDB(v1_db)
    assert db.schema_version() == SCHEMA_VERSION == 2

    # Models: the active version, its rollback target and the pin.
    scale = db.get_model("scale")
    assert scale is not None
    assert (scale.active_version, scale.previous_version, scale.pinned, scale.status) == ("3", "2", True, "ok")
    assert [(m.name, m.active_version, m.pinned) for m in db.models()] == [
        ("digits", "1", False),
        ("other", "7", False),
        ("scale", "3", True),
    ]
    # Versions, with the digests of their blobs.
    assert [v.version for v in db.versions("scale")] == ["1", "2", "3"]
    v3 = db.get_version("scale", "3")
    assert v3 is not None and v3.status == "ready" and v3.manifest_digest is None
    assert v3.digests == (
        "sha256:565bd57e12eec84591c254155a57a7f11dd607b2996f8a729b7a47d7ccfc8b0d",
        "sha256:3a8fed72ffd5fd6af0fd405420fd1757fadc79415e22b1dbda61ca3943d3a2bf",
        "sha256:e2850b13888203eb8ca39228002888419f375f3a1065cc022f0579f594d57d12",
    )
    # The four scale-kind versions share one module; digits has its own three blobs.
    assert len(db.referenced_digests()) == 4 * 2 + 1 + 3

    # Desired state: both sources' rows, the pin held at the version it reached.
    desired = DesiredState(db)
    local, mqtt = desired.by_source("local")["scale"], desired.by_source("mqtt")["scale"]
    assert (local.ref, local.pinned) == ("store:scale:2", False)
    assert (mqtt.ref, mqtt.pinned) == ("store:scale:3", True)
    assert desired.held("mqtt", "scale") == "3" and desired.held("local", "scale") is None
    assert desired.governing_source("scale") == "mqtt"
    assert desired.upgraded_from_flag_pins is False  # its pins were desired state already

    # Tags and cache recency.
    tag = TagStore(db).get("registry.example:5000/models/scale:stable")
    assert tag is not None and (tag.digest, tag.model, tag.version) == ("sha256:" + "ab" * 32, "scale", "3")
    cache = ImageCache(BlobStore(v1_db.parent), db, CacheSettings(max_bytes=0))
    v1, v2 = db.get_version("scale", "1"), db.get_version("scale", "2")
    assert v1 is not None and v2 is not None
    assert (cache.last_used(v3), cache.last_used(v1)) == (1700000000.0, 1690000000.0)
    assert cache.last_used(v2) == v2.created_at  # never recorded: its import time

    # The swap journal, with the entry a kill left open.
    assert [(e.id, e.from_version, e.to_version, e.source, e.state) for e in db.swaps.entries()] == [
        (1, "1", "2", "local", "switched"),
        (2, "2", "3", "mqtt", "switched"),
        (3, "3", "1", "k8s", "started"),
    ]
    (open_entry,) = db.swaps.unfinished()
    assert (open_entry.id, open_entry.model, open_entry.ended_at) == (3, "scale", None)

    # And it takes writes in its new version.
    db.swaps.end(open_entry.id, "abandoned", "interrupted by a restart")
    assert db.swaps.unfinished() == []
    assert db.swaps.start("scale", "3", "2", "local") == 4
    db.close()

    reopened = StateDB(v1_db)
    assert reopened.schema_version() == SCHEMA_VERSION
    assert [e.state for e in reopened.swaps.entries()] == ["switched", "switched", "abandoned", "started"]
    reopened.close()


def test_a_migrated_database_has_exactly_the_shape_of_a_new_one(v1_db: Path, tmp_path: Path) -> None:
    StateDB(v1_db).close()
    StateDB(tmp_path / "new.db").close()
    migrated, new = columns(v1_db), columns(tmp_path / "new.db")
    assert set(new) == set(TABLES)
    assert migrated == new


def test_a_schema_1_database_that_never_made_the_lazy_tables_gets_them(v1_db: Path) -> None:
    """A version-1 database only the CLI ever opened had models, versions and meta, nothing else."""
    with raw(v1_db) as conn:
        for table in ("desired", "swaps", "image_tags", "version_access"):
            conn.execute(f"DROP TABLE {table}")
        conn.commit()
    db = StateDB(v1_db)
    assert db.schema_version() == SCHEMA_VERSION
    assert db.swaps.entries() == [] and db.desired.rows() == [] and db.image_tags.all() == []
    assert DesiredState(db).upgraded_from_flag_pins is False
    assert db.get_model("scale") is not None
    db.close()


def test_flag_pins_of_a_database_without_held_version_wait_for_adoption_across_opens(v1_db: Path) -> None:
    """Before pins went through the reconciler: no held_version column, the pin a bare models.pinned flag."""
    with raw(v1_db) as conn:
        conn.execute("ALTER TABLE desired DROP COLUMN held_version")
        conn.commit()
    StateDB(v1_db).close()  # migrated by a first open that adopts nothing (the CLI, say)
    db = StateDB(v1_db)
    desired = DesiredState(db)
    assert desired.upgraded_from_flag_pins is True  # still waiting for the lifecycle
    assert desired.held("mqtt", "scale") is None  # the column is new: nothing held yet
    desired.upgraded_from_flag_pins = False  # what Lifecycle._adopt_legacy_pins does once done
    db.close()
    assert DesiredState(StateDB(v1_db)).upgraded_from_flag_pins is False


def test_a_database_from_a_newer_agent_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    StateDB(path).close()
    with raw(path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
        conn.execute("CREATE TABLE from_the_future (x TEXT)")
        conn.commit()
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(StateDirError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this agent's"):
        StateDB(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    with raw(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            str(SCHEMA_VERSION + 1),
        )


def test_an_unreadable_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    StateDB(path).close()
    with raw(path) as conn:
        conn.execute("UPDATE meta SET value = 'two' WHERE key = 'schema_version'")
        conn.commit()
    with pytest.raises(StateDirError, match="not a number"):
        StateDB(path)


@contextmanager
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_every_sqlite_file_of_the_agent_is_opened_alike(tmp_path: Path) -> None:
    """agent.db, the MQTT outbox, the command log: 0600 in a 0700 directory, WAL, synchronous NORMAL, busy timeout."""
    state = tmp_path / "state"
    with loose_umask():
        StateDB(state / "agent.db").close()
        outbox = Outbox(state / "mqtt-outbox.db", max_bytes=1 << 20, max_age_s=60)
        commands = CommandLog(state / "mqtt-commands.db")
        conn = open_database(state / "other.db")
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in ("agent.db", "mqtt-outbox.db", "mqtt-commands.db", "other.db"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
        with raw(state / name) as check:
            assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",), name
    for opened in (outbox.conn, commands.conn, conn):
        assert opened.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
        assert opened.execute("PRAGMA busy_timeout").fetchone() == (30000,)
    outbox.close()
    commands.close()
    conn.close()
