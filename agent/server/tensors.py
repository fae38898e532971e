"""The Open Inference Protocol's JSON tensor format, to and from NumPy.

Every malformed tensor is answered with a :class:`BadRequest` that names the
tensor and what is wrong with it, so a client can fix its request without
reading the agent's logs.
"""

from __future__ import annotations

import math
from array import array as c_array
from collections.abc import Mapping
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
        tensors[name] = decode_tensor(item, input_named(spec, name, tensors))
    return tensors


def input_named(spec: ModelSpec, name: str, decoded: Mapping[str, object]) -> TensorSpec:
    """The model's input ``name``, not among those ``decoded`` already; every front end's rule."""
    tspec = spec.input(name)
    if tspec is None:
        known = ", ".join(t.name for t in spec.inputs)
        raise BadRequest(f"model {spec.name} has no input {name!r} (its inputs: {known})")
    if name in decoded:
        raise BadRequest(f"input {name!r} is given twice")
    return tspec


def decode_tensor(item: dict[str, Any], tspec: TensorSpec) -> np.ndarray:
    name = tspec.name
    datatype = item.get("datatype")
    if datatype != tspec.datatype:
        raise BadRequest(f"input {name}: datatype {datatype!r} does not match the model's {tspec.datatype}")
    shape = item.get("shape")
    if (
        not isinstance(shape, list)
        or not shape
        or not (
            min(shape) >= 0  # all plain ints (the common case, at C speed)
            if set(map(type, shape)) == _INTS
            else all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        )
    ):
        raise BadRequest(f"input {name}: shape must be a non-empty list of non-negative integers")
    if len(shape) != len(tspec.shape) or tuple(shape[1:]) != tspec.row_shape:
        raise BadRequest(f"input {name}: shape {shape} does not match the model's {list(tspec.shape)}")
    params = item.get("parameters")
    if params and isinstance(params, dict) and "binary_data_size" in params:
        raise BadRequest(
            f"input {name}: binary_data_size is set but the request has no binary part "
            "(send the JSON part's length in the Inference-Header-Content-Length header)"
        )
    if "data" not in item:
        raise BadRequest(f"input {name}: 'data' is missing")
    data = item["data"]
    if not isinstance(data, list):
        raise BadRequest(f"input {name}: 'data' must be a list")
    array = _to_array(name, tspec.datatype, tspec.dtype, data)
    expected = math.prod(shape)
    if array.size != expected:
        raise BadRequest(f"input {name}: shape {shape} needs {expected} elements, data holds {array.size}")
    return array.reshape(shape)


def _to_array(name: str, datatype: str, dtype: np.dtype, data: list[Any]) -> np.ndarray:
    """``data`` as an array of ``dtype``, or BadRequest when a value is not of the datatype.

    The JSON value types are checked first: NumPy would quietly read ``true``
    as 1, ``null`` as NaN and ``"1.5"`` as a number.
    """
    types = set(map(type, data))
    flat = list not in types
    if not flat:
        types = _leaf_types(data)
    kind = dtype.kind
    try:
        if kind == "f" and types <= _NUMBERS:  # the common case, first
            if flat and dtype == _NATIVE_F32:
                # A flat FP32 list: array("f") narrows each double as NumPy's cast does (bit for bit,
                # overflow included) in half the time of the checked cast below. JSON values are
                # finite, so a non-finite sum (in doubles: finite floats cannot overflow it) means
                # a value narrowed to infinity.
                buf = c_array("f", data)
                if math.isfinite(sum(buf)):
                    return np.frombuffer(buf, dtype=_NATIVE_F32)
            if dtype.itemsize == 8:  # orjson refuses numbers beyond float64
                return np.asarray(data, dtype=dtype)
            # JSON has no infinity: a value the narrowing turns into one was out of range. A value
            # just above the largest that rounds down to it is kept, as IEEE rounding does. The cast
            # checks itself: a separate check with NumPy ufuncs cost a fifth of bench_core's HTTP rate.
            try:
                with np.errstate(over="raise"):
                    return np.asarray(data, dtype=dtype)
            except FloatingPointError as exc:
                largest = float(np.finfo(dtype).max)
                raise BadRequest(
                    f"input {name}: values out of range for {datatype} (largest magnitude {largest:.7g})"
                ) from exc
        _check_types(name, datatype, kind, types)
        raw = np.asarray(data)
        if kind == "b":
            return raw.astype(dtype)
        if raw.dtype.kind not in "iu":
            # Integers beyond int64 mixed with small ones come out as float64 (lossy) or
            # objects: convert exactly, and let NumPy say when one does not fit.
            return np.asarray(data, dtype=dtype)
        array = raw.astype(dtype, casting="unsafe")
        if not np.array_equal(array, raw):
            raise BadRequest(f"input {name}: values out of range for {datatype}")
        return array
    except BadRequest:
        raise
    except OverflowError as exc:
        raise BadRequest(f"input {name}: values out of range for {datatype}") from exc
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"input {name}: data is not a well-formed {datatype} tensor ({exc})") from exc


def _check_types(name: str, datatype: str, kind: str, types: set[type]) -> None:
    if kind == "b":
        if types - {bool}:
            raise BadRequest(f"input {name}: BOOL data must hold true/false only, got {_json_types(types - {bool})}")
    elif bool in types:
        raise BadRequest(f"input {name}: {datatype} data must hold numbers, not true/false")
    elif kind == "f":
        raise BadRequest(
            f"input {name}: data is not a well-formed {datatype} tensor: "
            f"it must hold numbers only, got {_json_types(types - _NUMBERS)}"
        )
    elif types - {int}:
        raise BadRequest(f"input {name}: {datatype} data must hold integers only, got {_json_types(types - {int})}")


_NUMBERS = frozenset((int, float))
_INTS = {int}
_NATIVE_F32 = np.dtype(np.float32)
_JSON_NAMES = {int: "integer", float: "number", bool: "true/false", str: "string", dict: "object", type(None): "null"}


def _json_types(types: set[type]) -> str:
    return ", ".join(sorted(_JSON_NAMES.get(t, t.__name__) for t in types))


def _leaf_types(data: list[Any]) -> set[type]:
    """The Python types of the scalars in a (nested) JSON list, at C speed for flat lists."""
    types = set(map(type, data))
    if list in types:
        types.discard(list)
        for item in data:
            if type(item) is list:
                types |= _leaf_types(item)
    return types


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
        result.append(output_named(spec, name))
    return result


def output_named(spec: ModelSpec, name: str) -> TensorSpec:
    """The model's output ``name``; every front end's rule for a requested output."""
    tspec = spec.output(name)
    if tspec is None:
        known = ", ".join(t.name for t in spec.outputs)
        raise BadRequest(f"model {spec.name} has no output {name!r} (its outputs: {known})")
    return tspec


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
