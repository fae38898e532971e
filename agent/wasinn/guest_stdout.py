"""Where a backend writes text "to the app's stdout" (the ggml backend's ``stream-stdout``).

WasmEdge's ggml plugin prints each generated piece to the process's stdout, which
is also the app's own stdout. Here an app's stdout may be inherited (``wasi run``)
or captured (an app served per request), so the runner of a command app says where
its stdout goes for the duration of the run, and a backend writing "stdout" writes
there: into the same stream, in order with the guest's own ``fd_write`` calls.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Sink = Callable[[bytes], None] | None


def _discard(data: bytes) -> None:
    return None


# The current run's stdout; None: the process's own (fd 1), as WasmEdge writes it. Outside a
# command run (a reactor app served by the agent) nothing: the agent's stdout is its log stream,
# where a guest's text could pass for the agent's own lines.
_SINK: ContextVar[Sink] = ContextVar("wasinn_guest_stdout", default=_discard)


@contextmanager
def guest_stdout(sink: Sink) -> Iterator[None]:
    """Route :func:`write` to ``sink`` (None: fd 1) within this block (this thread or task only)."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


def write(data: bytes) -> None:
    sink = _SINK.get()
    if sink is not None:
        sink(data)
        return
    # os.write, not sys.stdout: unbuffered, so it interleaves with what the guest
    # writes through its inherited fd 1.
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]
