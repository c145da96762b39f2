"""Unwind stage: its configuration section, `unwind`: how user stacks are walked, per profiler.

Declared once per field (see `agent.settings`); `agent.config` loads it, and the probe registry reads
`copy_bytes` to size each program's stack copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from agent.settings import choice, ranged_int, setting

UNWIND_MODES = ("auto", "dwarf", "fp")


def stack_copy_bytes(value: Any) -> int:
    number = ranged_int(512, 32768)(value)
    if number % 512:
        raise ValueError(f"expected a multiple of 512 in [512, 32768], got {number}")
    return number


@dataclass(frozen=True, slots=True)
class UnwindConfig:
    SECTION: ClassVar[str] = "unwind"

    cpu: str = setting(
        "auto",
        choice(*UNWIND_MODES),
        "User stacks of the CPU profiler: fp walks frame pointers in the kernel (cheapest, small records; loses "
        "callers in code built without them, as most distributions build libc and python3); auto also copies "
        "the top of the user stack into each record and unwinds it with the binaries' .eh_frame CFI (frame "
        "pointers where no CFI exists), falling back to fp on kernels that cannot copy (< 5.15 or no BTF); "
        "dwarf is auto that refuses to start on such kernels.",
    )
    offcpu: str = setting("auto", choice(*UNWIND_MODES), "User stacks of the off-CPU profiler (see cpu).")
    alloc: str = setting(
        "fp",
        choice(*UNWIND_MODES),
        "User stacks of the allocation profiler (see cpu). fp by default: allocation samples come in bursts "
        "faster than the sampler reacts, and records with a stack copy are ~40 times larger, so a burst can "
        "overflow the perf buffers (counted as lost); the immediate caller is found either way.",
    )
    stack_bytes: int = setting(
        8192,
        stack_copy_bytes,
        "Bytes of user stack copied per event for dwarf/auto unwinding (multiple of 512). Deeper callers are "
        "cut off and the stack is marked truncated.",
    )

    def copy_bytes(self, profiler: str) -> int:
        """User stack bytes the profiler's BPF program copies per event (0: frame pointers only)."""
        return 0 if getattr(self, profiler, "fp") == "fp" else self.stack_bytes
