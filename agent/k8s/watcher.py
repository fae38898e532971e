"""Kubernetes-driven desired state: EdgeModelDeployments in, per-node status and Events out.

Four tasks share one in-memory picture of the cluster:

* ``_run`` lists the resources and the node's labels, then watches from the
  list's resourceVersion (bookmarks keep it fresh), lists again on 410 Gone
  and backs off with jitter on any other failure;
* ``_refresh_node`` re-reads the node's labels now and then;
* ``_sync`` turns the picture into the full set of deployments selecting
  this node, hands it to the reconciler with ``control.set_desired("k8s",
  ...)`` when it changed (or a failed model is due for a retry) — with
  ``spec.pinned`` in each deployment, which the reconciler holds — and
  patches this node's entry into each resource's status. The reconciler
  pulls the images the deployments name (a traffic split's too) and answers
  per model, a failed pull included; the watcher pulls nothing itself;
* ``_report_events`` turns the agent's swap and failure events into
  Kubernetes Events on the resource that governs the model.

Node autonomy: ``set_desired`` is called only with a picture built from a
successful list, never because a call failed. While the API server is away
the reconciler keeps the last desired state it persisted in SQLite, and the
node catches up on the first successful list or watch after it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from typing import Any, TypeGuard

import structlog
from structlog.typing import FilteringBoundLogger

from agent.control import Control, ModelDeployment
from agent.errors import AgentError
from agent.events import Event, EventBus
from agent.k8s import crd, report
from agent.k8s.settings import KubeSettings
from agent.k8s.threads import call

SOURCE = "k8s"


class KubeWatcher:
    """Agent service: started after the reconciler's service, stopped on shutdown.

    Enabled or not, it is always attached (``agent.wiring.attach_k8s``): disabled,
    it still runs once at start-up to drop a desired state an earlier, enabled
    run left in SQLite; otherwise a node taken out of its cluster would keep
    obeying it with nobody able to change it (Kubernetes outranks every other source).
    """

    def __init__(
        self,
        *,
        settings: KubeSettings,
        control: Control,
        events: EventBus,
        log: FilteringBoundLogger | None = None,
        api: Any = None,
    ):
        self.settings = settings
        self.control = control
        self.events = events
        self.node = self.settings.node_name
        self.log = (log or structlog.get_logger("edge_agent")).bind(subsystem="k8s")
        self._api = api  # agent.k8s.api.KubeAPI, made in _run unless a test hands one in
        self._objects: dict[tuple[str, str], dict[str, Any]] = {}
        self._labels: dict[str, str] | None = None
        self._synced = False  # a list has succeeded: the picture may be acted on
        self._selection = crd.Selection()
        self._sent: list[ModelDeployment] | None = None
        self._errors: dict[str, str] = {}  # model -> the error this node reports for it
        self._announced: dict[str, str] = {}  # model -> the failure last told as a Kubernetes Event
        self._dirty = asyncio.Event()
        self._status_failures = 0
        self._retry_due = False  # a failed model's retry is due: send the same set again
        self._retry_failures = 0
        self._retry_handle: asyncio.TimerHandle | None = None
        self._events: deque[tuple[crd.Resource, report.EventSpec, str]] = deque(maxlen=100)
        self._queue: asyncio.Queue[Event] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stream: Any = None
        self.connected = False
        self.last_error: str | None = None
        self.resource_version = ""
        self.lists = 0  # successful lists, for status and tests

    # -- service -------------------------------------------------------------------
    async def start(self) -> None:
        if not self.settings.enabled:
            await self._forget_desired_state()
            return
        self._queue = self.events.subscribe()
        self._tasks = [
            asyncio.create_task(self._run(), name="k8s-watch"),
            asyncio.create_task(self._sync(), name="k8s-sync"),
            asyncio.create_task(self._report_events(), name="k8s-events"),
            asyncio.create_task(self._refresh_node(), name="k8s-node"),
        ]
        self.log.info("kubernetes watcher started", node=self.node, namespace=self.settings.namespace or "(all)")

    async def stop(self) -> None:
        if self._stream is not None:
            self._stream.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        if self._queue is not None:
            self.events.unsubscribe(self._queue)
            self._queue = None
        if self._api is not None:
            with contextlib.suppress(Exception):
                await call(self._api.close)

    def state(self) -> dict[str, Any]:
        """For the agent's status: is the cluster reachable, and what does it ask of this node."""
        return {
            "enabled": self.settings.enabled,
            "node": self.node,
            "connected": self.connected,
            "last_error": self.last_error,
            "resource_version": self.resource_version,
            "models": {m: r.ident for m, r in self._selection.governing.items()},
            "problems": {res.ident: why for res, why in self._selection.problems},
        }

    async def _forget_desired_state(self) -> None:
        """With the integration switched off, Kubernetes must not go on governing models from the grave."""
        control = self.control
        status = await control.status()
        previous = _recorded(status)
        if previous:
            self.log.warning(
                "kubernetes integration disabled: dropping its recorded desired state", models=sorted(previous)
            )
            await control.set_desired(SOURCE, [])

    # -- list and watch ------------------------------------------------------------
    async def _run(self) -> None:
        from agent.k8s.api import KubeAPI, describe, is_gone

        failures = 0
        resource_version = ""
        last_gone = -1e9
        while True:
            try:
                if self._api is None:
                    self._api = await call(KubeAPI.connect, self.settings)
                if not resource_version:
                    resource_version = await self._list()
                    failures = 0
                resource_version, healthy = await self._watch(resource_version)
                if healthy:
                    failures = 0
                    continue
                reason = "watch ended at once without events"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop that must outlive any failure: node autonomy
                if is_gone(exc):
                    # Our resourceVersion fell out of the server's history
                    # (typically after a long disconnection): only a new list
                    # tells us what was deleted meanwhile. At once, unless the
                    # server keeps saying so, which then backs off like an error.
                    self.log.info("watch expired (410 Gone), listing again", resource_version=resource_version)
                    resource_version = ""
                    quick_again = time.monotonic() - last_gone < 5.0
                    last_gone = time.monotonic()
                    if not quick_again:
                        continue
                reason = describe(exc)
            self._offline(reason)
            delay = self._backoff(failures)
            failures += 1
            await asyncio.sleep(delay)

    async def _list(self) -> str:
        labels = await call(self._api.node_labels, self.node)
        items, resource_version = await call(self._api.list_resources)
        self._objects = {_key(obj): obj for obj in items}
        if labels != self._labels:
            self.log.info("node labels read", labels=labels)
        self._labels = labels
        self._synced = True
        self.lists += 1
        self.resource_version = resource_version
        self._online()
        self._mark_dirty()
        return resource_version

    async def _watch(self, resource_version: str) -> tuple[str, bool]:
        """Follow one watch request; returns the resourceVersion to resume from and whether it went well."""
        started = time.monotonic()
        events = 0
        stream = self._api.watch(resource_version, asyncio.get_running_loop())
        self._stream = stream
        try:
            while True:
                event = await stream.next()
                if event is None:
                    # The server closed the watch (its timeoutSeconds): resume. A
                    # watch that ends at once, again and again, is a failure in
                    # disguise and must back off like one.
                    return resource_version, events > 0 or time.monotonic() - started > 1.0
                events += 1
                kind = event.get("type")
                obj = event.get("raw_object") or event.get("object") or {}
                new_version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
                if kind == "BOOKMARK":
                    resource_version = new_version or resource_version
                elif kind in ("ADDED", "MODIFIED"):
                    self._objects[_key(obj)] = obj
                    resource_version = new_version or resource_version
                    self._mark_dirty()
                elif kind == "DELETED":
                    self._objects.pop(_key(obj), None)
                    resource_version = new_version or resource_version
                    self._mark_dirty()
                self.resource_version = resource_version
                self._online()
        finally:
            stream.stop()
            self._stream = None

    async def _refresh_node(self) -> None:
        """Re-read the node's labels now and then: relabelling a node moves it in or out of selectors."""
        while True:
            await asyncio.sleep(self.settings.node_refresh_s)
            if not self._synced or self._api is None:
                continue
            try:
                labels = await call(self._api.node_labels, self.node)
            except self._errors_caught():  # the watch loop reports connectivity; this one tries again later
                continue
            if labels != self._labels:
                self.log.info("node labels changed", labels=labels)
                self._labels = labels
                self._mark_dirty()

    def _online(self) -> None:
        if not self.connected:
            self.connected = True
            if self.last_error is not None:
                self.log.info("kubernetes API reachable again, catching up", node=self.node)
            self.last_error = None
            self._mark_dirty()  # status patches that failed meanwhile

    def _offline(self, reason: str) -> None:
        if self.connected or self.last_error is None:
            self.log.warning("kubernetes API unreachable, serving the last desired state", error=reason)
        self.connected = False
        self.last_error = reason

    def _backoff(self, failures: int) -> float:
        # Exponential with "equal jitter": never zero, and nodes that lost the
        # API server together do not all come back in the same instant.
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_initial_s * 2**failures)
        return random.uniform(ceiling / 2, ceiling)

    # -- desired state and status ----------------------------------------------------
    def _mark_dirty(self) -> None:
        self._dirty.set()

    async def _sync(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if not self._synced or self._labels is None:
                continue
            try:
                await self._apply()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed pass must not end syncing: log, retry later
                self.log.error("applying the cluster's desired state failed", error=repr(exc))
                self._retry_later()

    async def _apply(self) -> None:
        resources = [crd.parse_resource(obj) for obj in self._objects.values()]
        selection, others = crd.select(resources, self._labels or {})
        self._selection = selection
        control = self.control
        deployments = selection.deployments()
        if deployments != self._sent or self._retry_due:
            self._retry_due = False
            self.log.info("desired state from kubernetes", models={d.model: d.ref for d in deployments})
            # spec.pinned travels in the deployments: the reconciler holds the version
            # a pinned deployment reached, and a new spec is a new deployment. It
            # also pulls each image (a split's before routing it), once, and a
            # failed pull is that model's result.
            try:
                outcome = await control.set_desired(SOURCE, deployments)
            except AgentError as exc:
                outcome = {d.model: {"error": str(exc)} for d in deployments}
            self._sent = deployments
            # Let the bus deliver what the reconciler published meanwhile (a
            # swap failure), so the queue holds it before this pass's verdict.
            await asyncio.sleep(0)
            self._note_outcome(deployments, outcome)
            self._schedule_retry(any(_failed(outcome.get(d.model)) for d in deployments))
        await self._report_status(selection, others, await control.status())

    def _schedule_retry(self, failed: bool) -> None:
        """A model the reconciler could not bring to its spec is tried again, less and less often."""
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        if not failed:
            self._retry_failures = 0
            return
        delay = min(self.settings.retry_max_s, self.settings.retry_initial_s * 2**self._retry_failures)
        self._retry_failures += 1
        self._retry_handle = asyncio.get_running_loop().call_later(delay, self._retry)

    def _retry(self) -> None:
        self._retry_handle = None
        self._retry_due = True
        self._mark_dirty()

    def _note_outcome(self, deployments: list[ModelDeployment], outcome: dict[str, Any]) -> None:
        for dep in deployments:
            result = outcome.get(dep.model)
            if _failed(result):
                self._errors[dep.model] = str(result["error"])
                # Not every failure reaches the bus (an unknown version fails
                # before any swap starts); this one goes through the same queue,
                # after what the bus delivered, so a failure already told is not
                # told twice (see _take).
                self._enqueue(
                    Event(kind=report.RECONCILE_FAILED, fields={"model": dep.model, "error": self._errors[dep.model]})
                )
            elif isinstance(result, dict) and result.get("skipped"):
                self._errors[dep.model] = f"not applied: {result['skipped']}"
            else:
                self._errors.pop(dep.model, None)

    async def _report_status(
        self, selection: crd.Selection, others: list[crd.Resource], status: dict[str, Any]
    ) -> None:
        models = {m.get("name"): m for m in status.get("models") or [] if isinstance(m, dict)}
        wanted: list[tuple[crd.Resource, dict[str, Any] | None]] = []
        for model, res in selection.governing.items():
            wanted.append((res, report.node_entry(res, models.get(model), self._errors.get(model))))
        for res, problem in selection.problems:
            reported = models.get(res.deployment.model) if res.deployment else None
            wanted.append((res, report.node_entry(res, reported, problem)))
        # A resource that no longer selects this node loses this node's entry.
        wanted.extend((res, None) for res in others if self.node in res.status_nodes)

        failed = False
        for res, entry in wanted:
            current = res.status_nodes.get(self.node)
            if entry is not None and report.unchanged(current, entry):
                continue
            body = report.stamped(entry) if entry is not None else None
            try:
                updated = await call(self._api.patch_node_status, res.namespace, res.name, self.node, body)
            except self._errors_caught() as exc:
                if getattr(exc, "status", None) == 404:
                    continue  # deleted meanwhile; the watch will say so
                failed = True
                self.log.warning("status update failed", resource=res.ident, error=str(exc))
                continue
            cached = self._objects.get(res.key)
            if isinstance(updated, dict) and cached is not None and _uid(cached) == _uid(updated):
                # The watch brings the same change back; until it does, this
                # keeps the next pass from patching again.
                cached["status"] = updated.get("status")
        if failed:
            self._retry_later()
        else:
            self._status_failures = 0

    def _retry_later(self) -> None:
        delay = self._backoff(self._status_failures)
        self._status_failures += 1
        asyncio.get_running_loop().call_later(delay, self._mark_dirty)

    # -- Kubernetes Events ---------------------------------------------------------------
    async def _report_events(self) -> None:
        assert self._queue is not None
        failures = 0
        while True:
            timeout = self._backoff(failures) if self._events else None
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races it.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    self._take(await self._queue.get())
            if await self._post_events():
                failures = 0
            else:
                failures += 1

    def _enqueue(self, event: Event) -> None:
        if self._queue is None:
            return
        if self._queue.full():
            self._queue.get_nowait()  # as the bus does: the oldest goes
        self._queue.put_nowait(event)

    def _take(self, event: Event) -> None:
        model = event.fields.get("model")
        res = self._governing(event)
        repeated = False
        if isinstance(model, str):
            if event.kind in report.ERROR_KINDS:
                error = report.event_error(event)
                self._errors[model] = error
                # The same failure again (a retry, or the reconciler's verdict on
                # a failure the bus already told) is not a new Event.
                repeated = self._announced.get(model) == error
                self._announced[model] = error
            elif event.kind in report.CLEAR_KINDS:
                self._errors.pop(model, None)
                self._announced.pop(model, None)
        if res is None:
            return
        if event.kind in report.ERROR_KINDS or event.kind in report.CLEAR_KINDS:
            self._mark_dirty()  # the version served or the error changed: re-report status
        spec = report.EVENT_SPECS.get(event.kind)
        if spec is not None and not repeated:
            self._events.append((res, spec, report.event_message(event, self.node)))

    def _governing(self, event: Event) -> crd.Resource | None:
        model = event.fields.get("model")
        if isinstance(model, str) and model in self._selection.governing:
            return self._selection.governing[model]
        ref = report.event_ref(event)
        for res in self._selection.governing.values():
            if ref is not None and res.deployment is not None and res.deployment.ref == ref:
                return res
        return None

    async def _post_events(self) -> bool:
        """Post queued Events, oldest first; False when the API refused or was away (they stay queued)."""
        while self._events:
            if self._api is None:
                return False
            res, spec, message = self._events[0]
            try:
                await call(
                    self._api.create_event, res.object_ref(), spec.reason, message, spec.type, self.node, spec.action
                )
            except self._errors_caught() as exc:
                if getattr(exc, "status", None) in (400, 403, 404, 422):
                    # The API answered and will never take this one: drop it, not the rest.
                    self.log.warning("kubernetes event refused", reason=spec.reason, error=str(exc))
                    self._events.popleft()
                    continue
                return False
            self._events.popleft()
        return True

    @staticmethod
    def _errors_caught() -> tuple[type[Exception], ...]:
        from agent.k8s.api import CALL_ERRORS  # kubernetes is imported only when the integration is on

        return CALL_ERRORS


def _failed(result: object) -> TypeGuard[dict[str, Any]]:
    return isinstance(result, dict) and bool(result.get("error"))


def _recorded(status: dict[str, Any]) -> dict[str, ModelDeployment]:
    """What this source asked for last, as the reconciler persisted it (it survives restarts)."""
    recorded = {}
    for model, doc in (status.get("desired") or {}).items():
        if isinstance(doc, dict) and doc.get("source") == SOURCE:
            recorded[model] = ModelDeployment.from_dict({**doc, "model": model})
    return recorded


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _uid(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")
