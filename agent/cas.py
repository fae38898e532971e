"""Content-addressed blob store: every blob lives at ``blobs/sha256/<hex>``.

A blob only appears under its digest once its bytes hashed to that digest and
reached the disk: writers stream into ``tmp/``, fsync, then rename, so a crash
(or ``kill -9``) leaves either the whole blob or nothing but a temp file.
Partial downloads are kept in ``tmp/`` under the digest they are expected to
have, so an interrupted pull can resume where it stopped.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Literal

from agent.errors import CorruptBlob, NotFound, Unavailable
from agent.fsmodes import PRIVATE_DIR, private_dirs, private_opener

CHUNK = 1 << 20

# mmap(2) through libc: Python's mmap module keeps a duplicate of the file descriptor open for
# each mapping (until 3.13's trackfd), and a node with thousands of versions would run out of them.
_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
_munmap = _libc.munmap
_munmap.restype = ctypes.c_int
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_syncfs = _libc.syncfs
_syncfs.restype = ctypes.c_int
_syncfs.argtypes = [ctypes.c_int]


def map_readonly(path: Path) -> memoryview:
    """The whole file mapped read-only (PROT_READ, shared with the page cache), as a read-only
    byte view. The mapping lives as long as the view and anything built on it (NumPy arrays)
    and is unmapped when the last goes; no file descriptor stays open.

    Only for files that are never written in place: a blob of this store is written to tmp/
    and renamed, then only read, renamed aside (quarantine) or unlinked, none of which
    changes a mapping of it (the mapping keeps the inode).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return memoryview(b"")
        addr = _mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            errno = ctypes.get_errno()
            raise OSError(errno, f"cannot map {path}: {os.strerror(errno)}")
    finally:
        os.close(fd)
    buffer = (ctypes.c_char * size).from_address(addr)
    unmap = weakref.finalize(buffer, _munmap, addr, size)
    # Not at interpreter exit: a daemon thread (an agent run on one) may still read the arrays
    # then, and the process's end unmaps everything anyway.
    unmap.atexit = False
    return memoryview(buffer).cast("B").toreadonly()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def split_digest(digest: str) -> tuple[str, str]:
    """'sha256:<64 hex>' to ('sha256', hex); anything else is refused."""
    algo, sep, hexpart = digest.partition(":")
    if algo != "sha256" or not sep or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return algo, hexpart


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobWriter:
    """Streams one blob into the store, hashing as it goes.

    With ``expected`` set, the partial file is named after that digest and
    kept on failure, so :meth:`BlobStore.partial_size` tells a resuming pull
    where to start; :meth:`commit` refuses content that does not match.
    """

    def __init__(self, store: BlobStore, expected: str | None = None, resume: bool = False):
        self._store = store
        self.expected = expected
        self._hash = hashlib.sha256()
        self.size = 0
        if expected is not None:
            split_digest(expected)
            self.path = store.partial_path(expected)
            mode: Literal["r+b", "wb"] = "r+b" if resume and self.path.exists() else "wb"
            # 0600 like every file under the state directory (mkstemp below already is).
            self._fh: BinaryIO = open(self.path, mode, opener=private_opener)  # noqa: SIM115 - closed in commit/abort
            if mode == "r+b":
                # Re-hash what is already there: the hash state is not persisted.
                while chunk := self._fh.read(CHUNK):
                    self._hash.update(chunk)
                    self.size += len(chunk)
        else:
            fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="blob-")
            self.path = Path(name)
            self._fh = os.fdopen(fd, "wb")
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        self._fh.write(data)
        self._hash.update(data)
        self.size += len(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def commit(self) -> str:
        """Make the blob visible under its digest; returns the digest."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        digest = self.digest
        if self.expected is not None and digest != self.expected:
            self.path.unlink(missing_ok=True)
            self._done = True
            raise CorruptBlob(f"blob content hashes to {digest}, expected {self.expected}")
        final = self._store.path(digest)
        os.replace(self.path, final)
        fsync_dir(final.parent)
        self._done = True
        return digest

    def stage(self) -> Path:
        """Close the file, neither synced nor renamed under its digest (:meth:`BlobStore.publish` does
        that after the caller synced); returns where it is."""
        self._fh.close()
        self._done = True
        return self.path

    def abort(self, keep_partial: bool = True) -> None:
        """Stop writing; a named partial is kept for resume unless told otherwise."""
        if self._done:
            return
        self._done = True
        self._fh.close()
        if self.expected is None or not keep_partial:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self.abort()


class BlobStore:
    """Blobs under ``root/blobs/sha256``; temp and partial files under ``root/tmp``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blob_dir = self.root / "blobs" / "sha256"
        self.tmp_dir = self.root / "tmp"
        private_dirs(self.blob_dir)
        private_dirs(self.tmp_dir)
        # Blobs put with durable=False: written to tmp/, not yet under their digests (see publish).
        self._unpublished: dict[str, Path] = {}

    def path(self, digest: str) -> Path:
        return self.blob_dir / split_digest(digest)[1]

    def partial_path(self, digest: str) -> Path:
        return self.tmp_dir / f"partial-{split_digest(digest)[1]}"

    def partial_size(self, digest: str) -> int:
        try:
            return self.partial_path(digest).stat().st_size
        except FileNotFoundError:
            return 0

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def size(self, digest: str) -> int:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError as exc:
            raise NotFound(f"blob {digest} is not in the store") from exc

    def writer(self, expected: str | None = None, resume: bool = False) -> BlobWriter:
        return BlobWriter(self, expected, resume)

    def put_bytes(self, data: bytes, expected: str | None = None, durable: bool = True) -> str:
        """Store ``data`` under its digest.

        ``durable=False`` skips the fsyncs, for a caller that syncs many blobs at once (a bulk
        import): the blob is written to tmp/ and goes under its digest only at :meth:`publish`,
        which the caller calls after :meth:`sync`. A crash before then leaves no torn file under
        a digest, which every later put or pull of that content would trust (:meth:`has`).
        """
        digest = sha256_digest(data)
        if expected is not None and digest != expected:
            raise CorruptBlob(f"blob content hashes to {digest}, expected {expected}")
        if self.has(digest) or digest in self._unpublished:
            return digest
        with self.writer() as writer:
            writer.write(data)
            if durable:
                return writer.commit()
            self._unpublished[digest] = writer.stage()
            return digest

    def sync(self) -> None:
        """Flush the file system the store is on (syncfs), not every mounted one (os.sync)."""
        fd = os.open(self.blob_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs(fd) != 0:  # a write-back error: the data may not be on disk, so nothing is published
                errno = ctypes.get_errno()
                raise OSError(errno, f"cannot flush the blob store's file system: {os.strerror(errno)}")
        finally:
            os.close(fd)

    def publish(self) -> None:
        """Move the blobs put with ``durable=False`` under their digests, then sync the blob
        directory. Call it once their data is on disk (:meth:`sync`)."""
        if not self._unpublished:
            return
        for digest, path in self._unpublished.items():
            os.replace(path, self.path(digest))
        self._unpublished.clear()
        fsync_dir(self.blob_dir)

    def put_stream(self, fh: BinaryIO, expected: str, durable: bool = True) -> str:
        """Store what ``fh`` yields, chunk by chunk (a file larger than memory), as :meth:`put_bytes`
        stores bytes; CorruptBlob, with nothing stored, when it does not hash to ``expected``."""
        if self.has(expected) or expected in self._unpublished:
            return expected
        with self.writer() as writer:
            while chunk := fh.read(CHUNK):
                writer.write(chunk)
            if writer.digest != expected:
                raise CorruptBlob(f"content hashes to {writer.digest}, expected {expected} (changed while read?)")
            if durable:
                return writer.commit()
            self._unpublished[expected] = writer.stage()
            return expected

    def verified_path(self, digest: str) -> Path:
        """Where a blob is, once re-hashed in chunks (never whole in memory): for a file handed on by
        path (a WASI-NN backend's model file). NotFound / CorruptBlob as :meth:`read_bytes`."""
        path = self.path(digest)
        hasher = hashlib.sha256()
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    hasher.update(chunk)
        except FileNotFoundError as exc:
            raise NotFound(f"blob {digest} is not in the store") from exc
        actual = "sha256:" + hasher.hexdigest()
        if actual != digest:
            raise CorruptBlob(f"blob {digest} is corrupt: its content hashes to {actual}")
        return path

    def put_file(self, src: Path, expected: str | None = None) -> str:
        with open(src, "rb") as fh, self.writer() as writer:
            while chunk := fh.read(CHUNK):
                writer.write(chunk)
            if expected is not None and writer.digest != expected:
                raise CorruptBlob(f"{src} hashes to {writer.digest}, expected {expected}")
            return writer.commit()

    def read_bytes(self, digest: str, verify: bool = True) -> bytes:
        """The blob's bytes; with ``verify``, refuses content that no longer matches."""
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"blob {digest} is not in the store") from exc
        if verify and sha256_digest(data) != digest:
            raise CorruptBlob(f"blob {digest} is corrupt: its content hashes to {sha256_digest(data)}")
        return data

    def map_bytes(self, digest: str, verify: bool = True) -> memoryview:
        """The blob mapped read-only (:func:`map_readonly`) rather than copied; with ``verify``,
        re-hashed through the mapping first, so what is served is what the digest names."""
        try:
            data = map_readonly(self.path(digest))
        except FileNotFoundError as exc:
            raise NotFound(f"blob {digest} is not in the store") from exc
        except OSError as exc:  # mmap's own failures too (ENOMEM: the address space, vm.max_map_count)
            raise Unavailable(f"blob {digest} cannot be mapped: {exc.strerror or exc}") from exc
        if verify:
            actual = "sha256:" + hashlib.sha256(data).hexdigest()
            if actual != digest:
                raise CorruptBlob(f"blob {digest} is corrupt: its content hashes to {actual}")
        return data

    def verify(self, digest: str) -> bool:
        """Re-hash a blob on disk; False when it is missing or does not match."""
        hasher = hashlib.sha256()
        try:
            with open(self.path(digest), "rb") as fh:
                while chunk := fh.read(CHUNK):
                    hasher.update(chunk)
        except FileNotFoundError:
            return False
        return "sha256:" + hasher.hexdigest() == digest

    def delete(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def quarantine(self, digest: str) -> Path:
        """Move a blob that failed verification aside, keeping it for inspection."""
        qdir = self.root / "quarantine"
        qdir.mkdir(mode=PRIVATE_DIR, exist_ok=True)
        target = qdir / split_digest(digest)[1]
        shutil.move(str(self.path(digest)), target)
        return target

    def digests(self) -> Iterator[str]:
        for entry in self.blob_dir.iterdir():
            if len(entry.name) == 64:
                yield "sha256:" + entry.name

    def clean_tmp(self, keep_partials: bool = True) -> None:
        """Remove leftovers of writes a crash interrupted (partials are resumable)."""
        for entry in self.tmp_dir.iterdir():
            if keep_partials and entry.name.startswith("partial-"):
                continue
            entry.unlink(missing_ok=True)
