"""Allocations: one function allocates large bytearrays, and counts the bytes it asked for.

Usage: pythonX.Y alloc_bytes.py MEGABYTES TRUTH_FILE [gate] [hold]

`fill_buffers` allocates 1 MiB bytearrays (each one malloc of its buffer: CPython hands requests over
512 bytes to the C allocator), touches each and keeps the last few alive, until it has allocated
MEGABYTES; the bytes requested go to TRUTH_FILE.
"""

import sys

from workload_common import gate, hold, write_truth

CHUNK = 1 << 20


def fill_buffers(megabytes: int) -> int:
    kept = []
    allocated = 0
    for i in range(megabytes):
        buffer = bytearray(CHUNK)  # hot
        buffer[i % CHUNK] = 1
        kept.append(buffer)
        if len(kept) > 8:
            kept.pop(0)
        allocated += CHUNK
    return allocated


def main() -> None:
    megabytes, truth_path = int(sys.argv[1]), sys.argv[2]
    gate(sys.argv[3:])
    write_truth(truth_path, {"fill_buffers_bytes": fill_buffers(megabytes)})
    hold(sys.argv[3:])


if __name__ == "__main__":
    main()
