"""Elementwise op families of the converter: "unary" (ops_unary.c) and "binary" (ops_binary.c).

Every op against onnxruntime on random inputs (odd sizes, so the SIMD tails run; ranks 0..8;
broadcasting in every direction), each element type the kernels take, the opset variants
(Clip's attributes before 11 and inputs after, Gelu 20, HardSwish 14, Mod 28), batched
models, the accuracy of the vectorised math (ea_vmath.h) against float64 references, and
refusals.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from scipy.special import erf, erfc, expit

from agent.convert.build import lower_graph
from agent.convert.ir import Graph, Node, Value
from agent.convert.ops.unary import ACTIVATION_GELU_TANH, ACTIVATION_KINDS, activation_spec
from agent.errors import ConversionRefused
from tests.convert_testkit import assert_matches, check_node, convert_model, node_model, run_converted

ROOT = Path(__file__).resolve().parent.parent
F32 = np.float32


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def normal(shape: tuple[int, ...], scale: float = 2.0, seed: int = 0) -> np.ndarray:
    return np.asarray(rng(seed).standard_normal(shape) * scale, dtype=F32)


def ints(shape: tuple[int, ...], dtype: Any, lo: int = -50, hi: int = 50, seed: int = 0) -> np.ndarray:
    return np.asarray(rng(seed).integers(lo, hi, shape), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# unary: float32
# ---------------------------------------------------------------------------------------------
SHAPE = (3, 1, 37)  # 111 elements: 27 vectors and a tail of 3

# op -> (opset, attrs, input domain)
UNARY_FLOAT: list[tuple[str, int, dict[str, Any], str]] = [
    ("Sqrt", 13, {}, "pos"),
    ("Exp", 13, {}, "wide"),
    ("Log", 13, {}, "pos"),
    ("Neg", 13, {}, "any"),
    ("Abs", 13, {}, "any"),
    ("Relu", 14, {}, "any"),
    ("Relu", 7, {}, "any"),
    ("LeakyRelu", 16, {}, "any"),
    ("LeakyRelu", 16, {"alpha": 0.3}, "any"),
    ("Elu", 7, {}, "any"),
    ("Elu", 13, {"alpha": 0.7}, "any"),
    ("Selu", 13, {}, "any"),
    ("Selu", 13, {"alpha": 1.5, "gamma": 2.0}, "any"),
    ("Sigmoid", 13, {}, "wide"),
    ("HardSigmoid", 13, {}, "any"),
    ("HardSigmoid", 13, {"alpha": 0.3, "beta": 0.4}, "any"),
    ("HardSwish", 14, {}, "any"),
    ("Tanh", 13, {}, "wide"),
    ("Erf", 13, {}, "any"),
    ("Gelu", 20, {}, "any"),
    ("Gelu", 20, {"approximate": "tanh"}, "any"),
    ("Gelu", 20, {"approximate": "none"}, "wide"),
    ("Reciprocal", 13, {}, "nonzero"),
    ("Floor", 13, {}, "any"),
    ("Ceil", 13, {}, "any"),
    ("Round", 11, {}, "halves"),
    ("Softplus", 7, {}, "wide"),
    ("Softsign", 7, {}, "any"),
    ("Sign", 13, {}, "any"),
    ("Celu", 12, {}, "any"),
    ("Celu", 12, {"alpha": 2.0}, "any"),
    ("ThresholdedRelu", 10, {}, "any"),
    ("ThresholdedRelu", 10, {"alpha": 0.5}, "any"),
    ("Shrink", 9, {}, "any"),
    ("Shrink", 9, {"bias": 0.3, "lambd": 1.0}, "any"),
    ("Mish", 18, {}, "any"),
    ("Sin", 7, {}, "any"),
    ("Cos", 7, {}, "any"),
    ("Tan", 7, {}, "unit"),
    ("Asin", 7, {}, "unit"),
    ("Acos", 7, {}, "unit"),
    ("Atan", 7, {}, "any"),
    ("Sinh", 9, {}, "any"),
    ("Cosh", 9, {}, "any"),
    ("Asinh", 9, {}, "any"),
    ("Acosh", 9, {}, "ge1"),
    ("Atanh", 9, {}, "unit"),
]


def domain_input(domain: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    r = rng(seed)
    if domain == "pos":
        return r.uniform(0.01, 50.0, shape).astype(F32)
    if domain == "wide":
        return (r.standard_normal(shape) * 15).astype(F32)
    if domain == "nonzero":
        x = r.standard_normal(shape)
        return np.where(np.abs(x) < 0.05, 0.5, x).astype(F32)
    if domain == "unit":
        return r.uniform(-0.95, 0.95, shape).astype(F32)
    if domain == "ge1":
        return r.uniform(1.0, 20.0, shape).astype(F32)
    if domain == "halves":
        return (r.integers(-20, 20, shape) / 2).astype(F32)
    return (r.standard_normal(shape) * 3).astype(F32)


@pytest.mark.parametrize(("op", "opset", "attrs", "domain"), UNARY_FLOAT, ids=lambda v: str(v))
def test_unary_float(op: str, opset: int, attrs: dict[str, Any], domain: str) -> None:
    check_node(op, {"x": domain_input(domain, SHAPE)}, attrs=attrs, opset=opset)


@pytest.mark.parametrize("shape", [(), (1,), (5,), (4, 4), (2, 3, 5, 7), (1, 1, 1, 1, 1, 3)])
def test_unary_shapes(shape: tuple[int, ...]) -> None:
    x = normal(shape)
    check_node("Sigmoid", {"x": x}, opset=13)
    check_node("Abs", {"x": x}, opset=13)


def test_unary_special_values() -> None:
    specials = [0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, 0.5, -0.5, 4.0, -4.0, 5.6, -5.6, 9.5, -9.5, 10.0, -10.0]
    specials += [20.0, -20.0, 88.0, 88.7, 89.0, -87.0, -88.0, -100.0, -104.0, -110.0, 1e30, -1e30]
    specials += [np.inf, -np.inf, np.nan]
    x = np.array(specials, dtype=F32)
    d = x.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        truth = {
            "Exp": np.exp(d),
            "Sigmoid": expit(d),
            "Tanh": np.tanh(d),
            "Erf": erf(d),
            "Elu": np.where(d > 0, d, np.expm1(d)),
        }
    for op, want in truth.items():
        # onnxruntime's own Sigmoid/Tanh are off by up to 1e-8 absolute in the tails (2e-4 relative): atol.
        got = check_node(op, {"x": x}, opset=13, atol=1e-7)["y"]
        with np.errstate(over="ignore"):
            want32 = want.astype(F32)
        np.testing.assert_allclose(got, want32, rtol=5e-7, atol=1e-37, err_msg=op)
    check_node("Selu", {"x": x}, opset=13, atol=1e-7)
    finite = x[np.isfinite(x)]
    check_node("Gelu", {"x": finite}, opset=20, atol=1e-7)
    # onnxruntime's tanh form cancels for x << 0 (1 + tanh u): off by 2e-3 relative at x = -4.
    check_node("Gelu", {"x": finite}, opset=20, attrs={"approximate": "tanh"}, atol=3e-7)


# ---------------------------------------------------------------------------------------------
# accuracy of ea_vmath.h against float64 references
# ---------------------------------------------------------------------------------------------
def _accuracy_input() -> np.ndarray:
    r = rng(5)
    parts = [
        r.standard_normal(4000) * 3,
        r.uniform(-90, 90, 4000),
        2.0 ** np.arange(-30, 6.5, 0.05),
        -(2.0 ** np.arange(-30, 6.5, 0.05)),
        np.linspace(-6, 6, 4001),
    ]
    return np.concatenate(parts).astype(F32)


def _max_rel(got: np.ndarray, want: np.ndarray, floor: float) -> float:
    mask = np.abs(want) >= floor
    return float(np.max(np.abs(got.astype(np.float64) - want)[mask] / np.abs(want[mask])))


@pytest.mark.parametrize(
    ("op", "opset", "attrs", "reference", "lo", "bound"),
    [
        ("Exp", 13, {}, np.exp, -87.0, 3e-7),
        ("Log", 13, {}, lambda d: np.log(np.abs(d)), -100.0, 2e-7),
        ("Tanh", 13, {}, np.tanh, -100.0, 5e-7),
        ("Sigmoid", 13, {}, expit, -87.0, 5e-7),
        ("Erf", 13, {}, erf, -100.0, 5e-7),
        ("Elu", 13, {}, lambda d: np.where(d > 0, d, np.expm1(d)), -100.0, 5e-7),
        ("Gelu", 20, {}, lambda d: 0.5 * d * erfc(-d / np.sqrt(2)), -1.3, 1e-6),
        ("Gelu", 20, {}, lambda d: 0.5 * d * erfc(-d / np.sqrt(2)), -5.5, 5e-6),
        (
            "Gelu",
            20,
            {"approximate": "tanh"},
            lambda d: d * expit(2 * np.sqrt(2 / np.pi) * (d + 0.044715 * d**3)),
            -3.0,
            1e-6,
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_vmath_accuracy(op: str, opset: int, attrs: dict[str, Any], reference: Any, lo: float, bound: float) -> None:
    x = _accuracy_input()
    x = x[(x >= lo) & (x <= 88.0)]
    if op == "Log":
        x = np.abs(x[x != 0])
    got = run_converted(node_model(op, {"x": x}, attrs=attrs, opset=opset), {"x": x})["y"]
    want = reference(x.astype(np.float64))
    assert _max_rel(got, want, floor=1e-30) <= bound


# ---------------------------------------------------------------------------------------------
# unary: integers, bool, IsNaN/IsInf, Clip variants
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64])
@pytest.mark.parametrize(("op", "opset"), [("Neg", 13), ("Abs", 13), ("Sign", 13), ("Relu", 14)])
def test_unary_signed_ints(op: str, opset: int, dtype: Any) -> None:
    if op == "Relu" and dtype != np.int32:
        pytest.skip("onnxruntime implements Relu-14 for int32 only (the kernel takes int8 and int64 too)")
    check_node(op, {"x": ints((3, 7), dtype, -100, 100)}, opset=opset)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int32, np.int64])
def test_unary_any_ints(dtype: Any) -> None:
    lo = 0 if dtype == np.uint8 else -100
    x = ints((5, 3), dtype, lo, 100)
    check_node("Abs", {"x": x}, opset=13)
    check_node("Sign", {"x": x}, opset=13)
    check_node("BitwiseNot", {"x": x}, opset=18)
    check_node("Clip", {"x": x}, initializers={"lo": np.array(lo + 20, dtype), "hi": np.array(60, dtype)}, opset=13)
    check_node("Clip", {"x": x}, initializers={"lo": np.array(10, dtype)}, opset=13)


def test_not_and_isnan_isinf() -> None:
    check_node("Not", {"x": rng(1).integers(0, 2, (4, 9)).astype(np.bool_)}, opset=7)
    x = np.array([0.0, np.inf, -np.inf, np.nan, 1.0, -3.0, np.nan], dtype=F32)
    check_node("IsNaN", {"x": x}, opset=13)
    for neg, pos in [(1, 1), (0, 1), (1, 0), (0, 0)]:
        check_node("IsInf", {"x": x}, attrs={"detect_negative": neg, "detect_positive": pos}, opset=10)


@pytest.mark.parametrize(
    "attrs", [{"min": -0.5, "max": 0.4}, {"min": -0.5}, {"max": 0.25}, {}, {"min": 0.4, "max": 0.4}]
)
def test_clip_attributes(attrs: dict[str, float]) -> None:
    check_node("Clip", {"x": normal(SHAPE)}, attrs=attrs, opset=10)


@pytest.mark.parametrize("opset", [11, 12, 13])
def test_clip_inputs(opset: int) -> None:
    x = normal(SHAPE)
    check_node("Clip", {"x": x}, initializers={"lo": np.array(-0.5, F32), "hi": np.array(0.3, F32)}, opset=opset)
    check_node("Clip", {"x": x}, initializers={"lo": np.array(-0.5, F32)}, opset=opset)
    check_node("Clip", {"x": x}, initializers={"lo": np.array(2.0, F32), "hi": np.array(-2.0, F32)}, opset=opset)
    # Absent min ("" input), constant max.
    model = node_model("Clip", {"x": x}, opset=opset)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0.7, F32), "hi"))
    model.graph.node[0].input.extend(["", "hi"])
    assert_matches(model, {"x": x})


def test_clip_bounds_computed_at_run_time() -> None:
    x = normal(SHAPE)
    check_node("Clip", {"x": x, "lo": np.array(-0.5, F32), "hi": np.array(1.5, F32)}, opset=13)
    xi = ints((4, 5), np.int64)
    check_node("Clip", {"x": xi, "lo": np.array(-7, np.int64), "hi": np.array(9, np.int64)}, opset=13)


# ---------------------------------------------------------------------------------------------
# binary
# ---------------------------------------------------------------------------------------------
BROADCASTS: list[tuple[tuple[int, ...], tuple[int, ...]]] = [
    ((3, 5, 7), (3, 5, 7)),  # same shape
    ((3, 5, 7), (7,)),  # bias over the last axis
    ((3, 5, 7), ()),  # scalar
    ((), (2, 9)),  # scalar first
    ((3, 5, 7), (5, 1)),  # per channel
    ((1,), (4, 3)),
    ((6, 1), (1, 6)),  # outer product
    ((2, 1, 3, 1), (5, 1, 6)),
    ((2, 3, 4, 1, 2, 3), (3, 1, 5, 1, 3)),  # rank 6
    ((2, 1, 2, 1, 2, 1, 2, 3), (1, 2, 1, 2, 1, 2, 1, 3)),  # rank 8
]


def _pair(a_shape: tuple[int, ...], b_shape: tuple[int, ...], dtype: Any, op: str) -> dict[str, np.ndarray]:
    if np.dtype(dtype) == np.float32:
        a, b = normal(a_shape, seed=1), normal(b_shape, seed=2)
        if op in ("Div", "Mod"):
            b = np.where(np.abs(b) < 0.1, 1.5, b)
        if op in ("Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Max", "Min"):
            b, a = np.round(b), np.round(a)  # ties
        return {"a": np.asarray(a, F32), "b": np.asarray(b, F32)}
    info = np.iinfo(dtype)
    lo, hi = max(int(info.min), -100), min(int(info.max), 100)
    a, b = ints(a_shape, dtype, lo, hi, seed=1), ints(b_shape, dtype, lo, hi, seed=2)
    if op in ("Div", "Mod"):
        b = np.where(b == 0, 7, b)
    if op in ("Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Max", "Min"):
        b, a = b % 4, a % 4
    return {"a": np.asarray(a, dtype), "b": np.asarray(b, dtype)}


ARITH = ["Add", "Sub", "Mul", "Div", "Max", "Min", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual"]


@pytest.mark.parametrize("shapes", BROADCASTS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("op", ARITH)
def test_binary_float_broadcast(op: str, shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    check_node(op, _pair(*shapes, F32, op), opset=13)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int32, np.int64])
@pytest.mark.parametrize("op", ARITH)
def test_binary_ints(op: str, dtype: Any) -> None:
    for shapes in [((3, 5, 7), (3, 5, 7)), ((3, 5, 7), (5, 1)), ((6, 1), (1, 6))]:
        check_node(op, _pair(*shapes, dtype, op), opset=14)


def test_integer_division_semantics() -> None:
    a = np.array([7, -7, 7, -7, 0, 5, -5, 100, -100], dtype=np.int64)
    b = np.array([2, 2, -2, -2, 3, 5, 3, -7, 7], dtype=np.int64)
    for dtype in (np.int32, np.int64):
        feed = {"a": a.astype(dtype), "b": b.astype(dtype)}
        check_node("Div", feed, opset=14)
        check_node("Mod", feed, opset=13)
        check_node("Mod", feed, attrs={"fmod": 1}, opset=13)
    check_node("Mod", {"a": ints((4, 5), np.uint8, 0, 200), "b": ints((5,), np.uint8, 1, 9)}, opset=13)


def test_mod_float() -> None:
    a, b = normal((4, 9), 5.0), normal((9,), 2.0, seed=3)
    check_node("Mod", {"a": a, "b": b}, attrs={"fmod": 1}, opset=13)
    check_node("Mod", {"a": a, "b": b}, opset=28)  # floor modulo of floats, new in opset 28


def test_prelu() -> None:
    x = normal((2, 3, 4, 5))
    check_node("PRelu", {"x": x}, initializers={"slope": normal((3, 1, 1), 0.3, seed=4)}, opset=16)
    check_node("PRelu", {"x": x}, initializers={"slope": normal((5,), 0.3, seed=4)}, opset=16)
    check_node("PRelu", {"x": x}, initializers={"slope": np.array([0.25], F32)}, opset=9)
    check_node("PRelu", {"x": x, "slope": normal((4, 5), 0.3, seed=4)}, opset=16)
    check_node("PRelu", {"x": ints((3, 4), np.int64)}, initializers={"slope": ints((4,), np.int64, -3, 3)}, opset=16)


@pytest.mark.parametrize(
    ("a_type", "b_type"),
    [(F32, F32), (F32, np.int32), (F32, np.int64), (np.int32, np.int32), (np.int64, np.int64), (np.int64, F32)],
)
def test_pow(a_type: Any, b_type: Any) -> None:
    if np.dtype(a_type) == np.float32:
        base = normal((3, 5, 7), 2.0)
        if np.dtype(b_type) == np.float32:
            base = np.abs(base) + 0.1
    else:
        base = ints((3, 5, 7), a_type, -6, 7)
    if np.dtype(b_type) == np.float32:
        exponent = rng(3).uniform(-2.0, 3.0, (5, 7)).astype(F32)
        if np.dtype(a_type) != np.float32:
            base = np.abs(base)
            exponent = np.abs(exponent)
    else:
        exponent = ints((5, 7), b_type, 0 if np.dtype(a_type) != np.float32 else -3, 6)
    check_node("Pow", {"a": base, "b": exponent}, opset=15)


def test_pow_fast_exponents() -> None:
    x = normal((4, 7))
    for e in (2.0, 1.0, 0.5, 3.0, -1.0, 0.0):
        check_node(
            "Pow",
            {"x": x if e in (2.0, 1.0, 3.0, -1.0, 0.0) else np.abs(x)},
            initializers={"e": np.array(e, F32)},
            opset=15,
        )


@pytest.mark.parametrize("op", ["And", "Or", "Xor", "Equal"])
def test_bool_ops(op: str) -> None:
    r = rng(7)
    a, b = r.integers(0, 2, (3, 4, 5)).astype(np.bool_), r.integers(0, 2, (4, 1)).astype(np.bool_)
    check_node(op, {"a": a, "b": b}, opset=11)


@pytest.mark.parametrize("op", ["BitwiseAnd", "BitwiseOr", "BitwiseXor"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int32, np.int64])
def test_bitwise(op: str, dtype: Any) -> None:
    info = np.iinfo(dtype)
    a, b = ints((3, 5, 7), dtype, int(info.min), int(info.max)), ints((7,), dtype, int(info.min), int(info.max), seed=2)
    check_node(op, {"a": a, "b": b}, opset=18)


@pytest.mark.parametrize("dtype", [F32, np.int64, np.int32, np.uint8, np.int8])
def test_where(dtype: Any) -> None:
    r = rng(9)
    cond = r.integers(0, 2, (4, 1, 5)).astype(np.bool_)
    a, b = ints((3, 5), dtype, 0, 100, seed=1), ints((4, 3, 1), dtype, 0, 100, seed=2)
    check_node("Where", {"c": cond, "a": a, "b": b}, opset=16)
    check_node("Where", {"c": cond[:, :, :1], "a": a, "b": b}, opset=16)
    cond2 = r.integers(0, 2, (7, 9)).astype(np.bool_)
    check_node("Where", {"c": cond2, "a": ints((7, 9), dtype, 0, 9), "b": ints((), dtype, 0, 9)}, opset=16)


# ---------------------------------------------------------------------------------------------
# variadic Sum / Mean / Max / Min
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Sum", "Mean", "Max", "Min"])
def test_variadic(op: str) -> None:
    check_node(op, {"a": normal((4, 5))}, opset=13)
    check_node(op, {"a": normal((4, 5)), "b": normal((5,), seed=1)}, opset=13)
    check_node(op, {"a": normal((1, 5)), "b": normal((5,), seed=1), "c": normal((3, 4, 5), seed=2)}, opset=13)
    check_node(
        op,
        {
            "a": normal((3, 1, 5)),
            "b": normal((4, 1), seed=1),
            "c": normal((5,), seed=2),
            "d": normal((3, 4, 5), seed=3),
        },
        opset=8,
    )


def test_variadic_ints() -> None:
    for op in ("Max", "Min"):
        check_node(
            op,
            {"a": ints((4, 5), np.int64), "b": ints((5,), np.int64, seed=1), "c": ints((4, 1), np.int64, seed=2)},
            opset=13,
        )
        check_node(op, {"a": ints((4, 5), np.uint8, 0, 200), "b": ints((5,), np.uint8, 0, 200, seed=1)}, opset=13)


# Mixed ranks 0..3, rank-0 and shape-(1,) operands, rank-0 outputs (DynamicQuantizeLinear's
# expansion takes Min/Max of a rank-0 ReduceMin/ReduceMax output and a rank-0 constant).
VARIADIC_RANKS: list[list[tuple[int, ...]]] = [
    [(), (1,)],
    [(1,), ()],
    [(), ()],
    [(), (), ()],
    [(), (1,), (1, 1)],
    [(), (3,)],
    [(3,), ()],
    [(1,), (1,)],
    [(), (2, 1), (1, 3)],
    [(1,), (1, 3, 1), (), (2, 1, 4)],
    [(2, 3, 4), (), (1,)],
    [(1, 1, 1), ()],
    [(), (1, 1, 1), (1,)],
]


def _variadic_model(op: str, arrays: list[np.ndarray], constant: list[bool], opset: int) -> onnx.ModelProto:
    names = [f"in{i}" for i in range(len(arrays))]
    graph_inputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT if a.dtype == F32 else TensorProto.INT64, list(a.shape))
        for n, a, c in zip(names, arrays, constant, strict=True)
        if not c
    ]
    inits = [onnx.numpy_helper.from_array(a, n) for n, a, c in zip(names, arrays, constant, strict=True) if c]
    graph = helper.make_graph(
        [helper.make_node(op, names, ["y"])], "variadic", graph_inputs, [onnx.ValueInfoProto(name="y")], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("shapes", VARIADIC_RANKS, ids=lambda s: "+".join(str(d) for d in s))
@pytest.mark.parametrize("op", ["Sum", "Mean", "Max", "Min"])
def test_variadic_mixed_ranks(op: str, shapes: list[tuple[int, ...]]) -> None:
    arrays = [np.asarray(np.round(normal(s, seed=i))) for i, s in enumerate(shapes)]  # rounded: ties for Max/Min
    n = len(shapes)
    # every operand a run-time input; then every one but the first, then every one but the last, a constant
    for constant in ([False] * n, [False] + [True] * (n - 1), [True] * (n - 1) + [False]):
        model = _variadic_model(op, arrays, constant, opset=13)
        feed = {f"in{i}": a for i, a in enumerate(arrays) if not constant[i]}
        assert_matches(model, feed)
    if op in ("Max", "Min"):
        int_arrays = [ints(s, np.int64, seed=i) for i, s in enumerate(shapes)]
        model = _variadic_model(op, int_arrays, [False] + [True] * (n - 1), opset=13)
        assert_matches(model, {"in0": int_arrays[0]})


def test_dynamic_quantize_linear_expansion() -> None:
    """ReduceMin/ReduceMax to a scalar, clamped against a rank-0 constant by Min/Max, as ONNX expands
    DynamicQuantizeLinear: the binary ops then run with every operand and the output of rank 0."""
    nodes = [
        helper.make_node("ReduceMin", ["x"], ["lo"], keepdims=0),
        helper.make_node("Min", ["lo", "zero"], ["lo_adj"]),
        helper.make_node("ReduceMax", ["x"], ["hi"], keepdims=0),
        helper.make_node("Max", ["hi", "zero"], ["hi_adj"]),
        helper.make_node("Sub", ["hi_adj", "lo_adj"], ["range"]),
        helper.make_node("Div", ["range", "qmax"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "dq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])],
        [onnx.ValueInfoProto(name="y")],
        [
            onnx.numpy_helper.from_array(np.array(0.0, F32), "zero"),
            onnx.numpy_helper.from_array(np.array(255.0, F32), "qmax"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for x in (normal((6,)), np.abs(normal((6,), seed=1)), -np.abs(normal((6,), seed=2))):
        assert_matches(model, {"x": x})


# ---------------------------------------------------------------------------------------------
# batched models: the batch dimension changes at run time
# ---------------------------------------------------------------------------------------------
def _batched(
    nodes: list[onnx.NodeProto], inputs: dict[str, tuple[int, ...]], inits: dict[str, np.ndarray], opset: int = 17
) -> onnx.ModelProto:
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", *s]) for n, s in inputs.items()]
    outputs = [onnx.ValueInfoProto(name=nodes[-1].output[0])]
    initializers = [onnx.numpy_helper.from_array(a, n) for n, a in inits.items()]
    graph = helper.make_graph(nodes, "batched", graph_inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("batch", [1, 3, 70])
def test_batched_broadcasting(batch: int) -> None:
    nodes = [
        helper.make_node("Add", ["x", "bias"], ["t1"]),  # bias over the last axis
        helper.make_node("Mul", ["t1", "scale"], ["t2"]),  # per channel (C, 1)
        helper.make_node("Sub", ["t2", "z"], ["t3"]),  # two batched operands (N, 3, 1) and (N, 1, 5)
        helper.make_node("Sum", ["w", "bias", "t3"], ["t4"]),  # w (N, 1, 5) + bias (5) -> (N, 1, 5) temp
        helper.make_node("Gelu", ["t4"], ["t5"]),
        helper.make_node("Max", ["t5", "floor"], ["t6"]),
        helper.make_node("Where", ["mask", "t6", "x"], ["y"]),
    ]
    inits = {
        "bias": normal((5,), seed=1),
        "scale": normal((3, 1), seed=2),
        "floor": np.array(-0.1, F32),
        "mask": rng(3).integers(0, 2, (1, 3, 5)).astype(np.bool_),
    }
    model = _batched(nodes, {"x": (3, 5), "z": (3, 1), "w": (1, 5)}, inits, opset=20)
    feed = {"x": normal((batch, 3, 5), seed=4), "z": normal((batch, 3, 1), seed=5), "w": normal((batch, 1, 5), seed=6)}
    assert_matches(model, feed, batch=True)


def test_batched_unary_chain() -> None:
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["a"]),
        helper.make_node("Clip", ["a"], ["b"], min=0.2, max=0.7),
        helper.make_node("Tanh", ["b"], ["y"]),
    ]
    model = _batched(nodes, {"x": (37,)}, {}, opset=10)
    assert_matches(model, {"x": normal((5, 37))}, batch=True)


# ---------------------------------------------------------------------------------------------
# activation kinds shared with other families (ea_vmath.h)
# ---------------------------------------------------------------------------------------------
def test_activation_kinds_match_header() -> None:
    header = (ROOT / "native/onnx/ea_vmath.h").read_text()
    codes = {m[1]: int(m[2]) for m in re.finditer(r"EA_ACT_(\w+) = (\d+)", header)}
    camel = {name.replace("_", ""): code for name, code in codes.items()}
    for op, code in ACTIVATION_KINDS.items():
        assert camel[op.upper()] == code, op
    assert codes["GELU_TANH"] == ACTIVATION_GELU_TANH
    assert codes["NONE"] == 0


def test_activation_spec() -> None:
    values = {
        "x": Value("x", np.dtype(F32), (3,)),
        "lo": Value("lo", np.dtype(F32), (), const=np.array(-1.0, F32)),
        "hi": Value("hi", np.dtype(F32), (), const=None),
        "xi": Value("xi", np.dtype(np.int64), (3,)),
    }
    graph = Graph(nodes=[], values=values, inputs=["x"], outputs=[], batched=False)

    def node(op: str, inputs: list[str], opset: int = 13, **attrs: Any) -> Node:
        return Node(op, "", "n", inputs, ["y"], dict(attrs), opset)

    assert activation_spec(node("Relu", ["x"]), graph) == (1, 0.0, 0.0)
    assert np.allclose(activation_spec(node("LeakyRelu", ["x"]), graph) or (), (2, 0.01, 0.0))
    assert np.allclose(activation_spec(node("HardSigmoid", ["x"]), graph) or (), (5, 0.2, 0.5))
    assert activation_spec(node("Clip", ["x"], opset=10, min=0.0, max=6.0), graph) == (3, 0.0, 6.0)
    kind, lo, hi = activation_spec(node("Clip", ["x", "lo"]), graph) or (None, None, None)
    assert (kind, lo) == (3, -1.0) and hi == pytest.approx(float(np.finfo(F32).max))
    assert activation_spec(node("Clip", ["x", "lo", "hi"]), graph) is None  # max computed at run time
    assert activation_spec(node("Gelu", ["x"], opset=20, approximate="tanh"), graph) == (10, 0.0, 0.0)
    assert activation_spec(node("Relu", ["xi"]), graph) is None
    assert activation_spec(node("Softsign", ["x"]), graph) is None


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------
def _refusal(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> str:
    with pytest.raises(ConversionRefused) as info:
        convert_model(model, feed)
    return str(info.value)


@pytest.mark.parametrize(
    ("elem", "dtype", "name"),
    [
        (TensorProto.DOUBLE, np.float64, "DOUBLE"),
        (TensorProto.FLOAT16, np.float16, "FLOAT16"),
        (TensorProto.INT16, np.int16, "INT16"),
    ],
)
def test_refuses_unsupported_element_types(elem: int, dtype: Any, name: str) -> None:
    model = node_model("Add", {"a": np.ones((2, 3), F32), "b": np.ones((3,), F32)}, opset=14)
    for vi in model.graph.input:
        vi.type.tensor_type.elem_type = elem
    assert name in _refusal(model, {"a": np.ones((2, 3), dtype), "b": np.ones((3,), dtype)})


def test_refuses_float_mod_without_fmod_before_opset_28() -> None:
    feed = {"a": normal((3,)), "b": normal((3,), seed=1)}
    _refusal(node_model("Mod", feed, opset=13), feed)


def _lower(node: Node, values: dict[str, Value]) -> str:
    graph = Graph(
        nodes=[node],
        values=values,
        inputs=[n for n in node.inputs if n and values[n].const is None],
        outputs=node.outputs,
        batched=False,
    )
    with pytest.raises(ConversionRefused) as info:
        lower_graph(graph)
    return "\n".join(info.value.problems)


def test_lowering_refusals_name_the_node() -> None:
    f = np.dtype(F32)
    x, y = Value("x", f, (4,)), Value("y", f, (4,))
    text = _lower(Node("Gelu", "", "g1", ["x"], ["y"], {"approximate": "erf2"}, 20), {"x": x, "y": y})
    assert "node 'g1' (Gelu)" in text and "approximate" in text
    values = {"x": x, "y": y, "lo": Value("lo", f, (2,)), "hi": Value("hi", f, (), const=np.array(1.0, F32))}
    text = _lower(Node("Clip", "", "c1", ["x", "lo", "hi"], ["y"], {}, 13), values)
    assert "node 'c1' (Clip)" in text and "scalar" in text
    values = {"x": x, "y": y, "lo": Value("lo", f, (), const=np.zeros(3, F32))}
    assert "scalar" in _lower(Node("Clip", "", "c2", ["x", "lo"], ["y"], {}, 13), values)
    b = Value("b", np.dtype(np.bool_), (4,))
    text = _lower(Node("Sqrt", "", "s1", ["b"], ["y"], {}, 13), {"b": b, "y": y})
    assert "node 's1' (Sqrt)" in text and "bool" in text
    i = Value("i", np.dtype(np.int64), (4,))
    assert "different element types" in _lower(
        Node("Add", "", "a1", ["x", "i"], ["y"], {}, 14), {"x": x, "i": i, "y": y}
    )
    assert "Sum takes float32" in _lower(Node("Sum", "", "s2", ["i", "i"], ["y"], {}, 13), {"i": i, "y": y})
    assert "not bool" in _lower(Node("Where", "", "w1", ["x", "x", "x"], ["y"], {}, 16), {"x": x, "y": y})
