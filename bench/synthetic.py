"""Benchmark helper: a fake /proc with many processes, and realistic synthetic stacks for them.

The fake root (`FakeProc`) holds `kallsyms` (a copy of the host's), and one directory per fake pid
cloned from a real template process: `maps`, `comm`, `stat`, `cmdline`, `cgroup`, an `exe` link to the
real executable and a `root` link to `/`, so the symbolizer opens and parses the real ELF files those
mappings name. Templates are the benchmark's own Python interpreter (tens of shared libraries) and the
C workloads, so processes differ the way a host's do.

Stacks are drawn from pools of call sites: each template has a pool of return addresses inside its
executable mappings, and the kernel a pool of addresses inside real text symbols, so the number of
unique addresses grows more slowly than the number of unique stacks, as in real profiles.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agent.aggregate.types import AggregatedSample, IntervalProfile, SampleKey
from agent.process.maps import MapKind, parse_maps_line
from agent.types import ProfileSpec, Stack, StackStatus

FIRST_PID = 100_000
CGROUP = "0::/system.slice/bench-{n}.service\n"


@dataclass(frozen=True, slots=True)
class Template:
    """A real process's view, copied into fake pids."""

    exe: str
    comm: str
    maps: str
    stat: str
    cmdline: bytes
    code: tuple[tuple[int, int], ...]  # executable file mappings: (start, end)


def capture_template(pid: int) -> Template:
    proc = Path(f"/proc/{pid}")
    maps = (proc / "maps").read_text()
    code = []
    for line in maps.splitlines():
        entry = parse_maps_line(line)
        if entry is not None and "x" in entry.perms and entry.kind is MapKind.FILE:
            code.append((entry.start, entry.end))
    return Template(
        exe=os.readlink(proc / "exe"),
        comm=(proc / "comm").read_text().strip(),
        maps=maps,
        stat=(proc / "stat").read_text(),
        cmdline=(proc / "cmdline").read_bytes(),
        code=tuple(code),
    )


def capture_templates(binaries: list[Path]) -> list[Template]:
    """This interpreter, and each binary (one that prints a line once ready and then waits on stdin)."""
    templates = [capture_template(os.getpid())]
    for binary in binaries:
        process = subprocess.Popen([str(binary), "1000000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert process.stdout is not None
            process.stdout.readline()  # "ready": its libraries are mapped
            templates.append(capture_template(process.pid))
        finally:
            process.kill()
            process.wait()
    return templates


class FakeProc:
    """A directory laid out like /proc for `count` fake processes cloned from `templates`."""

    def __init__(self, root: Path, templates: list[Template], count: int) -> None:
        self.root = root
        self.templates = templates
        root.mkdir(parents=True, exist_ok=True)
        shutil.copyfile("/proc/kallsyms", root / "kallsyms")
        self.pids: list[int] = []
        self.template_of: dict[int, Template] = {}
        for n in range(count):
            self.add(FIRST_PID + n, templates[n % len(templates)], n)

    def add(self, pid: int, template: Template, n: int) -> None:
        directory = self.root / str(pid)
        directory.mkdir()
        (directory / "maps").write_text(template.maps)
        (directory / "comm").write_text(template.comm + "\n")
        (directory / "stat").write_text(template.stat.replace(template.stat.split()[0], str(pid), 1))
        (directory / "cmdline").write_bytes(template.cmdline)
        (directory / "cgroup").write_text(CGROUP.format(n=n % 50))
        (directory / "exe").symlink_to(template.exe)
        (directory / "root").symlink_to("/")
        self.pids.append(pid)
        self.template_of[pid] = template


def kernel_text_addresses(limit: int = 4000, seed: int = 7) -> list[int]:
    """Addresses a few bytes into real kernel text symbols."""
    starts = []
    with open("/proc/kallsyms", encoding="ascii", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[1] in ("t", "T") and int(fields[0], 16):
                starts.append(int(fields[0], 16))
    rng = random.Random(seed)
    return [address + rng.randrange(4, 64) for address in rng.sample(starts, min(limit, len(starts)))]


class StackFactory:
    """Unique (kernel, user) stack pairs per process, drawn from pools of call sites."""

    def __init__(self, proc: FakeProc, sites_per_template: int = 3000, seed: int = 11) -> None:
        self._rng = random.Random(seed)
        self._kernel_sites = kernel_text_addresses()
        self._user_sites: dict[str, list[int]] = {}
        for template in proc.templates:
            spans = template.code
            self._user_sites[template.exe] = [
                self._rng.randrange(*spans[self._rng.randrange(len(spans))]) for _ in range(sites_per_template)
            ]
        self._proc = proc

    def stack_pair(self, pid: int) -> tuple[Stack, Stack]:
        rng = self._rng
        sites = self._user_sites[self._proc.template_of[pid].exe]
        user = tuple(rng.choice(sites) for _ in range(rng.randint(4, 30)))
        kernel_depth = rng.choice((0, 0, 0, rng.randint(3, 15)))
        kernel = tuple(rng.choice(self._kernel_sites) for _ in range(kernel_depth))
        kernel_stack = Stack(StackStatus.OK, kernel) if kernel else Stack(StackStatus.NOT_COLLECTED)
        return kernel_stack, Stack(StackStatus.OK, user)

    def interval(self, spec: ProfileSpec, stacks: int, start_ns: int, seconds: float = 10.0) -> IntervalProfile:
        """An aggregated interval with `stacks` unique samples spread over every fake process."""
        rng = self._rng
        pids = self._proc.pids
        samples = []
        end_ns = start_ns + int(seconds * 1e9)
        for i in range(stacks):
            pid = pids[i % len(pids)]
            kernel, user = self.stack_pair(pid)
            count = rng.choice((1, 1, 1, 2, 3, 5))
            stamps = tuple(sorted(rng.randrange(start_ns, end_ns) for _ in range(count)))
            key = SampleKey(pid, pid + rng.randrange(4), rng.randrange(2), kernel, user)
            values = (count, count * spec.period) if len(spec.sample_types) == 2 else (count,)
            samples.append(AggregatedSample(key, self._proc.template_of[pid].comm, values, stamps))
        return IntervalProfile(spec, start_ns, end_ns, 0, tuple(samples))
