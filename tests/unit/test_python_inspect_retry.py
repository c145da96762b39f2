"""Process stage: an interpreter inspected before its runtime is ready gets a verdict to retry, not a final one.

Each installed interpreter is started under `PTRACE_TRACEME`, so the kernel stops it right after its
exec: its image is mapped, but the dynamic loader has not run (pyenv's libpython is not mapped yet) and
`_PyRuntime` holds no interpreter (Debian's static python3.11). Inspected there with retries allowed, it
is INITIALIZING, counted by reason; let go and inspected again once it is ready, it is enabled. With
retries not allowed (the last attempt, and the default), the same inspection is final, as it always was.
A program that only looks like CPython stays final either way: garbage is no runtime being set up.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent.process.python.inspect import PythonInspector
from agent.process.python.proc import RETRY_REASONS, PythonState
from agent.process.python.runtime import discover_interpreter
from tests.support.interpreters import Interpreter, installed
from tests.unit.test_python_threads import FAKE_PYTHON_C

INTERPRETERS = installed()
IDS = [i.label for i in INTERPRETERS]
PTRACE_TRACEME = 0
PTRACE_DETACH = 17
READY = "import sys; print('ready', flush=True); sys.stdin.read()"

_libc = ctypes.CDLL(None, use_errno=True)


def _trace_me() -> None:  # runs in the child between fork and exec
    _libc.ptrace(PTRACE_TRACEME, 0, None, None)


@contextmanager
def stopped_at_exec(executable: Path) -> Iterator[subprocess.Popen[str]]:
    """The interpreter, stopped by the kernel right after its exec (it is this process's tracee)."""
    process = subprocess.Popen(
        [str(executable), "-c", READY],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=_trace_me,  # the test process has one thread here: fork then exec is safe
    )
    try:
        _, status = os.waitpid(process.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGTRAP, status
        yield process
    finally:
        process.kill()
        process.wait()


def _let_go(process: subprocess.Popen[str]) -> None:
    if _libc.ptrace(PTRACE_DETACH, process.pid, None, None) != 0:
        raise OSError(ctypes.get_errno(), "PTRACE_DETACH")
    assert process.stdout is not None and process.stdout.readline() == "ready\n"


@pytest.mark.parametrize("interpreter", INTERPRETERS, ids=IDS)
def test_a_runtime_not_ready_is_retried_until_enabled(interpreter: Interpreter) -> None:
    inspector = PythonInspector(discover_interpreter())
    with stopped_at_exec(interpreter.executable) as process:
        early = inspector.inspect(process.pid, retry=True)
        assert (early.state, early.retry, early.spec) == (PythonState.INITIALIZING, True, None), early
        # pyenv's: libpython is not mapped yet; Debian's static build: _PyRuntime has no interpreter.
        assert early.reason in ("no_symbols", "no_threads") and early.reason in RETRY_REASONS
        assert inspector.states()["initializing"] == 1
        assert inspector.retried == {early.reason: 1}
        final = inspector.inspect(process.pid)  # the default: a final verdict, as before retries existed
        assert final.state in (PythonState.NO_SYMBOLS, PythonState.VALIDATION_FAILED) and not final.retry
        assert final.reason == early.reason
        _let_go(process)
        ready = inspector.inspect(process.pid, retry=True)
        assert (ready.state, ready.retry) == (PythonState.ENABLED, False), ready
        assert ready.spec is not None
        assert inspector.states()["initializing"] == 0
        assert inspector.retried == {early.reason: 1}  # an enabled process is not counted as a retry
        assert inspector.same_image(process.pid)
    assert not inspector.same_image(process.pid)  # gone: whatever runs under the pid next is another image


@pytest.fixture(scope="module")
def fake_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fake-retry")
    (directory / "fake.c").write_text(FAKE_PYTHON_C)
    binary = directory / "python3.12"
    command = ["gcc", "-O0", "-rdynamic", "-o", str(binary), str(directory / "fake.c"), "-lpthread"]
    subprocess.run(command, check=True, timeout=60)
    return binary


@pytest.mark.parametrize(
    ("mode", "state", "reason"),
    [
        ("chain", PythonState.VALIDATION_FAILED, "bad_code_object"),
        ("garbage", PythonState.VALIDATION_FAILED, "bad_pointer"),
        ("zeros", PythonState.INITIALIZING, "no_threads"),  # an empty _PyRuntime: not set up (yet)
    ],
)
def test_garbage_is_never_walked_and_its_last_verdict_is_final(
    fake_python: Path, mode: str, state: PythonState, reason: str
) -> None:
    """Garbage that a torn read of a live process could also give (a bad pointer, a bad code object) is
    retried like a runtime not ready: native-only meanwhile, counted by reason, and final once retries
    run out (`retry=False`, the pipeline's last attempt)."""
    inspector = PythonInspector(discover_interpreter())
    with subprocess.Popen([str(fake_python), mode], stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
            early = inspector.inspect(process.pid, retry=True)
            final = inspector.inspect(process.pid, retry=False)
        finally:
            process.kill()
    assert (early.state, early.reason, early.retry, early.spec) == (state, reason, True, None), early
    assert inspector.retried == {reason: 1}
    expected = PythonState.VALIDATION_FAILED  # the zeros' last verdict: no thread states, for good
    assert (final.state, final.reason, final.retry, final.spec) == (expected, reason, False, None), final
