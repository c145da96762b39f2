"""Tests for the per-stage setting declarations (`agent.settings`) as `agent.config` gathers them.

Every declared setting must reach the same attribute from the config file, its environment variable
and its flag (through the real command line), and a section built with no arguments must be exactly
what the loader makes of the defaults: one declaration, no second copy of a default.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from agent.cli import main
from agent.config import SECTION_TYPES, SETTINGS, AgentConfig, as_dict, load_config
from agent.settings import ENV_PREFIX, Setting, parse_str, section_name, setting, settings_of

NO_ENV: dict[str, str] = {}
# Tried in order until the setting's parser accepts one that differs from its default.
_STRINGS = ("127.0.0.1:9999", "json", "debug", "tracepoint", "fp", "dwarf", "none")
_TUPLES: tuple[tuple[Any, ...], ...] = (("offcpu", "cpu"), (4242, 17), (("x-tenant", "t1"),))


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def _candidates(default: Any) -> tuple[Any, ...]:
    if isinstance(default, bool):
        return (not default,)
    if default is None:  # auto
        return (True, False)
    if isinstance(default, int):
        return (default * 2, default + 1, default - 1)
    if isinstance(default, float):
        return (default * 2, default + 1.5, default / 2)
    if isinstance(default, str):
        return _STRINGS
    return _TUPLES


def non_default(declared: Setting) -> Any:
    """A raw value (as YAML would hold it) that the setting accepts and that changes it."""
    for raw in _candidates(declared.default):
        try:
            if declared.parse(raw) != declared.default:
                return raw
        except ValueError:
            continue
    raise AssertionError(f"no non-default test value for {declared.key}: extend the candidates")


def as_text(raw: Any) -> str:
    """The same value as an environment variable or flag spells it."""
    if isinstance(raw, bool):
        return str(raw).lower()
    if isinstance(raw, tuple):
        return ",".join(f"{item[0]}={item[1]}" if isinstance(item, tuple) else str(item) for item in raw)
    return str(raw)


def as_yaml(declared: Setting, raw: Any) -> str:
    plain: Any = list(raw) if isinstance(raw, tuple) else raw
    if isinstance(raw, tuple) and raw and isinstance(raw[0], tuple):
        plain = dict(raw)
    node: Any = {declared.field: plain}
    for part in reversed(declared.section.split(".")):
        node = {part: node}
    return yaml.safe_dump(node)


def value_at(config: AgentConfig, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("declared", SETTINGS, ids=lambda s: s.key)
def test_every_setting_round_trips_through_file_environment_and_flag(
    declared: Setting, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = non_default(declared)
    expected = declared.parse(raw)
    path = tmp_path / "agent.yaml"
    path.write_text(as_yaml(declared, raw))
    from_file = load_config(str(path), environ=NO_ENV)
    from_env = load_config(environ={declared.env: as_text(raw)})
    assert value_at(from_file, declared.key) == expected
    assert value_at(from_env, declared.key) == expected
    assert from_file == from_env
    defaults = load_config(environ=NO_ENV)
    assert declared.key in [s.key for s in SETTINGS if value_at(from_env, s.key) != value_at(defaults, s.key)]
    if not declared.flag:
        return
    if declared.flag_is_switch:
        argv = [declared.flag]
    elif declared.flag_repeats:
        argv = [arg for item in raw for arg in (declared.flag, str(item))]
    else:
        argv = [declared.flag, as_text(raw)]
    assert main(["config", *argv]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == as_dict(from_env)


def test_example_config_round_trips_every_setting(tmp_path: Path) -> None:
    """Each example line, uncommented and changed to a non-default value, sets exactly that setting."""
    defaults = load_config(environ=NO_ENV)
    for declared in SETTINGS:
        path = tmp_path / f"{declared.key}.yaml"
        path.write_text(as_yaml(declared, non_default(declared)))
        loaded = load_config(str(path), environ=NO_ENV)
        differing = [s.key for s in SETTINGS if value_at(loaded, s.key) != value_at(defaults, s.key)]
        assert declared.key in differing
        assert set(differing) <= {declared.key, "export.otlp.enabled"}  # an endpoint turns OTLP on


@pytest.mark.parametrize("name", list(SECTION_TYPES))
def test_a_section_built_without_arguments_is_the_loaded_default(name: str) -> None:
    section_type = SECTION_TYPES[name]
    loaded = value_at(load_config(environ=NO_ENV), name)
    built = section_type()
    if name == "export.otlp":  # auto until loaded: on only when an endpoint was configured
        assert built.enabled is None
        built = dataclasses.replace(built, enabled=False)
    assert built == loaded
    assert section_name(section_type) == name


def test_settings_are_keyed_by_section_and_field_in_declaration_order() -> None:
    @dataclass(frozen=True, slots=True)
    class Example:
        SECTION: ClassVar[str] = "example.nested"
        second: int = setting(2, int, "Second.", "--second")
        first: str = setting("a", parse_str, "First.", env_name="EXAMPLE_FIRST")

    declared = settings_of(Example)
    assert [(s.key, s.default, s.flag, s.env) for s in declared] == [
        ("example.nested.second", 2, "--second", "PROFILING_AGENT_EXAMPLE_NESTED_SECOND"),
        ("example.nested.first", "a", "", "EXAMPLE_FIRST"),
    ]
    assert Example() == Example(second=2, first="a")


def test_a_section_field_without_a_declaration_is_refused() -> None:
    @dataclass(frozen=True)
    class Undeclared:
        SECTION: ClassVar[str] = "undeclared"
        value: int = 1

    @dataclass(frozen=True)
    class Unnamed:
        value: int = setting(1, int, "Value.")

    with pytest.raises(TypeError, match=r"Undeclared\.value is not declared with setting"):
        settings_of(Undeclared)
    with pytest.raises(TypeError, match="Unnamed declares no SECTION name"):
        settings_of(Unnamed)


def test_every_section_module_declares_its_settings_beside_its_stage() -> None:
    """No section lives in the wiring modules: stages import their own section, never agent.config."""
    for name, section_type in SECTION_TYPES.items():
        assert section_type.__module__ not in ("agent.config", "agent.settings"), name
