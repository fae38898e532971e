"""The Open Inference Protocol v2 REST API of a running (in-process) agent."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from conftest import http
from modelkit import make_scale_model


def x_request(rows: list[list[float]], **extra) -> dict:
    flat = [v for row in rows for v in row]
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [len(rows), 4], "data": flat}], **extra}


@pytest.fixture
def agent(make_agent, tmp_path: Path):
    def setup(agent):
        agent.repository.import_dir(make_scale_model(tmp_path / "scale"))
        agent.db.set_active("scale", "1")

    return make_agent(setup=setup, seed_bundled=False, max_body_bytes=64 * 1024)


def test_health_and_server_metadata(agent):
    assert http("GET", agent.url + "/v2/health/live") == (200, {"live": True})
    assert http("GET", agent.url + "/v2/health/ready") == (200, {"ready": True})
    status, meta = http("GET", agent.url + "/v2")
    assert status == 200 and meta["name"] == "edge-agent" and "model_repository" in meta["extensions"]


def test_model_metadata_and_readiness(agent):
    status, meta = http("GET", agent.url + "/v2/models/scale")
    assert status == 200
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]
    assert http("GET", agent.url + "/v2/models/scale/versions/1")[0] == 200
    assert http("GET", agent.url + "/v2/models/scale/ready")[1]["ready"] is True
    assert http("GET", agent.url + "/v2/models/scale/versions/1/ready")[0] == 200
    assert http("GET", agent.url + "/v2/models/scale/versions/9/ready")[0] == 404


def test_infer_returns_oip_tensors(agent):
    request = x_request([[1, 2, 3, 4], [0, 1, 0, 1]], id="r1")
    status, body = http("POST", agent.url + "/v2/models/scale/infer", request)
    assert status == 200
    assert body["model_name"] == "scale" and body["model_version"] == "1" and body["id"] == "r1"
    assert body["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [2, 4], "data": [1, 4, 9, 16, 0, 2, 0, 4]}]
    status, body = http("POST", agent.url + "/v2/models/scale/versions/1/infer", x_request([[1, 1, 1, 1]]))
    assert status == 200 and body["outputs"][0]["data"] == [1, 2, 3, 4]


def test_nested_data_is_accepted(agent):
    req = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [[1, 1, 2, 2]]}]}
    assert http("POST", agent.url + "/v2/models/scale/infer", req)[1]["outputs"][0]["data"] == [1, 2, 6, 8]


def test_batches_larger_than_the_module_buffer_are_served(agent):
    rows = [[float(i)] * 4 for i in range(20, 45)]
    status, body = http("POST", agent.url + "/v2/models/scale/infer", x_request(rows))
    assert status == 200 and body["outputs"][0]["shape"] == [25, 4]
    assert body["outputs"][0]["data"][-4:] == [44, 88, 132, 176]


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"inputs": []}).encode(), 400, "non-empty 'inputs'"),
        (
            json.dumps({"inputs": [{"name": "z", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}).encode(),
            400,
            "no input 'z'",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
            ).encode(),
            400,
            "datatype 'INT32' does not match",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 5], "data": [1, 2, 3, 4, 5]}]}
            ).encode(),
            400,
            "does not match the model",
        ),
        (
            json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [1, 2, 3, 4]}]}).encode(),
            400,
            "needs 8 elements",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ["a", 2, 3, 4]}]}
            ).encode(),
            400,
            "not a well-formed FP32",
        ),
        (
            json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4]}]}).encode(),
            400,
            "'data' is missing",
        ),
        (json.dumps({**x_request([[1, 1, 1, 1]]), "outputs": [{"name": "q"}]}).encode(), 400, "no output 'q'"),
    ],
)
def test_bad_requests_get_400_with_a_reason(agent, payload: bytes, status: int, message: str):
    got, body = http("POST", agent.url + "/v2/models/scale/infer", raw=payload)
    assert got == status
    assert message in body["error"]
    # ...and the agent keeps serving.
    assert http("POST", agent.url + "/v2/models/scale/infer", x_request([[1, 1, 1, 1]]))[0] == 200


def test_unknown_model_and_path_get_404(agent):
    status, body = http("POST", agent.url + "/v2/models/nope/infer", x_request([[1, 1, 1, 1]]))
    assert status == 404 and "unknown model" in body["error"]
    assert http("GET", agent.url + "/v2/nothing/here")[0] == 404
    assert http("POST", agent.url + "/v2/models/scale/versions/7/infer", x_request([[1, 1, 1, 1]]))[0] == 404


def test_wrong_method_gets_405(agent):
    assert http("GET", agent.url + "/v2/models/scale/infer")[0] == 405
    assert http("POST", agent.url + "/v2/health/live", {})[0] == 405


def test_oversized_body_gets_413_before_it_is_read(agent):
    rows = [[1.0, 2.0, 3.0, 4.0]] * 5000  # far above the 64 KiB limit set for this agent
    status, body = http("POST", agent.url + "/v2/models/scale/infer", x_request(rows))
    assert status == 413 and "exceeds the limit" in body["error"]
    assert http("GET", agent.url + "/v2/health/live")[0] == 200


def test_model_failures_get_5xx_and_do_not_disturb_other_requests(agent):
    status, body = http("POST", agent.url + "/v2/models/scale/infer", x_request([[13, 0, 0, 0]]))
    assert status == 500 and "trap" in body["error"]
    status, body = http("POST", agent.url + "/v2/models/scale/infer", x_request([[-1, 0, 0, 0]]))
    assert status == 504 and "deadline" in body["error"]
    assert http("POST", agent.url + "/v2/models/scale/infer", x_request([[1, 1, 1, 1]]))[0] == 200


def raw_exchange(url: str, data: bytes, read_until: bytes | None = None) -> bytes:
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:  # a hang guard
        sock.sendall(data)
        chunks = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks += chunk
            if read_until is not None and chunks.count(b"HTTP/1.1 ") >= int(read_until):
                break
        return chunks


def test_pipelined_requests_are_answered_in_order_on_one_connection(agent):
    bodies = [json.dumps(x_request([[float(i + 20)] * 4])).encode() for i in range(3)]
    data = b"".join(
        b"POST /v2/models/scale/infer HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b) for b in bodies
    )
    reply = raw_exchange(agent.url, data, read_until=b"3")
    assert reply.count(b"HTTP/1.1 200 OK") == 3
    assert reply.index(b"[20.0,40.0") < reply.index(b"[21.0,42.0") < reply.index(b"[22.0,44.0")


def test_malformed_http_gets_400_and_the_connection_closes(agent):
    reply = raw_exchange(agent.url, b"GARBAGE\x00\x01 / HTTP/9\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400") and b"malformed HTTP" in reply


def test_expect_100_continue(agent):
    body = json.dumps(x_request([[1, 1, 1, 1]])).encode()
    head = (
        b"POST /v2/models/scale/infer HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    reply = raw_exchange(agent.url, head + body)
    assert reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK")


def test_metrics_endpoint_counts_requests(agent):
    for _ in range(3):
        http("POST", agent.url + "/v2/models/scale/infer", x_request([[1, 1, 1, 1]]))
    status, text = http("GET", agent.url + "/metrics")
    text = text.decode() if isinstance(text, bytes) else str(text)
    assert status == 200
    assert 'edge_agent_inference_requests_total{model="scale",version="1"} 3.0' in text
    assert "process_resident_memory_bytes" in text  # the process collector (docs/METRICS.md)
