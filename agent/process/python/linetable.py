"""Process stage: CPython line tables, decoded exactly as the interpreter decodes them.

This module owns `LineTable`, the address ranges of one code object with their lines, and its two
decoders: `decode_lines_310`, 3.10's `co_linetable` (pairs of an unsigned byte-offset delta and a signed
line delta, -128 meaning "no line"), and `decode_locations`, 3.11+'s location table (entries of 1-8 code
units, a first byte `1kkkklll` then kind-dependent varints). Both follow CPython's `advance()` and
`PyLineTable_NextAddressRange()` (Objects/codeobject.c): empty ranges are skipped, a no-location entry
has no line and leaves the running line as it was. `LineTable.line_at(byte_offset)` is then
`PyCode_Addr2Line`: the first line for a negative offset (a frame that has not started), 0 where there is
no line or past the table.

The table is foreign memory, so the decoders are strict where CPython's output always is (every entry's
first byte has the top bit set and no other byte has; varints are at most 6 bytes; the ranges stay within
the code's length when it is known) and raise `LineTableError` otherwise.
"""

from __future__ import annotations

import bisect
import itertools
from array import array
from dataclasses import dataclass

from agent.errors import AgentError

MAX_LINETABLE = 1 << 20  # bytes; the largest stdlib tables are a few tens of KiB
_NO_LINE = -1
_MAX_LINE = (1 << 31) - 1  # co_firstlineno and the lines CPython computes are C ints
_CODE_UNIT = 2  # bytes per _Py_CODEUNIT
_MAX_VARINT_BYTES = 6  # CPython writes 32-bit values: 6 bits a byte
# 3.11+ location kinds (Include/cpython/code.h, _PyCodeLocationInfoKind)
_KIND_NO_COLUMNS = 13
_KIND_LONG = 14
_KIND_NONE = 15
_KIND_ONE_LINE0 = 10


class LineTableError(AgentError):
    """A line table that CPython could not have written: the code object is not what it claims."""


@dataclass(frozen=True, slots=True)
class LineTable:
    """Half-open byte ranges [start, end) of the bytecode, each with its line (-1: none), sorted, disjoint."""

    first_line: int
    starts: array[int]
    ends: array[int]
    lines: array[int]

    def line_at(self, byte_offset: int) -> int:
        """The line of the instruction at `byte_offset`, like PyCode_Addr2Line; 0 when there is none."""
        if byte_offset < 0:
            return self.first_line
        i = bisect.bisect_right(self.starts, byte_offset) - 1
        if i < 0 or byte_offset >= self.ends[i]:
            return 0
        line = self.lines[i]
        return line if line != _NO_LINE else 0

    def ranges(self) -> list[tuple[int, int, int | None]]:
        """(start, end, line or None), as `code.co_lines()` yields them."""
        rows = zip(self.starts, self.ends, self.lines, strict=True)
        return [(start, end, None if line == _NO_LINE else line) for start, end, line in rows]

    @property
    def code_bytes(self) -> int:
        """Where the last range ends: the length of the bytecode the table covers."""
        return self.ends[-1] if self.ends else 0


class _Builder:
    """Collects ranges, merging a range into the previous one when they touch and share a line."""

    def __init__(self, first_line: int, code_bytes: int | None) -> None:
        self.first_line = first_line
        self.code_bytes = code_bytes
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.lines: list[int] = []
        self.end = 0
        self.low = self.high = first_line

    def add(self, length: int, line: int) -> None:
        start = self.end
        self.end = start + length
        if not length:
            return
        if line < self.low:
            self.low = line
        elif line > self.high:
            self.high = line
        if self.lines and self.lines[-1] == line and self.ends[-1] == start:
            self.ends[-1] = self.end
        else:
            self.starts.append(start)
            self.ends.append(self.end)
            self.lines.append(line)

    def table(self) -> LineTable:
        if self.code_bytes is not None and self.end > self.code_bytes:
            raise LineTableError(f"line table covers {self.end} bytes, the code has {self.code_bytes}")
        if self.low < _NO_LINE or self.high > _MAX_LINE or self.end > _MAX_LINE:
            raise LineTableError(f"lines {self.low}..{self.high} over {self.end} bytes")
        # 32-bit entries: offsets are bounded by the code length, lines by _MAX_LINE.
        return LineTable(self.first_line, array("i", self.starts), array("i", self.ends), array("i", self.lines))


def _check_size(table: bytes) -> None:
    if len(table) > MAX_LINETABLE:
        raise LineTableError(f"line table of {len(table)} bytes (limit {MAX_LINETABLE})")


def decode_lines_310(table: bytes, first_line: int, code_bytes: int | None = None) -> LineTable:
    """3.10's co_linetable: (byte delta: u8, line delta: i8) pairs; -128 is an entry without a line."""
    _check_size(table)
    if len(table) % 2:
        raise LineTableError(f"3.10 line table of odd length {len(table)}")
    out = _Builder(first_line, code_bytes)
    line = first_line
    for i in range(0, len(table), 2):
        delta = table[i + 1] - 256 if table[i + 1] >= 128 else table[i + 1]
        if delta == -128:
            out.add(table[i], _NO_LINE)
        else:
            line += delta
            out.add(table[i], line)
    return out.table()


def _varint(table: bytes, pos: int, end: int) -> tuple[int, int]:
    """An unsigned varint of 6-bit chunks (0x40: more follow) inside [pos, end); (value, next position)."""
    value = shift = 0
    for count in range(_MAX_VARINT_BYTES):
        if pos >= end:
            raise LineTableError("varint runs past its entry")
        byte = table[pos]
        pos += 1
        value |= (byte & 0x3F) << shift
        shift += 6
        if not byte & 0x40:
            return value, pos
        if count == _MAX_VARINT_BYTES - 1:
            break
    raise LineTableError("varint longer than 6 bytes")


def _svarint(table: bytes, pos: int, end: int) -> tuple[int, int]:
    value, pos = _varint(table, pos, end)
    return (-(value >> 1) if value & 1 else value >> 1), pos


def _long_delta(table: bytes, kind: int, pos: int, end: int) -> int:
    """The line delta of a no-columns (13) or long (14) entry, whose arguments must fill [pos + 1, end)."""
    delta, after = _svarint(table, pos + 1, end)
    if kind == _KIND_LONG:
        for _ in range(3):  # end line delta, column, end column
            _, after = _varint(table, after, end)
    if after != end:
        raise LineTableError(f"location entry of kind {kind} has {end - after} extra bytes")
    return delta


# Bytes each entry kind has after its first (kinds 13 and 14: varints, checked by _long_delta).
_ARGUMENT_BYTES = (1,) * 10 + (2, 2, 2)


def decode_locations(table: bytes, first_line: int, code_bytes: int | None = None) -> LineTable:
    """3.11+'s location table (Objects/locations.md): entries covering 1-8 code units each."""
    _check_size(table)
    if table and not table[0] & 0x80:
        raise LineTableError(f"location table starts without an entry's start bit: {table[0]:#04x}")
    out = _Builder(first_line, code_bytes)
    line = first_line
    heads = [i for i, byte in enumerate(table) if byte & 0x80]
    heads.append(len(table))
    for pos, end in itertools.pairwise(heads):
        head = table[pos]
        kind = (head >> 3) & 15
        length = ((head & 7) + 1) * _CODE_UNIT
        if kind < _KIND_NO_COLUMNS:
            if end - pos - 1 != _ARGUMENT_BYTES[kind]:
                raise LineTableError(f"location entry of kind {kind} at {pos} has {end - pos - 1} argument bytes")
            if kind >= _KIND_ONE_LINE0:
                line += kind - _KIND_ONE_LINE0
            out.add(length, line)
        elif kind == _KIND_NONE:
            if end - pos != 1:
                raise LineTableError(f"no-location entry at {pos} has {end - pos - 1} argument bytes")
            out.add(length, _NO_LINE)
        else:
            line += _long_delta(table, kind, pos, end)
            out.add(length, line)
    return out.table()


def decode(version: tuple[int, int], table: bytes, first_line: int, code_bytes: int | None = None) -> LineTable:
    """The line table of a `version` code object."""
    if version < (3, 11):
        return decode_lines_310(table, first_line, code_bytes)
    return decode_locations(table, first_line, code_bytes)
