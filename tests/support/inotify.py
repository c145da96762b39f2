"""The names created in one directory, as the kernel reports them (inotify through libc), and a
process stopped at once when one appears: how the fault tests catch the agent in the middle of a
write, which lasts a few milliseconds (the fsync), far too short for polling the directory."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import struct
import time
from collections.abc import Callable
from pathlib import Path

IN_CREATE = 0x100
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name


class CreatedNames:
    """inotify IN_CREATE on `directory`; close() when done."""

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self._fd, os.fsencode(directory), IN_CREATE) < 0:
            os.close(self._fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")

    def next(self, timeout: float) -> list[str]:
        """The names created since the last call, waiting up to `timeout` s for one; [] if none came."""
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return []
        data = os.read(self._fd, 1 << 16)
        names, offset = [], 0
        while offset < len(data):
            _, _, _, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            names.append(os.fsdecode(data[offset : offset + length].rstrip(b"\0")))
            offset += length
        return names

    def close(self) -> None:
        os.close(self._fd)


def stop_now(pid: int, timeout: float = 10) -> None:
    """SIGSTOP `pid` and return once it is stopped (state T in /proc/PID/stat): the signal is only sent
    by kill(), and a directory looked at before the stop takes hold could still change."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
        assert time.monotonic() < deadline, f"pid {pid} did not stop"
        time.sleep(0.001)


def catch_mid_write(pid: int, directory: Path, is_temp: Callable[[str], bool], timeout: float) -> Path:
    """Stop `pid` while it writes a file into `directory`: at each temp file (`is_temp(name)`) it
    creates, stop it, and keep it stopped if the file is still there (the write, fsync and rename not
    done); else let it go on and wait for the next. Returns the temp file; fails after `timeout` s."""
    watch = CreatedNames(directory)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name in watch.next(0.5):
                if not is_temp(name):
                    continue
                stop_now(pid)
                temp = directory / name
                if temp.exists():
                    return temp
                os.kill(pid, signal.SIGCONT)
        raise AssertionError(f"no write into {directory} was caught within {timeout} s")
    finally:
        watch.close()
