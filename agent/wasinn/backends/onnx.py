"""The ONNX backend: onnxruntime, with the CUDA execution provider when onnxruntime-gpu and a GPU are present.

Inputs and outputs are addressed by index in the graph's declared order (as
WasmEdge's and Wasmtime's ONNX backends do). A model file is handed to
onnxruntime by path, so its weights are read by onnxruntime itself rather
than copied through Python.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.wasinn.abi import DTYPES, Errno, ExecutionTarget, GraphEncoding, NnError, TensorType
from agent.wasinn.backend import ComputedOutputs, Tensor

# onnxruntime's type strings -> the WASI-NN tensor type a guest must pass.
_ORT_TYPES: dict[str, TensorType] = {
    "tensor(float16)": TensorType.F16,
    "tensor(float)": TensorType.F32,
    "tensor(double)": TensorType.F64,
    "tensor(uint8)": TensorType.U8,
    "tensor(int32)": TensorType.I32,
    "tensor(int64)": TensorType.I64,
}


class OnnxBackend:
    name = "onnxruntime"
    encoding = GraphEncoding.ONNX

    def __init__(self, *, options: dict[str, Any]):
        # intra-op threads per session: 0 lets onnxruntime pick (one per core).
        self._threads = int(options.get("intra_op_threads", 0))
        self._providers = ort.get_available_providers()
        # external_data: a model file's initializers may lie in files beside it (ONNX's external data).
        # Off unless the operator names the files (`wasi run --nn-preload`): an image's weights blob lies
        # beside every other blob of the store, and a guest's bytes would resolve against the agent's
        # working directory ("/" under systemd), so any file it can read could become a weight.
        self._external_data = bool(options.get("external_data", False))

    def describe(self) -> dict[str, Any]:
        devices = ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in self._providers else [])
        return {"version": ort.__version__, "devices": devices}

    def _session(
        self, model: bytes | str, target: ExecutionTarget, config: dict[str, Any], *, external_data: bool = False
    ) -> tuple[ort.InferenceSession, str]:
        providers: list[Any] = ["CPUExecutionProvider"]
        device = "cpu"
        if target in (ExecutionTarget.GPU, ExecutionTarget.AUTO) and "CUDAExecutionProvider" in self._providers:
            # The device the GPU scheduler leased this version (agent/wasinn/gpu.py placement), else the first.
            index = config.get("device_index", 0)
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise NnError(Errno.INVALID_ARGUMENT, f"device_index must be a GPU index, got {index!r}")
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
            device = f"cuda:{index}"
        elif target is ExecutionTarget.GPU:
            raise NnError(Errno.UNSUPPORTED_OPERATION, "target gpu asked, but onnxruntime has no CUDA provider here")
        elif target is ExecutionTarget.TPU:
            raise NnError(Errno.UNSUPPORTED_OPERATION, "target tpu is not supported by the onnxruntime backend")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._threads
        with tempfile.TemporaryDirectory(prefix="edge-agent-onnx-") as empty:
            if not external_data:
                # External data resolves in an empty directory of ours (onnxruntime refuses absolute
                # paths and ones that leave it): a model naming any is refused, "does not exist".
                opts.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
            try:
                session = ort.InferenceSession(model, sess_options=opts, providers=providers)
            except Exception as exc:  # noqa: BLE001 -- onnxruntime raises its own classes for a bad model
                raise NnError(Errno.INVALID_ARGUMENT, f"onnxruntime cannot load the model: {exc}") from None
        return session, device

    def load_bytes(self, builders: Sequence[bytes], target: ExecutionTarget, config: dict[str, Any]) -> OnnxGraph:
        if len(builders) != 1:
            raise NnError(Errno.INVALID_ARGUMENT, f"an ONNX graph is one builder, got {len(builders)}")
        session, device = self._session(builders[0], target, config)
        return OnnxGraph(session, device)

    def load_file(self, path: Path, target: ExecutionTarget, config: dict[str, Any]) -> OnnxGraph:
        session, device = self._session(str(path), target, config, external_data=self._external_data)
        return OnnxGraph(session, device)


class OnnxGraph:
    backend = "onnxruntime"
    truncates_output = False

    def __init__(self, session: ort.InferenceSession, device: str):
        self.session = session
        self.device = device
        self.inputs = session.get_inputs()
        self.output_names = [o.name for o in session.get_outputs()]

    def init_execution_context(self) -> OnnxContext:
        return OnnxContext(self)

    def close(self) -> None:
        # onnxruntime frees a session when its last reference goes.
        self.inputs = []


class OnnxContext(ComputedOutputs):
    def __init__(self, graph: OnnxGraph):
        self._graph = graph
        self._inputs: dict[int, np.ndarray] = {}
        self._outputs: list[bytes] | None = None

    def set_input(self, index: int, tensor: Tensor) -> None:
        inputs = self._graph.inputs
        if not 0 <= index < len(inputs):
            raise NnError(Errno.INVALID_ARGUMENT, f"input index {index}; the graph has {len(inputs)} inputs")
        want = _ORT_TYPES.get(inputs[index].type)
        if want is not None and want != tensor.type:
            raise NnError(
                Errno.INVALID_ARGUMENT,
                f"input {index} ({inputs[index].name}) is {want.name.lower()}, got {tensor.type.name.lower()}",
            )
        self._inputs[index] = np.frombuffer(tensor.data, dtype=DTYPES[tensor.type]).reshape(tensor.dims)
        self._outputs = None

    def compute(self) -> None:
        inputs = self._graph.inputs
        missing = [i for i in range(len(inputs)) if i not in self._inputs]
        if missing:
            raise NnError(Errno.INVALID_ARGUMENT, f"inputs {missing} not set before compute")
        feed = {inputs[i].name: array for i, array in self._inputs.items()}
        try:
            results = self._graph.session.run(self._graph.output_names, feed)
        except Exception as exc:  # noqa: BLE001 -- a shape the graph refuses, say
            raise NnError(Errno.RUNTIME_ERROR, f"onnxruntime: {exc}") from None
        self._outputs = [np.ascontiguousarray(r).tobytes() for r in results]
