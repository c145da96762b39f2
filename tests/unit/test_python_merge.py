"""Tests for `agent.symbolize.python_merge`: segmenting per CPython version and the merge into native stacks.

Native frames are built by hand (the eval loop, the call machinery between eval calls, C extensions,
`main`), Python frames come from a `FakeCodes` code cache; each test states the stack it must give.
"""

from __future__ import annotations

import pytest

from agent.symbolize.markers import status_marker
from agent.symbolize.python_merge import (
    TRUNCATED,
    UNKNOWN_CODE,
    MergeCall,
    MergeOutcome,
    PythonMerger,
    SplitRule,
    segments,
    split_rule,
)
from agent.symbolize.types import Frame, FrameKind, MappingInfo, PythonSource
from agent.types import InterpreterStack, InterpreterStatus, Stack, StackStatus
from tests.support.python_codes import FakeCode, FakeCodes, frame, shim, walk

PID = 4242
PY = MappingInfo("/usr/bin/python3.12", 0x5600_0000_0000, 0x5600_0040_0000, 0x1000, "ab" * 20)
LIBZ = MappingInfo("/usr/lib/x86_64-linux-gnu/libz.so.1", 0x7F00_0000_0000, 0x7F00_0002_0000, 0, "cd" * 20)
EVAL_1 = Frame(FrameKind.NATIVE, 0x5600_0010_0010, "_PyEval_EvalFrameDefault", PY)
EVAL_2 = Frame(FrameKind.NATIVE, 0x5600_0010_0220, "_PyEval_EvalFrameDefault", PY)
EVAL_3 = Frame(FrameKind.NATIVE, 0x5600_0010_0330, "_PyEval_EvalFrameDefault", PY)
EVAL_COLD = Frame(FrameKind.NATIVE, 0x5600_0000_F010, "_PyEval_EvalFrameDefault.cold", PY)
VECTORCALL = Frame(FrameKind.NATIVE, 0x5600_0020_0010, "_PyFunction_Vectorcall", PY)
CFUNCTION = Frame(FrameKind.NATIVE, 0x5600_0020_0100, "cfunction_vectorcall_O", PY)
SORTED = Frame(FrameKind.NATIVE, 0x5600_0020_0200, "builtin_sorted", PY)
DEFLATE = Frame(FrameKind.NATIVE, 0x7F00_0000_1000, "deflate", LIBZ)
ZLIB_COMPRESS = Frame(FrameKind.NATIVE, 0x7F00_0000_2000, "zlib_compress", LIBZ)
MAIN = Frame(FrameKind.NATIVE, 0x5600_0030_0000, "main", PY)
USER_TRUNCATED = status_marker(StackStatus.TRUNCATED, "user")

# Code objects at 0x7000_0000_0x00 (8-aligned, so the low 3 bits are free for the walker's flags).
CODES = {
    0x7000_0000_0100: FakeCode("work", "Worker.work", "/srv/app/worker.py", 10, {0x40: 14, 0x60: 15}),
    0x7000_0000_0200: FakeCode("loop", "loop", "/srv/app/main.py", 3, {0x20: 5}),
    0x7000_0000_0300: FakeCode("<module>", "<module>", "/srv/app/main.py", 1, {0x10: 30}),
    0x7000_0000_0400: FakeCode("key", "sort_key.<locals>.key", "/srv/app/sorting.py", 7, {0x08: 8}),
    0x7000_0000_0500: FakeCode("fib", "fib", "/srv/app/fib.py", 20, {0x30: 22}),
}
WORK, LOOP, MODULE, KEY, FIB = sorted(CODES)
SHIM_A, SHIM_B = 0x7FFE_0000_1000, 0x7FFE_0000_2000


def codes(version: str = "3.12.1") -> FakeCodes:
    return FakeCodes({(PID, address): code for address, code in CODES.items()}, {PID: ("cpython", version)})


def merge(
    native: tuple[Frame, ...],
    words: tuple[int, ...],
    version: str = "3.12.1",
    status: InterpreterStatus = InterpreterStatus.OK,
    source: FakeCodes | None = None,
) -> tuple[tuple[Frame, ...], PythonMerger]:
    merger = PythonMerger(source if source is not None else codes(version))
    stack = Stack(StackStatus.OK, tuple(f.address for f in native))
    merged = merger.merge(PID, stack, native, InterpreterStack(status, words), MergeCall())
    return merged, merger


def names(frames: tuple[Frame, ...]) -> list[str]:
    return [f.function for f in frames]


def outcome(merger: PythonMerger) -> str:
    (only,) = merger.stats.stacks
    return only


# --- segmenting ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "rule"),
    [
        ("3.10.13", SplitRule.PER_FRAME),
        ("3.11.7", SplitRule.ENTRY),
        ("3.12.1", SplitRule.SHIM),
        ("3.13.0", SplitRule.SHIM),
        ("3.14.0a1", SplitRule.SHIM),
        ("3.9.18", None),
        ("2.7.18", None),
        ("", None),
        ("cpython", None),
    ],
)
def test_split_rule_by_version(version: str, rule: SplitRule | None) -> None:
    assert split_rule(version) is rule


def test_3_10_gives_every_frame_its_own_segment_and_masks_nothing_it_needs() -> None:
    words = walk(frame(WORK, 0x40), frame(LOOP, 0x20), frame(MODULE, 0x10))
    assert segments(words, SplitRule.PER_FRAME) == [[(WORK, 0x40)], [(LOOP, 0x20)], [(MODULE, 0x10)]]


def test_3_11_segments_end_at_entry_frames_and_include_them() -> None:
    words = walk(frame(WORK, 0x40), frame(LOOP, 0x20, entry=True), frame(FIB, 0x30), frame(MODULE, 0x10, entry=True))
    assert segments(words, SplitRule.ENTRY) == [[(WORK, 0x40), (LOOP, 0x20)], [(FIB, 0x30), (MODULE, 0x10)]]


def test_3_12_segments_end_at_shims_which_are_dropped() -> None:
    words = walk(frame(WORK, 0x40), frame(LOOP, 0x20), shim(SHIM_A), frame(MODULE, 0x10), shim(SHIM_B))
    assert segments(words, SplitRule.SHIM) == [[(WORK, 0x40), (LOOP, 0x20)], [(MODULE, 0x10)]]


def test_3_12_leading_shim_is_an_eval_call_with_no_frame_yet_and_a_partial_tail_is_kept() -> None:
    words = walk(shim(SHIM_A), frame(WORK, 0x40), shim(SHIM_B), frame(LOOP, 0x20))
    assert segments(words, SplitRule.SHIM) == [[], [(WORK, 0x40)], [(LOOP, 0x20)]]


# --- merging -------------------------------------------------------------------------------------------


def test_3_10_each_eval_frame_becomes_its_python_frame_with_names_file_and_line() -> None:
    native = (EVAL_1, VECTORCALL, EVAL_2, VECTORCALL, EVAL_3, MAIN)
    merged, merger = merge(native, walk(frame(WORK, 0x60), frame(LOOP, 0x20), frame(MODULE, 0x10)), "3.10.13")
    assert names(merged) == [
        "Worker.work",
        "_PyFunction_Vectorcall",
        "loop",
        "_PyFunction_Vectorcall",
        "<module>",
        "main",
    ]
    work = merged[0]
    assert work.kind is FrameKind.PYTHON and work.address == 0 and work.mapping is PY
    assert work.source == PythonSource("work", "/srv/app/worker.py", 10, 15)
    assert merged[4].source == PythonSource("<module>", "/srv/app/main.py", 1, 30)
    assert merged[2].source == PythonSource("loop", "/srv/app/main.py", 3, 5)
    assert outcome(merger) == MergeOutcome.MERGED
    assert (merger.stats.frames_resolved, merger.stats.frames_unresolved) == (3, 0)


def test_3_11_an_eval_call_runs_frames_up_to_its_entry_frame() -> None:
    native = (EVAL_1, VECTORCALL, EVAL_2, MAIN)
    words = walk(frame(FIB, 0x30), frame(FIB, 0x30), frame(WORK, 0x40, entry=True), frame(MODULE, 0x10, entry=True))
    merged, merger = merge(native, words, "3.11.7")
    assert names(merged) == ["fib", "fib", "Worker.work", "_PyFunction_Vectorcall", "<module>", "main"]
    assert merged[0] is merged[1]  # one frame object per (code, instruction): the outputs dedup by identity
    assert outcome(merger) == MergeOutcome.MERGED


@pytest.mark.parametrize("version", ["3.12.1", "3.13.0"])
def test_3_12_and_later_split_at_shims_and_the_cold_part_is_an_eval_frame(version: str) -> None:
    native = (EVAL_COLD, VECTORCALL, EVAL_2, MAIN)
    words = walk(frame(WORK, 0x40), frame(LOOP, 0x20), shim(SHIM_A), frame(MODULE, 0x10), shim(SHIM_B))
    merged, merger = merge(native, words, version)
    assert names(merged) == ["Worker.work", "loop", "_PyFunction_Vectorcall", "<module>", "main"]
    assert all(f.mapping is PY for f in merged)
    assert outcome(merger) == MergeOutcome.MERGED


def test_a_c_extension_keeps_its_native_frames_under_its_python_caller() -> None:
    native = (DEFLATE, ZLIB_COMPRESS, CFUNCTION, EVAL_1, MAIN)
    merged, _ = merge(native, walk(frame(WORK, 0x40), frame(MODULE, 0x10), shim(SHIM_A)))
    assert names(merged) == ["deflate", "zlib_compress", "cfunction_vectorcall_O", "Worker.work", "<module>", "main"]
    assert [f.kind for f in merged[:3]] == [FrameKind.NATIVE] * 3


def test_a_python_callback_called_from_c_keeps_the_order() -> None:
    # sorted(items, key=key) from loop(): key's eval call runs under builtin_sorted, under loop's eval call.
    native = (EVAL_1, VECTORCALL, SORTED, CFUNCTION, EVAL_2, MAIN)
    words = walk(frame(KEY, 0x08), shim(SHIM_A), frame(LOOP, 0x20), frame(MODULE, 0x10), shim(SHIM_B))
    merged, _ = merge(native, words)
    assert names(merged) == [
        "sort_key.<locals>.key",
        "_PyFunction_Vectorcall",
        "builtin_sorted",
        "cfunction_vectorcall_O",
        "loop",
        "<module>",
        "main",
    ]


def test_a_truncated_walk_gets_a_marker_where_its_callers_were_and_the_outer_eval_frames_stay() -> None:
    native = (EVAL_1, VECTORCALL, EVAL_2, VECTORCALL, EVAL_3, MAIN)
    words = walk(frame(FIB, 0x30), shim(SHIM_A), frame(FIB, 0x30))
    merged, merger = merge(native, words, status=InterpreterStatus.TRUNCATED)
    assert merged == (merged[0], VECTORCALL, merged[0], TRUNCATED, VECTORCALL, EVAL_3, MAIN)
    assert TRUNCATED.kind is FrameKind.MARKER and TRUNCATED.function == "[truncated python stack]"
    assert outcome(merger) == MergeOutcome.TRUNCATED


def test_unreadable_code_objects_become_an_unknown_python_frame_and_are_counted() -> None:
    source = codes()
    del source.codes[(PID, LOOP)]
    source.codes[(PID, FIB)] = FakeCode("", "", "/srv/app/fib.py", 20)  # no name: never shown as ""
    native = (EVAL_1, EVAL_2, MAIN)
    words = walk(frame(WORK, 0x40), frame(LOOP, 0x20), shim(SHIM_A), frame(FIB, 0x30), shim(SHIM_B))
    merged, merger = merge(native, words, source=source)
    assert names(merged) == ["Worker.work", UNKNOWN_CODE, UNKNOWN_CODE, "main"]
    unknown = merged[1]
    assert unknown.kind is FrameKind.PYTHON and unknown.source is None and unknown.mapping is PY
    assert merged[2] is unknown
    assert (merger.stats.frames_resolved, merger.stats.frames_unresolved) == (1, 2)


def test_more_segments_than_eval_frames_go_in_order_to_the_outermost_one() -> None:
    # A native stack cut short (or an eval frame the symbolizer could not name) leaves too few eval frames.
    native = (EVAL_1, VECTORCALL, EVAL_2)
    words = walk(frame(WORK, 0x40), frame(LOOP, 0x20), frame(FIB, 0x30), frame(MODULE, 0x10))
    merged, merger = merge(native, words, "3.10.13")
    assert names(merged) == ["Worker.work", "_PyFunction_Vectorcall", "loop", "fib", "<module>"]
    assert outcome(merger) == MergeOutcome.EXTRA_PYTHON
    assert merger.stats.frames_resolved == 4


def test_fewer_segments_than_eval_frames_leave_the_outer_ones_native() -> None:
    native = (EVAL_1, VECTORCALL, EVAL_2, MAIN)
    merged, merger = merge(native, walk(frame(WORK, 0x40)), "3.10.13")
    assert merged == (merged[0], VECTORCALL, EVAL_2, MAIN) and merged[0].function == "Worker.work"
    assert outcome(merger) == MergeOutcome.EXTRA_EVAL


def test_an_empty_segment_keeps_its_eval_frame() -> None:
    native = (EVAL_1, VECTORCALL, EVAL_2, MAIN)
    merged, merger = merge(native, walk(shim(SHIM_A), frame(MODULE, 0x10), shim(SHIM_B)))
    assert names(merged) == ["_PyEval_EvalFrameDefault", "_PyFunction_Vectorcall", "<module>", "main"]
    assert outcome(merger) == MergeOutcome.MERGED


def test_python_frames_with_no_eval_frame_go_at_the_root_end_before_trailing_markers() -> None:
    assert USER_TRUNCATED is not None
    native = (DEFLATE, ZLIB_COMPRESS, USER_TRUNCATED)
    merged, merger = merge(native, walk(frame(WORK, 0x40), frame(MODULE, 0x10), shim(SHIM_A)))
    assert names(merged) == ["deflate", "zlib_compress", "Worker.work", "<module>", USER_TRUNCATED.function]
    assert merged[2].mapping is None  # no eval frame, so no interpreter mapping to give it
    assert outcome(merger) == MergeOutcome.NO_EVAL_FRAME


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (InterpreterStatus.NO_THREAD_STATE, MergeOutcome.NO_THREAD_STATE),
        (InterpreterStatus.READ_FAILED, MergeOutcome.READ_FAILED),
        (InterpreterStatus.NO_FSBASE, MergeOutcome.NO_FSBASE),
    ],
)
def test_walks_that_failed_leave_native_frames_only_counted_by_reason(
    status: InterpreterStatus, reason: MergeOutcome
) -> None:
    native = (EVAL_1, MAIN)
    merged, merger = merge(native, (), status=status)
    assert merged is native
    assert merger.stats.stacks == {reason: 1}


def test_a_process_not_walked_as_python_is_left_alone_and_not_counted() -> None:
    native = (EVAL_1, MAIN)
    merged, merger = merge(native, (), status=InterpreterStatus.NONE)
    assert merged is native and not merger.stats.stacks


@pytest.mark.parametrize("runtime", [None, ("cpython", "3.9.18"), ("pypy", "3.10.14"), ("cpython", "")])
def test_frames_of_a_process_with_no_supported_runtime_are_not_named(runtime: tuple[str, str] | None) -> None:
    source = codes()
    if runtime is None:
        del source.runtimes[PID]
    else:
        source.runtimes[PID] = runtime
    native = (EVAL_1, MAIN)
    merged, merger = merge(native, walk(frame(WORK, 0x40), shim(SHIM_A)), source=source)
    assert merged is native
    assert outcome(merger) == MergeOutcome.UNKNOWN_RUNTIME
    assert not source.lookups  # no code object is read for a version whose frames cannot be placed


def test_without_a_code_cache_frames_are_counted_not_named() -> None:
    merger = PythonMerger(None)
    native = (EVAL_1, MAIN)
    stack = Stack(StackStatus.OK, (1, 2))
    python = InterpreterStack(InterpreterStatus.OK, walk(frame(WORK, 0x40)))
    assert merger.merge(PID, stack, native, python, MergeCall()) is native
    assert merger.stats.stacks == {MergeOutcome.UNKNOWN_RUNTIME: 1} and merger.runtime(PID) is None


def test_one_call_merges_each_stack_once_and_counts_every_sample() -> None:
    source = codes()
    merger = PythonMerger(source)
    call = MergeCall()
    native = (EVAL_1, EVAL_2, MAIN)
    stack = Stack(StackStatus.OK, (1, 2, 3))
    python = InterpreterStack(InterpreterStatus.OK, walk(frame(WORK, 0x40), shim(SHIM_A), frame(WORK, 0x40)))
    first = merger.merge(PID, stack, native, python, call)
    second = merger.merge(PID, stack, native, python, call)
    assert first is second
    assert source.lookups == {(PID, WORK): 1}
    assert merger.stats.frames_resolved == 4 and merger.stats.stacks == {MergeOutcome.MERGED: 2}
    # A new call reads the code objects again: the process stage's cache, not this module, keeps them.
    merger.merge(PID, stack, native, python, MergeCall())
    assert source.lookups == {(PID, WORK): 2}
