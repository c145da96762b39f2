"""Export stage, OTLP sink: the `export.otlp` configuration section and its validation.

`OtlpConfig` is the one input the OTLP sink receives; each field is declared here once, as a setting
(see `agent.settings`), and `agent.config` loads it. `problems()` lists every invalid field at start-up as
a `ConfigError` naming its key (`validate()` raises them together), so a bad endpoint, an unreadable TLS
file or a malformed header never turns into a runtime crash in the sender thread.
"""

from __future__ import annotations

import math
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

from agent.errors import ConfigError, raise_all
from agent.settings import MiB, choice, parse_auto_bool, parse_bool, parse_str, ranged_float, ranged_int, setting

KEY_PREFIX = "export.otlp."
COMPRESSIONS = ("gzip", "none")

# gRPC metadata keys: lowercase ASCII letters, digits, '-', '_' and '.'. Keys starting with "grpc-"
# are reserved by gRPC itself; "-bin" keys carry bytes, which a text config cannot express.
_HEADER_KEY = re.compile(r"^[0-9a-z_.-]+$")
_HOST = re.compile(r"^[A-Za-z0-9_.-]+$")
# Printable ASCII, the only thing a non-binary gRPC metadata value may hold.
_HEADER_VALUE = re.compile(r"^[\x20-\x7e]*$")


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


@dataclass(frozen=True, slots=True)
class OtlpConfig:
    """OTLP profiles over gRPC (opentelemetry-proto profiles/v1development, proto v1.10)."""

    SECTION: ClassVar[str] = "export.otlp"

    # None (auto) until the loader resolves it: on when an endpoint was configured.
    enabled: bool | None = setting(
        None,
        parse_auto_bool,
        "Send OTLP profiles: true, false or auto (on when an endpoint is configured).",
        expected="true, false or auto",
    )
    endpoint: str = setting(  # "[v6addr]:port" for IPv6
        "127.0.0.1:4317",
        parse_str,
        "OTLP/gRPC receiver as host:port; setting it turns OTLP export on (when enabled is auto).",
        "--otlp-endpoint",
        commented_in_example=True,
    )
    insecure: bool = setting(
        False, parse_bool, "Plaintext gRPC instead of TLS.", "--otlp-insecure", flag_is_switch=True
    )
    ca_file: str = setting("", parse_str, "PEM CA bundle for TLS (empty: the system roots).")
    cert_file: str = setting("", parse_str, "PEM client certificate for mutual TLS (with key_file).")
    key_file: str = setting("", parse_str, "PEM client key for mutual TLS.")
    headers: tuple[tuple[str, str], ...] = setting(  # keys lowercased
        (),
        parse_headers,
        "gRPC metadata sent with every request, e.g. an auth token (env: name=value,name2=value2).",
    )
    timeout_s: float = setting(10.0, ranged_float(0.1, 600.0), "Per-request timeout (s).")
    compression: str = setting("gzip", choice(*COMPRESSIONS), "gzip or none.")
    spool_dir: str = setting(
        "/var/lib/profiling-agent/spool",
        parse_str,
        "Where requests wait while the receiver is unreachable; they survive restarts.",
    )
    spool_max_bytes: int = setting(
        256 * MiB,
        ranged_int(1, 1 << 50),
        "Bound of the spool; the oldest requests are dropped (and counted) beyond it.",
    )
    queue_size: int = setting(64, ranged_int(1, 100_000), "Requests kept in memory (the rest wait on disk).")
    retry_deadline_s: float = setting(
        300.0,
        ranged_float(1.0, 86_400.0),
        "One deadline across all retries of one request before it waits in the spool for the next round.",
    )
    include_pprof: bool = setting(False, parse_bool, "Also send the pprof bytes as original_payload.")
    service_name: str = setting(
        "",
        parse_str,
        "Resource service.name for every process (empty: the process's executable name).",
    )

    def validate(self) -> None:
        """Raise every invalid field's `ConfigError("export.otlp.<key>", ...)` at once."""
        raise_all(self.problems())

    def problems(self) -> list[ConfigError]:
        """One `ConfigError` per problem (TLS files are read: call it only when they will be used)."""
        checks: list[Callable[[], object]] = [
            partial(parse_endpoint, self.endpoint),
            self._validate_tls,
            *(partial(_validate_header, key, value) for key, value in self.headers),
            partial(_positive_finite, "timeout_s", self.timeout_s),
            partial(_positive_finite, "retry_deadline_s", self.retry_deadline_s),
            self._validate_bounds,
        ]
        found: list[ConfigError] = []
        for check in checks:
            try:
                check()
            except ConfigError as e:
                found.extend(e.problems)
        return found

    def _validate_bounds(self) -> None:
        problems: list[ConfigError] = []
        if self.compression not in COMPRESSIONS:
            problems.append(
                ConfigError(KEY_PREFIX + "compression", f"must be one of {COMPRESSIONS}, not {self.compression!r}")
            )
        if not self.spool_dir:
            problems.append(ConfigError(KEY_PREFIX + "spool_dir", "must name a directory"))
        if self.spool_max_bytes <= 0:
            problems.append(ConfigError(KEY_PREFIX + "spool_max_bytes", f"must be > 0, not {self.spool_max_bytes}"))
        if self.queue_size < 1:
            problems.append(ConfigError(KEY_PREFIX + "queue_size", f"must be >= 1, not {self.queue_size}"))
        raise_all(problems)

    def _validate_tls(self) -> None:
        tls_files = {"ca_file": self.ca_file, "cert_file": self.cert_file, "key_file": self.key_file}
        if self.insecure:
            for key, path in tls_files.items():
                if path:
                    raise ConfigError(KEY_PREFIX + key, "cannot be combined with insecure = true")
            return
        if bool(self.cert_file) != bool(self.key_file):
            missing = "key_file" if self.cert_file else "cert_file"
            raise ConfigError(KEY_PREFIX + missing, "cert_file and key_file must be given together")
        for key, path in tls_files.items():
            if path:
                read_pem(key, path)
        # gRPC parses the files only when it connects, and then retries for ever with /readyz still
        # 200: check them as TLS would use them, now (the stdlib's OpenSSL reads the same PEM).
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.ca_file:
            try:
                context.load_verify_locations(cafile=self.ca_file)
            except (ssl.SSLError, ValueError) as e:
                detail = f"{self.ca_file!r} holds no usable PEM certificate: {e}"
                raise ConfigError(KEY_PREFIX + "ca_file", detail) from e
        if self.cert_file:
            try:
                # An encrypted key would make OpenSSL prompt on the terminal; gRPC takes none anyway.
                context.load_cert_chain(self.cert_file, self.key_file, password=lambda: b"")
            except ssl.SSLError as e:
                detail = f"{self.cert_file!r} and {self.key_file!r} are not a PEM certificate and its key: {e}"
                raise ConfigError(KEY_PREFIX + "cert_file", detail) from e


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split "host:port" (or "[v6]:port") into its parts, or raise a ConfigError naming the key."""
    key = KEY_PREFIX + "endpoint"
    if "://" in endpoint:
        raise ConfigError(key, f"expected host:port without a scheme, got {endpoint!r}")
    host, sep, port_text = endpoint.rpartition(":")
    if not sep or not host:
        raise ConfigError(key, f"expected host:port, got {endpoint!r}")
    if host.startswith("[") and host.endswith("]"):
        valid_host = len(host) > 2 and all(c in "0123456789abcdefABCDEF:." for c in host[1:-1])
    else:
        valid_host = bool(_HOST.match(host))
    if not valid_host:
        raise ConfigError(key, f"invalid host {host!r} in {endpoint!r}")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(key, f"port must be a number in 1..65535, got {port_text!r} in {endpoint!r}")
    return host, int(port_text)


def read_pem(key: str, path: str) -> bytes:
    """Read a TLS file, turning any failure into a ConfigError that names `export.otlp.<key>`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(KEY_PREFIX + key, f"cannot read {path!r}: {e.strerror or e}") from e
    if not data.strip():
        raise ConfigError(KEY_PREFIX + key, f"{path!r} is empty")
    return data


def _validate_header(key: str, value: str) -> None:
    name = key.lower()
    if not _HEADER_KEY.match(name):
        raise ConfigError(KEY_PREFIX + "headers", f"invalid header name {key!r}: use letters, digits, '-', '_', '.'")
    if name.startswith("grpc-") or name.endswith("-bin"):
        raise ConfigError(KEY_PREFIX + "headers", f"header name {key!r} is reserved by gRPC or binary-valued")
    if not _HEADER_VALUE.match(value):
        raise ConfigError(KEY_PREFIX + "headers", f"value of header {key!r} must be printable ASCII")


def _positive_finite(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(KEY_PREFIX + key, f"must be a positive number of seconds, not {value!r}")
