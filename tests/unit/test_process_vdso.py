"""`agent.process.vdso`: the agent's own vDSO image, and clear errors when it cannot be had."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.process.vdso import VdsoUnavailable, read_own_vdso


def test_reads_this_processes_vdso_image() -> None:
    image = read_own_vdso()
    assert image[:4] == b"\x7fELF" and len(image) % 4096 == 0


def test_no_vdso_mapping_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "maps").write_text("7f0000000000-7f0000001000 r-xp 00000000 fd:01 12 /usr/lib/libc.so.6\n")
    with pytest.raises(VdsoUnavailable, match=r"no \[vdso\] in .*maps"):
        read_own_vdso(tmp_path)


def test_unreadable_memory_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "maps").write_text("7ffff7fc1000-7ffff7fc3000 r-xp 00000000 00:00 0 [vdso]\n")
    with pytest.raises(VdsoUnavailable, match="cannot read the vDSO through"):
        read_own_vdso(tmp_path)  # there is no `mem` file
