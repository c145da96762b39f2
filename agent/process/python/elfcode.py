"""Process stage: code and pointers read from an ELF file by link-time address, for the x86 decoders.

This module owns `ElfCode`: one open ELF file's PT_LOAD segments (to read a function's bytes at its
link-time address), its symbols by name (`.dynsym`, then `.symtab`), and its dynamic relocations (to
say which address the dynamic linker stores in a GOT slot: `R_X86_64_GLOB_DAT` and `R_X86_64_64`
against a defined symbol, `R_X86_64_RELATIVE`). Everything is read from the file, so the answers hold
for any process mapping it; `ElfCodeError` is the one error an unusable file turns into.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from agent.errors import AgentError

_R_X86_64_64 = 1
_R_X86_64_GLOB_DAT = 6
_R_X86_64_RELATIVE = 8
_RELA = struct.Struct("<QQq")
_PT_LOAD = "PT_LOAD"
_PARSE_ERRORS = (ELFError, ValueError, struct.error, KeyError, AttributeError, OSError)


class ElfCodeError(AgentError):
    """The file could not be opened or parsed, or does not hold the asked address."""


class ElfCode:
    """Link-time views of one open ELF file: `with ElfCode.open(path) as elf: ...`. Lookups are lazy (a
    libpython's full symbol and relocation tables take a second or two to build; one lookup, milliseconds)."""

    def __init__(self, stream: BinaryIO, path: Path) -> None:
        self._stream = stream
        self._path = path
        try:
            self._elf = ELFFile(stream)
            if self._elf["e_machine"] != "EM_X86_64":
                raise ElfCodeError(f"{path}: not an x86-64 file ({self._elf['e_machine']})")
            self._segments = [
                (seg["p_vaddr"], seg["p_offset"], seg["p_filesz"])
                for seg in self._elf.iter_segments()
                if seg["p_type"] == _PT_LOAD and seg["p_flags"] & 1  # PF_X: code only
            ]
        except _PARSE_ERRORS as e:
            raise ElfCodeError(f"{path}: {e}") from e

    @classmethod
    def open(cls, path: Path) -> ElfCode:
        try:
            stream = open(path, "rb")  # noqa: SIM115 - closed by close() / the context manager
        except OSError as e:
            raise ElfCodeError(f"{path}: {e.strerror or e}") from e
        try:
            return cls(stream, path)
        except ElfCodeError:
            stream.close()
            raise

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> ElfCode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def symbol(self, name: str) -> int | None:
        """A defined dynamic symbol's link-time address (through the GNU hash table when there is one)."""
        try:
            for section_name in (".gnu.hash", ".hash", ".dynsym"):
                section = self._elf.get_section_by_name(section_name)
                if section is None:
                    continue
                sym = section.get_symbol(name) if section_name != ".dynsym" else _by_name(section, name)
                if sym is not None and sym["st_shndx"] != "SHN_UNDEF" and sym["st_value"]:
                    return int(sym["st_value"])
                return None
        except _PARSE_ERRORS as e:
            raise ElfCodeError(f"{self._path}: {e}") from e
        return None

    def code(self, vaddr: int, size: int) -> bytes:
        """Up to `size` bytes of code at `vaddr` (fewer at a segment's end); ElfCodeError if none."""
        for start, offset, filesz in self._segments:
            if start <= vaddr < start + filesz:
                try:
                    self._stream.seek(offset + vaddr - start)
                    return self._stream.read(min(size, start + filesz - vaddr))
                except OSError as e:
                    raise ElfCodeError(f"{self._path}: {e}") from e
        raise ElfCodeError(f"{self._path}: no code at {vaddr:#x}")

    def pointer(self, vaddr: int) -> int | None:
        """The link-time address the dynamic linker stores at `vaddr` (a GOT slot), when a relocation says:
        `R_X86_64_RELATIVE`, or `R_X86_64_GLOB_DAT`/`R_X86_64_64` against a symbol the file defines."""
        try:
            return self._pointer(vaddr)
        except _PARSE_ERRORS as e:
            raise ElfCodeError(f"{self._path}: {e}") from e

    def _pointer(self, vaddr: int) -> int | None:
        for section in self._elf.iter_sections():
            if section["sh_type"] != "SHT_RELA" or not section.name.startswith(".rela.dyn"):
                continue
            data = section.data()
            for offset, info, addend in _RELA.iter_unpack(data[: len(data) - len(data) % _RELA.size]):
                if offset != vaddr:
                    continue
                kind, index = info & 0xFFFFFFFF, info >> 32
                if kind == _R_X86_64_RELATIVE:
                    return int(addend)
                if kind in (_R_X86_64_GLOB_DAT, _R_X86_64_64) and index and section["sh_link"]:
                    sym = self._elf.get_section(section["sh_link"]).get_symbol(index)
                    if sym["st_shndx"] != "SHN_UNDEF":
                        return int(sym["st_value"]) + (int(addend) if kind == _R_X86_64_64 else 0)
                return None
        return None


def _by_name(section: Any, name: str) -> Any:
    found = section.get_symbol_by_name(name)
    return found[0] if found else None
