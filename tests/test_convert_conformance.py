"""ONNX's own backend node tests for every op the converter supports (tests/conformance.py).

A case passes, or is refused at build time (skipped, with the converter's reason);
a wrong answer or a crash fails.
"""

from __future__ import annotations

import pytest
from conformance import FOLLOWS_ONNXRUNTIME, in_scope, run_case

from agent.errors import ConversionRefused

CASES = {case.name: case for case in in_scope()}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=FOLLOWS_ONNXRUNTIME[n], strict=True, raises=AssertionError))
        if n in FOLLOWS_ONNXRUNTIME
        else n
        for n in sorted(CASES)
    ],
)
def test_onnx_backend_node_case(name: str) -> None:
    case = CASES[name]
    try:
        run_case(case)
    except ConversionRefused as exc:
        reason = exc.problems[0] if exc.problems else str(exc).splitlines()[0]
        pytest.skip(f"refused at build time: {reason}")
