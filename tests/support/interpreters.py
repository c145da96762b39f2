"""The CPython interpreters installed on this machine, for tests that read real interpreters' memory.

Debian's /usr/bin/python3.11 and every pyenv 3.10-3.13 build (`pyenv root`, else ~/.pyenv). A missing
interpreter skips its test with a reason; under CI (env CI set) 3.10, 3.11, 3.12 and 3.13 must exist,
because a suite that skipped them would prove nothing about the versions the agent supports.
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
