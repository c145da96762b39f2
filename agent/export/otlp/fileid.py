"""Export stage, OTLP sink: `process.executable.build_id.htlhash` of mapped files, cached.

The htlhash (OTel semantic conventions, "profiles/mappings"; the opentelemetry-ebpf-profiler's
FileID) identifies an executable file without reading it whole:
hex(SHA256(first 4096 bytes || last 4096 bytes || big-endian uint64 file length))[:32]. The two
pages may overlap for small files and are never padded.

A mapping's path is as the process sees it, so the file is opened through /proc/PID/root while the
process is alive (containers see other files than the host) and through the host path otherwise.
Results are cached by the opened path plus its stat identity (device, inode, size, mtime), so a
replaced file is hashed again. A file that cannot be read gets no htlhash; that is counted, logged at
debug level, and the mapping keeps its other attributes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections import OrderedDict

from agent.export.otlp.stats import HTLHASH_UNREADABLE, Counters

logger = logging.getLogger(__name__)

PAGE = 4096
HTLHASH_HEX_CHARS = 32


def htlhash_of_file(path: str) -> str:
    """The htlhash of the file at `path`; raises OSError when it cannot be read."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read(PAGE))
        size = f.seek(0, os.SEEK_END)
        f.seek(size - min(size, PAGE))
        digest.update(f.read(PAGE))
        digest.update(struct.pack(">Q", size))
    return digest.hexdigest()[:HTLHASH_HEX_CHARS]


class FileIdCache:
    """Computes htlhashes for (pid, path) pairs, remembering them by file identity (LRU-bounded)."""

    def __init__(self, counters: Counters, proc_root: str = "/proc", capacity: int = 4096) -> None:
        self._counters = counters
        self._proc_root = proc_root
        self._capacity = capacity
        self._cache: OrderedDict[tuple[str, int, int, int, int], str] = OrderedDict()

    def htlhash(self, pid: int, path: str) -> str | None:
        """The file's htlhash, or None for pseudo paths ("[vdso]", "") and unreadable files."""
        if not path.startswith("/"):
            return None
        opened = self._resolve(pid, path)
        try:
            st = os.stat(opened)
            key = (opened, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
            value = htlhash_of_file(opened)
        except OSError as e:
            self._counters.inc(HTLHASH_UNREADABLE)
            logger.debug("no htlhash for %s (pid %d): %s", opened, pid, e)
            return None
        self._cache[key] = value
        if len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return value

    def _resolve(self, pid: int, path: str) -> str:
        # A live process's files are reached through its root, which differs from the host's in a container.
        proc_dir = os.path.join(self._proc_root, str(pid))
        if pid > 0 and os.path.isdir(proc_dir):
            return proc_dir + "/root" + path
        return path
