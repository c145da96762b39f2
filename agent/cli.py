"""Command line: `profiling-agent run | check | config`.

Owns argument parsing and turning errors into exit codes: a `ConfigError` exits 2 with one line per
problem, each naming its key (every problem of the file, environment and flags at once), a failed
preflight prints the readiness report (exit 3), BPF load/attach errors their own codes; no traceback
reaches the user for any of them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from agent import __version__
from agent.config import SETTINGS, AgentConfig, as_dict, example_yaml, load_config
from agent.errors import AgentError, ConfigError, PreflightError

logger = logging.getLogger("agent")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="profiling-agent", description="Continuous profiling agent for Linux.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="profile the host until stopped (or for --duration)")
    _add_config_flags(run)
    run.add_argument("--dump-bpf", action="store_true", help="print the BPF source and cflags, then exit")
    commands.add_parser("check", help="report whether this host can run the agent, and with which fallbacks")
    config = commands.add_parser("config", help="print the effective configuration")
    _add_config_flags(config)
    config.add_argument("--example", action="store_true", help="print the documented example config instead")
    return parser


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (see config/agent.yaml)")
    for setting in SETTINGS:
        if not setting.flag:
            continue
        help_text = f"{setting.help} [{setting.key}; env {setting.env}]"
        if setting.flag_is_switch:
            parser.add_argument(setting.flag, dest=setting.key, action="store_const", const=True, help=help_text)
            continue
        parser.add_argument(
            setting.flag,
            dest=setting.key,
            action="append" if setting.flag_repeats else "store",
            default=None,
            help=help_text,
        )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {s.key: getattr(args, s.key) for s in SETTINGS if s.flag and getattr(args, s.key, None) is not None}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            return _check()
        config = load_config(args.config, overrides=_overrides(args))
        if args.command == "config":
            sys.stdout.write(example_yaml() if args.example else yaml.safe_dump(as_dict(config), sort_keys=False))
            return 0
        overrides = _overrides(args)
        return _run(config, lambda: load_config(args.config, overrides=overrides), dump_bpf=args.dump_bpf)
    except ConfigError as e:
        for problem in e.problems:
            print(f"profiling-agent: configuration error: {problem}", file=sys.stderr)
        return e.exit_code
    except PreflightError as e:
        print(f"profiling-agent: this host cannot run the agent yet:\n{e}", file=sys.stderr)
        return e.exit_code
    except AgentError as e:
        print(f"profiling-agent: {type(e).__name__}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


def _check() -> int:
    from agent.preflight import run_checks

    report = run_checks()
    print(report.render())
    return 0 if report.ok else 1


def _run(config: AgentConfig, reload_config: Callable[[], AgentConfig], *, dump_bpf: bool) -> int:
    from agent import logs
    from agent.daemon import Daemon  # imports the pipeline only when it is going to run

    logs.configure(config.logging.level, config.logging.format)
    daemon = Daemon(config, reload_config)
    if dump_bpf:
        print(daemon.program.dump())
        return 0
    daemon.install_signal_handlers()
    return daemon.run()
