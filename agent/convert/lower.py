"""The lowering context: what an op family's lowering function works with.

A lowering function takes an ONNX node and this context, and emits kernel ops
(``emit``) over plan tensors. It never sees plan indices it did not ask for:
``input``/``output`` map the node's values to tensors (constants become
parameters the first time they are used), ``const`` adds a parameter the
lowering derived (packed weights, say), ``temp`` a tensor for an intermediate
result. A lowering that cannot handle a node raises :class:`Unsupported` with
the reason; the driver (agent/convert/build.py) collects every refusal of the
graph before reporting.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from agent.convert.ir import Graph, Node, Value
from agent.convert.plan import LOC_ALIAS, LOC_ARENA, LOC_INPUT, LOC_OUTPUT, LOC_PARAM, Plan, PlanOp, PlanTensor


class Unsupported(Exception):
    """This node cannot be lowered; the message says why (the node is named by the caller)."""


class Upstream(Unsupported):
    """An input comes from a node that was itself refused: reported there, not again here."""


class Lowerer:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.plan = Plan()
        self._tensor_of: dict[str, int] = {}
        self._param_names: set[str] = set()
        self.node: Node | None = None  # the node being lowered (labels emitted ops)
        for index, name in enumerate(graph.inputs):
            value = graph.values[name]
            tid = self._new(value, LOC_INPUT, index)
            self.plan.inputs.append(tid)
            self._tensor_of[name] = tid
        self._outputs = {name: i for i, name in enumerate(graph.outputs)}

    # -- values ---------------------------------------------------------------
    def value(self, name: str) -> Value:
        return self.graph.values[name]

    def has_input(self, node: Node, index: int) -> bool:
        return index < len(node.inputs) and node.inputs[index] != ""

    def const_input(self, node: Node, index: int) -> np.ndarray | None:
        """The input's value when it is a build-time constant; ``None`` when absent or computed at run time."""
        if not self.has_input(node, index):
            return None
        return self.value(node.inputs[index]).const

    def require_const(self, node: Node, index: int, what: str) -> np.ndarray:
        if not self.has_input(node, index):
            raise Unsupported(f"{what} (input {index}) is missing")
        value = self.value(node.inputs[index])
        if value.const is None:
            origin = "a graph input" if value.name in self.graph.inputs else "computed at run time"
            raise Unsupported(f"{what} (input {index}, {value.name!r}) must be known at build time; it is {origin}")
        return value.const

    def input(self, node: Node, index: int) -> int:
        """The tensor id of input ``index`` (-1 when absent): data the kernel reads."""
        if not self.has_input(node, index):
            return -1
        name = node.inputs[index]
        if name in self._tensor_of:
            return self._tensor_of[name]
        value = self.value(name)
        if value.batch_valued:
            raise Unsupported(f"input {index} ({name!r}) is computed from the batch size and used as data")
        if value.const is not None:
            tid = self.const(value.const, name)
            self._tensor_of[name] = tid
            return tid
        raise Upstream(f"input {index} ({name!r}) is used before any node computes it")

    def output(self, node: Node, index: int) -> int:
        """The tensor id that output ``index`` is written to."""
        name = node.outputs[index]
        if name in self._tensor_of:
            return self._tensor_of[name]
        value = self.value(name)
        if name in self._outputs:
            tid = self._new(value, LOC_OUTPUT, self._outputs[name])
        else:
            tid = self._new(value, LOC_ARENA, 0)
        self._tensor_of[name] = tid
        return tid

    def alias(self, node: Node, out_index: int, in_index: int) -> None:
        """Output ``out_index`` is input ``in_index``'s bytes under another shape (reshape-like ops)."""
        src = self.input(node, in_index)
        name = node.outputs[out_index]
        value = self.value(name)
        if name in self._outputs or self.plan.tensors[self.plan.resolve(src)].kind == LOC_INPUT:
            # A graph output has its own buffer; an input buffer is the host's to write: copy.
            from agent.convert.ops.core import COPY

            dst = self.output(node, out_index)
            view = self._new(value, LOC_ALIAS, self.plan.resolve(src))
            self.emit(COPY, [view], [dst])
            return
        self._tensor_of[name] = self._new(value, LOC_ALIAS, self.plan.resolve(src))

    def temp(self, dtype: np.dtype | type, shape: Sequence[int], batched: bool, name: str = "tmp") -> int:
        """A fresh arena tensor for an intermediate result the lowering needs."""
        value = Value(f"{name}#{len(self.plan.tensors)}", np.dtype(dtype), tuple(int(d) for d in shape), batched)
        return self._new(value, LOC_ARENA, 0)

    def const(self, array: np.ndarray, name: str) -> int:
        """A parameter tensor holding ``array`` (weights, packed weights, lookup tables)."""
        array = np.require(array, requirements="C")  # np.ascontiguousarray would make a 0-d array 1-d
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100] or "param"
        unique, n = safe, 1
        while unique in self._param_names or unique == "plan":
            n += 1
            unique = f"{safe}.{n}"
        self._param_names.add(unique)
        index = self.plan.add_param(unique, array)
        value = Value(unique, array.dtype, tuple(array.shape))
        return self._new(value, LOC_PARAM, index)

    def scratch(self, per_batch: int = 0, fixed: int = 0) -> None:
        """Declare the most scratch (ea_scratch) a kernel of this node takes, in bytes."""
        self.plan.scratch_per_batch = max(self.plan.scratch_per_batch, per_batch)
        self.plan.scratch_fixed = max(self.plan.scratch_fixed, fixed)

    def emit(
        self,
        opcode: int,
        inputs: Sequence[int],
        outputs: Sequence[int],
        ints: Sequence[int] = (),
        floats: Sequence[float] = (),
    ) -> None:
        label = self.node.label if self.node is not None else ""
        self.plan.ops.append(
            PlanOp(opcode, list(inputs), list(outputs), [int(i) for i in ints], [float(f) for f in floats], label)
        )

    def tensor(self, tid: int) -> PlanTensor:
        return self.plan.tensors[tid]

    # -- internals ------------------------------------------------------------
    def _new(self, value: Value, kind: int, loc: int) -> int:
        return self.plan.add_tensor(PlanTensor(value.name, value.dtype, value.shape, value.batched, kind, loc))

    def finish(self) -> None:
        """Graph outputs no node wrote (an input or a constant passed through): copied."""
        from agent.convert.ops.core import COPY

        for name in self.graph.outputs:
            index = self._outputs[name]
            if any(
                self.plan.tensors[t].kind == LOC_OUTPUT and self.plan.tensors[t].loc == index
                for t in self.plan.tensors_ids()
            ):
                continue
            value = self.value(name)
            src = self._tensor_of.get(name)
            if src is None:
                if value.const is None:
                    raise Unsupported(f"graph output {name!r} is computed by nothing that was lowered")
                src = self.const(value.const, name)
            dst = self._new(value, LOC_OUTPUT, index)
            self.plan.ops.append(PlanOp(COPY, [src], [dst], [], [], f"output {name!r}"))
        self.plan.outputs = [
            next(
                t
                for t in self.plan.tensors_ids()
                if self.plan.tensors[t].kind == LOC_OUTPUT and self.plan.tensors[t].loc == i
            )
            for i in range(len(self.graph.outputs))
        ]


__all__ = ["LOC_ALIAS", "LOC_ARENA", "LOC_INPUT", "LOC_OUTPUT", "LOC_PARAM", "Lowerer", "Unsupported", "Upstream"]
