"""The image cache: size budget with LRU eviction, gc, verify + quarantine, on a real store and SQLite.

Versions share the test kernel's module blob, so every case also checks that
a blob another version still needs is never removed with an evicted one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from images_fixtures import ImageEnv, KeyPair, make_keypair, make_large_model, signed_layout

from agent.images.cache import ImageCache
from agent.images.settings import CacheSettings

WEIGHTS = 100_000


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return make_keypair(tmp_path_factory.mktemp("keys"), "release")


class Store:
    """A node's store holding m:1..m:5 and p:1 (p pinned); m:5 active, m:4 its rollback target."""

    def __init__(self, root: Path):
        self.env = ImageEnv(root)
        repo = self.env.repository
        self.records = {}
        for i, (name, version) in enumerate([("m", "1"), ("m", "2"), ("m", "3"), ("m", "4"), ("m", "5"), ("p", "1")]):
            model = make_large_model(root / f"{name}{version}", name, version, WEIGHTS, seed=i)
            self.records[f"{name}:{version}"] = repo.import_dir(model)
        repo.db.set_active("m", "4")
        repo.db.set_active("m", "5")
        repo.db.set_active("p", "1")
        repo.db.set_pinned("p", True)
        self.in_use: set[tuple[str, str]] = set()
        self.cache = ImageCache(repo.blobs, repo.db, CacheSettings(max_bytes=0), in_use=lambda: self.in_use)
        # Least recently used first: m:2, then m:3, then m:1.
        for label, when in (("m:2", 100.0), ("m:3", 200.0), ("m:1", 300.0), ("m:4", 50.0), ("m:5", 50.0)):
            self.cache.touch_version(self.records[label], when=when)

    def budget(self, max_bytes: int) -> None:
        self.cache.settings = CacheSettings(max_bytes=max_bytes)

    def versions(self) -> list[str]:
        return sorted(f"{r.model}:{r.version}" for r in self.env.repository.db.versions())


def test_budget_evicts_least_recently_used_first_and_keeps_shared_blobs(tmp_path: Path) -> None:
    store = Store(tmp_path)
    blobs = store.env.repository.blobs
    module = store.records["m:1"].module_digest
    assert all(r.module_digest == module for r in store.records.values())  # one module blob for all six
    used = store.cache.used_bytes()
    store.budget(used - int(1.5 * WEIGHTS))  # two versions' weights must go
    report = store.cache.enforce_budget()
    assert report.evicted == [("m", "2"), ("m", "3")]
    assert report.used_bytes <= report.budget_bytes
    assert store.versions() == ["m:1", "m:4", "m:5", "p:1"]
    assert not blobs.has(store.records["m:2"].weights_digest) and not blobs.has(store.records["m:3"].config_digest)
    assert blobs.has(module) and blobs.has(store.records["m:1"].weights_digest)
    assert json.loads(json.dumps(report.to_dict()))["evicted"] == ["m:2", "m:3"]


def test_active_previous_pinned_and_loaded_versions_are_never_evicted(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.in_use = {("m", "1")}  # e.g. the canary of a traffic split
    store.budget(1)  # nothing fits
    report = store.cache.enforce_budget()
    assert sorted(report.evicted) == [("m", "2"), ("m", "3")]
    assert store.versions() == ["m:1", "m:4", "m:5", "p:1"]
    assert report.used_bytes > report.budget_bytes  # over budget, and says so rather than break serving
    for label in ("m:1", "m:4", "m:5", "p:1"):
        assert all(store.env.repository.blobs.verify(d) for d in store.records[label].digests)


def test_gc_removes_unreferenced_blobs_and_stale_partials_only(tmp_path: Path) -> None:
    store = Store(tmp_path)
    blobs = store.env.repository.blobs
    old = time.time() - 30 * 24 * 3600
    orphan_old = blobs.put_bytes(b"left behind by an interrupted import long ago")
    os.utime(blobs.path(orphan_old), (old, old))
    orphan_new = blobs.put_bytes(b"an import may be about to record this")
    stale = blobs.partial_path("sha256:" + "1" * 64)
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (old, old))
    fresh = blobs.partial_path("sha256:" + "2" * 64)
    fresh.write_bytes(b"y" * 10)
    report = store.cache.gc()
    assert report.removed_blobs == [orphan_old]
    assert report.removed_partials == [stale.name]
    assert blobs.has(orphan_new) and fresh.exists() and not stale.exists()
    assert report.freed_bytes == len(b"left behind by an interrupted import long ago") + 1000
    assert store.versions() == ["m:1", "m:2", "m:3", "m:4", "m:5", "p:1"]  # no budget: nothing evicted
    assert all(blobs.has(d) for r in store.records.values() for d in r.digests)


def test_verify_quarantines_corrupt_blobs_and_marks_versions_broken(tmp_path: Path) -> None:
    store = Store(tmp_path)
    blobs = store.env.repository.blobs
    bad = store.records["m:2"].weights_digest
    data = bytearray(blobs.path(bad).read_bytes())
    data[100] ^= 0x01
    blobs.path(bad).write_bytes(bytes(data))
    gone = store.records["m:3"].config_digest
    blobs.delete(gone)

    cli = store.env.cli("cache", "verify", "--json")
    assert cli.returncode == 65, cli.stderr
    doc = json.loads(cli.stdout)
    assert doc["quarantined"] == [bad] and doc["ok"] is False
    assert doc["missing"] == [{"version": "m:3", "digest": gone}]
    assert sorted(doc["broken_versions"]) == ["m:2", "m:3"]
    assert (tmp_path / "state" / "quarantine" / bad.split(":")[1]).read_bytes() == bytes(data)
    db = store.env.repository.db
    assert db.get_version("m", "2").status == "broken" and "quarantined" in db.get_version("m", "2").error
    assert db.get_version("m", "1").status == "ready"
    # The human form, on the next run: nothing left to quarantine, the missing blobs still named.
    again = store.env.cli("cache", "verify")
    assert again.returncode == 65 and "MISSING" in again.stdout and "QUARANTINED" not in again.stdout


def test_cache_gc_cli(tmp_path: Path) -> None:
    store = Store(tmp_path)
    used = store.cache.used_bytes()
    store.env.config_path.write_text(
        store.env.config_path.read_text() + f"\n[cache]\nmax_size = {used - WEIGHTS // 2}\n"
    )
    cli = store.env.cli("cache", "gc", "--json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["evicted"] == ["m:2"]
    human = store.env.cli("cache", "gc")
    assert human.returncode == 0 and "evicted 0 version(s)" in human.stdout


def test_a_pull_that_overflows_the_budget_evicts_old_versions_not_itself(tmp_path: Path, key: KeyPair) -> None:
    env = ImageEnv(
        tmp_path / "node",
        keys={"release": key.public_path},
        scopes={"reg.example": ["release"]},
        cache={"max_size": 3 * WEIGHTS},
    )
    puller = env.puller()
    for version in ("1", "2", "3"):
        model = make_large_model(tmp_path / f"v{version}", "big", version, WEIGHTS, seed=int(version))
        path, _ = signed_layout(tmp_path, model, key, "reg.example/models/big")
        puller.import_layout(path)
        if version == "1":
            env.repository.db.set_active("big", "1")
    assert env.versions() == [("big", "1"), ("big", "3")]  # 2 went; 1 is active, 3 was just pulled
