"""Family "ml" (native/onnx/ops_ml.c): see agent/convert/ops/__init__.py."""

from __future__ import annotations

from agent.convert.ops import FAMILY_BASE

BASE = FAMILY_BASE["ml"]
OPCODES: dict[str, int] = {}
