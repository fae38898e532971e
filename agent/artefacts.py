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
- **Same version, other content** (:func:`version_conflict`): a name:version
  already stored (ready) with other digests is refused; a new build needs a new
  version.

Nothing here imports ``runtime/`` or ``images/``: both sit above it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import safetensors
import safetensors.numpy

from agent.cas import BlobStore, sha256_digest
from agent.errors import InvalidModel
from agent.spec import DATATYPES, SAFETENSORS_DTYPES, ModelSpec
from agent.wasmshape import check_module_shape

MODEL_JSON = "model.json"
# model.json is metadata: a few KB; the registry's max_config_bytes default for a pulled one.
MAX_CONFIG_BYTES = 4 * 1024 * 1024
# Far above any compiled model (the bundled digits module is 12 KB), far below what a host can hold twice.
MAX_MODULE_BYTES = 256 * 1024 * 1024
# The parameters are copied into a wasm32 instance's linear memory, which cannot exceed 4 GiB.
MAX_WEIGHTS_BYTES = 4 * 1024**3

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
class Artefacts:
    """The three files of a model version, in memory."""

    config: bytes
    module: bytes
    weights: bytes

    @classmethod
    def from_dir(cls, directory: Path) -> Artefacts:
        return read_model_dir(directory)

    @property
    def digests(self) -> tuple[str, str, str]:
        """(model.json, module, weights) digests, in the order a version record holds them."""
        return sha256_digest(self.config), sha256_digest(self.module), sha256_digest(self.weights)


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
        files = {}
        for kind, fname, limit in (
            ("module", spec.module_file, MAX_MODULE_BYTES),
            ("weights", spec.weights_file, MAX_WEIGHTS_BYTES),
        ):
            missing = f"{directory} lacks {fname} (the model's {kind})"
            files[kind] = _read_regular(dir_fd, directory, fname, limit, missing)
    finally:
        os.close(dir_fd)
    return Artefacts(config=config, module=files["module"], weights=files["weights"])


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


def _read_regular(dir_fd: int, directory: Path, name: str, limit: int, missing: str) -> bytes:
    """A whole regular file of the directory, refused from its size alone when over ``limit``."""
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
    parse_weights(spec, artefacts.weights)
    return spec


def check_module(spec: ModelSpec, source: bytes | BinaryIO) -> None:
    """WebAssembly magic, version 1, and memories, tables and imports within ABI v1 (no compile)."""
    check_module_shape(source, label(spec))


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
    spec = ModelSpec.from_bytes(blobs.read_bytes(record.config_digest))
    if (spec.name, spec.version) != (record.model, record.version):
        raise InvalidModel(f"model.json names {label(spec)} but the store records {record.model}:{record.version}")
    wasm = blobs.read_bytes(record.module_digest) if module else b""
    # Mapped, not copied: a version keeps its parameters for every instance it makes later
    # (cas.map_readonly: the blob is never written in place; the mapping is read-only).
    params = map_weights(spec, blobs.map_bytes(record.weights_digest))
    return spec, wasm, params
