"""Family "conv" (native/onnx/ops_conv.c): see agent/convert/ops/__init__.py."""

from __future__ import annotations

from agent.convert.ops import FAMILY_BASE

BASE = FAMILY_BASE["conv"]
OPCODES: dict[str, int] = {}
