"""Burns SECONDS of CPU time in `first_phase`, frees its code object, then burns SECONDS in `later_phase`,
whose code object CPython allocated at the freed one's address: what happens to a module's body after
its import, made to happen on purpose. A profiler that knows code objects by address alone names every
sample of the later phase `first_phase`.

The first function is compiled (its globals hold it: the collector frees it, and its code object); the
later code object is a copy of a template's (`code.replace`: another name and first line), made again
until pymalloc hands it the freed block, each miss kept alive so that it cannot give its block back.
Measured here: 1 attempt on 3.11+, about 10 on 3.10.

Usage: pythonX.Y code_reuse.py SECONDS TRUTH_FILE [gate]
Truth: first_cpu_s, later_cpu_s (CPU seconds in each), reused (the later code object took the first's
address), attempts, address.
"""

import gc
import os
import sys
import time
import types

from workload_common import gate, write_truth

SOURCE = """
def phase(seconds):
    begun = clock()
    acc = 0
    while clock() - begun < seconds:
        for i in range(1000):
            acc = (acc * 31 + i) % 1000003  # hot
    return clock() - begun
"""
ATTEMPTS = 256
FIRST_LINE, LATER_LINE = 101, 201  # co_firstlineno of each: what tells them apart besides the name


def compiled(name: str, first_line: int) -> types.FunctionType:
    """A function compiled from SOURCE, named `name`, its `def` at `first_line`."""
    namespace: dict[str, object] = {"clock": time.thread_time}
    source = "\n" * (first_line - 2) + SOURCE.replace("def phase", f"def {name}")
    exec(compile(source, __file__, "exec"), namespace)
    function = namespace[name]
    assert isinstance(function, types.FunctionType)
    return function


def renamed(code: types.CodeType, name: str, first_line: int) -> types.CodeType:
    """A new code object, a copy of `code` with another name and first line. Only the code object is
    allocated here (no dict of changes: on 3.10 a small dict's key table is of a code object's size
    class, and would take the freed block)."""
    if hasattr(code, "co_qualname"):  # 3.11+
        return code.replace(co_name=name, co_qualname=name, co_firstlineno=first_line)
    return code.replace(co_name=name, co_firstlineno=first_line)


def main() -> None:
    seconds, truth_path = float(sys.argv[1]), sys.argv[2]
    base = compiled("template", 2).__code__
    gate(sys.argv[3:])
    first = compiled("first_phase", FIRST_LINE)
    address = id(first.__code__)
    first_cpu = first(seconds)
    del first
    gc.collect()  # the function and its globals hold each other: the collector frees its code object
    held, attempts = [], 0
    while attempts < ATTEMPTS:
        attempts += 1
        code = renamed(base, "later_phase", LATER_LINE)
        if id(code) == address:
            break
        held.append(code)
    reused = id(code) == address
    del held
    later = types.FunctionType(code, {"__builtins__": __builtins__, "clock": time.thread_time})
    later_cpu = later(seconds)
    truth = {"first_cpu_s": first_cpu, "later_cpu_s": later_cpu, "reused": reused, "attempts": attempts}
    write_truth(truth_path, {**truth, "address": address})
    os._exit(0)


if __name__ == "__main__":
    main()
