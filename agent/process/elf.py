"""Process stage (stage-neutral): reading ELF files: function symbols, build ids, load segments, CFI.

This module owns `ElfSymbols`, the compact, immutable symbol table of one ELF file (FUNC symbols of
`.symtab` and `.dynsym`, sorted, with sizes), `DebugHints` (what a binary without `.symtab` says about
where its full symbols are: `.gnu_debuglink`, `.gnu_debugdata`), `merge_symbols` (a binary's own table
completed from its debug file), and `ElfReadError`, the single exception every unreadable, non-ELF or
malformed file turns into. It also opens the sections an unwinder reads (`CfiSections`: `.eh_frame`,
`.eh_frame_hdr` or `.debug_frame`, with the load segments), which the unwind stage interprets; the
symbolize stage reads the symbols. pyelftools parses the headers, sections and notes; the symbol entries
themselves are decoded with `struct.iter_unpack`: building the whole table that way takes about a
seventh of the time pyelftools needs just to iterate its per-symbol objects (measured on gcc's cc1,
29k symbols: 0.07 s against 0.5 s).
"""

from __future__ import annotations

import bisect
import enum
import io
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar

from elftools.elf.constants import P_FLAGS
from elftools.elf.elffile import ELFFile

from agent.errors import AgentError

ELF_MAGIC = b"\x7fELF"
_T = TypeVar("_T")

_STT_FUNC = 2
_STT_GNU_IFUNC = 10
_SHN_UNDEF = 0
_SHN_LORESERVE = 0xFF00  # SHN_ABS, SHN_COMMON, ...: not addresses inside a section
# Preference among symbols sharing one address (aliases): a global name is what callers link against.
_BINDING_RANK = {1: 0, 2: 1, 0: 2}  # STB_GLOBAL, STB_WEAK, STB_LOCAL


class ElfErrorReason(enum.StrEnum):
    UNREADABLE = "unreadable"  # open/read failed (permissions, I/O error, vanished file)
    NOT_ELF = "not_elf"  # no ELF magic: a script, a data file mapped executable, ...
    MALFORMED = "malformed"  # ELF magic but headers or tables pyelftools could not parse


class ElfReadError(AgentError):
    """One file could not be used (symbols, CFI); the stage reading it counts `reason` and goes on."""

    def __init__(self, reason: ElfErrorReason, path: str, detail: str) -> None:
        super().__init__(f"{path}: {reason}: {detail}")
        self.reason = reason
        self.path = path


@dataclass(frozen=True, slots=True)
class LoadSegment:
    """One PT_LOAD program header: which file bytes land at which link-time virtual address."""

    offset: int
    vaddr: int
    filesz: int
    memsz: int
    executable: bool


class _RawSymbol(NamedTuple):
    start: int
    rank: int  # lower is preferred among aliases
    name: str
    size: int
    section_end: int  # end of the containing section's addresses; bounds a size-0 symbol


# eq=False: the arrays are unhashable and two tables are only ever "equal" when they are the same object.
@dataclass(frozen=True, slots=True, eq=False)
class ElfSymbols:
    """Function symbols of one ELF file, by link-time virtual address (the runtime address minus the load bias)."""

    build_id: str  # lowercase hex of NT_GNU_BUILD_ID; "" when the file has none
    elf_type: str  # "ET_EXEC" (non-PIE executable) or "ET_DYN" (PIE executable, shared object)
    segments: tuple[LoadSegment, ...]
    starts: array[int]  # sorted, unique
    ends: array[int]  # exclusive end of each symbol
    names: tuple[str, ...]
    # False for exported symbols only (.dynsym, no .symtab and no debug file found): another file with
    # the same build id (the unstripped binary, one carrying MiniDebugInfo) may name more.
    complete: bool = True

    def lookup(self, vaddr: int) -> str:
        """Name of the function covering `vaddr`, or "" when no symbol covers it."""
        i = bisect.bisect_right(self.starts, vaddr) - 1
        if i >= 0 and vaddr < self.ends[i]:
            return self.names[i]
        return ""

    def segment_for_offset(self, file_offset: int) -> LoadSegment | None:
        return segment_for_offset(self.segments, file_offset)

    def __len__(self) -> int:
        return len(self.names)


def _page_down(value: int, page: int = 4096) -> int:
    return value & ~(page - 1)


def segment_for_offset(segments: Iterable[LoadSegment], file_offset: int) -> LoadSegment | None:
    """The PT_LOAD whose file range holds `file_offset` (a mapping's page-aligned offset), executable first.

    The mapping's offset is the page-aligned start of the segment, so the match starts at the page
    holding `p_offset`, not at `p_offset` itself.
    """
    candidates = [s for s in segments if _page_down(s.offset) <= file_offset < s.offset + max(s.filesz, 1)]
    for segment in candidates:
        if segment.executable:
            return segment
    return candidates[0] if candidates else None


@dataclass(frozen=True, slots=True)
class DebugHints:
    """Where a binary's full symbols may be; read with the table, used once, never cached.

    Only filled in for a binary without `.symtab`: one that has it needs nothing more.
    """

    has_symtab: bool
    debuglink: tuple[str, int] | None = None  # .gnu_debuglink: (file name, CRC32 of the debug file)
    debugdata: bytes = b""  # .gnu_debugdata (MiniDebugInfo): an xz-compressed ELF with a .symtab


def read_elf(path: Path, display_path: str = "") -> ElfSymbols:
    """Parse the ELF file at `path`; raise `ElfReadError` for anything that makes it unusable.

    `display_path` is the name used in errors (the path as the process saw it).
    """
    return _with_elf(path, display_path or str(path), _symbols_of)


def read_elf_with_hints(path: Path, display_path: str = "") -> tuple[ElfSymbols, DebugHints]:
    """`read_elf` plus what the file says about its separate debug symbols."""
    return _with_elf(path, display_path or str(path), lambda elf: (_symbols_of(elf), _hints_of(elf)))


def read_elf_bytes(data: bytes, display_path: str) -> ElfSymbols:
    """`read_elf` of an ELF image held in memory (the decompressed MiniDebugInfo)."""
    return _parse_stream(io.BytesIO(data), display_path, _symbols_of)


def read_build_id(path: Path, display_path: str = "") -> str:
    """Only the build id of the ELF file at `path` ("" when it has none): headers and notes, no symbols."""
    return _with_elf(path, display_path or str(path), _build_id)


@dataclass(frozen=True, slots=True)
class NamedSymbols:
    """The link-time addresses of chosen symbols of any type (data too), with the file's load segments."""

    elf_type: str
    segments: tuple[LoadSegment, ...]
    addresses: dict[str, int]  # name -> st_value, for the wanted names the file defines
    soname: str  # DT_SONAME, "" when there is none


def read_named_symbols(path: Path, names: Iterable[str], display_path: str = "") -> NamedSymbols:
    """Where the file defines each of `names` (`.symtab` preferred over `.dynsym`; version suffixes dropped)."""
    wanted = frozenset(names)
    return _with_elf(path, display_path or str(path), lambda elf: _named_symbols_of(elf, wanted))


class Section(NamedTuple):
    """One section's bytes, and the link-time address they load at."""

    data: bytes
    address: int


@dataclass(frozen=True, slots=True)
class CfiSections:
    """The call frame information of one ELF file, read into memory: the file may be closed afterwards.

    `eh_frame` is set when the file has a non-empty `.eh_frame`, with `eh_frame_hdr` (its sorted search
    table) when present; otherwise `debug_frame` holds the CIEs and FDEs pyelftools parsed from
    `.debug_frame`, if there is one. Neither set means the file has no CFI.
    """

    segments: tuple[LoadSegment, ...]
    little_endian: bool
    address_size: int  # bytes
    eh_frame: Section | None
    eh_frame_hdr: Section | None
    debug_frame: tuple[Any, ...] | None


def read_cfi_sections(path: Path, display_path: str = "") -> CfiSections:
    """The CFI sections of the ELF file at `path`; raise `ElfReadError` when it cannot be read."""
    return _with_elf(path, display_path or str(path), _cfi_sections_of)


def read_cfi_sections_bytes(image: bytes, display_path: str) -> CfiSections:
    """`read_cfi_sections` of an ELF image held in memory (the vDSO)."""
    return _parse_stream(io.BytesIO(image), display_path, _cfi_sections_of)


def _cfi_sections_of(elf: Any) -> CfiSections:
    eh_frame = header = None
    debug_frame = None
    section = elf.get_section_by_name(".eh_frame")
    # GNU ld leaves an empty .eh_frame beside .debug_frame when code was built with -fno-asynchronous-unwind-tables.
    if section is not None and section["sh_size"] > 0 and section["sh_type"] != "SHT_NOBITS":
        eh_frame = Section(section.data(), section["sh_addr"])
        hdr = elf.get_section_by_name(".eh_frame_hdr")
        header = Section(hdr.data(), hdr["sh_addr"]) if hdr is not None else None
    elif elf.get_section_by_name(".debug_frame") is not None:
        debug_frame = tuple(elf.get_dwarf_info(relocate_dwarf_sections=False).CFI_entries())
    segments = tuple(_load_segments(elf))
    return CfiSections(segments, elf.little_endian, elf.elfclass // 8, eh_frame, header, debug_frame)


def _with_elf(path: Path, name: str, parse: Callable[[Any], _T]) -> _T:
    try:
        with open(path, "rb") as stream:
            return _parse_stream(stream, name, parse)
    except OSError as e:
        raise ElfReadError(ElfErrorReason.UNREADABLE, name, str(e)) from e


def _parse_stream(stream: IO[bytes], name: str, parse: Callable[[Any], _T]) -> _T:
    if stream.read(4) != ELF_MAGIC:
        raise ElfReadError(ElfErrorReason.NOT_ELF, name, "no ELF magic")
    stream.seek(0)
    try:
        return parse(ELFFile(stream))
    except OSError:
        raise
    except Exception as e:
        # pyelftools signals truncated or crafted files with many unrelated types (ELFError,
        # struct.error, ValueError, IndexError, construct errors); here they all mean "malformed".
        raise ElfReadError(ElfErrorReason.MALFORMED, name, f"{type(e).__name__}: {e}") from e


def _hints_of(elf: Any) -> DebugHints:
    if any(True for _ in elf.iter_sections("SHT_SYMTAB")):
        return DebugHints(has_symtab=True)
    debuglink = None
    section = elf.get_section_by_name(".gnu_debuglink")
    if section is not None and section["sh_type"] != "SHT_NOBITS":
        data = section.data()
        end = data.find(b"\0")
        crc_at = (end + 4) & ~3  # the name, its NUL, padding to 4 bytes, then the CRC
        if end > 0 and len(data) >= crc_at + 4:
            crc = int.from_bytes(data[crc_at : crc_at + 4], "little" if elf.little_endian else "big")
            debuglink = (data[:end].decode("utf-8", "surrogateescape"), crc)
    section = elf.get_section_by_name(".gnu_debugdata")
    debugdata = section.data() if section is not None and section["sh_type"] != "SHT_NOBITS" else b""
    return DebugHints(False, debuglink, debugdata)


def merge_symbols(base: ElfSymbols, debug: ElfSymbols) -> ElfSymbols:
    """`base` (the mapped binary's own table) completed with `debug` (its debug file's symbols).

    The debug file adds the functions the binary does not name (static and hidden ones). At an address
    both name, the binary's exported name stays: it is what callers link against, and a function keeps
    its name whether or not a debug package is installed (a `.symtab` often names it by an internal
    alias or a versioned `name@@GLIBC_2.2.5`). Version suffixes are dropped from the debug names. The
    build id, type and segments (the load bias) stay the binary's: a debug file shares its addresses.
    """
    entries = {
        start: (end, _unversioned(name)) for start, end, name in zip(debug.starts, debug.ends, debug.names, strict=True)
    }
    entries.update((start, (end, name)) for start, end, name in zip(base.starts, base.ends, base.names, strict=True))
    starts = sorted(entries)
    ends = array("Q", (entries[s][0] for s in starts))
    names = tuple(entries[s][1] for s in starts)
    return ElfSymbols(base.build_id, base.elf_type, base.segments, array("Q", starts), ends, names, True)


def _unversioned(name: str) -> str:
    at = name.find("@")
    return name[:at] if at > 0 else name


def _symbols_of(elf: Any) -> ElfSymbols:
    build_id = _build_id(elf)
    segments = tuple(_load_segments(elf))
    starts, ends, names = _build_table(_function_symbols(elf))
    complete = any(True for _ in elf.iter_sections("SHT_SYMTAB"))
    return ElfSymbols(build_id, str(elf.header["e_type"]), segments, starts, ends, names, complete)


def _build_id(elf: Any) -> str:
    section = elf.get_section_by_name(".note.gnu.build-id")
    notes: Iterator[Any]
    if section is not None and hasattr(section, "iter_notes"):
        notes = section.iter_notes()
    else:
        # Section headers may be stripped or renamed; the PT_NOTE segments still carry the note.
        notes = (note for seg in elf.iter_segments() if seg["p_type"] == "PT_NOTE" for note in seg.iter_notes())
    for note in notes:
        if note["n_type"] == "NT_GNU_BUILD_ID":
            return str(note["n_desc"]).lower()
    return ""


def _load_segments(elf: Any) -> Iterator[LoadSegment]:
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_LOAD":
            yield LoadSegment(
                offset=seg["p_offset"],
                vaddr=seg["p_vaddr"],
                filesz=seg["p_filesz"],
                memsz=seg["p_memsz"],
                executable=bool(seg["p_flags"] & P_FLAGS.PF_X),
            )


def _function_symbols(elf: Any) -> list[_RawSymbol]:
    """FUNC/IFUNC symbols defined in a section, from `.symtab` (rank first) and `.dynsym`."""
    section_ends = [sec["sh_addr"] + sec["sh_size"] for sec in elf.iter_sections()]
    symbols: list[_RawSymbol] = []
    for table_rank, sh_type in enumerate(("SHT_SYMTAB", "SHT_DYNSYM")):
        for section in elf.iter_sections(sh_type):
            strtab = elf.get_section(section["sh_link"]).data()
            for st_name, st_info, shndx, value, size in _iter_raw(elf, section.data()):
                if (st_info & 0xF) not in (_STT_FUNC, _STT_GNU_IFUNC):
                    continue
                if shndx == _SHN_UNDEF or shndx >= _SHN_LORESERVE or value == 0:
                    continue
                rank = table_rank * 4 + _BINDING_RANK.get(st_info >> 4, 3)
                sec_end = section_ends[shndx] if shndx < len(section_ends) else 0
                symbols.append(_RawSymbol(value, rank, _c_string(strtab, st_name), size, sec_end))
    return symbols


def _iter_raw(elf: Any, data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(st_name, st_info, st_shndx, st_value, st_size) of each entry of a symbol table section."""
    order = "<" if elf.little_endian else ">"
    if elf.elfclass == 64:
        fmt = struct.Struct(order + "IBBHQQ")
        usable = len(data) - len(data) % fmt.size
        for st_name, st_info, _other, shndx, value, size in fmt.iter_unpack(data[:usable]):
            yield st_name, st_info, shndx, value, size
    else:
        fmt = struct.Struct(order + "IIIBBH")
        usable = len(data) - len(data) % fmt.size
        for st_name, value, size, st_info, _other, shndx in fmt.iter_unpack(data[:usable]):
            yield st_name, st_info, shndx, value, size


def _c_string(table: bytes, offset: int) -> str:
    end = table.find(b"\0", offset)
    raw = table[offset:] if end < 0 else table[offset:end]
    # Names end up in protobuf strings, which must be valid UTF-8.
    return raw.decode("utf-8", "replace")


def _build_table(symbols: list[_RawSymbol]) -> tuple[array[int], array[int], tuple[str, ...]]:
    """Sort, keep the preferred alias per address, and give each symbol its end.

    A sized symbol ends at start + size. A symbol of size 0 (hand-written assembly, some crt code) covers
    up to the next symbol, bounded by the end of its section.
    """
    symbols.sort(key=lambda s: (s.start, s.rank))
    unique: list[_RawSymbol] = []
    for sym in symbols:
        if not unique or unique[-1].start != sym.start:
            unique.append(sym)
    starts = array("Q", (s.start for s in unique))
    ends = array("Q")
    for i, sym in enumerate(unique):
        if sym.size > 0:
            ends.append(sym.start + sym.size)
            continue
        end = unique[i + 1].start if i + 1 < len(unique) else 0
        if sym.section_end > sym.start:
            end = min(end, sym.section_end) if end else sym.section_end
        ends.append(end if end > sym.start else sym.start + 1)
    return starts, ends, tuple(s.name for s in unique)


def _named_symbols_of(elf: Any, wanted: frozenset[str]) -> NamedSymbols:
    found: dict[str, int] = {}
    for sh_type in ("SHT_SYMTAB", "SHT_DYNSYM"):
        for section in elf.iter_sections(sh_type):
            strtab = elf.get_section(section["sh_link"]).data()
            for st_name, _info, shndx, value, _size in _iter_raw(elf, section.data()):
                if shndx == _SHN_UNDEF or shndx >= _SHN_LORESERVE or value == 0:
                    continue
                name = _unversioned(_c_string(strtab, st_name))
                if name in wanted and name not in found:
                    found[name] = value
    return NamedSymbols(str(elf.header["e_type"]), tuple(_load_segments(elf)), found, _soname(elf))


def _soname(elf: Any) -> str:
    for section in elf.iter_sections("SHT_DYNAMIC"):
        for tag in section.iter_tags():
            if tag.entry.d_tag == "DT_SONAME":
                return str(tag.soname)
    return ""
