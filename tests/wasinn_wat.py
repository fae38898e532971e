"""A WASI-NN reactor app in WAT, and WASI-NN model directories around an ONNX file, for tests.

The reactor exports the Model ABI v1 (``ea_*``): ``ea_init`` calls
``load_by_name(NAME)`` and ``init_execution_context``; ``ea_run(batch)`` passes
each input buffer to ``set_input`` (dimensions ``[batch, *row]``), calls
``compute`` and copies each output with ``get_output`` into its output buffer.
It has no parameters and imports nothing but ``wasi_ephemeral_nn``.

Status codes follow the ABI: ``-1`` batch out of range, ``-4`` an input the
backend refused, ``-6`` a failed load, compute or output (or an output of an
unexpected size), ``-5`` not initialised.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import wasmtime

# WASI-NN tensor types (agent/wasinn/abi.py TensorType) by the model.json datatype.
NN_TYPES = {"FP16": 0, "FP32": 1, "FP64": 2, "UINT8": 3, "INT32": 4, "INT64": 5}
ITEMSIZE = {"FP16": 2, "FP32": 4, "FP64": 8, "UINT8": 1, "INT32": 4, "INT64": 8}

# Fixed layout of the reactor's first page.
NAME_AT = 16  # the model name (at most 200 bytes)
GRAPH_AT = 240
CTX_AT = 244
WRITTEN_AT = 248
TENSOR_AT = 256  # struct tensor (20 bytes)
DIMS_AT = 288  # up to 8 dimensions
BUFFERS_AT = 1024


@dataclass(frozen=True)
class Io:
    name: str
    datatype: str
    row: tuple[int, ...]  # the shape after the batch dimension

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row, dtype=np.int64)) * ITEMSIZE[self.datatype]


def reactor_wat(inputs: Sequence[Io], outputs: Sequence[Io], *, max_batch: int, name: str = "default") -> str:
    encoded = name.encode()
    if len(encoded) > 200:
        raise ValueError("model name too long for the test reactor")
    offsets: list[int] = []
    at = BUFFERS_AT
    for io in (*inputs, *outputs):
        offsets.append(at)
        at += -(-io.row_bytes * max_batch // 16) * 16
    pages = max(1, -(-at // 65536))
    in_at, out_at = offsets[: len(inputs)], offsets[len(inputs) :]
    name_data = "".join(f"\\{b:02x}" for b in encoded)

    set_inputs = []
    for i, io in enumerate(inputs):
        dims = [f"(i32.store (i32.const {DIMS_AT}) (local.get $b))"]
        dims += [f"(i32.store (i32.const {DIMS_AT + 4 * (k + 1)}) (i32.const {d}))" for k, d in enumerate(io.row)]
        set_inputs.append(
            "\n    ".join(
                [
                    *dims,
                    f"(i32.store (i32.const {TENSOR_AT}) (i32.const {DIMS_AT}))",
                    f"(i32.store (i32.const {TENSOR_AT + 4}) (i32.const {len(io.row) + 1}))",
                    f"(i32.store (i32.const {TENSOR_AT + 8}) (i32.const {NN_TYPES[io.datatype]}))",
                    f"(i32.store (i32.const {TENSOR_AT + 12}) (i32.const {in_at[i]}))",
                    f"(i32.store (i32.const {TENSOR_AT + 16}) (i32.mul (local.get $b) (i32.const {io.row_bytes})))",
                    f"(if (call $set_input (global.get $ctx) (i32.const {i}) (i32.const {TENSOR_AT}))"
                    " (then (return (i32.const -4))))",
                ]
            )
        )
    get_outputs = []
    for j, io in enumerate(outputs):
        get_outputs.append(
            "\n    ".join(
                [
                    f"(if (call $get_output (global.get $ctx) (i32.const {j}) (i32.const {out_at[j]})"
                    f" (i32.const {io.row_bytes * max_batch}) (i32.const {WRITTEN_AT}))"
                    " (then (return (i32.const -6))))",
                    f"(if (i32.ne (i32.load (i32.const {WRITTEN_AT}))"
                    f" (i32.mul (local.get $b) (i32.const {io.row_bytes})))"
                    " (then (return (i32.const -6))))",
                ]
            )
        )
    input_cases = "\n    ".join(
        f"(if (i32.eq (local.get $i) (i32.const {i})) (then (return (i32.const {p}))))" for i, p in enumerate(in_at)
    )
    output_cases = "\n    ".join(
        f"(if (i32.eq (local.get $i) (i32.const {j})) (then (return (i32.const {p}))))" for j, p in enumerate(out_at)
    )
    return f"""
(module
  (import "wasi_ephemeral_nn" "load_by_name" (func $load_by_name (param i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "init_execution_context" (func $init_ctx (param i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "set_input" (func $set_input (param i32 i32 i32) (result i32)))
  (import "wasi_ephemeral_nn" "compute" (func $compute (param i32) (result i32)))
  (import "wasi_ephemeral_nn" "get_output" (func $get_output (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") {pages})
  (data (i32.const {NAME_AT}) "{name_data}")
  (global $ctx (mut i32) (i32.const 0))
  (global $ready (mut i32) (i32.const 0))
  (func (export "ea_abi_version") (result i32) (i32.const 1))
  (func (export "ea_max_batch") (result i32) (i32.const {max_batch}))
  (func (export "ea_alloc") (param i32) (result i32) (i32.const 0))
  (func (export "ea_init") (param $t i32) (param $c i32) (result i32)
    (if (local.get $c) (then (return (i32.const -2))))
    (if (call $load_by_name (i32.const {NAME_AT}) (i32.const {len(encoded)}) (i32.const {GRAPH_AT}))
      (then (return (i32.const -6))))
    (if (call $init_ctx (i32.load (i32.const {GRAPH_AT})) (i32.const {CTX_AT}))
      (then (return (i32.const -6))))
    (global.set $ctx (i32.load (i32.const {CTX_AT})))
    (global.set $ready (i32.const 1))
    (i32.const 0))
  (func (export "ea_input") (param $i i32) (result i32)
    {input_cases}
    (i32.const 0))
  (func (export "ea_output") (param $i i32) (result i32)
    {output_cases}
    (i32.const 0))
  (func (export "ea_run") (param $b i32) (result i32)
    (if (i32.eqz (global.get $ready)) (then (return (i32.const -5))))
    (if (i32.or (i32.lt_s (local.get $b) (i32.const 1)) (i32.gt_s (local.get $b) (i32.const {max_batch})))
      (then (return (i32.const -1))))
    {chr(10).join(set_inputs)}
    (if (call $compute (global.get $ctx)) (then (return (i32.const -6))))
    {chr(10).join(get_outputs)}
    (i32.const 0))
)
"""


def reactor_wasm(inputs: Sequence[Io], outputs: Sequence[Io], *, max_batch: int, name: str = "default") -> bytes:
    return bytes(wasmtime.wat2wasm(reactor_wat(inputs, outputs, max_batch=max_batch, name=name)))


def linear_onnx(weight: np.ndarray, bias: np.ndarray, *, input_name: str = "x", output_name: str = "y") -> bytes:
    """An ONNX model ``y = x @ weight + bias`` (FP32, dynamic batch), made with onnx.helper."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n_in, n_out = weight.shape
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [input_name, "W"], ["xw"]),
            helper.make_node("Add", ["xw", "B"], [output_name]),
        ],
        "linear",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", n_out])],
        initializer=[
            numpy_helper.from_array(weight.astype(np.float32), "W"),
            numpy_helper.from_array(bias.astype(np.float32), "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # within what every onnxruntime of the venv reads
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def write_nn_model_dir(
    directory: Path,
    *,
    name: str,
    version: str,
    weights: bytes,
    inputs: Sequence[Io],
    outputs: Sequence[Io],
    max_batch: int = 8,
    encoding: str = "onnx",
    warmup: dict[str, Any] | None = None,
    wasm: bytes | None = None,
    weights_file: str = "model.onnx",
    wasi_nn: dict[str, Any] | None = None,
) -> Path:
    """A WASI-NN reactor model directory: model.json (with its ``wasi_nn`` section), model.wasm, the weights."""
    directory.mkdir(parents=True, exist_ok=True)
    if wasm is None:
        wasm = reactor_wasm(inputs, outputs, max_batch=max_batch)
    if warmup is None:
        warmup = {
            "inputs": {
                io.name: {"shape": [1, *io.row], "data": [0] * int(np.prod(io.row, dtype=np.int64))} for io in inputs
            }
        }
    doc = {
        "schema": "edge-agent.model/v1",
        "name": name,
        "version": version,
        "abi_version": 1,
        "max_batch": max_batch,
        "inputs": [{"name": io.name, "datatype": io.datatype, "shape": [-1, *io.row]} for io in inputs],
        "outputs": [{"name": io.name, "datatype": io.datatype, "shape": [-1, *io.row]} for io in outputs],
        "params": [],
        "warmup": warmup,
        "files": {"module": "model.wasm", "weights": weights_file},
        "wasi_nn": wasi_nn if wasi_nn is not None else {"encoding": encoding, "app": "reactor"},
    }
    (directory / "model.json").write_text(json.dumps(doc, indent=2))
    (directory / "model.wasm").write_bytes(wasm)
    (directory / weights_file).write_bytes(weights)
    return directory


def linear_model_dir(directory: Path, *, name: str = "nnlin", version: str = "1", seed: int = 0) -> tuple[Path, bytes]:
    """A 4 -> 3 linear ONNX model as a WASI-NN reactor model dir; returns (dir, onnx bytes)."""
    rng = np.random.default_rng(seed)
    onnx_bytes = linear_onnx(rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32))
    path = write_nn_model_dir(
        directory,
        name=name,
        version=version,
        weights=onnx_bytes,
        inputs=[Io("x", "FP32", (4,))],
        outputs=[Io("y", "FP32", (3,))],
    )
    return path, onnx_bytes
