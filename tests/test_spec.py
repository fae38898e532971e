"""model.json validation: every broken field is refused and named."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from modelkit import make_scale_model

from agent.errors import InvalidModel
from agent.spec import ModelSpec


@pytest.fixture
def doc(tmp_path: Path) -> dict[str, Any]:
    return json.loads((make_scale_model(tmp_path / "m") / "model.json").read_text())


def test_valid_document_parses(doc: dict[str, Any]):
    spec = ModelSpec.from_dict(doc)
    assert (spec.name, spec.version, spec.max_batch) == ("scale", "1", 8)
    assert spec.inputs[0].row_bytes == 16 and spec.outputs[0].shape == (-1, 4)
    assert spec.warmup_inputs["x"].shape == (1, 4) and "y" in spec.warmup_outputs
    assert spec.metadata()["platform"] == "wasm-abi-v1"


def mutate(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    target = out
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    last = keys[-1]
    if value is KeyError:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return out


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("schema", "other/v9", "schema must be"),
        ("name", "Bad Name!", "model name"),
        ("version", "", "non-empty string 'version'"),
        ("abi_version", 3, "needs ABI version 3"),
        ("max_batch", 0, "max_batch"),
        ("inputs", [], "at least one input"),
        ("inputs.0.datatype", "STRING", "not one of"),
        ("inputs.0.shape", [4], "must start with -1"),
        ("inputs.0.shape", [-1, -1], "only the batch dimension"),
        ("params.0.shape", [-1], "fully known"),
        ("outputs.0.name", "", "name must be a non-empty string"),
        ("warmup.inputs", {}, "every input"),
        ("warmup.inputs.x.shape", [1, 5], "cannot reshape|has shape"),
        ("resources.timeout_ms", -5, "positive integer"),
        ("files", {"module": "../../etc/passwd"}, "plain file name"),
    ],
)
def test_invalid_documents_are_refused(doc: dict[str, Any], path: str, value: Any, message: str):
    with pytest.raises(InvalidModel, match=message):
        ModelSpec.from_dict(mutate(doc, path, value))


def test_not_json_is_refused():
    with pytest.raises(InvalidModel, match="not valid JSON"):
        ModelSpec.from_bytes(b"{nope")
