"""Pooling and ConvTranspose (native/onnx/ops_pool.c): the "conv" family's opcodes 32..63.

The kernels see 1 to 3 spatial dimensions as (D, H, W); the per-axis attributes
are padded at the front to three (kernel 1, stride 1, dilation 1, pads 0).
Output sizes come from the analysis (onnxruntime), so ``ceil_mode`` and the
``auto_pad`` rounding need no kernel support: only the begin pads do, and
the end pads for AveragePool's ``count_include_pad`` divisor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.convert.ir import Node
from agent.convert.lower import Lowerer, Unsupported
from agent.convert.ops import FAMILY_BASE, lowering
from agent.convert.ops.linear import MR, pack_a

BASE = FAMILY_BASE["conv"] + 32
POOL = BASE + 0
GLOBAL_POOL = BASE + 1
CONV_TRANSPOSE = BASE + 2
OPCODES = {"pool": POOL, "global_pool": GLOBAL_POOL, "conv_transpose": CONV_TRANSPOSE}

KIND_MAX, KIND_AVG, KIND_LP = 0, 1, 2
# ConvTranspose works on blocks of output channels whose column buffer stays under this.
COLS_BUDGET = 4 << 20


def _ints(value: object, n: int, default: int, what: str) -> list[int]:
    if value is None:
        return [default] * n
    out = [int(v) for v in np.asarray(value).reshape(-1)]
    if len(out) != n:
        raise Unsupported(f"{what} has {len(out)} values for {n} spatial dimensions")
    return out


def _pad3(values: Sequence[int], fill: int) -> list[int]:
    return [fill] * (3 - len(values)) + list(values)


def _auto_pad(node: Node) -> str:
    mode = str(node.attr("auto_pad", "NOTSET") or "NOTSET")
    if mode not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise Unsupported(f"auto_pad {mode!r} is not one of NOTSET, VALID, SAME_UPPER, SAME_LOWER")
    return mode


def _spatial(node: Node, lw: Lowerer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    x, y = lw.value(node.inputs[0]), lw.value(node.outputs[0])
    if not 3 <= len(x.shape) <= 5:
        raise Unsupported(f"input of rank {len(x.shape)}: 1 to 3 spatial dimensions (rank 3 to 5) are supported")
    if len(y.shape) != len(x.shape):
        raise Unsupported("output rank differs from the input's")
    return x.shape[2:], y.shape[2:]


@lowering("MaxPool", "AveragePool", "LpPool")
def lower_pool(node: Node, lw: Lowerer) -> None:
    x = lw.value(node.inputs[0])
    if len(node.outputs) > 1 and node.outputs[1]:
        raise Unsupported("the Indices output of MaxPool is not supported")
    kind = {"MaxPool": KIND_MAX, "AveragePool": KIND_AVG, "LpPool": KIND_LP}[node.op_type]
    allowed = (np.float32, np.uint8, np.int8) if kind == KIND_MAX else (np.float32,)
    if x.dtype not in [np.dtype(t) for t in allowed]:
        raise Unsupported(f"{x.dtype} input; supported: {', '.join(np.dtype(t).name for t in allowed)}")
    ins, outs = _spatial(node, lw)
    n = len(ins)
    if node.attr("kernel_shape") is None:
        raise Unsupported("kernel_shape is missing")
    k = _ints(node.attr("kernel_shape"), n, 1, "kernel_shape")
    s = _ints(node.attr("strides"), n, 1, "strides")
    d = _ints(node.attr("dilations"), n, 1, "dilations")
    if min(k) < 1 or min(s) < 1 or min(d) < 1:
        raise Unsupported("kernel_shape, strides and dilations must be positive")
    mode = _auto_pad(node)
    if mode == "NOTSET":
        pads = _ints(node.attr("pads"), 2 * n, 0, "pads")
        pb, pe = pads[:n], pads[n:]
        if min(pads) < 0:
            raise Unsupported("negative pads")
    elif mode == "VALID":
        pb, pe = [0] * n, [0] * n
    else:
        total = [
            max(0, (o - 1) * si + (ki - 1) * di + 1 - i) for o, si, ki, di, i in zip(outs, s, k, d, ins, strict=True)
        ]
        pb = [t // 2 if mode == "SAME_UPPER" else t - t // 2 for t in total]
        pe = [t - b for t, b in zip(total, pb, strict=True)]
    include_pad = int(node.attr("count_include_pad", 0) or 0) if kind == KIND_AVG else 0
    p = float(node.attr("p", 2)) if kind == KIND_LP else 2.0
    if kind == KIND_LP and p <= 0:
        raise Unsupported(f"p = {p}: must be positive")
    if node.op_type == "MaxPool" and int(node.attr("storage_order", 0) or 0) not in (0, 1):
        raise Unsupported("storage_order must be 0 or 1")
    ints = [
        kind,
        include_pad,
        *_pad3(k, 1),
        *_pad3(s, 1),
        *_pad3(d, 1),
        *_pad3(pb, 0),
        *_pad3(pe, 0),
    ]
    outs3 = _pad3(list(outs), 1)
    k3 = _pad3(k, 1)
    lw.scratch(fixed=12 * sum(outs3) + 8 * k3[2] + 4 * outs3[2] + 64)
    lw.emit(POOL, [lw.input(node, 0)], [lw.output(node, 0)], ints=ints, floats=[p])


@lowering("GlobalMaxPool", "GlobalAveragePool", "GlobalLpPool")
def lower_global_pool(node: Node, lw: Lowerer) -> None:
    x = lw.value(node.inputs[0])
    kind = {"GlobalMaxPool": KIND_MAX, "GlobalAveragePool": KIND_AVG, "GlobalLpPool": KIND_LP}[node.op_type]
    if x.dtype != np.float32:
        raise Unsupported(f"{x.dtype} input; supported: float32")
    if len(x.shape) < 2:
        raise Unsupported(f"input of rank {len(x.shape)}: at least (N, C) is needed")
    p = float(node.attr("p", 2)) if kind == KIND_LP else 2.0
    if kind == KIND_LP and p <= 0:
        raise Unsupported(f"p = {p}: must be positive")
    lw.emit(GLOBAL_POOL, [lw.input(node, 0)], [lw.output(node, 0)], ints=[kind], floats=[p])


def _transpose_pads(
    mode: str, ins: Sequence[int], k: Sequence[int], s: Sequence[int], d: Sequence[int], adj: Sequence[int], node: Node
) -> tuple[list[int], list[int]]:
    """Begin and end pads of a ConvTranspose, as onnxruntime computes them."""
    n = len(ins)
    output_shape = node.attr("output_shape")
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        totals = [
            max(0, (i - 1) * si + a + (ki - 1) * di + 1 - i * si)
            for i, si, a, ki, di in zip(ins, s, adj, k, d, strict=True)
        ]
        upper = mode == "SAME_UPPER"
    elif output_shape is not None and len(output_shape) > 0:
        shape = [int(v) for v in output_shape]
        if len(shape) == n + 2:
            shape = shape[2:]
        if len(shape) != n:
            raise Unsupported(f"output_shape has {len(shape)} values for {n} spatial dimensions")
        totals = [
            max(0, (i - 1) * si + a + (ki - 1) * di + 1 - o)
            for i, si, a, ki, di, o in zip(ins, s, adj, k, d, shape, strict=True)
        ]
        upper = False
    else:
        pads = [0] * (2 * n) if mode == "VALID" else _ints(node.attr("pads"), 2 * n, 0, "pads")
        if min(pads) < 0:
            raise Unsupported("negative pads")
        return pads[:n], pads[n:]
    begin = [t // 2 if upper else t - t // 2 for t in totals]
    return begin, [t - b for t, b in zip(totals, begin, strict=True)]


@lowering("ConvTranspose")
def lower_conv_transpose(node: Node, lw: Lowerer) -> None:
    x, y = lw.value(node.inputs[0]), lw.value(node.outputs[0])
    if x.dtype != np.float32:
        raise Unsupported(f"{x.dtype} input; supported: float32")
    ins, outs = _spatial(node, lw)
    n = len(ins)
    wv = lw.value(node.inputs[1])
    if wv.dtype != np.float32 or wv.batched:
        raise Unsupported("the weight must be float32 and not vary with the batch")
    if len(wv.shape) != n + 2:
        raise Unsupported(f"weight of rank {len(wv.shape)} for {n} spatial dimensions")
    w_shape = tuple(wv.shape)
    group = int(node.attr("group", 1))
    cin, cout = x.shape[1], y.shape[1]
    if group < 1 or cin % group or w_shape[0] != cin or w_shape[1] * group != cout:
        raise Unsupported(
            f"weight shape {w_shape} does not match input channels {cin}, output channels {cout}, group {group}"
        )
    k = (
        _ints(node.attr("kernel_shape"), n, 0, "kernel_shape")
        if node.attr("kernel_shape") is not None
        else list(w_shape[2:])
    )
    if k != list(w_shape[2:]):
        raise Unsupported(f"kernel_shape {k} differs from the weight's {list(w_shape[2:])}")
    s = _ints(node.attr("strides"), n, 1, "strides")
    d = _ints(node.attr("dilations"), n, 1, "dilations")
    adj = _ints(node.attr("output_padding"), n, 0, "output_padding")
    if min(s) < 1 or min(d) < 1 or min(adj) < 0:
        raise Unsupported("strides and dilations must be positive, output_padding non-negative")
    pb, pe = _transpose_pads(_auto_pad(node), ins, k, s, d, adj, node)
    for i in range(n):
        natural = (ins[i] - 1) * s[i] + adj[i] + (k[i] - 1) * d[i] + 1 - pb[i] - pe[i]
        if natural != outs[i] and node.attr("output_shape") is None:
            raise Unsupported(
                f"output size {outs[i]} along axis {i + 2} does not follow from the attributes ({natural})"
            )
    cin_g, cout_g = cin // group, cout // group
    kvol = int(np.prod(k))
    s_in = int(np.prod(ins))
    co_blk = max(1, min(cout_g, COLS_BUDGET // max(1, kvol * s_in * 4)))
    w = lw.const_input(node, 1)
    raw = w is None
    if w is not None:
        # Per group, per block of co_blk output channels: the rows (co, k...) x Cin_g of the GEMM's
        # left operand, in ea_gemm's A panels.
        a = w.astype(np.float32).reshape(group, cin_g, cout_g * kvol).transpose(0, 2, 1)
        blocks = [
            pack_a(a[g, c0 * kvol : (c0 + co_blk) * kvol]) for g in range(group) for c0 in range(0, cout_g, co_blk)
        ]
        weight = lw.const(np.concatenate([b.reshape(-1) for b in blocks]), f"{node.name or node.outputs[0]}.packed")
    else:
        weight = lw.input(node, 1)  # packed block by block at each run
    inputs = [lw.input(node, 0), weight]
    if lw.has_input(node, 2):
        b = lw.value(node.inputs[2])
        if b.dtype != np.float32 or b.batched or int(np.prod(b.shape)) != cout:
            raise Unsupported(f"bias of shape {b.shape}: {cout} float32 values expected")
        inputs.append(lw.input(node, 2))
    k3 = _pad3(k, 1)
    w_bytes = 4 * (-(-co_blk * kvol // MR) * MR) * cin_g + 16 if raw else 0
    lw.scratch(fixed=w_bytes + co_blk * kvol * s_in * 4 + 8 * k3[2] + 64)
    ints = [group, *k3, *_pad3(s, 1), *_pad3(d, 1), *_pad3(pb, 0), co_blk, int(raw)]
    lw.emit(CONV_TRANSPOSE, inputs, [lw.output(node, 0)], ints=ints)
