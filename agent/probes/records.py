"""Probes stage: ctypes mirrors of the structs in `bpf/common.h`, and the constants that go with them.

The perf-buffer callbacks cast raw bytes to these types and copy the fields out at once (a view must
never outlive the callback). `tests/unit/test_records_layout.py` compiles `bpf/common.h` and checks
that sizeof and every offset agree with these mirrors.
"""

from __future__ import annotations

import ctypes

AGENT_COMM_LEN = 16
MAX_STACK_DEPTH = 127

SAMPLE_FLAG_KERNEL_THREAD = 1

PARAM_SAMPLING = 0
PARAM_MIN_BLOCK_NS = 1
PARAM_COUNT = 4

PROC_EVENT_NEW = 1
PROC_EVENT_EXEC = 2


class StackEventRecord(ctypes.Structure):
    _fields_ = (
        ("timestamp_ns", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("sampling", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("kernel_stack_len", ctypes.c_int32),
        ("user_stack_len", ctypes.c_int32),
        ("comm", ctypes.c_char * AGENT_COMM_LEN),
        ("ips", ctypes.c_uint64 * (2 * MAX_STACK_DEPTH)),
    )


# Records are sent truncated after the last filled frame: this much always arrives.
STACK_EVENT_HEADER_SIZE = StackEventRecord.ips.offset


class ProcEventRecord(ctypes.Structure):
    _fields_ = (
        ("timestamp_ns", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("kind", ctypes.c_uint32),
    )


# C struct name in bpf/common.h -> mirror, for the layout test.
MIRRORS: dict[str, type[ctypes.Structure]] = {
    "stack_event": StackEventRecord,
    "proc_event": ProcEventRecord,
}
