"""Tag → digest records: what each ``host/repo:tag`` pointed at when it was last pulled.

A pull by tag while the registry is unreachable resolves through these
records to the last known digest, and says so; nothing else trusts them.
They live in ``agent.db``'s ``image_tags`` table (agent/state).
"""

from __future__ import annotations

from agent.state import StateDB, TagRecord

__all__ = ["TagRecord", "TagStore"]


class TagStore:
    def __init__(self, db: StateDB):
        self._tags = db.image_tags

    def record(self, ref: str, digest: str, model: str, version: str) -> None:
        self._tags.record(ref, digest, model, version)

    def get(self, ref: str) -> TagRecord | None:
        return self._tags.get(ref)

    def all(self) -> list[TagRecord]:
        return self._tags.all()
