"""Converted ONNX models in the agent's runtime, side by side with onnxruntime.

    .venv/bin/python bench/bench_convert.py            # full run
    .venv/bin/python bench/bench_convert.py --quick    # fewer iterations, ResNet at batch 1 only

For each model (the digits MLP, the PyTorch digits CNN, its int8 quantize_dynamic
version, a ResNet-50-shaped network at 1x3x224x224): build time (ONNX -> model
directory -> OCI image), image size against the ONNX file, then per-inference
latency p50/p99 at batch 1 and 32, the agent's runtime (wasmtime, the ModelInstance
every request goes through, without HTTP) against onnxruntime on one thread
(intra_op_num_threads=1, all graph optimisations), on the same inputs, in one run.
Also the cold start of a converted model whose kernel module another model already
compiled: instantiate + copy weights + ea_init, what a swap to a new version costs
before its warm-up.

Targets (issue 10): MLP and CNN no slower than onnxruntime at batch 1; ResNet-50-shaped
within 2.5x of onnxruntime single-thread; int8 faster than the same model in float32
in the agent.
"""

from __future__ import annotations

import argparse
import os
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

from convert_models import digits_cnn, digits_inputs, digits_mlp, image_inputs, resnet50_shaped  # noqa: E402

from agent.convert.build import Runner, convert, kernel_digest_of, write_model_dir  # noqa: E402
from agent.runtime.instance import ModelInstance  # noqa: E402


def int8_cnn() -> onnx.ModelProto:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(digits_cnn(), f"{tmp}/cnn.onnx")
        quantize_dynamic(f"{tmp}/cnn.onnx", f"{tmp}/int8.onnx", weight_type=QuantType.QInt8)
        return onnx.load(f"{tmp}/int8.onnx")


MODELS: list[tuple[str, Callable[[], onnx.ModelProto], Callable[[int], np.ndarray]]] = [
    ("mlp", digits_mlp, lambda n: digits_inputs(n, seed=1)),
    ("cnn", digits_cnn, lambda n: digits_inputs(n, seed=1).reshape(n, 1, 8, 8)),
    ("cnn-int8", int8_cnn, lambda n: digits_inputs(n, seed=1).reshape(n, 1, 8, 8)),
    ("resnet50", resnet50_shaped, lambda n: image_inputs(n, seed=1)),
]


def timed(fn: Callable[[], Any], iterations: int, budget_s: float) -> list[float]:
    fn()  # warm
    samples = []
    start = time.perf_counter()
    for _ in range(iterations):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
        if time.perf_counter() - start > budget_s and len(samples) >= 5:
            break
    return samples


def pct(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q))


def image_bytes(model_dir: Path, work: Path) -> int:
    from agent.images.layout import build_from_dir

    built = build_from_dir(model_dir, work / "layout")
    return sum(f.stat().st_size for f in (work / "layout" / "blobs" / "sha256").iterdir()) if built else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer iterations; ResNet at batch 1 only")
    parser.add_argument("--only", help="comma-separated model names (mlp,cnn,cnn-int8,resnet50)")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    iterations = 300 if args.quick else 2000
    budget = 3.0 if args.quick else 10.0
    runner = Runner()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    print(f"cpu: {os.cpu_count()} cores; onnxruntime {ort.__version__}, one thread; agent: wasmtime {_wasmtime()}")
    rows = []
    for name, factory, inputs in MODELS:
        if only and name not in only:
            continue
        model = factory()
        onnx_size = len(model.SerializeToString())
        t0 = time.perf_counter()
        converted = convert(model, name=name, version="1", max_batch=32 if name != "resnet50" else 8)
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = write_model_dir(converted, Path(tmp) / "model")
            size = image_bytes(model_dir, Path(tmp))
        build_s = time.perf_counter() - t0
        unique = size - len(converted.wasm)
        instance = runner.instance(converted)  # compiles the kernel module the first time
        cold = []
        spec = instance.spec
        module = runner.runtime.load_module(converted.wasm, kernel_digest_of(converted.wasm))
        memory = (spec.memory_limit_mb or 256) << 20
        for _ in range(20 if name != "resnet50" else 3):
            # What the agent's pool does per instance: the module is compiled and its exports
            # checked already; instantiate, copy the weights, ea_init, bind the I/O buffers.
            t1 = time.perf_counter()
            ModelInstance(runner.runtime, module, spec, converted.weights, memory, 1000, exports_checked=True)
            cold.append((time.perf_counter() - t1) * 1000)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        spec_input = converted.doc["inputs"][0]["name"]
        batches = (1,) if (name == "resnet50" and args.quick) else (1, 32)
        for batch in batches:
            x = inputs(batch)
            n = iterations if name != "resnet50" else (20 if batch == 1 else 3)
            ours = timed(lambda x=x, i=instance, b=batch: _run_all(i, x, b), n, budget)
            ref = timed(lambda x=x, s=session, k=input_name: s.run(None, {k: x}), n, budget)
            rows.append((name, batch, pct(ours, 50), pct(ours, 99), pct(ref, 50), pct(ref, 99)))
            print(
                f"{name:9s} b{batch:<3d} agent p50 {pct(ours, 50):8.3f} ms p99 {pct(ours, 99):8.3f} | "
                f"onnxruntime p50 {pct(ref, 50):8.3f} ms p99 {pct(ref, 99):8.3f} | "
                f"ratio {pct(ours, 50) / pct(ref, 50):5.2f}x",
                flush=True,
            )
        assert spec_input == input_name
        print(
            f"{name:9s} build {build_s:6.2f} s, image {size / 1e6:7.3f} MB ({unique / 1e6:.3f} MB besides the "
            f"shared kernel module) vs ONNX {onnx_size / 1e6:7.3f} MB, "
            f"cold start (shared module) median {statistics.median(cold):.3f} ms, "
            f"max batch {converted.doc['max_batch']}, {len(converted.plan.ops)} kernel calls",
            flush=True,
        )
    runner.close()
    int8 = {r[1]: r[2] for r in rows if r[0] == "cnn-int8"}
    fp32 = {r[1]: r[2] for r in rows if r[0] == "cnn"}
    for batch in sorted(set(int8) & set(fp32)):
        print(f"int8 vs float32 CNN in the agent, batch {batch}: {fp32[batch] / int8[batch]:.2f}x faster")
    print("reproduce: .venv/bin/python bench/bench_convert.py" + (" --quick" if args.quick else ""))
    return 0


def _run_all(instance: Any, x: np.ndarray, batch: int) -> Any:
    # The host splits a batch above max_batch into ea_run calls (the ResNet's max batch is 8).
    step = instance.spec.max_batch
    for start in range(0, batch, step):
        part = x[start : start + step]
        instance.run([part], part.shape[0])


def _wasmtime() -> str:
    from agent.runtime.engine import wasmtime_version

    return wasmtime_version()


if __name__ == "__main__":
    raise SystemExit(main())
