"""Kernel BTF: member offsets of the running kernel's structs, read from its BTF in pure Python.

Stage-neutral (base, beside `agent.features`, which caches what it finds). BCC compiles the BPF programs
against the distribution's kernel headers, whose struct layouts beyond a few stable early fields may not
be the running kernel's; the kernel's own BTF (`/sys/kernel/btf/vmlinux`) is. Owns parsing the BTF
header and type section (the format of the kernel's Documentation/bpf/btf.rst) far enough to follow a
path of members from a named struct, e.g. `task_struct.thread.fsbase` for the Python walker's TLS base.
A missing, truncated or foreign blob gives `BtfError`, never a wrong offset.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

BTF_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")  # magic, version, flags, hdr_len, type_off, type_len, str_off, str_len
_TYPE = struct.Struct("<III")  # name_off, info, size or type
_MEMBER = struct.Struct("<III")  # name_off, type, offset

KIND_INT, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 3, 4, 5, 6
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 13, 14, 15, 17, 18, 19
KIND_MAX = 19
# Bytes after the 12-byte btf_type, per kind: a constant, or so many per vlen entry.
_EXTRA_FIXED = {KIND_INT: 4, KIND_ARRAY: 12, KIND_VAR: 4, KIND_DECL_TAG: 4}
_EXTRA_PER_ENTRY = {
    KIND_STRUCT: 12,
    KIND_UNION: 12,
    KIND_ENUM: 8,
    KIND_FUNC_PROTO: 8,
    KIND_DATASEC: 12,
    KIND_ENUM64: 12,
}
# Kinds that only qualify or rename another type: followed to reach a member's struct.
_QUALIFIERS = frozenset({KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG})


class BtfError(ValueError):
    """The BTF blob is absent, truncated or not BTF, or lacks the struct or member asked for."""


class Btf:
    """The types of one BTF blob, indexed by id (1-based; 0 is void)."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise BtfError(f"{len(data)} bytes: too short for a BTF header")
        magic, version, _, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(data)
        if magic != BTF_MAGIC or version != 1:
            raise BtfError(f"not BTF (magic {magic:#x}, version {version})")
        types_start, strings_start = hdr_len + type_off, hdr_len + str_off
        if hdr_len < _HEADER.size or types_start + type_len > len(data) or strings_start + str_len > len(data):
            raise BtfError(f"sections beyond the blob's {len(data)} bytes")
        self._data = data
        self._strings = (strings_start, strings_start + str_len)
        self._offsets = self._index(types_start, types_start + type_len)

    def _index(self, start: int, end: int) -> list[int]:
        """Each type's offset in the blob, by id (index 0 unused)."""
        data, offsets, position = self._data, [0], start
        unpack = _TYPE.unpack_from
        while position < end:
            if position + _TYPE.size > end:
                raise BtfError(f"type {len(offsets)} truncated")
            info = unpack(data, position)[1]
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind > KIND_MAX:
                raise BtfError(f"type {len(offsets)}: unknown kind {kind}")
            offsets.append(position)
            position += _TYPE.size + _EXTRA_FIXED.get(kind, 0) + _EXTRA_PER_ENTRY.get(kind, 0) * vlen
        if position != end:
            raise BtfError(f"the last type runs {position - end} bytes past the type section")
        return offsets

    def name(self, name_off: int) -> str:
        start, end = self._strings
        position = start + name_off
        if not start <= position < end:
            raise BtfError(f"string offset {name_off} outside the string section")
        stop = self._data.find(b"\0", position, end)
        return self._data[position : end if stop < 0 else stop].decode("utf-8", "replace")

    def _type(self, type_id: int) -> tuple[int, int, int, int, bool]:
        """(name_off, kind, vlen, size or type, kind_flag) of one type."""
        if not 0 < type_id < len(self._offsets):
            raise BtfError(f"type id {type_id} out of range")
        name_off, info, size_or_type = _TYPE.unpack_from(self._data, self._offsets[type_id])
        return name_off, (info >> 24) & 0x1F, info & 0xFFFF, size_or_type, bool(info >> 31)

    def find_struct(self, name: str) -> int:
        """The id of the struct `name` that has members (not a forward declaration)."""
        wanted = name.encode()
        for type_id in range(1, len(self._offsets)):
            name_off, kind, vlen, _, _ = self._type(type_id)
            if kind == KIND_STRUCT and vlen and name_off and self._name_is(name_off, wanted):
                return type_id
        raise BtfError(f"no struct {name}")

    def _name_is(self, name_off: int, wanted: bytes) -> bool:
        position = self._strings[0] + name_off
        return (
            self._data.startswith(wanted, position)
            and self._data[position + len(wanted) : position + len(wanted) + 1] == b"\0"
        )

    def _resolved(self, type_id: int) -> int:
        for _ in range(32):  # qualifier chains are short; a cycle is a broken blob
            _, kind, _, target, _ = self._type(type_id)
            if kind not in _QUALIFIERS:
                return type_id
            type_id = target
        raise BtfError(f"type {type_id}: qualifier chain too long")

    def _member(self, type_id: int, name: str, depth: int = 0) -> tuple[int, int] | None:
        """(bit offset, member type id) of `name` in the struct or union, looking into anonymous members."""
        if depth > 16:  # anonymous members nest a few levels; deeper is a cycle in a broken blob
            raise BtfError(f"type {type_id}: anonymous members nest too deep")
        _, kind, vlen, _, kind_flag = self._type(self._resolved(type_id))
        if kind not in (KIND_STRUCT, KIND_UNION):
            raise BtfError(f"type {type_id} is not a struct or union")
        base = self._offsets[self._resolved(type_id)] + _TYPE.size
        for index in range(vlen):  # _index checked that the members lie inside the type section
            name_off, member_type, offset = _MEMBER.unpack_from(self._data, base + index * _MEMBER.size)
            bits = offset & 0xFFFFFF if kind_flag else offset
            if name_off and self.name(name_off) == name:
                return bits, member_type
            if not name_off:
                _, inner_kind, _, _, _ = self._type(self._resolved(member_type))
                anonymous = inner_kind in (KIND_STRUCT, KIND_UNION)
                inner = self._member(member_type, name, depth + 1) if anonymous else None
                if inner is not None:
                    return bits + inner[0], inner[1]
        return None

    def member_offset(self, struct_name: str, path: Sequence[str]) -> int:
        """The byte offset of `struct_name.path[0].path[1]...` from the start of the struct."""
        type_id, bits = self.find_struct(struct_name), 0
        for index, name in enumerate(path):
            found = self._member(type_id, name)
            if found is None:
                raise BtfError(f"struct {struct_name} has no member {'.'.join(path[: index + 1])}")
            bits, type_id = bits + found[0], found[1]
        if bits % 8:
            raise BtfError(f"{struct_name}.{'.'.join(path)} is a bitfield")
        return bits // 8


def read_btf(path: Path) -> Btf:
    """The blob at `path`, parsed; BtfError (with the reason) when it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BtfError(f"cannot read {path}: {e.strerror or e}") from e
    return Btf(data)


def read_member_offset(path: Path, struct_name: str, members: Sequence[str]) -> int:
    """`Btf.member_offset` of the blob at `path`; BtfError (with the reason) when it cannot be read."""
    return read_btf(path).member_offset(struct_name, members)
