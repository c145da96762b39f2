"""Process stage: the per-version CPython layouts against the interpreters' own headers and memory.

Each installed interpreter's headers are compiled into tests/unit/fixtures/python_offsets.c, which
prints every field offsetof() knows; the table must agree field by field (and say NO_FIELD for every
field the version lacks). 3.13's `_PyRuntime.debug_offsets`, read by the interpreter from its own memory,
must parse to the 3.13 table. Bad cookies, unknown versions, truncation and shifted formats are errors.
"""

from __future__ import annotations

import dataclasses
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from agent.process.python.layouts import (
    DEBUG_COOKIE,
    NO_FIELD,
    PY313,
    LayoutError,
    PythonLayout,
    debug_offsets_size,
    layout_for_version,
    layout_from_debug_offsets,
)
from tests.support.interpreters import Interpreter, installed, require_versions

FIXTURE = Path(__file__).parent / "fixtures" / "python_offsets.c"
INTERPRETERS = installed()
# Fields that are not offsets, or are constants every layout has.
NOT_OFFSETS = {"version", "free_threaded", "instr_is_int", "code_tagged"}


def _table_for(version: tuple[int, int]) -> PythonLayout:
    return PY313 if version == (3, 13) else layout_for_version(version)


def _header_offsets(interpreter: Interpreter, tmp_path: Path) -> dict[str, int]:
    include = interpreter.include_dir()
    if not (include / "internal" / "pycore_runtime.h").exists():
        pytest.skip(f"{interpreter.label}: no internal headers under {include}")
    binary = tmp_path / f"offsets-{interpreter.label}"
    subprocess.run(
        ["gcc", "-Wall", "-Werror", f"-I{include}", f"-I{include / 'internal'}", str(FIXTURE), "-o", str(binary)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True, timeout=30).stdout
    return {name: int(value) for name, value in (line.split("=") for line in out.split())}


def test_interpreters_required_in_ci() -> None:
    require_versions(INTERPRETERS)
    assert all((3, 10) <= i.minor <= (3, 13) for i in INTERPRETERS)


@pytest.mark.parametrize("interpreter", INTERPRETERS, ids=[i.label for i in INTERPRETERS])
def test_table_matches_the_headers(interpreter: Interpreter, tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to compile against the interpreter's headers")
    printed = _header_offsets(interpreter, tmp_path)
    table = _table_for(interpreter.minor)
    assert table.version == interpreter.minor
    fields = {f.name: getattr(table, f.name) for f in dataclasses.fields(table) if f.name not in NOT_OFFSETS}
    assert set(printed) <= set(fields), set(printed) - set(fields)
    mismatched = {name: (printed[name], fields[name]) for name in printed if printed[name] != fields[name]}
    assert not mismatched, f"{interpreter.label}: header value, table value: {mismatched}"
    absent = {name: value for name, value in fields.items() if name not in printed and value != NO_FIELD}
    assert not absent, f"{interpreter.label}: fields the headers lack must be NO_FIELD: {absent}"
    assert table.instr_is_int == (interpreter.minor == (3, 10))
    assert table.instruction_kind == {(3, 10): "f_lasti", (3, 11): "prev_instr", (3, 12): "prev_instr"}.get(
        interpreter.minor, "instr_ptr"
    )


def _own_debug_offsets(interpreter: Interpreter) -> bytes:
    script = (
        "import ctypes, sys\n"
        "address = ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi, '_PyRuntime'))\n"
        f"sys.stdout.write(ctypes.string_at(address, {debug_offsets_size((3, 13))}).hex())\n"
    )
    out = subprocess.run([str(interpreter.executable), "-c", script], check=True, capture_output=True, text=True)
    return bytes.fromhex(out.stdout)


@pytest.mark.parametrize("interpreter", [i for i in INTERPRETERS if i.minor >= (3, 13)], ids=lambda i: i.label)
def test_debug_offsets_of_a_live_313_parse_to_the_table(interpreter: Interpreter) -> None:
    layout = layout_from_debug_offsets(_own_debug_offsets(interpreter))
    assert layout == PY313
    assert layout.runtime_autotss_key == PY313.runtime_autotss_key != NO_FIELD


def _debug_offsets_313() -> bytearray:
    """A synthetic 3.13.0 `_Py_DebugOffsets` holding the 3.13 table's values (the parser's own format)."""
    fields = {
        "version": 0x030D00F0,
        "runtime_state.size": PY313.runtime_size,
        "runtime_state.interpreters_head": PY313.runtime_interpreters_head,
        "interpreter_state.next": PY313.interp_next,
        "interpreter_state.threads_head": PY313.interp_threads_head,
        "thread_state.prev": 0,
        "thread_state.next": 8,
        "thread_state.interp": 16,
        "thread_state.current_frame": 72,
        "thread_state.thread_id": 152,
        "thread_state.native_thread_id": 160,
        "interpreter_frame.previous": 8,
        "interpreter_frame.instr_ptr": 56,
        "interpreter_frame.owner": 70,
        "code_object.size": 208,
        "code_object.filename": 112,
        "code_object.name": 120,
        "code_object.qualname": 128,
        "code_object.linetable": 136,
        "code_object.firstlineno": 68,
        "code_object.co_code_adaptive": 200,
        "pyobject.size": 16,
        "pyobject.ob_type": 8,
        "type_object.tp_name": 24,
        "tuple_object.ob_size": 16,
        "bytes_object.ob_size": 16,
        "bytes_object.ob_sval": 32,
        "unicode_object.state": 32,
        "unicode_object.length": 16,
        "unicode_object.asciiobject_size": 40,
    }
    from agent.process.python.layouts import _GROUPS_313

    names = [f"{g}.{f}" if g != "head" else f for g, fs in _GROUPS_313 for f in fs]
    values = [fields.get(name, 0) for name in names]
    return bytearray(DEBUG_COOKIE + struct.pack(f"<{len(values)}Q", *values))


def test_synthetic_313_offsets_parse() -> None:
    assert layout_from_debug_offsets(bytes(_debug_offsets_313())) == PY313


def test_bad_cookie() -> None:
    raw = _debug_offsets_313()
    raw[0:8] = b"xdebugpz"
    with pytest.raises(LayoutError) as err:
        layout_from_debug_offsets(bytes(raw))
    assert err.value.reason == "bad_cookie"


def test_unknown_version_and_truncation() -> None:
    raw = _debug_offsets_313()
    raw[8:16] = struct.pack("<Q", 0x030F00A0)  # 3.15
    with pytest.raises(LayoutError) as err:
        layout_from_debug_offsets(bytes(raw))
    assert err.value.reason == "unknown_format"
    with pytest.raises(LayoutError) as err:
        layout_from_debug_offsets(bytes(_debug_offsets_313()[:200]))
    assert err.value.reason == "truncated"
    with pytest.raises(LayoutError) as err:
        layout_from_debug_offsets(b"xdebugpy")
    assert err.value.reason == "truncated"


def test_a_shifted_format_is_refused() -> None:
    """An extra field in an early group (a format this parser does not know) breaks the anchors."""
    raw = _debug_offsets_313()
    shifted = raw[:200] + struct.pack("<Q", 0) + raw[200:-8]
    with pytest.raises(LayoutError) as err:
        layout_from_debug_offsets(bytes(shifted))
    assert err.value.reason == "unknown_format"


def test_a_313_runtime_unlike_the_table_gets_no_tss_key() -> None:
    raw = _debug_offsets_313()
    raw[16 + 8 : 24 + 8] = struct.pack("<Q", PY313.runtime_size + 64)  # runtime_state.size
    layout = layout_from_debug_offsets(bytes(raw))
    assert layout.runtime_size == PY313.runtime_size + 64
    assert layout.runtime_autotss_key == NO_FIELD
    assert layout.interp_threads_head == PY313.interp_threads_head


def test_314_format_free_threaded() -> None:
    """3.14's format (the stored 3.14 source's): tagged f_executable; 3.14t moves the str state bits."""
    from agent.process.python.layouts import _GROUPS_314

    values = {"version": 0x030E00F0, "free_threaded": 1}
    values.update(
        {
            "runtime_state.interpreters_head": 800,
            "interpreter_state.threads_head": 9000,
            "thread_state.current_frame": 80,
            "interpreter_frame.instr_ptr": 56,
            "code_object.size": 240,
            "code_object.name": 136,
            "code_object.filename": 128,
            "code_object.qualname": 144,
            "code_object.linetable": 152,
            "pyobject.size": 32,
            "pyobject.ob_type": 24,
            "type_object.tp_name": 40,
            "tuple_object.ob_size": 32,
            "bytes_object.ob_size": 32,
            "bytes_object.ob_sval": 48,
            "unicode_object.length": 32,
            "unicode_object.asciiobject_size": 64,
        }
    )
    names = [f"{g}.{f}" if g != "head" else f for g, fs in _GROUPS_314 for f in fs]
    raw = DEBUG_COOKIE + struct.pack(f"<{len(names)}Q", *(values.get(n, 0) for n in names))
    layout = layout_from_debug_offsets(raw)
    assert (layout.version, layout.free_threaded, layout.code_tagged) == ((3, 14), True, True)
    assert (layout.object_type, layout.type_name, layout.bytes_data) == (24, 40, 48)
    assert (layout.unicode_kind_shift, layout.unicode_ascii_bit, layout.unicode_compact_data) == (8, 12, 80)
    assert layout.runtime_autotss_key == NO_FIELD
    assert len(raw) == debug_offsets_size((3, 14))


def test_unsupported_table_version() -> None:
    for version in ((3, 9), (3, 13), (2, 7)):
        with pytest.raises(LayoutError) as err:
            layout_for_version(version)
        assert err.value.reason == "unsupported_version"
