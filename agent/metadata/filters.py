"""Metadata stage: which processes the operator wants profiled, by executable, comm, systemd unit or cgroup.

This module owns `ProcessFilter`, built by the config stage from the `filters` section and asked by the
report stage about each process. Patterns are shell globs (`fnmatch`, case-sensitive). Rules:

- an exclude pattern that matches wins over everything;
- with no include pattern at all every process is included; otherwise a process must match at least
  one include pattern, of any kind;
- an executable pattern containing `/` matches the full path, otherwise the file name;
- an empty value (a kernel thread's executable, a process outside any unit) matches no pattern, so
  `exclude_unit=("*",)` drops processes in a unit, not every process.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from dataclasses import dataclass, field, fields

from agent.metadata.process import ProcessLabels

_Patterns = tuple[str, ...]


def _compile(patterns: _Patterns) -> re.Pattern[str] | None:
    """One regex for a group of globs (None for no pattern), so matching costs one call per group."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def _hit(regex: re.Pattern[str] | None, value: str) -> bool:
    return regex is not None and value != "" and regex.match(value) is not None


@dataclass(frozen=True, slots=True)
class _Compiled:
    exe_path: re.Pattern[str] | None
    exe_name: re.Pattern[str] | None
    comm: re.Pattern[str] | None
    unit: re.Pattern[str] | None
    cgroup: re.Pattern[str] | None

    @classmethod
    def of(cls, exe: _Patterns, comm: _Patterns, unit: _Patterns, cgroup: _Patterns) -> _Compiled:
        return cls(
            exe_path=_compile(tuple(p for p in exe if "/" in p)),
            exe_name=_compile(tuple(p for p in exe if "/" not in p)),
            comm=_compile(comm),
            unit=_compile(unit),
            cgroup=_compile(cgroup),
        )

    @property
    def empty(self) -> bool:
        return all(regex is None for regex in (self.exe_path, self.exe_name, self.comm, self.unit, self.cgroup))

    def any_match(self, labels: ProcessLabels, cgroup_path: str) -> bool:
        return (
            _hit(self.exe_path, labels.exe_path)
            or _hit(self.exe_name, posixpath.basename(labels.exe_path))
            or _hit(self.comm, labels.comm)
            or _hit(self.unit, labels.systemd_unit)
            or _hit(self.cgroup, cgroup_path)
        )


@dataclass(frozen=True, slots=True)
class ProcessFilter:
    include_exe: _Patterns = ()
    exclude_exe: _Patterns = ()
    include_comm: _Patterns = ()
    exclude_comm: _Patterns = ()
    include_unit: _Patterns = ()
    exclude_unit: _Patterns = ()
    include_cgroup: _Patterns = ()
    exclude_cgroup: _Patterns = ()
    _include: _Compiled = field(init=False, repr=False, compare=False)
    _exclude: _Compiled = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name) if f.init else ()
            if not (isinstance(value, tuple) and all(isinstance(p, str) and p for p in value)):
                # A bare string would be iterated as one-character globs and match nearly everything.
                raise ValueError(f"{f.name} must be a tuple of non-empty glob strings, got {value!r}")
        include = _Compiled.of(self.include_exe, self.include_comm, self.include_unit, self.include_cgroup)
        exclude = _Compiled.of(self.exclude_exe, self.exclude_comm, self.exclude_unit, self.exclude_cgroup)
        object.__setattr__(self, "_include", include)
        object.__setattr__(self, "_exclude", exclude)

    @property
    def selects_all(self) -> bool:
        """True when no pattern is set: every process matches, and callers may skip reading metadata."""
        return self._include.empty and self._exclude.empty

    def matches(self, labels: ProcessLabels, cgroup_path: str | None = None) -> bool:
        """Whether the process is profiled; `cgroup_path` defaults to `labels.cgroup_path`."""
        path = labels.cgroup_path if cgroup_path is None else cgroup_path
        if self._exclude.any_match(labels, path):
            return False
        return self._include.empty or self._include.any_match(labels, path)
