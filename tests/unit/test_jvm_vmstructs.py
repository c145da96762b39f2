"""HotSpot's vmStructs tables: read from synthesized tables in a fake address space (the layout, the
ends, each refusal), and from live JVMs (every JDK under /usr/lib/jvm), checked against what the JVM
itself reports."""

from __future__ import annotations

import os
import re
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.process.jvm import vmstructs
from agent.process.jvm.discover import HotSpot, NotHotSpot, NotHotSpotReason, discover_hotspot
from agent.process.jvm.vmstructs import VM_SYMBOLS, VmStructsError, VmStructsReason, read_vmstructs
from tests.support.fake_memory import FakeMemory
from tests.support.jvm import JDKS, compile_java, require_jdks, running

# The entry layouts HotSpot uses on x86-64 (vmStructs.hpp): what the exported offsets describe.
STRUCT_LAYOUT = {"TypeName": 0, "FieldName": 8, "TypeString": 16, "IsStatic": 24, "Offset": 32, "Address": 40}
STRUCT_STRIDE = 48
TYPE_LAYOUT = {"TypeName": 0, "SuperclassName": 8, "IsOopType": 16, "IsIntegerType": 20, "IsUnsigned": 24, "Size": 32}
TYPE_STRIDE = 40
CONSTANT_LAYOUT = {"Name": 0, "Value": 8}
CONSTANT_STRIDE = 16


@dataclass
class Tables:
    memory: FakeMemory
    addresses: dict[str, int]

    def set(self, name: str, value: int) -> None:
        struct.pack_into("<Q", self.memory.regions[self.addresses[name]], 0, value)


def _string(memory: FakeMemory, text: str) -> int:
    return memory.place(text.encode() + b"\0") if text else 0


Row = dict[str, tuple[str, int, int]]  # field -> (struct format, value, offset in the entry)


def _table(memory: FakeMemory, stride: int, rows: list[Row]) -> int:
    """A table of `rows` and its null last entry."""
    data = bytearray(stride * (len(rows) + 1))
    for i, row in enumerate(rows):
        for fmt, value, offset in row.values():
            struct.pack_into(fmt, data, i * stride + offset, value)
    return memory.place(data)


def synthesized(
    fields: list[tuple[str, str, str, bool, int, int]],
    types: list[tuple[str, str, int]],
    ints: list[tuple[str, int]],
    longs: list[tuple[str, int]],
) -> Tables:
    memory = FakeMemory()
    s = lambda text: _string(memory, text)  # noqa: E731
    struct_rows: list[Row] = [
        {
            "TypeName": ("<Q", s(t), 0),
            "FieldName": ("<Q", s(f), 8),
            "TypeString": ("<Q", s(ts), 16),
            "IsStatic": ("<i", int(static), 24),
            "Offset": ("<Q", offset, 32),
            "Address": ("<Q", address, 40),
        }
        for t, f, ts, static, offset, address in fields
    ]
    type_rows: list[Row] = [
        {"TypeName": ("<Q", s(t), 0), "SuperclassName": ("<Q", s(sup), 8), "Size": ("<Q", size, 32)}
        for t, sup, size in types
    ]
    int_rows: list[Row] = [{"Name": ("<Q", s(n), 0), "Value": ("<i", v, 8)} for n, v in ints]
    long_rows: list[Row] = [{"Name": ("<Q", s(n), 0), "Value": ("<Q", v, 8)} for n, v in longs]
    values = {
        "gHotSpotVMStructs": _table(memory, STRUCT_STRIDE, struct_rows),
        "gHotSpotVMStructEntryArrayStride": STRUCT_STRIDE,
        "gHotSpotVMTypes": _table(memory, TYPE_STRIDE, type_rows),
        "gHotSpotVMTypeEntryArrayStride": TYPE_STRIDE,
        "gHotSpotVMIntConstants": _table(memory, CONSTANT_STRIDE, int_rows),
        "gHotSpotVMIntConstantEntryArrayStride": CONSTANT_STRIDE,
        "gHotSpotVMLongConstants": _table(memory, CONSTANT_STRIDE, long_rows),
        "gHotSpotVMLongConstantEntryArrayStride": CONSTANT_STRIDE,
    }
    for name, offset in STRUCT_LAYOUT.items():
        values[f"gHotSpotVMStructEntry{name}Offset"] = offset
    for name, offset in TYPE_LAYOUT.items():
        values[f"gHotSpotVMTypeEntry{name}Offset"] = offset
    for kind in ("Int", "Long"):
        for name, offset in CONSTANT_LAYOUT.items():
            values[f"gHotSpotVM{kind}ConstantEntry{name}Offset"] = offset
    assert set(values) == set(VM_SYMBOLS)
    # Each exported variable is a word of its own, as in libjvm.so's data.
    addresses = {name: memory.place(struct.pack("<Q", value), align=8) for name, value in values.items()}
    return Tables(memory, addresses)


FIELDS = [
    ("Method", "_constMethod", "ConstMethod*", False, 8, 0),
    ("ConstMethod", "_name_index", "u2", False, 34, 0),
    ("CodeCache", "_heaps", "GrowableArray<CodeHeap*>*", True, 0, 0x7F00_1234_5678),
]


def test_the_four_tables_are_read_by_their_exported_layout() -> None:
    tables = synthesized(
        FIELDS, [("Method", "Metadata", 88), ("Metadata", "", 8)], [("oopSize", 8)], [("markWord::lock_mask", 3)]
    )
    read = read_vmstructs(tables.memory, tables.addresses)
    assert read.offset("Method", "_constMethod") == 8
    assert read.fields[("ConstMethod", "_name_index")].type_string == "u2"
    assert read.static_address("CodeCache", "_heaps") == 0x7F00_1234_5678
    assert read.size("Method") == 88 and read.types["Method"].superclass == "Metadata"
    assert read.types["Metadata"].superclass == ""
    assert read.int_constants == {"oopSize": 8} and read.long_constants == {"markWord::lock_mask": 3}
    assert read.missing((("Method", "_constMethod"), ("nmethod", "_method"))) == ["nmethod::_method"]
    with pytest.raises(KeyError, match="nmethod::_method"):
        read.offset("nmethod", "_method")
    with pytest.raises(KeyError, match="is static"):
        read.offset("CodeCache", "_heaps")


def test_a_long_table_is_read_in_chunks_to_its_end() -> None:
    many = [(f"T{i}", f"_f{i}", "int", False, i, 0) for i in range(3 * 128 + 5)]
    tables = synthesized(many, [], [], [])
    memory = tables.memory
    table = struct.unpack("<Q", memory.regions[tables.addresses["gHotSpotVMStructs"]])[0]
    table_reads: list[int] = []
    read_one = memory.read

    def counted(address: int, size: int) -> bytes:
        if table <= address < table + len(memory.regions[table]):
            table_reads.append(address)
        return read_one(address, size)

    memory.read = counted  # type: ignore[method-assign]
    read = read_vmstructs(memory, tables.addresses)
    assert len(read.fields) == len(many) and read.offset("T300", "_f300") == 300
    # Three whole chunks of 128, then the last chunk runs past the table: entry by entry to its end.
    assert len(table_reads) == 3 + 1 + 6, len(table_reads)


def test_a_jvm_still_starting_is_not_ready() -> None:
    tables = synthesized(FIELDS, [], [], [])
    tables.set("gHotSpotVMStructEntryArrayStride", 0)  # what a JVM has before VMStructs are initialised
    with pytest.raises(VmStructsError) as caught:
        read_vmstructs(tables.memory, tables.addresses)
    assert caught.value.reason is VmStructsReason.NOT_READY


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("gHotSpotVMStructEntryArrayStride", 1 << 20, "ArrayStride is 1048576"),
        ("gHotSpotVMStructEntryAddressOffset", 4096, "past the stride"),
    ],
)
def test_a_layout_out_of_bounds_is_malformed(variable: str, value: int, says: str) -> None:
    tables = synthesized(FIELDS, [], [], [])
    tables.set(variable, value)
    with pytest.raises(VmStructsError, match=says) as caught:
        read_vmstructs(tables.memory, tables.addresses)
    assert caught.value.reason is VmStructsReason.MALFORMED


def test_a_table_without_an_end_is_malformed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmstructs, "MAX_ENTRIES", 200)
    tables = synthesized([(f"T{i}", "_f", "int", False, i, 0) for i in range(300)], [], [], [])
    with pytest.raises(VmStructsError, match="no end within 200 entries"):
        read_vmstructs(tables.memory, tables.addresses)


def test_a_name_pointing_at_unmapped_memory_is_unreadable() -> None:
    tables = synthesized(FIELDS, [], [], [])
    table = tables.memory.regions[struct.unpack("<Q", tables.memory.regions[tables.addresses["gHotSpotVMStructs"]])[0]]
    struct.pack_into("<Q", table, STRUCT_LAYOUT["FieldName"], 0x10)  # the first entry's field name
    with pytest.raises(VmStructsError) as caught:
        read_vmstructs(tables.memory, tables.addresses)
    assert caught.value.reason is VmStructsReason.UNREADABLE


def test_missing_exports_are_named() -> None:
    tables = synthesized(FIELDS, [], [], [])
    del tables.addresses["gHotSpotVMTypes"]
    with pytest.raises(VmStructsError, match="does not export gHotSpotVMTypes"):
        read_vmstructs(tables.memory, tables.addresses)


def test_a_process_without_libjvm_is_not_a_jvm() -> None:
    found = discover_hotspot(os.getpid())
    assert isinstance(found, NotHotSpot) and found.reason is NotHotSpotReason.NOT_JVM


# What the frame walker of #15 reads, in every JDK it supports: a JDK missing one is refused by name.
WALKER_FIELDS = (
    ("Method", "_constMethod"),
    ("ConstMethod", "_constants"),
    ("ConstMethod", "_name_index"),
    ("ConstMethod", "_signature_index"),
    ("ConstantPool", "_pool_holder"),
    ("Klass", "_name"),
    ("Symbol", "_length"),
    ("Symbol", "_body"),
    ("CodeCache", "_heaps"),
)


@pytest.fixture(scope="module")
def classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_java("Lines", tmp_path_factory.mktemp("classes"))


@pytest.fixture(params=JDKS, ids=lambda java: java.parent.parent.name)
def jvm(request: pytest.FixtureRequest, classes: Path) -> Iterator[tuple[int, Path]]:
    with running(request.param, classes, "Lines") as process:
        yield process.pid, request.param


def test_a_live_jvm_is_read_and_agrees_with_what_it_reports(jvm: tuple[int, Path]) -> None:
    pid, java = jvm
    found = discover_hotspot(pid)
    assert isinstance(found, HotSpot), found
    # The release string, read from the JVM's memory, is the java.vm.version the JVM itself prints.
    settings = subprocess.run(
        [str(java), "-XshowSettings:properties", "-version"], capture_output=True, text=True, timeout=120
    ).stderr
    match = re.search(r"java\.vm\.version = (\S+)", settings)
    assert match is not None, settings
    assert found.release == match.group(1)
    assert found.feature >= 11
    assert os.path.realpath(found.libjvm) == os.path.realpath(java.parent.parent / "lib/server/libjvm.so")
    tables = found.vmstructs
    assert tables.missing(WALKER_FIELDS) == []
    # Facts true of every HotSpot on x86-64: 8-byte oops and words, a Method's ConstMethod right after
    # its vtable pointer, and a Symbol's length before its body.
    assert tables.int_constants["oopSize"] == 8
    assert tables.size("Method") > 0 and tables.offset("Method", "_constMethod") == 8
    assert tables.offset("Symbol", "_length") < tables.offset("Symbol", "_body")
    assert tables.static_address("CodeCache", "_heaps") != 0
    assert len(tables.fields) > 300 and len(tables.types) > 300


def test_ci_has_the_jdks() -> None:
    """CI's machines have OpenJDK 17 and Temurin 25: the live tests above must not silently vanish."""
    require_jdks()
    assert len(JDKS) >= 2
