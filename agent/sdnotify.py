"""Daemon support: systemd's readiness protocol (sd_notify), without libsystemd.

This module owns `notify` and `Notifier`. The daemon sends READY=1 once the probes are attached, STATUS=
lines as things change, STOPPING=1 when shutdown begins and, with WatchdogSec=, WATCHDOG=1 keep-alives.
The socket path is handed in by the config loader (`agent.config`), which reads NOTIFY_SOCKET: without it (not run by
systemd, or Type= other than notify) every call is a no-op returning False. A leading `@` names a
Linux abstract socket, spelled with a leading NUL on the wire. A failure to notify is logged at debug
level and never raised: systemd's bookkeeping must not stop the profiler.
"""

from __future__ import annotations

import logging
import socket

logger = logging.getLogger(__name__)


def _address(socket_path: str) -> str | None:
    if socket_path.startswith("@"):
        return "\0" + socket_path[1:]
    if socket_path.startswith("/"):
        return socket_path
    # Other forms (systemd >= 254's vsock:CID:PORT) are not used for a host service; say why nothing is sent.
    return None


def notify(message: str, *, socket_path: str | None) -> bool:
    """Send one datagram of newline-separated `KEY=value` assignments; True when it was sent."""
    if not socket_path:
        return False
    address = _address(socket_path)
    if address is None:
        logger.debug("NOTIFY_SOCKET %r is neither a path nor an abstract socket; not notifying", socket_path)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as e:
        logger.debug("sd_notify %r to %r failed: %s", message, socket_path, e)
        return False
    return True


class Notifier:
    """The four messages the daemon sends, bound to one socket path (None: a no-op notifier)."""

    def __init__(self, socket_path: str | None) -> None:
        self.socket_path = socket_path or None

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    def ready(self) -> bool:
        return notify("READY=1", socket_path=self.socket_path)

    def status(self, text: str) -> bool:
        # A newline would start a new assignment inside the datagram; STATUS= is one line.
        return notify("STATUS=" + " ".join(text.splitlines()), socket_path=self.socket_path)

    def stopping(self) -> bool:
        return notify("STOPPING=1", socket_path=self.socket_path)

    def watchdog(self) -> bool:
        return notify("WATCHDOG=1", socket_path=self.socket_path)
