"""Store and forward: telemetry and events wait in SQLite until the broker has them.

Every message gets the node's next sequence number as it is written (SQLite
AUTOINCREMENT, so a number is never reused, even after the outbox empties or
the agent restarts) and leaves the table only when the broker's PUBACK for
it has come back (see :mod:`agent.mqtt.forwarder`) or when a bound drops it.

Bounds: the payload bytes held and the age of the oldest message. Past
either, the *oldest* messages go; the numbers dropped are kept as ranges and
reported in one ``outbox.dropped`` event when the link returns, so a consumer
can tell a gap it will never fill from one still in flight.

Durability: :meth:`Outbox.put_many` returns once its transaction has
committed to the WAL (``synchronous=NORMAL``): a message that was put
survives a crash or ``kill -9`` of the agent; an OS crash or power cut may
lose the transactions since the last checkpoint. Callers batch what they
have (the event pump writes every event waiting on the bus in one
transaction), which is where the write rate comes from, not from weakening
the per-message guarantee.

The file is its own database (``<state_dir>/mqtt-outbox.db``) so heavy
telemetry writes never wait on the lock of the model-state database. One
thread (:class:`AsyncOutbox`'s) does all the I/O; the event loop never waits
on the disk.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import orjson

from agent.state.sqlite import checkpoint_and_close, open_database, transaction

P = ParamSpec("P")
T = TypeVar("T")

# (topic, body): the body is a JSON object; the outbox adds "seq" and "epoch" to it.
Message = tuple[str, dict[str, Any]]
MAX_REPORTED_RANGES = 100
AGE_CHECK_EVERY_S = 1.0
_SQL_CHUNK = 500  # host parameters per statement, well under SQLite's limit


@dataclass(frozen=True)
class Row:
    seq: int
    topic: str
    payload: bytes


@dataclass
class DropSummary:
    count: int = 0
    ranges: list[list[int]] = field(default_factory=list)  # [[first, last], ...], oldest first
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class OutboxStats:
    rows: int
    bytes: int
    last_seq: int
    oldest_age_s: float | None
    pending_dropped: int


class Outbox:
    """Synchronous and thread-safe; use it through :class:`AsyncOutbox` from the event loop."""

    def __init__(self, path: Path, max_bytes: int, max_age_s: float, clock: Callable[[], float] = time.time):
        self.path = path
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.clock = clock
        self.lock = threading.Lock()
        # 0600, WAL, synchronous=NORMAL, busy timeout: the agent's one SQLite opener.
        self.conn = conn = open_database(path)
        self._create()
        self.epoch: str = conn.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()[0]
        seq_row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
        self.last_seq: int = seq_row[0] if seq_row else 0
        self.rows, self.bytes = conn.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox"
        ).fetchone()
        self._last_age_check = float("-inf")

    def _create(self) -> None:
        with self.lock, transaction(self.conn) as conn:
            # AUTOINCREMENT keeps sequence numbers monotonic for the life of the file,
            # even when every row has been deleted.
            conn.execute(
                "CREATE TABLE IF NOT EXISTS outbox ("
                "seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL, "
                "created_at REAL NOT NULL)"
            )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS dropped ("
                "first INTEGER PRIMARY KEY, last INTEGER NOT NULL, count INTEGER NOT NULL, reason TEXT)"
            )
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            # A new file restarts the sequence at 1; the epoch tells consumers it is a new stream.
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('epoch', ?) ON CONFLICT(key) DO NOTHING",
                (uuid.uuid4().hex[:16],),
            )

    # -- writing ----------------------------------------------------------------------------------
    def put_many(self, messages: Iterable[Message]) -> int:
        """Append messages in one transaction; returns the last sequence number given."""
        with self.lock, self._transaction():
            now = self.clock()
            for topic, body in messages:
                self._insert(topic, body, now)
            self._enforce_bounds(now)
            return self.last_seq

    def _insert(self, topic: str, body: dict[str, Any], now: float) -> None:
        seq = self.last_seq + 1
        payload = orjson.dumps({"seq": seq, "epoch": self.epoch, **body}, default=str, option=orjson.OPT_NON_STR_KEYS)
        self.conn.execute(
            "INSERT INTO outbox (seq, topic, payload, created_at) VALUES (?, ?, ?, ?)", (seq, topic, payload, now)
        )
        self.last_seq = seq
        self.rows += 1
        self.bytes += len(payload)

    def _enforce_bounds(self, now: float) -> None:
        if self.bytes > self.max_bytes:
            self._drop_oldest(
                f"outbox over {self.max_bytes} bytes", lambda _created, _size: self.bytes > self.max_bytes
            )
        if now - self._last_age_check >= AGE_CHECK_EVERY_S or now < self._last_age_check:
            self._last_age_check = now
            cutoff = now - self.max_age_s
            self._drop_oldest(f"older than {self.max_age_s:g}s", lambda created, _size: created < cutoff)

    def _drop_oldest(self, reason: str, still: Callable[[float, int], bool]) -> None:
        """Delete from the oldest end while ``still(created_at, size)`` holds for the next row."""
        conn = self.conn
        while True:
            rows = conn.execute(
                "SELECT seq, created_at, length(payload) FROM outbox ORDER BY seq LIMIT ?", (_SQL_CHUNK,)
            ).fetchall()
            dropped: list[int] = []
            for seq, created, size in rows:
                if not still(created, size):
                    break
                dropped.append(seq)
                self.rows -= 1
                self.bytes -= size
            if not dropped:
                return
            conn.execute("DELETE FROM outbox WHERE seq <= ?", (dropped[-1],))
            self._record_dropped(dropped, reason)
            if len(dropped) < len(rows):
                return

    def _record_dropped(self, seqs: Sequence[int], reason: str) -> None:
        conn = self.conn
        for first, last in _runs(seqs):
            prev = conn.execute("SELECT first, last, reason FROM dropped ORDER BY first DESC LIMIT 1").fetchone()
            if prev is not None and prev[1] + 1 == first and prev[2] == reason:
                conn.execute(
                    "UPDATE dropped SET last = ?, count = count + ? WHERE first = ?", (last, last - first + 1, prev[0])
                )
            else:
                conn.execute(
                    "INSERT INTO dropped (first, last, count, reason) VALUES (?, ?, ?, ?)",
                    (first, last, last - first + 1, reason),
                )

    def prune(self) -> None:
        """Apply the age bound now (at reconnect, before the backlog is sent)."""
        with self.lock, self._transaction():
            self._last_age_check = float("-inf")
            self._enforce_bounds(self.clock())

    def report_dropped(self, topic: str, body: dict[str, Any]) -> DropSummary | None:
        """If anything was dropped since the last report, append one report message and forget the ranges.

        The report and the clearing commit together: the count is reported once, never lost, never twice.
        """
        with self.lock, self._transaction():
            rows = self.conn.execute("SELECT first, last, count, reason FROM dropped ORDER BY first").fetchall()
            if not rows:
                return None
            summary = DropSummary()
            for first, last, count, reason in rows:
                summary.count += count
                summary.reasons[reason] = summary.reasons.get(reason, 0) + count
                summary.ranges.append([first, last])
            data = {"count": summary.count, "reasons": summary.reasons, "ranges": summary.ranges[:MAX_REPORTED_RANGES]}
            if len(summary.ranges) > MAX_REPORTED_RANGES:
                data["ranges_truncated"] = True
            self._insert(topic, {**body, "data": data}, self.clock())
            self.conn.execute("DELETE FROM dropped")
            return summary

    # -- forwarding -------------------------------------------------------------------------------
    def fetch(self, after: int, limit: int, upto: int | None = None) -> list[Row]:
        """Up to ``limit`` messages with ``after < seq [<= upto]``, in sequence order."""
        with self.lock:
            if upto is None:
                rows = self.conn.execute(
                    "SELECT seq, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
                ).fetchall()
            else:
                rows = self.conn.execute(
                    "SELECT seq, topic, payload FROM outbox WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?",
                    (after, upto, limit),
                ).fetchall()
        return [Row(*row) for row in rows]

    def delete(self, seqs: Sequence[int]) -> None:
        """Remove acknowledged messages (already-dropped ones are simply absent)."""
        if not seqs:
            return
        with self.lock, self._transaction():
            self._delete(seqs)

    def reject(self, seqs: Sequence[int], reason: str) -> None:
        """Remove messages the broker refused for good (e.g. not authorised) and report them as dropped."""
        with self.lock, self._transaction():
            present = self._delete(seqs)
            self._record_dropped(sorted(present), reason)

    def _delete(self, seqs: Sequence[int]) -> list[int]:
        conn = self.conn
        removed: list[int] = []
        for i in range(0, len(seqs), _SQL_CHUNK):
            chunk = seqs[i : i + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            for seq, size in conn.execute(
                f"DELETE FROM outbox WHERE seq IN ({marks}) RETURNING seq, length(payload)", tuple(chunk)
            ).fetchall():
                removed.append(seq)
                self.rows -= 1
                self.bytes -= size
        return removed

    # -- introspection ----------------------------------------------------------------------------
    def stats(self) -> OutboxStats:
        with self.lock:
            oldest = self.conn.execute("SELECT min(created_at) FROM outbox").fetchone()[0]
            pending = self.conn.execute("SELECT coalesce(sum(count), 0) FROM dropped").fetchone()[0]
            return OutboxStats(
                rows=self.rows,
                bytes=self.bytes,
                last_seq=self.last_seq,
                oldest_age_s=None if oldest is None else max(0.0, self.clock() - oldest),
                pending_dropped=pending,
            )

    def checkpoint(self) -> None:
        with self.lock:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self.lock:
            checkpoint_and_close(self.conn)

    def _transaction(self) -> _Transaction:
        return _Transaction(self)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT; on failure roll back and restore the counters kept in memory."""

    def __init__(self, outbox: Outbox):
        self.outbox = outbox

    def __enter__(self) -> None:
        self.saved = (self.outbox.last_seq, self.outbox.rows, self.outbox.bytes)
        self.outbox.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        conn = self.outbox.conn
        if exc_type is None:
            conn.execute("COMMIT")
            return
        conn.execute("ROLLBACK")
        self.outbox.last_seq, self.outbox.rows, self.outbox.bytes = self.saved


def _runs(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """[1, 2, 3, 7, 8] -> [(1, 3), (7, 8)]"""
    runs: list[tuple[int, int]] = []
    for seq in seqs:
        if runs and runs[-1][1] + 1 == seq:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


class AsyncOutbox:
    """The outbox from the event loop: every call runs on one dedicated thread, in call order."""

    def __init__(self, outbox: Outbox):
        self.outbox = outbox
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="mqtt-outbox")
        # Called on the loop after every successful put: the forwarder's wake-up.
        self.listeners: set[Callable[[], None]] = set()

    @property
    def last_seq(self) -> int:
        return self.outbox.last_seq

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def put_many(self, messages: list[Message]) -> int:
        seq = await self._run(self.outbox.put_many, messages)
        self._notify()
        return seq

    async def put(self, topic: str, body: dict[str, Any]) -> int:
        return await self.put_many([(topic, body)])

    async def report_dropped(self, topic: str, body: dict[str, Any]) -> DropSummary | None:
        summary = await self._run(self.outbox.report_dropped, topic, body)
        if summary is not None:
            self._notify()
        return summary

    async def fetch(self, after: int, limit: int, upto: int | None = None) -> list[Row]:
        return await self._run(self.outbox.fetch, after, limit, upto)

    async def delete(self, seqs: list[int]) -> None:
        await self._run(self.outbox.delete, seqs)

    async def reject(self, seqs: list[int], reason: str) -> None:
        await self._run(self.outbox.reject, seqs, reason)

    async def prune(self) -> None:
        await self._run(self.outbox.prune)

    async def stats(self) -> OutboxStats:
        return await self._run(self.outbox.stats)

    def _notify(self) -> None:
        for listener in list(self.listeners):
            listener()

    async def close(self) -> None:
        await self._run(self.outbox.close)
        self._executor.shutdown(wait=True)
