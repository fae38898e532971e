"""Running a WASI command app (``_start``) with a WASI-NN host, as ``wasmedge --nn-preload`` does.

:func:`run_command` is the one way in, for ``edge-agent wasi run`` (stdio
inherited) and for serving a command app per request (stdout captured, the
prompt as its last argument). Each run gets its own store, linker and
:class:`~agent.wasinn.host.NnHost`; named models (``--nn-preload``) are the
caller's and are shared, loaded once.

Bounds: the store's linear memory (``memory_limit_bytes``), and optionally fuel
and a wall-clock timeout (epoch interruption). A command has no deadline by
default, like ``wasmedge`` and ``wasmtime run``.
"""

from __future__ import annotations

import os
import tempfile
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import wasmtime

from agent.errors import InvalidModel
from agent.runtime.engine import error_cause
from agent.wasinn import guest_stdout
from agent.wasinn.abi import ENCODING_NAMES, TARGET_NAMES
from agent.wasinn.backend import BackendRegistry, NamedModel, NamedModels
from agent.wasinn.host import NnHost, NnLimits

# A trapped guest (a Rust panic aborts with `unreachable`) exits 128+SIGABRT, as `wasmtime run` reports it.
TRAP_EXIT_CODE = 134
# A run stopped by its timeout.
TIMEOUT_EXIT_CODE = 124
DEFAULT_MEMORY_LIMIT = 4 << 30  # all a wasm32 memory can address
DEFAULT_MAX_CAPTURE = 64 << 20
RELEASE_WAIT_S = 10.0

Stdio = Literal["inherit", "capture", "null"]


@dataclass(frozen=True)
class DirMap:
    """A preopened directory: ``host`` seen by the guest as ``guest``; read-only unless ``writable``."""

    host: Path
    guest: str
    writable: bool = False


def parse_dir(text: str) -> DirMap:
    """``HOST:GUEST[:rw|:ro|:readonly]``, or ``DIR`` (the same path on both sides), as ``--dir`` takes it.

    WasmEdge's own ``--dir .:.`` reads the same either way round.
    """
    writable = False
    body = text
    for suffix, mode in ((":rw", True), (":ro", False), (":readonly", False)):
        if body.endswith(suffix):
            body, writable = body[: -len(suffix)], mode
            break
    host, sep, guest = body.partition(":")
    if not sep:
        guest = host
    if not host or not guest:
        raise ValueError(f"--dir {text!r}: expected HOST:GUEST or DIR")
    return DirMap(host=Path(host), guest=guest, writable=writable)


def parse_preload(text: str) -> NamedModel:
    """``NAME:ENCODING:TARGET:PATH`` (encoding and target in any case, as wasmedge takes them)."""
    parts = text.split(":", 3)
    if len(parts) != 4 or not all(parts):
        raise ValueError(f"--nn-preload {text!r}: expected NAME:ENCODING:TARGET:PATH")
    name, encoding, target, path = parts
    enc = ENCODING_NAMES.get(encoding.lower())
    if enc is None:
        raise ValueError(f"--nn-preload {text!r}: unknown encoding {encoding!r} (one of {', '.join(ENCODING_NAMES)})")
    tgt = TARGET_NAMES.get(target.lower())
    if tgt is None:
        raise ValueError(f"--nn-preload {text!r}: unknown target {target!r} (one of {', '.join(TARGET_NAMES)})")
    # A missing file is not refused here: loading it answers the guest MODEL_NOT_FOUND, as WasmEdge does.
    return NamedModel(name=name, encoding=enc, target=tgt, path=Path(path))


def named_models(registry: BackendRegistry, preloads: Sequence[NamedModel]) -> NamedModels:
    return NamedModels(registry=registry, models={m.name: m for m in preloads})


@dataclass
class CommandResult:
    exit_code: int
    stdout: bytes = b""  # when captured
    stderr: bytes = b""  # when captured
    # Why the guest stopped abnormally (a trap, the timeout, fuel); None after _start returned or proc_exit.
    trap: str | None = None
    timed_out: bool = False
    # The capture exceeded its bound and was cut.
    truncated: bool = False
    # The host-side reason of the last failed WASI-NN call (the guest saw only its errno).
    last_nn_error: str | None = None


@dataclass
class _Capture:
    limit: int
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False

    def write(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        self.data += chunk


def make_engine(*, fuel: bool = False, timeout: bool = False) -> wasmtime.Engine:
    config = wasmtime.Config()
    config.consume_fuel = fuel
    config.epoch_interruption = timeout
    return wasmtime.Engine(config)


def compile_command(engine: wasmtime.Engine, wasm: bytes) -> wasmtime.Module:
    try:
        return wasmtime.Module(engine, wasm)
    except wasmtime.WasmtimeError as exc:
        if not wasm.startswith(b"\0asm"):
            # wasmtime reads anything without the magic as WAT text: its parse error ("expected `(`") misleads.
            raise InvalidModel("not a WebAssembly module: no \\0asm header (and not WAT text either)") from exc
        raise InvalidModel(f"not a valid WebAssembly module: {error_cause(exc)}") from exc


def run_command(
    module: bytes | Path | wasmtime.Module,
    *,
    args: Sequence[str] = (),
    program: str = "app.wasm",
    env: Mapping[str, str] | None = None,
    dirs: Sequence[DirMap] = (),
    named: NamedModels,
    registry: BackendRegistry,
    stdin: bytes | Literal["inherit"] | None = None,
    stdout: Stdio = "capture",
    stderr: Stdio = "capture",
    engine: wasmtime.Engine | None = None,
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT,
    fuel: int | None = None,
    timeout_s: float | None = None,
    epoch_deadline_ticks: int | None = None,
    max_capture_bytes: int = DEFAULT_MAX_CAPTURE,
    nn_limits: NnLimits | None = None,
) -> CommandResult:
    """Run a WASI command app to its end; its exit code is ``proc_exit``'s (0 when ``_start`` returns).

    ``module``: wasm bytes, a file, or a module compiled for ``engine`` (then ``engine`` is required).
    ``args`` follow ``program`` (argv[0]). ``stdin``: bytes, "inherit", or None (empty).
    ``stdout``/``stderr``: "inherit" (this process's), "capture" (returned, at most
    ``max_capture_bytes`` each), or "null". The ggml backend's ``stream-stdout`` writes go to the
    same stdout, in order. ``fuel`` and ``timeout_s`` need an engine made with them (the default
    engine is, when they are given); ``epoch_deadline_ticks`` is for a caller's engine that already
    has epoch interruption and its own ticker.
    """
    if isinstance(module, wasmtime.Module):
        if engine is None:
            raise ValueError("a compiled module needs the engine it was compiled for")
        compiled = module
    else:
        if engine is None:
            engine = make_engine(fuel=fuel is not None, timeout=timeout_s is not None)
        wasm = module.read_bytes() if isinstance(module, Path) else module
        compiled = compile_command(engine, wasm)

    store = wasmtime.Store(engine)
    store.set_limits(memory_size=memory_limit_bytes)
    if fuel is not None:
        store.set_fuel(fuel)
    if epoch_deadline_ticks is not None:
        store.set_epoch_deadline(epoch_deadline_ticks)
    elif timeout_s is not None:
        store.set_epoch_deadline(1)

    wasi = wasmtime.WasiConfig()
    wasi.argv = [program, *args]
    if env:
        wasi.env = list(env.items())
    for d in dirs:
        if not d.host.is_dir():
            raise FileNotFoundError(f"--dir {d.host}: no such directory")
        wasi.preopen_dir(str(d.host), d.guest, d.writable)
    stdin_file: str | None = None
    if stdin == "inherit":
        wasi.inherit_stdin()
    elif stdin is not None:
        fd, stdin_file = tempfile.mkstemp(prefix="edge-agent-stdin-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(stdin)
        wasi.stdin_file = stdin_file
    out = _Capture(max_capture_bytes)
    err = _Capture(max_capture_bytes)
    released: list[threading.Event] = []
    sink = _configure_stdout(wasi, stdout, out, released)
    _configure_stderr(wasi, stderr, err, released)
    store.set_wasi(wasi)

    host = NnHost(registry=registry, named=named, limits=nn_limits)
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    host.define(linker)

    timer: threading.Timer | None = None
    if timeout_s is not None and epoch_deadline_ticks is None:
        timer = threading.Timer(timeout_s, engine.increment_epoch)
        timer.daemon = True
    result = CommandResult(exit_code=0)
    try:
        with guest_stdout.guest_stdout(sink):
            if timer is not None:
                timer.start()
            try:
                instance = linker.instantiate(store, compiled)
                start = instance.exports(store).get("_start")
                if not isinstance(start, wasmtime.Func):
                    raise InvalidModel("the module exports no _start function: not a WASI command")
                start(store)
            except wasmtime.ExitTrap as exc:
                result.exit_code = exc.code
            except wasmtime.Trap as exc:
                result.trap = _reason(exc)
                if exc.trap_code is wasmtime.TrapCode.INTERRUPT:
                    result.timed_out = True
                    result.exit_code = TIMEOUT_EXIT_CODE
                else:
                    result.exit_code = TRAP_EXIT_CODE
            except wasmtime.WasmtimeError as exc:
                # Instantiation failures (an import no host defines) and traps wasmtime reports as errors.
                text = str(exc)
                if "unknown import" in text or "incompatible import" in text:
                    raise InvalidModel(f"cannot instantiate: {_reason(exc)}") from exc
                result.trap = _reason(exc)
                result.exit_code = TRAP_EXIT_CODE
    finally:
        if timer is not None:
            timer.cancel()
        result.last_nn_error = host.last_error
        host.close()
        # Drop the store (and its WASI context with the capture callbacks) now, on this thread: left
        # to the garbage collector, wasmtime may release the callbacks on one of its own threads
        # while the interpreter is exiting, and a Python callback then cannot run.
        linker.close()
        store.close()
        # wasmtime releases a custom output callback on a thread of its own, soon after the store
        # goes; a Python callback released while the interpreter exits aborts the process. Wait
        # (bounded: a hang guard) until ours are released, while this interpreter surely runs.
        for event in released:
            event.wait(RELEASE_WAIT_S)
        if stdin_file is not None:
            os.unlink(stdin_file)
    result.stdout = bytes(out.data)
    result.stderr = bytes(err.data)
    result.truncated = out.truncated or err.truncated
    return result


class _Writer:
    """The callable wasmtime holds for a captured stream; ``released`` is set when wasmtime lets it go."""

    def __init__(self, capture: _Capture, released: list[threading.Event]):
        self._capture = capture
        event = threading.Event()
        weakref.finalize(self, event.set)
        released.append(event)

    def __call__(self, data: bytes) -> None:
        self._capture.write(data)


def _configure_stdout(
    wasi: wasmtime.WasiConfig, mode: Stdio, capture: _Capture, released: list[threading.Event]
) -> guest_stdout.Sink:
    """Set stdout's mode on ``wasi``; returns where a backend's writes "to stdout" go (None: fd 1)."""
    if mode == "inherit":
        wasi.inherit_stdout()
        return None
    if mode == "capture":
        wasi.stdout_custom = _Writer(capture, released)
        return capture.write
    # "null": wasmtime discards an unconfigured stream's writes; so does the sink.
    return _discard


def _configure_stderr(
    wasi: wasmtime.WasiConfig, mode: Stdio, capture: _Capture, released: list[threading.Event]
) -> None:
    if mode == "inherit":
        wasi.inherit_stderr()
    elif mode == "capture":
        wasi.stderr_custom = _Writer(capture, released)


def _reason(exc: Exception) -> str:
    """wasmtime's message leads with a backtrace; the reason is its last line ("wasm trap: ...")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _discard(data: bytes) -> None:
    return None
