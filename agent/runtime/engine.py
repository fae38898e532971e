"""The wasm engine: one wasmtime Engine, its epoch clock, and the compiled-module cache.

One :class:`WasmRuntime` serves every model of an agent (and may be shared by
many agents in one process, as the fleet simulator does). Compiling is the
expensive step of a cold start, so compiled code is serialized to disk keyed
by everything that makes it valid — the wasm digest, the wasmtime version and
the engine settings — and a restart maps it back with ``deserialize_file``.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import re
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import wasmtime
from wasmtime import _ffi as ffi

from agent.cas import fsync_dir
from agent.errors import InvalidModel
from agent.fsmodes import private_dirs
from agent.wasinn.abi import MODULE as NN_MODULE
from agent.wasmshape import WASI_MODULE

# The ticker calls the C function directly (Engine.increment_epoch re-checks its pointer per
# call), through a PyDLL handle: an atomic add needs no GIL release, and each release costs the
# event loop a hand-over of the GIL. One hand-over per tick is left: the sleep.
_increment_epoch = ctypes.PyDLL(ffi.dll._name)["wasmtime_engine_increment_epoch"]
_increment_epoch.restype = None
_increment_epoch.argtypes = [ctypes.c_void_p]
DISABLED_FEATURES = (
    "wasm_multi_memory",
    "wasm_memory64",
    "wasm_threads",
    "wasm_gc",
    "wasm_function_references",
    "wasm_exceptions",
    "wasm_stack_switching",
    "wasm_component_model",
)


def wasmtime_version() -> str:
    try:
        return importlib.metadata.version("wasmtime")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vendored copies
        return "unknown"


class WasmRuntime:
    """Owns the Engine and its epoch ticker; compiles or loads cached modules.

    Timeouts use epoch interruption: a background thread advances the engine's
    epoch every ``tick_ms``; each call sets a deadline a number of ticks ahead,
    and wasm code that is still running when it passes traps. This costs far
    less per call than fuel metering.

    The tick is fine (1 ms) because a call on the event loop gets a budget of
    a few milliseconds (agent/server/oip.py). Waking a thread a thousand times
    a second costs a few percent of a core, so the ticker only runs while
    wasm runs: every call marks itself in ``active`` (begin_call/end_call:
    list append/pop, atomic under the GIL), and after ``IDLE_AFTER_S`` with no
    call started or in progress the ticker sleeps until a call wakes it. A
    sleeping ticker advances nothing, which is harmless: no deadline is
    running.
    """

    IDLE_AFTER_S = 1.0
    # Compiled modules kept in memory for sharing between versions (each holds its machine code).
    MAX_SHARED_MODULES = 64
    # Safety net: a sleeping ticker looks for calls this often even if no wake-up came.
    IDLE_POLL_S = 0.1

    def __init__(self, cache_dir: Path | None, tick_ms: float = 1.0, opt_level: str = "speed"):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            private_dirs(self.cache_dir)  # 0700: it may lie under the state directory
        self.tick_ms = tick_ms
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.cranelift_opt_level = opt_level
        config.wasm_simd = True
        # Relaxed SIMD gives the kernel library fused multiply-add. Deterministic: every machine
        # computes the same bits (fused, as the spec's deterministic profile says), so a golden
        # output checked on one node holds on all of them.
        config.wasm_relaxed_simd = True
        config.wasm_relaxed_simd_deterministic = True
        # Models run a bounded amount of code per call; a small stack catches
        # runaway recursion early and keeps many instances cheap.
        config.max_wasm_stack = 1 << 20
        # Linear memory grows in place inside its reservation and never moves,
        # so instances can keep NumPy views of their I/O buffers.
        config.memory_may_move = False
        # Proposals whose state escapes the store limits or the ABI (more memories, 64-bit or
        # shared memory, a GC heap, exceptions, components) are off: such modules do not compile.
        for feature in DISABLED_FEATURES:
            setattr(config, feature, False)
        self.engine = wasmtime.Engine(config)
        # Every setting that changes generated code or what validates belongs in the cache key.
        # "validated": entries are written only for modules that passed load_module's validate.
        self.settings_key = (
            f"wasmtime={wasmtime_version()};opt={opt_level};epoch=1;simd=1;relaxed=det;stack=1048576;nomove=1;validated=2;"
            f"off={','.join(DISABLED_FEATURES)}"
        )
        self.linker = wasmtime.Linker(self.engine)
        self.linker.define_wasi()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._lock = threading.Lock()
        self.compiled_from_cache = 0
        self.compiled_fresh = 0
        # Compiled modules by the digest of their wasm, most recently used last: kept a while
        # after the last version using one is gone (a swap back, a reload).
        self._modules: OrderedDict[str, wasmtime.Module] = OrderedDict()
        # Every compiled module some loaded version still uses, however many there are: a digest
        # evicted from the LRU above while in use is still found here, so N versions over one
        # module hold one copy of its code and never compile or deserialize it again.
        self._in_use: weakref.WeakValueDictionary[str, wasmtime.Module] = weakref.WeakValueDictionary()
        # One load per digest at a time: versions loading in parallel wait for the first one's.
        self._loading: dict[str, threading.Lock] = {}
        self.shared_hits = 0
        # Mirrors the engine's epoch so instances can tell, for free, whether
        # the deadline they set last is still exact (see ModelInstance.run).
        self.epoch = 0
        # One entry per wasm call in progress, on any thread (see begin_call).
        self.active: list[None] = []
        # Set by every call, cleared by the ticker: calls a few microseconds long are rarely
        # caught in ``active``, and a ticker that idles between them would be woken by each.
        self.recent = False
        self.ticking = True
        self._wake = threading.Event()
        self._increment = _increment_epoch
        self._engine_ptr = ctypes.cast(self.engine.ptr(), ctypes.c_void_p).value

    # -- epoch clock --------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._ticker is None:
                self._stop.clear()
                self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
                self._ticker.start()

    def wake(self) -> None:
        """A call started while the ticker sleeps: resume ticking (callers check ``ticking`` first)."""
        self._wake.set()

    def begin_call(self) -> None:
        """Wasm is about to run on this thread: the ticker must tick. Pair with :meth:`end_call`."""
        self.active.append(None)
        self.recent = True
        if not self.ticking:
            self._wake.set()

    def end_call(self) -> None:
        self.active.pop()

    def _tick(self) -> None:
        interval = self.tick_ms / 1000.0
        idle_after = max(1, int(self.IDLE_AFTER_S / interval))
        quiet = 0
        stop, active, sleep = self._stop, self.active, time.sleep
        while not stop.is_set():
            if active or self.recent:
                self.recent = False
                quiet = 0
            else:
                quiet += 1
            if quiet > idle_after:
                # Publish "not ticking" before looking at active; a call appends to active
                # before looking at ticking. Under the GIL one of the two sees the other.
                self.ticking = False
                while not active and not stop.is_set():
                    self._wake.wait(self.IDLE_POLL_S)
                    self._wake.clear()
                self.ticking = True
                quiet = 0
                continue  # the first tick after waking is a whole one
            sleep(interval)
            self._increment(self._engine_ptr)
            self.epoch += 1

    def deadline_ticks(self, timeout_ms: float) -> int:
        # +1: the current tick may be about to end, so never give less than asked.
        return max(1, int(-(-timeout_ms // self.tick_ms)) + 1)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.join(timeout=1.0)

    # -- compilation ----------------------------------------------------------
    def cache_path(self, module_digest: str) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(f"{module_digest};{self.settings_key}".encode()).hexdigest()
        return self.cache_dir / f"{key}.cwasm"

    def load_module(
        self,
        wasm: bytes,
        module_digest: str,
        validate: Callable[[wasmtime.Module], None] | None = None,
        *,
        allow_nn: bool = False,
    ) -> wasmtime.Module:
        """The compiled module, from the disk cache when it holds a valid entry.

        ``allow_nn``: the version is a WASI-NN app (model.json's ``wasi_nn``), which may import
        ``wasi_ephemeral_nn`` too (:func:`check_imports`).

        ``validate`` runs on a freshly compiled module before it is cached; a cache
        entry therefore stands for a module that passed it, and a hit skips it
        (checking export types through the Python API costs more than the rest of a
        cold start).
        """
        shared = self.shared_module(module_digest)
        if shared is not None:
            return shared
        with self._lock:
            gate = self._loading.setdefault(module_digest, threading.Lock())
        with gate:
            shared = self.shared_module(module_digest)
            if shared is not None:
                return shared
            try:
                module = self._load_module(wasm, module_digest, validate, allow_nn)
                with self._lock:
                    self._modules[module_digest] = module
                    self._in_use[module_digest] = module
                    while len(self._modules) > self.MAX_SHARED_MODULES:
                        self._modules.popitem(last=False)
            finally:
                with self._lock:
                    self._loading.pop(module_digest, None)
        return module

    def shared_module(self, module_digest: str) -> wasmtime.Module | None:
        """The compiled module already in memory for this digest, if any (no disk, no compile).

        Models built on one kernel library (every converted ONNX model) or copies of one model
        with other weights share its compiled code: loading another such version compiles nothing.
        """
        with self._lock:
            shared = self._modules.get(module_digest)
            if shared is not None:
                self._modules.move_to_end(module_digest)
            else:
                shared = self._in_use.get(module_digest)
            if shared is not None:
                self.shared_hits += 1
            return shared

    def _load_module(
        self,
        wasm: bytes,
        module_digest: str,
        validate: Callable[[wasmtime.Module], None] | None,
        allow_nn: bool,
    ) -> wasmtime.Module:
        path = self.cache_path(module_digest)
        if path is not None and path.exists():
            try:
                module = wasmtime.Module.deserialize_file(self.engine, str(path))
                self.compiled_from_cache += 1
                return module
            except wasmtime.WasmtimeError:
                # Truncated or from an incompatible build: recompile below.
                path.unlink(missing_ok=True)
        module = self.compile(wasm, allow_nn=allow_nn)
        if validate is not None:
            validate(module)
        if path is not None:
            self._write_cache(path, module.serialize())
        return module

    def compile(self, wasm: bytes, *, allow_nn: bool = False) -> wasmtime.Module:
        try:
            module = wasmtime.Module(self.engine, wasm)
        except wasmtime.WasmtimeError as exc:
            raise InvalidModel(f"module is not valid WebAssembly: {error_cause(exc)}") from exc
        check_imports(module, allow_nn=allow_nn)
        self.compiled_fresh += 1
        return module

    def _write_cache(self, path: Path, data: bytes | bytearray) -> None:
        assert self.cache_dir is not None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_dir(self.cache_dir)
        except OSError:
            # A full disk must not stop serving: the module is compiled in memory.
            Path(tmp).unlink(missing_ok=True)

    def instantiate(
        self, store: wasmtime.Store, module: wasmtime.Module, linker: wasmtime.Linker | None = None
    ) -> wasmtime.Instance:
        """``linker``: one made for this instance (a WASI-NN app's, with its own host); else the shared one."""
        if any(imp.module == WASI_MODULE for imp in module.imports):
            # No preopens, no env, no args: WASI only for clocks/random/proc_exit.
            store.set_wasi(wasmtime.WasiConfig())
        self.begin_call()  # a start function is wasm too, under the store's deadline
        try:
            return (linker or self.linker).instantiate(store, module)
        finally:
            self.end_call()


def check_imports(module: wasmtime.Module, *, allow_nn: bool = False) -> None:
    """Only WASI, and ``wasi_ephemeral_nn`` for a WASI-NN app (``allow_nn``); a pure-wasm model importing
    it is refused: its instances get no WASI-NN host."""
    allowed = (WASI_MODULE, NN_MODULE) if allow_nn else (WASI_MODULE,)
    for imp in module.imports:
        if imp.module not in allowed:
            if imp.module == NN_MODULE:
                raise InvalidModel(
                    f"module imports {imp.module}.{imp.name}; only a WASI-NN model (model.json's wasi_nn) may"
                )
            raise InvalidModel(
                f"module imports {imp.module}.{imp.name}; ABI v1 modules may import only {' and '.join(allowed)}"
            )


def error_cause(exc: BaseException) -> str:
    """A wasmtime error in one line: its context, then each cause.

    wasmtime's messages lead with a backtrace and put the reason after
    "Caused by:"; the first line alone ("error while executing at wasm
    backtrace:") says nothing.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if "Caused by:" not in lines:
        return lines[0]
    at = lines.index("Caused by:")
    head = [] if lines[0].endswith("backtrace:") else [lines[0].rstrip(":")]
    causes = [re.sub(r"^\d+:\s*", "", line) for line in lines[at + 1 :]]
    return ": ".join(head + causes)
