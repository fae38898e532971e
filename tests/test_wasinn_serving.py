"""WASI-NN apps served like any other model: an ONNX model behind a reactor app (tests/wasinn_wat.py),
imported, deployed, inferred over REST and gRPC, swapped, rolled back, restarted, refused where the
node has no backend for it; each instance's WASI-NN host closed with the instance."""

from __future__ import annotations

import json
import threading
import time
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import wasmtime
from conftest import ROLLBACK_GRACE_S, AgentThread, control_headers, http
from wasinn_wat import Io, linear_model_dir, linear_onnx, reactor_wasm, write_nn_model_dir

from agent.config import Config, WasiNnSettings
from agent.errors import AgentError, ConfigError, InvalidModel
from agent.runtime import WasmRuntime
from agent.server.proto import inference_pb2 as pb
from agent.server.proto import inference_pb2_grpc as pb_grpc
from agent.telemetry.snapshot import build_snapshot
from agent.wasinn.backend import KNOWN_BACKENDS
from agent.wiring import attach_grpc, attach_lifecycle

KNOWN = tuple(info.name for info in KNOWN_BACKENDS)
X = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)


def reference(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """What onnxruntime itself answers for the model."""
    out: np.ndarray = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return out


def x_request(x: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}


def rest_infer(agent: AgentThread, x: np.ndarray, model: str = "nnlin") -> tuple[str, np.ndarray]:
    status, body = http("POST", f"{agent.url}/v2/models/{model}/infer", x_request(x))
    assert status == 200, body
    out = body["outputs"][0]
    return body["model_version"], np.array(out["data"], dtype=np.float32).reshape(out["shape"])


class Agents:
    """In-process agents with a config of the test's own (env: the [wasi_nn] section), stopped at teardown."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.running: list[AgentThread] = []

    def start(self, setup: Any = None, env: dict[str, str] | None = None, **overrides: Any) -> AgentThread:
        values: dict[str, Any] = {
            "state_dir": self.tmp_path / "state",
            "listen": "127.0.0.1:0",
            "grpc_listen": "127.0.0.1:0",
            "log_level": "warning",
        }
        values.update(overrides)
        agent = AgentThread(Config.load(env=env or {}, overrides=values), setup)
        self.running.append(agent)
        return agent

    def stop_all(self) -> None:
        for agent in self.running:
            agent.stop()


@pytest.fixture
def agents(tmp_path: Path):
    made = Agents(tmp_path)
    yield made
    made.stop_all()


@pytest.fixture
def nn_models(tmp_path: Path) -> dict[str, tuple[Path, bytes]]:
    """nnlin:1 and nnlin:2: two linear ONNX models (other weights) behind the same reactor app."""
    return {
        "1": linear_model_dir(tmp_path / "nnlin-1", version="1", seed=1),
        "2": linear_model_dir(tmp_path / "nnlin-2", version="2", seed=2),
    }


def importer(nn_models: dict[str, tuple[Path, bytes]], active: str | None = "1", grpc_api: bool = False) -> Any:
    def setup(agent: Any) -> None:
        for path, _ in nn_models.values():
            agent.repository.import_dir(path)
        if active is not None:
            agent.db.set_active("nnlin", active)
        attach_lifecycle(agent, rollback_grace_s=ROLLBACK_GRACE_S)
        if grpc_api:
            attach_grpc(agent)

    return setup


def loaded(agent: AgentThread, version: str) -> Any:
    return agent.agent.models.get("nnlin", version)


# -- serving ---------------------------------------------------------------------------------------
def test_rest_and_grpc_answer_what_onnxruntime_answers(agents, nn_models):
    agent = agents.start(importer(nn_models, grpc_api=True))
    want = reference(nn_models["1"][1], X)

    version, got = rest_infer(agent, X)
    assert version == "1"
    assert np.array_equal(got, want)
    # One row, and a batch above max_batch (8): split into chunks by the pool, joined.
    big = np.random.default_rng(3).standard_normal((19, 4)).astype(np.float32)
    assert np.array_equal(rest_infer(agent, X[:1])[1], want[:1])
    assert np.array_equal(rest_infer(agent, big)[1], reference(nn_models["1"][1], big))

    host, port = agent.agent.grpc.address
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="nnlin")
        tensor = request.inputs.add(name="x", datatype="FP32")
        tensor.shape.extend(X.shape)
        request.raw_input_contents.append(X.tobytes())
        response = stub.ModelInfer(request, timeout=60)
        out = response.outputs[0]
        assert (out.name, out.datatype, list(out.shape)) == ("y", "FP32", [3, 3])
        assert np.array_equal(np.frombuffer(response.raw_output_contents[0], dtype=np.float32).reshape(3, 3), want)
        # gRPC's ServerMetadataResponse has no field for the backend list: its extensions name WASI-NN.
        assert "wasi_nn" in stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=60).extensions

    # The bundled digits model serves beside it.
    status, body = http("GET", agent.url + "/v2/models/digits/ready")
    assert status == 200, body


def test_server_metadata_and_telemetry_list_the_backends(agents, nn_models):
    agent = agents.start(importer(nn_models))
    status, meta = http("GET", agent.url + "/v2")
    assert status == 200
    assert "wasi_nn" in meta["extensions"]
    names = [b["name"] for b in meta["wasi_nn_backends"]]
    assert "onnxruntime" in names
    onnx = next(b for b in meta["wasi_nn_backends"] if b["name"] == "onnxruntime")
    # Imported by the version it serves: its version and devices are known.
    assert onnx["encoding"] == "onnx" and onnx["version"] == ort.__version__ and "cpu" in onnx["devices"]

    snap = build_snapshot({}, started=0.0, now=1.0, wasi_nn=agent.agent.nn_backends.describe())
    assert snap["wasi_nn_backends"] == meta["wasi_nn_backends"]


def test_a_node_with_no_backends_lists_none(agents):
    agent = agents.start(env={"EDGE_AGENT_WASI_NN__BACKENDS": ""})
    status, meta = http("GET", agent.url + "/v2")
    assert status == 200
    assert "wasi_nn" not in meta["extensions"] and "wasi_nn_backends" not in meta


# -- lifecycle -------------------------------------------------------------------------------------
def test_hot_swaps_under_load_lose_no_request_and_mix_no_versions(agents, nn_models):
    agent = agents.start(importer(nn_models), worker_threads=8)
    want = {v: reference(onnx, X[:1]) for v, (_, onnx) in nn_models.items()}
    body = json.dumps(x_request(X[:1])).encode()
    stop = threading.Event()
    answers: list[tuple[str, np.ndarray]] = []
    failures: list[object] = []
    lock = threading.Lock()

    def client() -> None:
        host, port = agent.url[7:].split(":")
        conn = HTTPConnection(host, int(port), timeout=60)
        while not stop.is_set():
            try:
                conn.request("POST", "/v2/models/nnlin/infer", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                payload = json.loads(resp.read())
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and fails the test
                failures.append(repr(exc))
                conn.close()
                conn = HTTPConnection(host, int(port), timeout=60)
                continue
            if resp.status != 200:
                failures.append((resp.status, payload))
                continue
            out = payload["outputs"][0]
            with lock:
                answers.append(
                    (payload["model_version"], np.array(out["data"], dtype=np.float32).reshape(out["shape"]))
                )

    def wait_for_answers(n: int) -> None:
        deadline = time.monotonic() + 60  # hang guard only
        while len(answers) < n and not failures and time.monotonic() < deadline:
            time.sleep(0.002)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        for i in range(10):
            wait_for_answers(len(answers) + len(threads) + 1)  # one at least picked the version routed now
            agent.call(agent.lifecycle.deploy(f"store:nnlin:{'2' if i % 2 == 0 else '1'}"))
        wait_for_answers(len(answers) + len(threads) + 1)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not failures, failures[:5]
    assert len(answers) >= 77
    for version, got in answers:
        assert np.array_equal(got, want[version]), version
    assert {v for v, _ in answers} == {"1", "2"}


def test_rollback_pin_unload_and_load_again(agents, nn_models):
    agent = agents.start(importer(nn_models))
    lifecycle = agent.lifecycle
    agent.call(lifecycle.deploy("store:nnlin:2"))
    assert rest_infer(agent, X)[0] == "2"
    agent.call(lifecycle.rollback("nnlin"))
    version, got = rest_infer(agent, X)
    assert version == "1" and np.array_equal(got, reference(nn_models["1"][1], X))

    agent.call(lifecycle.pin("nnlin"))
    with pytest.raises(AgentError, match="pinned"):
        agent.call(lifecycle.deploy("store:nnlin:2"))
    agent.call(lifecycle.pin("nnlin", False))

    v1 = loaded(agent, "1")
    agent.call(lifecycle.unload("nnlin"))
    status, _ = http("POST", agent.url + "/v2/models/nnlin/infer", x_request(X))
    assert status == 404
    wait_until(lambda: v1.nn_version.open_hosts == 0, "the unloaded version's hosts closed")

    status, body = http(
        "POST",
        agent.url + "/v2/repository/models/nnlin/load",
        {},
        headers=control_headers(agent.agent.config.state_dir),
    )
    assert status == 200, body
    version, got = rest_infer(agent, X)
    assert np.array_equal(got, reference(nn_models[version][1], X))


def test_a_restarted_agent_serves_it_from_the_store(agents, nn_models, tmp_path):
    first = agents.start(importer(nn_models))
    first.call(first.lifecycle.deploy("store:nnlin:2"))
    first.stop()
    # The model directories are gone: the store is all the second agent has.
    for path, _ in nn_models.values():
        for f in path.iterdir():
            f.unlink()
    second = agents.start()
    version, got = rest_infer(second, X)
    assert version == "2" and np.array_equal(got, reference(nn_models["2"][1], X))


# -- refusals --------------------------------------------------------------------------------------
def test_a_node_without_the_backend_refuses_the_version_and_serves_the_others(agents, nn_models):
    # The version was active when the node lost its backend: at start it is marked broken, clearly.
    agents.start(importer(nn_models)).stop()
    agent = agents.start(env={"EDGE_AGENT_WASI_NN__BACKENDS": "torchscript"})
    status, body = http("POST", agent.url + "/v2/models/nnlin/infer", x_request(X))
    assert status == 503, body
    assert "no backend for encoding onnx" in body["error"]
    assert "WASI-NN backends here: torchscript" in body["error"]
    nnlin = next(m for m in agent.agent.status()["models"] if m["name"] == "nnlin")
    assert nnlin["status"] == "broken" and "onnx" in nnlin["error"]

    # A deploy is refused with the same reason; digits keeps serving.
    with pytest.raises(AgentError, match="no backend for encoding onnx"):
        agent.call(agent.lifecycle.deploy("store:nnlin:2"))
    pixels = np.zeros((1, 64), dtype=np.float32)
    request = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": pixels.ravel().tolist()}]}
    status, body = http("POST", agent.url + "/v2/models/digits/infer", request)
    assert status == 200, body


def test_a_model_file_the_backend_refuses_fails_the_load_with_its_reason(agents, tmp_path):
    from onnx import TensorProto, helper

    # Valid ONNX protobuf, an operator no runtime knows: the format sniff passes, onnxruntime refuses.
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="org.example.nosuch")],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("org.example.nosuch", 1)]
    )
    path = write_nn_model_dir(
        tmp_path / "bad",
        name="nnbad",
        version="1",
        weights=model.SerializeToString(),
        inputs=[Io("x", "FP32", (4,))],
        outputs=[Io("y", "FP32", (3,))],
    )
    agent = agents.start(lambda a: a.repository.import_dir(path))
    with pytest.raises(
        AgentError, match=r"ea_init failed .*; wasi-nn load_by_name: onnxruntime cannot load the model.*NoSuchOp"
    ):
        agent.call(agent.lifecycle.deploy("store:nnbad:1"))
    status, _ = http("GET", agent.url + "/v2/models/digits/ready")
    assert status == 200


COMMAND_WAT = """
(module
  (import "wasi_ephemeral_nn" "load_by_name" (func $load_by_name (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")))
"""


def test_a_command_app_is_compiled_and_kept_not_instantiated(agents, nn_models, tmp_path):
    _, onnx_bytes = nn_models["1"]
    path = write_nn_model_dir(
        tmp_path / "cmd",
        name="nncmd",
        version="1",
        weights=onnx_bytes,
        inputs=[Io("x", "FP32", (4,))],
        outputs=[Io("y", "FP32", (3,))],
        wasm=bytes(wasmtime.wat2wasm(COMMAND_WAT)),
        wasi_nn={"encoding": "onnx", "app": "command"},
    )
    agent = agents.start(lambda a: a.repository.import_dir(path))
    agent.call(agent.lifecycle.deploy("store:nncmd:1"))
    lm = agent.agent.models.get("nncmd", "1")
    # What the command path uses: the compiled module, the named models, the weights file.
    assert isinstance(lm.module, wasmtime.Module)
    assert lm.nn is not None and set(lm.nn.models) == {"default"}
    assert lm.weights_path is not None and lm.weights_path.read_bytes() == onnx_bytes
    assert lm.pool.live == 0 and lm.nn_version.open_hosts == 0 and not lm.pool.abi
    status, body = http("POST", agent.url + "/v2/models/nncmd/infer", x_request(X))
    assert status == 500 and "command app" in body["error"], body


def test_only_a_wasi_nn_model_may_import_wasi_nn(tmp_path):
    wasm = reactor_wasm([Io("x", "FP32", (4,))], [Io("y", "FP32", (3,))], max_batch=8)
    runtime = WasmRuntime(None)
    try:
        with pytest.raises(InvalidModel, match=r"wasi_ephemeral_nn.*only a WASI-NN model"):
            runtime.compile(wasm)
        module = runtime.compile(wasm, allow_nn=True)
        # Nor can a pure-wasm version reach it through the shared linker (a module cached by a WASI-NN one).
        with pytest.raises(wasmtime.WasmtimeError):
            runtime.instantiate(wasmtime.Store(runtime.engine), module)
    finally:
        runtime.close()


# -- hosts live and die with their instances ---------------------------------------------------------
def wait_until(check: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout  # hang guard only
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.01)


def test_hosts_close_with_their_instances_reaped_evicted_swapped(agents, nn_models):
    agent = agents.start(importer(nn_models), pool_size=3, eager_instances=True, instance_idle_s=0)
    v1 = loaded(agent, "1")
    assert v1.pool.live == 3 and v1.nn_version.open_hosts == 3
    # The reaper: idle instances go, each pool's last one stays (a scan with a zero idle time).
    agent.agent.reaper.idle_s = 0.0
    assert agent.call(agent.agent.reaper.reap_now()) >= 2  # digits has idle instances too
    assert v1.pool.live == 1 and v1.nn_version.open_hosts == 1

    # Eviction: a node bound of 3 instances, v2 eager for 3: it takes v1's last idle one.
    agent.agent.models.budget.limit = 3
    agent.call(agent.lifecycle.deploy("store:nnlin:2"))
    v2 = loaded(agent, "2")
    assert v2.nn_version.open_hosts == v2.pool.live
    assert v1.pool.live + v2.pool.live <= 3 and agent.agent.models.budget.evicted >= 1
    assert v1.nn_version.open_hosts == v1.pool.live

    # The swapped-out version, once its rollback grace is over, closes its last host and its graphs.
    wait_until(lambda: v1.nn_version.open_hosts == 0, "v1's hosts closed after the swap")
    assert rest_infer(agent, X)[0] == "2"
    agent.stop()
    assert v2.nn_version.open_hosts == 0


def test_a_failed_call_replaces_the_instance_and_closes_its_host(agents, tmp_path):
    # max_batch 4 in model.json and the app; the ONNX model refuses any batch but 1 (a fixed batch dimension).
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "B"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(np.ones(4, dtype=np.float32), "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = write_nn_model_dir(
        tmp_path / "fixed",
        name="nnfixed",
        version="1",
        weights=model.SerializeToString(),
        inputs=[Io("x", "FP32", (4,))],
        outputs=[Io("y", "FP32", (4,))],
        max_batch=4,
    )

    def setup(a: Any) -> None:
        a.repository.import_dir(path)
        a.db.set_active("nnfixed", "1")

    agent = agents.start(setup)
    lm = agent.agent.models.get("nnfixed", "1")
    status, body = http("POST", agent.url + "/v2/models/nnfixed/infer", x_request(np.zeros((2, 4), np.float32)))
    assert status == 500, body
    # The host's reason reaches the error: onnxruntime's own complaint about the shape.
    assert "ea_run returned -6" in body["error"] and "wasi-nn compute: onnxruntime" in body["error"]
    wait_until(lambda: lm.pool.replaced == 1 and lm.pool.idle == 1, "the failed instance replaced")
    assert lm.nn_version.open_hosts == lm.pool.live == 1
    status, body = http("POST", agent.url + "/v2/models/nnfixed/infer", x_request(np.zeros((1, 4), np.float32)))
    assert status == 200 and body["outputs"][0]["data"] == [1.0] * 4


# -- config ----------------------------------------------------------------------------------------
def test_wasi_nn_config_from_toml_and_env(tmp_path):
    toml = tmp_path / "config.toml"
    toml.write_text(
        '[wasi_nn]\nbackends = ["onnxruntime", "llama.cpp"]\n'
        "[wasi_nn.onnxruntime]\nintra_op_threads = 2\n"
        '[wasi_nn."llama.cpp"]\nn_gpu_layers = 0\n'
    )
    config = Config.load(file=toml, env={}, overrides={"state_dir": tmp_path / "s"})
    settings = WasiNnSettings.from_config(config, KNOWN)
    assert settings.backends == ("onnxruntime", "llama.cpp")
    assert settings.options == {"onnxruntime": {"intra_op_threads": 2}, "llama.cpp": {"n_gpu_layers": 0}}

    env = {
        "EDGE_AGENT_WASI_NN__BACKENDS": "onnxruntime, llama_cpp",
        "EDGE_AGENT_WASI_NN__ONNXRUNTIME__INTRA_OP_THREADS": "3",
    }
    settings = WasiNnSettings.from_config(Config.load(env=env, overrides={"state_dir": tmp_path / "s"}), KNOWN)
    assert settings.backends == ("onnxruntime", "llama.cpp")
    assert settings.options == {"onnxruntime": {"intra_op_threads": "3"}}

    default = WasiNnSettings.from_config(Config.load(env={}, overrides={"state_dir": tmp_path / "s"}), KNOWN)
    assert default.backends is None and default.options == {}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EDGE_AGENT_WASI_NN__BACKENDS": "onnxruntime,tensorflow"}, "unknown backend 'tensorflow'"),
        ({"EDGE_AGENT_WASI_NN__OPENVINO__THREADS": "1"}, "unknown wasi_nn setting"),
        ({"EDGE_AGENT_WASI_NN__ONNXRUNTIME": "4"}, "must be a table"),
    ],
)
def test_wasi_nn_config_refusals(tmp_path, env, message):
    config = Config.load(env=env, overrides={"state_dir": tmp_path / "s"})
    with pytest.raises(ConfigError, match=message):
        WasiNnSettings.from_config(config, KNOWN)


def test_onnx_helper_model_is_what_the_tests_assume():
    # The reference is onnxruntime on the same bytes; the model is a plain x @ W + b.
    weight = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    bias = np.array([1, 2, 3], dtype=np.float32)
    got = reference(linear_onnx(weight, bias), X)
    assert np.allclose(got, X @ weight + bias, rtol=1e-5, atol=1e-5)
