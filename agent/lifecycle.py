"""Model lifecycle: load -> warm -> atomic switch -> drain -> release, rollback, pin, unload.

This is the agent's :class:`agent.control.Control`. A swap never lets a
version that failed any step take traffic: the new version is loaded,
instantiated and warmed (golden output checked) *beside* the serving one,
and only then does the route flip in one assignment. The replaced version
finishes its in-flight requests and stays warm for ``rollback_grace_s`` so a
rollback is a route flip too; after that its instances and memory go.

Every swap is journalled in the ``swaps`` table before it starts and when it
ends, and ``models.active_version`` changes in the same transaction as the
switch, so after a ``kill -9`` the node restarts on one whole version and the
reconciler sees what was in flight.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from agent.control import ModelDeployment
from agent.desired import DesiredState
from agent.errors import AgentError, BadRequest, NotFound
from agent.models import Route
from agent.runtime import LoadedModel
from agent.server.http import Request, Response
from agent.state import VersionRecord

if TYPE_CHECKING:
    from agent.daemon import Agent

log = structlog.get_logger("edge_agent.lifecycle")


class Unauthorized(AgentError):
    http_status = 401


class Lifecycle:
    def __init__(self, agent: Agent, rollback_grace_s: float = 300.0, drain_timeout_s: float = 30.0):
        self.agent = agent
        self.models = agent.models
        self.db = agent.db
        self.repository = agent.repository
        self.events = agent.events
        self.rollback_grace_s = rollback_grace_s
        self.drain_timeout_s = drain_timeout_s
        self.desired = DesiredState(agent.db)
        self._locks: dict[str, asyncio.Lock] = {}
        # Replaced versions kept warm for instant rollback: model -> (version, expiry task).
        self._retained: dict[str, tuple[LoadedModel, asyncio.Task[None]]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._init_journal()

    # -- journal -------------------------------------------------------------------
    def _init_journal(self) -> None:
        with self.db.lock:
            if "swaps" not in self.db.db.table_names():
                self.db.db["swaps"].create(
                    {
                        "id": int,
                        "model": str,
                        "from_version": str,
                        "to_version": str,
                        "source": str,
                        "state": str,  # started | switched | failed | abandoned
                        "error": str,
                        "started_at": float,
                        "ended_at": float,
                    },
                    pk="id",
                )

    def _journal_start(self, model: str, from_version: str | None, to_version: str, source: str) -> int:
        with self.db.lock:
            cursor = self.db.db.conn.execute(
                "INSERT INTO swaps (model, from_version, to_version, source, state, started_at) "
                "VALUES (?, ?, ?, ?, 'started', ?)",
                (model, from_version, to_version, source, time.time()),
            )
            self.db.db.conn.commit()
            return int(cursor.lastrowid or 0)

    def _journal_end(self, swap_id: int, state: str, error: str | None = None) -> None:
        with self.db.lock:
            self.db.db.conn.execute(
                "UPDATE swaps SET state = ?, error = ?, ended_at = ? WHERE id = ?", (state, error, time.time(), swap_id)
            )
            self.db.db.conn.commit()

    def unfinished_swaps(self) -> list[dict[str, Any]]:
        with self.db.lock:
            return list(self.db.db["swaps"].rows_where("state = 'started'", order_by="id"))

    async def recover(self) -> None:
        """After a crash: close the journal entries a kill interrupted, then reconcile."""
        for row in self.unfinished_swaps():
            mrec = self.db.get_model(row["model"])
            switched = mrec is not None and mrec.active_version == row["to_version"]
            self._journal_end(row["id"], "switched" if switched else "abandoned", "interrupted by a restart")
            log.warning(
                "swap interrupted by a restart",
                model=row["model"],
                to_version=row["to_version"],
                outcome="finished" if switched else "abandoned, old version kept",
            )
        await self.reconcile()

    # -- the swap ------------------------------------------------------------------
    def _lock(self, model: str) -> asyncio.Lock:
        return self._locks.setdefault(model, asyncio.Lock())

    async def swap(self, record: VersionRecord, source: str) -> dict[str, Any]:
        """Make ``record`` the one version serving its model."""
        return await self.route_versions(record.model, [(record, 100)], source)

    async def route_versions(self, model: str, targets: list[tuple[VersionRecord, int]], source: str) -> dict[str, Any]:
        """Load every target version, then switch the model's route to the weighted split."""
        async with self._lock(model):
            loop = asyncio.get_running_loop()
            current = self.models.routes.get(model)
            current_versions = {m.version: m for m in current.versions()} if current else {}
            primary = max(targets, key=lambda t: t[1])[0]
            from_version = current.primary.version if current else None
            # Bookkeeping writes run on a worker thread: a few SQLite statements cost a
            # millisecond or two, and on the event loop that would show in the serving p99.
            swap_id = await asyncio.to_thread(self._journal_start, model, from_version, primary.version, source)
            loaded: list[tuple[LoadedModel, int]] = []
            newly_loaded: list[LoadedModel] = []
            try:
                for record, weight in targets:
                    existing = current_versions.get(record.version)
                    if existing is not None and existing.record.digests == record.digests:
                        loaded.append((existing, weight))
                        continue
                    retained = self._retained.get(model)
                    if retained is not None and retained[0].version == record.version:
                        loaded.append((retained[0], weight))
                        continue
                    self.events.publish("model.loading", model=model, version=record.version, source=source)
                    fresh = await loop.run_in_executor(self.agent.executor, self.models.load, record)
                    newly_loaded.append(fresh)
                    loaded.append((fresh, weight))
            except AgentError as exc:
                await asyncio.to_thread(self._record_failure, swap_id, model, primary.version, str(exc))
                self.events.publish(
                    "model.swap_failed", model=model, version=primary.version, source=source, error=str(exc)
                )
                log.error(
                    "swap refused, old version keeps serving", model=model, version=primary.version, error=str(exc)
                )
                for lm, _ in loaded:
                    if lm not in current_versions.values():
                        self.models.release(lm)
                raise

            # The switch itself: one assignment on the event loop, so every request is
            # routed wholly before or wholly after it.
            # Versions already warm (serving, or retained for rollback) are ready from here.
            warm_at = max((lm.warm_at for lm in newly_loaded), default=time.perf_counter())
            self.models.route(model, Route.weighted(loaded))
            # Warm to routed: from the moment the last new pool finished warming.
            switch_ms = (time.perf_counter() - warm_at) * 1000
            # Persisted after the switch: a kill -9 in between leaves the journal entry open
            # and the old version recorded as active, which recover() resolves by
            # abandoning the swap (the restarted node serves the old, whole version).
            await asyncio.to_thread(self._record_switch, swap_id, model, primary.version)
            self.agent.metrics.swaps.labels(model).inc()
            self.events.publish(
                "model.swapped",
                model=model,
                version=primary.version,
                previous=from_version,
                source=source,
                switch_ms=round(switch_ms, 3),
                split={lm.version: w for lm, w in loaded} if len(loaded) > 1 else None,
            )
            log.info(
                "model switched",
                model=model,
                version=primary.version,
                previous=from_version,
                switch_ms=round(switch_ms, 3),
            )
            new_versions = {id(lm) for lm, _ in loaded}
            for old in current_versions.values():
                if id(old) not in new_versions:
                    self._retire(model, old)
            return {
                "model": model,
                "version": primary.version,
                "previous": from_version,
                "switch_ms": round(switch_ms, 3),
            }

    def _record_failure(self, swap_id: int, model: str, version: str, error: str) -> None:
        self._journal_end(swap_id, "failed", error)
        self.db.set_version_status(model, version, "failed", error)

    def _record_switch(self, swap_id: int, model: str, version: str) -> None:
        self.db.set_active(model, version)
        self._journal_end(swap_id, "switched")
        self.db.set_version_status(model, version, "ready", None)

    def _retire(self, model: str, old: LoadedModel) -> None:
        """Drain ``old`` and keep it warm for the rollback grace period, then release it."""
        previous = self._retained.pop(model, None)
        if previous is not None:
            previous[1].cancel()
            self._spawn(self._drain_and_release(previous[0], 0.0))
        task = asyncio.ensure_future(self._drain_and_release(old, self.rollback_grace_s))
        self._retained[model] = (old, task)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drain_and_release(self, old: LoadedModel, keep_s: float) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while old.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        if keep_s > 0:
            await asyncio.sleep(keep_s)
        retained = self._retained.get(old.name)
        if retained is not None and retained[0] is old:
            del self._retained[old.name]
        self.models.release(old)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- Control -------------------------------------------------------------------
    def resolve_ref(self, ref: str, model: str | None = None) -> VersionRecord:
        """``store:MODEL[:VERSION]`` names a stored version; anything else is an image reference."""
        if ref.startswith("store:"):
            name, _, version = ref[len("store:") :].partition(":")
            if model is not None and name != model:
                raise BadRequest(f"reference {ref} names model {name}, not {model}")
            return self.repository.resolve(name, version or None)
        puller = getattr(self.agent, "puller", None)
        if puller is None:
            raise BadRequest(f"cannot resolve {ref!r}: image pulls are not configured on this agent")
        raise BadRequest("remote references are resolved by deploy(), not resolve_ref()")

    async def _record_for(self, ref: str, model: str | None) -> VersionRecord:
        if ref.startswith("store:"):
            return self.resolve_ref(ref, model)
        puller = getattr(self.agent, "puller", None)
        if puller is None:
            raise BadRequest(f"cannot pull {ref!r}: image pulls are not configured on this agent")
        record: VersionRecord = await puller.pull(ref)
        if model is not None and record.model != model:
            raise BadRequest(f"image {ref} holds model {record.model}, not {model}")
        return record

    async def deploy(self, ref: str, *, source: str = "local", model: str | None = None) -> dict[str, Any]:
        record = await self._record_for(ref, model)
        self._check_precedence(record.model, source)
        self._check_pin(record.model, source, record.version)
        await asyncio.to_thread(self.desired.put, source, ModelDeployment(model=record.model, ref=ref))
        return await self.swap(record, source)

    async def rollback(self, model: str, *, source: str = "local") -> dict[str, Any]:
        self._check_precedence(model, source)
        mrec = self.db.get_model(model)
        if mrec is None:
            raise NotFound(f"unknown model {model!r}")
        if not mrec.previous_version:
            raise BadRequest(f"model {model} has no previous version to roll back to")
        record = self.repository.resolve(model, mrec.previous_version)
        result = await self.swap(record, source)
        self.desired.put(source, ModelDeployment(model=model, ref=f"store:{model}:{record.version}"))
        self.agent.metrics.rollbacks.labels(model).inc()
        self.events.publish("model.rollback", model=model, version=record.version, source=source)
        return result

    async def pin(self, model: str, pinned: bool = True, *, source: str = "local") -> dict[str, Any]:
        mrec = self.db.get_model(model)
        if mrec is None:
            raise NotFound(f"unknown model {model!r}")
        self.db.set_pinned(model, pinned)
        self.events.publish(
            "model.pinned" if pinned else "model.unpinned", model=model, version=mrec.active_version, source=source
        )
        return {"model": model, "version": mrec.active_version, "pinned": pinned}

    async def unload(self, model: str, *, source: str = "local") -> dict[str, Any]:
        self._check_precedence(model, source)
        async with self._lock(model):
            route = self.models.unroute(model)
            if route is None and self.db.get_model(model) is None:
                raise NotFound(f"unknown model {model!r}")
            self.db.set_active(model, None)
            self.desired.delete(source, model)
            retained = self._retained.pop(model, None)
            if retained is not None:
                retained[1].cancel()
                self._spawn(self._drain_and_release(retained[0], 0.0))
            for lm in route.versions() if route else []:
                self._spawn(self._drain_and_release(lm, 0.0))
        self.events.publish("model.unloaded", model=model, source=source)
        return {"model": model, "unloaded": True}

    async def set_desired(self, source: str, deployments: list[ModelDeployment]) -> dict[str, Any]:
        self.desired.replace(source, deployments)
        return await self.reconcile()

    async def reconcile(self) -> dict[str, Any]:
        """Bring each model to what its governing source wants; failures leave the old serving."""
        results: dict[str, Any] = {}
        for model, (source, want) in self.desired.effective().items():
            mrec = self.db.get_model(model)
            try:
                if want.traffic:
                    if mrec is not None and mrec.pinned and mrec.active_version:
                        results[model] = {"skipped": f"pinned at {mrec.active_version}"}
                        continue
                    if not want.ref.startswith("store:"):
                        # The split may name the version this image holds: it must be in the store first.
                        await self._record_for(want.ref, model)
                    targets = [(self.repository.resolve(model, v), w) for v, w in want.traffic.items()]
                    route = self.models.routes.get(model)
                    have = {m.version for m in route.versions()} if route else set()
                    if have != {v for v, w in want.traffic.items() if w > 0} or len(have) < 2:
                        results[model] = await self.route_versions(model, targets, source)
                    continue
                record = await self._record_for(want.ref, model)
                if mrec is not None and mrec.pinned and mrec.active_version and mrec.active_version != record.version:
                    results[model] = {"skipped": f"pinned at {mrec.active_version}"}
                    continue
                route = self.models.routes.get(model)
                if route is None or route.split or route.primary.version != record.version:
                    results[model] = await self.swap(record, source)
            except AgentError as exc:
                results[model] = {"error": str(exc)}
        return results

    def _check_precedence(self, model: str, source: str) -> None:
        governing = self.desired.governing_source(model)
        if governing is not None and DesiredState.rank(governing) < DesiredState.rank(source):
            raise BadRequest(
                f"model {model} is governed by {governing}, which takes precedence over {source}; change it there"
            )

    def _check_pin(self, model: str, source: str, version: str) -> None:
        mrec = self.db.get_model(model)
        if mrec is not None and mrec.pinned and mrec.active_version not in (None, version):
            raise BadRequest(f"model {model} is pinned at version {mrec.active_version}; unpin it first")

    async def status(self) -> dict[str, Any]:
        status = self.agent.status()
        status["desired"] = {m: {"source": s, **d.to_dict()} for m, (s, d) in self.desired.effective().items()}
        return status

    async def cache_gc(self) -> dict[str, Any]:
        cache = getattr(self.agent, "cache", None)
        if cache is None:
            raise BadRequest("cache management is not available on this agent")
        return await asyncio.to_thread(cache.gc)

    async def cache_verify(self) -> dict[str, Any]:
        cache = getattr(self.agent, "cache", None)
        if cache is None:
            raise BadRequest("cache management is not available on this agent")
        return await asyncio.to_thread(cache.verify)

    async def set_config(self, changes: dict[str, Any]) -> dict[str, Any]:
        allowed = {"rollback_grace_s": float, "drain_timeout_s": float}
        applied = {}
        for key, value in changes.items():
            if key not in allowed:
                raise BadRequest(f"setting {key!r} cannot change at run time (allowed: {', '.join(allowed)})")
            try:
                applied[key] = allowed[key](value)
            except (TypeError, ValueError) as exc:
                raise BadRequest(f"setting {key}: {value!r} is not a number") from exc
        for key, value in applied.items():
            setattr(self, key, value)
        return {"applied": applied}

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        self._retained.clear()

    # -- local repository API (Triton's model repository extension) ---------------
    def http_route(self, request: Request, parts: list[str]) -> Any:
        if not parts or parts[0] != "repository":
            return None
        if request.method != "POST":
            return Response.error(405, "repository endpoints take POST")
        token = self.agent.config.api_token
        if token and request.header("authorization") != f"Bearer {token}":
            return Response.error(401, "this endpoint needs the agent's API token (Authorization: Bearer ...)")
        if parts == ["repository", "index"]:
            return Response.json(200, self.index())
        if parts == ["repository", "deploy"]:
            return self._repository_action(request, None, "deploy")
        if len(parts) == 4 and parts[1] == "models" and parts[3] in ACTIONS:
            return self._repository_action(request, parts[2], parts[3])
        return None

    def index(self) -> list[dict[str, Any]]:
        rows = []
        for mrec in self.db.models():
            route = self.models.routes.get(mrec.name)
            serving = {m.version for m in route.versions()} if route else set()
            for rec in self.db.versions(mrec.name):
                if rec.version in serving:
                    state, reason = "READY", ""
                elif rec.status in ("broken", "failed"):
                    state, reason = "UNAVAILABLE", rec.error or rec.status
                else:
                    state, reason = "UNAVAILABLE", "not loaded"
                rows.append({"name": mrec.name, "version": rec.version, "state": state, "reason": reason})
            if mrec.name in self.models.broken and not serving:
                for row in rows:
                    if row["name"] == mrec.name and row["version"] == mrec.active_version:
                        row["reason"] = self.models.broken[mrec.name]
        return rows

    async def _repository_action(self, request: Request, model: str | None, action: str) -> Response:
        try:
            body = orjson.loads(request.body) if request.body else {}
        except orjson.JSONDecodeError:
            return Response.error(400, "request body is not valid JSON")
        params = body.get("parameters", {}) if isinstance(body, dict) else None
        if not isinstance(params, dict):
            return Response.error(400, "'parameters' must be an object")
        try:
            if action == "unload":
                result = await self.unload(model, source="local")
            elif action == "rollback":
                result = await self.rollback(model, source="local")
            elif action in ("pin", "unpin"):
                result = await self.pin(model, action == "pin", source="local")
            else:
                ref = params.get("ref")
                if ref is None and model is None:
                    return Response.error(400, "deploy needs parameters.ref")
                if ref is None:
                    ref = f"store:{model}" + (f":{params['version']}" if params.get("version") else "")
                result = await self.deploy(str(ref), source="local", model=model)
        except AgentError as exc:
            return Response.error(exc.http_status, str(exc))
        return Response.json(200, result)


# Triton's repository extension has load and unload; the rest are this agent's own.
ACTIONS = ("load", "unload", "rollback", "pin", "unpin")


class LifecycleService:
    """Runs crash recovery and the first reconcile once the agent is up."""

    def __init__(self, lifecycle: Lifecycle):
        self.lifecycle = lifecycle

    async def start(self) -> None:
        await self.lifecycle.recover()

    async def stop(self) -> None:
        await self.lifecycle.close()


def attach_lifecycle(agent: Agent, rollback_grace_s: float | None = None) -> Lifecycle:
    settings = agent.config.section("lifecycle")
    grace = rollback_grace_s if rollback_grace_s is not None else float(settings.get("rollback_grace_s", 300))
    lifecycle = Lifecycle(agent, rollback_grace_s=grace)
    agent.control = lifecycle
    agent.services.insert(0, LifecycleService(lifecycle))
    return lifecycle
