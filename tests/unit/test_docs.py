"""The prose that describes the agent stays true to the repository: README.md, docs/*.md, every docstring
under agent/ and the comments of bpf/.

Three kinds of rot are caught:

- phrases from designs the agent no longer has (`STALE_PHRASES`): stack-id resolution and stack maps
  (records carry their stacks inline), wakeup figures the code does not use;
- references that point outside the repository, which a fresh clone cannot follow: Markdown links to
  absolute paths or `../` links that climb out of the repo, and absolute paths into anything but the
  host directories the agent itself reads (`/proc`, `/sys`, `/usr`, ...), such as a developer's
  `/work/...` or `/home/...`;
- README/docs links to repository files that do not exist, or to a heading of their own page that is
  not there.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

STALE_PHRASES = ("stack-id resolution", "stack maps", "ten wakeups", "ten per second")

# First components of absolute paths that name the host the agent runs on (what it reads, installs to or
# documents), never the machine the docs were written on.
HOST_ROOTS = frozenset(
    {"proc", "sys", "usr", "lib", "lib64", "etc", "opt", "var", "tmp", "dev", "run", "bin", "sbin", "boot"}
    # cgroup paths, as /proc/PID/cgroup shows them
    | {"docker", "kubepods", "kubepods.slice", "system.slice", "user.slice", "machine.slice"}
)

# An absolute path of two or more components, not part of a URL, a word or a placeholder's path
# (`1/p`, `and/or`, `http://h/x`, `<proc_root>/PID/maps`).
_ABSOLUTE = re.compile(r"(?<![\w.:/~*<>-])/([\w.@-]+)/[\w.@<>/-]*")
# A relative path that climbs: `../x`, `../../y` (in a link or in running text).
_CLIMBING = re.compile(r"(?<![\w./-])((?:\.\./)+[\w.@/-]*)")
# A Markdown inline link or image: [text](target "title").
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _docstrings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of the module's docstring and every class and function docstring in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            text = ast.get_docstring(node, clean=False)
            if text is not None:
                first = node.body[0]
                found.append((first.lineno, text))
    return found


def _agent_modules() -> list[Path]:
    return [p for p in sorted((REPO / "agent").rglob("*.py")) if "_pb2" not in p.name]


def _bpf_sources() -> list[Path]:
    return sorted(p for p in (REPO / "bpf").iterdir() if p.suffix in {".c", ".h"})


def _leaves_repo(target: str, base: Path) -> bool:
    resolved = (base / target).resolve()
    return resolved != REPO and REPO not in resolved.parents


def stale_phrases(text: str) -> list[str]:
    lowered = text.lower()
    return [phrase for phrase in STALE_PHRASES if phrase in lowered]


def outside_references(text: str, base: Path) -> list[str]:
    """Paths and link targets in `text` (found in a file of directory `base`) that lead out of the repo."""
    found = [m.group(0) for m in _ABSOLUTE.finditer(text) if m.group(1) not in HOST_ROOTS]
    found += [m.group(1) for m in _CLIMBING.finditer(text) if _leaves_repo(m.group(1), base)]
    for match in _LINK.finditer(text):
        target = match.group(1)
        if target.startswith("/") and target not in found:
            found.append(target)  # an absolute link is the reader's machine, whatever its first component
    if str(REPO) in text:
        found.append(str(REPO))
    return found


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def broken_links(text: str, path: Path) -> list[str]:
    """Links of the Markdown file `path` (whose text is `text`) to repo files or own headings that do not exist."""
    anchors = {_anchor(h) for h in _HEADING.findall(_FENCE.sub("", text))}
    broken = []
    for match in _LINK.finditer(text):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            continue  # a URL (http:, mailto:); absolute paths are outside_references' business
        file_part, _, fragment = target.partition("#")
        if not file_part:
            if fragment not in anchors:
                broken.append(target)
            continue
        resolved = (path.parent / file_part).resolve()
        if not _leaves_repo(file_part, path.parent) and not resolved.exists():
            broken.append(target)
    return broken


def _problems() -> list[str]:
    problems = []
    for doc in _documents():
        text = doc.read_text(encoding="utf-8")
        name = doc.relative_to(REPO)
        problems += [f"{name}: stale phrase {p!r}" for p in stale_phrases(text)]
        problems += [f"{name}: points outside the repository: {r}" for r in outside_references(text, doc.parent)]
        problems += [f"{name}: link to nothing: {t}" for t in broken_links(text, doc)]
    for module in _agent_modules():
        name = module.relative_to(REPO)
        for line, text in _docstrings(module):
            problems += [f"{name}:{line}: stale phrase {p!r}" for p in stale_phrases(text)]
            refs = outside_references(text, module.parent)
            problems += [f"{name}:{line}: points outside the repository: {r}" for r in refs]
    for source in _bpf_sources():
        text = source.read_text(encoding="utf-8")
        name = source.relative_to(REPO)
        problems += [f"{name}: stale phrase {p!r}" for p in stale_phrases(text)]
        problems += [f"{name}: points outside the repository: {r}" for r in outside_references(text, source.parent)]
    return problems


def test_docs_docstrings_and_bpf_comments_are_current_and_self_contained() -> None:
    problems = _problems()
    assert not problems, "\n".join(problems)


def test_the_documents_and_modules_are_found() -> None:
    names = {p.name for p in _documents()}
    assert {"README.md", "design.md", "metrics.md"} <= names
    assert len(_agent_modules()) > 50
    assert any(text for module in _agent_modules() for _, text in _docstrings(module))
    assert (REPO / "bpf" / "agent.bpf.c") in _bpf_sources()


@pytest.mark.parametrize(
    "text",
    [
        "kernel and user stacks, stack-id resolution",
        "Wakeups are batched (about ten wakeups per second)",
        "about Ten per second per busy CPU",
        "two Stack Maps flipped at each interval end",
    ],
)
def test_stale_phrases_are_found(text: str) -> None:
    assert stale_phrases(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("See `/work/shared/reference/formats.md` for the wire details.", "/work/shared/reference/formats.md"),
        ("the notes in /home/someone/notes.md", "/home/someone/notes.md"),
        ("[formats](/work/shared/reference/formats.md)", "/work/shared/reference/formats.md"),
        ("[formats](/usr/share/doc/formats.md)", "/usr/share/doc/formats.md"),
        ("[peers](../../shared/reference/peers.md)", "../../shared/reference/peers.md"),
        ("as ../../elsewhere/notes.md says", "../../elsewhere/notes.md"),
    ],
)
def test_references_outside_the_repository_are_found(text: str, expected: str) -> None:
    assert expected in outside_references(text, REPO / "docs")


@pytest.mark.parametrize(
    "text",
    [
        "reads `/proc/PID/maps` and `/sys/kernel/tracing`, installs to `/opt/profiling-agent`",
        "`/tmp/perf-PID.map`, `/usr/lib/debug/.build-id/`, `/etc/profiling-agent/agent.yaml`",
        "serves `/metrics`, `/healthz` and `/readyz`; weight 1/p; and/or",
        "https://opentelemetry.io/docs/specs/otlp/ and grpc://host:4317/path",
        "[design](docs/design.md), [back](../README.md) from docs/",
        "/* a C comment */ a/b",
        "`<proc_root>/PID/maps`, `<debug root>/.build-id/xx/rest.debug`, cgroup `/kubepods/besteffort/pod<uid>`",
    ],
)
def test_host_paths_urls_and_repo_links_are_not_outside_references(text: str) -> None:
    assert outside_references(text, REPO / "docs") == []


def test_links_to_missing_files_and_headings_are_found() -> None:
    page = REPO / "docs" / "page.md"  # never written: only its directory matters
    text = (
        "# Design notes\n\n## How it works\n\n```\n# not a heading\n```\n"
        "[ok](design.md) [ok](../README.md#how-it-works) [ok](#how-it-works) [ok](https://example.com/x)\n"
        "[gone](gone.md) [gone](../agent/nothing.py) [no heading](#not-a-heading) [no heading](#threads)\n"
    )
    assert broken_links(text, page) == ["gone.md", "../agent/nothing.py", "#not-a-heading", "#threads"]
