"""The symbolizer with Python frames, end to end: a compiled stand-in for the interpreter in a fake /proc.

The stand-in has the symbols that matter to the merge (`_PyEval_EvalFrameDefault`, its `.cold` part
as GCC's hot/cold splitting names it, `_PyFunction_Vectorcall`, a C extension's `compress_block`,
`main`); the native resolver names the stack from them and the merge puts the Python frames a fake
code cache names in place of the eval frames.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent.aggregate.types import AggregatedSample, IntervalProfile, SampleKey
from agent.process.registry import ProcessRegistry
from agent.symbolize.python_merge import MergeOutcome
from agent.symbolize.symbolizer import Symbolizer
from agent.symbolize.types import FrameKind, Profile, PythonSource
from agent.types import EMPTY_STACK, InterpreterStack, InterpreterStatus, ProfileSpec, Stack, StackStatus, ValueType
from tests.support.fixture_types import AddFakeProcess, MapsFor, NmFunctions
from tests.support.python_codes import FakeCode, FakeCodes, frame, shim, walk

PIE_BASE = 0x555555554000
PID = 300
SPEC = ProfileSpec("cpu", (ValueType("samples", "count"),), ValueType("cpu", "nanoseconds"), 10_000_000)

# -O0, noinline: each function exists at its own address. The .cold part is assembly so that it gets
# exactly the local symbol GCC gives split-off code (`name.cold`, a sized function).
FAKE_INTERPRETER_C = r"""
volatile unsigned long sink;
__attribute__((noinline)) void compress_block(unsigned long n) { for (unsigned long i = 0; i < n; i++) sink += i; }
__asm__(".text\n.type _PyEval_EvalFrameDefault.cold, %function\n_PyEval_EvalFrameDefault.cold:\n"
        " call compress_block\n ret\n.size _PyEval_EvalFrameDefault.cold, .-_PyEval_EvalFrameDefault.cold\n");
__attribute__((noinline)) void _PyFunction_Vectorcall(unsigned long n);
__attribute__((noinline)) void _PyEval_EvalFrameDefault(unsigned long n) {
    if (n) _PyFunction_Vectorcall(n - 1); else compress_block(10);
}
__attribute__((noinline)) void _PyFunction_Vectorcall(unsigned long n) { _PyEval_EvalFrameDefault(n); sink ^= n; }
int main(int argc, char **argv) { (void)argv; _PyEval_EvalFrameDefault(argc); return 0; }
"""

WORK, MODULE = 0x7000_0000_0100, 0x7000_0000_0200
CODES = {
    (PID, WORK): FakeCode("work", "Worker.work", "/srv/app/worker.py", 10, {0x40: 14}),
    (PID, MODULE): FakeCode("<module>", "<module>", "/srv/app/main.py", 1, {0x10: 30}),
}


@pytest.fixture(scope="module")
def fake_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None or shutil.which("nm") is None:
        pytest.skip("gcc and binutils are needed to build the stand-in interpreter")
    out = tmp_path_factory.mktemp("fake_python")
    src = out / "python.c"
    src.write_text(FAKE_INTERPRETER_C)
    binary = out / "python3.12"
    flags = ("-O0", "-fno-omit-frame-pointer", "-fno-inline", "-fPIE", "-pie", "-Wl,--build-id=sha1")
    subprocess.run(
        ["gcc", *flags, "-o", str(binary), str(src)],
        check=True,
        capture_output=True,
    )
    return binary


@pytest.fixture
def python_process(fake_python: Path, maps_for: MapsFor, add_fake_process: AddFakeProcess) -> Path:
    add_fake_process(PID, maps_for(fake_python, PIE_BASE), comm="python3", exe=fake_python)
    return fake_python


def native_stack(fake_python: Path, nm_functions: NmFunctions, cold: bool) -> Stack:
    """compress_block <- (eval.cold | eval) <- vectorcall <- eval <- main, as return addresses."""
    nm = nm_functions(fake_python)
    inner = nm["_PyEval_EvalFrameDefault.cold"][0] + 5 if cold else nm["_PyEval_EvalFrameDefault"][0] + 9
    addresses = (
        nm["compress_block"][0] + 4,
        inner,
        nm["_PyFunction_Vectorcall"][0] + 9,
        nm["_PyEval_EvalFrameDefault"][0] + 9,
        nm["main"][0] + 9,
    )
    return Stack(StackStatus.OK, tuple(PIE_BASE + a for a in addresses))


def python_symbolizer(fake_proc: Path) -> Symbolizer:
    codes = FakeCodes(dict(CODES), {PID: ("cpython", "3.12.1")})
    symbolizer = Symbolizer(ProcessRegistry(fake_proc), python=codes)
    symbolizer.processes.observe_process(PID)
    return symbolizer


def run(symbolizer: Symbolizer, stack: Stack, python: InterpreterStack) -> Profile:
    key = SampleKey(pid=PID, tid=PID, cpu=0, kernel=EMPTY_STACK, user=stack, python=python)
    sample = AggregatedSample(key=key, thread_name="python3", values=(4,), timestamps_mono_ns=(1_500,) * 4)
    return symbolizer.symbolize(IntervalProfile(SPEC, 1_000, 2_000, 1_700_000_000_000_000_000, (sample,)))


@pytest.mark.parametrize("cold", [False, True], ids=["hot", "cold"])
def test_eval_frames_become_the_python_frames_they_ran(
    python_process: Path, fake_proc: Path, nm_functions: NmFunctions, cold: bool
) -> None:
    stack = native_stack(python_process, nm_functions, cold)
    python = InterpreterStack(
        InterpreterStatus.OK, walk(frame(WORK, 0x40), shim(0x7FFE_1000), frame(MODULE, 0x10), shim(0x7FFE_2000))
    )
    symbolizer = python_symbolizer(fake_proc)
    profile = run(symbolizer, stack, python)
    frames = profile.samples[0].frames
    assert [f.function for f in frames] == [
        "compress_block",
        "Worker.work",
        "_PyFunction_Vectorcall",
        "<module>",
        "main",
    ]
    assert [f.kind for f in frames] == [
        FrameKind.NATIVE,
        FrameKind.PYTHON,
        FrameKind.NATIVE,
        FrameKind.PYTHON,
        FrameKind.NATIVE,
    ]
    interpreter = frames[0].mapping
    assert interpreter is not None and interpreter.path == str(python_process)
    assert frames[1].mapping == interpreter and frames[1].source == PythonSource("work", "/srv/app/worker.py", 10, 14)
    process = profile.processes[PID]
    assert (process.runtime_name, process.runtime_version) == ("cpython", "3.12.1")
    stats = symbolizer.python.stats
    assert stats.stacks == {MergeOutcome.MERGED: 1} and (stats.frames_resolved, stats.frames_unresolved) == (2, 0)


def test_a_non_python_process_has_no_runtime_labels(
    python_process: Path, fake_proc: Path, nm_functions: NmFunctions
) -> None:
    stack = native_stack(python_process, nm_functions, cold=False)
    symbolizer = Symbolizer(ProcessRegistry(fake_proc), python=FakeCodes())
    profile = run(symbolizer, stack, InterpreterStack(InterpreterStatus.NONE))
    assert [f.function for f in profile.samples[0].frames][1] == "_PyEval_EvalFrameDefault"
    process = profile.processes[PID]
    assert (process.runtime_name, process.runtime_version) == ("", "")
    assert not symbolizer.python.stats.stacks
