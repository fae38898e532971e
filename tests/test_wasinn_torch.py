"""The TorchScript backend through the WASI-NN host: a real wasm guest, real wasmtime, real torch.

The guest is a trampoline in WAT: each export calls the ``wasi_ephemeral_nn``
import of the same name, so the test lays out builders, tensors and buffers in
the guest's memory and the host reads them from there exactly as it would for
a compiled app. Models are made here with torch.jit.script/trace and saved to
a file; every output is compared with the same TorchScript module called
directly. The CUDA variants run where torch sees a CUDA device.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import wasmtime
from conftest import http
from wasinn_wat import Io, write_nn_model_dir

from agent.errors import GpuUnavailable
from agent.wasinn.abi import DTYPES, Errno, ExecutionTarget, GraphEncoding, NnError, TensorType
from agent.wasinn.backend import BackendRegistry, NamedModel, NamedModels, Tensor, discover
from agent.wasinn.gpu import GpuContext, GpuDevice, GpuGraph, GpuScheduler, GpuSettings, placement
from agent.wasinn.host import SIGNATURES, NnHost

torch = pytest.importorskip("torch", reason="torch is not installed: the TorchScript backend has nothing to run")

# torch 2.x deprecates torch.jit in favour of torch.export; TorchScript is still what WASI-NN's pytorch encoding means.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

NO_CUDA = "no CUDA GPU on this machine: torch.cuda.is_available() is False (the CPU variants of these tests ran)"
TARGETS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("gpu", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)),
]
CODES = {"cpu": ExecutionTarget.CPU, "gpu": ExecutionTarget.GPU}

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


class TwoHeads(torch.nn.Module):
    """Two tensor inputs, two outputs: (relu(x @ W + b), x.sum(1) * y)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.relu(self.linear(x)), x.sum(1) * y


class Affine64(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 3 + 1


class Mapping(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": x}


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

    def alloc(self, size: int) -> int:
        return self.put(bytes(size))

    def read(self, at: int, size: int) -> bytes:
        return bytes(self.memory.read(self.store, at, at + size))

    def u32(self, at: int) -> int:
        value: int = struct.unpack("<I", self.read(at, 4))[0]
        return value

    def call(self, name: str, *args: int) -> int:
        func = self.exports[name]
        assert isinstance(func, wasmtime.Func)
        result = func(self.store, *args)
        assert isinstance(result, int)
        return result

    # -- the ABI, one call each -------------------------------------------------------------------
    def load(self, model: bytes, target: ExecutionTarget, *, builders: int = 1) -> tuple[int, int]:
        spans = b"".join(struct.pack("<II", self.put(model), len(model)) for _ in range(builders))
        out = self.alloc(4)
        errno = self.call("load", self.put(spans), builders, int(GraphEncoding.PYTORCH), int(target), out)
        return errno, self.u32(out)

    def load_by_name(self, name: str) -> tuple[int, int]:
        encoded = name.encode()
        out = self.alloc(4)
        errno = self.call("load_by_name", self.put(encoded), len(encoded), out)
        return errno, self.u32(out)

    def context(self, graph: int) -> int:
        out = self.alloc(4)
        assert self.call("init_execution_context", graph, out) == Errno.SUCCESS, self.host.last_error
        return self.u32(out)

    def set_input(self, ctx: int, index: int, array: np.ndarray, ttype: TensorType) -> int:
        data = np.ascontiguousarray(array, dtype=DTYPES[ttype]).tobytes()
        dims = self.put(struct.pack(f"<{array.ndim}I", *array.shape))
        tensor = struct.pack("<IIBxxxII", dims, array.ndim, int(ttype), self.put(data), len(data))
        return self.call("set_input", ctx, index, self.put(tensor))

    def get_output(self, ctx: int, index: int, size: int) -> tuple[int, bytes]:
        buf, written = self.alloc(size), self.alloc(4)
        errno = self.call("get_output", ctx, index, buf, size, written)
        return errno, self.read(buf, min(size, self.u32(written)))


@pytest.fixture
def registry() -> BackendRegistry:
    available = discover(["torchscript"])
    assert [info.name for info in available] == ["torchscript"]
    # These tests load the guests' own bytes, as `edge-agent wasi run` allows; a served node refuses that.
    return BackendRegistry(available=available, options={"torchscript": {"guest_bytes": True}})


def test_a_node_refuses_torchscript_from_a_guests_bytes_by_default(tmp_path: Path) -> None:
    """TorchScript is code PyTorch does not sandbox: served, it comes only from a signed image's weights."""
    backend = BackendRegistry(available=discover(["torchscript"])).get(GraphEncoding.PYTORCH)
    _, data, _ = two_heads(tmp_path)
    with pytest.raises(NnError) as caught:
        backend.load_bytes([data], ExecutionTarget.CPU, {})
    assert caught.value.errno == Errno.UNSUPPORTED_OPERATION and "signed image" in str(caught.value)


@pytest.fixture
def guest(registry: BackendRegistry) -> Iterator[Guest]:
    host = NnHost(registry=registry, named=NamedModels(registry=registry))
    yield Guest(host)
    host.close()


def saved(module: torch.nn.Module, path: Path, example: tuple[torch.Tensor, ...] | None = None) -> bytes:
    scripted = torch.jit.trace(module, example) if example is not None else torch.jit.script(module)
    scripted.save(str(path))
    return path.read_bytes()


def two_heads(tmp_path: Path) -> tuple[torch.jit.ScriptModule, bytes, Path]:
    torch.manual_seed(16)
    path = tmp_path / "two_heads.pt"
    data = saved(TwoHeads(), path)
    return torch.jit.load(str(path)), data, path


def run_two_heads(guest: Guest, graph: int, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ctx = guest.context(graph)
    assert guest.set_input(ctx, 0, x, TensorType.F32) == Errno.SUCCESS, guest.host.last_error
    assert guest.set_input(ctx, 1, y, TensorType.F32) == Errno.SUCCESS, guest.host.last_error
    assert guest.call("compute", ctx) == Errno.SUCCESS, guest.host.last_error
    errno, out0 = guest.get_output(ctx, 0, 4 * 3 * len(x))
    assert errno == Errno.SUCCESS, guest.host.last_error
    errno, out1 = guest.get_output(ctx, 1, 4 * len(x))
    assert errno == Errno.SUCCESS, guest.host.last_error
    return np.frombuffer(out0, "<f4").reshape(len(x), 3), np.frombuffer(out1, "<f4")


def direct(module: torch.jit.ScriptModule, *args: np.ndarray) -> list[np.ndarray]:
    with torch.inference_mode():
        result = module(*[torch.from_numpy(a.copy()) for a in args])
    results = result if isinstance(result, tuple) else (result,)
    return [r.numpy() for r in results]


@pytest.mark.parametrize("target", TARGETS)
def test_load_from_guest_bytes_runs_like_the_module_itself(guest: Guest, tmp_path: Path, target: str) -> None:
    module, data, _ = two_heads(tmp_path)
    errno, graph = guest.load(data, CODES[target])
    assert errno == Errno.SUCCESS, guest.host.last_error
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    y = np.arange(5, dtype=np.float32)
    got0, got1 = run_two_heads(guest, graph, x, y)
    want0, want1 = direct(module, x, y)
    if target == "cpu":
        assert np.array_equal(got0, want0) and np.array_equal(got1, want1)
    else:  # another device's kernels: the same maths, not the same rounding
        np.testing.assert_allclose(got0, want0, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got1, want1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", TARGETS)
def test_a_named_model_file_is_loaded_once_and_shared(registry: BackendRegistry, tmp_path: Path, target: str) -> None:
    module, _, path = two_heads(tmp_path)
    named = NamedModels(
        registry=registry, models={"heads": NamedModel("heads", GraphEncoding.PYTORCH, CODES[target], path)}
    )
    guests = [Guest(NnHost(registry=registry, named=named)) for _ in range(2)]
    x = np.ones((2, 4), dtype=np.float32)
    y = np.array([2.0, -1.0], dtype=np.float32)
    want = direct(module, x, y)
    for g in guests:
        errno, graph = g.load_by_name("heads")
        assert errno == Errno.SUCCESS, g.host.last_error
        got = run_two_heads(g, graph, x, y)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
    assert len(named._graphs) == 1  # one graph for both instances
    (graph_obj,) = named._graphs.values()
    assert graph_obj.device == ("cpu" if target == "cpu" else "cuda:0")
    for g in guests:
        g.host.close()
    named.close()


def test_the_guests_tensor_type_is_the_dtype_forward_sees(guest: Guest, tmp_path: Path) -> None:
    path = tmp_path / "affine.pt"
    saved(Affine64(), path)
    module = torch.jit.load(str(path))
    errno, graph = guest.load(path.read_bytes(), ExecutionTarget.CPU)
    assert errno == Errno.SUCCESS, guest.host.last_error
    for ttype, array in [
        (TensorType.I64, np.array([[1 << 40, -7, 0]], dtype=np.int64)),
        (TensorType.I32, np.array([[5, -7, 0]], dtype=np.int32)),
        (TensorType.U8, np.array([[1, 2, 84]], dtype=np.uint8)),
        (TensorType.F64, np.array([[0.1, 1e300, -2.5]], dtype=np.float64)),
        (TensorType.F16, np.array([[0.5, 2.0, -1.25]], dtype=np.float16)),
    ]:
        ctx = guest.context(graph)
        assert guest.set_input(ctx, 0, array, ttype) == Errno.SUCCESS, guest.host.last_error
        assert guest.call("compute", ctx) == Errno.SUCCESS, guest.host.last_error
        errno, out = guest.get_output(ctx, 0, array.nbytes)
        assert errno == Errno.SUCCESS, guest.host.last_error
        (want,) = direct(module, array)
        assert want.dtype == array.dtype
        assert out == want.astype(want.dtype.newbyteorder("<")).tobytes(), ttype.name


def test_refusals_are_errnos_and_the_host_keeps_serving(guest: Guest, tmp_path: Path) -> None:
    module, data, _ = two_heads(tmp_path)
    # Not a TorchScript archive; two builders; a target no backend here has.
    assert guest.load(b"PK\x03\x04 not a zip", ExecutionTarget.CPU)[0] == Errno.INVALID_ARGUMENT
    assert "torch.jit.load" in (guest.host.last_error or "")
    assert guest.load(data, ExecutionTarget.CPU, builders=2)[0] == Errno.INVALID_ARGUMENT
    assert guest.load(data, ExecutionTarget.TPU)[0] == Errno.UNSUPPORTED_OPERATION
    if not torch.cuda.is_available():
        assert guest.load(data, ExecutionTarget.GPU)[0] == Errno.UNSUPPORTED_OPERATION
        assert "no CUDA" in (guest.host.last_error or "")
        errno, auto = guest.load(data, ExecutionTarget.AUTO)  # auto without a GPU: the CPU
        assert errno == Errno.SUCCESS, guest.host.last_error
        assert guest.host._graphs[auto][0].device == "cpu"

    errno, graph = guest.load(data, ExecutionTarget.CPU)
    assert errno == Errno.SUCCESS
    ctx = guest.context(graph)
    x = np.ones((2, 4), dtype=np.float32)
    assert guest.set_input(ctx, 2, x, TensorType.F32) == Errno.INVALID_ARGUMENT  # forward takes two tensors
    assert guest.get_output(ctx, 0, 64)[0] == Errno.INVALID_ARGUMENT  # before compute
    assert guest.set_input(ctx, 1, np.ones(2, np.float32), TensorType.F32) == Errno.SUCCESS
    assert guest.call("compute", ctx) == Errno.INVALID_ARGUMENT  # input 0 missing
    assert "[0]" in (guest.host.last_error or "")
    assert guest.set_input(ctx, 0, np.ones((2, 5), np.float32), TensorType.F32) == Errno.SUCCESS
    assert guest.call("compute", ctx) == Errno.RUNTIME_ERROR  # 5 features into a 4-wide linear
    assert guest.set_input(ctx, 0, x, TensorType.F32) == Errno.SUCCESS
    assert guest.call("compute", ctx) == Errno.SUCCESS, guest.host.last_error
    assert guest.get_output(ctx, 0, 4 * 3 * 2 - 1)[0] == Errno.TOO_LARGE  # one byte short
    assert guest.get_output(ctx, 2, 64)[0] == Errno.INVALID_ARGUMENT  # forward returned two
    errno, out = guest.get_output(ctx, 1, 8)
    assert errno == Errno.SUCCESS
    assert np.array_equal(np.frombuffer(out, "<f4"), direct(module, x, np.ones(2, np.float32))[1])

    mapping = tmp_path / "mapping.pt"
    saved(Mapping(), mapping)
    errno, graph = guest.load(mapping.read_bytes(), ExecutionTarget.CPU)
    assert errno == Errno.SUCCESS
    ctx = guest.context(graph)
    assert guest.set_input(ctx, 0, x, TensorType.F32) == Errno.SUCCESS
    assert guest.call("compute", ctx) == Errno.UNSUPPORTED_OPERATION  # a dict is not a tensor list
    assert "dict" in (guest.host.last_error or "")


def test_a_traced_module_and_intra_op_threads(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    try:
        registry = BackendRegistry(
            available=discover(["torchscript"]), options={"torchscript": {"intra_op_threads": 1, "guest_bytes": True}}
        )
        host = NnHost(registry=registry, named=NamedModels(registry=registry))
        guest = Guest(host)
        linear = torch.nn.Linear(3, 2)
        path = tmp_path / "traced.pt"
        data = saved(linear, path, (torch.zeros(1, 3),))
        assert torch.get_num_threads() == before  # torch is configured when the backend is first used
        errno, graph = guest.load(data, ExecutionTarget.CPU)
        assert errno == Errno.SUCCESS, host.last_error
        assert torch.get_num_threads() == 1
        assert registry.describe()[0]["threads"] == 1
        ctx = guest.context(graph)
        x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
        assert guest.set_input(ctx, 0, x, TensorType.F32) == Errno.SUCCESS
        assert guest.call("compute", ctx) == Errno.SUCCESS
        _, out = guest.get_output(ctx, 0, 8)
        assert np.array_equal(np.frombuffer(out, "<f4").reshape(1, 2), direct(torch.jit.load(str(path)), x)[0])
        host.close()
    finally:
        torch.set_num_threads(before)


def test_a_leased_contexts_computes_hold_a_gpu_slot(registry: BackendRegistry, tmp_path: Path) -> None:
    """GpuContext around a real TorchScript context: a call waits for its device's slot and is accounted."""
    _, _, path = two_heads(tmp_path)
    scheduler = GpuScheduler(devices=[GpuDevice(0, "a listed device", 1024)], settings=GpuSettings(wait_s=0.05))
    lease, other = scheduler.admit("heads:1", 100, "auto"), scheduler.admit("other:1", 100, "gpu")
    assert lease is not None and other is not None
    assert placement(ExecutionTarget.AUTO, lease) == (ExecutionTarget.AUTO, {"device_index": 0})
    assert placement(ExecutionTarget.AUTO, None) == (ExecutionTarget.CPU, {})  # no room: the CPU, not the GPU
    graph = registry.get(GraphEncoding.PYTORCH).load_file(path, ExecutionTarget.CPU, {"device_index": 0})
    ctx = GpuContext(graph.init_execution_context(), lease)
    ctx.set_input(0, Tensor((1, 4), TensorType.F32, np.ones((1, 4), np.float32).tobytes()))
    ctx.set_input(1, Tensor((1,), TensorType.F32, np.ones(1, np.float32).tobytes()))
    with other.compute(), pytest.raises(NnError, match="held by other:1") as busy:
        ctx.compute()
    assert busy.value.errno == Errno.BUSY  # the guest's errno for it: a GpuBusy never reaches the host as a failure
    ctx.compute()
    assert scheduler.snapshot()["models"]["heads:1"]["calls"] == 1
    assert len(ctx.get_output(0)) == 12
    # A graph the backend put on the CPU (auto, no CUDA in this torch) holds no slot and gives its memory back.
    cpu_graph = GpuGraph(graph, lease)
    assert cpu_graph.init_execution_context().__class__.__name__ == "TorchScriptContext"
    assert "heads:1" not in scheduler.snapshot()["models"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_a_leased_named_model_runs_on_its_device_under_the_scheduler(registry: BackendRegistry, tmp_path: Path) -> None:
    module, _, path = two_heads(tmp_path)
    devices = [
        GpuDevice(i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory >> 20)
        for i in range(torch.cuda.device_count())
    ]
    scheduler = GpuScheduler(devices=devices)
    lease = scheduler.admit("heads:1", 64, "gpu")
    assert lease is not None
    target, options = placement(ExecutionTarget.GPU, lease)
    named = NamedModels(
        registry=registry,
        models={"heads": NamedModel("heads", GraphEncoding.PYTORCH, target, path, options)},
        wrap=lambda g: GpuGraph(g, lease),
    )
    guest = Guest(NnHost(registry=registry, named=named))
    errno, graph = guest.load_by_name("heads")
    assert errno == Errno.SUCCESS, guest.host.last_error
    x, y = np.ones((2, 4), dtype=np.float32), np.array([2.0, -1.0], dtype=np.float32)
    got = run_two_heads(guest, graph, x, y)
    want = direct(module, x, y)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert scheduler.snapshot()["models"]["heads:1"] == {
        "device": lease.device,
        "memory_mb": 64,
        "gpu_time_s": scheduler.snapshot()["models"]["heads:1"]["gpu_time_s"],
        "calls": 1,
    }
    guest.host.close()
    named.close()
    lease.release()


# -- served by an agent --------------------------------------------------------------------------------
def torch_model_dir(tmp_path: Path, *, name: str, wasi_nn: dict[str, Any]) -> tuple[Path, torch.jit.ScriptModule]:
    """A TorchScript 4 -> 3 linear map behind the WAT reactor (tests/wasinn_wat.py) as a model directory."""
    torch.manual_seed(3)
    path = tmp_path / f"{name}.pt"
    saved(torch.nn.Linear(4, 3), path, (torch.zeros(1, 4),))
    directory = write_nn_model_dir(
        tmp_path / name,
        name=name,
        version="1",
        weights=path.read_bytes(),
        inputs=[Io("x", "FP32", (4,))],
        outputs=[Io("y", "FP32", (3,))],
        weights_file="model.pt",
        wasi_nn={"app": "reactor", **wasi_nn},
    )
    return directory, torch.jit.load(str(path))


def test_an_agent_serves_a_torchscript_version_like_the_module(make_agent: Any, tmp_path: Path) -> None:
    directory, module = torch_model_dir(tmp_path, name="tslin", wasi_nn={"encoding": "pytorch", "target": "auto"})

    def setup(agent: Any) -> None:
        agent.repository.import_dir(directory)
        agent.db.set_active("tslin", "1")

    agent = make_agent(setup)
    x = np.random.default_rng(5).standard_normal((3, 4)).astype(np.float32)
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 4], "data": x.ravel().tolist()}]}
    status, body = http("POST", f"{agent.url}/v2/models/tslin/infer", request)
    assert status == 200, body
    got = np.array(body["outputs"][0]["data"], dtype=np.float32).reshape(3, 3)
    (want,) = direct(module, x)
    if torch.cuda.is_available():  # auto may have put it on the GPU: other kernels, other rounding
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    else:
        assert np.array_equal(got, want)
    if not torch.cuda.is_available():  # auto without a GPU: the CPU, and no GPU memory taken
        loaded = agent.agent.models.get("tslin", "1")
        (graph,) = loaded.nn._graphs.values()
        assert graph.device == "cpu"
        assert agent.agent.gpu.snapshot()["models"] == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: target gpu is admitted here")
def test_target_gpu_on_a_node_without_one_is_refused_at_load(make_agent: Any, tmp_path: Path) -> None:
    wasi_nn = {"encoding": "pytorch", "target": "gpu", "gpu_memory_mb": 512}
    directory, _ = torch_model_dir(tmp_path, name="tsgpu", wasi_nn=wasi_nn)
    agent = make_agent(lambda a: a.repository.import_dir(directory))
    if agent.agent.gpu.devices:
        pytest.skip("NVML lists a GPU here (torch has no CUDA): the version is admitted, then torch refuses it")
    with pytest.raises(GpuUnavailable, match="tsgpu:1 asks for target gpu, but this node has no GPU"):
        agent.call(agent.lifecycle.deploy("store:tsgpu:1"))
    status, _ = http("GET", agent.url + "/v2/models/digits/ready")
    assert status == 200  # the node serves its other models


def test_auto_on_a_backend_that_stays_on_the_cpu_gives_the_lease_back(make_agent: Any, tmp_path: Path) -> None:
    """The scheduler admits onto a listed device; torch without CUDA runs the graph on the CPU, so the
    memory goes back at once and computes hold no slot."""
    wasi_nn = {"encoding": "pytorch", "target": "auto", "gpu_memory_mb": 300}
    directory, module = torch_model_dir(tmp_path, name="tsauto", wasi_nn=wasi_nn)
    scheduler = GpuScheduler(devices=[GpuDevice(0, "a listed device", 1024)])

    def setup(agent: Any) -> None:
        agent.models.gpu = scheduler  # the devices as an explicit input, in place of NVML's (none here)
        agent.repository.import_dir(directory)
        agent.db.set_active("tsauto", "1")

    if torch.cuda.is_available():
        pytest.skip("torch has CUDA here: auto goes onto the GPU (the CUDA test below covers it)")
    agent = make_agent(setup)
    x = np.ones((2, 4), dtype=np.float32)
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": x.ravel().tolist()}]}
    status, body = http("POST", f"{agent.url}/v2/models/tsauto/infer", request)
    assert status == 200, body
    assert np.array_equal(np.array(body["outputs"][0]["data"], dtype=np.float32).reshape(2, 3), direct(module, x)[0])
    assert scheduler.snapshot()["models"] == {}
    assert scheduler.snapshot()["devices"][0]["free_mb"] == int(1024 * 0.9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_a_gpu_version_holds_its_lease_until_it_unloads(make_agent: Any, tmp_path: Path) -> None:
    wasi_nn = {"encoding": "pytorch", "target": "gpu", "gpu_memory_mb": 256}
    directory, module = torch_model_dir(tmp_path, name="tscuda", wasi_nn=wasi_nn)

    def setup(agent: Any) -> None:
        agent.repository.import_dir(directory)
        agent.db.set_active("tscuda", "1")

    agent = make_agent(setup)
    gpu = agent.agent.gpu
    if not gpu.devices:
        pytest.skip("torch sees CUDA but NVML lists no device: the scheduler has nothing to admit onto")
    held = gpu.snapshot()["models"]["tscuda:1"]
    assert held["memory_mb"] == 256 and held["device"] == "cuda:0"
    x = np.ones((2, 4), dtype=np.float32)
    request = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": x.ravel().tolist()}]}
    status, body = http("POST", f"{agent.url}/v2/models/tscuda/infer", request)
    assert status == 200, body
    got = np.array(body["outputs"][0]["data"], dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(got, direct(module, x)[0], rtol=1e-5, atol=1e-6)
    assert gpu.snapshot()["models"]["tscuda:1"]["calls"] >= 2  # the warm-up and the request
    gpus = gpu.read()
    assert gpus is not None and [m["model"] for m in gpus[0]["models"]] == ["tscuda:1"]
    agent.call(agent.lifecycle.unload("tscuda"))
    deadline = time.monotonic() + 60  # hang guard: the version closes once its in-flight calls drained
    while "tscuda:1" in gpu.snapshot()["models"]:
        assert time.monotonic() < deadline, "the lease outlived the unload"
        time.sleep(0.01)
