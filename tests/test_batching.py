"""Dynamic batching on a real agent: merging, own rows per caller, failures isolated, bounds, config.

Merging is made deterministic without any clock: the batching delay is a
minute, so a batch goes only when the queue reaches its preferred size (or
the version is swapped out), never because time passed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import wasmtime
from conftest import ROLLBACK_GRACE_S, AgentThread, http
from prometheus_client.parser import text_string_to_metric_families

from agent.config import Config
from agent.errors import ConfigError, InvalidModel
from agent.server.batching import parse_batching_config, resolve_batching
from agent.spec import ModelSpec

MAX_BATCH = 16
MINUTE_US = 60_000_000

# y = x * scale for FP32 rows of 4, up to 16 rows. Every element is looked at:
# 13 traps (unreachable) and -1 spins until the deadline, in whichever row of a
# batch it sits, so a bad request merged with good ones fails the whole call.
BATCH_WAT = """
(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (global $scale (mut i32) (i32.const 0))
  (global $ready (mut i32) (i32.const 0))
  (func (export "ea_abi_version") (result i32) (i32.const 1))
  (func (export "ea_max_batch") (result i32) (i32.const MAXB))
  (func (export "ea_alloc") (param $n i32) (result i32)
    (local $p i32) (local $end i32) (local $have i32)
    (local.set $p (i32.and (i32.add (global.get $heap) (i32.const 15)) (i32.const -16)))
    (local.set $end (i32.add (local.get $p) (local.get $n)))
    (local.set $have (i32.mul (memory.size) (i32.const 65536)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq
              (memory.grow (i32.shr_u (i32.add (i32.sub (local.get $end) (local.get $have)) (i32.const 65535))
                                      (i32.const 16)))
              (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap (local.get $end))
    (local.get $p))
  (func (export "ea_init") (param $t i32) (param $c i32) (result i32)
    (if (i32.ne (local.get $c) (i32.const 1)) (then (return (i32.const -2))))
    (if (i32.ne (i32.load offset=4 (local.get $t)) (i32.const 16)) (then (return (i32.const -2))))
    (global.set $scale (i32.load (local.get $t)))
    (global.set $ready (i32.const 1))
    (i32.const 0))
  (func (export "ea_input") (param i32) (result i32)
    (if (result i32) (local.get 0) (then (i32.const 0)) (else (i32.const 1024))))
  (func (export "ea_output") (param i32) (result i32)
    (if (result i32) (local.get 0) (then (i32.const 0)) (else (i32.const 2048))))
  (func (export "ea_run") (param $b i32) (result i32)
    (local $i i32) (local $x f32)
    (if (i32.eqz (global.get $ready)) (then (return (i32.const -5))))
    (if (i32.or (i32.lt_s (local.get $b) (i32.const 1)) (i32.gt_s (local.get $b) (i32.const MAXB)))
      (then (return (i32.const -1))))
    (loop $row
      (local.set $x (f32.load offset=1024 (local.get $i)))
      (if (f32.eq (local.get $x) (f32.const 13)) (then unreachable))
      (if (f32.eq (local.get $x) (f32.const -1)) (then (loop $spin (br $spin))))
      (f32.store offset=2048 (local.get $i)
        (f32.mul (local.get $x)
                 (f32.load (i32.add (global.get $scale) (i32.and (local.get $i) (i32.const 15))))))
      (local.set $i (i32.add (local.get $i) (i32.const 4)))
      (br_if $row (i32.lt_u (local.get $i) (i32.mul (local.get $b) (i32.const 16)))))
    (i32.const 0))
)
"""
SCALE = (1.5, -2.0, 3.25, 0.1)


def make_batch_model(
    directory: Path,
    name: str,
    version: str = "1",
    batching: dict[str, Any] | None = None,
    max_batch: int = MAX_BATCH,
    timeout_ms: int = 200,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    scale = np.asarray(SCALE, dtype=np.float32)
    meta: dict[str, Any] = {
        "schema": "edge-agent.model/v1",
        "name": name,
        "version": version,
        "abi_version": 1,
        "max_batch": max_batch,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
        "params": [{"name": "scale", "datatype": "FP32", "shape": [4]}],
        "warmup": {"inputs": {"x": {"shape": [1, 4], "data": [1.0, 1.0, 1.0, 1.0]}}},
        "resources": {"memory_limit_mb": 4, "timeout_ms": timeout_ms},
    }
    if batching is not None:
        meta["dynamic_batching"] = batching
    (directory / "model.json").write_text(json.dumps(meta))
    (directory / "model.wasm").write_bytes(wasmtime.wat2wasm(BATCH_WAT.replace("MAXB", str(max_batch))))
    safetensors.numpy.save_file({"scale": scale}, str(directory / "weights.safetensors"))
    return directory


@pytest.fixture
def batch_agent(tmp_path: Path):
    """Factory: batch_agent(models={name: batching or None}, toml="", **config) -> AgentThread."""
    agents: list[AgentThread] = []

    def factory(models: dict[str, dict[str, Any] | None], toml: str = "", **overrides: Any) -> AgentThread:
        path = tmp_path / "config.toml"
        path.write_text(toml)
        values = {"state_dir": tmp_path / "state", "listen": "127.0.0.1:0", "log_level": "warning"}
        values.update({"seed_bundled": False, "worker_threads": 8, **overrides})
        config = Config.load(file=path, env={}, overrides=values)

        def setup(agent: Any) -> None:
            for name, batching in models.items():
                agent.repository.import_dir(make_batch_model(tmp_path / name, name, batching=batching))
                agent.db.set_active(name, "1")

        from agent.wiring import attach_lifecycle

        def setup_all(agent: Any) -> None:
            setup(agent)
            attach_lifecycle(agent, rollback_grace_s=ROLLBACK_GRACE_S)

        thread = AgentThread(config, setup_all)
        agents.append(thread)
        return thread

    yield factory
    for agent in agents:
        agent.stop()


def request(rows: np.ndarray) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(rows.shape), "data": rows.ravel().tolist()}]}


def infer(agent: AgentThread, model: str, rows: np.ndarray) -> tuple[int, Any]:
    return http("POST", f"{agent.url}/v2/models/{model}/infer", request(rows))


def concurrently(calls: list[Any]) -> list[Any]:
    """Run each zero-argument call on its own thread; results in order."""
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def metric(agent: AgentThread, sample_name: str, **labels: str) -> float | None:
    _, text = http("GET", agent.url + "/metrics")
    text = text.decode() if isinstance(text, bytes) else str(text)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    """A hang guard, not a speed check."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.01)


def deterministic(preferred: int, **extra: Any) -> dict[str, Any]:
    return {"max_queue_delay_us": MINUTE_US, "preferred_batch_sizes": [preferred], **extra}


def rows_of(seed: int, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)


# -- merging -----------------------------------------------------------------------------------------
def test_concurrent_requests_merge_and_each_caller_gets_exactly_its_unbatched_answer(batch_agent):
    # "plain" is the same module and weights without batching: the unbatched reference.
    agent = batch_agent({"batchy": deterministic(4), "plain": None})
    inputs = [rows_of(i) for i in range(12)]  # in whatever order they arrive: three batches of 4
    batched = concurrently([lambda x=x: infer(agent, "batchy", x) for x in inputs])
    plain = [infer(agent, "plain", x) for x in inputs]
    for x, (status, body), (pstatus, pbody) in zip(inputs, batched, plain, strict=True):
        assert status == 200, body
        assert pstatus == 200, pbody
        assert body["outputs"][0]["shape"] == [x.shape[0], 4]
        assert body["outputs"] == pbody["outputs"]  # bit for bit: the same JSON numbers
        want = (x * np.asarray(SCALE, dtype=np.float32)).ravel()
        assert np.array_equal(np.asarray(body["outputs"][0]["data"], dtype=np.float32), want)
    labels = {"model": "batchy", "version": "1"}
    # Every call ran a preferred batch of 4 rows; none ran fewer.
    assert metric(agent, "edge_agent_batch_size_count", **labels) == 3
    assert metric(agent, "edge_agent_batch_size_sum", **labels) == 12
    assert metric(agent, "edge_agent_batch_size_bucket", le="2.0", **labels) == 0
    assert metric(agent, "edge_agent_batch_size_bucket", le="4.0", **labels) == 3
    assert metric(agent, "edge_agent_batched_calls_total", **labels) == 3
    assert metric(agent, "edge_agent_batch_queue_depth", **labels) == 0
    assert metric(agent, "edge_agent_inference_requests_total", **labels) == len(inputs)
    # Off by default: the model without dynamic_batching made no batched call.
    assert metric(agent, "edge_agent_batched_calls_total", model="plain", version="1") is None
    assert agent.agent.models.get("batchy").inflight == 0


def test_requests_of_several_rows_are_merged_and_split_back(batch_agent):
    agent = batch_agent({"batchy": deterministic(6)})
    inputs = [rows_of(10 + n, n) for n in (1, 2, 3)]  # any order: 6 rows only once all three queued
    results = concurrently([lambda x=x: infer(agent, "batchy", x) for x in inputs])
    for x, (status, body) in zip(inputs, results, strict=True):
        assert status == 200, body
        assert body["outputs"][0]["shape"] == [x.shape[0], 4]
        want = (x * np.asarray(SCALE, dtype=np.float32)).ravel()
        assert np.array_equal(np.asarray(body["outputs"][0]["data"], dtype=np.float32), want)
    assert metric(agent, "edge_agent_batch_size_count", model="batchy", version="1") == 1
    assert metric(agent, "edge_agent_batch_size_sum", model="batchy", version="1") == 6


def test_a_request_above_max_batch_runs_alone(batch_agent):
    agent = batch_agent({"batchy": deterministic(MAX_BATCH)})
    x = rows_of(7, MAX_BATCH + 4)
    status, body = infer(agent, "batchy", x)
    assert status == 200, body
    want = (x * np.asarray(SCALE, dtype=np.float32)).ravel()
    assert np.array_equal(np.asarray(body["outputs"][0]["data"], dtype=np.float32), want)
    assert metric(agent, "edge_agent_batch_size_sum", model="batchy", version="1") == MAX_BATCH + 4


# -- failures stay with their request ------------------------------------------------------------
@pytest.mark.parametrize(("bad", "status", "kind"), [(13.0, 500, "trap"), (-1.0, 504, "timeout")])
def test_a_failing_request_in_a_batch_fails_alone(batch_agent, bad, status, kind):
    agent = batch_agent({"batchy": deterministic(4)})
    good = [rows_of(i) for i in range(3)]
    poison = np.full((1, 4), bad, dtype=np.float32)
    results = concurrently([lambda x=x: infer(agent, "batchy", x) for x in [*good, poison]])
    for x, (code, body) in zip(good, results[:3], strict=True):
        assert code == 200, body
        want = (x * np.asarray(SCALE, dtype=np.float32)).ravel()
        assert np.array_equal(np.asarray(body["outputs"][0]["data"], dtype=np.float32), want)
    code, body = results[3]
    assert code == status, body
    labels = {"model": "batchy", "version": "1"}
    assert metric(agent, "edge_agent_inference_errors_total", kind=kind, **labels) == 1
    assert metric(agent, "edge_agent_inference_requests_total", **labels) == 3
    assert metric(agent, "edge_agent_batch_size_count", **labels) == 1  # the merged call; re-runs are apart
    assert agent.agent.models.get("batchy").inflight == 0


def test_a_cancelled_request_leaves_the_queue_and_the_others_are_answered(batch_agent):
    agent = batch_agent({"batchy": deterministic(3)})
    core = agent.agent.inference
    loaded = agent.agent.models.get("batchy")

    async def scenario() -> tuple[list[Any], bool]:
        def submit(seed: int) -> Any:
            arrays, batch = loaded.prepare({"x": rows_of(seed)})
            return core.infer(loaded, arrays, batch)

        a, b, c = submit(1), submit(2), submit(3)
        c.cancel()  # the caller went away while its request waited
        await asyncio.sleep(0)
        queued = len(loaded.batcher.queue) if loaded.batcher else -1
        d = submit(4)  # with a and b: the preferred 3
        results = await asyncio.gather(a, b, d)
        return [queued, *results], c.cancelled()

    # Three queued: a, b, c would have made the batch; c's cancellation must not let it go.
    (queued, *outputs), cancelled = agent.call(scenario())
    assert cancelled
    assert queued == 2
    for seed, out in zip([1, 2, 4], outputs, strict=True):
        assert np.array_equal(out[0], rows_of(seed) * np.asarray(SCALE, dtype=np.float32))
    assert metric(agent, "edge_agent_batch_size_sum", model="batchy", version="1") == 3
    assert loaded.inflight == 0


def test_a_client_that_hangs_up_does_not_disturb_its_batch(batch_agent):
    agent = batch_agent({"batchy": deterministic(4)})
    host, port = agent.agent.address
    body = json.dumps(request(rows_of(99))).encode()
    with socket.create_connection((host, port)) as sock:
        sock.sendall(
            b"POST /v2/models/batchy/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_for(lambda: metric(agent, "edge_agent_batch_queue_depth", model="batchy", version="1") == 1, "queued")
    good = [rows_of(i) for i in range(3)]
    results = concurrently([lambda x=x: infer(agent, "batchy", x) for x in good])
    for x, (code, resp) in zip(good, results, strict=True):
        assert code == 200, resp
        want = (x * np.asarray(SCALE, dtype=np.float32)).ravel()
        assert np.array_equal(np.asarray(resp["outputs"][0]["data"], dtype=np.float32), want)


# -- bounds and the version's lifetime ---------------------------------------------------------------
def test_a_full_queue_refuses_with_503_and_a_hot_swap_answers_what_was_queued(batch_agent, tmp_path):
    agent = batch_agent({"batchy": deterministic(4, max_queue_size=2)})
    agent.agent.repository.import_dir(make_batch_model(tmp_path / "batchy-2", "batchy", version="2"))
    waiting = [rows_of(1), rows_of(2)]
    results: list[Any] = []
    threads = [threading.Thread(target=lambda x=x: results.append(infer(agent, "batchy", x))) for x in waiting]
    for t in threads:
        t.start()
    wait_for(lambda: metric(agent, "edge_agent_batch_queue_depth", model="batchy", version="1") == 2, "2 queued")
    status, body = infer(agent, "batchy", rows_of(3))
    assert status == 503, body
    assert "queue is full" in body["error"]
    # Swapping versions sends version 1's queue at once: nothing is dropped, nothing waits a minute.
    agent.call(agent.lifecycle.deploy("store:batchy:2"))
    for t in threads:
        t.join(60)
    assert sorted(code for code, _ in results) == [200, 200]
    assert {body["model_version"] for _, body in results} == {"1"}
    status, body = infer(agent, "batchy", rows_of(3))
    assert status == 200 and body["model_version"] == "2", body


# -- configuration -----------------------------------------------------------------------------------
def test_the_agent_config_turns_batching_on_and_off_per_model(batch_agent):
    toml = """
[batching.plain]
max_queue_delay_us = 60000000
preferred_batch_sizes = [2]

[batching.batchy]
enabled = false
"""
    agent = batch_agent({"batchy": deterministic(4), "plain": None}, toml=toml)
    results = concurrently([lambda s=s: infer(agent, "plain", rows_of(s)) for s in range(4)])
    assert [code for code, _ in results] == [200] * 4
    assert metric(agent, "edge_agent_batch_size_count", model="plain", version="1") == 2
    status, body = infer(agent, "batchy", rows_of(5))  # would wait for 3 more if batching were on
    assert status == 200, body
    assert metric(agent, "edge_agent_batched_calls_total", model="batchy", version="1") is None


def test_config_and_model_json_are_validated():
    parse_batching_config({"m": {"max_queue_delay_us": 100, "preferred_batch_sizes": [4, 8], "max_queue_size": 9}})
    assert parse_batching_config({"m": "on"})["m"].enabled
    assert not parse_batching_config({"m": "off"})["m"].enabled
    env = Config.load(env={"EDGE_AGENT_BATCHING__DIGITS": "on"}, overrides={"state_dir": "/tmp/x"})
    assert parse_batching_config(env.section("batching"))["digits"].enabled
    for bad in (
        {"m": {"max_queue_delay": 5}},
        {"m": {"max_queue_delay_us": -1}},
        {"m": {"max_queue_delay_us": 10**9}},
        {"m": {"preferred_batch_sizes": [0]}},
        {"m": {"preferred_batch_sizes": [4, 4]}},
        {"m": {"max_queue_size": 0}},
        {"m": {"enabled": "perhaps"}},
        {"m": "maybe"},
    ):
        with pytest.raises(ConfigError):
            parse_batching_config(bad)

    def spec(max_batch: int, batching: Any) -> dict[str, Any]:
        return {
            "schema": "edge-agent.model/v1",
            "name": "m",
            "version": "1",
            "abi_version": 1,
            "max_batch": max_batch,
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
            "warmup": {"inputs": {"x": {"shape": [1, 4], "data": [1, 1, 1, 1]}}},
            "dynamic_batching": batching,
        }

    parsed = ModelSpec.from_dict(spec(8, {"preferred_batch_sizes": [8, 2]}))
    assert parsed.dynamic_batching is not None and parsed.dynamic_batching.preferred_batch_sizes == (2, 8)
    assert ModelSpec.from_dict(spec(8, None)).dynamic_batching is None
    for max_batch, batching, words in (
        (1, {}, "max_batch above 1"),
        (8, {"preferred_batch_sizes": [16]}, "must not exceed max_batch"),
        (8, {"max_queue_delay": 1}, "unknown key"),
        (8, [], "must be an object"),
    ):
        with pytest.raises(InvalidModel, match=words):
            ModelSpec.from_dict(spec(max_batch, batching))
    # The agent's table cannot turn batching on for a model of max_batch 1, nor pass its max_batch.
    one = ModelSpec.from_dict(spec(1, None))
    with pytest.raises(ValueError, match="cannot batch"):
        resolve_batching(one, parse_batching_config({"m": "on"})["m"])
    with pytest.raises(ValueError, match="max_batch"):
        resolve_batching(parsed, parse_batching_config({"m": {"preferred_batch_sizes": [32]}})["m"])


def test_a_bad_batching_table_stops_the_agent(tmp_path):
    from agent.daemon import Agent

    path = tmp_path / "config.toml"
    path.write_text("[batching.digits]\nmax_queue_size = 0\n")
    config = Config.load(file=path, env={}, overrides={"state_dir": tmp_path / "state"})
    with pytest.raises(ConfigError, match="max_queue_size"):
        Agent(config)


def test_a_table_for_a_model_that_cannot_batch_leaves_it_serving_unbatched(batch_agent, tmp_path):
    agent = batch_agent({}, toml="[batching.single]\nenabled = true\n")
    agent.agent.repository.import_dir(make_batch_model(tmp_path / "single", "single", max_batch=1))
    agent.call(agent.lifecycle.deploy("store:single:1"))
    status, body = infer(agent, "single", rows_of(1))
    assert status == 200, body
    assert metric(agent, "edge_agent_batched_calls_total", model="single", version="1") is None


def test_stopping_the_agent_answers_what_is_queued(batch_agent):
    agent = batch_agent({"batchy": deterministic(4)})
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(infer(agent, "batchy", rows_of(1))))
    thread.start()
    wait_for(lambda: metric(agent, "edge_agent_batch_queue_depth", model="batchy", version="1") == 1, "queued")
    agent.stop()  # SIGTERM's path: the queue goes at once, within the drain
    thread.join(60)
    [(status, body)] = results
    assert status == 200, body
    want = (rows_of(1) * np.asarray(SCALE, dtype=np.float32)).ravel()
    assert np.array_equal(np.asarray(body["outputs"][0]["data"], dtype=np.float32), want)


def test_the_bundled_digits_batches_through_the_config_and_answers_as_unbatched(batch_agent):
    toml = "[batching.digits]\nmax_queue_delay_us = 60000000\npreferred_batch_sizes = [5]\n"
    agent = batch_agent({}, toml=toml, seed_bundled=True)
    inputs = [np.random.default_rng(s).random((n, 64), dtype=np.float32) * 16 for s, n in enumerate([1, 3, 1])]

    def ask(x: np.ndarray) -> tuple[int, Any]:
        body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
        return http("POST", agent.url + "/v2/models/digits/infer", body)

    results = concurrently([lambda x=x: ask(x) for x in inputs])
    loaded = agent.agent.models.get("digits")
    for x, (status, body) in zip(inputs, results, strict=True):
        assert status == 200, body
        alone = loaded.infer({"pixels": x})  # the pool directly: one unbatched call
        outputs = {o["name"]: o for o in body["outputs"]}
        assert outputs["label"]["shape"] == [x.shape[0]]
        assert outputs["label"]["data"] == alone["label"].tolist()
        got = np.asarray(outputs["probabilities"]["data"], dtype=np.float32).reshape(x.shape[0], 10)
        assert np.array_equal(got, alone["probabilities"])
    assert metric(agent, "edge_agent_batch_size_sum", model="digits", version="1") == 5


def test_a_request_alone_goes_when_its_delay_expires(batch_agent):
    agent = batch_agent({"batchy": {"max_queue_delay_us": 1000}})  # no preferred size: max_batch or the delay
    status, body = infer(agent, "batchy", rows_of(3))
    assert status == 200, body
    assert metric(agent, "edge_agent_batch_size_sum", model="batchy", version="1") == 1


def test_stopping_the_agent_answers_a_grpc_request_queued_for_batching(make_agent, tmp_path):
    """The gRPC API stops (draining its calls) before the REST one: the batching queues must go at
    once from the start of the stop, not after the gRPC drain gave up on a call waiting its delay."""
    import grpc

    from agent.server.proto import inference_pb2 as pb
    from agent.server.proto import inference_pb2_grpc as pb_grpc
    from agent.wiring import attach_grpc, attach_lifecycle

    def setup(agent: Any) -> None:
        agent.repository.import_dir(make_batch_model(tmp_path / "batchy", "batchy", batching=deterministic(4)))
        agent.db.set_active("batchy", "1")
        attach_lifecycle(agent, rollback_grace_s=ROLLBACK_GRACE_S)
        attach_grpc(agent)

    agent = make_agent(setup=setup, seed_bundled=False, drain_timeout_s=0.5)
    host, port = agent.agent.grpc.address
    rows = rows_of(3)
    request = pb.ModelInferRequest(model_name="batchy")
    tensor = request.inputs.add(name="x", datatype="FP32")
    tensor.shape.extend(rows.shape)
    request.raw_input_contents.append(rows.tobytes())
    results: list[Any] = []

    def call() -> None:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            try:
                results.append(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120))
            except grpc.RpcError as exc:
                results.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    wait_for(lambda: metric(agent, "edge_agent_batch_queue_depth", model="batchy", version="1") == 1, "queued")
    agent.stop()
    thread.join(120)
    [response] = results
    assert isinstance(response, pb.ModelInferResponse), response
    got = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
    assert np.array_equal(got, (rows * np.asarray(SCALE, dtype=np.float32)).ravel())
