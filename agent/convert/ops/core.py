"""Family 0 (native/onnx/ops_core.c): copies, casts, fills, and ops that only rename or reshape.

Reshape, Flatten, Squeeze, Unsqueeze, Identity and Dropout (inference) move no
data: their output aliases the input's bytes with the shape analysis found.
"""

from __future__ import annotations

import numpy as np

from agent.convert.ir import DTYPE_CODES, ONNX_DTYPES, Node
from agent.convert.lower import Lowerer, Unsupported
from agent.convert.ops import FAMILY_BASE, lowering

BASE = FAMILY_BASE["core"]
COPY = BASE + 0
CAST = BASE + 1
FILL = BASE + 2
OPCODES = {"copy": COPY, "cast": CAST, "fill": FILL}


@lowering("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze")
def lower_view(node: Node, lw: Lowerer) -> None:
    src, dst = lw.value(node.inputs[0]), lw.value(node.outputs[0])
    if src.batched != dst.batched and dst.shape and src.shape:
        raise Unsupported("moves the batch dimension")
    lw.alias(node, 0, 0)


@lowering("Dropout")
def lower_dropout(node: Node, lw: Lowerer) -> None:
    # Inference: the identity. A training_mode input that is true at run time cannot be honoured.
    training = lw.const_input(node, 2)
    if lw.has_input(node, 2) and (training is None or bool(np.asarray(training).item())):
        raise Unsupported("training_mode must be a constant false")
    lw.alias(node, 0, 0)
    if len(node.outputs) > 1 and node.outputs[1]:
        mask = lw.value(node.outputs[1])
        ones = lw.const(np.ones((), dtype=np.bool_), f"{node.name}.mask_value")
        if mask.dtype != np.bool_:
            raise Unsupported("mask output must be bool")
        lw.emit(FILL, [ones], [lw.output(node, 1)])


@lowering("Cast", "CastLike")
def lower_cast(node: Node, lw: Lowerer) -> None:
    src, dst = lw.value(node.inputs[0]), lw.value(node.outputs[0])
    for v in (src, dst):
        if v.dtype not in DTYPE_CODES:
            raise Unsupported(f"casts {v.dtype}; supported: {', '.join(str(d) for d in ONNX_DTYPES.values())}")
    if src.dtype == dst.dtype:
        lw.alias(node, 0, 0)
        return
    lw.emit(CAST, [lw.input(node, 0)], [lw.output(node, 0)])


@lowering("ConstantOfShape")
def lower_constant_of_shape(node: Node, lw: Lowerer) -> None:
    # Reached only when the output depends on the batch size (otherwise it was folded).
    out = lw.value(node.outputs[0])
    fill = node.attr("value")
    scalar = np.zeros((), dtype=np.float32) if fill is None else np.asarray(fill).reshape(-1)[:1].reshape(())
    scalar = scalar.astype(out.dtype)
    lw.emit(FILL, [lw.const(scalar, f"{node.name}.value")], [lw.output(node, 0)])


@lowering("Constant", "Shape", "Size")
def lower_folded(node: Node, lw: Lowerer) -> None:
    # The analysis folds these: their outputs are constants, or shape arithmetic on the batch
    # size that the ops reading it take from the analysed shapes. Reaching here means a value
    # the analysis could not fold, which has no kernel.
    raise Unsupported(f"{node.op_type} must fold at build time; its output is needed as run-time data")
