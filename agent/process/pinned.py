"""Process stage (stage-neutral): open descriptors that keep deleted mapped files reachable.

A file unlinked while processes map it (every package upgrade does this to running daemons) is
reachable by path through nothing but /proc/PID/map_files, and only while a process maps it; the
symbolizer and the unwinder read it later, at the end of an interval, by when a short-lived process
has gone. So the registry pins each deleted file it finds in a snapshot: one descriptor per file
identity, opened through map_files while the process lives, and `path_of` returns /proc/self/fd/N for
it afterwards. At most `PINNED_FILES` are held (the least recently pinned is closed first), so a host
full of deleted binaries costs a bounded number of descriptors.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

logger = logging.getLogger(__name__)

PINNED_FILES = 64  # descriptors held for deleted files, over every process

# (st_dev, st_ino, st_mtime_ns): `agent.process.maps.FileIdentity`, a NamedTuple of these (not imported:
# that module looks here).
Identity = tuple[int, int, int]


class PinnedFiles:
    """Descriptors of deleted files by identity, bounded; safe to use from several threads."""

    def __init__(self, capacity: int = PINNED_FILES) -> None:
        self._capacity = capacity
        self._fds: OrderedDict[Identity, int] = OrderedDict()
        self._lock = threading.Lock()

    def pin(self, identity: Identity, path: Path) -> bool:
        """Hold the file at `path` open if it is still `identity`; whether it is pinned now."""
        with self._lock:
            if identity in self._fds:
                self._fds.move_to_end(identity)
                return True
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            logger.debug("cannot pin deleted file %s: %s", path, e)
            return False
        st = os.fstat(fd)
        # Another file by now: the mapping went since the snapshot, and its link with it.
        if (st.st_dev, st.st_ino, st.st_mtime_ns) != tuple(identity):
            os.close(fd)
            return False
        with self._lock:
            if identity in self._fds:  # another thread pinned it meanwhile
                os.close(fd)
                return True
            self._fds[identity] = fd
            while len(self._fds) > self._capacity:
                _, oldest = self._fds.popitem(last=False)
                os.close(oldest)
        return True

    def path_of(self, identity: Identity) -> Path | None:
        """A path that opens the pinned file, or None."""
        with self._lock:
            fd = self._fds.get(identity)
        return Path(f"/proc/self/fd/{fd}") if fd is not None else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._fds)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), OrderedDict()
        for fd in fds:
            os.close(fd)


# One table for the agent: the registry pins, and `agent.process.maps.resolve_file` (the symbolizer's,
# the unwinder's and the Python discovery's way to a mapped file) looks here last.
PINNED = PinnedFiles()
