"""Process stage: where CPython keeps what a profiler reads, per interpreter version (3.10 to 3.14).

This module owns `PythonLayout`, the byte offsets of the fields the BPF walker and the user-space
readers follow (runtime -> interpreters -> thread states -> frames -> code objects -> strings), the
tables for 3.10, 3.11 and 3.12 (`layout_for_version`), and `layout_from_debug_offsets`, which parses
the `_Py_DebugOffsets` that 3.13+ keeps at the start of `_PyRuntime` (cookie `xdebugpy`).

The tables were printed by `offsetof` from each minor's own headers (with `Py_BUILD_CORE`, the internal
ones); tests/unit/test_python_layouts.py compiles that program again against every installed pyenv
build and compares. A field a version lacks is `NO_FIELD`. 3.13's debug offsets do not include the
gilstate TSS key (`_PyRuntime.autoTSSkey`): the 3.13 table supplies it, used only when the process's
debug offsets agree with that table (same `_PyRuntimeState` size), so a differently built runtime gets
`NO_FIELD` rather than a wrong guess. 3.14+ is walked through the python_threads map (docs/python.md),
so its key is `NO_FIELD` too.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

from agent.errors import AgentError

NO_FIELD = 0xFFFF  # the field does not exist in this version (the BPF side tests for it)

DEBUG_COOKIE = b"xdebugpy"
FINGERPRINT_WORDS = 8  # bpf/common.h PYTHON_FINGERPRINT_WORDS
# 3.10's frame is a PyFrameObject; its f_lasti is an int index in code units, -1 before the first one.
# 3.11+ frames hold a pointer into co_code_adaptive instead.


@dataclass(frozen=True, slots=True)
class PythonLayout:
    """Byte offsets of the fields the walker and readers use in one interpreter version."""

    version: tuple[int, int]
    free_threaded: bool = False
    # _PyRuntimeState
    runtime_interpreters_head: int = NO_FIELD
    runtime_autotss_key: int = NO_FIELD  # the gilstate Py_tss_t; its pthread key is at +tss_key
    tss_key: int = 4  # Py_tss_t: {int _is_initialized; pthread_key_t _key;}
    runtime_size: int = NO_FIELD  # sizeof(_PyRuntimeState) where known (the 3.13 cross-check)
    # PyInterpreterState
    interp_next: int = NO_FIELD
    interp_threads_head: int = NO_FIELD
    # PyThreadState
    tstate_prev: int = NO_FIELD
    tstate_next: int = NO_FIELD
    tstate_interp: int = NO_FIELD
    tstate_thread_id: int = NO_FIELD  # pthread_t
    tstate_native_thread_id: int = NO_FIELD  # the kernel tid (3.11+)
    tstate_frame: int = NO_FIELD  # 3.10 frame, 3.11/3.12 cframe, 3.13+ current_frame
    cframe_current_frame: int = NO_FIELD  # _PyCFrame.current_frame (3.11/3.12)
    # frames: PyFrameObject (3.10), _PyInterpreterFrame (3.11+)
    frame_previous: int = NO_FIELD
    frame_code: int = NO_FIELD  # f_code, 3.13+ f_executable
    frame_instr: int = NO_FIELD  # f_lasti (3.10), prev_instr (3.11/3.12), instr_ptr (3.13+)
    frame_is_entry: int = NO_FIELD  # a char (3.11)
    frame_owner: int = NO_FIELD  # a char (3.12+)
    owner_cstack: int = NO_FIELD  # the FRAME_OWNED_BY_CSTACK value (3.12+)
    instr_is_int: bool = False  # frame_instr is a C int (3.10) rather than a pointer
    code_tagged: bool = False  # f_executable is a _PyStackRef (3.14): clear the low 3 bits
    # objects
    object_type: int = 8  # ob_type
    type_name: int = 24  # tp_name
    var_size: int = 16  # ob_size (for a code object: its length in code units, 3.11+)
    # PyCodeObject
    code_name: int = NO_FIELD
    code_qualname: int = NO_FIELD
    code_filename: int = NO_FIELD
    code_firstlineno: int = NO_FIELD  # an int
    # The code object's fingerprint window (bpf/common.h python_fingerprint): 8 words of fields CPython
    # sets when it creates the object and never changes (counts, co_firstlineno, the addresses of its own
    # tuples and file name, 3.12+'s co_version), skipping 3.11's co_warmup and the cached fields.
    code_fingerprint: int = NO_FIELD
    code_linetable: int = NO_FIELD  # PyBytes* (3.10 co_linetable, 3.11+ the location table)
    code_code_adaptive: int = NO_FIELD  # the inline bytecode (3.11+)
    code_code: int = NO_FIELD  # co_code, a PyBytes* (3.10)
    # str: PyASCIIObject / PyCompactUnicodeObject
    unicode_length: int = 16
    unicode_state: int = 32  # the state bit field, a 32-bit word
    unicode_ascii_data: int = NO_FIELD  # sizeof(PyASCIIObject): compact ASCII data starts here
    unicode_compact_data: int = NO_FIELD  # sizeof(PyCompactUnicodeObject): other compact data starts here
    unicode_kind_shift: int = 2  # state bits: interned:2 (3.14t: a byte), kind:3, compact:1, ascii:1
    unicode_compact_bit: int = 5
    unicode_ascii_bit: int = 6
    unicode_ready_bit: int = NO_FIELD  # 3.10/3.11 only: a compact str is always ready, but must say so
    # bytes
    bytes_data: int = 32  # ob_sval

    @property
    def instruction_kind(self) -> str:
        """What `frame_instr` holds: 'f_lasti' (3.10), 'prev_instr' (3.11/3.12) or 'instr_ptr' (3.13+)."""
        if self.instr_is_int:
            return "f_lasti"
        return "prev_instr" if self.version < (3, 13) else "instr_ptr"

    def code_read_size(self) -> int:
        """How many bytes of a code object cover every field this layout reads from it."""
        fields = (
            self.object_type,
            self.var_size,
            self.code_name,
            self.code_qualname,
            self.code_filename,
            self.code_firstlineno,
            self.code_fingerprint + 8 * (FINGERPRINT_WORDS - 1) if self.code_fingerprint != NO_FIELD else NO_FIELD,
            self.code_linetable,
            self.code_code,
        )
        return max(f for f in fields if f != NO_FIELD) + 8


class LayoutError(AgentError):
    """No layout for this interpreter: `reason` is bad_cookie, unknown_format, truncated or unsupported_version."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"python layout: {reason}: {detail}")
        self.reason = reason


# Printed by offsetof() from each version's headers (3.10.13, 3.11.7, 3.12.1; Debian's 3.11.2 agrees).
PY310 = PythonLayout(
    version=(3, 10),
    runtime_size=672,
    runtime_interpreters_head=32,
    runtime_autotss_key=584,
    interp_next=0,
    interp_threads_head=8,  # tstate_head
    tstate_prev=0,
    tstate_next=8,
    tstate_interp=16,
    tstate_thread_id=176,
    tstate_frame=24,
    frame_previous=24,  # f_back
    frame_code=32,
    frame_instr=96,  # f_lasti
    instr_is_int=True,
    code_name=112,
    code_filename=104,
    code_firstlineno=40,
    code_fingerprint=16,  # co_argcount .. co_varnames
    code_linetable=120,
    code_code=48,
    unicode_ascii_data=48,
    unicode_compact_data=72,
    unicode_ready_bit=7,
)

PY311 = PythonLayout(
    version=(3, 11),
    runtime_size=166688,
    runtime_interpreters_head=40,
    runtime_autotss_key=592,
    interp_next=0,
    interp_threads_head=16,
    tstate_prev=0,
    tstate_next=8,
    tstate_interp=16,
    tstate_thread_id=152,
    tstate_native_thread_id=160,
    tstate_frame=56,  # cframe
    cframe_current_frame=8,
    frame_previous=48,
    frame_code=32,
    frame_instr=56,  # prev_instr
    frame_is_entry=68,
    code_name=120,
    code_qualname=128,
    code_filename=112,
    code_firstlineno=72,
    code_fingerprint=56,  # co_argcount .. co_filename
    code_linetable=136,
    code_code_adaptive=184,
    unicode_ascii_data=48,
    unicode_compact_data=72,
    unicode_ready_bit=7,
)

PY312 = PythonLayout(
    version=(3, 12),
    runtime_size=459944,
    runtime_interpreters_head=40,
    runtime_autotss_key=1544,
    interp_next=0,
    interp_threads_head=72,
    tstate_prev=0,
    tstate_next=8,
    tstate_interp=16,
    tstate_thread_id=136,
    tstate_native_thread_id=144,
    tstate_frame=56,  # cframe
    cframe_current_frame=0,
    frame_previous=8,
    frame_code=0,
    frame_instr=56,  # prev_instr
    frame_owner=70,
    owner_cstack=3,
    code_name=120,
    code_qualname=128,
    code_filename=112,
    code_firstlineno=68,
    code_fingerprint=56,  # co_posonlyargcount .. co_filename (co_version among them)
    code_linetable=136,
    code_code_adaptive=192,
    unicode_ascii_data=40,
    unicode_compact_data=56,
)

# 3.13 (3.13.0): what its debug offsets must say, and the one field they lack (the TSS key).
PY313 = PythonLayout(
    version=(3, 13),
    runtime_interpreters_head=632,
    runtime_autotss_key=2160,
    runtime_size=283320,
    interp_next=7264,
    interp_threads_head=7344,
    tstate_prev=0,
    tstate_next=8,
    tstate_interp=16,
    tstate_thread_id=152,
    tstate_native_thread_id=160,
    tstate_frame=72,  # current_frame
    frame_previous=8,
    frame_code=0,  # f_executable
    frame_instr=56,  # instr_ptr
    frame_owner=70,
    owner_cstack=3,
    code_name=120,
    code_qualname=128,
    code_filename=112,
    code_firstlineno=68,
    code_fingerprint=56,  # co_posonlyargcount .. co_filename (co_version among them)
    code_linetable=136,
    code_code_adaptive=200,
    unicode_ascii_data=40,
    unicode_compact_data=56,
)

_TABLES: dict[tuple[int, int], PythonLayout] = {(3, 10): PY310, (3, 11): PY311, (3, 12): PY312}
FRAME_OWNED_BY_CSTACK = 3  # 3.12+ (pycore_frame.h)


def layout_for_version(version: tuple[int, int]) -> PythonLayout:
    """The table layout of a 3.10-3.12 interpreter; 3.13+ come from `layout_from_debug_offsets`."""
    table = _TABLES.get((version[0], version[1]))
    if table is None:
        raise LayoutError("unsupported_version", f"no offset table for {version[0]}.{version[1]}")
    return table


# _Py_DebugOffsets is a cookie, then uint64 fields grouped in structs, each struct's first field its
# `size`. The groups each format has, in order, with their field names (3.13.0: pycore_runtime.h;
# 3.14: pycore_debug_offsets.h as of the 3.14 betas, with threads_main, stackpointer, set_object,
# gen_object and debugger_support).
def _fields(names: str) -> tuple[str, ...]:
    return tuple(names.split())


_GROUPS_313: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("head", _fields("version free_threaded")),
    ("runtime_state", _fields("size finalizing interpreters_head")),
    (
        "interpreter_state",
        _fields(
            "size id next threads_head gc imports_modules sysdict builtins ceval_gil gil_runtime_state"
            " gil_runtime_state_enabled gil_runtime_state_locked gil_runtime_state_holder"
        ),
    ),
    (
        "thread_state",
        _fields("size prev next interp current_frame thread_id native_thread_id datastack_chunk status"),
    ),
    ("interpreter_frame", _fields("size previous executable instr_ptr localsplus owner")),
    (
        "code_object",
        _fields(
            "size filename name qualname linetable firstlineno argcount localsplusnames localspluskinds"
            " co_code_adaptive"
        ),
    ),
    ("pyobject", _fields("size ob_type")),
    ("type_object", _fields("size tp_name tp_repr tp_flags")),
    ("tuple_object", _fields("size ob_item ob_size")),
    ("list_object", _fields("size ob_item ob_size")),
    ("dict_object", _fields("size ma_keys ma_values")),
    ("float_object", _fields("size ob_fval")),
    ("long_object", _fields("size lv_tag ob_digit")),
    ("bytes_object", _fields("size ob_size ob_sval")),
    ("unicode_object", _fields("size state length asciiobject_size")),
    ("gc", _fields("size collecting")),
)


def _groups_314() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """3.13's groups with what 3.14 inserted: threads_main, stackpointer, set_object, gen_object, debugger_support."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for name, fields in _GROUPS_313:
        if name == "interpreter_state":
            at = fields.index("threads_head") + 1
            fields = (*fields[:at], "threads_main", *fields[at:])
        elif name == "interpreter_frame":
            fields = (*fields, "stackpointer")
        out.append((name, fields))
        if name == "list_object":
            out.append(("set_object", _fields("size used table mask")))
    out.append(("gen_object", _fields("size gi_name gi_iframe gi_frame_state")))
    out.append(
        (
            "debugger_support",
            _fields(
                "eval_breaker remote_debugger_support remote_debugging_enabled debugger_pending_call"
                " debugger_script_path debugger_script_path_size"
            ),
        )
    )
    return tuple(out)


_GROUPS_314 = _groups_314()
_FORMATS: dict[tuple[int, int], tuple[tuple[str, tuple[str, ...]], ...]] = {(3, 13): _GROUPS_313, (3, 14): _GROUPS_314}


def debug_offsets_size(version: tuple[int, int]) -> int:
    """How many bytes of `_PyRuntime` to read for `version`'s debug offsets (the largest known format)."""
    groups = _FORMATS.get(version, _GROUPS_314)
    return len(DEBUG_COOKIE) + 8 * sum(len(fields) for _, fields in groups)


MAX_DEBUG_OFFSETS_SIZE = max(debug_offsets_size(v) for v in _FORMATS)


def _parse_groups(raw: bytes, groups: tuple[tuple[str, tuple[str, ...]], ...]) -> dict[str, int]:
    count = sum(len(fields) for _, fields in groups)
    needed = len(DEBUG_COOKIE) + 8 * count
    if len(raw) < needed:
        raise LayoutError("truncated", f"debug offsets need {needed} bytes, got {len(raw)}")
    values = struct.unpack_from(f"<{count}Q", raw, len(DEBUG_COOKIE))
    names = [f"{group}.{field}" if group != "head" else field for group, fields in groups for field in fields]
    return dict(zip(names, values, strict=True))


def _check_anchors(v: dict[str, int]) -> None:
    """Fields whose relations hold in every build: a misparsed (shifted) format breaks them."""
    obj = v["pyobject.size"]
    checks = {
        "ob_type is PyObject's last word": v["pyobject.ob_type"] == obj - 8,
        "tp_name follows ob_size": v["type_object.tp_name"] == obj + 8,
        "bytes ob_size follows the header": v["bytes_object.ob_size"] == obj,
        "tuple ob_size follows the header": v["tuple_object.ob_size"] == obj,
        "str length follows the header": v["unicode_object.length"] == obj,
        "ob_sval follows ob_shash": v["bytes_object.ob_sval"] == obj + 16,
        "free_threaded is a flag": v["free_threaded"] in (0, 1),
        "PyObject is 16 or 32 bytes": obj in (16, 32),
        "code fields inside the code object": max(
            v["code_object.filename"], v["code_object.name"], v["code_object.qualname"], v["code_object.linetable"]
        )
        < v["code_object.size"],
    }
    failed = [name for name, ok in checks.items() if not ok]
    if failed:
        raise LayoutError("unknown_format", "debug offsets fail: " + ", ".join(failed))


def layout_from_debug_offsets(raw: bytes) -> PythonLayout:
    """The layout `_PyRuntime.debug_offsets` (its first bytes, `raw`) describes: 3.13, and 3.14's known format."""
    if raw[: len(DEBUG_COOKIE)] != DEBUG_COOKIE:
        raise LayoutError("bad_cookie", f"expected {DEBUG_COOKIE!r}, got {raw[:8]!r}")
    if len(raw) < 16:
        raise LayoutError("truncated", f"debug offsets: {len(raw)} bytes")
    hexversion = struct.unpack_from("<Q", raw, 8)[0]
    version = (hexversion >> 24 & 0xFF, hexversion >> 16 & 0xFF)
    groups = _FORMATS.get(version)
    if groups is None:
        raise LayoutError("unknown_format", f"no debug offsets format for version {hexversion:#x}")
    values = _parse_groups(raw, groups)
    _check_anchors(values)
    return _layout_of(version, values)


def _layout_of(version: tuple[int, int], v: dict[str, int]) -> PythonLayout:
    free_threaded = bool(v["free_threaded"])
    ascii_size = v["unicode_object.asciiobject_size"]
    # 3.14t keeps `interned` in a byte of its own, so the other state bits start at bit 8.
    kind_shift = 8 if free_threaded and version >= (3, 14) else 2
    layout = PythonLayout(
        version=version,
        free_threaded=free_threaded,
        runtime_interpreters_head=v["runtime_state.interpreters_head"],
        runtime_size=v["runtime_state.size"],
        interp_next=v["interpreter_state.next"],
        interp_threads_head=v["interpreter_state.threads_head"],
        tstate_prev=v["thread_state.prev"],
        tstate_next=v["thread_state.next"],
        tstate_interp=v["thread_state.interp"],
        tstate_thread_id=v["thread_state.thread_id"],
        tstate_native_thread_id=v["thread_state.native_thread_id"],
        tstate_frame=v["thread_state.current_frame"],
        frame_previous=v["interpreter_frame.previous"],
        frame_code=v["interpreter_frame.executable"],
        frame_instr=v["interpreter_frame.instr_ptr"],
        frame_owner=v["interpreter_frame.owner"],
        owner_cstack=FRAME_OWNED_BY_CSTACK,
        code_tagged=version >= (3, 14),
        object_type=v["pyobject.ob_type"],
        type_name=v["type_object.tp_name"],
        var_size=v["tuple_object.ob_size"],
        code_name=v["code_object.name"],
        code_qualname=v["code_object.qualname"],
        code_filename=v["code_object.filename"],
        code_firstlineno=v["code_object.firstlineno"],
        # The debug offsets do not name the window: 3.12+ keeps co_posonlyargcount 12 bytes before it.
        code_fingerprint=v["code_object.firstlineno"] - 12,
        code_linetable=v["code_object.linetable"],
        code_code_adaptive=v["code_object.co_code_adaptive"],
        unicode_length=v["unicode_object.length"],
        unicode_state=v["unicode_object.state"],
        unicode_ascii_data=ascii_size,
        unicode_compact_data=ascii_size + 16,  # + utf8_length, utf8 (3.12+: no wstr)
        unicode_kind_shift=kind_shift,
        unicode_compact_bit=kind_shift + 3,
        unicode_ascii_bit=kind_shift + 4,
        bytes_data=v["bytes_object.ob_sval"],
    )
    return dataclasses.replace(layout, runtime_autotss_key=_autotss_key(layout))


def _autotss_key(layout: PythonLayout) -> int:
    """3.13's TSS key offset, when the debug offsets agree with the 3.13 table on every field they share."""
    if layout.version != (3, 13) or layout.free_threaded:
        return NO_FIELD
    known = dataclasses.replace(PY313, runtime_autotss_key=NO_FIELD)
    return PY313.runtime_autotss_key if layout == known else NO_FIELD
