"""Serving language models and WASI-NN command apps: the streaming HTTP responses they need, each
model's admission (concurrency, queue, 429), cancellation when a client goes away (counted in
tokens, not time), command apps run per v2 request, and the engines closed with their versions."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
from conftest import ROLLBACK_GRACE_S, AgentThread, control_headers, http
from llmkit import llm_model_dir

from agent.config import Config
from agent.errors import InvalidModel
from agent.llm.admission import Admission, Overloaded
from agent.llm.params import InvalidField, parse_chat, parse_completion
from agent.llm.settings import LlmSettings
from agent.server.http import HttpServer, Request, Response, StreamingResponse
from agent.spec import ModelSpec
from agent.wasinn.backend import BackendRegistry, discover
from agent.wasinn.command import run_command
from agent.wiring import attach_grpc, attach_lifecycle, attach_llm

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the ggml backend) is not installed")

HANG_S = 60.0  # a hang guard for a loaded machine, never a speed check
# Long enough that no generation of it ends by itself while a test looks at it: the tiny model
# never samples EOS (tests/ggufkit.py), and each token takes a while at this context length.
LONG = 6000
CHAT = [{"role": "system", "content": "you are a small robot"}, {"role": "user", "content": "tell me a story"}]


def wait_for(check: Callable[[], Any], what: str, timeout: float = HANG_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout:g} s: {what}")


# -- a plain HttpServer with streaming responses ---------------------------------------------------
class Served:
    """An HttpServer on its own loop thread with an app the test gives."""

    def __init__(self, app: Callable[[Request], Any], **limits: Any):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = HttpServer(app, **limits)
        self.host, self.port = self.call(self.server.listen("127.0.0.1", 0))

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(HANG_S)

    def close(self) -> None:
        self.call(self.server.shutdown(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def served() -> Any:
    made: list[Served] = []

    def factory(app: Callable[[Request], Any], **limits: Any) -> Served:
        made.append(Served(app, **limits))
        return made[-1]

    yield factory
    for s in made:
        s.close()


class Producer:
    """An async generator of numbered pieces that records how far it got and whether it was closed."""

    def __init__(self, count: int, size: int = 16, delay_s: float = 0.0):
        self.count = count
        self.size = size
        self.delay_s = delay_s
        self.made = 0
        self.closed = threading.Event()
        self.finished = False

    async def pieces(self) -> AsyncIterator[bytes]:
        try:
            for i in range(self.count):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                self.made += 1
                yield f"{i:08d}".encode().ljust(self.size, b".")
            self.finished = True
        finally:
            self.closed.set()


def test_streaming_response_is_chunked_and_the_connection_stays_usable(served):
    producer = Producer(50)

    def app(request: Request) -> Response:
        if request.path == "/stream":
            return StreamingResponse(200, chunks=producer.pieces(), content_type="text/plain")
        return Response.json(200, {"after": True})

    s = served(app)
    conn = HTTPConnection(s.host, s.port, timeout=HANG_S)
    conn.request("GET", "/stream")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("Transfer-Encoding") == "chunked"
    assert resp.getheader("Content-Type") == "text/plain"
    body = resp.read()
    assert body == b"".join(f"{i:08d}".encode().ljust(16, b".") for i in range(50))
    assert producer.finished and producer.closed.is_set()
    # Keep-alive: the same connection answers the next request.
    conn.request("GET", "/plain")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read()) == {"after": True}
    conn.close()
    assert s.server.requests_in_flight == 0


def test_streaming_response_to_http10_ends_with_the_connection(served):
    producer = Producer(5)
    s = served(lambda request: StreamingResponse(200, chunks=producer.pieces(), content_type="text/plain"))
    with socket.create_connection((s.host, s.port), timeout=HANG_S) as sock:
        sock.sendall(b"GET /x HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Connection: close" in head
    assert body == b"".join(f"{i:08d}".encode().ljust(16, b".") for i in range(5))


def test_streaming_producer_waits_for_a_client_that_does_not_read(served):
    """Backpressure: the producer is not asked for more while the transport holds its high-water mark."""
    total, size = 16384, 4096  # 64 MiB if it were all made at once
    producer = Producer(total, size=size)
    s = served(
        lambda request: StreamingResponse(200, chunks=producer.pieces(), content_type="application/octet-stream"),
        write_buffer_high_bytes=8192,
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.connect((s.host, s.port))
    sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: s.server.counters["write_paused"] >= 1, "the server pausing its writes")

    def stalled() -> bool:
        before = producer.made
        time.sleep(0.2)
        return producer.made == before

    wait_for(stalled, "the producer stalling")
    assert producer.made < total // 2, f"made {producer.made} pieces for a client that read nothing"
    # The client reads: the rest follows, all of it, in order.
    sock.settimeout(HANG_S)
    data = bytearray()
    while not data.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
        chunk = sock.recv(1 << 20)
        assert chunk, "the connection closed before the body's end"
        data += chunk
    sock.close()
    assert producer.finished
    assert f"{total - 1:08d}".encode() in data[-2 * size :]


def test_client_going_away_cancels_the_stream_and_fires_on_disconnect(served):
    producer = Producer(10**9, delay_s=0.01)
    gone = threading.Event()
    release = asyncio.Event()

    async def slow(request: Request) -> Response:
        request.on_disconnect(gone.set)
        await release.wait()
        return Response.json(200, {})

    def app(request: Request) -> Any:
        if request.path == "/stream":
            return StreamingResponse(200, chunks=producer.pieces(), content_type="text/plain")
        return slow(request)

    s = served(app)
    sock = socket.create_connection((s.host, s.port), timeout=HANG_S)
    sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()
    assert producer.closed.wait(HANG_S), "the producer was not closed when its client went away"
    assert not producer.finished
    wait_for(lambda: s.server.requests_in_flight == 0, "the stream to be counted done")

    # A plain response's handler learns of it too.
    sock = socket.create_connection((s.host, s.port), timeout=HANG_S)
    sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: s.server.requests_in_flight == 1, "the slow request to be in the application's hands")
    sock.close()
    assert gone.wait(HANG_S), "on_disconnect was not called"
    s.loop.call_soon_threadsafe(release.set)
    wait_for(lambda: s.server.requests_in_flight == 0, "the slow request to end")


# -- admission ----------------------------------------------------------------------------------------
def test_admission_runs_the_limit_queues_the_rest_in_order_and_refuses_beyond_the_queue():
    async def scenario() -> None:
        admission = Admission(limit=2, queue=2)
        first, second = admission.reserve("m"), admission.reserve("m")
        assert first.granted and second.granted and admission.running == 2
        third, fourth = admission.reserve("m"), admission.reserve("m")
        assert not third.granted and admission.waiting == 2
        with pytest.raises(Overloaded):
            admission.reserve("m")
        fourth.release()  # leaves the queue
        assert admission.waiting == 1
        assert not await fourth.wait()
        waiter = asyncio.ensure_future(third.wait())
        await asyncio.sleep(0)
        assert not waiter.done()
        first.release()
        first.release()  # idempotent: one slot given back, not two
        assert await waiter and third.granted
        assert admission.running == 2 and admission.waiting == 0
        second.release()
        third.release()
        assert admission.running == 0

    asyncio.run(scenario())


# -- request fields -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("doc", "param"),
    [
        ({"messages": CHAT}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
        ({"model": "m", "messages": CHAT, "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "messages": CHAT, "max_tokens": "5"}, "max_tokens"),
        ({"model": "m", "messages": CHAT, "temperature": 3}, "temperature"),
        ({"model": "m", "messages": CHAT, "top_p": -0.1}, "top_p"),
        ({"model": "m", "messages": CHAT, "stop": 5}, "stop"),
        ({"model": "m", "messages": CHAT, "stop": ["a"] * 17}, "stop"),
        ({"model": "m", "messages": CHAT, "seed": 1.5}, "seed"),
        ({"model": "m", "messages": CHAT, "stream": "yes"}, "stream"),
        ({"model": "m", "messages": CHAT, "n": 2}, "n"),
        ({"model": "m", "messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}] * 1025}, "messages"),
    ],
)
def test_bad_chat_fields_are_refused_naming_the_field(doc: dict[str, Any], param: str):
    with pytest.raises(InvalidField) as caught:
        parse_chat(doc, LlmSettings())
    assert caught.value.param == param


def test_request_fields_override_the_models_defaults_and_bounds_hold():
    settings = LlmSettings(max_prompt_chars=10)
    with pytest.raises(InvalidField):
        parse_completion({"model": "m", "prompt": "x" * 11}, settings)
    with pytest.raises(InvalidField):
        parse_chat({"model": "m", "messages": [{"role": "user", "content": "x" * 11}]}, settings)
    request = parse_completion({"model": "m", "prompt": ["hi"], "stop": "x", "max_tokens": 3}, LlmSettings())
    assert request.prompt == "hi" and request.stop == ("x",)
    from agent.llm.options import LlamaOptions

    defaults = LlamaOptions(temperature=0.5, max_tokens=9, stop=("END",))
    kwargs = request.llama_kwargs(defaults)
    assert kwargs["temperature"] == 0.5 and kwargs["max_tokens"] == 3 and kwargs["stop"] == ["x"]


def test_options_come_from_wasmedge_config_keys():
    from agent.llm.options import LlamaOptions
    from agent.spec import WasiNnSpec

    nn = WasiNnSpec.from_dict(
        {"encoding": "ggml", "config": {"ctx-size": 1000, "n-predict": 7, "temp": 0.2, "reverse-prompt": "User:"}}
    )
    opts = LlamaOptions.from_spec(nn)
    assert (opts.n_ctx, opts.max_tokens, opts.temperature, opts.stop, opts.n_gpu_layers) == (
        1024,
        7,
        0.2,
        ("User:",),
        -1,
    )
    assert LlamaOptions.from_spec(WasiNnSpec.from_dict({"encoding": "ggml", "target": "cpu"})).n_gpu_layers == 0
    with pytest.raises(InvalidModel, match="ctx-size"):
        LlamaOptions.from_spec(WasiNnSpec.from_dict({"encoding": "ggml", "config": {"ctx-size": "big"}}))


# -- BYTES: command apps only ---------------------------------------------------------------------------
def test_bytes_tensors_are_declared_only_by_command_apps(tmp_path: Path):
    doc = json.loads((llm_model_dir(tmp_path / "m") / "model.json").read_text())
    spec = ModelSpec.from_dict(doc)
    assert spec.inputs[0].datatype == "BYTES" and spec.outputs[0].datatype == "BYTES"
    doc["wasi_nn"]["app"] = "reactor"
    with pytest.raises(InvalidModel, match="BYTES only for a WASI-NN command app"):
        ModelSpec.from_dict(doc)
    del doc["wasi_nn"]
    with pytest.raises(InvalidModel, match="BYTES"):
        ModelSpec.from_dict(doc)


# -- a real agent ---------------------------------------------------------------------------------------
def llm_agent(
    tmp_path: Path,
    model_dir: Path,
    env: dict[str, str] | None = None,
    apis: list[Any] | None = None,
    grpc_api: bool = False,
) -> AgentThread:
    """An agent serving ``model_dir``'s model; ``apis`` receives its OpenAI API (to look at its engines)."""
    spec = json.loads((model_dir / "model.json").read_text())

    def setup(agent: Any) -> None:
        agent.repository.import_dir(model_dir)
        agent.db.set_active(spec["name"], spec["version"])
        attach_lifecycle(agent, rollback_grace_s=ROLLBACK_GRACE_S)
        api = attach_llm(agent)
        if apis is not None:
            apis.append(api)
        if grpc_api:
            attach_grpc(agent)

    config = Config.load(
        env=env or {},
        overrides={
            "state_dir": tmp_path / "state",
            "listen": "127.0.0.1:0",
            "grpc_listen": "127.0.0.1:0" if grpc_api else "off",
            "log_level": "warning",
            "seed_bundled": False,
        },
    )
    return AgentThread(config, setup)


@pytest.fixture
def agents() -> Any:
    running: list[AgentThread] = []

    def factory(
        tmp_path: Path,
        model_dir: Path,
        env: dict[str, str] | None = None,
        apis: list[Any] | None = None,
        grpc_api: bool = False,
    ) -> AgentThread:
        running.append(llm_agent(tmp_path, model_dir, env, apis, grpc_api))
        return running[-1]

    yield factory
    for agent in running:
        agent.stop()


def metric(agent: AgentThread, name: str, **labels: str) -> float:
    """One series' value from /metrics (0 when absent)."""
    status, body = http("GET", agent.url + "/metrics")
    assert status == 200
    text = body.decode() if isinstance(body, bytes) else str(body)
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def prompt_request(prompt: str) -> dict[str, Any]:
    return {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [prompt]}]}


def test_command_app_answers_a_v2_request_with_the_apps_own_text(tmp_path, agents):
    config = '{"n-predict": 12, "temp": 0}'
    model = llm_model_dir(tmp_path / "m", args=(config,))
    agent = agents(tmp_path, model)
    status, body = http(
        "POST", agent.url + "/v2/models/tinychat/infer", {**prompt_request("once upon a time"), "id": "r1"}
    )
    assert status == 200, body
    assert body["id"] == "r1" and body["model_version"] == "1"
    (out,) = body["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("text", "BYTES", [1])

    # The same app, run outside the agent on the same GGUF: the same text.
    from agent.wasinn.abi import ExecutionTarget, GraphEncoding
    from agent.wasinn.backend import NamedModel, NamedModels

    registry = BackendRegistry(available=discover(["llama.cpp"]))
    named = NamedModels(
        registry=registry,
        models={"default": NamedModel("default", GraphEncoding.GGML, ExecutionTarget.CPU, model / "model.gguf")},
    )
    try:
        direct = run_command(
            (model / "app.wasm").read_bytes(), args=[config, "once upon a time"], named=named, registry=registry
        )
    finally:
        named.close()
    assert direct.exit_code == 0, direct
    assert out["data"] == [direct.stdout.decode()]
    assert out["data"][0].strip()

    # Refusals: a fixed-width datatype, two prompts, a binary body, a model's other name.
    bad = prompt_request("x")
    bad["inputs"][0]["datatype"] = "FP32"
    assert http("POST", agent.url + "/v2/models/tinychat/infer", bad)[0] == 400
    two = prompt_request("x")
    two["inputs"][0]["shape"] = [2]
    assert http("POST", agent.url + "/v2/models/tinychat/infer", two)[0] == 400
    status, body = http("POST", agent.url + "/v2/models/tinychat/infer", {"inputs": [{"name": "text"}]})
    assert status == 400 and "prompt" in body["error"]


WASMEDGE_BASIC = Path(__file__).parent / "data" / "wasmedge-ggml" / "basic.wasm"


@pytest.mark.skipif(not WASMEDGE_BASIC.exists(), reason="WasmEdge's example apps are not in tests/data/wasmedge-ggml")
def test_wasmedge_example_app_is_served_per_request_unchanged(tmp_path, agents):
    """WasmEdge's published ``wasmedge-ggml-basic`` (``basic.wasm default PROMPT``) as a deployed model:
    each v2 request runs it once, its stdout is the answer. The GGUF stops on EOS by itself; the app
    samples at temperature 0.1, so the backend's seed is fixed (as ``--nn-seed`` fixes it)."""
    model = llm_model_dir(tmp_path / "m", args=("default",), app=WASMEDGE_BASIC, eos_bias=True)
    agent = agents(tmp_path, model, {"EDGE_AGENT_WASI_NN__LLAMA_CPP__SEED": "11"})
    prompt = "tell me about paris"
    status, body = http("POST", agent.url + "/v2/models/tinychat/infer", prompt_request(prompt))
    assert status == 200, body
    text = body["outputs"][0]["data"][0]
    assert text.startswith(f"Prompt:\n{prompt}\nResponse:\n")

    from agent.wasinn.abi import ExecutionTarget, GraphEncoding
    from agent.wasinn.backend import NamedModel, NamedModels

    registry = BackendRegistry(available=discover(["llama.cpp"]), options={"llama.cpp": {"seed": 11}})
    named = NamedModels(
        registry=registry,
        models={"default": NamedModel("default", GraphEncoding.GGML, ExecutionTarget.CPU, model / "model.gguf")},
    )
    try:
        direct = run_command(WASMEDGE_BASIC, args=["default", prompt], named=named, registry=registry)
    finally:
        named.close()
    assert direct.exit_code == 0, direct
    assert text == direct.stdout.decode()


def test_command_app_that_fails_is_a_500_naming_why(tmp_path, agents):
    # A config the backend refuses (a string where a number belongs): load_by_name_with_config fails.
    model = llm_model_dir(tmp_path / "m", args=('{"n-predict": "many"}',))
    agent = agents(tmp_path, model)
    status, body = http("POST", agent.url + "/v2/models/tinychat/infer", prompt_request("hello"))
    assert status == 500
    assert "exited with" in body["error"]
    assert metric(agent, "edge_agent_inference_errors_total", model="tinychat") == 1


def stream_request(max_tokens: int = LONG) -> bytes:
    body = json.dumps(
        {"model": "tinychat", "messages": CHAT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    )
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before {marker!r}: {data[-500:]!r}"
        data += chunk
    return data


def test_client_going_away_stops_the_generation_and_frees_the_slot(tmp_path, agents):
    agent = agents(tmp_path, llm_model_dir(tmp_path / "m"))
    tokens = lambda: metric(agent, "edge_agent_llm_tokens_generated_total", model="tinychat")  # noqa: E731
    cancelled = lambda: metric(agent, "edge_agent_llm_requests_total", model="tinychat", outcome="cancelled")  # noqa: E731

    # A stream: the client reads its first pieces, then closes the socket.
    sock = socket.create_connection((agent.url.split("//")[1].split(":")[0], int(agent.url.rsplit(":", 1)[1])))
    sock.settimeout(HANG_S)
    sock.sendall(stream_request())
    read_until(sock, b'"content"')
    sock.close()
    wait_for(lambda: cancelled() == 1, "the stream's generation to stop")
    first = tokens()
    assert 0 < first < LONG, f"{first} tokens sampled for a client that left"
    assert metric(agent, "edge_agent_llm_running", model="tinychat") == 0

    # A plain (non-streamed) request whose client leaves while it generates.
    sock = socket.create_connection((agent.url.split("//")[1].split(":")[0], int(agent.url.rsplit(":", 1)[1])))
    body = json.dumps({"model": "tinychat", "messages": CHAT, "max_tokens": LONG, "temperature": 0})
    sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
    wait_for(lambda: metric(agent, "edge_agent_llm_running", model="tinychat") == 1, "the generation to run")
    sock.close()
    wait_for(lambda: cancelled() == 2, "the plain request's generation to stop")
    assert tokens() - first < LONG

    # The slot is free: the next request runs to its end.
    status, done = http(
        "POST",
        agent.url + "/v1/chat/completions",
        {"model": "tinychat", "messages": CHAT, "max_tokens": 4, "temperature": 0},
    )
    assert status == 200 and done["choices"][0]["finish_reason"] == "length"
    assert metric(agent, "edge_agent_llm_requests_total", model="tinychat", outcome="ok") == 1


def test_requests_beyond_the_queue_get_429_and_the_queued_one_runs_when_the_slot_frees(tmp_path, agents):
    env = {"EDGE_AGENT_LLM__MAX_CONCURRENCY": "1", "EDGE_AGENT_LLM__MAX_QUEUE": "1"}
    agent = agents(tmp_path, llm_model_dir(tmp_path / "m"), env)
    host, port = agent.url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(HANG_S)
    sock.sendall(stream_request())
    read_until(sock, b'"content"')  # the one slot is taken

    queued: dict[str, Any] = {}

    def second() -> None:
        queued["reply"] = http(
            "POST",
            agent.url + "/v1/completions",
            {"model": "tinychat", "prompt": "once upon a time", "max_tokens": 3, "temperature": 0},
        )

    waiter = threading.Thread(target=second)
    waiter.start()
    wait_for(lambda: metric(agent, "edge_agent_llm_waiting", model="tinychat") == 1, "the second request to queue")

    status, body = http("POST", agent.url + "/v1/chat/completions", {"model": "tinychat", "messages": CHAT})
    assert status == 429
    assert body["error"]["code"] == "rate_limit_exceeded" and "busy" in body["error"]["message"]
    assert metric(agent, "edge_agent_llm_requests_total", model="tinychat", outcome="rejected") == 1
    assert "reply" not in queued

    sock.close()  # the running stream's client leaves: its slot goes to the queued request
    waiter.join(HANG_S)
    status, body = queued["reply"]
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"


def test_unloading_the_version_closes_its_contexts(tmp_path, agents):
    apis: list[Any] = []
    agent = agents(tmp_path, llm_model_dir(tmp_path / "m"), apis=apis)
    status, _ = http("POST", agent.url + "/v1/completions", {"model": "tinychat", "prompt": "hi", "max_tokens": 2})
    assert status == 200
    loaded = agent.agent.models.get("tinychat")
    engine = agent.call(on_loop(lambda: apis[0].llm.served(loaded).engine))
    assert engine.contexts == 1 and not engine.closed  # made by the first request, not at load
    headers = control_headers(agent.agent.config.state_dir)
    status, body = http("POST", agent.url + "/v2/repository/models/tinychat/unload", {}, headers=headers)
    assert status == 200, body
    wait_for(lambda: engine.closed and engine.contexts == 0, "the version's contexts to close")
    assert http("GET", agent.url + "/v1/models")[1]["data"] == []
    status, body = http("POST", agent.url + "/v1/completions", {"model": "tinychat", "prompt": "hi"})
    assert status == 404 and body["error"]["code"] == "model_not_found"


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()


def on_loop(fn: Callable[[], Any]) -> Any:
    """A coroutine running ``fn`` on the agent's loop (AgentThread.call takes coroutines)."""
    return _call(fn)


def test_max_concurrency_runs_generations_side_by_side_each_on_its_own_context(tmp_path, agents):
    apis: list[Any] = []
    env = {"EDGE_AGENT_LLM__MAX_CONCURRENCY": "2", "EDGE_AGENT_LLM__MAX_QUEUE": "0"}
    agent = agents(tmp_path, llm_model_dir(tmp_path / "m"), env, apis)
    host, port = agent.url.split("//")[1].split(":")
    socks = []
    for _ in range(2):
        sock = socket.create_connection((host, int(port)))
        sock.settimeout(HANG_S)
        sock.sendall(stream_request())
        read_until(sock, b'"content"')
        socks.append(sock)
    assert metric(agent, "edge_agent_llm_running", model="tinychat") == 2
    loaded = agent.agent.models.get("tinychat")
    assert agent.call(on_loop(lambda: apis[0].llm.served(loaded).engine.contexts)) == 2
    # No queue: a third is refused at once.
    assert http("POST", agent.url + "/v1/completions", {"model": "tinychat", "prompt": "hi"})[0] == 429
    for sock in socks:
        sock.close()
    cancelled = lambda: metric(agent, "edge_agent_llm_requests_total", model="tinychat", outcome="cancelled")  # noqa: E731
    wait_for(lambda: cancelled() == 2, "both generations to stop")
    assert metric(agent, "edge_agent_llm_tokens_generated_total", model="tinychat") < 2 * LONG


def test_command_app_over_grpc_is_refused_saying_it_is_served_over_rest(tmp_path, agents):
    import grpc

    from agent.server.proto import inference_pb2 as pb
    from agent.server.proto import inference_pb2_grpc as pb_grpc

    model = llm_model_dir(tmp_path / "m", args=('{"n-predict": 4, "temp": 0}',))
    agent = agents(tmp_path, model, grpc_api=True)
    host, port = agent.agent.grpc.address
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="tinychat")
        tensor = request.inputs.add(name="prompt", datatype="BYTES")
        tensor.shape.append(1)
        tensor.contents.bytes_contents.append(b"once upon a time")
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "command app" in caught.value.details() and "REST" in caught.value.details()
    # REST still answers it.
    status, body = http("POST", agent.url + "/v2/models/tinychat/infer", prompt_request("once upon a time"))
    assert status == 200, body


@pytest.mark.skipif(not WASMEDGE_BASIC.exists(), reason="WasmEdge's example apps are not in tests/data/wasmedge-ggml")
def test_command_app_gets_the_environment_model_json_gives_it(tmp_path, agents):
    """WasmEdge's apps read their options from the environment (``n_predict``...): wasi_nn.env sets it.
    This GGUF never samples EOS, so without n_predict the app would generate until its context is full."""
    model = llm_model_dir(tmp_path / "m", args=("default",), app=WASMEDGE_BASIC, env={"n_predict": "3"})
    agent = agents(tmp_path, model)
    status, body = http("POST", agent.url + "/v2/models/tinychat/infer", prompt_request("tell me about paris"))
    assert status == 200, body
    answer = body["outputs"][0]["data"][0].split("Response:\n", 1)[1]
    assert 0 < len(answer.strip()) < 60, answer  # three tokens of the tiny vocabulary (a few characters each)
