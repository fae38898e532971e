"""What a WASI-NN backend implements, and the registry of those this node has.

A backend turns a model file (or the bytes a guest passes to ``load``) into a
:class:`Graph`; a graph makes :class:`ExecutionContext` objects, one per guest
``init_execution_context``. Graphs may be shared by many instances (a named
model is loaded once per version and process); contexts never are.

Backends are optional at run time: :func:`discover` looks for their Python
packages without importing them (importing torch costs a second and hundreds of
megabytes), and a backend is imported the first time a graph needs it.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.wasinn.abi import Errno, ExecutionTarget, GraphEncoding, NnError, TensorType


@dataclass(frozen=True)
class Tensor:
    """An input as the guest gave it: dimensions, element type, bytes (copied out of guest memory)."""

    dims: tuple[int, ...]
    type: TensorType
    data: bytes


class ExecutionContext(Protocol):
    def set_input(self, index: int, tensor: Tensor) -> None: ...
    def compute(self) -> None: ...
    def get_output(self, index: int) -> bytes: ...
    # WasmEdge's streaming calls (the ggml backend); others raise UNSUPPORTED_OPERATION.
    def compute_single(self) -> None: ...
    def get_output_single(self, index: int) -> bytes: ...
    def fini_single(self) -> None: ...
    def close(self) -> None: ...


class ComputedOutputs:
    """What onnxruntime and TorchScript contexts share: the outputs ``compute`` left, read by index, and no
    streaming (WasmEdge's ``*_single`` calls are the ggml backend's)."""

    _outputs: list[bytes] | None
    _inputs: dict[int, Any]

    def get_output(self, index: int) -> bytes:
        if self._outputs is None:
            raise NnError(Errno.INVALID_ARGUMENT, "get_output before compute")
        if not 0 <= index < len(self._outputs):
            raise NnError(Errno.INVALID_ARGUMENT, f"output index {index}; the graph has {len(self._outputs)} outputs")
        return self._outputs[index]

    def compute_single(self) -> None:
        raise NnError(Errno.UNSUPPORTED_OPERATION, "compute_single is a ggml-backend call")

    def get_output_single(self, index: int) -> bytes:
        raise NnError(Errno.UNSUPPORTED_OPERATION, "get_output_single is a ggml-backend call")

    def fini_single(self) -> None:
        raise NnError(Errno.UNSUPPORTED_OPERATION, "fini_single is a ggml-backend call")

    def close(self) -> None:
        self._inputs.clear()
        self._outputs = None


class Graph(Protocol):
    backend: str
    # The device it runs on after the backend resolved the requested target ("cpu", "cuda:0").
    device: str
    # get_output into a buffer too small: False answers TOO_LARGE (the spec); True copies what fits
    # and reports the whole length (WasmEdge's ggml backend, which the example apps rely on).
    truncates_output: bool

    def init_execution_context(self) -> ExecutionContext: ...
    def close(self) -> None: ...


class Backend(Protocol):
    name: str  # "onnxruntime", "llama.cpp", "torchscript"
    encoding: GraphEncoding

    def describe(self) -> dict[str, Any]:
        """Version and devices, for ``/v2`` server metadata and telemetry."""
        ...

    def load_bytes(self, builders: Sequence[bytes], target: ExecutionTarget, config: dict[str, Any]) -> Graph:
        """``load``: the model from the guest's builder buffers."""
        ...

    def load_file(self, path: Path, target: ExecutionTarget, config: dict[str, Any]) -> Graph:
        """A named model (``--nn-preload``) or an image's weights layer: memory-mapped where the backend allows."""
        ...


@dataclass(frozen=True)
class BackendInfo:
    encoding: GraphEncoding
    name: str
    package: str  # the import that says it is installed
    factory: str  # "module:Class", imported on first use


KNOWN_BACKENDS: tuple[BackendInfo, ...] = (
    BackendInfo(GraphEncoding.ONNX, "onnxruntime", "onnxruntime", "agent.wasinn.backends.onnx:OnnxBackend"),
    BackendInfo(GraphEncoding.GGML, "llama.cpp", "llama_cpp", "agent.wasinn.backends.ggml:GgmlBackend"),
    BackendInfo(GraphEncoding.PYTORCH, "torchscript", "torch", "agent.wasinn.backends.torchscript:TorchScriptBackend"),
)


class BackendRegistry:
    """The backends this node can use, imported on first use; one per agent (or per ``wasi run``)."""

    def __init__(self, *, available: Sequence[BackendInfo], options: dict[str, Any] | None = None):
        self._available = {info.encoding: info for info in available}
        self._options = dict(options or {})
        self._loaded: dict[GraphEncoding, Backend] = {}
        self._lock = threading.Lock()

    @property
    def available(self) -> list[BackendInfo]:
        return list(self._available.values())

    def get(self, encoding: int) -> Backend:
        try:
            enc = GraphEncoding(encoding)
        except ValueError:
            raise NnError(Errno.INVALID_ENCODING, f"unknown graph encoding {encoding}") from None
        info = self._available.get(enc)
        if info is None:
            raise NnError(Errno.INVALID_ENCODING, f"no backend for encoding {enc.name.lower()} on this node")
        with self._lock:
            backend = self._loaded.get(enc)
            if backend is None:
                module_name, _, cls_name = info.factory.partition(":")
                module = importlib.import_module(module_name)
                factory: Callable[..., Backend] = getattr(module, cls_name)
                backend = factory(options=self._options.get(info.name, {}))
                self._loaded[enc] = backend
        return backend

    def describe(self) -> list[dict[str, Any]]:
        """Every available backend; versions and devices only for those already imported (never imports)."""
        out = []
        for enc, info in self._available.items():
            entry: dict[str, Any] = {"name": info.name, "encoding": enc.name.lower()}
            backend = self._loaded.get(enc)
            if backend is not None:
                entry.update(backend.describe())
            out.append(entry)
        return out


def discover(enabled: Sequence[str] | None = None) -> list[BackendInfo]:
    """The known backends whose package is installed (``enabled``: only those names)."""
    found = []
    for info in KNOWN_BACKENDS:
        if enabled is not None and info.name not in enabled:
            continue
        if importlib.util.find_spec(info.package) is not None:
            found.append(info)
    return found


@dataclass(frozen=True)
class NamedModel:
    """``--nn-preload NAME:ENCODING:TARGET:PATH``, or a WASI-NN image's weights layer."""

    name: str
    encoding: GraphEncoding
    target: ExecutionTarget
    path: Path
    # Graph options the node sets over the guest's own (a GPU lease's device_index: agent/wasinn/gpu.py).
    options: Mapping[str, Any] = field(default_factory=dict)
    # Graph options under the guest's own: model.json's wasi_nn.config (a guest that passes none gets these).
    defaults: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class NamedModels:
    """Named models of one app (a ``wasi run`` or a loaded version): each graph loaded once per config, shared."""

    registry: BackendRegistry
    models: dict[str, NamedModel] = field(default_factory=dict)
    # Applied to every graph loaded here (GpuGraph: a leased version's computes hold a GPU slot).
    wrap: Callable[[Graph], Graph] | None = None
    # Graphs per name (one per distinct guest config, each a whole load of the model, kept until the
    # version goes): a guest varying its config must not load the model again without end.
    max_configs: int = 16
    _graphs: dict[tuple[str, str], Graph] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def graph(self, name: str, config: dict[str, Any], config_key: str) -> Graph:
        model = self.models.get(name)
        if model is None:
            # WasmEdge answers an unknown name with its ModelNotFound (the ggml example apps match on it).
            raise NnError(Errno.MODEL_NOT_FOUND, f"no model named {name!r} is preloaded")
        key = (name, config_key)
        with self._lock:
            graph = self._graphs.get(key)
            if graph is None:
                if sum(1 for n, _ in self._graphs if n == name) >= self.max_configs:
                    raise NnError(Errno.TOO_LARGE, f"model {name!r} is loaded with {self.max_configs} configs already")
                # The model's defaults, then the guest's config, then the node's placement (which wins).
                options = {**model.defaults, **config, **model.options}
                graph = self.registry.get(model.encoding).load_file(model.path, model.target, options)
                if self.wrap is not None:
                    graph = self.wrap(graph)
                self._graphs[key] = graph
        return graph

    def close(self) -> None:
        with self._lock:
            graphs, self._graphs = list(self._graphs.values()), {}
        for graph in graphs:
            graph.close()
