"""The one way the agent opens a SQLite file: ``agent.db``, the MQTT outbox and the command log.

Every database file is opened alike, so none of them can drift from the others:

- created 0600 before SQLite opens it (SQLite gives the ``-wal`` and ``-shm``
  files the database's own mode), in a 0700 directory (agent/fsmodes.py);
- WAL journal: readers never wait for the writer;
- ``synchronous=NORMAL``: in WAL mode a committed transaction survives a crash
  or ``kill -9`` of the agent; only an OS crash or power cut may lose the last
  transactions (since the last checkpoint);
- a busy timeout, for a second process (the CLI beside a running agent);
- autocommit (``isolation_level=None``): one statement is one transaction, and
  several go together only inside :func:`transaction`;
- usable from any thread; each owner serialises its own calls with a lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.fsmodes import create_private_file, private_dirs

BUSY_TIMEOUT_S = 30.0


def open_database(path: Path, *, busy_timeout_s: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """Open (creating it private when absent) the SQLite file at ``path``, set up as described above."""
    path = Path(path)
    private_dirs(path.parent)
    create_private_file(path)
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=busy_timeout_s)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Several statements that land together or not at all (BEGIN IMMEDIATE: the write lock up front).

    The caller holds its owner's lock: a connection runs one transaction at a time.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def checkpoint_and_close(conn: sqlite3.Connection) -> None:
    """Fold the WAL back into the database file and close: a stopped agent leaves one file."""
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
