"""Process stage: a process's thread ids in its own pid namespace mapped to the agent's (`agent.process.pidns`),
over fake /proc trees (status files as the kernel writes them), and the inspector's use of the mapping
on a real child interpreter whose thread ids a fake /proc says are namespaced.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from agent.process.memory import ProcessMemory
from agent.process.pidns import MALFORMED, NO_NSPID, UNREADABLE, VANISHED, parse_nspid, task_ids
from agent.process.python.inspect import PythonInspector
from agent.process.python.proc import PythonState
from agent.process.python.runtime import discover_interpreter
from tests.support.interpreters import installed
from tests.unit.python_children import child

PID = 4000


def status_text(tid: int, nspid: tuple[int, ...] | None, tgid: int = PID) -> str:
    """A task's status file as a 6.x kernel writes it (no NSpid line: as before 4.1)."""
    lines = [f"Name:\tpython3\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{tgid}\nNgid:\t0\nPid:\t{tid}\nPPid:\t1"]
    if nspid is not None:
        lines.append("NStgid:\t" + "\t".join(map(str, (tgid,) * len(nspid))))
        lines.append("NSpid:\t" + "\t".join(map(str, nspid)))
    lines.append("VmPeak:\t  10000 kB\nThreads:\t2")
    return "\n".join(lines) + "\n"


def fake_tasks(root: Path, tasks: dict[int, str | None], pid: int = PID) -> Path:
    """<root>/<pid>/task/<tid>/status for each tid (None: the directory without its status file)."""
    for tid, text in tasks.items():
        directory = root / str(pid) / "task" / str(tid)
        directory.mkdir(parents=True)
        if text is not None:
            (directory / "status").write_text(text)
    return root


def test_parse_nspid_one_and_several_levels() -> None:
    assert parse_nspid(status_text(PID, (PID,))) == (PID,)
    assert parse_nspid(status_text(PID, (PID, 17))) == (PID, 17)
    assert parse_nspid(status_text(PID, (PID, 300, 17, 1))) == (PID, 300, 17, 1)


def test_parse_nspid_without_the_line_is_none() -> None:
    assert parse_nspid(status_text(PID, None)) is None
    assert parse_nspid("") is None


@pytest.mark.parametrize("line", ["NSpid:\n", "NSpid:\t4000\tx\n", "NSpid:\t4000\t-1\n", "NSpid:\t0\n"])
def test_parse_nspid_malformed_raises(line: str) -> None:
    with pytest.raises(ValueError):
        parse_nspid("Name:\tpython3\n" + line)


def test_namespaced_tasks_map_innermost_to_listed(tmp_path: Path) -> None:
    root = fake_tasks(tmp_path, {PID: status_text(PID, (PID, 1)), PID + 5: status_text(PID + 5, (PID + 5, 7))})
    tasks = task_ids(root, PID)
    assert dict(tasks.to_agent) == {1: PID, 7: PID + 5}
    assert tasks.own == {1, 7} and tasks.found
    assert dict(tasks.skipped) == {}


def test_nested_namespaces_use_the_last_field(tmp_path: Path) -> None:
    """A container inside a container: the first field is the agent's tid, the last the process's own."""
    root = fake_tasks(
        tmp_path, {PID: status_text(PID, (PID, 120, 1)), PID + 1: status_text(PID + 1, (PID + 1, 121, 2))}
    )
    assert dict(task_ids(root, PID).to_agent) == {1: PID, 2: PID + 1}


def test_tasks_in_the_agents_namespace_are_themselves(tmp_path: Path) -> None:
    """One level: the process shares proc_root's namespace, so every task is itself; the other status
    files need not be read (here the second has none, and is still mapped)."""
    root = fake_tasks(tmp_path, {PID: status_text(PID, (PID,)), PID + 1: None})
    tasks = task_ids(root, PID)
    assert dict(tasks.to_agent) == {PID: PID, PID + 1: PID + 1}
    assert dict(tasks.skipped) == {}


def test_a_kernel_without_nspid_maps_tasks_as_themselves_and_says_so(tmp_path: Path) -> None:
    root = fake_tasks(tmp_path, {PID: status_text(PID, None), PID + 1: status_text(PID + 1, None)})
    tasks = task_ids(root, PID)
    assert dict(tasks.to_agent) == {PID: PID, PID + 1: PID + 1}
    assert dict(tasks.skipped) == {NO_NSPID: 2}


def test_a_vanished_task_is_counted_and_the_rest_mapped(tmp_path: Path) -> None:
    root = fake_tasks(
        tmp_path, {PID: status_text(PID, (PID, 1)), PID + 1: None, PID + 2: status_text(PID + 2, (PID + 2, 3))}
    )
    tasks = task_ids(root, PID)
    assert dict(tasks.to_agent) == {1: PID, 3: PID + 2}
    assert dict(tasks.skipped) == {VANISHED: 1}


def test_unreadable_and_malformed_status_files_are_counted(tmp_path: Path) -> None:
    root = fake_tasks(
        tmp_path,
        {
            PID: status_text(PID, (PID + 9, 1)),  # the first id is not the task's: not its status
            PID + 1: "garbage\n",  # no NSpid and no Tgid: not a status file at all
            PID + 2: "Name:\tx\nNSpid:\tnope\n",
            PID + 3: status_text(PID + 3, (PID + 3, 4)),
        },
    )
    (root / str(PID) / "task" / str(PID + 4) / "status").mkdir(parents=True)  # reading it fails: EISDIR
    tasks = task_ids(root, PID)
    assert dict(tasks.to_agent) == {4: PID + 3}
    assert dict(tasks.skipped) == {MALFORMED: 3, UNREADABLE: 1}


def test_a_gone_process_has_no_tasks(tmp_path: Path) -> None:
    tasks = task_ids(tmp_path, PID)
    assert dict(tasks.to_agent) == {} and not tasks.found


# The inspector on a live interpreter (3.11+: its thread states carry native_thread_id), with a fake
# /proc for the thread ids and the real one for everything else.
WITH_NATIVE_IDS = [i for i in installed() if i.minor >= (3, 11)]


def _proc_with_tasks(root: Path, pid: int, nspid: Mapping[int, tuple[int, ...]]) -> Path:
    """A fake proc root for `pid`: the real maps and root (libc is found through them), and task
    status files whose NSpid lines are `nspid`'s."""
    fake_tasks(root, {tid: status_text(tid, ids, pid) for tid, ids in nspid.items()}, pid)
    (root / str(pid)).mkdir(parents=True, exist_ok=True)
    for name in ("maps", "root"):
        os.symlink(f"/proc/{pid}/{name}", root / str(pid) / name)
    return root


def _inspect(root: Path, pid: int) -> tuple[PythonInspector, PythonState, str]:
    inspector = PythonInspector(discover_interpreter(Path("/proc")), proc_root=root, memory=lambda p: ProcessMemory(p))
    result = inspector.inspect(pid)
    return inspector, result.state, result.reason


@pytest.mark.skipif(not WITH_NATIVE_IDS, reason="no CPython 3.11+ installed")
def test_inspector_matches_thread_states_in_the_process_namespace(tmp_path: Path) -> None:
    """The agent lists the process's threads under made-up ids whose NSpid says the process knows them by
    its real tids (what its thread states hold): enabled. The same listing saying another id: refused."""
    interpreter = WITH_NATIVE_IDS[-1]
    with child(interpreter.executable, 3) as process:
        real = sorted(int(t) for t in os.listdir(f"/proc/{process.pid}/task"))
        listed = {900_000 + i: (900_000 + i, tid) for i, tid in enumerate(real)}
        _, state, reason = _inspect(_proc_with_tasks(tmp_path / "mapped", process.pid, listed), process.pid)
        assert (state, reason) == (PythonState.ENABLED, "")
        elsewhere = {900_000 + i: (900_000 + i, 1_000_000 + tid) for i, tid in enumerate(real)}
        _, state, reason = _inspect(_proc_with_tasks(tmp_path / "elsewhere", process.pid, elsewhere), process.pid)
        assert (state, reason) == (PythonState.VALIDATION_FAILED, "bad_native_thread_id")


@pytest.mark.skipif(not WITH_NATIVE_IDS, reason="no CPython 3.11+ installed")
def test_inspector_counts_unmapped_tasks_and_goes_on(tmp_path: Path) -> None:
    """Every status file gone (the threads exited as they were listed): counted, and the thread states
    are not refused for want of a tid to compare (no proof either way), never a traceback."""
    interpreter = WITH_NATIVE_IDS[-1]
    with child(interpreter.executable, 2) as process:
        real = sorted(int(t) for t in os.listdir(f"/proc/{process.pid}/task"))
        root = _proc_with_tasks(tmp_path, process.pid, {})
        for tid in real:  # listed, with no status file
            (root / str(process.pid) / "task" / str(tid)).mkdir(parents=True)
        inspector, state, reason = _inspect(root, process.pid)
    assert (state, reason) == (PythonState.ENABLED, "")
    assert inspector.task_skips == {VANISHED: len(real)}
