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
SAMPLE_FLAG_PYTHON_TRUNCATED = 2
SAMPLE_FLAG_PYTHON_NEW_CODE = 4
SAMPLE_FLAG_EXITING = 8

PYTHON_MAX_FRAMES = 128
PYTHON_FRAME_ENTRY = 1
PYTHON_FRAME_SHIM = 2
PYTHON_FRAME_FLAGS = 7
PYTHON_FINGERPRINT_SHIFT = 48
PYTHON_FINGERPRINT_WORDS = 8
PYTHON_FINGERPRINT_MULTIPLIER = 0x9E3779B97F4A7C15
PYTHON_NO_THREAD_STATE = -1
PYTHON_READ_FAILED = -2
PYTHON_NO_FSBASE = -3
PYTHON_USE_TSS = 1
PYTHON_USE_THREAD_MAP = 2
PYTHON_CODE_TAGGED = 4
PYTHON_INSTR_IS_INT = 8
PYTHON_NO_FIELD = 0xFFFF

PARAM_SAMPLING = 0
PARAM_MIN_BLOCK_NS = 1
PARAM_COUNT = 4

PROC_EVENT_NEW = 1
PROC_EVENT_EXEC = 2
PROC_EVENT_PYTHON_CODE = 3


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
        ("user_ip", ctypes.c_uint64),
        ("user_sp", ctypes.c_uint64),
        ("user_bp", ctypes.c_uint64),
        ("user_stack_base", ctypes.c_uint64),
        ("user_stack_bytes", ctypes.c_uint32),
        ("python_frames", ctypes.c_int32),
        ("ips", ctypes.c_uint64 * (2 * MAX_STACK_DEPTH + 2 * PYTHON_MAX_FRAMES)),
        # With USER_STACK_BYTES > 0 the C record goes on with `u8 room[USER_STACK_BYTES]`, and the copy
        # starts right after the last filled slot of `ips` (see `stack_record_size`).
    )


# Records are sent truncated after the last filled frame: this much always arrives.
STACK_EVENT_HEADER_SIZE = StackEventRecord.ips.offset
# The most a record without a user stack copy can be (every slot filled); one with a copy adds its bytes.
STACK_EVENT_SIZE = ctypes.sizeof(StackEventRecord)


def stack_record_size(kernel_frames: int, user_frames: int, python_frames: int = 0, copy_bytes: int = 0) -> int:
    """The bytes a record sends: its header, its filled slots (a Python frame takes two), then its copy,
    which starts right where the slots end (`stack_copy_offset` in bpf/common.h)."""
    return STACK_EVENT_HEADER_SIZE + 8 * (kernel_frames + user_frames + 2 * python_frames) + copy_bytes


USER_STACK_CHUNK = 512


class ProcEventRecord(ctypes.Structure):
    _fields_ = (
        ("timestamp_ns", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("kind", ctypes.c_uint32),
        ("start_code", ctypes.c_uint64),
        ("mmap_base", ctypes.c_uint64),
        ("vdso", ctypes.c_uint64),
        ("exe_ino", ctypes.c_uint64),
        ("exe_dev", ctypes.c_uint32),
        ("padding", ctypes.c_uint32),
        ("comm", ctypes.c_char * AGENT_COMM_LEN),
    )


class PythonProcRecord(ctypes.Structure):
    """`python_procs`' value: how the BPF walker finds and walks one Python process (docs/python.md)."""

    _fields_ = (
        ("tls_offset", ctypes.c_uint64),
        ("tls_second_offset", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("tstate_frame", ctypes.c_uint16),
        ("cframe_current_frame", ctypes.c_uint16),
        ("frame_previous", ctypes.c_uint16),
        ("frame_code", ctypes.c_uint16),
        ("frame_instr", ctypes.c_uint16),
        ("frame_is_entry", ctypes.c_uint16),
        ("frame_owner", ctypes.c_uint16),
        ("code_fingerprint", ctypes.c_uint16),
        ("owner_cstack", ctypes.c_uint8),
        ("padding", ctypes.c_uint8 * 3),
    )


class PythonThreadKey(ctypes.Structure):
    _fields_ = (
        ("pid", ctypes.c_uint32),
        ("padding", ctypes.c_uint32),
        ("pthread", ctypes.c_uint64),
    )


# C struct name in bpf/common.h -> mirror, for the layout test.
MIRRORS: dict[str, type[ctypes.Structure]] = {
    "stack_event": StackEventRecord,
    "proc_event": ProcEventRecord,
    "python_proc": PythonProcRecord,
    "python_thread_key": PythonThreadKey,
}
