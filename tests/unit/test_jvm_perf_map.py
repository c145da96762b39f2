"""Asking JVMs for their perf map through HotSpot's attach socket (agent.symbolize.jvm)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from agent.symbolize.jvm import COMMAND, JvmPerfMapRequester, Outcome

JVM_MAPS = "7f0000000000-7f0000100000 r-xp 00000000 08:01 42 /usr/lib/jvm/java-17/lib/server/libjvm.so\n"


def fake_process(proc: Path, pid: int, maps: str = JVM_MAPS, nspid: int | None = None) -> Path:
    """<proc>/<pid> with maps, status (NSpid) and a root whose /tmp is a real directory; returns that /tmp."""
    directory = proc / str(pid)
    (directory / "root" / "tmp").mkdir(parents=True)
    (directory / "maps").write_text(maps)
    (directory / "status").write_text(f"Name:\tjava\nNSpid:\t{pid}\t{nspid or pid}\n")
    return directory / "root" / "tmp"


class AttachListener:
    """A stand-in for HotSpot's listener: accepts one connection, records the request, answers `reply`."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.received = b""
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(1)
        self._thread = threading.Thread(target=self._serve, args=(reply,), daemon=True)
        self._thread.start()

    def _serve(self, reply: bytes) -> None:
        connection, _ = self._server.accept()
        with connection:
            while len(self.received) < len(COMMAND):
                chunk = connection.recv(1024)
                if not chunk:
                    break
                self.received += chunk
            connection.sendall(reply)

    def close(self) -> None:
        self._thread.join(timeout=5)
        self._server.close()


def test_a_jvm_with_its_listener_running_is_asked_at_once(tmp_path: Path) -> None:
    """The socket exists: the command goes out in protocol 1 and a 0 reply counts as requested."""
    tmp = fake_process(tmp_path, 4242, nspid=7)
    listener = AttachListener(tmp / ".java_pid7", b"0\n")
    requester = JvmPerfMapRequester(60.0, proc_root=tmp_path)
    requester.tick([4242], now=100.0)
    listener.close()
    assert listener.received == b"1\x00jcmd\x00Compiler.perfmap\x00\x00\x00"
    assert requester.outcomes == {Outcome.REQUESTED: 1}


def test_an_error_reply_is_counted_as_failed(tmp_path: Path) -> None:
    tmp = fake_process(tmp_path, 4242)
    listener = AttachListener(tmp / ".java_pid4242", b"1\nUnknown diagnostic command\n")
    requester = JvmPerfMapRequester(60.0, proc_root=tmp_path)
    requester.tick([4242], now=100.0)
    listener.close()
    assert requester.outcomes == {Outcome.FAILED: 1}


def test_each_jvm_is_asked_at_most_once_per_interval(tmp_path: Path) -> None:
    tmp = fake_process(tmp_path, 4242)
    listener = AttachListener(tmp / ".java_pid4242", b"0\n")
    requester = JvmPerfMapRequester(60.0, proc_root=tmp_path)
    requester.tick([4242], now=100.0)
    listener.close()
    requester.tick([4242], now=159.0)  # too soon: not asked (the listener is gone, asking would count refused)
    assert requester.outcomes == {Outcome.REQUESTED: 1}
    requester.tick([4242], now=161.0)
    assert requester.outcomes == {Outcome.REQUESTED: 1, Outcome.REFUSED: 1}


def test_a_process_that_is_not_a_jvm_is_never_signalled(tmp_path: Path) -> None:
    """SIGQUIT would kill anything but a JVM: a process without libjvm.so is left alone."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        fake_process(tmp_path, child.pid, maps="00400000-00500000 r-xp 0 08:01 1 /usr/bin/python3\n")
        requester = JvmPerfMapRequester(60.0, proc_root=tmp_path)
        requester.tick([child.pid], now=100.0)
        assert child.poll() is None
        assert requester.outcomes == {}
    finally:
        child.kill()
        child.wait()


def test_a_jvm_that_opens_no_listener_is_given_up(tmp_path: Path) -> None:
    """Signalled (SIGQUIT) with the trigger file in its /tmp; no socket within the timeout: no_listener,
    and the trigger file is removed."""
    ignore = "import signal, time; signal.signal(signal.SIGQUIT, signal.SIG_IGN); print(1, flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", ignore], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline()  # SIGQUIT is ignored from here on
        tmp = fake_process(tmp_path, child.pid)
        requester = JvmPerfMapRequester(60.0, proc_root=tmp_path)
        requester.tick([child.pid], now=100.0)
        assert (tmp / f".attach_pid{child.pid}").exists()
        requester.tick([], now=105.0)
        assert requester.outcomes == {}
        requester.tick([], now=111.0)
        assert requester.outcomes == {Outcome.NO_LISTENER: 1}
        assert not (tmp / f".attach_pid{child.pid}").exists()
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_a_vanished_process_is_counted_gone(tmp_path: Path) -> None:
    requester = JvmPerfMapRequester(60.0, proc_root=tmp_path)
    fake_process(tmp_path, 999_999_9)
    (tmp_path / "9999999" / "status").unlink()
    requester.tick([9_999_999], now=1.0)
    assert requester.outcomes == {Outcome.GONE: 1}
    assert os.path.exists(tmp_path / "9999999")


def test_perf_map_store_reports_pids_with_unnamed_jit_code(tmp_path: Path) -> None:
    """What the daemon hands the requester: pids whose JIT addresses no perf map named, once each."""
    from agent.symbolize.perf_map import PerfMapStore
    from agent.symbolize.stats import SymbolizerStats

    fake_process(tmp_path, 4242)
    store = PerfMapStore(tmp_path, SymbolizerStats(), host_tmp=tmp_path / "host-tmp")
    assert store.lookup(4242, 0x7F0000001000) == ""
    assert store.take_unnamed() == {4242}
    assert store.take_unnamed() == set()
