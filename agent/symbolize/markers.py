"""Symbolize stage: marker frames for stacks that could not be captured, and pprof address adjustment.

This module owns the names of marker frames. A sample whose stack was lost keeps its value under a
frame that says why (`[missing user stack]`, `[truncated user stack]`, ...), so the totals of a
profile still add up and the loss is visible where it happened.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.symbolize.types import Frame, FrameKind
from agent.types import StackStatus

_TEMPLATES = {
    StackStatus.MISSING: "[missing {side} stack]",
    StackStatus.ERROR: "[{side} stack error]",
    StackStatus.TRUNCATED: "[truncated {side} stack]",
}


def marker(name: str) -> Frame:
    """A MARKER frame: no address, no mapping, only a name saying what is missing."""
    return Frame(FrameKind.MARKER, 0, name, None)


NO_STACK = marker("[no stack]")  # neither stack was collected: keeps the sample (and its value) in the profile


# Built once: every lost stack of a kind shares one frame object.
_MARKERS = {
    (status, side): marker(template.format(side=side))
    for status, template in _TEMPLATES.items()
    for side in ("kernel", "user")
}


def status_marker(status: StackStatus, side: str) -> Frame | None:
    """The marker standing for a stack of `status` on `side` ("kernel"/"user"); None for OK and NOT_COLLECTED."""
    return _MARKERS.get((status, side))


def pprof_addresses(addresses: Sequence[int]) -> list[int]:
    """Leaf first: the leaf's PC as is, every caller's return address minus one.

    A return address points after the call instruction, possibly at the first byte of the next
    function; minus one lands inside the call, so lookups name the caller.
    """
    if not addresses:
        return []
    # A 0 can appear where a walk reached a frame with no return address (a thread's first frame):
    # it stays 0 rather than becoming -1, which no address field can hold.
    return [addresses[0], *(a - 1 if a > 0 else 0 for a in addresses[1:])]
