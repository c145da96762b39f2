"""Export stage, OTLP sink: the durable FIFO of encoded requests waiting for delivery.

Every request is written to `spool_dir` before `append()` returns (temp file, fsync, rename, so a
crash never leaves half a file under a final name) and deleted only after delivery, or after the
receiver refused it for good. File names carry a 20-digit sequence number, so the order survives
restarts; at start-up the existing files are taken back in that order and sent first. One spool
directory belongs to one agent.

Bounds: the files together stay under `max_bytes` (the oldest are dropped first and counted); the
payloads of at most `memory_items` entries are also kept in memory, the rest are read back from
disk when their turn comes. A write that finds the disk full drops the oldest spooled files until
the new one fits (counted as dropped, `disk_full`) and is tried once more: the newest data matters
most. If the disk still cannot be written, entries stay in memory only, and then the memory bound
drops the oldest of them (counted). Each file is `MAGIC`, a CRC-32 and the length,
then the payload; a file that fails those checks is counted, logged and deleted, never fatal.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass

from agent.errors import ConfigError
from agent.export.otlp.stats import DROPPED, SPOOL_ERRORS, Counters

logger = logging.getLogger(__name__)

MAGIC = b"OTLPSPL1"
HEADER = struct.Struct(">8sIQ")  # magic, crc32 of the payload, payload length
_ENOSPC_MARGIN = 64 * 1024  # free bytes beyond the file's own, for the file system's blocks
_NAME = re.compile(r"^(\d{20})\.otlp$")


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    seq: int
    payload: bytes


@dataclass(slots=True)
class _Slot:
    on_disk: bool  # False when the disk refused the write: the entry lives in memory only
    size: int  # bytes of its file
    payload: bytes | None  # cached payload, or None when only the file holds it


class Spool:
    """Thread-safe: the report thread appends, the sender thread peeks and removes."""

    def __init__(self, directory: str, max_bytes: int, memory_items: int, counters: Counters) -> None:
        self._dir = directory
        self._max_bytes = max_bytes
        self._memory_items = memory_items
        self._counters = counters
        self._lock = threading.Lock()
        self._slots: OrderedDict[int, _Slot] = OrderedDict()
        self._disk_bytes = 0
        self._disk_full = False  # the last write failed with ENOSPC or EDQUOT
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            names = os.listdir(directory)
        except OSError as e:
            raise ConfigError("export.otlp.spool_dir", f"cannot use {directory!r}: {e.strerror or e}") from e
        self._load(names)
        self._next_seq = (next(reversed(self._slots)) + 1) if self._slots else 1

    def append(self, payload: bytes) -> int:
        """Spool one request and return its sequence number."""
        with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            size = self._write(seq, payload)
            if size is None and self._disk_full and self._evict_for(len(payload) + HEADER.size):
                size = self._write(seq, payload)  # once: the newest request matters most
            self._slots[seq] = _Slot(size is not None, size or 0, payload)
            self._disk_bytes += size or 0
            self._enforce_bounds()
            return seq

    def peek(self) -> SpoolEntry | None:
        """The oldest entry, without removing it; unreadable files are dropped on the way."""
        with self._lock:
            while self._slots:
                seq, slot = next(iter(self._slots.items()))
                payload = slot.payload if slot.payload is not None else self._read(seq)
                if payload is not None:
                    return SpoolEntry(seq, payload)
                self._forget(seq, "corrupt")
            return None

    def remove(self, seq: int) -> None:
        """Forget an entry after delivery (or a final refusal); unknown sequence numbers are ignored."""
        with self._lock:
            if seq in self._slots:
                self._forget(seq, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    def close(self) -> tuple[int, int]:
        """At exit: (requests kept on disk for the next start, requests lost). The lost ones lived in
        memory only (the disk refused them); they are counted as dropped, `unsaved_at_exit`."""
        with self._lock:
            unsaved = [seq for seq, slot in self._slots.items() if not slot.on_disk]
            for seq in unsaved:
                self._forget(seq, "unsaved_at_exit")
            return len(self._slots), len(unsaved)

    @property
    def disk_bytes(self) -> int:
        with self._lock:
            return self._disk_bytes

    def _load(self, names: list[str]) -> None:
        for name in sorted(names):
            path = os.path.join(self._dir, name)
            match = _NAME.match(name)
            if match is None:
                if name.endswith(".tmp"):  # a write a crash interrupted: never acknowledged, maybe partial
                    logger.warning("OTLP spool %s: dropping %s, a write the last run did not finish", self._dir, name)
                    self._counters.inc(DROPPED, "interrupted_write")
                    self._unlink(path)
                continue
            try:
                size = os.stat(path).st_size
            except OSError:
                continue
            self._slots[int(match.group(1))] = _Slot(True, size, None)
            self._disk_bytes += size
        if self._slots:
            logger.info(
                "OTLP spool %s: %d requests (%d bytes) left to send", self._dir, len(self._slots), self._disk_bytes
            )
        self._enforce_bounds()

    def _path(self, seq: int) -> str:
        return os.path.join(self._dir, f"{seq:020d}.otlp")

    def _write(self, seq: int, payload: bytes) -> int | None:
        """Write the entry's file and return its size; None when the disk refused it."""
        final = self._path(seq)
        temp = os.path.join(self._dir, f".{seq:020d}.tmp")
        data = HEADER.pack(MAGIC, zlib.crc32(payload), len(payload)) + payload
        try:
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, final)
            _fsync_dir(self._dir)
        except OSError as e:
            self._counters.inc(SPOOL_ERRORS, "write")
            self._disk_full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            logger.warning("OTLP spool: cannot write %s (%s); keeping the request in memory only", final, e)
            self._unlink(temp)
            return None
        self._disk_full = False
        return len(data)

    def _evict_for(self, size: int) -> bool:
        """The disk is full: drop the oldest spooled files (counted as dropped, `disk_full`) until `size`
        bytes and a margin are free, or none is left; whether any went."""
        evicted = 0
        for seq in [seq for seq, slot in self._slots.items() if slot.on_disk]:
            if _free_bytes(self._dir) >= size + _ENOSPC_MARGIN:
                break
            self._forget(seq, "disk_full")
            evicted += 1
        if evicted:
            logger.warning("OTLP spool: disk full, dropped the %d oldest requests to keep the newest", evicted)
        return evicted > 0

    def _read(self, seq: int) -> bytes | None:
        path = self._path(seq)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            self._counters.inc(SPOOL_ERRORS, "read")
            logger.warning("OTLP spool: cannot read %s: %s; dropping it", path, e)
            return None
        if len(data) >= HEADER.size:
            magic, crc, length = HEADER.unpack_from(data)
            payload = data[HEADER.size :]
            if magic == MAGIC and length == len(payload) and zlib.crc32(payload) == crc:
                return payload
        logger.warning("OTLP spool: %s is corrupt (%d bytes); dropping it", path, len(data))
        return None

    def _forget(self, seq: int, drop_reason: str | None) -> None:
        slot = self._slots.pop(seq)
        self._disk_bytes -= slot.size
        if slot.on_disk:
            self._unlink(self._path(seq))
        if drop_reason is not None:
            self._counters.inc(DROPPED, drop_reason)

    def _enforce_bounds(self) -> None:
        # Disk bound: drop the oldest files, but never the newest entry (it is the one just accepted).
        while self._disk_bytes > self._max_bytes and len(self._slots) > 1:
            oldest = next(iter(self._slots))
            logger.warning("OTLP spool over %d bytes: dropping request %d", self._max_bytes, oldest)
            self._forget(oldest, "spool_full")
        # Memory bound: uncache the oldest payloads that are on disk, drop those that are not.
        cached = [seq for seq, slot in self._slots.items() if slot.payload is not None]
        for seq in cached[: max(len(cached) - self._memory_items, 0)]:
            if self._slots[seq].on_disk:
                self._slots[seq].payload = None
            else:
                logger.warning("OTLP in-memory queue full: dropping request %d", seq)
                self._forget(seq, "memory_full")

    def _unlink(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self._counters.inc(SPOOL_ERRORS, "delete")
            logger.warning("OTLP spool: cannot delete %s: %s", path, e)


def _free_bytes(directory: str) -> int:
    try:
        stats = os.statvfs(directory)
    except OSError:
        return 0
    return stats.f_bavail * stats.f_frsize


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; without it a power loss could forget an acknowledged file.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
