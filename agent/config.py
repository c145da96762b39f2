"""Configuration: typed, frozen sections loaded from defaults < YAML file < environment < flags.

Owns reading the config file and `os.environ` (nothing else in the agent reads either) and turning
the declarations in `agent.settings` into one `AgentConfig`. Each stage receives only its section.
Every problem is a `ConfigError` naming the key path, raised before anything touches the kernel.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.errors import ConfigError
from agent.export.otlp.config import OtlpConfig
from agent.metadata.filters import ProcessFilter
from agent.settings import SETTINGS, SETTINGS_BY_KEY, Setting


@dataclass(frozen=True, slots=True)
class ProfilingConfig:
    profilers: tuple[str, ...]
    frequency_hz: int
    interval_s: float
    duration_s: float
    pids: tuple[int, ...]
    perf_buffer_pages: int
    queue_size: int


@dataclass(frozen=True, slots=True)
class OffCpuConfig:
    min_block_us: int
    attach: str  # auto | kprobe | tracepoint


@dataclass(frozen=True, slots=True)
class AllocConfig:
    sample_bytes: int


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    max_events_per_s: int
    cpu_budget_percent: float
    adjust_interval_s: float


@dataclass(frozen=True, slots=True)
class UnwindConfig:
    cpu: str  # auto | dwarf | fp
    offcpu: str
    alloc: str
    stack_bytes: int

    def copy_bytes(self, profiler: str) -> int:
        """User stack bytes the profiler's BPF program copies per event (0: frame pointers only)."""
        return 0 if getattr(self, profiler, "fp") == "fp" else self.stack_bytes


@dataclass(frozen=True, slots=True)
class SymbolizeConfig:
    elf_cache_size: int
    process_ttl_intervals: int
    jvm_perf_map: bool
    jvm_perf_map_interval_s: float


@dataclass(frozen=True, slots=True)
class FilesConfig:
    enabled: bool | None  # None: auto
    output_dir: str
    max_files: int
    max_bytes: int


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool
    address: str
    ready_export_failure_s: float


@dataclass(frozen=True, slots=True)
class MetadataConfig:
    node_name: str


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str
    format: str


@dataclass(frozen=True, slots=True)
class ExportConfig:
    files: FilesConfig
    otlp: OtlpConfig  # `enabled` already resolved: auto means "an endpoint was configured"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    profiling: ProfilingConfig
    offcpu: OffCpuConfig
    alloc: AllocConfig
    sampling: SamplingConfig
    unwind: UnwindConfig
    symbolize: SymbolizeConfig
    export: ExportConfig
    metrics: MetricsConfig
    metadata: MetadataConfig
    filters: ProcessFilter
    logging: LoggingConfig
    # systemd's NOTIFY_SOCKET (not a setting: the service manager sets it); "" outside systemd.
    notify_socket: str = ""

    @property
    def files_enabled(self) -> bool:
        """Local files are the embedded default: on unless configured off, or auto with OTLP on."""
        enabled = self.export.files.enabled
        return not self.export.otlp.enabled if enabled is None else enabled


SECTION_TYPES: dict[str, type] = {
    "profiling": ProfilingConfig,
    "offcpu": OffCpuConfig,
    "alloc": AllocConfig,
    "sampling": SamplingConfig,
    "unwind": UnwindConfig,
    "symbolize": SymbolizeConfig,
    "export.files": FilesConfig,
    "export.otlp": OtlpConfig,
    "metrics": MetricsConfig,
    "metadata": MetadataConfig,
    "filters": ProcessFilter,
    "logging": LoggingConfig,
}
SECTIONS = frozenset(SECTION_TYPES) | {"export"}


def load_config(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Build the effective configuration; `overrides` are command-line values keyed by setting key."""
    values: dict[str, Any] = {setting.key: setting.default for setting in SETTINGS}
    explicit: set[str] = set()  # keys set by the file, the environment or a flag
    if path:
        from_file = _read_file(Path(path))
        values.update(from_file)
        explicit.update(from_file)
    env = os.environ if environ is None else environ
    for setting in SETTINGS:
        if setting.env in env:
            values[setting.key] = _parse(setting, env[setting.env], f"environment variable {setting.env}")
            explicit.add(setting.key)
    for key, value in (overrides or {}).items():
        setting = SETTINGS_BY_KEY[key]
        values[key] = _parse(setting, value, f"flag {setting.flag}" if setting.flag else "")
        explicit.add(key)
    if values["export.otlp.enabled"] is None:
        values["export.otlp.enabled"] = "export.otlp.endpoint" in explicit
    config = dataclasses.replace(_assemble(values), notify_socket=env.get("NOTIFY_SOCKET", ""))
    if config.export.otlp.enabled:
        config.export.otlp.validate()  # reads the TLS files: only when they will be used
    return config


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("", f"cannot read config file {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError("", f"config file {path} is not UTF-8 text: {e}") from e
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("", f"config file {path} is not valid YAML: {e}") from e
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError("", f"config file {path} must be a mapping of sections, got {type(document).__name__}")
    values: dict[str, Any] = {}
    _flatten(document, "", values)
    return {key: _parse(SETTINGS_BY_KEY[key], value, f"in {path}") for key, value in values.items()}


def _flatten(node: dict[Any, Any], prefix: str, out: dict[str, Any]) -> None:
    for raw_key, value in node.items():
        key = f"{prefix}{raw_key}"
        if key in SETTINGS_BY_KEY:
            out[key] = value
        elif key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(key, f"expected a mapping (a section), got {value!r}")
            _flatten(value, key + ".", out)
        else:
            raise ConfigError(key, f"unknown key{_did_you_mean(key)}")


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
        fields = {f.name: values[f"{name}.{f.name}"] for f in dataclasses.fields(section_type) if f.init}
        sections[name] = section_type(**fields)
    return AgentConfig(
        profiling=sections["profiling"],
        offcpu=sections["offcpu"],
        alloc=sections["alloc"],
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
        "# Generated from agent/settings.py by `profiling-agent config --example`; do not edit by hand.",
    ]
    defaults = as_dict(_assemble({s.key: s.default for s in SETTINGS}))
    defaults["export"]["otlp"]["enabled"] = "auto"  # the declared default, before it is resolved
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
