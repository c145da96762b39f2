"""`export.otlp` validation: every bad value is a ConfigError naming its key, found at start-up."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.export.otlp.config import OtlpConfig, parse_endpoint
from agent.export.otlp.exporter import OtlpExporter
from agent.export.otlp.stats import Counters


def _error_key(config: OtlpConfig) -> str:
    with pytest.raises(ConfigError) as info:
        config.validate()
    return info.value.key


def test_defaults_are_valid() -> None:
    OtlpConfig().validate()
    assert OtlpConfig().endpoint == "127.0.0.1:4317" and OtlpConfig().spool_max_bytes == 256 * 1024 * 1024


@pytest.mark.parametrize(
    "endpoint", ["nohost", "host:port", "host:99999", "", ":4317", "host:0", "http://h:4317", "a b:1"]
)
def test_bad_endpoints(endpoint: str) -> None:
    assert _error_key(OtlpConfig(endpoint=endpoint)) == "export.otlp.endpoint"


@pytest.mark.parametrize(
    ("endpoint", "parsed"),
    [
        ("collector.example:4317", ("collector.example", 4317)),
        ("[::1]:4317", ("[::1]", 4317)),
        ("10.0.0.1:1", ("10.0.0.1", 1)),
    ],
)
def test_good_endpoints(endpoint: str, parsed: tuple[str, int]) -> None:
    assert parse_endpoint(endpoint) == parsed


def test_unreadable_ca_file(tmp_path: Path) -> None:
    config = OtlpConfig(ca_file=str(tmp_path / "missing-ca.pem"))
    with pytest.raises(ConfigError) as info:
        config.validate()
    assert info.value.key == "export.otlp.ca_file" and "missing-ca.pem" in str(info.value)
    # the exporter reads the file itself too, with the same error rather than a crash
    with pytest.raises(ConfigError, match=r"export\.otlp\.ca_file"):
        OtlpExporter(config, Counters())


def test_empty_ca_file_and_lonely_client_cert(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    assert _error_key(OtlpConfig(ca_file=str(empty))) == "export.otlp.ca_file"
    cert = tmp_path / "cert.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    assert _error_key(OtlpConfig(cert_file=str(cert))) == "export.otlp.key_file"
    assert _error_key(OtlpConfig(cert_file=str(cert), key_file=str(tmp_path / "no.key"))) == "export.otlp.key_file"


def test_tls_files_conflict_with_insecure(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert _error_key(OtlpConfig(insecure=True, ca_file=str(ca))) == "export.otlp.ca_file"


@pytest.mark.parametrize(
    "header",
    [
        ("bad header", "v"),
        ("", "v"),
        ("grpc-timeout", "1S"),
        ("token-bin", "x"),
        ("x-ok", "line\nbreak"),
        ("ключ", "v"),
    ],
)
def test_bad_headers(header: tuple[str, str]) -> None:
    assert _error_key(OtlpConfig(headers=(header,))) == "export.otlp.headers"


def test_good_headers_any_case() -> None:
    OtlpConfig(headers=(("Authorization", "Bearer abc.def"), ("X-Scope-OrgID", "tenant-1"))).validate()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("timeout_s", 0.0),
        ("timeout_s", float("nan")),
        ("retry_deadline_s", -1.0),
        ("compression", "zstd"),
        ("spool_dir", ""),
        ("spool_max_bytes", 0),
        ("queue_size", 0),
    ],
)
def test_bad_scalars(field: str, value: object) -> None:
    assert _error_key(OtlpConfig(**{field: value})) == f"export.otlp.{field}"  # type: ignore[arg-type]


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate and its key, made by openssl (deploy/host/setup.sh installs it)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
            *("-days", "1", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_tls_files_are_checked_as_tls_will_use_them(tmp_path: Path) -> None:
    """gRPC reads them only when it connects: a bad file was accepted, then retried for ever while
    /readyz stayed 200."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError) as info:
        OtlpConfig(ca_file=str(garbage)).validate()
    assert info.value.key == "export.otlp.ca_file" and "holds no usable PEM certificate" in info.value.message
    ours, our_key = _self_signed(tmp_path, "ours")
    theirs, their_key = _self_signed(tmp_path, "theirs")
    OtlpConfig(ca_file=str(theirs), cert_file=str(ours), key_file=str(our_key)).validate()
    with pytest.raises(ConfigError) as info:
        OtlpConfig(cert_file=str(ours), key_file=str(their_key)).validate()  # a key that is not its own
    assert info.value.key == "export.otlp.cert_file" and "not a PEM certificate and its key" in info.value.message
