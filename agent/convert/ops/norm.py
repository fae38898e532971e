"""Family "norm" (native/onnx/ops_norm.c): see agent/convert/ops/__init__.py."""

from __future__ import annotations

from agent.convert.ops import FAMILY_BASE

BASE = FAMILY_BASE["norm"]
OPCODES: dict[str, int] = {}
