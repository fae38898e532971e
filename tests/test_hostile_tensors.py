"""Hostile JSON tensor data: values a datatype cannot hold, and JSON values that are not numbers.

JSON has no infinity, so a float that turns into one on the way to FP32 was
out of range in the request; and ``true`` is a JSON boolean, not the number 1.
Both get 400 naming the input, before any model runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import http
from modelkit import make_scale_model

from agent.errors import BadRequest
from agent.server.tensors import decode_tensor
from agent.spec import TensorSpec


@pytest.fixture
def agent(make_agent, tmp_path: Path):
    def setup(agent):
        agent.repository.import_dir(make_scale_model(tmp_path / "scale"))
        agent.db.set_active("scale", "1")

    return make_agent(setup=setup, seed_bundled=False)


def infer(agent, data: list) -> tuple[int, dict]:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": data}]}
    return http("POST", agent.url + "/v2/models/scale/infer", body)


@pytest.mark.parametrize("data", [[1e39, 1, 1, 1], [1, 1, 1, -1e39], [[1, 1e300, 1, 1]]])
def test_fp32_values_beyond_its_range_get_400(agent, data: list):
    status, body = infer(agent, data)
    assert status == 400, body
    assert "input x" in body["error"] and "out of range for FP32" in body["error"]


@pytest.mark.parametrize("data", [[True, 1, 1, 1], [True, False, True, True], [[1, 1, False, 1]]])
def test_json_booleans_in_fp32_data_get_400(agent, data: list):
    status, body = infer(agent, data)
    assert status == 400, body
    assert "input x" in body["error"] and "true/false" in body["error"]


def test_strings_in_fp32_data_get_400(agent):
    status, body = infer(agent, ["1.5", 1, 1, 1])
    assert status == 400, body
    assert "input x" in body["error"] and "numbers only" in body["error"]


def test_values_at_the_edge_of_the_range_and_integers_are_still_served(agent):
    status, body = infer(agent, [3.4e38, 1, 2, 3])
    assert status == 200, body
    assert np.array_equal(np.float32(body["outputs"][0]["data"]), np.float32([3.4e38, 2, 6, 12]))
    pool = agent.agent.models.get("scale", None).pool
    assert pool.idle == pool.live >= 1  # no instance lost or left held


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("INT32", [1, True], "true/false"),
        ("INT32", [True, False], "true/false"),
        ("UINT8", [[0, False]], "true/false"),
        ("FP16", [1.0, 70000.0], "out of range for FP16"),
        ("FP64", [1.0, True], "true/false"),
        ("FP64", [1.0, "2"], "numbers only"),
        ("BOOL", [True, 1], "true/false only"),
        ("FP32", [1.0, None], "numbers only"),
        ("INT32", [0, 2**63], "out of range for INT32"),
    ],
)
def test_decoder_refuses_hostile_values_for_every_datatype(datatype: str, data: list, message: str):
    tspec = TensorSpec("t", datatype, (-1, 2))
    with pytest.raises(BadRequest, match=message):
        decode_tensor({"name": "t", "datatype": datatype, "shape": [1, 2], "data": data}, tspec)


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("INT32", [1, -2]),
        ("FP16", [65504.0, -1]),
        ("FP32", [1, 2.5]),
        ("FP64", [1e300, -1e-300]),
        ("BOOL", [True, False]),
        ("UINT64", [0, 2**64 - 1]),
    ],
)
def test_decoder_keeps_accepting_well_formed_values(datatype: str, data: list):
    tspec = TensorSpec("t", datatype, (-1, 2))
    array = decode_tensor({"name": "t", "datatype": datatype, "shape": [1, 2], "data": data}, tspec)
    assert array.dtype == tspec.dtype and array.shape == (1, 2)
    assert array.ravel().tolist() == [np.asarray(v).astype(tspec.dtype).item() for v in data]
