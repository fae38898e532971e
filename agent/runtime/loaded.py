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
from typing import TYPE_CHECKING

import numpy as np
import wasmtime

from agent.artefacts import check_module, read_stored
from agent.cas import BlobStore
from agent.errors import BadRequest, ModelError
from agent.runtime.engine import WasmRuntime
from agent.runtime.instance import check_exports
from agent.runtime.pool import InstanceBudget, InstancePool
from agent.spec import ModelSpec
from agent.state import VersionRecord

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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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


def load_version(
    runtime: WasmRuntime,
    blobs: BlobStore,
    record: VersionRecord,
    settings: LoadSettings,
    on_replace: Callable[[str], None] | None = None,
    budget: InstanceBudget | None = None,
) -> LoadedModel:
    """``budget``: the node's bound on live instances (a private, unbounded one when None)."""
    start = time.perf_counter()
    # A module another version already compiled is shared: its blob is neither read nor hashed again.
    module = runtime.shared_module(record.module_digest)
    spec, wasm, params = read_stored(blobs, record, module=module is None)
    if module is None:
        module = runtime.load_module(wasm, record.module_digest, validate=lambda m: _validate(spec, wasm, m))
    memory_mb = min(settings.memory_limit_mb, spec.memory_limit_mb or settings.memory_limit_mb)
    timeout_ms = min(settings.request_timeout_ms, spec.timeout_ms or settings.request_timeout_ms)
    pool = InstancePool(
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
    )
    try:
        warm_up(spec, pool)
    except BaseException:
        pool.close()
        raise
    return LoadedModel(spec=spec, record=record, pool=pool, load_ms=(time.perf_counter() - start) * 1000)


def _validate(spec: ModelSpec, wasm: bytes, module: wasmtime.Module) -> None:
    # The module rule also runs at import and admission; here it covers versions stored before it existed.
    check_module(spec, wasm)
    check_exports(module, spec)


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
