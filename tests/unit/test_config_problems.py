"""Tests for reporting every configuration problem at once (`agent.config`, `agent.errors.ConfigErrors`).

A config with several problems, from the file, the environment and the flags together, is refused with
one line per problem, each naming its key, and exit status 2; the running agent's SIGHUP reload logs
each of them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import load_config
from agent.daemon import Daemon
from agent.errors import ConfigError, ConfigErrors, raise_all
from agent.export.otlp.config import OtlpConfig
from agent.settings import ENV_PREFIX

REPO = Path(__file__).resolve().parents[2]
NO_ENV: dict[str, str] = {}
# A bad value, an unknown key (with its hint) and a section that is not a mapping.
BAD_FILE = "profiling:\n  frequency_hz: 0\n  intervl_s: 5\nlogging: debug\nsymbolize:\n  elf_cache_size: 64\n"
BAD_FILE_KEYS = ["profiling.frequency_hz", "profiling.intervl_s", "logging"]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def bad_file(tmp_path: Path, text: str = BAD_FILE) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


def problems_of(*args: object, **kwargs: object) -> tuple[ConfigError, ...]:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)  # type: ignore[arg-type]
    return info.value.problems


def test_every_problem_of_the_file_is_reported(tmp_path: Path) -> None:
    problems = problems_of(bad_file(tmp_path), environ=NO_ENV)
    assert [p.key for p in problems] == BAD_FILE_KEYS
    assert "expected an integer in [1, 1000], got 0" in problems[0].message
    assert problems[1].message == "unknown key (did you mean 'profiling.interval_s'?)"
    assert problems[2].message.startswith("expected a mapping (a section), got 'debug'")


def test_file_environment_and_flag_problems_are_reported_together(tmp_path: Path) -> None:
    environ = {"PROFILING_AGENT_SAMPLING_MAX_EVENTS_PER_S": "lots", "PROFILING_AGENT_LOGGING_FORMAT": "json"}
    overrides = {"profiling.interval_s": "0.5", "metrics.address": "9464", "profiling.duration_s": "3"}
    with pytest.raises(ConfigErrors) as info:
        load_config(bad_file(tmp_path), environ=environ, overrides=overrides)
    error = info.value
    keys = [p.key for p in error.problems]
    assert keys == [*BAD_FILE_KEYS, "sampling.max_events_per_s", "profiling.interval_s", "metrics.address"]
    assert "(environment variable PROFILING_AGENT_SAMPLING_MAX_EVENTS_PER_S)" in error.problems[3].message
    assert "(flag --interval)" in error.problems[4].message
    assert "(flag --metrics-address)" in error.problems[5].message
    # One line per problem, each starting with its key; the first problem stays `key` and `message`.
    assert str(error).splitlines() == [str(p) for p in error.problems]
    assert all(line.startswith(f"{key}: ") for line, key in zip(str(error).splitlines(), keys, strict=True))
    assert (error.key, error.message) == (error.problems[0].key, error.problems[0].message)
    assert error.exit_code == 2


def test_an_unreadable_file_does_not_hide_the_environment_problems(tmp_path: Path) -> None:
    problems = problems_of(str(tmp_path / "missing.yaml"), environ={"PROFILING_AGENT_LOGGING_LEVEL": "loud"})
    assert [p.key for p in problems] == ["", "logging.level"]
    assert problems[0].message.startswith("cannot read config file ")


def test_one_problem_is_a_plain_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(bad_file(tmp_path, "profiling:\n  frequency_hz: 0\n"), environ=NO_ENV)
    assert type(info.value) is ConfigError
    assert info.value.problems == (info.value,)


def test_otlp_validation_problems_join_the_parse_problems() -> None:
    environ = {
        "PROFILING_AGENT_EXPORT_OTLP_ENDPOINT": "http://collector:4317",  # a string: refused by validation
        "PROFILING_AGENT_EXPORT_OTLP_HEADERS": "grpc-timeout=1",
        "PROFILING_AGENT_EXPORT_OTLP_TIMEOUT_S": "soon",  # refused by its parser: reported once
    }
    problems = problems_of(environ=environ)
    assert [p.key for p in problems] == ["export.otlp.timeout_s", "export.otlp.endpoint", "export.otlp.headers"]


def test_otlp_config_lists_every_invalid_field() -> None:
    config = OtlpConfig(endpoint="nohost", compression="zstd", queue_size=0, headers=(("x y", "v"),))
    keys = [p.key for p in config.problems()]
    assert keys == ["export.otlp.endpoint", "export.otlp.headers", "export.otlp.compression", "export.otlp.queue_size"]
    with pytest.raises(ConfigErrors) as info:
        config.validate()
    assert [p.key for p in info.value.problems] == keys


def test_config_errors_flatten_and_raise_all() -> None:
    a, b, c = ConfigError("a", "bad"), ConfigError("b", "worse"), ConfigError("", "no file")
    nested = ConfigErrors([a, ConfigErrors([b, c])])
    assert nested.problems == (a, b, c)
    assert str(nested) == "a: bad\nb: worse\nno file"
    raise_all([])  # nothing to raise
    with pytest.raises(ConfigError) as one:
        raise_all([b])
    assert one.value is b
    with pytest.raises(ConfigErrors) as several:
        raise_all([a, b])
    assert several.value.problems == (a, b)
    with pytest.raises(ValueError):
        ConfigErrors([])


def test_cli_prints_one_line_per_problem(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["config", "--config", bad_file(tmp_path), "--frequency", "5000"])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert [line.split(": ")[2] for line in lines] == [*BAD_FILE_KEYS, "profiling.frequency_hz"]
    assert all(line.startswith("profiling-agent: configuration error: ") for line in lines)


def test_run_with_a_bad_value_and_an_unknown_key_exits_2_naming_both(tmp_path: Path) -> None:
    """The acceptance check: the real command, as a subprocess; it fails before anything needs root."""
    path = bad_file(tmp_path, "profiling:\n  frequency_hz: 5000\nexport:\n  files:\n    max_file: 3\n")
    env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
    result = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", path],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr == (
        "profiling-agent: configuration error: profiling.frequency_hz: "
        f"expected an integer in [1, 1000], got 5000 (in {path})\n"
        "profiling-agent: configuration error: export.files.max_file: "
        "unknown key (did you mean 'export.files.max_files'?)\n"
    )
    assert "Traceback" not in result.stderr


def test_sighup_reload_logs_every_problem(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = bad_file(tmp_path, "")
    daemon = Daemon(load_config(path, environ=NO_ENV), lambda: load_config(bad_file(tmp_path), environ=NO_ENV))
    running = daemon.config
    with caplog.at_level(logging.ERROR, logger="agent.daemon"):
        assert daemon._reload(next_tick=123.0) == 123.0
    prefix = "config reload refused, the running configuration stays: "
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]
    assert [line.removeprefix(prefix).split(": ", 1)[0] for line in refused] == BAD_FILE_KEYS
    assert daemon.reloads["invalid"] == 1
    assert daemon.config is running


def test_sighup_to_an_unusable_output_directory_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The new directory is made and write-checked before anything of the reload applies: refused, the
    running configuration (and its sink) stays."""
    path = tmp_path / "agent.yaml"
    path.write_text(f"export:\n  files:\n    output_dir: {tmp_path / 'good'}\n")
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"")
    daemon = Daemon(load_config(str(path), environ=NO_ENV), lambda: load_config(str(path), environ=NO_ENV))
    running = daemon.config
    path.write_text(f"export:\n  files:\n    output_dir: {blocker / 'profiles'}\n")
    with caplog.at_level(logging.ERROR, logger="agent.daemon"):
        assert daemon._reload(next_tick=5.0) == 5.0
    assert daemon.config is running and daemon.reloads["invalid"] == 1
    refused = [r.getMessage() for r in caplog.records if "config reload refused" in r.getMessage()]
    assert len(refused) == 1 and "export.files.output_dir: cannot create profile directory" in refused[0], refused
