"""Export stage: the `Sink` protocol every exporter (local files, OTLP) implements.

The report hand-off (`agent.flow.report.Reporter`, on the report thread) gives each finished profile,
together with its serialized pprof bytes (built only when a sink needs them), to every configured
sink; the daemon shuts them down with the remaining deadline at exit.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from agent.symbolize.types import Profile


@runtime_checkable
class Sink(Protocol):
    """A destination for finished profiles.

    `export` raises `agent.errors.ExportError` when delivery failed; its `retryable` flag says whether
    handing the same profile over again can help. `shutdown` is safe to call more than once.
    """

    name: str
    # Whether `export` uses the pprof bytes: when no sink does, they are not built (b"" is passed).
    needs_pprof: bool

    def export(self, profile: Profile, pprof: bytes) -> object: ...

    def shutdown(self, deadline_s: float) -> None: ...
