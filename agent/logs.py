"""Logging through structlog: JSON lines when not on a terminal, readable on one.

structlog's configuration is process-wide by nature; agents in one process
(the fleet simulator) tell their lines apart by the ``node`` field bound to
each agent's logger.

Two things a log line may need beyond its text:

- **Its priority, for the journal.** journald stores what a service writes on
  stderr at priority "info" unless a line starts with an sd-daemon prefix
  (``<3>`` error ... ``<7>`` debug, sd-daemon(3)); without it ``journalctl -p
  err`` finds nothing. systemd sets ``$JOURNAL_STREAM`` to the device and inode
  of the stream it connected, so the prefix is added exactly when stderr is that
  stream, not when a child of a service writes into a pipe or a file.
- **Not to say a failure twice.** A component that logs an error and raises it
  (an image refusal) would otherwise see a CLI verb print the same message
  again as it exits; :func:`already_logged` lets the CLI skip its own line.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
from typing import Any, TextIO

import structlog

# sd-daemon(3): SD_CRIT 2, SD_ERR 3, SD_WARNING 4, SD_INFO 6, SD_DEBUG 7.
PRIORITIES = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6, "debug": 7}
ERR = PRIORITIES["error"]
REPORT_LEVELS = ("critical", "exception", "error", "warning", "warn")

# Text of the latest warning and error lines, for already_logged. Process-wide like structlog's own
# configuration, and bounded: only "was this just said?" is ever asked of it.
_logged_errors: collections.deque[str] = collections.deque(maxlen=32)


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=False) if fmt == "console" else structlog.processors.JSONRenderer()
    )
    if is_journal(stream):
        renderer = JournalPriority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            remember_reports,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def is_journal(stream: Any) -> bool:
    """True when ``stream`` is the journal's stream: ``$JOURNAL_STREAM`` is its ``device:inode``."""
    dev, sep, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, OSError, ValueError):  # no file descriptor (io.UnsupportedOperation), a bad value
        return False


def prefix_lines(text: str, priority: int) -> str:
    """Every line gets the prefix: journald reads each line as an entry of its own."""
    return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))


class JournalPriority:
    """Wraps the renderer: the rendered line(s) with the event's sd-daemon priority in front."""

    def __init__(self, renderer: structlog.typing.Processor):
        self.renderer = renderer

    def __call__(self, logger: Any, method_name: str, event_dict: Any) -> str:
        priority = PRIORITIES.get(str(event_dict.get("level", method_name)), PRIORITIES["info"])
        return prefix_lines(str(self.renderer(logger, method_name, event_dict)), priority)


def remember_reports(logger: Any, method_name: str, event_dict: Any) -> Any:
    """Keep the text fields of a warning or error event, for :func:`already_logged`."""
    if event_dict.get("level", method_name) in REPORT_LEVELS:
        _logged_errors.extend(v for k, v in event_dict.items() if isinstance(v, str) and k != "level")
    return event_dict


def already_logged(message: str) -> bool:
    """Whether a warning or error log line of this process carried exactly ``message`` (e.g. as its reason)."""
    return message in _logged_errors


def print_error(line: str, stream: TextIO | None = None) -> None:
    """One error line for a person (the CLI's), at error priority when ``stream`` is the journal."""
    stream = stream or sys.stderr
    print(prefix_lines(line, ERR) if is_journal(stream) else line, file=stream, flush=True)
