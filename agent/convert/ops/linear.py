"""Family "linear" (native/onnx/ops_linear.c): see agent/convert/ops/__init__.py."""

from __future__ import annotations

from agent.convert.ops import FAMILY_BASE

BASE = FAMILY_BASE["linear"]
OPCODES: dict[str, int] = {}
