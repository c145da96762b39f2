"""pprof stage: the string table shared by every message of one `perftools.profiles.Profile`.

pprof refers to every string by its index in `Profile.string_table`; index 0 must be "" (the decoder
rejects anything else, and index 0 doubles as "unset" for every string field), and each string is
stored once.
"""

from __future__ import annotations


class StringTable:
    """Interns strings in first-use order; `index("")` is always 0."""

    __slots__ = ("_indices", "_strings")

    def __init__(self) -> None:
        self._strings: list[str] = [""]
        self._indices: dict[str, int] = {"": 0}

    def index(self, value: str) -> int:
        """The index of `value`, adding it at the end the first time it is seen."""
        found = self._indices.get(value)
        if found is not None:
            return found
        new_index = len(self._strings)
        self._strings.append(value)
        self._indices[value] = new_index
        return new_index

    def strings(self) -> tuple[str, ...]:
        return tuple(self._strings)

    def __len__(self) -> int:
        return len(self._strings)
