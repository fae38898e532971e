"""A blob download's way to disk: hashing on the receiving thread, writing on a thread of its own.

The store's :class:`agent.cas.BlobWriter` hashes and writes in one call, one
after the other. For a large blob arriving at network speed the disk is the
slow part (writes throttled by the page cache's dirty limits, then the
fsync), so here the two overlap: the receiving thread hashes each block
(hashlib releases the GIL) and hands it to a writer thread (file writes
release it too). The on-disk contract is the store's own: the partial file is
``tmp/partial-<hex>`` of the expected digest, so a later pull resumes it, and
the blob appears under ``blobs/sha256/`` only after an fsync and only if its
content hashed to the expected digest.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from agent.cas import CHUNK, BlobStore, fsync_dir, split_digest
from agent.errors import CorruptBlob
from agent.fsmodes import private_opener

# Blocks in flight between the threads: bounds memory to DEPTH x the block size.
DEPTH = 8
# Start the disk's writeback every this many bytes, so the final fsync finds little left to do.
WRITEBACK_EVERY = 8 << 20
SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the range's dirty pages, do not wait


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) from libc, or None where there is none (the fsync then does it all)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    func.restype = ctypes.c_int
    return func


_SYNC_FILE_RANGE = _sync_file_range()


class BlobSink:
    def __init__(self, store: BlobStore, expected: str, resume: bool = False):
        split_digest(expected)
        self.store = store
        self.expected = expected
        self.path: Path = store.partial_path(expected)
        self._hash = hashlib.sha256()
        self.size = 0
        mode = "r+b" if resume and self.path.exists() else "wb"
        self._fh = open(self.path, mode, opener=private_opener)  # noqa: SIM115 - closed in commit/abort; 0600
        if mode == "r+b":
            # The hash state is not persisted with the partial: re-hash what is there.
            while chunk := self._fh.read(CHUNK):
                self._hash.update(chunk)
                self.size += len(chunk)
        self._queue: queue.Queue[memoryview | None] = queue.Queue(DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="blob-writer", daemon=True)
        self._thread.start()
        self._done = False

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def write(self, block: memoryview) -> None:
        """Take ownership of ``block`` (the caller must not reuse its buffer) and queue it for the disk."""
        if self._error is not None:
            raise self._error
        self._hash.update(block)
        self.size += len(block)
        self._queue.put(block)

    def _drain(self) -> None:
        start = written = self.size
        while (block := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._fh.write(block)
                except BaseException as exc:  # noqa: BLE001 - handed to the receiving thread
                    self._error = exc
                    continue
                written += len(block)
                if _SYNC_FILE_RANGE is not None and written - start >= WRITEBACK_EVERY:
                    # Without this the page cache holds the whole blob dirty until the commit's
                    # fsync, which then writes it all while the download sits idle.
                    self._fh.flush()
                    _SYNC_FILE_RANGE(self._fh.fileno(), start, written - start, SYNC_FILE_RANGE_WRITE)
                    start = written

    def _stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def commit(self) -> str:
        """fsync, check the digest, and make the blob visible under it; the partial is gone either way on a mismatch."""
        self._stop()
        self._done = True
        if self._error is not None:
            self._fh.close()
            raise self._error
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        digest = self.digest
        if digest != self.expected:
            self.path.unlink(missing_ok=True)
            raise CorruptBlob(f"blob content hashes to {digest}, expected {self.expected}")
        final = self.store.path(digest)
        os.replace(self.path, final)
        fsync_dir(final.parent)
        return digest

    def abort(self, keep_partial: bool = True) -> None:
        """Stop; what reached the file stays for a resume unless told otherwise."""
        if self._done:
            return
        self._done = True
        self._stop()
        self._fh.close()
        if not keep_partial:
            self.path.unlink(missing_ok=True)
