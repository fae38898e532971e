"""The dense kernels (agent/convert/ops/linear.py, conv.py; native/onnx/ea_gemm.c, ops_linear.c,
ops_conv.c) and the graph passes that feed them (agent/convert/passes.py), against onnxruntime.

Gemm across its attributes and C shapes, MatMul with numpy's 1-D and batched broadcasting rules,
Conv 1-D/2-D with strides, asymmetric pads, auto_pad, dilations, groups and depthwise; sizes that
are not multiples of the micro-kernel's 4 x 16 tile and that cross its K/M/N blocks (256/128/512);
BatchNormalization folding and epilogue fusion (bias, residual Add, activations) compared with the
same graph converted unfused; the tiny ResNet end to end, batched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import agent.convert.passes as passes
from agent.convert.build import convert
from agent.errors import ConversionRefused
from tests.convert_models import digits_cnn, digits_inputs, digits_mlp, image_inputs, resnet50_shaped
from tests.convert_testkit import assert_matches, check_node, convert_model, ort_run, run_converted, runner

RTOL, ATOL = 1e-4, 1e-4


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# -- Gemm -----------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 5, 7), (5, 17, 33), (9, 300, 20), (130, 20, 530), (4, 16, 16)])
@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_gemm_sizes_and_transposes(m: int, k: int, n: int, trans_a: int, trans_b: int) -> None:
    a = rand(k, m) if trans_a else rand(m, k)
    b = rand(n, k, seed=1) if trans_b else rand(k, n, seed=1)
    check_node(
        "Gemm",
        {"a": a},
        initializers={"b": b, "c": rand(n, seed=2)},
        attrs={"transA": trans_a, "transB": trans_b},
        rtol=RTOL,
        atol=ATOL,
    )


@pytest.mark.parametrize("c_shape", [(), (1,), (7,), (1, 7), (5, 1), (5, 7)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, -2.0), (2.0, 0.0)])
def test_gemm_c_broadcast_alpha_beta(c_shape: tuple[int, ...], alpha: float, beta: float) -> None:
    check_node(
        "Gemm",
        {"a": rand(5, 6)},
        initializers={"b": rand(6, 7, seed=1), "c": rand(*c_shape, seed=2)},
        attrs={"alpha": alpha, "beta": beta},
        rtol=RTOL,
        atol=ATOL,
    )


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_computed_b_and_c(trans_b: int) -> None:
    b = rand(7, 6, seed=1) if trans_b else rand(6, 7, seed=1)
    check_node(
        "Gemm",
        {"a": rand(5, 6), "b": b, "c": rand(5, 7, seed=2)},
        attrs={"transB": trans_b, "alpha": 0.7, "beta": 1.5},
        rtol=RTOL,
        atol=ATOL,
    )


def test_gemm_without_c_opset_11_and_opsets() -> None:
    check_node("Gemm", {"a": rand(3, 4)}, initializers={"b": rand(4, 5, seed=1)}, opset=11, rtol=RTOL, atol=ATOL)
    for opset in (7, 9, 13):
        check_node(
            "Gemm",
            {"a": rand(3, 4)},
            initializers={"b": rand(4, 5, seed=1), "c": rand(5, seed=2)},
            opset=opset,
            rtol=RTOL,
            atol=ATOL,
        )


def test_gemm_batched_rows() -> None:
    w, bias = rand(33, 19, seed=1), rand(19, seed=2)
    model = _chain([helper.make_node("Gemm", ["x", "w", "b"], ["y"])], {"x": [None, 33]}, {"w": w, "b": bias})
    for batch in (1, 3, 70):
        assert_matches(model, {"x": rand(batch, 33)}, batch=True, rtol=RTOL, atol=ATOL)


def test_gemm_refuses_a_non_float() -> None:
    model = _chain(
        [helper.make_node("Gemm", ["x", "w"], ["y"])],
        {"x": [2, 3]},
        {"w": np.ones((3, 2), np.int32)},
        dtype=TensorProto.INT32,
    )
    with pytest.raises(ConversionRefused, match="Gemm"):
        convert_model(model, {"x": np.ones((2, 3), np.int32)})


# -- MatMul ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "a_shape,b_shape",
    [
        ((7,), (7,)),
        ((7,), (7, 5)),
        ((3, 7), (7,)),
        ((2, 7), (3, 7, 5)),
        ((2, 3, 5, 7), (7, 6)),
        ((2, 1, 5, 7), (3, 7, 6)),
        ((4, 5, 7), (1, 7, 9)),
        ((1, 300), (300, 17)),
        ((6, 600, 4), (4, 530)),
    ],
)
@pytest.mark.parametrize("b_const", [True, False])
def test_matmul_numpy_semantics(a_shape: tuple[int, ...], b_shape: tuple[int, ...], b_const: bool) -> None:
    a, b = rand(*a_shape), rand(*b_shape, seed=1)
    if b_const:
        check_node("MatMul", {"a": a}, initializers={"b": b}, rtol=RTOL, atol=ATOL)
    else:
        check_node("MatMul", {"a": a, "b": b}, rtol=RTOL, atol=ATOL)


def test_matmul_constant_a() -> None:
    model = _chain([helper.make_node("MatMul", ["a", "b"], ["y"])], {"b": [3, 7, 5]}, {"a": rand(4, 7)})
    assert_matches(model, {"b": rand(3, 7, 5, seed=1)}, rtol=RTOL, atol=ATOL)


def test_matmul_attention_style_batched() -> None:
    # Q [N, heads, S, d] . K^T [N, heads, d, S], both computed.
    nodes = [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["y"]),
    ]
    model = _chain(nodes, {"q": [None, 2, 5, 8], "k": [None, 2, 5, 8]}, {})
    assert_matches(model, {"q": rand(3, 2, 5, 8), "k": rand(3, 2, 5, 8, seed=1)}, batch=True, rtol=RTOL, atol=ATOL)


# -- Conv -----------------------------------------------------------------------


CONV_CASES: list[tuple[str, tuple[int, ...], tuple[int, ...], dict[str, Any]]] = [
    ("1x1", (2, 5, 6, 7), (3, 5, 1, 1), {}),
    ("1x1-stride2", (1, 6, 9, 8), (20, 6, 1, 1), {"strides": [2, 2]}),
    ("3x3-pad", (2, 3, 9, 10), (5, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    ("3x3-asym-stride", (1, 4, 11, 9), (6, 4, 3, 3), {"pads": [1, 0, 2, 1], "strides": [2, 1]}),
    ("5x3-dilated", (1, 3, 13, 12), (4, 3, 5, 3), {"dilations": [2, 3], "pads": [2, 1, 3, 0]}),
    ("same-upper", (1, 3, 10, 9), (4, 3, 4, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    ("same-lower", (1, 3, 10, 9), (4, 3, 4, 3), {"auto_pad": "SAME_LOWER", "strides": [3, 2]}),
    ("valid", (1, 3, 10, 9), (4, 3, 3, 2), {"auto_pad": "VALID"}),
    ("groups", (2, 6, 7, 7), (9, 2, 3, 3), {"group": 3, "pads": [1, 1, 1, 1]}),
    ("depthwise", (2, 6, 9, 10), (6, 1, 3, 3), {"group": 6, "pads": [1, 1, 1, 1]}),
    ("depthwise-s2", (1, 5, 17, 16), (5, 1, 3, 3), {"group": 5, "pads": [1, 1, 1, 1], "strides": [2, 2]}),
    ("depthwise-mult2-5x5", (1, 4, 12, 13), (8, 1, 5, 5), {"group": 4, "pads": [2, 1, 2, 2], "dilations": [1, 2]}),
    ("depthwise-narrow", (1, 4, 5, 3), (4, 1, 3, 3), {"group": 4, "pads": [1, 1, 1, 1]}),
    ("depthwise-5-wide", (2, 2, 6, 5), (2, 1, 3, 3), {"group": 2, "pads": [1, 1, 1, 1]}),
    ("depthwise-s3", (1, 3, 11, 14), (3, 1, 3, 3), {"group": 3, "strides": [3, 3], "pads": [1, 1, 1, 1]}),
    ("depthwise-s2-odd", (1, 3, 9, 11), (6, 1, 3, 3), {"group": 3, "strides": [2, 2], "pads": [0, 1, 1, 0]}),
    ("wide-K-M-N", (1, 40, 25, 24), (140, 40, 3, 3), {"pads": [1, 1, 1, 1]}),
    ("7x7-s2-stem", (1, 3, 30, 30), (8, 3, 7, 7), {"pads": [3, 3, 3, 3], "strides": [2, 2]}),
    ("big-kernel-small-image", (1, 2, 3, 3), (3, 2, 5, 5), {"pads": [2, 2, 2, 2]}),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name,x_shape,w_shape,attrs", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_2d(
    name: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...], attrs: dict[str, Any], bias: bool
) -> None:
    inits = {"w": rand(*w_shape, seed=1, scale=0.3)}
    if bias:
        inits["b"] = rand(w_shape[0], seed=2)
    check_node("Conv", {"x": rand(*x_shape)}, initializers=inits, attrs=attrs, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "x_shape,w_shape,attrs",
    [
        ((2, 4, 17), (6, 4, 3), {"pads": [1, 1]}),
        ((1, 3, 20), (5, 3, 4), {"strides": [3], "dilations": [2], "pads": [0, 2]}),
        ((1, 4, 9), (4, 1, 3), {"group": 4, "auto_pad": "SAME_UPPER"}),
        ((1, 6, 33), (4, 3, 1), {"group": 2}),
    ],
)
def test_conv_1d(x_shape: tuple[int, ...], w_shape: tuple[int, ...], attrs: dict[str, Any]) -> None:
    check_node(
        "Conv",
        {"x": rand(*x_shape)},
        initializers={"w": rand(*w_shape, seed=1), "b": rand(w_shape[0], seed=2)},
        attrs=attrs,
        rtol=RTOL,
        atol=ATOL,
    )


def test_conv_batched_images() -> None:
    model = _chain(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])],
        {"x": [None, 3, 12, 11]},
        {"w": rand(10, 3, 3, 3, seed=1), "b": rand(10, seed=2)},
    )
    for batch in (1, 4):
        assert_matches(model, {"x": rand(batch, 3, 12, 11)}, batch=True, rtol=RTOL, atol=ATOL)


def test_conv_refusals() -> None:
    # Computed weights.
    model = _chain(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="dyn")], {"x": [1, 2, 5, 5], "w": [3, 2, 3, 3]}, {}
    )
    with pytest.raises(ConversionRefused, match=r"'dyn' \(Conv\): the weights.*must be known at build time"):
        convert_model(model, {"x": rand(1, 2, 5, 5), "w": rand(3, 2, 3, 3)})
    # 3-D convolution.
    model = _chain(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="vol")], {"x": [1, 2, 4, 4, 4]}, {"w": rand(3, 2, 3, 3, 3)}
    )
    with pytest.raises(ConversionRefused, match=r"'vol' \(Conv\).*3-D convolution"):
        convert_model(model, {"x": rand(1, 2, 4, 4, 4)})


# -- passes: folding and fusion ---------------------------------------------------


def _compare_fused(model: onnx.ModelProto, feed: dict[str, np.ndarray], expect_ops: list[str]) -> None:
    """Converted with fusion: matches onnxruntime, has exactly ``expect_ops``; and equals the unfused build."""
    want = ort_run(model, feed)
    fused = convert_model(model, feed)
    assert [n.op_type for n in fused.graph.nodes] == expect_ops
    got = run_converted(model, feed)
    for name, expected in want.items():
        np.testing.assert_allclose(got[name], expected, rtol=RTOL, atol=ATOL)
    mp = pytest.MonkeyPatch()
    mp.setattr(passes, "prepare", lambda g: (passes.remove_dead(g), g)[1])
    try:
        plain = run_converted(model, feed)
    finally:
        mp.undo()
    for name in want:
        np.testing.assert_allclose(got[name], plain[name], rtol=1e-5, atol=1e-5)


def _bn_params(c: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "scale": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "shift": rng.normal(0, 0.2, c).astype(np.float32),
        "mean": rng.normal(0, 0.2, c).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }


def test_batchnorm_folds_into_conv_then_relu() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["y"]),
    ]
    model = _chain(nodes, {"x": [1, 3, 8, 9]}, {"w": rand(5, 3, 3, 3, seed=1), **_bn_params(5, 2)})
    _compare_fused(model, {"x": rand(1, 3, 8, 9)}, ["Conv"])


def test_batchnorm_folds_into_gemm_with_transposed_b_and_bias() -> None:
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1, beta=0.5),
        helper.make_node("BatchNormalization", ["g", "scale", "shift", "mean", "var"], ["y"]),
    ]
    model = _chain(nodes, {"x": [4, 6]}, {"w": rand(7, 6, seed=1), "b": rand(7, seed=3), **_bn_params(7, 2)})
    _compare_fused(model, {"x": rand(4, 6)}, ["Gemm"])


def test_batchnorm_not_folded_when_conv_output_is_shared() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["y"]),
        helper.make_node("Relu", ["c"], ["z"]),
    ]
    model = _chain(nodes, {"x": [1, 2, 5, 5]}, {"w": rand(3, 2, 3, 3, seed=1), **_bn_params(3, 2)}, outputs=["y", "z"])
    graph = convert_model(model, {"x": rand(1, 2, 5, 5)}).graph
    assert [n.op_type for n in graph.nodes] == ["Conv", "BatchNormalization", "Relu"]


def test_matmul_add_bias_and_activation_fuse() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["bias", "m"], ["a"]),
        helper.make_node("LeakyRelu", ["a"], ["y"], alpha=0.2),
    ]
    model = _chain(nodes, {"x": [3, 5, 20]}, {"w": rand(20, 18, seed=1), "bias": rand(1, 18, seed=2)})
    _compare_fused(model, {"x": rand(3, 5, 20)}, ["MatMul"])


@pytest.mark.parametrize(
    "act",
    [
        helper.make_node("Clip", ["a", "lo", "hi"], ["y"]),
        helper.make_node("Sigmoid", ["a"], ["y"]),
        helper.make_node("HardSigmoid", ["a"], ["y"], alpha=0.3, beta=0.4),
        helper.make_node("Tanh", ["a"], ["y"]),
        helper.make_node("LeakyRelu", ["a"], ["y"], alpha=1.5),
    ],
    ids=lambda n: f"{n.op_type}",
)
def test_gemm_activations_fuse(act: onnx.NodeProto) -> None:
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["a"]), act]
    inits = {"w": rand(9, 21, seed=1), "b": rand(21, seed=2)}
    if act.op_type == "Clip":
        inits.update(lo=np.array(-0.5, np.float32), hi=np.array(1.0, np.float32))
    model = _chain(nodes, {"x": [6, 9]}, inits)
    _compare_fused(model, {"x": rand(6, 9)}, ["Gemm"])


def test_conv_channel_bias_residual_and_relu_fuse() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["h", "cb"], ["hb"]),
        helper.make_node("Conv", ["hb", "w2", "b2"], ["h2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["hb", "h2"], ["s"]),
        helper.make_node("Clip", ["s"], ["y"], min=0.0, max=6.0),
    ]
    inits = {
        "w1": rand(4, 4, 3, 3, seed=1, scale=0.3),
        "cb": rand(1, 4, 1, 1, seed=2),
        "w2": rand(4, 4, 3, 3, seed=3, scale=0.3),
        "b2": rand(4, seed=4),
    }
    model = _chain(nodes, {"x": [1, 4, 7, 6]}, inits, opset=10)
    _compare_fused(model, {"x": rand(1, 4, 7, 6)}, ["Conv", "Conv"])


def test_depthwise_residual_and_hard_swish_fuse() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], group=3, pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["h", "x"], ["s"]),
        helper.make_node("HardSwish", ["s"], ["y"]),
    ]
    model = _chain(nodes, {"x": [2, 3, 6, 9]}, {"w": rand(3, 1, 3, 3, seed=1)})
    _compare_fused(model, {"x": rand(2, 3, 6, 9)}, ["Conv"])


@pytest.mark.parametrize("group,scale_shape", [(1, ()), (1, (1, 4, 1, 1)), (2, (4, 1, 1))])
def test_input_scale_folds_into_conv(group: int, scale_shape: tuple[int, ...]) -> None:
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["xs"]),
        helper.make_node("Conv", ["xs", "w", "b"], ["y"], pads=[1, 1, 1, 1], group=group),
    ]
    inits = {"s": rand(*scale_shape, seed=3), "w": rand(6, 4 // group, 3, 3, seed=1), "b": rand(6, seed=2)}
    model = _chain(nodes, {"x": [2, 4, 5, 7]}, inits)
    _compare_fused(model, {"x": rand(2, 4, 5, 7)}, ["Conv"])


def test_input_scale_kept_when_shared_or_spatial() -> None:
    nodes = [
        helper.make_node("Mul", ["x", "s"], ["xs"]),
        helper.make_node("Conv", ["xs", "w"], ["y"]),
    ]
    model = _chain(nodes, {"x": [1, 2, 5, 5]}, {"s": rand(5, 5, seed=3), "w": rand(3, 2, 3, 3, seed=1)})
    _compare_fused(model, {"x": rand(1, 2, 5, 5)}, ["Mul", "Conv"])


# -- end to end ---------------------------------------------------------------------


@pytest.mark.parametrize("fold_bn", [False, True])
def test_tiny_resnet_batched(fold_bn: bool) -> None:
    model = resnet50_shaped(width=0.125, image=32, blocks=(1, 1, 1, 1), fold_bn=fold_bn, num_classes=10)
    converted = convert(model, name="resnet", version="1", max_batch=4)
    assert [n.op_type for n in converted.graph.nodes].count("BatchNormalization") == 0
    assert [n.op_type for n in converted.graph.nodes].count("Relu") == 0
    for batch in (1, 3):
        x = image_inputs(batch, image=32, seed=batch)
        want = ort_run(model, {"input": x})["logits"]
        got = runner().run(converted, {"input": x})["logits"]
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_digits_cnn_and_mlp_batched() -> None:
    x = digits_inputs(5)
    assert_matches(digits_cnn(), {"pixels": x.reshape(5, 1, 8, 8)}, batch=True, rtol=RTOL, atol=ATOL)
    assert_matches(digits_mlp(), {"pixels": x}, batch=True, rtol=RTOL, atol=ATOL)


# -- helpers ------------------------------------------------------------------------


def _chain(
    nodes: list[onnx.NodeProto],
    inputs: dict[str, list[Any]],
    inits: dict[str, np.ndarray],
    *,
    outputs: list[str] | None = None,
    opset: int = 17,
    dtype: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """A model of ``nodes``; ``inputs`` maps graph inputs to shapes (None: the batch dimension "N")."""
    graph_inputs = [
        helper.make_tensor_value_info(name, dtype, ["N" if d is None else d for d in shape])
        for name, shape in inputs.items()
    ]
    graph_outputs = [onnx.ValueInfoProto(name=o) for o in (outputs or [nodes[-1].output[0]])]
    initializers = [numpy_helper.from_array(np.asarray(a), name) for name, a in inits.items()]
    graph = helper.make_graph(nodes, "dense_test", graph_inputs, graph_outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model
