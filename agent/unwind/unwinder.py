"""Unwind stage: user stacks from the registers and stack copy a record carries, with the binaries' CFI.

Runs on the reader thread, inside the perf-buffer callback that decodes the record, for events whose
program copies the user stack (`unwind.<profiler>` is `auto` or `dwarf`; they differ only in what
happens on a kernel that cannot copy, see `agent.probes.registry`). The copy is read where it lies in
the ring, only the few words each step needs: copying ~8 KiB per record out of it for the pipeline
thread cost about as much as the unwinding, and a full event queue of copies would hold hundreds of
MB. The price is that it runs before the sampling stage: events that the keep decision drops were
unwound too (the adaptive sampler keeps that share small by steering the kernel's rates), and pids
the process filters have rejected are skipped. A bursty profiler's records (allocations) are copied
out instead and unwound on the pipeline thread, after the keep decision: unwinding in the reader slows
it enough that a burst of ~10 KiB records overflows the perf buffers.

Each step applies the CFI rule at the frame's address (the sampled instruction for the leaf, the
call instruction, return address - 1, for callers); where no CFI covers an address (JIT code, a
binary that cannot be read) the step follows the frame pointer. CFI is right wherever frame pointers
are, and also where they are not (a frameless leaf, libc, python3), so every frame it covers is
stepped with it: an earlier version kept the kernel's frame-pointer stack when CFI confirmed every
link of it, which saved nothing measurable (confirming costs a lookup per frame, as a step does) and
split one code path into two roots in flame graphs (the frame-pointer walk stops inside libc's
start-up code).

The stack ends cleanly (status OK) at a frame whose return address is undefined in its CFI (_start,
a thread's clone) or zero. It is TRUNCATED when the copy ends first (deeper callers lie beyond
`unwind.stack_bytes`), when a rule needs a register that was lost, when the stack pointer fails to
move up, or at the depth limit; a return address outside every mapping ends it too, and is dropped.
When the process's mappings cannot be read at all (it exited, and no snapshot was captured), the
kernel's frame-pointer stack is kept.
"""

from __future__ import annotations

import struct
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path

from agent.probes.events import StackEvent, UserStackCopy
from agent.probes.records import MAX_STACK_DEPTH
from agent.process.jvm.frames import InterpreterFrames
from agent.process.maps import ProcessMaps
from agent.types import Stack, StackStatus
from agent.unwind.cfi import LOST
from agent.unwind.spaces import (
    CFA_RBP,
    CFA_RSP,
    FRAME_POINTER,
    KEEP_RBP,
    OUTERMOST,
    UNMAPPED,
    AddressSpace,
    UnwindTables,
)

_U64 = struct.Struct("<Q").unpack_from
MAX_PROCESSES = 4096
Snapshots = Callable[[int], ProcessMaps | None]
INTERNED_STACKS = 1 << 16


# What became of each stack copy: unwound to the outermost frame, cut short (copy or rules ran out), or
# the kernel's frame-pointer stack kept (no mappings to unwind with, or a pid the filters reject).
UNWIND_OUTCOMES = ("complete", "truncated", "no_mappings", "skipped")


class Unwinder:
    def __init__(
        self,
        proc_root: Path = Path("/proc"),
        snapshots: Snapshots | None = None,
        skip: Callable[[int], bool] | None = None,
    ) -> None:
        """`snapshots`: the mappings the process registry captured for a pid (used first; /proc otherwise).
        `skip`: pids whose events will be dropped anyway (the process filters rejected them): not unwound."""
        self._proc_root = proc_root
        self._snapshots = snapshots
        self._skip = skip
        self._lock = threading.Lock()
        self.tables = UnwindTables(proc_root)
        self._spaces: OrderedDict[int, AddressSpace] = OrderedDict()  # least recently used first
        self._interned: dict[tuple[StackStatus, tuple[int, ...], tuple[int, ...]], Stack] = {}
        # JVMs whose interpreter frames are read as their stacks are unwound (agent/flow/jvm.py sets them).
        self._java: dict[int, InterpreterFrames] = {}
        # outcome -> events: complete, truncated; no_mappings and skipped: the frame-pointer stack was kept
        self.outcomes: Counter[str] = Counter()  # by UNWIND_OUTCOMES
        self.frames = 0  # frames unwound from stack copies
        self.frame_pointer_steps = 0  # of which found by the frame pointer, for lack of CFI
        self.seconds = 0.0  # time spent here (table loading included), for the metrics
        # Reads the process announcements waiting now (the perf reader's, set once it exists): a
        # pid's record can come before its announcement, which makes the registry read or lay it out.
        self.catch_up: Callable[[], None] | None = None

    @property
    def tables_loaded(self) -> int:
        """Unwind tables read from binaries so far (for the metrics stage)."""
        return self.tables.stats.loaded

    @property
    def tables_failed(self) -> int:
        return self.tables.stats.failed

    def unwind(self, event: StackEvent) -> Stack:
        """The user stack of `event`: unwound from its stack copy, or its own when it carries none."""
        copy = event.user_copy
        return event.user if copy is None else self.unwind_copy(event.pid, copy, event.user)

    def unwind_copy(self, pid: int, copy: UserStackCopy, frame_pointer_stack: Stack) -> Stack:
        """The user stack of process `pid` from its registers and stack copy; `frame_pointer_stack` (the
        kernel's walk) when the process's mappings cannot be read. The decoder calls this inside the
        perf-buffer callback, with `copy.data` a view of the ring itself: only the words it reads are
        touched, not the whole copy (see `agent.probes.events.StackEventDecoder`)."""
        with self._lock:  # the reader and, for a bursty profiler's events, the pipeline thread
            return self._unwind_locked(pid, copy, frame_pointer_stack)

    def _unwind_locked(self, pid: int, copy: UserStackCopy, frame_pointer_stack: Stack) -> Stack:
        begun = time.perf_counter()  # wall time: a thread-CPU clock is a syscall
        if self._skip is not None and self._skip(pid):
            self.outcomes["skipped"] += 1
            stack = frame_pointer_stack
        else:
            space = self._space(pid)
            if space.maps is None:
                self.outcomes["no_mappings"] += 1
                stack = frame_pointer_stack
            else:
                stack = self._unwind_copy(space, copy)
        self.seconds += time.perf_counter() - begun
        return stack

    def forget(self, pid: int) -> None:
        """The process exec'd or is new under a reused pid: its mappings must be read again."""
        self._spaces.pop(pid, None)  # the JVM flow, which owns the verdicts, clears `set_java`

    def set_java(self, pid: int, interpreter: InterpreterFrames | None) -> None:
        """Read the Method* and bytecode pointer of each frame of `pid` that runs in `interpreter` (a
        HotSpot JVM's template interpreter) into the stacks' `java`; None stops it."""
        with self._lock:  # the pipeline thread sets, the reader's decoders read
            if interpreter is None:
                self._java.pop(pid, None)
            else:
                self._java[pid] = interpreter

    def _space(self, pid: int) -> AddressSpace:
        space = self._spaces.get(pid)
        if space is None:
            # The pipeline has the process registry capture a process before its first event is unwound:
            # use that snapshot rather than reading /proc/PID/maps (and stat'ing every file) again. An
            # address outside it makes the space re-read /proc at once (read_at 0).
            maps = self._snapshots(pid) if self._snapshots is not None else None
            if maps is None and self._snapshots is not None and self.catch_up is not None:
                self.catch_up()  # a short process is often gone already: only its announcement lays it out
                maps = self._snapshots(pid)
            space = AddressSpace(pid, maps, 0.0)
            if maps is None:
                space.refresh(self._proc_root)
            self._spaces[pid] = space
            if len(self._spaces) > MAX_PROCESSES:
                self._spaces.popitem(last=False)
        elif (space.maps is None or not space.maps.mappings) and self._snapshots is not None:
            # Read from /proc after the process had gone (its first samples can be read before its
            # announcement): the registry may have laid it out since, from its executable's template.
            maps = self._snapshots(pid)
            if maps is not None and maps.mappings:
                space = self._spaces[pid] = AddressSpace(pid, maps, 0.0)
            self._spaces.move_to_end(pid)
        else:
            self._spaces.move_to_end(pid)
        return space

    def _unwind_copy(self, space: AddressSpace, copy: UserStackCopy) -> Stack:
        data, base = copy.data, copy.base
        last = base + len(data) - 8  # the highest address a u64 can be read from
        sp = copy.sp
        bp: int | None = copy.bp
        frames = [copy.ip]
        complete = False
        memo, step_at = space.memo, space.step
        tables, proc_root = self.tables, self._proc_root
        address = copy.ip  # the leaf's own instruction; for callers, the call before the return address
        fp_steps = 0
        interpreter = self._java.get(space.pid)
        java: tuple[int, ...] = ()
        while len(frames) < MAX_STACK_DEPTH:
            step = memo.get(address) or step_at(address, tables, proc_root)
            kind, cfa_offset, ra_offset, rbp_offset = step
            if kind in (CFA_RSP, CFA_RBP):
                if kind == CFA_RSP:
                    cfa = sp + cfa_offset
                elif bp is None:
                    break
                else:
                    cfa = bp + cfa_offset
                at = cfa + ra_offset
                if not base <= at <= last:
                    break  # the caller's frame lies beyond the copy
                ra = _U64(data, at - base)[0]
                if rbp_offset != KEEP_RBP:
                    at = cfa + rbp_offset
                    bp = _U64(data, at - base)[0] if rbp_offset != LOST and base <= at <= last else None
            elif kind == FRAME_POINTER:
                # No CFI here: the frame pointer is the only way on (JIT code keeps one).
                if bp is None or not base <= bp <= last - 8:
                    break
                if interpreter is not None and interpreter.code_start <= address < interpreter.code_end:
                    method_at, bcp_at = bp + interpreter.method_offset, bp + interpreter.bcp_offset
                    if base <= min(method_at, bcp_at) and max(method_at, bcp_at) <= last:
                        method, bcp = _U64(data, method_at - base)[0], _U64(data, bcp_at - base)[0]
                        java += (len(frames) - 1, method, bcp)
                ra, cfa = _U64(data, bp + 8 - base)[0], bp + 16
                bp = _U64(data, bp - base)[0]
                fp_steps += 1
            elif kind == OUTERMOST:
                complete = True
                break
            else:  # UNMAPPED: not code, the step that produced it went wrong; RA_LOST: nowhere to go on
                if kind == UNMAPPED and len(frames) > 1:
                    frames.pop()
                break
            if ra == 0:
                complete = True
                break
            if cfa <= sp:
                break  # the stack pointer must move toward the stack's base, or this would loop
            frames.append(ra)
            sp, address = cfa, ra - 1
        self.frame_pointer_steps += fp_steps
        self.frames += len(frames)
        self.outcomes["complete" if complete else "truncated"] += 1
        return self._intern(StackStatus.OK if complete else StackStatus.TRUNCATED, tuple(frames), java)

    def _intern(self, status: StackStatus, frames: tuple[int, ...], java: tuple[int, ...] = ()) -> Stack:
        """One shared object per distinct stack, as the stack decoder does: aggregation hashes them."""
        key = (status, frames, java)
        stack = self._interned.get(key)
        if stack is None:
            if len(self._interned) >= INTERNED_STACKS:
                self._interned.clear()
            stack = self._interned[key] = Stack(status, frames, java)
        return stack
