#!/usr/bin/env python3
"""Rewrites clang 14's pre-standard relaxed-SIMD fma to the standard f32x4.relaxed_madd.

clang 14 emits ``__builtin_wasm_fma_f32x4`` as opcode 0xfd 0xaf (the relaxed-SIMD
proposal's early numbering), which no current engine accepts; the standard
``f32x4.relaxed_madd`` is 0xfd 0x105, computing ``a * b + c`` of its operands in
stack order (clang passes the builtin's arguments in order). Both encode in two
LEB128 bytes (af 01 / 85 02), so the rewrite changes no size or offset.

The code section is decoded instruction by instruction (every immediate skipped
by its encoding), so only real opcodes are rewritten, never bytes of an immediate
or of data. Anything not understood stops the build.

    relaxed_fixup.py IN.wasm OUT.wasm
"""

from __future__ import annotations

import sys

OLD = 0xAF  # f32x4.fma (clang 14)
NEW = 0x105  # f32x4.relaxed_madd
VALTYPES = {0x7F, 0x7E, 0x7D, 0x7C, 0x7B, 0x70, 0x6F}


class Reader:
    def __init__(self, data: bytearray, pos: int, end: int):
        self.data, self.pos, self.end = data, pos, end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise ValueError("truncated code")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def uleb(self) -> int:
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    def sleb(self) -> None:
        while self.byte() & 0x80:
            pass

    def skip(self, n: int) -> None:
        self.pos += n
        if self.pos > self.end:
            raise ValueError("truncated code")

    def memarg(self) -> None:
        align = self.uleb()
        if align & 0x40:
            self.uleb()  # memory index (multi-memory)
        self.uleb()  # offset


def rewrite_body(r: Reader) -> int:
    count = 0
    for _ in range(r.uleb()):  # locals
        r.uleb()
        r.byte()
    while r.pos < r.end:
        op = r.byte()
        if op in (0x02, 0x03, 0x04):  # block, loop, if
            if r.data[r.pos] == 0x40 or r.data[r.pos] in VALTYPES:
                r.byte()
            else:
                r.sleb()
        elif op in (0x0C, 0x0D, 0x10, 0x12, 0x20, 0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0xD2):
            r.uleb()
        elif op == 0x0E:  # br_table
            for _ in range(r.uleb()):
                r.uleb()
            r.uleb()
        elif op in (0x11, 0x13):  # call_indirect
            r.uleb()
            r.uleb()
        elif op == 0x1C:  # select t*
            for _ in range(r.uleb()):
                r.byte()
        elif 0x28 <= op <= 0x3E:
            r.memarg()
        elif op in (0x3F, 0x40):  # memory.size / grow
            r.uleb()
        elif op in (0x41, 0x42):
            r.sleb()
        elif op == 0x43:
            r.skip(4)
        elif op == 0x44:
            r.skip(8)
        elif op == 0xD0:  # ref.null
            r.byte()
        elif op in (0x00, 0x01, 0x05, 0x0B, 0x0F, 0x1A, 0x1B, 0xD1) or 0x45 <= op <= 0xC4:
            pass
        elif op == 0xFC:
            sub = r.uleb()
            if sub <= 7:
                pass
            elif sub in (8, 10, 12, 14):
                r.uleb()
                r.uleb()
            elif sub in (9, 11, 13, 15, 16, 17):
                r.uleb()
            else:
                raise ValueError(f"unknown 0xfc opcode {sub} at {r.pos}")
        elif op == 0xFD:
            at = r.pos
            sub = r.uleb()
            if sub <= 11 or sub in (92, 93):
                r.memarg()
            elif sub in (12, 13):
                r.skip(16)
            elif 21 <= sub <= 34:
                r.byte()
            elif 84 <= sub <= 91:
                r.memarg()
                r.byte()
            elif sub == OLD:
                if r.pos - at != 2:
                    raise ValueError(f"unexpected encoding of f32x4.fma at {at}")
                r.data[at] = (NEW & 0x7F) | 0x80
                r.data[at + 1] = NEW >> 7
                count += 1
            elif sub > 0x113:
                raise ValueError(f"unknown 0xfd opcode {sub:#x} at {at}")
        else:
            raise ValueError(f"unknown opcode {op:#x} at {r.pos - 1}")
    return count


def rewrite(data: bytearray) -> int:
    if data[:8] != b"\0asm\x01\0\0\0":
        raise ValueError("not a wasm module")
    r = Reader(data, 8, len(data))
    count = 0
    while r.pos < len(data):
        section = r.byte()
        size = r.uleb()
        start = r.pos
        if section == 10:
            code = Reader(data, start, start + size)
            for _ in range(code.uleb()):
                body = code.uleb()
                count += rewrite_body(Reader(data, code.pos, code.pos + body))
                code.pos += body
        r.pos = start + size
    return count


def main() -> int:
    src, dst = sys.argv[1], sys.argv[2]
    with open(src, "rb") as fh:
        data = bytearray(fh.read())
    count = rewrite(data)
    with open(dst, "wb") as fh:
        fh.write(data)
    print(f"relaxed_fixup: {count} f32x4.fma -> f32x4.relaxed_madd", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
