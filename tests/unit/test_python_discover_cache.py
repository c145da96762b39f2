"""Process stage: what makes a repeated inspection cheap, and the start-up scan's candidates.

`SymbolCache` parses an ELF file's symbols once per file identity (device, inode, mtime): a second
discovery of a process of the same interpreter reads the same addresses without parsing, a file
rewritten in place is parsed again, and a file that is not ELF stays an error. `running_pythons` lists
the processes whose maps name a python-named ELF, from a fake /proc tree.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agent.process.elf import ElfReadError
from agent.process.python.discover import PYTHON_SYMBOLS, discover, running_pythons
from agent.process.runtime_files import SymbolCache
from tests.support.interpreters import installed

INTERPRETERS = installed()


@pytest.mark.skipif(not INTERPRETERS, reason="no CPython 3.10-3.13 installed")
def test_a_second_discovery_of_one_interpreter_parses_nothing() -> None:
    interpreter = INTERPRETERS[-1]
    cache = SymbolCache()
    command = [str(interpreter.executable), "-c", "import sys; print('ready', flush=True); sys.stdin.read()"]
    first, second = (
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)
    )
    try:
        for process in (first, second):
            assert process.stdout is not None and process.stdout.readline() == "ready\n"
        found = discover(first.pid, symbols=cache)
        parsed = cache.misses
        assert parsed >= 1 and cache.hits == 0
        again = discover(second.pid, symbols=cache)
        uncached = discover(second.pid)
    finally:
        for process in (first, second):
            process.kill()
            process.wait()
    assert cache.misses == parsed and cache.hits >= parsed  # the same files, found in the cache
    assert again == uncached and type(found) is type(again)


def test_a_rewritten_file_is_parsed_again(tmp_path: Path) -> None:
    source = tmp_path / "lib.c"
    source.write_text("int _PyRuntime[4] = {1};\n")
    library = tmp_path / "libpython3.12.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True, timeout=60)
    cache = SymbolCache()
    first = cache.read(library, PYTHON_SYMBOLS, "lib")
    assert "_PyRuntime" in first.addresses and cache.read(library, PYTHON_SYMBOLS, "lib") is first
    stat = library.stat()
    os.utime(library, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cache.read(library, PYTHON_SYMBOLS, "lib") is not first
    assert (cache.hits, cache.misses) == (1, 2)


def test_a_file_that_is_not_elf_stays_an_error(tmp_path: Path) -> None:
    text = tmp_path / "python3.12"
    text.write_text("#!/bin/sh\n")
    cache = SymbolCache()
    for _ in range(2):
        with pytest.raises(ElfReadError):
            cache.read(text, PYTHON_SYMBOLS, "python3.12")
    assert (cache.hits, cache.misses) == (1, 1)


def _process(root: Path, pid: int, maps: str) -> None:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "maps").write_text(maps)


def test_running_pythons_are_the_processes_mapping_a_python_named_file(tmp_path: Path) -> None:
    line = "7f0000000000-7f0000100000 r-xp 00000000 08:01 1234 {}\n"
    _process(tmp_path, 10, line.format("/root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0"))
    _process(tmp_path, 11, line.format("/usr/bin/python3.11"))
    _process(tmp_path, 12, line.format("/usr/bin/bash") + line.format("/usr/lib/x86_64-linux-gnu/libc.so.6"))
    _process(tmp_path, 13, line.format("/opt/python3.12-tools/bin/app"))  # a directory named so: not the file
    _process(tmp_path, 14, "")  # a kernel thread
    (tmp_path / "self").mkdir()
    assert running_pythons(tmp_path) == [10, 11]
    assert running_pythons(tmp_path / "absent") == []
