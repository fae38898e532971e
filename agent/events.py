"""In-process event bus: swaps, rollbacks, refused images and commands, failures.

Producers call :meth:`EventBus.publish` from any thread; consumers (the MQTT
telemetry publisher, Kubernetes Events, the log) each get their own bounded
asyncio queue, so a slow consumer loses its oldest events, never blocks the
producer, and never delays another consumer.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    kind: str  # e.g. "model.swapped", "model.rollback", "image.refused", "command.refused"
    fields: dict[str, Any]
    ts: float = field(default_factory=time.time)
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "ts": self.ts, "seq": self.seq, **self.fields}


class EventBus:
    def __init__(self, history: int = 256):
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event]]] = []
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._history: list[Event] = []
        self._history_max = history
        self._listeners: list[Callable[[Event], None]] = []

    def publish(self, kind: str, **fields: Any) -> Event:
        event = Event(kind=kind, fields=fields, seq=next(self._seq))
        with self._lock:
            self._history.append(event)
            del self._history[: -self._history_max]
            subscribers = list(self._subscribers)
            listeners = list(self._listeners)
        for listener in listeners:
            listener(event)
        for loop, queue in subscribers:
            try:
                loop.call_soon_threadsafe(_offer, queue, event)
            except RuntimeError:  # the subscriber's loop is closed
                self.unsubscribe(queue)
        return event

    def subscribe(self, maxsize: int = 1024) -> asyncio.Queue[Event]:
        """A queue on the running loop that receives every event published from now on."""
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        with self._lock:
            self._subscribers.append((asyncio.get_running_loop(), queue))
        return queue

    def listen(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener(event)`` on the publisher's thread for every event from now on.

        For cheap, thread-safe, non-raising consumers (the metrics counters): unlike a
        queue it loses nothing, and needs no event loop.
        """
        with self._lock:
            self._listeners.append(listener)

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        with self._lock:
            self._subscribers = [(lp, q) for lp, q in self._subscribers if q is not queue]

    def recent(self, kind_prefix: str = "") -> list[Event]:
        with self._lock:
            return [e for e in self._history if e.kind.startswith(kind_prefix)]


def _offer(queue: asyncio.Queue[Event], event: Event) -> None:
    if queue.full():
        queue.get_nowait()  # drop the oldest: consumers want what is current
    queue.put_nowait(event)
