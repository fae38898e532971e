"""Language models on the OpenAI API share the node's GPUs through the GpuScheduler.

An LLM version admitted on a device (``wasi_nn.target`` auto + ``gpu_memory_mb``) puts its llama.cpp
contexts on the leased device, and each generation holds a compute slot of that device from start to
end: ``[gpu] max_concurrency`` bounds generations and WASI-NN computes together, a generation that
cannot get a slot within ``[gpu] wait_s`` is a 503, and the time is the version's GPU time.

The agents here get an explicit device list (``Agent(gpu_devices=...)``), so this runs without a GPU;
the llama.cpp build here may be CPU-only, so where the context is placed is checked on
``context_params``, the function that decides it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
from conftest import ROLLBACK_GRACE_S, AgentThread, http
from llmkit import llm_model_dir

from agent.config import Config
from agent.llm.engine import SPLIT_MODE_NONE, context_params
from agent.llm.options import LlamaOptions
from agent.spec import WasiNnSpec
from agent.wasinn.abi import ExecutionTarget
from agent.wasinn.gpu import GpuDevice, GpuScheduler, GpuSettings
from agent.wiring import attach_lifecycle, attach_llm

HANG_S = 60.0  # a hang guard for a loaded machine, never a speed check
LONG = 6000  # tokens: a generation that does not end by itself while a test looks at it
DEVICE = GpuDevice(index=0, name="fake GPU", total_mb=16_000)
CHAT = [{"role": "user", "content": "tell me a story"}]


def wait_for(check: Callable[[], Any], what: str, timeout: float = HANG_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout:g} s: {what}")


# -- where a context goes -------------------------------------------------------------------------------
def options(config: dict[str, Any], target: str = "auto") -> LlamaOptions:
    return LlamaOptions.from_spec(WasiNnSpec.from_dict({"encoding": "ggml", "target": target, "config": config}))


def leased_on_second_device() -> Any:
    scheduler = GpuScheduler(
        devices=[GpuDevice(0, "a", 16_000), GpuDevice(1, "b", 16_000)],
        settings=GpuSettings(memory_budget_mb=(1_000, 16_000)),
    )
    lease = scheduler.admit("m:1", 4_000, "auto")  # only cuda:1 has room
    assert lease is not None and lease.index == 1
    return lease


def test_a_leased_version_asks_for_its_device_only_when_llama_cpp_can_offload() -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the ggml backend) is not installed")
    assert SPLIT_MODE_NONE == llama_cpp.LLAMA_SPLIT_MODE_NONE
    lease = leased_on_second_device()
    opts = options({"n-gpu-layers": 20, "main-gpu": 0})
    # Offload: the model's n-gpu-layers on the leased device alone, whatever main-gpu the model says.
    assert context_params(opts, lease=lease, target=ExecutionTarget.AUTO, offload=True) == {
        "n_gpu_layers": 20,
        "main_gpu": 1,
        "split_mode": SPLIT_MODE_NONE,
    }
    # Without n-gpu-layers, an auto model offloads all of them (-1).
    assert context_params(options({}), lease=lease, target=ExecutionTarget.AUTO, offload=True)["n_gpu_layers"] == -1
    # A build without offload: every layer on the CPU, no device asked for.
    assert context_params(opts, lease=lease, target=ExecutionTarget.AUTO, offload=False) == {
        "n_gpu_layers": 0,
        "main_gpu": 0,
    }
    # n-gpu-layers 0: nothing to place on the device either.
    zero = options({"n-gpu-layers": 0})
    assert context_params(zero, lease=lease, target=ExecutionTarget.AUTO, offload=True)["n_gpu_layers"] == 0
    # A lease given back (a CPU-only ggml graph released it, or the version unloads): the CPU.
    lease.release()
    assert context_params(opts, lease=lease, target=ExecutionTarget.AUTO, offload=True)["n_gpu_layers"] == 0


def test_without_a_lease_the_scheduler_placement_holds() -> None:
    opts = options({"n-gpu-layers": 20, "main-gpu": 2})
    # auto that fell back to the CPU (no device, no room): no GPU the scheduler did not give.
    assert context_params(opts, lease=None, target=ExecutionTarget.CPU, offload=True)["n_gpu_layers"] == 0
    # No scheduler placed it (a version loaded without one): the model's own settings.
    assert context_params(opts, lease=None, target=ExecutionTarget.AUTO, offload=True) == {
        "n_gpu_layers": 20,
        "main_gpu": 2,
    }
    assert context_params(opts, lease=None, target=ExecutionTarget.AUTO, offload=False)["n_gpu_layers"] == 0


def test_an_engine_on_a_lease_without_offload_says_so_once_and_still_accounts_its_generations(
    tmp_path: Path,
) -> None:
    """This llama.cpp build cannot offload: the leased version's contexts run every layer on the CPU (one
    warning, however many contexts), and its generations still hold the lease's slot and are counted."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the ggml backend) is not installed")
    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama.cpp build offloads to a GPU: the CPU-only case cannot be shown here")
    from ggufkit import make_tiny_llama
    from structlog.testing import capture_logs

    from agent.llm.engine import Job, LlmEngine
    from agent.llm.params import parse_completion
    from agent.llm.settings import LlmSettings

    scheduler = GpuScheduler(devices=[DEVICE], settings=GpuSettings(max_concurrency=1, wait_s=HANG_S))
    lease = scheduler.admit("tiny:1", 1_000, "auto")
    assert lease is not None
    opts = options({"ctx-size": 256, "n-gpu-layers": 8})
    engine = LlmEngine(
        label="tiny:1",
        model_name="tiny",
        model_path=make_tiny_llama(tmp_path / "tiny.gguf"),
        options=opts,
        slots=2,
        on_tokens=lambda _n: None,
        gpu_lease=lease,
        target=ExecutionTarget.AUTO,
    )
    request = parse_completion({"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": 0}, LlmSettings())
    try:
        with capture_logs() as logs:
            # Two at once: two contexts, and the device's one slot makes them take turns.
            futures = [engine.run(Job(request=request, kwargs=request.llama_kwargs(opts))) for _ in range(2)]
            results = [f.result(HANG_S) for f in futures]
        assert all(r is not None and r["choices"][0]["finish_reason"] == "length" for r in results)
        said = [e for e in logs if "no GPU offload" in e["event"]]
        assert len(said) == 1 and said[0]["leased"] == "cuda:0" and said[0]["model"] == "tiny:1"
        made = [e for e in logs if e["event"] == "language model context made"]
        assert made and all(e["gpu_layers"] == 0 for e in made)
        figures = scheduler.snapshot()["models"]["tiny:1"]
        assert figures["calls"] == 2 and figures["gpu_time_s"] > 0
    finally:
        engine.close()


# -- a real agent on a given device ---------------------------------------------------------------------
def gpu_llm_dir(path: Path, name: str, *, gpu_memory_mb: int = 1_000) -> Path:
    """A tiny language model (tests/llmkit.py) whose version asks for a GPU when there is one."""
    llm_model_dir(path, name=name)
    doc = json.loads((path / "model.json").read_text())
    doc["wasi_nn"]["target"] = "auto"
    doc["wasi_nn"]["gpu_memory_mb"] = gpu_memory_mb
    (path / "model.json").write_text(json.dumps(doc, indent=2))
    return path


@pytest.fixture
def gpu_agent(tmp_path: Path) -> Iterator[Callable[..., AgentThread]]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the ggml backend) is not installed")
    running: list[AgentThread] = []

    def factory(models: list[str], env: dict[str, str], devices: list[GpuDevice]) -> AgentThread:
        dirs = [gpu_llm_dir(tmp_path / name, name) for name in models]

        def setup(agent: Any) -> None:
            for model_dir in dirs:
                agent.repository.import_dir(model_dir)
                agent.db.set_active(model_dir.name, "1")
            attach_lifecycle(agent, rollback_grace_s=ROLLBACK_GRACE_S)
            attach_llm(agent)

        config = Config.load(
            env=env,
            overrides={
                "state_dir": tmp_path / "state",
                "listen": "127.0.0.1:0",
                "grpc_listen": "off",
                "log_level": "warning",
                "seed_bundled": False,
            },
        )
        running.append(AgentThread(config, setup, gpu_devices=devices))
        return running[-1]

    yield factory
    for agent in running:
        agent.stop()


def hold_the_device(agent: AgentThread, model: str) -> socket.socket:
    """A long streamed generation of ``model``, read until its first piece: it holds its slot now."""
    body = json.dumps({"model": model, "messages": CHAT, "max_tokens": LONG, "temperature": 0, "stream": True})
    host, port = agent.url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(HANG_S)
    sock.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    data = b""
    while b'"content"' not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the stream ended before its first piece: {data[-500:]!r}"
        data += chunk
    return sock


def short_chat(agent: AgentThread, model: str) -> tuple[int, Any]:
    return http(
        "POST",
        agent.url + "/v1/chat/completions",
        {"model": model, "messages": CHAT, "max_tokens": 3, "temperature": 0},
    )


def gpu_models(agent: AgentThread) -> dict[str, Any]:
    return agent.agent.gpu.snapshot()["models"]


def test_a_generation_holds_its_device_slot_and_another_models_waits_for_it(gpu_agent) -> None:
    env = {"EDGE_AGENT_GPU__MAX_CONCURRENCY": "1", "EDGE_AGENT_GPU__WAIT_S": str(HANG_S)}
    agent = gpu_agent(["tinychat", "otherchat"], env, [DEVICE])
    models = gpu_models(agent)
    assert {k: (v["device"], v["memory_mb"], v["calls"]) for k, v in models.items()} == {
        "tinychat:1": ("cuda:0", 1_000, 0),
        "otherchat:1": ("cuda:0", 1_000, 0),
    }

    sock = hold_the_device(agent, "tinychat")
    assert agent.agent.gpu.snapshot()["devices"][0]["running"] == 1

    reply: dict[str, Any] = {}
    waiter = threading.Thread(target=lambda: reply.update(result=short_chat(agent, "otherchat")))
    waiter.start()
    time.sleep(0.5)  # a chance to run, which it must not take while the one slot is held
    assert "result" not in reply
    assert gpu_models(agent)["otherchat:1"]["calls"] == 0
    assert agent.agent.gpu.snapshot()["devices"][0]["running"] == 1

    sock.close()  # the stream's client leaves: its generation stops, the slot goes to the waiting one
    waiter.join(HANG_S)
    status, body = reply["result"]
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "length"
    models = gpu_models(agent)
    for label in ("tinychat:1", "otherchat:1"):
        assert models[label]["calls"] == 1 and models[label]["gpu_time_s"] > 0, models
    assert agent.agent.gpu.snapshot()["devices"][0]["running"] == 0

    # Each generation is one call more.
    before = gpu_models(agent)["otherchat:1"]
    assert short_chat(agent, "otherchat")[0] == 200
    after = gpu_models(agent)["otherchat:1"]
    assert after["calls"] == before["calls"] + 1 and after["gpu_time_s"] > before["gpu_time_s"]


def test_a_generation_that_cannot_get_a_slot_in_time_is_a_503_gpu_busy(gpu_agent) -> None:
    env = {"EDGE_AGENT_GPU__MAX_CONCURRENCY": "1", "EDGE_AGENT_GPU__WAIT_S": "0.05"}
    agent = gpu_agent(["tinychat", "otherchat"], env, [DEVICE])
    sock = hold_the_device(agent, "tinychat")
    status, body = short_chat(agent, "otherchat")
    assert status == 503, body
    message = body["error"]["message"]
    assert "otherchat:1 waited 0.05s for a slot on cuda:0" in message and "held by tinychat:1" in message
    assert body["error"]["type"] == "server_error"
    assert body["error"]["code"] == "gpu_busy"  # the agent's wire code: retryable, unlike a broken model
    assert gpu_models(agent)["otherchat:1"]["calls"] == 0  # refused: no GPU time
    # Streamed, the head is out before the generation starts: the refusal is the stream's error event.
    host, port = agent.url.split("//")[1].split(":")
    conn = HTTPConnection(host, int(port), timeout=HANG_S)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({"model": "otherchat", "messages": CHAT, "max_tokens": 3, "stream": True}),
        {"Content-Type": "application/json"},
    )
    events = conn.getresponse().read().decode()
    conn.close()
    assert events.startswith("data: ") and "[DONE]" not in events, events
    error = json.loads(events.removeprefix("data: ").strip())["error"]
    assert "otherchat:1 waited 0.05s for a slot on cuda:0" in error["message"]

    sock.close()
    wait_for(lambda: agent.agent.gpu.snapshot()["devices"][0]["running"] == 0, "the stream to give its slot back")
    status, body = short_chat(agent, "otherchat")
    assert status == 200, body
    assert gpu_models(agent)["otherchat:1"]["calls"] == 1


def test_without_a_device_an_auto_version_generates_on_the_cpu_outside_the_scheduler(gpu_agent) -> None:
    agent = gpu_agent(["tinychat"], {}, [])
    assert agent.agent.models.get("tinychat").nn_version.gpu_lease is None
    status, body = short_chat(agent, "tinychat")
    assert status == 200, body
    assert gpu_models(agent) == {}
