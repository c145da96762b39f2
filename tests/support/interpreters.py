"""The CPython interpreters the Python-frame acceptance tests run against, found on this machine.

Two kinds of build: Debian's `/usr/bin/python3.11` (libpython linked into the executable, `.symtab`
stripped, `.dynsym` kept) and pyenv's builds (`pyenv root`/versions/X.Y.Z/bin/pythonX.Y, linked against
their own libpythonX.Y.so). pyenv builds are discovered, not named: whichever micro version of each
minor version is installed is used (the newest when there are several). The machine image has
3.10-3.13 installed under /root/.pyenv; `make setup` does not build them (that needs the CPython
sources, which are not in a package registry this machine reaches).

`interpreter_params()` is the pytest parametrization: one param per wanted interpreter, a missing one
marked to skip with the reason, except that with CI set (as `.ci/run` does) the pyenv minors in
CI_REQUIRED must be there, and a missing one fails the test instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

DEBIAN_PYTHON = Path("/usr/bin/python3.11")
PYENV_MINORS = ((3, 10), (3, 11), (3, 12), (3, 13))
CI_REQUIRED = PYENV_MINORS
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


@dataclass(frozen=True, slots=True)
class Interpreter:
    """One interpreter to test: `id` names the pytest param (e.g. "pyenv-3.12.1", "debian-3.11")."""

    id: str
    path: Path
    minor: tuple[int, int]
    libpython: bool  # linked against libpythonX.Y.so (pyenv) rather than holding it (Debian's)

    @property
    def version(self) -> str:
        return f"{self.minor[0]}.{self.minor[1]}"

    @property
    def has_qualname(self) -> bool:
        """co_qualname exists from 3.11: before it a Python frame's name is co_name."""
        return self.minor >= (3, 11)

    def display_name(self, qualname: str) -> str:
        """The name a Python frame of the function `qualname` gets in the profile on this interpreter."""
        return qualname if self.has_qualname else qualname.rpartition(".")[2]


def pyenv_root() -> Path | None:
    """`pyenv root`; pyenv is looked for on PATH, then in $PYENV_ROOT and ~/.pyenv (CI's PATH may lack it)."""
    default = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [shutil.which("pyenv"), str(default / "bin" / "pyenv")]
    pyenv = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if pyenv is not None:
        result = subprocess.run([pyenv, "root"], capture_output=True, text=True, check=False, timeout=30)
        if result.returncode == 0 and result.stdout.strip():
            return Path(result.stdout.strip())
    return default if (default / "versions").is_dir() else None


def pyenv_builds(root: Path | None) -> dict[tuple[int, int], Interpreter]:
    """The newest installed micro version of each minor version under `root`/versions (CPython only:
    pyenv also installs pypy-*, graalpy-*, ... whose names do not match X.Y.Z)."""
    found: dict[tuple[int, int], tuple[int, Interpreter]] = {}
    if root is None or not (root / "versions").is_dir():
        return {}
    for directory in (root / "versions").iterdir():
        match = _VERSION.match(directory.name)
        if match is None:
            continue
        major, minor, micro = map(int, match.groups())
        binary = directory / "bin" / f"python{major}.{minor}"
        if not os.access(binary, os.X_OK):
            continue
        interpreter = Interpreter(f"pyenv-{directory.name}", binary, (major, minor), True)
        if (major, minor) not in found or found[(major, minor)][0] < micro:
            found[(major, minor)] = (micro, interpreter)
    return {minor: interpreter for minor, (_, interpreter) in found.items()}


def interpreters() -> tuple[list[Interpreter], list[tuple[str, str]]]:
    """(the interpreters found, [(param id, why it is missing)] for the wanted ones that are not)."""
    found: list[Interpreter] = []
    missing: list[tuple[str, str]] = []
    if os.access(DEBIAN_PYTHON, os.X_OK):
        found.append(Interpreter("debian-3.11", DEBIAN_PYTHON, (3, 11), False))
    else:
        missing.append(("debian-3.11", f"{DEBIAN_PYTHON} is not installed (Debian's python3.11)"))
    root = pyenv_root()
    builds = pyenv_builds(root)
    for minor in PYENV_MINORS:
        if minor in builds:
            found.append(builds[minor])
        else:
            where = f"under {root}/versions" if root is not None else "(no pyenv root)"
            missing.append((f"pyenv-{minor[0]}.{minor[1]}", f"no pyenv build of {minor[0]}.{minor[1]} {where}"))
    return found, missing


def _missing_param(param_id: str, reason: str) -> object:
    minor = tuple(int(part) for part in param_id.rpartition("-")[2].split("."))
    required = param_id.startswith("pyenv-") and minor in CI_REQUIRED and bool(os.environ.get("CI"))
    # In CI the test runs and fails on the missing interpreter (see `require`); elsewhere it is skipped.
    marks = () if required else (pytest.mark.skip(reason=reason),)
    return pytest.param(MissingInterpreter(param_id, reason), id=param_id, marks=marks)


@dataclass(frozen=True, slots=True)
class MissingInterpreter:
    """The param of an interpreter CI requires and this machine lacks: `require` fails on it."""

    id: str
    reason: str


def interpreter_params() -> list[object]:
    """pytest params, one per interpreter (found or missing), for `@pytest.mark.parametrize` or a fixture."""
    found, missing = interpreters()
    params: list[object] = [pytest.param(interpreter, id=interpreter.id) for interpreter in found]
    params += [_missing_param(param_id, reason) for param_id, reason in missing]
    return params


def require(param: Interpreter | MissingInterpreter) -> Interpreter:
    """The interpreter of a param, or a failure naming what CI lacks (only CI runs a missing one)."""
    if isinstance(param, MissingInterpreter):
        pytest.fail(f"CI must test CPython {param.id}: {param.reason}", pytrace=False)
    return param
