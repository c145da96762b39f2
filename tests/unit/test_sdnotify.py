"""Tests for sd_notify (`agent.sdnotify`) against real AF_UNIX datagram sockets, by path and abstract."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sdnotify import Notifier, notify


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing for systemd, and the NOTIFY_SOCKET value that reaches it."""
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer, so use a short directory.
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        path = str(Path(directory) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(2.0)
            yield sock, path


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, str]]:
    name = f"profiling-agent-test-{os.getpid()}-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        yield sock, "@" + name


def nothing_received(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    return False


def test_notify_sends_one_datagram_to_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    assert notify("READY=1\nSTATUS=profiling", socket_path=path)
    assert sock.recv(4096) == b"READY=1\nSTATUS=profiling"


def test_leading_at_sign_means_an_abstract_socket(abstract_listener: tuple[socket.socket, str]) -> None:
    sock, address = abstract_listener
    assert notify("READY=1", socket_path=address)
    assert sock.recv(4096) == b"READY=1"


def test_notifier_sends_the_daemon_messages_in_order(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier(path)
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.status("profiling: cpu at 19 Hz\nsecond line")
    assert notifier.watchdog()
    assert notifier.stopping()
    received = [sock.recv(4096) for _ in range(4)]
    assert received == [b"READY=1", b"STATUS=profiling: cpu at 19 Hz second line", b"WATCHDOG=1", b"STOPPING=1"]


def test_abstract_notifier(abstract_listener: tuple[socket.socket, str]) -> None:
    sock, address = abstract_listener
    assert Notifier(address).stopping()
    assert sock.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize("socket_path", [None, ""], ids=["unset", "empty"])
def test_without_notify_socket_nothing_is_sent(socket_path: str | None, listener: tuple[socket.socket, str]) -> None:
    sock, _ = listener
    notifier = Notifier(socket_path)
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notify("READY=1", socket_path=socket_path)
    assert nothing_received(sock)


def test_missing_socket_is_logged_at_debug_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent.sdnotify")
    assert not notify("READY=1", socket_path=str(tmp_path / "gone"))
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]
    assert "READY=1" in caplog.records[0].getMessage()


def test_socket_that_is_not_a_datagram_socket_fails_quietly() -> None:
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        path = str(Path(directory) / "stream")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:
            stream.bind(path)
            stream.listen()
            assert not notify("READY=1", socket_path=path)


@pytest.mark.parametrize("socket_path", ["relative/notify", "vsock:2:1234"])
def test_addresses_that_are_neither_paths_nor_abstract_are_refused(socket_path: str) -> None:
    assert not notify("READY=1", socket_path=socket_path)
