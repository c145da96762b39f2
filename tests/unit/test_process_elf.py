"""Tests of the process stage's ELF reader (`agent.process.elf`) against binutils' view."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.process.elf import (
    ElfErrorReason,
    ElfReadError,
    read_build_id,
    read_cfi_sections,
    read_cfi_sections_bytes,
    read_elf,
)
from tests.support.fixture_types import LoadRow, NmFunctions

WORKLOAD_FUNCTIONS = ("leaf_a", "middle_b", "outer_c", "main", "zero_size_fn")


def _readelf_build_id(path: Path) -> str:
    notes = subprocess.run(["readelf", "-n", str(path)], check=True, capture_output=True, text=True).stdout
    match = re.search(r"Build ID: ([0-9a-f]+)", notes)
    assert match is not None, notes
    return match.group(1)


@pytest.mark.parametrize("kind", ["pie", "nopie", "stripped_lib"])
def test_every_nm_function_resolves_at_its_first_and_last_byte(
    kind: str, symbolize_binaries: dict[str, Path], nm_functions: NmFunctions
) -> None:
    path = symbolize_binaries[kind]
    table = read_elf(path)
    truth = nm_functions(path)
    assert set(WORKLOAD_FUNCTIONS) <= set(truth)
    names_at: dict[int, set[str]] = {}
    for name, (address, _size) in truth.items():
        names_at.setdefault(address, set()).add(name)
    for name, (address, size) in truth.items():
        assert table.lookup(address) in names_at[address], name
        if size > 0:
            assert table.lookup(address + size - 1) in names_at[address], name
    for name in WORKLOAD_FUNCTIONS:
        assert table.lookup(truth[name][0]) == name


def test_stripped_library_has_only_dynsym_and_still_names_exports(
    symbolize_binaries: dict[str, Path], nm_functions: NmFunctions
) -> None:
    path = symbolize_binaries["stripped_lib"]
    sections = subprocess.run(["readelf", "-SW", str(path)], check=True, capture_output=True, text=True).stdout
    assert ".symtab" not in sections and ".dynsym" in sections
    table = read_elf(path)
    assert sorted(table.names) == sorted(nm_functions(path))


def test_sized_symbol_does_not_cover_bytes_past_its_end(
    symbolize_binaries: dict[str, Path], nm_functions: NmFunctions
) -> None:
    path = symbolize_binaries["nopie"]
    truth = nm_functions(path)
    table = read_elf(path)
    starts = sorted(address for address, _ in truth.values())
    # Alignment padding between a sized function's end and the next symbol belongs to no function.
    gaps = [
        (name, address + size)
        for name, (address, size) in truth.items()
        if size > 0 and any(s > address + size for s in starts) and address + size not in starts
    ]
    assert gaps, "the workload should have at least one padded function end"
    for name, past_end in gaps:
        assert table.lookup(past_end) == "", name


def test_zero_size_symbol_covers_up_to_the_next_symbol(
    symbolize_binaries: dict[str, Path], nm_functions: NmFunctions
) -> None:
    path = symbolize_binaries["pie"]
    truth = nm_functions(path)
    start, size = truth["zero_size_fn"]
    assert size == 0
    next_start = min(a for a, _ in truth.values() if a > start)
    table = read_elf(path)
    assert [table.lookup(a) for a in range(start, next_start)] == ["zero_size_fn"] * (next_start - start)
    assert table.lookup(next_start) != "zero_size_fn"


@pytest.mark.parametrize(("kind", "elf_type"), [("pie", "ET_DYN"), ("nopie", "ET_EXEC"), ("stripped_lib", "ET_DYN")])
def test_build_id_type_and_load_segments_match_readelf(
    kind: str, elf_type: str, symbolize_binaries: dict[str, Path], readelf_loads: Callable[[Path], list[LoadRow]]
) -> None:
    path = symbolize_binaries[kind]
    table = read_elf(path)
    assert table.elf_type == elf_type
    assert table.build_id == _readelf_build_id(path) == read_build_id(path)
    rows = readelf_loads(path)
    got = [(s.offset, s.vaddr, s.filesz, s.memsz, s.executable) for s in table.segments]
    assert got == [(o, v, f, m, "E" in flags) for o, v, f, m, flags in rows]


def test_segment_for_offset_picks_the_executable_segment(
    symbolize_binaries: dict[str, Path], readelf_loads: Callable[[Path], list[LoadRow]]
) -> None:
    path = symbolize_binaries["pie"]
    exec_offset, exec_vaddr, *_ = next(row for row in readelf_loads(path) if "E" in row[4])
    segment = read_elf(path).segment_for_offset(exec_offset & ~0xFFF)
    assert segment is not None and segment.executable
    assert (segment.offset, segment.vaddr) == (exec_offset, exec_vaddr)
    assert read_elf(path).segment_for_offset(1 << 40) is None


def test_not_elf_file_raises_not_elf(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"#!/bin/sh\necho not an ELF\n" * 10)
    with pytest.raises(ElfReadError) as info:
        read_elf(garbage, "/usr/bin/garbage")
    assert info.value.reason is ElfErrorReason.NOT_ELF
    assert info.value.path == "/usr/bin/garbage"


def test_truncated_elf_raises_malformed(tmp_path: Path, symbolize_binaries: dict[str, Path]) -> None:
    truncated = tmp_path / "truncated"
    truncated.write_bytes(symbolize_binaries["pie"].read_bytes()[:100])
    with pytest.raises(ElfReadError) as info:
        read_elf(truncated)
    assert info.value.reason is ElfErrorReason.MALFORMED


def test_elf_with_garbage_section_table_raises_malformed(tmp_path: Path, symbolize_binaries: dict[str, Path]) -> None:
    data = bytearray(symbolize_binaries["pie"].read_bytes())
    data[0x28:0x30] = (len(data) + 12345).to_bytes(8, "little")  # e_shoff far past the end of the file
    broken = tmp_path / "broken"
    broken.write_bytes(bytes(data))
    with pytest.raises(ElfReadError) as info:
        read_elf(broken)
    assert info.value.reason is ElfErrorReason.MALFORMED


def test_missing_file_raises_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ElfReadError) as info:
        read_elf(tmp_path / "does-not-exist")
    assert info.value.reason is ElfErrorReason.UNREADABLE


def _readelf_section(path: Path, name: str) -> tuple[int, int] | None:
    """(address, size) of the section `name`, as readelf reports it."""
    out = subprocess.run(["readelf", "-SW", str(path)], check=True, capture_output=True, text=True).stdout
    match = re.search(rf"\]\s+{re.escape(name)}\s+\S+\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)", out)
    return (int(match.group(1), 16), int(match.group(2), 16)) if match else None


@pytest.mark.parametrize("kind", ["pie", "nopie", "stripped_lib"])
def test_cfi_sections_are_the_files_eh_frame_and_its_header(kind: str, symbolize_binaries: dict[str, Path]) -> None:
    path = symbolize_binaries[kind]
    sections = read_cfi_sections(path)
    eh_frame, header = _readelf_section(path, ".eh_frame"), _readelf_section(path, ".eh_frame_hdr")
    assert eh_frame is not None and header is not None
    assert sections.eh_frame is not None and sections.eh_frame_hdr is not None
    assert (sections.eh_frame.address, len(sections.eh_frame.data)) == eh_frame
    assert (sections.eh_frame_hdr.address, len(sections.eh_frame_hdr.data)) == header
    assert sections.debug_frame is None  # only read when there is no usable .eh_frame
    assert sections.segments == read_elf(path).segments
    assert (sections.little_endian, sections.address_size) == (True, 8)
    assert read_cfi_sections_bytes(path.read_bytes(), "in memory") == sections


def test_cfi_sections_of_a_bad_file_are_an_elf_read_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not an ELF file at all" * 4)
    with pytest.raises(ElfReadError) as info:
        read_cfi_sections(garbage)
    assert info.value.reason is ElfErrorReason.NOT_ELF
    with pytest.raises(ElfReadError) as info:
        read_cfi_sections(tmp_path / "gone")
    assert info.value.reason is ElfErrorReason.UNREADABLE
