"""Process stage: what the inspector says about one process, `PythonProcess`, and its states.

This module owns `PythonState` (why a process is or is not walked as Python: the label of the
`profiling_agent_python_processes{state}` gauge), `PythonProcSpec` (the `python_procs` value as a plain
record, field for field `agent.probes.records.PythonProcRecord`, which the probes side builds from it:
the process stage may not import the probes), its flag bits, and `spec_of_layout`; and which verdicts a
process that is still starting may get before its runtime is ready (`provisional`, `RETRY_REASONS`):
those are inspected again rather than taken as final.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from agent.process.python.layouts import NO_FIELD, PythonLayout
from agent.process.python.threads import TlsSlot

# python_proc.flags (bpf/common.h; tests/unit checks them against agent.probes.records).
PYTHON_USE_TSS = 1
PYTHON_USE_THREAD_MAP = 2
PYTHON_CODE_TAGGED = 4
PYTHON_INSTR_IS_INT = 8
NO_OWNER = 0xFF  # owner_cstack when the version has no frame owner (a u8 no frame carries)


class PythonState(enum.StrEnum):
    ENABLED = "enabled"  # walked in BPF, thread states from the TSS slot
    THREAD_MAP = "thread_map"  # walked in BPF, thread states from python_threads (3.14+, or the fallback)
    NOT_PYTHON = "not_python"  # no CPython runtime in the process
    UNSUPPORTED_VERSION = "unsupported_version"  # before 3.10, or a layout the agent does not know
    FREE_THREADED = "free_threaded"  # a free-threaded (no-GIL) build: native frames only
    NO_SYMBOLS = "no_symbols"  # CPython, but _PyRuntime (or another needed symbol) is not exported
    VALIDATION_FAILED = "validation_failed"  # the user-space walk disagreed with the layout
    READ_FAILED = "read_failed"  # its memory or files could not be read (gone, denied)
    DISABLED = "disabled"  # python.enabled is off, or the walker is not loaded
    INITIALIZING = "initializing"  # CPython whose runtime is not ready yet: inspected again shortly

    @property
    def walked(self) -> bool:
        return self in (PythonState.ENABLED, PythonState.THREAD_MAP)


@dataclass(frozen=True, slots=True)
class PythonProcSpec:
    """`struct python_proc` (bpf/common.h) as a record, in the mirror's field order."""

    tls_offset: int
    tls_second_offset: int
    flags: int
    tstate_frame: int
    cframe_current_frame: int
    frame_previous: int
    frame_code: int
    frame_instr: int
    frame_is_entry: int
    frame_owner: int
    code_fingerprint: int
    owner_cstack: int


def spec_of_layout(layout: PythonLayout, slot: TlsSlot | None) -> PythonProcSpec:
    """The record of a process walked with `layout`, through the TSS slot `slot` (None: the thread map)."""
    flags = PYTHON_USE_TSS if slot is not None else PYTHON_USE_THREAD_MAP
    if layout.instr_is_int:
        flags |= PYTHON_INSTR_IS_INT
    if layout.code_tagged:
        flags |= PYTHON_CODE_TAGGED
    return PythonProcSpec(
        tls_offset=slot.tls_offset if slot is not None else 0,
        tls_second_offset=slot.tls_second_offset if slot is not None else 0,
        flags=flags,
        tstate_frame=layout.tstate_frame,
        cframe_current_frame=layout.cframe_current_frame,
        frame_previous=layout.frame_previous,
        frame_code=layout.frame_code,
        frame_instr=layout.frame_instr,
        frame_is_entry=layout.frame_is_entry,
        frame_owner=layout.frame_owner,
        code_fingerprint=layout.code_fingerprint,
        owner_cstack=layout.owner_cstack if layout.frame_owner != NO_FIELD else NO_OWNER,
    )


_NO_THREADS: Mapping[int, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class PythonProcess:
    """The inspector's verdict on one process image."""

    pid: int
    state: PythonState
    reason: str = ""  # the counted reason: why not walked, or why the thread map (tss_mismatch, musl, ...)
    detail: str = ""  # for the log
    version: tuple[int, int] | None = None
    layout: PythonLayout | None = None
    runtime_address: int = 0  # _PyRuntime in the process
    spec: PythonProcSpec | None = None  # what to write to python_procs when walked
    threads: Mapping[int, int] = field(default_factory=lambda: _NO_THREADS)  # pthread_t -> tstate (THREAD_MAP)
    frames_checked: int = 0  # code objects the validation walk checked (0: every thread was idle)
    code_type: int = 0  # &PyCode_Type in the process
    version_text: str = ""  # "3.12.1"
    retry: bool = False  # not final: the runtime may not be ready yet, inspect again (see `provisional`)
    image: tuple[int, ...] = ()  # which process image this is about (the inspector's `image_of`)

    @property
    def walked(self) -> bool:
        return self.state.walked


# An exec'd interpreter is announced by its first sample, which is often taken before the runtime is
# ready: the dynamic loader has not mapped libpython yet (a python-named executable without _PyRuntime),
# or _PyRuntime has no interpreter or thread state yet. Such an inspection says INITIALIZING, by reason.
_NOT_READY = frozenset({(PythonState.NO_SYMBOLS, "no_symbols"), (PythonState.VALIDATION_FAILED, "no_threads")})
# Thread-map fallbacks of a runtime whose main thread is not bound, or its TSS slot not set, yet: the
# process is walked through the thread map meanwhile, and inspected again for its TSS slot.
_UNSETTLED_FALLBACKS = frozenset({"no_threads", "tss_uninitialized", "tls_slot_not_found", "tls_slot_changed"})
# Validation failures a live process's churn can cause: a thread state or frame freed and reused while
# the walk reads it. A process whose threads start or exit by the dozen can look so for a while (50
# threads starting: a frame chain with a cycle on three walks in a row), so such a verdict is inspected
# again later, as a runtime not ready is: garbage fails every time, and its last verdict is final.
TORN_READS = frozenset(
    {"bad_pointer", "thread_cycle", "bad_thread_state", "bad_thread_id", "bad_code_object", "frame_cycle"}
)
# The labels of the retries' counter (profiling_agent_python_inspection_retries_total).
RETRY_REASONS = tuple(sorted({reason for _, reason in _NOT_READY} | _UNSETTLED_FALLBACKS | TORN_READS))


def provisional(result: PythonProcess) -> PythonProcess:
    """`result` as the verdict of an inspection that may be retried: a runtime not ready yet is
    INITIALIZING (`retry` set), a thread-map fallback it may outgrow is kept and marked `retry`, a
    validation failure a torn read can cause stays VALIDATION_FAILED (native-only meanwhile) and is marked
    `retry`; any other verdict (unsupported, gone, walked through its slot) is final as it is."""
    if (result.state, result.reason) in _NOT_READY:
        return replace(result, state=PythonState.INITIALIZING, retry=True)
    if result.state is PythonState.VALIDATION_FAILED and result.reason in TORN_READS:
        return replace(result, retry=True)
    if result.state is PythonState.THREAD_MAP and result.reason in _UNSETTLED_FALLBACKS:
        return replace(result, retry=True)
    return result
