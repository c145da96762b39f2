"""Disk pressure (#16): a full output file system keeps the newest profiles, and a full spool disk the
newest OTLP requests.

A 256 KiB tmpfs is mounted for the test (root). The file sink writes incompressible profiles of
40 KiB, far more than fit, with no retention budget: each write that hits ENOSPC deletes the sink's
own oldest files until the new one fits, and is retried once. A file that is not the sink's is never
touched; when only such files fill the disk, the profile is dropped and counted.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import ExportError
from agent.export.files import FileSink
from agent.export.otlp import OtlpConfig, OtlpSink, ResourceOptions
from agent.export.otlp.spool import Spool
from agent.export.otlp.stats import DROPPED, Counters
from agent.symbolize.types import Frame, FrameKind, MappingInfo, ProcessInfo, Profile, Sample
from agent.types import ProfileSpec, ValueType
from tests.support.agent import free_port

pytestmark = pytest.mark.root

TMPFS_BYTES = 256 * 1024
PROFILE_BYTES = 40 * 1024
SPEC = ProfileSpec("cpu", (ValueType("samples", "count"),), ValueType("cpu", "nanoseconds"), 1)


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mount)], check=True, timeout=30)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True, timeout=30)


def _profile(second: int) -> Profile:
    return Profile(SPEC, (1_800_000_000 + second) * 1_000_000_000, 1_000_000_000, (), {})


def test_a_full_output_disk_keeps_the_newest_profiles(full_disk: Path) -> None:
    sink = FileSink(full_disk, max_files=0, max_bytes=0)
    written = [sink.export(_profile(second), os.urandom(PROFILE_BYTES)).name for second in range(20)]
    kept = sorted(path.name for path in full_disk.iterdir())
    assert written[-1] in kept  # the newest always
    assert kept == sorted(written[-len(kept) :])  # and only a run of the newest: the oldest went first
    assert 2 <= len(kept) < 20 and sink.files_evicted == 20 - len(kept)
    assert sink.errors == 0


def test_a_disk_full_of_someone_elses_files_drops_and_counts(full_disk: Path) -> None:
    sink = FileSink(full_disk, max_files=0, max_bytes=0)
    other = full_disk / "not-ours.bin"
    _fill(other)
    with pytest.raises(ExportError) as info:
        sink.export(_profile(0), os.urandom(PROFILE_BYTES))
    assert info.value.retryable and "No space left on device" in str(info.value)
    assert other.exists() and sink.errors == 1 and sink.files_evicted == 0


def test_a_full_spool_disk_keeps_the_newest_requests(full_disk: Path) -> None:
    counters = Counters()
    spool = Spool(str(full_disk / "spool"), max_bytes=1 << 30, memory_items=64, counters=counters)
    payloads = [os.urandom(PROFILE_BYTES) for _ in range(20)]
    seqs = [spool.append(payload) for payload in payloads]
    on_disk = sorted((full_disk / "spool").glob("*.otlp"))
    assert on_disk[-1].name == f"{seqs[-1]:020d}.otlp"  # the newest is on disk
    dropped = counters.get(DROPPED, "disk_full")
    assert dropped >= 1 and len(spool) == 20 - dropped and len(on_disk) == len(spool)
    # What is left is the newest run, in order, each intact.
    entries = []
    while (entry := spool.peek()) is not None:
        entries.append(entry.payload)
        spool.remove(entry.seq)
    assert entries == payloads[dropped:]


def test_requests_held_in_memory_at_exit_are_counted_lost_not_said_kept(
    full_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """#17: with the spool disk full, queue_size 4 and the receiver down, SIGTERM logged the requests as
    "left in the spool for the next start"; they lived in memory only, and were gone."""
    other = full_disk / "not-ours.bin"
    spool_dir = full_disk / "spool"
    config = OtlpConfig(
        enabled=True,
        endpoint=f"127.0.0.1:{free_port()}",  # nothing listens: the receiver is down
        insecure=True,
        timeout_s=0.2,
        retry_deadline_s=0.5,
        spool_dir=str(spool_dir),
        queue_size=4,
    )
    sink = OtlpSink(config, resource=ResourceOptions(host_name="h", host_arch="amd64"))
    _fill(other)
    for second in range(3):
        sink.export(_otlp_profile(second), b"")
    assert sink.queue_depth == 3 and not list(spool_dir.glob("*.otlp"))
    with caplog.at_level(logging.INFO, logger="agent.export.otlp.sink"):
        sink.shutdown(0.5)
    messages = [record.getMessage() for record in caplog.records]
    assert not any("left in the spool" in message for message in messages), messages
    assert any(message.startswith("OTLP: 3 undelivered requests are lost") for message in messages), messages
    assert sink.counters.get(DROPPED, "unsaved_at_exit") == 3


def _fill(path: Path) -> None:
    """Write random bytes to `path` until the file system is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(os.urandom(16 * 1024))
                f.flush()
        except OSError:
            pass


def _otlp_profile(second: int) -> Profile:
    frame = Frame(FrameKind.NATIVE, 0x1000, "work", MappingInfo("/nonexistent/app", 0, 0x10000, 0))
    start = (1_800_000_000 + second) * 1_000_000_000
    sample = Sample(10, 10, 0, "app", (frame,), (1,), (start + 1,))
    return Profile(SPEC, start, 1_000_000_000, (sample,), {10: ProcessInfo(10, "app", "/nonexistent/app")})
