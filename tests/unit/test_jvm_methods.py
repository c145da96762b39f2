"""HotSpot methods read from outside the JVM: every method of a test class, and a JDK class, named
with their signatures and line tables, on every JDK here, against `javap -l` of the same class file."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.process.jvm.discover import HotSpot, discover_hotspot
from agent.process.jvm.frames import InterpreterFrames, java_threads, memory_words
from agent.process.jvm.methods import (
    JavaMethod,
    MethodReader,
    MethodReadError,
    decode_line_table,
    excluded_byte,
    loaded_classes,
)
from agent.process.memory import ProcessMemory
from tests.support.jvm import JDKS, compile_java, javap_lines, running


@pytest.mark.parametrize("excluded", [0, 1])
def test_one_byte_entries_carry_bci_and_line_deltas(excluded: int) -> None:
    # (8 << 3 | 1): 8 bytecodes on, 1 line down; then the end. The same in both encodings.
    table = bytes([0 << 3 | 4, 8 << 3 | 1, 10 << 3 | 1, 0])
    assert decode_line_table(table, excluded) == ((0, 4), (8, 5), (18, 6))


@pytest.mark.parametrize("excluded", [0, 1])
def test_an_escaped_entry_carries_signed_deltas(excluded: int) -> None:
    # 0xFF, then zigzag UNSIGNED5 ints (each byte plus the excluded count): bci +8 (16), line +32 (64);
    # then bci +2 (4), line -3 (5); then a line delta of 100 (200: two bytes).
    x = excluded
    low = 256 - 64 - x
    two = [x + low + (200 - low) % 64, x + (200 - low) // 64]  # 200 = (first - x) + (second - x) * 64
    table = bytes([0 << 3 | 7, 0xFF, x + 16, x + 64, 0xFF, x + 4, x + 5, 0xFF, x + 0, *two, 0])
    assert decode_line_table(table, excluded) == ((0, 7), (8, 39), (10, 36), (10, 136))


def test_the_encoding_changed_in_jdk_20() -> None:
    assert (excluded_byte(17), excluded_byte(20), excluded_byte(25)) == (0, 1, 1)


def test_a_table_without_its_end_is_an_error() -> None:
    with pytest.raises(MethodReadError):
        decode_line_table(bytes([0 << 3 | 4, 0xFF, 16]), 0)


def test_line_at_picks_the_closest_start_at_or_below() -> None:
    method = JavaMethod("C", "m", "()V", "C.java", ((0, 8), (8, 40), (18, 41)))
    assert [method.line_at(bci) for bci in (0, 7, 8, 17, 18, 99)] == [8, 8, 40, 40, 41, 41]
    assert JavaMethod("C", "n", "()V", "", ()).line_at(3) == 0


@pytest.fixture(scope="module")
def classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_java("Lines", tmp_path_factory.mktemp("classes"))


@pytest.mark.parametrize("java", JDKS, ids=lambda java: java.parent.parent.name)
def test_every_method_of_a_live_class_is_named_with_its_lines(java: Path, classes: Path) -> None:
    truth = javap_lines(classes, "Lines")
    truth["<init>"] = truth.pop("Lines")  # javap names the constructor after its class
    with running(java, classes, "Lines") as process:
        found = discover_hotspot(process.pid)
        assert isinstance(found, HotSpot), found
        memory = ProcessMemory(process.pid)
        reader = MethodReader(memory, found.vmstructs, found.feature)
        by_class = {c.name: c for c in loaded_classes(memory, found.vmstructs, reader)}
        methods = {m.name: m for m in map(reader.method, by_class["Lines"].methods)}
        objects = [reader.method(m) for m in by_class["java.lang.Object"].methods]
        first = by_class["Lines"].methods[0]
        assert reader.method(first) is reader.method(first)  # a second read is the cached one
    assert set(methods) == set(truth)
    for name, method in methods.items():
        assert method.class_name == "Lines" and method.source_file == "Lines.java"
        assert list(method.lines) == truth[name], name
    assert methods["main"].signature == "([Ljava/lang/String;)V" and methods["far"].signature == "()V"
    assert methods["far"].line_at(10) == 40  # inside the escaped entry's range
    assert ("hashCode", "()I") in {(m.name, m.signature) for m in objects}
    assert all(m.class_name == "java.lang.Object" and m.source_file == "Object.java" for m in objects)


@pytest.mark.parametrize("java", JDKS, ids=lambda java: java.parent.parent.name)
def test_a_sleeping_thread_s_interpreted_frames_name_main_at_the_sleep_line(java: Path, classes: Path) -> None:
    """From each Java thread's last frame (set while it sleeps in native code) along the frame-pointer
    chain through the interpreter: the main thread's frames reach Lines.main, at the line that calls
    Thread.sleep (46), with Method* and bytecode pointer at the words the interpreter keeps them."""
    with running(java, classes, "Lines") as process:
        found = discover_hotspot(process.pid)
        assert isinstance(found, HotSpot), found
        memory = ProcessMemory(process.pid)
        reader = MethodReader(memory, found.vmstructs, found.feature)
        frames = InterpreterFrames.of(memory, found.vmstructs)
        words = memory_words(memory)
        stacks = []
        for thread in java_threads(memory, found.vmstructs):
            walked = list(frames.walk(thread.last_java_fp, thread.last_java_pc, words))
            named = [(reader.method(f.method), reader.bci(f.method, f.bcp)) for f in walked]
            stacks.append([(m.qualified, m.line_at(bci)) for m, bci in named])
        tids = {t.tid for t in java_threads(memory, found.vmstructs)}
        task_ids = {int(t.name) for t in Path(f"/proc/{process.pid}/task").iterdir()}
    assert tids <= task_ids, (tids, task_ids)  # the JVM's threads are this process's OS threads
    main = [stack for stack in stacks if ("Lines.main", 46) in stack]
    assert len(main) == 1, stacks
    assert main[0][-1] == ("Lines.main", 46)  # the outermost interpreted frame
    assert any(name.startswith("java.lang.Thread.sleep") for name, _ in main[0]), main[0]
