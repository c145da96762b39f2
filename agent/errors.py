"""Error types shared by every stage.

Start-up errors are fatal and map to distinct exit codes (see `EXIT_CODES`); errors about one pid, one
frame or one record are counted and logged at debug level by the stage that meets them, never raised
past it.
"""

from __future__ import annotations

from collections.abc import Sequence


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""

    exit_code = 1


class ConfigError(AgentError):
    """Invalid configuration; `key` names the offending key path (e.g. `export.files.max_files`)."""

    exit_code = 2

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.message = message

    @property
    def problems(self) -> tuple[ConfigError, ...]:
        """Each problem on its own, to report one line per bad key."""
        return (self,)


class ConfigErrors(ConfigError):
    """Several configuration problems found in one pass, reported together (one line each).

    `key` and `message` are the first problem's, so code that handles one `ConfigError` still works.
    """

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        flat = tuple(problem for error in errors for problem in error.problems)
        if not flat:
            raise ValueError("ConfigErrors needs at least one problem")
        super().__init__(flat[0].key, flat[0].message)
        self.args = ("\n".join(str(problem) for problem in flat),)
        self._problems = flat

    @property
    def problems(self) -> tuple[ConfigError, ...]:
        return self._problems


def raise_all(errors: Sequence[ConfigError]) -> None:
    """Raise nothing, the one error, or every problem together as `ConfigErrors`."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)


class PreflightError(AgentError):
    """The host cannot run the agent (privileges, BPF, headers, tracefs); the message is the report."""

    exit_code = 3


class BpfLoadError(AgentError):
    """A BPF program failed to compile or load."""

    exit_code = 4


class BpfAttachError(AgentError):
    """A compiled BPF program could not be attached to its event."""

    exit_code = 5


class ExportError(AgentError):
    """A sink failed to deliver a profile; `retryable` says whether trying again can help."""

    exit_code = 6

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
