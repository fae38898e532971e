"""A model version made servable: artefacts read from the store, checked, pooled and warm.

:func:`load_version` is the path of a model from disk to a warm instance:
blobs re-hashed against their digests -> model.json parsed -> weights parsed
and matched to the declared parameters (both by ``agent.artefacts``, the rules
import and admission apply) -> module compiled (or deserialized from the
compile cache) -> instance pool made (one instance, or all ``pool_size`` with
``eager_instances``; the others on demand) -> warm-up input run on every instance
it holds and compared with the golden output when the model ships one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import wasmtime

from agent.artefacts import check_module, read_stored, read_stored_nn, read_stored_spec
from agent.cas import BlobStore
from agent.errors import BadRequest, InvalidModel, ModelError
from agent.runtime.engine import WasmRuntime
from agent.runtime.instance import check_exports
from agent.runtime.nn import NnVersion
from agent.runtime.pool import InstanceBudget, InstancePool
from agent.spec import ModelSpec
from agent.state import VersionRecord
from agent.wasinn.backend import BackendRegistry, NamedModels
from agent.wasinn.gpu import GpuScheduler

if TYPE_CHECKING:
    from agent.server.batching import Batcher


@dataclass
class LoadSettings:
    pool_size: int  # the most instances of one version
    memory_limit_mb: int
    request_timeout_ms: int
    # Build all pool_size instances at load; else the warm-up's one, the others on demand.
    eager_instances: bool = False


@dataclass
class LoadedModel:
    spec: ModelSpec
    record: VersionRecord
    # A WASI-NN command app's (``wasi_nn.app == "command"``) holds no instance and refuses calls
    # (``pool.abi`` is False): such an app is run per request by its own path, from ``module``,
    # ``nn`` and ``weights_path``, not through the Model ABI.
    pool: InstancePool
    load_ms: float
    loaded_at: float = field(default_factory=time.time)
    # perf_counter() when the pool finished warming: the start of "warm to routed".
    warm_at: float = field(default_factory=time.perf_counter)
    inflight: int = 0
    # The server's bound on this version's requests holding worker threads (pool size),
    # made on the event loop at first use.
    worker_slots: asyncio.Semaphore | None = field(default=None, repr=False)
    # Dynamic batching (agent/server/batching.py): decided by the server at the first request
    # (batching_resolved), the batcher lives and closes with this version.
    batcher: Batcher | None = field(default=None, repr=False)
    batching_resolved: bool = False
    # A WASI-NN version (model.json's ``wasi_nn``): its named model, shared by its instances and
    # closed with the version; the path of its weights blob (the backend's own model file); its
    # compiled module (what a command app instantiates per request).
    nn_version: NnVersion | None = field(default=None, repr=False)
    module: wasmtime.Module | None = field(default=None, repr=False)
    # What a front end attached to this version and closes with it (agent/llm: a language model's
    # llama.cpp contexts), called after the pool and the named models; each must be idempotent.
    closers: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def nn(self) -> NamedModels | None:
        """The WASI-NN named models (``wasi_nn.name`` -> the weights file), for a host made per call."""
        return self.nn_version.named if self.nn_version is not None else None

    @property
    def weights_path(self) -> Path | None:
        return self.nn_version.weights_path if self.nn_version is not None else None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    def prepare(self, tensors: Mapping[str, np.ndarray]) -> tuple[list[np.ndarray], int]:
        """Order, type and shape-check named inputs; returns (arrays, batch)."""
        inputs = self.spec.inputs
        if len(tensors) != len(inputs) or any(t.name not in tensors for t in inputs):
            self._name_errors(tensors)
        arrays = []
        batch = -1
        for tspec in inputs:
            array = tensors[tspec.name]
            shape = array.shape
            if len(shape) != len(tspec.shape) or shape[1:] != tspec.row_shape:
                raise BadRequest(
                    f"input {tspec.name} has shape {list(shape)}, model {self.name} expects {list(tspec.shape)}"
                )
            if batch not in (-1, shape[0]):
                raise BadRequest(f"inputs disagree on the batch size ({batch} vs {shape[0]})")
            batch = shape[0]
            arrays.append(np.ascontiguousarray(array, dtype=tspec.dtype))
        if batch < 1:
            raise BadRequest("batch size must be at least 1")
        return arrays, batch

    def _name_errors(self, tensors: Mapping[str, np.ndarray]) -> None:
        missing = [t.name for t in self.spec.inputs if t.name not in tensors]
        if missing:
            raise BadRequest(f"model {self.name} needs input(s) {', '.join(missing)}")
        extra = set(tensors) - {t.name for t in self.spec.inputs}
        raise BadRequest(f"model {self.name} has no input(s) {', '.join(sorted(extra))}")

    def infer(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays, batch = self.prepare(tensors)
        outputs = self.pool.run(arrays, batch)
        return {t.name: out for t, out in zip(self.spec.outputs, outputs, strict=True)}

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        self.pool.close()
        if self.nn_version is not None:
            self.nn_version.close()  # after the pool: its instances' hosts are closed by then
        for close in self.closers:
            close()


def load_version(
    runtime: WasmRuntime,
    blobs: BlobStore,
    record: VersionRecord,
    settings: LoadSettings,
    on_replace: Callable[[str], None] | None = None,
    budget: InstanceBudget | None = None,
    *,
    nn_registry: BackendRegistry | None = None,
    gpu: GpuScheduler | None = None,
) -> LoadedModel:
    """``budget``: the node's bound on live instances (a private, unbounded one when None).
    ``nn_registry``: the node's WASI-NN backends; without it a WASI-NN version is refused."""
    start = time.perf_counter()
    # A module another version already compiled is shared: its blob is neither read nor hashed again.
    module = runtime.shared_module(record.module_digest)
    if read_stored_spec(blobs, record).wasi_nn is not None:
        return _load_nn_version(
            runtime, blobs, record, settings, module, on_replace, budget, nn_registry, start, gpu=gpu
        )
    spec, wasm, params = read_stored(blobs, record, module=module is None)
    if module is None:
        module = runtime.load_module(wasm, record.module_digest, validate=lambda m: _validate(spec, wasm, m))
    pool = _make_pool(runtime, module, spec, params, settings, on_replace, budget)
    try:
        warm_up(spec, pool)
    except BaseException:
        pool.close()
        raise
    return LoadedModel(spec=spec, record=record, pool=pool, load_ms=(time.perf_counter() - start) * 1000)


def _make_pool(
    runtime: WasmRuntime,
    module: wasmtime.Module,
    spec: ModelSpec,
    params: Mapping[str, np.ndarray],
    settings: LoadSettings,
    on_replace: Callable[[str], None] | None,
    budget: InstanceBudget | None,
    *,
    nn: NnVersion | None = None,
    abi: bool = True,
) -> InstancePool:
    """A version's pool, its memory cap and deadline the tighter of the node's and the model's own."""
    memory_mb = min(settings.memory_limit_mb, spec.memory_limit_mb or settings.memory_limit_mb)
    timeout_ms = min(settings.request_timeout_ms, spec.timeout_ms or settings.request_timeout_ms)
    return InstancePool(
        runtime,
        module,
        spec,
        params,
        size=settings.pool_size,
        memory_limit_bytes=memory_mb * 1024 * 1024,
        timeout_ms=timeout_ms,
        on_replace=on_replace,
        exports_checked=True,
        budget=budget,
        eager=settings.eager_instances,
        nn=nn,
        abi=abi,
    )


def _load_nn_version(
    runtime: WasmRuntime,
    blobs: BlobStore,
    record: VersionRecord,
    settings: LoadSettings,
    module: wasmtime.Module | None,
    on_replace: Callable[[str], None] | None,
    budget: InstanceBudget | None,
    registry: BackendRegistry | None,
    start: float,
    *,
    gpu: GpuScheduler | None = None,
) -> LoadedModel:
    """A WASI-NN version: the backend checked, the pool made with a host per instance. The named graph
    is loaded by the first instance's ``ea_init`` (``load_by_name``, with the app's own config: a
    preload with another config would load a second copy); a file the backend refuses fails the
    load with the backend's reason. A command app is compiled and validated only: no instance."""
    spec, wasm, weights_path = read_stored_nn(blobs, record, module=module is None)
    assert spec.wasi_nn is not None
    if registry is None:
        raise InvalidModel(f"{spec.name}:{spec.version} is a WASI-NN model, and this agent serves none")
    nn = NnVersion(registry=registry, spec=spec, weights_path=weights_path, gpu=gpu)
    reactor = spec.wasi_nn.app == "reactor"
    try:
        nn.check_backend()
        if module is None:
            module = runtime.load_module(
                wasm,
                record.module_digest,
                validate=lambda m: _validate(spec, wasm, m, reactor=reactor),
                allow_nn=True,
            )
        pool = _make_pool(runtime, module, spec, {}, settings, on_replace, budget, nn=nn, abi=reactor)
        try:
            if reactor:
                warm_up(spec, pool)
        except BaseException:
            pool.close()
            raise
    except BaseException:
        nn.close()
        raise
    return LoadedModel(
        spec=spec,
        record=record,
        pool=pool,
        load_ms=(time.perf_counter() - start) * 1000,
        nn_version=nn,
        module=module,
    )


def _validate(spec: ModelSpec, wasm: bytes, module: wasmtime.Module, *, reactor: bool = True) -> None:
    # The module rule also runs at import and admission; here it covers versions stored before it existed.
    check_module(spec, wasm)
    if reactor:
        check_exports(module, spec)
    else:  # a WASI-NN command app: a WASI command, run per request, not the Model ABI
        check_command_exports(module, spec)


def check_command_exports(module: wasmtime.Module, spec: ModelSpec) -> None:
    """A WASI command: ``_start`` taking and returning nothing, and its memory as ``memory``."""
    types = {export.name: export.type for export in module.exports}
    start = types.get("_start")
    if not isinstance(start, wasmtime.FuncType) or list(start.params) or list(start.results):
        raise InvalidModel(f"{spec.name}:{spec.version}: a WASI-NN command app must export _start: () -> ()")
    if not isinstance(types.get("memory"), wasmtime.MemoryType):
        raise InvalidModel(f"{spec.name}:{spec.version}: module does not export its memory as 'memory'")


def warm_up(spec: ModelSpec, pool: InstancePool) -> None:
    """Run the warm-up input on the pool's instances (at least one); check golden outputs when given."""
    arrays = [np.ascontiguousarray(spec.warmup_inputs[t.name], dtype=t.dtype) for t in spec.inputs]
    batch = arrays[0].shape[0]
    try:
        results = pool.warm(arrays, batch)
    except ModelError as exc:
        raise ModelError(f"{spec.name}:{spec.version}: warm-up failed: {exc}") from exc
    for outputs in results:
        for tspec, got in zip(spec.outputs, outputs, strict=True):
            want = spec.warmup_outputs.get(tspec.name)
            if want is None:
                continue
            if got.shape != want.shape:
                raise ModelError(
                    f"{spec.name}:{spec.version}: warm-up output {tspec.name} has shape {list(got.shape)}, "
                    f"golden output has {list(want.shape)}"
                )
            if tspec.dtype.kind == "f":
                ok = np.allclose(got, want, rtol=spec.warmup_rtol, atol=spec.warmup_atol)
            else:
                ok = np.array_equal(got, want)
            if not ok:
                raise ModelError(
                    f"{spec.name}:{spec.version}: warm-up output {tspec.name} does not match the golden output"
                )
