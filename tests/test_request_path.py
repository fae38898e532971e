"""The fast request path answers exactly what the general one does.

Three shortcuts are pinned here: flat FP32 data narrowed by ``array("f")``
instead of NumPy's checked cast, inference paths remembered after their first
match, and response heads made from per-status templates.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from conftest import http
from modelkit import make_scale_model

from agent.errors import BadRequest
from agent.server.tensors import decode_tensor
from agent.spec import TensorSpec

F32_MAX = float(np.finfo(np.float32).max)
# Values at the edges of FP32: the largest, values just above it that round down to it or up to
# infinity, integers FP32 cannot hold exactly, subnormals, values that round to zero, negative zero.
EDGES = [
    F32_MAX,
    -F32_MAX,
    F32_MAX * (1 + 2**-25),
    16777217,
    2**63,
    -(2**63),
    2**64 - 1,
    0.1,
    1e-39,
    1e-46,
    -1e-46,
    5e-324,
    -0.0,
    1.1754942e-38,
]


@pytest.fixture
def agent(make_agent, tmp_path: Path):
    def setup(agent):
        agent.repository.import_dir(make_scale_model(tmp_path / "scale", scale=(1.0, 1.0, 1.0, 1.0)))
        agent.db.set_active("scale", "1")

    return make_agent(setup=setup, seed_bundled=False)


def infer(agent, data: list, path: str = "/v2/models/scale/infer") -> tuple[int, dict]:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": data}]}
    return http("POST", agent.url + path, body)


@pytest.mark.parametrize("start", range(0, len(EDGES), 4))
def test_flat_fp32_data_is_narrowed_as_numpy_narrows_it(start: int):
    values = (EDGES[start : start + 4] * 4)[:4]
    tspec = TensorSpec("x", "FP32", (-1, 4))
    flat = decode_tensor({"name": "x", "datatype": "FP32", "shape": [1, 4], "data": values}, tspec)
    nested = decode_tensor({"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [values]}, tspec)
    with np.errstate(over="raise"):
        want = np.asarray(values, dtype=np.float64).astype(np.float32).reshape(1, 4)
    assert flat.dtype == np.float32 and flat.shape == (1, 4)
    assert flat.tobytes() == want.tobytes() == nested.tobytes()


@pytest.mark.parametrize("data", [[F32_MAX * (1 + 2**-23), 1, 1, 1], [1, 1, 1, -1e300], [1e39, -1e39, 1, 1]])
def test_flat_fp32_values_beyond_its_range_are_refused(data: list):
    tspec = TensorSpec("x", "FP32", (-1, 4))
    with pytest.raises(BadRequest, match="out of range for FP32"):
        decode_tensor({"name": "x", "datatype": "FP32", "shape": [1, 4], "data": data}, tspec)


def test_flat_and_nested_data_get_the_same_answer(agent):
    values = [F32_MAX, 16777217, 1e-46, -0.0]
    status_flat, flat = infer(agent, values)
    status_nested, nested = infer(agent, [values])
    assert status_flat == status_nested == 200, (flat, nested)
    assert flat["outputs"] == nested["outputs"]
    got = np.asarray(flat["outputs"][0]["data"], dtype=np.float32)
    assert got.tobytes() == np.asarray(values, dtype=np.float32).tobytes()


def test_a_remembered_inference_path_keeps_every_check(agent):
    for _ in range(3):  # the first request matches the path, the others take the remembered route
        status, body = infer(agent, [1, 2, 3, 4])
        assert status == 200, body
        status, body = infer(agent, [True, 1, 1, 1])
        assert status == 400 and "true/false" in body["error"]
        status, body = http("GET", agent.url + "/v2/models/scale/infer")
        assert status == 405 and "use POST" in body["error"]
        status, body = infer(agent, [1, 2, 3, 4], path="/v2/models/nosuch/infer")
        assert status == 404 and "nosuch" in body["error"]
        status, body = infer(agent, [1, 2, 3, 4], path="/v2/models/scale/versions/9/infer")
        assert status == 404 and "'9'" in body["error"]
        status, body = infer(agent, [1, 2, 3, 4], path="/v2/models/scale/versions/1/infer")
        assert status == 200, body
        assert body["model_version"] == "1"


def test_remembered_paths_are_bounded(agent):
    for i in range(300):
        status, _ = infer(agent, [1, 2, 3, 4], path=f"/v2/models/m{i}/infer")
        assert status == 404
    status, _ = infer(agent, [1, 2, 3, 4], path="/v2/models/" + "n" * 300 + "/infer")
    assert status == 404
    remembered = agent.agent.api._infer_paths
    assert len(remembered) <= 256
    assert all(len(path) <= 256 for path in remembered)
    status, body = infer(agent, [1, 2, 3, 4])
    assert status == 200, body


def raw_exchange(url: str, request: bytes) -> bytes:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return received
            received += chunk


def test_response_heads_from_templates_are_well_formed(agent):
    answers = raw_exchange(
        agent.url,
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        b"DELETE /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    heads = []
    rest = answers
    while rest:
        head, _, rest = rest.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines[1:])
        length = int(fields["Content-Length"])
        body, rest = rest[:length], rest[length:]
        assert len(body) == length
        heads.append((lines[0], fields))
    assert [status for status, _ in heads] == [
        "HTTP/1.1 200 OK",
        "HTTP/1.1 405 Method Not Allowed",
        "HTTP/1.1 200 OK",
        "HTTP/1.1 200 OK",
    ]
    for _, fields in heads:
        assert fields["Server"] == "edge-agent" and fields["Date"].endswith(" GMT")
    assert heads[0][1]["Content-Type"] == "application/json"
    assert heads[1][1]["Allow"] == "GET"
    assert heads[2][1]["Content-Type"].startswith("text/plain")
    assert heads[3][1]["Connection"] == "close" and "Connection" not in heads[0][1]
