"""Process stage: PinnedFiles keeps deleted mapped files reachable after their process has gone."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from agent.process.maps import FileIdentity, MapKind, resolve_file
from agent.process.pinned import PINNED, PinnedFiles
from agent.process.registry import ProcessRegistry


def _file(path: Path, data: bytes) -> FileIdentity:
    path.write_bytes(data)
    return FileIdentity.of(os.stat(path))


def test_a_pinned_file_stays_readable_after_it_is_unlinked(tmp_path: Path) -> None:
    pinned = PinnedFiles(capacity=4)
    identity = _file(tmp_path / "lib.so", b"\x7fELF the old image")
    assert pinned.pin(identity, tmp_path / "lib.so")
    (tmp_path / "lib.so").unlink()
    path = pinned.path_of(identity)
    assert path is not None and path.read_bytes() == b"\x7fELF the old image"
    assert pinned.pin(identity, tmp_path / "gone") and len(pinned) == 1  # already held: no second open
    pinned.close()
    assert pinned.path_of(identity) is None


def test_another_file_at_the_path_is_not_pinned(tmp_path: Path) -> None:
    pinned = PinnedFiles(capacity=4)
    old = _file(tmp_path / "bin", b"old")
    (tmp_path / "bin").unlink()
    _file(tmp_path / "bin", b"new")  # what the link reaches now is another file
    assert not pinned.pin(old, tmp_path / "bin") and pinned.path_of(old) is None


def test_the_oldest_pin_is_closed_beyond_the_capacity(tmp_path: Path) -> None:
    pinned = PinnedFiles(capacity=2)
    identities = [_file(tmp_path / f"f{i}", bytes([i])) for i in range(3)]
    for i, identity in enumerate(identities):
        assert pinned.pin(identity, tmp_path / f"f{i}")
    assert len(pinned) == 2 and pinned.path_of(identities[0]) is None
    assert [pinned.path_of(i) is not None for i in identities[1:]] == [True, True]
    pinned.close()


def test_the_registry_pins_a_deleted_mapping_that_outlives_its_process(tmp_path: Path) -> None:
    """Captured while the process lives (its maps say "(deleted)"), resolved after it has gone."""
    proc = tmp_path / "proc"
    pid_dir = proc / "77"
    (pid_dir / "map_files").mkdir(parents=True)
    kept = tmp_path / "inode"
    identity = _file(kept, b"\x7fELF unlinked")
    line = f"400000-401000 r-xp 00000000 fd:01 {identity.ino} /usr/bin/tool (deleted)"
    (pid_dir / "maps").write_text(line + "\n")
    (pid_dir / "map_files" / "400000-401000").symlink_to(kept)
    registry = ProcessRegistry(proc)
    maps = registry.capture(77)
    assert maps is not None
    (entry,) = maps.mappings
    assert entry.kind is MapKind.DELETED and entry.identity == identity
    shutil.rmtree(pid_dir)  # the process exits, and its map_files with it
    kept.unlink()
    try:
        path = resolve_file(proc, 77, entry)
        assert path is not None and path.read_bytes() == b"\x7fELF unlinked"
    finally:
        PINNED.close()
