"""The ``wasi_ephemeral_nn`` host module: one :class:`NnHost` per wasm instance.

Every function takes i32s and returns an errno (:class:`~agent.wasinn.abi.Errno`);
results go to guest pointers. Graph and context handles are indices into this
host's own tables, so one instance can never name another's; :meth:`NnHost.close`
releases them with the instance. Every guest pointer and length is checked
against the guest's memory before it is read or written, and every size is
bounded by :class:`NnLimits`, so a hostile guest gets an errno and the host
keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import wasmtime

from agent.wasinn.abi import (
    BUILDER_STRUCT,
    DTYPES,
    MAX_RANK,
    MODULE,
    TENSOR_STRUCT,
    Errno,
    ExecutionTarget,
    GuestMemory,
    NnError,
    TensorType,
)
from agent.wasinn.backend import BackendRegistry, ExecutionContext, Graph, NamedModels, Tensor

log = logging.getLogger(__name__)

I32 = wasmtime.ValType.i32()
# name -> number of i32 parameters (every function returns one i32 errno)
SIGNATURES: dict[str, int] = {
    "load": 5,
    "load_by_name": 3,
    "load_by_name_with_config": 5,
    "init_execution_context": 2,
    "set_input": 3,
    "compute": 1,
    "get_output": 5,
    "compute_single": 1,
    "get_output_single": 5,
    "fini_single": 1,
    "unload": 1,
    "finalize_execution_context": 1,
}


# Backends whose U8 inputs are byte streams, their dimensions not checked against their length.
BYTE_STREAM_BACKENDS = frozenset({"llama.cpp"})


@dataclass(frozen=True)
class NnLimits:
    # The builders of the graphs an instance loads itself (``load``) and holds at once: one load's,
    # or all of them together (each is a backend's copy: in memory, or a llama.cpp temp file).
    max_graph_bytes: int = 1 << 30
    max_tensor_bytes: int = 256 << 20
    max_name_bytes: int = 4096
    max_config_bytes: int = 1 << 20
    max_graphs: int = 64  # per instance
    max_contexts: int = 256  # per instance
    max_builders: int = 16


class NnHost:
    """The WASI-NN state of one wasm instance. Not thread-safe: an instance runs on one thread at a time."""

    def __init__(
        self,
        *,
        registry: BackendRegistry,
        named: NamedModels,
        limits: NnLimits | None = None,
        on_call: Callable[[str, int], None] | None = None,
    ):
        self._registry = registry
        self._named = named
        self._limits = limits or NnLimits()
        # (graph, owned): graphs from ``load`` are this instance's; named ones are shared.
        self._graphs: dict[int, tuple[Graph, bool]] = {}
        self._contexts: dict[int, ExecutionContext] = {}
        self._graph_of_context: dict[int, Graph] = {}
        self._next_graph = 0
        self._owned_bytes: dict[int, int] = {}  # graph handle -> its builders' size, for graphs from ``load``
        self._next_context = 0
        self._by_name: dict[tuple[str, str], int] = {}
        self._on_call = on_call
        self.last_error: str | None = None  # the host-side reason of the last failed call (tests, logs)
        self.closed = False

    # -- wiring ---------------------------------------------------------------
    def define(self, linker: wasmtime.Linker) -> None:
        """Define every ``wasi_ephemeral_nn`` function on ``linker`` (a linker made for this instance)."""
        for name, nparams in SIGNATURES.items():
            ty = wasmtime.FuncType([I32] * nparams, [I32])
            linker.define_func(MODULE, name, ty, self._entry(name), access_caller=True)

    def _entry(self, name: str) -> Callable[..., int]:
        method: Callable[..., None] = getattr(self, f"_{name}")

        def call(caller: wasmtime.Caller, *args: int) -> int:
            try:
                if self.closed:
                    # The instance is being dropped: nothing may open a context nobody would close.
                    raise NnError(Errno.BUSY, "the instance's WASI-NN host is closed")
                memory = caller.get("memory")
                if not isinstance(memory, wasmtime.Memory):
                    raise NnError(Errno.MISSING_MEMORY, "the module exports no memory named 'memory'")
                method(GuestMemory(memory, caller), *[a & 0xFFFFFFFF for a in args])
                errno = Errno.SUCCESS
            except NnError as exc:
                self.last_error = f"{name}: {exc}"
                log.debug("wasi-nn %s refused: %s", name, exc)
                errno = exc.errno
            except Exception as exc:  # noqa: BLE001 -- a backend's own failure: the guest sees runtime_error, the host goes on
                self.last_error = f"{name}: {type(exc).__name__}: {exc}"
                log.warning("wasi-nn %s failed: %s", name, self.last_error)
                errno = Errno.RUNTIME_ERROR
            if self._on_call is not None:
                self._on_call(name, int(errno))
            return int(errno)

        return call

    # -- handles --------------------------------------------------------------
    def _graph(self, handle: int) -> Graph:
        entry = self._graphs.get(handle)
        if entry is None:
            raise NnError(Errno.INVALID_ARGUMENT, f"no graph with handle {handle}")
        return entry[0]

    def _context(self, handle: int) -> ExecutionContext:
        ctx = self._contexts.get(handle)
        if ctx is None:
            raise NnError(Errno.INVALID_ARGUMENT, f"no execution context with handle {handle}")
        return ctx

    def _add_graph(self, graph: Graph, owned: bool) -> int:
        if len(self._graphs) >= self._limits.max_graphs:
            if owned:
                graph.close()
            raise NnError(Errno.TOO_LARGE, f"more than {self._limits.max_graphs} graphs in one instance")
        handle = self._next_graph
        self._next_graph += 1
        self._graphs[handle] = (graph, owned)
        return handle

    # -- the ABI --------------------------------------------------------------
    def _load(self, mem: GuestMemory, builders_ptr: int, count: int, encoding: int, target: int, out: int) -> None:
        mem.check(out, 4, "graph handle result")
        if count == 0 or count > self._limits.max_builders:
            raise NnError(Errno.INVALID_ARGUMENT, f"{count} graph builders (1..{self._limits.max_builders})")
        raw = mem.read(builders_ptr, BUILDER_STRUCT.size * count, "graph builder array")
        spans = [BUILDER_STRUCT.unpack_from(raw, i * BUILDER_STRUCT.size) for i in range(count)]
        total = sum(length for _, length in spans)
        held = sum(self._owned_bytes.values())
        if total + held > self._limits.max_graph_bytes:
            loaded = f" and {held} loaded already" if held else ""
            raise NnError(Errno.TOO_LARGE, f"graph of {total} bytes{loaded}, more than {self._limits.max_graph_bytes}")
        tgt = _target(target)
        backend = self._registry.get(encoding)
        builders = [mem.read(ptr, length, f"graph builder {i}") for i, (ptr, length) in enumerate(spans)]
        graph = backend.load_bytes(builders, tgt, {})
        handle = self._add_graph(graph, owned=True)
        self._owned_bytes[handle] = total
        mem.write_u32(out, handle, "graph handle result")

    def _load_by_name(self, mem: GuestMemory, name_ptr: int, name_len: int, out: int) -> None:
        self._named_load(mem, name_ptr, name_len, None, out)

    def _load_by_name_with_config(
        self, mem: GuestMemory, name_ptr: int, name_len: int, config_ptr: int, config_len: int, out: int
    ) -> None:
        config = mem.read_str(config_ptr, config_len, "graph config", self._limits.max_config_bytes)
        self._named_load(mem, name_ptr, name_len, config, out)

    def _named_load(self, mem: GuestMemory, name_ptr: int, name_len: int, config_text: str | None, out: int) -> None:
        mem.check(out, 4, "graph handle result")
        name = mem.read_str(name_ptr, name_len, "model name", self._limits.max_name_bytes)
        config: dict[str, Any] = {}
        if config_text:
            try:
                parsed = orjson.loads(config_text)
            except orjson.JSONDecodeError as exc:
                raise NnError(Errno.INVALID_ARGUMENT, f"graph config is not JSON: {exc}") from None
            if not isinstance(parsed, dict):
                raise NnError(Errno.INVALID_ARGUMENT, "graph config must be a JSON object")
            config = parsed
        key = orjson.dumps(config, option=orjson.OPT_SORT_KEYS).decode()
        handle = self._by_name.get((name, key))
        if handle is None:
            handle = self._add_graph(self._named.graph(name, config, key), owned=False)
            self._by_name[(name, key)] = handle
        mem.write_u32(out, handle, "graph handle result")

    def _init_execution_context(self, mem: GuestMemory, graph_handle: int, out: int) -> None:
        mem.check(out, 4, "context handle result")
        graph = self._graph(graph_handle)
        if len(self._contexts) >= self._limits.max_contexts:
            raise NnError(Errno.TOO_LARGE, f"more than {self._limits.max_contexts} execution contexts in one instance")
        ctx = graph.init_execution_context()
        handle = self._next_context
        self._next_context += 1
        self._contexts[handle] = ctx
        self._graph_of_context[handle] = graph
        mem.write_u32(out, handle, "context handle result")

    def _set_input(self, mem: GuestMemory, ctx_handle: int, index: int, tensor_ptr: int) -> None:
        ctx = self._context(ctx_handle)
        dims_ptr, rank, type_code, data_ptr, data_len = TENSOR_STRUCT.unpack(
            mem.read(tensor_ptr, TENSOR_STRUCT.size, "tensor")
        )
        try:
            ttype = TensorType(type_code)
        except ValueError:
            raise NnError(Errno.INVALID_ARGUMENT, f"unknown tensor type {type_code}") from None
        if rank > MAX_RANK:
            raise NnError(Errno.INVALID_ARGUMENT, f"tensor rank {rank}, more than {MAX_RANK}")
        raw_dims = mem.read(dims_ptr, 4 * rank, "tensor dimensions")
        dims = tuple(int.from_bytes(raw_dims[i : i + 4], "little") for i in range(0, 4 * rank, 4))
        if data_len > self._limits.max_tensor_bytes:
            raise NnError(Errno.TOO_LARGE, f"tensor of {data_len} bytes, more than {self._limits.max_tensor_bytes}")
        expected = DTYPES[ttype].itemsize
        for d in dims:
            expected *= d
            if expected > self._limits.max_tensor_bytes:
                raise NnError(Errno.TOO_LARGE, f"tensor dimensions {dims} exceed {self._limits.max_tensor_bytes} bytes")
        # A ggml graph's inputs are bytes (a prompt, JSON options) whose dimensions WasmEdge ignores;
        # the published example apps pass [1] for any length.
        byte_stream = ttype is TensorType.U8 and self._graph_of_context[ctx_handle].backend in BYTE_STREAM_BACKENDS
        if expected != data_len and not byte_stream:
            raise NnError(
                Errno.INVALID_ARGUMENT,
                f"tensor data is {data_len} bytes; dimensions {list(dims)} of {ttype.name.lower()} need {expected}",
            )
        data = mem.read(data_ptr, data_len, "tensor data")
        ctx.set_input(index, Tensor(dims=dims, type=ttype, data=data))

    def _compute(self, mem: GuestMemory, ctx_handle: int) -> None:
        self._context(ctx_handle).compute()

    def _get_output(self, mem: GuestMemory, ctx_handle: int, index: int, out: int, out_max: int, written: int) -> None:
        ctx = self._context(ctx_handle)
        self._copy_out(mem, ctx_handle, ctx.get_output(index), out, out_max, written)

    def _compute_single(self, mem: GuestMemory, ctx_handle: int) -> None:
        self._context(ctx_handle).compute_single()

    def _get_output_single(
        self, mem: GuestMemory, ctx_handle: int, index: int, out: int, out_max: int, written: int
    ) -> None:
        ctx = self._context(ctx_handle)
        self._copy_out(mem, ctx_handle, ctx.get_output_single(index), out, out_max, written)

    def _fini_single(self, mem: GuestMemory, ctx_handle: int) -> None:
        self._context(ctx_handle).fini_single()

    def _copy_out(self, mem: GuestMemory, ctx_handle: int, data: bytes, out: int, out_max: int, written: int) -> None:
        mem.check(written, 4, "bytes-written result")
        mem.check(out, out_max, "output buffer")
        if len(data) > out_max:
            if not self._graph_of_context[ctx_handle].truncates_output:
                raise NnError(Errno.TOO_LARGE, f"output of {len(data)} bytes, buffer of {out_max}")
            mem.write(out, data[:out_max], "output buffer")
        else:
            mem.write(out, data, "output buffer")
        mem.write_u32(written, len(data), "bytes-written result")

    def _unload(self, mem: GuestMemory, graph_handle: int) -> None:
        entry = self._graphs.pop(graph_handle, None)
        if entry is None:
            raise NnError(Errno.INVALID_ARGUMENT, f"no graph with handle {graph_handle}")
        graph, owned = entry
        self._owned_bytes.pop(graph_handle, None)
        self._by_name = {k: h for k, h in self._by_name.items() if h != graph_handle}
        for handle in [h for h, g in self._graph_of_context.items() if g is graph]:
            self._drop_context(handle)
        if owned:
            graph.close()

    def _finalize_execution_context(self, mem: GuestMemory, ctx_handle: int) -> None:
        self._context(ctx_handle)
        self._drop_context(ctx_handle)

    def _drop_context(self, handle: int) -> None:
        ctx = self._contexts.pop(handle, None)
        self._graph_of_context.pop(handle, None)
        if ctx is not None:
            ctx.close()

    # -- lifetime -------------------------------------------------------------
    def close(self) -> None:
        """Release every context and the graphs this instance loaded itself (named graphs are shared)."""
        if self.closed:
            return
        self.closed = True
        for handle in list(self._contexts):
            self._drop_context(handle)
        for graph, owned in self._graphs.values():
            if owned:
                graph.close()
        self._graphs.clear()
        self._owned_bytes.clear()
        self._by_name.clear()


def _target(code: int) -> ExecutionTarget:
    try:
        return ExecutionTarget(code)
    except ValueError:
        raise NnError(Errno.INVALID_ARGUMENT, f"unknown execution target {code}") from None


def imports_nn(module: wasmtime.Module) -> bool:
    return any(imp.module == MODULE for imp in module.imports)
