"""What a WebAssembly module declares, read from its section headers alone (nothing is compiled).

A model instance owns one linear memory and at most one table (the indirect
function table C and Rust compilers emit), and imports functions from WASI
only. Modules that declare more — several memories (wasm multi-memory),
several or huge tables, 64-bit or shared memories, imported memories or
tables — are refused before any store holds them, so a stored version can
always be capped (``agent.runtime.footprint`` turns the same bounds into each
instance's store limits).

This module is pure (no wasmtime, no runtime) so that the artefact rules in
``agent.artefacts``, which ``images/`` uses as well, sit below both.
"""

from __future__ import annotations

import io
from typing import BinaryIO

from agent.errors import InvalidModel

# The one module ABI v1 modules may import functions from.
WASI_MODULE = "wasi_snapshot_preview1"
# What a WASI-NN model's module may import functions from as well (model.json's wasi_nn section).
WASI_NN_MODULE = "wasi_ephemeral_nn"
WASM_MAGIC = b"\0asm"
WASM_VERSION_1 = b"\x01\0\0\0"

MAX_MEMORIES = 1
MAX_TABLES = 1
# Far above the few hundred entries of a compiled model's function table.
MAX_TABLE_ELEMENTS = 1 << 16

_SECTION_IMPORT, _SECTION_TABLE, _SECTION_MEMORY = 2, 4, 5
_IMPORT_KINDS = {1: "a table", 2: "a memory", 3: "a global", 4: "a tag"}
_FUNCREF, _EXTERNREF = 0x70, 0x6F


def check_module_shape(
    source: bytes | bytearray | BinaryIO, where: str, imports: tuple[str, ...] = (WASI_MODULE,)
) -> None:
    """Refuse a module whose memories, tables or imports exceed ABI v1 (InvalidModel naming what).

    ``source`` is the module's bytes or a file positioned at its start; sections other than
    imports, tables and memories are skipped, never read. ``imports``: the modules it may import
    functions from (a WASI-NN model's adds :data:`WASI_NN_MODULE`).
    """
    fh: BinaryIO = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    reader = _Reader(fh, where)
    header = fh.read(8)
    if len(header) < 8 or header[:4] != WASM_MAGIC:
        raise InvalidModel(f"{where}: module is not a WebAssembly binary")
    if header[4:] != WASM_VERSION_1:
        raise InvalidModel(f"{where}: module is not a core WebAssembly module version 1 (a component?)")
    memories = tables = 0
    while True:
        first = fh.read(1)
        if not first:
            break
        size = reader.u32()
        if first[0] not in (_SECTION_IMPORT, _SECTION_TABLE, _SECTION_MEMORY):
            fh.seek(size, io.SEEK_CUR)
            continue
        body = fh.read(size)
        if len(body) != size:
            raise InvalidModel(f"{where}: module is truncated (section {first[0]})")
        section = _Reader(io.BytesIO(body), where)
        if first[0] == _SECTION_IMPORT:
            _check_imports(section, imports)
        elif first[0] == _SECTION_TABLE:
            tables += _check_tables(section)
        else:
            memories += _check_memories(section)
    if memories > MAX_MEMORIES:
        raise InvalidModel(f"{where}: module declares {memories} memories; ABI v1 allows {MAX_MEMORIES}")
    if tables > MAX_TABLES:
        raise InvalidModel(f"{where}: module declares {tables} tables; ABI v1 allows {MAX_TABLES}")


def _check_imports(section: _Reader, allowed: tuple[str, ...]) -> None:
    for _ in range(section.u32()):
        module = section.name()
        name = section.name()
        kind = section.byte()
        if module not in allowed:
            hint = ""
            if module == WASI_NN_MODULE:
                hint = " (a WASI-NN app needs a wasi_nn section in model.json)"
            raise InvalidModel(
                f"{section.where}: module imports {module}.{name}; ABI v1 modules may import only "
                f"{' and '.join(allowed)}{hint}"
            )
        if kind != 0:
            what = _IMPORT_KINDS.get(kind, f"kind {kind}")
            raise InvalidModel(
                f"{section.where}: module imports {what} ({module}.{name}); ABI v1 imports functions only"
            )
        section.u32()  # the function's type index


def _check_tables(section: _Reader) -> int:
    count = section.u32()
    for _ in range(count):
        reftype = section.byte()
        if reftype not in (_FUNCREF, _EXTERNREF):
            raise InvalidModel(f"{section.where}: module declares a table of typed references; ABI v1 allows funcref")
        flags = section.byte()
        if flags not in (0, 1):
            raise InvalidModel(f"{section.where}: module declares a 64-bit table; ABI v1 allows 32-bit tables")
        minimum = section.u32()
        if flags & 1:
            section.u32()
        if minimum > MAX_TABLE_ELEMENTS:
            raise InvalidModel(
                f"{section.where}: module declares a table of {minimum} elements; ABI v1 allows {MAX_TABLE_ELEMENTS}"
            )
    return count


def _check_memories(section: _Reader) -> int:
    count = section.u32()
    for _ in range(count):
        flags = section.byte()
        if flags & 2:
            raise InvalidModel(f"{section.where}: module declares a shared memory; ABI v1 memories are unshared")
        if flags & ~1:
            raise InvalidModel(
                f"{section.where}: module declares a 64-bit or custom-page memory; ABI v1 allows neither"
            )
        section.u32()
        if flags & 1:
            section.u32()
    return count


class _Reader:
    def __init__(self, fh: BinaryIO, where: str):
        self.fh = fh
        self.where = where

    def byte(self) -> int:
        data = self.fh.read(1)
        if not data:
            raise InvalidModel(f"{self.where}: module is truncated")
        return data[0]

    def u32(self) -> int:
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 28:
                raise InvalidModel(f"{self.where}: module holds a malformed integer")

    def name(self) -> str:
        size = self.u32()
        data = self.fh.read(size)
        if len(data) != size:
            raise InvalidModel(f"{self.where}: module is truncated")
        return data.decode("utf-8", "replace")
