"""Process stage: finding each thread's PyThreadState in real child interpreters, and the inspector's states.

Each installed interpreter (Debian's static python3.11, pyenv 3.10-3.13) is started with 20 waiting
threads. The TSS key's address decoded from `PyGILState_GetThisThreadState` must be the table's; the TLS
slot found must be the same for every thread and, read at each thread's fsbase (its pthread_t), yield that
thread's own state; with 40 pthread keys taken before the interpreter starts (a preloaded library), the
key is >= 32 and goes through the second-level block. The inspector enables good processes, falls back
to the thread map with the reason when the key cannot be trusted, and gives garbage the right state.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.probes import records
from agent.process.memory import ProcessMemory
from agent.process.python import proc
from agent.process.python.code_cache import CodeCache
from agent.process.python.elfcode import ElfCode
from agent.process.python.frames import walk_frames
from agent.process.python.inspect import Interpreter, NotWalkable, PythonInspector
from agent.process.python.layouts import NO_FIELD, PY313, layout_for_version
from agent.process.python.proc import PythonProcess, PythonState
from agent.process.python.runtime import CodeResolver, discover_interpreter
from agent.process.python.threads import (
    KEYS_PER_BLOCK,
    MemoryReader,
    find_tls_slot,
    read_tls_slot,
    read_tss_key,
    thread_map,
    walk_threads,
)
from agent.process.python.x86 import SpecificOffsets, pthread_specific_offsets, tss_key_address
from tests.support.interpreters import Interpreter as Installed
from tests.support.interpreters import installed, require_versions
from tests.support.python_codes import code_key_at
from tests.unit.python_children import child, elf_discover

INTERPRETERS = installed()
IDS = [i.label for i in INTERPRETERS]
THREADS = 20

MANY_KEYS_C = """
#include <pthread.h>
__attribute__((constructor)) static void take_keys(void) {
    pthread_key_t key;
    for (int i = 0; i < 40; i++) pthread_key_create(&key, 0);
}
"""


def test_interpreters_required_in_ci() -> None:
    require_versions(INTERPRETERS)


def _table(minor: tuple[int, int]) -> int:
    return (PY313 if minor == (3, 13) else layout_for_version(minor)).runtime_autotss_key


@pytest.mark.parametrize("interpreter", INTERPRETERS, ids=IDS)
def test_tss_key_address_agrees_with_the_table(interpreter: Installed) -> None:
    with (
        child(interpreter.executable, 0) as process,
        ElfCode.open(elf_discover(process.pid, ProcessMemory(process.pid)).elf_path) as elf,
    ):
        function, runtime = elf.symbol("PyGILState_GetThisThreadState"), elf.symbol("_PyRuntime")
        assert function is not None and runtime is not None
        decoded = tss_key_address(elf.code(function, 64), function, elf.pointer)
    assert decoded == runtime + _table(interpreter.minor)


def _libc_offsets(pid: int) -> SpecificOffsets | None:
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    path = next(line.split()[-1] for line in maps if "libc.so" in line and " r-xp " in line)
    with ElfCode.open(Path(path)) as elf:
        function = elf.symbol("pthread_getspecific")
        assert function is not None
        return pthread_specific_offsets(elf.code(function, 128))


def _check_slot(pid: int, expect_second_level: bool) -> None:
    memory = ProcessMemory(pid)
    found = elf_discover(pid, memory)
    key = read_tss_key(memory, found.runtime + found.layout.runtime_autotss_key)
    assert (key >= KEYS_PER_BLOCK) is expect_second_level
    threads = walk_threads(memory, found.layout, found.runtime)
    assert len(threads) == THREADS + 1
    if found.layout.tstate_native_thread_id != NO_FIELD:
        tasks = {int(t) for t in os.listdir(f"/proc/{pid}/task")}
        assert {t.native_thread_id for t in threads} == tasks
    slot = find_tls_slot(memory, threads, key, _libc_offsets(pid))
    assert bool(slot.tls_second_offset) is expect_second_level
    for thread in threads:
        assert read_tls_slot(memory, thread.thread_id, slot) == thread.address
    assert len(thread_map(threads)) == THREADS + 1


@pytest.mark.parametrize("interpreter", INTERPRETERS, ids=IDS)
def test_tls_slot_of_20_threads(interpreter: Installed) -> None:
    with child(interpreter.executable, THREADS) as process:
        _check_slot(process.pid, expect_second_level=False)


@pytest.fixture(scope="module")
def many_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    (directory / "keys.c").write_text(MANY_KEYS_C)
    library = directory / "libkeys.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(directory / "keys.c")], check=True, timeout=60)
    return library


@pytest.mark.parametrize("interpreter", INTERPRETERS, ids=IDS)
def test_tls_slot_of_a_key_above_32(interpreter: Installed, many_keys: Path) -> None:
    with child(interpreter.executable, THREADS, {"LD_PRELOAD": str(many_keys)}) as process:
        _check_slot(process.pid, expect_second_level=True)


@pytest.mark.parametrize("interpreter", INTERPRETERS, ids=IDS)
def test_inspector_enables_a_good_process(interpreter: Installed) -> None:
    inspector = PythonInspector(discover_interpreter())  # the agent's own discovery
    with child(interpreter.executable, THREADS) as process:
        result = inspector.inspect(process.pid)
        resolver = CodeResolver(CodeCache(64), inspector)
        names = _frame_names(process.pid, result, resolver)
    assert "sleeper" in names and "<module>" in names, names
    known = interpreter.version if interpreter.minor >= (3, 11) else interpreter.minor  # Py_Version is 3.11+
    assert resolver.runtime(process.pid) == ("cpython", ".".join(map(str, known)))
    assert result.state is PythonState.ENABLED, result
    assert result.version == interpreter.minor
    assert result.frames_checked >= 2  # sleeper and <module> at least
    assert result.spec is not None and result.layout is not None
    assert result.spec.flags & proc.PYTHON_USE_TSS
    assert bool(result.spec.flags & proc.PYTHON_INSTR_IS_INT) is (interpreter.minor == (3, 10))
    assert inspector.states()["enabled"] == 1
    inspector.forget(process.pid)
    assert inspector.states()["enabled"] == 0
    # The runtime outlives the verdict (an exited process's last interval is reported after it is
    # dropped), until the pid exec's.
    assert resolver.runtime(process.pid) == ("cpython", ".".join(map(str, known)))
    resolver.forget(process.pid)
    assert resolver.runtime(process.pid) is None


def _frame_names(pid: int, result: PythonProcess, resolver: CodeResolver) -> list[str]:
    """The qualnames of the main thread's frames, resolved the way the pipeline does."""
    assert result.layout is not None
    memory = ProcessMemory(pid)
    threads = walk_threads(memory, result.layout, result.runtime_address)
    main = threads[-1]  # interp->threads is newest first: the main thread's state is the last
    names = []
    for frame in walk_frames(memory, result.layout, main.address):
        if not frame.shim:
            key = code_key_at(memory, result.layout, frame.code)
            code = resolver.resolve(pid, key)
            assert code is not None and resolver.code(pid, key) is code
            names.append(code.qualname)
    return names


def _altered(change: Callable[[Interpreter], Interpreter]) -> Callable[[int, MemoryReader], Interpreter]:
    def discover(pid: int, memory: MemoryReader) -> Interpreter:
        return change(elf_discover(pid, memory))

    return discover


def _shifted_key(found: Interpreter) -> Interpreter:
    layout = dataclasses.replace(found.layout, runtime_autotss_key=found.layout.runtime_autotss_key + 8)
    return dataclasses.replace(found, layout=layout)


def _no_key(found: Interpreter) -> Interpreter:
    layout = dataclasses.replace(found.layout, runtime_autotss_key=NO_FIELD)
    return dataclasses.replace(found, layout=layout, gilstate_function=0)


def _decoded_only(found: Interpreter) -> Interpreter:
    return dataclasses.replace(found, layout=dataclasses.replace(found.layout, runtime_autotss_key=NO_FIELD))


@pytest.mark.parametrize(
    ("change", "state", "reason"),
    [
        (_shifted_key, PythonState.THREAD_MAP, "tss_mismatch"),
        (_no_key, PythonState.THREAD_MAP, "tss_undecoded"),
        (_decoded_only, PythonState.ENABLED, ""),
    ],
    ids=["mismatch", "undecoded", "decoded-only"],
)
def test_inspector_falls_back_to_the_thread_map(
    change: Callable[[Interpreter], Interpreter], state: PythonState, reason: str
) -> None:
    interpreter = INTERPRETERS[-1] if INTERPRETERS else pytest.skip("no CPython 3.10-3.13 installed")
    inspector = PythonInspector(_altered(change))
    with child(interpreter.executable, THREADS) as process:
        result = inspector.inspect(process.pid)
        assert (result.state, result.reason) == (state, reason), result
        if state is PythonState.THREAD_MAP:
            assert result.spec is not None and result.spec.flags & proc.PYTHON_USE_THREAD_MAP
            assert len(result.threads) == THREADS + 1
            assert inspector.fallbacks[reason] == 1
            refreshed = inspector.refresh_threads(process.pid)
            assert refreshed is not None and dict(refreshed) == dict(result.threads)
    assert inspector.refresh_threads(process.pid) is None  # gone: counted, never raised
    assert inspector.refresh_failures == (1 if state is PythonState.THREAD_MAP else 0)


def test_flags_match_the_record_mirror() -> None:
    for name in ("PYTHON_USE_TSS", "PYTHON_USE_THREAD_MAP", "PYTHON_CODE_TAGGED", "PYTHON_INSTR_IS_INT"):
        assert getattr(proc, name) == getattr(records, name)
    fields = [f.name for f in dataclasses.fields(proc.PythonProcSpec)]
    assert fields == [name for name, _ in records.PythonProcRecord._fields_ if name != "padding"]


def test_disabled_inspects_nothing() -> None:
    def discover(pid: int, memory: MemoryReader) -> Interpreter:
        raise AssertionError("python.enabled is off: nothing is discovered")

    inspector = PythonInspector(discover, enabled=False)
    assert inspector.inspect(os.getpid()).state is PythonState.DISABLED


def test_a_vanished_process_is_read_failed() -> None:
    process = subprocess.Popen(["true"])
    process.wait()
    result = PythonInspector(elf_discover).inspect(process.pid)
    assert result.state in (PythonState.READ_FAILED, PythonState.NOT_PYTHON)


def test_not_python() -> None:
    with subprocess.Popen(["sleep", "30"]) as process:
        try:
            assert PythonInspector(elf_discover).inspect(process.pid).state is PythonState.NOT_PYTHON
        finally:
            process.kill()


def test_discovery_verdicts_are_states() -> None:
    def discover(pid: int, memory: MemoryReader) -> Interpreter:
        raise NotWalkable(PythonState.UNSUPPORTED_VERSION, "too_old", version=(3, 9))

    result = PythonInspector(discover).inspect(os.getpid())
    assert (result.state, result.reason, result.version) == (PythonState.UNSUPPORTED_VERSION, "too_old", (3, 9))


# A C program posing as CPython 3.12: it exports _PyRuntime, Py_Version, PyCode_Type and
# PyGILState_GetThisThreadState. "chain" fills _PyRuntime with a well-formed interpreter -> thread state
# -> frame chain whose code object is not a code object; "zeros" leaves it empty; "garbage" fills it with
# pointer-looking noise.
FAKE_PYTHON_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
unsigned char _PyRuntime[4096] __attribute__((aligned(64)));
const unsigned int Py_Version = 0x030C01F0;
unsigned char PyCode_Type[512];
static unsigned char interp[1024], tstate[1024], cframe[64], frame[128], code[256];
void *PyGILState_GetThisThreadState(void) { return 0; }
static void put(unsigned char *base, int offset, const void *value) { memcpy(base + offset, &value, 8); }
int main(int argc, char **argv) {
    if (!strcmp(argv[1], "chain")) {
        put(_PyRuntime, 40, interp);            /* interpreters.head */
        put(interp, 72, tstate);                /* threads.head */
        put(tstate, 16, interp);                /* interp */
        put(tstate, 136, (void *)pthread_self());
        put(tstate, 144, (void *)(uintptr_t)gettid());
        put(tstate, 56, cframe);                /* cframe */
        put(cframe, 0, frame);                  /* current_frame */
        put(frame, 0, code);                    /* f_code */
        put(code, 8, code);                     /* ob_type: not &PyCode_Type */
    } else if (!strcmp(argv[1], "garbage")) {
        for (unsigned i = 0; i < sizeof _PyRuntime; i++) _PyRuntime[i] = (unsigned char)(i * 131 + 7);
    }
    printf("ready\n");
    fflush(stdout);
    pause();
    return 0;
}
"""


@pytest.fixture(scope="module")
def fake_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fake")
    (directory / "fake.c").write_text(FAKE_PYTHON_C)
    binary = directory / "python3.12"
    command = ["gcc", "-O0", "-rdynamic", "-o", str(binary), str(directory / "fake.c"), "-lpthread"]
    subprocess.run(command, check=True, timeout=60)
    return binary


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("chain", "bad_code_object"), ("zeros", "no_threads"), ("garbage", "bad_pointer")],
)
def test_a_fake_interpreter_is_never_enabled(fake_python: Path, mode: str, reason: str) -> None:
    inspector = PythonInspector(discover_interpreter())
    with subprocess.Popen([str(fake_python), mode], stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
            result = inspector.inspect(process.pid)
        finally:
            process.kill()
    assert (result.state, result.reason) == (PythonState.VALIDATION_FAILED, reason), result
    assert result.spec is None
    assert inspector.states()["validation_failed"] == 1


OLD_PYENV = ("2.7", "3.6", "3.7", "3.8", "3.9")


def _old_interpreters() -> list[Path]:
    found = [Path("/usr/bin/python2")] if Path("/usr/bin/python2").exists() else []
    versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for prefix in OLD_PYENV:
        found += sorted(versions.glob(f"{prefix}.*/bin/python"))[:1]
    return found


@pytest.mark.parametrize("executable", _old_interpreters() or [None], ids=str)
def test_an_unsupported_interpreter_gets_its_state(executable: Path | None) -> None:
    if executable is None:
        pytest.skip("no Python 2 or pyenv 2.7/3.6-3.9 installed")
    inspector = PythonInspector(discover_interpreter())
    command = [
        str(executable),
        "-c",
        "import sys, time; sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(60)",
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
            result = inspector.inspect(process.pid)
        finally:
            process.kill()
    # 2.7 and 3.6 have no _PyRuntime (not recognisable as CPython 3.7+), 3.7-3.9 are too old.
    assert result.state in (PythonState.UNSUPPORTED_VERSION, PythonState.NOT_PYTHON, PythonState.NO_SYMBOLS), result
    assert result.spec is None


def _read_prompt(process: subprocess.Popen[bytes]) -> None:
    assert process.stderr is not None
    seen = b""
    while not seen.endswith(b">>> "):
        byte = process.stderr.read(1)
        assert byte, f"no prompt: {seen!r}"
        seen += byte


@pytest.mark.parametrize("interpreter", INTERPRETERS, ids=IDS)
def test_an_idle_process_validates_by_its_thread_states(interpreter: Installed) -> None:
    """The interactive loop waiting for input (stdin not a terminal: the C REPL) runs no Python code:
    no thread has a frame, and the thread states and the TSS slot alone validate the process."""
    inspector = PythonInspector(discover_interpreter())
    command = [str(interpreter.executable), "-i", "-q"]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        try:
            _read_prompt(process)
            result = inspector.inspect(process.pid)
        finally:
            process.kill()
    assert (result.state, result.frames_checked) == (PythonState.ENABLED, 0), result
