"""Logging set-up: human-readable text by default, JSON lines with `--log-format json`.

The `logging` configuration section (`LoggingConfig`) is declared here.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

from agent.settings import choice, setting


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    SECTION: ClassVar[str] = "logging"

    level: str = setting("info", choice("debug", "info", "warning", "error"), "Log level.", "--log-level")
    format: str = setting("text", choice("text", "json"), "Log format: text or JSON lines.", "--log-format")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
