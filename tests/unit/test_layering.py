"""The stages' import graph: data flows one way, so no module imports a stage downstream of itself.

`STAGES` is the one place the stage order is written down (docs/design.md describes it under its
layout picture). A module may import modules of its own stage and of any stage before it; the wiring
modules (`WIRING`) may import anything and are imported by no stage. Every module under agent/ is parsed
with `ast`, so imports inside functions and under `if TYPE_CHECKING:` count as much as top-level ones.
"""

from __future__ import annotations

import ast
from collections.abc import Set as AbstractSet
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parents[2] / "agent"

ROOT = "agent"  # the package itself (its __init__: the version); as a prefix it would name every module

# Upstream first. Each stage is named by module prefixes (a package or a module).
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Base modules: the version, errors, logging set-up, the records every stage shares, generated protobuf.
    # Kernel feature probing and the settings machinery (each stage's section imports it) are base too.
    (
        "base",
        (
            ROOT,
            "agent.errors",
            "agent.logs",
            "agent.types",
            "agent._proto",
            "agent.features",
            "agent.btf",
            "agent.settings",
        ),
    ),
    ("metadata", ("agent.metadata",)),  # process labels and filters, read from /proc
    ("process", ("agent.process",)),  # mappings, ELF files, the vDSO, bounded caches, the process registry
    ("probes", ("agent.probes",)),
    ("unwind", ("agent.unwind",)),
    ("sampling", ("agent.sampling",)),
    ("aggregate", ("agent.aggregate",)),
    ("symbolize", ("agent.symbolize",)),
    ("pprof", ("agent.pprof",)),
    ("export", ("agent.export",)),
    # The middle of the house: routes events through the stages and hands profiles to the sinks.
    ("flow", ("agent.flow",)),
)
# Wiring: constructs and runs the stages, so it may import any of them; no stage imports it.
WIRING: tuple[str, ...] = (
    "agent.__main__",
    "agent.cli",
    "agent.config",
    "agent.daemon",
    "agent.health",
    "agent.metrics",
    "agent.preflight",
    "agent.protogen",
    "agent.reload",
    "agent.sdnotify",
)

# Edges allowed against the order, each with its reason (none today: keep it that way).
ALLOWED: frozenset[tuple[str, str]] = frozenset()


def _module_name(path: Path) -> str:
    parts = path.relative_to(AGENT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(AGENT.rglob("*.py"))}


def _imports(source: str, name: str, is_package: bool, known: set[str]) -> set[str]:
    """Every module of `known` that the module `name` (with `source`) imports, wherever the statement is."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            # `from agent import logs` imports the module agent.logs, not only a name of agent/__init__.py.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found & known


def _owner(module: str, prefixes: tuple[str, ...]) -> str | None:
    """The longest prefix naming `module` (itself or a package holding it)."""
    matches = [p for p in prefixes if module == p or (p != ROOT and module.startswith(p + "."))]
    return max(matches, key=len) if matches else None


def _rank(module: str) -> int | None:
    """The position of `module`'s stage in `STAGES`; None for a wiring module."""
    everything = tuple(p for _, prefixes in STAGES for p in prefixes) + WIRING
    owner = _owner(module, everything)
    assert owner is not None, f"{module} belongs to no stage: add it to STAGES or WIRING"
    if owner in WIRING:
        return None
    return next(rank for rank, (_, prefixes) in enumerate(STAGES) if owner in prefixes)


def _edges() -> set[tuple[str, str]]:
    modules = _modules()
    known = set(modules)
    return {
        (name, imported)
        for name, path in modules.items()
        for imported in _imports(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known)
        if imported != name
    }


def _offending(edges: AbstractSet[tuple[str, str]] | None = None) -> set[tuple[str, str]]:
    """Edges (default: agent/'s own) from a stage to a stage downstream of it, or to a wiring module."""
    bad: set[tuple[str, str]] = set()
    for importer, imported in _edges() if edges is None else edges:
        importer_rank, imported_rank = _rank(importer), _rank(imported)
        if importer_rank is None:
            continue  # wiring imports anything
        if imported_rank is None or imported_rank > importer_rank:
            bad.add((importer, imported))
    return bad


def _describe(edges: AbstractSet[tuple[str, str]]) -> str:
    def stage(module: str) -> str:
        rank = _rank(module)
        return "wiring" if rank is None else STAGES[rank][0]

    return "\n".join(f"  {a} ({stage(a)}) -> {b} ({stage(b)})" for a, b in sorted(edges))


def test_every_module_belongs_to_a_stage() -> None:
    for module in _modules():
        _rank(module)  # asserts


def test_no_stage_imports_downstream_or_wiring() -> None:
    offending = _offending() - ALLOWED
    assert not offending, "imports against the flow of data:\n" + _describe(offending)


def test_every_allowance_is_still_needed() -> None:
    stale = ALLOWED - _offending()
    assert not stale, "allowed edges no longer taken, delete them from ALLOWED:\n" + _describe(stale)


_KNOWN = {"agent", "agent.logs", "agent.daemon", "agent.process", "agent.process.maps", "agent.unwind"}
_KNOWN |= {"agent.unwind.cfi", "agent.symbolize", "agent.symbolize.native", "agent.pprof.builder"}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import agent.symbolize.native\n", {"agent.symbolize.native"}),
        ("import os, agent.logs as logs\n", {"agent.logs"}),
        ("from agent import logs, __version__\n", {"agent", "agent.logs"}),
        ("from . import cfi\n", {"agent.unwind", "agent.unwind.cfi"}),
        ("from ..process import maps\n", {"agent.process", "agent.process.maps"}),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from agent.daemon import Daemon\n",
            {"agent.daemon"},
        ),
        ("def f() -> None:\n    from agent.pprof.builder import build_pprof\n", {"agent.pprof.builder"}),
        ("class C:\n    def m(self) -> None:\n        import agent.logs\n", {"agent.logs"}),
    ],
)
def test_imports_are_found_wherever_they_are(source: str, expected: set[str]) -> None:
    assert _imports(source, "agent.unwind.spaces", False, _KNOWN) == expected


def test_a_package_resolves_relative_imports_from_itself() -> None:
    assert _imports("from . import cfi\n", "agent.unwind", True, _KNOWN) == {"agent.unwind", "agent.unwind.cfi"}


def test_stages_are_ranked_in_the_order_of_the_flow() -> None:
    unwind, symbolize = _rank("agent.unwind.spaces"), _rank("agent.symbolize.native")
    assert unwind is not None and symbolize is not None and unwind < symbolize
    assert _rank("agent.daemon") is None
    assert _rank(ROOT) == _rank("agent.errors") == 0
    with pytest.raises(AssertionError, match="belongs to no stage"):
        _rank("agent.newstage.module")  # a new top-level module must be placed, not fall into the base


def test_edges_against_the_flow_are_the_offending_ones() -> None:
    upstream_to_downstream = ("agent.probes.libc_tracker", "agent.symbolize.native")
    stage_to_wiring = ("agent.symbolize.native", "agent.config")
    fine = {
        ("agent.unwind.spaces", "agent.process.maps"),  # downstream reading upstream
        ("agent.daemon", "agent.symbolize.native"),  # wiring importing a stage
        ("agent.cli", "agent.daemon"),  # wiring importing wiring
        ("agent.symbolize.native", "agent.symbolize.types"),  # within a stage
    }
    assert _offending({upstream_to_downstream, stage_to_wiring, *fine}) == {upstream_to_downstream, stage_to_wiring}
