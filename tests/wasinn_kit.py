"""WASI-NN guest apps (native/wasinn, committed as tests/data/wasinn/*.wasm) on a real NnHost, and tiny ONNX models.

:class:`NnApps` runs a command app (``_start``, WASI argv, stdout and stderr
captured, preopened directories) or instantiates a reactor app, each instance
on its own ``wasmtime.Linker`` with WASI and its own
:class:`~agent.wasinn.host.NnHost` defined, as the agent does. The models are
built with ``onnx.helper`` from seeded weights, so a test makes its model in
microseconds and nothing downloads.

Apps (native/wasinn/README.md):

- ``classify_cmd``: ``[--dims D0,D1,..] [--load FILE] MODEL_NAME INPUT_FILE``, prints output 0 (``%.9g`` per line);
- ``hostile``: ``CASE [N]``, prints ``errno E`` then classifies ``HOSTILE_ROW`` with model ``default`` ([N, 4] f32);
- ``classify_reactor_f32_4_to_3_b8`` / ``classify_reactor_f32_3x224x224_to_1000_b1``: Model ABI v1 reactors
  serving the named model ``default``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import wasmtime
from onnx import TensorProto, helper, numpy_helper

from agent.wasinn.abi import ExecutionTarget, GraphEncoding
from agent.wasinn.backend import BackendRegistry, NamedModel, NamedModels, discover
from agent.wasinn.host import NnHost, NnLimits

WASINN_DATA = Path(__file__).parent / "data" / "wasinn"
CLASSIFY_CMD = "classify_cmd"
HOSTILE = "hostile"
REACTOR_4_TO_3 = "classify_reactor_f32_4_to_3_b8"  # input [batch, 4] f32 -> output [batch, 3] f32, max_batch 8
REACTOR_RESNET = "classify_reactor_f32_3x224x224_to_1000_b1"  # [batch, 3, 224, 224] -> [batch, 1000], max_batch 1
# The row hostile.wasm classifies after its hostile call.
HOSTILE_ROW = np.array([[0.5, -1.25, 2.0, 0.75]], dtype=np.float32)


def app_path(name: str) -> Path:
    return WASINN_DATA / f"{name}.wasm"


@dataclass
class CommandRun:
    """A command app's run: exit status, captured output, and the host it ran on (still open)."""

    exit_code: int
    stdout: str
    stderr: str
    host: NnHost

    def floats(self) -> np.ndarray:
        """Output lines printed with ``%.9g``: exactly the f32 values the app got."""
        return np.array([float(line) for line in self.stdout.split()], dtype=np.float64).astype(np.float32)


@dataclass
class NnApps:
    """Compiles each app once; every run or reactor gets its own store, linker and (unless given) NnHost."""

    engine: wasmtime.Engine = field(default_factory=wasmtime.Engine)
    registry: BackendRegistry = field(default_factory=lambda: BackendRegistry(available=discover(["onnxruntime"])))
    _modules: dict[str, wasmtime.Module] = field(default_factory=dict)

    def module(self, name: str) -> wasmtime.Module:
        module = self._modules.get(name)
        if module is None:
            module = wasmtime.Module.from_file(self.engine, str(app_path(name)))
            self._modules[name] = module
        return module

    def named(
        self,
        models: Mapping[str, Path],
        *,
        encoding: GraphEncoding = GraphEncoding.ONNX,
        target: ExecutionTarget = ExecutionTarget.CPU,
    ) -> NamedModels:
        """Named models (``--nn-preload NAME:ENCODING:TARGET:PATH``), graphs loaded on first use and shared."""
        return NamedModels(
            registry=self.registry,
            models={name: NamedModel(name, encoding, target, path) for name, path in models.items()},
        )

    def host(self, named: NamedModels, *, limits: NnLimits | None = None) -> NnHost:
        return NnHost(registry=self.registry, named=named, limits=limits)

    def _linker(self, host: NnHost) -> wasmtime.Linker:
        linker = wasmtime.Linker(self.engine)
        linker.define_wasi()
        host.define(linker)
        return linker

    def run(
        self,
        app: str,
        args: Sequence[str],
        *,
        host: NnHost,
        preopens: Mapping[str, Path] | None = None,
    ) -> CommandRun:
        """Runs ``app`` to its exit with ``argv = [app, *args]`` on ``host`` (the caller closes the host)."""
        out: list[bytes] = []
        err: list[bytes] = []
        config = wasmtime.WasiConfig()
        config.argv = [app, *args]
        config.stdout_custom = out.append
        config.stderr_custom = err.append
        for guest, path in (preopens or {}).items():
            config.preopen_dir(str(path), guest)
        store = wasmtime.Store(self.engine)
        store.set_wasi(config)
        instance = self._linker(host).instantiate(store, self.module(app))
        start = instance.exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        try:
            start(store)
            code = 0
        except wasmtime.ExitTrap as exc:
            code = exc.code
        return CommandRun(code, b"".join(out).decode(), b"".join(err).decode(), host)

    def reactor(self, app: str, *, host: NnHost) -> Reactor:
        store = wasmtime.Store(self.engine)
        store.set_wasi(wasmtime.WasiConfig())
        instance = self._linker(host).instantiate(store, self.module(app))
        return Reactor(store, instance, host)


class Reactor:
    """A reactor app's Model ABI v1 exports, called through plain wasmtime (f32 input 0 and output 0 only)."""

    def __init__(self, store: wasmtime.Store, instance: wasmtime.Instance, host: NnHost):
        self.store = store
        self.host = host
        exports = instance.exports(store)
        memory = exports["memory"]
        assert isinstance(memory, wasmtime.Memory)
        self.memory = memory
        self._exports = exports

    def call(self, name: str, *args: int) -> int:
        func = self._exports[name]
        assert isinstance(func, wasmtime.Func)
        result = func(self.store, *args)
        assert isinstance(result, int)
        return result

    def init(self) -> int:
        """``ea_init`` with the empty parameter table (count 0), as the agent calls it."""
        return self.call("ea_init", 0, 0)

    def errno(self) -> int:
        return self.call("wasi_nn_errno")

    def run(self, rows: np.ndarray, out_row: Sequence[int]) -> np.ndarray:
        """Writes ``rows`` (f32, batch first) at ``ea_input(0)``, calls ``ea_run(batch)`` and reads output 0."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        batch = rows.shape[0]
        self.memory.write(self.store, rows.tobytes(), self.call("ea_input", 0))
        status = self.call("ea_run", batch)
        if status != 0:
            raise RuntimeError(f"ea_run({batch}) returned {status}; wasi-nn errno {self.errno()}")
        nbytes = batch * int(np.prod(out_row)) * 4
        start = self.call("ea_output", 0)
        raw = self.memory.read(self.store, start, start + nbytes)
        return np.frombuffer(bytes(raw), dtype=np.float32).reshape(batch, *out_row).copy()


# --------------------------------------------------------------------------- models


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what every onnxruntime this project supports reads
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)


def cnn_4_to_3(path: Path, *, seed: int = 0) -> Path:
    """A tiny CNN, input ``x`` [N, 4] f32 -> ``y`` [N, 3]: the row as a 2x2 image, conv, relu, max pool, dense.

    The shapes of ``classify_reactor_f32_4_to_3_b8`` and ``hostile``.
    """
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(np.array([-1, 1, 2, 2], dtype=np.int64), "shape"),
        _init("conv_w", rng.normal(0, 0.7, (6, 1, 2, 2))),
        _init("conv_b", rng.normal(0, 0.1, (6,))),
        _init("fc_w", rng.normal(0, 0.4, (3, 24))),
        _init("fc_b", rng.normal(0, 0.1, (3,))),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["img"]),
        helper.make_node("Conv", ["img", "conv_w", "conv_b"], ["c"], kernel_shape=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[1, 1]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn_4_to_3",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    return _save(graph, path)


def cnn_8x8(path: Path, *, seed: int = 1) -> Path:
    """A digits-sized CNN, ``x`` [N, 1, 8, 8] -> ``y`` [N, 10] softmax: conv 3x3, relu, max pool 2, dense."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("conv_w", rng.normal(0, 0.5, (4, 1, 3, 3))),
        _init("conv_b", rng.normal(0, 0.1, (4,))),
        _init("fc_w", rng.normal(0, 0.3, (10, 64))),
        _init("fc_b", rng.normal(0, 0.1, (10,))),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["y"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn_8x8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return _save(graph, path)


def resnet_shaped(path: Path, *, seed: int = 2) -> Path:
    """ResNet-50's interface at a fraction of its cost: ``x`` [N, 3, 224, 224] -> ``y`` [N, 1000].

    Conv 7x7 stride 4, relu, global average pool, dense: the shapes of
    ``classify_reactor_f32_3x224x224_to_1000_b1``.
    """
    rng = np.random.default_rng(seed)
    inits = [
        _init("conv_w", rng.normal(0, 0.1, (8, 3, 7, 7))),
        _init("conv_b", rng.normal(0, 0.1, (8,))),
        _init("fc_w", rng.normal(0, 0.3, (1000, 8))),
        _init("fc_b", rng.normal(0, 0.1, (1000,))),
    ]
    nodes = [
        helper.make_node(
            "Conv", ["x", "conv_w", "conv_b"], ["c"], kernel_shape=[7, 7], strides=[4, 4], pads=[3, 3, 3, 3]
        ),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "resnet_shaped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1000])],
        inits,
    )
    return _save(graph, path)
