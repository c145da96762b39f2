"""Configuration: typed, frozen sections loaded from defaults < YAML file < environment < flags.

A wiring module: each stage declares its own section beside its code (`agent.probes.settings`,
`agent.unwind.settings`, `agent.export.otlp.config`, ...; see `agent.settings`), and this module only
gathers them into one `AgentConfig` and loads it. It owns reading the config file and `os.environ`
(nothing else in the agent reads either). Each stage receives only its section. Every problem is a
`ConfigError` naming the key path, found before anything touches the kernel, and all of them are
reported at once (`ConfigErrors`): the file's, the environment's and the flags'.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.errors import ConfigError, raise_all
from agent.export.files import FilesConfig
from agent.export.otlp.config import OtlpConfig
from agent.health import MetricsConfig
from agent.logs import LoggingConfig
from agent.metadata.filters import ProcessFilter
from agent.metadata.host import MetadataConfig
from agent.probes.settings import AllocConfig, JvmSettings, OffCpuConfig, ProfilingConfig, PythonSettings
from agent.sampling.settings import SamplingConfig
from agent.settings import ENV_PREFIX, Setting, section_name, settings_of
from agent.symbolize.settings import SymbolizeConfig
from agent.unwind.settings import UnwindConfig


@dataclass(frozen=True, slots=True)
class ExportConfig:
    files: FilesConfig
    otlp: OtlpConfig  # `enabled` already resolved: auto means "an endpoint was configured"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    profiling: ProfilingConfig
    offcpu: OffCpuConfig
    alloc: AllocConfig
    python: PythonSettings
    sampling: SamplingConfig
    unwind: UnwindConfig
    symbolize: SymbolizeConfig
    export: ExportConfig
    metrics: MetricsConfig
    metadata: MetadataConfig
    filters: ProcessFilter
    logging: LoggingConfig
    jvm: JvmSettings = field(default_factory=JvmSettings)
    # systemd's NOTIFY_SOCKET (not a setting: the service manager sets it); "" outside systemd.
    notify_socket: str = ""

    @property
    def files_enabled(self) -> bool:
        """Local files are the embedded default: on unless configured off, or auto with OTLP on."""
        enabled = self.export.files.enabled
        return not self.export.otlp.enabled if enabled is None else enabled


# In the order the example config and `profiling-agent config` show them.
SECTION_TYPES: dict[str, type] = {
    section_name(section): section
    for section in (
        ProfilingConfig,
        OffCpuConfig,
        AllocConfig,
        PythonSettings,
        JvmSettings,
        SamplingConfig,
        UnwindConfig,
        SymbolizeConfig,
        FilesConfig,
        OtlpConfig,
        MetricsConfig,
        MetadataConfig,
        ProcessFilter,
        LoggingConfig,
    )
}
SECTIONS = frozenset(SECTION_TYPES) | {"export"}
SETTINGS: tuple[Setting, ...] = tuple(s for section in SECTION_TYPES.values() for s in settings_of(section))
SETTINGS_BY_KEY = {setting.key: setting for setting in SETTINGS}
MAX_CONFIG_BYTES = 1 << 20  # the example config, every key documented, is ~10 KB
MAX_CONFIG_NODES = 100_000  # values in the config file, aliases expanded: the real one has ~100
MAX_CONFIG_DEPTH = 64  # nesting levels (sections are 2 or 3 deep)


def load_config(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Build the effective configuration; `overrides` are command-line values keyed by setting key.

    Raises one `ConfigError`, or `ConfigErrors` listing every problem of the file, environment and flags.
    """
    values: dict[str, Any] = {setting.key: setting.default for setting in SETTINGS}
    explicit: set[str] = set()  # keys set by the file, the environment or a flag
    problems: list[ConfigError] = []
    if path:
        from_file = _read_file(Path(path), problems)
        values.update(from_file)
        explicit.update(from_file)
    env = os.environ if environ is None else environ
    for setting in SETTINGS:
        if setting.env in env:
            _take(setting, env[setting.env], f"environment variable {setting.env}", values, explicit, problems)
    problems.extend(_unknown_environment(env))
    for key, value in (overrides or {}).items():
        setting = SETTINGS_BY_KEY[key]
        _take(setting, value, f"flag {setting.flag}" if setting.flag else "", values, explicit, problems)
    if values["export.otlp.enabled"] is None:
        values["export.otlp.enabled"] = "export.otlp.endpoint" in explicit
    config = dataclasses.replace(_assemble(values), notify_socket=env.get("NOTIFY_SOCKET", ""))
    if config.export.otlp.enabled:
        # Reads the TLS files: only when they will be used. A key whose value was refused holds a
        # lower layer's value (or its default) here: checking it would repeat or contradict that problem.
        reported = {problem.key for problem in problems}
        problems.extend(p for p in config.export.otlp.problems() if p.key not in reported)
    raise_all(problems)
    return config


def _take(
    setting: Setting, raw: Any, origin: str, values: dict[str, Any], explicit: set[str], problems: list[ConfigError]
) -> None:
    try:
        values[setting.key] = _parse(setting, raw, origin)
    except ConfigError as e:
        problems.append(e)
        return
    explicit.add(setting.key)


def _read_file(path: Path, problems: list[ConfigError]) -> dict[str, Any]:
    """The file's valid settings; each problem in it is added to `problems`."""
    try:
        with path.open("rb") as f:  # a directory opens, and fails on read, with IsADirectoryError
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except IsADirectoryError:
        problems.append(ConfigError("", f"config file {path} is a directory"))
        return {}
    except OSError as e:
        problems.append(ConfigError("", f"cannot read config file {path}: {e.strerror or e}"))
        return {}
    if len(raw) > MAX_CONFIG_BYTES:
        problems.append(ConfigError("", f"config file {path} is larger than {MAX_CONFIG_BYTES:,} bytes"))
        return {}
    if b"\0" in raw:
        problems.append(ConfigError("", f"config file {path} is a binary file, not YAML text"))
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(ConfigError("", f"config file {path} is not UTF-8 text: {e}"))
        return {}
    try:
        document = _load_yaml(text)
    except yaml.YAMLError as e:
        problems.append(ConfigError("", f"config file {path} is not valid YAML: {e}"))
        return {}
    except _TooLarge as e:
        problems.append(ConfigError("", f"config file {path} {e}"))
        return {}
    if document is None:
        return {}
    if not isinstance(document, dict):
        kind = type(document).__name__
        problems.append(ConfigError("", f"config file {path} must be a mapping of sections, got {kind}"))
        return {}
    values: dict[str, Any] = {}
    _flatten(document, "", f"in {path}", values, problems)
    return values


class _TooLarge(Exception):
    """The document expands to more than MAX_CONFIG_NODES, nests too deeply, or refers to itself."""


def _load_yaml(text: str) -> Any:
    """The document, built only once its expanded size is known to be small: aliases share nodes, so
    430 bytes of nested aliases (a "billion laughs") expand to 10^8 nodes, and the agent grew to
    2.6 GB reading one (the checks of the settings walk every value)."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise _TooLarge("nests too deeply") from None
        if node is None:
            return None
        size = _expanded_size(node, {}, 0)
        if size > MAX_CONFIG_NODES:
            raise _TooLarge(f"expands to more than {MAX_CONFIG_NODES:,} values (through YAML aliases)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int], depth: int) -> int:
    """How many nodes the document has with every alias expanded, stopping past MAX_CONFIG_NODES."""
    known = sizes.get(id(node))
    if known is not None:
        if known < 0:
            raise _TooLarge("refers to itself (a recursive YAML alias)")
        return known
    if depth > MAX_CONFIG_DEPTH:
        raise _TooLarge(f"nests deeper than {MAX_CONFIG_DEPTH} levels")
    sizes[id(node)] = -1  # being counted: meeting it again below is a cycle
    if isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    else:
        children = []
    size = 1
    for child in children:
        size += _expanded_size(child, sizes, depth + 1)
        if size > MAX_CONFIG_NODES:
            break
    sizes[id(node)] = size
    return size


def _flatten(node: dict[Any, Any], prefix: str, origin: str, out: dict[str, Any], problems: list[ConfigError]) -> None:
    """Parse the settings of a (nested) section into `out`; its problems in document order."""
    for raw_key, value in node.items():
        key = f"{prefix}{raw_key}"
        if key in SETTINGS_BY_KEY:
            try:
                out[key] = _parse(SETTINGS_BY_KEY[key], value, origin)
            except ConfigError as e:
                problems.append(e)
        elif key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                problems.append(ConfigError(key, f"expected a mapping (a section), got {value!r}"))
                continue
            _flatten(value, key + ".", origin, out, problems)
        else:
            problems.append(ConfigError(key, f"unknown key{_did_you_mean(key)}"))


def _unknown_environment(env: Mapping[str, str]) -> list[ConfigError]:
    """An ENV_PREFIX variable that names no setting is a typo that would otherwise be ignored."""
    known = {setting.env for setting in SETTINGS}
    suffixes = sorted(name.removeprefix(ENV_PREFIX) for name in known)  # the shared prefix would match anything
    problems = []
    for name in sorted(n for n in env if n.startswith(ENV_PREFIX) and n not in known):
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), suffixes, n=1, cutoff=0.6)
        hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
        problems.append(ConfigError("", f"unknown environment variable {name}{hint}"))
    return problems


def _did_you_mean(key: str) -> str:
    candidates = [*SETTINGS_BY_KEY, *SECTIONS]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if not close:
        # A misplaced key (right name, wrong section) is the other common mistake.
        leaf = key.rsplit(".", 1)[-1]
        close = [candidate for candidate in SETTINGS_BY_KEY if candidate.endswith("." + leaf)][:1]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _parse(setting: Setting, value: Any, origin: str) -> Any:
    try:
        return setting.parse(value)
    except ValueError as e:
        where = f" ({origin})" if origin else ""
        problem = f"expected {setting.expected}, got {value!r}" if setting.expected else str(e)
        raise ConfigError(setting.key, f"{problem}{where}") from None


def _assemble(values: Mapping[str, Any]) -> AgentConfig:
    sections: dict[str, Any] = {}
    for name, section_type in SECTION_TYPES.items():
        fields = {s.field: values[s.key] for s in settings_of(section_type)}
        sections[name] = section_type(**fields)
    return AgentConfig(
        profiling=sections["profiling"],
        offcpu=sections["offcpu"],
        alloc=sections["alloc"],
        python=sections["python"],
        jvm=sections["jvm"],
        sampling=sections["sampling"],
        unwind=sections["unwind"],
        symbolize=sections["symbolize"],
        export=ExportConfig(files=sections["export.files"], otlp=sections["export.otlp"]),
        metrics=sections["metrics"],
        metadata=sections["metadata"],
        filters=sections["filters"],
        logging=sections["logging"],
    )


def as_dict(config: AgentConfig) -> dict[str, Any]:
    """The effective configuration as plain YAML-friendly data (for `profiling-agent config`)."""
    out: dict[str, Any] = {}
    for setting in SETTINGS:
        node: Any = config
        for part in setting.key.split("."):
            node = getattr(node, part)
        cursor = out
        *parents, leaf = setting.key.split(".")
        for parent in parents:
            cursor = cursor.setdefault(parent, {})
        cursor[leaf] = dict(node) if setting.key == "export.otlp.headers" else _plain(node)
    return out


def _plain(value: Any) -> Any:
    if value is None:
        return "auto"
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def example_yaml() -> str:
    """The documented example config: every key with its default, help and environment variable."""
    lines = [
        "# profiling-agent configuration. Every key is shown with its default.",
        "# Precedence: defaults < this file < environment (PROFILING_AGENT_*) < command-line flags.",
        "# Generated by `profiling-agent config --example` from the settings each stage declares; do not edit by hand.",
    ]
    defaults = as_dict(_assemble({s.key: s.default for s in SETTINGS}))  # auto settings show as "auto"
    _emit(defaults, "", 0, lines)
    return "\n".join(lines) + "\n"


def _emit(node: dict[str, Any], prefix: str, depth: int, lines: list[str]) -> None:
    indent = "  " * depth
    for name, value in node.items():
        key = f"{prefix}{name}"
        if key not in SETTINGS_BY_KEY:  # a section
            lines.append(f"{indent}{name}:")
            _emit(value, key + ".", depth + 1, lines)
            continue
        setting = SETTINGS_BY_KEY[key]
        flag = f", flag {setting.flag}" if setting.flag else ""
        lines.append(f"{indent}# {setting.help} (env {setting.env}{flag})")
        rendered = yaml.safe_dump({name: value}, default_flow_style=True, width=1000).strip()
        comment = "# " if setting.commented_in_example else ""
        lines.append(f"{indent}{comment}{rendered[1:-1]}")
