"""bench.carry: a partial benchmark run keeps the other scenarios' sections, marked as carried over."""

from __future__ import annotations

import json
from pathlib import Path

from bench.carry import carried_over, previous_sections
from bench.report import render
from bench.results import Check, ScenarioResult

META = {
    "machine": "m",
    "memory_gib": 1.0,
    "kernel": "k",
    "cpus": 2,
    "date": "2026-12-02 14:00 UTC",
    "command": "make bench",
    "repetitions": 3,
    "duration_s": 10,
    "agent": "0.1.0 (new)",
    "profilers": ["cpu"],
    "bcc": "0.26.0",
    "python": "3.11.2",
    "installed_by_bench": [],
}


def _report(docs: Path, results: list[ScenarioResult], meta: dict[str, object]) -> None:
    docs.mkdir(exist_ok=True)
    (docs / "benchmarks.md").write_text(render(meta, results), encoding="utf-8")
    scenarios = {result.key: result.as_dict() for result in results}
    (docs / "benchmarks.json").write_text(json.dumps({"meta": meta, "scenarios": scenarios}), encoding="utf-8")


def _scenario(key: str, title: str, figure: str) -> ScenarioResult:
    result = ScenarioResult(key, title, f"How {key} is measured.")
    result.checks.append(Check(f"{key} target", figure, True))
    result.notes.append(f"{key} note")
    return result


def test_sections_are_split_by_their_numbered_headings() -> None:
    text = "# B\n\n## Targets\n\nx\n\n## 1. One\n\nbody one\n\n## 2. Two\n\nbody two\n"
    assert previous_sections(text) == {"One": "body one", "Two": "body two"}


def test_scenarios_not_rerun_keep_their_text_checks_and_origin(tmp_path: Path) -> None:
    old = {**META, "date": "2026-11-22 22:42 UTC", "agent": "0.1.0 (old)"}
    _report(tmp_path, [_scenario("steady", "Steady", "0.5%"), _scenario("accuracy", "Accuracy", "0.3 points")], old)
    kept = carried_over(tmp_path, rerun={"steady"})
    assert [result.key for result in kept] == ["accuracy"]
    (accuracy,) = kept
    assert accuracy.checks[0].measured == "0.3 points"
    assert "carried over from 2026-11-22 22:42 UTC" in accuracy.checks[0].note
    new = render(META, [_scenario("steady", "Steady", "0.4%"), accuracy])
    assert "carried over from the run of 2026-11-22 22:42 UTC on agent 0.1.0 (old)" in new
    assert "accuracy note" in new and "| steady target | 0.4% |" in new


def test_a_section_carried_twice_names_its_first_run_once(tmp_path: Path) -> None:
    old = {**META, "date": "2026-11-22 22:42 UTC", "agent": "0.1.0 (old)"}
    _report(tmp_path, [_scenario("steady", "Steady", "0.5%"), _scenario("accuracy", "Accuracy", "0.3 points")], old)
    once = carried_over(tmp_path, rerun={"steady"})
    _report(tmp_path, [_scenario("steady", "Steady", "0.4%"), *once], META)
    (twice,) = carried_over(tmp_path, rerun={"steady"})
    text = render(META, [twice])
    assert text.count("Not rerun by this command") == 1
    assert "2026-11-22 22:42 UTC on agent 0.1.0 (old)" in text
    assert twice.checks[0].note.count("carried over") == 1


def test_no_earlier_report_carries_nothing(tmp_path: Path) -> None:
    assert carried_over(tmp_path, rerun={"steady"}) == []
