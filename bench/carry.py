"""Carrying scenarios over: a run of some scenarios (`--only`) keeps the others' sections from the last report.

A partial run must not erase the figures of the scenarios it did not run, nor pass them off as new. Each
scenario not rerun keeps, from docs/benchmarks.json and docs/benchmarks.md, its checks, raw figures and
its section's text verbatim, and says which run they come from (that run's date and agent commit).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from bench.results import Check, ScenarioResult

logger = logging.getLogger(__name__)

_SECTION = re.compile(r"^## \d+\. (?P<title>.+)$", re.MULTILINE)


def previous_sections(markdown: str) -> dict[str, str]:
    """Each numbered section's body (the text after its heading), by title."""
    headings = list(_SECTION.finditer(markdown))
    bodies = {}
    for heading, following in zip(headings, [*headings[1:], None], strict=True):
        end = following.start() if following is not None else len(markdown)
        bodies[heading["title"].strip()] = markdown[heading.end() : end].strip("\n")
    return bodies


def carried_over(docs: Path, rerun: set[str]) -> list[ScenarioResult]:
    """The scenarios of the last report that this run does not repeat, in the report's order."""
    json_path, md_path = docs / "benchmarks.json", docs / "benchmarks.md"
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
        sections = previous_sections(md_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        logger.warning("no earlier report to carry scenarios over from (%s): only this run's are reported", e)
        return []
    meta = document.get("meta", {})
    results = []
    for key, scenario in document.get("scenarios", {}).items():
        if key in rerun:
            continue
        body = sections.get(scenario.get("title", ""))
        if body is None:
            logger.warning("scenario %s is in benchmarks.json but has no section in benchmarks.md: dropped", key)
            continue
        results.append(_result(key, scenario, body, meta))
    return results


def _result(key: str, scenario: dict[str, Any], body: str, meta: dict[str, Any]) -> ScenarioResult:
    origin = scenario.get("from_run") or {"date": meta.get("date", "?"), "agent": meta.get("agent", "?")}
    result = ScenarioResult(key, scenario["title"], scenario.get("method", ""))
    when = f"carried over from {origin['date']}"
    result.checks = [_carried_check(c, when) for c in scenario.get("checks", [])]
    result.notes = list(scenario.get("notes", []))
    result.raw = dict(scenario.get("raw", {}))
    result.seconds = float(scenario.get("seconds", 0.0))
    load = scenario.get("load_average", [0.0, 0.0])
    result.load = (float(load[0]), float(load[1]))
    result.carried_markdown = body
    result.from_run = {"date": str(origin["date"]), "agent": str(origin["agent"])}
    return result


def _carried_check(check: dict[str, Any], when: str) -> Check:
    """A check as it was measured then, its note saying so (once, however often it is carried)."""
    note = str(check.get("note", ""))
    if when not in note:
        note = f"{note}; {when}" if note else when
    return Check(check["target"], check["measured"], check["met"], note)
