"""Tests for the unwind stage's stack walk (`agent.unwind.unwinder`, `agent.unwind.spaces`) over a fake /proc.

The library built from `UNWIND_ASM` is mapped, in a fake `/proc/PID/maps`, at `LOAD_BASE`; each test lays
out the stack copy by hand (return addresses and saved rbp values at known offsets from `STACK`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.probes.events import StackEvent, UserStackCopy
from agent.process.jvm.frames import InterpreterFrames
from agent.process.maps import ProcessMaps
from agent.types import EMPTY_STACK, Stack, StackStatus
from agent.unwind import spaces
from agent.unwind.unwinder import Unwinder
from tests.support.fixture_types import AddFakeProcess, MapsFor
from tests.unit.unwind_fixtures import build_library, require_toolchain, symbol_addresses, unaligned_text_script

PID = 4242
LOAD_BASE = 0x7F12_3450_0000
OTHER_BASE = 0x7F55_0000_0000
ANON = 0x7F66_0000_0000  # an anonymous executable mapping (JIT code): no CFI
ANON_LINE = f"{ANON:x}-{ANON + 0x1000:x} r-xp 00000000 00:00 0 "
STACK = 0x7FFD_1000_0000  # where each stack copy starts
SP = STACK + 0x40
UNMAPPED = 0x1234


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_toolchain()
    return build_library(tmp_path_factory.mktemp("unwind_walk"), "libwalk")


@pytest.fixture(scope="module")
def labels(library: Path) -> dict[str, int]:
    return symbol_addresses(library)


@pytest.fixture
def process(library: Path, maps_for: MapsFor, add_fake_process: AddFakeProcess) -> Path:
    """fake_proc/PID mapping the library at LOAD_BASE and an anonymous executable page at ANON."""
    return add_fake_process(PID, [*maps_for(library, LOAD_BASE), ANON_LINE])


@pytest.fixture
def at(labels: dict[str, int]) -> Callable[[str], int]:
    """The runtime address of a label of the library loaded at LOAD_BASE."""
    return lambda label: LOAD_BASE + labels[label]


def stack_copy(ip: int, sp: int, bp: int, words: dict[int, int], size: int = 0x100) -> UserStackCopy:
    """A copy of `size` bytes from STACK, zero but for `words` ({address: u64}); words past `size` are cut off."""
    data = bytearray(max(size, *(address + 8 - STACK for address in words)))
    for address, value in words.items():
        struct.pack_into("<Q", data, address - STACK, value)
    return UserStackCopy(ip, sp, bp, STACK, bytes(data[:size]))


def event(copy: UserStackCopy | None, user: Stack = EMPTY_STACK, profiler: str = "cpu") -> StackEvent:
    return StackEvent(profiler, 0, PID, PID, 0, False, "prog", EMPTY_STACK, user, (1.0,), copy)


def leaf_fp_outer_copy(
    at: Callable[[str], int], ret_into_fp: int, ret_into_outer: int, size: int = 0x100
) -> UserStackCopy:
    """Sampled in leaf_func after `sub $24`: [sp+24] returns into the frame-pointer function, whose frame
    (rbp = sp+32) holds the outermost function's rbp (0) and the return address into it."""
    bp = SP + 32
    return stack_copy(at("leaf_subbed"), SP, bp, {SP + 24: ret_into_fp, bp: 0, bp + 8: ret_into_outer}, size)


def test_frameless_leaf_through_frame_pointer_function_to_outermost(
    process: Path, at: Callable[[str], int], fake_proc: Path
) -> None:
    """rsp+32 leaf -> rbp+16 caller -> undefined-rip outermost: three frames and status OK."""
    unwinder = Unwinder(proc_root=fake_proc)
    copy = leaf_fp_outer_copy(at, at("fp_ret"), at("outer_ret"))
    stack = unwinder.unwind(event(copy))
    assert stack == Stack(StackStatus.OK, (at("leaf_subbed"), at("fp_ret"), at("outer_ret")))
    assert unwinder.outcomes["complete"] == 1
    assert unwinder.outcomes["truncated"] == 0
    assert unwinder.frames == 3
    assert unwinder.frame_pointer_steps == 0
    assert unwinder.tables.stats.loaded == 1


def test_caller_is_found_from_the_call_instruction_not_the_return_address(
    process: Path, at: Callable[[str], int], fake_proc: Path
) -> None:
    """fp_noreturn ends with its call, so its return address is leaf_func's entry: the rule at ra-1 applies."""
    unwinder = Unwinder(proc_root=fake_proc)
    copy = leaf_fp_outer_copy(at, at("leaf_func"), at("outer_ret"))
    stack = unwinder.unwind(event(copy))
    assert stack == Stack(StackStatus.OK, (at("leaf_subbed"), at("leaf_func"), at("outer_ret")))


def test_copy_ending_before_a_return_address_truncates(
    process: Path, at: Callable[[str], int], fake_proc: Path
) -> None:
    """When the caller's return address lies beyond the copy, the frames found so far come back TRUNCATED."""
    unwinder = Unwinder(proc_root=fake_proc)
    copy = leaf_fp_outer_copy(at, at("fp_ret"), at("outer_ret"), size=SP + 40 - STACK)  # ends at rbp+8
    stack = unwinder.unwind(event(copy))
    assert stack == Stack(StackStatus.TRUNCATED, (at("leaf_subbed"), at("fp_ret")))
    assert unwinder.outcomes["truncated"] == 1


def test_return_address_outside_every_mapping_is_dropped(
    process: Path, at: Callable[[str], int], fake_proc: Path
) -> None:
    """A return address that is not code ends the walk without being kept: TRUNCATED."""
    unwinder = Unwinder(proc_root=fake_proc)
    copy = leaf_fp_outer_copy(at, at("fp_ret"), UNMAPPED)
    stack = unwinder.unwind(event(copy))
    assert stack == Stack(StackStatus.TRUNCATED, (at("leaf_subbed"), at("fp_ret")))


def test_zero_return_address_ends_the_stack_cleanly(process: Path, at: Callable[[str], int], fake_proc: Path) -> None:
    """A return address of 0 (the end of a frame-pointer chain) is the outermost frame: status OK."""
    unwinder = Unwinder(proc_root=fake_proc)
    copy = leaf_fp_outer_copy(at, at("fp_ret"), 0)
    stack = unwinder.unwind(event(copy))
    assert stack == Stack(StackStatus.OK, (at("leaf_subbed"), at("fp_ret")))


def test_anonymous_code_is_stepped_with_the_frame_pointer(
    process: Path, at: Callable[[str], int], fake_proc: Path
) -> None:
    """JIT-like code without CFI: the caller comes from [rbp+8], and the step is counted."""
    unwinder = Unwinder(proc_root=fake_proc)
    bp = SP + 0x20
    copy = stack_copy(ANON + 0x10, SP, bp, {bp: 0, bp + 8: at("outer_ret")})
    stack = unwinder.unwind(event(copy))
    assert stack == Stack(StackStatus.OK, (ANON + 0x10, at("outer_ret")))
    assert unwinder.frame_pointer_steps == 1


def test_cfa_expression_falls_back_to_the_frame_pointer(
    process: Path, at: Callable[[str], int], fake_proc: Path
) -> None:
    """A CFA the unwinder cannot compute (an expression) is stepped with the frame pointer."""
    unwinder = Unwinder(proc_root=fake_proc)
    bp = SP + 0x20
    copy = stack_copy(at("expr_body"), SP, bp, {bp: 0, bp + 8: at("outer_ret")})
    stack = unwinder.unwind(event(copy))
    assert stack == Stack(StackStatus.OK, (at("expr_body"), at("outer_ret")))
    assert unwinder.frame_pointer_steps == 1


def test_frame_pointer_pointing_at_itself_stops_the_walk(process: Path, fake_proc: Path) -> None:
    """A saved rbp equal to its own address would loop forever: the stack pointer stops moving, the walk ends."""
    unwinder = Unwinder(proc_root=fake_proc)
    bp = SP
    copy = stack_copy(ANON + 0x10, SP, bp, {bp: bp, bp + 8: ANON + 0x20})
    stack = unwinder.unwind(event(copy))
    assert stack == Stack(StackStatus.TRUNCATED, (ANON + 0x10, ANON + 0x20))


def test_cfa_below_the_stack_pointer_stops_the_walk(process: Path, at: Callable[[str], int], fake_proc: Path) -> None:
    """An rbp-based CFA at or below the stack pointer (a stale rbp) ends the walk at the leaf."""
    unwinder = Unwinder(proc_root=fake_proc)
    sp, bp = STACK + 0x80, STACK + 0x40  # CFA = rbp+16 = sp-0x30
    copy = stack_copy(at("fp_ret"), sp, bp, {bp: 0, bp + 8: at("fp_ret")})
    stack = unwinder.unwind(event(copy))
    assert stack == Stack(StackStatus.TRUNCATED, (at("fp_ret"),))


def test_event_without_copy_keeps_its_user_stack(process: Path, fake_proc: Path) -> None:
    """An event whose program copied no stack comes back with `event.user`, the same object."""
    unwinder = Unwinder(proc_root=fake_proc)
    user = Stack(StackStatus.OK, (0x1000, 0x2000))
    assert unwinder.unwind(event(None, user)) is user
    assert not unwinder.outcomes


def test_equal_stacks_are_interned(process: Path, at: Callable[[str], int], fake_proc: Path) -> None:
    """Two events that unwind to equal stacks share one Stack object."""
    unwinder = Unwinder(proc_root=fake_proc)
    first = unwinder.unwind(event(leaf_fp_outer_copy(at, at("fp_ret"), at("outer_ret"))))
    other_copy = leaf_fp_outer_copy(at, at("fp_ret"), at("outer_ret"), size=0x200)  # different bytes, same walk
    assert unwinder.unwind(event(other_copy)) is first


def test_a_frame_pointer_stack_is_unwound_from_the_copy_too(
    process: Path, at: Callable[[str], int], fake_proc: Path
) -> None:
    """The kernel's frame-pointer stack is never taken as it is: the copy is unwound (to the same frames)."""
    unwinder = Unwinder(proc_root=fake_proc)
    user = Stack(StackStatus.OK, (at("fp_framed"), at("outer_ret")))
    copy = stack_copy(at("fp_framed"), SP, SP, {SP: 0, SP + 8: at("outer_ret")})
    stack = unwinder.unwind(event(copy, user))
    assert stack is not user
    assert stack == user


def test_without_mappings_the_frame_pointer_stack_is_kept(at: Callable[[str], int], tmp_path: Path) -> None:
    """A process whose maps cannot be read (gone, no snapshot) keeps the kernel's frame-pointer stack."""
    unwinder = Unwinder(proc_root=tmp_path)
    user = Stack(StackStatus.OK, (at("fp_framed"), at("outer_ret")))
    copy = stack_copy(at("fp_framed"), SP, SP, {SP: 0, SP + 8: at("outer_ret")})
    assert unwinder.unwind(event(copy, user)) is user
    assert unwinder.outcomes == {"no_mappings": 1}


def test_pids_the_filters_rejected_are_not_unwound(process: Path, at: Callable[[str], int], fake_proc: Path) -> None:
    """Their events are dropped after decoding anyway: the frame-pointer stack is kept, at no cost."""
    unwinder = Unwinder(proc_root=fake_proc, skip=lambda pid: pid == PID + 1)
    user = Stack(StackStatus.OK, (at("fp_framed"), at("outer_ret")))
    copy = stack_copy(at("fp_framed"), SP, SP, {SP: 0, SP + 8: at("outer_ret")})
    assert unwinder.unwind_copy(PID + 1, copy, user) is user
    assert unwinder.unwind_copy(PID, copy, user) == user  # unwound: an equal stack, not the same object
    assert unwinder.outcomes == {"skipped": 1, "complete": 1}


def test_a_snapshot_stands_in_for_the_maps_of_a_process_gone(
    process: Path, at: Callable[[str], int], fake_proc: Path, tmp_path: Path
) -> None:
    """The symbolize stage's captured mappings are used when /proc/PID/maps is gone."""
    from agent.process.maps import read_process_maps

    snapshot = read_process_maps(fake_proc, PID)
    unwinder = Unwinder(proc_root=tmp_path / "empty-proc", snapshots={PID: snapshot}.get)
    unwinder.tables = spaces.UnwindTables(fake_proc)  # the files themselves are still reachable
    stack = unwinder.unwind(event(leaf_fp_outer_copy(at, at("fp_ret"), at("outer_ret"))))
    assert stack == Stack(StackStatus.OK, (at("leaf_subbed"), at("fp_ret"), at("outer_ret")))


def test_a_record_read_before_its_announcement_reads_the_announcements_first(
    process: Path, at: Callable[[str], int], fake_proc: Path, tmp_path: Path
) -> None:
    """The record of a process already gone came from another CPU's buffer than its announcement: the
    unwinder reads the waiting announcements (which lay the process out) before it settles for none."""
    from agent.process.maps import read_process_maps

    snapshots: dict[int, ProcessMaps] = {}
    unwinder = Unwinder(proc_root=tmp_path / "empty-proc", snapshots=snapshots.get)
    unwinder.tables = spaces.UnwindTables(fake_proc)

    def announcement_read() -> None:  # as ProcessRegistry.announced does, from the reader's catch-up
        snapshots[PID] = read_process_maps(fake_proc, PID)

    unwinder.catch_up = announcement_read
    stack = unwinder.unwind(event(leaf_fp_outer_copy(at, at("fp_ret"), at("outer_ret"))))
    assert stack == Stack(StackStatus.OK, (at("leaf_subbed"), at("fp_ret"), at("outer_ret")))


def test_a_space_read_after_the_process_had_gone_takes_its_later_snapshot(
    process: Path, at: Callable[[str], int], fake_proc: Path, tmp_path: Path
) -> None:
    """No snapshot and no /proc at the first record; the registry laid the process out since."""
    from agent.process.maps import read_process_maps

    snapshots: dict[int, ProcessMaps] = {}
    unwinder = Unwinder(proc_root=tmp_path / "empty-proc", snapshots=snapshots.get)
    unwinder.tables = spaces.UnwindTables(fake_proc)
    copy = leaf_fp_outer_copy(at, at("fp_ret"), at("outer_ret"))
    assert unwinder.unwind(event(copy)).addresses != (at("leaf_subbed"), at("fp_ret"), at("outer_ret"))
    snapshots[PID] = read_process_maps(fake_proc, PID)
    assert unwinder.unwind(event(copy)) == Stack(StackStatus.OK, (at("leaf_subbed"), at("fp_ret"), at("outer_ret")))


def test_forget_rereads_the_maps(
    process: Path,
    labels: dict[str, int],
    at: Callable[[str], int],
    fake_proc: Path,
    library: Path,
    maps_for: MapsFor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After `forget(pid)` the next unwind reads the maps again and finds the library at its new base."""
    monkeypatch.setattr(spaces, "MAPS_REFRESH_S", 1e9)  # no re-read on a miss: only forget() may re-read
    unwinder = Unwinder(proc_root=fake_proc)
    assert len(unwinder.unwind(event(leaf_fp_outer_copy(at, at("fp_ret"), at("outer_ret")))).addresses) == 3
    (process / "maps").write_text("".join(line + "\n" for line in maps_for(library, OTHER_BASE)))
    moved = leaf_fp_outer_copy(
        lambda label: OTHER_BASE + labels[label], OTHER_BASE + labels["fp_ret"], OTHER_BASE + labels["outer_ret"]
    )
    leaf = OTHER_BASE + labels["leaf_subbed"]
    assert unwinder.unwind(event(moved)) == Stack(StackStatus.TRUNCATED, (leaf,))  # the old snapshot
    unwinder.forget(PID)
    expected = (leaf, OTHER_BASE + labels["fp_ret"], OTHER_BASE + labels["outer_ret"])
    assert unwinder.unwind(event(moved)) == Stack(StackStatus.OK, expected)


def test_unwind_table_is_shared_between_processes(
    process: Path,
    at: Callable[[str], int],
    fake_proc: Path,
    library: Path,
    maps_for: MapsFor,
    add_fake_process: AddFakeProcess,
) -> None:
    """Two processes mapping the same file share one table, loaded once."""
    add_fake_process(PID + 1, maps_for(library, LOAD_BASE))
    unwinder = Unwinder(proc_root=fake_proc)
    copy = leaf_fp_outer_copy(at, at("fp_ret"), at("outer_ret"))
    first = unwinder.unwind(event(copy))
    second = unwinder.unwind(event(copy)._replace(pid=PID + 1))
    assert first is second
    assert first.status is StackStatus.OK
    assert unwinder.tables.stats.loaded == 1
    assert len(unwinder.tables) == 1


def test_return_address_in_a_register_truncates(process: Path, at: Callable[[str], int], fake_proc: Path) -> None:
    """A return address the unwinder cannot recover (kept in rax) ends the stack TRUNCATED, not OK."""
    unwinder = Unwinder(proc_root=fake_proc)
    copy = stack_copy(at("ra_reg_body"), SP, SP, {SP: at("outer_ret")})
    stack = unwinder.unwind(event(copy))
    assert stack.status is StackStatus.TRUNCATED
    assert unwinder.outcomes["complete"] == 0


def test_library_mapped_after_a_miss_is_found(
    fake_proc: Path,
    at: Callable[[str], int],
    library: Path,
    maps_for: MapsFor,
    add_fake_process: AddFakeProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An address outside the maps snapshot is looked up again once the library appears in /proc/PID/maps."""
    monkeypatch.setattr(spaces, "MAPS_REFRESH_S", 0.0)  # every miss may re-read the maps
    pid_dir = add_fake_process(PID, [ANON_LINE])
    unwinder = Unwinder(proc_root=fake_proc)
    copy = leaf_fp_outer_copy(at, at("fp_ret"), at("outer_ret"))
    assert unwinder.unwind(event(copy)).status is StackStatus.TRUNCATED
    (pid_dir / "maps").write_text("".join(line + "\n" for line in [*maps_for(library, LOAD_BASE), ANON_LINE]))
    assert unwinder.unwind(event(copy)) == Stack(StackStatus.OK, (at("leaf_subbed"), at("fp_ret"), at("outer_ret")))


def test_library_with_unaligned_text_segment_unwinds(
    tmp_path: Path, fake_proc: Path, maps_for: MapsFor, add_fake_process: AddFakeProcess
) -> None:
    """A library whose executable PT_LOAD has p_offset 0x299, p_vaddr 0x1299 (mapped from offset 0) unwinds."""
    require_toolchain()
    library = build_library(tmp_path, "libunaligned", linker_script=unaligned_text_script(tmp_path))
    labels = symbol_addresses(library)
    add_fake_process(PID, maps_for(library, LOAD_BASE))

    def at(label: str) -> int:
        return LOAD_BASE + labels[label]

    unwinder = Unwinder(proc_root=fake_proc)
    stack = unwinder.unwind(event(leaf_fp_outer_copy(at, at("fp_ret"), at("outer_ret"))))
    assert stack == Stack(StackStatus.OK, (at("leaf_subbed"), at("fp_ret"), at("outer_ret")))


def test_interpreter_frames_of_a_jvm_carry_their_method_and_bytecode_pointer(
    process: Path, at: Callable[[str], int], fake_proc: Path
) -> None:
    """Two frames in a JVM's interpreter (the anonymous page): each frame's Method* (3 words below its
    rbp) and bytecode pointer (8 below) go into the stack's `java`, with the frame's index; the native
    caller does not. Without `set_java` nothing is read."""
    interpreter = InterpreterFrames(ANON, ANON + 0x1000, -24, -64)
    inner, outer = SP + 0x80, SP + 0x100  # two interpreter frames' rbp values
    words = {
        inner: outer, inner + 8: ANON + 0x40, inner - 24: 0x7000_1000, inner - 64: 0x7000_2000 + 5,
        outer: 0, outer + 8: at("outer_ret"), outer - 24: 0x7000_3000, outer - 64: 0x7000_4000 + 9,
    }  # fmt: skip
    copy = stack_copy(ANON + 0x10, SP, inner, words, size=0x200)
    unwinder = Unwinder(proc_root=fake_proc)
    plain = unwinder.unwind(event(copy))
    unwinder.set_java(PID, interpreter)
    stack = unwinder.unwind(event(copy))
    assert stack.addresses == plain.addresses == (ANON + 0x10, ANON + 0x40, at("outer_ret"))
    assert plain.java == ()
    assert stack.java == (0, 0x7000_1000, 0x7000_2005, 1, 0x7000_3000, 0x7000_4009)
    assert stack != plain  # a different key for the aggregate stage
    unwinder.set_java(PID, None)
    assert unwinder.unwind(event(copy)).java == ()
