"""Process stage: reading code objects and frames out of every installed CPython, checked against the child.

For each interpreter (Debian's 3.11 and every pyenv 3.10-3.13; tests/support/interpreters.py) a child
imports large stdlib modules (`_pydecimal`, `typing`, `argparse`, `inspect`), collects every code object
it can reach (compiled module code with its nested co_consts, and the functions the import ran), writes
for each its id, names,
file name, first line and `co_lines()`, and blocks in `sys.stdin.read()` three Python calls deep. Our
reader, from outside, must agree on every name, qualname, file name and first line, and on the line of
EVERY instruction (each even byte offset of each co_lines range, None as 0). The blocked call stack is
then walked from its leaf `_PyInterpreterFrame` (3.10: PyFrameObject) with the layout's frame offsets,
and `line_for` of each frame's raw instruction must give the line Python reports for that frame.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.process.memory import ProcessMemory
from agent.process.python.layouts import (
    NO_FIELD,
    PythonLayout,
    debug_offsets_size,
    layout_for_version,
    layout_from_debug_offsets,
)
from agent.process.python.objects import CodeInfo, read_code
from tests.support.interpreters import Interpreter, installed, require_versions

INTERPRETERS = installed()
PY_FRAME_OBJECT_F_FRAME = 24  # 3.11+ PyFrameObject: {PyObject_HEAD; f_back; struct _PyInterpreterFrame *f_frame}

CHILD = r"""
import ctypes, json, sys, types
import _pydecimal, typing, argparse, inspect

def walk(code, out, seen):
    if id(code) in seen:
        return
    seen.add(id(code))
    out.append(code)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            walk(const, out, seen)

codes, seen = [], set()
for module in (_pydecimal, typing, argparse, inspect):
    with open(module.__file__) as source:
        walk(compile(source.read(), module.__file__, "exec"), codes, seen)
    for value in vars(module).values():
        for item in [value, *vars(value).values()] if isinstance(value, type) else [value]:
            code = getattr(item, "__code__", None)
            if isinstance(code, types.CodeType):
                walk(code, codes, seen)

def describe(code):
    return [id(code), code.co_name, getattr(code, "co_qualname", code.co_name), code.co_filename,
            code.co_firstlineno, [list(r) for r in code.co_lines()]]

def dump(frame):
    chain = []
    while frame is not None:
        chain.append([id(frame), id(frame.f_code), frame.f_lineno])
        frame = frame.f_back
    runtime = 0
    if sys.version_info >= (3, 13):
        runtime = ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi, "_PyRuntime"))
    with open(sys.argv[1], "w") as out:
        out.write(json.dumps({"code_type": id(types.CodeType), "runtime": runtime, "stack": chain}) + "\n")
        for code in codes:
            out.write(json.dumps(describe(code)) + "\n")
    print("ready", flush=True)

def leaf():
    dump(sys._getframe()); sys.stdin.read()

def middle():
    return leaf()

def outer():
    return middle()

outer()
"""


@dataclass
class Agreement:
    codes: int = 0
    instructions: int = 0
    mismatched_codes: list[str] = field(default_factory=list)
    mismatched_lines: int = 0


@pytest.fixture(params=INTERPRETERS, ids=[i.label for i in INTERPRETERS])
def child(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Interpreter, int, Path]]:
    interpreter: Interpreter = request.param
    out = tmp_path / "codes.jsonl"
    proc = subprocess.Popen(
        [str(interpreter.executable), "-c", CHILD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield interpreter, proc.pid, out
    finally:
        proc.kill()
        proc.wait()


def test_interpreters_required_in_ci() -> None:
    require_versions(INTERPRETERS)


def _layout(interpreter: Interpreter, memory: ProcessMemory, runtime: int) -> PythonLayout:
    if interpreter.minor >= (3, 13):
        return layout_from_debug_offsets(memory.read(runtime, debug_offsets_size(interpreter.minor)))
    return layout_for_version(interpreter.minor)


def _compare(info: CodeInfo, expected: list[object], agreement: Agreement) -> None:
    _, name, qualname, filename, first_line, ranges = expected
    if (info.name, info.qualname, info.filename, info.first_line) != (name, qualname, filename, first_line):
        agreement.mismatched_codes.append(f"{qualname}: read {info.qualname!r} {info.filename!r} {info.first_line}")
    assert isinstance(ranges, list)
    for start, end, line in ranges:
        for offset in range(start, end, 2):
            agreement.instructions += 1
            raw = offset // 2 if info.instruction_kind == "f_lasti" else info.code_start + offset
            if info.line_for(raw) != (line or 0):
                agreement.mismatched_lines += 1


def test_every_code_object_and_instruction_agrees(child: tuple[Interpreter, int, Path]) -> None:
    interpreter, pid, out = child
    header, *codes = (json.loads(line) for line in out.read_text().splitlines())
    agreement = Agreement()
    with ProcessMemory(pid) as memory:
        layout = _layout(interpreter, memory, header["runtime"])
        for expected in codes:
            info = read_code(memory, layout, expected[0], header["code_type"])
            agreement.codes += 1
            _compare(info, expected, agreement)
    print(
        f"\n{interpreter.label}: {agreement.codes} code objects, {agreement.instructions} instructions, "
        f"{len(agreement.mismatched_codes)} code mismatches, {agreement.mismatched_lines} line mismatches"
    )
    assert agreement.codes > 1000 and agreement.instructions > 40000
    assert not agreement.mismatched_codes, agreement.mismatched_codes[:5]
    assert agreement.mismatched_lines == 0


def _frames(memory: ProcessMemory, layout: PythonLayout, leaf_frame_object: int) -> Iterator[tuple[int, int]]:
    """(code address, raw instruction) of each Python frame from the leaf, as the BPF walker reads them."""
    # 3.10's frame object is the frame; 3.11+ frame objects point at the _PyInterpreterFrame.
    frame = leaf_frame_object if layout.instr_is_int else memory.read_ptr(leaf_frame_object + PY_FRAME_OBJECT_F_FRAME)
    for _ in range(64):
        if frame == 0:
            return
        owner = memory.read(frame + layout.frame_owner, 1)[0] if layout.frame_owner != NO_FIELD else -1
        if owner != layout.owner_cstack:  # 3.12+ shim frames carry no code
            code = memory.read_ptr(frame + layout.frame_code) & (~7 if layout.code_tagged else ~0)
            raw = memory.read_i32(frame + layout.frame_instr) if layout.instr_is_int else None
            yield code, raw if raw is not None else memory.read_ptr(frame + layout.frame_instr)
        frame = memory.read_ptr(frame + layout.frame_previous)


def test_blocked_stack_lines(child: tuple[Interpreter, int, Path]) -> None:
    interpreter, pid, out = child
    header = json.loads(out.read_text().splitlines()[0])
    with ProcessMemory(pid) as memory:
        layout = _layout(interpreter, memory, header["runtime"])
        walked = [
            (code, read_code(memory, layout, code, header["code_type"]).line_for(raw))
            for code, raw in _frames(memory, layout, header["stack"][0][0])
        ]
    expected = [(code, line) for _, code, line in header["stack"]]
    assert walked == expected, f"{interpreter.label} ({layout.instruction_kind})"
    assert len(walked) == 4  # leaf, middle, outer, <module>


def test_code_type_check(child: tuple[Interpreter, int, Path]) -> None:
    """A str object is not a code object: ob_type says so before anything else is read."""
    from agent.process.python.objects import CodeErrorReason, CodeReadError

    interpreter, pid, out = child
    header, first, *_ = (json.loads(line) for line in out.read_text().splitlines()[:2])
    with ProcessMemory(pid) as memory:
        layout = _layout(interpreter, memory, header["runtime"])
        name_address = memory.read_ptr(first[0] + layout.code_name)
        with pytest.raises(CodeReadError) as err:
            read_code(memory, layout, name_address, header["code_type"])
        assert err.value.reason == CodeErrorReason.NOT_CODE
        assert ctypes.sizeof(ctypes.c_void_p) == 8
