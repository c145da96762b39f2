"""Process stage: the str/bytes/code readers and line tables on synthetic images, and fuzzed memory.

The images are laid out as CPython lays them (tests/support/fake_memory.py); the live check against
real interpreters is test_python_objects_live.py. The fuzz part feeds seeded random and mutated memory
to every reader: each call must end in a CodeReadError (LineTableError for the bare decoders) or a
bounded result, never another exception, and all of it within a time bound (no hang).
"""

from __future__ import annotations

import random
import struct
import sys
import time
import types

import pytest

from agent.process.python.layouts import PY310, PY311, PY312, PY313, PythonLayout
from agent.process.python.linetable import LineTableError, decode, decode_lines_310, decode_locations
from agent.process.python.objects import (
    MAX_STR_LENGTH,
    CodeErrorReason,
    CodeInfo,
    CodeReadError,
    read_bytes,
    read_code,
    read_str,
)
from tests.support.fake_memory import CODE_TYPE, STR_TYPE, FakeMemory, ObjectImages

LAYOUTS = [PY310, PY311, PY312, PY313]
TEXTS = ["", "ascii_name", "caf\xe9", "\u0394elta_\u4e2d", "emoji_\U0001f600", "x" * 5000]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"{lay.version[0]}.{lay.version[1]}")
@pytest.mark.parametrize("text", TEXTS, ids=["empty", "ascii", "ucs1", "ucs2", "ucs4", "long"])
def test_str_kinds(layout: PythonLayout, text: str) -> None:
    images = ObjectImages(layout, FakeMemory())
    address = images.place_str(text)
    assert read_str(images.memory, layout, address, type_address=STR_TYPE) == text


def test_str_rejects_what_cpython_cannot_have_made() -> None:
    layout = PY312
    images = ObjectImages(layout, FakeMemory())

    def reason_of(image: bytes, **kwargs: int) -> CodeErrorReason:
        with pytest.raises(CodeReadError) as err:
            read_str(images.memory, layout, images.memory.place(image), **kwargs)
        return err.value.reason

    good = bytearray(images.str_image("name"))
    assert reason_of(bytes(good), type_address=STR_TYPE + 8) == CodeErrorReason.BAD_STRING  # wrong type
    for mutate in (
        lambda b: struct.pack_into("<q", b, 16, 10**9),  # length past the limit
        lambda b: struct.pack_into("<q", b, 16, -1),
        lambda b: struct.pack_into("<I", b, 32, 3 << 2 | 1 << 5),  # kind 3
        lambda b: struct.pack_into("<I", b, 32, 1 << 2 | 1 << 6),  # not compact
        lambda b: struct.pack_into("<I", b, 32, 2 << 2 | 1 << 5 | 1 << 6),  # ascii but kind 2
        lambda b: b.__setitem__(40 + 4, ord("!")),  # no NUL after the characters
        lambda b: b.__setitem__(40, 0xC3),  # a non-ASCII byte in an ASCII str
    ):
        image = bytearray(good)
        mutate(image)
        assert reason_of(bytes(image)) == CodeErrorReason.BAD_STRING
    # UCS2 holding only Latin-1 characters is not canonical: garbage.
    ucs2 = bytearray(images.str_image("\u0394x"))
    ucs2[56:58] = b"a\0"
    assert reason_of(bytes(ucs2)) == CodeErrorReason.BAD_STRING
    assert reason_of(bytes(good), limit=3) == CodeErrorReason.BAD_STRING
    with pytest.raises(CodeReadError) as err:
        read_str(images.memory, layout, 0x1234_5678_0000)
    assert err.value.reason == CodeErrorReason.UNREADABLE
    with pytest.raises(CodeReadError) as err:
        read_str(images.memory, layout, images.place_str("x") + 4)  # misaligned
    assert err.value.reason == CodeErrorReason.BAD_STRING


def test_bytes() -> None:
    images = ObjectImages(PY311, FakeMemory())
    assert read_bytes(images.memory, PY311, images.place_bytes(b"\x01\x02\x00\x03")) == b"\x01\x02\x00\x03"
    assert read_bytes(images.memory, PY311, images.place_bytes(b"")) == b""
    with pytest.raises(CodeReadError) as err:
        read_bytes(images.memory, PY311, images.place_bytes(b"abc"), limit=2)
    assert err.value.reason == CodeErrorReason.BAD_BYTES


def _own_code() -> types.CodeType:
    source = "def f(a):\n    b = a + 1\n\n    return (b,\n        a)\n"
    code = compile(source, "/src/mod.py", "exec").co_consts[0]
    assert isinstance(code, types.CodeType)
    return code


def _own_layout() -> PythonLayout:
    return {(3, 11): PY311, (3, 12): PY312, (3, 13): PY313}[sys.version_info[:2]]


@pytest.mark.skipif(sys.version_info[:2] not in ((3, 11), (3, 12), (3, 13)), reason="a 3.11-3.13 table is needed")
def test_code_from_this_interpreter_s_own_table() -> None:
    code = _own_code()
    layout = _own_layout()
    images = ObjectImages(layout, FakeMemory())
    units = len(code.co_code) // 2
    address = images.place_code("f", "f", "/src/mod.py", code.co_firstlineno, code.co_linetable, units)
    info = read_code(images.memory, layout, address, CODE_TYPE)
    assert (info.name, info.filename, info.first_line, info.code_bytes) == ("f", "/src/mod.py", 1, 2 * units)
    assert info.code_start == address + layout.code_code_adaptive
    for start, end, line in code.co_lines():
        for offset in range(start, end, 2):
            assert info.line_for(info.code_start + offset) == (line or 0)
    assert info.line_for(info.code_start - 2) == 1  # prev_instr before the first instruction: the first line
    assert info.line_for(info.code_start + 2 * units) == 0  # past the end
    assert info.line_for(0) == 0
    with pytest.raises(CodeReadError) as err:
        read_code(images.memory, layout, address, CODE_TYPE + 16)
    assert err.value.reason == CodeErrorReason.NOT_CODE


def test_code_310_f_lasti() -> None:
    images = ObjectImages(PY310, FakeMemory())
    # 3 ranges: bytes [0, 6) line 10, [6, 10) line 12, [10, 12) no line; empty entries add line deltas.
    table = bytes([6, 0, 0, 1, 4, 1, 2, 0x80])
    address = images.place_code("g", "ignored", "/src/g.py", 10, table, 6)
    info = read_code(images.memory, PY310, address, CODE_TYPE)
    assert info.qualname == "g" and info.instruction_kind == "f_lasti"
    assert [info.line_for(i) for i in range(6)] == [10, 10, 10, 12, 12, 0]
    assert info.line_for(0xFFFFFFFF) == 10  # f_lasti -1 (zero-extended): not started, the first line
    assert info.line_for(-1) == 10
    assert info.line_for(6) == 0


def test_linetable_decoders() -> None:
    assert decode_lines_310(bytes([4, 2, 0, 0x80, 2, 0xFF]), 5).ranges() == [(0, 4, 7), (4, 6, 6)]
    # 3.11 forms: short (kind 0), one-line +1 (kind 11), no-columns svarint -1, long (14), no location (15).
    entries = bytes([0x80 | 0 << 3 | 1, 0x10, 0x80 | 11 << 3, 3, 9, 0x80 | 13 << 3, 3])
    entries += bytes([0x80 | 14 << 3 | 2, 8, 2, 5, 7, 0x80 | 15 << 3])
    table = decode_locations(entries, 20)
    assert table.ranges() == [(0, 4, 20), (4, 6, 21), (6, 8, 20), (8, 14, 24), (14, 16, None)]
    assert decode((3, 12), entries, 20, code_bytes=16).code_bytes == 16
    for bad in (bytes([0x10]), bytes([0x80 | 13 << 3]), bytes([0x80 | 13 << 3, 0x41]), bytes([0x80 | 10 << 3, 1])):
        with pytest.raises(LineTableError):
            decode_locations(bad, 1)
    with pytest.raises(LineTableError):
        decode_locations(entries, 20, code_bytes=14)
    with pytest.raises(LineTableError):
        decode_lines_310(bytes([1]), 1)
    with pytest.raises(LineTableError):
        decode_lines_310(bytes([2, 0x90]), 1)  # a line below zero


# --- fuzz ------------------------------------------------------------------------------------------

FUZZ_SEED = 1212
FUZZ_ITERATIONS = 5000
FUZZ_SECONDS = 60.0


def _bounded(info: CodeInfo, rng: random.Random) -> None:
    assert len(info.name) <= MAX_STR_LENGTH and len(info.filename) <= MAX_STR_LENGTH
    assert info.first_line >= 0 and 0 < info.code_bytes <= 2 << 20
    for raw in (rng.getrandbits(64), info.code_start + rng.randrange(-64, info.code_bytes + 64), 0):
        line = info.line_for(raw)
        assert isinstance(line, int) and line >= 0


def test_fuzz_random_memory_as_objects() -> None:
    rng = random.Random(FUZZ_SEED)
    deadline = time.monotonic() + FUZZ_SECONDS
    outcomes = {"error": 0, "read": 0}
    for i in range(FUZZ_ITERATIONS):
        layout = LAYOUTS[i % len(LAYOUTS)]
        memory = FakeMemory()
        blob = bytearray(rng.randbytes(rng.choice([8, 64, 512, 4096])))
        if i % 3 == 0 and len(blob) >= 16:  # a plausible ob_type, so the readers get past the type check
            struct.pack_into("<Q", blob, 8, CODE_TYPE)
        address = memory.place(blob)
        reader = rng.choice(["code", "str", "bytes"])
        try:
            if reader == "code":
                _bounded(read_code(memory, layout, address, CODE_TYPE if i % 2 else 0), rng)
            elif reader == "str":
                assert len(read_str(memory, layout, address)) <= MAX_STR_LENGTH
            else:
                assert len(read_bytes(memory, layout, address)) < len(blob)
            outcomes["read"] += 1
        except CodeReadError:
            outcomes["error"] += 1
        assert time.monotonic() < deadline
    assert outcomes["error"] > FUZZ_ITERATIONS // 2


def test_fuzz_mutated_code_objects() -> None:
    """Valid images with a few bytes changed anywhere (header, strings, line table): errors or bounded reads."""
    rng = random.Random(FUZZ_SEED + 1)
    deadline = time.monotonic() + FUZZ_SECONDS
    table_310 = bytes([6, 0, 0, 1, 4, 1, 2, 0x80])
    entries = bytes([0x80 | 0 << 3 | 1, 0x10, 0x80 | 11 << 3, 3, 9, 0x80 | 13 << 3, 3])
    entries += bytes([0x80 | 14 << 3 | 2, 8, 2, 5, 7, 0x80 | 15 << 3])
    outcomes = {"error": 0, "read": 0}
    for i in range(FUZZ_ITERATIONS):
        layout = LAYOUTS[i % len(LAYOUTS)]
        images = ObjectImages(layout, FakeMemory())
        table, units = (table_310, 6) if layout is PY310 else (entries, 8)
        address = images.place_code("fn", "Cls.fn", "/src/\u4e2d.py", 20, table, units)
        regions = list(images.memory.regions.values())
        for _ in range(rng.randint(1, 8)):
            region = rng.choice(regions)
            region[rng.randrange(len(region))] = rng.randrange(256)
        try:
            _bounded(read_code(images.memory, layout, address, CODE_TYPE), rng)
            outcomes["read"] += 1
        except CodeReadError:
            outcomes["error"] += 1
        assert time.monotonic() < deadline
    assert outcomes["error"] > 0 and outcomes["read"] > 0


def test_fuzz_random_line_tables() -> None:
    rng = random.Random(FUZZ_SEED + 2)
    deadline = time.monotonic() + FUZZ_SECONDS
    decoded = 0
    for i in range(FUZZ_ITERATIONS * 2):
        raw = rng.randbytes(rng.randrange(0, 300))
        if i % 2:  # mostly-valid first bytes, so the decoder gets deep into entries
            raw = bytes(b | 0x80 if j % 3 == 0 else b & 0x7F for j, b in enumerate(raw))
        version = (3, 10) if i % 3 == 0 else (3, 12)
        try:
            table = decode(version, raw, rng.randrange(0, 5000), code_bytes=rng.choice([None, 64, 4096]))
        except LineTableError:
            continue
        decoded += 1
        assert list(table.starts) == sorted(table.starts)
        for offset in (rng.randrange(-4, 5000) for _ in range(8)):
            assert table.line_at(offset) >= 0
        assert time.monotonic() < deadline
    assert decoded > 0
