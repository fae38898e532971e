"""The one inference path every front end shares: REST (JSON and binary tensors) and gRPC.

A front end decodes its request into NumPy arrays, checks them with
``LoadedModel.prepare`` and hands them to :meth:`InferenceCore.infer`, which
picks where the call runs and returns the outputs — at once (a plain list)
when the call ran on the event loop, or as an awaitable when it left it.

Inference of a model whose measured compute time is under
``inline_threshold_us`` runs on the event loop when an instance is idle — a
thread hop costs more than such a model — and everything else runs on the
worker pool so the loop keeps serving.

What a model measured as fast does with other inputs is unknown (a loop bound
may come from an input), so an inline call runs under ``inline_budget_ms``,
not the model's timeout. A call that overruns it is cut off, the version is
served by workers from then on, and the request is re-run there with the full
timeout: a model is a pure function of its inputs (docs/MODEL_ABI.md), so the
client gets the answer it would have got. Nothing a request sends can hold
the loop — liveness, other models, the systemd watchdog — for longer than
the budget plus one epoch tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Mapping
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from agent.errors import ModelError, Unavailable
from agent.server.batching import Batcher, BatchingOverride, resolve_batching

if TYPE_CHECKING:
    from agent.metrics import Metrics
    from agent.models import ModelManager
    from agent.runtime import LoadedModel

log = structlog.get_logger("edge_agent.api")
# How long one inline call may hold the event loop (rounded up to the epoch tick, 1 ms).
INLINE_BUDGET_MS = 2.0

Outputs = list[np.ndarray]


class InferenceCore:
    def __init__(
        self,
        *,
        models: ModelManager,
        metrics: Metrics,
        executor: Executor,
        inline_threshold_us: float,
        inline_budget_ms: float = INLINE_BUDGET_MS,
        batching: Mapping[str, BatchingOverride] | None = None,
    ):
        self.models = models
        self.metrics = metrics
        self.executor = executor
        self.inline_threshold_us = inline_threshold_us
        self.inline_budget_ms = inline_budget_ms
        # The agent's [batching.<model>] tables (agent/server/batching.py), by model name.
        self.batching: Mapping[str, BatchingOverride] = batching or {}
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def infer(self, loaded: LoadedModel, arrays: Outputs, batch: int) -> Outputs | Awaitable[Outputs]:
        """Run prepared inputs on ``loaded``; raises (or the awaitable raises) ModelError or AgentError.

        A ModelError has been counted in the error metrics already.
        """
        batcher = loaded.batcher
        if batcher is None and not loaded.batching_resolved:
            batcher = self._batcher_for(loaded)
        if batcher is not None:
            return batcher.submit(arrays, batch)  # dynamic batching: queued, merged, run on a worker
        pool = loaded.pool
        if pool.inline_allowed and pool.ewma_us <= self.inline_threshold_us and batch <= loaded.spec.max_batch:
            instance = pool.try_acquire()
            if instance is not None:
                loaded.inflight += 1
                try:
                    outputs = pool.run_inline(instance, arrays, batch, self.inline_budget_ms)
                except ModelError as exc:
                    self._replace_off_loop(loaded, str(exc))
                    self.failed(loaded, exc)
                    raise
                finally:
                    loaded.inflight -= 1
                if outputs is not None:
                    return outputs
                reason = f"a call overran the event loop's {self.inline_budget_ms:g} ms budget"
                log.warning("model moved off the event loop", model=loaded.name, version=loaded.version, reason=reason)
                self._replace_off_loop(loaded, reason)
                loaded.inflight += 1  # counted from here: see _offloop
                return self._offloop(loaded, arrays, batch, rerun=True)
        # In flight from the moment it picked its version, not from when its task
        # first runs: a drain that runs in between must wait for it, not close the
        # version under it. _offloop gives the count back.
        loaded.inflight += 1
        return self._offloop(loaded, arrays, batch)

    def _batcher_for(self, loaded: LoadedModel) -> Batcher | None:
        """Decide once per version whether it batches (model.json, then the agent's table); make its batcher."""
        loaded.batching_resolved = True
        try:
            settings = resolve_batching(loaded.spec, self.batching.get(loaded.name))
        except ValueError as exc:
            log.error("dynamic batching stays off", model=loaded.name, version=loaded.version, reason=str(exc))
            return None
        if settings is None:
            return None
        loaded.batcher = Batcher(core=self, loaded=loaded, settings=settings, loop=asyncio.get_running_loop())
        log.info("dynamic batching on", model=loaded.name, version=loaded.version, **settings.to_json())
        return loaded.batcher

    def _replace_off_loop(self, loaded: LoadedModel, reason: str) -> None:
        """Build the replacement of an instance dropped by an inline call on a worker, not the loop."""
        # RuntimeError: the executor is shut down, the agent is stopping.
        with contextlib.suppress(RuntimeError):
            self.executor.submit(loaded.pool.discard, reason)

    async def _offloop(self, loaded: LoadedModel, arrays: Outputs, batch: int, rerun: bool = False) -> Outputs:
        """``rerun``: the request's inline call overran its budget (see InstancePool.rerun).

        The caller counted the request in ``loaded.inflight``; this gives it back.
        """
        loop = asyncio.get_running_loop()
        try:
            # The wait for a free instance is bounded too: a pool whose every
            # instance is stuck must not hold requests forever.
            wait_s = loaded.pool.timeout_ms / 1000.0 * 4
            slots = loaded.worker_slots
            if slots is None:
                slots = loaded.worker_slots = asyncio.Semaphore(loaded.pool.size)
            # Requests beyond the pool's size wait here, on the loop, not on a worker
            # thread: a flood of slow requests to one model cannot take every worker.
            if slots.locked():
                try:
                    async with asyncio.timeout(wait_s):
                        await slots.acquire()
                except TimeoutError:
                    raise Unavailable(f"{loaded.name}:{loaded.version}: no instance free in time") from None
            else:
                await slots.acquire()
            pool = loaded.pool
            try:
                if rerun:
                    outputs = await loop.run_in_executor(
                        self.executor, pool.rerun, arrays, batch, wait_s, self.inline_budget_ms
                    )
                    if pool.inline_allowed:
                        log.info("model back on the event loop: its overrun was a scheduling delay", model=loaded.name)
                else:
                    outputs = await loop.run_in_executor(self.executor, pool.run, arrays, batch, wait_s)
            finally:
                slots.release()
        except ModelError as exc:
            self.failed(loaded, exc)
            raise
        finally:
            loaded.inflight -= 1
        return outputs

    def succeeded(self, loaded: LoadedModel, start: float) -> None:
        """Count one answered request and its latency from ``start`` (perf_counter)."""
        requests, latency = self._metric_children(loaded)
        requests.inc()
        latency.observe(time.perf_counter() - start)

    def failed(self, loaded: LoadedModel, exc: ModelError) -> None:
        kind = "timeout" if exc.http_status == 504 else "trap"
        self.metrics.errors.labels(loaded.name, loaded.version, kind).inc()
        log.warning("inference failed", model=loaded.name, version=loaded.version, error=str(exc))

    def _metric_children(self, loaded: LoadedModel) -> tuple[Any, Any]:
        key = (loaded.name, loaded.version)
        children = self._children.get(key)
        if children is None:
            children = self.metrics.model_children(loaded.name, loaded.version)
            self._children[key] = children
        return children
