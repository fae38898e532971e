"""The idle reaper: drops instances no request has used for ``instance_idle_s``.

A node serving thousands of models keeps one warm instance of each (a pool grows
on demand, :mod:`agent.runtime.pool`); the instances a burst added are let go
once they have sat idle for ``instance_idle_s``, each pool's last one excepted,
so a model that was busy once does not hold ``pool_size`` instances for ever.
One per agent, owned by :class:`agent.daemon.Agent`; the scan runs on the
agent's worker pool (dropping a Store unmaps its memory, which is not for the
event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import Executor

import structlog

from agent.runtime.pool import InstanceBudget


class InstanceReaper:
    # The scan runs this often relative to the idle time, so an instance lives at most 1.25 * idle_s idle.
    SCANS_PER_IDLE = 4
    MAX_INTERVAL_S = 30.0
    # A tiny instance_idle_s must not turn the scan into a busy loop.
    MIN_INTERVAL_S = 0.05

    def __init__(self, *, budget: InstanceBudget, idle_s: float, executor: Executor):
        self.budget = budget
        self.idle_s = idle_s
        self.executor = executor
        self.interval_s = min(self.MAX_INTERVAL_S, max(self.MIN_INTERVAL_S, idle_s / self.SCANS_PER_IDLE))
        self._task: asyncio.Task[None] | None = None
        self.log = structlog.get_logger("edge_agent.reaper")

    async def start(self) -> None:
        if self._task is None and self.idle_s > 0:
            self._task = asyncio.create_task(self._run(), name="instance-reaper")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def reap_now(self) -> int:
        """One scan, now (also what the periodic task runs)."""
        loop = asyncio.get_running_loop()
        dropped = await loop.run_in_executor(self.executor, self.budget.reap, self.idle_s)
        if dropped:
            self.log.debug("idle instances dropped", dropped=dropped, live=self.budget.live)
        return dropped

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.reap_now()
            except RuntimeError:
                return  # the executor is shut down: the agent is stopping
            except Exception as exc:  # noqa: BLE001 - a failed scan is logged; the next one may succeed
                self.log.error("idle instance scan failed", error=repr(exc))
