"""Symbolize stage: asks HotSpot JVMs to write their perf map (`jcmd PID Compiler.perfmap`, JDK 17+).

A JVM names its compiled Java methods in `/tmp/perf-PID.map` only when asked, and only for code
compiled so far. With `symbolize.jvm_perf_map` on, every JVM whose JIT code came up unnamed is asked
again, at most once per `symbolize.jvm_perf_map_interval_s`, through HotSpot's attach mechanism,
as jcmd does but without starting a second JVM (jcmd costs ~100 MB and a second of CPU each time):

1. unless its attach socket (`/tmp/.java_pid<nspid>`) exists, create `/tmp/.attach_pid<nspid>` and
   send SIGQUIT, which makes the JVM start its attach listener and create the socket;
2. on a later tick, connect, send the command in protocol 1 (`1\\0jcmd\\0Compiler.perfmap\\0\\0\\0`)
   and read the result code.

Paths go through `/proc/PID/root` with the namespace pid, so JVMs in containers work. A process is
only signalled when it maps libjvm.so: SIGQUIT would kill anything else. HotSpot accepts the
connection from its own user or root only; a JVM started with -XX:+DisableAttachMechanism prints a
thread dump on SIGQUIT instead (which is what jcmd causes too). `tick` never blocks for more than
the socket timeout: it runs on the daemon's main thread, between sampler adjustments.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from agent.symbolize.perf_map import read_nspid

logger = logging.getLogger(__name__)

LISTENER_TIMEOUT_S = 10.0  # how long a signalled JVM gets to open its attach socket
SOCKET_TIMEOUT_S = 2.0
COMMAND = b"1\0jcmd\0Compiler.perfmap\0\0\0"


class Outcome(enum.StrEnum):
    REQUESTED = "requested"  # the JVM answered 0: the map is written
    FAILED = "failed"  # it answered with an error (older JDKs do not know Compiler.perfmap)
    NO_LISTENER = "no_listener"  # signalled, but no attach socket appeared in time
    REFUSED = "refused"  # the socket would not take the request (another user's JVM, a dying JVM)
    GONE = "gone"  # the process exited


@dataclass(slots=True)
class _Pending:
    nspid: int
    signalled_at: float
    trigger: Path


class JvmPerfMapRequester:
    def __init__(self, interval_s: float, proc_root: Path = Path("/proc")) -> None:
        self._interval_s = interval_s
        self._proc_root = proc_root
        self._last_request: dict[int, float] = {}  # pid -> when it was last asked (or found not a JVM)
        self._pending: dict[int, _Pending] = {}  # signalled, waiting for the attach socket
        self.outcomes: Counter[str] = Counter()

    def tick(self, unnamed_pids: Iterable[int], now: float | None = None) -> None:
        """Ask the JVMs among `unnamed_pids` for their perf map, and finish the requests under way."""
        now = time.monotonic() if now is None else now
        for pid in [pid for pid, when in self._last_request.items() if now - when >= self._interval_s]:
            del self._last_request[pid]  # may be asked again: no need to remember it (bounds the dict)
        for pid in list(self._pending):
            self._continue(pid, now)
        for pid in unnamed_pids:
            if pid in self._pending or pid in self._last_request:
                continue
            self._last_request[pid] = now
            if self._is_jvm(pid):
                self._start(pid, now)

    def _is_jvm(self, pid: int) -> bool:
        try:
            with open(self._proc_root / str(pid) / "maps", encoding="utf-8", errors="replace") as f:
                return any(line.rstrip().endswith("/libjvm.so") for line in f)
        except OSError:
            return False

    def _tmp(self, pid: int) -> Path:
        return self._proc_root / str(pid) / "root" / "tmp"

    def _start(self, pid: int, now: float) -> None:
        nspid = read_nspid(self._proc_root, pid)
        if nspid is None:
            self.outcomes[Outcome.GONE] += 1
            return
        if (self._tmp(pid) / f".java_pid{nspid}").exists():
            self._send(pid, nspid)  # its listener is already running
            return
        trigger = self._tmp(pid) / f".attach_pid{nspid}"
        try:
            trigger.touch()
            os.kill(pid, signal.SIGQUIT)
        except ProcessLookupError:
            self.outcomes[Outcome.GONE] += 1
            trigger.unlink(missing_ok=True)
            return
        except OSError as e:
            logger.debug("cannot signal JVM %d to start its attach listener: %s", pid, e)
            self.outcomes[Outcome.REFUSED] += 1
            trigger.unlink(missing_ok=True)
            return
        self._pending[pid] = _Pending(nspid, now, trigger)

    def _continue(self, pid: int, now: float) -> None:
        pending = self._pending[pid]
        if (self._tmp(pid) / f".java_pid{pending.nspid}").exists():
            del self._pending[pid]
            pending.trigger.unlink(missing_ok=True)
            self._send(pid, pending.nspid)
        elif now - pending.signalled_at >= LISTENER_TIMEOUT_S:
            del self._pending[pid]
            pending.trigger.unlink(missing_ok=True)
            self.outcomes[Outcome.NO_LISTENER] += 1
            logger.info("JVM %d opened no attach socket within %.0f s (attach disabled?)", pid, LISTENER_TIMEOUT_S)

    def _send(self, pid: int, nspid: int) -> None:
        path = self._tmp(pid) / f".java_pid{nspid}"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(SOCKET_TIMEOUT_S)
                s.connect(str(path))
                s.sendall(COMMAND)
                reply = _read_reply(s)
        except OSError as e:
            logger.debug("JVM %d refused the perf map request: %s", pid, e)
            self.outcomes[Outcome.REFUSED] += 1
            return
        code, _, text = reply.partition(b"\n")
        if code.strip() == b"0":
            self.outcomes[Outcome.REQUESTED] += 1
            logger.debug("JVM %d is writing its perf map", pid)
        else:
            self.outcomes[Outcome.FAILED] += 1
            logger.info("JVM %d could not write its perf map: %s", pid, text.decode(errors="replace").strip()[:200])


def _read_reply(s: socket.socket, limit: int = 65536) -> bytes:
    chunks, size = [], 0
    while size < limit:
        chunk = s.recv(4096)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
