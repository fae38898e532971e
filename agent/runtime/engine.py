"""The wasm engine: one wasmtime Engine, its epoch clock, and the compiled-module cache.

One :class:`WasmRuntime` serves every model of an agent (and may be shared by
many agents in one process, as the fleet simulator does). Compiling is the
expensive step of a cold start, so compiled code is serialized to disk keyed
by everything that makes it valid — the wasm digest, the wasmtime version and
the engine settings — and a restart maps it back with ``deserialize_file``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import wasmtime

from agent.cas import fsync_dir
from agent.errors import InvalidModel

WASI_MODULE = "wasi_snapshot_preview1"


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
    """

    def __init__(self, cache_dir: Path | None, tick_ms: float = 5.0, opt_level: str = "speed"):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.tick_ms = tick_ms
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.cranelift_opt_level = opt_level
        config.wasm_simd = True
        # Models run a bounded amount of code per call; a small stack catches
        # runaway recursion early and keeps many instances cheap.
        config.max_wasm_stack = 1 << 20
        # Linear memory grows in place inside its reservation and never moves,
        # so instances can keep NumPy views of their I/O buffers.
        config.memory_may_move = False
        self.engine = wasmtime.Engine(config)
        # Every setting that changes generated code belongs in the cache key.
        # "validated": entries are written only for modules that passed load_module's validate.
        self.settings_key = (
            f"wasmtime={wasmtime_version()};opt={opt_level};epoch=1;simd=1;stack=1048576;nomove=1;validated=1"
        )
        self.linker = wasmtime.Linker(self.engine)
        self.linker.define_wasi()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._lock = threading.Lock()
        self.compiled_from_cache = 0
        self.compiled_fresh = 0
        # Mirrors the engine's epoch so instances can tell, for free, whether
        # the deadline they set last is still exact (see ModelInstance.run).
        self.epoch = 0

    # -- epoch clock --------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._ticker is None:
                self._stop.clear()
                self._ticker = threading.Thread(target=self._tick, name="wasm-epoch", daemon=True)
                self._ticker.start()

    def _tick(self) -> None:
        interval = self.tick_ms / 1000.0
        while not self._stop.wait(interval):
            self.engine.increment_epoch()
            self.epoch += 1

    def deadline_ticks(self, timeout_ms: float) -> int:
        # +1: the current tick may be about to end, so never give less than asked.
        return max(1, int(-(-timeout_ms // self.tick_ms)) + 1)

    def close(self) -> None:
        self._stop.set()
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
    ) -> wasmtime.Module:
        """The compiled module, from the disk cache when it holds a valid entry.

        ``validate`` runs on a freshly compiled module before it is cached; a cache
        entry therefore stands for a module that passed it, and a hit skips it
        (checking export types through the Python API costs more than the rest of a
        cold start).
        """
        path = self.cache_path(module_digest)
        if path is not None and path.exists():
            try:
                module = wasmtime.Module.deserialize_file(self.engine, str(path))
                self.compiled_from_cache += 1
                return module
            except wasmtime.WasmtimeError:
                # Truncated or from an incompatible build: recompile below.
                path.unlink(missing_ok=True)
        module = self.compile(wasm)
        if validate is not None:
            validate(module)
        if path is not None:
            self._write_cache(path, module.serialize())
        return module

    def compile(self, wasm: bytes) -> wasmtime.Module:
        try:
            module = wasmtime.Module(self.engine, wasm)
        except wasmtime.WasmtimeError as exc:
            raise InvalidModel(f"module is not valid WebAssembly: {_first_line(exc)}") from exc
        check_imports(module)
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

    def instantiate(self, store: wasmtime.Store, module: wasmtime.Module) -> wasmtime.Instance:
        if any(imp.module == WASI_MODULE for imp in module.imports):
            # No preopens, no env, no args: WASI only for clocks/random/proc_exit.
            store.set_wasi(wasmtime.WasiConfig())
        return self.linker.instantiate(store, module)


def check_imports(module: wasmtime.Module) -> None:
    for imp in module.imports:
        if imp.module != WASI_MODULE:
            raise InvalidModel(f"module imports {imp.module}.{imp.name}; ABI v1 modules may import only {WASI_MODULE}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
