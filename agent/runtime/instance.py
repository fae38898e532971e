"""One instantiated model: a wasmtime Store, its instance, and the ABI v1 calls.

The per-request path calls ``ea_run`` through wasmtime's C API
(``wasmtime_func_call_unchecked``) with a preallocated argument buffer and
copies tensors with ``memmove``/``string_at``. ``Func.__call__`` re-reads the
function type and converts every value on each call, which costs several
times the digits model's whole inference; the types are checked once here at
instantiation instead, which is what makes the unchecked call safe.
"""

from __future__ import annotations

import ctypes
import struct
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import wasmtime
from wasmtime import _ffi as ffi

from agent.errors import DeadlineOverrun, InferenceTimeout, InvalidModel, ModelError
from agent.runtime.engine import WasmRuntime, error_cause
from agent.runtime.footprint import StoreLimits
from agent.spec import ModelSpec, TensorSpec

if TYPE_CHECKING:
    from agent.runtime.nn import NnVersion
    from agent.wasinn.host import NnHost

ABI_FUNCS: dict[str, tuple[int, int]] = {  # name -> (params, results), all i32
    "ea_abi_version": (0, 1),
    "ea_max_batch": (0, 1),
    "ea_alloc": (1, 1),
    "ea_init": (2, 1),
    "ea_input": (1, 1),
    "ea_output": (1, 1),
    "ea_run": (1, 1),
}
STATUS_TEXT = {
    -1: "batch out of range",
    -2: "parameters do not match",
    -3: "out of memory",
    -4: "input refused by the model",
    -5: "not initialised",
    -6: "internal error",
}

# dll["name"] makes a private function pointer; dll.name would return the one the wasmtime
# package itself uses, and changing its restype would break wasmtime everywhere else.
_call_unchecked = ffi.dll["wasmtime_func_call_unchecked"]
_call_unchecked.restype = ctypes.c_void_p
_call_unchecked.argtypes = [
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.POINTER(ctypes.c_void_p),
]
_memory_data = ffi.dll["wasmtime_memory_data"]
_memory_data.restype = ctypes.c_void_p
_memory_data.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_memory_size = ffi.dll["wasmtime_memory_data_size"]
_memory_size.restype = ctypes.c_size_t
_memory_size.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_export_get = ffi.dll["wasmtime_instance_export_get"]
_export_get.restype = ctypes.c_bool
_export_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p]
_EXTERN_FUNC, _EXTERN_MEMORY = 0, 3  # wasmtime_extern_kind_t
_set_deadline = ffi.dll["wasmtime_context_set_epoch_deadline"]
_set_deadline.restype = None
_set_deadline.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
# ModelInstance.run(ticks=KEEP_DEADLINE): the later chunks of one request share its deadline.
KEEP_DEADLINE = 0


class ModelInstance:
    """Not thread-safe: the pool hands each instance to one caller at a time."""

    def __init__(
        self,
        runtime: WasmRuntime,
        module: wasmtime.Module,
        spec: ModelSpec,
        params: Mapping[str, np.ndarray],
        memory_limit_bytes: int,
        timeout_ms: float,
        *,
        exports_checked: bool = False,
        nn: NnVersion | None = None,
    ):
        """``exports_checked``: the caller ran :func:`check_exports` on ``module`` (a pool does, once).
        ``nn``: the version is a WASI-NN app; this instance gets its own host, closed with it."""
        if not exports_checked:
            check_exports(module, spec)
        self.spec = spec
        self._close_nn: weakref.finalize | None = None
        if nn is None:
            self._setup(runtime, module, spec, params, memory_limit_bytes, timeout_ms, None, None)
            return
        linker, host = nn.linker(runtime.engine)
        # The host goes when the instance does: closed by close() (eviction, the reaper, an unload),
        # else when the instance is collected (a failed one a caller dropped).
        self._close_nn = weakref.finalize(self, nn.close_host, host)
        self._close_nn.atexit = False  # at interpreter exit the backends may be half torn down
        try:
            self._setup(runtime, module, spec, params, memory_limit_bytes, timeout_ms, linker, host)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release what lives outside the Store (a WASI-NN host's contexts); the Store goes with the object."""
        if self._close_nn is not None:
            self._close_nn()

    def _setup(
        self,
        runtime: WasmRuntime,
        module: wasmtime.Module,
        spec: ModelSpec,
        params: Mapping[str, np.ndarray],
        memory_limit_bytes: int,
        timeout_ms: float,
        linker: wasmtime.Linker | None,
        host: NnHost | None,
    ) -> None:
        self._host = host
        self.runtime = runtime
        self.timeout_ms = timeout_ms
        # time.monotonic() when its pool last got it back: the budget evicts, the reaper drops, the oldest.
        self.last_used = 0.0
        self.store = wasmtime.Store(runtime.engine)
        # The cap covers the instance: its one memory and its table (footprint.StoreLimits).
        StoreLimits.for_cap(memory_limit_bytes).apply(self.store)
        self._ticks = runtime.deadline_ticks(timeout_ms)
        self.store.set_epoch_deadline(self._ticks)
        try:
            instance = runtime.instantiate(self.store, module, linker)
        except wasmtime.Trap as exc:
            raise ModelError(f"{spec.name}:{spec.version}: trap while instantiating: {trap_reason(exc)}") from exc
        except wasmtime.ExitTrap as exc:
            raise ModelError(f"{spec.name}:{spec.version}: while instantiating, {exit_reason(exc.code)}") from exc
        except wasmtime.WasmtimeError as exc:
            raise InvalidModel(f"{spec.name}:{spec.version}: cannot instantiate: {error_cause(exc)}") from exc
        self._ctx = ctypes.cast(self.store._context(), ctypes.c_void_p).value
        # Exports are looked up through the C API by name: the Python wrapper would build
        # a typed object for every export, a third of a cold start for a small model.
        instance_ref = ctypes.addressof(instance._instance)
        self._externs: dict[str, Any] = {}
        for name, kind in (("memory", _EXTERN_MEMORY), *((f, _EXTERN_FUNC) for f in ABI_FUNCS)):
            ext = ffi.wasmtime_extern_t()
            raw_name = name.encode()
            # wasmtime annotates the field as its ctypes type; reading a Structure field yields an int.
            found = _export_get(self._ctx, instance_ref, raw_name, len(raw_name), ctypes.byref(ext))
            if not found or ext.kind != kind:  # type: ignore[comparison-overlap]
                what = "its memory as 'memory'" if kind == _EXTERN_MEMORY else f"function {name}"
                raise InvalidModel(f"{spec.name}:{spec.version}: module does not export {what}")
            self._externs[name] = ext
        self._instance = instance
        self._mem_ref = ctypes.addressof(self._externs["memory"].of.memory)
        self._refs = {name: ctypes.addressof(self._externs[name].of.func) for name in ABI_FUNCS}

        self._keepalive: list[object] = []
        self._deadline_epoch = -1
        self._deadline_ticks = self._ticks
        self._run_ref = self._refs["ea_run"]
        # Two wasmtime_val_raw_t slots (16 bytes each: the union holds a v128): the most any
        # ABI function takes (ea_init) or returns.
        self._raw = (ctypes.c_uint64 * 4)()
        self._raw_ptr = ctypes.addressof(self._raw)
        self._trap = ctypes.c_void_p()
        self._trap_ref = ctypes.byref(self._trap)

        abi = self._call("ea_abi_version")
        if abi != spec.abi_version:
            raise InvalidModel(
                f"{spec.name}:{spec.version}: module reports ABI version {abi}, model.json says {spec.abi_version}"
            )
        # ABI v1 modules know their batch bound before ea_init; an ABI v2 module learns it
        # from its parameters (a plan-driven module shared by many models), so it is read after.
        if spec.abi_version == 1:
            self._check_max_batch()
        self._load_params(params)
        if spec.abi_version != 1:
            self._check_max_batch()
        base = self._base()
        self._inputs = [self._view(base, "ea_input", i, t) for i, t in enumerate(spec.inputs)]
        self._outputs = [self._view(base, "ea_output", i, t) for i, t in enumerate(spec.outputs)]

    # -- set-up (slow path, checked calls) -----------------------------------
    def _check_max_batch(self) -> None:
        max_batch = self._call("ea_max_batch")
        if max_batch != self.spec.max_batch:
            raise InvalidModel(
                f"{self.spec.name}:{self.spec.version}: module max batch {max_batch} differs from model.json "
                f"{self.spec.max_batch}"
            )

    def _call(self, name: str, *args: int) -> int:
        """Calls an ABI function through the unchecked entry point (types were checked up front)."""
        _set_deadline(self._ctx, self._ticks)
        self._deadline_epoch = -1
        self._deadline_ticks = self._ticks
        for i, arg in enumerate(args):
            self._raw[2 * i] = arg & 0xFFFFFFFF
        self.runtime.begin_call()
        error = _call_unchecked(self._ctx, self._refs[name], self._raw_ptr, 2, self._trap_ref)
        self.runtime.end_call()
        if error or self._trap.value:
            try:
                self._raise_failure(error)
            except ModelError as exc:
                raise ModelError(f"{self.spec.name}:{self.spec.version}: in {name}: {exc}") from exc
        return ctypes.c_int32(self._raw[0] & 0xFFFFFFFF).value

    def _load_params(self, params: Mapping[str, np.ndarray]) -> None:
        table = bytearray()
        for pspec in self.spec.params:
            array = np.ascontiguousarray(params[pspec.name])
            nbytes = array.nbytes
            ptr = self._call("ea_alloc", nbytes) if nbytes else 0
            if nbytes and ptr == 0:
                raise ModelError(
                    f"{self.spec.name}:{self.spec.version}: ea_alloc({nbytes}) failed for {pspec.name}: "
                    "memory limit too low?"
                )
            if nbytes:
                self._check_range(ptr, nbytes, f"parameter {pspec.name}")
                ctypes.memmove(self._base() + ptr, array.ctypes.data, nbytes)
            table += struct.pack("<II", ptr, nbytes)
        count = len(self.spec.params)
        table_ptr = 0
        if count:
            table_ptr = self._call("ea_alloc", len(table))
            if table_ptr == 0:
                raise ModelError(f"{self.spec.name}:{self.spec.version}: ea_alloc failed for the parameter table")
            self._check_range(table_ptr, len(table), "parameter table")
            ctypes.memmove(self._base() + table_ptr, bytes(table), len(table))
        status = self._call("ea_init", table_ptr, count)
        if status != 0:
            raise InvalidModel(
                f"{self.spec.name}:{self.spec.version}: ea_init failed with {status} "
                f"({STATUS_TEXT.get(status, 'unknown status')}){self._nn_reason()}"
            )

    def _view(self, base: int, func: str, index: int, tspec: TensorSpec) -> np.ndarray:
        """A NumPy view of an I/O buffer inside linear memory (max_batch rows)."""
        ptr = self._call(func, index) & 0xFFFFFFFF
        if ptr == 0:
            raise InvalidModel(f"{self.spec.name}:{self.spec.version}: {func}({index}) returned no buffer")
        nbytes = tspec.row_bytes * self.spec.max_batch
        # Checked once: memory never shrinks nor moves (memory_may_move is off),
        # so the view stays valid for the instance's life.
        self._check_range(ptr, nbytes, f"{func}({index}) buffer")
        raw = (ctypes.c_uint8 * nbytes).from_address(base + ptr)
        # numpy's stubs list a few buffer types; frombuffer takes any buffer, a ctypes array included.
        view = np.frombuffer(raw, dtype=tspec.dtype).reshape(  # type: ignore[call-overload]
            (self.spec.max_batch, *tspec.row_shape)
        )
        self._keepalive.append(raw)
        return view

    def _check_range(self, ptr: int, nbytes: int, what: str) -> None:
        size = _memory_size(self._ctx, self._mem_ref)
        if ptr < 0 or ptr + nbytes > size:
            raise InvalidModel(
                f"{self.spec.name}:{self.spec.version}: {what} at {ptr}+{nbytes} lies outside memory ({size} bytes)"
            )

    def _base(self) -> int:
        return _memory_data(self._ctx, self._mem_ref)

    # -- per request (fast path) ---------------------------------------------
    def run(self, inputs: list[np.ndarray], batch: int, ticks: int | None = None) -> list[np.ndarray]:
        """Run ``batch`` rows (``1..max_batch``) of inputs given in spec order; returns copies.

        ``ticks``: the deadline, in epoch ticks from now (default: the instance's
        timeout); ``KEEP_DEADLINE`` keeps the one the previous call set.
        """
        for view, array in zip(self._inputs, inputs, strict=True):
            view[:batch] = array
        self._raw[0] = batch
        if ticks is None:
            ticks = self._ticks
        if ticks != KEEP_DEADLINE:
            epoch = self.runtime.epoch
            if epoch != self._deadline_epoch or ticks != self._deadline_ticks:
                # The deadline is "ticks after the epoch when set": while the epoch
                # has not moved, the one set last is still exactly right.
                _set_deadline(self._ctx, ticks)
                self._deadline_epoch = epoch
                self._deadline_ticks = ticks
        runtime = self.runtime
        active = runtime.active
        active.append(None)  # keeps the epoch ticker going (WasmRuntime.begin_call, inlined)
        runtime.recent = True
        if not runtime.ticking:
            runtime.wake()
        error = _call_unchecked(self._ctx, self._run_ref, self._raw_ptr, 1, self._trap_ref)
        active.pop()
        if error or self._trap.value:
            self._raise_failure(error)
        status = self._raw[0] & 0xFFFFFFFF
        if status != 0:
            status -= 1 << 32
            raise ModelError(
                f"{self.spec.name}:{self.spec.version}: ea_run returned {status} "
                f"({STATUS_TEXT.get(status, 'unknown status')}){self._nn_reason()}"
            )
        return [view[:batch].copy() for view in self._outputs]

    def _nn_reason(self) -> str:
        """A WASI-NN app's failed status: the host's reason for the call that failed, if any."""
        host = self._host
        if host is None or host.last_error is None:
            return ""
        reason, host.last_error = host.last_error, None
        return f"; wasi-nn {reason}"

    def _raise_failure(self, error: int | None) -> None:
        name = f"{self.spec.name}:{self.spec.version}"
        if self._trap.value:
            trap = wasmtime.Trap._from_ptr(ctypes.cast(self._trap.value, ctypes.POINTER(ffi.wasm_trap_t)))
            self._trap.value = None
            code = trap.trap_code
            if code == wasmtime.TrapCode.INTERRUPT:
                if self._deadline_ticks != self._ticks:
                    # A shorter deadline the caller chose (the event loop's budget), not the timeout.
                    raise DeadlineOverrun(f"{name}: call overran its budget of {self._deadline_ticks} epoch ticks")
                raise InferenceTimeout(f"{name}: inference exceeded its {self.timeout_ms:g} ms deadline")
            raise ModelError(f"{name}: wasm trap: {trap_reason(trap)}")
        assert error is not None  # called only after a trap (handled above) or an error
        err = wasmtime.WasmtimeError._from_ptr(ctypes.cast(error, ctypes.POINTER(ffi.wasmtime_error_t)))
        if isinstance(err, wasmtime.ExitTrap):
            raise ModelError(f"{name}: {exit_reason(err.code)}")
        raise ModelError(f"{name}: wasmtime error: {error_cause(err)}")


def check_exports(module: wasmtime.Module, spec: ModelSpec) -> None:
    """The ABI v1 functions exist with their i32-only signatures (read from the module, no instance)."""
    types = {export.name: export.type for export in module.exports}
    for name, (nparams, nresults) in ABI_FUNCS.items():
        ftype = types.get(name)
        if not isinstance(ftype, wasmtime.FuncType):
            raise InvalidModel(f"{spec.name}:{spec.version}: module does not export function {name}")
        params = [str(t) for t in ftype.params]
        results = [str(t) for t in ftype.results]
        if params != ["i32"] * nparams or results != ["i32"] * nresults:
            raise InvalidModel(
                f"{spec.name}:{spec.version}: {name} has type {signature(params, results)}, "
                f"ABI v1 wants {signature(['i32'] * nparams, ['i32'] * nresults)}"
            )
    if not isinstance(types.get("memory"), wasmtime.MemoryType):
        raise InvalidModel(f"{spec.name}:{spec.version}: module does not export its memory as 'memory'")


def signature(params: list[str], results: list[str]) -> str:
    """A function type as WAT-minded people read it: ``(i32, f32) -> i32``."""
    result = results[0] if len(results) == 1 else f"({', '.join(results)})"
    return f"({', '.join(params)}) -> {result}"


def exit_reason(code: int) -> str:
    return f"the module called WASI proc_exit with exit code {code}"


def trap_reason(trap: wasmtime.Trap) -> str:
    """The cause of a trap in a few words (wasmtime's message leads with a backtrace)."""
    code = trap.trap_code
    if code is not None:
        return code.name.lower().replace("_", " ")
    lines = [line.strip() for line in trap.message.splitlines() if line.strip()]
    return lines[-1] if lines else "unknown trap"
