"""The images subsystem as the daemon uses it: ``Agent.puller`` and ``Agent.cache``.

``agent.wiring.attach_images`` builds both from the agent's config, store and
event bus, and hands them to the parts that use them:

- :class:`ImageService`: ``await pull(ref) -> VersionRecord`` for the
  lifecycle (its reconciler pulls what a deployment names), ``await
  import_layout(path) -> VersionRecord`` for the drop-in folder;
- :class:`CacheControl`: ``gc()``, ``verify()`` returning JSON-ready dicts (the
  control surface sends them over MQTT), ``used_bytes()`` for telemetry.

Pulls and imports run one at a time on their own thread, so a slow registry
never occupies an inference worker and two deploys never download the same
blob twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from structlog.typing import FilteringBoundLogger

from agent.cas import BlobStore
from agent.config import Config
from agent.events import EventBus
from agent.images.cache import GcReport, ImageCache, VersionKey
from agent.images.progress import LogProgress
from agent.images.pull import Puller, PullResult, Store
from agent.images.settings import CacheSettings, RegistrySettings, TrustSettings
from agent.images.trust import TrustPolicy
from agent.state import StateDB, VersionRecord

# Events after which a version counts as just used, for LRU eviction.
USE_EVENTS = ("model.swapped", "model.rollback")


def build_puller(
    config: Config,
    repository: Store,
    events: EventBus | None = None,
    in_use: Callable[[], Iterable[VersionKey]] | None = None,
    *,
    trust: TrustSettings | None = None,
) -> Puller:
    """The puller of ``config``'s ``[registry]``, ``[trust]`` and ``[cache]``; ``trust`` when parsed already."""
    cache = ImageCache(repository.blobs, repository.db, CacheSettings.from_config(config), in_use=in_use)
    return Puller(
        repository,
        cache,
        RegistrySettings.from_config(config),
        TrustPolicy(trust if trust is not None else TrustSettings.from_config(config)),
        events=events,
    )


@dataclass(frozen=True)
class LocalStore:
    """A state directory's blob store and database, for tools that pull without a running agent."""

    blobs: BlobStore
    db: StateDB

    @classmethod
    def open(cls, config: Config) -> LocalStore:
        return cls(BlobStore(config.state_dir), StateDB(config.state_dir / "agent.db"))


class CacheControl:
    """``Agent.cache``: cache maintenance with JSON-ready answers (blocking; callers use a thread)."""

    def __init__(self, cache: ImageCache):
        self.cache = cache

    def gc(self) -> dict[str, Any]:
        return self.cache.gc().to_dict()

    def verify(self) -> dict[str, Any]:
        return self.cache.verify().to_dict()

    def used_bytes(self) -> int:
        return self.cache.used_bytes()

    def touch_version(self, record: VersionRecord) -> None:
        self.cache.touch_version(record)


def open_cache(config: Config, blobs: BlobStore, db: StateDB) -> CacheControl:
    """The cache of a store, as ``Agent.cache`` (for an agent that pulls nothing, or a tool)."""
    return CacheControl(ImageCache(blobs, db, CacheSettings.from_config(config)))


class ImageService:
    """Async face of the puller for the daemon; also a Service (start/stop)."""

    def __init__(self, *, puller: Puller, events: EventBus | None = None, log: FilteringBoundLogger | None = None):
        self.puller = puller
        self.cache = puller.cache
        self.events = events
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pull")
        self._log = log
        self._watch: asyncio.Task[None] | None = None

    async def pull(self, ref: str) -> VersionRecord:
        result = await self.pull_result(ref)
        return result.record

    async def pull_result(self, ref: str) -> PullResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.puller.pull, ref, self._progress())

    async def import_layout(self, path: Path, name: str | None = None) -> VersionRecord:
        """Import an OCI layout (directory or tar) under the pull's trust checks; the drop-in folder's hook."""
        result = await self.import_layout_result(path, name)
        return result.record

    async def import_layout_result(self, path: Path, name: str | None = None) -> PullResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.puller.import_layout, Path(path), name, self._progress())

    def _progress(self) -> LogProgress:
        return LogProgress(self._log) if self._log is not None else LogProgress()

    async def enforce_budget(self) -> GcReport:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.cache.enforce_budget)

    async def start(self) -> None:
        await self.enforce_budget()
        if self.events is not None:
            self._watch = asyncio.ensure_future(self._touch_on_use(self.events.subscribe()))

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _touch_on_use(self, queue: asyncio.Queue[Any]) -> None:
        """A version that starts serving is the most recently used: LRU goes by use, not by download."""
        assert self.events is not None
        try:
            while True:
                event = await queue.get()
                if event.kind not in USE_EVENTS:
                    continue
                record = self.puller.db.get_version(event.fields.get("model", ""), event.fields.get("version", ""))
                if record is not None:
                    await asyncio.to_thread(self.cache.touch_version, record)
        finally:
            self.events.unsubscribe(queue)
