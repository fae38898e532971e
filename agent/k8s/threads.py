"""Blocking calls off the event loop, on daemon threads.

Not ``asyncio.to_thread``: the loop's default executor is joined when the
loop shuts down, so a call stuck on an unanswering API server would hold
the agent's exit for a whole read timeout. A daemon thread per call costs
little at the rate the Kubernetes integration makes calls, and an abandoned
one never delays shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def call(fn: Callable[..., T], *args: Any) -> T:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # the caller was cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as exc:  # noqa: BLE001 - not handled here: re-raised in the awaiting task
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for this any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=f"k8s-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return await future
