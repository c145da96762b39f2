"""Tests for the unwind stage's CFI interpreter (`agent.unwind.cfi`) against hand-written CFI directives."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from agent.unwind.cfi import (
    CFA_UNSUPPORTED,
    RBP,
    RBP_LOST,
    RSP,
    CfiError,
    Rule,
    UnwindTable,
    read_unwind_table,
    read_unwind_table_bytes,
)
from tests.unit.unwind_fixtures import (
    FDE_FUNCTIONS,
    FRAME_POINTER_FUNCTIONS,
    build_library,
    require_toolchain,
    symbol_addresses,
)

LIBC = Path("/usr/lib/x86_64-linux-gnu/libc.so.6")

ENTRY = Rule(RSP, 8, None, -8)
PUSHED = Rule(RSP, 16, -16, -8)
FRAME_POINTER = Rule(RBP, 16, -16, -8)
FRAMELESS = Rule(RSP, 32, None, -8)

# label -> (rule in force from the label up to the next label, next label)
RULES_BETWEEN_LABELS = {
    "fp_func": (ENTRY, "fp_pushed"),
    "fp_pushed": (PUSHED, "fp_framed"),
    "fp_framed": (FRAME_POINTER, "fp_early_leave"),
    "fp_early_leave": (ENTRY, "fp_after_early"),
    "fp_after_early": (FRAME_POINTER, "fp_popped"),
    "fp_popped": (Rule(RSP, 8, -16, -8), "fp_noreturn"),
    "fp_noreturn": (ENTRY, "fp_noreturn_pushed"),
    "fp_noreturn_pushed": (PUSHED, "fp_noreturn_framed"),
    "fp_noreturn_framed": (FRAME_POINTER, "leaf_func"),
    "leaf_func": (ENTRY, "leaf_subbed"),
    "leaf_subbed": (FRAMELESS, "leaf_added"),
    "leaf_added": (ENTRY, "outer_func"),
    "outer_func": (Rule(RSP, 8, None, None), "gap_start"),
    "expr_func": (ENTRY, "expr_body"),
    "escape_func": (ENTRY, "escape_def_cfa_sf"),
    "escape_def_cfa_sf": (FRAMELESS, "escape_offset_sf"),
    "escape_offset_sf": (Rule(RSP, 32, -16, -8), "escape_rbp_in_rbx"),
    "escape_rbp_in_rbx": (Rule(RSP, 32, RBP_LOST, -8), "escape_cfa_rbx"),
    "ra_reg_func": (ENTRY, "ra_reg_body"),
}


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_toolchain()
    return build_library(tmp_path_factory.mktemp("unwind_cfi"), "libcfi")


@pytest.fixture(scope="module")
def labels(library: Path) -> dict[str, int]:
    return symbol_addresses(library)


@pytest.fixture(scope="module")
def table(library: Path) -> UnwindTable:
    return read_unwind_table(library)


@pytest.mark.parametrize("label", sorted(RULES_BETWEEN_LABELS))
def test_rule_holds_from_each_label_to_the_next(table: UnwindTable, labels: dict[str, int], label: str) -> None:
    """Each CFI directive's row applies at its label and at every byte up to the next directive's."""
    rule, next_label = RULES_BETWEEN_LABELS[label]
    assert labels[label] < labels[next_label]
    for address in range(labels[label], labels[next_label]):
        assert table.lookup(address) == rule, f"{label}+{address - labels[label]:#x}"


def test_frame_pointer_rule_is_recognised(table: UnwindTable, labels: dict[str, int]) -> None:
    """Only the rbp+16 rule with rbp at CFA-16 counts as frame-pointer based."""
    framed = table.lookup(labels["fp_framed"])
    assert framed is not None and framed.frame_pointer_based
    for label in ("fp_func", "fp_pushed", "fp_early_leave", "fp_popped", "leaf_subbed", "outer_func"):
        rule = table.lookup(labels[label])
        assert rule is not None and not rule.frame_pointer_based, label


def test_remember_and_restore_state_bracket_the_early_epilogue(table: UnwindTable, labels: dict[str, int]) -> None:
    """After `leave` the CFA is rsp+8 with rbp restored; `.cfi_restore_state` brings the rbp frame back."""
    assert table.lookup(labels["fp_early_leave"]) == ENTRY
    assert table.lookup(labels["fp_early_leave"] - 1) == FRAME_POINTER
    assert table.lookup(labels["fp_after_early"]) == FRAME_POINTER


def test_gnu_args_size_is_ignored(table: UnwindTable, labels: dict[str, int]) -> None:
    """DW_CFA_GNU_args_size neither stops the interpreter nor changes the rule (the FDE goes on after it)."""
    assert table.lookup(labels["leaf_args_size"]) == FRAMELESS
    assert table.lookup(labels["leaf_added"]) == ENTRY


def test_undefined_return_address_marks_the_outermost_frame(table: UnwindTable, labels: dict[str, int]) -> None:
    """`.cfi_undefined rip` leaves the rule without a return address."""
    rule = table.lookup(labels["outer_ret"])
    assert rule is not None and rule.ra is None


@pytest.mark.parametrize("label", ["expr_body", "escape_cfa_rbx"])
def test_cfa_not_based_on_rsp_or_rbp_is_unsupported(table: UnwindTable, labels: dict[str, int], label: str) -> None:
    """A CFA expression, or a CFA based on another register, is CFA_UNSUPPORTED."""
    rule = table.lookup(labels[label])
    assert rule is not None and rule.cfa_reg == CFA_UNSUPPORTED


def test_function_starting_where_another_ends_wins(table: UnwindTable, labels: dict[str, int]) -> None:
    """leaf_func starts where fp_noreturn's FDE ends: its entry rule, not the end marker, applies there."""
    assert table.lookup(labels["leaf_func"] - 1) == FRAME_POINTER
    assert table.lookup(labels["leaf_func"]) == ENTRY


@pytest.mark.parametrize("label", ["text_start", "gap_start", "text_end"])
def test_addresses_outside_every_fde_have_no_rule(table: UnwindTable, labels: dict[str, int], label: str) -> None:
    """Before the first FDE, in the gap between two FDEs and after the last, lookup finds nothing."""
    assert table.lookup(labels[label]) is None
    if label == "gap_start":
        assert table.lookup(labels["expr_func"] - 1) is None
        assert table.lookup(labels["outer_ret"]) is not None  # the byte before the gap is still covered


def test_addresses_below_the_table_have_no_rule(table: UnwindTable) -> None:
    """Address 0 and anything below the first row find no rule (no wrap-around to the last row)."""
    assert table.lookup(0) is None
    assert table.lookup(0xFFF) is None


def test_fde_counts(table: UnwindTable) -> None:
    """Every FDE is counted, and those with an rbp-based CFA separately."""
    assert table.fde_count == len(FDE_FUNCTIONS)
    assert table.frame_pointer_fdes == len(FRAME_POINTER_FUNCTIONS)


def test_segments_include_the_executable_load(table: UnwindTable, labels: dict[str, int]) -> None:
    """The table keeps the PT_LOAD headers; the executable one holds the code."""
    executable = [s for s in table.segments if s.executable]
    assert len(executable) == 1
    assert executable[0].vaddr <= labels["fp_func"] < executable[0].vaddr + executable[0].memsz


def test_table_from_bytes_matches_table_from_file(library: Path, table: UnwindTable, labels: dict[str, int]) -> None:
    """`read_unwind_table_bytes` (the vDSO path) reads the same rules as `read_unwind_table`."""
    from_bytes = read_unwind_table_bytes(library.read_bytes(), "libcfi")
    assert len(from_bytes) == len(table)
    for address in labels.values():
        assert from_bytes.lookup(address) == table.lookup(address)


def test_non_elf_file_raises_cfi_error(tmp_path: Path) -> None:
    """A file that is not ELF is a CfiError, not a pyelftools exception."""
    path = tmp_path / "not_elf.so"
    path.write_bytes(b"#!/bin/sh\necho not an ELF file\n" * 8)
    with pytest.raises(CfiError):
        read_unwind_table(path)


def test_missing_file_raises_cfi_error(tmp_path: Path) -> None:
    """A file that went away is a CfiError."""
    with pytest.raises(CfiError):
        read_unwind_table(tmp_path / "gone.so")


def test_garbage_image_raises_cfi_error() -> None:
    """An in-memory image that is not ELF is a CfiError."""
    with pytest.raises(CfiError):
        read_unwind_table_bytes(b"\x7fELF" + b"\xff" * 60, "[vdso]")


def test_debug_frame_is_read_when_eh_frame_is_empty(tmp_path: Path) -> None:
    """A library whose CFI is only in .debug_frame (ld adds an empty .eh_frame) gets the same rules."""
    require_toolchain()
    library = build_library(tmp_path, "libdebugframe", debug_frame=True)
    with open(library, "rb") as f:
        eh_frame = ELFFile(f).get_section_by_name(".eh_frame")
        assert eh_frame is None or eh_frame.data_size == 0
    table = read_unwind_table(library)
    assert table.fde_count == len(FDE_FUNCTIONS)
    assert table.lookup(symbol_addresses(library)["fp_framed"]) == FRAME_POINTER


def test_binary_without_cfi_raises_cfi_error(tmp_path: Path) -> None:
    """A shared object with no CFI at all (only an empty .eh_frame from the linker) is a CfiError."""
    require_toolchain()
    source = tmp_path / "nocfi.S"
    source.write_text('\t.text\nf:\n\tnop\n\tret\n\t.section .note.GNU-stack,"",@progbits\n')
    library = tmp_path / "libnocfi.so"
    subprocess.run(["gcc", "-shared", "-nostdlib", "-o", str(library), str(source)], check=True)
    with pytest.raises(CfiError):
        read_unwind_table(library)


def test_libc_function_entries_have_the_entry_rule() -> None:
    """At the first instruction of every exported libc function the CFA is rsp+8 with the return address below."""
    if not LIBC.exists():
        pytest.skip(f"{LIBC} is not installed")
    table = read_unwind_table(LIBC)
    with open(LIBC, "rb") as f:
        dynsym = ELFFile(f).get_section_by_name(".dynsym")
        assert isinstance(dynsym, SymbolTableSection)
        starts = {
            s["st_value"]
            for s in dynsym.iter_symbols()
            if s["st_info"]["type"] in ("STT_FUNC", "STT_GNU_IFUNC") and s["st_shndx"] != "SHN_UNDEF"
        }
    assert len(starts) > 1000
    wrong = {hex(address): table.lookup(address) for address in sorted(starts) if table.lookup(address) != ENTRY}
    assert not wrong


def test_plt_stubs_get_the_rule_of_the_linkers_plt_expression(tmp_path: Path) -> None:
    """The .plt's FDE computes its CFA with an expression of rip: rsp + 8 until a stub's push, rsp + 16
    after it. Seen as CFA_UNSUPPORTED: a sample in a stub named its caller's caller instead of its caller."""
    require_toolchain()
    source = tmp_path / "calls_libc.c"
    source.write_text('#include <stdio.h>\n#include <stdlib.h>\nint main(void) { puts("x"); return abs(rand()); }\n')
    binary = tmp_path / "calls_libc"
    subprocess.run(["gcc", "-O1", "-o", str(binary), str(source)], check=True)
    with open(binary, "rb") as f:
        plt = ELFFile(f).get_section_by_name(".plt")
        assert plt is not None, "the linker wrote no .plt"
        start, size = plt["sh_addr"], plt["sh_size"]
    table = read_unwind_table(binary)
    assert size >= 32  # PLT0 and at least one stub
    for stub in range(start + 16, start + size, 16):
        assert table.lookup(stub) == ENTRY  # at the stub's jmp: the return address on top of the stack
        assert table.lookup(stub + 10) == ENTRY
        assert table.lookup(stub + 11) == Rule(RSP, 16, None, -8)  # after its push of the relocation index
        assert table.lookup(stub + 15) == Rule(RSP, 16, None, -8)
