"""Tests for the export stage's local file sink (`agent.export.files.FileSink`)."""

from __future__ import annotations

import errno
import gzip
import os
import stat
from pathlib import Path

import pytest

from agent.errors import ConfigError, ExportError
from agent.export import files
from agent.export.files import FileSink
from agent.export.sink import Sink
from agent.symbolize.types import Profile
from agent.types import ProfileSpec, ValueType

START_NS = 1_795_363_512_987_654_321  # 2026-11-22T16:05:12.987654321Z
STAMP = "20261122T160512Z"
SECOND = 1_000_000_000


def spec(name: str = "cpu") -> ProfileSpec:
    return ProfileSpec(name, (ValueType("samples", "count"),), ValueType("cpu", "nanoseconds"), 52_631_579)


def profile(start_ns: int = START_NS, name: str = "cpu") -> Profile:
    return Profile(spec(name), start_ns, 10 * SECOND, (), {})


def payload(size: int) -> bytes:
    # Incompressible, so every file of one payload size has the same, predictable size on disk.
    return os.urandom(size)


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_file_sink_is_a_sink(tmp_path: Path) -> None:
    sink: Sink = FileSink(tmp_path, max_files=0, max_bytes=0)
    assert isinstance(sink, Sink)
    assert sink.name == "files"


def test_export_writes_gzip_atomically_with_utc_start_name(tmp_path: Path) -> None:
    out = tmp_path / "profiles" / "nested"
    sink = FileSink(out, max_files=0, max_bytes=0)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    data = b"\x0a\x02\x08\x01" * 100
    path = sink.export(profile(), data)
    assert path == out / f"cpu-{STAMP}.pb.gz"
    assert listing(out) == [path.name], "no temp file may be left behind"
    raw = path.read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    assert gzip.decompress(raw) == data
    assert stat.S_IMODE(path.stat().st_mode) == files.FILE_MODE
    assert (sink.files_written, sink.bytes_written, sink.files_deleted, sink.errors) == (1, len(raw), 0, 0)


def test_same_start_second_gets_a_counter(tmp_path: Path) -> None:
    sink = FileSink(tmp_path, max_files=0, max_bytes=0)
    paths = [sink.export(profile(START_NS + i), f"p{i}".encode()) for i in range(3)]
    assert [p.name for p in paths] == [f"cpu-{STAMP}.pb.gz", f"cpu-{STAMP}-1.pb.gz", f"cpu-{STAMP}-2.pb.gz"]
    assert [gzip.decompress(p.read_bytes()) for p in paths] == [b"p0", b"p1", b"p2"]
    other = sink.export(profile(name="offcpu"), b"x")
    assert other.name == f"offcpu-{STAMP}.pb.gz"


def test_retention_by_count_deletes_oldest_own_files_only(tmp_path: Path) -> None:
    foreign = ["notes.txt", "cpu-latest.pb.gz", "cpu-20200101T000000Z.pb"]
    for name in foreign:
        (tmp_path / name).write_bytes(b"not ours")
    sink = FileSink(tmp_path, max_files=3, max_bytes=0)
    paths = [sink.export(profile(START_NS + i * 10 * SECOND), payload(100)) for i in range(5)]
    assert listing(tmp_path) == sorted([p.name for p in paths[2:]] + foreign)
    assert sink.files_deleted == 2
    assert sink.files_written == 5


def test_retention_orders_by_start_time_across_profile_kinds(tmp_path: Path) -> None:
    sink = FileSink(tmp_path, max_files=2, max_bytes=0)
    old_offcpu = sink.export(profile(START_NS, "offcpu"), b"a")
    cpu = sink.export(profile(START_NS + 10 * SECOND, "cpu"), b"b")
    alloc = sink.export(profile(START_NS + 20 * SECOND, "alloc"), b"c")
    assert not old_offcpu.exists()
    assert listing(tmp_path) == sorted([cpu.name, alloc.name])


def test_retention_by_bytes(tmp_path: Path) -> None:
    (tmp_path / "big-foreign.bin").write_bytes(b"x" * 100_000)  # not ours: neither counted nor deleted
    probe = FileSink(tmp_path / "probe", max_files=0, max_bytes=0)
    size = probe.export(profile(), payload(1000)).stat().st_size
    sink = FileSink(tmp_path, max_files=0, max_bytes=2 * size + size // 2)
    paths = [sink.export(profile(START_NS + i * 10 * SECOND), payload(1000)) for i in range(4)]
    assert [p.exists() for p in paths] == [False, False, True, True]
    assert (tmp_path / "big-foreign.bin").exists()
    assert sink.files_deleted == 2


def test_retention_never_deletes_the_file_just_written(tmp_path: Path) -> None:
    sink = FileSink(tmp_path, max_files=0, max_bytes=10)
    first = sink.export(profile(START_NS), payload(500))
    second = sink.export(profile(START_NS + 10 * SECOND), payload(500))
    assert not first.exists()
    assert second.exists()


def test_unbounded_retention_keeps_everything(tmp_path: Path) -> None:
    sink = FileSink(tmp_path, max_files=0, max_bytes=0)
    for i in range(5):
        sink.export(profile(START_NS + i * SECOND), b"x")
    assert len(listing(tmp_path)) == 5
    assert sink.files_deleted == 0


def test_an_unusable_directory_is_a_configuration_error(tmp_path: Path) -> None:
    # Tests run as root, which ignores permission bits: a path through a regular file fails for everyone.
    # Seen before: exit status 6 (an export error) for what is a bad setting (exit 2).
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"")
    bad = blocker / "profiles"
    with pytest.raises(ConfigError) as info:
        FileSink(bad, max_files=0, max_bytes=0)
    assert info.value.key == "export.files.output_dir"
    assert str(bad) in str(info.value)


def test_a_read_only_directory_is_refused_at_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only mount (root ignores permission bits, not `ro`): seen starting, with /readyz 200."""

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    with pytest.raises(ConfigError) as info:
        FileSink(tmp_path, max_files=0, max_bytes=0)
    assert info.value.key == "export.files.output_dir"
    assert str(info.value).endswith(f"cannot write to profile directory {tmp_path}: Read-only file system")


def test_the_write_check_leaves_nothing_behind(tmp_path: Path) -> None:
    FileSink(tmp_path, max_files=0, max_bytes=0)
    assert list(tmp_path.iterdir()) == []


def test_directory_replaced_by_a_file_fails_export_not_retryable(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = FileSink(out, max_files=0, max_bytes=0)
    out.rmdir()
    out.write_bytes(b"")
    with pytest.raises(ExportError) as info:
        sink.export(profile(), b"data")
    assert info.value.retryable is False
    assert str(out) in str(info.value)
    assert sink.errors == 1
    assert sink.files_written == 0


def test_deleted_directory_is_recreated(tmp_path: Path) -> None:
    out = tmp_path / "out"
    sink = FileSink(out, max_files=0, max_bytes=0)
    out.rmdir()
    assert sink.export(profile(), b"data").parent == out


@pytest.mark.parametrize("failing_call", ["fsync", "replace"])
def test_disk_full_is_retryable_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_call: str
) -> None:
    sink = FileSink(tmp_path, max_files=0, max_bytes=0)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, failing_call, disk_full)
    with pytest.raises(ExportError) as info:
        sink.export(profile(), b"data")
    assert info.value.retryable is True
    assert "No space left on device" in str(info.value)
    assert str(tmp_path) in str(info.value)
    assert listing(tmp_path) == []
    assert sink.errors == 1
    assert sink.files_written == 0


def test_permission_error_on_write_is_not_retryable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = FileSink(tmp_path, max_files=0, max_bytes=0)

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(files.os, "fsync", read_only)
    with pytest.raises(ExportError) as info:
        sink.export(profile(), b"data")
    assert info.value.retryable is False
    assert listing(tmp_path) == []


def test_shutdown_is_idempotent_and_stops_exports(tmp_path: Path) -> None:
    sink = FileSink(tmp_path, max_files=0, max_bytes=0)
    sink.export(profile(), b"before")
    sink.shutdown(1.0)
    sink.shutdown(0.0)
    with pytest.raises(ExportError) as info:
        sink.export(profile(), b"after")
    assert info.value.retryable is False
    assert sink.files_written == 1


def test_unsafe_profile_name_is_rejected(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "out", max_files=0, max_bytes=0)
    with pytest.raises(ValueError, match="cannot be used in a file name"):
        sink.export(profile(name="../escape"), b"x")
    assert listing(tmp_path) == ["out"]


def test_negative_limits_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        FileSink(tmp_path, max_files=-1, max_bytes=0)


def test_temp_files_left_by_a_crash_are_removed_at_start(tmp_path: Path) -> None:
    stale = tmp_path / ".cpu-20261122T160512Z.k2j3h4g5.tmp"
    foreign = tmp_path / ".editor-swap.tmp"
    stale.write_bytes(b"half a profile")
    foreign.write_bytes(b"not ours")
    sink = FileSink(tmp_path, max_files=0, max_bytes=0)
    assert not stale.exists()
    assert foreign.exists()
    assert sink.interrupted_writes == 1  # counted: the interval it held is lost
