"""The agent: one object that owns a node's store, runtime, models, API and services.

Everything an agent touches lives under its state directory and every port
comes from its config, so many agents can run in one process (the fleet
simulator) — there is no module-level state. ``edge-agent run`` is
``Agent(config)``, then ``agent.wiring.attach_services(agent)`` (the optional
parts, declared below, in start order), then ``serve_forever()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from agent import exitcodes
from agent.cas import BlobStore
from agent.config import Config, GpuSettings, WasiNnSettings
from agent.errors import AgentError, CorruptBlob, ListenError, StateDirError
from agent.events import EventBus
from agent.fsmodes import private_dirs, tighten_tree
from agent.metrics import Metrics
from agent.models import ModelManager, Route
from agent.repository import ModelRepository
from agent.runtime import InstanceBudget, InstanceReaper, LoadedModel, LoadSettings, WasmRuntime
from agent.server.batching import parse_batching_config
from agent.server.http import HttpServer
from agent.server.inference import InferenceCore
from agent.server.oip import InferenceAPI
from agent.state import StateDB, VersionRecord
from agent.telemetry.gpu import GpuProbe
from agent.wasinn.backend import KNOWN_BACKENDS, BackendRegistry, discover
from agent.wasinn.gpu import GpuDevice, GpuScheduler, discover_gpus

if TYPE_CHECKING:
    # The optional parts' types only: agent/wiring.py builds them, and importing them
    # here would load MQTT, watchdog and the rest for every agent and tool.
    from agent.images.service import CacheControl, ImageService
    from agent.inbox import InboxWatcher
    from agent.k8s.watcher import KubeWatcher
    from agent.lifecycle import Lifecycle
    from agent.mqtt.channel import MqttChannel
    from agent.sdnotify import SystemdNotifier
    from agent.server.grpc_api import GrpcServer
    from agent.server.repository_api import RepositoryAPI


class Service(Protocol):
    """A subsystem the agent starts after its API is up and stops before it drains."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Agent:
    # Start-up logs each model it loads up to this many; a node with more gets one summary line.
    LOG_EACH_LOAD_UP_TO = 50

    def __init__(
        self, config: Config, runtime: WasmRuntime | None = None, *, gpu_devices: Sequence[GpuDevice] | None = None
    ):
        self.config = config
        self.log = structlog.get_logger("edge_agent").bind(node=config.node_id)
        state = config.state_dir
        try:
            # 0700, like systemd's UMask=0077 would make it (agent/fsmodes.py); an older, looser one is tightened.
            private_dirs(state)
            tightened = tighten_tree(state)
            probe = state / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StateDirError(f"state directory {state} is not usable: {exc.strerror or exc}") from exc
        if tightened is not None:
            was, entries = tightened
            self.log.warning("state directory permissions tightened", path=str(state), was=oct(was), entries=entries)
        self.blobs = BlobStore(state)
        self.db = StateDB(state / "agent.db")
        self.repository = ModelRepository(self.blobs, self.db)
        self._owns_runtime = runtime is None
        self.runtime = runtime or WasmRuntime(config.compile_cache_dir or state / "compiled")
        self.events = EventBus()
        self.metrics = Metrics()
        self.events.listen(self.metrics.observe_event)  # image pulls, drop-in entries
        # The WASI-NN backends this node offers ([wasi_nn]): found by package, imported on first use.
        nn = WasiNnSettings.from_config(config, known=tuple(info.name for info in KNOWN_BACKENDS))
        self.nn_backends = BackendRegistry(available=discover(nn.backends), options=nn.options)
        # The node's GPUs ([gpu]), found through NVML: admission of gpu/auto WASI-NN versions by memory,
        # a concurrency bound per device, per-version GPU time for telemetry (agent/wasinn/gpu.py).
        gpu_settings = GpuSettings.from_config(config)
        gpu_probe: GpuProbe | None = None
        if gpu_devices is None:
            nvml = GpuProbe(self.log, enabled=gpu_settings.enabled)
            gpu_probe, gpu_devices = nvml, discover_gpus(nvml)
        # else devices given (a test): NVML is not asked, so the machine's own GPUs never mix in.
        self.gpu = GpuScheduler(devices=gpu_devices, settings=gpu_settings, probe=gpu_probe)
        self.models = ModelManager(
            self.runtime,
            self.blobs,
            LoadSettings(config.pool_size, config.memory_limit_mb, config.request_timeout_ms, config.eager_instances),
            on_replace=self._instance_replaced,
            budget=InstanceBudget(limit=config.max_instances),
            nn_registry=self.nn_backends,
            gpu=self.gpu,
        )
        self.metrics.track_instances(self.models.budget)
        self.executor = ThreadPoolExecutor(config.worker_threads, thread_name_prefix="infer")
        # Drops instances idle for instance_idle_s (runs from start() to stop(), before any service).
        self.reaper = InstanceReaper(budget=self.models.budget, idle_s=config.instance_idle_s, executor=self.executor)
        self.inference = InferenceCore(
            models=self.models,
            metrics=self.metrics,
            executor=self.executor,
            inline_threshold_us=config.inline_threshold_us,
            batching=parse_batching_config(config.section("batching")),
        )
        self.api = InferenceAPI(
            models=self.models,
            metrics=self.metrics,
            core=self.inference,
            nn_backends=self.nn_backends,
            is_ready=lambda: self.started and not self.stopping,
            extra_routes=self._extra_routes,
        )
        self.http = HttpServer(
            self.api,
            max_body_bytes=config.max_body_bytes,
            max_url_bytes=config.max_url_bytes,
            max_header_bytes=config.max_header_bytes,
            max_header_count=config.max_header_count,
            max_inflight_body_bytes=config.max_inflight_body_bytes,
            max_connections=config.max_connections,
            write_buffer_high_bytes=config.write_buffer_high_bytes,
            header_timeout_s=config.header_timeout_s,
            body_timeout_s=config.body_timeout_s,
        )
        self.services: list[Service] = []  # started in this order after the API listens, stopped in reverse
        # The parts agent/wiring.py adds; each stays None while its subsystem is off (or, in a
        # test, not built). The core above serves the stored models without any of them.
        self.control: Lifecycle | None = None  # the reconciler: every front end drives it
        self.repository_api: RepositoryAPI | None = None  # the local control API over control
        self.puller: ImageService | None = None  # image pulls and drop-in imports
        self.cache: CacheControl | None = None  # the image cache's gc / verify / size
        self.inbox: InboxWatcher | None = None
        self.k8s: KubeWatcher | None = None
        self.mqtt: MqttChannel | None = None
        self.sdnotify: SystemdNotifier | None = None
        self.grpc: GrpcServer | None = None  # the gRPC API, on its own port (grpc_listen)
        self.address: tuple[str, int] | None = None
        self.started = False
        self.stopping = False
        self._stop_requested: asyncio.Event | None = None

    # -- start-up ------------------------------------------------------------------------
    async def start(self) -> None:
        t0 = time.perf_counter()
        self.log.info("wasi-nn backends", backends=self.nn_backends.describe())
        self.runtime.start()
        self.blobs.clean_tmp()
        if self.config.seed_bundled:
            for record in self.repository.seed_bundled():
                self.log.info("seeded bundled model", model=record.model, version=record.version)
        # Loading thousands of versions makes objects that all live on: the cyclic collector would
        # walk the growing heap again and again (more than half the load time at 3,000 versions).
        # Off while they load. The process's owner (serve_forever) then freezes them (gc.freeze),
        # so a full collection in the middle of requests does not walk them either (a second for
        # 3,000 versions); an agent sharing its process with others leaves the collector alone.
        collecting = gc.isenabled()
        gc.disable()
        try:
            await self.load_active()
        finally:
            if collecting:
                gc.enable()
        await self.reaper.start()
        host, port = self.config.host_port
        try:
            self.address = await self.http.listen(host, port)
        except OSError as exc:
            raise ListenError(f"cannot listen on {self.config.listen}: {exc.strerror or exc}") from exc
        for service in self.services:
            await service.start()
        self.started = True
        self.log.info(
            "agent ready",
            listen=f"{self.address[0]}:{self.address[1]}",
            **self._ready_models(),
            startup_ms=round((time.perf_counter() - t0) * 1000, 1),
        )

    async def load_active(self) -> None:
        """Load every model's recorded active version from the local store; no network.

        Two queries whatever the number of models; the loads run on the worker pool, one lane
        per CPU up to ``worker_threads`` (hashing and instantiating release the GIL). Each version
        is logged when there are few; past ``LOG_EACH_LOAD_UP_TO``, one summary line (each at debug).
        """
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        records = {(r.model, r.version): r for r in self.db.versions()}
        todo: list[VersionRecord] = []
        for mrec in self.db.models():
            if not mrec.active_version:
                continue
            record = records.get((mrec.name, mrec.active_version))
            if record is None:
                self._broken(mrec.name, f"active version {mrec.active_version} is not in the store")
                continue
            todo.append(record)
        if not todo:
            return
        lanes = min(self.config.worker_threads, os.cpu_count() or 1, len(todo))
        done = await asyncio.gather(
            *(loop.run_in_executor(self.executor, self._load_each, todo[lane::lanes]) for lane in range(lanes))
        )
        one_by_one = len(todo) <= self.LOG_EACH_LOAD_UP_TO
        each = self.log.info if one_by_one else self.log.debug
        broken = 0
        for record, outcome in (pair for lane in done for pair in lane):
            if isinstance(outcome, CorruptBlob):
                self.db.set_version_status(record.model, record.version, "broken", str(outcome))
                self._broken(record.model, f"corrupt blob: {outcome}")
                broken += 1
            elif isinstance(outcome, AgentError):
                self._broken(record.model, str(outcome))
                broken += 1
            else:
                self.models.route(record.model, Route(outcome))
                each(
                    "model loaded",
                    model=outcome.name,
                    version=outcome.version,
                    load_ms=round(outcome.load_ms, 2),
                    instances=outcome.pool.live,
                )
        if not one_by_one:
            self.log.info(
                "models loaded",
                loaded=len(todo) - broken,
                broken=broken,
                instances=self.models.budget.live,
                load_ms=round((time.perf_counter() - start) * 1000, 1),
            )

    def _load_each(self, records: list[VersionRecord]) -> list[tuple[VersionRecord, LoadedModel | AgentError]]:
        """Load versions one after the other on a worker thread; a failure is that version's outcome."""
        outcomes: list[tuple[VersionRecord, LoadedModel | AgentError]] = []
        for record in records:
            try:
                outcomes.append((record, self.models.load(record)))
            except AgentError as exc:
                # Kept without its traceback: it holds this frame, whose ``outcomes`` holds it, a
                # cycle the collector (off while loading, then frozen) would not free, and with it
                # the failed load's frames: its mapped weights, its instances.
                outcomes.append((record, exc.with_traceback(None)))
        return outcomes

    def _ready_models(self) -> dict[str, Any]:
        """What the "agent ready" line says of the models: each by name when few, else counts."""
        routes, broken = self.models.routes, self.models.broken
        if len(routes) + len(broken) <= self.LOG_EACH_LOAD_UP_TO:
            return {
                "models": {name: route.primary.version for name, route in routes.items()},
                "broken": dict(broken),
            }
        return {"models": len(routes), "broken": len(broken), "instances": self.models.budget.live}

    def _broken(self, model: str, reason: str) -> None:
        self.models.mark_broken(model, reason)
        self.db.set_model_status(model, "broken", reason)
        self.events.publish("model.broken", model=model, error=reason)
        self.log.error("model cannot be served", model=model, error=reason)

    def _instance_replaced(self, model: str, version: str, reason: str) -> None:
        self.metrics.instance_replacements.labels(model, version).inc()
        self.log.warning("instance replaced", model=model, version=version, reason=reason)

    def _extra_routes(self, request: Any, parts: list[str]) -> Any:
        # The control API (agent/server/repository_api.py), built by the wiring with the Control.
        api = self.repository_api
        return api.route(request, parts) if api is not None else None

    # -- shutdown ------------------------------------------------------------------------
    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, close the store cleanly."""
        if self.stopping:
            return
        self.stopping = True
        self.log.info("agent stopping", in_flight=self.http.requests_in_flight)
        # Batched requests go now, not after their queue delay: before the services stop, since
        # the gRPC API (a service) drains its calls, queued ones among them, in its stop.
        self.models.flush_batchers()
        for service in reversed(self.services):
            try:
                await service.stop()
            except Exception as exc:  # noqa: BLE001 - one failing service must not keep the others running
                self.log.error("service failed to stop", service=type(service).__name__, error=repr(exc))
        self.models.flush_batchers()  # again: versions that first batched while the services stopped
        clean = await self.http.shutdown(self.config.drain_timeout_s)
        if not clean:
            self.log.warning("drain timed out; remaining connections closed", timeout_s=self.config.drain_timeout_s)
        await self.reaper.stop()
        self.executor.shutdown(wait=True, cancel_futures=False)
        self.models.close()
        self.gpu.close()
        self.db.close()
        if self._owns_runtime:
            self.runtime.close()
        self.log.info("agent stopped", drained=clean)

    def request_stop(self) -> None:
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def serve_forever(self) -> int:
        """Run until SIGTERM/SIGINT; returns the process exit code."""
        self._stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        # This agent owns the process: what it loaded lives as long as it does, so the cyclic
        # collector stops walking it (see start()).
        gc.freeze()
        try:
            await self._stop_requested.wait()
        finally:
            gc.unfreeze()
        await self.stop()
        return exitcodes.OK

    # -- introspection ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        models = []
        for mrec in self.db.models():
            route = self.models.routes.get(mrec.name)
            models.append(
                {
                    "name": mrec.name,
                    "active_version": mrec.active_version,
                    "previous_version": mrec.previous_version,
                    "pinned": mrec.pinned,
                    "serving": [m.version for m in route.versions()] if route else [],
                    "loaded": self.models.loaded_versions(mrec.name),
                    "status": "broken" if mrec.name in self.models.broken else mrec.status,
                    "error": self.models.broken.get(mrec.name) or mrec.error,
                }
            )
        return {
            "node": self.config.node_id,
            "pid": os.getpid(),
            "ready": self.started and not self.stopping,
            "listen": f"{self.address[0]}:{self.address[1]}" if self.address else None,
            "models": models,
        }
