"""A fake process address space, and CPython object images laid out by a PythonLayout, for unit tests.

`FakeMemory` answers `read` like ProcessMemory over regions placed at chosen addresses (a fault outside
them, a short read across a region's end). `ObjectImages` writes str, bytes and code objects into it
the way CPython lays them out, so readers can be tested without a live interpreter, then mutated.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from agent.process.memory import MemoryErrorReason, MemoryReadError
from agent.process.python.layouts import NO_FIELD, PythonLayout

STR_TYPE = 0x7F00_0000_1000
BYTES_TYPE = 0x7F00_0000_2000
CODE_TYPE = 0x7F00_0000_3000


@dataclass
class FakeMemory:
    pid: int = 4242
    regions: dict[int, bytearray] = field(default_factory=dict)
    next_free: int = 0x5500_0000_0000
    reads: int = 0

    def place(self, data: bytes | bytearray, align: int = 16) -> int:
        address = self.next_free
        self.regions[address] = bytearray(data)
        self.next_free = (address + len(data) + 64 + align - 1) // align * align  # a gap after each
        return address

    def read(self, address: int, size: int) -> bytes:
        self.reads += 1
        for base, data in self.regions.items():
            if base <= address < base + len(data):
                got = data[address - base : address - base + size]
                if len(got) < size:
                    raise MemoryReadError(self.pid, address, size, MemoryErrorReason.SHORT)
                return bytes(got)
        raise MemoryReadError(self.pid, address, size, MemoryErrorReason.FAULT)


@dataclass
class ObjectImages:
    layout: PythonLayout
    memory: FakeMemory

    def str_image(self, text: str) -> bytes:
        top = max(map(ord, text), default=0)
        kind = 1 if top < 0x100 else 2 if top < 0x10000 else 4
        is_ascii = top < 0x80
        lay = self.layout
        state = kind << lay.unicode_kind_shift | 1 << lay.unicode_compact_bit | int(is_ascii) << lay.unicode_ascii_bit
        if lay.unicode_ready_bit != NO_FIELD:
            state |= 1 << lay.unicode_ready_bit
        header = bytearray(lay.unicode_ascii_data if is_ascii else lay.unicode_compact_data)
        struct.pack_into("<qQ", header, 0, 1, STR_TYPE)
        struct.pack_into("<q", header, lay.unicode_length, len(text))
        struct.pack_into("<I", header, lay.unicode_state, state)
        encoding = {1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind]
        return bytes(header) + text.encode(encoding, "surrogatepass") + bytes(kind)

    def place_str(self, text: str) -> int:
        return self.memory.place(self.str_image(text))

    def place_bytes(self, data: bytes) -> int:
        header = struct.pack("<qQqq", 1, BYTES_TYPE, len(data), -1)
        return self.memory.place(header[: self.layout.bytes_data].ljust(self.layout.bytes_data, b"\0") + data + b"\0")

    def place_code(
        self, name: str, qualname: str, filename: str, first_line: int, linetable: bytes, code_units: int
    ) -> int:
        lay = self.layout
        size = lay.code_read_size()
        if lay.code_code_adaptive != NO_FIELD:
            size = lay.code_code_adaptive + 2 * code_units
        image = bytearray(size)
        struct.pack_into("<qQ", image, 0, 1, CODE_TYPE)
        struct.pack_into("<i", image, lay.code_firstlineno, first_line)
        struct.pack_into("<Q", image, lay.code_name, self.place_str(name))
        struct.pack_into("<Q", image, lay.code_filename, self.place_str(filename))
        struct.pack_into("<Q", image, lay.code_linetable, self.place_bytes(linetable))
        if lay.code_qualname != NO_FIELD:
            struct.pack_into("<Q", image, lay.code_qualname, self.place_str(qualname))
        if lay.code_code_adaptive != NO_FIELD:
            struct.pack_into("<q", image, lay.var_size, code_units)
        else:
            struct.pack_into("<Q", image, lay.code_code, self.place_bytes(bytes(2 * code_units)))
        return self.memory.place(image)
