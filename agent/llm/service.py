"""The language models a node serves: one engine per loaded version, and the one way to generate.

A request names a model (``name``, or ``name:version`` for a version that is loaded); the version
is picked once, as for v2 inference, and counted in flight until its generation has really ended,
so a swap's drain waits for it. The version's engine and admission are made at its first request
and closed with it (``LoadedModel.closers``).

:meth:`LlmService.start` admits a request (a slot, a place in the queue, or :class:`Overloaded`)
and returns its :class:`Generation`; the API then awaits :meth:`Generation.result` or iterates
:meth:`Generation.chunks`, and calls :meth:`Generation.abandon` when its client goes away: a queued
request leaves the queue, a running one stops at its next token, and its slot is given back only
once the worker thread has returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from agent.errors import InvalidModel, ModelError, NotFound, Unavailable
from agent.llm import is_llm
from agent.llm.admission import Admission, Overloaded, Ticket
from agent.llm.channel import ChunkChannel
from agent.llm.engine import Job, LlmEngine
from agent.llm.metrics import LlmMetrics
from agent.llm.options import LlamaOptions
from agent.llm.params import GenerationRequest
from agent.llm.settings import LlmSettings
from agent.wasinn.abi import ExecutionTarget

if TYPE_CHECKING:
    from agent.models import ModelManager
    from agent.runtime import LoadedModel

log = structlog.get_logger("edge_agent.llm")


@dataclass
class _Served:
    """A loaded language model version's serving state, made at its first request."""

    engine: LlmEngine
    admission: Admission
    options: LlamaOptions
    children: dict[str, Any]  # metric children: tokens, running, waiting, and one per outcome

    def sync_gauges(self) -> None:
        self.children["running"].set(self.admission.running)
        self.children["waiting"].set(self.admission.waiting)


class LlmService:
    def __init__(self, *, models: ModelManager, settings: LlmSettings, metrics: LlmMetrics):
        self.models = models
        self.settings = settings
        self.metrics = metrics
        # id(LoadedModel) -> its state; the entry goes when the version closes.
        self._served: dict[int, tuple[LoadedModel, _Served]] = {}
        self._lock = threading.Lock()

    # -- which model -------------------------------------------------------------------------------
    def find(self, model: str) -> LoadedModel:
        """``name`` (its route picks the version) or ``name:version``; NotFound for anything else."""
        name, _, version = model.partition(":")
        loaded = self.models.get(name, version or None)
        if not is_llm(loaded.spec):
            raise NotFound(f"model {name} is not a language model (its wasi_nn.encoding is not ggml)")
        return loaded

    def listed(self) -> list[LoadedModel]:
        """The language models routed now (each model's primary version)."""
        routes = self.models.routes
        return [routes[name].primary for name in sorted(routes) if is_llm(routes[name].primary.spec)]

    def served(self, loaded: LoadedModel) -> _Served:
        """The version's engine and admission, made at its first request (event loop)."""
        key = id(loaded)
        entry = self._served.get(key)
        if entry is not None and entry[0] is loaded:
            return entry[1]
        nn = loaded.spec.wasi_nn
        path = loaded.weights_path
        assert nn is not None
        if path is None:
            raise Unavailable(f"{loaded.name}:{loaded.version} has no model file loaded")
        try:
            options = LlamaOptions.from_spec(nn)
        except InvalidModel as exc:
            raise ModelError(f"{loaded.name}:{loaded.version} cannot generate: {exc}") from None
        labels = (loaded.name, loaded.version)
        children: dict[str, Any] = {
            "tokens": self.metrics.tokens.labels(*labels),
            "running": self.metrics.running.labels(*labels),
            "waiting": self.metrics.waiting.labels(*labels),
        }
        for outcome in ("ok", "cancelled", "rejected", "error"):
            children[outcome] = self.metrics.requests.labels(*labels, outcome)
        tokens = children["tokens"]
        engine = LlmEngine(
            label=f"{loaded.name}:{loaded.version}",
            model_name=loaded.name,
            model_path=path,
            options=options,
            slots=self.settings.max_concurrency,
            on_tokens=tokens.inc,
            # The version's GPU placement from its admission at load (agent/runtime/nn.py): a lease
            # puts the context on that device and each generation in one of its compute slots.
            gpu_lease=loaded.nn_version.gpu_lease if loaded.nn_version is not None else None,
            target=loaded.nn_version.placed_target if loaded.nn_version is not None else ExecutionTarget.AUTO,
        )
        served = _Served(
            engine=engine,
            admission=Admission(limit=self.settings.max_concurrency, queue=self.settings.max_queue),
            options=options,
            children=children,
        )
        with self._lock:
            self._served[key] = (loaded, served)
        loaded.closers.append(lambda: self._forget(key, served))
        return served

    def _forget(self, key: int, served: _Served) -> None:
        """The version closed (any thread): its contexts go."""
        with self._lock:
            entry = self._served.get(key)
            if entry is not None and entry[1] is served:
                del self._served[key]
        served.engine.close()

    # -- generating -------------------------------------------------------------------------------
    def start(self, loaded: LoadedModel, request: GenerationRequest) -> Generation:
        """Admit ``request`` (event loop): :class:`Overloaded` when every slot is busy and the queue full."""
        served = self.served(loaded)
        try:
            ticket = served.admission.reserve(f"model {loaded.name}:{loaded.version}")
        except Overloaded:
            served.children["rejected"].inc()
            raise
        job = Job(request=request, kwargs=request.llama_kwargs(served.options))
        generation = Generation(
            loaded=loaded,
            served=served,
            ticket=ticket,
            job=job,
            loop=asyncio.get_running_loop(),
            stream_buffer=self.settings.stream_buffer,
        )
        served.sync_gauges()
        return generation


class Generation:
    """One admitted request: waiting for its slot, running on a worker thread, or done."""

    def __init__(
        self,
        *,
        loaded: LoadedModel,
        served: _Served,
        ticket: Ticket,
        job: Job,
        loop: asyncio.AbstractEventLoop,
        stream_buffer: int,
    ):
        self.loaded = loaded
        self.job = job
        self._served = served
        self._ticket = ticket
        self._loop = loop
        if job.request.stream:
            job.channel = ChunkChannel(loop=loop, capacity=stream_buffer, cancel=job.cancelled)
        self._state = "waiting"  # -> "running" (on a worker) -> "done"
        self._completed = False  # a stream's consumer read to its end
        # In flight from the moment it picked its version (a drain waits for it), until _end.
        loaded.inflight += 1

    def abandon(self) -> None:
        """The client went away (event loop): leave the queue, or stop at the next token."""
        self.job.cancel()
        if self._state == "waiting":
            self._end("cancelled")

    async def _submit(self) -> Future[dict[str, Any] | None] | None:
        """Wait for the slot, then start on a worker; None when the request was abandoned meanwhile."""
        if not await self._ticket.wait() or self.job.cancelled.is_set():
            self._end("cancelled")
            return None
        try:
            future = self._served.engine.run(self.job)
        except RuntimeError:  # the engine's executor is shut down: the version was unloaded
            self._end("error")
            raise Unavailable(f"{self.loaded.name}:{self.loaded.version} was unloaded; retry") from None
        self._state = "running"
        self._served.sync_gauges()
        future.add_done_callback(self._thread_done)
        return future

    def _thread_done(self, future: Future[dict[str, Any] | None]) -> None:
        """On the worker thread (or at once): the slot is given back on the loop."""
        error = None if future.cancelled() else future.exception()
        if future.cancelled():
            error = Unavailable(f"{self.loaded.name}:{self.loaded.version} was unloaded; retry")
        if self.job.channel is not None:
            self.job.channel.end(error)
        outcome = "error" if error is not None else "cancelled" if self.job.cancelled.is_set() else "ok"
        with contextlib.suppress(RuntimeError):  # the loop is closed: the agent stopped
            self._loop.call_soon_threadsafe(self._end, outcome)

    def _end(self, outcome: str) -> None:
        if self._state == "done":
            return
        self._state = "done"
        self._ticket.release()
        self.loaded.inflight -= 1
        self._served.children[outcome].inc()
        self._served.sync_gauges()

    async def result(self) -> dict[str, Any] | None:
        """The completion (OpenAI's body, from llama-cpp-python); None when the client left first."""
        future = await self._submit()
        if future is None:
            return None
        return await asyncio.wrap_future(future)

    async def chunks(self) -> AsyncGenerator[dict[str, Any], None]:
        """The stream's chunks; leaving the iteration early (the client went away) stops the generation."""
        try:
            future = await self._submit()
            if future is None:
                return
            channel = self.job.channel
            assert channel is not None
            while True:
                try:
                    chunk = await channel.get()
                except StopAsyncIteration:
                    self._completed = True
                    return
                yield chunk
        finally:
            if not self._completed:
                self.abandon()
