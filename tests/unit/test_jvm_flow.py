"""The pipeline's JVM flow (`agent.flow.jvm.JavaFrames`) against live JVMs, and the symbolize stage's
Java merge (`agent.symbolize.java_merge`): a JVM found and handed to the unwinder and the symbolizer,
one found while it is still starting (retried), a process that is no JVM, an exec; and interpreter
frames replaced by named Java frames, the unreadable ones kept native and counted."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from agent.flow.jvm import JavaFrames
from agent.process.jvm.frames import InterpreterFrames
from agent.process.jvm.methods import JavaMethod, MethodReadError
from agent.process.maps import read_process_maps
from agent.symbolize.java_merge import JavaMerger
from agent.symbolize.types import Frame, FrameKind, MappingInfo, PythonSource
from agent.types import Stack, StackStatus
from tests.support.jvm import JDKS, compile_java, running

ANON = MappingInfo("[anon]", 0x7F00_0000_0000, 0x7F00_1000_0000, 0)


class RecordingUnwinder:
    def __init__(self) -> None:
        self.java: dict[int, InterpreterFrames | None] = {}

    def set_java(self, pid: int, interpreter: InterpreterFrames | None) -> None:
        self.java[pid] = interpreter


def _flow(unwinder: RecordingUnwinder) -> JavaFrames:
    def snapshot(pid: int):  # type: ignore[no-untyped-def]
        try:
            return read_process_maps(Path("/proc"), pid)
        except OSError:
            return None

    return JavaFrames(snapshot, unwinder)


@pytest.fixture(scope="module")
def classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_java("Lines", tmp_path_factory.mktemp("classes"))


def test_a_process_that_is_no_jvm_is_decided_at_a_glance() -> None:
    unwinder = RecordingUnwinder()
    flow = _flow(unwinder)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.05)
        flow.observe(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert flow.outcomes["not_jvm"] == 1 and flow.reader(sleeper.pid) is None and unwinder.java == {}
    assert flow.poll(1.0) == 1.0  # nothing to retry


@pytest.mark.parametrize("java", JDKS, ids=lambda java: java.parent.parent.name)
def test_a_jvm_seen_at_its_exec_is_retried_until_its_tables_are_ready(java: Path, classes: Path) -> None:
    unwinder = RecordingUnwinder()
    flow = _flow(unwinder)
    process = subprocess.Popen([str(java), "-Xmx32m", "-cp", str(classes), "Lines"], stdout=subprocess.PIPE, text=True)
    try:
        flow.observe(process.pid)  # at once: the launcher has not loaded libjvm.so, or HotSpot is booting
        deadline = time.monotonic() + 60
        while flow.reader(process.pid) is None and time.monotonic() < deadline:
            time.sleep(flow.poll(0.5))
        interpreter = unwinder.java.get(process.pid)
        assert flow.reader(process.pid) is not None and interpreter is not None, flow.outcomes
        assert interpreter.code_start < interpreter.code_end
        flow.on_exec(process.pid)  # an exec: the image is another
        assert flow.reader(process.pid) is None and unwinder.java[process.pid] is None
    finally:
        process.kill()
        process.wait()
    assert flow.outcomes["jvm"] == 1


def test_an_exited_jvm_is_forgotten_one_interval_end_after(classes: Path) -> None:
    if not JDKS:
        pytest.skip("no JDK")
    unwinder = RecordingUnwinder()
    flow = _flow(unwinder)
    with running(JDKS[0], classes, "Lines") as process:
        flow.observe(process.pid)
        assert flow.reader(process.pid) is not None
    flow.end_interval()  # found gone: its samples of this interval are still named
    assert flow.reader(process.pid) is not None
    flow.end_interval()
    assert flow.reader(process.pid) is None and unwinder.java[process.pid] is None


class FakeReader:
    def __init__(self, methods: dict[int, JavaMethod], code_base: dict[int, int]) -> None:
        self.methods, self.code_base, self.reads = methods, code_base, 0

    def method(self, method: int) -> JavaMethod:
        self.reads += 1
        if method not in self.methods:
            raise MethodReadError(f"no method at {method:#x}")
        return self.methods[method]

    def bci(self, method: int, bcp: int) -> int:
        return bcp - self.code_base[method]


def test_interpreter_frames_become_named_java_frames() -> None:
    work = JavaMethod("Lines", "far", "()V", "Lines.java", ((0, 8), (8, 40), (18, 41)))
    reader = FakeReader({0x1000: work}, {0x1000: 0x9000})
    merger = JavaMerger(lambda pid: reader if pid == 7 else None)  # type: ignore[arg-type,return-value]
    native = tuple(Frame(FrameKind.NATIVE, 0x7F00_0000_0100 + i, "", ANON) for i in range(3))
    # Frame 0 ran far() at bci 10 (line 40); frame 2 is an interpreter frame whose method is unreadable.
    stack = Stack(StackStatus.OK, (1, 2, 3), (0, 0x1000, 0x9000 + 10, 2, 0x2000, 0x9100))
    merged = merger.merge(7, stack, native)
    assert merged[0] == Frame(FrameKind.JVM, 0, "Lines.far", ANON, PythonSource("far()V", "Lines.java", 8, 40))
    assert merged[1:] == native[1:]  # frame 1 is native code; frame 2 stays native, counted
    assert merger.named == 1 and merger.unnamed["unreadable"] == 1
    merger.merge(7, stack, native)
    assert reader.reads == 3  # far() came from the memo; the unreadable one was tried again
    assert merger.merge(8, stack, native) == native and merger.unnamed["no_reader"] == 2
