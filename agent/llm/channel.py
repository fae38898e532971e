"""Streamed chunks from a generation's worker thread to the event loop, at most ``capacity`` in between.

The worker puts each chunk (a thread-safe hand-off to the loop); once ``capacity`` chunks wait
for the client, the worker blocks before the next token, so a client that reads slowly slows its
own generation instead of filling memory. The consumer going away (:meth:`close`) wakes a blocked
worker, which then sees its cancel flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from typing import Any

# The end of the stream: the worker's result (an exception when it failed).
_END = object()


class ChunkChannel:
    def __init__(self, *, loop: asyncio.AbstractEventLoop, capacity: int, cancel: threading.Event):
        self._loop = loop
        self._space = threading.Semaphore(capacity)
        self._cancel = cancel
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._outcome: BaseException | None = None

    # -- the worker thread -----------------------------------------------------------------------
    def put(self, item: Any) -> bool:
        """Hand ``item`` to the loop; False (dropped) once the consumer is gone or the loop closed."""
        self._space.acquire()
        if self._cancel.is_set():
            self._space.release()  # so the next put does not block either
            return False
        try:
            self._loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:  # the loop is closed: the agent stopped
            self._cancel.set()
            return False
        return True

    def end(self, error: BaseException | None = None) -> None:
        """The worker is done (``error``: how it failed); never blocks."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._finish, error)

    # -- the event loop ----------------------------------------------------------------------------
    def _deliver(self, item: Any) -> None:
        self._items.append(item)
        self._wake()

    def _finish(self, error: BaseException | None) -> None:
        self._ended = True
        self._outcome = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        """The next chunk; StopAsyncIteration at the end; the worker's exception when it failed."""
        while not self._items:
            if self._ended:
                if self._outcome is not None:
                    raise self._outcome
                raise StopAsyncIteration
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        self._space.release()
        return item

    def close(self) -> None:
        """The consumer is gone: the worker stops at its next token and never blocks on this channel."""
        self._cancel.set()
        self._space.release()
