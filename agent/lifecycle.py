"""Model lifecycle: load -> warm -> atomic switch -> drain -> release, rollback, pin, unload.

This is the agent's :class:`agent.control.Control`. A swap never lets a
version that failed any step take traffic: the new version is loaded,
instantiated and warmed (golden output checked) *beside* the serving one,
and only then does the route flip in one assignment. The replaced version
finishes its in-flight requests and stays warm for ``rollback_grace_s`` so a
rollback is a route flip too; after that its instances and memory go.

Every swap is journalled in the ``swaps`` table before it starts and when it
ends. The route flips in memory first; ``models.active_version`` is written
right after, on a worker thread, with the journal entry's end (not in one
transaction with the flip, which is no database write). A ``kill -9`` in
between leaves the entry open and the old version recorded as active, which
``recover`` resolves by abandoning the swap: the node restarts on one whole
version and the reconciler sees what was in flight.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from agent.control import ModelDeployment
from agent.desired import DesiredState
from agent.errors import AgentError, BadRequest, InvalidValue, NotFound
from agent.lifecycle_settings import LifecycleSettings
from agent.models import Route
from agent.runtime import LoadedModel
from agent.state import VersionRecord

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from agent.events import EventBus
    from agent.images.service import CacheControl, ImageService
    from agent.metrics import Metrics
    from agent.models import ModelManager
    from agent.repository import ModelRepository
    from agent.state import StateDB

log = structlog.get_logger("edge_agent.lifecycle")


class Lifecycle:
    def __init__(
        self,
        *,
        models: ModelManager,
        db: StateDB,
        repository: ModelRepository,
        events: EventBus,
        metrics: Metrics,
        executor: Executor,
        node_status: Callable[[], dict[str, Any]],
        puller: ImageService | None = None,
        cache: CacheControl | None = None,
        # The defaults are the [lifecycle] table's (agent/lifecycle_settings.py), kept in one place.
        rollback_grace_s: float = LifecycleSettings.rollback_grace_s,
        drain_timeout_s: float = LifecycleSettings.drain_timeout_s,
    ):
        self.models = models
        self.db = db
        self.repository = repository
        self.events = events
        self.metrics = metrics
        self.executor = executor  # loads run here: the agent's worker pool
        self.node_status = node_status  # the agent's own status(), which status() extends with desired state
        # None when image pulls are off: only store: references resolve then, and cache commands are refused.
        self.puller = puller
        self.cache = cache
        self.rollback_grace_s = rollback_grace_s
        self.drain_timeout_s = drain_timeout_s
        self.desired = DesiredState(db)
        self._locks: dict[str, asyncio.Lock] = {}
        # Replaced versions kept warm for instant rollback: model -> (version, expiry task).
        self._retained: dict[str, tuple[LoadedModel, asyncio.Task[None]]] = {}
        self._background: set[asyncio.Task[Any]] = set()

    async def recover(self) -> None:
        """After a crash: close the journal entries a kill interrupted, then reconcile.

        The log says what really happened to each interrupted swap, which is only
        known after the reconcile: the restart serves the version recorded as
        active, and the reconciler may then finish the swap its source still wants.
        """
        interrupted = []
        for row in self.db.swaps.unfinished():
            mrec = self.db.get_model(row.model)
            switched = mrec is not None and mrec.active_version == row.to_version
            self.db.swaps.end(row.id, "switched" if switched else "abandoned", "interrupted by a restart")
            interrupted.append((row, switched))
        await self._adopt_legacy_pins()
        await self.reconcile()
        for row, switched in interrupted:
            route = self.models.routes.get(row.model)
            serving = route.primary.version if route is not None else None
            if switched:
                outcome = "it had switched before the restart"
            elif serving == row.to_version:
                outcome = "it had not switched; the restart served the old version and reconciliation finished it"
            else:
                outcome = "it had not switched; the old version is kept"
            log.warning(
                "swap interrupted by a restart",
                model=row.model,
                from_version=row.from_version,
                to_version=row.to_version,
                serving=serving,
                outcome=outcome,
            )

    # -- the swap ------------------------------------------------------------------
    def _lock(self, model: str) -> asyncio.Lock:
        return self._locks.setdefault(model, asyncio.Lock())

    async def swap(
        self, record: VersionRecord, source: str, *, still_wanted: Callable[[], bool] | None = None
    ) -> dict[str, Any]:
        """Make ``record`` the one version serving its model."""
        return await self.route_versions(record.model, [(record, 100)], source, still_wanted=still_wanted)

    async def route_versions(
        self,
        model: str,
        targets: list[tuple[VersionRecord, int]],
        source: str,
        *,
        still_wanted: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """Load every target version, then switch the model's route to the weighted split.

        ``still_wanted`` is asked once the model's lock is held: a reconcile that
        waited behind a newer one must not undo it with what it read before.
        """
        # A zero weight takes no traffic: such a version is neither loaded nor routed.
        targets = [(record, weight) for record, weight in targets if weight > 0]
        if not targets:
            raise BadRequest(f"a traffic split for {model} needs at least one version with a positive weight")
        async with self._lock(model):
            if still_wanted is not None and not still_wanted():
                return {"model": model, "skipped": "superseded by a newer desired state"}
            current = self.models.routes.get(model)
            current_versions = {m.version: m for m in current.versions()} if current else {}
            primary = max(targets, key=lambda t: t[1])[0]
            from_version = current.primary.version if current else None
            # Bookkeeping writes run on a worker thread: a few SQLite statements cost a
            # millisecond or two, and on the event loop that would show in the serving p99.
            swap_id = await asyncio.to_thread(self.db.swaps.start, model, from_version, primary.version, source)
            loaded: list[tuple[LoadedModel, int]] = []
            newly_loaded: list[LoadedModel] = []
            # Every version this swap will route holds one hold for it, taken in the
            # same step as the lookup that found it (no await in between), so no
            # background release can close it before the switch; the new route
            # inherits these holds.
            claims: list[LoadedModel] = []
            try:
                for record, weight in targets:
                    warm = self._warm_version(model, record, current_versions)
                    if warm is not None:
                        self.models.hold(warm)
                        claims.append(warm)
                        loaded.append((warm, weight))
                        continue
                    self.events.publish("model.loading", model=model, version=record.version, source=source)
                    fresh = await self._load(record)
                    claims.append(fresh)
                    newly_loaded.append(fresh)
                    loaded.append((fresh, weight))
            except BaseException as exc:
                for lm in claims:
                    self._let_go(lm)
                if not isinstance(exc, AgentError):
                    raise
                await asyncio.to_thread(self._record_failure, swap_id, model, primary.version, str(exc))
                self.events.publish(
                    "model.swap_failed", model=model, version=primary.version, source=source, error=str(exc)
                )
                log.error(
                    "swap refused, old version keeps serving", model=model, version=primary.version, error=str(exc)
                )
                raise

            # The switch itself: one assignment on the event loop, so every request is
            # routed wholly before or wholly after it.
            # Versions already warm (serving, or retained for rollback) are ready from here.
            warm_at = max((lm.warm_at for lm in newly_loaded), default=time.perf_counter())
            self.models.route(model, Route.weighted(loaded))
            # Warm to routed: from the moment the last new pool finished warming.
            switch_ms = (time.perf_counter() - warm_at) * 1000
            # The old route's holds, handed on in the same step as the switch (a cancel
            # at the next await must not strand them): a version the new route serves
            # too is held by this swap's claim already; the others pass their hold to
            # the rollback retention.
            new_versions = {id(lm) for lm, _ in loaded}
            for old in current_versions.values():
                if id(old) in new_versions:
                    self._let_go(old)
                else:
                    self._retire(model, old)
            # Persisted after the switch: a kill -9 in between leaves the journal entry open
            # and the old version recorded as active, which recover() resolves by
            # abandoning the swap (the restarted node serves the old, whole version).
            await asyncio.to_thread(self._record_switch, swap_id, model, primary.version)
            self.metrics.swaps.labels(model).inc()
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
            return {
                "model": model,
                "version": primary.version,
                "previous": from_version,
                "switch_ms": round(switch_ms, 3),
            }

    async def _load(self, record: VersionRecord) -> LoadedModel:
        """``ModelManager.load`` on a worker; a swap cancelled meanwhile gives the hold back when it lands."""
        job = self.executor.submit(self.models.load, record)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            loop = asyncio.get_running_loop()

            def landed(done: concurrent.futures.Future[LoadedModel]) -> None:
                if not done.cancelled() and done.exception() is None:
                    loop.call_soon_threadsafe(self._let_go, done.result())

            job.add_done_callback(landed)
            raise

    def _record_failure(self, swap_id: int, model: str, version: str, error: str) -> None:
        self.db.swaps.end(swap_id, "failed", error)
        self.db.set_version_status(model, version, "failed", error)

    def _record_switch(self, swap_id: int, model: str, version: str) -> None:
        self.db.set_active(model, version)
        self.db.swaps.end(swap_id, "switched")
        self.db.set_version_status(model, version, "ready", None)

    def _warm_version(self, model: str, record: VersionRecord, current: dict[str, LoadedModel]) -> LoadedModel | None:
        """The open version of ``record`` that a swap can route without loading: serving or retained."""
        serving = current.get(record.version)
        if serving is not None and serving.record.digests == record.digests:
            return serving
        retained = self._retained.get(model)
        if retained is not None and (retained[0].version, retained[0].record.digests) == (
            record.version,
            record.digests,
        ):
            return retained[0]
        return None

    def _retire(self, model: str, old: LoadedModel) -> None:
        """Keep ``old`` warm for the rollback grace period (it brings its hold), then let it go.

        Only one version per model is retained: the one it supersedes gives up
        its retention hold. Serving or claimed elsewhere, that version keeps its
        other holds and stays open.
        """
        previous = self._retained.pop(model, None)
        if previous is not None:
            previous[1].cancel()
            self._let_go(previous[0])
        task = asyncio.ensure_future(self._expire_retention(model, old, self.rollback_grace_s))
        self._retained[model] = (old, task)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _expire_retention(self, model: str, old: LoadedModel, keep_s: float) -> None:
        if keep_s > 0:
            await asyncio.sleep(keep_s)
        retained = self._retained.get(model)
        if retained is not None and retained[0] is old:
            del self._retained[model]
        self._let_go(old)

    def _let_go(self, lm: LoadedModel) -> None:
        """Give back one hold on ``lm``. The last one detaches it, and its pool closes once drained.

        Every hold is given back through here, so whichever holder turns out to
        be the last, the version's in-flight requests finish before its
        instances go.
        """
        if self.models.drop(lm):
            self._spawn(self._drain_and_close(lm))

    async def _drain_and_close(self, lm: LoadedModel) -> None:
        try:
            deadline = time.monotonic() + self.drain_timeout_s
            while lm.inflight > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
        finally:
            # Cancelled (the agent is stopping): close now rather than leak the pool.
            lm.close()

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
        if self.puller is None:
            raise BadRequest(f"cannot resolve {ref!r}: image pulls are not configured on this agent")
        raise BadRequest("remote references are resolved by deploy(), not resolve_ref()")

    async def _record_for(self, ref: str, model: str | None) -> VersionRecord:
        if ref.startswith("store:"):
            return self.resolve_ref(ref, model)
        if self.puller is None:
            raise BadRequest(f"cannot pull {ref!r}: image pulls are not configured on this agent")
        record: VersionRecord = await self.puller.pull(ref)
        if model is not None and record.model != model:
            raise BadRequest(f"image {ref} holds model {record.model}, not {model}")
        return record

    async def deploy(self, ref: str, *, source: str = "local", model: str | None = None) -> dict[str, Any]:
        record = await self._record_for(ref, model)
        self._check_precedence(record.model, source)
        self._check_pin(record.model, source, record.version)
        pin = self._pin_of(record.model)
        if pin is not None and pin[0] == source:
            # Pinned at this very version by this source: the pin, with the deployment
            # it holds, stays as it is; only make sure that version is what serves.
            return await self.swap(record, source)
        await asyncio.to_thread(self.desired.put, source, ModelDeployment(model=record.model, ref=ref))
        self._sync_pin_flag(record.model)
        return await self.swap(record, source)

    async def rollback(self, model: str, *, source: str = "local") -> dict[str, Any]:
        self._check_precedence(model, source)
        mrec = self.db.get_model(model)
        if mrec is None:
            raise NotFound(f"unknown model {model!r}")
        if not mrec.previous_version:
            raise BadRequest(f"model {model} has no previous version to roll back to")
        self._check_pin(model, source, mrec.previous_version)
        record = self.repository.resolve(model, mrec.previous_version)
        result = await self.swap(record, source)
        wish = ModelDeployment(model=model, ref=f"store:{model}:{record.version}")
        await asyncio.to_thread(self.desired.put, source, wish)
        self._sync_pin_flag(model)
        self.metrics.rollbacks.labels(model).inc()
        self.events.publish("model.rollback", model=model, version=record.version, source=source)
        return result

    async def pin(self, model: str, pinned: bool = True, *, source: str = "local") -> dict[str, Any]:
        """Hold the serving version against automatic changes, as a wish of ``source``.

        A pin is part of a source's desired state, so it obeys precedence like
        any change: a source may not pin (or unpin) a model a higher one
        governs, and a higher source's change overrides a lower one's pin. A
        source that had no wish for the model adopts the version it serves now
        (and so governs it from then on, like a deploy of that version).
        """
        self._check_precedence(model, source)
        mrec = self.db.get_model(model)
        if mrec is None:
            raise NotFound(f"unknown model {model!r}")
        async with self._lock(model):  # no swap of this model between reading what serves and holding it
            if pinned:
                route = self.models.routes.get(model)
                if route is None or not mrec.active_version:
                    raise BadRequest(f"model {model} serves no version to pin")
                if route.split:
                    raise BadRequest(
                        f"model {model} serves a traffic split; a split names its versions already "
                        "(set pinned on the deployment that declares it, or pin after the split is resolved)"
                    )
                own = self.desired.by_source(source).get(model)
                wish = own or ModelDeployment(model=model, ref=f"store:{model}:{route.primary.version}")
                wish = dataclasses.replace(wish, pinned=True)
                await asyncio.to_thread(self.desired.put, source, wish)
                await asyncio.to_thread(self.desired.hold, source, wish, route.primary.version)
            else:
                governing = self.desired.effective().get(model)
                if governing is not None and governing[1].pinned:
                    lifted = dataclasses.replace(governing[1], pinned=False)
                    await asyncio.to_thread(self.desired.put, governing[0], lifted)
            self._sync_pin_flag(model)
        self.events.publish(
            "model.pinned" if pinned else "model.unpinned", model=model, version=mrec.active_version, source=source
        )
        return {"model": model, "version": mrec.active_version, "pinned": pinned}

    def _pin_of(self, model: str) -> tuple[str, str] | None:
        """(source, version) when the governing deployment of ``model`` is pinned and holds a version."""
        entry = self.desired.effective().get(model)
        if entry is None or not entry[1].pinned:
            return None
        held = self.desired.held(entry[0], model)
        return (entry[0], held) if held else None

    def _sync_pin_flag(self, model: str) -> None:
        """``models.pinned`` mirrors the governing deployment's pin, for status and the cache's GC."""
        entry = self.desired.effective().get(model)
        pinned = entry is not None and entry[1].pinned
        mrec = self.db.get_model(model)
        if mrec is not None and mrec.pinned != pinned:
            self.db.set_pinned(model, pinned)

    async def _adopt_legacy_pins(self) -> None:
        """Pins set before they were desired state (``models.pinned`` alone) become the governing source's.

        Runs once, when the database is upgraded (``DesiredState.upgraded_from_flag_pins``):
        a pinned model keeps its pin as a pin of the source that governs it, ``local``
        when none does.
        """
        if not self.desired.upgraded_from_flag_pins:
            return
        effective = self.desired.effective()
        for mrec in self.db.models():
            if not mrec.pinned or not mrec.active_version:
                continue
            source, wish = effective.get(mrec.name, ("local", None))
            if wish is not None and wish.pinned:
                continue
            wish = wish or ModelDeployment(model=mrec.name, ref=f"store:{mrec.name}:{mrec.active_version}")
            wish = dataclasses.replace(wish, pinned=True)
            await asyncio.to_thread(self.desired.put, source, wish)
            if not wish.traffic:
                await asyncio.to_thread(self.desired.hold, source, wish, mrec.active_version)
            log.info("pin adopted into desired state", model=mrec.name, source=source, version=mrec.active_version)
        # Cleared only once every pin is adopted: a kill or a locked database half-way means the
        # next start adopts again (an adopted pin is skipped), instead of the rest being lost.
        self.desired.upgraded_from_flag_pins = False

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
                self._let_go(retained[0])
            for lm in route.versions() if route else []:
                self._let_go(lm)  # the route's holds
            self._sync_pin_flag(model)
        self.events.publish("model.unloaded", model=model, source=source)
        return {"model": model, "unloaded": True}

    async def set_desired(self, source: str, deployments: list[ModelDeployment]) -> dict[str, Any]:
        self.desired.replace(source, deployments)
        return await self.reconcile()

    async def reconcile(self) -> dict[str, Any]:
        """Bring each model to what its governing source wants; failures leave the old serving.

        A pinned deployment of one version is brought about once; the version it
        reached is then held (``DesiredState.hold``) until that source changes its
        deployment. A split names its versions exactly, so there is nothing to hold.
        """
        results: dict[str, Any] = {}
        effective = self.desired.effective()
        for mrec in self.db.models():
            if mrec.name not in effective and mrec.pinned:
                self.db.set_pinned(mrec.name, False)  # withdrawn by every source: nothing holds it
        for model, (source, want) in effective.items():
            self._sync_pin_flag(model)

            def still_wanted(model: str = model, source: str = source, want: ModelDeployment = want) -> bool:
                return self.desired.effective().get(model) == (source, want)

            try:
                held = self.desired.held(source, model) if want.pinned and not want.traffic else None
                if held is not None:
                    route = self.models.routes.get(model)
                    if route is None or route.split or route.primary.version != held:
                        record = self.repository.resolve(model, held)
                        results[model] = await self.swap(record, source, still_wanted=still_wanted)
                    else:
                        results[model] = {"skipped": f"pinned at {held}"}
                    continue
                if want.traffic:
                    if not want.ref.startswith("store:"):
                        # The split may name the version this image holds: it must be in the store first.
                        await self._record_for(want.ref, model)
                    targets = [(self.repository.resolve(model, v), w) for v, w in want.traffic.items() if w > 0]
                    route = self.models.routes.get(model)
                    have = {m.version for m in route.versions()} if route else set()
                    if have != {r.version for r, _ in targets} or len(have) < 2:
                        results[model] = await self.route_versions(model, targets, source, still_wanted=still_wanted)
                    continue
                record = await self._record_for(want.ref, model)
                route = self.models.routes.get(model)
                if route is None or route.split or route.primary.version != record.version:
                    results[model] = await self.swap(record, source, still_wanted=still_wanted)
                if want.pinned and still_wanted():
                    # Compare-and-set on the deployment: a newer wish from the source is never held at this one.
                    await asyncio.to_thread(self.desired.hold, source, want, record.version)
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
        """A source's own pin holds against its own changes; a higher source's change overrides it."""
        pin = self._pin_of(model)
        if pin is None:
            return
        pinned_by, held = pin
        if pinned_by == source and held != version:
            raise BadRequest(f"model {model} is pinned at version {held}; unpin it first")

    async def status(self) -> dict[str, Any]:
        status = self.node_status()
        status["desired"] = {m: {"source": s, **d.to_dict()} for m, (s, d) in self.desired.effective().items()}
        return status

    async def cache_gc(self) -> dict[str, Any]:
        if self.cache is None:
            raise BadRequest("cache management is not available on this agent")
        return await asyncio.to_thread(self.cache.gc)

    async def cache_verify(self) -> dict[str, Any]:
        if self.cache is None:
            raise BadRequest("cache management is not available on this agent")
        return await asyncio.to_thread(self.cache.verify)

    async def set_config(self, changes: dict[str, Any]) -> dict[str, Any]:
        allowed = ("rollback_grace_s", "drain_timeout_s")
        applied: dict[str, float] = {}
        # Every key is checked before any is applied; a refusal is InvalidValue (wire code invalid_value).
        for key, value in changes.items():
            if key not in allowed:
                raise InvalidValue(f"setting {key!r} cannot change at run time (allowed: {', '.join(allowed)})")
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise InvalidValue(f"setting {key}: {value!r} is not a number of seconds (finite, at least 0)")
            applied[key] = float(value)
        for key, value in applied.items():
            setattr(self, key, value)
        return {"applied": applied}

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        self._retained.clear()


class LifecycleService:
    """Runs crash recovery and the first reconcile once the agent is up."""

    def __init__(self, *, lifecycle: Lifecycle):
        self.lifecycle = lifecycle

    async def start(self) -> None:
        await self.lifecycle.recover()

    async def stop(self) -> None:
        await self.lifecycle.close()
