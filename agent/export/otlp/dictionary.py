"""Export stage, OTLP sink: the deduplicating `ProfilesDictionary` builder for one request.

OTLP profiles (v1development, proto v1.10.0) keep every string, attribute, mapping, location,
function, link and stack once, in request-wide tables that samples refer to by index. Each table's
index 0 is its zero value, meaning "none": `""`, `Mapping{}`, `Location{}`, `Function{}`,
`KeyValueAndUnit{}`, `Stack{}` and an empty `Link{}` (not 16/8 zero bytes: Parca rejects that form).
Every entry is interned, so a table never holds duplicates.
"""

from __future__ import annotations

from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.profiles.v1development.profiles_pb2 import (
    Function,
    KeyValueAndUnit,
    Link,
    Location,
    Mapping,
    ProfilesDictionary,
    Stack,
)

AttrValue = str | int


def any_value(value: AttrValue) -> AnyValue:
    """A plain (not string-table-referencing) AnyValue; bool is refused because it is also an int."""
    if isinstance(value, bool):
        raise TypeError("boolean attributes are not used by this encoder")
    if isinstance(value, int):
        return AnyValue(int_value=value)
    return AnyValue(string_value=value)


class DictionaryBuilder:
    """Interns table entries and returns their indices; `dictionary` is the finished message."""

    def __init__(self, dictionary: ProfilesDictionary | None = None) -> None:
        """Fill `dictionary` (empty; e.g. a request's own field, so it is never copied) or a new one."""
        self.dictionary = dictionary if dictionary is not None else ProfilesDictionary()
        d = self.dictionary
        d.string_table.append("")
        d.mapping_table.append(Mapping())
        d.location_table.append(Location())
        d.function_table.append(Function())
        d.link_table.append(Link())
        d.attribute_table.append(KeyValueAndUnit())
        d.stack_table.append(Stack())
        self._strings: dict[str, int] = {"": 0}
        self._attributes: dict[tuple[str, type, AttrValue], int] = {}
        self._mappings: dict[tuple[int, int, int, int, tuple[int, ...]], int] = {}
        self._functions: dict[tuple[int, int, int, int], int] = {}
        self._locations: dict[tuple[int, int, int, int, tuple[int, ...]], int] = {}
        self._stacks: dict[tuple[int, ...], int] = {(): 0}

    def string(self, value: str) -> int:
        index = self._strings.get(value)
        if index is None:
            index = self._strings[value] = len(self.dictionary.string_table)
            self.dictionary.string_table.append(value)
        return index

    def attribute(self, key: str, value: AttrValue) -> int:
        # The value's type is part of the identity: "1" and 1 are different attributes.
        ident = (key, type(value), value)
        index = self._attributes.get(ident)
        if index is None:
            index = self._attributes[ident] = len(self.dictionary.attribute_table)
            key_index = self.string(key)
            self.dictionary.attribute_table.add(key_strindex=key_index, value=any_value(value))
        return index

    def mapping(self, start: int, limit: int, file_offset: int, filename: str, attributes: tuple[int, ...]) -> int:
        ident = (start, limit, file_offset, self.string(filename), attributes)
        index = self._mappings.get(ident)
        if index is None:
            index = self._mappings[ident] = len(self.dictionary.mapping_table)
            self.dictionary.mapping_table.add(
                memory_start=start,
                memory_limit=limit,
                file_offset=file_offset,
                filename_strindex=ident[3],
                attribute_indices=attributes,
            )
        return index

    def function(self, name: str, system_name: str = "", filename: str = "", start_line: int = 0) -> int:
        """A function: native ones are known by name only; Python ones (`agent.symbolize.types.PythonSource`)
        also by co_name, file and first line."""
        ident = (self.string(name), self.string(system_name), self.string(filename), start_line)
        index = self._functions.get(ident)
        if index is None:
            index = self._functions[ident] = len(self.dictionary.function_table)
            self.dictionary.function_table.add(
                name_strindex=ident[0], system_name_strindex=ident[1], filename_strindex=ident[2], start_line=start_line
            )
        return index

    def location(
        self, mapping_index: int, address: int, function_index: int, attributes: tuple[int, ...], line: int = 0
    ) -> int:
        """A location; `function_index` 0 leaves `lines` empty so a backend can symbolize it later.

        `line` is the source line (Python frames; 0, unset, for native ones)."""
        ident = (mapping_index, address, function_index, line, attributes)
        index = self._locations.get(ident)
        if index is None:
            index = self._locations[ident] = len(self.dictionary.location_table)
            # Built in place: constructing a message and appending it would copy it.
            location = self.dictionary.location_table.add(
                mapping_index=mapping_index, address=address, attribute_indices=attributes
            )
            if function_index:
                location.lines.add(function_index=function_index, line=line)
        return index

    def stack(self, location_indices: tuple[int, ...]) -> int:
        """A stack, leaf first; the empty stack is the zero entry."""
        index = self._stacks.get(location_indices)
        if index is None:
            index = self._stacks[location_indices] = len(self.dictionary.stack_table)
            self.dictionary.stack_table.add(location_indices=location_indices)
        return index
