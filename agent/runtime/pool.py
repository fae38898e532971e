"""A pool of instances of one model version, made on demand, and the node's budget on instances.

A pool starts with the instance its warm-up ran on (every ``size`` instances when
``eager``) and grows on demand, on a worker thread, up to ``size``: a node with
thousands of models holds one warm instance of each rather than ``size``. Every
live instance, in every pool, takes a slot of the node's :class:`InstanceBudget`
(``max_instances``): a pool that must grow beyond it takes the slot of the least
recently used idle instance of another pool; when none is idle it waits (bounded,
like a wait for a busy instance) and then answers 503. :meth:`InstanceBudget.reap`
(run periodically by :class:`agent.runtime.reaper.InstanceReaper`) drops
instances idle for longer than ``instance_idle_s``, except each pool's last one.

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
from typing import TYPE_CHECKING

import numpy as np
import wasmtime

from agent.errors import DeadlineOverrun, ModelError, Unavailable
from agent.runtime.engine import WasmRuntime
from agent.runtime.instance import KEEP_DEADLINE, ModelInstance, check_exports
from agent.spec import ModelSpec

if TYPE_CHECKING:
    from agent.runtime.nn import NnVersion

# A wait held back by the budget (no slot, nothing idle to evict) looks again this often: a slot
# frees up in another pool, whose release does not wake this one.
BUDGET_POLL_S = 0.005


class InstanceBudget:
    """The node's bound on live instances over every pool (``limit`` <= 0: unbounded).

    Each instance reserves its linear memory's whole address range (4 GiB and guard pages
    for a wasm32 memory) and takes host memory for its Store, so a node serving thousands
    of models bounds their count, not just each one's size. Thread-safe; the lock order is
    budget, then a pool's own lock.
    """

    def __init__(self, *, limit: int):
        self.limit = limit
        self.live = 0
        self.evicted = 0  # instances dropped to make room for another pool's
        self.reaped = 0  # instances dropped for being idle too long
        self._lock = threading.Lock()
        self._pools: dict[int, InstancePool] = {}

    def register(self, pool: InstancePool) -> None:
        with self._lock:
            self._pools[id(pool)] = pool

    def unregister(self, pool: InstancePool, slots: int) -> None:
        with self._lock:
            if self._pools.pop(id(pool), None) is not None:
                self.live -= slots

    def pools(self) -> list[InstancePool]:
        with self._lock:
            return list(self._pools.values())

    def reserve(self, pool: InstancePool) -> bool:
        """A slot for one more instance of ``pool``: a free one, else the least recently used
        idle instance of another pool is dropped for it. False when neither exists."""
        with self._lock:
            if self.limit <= 0 or self.live < self.limit:
                self.live += 1
                return True
            # A pool whose instance cannot be dropped (closing, or it was taken meanwhile) is not
            # picked again by this call: each pass drops one or rules one out, so it ends.
            passed: set[int] = set()
            while True:
                victim: InstancePool | None = None
                oldest = 0.0
                for other in self._pools.values():
                    if other is pool or id(other) in passed:
                        continue
                    idle = other._idle
                    if idle:
                        try:
                            used = idle[0].last_used
                        except IndexError:  # taken meanwhile (the serving path takes without this lock)
                            continue
                        if victim is None or used < oldest:
                            victim, oldest = other, used
                if victim is None:
                    return False
                if victim._drop_idle_lru(time.monotonic() + 1.0, keep=0):
                    # The victim's slot passes to the caller: ``live`` is unchanged.
                    self.evicted += 1
                    return True
                passed.add(id(victim))

    def release(self, slots: int = 1) -> None:
        with self._lock:
            self.live -= slots

    def reap(self, idle_s: float) -> int:
        """Drop instances idle for longer than ``idle_s`` in every pool, each pool's last one excepted."""
        cutoff = time.monotonic() - idle_s
        dropped = 0
        for pool in self.pools():
            while pool._drop_idle_lru(cutoff, keep=1):
                dropped += 1
        with self._lock:
            self.live -= dropped
            self.reaped += dropped
        return dropped


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
        *,
        budget: InstanceBudget | None = None,
        eager: bool = True,
        nn: NnVersion | None = None,
        abi: bool = True,
    ):
        """``eager``: build all ``size`` instances now; else one, and the others on demand.
        ``nn``: a WASI-NN version's named model; each instance gets its own host, and the pool
        never runs on the event loop (a backend's compute is a host call, which the loop's epoch
        budget cannot cut short).
        ``abi=False``: the module is not driven through the Model ABI (a WASI-NN command app, run per
        request by its own path): the pool makes no instance and refuses calls."""
        self.spec = spec
        self.size = size
        self.timeout_ms = timeout_ms
        self.runtime = runtime
        self._timeout_ticks = runtime.deadline_ticks(timeout_ms)
        self._budget_ticks: dict[float, int] = {}
        if not exports_checked:
            check_exports(module, spec)
        self.params = params  # kept for the instances made later (mapped from the weights blob by load_version)
        self._factory = lambda: ModelInstance(
            runtime, module, spec, params, memory_limit_bytes, timeout_ms, exports_checked=True, nn=nn
        )
        self._worker_only = nn is not None
        self.abi = abi
        self._on_replace = on_replace
        self._cond = threading.Condition()
        self._budget = budget if budget is not None else InstanceBudget(limit=0)
        # Idle instances, least recently used first: released ones are appended, taken ones popped from the end.
        self._idle: list[ModelInstance] = []
        # Instances that exist (idle or in use) or are being built; each holds a budget slot.
        self.live = 0
        self._closed = False
        self._waiters = 0
        self._budget.register(self)
        try:
            # The first instance (the warm-up runs on it) may wait for a slot, as a request would:
            # versions loading in parallel hold theirs only while they warm up.
            if abi:
                self._idle.append(self._first_instance(wait_s=max(1.0, timeout_ms / 1000.0 * 4)))
            # Eager: the others too, as far as the budget allows (past it, on demand).
            for _ in range(size - 1 if eager and abi else 0):
                instance = self._build()
                if instance is None:
                    break
                self._idle.append(instance)
        except BaseException:
            self.close()
            raise
        self.replaced = 0
        # Smoothed compute time of one call, used to decide inline vs worker.
        self.ewma_us = 0.0
        # False once a call overran the inline budget: from then on, workers only.
        self.inline_allowed = not self._worker_only

    @property
    def idle(self) -> int:
        return len(self._idle)

    def _first_instance(self, wait_s: float) -> ModelInstance:
        deadline = time.monotonic() + wait_s
        while (instance := self._build()) is None:
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"{self.spec.name}:{self.spec.version}: the node's instance budget ({self._budget.limit}) "
                    "is in use and no idle instance can be evicted"
                )
            time.sleep(BUDGET_POLL_S)
        return instance

    def _build(self) -> ModelInstance | None:
        """One more instance, within ``size`` and the node's budget; None when either is full."""
        with self._cond:
            if self.live >= self.size or self._closed:
                return None
            self.live += 1
        if not self._budget.reserve(self):
            with self._cond:
                self.live -= 1
                closed = self._closed
            if closed:
                self._budget.release(-1)  # close() gave back this slot too, which was never taken
            return None
        try:
            instance = self._factory()
        except BaseException:
            self._forget(1)
            raise
        instance.last_used = time.monotonic()
        if self._closed:
            instance.close()
            self._forget(1)
            raise Unavailable(f"{self.spec.name}:{self.spec.version} is unloaded")
        return instance

    def _forget(self, count: int) -> None:
        """``count`` instances are gone: give back their slots."""
        with self._cond:
            self.live -= count
            if self._closed:
                return  # close() gave back every slot the pool held then
        self._budget.release(count)

    def _drop_idle_lru(self, cutoff: float, keep: int) -> bool:
        """Drop the least recently used idle instance if it was last used before ``cutoff`` and more
        than ``keep`` instances live. The caller accounts for its budget slot."""
        with self._cond:
            if self._closed or self.live <= keep:
                return False
            try:
                instance = self._idle[0]
            except IndexError:
                return False
            if instance.last_used >= cutoff:
                return False
            try:
                self._idle.remove(instance)
            except ValueError:  # taken by the serving path meanwhile
                return False
            self.live -= 1
        instance.close()
        return True

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
        """An idle instance, else a new one (blocking: builds it), else waits up to ``timeout``."""
        if not self._closed:
            try:
                return self._idle.pop()
            except IndexError:
                pass
        if not self.abi:
            raise ModelError(f"{self.spec.name}:{self.spec.version} is a WASI-NN command app: no Model ABI instance")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed:
                raise Unavailable(f"{self.spec.name}:{self.spec.version} is unloaded")
            built = self._build()
            if built is not None:
                return built
            # At its size: a release wakes this wait. Held back by the node's budget: look again soon.
            by_budget = self.live < self.size
            with self._cond:
                self._waiters += 1
                try:
                    if self._closed:
                        raise Unavailable(f"{self.spec.name}:{self.spec.version} is unloaded")
                    try:
                        return self._idle.pop()
                    except IndexError:
                        pass
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        if by_budget:
                            raise Unavailable(
                                f"{self.spec.name}:{self.spec.version}: the node's instance budget "
                                f"({self._budget.limit}) is in use and no instance came free in time"
                            )
                        raise Unavailable(f"{self.spec.name}:{self.spec.version}: no instance free in time")
                    if by_budget:
                        remaining = BUDGET_POLL_S if remaining is None else min(remaining, BUDGET_POLL_S)
                    self._cond.wait(remaining)
                finally:
                    self._waiters -= 1

    def release(self, instance: ModelInstance) -> None:
        if self._closed:
            instance.close()
            return
        instance.last_used = time.monotonic()
        self._idle.append(instance)
        if self._closed:  # close() ran since the check above: the instance is not kept
            with self._cond:
                try:
                    self._idle.remove(instance)
                except ValueError:
                    return  # taken meanwhile: by close(), which closes it, or by a caller
            instance.close()
            return
        if self._waiters:
            with self._cond:
                self._cond.notify()

    def discard(self, reason: str, instance: ModelInstance | None = None) -> None:
        """An instance failed and was dropped: build its replacement so the pool keeps its instances.

        ``instance``: the failed one, closed here (else when it is collected)."""
        if instance is not None:
            instance.close()
        self.replaced += 1
        if self._on_replace is not None:
            self._on_replace(reason)
        self._forget(1)
        try:
            fresh = self._build()
        except Exception:  # noqa: BLE001 - one instance fewer (built again on demand) rather than failing twice
            return
        if fresh is not None:
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
            self.discard(str(exc), instance)
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
        if (time.perf_counter() - start) * 1000 < budget_ms / 2 and not self._worker_only:
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
        """Run the warm-up input once on every idle instance, and on at least one (pages in code
        and memory). The instances are held meanwhile, so the budget cannot evict them from
        under the check; one evicted before it started is built again. After a failure they
        are not given back (the caller closes the pool)."""
        instances: list[ModelInstance] = []
        while True:
            try:
                instances.append(self._idle.pop())
            except IndexError:
                break
        if not instances:
            instances.append(self.acquire(max(1.0, self.timeout_ms / 1000.0 * 4)))
        instances.reverse()  # given back in the order they were idle
        results = []
        for instance in instances:
            start = time.perf_counter()
            results.append([o.copy() for o in instance.run(inputs, batch)])
            elapsed = (time.perf_counter() - start) * 1e6
            self.ewma_us = elapsed if self.ewma_us == 0.0 else min(self.ewma_us, elapsed)
        # An instance's first call pays its page faults: the inline-or-worker estimate must come from
        # a warm call, or a version loaded with one instance starts on the workers and stays there
        # until enough requests have averaged that first call away.
        start = time.perf_counter()
        instances[0].run(inputs, batch)
        self.ewma_us = min(self.ewma_us, (time.perf_counter() - start) * 1e6)
        for instance in instances:
            self.release(instance)
        return results

    def close(self) -> None:
        """Drop every instance; their stores and memories go with them."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            slots = self.live
            self._cond.notify_all()
        # One pop at a time (atomic): an instance a racing caller took is never closed under it.
        while True:
            try:
                instance = self._idle.pop()
            except IndexError:
                break
            instance.close()
        # Instances still in use die with their callers (release after close drops them).
        self._budget.unregister(self, slots)
