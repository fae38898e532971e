"""Tag → digest records: what each ``host/repo:tag`` pointed at when it was last pulled.

A pull by tag while the registry is unreachable resolves through these
records to the last known digest, and says so; nothing else trusts them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from agent.state import StateDB

TABLE = "image_tags"


@dataclass(frozen=True)
class TagRecord:
    ref: str  # host/repo:tag
    digest: str
    model: str
    version: str
    updated_at: float


class TagStore:
    def __init__(self, db: StateDB):
        self.db = db
        with db.lock:
            if TABLE not in db.db.table_names():
                db.db[TABLE].create(
                    {"ref": str, "digest": str, "model": str, "version": str, "updated_at": float},
                    pk="ref",
                    not_null={"ref", "digest"},
                )

    def record(self, ref: str, digest: str, model: str, version: str) -> None:
        with self.db.lock:
            self.db.db[TABLE].upsert(
                {"ref": ref, "digest": digest, "model": model, "version": version, "updated_at": time.time()},
                pk="ref",
            )

    def get(self, ref: str) -> TagRecord | None:
        with self.db.lock:
            rows = list(self.db.db[TABLE].rows_where("ref = ?", [ref]))
        return TagRecord(**rows[0]) if rows else None

    def all(self) -> list[TagRecord]:
        with self.db.lock:
            return [TagRecord(**r) for r in self.db.db[TABLE].rows_where(order_by="ref")]
