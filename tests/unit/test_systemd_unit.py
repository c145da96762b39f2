"""Tests for the systemd unit (`systemd/profiling-agent.service`) with `systemd-analyze verify`.

`verify` refuses a unit whose ExecStart binary does not exist, and the agent is not installed under
/opt on a test host; `--root=DIR` would need a whole systemd tree (sysinit.target, /bin/kill) in DIR.
So the unit is copied into a temp dir with only the ExecStart binary's path replaced by a stub script;
every other line is verified as shipped. `verify` reports unknown keys and invalid values on stderr
with exit status 0, so the tests require an empty stderr, and one test checks a broken unit is caught.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent.config import SETTINGS

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "profiling-agent.service"
INSTALLED_BINARY = "/opt/profiling-agent/.venv/bin/profiling-agent"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian/Ubuntu package: systemd)",
)


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    stub = tmp_path / "bin" / "profiling-agent"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    assert INSTALLED_BINARY in unit_text
    unit = tmp_path / UNIT.name  # verify derives the unit's name and type from the file name
    unit.write_text(unit_text.replace(INSTALLED_BINARY, str(stub)))
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )


def service_settings() -> dict[str, list[str]]:
    """[Service] assignments, each key's values in order (systemd allows a key more than once)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_verifies_without_warnings(tmp_path: Path) -> None:
    result = verify(UNIT.read_text(), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("\nRestart=on-failure", "\nRestrat=on-failure")
    result = verify(broken, tmp_path)
    assert "Unknown key" in result.stderr and "Restrat" in result.stderr


def test_capabilities_are_ones_systemd_knows() -> None:
    # systemd silently drops capability names it does not know, and verify does not say so.
    known = {
        line.split()[0].upper()
        for line in subprocess.run(
            ["systemd-analyze", "capability"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[1:]
        if line.strip()
    }
    settings = service_settings()
    bounding = set(settings["CapabilityBoundingSet"][0].split())
    ambient = set(settings["AmbientCapabilities"][0].split())
    assert bounding == ambient
    assert {"CAP_BPF", "CAP_PERFMON"} <= bounding <= known


def test_unit_keeps_the_settings_the_agent_relies_on() -> None:
    settings = service_settings()
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["ExecStart"] == [f"{INSTALLED_BINARY} run --config /etc/profiling-agent/agent.yaml"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["LimitMEMLOCK"] == ["infinity"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["PrivateTmp"] == ["no"]


def test_default_output_directories_are_writable_under_protect_system_strict() -> None:
    writable = service_settings()["ReadWritePaths"][0].split()
    defaults = [s.default for s in SETTINGS if s.key.endswith("_dir") and isinstance(s.default, str)]
    assert defaults, "no *_dir setting found: the settings table changed shape"
    for directory in defaults:
        assert any(directory == w or directory.startswith(w.rstrip("/") + "/") for w in writable), directory
