"""The execution plan: tensors, ops, memory planning, and the binary format.

The format is native/onnx/plan.h's (the header documents it field by field);
tests/test_convert_plan.py keeps the two in step. Memory planning puts every
intermediate tensor in one arena, sized for ``max_batch``: tensors whose
lifetimes (first write to last read, in op order) do not overlap share bytes.
Placement is greedy, largest tensor first, at the lowest offset that does not
collide with an already placed tensor alive at the same time: the usual
approach of inference runtimes, close to the peak live size in practice.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from agent.convert.ir import DTYPE_CODES, MAX_RANK

MAGIC = 0x4C504145  # "EAPL"
VERSION = 1
ALIGN = 16

LOC_ARENA, LOC_PARAM, LOC_INPUT, LOC_OUTPUT, LOC_ALIAS = range(5)
TDESC = struct.Struct("<BBBBI" + "i" * MAX_RANK)  # ea_tdesc_t, 40 bytes
HEADER = struct.Struct("<8I")


@dataclass
class PlanTensor:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # per unit of batch in dims[0] when batched
    batched: bool
    kind: int
    loc: int = 0  # param index, input index, output index, aliased tensor id; arena offset once planned

    def nbytes(self, batch: int) -> int:
        dims = list(self.shape)
        if self.batched and dims:
            dims[0] *= batch
        return int(np.prod(dims, dtype=np.int64)) * self.dtype.itemsize


@dataclass
class PlanOp:
    opcode: int
    inputs: list[int]  # -1: absent
    outputs: list[int]
    ints: list[int]
    floats: list[float]
    label: str = ""  # the ONNX node it came from (for messages and debugging)


@dataclass
class Plan:
    tensors: list[PlanTensor] = field(default_factory=list)
    ops: list[PlanOp] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    # Parameter arrays, by parameter index - 1 (index 0 is the plan itself).
    params: list[tuple[str, np.ndarray]] = field(default_factory=list)
    arena_bytes: int = 0
    # Largest scratch an op asked for, per unit of batch and fixed (ea_scratch, see interp.c).
    scratch_per_batch: int = 0
    scratch_fixed: int = 0

    def add_tensor(self, tensor: PlanTensor) -> int:
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def add_param(self, name: str, array: np.ndarray) -> int:
        self.params.append((name, np.require(array, requirements="C")))
        return len(self.params)  # parameter index (0 is the plan)

    def tensors_ids(self) -> range:
        return range(len(self.tensors))

    def resolve(self, tid: int) -> int:
        """The tensor that owns the bytes of ``tid`` (through aliases)."""
        while self.tensors[tid].kind == LOC_ALIAS:
            tid = self.tensors[tid].loc
        return tid

    # -- memory planning ----------------------------------------------------
    def plan_memory(self, max_batch: int) -> None:
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for index, op in enumerate(self.ops):
            for tid in (*op.inputs, *op.outputs):
                if tid < 0:
                    continue
                owner = self.resolve(tid)
                if self.tensors[owner].kind != LOC_ARENA:
                    continue
                first.setdefault(owner, index)
                last[owner] = index
        placed: list[tuple[int, int, int, int]] = []  # (offset, end, first, last)
        order = sorted(first, key=lambda t: (-self.tensors[t].nbytes(max_batch), t))
        arena = 0
        for tid in order:
            size = _aligned(max(self.tensors[tid].nbytes(max_batch), 1))
            life = (first[tid], last[tid])
            clashes = sorted((o, e) for o, e, f, la in placed if not (la < life[0] or life[1] < f))
            offset = 0
            for start, end in clashes:
                if offset + size <= start:
                    break
                offset = max(offset, end)
            self.tensors[tid].loc = offset
            placed.append((offset, offset + size, life[0], life[1]))
            arena = max(arena, offset + size)
        self.arena_bytes = arena

    def peak_bytes(self, max_batch: int) -> int:
        """Arena, I/O buffers and scratch at ``max_batch`` (what ea_init and ea_run allocate)."""
        io = sum(_aligned(t.nbytes(max_batch)) for t in self.tensors if t.kind in (LOC_INPUT, LOC_OUTPUT))
        scratch = self.scratch_per_batch * max_batch + self.scratch_fixed
        return self.arena_bytes + io + 2 * scratch

    # -- encoding -----------------------------------------------------------
    def encode(self, max_batch: int) -> bytes:
        out = bytearray(
            HEADER.pack(
                MAGIC,
                VERSION,
                max_batch,
                len(self.tensors),
                len(self.ops),
                len(self.inputs),
                len(self.outputs),
                self.arena_bytes,
            )
        )
        for t in self.tensors:
            dims = list(t.shape) + [0] * (MAX_RANK - len(t.shape))
            out += TDESC.pack(DTYPE_CODES[t.dtype], t.kind, len(t.shape), int(t.batched), t.loc, *dims)
        out += struct.pack(f"<{len(self.inputs)}I", *self.inputs)
        out += struct.pack(f"<{len(self.outputs)}I", *self.outputs)
        for op in self.ops:
            out += struct.pack("<HBBHH", op.opcode, len(op.inputs), len(op.outputs), len(op.ints), len(op.floats))
            out += struct.pack(
                f"<{len(op.inputs) + len(op.outputs) + len(op.ints)}i", *op.inputs, *op.outputs, *op.ints
            )
            out += struct.pack(f"<{len(op.floats)}f", *op.floats)
        return bytes(out)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN
