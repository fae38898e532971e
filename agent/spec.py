"""Model metadata (``model.json``, schema ``edge-agent.model/v1``): parse and validate.

See docs/MODEL_ABI.md. Everything the host needs to drive a module through
the ABI — tensor names, datatypes, shapes, parameter order, warm-up input —
comes from here, so no code path is tied to one particular model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from agent.errors import InvalidModel

SCHEMA = "edge-agent.model/v1"
SUPPORTED_ABI_VERSIONS = (1, 2)
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,62}$")

# Open Inference Protocol datatypes and the NumPy dtype each is stored as
# (little-endian, as wasm memory is). BYTES has no fixed width: not in v1.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# BYTES (variable-length strings) is not stored in any tensor buffer: only a WASI-NN command app
# (agent/llm/command_apps.py, its prompt and its text) declares it; its NumPy form holds objects.
BYTES = "BYTES"
BYTES_DTYPE = np.dtype(object)
# safetensors spells datatypes differently.
SAFETENSORS_DTYPES = {
    "BOOL": "BOOL",
    "UINT8": "U8",
    "UINT16": "U16",
    "UINT32": "U32",
    "UINT64": "U64",
    "INT8": "I8",
    "INT16": "I16",
    "INT32": "I32",
    "INT64": "I64",
    "FP16": "F16",
    "FP32": "F32",
    "FP64": "F64",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # inputs/outputs: shape[0] == -1 (batch)

    @property
    def dtype(self) -> np.dtype:
        try:
            return DATATYPES[self.datatype]
        except KeyError:  # BYTES, a command app's: see BYTES_DTYPE
            return BYTES_DTYPE

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def row_elements(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def row_bytes(self) -> int:
        return self.row_elements * self.dtype.itemsize

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


# Bounds on dynamic batching settings (model.json ``dynamic_batching`` and the agent's ``[batching.<model>]``).
MAX_QUEUE_DELAY_US = 60_000_000
MAX_QUEUE_SIZE = 65536
DEFAULT_QUEUE_SIZE = 256
BATCHING_KEYS = ("max_queue_delay_us", "preferred_batch_sizes", "max_queue_size")


@dataclass(frozen=True)
class BatchingSpec:
    """Dynamic batching of one model (Triton's ``dynamic_batching``); see agent/server/batching.py."""

    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = DEFAULT_QUEUE_SIZE

    @classmethod
    def from_dict(cls, doc: Any, where: str, max_batch: int | None = None) -> BatchingSpec:
        """Parse and check a settings table; ``max_batch`` (when known) bounds the preferred sizes.

        Raises ValueError with a message naming ``where``; callers turn it into their own error.
        """
        if not isinstance(doc, dict):
            raise ValueError(f"{where} must be an object")
        unknown = sorted(set(doc) - set(BATCHING_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(BATCHING_KEYS)})")
        delay = doc.get("max_queue_delay_us", 0)
        if not _is_int(delay) or not 0 <= delay <= MAX_QUEUE_DELAY_US:
            raise ValueError(f"{where}.max_queue_delay_us must be an integer in 0..{MAX_QUEUE_DELAY_US}, got {delay!r}")
        size = doc.get("max_queue_size", DEFAULT_QUEUE_SIZE)
        if not _is_int(size) or not 1 <= size <= MAX_QUEUE_SIZE:
            raise ValueError(f"{where}.max_queue_size must be an integer in 1..{MAX_QUEUE_SIZE}, got {size!r}")
        sizes = doc.get("preferred_batch_sizes", [])
        if not isinstance(sizes, list) or not all(_is_int(n) and n >= 1 for n in sizes):
            raise ValueError(f"{where}.preferred_batch_sizes must be a list of positive integers, got {sizes!r}")
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"{where}.preferred_batch_sizes has duplicates: {sizes!r}")
        if max_batch is not None and any(n > max_batch for n in sizes):
            raise ValueError(f"{where}.preferred_batch_sizes must not exceed max_batch ({max_batch}): {sizes!r}")
        return cls(max_queue_delay_us=delay, preferred_batch_sizes=tuple(sorted(sizes)), max_queue_size=size)

    def to_json(self) -> dict[str, Any]:
        return {
            "max_queue_delay_us": self.max_queue_delay_us,
            "preferred_batch_sizes": list(self.preferred_batch_sizes),
            "max_queue_size": self.max_queue_size,
        }


WASI_NN_ENCODINGS = ("onnx", "ggml", "pytorch")
WASI_NN_TARGETS = ("cpu", "gpu", "auto")
WASI_NN_APPS = ("reactor", "command")
# A WASI-NN model directory's weights file when model.json's files.weights does not name it.
WASI_NN_DEFAULT_WEIGHTS = {"onnx": "model.onnx", "ggml": "model.gguf", "pytorch": "model.pt"}


@dataclass(frozen=True)
class WasiNnSpec:
    """``model.json``'s ``wasi_nn`` section: the module imports ``wasi_ephemeral_nn`` and its weights
    layer is the backend's own model file (docs/WASI_NN.md).

    ``app``: ``reactor`` modules export the Model ABI (``ea_*``) and call WASI-NN from ``ea_init`` /
    ``ea_run``; ``command`` modules are WASI commands (WasmEdge's example apps), run once per request
    with ``args`` and the prompt as the last argument.
    """

    encoding: str
    target: str = "auto"
    name: str = "default"  # the name the app passes to load_by_name
    config: dict[str, Any] = field(default_factory=dict)  # default graph options (ggml: ctx-size, n-predict...)
    app: str = "reactor"
    args: tuple[str, ...] = ()
    gpu_memory_mb: int = 0  # what the model needs on a GPU (admission against the GPU budget)
    # Command apps: their environment (WasmEdge's example apps read n_predict, ctx_size... from it).
    env: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_dict(cls, doc: Any) -> WasiNnSpec:
        if not isinstance(doc, dict):
            raise InvalidModel("wasi_nn must be an object")
        unknown = set(doc) - {"encoding", "target", "name", "config", "app", "args", "gpu_memory_mb", "env"}
        if unknown:
            raise InvalidModel(f"wasi_nn has unknown keys {sorted(unknown)}")
        encoding = doc.get("encoding")
        if encoding not in WASI_NN_ENCODINGS:
            raise InvalidModel(f"wasi_nn.encoding must be one of {WASI_NN_ENCODINGS}, got {encoding!r}")
        target = doc.get("target", "auto")
        if target not in WASI_NN_TARGETS:
            raise InvalidModel(f"wasi_nn.target must be one of {WASI_NN_TARGETS}, got {target!r}")
        name = doc.get("name", "default")
        if not isinstance(name, str) or not 0 < len(name) <= 128:
            raise InvalidModel("wasi_nn.name must be a string of 1..128 characters")
        config = doc.get("config", {})
        if not isinstance(config, dict):
            raise InvalidModel("wasi_nn.config must be an object")
        app = doc.get("app", "reactor")
        if app not in WASI_NN_APPS:
            raise InvalidModel(f"wasi_nn.app must be one of {WASI_NN_APPS}, got {app!r}")
        args = doc.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args) or len(args) > 64:
            raise InvalidModel("wasi_nn.args must be a list of at most 64 strings")
        env = doc.get("env", {})
        if (
            not isinstance(env, dict)
            or len(env) > 64
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
            or any(not k or "=" in k or "\0" in k or "\0" in v or len(k) + len(v) > 4096 for k, v in env.items())
        ):
            raise InvalidModel("wasi_nn.env must map at most 64 variable names (no '=') to strings")
        gpu_mb = doc.get("gpu_memory_mb", 0)
        if not _is_int(gpu_mb) or gpu_mb < 0:
            raise InvalidModel("wasi_nn.gpu_memory_mb must be a non-negative integer")
        return cls(
            encoding=encoding,
            target=target,
            name=name,
            config=dict(config),
            app=app,
            args=tuple(args),
            gpu_memory_mb=gpu_mb,
            env=tuple(sorted(env.items())),
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    abi_version: int
    max_batch: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    params: tuple[TensorSpec, ...]
    warmup_inputs: dict[str, np.ndarray]
    warmup_outputs: dict[str, np.ndarray]
    warmup_rtol: float = 1e-4
    warmup_atol: float = 1e-5
    memory_limit_mb: int | None = None
    timeout_ms: int | None = None
    description: str = ""
    files: dict[str, str] = field(default_factory=dict)
    # Optional (absent: no batching); agents that predate it ignore the key.
    dynamic_batching: BatchingSpec | None = None
    # Optional: a WASI-NN app (agent/wasinn); absent for pure-wasm models.
    wasi_nn: WasiNnSpec | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def module_file(self) -> str:
        return self.files.get("module", "model.wasm")

    @property
    def weights_file(self) -> str:
        if self.wasi_nn is not None:
            return self.files.get("weights", WASI_NN_DEFAULT_WEIGHTS[self.wasi_nn.encoding])
        return self.files.get("weights", "weights.safetensors")

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)

    def metadata(self) -> dict[str, Any]:
        """The Open Inference Protocol model-metadata body."""
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": f"wasm-abi-v{self.abi_version}",
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }

    @classmethod
    def from_bytes(cls, data: bytes) -> ModelSpec:
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise InvalidModel(f"model.json is not valid JSON: {exc}") from exc
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Any) -> ModelSpec:
        if not isinstance(doc, dict):
            raise InvalidModel("model.json must be a JSON object")
        if doc.get("schema") != SCHEMA:
            raise InvalidModel(f"model.json schema must be {SCHEMA!r}, got {doc.get('schema')!r}")
        name = _str(doc, "name")
        if not NAME_RE.match(name):
            raise InvalidModel(f"model name {name!r} must match {NAME_RE.pattern}")
        version = _str(doc, "version")
        if not VERSION_RE.match(version):
            raise InvalidModel(f"model version {version!r} must match {VERSION_RE.pattern}")
        abi = doc.get("abi_version")
        if abi not in SUPPORTED_ABI_VERSIONS:
            raise InvalidModel(
                f"model {name}:{version} needs ABI version {abi!r}; this agent supports {SUPPORTED_ABI_VERSIONS}"
            )
        max_batch = doc.get("max_batch")
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or not 1 <= max_batch <= 65536:
            raise InvalidModel(f"max_batch must be an integer in 1..65536, got {max_batch!r}")
        # -- BYTES for WASI-NN command apps (agent/llm/command_apps.py) --
        wasi_nn = WasiNnSpec.from_dict(doc["wasi_nn"]) if doc.get("wasi_nn") is not None else None
        command_app = wasi_nn is not None and wasi_nn.app == "command"
        inputs = _tensors(doc, "inputs", batched=True, allow_bytes=command_app)
        outputs = _tensors(doc, "outputs", batched=True, allow_bytes=command_app)
        # -- end --
        params = _tensors(doc, "params", batched=False, allow_empty=True)
        if not inputs or not outputs:
            raise InvalidModel("a model needs at least one input and one output")

        warmup = doc.get("warmup") or {}
        if not isinstance(warmup, dict):
            raise InvalidModel("warmup must be an object")
        warmup_inputs = _warmup_tensors(warmup.get("inputs"), inputs, "inputs", max_batch)
        # A command app is not warmed up (it runs per request): its warm-up is optional.
        if set(warmup_inputs) != {t.name for t in inputs} and not (command_app and not warmup_inputs):
            raise InvalidModel("warmup.inputs must give every input of the model")
        warmup_outputs = _warmup_tensors(warmup.get("outputs"), outputs, "outputs", max_batch)

        resources = doc.get("resources") or {}
        if not isinstance(resources, dict):
            raise InvalidModel("resources must be an object")
        files = doc.get("files") or {}
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise InvalidModel("files must map artefact kinds to file names")
        for fname in files.values():
            if "/" in fname or fname in ("", ".", ".."):
                raise InvalidModel(f"files entry {fname!r} must be a plain file name")
        batching = None
        if doc.get("dynamic_batching") is not None:
            if max_batch < 2:
                raise InvalidModel(f"dynamic_batching needs max_batch above 1; model {name}:{version} has max_batch 1")
            try:
                batching = BatchingSpec.from_dict(doc["dynamic_batching"], "dynamic_batching", max_batch)
            except ValueError as exc:
                raise InvalidModel(str(exc)) from None
        return cls(
            name=name,
            version=version,
            abi_version=abi,
            max_batch=max_batch,
            inputs=inputs,
            outputs=outputs,
            params=params,
            warmup_inputs=warmup_inputs,
            warmup_outputs=warmup_outputs,
            warmup_rtol=float(warmup.get("rtol", 1e-4)),
            warmup_atol=float(warmup.get("atol", 1e-5)),
            memory_limit_mb=_opt_int(resources, "memory_limit_mb"),
            timeout_ms=_opt_int(resources, "timeout_ms"),
            description=str(doc.get("description", "")),
            files=dict(files),
            dynamic_batching=batching,
            wasi_nn=wasi_nn,
            raw=doc,
        )


def _str(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidModel(f"model.json needs a non-empty string {key!r}")
    return value


def _opt_int(doc: dict[str, Any], key: str) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidModel(f"resources.{key} must be a positive integer, got {value!r}")
    return value


def _tensors(
    doc: dict[str, Any], key: str, batched: bool, allow_empty: bool = False, allow_bytes: bool = False
) -> tuple[TensorSpec, ...]:
    items = doc.get(key, [] if allow_empty else None)
    if not isinstance(items, list):
        raise InvalidModel(f"{key} must be a list of tensors")
    seen: set[str] = set()
    specs = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise InvalidModel(f"{where} must be an object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidModel(f"{where}.name must be a non-empty string")
        if name in seen:
            raise InvalidModel(f"{where}: duplicate tensor name {name!r}")
        seen.add(name)
        datatype = item.get("datatype")
        if datatype not in DATATYPES and not (allow_bytes and datatype == BYTES):
            also = " (BYTES only for a WASI-NN command app)" if datatype == BYTES else ""
            raise InvalidModel(f"{where}.datatype {datatype!r} is not one of {', '.join(DATATYPES)}{also}")
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidModel(f"{where}.shape must be a list of integers")
        if batched:
            if not shape or shape[0] != -1:
                raise InvalidModel(f"{where}.shape must start with -1, the batch dimension")
            if any(d < 1 for d in shape[1:]):
                raise InvalidModel(f"{where}.shape: only the batch dimension may be dynamic")
        elif any(d < 0 for d in shape):
            raise InvalidModel(f"{where}.shape must be fully known for a parameter")
        specs.append(TensorSpec(name, datatype, tuple(shape)))
    return tuple(specs)


def _warmup_tensors(doc: Any, specs: tuple[TensorSpec, ...], key: str, max_batch: int) -> dict[str, np.ndarray]:
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise InvalidModel(f"warmup.{key} must be an object")
    by_name = {t.name: t for t in specs}
    result: dict[str, np.ndarray] = {}
    for name, tensor in doc.items():
        spec = by_name.get(name)
        if spec is None:
            raise InvalidModel(f"warmup.{key} names unknown tensor {name!r}")
        if not isinstance(tensor, dict) or "data" not in tensor or "shape" not in tensor:
            raise InvalidModel(f"warmup.{key}.{name} needs shape and data")
        try:
            array = np.asarray(tensor["data"], dtype=spec.dtype).reshape(tensor["shape"])
        except (TypeError, ValueError) as exc:
            raise InvalidModel(f"warmup.{key}.{name}: {exc}") from exc
        if array.ndim != len(spec.shape) or tuple(array.shape[1:]) != spec.row_shape:
            raise InvalidModel(f"warmup.{key}.{name} has shape {list(array.shape)}, model says {list(spec.shape)}")
        if not 1 <= array.shape[0] <= max_batch:
            raise InvalidModel(f"warmup.{key}.{name}: batch must be in 1..{max_batch}")
        result[name] = array
    return result
