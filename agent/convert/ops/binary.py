"""Family "binary" (native/onnx/ops_binary.c): broadcasting elementwise ops of two inputs, and Where.

The kernels broadcast by themselves (numpy rules, right-aligned, from the tensors' dims at
run time, so a batched operand's changing first dimension is handled), so a lowering only
checks element types and emits one op. Variadic Sum/Mean/Max/Min become a chain of
two-input ops accumulating in the output (Mean then divides by the count).
"""

from __future__ import annotations

import numpy as np

from agent.convert.ir import Node
from agent.convert.lower import Lowerer, Unsupported
from agent.convert.ops import FAMILY_BASE, lowering

BASE = FAMILY_BASE["binary"]
# The B_* enum of ops_binary.c, in order.
_NAMES = [
    "add",
    "sub",
    "mul",
    "div",
    "pow",
    "max",
    "min",
    "mod",
    "prelu",
    "equal",
    "greater",
    "less",
    "greater_equal",
    "less_equal",
    "and",
    "or",
    "xor",
    "where",
    "bitwise_and",
    "bitwise_or",
    "bitwise_xor",
]
OPCODES: dict[str, int] = {name: BASE + index for index, name in enumerate(_NAMES)}

F32 = np.dtype(np.float32)
BOOL = np.dtype(np.bool_)
I32, I64 = np.dtype(np.int32), np.dtype(np.int64)
INTS = {np.dtype(t) for t in (np.uint8, np.int8, np.int32, np.int64)}
NUMERIC = {F32} | INTS

_KERNEL = {
    "Add": "add",
    "Sub": "sub",
    "Mul": "mul",
    "Div": "div",
    "Pow": "pow",
    "Mod": "mod",
    "PRelu": "prelu",
    "Equal": "equal",
    "Greater": "greater",
    "Less": "less",
    "GreaterOrEqual": "greater_equal",
    "LessOrEqual": "less_equal",
    "And": "and",
    "Or": "or",
    "Xor": "xor",
    "BitwiseAnd": "bitwise_and",
    "BitwiseOr": "bitwise_or",
    "BitwiseXor": "bitwise_xor",
}
# Element types of the (both) inputs each op's kernel takes.
_TYPES: dict[str, set[np.dtype]] = {
    "Add": NUMERIC,
    "Sub": NUMERIC,
    "Mul": NUMERIC,
    "Div": NUMERIC,
    "Mod": NUMERIC,
    "PRelu": {F32, I32, I64},
    "Equal": NUMERIC | {BOOL},
    "Greater": NUMERIC,
    "Less": NUMERIC,
    "GreaterOrEqual": NUMERIC,
    "LessOrEqual": NUMERIC,
    "And": {BOOL},
    "Or": {BOOL},
    "Xor": {BOOL},
    "BitwiseAnd": INTS,
    "BitwiseOr": INTS,
    "BitwiseXor": INTS,
}


def _types_text(types: set[np.dtype]) -> str:
    return ", ".join(sorted(str(t) for t in types))


def _dtype(node: Node, lw: Lowerer, index: int) -> np.dtype:
    return lw.value(node.inputs[index]).dtype


@lowering(*_KERNEL)
def lower_binary(node: Node, lw: Lowerer) -> None:
    op = node.op_type
    if len(node.inputs) != 2 or not all(node.inputs):
        raise Unsupported(f"{op} takes two inputs")
    a, b = _dtype(node, lw, 0), _dtype(node, lw, 1)
    ints: list[int] = []
    if op == "Pow":
        if a not in (F32, I32, I64) or b not in (F32, I32, I64):
            raise Unsupported(
                f"Pow of {a} to the power {b} is not supported (base and exponent: float32, int32, int64)"
            )
    else:
        allowed = _TYPES[op]
        if a != b:
            raise Unsupported(f"inputs have different element types ({a}, {b})")
        if a not in allowed:
            raise Unsupported(f"element type {a} is not supported ({op} takes {_types_text(allowed)})")
        if op == "Mod":
            fmod = int(node.attr("fmod", 0))
            if a == F32 and not fmod and node.opset < 28:
                raise Unsupported("Mod of floats needs fmod=1 before opset 28")
            ints = [1 if fmod else 0]
    lw.emit(OPCODES[_KERNEL[op]], [lw.input(node, 0), lw.input(node, 1)], [lw.output(node, 0)], ints=ints)


@lowering("Sum", "Mean", "Max", "Min")
def lower_variadic(node: Node, lw: Lowerer) -> None:
    op = node.op_type
    present = [i for i in range(len(node.inputs)) if lw.has_input(node, i)]
    if not present:
        raise Unsupported(f"{op} has no inputs")
    allowed = {F32} if op in ("Sum", "Mean") else NUMERIC
    types = {_dtype(node, lw, i) for i in present}
    if len(types) != 1:
        raise Unsupported(f"inputs have different element types ({_types_text(types)})")
    dtype = types.pop()
    if dtype not in allowed:
        raise Unsupported(f"element type {dtype} is not supported ({op} takes {_types_text(allowed)})")
    if len(present) == 1:
        lw.alias(node, 0, present[0])
        return
    code = OPCODES[{"Sum": "add", "Mean": "add", "Max": "max", "Min": "min"}[op]]
    out_value = lw.value(node.outputs[0])
    out = lw.output(node, 0)
    first = lw.value(node.inputs[present[0]])
    acc, acc_shape, acc_batched = lw.input(node, present[0]), first.shape, first.batched
    for step, index in enumerate(present[1:], start=1):
        value = lw.value(node.inputs[index])
        shape = tuple(int(d) for d in np.broadcast_shapes(acc_shape, value.shape))
        batched = (acc_batched and len(acc_shape) == len(shape)) or (value.batched and len(value.shape) == len(shape))
        if shape == out_value.shape or step == len(present) - 1:
            dst = out  # accumulate in the output (same shape: elementwise in place)
        else:
            dst = lw.temp(dtype, shape, batched, name=f"{node.name}.acc")
        lw.emit(code, [acc, lw.input(node, index)], [dst])
        acc, acc_shape, acc_batched = dst, shape, batched
    if op == "Mean":
        count = lw.const(np.array(len(present), dtype=np.float32), f"{node.name}.count")
        lw.emit(OPCODES["div"], [out, count], [out])


@lowering("Where")
def lower_where(node: Node, lw: Lowerer) -> None:
    cond, x, y = (_dtype(node, lw, i) for i in range(3))
    if cond != BOOL:
        raise Unsupported(f"condition has element type {cond}, not bool")
    if x != y:
        raise Unsupported(f"X and Y have different element types ({x}, {y})")
    lw.emit(OPCODES["where"], [lw.input(node, i) for i in range(3)], [lw.output(node, 0)])
