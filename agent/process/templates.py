"""Process stage: executables' layouts, to lay out a process that exited before its maps could be read.

A process that lives a few milliseconds (a shell's `sed`, a compiler under a build, a CI step) may be
gone before the registry reads /proc/PID/maps, and its samples would then have no mapping at all: no
unwinding past the leaf, no names. Each announcement carries where the image lies and which executable
it runs (`agent.types.ImageLayout`, read by BPF). Linux randomizes an executable's load base and the
mmap region each as a whole: the dynamic loader, then the shared libraries, are mapped top-down from
`mmap_base` in the same order each time. So a process of the same executable that was read (its
*template*) gives each mapping of one that was not, moved by the difference of the bases: the
executable's own mappings with `start_code`, the vDSO with `vdso`, the vsyscall page not at all,
everything else with `mmap_base`.

A template is trusted once two readings of the executable agree: each mapping at the same place
relative to its region's base. One reading may hold fewer mappings than another (read while the dynamic
loader was still mapping the libraries): a reading contained in the other agrees, and the larger is
kept. An executable run with other libraries (LD_PRELOAD, another LD_LIBRARY_PATH) lays out
differently; a reading that disagrees replaces the template, which then needs another agreeing reading
before it is used again. What this cannot see: a process of a trusted executable that was itself run
with other libraries and exited unread is laid out as the others were; an address outside every laid
out mapping stays unnamed. Bounded: `MAX_TEMPLATES` executables, the least recently used dropped first.

Not thread-safe by itself: the registry calls it under its lock.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

from agent.process.maps import MapEntry, MapKind, ProcessMaps
from agent.types import ImageLayout

MAX_TEMPLATES = 512

# A mapping's place relative to its region's base: (region, start, end, file offset, kind, path).
_Place = tuple[str, int, int, int, str, str]


@dataclass(slots=True)
class _Template:
    maps: ProcessMaps
    layout: ImageLayout
    places: frozenset[_Place]
    agreed: bool  # a second reading agreed with this one


def _region(entry: MapEntry, maps: ProcessMaps) -> str:
    if entry.kind is MapKind.VDSO:
        return "vdso"
    if entry.kind is MapKind.VSYSCALL:
        return "fixed"  # the same address in every process
    if entry.kind in (MapKind.FILE, MapKind.DELETED) and entry.path == maps.exe_path:
        return "exe"
    return "mmap"


def _base(region: str, layout: ImageLayout) -> int:
    if region == "fixed":
        return 0
    if region == "exe":
        return layout.start_code
    if region == "vdso" and layout.vdso:
        return layout.vdso
    return layout.mmap_base


def _places(maps: ProcessMaps, layout: ImageLayout) -> frozenset[_Place]:
    places = set()
    for entry in maps.mappings:
        region = _region(entry, maps)
        base = _base(region, layout)
        places.add((region, entry.start - base, entry.end - base, entry.offset, entry.kind.value, entry.path))
    return frozenset(places)


class ProcessTemplates:
    """Trusted layouts by executable (the kernel's device and inode of the file it runs)."""

    def __init__(self, capacity: int = MAX_TEMPLATES) -> None:
        self._capacity = capacity
        self._templates: OrderedDict[tuple[int, int], _Template] = OrderedDict()
        self.disagreed = 0  # readings that replaced a template laid out otherwise

    def learn(self, layout: ImageLayout, maps: ProcessMaps) -> None:
        """A process read while alive, soon after its announcement said where its image lay."""
        if not maps.mappings or not maps.exe_path:
            return
        key = (layout.exe_dev, layout.exe_ino)
        places = _places(maps, layout)
        known = self._templates.get(key)
        if known is None:
            self._templates[key] = _Template(maps, layout, places, agreed=False)
            while len(self._templates) > self._capacity:
                self._templates.popitem(last=False)
            return
        self._templates.move_to_end(key)
        if places <= known.places:
            known.agreed = True
        elif known.places <= places:  # the earlier reading was taken before every library was mapped
            self._templates[key] = _Template(maps, layout, places, agreed=True)
        else:
            self.disagreed += 1
            self._templates[key] = _Template(maps, layout, places, agreed=False)

    def lay_out(self, pid: int, layout: ImageLayout) -> ProcessMaps | None:
        """The mappings of `pid`, gone unread, from its executable's trusted template; None without one."""
        template = self._templates.get((layout.exe_dev, layout.exe_ino))
        if template is None or not template.agreed:
            return None
        self._templates.move_to_end((layout.exe_dev, layout.exe_ino))
        source = template.maps
        entries = []
        for entry in source.mappings:
            region = _region(entry, source)
            shift = _base(region, layout) - _base(region, template.layout)
            entries.append(dataclasses.replace(entry, start=entry.start + shift, end=entry.end + shift))
        entries.sort(key=lambda e: e.start)
        return ProcessMaps(
            pid=pid,
            comm=layout.comm,
            exe_path=source.exe_path,
            mappings=tuple(entries),
            starts=tuple(e.start for e in entries),
        )

    def __len__(self) -> int:
        return len(self._templates)
