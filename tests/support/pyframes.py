"""The agent's pprof files read back frame by frame, for the Python-frame tests: each frame's Function
(name, system_name, filename, start_line) and Line (line), and helpers over Python frames.

A Python frame is a Location with one Line whose Function has `name` = co_qualname (co_name before
3.11), `system_name` = co_name (empty where it equals the name), `filename` = co_filename,
`start_line` = co_firstlineno, and the Line's `line` = the line being run. It is told from a native
frame by its filename: a Python source file (`.py`) or a frozen module (`<frozen ...>`). Native frames
of these interpreters, built without debug info, carry no source file; one built with it names C files.
"""

from __future__ import annotations

import ast
import gzip
from dataclasses import dataclass
from pathlib import Path

from agent._proto import profile_pb2


@dataclass(frozen=True, slots=True)
class Frame:
    name: str
    system_name: str
    filename: str
    start_line: int
    line: int
    mapping: str  # the mapping's file ("" for none)

    @property
    def python(self) -> bool:
        return self.filename.endswith(".py") or self.filename.startswith("<frozen ")


@dataclass(frozen=True, slots=True)
class FrameSample:
    frames: tuple[Frame, ...]  # leaf first
    values: tuple[int, ...]
    numeric: dict[str, int]
    strings: dict[str, str]

    def python_frames(self) -> tuple[Frame, ...]:
        return tuple(frame for frame in self.frames if frame.python)


def read_frame_samples(path: Path) -> list[FrameSample]:
    profile = profile_pb2.Profile()
    profile.ParseFromString(gzip.decompress(path.read_bytes()))
    strings = profile.string_table
    functions = {f.id: f for f in profile.function}
    mappings = {m.id: strings[m.filename] for m in profile.mapping}
    frames_of: dict[int, Frame] = {}
    for location in profile.location:
        mapping = mappings.get(location.mapping_id, "")
        if not location.line:
            frames_of[location.id] = Frame("", "", "", 0, 0, mapping)
            continue
        line = location.line[0]
        function = functions[line.function_id]
        frames_of[location.id] = Frame(
            strings[function.name],
            strings[function.system_name],
            strings[function.filename],
            function.start_line,
            line.line,
            mapping,
        )
    return [
        FrameSample(
            frames=tuple(frames_of[location_id] for location_id in sample.location_id),
            values=tuple(sample.value),
            numeric={strings[label.key]: label.num for label in sample.label if not label.str},
            strings={strings[label.key]: strings[label.str] for label in sample.label if label.str},
        )
        for sample in profile.sample
    ]


def read_frames(directory: Path, prefix: str, pid: int | None = None) -> list[FrameSample]:
    """Every sample of the `prefix` profiles (cpu, offcpu, alloc) in `directory`, of one pid or all."""
    samples: list[FrameSample] = []
    for path in sorted(directory.glob(f"{prefix}-*.pb.gz")):
        samples += [s for s in read_frame_samples(path) if pid is None or s.numeric.get("pid") == pid]
    return samples


def weight(samples: list[FrameSample], index: int = 0) -> int:
    return sum(s.values[index] for s in samples)


def has_function(sample: FrameSample, name: str, filename: str) -> bool:
    return any(f.name == name and f.filename == filename for f in sample.frames)


def inclusive(samples: list[FrameSample], name: str, filename: str, index: int = 0) -> int:
    """The weight of the samples with a Python frame of `name` in `filename` anywhere on the stack."""
    return sum(s.values[index] for s in samples if has_function(s, name, filename))


def innermost(sample: FrameSample, name: str, filename: str) -> int | None:
    """The index (leaf first) of the innermost frame of the function, or None."""
    return next((i for i, f in enumerate(sample.frames) if f.name == name and f.filename == filename), None)


def hottest_line(samples: list[FrameSample], name: str, filename: str, index: int = 0) -> tuple[int, dict[int, int]]:
    """The line the innermost frame of the function was at most often (by the value at `index`), and the
    weight per line."""
    lines: dict[int, int] = {}
    for sample in samples:
        position = innermost(sample, name, filename)
        if position is not None:
            line = sample.frames[position].line
            lines[line] = lines.get(line, 0) + sample.values[index]
    return max(lines, key=lambda line: lines[line], default=0), lines


def marked_line(source: Path, function: str, mark: str = "# hot") -> int:
    """The line of `source` that carries `mark` inside the body of `def function` (1-based)."""
    lines = source.read_text().splitlines()
    start = next(i for i, text in enumerate(lines) if text.lstrip().startswith(f"def {function}("))
    return next(i + 1 for i in range(start, len(lines)) if lines[i].rstrip().endswith(mark))


def code_names(source: Path) -> dict[str, set[int]]:
    """The qualname of every code object `source` compiles to, with its possible first lines
    (co_firstlineno: the `def` line, or the first decorator's): what a Python frame of that file may be
    named. Comprehensions and lambdas get their `<listcomp>`/`<lambda>`-style names."""
    tree = ast.parse(source.read_text())
    names: dict[str, set[int]] = {"<module>": {1}}

    def visit(node: ast.AST, scope: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = _code_name(child)
            if name is None:
                visit(child, scope)
                continue
            qualname = f"{scope}{name}"
            lineno = getattr(child, "lineno", 0)
            decorators = getattr(child, "decorator_list", [])
            first = min([lineno, *(d.lineno for d in decorators)])
            names.setdefault(qualname, set()).add(first)
            inner = f"{qualname}." if isinstance(child, ast.ClassDef) else f"{qualname}.<locals>."
            visit(child, inner)

    visit(tree, "")
    return names


_COMPREHENSIONS = {ast.ListComp: "<listcomp>", ast.SetComp: "<setcomp>", ast.DictComp: "<dictcomp>"}


def _code_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name
    if isinstance(node, ast.Lambda):
        return "<lambda>"
    if isinstance(node, ast.GeneratorExp):
        return "<genexpr>"
    return _COMPREHENSIONS.get(type(node))


def short_name(qualname: str) -> str:
    """co_name of a code object whose qualname is `qualname`."""
    return qualname.rpartition(".")[2]
