"""Pooling, ConvTranspose (agent/convert/ops/pool.py, native/onnx/ops_pool.c) and the "norm" family
(agent/convert/ops/norm.py, native/onnx/ops_norm.c) against onnxruntime.

MaxPool / AveragePool / LpPool in 1 to 3 spatial dimensions with every attribute (kernel,
strides, pads, auto_pad, dilations, ceil_mode, count_include_pad), int8/uint8 MaxPool, the
global pools, ConvTranspose (strides, pads, output_padding, output_shape, dilations, group,
auto_pad, run-time weights), BatchNormalization, InstanceNormalization, LayerNormalization
(every axis, optional outputs), LRN, LpNormalization, MeanVarianceNormalization; batched models;
refusals.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from convert_testkit import assert_matches, check_node, convert_model, node_model

from agent.errors import ConversionRefused

pytest.importorskip("onnxruntime")


def rand(shape: tuple[int, ...], seed: int, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + shift).astype(np.float32)


def refusal(model: Any, feed: dict[str, np.ndarray], batch: bool = False) -> str:
    with pytest.raises(ConversionRefused) as info:
        convert_model(model, feed, batch=batch)
    return str(info.value)


# -- pooling ------------------------------------------------------------------------------------

POOL_2D: list[dict[str, Any]] = [
    {"kernel_shape": [3, 3]},
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 2], "strides": [2, 2], "ceil_mode": 1},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 1], "ceil_mode": 1},
    {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"kernel_shape": [4, 3], "auto_pad": "SAME_LOWER"},
    {"kernel_shape": [2, 3], "auto_pad": "VALID", "strides": [1, 3]},
    {"kernel_shape": [2, 3], "strides": [1, 2], "pads": [1, 0, 1, 2]},
    {"kernel_shape": [3, 3], "dilations": [2, 2]},
    {"kernel_shape": [3, 3], "dilations": [2, 1], "strides": [2, 1], "pads": [2, 1, 2, 1], "ceil_mode": 1},
    {"kernel_shape": [1, 1], "strides": [3, 3]},
    {"kernel_shape": [11, 13]},  # the whole plane
]


@pytest.mark.parametrize("attrs", POOL_2D, ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items()))
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool", "LpPool"])
def test_pool_2d(op: str, attrs: dict[str, Any]) -> None:
    x = rand((2, 3, 11, 13), 1)
    opset = {"MaxPool": 12, "AveragePool": 19, "LpPool": 18}[op]
    variants = [dict(attrs)]
    if op == "AveragePool" and ("pads" in attrs or "ceil_mode" in attrs):
        variants.append({**attrs, "count_include_pad": 1})
    if op == "LpPool":
        variants.append({**attrs, "p": 1})
        variants.append({**attrs, "p": 3})
    for variant in variants:
        if op != "AveragePool":
            variant.pop("count_include_pad", None)
        check_node(op, {"x": x}, attrs=variant, opset=opset)


@pytest.mark.parametrize(
    "shape,attrs",
    [
        ((2, 3, 17), {"kernel_shape": [3]}),
        ((2, 3, 17), {"kernel_shape": [4], "strides": [2], "pads": [1, 2], "ceil_mode": 1}),
        ((1, 2, 9), {"kernel_shape": [3], "auto_pad": "SAME_UPPER", "strides": [2]}),
        ((1, 2, 9), {"kernel_shape": [2], "dilations": [3]}),
        ((1, 2, 5, 6, 7), {"kernel_shape": [2, 3, 2]}),
        ((1, 2, 5, 6, 7), {"kernel_shape": [3, 3, 3], "strides": [2, 2, 2], "pads": [1, 1, 1, 1, 1, 1]}),
        ((1, 2, 5, 6, 7), {"kernel_shape": [2, 2, 3], "dilations": [2, 1, 2], "ceil_mode": 1, "strides": [2, 2, 2]}),
    ],
)
@pytest.mark.parametrize("op", ["MaxPool", "AveragePool", "LpPool"])
def test_pool_1d_3d(op: str, shape: tuple[int, ...], attrs: dict[str, Any]) -> None:
    check_node(op, {"x": rand(shape, 2)}, attrs=attrs, opset=19 if op == "AveragePool" else 18)
    if op == "AveragePool":
        check_node(op, {"x": rand(shape, 3)}, attrs={**attrs, "count_include_pad": 1}, opset=19)


def test_pool_wide_rows_take_the_simd_paths() -> None:
    # Stride 1 and 2 rows longer than a vector, odd lengths, pads on both sides.
    x = rand((1, 2, 7, 45), 4)
    for op in ("MaxPool", "AveragePool"):
        for attrs in (
            {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]},
            {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
            {"kernel_shape": [2, 2], "strides": [2, 2]},
            {"kernel_shape": [1, 5], "strides": [1, 2], "pads": [0, 2, 0, 3], "ceil_mode": 1},
        ):
            check_node(op, {"x": x}, attrs=attrs, opset=19 if op == "AveragePool" else 12)


# The float MaxPool fast path (2-D or 1-D, no dilation, kernel width 2 or 3, stride width 1 or 2;
# 2x2 stride 2 inside the input straight from the rows): every edge of it against onnxruntime.
FAST_MAXPOOL: list[dict[str, Any]] = [
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},
    {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 0, 0]},
    {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
    {"kernel_shape": [3, 3], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 2, 2, 0]},
    {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [2, 2], "strides": [1, 1]},
    {"kernel_shape": [5, 3], "strides": [3, 2], "pads": [2, 1, 2, 1]},
    {"kernel_shape": [1, 2], "strides": [1, 2]},
    {"kernel_shape": [3, 2], "strides": [2, 1], "auto_pad": "SAME_UPPER"},
]


@pytest.mark.parametrize("attrs", FAST_MAXPOOL, ids=lambda a: "-".join(f"{k}{v}" for k, v in a.items()))
def test_maxpool_fast_path(attrs: dict[str, Any]) -> None:
    for seed, (h, w) in enumerate([(8, 8), (9, 9), (4, 17), (3, 2), (2, 3), (1, 5), (7, 16), (5, 33), (6, 1)]):
        k = attrs["kernel_shape"]
        pads = attrs.get("pads", [0, 0, 0, 0])
        if h + pads[0] + pads[2] < k[0] or w + pads[1] + pads[3] < k[1]:
            continue  # the window does not fit
        x = np.round(rand((2, 3, h, w), seed, scale=2.0))  # ties
        check_node("MaxPool", {"x": x}, attrs=attrs, opset=12)


def test_maxpool_fast_path_1d_and_batched() -> None:
    x = np.round(rand((2, 3, 21), 7, scale=2.0))
    for attrs in (
        {"kernel_shape": [2], "strides": [2]},
        {"kernel_shape": [3], "strides": [2], "pads": [1, 1]},
        {"kernel_shape": [3], "strides": [1], "pads": [1, 1]},
    ):
        check_node("MaxPool", {"x": x}, attrs=attrs, opset=12)
    # The digits CNN's pool: [N, 8, 8, 8], 2x2 stride 2, at run-time batch sizes.
    model = node_model(
        "MaxPool", {"x": rand((1, 8, 8, 8), 8)}, attrs={"kernel_shape": [2, 2], "strides": [2, 2]}, batch=True
    )
    for rows in (1, 5, 32):
        assert_matches(model, {"x": rand((rows, 8, 8, 8), 9 + rows)}, batch=True)


def test_pool_opset_variants() -> None:
    x = rand((1, 3, 8, 9), 5)
    check_node("MaxPool", {"x": x}, attrs={"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, opset=7)
    check_node("MaxPool", {"x": x}, attrs={"kernel_shape": [2, 2], "strides": [2, 2], "storage_order": 1}, opset=8)
    check_node("MaxPool", {"x": x}, attrs={"kernel_shape": [3, 3], "ceil_mode": 1, "strides": [2, 2]}, opset=10)
    check_node(
        "AveragePool", {"x": x}, attrs={"kernel_shape": [3, 3], "count_include_pad": 1, "pads": [1, 1, 1, 1]}, opset=7
    )
    check_node("AveragePool", {"x": x}, attrs={"kernel_shape": [3, 3], "ceil_mode": 1, "strides": [2, 2]}, opset=11)
    check_node("LpPool", {"x": x}, attrs={"kernel_shape": [2, 3], "p": 2}, opset=11)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_maxpool_integers(dtype: Any) -> None:
    rng = np.random.default_rng(6)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max + 1, (2, 3, 9, 10)).astype(dtype)
    for attrs in (
        {"kernel_shape": [3, 3]},
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
        {"kernel_shape": [2, 2], "dilations": [2, 2], "auto_pad": "SAME_UPPER"},
    ):
        check_node("MaxPool", {"x": x}, attrs=attrs, opset=12)
    x1 = rng.integers(info.min, info.max + 1, (2, 3, 19)).astype(dtype)
    check_node("MaxPool", {"x": x1}, attrs={"kernel_shape": [4], "strides": [3]}, opset=12)


@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (1, 5, 33), (2, 2, 3, 4, 5), (1, 3, 1, 1), (3, 4, 40, 41)])
@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"])
def test_global_pool(op: str, shape: tuple[int, ...]) -> None:
    x = rand(shape, 7, shift=0.5)
    check_node(op, {"x": x}, opset=17)
    if op == "GlobalLpPool":
        check_node(op, {"x": x}, attrs={"p": 1}, opset=17)
        check_node(op, {"x": x}, attrs={"p": 3}, opset=17)


# -- ConvTranspose ------------------------------------------------------------------------------

CONV_T: list[tuple[tuple[int, ...], tuple[int, ...], dict[str, Any]]] = [
    ((1, 3, 5, 7), (3, 4, 3, 3), {}),
    ((2, 3, 5, 7), (3, 4, 3, 3), {"strides": [2, 2]}),
    ((2, 3, 9, 13), (3, 5, 4, 4), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ((1, 4, 5, 7), (4, 3, 3, 3), {"strides": [3, 2], "group": 2, "output_padding": [1, 1], "dilations": [1, 2]}),
    ((1, 6, 4, 5), (6, 1, 3, 3), {"group": 6, "pads": [1, 1, 1, 1]}),  # depthwise
    ((1, 3, 5, 7), (3, 4, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ((1, 3, 5, 7), (3, 4, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    ((1, 3, 5, 7), (3, 4, 3, 3), {"strides": [2, 2], "auto_pad": "VALID"}),
    ((1, 3, 5, 7), (3, 4, 3, 3), {"strides": [2, 2], "output_shape": [10, 14]}),
    ((1, 3, 5, 7), (3, 4, 3, 3), {"strides": [2, 2], "output_shape": [11, 16]}),
    ((1, 3, 5, 7), (3, 4, 2, 3), {"strides": [2, 3], "pads": [0, 2, 1, 0], "output_padding": [1, 2]}),
    ((2, 3, 17), (3, 4, 5), {"strides": [2], "pads": [1, 2]}),
    ((1, 2, 3, 4, 5), (2, 3, 2, 3, 3), {"strides": [2, 1, 2]}),
    ((1, 16, 8, 8), (16, 32, 4, 4), {"strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ((1, 5, 6, 21), (5, 3, 1, 3), {"strides": [1, 2]}),
]


@pytest.mark.parametrize("xs,ws,attrs", CONV_T, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CONV_T])
def test_conv_transpose(xs: tuple[int, ...], ws: tuple[int, ...], attrs: dict[str, Any]) -> None:
    x, w = rand(xs, 10), rand(ws, 11, scale=0.5)
    bias = rand((ws[1] * attrs.get("group", 1),), 12)
    check_node("ConvTranspose", {"x": x}, attrs=attrs, initializers={"w": w, "b": bias}, opset=17, atol=1e-4)
    check_node("ConvTranspose", {"x": x}, attrs=attrs, initializers={"w": w}, opset=11, atol=1e-4)


def test_conv_transpose_runtime_weight() -> None:
    x, w, b = rand((1, 4, 5, 6), 13), rand((4, 3, 3, 3), 14), rand((6,), 15)
    check_node("ConvTranspose", {"x": x, "w": w, "b": b}, attrs={"strides": [2, 2], "group": 2}, opset=17, atol=1e-4)


def test_conv_transpose_blocks_output_channels() -> None:
    # Column buffer of all output channels over the 4 MiB budget: several channel blocks.
    x, w = rand((1, 8, 24, 24), 16), rand((8, 24, 5, 5), 17, scale=0.3)
    check_node("ConvTranspose", {"x": x}, attrs={"pads": [2, 2, 2, 2]}, initializers={"w": w}, opset=17, atol=1e-4)


# -- norm family --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (3, 5), (2, 5, 13), (1, 5, 2, 3, 4)])
def test_batchnorm(shape: tuple[int, ...]) -> None:
    c = shape[1]
    params = {"s": rand((c,), 20), "b": rand((c,), 21), "m": rand((c,), 22), "v": np.abs(rand((c,), 23)) + 0.1}
    x = rand(shape, 24, scale=2.0, shift=1.0)
    check_node("BatchNormalization", {"x": x}, initializers=params, attrs={"epsilon": 1e-3}, opset=15)
    check_node("BatchNormalization", {"x": x}, initializers=params, opset=9)
    check_node("BatchNormalization", {"x": x}, initializers=params, attrs={"spatial": 1}, opset=7)
    check_node("BatchNormalization", {"x": x, **params}, opset=14)  # parameters as run-time inputs


def test_batchnorm_per_element_opset7() -> None:
    x = rand((2, 3, 4, 5), 25)
    params = {n: rand((3, 4, 5), 26 + i) for i, n in enumerate(("s", "b", "m"))}
    params["v"] = np.abs(rand((3, 4, 5), 30)) + 0.1
    # onnxruntime no longer implements spatial=0: compare with the formula.
    model = node_model("BatchNormalization", {"x": x}, initializers=params, attrs={"spatial": 0}, opset=7)
    from convert_testkit import run_converted

    got = run_converted(model, {"x": x})["y"]
    want = (x - params["m"]) / np.sqrt(params["v"] + 1e-5) * params["s"] + params["b"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (2, 5, 13), (1, 3, 1), (2, 3, 2, 3, 41)])
def test_instancenorm(shape: tuple[int, ...]) -> None:
    c = shape[1]
    x = rand(shape, 31, scale=3.0, shift=5.0)
    params = {"s": rand((c,), 32), "b": rand((c,), 33)}
    check_node("InstanceNormalization", {"x": x}, initializers=params, opset=17, atol=1e-4)
    check_node("InstanceNormalization", {"x": x}, initializers=params, attrs={"epsilon": 1e-2}, opset=6 + 1, atol=1e-4)


@pytest.mark.parametrize("shape", [(3, 4, 37), (2, 3, 4, 5), (5, 1), (2, 1030)])
def test_layernorm(shape: tuple[int, ...]) -> None:
    x = rand(shape, 40, scale=3.0, shift=2.0)
    for axis in range(-len(shape), len(shape)):
        tail = shape[axis:]
        inits = {"s": rand(tail, 41), "b": rand(tail, 42)}
        check_node(
            "LayerNormalization", {"x": x}, ("y", "mean", "inv"), initializers=inits, attrs={"axis": axis}, atol=1e-4
        )
    check_node("LayerNormalization", {"x": x}, initializers={"s": rand(shape[-1:], 43)}, atol=1e-4)


def test_layernorm_variants() -> None:
    x = rand((3, 4, 6), 44)
    # Broadcast scale/bias (constants), epsilon, only the InvStdDev output, run-time scale/bias.
    check_node("LayerNormalization", {"x": x}, initializers={"s": rand((1, 6), 45), "b": rand((1,), 46)}, atol=1e-4)
    check_node("LayerNormalization", {"x": x}, initializers={"s": rand((6,), 45)}, attrs={"epsilon": 0.1}, atol=1e-4)
    model = node_model(
        "LayerNormalization", {"x": x}, ("y", "mean", "inv"), initializers={"s": rand((4, 6), 47)}, attrs={"axis": 1}
    )
    model.graph.node[0].output[1] = ""  # InvStdDev without Mean
    del model.graph.output[1]
    assert_matches(model, {"x": x})
    check_node("LayerNormalization", {"x": x, "s": rand((6,), 48), "b": rand((6,), 49)}, atol=1e-4)
    check_node("LayerNormalization", {"x": x}, initializers={"s": rand((6,), 50)}, attrs={"stash_type": 1}, opset=18)


@pytest.mark.parametrize(
    "attrs",
    [
        {"size": 3},
        {"size": 5, "alpha": 1e-2, "beta": 0.5, "bias": 2.0},
        {"size": 1, "alpha": 0.1, "beta": 0.6, "bias": 1.5},
        {"size": 7, "alpha": 1e-3, "beta": 1.0},
    ],
)
def test_lrn(attrs: dict[str, Any]) -> None:
    check_node("LRN", {"x": rand((2, 7, 5, 6), 60, scale=3.0)}, attrs=attrs)
    check_node("LRN", {"x": rand((1, 3, 2, 2), 61)}, attrs=attrs)


def test_lp_normalization() -> None:
    x = rand((2, 7, 5), 70)
    x[0, :, 2] = 0  # a zero vector along axis 1 stays zero
    for p in (1, 2):
        for axis in (-1, 1, 2, 0):
            check_node("LpNormalization", {"x": x}, attrs={"axis": axis, "p": p})
    check_node("LpNormalization", {"x": rand((9,), 71)})


@pytest.mark.parametrize("axes", [None, [2, 3], [1, 3], [0, 1, 2, 3], [-1]])
def test_mvn(axes: list[int] | None) -> None:
    attrs = {} if axes is None else {"axes": axes}
    check_node("MeanVarianceNormalization", {"x": rand((2, 3, 5, 6), 80, scale=2.0, shift=3.0)}, attrs=attrs, atol=1e-4)


# -- batched models -------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3, 70])  # 70 > max_batch: split by the runner
def test_batched(rows: int) -> None:
    x = rand((rows, 3, 9, 10), 90 + rows)
    feed = {"x": x}
    cases: list[tuple[str, dict[str, Any], dict[str, np.ndarray], int]] = [
        ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, {}, 12),
        ("AveragePool", {"kernel_shape": [2, 3], "ceil_mode": 1, "strides": [2, 2], "count_include_pad": 1}, {}, 19),
        ("GlobalAveragePool", {}, {}, 17),
        (
            "ConvTranspose",
            {"strides": [2, 2], "pads": [1, 1, 1, 1]},
            {"w": rand((3, 4, 3, 3), 91), "b": rand((4,), 92)},
            17,
        ),
        ("BatchNormalization", {}, {n: np.abs(rand((3,), 93 + i)) + 0.1 for i, n in enumerate("sbmv")}, 15),
        ("InstanceNormalization", {}, {"s": rand((3,), 97), "b": rand((3,), 98)}, 17),
        ("LayerNormalization", {"axis": 1}, {"s": rand((3, 9, 10), 99)}, 17),
        ("LRN", {"size": 3}, {}, 17),
        ("LpNormalization", {"axis": 1}, {}, 17),
        ("MeanVarianceNormalization", {"axes": [2, 3]}, {}, 17),
    ]
    for op, attrs, inits, opset in cases:
        model = node_model(op, feed, attrs=attrs, initializers=inits, opset=opset, batch=True)
        assert_matches(model, feed, batch=True, atol=1e-4)


# -- refusals ---------------------------------------------------------------------------------------


def test_refuses_maxpool_indices() -> None:
    feed = {"x": rand((1, 2, 4, 4), 100)}
    model = node_model("MaxPool", feed, ("y", "i"), attrs={"kernel_shape": [2, 2]}, opset=12)
    message = refusal(model, feed)
    assert "(MaxPool)" in message and "Indices" in message


def test_refuses_batchnorm_training() -> None:
    feed = {"x": rand((2, 3, 4), 101)}
    params = {n: np.abs(rand((3,), 102 + i)) + 0.1 for i, n in enumerate("sbmv")}
    model = node_model(
        "BatchNormalization", feed, ("y", "rm", "rv"), initializers=params, attrs={"training_mode": 1}, opset=15
    )
    message = refusal(model, feed)
    assert "(BatchNormalization)" in message and "training" in message


@pytest.mark.parametrize(
    "op,attrs",
    [("LayerNormalization", {"axis": 0}), ("LpNormalization", {"axis": 0}), ("MeanVarianceNormalization", {})],
)
def test_refuses_normalising_over_the_batch(op: str, attrs: dict[str, Any]) -> None:
    feed = {"x": rand((2, 3, 4, 5), 110)}
    inits = {"s": rand((1, 3, 4, 5), 111)} if op == "LayerNormalization" else {}
    model = node_model(op, feed, attrs=attrs, initializers=inits, opset=17, batch=True)
    assert "batch" in refusal(model, feed, batch=True)


def test_lowering_refusals_name_the_node() -> None:
    """Refusals raised by the lowerings themselves (what onnxruntime would run)."""
    from agent.convert.build import lower_graph
    from agent.convert.ir import Graph, Node, Value

    def lower_one(
        op: str, attrs: dict[str, Any], shape: tuple[int, ...], dtype: Any = np.float32, batched: bool = False
    ) -> str:
        x = Value("x", np.dtype(dtype), shape, batched)
        y = Value("y", np.dtype(dtype), shape, batched)
        i = Value("i", np.dtype(np.int64), shape, batched)
        graph = Graph(
            nodes=[Node(op, "", "n1", ["x"], ["y", "i"] if op == "MaxPool" else ["y"], attrs, 17)],
            values={"x": x, "y": y, "i": i},
            inputs=["x"],
            outputs=["y"],
            batched=batched,
        )
        with pytest.raises(ConversionRefused) as info:
            lower_graph(graph)
        return str(info.value)

    assert "Indices" in lower_one("MaxPool", {"kernel_shape": [2]}, (1, 2, 4))
    assert "float32" in lower_one("AveragePool", {"kernel_shape": [2]}, (1, 2, 4), np.int8)
    assert "rank" in lower_one("AveragePool", {"kernel_shape": [2]}, (1, 2, 4, 4, 4, 4))
    assert "kernel_shape is missing" in lower_one("LpPool", {}, (1, 2, 4))
    assert "axis 0" in lower_one("LpNormalization", {"axis": 0}, (2, 3), batched=True)
    assert "p = 3" in lower_one("LpNormalization", {"p": 3}, (2, 3))
    assert "'n1'" in lower_one("LRN", {"size": 0}, (1, 3, 4))
