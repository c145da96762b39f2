"""The ctypes mirrors in `agent.probes.records` must match the C structs in `bpf/common.h` byte for byte.

gcc compiles a small program that includes common.h (with the BCC kernel typedefs defined first) and
prints sizeof, every field's offset and size, and the shared constants. Field names are parsed from
common.h itself, so a field added on only one side fails here rather than garbling records at run time.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.probes import records
from agent.probes.records import MIRRORS

COMMON_H = Path(__file__).resolve().parents[2] / "bpf" / "common.h"
BCC_TYPEDEFS = "typedef unsigned long long u64; typedef unsigned int u32; typedef int s32; typedef unsigned char u8;\n"
# C field type -> the ctypes type its mirror must use (signedness included, which sizes cannot show).
C_TYPES: dict[str, type] = {
    "u64": ctypes.c_uint64,
    "u32": ctypes.c_uint32,
    "s32": ctypes.c_int32,
    "u8": ctypes.c_uint8,
    "char": ctypes.c_char,
}
CONSTANTS = ("AGENT_COMM_LEN", "SAMPLE_FLAG_KERNEL_THREAD", "PROC_EVENT_NEW", "PROC_EVENT_EXEC")

CField = tuple[str, str, str]  # (C type, name, array length or "")


def parse_structs(source: str) -> dict[str, list[CField]]:
    """struct name -> fields in declaration order, from the C source (comments stripped)."""
    source = re.sub(r"/\*.*?\*/", "", source, flags=re.S)
    source = re.sub(r"//[^\n]*", "", source)
    structs: dict[str, list[CField]] = {}
    for name, body in re.findall(r"\bstruct\s+(\w+)\s*\{(.*?)\}\s*;", source, flags=re.S):
        declarations = [d.strip() for d in body.split(";") if d.strip()]
        fields = []
        for declaration in declarations:
            match = re.fullmatch(r"(\w+)\s+(\w+)\s*(?:\[\s*(\w+)\s*\])?", declaration)
            assert match, f"struct {name}: cannot parse field declaration {declaration!r}"
            fields.append((match[1], match[2], match[3] or ""))
        structs[name] = fields
    return structs


@pytest.fixture(scope="module")
def c_structs() -> dict[str, list[CField]]:
    structs = parse_structs(COMMON_H.read_text())
    assert structs, "no structs found in bpf/common.h"
    return structs


@pytest.fixture(scope="module")
def c_layout(c_structs: dict[str, list[CField]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """{"struct": sizeof, "struct.field": offset, "struct.field#size": sizeof field, "CONSTANT": value}."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to compile bpf/common.h")
    lines = [BCC_TYPEDEFS, "#include <stddef.h>", "#include <stdio.h>", '#include "common.h"', "int main(void) {"]
    for struct, fields in c_structs.items():
        lines.append(f'    printf("{struct} %zu\\n", sizeof(struct {struct}));')
        for _, field, _ in fields:
            lines.append(f'    printf("{struct}.{field} %zu\\n", offsetof(struct {struct}, {field}));')
            lines.append(f'    printf("{struct}.{field}#size %zu\\n", sizeof(((struct {struct} *)0)->{field}));')
    for constant in CONSTANTS:
        lines.append(f'    printf("{constant} %lld\\n", (long long)({constant}));')
    lines += ["    return 0;", "}"]
    out = tmp_path_factory.mktemp("records_layout")
    (out / "layout.c").write_text("\n".join(lines) + "\n")
    build = subprocess.run(
        [
            "gcc",
            "-std=c11",
            "-Wall",
            "-Werror",
            f"-I{COMMON_H.parent}",
            "-o",
            str(out / "layout"),
            str(out / "layout.c"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, f"compiling common.h failed:\n{build.stderr}"
    printed = subprocess.run([str(out / "layout")], capture_output=True, text=True, check=True).stdout
    return {name: int(value) for name, value in (line.split() for line in printed.splitlines())}


def test_every_struct_in_common_h_has_a_mirror(c_structs: dict[str, list[CField]]) -> None:
    assert set(c_structs) == set(MIRRORS)


@pytest.mark.parametrize("struct", sorted(MIRRORS))
def test_field_names_and_order_match(struct: str, c_structs: dict[str, list[CField]]) -> None:
    mirror = MIRRORS[struct]
    assert [name for name, *_ in mirror._fields_] == [name for _, name, _ in c_structs[struct]]


@pytest.mark.parametrize("struct", sorted(MIRRORS))
def test_sizeof_matches(struct: str, c_layout: dict[str, int]) -> None:
    assert ctypes.sizeof(MIRRORS[struct]) == c_layout[struct]


@pytest.mark.parametrize("struct", sorted(MIRRORS))
def test_every_field_offset_and_size_match(struct: str, c_layout: dict[str, int]) -> None:
    mirror = MIRRORS[struct]
    for name, *_ in mirror._fields_:
        descriptor = getattr(mirror, name)
        assert (name, descriptor.offset) == (name, c_layout[f"{struct}.{name}"])
        assert (name, descriptor.size) == (name, c_layout[f"{struct}.{name}#size"])


@pytest.mark.parametrize("struct", sorted(MIRRORS))
def test_field_types_match_including_signedness(struct: str, c_structs: dict[str, list[CField]]) -> None:
    mirror_types = {name: field_type for name, field_type, *_ in MIRRORS[struct]._fields_}
    for c_type, name, length in c_structs[struct]:
        field_type = mirror_types[name]
        if length:
            assert issubclass(field_type, ctypes.Array), f"{struct}.{name} is an array in C"
            assert field_type._type_ is C_TYPES[c_type], f"{struct}.{name} element type"
            expected_length = int(length) if length.isdigit() else getattr(records, length)
            assert field_type._length_ == expected_length, f"{struct}.{name} length"
        else:
            assert field_type is C_TYPES[c_type], f"{struct}.{name}: C {c_type}, ctypes {field_type.__name__}"


@pytest.mark.parametrize("constant", CONSTANTS)
def test_constants_match(constant: str, c_layout: dict[str, int]) -> None:
    assert getattr(records, constant) == c_layout[constant]
