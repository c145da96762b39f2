"""The allocation profiler's user-space side without BPF: record values, profile shape, parameters.

Records are built as `bpf/agent.bpf.c` (PROFILE_ALLOC) sends them (no kernel frames, the user stack with the caller
spliced in, truncated after the last frame) and decoded through the probe's own decoder.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import re
from pathlib import Path

import pytest

from agent.probes.alloc import DEFAULT_SAMPLE_BYTES, AllocProbe, alloc_values, alloc_weight
from agent.probes.events import MalformedRecord, ProcessEvent, ProcessEventKind, StackEvent, decode_stack_event
from agent.probes.program import ProbeProgram
from agent.probes.records import STACK_EVENT_HEADER_SIZE, StackEventRecord
from agent.probes.settings import AllocConfig
from agent.probes.stacks import StackDecoder
from agent.types import EMPTY_STACK, ValueType
from tests.support.config import profiling

PROFILING = profiling("alloc", queue_size=1024)
BPF_SOURCE = Path(__file__).resolve().parents[2] / "bpf" / "agent.bpf.c"
USER = (0x7F0000098930, 0x55000000117C, 0x5500000011A8)  # malloc, its caller, the caller's caller


def alloc_record(size: int, mean: int, user: tuple[int, ...] = USER) -> tuple[ctypes.Array[ctypes.c_char], int]:
    record = StackEventRecord(timestamp_ns=5_000_000_000, value=size, sampling=mean, pid=300, tid=301, cpu=1, flags=0)
    record.kernel_stack_len, record.user_stack_len = 0, len(user)
    for i, address in enumerate(user):
        record.ips[i] = address
    record.comm = b"alloc_sites"
    size_sent = STACK_EVENT_HEADER_SIZE + 8 * len(user)
    return ctypes.create_string_buffer(bytes(record)[:size_sent], size_sent), size_sent


def decode(size: int, mean: int) -> StackEvent:
    buffer, sent = alloc_record(size, mean)
    return decode_stack_event(ctypes.addressof(buffer), sent, StackDecoder(), "alloc", alloc_values)


def test_a_record_is_worth_its_inverse_sampling_probability() -> None:
    event = decode(1000, 512 * 1024)
    weight = 1 / (1 - math.exp(-1000 / (512 * 1024)))
    assert event.values == pytest.approx((weight, weight * 1000))
    assert event.values[1] == pytest.approx(512 * 1024 + 500, rel=1e-3)  # small ones: about R + s/2 bytes
    assert event.user.addresses == USER and event.kernel is EMPTY_STACK
    assert (event.profiler, event.pid, event.tid, event.comm) == ("alloc", 300, 301, "alloc_sites")


def test_allocations_far_above_r_are_worth_themselves() -> None:
    assert decode(64 << 20, 512 * 1024).values == pytest.approx((1.0, 64 << 20))
    assert alloc_weight(1 << 48, 1) == 1.0


@pytest.mark.parametrize(("size", "mean"), [(0, 512 * 1024), (1000, 0)])
def test_impossible_records_are_malformed(size: int, mean: int) -> None:
    with pytest.raises(MalformedRecord):
        decode(size, mean)


def test_profile_shape_and_parameters(tmp_path: Path) -> None:
    probe = AllocProbe(PROFILING, lambda _: None, AllocConfig(sample_bytes=256 * 1024), proc_root=tmp_path)
    spec = probe.spec
    assert spec.name == "alloc"
    assert spec.sample_types == (ValueType("alloc_objects", "count"), ValueType("alloc_space", "bytes"))
    assert (spec.period_type, spec.period) == (ValueType("space", "bytes"), 256 * 1024)
    assert probe.adaptive and probe.sampling_floor() == 256 * 1024
    assert probe.parameters() == {"sample_bytes": 256 * 1024}
    probe.set_sampling(1 << 20)  # the adaptive sampler coarsens it (nothing loaded yet: no map write)
    assert probe.parameters() == {"sample_bytes": 1 << 20} and probe.sampling_floor() == 256 * 1024
    probe.set_sample_bytes(1 << 40)
    for bad in (0, (1 << 40) + 1):
        with pytest.raises(ValueError):
            probe.set_sample_bytes(bad)
    assert AllocProbe(PROFILING, lambda _: None, proc_root=tmp_path).parameters() == {
        "sample_bytes": DEFAULT_SAMPLE_BYTES
    }
    assert DEFAULT_SAMPLE_BYTES == 512 * 1024


def test_the_program_is_built_for_its_pid_filter(tmp_path: Path) -> None:
    restricted = dataclasses.replace(PROFILING, pids=(7, 8))
    # The uprobes themselves are attached to the listed processes only: no lookup in the program, whose
    # section never reads the pid filter (which the other profilers use with --pid).
    probe = AllocProbe(restricted, lambda _: None, proc_root=tmp_path)
    assert "FILTER_PIDS" not in probe.defines
    section = re.search(r"#if PROFILE_ALLOC\n(.*?)#endif /\* PROFILE_ALLOC \*/", BPF_SOURCE.read_text(), re.S)
    assert section is not None and "pid_filter" not in section[1] and "pid_wanted" not in section[1]
    defines = AllocProbe(PROFILING, lambda _: None, proc_root=tmp_path).defines
    assert defines["PROFILE_ALLOC"] == 1 and int(defines["THREAD_ENTRIES"]) > 0
    dump = ProbeProgram(PROFILING, [AllocProbe(PROFILING, lambda _: None, proc_root=tmp_path)], print).dump()
    assert "agent.bpf.c" in dump and "-DPROFILE_ALLOC=1" in dump


def test_exec_events_make_the_process_be_read_again(tmp_path: Path) -> None:
    """The program's exec tracepoint reports every exec; the probe passes the event on and has the
    process's mappings read again at the next refresh (its libc may have changed)."""
    emitted: list[object] = []
    probe = AllocProbe(PROFILING, emitted.append, proc_root=tmp_path)
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "maps").write_text("55d0c0000000-55d0c0001000 r-xp 00000000 fd:01 77 /usr/bin/app\n")
    probe.tracker.scan()
    reads = probe.tracker.process_reads
    probe.tracker.scan()
    probe.tracker.scan()
    probe.tracker.scan()
    assert probe.tracker.process_reads == reads + 2  # two young scans, then it rests
    exec_event = ProcessEvent(timestamp_ns=1, pid=42, kind=ProcessEventKind.EXEC)
    ProbeProgram(PROFILING, [probe], emitted.append)._on_process_event(exec_event)  # the buffer's callback
    assert emitted == [exec_event]
    probe.tracker.scan()
    assert probe.tracker.process_reads == reads + 3
