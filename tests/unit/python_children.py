"""Helpers for tests that inspect real child interpreters: start one with N waiting threads, and find its
interpreter the way the inspector needs it (`Interpreter`), from the ELF file that defines `_PyRuntime`.

`elf_discover` is the tests' own, independent discovery: the file exporting `_PyRuntime` among the
child's executable mappings, its load bias, and the inspector's code check (the agent's own is
agent.process.python.discover).
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.process.elf import read_elf
from agent.process.maps import load_bias, read_process_maps, resolve_file
from agent.process.python.elfcode import ElfCode
from agent.process.python.inspect import Interpreter, NotWalkable, code_check
from agent.process.python.layouts import (
    MAX_DEBUG_OFFSETS_SIZE,
    layout_for_version,
    layout_from_debug_offsets,
)
from agent.process.python.proc import PythonState
from agent.process.python.threads import MemoryReader

# A child that starts `threads` threads blocked on an event, prints "ready" and sleeps in a Python frame.
CHILD = """
import sys, threading, time
ev = threading.Event()
def worker():
    ev.wait()
ts = [threading.Thread(target=worker, name=f"w{i}") for i in range(int(sys.argv[1]))]
for t in ts:
    t.start()
print("ready", flush=True)
def sleeper():
    time.sleep(120)
sleeper()
"""


@contextmanager
def child(executable: Path, threads: int, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [str(executable), "-c", CHILD, str(threads)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, **(env or {})),
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        yield process
    finally:
        process.kill()
        process.wait()


def elf_discover(pid: int, memory: MemoryReader) -> Interpreter:
    maps = read_process_maps(Path("/proc"), pid)
    for entry in maps.mappings:
        path = resolve_file(Path("/proc"), pid, entry)
        if path is None:
            continue
        with ElfCode.open(path) as elf:
            runtime, function, code_type = (
                elf.symbol(name) for name in ("_PyRuntime", "PyGILState_GetThisThreadState", "PyCode_Type")
            )
            version_address = elf.symbol("Py_Version")
        if runtime is None:
            continue
        segment = next(s for s in read_elf(path).segments if s.executable)
        bias = load_bias(entry, segment)
        if code_type is None:
            raise NotWalkable(PythonState.NO_SYMBOLS, "no_code_type")
        version = _version(memory, bias, version_address, path)
        if version >= (3, 13):
            layout = layout_from_debug_offsets(memory.read(bias + runtime, MAX_DEBUG_OFFSETS_SIZE))
        else:
            layout = layout_for_version(version)
        check = code_check(memory, layout, bias + code_type)
        return Interpreter(path, bias, bias + runtime, layout, function or 0, check, bias + code_type)
    raise NotWalkable(PythonState.NOT_PYTHON, "no_runtime")


def _version(memory: MemoryReader, bias: int, address: int | None, path: Path) -> tuple[int, int]:
    """Py_Version (3.11+), else the minor in the file's name (libpython3.10.so)."""
    if address is not None:
        hexversion = struct.unpack("<I", memory.read(bias + address, 4))[0]
        return hexversion >> 24, (hexversion >> 16) & 0xFF
    named = re.search(r"python(\d)\.(\d+)", path.name)
    if named is None:
        raise NotWalkable(PythonState.NO_SYMBOLS, "no_version")
    return int(named.group(1)), int(named.group(2))
