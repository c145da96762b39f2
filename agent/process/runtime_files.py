"""Process stage (stage-neutral): a language runtime's ELF file in a process, opened and its symbols read.

The interpreter and VM readers (agent/process/python, agent/process/jvm) find their runtime among a
process's mappings, open the very file mapped (`open_mapped_file`: through /proc/PID/root, so a
container's files resolve in its own mount namespace, else /proc/PID/map_files for a deleted or replaced
file) and look up a few symbols in it, through a `SymbolCache` keyed by the file's identity.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.process.cache import LruCache
from agent.process.elf import ElfReadError, NamedSymbols, read_named_symbols
from agent.process.maps import FileIdentity, MapEntry, map_files_path, resolve_file

SYMBOL_CACHE_FILES = 64  # ELF files whose looked-up symbols are kept (interpreters and C libraries)


class SymbolCache:
    """The named symbols (or the parse error) of ELF files by (identity, names), at most `capacity` files.
    Used from one thread (the inspector's): parsing a runtime's and the C library's symbol tables is most
    of an inspection, and every process of one runtime, and every retry of one process, maps the same
    files."""

    def __init__(self, capacity: int = SYMBOL_CACHE_FILES) -> None:
        self._entries: LruCache[tuple[FileIdentity, tuple[str, ...]], NamedSymbols | ElfReadError] = LruCache(capacity)
        self.hits = self.misses = 0

    def read(self, path: Path, names: tuple[str, ...], display_path: str) -> NamedSymbols:
        """`read_named_symbols(path, names)`, parsed once per file identity; raises its ElfReadError."""
        try:
            key = (FileIdentity.of(os.stat(path)), names)
        except OSError:
            return read_named_symbols(path, names, display_path)  # read_named_symbols says why, if it fails
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            try:
                entry = read_named_symbols(path, names, display_path)
            except ElfReadError as e:
                entry = e
            self._entries.put(key, entry)
        else:
            self.hits += 1
        if isinstance(entry, ElfReadError):
            raise entry
        return entry


def read_symbols(cache: SymbolCache | None, path: Path, names: tuple[str, ...], display_path: str) -> NamedSymbols:
    if cache is None:
        return read_named_symbols(path, names, display_path)
    return cache.read(path, names, display_path)


def open_mapped_file(proc_root: Path, pid: int, entry: MapEntry) -> Path | None:
    """A path to the very file `entry` maps: its own namespace's path, else /proc/PID/map_files."""
    path = resolve_file(proc_root, pid, entry)
    if path is not None:
        return path
    link = map_files_path(proc_root, pid, entry)  # an entry captured without an identity
    return link if os.path.exists(link) else None
