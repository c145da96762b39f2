"""Config reload (SIGHUP): which changes apply to a running agent, and the config that results.

Owns the split between settings the daemon can change in place (logging, the report interval, the
local file sink, process filters, the readiness threshold) and those that need a restart (anything
loaded into the kernel or bound at start-up: profilers, frequency, pids, buffers, OTLP connection,
metrics address). A reload applies the first kind, keeps the running value of the second and says
which keys those were, so the current interval's data is never lost to a reload.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.config import AgentConfig, as_dict

LIVE_PREFIXES = (
    "logging.",
    "profiling.interval_s",
    "export.files.",
    "filters.",
    "metrics.ready_export_failure_s",
)


def _flatten(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict) and not key.endswith("headers"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_keys(old: AgentConfig, new: AgentConfig) -> list[str]:
    before, after = _flatten(as_dict(old)), _flatten(as_dict(new))
    return sorted(key for key in after if before.get(key) != after[key])


def is_live(key: str) -> bool:
    return key.startswith(LIVE_PREFIXES)


def merge_live(old: AgentConfig, new: AgentConfig) -> AgentConfig:
    """`old` with every live-applicable setting taken from `new`."""
    return dataclasses.replace(
        old,
        logging=new.logging,
        filters=new.filters,
        profiling=dataclasses.replace(old.profiling, interval_s=new.profiling.interval_s),
        export=dataclasses.replace(old.export, files=new.export.files),
        metrics=dataclasses.replace(old.metrics, ready_export_failure_s=new.metrics.ready_export_failure_s),
    )
