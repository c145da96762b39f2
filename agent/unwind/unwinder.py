"""Unwind stage: user stacks from the registers and stack copy a record carries, with the binaries' CFI.

Runs on the pipeline thread, after the sampling stage's keep decision and before aggregation, for
events whose program copies the user stack (`unwind.<profiler>` is `auto` or `dwarf`; they differ
only in what happens on a kernel that cannot copy, see `agent.probes.registry`). Each step applies
the CFI rule at the frame's address (the sampled instruction for the leaf, the call instruction,
return address - 1, for callers); where no CFI covers an address (JIT code, a binary that cannot be
read) the step follows the frame pointer. CFI is right wherever frame pointers are, and also where
they are not (a frameless leaf, libc, python3), so every frame it covers is stepped with it: an
earlier version kept the kernel's frame-pointer stack when CFI confirmed every link of it, which
saved nothing measurable (confirming costs a lookup per frame, as a step does) and split one code
path into two roots in flame graphs (the frame-pointer walk stops inside libc's start-up code).

The stack ends cleanly (status OK) at a frame whose return address is undefined in its CFI (_start,
a thread's clone) or zero. It is TRUNCATED when the copy ends first (deeper callers lie beyond
`unwind.stack_bytes`), when a rule needs a register that was lost, when the stack pointer fails to
move up, or at the depth limit; a return address outside every mapping ends it too, and is dropped.
When the process's mappings cannot be read at all (it exited, and no snapshot was captured), the
kernel's frame-pointer stack is kept.
"""

from __future__ import annotations

import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path

from agent.aggregate.types import Stack, StackStatus
from agent.probes.events import StackEvent, UserStackCopy
from agent.probes.records import MAX_STACK_DEPTH
from agent.symbolize.proc_maps import ProcessMaps
from agent.unwind.cfi import CFA_UNSUPPORTED, LOST, RBP_LOST, RSP
from agent.unwind.spaces import AddressSpace, UnwindTables

_U64 = struct.Struct("<Q").unpack_from
MAX_PROCESSES = 4096
Snapshots = Callable[[int], ProcessMaps | None]
INTERNED_STACKS = 1 << 16


class Unwinder:
    def __init__(self, proc_root: Path = Path("/proc"), snapshots: Snapshots | None = None) -> None:
        """`snapshots`: mappings captured earlier by the symbolize stage, for processes already gone."""
        self._proc_root = proc_root
        self._snapshots = snapshots
        self.tables = UnwindTables(proc_root)
        self._spaces: OrderedDict[int, AddressSpace] = OrderedDict()  # least recently used first
        self._interned: dict[tuple[StackStatus, tuple[int, ...]], Stack] = {}
        # outcome -> events: complete, truncated, no_mappings (the frame-pointer stack was kept)
        self.outcomes: Counter[str] = Counter()
        self.frames = 0  # frames unwound from stack copies
        self.frame_pointer_steps = 0  # of which found by the frame pointer, for lack of CFI
        self.seconds = 0.0  # CPU time of the pipeline thread spent here, for the metrics

    def unwind(self, event: StackEvent) -> Stack:
        """The user stack of `event`, which carries a stack copy."""
        copy = event.user_copy
        if copy is None:
            return event.user
        begun = time.thread_time()
        space = self._space(event.pid)
        if space.maps is None:
            self.outcomes["no_mappings"] += 1
            stack = event.user
        else:
            stack = self._unwind_copy(space, copy)
        self.seconds += time.thread_time() - begun
        return stack

    def forget(self, pid: int) -> None:
        """The process exec'd or is new under a reused pid: its mappings must be read again."""
        self._spaces.pop(pid, None)

    def _space(self, pid: int) -> AddressSpace:
        space = self._spaces.get(pid)
        if space is None:
            space = AddressSpace(pid, None, 0.0)
            space.refresh(self._proc_root)
            if space.maps is None and self._snapshots is not None:
                space.maps = self._snapshots(pid)
            self._spaces[pid] = space
            if len(self._spaces) > MAX_PROCESSES:
                self._spaces.popitem(last=False)
        else:
            self._spaces.move_to_end(pid)
        return space

    def _unwind_copy(self, space: AddressSpace, copy: UserStackCopy) -> Stack:
        data, base = copy.data, copy.base
        end = base + len(data)
        pc, sp = copy.ip, copy.sp
        bp: int | None = copy.bp
        next_bp: int | None
        frames = [pc]
        complete = False
        lookup = space.lookup
        tables, proc_root = self.tables, self._proc_root
        address = pc  # the leaf's own instruction; for callers, the call before the return address
        while len(frames) < MAX_STACK_DEPTH:
            found = lookup(address, tables, proc_root)
            if not found.mapped:
                if len(frames) > 1:
                    frames.pop()  # not code: the step that produced it went wrong
                break
            rule = found.rule
            if rule is None or rule.cfa_reg == CFA_UNSUPPORTED:
                # No CFI here: the frame pointer is the only way on (JIT code keeps one).
                if bp is None or not base <= bp <= end - 16:
                    break
                ra, next_bp, cfa = _U64(data, bp + 8 - base)[0], _U64(data, bp - base)[0], bp + 16
                self.frame_pointer_steps += 1
            else:
                if rule.ra is None:
                    complete = True  # the outermost frame
                    break
                if rule.ra == LOST:
                    break  # the return address is in a register or behind an expression
                if rule.cfa_reg == RSP:
                    cfa = sp + rule.cfa_offset
                elif bp is None:
                    break
                else:
                    cfa = bp + rule.cfa_offset
                at = cfa + rule.ra
                if not base <= at <= end - 8:
                    break  # the caller's frame lies beyond the copy
                ra = _U64(data, at - base)[0]
                if rule.rbp is None:
                    next_bp = bp
                elif rule.rbp == RBP_LOST or not base <= cfa + rule.rbp <= end - 8:
                    next_bp = None
                else:
                    next_bp = _U64(data, cfa + rule.rbp - base)[0]
            if ra == 0:
                complete = True
                break
            if cfa <= sp:
                break  # the stack pointer must move toward the stack's base, or this would loop
            frames.append(ra)
            sp, bp, address = cfa, next_bp, ra - 1
        self.frames += len(frames)
        self.outcomes["complete" if complete else "truncated"] += 1
        return self._intern(StackStatus.OK if complete else StackStatus.TRUNCATED, tuple(frames))

    def _intern(self, status: StackStatus, frames: tuple[int, ...]) -> Stack:
        """One shared object per distinct stack, as the stack decoder does: aggregation hashes them."""
        key = (status, frames)
        stack = self._interned.get(key)
        if stack is None:
            if len(self._interned) >= INTERNED_STACKS:
                self._interned.clear()
            stack = self._interned[key] = Stack(status, frames)
        return stack
