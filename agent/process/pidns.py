"""Process stage (stage-neutral): a process's thread ids in its own pid namespace, and the agent's.

A process in its own pid namespace (a container, `unshare -fp`) knows its threads by that namespace's
ids: what gettid() returns there, and so what CPython keeps in `PyThreadState.native_thread_id`. The
agent knows them by the ids of the namespace `<proc_root>` was mounted in (the directory names under
`<proc_root>/PID/task`, the host's for the agent on the host). The kernel writes each task's ids in
every namespace it is visible in on the `NSpid:` line of `<proc_root>/PID/task/TID/status`, from
`<proc_root>`'s namespace (the first field, which is TID) to the task's own (the last).

This module owns `task_ids(proc_root, pid)`: {own-namespace tid: `<proc_root>` tid} over the tasks
listed, and, by reason, the tasks it could not map (`TASK_SKIP_REASONS`): one that exited between the
listing and the read, an unreadable or malformed status file. On a kernel without `NSpid:` (before
4.1) the tasks are taken by the ids they are listed by (`no_nspid`, counted too): right for a process
in the agent's namespace; one in a namespace of its own then fails its validation, as it did before
the mapping (`bad_native_thread_id`), and is never walked with another process's ids.

Every thread of a process is in the one pid namespace (a thread cannot be created in another), so a
task found in `<proc_root>`'s own namespace (one id) says the same of all: the other status files are
not read.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

# Why a task's own-namespace tid was not read from its NSpid line.
VANISHED = "vanished"  # the task exited between the listing and the read of its status
UNREADABLE = "unreadable"  # its status could not be read (permissions, I/O)
MALFORMED = "malformed"  # no parsable NSpid line, or one whose first field is not the task's tid
NO_NSPID = "no_nspid"  # the kernel has no NSpid line (before 4.1): mapped as itself
TASK_SKIP_REASONS = (VANISHED, UNREADABLE, MALFORMED, NO_NSPID)
_NSPID = "NSpid:"


@dataclass(frozen=True, slots=True)
class TaskIds:
    """The threads of one process as two namespaces know them."""

    to_agent: Mapping[int, int]  # the tid in the process's own pid namespace -> the tid under proc_root
    skipped: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # tasks, by reason

    @property
    def own(self) -> frozenset[int]:
        """The tids the process itself sees (what PyThreadState.native_thread_id holds)."""
        return frozenset(self.to_agent)

    @property
    def found(self) -> bool:
        """Whether any task was mapped (False: the process has gone, or none could be read)."""
        return bool(self.to_agent)


def parse_nspid(status: str) -> tuple[int, ...] | None:
    """The ids of a status file's `NSpid:` line, outermost namespace first; None when the file has no
    such line (a kernel before 4.1). Raises ValueError when the line holds anything but ids."""
    for line in status.splitlines():
        if line.startswith(_NSPID):
            ids = tuple(int(word) for word in line[len(_NSPID) :].split())
            if not ids or min(ids) <= 0:
                raise ValueError(f"not a list of ids: {line!r}")
            return ids
    return None


def task_ids(proc_root: Path, pid: int) -> TaskIds:
    """The tasks of `pid` (a process id under `proc_root`), by their own namespace's tid; empty when the
    process has gone or its task list cannot be read."""
    tasks = proc_root / str(pid) / "task"
    try:
        listed = sorted(int(name) for name in os.listdir(tasks) if name.isdigit())
    except OSError:
        return TaskIds(MappingProxyType({}))
    to_agent: dict[int, int] = {}
    skipped: Counter[str] = Counter()
    for tid in listed:
        ids, reason = _read_ids(tasks / str(tid) / "status", tid)
        if reason == NO_NSPID:
            # The kernel has no NSpid for any task: all are taken as they are listed.
            rest = [t for t in listed if t >= tid]
            skipped[NO_NSPID] += len(rest)
            to_agent.update((t, t) for t in rest)
            break
        if ids is None:
            skipped[reason] += 1
            continue
        if len(ids) == 1:  # in proc_root's own namespace, and so are the others (the module docstring)
            to_agent.update((t, t) for t in listed if t >= tid)
            break
        to_agent[ids[-1]] = tid
    return TaskIds(MappingProxyType(to_agent), MappingProxyType(dict(skipped)))


def _read_ids(status: Path, tid: int) -> tuple[tuple[int, ...] | None, str]:
    """(the task's NSpid ids, "") or (None, why not)."""
    try:
        text = status.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None, VANISHED
    except OSError:
        return None, UNREADABLE
    try:
        ids = parse_nspid(text)
    except ValueError:
        return None, MALFORMED
    if ids is None:
        # A status file without NSpid is an old kernel's, unless it is not a status file at all.
        return None, NO_NSPID if "\nTgid:" in text else MALFORMED
    if ids[0] != tid:  # the first id is the one the task is listed by: anything else is not this file
        return None, MALFORMED
    return ids, ""
