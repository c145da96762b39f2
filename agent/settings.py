"""Configuration machinery: how a setting is declared, parsed and named; no setting is declared here.

Each stage declares its own configuration section beside its code, as a frozen dataclass whose fields are
`setting(...)`s: the default, parser, help, flag and environment override live on the field itself, so
the loader (`agent.config`), the command line (`agent.cli`), the example config (`config/agent.yaml`)
and the docs all come from that one declaration. A section names its key prefix in `SECTION`, e.g.
`"export.otlp"`. Environment variables are `PROFILING_AGENT_<KEY>` with dots as underscores, e.g.
`PROFILING_AGENT_PROFILING_FREQUENCY_HZ`. This module imports no stage, so every stage may import it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

ENV_PREFIX = "PROFILING_AGENT_"
MiB = 1024 * 1024

# A parser turns a value from YAML (any type) or from a string (env, flag) into the typed value, or
# raises ValueError with a message that says what was expected.
Parser = Callable[[Any], Any]
T = TypeVar("T")
_METADATA_KEY = "agent.setting"


@dataclass(frozen=True, slots=True)
class Setting:
    key: str  # dotted path, e.g. "profiling.frequency_hz" (filled in from the section and field name)
    default: Any
    parse: Parser
    help: str
    flag: str = ""  # command-line flag of `run`, if any
    expected: str = ""  # human description of valid values, used in error messages
    flag_is_switch: bool = False  # the flag takes no value and sets True
    flag_repeats: bool = False  # the flag may be given several times; the parser gets the list
    # Shown commented out in the example config, because setting it at all changes behaviour.
    commented_in_example: bool = False
    env_name: str = ""  # overrides the derived environment variable name

    @property
    def env(self) -> str:
        return self.env_name or ENV_PREFIX + self.key.upper().replace(".", "_")

    @property
    def section(self) -> str:
        return self.key.rsplit(".", 1)[0]

    @property
    def field(self) -> str:
        return self.key.rsplit(".", 1)[1]


def setting(
    default: T,
    parse: Parser,
    help: str,
    flag: str = "",
    *,
    expected: str = "",
    flag_is_switch: bool = False,
    flag_repeats: bool = False,
    commented_in_example: bool = False,
    env_name: str = "",
) -> T:
    """A section field declared as a setting: `min_block_us: int = setting(1000, ranged_int(1, 10), "...")`.

    Defaults must be immutable (tuples, not lists): the dataclass shares them between instances.
    """
    declaration = Setting(
        "",
        default,
        parse,
        help,
        flag,
        expected,
        flag_is_switch,
        flag_repeats,
        commented_in_example,
        env_name,
    )
    return dataclasses.field(default=default, metadata={_METADATA_KEY: declaration})


def section_name(section: type) -> str:
    """The key prefix a section class declares in its `SECTION` class variable."""
    name = getattr(section, "SECTION", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{section.__name__} declares no SECTION name")
    return name


def settings_of(section: type) -> tuple[Setting, ...]:
    """The settings a section dataclass declares, keyed `<SECTION>.<field>`, in field order.

    Every field the constructor takes must be a `setting(...)`: a plain field would be a value the
    loader cannot fill and the docs cannot describe.
    """
    name = section_name(section)
    out = []
    for f in dataclasses.fields(section):
        if not f.init:
            continue
        declaration = f.metadata.get(_METADATA_KEY)
        if not isinstance(declaration, Setting):
            raise TypeError(f"{section.__name__}.{f.name} is not declared with setting(...)")
        out.append(dataclasses.replace(declaration, key=f"{name}.{f.name}"))
    return tuple(out)


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def parse_auto_bool(value: Any) -> bool | None:
    if value is None or str(value).strip().lower() == "auto":
        return None
    return parse_bool(value)


def ranged_int(low: int, high: int) -> Parser:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"expected an integer in [{low}, {high}], got {value!r}")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"expected an integer in [{low}, {high}], got {value!r}") from None
        if not low <= number <= high:
            raise ValueError(f"expected an integer in [{low}, {high}], got {number}")
        return number

    return parse


def ranged_float(low: float, high: float) -> Parser:
    def parse(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"expected a number in [{low:g}, {high:g}], got {value!r}")
        try:
            number = float(value)
        except (ValueError, OverflowError):
            raise ValueError(f"expected a number in [{low:g}, {high:g}], got {value!r}") from None
        if not low <= number <= high:
            raise ValueError(f"expected a number in [{low:g}, {high:g}], got {number:g}")
        return number

    return parse


def parse_str(value: Any) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"expected a string, got {value!r}")
    return str(value)


def choice(*options: str) -> Parser:
    def parse(value: Any) -> str:
        text = parse_str(value).strip().lower()
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return text

    return parse


def as_list(value: Any) -> list[Any]:
    """Items of a YAML list, a comma/space separated string, or repeated flags that may each be one."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [part for item in value for part in as_list(item)]
    if isinstance(value, str):
        return [part for part in re.split(r"[,\s]+", value) if part]
    return [value]
