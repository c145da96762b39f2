"""Export stage wiring: builds the local file sink from the configuration (start-up and reload)."""

from __future__ import annotations

from pathlib import Path

from agent.config import AgentConfig
from agent.export.files import FileSink


def make_file_sink(config: AgentConfig) -> FileSink | None:
    """The file sink, or None when local files are off (explicitly, or auto with OTLP on)."""
    if not config.files_enabled:
        return None
    files = config.export.files
    return FileSink(Path(files.output_dir), files.max_files, files.max_bytes)
