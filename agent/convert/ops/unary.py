"""Family "unary" (native/onnx/ops_unary.c): elementwise one-input ops and activations.

Every op is one kernel op over the whole tensor (any shape, batched or not): float32
for the math, plus the integer and bool forms ONNX defines for the sign-like ops
(Neg, Abs, Sign, Relu, Clip, BitwiseNot) and Not. Parameters travel as float
attributes (``fattr``); integer Clip bounds as two int64 split in 32-bit words.

``ACTIVATION_KINDS`` and :func:`activation_spec` serve the other families: a Gemm or
Conv lowering applies a fused activation with ``ea_activation_f32`` (ea_vmath.h),
whose ``kind`` codes are these.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from agent.convert.ir import Graph, Node
from agent.convert.lower import Lowerer, Unsupported
from agent.convert.ops import FAMILY_BASE, lowering

BASE = FAMILY_BASE["unary"]
# The U_* enum of ops_unary.c, in order.
_NAMES = [
    "sqrt",
    "exp",
    "log",
    "neg",
    "abs",
    "clip",
    "relu",
    "leaky_relu",
    "elu",
    "selu",
    "sigmoid",
    "hard_sigmoid",
    "hard_swish",
    "tanh",
    "erf",
    "gelu",
    "gelu_tanh",
    "reciprocal",
    "floor",
    "ceil",
    "not",
    "softplus",
    "softsign",
    "sign",
    "round",
    "isnan",
    "isinf",
    "celu",
    "thresholded_relu",
    "shrink",
    "mish",
    "sin",
    "cos",
    "tan",
    "asin",
    "acos",
    "atan",
    "sinh",
    "cosh",
    "asinh",
    "acosh",
    "atanh",
    "bitwise_not",
]
OPCODES: dict[str, int] = {name: BASE + index for index, name in enumerate(_NAMES)}

# ea_activation_f32's kinds (native/onnx/ea_vmath.h EA_ACT_*), by ONNX op type. Gelu is its exact
# (erf) form; approximate="tanh" is ACTIVATION_GELU_TANH. Parameters: see activation_spec.
ACTIVATION_KINDS: dict[str, int] = {
    "Relu": 1,
    "LeakyRelu": 2,
    "Clip": 3,
    "Sigmoid": 4,
    "HardSigmoid": 5,
    "Tanh": 6,
    "HardSwish": 7,
    "Elu": 8,
    "Gelu": 9,
    "Softplus": 11,
    "Selu": 12,
}
ACTIVATION_NONE = 0
ACTIVATION_GELU_TANH = 10

F32 = np.dtype(np.float32)
BOOL = np.dtype(np.bool_)
INT_TYPES = {np.dtype(t) for t in (np.uint8, np.int8, np.int32, np.int64)}
SIGNED_INTS = {np.dtype(t) for t in (np.int8, np.int32, np.int64)}
FLT_MAX = float(np.finfo(np.float32).max)

# ONNX op -> kernel name, for the ops that take no parameters.
_PLAIN = {
    "Sqrt": "sqrt",
    "Exp": "exp",
    "Log": "log",
    "Neg": "neg",
    "Abs": "abs",
    "Relu": "relu",
    "Sigmoid": "sigmoid",
    "HardSwish": "hard_swish",
    "Tanh": "tanh",
    "Erf": "erf",
    "Reciprocal": "reciprocal",
    "Floor": "floor",
    "Ceil": "ceil",
    "Not": "not",
    "Softplus": "softplus",
    "Softsign": "softsign",
    "Sign": "sign",
    "Round": "round",
    "IsNaN": "isnan",
    "Mish": "mish",
    "Sin": "sin",
    "Cos": "cos",
    "Tan": "tan",
    "Asin": "asin",
    "Acos": "acos",
    "Atan": "atan",
    "Sinh": "sinh",
    "Cosh": "cosh",
    "Asinh": "asinh",
    "Acosh": "acosh",
    "Atanh": "atanh",
    "BitwiseNot": "bitwise_not",
}
# ONNX op -> kernel name, for the float ops with parameters (fattr[0], fattr[1]: see _float_params).
_WITH_PARAMS = {
    "Clip": "clip",
    "LeakyRelu": "leaky_relu",
    "Elu": "elu",
    "Selu": "selu",
    "HardSigmoid": "hard_sigmoid",
    "Celu": "celu",
    "ThresholdedRelu": "thresholded_relu",
    "Shrink": "shrink",
}
# Element types beyond float32 that an op accepts (the kernel has a loop for them).
_INT_FORMS: dict[str, set[np.dtype]] = {
    "Neg": SIGNED_INTS,
    "Abs": INT_TYPES,
    "Sign": INT_TYPES,
    "Relu": SIGNED_INTS,
    "Clip": INT_TYPES,
    "BitwiseNot": INT_TYPES,
}


def _float_params(node: Node, const_of: Callable[[int], np.ndarray | None]) -> tuple[float, float]:
    """(alpha, beta) of a float op, as ops_unary.c reads them from fattr[0], fattr[1]."""
    op = node.op_type
    if op == "Clip":
        lo, hi = _clip_bounds(node, const_of, F32)
        return float(lo), float(hi)
    if op == "LeakyRelu":
        return float(node.attr("alpha", 0.01)), 0.0
    if op in ("Elu", "Celu", "ThresholdedRelu"):
        return float(node.attr("alpha", 1.0)), 0.0
    if op == "Selu":
        return float(node.attr("alpha", 1.67326319217681884765625)), float(
            node.attr("gamma", 1.05070102214813232421875)
        )
    if op == "HardSigmoid":
        return float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5))
    if op == "Shrink":
        return float(node.attr("bias", 0.0)), float(node.attr("lambd", 0.5))
    return 0.0, 0.0


def _clip_bounds(
    node: Node, const_of: Callable[[int], np.ndarray | None], dtype: np.dtype, runtime_ok: bool = False
) -> tuple[float | int, float | int]:
    """Clip's bounds (the type's extremes when absent). A bound computed at run time raises
    Unsupported unless ``runtime_ok`` (then the kernel reads it from its input: its value here
    is the extreme)."""
    if dtype == F32:
        lowest, highest = -FLT_MAX, FLT_MAX
    else:
        info = np.iinfo(dtype)
        lowest, highest = int(info.min), int(info.max)
    if node.opset < 11:
        return float(node.attr("min", lowest)), float(node.attr("max", highest))
    bounds: list[float | int] = []
    for index, (what, default) in enumerate((("min", lowest), ("max", highest)), start=1):
        present = index < len(node.inputs) and node.inputs[index] != ""
        value = const_of(index) if present else None
        if value is None:
            if present and not runtime_ok:
                raise Unsupported(f"Clip {what} (input {index}) must be known at build time, it is computed")
            bounds.append(default)
            continue
        array = np.asarray(value)
        if array.size != 1:
            raise Unsupported(f"Clip {what} (input {index}) must be a scalar, it has shape {list(array.shape)}")
        item = array.reshape(-1)[0]
        bounds.append(float(item) if dtype == F32 else int(item))
    return bounds[0], bounds[1]


def activation_spec(node: Node, graph: Graph) -> tuple[int, float, float] | None:
    """``(kind, alpha, beta)`` for ``ea_activation_f32`` when ``node`` is a float32 activation it can
    apply (ACTIVATION_KINDS, with Clip's bounds constant); ``None`` otherwise."""
    if node.domain != "" or node.op_type not in ACTIVATION_KINDS or not node.inputs:
        return None
    if graph.values[node.inputs[0]].dtype != F32:
        return None
    kind = ACTIVATION_KINDS[node.op_type]
    if node.op_type == "Gelu":
        approximate = node.attr("approximate", "none")
        if approximate not in ("none", "tanh"):
            return None
        kind = ACTIVATION_GELU_TANH if approximate == "tanh" else kind

    def const_of(index: int) -> np.ndarray | None:
        return graph.values[node.inputs[index]].const

    try:
        alpha, beta = _float_params(node, const_of)
    except Unsupported:
        return None
    return kind, alpha, beta


def _check_types(node: Node, lw: Lowerer, allowed: set[np.dtype]) -> np.dtype:
    dtype = lw.value(node.inputs[0]).dtype
    if dtype not in allowed:
        names = ", ".join(sorted(str(d) for d in allowed))
        raise Unsupported(f"element type {dtype} is not supported ({node.op_type} takes {names})")
    return dtype


def _clip_runtime_inputs(node: Node, lw: Lowerer) -> list[int]:
    """Clip (opset 11+) bounds computed at run time: scalar tensors the kernel reads (-1: constant or absent)."""
    ids = [-1, -1]
    if node.op_type != "Clip" or node.opset < 11:
        return ids
    for index in (1, 2):
        if lw.has_input(node, index) and lw.const_input(node, index) is None:
            value = lw.value(node.inputs[index])
            if value.batched or int(np.prod(value.shape, dtype=np.int64)) != 1:
                raise Unsupported(f"Clip bound (input {index}) must be a scalar, it has shape {list(value.shape)}")
            if value.dtype != lw.value(node.inputs[0]).dtype:
                raise Unsupported(f"Clip bound (input {index}) has element type {value.dtype}, unlike the input")
            ids[index - 1] = lw.input(node, index)
    return ids


@lowering(*_PLAIN, *_WITH_PARAMS)
def lower_unary(node: Node, lw: Lowerer) -> None:
    op = node.op_type
    bounds = _clip_runtime_inputs(node, lw)
    inputs = [lw.input(node, 0)] + (bounds if bounds != [-1, -1] else [])
    if op == "Not":
        _check_types(node, lw, {BOOL})
    else:
        dtype = _check_types(node, lw, {F32} | _INT_FORMS.get(op, set()))
        if op == "BitwiseNot" and dtype == F32:
            raise Unsupported("BitwiseNot takes integers")
        if dtype != F32:
            ints: list[int] = []
            if op == "Clip":
                lo, hi = _clip_bounds(node, lambda i: lw.const_input(node, i), dtype, runtime_ok=True)
                for bound in (int(lo), int(hi)):
                    word = bound & 0xFFFFFFFFFFFFFFFF
                    ints += [_signed32(word & 0xFFFFFFFF), _signed32(word >> 32)]
            lw.emit(OPCODES[_PLAIN.get(op, "clip")], inputs, [lw.output(node, 0)], ints=ints)
            return
    name = _PLAIN.get(op) or _WITH_PARAMS[op]
    if op == "Clip":
        alpha, beta = (float(b) for b in _clip_bounds(node, lambda i: lw.const_input(node, i), F32, runtime_ok=True))
    else:
        alpha, beta = _float_params(node, lambda i: lw.const_input(node, i))
    floats = [] if op in _PLAIN else [alpha, beta]
    lw.emit(OPCODES[name], inputs, [lw.output(node, 0)], floats=floats)


@lowering("IsInf")
def lower_isinf(node: Node, lw: Lowerer) -> None:
    _check_types(node, lw, {F32})
    ints = [int(bool(node.attr("detect_negative", 1))), int(bool(node.attr("detect_positive", 1)))]
    lw.emit(OPCODES["isinf"], [lw.input(node, 0)], [lw.output(node, 0)], ints=ints)


@lowering("Gelu")
def lower_gelu(node: Node, lw: Lowerer) -> None:
    _check_types(node, lw, {F32})
    approximate = node.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise Unsupported(f"approximate={approximate!r} is not supported (none, tanh)")
    name = "gelu_tanh" if approximate == "tanh" else "gelu"
    lw.emit(OPCODES[name], [lw.input(node, 0)], [lw.output(node, 0)])


def _signed32(word: int) -> int:
    return word - (1 << 32) if word >= 1 << 31 else word
