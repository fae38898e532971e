"""The Open Inference Protocol v2 REST API (as KServe and Triton speak it).

Routes are matched on exact path segments. Inference of a model whose
measured compute time is under ``inline_threshold_us`` runs on the event loop
when an instance is idle — a thread hop costs more than such a model — and
everything else runs on the worker pool so the loop keeps serving.

What a model measured as fast does with other inputs is unknown (a loop bound
may come from an input), so an inline call runs under ``INLINE_BUDGET_MS``,
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
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import structlog

from agent import __version__
from agent.errors import AgentError, BadRequest, ModelError
from agent.server.http import Request, Response
from agent.server.tensors import decode_inputs, encode_outputs, requested_outputs

if TYPE_CHECKING:
    from agent.metrics import Metrics
    from agent.models import ModelManager
    from agent.runtime import LoadedModel

log = structlog.get_logger("edge_agent.api")
EXTENSIONS = ["model_repository", "metrics"]
# How long one inline call may hold the event loop (rounded up to the epoch tick, 1 ms).
INLINE_BUDGET_MS = 2.0

Handler = Callable[..., "Response | Awaitable[Response]"]


class InferenceAPI:
    def __init__(
        self,
        models: ModelManager,
        metrics: Metrics,
        executor: Executor,
        inline_threshold_us: float,
        is_ready: Callable[[], bool],
        extra_routes: Callable[[Request, list[str]], Response | Awaitable[Response] | None] | None = None,
        inline_budget_ms: float = INLINE_BUDGET_MS,
    ):
        self.models = models
        self.metrics = metrics
        self.executor = executor
        self.inline_threshold_us = inline_threshold_us
        self.inline_budget_ms = inline_budget_ms
        self.is_ready = is_ready
        self.extra_routes = extra_routes
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def __call__(self, request: Request) -> Response | Awaitable[Response]:
        parts = [p for p in request.path.split("/") if p]
        try:
            result = self._route(request, parts)
        except AgentError as exc:
            return Response.error(exc.http_status, str(exc))
        if result is None:
            return Response.error(404, f"no such endpoint: {request.method} {request.path}")
        return result

    def _route(self, request: Request, parts: list[str]) -> Response | Awaitable[Response] | None:
        method = request.method
        if parts == ["metrics"]:
            return self._only(method, "GET") or Response(
                200, self.metrics.exposition(), content_type="text/plain; version=0.0.4; charset=utf-8"
            )
        if not parts or parts[0] != "v2":
            return None
        rest = parts[1:]
        if not rest:
            return self._only(method, "GET") or Response.json(
                200, {"name": "edge-agent", "version": __version__, "extensions": EXTENSIONS}
            )
        if rest == ["health", "live"]:
            return self._only(method, "GET") or Response.json(200, {"live": True})
        if rest == ["health", "ready"]:
            ready = self.is_ready()
            return self._only(method, "GET") or Response.json(200 if ready else 503, {"ready": ready})
        if rest[0] == "models" and len(rest) >= 2:
            name = rest[1]
            tail = rest[2:]
            version = None
            if len(tail) >= 2 and tail[0] == "versions":
                version = tail[1]
                tail = tail[2:]
            if not tail:
                return self._only(method, "GET") or self._metadata(name, version)
            if tail == ["ready"]:
                return self._only(method, "GET") or self._model_ready(name, version)
            if tail == ["infer"]:
                return self._only(method, "POST") or self._infer(request, name, version)
            return None
        if self.extra_routes is not None:
            return self.extra_routes(request, rest)
        return None

    @staticmethod
    def _only(method: str, allowed: str) -> Response | None:
        if method == allowed:
            return None
        resp = Response.error(405, f"method {method} not allowed here; use {allowed}")
        resp.headers.append(("Allow", allowed))
        return resp

    # -- metadata ------------------------------------------------------------------
    def _metadata(self, name: str, version: str | None) -> Response:
        loaded = self.models.get(name, version)
        doc = loaded.spec.metadata()
        if version is None:
            route = self.models.routes.get(name)
            if route is not None:
                doc["versions"] = sorted({m.version for m in route.versions()})
        return Response.json(200, doc)

    def _model_ready(self, name: str, version: str | None) -> Response:
        loaded = self.models.get(name, version)
        return Response.json(200, {"name": name, "version": loaded.version, "ready": True})

    # -- inference --------------------------------------------------------------------
    def _infer(self, request: Request, name: str, version: str | None) -> Response | Awaitable[Response]:
        start = time.perf_counter()
        loaded = self.models.get(name, version)
        try:
            doc = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from exc
        tensors = decode_inputs(doc, loaded.spec)
        outputs_wanted = requested_outputs(doc, loaded.spec)
        arrays, batch = loaded.prepare(tensors)
        request_id = doc.get("id")
        pool = loaded.pool
        if pool.inline_allowed and pool.ewma_us <= self.inline_threshold_us and batch <= loaded.spec.max_batch:
            instance = pool.try_acquire()
            if instance is not None:
                loaded.inflight += 1
                try:
                    outputs = pool.run_inline(instance, arrays, batch, self.inline_budget_ms)
                except ModelError as exc:
                    self._replace_off_loop(loaded, str(exc))
                    return self._failed(loaded, exc)
                finally:
                    loaded.inflight -= 1
                if outputs is not None:
                    return self._respond(loaded, outputs, outputs_wanted, request_id, start)
                reason = f"a call overran the event loop's {self.inline_budget_ms:g} ms budget"
                log.warning("model moved off the event loop", model=loaded.name, version=loaded.version, reason=reason)
                self._replace_off_loop(loaded, reason)
                loaded.inflight += 1  # counted from here: see _infer_offloop
                return self._infer_offloop(loaded, arrays, batch, outputs_wanted, request_id, start, rerun=True)
        # In flight from the moment it picked its version, not from when its task
        # first runs: a drain that runs in between must wait for it, not close the
        # version under it. _infer_offloop gives the count back.
        loaded.inflight += 1
        return self._infer_offloop(loaded, arrays, batch, outputs_wanted, request_id, start)

    def _replace_off_loop(self, loaded: LoadedModel, reason: str) -> None:
        """Build the replacement of an instance dropped by an inline call on a worker, not the loop."""
        # RuntimeError: the executor is shut down, the agent is stopping.
        with contextlib.suppress(RuntimeError):
            self.executor.submit(loaded.pool.discard, reason)

    async def _infer_offloop(
        self,
        loaded: LoadedModel,
        arrays: list[np.ndarray],
        batch: int,
        outputs_wanted: list[Any],
        request_id: Any,
        start: float,
        rerun: bool = False,
    ) -> Response:
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
                    return Response.error(503, f"{loaded.name}:{loaded.version}: no instance free in time")
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
            return self._failed(loaded, exc)
        except AgentError as exc:
            return Response.error(exc.http_status, str(exc))
        finally:
            loaded.inflight -= 1
        return self._respond(loaded, outputs, outputs_wanted, request_id, start)

    def _respond(
        self,
        loaded: LoadedModel,
        outputs: list[np.ndarray],
        outputs_wanted: list[Any],
        request_id: Any,
        start: float,
    ) -> Response:
        by_name = {t.name: o for t, o in zip(loaded.spec.outputs, outputs, strict=True)}
        body: dict[str, Any] = {"model_name": loaded.name, "model_version": loaded.version}
        if request_id is not None:
            body["id"] = request_id
        body["outputs"] = encode_outputs(outputs_wanted, by_name)
        requests, latency = self._metric_children(loaded)
        requests.inc()
        latency.observe(time.perf_counter() - start)
        return Response.json(200, body)

    def _failed(self, loaded: LoadedModel, exc: ModelError) -> Response:
        kind = "timeout" if exc.http_status == 504 else "trap"
        self.metrics.errors.labels(loaded.name, loaded.version, kind).inc()
        log.warning("inference failed", model=loaded.name, version=loaded.version, error=str(exc))
        return Response.error(exc.http_status, str(exc))

    def _metric_children(self, loaded: LoadedModel) -> tuple[Any, Any]:
        key = (loaded.name, loaded.version)
        children = self._children.get(key)
        if children is None:
            children = self.metrics.model_children(loaded.name, loaded.version)
            self._children[key] = children
        return children
