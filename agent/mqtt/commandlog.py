"""Command ids this node has accepted, and their replies, in SQLite.

An id is recorded *before* its command runs and its reply when it ends, so:
a re-delivered command (QoS 1 re-sends, a fleet tool retrying after a lost
reply) never runs twice and gets the reply it got the first time; an id
reused for a different body is refused as a replay; a command cut short by a
crash answers "interrupted" rather than running again half-done. Ids are kept
until their command has expired (plus the allowed clock skew), after which
the expiry check refuses any replay on its own.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Literal

import sqlite_utils

from agent.fsmodes import create_private_file, private_dirs

Admission = Literal["new", "done", "running", "conflict"]


class CommandLog:
    def __init__(self, path: Path):
        private_dirs(path.parent)
        create_private_file(path)  # 0600 (and so its -wal/-shm) whatever the umask
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
        self.db = sqlite_utils.Database(conn)
        self.lock = threading.Lock()
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a crash of the agent (kill -9); only an OS crash may lose the last ids.
        self.db.execute("PRAGMA synchronous=NORMAL")
        if "commands" not in self.db.table_names():
            self.db["commands"].create(
                {
                    "id": str,
                    "digest": str,
                    "command": str,
                    "received_at": float,
                    "retain_until": float,
                    "state": str,  # running | done
                    "reply": bytes,
                },
                pk="id",
                not_null={"id", "digest", "state"},
            )
            self.db["commands"].create_index(["retain_until"])

    def admit(self, command_id: str, digest: str, command: str, retain_until: float) -> tuple[Admission, bytes | None]:
        """Record a new id (``"new"``), or say what is known of a seen one, with its stored reply."""
        with self.lock:
            conn = self.db.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT digest, state, reply FROM commands WHERE id = ?", (command_id,)).fetchone()
                if row is None:
                    conn.execute(
                        "INSERT INTO commands (id, digest, command, received_at, retain_until, state) "
                        "VALUES (?, ?, ?, ?, ?, 'running')",
                        (command_id, digest, command, time.time(), retain_until),
                    )
                    result: tuple[Admission, bytes | None] = ("new", None)
                elif row[0] != digest:
                    result = ("conflict", None)
                elif row[1] == "done":
                    result = ("done", row[2])
                else:
                    result = ("running", None)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        return result

    def finish(self, command_id: str, reply: bytes) -> None:
        with self.lock:
            self.db.conn.execute("UPDATE commands SET state = 'done', reply = ? WHERE id = ?", (reply, command_id))

    def prune(self, now: float | None = None) -> int:
        """Forget ids whose commands can no longer pass the expiry check."""
        now = time.time() if now is None else now
        with self.lock:
            cursor = self.db.conn.execute("DELETE FROM commands WHERE retain_until < ?", (now,))
            return cursor.rowcount

    def count(self) -> int:
        with self.lock:
            return self.db.conn.execute("SELECT count(*) FROM commands").fetchone()[0]

    def close(self) -> None:
        with self.lock:
            self.db.conn.close()
