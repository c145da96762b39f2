"""Symbolize stage: Python frames, named and merged into the native stack they ran under.

This module owns `PythonMerger`, the `PythonCodes` protocol it reads code objects and runtimes
through (the process stage's code cache, passed in by the daemon), the segmenting rules per CPython
version and the merge outcomes the metrics report (`MergeOutcome`).

The BPF walker sends each event's Python frames leaf first (`agent.types.InterpreterStack`). Each
native `_PyEval_EvalFrameDefault` frame (or its `.cold` part) was running some of them; this module
cuts the Python frames into one segment per eval call and puts each segment where its eval frame was,
the innermost eval frame getting the leaf-most segment (docs/python.md):

- 3.10: every Python frame has its own eval call;
- 3.11: a segment ends at (and includes) a frame flagged `PYTHON_FRAME_ENTRY`;
- 3.12+: a segment ends at a C-stack shim (`PYTHON_FRAME_SHIM`), which is dropped.

Every other native frame stays where it is, so a C extension called from Python keeps its frames on the
leaf side of its Python caller, and a Python callback called from C sits above the C frames that called
it. When the counts disagree the Python frames are still all kept, in order, and the disagreement is
counted: segments beyond the outermost eval frame are attached to it; with fewer segments than eval
frames, the eval frames left over keep their native name, the outermost ones when the walk was
truncated (it lost the callers), else the innermost ones (an eval call caught entering or leaving,
before it linked its frame or after it unlinked it: 1-2% of CPU samples on 3.10-3.13; on 3.10 those
in a generator's resumption otherwise put `<module>` under the generator's eval frame); with no eval frame
at all the Python frames go at the root end of the user frames (before a trailing marker). A code
object that cannot be read becomes `[unknown python code]`, never a guessed name. A walk stopped at
`python.max_frames` gets a `[truncated python stack]` marker right on the root side of its outermost
Python frame, where the missing callers were.

Threads: only the report thread (the symbolizer's caller) uses a `PythonMerger`.
"""

from __future__ import annotations

import enum
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from agent.symbolize.markers import marker
from agent.symbolize.types import Frame, FrameKind, MappingInfo, PythonSource
from agent.types import (
    PYTHON_FRAME_ENTRY,
    PYTHON_FRAME_FLAGS,
    PYTHON_FRAME_SHIM,
    InterpreterStack,
    InterpreterStatus,
    Stack,
)

# The eval loop's symbols: one native frame per eval call. GCC's hot/cold splitting moves its unlikely
# paths (with PGO, everything the training run did not use) into `.cold`, which calls out too.
EVAL_FUNCTIONS = frozenset({"_PyEval_EvalFrameDefault", "_PyEval_EvalFrameDefault.cold"})
RUNTIME_NAME = "cpython"
UNKNOWN_CODE = "[unknown python code]"
TRUNCATED = marker("[truncated python stack]")
_VERSION = re.compile(r"(\d+)\.(\d+)")


class CodeLike(Protocol):
    """What the merge reads of one code object (the process stage's `CodeInfo`)."""

    @property
    def name(self) -> str: ...  # co_name

    @property
    def qualname(self) -> str: ...  # co_qualname (3.11+); the process stage gives co_name on 3.10

    @property
    def filename(self) -> str: ...

    @property
    def first_line(self) -> int: ...

    def line_for(self, raw_instruction: int) -> int:
        """The line of a frame stopped at `raw_instruction` (as the walker read it); 0 when unknown."""
        ...


class PythonCodes(Protocol):
    """The code objects and runtimes of Python processes, as the process stage read them while they ran."""

    def code(self, pid: int, key: int) -> CodeLike | None:
        """The code object `key` in `pid` (its address and fingerprint: the frame's word with the flags
        masked off, `agent.types.code_key`); None when it could not be read."""
        ...

    def runtime(self, pid: int) -> tuple[str, str] | None:
        """(runtime name, version), e.g. ("cpython", "3.12.1"), of a Python process; None for any other."""
        ...


class SplitRule(enum.Enum):
    """How one eval call's Python frames are delimited in the walk, by CPython version."""

    PER_FRAME = "3.10"  # one _PyEval_EvalFrameDefault call per Python frame
    ENTRY = "3.11"  # Python-to-Python calls stay in one eval call; its first frame is flagged ENTRY
    SHIM = "3.12+"  # each eval call pushes a C-stack shim frame below its first frame


class MergeOutcome(enum.StrEnum):
    """What happened to one sample's Python frames (the `outcome` label of the Python stacks counter)."""

    MERGED = "merged"  # one segment per eval frame
    TRUNCATED = "truncated"  # the walk stopped at python.max_frames; the outer eval frames stay native
    EXTRA_PYTHON = "extra_python"  # more segments than eval frames: the rest went to the outermost one
    EXTRA_EVAL = "extra_eval"  # a full walk with fewer segments than eval frames: the inner ones stay native
    NO_EVAL_FRAME = "no_eval_frame"  # Python frames but no eval frame in the native stack
    UNKNOWN_RUNTIME = "unknown_runtime"  # frames of a process with no known (supported) Python version
    # The walker sent no frames, by its reason: the sample keeps its native frames only.
    NO_THREAD_STATE = "no_thread_state"
    READ_FAILED = "read_failed"
    NO_FSBASE = "no_fsbase"


_NATIVE_ONLY = {
    InterpreterStatus.NO_THREAD_STATE: MergeOutcome.NO_THREAD_STATE,
    InterpreterStatus.READ_FAILED: MergeOutcome.READ_FAILED,
    InterpreterStatus.NO_FSBASE: MergeOutcome.NO_FSBASE,
}


def split_rule(version: str) -> SplitRule | None:
    """The rule for a CPython version string ("3.12.1", "3.13.0rc2"); None below 3.10 or when unparsable."""
    match = _VERSION.match(version)
    if match is None:
        return None
    version_info = (int(match.group(1)), int(match.group(2)))
    if version_info < (3, 10):
        return None
    if version_info == (3, 10):
        return SplitRule.PER_FRAME
    if version_info == (3, 11):
        return SplitRule.ENTRY
    return SplitRule.SHIM


def segments(words: tuple[int, ...], rule: SplitRule) -> list[list[tuple[int, int]]]:
    """Cut a walk's (flagged code address, instruction) pairs into one list per eval call, leaf first.

    Addresses come back with their flags masked off; shims are dropped. A 3.12+ walk taken while an
    eval call had pushed its shim but no frame yet gives that call an empty segment. The last segment
    may be partial (a truncated walk).
    """
    result: list[list[tuple[int, int]]] = []
    current: list[tuple[int, int]] = []
    for word, instruction in zip(words[::2], words[1::2], strict=False):
        flags = word & PYTHON_FRAME_FLAGS
        if flags & PYTHON_FRAME_SHIM:
            if rule is SplitRule.SHIM:
                result.append(current)
                current = []
            continue  # a shim names no code: never a frame, whatever the version says
        current.append((word & ~PYTHON_FRAME_FLAGS, instruction))
        if rule is SplitRule.PER_FRAME or (rule is SplitRule.ENTRY and flags & PYTHON_FRAME_ENTRY):
            result.append(current)
            current = []
    if current:
        result.append(current)
    return result


@dataclass(frozen=True, slots=True)
class MergedFrames:
    """One sample's user frames with its Python frames merged in, and what the merge counted."""

    frames: tuple[Frame, ...]
    resolved: int  # Python frames named from their code object
    unresolved: int  # Python frames whose code object could not be read
    outcome: MergeOutcome


@dataclass(slots=True)
class MergeCall:
    """Memos of one `symbolize` call: merged stacks and Python frames, each made once."""

    stacks: dict[tuple[int, Stack, InterpreterStack], MergedFrames] = field(default_factory=dict)
    frames: dict[tuple[int, int, int, MappingInfo | None], tuple[Frame, bool]] = field(default_factory=dict)
    rules: dict[int, SplitRule | None] = field(default_factory=dict)


@dataclass(slots=True)
class PythonStats:
    """Counted per sample, like the native frame counters (`SymbolizerStats`)."""

    frames_resolved: int = 0
    frames_unresolved: int = 0
    stacks: Counter[str] = field(default_factory=Counter)  # by `MergeOutcome`


class PythonMerger:
    """Replaces eval-loop frames with the Python frames they ran; see the module docstring."""

    def __init__(self, codes: PythonCodes | None) -> None:
        """`codes` is None when Python frames are not named (no process stage): such frames are counted only."""
        self._codes = codes
        self.stats = PythonStats()
        self._unknown: dict[MappingInfo | None, Frame] = {}

    def runtime(self, pid: int) -> tuple[str, str] | None:
        """The process's (runtime name, version) for the `process.runtime.*` labels."""
        return self._codes.runtime(pid) if self._codes is not None else None

    def merge(
        self, pid: int, stack: Stack, user: tuple[Frame, ...], python: InterpreterStack, call: MergeCall
    ) -> tuple[Frame, ...]:
        """`user` (the named frames of the native `stack`, leaf first) with `python`'s frames merged in.

        Counts the outcome and the Python frames. Within a call, one (pid, stack) has one `user`: merges
        are remembered by (pid, stack, python).
        """
        if python.status is InterpreterStatus.NONE:
            return user
        native_only = _NATIVE_ONLY.get(python.status)
        if native_only is not None:
            self.stats.stacks[native_only] += 1
            return user
        key = (pid, stack, python)
        merged = call.stacks.get(key)
        if merged is None:
            merged = call.stacks[key] = self._merge(pid, user, python, call)
        self.stats.frames_resolved += merged.resolved
        self.stats.frames_unresolved += merged.unresolved
        self.stats.stacks[merged.outcome] += 1
        return merged.frames

    def _rule(self, pid: int, call: MergeCall) -> SplitRule | None:
        if pid not in call.rules:
            runtime = self.runtime(pid)
            call.rules[pid] = split_rule(runtime[1]) if runtime is not None and runtime[0] == RUNTIME_NAME else None
        return call.rules[pid]

    def _merge(self, pid: int, user: tuple[Frame, ...], python: InterpreterStack, call: MergeCall) -> MergedFrames:
        rule = self._rule(pid, call)
        if rule is None:
            return MergedFrames(user, 0, 0, MergeOutcome.UNKNOWN_RUNTIME)
        cut = segments(python.frames, rule)
        evals = [
            i for i, frame in enumerate(user) if frame.kind is FrameKind.NATIVE and frame.function in EVAL_FUNCTIONS
        ]
        truncated = python.status is InterpreterStatus.TRUNCATED
        # Which eval frame (by index in `user`) gets which segments; -1: the root end of the user frames.
        # A full walk short of segments lines up with the outermost eval frames (see the module docstring).
        skip = len(evals) - len(cut) if len(cut) < len(evals) and not truncated else 0
        placed: dict[int, list[list[tuple[int, int]]]] = {}
        for n, segment in enumerate(cut):
            slot = evals[min(n + skip, len(evals) - 1)] if evals else -1
            placed.setdefault(slot, []).append(segment)
        out: list[Frame] = []
        counts = [0, 0]  # resolved, unresolved
        last_python = -1  # index in `out` of the outermost Python frame
        root = _root_slot(user) if -1 in placed else -1
        for i, frame in enumerate(user):
            if i == root:
                last_python = self._extend(out, pid, placed[-1], None, counts, call, last_python)
            runs = placed.get(i)
            if runs is None or not any(runs):
                out.append(frame)  # no Python frames for it: the native frame is all there is
                continue
            last_python = self._extend(out, pid, runs, frame.mapping, counts, call, last_python)
        if root == len(user):
            last_python = self._extend(out, pid, placed[-1], None, counts, call, last_python)
        if truncated and last_python >= 0:
            out.insert(last_python + 1, TRUNCATED)
        return MergedFrames(tuple(out), counts[0], counts[1], _outcome(len(cut), len(evals), truncated))

    def _extend(
        self,
        out: list[Frame],
        pid: int,
        runs: list[list[tuple[int, int]]],
        mapping: MappingInfo | None,
        counts: list[int],
        call: MergeCall,
        last_python: int,
    ) -> int:
        """Append the frames of `runs` (leaf first); returns the new index of the outermost Python frame."""
        for run in runs:
            for address, instruction in run:
                frame, resolved = self._frame(pid, address, instruction, mapping, call)
                counts[0 if resolved else 1] += 1
                out.append(frame)
                last_python = len(out) - 1
        return last_python

    def _frame(
        self, pid: int, address: int, instruction: int, mapping: MappingInfo | None, call: MergeCall
    ) -> tuple[Frame, bool]:
        key = (pid, address, instruction, mapping)
        found = call.frames.get(key)
        if found is not None:
            return found
        code = self._codes.code(pid, address) if self._codes is not None else None
        name = (code.qualname or code.name) if code is not None else ""
        if code is None or not name:
            result = (self._unknown_code(mapping), False)
        else:
            source = PythonSource(code.name, code.filename, code.first_line, code.line_for(instruction))
            result = (Frame(FrameKind.PYTHON, 0, name, mapping, source), True)
        call.frames[key] = result
        return result

    def _unknown_code(self, mapping: MappingInfo | None) -> Frame:
        frame = self._unknown.get(mapping)
        if frame is None:
            if len(self._unknown) > 1024:  # one per interpreter mapping seen: bounded all the same
                self._unknown.clear()
            frame = self._unknown[mapping] = Frame(FrameKind.PYTHON, 0, UNKNOWN_CODE, mapping)
        return frame


def _root_slot(user: tuple[Frame, ...]) -> int:
    """Where Python frames with no eval frame go: after the last frame that is not a trailing marker."""
    end = len(user)
    while end > 0 and user[end - 1].kind is FrameKind.MARKER:
        end -= 1
    return end


def _outcome(n_segments: int, n_evals: int, truncated: bool) -> MergeOutcome:
    if n_evals == 0:
        return MergeOutcome.NO_EVAL_FRAME if n_segments else MergeOutcome.MERGED
    if n_segments > n_evals:
        return MergeOutcome.EXTRA_PYTHON
    if truncated:
        return MergeOutcome.TRUNCATED
    return MergeOutcome.EXTRA_EVAL if n_segments < n_evals else MergeOutcome.MERGED
