"""The CPython interpreters installed on this machine, for tests that read real interpreters' memory
and for the Python-frame acceptance tests that profile them.

Debian's /usr/bin/python3.11 (libpython linked into the executable, `.symtab` stripped, `.dynsym`
kept) and every pyenv 3.10-3.13 build (`pyenv root`, else ~/.pyenv; linked against their own
libpython3.X.so). Versions are discovered, not named. The machine image has pyenv's 3.10-3.13 under
/root/.pyenv; `make setup` does not build interpreters (that needs CPython's sources, which no
package registry this machine reaches holds). A missing interpreter skips its test with a reason;
under CI (env CI set) 3.10, 3.11, 3.12 and 3.13 must exist, because a suite that skipped them would
prove nothing about the versions the agent supports.

`interpreter_params()` is the pytest parametrization of the acceptance tests: one param per
interpreter found, plus one per wanted one that is missing: skipped with the reason, or, for a minor
CI requires, run under CI to fail in `require`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

REQUIRED_IN_CI = ((3, 10), (3, 11), (3, 12), (3, 13))


class Interpreter(NamedTuple):
    label: str  # "pyenv-3.12.1", "debian-3.11.2"
    executable: Path
    version: tuple[int, int, int]

    @property
    def minor(self) -> tuple[int, int]:
        return self.version[0], self.version[1]

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def has_qualname(self) -> bool:
        """co_qualname exists from 3.11: before it a Python frame's name is co_name."""
        return self.minor >= (3, 11)

    def display_name(self, qualname: str) -> str:
        """The name a Python frame of the function `qualname` gets in a profile of this interpreter."""
        return qualname if self.has_qualname else qualname.rpartition(".")[2]

    def include_dir(self) -> Path:
        """The headers this build was installed with (pyenv keeps them beside the interpreter)."""
        out = subprocess.run(
            [str(self.executable), "-c", "import sysconfig; print(sysconfig.get_config_var('INCLUDEPY'))"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return Path(out.stdout.strip())


def _pyenv_root() -> Path:
    if shutil.which("pyenv"):
        out = subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return Path(out.stdout.strip())
    return Path.home() / ".pyenv"


def _version_of(executable: Path) -> tuple[int, int, int] | None:
    try:
        out = subprocess.run(
            [str(executable), "-c", "import sys; print(*sys.version_info[:3])"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except OSError:
        return None
    parts = out.stdout.split()
    if out.returncode != 0 or len(parts) != 3:
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])


def installed() -> list[Interpreter]:
    """Every supported (3.10-3.13) interpreter found, Debian's first."""
    found: list[Interpreter] = []
    debian = Path("/usr/bin/python3.11")
    if debian.exists() and (version := _version_of(debian)) is not None:
        found.append(Interpreter(f"debian-{'.'.join(map(str, version))}", debian, version))
    versions = _pyenv_root() / "versions"
    for directory in sorted(versions.glob("3.1[0-3].*")) if versions.is_dir() else []:
        executable = directory / "bin" / "python3"
        if executable.exists() and (version := _version_of(executable)) is not None:
            found.append(Interpreter(f"pyenv-{directory.name}", executable, version))
    return found


def require_versions(interpreters: list[Interpreter]) -> None:
    """Under CI, fail unless each required minor is among `interpreters`."""
    have = {i.minor for i in interpreters}
    missing = [f"{m[0]}.{m[1]}" for m in REQUIRED_IN_CI if m not in have]
    if missing and os.environ.get("CI"):
        pytest.fail(f"CI needs CPython {', '.join(missing)} installed (pyenv)", pytrace=False)


DEBIAN_PYTHON = Path("/usr/bin/python3.11")


class MissingInterpreter(NamedTuple):
    """The param of a wanted interpreter this machine lacks: skipped, or under CI failed by `require`."""

    label: str
    reason: str


def interpreter_params() -> list[object]:
    """pytest params, one per interpreter found (id: its label) and one per wanted one missing."""
    found = installed()
    params: list[object] = [pytest.param(i, id=i.label) for i in found]
    if not any(i.executable == DEBIAN_PYTHON for i in found):
        reason = f"{DEBIAN_PYTHON} (Debian's python3.11) is not installed"
        params.append(
            pytest.param(
                MissingInterpreter("debian-3.11", reason), id="debian-3.11", marks=pytest.mark.skip(reason=reason)
            )
        )
    have = {i.minor for i in found if i.label.startswith("pyenv-")}
    for minor in REQUIRED_IN_CI:
        if minor in have:
            continue
        label = f"pyenv-{minor[0]}.{minor[1]}"
        reason = f"no pyenv build of {minor[0]}.{minor[1]} under {_pyenv_root()}/versions"
        marks = () if os.environ.get("CI") else (pytest.mark.skip(reason=reason),)
        params.append(pytest.param(MissingInterpreter(label, reason), id=label, marks=marks))
    return params


def require(param: Interpreter | MissingInterpreter) -> Interpreter:
    """The interpreter of a param; for a missing one (run only under CI), a failure naming it."""
    if isinstance(param, MissingInterpreter):
        pytest.fail(f"CI must test CPython {param.label}: {param.reason}", pytrace=False)
    return param
