"""Process stage: the few x86-64 instruction patterns the Python inspector decodes from ELF files.

This module owns two decoders, both of code read from the file (never from the process):
- `tss_key_address`: the address of the `Py_tss_t` that `PyGILState_GetThisThreadState` reads
  (`_PyRuntime.autoTSSkey`). The function either loads the key itself (`mov edi, [rip+d32]` on the
  `_key` field, static builds: Debian's python3.11) and jumps to `pthread_getspecific`, or passes the
  `Py_tss_t`'s address to `PyThread_tss_get` (and, 3.12+, first to `PyThread_tss_is_created`), built
  from `_PyRuntime`'s address, which a shared libpython loads from its GOT (`mov rax, [rip+d32]`, then
  `lea rdi, [rax+d32]`). A tiny register tracker follows exactly those moves; the first use of a known
  address as the key wins.
- `pthread_specific_offsets`: where glibc's `pthread_getspecific` finds the slots, from its code
  (`add rax, k; shl rax, 4; add rax, fs:0x10` for `specific_1stblock`, `mov rax, fs:[rax*8+d32]` for
  `specific`), a cross-check of what the inspector finds in memory.

Only the instruction forms these functions use are decoded; anything else ends the scan (None), which
callers treat as "could not tell", never as an answer.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import NamedTuple

# Py_tss_t is {int _is_initialized; pthread_key_t _key;}: the key is 4 bytes into it.
TSS_KEY_FIELD = 4
_RDI = 7
_MAX_INSTRUCTIONS = 32


class _Operand(NamedTuple):
    """A decoded ModRM operand: a register (mod == 3) or a memory reference."""

    reg: int  # ModRM.reg (with REX.R)
    is_register: bool  # the r/m operand is a register: rm_reg
    rm_reg: int  # with REX.B; for memory, the base register (-1: RIP-relative, -2: none/SIB scaled)
    disp: int
    length: int  # bytes of ModRM, SIB and displacement


def _modrm(code: bytes, i: int, rex: int) -> _Operand | None:
    if i >= len(code):
        return None
    modrm = code[i]
    mod, reg, rm = modrm >> 6, ((modrm >> 3) & 7) | ((rex & 4) << 1), modrm & 7
    if mod == 3:
        return _Operand(reg, True, rm | ((rex & 1) << 3), 0, 1)
    length, base = 1, rm | ((rex & 1) << 3)
    if rm == 4:  # SIB: only the plain [base + disp] form (index 4, no scale) keeps a trackable base
        if i + 1 >= len(code):
            return None
        sib = code[i + 1]
        length += 1
        index, sib_base = ((sib >> 3) & 7) | ((rex & 2) << 2), sib & 7
        base = sib_base | ((rex & 1) << 3) if index == 4 else -2
        if sib_base == 5 and mod == 0:
            base, mod = -2, 2  # disp32 with no base
    elif rm == 5 and mod == 0:
        base, mod = -1, 2  # RIP-relative disp32
    disp_size = {0: 0, 1: 1, 2: 4}[mod]
    if i + length + disp_size > len(code):
        return None
    disp = 0
    if disp_size == 1:
        disp = struct.unpack_from("<b", code, i + length)[0]
    elif disp_size == 4:
        disp = struct.unpack_from("<i", code, i + length)[0]
    return _Operand(reg, False, base, disp, length + disp_size)


class _Tracker:
    """Registers holding known link-time addresses while the scan goes on."""

    def __init__(self, load_pointer: Callable[[int], int | None]) -> None:
        self.regs: dict[int, int] = {}
        self.load_pointer = load_pointer  # the address stored at a link-time address (a GOT slot), if known

    def address(self, op: _Operand, next_ip: int) -> int | None:
        """The memory operand's link-time address, when its base is RIP or a known register."""
        if op.rm_reg == -1:
            return next_ip + op.disp
        if op.rm_reg >= 0 and op.rm_reg in self.regs:
            return self.regs[op.rm_reg] + op.disp
        return None


def tss_key_address(code: bytes, vaddr: int, load_pointer: Callable[[int], int | None]) -> int | None:
    """The link-time address of the `Py_tss_t` read by `PyGILState_GetThisThreadState`, whose code (from
    the ELF file) is `code` at link-time address `vaddr`; None when the code has none of the known
    forms. `load_pointer(a)` is the address the dynamic linker stores at `a` (a GOT slot), or None."""
    tracker = _Tracker(load_pointer)
    i = 0
    for _ in range(_MAX_INSTRUCTIONS):
        if i >= len(code):
            return None
        step = _step(code, i, vaddr, tracker)
        if step is None:
            return None
        i, found = step
        if found is not None:
            return found
    return None


def _step(code: bytes, i: int, vaddr: int, t: _Tracker) -> tuple[int, int | None] | None:
    """Decode one instruction at `code[i]`: (next index, the key's address if this one uses it)."""
    if code[i : i + 4] == b"\xf3\x0f\x1e\xfa":  # endbr64
        return i + 4, None
    rex = 0
    while i < len(code) and code[i] == 0x66:  # operand-size prefix (nop padding)
        i += 1
    if i < len(code) and 0x40 <= code[i] <= 0x4F:
        rex, i = code[i], i + 1
    if i >= len(code):
        return None
    op, wide = code[i], bool(rex & 8)
    i += 1
    if op in (0xE8, 0xE9):  # call / jmp rel32: the key's address is the argument
        return (i + 4, t.regs[_RDI]) if _RDI in t.regs else None
    if 0x50 <= op <= 0x5F:  # push / pop: a pop clobbers its register
        if op >= 0x58:
            t.regs.pop((op - 0x58) | ((rex & 1) << 3), None)
        return i, None
    if op in (0x74, 0x75, 0xEB) or 0x70 <= op <= 0x7F:  # short jumps: follow the fall-through
        return (i + 1, None) if op != 0xEB else None
    if op == 0x0F:
        return _step_0f(code, i, t)
    if op in (0x8B, 0x8D, 0x89, 0x83, 0x85, 0x31, 0x39, 0x3B, 0x81, 0x80):
        operand = _modrm(code, i, rex)
        if operand is None:
            return None
        imm = {0x83: 1, 0x80: 1, 0x81: 4}.get(op, 0)
        end = i + operand.length + imm
        return end, _apply(op, wide, operand, vaddr + end, t)
    return None


def _step_0f(code: bytes, i: int, t: _Tracker) -> tuple[int, int | None] | None:
    if i >= len(code):
        return None
    op = code[i]
    if 0x80 <= op <= 0x8F:  # jcc rel32: follow the fall-through
        return i + 5, None
    if op == 0x1F:  # multi-byte nop
        operand = _modrm(code, i + 1, 0)
        return (i + 1 + operand.length, None) if operand is not None else None
    return None


def _apply(op: int, wide: bool, o: _Operand, next_ip: int, t: _Tracker) -> int | None:
    """Track what one ModRM instruction does to the registers; the key's address if it loads the key."""
    if op == 0x8B and not o.is_register:  # mov reg, [mem]
        address = t.address(o, next_ip)
        if wide:
            loaded = t.load_pointer(address) if address is not None else None
            _set(t, o.reg, loaded)
        elif o.reg == _RDI and address is not None:
            return address - TSS_KEY_FIELD  # mov edi, [key._key]: pthread_getspecific(key) follows
        else:
            _set(t, o.reg, None)
    elif op == 0x8D and not o.is_register and wide:  # lea reg, [mem]
        _set(t, o.reg, t.address(o, next_ip))
    elif op in (0x8B, 0x89) and o.is_register:  # mov reg, reg (either direction)
        src, dst = (o.rm_reg, o.reg) if op == 0x8B else (o.reg, o.rm_reg)
        _set(t, dst, t.regs.get(src) if wide else None)
    elif o.is_register and (op == 0x31 or (op in (0x83, 0x81) and (o.reg & 7) != 7)):  # xor, add/sub/...
        _set(t, o.rm_reg, None)  # (group 1's /7 is cmp)
    return None  # stores, cmp and test change no register


def _set(t: _Tracker, reg: int, value: int | None) -> None:
    if value is None:
        t.regs.pop(reg, None)
    else:
        t.regs[reg] = value


class SpecificOffsets(NamedTuple):
    """Where glibc's struct pthread keeps the thread-specific data, from `pthread_getspecific`'s code."""

    first_block: int  # offsetof(struct pthread, specific_1stblock): keys 0..31, 16 bytes each
    specific: int | None  # offsetof(struct pthread, specific): the second-level blocks, for keys >= 32


# mov eax, edi; add rax, imm8; shl rax, 4; (add rax, fs:0x10): &specific_1stblock[key] - self.
_FIRST_BLOCK = re.compile(rb"\x89\xf8\x48\x83\xc0(.)\x48\xc1\xe0\x04", re.DOTALL)
# mov rax, fs:[rax*8 + disp32]: specific[key / 32].
_SPECIFIC = re.compile(rb"\x64\x48\x8b\x04\xc5(....)", re.DOTALL)


def pthread_specific_offsets(code: bytes) -> SpecificOffsets | None:
    """glibc x86-64 `pthread_getspecific`'s struct pthread offsets, or None if the code is another shape."""
    first = _FIRST_BLOCK.search(code)
    if first is None:
        return None
    second = _SPECIFIC.search(code)
    specific = struct.unpack("<i", second.group(1))[0] if second is not None else None
    return SpecificOffsets(first.group(1)[0] * 16, specific)
