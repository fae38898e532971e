"""A model version's artefacts (model.json, the module, the weights) and the one set of rules they must pass.

Every way a model reaches or leaves the node judges it here, so a bad artefact
is refused with the same message whichever way it comes: ``edge-agent import
DIR`` and the bundled seed (``agent.repository``), ``edge-agent image build
DIR`` (``agent.images.layout``), a pull's or the drop-in folder's admission
(``agent.images.admit``) and every load (``agent.runtime.loaded``).

- **Reading a model directory** (:func:`read_model_dir`): ``model.json`` and the
  two files it names, each opened relative to the directory without following
  a link or waiting on a FIFO, refused unless ``fstat`` says it is a regular
  file, and read only up to a size bound known before the read.
- **The module** (:func:`check_module`): WebAssembly magic and version 1, then
  what it declares (memories, tables, imports) from its section headers
  (``agent.wasmshape``).
- **The weights** (:func:`parse_weights`, or :func:`check_weights_file` from the
  header alone for a blob already in the store): exactly the tensors model.json
  declares as ``params``, with their dtypes and shapes.
- **A WASI-NN model's weights** (model.json's ``wasi_nn`` section): the backend's
  own model file (ONNX, GGUF or a TorchScript zip), judged by a cheap sniff of its
  format against ``wasi_nn.encoding`` (:func:`check_nn_weights`), ``params``
  empty. Such a file can be gigabytes: it is hashed as it streams from disk
  (:class:`WeightsFile`) and copied to the store the same way, never held whole in
  memory, under its own size bound (``MAX_NN_WEIGHTS_BYTES``); a stored one is
  handed to the runtime as a path (:func:`read_stored_nn`), never mapped as safetensors.
- **Same version, other content** (:func:`version_conflict`): a name:version
  already stored (ready) with other digests is refused; a new build needs a new
  version.

Nothing here imports ``runtime/`` or ``images/``: both sit above it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import stat
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, cast

import numpy as np
import safetensors
import safetensors.numpy

from agent.cas import CHUNK, BlobStore, sha256_digest
from agent.errors import InvalidModel
from agent.spec import DATATYPES, SAFETENSORS_DTYPES, ModelSpec
from agent.wasmshape import WASI_MODULE, WASI_NN_MODULE, check_module_shape

MODEL_JSON = "model.json"
# model.json is metadata: a few KB; the registry's max_config_bytes default for a pulled one.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
# Far above any compiled model (the bundled digits module is 12 KB), far below what a host can hold twice.
MAX_MODULE_BYTES = 256 * 1024 * 1024
# The parameters are copied into a wasm32 instance's linear memory, which cannot exceed 4 GiB.
MAX_WEIGHTS_BYTES = 4 * 1024**3
# A WASI-NN backend's own model file stays outside wasm memory (the host loads it): GGUF language
# models are tens of GB. Streamed and hashed, never read whole, so the bound is the disk's, not memory's.
MAX_NN_WEIGHTS_BYTES = 256 * 1024**3

# Every open inside a model directory: never through a symbolic link, never waiting (a FIFO).
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# safetensors' dtype names for the NumPy dtypes a full parse returns, so both checks word a mismatch alike.
_SAFETENSORS_NAME = {DATATYPES[k].str: SAFETENSORS_DTYPES[k] for k in DATATYPES}
_NUMPY_DTYPE = {SAFETENSORS_DTYPES[k]: DATATYPES[k] for k in DATATYPES}


class StoredVersion(Protocol):
    """What the rules need of a recorded version (``agent.state.VersionRecord`` is one)."""

    @property
    def model(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def config_digest(self) -> str: ...
    @property
    def module_digest(self) -> str: ...
    @property
    def weights_digest(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def digests(self) -> tuple[str, str, str]: ...


@dataclass(frozen=True)
class WeightsFile:
    """A WASI-NN model's weights file, left on disk: its size and the digest its bytes hashed to as
    they streamed past (:func:`read_model_dir`), never its bytes.

    Whoever stores it copies it through :meth:`open` and checks the copy hashes to ``digest``
    (``BlobStore.put_stream``, ``OciLayout.put_stream``), so what is stored is what was hashed.
    """

    directory: Path
    name: str
    size: int
    digest: str

    @property
    def path(self) -> Path:
        return self.directory / self.name

    def open(self) -> BinaryIO:
        """The file again, by the model-directory rules (no link, regular file), at the size it had."""
        dir_fd = _open_dir(self.directory)
        try:
            fd = _open_regular(dir_fd, self.directory, self.name, MAX_NN_WEIGHTS_BYTES, f"{self.path} is gone")
        finally:
            os.close(dir_fd)
        if os.fstat(fd).st_size != self.size:
            os.close(fd)
            raise InvalidModel(f"{self.path} changed while it was being read; refused")
        return os.fdopen(fd, "rb")


@dataclass(frozen=True)
class Artefacts:
    """The three files of a model version: in memory, except a WASI-NN model's weights file
    (``weights_file``; ``weights`` is then empty), which can be far larger than memory."""

    config: bytes
    module: bytes
    weights: bytes
    weights_file: WeightsFile | None = None

    @classmethod
    def from_dir(cls, directory: Path) -> Artefacts:
        return read_model_dir(directory)

    @property
    def digests(self) -> tuple[str, str, str]:
        """(model.json, module, weights) digests, in the order a version record holds them."""
        weights = self.weights_file.digest if self.weights_file is not None else sha256_digest(self.weights)
        return sha256_digest(self.config), sha256_digest(self.module), weights

    @property
    def weights_size(self) -> int:
        return self.weights_file.size if self.weights_file is not None else len(self.weights)

    def open_weights(self) -> BinaryIO:
        """The weights as a stream (a WASI-NN weights file re-opened from disk, else the bytes held)."""
        if self.weights_file is not None:
            return self.weights_file.open()
        return io.BytesIO(self.weights)


def label(spec: ModelSpec) -> str:
    """How every refusal names the version: ``name:version``."""
    return f"{spec.name}:{spec.version}"


# -- a model directory ---------------------------------------------------------------------------
def read_model_dir(directory: Path) -> Artefacts:
    """model.json and the module and weights it names, read safely (InvalidModel when absent or refused).

    The directory is the one its caller named (a link to it is that caller's choice);
    nothing inside it is reached through a link.
    """
    directory = Path(directory)
    dir_fd = _open_dir(directory)
    try:
        config = _read_regular(dir_fd, directory, MODEL_JSON, MAX_CONFIG_BYTES, f"{directory} has no {MODEL_JSON}")
        spec = ModelSpec.from_bytes(config)
        fname = spec.module_file
        module = _read_regular(
            dir_fd, directory, fname, MAX_MODULE_BYTES, f"{directory} lacks {fname} (the model's module)"
        )
        fname = spec.weights_file
        missing = f"{directory} lacks {fname} (the model's weights)"
        if spec.wasi_nn is not None:
            # The backend's own model file: hashed as it streams past, never held (GGUF files are GBs).
            weights_file = _hash_regular(dir_fd, directory, fname, MAX_NN_WEIGHTS_BYTES, missing)
            return Artefacts(config=config, module=module, weights=b"", weights_file=weights_file)
        weights = _read_regular(dir_fd, directory, fname, MAX_WEIGHTS_BYTES, missing)
    finally:
        os.close(dir_fd)
    return Artefacts(config=config, module=module, weights=weights)


def read_model_spec(directory: Path) -> ModelSpec:
    """Only a model directory's model.json, read as :func:`read_model_dir` reads it."""
    directory = Path(directory)
    dir_fd = _open_dir(directory)
    try:
        config = _read_regular(dir_fd, directory, MODEL_JSON, MAX_CONFIG_BYTES, f"{directory} has no {MODEL_JSON}")
    finally:
        os.close(dir_fd)
    return ModelSpec.from_bytes(config)


def _open_dir(directory: Path) -> int:
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise InvalidModel(f"{directory} has no {MODEL_JSON}") from exc
    except OSError as exc:
        raise InvalidModel(f"cannot read {directory}: {exc.strerror or exc}") from exc


def read_bounded_file(path: Path, limit: int) -> bytes:
    """One whole regular file by the model-directory rules: no link followed, no FIFO or device
    opened, refused from its size alone when over ``limit`` (the converter reads ONNX and
    MLflow files this way)."""
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidModel(f"cannot read {path.parent}: {exc.strerror or exc}") from exc
    try:
        return _read_regular(dir_fd, path.parent, path.name, limit, f"{path} does not exist")
    finally:
        os.close(dir_fd)


def _open_regular(dir_fd: int, directory: Path, name: str, limit: int, missing: str) -> int:
    """A descriptor of a regular file of the directory, refused from its size alone when over ``limit``."""
    path = directory / name
    try:
        fd = os.open(name, _OPEN_FILE, dir_fd=dir_fd)
    except FileNotFoundError as exc:
        raise InvalidModel(missing) from exc
    except OSError as exc:
        raise InvalidModel(_refusal(dir_fd, path, name, exc)) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidModel(f"{path} is {file_kind(info.st_mode)}, not a regular file; refused")
        if info.st_size > limit:
            raise InvalidModel(f"{path} is {info.st_size} bytes, over the limit of {limit}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _hash_regular(dir_fd: int, directory: Path, name: str, limit: int, missing: str) -> WeightsFile:
    """A regular file's size and digest, read in chunks: never more than one chunk in memory."""
    fd = _open_regular(dir_fd, directory, name, limit, missing)
    hasher, size = hashlib.sha256(), 0
    with os.fdopen(fd, "rb") as fh:
        expected = os.fstat(fd).st_size
        # Never past the size fstat gave (plus one byte to notice growth): a growing file is not followed.
        while size <= expected and (chunk := fh.read(min(CHUNK, expected + 1 - size))):
            hasher.update(chunk)
            size += len(chunk)
    if size != expected:
        raise InvalidModel(f"{directory / name} changed while it was being read; refused")
    return WeightsFile(directory=directory, name=name, size=size, digest="sha256:" + hasher.hexdigest())


def _read_regular(dir_fd: int, directory: Path, name: str, limit: int, missing: str) -> bytes:
    """A whole regular file of the directory, refused from its size alone when over ``limit``."""
    path = directory / name
    fd = _open_regular(dir_fd, directory, name, limit, missing)
    info = os.fstat(fd)
    with os.fdopen(fd, "rb") as fh:
        # One byte past the size fstat gave: a file growing while it is read is noticed, never followed.
        data = fh.read(info.st_size + 1)
    if len(data) != info.st_size:
        raise InvalidModel(f"{path} changed while it was being read; refused")
    return data


def _refusal(dir_fd: int, path: Path, name: str, exc: OSError) -> str:
    """Why ``path`` cannot be opened, in words; never anything about where a link points."""
    if exc.errno in (errno.ELOOP, errno.ENXIO, errno.ENOTDIR):
        try:
            mode: int | None = os.lstat(name, dir_fd=dir_fd).st_mode
        except OSError:
            mode = None
        if mode is not None and stat.S_ISLNK(mode):
            return f"{path} is a symbolic link; a model directory is read only through its own files, links are refused"
        if mode is not None:
            return f"{path} is {file_kind(mode)}, not a regular file; refused"
    return f"cannot read {path}: {exc.strerror or exc}"


def file_kind(mode: int) -> str:
    """What a file is, in words, for refusals ("a FIFO", "a symbolic link", ...)."""
    for test, kind in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return kind
    return "an unknown file type"


# -- the rules -----------------------------------------------------------------------------------
def validate(artefacts: Artefacts) -> ModelSpec:
    """Everything that can be checked without instantiating the module; the version's spec."""
    spec = ModelSpec.from_bytes(artefacts.config)
    check_module(spec, artefacts.module)
    if spec.wasi_nn is not None:
        check_nn_spec(spec)
        with artefacts.open_weights() as fh:
            check_nn_weights(spec, fh, artefacts.weights_size)
    elif artefacts.weights_file is not None:
        raise InvalidModel(f"{label(spec)}: a weights file left on disk is only for a WASI-NN model")  # a caller's slip
    else:
        parse_weights(spec, artefacts.weights)
    return spec


def check_module(spec: ModelSpec, source: bytes | BinaryIO) -> None:
    """WebAssembly magic, version 1, and memories, tables and imports within ABI v1 (no compile).

    A WASI-NN model's module may import ``wasi_ephemeral_nn`` too; no other module may.
    """
    imports = (WASI_MODULE, WASI_NN_MODULE) if spec.wasi_nn is not None else (WASI_MODULE,)
    check_module_shape(source, label(spec), imports=imports)


def check_module_file(spec: ModelSpec, path: Path) -> None:
    """:func:`check_module` on a stored blob, reading only the headers of the sections it judges."""
    with open(path, "rb") as fh:
        check_module(spec, fh)


def parse_weights(spec: ModelSpec, data: bytes) -> dict[str, np.ndarray]:
    """The parameter arrays, once they are exactly the tensors model.json declares."""
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as exc:  # the parser raises several types for a malformed file
        raise InvalidModel(f"{label(spec)}: weights are not valid safetensors: {exc}") from exc
    found = {
        name: (_SAFETENSORS_NAME.get(array.dtype.str, str(array.dtype)), tuple(array.shape))
        for name, array in tensors.items()
    }
    _match_params(spec, found)
    return tensors


def map_weights(spec: ModelSpec, data: memoryview) -> dict[str, np.ndarray]:
    """:func:`parse_weights` over a mapped blob: the arrays are read-only views of ``data``, not copies.

    The safetensors layout is read here (8-byte little-endian header length, JSON header,
    then the tensors' bytes), with the library's rules: each tensor's byte range holds exactly
    its dtype times its shape, and the ranges tile the data section with no gap, overlap or tail.
    """

    def bad(why: str) -> InvalidModel:
        return InvalidModel(f"{label(spec)}: weights are not valid safetensors: {why}")

    size = len(data)
    if size < 8:
        raise bad("shorter than its 8-byte header length")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > size - 8:
        raise bad(f"header length {header_len} runs past the end of the file ({size} bytes)")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
    except ValueError as exc:
        raise bad(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    base = 8 + header_len
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(dtype, str)
            or not isinstance(shape, list)
            or not all(type(d) is int and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise bad(f"tensor {name!r} has a malformed header entry")
        np_dtype = _NUMPY_DTYPE.get(dtype)
        if np_dtype is not None and offsets[1] - offsets[0] != math.prod(shape) * np_dtype.itemsize:
            raise bad(f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes, {dtype}{shape} needs a different size")
        found[name] = (dtype, tuple(shape))
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            raise bad(f"tensor {name!r} does not start where the previous one ends")
        end = stop
    if base + end != size:
        raise bad(f"tensor data end at byte {base + end}, the file has {size}")
    _match_params(spec, found)
    arrays = {}
    for start, _stop, name in spans:
        dtype, shape = found[name]
        np_dtype = _NUMPY_DTYPE[dtype]
        arrays[name] = np.frombuffer(data, np_dtype, math.prod(shape), base + start).reshape(shape)
    return arrays


def check_weights_file(spec: ModelSpec, path: Path) -> None:
    """:func:`parse_weights`' rule from the safetensors header alone (a stored blob is never read in full).

    safetensors checks on open that the header's offsets tile the file exactly, so a
    truncated or padded file is refused here too.
    """
    try:
        with safetensors.safe_open(str(path), framework="np") as st:
            slices = {name: st.get_slice(name) for name in st.keys()}  # noqa: SIM118 - safe_open is not a dict
            found = {name: (s.get_dtype(), tuple(s.get_shape())) for name, s in slices.items()}
    except safetensors.SafetensorError as exc:
        raise InvalidModel(f"{label(spec)}: weights are not valid safetensors: {exc}") from exc
    _match_params(spec, found)


# -- a WASI-NN model's weights: the backend's own model file ----------------------------------------
# What each encoding's file is, in words, for refusals.
NN_FORMATS = {
    "onnx": "an ONNX model (protobuf ModelProto)",
    "ggml": "a GGUF file",
    "pytorch": "a TorchScript archive (torch.jit.save)",
}
GGUF_MAGIC = b"GGUF"
# llama.cpp reads GGUF versions 2 and 3 (version 1 is long retired).
GGUF_VERSIONS = (2, 3)
ZIP_MAGIC = b"PK\x03\x04"
# ModelProto's top-level fields and their protobuf wire types (onnx.proto3): ir_version comes first,
# as every serializer writes fields in number order; unknown fields may follow (a newer ONNX).
_ONNX_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2}
_ONNX_GRAPH = 7
# Far more top-level fields (opset imports, metadata entries, functions) than a real model has.
_ONNX_MAX_FIELDS = 100_000
# A TorchScript archive's central directory: ~100 bytes an entry (one per tensor), read whole by zipfile
# and turned into objects several times that size: 4 MiB is tens of thousands of tensors.
_ZIP_MAX_READ = 4 * 1024 * 1024


def check_nn_spec(spec: ModelSpec) -> None:
    """A WASI-NN model's model.json: no ``params`` (its weights are the backend's file, not tensors)."""
    if spec.wasi_nn is not None and spec.params:
        raise InvalidModel(
            f"{label(spec)}: a WASI-NN model declares no params (its weights file is the {spec.wasi_nn.encoding} "
            f"backend's own model file); model.json declares {[p.name for p in spec.params]}"
        )


def check_nn_weights(spec: ModelSpec, fh: BinaryIO, size: int) -> None:
    """The weights file (seekable, ``size`` bytes) is the format ``wasi_nn.encoding`` names, from a
    cheap sniff of its structure (a few reads and seeks, never the whole file); InvalidModel otherwise.

    - onnx: a protobuf whose top-level fields start with ``ir_version``, walk to the end exactly
      and include a graph;
    - ggml: the GGUF magic and a version llama.cpp reads;
    - pytorch: a zip whose entries include ``<archive>/data.pkl`` and TorchScript's
      ``constants.pkl`` or ``code/`` (a plain ``torch.save`` checkpoint has neither).
    """
    assert spec.wasi_nn is not None
    encoding = spec.wasi_nn.encoding
    sniff = {"onnx": _sniff_onnx, "ggml": _sniff_gguf, "pytorch": _sniff_torchscript}[encoding]
    why = sniff(fh, size)
    if why is None:
        return
    fh.seek(0)
    head = fh.read(16)
    what = _known_format(head, size, fh)
    # Another format named outright says more than the sniff's reason; a zip that is no TorchScript does not.
    if what is not None and what not in (NN_FORMATS[encoding], "a zip archive" if encoding == "pytorch" else ""):
        why = f"it is {what}"
    raise InvalidModel(
        f"{label(spec)}: weights {spec.weights_file} are not {NN_FORMATS[encoding]}, as "
        f"wasi_nn.encoding {encoding!r} needs ({why}); a WASI-NN model's weights are the backend's own model file"
    )


def check_nn_weights_file(spec: ModelSpec, path: Path) -> None:
    """:func:`check_nn_weights` on a stored blob (nothing is read but what the sniff needs)."""
    with open(path, "rb") as fh:
        check_nn_weights(spec, fh, os.fstat(fh.fileno()).st_size)


def _known_format(head: bytes, size: int, fh: BinaryIO) -> str | None:
    """What a weights file that failed its sniff is instead, when it is recognisably something."""
    if head.startswith(GGUF_MAGIC):
        return NN_FORMATS["ggml"]
    if head.startswith(ZIP_MAGIC):
        return "a zip archive"
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if 8 + header_len <= size and head[8:9] == b"{":
            return "a safetensors file"
    if _sniff_onnx(fh, size) is None:
        return NN_FORMATS["onnx"]
    return None


def _sniff_gguf(fh: BinaryIO, size: int) -> str | None:
    fh.seek(0)
    head = fh.read(24)  # magic, version, tensor count (u64), metadata count (u64)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        return "no GGUF magic at its start"
    version = int.from_bytes(head[4:8], "little")
    if version not in GGUF_VERSIONS:
        return f"GGUF version {version}; llama.cpp reads versions {list(GGUF_VERSIONS)}"
    return None


def _sniff_onnx(fh: BinaryIO, size: int) -> str | None:
    fh.seek(0)
    pos = fields = 0
    seen: set[int] = set()
    while pos < size:
        fields += 1
        if fields > _ONNX_MAX_FIELDS:
            return f"more than {_ONNX_MAX_FIELDS} top-level protobuf fields"
        tag, pos = _varint(fh, pos)
        if tag is None:
            return "a truncated protobuf field"
        number, wire = tag >> 3, tag & 7
        if fields == 1 and (number, wire) != (1, 0):
            return "it does not start with ModelProto's ir_version"
        if number == 0 or wire not in (0, 1, 2, 5) or _ONNX_FIELDS.get(number, wire) != wire:
            return f"a malformed protobuf field at byte {pos}"
        if wire == 0:
            value, pos = _varint(fh, pos)
            if value is None:
                return "a truncated protobuf field"
            if number == 1 and not 1 <= value <= 1000:
                return f"ir_version {value}"
            continue
        if wire == 2:
            length, pos = _varint(fh, pos)
            if length is None:
                return "a truncated protobuf field"
        else:
            length = 8 if wire == 1 else 4
        if pos + length > size:
            return f"protobuf field {number} runs past the end of the file"
        pos += length
        fh.seek(pos)
        seen.add(number)
    if _ONNX_GRAPH not in seen:
        return "no graph"
    return None


def _varint(fh: BinaryIO, pos: int) -> tuple[int | None, int]:
    """A protobuf varint at ``pos`` (the file positioned there), and the position after it."""
    result = shift = 0
    while shift < 64:
        byte = fh.read(1)
        if not byte:
            return None, pos
        pos += 1
        result |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return result, pos
        shift += 7
    return None, pos


def _sniff_torchscript(fh: BinaryIO, size: int) -> str | None:
    fh.seek(0)
    if fh.read(4) != ZIP_MAGIC:
        return "not a zip archive"
    fh.seek(0)
    try:
        with zipfile.ZipFile(cast(BinaryIO, _BoundedReads(fh, size))) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, InvalidModel, ValueError, OSError) as exc:
        return f"an unreadable zip archive: {exc}"
    # torch.jit.save writes <archive>/data.pkl, <archive>/constants.pkl and <archive>/code/...
    tails = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if "data.pkl" not in tails:
        return "a zip archive without data.pkl"
    if "constants.pkl" not in tails and not any(t.startswith("code/") for t in tails):
        return "a torch.save checkpoint, not a TorchScript module (no constants.pkl or code/; use torch.jit.save)"
    return None


class _BoundedReads(io.RawIOBase):
    """A file as zipfile sees it: any single read above ``_ZIP_MAX_READ`` is refused, since zipfile
    reads the central directory whole at the size the archive's end record claims."""

    def __init__(self, fh: BinaryIO, size: int):
        super().__init__()
        self._fh = fh
        self._size = size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            n = self._size - self._fh.tell()
        if n > _ZIP_MAX_READ:
            raise InvalidModel(f"a zip read of {n} bytes, more than a TorchScript archive's directory needs")
        return self._fh.read(n)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()


def _match_params(spec: ModelSpec, found: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    """``found`` (tensor name -> safetensors dtype name, shape) against the declared params."""
    where = label(spec)
    extra = set(found) - {p.name for p in spec.params}
    if extra:
        raise InvalidModel(f"{where}: weights hold undeclared tensor(s) {sorted(extra)}")
    for pspec in spec.params:
        if pspec.name not in found:
            raise InvalidModel(f"{where}: weights lack parameter {pspec.name}")
        dtype, shape = found[pspec.name]
        want = SAFETENSORS_DTYPES[pspec.datatype]
        if dtype != want or shape != tuple(pspec.shape):
            raise InvalidModel(
                f"{where}: parameter {pspec.name} is {dtype}{list(shape)}, "
                f"model.json declares {want}{list(pspec.shape)}"
            )


def version_conflict(spec: ModelSpec, digests: tuple[str, str, str], existing: StoredVersion | None) -> str | None:
    """Why a version with these digests may not be recorded: its name:version holds other content."""
    if existing is not None and existing.status == "ready" and existing.digests != digests:
        return (
            f"{label(spec)} is already stored with different content (from {existing.source}); "
            "a new build needs a new version"
        )
    return None


def check_version_free(spec: ModelSpec, digests: tuple[str, str, str], existing: StoredVersion | None) -> None:
    """:func:`version_conflict` as a refusal (InvalidModel)."""
    conflict = version_conflict(spec, digests, existing)
    if conflict:
        raise InvalidModel(conflict)


# -- a stored version ----------------------------------------------------------------------------
def read_stored(
    blobs: BlobStore, record: StoredVersion, *, module: bool = True
) -> tuple[ModelSpec, bytes, dict[str, np.ndarray]]:
    """A recorded version's spec, module bytes and parameter arrays, every blob re-hashed as it is read.

    The parameter arrays are read-only views of the weights blob mapped into memory (:func:`map_weights`).
    ``module=False`` skips the module (b"" in its place): the caller holds its compiled code already,
    made from bytes that hashed to the same digest.

    CorruptBlob/NotFound when a blob does not check out; InvalidModel when the artefacts break a
    rule (a version stored by an older agent was not judged by today's rules). The module's
    declarations are judged after it compiles (``runtime.loaded``), where a cached compile skips them.
    """
    spec = read_stored_spec(blobs, record)
    if spec.wasi_nn is not None:
        # Its weights are the backend's own file, not safetensors: read_stored_nn gives their path.
        raise InvalidModel(f"{label(spec)} is a WASI-NN model; its weights are not parameters to map")
    wasm = blobs.read_bytes(record.module_digest) if module else b""
    # Mapped, not copied: a version keeps its parameters for every instance it makes later
    # (cas.map_readonly: the blob is never written in place; the mapping is read-only).
    params = map_weights(spec, blobs.map_bytes(record.weights_digest))
    return spec, wasm, params


def read_stored_spec(blobs: BlobStore, record: StoredVersion) -> ModelSpec:
    """A recorded version's model.json, re-hashed, naming the version the record names."""
    spec = ModelSpec.from_bytes(blobs.read_bytes(record.config_digest))
    if (spec.name, spec.version) != (record.model, record.version):
        raise InvalidModel(f"model.json names {label(spec)} but the store records {record.model}:{record.version}")
    return spec


def read_stored_nn(blobs: BlobStore, record: StoredVersion, *, module: bool = True) -> tuple[ModelSpec, bytes, Path]:
    """A recorded WASI-NN version's spec, module bytes and the path of its weights blob (the
    backend's own model file, for the backend to load from disk).

    Every blob is re-hashed first, the weights streamed (``BlobStore.verified_path``: a GGUF file
    is never read whole into memory), and the weights sniffed against ``wasi_nn.encoding``: a
    version stored by an older agent is judged by today's rules. The path stays valid while the
    version is stored (blobs are never written in place; the cache evicts only unused versions).
    ``module=False`` as for :func:`read_stored`.

    CorruptBlob/NotFound when a blob does not check out; InvalidModel when the version is not a
    WASI-NN model or breaks a rule.
    """
    spec = read_stored_spec(blobs, record)
    if spec.wasi_nn is None:
        raise InvalidModel(f"{label(spec)} is not a WASI-NN model (model.json has no wasi_nn section)")
    check_nn_spec(spec)
    wasm = blobs.read_bytes(record.module_digest) if module else b""
    path = blobs.verified_path(record.weights_digest)
    check_nn_weights_file(spec, path)
    return spec, wasm, path
