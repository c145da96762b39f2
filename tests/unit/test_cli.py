"""Tests for the command line (`agent.cli`): exit codes, error lines and the `config` subcommand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.cli import main
from agent.config import SETTINGS, as_dict, example_yaml, load_config
from agent.settings import ENV_PREFIX

CONSOLE_SCRIPT = Path(sys.executable).parent / "profiling-agent"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads os.environ: keep the caller's PROFILING_AGENT_* variables out of these tests."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        (["config", "--frequency", "0"], "profiling.frequency_hz: expected an integer in [1, 1000], got 0"),
        (["config", "--interval", "0.5"], "profiling.interval_s: expected a number in [1, 3600], got 0.5"),
        (["config", "--pid", "12", "--pid", "x"], "profiling.pids: expected process ids"),
        (["config", "--profilers", "gpu"], "profiling.profilers: unknown profiler 'gpu'"),
        (["run", "--log-level", "loud"], "logging.level: expected one of debug, info, warning, error"),
    ],
)
def test_config_error_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], prefix: str) -> None:
    code, out, err = run_main(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith(f"profiling-agent: configuration error: {prefix}")
    assert err.count("\n") == 1 and err.endswith("\n")
    assert "Traceback" not in err


def test_config_error_from_a_file_names_the_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("profiling:\n  frequncy_hz: 99\n")
    code, _, err = run_main(capsys, "config", "--config", str(path))
    assert code == 2
    assert err == (
        "profiling-agent: configuration error: profiling.frequncy_hz: "
        "unknown key (did you mean 'profiling.frequency_hz'?)\n"
    )


def test_missing_config_file_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_main(capsys, "config", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2
    assert err.startswith("profiling-agent: configuration error: cannot read config file ")
    assert err.count("\n") == 1


def test_config_prints_the_effective_configuration_honouring_flags(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "config", "--frequency", "99", "--log-format", "json")
    assert (code, err) == (0, "")
    printed = yaml.safe_load(out)
    assert printed["profiling"]["frequency_hz"] == 99
    assert printed["logging"]["format"] == "json"
    assert printed["profiling"]["interval_s"] == 10.0
    assert list(printed) == list(dict.fromkeys(s.key.split(".")[0] for s in SETTINGS))  # declared order, not sorted


def test_config_output_is_a_loadable_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run_main(capsys, "config", "--frequency", "49", "--pid", "5", "--output-dir", "/srv/p")
    assert code == 0
    path = tmp_path / "effective.yaml"
    path.write_text(out)
    config = load_config(str(path), environ={})
    assert config.profiling.frequency_hz == 49
    assert config.profiling.pids == (5,)
    assert config.export.files.output_dir == "/srv/p"


def test_config_honours_file_and_environment_under_flags(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("profiling:\n  frequency_hz: 49\n  interval_s: 30\nlogging:\n  level: debug\n")
    monkeypatch.setenv("PROFILING_AGENT_LOGGING_LEVEL", "error")
    monkeypatch.setenv("PROFILING_AGENT_PROFILING_INTERVAL_S", "20")
    code, out, _ = run_main(capsys, "config", "--config", str(path), "--interval", "5")
    assert code == 0
    printed = yaml.safe_load(out)
    assert printed["profiling"]["frequency_hz"] == 49  # file
    assert printed["logging"]["level"] == "error"  # environment over file
    assert printed["profiling"]["interval_s"] == 5.0  # flag over environment


def test_config_without_flags_prints_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "config")
    assert code == 0
    assert yaml.safe_load(out) == as_dict(load_config(environ={}))


def test_config_example_prints_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(capsys, "config", "--example")
    assert (code, err) == (0, "")
    assert out == example_yaml()


def test_repeated_pid_flags_are_collected(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(capsys, "config", "--pid", "42", "--pid", "7", "--pid", "42")
    assert code == 0
    assert yaml.safe_load(out)["profiling"]["pids"] == [7, 42]


def test_unknown_subcommand_exits_2_through_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["profile"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'profile'" in err
    assert err.startswith("usage: profiling-agent")


def test_missing_subcommand_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "required" in capsys.readouterr().err


def test_unknown_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["config", "--frequncy", "99"])
    assert info.value.code == 2
    assert "unrecognized arguments: --frequncy" in capsys.readouterr().err


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason="the profiling-agent console script is not installed")
def test_console_script_reports_a_config_error_with_exit_2() -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "config", "--frequency", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "profiling-agent: configuration error: profiling.frequency_hz: "
        "expected an integer in [1, 1000], got 0 (flag --frequency)\n"
    )
