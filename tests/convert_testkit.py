"""Helpers for the converter's tests: one-node ONNX models, run converted and in onnxruntime.

``check_node`` is the workhorse of the per-op tests: it builds a model of one node
(or a few), converts it, runs it in the agent's wasm runtime and compares every
output with onnxruntime's on the same inputs.
"""

from __future__ import annotations

import atexit
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from agent.convert.build import Converted, Runner, convert

NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.bool_): TensorProto.BOOL,
}

_runner: Runner | None = None


def runner() -> Runner:
    """One wasm runtime for the whole test session (compiling the kernels once)."""
    global _runner
    if _runner is None:
        _runner = Runner()
        atexit.register(_runner.close)
    return _runner


def ort_run(model: onnx.ModelProto, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feed)), strict=True))


def node_model(
    op_type: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] = ("y",),
    *,
    attrs: Mapping[str, Any] | None = None,
    initializers: Mapping[str, np.ndarray] | None = None,
    opset: int = 17,
    domain: str = "",
    batch: bool = False,
    output_types: Mapping[str, int] | None = None,
    domain_opset: int | None = None,
) -> onnx.ModelProto:
    """A model of one ``op_type`` node. ``inputs`` are graph inputs (their arrays give dtype and shape);
    ``initializers`` are constant inputs, listed after them in the node's input order as given by
    the order of the two mappings' keys: graph inputs first. ``batch``: dim 0 of every input is "N"."""
    initializers = dict(initializers or {})
    graph_inputs = []
    for name, array in inputs.items():
        shape: list[Any] = list(array.shape)
        if batch and shape:
            shape[0] = "N"
        graph_inputs.append(helper.make_tensor_value_info(name, NP_TO_ONNX[np.dtype(array.dtype)], shape))
    inits = [onnx.numpy_helper.from_array(np.asarray(a), name) for name, a in initializers.items()]
    graph_outputs = [
        helper.make_tensor_value_info(o, output_types[o], None)
        if output_types and o in output_types
        else onnx.ValueInfoProto(name=o)
        for o in outputs
    ]
    node = helper.make_node(
        op_type, [*inputs, *initializers], list(outputs), domain=domain or None, **dict(attrs or {})
    )
    opsets = [helper.make_opsetid("", opset)]
    if domain:
        default = 1 if domain == "ai.onnx.ml" else opset
        opsets.append(helper.make_opsetid(domain, domain_opset if domain_opset is not None else default))
    graph = helper.make_graph([node], f"{op_type}_test", graph_inputs, graph_outputs, inits)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def run_converted(
    model: onnx.ModelProto, feed: Mapping[str, np.ndarray], *, batch: bool = False
) -> dict[str, np.ndarray]:
    """Convert ``model`` and run ``feed`` through it in the wasm runtime."""
    converted = convert_model(model, feed, batch=batch)
    if batch:
        return runner().run(converted, dict(feed))
    rows = {n: np.asarray(a).reshape((1, *np.shape(a))) for n, a in feed.items()}
    out = runner().run(converted, rows)
    return {n: a[0] for n, a in out.items()}


def convert_model(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], *, batch: bool = False) -> Converted:
    if batch:
        return convert(model, name="t", version="1", batched=True)
    return convert(model, name="t", version="1", batched=False, check=False, golden=False, warmup_data=dict(feed))


def assert_matches(
    model: onnx.ModelProto,
    feed: Mapping[str, np.ndarray],
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    batch: bool = False,
) -> dict[str, np.ndarray]:
    """Converted and onnxruntime outputs agree (floats within rtol/atol, integers exactly)."""
    want = ort_run(model, feed)
    got = run_converted(model, feed, batch=batch)
    for name, expected in want.items():
        actual = got[name]
        assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != onnxruntime {expected.shape}"
        if expected.dtype.kind == "f":
            np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=name)
        else:
            assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
            np.testing.assert_array_equal(actual, expected, err_msg=name)
    return got


def check_node(
    op_type: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] = ("y",),
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    **kwargs: Any,
) -> dict[str, np.ndarray]:
    """Build a one-node model, convert it, and compare with onnxruntime."""
    model = node_model(op_type, inputs, outputs, **kwargs)
    return assert_matches(model, inputs, rtol=rtol, atol=atol)
