"""The "shape" op family (agent/convert/ops/shape.py, native/onnx/ops_shape.c) against onnxruntime.

Data movement: Transpose, Concat, Split, Slice, Gather, Pad, Resize/Upsample, Expand, Tile,
DepthToSpace/SpaceToDepth. Every op is checked on odd shapes, negative axes, each dtype the
kernels move (by element size), its opset variants, batched models (the batch axis is only
known at run time) and the cases it refuses.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper

from agent.errors import ConversionRefused, ModelError
from tests.convert_testkit import NP_TO_ONNX, assert_matches, check_node, convert_model, node_model, runner

DTYPES = [np.float32, np.int64, np.int32, np.uint8, np.int8, np.bool_]
INT64_MAX = np.iinfo(np.int64).max


def rand(shape: tuple[int, ...], dtype: Any = np.float32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return rng.standard_normal(shape).astype(np.float32)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), min(info.max, 1000), shape, endpoint=True).astype(dtype)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def refused(model: onnx.ModelProto, feed: dict[str, np.ndarray], *, batch: bool = False) -> str:
    with pytest.raises(ConversionRefused) as info:
        convert_model(model, feed, batch=batch)
    return str(info.value)


def check_batched(
    op_type: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...] = ("y",), **kwargs: Any
) -> None:
    """A one-node model whose inputs' first dimension is the batch, run at the inputs' batch size."""
    model = node_model(op_type, inputs, outputs, batch=True, **kwargs)
    assert_matches(model, inputs, batch=True)


# -- Transpose ------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 5), (4, 1, 7, 3), (3, 2, 5, 1, 3)])
def test_transpose_every_permutation(shape: tuple[int, ...]) -> None:
    x = rand(shape)
    for perm in itertools.permutations(range(len(shape))):
        check_node("Transpose", {"x": x}, attrs={"perm": list(perm)})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "perm"),
    [
        ((37, 23), [1, 0]),  # 2-D, odd
        ((32, 48), [1, 0]),  # 2-D, 4x4 SIMD blocks
        ((2, 8, 6, 12), [0, 2, 3, 1]),  # NCHW -> NHWC
        ((2, 6, 12, 8), [0, 3, 1, 2]),  # NHWC -> NCHW
        ((3, 5, 7), None),  # default: reversed
        ((2, 3, 1, 2, 3, 2, 1, 2), [7, 6, 5, 4, 3, 2, 1, 0]),  # rank 8
    ],
)
def test_transpose_dtypes_and_layouts(dtype: Any, shape: tuple[int, ...], perm: list[int] | None) -> None:
    attrs = {"perm": perm} if perm is not None else {}
    check_node("Transpose", {"x": rand(shape, dtype)}, attrs=attrs)


def test_transpose_rank1_and_unit_axes() -> None:
    check_node("Transpose", {"x": rand((7,))})
    check_node("Transpose", {"x": rand((1, 5, 1, 3))}, attrs={"perm": [2, 1, 0, 3]})  # bytes unchanged: an alias


def test_transpose_batched() -> None:
    check_batched("Transpose", {"x": rand((3, 4, 5, 6))}, attrs={"perm": [0, 2, 3, 1]})
    check_batched("Transpose", {"x": rand((5, 7, 3))}, attrs={"perm": [0, 2, 1]})
    check_batched("Transpose", {"x": rand((1, 7, 3), np.int64)}, attrs={"perm": [0, 2, 1]})


def test_transpose_refuses_moving_the_batch_axis() -> None:
    x = rand((3, 4, 4))
    model = node_model("Transpose", {"x": x}, batch=True, attrs={"perm": [1, 0, 2]})
    with pytest.raises(ConversionRefused):
        convert_model(model, {"x": x}, batch=True)


# -- Concat ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1, 2, -1, -3])
def test_concat(dtype: Any, axis: int) -> None:
    shapes = [[2, 3, 5], [2, 3, 5], [2, 3, 5]]
    for i, extent in enumerate((1, 4, 3)):
        shapes[i][axis] = extent
    inputs = {f"x{i}": rand(tuple(s), dtype, seed=i) for i, s in enumerate(shapes)}
    check_node("Concat", inputs, attrs={"axis": axis})


def test_concat_with_a_constant_and_rank1() -> None:
    check_node("Concat", {"a": rand((3, 5))}, initializers={"b": rand((3, 2), seed=1)}, attrs={"axis": 1})
    check_node("Concat", {"a": rand((7,), np.int64), "b": rand((2,), np.int64)}, attrs={"axis": 0})
    check_node("Concat", {"a": rand((4, 3))}, attrs={"axis": -1})  # one input


def test_concat_batched() -> None:
    check_batched("Concat", {"a": rand((3, 2, 5)), "b": rand((3, 4, 5), seed=1)}, attrs={"axis": 1})
    check_batched(
        "Concat", {"a": rand((4, 2, 5), np.int32), "b": rand((4, 2, 1), np.int32, seed=1)}, attrs={"axis": -1}
    )


def test_concat_refuses_the_batch_axis() -> None:
    feed = {"a": rand((3, 2)), "b": rand((3, 2), seed=1)}
    model = node_model("Concat", feed, batch=True, attrs={"axis": 0})
    with pytest.raises(ConversionRefused):
        convert_model(model, feed, batch=True)


# -- Split -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_equal_and_sizes(dtype: Any) -> None:
    x = rand((4, 9, 5), dtype)
    check_node("Split", {"x": x}, outputs=("a", "b", "c"), attrs={"axis": 1})
    check_node("Split", {"x": x}, outputs=("a", "b"), attrs={"axis": -1, "split": [2, 3]}, opset=11)
    check_node(
        "Split", {"x": x}, outputs=("a", "b", "c"), initializers={"s": i64(1, 5, 3)}, attrs={"axis": -2}, opset=13
    )


def test_split_opset18_num_outputs_uneven() -> None:
    x = rand((3, 10))
    check_node("Split", {"x": x}, outputs=("a", "b", "c", "d"), attrs={"axis": 1, "num_outputs": 4}, opset=18)
    check_node("Split", {"x": x}, outputs=("a", "b"), attrs={"axis": 0, "num_outputs": 2}, opset=18)
    check_node("Split", {"x": x}, outputs=("a",), attrs={"axis": 1}, opset=13)


def test_split_batched() -> None:
    check_batched("Split", {"x": rand((3, 7, 4))}, outputs=("a", "b"), attrs={"axis": 1, "split": [3, 4]}, opset=12)
    check_batched("Split", {"x": rand((2, 6))}, outputs=("a", "b", "c"), attrs={"axis": -1}, opset=13)


def test_split_refuses_the_batch_axis() -> None:
    x = rand((4, 3))
    model = node_model("Split", {"x": x}, ("a", "b"), batch=True, attrs={"axis": 0}, opset=13)
    with pytest.raises(ConversionRefused):
        convert_model(model, {"x": x}, batch=True)


# -- Slice -----------------------------------------------------------------------

SLICES = [
    # starts, ends, axes, steps
    ((1,), (4,), (1,), (1,)),
    ((0, 1), (-1, 1000), (0, 2), (1, 2)),
    ((-1,), (-1000,), (-1,), (-1,)),  # reversed
    ((5, -2), (0, 0), (1, 2), (-2, -3)),  # negative steps, clamped starts
    ((-100, 2), (INT64_MAX, -1), (-3, -1), (1, 1)),
    ((1, 0, 2), (3, 5, 5), (0, 1, 2), (1, 2, 1)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SLICES)
def test_slice(dtype: Any, spec: tuple[tuple[int, ...], ...]) -> None:
    starts, ends, axes, steps = spec
    x = rand((4, 6, 7), dtype)
    inits = {"s": i64(*starts), "e": i64(*ends), "a": i64(*axes), "t": i64(*steps)}
    check_node("Slice", {"x": x}, initializers=inits, opset=13)


def test_slice_default_axes_and_steps() -> None:
    x = rand((5, 6, 7))
    check_node("Slice", {"x": x}, initializers={"s": i64(1, 2), "e": i64(4, -1)}, opset=11)
    check_node("Slice", {"x": x}, initializers={"s": i64(-3), "e": i64(INT64_MAX), "a": i64(2)}, opset=13)
    check_node("Slice", {"x": rand((9,), np.int64)}, initializers={"s": i64(2), "e": i64(7)}, opset=10)


def test_slice_opset9_attributes() -> None:
    x = rand((5, 6, 7))
    check_node("Slice", {"x": x}, attrs={"starts": [1, -3], "ends": [3, 100], "axes": [1, 2]}, opset=9)
    check_node("Slice", {"x": x}, attrs={"starts": [0, 2], "ends": [2, 4]}, opset=7)


def test_slice_contiguous_prefix() -> None:
    check_node("Slice", {"x": rand((6, 3, 5))}, initializers={"s": i64(0), "e": i64(4), "a": i64(0)}, opset=13)


def test_slice_batched() -> None:
    inits = {"s": i64(1, 0), "e": i64(-1, 3), "a": i64(1, 2)}
    check_batched("Slice", {"x": rand((3, 6, 5))}, initializers=inits, opset=13)
    # The batch axis in full: [0, INT64_MAX).
    inits = {"s": i64(0, 4), "e": i64(INT64_MAX, 0), "a": i64(0, -1), "t": i64(1, -2)}
    check_batched("Slice", {"x": rand((3, 6, 5), np.uint8)}, initializers=inits, opset=13)


def test_slice_refusals() -> None:
    x = rand((3, 6))
    part_of_batch = node_model("Slice", {"x": x}, batch=True, initializers={"s": i64(1), "e": i64(2), "a": i64(0)})
    with pytest.raises(ConversionRefused):
        convert_model(part_of_batch, {"x": x}, batch=True)
    # starts only known at run time
    feed = {"x": x, "s": i64(1)}
    model = node_model("Slice", feed, initializers={"e": i64(4), "a": i64(1)}, opset=13)
    text = refused(model, feed)
    assert "Slice" in text and "starts" in text


def _shape_model(nodes: list[onnx.NodeProto], x: np.ndarray, outputs: list[str], opset: int = 17) -> onnx.ModelProto:
    shape: list[Any] = ["N", *x.shape[1:]]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", NP_TO_ONNX[x.dtype], shape)],
        [onnx.ValueInfoProto(name=o) for o in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(array, name))


def test_slice_ends_from_the_batch_size() -> None:
    # ends = Shape(x): batch-valued; the batch axis is sliced whole, the others to their end.
    x = rand((3, 6, 5))
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        _const("starts", i64(0, 2, 1)),
        _const("axes", i64(0, 1, 2)),
        helper.make_node("Slice", ["x", "starts", "shape", "axes"], ["y"]),
    ]
    assert_matches(_shape_model(nodes, x, ["y"]), {"x": x}, batch=True)


def test_slice_ends_from_the_batch_size_cutting_the_batch_short() -> None:
    # ends = Shape(x) - 1 on the batch axis: rows of the batch would be dropped.
    x = rand((3, 6))
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        _const("one", i64(1)),
        helper.make_node("Sub", ["shape", "one"], ["ends"]),
        _const("starts", i64(0, 0)),
        helper.make_node("Slice", ["x", "starts", "ends"], ["y"]),
    ]
    with pytest.raises(ConversionRefused):
        convert_model(_shape_model(nodes, x, ["y"]), {"x": x}, batch=True)


# -- Gather ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_constant_indices(dtype: Any, axis: int) -> None:
    x = rand((5, 6, 7), dtype)
    check_node("Gather", {"x": x}, initializers={"i": i64(0, -1, 3, 3, 2)}, attrs={"axis": axis})
    check_node("Gather", {"x": x}, initializers={"i": np.array([[1, -2], [0, 4]], np.int32)}, attrs={"axis": axis})
    check_node("Gather", {"x": x}, initializers={"i": np.array(-2, np.int64)}, attrs={"axis": axis})


@pytest.mark.parametrize("index_dtype", [np.int64, np.int32])
def test_gather_computed_indices(index_dtype: Any) -> None:
    x = rand((4, 9))
    idx = np.array([[8, 0, -1], [3, 3, -9]], dtype=index_dtype)
    check_node("Gather", {"x": x, "i": idx}, attrs={"axis": 1})
    check_node("Gather", {"x": x, "i": np.array([3, -4, 0], dtype=index_dtype)}, attrs={"axis": 0})


def test_gather_batched() -> None:
    # Batched data, gather along a feature axis.
    check_batched("Gather", {"x": rand((3, 5, 4))}, initializers={"i": i64(4, 0, -1)}, attrs={"axis": 1})
    check_batched("Gather", {"x": rand((3, 5, 4), np.int8)}, initializers={"i": i64(2)}, attrs={"axis": -1})
    # An embedding lookup: batched indices into a constant table.
    ids = np.array([[1, 5, 0], [6, 6, 2], [0, 1, 2], [3, 4, 5]], dtype=np.int64)
    model = node_model("Gather", {"ids": ids}, batch=True, initializers={"table": rand((7, 4))}, attrs={"axis": 0})
    # node_model lists graph inputs first; Gather wants (data, indices)
    model.graph.node[0].input[:] = ["table", "ids"]
    assert_matches(model, {"ids": ids}, batch=True)


def test_gather_index_out_of_range_at_run_time() -> None:
    x, idx = rand((4, 5)), i64(0, 2)
    model = node_model("Gather", {"x": x, "i": idx}, attrs={"axis": 1})
    converted = convert_model(model, {"x": x, "i": idx})
    rows = {"x": x[None], "i": idx[None]}
    assert runner().run(converted, rows)["y"].shape == (1, 4, 2)
    with pytest.raises(ModelError, match="-4"):
        runner().run(converted, {"x": x[None], "i": i64(1, 5)[None]})


def test_gather_refusals() -> None:
    x = rand((3, 4))
    model = node_model("Gather", {"x": x}, batch=True, initializers={"i": i64(0)}, attrs={"axis": 0})
    with pytest.raises(ConversionRefused):
        convert_model(model, {"x": x}, batch=True)
    model = node_model("Gather", {"x": x}, initializers={"i": i64(4)}, attrs={"axis": 1})
    with pytest.raises(ConversionRefused):  # onnxruntime refuses it too, or the lowering does
        convert_model(model, {"x": x})


# -- Pad -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.int32, np.uint8, np.int8])
def test_pad_modes(mode: str, dtype: Any) -> None:
    x = rand((3, 5, 6), dtype)
    pads = i64(0, 2, 1, 1, 3, 4)
    inits: dict[str, np.ndarray] = {"p": pads}
    if mode == "constant":
        inits["v"] = np.array(7, dtype=dtype)
    check_node("Pad", {"x": x}, initializers=inits, attrs={"mode": mode}, opset=19)


def test_pad_negative_and_axes() -> None:
    x = rand((4, 6, 7))
    check_node("Pad", {"x": x}, initializers={"p": i64(-1, 2, 0, 1, -3, 2)}, opset=13)
    check_node(
        "Pad",
        {"x": x},
        initializers={"p": i64(2, -2, 1, 0, 3, 1), "v": np.array(1.5, np.float32)},
        attrs={"mode": "edge"},
        opset=13,
    )
    inits = {"p": i64(1, 2, 3, 0), "v": np.array(-2.0, np.float32), "a": i64(-1, 0)}
    check_node("Pad", {"x": x}, initializers=inits, opset=18)
    check_node("Pad", {"x": x}, initializers={"p": i64(0, 0, 2, 0, 0, 1)}, attrs={"mode": "reflect"}, opset=11)


def test_pad_opset_attributes() -> None:
    x = rand((3, 4, 5))
    check_node("Pad", {"x": x}, attrs={"pads": [0, 1, 2, 1, 0, 3], "value": 2.5}, opset=7)
    check_node("Pad", {"x": x}, attrs={"pads": [1, 1, 0, 0, 2, 2], "mode": "reflect"}, opset=10)


def test_pad_batched() -> None:
    x = rand((3, 2, 5, 5))
    check_batched("Pad", {"x": x}, initializers={"p": i64(0, 0, 1, 2, 0, 0, 2, 1)}, opset=13)
    check_batched("Pad", {"x": x}, initializers={"p": i64(0, 0, 1, 2, 0, 0, 2, 1)}, attrs={"mode": "reflect"}, opset=13)


def test_pad_refuses_the_batch_axis() -> None:
    x = rand((3, 4))
    model = node_model("Pad", {"x": x}, batch=True, initializers={"p": i64(1, 0, 0, 0)}, opset=13)
    with pytest.raises(ConversionRefused):
        convert_model(model, {"x": x}, batch=True)


# -- Resize, Upsample ---------------------------------------------------------------

COORDS = ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel", "tf_half_pixel_for_nn"]
NEAREST = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
EMPTY = np.zeros(0, np.float32)


@pytest.mark.parametrize("coord", COORDS)
@pytest.mark.parametrize("nearest", NEAREST)
def test_resize_nearest_modes(coord: str, nearest: str) -> None:
    x = rand((2, 3, 5, 7))
    attrs = {"mode": "nearest", "coordinate_transformation_mode": coord, "nearest_mode": nearest}
    for scales in ([1, 1, 2.0, 3.0], [1, 1, 0.6, 0.45], [1, 1, 1.7, 2.3]):
        inits = {"roi": EMPTY, "s": np.array(scales, np.float32)}
        check_node("Resize", {"x": x}, initializers=inits, attrs=attrs, opset=13)
    inits = {"roi": EMPTY, "s": EMPTY, "z": i64(2, 3, 8, 4)}
    check_node("Resize", {"x": x}, initializers=inits, attrs=attrs, opset=13)


@pytest.mark.parametrize("coord", [*COORDS[:4], "half_pixel_symmetric"])
def test_resize_linear(coord: str) -> None:
    x = rand((2, 3, 5, 7))
    attrs = {"mode": "linear", "coordinate_transformation_mode": coord}
    for scales in ([1, 1, 2.0, 2.0], [1, 1, 0.6, 0.5], [1, 1, 1.7, 0.8], [1, 1, 1, 3.0]):
        check_node(
            "Resize", {"x": x}, initializers={"roi": EMPTY, "s": np.array(scales, np.float32)}, attrs=attrs, opset=19
        )
    check_node("Resize", {"x": x}, initializers={"roi": EMPTY, "s": EMPTY, "z": i64(2, 3, 9, 4)}, attrs=attrs, opset=19)


def test_resize_linear_2d() -> None:
    x = rand((6, 5))
    inits = {"roi": EMPTY, "s": np.array([1.5, 2.2], np.float32)}
    check_node("Resize", {"x": x}, initializers=inits, attrs={"mode": "linear"}, opset=13)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int32])
def test_resize_nearest_integer_dtypes(dtype: Any) -> None:
    inits = {"roi": EMPTY, "s": np.array([1, 1, 2, 1.5], np.float32)}
    check_node("Resize", {"x": rand((1, 2, 3, 4), dtype)}, initializers=inits, opset=13)


def test_resize_opset10_and_11() -> None:
    x = rand((1, 2, 4, 5))
    for mode in ("nearest", "linear"):
        for scales in ([1, 1, 2, 3], [1, 1, 0.5, 0.7]):
            check_node(
                "Resize", {"x": x}, initializers={"s": np.array(scales, np.float32)}, attrs={"mode": mode}, opset=10
            )
    inits = {"roi": EMPTY, "s": np.array([1, 1, 1.5, 2], np.float32)}
    check_node("Resize", {"x": x}, initializers=inits, attrs={"coordinate_transformation_mode": "asymmetric"}, opset=11)


def test_resize_opset18_axes_and_aspect_ratio() -> None:
    x = rand((1, 2, 5, 8))
    check_node(
        "Resize",
        {"x": x},
        initializers={"roi": EMPTY, "s": np.array([2, 1.5], np.float32)},
        attrs={"axes": [2, 3]},
        opset=18,
    )
    check_node(
        "Resize", {"x": x}, initializers={"roi": EMPTY, "s": EMPTY, "z": i64(6, 3)}, attrs={"axes": [-1, 2]}, opset=18
    )
    for policy in ("not_larger", "not_smaller"):
        inits = {"roi": EMPTY, "s": EMPTY, "z": i64(7, 7)}
        attrs = {"axes": [2, 3], "keep_aspect_ratio_policy": policy, "mode": "nearest"}
        check_node("Resize", {"x": x}, initializers=inits, attrs=attrs, opset=18)
        check_node("Resize", {"x": x}, initializers=inits, attrs={**attrs, "mode": "linear"}, opset=18)


def test_upsample() -> None:
    x = rand((1, 2, 3, 4))
    for mode in ("nearest", "linear"):
        check_node("Upsample", {"x": x}, attrs={"mode": mode, "scales": [1.0, 1.0, 2.0, 1.5]}, opset=7)
        check_node(
            "Upsample", {"x": x}, initializers={"s": np.array([1, 1, 3, 2], np.float32)}, attrs={"mode": mode}, opset=9
        )


def test_resize_batched() -> None:
    for mode in ("nearest", "linear"):
        inits = {"roi": EMPTY, "s": np.array([1, 1, 2, 2], np.float32)}
        check_batched("Resize", {"x": rand((3, 2, 4, 5))}, initializers=inits, attrs={"mode": mode}, opset=13)


def test_resize_sizes_from_the_batch_size() -> None:
    # sizes = Concat(Shape(x)[:2], [7, 3]): depends on the batch size; the output's shape is used.
    x = rand((2, 3, 4, 5))
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        _const("zero", i64(0)),
        _const("two", i64(2)),
        helper.make_node("Slice", ["shape", "zero", "two"], ["nc"]),
        _const("hw", i64(7, 3)),
        helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
        _const("roi", EMPTY),
        _const("scales", EMPTY),
        helper.make_node("Resize", ["x", "roi", "scales", "sizes"], ["y"], mode="linear"),
        helper.make_node("Resize", ["x", "roi", "scales", "sizes"], ["z"], mode="nearest"),
    ]
    assert_matches(_shape_model(nodes, x, ["y", "z"]), {"x": x}, batch=True)


def test_resize_refusals() -> None:
    x = rand((1, 2, 4, 4))
    inits = {"roi": EMPTY, "s": np.array([1, 1, 2, 2], np.float32)}
    for attrs in (
        {"mode": "cubic"},
        {"mode": "linear", "antialias": 1},
        {"coordinate_transformation_mode": "tf_crop_and_resize"},
    ):
        model = node_model("Resize", {"x": x}, initializers=inits, attrs=attrs, opset=18)
        assert "Resize" in refused(model, {"x": x})
    # The batch axis cannot be resized.
    xb = rand((2, 3))
    model = node_model(
        "Resize", {"x": xb}, batch=True, initializers={"roi": EMPTY, "s": np.array([2, 1], np.float32)}, opset=13
    )
    with pytest.raises(ConversionRefused):
        convert_model(model, {"x": xb}, batch=True)


# -- Expand, Tile ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_expand(dtype: Any) -> None:
    check_node("Expand", {"x": rand((3, 1, 5), dtype)}, initializers={"s": i64(2, 3, 4, 5)})
    check_node("Expand", {"x": rand((1, 5), dtype)}, initializers={"s": i64(3, 1)})
    check_node("Expand", {"x": rand((4, 1), dtype)}, initializers={"s": i64(4, 7)})
    check_node("Expand", {"x": rand((), dtype)}, initializers={"s": i64(2, 3)})


def test_expand_batched() -> None:
    check_batched("Expand", {"x": rand((3, 1, 4))}, initializers={"s": i64(1, 5, 4)})
    check_batched("Expand", {"x": rand((2, 3, 1), np.bool_)}, initializers={"s": i64(3, 6)})


def test_expand_constant_to_the_batch() -> None:
    # A constant row expanded to Shape(x): the output is batched though its input is not.
    x = rand((3, 4))
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        _const("row", rand((1, 4), seed=3)),
        helper.make_node("Expand", ["row", "shape"], ["y"]),
    ]
    assert_matches(_shape_model(nodes, x, ["y"]), {"x": x}, batch=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tile(dtype: Any) -> None:
    check_node("Tile", {"x": rand((2, 3, 5), dtype)}, initializers={"r": i64(2, 1, 3)})
    check_node("Tile", {"x": rand((7,), dtype)}, initializers={"r": i64(3)})


def test_tile_batched_and_refused() -> None:
    check_batched("Tile", {"x": rand((3, 2, 3))}, initializers={"r": i64(1, 2, 2)})
    x = rand((3, 2))
    model = node_model("Tile", {"x": x}, batch=True, initializers={"r": i64(2, 1)})
    with pytest.raises(ConversionRefused):
        convert_model(model, {"x": x}, batch=True)


# -- DepthToSpace, SpaceToDepth -------------------------------------------------------


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
@pytest.mark.parametrize("block", [2, 3])
def test_depth_to_space(mode: str, block: int) -> None:
    x = rand((2, 2 * block * block, 3, 5))
    check_node("DepthToSpace", {"x": x}, attrs={"blocksize": block, "mode": mode}, opset=13)
    check_batched("DepthToSpace", {"x": x}, attrs={"blocksize": block, "mode": mode}, opset=13)


@pytest.mark.parametrize("block", [2, 3])
def test_space_to_depth(block: int) -> None:
    x = rand((2, 3, 2 * block, 3 * block))
    check_node("SpaceToDepth", {"x": x}, attrs={"blocksize": block}, opset=13)
    check_batched("SpaceToDepth", {"x": rand((3, 3, 2 * block, block))}, attrs={"blocksize": block}, opset=13)


# -- graphs ----------------------------------------------------------------------


def test_a_graph_of_data_movement() -> None:
    """Transpose -> Slice -> Concat -> Gather -> Pad in one batched model: intermediate tensors in the arena."""
    x = rand((3, 4, 6, 5))
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),  # N,6,5,4
        _const("s", i64(1)),
        _const("e", i64(5)),
        _const("a", i64(1)),
        helper.make_node("Slice", ["t", "s", "e", "a"], ["sl"]),  # N,4,5,4
        helper.make_node("Concat", ["sl", "t"], ["c"], axis=1),  # N,10,5,4
        _const("i", i64(3, 0, -1)),
        helper.make_node("Gather", ["c", "i"], ["g"], axis=3),  # N,10,5,3
        _const("p", i64(0, 1, 0, 2, 0, 0, 1, 0)),
        helper.make_node("Pad", ["g", "p"], ["y"], mode="edge"),  # N,11,5,5
    ]
    assert_matches(_shape_model(nodes, x, ["y"]), {"x": x}, batch=True)
    model = _shape_model(nodes, x, ["y"])
    assert_matches(model, {"x": rand((1, 4, 6, 5), seed=2)}, batch=True)


def test_output_types_are_kept() -> None:
    # Integer data movement keeps exact values (no float round trip).
    big = np.array([[2**62 + 1, -(2**62) - 3], [7, -1]], dtype=np.int64)
    got = check_node("Transpose", {"x": big})
    assert got["y"].dtype == np.int64 and got["y"][0, 1] == 7
