"""What one instance of an ABI v1 module may hold: its store limits.

A model instance owns one linear memory and at most one table (the indirect
function table C and Rust compilers emit). Both cost host memory, so the
per-instance cap (``memory_limit_mb``) is split between them and enforced by
wasmtime's store limits. What a module may *declare* is checked from its
section headers before it is stored, by ``agent.wasmshape`` (pure, below
both ``runtime/`` and ``images/``); its bounds and check are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import wasmtime

from agent.wasmshape import MAX_MEMORIES, MAX_TABLE_ELEMENTS, MAX_TABLES, check_module_shape

__all__ = ["MAX_MEMORIES", "MAX_TABLES", "MAX_TABLE_ELEMENTS", "StoreLimits", "check_module_shape"]

# What wasmtime charges per table element (see Store.set_limits).
TABLE_ELEMENT_BYTES = 8
# The table's share of an instance's cap: at most 1/16 of it.
TABLE_SHARE = 16


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
