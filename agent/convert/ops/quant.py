"""Family "quant" (native/onnx/ops_quant.c): see agent/convert/ops/__init__.py."""

from __future__ import annotations

from agent.convert.ops import FAMILY_BASE

BASE = FAMILY_BASE["quant"]
OPCODES: dict[str, int] = {}
