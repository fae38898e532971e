"""The Open Inference Protocol's JSON tensor format, to and from NumPy.

Every malformed tensor is answered with a :class:`BadRequest` that names the
tensor and what is wrong with it, so a client can fix its request without
reading the agent's logs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from agent.errors import BadRequest
from agent.spec import ModelSpec, TensorSpec


def decode_inputs(doc: Any, spec: ModelSpec) -> dict[str, np.ndarray]:
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    items = doc.get("inputs")
    if not isinstance(items, list) or not items:
        raise BadRequest("request needs a non-empty 'inputs' list")
    tensors: dict[str, np.ndarray] = {}
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest(f"inputs[{index}] must be an object")
        name = item.get("name")
        if not isinstance(name, str):
            raise BadRequest(f"inputs[{index}].name must be a string")
        tspec = spec.input(name)
        if tspec is None:
            known = ", ".join(t.name for t in spec.inputs)
            raise BadRequest(f"model {spec.name} has no input {name!r} (its inputs: {known})")
        if name in tensors:
            raise BadRequest(f"input {name!r} is given twice")
        tensors[name] = decode_tensor(item, tspec)
    return tensors


def decode_tensor(item: dict[str, Any], tspec: TensorSpec) -> np.ndarray:
    name = tspec.name
    datatype = item.get("datatype")
    if datatype != tspec.datatype:
        raise BadRequest(f"input {name}: datatype {datatype!r} does not match the model's {tspec.datatype}")
    shape = item.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise BadRequest(f"input {name}: shape must be a non-empty list of non-negative integers")
    if len(shape) != len(tspec.shape) or tuple(shape[1:]) != tspec.row_shape:
        raise BadRequest(f"input {name}: shape {shape} does not match the model's {list(tspec.shape)}")
    params = item.get("parameters") or {}
    if isinstance(params, dict) and "binary_data_size" in params:
        raise BadRequest(f"input {name}: the binary tensor data extension is not supported; send JSON data")
    if "data" not in item:
        raise BadRequest(f"input {name}: 'data' is missing")
    data = item["data"]
    if not isinstance(data, list):
        raise BadRequest(f"input {name}: 'data' must be a list")
    dtype = tspec.dtype
    try:
        if dtype.kind in "iu":
            # Parse without a target type first: a float in integer data must be
            # refused, not silently truncated.
            raw = np.asarray(data)
            if raw.dtype.kind not in "iub" and raw.size:
                raise BadRequest(f"input {name}: {tspec.datatype} data must hold integers only")
            array = raw.astype(dtype, casting="unsafe") if raw.size else np.zeros(0, dtype)
            if raw.size and not np.array_equal(array, raw):
                raise BadRequest(f"input {name}: values out of range for {tspec.datatype}")
        elif dtype.kind == "b":
            raw = np.asarray(data)
            if raw.dtype.kind != "b" and raw.size:
                raise BadRequest(f"input {name}: BOOL data must hold true/false only")
            array = raw.astype(bool)
        else:
            array = np.asarray(data, dtype=dtype)
    except BadRequest:
        raise
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"input {name}: data is not a well-formed {tspec.datatype} tensor ({exc})") from exc
    expected = math.prod(shape)
    if array.size != expected:
        raise BadRequest(f"input {name}: shape {shape} needs {expected} elements, data holds {array.size}")
    return array.reshape(shape)


def requested_outputs(doc: dict[str, Any], spec: ModelSpec) -> list[TensorSpec]:
    wanted = doc.get("outputs")
    if wanted is None:
        return list(spec.outputs)
    if not isinstance(wanted, list):
        raise BadRequest("'outputs' must be a list")
    result = []
    for index, item in enumerate(wanted):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            raise BadRequest(f"outputs[{index}].name must be a string")
        tspec = spec.output(name)
        if tspec is None:
            known = ", ".join(t.name for t in spec.outputs)
            raise BadRequest(f"model {spec.name} has no output {name!r} (its outputs: {known})")
        result.append(tspec)
    return result


def encode_outputs(names: list[TensorSpec], outputs: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    return [
        {
            "name": t.name,
            "datatype": t.datatype,
            "shape": list(outputs[t.name].shape),
            "data": outputs[t.name].ravel(),
        }
        for t in names
    ]
