"""The ``edge-agent`` command line. Each area registers its verbs from its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agent import __version__
from agent.cli import check, core, images, lifecycle, wasi
from agent.errors import AgentError, ConfigError

AREAS = (core, images, lifecycle, wasi, check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Edge inference daemon: serves WebAssembly model images over the Open Inference Protocol.",
        epilog="Configuration: --config FILE (TOML), then EDGE_AGENT_* environment variables, then flags.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for area in AREAS:
        area.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `wasi run` parses its own argv: argparse cannot hand an app arguments that start with a dash,
    # and its bad flags exit 64 (agent/cli/wasi.py).
    if argv[:2] == ["wasi", "run"]:
        args = argparse.Namespace(func=lambda _: wasi.cmd_run(argv[2:]))
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AgentError as exc:
        # Once: not again when a log line said it. The exit code is the error's own (agent/errors.py).
        prefix = "configuration error: " if isinstance(exc, ConfigError) else ""
        core.report_error(f"{prefix}{exc}", logged_as=str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
