"""agent.btf: member offsets from a BTF blob, on a crafted tiny blob and on this kernel's own BTF."""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

import pytest

from agent.btf import (
    BTF_MAGIC,
    KIND_INT,
    KIND_STRUCT,
    KIND_TYPEDEF,
    Btf,
    BtfError,
    read_member_offset,
)
from agent.features import BTF_VMLINUX, IMAGE_MEMBERS, image_offsets, task_fsbase_offset

KIND_FWD, KIND_ENUM = 7, 6


class BlobBuilder:
    """A BTF blob written field by field as the kernel lays it out (Documentation/bpf/btf.rst)."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.types = bytearray()
        self.count = 0

    def name(self, text: str) -> int:
        if not text:
            return 0
        offset = len(self.strings)
        self.strings += text.encode() + b"\0"
        return offset

    def add(
        self, name: str, kind: int, vlen: int, size_or_type: int, extra: bytes = b"", kind_flag: bool = False
    ) -> int:
        info = (kind << 24) | vlen | (1 << 31 if kind_flag else 0)
        self.types += struct.pack("<III", self.name(name), info, size_or_type) + extra
        self.count += 1
        return self.count

    def struct(self, name: str, size: int, members: list[tuple[str, int, int]], kind_flag: bool = False) -> int:
        extra = b"".join(struct.pack("<III", self.name(m), t, bits) for m, t, bits in members)
        return self.add(name, KIND_STRUCT, len(members), size, extra, kind_flag)

    def blob(self, magic: int = BTF_MAGIC) -> bytes:
        header = struct.pack("<HBBIIIII", magic, 1, 0, 24, 0, len(self.types), len(self.types), len(self.strings))
        return header + bytes(self.types) + bytes(self.strings)


def tiny_kernel() -> bytes:
    """task_struct { int pid; struct { thread_t thread; }; } with thread_t a typedef of thread_struct
    { long sp; long fsbase; }, behind a forward declaration of task_struct and an enum."""
    b = BlobBuilder()
    b.add("task_struct", KIND_FWD, 0, 0)  # 1: a forward declaration: no members, skipped
    long_ = b.add("long", KIND_INT, 0, 8, struct.pack("<I", 64))  # 2
    b.add("colours", KIND_ENUM, 2, 4, struct.pack("<IiIi", b.name("red"), 0, b.name("blue"), 1))  # 3
    thread = b.struct("thread_struct", 16, [("sp", long_, 0), ("fsbase", long_, 64)])  # 4
    typedef = b.add("thread_t", KIND_TYPEDEF, 0, thread)  # 5
    anonymous = b.struct("", 16, [("thread", typedef, 0)])  # 6
    # kind_flag: member offsets carry a bitfield size in their top byte (the pid is a 32-bit field here)
    b.struct("task_struct", 48, [("pid", long_, (32 << 24) | 0), ("", anonymous, 128)], kind_flag=True)  # 7
    return b.blob()


def test_a_member_path_through_a_typedef_and_an_anonymous_struct() -> None:
    btf = Btf(tiny_kernel())
    assert btf.member_offset("task_struct", ["thread", "fsbase"]) == 16 + 8
    assert btf.member_offset("task_struct", ["thread"]) == 16
    assert btf.member_offset("thread_struct", ["fsbase"]) == 8
    assert btf.member_offset("task_struct", ["pid"]) == 0


@pytest.mark.parametrize(
    ("struct_name", "path", "message"),
    [
        ("task_struct", ["thread", "gsbase"], "has no member thread.gsbase"),
        ("task_struct", ["mm"], "has no member mm"),
        ("mm_struct", ["pgd"], "no struct mm_struct"),
        ("task_struct", ["pid", "x"], "is not a struct or union"),
    ],
)
def test_missing_structs_and_members_are_errors(struct_name: str, path: list[str], message: str) -> None:
    with pytest.raises(BtfError, match=message):
        Btf(tiny_kernel()).member_offset(struct_name, path)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "too short"),
        (b"\0" * 24, "not BTF"),
        (BlobBuilder().blob(magic=0x9FEB), "not BTF"),
        (tiny_kernel()[:-8], "beyond the blob"),
    ],
)
def test_garbled_blobs_are_errors(blob: bytes, message: str) -> None:
    with pytest.raises(BtfError, match=message):
        Btf(blob)


def test_a_type_running_past_its_section_is_an_error() -> None:
    b = BlobBuilder()
    b.struct("s", 8, [("a", 1, 0), ("b", 1, 32)])
    blob = bytearray(b.blob())
    struct.pack_into("<I", blob, 12, len(b.types) - 4)  # type_len: the last member cut short
    with pytest.raises(BtfError, match=r"past the type section|truncated"):
        Btf(bytes(blob))


def test_an_unknown_kind_is_an_error() -> None:
    b = BlobBuilder()
    b.add("odd", 31, 0, 0)
    with pytest.raises(BtfError, match="unknown kind 31"):
        Btf(b.blob())


def test_random_bytes_never_raise_anything_but_btf_error() -> None:
    good = tiny_kernel()
    for seed in range(200):
        blob = bytearray(good)
        state = seed * 2654435761 % 2**32
        for _ in range(4):
            state = (state * 1103515245 + 12345) % 2**31
            blob[24 + state % (len(good) - 24)] = state >> 8 & 0xFF
        with contextlib.suppress(BtfError):  # anything else (IndexError, RecursionError, ...) fails the test
            Btf(bytes(blob)).member_offset("task_struct", ["thread", "fsbase"])


def test_an_unreadable_file_gives_the_reason(tmp_path: Path) -> None:
    with pytest.raises(BtfError, match="cannot read"):
        read_member_offset(tmp_path / "vmlinux", "task_struct", ["thread"])
    offset, reason = task_fsbase_offset(tmp_path / "vmlinux", "x86_64")
    assert offset is None and "cannot read" in reason and str(tmp_path) in reason
    (tmp_path / "vmlinux").write_bytes(tiny_kernel())
    assert task_fsbase_offset(tmp_path / "vmlinux", "x86_64") == (24, "")
    offset, reason = task_fsbase_offset(tmp_path / "vmlinux", "riscv64")
    assert offset is None and "riscv64" in reason


@pytest.mark.skipif(not os.path.exists(BTF_VMLINUX), reason="this kernel has no BTF (CONFIG_DEBUG_INFO_BTF)")
def test_this_kernels_task_fsbase_offset() -> None:
    """The path's offset is the sum of its parts, inside task_struct and 8-byte aligned (the BPF test
    checks it against what each thread reports as its own FS base)."""
    btf = Btf(BTF_VMLINUX.read_bytes())
    offset = btf.member_offset("task_struct", ["thread", "fsbase"])
    thread = btf.member_offset("task_struct", ["thread"])
    assert offset == thread + btf.member_offset("thread_struct", ["fsbase"])
    assert offset % 8 == 0 and 0 < thread < offset
    assert btf.member_offset("task_struct", ["pid"]) < btf.member_offset("task_struct", ["tgid"]) < offset
    if os.uname().machine == "x86_64":
        assert task_fsbase_offset() == (offset, "")


def test_image_offsets_say_why_they_are_missing(tmp_path: Path) -> None:
    offsets, reason = image_offsets(tmp_path / "vmlinux")
    assert offsets is None and "cannot read" in reason
    (tmp_path / "vmlinux").write_bytes(tiny_kernel())  # a task_struct with no mm
    offsets, reason = image_offsets(tmp_path / "vmlinux")
    assert offsets is None and "task_struct has no member mm" in reason


@pytest.mark.skipif(not os.path.exists(BTF_VMLINUX), reason="this kernel has no BTF (CONFIG_DEBUG_INFO_BTF)")
def test_this_kernels_image_offsets() -> None:
    """Every field an announcement reads is found (the BPF exec-storm test checks what they read)."""
    offsets, reason = image_offsets()
    assert offsets is not None and reason == ""
    assert set(offsets) == set(IMAGE_MEMBERS)
    assert offsets["MM_START_CODE_OFFSET"] % 8 == 0 and offsets["MM_MMAP_BASE_OFFSET"] % 8 == 0
