"""Thousands of models per node: RSS, start-to-ready and request latency for 3,000 distinct models.

    .venv/bin/python bench/bench_scale.py                 # 3,000 models, lazy instances (the default agent)
    .venv/bin/python bench/bench_scale.py --quick         # 300 models, shorter wrk runs
    .venv/bin/python bench/bench_scale.py --models 201 --eager   # the issue's anchor size, eager instances
    .venv/bin/python bench/bench_scale.py --anchor-repo /tmp/old   # anchor: an older checkout's agent

Each model is the bundled ``digits`` MLP under its own name (``digits-0000`` ...) with its own
weights (the bundled ones perturbed by a seeded RNG, so no two models share a weights blob; all
share the one wasm module, as every converted model shares the kernel library). The model
directories are made once into a cache directory (``--cache``) and imported with one
``edge-agent import --activate`` call. The agent is then started twice on the same state: the
first start fills the compile cache, the second is what a node restart sees ("warm compile
cache"). Reported: time from process start to ``/v2/health/ready``, VmRSS once ready and after the
load, and ``wrk`` latency for requests spread uniformly over every model (a Lua script picks the
path at random) vs the same load on one model.

Anchor, in the same run: the agent with ``eager_instances = true`` (every version's pool built and
warmed at load, the behaviour before lazy instances), on the same models; or, with ``--anchor-repo``,
another checkout's agent (for example the commit before this work, extracted with ``git archive``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_core import free_port, request_body, rss_bytes, wait_ready  # noqa: E402

from agent.repository import bundled_model_dirs  # noqa: E402

DIGITS = next(d for d in bundled_model_dirs() if d.name == "digits")
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "edge-bench-scale"


def model_name(i: int) -> str:
    return f"digits-{i:04d}"


def make_models(cache: Path, count: int) -> Path:
    """``count`` distinct model directories under ``cache/models-<count>`` (made once, then reused)."""
    import safetensors.numpy

    root = cache / f"models-{count}"
    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    meta = json.loads((DIGITS / "model.json").read_text())
    meta["warmup"].pop("outputs", None)  # perturbed weights: the bundled golden output no longer holds
    weights = safetensors.numpy.load_file(str(DIGITS / "weights.safetensors"))
    wasm = (DIGITS / "model.wasm").read_bytes()
    for i in range(count):
        rng = np.random.default_rng(i)
        directory = root / model_name(i)
        directory.mkdir()
        meta["name"] = model_name(i)
        (directory / "model.json").write_text(json.dumps(meta))
        (directory / "model.wasm").write_bytes(wasm)
        perturbed = {k: (v * (1 + 0.01 * rng.standard_normal(v.shape))).astype(v.dtype) for k, v in weights.items()}
        safetensors.numpy.save_file(perturbed, str(directory / "weights.safetensors"))
    (root / ".complete").write_text("")
    return root


def agent_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}


def import_models(state: Path, models: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "agent", "import", "--activate", "--state-dir", str(state), str(models)],
        cwd=REPO,
        env=agent_env(),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def wrk_random(port: int, count: int, duration: int, connections: int) -> dict[str, float]:
    """wrk with a Lua script that posts each request to a model chosen uniformly at random."""
    body = request_body()
    script = Path(tempfile.mkdtemp()) / "random.lua"
    script.write_text(
        f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[{body}]]
local n = {count}
math.randomseed(os.time())
request = function()
  return wrk.format(nil, string.format("/v2/models/digits-%04d/infer", math.random(0, n - 1)))
end
"""
    )
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shutil.rmtree(script.parent, ignore_errors=True)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {}
    for p in ("50", "99"):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)", out, re.M)
        assert m is not None, out
        lat[p] = float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50": lat["50"], "p99": lat["99"], "non2xx": int(non2xx.group(1)) if non2xx else 0}


def start_agent(state: Path, port: int, extra: list[str], repo: Path = REPO) -> tuple[subprocess.Popen[bytes], float]:
    """``edge-agent run`` from ``repo``'s checkout; returns it and the seconds from its start to ready."""
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
        "--no-seed",
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=agent_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc, timeout=600)
    return proc, time.perf_counter() - start


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_case(
    state: Path, count: int, extra: list[str], duration: int, connections: int, repo: Path = REPO
) -> dict[str, Any]:
    """Start twice (the first fills the compile cache), then: requests over every model once
    (each model's first requests: 'first'), then one model ('one'), then every model again ('all')."""
    result: dict[str, Any] = {}
    proc, result["ready_cold"] = start_agent(state, free_port(), extra, repo)
    stop(proc)
    # A fresh port: on a shared machine another process may take the first one between the two starts.
    port = free_port()
    proc, result["ready_warm"] = start_agent(state, port, extra, repo)
    try:
        result["rss_ready"] = rss_bytes(proc.pid)
        if duration > 0:
            result["first"] = wrk_random(port, count, duration, connections)
            result["one"] = wrk_random(port, 1, duration, connections)
            result["all"] = wrk_random(port, count, duration, connections)
        result["rss_after"] = rss_bytes(proc.pid)
    finally:
        stop(proc)
    return result


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="300 models, 3 s wrk runs")
    parser.add_argument("--models", type=int, help="how many distinct models (default 3000; 300 with --quick)")
    parser.add_argument("--duration", type=int, help="seconds per wrk run (default 10; 3 with --quick; 0: no wrk)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help=f"model directories (default {DEFAULT_CACHE})"
    )
    parser.add_argument("--eager", action="store_true", help="only the anchor: eager_instances = true")
    parser.add_argument("--no-anchor", action="store_true", help="skip the eager anchor")
    parser.add_argument(
        "--anchor-repo",
        type=Path,
        help="run the anchor from another checkout (e.g. `git archive` of the commit before lazy instances) "
        "instead of this agent with --eager-instances",
    )
    args = parser.parse_args()
    count = args.models or (300 if args.quick else 3000)
    duration = args.duration if args.duration is not None else (3 if args.quick else 10)
    print(f"edge-agent scale benchmark: {count} distinct models ({os.cpu_count()} CPUs)\n", flush=True)

    t0 = time.perf_counter()
    models = make_models(args.cache, count)
    print(f"model directories: {models} ({time.perf_counter() - t0:.1f} s, made once)", flush=True)

    cases: list[tuple[str, list[str], Path]] = []
    if not args.eager:
        cases.append(("lazy (default)", ["--grpc-listen", "off"], REPO))
    if args.anchor_repo is not None:
        cases.append((f"anchor: {args.anchor_repo.name}", [], args.anchor_repo.resolve()))
    elif args.eager or not args.no_anchor:
        cases.append(("eager (anchor)", ["--grpc-listen", "off", "--eager-instances"], REPO))
    workdir = Path(tempfile.mkdtemp(prefix="edge-bench-scale-"))
    rows = []
    try:
        state = workdir / "state"
        imported = import_models(state, models)
        print(f"bulk import: {count} models in {imported:.1f} s (one `edge-agent import` call)\n", flush=True)
        for label, extra, repo in cases:
            rows.append((label, run_case(state, count, extra, duration, args.connections, repo)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"{'agent':<18} {'ready cold':>10} {'ready warm':>10} {'RSS ready':>10} {'RSS after':>10}", end="")
    if duration:
        print(f" {'p99 one':>9} {'p99 all':>9} {'ratio':>6} {'p99 first':>9} {'req/s all':>9} {'non-2xx':>7}", end="")
    print()
    for label, r in rows:
        print(
            f"{label:<18} {r['ready_cold']:>8.2f} s {r['ready_warm']:>8.2f} s "
            f"{r['rss_ready'] / 2**20:>7.0f} MB {r['rss_after'] / 2**20:>7.0f} MB",
            end="",
        )
        if duration:
            one, everyone, first = r["one"], r["all"], r["first"]
            non2xx = one["non2xx"] + everyone["non2xx"] + first["non2xx"]
            print(
                f" {fmt_ms(one['p99']):>9} {fmt_ms(everyone['p99']):>9} {everyone['p99'] / one['p99']:>5.2f}x "
                f"{fmt_ms(first['p99']):>9} {everyone['rps']:>9.0f} {non2xx:>7}",
                end="",
            )
        print()
    print(
        "\ntargets: RSS <= 1 GiB, ready (warm compile cache) <= 10 s, p99 all / p99 one <= 2x"
        f"\nwrk -t1 -c{args.connections} -d{duration}s, 64-float request; 'one' = every request to {model_name(0)}, "
        f"'all' = each to one of the {count} models at random; 'first' = the same, right after start "
        "(each model's first requests); ratio = p99 all / p99 one"
    )
    command = " ".join(["bench/bench_scale.py", *sys.argv[1:]])
    print(f"reproduce: .venv/bin/python {command}")


if __name__ == "__main__":
    main()
