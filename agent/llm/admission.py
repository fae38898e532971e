"""One language model version's concurrency limit and its bounded queue, on the event loop.

``max_concurrency`` generations run at once (one llama.cpp context each); up to ``max_queue``
requests wait for a slot, in arrival order; the next is refused at once (:class:`Overloaded`:
OpenAI's 429), so a flood costs neither memory nor a worker thread. A slot is given back only when
its generation has really stopped (the worker thread returned), never when its client left, so two
generations never share a context.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class Overloaded(Exception):
    """Every slot is busy and the queue is full: the client should retry later (429 / 503)."""


class Admission:
    """Not thread-safe: the event loop's only."""

    def __init__(self, *, limit: int, queue: int):
        self.limit = limit
        self.queue = queue
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def reserve(self, what: str) -> Ticket:
        """A slot now, or a place in the queue; :class:`Overloaded` when the queue is full."""
        if self.running < self.limit and not self._waiters:
            self.running += 1
            return Ticket(self, None)
        if len(self._waiters) >= self.queue:
            raise Overloaded(
                f"{what} is busy: {self.running} generation(s) running and {len(self._waiters)} waiting; retry later"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return Ticket(self, waiter)

    def _grant_next(self) -> None:
        """A slot came free: the oldest waiter takes it, else it is counted free."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: running stays the same
                return
        self.running -= 1


class Ticket:
    """A request's place: granted at once, or waiting. :meth:`release` is idempotent."""

    def __init__(self, admission: Admission, waiter: asyncio.Future[None] | None):
        self._admission = admission
        self._waiter = waiter
        self._released = False

    @property
    def granted(self) -> bool:
        return self._waiter is None or (self._waiter.done() and not self._waiter.cancelled())

    async def wait(self) -> bool:
        """Until the slot is this request's (at once when it was free); False when it left the queue first."""
        waiter = self._waiter
        if waiter is None:
            return not self._released
        try:
            # Shielded: a cancelled caller leaves the waiter to release(), which passes a slot on.
            await asyncio.shield(waiter)
        except asyncio.CancelledError:
            if waiter.cancelled() and self._released:
                return False  # release() took it out of the queue
            raise
        return not self._released

    def release(self) -> None:
        """Give the slot back, or leave the queue; the second call does nothing."""
        if self._released:
            return
        self._released = True
        admission = self._admission
        waiter = self._waiter
        if waiter is None or (waiter.done() and not waiter.cancelled()):
            admission._grant_next()
            return
        waiter.cancel()
        with contextlib.suppress(ValueError):
            admission._waiters.remove(waiter)
