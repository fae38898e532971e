"""Dynamic batching on vs off: one model, 64 concurrent clients, the same agent with one config table changed.

    .venv/bin/python bench/bench_batching.py            # 10 s per side
    .venv/bin/python bench/bench_batching.py --quick    # 4 s per side
    .venv/bin/python bench/bench_batching.py --delay-us 500,2000 --connections 64 --duration 10

The model: a converted ONNX MLP 256-1024-1024-1024-10 (ReLU, 2.4 M FP32
weights, 9.6 MB), built here from seeded random weights with agent/convert.
It is chosen because a call's cost is dominated by what does not grow with the
rows: at batch 1 every layer is a matrix-vector product that streams all 9.6 MB
of weights from memory for one row (about 460 us a call on the 2-core VM),
while a batch runs as a real GEMM that reuses each weight panel from cache for
every row (about 125 us a row at 64 rows). That is the shape of model for which
batching is meant. `digits` (64-64-10, 18 us a call) is not: its HTTP path
costs ten times its inference, and merging calls saves almost nothing.

Both sides run `edge-agent run` as a subprocess with the same state (the model
imported once, the compile cache warm) and differ only in the config file:
``[batching.mlp] enabled = false`` vs ``max_queue_delay_us = D``, one run per
``--delay-us`` value (default 2000 and 0). With 0 (Triton's default) a batch
goes as soon as an instance is free, made of whatever queued meanwhile: small
batches, so the instances stay busy with the least efficient calls and, on a
2-core machine, the event loop competes with them for CPU (a long p99 tail).
A delay of a couple of milliseconds makes batches of tens of rows and leaves
CPU to the loop. Load: `wrk -t1 -cN` POSTing one JSON row per request (a Lua
script holds the body).

Targets (issue 13): batching on >= 2x the throughput of batching off, with
p99 no worse than 2x the unbatched p50 + max_queue_delay. The batched
answers are checked equal, bit for bit, to the unbatched ones before the load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_core import fmt_us, free_port, wait_ready, wrk  # noqa: E402

DIMS = (256, 1024, 1024, 1024, 10)


def build_mlp(dims: tuple[int, ...] = DIMS, seed: int = 0) -> Any:
    """An ONNX MLP (Gemm + ReLU layers) with seeded random weights and a dynamic batch dimension."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    last = len(dims) - 2
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
        w = (rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        b = (rng.normal(size=fan_out) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = "y" if i == last else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], ["y" if i == last else f"{out}_pre"]))
        if i != last:
            nodes.append(helper.make_node("Relu", [f"{out}_pre"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dims[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def model_dir(workdir: Path) -> Path:
    from agent.convert.build import convert, write_model_dir

    converted = convert(build_mlp(), name="mlp", version="1", max_batch=64)
    return write_model_dir(converted, workdir / "mlp")


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIMS[0])).astype(np.float32)


def body_for(x: np.ndarray) -> str:
    tensor = {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]})


def post(url: str, body: str) -> Any:
    req = urllib.request.Request(url, data=body.encode(), method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


class Agent:
    def __init__(self, state: Path, config: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        env["EDGE_AGENT_GRPC_LISTEN"] = "off"  # the default gRPC port is one per machine; older agents ignore it
        cmd = [sys.executable, "-m", "agent", "run", "--config", str(config), "--state-dir", str(state)]
        cmd += ["--listen", f"127.0.0.1:{self.port}", "--log-level", "warning", "--no-seed"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ready(self.url + "/v2/health/ready", self.proc)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            return resp.read().decode()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def mean_batch(metrics: str) -> float:
    total = re.search(r'^edge_agent_batch_size_sum\{model="mlp",version="1"\} ([\d.e+]+)', metrics, re.M)
    count = re.search(r'^edge_agent_batch_size_count\{model="mlp",version="1"\} ([\d.e+]+)', metrics, re.M)
    if not total or not count or float(count.group(1)) == 0:
        return 1.0
    return float(total.group(1)) / float(count.group(1))


def run_side(state: Path, config: Path, duration: int, connections: int, check: list[str]) -> tuple[dict, list, float]:
    agent = Agent(state, config)
    try:
        url = agent.url + "/v2/models/mlp/infer"
        answers = [post(url, b)["outputs"] for b in check]
        wrk(url, check[0], 1, connections)  # warm: page in, settle the pool
        result = wrk(url, check[0], duration, connections)
        return result, answers, mean_batch(agent.metrics())
    finally:
        agent.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 s per side instead of 10")
    parser.add_argument("--duration", type=int, default=None, help="seconds of load per side")
    parser.add_argument("--connections", type=int, default=64, help="concurrent clients (wrk -c)")
    parser.add_argument(
        "--delay-us",
        default="2000,0",
        help="max_queue_delay_us values with batching on, one run each (comma-separated)",
    )
    parser.add_argument("--pool-size", type=int, default=2, help="instances of the model (every side)")
    args = parser.parse_args()
    duration = args.duration or (4 if args.quick else 10)
    delays = [int(d) for d in str(args.delay_us).split(",") if d.strip()]
    command = (
        f".venv/bin/python bench/bench_batching.py --duration {duration} --connections {args.connections} "
        f"--delay-us {','.join(map(str, delays))} --pool-size {args.pool_size}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="edge-bench-batching-"))
    try:
        state = workdir / "state"
        src = model_dir(workdir)
        subprocess.run(
            [sys.executable, "-m", "agent", "import", "--state-dir", str(state), "--activate", str(src)],
            cwd=REPO,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        core = f"pool_size = {args.pool_size}\n"
        off = workdir / "off.toml"
        off.write_text(core + "[batching.mlp]\nenabled = false\n")
        check = [body_for(rows(1, seed)) for seed in range(8)] + [body_for(rows(3, 99))]

        print(f"edge-agent dynamic batching ({os.cpu_count()} CPUs, model: converted MLP {'-'.join(map(str, DIMS))})")
        print(f"HTTP /v2/models/mlp/infer, one row per request, wrk -t1 -c{args.connections} -d{duration}s\n")
        base, base_answers, _ = run_side(state, off, duration, args.connections, check)
        sides = []
        for delay in delays:
            on = workdir / f"on-{delay}.toml"
            on.write_text(core + f"[batching.mlp]\nmax_queue_delay_us = {delay}\nmax_queue_size = 1024\n")
            result, answers, batch = run_side(state, on, duration, args.connections, check)
            sides.append((delay, result, batch, answers == base_answers))

        print(f"  {'batching':28} {'req/s':>9} {'p50':>11} {'p99':>11} {'mean batch':>11}  errors")
        rows_out = [("off", base, 1.0)] + [(f"on, max_queue_delay {d} us", r, b) for d, r, b, _ in sides]
        for name, r, b in rows_out:
            errs = f"{r['non2xx']} non-2xx {r['socket_errors']}".strip()
            print(f"  {name:28} {r['rps']:9.0f} {fmt_us(r['p50']):>11} {fmt_us(r['p99']):>11} {b:11.1f}  {errs}")
        print()
        for delay, r, _, same in sides:
            ratio = r["rps"] / base["rps"]
            bound = 2 * base["p50"] + delay / 1e6
            met_rps = "met" if ratio >= 2 else "NOT met"
            met_p99 = "met" if r["p99"] <= bound else "NOT met"
            print(f"  delay {delay} us: throughput on/off {ratio:.2f}x (target >= 2x: {met_rps});")
            print(f"    p99 {fmt_us(r['p99']).strip()} vs 2 x p50 off + delay = {fmt_us(bound).strip()} ({met_p99});")
            print(f"    answers equal to the unbatched ones, bit for bit: {'yes' if same else 'NO'}")
        print(f"\nreproduce: {command}")
        if not all(same for *_, same in sides):
            raise SystemExit(1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
