"""Pull progress: a bar on a terminal, structured ``pull.progress`` log events otherwise.

A daemon's logs get one event every few seconds (and at the end), enough to
see a slow pull move without drowning the log; a person at a terminal gets a
bar redrawn at most ten times a second on stderr.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Protocol, TextIO

import structlog


class Progress(Protocol):
    def start(self, image: str, total: int) -> None: ...

    def stage(self, label: str) -> None: ...

    def advance(self, n: int) -> None: ...

    def finish(self, ok: bool = True) -> None: ...


class NullProgress:
    def start(self, image: str, total: int) -> None:
        pass

    def stage(self, label: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self, ok: bool = True) -> None:
        pass


class _Counter:
    def __init__(self) -> None:
        self.image = ""
        self.total = 0
        self.done = 0
        self.label = ""
        self.t0 = time.monotonic()

    def start(self, image: str, total: int) -> None:
        self.image, self.total, self.done, self.t0 = image, total, 0, time.monotonic()

    def stage(self, label: str) -> None:
        self.label = label

    def rate(self) -> float:
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        return self.done / elapsed


class TerminalProgress(_Counter):
    WIDTH = 30

    def __init__(self, stream: TextIO | None = None):
        super().__init__()
        self.stream = stream or sys.stderr
        self._drawn = 0.0

    def advance(self, n: int) -> None:
        self.done = max(0, self.done + n)
        now = time.monotonic()
        if now - self._drawn >= 0.1:
            self._drawn = now
            self._draw()

    def _draw(self, end: str = "") -> None:
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        filled = int(frac * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        mb = 1024 * 1024
        line = (
            f"\r{self.label[:24]:<24} [{bar}] {frac * 100:5.1f}% "
            f"{self.done / mb:7.1f}/{self.total / mb:.1f} MiB {self.rate() / mb:6.1f} MiB/s"
        )
        self.stream.write(line + end)
        self.stream.flush()

    def finish(self, ok: bool = True) -> None:
        if ok:
            self.done = self.total
        self._draw(end="\n")


class LogProgress(_Counter):
    def __init__(self, log: Any = None, interval_s: float = 5.0):
        super().__init__()
        self.log = log or structlog.get_logger("edge_agent.images")
        self.interval_s = interval_s
        self._last = 0.0

    def start(self, image: str, total: int) -> None:
        super().start(image, total)
        self._last = time.monotonic()
        self.log.info("pull.progress", image=image, done_bytes=0, total_bytes=total, percent=0.0)

    def advance(self, n: int) -> None:
        self.done = max(0, self.done + n)
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._emit()

    def _emit(self) -> None:
        self.log.info(
            "pull.progress",
            image=self.image,
            blob=self.label,
            done_bytes=self.done,
            total_bytes=self.total,
            percent=round(100.0 * self.done / self.total, 1) if self.total else 100.0,
            mb_per_s=round(self.rate() / 1e6, 1),
        )

    def finish(self, ok: bool = True) -> None:
        if ok:
            self._emit()


def progress_for(stream: TextIO | None = None) -> Progress:
    """A bar when ``stream`` (stderr by default) is a terminal, log events otherwise."""
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return TerminalProgress(stream)
    return LogProgress()
