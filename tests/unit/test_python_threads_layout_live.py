"""Process stage: the layout's runtime, interpreter and thread-state fields, followed in live children.

Each installed interpreter's child (with a second thread parked) reports from inside its thread state
address (PyThreadState_Get), thread ids and leaf frame object. From outside, with discover() and
read_layout(): _PyRuntime -> interpreters.head must be the tstate's interp; interp -> threads.head and
the next/prev links must list both threads' states; the tstate's thread_id and native_thread_id must be
the child's ids; its frame field (3.10 frame, 3.11/3.12 cframe->current_frame, 3.13 current_frame) must
be the leaf frame; and the gilstate TSS key read at runtime_autotss_key must be the pthread key under
which the child itself finds its tstate (pthread_getspecific, asked over stdin).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from agent.process.memory import ProcessMemory
from agent.process.python.discover import PythonRuntime, discover, read_layout
from agent.process.python.layouts import NO_FIELD
from tests.support.interpreters import Interpreter, installed

INTERPRETERS = installed()
PY_FRAME_OBJECT_F_FRAME = 24  # 3.11+ PyFrameObject.f_frame

CHILD = r"""
import ctypes, json, sys, threading
libc = ctypes.CDLL(None)
libc.pthread_getspecific.restype = ctypes.c_void_p
libc.pthread_getspecific.argtypes = [ctypes.c_uint]
ctypes.pythonapi.PyThreadState_Get.restype = ctypes.c_void_p
parked = threading.Event()
other = threading.Thread(target=parked.wait, daemon=True)
other.start()

def leaf():
    print(json.dumps({
        "tstate": ctypes.pythonapi.PyThreadState_Get(), "ident": threading.get_ident(),
        "native": threading.get_native_id(), "frame": id(sys._getframe()), "other_ident": other.ident,
    }), flush=True)
    key = int(sys.stdin.readline())
    print(libc.pthread_getspecific(key) or 0, flush=True)
    sys.stdin.read()

leaf()
"""


@pytest.fixture(params=INTERPRETERS, ids=[i.label for i in INTERPRETERS])
def child(request: pytest.FixtureRequest) -> Iterator[tuple[Interpreter, subprocess.Popen[str], dict[str, int]]]:
    interpreter: Interpreter = request.param
    proc = subprocess.Popen(
        [str(interpreter.executable), "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    try:
        yield interpreter, proc, json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def _thread_states(memory: ProcessMemory, head: int, next_at: int, prev_at: int) -> list[int]:
    states: list[int] = []
    previous, current = 0, head
    while current and len(states) < 16:
        assert memory.read_ptr(current + prev_at) == previous
        states.append(current)
        previous, current = current, memory.read_ptr(current + next_at)
    return states


def test_thread_state_fields(child: tuple[Interpreter, subprocess.Popen[str], dict[str, int]]) -> None:
    interpreter, proc, truth = child
    runtime = discover(proc.pid)
    assert isinstance(runtime, PythonRuntime)
    tstate = truth["tstate"]
    with ProcessMemory(proc.pid) as memory:
        lay = read_layout(memory, runtime)
        interp = memory.read_ptr(runtime.runtime + lay.runtime_interpreters_head)
        assert memory.read_ptr(tstate + lay.tstate_interp) == interp
        assert memory.read_ptr(interp + lay.interp_next) == 0  # the main interpreter only
        states = _thread_states(
            memory, memory.read_ptr(interp + lay.interp_threads_head), lay.tstate_next, lay.tstate_prev
        )
        assert tstate in states and len(states) == 2
        idents = {memory.read_u64(s + lay.tstate_thread_id) for s in states}
        assert idents == {truth["ident"], truth["other_ident"]}
        if lay.tstate_native_thread_id != NO_FIELD:
            assert memory.read_u64(tstate + lay.tstate_native_thread_id) == truth["native"]
        frame = memory.read_ptr(tstate + lay.tstate_frame)
        if lay.cframe_current_frame != NO_FIELD:
            frame = memory.read_ptr(frame + lay.cframe_current_frame)
        expected = truth["frame"] if lay.instr_is_int else memory.read_ptr(truth["frame"] + PY_FRAME_OBJECT_F_FRAME)
        assert frame == expected
        assert lay.runtime_autotss_key != NO_FIELD
        tss = runtime.runtime + lay.runtime_autotss_key
        assert memory.read_i32(tss) == 1  # _is_initialized
        key = memory.read_u32(tss + lay.tss_key)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{key}\n")
    proc.stdin.flush()
    assert int(proc.stdout.readline()) == tstate, f"{interpreter.label}: key {key}"
