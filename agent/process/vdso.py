"""Process stage (stage-neutral): the vDSO, the ELF image the kernel maps into every process, with no file.

Every 64-bit process on a kernel maps the same image, so the agent reads its own copy, once, and
both the symbolize stage (names such as `__vdso_clock_gettime`) and the unwind stage (its CFI) use
it for every process. It is read through the agent's own /proc/self, not the configured proc root:
in a container that sees the host's /proc, the agent's pid there is not its own.
"""

from __future__ import annotations

from pathlib import Path

from agent.process.maps import MapKind, parse_maps_line

VDSO_PATH = "[vdso]"
_SELF = Path("/proc/self")


class VdsoUnavailable(OSError):
    """The agent's own vDSO could not be found or read (a kernel booted with vdso=0, a restricted /proc)."""


def read_own_vdso(proc_self: Path = _SELF) -> bytes:
    """The bytes of the vDSO mapped into this process."""
    try:
        with open(proc_self / "maps", encoding="utf-8", errors="surrogateescape") as maps:
            entries = [parse_maps_line(line) for line in maps]
        vdso = next((entry for entry in entries if entry is not None and entry.kind is MapKind.VDSO), None)
        if vdso is not None:
            with open(proc_self / "mem", "rb") as mem:
                mem.seek(vdso.start)
                return mem.read(vdso.end - vdso.start)
    except OSError as e:
        raise VdsoUnavailable(f"cannot read the vDSO through {proc_self}: {e}") from e
    raise VdsoUnavailable(f"no {VDSO_PATH} in {proc_self}/maps")
