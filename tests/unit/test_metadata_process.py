"""Tests for the metadata stage's process reader (`agent.metadata.process`) against fake /proc trees."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from agent.metadata.process import ProcessLabels, ProcessMetadata

FIXTURES = Path(__file__).parent / "fixtures" / "cgroup"
DOCKER_ID = "62c0387159d0bf7a69edf5d270c68e53693b0c55f17871f74b015dbf7f4ccbaf"
POD_UID = "37af5137-8237-4250-b3fe-f29e6704619e"


def stat_line(pid: int, comm: str, start_time: int) -> str:
    # Fields 3..21, then starttime (22) and a few more, as the kernel writes them.
    after = "S 1 {0} {0} 0 -1 4194560 1234 0 0 0 15 3 0 0 20 0 4 0 {1} 21942272 1163 18446744073709551615"
    return f"{pid} ({comm}) " + after.format(pid, start_time) + "\n"


def make_process(
    proc: Path,
    pid: int,
    *,
    comm: str = "nginx",
    start_time: int = 4242,
    exe: str | None = "/usr/sbin/nginx",
    cmdline: bytes = b"nginx: master process\0-g\0daemon off;\0",
    cgroup: str = "0::/system.slice/nginx.service\n",
) -> Path:
    pid_dir = proc / str(pid)
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / "stat").write_text(stat_line(pid, comm, start_time))
    (pid_dir / "comm").write_text(comm + "\n")
    (pid_dir / "cmdline").write_bytes(cmdline)
    (pid_dir / "cgroup").write_text(cgroup)
    if exe is not None:
        (pid_dir / "exe").symlink_to(exe)
    return pid_dir


def test_reads_every_label_of_a_systemd_service(fake_proc: Path) -> None:
    make_process(fake_proc, 812)
    labels = ProcessMetadata(fake_proc).read(812)
    assert labels == ProcessLabels(
        pid=812,
        comm="nginx",
        exe_path="/usr/sbin/nginx",
        cmdline=("nginx: master process", "-g", "daemon off;"),
        systemd_unit="nginx.service",
        cgroup_path="/system.slice/nginx.service",
    )


def test_reads_container_and_pod_from_the_cgroup_file(fake_proc: Path) -> None:
    make_process(fake_proc, 77, cgroup=(FIXTURES / "k8s-containerd-v2-systemd.txt").read_text())
    labels = ProcessMetadata(fake_proc).read(77)
    assert labels.container_id == "910896c677d06462defef60b3cdd5a8db571a0bf52148cd92871bea57a52d70f"
    assert labels.pod_uid == POD_UID
    assert labels.systemd_unit == ""
    assert labels.cgroup_path.startswith("/kubepods.slice/")


def test_comm_with_spaces_and_parentheses_does_not_shift_the_start_time(fake_proc: Path) -> None:
    make_process(fake_proc, 5, comm="my (odd) prog", start_time=100)
    metadata = ProcessMetadata(fake_proc)
    assert metadata.read(5).comm == "my (odd) prog"
    (fake_proc / "5" / "stat").write_text(stat_line(5, "my (odd) prog", 200))
    (fake_proc / "5" / "comm").write_text("reused\n")
    # A different start time is a different process, which only a correctly parsed field 22 can tell.
    assert metadata.read(5).comm == "reused"


def test_cmdline_is_capped(fake_proc: Path) -> None:
    make_process(fake_proc, 9, cmdline=b"java\0-cp\0" + b"x" * 10_000 + b"\0Main\0")
    labels = ProcessMetadata(fake_proc, max_cmdline_bytes=64).read(9)
    assert labels.cmdline == ("java", "-cp", "x" * (64 - len("java\0-cp\0")))


def test_kernel_thread_has_no_executable_nor_command_line_and_no_error(fake_proc: Path) -> None:
    make_process(fake_proc, 2, comm="kthreadd", exe=None, cmdline=b"", cgroup="0::/\n")
    metadata = ProcessMetadata(fake_proc)
    assert metadata.read(2) == ProcessLabels(pid=2, comm="kthreadd", cgroup_path="/")
    assert metadata.stats.vanished == 0
    assert not metadata.stats.unreadable


def test_vanished_pid_gives_empty_labels_and_is_counted(fake_proc: Path) -> None:
    metadata = ProcessMetadata(fake_proc)
    assert metadata.read(31337) == ProcessLabels(pid=31337)
    assert metadata.stats.vanished == 1
    assert len(metadata) == 0


def test_process_exiting_mid_read_is_counted_and_not_cached(fake_proc: Path) -> None:
    pid_dir = make_process(fake_proc, 40)
    (pid_dir / "comm").unlink()  # stat was readable, comm no longer is: the process exited in between
    metadata = ProcessMetadata(fake_proc)
    assert metadata.read(40) == ProcessLabels(pid=40)
    assert metadata.stats.vanished == 1
    assert len(metadata) == 0


def test_unreadable_files_are_counted_by_name_and_leave_fields_empty(fake_proc: Path) -> None:
    pid_dir = make_process(fake_proc, 41, exe=None)
    (pid_dir / "exe").write_text("not a link")  # readlink: EINVAL
    (pid_dir / "cmdline").unlink()
    (pid_dir / "cmdline").mkdir()  # open: EISDIR
    metadata = ProcessMetadata(fake_proc)
    labels = metadata.read(41)
    assert (labels.comm, labels.exe_path, labels.cmdline, labels.systemd_unit) == ("nginx", "", (), "nginx.service")
    assert metadata.stats.unreadable == {"exe": 1, "cmdline": 1}
    assert metadata.stats.vanished == 0


def test_malformed_stat_still_gives_labels(fake_proc: Path) -> None:
    pid_dir = make_process(fake_proc, 42)
    (pid_dir / "stat").write_text("42 (nginx) S\n")
    metadata = ProcessMetadata(fake_proc)
    assert metadata.read(42).comm == "nginx"
    assert set(metadata.stats.unreadable) == {"stat"}


def test_second_read_of_the_same_process_comes_from_the_cache(fake_proc: Path) -> None:
    pid_dir = make_process(fake_proc, 50)
    metadata = ProcessMetadata(fake_proc)
    first = metadata.read(50)
    (pid_dir / "comm").write_text("renamed\n")  # same start time: the same process, so not re-read
    assert metadata.read(50) is first
    assert (metadata.stats.cache_hits, metadata.stats.cache_misses) == (1, 1)


def test_reused_pid_is_read_afresh(fake_proc: Path) -> None:
    make_process(fake_proc, 60, comm="old", start_time=1000)
    metadata = ProcessMetadata(fake_proc)
    assert metadata.read(60).comm == "old"
    make_process(fake_proc, 61)  # unrelated, keeps the directory layout honest
    (fake_proc / "60" / "stat").write_text(stat_line(60, "new", 2000))
    (fake_proc / "60" / "comm").write_text("new\n")
    assert metadata.read(60).comm == "new"
    assert metadata.stats.cache_misses == 2


def test_pid_reused_while_being_read_is_not_cached(fake_proc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_process(fake_proc, 70, start_time=1000)
    metadata = ProcessMetadata(fake_proc)
    original = ProcessMetadata._read_labels

    def read_then_reuse(self: ProcessMetadata, pid: int) -> ProcessLabels:
        labels = original(self, pid)
        (fake_proc / "70" / "stat").write_text(stat_line(70, "other", 1001))
        return labels

    monkeypatch.setattr(ProcessMetadata, "_read_labels", read_then_reuse)
    assert metadata.read(70).comm == "nginx"
    assert len(metadata) == 0


def test_cache_is_bounded_least_recently_used_first(fake_proc: Path) -> None:
    for pid in (1, 2, 3):
        make_process(fake_proc, pid, comm=f"p{pid}")
    metadata = ProcessMetadata(fake_proc, cache_size=2)
    metadata.read(1)
    metadata.read(2)
    metadata.read(1)  # 1 is now the most recently used
    metadata.read(3)  # evicts 2
    assert len(metadata) == 2
    assert metadata.stats.cache_evictions == 1
    hits = metadata.stats.cache_hits
    metadata.read(1)
    assert metadata.stats.cache_hits == hits + 1
    metadata.read(2)
    assert metadata.stats.cache_misses == 4


def test_idle_task_is_not_read(fake_proc: Path) -> None:
    metadata = ProcessMetadata(fake_proc)
    assert metadata.read(0) == ProcessLabels(pid=0)
    assert metadata.stats.vanished == 0


def test_cache_size_must_be_positive(fake_proc: Path) -> None:
    with pytest.raises(ValueError, match="cache_size"):
        ProcessMetadata(fake_proc, cache_size=0)


def test_reads_this_test_process_from_the_real_proc() -> None:
    labels = ProcessMetadata().read(os.getpid())
    assert labels.pid == os.getpid()
    assert os.path.realpath(labels.exe_path) == os.path.realpath(sys.executable)
    assert labels.comm == Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert labels.cmdline[0] == Path(f"/proc/{os.getpid()}/cmdline").read_bytes().split(b"\0")[0].decode()
    assert labels.cgroup_path.startswith("/")
