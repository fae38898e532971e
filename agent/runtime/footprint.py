"""What an ABI v1 module may declare, and what one of its instances may hold.

A model instance owns one linear memory and at most one table (the indirect
function table C and Rust compilers emit). Both cost host memory, so the
per-instance cap (``memory_limit_mb``) is split between them and enforced by
wasmtime's store limits. Modules that declare more — several memories (wasm
multi-memory), several or huge tables, 64-bit or shared memories, imported
memories or tables — are refused when they are imported, from the binary's
section headers alone (no compilation), so a store never holds a version
that could not be capped.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import BinaryIO

import wasmtime

from agent.errors import InvalidModel
from agent.runtime.engine import WASI_MODULE

MAX_MEMORIES = 1
MAX_TABLES = 1
# Far above the few hundred entries of a compiled model's function table.
MAX_TABLE_ELEMENTS = 1 << 16
# What wasmtime charges per table element (see Store.set_limits).
TABLE_ELEMENT_BYTES = 8
# The table's share of an instance's cap: at most 1/16 of it.
TABLE_SHARE = 16

_SECTION_IMPORT, _SECTION_TABLE, _SECTION_MEMORY = 2, 4, 5
_IMPORT_KINDS = {1: "a table", 2: "a memory", 3: "a global", 4: "a tag"}
_FUNCREF, _EXTERNREF = 0x70, 0x6F


@dataclass(frozen=True)
class StoreLimits:
    """One instance's share of ``memory_limit_mb``: linear memory plus table elements."""

    memory_bytes: int
    table_elements: int

    @classmethod
    def for_cap(cls, cap_bytes: int) -> StoreLimits:
        elements = min(MAX_TABLE_ELEMENTS, cap_bytes // TABLE_SHARE // TABLE_ELEMENT_BYTES)
        return cls(memory_bytes=cap_bytes - elements * TABLE_ELEMENT_BYTES, table_elements=elements)

    def apply(self, store: wasmtime.Store) -> None:
        # memory_size and table_elements bound each memory and table; the counts make
        # that the whole instance (a second memory or table cannot even be created).
        store.set_limits(
            memory_size=self.memory_bytes,
            table_elements=self.table_elements,
            instances=1,
            tables=MAX_TABLES,
            memories=MAX_MEMORIES,
        )


def check_module_shape(source: bytes | BinaryIO, where: str) -> None:
    """Refuse a module whose memories, tables or imports exceed ABI v1 (InvalidModel naming what)."""
    fh = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    reader = _Reader(fh, where)
    header = fh.read(8)
    if len(header) < 8 or header[:4] != b"\0asm":
        raise InvalidModel(f"{where}: module is not a WebAssembly binary")
    if header[4:] != b"\x01\0\0\0":
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
            _check_imports(section)
        elif first[0] == _SECTION_TABLE:
            tables += _check_tables(section)
        else:
            memories += _check_memories(section)
    if memories > MAX_MEMORIES:
        raise InvalidModel(f"{where}: module declares {memories} memories; ABI v1 allows {MAX_MEMORIES}")
    if tables > MAX_TABLES:
        raise InvalidModel(f"{where}: module declares {tables} tables; ABI v1 allows {MAX_TABLES}")


def _check_imports(section: _Reader) -> None:
    for _ in range(section.u32()):
        module = section.name()
        name = section.name()
        kind = section.byte()
        if module != WASI_MODULE:
            raise InvalidModel(
                f"{section.where}: module imports {module}.{name}; ABI v1 modules may import only {WASI_MODULE}"
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
