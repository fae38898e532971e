"""WASI-NN: the agent's ONNX and llama.cpp paths beside onnxruntime and llama-cpp-python called directly.

    .venv/bin/python bench/bench_wasinn.py            # about 4 minutes on the 2-core VM
    .venv/bin/python bench/bench_wasinn.py --quick    # about 1.5 minutes
    .venv/bin/python bench/bench_wasinn.py --threads 2 --calls 60 --tokens 128 --reps 5 --json out.json

ONNX, batch 1, a ResNet-50-shaped model (bench/resnet50_onnx.py: torchvision's
layout, seeded random weights, 100 MB), the same onnxruntime intra-op thread
count on every side (``--threads``, default: the CPU count):

  (a) in process: the WASI-NN reactor app
      (tests/data/wasinn/classify_reactor_f32_3x224x224_to_1000_b1.wasm) run as
      the agent runs it -- a ModelInstance with the version's NnVersion
      (agent/runtime/nn.py), i.e. the Model ABI call into wasm, the
      ``wasi_ephemeral_nn`` host calls (set_input / compute / get_output) and
      the onnxruntime backend -- against ``session.run`` on a session of its own.
      The sides take turns in blocks of ``--block`` calls, each block's first
      call untimed (see ``alternate``: onnxruntime's spinning threads), so
      drift and other load on the machine fall on both alike. The target is
      judged here: it is the cost of the WASI-NN layer itself.
  (b) end to end: the model imported with ``edge-agent import`` and served by a
      real ``edge-agent run`` (``[wasi_nn.onnxruntime] intra_op_threads``),
      one keep-alive connection POSTing Triton's binary tensor extension (the
      602 KB input raw after the JSON, the output back raw) against
      ``session.run`` in this process, in the same blocks. This adds HTTP, the body
      copy and the worker hand-off; reported, not judged.

  Target (issue 16): overhead <= 10% at batch 1, on (a)'s p50.

LLM, a llama GGUF (bench/llama_gguf.py: 768 wide, 12 layers, F16, seeded random
weights, 170 MB; greedy decoding never meets EOS, so every run makes exactly
``--tokens`` tokens), the same n_ctx and n_threads on every side, temperature 0,
a fixed prompt, streaming:

  * POST /v1/completions and /v1/chat/completions (``stream: true``) on a real
    ``edge-agent run`` serving the model (model.json ``wasi_nn`` encoding ggml,
    ``config`` ctx-size and threads) against ``Llama.create_completion`` /
    ``create_chat_completion`` (``stream=True``) in this process, alternating;
  * the WASI-NN ggml path: WasmEdge's published example app
    (tests/data/wasmedge-ggml/basic.wasm, ``stream-stdout``) under
    ``edge-agent wasi run --nn-preload`` against the direct completion.

  Decode tokens/s = (tokens - 1) / (last token's arrival - first token's), from
  the stream's own timestamps on every side (SSE events, llama-cpp-python
  chunks, the app's stdout pipe), so process start, model load and the prompt
  do not count; time to first token (TTFT) is from the request (or call) to
  the first token's text. Medians over ``--reps`` runs after one warm-up each
  (the sides' order reversed every other run), and each side's best run: on a
  machine shared with other work the fastest run is the least disturbed one.
  The target is judged on the medians.

  Target (issue 16): the API's tokens/s >= 95% of llama-cpp-python's.

Every side is measured in the same run on the same machine; other work on a
shared machine shows as noise, so the 1-minute load average is printed.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_core import free_port, wait_ready  # noqa: E402

REACTOR = REPO / "tests" / "data" / "wasinn" / "classify_reactor_f32_3x224x224_to_1000_b1.wasm"
GGML_APP = REPO / "tests" / "data" / "wasmedge-ggml" / "basic.wasm"
ROW = (3, 224, 224)
CLASSES = 1000
PROMPT = "Once upon a time there lived a small robot who wanted to tell me about the sun and the moon"
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me a story about a small robot and the moon"},
]
TARGET_OVERHEAD = 0.10
TARGET_TPS = 0.95


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.2f} ms"


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def verdict(ok: bool | None) -> str:
    return "UNMEASURED" if ok is None else ("PASS" if ok else "MISS")


def environment(threads: int) -> dict[str, Any]:
    import onnxruntime

    env: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": onnxruntime.__version__,
        "wasmtime": importlib.metadata.version("wasmtime"),
        "load_1min": os.getloadavg()[0],
    }
    try:
        import llama_cpp

        env["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        env["llama_cpp_python"] = None
    return env


class Agent:
    """A real ``edge-agent run`` on a state dir, gRPC off, its config file given."""

    def __init__(self, state: Path, config: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        env["EDGE_AGENT_GRPC_LISTEN"] = "off"
        cmd = [sys.executable, "-m", "agent", "run", "--config", str(config), "--state-dir", str(state)]
        cmd += ["--listen", f"127.0.0.1:{self.port}", "--log-level", "warning", "--no-seed"]
        self.log = state.parent / f"agent-{self.port}.log"
        self._log = self.log.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_ready(self.url + "/v2/health/ready", self.proc, timeout=180)
        except BaseException:
            self.stop()
            raise

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def import_model(state: Path, directory: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "import", "--state-dir", str(state), "--activate", str(directory)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"edge-agent import {directory.name} failed: {proc.stderr or proc.stdout}")


def place(src: Path, dst: Path) -> None:
    """A hard link where it can be (the import copies the bytes into the store anyway), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# -- ONNX ---------------------------------------------------------------------------------------------


def resnet_doc(name: str) -> dict[str, Any]:
    """model.json of the reactor app serving the ONNX file (its wasi_nn section names the model ``default``)."""
    return {
        "schema": "edge-agent.model/v1",
        "name": name,
        "version": "1",
        "abi_version": 1,
        "max_batch": 1,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *ROW]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, CLASSES]}],
        "params": [],
        "warmup": {"inputs": {"input": {"shape": [1, *ROW], "data": [0.0] * int(np.prod(ROW))}}},
        "files": {"module": "model.wasm", "weights": "model.onnx"},
        "wasi_nn": {"encoding": "onnx", "target": "cpu", "name": "default"},
    }


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads  # what OnnxBackend sets from [wasi_nn.onnxruntime] intra_op_threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def inputs(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(16)
    return [rng.uniform(-2, 2, (1, *ROW)).astype(np.float32) for _ in range(n)]


def alternate(
    calls: int, block: int, sides: dict[str, Callable[[np.ndarray], np.ndarray]]
) -> tuple[dict[str, list[float]], bool]:
    """Blocks of `block` calls per side, side after side, until each has `calls` timed calls; whether
    the answers agree bit for bit.

    Not call by call: an onnxruntime session's intra-op threads spin for a while after a run, and on
    a 2-core machine they take the CPU from whichever session runs next (another session of this
    process, or the agent's in its own process): measured here, a call right after the other
    session's took about twice as long as one after its own. So each block's first call (the one
    that pays for the other side's spinning) is not timed, one block per side before any is a
    warm-up, and the order of the sides is reversed every other block.
    """
    xs = inputs(4)
    times: dict[str, list[float]] = {name: [] for name in sides}
    same = True
    timed_per_block = max(1, block - 1)
    blocks = -(-calls // timed_per_block)
    order = list(sides.items())
    for b in range(blocks + 1):
        x = xs[b % len(xs)]
        answers = []
        for name, fn in order if b % 2 == 0 else order[::-1]:
            for k in range(block):
                start = time.perf_counter()
                y = fn(x)
                elapsed = time.perf_counter() - start
                if b > 0 and k > 0 and len(times[name]) < calls:
                    times[name].append(elapsed)
            answers.append(y)
        same = same and all(np.array_equal(answers[0], a) for a in answers[1:])
    return times, same


def bench_onnx_inproc(onnx_path: Path, threads: int, calls: int, block: int) -> dict[str, Any]:
    from agent.runtime.engine import WasmRuntime
    from agent.runtime.instance import ModelInstance
    from agent.runtime.nn import NnVersion
    from agent.spec import ModelSpec
    from agent.wasinn.backend import BackendRegistry, discover

    spec = ModelSpec.from_dict(resnet_doc("resnet50"))
    registry = BackendRegistry(
        available=discover(["onnxruntime"]), options={"onnxruntime": {"intra_op_threads": threads}}
    )
    nn = NnVersion(registry=registry, spec=spec, weights_path=onnx_path)
    runtime = WasmRuntime(None)
    instance = None
    try:
        module = runtime.compile(REACTOR.read_bytes(), allow_nn=True)
        instance = ModelInstance(runtime, module, spec, {}, 1 << 30, 600_000, nn=nn)
        session = ort_session(onnx_path, threads)
        inst = instance

        def direct(x: np.ndarray) -> np.ndarray:
            out: np.ndarray = session.run(None, {"input": x})[0]
            return out

        def wasi_nn(x: np.ndarray) -> np.ndarray:
            return inst.run([x], 1)[0]

        times, same = alternate(calls, block, {"onnxruntime": direct, "wasi-nn": wasi_nn})
        return {"times": times, "same": same}
    finally:
        if instance is not None:
            instance.close()
        nn.close()
        runtime.close()


def binary_request(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }
    return header + x.tobytes(), headers


def bench_onnx_http(workdir: Path, onnx_path: Path, threads: int, calls: int, block: int) -> dict[str, Any]:
    src = workdir / "resnet50"
    src.mkdir()
    (src / "model.json").write_text(json.dumps(resnet_doc("resnet50")))
    shutil.copyfile(REACTOR, src / "model.wasm")
    place(onnx_path, src / "model.onnx")
    state = workdir / "state-onnx"
    import_model(state, src)
    config = workdir / "onnx.toml"
    config.write_text(f"[wasi_nn.onnxruntime]\nintra_op_threads = {threads}\n")
    agent = Agent(state, config)
    try:
        conn = agent.connection()
        session = ort_session(onnx_path, threads)

        def direct(x: np.ndarray) -> np.ndarray:
            out: np.ndarray = session.run(None, {"input": x})[0]
            return out

        def rest_binary(x: np.ndarray) -> np.ndarray:
            body, headers = binary_request(x)
            conn.request("POST", "/v2/models/resnet50/infer", body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {data[:500]!r}")
            n = int(resp.headers["Inference-Header-Content-Length"])
            meta = json.loads(data[:n])
            out = meta["outputs"][0]
            return np.frombuffer(data[n:], dtype=np.float32).reshape(out["shape"])

        times, same = alternate(calls, block, {"onnxruntime": direct, "REST binary": rest_binary})
        conn.close()
        return {"times": times, "same": same}
    finally:
        agent.stop()


# -- LLM ----------------------------------------------------------------------------------------------


def stream_rate(arrivals: list[float], start: float, text: str) -> dict[str, Any]:
    """Decode tokens/s between the first and last token's arrival, the time to the first, the text."""
    n = len(arrivals)
    if n == 0:
        raise RuntimeError("the stream carried no text")
    span = arrivals[-1] - arrivals[0] if n > 1 else 0.0
    return {"tokens": n, "tps": (n - 1) / span if span > 0 else 0.0, "ttft": arrivals[0] - start, "text": text}


class Direct:
    """llama-cpp-python in this process: one Llama on the GGUF, the agent's n_ctx and n_threads."""

    def __init__(self, gguf: Path, n_ctx: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_batch=512, verbose=False)

    def completion(self, tokens: int) -> dict[str, Any]:
        start = time.perf_counter()
        stream: Any = self.llm.create_completion(PROMPT, max_tokens=tokens, temperature=0.0, stream=True)
        return self._collect(start, stream, lambda choice: choice.get("text"))

    def chat(self, tokens: int) -> dict[str, Any]:
        start = time.perf_counter()
        stream: Any = self.llm.create_chat_completion(CHAT, max_tokens=tokens, temperature=0.0, stream=True)  # type: ignore[arg-type]
        return self._collect(start, stream, lambda choice: choice["delta"].get("content"))

    @staticmethod
    def _collect(start: float, stream: Any, text_of: Callable[[dict[str, Any]], str | None]) -> dict[str, Any]:
        arrivals: list[float] = []
        pieces: list[str] = []
        for chunk in stream:
            piece = text_of(chunk["choices"][0])
            if piece:
                arrivals.append(time.perf_counter())
                pieces.append(piece)
        return stream_rate(arrivals, start, "".join(pieces))

    def close(self) -> None:
        self.llm.close()


def llm_doc(name: str, n_ctx: int, threads: int) -> dict[str, Any]:
    """model.json of a language model: a WASI-NN ggml model (the GGUF as its weights) with the
    context size and threads in ``wasi_nn.config``, WasmEdge's keys."""
    return {
        "schema": "edge-agent.model/v1",
        "name": name,
        "version": "1",
        "abi_version": 1,
        "max_batch": 1,
        "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "params": [],
        "files": {"module": "model.wasm", "weights": "model.gguf"},
        "wasi_nn": {
            "encoding": "ggml",
            "target": "cpu",
            "name": "default",
            "app": "command",
            "config": {"ctx-size": n_ctx, "threads": threads},
        },
    }


def sse_arrivals(resp: http.client.HTTPResponse, chat: bool) -> tuple[list[float], str]:
    """Each server-sent event's arrival that carries text, and the text."""
    arrivals = []
    pieces = []
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        choice = (json.loads(data).get("choices") or [{}])[0]
        text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
        if text:
            arrivals.append(time.perf_counter())
            pieces.append(text)
    return arrivals, "".join(pieces)


class Api:
    """The agent's OpenAI-compatible API, streaming."""

    def __init__(self, agent: Agent, model: str):
        self.agent = agent
        self.model = model

    def _stream(self, path: str, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        conn = self.agent.connection()
        try:
            start = time.perf_counter()
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"POST {path}: HTTP {resp.status}: {resp.read()[:500]!r}")
            arrivals, text = sse_arrivals(resp, chat)
            return stream_rate(arrivals, start, text)
        finally:
            conn.close()

    def completion(self, tokens: int) -> dict[str, Any]:
        body = {"model": self.model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
        return self._stream("/v1/completions", body, chat=False)

    def chat(self, tokens: int) -> dict[str, Any]:
        body = {"model": self.model, "messages": CHAT, "max_tokens": tokens, "temperature": 0, "stream": True}
        return self._stream("/v1/chat/completions", body, chat=True)


def wasi_run(gguf: Path, n_ctx: int, threads: int, tokens: int) -> dict[str, Any]:
    """WasmEdge's basic example app under ``edge-agent wasi run``: the ggml backend streams each piece to
    the app's stdout (``stream-stdout``), unbuffered, after a ``Response:`` line."""
    cmd = [sys.executable, "-m", "agent", "wasi", "run", "--nn-threads", str(threads), "--nn-seed", "0"]
    cmd += ["--env", f"n_predict={tokens}", "--env", f"ctx_size={n_ctx}"]
    cmd += ["--nn-preload", f"default:GGML:CPU:{gguf}", str(GGML_APP), "default", PROMPT]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    seen = b""
    arrivals: list[float] = []
    first_at = 0.0
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        now = time.perf_counter()
        seen += chunk
        mark = seen.find(b"Response:\n")
        if mark >= 0 and len(seen) > mark + len(b"Response:\n"):  # a generated piece has arrived
            if not arrivals:
                first_at = now
            arrivals.append(now)
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise RuntimeError(f"edge-agent wasi run failed ({proc.returncode}): {err[-1000:]!r}")
    # The last read carries the last piece (and the app's closing newline); the reads between may
    # each hold several pieces, so the count is the app's n_predict, not the reads.
    if not arrivals:
        raise RuntimeError(f"edge-agent wasi run printed no generated text: {seen[-500:]!r}")
    span = arrivals[-1] - first_at if len(arrivals) > 1 else 0.0
    text = seen[seen.find(b"Response:\n") + len(b"Response:\n") :].decode(errors="replace").removesuffix("\n")
    return {"tokens": tokens, "tps": (tokens - 1) / span if span > 0 else 0.0, "ttft": first_at - start, "text": text}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "tps": p50([r["tps"] for r in runs]),
        # The least disturbed run: on a machine shared with other work, the closest to the side's own speed.
        "tps_best": max(r["tps"] for r in runs),
        "ttft": p50([r["ttft"] for r in runs]),
        "tokens": min(r["tokens"] for r in runs),
        "runs": [{"tps": r["tps"], "ttft": r["ttft"]} for r in runs],
        # Greedy decoding: every run of a side gives one text, and each side the direct one's.
        "text": runs[-1]["text"] if len({r["text"] for r in runs}) == 1 else None,
    }


def alternate_llm(
    reps: int, tokens: int, sides: dict[str, Callable[[int], dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    for fn in sides.values():
        fn(min(tokens, 16))  # warm-up: pages the weights in, makes the agent's context
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    order = list(sides.items())
    for rep in range(reps):
        for name, fn in order if rep % 2 == 0 else order[::-1]:
            runs[name].append(fn(tokens))
    return {name: summarize(r) for name, r in runs.items()}


def api_available(agent: Agent) -> str | None:
    """None when the agent answers /v1/models; else why not (the OpenAI API not built in yet)."""
    conn = agent.connection()
    try:
        conn.request("GET", "/v1/models")
        resp = conn.getresponse()
        body = resp.read()
        return None if resp.status == 200 else f"GET /v1/models: HTTP {resp.status} {body[:200]!r}"
    finally:
        conn.close()


def bench_llm(workdir: Path, gguf: Path, n_ctx: int, threads: int, tokens: int, reps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    direct = Direct(gguf, n_ctx, threads)
    agent: Agent | None = None
    try:
        sides: dict[str, Callable[[int], dict[str, Any]]] = {
            "llama-cpp-python completion": direct.completion,
            "llama-cpp-python chat": direct.chat,
        }
        try:
            src = workdir / "llm"
            src.mkdir()
            (src / "model.json").write_text(json.dumps(llm_doc("llm", n_ctx, threads)))
            shutil.copyfile(GGML_APP, src / "model.wasm")
            place(gguf, src / "model.gguf")
            state = workdir / "state-llm"
            import_model(state, src)
            config = workdir / "llm.toml"
            config.write_text("")
            agent = Agent(state, config)
            why = api_available(agent)
            if why is None:
                api = Api(agent, "llm")
                sides["API /v1/completions"] = api.completion
                sides["API /v1/chat/completions"] = api.chat
            else:
                out["api_skip"] = why
        except (RuntimeError, OSError) as exc:
            out["api_skip"] = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else repr(exc)
        sides["wasi run basic.wasm"] = lambda n: wasi_run(gguf, n_ctx, threads, n)
        out["sides"] = alternate_llm(reps, tokens, sides)
    finally:
        if agent is not None:
            agent.stop()
        direct.close()
    return out


# -- report -------------------------------------------------------------------------------------------


def overhead_rows(label: str, result: dict[str, Any], side: str) -> tuple[list[str], dict[str, float]]:
    base, other = result["times"]["onnxruntime"], result["times"][side]
    figs = {
        "direct_p50": p50(base),
        "direct_mean": statistics.fmean(base),
        "agent_p50": p50(other),
        "agent_mean": statistics.fmean(other),
    }
    figs["overhead_p50"] = figs["agent_p50"] / figs["direct_p50"] - 1
    figs["overhead_mean"] = figs["agent_mean"] / figs["direct_mean"] - 1
    # The median of the differences call by call (the i-th timed call of each side lie in the same
    # or neighbouring blocks): the figure least moved by load that comes and goes.
    figs["paired_diff"] = p50([a - b for a, b in zip(other, base, strict=True)])
    lines = [
        f"  {label:34} {ms(figs['agent_p50'])} {ms(figs['agent_mean'])}",
        f"  {'onnxruntime session.run':34} {ms(figs['direct_p50'])} {ms(figs['direct_mean'])}",
        f"  {'overhead':34} {figs['overhead_p50'] * 100:+10.1f}% {figs['overhead_mean'] * 100:+10.1f}%"
        f"   answers bit-equal: {'yes' if result['same'] else 'NO'}",
        f"  {'median paired difference':34} {ms(figs['paired_diff'])}"
        f" ({figs['paired_diff'] / figs['direct_p50'] * 100:+.1f}% of the direct p50)",
    ]
    return lines, figs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calls, tokens and repetitions")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op / llama.cpp threads")
    parser.add_argument("--calls", type=int, help="timed ONNX calls per side (default 60, --quick 20)")
    parser.add_argument("--block", type=int, default=6, help="ONNX calls per side in a row (the first not timed)")
    parser.add_argument("--tokens", type=int, help="tokens per generation (default 128, --quick 64)")
    parser.add_argument("--reps", type=int, help="generations per LLM side (default 5, --quick 3)")
    parser.add_argument("--n-ctx", type=int, default=1024, help="llama.cpp context size on every side")
    parser.add_argument("--skip", choices=["onnx", "llm"], action="append", default=[], help="leave a part out")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    calls = args.calls or (20 if args.quick else 60)
    tokens = args.tokens or (64 if args.quick else 128)
    reps = args.reps or (3 if args.quick else 5)
    reproduce = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/bench_wasinn.py", *sys.argv[1:]])
    env = environment(args.threads)
    report: dict[str, Any] = {"environment": env, "command": reproduce}
    targets: list[tuple[str, str, bool | None]] = []
    workdir = Path(tempfile.mkdtemp(prefix="edge-bench-wasinn-"))
    try:
        print("edge-agent WASI-NN benchmark")
        print(
            f"  {env['cpus']} CPUs, {args.threads} threads per side; Python {env['python']}, onnxruntime "
            f"{env['onnxruntime']}, llama-cpp-python {env['llama_cpp_python']}, wasmtime {env['wasmtime']}"
        )
        busy = env["load_1min"] > 0.5 * (env["cpus"] or 1)
        note = "  (the machine was already busy: figures are noisy)" if busy else ""
        print(f"  1-min load average before: {env['load_1min']:.2f}{note}\n")

        if "onnx" not in args.skip:
            from resnet50_onnx import build

            onnx_path = build(workdir / "resnet50.onnx")
            print(
                f"ONNX, ResNet-50-shaped (100 MB, random weights), batch 1, {calls} timed calls per side, "
                f"in alternating blocks of {args.block}"
            )
            print(f"  {'':34} {'p50':>11} {'mean':>11}")
            inproc = bench_onnx_inproc(onnx_path, args.threads, calls, args.block)
            lines, figs_a = overhead_rows("(a) WASI-NN reactor, ModelInstance", inproc, "wasi-nn")
            print("\n".join(lines))
            http_res = bench_onnx_http(workdir, onnx_path, args.threads, calls, args.block)
            lines, figs_b = overhead_rows("(b) edge-agent run, REST binary", http_res, "REST binary")
            print("\n".join(lines))
            print()
            report["onnx"] = {"inproc": figs_a, "rest_binary": figs_b, "calls": calls}
            ok = figs_a["overhead_p50"] <= TARGET_OVERHEAD and inproc["same"]
            targets.append(
                (
                    "ONNX WASI-NN overhead at batch 1, (a) p50",
                    f"{figs_a['overhead_p50'] * 100:+.1f}% (target <= {TARGET_OVERHEAD * 100:.0f}%)",
                    ok,
                )
            )
            targets.append(
                (
                    "  for information: (b) REST binary p50",
                    f"{figs_b['overhead_p50'] * 100:+.1f}% (HTTP included; not judged)",
                    None,
                )
            )

        if "llm" not in args.skip:
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                print("LLM: llama-cpp-python is not installed; skipped\n")
                targets.append(("LLM API tokens/s vs llama-cpp-python", "llama-cpp-python missing", None))
            else:
                from llama_gguf import make_llama

                gguf = make_llama(workdir / "llama.gguf")
                print(
                    f"LLM, llama 768x12 F16 (170 MB, random weights), {tokens} tokens, temperature 0, "
                    f"n_ctx {args.n_ctx}, median of {reps} after a warm-up"
                )
                llm = bench_llm(workdir, gguf, args.n_ctx, args.threads, tokens, reps)
                sides = llm["sides"]
                print(
                    f"  {'':34} {'tokens/s':>9} {'TTFT':>11} {'vs direct':>10} {'best':>7} {'vs direct':>10}"
                    "  same text as direct"
                )
                pairs = {
                    "llama-cpp-python completion": None,
                    "API /v1/completions": "llama-cpp-python completion",
                    "llama-cpp-python chat": None,
                    "API /v1/chat/completions": "llama-cpp-python chat",
                    "wasi run basic.wasm": "llama-cpp-python completion",
                }
                for name, anchor in pairs.items():
                    if name not in sides:
                        continue
                    r = sides[name]
                    vs = f"{r['tps'] / sides[anchor]['tps'] * 100:9.1f}%" if anchor else ""
                    vs_best = f"{r['tps_best'] / sides[anchor]['tps_best'] * 100:9.1f}%" if anchor else ""
                    same = ""
                    if anchor:
                        same = "yes" if r["text"] is not None and r["text"] == sides[anchor]["text"] else "no"
                        if name.startswith("wasi run") and same == "no":
                            same += " (the app's own prompt handling and sampling settings)"
                    print(
                        f"  {name:34} {r['tps']:9.1f} {ms(r['ttft'])} {vs:>10} "
                        f"{r['tps_best']:7.1f} {vs_best:>10}  {same}"
                    )
                print("  (tokens/s and TTFT: medians; best: the fastest run's tokens/s)")
                print("  (TTFT of `wasi run`: from the process's start, model load included)")
                if "api_skip" in llm:
                    print(f"  (API rows not measured: {llm['api_skip']})")
                print()
                report["llm"] = llm | {"tokens": tokens, "reps": reps, "n_ctx": args.n_ctx}
                for api_side, anchor in (
                    ("API /v1/completions", "llama-cpp-python completion"),
                    ("API /v1/chat/completions", "llama-cpp-python chat"),
                ):
                    if api_side in sides:
                        ratio = sides[api_side]["tps"] / sides[anchor]["tps"]
                        best = sides[api_side]["tps_best"] / sides[anchor]["tps_best"]
                        result = (
                            f"{ratio * 100:.1f}% of direct, best {best * 100:.1f}% (target >= {TARGET_TPS * 100:.0f}%)"
                        )
                        targets.append((f"LLM {api_side} tokens/s", result, ratio >= TARGET_TPS))
                    else:
                        targets.append((f"LLM {api_side} tokens/s", "not measured", None))
                if "wasi run basic.wasm" in sides:
                    ratio = sides["wasi run basic.wasm"]["tps"] / sides["llama-cpp-python completion"]["tps"]
                    targets.append(("  for information: wasi run ggml tokens/s", f"{ratio * 100:.1f}% of direct", None))

        print("Targets")
        for label, result, ok in targets:
            mark = "" if label.startswith("  for information") and ok is None else verdict(ok)
            print(f"  {label:44} {result:52} {mark}")
        report["targets"] = [{"what": label, "result": result, "pass": ok} for label, result, ok in targets]
        print(f"\n1-min load average after: {os.getloadavg()[0]:.2f} (this benchmark's own load included)")
        print(f"reproduce: {reproduce}")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=float))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
