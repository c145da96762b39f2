"""Tests of symbols for stripped binaries from debug files (`agent.symbolize.debuginfo`) through `Symbolizer`.

A C program with static (local) functions is built with a build id, then turned into what distributions
ship: a stripped binary plus a `--only-keep-debug` file (found by build id or by `.gnu_debuglink`), and
a stripped binary carrying MiniDebugInfo (`.gnu_debugdata`) built the way Fedora builds it. The truth is
`nm` of the unstripped binary.
"""

from __future__ import annotations

import lzma
import re
import shutil
import subprocess
import zlib
from array import array
from pathlib import Path

import pytest

from agent.aggregate.types import AggregatedSample, IntervalProfile, SampleKey
from agent.process.elf import ElfSymbols, merge_symbols, read_elf, read_elf_with_hints
from agent.process.registry import ProcessRegistry
from agent.symbolize.debuginfo import SymbolSource
from agent.symbolize.stats import ErrorReason
from agent.symbolize.symbolizer import Symbolizer
from agent.types import ProfileSpec, Stack, StackStatus, ValueType
from tests.support.fixture_types import AddFakeProcess, MapsFor, NmFunctions

BASE = 0x555555554000
SPEC = ProfileSpec("cpu", (ValueType("samples", "count"),), ValueType("cpu", "nanoseconds"), 10_000_000)
LOCAL_FUNCTIONS = ("local_leaf", "local_middle", "exported_outer", "main")

PROGRAM_C = r"""
volatile unsigned long sink;
static __attribute__((noinline)) void local_leaf(unsigned long n) { for (unsigned long i = 0; i < n; i++) sink += i; }
static __attribute__((noinline)) void local_middle(unsigned long n) { local_leaf(n); sink ^= n; }
__attribute__((noinline)) void exported_outer(unsigned long n) { local_middle(n); local_middle(n + 1); }
int main(void) { exported_outer(1000); return 0; }
"""


def run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True).stdout


def build_id_of(path: Path) -> str:
    match = re.search(r"Build ID: ([0-9a-f]+)", run("readelf", "-n", path))
    assert match is not None
    return match.group(1)


def make_minidebuginfo(full: Path, out: Path) -> Path:
    """Fedora's find-debuginfo recipe: the function symbols .dynsym lacks, in an xz'd ELF in .gnu_debugdata."""
    dynsyms = {line.split()[0] for line in run("nm", "-D", "--format=posix", "--defined-only", full).splitlines()}
    keep = sorted(
        parts[0]
        for parts in (line.split() for line in run("nm", "--format=posix", "--defined-only", full).splitlines())
        if parts[1] in ("T", "t", "D") and parts[0] not in dynsyms
    )
    (out / "keep_symbols").write_text("".join(f"{name}\n" for name in keep))
    run("objcopy", "--only-keep-debug", full, out / "mini.full")
    run(
        "objcopy", "-S", "--remove-section", ".gdb_index", "--remove-section", ".comment",
        f"--keep-symbols={out / 'keep_symbols'}", out / "mini.full", out / "mini_debuginfo",
    )  # fmt: skip
    (out / "mini_debuginfo.xz").write_bytes(lzma.compress((out / "mini_debuginfo").read_bytes()))
    binary = out / "prog_mini"
    run("strip", "--strip-all", "-R", ".comment", "-o", binary, full)
    run("objcopy", f"--add-section=.gnu_debugdata={out / 'mini_debuginfo.xz'}", binary)
    return binary


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """full (unstripped), debug (--only-keep-debug), stripped, linked (stripped + debuglink), mini."""
    if not all(shutil.which(tool) for tool in ("gcc", "nm", "objcopy", "strip", "readelf")):
        pytest.skip("gcc and binutils are needed to build the debug-file test programs")
    out = tmp_path_factory.mktemp("debuginfo")
    (out / "prog.c").write_text(PROGRAM_C)
    files = {name: out / name for name in ("full", "stripped", "linked")}
    files["debug"] = out / "prog.debug"
    run("gcc", "-O0", "-g", "-fno-omit-frame-pointer", "-fPIE", "-pie", "-Wl,--build-id=sha1",
        "-o", files["full"], out / "prog.c")  # fmt: skip
    run("objcopy", "--only-keep-debug", files["full"], files["debug"])
    run("strip", "--strip-all", "-o", files["stripped"], files["full"])
    linked_dir = out / "bin"
    linked_dir.mkdir()
    files["linked"] = linked_dir / "prog"
    run("objcopy", f"--add-gnu-debuglink={files['debug']}", files["stripped"], files["linked"])
    files["mini"] = make_minidebuginfo(files["full"], out)
    return files


def resolve(symbolizer: Symbolizer, pid: int, nm: dict[str, tuple[int, int]], functions: tuple[str, ...]) -> list[str]:
    """Names of each function's first and last byte, as `pid` (its binary loaded at BASE) would be sampled."""
    result = []
    for name in functions:
        start, size = nm[name]
        for address in (BASE + start, BASE + start + size - 1):
            key = SampleKey(
                pid=pid, tid=pid, cpu=0, kernel=Stack(StackStatus.NOT_COLLECTED), user=Stack(StackStatus.OK, (address,))
            )
            sample = AggregatedSample(key=key, thread_name="prog", values=(1,), timestamps_mono_ns=(5,))
            profile = symbolizer.symbolize(IntervalProfile(SPEC, 0, 10, 0, (sample,)))
            result.append(profile.samples[0].frames[0].function)
    return result


def expected(functions: tuple[str, ...]) -> list[str]:
    return [name for name in functions for _ in range(2)]


@pytest.fixture
def debug_root(tmp_path: Path) -> Path:
    root = tmp_path / "usr" / "lib" / "debug"
    root.mkdir(parents=True)
    return root


def install_by_build_id(root: Path, debug_file: Path, build_id: str) -> Path:
    target = root / ".build-id" / build_id[:2] / f"{build_id[2:]}.debug"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(debug_file, target)
    return target


def test_stripped_binary_has_no_local_names_without_debug_files(
    built: dict[str, Path], nm_functions: NmFunctions, maps_for: MapsFor, add_fake_process: AddFakeProcess,
    fake_proc: Path, debug_root: Path,
) -> None:  # fmt: skip
    add_fake_process(800, maps_for(built["stripped"], BASE))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc), debug_roots=(debug_root,))
    assert resolve(symbolizer, 800, nm_functions(built["full"]), LOCAL_FUNCTIONS) == [""] * 8
    assert symbolizer.stats.symbol_sources == {SymbolSource.DYNSYM: 1}


def test_build_id_debug_file_names_every_function(
    built: dict[str, Path], nm_functions: NmFunctions, maps_for: MapsFor, add_fake_process: AddFakeProcess,
    fake_proc: Path, debug_root: Path,
) -> None:  # fmt: skip
    install_by_build_id(debug_root, built["debug"], build_id_of(built["stripped"]))
    add_fake_process(801, maps_for(built["stripped"], BASE))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc), debug_roots=(debug_root,))
    nm = nm_functions(built["full"])
    assert resolve(symbolizer, 801, nm, LOCAL_FUNCTIONS) == expected(LOCAL_FUNCTIONS)
    # Every function nm knows, not only ours (crt's _start and friends), names the same.
    table = read_elf(built["debug"])
    assert {name for name in nm if table.lookup(nm[name][0]) == name} == set(nm)
    assert symbolizer.stats.symbol_sources == {SymbolSource.BUILD_ID: 1}
    assert symbolizer.stats.errors.total() == 0


def test_build_id_file_of_another_build_is_rejected(
    built: dict[str, Path], nm_functions: NmFunctions, maps_for: MapsFor, add_fake_process: AddFakeProcess,
    fake_proc: Path, debug_root: Path, symbolize_binaries: dict[str, Path],
) -> None:  # fmt: skip
    install_by_build_id(debug_root, symbolize_binaries["pie"], build_id_of(built["stripped"]))
    add_fake_process(802, maps_for(built["stripped"], BASE))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc), debug_roots=(debug_root,))
    assert resolve(symbolizer, 802, nm_functions(built["full"]), ("local_leaf",)) == ["", ""]
    assert symbolizer.stats.errors[ErrorReason.DEBUG_FILE_MISMATCH] == 1


@pytest.mark.parametrize("where", ["beside", "dot_debug", "debug_root"])
def test_debuglink_is_found_in_each_place_gdb_looks(
    where: str, built: dict[str, Path], nm_functions: NmFunctions, maps_for: MapsFor,
    add_fake_process: AddFakeProcess, fake_proc: Path, debug_root: Path, tmp_path: Path,
) -> None:  # fmt: skip
    binary_dir = tmp_path / "opt" / "app"
    binary_dir.mkdir(parents=True)
    binary = binary_dir / "prog"
    shutil.copy(built["linked"], binary)
    directory = {
        "beside": binary_dir,
        "dot_debug": binary_dir / ".debug",
        "debug_root": debug_root / str(binary_dir).lstrip("/"),
    }[where]
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(built["debug"], directory / "prog.debug")
    add_fake_process(803, maps_for(binary, BASE))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc), debug_roots=(debug_root,))
    nm = nm_functions(built["full"])
    assert resolve(symbolizer, 803, nm, LOCAL_FUNCTIONS) == expected(LOCAL_FUNCTIONS)
    assert symbolizer.stats.symbol_sources == {SymbolSource.DEBUGLINK: 1}


def test_debuglink_with_a_wrong_crc_is_rejected(
    built: dict[str, Path], nm_functions: NmFunctions, maps_for: MapsFor, add_fake_process: AddFakeProcess,
    fake_proc: Path, debug_root: Path, tmp_path: Path,
) -> None:  # fmt: skip
    binary = tmp_path / "prog"
    shutil.copy(built["linked"], binary)
    (tmp_path / "prog.debug").write_bytes(built["debug"].read_bytes() + b"\0")  # another file under that name
    add_fake_process(804, maps_for(binary, BASE))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc), debug_roots=(debug_root,))
    assert resolve(symbolizer, 804, nm_functions(built["full"]), ("local_middle",)) == ["", ""]
    assert symbolizer.stats.errors[ErrorReason.DEBUG_FILE_MISMATCH] == 1
    assert symbolizer.stats.symbol_sources == {SymbolSource.DYNSYM: 1}


def test_debuglink_name_and_crc_are_read_from_the_binary(built: dict[str, Path]) -> None:
    _table, hints = read_elf_with_hints(built["linked"])
    assert not hints.has_symtab
    assert hints.debuglink == ("prog.debug", zlib.crc32(built["debug"].read_bytes()))
    assert read_elf_with_hints(built["full"])[1].has_symtab


def test_minidebuginfo_names_local_functions(
    built: dict[str, Path], nm_functions: NmFunctions, maps_for: MapsFor, add_fake_process: AddFakeProcess,
    fake_proc: Path, debug_root: Path,
) -> None:  # fmt: skip
    sections = run("readelf", "-SW", built["mini"])
    assert ".gnu_debugdata" in sections and ".symtab" not in sections
    add_fake_process(805, maps_for(built["mini"], BASE))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc), debug_roots=(debug_root,))
    nm = nm_functions(built["full"])
    assert resolve(symbolizer, 805, nm, LOCAL_FUNCTIONS) == expected(LOCAL_FUNCTIONS)
    assert symbolizer.stats.symbol_sources == {SymbolSource.MINIDEBUGINFO: 1}


def test_corrupt_minidebuginfo_is_counted_and_never_raises(
    built: dict[str, Path], maps_for: MapsFor, add_fake_process: AddFakeProcess, fake_proc: Path,
    debug_root: Path, tmp_path: Path, nm_functions: NmFunctions,
) -> None:  # fmt: skip
    binary = tmp_path / "prog_bad_mini"
    (tmp_path / "junk.xz").write_bytes(lzma.compress(b"\x7fELF" + b"\xff" * 200))  # xz, but no valid ELF in it
    run("objcopy", f"--add-section=.gnu_debugdata={tmp_path / 'junk.xz'}", built["stripped"], binary)
    add_fake_process(806, maps_for(binary, BASE))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc), debug_roots=(debug_root,))
    assert resolve(symbolizer, 806, nm_functions(built["full"]), ("main",)) == ["", ""]
    assert symbolizer.stats.errors[ErrorReason.MINIDEBUGINFO_UNUSABLE] == 1


def test_debug_file_in_the_containers_image_is_found_through_its_root(
    built: dict[str, Path], nm_functions: NmFunctions, maps_for: MapsFor, add_fake_process: AddFakeProcess,
    fake_proc: Path, tmp_path: Path,
) -> None:  # fmt: skip
    image = tmp_path / "image"  # the container's root: /opt/app/prog and /usr/lib/debug/.build-id/...
    (image / "opt" / "app").mkdir(parents=True)
    shutil.copy(built["stripped"], image / "opt" / "app" / "prog")
    install_by_build_id(image / "usr" / "lib" / "debug", built["debug"], build_id_of(built["stripped"]))
    lines = [line.replace(str(image), "") for line in maps_for(image / "opt" / "app" / "prog", BASE)]
    pid_dir = add_fake_process(807, lines)
    (pid_dir / "root").unlink()
    (pid_dir / "root").symlink_to(image)
    symbolizer = Symbolizer(
        ProcessRegistry(fake_proc)
    )  # the default debug root, /usr/lib/debug, as the process sees it
    nm = nm_functions(built["full"])
    assert resolve(symbolizer, 807, nm, LOCAL_FUNCTIONS) == expected(LOCAL_FUNCTIONS)
    assert symbolizer.stats.symbol_sources == {SymbolSource.BUILD_ID: 1}


def test_binary_with_symtab_is_not_looked_up(
    built: dict[str, Path], maps_for: MapsFor, add_fake_process: AddFakeProcess, fake_proc: Path, debug_root: Path,
    nm_functions: NmFunctions,
) -> None:  # fmt: skip
    add_fake_process(808, maps_for(built["full"], BASE))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc), debug_roots=(debug_root,))
    assert resolve(symbolizer, 808, nm_functions(built["full"]), ("main",)) == ["main", "main"]
    assert symbolizer.stats.symbol_sources == {SymbolSource.SYMTAB: 1}


def test_merge_adds_the_debug_files_functions_and_keeps_the_binarys_names_and_layout() -> None:
    base = ElfSymbols("ab12", "ET_DYN", (), array("Q", [0x1000, 0x2000]), array("Q", [0x1010, 0x2010]), ("a", "b"))
    debug = ElfSymbols(
        "", "ET_EXEC", (), array("Q", [0x1000, 0x3000, 0x4000]), array("Q", [0x1010, 0x3010, 0x4010]),
        ("__a_alias@@GLIBC_2.2.5", "static_c", "d@GLIBC_2.2.5"),
    )  # fmt: skip
    merged = merge_symbols(base, debug)
    assert (merged.build_id, merged.elf_type, merged.segments) == ("ab12", "ET_DYN", ())
    lookups = [merged.lookup(a) for a in (0x1000, 0x100F, 0x2000, 0x3000, 0x3010, 0x4000)]
    assert lookups == ["a", "a", "b", "static_c", "", "d"]


def test_a_stripped_copy_seen_first_does_not_hide_the_names_of_a_richer_copy(
    built: dict[str, Path], nm_functions: NmFunctions, maps_for: MapsFor, add_fake_process: AddFakeProcess,
    fake_proc: Path, debug_root: Path,
) -> None:  # fmt: skip
    assert build_id_of(built["stripped"]) == build_id_of(built["mini"]) == build_id_of(built["full"])
    add_fake_process(809, maps_for(built["stripped"], BASE))
    add_fake_process(810, maps_for(built["mini"], BASE))
    add_fake_process(811, maps_for(built["stripped"], BASE))
    symbolizer = Symbolizer(ProcessRegistry(fake_proc), debug_roots=(debug_root,))
    nm = nm_functions(built["full"])
    assert resolve(symbolizer, 809, nm, ("local_leaf",)) == ["", ""]
    assert resolve(symbolizer, 810, nm, ("local_leaf",)) == ["local_leaf", "local_leaf"]
    # From then on the build id's table is the complete one, for the stripped copy too.
    assert resolve(symbolizer, 811, nm, ("local_leaf",)) == ["local_leaf", "local_leaf"]
    assert symbolizer.cache_sizes()["elf_tables"] == 1
