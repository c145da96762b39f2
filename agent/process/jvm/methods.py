"""Process stage: a HotSpot `Method*` read from outside the JVM: its class, name, signature, source file
and line number table, all through the offsets the JVM's vmStructs state (`agent.process.jvm.vmstructs`).

A Method points at its ConstMethod (the immutable part: name and signature indices, the bytecodes and,
after them, the compressed line number table), which points at the class's ConstantPool (its pool
holder is the class; its Utf8 entries are Symbol*s). This module owns `MethodReader`, which reads and
caches `JavaMethod`s by (Method*, ConstMethod*) with a bound (a redefined method gets a new ConstMethod),
and `loaded_classes`, the walk over the JVM's class loader data that discovery uses to check, before
anything relies on it, that methods read back as sensible names. Every failure is a `MethodReadError`.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from agent.errors import AgentError
from agent.process.cache import LruCache
from agent.process.jvm.vmstructs import VmStructs
from agent.process.memory import MemoryReader, MemoryReadError

METHOD_CACHE_SIZE = 16_384
MAX_SYMBOL = 65_535  # a Symbol's length is a u2
MAX_LINE_TABLE = 1 << 16  # bytes of compressed line table read at most
MAX_CLASSES = 200_000
MAX_METHODS = 65_535
JVM_CONSTANT_UTF8 = 1

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")


class MethodReadError(AgentError):
    """One method (or class) of one JVM could not be read; callers count it and go on."""


@dataclass(frozen=True, slots=True)
class JavaMethod:
    class_name: str  # dotted: java.util.HashMap$Node
    name: str  # main, <init>, lambda$run$0
    signature: str  # the JVM descriptor: ([Ljava/lang/String;)V
    source_file: str  # "Main.java"; "" when the class has none
    lines: tuple[tuple[int, int], ...]  # (start bci, line), in the table's order; () without a table
    code_start: int = 0  # where its bytecodes are (right after its ConstMethod), to place a bytecode pointer
    code_size: int = 0

    @property
    def qualified(self) -> str:
        return f"{self.class_name}.{self.name}"

    def bci(self, bcp: int) -> int:
        """The bytecode index a frame's bytecode pointer stands at; -1 when it is not inside the
        method's bytecodes (a frame caught while it was being set up)."""
        offset = bcp - self.code_start
        return offset if 0 <= offset < self.code_size else -1

    def line_at(self, bci: int) -> int:
        """The source line of bytecode index `bci`: the entry with the highest start at or below it, as
        HotSpot's Method::line_number_from_bci picks; 0 when unknown."""
        best_bci, best_line = -1, 0
        for start, line in self.lines:
            if start == bci:
                return line
            if best_bci < start <= bci:
                best_bci, best_line = start, line
        return best_line


@dataclass(frozen=True, slots=True)
class _Layout:
    """The offsets the reader uses, looked up once per JVM (KeyError when one is missing)."""

    method_const: int
    const_constants: int
    const_name_index: int
    const_signature_index: int
    const_code_size: int
    const_flags: int
    const_flags_width: int
    const_size: int
    has_line_table: int
    pool_holder: int
    pool_tags: int
    pool_length: int
    pool_source_file_index: int
    pool_size: int
    klass_name: int
    symbol_length: int
    symbol_body: int
    bytes_data: int  # Array<u1>::_data: the tags follow the int length directly

    @classmethod
    def of(cls, tables: VmStructs) -> _Layout:
        # JDK 21 moved ConstMethod's flags into a ConstMethodFlags member (u4) and renamed the constants.
        if ("ConstMethod", "_flags._flags") in tables.fields:
            flags, width = tables.offset("ConstMethod", "_flags._flags"), 4
            line_bit = tables.int_constants["ConstMethodFlags::_misc_has_linenumber_table"]
        else:
            flags, width = tables.offset("ConstMethod", "_flags"), 2
            line_bit = tables.int_constants["ConstMethod::_has_linenumber_table"]
        return cls(
            method_const=tables.offset("Method", "_constMethod"),
            const_constants=tables.offset("ConstMethod", "_constants"),
            const_name_index=tables.offset("ConstMethod", "_name_index"),
            const_signature_index=tables.offset("ConstMethod", "_signature_index"),
            const_code_size=tables.offset("ConstMethod", "_code_size"),
            const_flags=flags,
            const_flags_width=width,
            const_size=tables.size("ConstMethod"),
            has_line_table=line_bit,
            pool_holder=tables.offset("ConstantPool", "_pool_holder"),
            pool_tags=tables.offset("ConstantPool", "_tags"),
            pool_length=tables.offset("ConstantPool", "_length"),
            pool_source_file_index=tables.offset("ConstantPool", "_source_file_name_index"),
            pool_size=tables.size("ConstantPool"),
            klass_name=tables.offset("Klass", "_name"),
            symbol_length=tables.offset("Symbol", "_length"),
            symbol_body=tables.offset("Symbol", "_body"),
            bytes_data=tables.offset("Array<u1>", "_data"),
        )


class MethodReader:
    """Reads `JavaMethod`s of one JVM; one thread at a time."""

    def __init__(
        self, memory: MemoryReader, tables: VmStructs, feature: int, cache_size: int = METHOD_CACHE_SIZE
    ) -> None:
        """`feature`: the JDK feature release (`HotSpot.feature`), which picks the line tables' encoding."""
        self._excluded = excluded_byte(feature)
        try:
            self._layout = _Layout.of(tables)
        except KeyError as e:
            raise MethodReadError(f"this JVM's vmStructs lack {e.args[0]}") from None
        self._memory = memory
        # The pipeline thread reads methods while the JVM lives (`agent.flow.jvm`); the report thread
        # names frames from them, maybe after it has exited.
        self._lock = threading.Lock()
        self._cache: LruCache[tuple[int, int], JavaMethod] = LruCache(cache_size)
        self._latest: LruCache[int, JavaMethod] = LruCache(cache_size)  # by Method* alone

    def method(self, method: int) -> JavaMethod:
        """The method at `method` (a Method*), from the cache when its ConstMethod is the same (a class
        redefined since has another); when the JVM can no longer be read (it exited), the one last read
        at that address."""
        with self._lock:
            try:
                const = self._ptr(method + self._layout.method_const)
            except MethodReadError:
                latest = self._latest.get(method)
                if latest is None:
                    raise
                return latest
            cached = self._cache.get((method, const))
            if cached is None:
                cached = self._read_method(method, const)
                self._cache.put((method, const), cached)
                self._latest.put(method, cached)
            return cached

    def bci(self, method: int, bcp: int) -> int:
        """The bytecode index a frame's bytecode pointer stands at, in `method`; -1 when it is not
        inside the method's bytecodes (a frame caught while it was being set up)."""
        return self.method(method).bci(bcp)

    def _read_method(self, method: int, const: int) -> JavaMethod:
        lay = self._layout
        pool = self._ptr(const + lay.const_constants)
        holder = self._ptr(pool + lay.pool_holder)
        found = JavaMethod(
            class_name=self.symbol(self._ptr(holder + lay.klass_name)).replace("/", "."),
            name=self._pool_symbol(pool, self._u16(const + lay.const_name_index)),
            signature=self._pool_symbol(pool, self._u16(const + lay.const_signature_index)),
            source_file=self._source_file(pool),
            lines=self._lines(const),
            code_start=const + lay.const_size,
            code_size=self._u16(const + lay.const_code_size),
        )
        return found

    def symbol(self, address: int) -> str:
        """A Symbol's text (modified UTF-8, read as UTF-8)."""
        if address == 0:
            raise MethodReadError("null Symbol*")
        lay = self._layout
        length = self._u16(address + lay.symbol_length)
        return self._read(address + lay.symbol_body, length).decode("utf-8", "replace") if length else ""

    def _pool_symbol(self, pool: int, index: int) -> str:
        lay = self._layout
        length = _I32.unpack(self._read(pool + lay.pool_length, 4))[0]
        if not 0 < index < length:
            raise MethodReadError(f"constant pool index {index} outside 1..{length - 1}")
        tags = self._ptr(pool + lay.pool_tags)
        tag = self._read(tags + lay.bytes_data + index, 1)[0]
        if tag != JVM_CONSTANT_UTF8:
            raise MethodReadError(f"constant pool entry {index} has tag {tag}, not Utf8")
        return self.symbol(self._ptr(pool + lay.pool_size + 8 * index))

    def _source_file(self, pool: int) -> str:
        index = self._u16(pool + self._layout.pool_source_file_index)
        return self._pool_symbol(pool, index) if index else ""

    def _lines(self, const: int) -> tuple[tuple[int, int], ...]:
        lay = self._layout
        raw = self._read(const + lay.const_flags, lay.const_flags_width)
        flags = _U32.unpack(raw)[0] if lay.const_flags_width == 4 else _U16.unpack(raw)[0]
        if not flags & lay.has_line_table:
            return ()
        # The table follows the bytecodes, which follow the ConstMethod itself.
        start = const + lay.const_size + self._u16(const + lay.const_code_size)
        return decode_line_table(self._read_table(start), self._excluded)

    def _read_table(self, address: int) -> bytes:
        """Enough of the compressed table to reach its terminating 0, read a page at a time."""
        data = b""
        while len(data) < MAX_LINE_TABLE:
            size = 4096 - (address + len(data)) % 4096
            data += self._read(address + len(data), size)
            if _table_end(data, self._excluded) is not None:
                return data
        raise MethodReadError(f"no end to the line number table at {address:#x}")

    def _ptr(self, address: int) -> int:
        value: int = _U64.unpack(self._read(address, 8))[0]
        if value == 0:
            raise MethodReadError(f"null pointer at {address:#x}")
        return value

    def _u16(self, address: int) -> int:
        value: int = _U16.unpack(self._read(address, 2))[0]
        return value

    def _read(self, address: int, size: int) -> bytes:
        try:
            return self._memory.read(address, size)
        except MemoryReadError as e:
            raise MethodReadError(str(e)) from None


def excluded_byte(feature: int) -> int:
    """The byte value UNSIGNED5 never writes, by JDK: 0 since JDK 20 (JDK-8292758 gave the format its
    own header, with one excluded byte, so that a stream never holds a 0 where it could be taken for
    an end), none before. Seen here: JDK 17 writes bci 0 as 0x00, Temurin 25 as 0x01."""
    return 1 if feature >= 20 else 0


def decode_line_table(data: bytes, excluded: int) -> tuple[tuple[int, int], ...]:
    """HotSpot's CompressedLineNumberReadStream: a byte (bci delta << 3 | line delta) when both fit,
    else 0xFF and two signed UNSIGNED5 ints (`excluded`: `excluded_byte`); a 0 byte ends it."""
    pairs: list[tuple[int, int]] = []
    bci = line = 0
    position = 0
    while position < len(data):
        first = data[position]
        position += 1
        if first == 0:
            return tuple(pairs)
        if first == 0xFF:
            bci_delta, position = _signed5(data, position, excluded)
            line_delta, position = _signed5(data, position, excluded)
        else:
            bci_delta, line_delta = first >> 3, first & 7
        bci += bci_delta
        line += line_delta
        pairs.append((bci, line))
    raise MethodReadError("the line number table ran past what was read")


def _table_end(data: bytes, excluded: int) -> int | None:
    """Where the compressed table's terminating 0 is, if `data` holds it."""
    try:
        decode_line_table(data, excluded)
    except (MethodReadError, IndexError):
        return None
    return len(data)


# UNSIGNED5 (HotSpot's compressedStream): up to five bytes, each less the excluded count X; a byte
# below X + L ends the number (L = 256 - 64 - X), each byte past the first weighs 64 times the one before.
_LG_H = 6


def _unsigned5(data: bytes, position: int, excluded: int) -> tuple[int, int]:
    low = 256 - (1 << _LG_H) - excluded
    value = 0
    for i in range(5):
        if position >= len(data):
            raise MethodReadError("an UNSIGNED5 number ran past what was read")
        byte = data[position]
        position += 1
        value += (byte - excluded) << (_LG_H * i)
        if byte < excluded + low:
            return value, position
    return value, position


def _signed5(data: bytes, position: int, excluded: int) -> tuple[int, int]:
    value, position = _unsigned5(data, position, excluded)
    return (value >> 1) ^ -(value & 1), position


@dataclass(frozen=True, slots=True)
class LoadedClass:
    name: str  # dotted
    methods: tuple[int, ...]  # Method*s


def loaded_classes(memory: MemoryReader, tables: VmStructs, reader: MethodReader) -> Iterator[LoadedClass]:
    """Every instance class the JVM has loaded, through ClassLoaderDataGraph::_head, each loader's
    _klasses list and Klass::_next_link (array classes skipped: a negative layout helper)."""
    head = tables.static_address("ClassLoaderDataGraph", "_head")
    next_loader = tables.offset("ClassLoaderData", "_next")
    klasses = tables.offset("ClassLoaderData", "_klasses")
    next_link = tables.offset("Klass", "_next_link")
    layout_helper = tables.offset("Klass", "_layout_helper")
    klass_name = tables.offset("Klass", "_name")
    methods_at = tables.offset("InstanceKlass", "_methods")
    data = tables.offset("Array<Method*>", "_data")

    def word(address: int) -> int:
        try:
            value: int = _U64.unpack(memory.read(address, 8))[0]
        except MemoryReadError as e:
            raise MethodReadError(str(e)) from None
        return value

    seen = 0
    loader = word(head)
    while loader and seen < MAX_CLASSES:
        klass = word(loader + klasses)
        while klass and seen < MAX_CLASSES:
            seen += 1
            helper = _I32.unpack(memory.read(klass + layout_helper, 4))[0]
            if helper > 0:  # an instance class (arrays have a negative helper, and no methods)
                array = word(klass + methods_at)
                count = _I32.unpack(memory.read(array, 4))[0] if array else 0
                if not 0 <= count <= MAX_METHODS:
                    raise MethodReadError(f"a methods array of {count} at {array:#x}")
                raw = memory.read(array + data, 8 * count) if count else b""
                methods = tuple(_U64.unpack_from(raw, 8 * i)[0] for i in range(count))
                yield LoadedClass(reader.symbol(word(klass + klass_name)).replace("/", "."), methods)
            klass = word(klass + next_link)
        loader = word(loader + next_loader)
