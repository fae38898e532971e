"""The wasi_ephemeral_nn host (agent/wasinn/host.py) against C guests (native/wasinn) making hostile calls.

Each hostile call gets the spec's errno (agent/wasinn/abi.py), the host's
``last_error`` names the cause, and the same instance, on the same host, then
classifies correctly: the host keeps serving. Handles are per instance, and
``close`` releases what an instance held.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from wasinn_kit import (
    CLASSIFY_CMD,
    HOSTILE,
    HOSTILE_ROW,
    REACTOR_4_TO_3,
    WASINN_DATA,
    NnApps,
    cnn_4_to_3,
    cnn_8x8,
)

from agent.wasinn.abi import Errno
from agent.wasinn.backend import NamedModels
from agent.wasinn.backends.onnx import OnnxContext, OnnxGraph
from agent.wasinn.host import NnHost

E = Errno
NATIVE = Path(__file__).resolve().parent.parent / "native"
FAR = 0xFFFFFF00  # hostile.c's out-of-memory address

# case -> (the host call that fails, its errno, what last_error says)
CASES: dict[str, tuple[str, Errno, str]] = {
    "bad-graph": ("init_execution_context", E.INVALID_ARGUMENT, "no graph with handle 57005"),
    "bad-context": ("set_input", E.INVALID_ARGUMENT, "no execution context with handle 48879"),
    "bad-context-compute": ("compute", E.INVALID_ARGUMENT, "no execution context with handle 48879"),
    "bad-context-output": ("get_output", E.INVALID_ARGUMENT, "no execution context with handle 48879"),
    "oob-tensor": ("set_input", E.INVALID_ARGUMENT, f"tensor at {FAR}+20 lies outside guest memory"),
    "oob-dims": ("set_input", E.INVALID_ARGUMENT, f"tensor dimensions at {FAR}+8 lies outside guest memory"),
    "oob-data": ("set_input", E.INVALID_ARGUMENT, f"tensor data at {FAR}+16 lies outside guest memory"),
    "size-mismatch": ("set_input", E.INVALID_ARGUMENT, "tensor data is 12 bytes; dimensions [1, 4] of f32 need 16"),
    "unknown-type": ("set_input", E.INVALID_ARGUMENT, "unknown tensor type 17"),
    "wrong-type": ("set_input", E.INVALID_ARGUMENT, "input 0 (x) is f32, got i32"),
    "bad-input-index": ("set_input", E.INVALID_ARGUMENT, "input index 7; the graph has 1 inputs"),
    "rank-too-large": ("set_input", E.INVALID_ARGUMENT, "tensor rank 9, more than 8"),
    "huge-rank": ("set_input", E.INVALID_ARGUMENT, "tensor rank 1073741824, more than 8"),
    "huge-dims": ("set_input", E.TOO_LARGE, "tensor dimensions (65536, 65536, 4) exceed"),
    "wrong-shape": ("compute", E.RUNTIME_ERROR, "onnxruntime:"),
    "compute-before-input": ("compute", E.INVALID_ARGUMENT, "inputs [0] not set before compute"),
    "output-before-compute": ("get_output", E.INVALID_ARGUMENT, "get_output before compute"),
    "oob-output": ("get_output", E.INVALID_ARGUMENT, f"output buffer at {FAR}+1024 lies outside guest memory"),
    "oob-written": ("get_output", E.INVALID_ARGUMENT, f"bytes-written result at {FAR}+4 lies outside"),
    "small-output": ("get_output", E.TOO_LARGE, "output of 12 bytes, buffer of 4"),
    "bad-output-index": ("get_output", E.INVALID_ARGUMENT, "output index 5; the graph has 1 outputs"),
    "unknown-encoding": ("load", E.INVALID_ENCODING, "unknown graph encoding 99"),
    "unknown-target": ("load", E.INVALID_ARGUMENT, "unknown execution target 9"),
    "garbage-model": ("load", E.INVALID_ARGUMENT, "onnxruntime cannot load the model"),
    "huge-builder": ("load", E.TOO_LARGE, f"graph of {FAR} bytes, more than {1 << 30}"),
    "oob-builder": ("load", E.INVALID_ARGUMENT, f"graph builder 0 at {FAR}+128 lies outside guest memory"),
    "oob-builder-array": ("load", E.INVALID_ARGUMENT, f"graph builder array at {FAR}+8 lies outside guest memory"),
    "many-builders": ("load", E.INVALID_ARGUMENT, "100000 graph builders (1..16)"),
    "no-builders": ("load", E.INVALID_ARGUMENT, "0 graph builders (1..16)"),
    "unknown-model": ("load_by_name", E.MODEL_NOT_FOUND, "no model named 'no-such-model' is preloaded"),
    "oob-name": ("load_by_name", E.INVALID_ARGUMENT, f"model name at {FAR}+200 lies outside guest memory"),
    "long-name": ("load_by_name", E.INVALID_ARGUMENT, "model name is 8192 bytes, more than 4096"),
    "oob-graph-result": ("load_by_name", E.INVALID_ARGUMENT, f"graph handle result at {FAR}+4 lies outside"),
    "bad-config": ("load_by_name_with_config", E.INVALID_ARGUMENT, "graph config is not JSON"),
    "compute-single": ("compute_single", E.UNSUPPORTED_OPERATION, "compute_single is a ggml-backend call"),
    "double-finalize": ("finalize_execution_context", E.INVALID_ARGUMENT, "no execution context with handle"),
    "use-after-finalize": ("compute", E.INVALID_ARGUMENT, "no execution context with handle"),
    "unload-twice": ("unload", E.INVALID_ARGUMENT, "no graph with handle 0"),
    "many-contexts": ("init_execution_context", E.TOO_LARGE, "more than 256 execution contexts in one instance"),
}


@pytest.fixture(scope="module")
def apps() -> NnApps:
    return NnApps()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wasinn-models")
    return {"default": cnn_4_to_3(root / "cnn_4_to_3.onnx"), "cnn": cnn_8x8(root / "cnn_8x8.onnx")}


@pytest.fixture(scope="module")
def named(apps: NnApps, models: dict[str, Path]) -> Iterator[NamedModels]:
    named = apps.named(models)
    yield named
    named.close()


@pytest.fixture(scope="module")
def expected(models: dict[str, Path]) -> np.ndarray:
    """What onnxruntime itself answers for hostile.wasm's row."""
    session = ort.InferenceSession(str(models["default"]), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {"x": HOSTILE_ROW})[0]
    return out[0]


class Calls:
    """The errno of every host call, as the host returned it (NnHost's on_call hook)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def __call__(self, name: str, errno: int) -> None:
        self.seen.append((name, errno))

    def failures(self) -> list[tuple[str, int]]:
        return [(name, errno) for name, errno in self.seen if errno != 0]


def test_every_hostile_case_of_the_app_is_checked(apps: NnApps, named: NamedModels) -> None:
    run = apps.run(HOSTILE, ["no-such-case"], host=apps.host(named))
    run.host.close()
    assert run.exit_code == 1
    listed = set(run.stderr.split("cases:", 1)[1].split())
    # The two foreign-* cases take a handle and are checked across instances below.
    assert listed - {"foreign-graph", "foreign-context"} == set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_call_gets_its_errno_and_the_host_keeps_serving(
    apps: NnApps, named: NamedModels, expected: np.ndarray, case: str
) -> None:
    call, errno, reason = CASES[case]
    calls = Calls()
    host = NnHost(registry=apps.registry, named=named, on_call=calls)
    try:
        run = apps.run(HOSTILE, [case], host=host)
        assert run.exit_code == 0, run.stdout + run.stderr
        first, *rest = run.stdout.splitlines()
        # The guest saw the errno the host returned, and that was the only refusal.
        assert first == f"errno {int(errno)}"
        assert calls.failures() == [(call, int(errno))]
        assert host.last_error is not None
        assert host.last_error.startswith(f"{call}: ")
        assert reason in host.last_error
        # Then the same instance classified through the same host, bit for bit what onnxruntime answers.
        served = np.array([float(x) for x in rest], dtype=np.float64).astype(np.float32)
        assert np.array_equal(served, expected)
    finally:
        host.close()


def test_a_graph_handle_means_nothing_to_another_instance(apps: NnApps, named: NamedModels, tmp_path: Path) -> None:
    (tmp_path / "row.bin").write_bytes(HOSTILE_ROW.tobytes())
    host_a = apps.host(named)
    host_b = apps.host(named)
    try:
        run = apps.run(CLASSIFY_CMD, ["default", "/data/row.bin"], host=host_a, preopens={"/data": tmp_path})
        assert run.exit_code == 0, run.stderr
        # A holds graph 0 and context 0 now; on its host they are live handles ...
        assert apps.run(HOSTILE, ["foreign-graph", "0"], host=host_a).stdout.splitlines()[0] == "errno 0"
        # ... which another instance, on its own host, cannot name.
        run_b = apps.run(HOSTILE, ["foreign-graph", "0"], host=host_b)
        assert run_b.stdout.splitlines()[0] == f"errno {int(E.INVALID_ARGUMENT)}"
        assert run_b.host.last_error == "init_execution_context: no graph with handle 0"
        host_c = apps.host(named)
        try:
            run_c = apps.run(HOSTILE, ["foreign-context", "0"], host=host_c)
            assert run_c.stdout.splitlines()[0] == f"errno {int(E.INVALID_ARGUMENT)}"
            assert host_c.last_error == "compute: no execution context with handle 0"
        finally:
            host_c.close()
    finally:
        host_a.close()
        host_b.close()


def test_close_releases_contexts_and_own_graphs_not_shared_ones(
    apps: NnApps, named: NamedModels, models: dict[str, Path], tmp_path: Path, expected: np.ndarray
) -> None:
    (tmp_path / "row.bin").write_bytes(HOSTILE_ROW.tobytes())
    host = apps.host(named)
    # A named graph (shared) and one loaded from the guest's own bytes (this instance's).
    assert apps.run(CLASSIFY_CMD, ["default", "/data/row.bin"], host=host, preopens={"/data": tmp_path}).exit_code == 0
    (tmp_path / "own.onnx").write_bytes(models["default"].read_bytes())
    run = apps.run(
        CLASSIFY_CMD, ["--load", "/data/own.onnx", "own", "/data/row.bin"], host=host, preopens={"/data": tmp_path}
    )
    assert run.exit_code == 0, run.stderr
    assert np.array_equal(run.floats(), expected)
    contexts = list(host._contexts.values())
    graphs = [(graph, owned) for graph, owned in host._graphs.values()]
    assert len(contexts) == 2 and sorted(owned for _, owned in graphs) == [False, True]

    host.close()
    assert host.closed and host._contexts == {} and host._graphs == {}
    for ctx in contexts:  # an OnnxContext's close drops its inputs and outputs
        assert isinstance(ctx, OnnxContext)
        assert ctx._outputs is None and ctx._inputs == {}
    own = next(graph for graph, owned in graphs if owned)
    shared = next(graph for graph, owned in graphs if not owned)
    assert isinstance(own, OnnxGraph) and isinstance(shared, OnnxGraph)
    assert own.inputs == []  # OnnxGraph.close
    assert shared.inputs != []
    host.close()  # idempotent

    # The shared graph still serves the next instance.
    again = apps.host(named)
    try:
        run = apps.run(CLASSIFY_CMD, ["default", "/data/row.bin"], host=again, preopens={"/data": tmp_path})
        assert run.exit_code == 0 and np.array_equal(run.floats(), expected)
    finally:
        again.close()


def test_command_app_reports_a_failed_call_with_its_errno(apps: NnApps, named: NamedModels, tmp_path: Path) -> None:
    (tmp_path / "row.bin").write_bytes(HOSTILE_ROW.tobytes())
    host = apps.host(named)
    try:
        run = apps.run(CLASSIFY_CMD, ["nope", "/data/row.bin"], host=host, preopens={"/data": tmp_path})
        assert run.exit_code == 2
        assert run.stderr == f"classify_cmd: load_by_name: errno {int(E.MODEL_NOT_FOUND)}\n"
        assert run.stdout == ""
        # Input dims the graph refuses (a [1, 64] row for a [N, 1, 8, 8] model): compute's runtime_error.
        (tmp_path / "wide.bin").write_bytes(np.zeros(64, np.float32).tobytes())
        run = apps.run(CLASSIFY_CMD, ["cnn", "/data/wide.bin"], host=host, preopens={"/data": tmp_path})
        assert run.exit_code == 2
        assert run.stderr == f"classify_cmd: compute: errno {int(E.RUNTIME_ERROR)}\n"
    finally:
        host.close()


def test_reactor_refusals(apps: NnApps, models: dict[str, Path]) -> None:
    # No model named "default": ea_init fails with -6 and the reactor says which errno.
    other = apps.named({"cnn": models["cnn"]})
    host = apps.host(other)
    try:
        reactor = apps.reactor(REACTOR_4_TO_3, host=host)
        assert reactor.call("ea_run", 1) == -5  # not initialised
        assert reactor.init() == -6
        assert reactor.errno() == E.MODEL_NOT_FOUND
        assert host.last_error == "load_by_name: no model named 'default' is preloaded"
    finally:
        host.close()
        other.close()

    # A "default" whose input is not [N, 4]: set_input takes it, compute refuses it; the status says which.
    wrong = apps.named({"default": models["cnn"]})
    host = apps.host(wrong)
    try:
        reactor = apps.reactor(REACTOR_4_TO_3, host=host)
        assert reactor.call("ea_init", 0, 1) == -2  # a parameter table: this app has no parameters
        assert reactor.init() == 0
        assert reactor.call("ea_run", 0) == -1
        assert reactor.call("ea_run", 9) == -1
        assert reactor.call("ea_run", 2) == -6
        assert reactor.errno() == E.RUNTIME_ERROR
        assert host.last_error is not None and host.last_error.startswith("compute: onnxruntime:")
    finally:
        host.close()
        wrong.close()


def test_committed_apps_are_what_native_builds_to(tmp_path: Path) -> None:
    if shutil.which("make") is None or shutil.which("clang") is None:
        pytest.skip("clang (or make) not installed: cannot build native/wasinn (apt install clang lld wasi-libc)")
    proc = subprocess.run(
        ["make", "-s", "-C", str(NATIVE), "wasinn", f"BUILD_DIR={tmp_path}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    built = sorted(p.name for p in (tmp_path / "wasinn").glob("*.wasm"))
    assert built == sorted(p.name for p in WASINN_DATA.glob("*.wasm"))
    for name in built:
        assert (tmp_path / "wasinn" / name).read_bytes() == (WASINN_DATA / name).read_bytes(), (
            f"rebuilt {name} differs from tests/data/wasinn/{name}: run 'make -C native install-wasinn'"
        )
