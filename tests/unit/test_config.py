"""Tests for the configuration declarations (`agent.settings`) and loader (`agent.config`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import SETTINGS, SETTINGS_BY_KEY, AgentConfig, as_dict, example_yaml, load_config
from agent.errors import ConfigError, ConfigErrors
from agent.settings import Setting
from tests.support.config import billion_laughs

EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "config" / "agent.yaml"
NO_ENV: dict[str, str] = {}


def write_yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return str(path)


def config_error(
    tmp_path: Path,
    text: str | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> ConfigError:
    path = write_yaml(tmp_path, text) if text is not None else None
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ if environ is not None else NO_ENV, overrides=overrides)
    return info.value


# Declarations


def test_setting_derives_env_section_and_field_from_its_key() -> None:
    setting = SETTINGS_BY_KEY["export.files.max_bytes"]
    assert setting.env == "PROFILING_AGENT_EXPORT_FILES_MAX_BYTES"
    assert setting.section == "export.files"
    assert setting.field == "max_bytes"
    assert SETTINGS_BY_KEY["profiling.frequency_hz"].env == "PROFILING_AGENT_PROFILING_FREQUENCY_HZ"


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.key)
def test_every_default_is_valid_for_its_own_parser(setting: Setting) -> None:
    assert setting.parse(setting.default) == setting.default


def test_flags_and_env_vars_are_unique() -> None:
    flags = [s.flag for s in SETTINGS if s.flag]
    envs = [s.env for s in SETTINGS]
    assert len(flags) == len(set(flags))
    assert len(envs) == len(set(envs))


# Defaults and precedence


def test_defaults() -> None:
    config = load_config(environ=NO_ENV)
    assert config.profiling.profilers == ("cpu",)
    assert config.profiling.frequency_hz == 19
    assert config.profiling.interval_s == 10.0
    assert config.profiling.duration_s == 0.0
    assert config.profiling.pids == ()
    assert config.profiling.queue_size == 65536
    assert config.symbolize.elf_cache_size == 128
    assert config.export.files.enabled is None
    assert config.files_enabled is True
    assert config.export.files.output_dir == "/var/lib/profiling-agent/profiles"
    assert config.export.files.max_bytes == 1024 * 1024 * 1024
    assert (config.logging.level, config.logging.format) == ("info", "text")


def test_config_is_frozen() -> None:
    config = load_config(environ=NO_ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.profiling.frequency_hz = 99  # type: ignore[misc]


def test_precedence_defaults_file_environment_flags(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "profiling:\n  frequency_hz: 49\n  interval_s: 30\nlogging:\n  level: debug\n")
    env = {"PROFILING_AGENT_PROFILING_FREQUENCY_HZ": "79", "PROFILING_AGENT_LOGGING_LEVEL": "warning"}

    from_file = load_config(path, environ=NO_ENV)
    assert (from_file.profiling.frequency_hz, from_file.profiling.interval_s) == (49, 30.0)
    assert from_file.logging.level == "debug"
    assert from_file.profiling.queue_size == 65536  # not in the file: the default

    from_env = load_config(path, environ=env)
    assert from_env.profiling.frequency_hz == 79
    assert from_env.logging.level == "warning"
    assert from_env.profiling.interval_s == 30.0  # not in the environment: the file's value

    from_flags = load_config(path, environ=env, overrides={"profiling.frequency_hz": "99"})
    assert from_flags.profiling.frequency_hz == 99
    assert from_flags.logging.level == "warning"


def test_environment_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROFILING_AGENT_PROFILING_FREQUENCY_HZ", "97")
    assert load_config().profiling.frequency_hz == 97
    assert load_config(environ=NO_ENV).profiling.frequency_hz == 19


def test_environment_strings_are_parsed_to_typed_values() -> None:
    env = {
        "PROFILING_AGENT_PROFILING_PIDS": "12, 7 12",
        "PROFILING_AGENT_PROFILING_INTERVAL_S": "2.5",
        "PROFILING_AGENT_PROFILING_PROFILERS": "CPU,cpu",
        "PROFILING_AGENT_EXPORT_FILES_MAX_FILES": "0",
        "PROFILING_AGENT_LOGGING_FORMAT": " JSON ",
    }
    config = load_config(environ=env)
    assert config.profiling.pids == (7, 12)
    assert config.profiling.interval_s == 2.5
    assert config.profiling.profilers == ("cpu",)
    assert config.export.files.max_files == 0
    assert config.logging.format == "json"


def test_empty_file_and_empty_sections_keep_defaults(tmp_path: Path) -> None:
    assert load_config(write_yaml(tmp_path, ""), environ=NO_ENV) == load_config(environ=NO_ENV)
    assert load_config(write_yaml(tmp_path, "profiling:\nexport:\n"), environ=NO_ENV) == load_config(environ=NO_ENV)


def test_pids_from_a_yaml_list_are_sorted_and_deduplicated(tmp_path: Path) -> None:
    config = load_config(write_yaml(tmp_path, "profiling:\n  pids: [30, 4, 30]\n"), environ=NO_ENV)
    assert config.profiling.pids == (4, 30)


@pytest.mark.parametrize(
    ("text", "enabled", "files_enabled"),
    [
        ("auto", None, True),
        ("true", True, True),
        ("false", False, False),
        ("'off'", False, False),
        ("null", None, True),
    ],
)
def test_export_files_enabled_auto_true_false(
    tmp_path: Path, text: str, enabled: bool | None, files_enabled: bool
) -> None:
    config = load_config(write_yaml(tmp_path, f"export:\n  files:\n    enabled: {text}\n"), environ=NO_ENV)
    assert config.export.files.enabled is enabled
    assert config.files_enabled is files_enabled


@pytest.mark.parametrize(("value", "enabled"), [("auto", None), ("AUTO", None), ("1", True), ("no", False)])
def test_export_files_enabled_from_environment(value: str, enabled: bool | None) -> None:
    config = load_config(environ={"PROFILING_AGENT_EXPORT_FILES_ENABLED": value})
    assert config.export.files.enabled is enabled


# Validation errors: each names the key path and what was expected


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("profiling:\n  frequency_hz: 0\n", "profiling.frequency_hz", "expected an integer in [1, 1000], got 0"),
        ("profiling:\n  frequency_hz: 1001\n", "profiling.frequency_hz", "expected an integer in [1, 1000], got 1001"),
        ("profiling:\n  frequency_hz: fast\n", "profiling.frequency_hz", "expected an integer in [1, 1000]"),
        ("profiling:\n  frequency_hz: 19.5\n", "profiling.frequency_hz", "expected an integer in [1, 1000]"),
        ("profiling:\n  frequency_hz: true\n", "profiling.frequency_hz", "expected an integer in [1, 1000]"),
        ("profiling:\n  interval_s: 0.5\n", "profiling.interval_s", "expected a number in [1, 3600], got 0.5"),
        ("profiling:\n  interval_s: .nan\n", "profiling.interval_s", "expected a number in [1, 3600]"),
        ("profiling:\n  interval_s: [10]\n", "profiling.interval_s", "expected a number in [1, 3600]"),
        ("profiling:\n  interval_s: 1" + "0" * 400 + "\n", "profiling.interval_s", "expected a number in [1, 3600]"),
        ("logging:\n  level: verbose\n", "logging.level", "expected one of debug, info, warning, error"),
        ("export:\n  files:\n    output_dir: [a, b]\n", "export.files.output_dir", "expected a string"),
        ("export:\n  files:\n    output_dir:\n", "export.files.output_dir", "expected a string"),
        ("export:\n  files:\n    max_files: -1\n", "export.files.max_files", "expected an integer in [0, 10000000]"),
        ("export:\n  files:\n    enabled: maybe\n", "export.files.enabled", "expected true, false or auto"),
        ("profiling:\n  profilers: gpu\n", "profiling.profilers", "unknown profiler 'gpu'; known: cpu"),
        ("profiling:\n  profilers: []\n", "profiling.profilers", "expected at least one profiler"),
        ("profiling:\n  pids: [12, abc]\n", "profiling.pids", "expected process ids (positive integers), got 'abc'"),
        ("profiling:\n  pids: '0'\n", "profiling.pids", "expected process ids (positive integers), got '0'"),
        ("profiling:\n  pids: [-5]\n", "profiling.pids", "expected process ids (positive integers), got -5"),
        # 2^32 + 1234: the u32 map key would have profiled pid 1234.
        (
            "profiling:\n  pids: [4294968530]\n",
            "profiling.pids",
            "process id 4294968530 is above the kernel's limit (4194304)",
        ),
    ],
)
def test_invalid_value_in_file(tmp_path: Path, text: str, key: str, expected: str) -> None:
    error = config_error(tmp_path, text)
    assert error.key == key
    assert expected in error.message
    assert f"(in {tmp_path / 'agent.yaml'})" in error.message
    assert str(error).startswith(f"{key}: ")


def test_invalid_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"PROFILING_AGENT_PROFILING_FREQUENCY_HZ": "abc"})
    assert info.value.key == "profiling.frequency_hz"
    assert "expected an integer in [1, 1000], got 'abc'" in info.value.message
    assert "(environment variable PROFILING_AGENT_PROFILING_FREQUENCY_HZ)" in info.value.message


def test_unknown_environment_variables_are_named_with_a_suggestion() -> None:
    """A typo in a variable of ours would be ignored, and the default silently used."""
    environ = {"PROFILING_AGENT_PROFILING_FREQENCY_HZ": "49", "PROFILING_AGENT_BOGUS": "1", "OTHER_TOOL_X": "1"}
    with pytest.raises(ConfigErrors) as info:
        load_config(environ=environ)
    assert [str(e) for e in info.value.problems] == [
        "unknown environment variable PROFILING_AGENT_BOGUS",
        "unknown environment variable PROFILING_AGENT_PROFILING_FREQENCY_HZ"
        " (did you mean PROFILING_AGENT_PROFILING_FREQUENCY_HZ?)",
    ]


def test_invalid_flag_value_names_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ=NO_ENV, overrides={"profiling.interval_s": "0.5"})
    assert info.value.key == "profiling.interval_s"
    assert "expected a number in [1, 3600], got 0.5" in info.value.message
    assert "(flag --interval)" in info.value.message


def test_invalid_override_of_a_setting_without_flag_has_no_origin() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ=NO_ENV, overrides={"profiling.queue_size": 1})
    assert info.value.key == "profiling.queue_size"
    assert info.value.message == "expected an integer in [1024, 16777216], got 1"


def test_a_valid_flag_does_not_mask_an_invalid_file(tmp_path: Path) -> None:
    error = config_error(tmp_path, "profiling:\n  frequency_hz: 0\n", overrides={"profiling.frequency_hz": "99"})
    assert error.key == "profiling.frequency_hz"


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ("profiling:\n  frequncy_hz: 99\n", "profiling.frequncy_hz", "profiling.frequency_hz"),
        ("logging:\n  levle: debug\n", "logging.levle", "logging.level"),
        # misplaced keys: the right name in the wrong section
        ("frequency_hz: 99\n", "frequency_hz", "profiling.frequency_hz"),
        ("max_bytes: 10\n", "max_bytes", "export.files.max_bytes"),
        ("export:\n  output_dir: /tmp\n", "export.output_dir", "export.files.output_dir"),
        ("profling:\n  frequency_hz: 99\n", "profling", "profiling"),
    ],
)
def test_unknown_key_suggests_the_closest(tmp_path: Path, text: str, key: str, hint: str) -> None:
    error = config_error(tmp_path, text)
    assert error.key == key
    assert error.message == f"unknown key (did you mean {hint!r}?)"


def test_unknown_key_without_a_close_match_has_no_hint(tmp_path: Path) -> None:
    error = config_error(tmp_path, "zzz: 1\n")
    assert (error.key, error.message) == ("zzz", "unknown key")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("profiling: 5\n", "profiling"),
        ("logging: [debug]\n", "logging"),
        ("export: true\n", "export"),
        ("export:\n  files: /tmp/profiles\n", "export.files"),
    ],
)
def test_section_that_is_not_a_mapping(tmp_path: Path, text: str, key: str) -> None:
    error = config_error(tmp_path, text)
    assert error.key == key
    assert error.message.startswith("expected a mapping (a section), got ")


@pytest.mark.parametrize(("text", "kind"), [("- profiling\n- logging\n", "list"), ("just a string\n", "str")])
def test_file_that_is_not_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    error = config_error(tmp_path, text)
    assert error.key == ""
    assert error.message == f"config file {tmp_path / 'agent.yaml'} must be a mapping of sections, got {kind}"
    assert str(error) == error.message  # no empty "key: " prefix


def test_invalid_yaml(tmp_path: Path) -> None:
    error = config_error(tmp_path, "profiling:\n  frequency_hz: [19\n")
    assert error.key == ""
    assert error.message.startswith(f"config file {tmp_path / 'agent.yaml'} is not valid YAML: ")


def test_a_config_whose_aliases_expand_past_the_limit_is_refused_before_it_is_walked(tmp_path: Path) -> None:
    # Seen: the agent grew to 2.6 GB and was still reading this after 60 s.
    error = config_error(tmp_path, billion_laughs(9))
    path = tmp_path / "agent.yaml"
    assert error.message == f"config file {path} expands to more than 100,000 values (through YAML aliases)"


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    error = config_error(tmp_path, "profiling: &p\n  pids: [*p]\n")
    assert error.message == f"config file {tmp_path / 'agent.yaml'} refers to itself (a recursive YAML alias)"


def test_a_config_nested_too_deeply_is_refused(tmp_path: Path) -> None:
    error = config_error(tmp_path, "profiling:\n  pids: " + "[" * 100 + "]" * 100 + "\n")
    assert error.message == f"config file {tmp_path / 'agent.yaml'} nests deeper than 64 levels"


def test_aliases_within_the_limit_still_work(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "profiling:\n  frequency_hz: &hz 49\n  pids: [*hz]\n")
    config = load_config(path, environ=NO_ENV)
    assert (config.profiling.frequency_hz, config.profiling.pids) == (49, (49,))
    # Three levels, 9^3 strings: read to the end, and its real problem named (an unknown key).
    error = config_error(tmp_path, billion_laughs(3))
    assert "unknown key" in str(error) and "expands" not in str(error), error


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(str(missing), environ=NO_ENV)
    assert info.value.key == ""
    assert info.value.message == f"cannot read config file {missing}: No such file or directory"


def test_a_directory_is_named_as_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path), environ=NO_ENV)
    assert info.value.key == ""
    assert info.value.message == f"config file {tmp_path} is a directory"


def test_unreadable_file(tmp_path: Path) -> None:
    # Root reads a chmod 000 file: a dangling symlink is unreadable for everyone.
    link = tmp_path / "agent.yaml"
    link.symlink_to(tmp_path / "gone.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(str(link), environ=NO_ENV)
    assert info.value.message == f"cannot read config file {link}: No such file or directory"


def test_an_oversized_or_binary_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("# padding\n" * 120_000)  # 1.2 MB of comments: valid YAML, but no config is that big
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ=NO_ENV)
    assert info.value.message == f"config file {path} is larger than 1,048,576 bytes"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(64))  # e.g. --config pointed at the binary
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ=NO_ENV)
    assert info.value.message == f"config file {path} is a binary file, not YAML text"


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(b"logging:\n  level: \xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ=NO_ENV)
    assert info.value.key == ""
    assert info.value.message.startswith(f"config file {path} is not UTF-8 text: ")


# Output: as_dict and the example config


def test_as_dict_shape_and_plain_values() -> None:
    data = as_dict(load_config(environ={"PROFILING_AGENT_PROFILING_PIDS": "3,1"}))
    assert data["profiling"]["pids"] == [1, 3]
    assert data["profiling"]["profilers"] == ["cpu"]
    assert data["export"]["files"]["enabled"] == "auto"
    assert data["logging"] == {"level": "info", "format": "text"}
    assert set(data) == {key.split(".")[0] for key in SETTINGS_BY_KEY}


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {
            "PROFILING_AGENT_PROFILING_PIDS": "42,7",
            "PROFILING_AGENT_PROFILING_FREQUENCY_HZ": "99",
            "PROFILING_AGENT_EXPORT_FILES_ENABLED": "false",
            "PROFILING_AGENT_LOGGING_FORMAT": "json",
        },
    ],
)
def test_as_dict_round_trips_through_a_yaml_file(tmp_path: Path, environ: dict[str, str]) -> None:
    config = load_config(environ=environ)
    path = write_yaml(tmp_path, yaml.safe_dump(as_dict(config), sort_keys=False))
    assert load_config(path, environ=NO_ENV) == config


def test_example_yaml_documents_every_setting_and_loads_to_the_defaults(tmp_path: Path) -> None:
    text = example_yaml()
    for setting in SETTINGS:
        assert f"(env {setting.env}" in text
        assert setting.help in text
        if setting.flag:
            assert f"flag {setting.flag})" in text
    loaded = load_config(write_yaml(tmp_path, text), environ=NO_ENV)
    assert loaded == load_config(environ=NO_ENV)
    assert isinstance(loaded, AgentConfig)


@pytest.mark.skipif(not EXAMPLE_CONFIG.exists(), reason="config/agent.yaml has not been generated")
def test_committed_example_config_is_up_to_date() -> None:
    assert EXAMPLE_CONFIG.read_text() == example_yaml(), (
        "config/agent.yaml is stale: regenerate it with `profiling-agent config --example > config/agent.yaml`"
    )
    assert load_config(os.fspath(EXAMPLE_CONFIG), environ=NO_ENV) == load_config(environ=NO_ENV)
