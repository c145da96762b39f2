"""Stand-ins for the process stage's code cache, as the symbolize stage's `PythonCodes` protocol sees it.

`FakeCode` is a code object with a line table given as {raw instruction: line}; `FakeCodes` holds code
objects per (pid, address) and runtimes per pid, and records every lookup so tests can check what the
merge asked for. `walk` builds an `InterpreterStack`'s words the way the BPF walker sends them.
`code_key_at` is the key the walker would send for the code object at an address now, read from memory.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.process.memory import MemoryReader
from agent.process.python.layouts import PythonLayout
from agent.process.python.objects import code_fingerprint
from agent.types import PYTHON_FRAME_ENTRY, PYTHON_FRAME_SHIM, code_key


def code_key_at(memory: MemoryReader, layout: PythonLayout, address: int) -> int:
    """The code key (address and fingerprint) of the code object at `address`, as it is now."""
    return code_key(address, code_fingerprint(memory.read(address, layout.code_read_size()), layout))


@dataclass(frozen=True, slots=True)
class FakeCode:
    name: str
    qualname: str
    filename: str
    first_line: int
    lines: Mapping[int, int] = field(default_factory=dict)

    def line_for(self, raw_instruction: int) -> int:
        return self.lines.get(raw_instruction, 0)


@dataclass(slots=True)
class FakeCodes:
    codes: dict[tuple[int, int], FakeCode] = field(default_factory=dict)
    runtimes: dict[int, tuple[str, str]] = field(default_factory=dict)
    lookups: Counter[tuple[int, int]] = field(default_factory=Counter)

    def code(self, pid: int, address: int) -> FakeCode | None:
        self.lookups[(pid, address)] += 1
        return self.codes.get((pid, address))

    def runtime(self, pid: int) -> tuple[str, str] | None:
        return self.runtimes.get(pid)


def frame(address: int, instruction: int, *, entry: bool = False) -> tuple[int, int]:
    """One walked frame: its first word (code address with flags) and its instruction."""
    return (address | (PYTHON_FRAME_ENTRY if entry else 0), instruction)


def shim(address: int) -> tuple[int, int]:
    """A 3.12+ C-stack shim: its own address, flagged; the second word is whatever the walker read."""
    return (address | PYTHON_FRAME_SHIM, 0)


def walk(*frames: tuple[int, int]) -> tuple[int, ...]:
    """The flattened words of `frames`, leaf first."""
    return tuple(word for pair in frames for word in pair)
