"""Op lowerings, one module per kernel family (native/onnx/ops_<family>.c).

Each family module declares ``OPCODES`` (kernel name -> opcode, the numbers its
C file uses: family * 64 + index) and registers lowering functions for the
ONNX ops it handles with :func:`lowering`. tests/test_convert_plan.py checks
that the kernel library knows every declared opcode.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

from agent.convert.ir import Node
from agent.convert.lower import Lowerer

Lowering = Callable[[Node, Lowerer], None]
LOWERINGS: dict[tuple[str, str], Lowering] = {}
FAMILIES = ("core", "unary", "binary", "linear", "conv", "norm", "shape", "reduce", "quant", "ml")
FAMILY_BASE = {name: index * 64 for index, name in enumerate(FAMILIES)}
# Lowering modules that share a family's opcode space (pool: the "conv" family's opcodes 32..63).
EXTRA_MODULES = ("pool",)


def lowering(*op_types: str, domain: str = "") -> Callable[[Lowering], Lowering]:
    """Register ``fn`` as the lowering of ``op_types`` in ``domain`` ("" = ai.onnx, or "ai.onnx.ml")."""

    def register(fn: Lowering) -> Lowering:
        for op_type in op_types:
            key = (domain, op_type)
            if key in LOWERINGS:
                raise RuntimeError(f"two lowerings for {domain or 'ai.onnx'}.{op_type}")
            LOWERINGS[key] = fn
        return fn

    return register


def load_all() -> None:
    for family in (*FAMILIES, *EXTRA_MODULES):
        import_module(f"agent.convert.ops.{family}")


def all_opcodes() -> dict[str, int]:
    load_all()
    table: dict[str, int] = {}
    for family in (*FAMILIES, *EXTRA_MODULES):
        module = import_module(f"agent.convert.ops.{family}")
        for name, code in getattr(module, "OPCODES", {}).items():
            table[f"{family}.{name}"] = code
    return table


def supported_ops() -> dict[str, list[str]]:
    """Supported ONNX op types by domain ("" = ai.onnx)."""
    load_all()
    out: dict[str, list[str]] = {}
    for domain, op_type in sorted(LOWERINGS):
        out.setdefault(domain, []).append(op_type)
    return out
