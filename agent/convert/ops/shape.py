"""Family "shape" (native/onnx/ops_shape.c): see agent/convert/ops/__init__.py."""

from __future__ import annotations

from agent.convert.ops import FAMILY_BASE

BASE = FAMILY_BASE["shape"]
OPCODES: dict[str, int] = {}
