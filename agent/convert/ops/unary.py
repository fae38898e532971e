"""Family "unary" (native/onnx/ops_unary.c): see agent/convert/ops/__init__.py."""

from __future__ import annotations

from agent.convert.ops import FAMILY_BASE

BASE = FAMILY_BASE["unary"]
OPCODES: dict[str, int] = {}
