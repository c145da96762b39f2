"""Symbolize stage: full symbols for stripped binaries, from separate debug files and MiniDebugInfo.

This module owns `DebugInfoFinder`. A binary without `.symtab` (Debian's and Fedora's packages keep
only the exported `.dynsym`) is completed from, in gdb's order:

1. `<debug root>/.build-id/xx/rest.debug`, named by the binary's GNU build id; the file's own build id
   must match;
2. `.gnu_debuglink` (file name + CRC32): the binary's directory, its `.debug/` subdirectory and
   `<debug root>/<directory>/`; the file's CRC32 must match;
3. MiniDebugInfo: the `.gnu_debugdata` section, an xz-compressed ELF holding a `.symtab` of the local
   functions (Fedora, RHEL), decompressed with a size cap.

Each candidate path is tried through the process's root (`/proc/PID/root`) first, so a container's
debug files are found in its image, then on the host: the build-id or CRC check makes a host file
safe to use. The first source that yields symbols completes the binary's `.dynsym` with the
functions it does not name (`merge_symbols`). The result is cached by the caller under the binary's
identity, so a debug file installed after a binary was first seen is only noticed once its table
leaves the cache.
"""

from __future__ import annotations

import enum
import logging
import lzma
import os
import posixpath
import stat
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from agent.process.elf import (
    DebugHints,
    ElfReadError,
    ElfSymbols,
    merge_symbols,
    read_build_id,
    read_elf,
    read_elf_bytes,
)
from agent.process.maps import root_path
from agent.symbolize.stats import ErrorReason, SymbolizerStats

logger = logging.getLogger(__name__)

DEFAULT_DEBUG_ROOTS: tuple[Path, ...] = (Path("/usr/lib/debug"),)
# A MiniDebugInfo image is a few hundred KiB; anything far larger is not one (or is an xz bomb).
MAX_MINIDEBUGINFO_BYTES = 64 << 20
_CRC_CHUNK = 1 << 20


class SymbolSource(enum.StrEnum):
    """Where a binary's symbols came from (the keys of `SymbolizerStats.symbol_sources`)."""

    SYMTAB = "symtab"  # the binary's own .symtab
    BUILD_ID = "build_id"
    DEBUGLINK = "debuglink"
    MINIDEBUGINFO = "minidebuginfo"
    DYNSYM = "dynsym"  # nothing better was found: exported symbols only


class DebugInfoFinder:
    def __init__(self, proc_root: Path, debug_roots: Sequence[Path], stats: SymbolizerStats) -> None:
        self._proc_root = proc_root
        self._roots = tuple(debug_roots)
        self._stats = stats

    def complete(self, pid: int, map_path: str, table: ElfSymbols, hints: DebugHints) -> ElfSymbols:
        """`table` of the binary `pid` maps at `map_path`, merged with the first debug symbols found."""
        if hints.has_symtab:
            self._stats.symbol_sources[SymbolSource.SYMTAB] += 1
            return table
        finders: tuple[tuple[SymbolSource, Callable[[], ElfSymbols | None]], ...] = (
            (SymbolSource.BUILD_ID, lambda: self._by_build_id(pid, map_path, table.build_id)),
            (SymbolSource.DEBUGLINK, lambda: self._by_debuglink(pid, map_path, hints.debuglink)),
            (SymbolSource.MINIDEBUGINFO, lambda: self._from_debugdata(map_path, hints.debugdata)),
        )
        for source, find in finders:
            debug = find()
            if debug is not None and len(debug) > 0:
                self._stats.symbol_sources[source] += 1
                logger.debug("%s: %d symbols from %s", map_path, len(debug), source)
                return merge_symbols(table, debug)
        self._stats.symbol_sources[SymbolSource.DYNSYM] += 1
        return table

    def _candidates(self, pid: int, path: str) -> Iterator[Path]:
        """`path` through the process's root, then on the host, when it is a regular file (each file once)."""
        seen: set[tuple[int, int]] = set()
        for candidate in (root_path(self._proc_root, pid, path), Path(path)):
            try:
                st = os.stat(candidate)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                yield candidate

    def _by_build_id(self, pid: int, map_path: str, build_id: str) -> ElfSymbols | None:
        if len(build_id) < 3:
            return None
        relative = f".build-id/{build_id[:2]}/{build_id[2:]}.debug"
        for root in self._roots:
            for candidate in self._candidates(pid, str(root / relative)):
                found = self._read_debug(candidate, map_path, lambda path: _build_id_matches(path, build_id))
                if found is not None:
                    return found
        return None

    def _by_debuglink(self, pid: int, map_path: str, debuglink: tuple[str, int] | None) -> ElfSymbols | None:
        if debuglink is None:
            return None
        name, crc = debuglink
        if not name or "/" in name or name in (".", ".."):
            return None
        directory = posixpath.dirname(map_path)
        paths = [posixpath.join(directory, name), posixpath.join(directory, ".debug", name)]
        paths += [posixpath.join(str(root), directory.lstrip("/"), name) for root in self._roots]
        for path in paths:
            if path == map_path:
                continue  # a debug link naming the binary itself
            for candidate in self._candidates(pid, path):
                found = self._read_debug(candidate, map_path, lambda p: _crc32(p) == crc)
                if found is not None:
                    return found
        return None

    def _read_debug(self, candidate: Path, map_path: str, matches: Callable[[Path], bool]) -> ElfSymbols | None:
        """The symbols of `candidate` when it is the binary's debug file; mismatches and bad files are counted."""
        try:
            if not matches(candidate):
                self._stats.errors[ErrorReason.DEBUG_FILE_MISMATCH] += 1
                logger.debug("%s: %s is not its debug file (build id or CRC differ)", map_path, candidate)
                return None
            return read_elf(candidate, str(candidate))
        except (ElfReadError, OSError) as e:
            self._stats.errors[ErrorReason.DEBUG_FILE_UNUSABLE] += 1
            logger.debug("%s: cannot use debug file %s: %s", map_path, candidate, e)
            return None

    def _from_debugdata(self, map_path: str, data: bytes) -> ElfSymbols | None:
        if not data:
            return None
        try:
            decompressor = lzma.LZMADecompressor()
            image = decompressor.decompress(data, max_length=MAX_MINIDEBUGINFO_BYTES)
            if not decompressor.eof:
                raise ValueError(f"truncated, or larger than {MAX_MINIDEBUGINFO_BYTES} bytes")
            return read_elf_bytes(image, f"{map_path}[.gnu_debugdata]")
        except (lzma.LZMAError, ValueError, ElfReadError) as e:
            self._stats.errors[ErrorReason.MINIDEBUGINFO_UNUSABLE] += 1
            logger.debug("%s: unusable .gnu_debugdata: %s", map_path, e)
            return None


def _build_id_matches(path: Path, build_id: str) -> bool:
    return read_build_id(path, str(path)) == build_id


def _crc32(path: Path) -> int:
    """CRC32 of the whole file, as `.gnu_debuglink` records it (zlib's polynomial and initial value)."""
    crc = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(_CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc
