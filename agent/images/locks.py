"""Inter-process locks (flock) between the daemon's pulls, CLI pulls and cache maintenance.

Pulls hold the store lock shared, cache gc and eviction exclusive, so a
blob that a running pull has fetched but not yet recorded is never taken
for garbage. One lock file per blob stops two pulls from writing the same
partial file. The kernel drops a flock when its process dies, so a
``kill -9`` never leaves a lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from agent.fsmodes import private_dirs


class Locks:
    def __init__(self, root: Path):
        # Not under tmp/: the daemon empties tmp/ (except partials) at start-up.
        self.dir = Path(root) / "locks"
        private_dirs(self.dir)

    @contextlib.contextmanager
    def _flock(self, name: str, mode: int, blocking: bool = True) -> Iterator[bool]:
        fd = os.open(self.dir / name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, mode | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def store_shared(self) -> contextlib.AbstractContextManager[bool]:
        return self._flock("store.lock", fcntl.LOCK_SH)

    def store_exclusive(self, blocking: bool = True) -> contextlib.AbstractContextManager[bool]:
        return self._flock("store.lock", fcntl.LOCK_EX, blocking)

    def blob(self, digest: str) -> contextlib.AbstractContextManager[bool]:
        return self._flock("blob-" + digest.replace(":", "-"), fcntl.LOCK_EX)
