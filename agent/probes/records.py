"""Probes stage: ctypes mirrors of the structs in `bpf/common.h`, and the constants that go with them.

The perf-buffer callbacks cast raw bytes to these types and copy the fields out at once (a view must
never outlive the callback). `tests/unit/test_records_layout.py` compiles `bpf/common.h` and checks
that sizeof and every offset agree with these mirrors.
"""

from __future__ import annotations

import ctypes

AGENT_COMM_LEN = 16

SAMPLE_FLAG_KERNEL_THREAD = 1

PROC_EVENT_NEW = 1
PROC_EVENT_EXEC = 2


class CpuSampleRecord(ctypes.Structure):
    _fields_ = (
        ("timestamp_ns", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("user_stack_id", ctypes.c_int32),
        ("kernel_stack_id", ctypes.c_int32),
        ("stack_gen", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("comm", ctypes.c_char * AGENT_COMM_LEN),
    )


class ProcEventRecord(ctypes.Structure):
    _fields_ = (
        ("timestamp_ns", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("kind", ctypes.c_uint32),
    )


# C struct name in bpf/common.h -> mirror, for the layout test.
MIRRORS: dict[str, type[ctypes.Structure]] = {
    "cpu_sample": CpuSampleRecord,
    "proc_event": ProcEventRecord,
}
