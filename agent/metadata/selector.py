"""Metadata stage: which processes the pipeline keeps, decided once per process and cached.

This module owns `ProcessSelector`: the operator's `ProcessFilter` applied to the `ProcessLabels` that
`ProcessMetadata` reads, with the decision cached per pid in a bounded LRU so /proc is read once per
process, not once per event. The pipeline asks it about every stack event and tells it to `forget` a
pid on each process event (a new process or an exec: the executable, the comm and possibly the cgroup
are not what they were).

Rules on top of `ProcessFilter`'s:

- with no pattern at all (`selects_all`) every process is admitted and /proc is never read;
- a process that vanished before its first event was handled, or whose files cannot be read, is
  decided on what could be read: empty values match no pattern, so such a process is admitted only
  when there is no include pattern (no exclude pattern can name it);
- kernel threads (`admits_kernel_thread`) have no executable, unit or cgroup of their own and are
  decided without reading /proc: they are admitted only when there is no include pattern at all, and
  an exclude comm pattern matching the thread's name (e.g. `kworker/*`) still drops them.

Threads: `admits`, `admits_kernel_thread` and `forget` run on the pipeline thread only. `set_filter`
(a config reload) may run on another thread: it replaces the filter and its cache in one assignment,
so a decision taken under the old filter lands in the discarded cache.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from agent.metadata.filters import ProcessFilter
from agent.metadata.process import DEFAULT_CACHE_SIZE, ProcessLabels, ProcessMetadata

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _State:
    """One filter with the decisions taken under it; replaced whole by `set_filter`."""

    filter: ProcessFilter
    selects_all: bool
    has_includes: bool
    kernel_threads: bool | None  # the answer for every kernel thread; None: depends on the comm
    decisions: OrderedDict[int, bool] = field(default_factory=OrderedDict)

    @classmethod
    def of(cls, process_filter: ProcessFilter) -> _State:
        f = process_filter
        has_includes = bool(f.include_exe or f.include_comm or f.include_unit or f.include_cgroup)
        if has_includes:
            kernel_threads: bool | None = False
        else:
            kernel_threads = None if f.exclude_comm else True
        return cls(f, f.selects_all, has_includes, kernel_threads)


class ProcessSelector:
    """Admits or rejects pids by the process filters; see the module docstring for the rules."""

    def __init__(
        self, process_filter: ProcessFilter, metadata: ProcessMetadata, *, cache_size: int = DEFAULT_CACHE_SIZE
    ) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        self._metadata = metadata
        self._cache_size = cache_size
        self._state = _State.of(process_filter)
        # Counters for the metrics stage; they only grow. `admitted` and `rejected` count decisions
        # (one per process read), `events_filtered` every question answered "no".
        self.admitted = 0
        self.rejected = 0
        self.events_filtered = 0
        self.cache_evictions = 0

    @property
    def filter(self) -> ProcessFilter:
        return self._state.filter

    def __len__(self) -> int:
        return len(self._state.decisions)

    def set_filter(self, process_filter: ProcessFilter) -> None:
        """Apply new filters (a config reload): every pid is decided afresh on its next event."""
        self._state = _State.of(process_filter)

    def admits(self, pid: int) -> bool:
        """Whether events of process `pid` are kept; reads /proc only the first time a pid is asked about."""
        state = self._state
        if state.selects_all:
            return True
        decisions = state.decisions
        decision = decisions.get(pid)
        if decision is None:
            decision = self._decide(state, self._metadata.read(pid))
            decisions[pid] = decision
            if len(decisions) > self._cache_size:
                decisions.popitem(last=False)
                self.cache_evictions += 1
        else:
            decisions.move_to_end(pid)
        if not decision:
            self.events_filtered += 1
        return decision

    def known_rejected(self, pid: int) -> bool:
        """Whether `pid` has been rejected already. Safe from any thread (the reader asks, before unwinding):
        it reads the decisions made so far, never /proc, and changes nothing."""
        return self._state.decisions.get(pid) is False

    def admits_kernel_thread(self, comm: str) -> bool:
        """Whether events of a kernel thread named `comm` are kept; never reads /proc."""
        state = self._state
        admitted = state.kernel_threads
        if admitted is None:
            admitted = state.filter.matches(ProcessLabels(0, comm=comm), cgroup_path="")
        if not admitted:
            self.events_filtered += 1
        return admitted

    def forget(self, pid: int) -> None:
        """Drop the decision about `pid`: it exec'd or is a new process, so it is read again when next asked."""
        self._state.decisions.pop(pid, None)
        # ProcessMetadata caches labels by (pid, start time), and exec keeps the start time: without
        # dropping that entry too, an exec'd process would be judged on its old exe and comm.
        self._metadata.forget(pid)

    def _decide(self, state: _State, labels: ProcessLabels) -> bool:
        admitted = state.filter.matches(labels)
        if admitted:
            self.admitted += 1
        else:
            self.rejected += 1
        logger.debug(
            "pid %d (%s, exe %r, unit %r, cgroup %r) %s by the process filters",
            labels.pid,
            labels.comm,
            labels.exe_path,
            labels.systemd_unit,
            labels.cgroup_path,
            "admitted" if admitted else "rejected",
        )
        return admitted
