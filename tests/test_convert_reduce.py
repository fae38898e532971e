"""The "reduce" family (agent/convert/ops/reduce.py, native/onnx/ops_reduce.c) against onnxruntime.

Reduce* over every axis pattern (contiguous, strided, several axes, all, none), keepdims, the
opset changes (axes attribute -> input at 13 for ReduceSum and 18 for the others,
noop_with_empty_axes), Softmax/LogSoftmax/Hardmax in both axis semantics (coerce-to-2-D before
opset 13), ArgMax/ArgMin with select_last_index, TopK with ties; batched models; refusals.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from convert_testkit import assert_matches, check_node, convert_model, node_model

from agent.errors import ConversionRefused

pytest.importorskip("onnxruntime")

REDUCTIONS = [
    "ReduceSum",
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceSumSquare",
    "ReduceLogSum",
    "ReduceLogSumExp",
]
# (shape, axes) with axes None = all: contiguous tails, strided middles, split patterns, size-1 dims.
AXES_CASES: list[tuple[tuple[int, ...], list[int] | None]] = [
    ((7,), [0]),
    ((3, 37), [1]),
    ((3, 37), [0]),
    ((5, 6, 7), [-1]),
    ((5, 6, 7), [1]),
    ((5, 6, 7), [0, 2]),
    ((2, 3, 5, 9), [1, 3]),
    ((2, 3, 5, 9), [-3, -2]),
    ((2, 1, 5, 1), [1, 2]),
    ((4, 5, 6), None),
    ((1, 33), [1]),
]


def rand(shape: tuple[int, ...], seed: int, dtype: Any = np.float32, positive: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind in "iu":
        return rng.integers(-5, 6, shape).astype(dtype)
    x = rng.standard_normal(shape).astype(np.float32)
    if positive:
        x = np.abs(x) + np.float32(0.5)
    return x


def reduce_node(op: str, x: np.ndarray, axes: list[int] | None, keepdims: int, opset: int, **kw: Any) -> Any:
    """A Reduce* model with axes as an attribute or a constant input, as the opset wants."""
    attrs: dict[str, Any] = {"keepdims": keepdims, **kw}
    inits: dict[str, np.ndarray] = {}
    axes_input_since = 13 if op == "ReduceSum" else 18
    if axes is not None:
        if opset >= axes_input_since:
            inits["axes"] = np.array(axes, dtype=np.int64)
        else:
            attrs["axes"] = axes
    return node_model(op, {"x": x}, attrs=attrs, initializers=inits, opset=opset)


def values_for(op: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    # LogSum needs a positive sum; Prod stays near 1 so long products neither overflow nor vanish.
    x = rand(shape, seed, positive=op == "ReduceLogSum")
    if op == "ReduceProd":
        x = (np.float32(1.0) + np.float32(0.05) * x).astype(np.float32)
    return x


@pytest.mark.parametrize("op", REDUCTIONS)
@pytest.mark.parametrize("shape,axes", AXES_CASES)
def test_reduce_float(op: str, shape: tuple[int, ...], axes: list[int] | None) -> None:
    x = values_for(op, shape, seed=len(shape) * 10 + len(axes or []))
    for keepdims in (0, 1):
        assert_matches(reduce_node(op, x, axes, keepdims, opset=13), {"x": x}, rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("op", REDUCTIONS)
@pytest.mark.parametrize("opset", [11, 13, 18])
def test_reduce_opsets(op: str, opset: int) -> None:
    """The axes attribute (before 13/18) and the axes input (from 13 for ReduceSum, 18 for the others)."""
    x = values_for(op, (3, 4, 5), seed=opset)
    assert_matches(reduce_node(op, x, [0, -1], 1, opset=opset), {"x": x})
    assert_matches(reduce_node(op, x, [1], 0, opset=opset), {"x": x})
    assert_matches(reduce_node(op, x, None, 0, opset=opset), {"x": x})  # no axes: all


@pytest.mark.parametrize(
    "op,opset", [("ReduceSum", 13), ("ReduceMean", 18), ("ReduceMax", 18), ("ReduceSumSquare", 18)]
)
def test_reduce_noop_with_empty_axes(op: str, opset: int) -> None:
    x = rand((3, 5), 7)
    empty = {"axes": np.zeros(0, dtype=np.int64)}
    # Empty axes input with noop_with_empty_axes=1: nothing reduced (the element transform still applies).
    model = node_model(op, {"x": x}, attrs={"noop_with_empty_axes": 1}, initializers=empty, opset=opset)
    assert_matches(model, {"x": x})
    model = node_model(op, {"x": x}, attrs={"noop_with_empty_axes": 1}, opset=opset)  # axes input absent
    assert_matches(model, {"x": x})
    # Without it, empty axes reduce everything.
    model = node_model(op, {"x": x}, attrs={"keepdims": 0}, initializers=empty, opset=opset)
    assert_matches(model, {"x": x})


@pytest.mark.parametrize(
    "op", ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceSumSquare"]
)
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_reduce_integers(op: str, dtype: Any) -> None:
    x = rand((3, 4, 7), 3, dtype)
    if op == "ReduceProd":
        x = np.clip(x, -2, 2)
    for axes in ([2], [0, 2], [1], None):
        assert_matches(reduce_node(op, x, axes, 0, opset=13), {"x": x})


def test_reduce_long_rows() -> None:
    """Long contiguous and strided reductions (the SIMD paths with their tails)."""
    x = rand((3, 1001), 11)
    xt = x.T.copy()
    for op in ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceLogSumExp"):
        assert_matches(reduce_node(op, x, [1], 0, opset=13), {"x": x})
        assert_matches(reduce_node(op, xt, [0], 0, opset=13), {"x": xt})


def test_reduce_log_sum_exp_extremes() -> None:
    x = np.array([[1000.0, 999.0, -1000.0], [-np.inf, -np.inf, -np.inf], [-1000.0, -1001.0, -np.inf]], np.float32)
    check_node("ReduceLogSumExp", {"x": x}, attrs={"axes": [1]}, opset=13)
    check_node("ReduceMax", {"x": x}, attrs={"axes": [1]}, opset=13)


def test_reduce_scalar_input() -> None:
    x = np.array(2.5, dtype=np.float32)
    for op in ("ReduceSum", "ReduceSumSquare", "ReduceL2"):
        check_node(op, {"x": x}, attrs={"keepdims": 0}, opset=13)


# -- Softmax, LogSoftmax, Hardmax ---------------------------------------------------------------

SOFTMAX_OPS = ["Softmax", "LogSoftmax", "Hardmax"]


@pytest.mark.parametrize("op", SOFTMAX_OPS)
@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("axis", [None, 0, 1, 2, -1, -2])
def test_softmax_axis_semantics(op: str, opset: int, axis: int | None) -> None:
    """Opset 11 coerces to 2-D at axis (default 1); opset 13 normalises along one axis (default -1)."""
    x = rand((3, 5, 7), 5 + (axis or 0)) * np.float32(3)
    attrs = {} if axis is None else {"axis": axis}
    check_node(op, {"x": x}, attrs=attrs, opset=opset)


@pytest.mark.parametrize("op", SOFTMAX_OPS)
@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 17, 1000])
def test_softmax_row_lengths(op: str, n: int) -> None:
    x = rand((4, n), n) * np.float32(4)
    check_node(op, {"x": x}, opset=13)
    check_node(op, {"x": x.reshape(2, 2, n)}, attrs={"axis": 1}, opset=13)  # strided: inner n


def test_softmax_4d_and_large_values() -> None:
    x = rand((2, 3, 4, 5), 1)
    for opset, axis in ((11, 2), (13, 1), (13, 3), (11, -1)):
        check_node("Softmax", {"x": x}, attrs={"axis": axis}, opset=opset)
        check_node("LogSoftmax", {"x": x}, attrs={"axis": axis}, opset=opset)
    big = np.array([[1000.0, 1001.0, 1002.0, 999.0, -1000.0], [-1e4, -1e4, 0.0, 3.0, -3.0]], np.float32)
    check_node("Softmax", {"x": big}, opset=13)
    check_node("LogSoftmax", {"x": big}, opset=13)


def test_hardmax_ties_take_first() -> None:
    x = np.array([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0]], np.float32)
    check_node("Hardmax", {"x": x}, opset=13)
    check_node("Hardmax", {"x": x.T.copy()}, attrs={"axis": 0}, opset=13)


# -- ArgMax, ArgMin -----------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.int64, np.uint8, np.int8])
def test_arg(op: str, dtype: Any) -> None:
    # Small integers: many ties, so select_last_index matters.
    lo = 0 if dtype == np.uint8 else -3
    x = np.random.default_rng(2).integers(lo, lo + 7, (3, 5, 6)).astype(dtype)
    for axis in (0, 1, 2, -1):
        for keepdims in (0, 1):
            for last in (0, 1):
                attrs = {"axis": axis, "keepdims": keepdims, "select_last_index": last}
                check_node(op, {"x": x}, attrs=attrs, opset=13)
    check_node(op, {"x": x[0, 0]}, opset=11)  # 1-D, default axis 0, no select_last_index


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_arg_8bit_extremes(dtype: Any) -> None:
    """The whole 8-bit range (QLinearSoftmax's uint8 output feeds ArgMax in quantized models)."""
    info = np.iinfo(dtype)
    x = np.random.default_rng(5).integers(int(info.min), int(info.max) + 1, (4, 37, 3)).astype(dtype)
    x[0, :, 0] = info.min  # all ties at the minimum
    x[1, :, 1] = info.max  # all ties at the maximum
    x[2, 5, :], x[2, 30, :] = info.max, info.max
    x[3, 7, :], x[3, 20, :] = info.min, info.min
    for op in ("ArgMax", "ArgMin"):
        for last in (0, 1):
            check_node(op, {"x": x}, attrs={"axis": 1, "select_last_index": last}, opset=13)
        check_node(op, {"x": x[:, :, 0]}, attrs={"axis": -1, "keepdims": 0}, opset=12)


def test_argmax_float_values() -> None:
    x = rand((2, 1001), 4)
    check_node("ArgMax", {"x": x}, attrs={"axis": 1, "keepdims": 0}, opset=13)
    check_node("ArgMin", {"x": x}, attrs={"axis": -1}, opset=13)


# -- TopK ---------------------------------------------------------------------------------------


def topk(x: np.ndarray, k: int, opset: int = 11, **attrs: Any) -> Any:
    if opset < 10:
        return node_model("TopK", {"x": x}, ("v", "i"), attrs={"k": k, **attrs}, opset=opset)
    return node_model(
        "TopK", {"x": x}, ("v", "i"), attrs=attrs, initializers={"k": np.array([k], np.int64)}, opset=opset
    )


@pytest.mark.parametrize("axis", [0, 1, -1, 2])
@pytest.mark.parametrize("largest", [1, 0])
def test_topk_axes(axis: int, largest: int) -> None:
    x = rand((4, 6, 9), 8 + axis)
    for k in (1, 3, x.shape[axis]):
        assert_matches(topk(x, k, axis=axis, largest=largest), {"x": x})


def test_topk_ties_lower_index_first() -> None:
    x = np.random.default_rng(1).integers(0, 3, (5, 40)).astype(np.float32)
    for k in (1, 7, 33, 40):  # insertion path (k <= 32) and sorting path
        assert_matches(topk(x, k), {"x": x})
        assert_matches(topk(x, k, largest=0), {"x": x})
        assert_matches(topk(x.T.copy(), k, axis=0), {"x": x.T.copy()})


def test_topk_large_k_and_long_rows() -> None:
    x = rand((2, 1000), 9)
    for k in (5, 100, 1000):
        assert_matches(topk(x, k), {"x": x})
        assert_matches(topk(x, k, largest=0), {"x": x})


def test_topk_opsets_and_dtypes() -> None:
    x = rand((3, 10), 10)
    assert_matches(topk(x, 4, opset=9), {"x": x})  # k attribute
    assert_matches(topk(x, 4, opset=10), {"x": x})  # K input, no largest/sorted
    for dtype in (np.int32, np.int64):
        xi = rand((3, 10), 12, dtype)
        assert_matches(topk(xi, 4), {"x": xi})
        assert_matches(topk(xi, 4, largest=0), {"x": xi})


def test_topk_unsorted_gives_the_same_set() -> None:
    """sorted=0 leaves the order to the runtime: the kernel's (sorted) answer is the same set."""
    from convert_testkit import ort_run, run_converted

    x = rand((3, 20), 13)
    model = topk(x, 6, sorted=0)
    want, got = ort_run(model, {"x": x}), run_converted(model, {"x": x})
    order_w, order_g = np.argsort(want["i"], axis=1), np.argsort(got["i"], axis=1)
    np.testing.assert_array_equal(np.take_along_axis(got["i"], order_g, 1), np.take_along_axis(want["i"], order_w, 1))
    np.testing.assert_allclose(np.take_along_axis(got["v"], order_g, 1), np.take_along_axis(want["v"], order_w, 1))


# -- batched models -----------------------------------------------------------------------------


def batch_feed(shape: tuple[int, ...], rows: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": rand((rows, *shape[1:]), seed)}


@pytest.mark.parametrize("rows", [1, 3, 70])  # 70 > max_batch: split by the runner
def test_batched_reductions(rows: int) -> None:
    shape = (1, 4, 6)
    feed = batch_feed(shape, rows, rows)
    x = feed["x"]
    for op, axes in (("ReduceSum", [1]), ("ReduceMean", [-1]), ("ReduceMax", [1, 2]), ("ReduceLogSumExp", [2])):
        model = reduce_node(op, x[:1], axes, 0, opset=13)
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
        assert_matches(model, feed, batch=True)


@pytest.mark.parametrize("rows", [2, 5])
def test_batched_axis_ops(rows: int) -> None:
    x = rand((rows, 3, 10), rows)
    feed = {"x": x}
    for op, attrs, opset in (
        ("Softmax", {}, 13),
        ("Softmax", {"axis": 1}, 13),
        ("Softmax", {}, 11),  # coerce to 2-D at axis 1: rows stay apart
        ("LogSoftmax", {"axis": -2}, 13),
        ("Hardmax", {"axis": 2}, 13),
        ("ArgMax", {"axis": 2, "keepdims": 0}, 13),
        ("ArgMin", {"axis": 1}, 13),
    ):
        assert_matches(node_model(op, feed, attrs=attrs, opset=opset, batch=True), feed, batch=True)
    model = node_model("TopK", feed, ("v", "i"), initializers={"k": np.array([3], np.int64)}, opset=11, batch=True)
    assert_matches(model, feed, batch=True)
    model = node_model(
        "TopK", feed, ("v", "i"), attrs={"axis": 1}, initializers={"k": np.array([2], np.int64)}, opset=11, batch=True
    )
    assert_matches(model, feed, batch=True)


# -- refusals -----------------------------------------------------------------------------------


def refusal(model: Any, feed: dict[str, np.ndarray], batch: bool) -> str:
    with pytest.raises(ConversionRefused) as info:
        convert_model(model, feed, batch=batch)
    return str(info.value)


BATCH_AXIS_CASES = [
    ("ReduceSum", {"keepdims": 0}, {"axes": np.array([0], np.int64)}, 13),
    ("ReduceMean", {"axes": [0, 1]}, {}, 13),
    ("ReduceMax", {"keepdims": 1}, {}, 13),  # no axes: all, batch included
    ("Softmax", {"axis": 0}, {}, 13),
    ("Softmax", {"axis": 0}, {}, 11),
    ("LogSoftmax", {"axis": -3}, {}, 13),
    ("ArgMax", {}, {}, 13),  # default axis 0
    ("TopK", {"axis": 0}, {"k": np.array([1], np.int64)}, 11),
]


@pytest.mark.parametrize("op,attrs,inits,opset", BATCH_AXIS_CASES)
def test_refuses_the_batch_axis(op: str, attrs: dict[str, Any], inits: dict[str, np.ndarray], opset: int) -> None:
    """End to end (the analysis already sees rows mixing or the batch dimension vanish)..."""
    feed = {"x": rand((2, 3, 4), 0)}
    outputs = ("v", "i") if op == "TopK" else ("y",)
    model = node_model(op, feed, outputs, attrs=attrs, initializers=inits, opset=opset, batch=True)
    assert "batch" in refusal(model, feed, batch=True)


@pytest.mark.parametrize("op,attrs,inits,opset", BATCH_AXIS_CASES)
def test_lowering_refuses_the_batch_axis(
    op: str, attrs: dict[str, Any], inits: dict[str, np.ndarray], opset: int
) -> None:
    """...and so does the lowering itself, naming the node."""
    from agent.convert.build import lower_graph
    from agent.convert.ir import Graph, Node, Value

    f32 = np.dtype(np.float32)
    values = {"x": Value("x", f32, (1, 3, 4), batched=True)}
    inputs = ["x"]
    for name, array in inits.items():
        values[name] = Value(name, array.dtype, array.shape, const=array)
        inputs.append(name)
    outputs = ["v", "i"] if op == "TopK" else ["y"]
    for name in outputs:  # shapes do not matter: the lowering refuses before it uses them
        values[name] = Value(name, np.dtype(np.int64) if name == "i" else f32, (1, 3, 4), batched=True)
    node = Node(op, "", "n0", inputs, outputs, dict(attrs), opset)
    graph = Graph([node], values, ["x"], outputs, batched=True, opsets={"": opset})
    with pytest.raises(ConversionRefused) as info:
        lower_graph(graph)
    assert f"node 'n0' ({op})" in str(info.value) and "batch axis" in str(info.value)


def test_refuses_run_time_axes_and_k() -> None:
    x = rand((3, 4), 0)
    axes = np.array([1], np.int64)
    model = node_model("ReduceSum", {"x": x, "axes": axes}, opset=13)
    message = refusal(model, {"x": x, "axes": axes}, batch=False)
    assert "(ReduceSum): axes" in message and "axes" in message
    k = np.array([2], np.int64)
    model = node_model("TopK", {"x": x, "k": k}, ("v", "i"), opset=11)
    message = refusal(model, {"x": x, "k": k}, batch=False)
    assert "(TopK): K" in message


def test_refuses_unsupported_element_types() -> None:
    xi = rand((3, 4), 0, np.int32)
    message = refusal(node_model("ReduceLogSumExp", {"x": xi}, attrs={"axes": [1]}, opset=13), {"x": xi}, batch=False)
    assert "(ReduceLogSumExp): input element type int32" in message
