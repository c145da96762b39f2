"""Processes gone before their maps were read, laid out from earlier processes of the same executable
(`agent.process.templates`, through `ProcessRegistry.announced`). The fake /proc holds the processes
that were read; a process with no /proc entry is one that exited before the registry reached it."""

from __future__ import annotations

import time
from pathlib import Path

from agent.process.maps import ProcessMaps
from agent.process.registry import ProcessRegistry
from agent.process.templates import ProcessTemplates
from agent.types import ImageLayout
from tests.support.fixture_types import AddFakeProcess

EXE = "/opt/app/bin/app"
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
LD = "/lib64/ld-linux-x86-64.so.2"
APP = (1, 11)  # the kernel's (device, inode) of EXE


def maps_lines(exe_base: int, mmap_base: int, vdso: int, libc: bool = True) -> list[str]:
    """What /proc/PID/maps shows of one run: the executable at its load base, the dynamic loader and
    libc below the top of the mmap region, the vDSO where the kernel put it."""
    lines = [
        f"{exe_base + 0x1000:x}-{exe_base + 0x3000:x} r-xp 00001000 fd:01 11 {EXE}",
        f"{mmap_base - 0x30000:x}-{mmap_base - 0x10000:x} r-xp 00001000 fd:01 13 {LD}",
        f"{vdso:x}-{vdso + 0x2000:x} r-xp 00000000 00:00 0 [vdso]",
        "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]",
    ]
    if libc:
        lines.append(f"{mmap_base - 0x200000:x}-{mmap_base - 0x180000:x} r-xp 00028000 fd:01 12 {LIBC}")
    return lines


def layout(exe_base: int, mmap_base: int, vdso: int, app: tuple[int, int] = APP, comm: str = "app") -> ImageLayout:
    return ImageLayout(app[0], app[1], exe_base + 0x1000, mmap_base, vdso, comm)


RUNS = [  # (exe base, mmap base, vdso) of separate runs: each region moved as a whole
    (0x555555554000, 0x7FFFF7FFF000, 0x7FFFF7FC1000),
    (0x55D0C0A00000, 0x7F3A11E4C000, 0x7F3A11E0E000),
    (0x5601AB123000, 0x7F99AA000000, 0x7F99A9FC2000),
]


def run(add_fake_process: AddFakeProcess, processes: ProcessRegistry, pid: int, bases: tuple[int, int, int]) -> None:
    """A process that was read: announced while its /proc entry is there."""
    add_fake_process(pid, maps_lines(*bases), comm="app", exe=Path(EXE))
    processes.announced(pid, 1, exec_=False, layout=layout(*bases))


def starts(maps: ProcessMaps | None) -> dict[str, int]:
    assert maps is not None
    return {entry.path: entry.start for entry in maps.mappings}


def test_a_process_gone_unread_is_laid_out_from_two_agreeing_readings(
    fake_proc: Path, add_fake_process: AddFakeProcess
) -> None:
    processes = ProcessRegistry(fake_proc)
    run(add_fake_process, processes, 100, RUNS[0])
    run(add_fake_process, processes, 101, RUNS[1])
    exe_base, mmap_base, vdso = RUNS[2]
    processes.announced(102, 1, exec_=False, layout=layout(*RUNS[2], comm="app-worker"))
    assert starts(processes.get(102)) == {
        EXE: exe_base + 0x1000,
        LD: mmap_base - 0x30000,
        "[vdso]": vdso,
        LIBC: mmap_base - 0x200000,
        "[vsyscall]": 0xFFFFFFFFFF600000,
    }
    snapshot = processes.snapshot(102)
    assert snapshot is not None and snapshot.maps.comm == "app-worker" and snapshot.maps.exe_path == EXE
    assert snapshot.labels.container_id == "" and snapshot.labels.comm == "app-worker"  # nothing was read of it
    assert (processes.stats.captured, processes.stats.vanished, processes.stats.laid_out) == (2, 1, 1)
    assert processes.sizes()["process_templates"] == 1


def test_one_reading_is_not_trusted_and_other_executables_get_nothing(
    fake_proc: Path, add_fake_process: AddFakeProcess
) -> None:
    processes = ProcessRegistry(fake_proc)
    run(add_fake_process, processes, 100, RUNS[0])
    processes.announced(102, 1, exec_=False, layout=layout(*RUNS[2]))
    assert processes.get(102) is None  # one reading cannot tell how this executable is laid out
    run(add_fake_process, processes, 101, RUNS[1])
    processes.announced(103, 1, exec_=False, layout=layout(*RUNS[2], app=(1, 99)))
    assert processes.get(103) is None
    assert processes.stats.laid_out == 0


def test_a_reading_taken_before_libc_was_mapped_agrees_and_the_fuller_one_is_kept(
    fake_proc: Path, add_fake_process: AddFakeProcess
) -> None:
    processes = ProcessRegistry(fake_proc)
    add_fake_process(100, maps_lines(*RUNS[0], libc=False), comm="app", exe=Path(EXE))
    processes.announced(100, 1, exec_=False, layout=layout(*RUNS[0]))  # sampled in the dynamic loader
    run(add_fake_process, processes, 101, RUNS[1])
    processes.announced(102, 1, exec_=False, layout=layout(*RUNS[2]))
    assert LIBC in starts(processes.get(102))


def test_a_reading_that_disagrees_needs_another_before_it_is_used(
    fake_proc: Path, add_fake_process: AddFakeProcess
) -> None:
    templates = ProcessTemplates()
    for pid, bases in enumerate(RUNS[:2], start=100):
        templates.learn(layout(*bases), read(fake_proc, add_fake_process, pid, maps_lines(*bases)))
    preloaded = maps_lines(*RUNS[0])
    moved = RUNS[0][1] - 0x300000
    preloaded[-1] = f"{moved:x}-{moved + 0x80000:x} r-xp 00028000 fd:01 12 {LIBC}"
    templates.learn(layout(*RUNS[0]), read(fake_proc, add_fake_process, 110, preloaded))  # LD_PRELOAD moved libc
    assert templates.disagreed == 1
    assert templates.lay_out(120, layout(*RUNS[2])) is None
    templates.learn(layout(*RUNS[0]), read(fake_proc, add_fake_process, 111, preloaded))
    laid_out = templates.lay_out(120, layout(*RUNS[2]))
    assert starts(laid_out)[LIBC] == RUNS[2][1] - 0x300000


def read(fake_proc: Path, add_fake_process: AddFakeProcess, pid: int, lines: list[str]) -> ProcessMaps:
    add_fake_process(pid, lines, comm="app", exe=Path(EXE))
    maps = ProcessRegistry(fake_proc).capture(pid)
    assert maps is not None and maps.mappings
    return maps


def test_the_least_recently_used_executable_goes_first(fake_proc: Path, add_fake_process: AddFakeProcess) -> None:
    templates = ProcessTemplates(capacity=2)
    maps = read(fake_proc, add_fake_process, 100, maps_lines(*RUNS[0]))
    for inode in (1, 2, 3):
        templates.learn(layout(*RUNS[0], app=(1, inode)), maps)
        templates.learn(layout(*RUNS[0], app=(1, inode)), maps)
    assert len(templates) == 2
    assert templates.lay_out(120, layout(*RUNS[1], app=(1, 1))) is None
    assert templates.lay_out(120, layout(*RUNS[1], app=(1, 3))) is not None


def test_a_new_image_gone_unread_does_not_take_the_old_images_place(
    fake_proc: Path, add_fake_process: AddFakeProcess
) -> None:
    """A shell read while it ran, which exec'd the app and exited before the app's maps were read: its
    samples from before the exec keep the shell's image; those after get the app's template, or nothing."""
    processes = ProcessRegistry(fake_proc)
    run(add_fake_process, processes, 100, RUNS[0])
    run(add_fake_process, processes, 101, RUNS[1])
    add_fake_process(200, [f"{0x400000:x}-{0x401000:x} r-xp 00000000 fd:01 5 /bin/sh"], comm="sh", exe=Path("/bin/sh"))
    started = time.monotonic_ns()
    processes.announced(200, started, exec_=False, layout=layout(0x400000, RUNS[0][1], RUNS[0][2], app=(1, 5)))
    exec_ns = time.monotonic_ns()  # after the shell was read
    processes.announced(200, exec_ns, exec_=True)
    (fake_proc / "200" / "maps").write_text("")  # gone: a zombie's empty maps, and no exe
    (fake_proc / "200" / "exe").unlink()
    processes.announced(200, exec_ns + 1, exec_=False, layout=layout(*RUNS[2]))
    assert starts(processes.get(200))[EXE] == RUNS[2][0] + 0x1000
    retired = processes.retired_at(200, exec_ns - 1)
    assert retired is not None and retired.maps.comm == "sh"
    # Without a template, the old image stands in for the process, as before (its samples are named).
    add_fake_process(300, [f"{0x400000:x}-{0x401000:x} r-xp 00000000 fd:01 5 /bin/sh"], comm="sh", exe=Path("/bin/sh"))
    processes.announced(300, time.monotonic_ns(), exec_=False, layout=layout(0x400000, *RUNS[0][1:], app=(1, 5)))
    exec_ns = time.monotonic_ns()
    processes.announced(300, exec_ns, exec_=True)
    (fake_proc / "300" / "maps").write_text("")
    (fake_proc / "300" / "exe").unlink()
    processes.announced(300, exec_ns + 1, exec_=False, layout=layout(*RUNS[2], app=(1, 77)))
    assert starts(processes.get(300)) == {"/bin/sh": 0x400000}
