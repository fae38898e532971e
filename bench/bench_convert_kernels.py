"""Dense kernels (Gemm/MatMul/Conv through ea_gemm) of converted models against onnxruntime.

    .venv/bin/python bench/bench_convert_kernels.py                 # everything
    .venv/bin/python bench/bench_convert_kernels.py mlp cnn         # some models
    .venv/bin/python bench/bench_convert_kernels.py gemm            # SGEMM GFLOP/s on single Gemm nodes
    EDGE_AGENT_ONNX_KERNELS=/tmp/b1-build/onnx_kernels.wasm .venv/bin/python bench/bench_convert_kernels.py

Times ``ModelInstance.run`` alone (ea_run plus the input/output copies, no HTTP, no
batching logic) against onnxruntime on one thread (intra_op_num_threads=1, all graph
optimisations), p50 in milliseconds, on the same inputs. Models: the digits MLP and
the PyTorch digits CNN at batch 1 and 32, the ResNet-50-shaped network at 1x3x224x224.
bench/bench_convert.py (the full benchmark) may import ``model_cases``/``time_p50``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from convert_models import digits_cnn, digits_inputs, digits_mlp, image_inputs, resnet50_shaped  # noqa: E402

from agent.convert.build import Runner, convert  # noqa: E402

Case = tuple[str, Callable[[], onnx.ModelProto], Callable[[int], np.ndarray], tuple[int, ...]]


def model_cases() -> list[Case]:
    """(name, model factory, input factory by batch, batch sizes)."""
    return [
        ("mlp", digits_mlp, lambda n: digits_inputs(n, seed=1), (1, 32)),
        ("cnn", digits_cnn, lambda n: digits_inputs(n, seed=1).reshape(n, 1, 8, 8), (1, 32)),
        ("resnet50", resnet50_shaped, lambda n: image_inputs(n, seed=1), (1,)),
    ]


def time_p50(fn: Callable[[], Any], budget_s: float, min_runs: int = 5, max_runs: int = 2000) -> float:
    """Median wall time of ``fn`` in ms, over as many runs as fit ``budget_s`` (at least ``min_runs``)."""
    fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def bench_model(
    runner: Runner,
    name: str,
    factory: Callable[[], onnx.ModelProto],
    inputs: Callable[[int], np.ndarray],
    batches: tuple[int, ...],
    budget_s: float,
) -> None:
    model = factory()
    input_name = model.graph.input[0].name
    t0 = time.perf_counter()
    converted = convert(model, name=name, version="1", max_batch=max(batches))
    build_s = time.perf_counter() - t0
    instance = runner.instance(converted)
    session = ort_session(model)
    for batch in batches:
        x = inputs(batch)
        want = session.run(None, {input_name: x})[0]
        got = instance.run([x], batch)[0]
        err = float(np.max(np.abs(got - want))) if want.dtype.kind == "f" else 0.0
        ours = time_p50(lambda x=x, batch=batch: instance.run([x], batch), budget_s)
        theirs = time_p50(lambda x=x: session.run(None, {input_name: x}), budget_s)
        print(
            f"{name:9s} b{batch:<3d} ours {ours:10.4f} ms  onnxruntime {theirs:10.4f} ms  ratio {ours / theirs:5.2f}x"
            f"  (max abs err {err:.2g}, build {build_s:.1f}s)",
            flush=True,
        )


def gemm_model(m: int, k: int, n: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def conv_model(cin: int, cout: int, size: int, k: int, stride: int = 1) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((cout, cin, k, k)) * 0.1).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[k // 2] * 4, strides=[stride, stride])
    graph = helper.make_graph(
        [node],
        "c",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", cin, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def bench_kernels(runner: Runner, budget_s: float) -> None:
    for m, k, n in ((64, 2048, 1000), (256, 256, 256), (1, 2048, 1000), (64, 576, 64)):
        model = gemm_model(m, k, n)
        converted = convert(model, name="gemm", version="1", max_batch=m)
        instance = runner.instance(converted)
        x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
        session = ort_session(model)
        ours = time_p50(lambda x=x, m=m, instance=instance: instance.run([x], m), budget_s)
        theirs = time_p50(lambda x=x, s=session: s.run(None, {"x": x}), budget_s)
        flops = 2.0 * m * k * n
        print(
            f"gemm {m}x{k}x{n}: ours {ours:.3f} ms ({flops / ours / 1e6:.1f} GFLOP/s), "
            f"onnxruntime {theirs:.3f} ms ({flops / theirs / 1e6:.1f} GFLOP/s)",
            flush=True,
        )
    for cin, cout, size, k, stride in (
        (64, 64, 56, 3, 1),
        (256, 64, 56, 1, 1),
        (64, 256, 56, 1, 1),
        (512, 512, 7, 3, 1),
        (3, 64, 224, 7, 2),
        (128, 128, 56, 3, 2),
    ):
        model = conv_model(cin, cout, size, k, stride)
        converted = convert(model, name="conv", version="1", max_batch=1)
        instance = runner.instance(converted)
        x = np.random.default_rng(1).standard_normal((1, cin, size, size)).astype(np.float32)
        session = ort_session(model)
        ours = time_p50(lambda x=x, instance=instance: instance.run([x], 1), budget_s)
        theirs = time_p50(lambda x=x, s=session: s.run(None, {"x": x}), budget_s)
        out = (size + 2 * (k // 2) - k) // stride + 1
        flops = 2.0 * cout * cin * k * k * out * out
        print(
            f"conv {cin}->{cout} {size}x{size} k{k} s{stride}: ours {ours:.3f} ms ({flops / ours / 1e6:.1f} GFLOP/s), "
            f"onnxruntime {theirs:.3f} ms ({flops / theirs / 1e6:.1f} GFLOP/s)",
            flush=True,
        )


def main(argv: list[str]) -> int:
    wanted = set(argv) or {"mlp", "cnn", "resnet50"}
    print(
        "reproduce: " + " ".join(["EDGE_AGENT_ONNX_KERNELS=... .venv/bin/python bench/bench_convert_kernels.py", *argv])
    )
    runner = Runner()
    try:
        if "gemm" in wanted:
            bench_kernels(runner, budget_s=1.0)
        for name, factory, inputs, batches in model_cases():
            if name in wanted:
                bench_model(runner, name, factory, inputs, batches, budget_s=3.0 if name == "resnet50" else 1.0)
    finally:
        runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
