"""Family "reduce" (native/onnx/ops_reduce.c): see agent/convert/ops/__init__.py."""

from __future__ import annotations

from agent.convert.ops import FAMILY_BASE

BASE = FAMILY_BASE["reduce"]
OPCODES: dict[str, int] = {}
