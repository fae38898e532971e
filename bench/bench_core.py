"""Agent core benchmark: cold start, in-process inference, HTTP serving, RSS — each beside its anchor.

    .venv/bin/python bench/bench_core.py            # everything (needs .venv-bench for KServe)
    .venv/bin/python bench/bench_core.py --quick    # shorter runs

Anchors, measured in the same run on the same weights and inputs:
  * onnxruntime (session creation; session.run) for the `digits` model exported to ONNX;
  * KServe's Python ModelServer serving the same ONNX model with onnxruntime, under the same wrk load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from digits_onnx import build_onnx  # noqa: E402

from agent.artefacts import read_stored  # noqa: E402
from agent.cas import BlobStore  # noqa: E402
from agent.repository import ModelRepository, bundled_model_dirs  # noqa: E402
from agent.runtime import LoadSettings, WasmRuntime, load_version  # noqa: E402
from agent.runtime.instance import ModelInstance  # noqa: E402
from agent.state import StateDB  # noqa: E402

DIGITS = next(d for d in bundled_model_dirs() if d.name == "digits")


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:8.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:8.2f} ms"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sample_inputs(batch: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    data = load_digits().data.astype(np.float32)
    return np.ascontiguousarray(data[:batch])


# -- cold start -------------------------------------------------------------------------------
def bench_cold_start(workdir: Path, trials: int) -> dict[str, float]:
    import onnxruntime as ort

    blobs = BlobStore(workdir / "state")
    db = StateDB(workdir / "state" / "agent.db")
    repo = ModelRepository(blobs, db)
    record = repo.import_dir(DIGITS)
    spec, wasm, params = read_stored(blobs, record)
    runtime = WasmRuntime(workdir / "state" / "compiled")
    runtime.start()
    runtime.load_module(wasm, record.module_digest)  # populate the compile cache
    cache_file = runtime.cache_path(record.module_digest)
    assert cache_file is not None and cache_file.exists()
    x = [sample_inputs(1)]
    memory = 32 * 1024 * 1024

    import wasmtime

    def from_cache() -> float:
        t = time.perf_counter()
        module = wasmtime.Module.deserialize_file(runtime.engine, str(cache_file))
        # As in the agent: a compile-cache entry stands for a module whose exports were checked.
        inst = ModelInstance(runtime, module, spec, params, memory, 1000, exports_checked=True)
        inst.run(x, 1)
        return time.perf_counter() - t

    def from_scratch() -> float:
        t = time.perf_counter()
        module = wasmtime.Module(runtime.engine, wasm)
        inst = ModelInstance(runtime, module, spec, params, memory, 1000)
        inst.run(x, 1)
        return time.perf_counter() - t

    onnx_bytes = build_onnx(DIGITS / "weights.safetensors")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1

    def ort_session() -> float:
        t = time.perf_counter()
        sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        sess.run(None, {"pixels": x[0]})
        return time.perf_counter() - t

    results = {}
    for name, fn in (("cache", from_cache), ("compile", from_scratch), ("ort", ort_session)):
        fn()  # first-touch effects (page cache, lazy imports) are not what is measured
        results[name] = statistics.median(fn() for _ in range(trials))
    runtime.close()
    db.close()
    return results


# -- in-process inference ------------------------------------------------------------------------
def bench_inproc(workdir: Path, iterations: int) -> dict[tuple[str, int], tuple[float, float]]:
    import onnxruntime as ort

    blobs = BlobStore(workdir / "state2")
    db = StateDB(workdir / "state2" / "agent.db")
    record = ModelRepository(blobs, db).import_dir(DIGITS)
    runtime = WasmRuntime(workdir / "state2" / "compiled")
    runtime.start()
    model = load_version(runtime, blobs, record, LoadSettings(1, 32, 1000))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(build_onnx(DIGITS / "weights.safetensors"), opts, providers=["CPUExecutionProvider"])
    results: dict[tuple[str, int], tuple[float, float]] = {}
    for batch in (1, 32):
        x = sample_inputs(batch)
        agent_out = model.infer({"pixels": x})
        ort_out = sess.run(None, {"pixels": x})
        assert np.allclose(agent_out["probabilities"], ort_out[0], atol=1e-5), "outputs differ from onnxruntime"
        feeds = {"pixels": x}
        candidates = (
            ("edge-agent", lambda f=feeds: model.infer(f)),
            ("onnxruntime", lambda f=feeds: sess.run(None, f)),
        )
        for name, fn in candidates:
            for _ in range(2000):
                fn()
            samples = []
            perf = time.perf_counter
            for _ in range(iterations):
                t = perf()
                fn()
                samples.append(perf() - t)
            results[(name, batch)] = (pct(samples, 50), pct(samples, 99))
    runtime.close()
    db.close()
    return results


# -- HTTP -----------------------------------------------------------------------------------------
def wrk(url: str, body: str, duration: int, connections: int = 16) -> dict[str, float]:
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [[{body}]]\n')
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for p in ("50", "99"):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        value = float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]
        lat[p] = value
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "p50": lat["50"],
        "p99": lat["99"],
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else "",
    }


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def request_body() -> str:
    x = sample_inputs(1)
    return json.dumps(
        {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": x.ravel().tolist()}]}
    )


def bench_agent_http(workdir: Path, duration: int) -> dict[str, float]:
    port = free_port()
    state = workdir / "agent-state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env["EDGE_AGENT_GRPC_LISTEN"] = "off"  # the default gRPC port is one per machine; older agents ignore it
    cmd = [
        sys.executable,
        "-m",
        "agent",
        "run",
        "--state-dir",
        str(state),
        "--listen",
        f"127.0.0.1:{port}",
        "--log-level",
        "warning",
    ]
    # First start seeds the store and fills the compile cache; the second is the one a node restart sees.
    for attempt in range(2):
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ready = wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc)
        if attempt == 0:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    try:
        result = wrk(f"http://127.0.0.1:{port}/v2/models/digits/infer", request_body(), duration)
        result["rss"] = rss_bytes(proc.pid)
        result["ready"] = ready
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return result


def kserve_python() -> str | None:
    for candidate in (os.environ.get("KSERVE_PYTHON"), str(REPO / ".venv-bench" / "bin" / "python")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def bench_kserve_http(workdir: Path, duration: int) -> dict[str, float] | None:
    python = kserve_python()
    if python is None:
        return None
    onnx_path = workdir / "digits.onnx"
    onnx_path.write_bytes(build_onnx(DIGITS / "weights.safetensors"))
    port = free_port()
    proc = subprocess.Popen(
        [
            python,
            str(REPO / "bench" / "kserve_digits.py"),
            "--model",
            str(onnx_path),
            "--http_port",
            str(port),
            "--grpc_port",
            str(free_port()),
        ],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/models/digits/ready", proc, timeout=120)
        result = wrk(f"http://127.0.0.1:{port}/v2/models/digits/infer", request_body(), duration)
        result["rss"] = rss_bytes(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    args = parser.parse_args()
    trials, iterations, duration = (15, 5000, 4) if args.quick else (51, 20000, 10)
    workdir = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    try:
        print(f"edge-agent core benchmark ({os.cpu_count()} CPUs, model: digits MLP 64-64-10)\n")
        cold = bench_cold_start(workdir, trials)
        print(f"Cold start to first result (p50 of {trials})")
        print(f"  edge-agent, from compile cache  {fmt_us(cold['cache'])}   (deserialize + instantiate + infer)")
        print(f"  edge-agent, compiling           {fmt_us(cold['compile'])}")
        print(f"  onnxruntime session creation    {fmt_us(cold['ort'])}   (+ first run)\n")

        inproc = bench_inproc(workdir, iterations)
        print(f"In-process inference ({iterations} calls)")
        print(f"  {'':14} {'batch':>5} {'p50':>12} {'p99':>12}")
        for (name, batch), (p50, p99) in sorted(inproc.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            print(f"  {name:14} {batch:>5} {fmt_us(p50):>12} {fmt_us(p99):>12}")
        print()

        agent = bench_agent_http(workdir, duration)
        kserve = bench_kserve_http(workdir, duration)
        print(f"HTTP /v2/models/digits/infer, wrk -t1 -c16 -d{duration}s")
        print(f"  {'server':22} {'req/s':>9} {'p50':>11} {'p99':>11} {'RSS':>9}  errors")
        rows = [("edge-agent", agent)] + ([("KServe ModelServer+ORT", kserve)] if kserve else [])
        for name, r in rows:
            errs = f"{r['non2xx']} non-2xx {r['socket_errors']}".strip()
            print(
                f"  {name:22} {r['rps']:9.0f} {fmt_us(r['p50']):>11} {fmt_us(r['p99']):>11} "
                f"{r['rss'] / 2**20:7.1f}MB  {errs}"
            )
        if kserve:
            ratio_rps, ratio_p99 = agent["rps"] / kserve["rps"], agent["p99"] / kserve["p99"]
            print(f"  throughput ratio {ratio_rps:.2f}x, p99 ratio {ratio_p99:.2f}")
        else:
            print("  (KServe anchor skipped: no .venv-bench; run `make bench` to create it)")
        print(f"\n`edge-agent run` ready (restart, warm compile cache): {agent['ready'] * 1000:.0f} ms")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
