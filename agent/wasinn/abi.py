"""The WASI-NN preview1 (witx) ABI as WasmEdge and Wasmtime implement it: numbers and layouts.

Everything a guest passes is a 32-bit offset into its one linear memory;
:class:`GuestMemory` reads and writes through those offsets and refuses any
range outside the memory (``invalid_argument``), so a hostile guest can never
make the host read or write out of bounds.

Numbering follows the spec's witx (``wasi_ephemeral_nn.witx``) and WasmEdge's
``wasinntypes.h``, whose additions (the ggml encoding, the ``auto`` target,
error codes 100-103) the published WasmEdge example apps rely on.
"""

from __future__ import annotations

import ctypes
import enum
import struct

import numpy as np
import wasmtime

MODULE = "wasi_ephemeral_nn"


class Errno(enum.IntEnum):
    SUCCESS = 0
    INVALID_ARGUMENT = 1
    INVALID_ENCODING = 2
    MISSING_MEMORY = 3
    BUSY = 4
    RUNTIME_ERROR = 5
    UNSUPPORTED_OPERATION = 6
    TOO_LARGE = 7
    NOT_FOUND = 8
    # WasmEdge's backend errors (the ggml backend; LlamaEdge and the examples match on them).
    END_OF_SEQUENCE = 100
    CONTEXT_FULL = 101
    PROMPT_TOO_LONG = 102
    MODEL_NOT_FOUND = 103


class GraphEncoding(enum.IntEnum):
    OPENVINO = 0
    ONNX = 1
    TENSORFLOW = 2
    PYTORCH = 3  # TorchScript
    TENSORFLOWLITE = 4
    AUTODETECT = 5
    GGML = 6


class ExecutionTarget(enum.IntEnum):
    CPU = 0
    GPU = 1
    TPU = 2
    AUTO = 3  # WasmEdge: the backend picks (GPU when it has one)


class TensorType(enum.IntEnum):
    F16 = 0
    F32 = 1
    F64 = 2
    U8 = 3
    I32 = 4
    I64 = 5


DTYPES: dict[TensorType, np.dtype] = {
    TensorType.F16: np.dtype("<f2"),
    TensorType.F32: np.dtype("<f4"),
    TensorType.F64: np.dtype("<f8"),
    TensorType.U8: np.dtype("u1"),
    TensorType.I32: np.dtype("<i4"),
    TensorType.I64: np.dtype("<i8"),
}

# Names as `--nn-preload NAME:ENCODING:TARGET:PATH` spells them (WasmEdge accepts any case).
ENCODING_NAMES: dict[str, GraphEncoding] = {
    "openvino": GraphEncoding.OPENVINO,
    "onnx": GraphEncoding.ONNX,
    "tensorflow": GraphEncoding.TENSORFLOW,
    "pytorch": GraphEncoding.PYTORCH,
    "torchscript": GraphEncoding.PYTORCH,
    "tensorflowlite": GraphEncoding.TENSORFLOWLITE,
    "autodetect": GraphEncoding.AUTODETECT,
    "ggml": GraphEncoding.GGML,
}
TARGET_NAMES: dict[str, ExecutionTarget] = {
    "cpu": ExecutionTarget.CPU,
    "gpu": ExecutionTarget.GPU,
    "tpu": ExecutionTarget.TPU,
    "auto": ExecutionTarget.AUTO,
}

# struct tensor { u32 dims_ptr; u32 dims_len; u8 type (padded to 4); u32 data_ptr; u32 data_len; }
TENSOR_STRUCT = struct.Struct("<IIBxxxII")
# A graph builder array entry: { u32 ptr; u32 len; }
BUILDER_STRUCT = struct.Struct("<II")
MAX_RANK = 8


class NnError(Exception):
    """A failure the guest sees as an errno; ``str`` is the host-side reason (logged, never sent to the guest)."""

    def __init__(self, errno: Errno, reason: str):
        super().__init__(reason)
        self.errno = errno


class GuestMemory:
    """Bounds-checked access to a guest's linear memory during one host call."""

    def __init__(self, memory: wasmtime.Memory, store: wasmtime.Store | wasmtime.Caller):
        self.size = memory.data_len(store)
        self._base = ctypes.addressof(memory.data_ptr(store).contents)

    def check(self, ptr: int, length: int, what: str) -> None:
        if ptr < 0 or length < 0 or ptr + length > self.size:
            raise NnError(
                Errno.INVALID_ARGUMENT, f"{what} at {ptr}+{length} lies outside guest memory ({self.size} bytes)"
            )

    def read(self, ptr: int, length: int, what: str) -> bytes:
        self.check(ptr, length, what)
        return ctypes.string_at(self._base + ptr, length)

    def view(self, ptr: int, length: int, what: str) -> memoryview:
        """A zero-copy view, valid only until the guest runs again (memory may grow)."""
        self.check(ptr, length, what)
        return memoryview((ctypes.c_ubyte * length).from_address(self._base + ptr)).cast("B")

    def write(self, ptr: int, data: bytes | bytearray | memoryview, what: str) -> None:
        self.check(ptr, len(data), what)
        ctypes.memmove(self._base + ptr, bytes(data), len(data))

    def read_u32(self, ptr: int, what: str) -> int:
        value: int = struct.unpack("<I", self.read(ptr, 4, what))[0]
        return value

    def write_u32(self, ptr: int, value: int, what: str) -> None:
        self.write(ptr, struct.pack("<I", value & 0xFFFFFFFF), what)

    def read_str(self, ptr: int, length: int, what: str, limit: int) -> str:
        if length > limit:
            raise NnError(Errno.INVALID_ARGUMENT, f"{what} is {length} bytes, more than {limit}")
        try:
            return self.read(ptr, length, what).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NnError(Errno.INVALID_ARGUMENT, f"{what} is not UTF-8") from exc
