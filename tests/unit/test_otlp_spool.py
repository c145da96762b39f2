"""OTLP spool: durable FIFO order across restarts, bounds, corrupt files, a disk that refuses writes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.export.otlp import spool as spool_module
from agent.export.otlp.spool import HEADER, Spool
from agent.export.otlp.stats import DROPPED, SPOOL_ERRORS, Counters


def _drain(spool: Spool) -> list[bytes]:
    payloads = []
    while (entry := spool.peek()) is not None:
        payloads.append(entry.payload)
        spool.remove(entry.seq)
    return payloads


def test_fifo_order_and_files_removed_after_delivery(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path), 1 << 20, 8, Counters())
    seqs = [spool.append(f"req-{i}".encode()) for i in range(5)]
    assert seqs == sorted(seqs) and len(spool) == 5
    assert len(list(tmp_path.glob("*.otlp"))) == 5
    assert spool.disk_bytes == sum(HEADER.size + len(f"req-{i}") for i in range(5))
    assert _drain(spool) == [f"req-{i}".encode() for i in range(5)]
    assert list(tmp_path.iterdir()) == [] and spool.disk_bytes == 0


def test_restart_resumes_in_order_and_keeps_numbering(tmp_path: Path) -> None:
    first = Spool(str(tmp_path), 1 << 20, 8, Counters())
    for i in range(12):  # more than 9, so the order cannot come from one-digit names
        first.append(b"a%d" % i)
    entry = first.peek()
    assert entry is not None
    first.remove(entry.seq)  # a0 delivered before the "crash"
    second = Spool(str(tmp_path), 1 << 20, 8, Counters())
    assert len(second) == 11
    new_seq = second.append(b"after-restart")
    assert new_seq > entry.seq + 11
    assert _drain(second) == [b"a%d" % i for i in range(1, 12)] + [b"after-restart"]


def test_interrupted_write_is_cleaned_up_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / ".00000000000000000007.tmp").write_bytes(b"half")
    counters = Counters()
    spool = Spool(str(tmp_path), 1 << 20, 8, counters)
    assert len(spool) == 0 and list(tmp_path.iterdir()) == []
    assert counters.get(DROPPED, "interrupted_write") == 1
    assert "did not finish" in caplog.text


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "empty"])
def test_corrupt_files_are_counted_dropped_and_skipped(tmp_path: Path, damage: str) -> None:
    writer = Spool(str(tmp_path), 1 << 20, 8, Counters())
    writer.append(b"first-payload")
    writer.append(b"second-payload")
    victim = sorted(tmp_path.glob("*.otlp"))[0]
    data = victim.read_bytes()
    victim.write_bytes(
        {"garbage": b"not a spool file at all", "truncated": data[:-3], "flipped": data[:-1] + b"X", "empty": b""}[
            damage
        ]
    )
    counters = Counters()
    reader = Spool(str(tmp_path), 1 << 20, 8, counters)
    assert _drain(reader) == [b"second-payload"]
    assert counters.get(DROPPED, "corrupt") == 1
    assert not victim.exists()


def test_disk_bound_drops_oldest_first(tmp_path: Path) -> None:
    counters = Counters()
    entry_size = HEADER.size + 100
    spool = Spool(str(tmp_path), 3 * entry_size, 8, counters)
    for i in range(5):
        spool.append(bytes([i]) * 100)
    assert len(spool) == 3 and spool.disk_bytes == 3 * entry_size
    assert counters.get(DROPPED, "spool_full") == 2
    assert [p[0] for p in _drain(spool)] == [2, 3, 4]


def test_disk_bound_applies_to_files_found_at_start(tmp_path: Path) -> None:
    big = Spool(str(tmp_path), 1 << 20, 8, Counters())
    for i in range(4):
        big.append(bytes([i]) * 100)
    counters = Counters()
    small = Spool(str(tmp_path), 2 * (HEADER.size + 100), 8, counters)
    assert counters.get(DROPPED, "spool_full") == 2
    assert [p[0] for p in _drain(small)] == [2, 3]


def test_memory_bound_keeps_spooled_payloads_on_disk(tmp_path: Path) -> None:
    counters = Counters()
    spool = Spool(str(tmp_path), 1 << 20, 2, counters)
    for i in range(6):
        spool.append(b"p%d" % i)
    assert counters.total(DROPPED) == 0
    assert _drain(spool) == [b"p%d" % i for i in range(6)]  # the older four read back from disk


def test_unwritable_disk_keeps_a_bounded_memory_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counters = Counters()
    spool = Spool(str(tmp_path), 1 << 20, 3, counters)

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(spool_module.os, "fsync", full_disk)
    for i in range(5):
        spool.append(b"m%d" % i)
    assert counters.get(SPOOL_ERRORS, "write") == 5
    assert counters.get(DROPPED, "memory_full") == 2
    assert list(tmp_path.iterdir()) == []  # no temp files left behind
    assert _drain(spool) == [b"m2", b"m3", b"m4"]


def test_unusable_spool_dir_is_a_config_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ConfigError) as info:
        Spool(str(not_a_dir / "spool"), 1 << 20, 8, Counters())
    assert info.value.key == "export.otlp.spool_dir"


def test_remove_of_unknown_sequence_is_ignored(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path), 1 << 20, 8, Counters())
    seq = spool.append(b"x")
    spool.remove(seq + 100)
    assert len(spool) == 1
