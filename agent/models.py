"""Which model versions are loaded, and where each model's traffic goes.

The serving path reads ``routes[name]`` — an immutable :class:`Route` — once
per request and sticks with the version it picked, so a request is served
wholly by one version. Switching a model is one dict assignment of a new
Route (atomic under the GIL); the replaced version keeps its pool until its
in-flight requests have drained.

A loaded version is closed only when its last holder lets go. Holders are the
model's route, the lifecycle's rollback retention and a swap that has picked
the version but not yet switched to it; each takes a hold (:meth:`load` or
:meth:`hold`) and gives it back with :meth:`drop`; the last drop detaches the
version and its owner closes it once drained. A background release can
therefore never close a version that a concurrent swap is about to serve.
"""

from __future__ import annotations

import bisect
import itertools
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from agent.cas import BlobStore
from agent.errors import NotFound, Unavailable
from agent.runtime import InstanceBudget, LoadedModel, LoadSettings, WasmRuntime, load_version
from agent.state import VersionRecord
from agent.wasinn.backend import BackendRegistry
from agent.wasinn.gpu import GpuScheduler


@dataclass(frozen=True)
class Route:
    """A model's traffic: one primary version, or a weighted split across versions."""

    primary: LoadedModel
    split: tuple[LoadedModel, ...] = ()
    cumulative: tuple[int, ...] = ()  # running sums of the split's weights

    @classmethod
    def weighted(cls, weights: list[tuple[LoadedModel, int]]) -> Route:
        weights = [(m, w) for m, w in weights if w > 0]
        if not weights:
            raise ValueError("a traffic split needs at least one positive weight")
        primary = max(weights, key=lambda mw: mw[1])[0]
        if len(weights) == 1:
            return cls(primary)
        sums = list(itertools.accumulate(w for _, w in weights))
        return cls(primary, tuple(m for m, _ in weights), tuple(sums))

    def pick(self, rng: random.Random) -> LoadedModel:
        if not self.split:
            return self.primary
        point = rng.randrange(self.cumulative[-1])
        return self.split[bisect.bisect_right(self.cumulative, point)]

    def versions(self) -> list[LoadedModel]:
        return list(self.split) if self.split else [self.primary]


class ModelManager:
    def __init__(
        self,
        runtime: WasmRuntime,
        blobs: BlobStore,
        settings: LoadSettings,
        on_replace: Callable[[str, str, str], None] | None = None,
        budget: InstanceBudget | None = None,
        *,
        nn_registry: BackendRegistry | None = None,
        gpu: GpuScheduler | None = None,
    ):
        self.runtime = runtime
        # The node's WASI-NN backends (agent/wasinn): None serves no WASI-NN version.
        self.nn_registry = nn_registry
        self.gpu = gpu  # the node's GPU scheduler: WASI-NN versions with target gpu/auto are admitted by it
        self.blobs = blobs
        self.settings = settings
        # The node's bound on live instances, shared by every version's pool (unbounded when None).
        self.budget = budget if budget is not None else InstanceBudget(limit=0)
        self.routes: dict[str, Route] = {}
        self.loaded: dict[tuple[str, str], LoadedModel] = {}
        self.broken: dict[str, str] = {}  # model -> why it cannot be served
        # id(LoadedModel) -> holders; an entry lives exactly as long as its version is open.
        self._holds: dict[int, int] = {}
        self._open: dict[int, LoadedModel] = {}  # every open version, the replaced ones too
        self._on_replace = on_replace
        self._rng = random.Random()
        self._lock = threading.Lock()
        self.log = structlog.get_logger("edge_agent.models")

    # -- serving path -------------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> LoadedModel:
        if version is not None:
            loaded = self.loaded.get((name, version))
            if loaded is None:
                if name not in self.routes and name not in self.broken:
                    raise NotFound(f"unknown model {name!r}")
                raise NotFound(f"model {name} has no loaded version {version!r}")
            return loaded
        route = self.routes.get(name)
        if route is None:
            if name in self.broken:
                raise Unavailable(f"model {name} cannot be served: {self.broken[name]}")
            raise NotFound(f"unknown model {name!r}")
        return route.pick(self._rng)

    def loaded_versions(self, name: str) -> list[str]:
        """Versions of ``name`` that are open and answer requests: routed, or kept warm for rollback."""
        return sorted(version for model, version in list(self.loaded) if model == name)

    def names(self) -> list[str]:
        return sorted(set(self.routes) | set(self.broken))

    @property
    def ready(self) -> bool:
        return bool(self.routes)

    # -- lifecycle ---------------------------------------------------------------------
    def load(self, record: VersionRecord) -> LoadedModel:
        """Load (or take the already loaded) version, with one hold for the caller.

        Blocking: run it off the event loop. The caller passes its hold on to a
        route or gives it back with :meth:`drop`.
        """
        key = (record.model, record.version)
        with self._lock:
            existing = self.loaded.get(key)
            if existing is not None and existing.record.digests == record.digests:
                self._holds[id(existing)] += 1
                return existing
        hook = self._on_replace  # set once, in the constructor
        loaded = load_version(
            self.runtime,
            self.blobs,
            record,
            self.settings,
            on_replace=(lambda why: hook(record.model, record.version, why)) if hook else None,
            budget=self.budget,
            nn_registry=self.nn_registry,
            gpu=self.gpu,
        )
        with self._lock:
            # A version replaced here (same name, other content) stays open for its
            # holders and closes when the last one drops it.
            self.loaded[key] = loaded
            self._holds[id(loaded)] = 1
            self._open[id(loaded)] = loaded
        return loaded

    def hold(self, loaded: LoadedModel) -> None:
        """One more holder for an open version (a swap reusing a warm one)."""
        with self._lock:
            if id(loaded) not in self._holds:
                raise Unavailable(f"{loaded.name}:{loaded.version} is unloaded")
            self._holds[id(loaded)] += 1

    def holders(self, loaded: LoadedModel) -> int:
        return self._holds.get(id(loaded), 0)

    def drop(self, loaded: LoadedModel) -> bool:
        """Give back one hold. True when it was the last: the version is then detached
        (no longer found by name or version) and the caller must close it, after
        letting its in-flight requests finish."""
        with self._lock:
            left = self._holds.get(id(loaded), 0) - 1
            if left > 0:
                self._holds[id(loaded)] = left
                return False
            if left < 0:
                return False  # detached already: a second drop is a no-op, never a double close
            del self._holds[id(loaded)]
            del self._open[id(loaded)]
            if self.loaded.get((loaded.name, loaded.version)) is loaded:
                del self.loaded[(loaded.name, loaded.version)]
        if loaded.batcher is not None:
            loaded.batcher.flush()  # its queued requests go now, not after their batching delay
        return True

    def flush_batchers(self) -> None:
        """The agent is stopping: every open version's batching queue goes at once (agent/server/batching.py)."""
        with self._lock:
            batchers = [lm.batcher for lm in self._open.values() if lm.batcher is not None]
        for batcher in batchers:
            batcher.flush()

    def route(self, name: str, route: Route) -> Route | None:
        """Atomically send ``name``'s traffic to ``route``; returns the route it replaced."""
        with self._lock:
            previous = self.routes.get(name)
            self.routes[name] = route
            self.broken.pop(name, None)
        return previous

    def unroute(self, name: str) -> Route | None:
        with self._lock:
            return self.routes.pop(name, None)

    def mark_broken(self, name: str, reason: str) -> None:
        with self._lock:
            if name not in self.routes:
                self.broken[name] = reason

    def close(self) -> None:
        with self._lock:
            loaded = list(self._open.values())
            self.loaded.clear()
            self._holds.clear()
            self._open.clear()
            self.routes.clear()
        for model in loaded:
            model.close()
