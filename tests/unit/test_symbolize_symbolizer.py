"""End-to-end tests of `agent.symbolize.symbolizer.Symbolizer` on a fake /proc with real compiled binaries.

The truth comes from binutils: function addresses from `nm`, load segments from `readelf`, and the
fake maps place each binary the way the dynamic loader would (PIE at 0x555555554000).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from agent.aggregate.types import AggregatedSample, IntervalProfile, SampleKey
from agent.process.elf import read_elf_bytes
from agent.process.registry import ProcessRegistry
from agent.process.vdso import VdsoUnavailable, read_own_vdso
from agent.symbolize import native
from agent.symbolize.stats import ErrorReason
from agent.symbolize.symbolizer import Symbolizer
from agent.symbolize.types import KERNEL_MAPPING_NAME, FrameKind, Profile
from agent.types import EMPTY_STACK, ProfileSpec, Stack, StackStatus, ValueType
from tests.support.fixture_types import AddFakeProcess, MapsFor, NmFunctions

PIE_BASE = 0x555555554000
SPEC = ProfileSpec("cpu", (ValueType("samples", "count"),), ValueType("cpu", "nanoseconds"), 10_000_000)
KALLSYMS = "ffffffff81000000 T _stext\nffffffff81000100 T do_syscall_64\nffffffff81000200 t vfs_read\n"


def agg(pid: int, user: Stack = EMPTY_STACK, kernel: Stack = EMPTY_STACK, tid: int | None = None) -> AggregatedSample:
    key = SampleKey(pid=pid, tid=pid if tid is None else tid, cpu=0, kernel=kernel, user=user)
    return AggregatedSample(key=key, thread_name="worker", values=(1,), timestamps_mono_ns=(1_500,))


def interval(*samples: AggregatedSample) -> IntervalProfile:
    return IntervalProfile(SPEC, 1_000, 2_000, 1_700_000_000_000_000_000, samples)


def user_stack(*addresses: int) -> Stack:
    return Stack(StackStatus.OK, addresses)


def functions(profile: Profile, index: int = 0) -> list[str]:
    return [f.function for f in profile.samples[index].frames]


def build_id_of(path: Path) -> str:
    notes = subprocess.run(["readelf", "-n", str(path)], check=True, capture_output=True, text=True).stdout
    match = re.search(r"Build ID: ([0-9a-f]+)", notes)
    assert match is not None
    return match.group(1)


@pytest.fixture
def pie_process(
    symbolize_binaries: dict[str, Path], maps_for: MapsFor, add_fake_process: AddFakeProcess, fake_proc: Path
) -> Path:
    """pid 100 runs the PIE binary loaded at PIE_BASE; returns the binary."""
    pie = symbolize_binaries["pie"]
    add_fake_process(100, maps_for(pie, PIE_BASE), comm="workload", exe=pie)
    (fake_proc / "kallsyms").write_text(KALLSYMS)
    return pie


def test_pie_addresses_resolve_through_the_load_bias(
    pie_process: Path, fake_proc: Path, nm_functions: NmFunctions
) -> None:
    nm = nm_functions(pie_process)
    stack = user_stack(
        PIE_BASE + nm["leaf_a"][0] + 4, PIE_BASE + nm["middle_b"][0] + 9, PIE_BASE + nm["outer_c"][0] + 9
    )
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    symbolizer.processes.observe_process(100)
    profile = symbolizer.symbolize(interval(agg(100, user=stack)))
    frames = profile.samples[0].frames
    assert [f.function for f in frames] == ["leaf_a", "middle_b", "outer_c"]
    assert [f.kind for f in frames] == [FrameKind.NATIVE] * 3
    assert [f.address for f in frames] == [stack.addresses[0], stack.addresses[1] - 1, stack.addresses[2] - 1]
    mapping = frames[0].mapping
    assert mapping is not None
    assert mapping.path == str(pie_process)
    assert mapping.build_id == build_id_of(pie_process)
    assert mapping.start <= stack.addresses[0] < mapping.limit
    assert mapping.file_offset == mapping.start - PIE_BASE  # separate-code layout: vaddr == file offset
    assert profile.processes[100].comm == "workload"
    assert profile.processes[100].exe_path == str(pie_process)


def test_non_pie_addresses_resolve_without_bias(
    symbolize_binaries: dict[str, Path],
    maps_for: MapsFor,
    add_fake_process: AddFakeProcess,
    fake_proc: Path,
    nm_functions: NmFunctions,
) -> None:
    binary = symbolize_binaries["nopie"]
    nm = nm_functions(binary)
    add_fake_process(200, maps_for(binary, 0), exe=binary)
    stack = user_stack(nm["middle_b"][0] + 3, nm["outer_c"][0] + 9, nm["main"][0] + 20)
    profile = Symbolizer(ProcessRegistry(fake_proc)).symbolize(interval(agg(200, user=stack)))
    assert functions(profile) == ["middle_b", "outer_c", "main"]


def test_caller_return_address_at_next_function_start_names_the_caller(
    pie_process: Path, fake_proc: Path, nm_functions: NmFunctions
) -> None:
    nm = nm_functions(pie_process)
    leaf_start, leaf_size = nm["leaf_a"]
    boundary = nm["middle_b"][0]
    assert leaf_start + leaf_size == boundary, "leaf_a must end exactly where middle_b starts"
    stack = user_stack(PIE_BASE + boundary, PIE_BASE + boundary)
    profile = Symbolizer(ProcessRegistry(fake_proc)).symbolize(interval(agg(100, user=stack)))
    frames = profile.samples[0].frames
    assert [f.function for f in frames] == ["middle_b", "leaf_a"]
    assert [f.address for f in frames] == [PIE_BASE + boundary, PIE_BASE + boundary - 1]


def test_kernel_frames_come_first_and_use_the_kernel_mapping(
    pie_process: Path, fake_proc: Path, nm_functions: NmFunctions
) -> None:
    # The caller's return address is do_syscall_64's first byte: minus one, it names the caller (_stext).
    kernel = Stack(StackStatus.OK, (0xFFFFFFFF81000210, 0xFFFFFFFF81000100))
    user = user_stack(PIE_BASE + nm_functions(pie_process)["main"][0] + 1)
    profile = Symbolizer(ProcessRegistry(fake_proc)).symbolize(interval(agg(100, user=user, kernel=kernel)))
    frames = profile.samples[0].frames
    assert [f.function for f in frames] == ["vfs_read", "_stext", "main"]
    assert [f.kind for f in frames] == [FrameKind.KERNEL, FrameKind.KERNEL, FrameKind.NATIVE]
    assert [f.address for f in frames] == [0xFFFFFFFF81000210, 0xFFFFFFFF810000FF, user.addresses[0]]
    kernel_mapping = frames[0].mapping
    assert kernel_mapping is not None and kernel_mapping.path == KERNEL_MAPPING_NAME
    assert kernel_mapping.start == 0xFFFFFFFF81000000 and kernel_mapping.file_offset == 0


def test_a_deleted_binary_is_named_through_map_files(
    symbolize_binaries: dict[str, Path],
    maps_for: MapsFor,
    add_fake_process: AddFakeProcess,
    fake_proc: Path,
    tmp_path: Path,
    nm_functions: NmFunctions,
) -> None:
    """Every package upgrade unlinks binaries under running processes: maps then says "(deleted)" and the
    path names nothing (or another file). Seen: frames as 0x...@file, no build id. /proc/PID/map_files
    still reaches the very file the mapping maps."""
    pie = symbolize_binaries["pie"]
    kept = tmp_path / "still-mapped"  # the unlinked inode, reachable only through the mapping's link
    shutil.copy2(pie, kept)
    gone = tmp_path / "usr-bin-workload"  # the path the process was started by, now unlinked
    lines = [line.replace(str(pie), f"{gone} (deleted)") for line in maps_for(pie, PIE_BASE)]
    pid_dir = add_fake_process(101, lines, comm="workload")
    (pid_dir / "map_files").mkdir()
    for line in lines:
        (pid_dir / "map_files" / line.split()[0]).symlink_to(kept)
    nm = nm_functions(pie)
    stack = user_stack(PIE_BASE + nm["leaf_a"][0] + 4, PIE_BASE + nm["middle_b"][0] + 9)
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    symbolizer.processes.observe_process(101)
    frames = symbolizer.symbolize(interval(agg(101, user=stack))).samples[0].frames
    assert [f.function for f in frames] == ["leaf_a", "middle_b"]
    assert frames[0].mapping is not None and frames[0].mapping.build_id == build_id_of(pie)
    assert frames[0].mapping.path == f"{gone} (deleted)"  # what maps says: the user sees it was deleted


def test_samples_from_before_an_exec_are_named_from_the_image_they_ran_in(
    symbolize_binaries: dict[str, Path],
    maps_for: MapsFor,
    add_fake_process: AddFakeProcess,
    fake_proc: Path,
    nm_functions: NmFunctions,
) -> None:
    """#17: a process ran the PIE binary, then exec'd the non-PIE one; the interval holds samples of
    both. Seen: the earlier ones named from the new image (wrong names), or unnamed. Each is named from
    the image it ran in, picked by its first timestamp against the exec's."""
    pie, nopie = symbolize_binaries["pie"], symbolize_binaries["nopie"]
    pid_dir = add_fake_process(102, maps_for(pie, PIE_BASE), comm="before", exe=pie)
    registry = ProcessRegistry(fake_proc)
    symbolizer = Symbolizer(registry)
    registry.observe_process(102)
    exec_ns = time.monotonic_ns()  # after that capture, as the exec that ends its image
    registry.announced(102, exec_ns, exec_=True)  # as the reader does with the EXEC event
    (pid_dir / "maps").write_text("".join(line + "\n" for line in maps_for(nopie, 0)))
    (pid_dir / "comm").write_text("after\n")
    (pid_dir / "exe").unlink()
    (pid_dir / "exe").symlink_to(nopie)
    registry.observe_process(102)
    pie_nm, nopie_nm = nm_functions(pie), nm_functions(nopie)
    before = AggregatedSample(
        SampleKey(102, 102, 0, EMPTY_STACK, user_stack(PIE_BASE + pie_nm["leaf_a"][0] + 4)),
        "before",
        (1,),
        (exec_ns - 1_000,),
    )
    after = AggregatedSample(
        SampleKey(102, 102, 0, EMPTY_STACK, user_stack(nopie_nm["outer_c"][0] + 4)), "after", (1,), (exec_ns + 1_000,)
    )
    profile = symbolizer.symbolize(interval(before, after))
    assert [functions(profile, i) for i in range(2)] == [["leaf_a"], ["outer_c"]]
    assert profile.samples[0].frames[0].mapping is not None
    assert profile.samples[0].frames[0].mapping.path == str(pie)
    assert profile.samples[1].frames[0].mapping is not None
    assert profile.samples[1].frames[0].mapping.path == str(nopie)
    # And labelled as the program it was: the comm and exe its image had, not the current ones.
    current, earlier = profile.processes[102], profile.process_of(profile.samples[0])
    assert (current.comm, current.exe_path) == ("after", str(nopie))
    assert earlier is not None and (earlier.comm, earlier.exe_path) == ("before", str(pie))
    assert profile.process_of(profile.samples[1]) is current


def test_hidden_kallsyms_keeps_kernel_addresses_unnamed(fake_proc: Path) -> None:
    (fake_proc / "kallsyms").write_text(re.sub(r"^ffffffff[0-9a-f]+", "0" * 16, KALLSYMS, flags=re.MULTILINE))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    kernel = Stack(StackStatus.OK, (0xFFFFFFFF81000210, 0xFFFFFFFF81000110))
    profile = symbolizer.symbolize(interval(agg(0, kernel=kernel)))
    frames = profile.samples[0].frames
    assert [(f.kind, f.function, f.address) for f in frames] == [
        (FrameKind.KERNEL, "", 0xFFFFFFFF81000210),
        (FrameKind.KERNEL, "", 0xFFFFFFFF8100010F),
    ]
    assert all(f.mapping is not None and f.mapping.path == KERNEL_MAPPING_NAME for f in frames)
    assert symbolizer.stats.errors[ErrorReason.KALLSYMS_RESTRICTED] == 1
    assert symbolizer.stats.frames_unsymbolized == 2


def test_vanished_process_is_symbolized_from_its_snapshot(
    pie_process: Path, fake_proc: Path, nm_functions: NmFunctions
) -> None:
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    symbolizer.processes.observe_process(100)
    shutil.rmtree(fake_proc / "100")
    stack = user_stack(PIE_BASE + nm_functions(pie_process)["outer_c"][0] + 2)
    profile = symbolizer.symbolize(interval(agg(100, user=stack)))
    assert functions(profile) == ["outer_c"]
    assert profile.processes[100].comm == "workload"


def test_vanished_process_whose_binary_changed_keeps_module_and_address(
    symbolize_binaries: dict[str, Path],
    maps_for: MapsFor,
    add_fake_process: AddFakeProcess,
    fake_proc: Path,
    tmp_path: Path,
    nm_functions: NmFunctions,
) -> None:
    binary = tmp_path / "copy_of_pie"
    shutil.copy(symbolize_binaries["pie"], binary)
    add_fake_process(300, maps_for(binary, PIE_BASE), exe=binary)
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    symbolizer.processes.observe_process(300)
    shutil.rmtree(fake_proc / "300")
    os.utime(binary, ns=(0, 1))  # the host path now names a file with another identity
    address = PIE_BASE + nm_functions(binary)["leaf_a"][0]
    frame = symbolizer.symbolize(interval(agg(300, user=user_stack(address)))).samples[0].frames[0]
    assert (frame.function, frame.address) == ("", address)
    assert frame.mapping is not None and frame.mapping.path == str(binary)
    assert symbolizer.stats.errors[ErrorReason.ELF_UNREACHABLE] == 1


def test_garbage_executable_is_counted_once_and_keeps_module_and_address(
    fake_proc: Path, add_fake_process: AddFakeProcess, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(os.urandom(8192))
    inode = os.stat(garbage).st_ino
    add_fake_process(400, [f"7f0000000000-7f0000002000 r-xp 00000000 fd:01 {inode} {garbage}"])
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    sample = agg(400, user=user_stack(0x7F0000000123, 0x7F0000001000))
    for _ in range(3):
        frames = symbolizer.symbolize(interval(sample)).samples[0].frames
        assert [(f.function, f.address) for f in frames] == [("", 0x7F0000000123), ("", 0x7F0000000FFF)]
        assert all(f.mapping is not None and f.mapping.path == str(garbage) for f in frames)
    assert symbolizer.stats.errors[ErrorReason.ELF_NOT_ELF] == 1
    assert symbolizer.stats.elf_cache_hits == 2 and symbolizer.stats.elf_cache_misses == 1


def test_special_mappings_keep_mapping_and_address(fake_proc: Path, add_fake_process: AddFakeProcess) -> None:
    lines = [
        "7ffff7fc1000-7ffff7fc3000 r-xp 00000000 00:00 0 [vdso]",
        "7f0000000000-7f0000001000 rwxp 00000000 00:00 0 ",
        "7f1000000000-7f1000001000 r-xp 00000000 00:01 9 /memfd:jit (deleted)",
        "7f2000000000-7f2000001000 r-xp 00000000 fd:01 9 /old/lib.so (deleted)",
    ]
    add_fake_process(500, lines)
    addresses = (0x7FFFF7FC1010, 0x7F0000000011, 0x7F1000000011, 0x7F2000000011)
    profile = Symbolizer(ProcessRegistry(fake_proc)).symbolize(interval(agg(500, user=user_stack(*addresses))))
    frames = profile.samples[0].frames
    assert [f.function for f in frames] == ["", "", "", ""]
    assert [f.mapping.path if f.mapping else None for f in frames] == [
        "[vdso]",
        "",
        "/memfd:jit (deleted)",
        "/old/lib.so (deleted)",
    ]


VDSO_AT = 0x7FFFF7FC1000


def vdso_line(size: int) -> str:
    return f"{VDSO_AT:x}-{VDSO_AT + size:x} r-xp 00000000 00:00 0 [vdso]"


def test_vdso_frames_are_named_from_the_agents_own_copy(fake_proc: Path, add_fake_process: AddFakeProcess) -> None:
    """The vDSO has no file: the agent's own image (the same for every process) names the frame."""
    own = read_own_vdso()
    image = read_elf_bytes(own, "[vdso]")
    address = VDSO_AT + image.starts[image.names.index("__vdso_clock_gettime")] + 4
    add_fake_process(510, [vdso_line(len(own))])
    add_fake_process(512, [vdso_line(len(own) + 0x1000)])  # another image: a 32-bit process's
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    profile = symbolizer.symbolize(interval(agg(510, user=user_stack(address)), agg(512, user=user_stack(address))))
    named, other = (sample.frames[0] for sample in profile.samples)
    assert named.function == "__vdso_clock_gettime"
    assert named.mapping is not None and (named.mapping.path, named.mapping.build_id) == ("[vdso]", image.build_id)
    assert other.function == "" and other.mapping is not None and other.mapping.path == "[vdso]"


def test_an_unreadable_vdso_is_counted_once_and_leaves_frames_unnamed(
    fake_proc: Path, add_fake_process: AddFakeProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreadable() -> bytes:
        raise VdsoUnavailable("no [vdso] in /proc/self/maps")

    monkeypatch.setattr(native, "read_own_vdso", unreadable)
    add_fake_process(511, [vdso_line(0x2000)])
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    for offset in (0x10, 0x20):
        (frame,) = symbolizer.symbolize(interval(agg(511, user=user_stack(VDSO_AT + offset)))).samples[0].frames
        assert frame.function == "" and frame.mapping is not None and frame.mapping.path == "[vdso]"
    assert symbolizer.stats.errors[ErrorReason.ELF_UNREADABLE] == 1


def test_address_outside_every_mapping_has_no_mapping(pie_process: Path, fake_proc: Path) -> None:
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    frame = symbolizer.symbolize(interval(agg(100, user=user_stack(0x10)))).samples[0].frames[0]
    assert (frame.kind, frame.function, frame.address, frame.mapping) == (FrameKind.NATIVE, "", 0x10, None)


def test_one_binary_is_parsed_once_for_many_samples_processes_and_intervals(
    pie_process: Path, fake_proc: Path, maps_for: MapsFor, add_fake_process: AddFakeProcess, nm_functions: NmFunctions
) -> None:
    add_fake_process(101, maps_for(pie_process, PIE_BASE + 0x10000000))
    nm = nm_functions(pie_process)
    samples = [agg(100, user=user_stack(PIE_BASE + nm["leaf_a"][0] + i), tid=1000 + i) for i in range(50)]
    samples.append(agg(101, user=user_stack(PIE_BASE + 0x10000000 + nm["main"][0])))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc))
    for _ in range(2):
        profile = symbolizer.symbolize(interval(*samples))
        assert [functions(profile, i) for i in range(len(samples))] == [["leaf_a"]] * 50 + [["main"]]
    assert symbolizer.stats.elf_tables_loaded == 1
    assert symbolizer.stats.frames_symbolized == 102
    assert symbolizer.cache_sizes()["elf_tables"] == 1


def test_non_utf8_path_still_opens_and_is_reported_as_valid_utf8(
    symbolize_binaries: dict[str, Path],
    maps_for: MapsFor,
    fake_proc: Path,
    add_fake_process: AddFakeProcess,
    tmp_path: Path,
    nm_functions: NmFunctions,
) -> None:
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/bin\xff"))
    shutil.copy(symbolize_binaries["pie"], odd)
    pid_dir = add_fake_process(600, [], exe=odd)
    (pid_dir / "maps").write_bytes(b"".join(os.fsencode(line) + b"\n" for line in maps_for(odd, PIE_BASE)))
    address = PIE_BASE + nm_functions(odd)["middle_b"][0]
    profile = Symbolizer(ProcessRegistry(fake_proc)).symbolize(interval(agg(600, user=user_stack(address))))
    frame = profile.samples[0].frames[0]
    assert frame.function == "middle_b"
    assert frame.mapping is not None and frame.mapping.path.endswith("/bin\ufffd")
    assert profile.processes[600].exe_path.endswith("/bin\ufffd")
    frame.mapping.path.encode("utf-8")  # protobuf strings must be valid UTF-8
    profile.processes[600].exe_path.encode("utf-8")
