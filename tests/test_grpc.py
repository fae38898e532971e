"""The gRPC Open Inference Protocol (agent/server/grpc_api.py) of a real agent, driven by real clients.

``tritonclient.grpc`` and KServe's ``InferenceGRPCClient`` run in processes of
their own (tests/grpc_clients.py: the two cannot share one); the error cases,
health and TLS use the agent's own generated stubs, which live in a private
descriptor pool and import next to either.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import REPO, control_headers, http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from modelkit import make_scale_model

from agent import errors, exitcodes
from agent.server.grpc_api import GRPC_STATUS, SERVICE_NAME
from agent.server.proto import inference_pb2 as pb
from agent.server.proto import inference_pb2_grpc as pb_grpc
from agent.wiring import attach_grpc, attach_lifecycle

MAX_BODY = 64 * 1024
PIXELS = np.random.default_rng(13).uniform(0, 16, size=(3, 64)).astype(np.float32)


def _with_grpc(agent) -> None:
    attach_lifecycle(agent, rollback_grace_s=0.5)
    attach_grpc(agent)


@pytest.fixture
def agent(make_agent):
    return make_agent(setup=_with_grpc, max_body_bytes=MAX_BODY)


def target(agent) -> str:
    host, port = agent.agent.grpc.address
    return f"{host}:{port}"


@pytest.fixture
def stub(agent):
    with grpc.insecure_channel(target(agent)) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def rest_outputs(agent, pixels: np.ndarray) -> dict[str, np.ndarray]:
    request = {
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(pixels.shape), "data": pixels.ravel().tolist()}]
    }
    status, body = http("POST", agent.url + "/v2/models/digits/infer", request)
    assert status == 200, body
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    return {o["name"]: np.array(o["data"], dtype=dtypes[o["datatype"]]).reshape(o["shape"]) for o in body["outputs"]}


def infer_request(pixels: np.ndarray = PIXELS, **fields) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits", **fields)
    tensor = request.inputs.add(name="pixels", datatype="FP32")
    tensor.shape.extend(pixels.shape)
    request.raw_input_contents.append(pixels.tobytes())
    return request


def decode(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    return {
        o.name: np.frombuffer(raw, dtype=dtypes[o.datatype]).reshape(list(o.shape))
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def run_client(which: str, agent, tmp_path: Path) -> dict:
    np.save(tmp_path / "pixels.npy", PIXELS)
    token = control_headers(agent.agent.config.state_dir)["Authorization"].split()[1]
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "grpc_clients.py"),
            which,
            target(agent),
            token,
            str(tmp_path / "pixels.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def from_hex(doc: dict) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(doc["hex"]), dtype=np.dtype(doc["dtype"])).reshape(doc["shape"])


# -- the stubs --------------------------------------------------------------------------------------
def test_committed_stubs_are_what_the_proto_generates():
    proc = subprocess.run(
        [sys.executable, "scripts/gen_grpc.py", "--check"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_every_error_status_has_a_grpc_status():
    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    missing = {c.__name__: c.http_status for c in subclasses(errors.AgentError) if c.http_status not in GRPC_STATUS}
    assert missing == {}
    assert GRPC_STATUS[400] == grpc.StatusCode.INVALID_ARGUMENT
    assert GRPC_STATUS[404] == grpc.StatusCode.NOT_FOUND
    assert GRPC_STATUS[503] == grpc.StatusCode.UNAVAILABLE
    assert GRPC_STATUS[504] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert GRPC_STATUS[500] == grpc.StatusCode.INTERNAL


# -- third-party clients ----------------------------------------------------------------------------
def test_tritonclient_grpc(agent, tmp_path: Path):
    expected = rest_outputs(agent, PIXELS)
    got = run_client("triton", agent, tmp_path)
    assert got["live"] is True and got["ready"] is True
    assert got["model_ready"] is True and got["unknown_ready"] is False
    assert got["server_metadata"]["name"] == "edge-agent"
    assert "model_repository" in got["server_metadata"]["extensions"]
    meta = got["metadata"]
    assert meta["name"] == "digits" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "label"]
    assert got["id"] == "r-7"
    for name, array in expected.items():
        assert same_bits(from_hex(got["outputs"][name]), array), name
    assert got["only_label"] == ["label"]
    assert got["index_without_token"] == "StatusCode.UNAUTHENTICATED"
    assert {"name": "digits", "version": "1", "state": "READY"}.items() <= got["index"][0].items()
    assert got["ready_after_unload"] is False
    assert got["ready_after_load"] is True


def test_kserve_grpc_client(agent, tmp_path: Path):
    expected = rest_outputs(agent, PIXELS)
    got = run_client("kserve", agent, tmp_path)
    assert got["live"] is True and got["ready"] is True and got["model_ready"] is True
    for binary in ("True", "False"):  # raw_input_contents, and the typed contents fields
        for name, array in expected.items():
            assert same_bits(from_hex(got["outputs"][binary][name]), array), (binary, name)


# -- the agent's own stubs: inference and its errors ------------------------------------------------
def test_raw_and_typed_contents_agree_with_rest(agent, stub):
    expected = rest_outputs(agent, PIXELS)
    response = stub.ModelInfer(infer_request(id="a1"), timeout=60)
    assert response.model_name == "digits" and response.model_version == "1" and response.id == "a1"
    raw = decode(response)
    typed_request = pb.ModelInferRequest(model_name="digits", model_version="1")
    tensor = typed_request.inputs.add(name="pixels", datatype="FP32", shape=list(PIXELS.shape))
    tensor.contents.fp32_contents.extend(PIXELS.ravel().tolist())
    typed = decode(stub.ModelInfer(typed_request, timeout=60))
    for name, array in expected.items():
        assert same_bits(raw[name], array) and same_bits(typed[name], array), name
    only = stub.ModelInfer(infer_request(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="label")]))
    assert [o.name for o in only.outputs] == ["label"] and len(only.raw_output_contents) == 1


def bad_requests() -> dict[str, tuple[pb.ModelInferRequest, grpc.StatusCode, str]]:
    unknown_model = infer_request()
    unknown_model.model_name = "no-such-model"
    short = infer_request()
    short.raw_input_contents[0] = PIXELS.tobytes()[:-4]
    wrong_type = infer_request()
    wrong_type.inputs[0].datatype = "FP64"
    unknown_output = infer_request(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="logits")])
    too_few_raw = infer_request()
    too_few_raw.inputs.add(name="other", datatype="FP32", shape=[1])
    wrong_shape = infer_request()
    wrong_shape.inputs[0].shape[1] = 63
    oversize = infer_request(np.zeros((MAX_BODY // 256 + 8, 64), dtype=np.float32))
    unknown_version = infer_request(model_version="9")
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return {
        "unknown model": (unknown_model, grpc.StatusCode.NOT_FOUND, "unknown model"),
        "unknown version": (unknown_version, grpc.StatusCode.NOT_FOUND, "no loaded version"),
        "raw size mismatch": (short, invalid, "holds 764 bytes"),
        "wrong datatype": (wrong_type, invalid, "datatype 'FP64' does not match"),
        "unknown output": (unknown_output, invalid, "no output 'logits'"),
        "raw count": (too_few_raw, invalid, "1 entries for 2 inputs"),
        "wrong shape": (wrong_shape, invalid, "does not match the model's"),
        "oversize message": (oversize, grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    }


@pytest.mark.parametrize("case", list(bad_requests()))
def test_bad_requests_get_their_status_and_the_server_keeps_serving(agent, stub, case: str):
    request, code, message = bad_requests()[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=60)
    assert info.value.code() == code, info.value.details()
    assert message in info.value.details()
    assert decode(stub.ModelInfer(infer_request(), timeout=60))["label"].shape == (3,)


def test_an_error_echoing_a_huge_name_keeps_its_status(agent, stub):
    # The details travel in a header (grpc-message), which clients cap at 16 KiB: one echoing
    # a client's 40 KB name would reach the client as RESOURCE_EXHAUSTED, not the error it is.
    name = "n" * 40_000
    calls = (
        (lambda: stub.ModelInfer(pb.ModelInferRequest(model_name=name), timeout=60), grpc.StatusCode.NOT_FOUND),
        (lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=60), grpc.StatusCode.NOT_FOUND),
        (lambda: stub.ModelInfer(infer_request(model_version=name), timeout=60), grpc.StatusCode.NOT_FOUND),
    )
    for call, code in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == code, info.value.details()[:200]
        assert info.value.details().startswith(("unknown model 'nnn", "model digits has no loaded version 'nnn"))
    with grpc.insecure_channel(target(agent)) as channel, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name), timeout=60)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()[:200]


def test_typed_contents_are_checked(stub):
    request = pb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    tensor.contents.fp64_contents.extend([1.0] * 64)  # FP32 travels in fp32_contents
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "contents.fp32_contents holds 0" in info.value.details()
    tensor.contents.fp32_contents.extend([1.0] * 64)
    request.raw_input_contents.append(np.ones(64, np.float32).tobytes())
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=60)
    assert "not both" in info.value.details()


def test_metadata_rpcs(agent, stub):
    assert stub.ServerLive(pb.ServerLiveRequest()).live is True
    assert stub.ServerReady(pb.ServerReadyRequest()).ready is True
    assert stub.ModelReady(pb.ModelReadyRequest(name="digits", version="1")).ready is True
    assert stub.ModelReady(pb.ModelReadyRequest(name="digits", version="9")).ready is False
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
    assert meta.platform == "wasm-abi-v1" and list(meta.inputs[0].shape) == [-1, 64]
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_repository_rpcs_need_the_token(agent, stub):
    token = control_headers(agent.agent.config.state_dir)["Authorization"]
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", token.split()[1]),)):
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="digits"), metadata=metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.ModelReady(pb.ModelReadyRequest(name="digits")).ready is True
    auth = (("authorization", token.replace("Bearer", "bearer")),)  # the scheme is case-insensitive
    # KServe's layout: the name in field 1.
    done = stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(repository_name="digits"), metadata=auth)
    assert done.model_name == "digits" and done.isUnloaded is True
    assert stub.ModelReady(pb.ModelReadyRequest(name="digits")).ready is False
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(infer_request(), timeout=60)
    assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(grpc.RpcError) as info:
        request = pb.RepositoryModelLoadRequest(model_name="digits")
        request.parameters["config"].string_param = "{}"
        stub.RepositoryModelLoad(request, metadata=auth)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    request = pb.RepositoryModelLoadRequest(model_name="digits")
    request.parameters["version"].string_param = "1"
    assert stub.RepositoryModelLoad(request, metadata=auth).isLoaded is True
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), metadata=auth)
    assert [(m.name, m.version, m.state) for m in index.models] == [("digits", "1", "READY")]


def test_repository_rpcs_without_a_model_name_are_invalid_argument(agent, stub):
    auth = (("authorization", control_headers(agent.agent.config.state_dir)["Authorization"]),)
    for call, request in (
        (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest()),
        (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest()),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call(request, metadata=auth, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert info.value.details() == "model_name is empty"
    assert stub.ModelReady(pb.ModelReadyRequest(name="digits")).ready is True


# -- health, TLS, listening -------------------------------------------------------------------------
def test_health_serving_then_not_serving_while_stopping(agent):
    with grpc.insecure_channel(target(agent)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == 1  # SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="other"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        seen: list[int] = []
        stream = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        seen.append(next(stream).status)
        stopper = threading.Thread(target=agent.stop)
        stopper.start()
        seen.extend(message.status for message in stream)  # ends when the server stops
        stopper.join(60)
    assert seen == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-agent test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_tls(make_agent, tmp_path: Path):
    cert, key = self_signed(tmp_path)
    agent = make_agent(setup=_with_grpc, grpc_tls_cert=cert, grpc_tls_key=key)
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(target(agent), credentials) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(), timeout=60)
    assert same_bits(decode(response)["label"], rest_outputs(agent, PIXELS)["label"])
    # Plain text to a TLS port gets nowhere.
    with grpc.insecure_channel(target(agent)) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_unreadable_tls_file_stops_the_start_with_a_config_error(agent_process, tmp_path: Path):
    proc = agent_process(
        env={
            "EDGE_AGENT_GRPC_TLS_CERT": str(tmp_path / "missing.pem"),
            "EDGE_AGENT_GRPC_TLS_KEY": str(tmp_path / "missing-key.pem"),
        }
    )
    assert proc.proc.wait(120) == exitcodes.CONFIG
    assert "grpc_tls_cert" in proc.log()


def test_a_tls_key_that_does_not_fit_its_certificate_is_a_config_error(agent_process, tmp_path: Path):
    # A config error (exit 78: systemd does not restart it), not a listen error that restarts forever.
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    cert, _ = self_signed(tmp_path / "one")
    _, other_key = self_signed(tmp_path / "two")
    proc = agent_process(env={"EDGE_AGENT_GRPC_TLS_CERT": str(cert), "EDGE_AGENT_GRPC_TLS_KEY": str(other_key)})
    assert proc.proc.wait(120) == exitcodes.CONFIG
    assert "grpc_tls_key" in proc.log()


def test_grpc_port_in_use_is_a_listen_error(agent_process):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = agent_process(extra=["--grpc-listen", f"127.0.0.1:{port}"])
        assert proc.proc.wait(120) == exitcodes.OSERR
    assert "grpc_listen" in proc.log()


def test_grpc_can_be_switched_off(agent_process):
    proc = agent_process(extra=["--grpc-listen", "off"])
    proc.wait_ready()
    assert proc.terminate() == 0
    assert "gRPC API listening" not in proc.log()


def test_many_agents_in_one_process_each_get_a_grpc_port(make_agent, tmp_path: Path):
    first = make_agent(setup=_with_grpc)
    second = make_agent(setup=_with_grpc, state_dir=tmp_path / "second")
    assert target(first) != target(second)
    for agent in (first, second):
        with grpc.insecure_channel(target(agent)) as channel:
            assert pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(pb.ServerReadyRequest()).ready is True


def test_calls_beyond_the_concurrency_limit_are_refused_at_once(make_agent, tmp_path: Path):
    agent = make_agent(
        setup=_with_scale(tmp_path, timeout_ms=3000), request_timeout_ms=3000, grpc_max_concurrent_rpcs=1
    )
    with grpc.insecure_channel(target(agent)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        held = stub.ModelInfer.future(scale_request(-1), timeout=120)  # spins to its deadline: holds the one slot
        slots = agent.agent.grpc.servicer.slots
        for _ in range(1200):  # until the server holds the call; a hang guard
            if slots.active or held.done():
                break
            threading.Event().wait(0.01)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(infer_request(), timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "grpc_max_concurrent_rpcs" in info.value.details()
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=60).live is True  # holds nothing: not counted
        with pytest.raises(grpc.RpcError) as info:
            held.result(120)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(600):  # the slot comes back once the handler has returned; a hang guard
            try:
                assert decode(stub.ModelInfer(infer_request(), timeout=60))["label"].shape == (3,)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                threading.Event().wait(0.05)
        else:
            raise AssertionError("the slot never came back")


def test_health_watch_streams_do_not_take_inference_slots(make_agent):
    # A Watch stream lasts as long as its client likes: were it counted with inference calls,
    # grpc_max_concurrent_rpcs idle watchers would shut every client out of ModelInfer.
    agent = make_agent(setup=_with_grpc, grpc_max_concurrent_rpcs=1)
    with grpc.insecure_channel(target(agent)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        assert decode(stub.ModelInfer(infer_request(), timeout=60))["label"].shape == (3,)
        second = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        with pytest.raises(grpc.RpcError) as info:
            next(second)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Watch" in info.value.details()
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=60).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        watch.cancel()


def test_connections_are_bounded_by_max_connections(make_agent):
    # As REST's are: else a flood of connections takes the process's file descriptors (and the store's).
    agent = make_agent(setup=_with_grpc, max_connections=2)

    def connect() -> grpc.Channel:
        return grpc.insecure_channel(target(agent), options=[("grpc.use_local_subchannel_pool", 1)])

    def live(channel: grpc.Channel) -> bool:
        return pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=30).live

    first, second, third = connect(), connect(), connect()
    try:
        assert live(first) and live(second)
        with pytest.raises(grpc.RpcError) as info:
            live(third)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        for channel in (first, second, third):
            channel.close()
    for _ in range(600):  # closed connections make room once the server has seen them go; a hang guard
        with connect() as channel:
            try:
                assert live(channel)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
        threading.Event().wait(0.05)
    else:
        raise AssertionError("no connection was let in after the others closed")


def _with_scale(tmp_path: Path, timeout_ms: int = 200):
    def setup(agent) -> None:
        agent.repository.import_dir(make_scale_model(tmp_path / "scale", timeout_ms=timeout_ms))
        agent.db.set_active("scale", "1")
        _with_grpc(agent)

    return setup


def scale_request(value: float) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="scale")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([value, 1, 1, 1])
    return request


def test_input_bytes_held_at_once_are_bounded_as_rest_bodies_are(make_agent, tmp_path: Path):
    # max_inflight_body_bytes bounds the input tensors gRPC calls hold at once, as it bounds REST bodies:
    # else grpc_max_concurrent_rpcs calls of max_body_bytes each could be held together.
    budget = 160 * 1024
    agent = make_agent(
        setup=_with_scale(tmp_path, timeout_ms=3000),
        request_timeout_ms=3000,
        max_body_bytes=budget,
        max_inflight_body_bytes=budget,
    )
    rows = np.ones((6000, 4), np.float32)  # 96,000 bytes, over the 64 KiB always admitted
    rows[0, 0] = -1  # the model spins until its timeout: the call holds its inputs till then

    def big(x: np.ndarray) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name="scale", raw_input_contents=[x.tobytes()])
        request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
        return request

    with grpc.insecure_channel(target(agent)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        held = stub.ModelInfer.future(big(rows), timeout=120)
        slots = agent.agent.grpc.servicer.slots
        for _ in range(1200):  # until the server holds the call; a hang guard
            if slots.bytes_held or held.done():
                break
            threading.Event().wait(0.01)
        assert slots.bytes_held == rows.nbytes
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(big(np.ones((6000, 4), np.float32)), timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        assert "max_inflight_body_bytes" in info.value.details()
        small = stub.ModelInfer(scale_request(2), timeout=60)  # small calls are always admitted
        assert np.frombuffer(small.raw_output_contents[0], np.float32).tolist() == [2, 2, 3, 4]
        with pytest.raises(grpc.RpcError) as info:
            held.result(120)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(1200):  # the status goes out before the call's handler returns; a hang guard
            if not slots.bytes_held:
                break
            threading.Event().wait(0.01)
        assert slots.bytes_held == 0
        answer = stub.ModelInfer(big(np.ones((6000, 4), np.float32)), timeout=60)
        assert np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(-1, 4)[0].tolist() == [1, 2, 3, 4]


def test_model_failures_get_internal_and_deadline_exceeded(make_agent, tmp_path: Path):
    agent = make_agent(setup=_with_scale(tmp_path), request_timeout_ms=200)
    with grpc.insecure_channel(target(agent)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for value, code in ((13, grpc.StatusCode.INTERNAL), (-1, grpc.StatusCode.DEADLINE_EXCEEDED)):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(scale_request(value), timeout=60)
            assert info.value.code() == code, info.value.details()
        answer = stub.ModelInfer(scale_request(2), timeout=60)
        assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == [2, 2, 3, 4]


def test_a_call_in_flight_finishes_while_the_agent_stops(make_agent, tmp_path: Path):
    # The deadline is generous: the model's own hint would cut "most of a second" short on a loaded machine.
    agent = make_agent(setup=_with_scale(tmp_path, timeout_ms=30_000), request_timeout_ms=30_000)
    with grpc.insecure_channel(target(agent)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        slow = stub.ModelInfer.future(scale_request(8), timeout=120)  # most of a second of wasm
        slots = agent.agent.grpc.servicer.slots
        for _ in range(1200):  # until the server holds the call; a hang guard
            if slots.active or slow.done():
                break
            threading.Event().wait(0.01)
        agent.stop()
        answer = slow.result(120)
    assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == [8, 2, 3, 4]


# -- the tensor codec, for datatypes no bundled model takes ------------------------------------------
def codec_spec(datatype: str):
    from agent.spec import ModelSpec, TensorSpec

    tensor = TensorSpec("t", datatype, (-1, 2))
    return ModelSpec("m", "1", 1, 8, (tensor,), (tensor,), (), {}, {})


def typed(datatype: str, field: str, values: list) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    getattr(request.inputs.add(name="t", datatype=datatype, shape=[1, 2]).contents, field).extend(values)
    return request


def test_codec_narrow_integers_bool_and_fp16():
    from agent.errors import BadRequest
    from agent.server.grpc_api import decode_inputs

    got = decode_inputs(typed("INT8", "int_contents", [-128, 127]), codec_spec("INT8"))["t"]
    assert got.dtype == np.int8 and got.tolist() == [[-128, 127]]
    with pytest.raises(BadRequest, match="out of range for INT8"):
        decode_inputs(typed("INT8", "int_contents", [128, 0]), codec_spec("INT8"))
    with pytest.raises(BadRequest, match="out of range for UINT16"):
        decode_inputs(typed("UINT16", "uint_contents", [65536, 0]), codec_spec("UINT16"))
    assert decode_inputs(typed("BOOL", "bool_contents", [True, False]), codec_spec("BOOL"))["t"].tolist() == [
        [True, False]
    ]
    raw_bool = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"\x01\x02"])
    raw_bool.inputs.add(name="t", datatype="BOOL", shape=[1, 2])
    with pytest.raises(BadRequest, match="BOOL bytes must be 0 or 1"):
        decode_inputs(raw_bool, codec_spec("BOOL"))
    with pytest.raises(BadRequest, match="FP16 has no typed contents field"):
        decode_inputs(typed("FP16", "fp32_contents", [1.0, 2.0]), codec_spec("FP16"))
    half = np.array([[1.5, -2.0]], np.float16)
    raw_half = pb.ModelInferRequest(model_name="m", raw_input_contents=[half.tobytes()])
    raw_half.inputs.add(name="t", datatype="FP16", shape=[1, 2])
    assert decode_inputs(raw_half, codec_spec("FP16"))["t"].tobytes() == half.tobytes()
    huge = pb.ModelInferRequest(model_name="m", raw_input_contents=[b""])
    huge.inputs.add(name="t", datatype="FP32", shape=[2**40, 2])  # a shape is never allocated from
    with pytest.raises(BadRequest, match="holds 0 bytes"):
        decode_inputs(huge, codec_spec("FP32"))
