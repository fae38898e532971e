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

import threading
import time
from pathlib import Path
from typing import Literal

from agent.state.sqlite import open_database, transaction

Admission = Literal["new", "done", "running", "conflict"]


class CommandLog:
    def __init__(self, path: Path):
        # 0600, WAL, synchronous=NORMAL (an id survives a kill -9 of the agent; only an OS
        # crash may lose the last ones), busy timeout: the agent's one SQLite opener.
        self.conn = open_database(path)
        self.lock = threading.Lock()
        with self.lock, transaction(self.conn) as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS commands (id TEXT PRIMARY KEY NOT NULL, digest TEXT NOT NULL, "
                "command TEXT, received_at REAL, retain_until REAL, "
                "state TEXT NOT NULL, "  # running | done
                "reply BLOB)"
            )
            conn.execute("CREATE INDEX IF NOT EXISTS idx_commands_retain_until ON commands (retain_until)")

    def admit(self, command_id: str, digest: str, command: str, retain_until: float) -> tuple[Admission, bytes | None]:
        """Record a new id (``"new"``), or say what is known of a seen one, with its stored reply."""
        with self.lock, transaction(self.conn) as conn:
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
        return result

    def finish(self, command_id: str, reply: bytes) -> None:
        with self.lock:
            self.conn.execute("UPDATE commands SET state = 'done', reply = ? WHERE id = ?", (reply, command_id))

    def prune(self, now: float | None = None) -> int:
        """Forget ids whose commands can no longer pass the expiry check."""
        now = time.time() if now is None else now
        with self.lock:
            cursor = self.conn.execute("DELETE FROM commands WHERE retain_until < ?", (now,))
            return cursor.rowcount

    def count(self) -> int:
        with self.lock:
            count: int = self.conn.execute("SELECT count(*) FROM commands").fetchone()[0]
            return count

    def close(self) -> None:
        with self.lock:
            self.conn.close()
