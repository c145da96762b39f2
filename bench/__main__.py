"""`python -m bench`: build the workloads, run every scenario, write docs/benchmarks.md and .json."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import accuracy, ingest, pyhost, scale, slowdown, startup, steady, storm, unwind, versus
from bench.build import REPO, build_workloads, ensure_tools
from bench.carry import carried_over
from bench.context import Context, online_cpus, registered_profilers
from bench.report import tree_state, write_reports
from bench.results import Check, ScenarioResult

logger = logging.getLogger("bench")

SCENARIOS: dict[str, Callable[[Context], ScenarioResult]] = {
    "steady": steady.run,
    "startup": startup.run,
    "slowdown": slowdown.run,
    "ingest": ingest.run,
    "accuracy": accuracy.run,
    "scale": scale.run,
    "unwind": unwind.run,
    "python": pyhost.run,
    "storm": storm.run,
    "versus": versus.run,
}


def run_scenario(name: str, ctx: Context) -> ScenarioResult:
    """Run one scenario; a failure is reported in its section instead of losing the others' results."""
    try:
        return SCENARIOS[name](ctx)
    except Exception as e:
        logger.exception("scenario %s failed", name)
        failed = ScenarioResult(name, f"{name}: FAILED", f"The scenario failed: `{type(e).__name__}: {e}`.")
        failed.checks.append(Check(f"scenario {name} ran", f"{type(e).__name__}: {e}", False))
        return failed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each measured run (default 3)")
    parser.add_argument(
        "--only", default="", help=f"comma-separated scenarios to run (default all: {','.join(SCENARIOS)})"
    )
    parser.add_argument(
        "--cases",
        default="",
        help=f"comma-separated cases of the versus scenario (default all: {','.join(versus.CASES)})",
    )
    parser.add_argument("--docs", type=Path, default=REPO / "docs", help="where benchmarks.md/.json are written")
    parser.add_argument("--command", default="", help="the command to print in the report (default: this one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, profiles)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    if os.geteuid() != 0:
        logger.error("the benchmarks load BPF programs: run them as root (make bench)")
        return 1
    chosen = [name for name in (args.only.split(",") if args.only else SCENARIOS) if name]
    unknown = [name for name in chosen if name not in SCENARIOS]
    if unknown:
        logger.error("unknown scenario(s): %s", ", ".join(unknown))
        return 2
    cases = tuple(case for case in args.cases.split(",") if case)
    unknown_cases = [case for case in cases if case not in versus.CASES]
    if unknown_cases:
        logger.error("unknown case(s): %s (known: %s)", ", ".join(unknown_cases), ", ".join(versus.CASES))
        return 2
    started, tree_at_start = time.monotonic(), tree_state()
    installed = ensure_tools()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    ctx = Context(work, build_workloads(), max(1, args.reps), online_cpus(), registered_profilers(), cases)
    logger.info("profilers registered: %s; scratch directory %s", ",".join(ctx.profilers), work)
    results: list[ScenarioResult] = []
    try:
        for name in chosen:
            logger.info("scenario %s ...", name)
            begun, load_before = time.monotonic(), os.getloadavg()[0]
            result = run_scenario(name, ctx)
            result.seconds = time.monotonic() - begun
            result.load = (load_before, os.getloadavg()[0])
            logger.info("scenario %s done in %.0f s", name, result.seconds)
            results.append(result)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.only:  # the scenarios not run keep their sections from the last report, marked as such
        ran = {result.key for result in results}
        kept = {result.key: result for result in carried_over(args.docs, ran)}
        order = [*SCENARIOS]
        results = sorted([*results, *kept.values()], key=lambda r: order.index(r.key) if r.key in order else len(order))
    command = args.command or " ".join([".venv/bin/python", "-m", "bench", *(argv or sys.argv[1:])])
    paths = write_reports(args.docs, results, ctx, command, time.monotonic() - started, installed, tree_at_start)
    logger.info("wrote %s in %.0f s", ", ".join(str(p) for p in paths), time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
