"""The WASI-NN side of a loaded version: its named model, and one host per instance.

A WASI-NN version (model.json's ``wasi_nn`` section) runs a wasm app that calls
``wasi_ephemeral_nn``; its weights blob is the backend's own model file. The
version gets one :class:`NnVersion`: the :class:`~agent.wasinn.backend.NamedModels`
that maps ``wasi_nn.name`` to that file, so the backend loads the graph once and
every instance shares it; each instance gets its own
:class:`~agent.wasinn.host.NnHost` (its own graph and context handles) on a
linker made for that instance. A host is closed with its instance; the named
models with the version.
"""

from __future__ import annotations

import threading
from pathlib import Path

import wasmtime

from agent.errors import InvalidModel
from agent.spec import ModelSpec, WasiNnSpec
from agent.wasinn.abi import ENCODING_NAMES, TARGET_NAMES, NnError
from agent.wasinn.backend import BackendRegistry, NamedModel, NamedModels
from agent.wasinn.gpu import GpuGraph, GpuScheduler, placement
from agent.wasinn.host import NnHost


class NnVersion:
    """The named model of one WASI-NN version and the hosts of its instances. Thread-safe."""

    def __init__(
        self, *, registry: BackendRegistry, spec: ModelSpec, weights_path: Path, gpu: GpuScheduler | None = None
    ):
        assert spec.wasi_nn is not None
        self.spec: WasiNnSpec = spec.wasi_nn
        self.label = f"{spec.name}:{spec.version}"
        self.registry = registry
        self.encoding = ENCODING_NAMES[self.spec.encoding]
        self.target = TARGET_NAMES[self.spec.target]
        self.weights_path = weights_path
        # -- GPU admission (agent/wasinn/gpu.py): a gpu/auto version takes the memory it declares on a
        # device now (GpuUnavailable when target gpu finds none with room), or auto runs on the CPU;
        # each compute then holds a slot of that device; close() gives the lease back.
        lease = gpu.admit(self.label, self.spec.gpu_memory_mb, self.spec.target) if gpu is not None else None
        self.gpu_lease = lease
        target, options = placement(self.target, lease) if gpu is not None else (self.target, {})
        self.placed_target = target  # where admission put it: the OpenAI engine (agent/llm) places by it too
        self.named = NamedModels(
            registry=registry,
            models={
                self.spec.name: NamedModel(
                    self.spec.name, self.encoding, target, weights_path, options, defaults=self.spec.config
                )
            },
            wrap=(lambda graph: GpuGraph(graph, lease)) if lease is not None else None,
        )
        # -- end GPU admission
        # Hosts made and not yet closed: a test hook and a leak check (instances dropped by eviction,
        # the reaper or an unload must take their host's contexts with them).
        self.open_hosts = 0
        self._lock = threading.Lock()

    def check_backend(self) -> str:
        """The backend's name; InvalidModel naming the encoding when this node has none for it."""
        try:
            return self.registry.get(self.encoding).name
        except NnError as exc:
            found = ", ".join(info.name for info in self.registry.available) or "none"
            raise InvalidModel(f"{self.label}: {exc} (WASI-NN backends here: {found}; [wasi_nn] backends)") from None

    def linker(self, engine: wasmtime.Engine) -> tuple[wasmtime.Linker, NnHost]:
        """A linker for one instance: WASI (defined, configured closed by the runtime) and a fresh host."""
        host = NnHost(registry=self.registry, named=self.named)
        linker = wasmtime.Linker(engine)
        linker.define_wasi()
        host.define(linker)
        with self._lock:
            self.open_hosts += 1
        return linker, host

    def close_host(self, host: NnHost) -> None:
        """Idempotent: an instance closed explicitly is closed again by its finalizer."""
        with self._lock:
            if host.closed:
                return
            host.close()
            self.open_hosts -= 1

    def close(self) -> None:
        """The version is unloaded: its shared graphs go (its instances are gone already)."""
        self.named.close()
        if self.gpu_lease is not None:
            self.gpu_lease.release()  # after the graphs: the memory is free when the budget says so
