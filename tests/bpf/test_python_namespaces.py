"""Process stage, privileged: the Python inspector on interpreters in their own pid and mount namespaces.

Each installed interpreter runs under `unshare -fpm --mount-proc` (root: new namespaces) with 20
waiting threads, so every thread state's `native_thread_id` is a tid of that namespace, not the host's.
The inspector (the agent's own discovery, through the host's /proc) must enable it through its TSS slot
(the pthread ids and TLS bases the slot search uses are namespace-free), map each thread state's tid
to a live host thread of the process through NSpid, and name its frames. One more runs an interpreter
from a path that exists only in its own mount namespace (a bind mount made there), which discovery must
open through /proc/PID/root. These need no BPF program: they are here because namespaces need root.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from agent.process.memory import ProcessMemory
from agent.process.pidns import task_ids
from agent.process.python import proc
from agent.process.python.code_cache import CodeCache
from agent.process.python.frames import walk_frames
from agent.process.python.inspect import PythonInspector
from agent.process.python.proc import PythonState
from agent.process.python.runtime import CodeResolver, discover_interpreter
from agent.process.python.threads import bound_threads, thread_map, walk_threads
from tests.support.interpreters import Interpreter, installed
from tests.support.python_codes import code_key_at
from tests.unit.python_children import CHILD

pytestmark = pytest.mark.bpf

INTERPRETERS = installed()
IDS = [i.label for i in INTERPRETERS]
THREADS = 20
UNSHARE = ("unshare", "-fpm", "--mount-proc")


@contextmanager
def namespaced(command: list[str], executable_name: str) -> Iterator[int]:
    """Run `command` (which prints "ready") under unshare; yield the host pid of its `executable_name`
    descendant."""
    process = subprocess.Popen([*UNSHARE, *command], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        found = [c for c in psutil.Process(process.pid).children(recursive=True) if c.name() == executable_name]
        assert len(found) == 1, found
        yield found[0].pid
    finally:
        process.kill()
        process.wait()


def _own_pid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[-1])


def _names(pid: int, inspector: PythonInspector) -> set[str]:
    """The qualnames of every thread's frames, read the way the pipeline resolves them."""
    result = inspector.get(pid)
    assert result is not None and result.layout is not None
    memory, resolver = ProcessMemory(pid), CodeResolver(CodeCache(256), inspector)
    names: set[str] = set()
    for thread in walk_threads(memory, result.layout, result.runtime_address):
        for frame in walk_frames(memory, result.layout, thread.address):
            code = None if frame.shim else resolver.resolve(pid, code_key_at(memory, result.layout, frame.code))
            if code is not None:
                names.add(code.qualname)
    return names


@pytest.mark.parametrize("interpreter", INTERPRETERS, ids=IDS)
def test_a_process_in_its_own_pid_namespace_is_enabled(interpreter: Interpreter) -> None:
    inspector = PythonInspector(discover_interpreter())
    command = [str(interpreter.executable), "-c", CHILD, str(THREADS)]
    with namespaced(command, interpreter.executable.name) as pid:
        assert _own_pid(pid) != pid  # the namespace is real: the process knows itself by another id
        result = inspector.inspect(pid)
        assert (result.state, result.reason) == (PythonState.ENABLED, ""), result
        assert result.spec is not None and result.spec.flags & proc.PYTHON_USE_TSS
        assert {"sleeper", "<module>"} <= _names(pid, inspector)
        assert result.layout is not None
        threads = walk_threads(ProcessMemory(pid), result.layout, result.runtime_address)
        assert len(thread_map(threads)) == THREADS + 1  # the thread map's keys (pthread ids): one per thread
        if interpreter.minor >= (3, 11):  # native_thread_id exists from 3.11
            tasks = task_ids(Path("/proc"), pid)
            hosts = {tasks.to_agent.get(t.native_thread_id) for t in bound_threads(threads)}
            assert hosts == {int(t) for t in os.listdir(f"/proc/{pid}/task")}, (hosts, dict(tasks.to_agent))
    assert sum(inspector.task_skips.values()) == 0


PYENV = [i for i in INTERPRETERS if i.label.startswith("pyenv-")]  # a whole installation to bind-mount


@pytest.mark.parametrize("interpreter", PYENV, ids=[i.label for i in PYENV])
def test_an_interpreter_only_in_its_mount_namespace_is_found(interpreter: Interpreter) -> None:
    """The interpreter's installation, bind-mounted at a directory empty on the host: the mapped files'
    paths name nothing outside the process's mount namespace (only /proc/PID/root opens them)."""
    install = interpreter.executable.parent.parent
    with tempfile.TemporaryDirectory(prefix="pyns-") as directory:
        inside = Path(directory)
        script = f'mount --bind "{install}" "{inside}" && exec "{inside}/bin/python3" -c "$0" 2'
        with namespaced(["sh", "-c", script, CHILD], "python3") as pid:
            assert not (inside / "bin").exists()
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert f" {inside}/" in maps, maps[:2000]
            inspector = PythonInspector(discover_interpreter())
            result = inspector.inspect(pid)
            assert (result.state, result.reason) == (PythonState.ENABLED, ""), result
            assert result.version == interpreter.minor
            assert "sleeper" in _names(pid, inspector)
