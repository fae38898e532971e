"""The local image cache: a size budget with LRU eviction, garbage collection, verification.

The cache is the agent's blob store itself: blobs are addressed by digest,
so a layer common to two versions (same weights, new module) is stored once.
Eviction works on whole model versions, least recently used first, and
never touches a version that is active, previous (the rollback target), or
of a pinned model; a version's blobs go only when no remaining version needs
them. ``verify`` re-hashes every blob and moves what fails to
``quarantine/``, marking the versions that needed it broken.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from agent.cas import BlobStore
from agent.images.locks import Locks
from agent.images.settings import CacheSettings
from agent.state import StateDB, VersionRecord

VersionKey = tuple[str, str]


@dataclass
class GcReport:
    removed_blobs: list[str] = field(default_factory=list)
    removed_partials: list[str] = field(default_factory=list)
    evicted: list[VersionKey] = field(default_factory=list)
    freed_bytes: int = 0
    used_bytes: int = 0
    budget_bytes: int = 0
    skipped: str | None = None  # why nothing was done (a pull holds the store)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the control surface (MQTT ``cache-gc``) and ``cache gc --json``."""
        doc = asdict(self)
        doc["evicted"] = [f"{m}:{v}" for m, v in self.evicted]
        return doc


@dataclass
class VerifyReport:
    checked: int = 0
    bytes_checked: int = 0
    quarantined: list[str] = field(default_factory=list)
    broken_versions: list[VersionKey] = field(default_factory=list)
    missing: list[tuple[VersionKey, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.quarantined and not self.missing

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "bytes_checked": self.bytes_checked,
            "quarantined": list(self.quarantined),
            "broken_versions": [f"{m}:{v}" for m, v in self.broken_versions],
            "missing": [{"version": f"{m}:{v}", "digest": d} for (m, v), d in self.missing],
            "ok": self.ok,
        }


class ImageCache:
    def __init__(
        self,
        blobs: BlobStore,
        db: StateDB,
        settings: CacheSettings,
        in_use: Callable[[], Iterable[VersionKey]] | None = None,
    ):
        self.blobs = blobs
        self.db = db
        self.settings = settings
        # The daemon's loaded versions (a canary in a traffic split, a version kept warm for
        # rollback): in memory and served, so their blobs must outlive them on disk too.
        self.in_use = in_use
        self.locks = Locks(blobs.root)
        self.log = structlog.get_logger("edge_agent.images")

    # -- recency -----------------------------------------------------------------------------
    # Recency is per version (agent.db's version_access table), not per blob: a module shared
    # by every version would otherwise make them all look as recently used as the newest one.
    def touch_version(self, record: VersionRecord, when: float | None = None) -> None:
        """Mark a version as just used (pulled, imported, switched to); eviction goes least recent first."""
        self.db.version_access.touch(record.model, record.version, time.time() if when is None else when)

    def last_used(self, record: VersionRecord) -> float:
        used = self.db.version_access.last_used(record.model, record.version)
        return record.created_at if used is None else used

    # -- what must stay ------------------------------------------------------------------------
    def protected(self) -> set[VersionKey]:
        keep: set[VersionKey] = set()
        pinned = {m.name for m in self.db.models() if m.pinned}
        for mrec in self.db.models():
            for version in (mrec.active_version, mrec.previous_version):
                if version:
                    keep.add((mrec.name, version))
        for rec in self.db.versions():
            if rec.model in pinned:
                keep.add((rec.model, rec.version))
        if self.in_use is not None:
            keep.update(self.in_use())
        return keep

    # -- size ----------------------------------------------------------------------------------
    def used_bytes(self) -> int:
        total = 0
        for digest in self.blobs.digests():
            try:
                total += self.blobs.size(digest)
            except Exception:  # noqa: BLE001 - a blob removed while we count
                continue
        return total

    def enforce_budget(self, keep: Iterable[VersionKey] = (), blocking: bool = False) -> GcReport:
        """Evict least recently used versions until the store fits its budget."""
        report = GcReport(budget_bytes=self.settings.max_bytes)
        with self.locks.store_exclusive(blocking=blocking) as held:
            if not held:
                report.skipped = "a pull is in progress; eviction left to its end"
                return report
            self._evict(report, set(keep))
        return report

    def gc(self) -> GcReport:
        """Drop blobs no version needs and stale partials, then enforce the budget."""
        report = GcReport(budget_bytes=self.settings.max_bytes)
        with self.locks.store_exclusive(blocking=True):
            referenced = self.db.referenced_digests()
            # Writers that do not take the store lock (a local import) write a blob a moment
            # before recording its version: only orphans older than the grace period are garbage.
            grace_cutoff = time.time() - self.settings.orphan_grace_s
            for digest in list(self.blobs.digests()):
                if digest not in referenced and self._mtime(digest) < grace_cutoff:
                    report.freed_bytes += self._size(digest)
                    self.blobs.delete(digest)
                    report.removed_blobs.append(digest)
            cutoff = time.time() - self.settings.partial_max_age_s
            for entry in self.blobs.tmp_dir.iterdir():
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                is_partial = entry.name.startswith("partial-")
                if stat.st_mtime < (cutoff if is_partial else grace_cutoff):
                    report.freed_bytes += stat.st_size
                    entry.unlink(missing_ok=True)
                    report.removed_partials.append(entry.name)
            # No pull runs while we hold the store: per-blob lock files are free to go.
            for entry in self.locks.dir.glob("blob-*"):
                entry.unlink(missing_ok=True)
            self._forget_access()
            self._evict(report, set())
        return report

    def _evict(self, report: GcReport, keep: set[VersionKey]) -> None:
        used = self.used_bytes()
        budget = self.settings.max_bytes
        if budget > 0 and used > budget:
            protected = self.protected() | keep
            candidates = [r for r in self.db.versions() if (r.model, r.version) not in protected]
            candidates.sort(key=self.last_used)
            for record in candidates:
                if used <= budget:
                    break
                freed = self._drop_version(record)
                used -= freed
                report.freed_bytes += freed
                report.evicted.append((record.model, record.version))
                self.log.info(
                    "cache.evicted", model=record.model, version=record.version, freed_bytes=freed, used_bytes=used
                )
            if used > budget:
                self.log.warning(
                    "cache.over_budget",
                    used_bytes=used,
                    budget_bytes=budget,
                    reason="the rest belongs to active, previous or pinned versions",
                )
        report.used_bytes = used

    def _drop_version(self, record: VersionRecord) -> int:
        self.db.delete_version(record.model, record.version)
        self.db.version_access.forget(record.model, record.version)
        still_needed = self.db.referenced_digests()
        freed = 0
        for digest in {*record.digests, record.manifest_digest}:
            if digest and digest not in still_needed and self.blobs.has(digest):
                freed += self._size(digest)
                self.blobs.delete(digest)
        return freed

    def _forget_access(self) -> None:
        """Drop recency rows of versions that no longer exist."""
        self.db.version_access.forget_missing_versions()

    def _mtime(self, digest: str) -> float:
        try:
            return self.blobs.path(digest).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _size(self, digest: str) -> int:
        try:
            return self.blobs.size(digest)
        except Exception:  # noqa: BLE001 - already gone
            return 0

    # -- verify --------------------------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Re-hash every blob; quarantine those that fail and mark the versions needing them broken."""
        report = VerifyReport()
        with self.locks.store_exclusive(blocking=True):
            bad: set[str] = set()
            for digest in sorted(self.blobs.digests()):
                size = self._size(digest)
                report.checked += 1
                report.bytes_checked += size
                if not self.blobs.verify(digest):
                    target = self.blobs.quarantine(digest)
                    bad.add(digest)
                    report.quarantined.append(digest)
                    self.log.error("cache.quarantined", digest=digest, moved_to=str(target))
            for rec in self.db.versions():
                needed = [rec.config_digest, rec.module_digest, rec.weights_digest]
                failed = [d for d in needed if d in bad]
                missing = [d for d in needed if d not in bad and not self.blobs.has(d)]
                for digest in missing:
                    report.missing.append(((rec.model, rec.version), digest))
                if failed or missing:
                    why = (
                        "corrupt blob(s) quarantined: " + ", ".join(failed)
                        if failed
                        else "missing blob(s): " + ", ".join(missing)
                    )
                    self.db.set_version_status(rec.model, rec.version, "broken", why)
                    report.broken_versions.append((rec.model, rec.version))
        return report
