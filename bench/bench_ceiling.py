"""REST JSON at batch 1: the agent beside the bare-server ceiling, under the same wrk load.

    .venv/bin/python bench/bench_ceiling.py            # 3 rounds of 5 s each side
    .venv/bin/python bench/bench_ceiling.py --quick    # 3 rounds of 2 s each side

The ceiling is what Python can do on this machine with the agent's own
parts and none of its work: an asyncio + httptools server that parses each
request's JSON body with orjson and serialises a response of the agent's
shape (model name and version, one FP32 output of 10 values), nothing else —
no limits, no routing, no validation, no model, no metrics. The agent is a
real ``edge-agent run`` (its own state directory, the bundled ``digits``
model) answering ``POST /v2/models/digits/infer`` with a 64-float body.

Both servers run in their own processes and share the machine with wrk
(nothing is pinned). The sides are measured alternately, ceiling then agent,
for ``--rounds`` rounds; each figure is the median of its side's rounds.
``--loop uvloop`` runs the ceiling on uvloop instead (the agent picks its
loop itself: see docs/CONFIG.md); the table says which loop each side ran.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

CONNECTIONS = 16


# -- the ceiling server (runs in its own process: `bench_ceiling.py --serve PORT`) -------------------
def serve_ceiling(port: int, loop_kind: str) -> None:
    import asyncio

    import httptools
    import orjson

    class Conn(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.transport: asyncio.Transport | None = None
            self.url = b""
            self.body = b""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                assert self.transport is not None
                self.transport.close()

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            doc = orjson.loads(self.body)
            data = doc["inputs"][0]["data"][:10]
            out = orjson.dumps(
                {
                    "model_name": "digits",
                    "model_version": "1",
                    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, 10], "data": data}],
                }
            )
            self.url = self.body = b""
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nServer: ceiling\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(out)).encode()
                + b"\r\n\r\n"
                + out
            )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Conn, "127.0.0.1", port, backlog=1024, reuse_address=True)
        print("listening ready", flush=True)
        await server.serve_forever()

    if loop_kind == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


# -- the runs ----------------------------------------------------------------------------------
def start_ceiling(port: int, loop_kind: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--loop", loop_kind],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"listening ready":
        raise RuntimeError("ceiling server did not start")
    return proc


def start_agent(state: Path, port: int, repo: Path) -> subprocess.Popen[bytes]:
    from bench_core import free_port, wait_ready

    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env["EDGE_AGENT_GRPC_LISTEN"] = f"127.0.0.1:{free_port()}"  # its default port is one per machine
    cmd = [sys.executable, "-m", "agent", "run", "--state-dir", str(state)]
    cmd += ["--listen", f"127.0.0.1:{port}", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", proc)
    return proc


def agent_loop(port: int) -> str:
    """Which event loop the agent runs, from its /metrics (edge_agent_build) when it says; else asyncio."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith("edge_agent_build_info") and 'loop="' in line:
            return line.split('loop="', 1)[1].split('"', 1)[0]
    return "asyncio"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    from bench_core import fmt_us, free_port, request_body, wrk

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s per run instead of 5")
    parser.add_argument("--duration", type=int, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per side, alternating (median reported)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio", help="the ceiling's event loop")
    parser.add_argument(
        "--repo", type=Path, help="also run this other checkout's agent (e.g. a `git archive` of a base)"
    )
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve_ceiling(args.serve, args.loop)
        return
    duration = args.duration or (2 if args.quick else 5)
    workdir = Path(tempfile.mkdtemp(prefix="edge-ceiling-"))
    body = request_body()
    ceiling_port, agent_port = free_port(), free_port()
    ceiling = start_ceiling(ceiling_port, args.loop)
    agents: list[subprocess.Popen[bytes]] = []
    try:
        agents.append(start_agent(workdir / "agent-state", agent_port, REPO))
        pids = {"ceiling": ceiling.pid, "agent": agents[0].pid}
        loop_of_agent = agent_loop(agent_port)
        runs: dict[str, list[dict[str, float]]] = {"ceiling": [], "agent": []}
        urls = {
            "ceiling": f"http://127.0.0.1:{ceiling_port}/v2/models/digits/infer",
            "agent": f"http://127.0.0.1:{agent_port}/v2/models/digits/infer",
        }
        labels = {
            "ceiling": f"ceiling (httptools+orjson, {args.loop})",
            "agent": f"edge-agent ({loop_of_agent})",
        }
        if args.repo is not None:
            other_port = free_port()
            agents.append(start_agent(workdir / "other-state", other_port, args.repo.resolve()))
            runs["other"] = []
            pids["other"] = agents[1].pid
            urls["other"] = f"http://127.0.0.1:{other_port}/v2/models/digits/infer"
            labels["other"] = f"edge-agent of {args.repo.name} ({agent_loop(other_port)})"
        for side in urls:  # warm both (first-touch, the agent's inline decision) outside the measurement
            wrk(urls[side], body, 1, CONNECTIONS)
        for _ in range(args.rounds):
            for side, url in urls.items():
                cpu = cpu_seconds(pids[side])
                result = wrk(url, body, duration, CONNECTIONS)
                # Server CPU per answer: steadier than req/s on a machine shared with other work.
                result["cpu"] = (cpu_seconds(pids[side]) - cpu) / max(1.0, result["rps"] * duration)
                runs[side].append(result)

        def med(side: str, key: str) -> float:
            return statistics.median(r[key] for r in runs[side])

        print(f"REST JSON batch 1 vs the bare-server ceiling ({os.cpu_count()} CPUs, model: digits, 64 x FP32 in)")
        print(
            f"wrk -t1 -c{CONNECTIONS} -d{duration}s, POST /v2/models/digits/infer; "
            f"median of {args.rounds} alternating runs per side\n"
        )
        columns = f"{'req/s':>9} {'p50':>11} {'p99':>11} {'CPU/req':>11} {'core':>5}"
        print(f"  {'server':40} {columns}  runs (req/s)       errors")
        for side in urls:
            errors = sum(r["non2xx"] for r in runs[side])
            sockets = "; ".join(str(r["socket_errors"]) for r in runs[side] if r["socket_errors"])
            each = " ".join(f"{r['rps']:.0f}" for r in runs[side])
            core = med(side, "cpu") * med(side, "rps")
            print(
                f"  {labels[side]:40} {med(side, 'rps'):9.0f} {fmt_us(med(side, 'p50')):>11} "
                f"{fmt_us(med(side, 'p99')):>11} {fmt_us(med(side, 'cpu')):>11} {core:5.0%}  {each:18} "
                f"{errors} non-2xx {sockets}".rstrip()
            )
        print(
            "\n  CPU/req: the server process's CPU time per answer; core: its share of one core during the run"
            " (a side near 100% is saturated, one well below it waits on wrk, which shares the machine)"
        )
        ratio = med("agent", "rps") / max(1.0, med("ceiling", "rps"))
        print(f"  agent / ceiling throughput: {ratio:.0%}   (target >= 70%; agent >= 10000 req/s, p99 <= 4 ms)")
        if "other" in runs:
            print(f"  agent / {args.repo.name} throughput: {med('agent', 'rps') / med('other', 'rps'):.2f}x")
        argv = " ".join(sys.argv[1:])
        print(f"\nreproduce: .venv/bin/python bench/bench_ceiling.py {argv}".rstrip())
    finally:
        stop(ceiling)
        for agent in agents:
            stop(agent)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
