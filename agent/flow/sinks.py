"""Flow: builds the local file sink from its config section (at start-up and on reload)."""

from __future__ import annotations

from pathlib import Path

from agent.export.files import FilesConfig, FileSink


def make_file_sink(files: FilesConfig, enabled: bool) -> FileSink | None:
    """The file sink, or None when local files are off (`AgentConfig.files_enabled` decides `auto`)."""
    if not enabled:
        return None
    return FileSink(Path(files.output_dir), files.max_files, files.max_bytes)
