"""Export stage, OTLP sink: the `export.otlp` configuration section and its validation.

`OtlpConfig` is the one input the OTLP sink receives from `agent/config.py`. `validate()` fails fast
at start-up with a `ConfigError` naming the offending key, so a bad endpoint, an unreadable TLS file
or a malformed header never turns into a runtime crash in the sender thread.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from agent.errors import ConfigError

KEY_PREFIX = "export.otlp."
COMPRESSIONS = ("gzip", "none")

# gRPC metadata keys: lowercase ASCII letters, digits, '-', '_' and '.'. Keys starting with "grpc-"
# are reserved by gRPC itself; "-bin" keys carry bytes, which a text config cannot express.
_HEADER_KEY = re.compile(r"^[0-9a-z_.-]+$")
_HOST = re.compile(r"^[A-Za-z0-9_.-]+$")
# Printable ASCII, the only thing a non-binary gRPC metadata value may hold.
_HEADER_VALUE = re.compile(r"^[\x20-\x7e]*$")


@dataclass(frozen=True, slots=True)
class OtlpConfig:
    enabled: bool = False
    endpoint: str = "127.0.0.1:4317"  # host:port of an OTLP/gRPC receiver; "[v6addr]:port" for IPv6
    insecure: bool = False  # plaintext gRPC instead of TLS
    ca_file: str = ""  # PEM CA bundle; "" = the system roots
    cert_file: str = ""  # PEM client certificate for mutual TLS (needs key_file)
    key_file: str = ""
    headers: tuple[tuple[str, str], ...] = ()  # gRPC metadata sent with every call (keys lowercased)
    timeout_s: float = 10.0  # per-call deadline
    compression: str = "gzip"  # "gzip" or "none"
    spool_dir: str = "/var/lib/profiling-agent/spool"
    spool_max_bytes: int = 256 * 1024 * 1024
    queue_size: int = 64  # encoded requests kept in memory; the rest wait on disk
    retry_deadline_s: float = 300.0  # one deadline across all attempts of one request
    include_pprof: bool = False  # also carry the pprof bytes as `original_payload`
    service_name: str = ""  # resource `service.name`; "" = the process's executable name (else comm)

    def validate(self) -> None:
        """Raise `ConfigError("export.otlp.<key>", ...)` for the first invalid field."""
        parse_endpoint(self.endpoint)
        self._validate_tls()
        for key, value in self.headers:
            _validate_header(key, value)
        _positive_finite("timeout_s", self.timeout_s)
        _positive_finite("retry_deadline_s", self.retry_deadline_s)
        if self.compression not in COMPRESSIONS:
            raise ConfigError(KEY_PREFIX + "compression", f"must be one of {COMPRESSIONS}, not {self.compression!r}")
        if not self.spool_dir:
            raise ConfigError(KEY_PREFIX + "spool_dir", "must name a directory")
        if self.spool_max_bytes <= 0:
            raise ConfigError(KEY_PREFIX + "spool_max_bytes", f"must be > 0, not {self.spool_max_bytes}")
        if self.queue_size < 1:
            raise ConfigError(KEY_PREFIX + "queue_size", f"must be >= 1, not {self.queue_size}")

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
