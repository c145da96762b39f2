"""Process stage: HotSpot's description of its own data structures (vmStructs), read from a live JVM.

HotSpot exports from libjvm.so four tables for its Serviceability Agent, and keeps them in every
build: `gHotSpotVMStructs` (each field of each type: its offset, or a static field's address),
`gHotSpotVMTypes` (each type's size and superclass), and the int and long constants. The layout of
an entry is itself described by exported variables (`gHotSpotVMStructEntryFieldNameOffset`, ...,
`...ArrayStride`), which the JVM fills in as it starts. Reading the tables by name, rather than
hard-coding offsets per JDK, is what keeps a JDK that renames or moves a field (JDK 23 folded
`CompiledMethod` into `nmethod`) from being read wrong: a field that is not there is a clear refusal.

This module owns `read_vmstructs(memory, symbols)`, which reads the four tables whole through a
`MemoryReader` given the runtime addresses of the 24 exported variables (`VM_SYMBOLS`), and
`VmStructs`, the result. Every failure is a `VmStructsError` with a reason. A JVM still starting has
its entry layout unset (zero strides): `not_ready`, worth a retry.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from agent.errors import AgentError
from agent.process.memory import MemoryReader, MemoryReadError

VM_SYMBOLS = (
    "gHotSpotVMStructs",
    "gHotSpotVMStructEntryTypeNameOffset",
    "gHotSpotVMStructEntryFieldNameOffset",
    "gHotSpotVMStructEntryTypeStringOffset",
    "gHotSpotVMStructEntryIsStaticOffset",
    "gHotSpotVMStructEntryOffsetOffset",
    "gHotSpotVMStructEntryAddressOffset",
    "gHotSpotVMStructEntryArrayStride",
    "gHotSpotVMTypes",
    "gHotSpotVMTypeEntryTypeNameOffset",
    "gHotSpotVMTypeEntrySuperclassNameOffset",
    "gHotSpotVMTypeEntryIsOopTypeOffset",
    "gHotSpotVMTypeEntryIsIntegerTypeOffset",
    "gHotSpotVMTypeEntryIsUnsignedOffset",
    "gHotSpotVMTypeEntrySizeOffset",
    "gHotSpotVMTypeEntryArrayStride",
    "gHotSpotVMIntConstants",
    "gHotSpotVMIntConstantEntryNameOffset",
    "gHotSpotVMIntConstantEntryValueOffset",
    "gHotSpotVMIntConstantEntryArrayStride",
    "gHotSpotVMLongConstants",
    "gHotSpotVMLongConstantEntryNameOffset",
    "gHotSpotVMLongConstantEntryValueOffset",
    "gHotSpotVMLongConstantEntryArrayStride",
)

# Bounds on what foreign memory can make us read: JDK 17 and 25 have about 1,500 fields, 900 types and
# 900 constants; a stride is a few pointers; a name is an identifier or a C type.
MAX_ENTRIES = 20_000
MAX_STRIDE = 256
MAX_NAME = 512
_CHUNK_ENTRIES = 128  # entries read per call: one read of a few KiB instead of one per entry

_U64 = struct.Struct("<Q")
_I32 = struct.Struct("<i")


class VmStructsReason(enum.StrEnum):
    NOT_READY = "not_ready"  # the JVM has not filled in the tables' layout yet (it is starting)
    UNREADABLE = "unreadable"  # a read of the process failed (it may have exited)
    MALFORMED = "malformed"  # a stride, count or string out of bounds: not the tables we know


class VmStructsError(AgentError):
    def __init__(self, reason: VmStructsReason, detail: str) -> None:
        super().__init__(f"HotSpot vmStructs {reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class VmField:
    type_name: str
    field_name: str
    type_string: str  # the field's C type, e.g. "ConstMethod*"; "" when the table gives none
    is_static: bool
    offset: int  # within an instance, for a non-static field
    address: int  # runtime address of a static field; 0 for an instance field


@dataclass(frozen=True, slots=True)
class VmType:
    name: str
    superclass: str  # "" at the root
    size: int
    is_oop: bool
    is_integer: bool
    is_unsigned: bool


@dataclass(frozen=True, slots=True)
class VmStructs:
    fields: Mapping[tuple[str, str], VmField]  # by (type, field)
    types: Mapping[str, VmType]
    int_constants: Mapping[str, int]
    long_constants: Mapping[str, int]

    def offset(self, type_name: str, field_name: str) -> int:
        """An instance field's offset; KeyError naming it when this JVM has no such field."""
        field = self._field(type_name, field_name)
        if field.is_static:
            raise KeyError(f"{type_name}::{field_name} is static")
        return field.offset

    def static_address(self, type_name: str, field_name: str) -> int:
        """A static field's runtime address; KeyError naming it when this JVM has no such field."""
        field = self._field(type_name, field_name)
        if not field.is_static:
            raise KeyError(f"{type_name}::{field_name} is not static")
        return field.address

    def size(self, type_name: str) -> int:
        found = self.types.get(type_name)
        if found is None:
            raise KeyError(f"no type {type_name} in this JVM's vmStructs")
        return found.size

    def missing(self, wanted: tuple[tuple[str, str], ...]) -> list[str]:
        """Which of the (type, field) pairs `wanted` this JVM does not describe, as Type::field."""
        return [f"{t}::{f}" for t, f in wanted if (t, f) not in self.fields]

    def _field(self, type_name: str, field_name: str) -> VmField:
        found = self.fields.get((type_name, field_name))
        if found is None:
            raise KeyError(f"no field {type_name}::{field_name} in this JVM's vmStructs")
        return found


class _Strings:
    """NUL-terminated strings of the target by address, each read once (the tables repeat type names,
    and a compiler merges equal literals into one)."""

    def __init__(self, memory: MemoryReader) -> None:
        self._memory = memory
        self._known: dict[int, str] = {0: ""}

    def get(self, address: int) -> str:
        known = self._known.get(address)
        if known is not None:
            return known
        data = b""
        # Read up to the end of each page, so that a string just before unmapped memory still reads; a
        # read the end of the mapping cuts short goes on byte by byte.
        at = address
        while len(data) < MAX_NAME:
            size = min(4096 - at % 4096, MAX_NAME - len(data))
            try:
                data += self._memory.read(at, size)
            except MemoryReadError:
                size = 1
                data += _read(self._memory, at, size)
            end = data.find(b"\0")
            if end >= 0:
                text = data[:end].decode("utf-8", "replace")
                self._known[address] = text
                return text
            at += size
        raise VmStructsError(VmStructsReason.MALFORMED, f"no string end within {MAX_NAME} bytes at {address:#x}")


def read_vmstructs(memory: MemoryReader, addresses: Mapping[str, int]) -> VmStructs:
    """The four tables of the JVM `memory` reads; `addresses` are the runtime addresses of `VM_SYMBOLS`."""
    absent = [name for name in VM_SYMBOLS if name not in addresses]
    if absent:
        raise VmStructsError(VmStructsReason.MALFORMED, f"libjvm.so does not export {', '.join(absent)}")
    layout = {name: _read_u64(memory, addresses[name]) for name in VM_SYMBOLS}
    strings = _Strings(memory)
    return VmStructs(
        fields=_fields(memory, layout, strings),
        types=_types(memory, layout, strings),
        int_constants=_constants(memory, layout, strings, "Int", 4),
        long_constants=_constants(memory, layout, strings, "Long", 8),
    )


def _fields(memory: MemoryReader, layout: Mapping[str, int], strings: _Strings) -> dict[tuple[str, str], VmField]:
    prefix = "gHotSpotVMStructEntry"
    offsets = _offsets(layout, prefix, ("TypeName", "FieldName", "TypeString", "IsStatic", "Offset", "Address"))
    fields: dict[tuple[str, str], VmField] = {}
    for entry in _entries(
        memory, layout["gHotSpotVMStructs"], layout[f"{prefix}ArrayStride"], offsets["TypeName"], "struct"
    ):
        type_name = strings.get(_U64.unpack_from(entry, offsets["TypeName"])[0])
        if not type_name:
            break  # the last entry: no type name
        field = VmField(
            type_name=type_name,
            field_name=strings.get(_U64.unpack_from(entry, offsets["FieldName"])[0]),
            type_string=strings.get(_U64.unpack_from(entry, offsets["TypeString"])[0]),
            is_static=_I32.unpack_from(entry, offsets["IsStatic"])[0] != 0,
            offset=_U64.unpack_from(entry, offsets["Offset"])[0],
            address=_U64.unpack_from(entry, offsets["Address"])[0],
        )
        fields[(field.type_name, field.field_name)] = field
    return fields


def _types(memory: MemoryReader, layout: Mapping[str, int], strings: _Strings) -> dict[str, VmType]:
    prefix = "gHotSpotVMTypeEntry"
    offsets = _offsets(
        layout, prefix, ("TypeName", "SuperclassName", "IsOopType", "IsIntegerType", "IsUnsigned", "Size")
    )
    types: dict[str, VmType] = {}
    for entry in _entries(
        memory, layout["gHotSpotVMTypes"], layout[f"{prefix}ArrayStride"], offsets["TypeName"], "type"
    ):
        name = strings.get(_U64.unpack_from(entry, offsets["TypeName"])[0])
        if not name:
            break
        types[name] = VmType(
            name=name,
            superclass=strings.get(_U64.unpack_from(entry, offsets["SuperclassName"])[0]),
            size=_U64.unpack_from(entry, offsets["Size"])[0],
            is_oop=_I32.unpack_from(entry, offsets["IsOopType"])[0] != 0,
            is_integer=_I32.unpack_from(entry, offsets["IsIntegerType"])[0] != 0,
            is_unsigned=_I32.unpack_from(entry, offsets["IsUnsigned"])[0] != 0,
        )
    return types


def _constants(
    memory: MemoryReader, layout: Mapping[str, int], strings: _Strings, kind: str, width: int
) -> dict[str, int]:
    prefix = f"gHotSpotVM{kind}ConstantEntry"
    offsets = _offsets(layout, prefix, ("Name", "Value"))
    value_format = _I32 if width == 4 else _U64
    constants: dict[str, int] = {}
    table, stride = layout[f"gHotSpotVM{kind}Constants"], layout[f"{prefix}ArrayStride"]
    for entry in _entries(memory, table, stride, offsets["Name"], kind.lower()):
        name = strings.get(_U64.unpack_from(entry, offsets["Name"])[0])
        if not name:
            break
        constants[name] = value_format.unpack_from(entry, offsets["Value"])[0]
    return constants


def _offsets(layout: Mapping[str, int], prefix: str, names: tuple[str, ...]) -> dict[str, int]:
    stride = layout[f"{prefix}ArrayStride"]
    if stride == 0:
        raise VmStructsError(VmStructsReason.NOT_READY, f"{prefix}ArrayStride is 0: the JVM is still starting")
    if stride > MAX_STRIDE:
        raise VmStructsError(VmStructsReason.MALFORMED, f"{prefix}ArrayStride is {stride}")
    offsets = {name: layout[f"{prefix}{name}Offset"] for name in names}
    for name, offset in offsets.items():
        if offset + 8 > stride:
            raise VmStructsError(VmStructsReason.MALFORMED, f"{prefix}{name}Offset {offset} past the stride {stride}")
    return offsets


def _entries(memory: MemoryReader, table: int, stride: int, name_offset: int, what: str) -> list[bytes]:
    """The table's entries up to and including the first whose name pointer is null (its end), read in
    chunks; entry by entry where a chunk would run past the end of the mapping."""
    if table == 0:
        raise VmStructsError(VmStructsReason.NOT_READY, f"the {what} table's address is 0")
    entries: list[bytes] = []
    per_chunk = _CHUNK_ENTRIES
    while len(entries) < MAX_ENTRIES:
        at = table + len(entries) * stride
        try:
            chunk = memory.read(at, per_chunk * stride)
        except MemoryReadError:
            if per_chunk == 1:
                raise VmStructsError(VmStructsReason.UNREADABLE, f"the {what} table at {at:#x}") from None
            per_chunk = 1  # near the end of the mapping: one entry at a time from here
            continue
        for entry in (chunk[i : i + stride] for i in range(0, len(chunk), stride)):
            entries.append(entry)
            if _U64.unpack_from(entry, name_offset)[0] == 0:
                return entries
    raise VmStructsError(VmStructsReason.MALFORMED, f"the {what} table has no end within {MAX_ENTRIES} entries")


def _read(memory: MemoryReader, address: int, size: int) -> bytes:
    try:
        return memory.read(address, size)
    except MemoryReadError as e:
        raise VmStructsError(VmStructsReason.UNREADABLE, str(e)) from None


def _read_u64(memory: MemoryReader, address: int) -> int:
    value: int = _U64.unpack(_read(memory, address, 8))[0]
    return value
