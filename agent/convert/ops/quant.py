"""Family "quant" (native/onnx/ops_quant.c): quantized (uint8/int8) models.

What onnxruntime's quantization tools write:

- ``quantize_dynamic``: DynamicQuantizeLinear -> MatMulInteger/ConvInteger -> Cast -> Mul
  (by the input's scale times the weight's) [-> Add bias]. :func:`fuse_dynamic` turns each
  such chain into one node (com.microsoft DynamicQuantizeMatMul, or this converter's own
  DynamicQuantizeConv) whose kernel quantizes its float input, runs the int8 product and
  scales back. DynamicQuantizeLinear takes its scale from the whole tensor, so a batch
  would quantize every row with the batch's range: the fused kernel quantizes each row
  (unit of batch) on its own, which is what onnxruntime gives for that row alone and
  keeps rows independent (the host splits and merges batches freely).
- ``quantize_static`` QOperator format: QLinearConv, QLinearMatMul, QuantizeLinear,
  DequantizeLinear and com.microsoft QLinearAdd/QLinearMul/QGemm/QLinearGlobalAveragePool/
  QLinearSoftmax/QLinearConcat/QLinearLeakyRelu/QLinearSigmoid.
- ``quantize_static`` QDQ format: float ops between DequantizeLinear and QuantizeLinear.
  A DequantizeLinear of a constant weight was folded by the analysis (its float result is
  a constant); :func:`fuse_qdq` finds it again (``graph.folded``) and rewrites
  DequantizeLinear -> Conv/MatMul/Gemm [-> Relu] -> QuantizeLinear into QLinearConv /
  QLinearMatMul / QGemm on the int8 weights, DequantizeLinear -> Add/Mul ->
  QuantizeLinear into QLinearAdd/QLinearMul, and runs MaxPool/Reshape/Flatten between a
  DequantizeLinear and a QuantizeLinear of the same parameters on the integers directly.
  What is not rewritten runs in float between the two, as the model says.

Arithmetic follows onnxruntime's kernels (see ops_quant.c), so results agree exactly or
within one quantization step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from agent.convert.ir import Graph, Node, Value
from agent.convert.lower import Lowerer, Unsupported
from agent.convert.ops import FAMILY_BASE, lowering

BASE = FAMILY_BASE["quant"]
QUANTIZE = BASE + 0
DEQUANTIZE = BASE + 1
DYNQUANT = BASE + 2
QMATMUL = BASE + 3
QCONV = BASE + 4
QADD = BASE + 5
QMUL = BASE + 6
QGAP = BASE + 7
QSOFTMAX = BASE + 8
LUT = BASE + 9
QCONCAT = BASE + 10
OPCODES = {
    "quantize": QUANTIZE,
    "dequantize": DEQUANTIZE,
    "dynamic_quantize": DYNQUANT,
    "matmul": QMATMUL,
    "conv": QCONV,
    "add": QADD,
    "mul": QMUL,
    "global_average_pool": QGAP,
    "softmax": QSOFTMAX,
    "lookup": LUT,
    "concat": QCONCAT,
}

# Epilogues of QMATMUL/QCONV (ops_quant.c EPI_*).
EPI_INT32, EPI_REQUANT, EPI_FLOAT, EPI_DYNAMIC = 0, 1, 2, 3
# Block sizes of the kernels (ops_quant.c MM_ROWS, CONV_VBUDGET): scratch declarations.
MM_ROWS = 64
CONV_VBUDGET = 131072

MS = "com.microsoft"
# Nodes only the converter's own passes create.
EDGE = "edge-agent"
# Private attribute of fused nodes: a Relu follows (applied in the kernel's epilogue).
RELU_ATTR = "_edge_relu"

U8, I8, I32, F32 = np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.int32), np.dtype(np.float32)
Q8 = (U8, I8)


# -- helpers ------------------------------------------------------------------------


def _dtype_name(dtype: np.dtype) -> str:
    return np.dtype(dtype).name


def _require_dtype(value: Value, allowed: Sequence[np.dtype], what: str) -> None:
    if value.dtype not in allowed:
        raise Unsupported(
            f"{what} is {_dtype_name(value.dtype)}; supported: {', '.join(_dtype_name(d) for d in allowed)}"
        )


def _count(value: Value) -> int:
    return int(np.prod(value.shape, dtype=np.int64))


def _scalar_input(node: Node, lw: Lowerer, index: int, what: str, dtypes: Sequence[np.dtype], optional: bool) -> int:
    """A per-tensor scale or zero point (one element), as a kernel input (-1 when absent)."""
    if not lw.has_input(node, index):
        if optional:
            return -1
        raise Unsupported(f"{what} (input {index}) is missing")
    value = lw.value(node.inputs[index])
    _require_dtype(value, dtypes, what)
    if _count(value) != 1 or value.batched:
        raise Unsupported(f"{what} must have one element (per-tensor), it has shape {list(value.shape)}")
    return lw.input(node, index)


def _channel_input(
    node: Node, lw: Lowerer, index: int, what: str, channels: int, dtypes: Sequence[np.dtype], optional: bool
) -> int:
    """A per-tensor or per-channel (``channels`` elements) parameter as a kernel input."""
    if not lw.has_input(node, index):
        if optional:
            return -1
        raise Unsupported(f"{what} (input {index}) is missing")
    value = lw.value(node.inputs[index])
    _require_dtype(value, dtypes, what)
    if _count(value) not in (1, channels) or value.batched or len(value.shape) > 1:
        raise Unsupported(
            f"{what} must be a scalar or have {channels} elements (1-D), it has shape {list(value.shape)}"
        )
    return lw.input(node, index)


def _zero_points(lw: Lowerer, node: Node, index: int) -> np.ndarray | None:
    """A constant zero point as int32 (None: absent, meaning 0)."""
    if not lw.has_input(node, index):
        return None
    return lw.require_const(node, index, "the zero point").astype(np.int32).reshape(-1)


def _check_zp_dtype(lw: Lowerer, node: Node, index: int, data: np.dtype, what: str) -> None:
    if lw.has_input(node, index) and lw.value(node.inputs[index]).dtype != data:
        raise Unsupported(
            f"{what} has element type {_dtype_name(lw.value(node.inputs[index]).dtype)}, its data {_dtype_name(data)}"
        )


def _relu(node: Node) -> int:
    return 1 if node.attrs.get(RELU_ATTR) else 0


def _channel_vector(array: np.ndarray, out_shape: tuple[int, ...], axis: int) -> np.ndarray | None:
    """``array`` broadcast against ``out_shape`` as one value per index of ``axis`` (1 or n values), else None."""
    rank = len(out_shape)
    if array.ndim > rank:
        return None
    full = (1,) * (rank - array.ndim) + tuple(array.shape)
    axis = axis % rank if rank else 0
    for i, d in enumerate(full):
        if i != axis and d != 1:
            return None
    if rank and full[axis] not in (1, out_shape[axis]):
        return None
    return np.ascontiguousarray(array.reshape(-1))


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def pack_pairs(b: np.ndarray, zb: np.ndarray | None) -> np.ndarray:
    """B[K, N] (integers) minus zb[N] as the kernel's pairs along K: int16 [ceil(K/2)][N rounded to 8][2], as bytes."""
    k, n = b.shape
    kp, np_ = _round_up(k, 2), _round_up(n, 8)
    full = np.zeros((kp, np_), dtype=np.int16)
    sub = np.zeros(n, dtype=np.int32) if zb is None else np.broadcast_to(zb.astype(np.int32), (n,))
    full[:k, :n] = (b.astype(np.int32) - sub[None, :]).astype(np.int16)
    pairs = full.reshape(kp // 2, 2, np_).transpose(0, 2, 1)
    return np.ascontiguousarray(pairs).reshape(-1).view(np.uint8)


def pack_rows(w: np.ndarray, zw: np.ndarray | None) -> np.ndarray:
    """W[OC, K] (integers) minus zw[OC] as int16 rows padded to an even K, as bytes."""
    oc, k = w.shape
    full = np.zeros((oc, _round_up(k, 2)), dtype=np.int16)
    sub = np.zeros(oc, dtype=np.int32) if zw is None else np.broadcast_to(zw.astype(np.int32), (oc,))
    full[:, :k] = (w.astype(np.int32) - sub[:, None]).astype(np.int16)
    return np.ascontiguousarray(full).reshape(-1).view(np.uint8)


def _epilogue_scratch(channels: int) -> int:
    return 3 * (_round_up(channels, 4) + 4) * 4 + 3 * 16


# -- QuantizeLinear / DequantizeLinear ------------------------------------------------


def _qdq_axis(node: Node, lw: Lowerer, data: Value) -> int:
    """-1 for per-tensor parameters, else the (non-negative) axis they run along."""
    if int(node.attr("block_size", 0) or 0):
        raise Unsupported("blocked quantization (block_size) is not supported")
    scale = lw.value(node.inputs[1])
    _require_dtype(scale, (F32,), "the scale")
    if scale.batched:
        raise Unsupported("the scale depends on the batch")
    n = _count(scale)
    if lw.has_input(node, 2):
        zp = lw.value(node.inputs[2])
        if zp.shape != scale.shape and not (_count(zp) == 1 and n == 1):
            raise Unsupported(f"zero point shape {list(zp.shape)} differs from the scale's {list(scale.shape)}")
    if n == 1:
        return -1
    if node.opset < 13:
        raise Unsupported("per-axis parameters need opset 13")
    rank = len(data.shape)
    axis = int(node.attr("axis", 1))
    if not -rank <= axis < rank:
        raise Unsupported(f"axis {axis} is out of range for rank {rank}")
    axis %= rank
    if len(scale.shape) != 1 or scale.shape[0] != data.shape[axis]:
        raise Unsupported(f"per-axis scale of shape {list(scale.shape)} does not match dimension {axis} of the data")
    if data.batched and axis == 0:
        raise Unsupported("per-axis quantization along the batch dimension")
    return axis


@lowering("QuantizeLinear")
def lower_quantize(node: Node, lw: Lowerer) -> None:
    x, y = lw.value(node.inputs[0]), lw.value(node.outputs[0])
    _require_dtype(x, (F32,), "the input")
    _require_dtype(y, Q8, "the output")
    _check_zp_dtype(lw, node, 2, y.dtype, "the zero point")
    axis = _qdq_axis(node, lw, x)
    lw.emit(QUANTIZE, [lw.input(node, 0), lw.input(node, 1), lw.input(node, 2)], [lw.output(node, 0)], ints=[axis])


@lowering("DequantizeLinear")
def lower_dequantize(node: Node, lw: Lowerer) -> None:
    x, y = lw.value(node.inputs[0]), lw.value(node.outputs[0])
    _require_dtype(x, (U8, I8, I32), "the input")
    _require_dtype(y, (F32,), "the output")
    _check_zp_dtype(lw, node, 2, x.dtype, "the zero point")
    axis = _qdq_axis(node, lw, x)
    lw.emit(DEQUANTIZE, [lw.input(node, 0), lw.input(node, 1), lw.input(node, 2)], [lw.output(node, 0)], ints=[axis])


@lowering("DynamicQuantizeLinear")
def lower_dynamic_quantize(node: Node, lw: Lowerer) -> None:
    x = lw.value(node.inputs[0])
    _require_dtype(x, (F32,), "the input")
    if x.batched:
        raise Unsupported(
            "quantizes its whole input, across the rows of a batch; it is supported where it feeds "
            "MatMulInteger/ConvInteger -> Cast -> Mul (its scale) [-> Add] [-> Relu], which is fused to quantize "
            "each row on its own"
        )
    outs = [lw.output(node, i) if i < len(node.outputs) and node.outputs[i] else -1 for i in range(3)]
    if outs[0] < 0:
        raise Unsupported("the quantized output is missing")
    lw.emit(DYNQUANT, [lw.input(node, 0)], outs)


# -- matrix products ------------------------------------------------------------------


def _matmul_shapes(lw: Lowerer, a: Value, b: Value, trans_b: bool = False) -> tuple[int, int]:
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise Unsupported("1-D operands are not supported")
    k = a.shape[-1]
    kb, n = (b.shape[-1], b.shape[-2]) if trans_b else (b.shape[-2], b.shape[-1])
    if k != kb:
        raise Unsupported(f"inner dimensions differ ({k} and {kb})")
    if k == 0 or n == 0:
        raise Unsupported("an empty inner or output dimension")
    return k, n


def _emit_matmul(
    node: Node,
    lw: Lowerer,
    *,
    mode: int,
    a: int,
    a_scale: int,
    a_zp: int,
    b_index: int,
    b_scale: int,
    b_zp_index: int,
    bias: int,
    y_scale: int,
    y_zp: int,
    trans_b: bool = False,
    alpha: float = 1.0,
    unit: int = 0,
) -> None:
    av, bv = lw.value(node.inputs[0]), lw.value(node.inputs[b_index])
    k, n = _matmul_shapes(lw, av, bv, trans_b)
    bconst = lw.const_input(node, b_index)
    zb_const = lw.const_input(node, b_zp_index)
    zb_known = not lw.has_input(node, b_zp_index) or zb_const is not None
    scratch = 64 + MM_ROWS * _round_up(k, 2) * 2 + MM_ROWS * _round_up(n, 8) * 4 + _epilogue_scratch(n)
    if bconst is not None and len(bv.shape) == 2 and zb_known:
        mat = bconst.T if trans_b else bconst
        zb = None if zb_const is None else np.broadcast_to(zb_const.astype(np.int32).reshape(-1), (n,))
        b_tid = lw.const(pack_pairs(mat, zb), f"{node.name}.packed")
        packed = 1
    else:
        if mode == EPI_DYNAMIC:
            raise Unsupported("the weights must be a constant 2-D matrix")
        if len(bv.shape) > 2 and trans_b:
            raise Unsupported("a transposed batched B")
        b_tid = lw.input(node, b_index)
        packed = 0
        scratch += _round_up(k, 2) // 2 * _round_up(n, 8) * 4 + 32
    zp_tid = lw.input(node, b_zp_index) if lw.has_input(node, b_zp_index) else -1
    lw.scratch(fixed=scratch)
    lw.emit(
        QMATMUL,
        [a, a_scale, a_zp, b_tid, b_scale, zp_tid, bias, y_scale, y_zp],
        [lw.output(node, 0)],
        ints=[mode, packed, _relu(node), 1 if trans_b else 0, k, n, unit],
        floats=[alpha],
    )


def _b_zp_check(node: Node, lw: Lowerer, index: int, b: Value, n: int) -> None:
    if not lw.has_input(node, index):
        return
    zp = lw.value(node.inputs[index])
    _require_dtype(zp, (b.dtype,), "B's zero point")
    if _count(zp) not in (1, n) or len(zp.shape) > 1 or (_count(zp) > 1 and len(b.shape) != 2):
        raise Unsupported(
            f"B's zero point must be a scalar or have {n} elements (2-D B), it has shape {list(zp.shape)}"
        )


@lowering("MatMulInteger")
def lower_matmul_integer(node: Node, lw: Lowerer) -> None:
    a, b, y = lw.value(node.inputs[0]), lw.value(node.inputs[1]), lw.value(node.outputs[0])
    _require_dtype(a, Q8, "A")
    _require_dtype(b, Q8, "B")
    _require_dtype(y, (I32,), "the output")
    _, n = _matmul_shapes(lw, a, b)
    a_zp = _scalar_input(node, lw, 2, "A's zero point (per-row zero points are not supported)", (a.dtype,), True)
    _b_zp_check(node, lw, 3, b, n)
    _emit_matmul(
        node, lw, mode=EPI_INT32, a=lw.input(node, 0), a_scale=-1, a_zp=a_zp, b_index=1, b_scale=-1, b_zp_index=3,
        bias=-1, y_scale=-1, y_zp=-1,
    )  # fmt: skip


@lowering("QLinearMatMul")
def lower_qlinear_matmul(node: Node, lw: Lowerer) -> None:
    a, b, y = lw.value(node.inputs[0]), lw.value(node.inputs[3]), lw.value(node.outputs[0])
    _require_dtype(a, Q8, "a")
    _require_dtype(b, Q8, "b")
    _require_dtype(y, Q8, "the output")
    _, n = _matmul_shapes(lw, a, b)
    a_scale = _scalar_input(node, lw, 1, "a_scale", (F32,), False)
    a_zp = _scalar_input(node, lw, 2, "a_zero_point", (a.dtype,), True)
    b_scale = _channel_input(node, lw, 4, "b_scale", n, (F32,), False)
    if _count(lw.value(node.inputs[4])) > 1 and len(b.shape) != 2:
        raise Unsupported("per-column b_scale with a batched b")
    _b_zp_check(node, lw, 5, b, n)
    y_scale = _scalar_input(node, lw, 6, "y_scale", (F32,), False)
    y_zp = _scalar_input(node, lw, 7, "y_zero_point", (y.dtype,), True)
    _emit_matmul(
        node, lw, mode=EPI_REQUANT, a=lw.input(node, 0), a_scale=a_scale, a_zp=a_zp, b_index=3, b_scale=b_scale,
        b_zp_index=5, bias=-1, y_scale=y_scale, y_zp=y_zp,
    )  # fmt: skip


@lowering("QGemm", domain=MS)
def lower_qgemm(node: Node, lw: Lowerer) -> None:
    a, b, y = lw.value(node.inputs[0]), lw.value(node.inputs[3]), lw.value(node.outputs[0])
    _require_dtype(a, Q8, "A")
    _require_dtype(b, Q8, "B")
    if int(node.attr("transA", 0)):
        raise Unsupported("transA=1")
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise Unsupported("A and B must be 2-D")
    trans_b = bool(int(node.attr("transB", 0)))
    _, n = _matmul_shapes(lw, a, b, trans_b)
    a_scale = _scalar_input(node, lw, 1, "a_scale", (F32,), False)
    a_zp = _scalar_input(node, lw, 2, "a_zero_point", (a.dtype,), True)
    b_scale = _channel_input(node, lw, 4, "b_scale", n, (F32,), False)
    _b_zp_check(node, lw, 5, b, n)
    bias = -1
    if lw.has_input(node, 6):
        c = lw.value(node.inputs[6])
        _require_dtype(c, (I32,), "C")
        if _count(c) not in (1, n) or (len(c.shape) == 2 and c.shape[0] != 1) or len(c.shape) > 2:
            raise Unsupported(f"C of shape {list(c.shape)}: supported a scalar, [N] or [1, N]")
        bias = lw.input(node, 6)
    has_y = lw.has_input(node, 7)
    if has_y:
        _require_dtype(y, Q8, "the output")
        y_scale = _scalar_input(node, lw, 7, "y_scale", (F32,), False)
        y_zp = _scalar_input(node, lw, 8, "y_zero_point", (y.dtype,), True)
    else:
        _require_dtype(y, (F32,), "the output")
        y_scale = y_zp = -1
    _emit_matmul(
        node, lw, mode=EPI_REQUANT if has_y else EPI_FLOAT, a=lw.input(node, 0), a_scale=a_scale, a_zp=a_zp,
        b_index=3, b_scale=b_scale, b_zp_index=5, bias=bias, y_scale=y_scale, y_zp=y_zp, trans_b=trans_b,
        alpha=float(node.attr("alpha", 1.0)),
    )  # fmt: skip


def _float_bias(node: Node, lw: Lowerer, index: int, out_shape: tuple[int, ...], axis: int, what: str) -> int:
    """A constant float bias per output channel (``axis`` of the output) as a parameter, -1 when absent."""
    if not lw.has_input(node, index):
        return -1
    value = lw.require_const(node, index, what)
    if value.dtype != np.float32:
        raise Unsupported(f"{what} is {_dtype_name(value.dtype)}; supported: float32")
    vector = _channel_vector(value, out_shape, axis)
    if vector is None:
        raise Unsupported(f"{what} of shape {list(value.shape)} is not one value per output channel")
    return lw.const(vector.astype(np.float32), f"{node.name}.bias")


def _float_scale(node: Node, lw: Lowerer, index: int, out_shape: tuple[int, ...], axis: int, what: str) -> int:
    value = lw.require_const(node, index, what)
    if value.dtype != np.float32:
        raise Unsupported(f"{what} is {_dtype_name(value.dtype)}; supported: float32")
    vector = _channel_vector(value, out_shape, axis)
    if vector is None:
        raise Unsupported(f"{what} of shape {list(value.shape)} is not one value per output channel")
    return lw.const(vector.astype(np.float32), f"{node.name}.scale")


@lowering("MatMulIntegerToFloat", domain=MS)
def lower_matmul_integer_to_float(node: Node, lw: Lowerer) -> None:
    a, b, y = lw.value(node.inputs[0]), lw.value(node.inputs[1]), lw.value(node.outputs[0])
    _require_dtype(a, Q8, "A")
    _require_dtype(b, Q8, "B")
    _require_dtype(y, (F32,), "the output")
    _, n = _matmul_shapes(lw, a, b)
    a_scale = _scalar_input(node, lw, 2, "a_scale", (F32,), False)
    b_scale = _float_scale(node, lw, 3, y.shape, -1, "b_scale") if len(b.shape) == 2 else -1
    if b_scale < 0:
        b_scale = _scalar_input(node, lw, 3, "b_scale", (F32,), False)
    a_zp = _scalar_input(node, lw, 4, "a_zero_point", (a.dtype,), True)
    _b_zp_check(node, lw, 5, b, n)
    bias = _float_bias(node, lw, 6, y.shape, -1, "the bias")
    _emit_matmul(
        node, lw, mode=EPI_FLOAT, a=lw.input(node, 0), a_scale=a_scale, a_zp=a_zp, b_index=1, b_scale=b_scale,
        b_zp_index=5, bias=bias, y_scale=-1, y_zp=-1,
    )  # fmt: skip


def _unit(x: Value) -> int:
    """Elements quantized together by a fused dynamic kernel: one unit of batch (0: the whole tensor)."""
    return _count(x) if x.batched else 0


@lowering("DynamicQuantizeMatMul", domain=MS)
def lower_dynamic_quantize_matmul(node: Node, lw: Lowerer) -> None:
    a, b, y = lw.value(node.inputs[0]), lw.value(node.inputs[1]), lw.value(node.outputs[0])
    _require_dtype(a, (F32,), "A")
    _require_dtype(b, Q8, "B")
    _require_dtype(y, (F32,), "the output")
    if len(b.shape) != 2:
        raise Unsupported("B must be 2-D")
    _, n = _matmul_shapes(lw, a, b)
    b_scale = _float_scale(node, lw, 2, y.shape, -1, "b_scale")
    _b_zp_check(node, lw, 3, b, n)
    bias = _float_bias(node, lw, 4, y.shape, -1, "the bias")
    _emit_matmul(
        node, lw, mode=EPI_DYNAMIC, a=lw.input(node, 0), a_scale=-1, a_zp=-1, b_index=1, b_scale=b_scale,
        b_zp_index=3, bias=bias, y_scale=-1, y_zp=-1, unit=_unit(a),
    )  # fmt: skip


# -- convolution ------------------------------------------------------------------------


def _conv_geometry(node: Node, x: Value, w: Value, y: Value) -> list[int]:
    """[group, kh, kw, sh, sw, dh, dw, pt, pl, pb, pr] for a 1-D or 2-D convolution."""
    rank = len(x.shape)
    if rank not in (3, 4) or len(w.shape) != rank or len(y.shape) != rank:
        raise Unsupported(f"{rank - 2}-D convolution; supported: 1-D and 2-D")
    n = rank - 2
    ks = list(node.attr("kernel_shape") or w.shape[2:])
    if [int(k) for k in ks] != list(w.shape[2:]):
        raise Unsupported(f"kernel_shape {ks} differs from the weights' {list(w.shape[2:])}")
    strides = [int(s) for s in (node.attr("strides") or [1] * n)]
    dilations = [int(d) for d in (node.attr("dilations") or [1] * n)]
    group = int(node.attr("group", 1))
    if len(strides) != n or len(dilations) != n or min(strides + dilations) < 1:
        raise Unsupported("bad strides or dilations")
    cin, cout = x.shape[1], y.shape[1]
    if group < 1 or cin % group or cout % group or w.shape[1] * group != cin or w.shape[0] != cout:
        raise Unsupported(f"group {group} does not fit {cin} input and {cout} output channels")
    auto_pad = str(node.attr("auto_pad", "NOTSET") or "NOTSET")
    ins, outs = list(x.shape[2:]), list(y.shape[2:])
    if auto_pad in ("NOTSET", ""):
        pads = [int(p) for p in (node.attr("pads") or [0] * (2 * n))]
        if len(pads) != 2 * n or min(pads) < 0:
            raise Unsupported("bad pads")
        begin, end = pads[:n], pads[n:]
    elif auto_pad == "VALID":
        begin, end = [0] * n, [0] * n
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(n):
            total = max(0, (outs[i] - 1) * strides[i] + (int(ks[i]) - 1) * dilations[i] + 1 - ins[i])
            small = total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
    else:
        raise Unsupported(f"auto_pad {auto_pad!r}")
    for i in range(n):
        expect = (ins[i] + begin[i] + end[i] - dilations[i] * (int(ks[i]) - 1) - 1) // strides[i] + 1
        if expect != outs[i]:
            raise Unsupported(f"output size {outs[i]} along axis {i + 2} does not match the attributes ({expect})")
    if n == 1:
        return [group, 1, int(ks[0]), 1, strides[0], 1, dilations[0], 0, begin[0], 0, end[0]]
    return [
        group,
        int(ks[0]),
        int(ks[1]),
        strides[0],
        strides[1],
        dilations[0],
        dilations[1],
        begin[0],
        begin[1],
        end[0],
        end[1],
    ]


def _conv_scratch(x: Value, w: Value, y: Value, geometry: list[int], packed: bool) -> int:
    group, kh, kw, pt, pl, pb, pr = (geometry[i] for i in (0, 1, 2, 7, 8, 9, 10))
    c = x.shape[1]
    h, wd = (x.shape[2], x.shape[3]) if len(x.shape) == 4 else (1, x.shape[2])
    oc = y.shape[1]
    oh, ow = (y.shape[2], y.shape[3]) if len(y.shape) == 4 else (1, y.shape[2])
    k = (c // group) * kh * kw
    kp = _round_up(k, 2)
    k2 = kp // 2
    rows = CONV_VBUDGET // (k2 * ow * 4) if k2 * ow > 0 else oh
    rows = max(1, min(rows, oh))
    npos = _round_up(rows * ow, 8)
    total = (c * (h + pt + pb) * (wd + pl + pr) + 16) * 2 + k2 * npos * 4 + 32 + (oc // group) * npos * 4
    total += kp * 4 + _epilogue_scratch(oc) + 6 * 16
    if not packed:
        total += oc * kp * 2
    return total


def _emit_conv(
    node: Node,
    lw: Lowerer,
    *,
    mode: int,
    x_scale: int,
    x_zp: int,
    w_index: int,
    w_scale: int,
    w_zp_index: int,
    bias: int,
    y_scale: int,
    y_zp: int,
) -> None:
    x, w, y = lw.value(node.inputs[0]), lw.value(node.inputs[w_index]), lw.value(node.outputs[0])
    geometry = _conv_geometry(node, x, w, y)
    oc = w.shape[0]
    if lw.has_input(node, w_zp_index):
        zpv = lw.value(node.inputs[w_zp_index])
        _require_dtype(zpv, (w.dtype,), "the weights' zero point")
        if _count(zpv) not in (1, oc) or len(zpv.shape) > 1:
            raise Unsupported(f"the weights' zero point must be a scalar or have {oc} elements")
    wconst = lw.const_input(node, w_index)
    zw_const = lw.const_input(node, w_zp_index)
    zw_known = not lw.has_input(node, w_zp_index) or zw_const is not None
    if wconst is not None and zw_known:
        zw = None if zw_const is None else np.broadcast_to(zw_const.astype(np.int32).reshape(-1), (oc,))
        w_tid = lw.const(pack_rows(wconst.reshape(oc, -1), zw), f"{node.name}.packed")
        packed = 1
    else:
        if mode == EPI_DYNAMIC:
            raise Unsupported("the weights must be constant")
        w_tid = lw.input(node, w_index)
        packed = 0
    zp_tid = lw.input(node, w_zp_index) if lw.has_input(node, w_zp_index) else -1
    lw.scratch(fixed=_conv_scratch(x, w, y, geometry, bool(packed)))
    lw.emit(
        QCONV,
        [lw.input(node, 0), x_scale, x_zp, w_tid, w_scale, zp_tid, bias, y_scale, y_zp],
        [lw.output(node, 0)],
        ints=[mode, packed, _relu(node), *geometry],
    )


@lowering("ConvInteger")
def lower_conv_integer(node: Node, lw: Lowerer) -> None:
    x, w, y = lw.value(node.inputs[0]), lw.value(node.inputs[1]), lw.value(node.outputs[0])
    _require_dtype(x, Q8, "x")
    _require_dtype(w, Q8, "w")
    _require_dtype(y, (I32,), "the output")
    x_zp = _scalar_input(node, lw, 2, "x_zero_point", (x.dtype,), True)
    _emit_conv(
        node, lw, mode=EPI_INT32, x_scale=-1, x_zp=x_zp, w_index=1, w_scale=-1, w_zp_index=3, bias=-1, y_scale=-1,
        y_zp=-1,
    )  # fmt: skip


@lowering("QLinearConv")
def lower_qlinear_conv(node: Node, lw: Lowerer) -> None:
    x, w, y = lw.value(node.inputs[0]), lw.value(node.inputs[3]), lw.value(node.outputs[0])
    _require_dtype(x, Q8, "x")
    _require_dtype(w, Q8, "w")
    _require_dtype(y, Q8, "the output")
    oc = w.shape[0] if w.shape else 0
    x_scale = _scalar_input(node, lw, 1, "x_scale", (F32,), False)
    x_zp = _scalar_input(node, lw, 2, "x_zero_point", (x.dtype,), True)
    w_scale = _channel_input(node, lw, 4, "w_scale", oc, (F32,), False)
    y_scale = _scalar_input(node, lw, 6, "y_scale", (F32,), False)
    y_zp = _scalar_input(node, lw, 7, "y_zero_point", (y.dtype,), True)
    bias = _channel_input(node, lw, 8, "B", oc, (I32,), True)
    _emit_conv(
        node, lw, mode=EPI_REQUANT, x_scale=x_scale, x_zp=x_zp, w_index=3, w_scale=w_scale, w_zp_index=5, bias=bias,
        y_scale=y_scale, y_zp=y_zp,
    )  # fmt: skip


@lowering("DynamicQuantizeConv", domain=EDGE)
def lower_dynamic_quantize_conv(node: Node, lw: Lowerer) -> None:
    """Made by :func:`fuse_dynamic`: inputs X (float), W, w_scale (per channel), w_zero_point, bias (float)."""
    x, w, y = lw.value(node.inputs[0]), lw.value(node.inputs[1]), lw.value(node.outputs[0])
    _require_dtype(x, (F32,), "X")
    _require_dtype(w, Q8, "W")
    w_scale = _float_scale(node, lw, 2, y.shape, 1, "the weights' scale")
    bias = _float_bias(node, lw, 4, y.shape, 1, "the bias")
    if x.shape[0] != 1:
        raise Unsupported("the kernel quantizes each image on its own: one image per unit of batch")
    _emit_conv(
        node, lw, mode=EPI_DYNAMIC, x_scale=-1, x_zp=-1, w_index=1, w_scale=w_scale, w_zp_index=3, bias=bias,
        y_scale=-1, y_zp=-1,
    )  # fmt: skip


# -- com.microsoft elementwise, pooling, softmax, lookup tables, concat ------------------


@lowering("QLinearAdd", "QLinearMul", domain=MS)
def lower_qlinear_binary(node: Node, lw: Lowerer) -> None:
    a, b, c = lw.value(node.inputs[0]), lw.value(node.inputs[3]), lw.value(node.outputs[0])
    _require_dtype(a, Q8, "A")
    _require_dtype(b, (a.dtype,), "B")
    _require_dtype(c, (a.dtype,), "the output")
    ins = [
        lw.input(node, 0),
        _scalar_input(node, lw, 1, "A_scale", (F32,), False),
        _scalar_input(node, lw, 2, "A_zero_point", (a.dtype,), True),
        lw.input(node, 3),
        _scalar_input(node, lw, 4, "B_scale", (F32,), False),
        _scalar_input(node, lw, 5, "B_zero_point", (a.dtype,), True),
        _scalar_input(node, lw, 6, "C_scale", (F32,), False),
        _scalar_input(node, lw, 7, "C_zero_point", (a.dtype,), True),
    ]
    lw.emit(QADD if node.op_type == "QLinearAdd" else QMUL, ins, [lw.output(node, 0)])


@lowering("QLinearGlobalAveragePool", domain=MS)
def lower_qlinear_gap(node: Node, lw: Lowerer) -> None:
    x, y = lw.value(node.inputs[0]), lw.value(node.outputs[0])
    _require_dtype(x, Q8, "X")
    _require_dtype(y, (x.dtype,), "the output")
    if len(x.shape) < 3:
        raise Unsupported("the input must have spatial dimensions")
    channels_last = int(node.attr("channels_last", 0))
    image = _count(x) // (x.shape[0] * x.shape[-1 if channels_last else 1]) if _count(x) else 0
    if image == 0 or image >= 1 << 24:
        raise Unsupported("empty or too large an image")
    ins = [
        lw.input(node, 0),
        _scalar_input(node, lw, 1, "x_scale", (F32,), False),
        _scalar_input(node, lw, 2, "x_zero_point", (x.dtype,), True),
        _scalar_input(node, lw, 3, "y_scale", (F32,), False),
        _scalar_input(node, lw, 4, "y_zero_point", (x.dtype,), True),
    ]
    lw.emit(QGAP, ins, [lw.output(node, 0)], ints=[1 if channels_last else 0])


def softmax_table(x_scale: float, reduce_len: int, signed: bool) -> np.ndarray:
    """onnxruntime's QlinearBuildLookupTableUint32 (float flavour): exp((i - 255 + shift) * scale)."""
    bit_shift = np.log(np.finfo(np.float32).max / reduce_len)
    bit_shift = max(0.0, bit_shift - 5.0) / float(np.float32(x_scale))
    table = np.zeros(256, dtype=np.float32)
    for i in range(256):
        value = np.exp((float(i) - 255.0 + bit_shift) * float(np.float32(x_scale)))
        table[(i - 128) & 255 if signed else i] = np.float32(value)
    return table


@lowering("QLinearSoftmax", domain=MS)
def lower_qlinear_softmax(node: Node, lw: Lowerer) -> None:
    x, y = lw.value(node.inputs[0]), lw.value(node.outputs[0])
    _require_dtype(x, Q8, "X")
    _require_dtype(y, (x.dtype,), "the output")
    opset = int(node.attr("opset", 13))
    rank = len(x.shape)
    axis = int(node.attr("axis", -1 if opset >= 13 else 1))
    if not -rank <= axis < rank:
        raise Unsupported(f"axis {axis} out of range")
    axis %= rank
    if x.batched and axis == 0:
        raise Unsupported("softmax across the batch")
    scale = lw.require_const(node, 1, "X_scale")
    if scale.size != 1:
        raise Unsupported("X_scale must have one element")
    reduce_len = int(np.prod(x.shape[axis:])) if opset < 13 else x.shape[axis]
    if reduce_len <= 0:
        raise Unsupported("empty softmax axis")
    table = lw.const(softmax_table(float(scale.reshape(-1)[0]), reduce_len, x.dtype == I8), f"{node.name}.table")
    ins = [
        lw.input(node, 0),
        table,
        _scalar_input(node, lw, 3, "y_scale", (F32,), False),
        _scalar_input(node, lw, 4, "y_zero_point", (x.dtype,), True),
    ]
    lw.emit(QSOFTMAX, ins, [lw.output(node, 0)], ints=[axis, 1 if opset < 13 else 0])


def _const_scalar(lw: Lowerer, node: Node, index: int, what: str, default: float | None = None) -> float:
    if not lw.has_input(node, index):
        if default is None:
            raise Unsupported(f"{what} is missing")
        return default
    value = lw.require_const(node, index, what)
    if value.size != 1:
        raise Unsupported(f"{what} must have one element")
    return float(value.reshape(-1)[0])


def quantize_np(values: np.ndarray, scale: float, zp: int, dtype: np.dtype) -> np.ndarray:
    """MlasQuantizeLinear in NumPy: saturate(round_even(x / scale) + zp), float32 arithmetic."""
    info = np.iinfo(dtype)
    q = np.float32(values.astype(np.float32) / np.float32(scale))
    q = np.clip(q, np.float32(info.min - zp), np.float32(info.max - zp))
    return (np.rint(q).astype(np.int32) + zp).astype(dtype)


def _lookup_table(dtype: np.dtype, xs: float, xz: int, ys: float, yz: int, fn: Any) -> np.ndarray:
    """table[byte] = quantize(fn(dequantize(byte))), indexed by the raw byte."""
    raw = np.arange(256, dtype=np.uint8).view(dtype).astype(np.int32)
    x = (np.float32(xs) * (raw - xz).astype(np.float32)).astype(np.float32)
    return quantize_np(fn(x).astype(np.float32), ys, yz, dtype).view(np.uint8)


@lowering("QLinearLeakyRelu", "QLinearSigmoid", domain=MS)
def lower_qlinear_lookup(node: Node, lw: Lowerer) -> None:
    x, y = lw.value(node.inputs[0]), lw.value(node.outputs[0])
    _require_dtype(x, Q8, "X")
    _require_dtype(y, (x.dtype,), "the output")
    xs = _const_scalar(lw, node, 1, "X_scale")
    xz = int(_const_scalar(lw, node, 2, "X_zero_point", 0.0))
    ys = _const_scalar(lw, node, 3, "Y_scale")
    yz = int(_const_scalar(lw, node, 4, "Y_zero_point", 0.0))
    if node.op_type == "QLinearLeakyRelu":
        alpha = np.float32(node.attr("alpha", 0.01))

        def fn(v: np.ndarray) -> np.ndarray:
            return np.where(v >= 0, v, v * alpha).astype(np.float32)

    else:

        def fn(v: np.ndarray) -> np.ndarray:
            return (1.0 / (1.0 + np.exp(-v.astype(np.float64)))).astype(np.float32)

    table = lw.const(_lookup_table(x.dtype, xs, xz, ys, yz, fn), f"{node.name}.table")
    lw.emit(LUT, [lw.input(node, 0), table], [lw.output(node, 0)])


@lowering("QLinearConcat", domain=MS)
def lower_qlinear_concat(node: Node, lw: Lowerer) -> None:
    y = lw.value(node.outputs[0])
    _require_dtype(y, Q8, "the output")
    rank = len(y.shape)
    axis = int(node.attr("axis", 0))
    if not -rank <= axis < rank:
        raise Unsupported(f"axis {axis} out of range")
    axis %= rank
    if y.batched and axis == 0:
        raise Unsupported("concatenation along the batch dimension")
    ys = _const_scalar(lw, node, 0, "Y_scale")
    yz = int(_const_scalar(lw, node, 1, "Y_zero_point", 0.0))
    if (len(node.inputs) - 2) % 3 or len(node.inputs) < 5:
        raise Unsupported("inputs must be Y_scale, Y_zero_point and (X, X_scale, X_zero_point) triples")
    ins: list[int] = []
    for i in range(2, len(node.inputs), 3):
        x = lw.value(node.inputs[i])
        _require_dtype(x, (y.dtype,), f"input {i}")
        xs = _const_scalar(lw, node, i + 1, f"the scale of input {i}")
        xz = int(_const_scalar(lw, node, i + 2, f"the zero point of input {i}", 0.0))
        ins.append(lw.input(node, i))
        if xs == ys and xz == yz:
            ins.append(-1)
        else:
            table = _lookup_table(y.dtype, xs, xz, ys, yz, lambda v: v)
            ins.append(lw.const(table, f"{node.name}.table{i}"))
    if len(ins) > 16:
        raise Unsupported("more than 8 inputs")
    lw.emit(QCONCAT, ins, [lw.output(node, 0)], ints=[axis])


# -- graph passes -----------------------------------------------------------------------


def fuse_quantized(graph: Graph) -> None:
    """The quantization rewrites, in order (call before the float fusions)."""
    fuse_dynamic(graph)
    fuse_qdq(graph)


class _Index:
    """Producers and consumers of the live nodes, and the folded nodes' producers."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.producer: dict[str, Node] = {o: n for n in graph.nodes for o in n.outputs if o}
        self.folded: dict[str, Node] = {o: n for n in graph.folded for o in n.outputs if o}
        self.consumers: dict[str, list[Node]] = {}
        for n in graph.nodes:
            for i in n.inputs:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.outputs = set(graph.outputs)

    def only_consumer(self, name: str) -> Node | None:
        users = self.consumers.get(name, [])
        if len(users) != 1 or name in self.outputs:
            return None
        return users[0]

    def const(self, name: str) -> np.ndarray | None:
        if not name or name not in self.graph.values:
            return None
        return self.graph.values[name].const


def _is(node: Node | None, op_type: str, domain: str = "") -> bool:
    return node is not None and node.op_type == op_type and node.domain == domain


def _const_operand(index: _Index, node: Node) -> tuple[str, str] | None:
    """(computed input, constant input) of a two-input node with exactly one constant operand."""
    if len(node.inputs) != 2 or not all(node.inputs):
        return None
    a, b = node.inputs
    ca, cb = index.const(a), index.const(b)
    if ca is None and cb is not None:
        return a, b
    if cb is None and ca is not None:
        return b, a
    return None


def _replace(graph: Graph, replaced: dict[int, Node], removed: set[int]) -> None:
    nodes = []
    for n in graph.nodes:
        if id(n) in replaced:
            nodes.append(replaced[id(n)])
        elif id(n) not in removed:
            nodes.append(n)
    graph.nodes = nodes


def fuse_dynamic(graph: Graph) -> None:
    """DynamicQuantizeLinear -> {MatMul,Conv}Integer -> Cast -> Mul [-> Add] [-> Relu] as one node each."""
    index = _Index(graph)
    replaced: dict[int, Node] = {}
    removed: set[int] = set()
    for dq in graph.nodes:
        if not _is(dq, "DynamicQuantizeLinear") or len(dq.outputs) < 3 or not all(dq.outputs[:3]):
            continue
        xq, xs, xzp = dq.outputs[:3]
        if {xq, xs, xzp} & index.outputs:
            continue
        chains = []
        users_q = index.consumers.get(xq, [])
        ok = bool(users_q)
        claimed_scale_muls: set[int] = set()
        for user in users_q:
            chain = _dynamic_chain(index, user, xq, xs, xzp)
            if chain is None:
                ok = False
                break
            chains.append(chain)
            claimed_scale_muls.add(id(chain["scale_mul"]))
        if not ok:
            continue
        # Every reader of the scale and zero point must be part of a chain.
        zp_users = index.consumers.get(xzp, [])
        if any(id(u) not in {id(c["integer"]) for c in chains} for u in zp_users):
            continue
        if any(id(u) not in claimed_scale_muls for u in index.consumers.get(xs, [])):
            continue
        for chain in chains:
            integer: Node = chain["integer"]
            relu = {RELU_ATTR: 1} if chain["relu"] else {}
            if integer.op_type == "MatMulInteger":
                fused = Node(
                    "DynamicQuantizeMatMul",
                    MS,
                    integer.name,
                    [dq.inputs[0], integer.inputs[1], chain["w_scale"], _input(integer, 3), chain["bias"]],
                    [chain["output"]],
                    dict(relu),
                    1,
                )
            else:
                attrs = {k: v for k, v in integer.attrs.items()}
                attrs.update(relu)
                fused = Node(
                    "DynamicQuantizeConv",
                    EDGE,
                    integer.name,
                    [dq.inputs[0], integer.inputs[1], chain["w_scale"], _input(integer, 3), chain["bias"]],
                    [chain["output"]],
                    attrs,
                    1,
                )
            replaced[id(integer)] = fused
            for key in ("cast", "mul", "scale_mul", "add", "relu"):
                if chain[key] is not None:
                    removed.add(id(chain[key]))
        removed.add(id(dq))
    _replace(graph, replaced, removed)


def _input(node: Node, i: int) -> str:
    return node.inputs[i] if i < len(node.inputs) else ""


def _dynamic_chain(index: _Index, integer: Node, xq: str, xs: str, xzp: str) -> dict[str, Any] | None:
    graph = index.graph
    if not (_is(integer, "MatMulInteger") or _is(integer, "ConvInteger")):
        return None
    if integer.inputs[0] != xq or _input(integer, 2) != xzp:
        return None
    if index.const(integer.inputs[1]) is None:
        return None
    if _input(integer, 3) and index.const(integer.inputs[3]) is None:
        return None
    if integer.op_type == "ConvInteger":
        # The fused kernel quantizes each image on its own: one image per unit of batch.
        x = graph.values[integer.inputs[0]]
        if not x.shape or x.shape[0] != 1:
            return None
    cast = index.only_consumer(integer.outputs[0])
    if not _is(cast, "Cast") or int(cast.attr("to", 0)) != 1:  # type: ignore[union-attr]
        return None
    assert cast is not None
    mul = index.only_consumer(cast.outputs[0])
    if not _is(mul, "Mul") or len(mul.inputs) != 2:  # type: ignore[union-attr]
        return None
    assert mul is not None
    other = mul.inputs[1] if mul.inputs[0] == cast.outputs[0] else mul.inputs[0]
    scale_mul = index.producer.get(other)
    if scale_mul is None or not _is(scale_mul, "Mul") or other in index.outputs:
        return None
    pair = _const_operand(index, scale_mul)
    if pair is None or pair[0] != xs:
        return None
    if len(index.consumers.get(other, [])) != 1:
        return None
    y_value = graph.values[mul.outputs[0]]
    if y_value.shape != graph.values[cast.outputs[0]].shape:
        return None
    out, add, relu, bias = mul.outputs[0], None, None, ""
    nxt = index.only_consumer(out)
    if _is(nxt, "Add"):
        assert nxt is not None
        pair = _const_operand(index, nxt)
        if pair is not None and pair[0] == out and graph.values[nxt.outputs[0]].shape == y_value.shape:
            add, bias, out = nxt, pair[1], nxt.outputs[0]
            nxt = index.only_consumer(out)
    if _is(nxt, "Relu"):
        assert nxt is not None
        relu, out = nxt, nxt.outputs[0]
    return {
        "integer": integer,
        "cast": cast,
        "mul": mul,
        "scale_mul": scale_mul,
        "w_scale": pair_const(index, scale_mul),
        "add": add,
        "bias": bias,
        "relu": relu,
        "output": out,
    }


def pair_const(index: _Index, node: Node) -> str:
    pair = _const_operand(index, node)
    assert pair is not None
    return pair[1]


# QDQ: ops that commute with a DequantizeLinear/QuantizeLinear pair of the same parameters.
QDQ_TRANSPARENT = ("MaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity")


def fuse_qdq(graph: Graph) -> None:
    """QDQ-format rewrites (see the module docstring)."""
    index = _Index(graph)
    replaced: dict[int, Node] = {}
    removed: set[int] = set()
    for node in graph.nodes:
        if node.domain != "" or id(node) in removed:
            continue
        fused: tuple[Node, list[Node]] | None = None
        if node.op_type in ("Conv", "MatMul", "Gemm"):
            fused = _qdq_dense(index, node)
        elif node.op_type in ("Add", "Mul"):
            fused = _qdq_binary(index, node)
        elif node.op_type == "GlobalAveragePool":
            fused = _qdq_gap(index, node)
        elif node.op_type == "Softmax":
            fused = _qdq_softmax(index, node)
        elif node.op_type in QDQ_TRANSPARENT:
            fused = _qdq_transparent(index, node)
        if fused is None:
            continue
        new, gone = fused
        if any(id(g) in removed or id(g) in replaced for g in gone):
            continue
        replaced[id(node)] = new
        removed.update(id(g) for g in gone)
    _replace(graph, replaced, removed)


def _dq_params(index: _Index, dq: Node | None, live: bool) -> tuple[str, str, str] | None:
    """(quantized input, scale, zero point or "") of a per-tensor DequantizeLinear with constant parameters."""
    if dq is None or not _is(dq, "DequantizeLinear"):
        return None
    if int(dq.attr("block_size", 0) or 0):
        return None
    q, s, z = dq.inputs[0], _input(dq, 1), _input(dq, 2)
    qv = index.graph.values.get(q)
    if qv is None or qv.dtype not in Q8 or (live and qv.is_const):
        return None
    sc = index.const(s)
    if sc is None or sc.size != 1 or (z and (index.const(z) is None or index.const(z).size != 1)):  # type: ignore[union-attr]
        return None
    return q, s, z


def _q_params(index: _Index, q: Node | None) -> tuple[str, str, str] | None:
    """(scale, zero point or "", output) of a per-tensor QuantizeLinear with constant parameters to u8/i8."""
    if q is None or not _is(q, "QuantizeLinear") or int(q.attr("block_size", 0) or 0):
        return None
    s, z = _input(q, 1), _input(q, 2)
    sc = index.const(s)
    if sc is None or sc.size != 1 or (z and (index.const(z) is None or index.const(z).size != 1)):  # type: ignore[union-attr]
        return None
    if index.graph.values[q.outputs[0]].dtype not in Q8:
        return None
    return s, z, q.outputs[0]


def _same_params(index: _Index, s1: str, z1: str, s2: str, z2: str) -> bool:
    a, b = index.const(s1), index.const(s2)
    if a is None or b is None or float(a.reshape(-1)[0]) != float(b.reshape(-1)[0]):
        return False
    za = 0 if not z1 else int(index.const(z1).reshape(-1)[0])  # type: ignore[union-attr]
    zb = 0 if not z2 else int(index.const(z2).reshape(-1)[0])  # type: ignore[union-attr]
    return za == zb


def _output_q(index: _Index, node: Node, allow_relu: bool) -> tuple[tuple[str, str, str], list[Node], bool] | None:
    """The QuantizeLinear (optionally after a Relu) that alone reads ``node``'s output."""
    nxt = index.only_consumer(node.outputs[0])
    relu = False
    gone: list[Node] = []
    if allow_relu and _is(nxt, "Relu"):
        assert nxt is not None
        gone.append(nxt)
        relu = True
        nxt = index.only_consumer(nxt.outputs[0])
    params = _q_params(index, nxt)
    if params is None:
        return None
    assert nxt is not None
    gone.append(nxt)
    return params, gone, relu


def _weight_dq(index: _Index, name: str, axis_ok: int, channels: int) -> tuple[str, str, str] | None:
    """The folded DequantizeLinear of a constant weight: (int8 weight, scale, zero point).

    Per tensor, or per ``axis_ok`` with ``channels`` values.
    """
    dq = index.folded.get(name)
    if dq is None or not _is(dq, "DequantizeLinear") or int(dq.attr("block_size", 0) or 0):
        return None
    q, s, z = dq.inputs[0], _input(dq, 1), _input(dq, 2)
    qc, sc = index.const(q), index.const(s)
    if qc is None or sc is None or qc.dtype not in Q8:
        return None
    if z and index.const(z) is None:
        return None
    if sc.size > 1:
        rank = qc.ndim
        axis = int(dq.attr("axis", 1)) % rank if rank else 0
        if axis != axis_ok or sc.size != channels:
            return None
    return q, s, z


def _bias_dq(index: _Index, name: str) -> str | None:
    dq = index.folded.get(name)
    if dq is None or not _is(dq, "DequantizeLinear"):
        return None
    bq = index.const(dq.inputs[0])
    if bq is None or bq.dtype != np.int32:
        return None
    z = _input(dq, 2)
    if z and np.any(index.const(z) != 0):
        return None
    return dq.inputs[0]


def _qdq_dense(index: _Index, node: Node) -> tuple[Node, list[Node]] | None:
    graph = index.graph
    x = _dq_params(index, index.producer.get(node.inputs[0]), live=True)
    if x is None or len(node.inputs) < 2 or index.const(node.inputs[1]) is None:
        return None
    w_value = graph.values[node.inputs[1]]
    out = _output_q(index, node, allow_relu=True)
    if out is None:
        return None
    (ys, yz, yname), gone, relu = out
    attrs = {k: v for k, v in node.attrs.items()}
    if relu:
        attrs[RELU_ATTR] = 1
    bias_name = _input(node, 2)
    if node.op_type == "Conv":
        w = _weight_dq(index, node.inputs[1], 0, w_value.shape[0])
        if w is None:
            return None
        bq = ""
        if bias_name:
            found = _bias_dq(index, bias_name)
            if found is None:
                return None
            bq = found
        inputs = [x[0], x[1], x[2], w[0], w[1], w[2], ys, yz, bq]
        return Node("QLinearConv", "", node.name, inputs, [yname], attrs, max(node.opset, 10)), gone
    if node.op_type == "MatMul":
        if len(w_value.shape) != 2 or len(graph.values[node.inputs[0]].shape) < 2:
            return None
        w = _weight_dq(index, node.inputs[1], 1, w_value.shape[1])
        if w is None:
            return None
        inputs = [x[0], x[1], x[2], w[0], w[1], w[2], ys, yz]
        return Node("QLinearMatMul", "", node.name, inputs, [yname], attrs, max(node.opset, 10)), gone
    # Gemm
    trans_b = int(node.attr("transB", 0))
    if int(node.attr("transA", 0)) or len(w_value.shape) != 2 or len(graph.values[node.inputs[0]].shape) != 2:
        return None
    n = w_value.shape[0] if trans_b else w_value.shape[1]
    w = _weight_dq(index, node.inputs[1], 0 if trans_b else 1, n)
    if w is None:
        return None
    bq = ""
    if bias_name:
        if float(node.attr("beta", 1.0)) != 1.0:
            return None
        found = _bias_dq(index, bias_name)
        if found is None or index.const(found).size not in (1, n):  # type: ignore[union-attr]
            return None
        bq = found
    gemm_attrs: dict[str, Any] = {"alpha": float(node.attr("alpha", 1.0)), "transB": trans_b}
    if relu:
        gemm_attrs[RELU_ATTR] = 1
    inputs = [x[0], x[1], x[2], w[0], w[1], w[2], bq, ys, yz]
    return Node("QGemm", MS, node.name, inputs, [yname], gemm_attrs, 1), gone


def _qdq_binary(index: _Index, node: Node) -> tuple[Node, list[Node]] | None:
    if len(node.inputs) != 2:
        return None
    # Each operand: a computed DequantizeLinear, or a folded one of constant integers.
    a, b = (
        _dq_params(index, index.producer.get(name), live=True) or _dq_params(index, index.folded.get(name), live=False)
        for name in node.inputs
    )
    if a is None or b is None:
        return None
    # onnxruntime (CPU) fuses these for uint8 only; int8 stays float between the Q/DQ pairs.
    if index.graph.values[a[0]].dtype != U8 or index.graph.values[b[0]].dtype != U8:
        return None
    out = _output_q(index, node, allow_relu=False)
    if out is None:
        return None
    (cs, cz, cname), gone, _ = out
    if index.graph.values[cname].dtype != index.graph.values[a[0]].dtype:
        return None
    inputs = [a[0], a[1], a[2], b[0], b[1], b[2], cs, cz]
    return Node("QLinear" + node.op_type, MS, node.name, inputs, [cname], {}, 1), gone


def _qdq_gap(index: _Index, node: Node) -> tuple[Node, list[Node]] | None:
    x = _dq_params(index, index.producer.get(node.inputs[0]), live=True)
    if x is None:
        return None
    out = _output_q(index, node, allow_relu=False)
    if out is None:
        return None
    (ys, yz, yname), gone, _ = out
    if index.graph.values[yname].dtype != index.graph.values[x[0]].dtype:
        return None
    inputs = [x[0], x[1], x[2], ys, yz]
    return Node("QLinearGlobalAveragePool", MS, node.name, inputs, [yname], {"channels_last": 0}, 1), gone


def _qdq_softmax(index: _Index, node: Node) -> tuple[Node, list[Node]] | None:
    x = _dq_params(index, index.producer.get(node.inputs[0]), live=True)
    if x is None:
        return None
    out = _output_q(index, node, allow_relu=False)
    if out is None:
        return None
    (ys, yz, yname), gone, _ = out
    if index.graph.values[yname].dtype != U8 or index.graph.values[x[0]].dtype != U8:
        return None  # as onnxruntime: uint8 only
    attrs: dict[str, Any] = {"opset": node.opset}
    if "axis" in node.attrs:
        attrs["axis"] = int(node.attrs["axis"])
    inputs = [x[0], x[1], x[2], ys, yz]
    return Node("QLinearSoftmax", MS, node.name, inputs, [yname], attrs, 1), gone


def _qdq_transparent(index: _Index, node: Node) -> tuple[Node, list[Node]] | None:
    if not node.inputs or len([o for o in node.outputs if o]) != 1:
        return None
    x = _dq_params(index, index.producer.get(node.inputs[0]), live=True)
    if x is None:
        return None
    out = _output_q(index, node, allow_relu=False)
    if out is None:
        return None
    (ys, yz, yname), gone, _ = out
    if index.graph.values[yname].dtype != index.graph.values[x[0]].dtype:
        return None
    if not _same_params(index, x[1], x[2], ys, yz):
        return None
    return Node(
        node.op_type, node.domain, node.name, [x[0], *node.inputs[1:]], [yname], dict(node.attrs), node.opset
    ), gone
