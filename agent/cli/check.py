"""``edge-agent check``: diagnose the node's set-up (agent/check/), as ``iotedge check`` does."""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.check import EXIT_FAIL, EXIT_OK, EXIT_WARN, CheckOptions, exit_code, render_table, run_checks, to_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="diagnose this node's set-up (config, state, keys, broker, registries, GPU)",
        description="Check what the agent needs before (or while) it runs: the configuration, the state "
        "directory and compile cache, free disk against the cache budget, trust and fleet keys, the MQTT "
        "broker with the configured TLS and credentials, the clock against the fleet's, each registry, "
        "GPU/NVML, the listening addresses and the control API's token. Each check passes, warns or fails "
        f"with what to do. Exit {EXIT_OK} when all pass, {EXIT_WARN} with warnings, {EXIT_FAIL} with failures.",
    )
    group = p.add_argument_group("configuration")
    group.add_argument("--config", metavar="FILE", help="TOML config file (env EDGE_AGENT_CONFIG)")
    group.add_argument("--state-dir", metavar="DIR", help="state directory (env EDGE_AGENT_STATE_DIR)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        metavar="S",
        help="each check's time limit; the checks run at once, the whole run takes little more (default 10)",
    )
    p.set_defaults(func=cmd_check)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def cmd_check(args: argparse.Namespace) -> int:
    options = CheckOptions(
        config_file=Path(args.config) if args.config else None,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        timeout_s=args.timeout,
    )
    findings = run_checks(options)
    print(to_json(findings) if args.json else render_table(findings))
    return exit_code(findings)
