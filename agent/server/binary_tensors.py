"""Triton's binary tensor data extension of the Open Inference Protocol REST API.

A request body is ``<JSON header><binary data>``; the length of the JSON part
is the ``Inference-Header-Content-Length`` header (without the header the body
is plain JSON, whatever its ``Content-Type``). An input whose
``parameters.binary_data_size`` is set takes that many bytes of the binary
part, in input order: raw little-endian row-major data of its datatype (BOOL
one byte per element, 0 or 1; BYTES a 4-byte little-endian length and the
bytes, per element). The rest of the inputs carry JSON ``data`` as usual.

Outputs are sent as binary data when the request's
``parameters.binary_data_output`` is true, unless an output asks otherwise
with its own ``parameters.binary_data``. A binary output carries
``parameters.binary_data_size`` instead of ``data`` and its bytes follow the
JSON header in output order; the response then has ``Content-Type:
application/octet-stream`` and its own ``Inference-Header-Content-Length``
(tritonclient.http and KServe's ``InferenceRESTClient`` read both forms).

Every length in a request is checked against the body it came in (itself
bounded by ``max_body_bytes``) before anything is allocated from it, and every
malformed request is a :class:`BadRequest` naming what is wrong.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import orjson

from agent.errors import BadRequest
from agent.server.http import Request, Response
from agent.server.tensors import decode_tensor, encode_outputs, input_named, output_named
from agent.spec import DATATYPES, ModelSpec, TensorSpec

# The request header as the HTTP server keeps it (names lower-cased), and as a response spells it.
INFERENCE_HEADER = "inference-header-content-length"
RESPONSE_HEADER = "Inference-Header-Content-Length"
_LENGTH = struct.Struct("<I")
# More digits than any body length the HTTP server admits; a longer value is refused before int().
_MAX_HEADER_DIGITS = 19


class ExtendedRequest:
    """A decoded request: its JSON part, its inputs, and which outputs to send and how."""

    def __init__(
        self,
        *,
        doc: dict[str, Any],
        tensors: dict[str, np.ndarray],
        outputs: list[TensorSpec],
        binary: list[bool],
    ):
        self.doc = doc
        self.tensors = tensors
        self.outputs = outputs
        self.binary = binary

    def respond(self, model_name: str, model_version: str, outputs: dict[str, np.ndarray]) -> Response:
        """The 200 response carrying ``outputs`` (every output of the model, by name)."""
        body: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
        request_id = self.doc.get("id")
        if request_id is not None:
            body["id"] = request_id
        if not any(self.binary):
            body["outputs"] = encode_outputs(self.outputs, outputs)
            return Response.json(200, body)
        items: list[dict[str, Any]] = []
        blobs: list[bytes | memoryview] = []
        for tspec, binary in zip(self.outputs, self.binary, strict=True):
            if not binary:
                items.extend(encode_outputs([tspec], outputs))
                continue
            array = outputs[tspec.name]
            raw = tensor_to_bytes(array, tspec.datatype)
            items.append(
                {
                    "name": tspec.name,
                    "datatype": tspec.datatype,
                    "shape": list(array.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            )
            blobs.append(raw)
        body["outputs"] = items
        head = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        return Response(
            200,
            b"".join([head, *blobs]),
            content_type="application/octet-stream",
            headers=[(RESPONSE_HEADER, str(len(head)))],
        )


def decode_request(spec: ModelSpec, request: Request, header_length: str | None, doc: Any = None) -> ExtendedRequest:
    """Decode a request with a binary part (``header_length`` given) or a JSON one (``doc``, parsed).

    A JSON request comes here when it may ask for binary outputs (it has
    request ``parameters`` or names its ``outputs``); it may not carry binary
    inputs.
    """
    if header_length is None:
        blob = memoryview(b"")
    else:
        encoding = request.headers.get("content-encoding", "identity")
        if encoding.strip().lower() != "identity":
            raise BadRequest(f"Content-Encoding {encoding[:40]!r} is not supported; send the body uncompressed")
        body = request.body
        size = parse_header_length(header_length, len(body))
        view = memoryview(body)
        try:
            doc = orjson.loads(view[:size])
        except orjson.JSONDecodeError as exc:
            raise BadRequest(
                f"the JSON header (the first {size} bytes of the body, per Inference-Header-Content-Length) "
                f"is not valid JSON: {exc}"
            ) from exc
        blob = view[size:]
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    tensors = decode_inputs(doc, spec, blob, has_binary_part=header_length is not None)
    outputs, binary = requested_outputs(doc, spec)
    return ExtendedRequest(doc=doc, tensors=tensors, outputs=outputs, binary=binary)


def parse_header_length(value: str, body_size: int) -> int:
    """The JSON part's length from ``Inference-Header-Content-Length``: a decimal within the body."""
    text = value.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= _MAX_HEADER_DIGITS):
        raise BadRequest(f"Inference-Header-Content-Length must be a non-negative integer, got {value[:40]!r}")
    size = int(text)
    if size > body_size:
        raise BadRequest(f"Inference-Header-Content-Length {size} is larger than the request body ({body_size} bytes)")
    return size


def decode_inputs(
    doc: dict[str, Any], spec: ModelSpec, blob: memoryview, *, has_binary_part: bool
) -> dict[str, np.ndarray]:
    """Every input, each from JSON ``data`` or its share of ``blob``; the shares must use up ``blob``."""
    items = doc.get("inputs")
    if not isinstance(items, list) or not items:
        raise BadRequest("request needs a non-empty 'inputs' list")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest(f"inputs[{index}] must be an object")
        name = item.get("name")
        if not isinstance(name, str):
            raise BadRequest(f"inputs[{index}].name must be a string")
        tspec = input_named(spec, name, tensors)
        params = item.get("parameters")
        if isinstance(params, dict) and "shared_memory_region" in params:
            raise BadRequest(f"input {name}: the shared-memory extensions are not supported; send the data")
        if not isinstance(params, dict) or "binary_data_size" not in params:
            tensors[name] = decode_tensor(item, tspec)  # JSON data, with every check the JSON API makes
            continue
        if not has_binary_part:
            raise BadRequest(
                f"input {name}: binary_data_size is set but the request has no binary part "
                "(send the JSON part's length in the Inference-Header-Content-Length header)"
            )
        size = params["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest(f"input {name}: binary_data_size must be a non-negative integer, got {size!r}")
        if "data" in item:
            raise BadRequest(f"input {name}: give either 'data' or parameters.binary_data_size, not both")
        datatype = item.get("datatype")
        if datatype != tspec.datatype:
            raise BadRequest(f"input {name}: datatype {datatype!r} does not match the model's {tspec.datatype}")
        shape = _shape(name, item.get("shape"))
        if len(shape) != len(tspec.shape) or tuple(shape[1:]) != tspec.row_shape:
            raise BadRequest(f"input {name}: shape {shape} does not match the model's {list(tspec.shape)}")
        left = len(blob) - offset
        if size > left:
            raise BadRequest(
                f"input {name}: binary_data_size {size} runs past the end of the body "
                f"({left} bytes of binary data left for it; truncated?)"
            )
        tensors[name] = tensor_from_bytes(name, tspec.datatype, shape, blob[offset : offset + size])
        offset += size
    if offset != len(blob):
        raise BadRequest(
            f"the body holds {len(blob)} bytes after its JSON header but the inputs' binary_data_size "
            f"add up to {offset}: {len(blob) - offset} bytes are left over"
        )
    return tensors


def _shape(name: str, shape: Any) -> list[int]:
    if (
        not isinstance(shape, list)
        or not shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise BadRequest(f"input {name}: shape must be a non-empty list of non-negative integers")
    return shape


def requested_outputs(doc: dict[str, Any], spec: ModelSpec) -> tuple[list[TensorSpec], list[bool]]:
    """The outputs to send, in order, and for each whether it goes as binary data."""
    params = doc.get("parameters")
    default = False
    if params is not None:
        if not isinstance(params, dict):
            raise BadRequest("'parameters' must be an object")
        default = _flag(params, "binary_data_output", "parameters.binary_data_output", False)
    wanted = doc.get("outputs")
    if wanted is None:
        return list(spec.outputs), [default] * len(spec.outputs)
    if not isinstance(wanted, list):
        raise BadRequest("'outputs' must be a list")
    outputs: list[TensorSpec] = []
    binary: list[bool] = []
    for index, item in enumerate(wanted):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            raise BadRequest(f"outputs[{index}].name must be a string")
        tspec = output_named(spec, name)
        oparams = item.get("parameters")
        flag = default
        if oparams is not None:
            if not isinstance(oparams, dict):
                raise BadRequest(f"output {name}: 'parameters' must be an object")
            if oparams.get("classification", 0) != 0:
                raise BadRequest(
                    f"output {name}: the classification extension is not supported; ask for the tensor itself"
                )
            if "shared_memory_region" in oparams:
                raise BadRequest(f"output {name}: the shared-memory extensions are not supported")
            flag = _flag(oparams, "binary_data", f"output {name}: parameters.binary_data", default)
        outputs.append(tspec)
        binary.append(flag)
    return outputs, binary


def _flag(params: dict[str, Any], key: str, what: str, default: bool) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{what} must be true or false, got {value!r}")
    return value


# -- tensors <-> bytes ---------------------------------------------------------------------------


def tensor_from_bytes(name: str, datatype: str, shape: list[int], raw: bytes | memoryview) -> np.ndarray:
    """A tensor from its raw binary data (no copy for fixed-width datatypes: a view of ``raw``)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return bytes_from_binary(name, raw, count).reshape(shape)
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise BadRequest(f"input {name}: unknown datatype {datatype!r}")
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise BadRequest(
            f"input {name}: binary_data_size {len(raw)} does not match shape {shape} of {datatype} ({expected} bytes)"
        )
    if datatype == "BOOL":
        octets = np.frombuffer(raw, dtype=np.uint8)
        if octets.size and int(octets.max()) > 1:
            raise BadRequest(f"input {name}: BOOL data must hold bytes 0 and 1 only")
        return octets.view(np.bool_).reshape(shape)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def tensor_to_bytes(array: np.ndarray, datatype: str) -> bytes | memoryview:
    """A tensor's raw binary data: little-endian row-major, or BYTES' length-prefixed elements."""
    if datatype == "BYTES":
        return bytes_to_binary(array)
    contiguous = np.ascontiguousarray(array, dtype=DATATYPES[datatype])
    return contiguous.reshape(-1).view(np.uint8).data


def bytes_from_binary(name: str, raw: bytes | memoryview, count: int) -> np.ndarray:
    """``count`` BYTES elements (each a 4-byte little-endian length and its bytes) filling ``raw`` exactly."""
    size = len(raw)
    if count * _LENGTH.size > size:
        raise BadRequest(
            f"input {name}: {count} BYTES elements need at least {count * _LENGTH.size} bytes, "
            f"its binary data holds {size}"
        )
    elements = np.empty(count, dtype=object)
    offset = 0
    for index in range(count):
        if size - offset < _LENGTH.size:
            raise BadRequest(f"input {name}: BYTES element {index} has no length (the data ends at byte {offset})")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if length > size - offset:
            raise BadRequest(f"input {name}: BYTES element {index} claims {length} bytes, {size - offset} are left")
        elements[index] = bytes(raw[offset : offset + length])
        offset += length
    if offset != size:
        raise BadRequest(f"input {name}: {size - offset} bytes follow the last of its {count} BYTES elements")
    return elements


def bytes_to_binary(array: np.ndarray) -> bytes:
    """BYTES elements (bytes, or str sent as UTF-8) as 4-byte little-endian lengths and bytes, row-major."""
    parts: list[bytes] = []
    for item in np.asarray(array, dtype=object).reshape(-1):
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def bytes_from_json(name: str, data: Any, count: int) -> np.ndarray:
    """BYTES elements from JSON ``data``: a (nested) list of strings, sent as UTF-8."""
    if not isinstance(data, list):
        raise BadRequest(f"input {name}: 'data' must be a list")
    flat: list[str] = []
    _flatten(data, flat)
    if not all(type(s) is str for s in flat):
        raise BadRequest(f"input {name}: BYTES data must hold strings only")
    if len(flat) != count:
        raise BadRequest(f"input {name}: the shape needs {count} elements, data holds {len(flat)}")
    elements = np.empty(count, dtype=object)
    for index, text in enumerate(flat):
        elements[index] = text.encode()
    return elements


def bytes_to_json(name: str, array: np.ndarray) -> list[str]:
    """BYTES elements as JSON strings; an element that is not UTF-8 can only go as binary data."""
    out: list[str] = []
    for index, item in enumerate(np.asarray(array, dtype=object).reshape(-1)):
        if isinstance(item, str):
            out.append(item)
            continue
        try:
            out.append(bytes(item).decode())
        except UnicodeDecodeError as exc:
            raise BadRequest(
                f"output {name}: BYTES element {index} is not UTF-8 text; ask for it as binary data"
            ) from exc
    return out


def _flatten(data: list[Any], into: list[Any]) -> None:
    """The leaves of a nested list, in order (iteratively: nesting is as deep as the parser allows)."""
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if type(item) is list:
                stack.append(iter(item))
                break
            into.append(item)
        else:
            stack.pop()
