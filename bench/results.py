"""Benchmark records: a scenario's tables, its target checks and its raw figures, and the spread of runs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Spread:
    """Median and range of repeated runs."""

    median: float
    low: float
    high: float
    runs: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        finite = [v for v in values if not math.isnan(v)]
        if not finite:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(finite), min(finite), max(finite), len(finite))

    def show(self, digits: int = 2, unit: str = "") -> str:
        """`median (min-max)`, or the lone value of a single run."""
        if self.runs == 0:
            return "n/a"
        if self.runs == 1:
            return f"{self.median:.{digits}f}{unit}"
        return f"{self.median:.{digits}f}{unit} ({self.low:.{digits}f}-{self.high:.{digits}f})"

    def as_dict(self) -> dict[str, float | int]:
        return {"median": self.median, "min": self.low, "max": self.high, "runs": self.runs}


@dataclass(frozen=True, slots=True)
class Check:
    """One target from the issue: what was measured against it, and whether it is met (None: not measured)."""

    target: str
    measured: str
    met: bool | None
    note: str = ""

    @property
    def verdict(self) -> str:
        return {True: "met", False: "**missed**", None: "not measured"}[self.met]


@dataclass(frozen=True, slots=True)
class Table:
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(slots=True)
class ScenarioResult:
    key: str  # "steady", "startup", ...
    title: str
    method: str  # how it was measured, one paragraph of Markdown
    tables: list[Table] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # how long the scenario took
    load: tuple[float, float] = (0.0, 0.0)  # the host's 1-minute load average before and after it
    # Set on a scenario carried over from an earlier report (bench.carry): its section's text as it was
    # rendered then, and that run's date and agent commit.
    carried_markdown: str = ""
    from_run: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "method": self.method,
            "seconds": round(self.seconds, 1),
            "load_average": list(self.load),
            "checks": [{"target": c.target, "measured": c.measured, "met": c.met, "note": c.note} for c in self.checks],
            "notes": self.notes,
            "raw": self.raw,
            **({"from_run": self.from_run} if self.from_run else {}),
        }


def pct(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}%"


def thread_rows(columns: Sequence[Sequence[Mapping[str, float]]]) -> tuple[tuple[str, ...], ...]:
    """Rows of a per-thread table: a thread's median % of one core in each column, where a column is
    the runs' thread breakdowns (`bench.procs.thread_breakdown`); threads below 0.0005 in every
    column are left out."""
    rows = []
    for name in sorted({name for column in columns for threads in column for name in threads}):
        cells = [Spread.of(threads.get(name, 0.0) for threads in column) for column in columns]
        if all(cell.median < 0.0005 for cell in cells):
            continue
        rows.append((name, *(cell.show(3, "%") for cell in cells)))
    return tuple(rows)
