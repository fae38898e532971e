"""Family "binary" (native/onnx/ops_binary.c): see agent/convert/ops/__init__.py."""

from __future__ import annotations

from agent.convert.ops import FAMILY_BASE

BASE = FAMILY_BASE["binary"]
OPCODES: dict[str, int] = {}
