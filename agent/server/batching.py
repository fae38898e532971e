"""Dynamic batching, Triton-style: concurrent requests to one version merged into one model call.

A version with batching on (model.json ``dynamic_batching``, or the agent's
``[batching.<model>]`` table; docs/MODEL_ABI.md, docs/CONFIG.md) gets one
:class:`Batcher`, made on the event loop at its first request and closed with
the version. :meth:`InferenceCore.infer` hands it every prepared request; the
batcher queues it and answers with a future.

When a batch goes (Triton's rules):

* the rows queued reach a preferred batch size (``preferred_batch_sizes``),
  or ``max_batch`` when none are given;
* the oldest queued request has waited ``max_queue_delay_us`` (``0``: at once,
  so batches form only from what queues while every instance is busy);
* the version no longer takes new traffic (swapped out, unloaded): what is
  queued goes at once, so a hot swap answers every request it had.

A batch then waits for a worker slot (the pool-size bound that
``InferenceCore._offloop`` uses, shared with it), takes the queue's requests
in arrival order up to ``max_batch`` rows — cut at the longest prefix whose
rows are a preferred size, when there is one — concatenates them along the
batch dimension, runs them as one call on the worker pool (the loop keeps
serving) and gives each caller exactly its own rows. A request of more than
``max_batch`` rows runs alone (the pool splits it as it always does).

Bounds and failures:

* at most ``max_queue_size`` requests wait; the next is refused with 503;
* a request that waits longer than the delay plus the bound ``_offloop``
  puts on waiting for an instance (4 times the model's timeout) fails with 503,
  the others stay queued;
* a caller that goes away (its task cancelled) leaves the queue; if its batch
  is already running, its rows are dropped;
* a batch call that traps or times out is not failed as a whole: a model is a
  pure function of its inputs (docs/MODEL_ABI.md), so each member is re-run
  alone, and only the request that fails alone fails. Triton fails the
  whole batch; this costs one extra call per member, only after a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from agent.config import coerce
from agent.errors import AgentError, ConfigError, ModelError, Unavailable
from agent.spec import BATCHING_KEYS, BatchingSpec, ModelSpec

if TYPE_CHECKING:
    from agent.runtime import LoadedModel
    from agent.server.inference import InferenceCore

log = structlog.get_logger("edge_agent.batching")

Outputs = list[np.ndarray]


# -- configuration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchingOverride:
    """The agent's ``[batching.<model>]`` table: on or off, and settings that replace model.json's."""

    enabled: bool
    values: Mapping[str, Any]


def parse_batching_config(table: Mapping[str, Any]) -> dict[str, BatchingOverride]:
    """The ``[batching]`` section: one table per model name, or ``on``/``off`` (the environment's form).

    Raises ConfigError for an unknown key or a value out of range; whether the
    settings suit the model (``max_batch``) is judged when the model serves.
    """
    overrides: dict[str, BatchingOverride] = {}
    for model, value in table.items():
        where = f"batching.{model}"
        if not isinstance(value, dict):
            overrides[model] = BatchingOverride(enabled=coerce(where, value, bool), values={})
            continue
        values = dict(value)
        enabled = coerce(f"{where}.enabled", values.pop("enabled", True), bool)
        if "preferred_batch_sizes" in values and isinstance(values["preferred_batch_sizes"], str):
            text = values["preferred_batch_sizes"]
            try:
                values["preferred_batch_sizes"] = [int(n) for n in text.split(",") if n.strip()]
            except ValueError:
                raise ConfigError(f"{where}.preferred_batch_sizes: cannot use {text!r} as a list of integers") from None
        for key in ("max_queue_delay_us", "max_queue_size"):
            if isinstance(values.get(key), str):
                values[key] = coerce(f"{where}.{key}", values[key], int)
        try:
            BatchingSpec.from_dict(values, where)
        except ValueError as exc:
            raise ConfigError(f"{exc} (known keys: enabled, {', '.join(BATCHING_KEYS)})") from None
        overrides[model] = BatchingOverride(enabled=enabled, values=values)
    return overrides


def resolve_batching(spec: ModelSpec, override: BatchingOverride | None) -> BatchingSpec | None:
    """The batching a version serves with: model.json's, replaced key by key by the agent's table.

    Raises ValueError when the agent's table cannot apply to this model.
    """
    if override is None:
        return spec.dynamic_batching
    if not override.enabled:
        return None
    if spec.max_batch < 2:
        raise ValueError(f"model {spec.name}:{spec.version} has max_batch 1 and cannot batch")
    merged = spec.dynamic_batching.to_json() if spec.dynamic_batching is not None else {}
    merged.update(override.values)
    return BatchingSpec.from_dict(merged, f"batching.{spec.name}", spec.max_batch)


# -- the batcher ----------------------------------------------------------------------------------
class _Pending(asyncio.Future[Outputs]):
    """A queued request's answer. Cancelling it (its caller went away) takes the request out of the
    queue at once, not from a callback one loop turn later, so a dispatcher never counts its rows."""

    _batcher: Batcher | None = None
    _entry: _Entry | None = None

    def cancel(self, msg: Any = None) -> bool:
        cancelled = super().cancel(msg)
        if cancelled and self._batcher is not None and self._entry is not None:
            self._batcher._forget(self._entry)
        return cancelled


class _Entry:
    __slots__ = ("arrays", "deadline", "enqueued", "future", "queued", "rows")

    def __init__(self, arrays: Outputs, rows: int, future: asyncio.Future[Outputs], enqueued: float, deadline: float):
        self.arrays = arrays
        self.rows = rows
        self.future = future
        self.enqueued = enqueued
        self.deadline = deadline
        self.queued = True


class Batcher:
    """The queue and dispatcher of one loaded version; lives on the event loop it was made on."""

    def __init__(
        self,
        *,
        core: InferenceCore,
        loaded: LoadedModel,
        settings: BatchingSpec,
        loop: asyncio.AbstractEventLoop,
    ):
        self.core = core
        self.loaded = loaded
        self.settings = settings
        self.loop = loop
        self.max_batch = loaded.spec.max_batch
        self.delay_s = settings.max_queue_delay_us / 1e6
        # The wait for an instance is bounded as in InferenceCore._offloop.
        self.wait_s = loaded.pool.timeout_ms / 1000.0 * 4
        self.preferred = frozenset(settings.preferred_batch_sizes)
        self.target = max(settings.preferred_batch_sizes) if settings.preferred_batch_sizes else self.max_batch
        self.queue: deque[_Entry] = deque()
        self.rows = 0  # rows queued
        self.draining = False
        self.closed = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        metrics = core.metrics
        self._depth = metrics.batch_queue_depth.labels(loaded.name, loaded.version)
        self._sizes = metrics.batch_size.labels(loaded.name, loaded.version)
        self._calls = metrics.batched_calls.labels(loaded.name, loaded.version)

    @property
    def label(self) -> str:
        return f"{self.loaded.name}:{self.loaded.version}"

    def submit(self, arrays: Outputs, rows: int) -> asyncio.Future[Outputs]:
        """Queue one prepared request; the future gives its outputs or raises an AgentError.

        Cancelling the future (the caller went away) takes the request out of
        the queue, or drops its rows when its batch already runs.
        """
        if self.closed:
            raise Unavailable(f"{self.label} is unloaded")
        if len(self.queue) >= self.settings.max_queue_size:
            waiting = self.settings.max_queue_size
            raise Unavailable(f"{self.label}: the batching queue is full ({waiting} requests waiting); retry later")
        now = self.loop.time()
        future = _Pending(loop=self.loop)
        entry = _Entry(arrays, rows, future, now, now + self.delay_s + self.wait_s)
        future._batcher, future._entry = self, entry
        self.queue.append(entry)
        self.rows += rows
        # In flight until answered: a drain of this version waits for queued requests too.
        self.loaded.inflight += 1
        future.add_done_callback(lambda _f: self._settled(entry))
        self._depth.set(len(self.queue))
        if self._task is None:
            self._task = self.loop.create_task(self._dispatch())
        elif self._ready():
            self._wake.set()
        return future

    def flush(self) -> None:
        """The version takes no new traffic: send what is queued without waiting (any thread)."""
        self._on_loop(self._flush)

    def close(self) -> None:
        """The version is closed: refuse what is still queued (any thread)."""
        self._on_loop(self._close)

    # -- internals, all on the loop --------------------------------------------------------------
    def _on_loop(self, fn: Any) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            fn()
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing is queued on it any more
            self.loop.call_soon_threadsafe(fn)

    def _flush(self) -> None:
        self.draining = True
        self._wake.set()

    def _close(self) -> None:
        self.closed = True
        while self.queue:
            self._fail(self._dequeue(), Unavailable(f"{self.label} is unloaded"))
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(KeyError):
            self.core.metrics.batch_queue_depth.remove(self.loaded.name, self.loaded.version)

    def _dequeue(self) -> _Entry:
        entry = self.queue.popleft()
        entry.queued = False
        self.rows -= entry.rows
        return entry

    def _settled(self, entry: _Entry) -> None:
        self.loaded.inflight -= 1
        self._forget(entry)

    def _forget(self, entry: _Entry) -> None:
        """Out of the queue, if still in it: its caller went away."""
        if entry.queued:
            entry.queued = False
            with contextlib.suppress(ValueError):
                self.queue.remove(entry)
            self.rows -= entry.rows
            if not self.closed:
                self._depth.set(len(self.queue))

    def _fail(self, entry: _Entry, exc: BaseException) -> None:
        if not entry.future.done():
            entry.future.set_exception(exc)

    def _ready(self) -> bool:
        if self.rows >= self.target or self.rows in self.preferred or self.draining or self.delay_s == 0:
            return True
        return self.loop.time() >= self.queue[0].enqueued + self.delay_s

    async def _dispatch(self) -> None:
        """Runs while requests are queued: waits for a trigger and a free slot, then starts a batch."""
        try:
            while self.queue and not self.closed:
                if not self._ready():
                    self._wake.clear()
                    wait = self.queue[0].enqueued + self.delay_s - self.loop.time()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._wake.wait()
                    continue
                slots = self.loaded.worker_slots
                if slots is None:  # made on the loop at first use, as InferenceCore._offloop does
                    slots = self.loaded.worker_slots = asyncio.Semaphore(self.loaded.pool.size)
                if slots.locked():
                    try:
                        async with asyncio.timeout(max(0.0, self.queue[0].deadline - self.loop.time())):
                            await slots.acquire()
                    except TimeoutError:
                        self._expire()
                        continue
                else:
                    await slots.acquire()
                entries = self._take()
                if not entries:
                    slots.release()
                    continue
                task = self.loop.create_task(self._run(entries, slots))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        finally:
            self._task = None

    def _expire(self) -> None:
        now = self.loop.time()
        while self.queue and self.queue[0].deadline <= now:
            self._fail(self._dequeue(), Unavailable(f"{self.label}: no instance free in time"))
        self._depth.set(len(self.queue))

    def _take(self) -> list[_Entry]:
        """The next batch: the queue's head in arrival order, at most max_batch rows (or one big request)."""
        queue = self.queue
        taken: list[_Entry] = []
        rows = 0
        cut = 0  # length of the longest prefix whose rows are a preferred size
        while queue and queue[0].future.done():  # cancelled; its callback has not run yet
            self._dequeue()
        for entry in queue:
            if entry.future.done():
                continue  # left in the queue for its callback to remove; not part of the batch
            if taken and rows + entry.rows > self.max_batch:
                break
            taken.append(entry)
            rows += entry.rows
            if rows in self.preferred:
                cut = len(taken)
            if rows >= self.max_batch:
                break
        if cut:
            taken = taken[:cut]
        for entry in taken:
            if queue[0] is entry:
                queue.popleft()
            else:  # behind a cancelled one
                queue.remove(entry)
            entry.queued = False
            self.rows -= entry.rows
        self._depth.set(len(queue))
        return taken

    async def _run(self, entries: list[_Entry], slots: asyncio.Semaphore) -> None:
        loaded = self.loaded
        loaded.inflight += 1  # the call holds the pool even if every caller has gone
        released = False
        try:
            entries = [e for e in entries if not e.future.done()]
            if not entries:
                return
            rows = sum(e.rows for e in entries)
            if len(entries) == 1:
                arrays = entries[0].arrays
            else:
                arrays = [np.concatenate([e.arrays[i] for e in entries]) for i in range(len(entries[0].arrays))]
            self._sizes.observe(rows)
            self._calls.inc()
            try:
                outputs = await self.loop.run_in_executor(
                    self.core.executor, loaded.pool.run, arrays, rows, self.wait_s
                )
            except ModelError as exc:
                slots.release()
                released = True
                if len(entries) == 1:
                    self.core.failed(loaded, exc)
                    self._fail(entries[0], exc)
                else:
                    log.warning(
                        "batched call failed; re-running its requests one by one",
                        model=loaded.name,
                        version=loaded.version,
                        requests=len(entries),
                        error=str(exc),
                    )
                    await self._isolate(entries)
                return
            except AgentError as exc:
                for entry in entries:
                    self._fail(entry, exc)
                return
            except RuntimeError:  # the executor is shut down: the agent is stopping
                for entry in entries:
                    self._fail(entry, Unavailable(f"{self.label}: the agent is stopping"))
                return
            except Exception as exc:  # a defect here: each caller gets it (500), none waits forever
                log.exception("batched call failed unexpectedly", model=loaded.name, version=loaded.version)
                for entry in entries:
                    self._fail(entry, exc)
                return
            lo = 0
            for entry in entries:
                hi = lo + entry.rows
                if not entry.future.done():
                    entry.future.set_result([out[lo:hi] for out in outputs])
                lo = hi
        finally:
            if not released:
                slots.release()
            loaded.inflight -= 1

    async def _isolate(self, entries: list[_Entry]) -> None:
        """Re-run each member of a failed batch alone; only the ones that fail alone fail."""

        async def alone(entry: _Entry) -> None:
            if entry.future.done():
                return
            self.loaded.inflight += 1  # given back by _offloop
            try:
                outputs = await self.core._offloop(self.loaded, entry.arrays, entry.rows)
            except AgentError as exc:  # a ModelError is counted by _offloop
                self._fail(entry, exc)
                return
            if not entry.future.done():
                entry.future.set_result(outputs)

        await asyncio.gather(*(alone(e) for e in entries))
