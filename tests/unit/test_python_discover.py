"""Process stage: finding CPython in a process: live children of every installed interpreter, and fake
/proc trees for the outcomes a live machine does not offer (no symbols, old versions, free-threaded).

The live children report the truth from inside (ctypes: the addresses of _PyRuntime,
PyGILState_GetThisThreadState, PyCode_Type and libc's pthread_getspecific, and sys.version_info);
discover() must find the same from outside.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.process.memory import ProcessMemory
from agent.process.python.discover import (
    NotPython,
    NotPythonReason,
    PythonRuntime,
    discover,
    name_version,
    read_layout,
)
from agent.process.python.layouts import PY313, layout_for_version
from tests.support.fake_memory import FakeMemory
from tests.support.fixture_types import AddFakeProcess, MapsFor
from tests.support.interpreters import Interpreter, installed, require_versions

INTERPRETERS = installed()

CHILD = r"""
import ctypes, json, sys, types
libc = ctypes.CDLL(None)
def address(symbol):
    return ctypes.cast(symbol, ctypes.c_void_p).value
print(json.dumps({
    "runtime": ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi, "_PyRuntime")),
    "gilstate": address(ctypes.pythonapi.PyGILState_GetThisThreadState),
    "code_type": id(types.CodeType), "unicode_type": id(str), "bytes_type": id(bytes),
    "pthread_getspecific": address(libc.pthread_getspecific),
    "version": list(sys.version_info[:3]),
}), flush=True)
sys.stdin.read()
"""


@pytest.fixture(params=INTERPRETERS, ids=[i.label for i in INTERPRETERS])
def child(request: pytest.FixtureRequest) -> Iterator[tuple[Interpreter, int, dict[str, object]]]:
    interpreter: Interpreter = request.param
    proc = subprocess.Popen(
        [str(interpreter.executable), "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    try:
        yield interpreter, proc.pid, json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def test_interpreters_required_in_ci() -> None:
    require_versions(INTERPRETERS)


def test_live_interpreter(child: tuple[Interpreter, int, dict[str, object]]) -> None:
    interpreter, pid, truth = child
    runtime = discover(pid)
    assert isinstance(runtime, PythonRuntime), runtime
    assert runtime.pid == pid and not runtime.free_threaded
    if interpreter.minor >= (3, 11):
        assert (runtime.version, runtime.version_source) == (interpreter.version, "Py_Version")
    else:  # 3.10 has no Py_Version: the soname tells the minor only
        assert (runtime.version, runtime.version_source) == ((*interpreter.minor, 0), "filename")
    found = {
        "runtime": runtime.runtime,
        "gilstate": runtime.gilstate_get_this_thread_state,
        "code_type": runtime.code_type,
        "unicode_type": runtime.unicode_type,
        "bytes_type": runtime.bytes_type,
        "pthread_getspecific": runtime.pthread_getspecific,
    }
    assert found == {key: truth[key] for key in found}
    assert runtime.shared_library == ("libpython" in runtime.elf_path)
    assert runtime.tss_get != 0 and (runtime.py_version != 0) == (interpreter.minor >= (3, 11))
    with ProcessMemory(pid) as memory:
        layout = read_layout(memory, runtime)
    assert layout == (PY313 if interpreter.minor == (3, 13) else layout_for_version(interpreter.minor))


def test_names() -> None:
    assert name_version("/usr/lib/libpython3.12.so.1.0") == (3, 12, False)
    assert name_version("libpython3.13t.so") == (3, 13, True)
    assert name_version("/usr/bin/python3.11") == (3, 11, False)
    assert name_version("python3.13t") == (3, 13, True)
    assert name_version("python3.10d") == (3, 10, False)
    assert name_version("python3") is None and name_version("libpythonista.so") is None


# --- fake /proc ------------------------------------------------------------------------------------

FAKE_LIBPYTHON_C = """
char _PyRuntime[8192] __attribute__((aligned(64)));
const unsigned int Py_Version = %(hexversion)s;
void PyGILState_GetThisThreadState(void) {}
char PyCode_Type[400];
"""
NO_RUNTIME_C = "int not_python(void) { return 1; }\n"
BASE = 0x7F12_3400_0000


def _build_library(directory: Path, name: str, source: str) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the fake interpreter libraries")
    src = directory / f"{name}.c"
    src.write_text(source)
    out = directory / name
    subprocess.run(["gcc", "-shared", "-fPIC", "-O0", f"-Wl,-soname,{name}", str(src), "-o", str(out)], check=True)
    return out


def _symbol(library: Path, name: str) -> int:
    out = subprocess.run(["nm", "-D", "--defined-only", str(library)], check=True, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        parts = line.split()
        if parts[-1] == name:
            return int(parts[0], 16)
    raise AssertionError(f"{name} not in {library}")


def _fake_runtime(
    tmp_path: Path, add_fake_process: AddFakeProcess, maps_for: MapsFor, name: str, hexversion: int
) -> tuple[PythonRuntime | NotPython, FakeMemory, Path]:
    library = _build_library(tmp_path, name, FAKE_LIBPYTHON_C % {"hexversion": hex(hexversion)})
    add_fake_process(77, maps_for(library, BASE))
    memory = FakeMemory()
    memory.regions[BASE + _symbol(library, "Py_Version")] = bytearray(struct.pack("<I", hexversion))
    return discover(77, tmp_path / "proc", memory), memory, library


def test_fake_library_version_from_memory(tmp_path: Path, add_fake_process: AddFakeProcess, maps_for: MapsFor) -> None:
    runtime, _, library = _fake_runtime(tmp_path, add_fake_process, maps_for, "libpython3.12.so.1.0", 0x030C04F0)
    assert isinstance(runtime, PythonRuntime), runtime
    assert (runtime.version, runtime.version_source, runtime.free_threaded) == ((3, 12, 4), "Py_Version", False)
    assert runtime.load_bias == BASE
    assert runtime.runtime == BASE + _symbol(library, "_PyRuntime")
    assert runtime.code_type == BASE + _symbol(library, "PyCode_Type")
    assert runtime.gilstate_get_this_thread_state == BASE + _symbol(library, "PyGILState_GetThisThreadState")
    assert runtime.tss_get == 0 and runtime.pthread_getspecific == 0


def test_fake_free_threaded_by_name(tmp_path: Path, add_fake_process: AddFakeProcess, maps_for: MapsFor) -> None:
    runtime, _, _ = _fake_runtime(tmp_path, add_fake_process, maps_for, "libpython3.13t.so.1.0", 0x030D00F0)
    assert isinstance(runtime, PythonRuntime) and runtime.free_threaded and runtime.version == (3, 13, 0)


def test_fake_free_threaded_by_debug_offsets(
    tmp_path: Path, add_fake_process: AddFakeProcess, maps_for: MapsFor
) -> None:
    library = _build_library(tmp_path, "libpython3.14.so.1.0", FAKE_LIBPYTHON_C % {"hexversion": "0x030E00F0"})
    add_fake_process(78, maps_for(library, BASE))
    memory = FakeMemory()
    memory.regions[BASE + _symbol(library, "Py_Version")] = bytearray(struct.pack("<I", 0x030E00F0))
    memory.regions[BASE + _symbol(library, "_PyRuntime")] = bytearray(b"xdebugpy" + struct.pack("<QQ", 0x030E00F0, 1))
    runtime = discover(78, tmp_path / "proc", memory)
    assert isinstance(runtime, PythonRuntime) and runtime.free_threaded and runtime.version == (3, 14, 0)


def test_fake_memory_disagreeing_with_the_name(
    tmp_path: Path, add_fake_process: AddFakeProcess, maps_for: MapsFor
) -> None:
    """Py_Version that contradicts the soname is not believed: the name's minor, micro unknown."""
    runtime, _, _ = _fake_runtime(tmp_path, add_fake_process, maps_for, "libpython3.11.so.1.0", 0x030C00F0)
    assert isinstance(runtime, PythonRuntime) and (runtime.version, runtime.version_source) == ((3, 11, 0), "filename")


@pytest.mark.parametrize(
    ("name", "hexversion", "reason"),
    [
        ("libpython3.9.so.1.0", 0x030912F0, NotPythonReason.UNSUPPORTED_VERSION),
        ("libpython3.15.so.1.0", 0x030F00A0, NotPythonReason.UNSUPPORTED_VERSION),
    ],
)
def test_fake_unsupported(
    tmp_path: Path, add_fake_process: AddFakeProcess, maps_for: MapsFor, name: str, hexversion: int, reason: str
) -> None:
    result, _, _ = _fake_runtime(tmp_path, add_fake_process, maps_for, name, hexversion)
    assert isinstance(result, NotPython) and result.reason == reason


def test_fake_no_symbols_and_not_python(tmp_path: Path, add_fake_process: AddFakeProcess, maps_for: MapsFor) -> None:
    stripped = _build_library(tmp_path, "libpython3.12.so.1.0", NO_RUNTIME_C)
    add_fake_process(80, maps_for(stripped, BASE))
    result = discover(80, tmp_path / "proc", FakeMemory())
    assert isinstance(result, NotPython) and result.reason == NotPythonReason.NO_SYMBOLS
    other = _build_library(tmp_path, "libother.so", NO_RUNTIME_C)
    add_fake_process(81, maps_for(other, BASE))
    result = discover(81, tmp_path / "proc", FakeMemory())
    assert isinstance(result, NotPython) and result.reason == NotPythonReason.NOT_PYTHON
    result = discover(82, tmp_path / "proc", FakeMemory())
    assert isinstance(result, NotPython) and result.reason == NotPythonReason.GONE


def test_fake_deleted_library_through_map_files(
    tmp_path: Path, add_fake_process: AddFakeProcess, maps_for: MapsFor
) -> None:
    """An upgraded (unlinked) libpython is opened through /proc/PID/map_files/START-END."""
    library = _build_library(tmp_path, "libpython3.12.so.1.0", FAKE_LIBPYTHON_C % {"hexversion": "0x030C01F0"})
    kept = tmp_path / "kept.so"
    shutil.copy(library, kept)
    lines = [line.replace(str(library), "/gone/libpython3.12.so.1.0 (deleted)") for line in maps_for(library, BASE)]
    pid_dir = add_fake_process(83, lines)
    (pid_dir / "map_files").mkdir()
    for line in lines:
        if line.split()[1][2] == "x":
            (pid_dir / "map_files" / line.split()[0]).symlink_to(kept)
    memory = FakeMemory()
    memory.regions[BASE + _symbol(library, "Py_Version")] = bytearray(struct.pack("<I", 0x030C01F0))
    runtime = discover(83, tmp_path / "proc", memory)
    assert isinstance(runtime, PythonRuntime), runtime
    assert runtime.version == (3, 12, 1) and runtime.elf_path == "/gone/libpython3.12.so.1.0 (deleted)"
    assert runtime.runtime == BASE + _symbol(library, "_PyRuntime")
