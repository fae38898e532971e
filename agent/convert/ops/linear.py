"""Family "linear" (native/onnx/ops_linear.c): Gemm and MatMul over the shared SGEMM (ea_gemm.c).

A constant right-hand operand (the weights: the usual case) is packed here, at build
time, into the column panels the micro-kernel reads (``pack_b``); ``alpha`` is folded
into it and ``beta * C`` into a bias when C broadcasts over the rows. A bias added by
a following Add and an activation after it (agent/convert/passes.py sets
``_fused_bias`` and ``_fused_activation``) run in the kernel's epilogue.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from agent.convert.ir import Node
from agent.convert.lower import Lowerer, Unsupported
from agent.convert.ops import FAMILY_BASE, lowering

BASE = FAMILY_BASE["linear"]
GEMM = BASE + 0
MATMUL = BASE + 1
OPCODES = {"gemm": GEMM, "matmul": MATMUL}

# The micro-kernel's tile and K block (native/onnx/ea_gemm.h EA_MR, EA_NR, EA_KC).
MR = 4
NR = 16
KC = 256

# B layouts of the gemm kernel.
B_PACKED, B_ROWMAJOR, B_TRANSPOSED = 0, 1, 2

# Epilogue modes (ea_gemm.h).
ACT_NONE, ACT_CLAMP, ACT_LEAKY, ACT_EXTERNAL = 0, 1, 2, 3

# node.attrs keys set by agent/convert/passes.py.
FUSED_ACTIVATION = "_fused_activation"  # (kind, alpha, beta): unary.activation_spec
FUSED_BIAS = "_fused_bias"  # float32 array added to the output, broadcast along its last axis
FUSED_RESIDUAL = "_fused_residual"  # True: input 3 (appended) has the output's shape, added before the activation


def activation_epilogue(fused: tuple[int, float, float] | None) -> tuple[list[int], list[float]]:
    """The epilogue attributes (ints: mode, kind; floats: lo, hi, slope, alpha, beta) of a fused
    activation ``(kind, alpha, beta)``: ea_activation_f32's kinds (agent/convert/ops/unary.py
    ACTIVATION_KINDS). Relu, Clip and LeakyRelu run inline in the micro-kernel, the rest through
    ea_activation_f32 on each finished block of rows."""
    from agent.convert.ops.unary import ACTIVATION_KINDS

    if fused is None:
        return [ACT_NONE, 0], [0.0, 0.0, 0.0, 0.0, 0.0]
    kind, alpha, beta = int(fused[0]), float(fused[1]), float(fused[2])
    if kind == ACTIVATION_KINDS["Relu"]:
        return [ACT_CLAMP, 0], [0.0, math.inf, 0.0, 0.0, 0.0]
    if kind == ACTIVATION_KINDS["Clip"]:
        return [ACT_CLAMP, 0], [alpha, beta, 0.0, 0.0, 0.0]
    if kind == ACTIVATION_KINDS["LeakyRelu"] and 0.0 <= alpha <= 1.0:
        return [ACT_LEAKY, 0], [0.0, 0.0, alpha, 0.0, 0.0]
    return [ACT_EXTERNAL, kind], [0.0, 0.0, 0.0, alpha, beta]


def _pack(m: np.ndarray, tile: int) -> np.ndarray:
    """Rows of ``m`` [R, K] in ea_gemm's packed layout: K blocks of KC, each [ceil(R/tile)][kc][tile]."""
    r, k = m.shape
    rp = -(-r // tile) * tile
    padded = np.zeros((rp, k), dtype=np.float32)
    padded[:r] = m
    blocks = []
    for k0 in range(0, k, KC):
        block = padded[:, k0 : k0 + KC]
        kc = block.shape[1]
        blocks.append(block.reshape(rp // tile, tile, kc).transpose(0, 2, 1).reshape(-1))
    return np.ascontiguousarray(np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32))


def pack_b(b: np.ndarray) -> np.ndarray:
    """B [K, N] in the kernel's packed layout (column panels of NR, zero columns past N)."""
    return _pack(np.asarray(b, dtype=np.float32).T, NR)


def pack_a(a: np.ndarray) -> np.ndarray:
    """A [M, K] in the kernel's packed layout (row panels of MR, zero rows past M)."""
    return _pack(np.asarray(a, dtype=np.float32), MR)


def packed_a_floats(m: int, k: int) -> int:
    return -(-m // MR) * MR * k


NC = 512  # ea_gemm.h EA_NC


def work_bytes(n: int) -> int:
    """Bytes of ea_gemm's work buffer (B packed at run time) for n columns: ea_gemm_work_floats."""
    return KC * (-(-min(n, NC) // NR) * NR) * 4


def padded_bias(bias: np.ndarray, n: int) -> np.ndarray:
    """A per-column bias of n values, zero-padded to whole NR panels (the kernel reads NR at a time)."""
    out = np.zeros(max(1, -(-n // NR)) * NR, dtype=np.float32)
    out[:n] = np.broadcast_to(np.asarray(bias, dtype=np.float64).reshape(-1), (n,))
    return out


def _require_float(lw: Lowerer, node: Node, indices: Sequence[int]) -> None:
    for i in indices:
        if lw.has_input(node, i) and lw.value(node.inputs[i]).dtype != np.float32:
            raise Unsupported(f"input {i} is {lw.value(node.inputs[i]).dtype}; only float32 is supported")


def _scratch_a(lw: Lowerer, rows_per_batch: int, fixed_rows: int, batched: bool, k: int) -> tuple[int, int]:
    """Bytes of packed A (run-time operand): per unit of batch and fixed."""
    pad = MR * k * 4
    if batched:
        return rows_per_batch * k * 4, pad
    return 0, fixed_rows * k * 4 + pad


@lowering("Gemm")
def lower_gemm(node: Node, lw: Lowerer) -> None:
    _require_float(lw, node, (0, 1, 2))
    a, b, y = lw.value(node.inputs[0]), lw.value(node.inputs[1]), lw.value(node.outputs[0])
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise Unsupported(f"A and B must be matrices, got shapes {list(a.shape)} and {list(b.shape)}")
    trans_a, trans_b = int(node.attr("transA", 0)), int(node.attr("transB", 0))
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    k = a.shape[0] if trans_a else a.shape[1]
    n = b.shape[0] if trans_b else b.shape[1]
    if (b.shape[1] if trans_b else b.shape[0]) != k:
        raise Unsupported(f"A {list(a.shape)} and B {list(b.shape)} do not multiply")
    if trans_a and a.batched:
        raise Unsupported("transA with a batched A (the batch would be the reduction axis)")
    if y.shape[-1:] != (n,):
        raise Unsupported(f"output shape {list(y.shape)} is not [M, {n}]")
    m = y.shape[0]
    bias = np.zeros(n, dtype=np.float64)
    has_bias = False
    c_tensor = -1
    c_rows = c_cols = 1
    c = lw.const_input(node, 2)
    if lw.has_input(node, 2) and beta != 0.0:
        cv = lw.value(node.inputs[2])
        if len(cv.shape) > 2:
            raise Unsupported(f"C has rank {len(cv.shape)}; it must broadcast to [M, N]")
        cshape = (1,) * (2 - len(cv.shape)) + tuple(cv.shape)
        if cshape[0] not in (1, m) or cshape[1] not in (1, n):
            raise Unsupported(f"C of shape {list(cv.shape)} does not broadcast to [{m}, {n}]")
        if c is not None and cshape[0] == 1:
            bias = bias + beta * np.broadcast_to(c.astype(np.float64).reshape(cshape), (1, n))[0]
            has_bias = True
        else:
            if cv.batched != a.batched:
                raise Unsupported("C's rows do not follow A's batch")
            c_tensor = lw.input(node, 2)
            c_rows, c_cols = cshape
    fused_bias = node.attrs.get(FUSED_BIAS)
    if fused_bias is not None:
        bias = bias + np.broadcast_to(np.asarray(fused_bias, dtype=np.float64).reshape(-1), (n,))
        has_bias = True
    bconst = lw.const_input(node, 1)
    b_scratch = 0
    if bconst is not None:
        bm = bconst.T if trans_b else bconst
        b_tensor = lw.const(pack_b((alpha * bm.astype(np.float64)).astype(np.float32)), f"{node.name}.packed_B")
        layout, alpha_run = B_PACKED, 1.0
    else:
        # B packed block by block at run time (after a transpose into scratch for transB).
        b_tensor = lw.input(node, 1)
        layout, alpha_run = (B_TRANSPOSED if trans_b else B_ROWMAJOR), alpha
        b_scratch = work_bytes(n) + (k * n * 4 if layout == B_TRANSPOSED else 0) + 64
    bias_tensor = lw.const(padded_bias(bias, n), f"{node.name}.bias") if has_bias else -1
    act_i, act_f = activation_epilogue(node.attrs.get(FUSED_ACTIVATION))
    per_batch, fixed = _scratch_a(lw, a.shape[0], m, a.batched, k)
    lw.scratch(per_batch=per_batch, fixed=fixed + b_scratch)
    lw.emit(
        GEMM,
        [lw.input(node, 0), b_tensor, bias_tensor, c_tensor],
        [lw.output(node, 0)],
        ints=[k, n, trans_a, layout, c_rows, c_cols, *act_i],
        floats=[alpha_run, beta, *act_f],
    )


@lowering("MatMul")
def lower_matmul(node: Node, lw: Lowerer) -> None:
    _require_float(lw, node, (0, 1))
    a, b = lw.value(node.inputs[0]), lw.value(node.inputs[1])
    if not a.shape or not b.shape:
        raise Unsupported("MatMul of a scalar")
    k = a.shape[-1]
    kb = b.shape[0] if len(b.shape) == 1 else b.shape[-2]
    if kb != k:
        raise Unsupported(f"A {list(a.shape)} and B {list(b.shape)} do not multiply")
    n = 1 if len(b.shape) == 1 else b.shape[-1]
    fused_bias = node.attrs.get(FUSED_BIAS)
    bias_tensor = -1
    if fused_bias is not None:
        bias_tensor = lw.const(padded_bias(np.asarray(fused_bias), n), f"{node.name}.bias")
    act_i, act_f = activation_epilogue(node.attrs.get(FUSED_ACTIVATION))
    bconst = lw.const_input(node, 1)
    rows = int(np.prod(a.shape[:-1], dtype=np.int64))
    if bconst is not None and bconst.ndim <= 2:
        # Constant weights: every row of A (whatever its leading shape) times packed B.
        bm = bconst.reshape(k, 1) if bconst.ndim == 1 else bconst
        packed = lw.const(pack_b(bm.astype(np.float32)), f"{node.name}.packed_B")
        per_batch, fixed = _scratch_a(lw, rows, rows, a.batched, k)
        lw.scratch(per_batch=per_batch, fixed=fixed)
        lw.emit(
            GEMM,
            [lw.input(node, 0), packed, bias_tensor, -1],
            [lw.output(node, 0)],
            ints=[k, n, 0, B_PACKED, 1, 1, *act_i],
            floats=[1.0, 1.0, *act_f],
        )
        return
    if b.batched and len(b.shape) <= 2:
        raise Unsupported("B's batch dimension would be the reduction axis")
    per_batch, fixed = _scratch_a(lw, rows, rows, a.batched, k)
    lw.scratch(per_batch=per_batch, fixed=fixed + work_bytes(n) + 64)
    lw.emit(
        MATMUL,
        [lw.input(node, 0), lw.input(node, 1), bias_tensor],
        [lw.output(node, 0)],
        ints=[int(len(a.shape) == 1), int(len(b.shape) == 1), *act_i],
        floats=act_f,
    )
