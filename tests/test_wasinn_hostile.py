"""Hostile guests and hostile model files against the WASI-NN host and its backends.

A guest app (a trampoline in WAT, as tests/test_wasinn_torch.py uses: each export
calls the ``wasi_ephemeral_nn`` import of the same name) and the model files it or
an image hands to a backend are the attacker here. What they must not do: read or
write the node's files, abort the agent's process, or make it allocate without a
bound. The llama.cpp cases that could abort or balloon the process run in a child
process, so a regression fails the test instead of killing the test run.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import wasmtime

from agent.wasinn.abi import Errno, ExecutionTarget, GraphEncoding, NnError, TensorType
from agent.wasinn.backend import BackendRegistry, NamedModel, NamedModels, Tensor, discover
from agent.wasinn.host import SIGNATURES, NnHost

TESTS = Path(__file__).parent
ROOT = TESTS.parent
# A hang guard for a loaded 2-core machine, not a speed check.
CHILD_TIMEOUT_S = 600

TRAMPOLINE = (
    "(module\n"
    + "".join(
        f'  (import "wasi_ephemeral_nn" "{name}" (func ${name} (param {" i32" * n}) (result i32)))\n'
        for name, n in SIGNATURES.items()
    )
    + '  (memory (export "memory") 16)\n'
    + "".join(
        f'  (func (export "{name}") (param {" i32" * n}) (result i32)'
        f" (call ${name} {' '.join(f'(local.get {i})' for i in range(n))}))\n"
        for name, n in SIGNATURES.items()
    )
    + ")\n"
)


class Guest:
    """One wasm instance with its own NnHost; ``put`` places bytes in its memory (a bump allocator)."""

    def __init__(self, host: NnHost):
        self.host = host
        engine = wasmtime.Engine()
        self.store = wasmtime.Store(engine)
        linker = wasmtime.Linker(engine)
        host.define(linker)
        instance = linker.instantiate(self.store, wasmtime.Module(engine, wasmtime.wat2wasm(TRAMPOLINE)))
        self.exports = instance.exports(self.store)
        memory = self.exports["memory"]
        assert isinstance(memory, wasmtime.Memory)
        self.memory = memory
        self.top = 64

    def put(self, data: bytes) -> int:
        need = self.top + len(data) + 64
        have = self.memory.data_len(self.store)
        if need > have:
            self.memory.grow(self.store, -(-(need - have) // 65536))
        at = self.top
        self.memory.write(self.store, data, at)
        self.top = -(-(at + len(data)) // 16) * 16
        return at

    def u32(self, at: int) -> int:
        value: int = struct.unpack("<I", bytes(self.memory.read(self.store, at, at + 4)))[0]
        return value

    def call(self, name: str, *args: int) -> int:
        func = self.exports[name]
        assert isinstance(func, wasmtime.Func)
        result = func(self.store, *args)
        assert isinstance(result, int)
        return result

    def load(self, model: bytes, encoding: GraphEncoding) -> tuple[int, int]:
        spans = struct.pack("<II", self.put(model), len(model))
        out = self.put(bytes(4))
        errno = self.call("load", self.put(spans), 1, int(encoding), int(ExecutionTarget.CPU), out)
        return errno, self.u32(out)

    def load_by_name_with_config(self, name: str, config: str) -> tuple[int, int]:
        n, c = name.encode(), config.encode()
        out = self.put(bytes(4))
        errno = self.call("load_by_name_with_config", self.put(n), len(n), self.put(c), len(c), out)
        return errno, self.u32(out)


def guest_on(
    encodings: list[str], named: NamedModels | None = None, options: dict[str, Any] | None = None
) -> tuple[Guest, NnHost]:
    available = discover(encodings)
    if [info.name for info in available] != encodings:
        pytest.skip(f"WASI-NN backends {encodings} are not all installed here (found {[i.name for i in available]})")
    registry = BackendRegistry(available=available, options=options)
    host = NnHost(registry=registry, named=named or NamedModels(registry=registry))
    return Guest(host), host


# --------------------------------------------------------------------------- ONNX: external data


def external_data_onnx(location: str, length: int) -> bytes:
    """A graph whose one output is an initializer stored "externally" at ``location`` (a file path)."""
    onnx = pytest.importorskip("onnx", reason="onnx (the model builder) is not installed")
    from onnx import TensorProto, helper

    weight = TensorProto(name="W", data_type=TensorProto.UINT8, dims=[length])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(length))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Identity", ["W"], ["y"])],
        "reads_a_file",
        [],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [length])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    data: bytes = model.SerializeToString()
    assert onnx is not None
    return data


SECRET = b"node secret: do not leak"


def test_an_onnx_graph_from_guest_bytes_cannot_read_files_through_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # onnxruntime resolves a bytes model's external data against the process's working
    # directory (the agent's: "/" under systemd, so "etc/..." is any file it can read).
    (tmp_path / "secret.bin").write_bytes(SECRET)
    monkeypatch.chdir(tmp_path)
    guest, host = guest_on(["onnxruntime"])
    try:
        errno, _ = guest.load(external_data_onnx("secret.bin", len(SECRET)), GraphEncoding.ONNX)
        assert errno == Errno.INVALID_ARGUMENT, "the guest's graph loaded a file of the node as its weights"
        assert host.last_error is not None and "external data" in host.last_error.lower()
    finally:
        host.close()


def test_an_onnx_model_file_cannot_read_the_files_beside_it(tmp_path: Path) -> None:
    # An image's weights blob lies in the store's blob directory, beside every other blob.
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: no ONNX backend")
    from agent.wasinn.backends.onnx import OnnxBackend

    (tmp_path / "neighbour").write_bytes(SECRET)
    model = tmp_path / "model.onnx"
    model.write_bytes(external_data_onnx("neighbour", len(SECRET)))
    with pytest.raises(NnError) as refused:
        OnnxBackend(options={}).load_file(model, ExecutionTarget.CPU, {})
    assert refused.value.errno == Errno.INVALID_ARGUMENT
    # The operator's own files (`wasi run --nn-preload`) may keep their weights beside the model.
    graph = OnnxBackend(options={"external_data": True}).load_file(model, ExecutionTarget.CPU, {})
    ctx = graph.init_execution_context()
    ctx.compute()
    assert ctx.get_output(0) == SECRET


# --------------------------------------------------------------------------- TorchScript: file ops

torch_skip = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
NO_TORCH = "torch is not installed: no TorchScript backend"

try:
    import torch
except ImportError:  # the TorchScript cases skip (NO_TORCH)
    torch = None

if torch is not None:
    # Modules whose TorchScript reads or writes a file (module level: torch.jit.script needs their source).

    class ReadsAFile(torch.nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.path = path

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.from_file(self.path, False, 24, dtype=torch.uint8)

    class WritesAFile(torch.nn.Module):
        def __init__(self, path: str) -> None:
            super().__init__()
            self.path = path

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch.save(x, self.path)
            return x

    class WritesAtLoad(torch.nn.Module):
        # torch.jit.load runs __setstate__: what it does happens before any check after the load.
        def __init__(self, path: str) -> None:
            super().__init__()
            self.path = path

        @torch.jit.export
        def __getstate__(self) -> tuple[str, bool]:
            return (self.path, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[str, bool]) -> None:
            self.path = state[0]
            self.training = state[1]
            torch.save(torch.zeros(1), self.path)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    HOSTILE_TORCH = {"reads": ReadsAFile, "writes": WritesAFile, "writes_at_load": WritesAtLoad}


@torch_skip
@pytest.mark.parametrize("case", ["reads", "writes", "writes_at_load"])
def test_a_torchscript_model_cannot_touch_the_nodes_files(tmp_path: Path, case: str) -> None:
    if torch is None:
        pytest.skip(NO_TORCH)
    assert len(SECRET) == 24
    target = tmp_path / ("secret.bin" if case == "reads" else "written.pt")
    archive = tmp_path / "hostile.pt"
    torch.jit.script(HOSTILE_TORCH[case](str(target))).save(str(archive))
    if case == "reads":
        target.write_bytes(SECRET)

    # A served node refuses TorchScript from a guest's bytes outright; `edge-agent wasi run` allows it,
    # so the scan must hold there, as for an image's weights (load_file, below).
    guest, host = guest_on(["torchscript"], options={"torchscript": {"guest_bytes": True}})
    try:
        errno, graph = guest.load(archive.read_bytes(), GraphEncoding.PYTORCH)
        if errno == Errno.SUCCESS:  # then at least forward must not run the file op
            out = guest.put(bytes(4))
            assert guest.call("init_execution_context", graph, out) == Errno.SUCCESS
            ctx = guest.u32(out)
            dims, data = guest.put(struct.pack("<I", 1)), guest.put(np.zeros(1, "<f4").tobytes())
            tensor = guest.put(struct.pack("<IIBxxxII", dims, 1, int(TensorType.F32), data, 4))
            assert guest.call("set_input", ctx, 0, tensor) == Errno.SUCCESS, host.last_error
            guest.call("compute", ctx)
            buf, written = guest.put(bytes(64)), guest.put(bytes(4))
            if guest.call("get_output", ctx, 0, buf, 64, written) == Errno.SUCCESS:
                assert SECRET not in bytes(guest.memory.read(guest.store, buf, buf + 64))
        assert errno == Errno.INVALID_ARGUMENT, f"a TorchScript model with a file op loaded ({case})"
        assert case == "reads" or not target.exists(), "the TorchScript model wrote a file of the node"
    finally:
        host.close()

    from agent.wasinn.backends.torchscript import TorchScriptBackend

    with pytest.raises(NnError) as refused:
        TorchScriptBackend(options={}).load_file(archive, ExecutionTarget.CPU, {})
    assert refused.value.errno == Errno.INVALID_ARGUMENT
    assert case == "reads" or not target.exists()


# --------------------------------------------------------------------------- NamedModels: one graph per config


def test_a_guest_cannot_load_a_named_model_once_per_config_without_end(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: no ONNX backend")
    from wasinn_kit import cnn_4_to_3

    path = cnn_4_to_3(tmp_path / "model.onnx")
    registry = BackendRegistry(available=discover(["onnxruntime"]))
    named = NamedModels(
        registry=registry,
        models={"default": NamedModel("default", GraphEncoding.ONNX, ExecutionTarget.CPU, path)},
    )
    guest, host = guest_on(["onnxruntime"], named)
    try:
        # Each config is a graph of its own, shared by the version and kept until it unloads:
        # a guest that varies a key it does not need loads the whole model again each time.
        errnos = []
        for i in range(200):
            errno, handle = guest.load_by_name_with_config("default", json.dumps({"nonce": i}))
            errnos.append(errno)
            if errno == Errno.SUCCESS:
                assert guest.call("unload", handle) == Errno.SUCCESS
        loaded = errnos.count(Errno.SUCCESS)
        assert loaded <= named.max_configs < 200
        assert set(errnos[loaded:]) == {Errno.TOO_LARGE}
        # A config already loaded is still served.
        errno, _ = guest.load_by_name_with_config("default", json.dumps({"nonce": 0}))
        assert errno == Errno.SUCCESS, host.last_error
    finally:
        host.close()
        named.close()


# --------------------------------------------------------------------------- llama.cpp


def _child(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    """Run ``body`` in a child Python with a tiny llama at ``model`` and a ggml context ``ctx``."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: no ggml backend")
    script = textwrap.dedent(
        """
        import json, resource, sys
        from pathlib import Path
        sys.path[:0] = [{root!r}, {tests!r}]
        from ggufkit import make_tiny_llama
        from agent.wasinn.abi import ExecutionTarget, NnError, TensorType
        from agent.wasinn.backend import Tensor
        from agent.wasinn.backends.ggml import GgmlBackend
        model = make_tiny_llama(Path({path!r}))
        graph = GgmlBackend(options={{"threads": 1}}).load_file(model, ExecutionTarget.CPU, {{}})
        ctx = graph.init_execution_context()
        def options(doc):
            ctx.set_input(1, Tensor(dims=(1,), type=TensorType.U8, data=json.dumps(doc).encode()))
        def prompt(text):
            ctx.set_input(0, Tensor(dims=(1,), type=TensorType.U8, data=text.encode()))
        def outcome(step):
            try:
                step()
                return "ok"
            except NnError as exc:
                return exc.errno.name
        """
    ).format(root=str(ROOT), tests=str(TESTS), path=str(tmp_path / "tiny.gguf"))
    return subprocess.run(
        [sys.executable, "-c", script + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        cwd=tmp_path,
    )


@pytest.mark.parametrize("ctx_size", [1, 3])
def test_a_ctx_size_below_the_prompt_does_not_abort_the_process(tmp_path: Path, ctx_size: int) -> None:
    # llama.cpp pads the context to 256 tokens but clamps its batch to the ctx-size asked for;
    # a prompt decoded in one piece larger than that batch is a GGML_ASSERT: abort().
    run = _child(
        tmp_path,
        f"""
        options({{"ctx-size": {ctx_size}, "n-predict": 2, "temp": 0}})
        prompt("Once upon a time there was a little")
        print("compute", outcome(ctx.compute))
        print("text", json.dumps(ctx.get_output(0).decode()))
        """,
    )
    assert run.returncode == 0, f"the process died ({run.returncode}): {run.stderr[-1500:]}"
    assert "compute ok" in run.stdout, run.stdout + run.stderr[-1500:]


def test_a_huge_last_n_penalty_does_not_allocate_without_bound(tmp_path: Path) -> None:
    # llama.cpp's penalties sampler keeps a ring buffer of last-n-penalty tokens, allocated at once:
    # 2**31 - 1 of them is 8 GiB, for a window no context can fill.
    run = _child(
        tmp_path,
        """
        options({"last-n-penalty": 2**31 - 1, "repeat-penalty": 1.1, "n-predict": 2, "temp": 0})
        prompt("Once upon a time")
        print("compute", outcome(ctx.compute))
        print("maxrss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        """,
    )
    assert run.returncode == 0, f"the process died ({run.returncode}): {run.stderr[-1500:]}"
    assert "compute ok" in run.stdout, run.stdout + run.stderr[-1500:]
    maxrss_kib = int(run.stdout.split("maxrss_kib")[1].split()[0])
    assert maxrss_kib < 2 << 20, f"peak memory {maxrss_kib >> 10} MiB for a tiny model"


@pytest.fixture(scope="module")
def ggml_graph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: no ggml backend")
    from ggufkit import make_tiny_llama

    from agent.wasinn.backends.ggml import GgmlBackend

    model = make_tiny_llama(tmp_path_factory.mktemp("hostile-ggml") / "tiny.gguf")
    graph = GgmlBackend(options={"threads": 1}).load_file(model, ExecutionTarget.CPU, {})
    yield graph
    graph.close()


def test_a_prompt_no_context_could_hold_is_refused_before_it_is_tokenized(ggml_graph: object) -> None:
    from agent.wasinn.backends import ggml

    assert isinstance(ggml_graph, ggml.GgmlGraph)
    ctx = ggml_graph.init_execution_context()
    try:
        # Tokenizing costs tens of bytes of memory per prompt byte (a 256 MiB tensor: gigabytes).
        huge = b"a" * (ggml_graph.max_ctx_size * ggml.MAX_PROMPT_BYTES_PER_TOKEN + 1)
        with pytest.raises(NnError) as refused:
            ctx.set_input(0, Tensor(dims=(1,), type=TensorType.U8, data=huge))
        assert refused.value.errno == Errno.PROMPT_TOO_LONG
        # A prompt of more tokens than the largest context, within the byte bound, too.
        with pytest.raises(NnError) as refused:
            ctx.set_input(0, Tensor(dims=(1,), type=TensorType.U8, data=b" a" * (ggml_graph.max_ctx_size + 300)))
        assert refused.value.errno == Errno.PROMPT_TOO_LONG
        ctx.set_input(0, Tensor(dims=(1,), type=TensorType.U8, data=b"Once upon a time"))
    finally:
        ctx.close()


def test_stream_stdout_outside_a_command_run_does_not_write_the_agents_stdout(
    ggml_graph: object, capfd: pytest.CaptureFixture[str]
) -> None:
    # A reactor app served by the agent has no stdout of its own: its stream-stdout text must not
    # land in the agent's (its log stream), where a guest could forge log lines.
    from agent.wasinn import guest_stdout
    from agent.wasinn.backends import ggml

    assert isinstance(ggml_graph, ggml.GgmlGraph)
    ctx = ggml_graph.init_execution_context()
    try:
        options = json.dumps({"stream-stdout": True, "n-predict": 4, "temp": 0}).encode()
        ctx.set_input(1, Tensor(dims=(1,), type=TensorType.U8, data=options))
        ctx.set_input(0, Tensor(dims=(1,), type=TensorType.U8, data=b"Once upon a time"))
        capfd.readouterr()
        ctx.compute()
        text = ctx.get_output(0)
        assert text
        assert capfd.readouterr().out == ""
        # A command run says where its stdout is: there the text goes.
        seen: list[bytes] = []
        with guest_stdout.guest_stdout(seen.append):
            ctx.compute()
        assert b"".join(seen) == text
    finally:
        ctx.close()


def test_unloading_a_graph_mid_generation_does_not_free_what_the_generation_uses(tmp_path: Path) -> None:
    # A version is closed once drained, or when its drain times out (10 s by default) while a reactor's
    # compute still generates: its shared graph goes then, on another thread than the generation's.
    run = _child(
        tmp_path,
        """
        import threading
        from agent.wasinn import guest_stdout
        options({"stream-stdout": True, "n-predict": 50, "temp": 0, "ignore-eos": True})
        prompt("Once upon a time")
        inside, go = threading.Event(), threading.Event()
        def sink(data):
            inside.set()
            go.wait()
        result = {}
        def generate():
            with guest_stdout.guest_stdout(sink):
                result["compute"] = outcome(ctx.compute)
        worker = threading.Thread(target=generate)
        worker.start()
        inside.wait()
        graph.close()
        print("close returned while generating", worker.is_alive())
        go.set()
        worker.join()
        print("compute", result["compute"])
        print("model freed", graph._model is None)
        print("new context", outcome(graph.init_execution_context))
        """,
    )
    assert run.returncode == 0, f"the process died ({run.returncode}): {run.stderr[-1500:]}"
    lines = run.stdout.splitlines()
    assert "close returned while generating True" in lines, run.stdout
    assert "compute INVALID_ARGUMENT" in lines, run.stdout  # stopped at its next token: the graph was unloaded
    assert "model freed True" in lines, run.stdout
    assert "new context INVALID_ARGUMENT" in lines, run.stdout


def test_the_graphs_one_instance_loads_from_its_own_bytes_are_bounded_in_total(tmp_path: Path) -> None:
    # max_graph_bytes bounds one load; with max_graphs loads alive the instance would hold 64 times
    # that (onnxruntime sessions in memory, llama.cpp's files in the temp directory).
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: no ONNX backend")
    from wasinn_kit import cnn_4_to_3

    from agent.wasinn.host import NnLimits

    model = cnn_4_to_3(tmp_path / "model.onnx").read_bytes()
    registry = BackendRegistry(available=discover(["onnxruntime"]))
    host = NnHost(
        registry=registry,
        named=NamedModels(registry=registry),
        limits=NnLimits(max_graph_bytes=3 * len(model)),
    )
    guest = Guest(host)
    try:
        handles = []
        for _ in range(3):
            errno, handle = guest.load(model, GraphEncoding.ONNX)
            assert errno == Errno.SUCCESS, host.last_error
            handles.append(handle)
        errno, _ = guest.load(model, GraphEncoding.ONNX)
        assert errno == Errno.TOO_LARGE, "a fourth graph of the instance's own bytes loaded past max_graph_bytes"
        # Unloading one makes room again.
        assert guest.call("unload", handles[0]) == Errno.SUCCESS
        errno, _ = guest.load(model, GraphEncoding.ONNX)
        assert errno == Errno.SUCCESS, host.last_error
    finally:
        host.close()


def test_a_json_schema_cannot_expand_into_a_grammar_without_bound(tmp_path: Path) -> None:
    # llama-cpp-python's converter writes a rule out once per repetition a schema asks for:
    # minLength 10**8 is a 500 MB grammar, and llama.cpp's parse of it gigabytes more.
    run = _child(
        tmp_path,
        """
        for schema in (
            {"type": "string", "minLength": 10**8},
            {"type": "array", "items": {"type": "string"}, "maxItems": 10**8},
            {"type": "string", "pattern": "^a{100000000}$"},
            {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 2000} for i in range(5000)}},
        ):
            print("schema", outcome(lambda: options({"json-schema": schema})))
        print("grammar", outcome(lambda: options({"grammar": "root ::= " + " | ".join(['"x"'] * 300000)})))
        options({"json-schema": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 64}}}})
        options({"n-predict": 3, "temp": 0})
        prompt("Once upon a time")
        print("small schema", outcome(ctx.compute))
        print("maxrss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        """,
    )
    assert run.returncode == 0, f"the process died ({run.returncode}): {run.stderr[-1500:]}"
    lines = run.stdout.splitlines()
    assert lines.count("schema INVALID_ARGUMENT") == 4, run.stdout + run.stderr[-1500:]
    assert "grammar INVALID_ARGUMENT" in lines, run.stdout
    assert "small schema ok" in lines, run.stdout + run.stderr[-1500:]
    maxrss_kib = int(run.stdout.split("maxrss_kib")[1].split()[0])
    assert maxrss_kib < 2 << 20, f"peak memory {maxrss_kib >> 10} MiB for a tiny model"


def test_ctx_size_0_takes_the_trained_context_only_up_to_the_nodes_max_ctx_size(tmp_path: Path) -> None:
    # ctx-size 0 is "the model's trained context" (WasmEdge); the node's max_ctx_size bounds the KV
    # cache a guest may make, so it bounds that too (a trained context is often 128k tokens).
    run = _child(
        tmp_path,
        """
        import ggufkit
        ggufkit.N_CTX_TRAIN = 2048
        long_model = ggufkit.make_tiny_llama(Path("long.gguf"))
        graph = GgmlBackend(options={"threads": 1, "max_ctx_size": 256}).load_file(
            long_model, ExecutionTarget.CPU, {"ctx-size": 256}
        )
        ctx = graph.init_execution_context()
        options({"ctx-size": 0, "batch-size": 256, "ubatch-size": 256, "n-predict": 1, "temp": 0})
        prompt(" the" * 300)
        print("compute", outcome(ctx.compute))
        print("ctx-size 1024", outcome(lambda: options({"ctx-size": 1024})))
        """,
    )
    assert run.returncode == 0, f"the process died ({run.returncode}): {run.stderr[-1500:]}"
    assert "compute PROMPT_TOO_LONG" in run.stdout.splitlines(), run.stdout + run.stderr[-1500:]
    assert "ctx-size 1024 INVALID_ARGUMENT" in run.stdout.splitlines(), run.stdout
