"""ONNX's backend node tests, run through the converter (agent/convert/backend.py).

The cases are the ``onnx`` package's own (``onnx/backend/test/case/node``: a
model, inputs, expected outputs and tolerances each). A case is *in scope*
when every op of its graph has a lowering; it then either passes, or is
refused at build time with a reason (a documented limit: an element type the
kernels do not implement, a shape given as a run-time input, ...), which
counts as a skip. ``python tests/conformance.py`` prints the per-op table the
docs and the closing note quote.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.convert.ops import supported_ops
from agent.errors import ConversionRefused

# Ops that appear in a case's graph only as helpers of the op under test (the case is
# counted under the op it is named after).
ROOT_TEST_PREFIX = "test_"


# Cases where ONNX's reference output and onnxruntime's disagree, and the converter follows
# onnxruntime (the build's golden outputs and self-check come from it). Each is an expected
# failure here: if it ever passes, the entry goes.
FOLLOWS_ONNXRUNTIME = {
    "test_resize_downsample_scales_linear_align_corners": (
        "align_corners with a scale: onnxruntime maps coordinates with the integer output size "
        "(x * (in - 1) / (out - 1)), the reference with the scale; both readings exist in the wild"
    ),
}


@dataclass
class Case:
    name: str
    ops: frozenset[tuple[str, str]]  # (domain, op_type)
    model: Any
    data_sets: list[tuple[list[np.ndarray], list[np.ndarray]]]
    rtol: float
    atol: float


@functools.cache
def all_cases() -> list[Case]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = collect_testcases(None)
    cases = []
    for case in raw:
        if case.model is None or not case.data_sets:
            continue
        ops = frozenset(("" if n.domain in ("", "ai.onnx") else n.domain, n.op_type) for n in case.model.graph.node)
        cases.append(Case(case.name, ops, case.model, list(case.data_sets), float(case.rtol), float(case.atol)))
    return cases


def supported() -> set[tuple[str, str]]:
    return {(domain, op) for domain, ops in supported_ops().items() for op in ops}


def in_scope() -> list[Case]:
    known = supported()
    return [c for c in all_cases() if c.ops and c.ops <= known]


def op_of(case: Case) -> str:
    """The op a case tests: the one its graph has, or for multi-node cases the one in its name."""
    if len(case.ops) == 1:
        return next(iter(case.ops))[1]
    name = case.name.removeprefix(ROOT_TEST_PREFIX).replace("_", "").lower()
    for _, op in sorted(supported() | case.ops, key=lambda o: -len(o[1])):
        if name.startswith(op.lower()):
            return op
    return "+".join(sorted(op for _, op in case.ops))


def run_case(case: Case) -> None:
    """Raises ConversionRefused (out of the subset) or AssertionError (wrong answer)."""
    from agent.convert.backend import EdgeBackend

    for inputs, expected in case.data_sets:
        rep = EdgeBackend.prepare(case.model)
        outputs = rep.run(inputs)
        assert len(outputs) == len(expected), f"{len(outputs)} outputs, expected {len(expected)}"
        for index, (got, want) in enumerate(zip(outputs, expected, strict=True)):
            want = np.asarray(want)
            assert got.shape == want.shape, f"output {index}: shape {got.shape}, expected {want.shape}"
            if want.dtype.kind == "f":
                np.testing.assert_allclose(got, want, rtol=case.rtol, atol=case.atol, err_msg=f"output {index}")
            else:
                np.testing.assert_array_equal(got, want, err_msg=f"output {index}")


def report() -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = defaultdict(lambda: {"pass": 0, "skip": 0, "fail": 0, "reasons": Counter()})
    for case in in_scope():
        row = table[op_of(case)]
        try:
            run_case(case)
            row["pass"] += 1
            if case.name in FOLLOWS_ONNXRUNTIME:
                row["reasons"][f"{case.name}: passes now: drop it from FOLLOWS_ONNXRUNTIME"] += 1
        except ConversionRefused as exc:
            row["skip"] += 1
            reason = exc.problems[0] if exc.problems else str(exc).splitlines()[0]
            row["reasons"][f"{case.name}: {reason}"] += 1
        except AssertionError:
            if case.name not in FOLLOWS_ONNXRUNTIME:
                raise
            row["follows onnxruntime"] = row.get("follows onnxruntime", 0) + 1
            row["reasons"][f"{case.name}: follows onnxruntime: {FOLLOWS_ONNXRUNTIME[case.name]}"] += 1
        except Exception as exc:  # noqa: BLE001 - a report lists every failure
            row["fail"] += 1
            row["reasons"][f"{case.name}: FAIL {type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"] += 1
    return dict(table)


def markdown(table: dict[str, dict[str, Any]]) -> str:
    """docs/CONVERTER.md's op table: every supported op, its family, its conformance counts."""
    from agent.convert.ops import LOWERINGS

    lines = ["| op | domain | kernel family | ONNX node tests passed / refused |", "| --- | --- | --- | --- |"]
    for (domain, op), fn in sorted(LOWERINGS.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        family = fn.__module__.rsplit(".", 1)[-1]
        row = table.get(op)
        counts = f"{row['pass']} / {row['skip']}" if row else "none in the suite"
        lines.append(f"| {op} | {domain or 'ai.onnx'} | {family} | {counts} |")
    return "\n".join(lines)


def main() -> int:
    table = report()
    if "--markdown" in sys.argv:
        print(markdown(table))
        return 0
    width = min(32, max((len(op) for op in table), default=10))
    totals = Counter()
    print(f"{'op':<{width}}  pass  skip  fail")
    for op in sorted(table):
        row = table[op]
        totals.update({k: row[k] for k in ("pass", "skip", "fail")})
        print(f"{op:<{width}}  {row['pass']:>4}  {row['skip']:>4}  {row['fail']:>4}")
    print(f"{'total':<{width}}  {totals['pass']:>4}  {totals['skip']:>4}  {totals['fail']:>4}")
    if "-v" in sys.argv:
        for op in sorted(table):
            for reason in table[op]["reasons"]:
                print(f"  {op}: {reason}")
    return 1 if totals["fail"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
