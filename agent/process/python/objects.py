"""Process stage: reading CPython objects out of another process: str, bytes and code objects.

This module owns `read_str`, `read_bytes`, `read_code` and what they return, `CodeInfo` (a code object's
names, first line, where its bytecode starts and its decoded line table, with `line_for`, which turns
what the BPF walker copied out of a frame into a line), and `CodeReadError`, the one error any of them
raises, with a reason to count by.

Everything read is foreign memory that may be stale (the object freed and the address reused) or
garbage, so each reader checks what CPython guarantees: a compact str has its kind, ASCII and
ready bits consistent, its characters in the range its kind implies (compact strings are always in
their narrowest kind) and a NUL after them; a bytes object has its NUL; a code object has
`ob_type == &PyCode_Type` when that address is known, sane strings, and a line table that decodes and
covers its bytecode. Lengths are bounded before anything is read.
"""

from __future__ import annotations

import enum
import struct
from array import array
from dataclasses import dataclass

from agent.errors import AgentError
from agent.process.memory import MemoryErrorReason, MemoryReader, MemoryReadError
from agent.process.python.layouts import FINGERPRINT_WORDS, NO_FIELD, PythonLayout
from agent.process.python.linetable import MAX_LINETABLE, LineTable, LineTableError, decode
from agent.types import PYTHON_FINGERPRINT_SHIFT

MAX_STR_LENGTH = 16384  # characters: names and file names are far shorter
MAX_CODE_UNITS = 1 << 20  # the bytecode of one code object, in 2-byte units
_CODE_UNIT = 2
_I64 = struct.Struct("<q")
_U64 = struct.Struct("<Q")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_FINGERPRINT_WINDOW = struct.Struct(f"<{FINGERPRINT_WORDS}Q")
_FINGERPRINT_MULTIPLIER = 0x9E3779B97F4A7C15  # bpf/common.h PYTHON_FINGERPRINT_MULTIPLIER
_U64_MASK = (1 << 64) - 1


class CodeErrorReason(enum.StrEnum):
    UNREADABLE = "unreadable"  # memory not mapped there, or a read refused
    GONE = "gone"  # the process exited
    NOT_CODE = "not_code"  # ob_type is not PyCode_Type
    BAD_STRING = "bad_string"  # a str field that is not a compact str CPython could have made
    BAD_BYTES = "bad_bytes"  # a bytes field (line table, 3.10 co_code) that is not a bytes object
    BAD_LINETABLE = "bad_linetable"  # the line table does not decode or does not cover the code
    BAD_FIELD = "bad_field"  # an integer field out of range (first line, code length)
    REPLACED = "replaced"  # another code object lives at the address now (the sampled one was freed)


class CodeReadError(AgentError):
    """A str, bytes or code object at `address` could not be read or is not what it should be."""

    def __init__(self, address: int, reason: CodeErrorReason, detail: str) -> None:
        super().__init__(f"object at {address:#x}: {reason}: {detail}")
        self.address = address
        self.reason = reason


def _read(memory: MemoryReader, address: int, size: int) -> bytes:
    try:
        return memory.read(address, size)
    except MemoryReadError as e:
        reason = CodeErrorReason.GONE if e.reason == MemoryErrorReason.GONE else CodeErrorReason.UNREADABLE
        raise CodeReadError(address, reason, str(e.reason)) from e


def _check_type(address: int, header: bytes, layout: PythonLayout, type_address: int, what: str) -> None:
    if type_address and _U64.unpack_from(header, layout.object_type)[0] != type_address:
        reason = CodeErrorReason.NOT_CODE if what == "code" else _BAD[what]
        raise CodeReadError(address, reason, f"ob_type is not {what}'s type")


_BAD = {"str": CodeErrorReason.BAD_STRING, "bytes": CodeErrorReason.BAD_BYTES}


def read_str(
    memory: MemoryReader, layout: PythonLayout, address: int, *, type_address: int = 0, limit: int = MAX_STR_LENGTH
) -> str:
    """The compact str at `address` (ASCII, UCS1, UCS2 or UCS4); `type_address`, when set, is &PyUnicode_Type."""
    if address == 0 or address % 8:
        raise CodeReadError(address, CodeErrorReason.BAD_STRING, "not an object pointer")
    header = _read(memory, address, layout.unicode_ascii_data)
    _check_type(address, header, layout, type_address, "str")
    length = _I64.unpack_from(header, layout.unicode_length)[0]
    state = _U32.unpack_from(header, layout.unicode_state)[0]
    kind = (state >> layout.unicode_kind_shift) & 7
    is_ascii = bool(state >> layout.unicode_ascii_bit & 1)
    problem = _state_problem(layout, state, kind, is_ascii, length, limit)
    if problem:
        raise CodeReadError(address, CodeErrorReason.BAD_STRING, problem)
    data_at = layout.unicode_ascii_data if is_ascii else layout.unicode_compact_data
    raw = _read(memory, address + data_at, (length + 1) * kind)  # with the NUL CPython writes after the data
    if any(raw[length * kind :]):
        raise CodeReadError(address, CodeErrorReason.BAD_STRING, "no NUL after the characters")
    text = _decode(raw[: length * kind], kind, is_ascii)
    if text is None:
        raise CodeReadError(address, CodeErrorReason.BAD_STRING, f"characters outside kind {kind}'s range")
    return text


def _state_problem(layout: PythonLayout, state: int, kind: int, is_ascii: bool, length: int, limit: int) -> str:
    if not state >> layout.unicode_compact_bit & 1:
        return "not a compact str"
    if layout.unicode_ready_bit != NO_FIELD and not state >> layout.unicode_ready_bit & 1:
        return "not ready"
    if kind not in (1, 2, 4) or (is_ascii and kind != 1):
        return f"kind {kind}{' ascii' if is_ascii else ''}"
    if not 0 <= length <= limit:
        return f"length {length} (limit {limit})"
    return ""


def _decode(data: bytes, kind: int, is_ascii: bool) -> str | None:
    """The characters, or None when they are not in the range a canonical compact str of this kind has."""
    if kind == 1:
        if is_ascii:
            return data.decode("ascii") if data.isascii() else None
        return data.decode("latin-1") if data and max(data) >= 0x80 else None
    units = array("H" if kind == 2 else "I", data)
    top = max(units, default=0)
    if kind == 2:
        return "".join(map(chr, units)) if top >= 0x100 else None
    return "".join(map(chr, units)) if 0x10000 <= top <= 0x10FFFF else None


def read_bytes(
    memory: MemoryReader, layout: PythonLayout, address: int, *, type_address: int = 0, limit: int = MAX_LINETABLE
) -> bytes:
    """The contents of the bytes object at `address` (at most `limit` bytes, else an error)."""
    if address == 0 or address % 8:
        raise CodeReadError(address, CodeErrorReason.BAD_BYTES, "not an object pointer")
    header = _read(memory, address, layout.bytes_data)
    _check_type(address, header, layout, type_address, "bytes")
    size = _I64.unpack_from(header, layout.var_size)[0]
    if not 0 <= size <= limit:
        raise CodeReadError(address, CodeErrorReason.BAD_BYTES, f"size {size} (limit {limit})")
    raw = _read(memory, address + layout.bytes_data, size + 1)
    if raw[size]:
        raise CodeReadError(address, CodeErrorReason.BAD_BYTES, "no NUL after the contents")
    return raw[:size]


@dataclass(frozen=True, slots=True)
class CodeInfo:
    """One code object as read from a process: what names a Python frame, and how to find its line."""

    address: int
    name: str
    qualname: str  # 3.10 has none: the name
    filename: str
    first_line: int
    code_start: int  # the address of the first code unit (3.11+: address + co_code_adaptive; 3.10: co_code's data)
    code_bytes: int  # the bytecode's length in bytes
    instruction_kind: str  # "f_lasti" (3.10), "prev_instr" (3.11/3.12), "instr_ptr" (3.13+)
    lines: LineTable
    fingerprint: int = 0  # what the BPF walker puts beside this object's address (code_fingerprint)

    def byte_offset(self, raw_instruction: int) -> int | None:
        """The instruction's byte offset in the bytecode (negative: the frame has not started), or None."""
        if self.instruction_kind == "f_lasti":
            lasti = raw_instruction & 0xFFFFFFFF  # a C int, however wide the slot it came in
            return (lasti - (1 << 32) if lasti >= 1 << 31 else lasti) * _CODE_UNIT
        if raw_instruction == 0:
            return None
        # prev_instr (the instruction last started) and instr_ptr (the one executing) both point at the
        # instruction whose line CPython reports: PyFrame_GetLineNumber uses (ptr - _PyCode_CODE(co)).
        return (raw_instruction - self.code_start) // _CODE_UNIT * _CODE_UNIT

    def line_for(self, raw_instruction: int) -> int:
        """The line of the instruction the walker sent (f_lasti, prev_instr or instr_ptr); 0 when unknown."""
        offset = self.byte_offset(raw_instruction)
        if offset is None or offset >= self.code_bytes:
            return 0
        return self.lines.line_at(offset)


def code_fingerprint(header: bytes, layout: PythonLayout) -> int:
    """The code object's 16-bit fingerprint from its header, as bpf/agent.bpf.c python_fingerprint
    computes it: a multiply-xor hash of the layout's fingerprint window, its top 16 bits."""
    digest = 0
    for word in _FINGERPRINT_WINDOW.unpack_from(header, layout.code_fingerprint):
        digest = ((digest ^ word) * _FINGERPRINT_MULTIPLIER) & _U64_MASK
    return digest >> PYTHON_FINGERPRINT_SHIFT


def read_code(memory: MemoryReader, layout: PythonLayout, address: int, code_type_address: int = 0) -> CodeInfo:
    """The code object at `address`; `code_type_address` (&PyCode_Type), when set, must be its ob_type."""
    if address == 0 or address % 8:
        raise CodeReadError(address, CodeErrorReason.NOT_CODE, "not an object pointer")
    header = _read(memory, address, layout.code_read_size())
    _check_type(address, header, layout, code_type_address, "code")
    first_line = _I32.unpack_from(header, layout.code_firstlineno)[0]
    if first_line < 0:
        raise CodeReadError(address, CodeErrorReason.BAD_FIELD, f"co_firstlineno {first_line}")
    code_start, code_bytes = _bytecode(memory, layout, address, header)
    name = read_str(memory, layout, _pointer(header, layout.code_name))
    qualname = name
    if layout.code_qualname != NO_FIELD:
        qualname = read_str(memory, layout, _pointer(header, layout.code_qualname))
    filename = read_str(memory, layout, _pointer(header, layout.code_filename))
    table = read_bytes(memory, layout, _pointer(header, layout.code_linetable))
    try:
        lines = decode(layout.version, table, first_line, code_bytes)
    except LineTableError as e:
        raise CodeReadError(address, CodeErrorReason.BAD_LINETABLE, str(e)) from e
    if layout.version >= (3, 11) and lines.code_bytes != code_bytes:
        detail = f"covers {lines.code_bytes} of {code_bytes} bytes"
        raise CodeReadError(address, CodeErrorReason.BAD_LINETABLE, detail)
    fingerprint = code_fingerprint(header, layout) if layout.code_fingerprint != NO_FIELD else 0
    return CodeInfo(
        address,
        name,
        qualname,
        filename,
        first_line,
        code_start,
        code_bytes,
        layout.instruction_kind,
        lines,
        fingerprint,
    )


def _pointer(header: bytes, offset: int) -> int:
    return int(_U64.unpack_from(header, offset)[0])


def _bytecode(memory: MemoryReader, layout: PythonLayout, address: int, header: bytes) -> tuple[int, int]:
    """(address of the first code unit, length in bytes): 3.11+ inline after the header, 3.10 in co_code."""
    if layout.code_code_adaptive != NO_FIELD:
        units = _I64.unpack_from(header, layout.var_size)[0]
        start = address + layout.code_code_adaptive
    else:
        co_code = _pointer(header, layout.code_code)
        if co_code == 0 or co_code % 8:
            raise CodeReadError(address, CodeErrorReason.BAD_BYTES, "co_code is not an object pointer")
        size = _I64.unpack_from(_read(memory, co_code, layout.bytes_data), layout.var_size)[0]
        if size % _CODE_UNIT:
            raise CodeReadError(address, CodeErrorReason.BAD_FIELD, f"co_code of odd length {size}")
        units, start = size // _CODE_UNIT, co_code + layout.bytes_data
    if not 0 < units <= MAX_CODE_UNITS:
        raise CodeReadError(address, CodeErrorReason.BAD_FIELD, f"{units} code units (limit {MAX_CODE_UNITS})")
    return start, units * _CODE_UNIT
