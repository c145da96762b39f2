"""Configuration declarations: every setting's key, default, environment variable, flag, help and validator.

This is the one table the loader (`agent.config`), the command line (`agent.cli`), the example config
(`config/agent.yaml`) and the docs are generated from, so a setting cannot be documented in one place
and behave differently in another. Environment variables are `PROFILING_AGENT_<KEY>` with dots as
underscores, e.g. `PROFILING_AGENT_PROFILING_FREQUENCY_HZ`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ENV_PREFIX = "PROFILING_AGENT_"
KNOWN_PROFILERS = ("cpu", "offcpu", "alloc")

# A parser turns a value from YAML (any type) or from a string (env, flag) into the typed value, or
# raises ValueError with a message that says what was expected.
Parser = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class Setting:
    key: str  # dotted path, e.g. "profiling.frequency_hz"
    default: Any
    parse: Parser
    help: str
    flag: str = ""  # command-line flag of `run`, if any
    expected: str = ""  # human description of valid values, used in error messages
    flag_is_switch: bool = False  # the flag takes no value and sets True
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


def stack_copy_bytes(value: Any) -> int:
    number = ranged_int(512, 32768)(value)
    if number % 512:
        raise ValueError(f"expected a multiple of 512 in [512, 32768], got {number}")
    return number


def choice(*options: str) -> Parser:
    def parse(value: Any) -> str:
        text = parse_str(value).strip().lower()
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return text

    return parse


def parse_headers(value: Any) -> tuple[tuple[str, str], ...]:
    """A YAML mapping {name: value}, or "name=value,name2=value2" from the environment."""
    if value is None:
        return ()
    if isinstance(value, dict):
        pairs = [(str(k), str(v)) for k, v in value.items()]
    elif isinstance(value, list | tuple) and all(isinstance(pair, list | tuple) and len(pair) == 2 for pair in value):
        pairs = [(str(k), str(v)) for k, v in value]
    elif isinstance(value, str):
        pairs = []
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            name, sep, text = item.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"expected name=value pairs separated by commas, got {item!r}")
            pairs.append((name.strip(), text.strip()))
    else:
        raise ValueError(f"expected a mapping of header names to values, got {value!r}")
    return tuple((name.lower(), text) for name, text in pairs)


def parse_profilers(value: Any) -> tuple[str, ...]:
    items = _as_list(value)
    names = tuple(dict.fromkeys(str(item).strip().lower() for item in items if str(item).strip()))
    if not names:
        raise ValueError("expected at least one profiler")
    unknown = [name for name in names if name not in KNOWN_PROFILERS]
    if unknown:
        raise ValueError(f"unknown profiler {unknown[0]!r}; known: {', '.join(KNOWN_PROFILERS)}")
    return names


def parse_patterns(value: Any) -> tuple[str, ...]:
    """Shell glob patterns: a YAML list, or a comma-separated string."""
    if value is None:
        return ()
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    patterns = tuple(str(item).strip() for item in items if str(item).strip())
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"expected glob patterns, got {pattern!r}")
    return patterns


def parse_address(value: Any) -> str:
    """host:port to listen on; the host must be given (0.0.0.0 only when asked for)."""
    text = parse_str(value).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:9464), got {value!r}")
    return text


def parse_pids(value: Any) -> tuple[int, ...]:
    pids = []
    for item in _as_list(value):
        text = str(item).strip()
        if not re.fullmatch(r"[1-9][0-9]{0,9}", text):
            raise ValueError(f"expected process ids (positive integers), got {item!r}")
        pids.append(int(text))
    return tuple(sorted(set(pids)))


def _as_list(value: Any) -> list[Any]:
    """Items of a YAML list, a comma/space separated string, or repeated flags that may each be one."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [part for item in value for part in _as_list(item)]
    if isinstance(value, str):
        return [part for part in re.split(r"[,\s]+", value) if part]
    return [value]


MiB = 1024 * 1024
SETTINGS: tuple[Setting, ...] = (
    # profiling: what the probes collect and how often the pipeline reports
    Setting("profiling.profilers", ("cpu",), parse_profilers, "Profilers to run, comma-separated.", "--profilers"),
    Setting("profiling.frequency_hz", 19, ranged_int(1, 1000), "CPU sampling frequency per CPU (Hz).", "--frequency"),
    Setting("profiling.interval_s", 10.0, ranged_float(1.0, 3600.0), "Reporting interval (s).", "--interval"),
    Setting(
        "profiling.duration_s",
        0.0,
        ranged_float(0.0, 1e9),
        "Stop after this long, counted from when sampling starts, then flush and exit 0 (0: run until stopped).",
        "--duration",
    ),
    Setting("profiling.pids", (), parse_pids, "Profile only these processes (repeatable flag).", "--pid"),
    Setting(
        "profiling.perf_buffer_pages",
        64,
        ranged_int(1, 4096),
        "Perf buffer size per CPU, in pages (rounded up to a power of two).",
    ),
    Setting(
        "profiling.queue_size",
        65536,
        ranged_int(1024, 1 << 24),
        "Records buffered between the perf-buffer reader and the pipeline; the oldest are dropped (and counted) "
        "when it is full.",
    ),
    # offcpu: time threads spend blocked (scheduled out), with the stack they blocked in
    Setting(
        "offcpu.min_block_us",
        1000,
        ranged_int(1, 60_000_000),
        "Blocks shorter than this are not reported (microseconds).",
    ),
    Setting(
        "offcpu.attach",
        "auto",
        choice("auto", "kprobe", "tracepoint"),
        "How to hook the scheduler: a kprobe on finish_task_switch where the kernel has kprobes, else the "
        "sched:sched_switch tracepoint (auto), or force one.",
    ),
    # alloc: bytes allocated through the C library, sampled in the kernel by bytes
    Setting(
        "alloc.sample_bytes",
        512 * 1024,
        ranged_int(1, 1 << 40),
        "Mean bytes between allocation samples (the starting point; the adaptive sampler adjusts it).",
    ),
    # sampling: the adaptive sampler keeps each event stream and the agent's own CPU within budget
    Setting(
        "sampling.max_events_per_s",
        2000,
        ranged_int(10, 10_000_000),
        "Budget of events per second per profiler (off-CPU, allocations) coming off the perf buffers.",
    ),
    Setting(
        "sampling.cpu_budget_percent",
        1.0,
        ranged_float(0.05, 100.0),
        "Budget of the agent's own CPU, in percent of one core; event rates are lowered to stay under it.",
    ),
    Setting(
        "sampling.adjust_interval_s",
        1.0,
        ranged_float(0.1, 60.0),
        "How often the sampler measures rates and adjusts the in-kernel sampling parameters.",
    ),
    # unwind: how user stacks are walked, per profiler
    Setting(
        "unwind.cpu",
        "auto",
        choice("auto", "dwarf", "fp"),
        "User stacks of the CPU profiler: fp walks frame pointers in the kernel (cheapest, small records; loses "
        "callers in code built without them, as most distributions build libc and python3); auto also copies "
        "the top of the user stack into each record and unwinds it with the binaries' .eh_frame CFI (frame "
        "pointers where no CFI exists), falling back to fp on kernels that cannot copy (< 5.15 or no BTF); "
        "dwarf is auto that refuses to start on such kernels.",
    ),
    Setting("unwind.offcpu", "auto", choice("auto", "dwarf", "fp"), "User stacks of the off-CPU profiler (see cpu)."),
    Setting(
        "unwind.alloc",
        "fp",
        choice("auto", "dwarf", "fp"),
        "User stacks of the allocation profiler (see cpu). fp by default: allocation samples come in bursts "
        "faster than the sampler reacts, and records with a stack copy are ~40 times larger, so a burst can "
        "overflow the perf buffers (counted as lost); the immediate caller is found either way.",
    ),
    Setting(
        "unwind.stack_bytes",
        8192,
        stack_copy_bytes,
        "Bytes of user stack copied per event for dwarf/auto unwinding (multiple of 512). Deeper callers are "
        "cut off and the stack is marked truncated.",
    ),
    # symbolize
    Setting("symbolize.elf_cache_size", 128, ranged_int(1, 100_000), "ELF symbol tables kept in memory."),
    Setting(
        "symbolize.process_ttl_intervals",
        6,
        ranged_int(1, 10_000),
        "Forget a process's captured mappings after this many intervals without samples.",
    ),
    Setting(
        "symbolize.jvm_perf_map",
        False,
        parse_bool,
        "Ask HotSpot JVMs (JDK 17+) whose JIT code shows up unnamed to write /tmp/perf-PID.map "
        "(jcmd PID Compiler.perfmap, sent through the attach socket): needs the agent to run as root or as "
        "the JVM's user; the JVM gets a SIGQUIT to start its attach listener, as with jcmd.",
    ),
    Setting(
        "symbolize.jvm_perf_map_interval_s",
        60.0,
        ranged_float(5.0, 86400.0),
        "Ask each JVM at most this often (the map covers only code compiled by then).",
    ),
    # export.files: the embedded default sink
    Setting(
        "export.files.enabled",
        None,
        parse_auto_bool,
        "Write gzipped pprof files locally: true, false or auto (on when OTLP export is off).",
        expected="true, false or auto",
    ),
    Setting(
        "export.files.output_dir",
        "/var/lib/profiling-agent/profiles",
        parse_str,
        "Directory for <profiler>-<UTC start>.pb.gz files.",
        "--output-dir",
    ),
    Setting(
        "export.files.max_files",
        1000,
        ranged_int(0, 10_000_000),
        "Keep at most this many profile files; oldest deleted first (0: no limit).",
    ),
    Setting(
        "export.files.max_bytes",
        1024 * MiB,
        ranged_int(0, 1 << 50),
        "Keep at most this many bytes of profile files; oldest deleted first (0: no limit).",
    ),
    # export.otlp: OTLP profiles over gRPC (opentelemetry-proto profiles/v1development, proto v1.10)
    Setting(
        "export.otlp.enabled",
        None,
        parse_auto_bool,
        "Send OTLP profiles: true, false or auto (on when an endpoint is configured).",
        expected="true, false or auto",
    ),
    Setting(
        "export.otlp.endpoint",
        "127.0.0.1:4317",
        parse_str,
        "OTLP/gRPC receiver as host:port; setting it turns OTLP export on (when enabled is auto).",
        "--otlp-endpoint",
        commented_in_example=True,
    ),
    Setting(
        "export.otlp.insecure",
        False,
        parse_bool,
        "Plaintext gRPC instead of TLS.",
        "--otlp-insecure",
        flag_is_switch=True,
    ),
    Setting("export.otlp.ca_file", "", parse_str, "PEM CA bundle for TLS (empty: the system roots)."),
    Setting("export.otlp.cert_file", "", parse_str, "PEM client certificate for mutual TLS (with key_file)."),
    Setting("export.otlp.key_file", "", parse_str, "PEM client key for mutual TLS."),
    Setting(
        "export.otlp.headers",
        (),
        parse_headers,
        "gRPC metadata sent with every request, e.g. an auth token (env: name=value,name2=value2).",
    ),
    Setting("export.otlp.timeout_s", 10.0, ranged_float(0.1, 600.0), "Per-request timeout (s)."),
    Setting("export.otlp.compression", "gzip", choice("gzip", "none"), "gzip or none."),
    Setting(
        "export.otlp.spool_dir",
        "/var/lib/profiling-agent/spool",
        parse_str,
        "Where requests wait while the receiver is unreachable; they survive restarts.",
    ),
    Setting(
        "export.otlp.spool_max_bytes",
        256 * MiB,
        ranged_int(1, 1 << 50),
        "Bound of the spool; the oldest requests are dropped (and counted) beyond it.",
    ),
    Setting("export.otlp.queue_size", 64, ranged_int(1, 100_000), "Requests kept in memory (the rest wait on disk)."),
    Setting(
        "export.otlp.retry_deadline_s",
        300.0,
        ranged_float(1.0, 86_400.0),
        "One deadline across all retries of one request before it waits in the spool for the next round.",
    ),
    Setting("export.otlp.include_pprof", False, parse_bool, "Also send the pprof bytes as original_payload."),
    Setting(
        "export.otlp.service_name",
        "",
        parse_str,
        "Resource service.name for every process (empty: the process's executable name).",
    ),
    # metrics and health
    Setting("metrics.enabled", True, parse_bool, "Serve Prometheus metrics, /healthz and /readyz."),
    Setting(
        "metrics.address",
        "127.0.0.1:9464",
        parse_address,
        "Address of the metrics and health server (use 0.0.0.0:9464 to expose it, e.g. in Kubernetes).",
        "--metrics-address",
    ),
    Setting(
        "metrics.ready_export_failure_s",
        300.0,
        ranged_float(1.0, 86_400.0),
        "/readyz fails once exports have been failing (or undelivered) for this long.",
    ),
    # metadata: labels and resource attributes
    Setting(
        "metadata.node_name",
        "",
        parse_str,
        "Kubernetes node name (k8s.node.name); the DaemonSet sets it from the downward API.",
        env_name="PROFILING_AGENT_NODE_NAME",
    ),
    # filters: which processes are profiled (shell globs; exclude wins; no include = everything)
    *(
        Setting(f"filters.{kind}_{what}", (), parse_patterns, f"{kind.capitalize()} processes whose {label} match.")
        for kind in ("include", "exclude")
        for what, label in (
            ("exe", "executable (a pattern with / matches the full path, else the file name)"),
            ("comm", "comm"),
            ("unit", "systemd unit"),
            ("cgroup", "cgroup path"),
        )
    ),
    # logging
    Setting("logging.level", "info", choice("debug", "info", "warning", "error"), "Log level.", "--log-level"),
    Setting("logging.format", "text", choice("text", "json"), "Log format: text or JSON lines.", "--log-format"),
)

SETTINGS_BY_KEY = {setting.key: setting for setting in SETTINGS}
