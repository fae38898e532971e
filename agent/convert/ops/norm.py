"""Family "norm" (native/onnx/ops_norm.c): normalisations and LRN, float32.

BatchNormalization here is the standalone one (inference: running mean and
variance); the ones right after a Conv or Gemm are folded into its weights by
agent/convert/passes.py. Normalisations over the batch axis of a batched model
are refused: a row's result would depend on the other rows served with it.
"""

from __future__ import annotations

import numpy as np

from agent.convert.ir import Node, Value
from agent.convert.lower import Lowerer, Unsupported
from agent.convert.ops import FAMILY_BASE, lowering

BASE = FAMILY_BASE["norm"]
BATCHNORM = BASE + 0
INSTANCENORM = BASE + 1
LAYERNORM = BASE + 2
LRN = BASE + 3
LPNORM = BASE + 4
MVN = BASE + 5
OPCODES = {
    "batchnorm": BATCHNORM,
    "instancenorm": INSTANCENORM,
    "layernorm": LAYERNORM,
    "lrn": LRN,
    "lpnorm": LPNORM,
    "mvn": MVN,
}

F32 = np.dtype(np.float32)


def _float_input(node: Node, lw: Lowerer, index: int, what: str) -> Value:
    value = lw.value(node.inputs[index])
    if value.dtype != F32:
        raise Unsupported(f"{what} is {value.dtype}; supported: float32")
    return value


def _no_extra_outputs(node: Node, keep: int, why: str) -> None:
    if any(name for name in node.outputs[keep:]):
        raise Unsupported(why)


def _axis(node: Node, x: Value, default: int) -> int:
    rank = len(x.shape)
    axis = int(node.attr("axis", default))
    if not -rank <= axis < rank:
        raise Unsupported(f"axis {axis} is out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _param(node: Node, lw: Lowerer, index: int, count: int, what: str) -> int:
    value = _float_input(node, lw, index, what)
    if int(np.prod(value.shape, dtype=np.int64)) != count or value.batched:
        raise Unsupported(f"{what} has shape {list(value.shape)}: {count} values expected")
    return lw.input(node, index)


@lowering("BatchNormalization")
def lower_batchnorm(node: Node, lw: Lowerer) -> None:
    x = _float_input(node, lw, 0, "the input")
    if int(node.attr("training_mode", 0) or 0):
        raise Unsupported("training_mode=1 is not supported (inference only)")
    _no_extra_outputs(node, 1, "the training outputs (running mean/var, saved mean/var) are not supported")
    if len(x.shape) < 2:
        raise Unsupported(f"input of rank {len(x.shape)}: (N, C, ...) expected")
    per_element = node.opset < 9 and int(node.attr("spatial", 1)) == 0
    channels = x.shape[1]
    if per_element:
        channels = int(np.prod(x.shape[1:], dtype=np.int64))
    names = ("scale", "B", "input_mean", "input_var")
    inputs = [lw.input(node, 0)] + [_param(node, lw, i + 1, channels, names[i]) for i in range(4)]
    lw.scratch(fixed=8 * channels + 16)
    eps = float(node.attr("epsilon", 1e-5))
    lw.emit(BATCHNORM, inputs, [lw.output(node, 0)], ints=[int(per_element)], floats=[eps])


@lowering("InstanceNormalization")
def lower_instancenorm(node: Node, lw: Lowerer) -> None:
    x = _float_input(node, lw, 0, "the input")
    if len(x.shape) < 2:
        raise Unsupported(f"input of rank {len(x.shape)}: (N, C, ...) expected")
    channels = x.shape[1]
    inputs = [lw.input(node, 0), _param(node, lw, 1, channels, "scale"), _param(node, lw, 2, channels, "B")]
    lw.emit(INSTANCENORM, inputs, [lw.output(node, 0)], floats=[float(node.attr("epsilon", 1e-5))])


def _layer_param(node: Node, lw: Lowerer, index: int, tail: tuple[int, ...], what: str) -> int:
    value = _float_input(node, lw, index, what)
    count = int(np.prod(tail, dtype=np.int64))
    if int(np.prod(value.shape, dtype=np.int64)) == count and not value.batched:
        return lw.input(node, index)
    const = lw.const_input(node, index)
    if const is not None:
        try:
            full = np.broadcast_to(const.astype(np.float32), tail)
        except ValueError:
            raise Unsupported(f"{what} of shape {list(value.shape)} does not broadcast to {list(tail)}") from None
        return lw.const(full, f"{node.name or node.outputs[0]}.{what}")
    raise Unsupported(f"{what} of shape {list(value.shape)} is computed at run time and is not of shape {list(tail)}")


@lowering("LayerNormalization")
def lower_layernorm(node: Node, lw: Lowerer) -> None:
    x = _float_input(node, lw, 0, "the input")
    axis = _axis(node, x, -1)
    if axis == 0 and x.batched:
        raise Unsupported("axis 0 normalises over the batch")
    tail = x.shape[axis:]
    inputs = [lw.input(node, 0), _layer_param(node, lw, 1, tail, "Scale")]
    if lw.has_input(node, 2):
        inputs.append(_layer_param(node, lw, 2, tail, "B"))
    outputs = [lw.output(node, 0)]
    for i in (1, 2):
        if i < len(node.outputs) and node.outputs[i]:
            if lw.value(node.outputs[i]).dtype != F32:
                raise Unsupported(f"output {i} must be float32 (stash_type 1)")
            while len(outputs) < i:
                outputs.append(lw.temp(F32, (*x.shape[:axis], *([1] * (len(x.shape) - axis))), x.batched, "unused"))
            outputs.append(lw.output(node, i))
    lw.emit(LAYERNORM, inputs, outputs, ints=[axis], floats=[float(node.attr("epsilon", 1e-5))])


@lowering("LRN")
def lower_lrn(node: Node, lw: Lowerer) -> None:
    x = _float_input(node, lw, 0, "the input")
    if len(x.shape) < 3:
        raise Unsupported(f"input of rank {len(x.shape)}: (N, C, D1, ...) expected")
    size = node.attr("size")
    if size is None or int(size) < 1:
        raise Unsupported("size must be a positive integer")
    inner = int(np.prod(x.shape[2:], dtype=np.int64))
    lw.scratch(fixed=4 * inner + 16)
    floats = [float(node.attr("alpha", 1e-4)), float(node.attr("beta", 0.75)), float(node.attr("bias", 1.0))]
    lw.emit(LRN, [lw.input(node, 0)], [lw.output(node, 0)], ints=[int(size)], floats=floats)


@lowering("LpNormalization")
def lower_lpnorm(node: Node, lw: Lowerer) -> None:
    x = _float_input(node, lw, 0, "the input")
    if not x.shape:
        raise Unsupported("scalar input")
    axis = _axis(node, x, -1)
    if axis == 0 and x.batched:
        raise Unsupported("axis 0 normalises over the batch")
    p = int(node.attr("p", 2))
    if p not in (1, 2):
        raise Unsupported(f"p = {p}; supported: 1, 2")
    inner = int(np.prod(x.shape[axis + 1 :], dtype=np.int64))
    lw.scratch(fixed=4 * inner + 16)
    lw.emit(LPNORM, [lw.input(node, 0)], [lw.output(node, 0)], ints=[axis, p])


@lowering("MeanVarianceNormalization")
def lower_mvn(node: Node, lw: Lowerer) -> None:
    x = _float_input(node, lw, 0, "the input")
    rank = len(x.shape)
    axes = node.attr("axes")
    axes = [0, 2, 3] if axes is None else [int(a) for a in axes]
    norm = sorted({a + rank if a < 0 else a for a in axes})
    if any(not 0 <= a < rank for a in norm):
        raise Unsupported(f"axes {axes} out of range for rank {rank}")
    if 0 in norm and x.batched:
        raise Unsupported("axes include 0: it normalises over the batch")
    reduced = int(np.prod([x.shape[a] for a in norm], dtype=np.int64))
    lw.scratch(fixed=8 * reduced + 16)
    mask = sum(1 << a for a in norm)
    lw.emit(MVN, [lw.input(node, 0)], [lw.output(node, 0)], ints=[mask], floats=[1e-9])
