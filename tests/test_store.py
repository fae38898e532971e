"""The content-addressed blob store and the SQLite state."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from pathlib import Path

import pytest

from agent.cas import BlobStore, sha256_digest
from agent.errors import CorruptBlob, NotFound
from agent.state import StateDB


def test_put_and_read_back_by_digest(tmp_path: Path):
    store = BlobStore(tmp_path)
    digest = store.put_bytes(b"hello")
    assert digest == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert store.path(digest) == tmp_path / "blobs" / "sha256" / digest[7:]
    assert store.read_bytes(digest) == b"hello"
    assert store.put_bytes(b"hello") == digest  # idempotent
    assert list(store.digests()) == [digest]


def test_put_refuses_content_that_does_not_match_the_expected_digest(tmp_path: Path):
    store = BlobStore(tmp_path)
    with pytest.raises(CorruptBlob):
        store.put_bytes(b"hello", expected=sha256_digest(b"other"))
    assert list(store.digests()) == []
    assert list(store.tmp_dir.iterdir()) == []


def test_corruption_on_disk_is_detected(tmp_path: Path):
    store = BlobStore(tmp_path)
    digest = store.put_bytes(b"precious")
    store.path(digest).write_bytes(b"tampered")
    assert not store.verify(digest)
    with pytest.raises(CorruptBlob, match="corrupt"):
        store.read_bytes(digest)
    moved = store.quarantine(digest)
    assert moved.read_bytes() == b"tampered" and not store.has(digest)


def test_missing_blob_is_not_found(tmp_path: Path):
    with pytest.raises(NotFound):
        BlobStore(tmp_path).read_bytes(sha256_digest(b"nothing"))


def test_interrupted_write_resumes_from_the_partial_file(tmp_path: Path):
    store = BlobStore(tmp_path)
    data = bytes(range(256)) * 1000
    digest = sha256_digest(data)
    writer = store.writer(expected=digest)
    writer.write(data[:100_000])
    writer.abort()  # the connection dropped
    assert store.partial_size(digest) == 100_000 and not store.has(digest)
    resumed = store.writer(expected=digest, resume=True)
    assert resumed.size == 100_000
    resumed.write(data[100_000:])
    assert resumed.commit() == digest
    assert store.read_bytes(digest) == data and store.partial_size(digest) == 0


def test_writer_refuses_wrong_content_and_leaves_nothing(tmp_path: Path):
    store = BlobStore(tmp_path)
    writer = store.writer(expected=sha256_digest(b"right"))
    writer.write(b"wrong")
    with pytest.raises(CorruptBlob):
        writer.commit()
    assert list(store.digests()) == [] and store.partial_size(sha256_digest(b"right")) == 0


def test_clean_tmp_keeps_resumable_partials(tmp_path: Path):
    store = BlobStore(tmp_path)
    (store.tmp_dir / "blob-abandoned").write_bytes(b"x")
    digest = sha256_digest(b"abc")
    store.partial_path(digest).write_bytes(b"a")
    store.clean_tmp()
    assert [p.name for p in store.tmp_dir.iterdir()] == [store.partial_path(digest).name]


def test_state_records_versions_and_the_active_one(tmp_path: Path):
    db = StateDB(tmp_path / "agent.db")
    with contextlib.closing(sqlite3.connect(tmp_path / "agent.db")) as raw:  # WAL is a property of the file
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    d = [sha256_digest(bytes([i])) for i in range(3)]
    db.add_version("m", "1", *d, source="test")
    db.add_version("m", "2", *d, source="test")
    db.set_active("m", "1")
    db.set_active("m", "2")
    model = db.get_model("m")
    assert (model.active_version, model.previous_version) == ("2", "1")
    assert [v.version for v in db.versions("m")] == ["1", "2"]
    db.set_pinned("m", True)
    db.close()
    reopened = StateDB(tmp_path / "agent.db")
    assert reopened.get_model("m").pinned and reopened.get_model("m").active_version == "2"
    assert reopened.referenced_digests() == set(d)
