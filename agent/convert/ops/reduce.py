"""Family "reduce" (native/onnx/ops_reduce.c): reductions and ops along an axis.

Reduce* (Sum, Mean, Max, Min, Prod, L1, L2, SumSquare, LogSum, LogSumExp), Softmax,
LogSoftmax, Hardmax, ArgMax, ArgMin and TopK. The kernels take their extents from
the run-time dims, so a batched input only changes the outer extent; an op that
would reduce, normalise or select along the batch axis mixes the rows of a batch
and is refused.
"""

from __future__ import annotations

import numpy as np

from agent.convert.ir import Node
from agent.convert.lower import Lowerer, Unsupported
from agent.convert.ops import FAMILY_BASE, lowering

BASE = FAMILY_BASE["reduce"]
REDUCE = BASE + 0
SOFTMAX = BASE + 1
ARG = BASE + 2
TOPK = BASE + 3
OPCODES = {"reduce": REDUCE, "softmax": SOFTMAX, "arg": ARG, "topk": TOPK}

# Reduction kinds (ops_reduce.c R_*).
KINDS = {
    "ReduceSum": 0,
    "ReduceMean": 1,
    "ReduceMax": 2,
    "ReduceMin": 3,
    "ReduceProd": 4,
    "ReduceL1": 5,
    "ReduceL2": 6,
    "ReduceSumSquare": 7,
    "ReduceLogSum": 8,
    "ReduceLogSumExp": 9,
}
F32 = np.dtype(np.float32)
INTS = (np.dtype(np.int32), np.dtype(np.int64))
# ArgMax/ArgMin also take 8-bit integers (quantized models: ArgMax after QLinearSoftmax).
ARG_TYPES = (F32, *INTS, np.dtype(np.uint8), np.dtype(np.int8))
# Element types each reduction takes besides float32.
INT_REDUCTIONS = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceSumSquare"}
BOOL_REDUCTIONS = {"ReduceMax", "ReduceMin"}
# Softmax modes (ops_reduce.c op_softmax).
SOFTMAX_MODES = {"Softmax": 0, "LogSoftmax": 1, "Hardmax": 2}


def _axis(axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < rank:
        raise Unsupported(f"{what} {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _refuse_batch_axis(lw: Lowerer, node: Node, axes: list[int], what: str) -> None:
    if 0 in axes and lw.value(node.inputs[0]).batched:
        raise Unsupported(f"{what} along axis 0, the batch axis, which would mix the rows of a batch")


def _reduce_axes(node: Node, lw: Lowerer, rank: int) -> list[int]:
    """The axes to reduce (normalised, sorted); [] reduces nothing (noop_with_empty_axes)."""
    axes_input_since = 13 if node.op_type == "ReduceSum" else 18
    noop = False
    if node.opset >= axes_input_since:
        raw = lw.require_const(node, 1, "axes") if lw.has_input(node, 1) else np.zeros(0, np.int64)
        noop = bool(node.attr("noop_with_empty_axes", 0))
    else:
        raw = np.asarray(node.attr("axes", []), dtype=np.int64)
    axes = [int(a) for a in np.asarray(raw).reshape(-1)]
    if not axes:
        return [] if noop else list(range(rank))
    normalised = sorted({_axis(a, rank, "axis") for a in axes})
    if len(normalised) != len(axes):
        raise Unsupported(f"axes {axes} repeat an axis")
    return normalised


@lowering(*KINDS)
def lower_reduce(node: Node, lw: Lowerer) -> None:
    x = lw.value(node.inputs[0])
    rank = len(x.shape)
    ok = x.dtype == F32 or (x.dtype in INTS and node.op_type in INT_REDUCTIONS)
    ok = ok or (x.dtype == np.bool_ and node.op_type in BOOL_REDUCTIONS)
    if not ok:
        raise Unsupported(f"input element type {x.dtype} is not supported")
    axes = _reduce_axes(node, lw, rank)
    _refuse_batch_axis(lw, node, axes, "reduces")
    mask = sum(1 << a for a in axes)
    if node.op_type == "ReduceLogSumExp":
        _scratch_per_output(lw, node)
    lw.emit(REDUCE, [lw.input(node, 0)], [lw.output(node, 0)], ints=[KINDS[node.op_type], mask])


def _scratch_per_output(lw: Lowerer, node: Node) -> None:
    """The kernel takes one float of scratch per output element (+ alignment slack)."""
    y = lw.value(node.outputs[0])
    nbytes = 4 * int(np.prod(y.shape, dtype=np.int64)) + 16
    if y.batched:
        lw.scratch(per_batch=nbytes)
    else:
        lw.scratch(fixed=nbytes)


@lowering(*SOFTMAX_MODES)
def lower_softmax(node: Node, lw: Lowerer) -> None:
    x = lw.value(node.inputs[0])
    rank = len(x.shape)
    if x.dtype != F32:
        raise Unsupported(f"input element type {x.dtype} is not supported (float32 only)")
    if rank == 0:
        raise Unsupported("input is a scalar")
    if node.opset < 13:
        # Coerced to 2-D at axis: normalised over all the dims from axis on.
        axis = _axis(int(node.attr("axis", 1)), rank)
        end = rank
    else:
        axis = _axis(int(node.attr("axis", -1)), rank)
        end = axis + 1
    _refuse_batch_axis(lw, node, list(range(axis, end)), f"{node.op_type} is taken")
    inner = int(np.prod(x.shape[end:], dtype=np.int64))
    if inner > 1:
        lw.scratch(fixed=8 * inner + 16)
    lw.emit(SOFTMAX, [lw.input(node, 0)], [lw.output(node, 0)], ints=[SOFTMAX_MODES[node.op_type], axis, end])


@lowering("ArgMax", "ArgMin")
def lower_arg(node: Node, lw: Lowerer) -> None:
    x = lw.value(node.inputs[0])
    rank = len(x.shape)
    if x.dtype not in ARG_TYPES:
        raise Unsupported(f"input element type {x.dtype} is not supported")
    if rank == 0:
        raise Unsupported("input is a scalar")
    axis = _axis(int(node.attr("axis", 0)), rank)
    _refuse_batch_axis(lw, node, [axis], f"{node.op_type} is taken")
    if x.shape[axis] == 0:
        raise Unsupported(f"axis {axis} is empty")
    last = int(node.attr("select_last_index", 0)) if node.opset >= 12 else 0
    is_min = 1 if node.op_type == "ArgMin" else 0
    lw.emit(ARG, [lw.input(node, 0)], [lw.output(node, 0)], ints=[axis, is_min, last])


@lowering("TopK")
def lower_topk(node: Node, lw: Lowerer) -> None:
    x = lw.value(node.inputs[0])
    rank = len(x.shape)
    if x.dtype != F32 and x.dtype not in INTS:
        raise Unsupported(f"input element type {x.dtype} is not supported")
    if rank == 0:
        raise Unsupported("input is a scalar")
    axis = _axis(int(node.attr("axis", -1)), rank)
    _refuse_batch_axis(lw, node, [axis], "TopK is taken")
    if node.opset >= 10:
        k_arr = np.asarray(lw.require_const(node, 1, "K")).reshape(-1)
        if k_arr.size != 1:
            raise Unsupported(f"K must hold one value, it holds {k_arr.size}")
        k = int(k_arr[0])
    else:
        k = int(node.attr("k", -1))
    n = x.shape[axis]
    if not 0 <= k <= n:
        raise Unsupported(f"K = {k} is outside 0..{n} (the size of axis {axis})")
    largest = int(node.attr("largest", 1)) if node.opset >= 11 else 1
    # sorted=0 leaves the order unspecified: the kernel returns it sorted either way.
    if len(node.outputs) < 2 or not node.outputs[1] or not node.outputs[0]:
        raise Unsupported("TopK needs both outputs (values and indices)")
    lw.scratch(fixed=n * (x.dtype.itemsize + 8) + 32)
    lw.emit(TOPK, [lw.input(node, 0)], [lw.output(node, 0), lw.output(node, 1)], ints=[axis, k, largest])
