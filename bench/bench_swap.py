"""Hot-swap benchmark: 100 version swaps of `digits` under HTTP load.

    .venv/bin/python bench/bench_swap.py            # 100 swaps
    .venv/bin/python bench/bench_swap.py --quick    # 30 swaps

A real `edge-agent run` subprocess serves two versions of `digits` (same module,
different weights, so outputs differ) while wrk drives /v2/models/digits/infer.
First a steady-state window, then the same load while the repository API swaps
between the versions, one swap every ~150 ms. Printed: failed requests (target 0), p99
during swaps against steady state (target <= 1.5x), switch time from warm pool to
routed as the agent reports it (target < 50 ms; the pull is excluded, the
versions are already in the store), and the agent's RSS after the swaps against
before (target within 10%).

The agent runs on its default rollback grace (300 s): the version swapped out
stays warm, so swapping back is a route flip. ``--grace 0`` is the stress case:
every swap loads the new version afresh (compile cache hit, pool instantiation,
warm-up with golden check) and releases the old one, the worst case for serving
latency and for leaks.

    .venv/bin/python bench/bench_swap.py --grace 0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import safetensors.numpy

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "native" / "models"))

from bench_core import free_port, request_body, rss_bytes, wait_ready, wrk  # noqa: E402
from digits_reference import reference  # noqa: E402

DIGITS = REPO / "agent" / "bundled" / "digits"


def make_version_two(dest: Path) -> Path:
    """digits version 2: fc2.bias shifted, so the probabilities differ; goldens recomputed."""
    dest.mkdir(parents=True)
    shutil.copy(DIGITS / "model.wasm", dest / "model.wasm")
    weights = safetensors.numpy.load_file(str(DIGITS / "weights.safetensors"))
    weights["fc2.bias"] = (weights["fc2.bias"] + np.linspace(-0.5, 0.5, 10, dtype=np.float32)).astype(np.float32)
    safetensors.numpy.save_file(weights, str(dest / "weights.safetensors"))
    meta = json.loads((DIGITS / "model.json").read_text())
    meta["version"] = "2"
    pixels = np.asarray(meta["warmup"]["inputs"]["pixels"]["data"], dtype=np.float32).reshape(1, 64)
    out = reference(weights, pixels)
    meta["warmup"]["outputs"]["probabilities"]["data"] = out["probabilities"].ravel().tolist()
    meta["warmup"]["outputs"]["label"]["data"] = out["label"].ravel().tolist()
    (dest / "model.json").write_text(json.dumps(meta))
    return dest


def post(url: str, doc: dict, token: str) -> dict:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="30 swaps instead of 100")
    parser.add_argument("--swaps", type=int, default=None)
    parser.add_argument(
        "--grace",
        type=float,
        default=300.0,
        help="rollback grace in s (default 300, the agent's own: the previous version stays warm, so "
        "swapping back is a route flip; 0: every swap loads afresh, the stress case)",
    )
    args = parser.parse_args()
    swaps = args.swaps or (30 if args.quick else 100)
    workdir = Path(tempfile.mkdtemp(prefix="edge-bench-swap-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env["EDGE_AGENT_GRPC_LISTEN"] = "off"  # the default gRPC port is one per machine; older agents ignore it
    env["EDGE_AGENT_LIFECYCLE__ROLLBACK_GRACE_S"] = str(args.grace)
    state = workdir / "state"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    agent_cmd = [sys.executable, "-m", "agent"]
    proc = None
    try:
        v2 = make_version_two(workdir / "digits-2")
        subprocess.run(
            [*agent_cmd, "import", str(v2), "--state-dir", str(state)],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
        )
        proc = subprocess.Popen(
            [*agent_cmd, "run", "--state-dir", str(state), "--listen", f"127.0.0.1:{port}", "--log-level", "warning"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_ready(f"{base}/v2/health/ready", proc)
        token = (state / "api-token").read_text().strip()  # the control API's token, made by the agent
        infer_url = f"{base}/v2/models/digits/infer"
        body = request_body()
        wrk(infer_url, body, 2)  # warm the server and the page cache; not measured

        steady = wrk(infer_url, body, 8)
        rss_before = rss_bytes(proc.pid)

        switch_ms: list[float] = []
        swap_errors: list[str] = []
        # Swaps spread over the load window; each one is a full load + warm-up + switch.
        duration = max(6, round(swaps * 0.15 / 0.85))
        interval = duration * 0.85 / swaps

        def swap_loop() -> None:
            time.sleep(0.3)
            for i in range(swaps):
                started = time.perf_counter()
                version = "2" if i % 2 == 0 else "1"
                try:
                    load = f"{base}/v2/repository/models/digits/load"
                    result = post(load, {"parameters": {"version": version}}, token)
                    switch_ms.append(float(result["switch_ms"]))
                except OSError as exc:
                    swap_errors.append(f"swap {i} to {version}: {exc}")
                time.sleep(max(0.0, interval - (time.perf_counter() - started)))

        swapper = threading.Thread(target=swap_loop)
        swapper.start()
        during = wrk(infer_url, body, duration)
        swapper.join()
        time.sleep(1.0)  # released versions are freed once drained
        rss_after = rss_bytes(proc.pid)

        failed = during["non2xx"] + (0 if not during["socket_errors"] else _socket_errors(during["socket_errors"]))
        print(
            f"edge-agent hot-swap benchmark ({os.cpu_count()} CPUs, model: digits, {swaps} swaps under wrk -c16, "
            f"rollback grace {args.grace:g} s)\n"
        )
        print(f"  {'':26}{'req/s':>9}{'p50':>11}{'p99':>11}")
        print(f"  {'steady state':26}{steady['rps']:9.0f}{steady['p50'] * 1e3:9.2f}ms{steady['p99'] * 1e3:9.2f}ms")
        print(f"  {'during swaps':26}{during['rps']:9.0f}{during['p50'] * 1e3:9.2f}ms{during['p99'] * 1e3:9.2f}ms")
        print()
        print(f"  swaps completed           {len(switch_ms)} of {swaps} ({len(swap_errors)} failed)")
        print(f"  failed requests           {failed}   (target 0)")
        print(f"  p99 during / steady       {during['p99'] / steady['p99']:.2f}x   (target <= 1.5x)")
        if switch_ms:
            print(
                f"  switch warm->routed       p50 {statistics.median(switch_ms):.3f} ms, "
                f"max {max(switch_ms):.3f} ms   (target < 50 ms)"
            )
        print(
            f"  RSS before / after        {rss_before / 1e6:.1f} MB / {rss_after / 1e6:.1f} MB "
            f"({(rss_after / rss_before - 1) * 100:+.1f}%)   (target within 10%)"
        )
        for line in swap_errors[:5]:
            print(f"  ! {line}")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def _socket_errors(text: str) -> int:
    """wrk's 'connect 0, read 0, write 0, timeout 0' as one count."""
    return sum(int(part.split()[-1]) for part in text.split(","))


if __name__ == "__main__":
    main()
