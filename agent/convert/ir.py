"""The graph as the converter sees it: static shapes, known constants, nodes to lower."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# ONNX TensorProto element types the kernels handle, and their NumPy types. The codes are
# also the plan's dtype codes (native/onnx/plan.h).
ONNX_DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.uint8),
    3: np.dtype(np.int8),
    6: np.dtype(np.int32),
    7: np.dtype(np.int64),
    9: np.dtype(np.bool_),
}
DTYPE_CODES: dict[np.dtype, int] = {dtype: code for code, dtype in ONNX_DTYPES.items()}
# Open Inference Protocol datatypes (model.json) of the same types.
OIP_DATATYPES: dict[np.dtype, str] = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.bool_): "BOOL",
}
MAX_RANK = 8


@dataclass
class Value:
    """A tensor of the graph.

    ``shape`` is the shape at batch 1. When ``batched``, its first dimension is per unit of
    batch: at batch ``b`` the tensor is ``(shape[0] * b, *shape[1:])``.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    batched: bool = False
    # Known at build time and the same at every batch size: a constant (folded).
    const: np.ndarray | None = None
    # Known at build time but a function of the batch size (shape arithmetic such as
    # Shape -> Gather -> Concat): only ops that read it as a shape may use it.
    batch_valued: bool = False

    @property
    def is_const(self) -> bool:
        return self.const is not None

    def shape_at(self, batch: int) -> tuple[int, ...]:
        if self.batched and self.shape:
            return (self.shape[0] * batch, *self.shape[1:])
        return self.shape

    def nbytes_at(self, batch: int) -> int:
        return int(np.prod(self.shape_at(batch), dtype=np.int64)) * self.dtype.itemsize


@dataclass
class Node:
    op_type: str
    domain: str  # "" for the default ONNX domain, "ai.onnx.ml", ...
    name: str
    inputs: list[str]  # "" marks an absent optional input
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int  # the opset version of the node's domain

    @property
    def label(self) -> str:
        """How refusals name a node: its name (or first output) and op."""
        who = self.name or (self.outputs[0] if self.outputs else "?")
        op = self.op_type if self.domain in ("", "ai.onnx") else f"{self.domain}.{self.op_type}"
        return f"node {who!r} ({op})"

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


@dataclass
class Graph:
    nodes: list[Node]
    values: dict[str, Value]
    inputs: list[str]
    outputs: list[str]
    # True: the first dimension of every input and output is the batch.
    batched: bool
    # Opset versions by domain ("" = ai.onnx).
    opsets: dict[str, int] = field(default_factory=dict)
    # The model fixes its first dimension at 1: it is served one row per call (max_batch 1).
    one_row: bool = False
    # Nodes the analysis folded (their outputs are constants), kept so that passes can see how
    # a constant was made (a DequantizeLinear of int8 weights: agent/convert/ops/quant.py).
    folded: list[Node] = field(default_factory=list)

    def consumers(self, name: str) -> list[Node]:
        return [node for node in self.nodes if name in node.inputs]
