"""Export stage: the local file sink, the exporter the agent embeds by default.

Owns one output directory: writes each profile there as `<spec name>-<UTC start>.pb.gz` (the
gzip-compressed pprof `go tool pprof` reads), atomically, and keeps the directory within a file
count and byte budget by deleting the oldest files it wrote. Files that do not match its name
pattern are never touched. Its configuration section, `export.files` (`FilesConfig`), is declared here.
"""

from __future__ import annotations

import errno
import gzip
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar, NamedTuple

from agent.errors import ConfigError, ExportError
from agent.settings import MiB, parse_auto_bool, parse_str, ranged_int, setting
from agent.symbolize.types import Profile

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FilesConfig:
    """The embedded default sink's section."""

    SECTION: ClassVar[str] = "export.files"

    enabled: bool | None = setting(  # None: auto
        None,
        parse_auto_bool,
        "Write gzipped pprof files locally: true, false or auto (on when OTLP export is off).",
        expected="true, false or auto",
    )
    output_dir: str = setting(
        "/var/lib/profiling-agent/profiles",
        parse_str,
        "Directory for <profiler>-<UTC start>.pb.gz files.",
        "--output-dir",
    )
    max_files: int = setting(
        1000,
        ranged_int(0, 10_000_000),
        "Keep at most this many profile files; oldest deleted first (0: no limit).",
    )
    max_bytes: int = setting(
        1024 * MiB,
        ranged_int(0, 1 << 50),
        "Keep at most this many bytes of profile files; oldest deleted first (0: no limit).",
    )


DIR_MODE = 0o755
# Readable by the unprivileged user who opens the profiles with `go tool pprof`, like the directory.
FILE_MODE = 0o644
_GZIP_LEVEL = 6  # what Go's profile.Write uses; 9 costs much more CPU for a few percent

# Disk full, quota, transient I/O and resource exhaustion can clear up; anything else (a path that is
# not a directory, permissions, a read-only file system) needs an operator.
_RETRYABLE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.EINTR, errno.ENOMEM, errno.EMFILE, errno.ENFILE}
)
_ENOSPC_MARGIN = 64 * 1024  # free bytes beyond the profile's own, for the file system's blocks
_SPEC_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
# The temp files start with "." so they can never match this pattern and be taken for profiles.
_PROFILE_FILE = re.compile(
    r"(?P<name>[A-Za-z0-9_][A-Za-z0-9_.-]*)-(?P<stamp>\d{8}T\d{6}Z)(?:-(?P<counter>\d+))?\.pb\.gz"
)

# What `_write` names its temp files (mkstemp adds the random part).
_TEMP_FILE = re.compile(r"\.[A-Za-z0-9_][A-Za-z0-9_.-]*-\d{8}T\d{6}Z\.[A-Za-z0-9_]+\.tmp")


class _OwnFile(NamedTuple):
    stamp: str  # first, so that sorting puts the oldest profile first
    counter: int
    name: str
    size: int


class FileSink:
    """Writes profiles to `output_dir` and deletes its oldest ones beyond `max_files` / `max_bytes` (0 = no limit)."""

    name: str = "files"
    needs_pprof: bool = True

    def __init__(self, output_dir: Path, max_files: int, max_bytes: int) -> None:
        if max_files < 0 or max_bytes < 0:
            raise ValueError(f"max_files and max_bytes must be >= 0, got {max_files} and {max_bytes}")
        self._dir = output_dir
        self._max_files = max_files
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._shut_down = False
        self.files_written = 0
        self.bytes_written = 0  # compressed bytes, as they sit on disk
        self.files_deleted = 0
        self.files_evicted = 0  # own oldest files deleted to make room on a full disk
        self.interrupted_writes = 0  # temp files a killed earlier run left, deleted at start-up
        self.errors = 0
        # A directory that cannot be made or written fails now, as the configuration problem it is
        # (exit 2 at start-up, a refused reload), not at the first report.
        self._check_usable()
        self._remove_stale_temp_files()

    def _check_usable(self) -> None:
        key = f"{FilesConfig.SECTION}.output_dir"
        try:
            self._ensure_dir()
        except ExportError as e:
            raise ConfigError(key, str(e)) from None
        try:  # named like the sink's own temp files, so one left by a crash here is removed too
            fd, name = tempfile.mkstemp(prefix=".write-check-19700101T000000Z.", suffix=".tmp", dir=self._dir)
        except OSError as exc:
            raise ConfigError(key, f"cannot write to profile directory {self._dir}: {exc.strerror or exc}") from None
        os.close(fd)
        _remove_quietly(Path(name))

    def _remove_stale_temp_files(self) -> None:
        """Temp files a crash left mid-write (ours: `.<profiler>-<time>.*.tmp`) are never renamed: delete them."""
        for path in self._dir.glob(".*.tmp"):
            if _TEMP_FILE.fullmatch(path.name):
                _remove_quietly(path)
                self.interrupted_writes += 1
                logger.warning("removed %s, a profile the last run did not finish writing", path)

    @property
    def output_dir(self) -> Path:
        return self._dir

    def export(self, profile: Profile, pprof: bytes) -> Path:
        """Write `pprof` (uncompressed pprof bytes) gzip-compressed; returns the path written."""
        with self._lock:
            if self._shut_down:
                raise ExportError(f"file sink for {self._dir} is shut down", retryable=False)
            data = gzip.compress(pprof, compresslevel=_GZIP_LEVEL, mtime=0)
            base = _base_name(profile)
            try:
                try:
                    path = self._write(base, data)
                except _DiskFull:
                    # The newest profile matters most: make room from this sink's own oldest, once.
                    if not self._evict_for(len(data)):
                        raise
                    path = self._write(base, data)
            except ExportError:
                self.errors += 1
                raise
            self.files_written += 1
            self.bytes_written += len(data)
            logger.debug("wrote %s (%d bytes)", path, len(data))
            self._enforce_retention(keep=path.name)
            return path

    def shutdown(self, deadline_s: float) -> None:
        """Stop accepting profiles. Nothing is buffered, so this only waits for an export in progress."""
        acquired = self._lock.acquire(timeout=max(deadline_s, 0.0))
        try:
            if self._shut_down:
                return
            self._shut_down = True
            if not acquired:
                logger.warning("file sink for %s shut down while an export was still running", self._dir)
        finally:
            if acquired:
                self._lock.release()

    def _ensure_dir(self) -> None:
        existed = self._dir.is_dir()
        try:
            self._dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            if not existed:
                # mkdir's mode is narrowed by the umask; the directory is meant to be readable by users.
                self._dir.chmod(DIR_MODE)
        except OSError as exc:
            raise _export_error(f"cannot create profile directory {self._dir}", exc) from exc

    def _write(self, base: str, data: bytes) -> Path:
        """Write `data` to a temp file in the output directory, fsync it and rename it into place."""
        self._ensure_dir()
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=self._dir)
        except OSError as exc:
            raise _export_error(f"cannot write to profile directory {self._dir}", exc) from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fchmod(file.fileno(), FILE_MODE)
                os.fsync(file.fileno())
            path = self._free_path(base)
            os.replace(tmp, path)
        except BaseException as exc:
            _remove_quietly(tmp)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _DiskFull(f"cannot write profile {base} to {self._dir}: {exc.strerror}", retryable=True) from exc
            if isinstance(exc, OSError):
                raise _export_error(f"cannot write profile {base} to {self._dir}", exc) from exc
            raise
        self._fsync_dir()
        return path

    def _free_path(self, base: str) -> Path:
        path = self._dir / f"{base}.pb.gz"
        counter = 0
        while os.path.lexists(path):  # two profiles of the same kind that started in the same second
            counter += 1
            path = self._dir / f"{base}-{counter}.pb.gz"
        return path

    def _fsync_dir(self) -> None:
        # Makes the rename durable. The file is already in place if this fails, so reporting the export
        # as failed would only make the caller write it twice.
        try:
            dir_fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            logger.debug("cannot fsync directory %s: %s", self._dir, exc)

    def _enforce_retention(self, keep: str) -> None:
        """Delete the oldest own files until both budgets hold; the file just written (`keep`) always stays."""
        if not self._max_files and not self._max_bytes:
            return
        try:
            files = self._own_files()
        except OSError as exc:
            self.errors += 1
            logger.warning("cannot list %s to enforce retention: %s", self._dir, exc)
            return
        count = len(files)
        total = sum(f.size for f in files)
        for own in files:
            if not self._over_budget(count, total):
                break
            if own.name == keep:
                continue
            try:
                (self._dir / own.name).unlink()
            except FileNotFoundError:
                pass  # removed by someone else: gone all the same
            except OSError as exc:
                self.errors += 1
                logger.warning("cannot delete old profile %s: %s", self._dir / own.name, exc)
                continue
            else:
                self.files_deleted += 1
                logger.debug("deleted old profile %s (%d bytes)", own.name, own.size)
            count -= 1
            total -= own.size

    def _evict_for(self, size: int) -> bool:
        """Delete this sink's oldest files until `size` bytes (and a margin) are free on the disk, or
        none is left; whether any was deleted (each counted in `files_evicted`)."""
        try:
            files = self._own_files()
        except OSError as exc:
            logger.warning("disk full, and cannot list %s to make room: %s", self._dir, exc)
            return False
        evicted = 0
        for own in files:
            if self._free_bytes() >= size + _ENOSPC_MARGIN:
                break
            try:
                (self._dir / own.name).unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.warning("disk full, and cannot delete old profile %s: %s", self._dir / own.name, exc)
                break
            evicted += 1
        self.files_evicted += evicted
        if evicted:
            logger.warning("disk full under %s: deleted the %d oldest profiles to write the newest", self._dir, evicted)
        else:
            logger.warning("disk full under %s, and none of its files are the agent's to delete", self._dir)
        return evicted > 0

    def _free_bytes(self) -> int:
        try:
            stats = os.statvfs(self._dir)
        except OSError:
            return 0
        return stats.f_bavail * stats.f_frsize

    def _over_budget(self, count: int, total: int) -> bool:
        return (self._max_files > 0 and count > self._max_files) or (self._max_bytes > 0 and total > self._max_bytes)

    def _own_files(self) -> list[_OwnFile]:
        """This sink's profile files in the directory, oldest first."""
        files: list[_OwnFile] = []
        with os.scandir(self._dir) as entries:
            for entry in entries:
                match = _PROFILE_FILE.fullmatch(entry.name)
                if match is None:
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    size = entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue
                files.append(_OwnFile(match["stamp"], int(match["counter"] or 0), entry.name, size))
        files.sort()
        return files


def _base_name(profile: Profile) -> str:
    """`<spec name>-<UTC start time>`, e.g. `cpu-20261122T160512Z`."""
    name = profile.spec.name
    if _SPEC_NAME.fullmatch(name) is None:
        # The name becomes part of a path: anything else could escape the directory or hide the file.
        raise ValueError(f"profile name {name!r} cannot be used in a file name")
    start = datetime.fromtimestamp(profile.start_unix_ns // 1_000_000_000, tz=UTC)
    return f"{name}-{start.strftime(_STAMP_FORMAT)}"


class _DiskFull(ExportError):
    """A write failed with ENOSPC or EDQUOT: room can be made."""


def _export_error(message: str, exc: OSError) -> ExportError:
    reason = exc.strerror or str(exc)
    return ExportError(f"{message}: {reason}", retryable=exc.errno in _RETRYABLE_ERRNOS)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("cannot remove temporary file %s: %s", path, exc)
