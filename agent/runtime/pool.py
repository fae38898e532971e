"""A pool of pre-instantiated, pre-warmed instances of one model version.

Each instance has its own Store, so calls on different instances run in
parallel on worker threads (ctypes releases the GIL for the duration of the
wasm call). An instance that traps, times out or returns an error status is
discarded — its memory may be half-written — and replaced by a fresh one, so
one bad request never poisons the next.

A version measured as fast may run on the caller's thread — the event loop —
through :meth:`InstancePool.run_inline`, under a budget of a few milliseconds
rather than its timeout. A call that overruns the budget takes the version
off the loop (``inline_allowed``); its caller re-runs the request on a worker
(:meth:`InstancePool.rerun`), which is sound because a model is a pure
function of its inputs. When the re-run also takes longer than the budget
the demotion is for good; when it is quick, the overrun was the thread being
descheduled on a busy machine, and the version may run inline again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

import numpy as np
import wasmtime

from agent.errors import DeadlineOverrun, ModelError, Unavailable
from agent.runtime.engine import WasmRuntime
from agent.runtime.instance import KEEP_DEADLINE, ModelInstance, check_exports
from agent.spec import ModelSpec


class InstancePool:
    def __init__(
        self,
        runtime: WasmRuntime,
        module: wasmtime.Module,
        spec: ModelSpec,
        params: Mapping[str, np.ndarray],
        size: int,
        memory_limit_bytes: int,
        timeout_ms: float,
        on_replace: Callable[[str], None] | None = None,
        exports_checked: bool = False,
    ):
        self.spec = spec
        self.size = size
        self.timeout_ms = timeout_ms
        self.runtime = runtime
        self._timeout_ticks = runtime.deadline_ticks(timeout_ms)
        self._budget_ticks: dict[float, int] = {}
        if not exports_checked:
            check_exports(module, spec)
        self._factory = lambda: ModelInstance(
            runtime, module, spec, params, memory_limit_bytes, timeout_ms, exports_checked=True
        )
        self._on_replace = on_replace
        self._cond = threading.Condition()
        self._idle: list[ModelInstance] = [self._factory() for _ in range(size)]
        self._closed = False
        self._waiters = 0
        self.replaced = 0
        # Smoothed compute time of one call, used to decide inline vs worker.
        self.ewma_us = 0.0
        # False once a call overran the inline budget: from then on, workers only.
        self.inline_allowed = True

    @property
    def idle(self) -> int:
        return len(self._idle)

    # The fast paths take and return instances without the condition's lock:
    # list.pop/append are atomic under the GIL, and the lock is only needed to
    # sleep and to wake a sleeper. A waiter counts itself in ``_waiters`` before
    # it looks at ``_idle`` (holding the lock until it sleeps), and a release
    # appends before it reads ``_waiters``, so no wake-up is lost.
    def try_acquire(self) -> ModelInstance | None:
        if self._closed:
            raise Unavailable(f"{self.spec.name}:{self.spec.version} is unloaded")
        try:
            return self._idle.pop()
        except IndexError:
            return None

    def acquire(self, timeout: float | None = None) -> ModelInstance:
        if not self._closed:
            try:
                return self._idle.pop()
            except IndexError:
                pass
        with self._cond:
            self._waiters += 1
            try:
                deadline = None if timeout is None else time.monotonic() + timeout
                while True:
                    if self._closed:
                        raise Unavailable(f"{self.spec.name}:{self.spec.version} is unloaded")
                    try:
                        return self._idle.pop()
                    except IndexError:
                        pass
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise Unavailable(f"{self.spec.name}:{self.spec.version}: no instance free in time")
                    self._cond.wait(remaining)
            finally:
                self._waiters -= 1

    def release(self, instance: ModelInstance) -> None:
        if self._closed:
            return
        self._idle.append(instance)
        if self._waiters:
            with self._cond:
                self._cond.notify()

    def discard(self, reason: str) -> None:
        """An instance failed: build its replacement so the pool keeps its size."""
        self.replaced += 1
        if self._on_replace is not None:
            self._on_replace(reason)
        try:
            fresh = self._factory()
        except Exception:  # noqa: BLE001 - the pool shrinks rather than failing the caller twice
            with self._cond:
                self.size -= 1
            return
        self.release(fresh)

    def run_on(self, instance: ModelInstance, inputs: list[np.ndarray], batch: int) -> list[np.ndarray]:
        """Run on an acquired instance, splitting batches above ``max_batch``; releases it.

        The model's timeout covers the whole request, every chunk of it.
        """
        start = time.perf_counter()
        try:
            if batch <= self.spec.max_batch:
                outputs = instance.run(inputs, batch)
            else:
                outputs = self._run_chunked(instance, inputs, batch)
        except ModelError as exc:
            self.discard(str(exc))
            raise
        except BaseException:
            self.release(instance)
            raise
        self.release(instance)
        self._measured(start)
        return outputs

    def run_inline(
        self, instance: ModelInstance, inputs: list[np.ndarray], batch: int, budget_ms: float
    ) -> list[np.ndarray] | None:
        """Run ``batch <= max_batch`` rows on the caller's thread, cut off after about ``budget_ms``.

        Returns None when the call overran the budget: the version is demoted
        (``inline_allowed`` is False from now on) and the caller must re-run the
        request with :meth:`run`. After None or a ModelError the instance is
        gone — its memory may be half-written — and the caller must call
        :meth:`discard` off this thread to build its replacement (instantiating
        can take longer than the budget).
        """
        ticks = self._budget_ticks.get(budget_ms)
        if ticks is None:
            ticks = self._budget_ticks[budget_ms] = min(self.runtime.deadline_ticks(budget_ms), self._timeout_ticks)
        start = time.perf_counter()
        try:
            outputs = instance.run(inputs, batch, ticks)
        except DeadlineOverrun:
            self.inline_allowed = False
            return None
        except ModelError:
            raise  # the instance is dropped, not released (see above)
        except BaseException:
            self.release(instance)
            raise
        self.release(instance)
        self._measured(start)
        return outputs

    def rerun(self, inputs: list[np.ndarray], batch: int, timeout: float | None, budget_ms: float) -> list[np.ndarray]:
        """Run, on a worker, a request whose inline call overran ``budget_ms``; confirms or lifts the demotion."""
        instance = self.acquire(timeout)
        start = time.perf_counter()
        outputs = self.run_on(instance, inputs, batch)  # a failure or timeout leaves the version demoted
        if (time.perf_counter() - start) * 1000 < budget_ms / 2:
            self.inline_allowed = True
        return outputs

    def _measured(self, start: float) -> None:
        elapsed_us = (time.perf_counter() - start) * 1e6
        self.ewma_us = elapsed_us if self.ewma_us == 0.0 else 0.9 * self.ewma_us + 0.1 * elapsed_us

    def run(self, inputs: list[np.ndarray], batch: int, timeout: float | None = None) -> list[np.ndarray]:
        return self.run_on(self.acquire(timeout), inputs, batch)

    def _run_chunked(self, instance: ModelInstance, inputs: list[np.ndarray], batch: int) -> list[np.ndarray]:
        step = self.spec.max_batch
        parts: list[list[np.ndarray]] = []
        for lo in range(0, batch, step):
            hi = min(batch, lo + step)
            chunk = [np.ascontiguousarray(a[lo:hi]) for a in inputs]
            # One deadline for the request: the first chunk arms it, the others keep it.
            parts.append(instance.run(chunk, hi - lo, None if lo == 0 else KEEP_DEADLINE))
        return [np.concatenate([p[i] for p in parts]) for i in range(len(self.spec.outputs))]

    def warm(self, inputs: list[np.ndarray], batch: int) -> list[list[np.ndarray]]:
        """Run the warm-up input once on every instance (pages in code and memory)."""
        with self._cond:
            instances = list(self._idle)
        results = []
        for instance in instances:
            start = time.perf_counter()
            results.append([o.copy() for o in instance.run(inputs, batch)])
            elapsed = (time.perf_counter() - start) * 1e6
            self.ewma_us = elapsed if self.ewma_us == 0.0 else min(self.ewma_us, elapsed)
        return results

    def close(self) -> None:
        """Drop every instance; their stores and memories go with them."""
        with self._cond:
            self._closed = True
            self._idle.clear()
            self._cond.notify_all()
