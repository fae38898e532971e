"""The TorchScript backend (WASI-NN encoding ``pytorch``): ``torch.jit.load``, on the CPU or a CUDA device.

Inputs are the tensor arguments of the module's ``forward`` in declared order,
addressed by index and passed positionally (as WasmEdge's PyTorch backend
does); their element type is the one the guest gives, since a TorchScript
signature says ``Tensor`` and nothing about dtype. Outputs are what
``forward`` returns: one tensor, or a tuple or list of tensors, addressed by
index, handed back as contiguous little-endian bytes.

``torch.jit.load`` has no memory-mapped mode (unlike ``torch.load(mmap=True)``
for plain state dicts): a model file is read into memory once per graph, and
a named model's graph is shared by every instance of its version
(:class:`~agent.wasinn.backend.NamedModels`), so the copy is made once.

This module imports torch at its top: the backend registry imports it only
when a graph first needs the ``pytorch`` encoding, so a node that never runs a
TorchScript model never pays for torch.
"""

from __future__ import annotations

import io
import re
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.wasinn.abi import DTYPES, Errno, ExecutionTarget, GraphEncoding, NnError
from agent.wasinn.backend import ComputedOutputs, Tensor

# TorchScript operators that open a file by name, with the agent's rights: torch.from_file reads any
# file (and with shared=True writes it), torch.save writes one, debugprims::load_tensor reads one.
# A model's code runs from torch.jit.load on (a module's __setstate__ runs during the load), so an
# archive whose code (its ``code/**.py``, from which torch.jit.load compiles it) names one is refused
# before it is loaded. Operator names are static in TorchScript: code cannot build one from a string.
_FILE_OPS = re.compile(rb"\b(?:from_file|save|load_tensor)\b")
# All of a TorchScript archive's code, decompressed: far more than any real model's.
_MAX_CODE_BYTES = 64 << 20


class TorchScriptBackend:
    name = "torchscript"
    encoding = GraphEncoding.PYTORCH

    def __init__(self, *, options: dict[str, Any]):
        # torch's intra-op thread pool is one per process: the option applies to every TorchScript
        # graph of this process (one agent per process in production). 0 keeps torch's default.
        threads = int(options.get("intra_op_threads", 0))
        if threads < 0:
            raise NnError(Errno.INVALID_ARGUMENT, f"torchscript intra_op_threads must be 0 or more, got {threads}")
        if threads:
            torch.set_num_threads(threads)
        # The CUDA device a gpu/auto graph runs on unless its load config names one ("device_index").
        self._device_index = int(options.get("device_index", 0))
        # TorchScript is code, and PyTorch does not sandbox it: served, a graph comes only from a signed
        # image's weights layer, never from a guest's own `load` bytes. `edge-agent wasi run` allows it
        # (the operator chose the app); [wasi_nn.torchscript] guest_bytes = true does on a node.
        self._guest_bytes = bool(options.get("guest_bytes", False))

    def describe(self) -> dict[str, Any]:
        devices = ["cpu"]
        if torch.cuda.is_available():
            devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return {"version": torch.__version__, "devices": devices, "threads": torch.get_num_threads()}

    def _device(self, target: ExecutionTarget, config: dict[str, Any]) -> torch.device:
        if target is ExecutionTarget.TPU:
            raise NnError(Errno.UNSUPPORTED_OPERATION, "target tpu is not supported by the torchscript backend")
        if target is ExecutionTarget.CPU:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            if target is ExecutionTarget.GPU:
                raise NnError(
                    Errno.UNSUPPORTED_OPERATION, f"target gpu asked, but torch {torch.__version__} sees no CUDA device"
                )
            return torch.device("cpu")  # auto: the CPU when there is no GPU
        index = config.get("device_index", self._device_index)
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < torch.cuda.device_count():
            raise NnError(
                Errno.INVALID_ARGUMENT,
                f"device_index {index!r}: this node has CUDA devices 0..{torch.cuda.device_count() - 1}",
            )
        return torch.device("cuda", index)

    def _load(self, source: str | io.BytesIO, target: ExecutionTarget, config: dict[str, Any]) -> TorchScriptGraph:
        device = self._device(target, config)
        _check_code(source)
        try:
            module = torch.jit.load(source, map_location=device)
        except Exception as exc:  # noqa: BLE001 -- torch raises RuntimeError, ValueError, zipfile errors for a bad file
            raise NnError(Errno.INVALID_ARGUMENT, f"torch.jit.load cannot load the model: {exc}") from None
        module.eval()  # a module scripted in training mode would run dropout and update batch-norm statistics
        return TorchScriptGraph(module, device)

    def load_bytes(
        self, builders: Sequence[bytes], target: ExecutionTarget, config: dict[str, Any]
    ) -> TorchScriptGraph:
        if not self._guest_bytes:
            raise NnError(
                Errno.UNSUPPORTED_OPERATION,
                "a TorchScript graph is code: it is loaded from a signed image's weights (load_by_name), not from "
                "a guest's bytes ([wasi_nn.torchscript] guest_bytes = true allows it)",
            )
        if len(builders) != 1:
            raise NnError(Errno.INVALID_ARGUMENT, f"a TorchScript graph is one builder, got {len(builders)}")
        return self._load(io.BytesIO(builders[0]), target, config)

    def load_file(self, path: Path, target: ExecutionTarget, config: dict[str, Any]) -> TorchScriptGraph:
        return self._load(str(path), target, config)


class TorchScriptGraph:
    backend = "torchscript"
    truncates_output = False

    def __init__(self, module: torch.jit.ScriptModule, device: torch.device):
        self.module: torch.jit.ScriptModule | None = module
        self.torch_device = device
        self.device = str(device)
        forward: Any = module.forward  # a ScriptMethod: its schema is what torch.jit compiled
        try:
            arguments = forward.schema.arguments[1:]  # [0] is self
        except (AttributeError, RuntimeError) as exc:
            raise NnError(Errno.INVALID_ARGUMENT, f"the TorchScript module has no forward method: {exc}") from None
        # The guest can only pass tensors: forward's other arguments must have defaults.
        self.input_names: list[str] = []
        self.required = 0
        for arg in arguments:
            if str(arg.type) in ("Tensor", "Optional[Tensor]"):
                self.input_names.append(arg.name)
                if not arg.has_default_value():
                    self.required = len(self.input_names)
            elif not arg.has_default_value():
                raise NnError(
                    Errno.INVALID_ARGUMENT,
                    f"forward's argument {arg.name!r} is {arg.type}, not a tensor, and has no default",
                )

    def init_execution_context(self) -> TorchScriptContext:
        if self.module is None:
            raise NnError(Errno.INVALID_ARGUMENT, "the graph was unloaded")
        return TorchScriptContext(self)

    def close(self) -> None:
        self.module = None
        if self.torch_device.type == "cuda":
            # Give the freed blocks back to the driver, so the device's memory figure (NVML) drops with the unload.
            torch.cuda.empty_cache()


class TorchScriptContext(ComputedOutputs):
    def __init__(self, graph: TorchScriptGraph):
        self._graph = graph
        self._inputs: dict[int, torch.Tensor] = {}
        self._outputs: list[bytes] | None = None

    def set_input(self, index: int, tensor: Tensor) -> None:
        names = self._graph.input_names
        if not 0 <= index < len(names):
            raise NnError(Errno.INVALID_ARGUMENT, f"input index {index}; forward takes {len(names)} tensors")
        # WASI-NN tensors are little-endian; astype to the native order is also the one copy out of
        # the guest's bytes (torch wants a writable array).
        wire = DTYPES[tensor.type]
        array = np.frombuffer(tensor.data, dtype=wire).astype(wire.newbyteorder("="), copy=True)
        flat = torch.from_numpy(array)
        try:
            shaped = flat.reshape(tensor.dims)
        except RuntimeError as exc:
            raise NnError(Errno.INVALID_ARGUMENT, f"input {index}: {exc}") from None
        self._inputs[index] = shaped.to(self._graph.torch_device)
        self._outputs = None

    def compute(self) -> None:
        module = self._graph.module
        if module is None:
            raise NnError(Errno.INVALID_ARGUMENT, "the graph was unloaded")
        count = max(self._graph.required, max(self._inputs, default=-1) + 1)
        missing = [i for i in range(count) if i not in self._inputs]
        if missing:
            raise NnError(Errno.INVALID_ARGUMENT, f"inputs {missing} not set before compute")
        args = [self._inputs[i] for i in range(count)]
        try:
            with torch.inference_mode():
                result = module(*args)
                outputs = _tensors(result)
                # .cpu() waits for a CUDA kernel to finish, so compute's time is the model's time.
                self._outputs = [_little_endian_bytes(t) for t in outputs]
        except NnError:
            raise
        except Exception as exc:  # noqa: BLE001 -- a shape or dtype forward refuses: torch.jit raises RuntimeError
            raise NnError(Errno.RUNTIME_ERROR, f"torchscript forward: {exc}") from None


def _check_code(source: str | io.BytesIO) -> None:
    """Refuse an archive whose TorchScript code calls a file operator (see ``_FILE_OPS``), before torch reads it."""
    budget = _MAX_CODE_BYTES
    try:
        with zipfile.ZipFile(source) as archive:
            # Every .py entry, duplicates included: torch's own zip reader must find nothing unseen here.
            for info in archive.infolist():
                if not info.filename.endswith(".py"):
                    continue
                with archive.open(info) as fh:
                    code = fh.read(budget + 1)
                budget -= len(code)
                if budget < 0:
                    raise NnError(Errno.TOO_LARGE, f"the archive's TorchScript code exceeds {_MAX_CODE_BYTES} bytes")
                found = _FILE_OPS.search(code)
                if found is not None:
                    op = found.group().decode()
                    raise NnError(
                        Errno.INVALID_ARGUMENT, f"the TorchScript code ({info.filename}) calls {op}, a file operation"
                    )
    except NnError:
        raise
    except Exception as exc:  # noqa: BLE001 -- zipfile and zlib raise assorted errors on a bad archive
        raise NnError(Errno.INVALID_ARGUMENT, f"not a TorchScript archive torch.jit.load reads: {exc}") from None
    finally:
        if isinstance(source, io.BytesIO):
            source.seek(0)


def _tensors(result: Any) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in result):
        return list(result)
    raise NnError(
        Errno.UNSUPPORTED_OPERATION,
        f"forward returned {type(result).__name__}; the backend serves a tensor or a tuple/list of tensors",
    )


def _little_endian_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bfloat16: the same two bytes per element
    array = t.numpy()
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()
