"""Unwind stage: compact x86-64 unwind tables from a binary's call frame information (CFI).

`.eh_frame` (or `.debug_frame` where a binary has no `.eh_frame`) describes, for every instruction of
every function, how to find the caller's frame: the canonical frame address (CFA, the caller's stack
pointer) as a register plus an offset, and where the return address and the saved registers sit
relative to it. `agent.process.elf` reads the sections out of the file; pyelftools parses the entries;
this module interprets their instructions itself
(pyelftools' own decoder stops at DW_CFA_GNU_args_size, which glibc uses, and builds a dict per row)
and keeps only what an x86-64 unwinder needs: per function, its rows' addresses and rules.

Only CFAs based on rsp or rbp are followed, and the one expression every x86-64 linker writes for its
`.plt` (`_PLT_EXPRESSIONS`: rsp + 8 before the stub's push, rsp + 16 after it), expanded into two rows
per 16-byte stub. Any other expression (stack realignment) or another register is `CFA_UNSUPPORTED`,
and the unwinder falls back to the frame pointer for that frame. Seen without the PLT rows: a sample in
a PLT stub lost its caller (the frame pointer names the caller's caller), ~10% of the samples of a loop
calling a libc function.
"""

from __future__ import annotations

import bisect
import io
import logging
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from elftools.common.exceptions import ELFError
from elftools.dwarf.callframe import CIE, FDE, CallFrameInfo
from elftools.dwarf.constants import (
    DW_CFA_advance_loc,
    DW_CFA_advance_loc1,
    DW_CFA_advance_loc2,
    DW_CFA_advance_loc4,
    DW_CFA_def_cfa,
    DW_CFA_def_cfa_expression,
    DW_CFA_def_cfa_offset,
    DW_CFA_def_cfa_offset_sf,
    DW_CFA_def_cfa_register,
    DW_CFA_def_cfa_sf,
    DW_CFA_expression,
    DW_CFA_offset,
    DW_CFA_offset_extended,
    DW_CFA_offset_extended_sf,
    DW_CFA_register,
    DW_CFA_remember_state,
    DW_CFA_restore,
    DW_CFA_restore_extended,
    DW_CFA_restore_state,
    DW_CFA_same_value,
    DW_CFA_set_loc,
    DW_CFA_undefined,
    DW_CFA_val_expression,
    DW_CFA_val_offset,
    DW_CFA_val_offset_sf,
)
from elftools.dwarf.structs import DWARFStructs

from agent.process.elf import CfiSections, ElfReadError, LoadSegment, read_cfi_sections, read_cfi_sections_bytes

logger = logging.getLogger(__name__)

# DWARF register numbers on x86-64 (System V psABI, figure 3.36).
RBP, RSP, RA = 6, 7, 16
CFA_UNSUPPORTED = -1
_CFA_PLT = -2  # while decoding only: a PLT expression, its threshold in cfa_offset (see _expand_plt)
# CFA = rsp + 8 + ((rip & 15) >= N) << 3, as DWARF bytes: breg7 8, breg16 0, lit15, and, litN, ge, lit3,
# shl, plus. N is 11 for the classic stub (a 6-byte jmp, then a push) and 10 with -z bndplt/IBT variants.
_PLT_EXPRESSIONS = {bytes([0x77, 8, 0x80, 0, 0x3F, 0x1A, 0x30 + n, 0x2A, 0x33, 0x24, 0x22]): n for n in (10, 11)}
_PLT_STUB = 16
# `Rule.rbp` or `Rule.ra` when the caller's value cannot be recovered (an expression, another register).
LOST = 1 << 62
RBP_LOST = LOST  # the name the rbp rule reads best with
_ADVANCES = (DW_CFA_advance_loc, DW_CFA_advance_loc1, DW_CFA_advance_loc2, DW_CFA_advance_loc4)
_OFFSETS = (DW_CFA_offset, DW_CFA_offset_extended, DW_CFA_offset_extended_sf)
# Register rules this unwinder does not evaluate: the register is lost for the caller's frame.
_UNFOLLOWED = (DW_CFA_register, DW_CFA_expression, DW_CFA_val_expression, DW_CFA_val_offset, DW_CFA_val_offset_sf)


class Rule(NamedTuple):
    """How to step from a frame at one instruction to its caller's frame."""

    cfa_reg: int  # RSP, RBP or CFA_UNSUPPORTED
    cfa_offset: int
    rbp: int | None  # caller's rbp saved at CFA + this; None: rbp unchanged; LOST: unknown
    ra: int | None  # return address at CFA + this; None: undefined (the outermost frame); LOST: unknown

    @property
    def frame_pointer_based(self) -> bool:
        """The CFA is rbp + 16 with rbp saved below it: a frame-pointer walk through here is exact."""
        return self.cfa_reg == RBP and self.cfa_offset == 16 and self.rbp == -16 and self.ra == -8


class CfiError(Exception):
    """A binary whose call frame information cannot be read."""


class _Rows(NamedTuple):
    """One FDE's rules: `rules[i]` is in force from `starts[i]` up to the next start, or to `end`."""

    starts: tuple[int, ...]
    rules: tuple[Rule, ...]
    end: int


_UNDECODABLE = _Rows((), (), 0)


class UnwindTable:
    """One binary's unwind rules by link-time address, decoded one function (FDE) at a time.

    The FDE index comes from `.eh_frame_hdr` (the sorted search table the C runtime's own unwinder
    uses) without parsing any FDE, so a table costs next to nothing until an address in it is looked
    up: a process samples a few hundred of python3's ten thousand functions, and parsing them all
    took over a second. Without a usable header every entry is parsed up front to build the index."""

    def __init__(
        self,
        fde_starts: array[int],
        fde_offsets: array[int],
        parse: Callable[[int], Any],
        segments: tuple[LoadSegment, ...] = (),
    ) -> None:
        self._fde_starts = fde_starts  # sorted link-time start address of each FDE
        self._fde_offsets = fde_offsets  # where each FDE is in its section, for `parse`
        self._parse = parse  # section offset -> pyelftools FDE
        self._decoded: dict[int, _Rows] = {}
        self.segments = segments  # PT_LOAD headers: what the load bias of a mapping is computed from
        self.decode_errors = 0
        # Decoded FDEs that set up an rbp-based frame: most of them, in code built with frame pointers.
        self.frame_pointer_fdes = 0

    @property
    def fde_count(self) -> int:
        return len(self._fde_starts)

    @property
    def decoded_fdes(self) -> int:
        return len(self._decoded)

    def lookup(self, vaddr: int) -> Rule | None:
        i = bisect.bisect_right(self._fde_starts, vaddr) - 1
        if i < 0:
            return None
        rows = self._decoded.get(i)
        if rows is None:
            rows = self._decoded[i] = self._decode(i)
        if vaddr >= rows.end:
            return None  # past the end of that function: a gap no CFI covers
        j = bisect.bisect_right(rows.starts, vaddr) - 1
        return rows.rules[j] if j >= 0 else None

    def _decode(self, i: int) -> _Rows:
        start = self._fde_starts[i]
        try:
            fde = self._parse(self._fde_offsets[i])
            if not isinstance(fde, FDE):
                raise CfiError(f"no FDE at offset {self._fde_offsets[i]:#x}")
            end = start + fde["address_range"]
            rows = _expand_plt(list(_rows(fde, start)), end)
        except (CfiError, ELFError, ValueError, KeyError, IndexError, AssertionError, TypeError) as e:
            # One corrupt entry costs its own function, not the whole binary.
            self.decode_errors += 1
            logger.debug("cannot decode the FDE for %#x: %s", start, e)
            return _UNDECODABLE
        if any(rule.cfa_reg == RBP for _, rule in rows):
            self.frame_pointer_fdes += 1
        # Rows at the same address (an advance by 0): the last one is in force.
        merged = dict(rows)
        return _Rows(tuple(merged), tuple(merged.values()), end)

    def __len__(self) -> int:
        return len(self._fde_starts)


# What pyelftools raises for corrupt call frame information (the sections are in memory by then).
_CFI_PARSE_ERRORS = (ELFError, ValueError, KeyError, IndexError, AssertionError)


def read_unwind_table(path: Path) -> UnwindTable:
    """The unwind table of the ELF file at `path`; raises `CfiError` when it has none or is unreadable."""
    try:
        return unwind_table_of(read_cfi_sections(path))
    except (ElfReadError, *_CFI_PARSE_ERRORS) as e:
        raise CfiError(f"{path}: {e}") from e


def read_unwind_table_bytes(image: bytes, name: str) -> UnwindTable:
    """The unwind table of an ELF image in memory (the vDSO)."""
    try:
        return unwind_table_of(read_cfi_sections_bytes(image, name))
    except (ElfReadError, *_CFI_PARSE_ERRORS) as e:
        raise CfiError(f"{name}: {e}") from e


def unwind_table_of(sections: CfiSections) -> UnwindTable:
    """The unwind table of one file's CFI sections; raises `CfiError` when they hold no FDE."""
    eh_frame, header = sections.eh_frame, sections.eh_frame_hdr
    if eh_frame is not None:
        cfi = CallFrameInfo(
            stream=io.BytesIO(eh_frame.data),
            size=len(eh_frame.data),
            address=eh_frame.address,
            base_structs=DWARFStructs(
                little_endian=sections.little_endian, dwarf_format=32, address_size=sections.address_size
            ),
            for_eh_frame=True,
        )
        index = _search_table(header.data, header.address, eh_frame.address) if header is not None else None
        if index is not None:
            return UnwindTable(*index, cfi._parse_entry_at, sections.segments)
        entries = cfi.get_entries()
    elif sections.debug_frame is not None:
        entries = list(sections.debug_frame)
    else:
        raise CfiError("no .eh_frame or .debug_frame section")
    fdes = sorted(((e["initial_location"], e.offset, e) for e in entries if isinstance(e, FDE)), key=lambda f: f[:2])
    if not fdes:
        raise CfiError("no call frame information (no FDE in .eh_frame or .debug_frame)")
    by_offset = {offset: fde for _, offset, fde in fdes}
    starts, offsets = array("Q", (f[0] for f in fdes)), array("Q", (f[1] for f in fdes))
    return UnwindTable(starts, offsets, by_offset.__getitem__, sections.segments)


# DW_EH_PE encodings of the .eh_frame_hdr search table: 4-byte signed offsets from the header's own
# address, which is what GNU ld, gold and lld write on x86-64.
_DW_EH_PE_DATAREL_SDATA4 = 0x3B
_POINTER_SIZES = {0x03: 4, 0x0B: 4, 0x04: 8, 0x0C: 8}  # udata4, sdata4, udata8, sdata8 (any application)


def _search_table(data: bytes, header_address: int, eh_frame_address: int) -> tuple[array[int], array[int]] | None:
    """FDE start addresses and section offsets from `.eh_frame_hdr`, or None for a layout not handled."""
    if len(data) < 4 or data[0] != 1 or data[3] != _DW_EH_PE_DATAREL_SDATA4:
        return None
    pointer_size, count_size = _POINTER_SIZES.get(data[1] & 0x0F), _POINTER_SIZES.get(data[2] & 0x0F)
    if pointer_size is None or count_size is None:
        return None
    position = 4 + pointer_size
    count = int.from_bytes(data[position : position + count_size], "little")
    position += count_size
    table = array("i")
    table.frombytes(data[position : position + 8 * count])
    if len(table) != 2 * count:
        return None  # truncated
    starts = array("Q", (header_address + table[k] for k in range(0, len(table), 2)))
    offsets = array("Q", (header_address + table[k] - eh_frame_address for k in range(1, len(table), 2)))
    return starts, offsets


class _State:
    """The rule being built while interpreting one CIE's and one FDE's instructions."""

    __slots__ = ("cfa_offset", "cfa_reg", "ra", "rbp")

    def __init__(self) -> None:
        self.cfa_reg, self.cfa_offset = CFA_UNSUPPORTED, 0
        self.rbp: int | None = None
        self.ra: int | None = None

    def copy(self) -> _State:
        other = _State()
        other.cfa_reg, other.cfa_offset, other.rbp, other.ra = self.cfa_reg, self.cfa_offset, self.rbp, self.ra
        return other

    def rule(self) -> Rule:
        return Rule(self.cfa_reg, self.cfa_offset, self.rbp, self.ra)


def _rows(fde: FDE, start: int) -> Iterator[tuple[int, Rule]]:
    cie = fde.cie
    initial = _State()
    for _ in _interpret(cie, cie.instructions, initial, initial, None):
        pass  # a CIE has no address: its instructions only set the initial rules
    state = initial.copy()
    yield from _interpret(cie, fde.instructions, state, initial, start)


def _interpret(
    cie: CIE, instructions: list[Any], state: _State, initial: _State, pc: int | None
) -> Iterator[tuple[int, Rule]]:
    """Apply `instructions` to `state`, yielding (address, rule) for each row (only with a start `pc`)."""
    code_factor, data_factor = cie["code_alignment_factor"], cie["data_alignment_factor"]
    saved: list[_State] = []
    for instruction in instructions:
        op, args = instruction.opcode, instruction.args
        if op in _ADVANCES or op == DW_CFA_set_loc:
            if pc is not None:
                yield pc, state.rule()
                pc = args[0] if op == DW_CFA_set_loc else pc + args[0] * code_factor
        elif op in (DW_CFA_def_cfa, DW_CFA_def_cfa_sf):
            state.cfa_reg = _cfa_register(args[0])
            state.cfa_offset = args[1] * (data_factor if op == DW_CFA_def_cfa_sf else 1)
        elif op == DW_CFA_def_cfa_register:
            state.cfa_reg = _cfa_register(args[0])
        elif op in (DW_CFA_def_cfa_offset, DW_CFA_def_cfa_offset_sf):
            state.cfa_offset = args[0] * (data_factor if op == DW_CFA_def_cfa_offset_sf else 1)
        elif op == DW_CFA_def_cfa_expression:
            threshold = _PLT_EXPRESSIONS.get(bytes(args[0]))
            state.cfa_reg, state.cfa_offset = (CFA_UNSUPPORTED, 0) if threshold is None else (_CFA_PLT, threshold)
        elif op in _OFFSETS:
            _set_register(state, args[0], args[1] * data_factor)
        elif op in (DW_CFA_restore, DW_CFA_restore_extended):
            _restore(state, initial, args[0])
        elif op == DW_CFA_undefined:
            _set_register(state, args[0], None, undefined=True)
        elif op == DW_CFA_same_value:
            _set_register(state, args[0], None)
        elif op in _UNFOLLOWED:
            _set_register(state, args[0], LOST)
        elif op == DW_CFA_remember_state:
            saved.append(state.copy())
        elif op == DW_CFA_restore_state and saved:
            restored = saved.pop()
            state.cfa_reg, state.cfa_offset, state.rbp, state.ra = (
                restored.cfa_reg,
                restored.cfa_offset,
                restored.rbp,
                restored.ra,
            )
        # nop, GNU_args_size (the callee pops arguments: no effect on the CFA) and the rest: nothing.
    if pc is not None:
        yield pc, state.rule()


def _expand_plt(rows: list[tuple[int, Rule]], end: int) -> list[tuple[int, Rule]]:
    """Rows whose CFA is the PLT expression, as two plain rows per stub: rsp + 8 up to the stub's push
    (at offset `threshold` of each 16-byte stub), rsp + 16 from it."""
    if not any(rule.cfa_reg == _CFA_PLT for _, rule in rows):
        return rows
    expanded: list[tuple[int, Rule]] = []
    for index, (address, rule) in enumerate(rows):
        if rule.cfa_reg != _CFA_PLT:
            expanded.append((address, rule))
            continue
        until = rows[index + 1][0] if index + 1 < len(rows) else end
        before, after = rule._replace(cfa_reg=RSP, cfa_offset=8), rule._replace(cfa_reg=RSP, cfa_offset=16)
        stub = address - address % _PLT_STUB
        while stub < until:
            for at, plain in ((stub, before), (stub + rule.cfa_offset, after)):
                if address <= at < until:
                    expanded.append((at, plain))
                elif at < address:  # the row starts inside a stub: its first address takes that rule
                    expanded.append((address, plain))
            stub += _PLT_STUB
    return expanded


def _cfa_register(register: int) -> int:
    return register if register in (RSP, RBP) else CFA_UNSUPPORTED


def _set_register(state: _State, register: int, offset: int | None, *, undefined: bool = False) -> None:
    if register == RBP:
        state.rbp = LOST if undefined else offset
    elif register == RA:
        # An undefined return address marks the outermost frame (_start, clone's child); any rule other
        # than "saved at CFA + offset" (LOST here) cannot be followed, and truncates the stack.
        state.ra = None if undefined else offset


def _restore(state: _State, initial: _State, register: int) -> None:
    if register == RBP:
        state.rbp = initial.rbp
    elif register == RA:
        state.ra = initial.ra
