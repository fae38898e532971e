"""Exponential backoff with jitter, shared by every retried registry call.

Jitter spreads the retries of a fleet of nodes that all lost the registry at
the same moment, so they do not come back as one thundering herd.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    attempts: int
    initial_s: float
    max_s: float
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self, retry_after: float | None = None) -> float:
        """The wait before the next attempt: half fixed, half random, doubling each time."""
        cap = min(self.max_s, self.initial_s * (2**self.attempt))
        delay = cap / 2 + self.rng.uniform(0, cap / 2)
        if retry_after is not None:
            # Retry-After is the server's own word; honour it, within our ceiling.
            delay = max(delay, min(retry_after, self.max_s))
        return delay

    @property
    def exhausted(self) -> bool:
        return self.attempt + 1 >= self.attempts

    def wait(self, retry_after: float | None = None) -> float:
        delay = self.next_delay(retry_after)
        self.attempt += 1
        self.sleep(delay)
        return delay
