"""The ctypes mirrors in `agent.probes.records` must match the C structs in `bpf/common.h` byte for byte.

gcc compiles a small program that includes common.h (with the BCC kernel typedefs defined first) and
prints sizeof, every field's offset and size, and the shared constants. Field names and constants are
parsed from common.h itself, so one added on only one side fails here rather than garbling records at
run time. The same program runs common.h's `collect_stacks()` against a scripted `bpf_get_stack`
stand-in, pinning down the record layout the decoder relies on (kernel frames, then user frames, sent
truncated after the last one).
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
BCC_TYPEDEFS = (
    "typedef unsigned long long u64; typedef unsigned int u32; typedef int s32; typedef unsigned short u16;"
    " typedef unsigned char u8;"
)
# What BCC and the kernel headers give common.h's helper, so that plain gcc compiles the very same file.
# The bpf_get_stack stand-in plays a script and records each call, so collect_stacks() can be run here.
BPF_STUBS = r"""
#ifndef __always_inline /* glibc's <sys/cdefs.h> defines it as the kernel does */
#define __always_inline inline __attribute__((always_inline))
#endif
#define BPF_F_USER_STACK (1ULL << 8) /* include/uapi/linux/bpf.h */
struct pt_regs { u64 ip, sp, bp; };
struct task_struct;
static struct task_struct *bpf_get_current_task_btf(void) { return 0; }
static long bpf_task_pt_regs(struct task_struct *t) { (void)t; return 0; }
static long bpf_probe_read_kernel(void *dst, u32 size, const void *src) { (void)dst; (void)size; (void)src; return 0; }
static long bpf_probe_read_user(void *dst, u32 size, const void *src) { (void)dst; (void)size; (void)src; return -14; }
static long script[2];
static int calls;
static unsigned long long call_flags[2];
static unsigned int call_size[2];
static long call_offset[2];
static const void *current_event;
static long bpf_get_stack(void *ctx, void *buf, unsigned int size, unsigned long long flags)
{
    (void)ctx;
    int call = calls++;
    call_flags[call] = flags;
    call_size[call] = size;
    call_offset[call] = (const char *)buf - (const char *)current_event;
    for (long i = 0; i < script[call] / 8; i++)
        ((u64 *)buf)[i] = 0x1000 * (u64)(call + 1) + (u64)i;
    return script[call];
}
"""
COLLECT_STACKS = r"""
static void collect(const char *name, u32 flags, long kernel, long user)
{
    static struct stack_event e;
    memset(&e, 0xab, sizeof(e));
    e.flags = flags;
    current_event = &e;
    calls = 0;
    script[0] = kernel;
    script[1] = user;
    u32 size = collect_stacks(NULL, &e); /* the native frames: all a record without Python frames or copy sends */
    printf("%s.size %u\n%s.kernel_stack_len %d\n%s.user_stack_len %d\n%s.calls %d\n",
           name, size, name, e.kernel_stack_len, name, e.user_stack_len, name, calls);
    for (int i = 0; i < calls; i++)
        printf("%s.%d.flags %llu\n%s.%d.size %u\n%s.%d.offset %ld\n",
               name, i, call_flags[i], name, i, call_size[i], name, i, call_offset[i]);
}
"""
# C field type -> the ctypes type its mirror must use (signedness included, which sizes cannot show).
C_TYPES: dict[str, type] = {
    "u64": ctypes.c_uint64,
    "u32": ctypes.c_uint32,
    "s32": ctypes.c_int32,
    "u16": ctypes.c_uint16,
    "u8": ctypes.c_uint8,
    "char": ctypes.c_char,
}
# Constants records.py must mirror, whatever else common.h defines.
REQUIRED_CONSTANTS = {
    "AGENT_COMM_LEN",
    "MAX_STACK_DEPTH",
    "SAMPLE_FLAG_KERNEL_THREAD",
    "PROC_EVENT_NEW",
    "PROC_EVENT_EXEC",
}
EFAULT, EINVAL = 14, 22
# collect_stacks() scenarios: name -> (flags, bpf_get_stack result for the kernel stack, for the user stack).
SCENARIOS = {
    "both": (0, 3 * 8, 5 * 8),
    "user_mode": (0, -EFAULT, 4 * 8),  # a sample taken in user mode has no kernel stack
    "user_error": (0, 2 * 8, -EINVAL),
    "no_stacks": (0, -EFAULT, -EFAULT),
    "kernel_thread": (1, 2 * 8, 99 * 8),  # the user stack must not even be asked for
    "full": (0, 127 * 8, 127 * 8),
}

# Set per program with -D (their defaults in common.h only keep plain compilers happy), or bounds of
# cflags (the unwind.stack_bytes setting has its own): not mirrored.
CFLAG_PARAMETERS = {"AGENT_PID", "MAX_USER_STACK_BYTES"}

CField = tuple[str, str, str]  # (C type, name, array length expression or "")


def strip_comments(source: str) -> str:
    source = re.sub(r"/\*.*?\*/", "", source, flags=re.S)
    return re.sub(r"//[^\n]*", "", source)


def parse_structs(source: str) -> dict[str, list[CField]]:
    """struct name -> fields in declaration order, from the C source (comments stripped). Fields inside
    `#if ... #endif` are left out: they exist only under some cflags, and are tested on their own."""
    structs: dict[str, list[CField]] = {}
    source = re.sub(r"^\s*#\s*define\b(?:[^\n]*\\\n)*[^\n]*", "", strip_comments(source), flags=re.M)  # macros
    for name, body in re.findall(r"\bstruct\s+(\w+)\s*\{(.*?)\}\s*;", source, flags=re.S):
        body = re.sub(r"^\s*#\s*if\b.*?^\s*#\s*endif\b[^\n]*", "", body, flags=re.S | re.M)
        declarations = [d.strip() for d in body.split(";") if d.strip()]
        fields = []
        for declaration in declarations:
            match = re.fullmatch(r"(\w+)\s+(\w+)\s*(?:\[([\w\s*+()-]+)\])?", declaration)
            assert match, f"struct {name}: cannot parse field declaration {declaration!r}"
            fields.append((match[1], match[2], " ".join((match[3] or "").split())))
        structs[name] = fields
    return structs


def parse_constants(source: str) -> set[str]:
    """Names of the object-like macros with a value (the include guard has none)."""
    return set(re.findall(r"^\s*#\s*define\s+([A-Z][A-Z0-9_]*)[ \t]+\S", strip_comments(source), flags=re.M))


def test_parse_structs_handles_arrays() -> None:
    source = "struct s {\n u64 a; /* x */ char comm[AGENT_COMM_LEN];\n u64 ips[2 * MAX_STACK_DEPTH]; s32 n[4];\n};"
    assert parse_structs(source) == {
        "s": [
            ("u64", "a", ""),
            ("char", "comm", "AGENT_COMM_LEN"),
            ("u64", "ips", "2 * MAX_STACK_DEPTH"),
            ("s32", "n", "4"),
        ]
    }
    with pytest.raises(AssertionError, match="cannot parse"):
        parse_structs("struct t { unsigned long x; };")


@pytest.fixture(scope="module")
def c_structs() -> dict[str, list[CField]]:
    structs = parse_structs(COMMON_H.read_text())
    assert structs, "no structs found in bpf/common.h"
    return structs


@pytest.fixture(scope="module")
def c_constants() -> set[str]:
    constants = parse_constants(COMMON_H.read_text())
    assert constants >= REQUIRED_CONSTANTS, "bpf/common.h lost a constant the agent relies on"
    return constants


def layout_program(c_structs: dict[str, list[CField]], constants: set[str]) -> str:
    lines = [BCC_TYPEDEFS, "#include <stddef.h>", "#include <stdio.h>", "#include <string.h>", BPF_STUBS]
    lines += ['#include "common.h"', COLLECT_STACKS, "int main(void) {"]
    for struct, fields in c_structs.items():
        lines.append(f'    printf("{struct} %zu\\n", sizeof(struct {struct}));')
        for _, field, length in fields:
            member = f"((struct {struct} *)0)->{field}"
            lines.append(f'    printf("{struct}.{field} %zu\\n", offsetof(struct {struct}, {field}));')
            lines.append(f'    printf("{struct}.{field}#size %zu\\n", sizeof({member}));')
            if length:
                lines.append(f'    printf("{struct}.{field}#element %zu\\n", sizeof({member}[0]));')
    for constant in sorted(constants):
        lines.append(f'    printf("{constant} %lld\\n", (long long)({constant}));')
    for name, (flags, kernel, user) in SCENARIOS.items():
        lines.append(f'    collect("collect.{name}", {flags}, {kernel}, {user});')
    lines += ["    return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_layout(
    c_structs: dict[str, list[CField]], c_constants: set[str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, int]:
    """{"struct": sizeof, "struct.field": offset, "struct.field#size": sizeof field,
    "struct.field#element": sizeof an array element, "CONSTANT": value, "collect.<scenario>...": results}."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to compile bpf/common.h")
    out = tmp_path_factory.mktemp("records_layout")
    (out / "layout.c").write_text(layout_program(c_structs, c_constants))
    build = subprocess.run(
        [
            "gcc",
            "-std=c11",
            "-Wall",
            "-Werror",
            "-Wno-unknown-pragmas",
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
def test_field_types_match_including_signedness(
    struct: str, c_structs: dict[str, list[CField]], c_layout: dict[str, int]
) -> None:
    mirror_types = {name: field_type for name, field_type, *_ in MIRRORS[struct]._fields_}
    for c_type, name, length in c_structs[struct]:
        field_type = mirror_types[name]
        if length:
            assert issubclass(field_type, ctypes.Array), f"{struct}.{name} is an array in C"
            assert field_type._type_ is C_TYPES[c_type], f"{struct}.{name} element type"
            element = c_layout[f"{struct}.{name}#element"]
            assert ctypes.sizeof(field_type._type_) == element, f"{struct}.{name} element size"
            assert field_type._length_ == c_layout[f"{struct}.{name}#size"] // element, f"{struct}.{name} length"
        else:
            assert not issubclass(field_type, ctypes.Array), f"{struct}.{name} is not an array in C"
            assert field_type is C_TYPES[c_type], f"{struct}.{name}: C {c_type}, ctypes {field_type.__name__}"


def test_stack_event_carries_both_stacks_at_full_depth(c_layout: dict[str, int]) -> None:
    # Both stacks at full depth, then the Python frames at full depth (two slots each).
    assert c_layout["stack_event.ips#size"] == (2 * records.MAX_STACK_DEPTH + 2 * records.PYTHON_MAX_FRAMES) * 8
    assert c_layout["stack_event.comm#size"] == records.AGENT_COMM_LEN
    assert c_layout["stack_event.ips"] == records.STACK_EVENT_HEADER_SIZE  # frames start right after the header


def test_every_constant_has_a_mirror(c_constants: set[str]) -> None:
    assert sorted(c for c in c_constants - CFLAG_PARAMETERS if not hasattr(records, c)) == []


@pytest.mark.parametrize("constant", sorted(REQUIRED_CONSTANTS))
def test_constants_match(constant: str, c_layout: dict[str, int]) -> None:
    assert getattr(records, constant) == c_layout[constant]


def _bits(value: int | None) -> int | None:
    """The constant as 64 bits: the C side prints every constant as a long long, so a u64 constant at
    or above 2^63 (PYTHON_FINGERPRINT_MULTIPLIER) comes out negative."""
    return None if value is None else value & (1 << 64) - 1


def test_all_parsed_constants_match(c_constants: set[str], c_layout: dict[str, int]) -> None:
    mirrored = c_constants - CFLAG_PARAMETERS
    assert {c: _bits(getattr(records, c, None)) for c in mirrored} == {c: _bits(c_layout[c]) for c in mirrored}


# collect_stacks(): the wire format the Python decoder assumes.


def collect_result(c_layout: dict[str, int], name: str) -> dict[str, int]:
    prefix = f"collect.{name}."
    return {key[len(prefix) :]: value for key, value in c_layout.items() if key.startswith(prefix)}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_collect_stacks_lengths_and_submitted_size(name: str, c_layout: dict[str, int]) -> None:
    flags, kernel, user = SCENARIOS[name]
    kernel_thread = bool(flags & records.SAMPLE_FLAG_KERNEL_THREAD)
    kernel_frames = max(kernel, 0) // 8
    user_frames = 0 if kernel_thread else max(user, 0) // 8
    result = collect_result(c_layout, name)
    assert result["kernel_stack_len"] == (kernel_frames if kernel >= 0 else kernel)
    assert result["user_stack_len"] == (-EFAULT if kernel_thread else user_frames if user >= 0 else user)
    # Only the header and the filled frames are sent: exactly what the decoder checks the size against.
    assert result["size"] == records.STACK_EVENT_HEADER_SIZE + 8 * (kernel_frames + user_frames)
    assert result["size"] <= ctypes.sizeof(records.StackEventRecord)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_collect_stacks_walks_kernel_first_then_user_after_it(name: str, c_layout: dict[str, int]) -> None:
    flags, kernel, _ = SCENARIOS[name]
    result = collect_result(c_layout, name)
    header, depth_bytes = records.STACK_EVENT_HEADER_SIZE, records.MAX_STACK_DEPTH * 8
    assert (result["0.flags"], result["0.offset"], result["0.size"]) == (0, header, depth_bytes)
    if flags & records.SAMPLE_FLAG_KERNEL_THREAD:
        assert result["calls"] == 1
        return
    assert result["calls"] == 2
    user_offset = header + max(kernel, 0)  # right after the kernel frames, at ips[0] when there are none
    assert (result["1.flags"], result["1.offset"], result["1.size"]) == (1 << 8, user_offset, depth_bytes)


# With USER_STACK_BYTES > 0 the record grows a stack copy: the same header is compiled again with
# stand-ins that serve a fake user stack readable up to STACK_TOP, and copy_current_user_stack() must
# copy whole chunks from the stack pointer rounded down, stop at the first unreadable chunk, put the copy
# right after the last filled slot (native frames, then the Python frames the walker appended), and size
# the record to end right after the copy. `run` plays collect_stacks, a walk of `python` frames (as
# walk_python writes them) and the copy, as the profilers do.
STACK_COPY_PROGRAM = r"""
typedef unsigned long long u64; typedef unsigned int u32; typedef int s32;
typedef unsigned short u16; typedef unsigned char u8;
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#define BPF_F_USER_STACK (1ULL << 8)
#define STACK_TOP 0x7000ULL
struct pt_regs { u64 ip, sp, bp; };
struct task_struct;
static struct pt_regs saved = {0x401000, 0x6a38, 0x6f00};
static long stack_bytes_each = 16; /* what each bpf_get_stack call fills */
static struct task_struct *bpf_get_current_task_btf(void) { return 0; }
static long bpf_task_pt_regs(struct task_struct *t) { (void)t; return (long)&saved; }
static long bpf_probe_read_kernel(void *dst, u32 size, const void *src) { memcpy(dst, src, size); return 0; }
static long bpf_probe_read_user(void *dst, u32 size, const void *src)
{
    u64 address = (u64)src;
    if (address + size > STACK_TOP) { memset(dst, 0, size); return -14; }
    for (u32 i = 0; i < size; i++) ((u8 *)dst)[i] = (u8)((address + i) >> 3);
    return 0;
}
static long bpf_get_stack(void *ctx, void *buf, u32 size, u64 flags)
{
    (void)ctx; (void)flags;
    for (long i = 0; i < stack_bytes_each / 8 && i < (long)(size / 8); i++) ((u64 *)buf)[i] = 0x1000 + (u64)i;
    return stack_bytes_each;
}
#include "common.h"
STACK_RECORD(record, STACK_BYTES);
static struct record r;
static void run(const char *name, long each, s32 python, u32 flags)
{
    struct stack_event *e = &r.event;
    memset(&r, 0xab, sizeof(r)); /* unfilled slots hold garbage, as in a reused scratch record */
    e->flags = flags;
    stack_bytes_each = each;
    u32 native = collect_stacks(NULL, e);
    u32 slot = (native - offsetof(struct stack_event, ips)) / 8;
    e->python_frames = python;
    for (s32 i = 0; i < 2 * python; i++)
        e->ips[slot + i] = 0x5000 + (u64)i;
    u64 size = copy_current_user_stack(&r, STACK_BYTES);
    u64 offset = stack_copy_offset(e);
    const u8 *bytes = (const u8 *)&r;
    printf("%s.native %u\n%s.offset %llu\n%s.size %llu\n%s.record_size %llu\n%s.bytes %u\n", name, native,
           name, offset, name, size, name, record_size(e, STACK_BYTES), name, e->user_stack_bytes);
    printf("%s.base %llu\n%s.ip %llu\n%s.sp %llu\n%s.bp %llu\n", name, e->user_stack_base, name, e->user_ip,
           name, e->user_sp, name, e->user_bp);
    printf("%s.last_python %lld\n", name, python > 0 ? (long long)e->ips[slot + 2 * python - 1] : -1LL);
    if (e->user_stack_bytes) {
        printf("%s.first %u\n%s.last %u\n", name, bytes[offset], name, bytes[offset + e->user_stack_bytes - 1]);
    }
}
int main(void) {
    printf("record %zu\n", sizeof(r));
    run("native", 16, 0, 0);
    run("python", 16, 3, 0);
    run("reason", 16, PYTHON_READ_FAILED, 0);
    run("full", MAX_STACK_DEPTH * 8, PYTHON_MAX_FRAMES, 0);
    run("kthread", 16, 0, SAMPLE_FLAG_KERNEL_THREAD);
    return 0;
}
"""
# name -> (native frames collected, Python frames walked)
COPY_SCENARIOS = {
    "native": (4, 0),  # two kernel, two user: no Python frames
    "python": (4, 3),
    "reason": (4, 0),  # a Python process whose walk failed: no slots
    "full": (2 * records.MAX_STACK_DEPTH, records.PYTHON_MAX_FRAMES),  # every slot filled
}


def copy_results(tmp_path: Path, stack_bytes: int) -> dict[str, int]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to compile bpf/common.h")
    (tmp_path / "copy.c").write_text(STACK_COPY_PROGRAM)
    build = subprocess.run(
        [
            *("gcc", "-std=gnu11", "-Wall", "-Werror", "-Wno-unknown-pragmas", f"-DSTACK_BYTES={stack_bytes}"),
            *(f"-I{COMMON_H.parent}", "-o", str(tmp_path / "copy"), str(tmp_path / "copy.c")),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    printed = subprocess.run([str(tmp_path / "copy")], capture_output=True, text=True, check=True).stdout
    return {name: int(value) for name, value in (line.split() for line in printed.splitlines())}


def scenario_result(got: dict[str, int], name: str) -> dict[str, int]:
    return {key[len(name) + 1 :]: value for key, value in got.items() if key.startswith(f"{name}.")}


# Every record layout the profilers compile: 1 chunk, the unwind.stack_bytes default, and the bound.
@pytest.mark.parametrize("stack_bytes", [records.USER_STACK_CHUNK * 2, 8192, 32768])
@pytest.mark.parametrize("scenario", sorted(COPY_SCENARIOS))
def test_user_stack_copy_follows_the_filled_slots_in_whole_chunks(
    tmp_path: Path, stack_bytes: int, scenario: str
) -> None:
    got = copy_results(tmp_path, stack_bytes)
    assert got["record"] == records.STACK_EVENT_SIZE + stack_bytes  # room for a whole copy after every slot
    result = scenario_result(got, scenario)
    native, python = COPY_SCENARIOS[scenario]
    filled = records.STACK_EVENT_HEADER_SIZE + 8 * (native + 2 * python)
    assert result["native"] == records.STACK_EVENT_HEADER_SIZE + 8 * native
    assert result["offset"] == filled  # the copy starts right after the last filled slot
    # sp 0x6a38 rounds down to 0x6a00; chunks at 0x6a00, 0x6c00 and 0x6e00 fit below 0x7000, the next does not
    # (and no more than the profiler's own size is copied).
    chunks = min(3, stack_bytes // records.USER_STACK_CHUNK)
    copied = chunks * records.USER_STACK_CHUNK
    assert (result["base"], result["bytes"]) == (0x6A00, copied)
    assert result["size"] == result["record_size"] == filled + copied
    assert result["size"] == records.stack_record_size(native, 0, python, copied)
    assert (result["ip"], result["sp"], result["bp"]) == (0x401000, 0x6A38, 0x6F00)
    last = 0x6A00 + copied - 1
    assert (result["first"], result["last"]) == ((0x6A00 >> 3) & 0xFF, (last >> 3) & 0xFF)
    assert result["last_python"] == (0x5000 + 2 * python - 1 if python else -1)  # the copy left them whole


@pytest.mark.parametrize("stack_bytes", [records.USER_STACK_CHUNK * 2, 8192])
def test_a_record_without_python_frames_sends_no_python_slots(tmp_path: Path, stack_bytes: int) -> None:
    """The regression this layout fixes: a native record with a copy must not carry the Python frames'
    room (2 KiB of unfilled slots) before its copy."""
    got = copy_results(tmp_path, stack_bytes)
    for scenario in ("native", "reason"):
        result = scenario_result(got, scenario)
        assert result["size"] <= records.STACK_EVENT_HEADER_SIZE + 8 * 4 + result["bytes"]
        assert result["size"] < records.STACK_EVENT_HEADER_SIZE + 8 * 2 * records.MAX_STACK_DEPTH + result["bytes"]


def test_a_kernel_thread_sends_its_frames_and_no_copy(tmp_path: Path) -> None:
    result = scenario_result(copy_results(tmp_path, 8192), "kthread")
    assert (result["size"], result["bytes"]) == (0, 0)  # copy_user_stack: nothing copied
    assert result["record_size"] == records.STACK_EVENT_HEADER_SIZE + 2 * 8  # no copy: frames only
