"""Metadata stage: which processes the operator wants profiled, by executable, comm, systemd unit or cgroup.

This module owns `ProcessFilter`, which is also the `filters` configuration section (each pattern field is
declared as a setting here, see `agent.settings`): `agent.config` loads it, and the pipeline's process
selector (`agent.metadata.selector`) asks it about each process. Patterns are shell globs (`fnmatch`,
case-sensitive). Rules:

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
from typing import Any, ClassVar

from agent.metadata.process import ProcessLabels
from agent.settings import setting

_Patterns = tuple[str, ...]
_EXE = "executable (a pattern with / matches the full path, else the file name)"


def parse_patterns(value: Any) -> tuple[str, ...]:
    """Shell glob patterns: a YAML list, or a comma-separated string."""
    if value is None:
        return ()
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return tuple(str(item).strip() for item in items if str(item).strip())


def _patterns(kind: str, label: str) -> _Patterns:
    return setting((), parse_patterns, f"{kind} processes whose {label} match.")


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
    """Which processes are profiled (shell globs; exclude wins; no include = everything)."""

    SECTION: ClassVar[str] = "filters"

    include_exe: tuple[str, ...] = _patterns("Include", _EXE)
    include_comm: tuple[str, ...] = _patterns("Include", "comm")
    include_unit: tuple[str, ...] = _patterns("Include", "systemd unit")
    include_cgroup: tuple[str, ...] = _patterns("Include", "cgroup path")
    exclude_exe: tuple[str, ...] = _patterns("Exclude", _EXE)
    exclude_comm: tuple[str, ...] = _patterns("Exclude", "comm")
    exclude_unit: tuple[str, ...] = _patterns("Exclude", "systemd unit")
    exclude_cgroup: tuple[str, ...] = _patterns("Exclude", "cgroup path")
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
