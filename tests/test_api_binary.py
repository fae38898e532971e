"""Triton's binary tensor data extension on the REST API (agent/server/binary_tensors.py).

A real agent serves the bundled ``digits`` (one FP32 input ``pixels`` [N,64];
outputs ``probabilities`` FP32 [N,10] and ``label`` INT64 [N]) and a converted
three-input model ``where`` (``y = where(c, a, float(b))``: ``c`` BOOL, ``a``
FP32, ``b`` INT32, all [N,3]). It is driven with ``tritonclient.http`` and
KServe's ``InferenceRESTClient`` in every mix of binary and JSON tensors, each
answer checked bit for bit against the plain JSON API's; then every malformed
request is sent raw and must get a 400 that says what is wrong, with the agent
serving on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from conftest import AgentThread, http
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor, serialize_byte_tensor

from agent.config import Config
from agent.errors import BadRequest
from agent.server import binary_tensors

HEADER = "Inference-Header-Content-Length"


def where_model(directory: Path) -> Path:
    import onnx  # noqa: F401 - the converter's dependency, present in the dev environment
    from onnx import TensorProto, helper

    from agent.convert.build import convert, write_model_dir

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
            helper.make_node("Where", ["c", "a", "bf"], ["y"]),
        ],
        "where",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, ["N", 3]),
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("b", TensorProto.INT32, ["N", 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return write_model_dir(convert(model, name="where", version="1"), directory)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentThread]:
    tmp = tmp_path_factory.mktemp("binary")
    where_dir = where_model(tmp / "where")

    def setup(agent: Any) -> None:
        agent.repository.import_dir(where_dir)
        agent.db.set_active("where", "1")

    # make_agent's settings, for one agent shared by the module's tests.
    values = {"state_dir": tmp / "state", "listen": "127.0.0.1:0", "log_level": "warning"}
    if "grpc_listen" in {f.name for f in dataclasses.fields(Config)}:
        values["grpc_listen"] = "127.0.0.1:0"
    config = Config.load(env={}, overrides=values)
    thread = AgentThread(config, setup)
    yield thread
    thread.stop()


def pixels(rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Arbitrary float32 values (not only small integers), so bit-exactness is tested.
    return (rng.random((rows, 64), dtype=np.float32) * 16).astype(np.float32)


def json_infer(agent: AgentThread, x: np.ndarray) -> dict[str, np.ndarray]:
    """The plain JSON API's answer, as the arrays it stands for."""
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    status, reply = http("POST", agent.url + "/v2/models/digits/infer", body)
    assert status == 200, reply
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    return {o["name"]: np.asarray(o["data"], dtype=dtypes[o["datatype"]]).reshape(o["shape"]) for o in reply["outputs"]}


def assert_bit_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()


def client(agent: AgentThread) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(agent.url.removeprefix("http://"), network_timeout=60.0)


def pixels_input(x: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("pixels", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


# -- clients -----------------------------------------------------------------------------------------


def test_server_metadata_lists_the_extension(agent: AgentThread) -> None:
    status, meta = http("GET", agent.url + "/v2")
    assert status == 200 and "binary_tensor_data" in meta["extensions"]


@pytest.mark.parametrize("rows", [1, 32])
def test_tritonclient_default_is_binary_both_ways_and_bit_equal_to_json(agent: AgentThread, rows: int) -> None:
    x = pixels(rows, seed=rows)
    want = json_infer(agent, x)
    with client(agent) as c:
        result = c.infer("digits", [pixels_input(x, binary=True)], request_id="r7")
    response = result.get_response()
    assert response["id"] == "r7" and response["model_name"] == "digits"
    for output in response["outputs"]:
        assert "data" not in output and output["parameters"]["binary_data_size"] > 0
    assert_bit_equal(result.as_numpy("probabilities"), want["probabilities"])
    assert_bit_equal(result.as_numpy("label"), want["label"])


def test_tritonclient_binary_inputs_json_outputs(agent: AgentThread) -> None:
    x = pixels(5, seed=1)
    want = json_infer(agent, x)
    outputs = [
        triton.InferRequestedOutput("probabilities", binary_data=False),
        triton.InferRequestedOutput("label", binary_data=False),
    ]
    with client(agent) as c:
        result = c.infer("digits", [pixels_input(x, binary=True)], outputs=outputs)
    assert all("data" in o for o in result.get_response()["outputs"])
    assert_bit_equal(result.as_numpy("probabilities"), want["probabilities"])
    assert_bit_equal(result.as_numpy("label"), want["label"])


def test_tritonclient_json_inputs_binary_outputs(agent: AgentThread) -> None:
    """No outputs named: tritonclient asks for binary outputs with a plain JSON body (no binary part)."""
    x = pixels(3, seed=2)
    want = json_infer(agent, x)
    with client(agent) as c:
        result = c.infer("digits", [pixels_input(x, binary=False)])
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    assert_bit_equal(result.as_numpy("probabilities"), want["probabilities"])
    assert_bit_equal(result.as_numpy("label"), want["label"])


def test_tritonclient_json_both_ways(agent: AgentThread) -> None:
    x = pixels(4, seed=3)
    want = json_infer(agent, x)
    outputs = [triton.InferRequestedOutput("label", binary_data=False)]
    with client(agent) as c:
        result = c.infer("digits", [pixels_input(x, binary=False)], outputs=outputs)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label"]
    assert_bit_equal(result.as_numpy("label"), want["label"])


def test_outputs_mixed_and_in_the_order_asked(agent: AgentThread) -> None:
    x = pixels(6, seed=4)
    want = json_infer(agent, x)
    outputs = [
        triton.InferRequestedOutput("label", binary_data=True),
        triton.InferRequestedOutput("probabilities", binary_data=False),
    ]
    with client(agent) as c:
        result = c.infer("digits", [pixels_input(x, binary=True)], outputs=outputs)
    items = result.get_response()["outputs"]
    assert [o["name"] for o in items] == ["label", "probabilities"]
    assert items[0]["parameters"] == {"binary_data_size": 6 * 8} and "data" not in items[0]
    assert "data" in items[1]
    assert_bit_equal(result.as_numpy("probabilities"), want["probabilities"])
    assert_bit_equal(result.as_numpy("label"), want["label"])


def test_binary_requests_served_on_the_worker_pool(make_agent: Any) -> None:
    """A model served off the event loop answers a binary request after the await, the same bytes."""
    workers = make_agent(inline_threshold_us=0)
    x = pixels(32, seed=12)
    want = json_infer(workers, x)
    with client(workers) as c:
        result = c.infer("digits", [pixels_input(x, binary=True)])
    assert_bit_equal(result.as_numpy("probabilities"), want["probabilities"])
    assert_bit_equal(result.as_numpy("label"), want["label"])


def test_compressed_bodies_are_refused_and_answers_go_uncompressed(agent: AgentThread) -> None:
    x = pixels(2, seed=11)
    want = json_infer(agent, x)
    with client(agent) as c:
        with pytest.raises(InferenceServerException, match="Content-Encoding 'gzip' is not supported"):
            c.infer("digits", [pixels_input(x, binary=True)], request_compression_algorithm="gzip")
        result = c.infer("digits", [pixels_input(x, binary=True)], response_compression_algorithm="gzip")
    assert_bit_equal(result.as_numpy("probabilities"), want["probabilities"])


def test_kserve_rest_client_binary_mode(agent: AgentThread) -> None:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    x = pixels(32, seed=5)
    want = json_infer(agent, x)

    async def run(request: InferRequest) -> Any:
        rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        response_headers: dict[str, str] = {}
        try:
            return await rest.infer(agent.url, request, model_name="digits", response_headers=response_headers), (
                response_headers
            )
        finally:
            await rest._client.aclose()

    tensor = InferInput("pixels", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    request = InferRequest("digits", [tensor], parameters={"binary_data_output": True})
    response, headers = asyncio.run(run(request))
    assert headers["content-type"] == "application/octet-stream" and int(headers[HEADER.lower()]) > 0
    got = {o.name: o.as_numpy() for o in response.outputs}
    assert_bit_equal(got["probabilities"], want["probabilities"])
    assert_bit_equal(got["label"], want["label"])

    # Binary inputs, one output asked for as JSON.
    tensor = InferInput("pixels", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    request = InferRequest(
        "digits", [tensor], request_outputs=[RequestedOutput("probabilities", parameters={"binary_data": False})]
    )
    response, headers = asyncio.run(run(request))
    assert headers["content-type"] == "application/json" and HEADER.lower() not in headers
    assert_bit_equal(response.outputs[0].as_numpy().astype(np.float32), want["probabilities"])


def test_several_inputs_are_taken_in_request_order(agent: AgentThread) -> None:
    """The binary part is split in the order the request lists its inputs, not the model's; JSON
    inputs in between take none of it."""
    rng = np.random.default_rng(6)
    c_ = rng.random((7, 3)) < 0.5
    a = rng.random((7, 3), dtype=np.float32)
    b = rng.integers(-1000, 1000, (7, 3), dtype=np.int32)
    want = np.where(c_, a, b.astype(np.float32))
    tensors = []
    for name, array, datatype, binary in (("b", b, "INT32", True), ("a", a, "FP32", False), ("c", c_, "BOOL", True)):
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        tensors.append(tensor)
    with client(agent) as cl:
        result = cl.infer("where", tensors)
    assert_bit_equal(result.as_numpy("y"), want)


def test_content_type_alone_does_not_make_a_body_binary(agent: AgentThread) -> None:
    x = pixels(1)
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": x.ravel().tolist()}]}
    status, reply = http(
        "POST",
        agent.url + "/v2/models/digits/infer",
        raw=json.dumps(body).encode(),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert status == 200 and reply["outputs"][0]["name"] == "probabilities"


def test_a_json_request_naming_outputs_gets_the_plain_answer(agent: AgentThread) -> None:
    x = pixels(2, seed=8)
    base = {"id": "q", "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 64], "data": x.ravel().tolist()}]}
    plain = http("POST", agent.url + "/v2/models/digits/infer", base)
    named = http(
        "POST",
        agent.url + "/v2/models/digits/infer",
        {
            **base,
            "outputs": [{"name": "probabilities"}, {"name": "label"}],
            "parameters": {"binary_data_output": False},
        },
    )
    assert plain[0] == 200 and named == plain


# -- the raw wire format -------------------------------------------------------------------------------


def raw_request(
    agent: AgentThread,
    doc: Any,
    binary: bytes = b"",
    header: str | None = "auto",
    model: str = "digits",
) -> tuple[int, Any, dict[str, str]]:
    """POST ``<doc as JSON><binary>`` with Inference-Header-Content-Length (``auto``: the JSON's length)."""
    import urllib.error
    import urllib.request

    head = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    headers = {"Content-Type": "application/octet-stream"}
    if header is not None:
        headers[HEADER] = str(len(head)) if header == "auto" else header
    req = urllib.request.Request(
        agent.url + f"/v2/models/{model}/infer", method="POST", data=head + binary, headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def pixels_doc(rows: int = 1, size: Any = None, **extra: Any) -> dict[str, Any]:
    params = {"binary_data_size": rows * 64 * 4 if size is None else size}
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [rows, 64], "parameters": params}], **extra}


def test_binary_response_wire_format(agent: AgentThread) -> None:
    x = pixels(2, seed=9)
    want = json_infer(agent, x)
    status, body, headers = raw_request(agent, pixels_doc(2, parameters={"binary_data_output": True}), x.tobytes())
    assert status == 200 and headers["Content-Type"] == "application/octet-stream"
    length = int(headers[HEADER])
    head = json.loads(body[:length])
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert [o["name"] for o in head["outputs"]] == ["probabilities", "label"] and sizes == [2 * 10 * 4, 2 * 8]
    assert len(body) == length + sum(sizes)
    probabilities = np.frombuffer(body[length : length + sizes[0]], dtype="<f4").reshape(2, 10)
    label = np.frombuffer(body[length + sizes[0] :], dtype="<i8")
    assert_bit_equal(probabilities, want["probabilities"])
    assert_bit_equal(label, want["label"])


def test_binary_inputs_with_json_answer_is_plain_json(agent: AgentThread) -> None:
    x = pixels(1, seed=10)
    status, body, headers = raw_request(agent, pixels_doc(1), x.tobytes())
    assert status == 200 and headers["Content-Type"] == "application/json" and HEADER not in headers
    reply = json.loads(body)
    got = np.asarray(reply["outputs"][0]["data"], dtype=np.float32).reshape(1, 10)
    assert_bit_equal(got, json_infer(agent, x)["probabilities"])


def test_bool_input_must_hold_zero_or_one(agent: AgentThread) -> None:
    a = np.zeros((1, 3), dtype=np.float32).tobytes()
    b = np.zeros((1, 3), dtype=np.int32).tobytes()
    doc = {
        "inputs": [
            {"name": "c", "datatype": "BOOL", "shape": [1, 3], "parameters": {"binary_data_size": 3}},
            {"name": "a", "datatype": "FP32", "shape": [1, 3], "parameters": {"binary_data_size": 12}},
            {"name": "b", "datatype": "INT32", "shape": [1, 3], "parameters": {"binary_data_size": 12}},
        ]
    }
    status, reply, _ = raw_request(agent, doc, bytes([1, 2, 0]) + a + b, model="where")
    assert status == 400 and "input c: BOOL data must hold bytes 0 and 1 only" in reply["error"]
    status, body, _ = raw_request(agent, doc, bytes([1, 0, 1]) + a + b, model="where")
    assert status == 200 and json.loads(body)["outputs"][0]["data"] == [0.0, 0.0, 0.0]


FOUR = np.zeros(64, dtype=np.float32).tobytes()


@pytest.mark.parametrize(
    ("doc", "binary", "header", "message"),
    [
        # Inference-Header-Content-Length itself
        (pixels_doc(), FOUR, "99999", "Inference-Header-Content-Length 99999 is larger than the request body"),
        (pixels_doc(), FOUR, "-5", "Inference-Header-Content-Length must be a non-negative integer, got '-5'"),
        (pixels_doc(), FOUR, "1.5", "Inference-Header-Content-Length must be a non-negative integer"),
        (pixels_doc(), FOUR, "abc", "Inference-Header-Content-Length must be a non-negative integer"),
        (pixels_doc(), FOUR, "", "Inference-Header-Content-Length must be a non-negative integer"),
        (pixels_doc(), FOUR, "10", "the JSON header (the first 10 bytes of the body"),
        (b"not json at all", FOUR, "auto", "is not valid JSON"),
        (b"[1, 2]", b"", "auto", "request body must be a JSON object"),
        # sizes against the body and the tensor
        (pixels_doc(), FOUR[:200], "auto", "binary_data_size 256 runs past the end of the body (200 bytes"),
        (pixels_doc(), b"", "auto", "binary_data_size 256 runs past the end of the body (0 bytes"),
        (pixels_doc(), FOUR + b"xx", "auto", "2 bytes are left over"),
        (pixels_doc(size=252), FOUR, "auto", "input pixels: binary_data_size 252 does not match shape [1, 64] of FP32"),
        (pixels_doc(size=512), FOUR + FOUR, "auto", "binary_data_size 512 does not match shape [1, 64] of FP32 (256"),
        (pixels_doc(size=-1), FOUR, "auto", "binary_data_size must be a non-negative integer, got -1"),
        (pixels_doc(size=1.5), FOUR, "auto", "binary_data_size must be a non-negative integer, got 1.5"),
        (pixels_doc(size="256"), FOUR, "auto", "binary_data_size must be a non-negative integer, got '256'"),
        (pixels_doc(size=True), FOUR, "auto", "binary_data_size must be a non-negative integer, got True"),
        # datatype and shape
        (
            {
                "inputs": [
                    {"name": "pixels", "datatype": "INT64", "shape": [1, 64], "parameters": {"binary_data_size": 512}}
                ]
            },
            FOUR + FOUR,
            "auto",
            "input pixels: datatype 'INT64' does not match the model's FP32",
        ),
        (
            {
                "inputs": [
                    {"name": "pixels", "datatype": "FP32", "shape": [1, 32], "parameters": {"binary_data_size": 128}}
                ]
            },
            FOUR[:128],
            "auto",
            "input pixels: shape [1, 32] does not match the model's [-1, 64]",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "FP32",
                        "shape": [1, 64],
                        "data": [0] * 64,
                        "parameters": {"binary_data_size": 256},
                    }
                ]
            },
            FOUR,
            "auto",
            "give either 'data' or parameters.binary_data_size, not both",
        ),
        # outputs
        (pixels_doc(outputs=[{"name": "logits"}]), FOUR, "auto", "model digits has no output 'logits'"),
        (
            pixels_doc(outputs=[{"name": "probabilities", "parameters": {"classification": 3}}]),
            FOUR,
            "auto",
            "output probabilities: the classification extension is not supported",
        ),
        (
            pixels_doc(outputs=[{"name": "label", "parameters": {"binary_data": "yes"}}]),
            FOUR,
            "auto",
            "output label: parameters.binary_data must be true or false, got 'yes'",
        ),
        (
            pixels_doc(parameters={"binary_data_output": 1}),
            FOUR,
            "auto",
            "parameters.binary_data_output must be true or false, got 1",
        ),
        (pixels_doc(parameters=[1]), FOUR, "auto", "'parameters' must be an object"),
        (
            pixels_doc(outputs=[{"name": "label", "parameters": {"shared_memory_region": "r"}}]),
            FOUR,
            "auto",
            "output label: the shared-memory extensions are not supported",
        ),
        # a binary_data_size with no binary part
        (pixels_doc(), b"", None, "input pixels: binary_data_size is set but the request has no binary part"),
        (
            pixels_doc(parameters={"binary_data_output": True}),
            b"",
            None,
            "input pixels: binary_data_size is set but the request has no binary part",
        ),
    ],
)
def test_malformed_requests_get_a_clear_400(
    agent: AgentThread, doc: Any, binary: bytes, header: str | None, message: str
) -> None:
    status, reply, _ = raw_request(agent, doc, binary, header=header)
    assert status == 400, reply
    assert message in reply["error"], reply["error"]
    # The agent serves on.
    status, body, _ = raw_request(agent, pixels_doc(), FOUR)
    assert status == 200 and json.loads(body)["outputs"][1]["name"] == "label"


def test_a_bytes_input_is_refused_naming_tensor_and_datatype(agent: AgentThread) -> None:
    strings = np.array([b"seven", b"", "é".encode()], dtype=object).reshape(1, 3)
    raw = serialize_byte_tensor(strings).item()
    doc = {
        "inputs": [
            {"name": "pixels", "datatype": "BYTES", "shape": [1, 3], "parameters": {"binary_data_size": len(raw)}}
        ]
    }
    status, reply, _ = raw_request(agent, doc, raw)
    assert status == 400 and "input pixels: datatype 'BYTES' does not match the model's FP32" in reply["error"]
    tensor = triton.InferInput("pixels", [1, 3], "BYTES")
    tensor.set_data_from_numpy(strings)
    with client(agent) as c, pytest.raises(InferenceServerException, match="datatype 'BYTES' does not match"):
        c.infer("digits", [tensor])
    doc = {"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]}]}
    status, reply = http("POST", agent.url + "/v2/models/digits/infer", doc)
    assert status == 400 and "datatype 'BYTES' does not match the model's FP32" in reply["error"]


# -- the BYTES codec -----------------------------------------------------------------------------------


BYTES_CASES = [
    np.array([b"seven", b"", "é".encode(), b"\x00\xff\x00"], dtype=object).reshape(2, 2),
    np.array([b"x" * 1000], dtype=object),
    np.array([b""] * 5, dtype=object).reshape(5, 1),
]


@pytest.mark.parametrize("strings", BYTES_CASES)
def test_bytes_binary_round_trip_matches_tritonclient(strings: np.ndarray) -> None:
    theirs = serialize_byte_tensor(strings).item()
    ours = binary_tensors.bytes_to_binary(strings)
    assert ours == theirs
    decoded = binary_tensors.tensor_from_bytes("s", "BYTES", list(strings.shape), memoryview(theirs))
    assert decoded.shape == strings.shape and decoded.tolist() == strings.tolist()
    assert deserialize_bytes_tensor(ours).tolist() == strings.ravel().tolist()
    assert binary_tensors.tensor_to_bytes(strings, "BYTES") == theirs


def test_bytes_json_round_trip() -> None:
    texts = [["seven", ""], ["é", "naïve ☃"]]
    decoded = binary_tensors.bytes_from_json("s", texts, 4)
    assert decoded.tolist() == [b"seven", b"", "é".encode(), "naïve ☃".encode()]
    assert binary_tensors.bytes_to_json("s", decoded) == ["seven", "", "é", "naïve ☃"]
    with pytest.raises(BadRequest, match="output s: BYTES element 1 is not UTF-8"):
        binary_tensors.bytes_to_json("s", np.array([b"ok", b"\xff"], dtype=object))
    with pytest.raises(BadRequest, match="BYTES data must hold strings only"):
        binary_tensors.bytes_from_json("s", ["a", 1], 2)
    with pytest.raises(BadRequest, match="needs 3 elements, data holds 2"):
        binary_tensors.bytes_from_json("s", ["a", "b"], 3)
    deep: list[Any] = ["x"]
    for _ in range(5000):
        deep = [deep]
    assert binary_tensors.bytes_from_json("s", deep, 1).tolist() == [b"x"]


@pytest.mark.parametrize(
    ("raw", "count", "message"),
    [
        (struct.pack("<I", 5) + b"abc", 1, "BYTES element 0 claims 5 bytes, 3 are left"),
        (struct.pack("<I", 0xFFFFFFFF), 1, "BYTES element 0 claims 4294967295 bytes, 0 are left"),
        (
            struct.pack("<I", 1) + b"a" + b"\x00\x00",
            2,
            "2 BYTES elements need at least 8 bytes, its binary data holds 7",
        ),
        (
            struct.pack("<I", 1) + b"a" + struct.pack("<I", 5) + b"abcde",
            3,
            "BYTES element 2 has no length (the data ends at byte 14)",
        ),
        (struct.pack("<I", 1) + b"ab", 1, "1 bytes follow the last of its 1 BYTES elements"),
        (b"", 10**12, "1000000000000 BYTES elements need at least 4000000000000 bytes, its binary data holds 0"),
    ],
)
def test_malformed_bytes_binary_is_refused(raw: bytes, count: int, message: str) -> None:
    with pytest.raises(BadRequest) as refused:
        binary_tensors.bytes_from_binary("s", memoryview(raw), count)
    assert str(refused.value) == "input s: " + message
