"""Quantized (int8) models against the same models in float32, both converted, in the agent's runtime.

    .venv/bin/python bench/bench_convert_int8.py             # all models, batch 1, 32, 64
    .venv/bin/python bench/bench_convert_int8.py --quick     # shorter time budget per case
    EDGE_AGENT_ONNX_KERNELS=/tmp/d-build/onnx_kernels.wasm .venv/bin/python bench/bench_convert_int8.py

Times ``ModelInstance.run`` (ea_run plus the input/output copies: what every request
pays, without HTTP or batching logic), median of as many runs as fit the budget, in
microseconds, and onnxruntime on one thread (all graph optimisations) on the same
inputs for reference. Models: the PyTorch digits CNN and the digits MLP in float32,
their ``quantize_dynamic`` versions (int8 weights, uint8 activations quantized per row
at run time) and their ``quantize_static`` versions (QDQ and QOperator formats, uint8
activations, per-channel int8 weights, calibrated on 64 rows of load_digits).
Target (issue 10): the int8 CNN (quantize_dynamic) faster than the float32 CNN in the agent.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from convert_models import digits_cnn, digits_inputs, digits_mlp  # noqa: E402

from agent.convert.build import Runner, convert  # noqa: E402


def quantized(model: onnx.ModelProto, how: str) -> onnx.ModelProto:
    """``how``: "dynamic", "qdq" or "qoperator"."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    name = model.graph.input[0].name
    shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            x = digits_inputs(64, seed=2).reshape((64, *shape))
            self.batches = iter([{name: x[i : i + 8]} for i in range(0, 64, 8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, f"{tmp}/f.onnx")
        if how == "dynamic":
            quantize_dynamic(f"{tmp}/f.onnx", f"{tmp}/q.onnx", weight_type=QuantType.QInt8)
        else:
            fmt = QuantFormat.QDQ if how == "qdq" else QuantFormat.QOperator
            quantize_static(
                f"{tmp}/f.onnx", f"{tmp}/q.onnx", Reader(), quant_format=fmt, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            )  # fmt: skip
        return onnx.load(f"{tmp}/q.onnx")


def time_us(fn: Callable[[], Any], budget_s: float) -> float:
    fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < 20 or (time.perf_counter() - start < budget_s and len(samples) < 20000):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batches", default="1,32,64")
    args = parser.parse_args()
    budget = 0.5 if args.quick else 2.0
    batches = [int(b) for b in args.batches.split(",")]
    print("reproduce:", " ".join([".venv/bin/python", "bench/bench_convert_int8.py", *sys.argv[1:]]))
    cnn, mlp = digits_cnn(), digits_mlp()
    cases: list[tuple[str, onnx.ModelProto, Callable[[int], np.ndarray]]] = [
        ("cnn float32", cnn, lambda n: digits_inputs(n, seed=1).reshape(n, 1, 8, 8)),
        ("cnn int8 dynamic", quantized(cnn, "dynamic"), lambda n: digits_inputs(n, seed=1).reshape(n, 1, 8, 8)),
        ("cnn int8 static QDQ", quantized(cnn, "qdq"), lambda n: digits_inputs(n, seed=1).reshape(n, 1, 8, 8)),
        ("cnn int8 static QOp", quantized(cnn, "qoperator"), lambda n: digits_inputs(n, seed=1).reshape(n, 1, 8, 8)),
        ("mlp float32", mlp, lambda n: digits_inputs(n, seed=1)),
        ("mlp int8 dynamic", quantized(mlp, "dynamic"), lambda n: digits_inputs(n, seed=1)),
        ("mlp int8 static QDQ", quantized(mlp, "qdq"), lambda n: digits_inputs(n, seed=1)),
    ]
    runner = Runner()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    header = f"{'model':<22}" + "".join(f"{f'b{b} agent us':>16}{f'b{b} ort us':>14}" for b in batches)
    print(header)
    results: dict[str, dict[int, float]] = {}
    try:
        for label, model, inputs in cases:
            converted = convert(model, name="bench", version="1", max_batch=max(batches))
            instance = runner.instance(converted)
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            in_name = model.graph.input[0].name
            row = f"{label:<22}"
            results[label] = {}
            for b in batches:
                x = np.ascontiguousarray(inputs(b), dtype=np.float32)
                agent = time_us(functools.partial(instance.run, [x], b), budget)
                ref = time_us(functools.partial(session.run, None, {in_name: x}), budget)
                results[label][b] = agent
                row += f"{agent:>16.1f}{ref:>14.1f}"
            print(row, flush=True)
    finally:
        runner.close()
    for b in batches:
        f, q = results["cnn float32"][b], results["cnn int8 dynamic"][b]
        print(f"cnn batch {b}: int8 dynamic / float32 in the agent = {q / f:.2f} ({'faster' if q < f else 'SLOWER'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
