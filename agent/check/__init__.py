"""``edge-agent check``: a node's set-up diagnosed before (or while) the agent runs, as ``iotedge check`` does.

Each check answers with one :class:`Finding`: a status (pass, warn, fail; skip when it does not
apply to this node's configuration), a one-line finding and what to do about it. The checks reuse
the agent's own code for what they judge (the config parsers, the MQTT connection builder, the
registry transport, the key loaders), so a check passes exactly when the agent would cope.

The runner: the configuration first (nothing else can be judged without it), then every other
check at once, each in a worker thread or as a coroutine under its own timeout, the whole run
bounded by that timeout plus a margin. Exit 0 when nothing warns or fails, 1 with warnings,
2 with failures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

Status = Literal["pass", "warn", "fail", "skip"]
STATUSES: tuple[Status, ...] = ("pass", "warn", "fail", "skip")

EXIT_OK = 0
EXIT_WARN = 1
EXIT_FAIL = 2

# A check that has not answered by its timeout is reported as failed; the run as a whole gets this
# much more than one check's timeout (the checks run at once) before it reports what it has.
RUN_MARGIN_S = 2.0


@dataclasses.dataclass(frozen=True)
class Finding:
    name: str
    status: Status
    finding: str
    action: str = ""
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "finding": self.finding,
            "action": self.action,
            "elapsed_s": round(self.elapsed_s, 3),
        }


@dataclasses.dataclass(frozen=True)
class CheckOptions:
    config_file: Path | None = None
    state_dir: Path | None = None
    # One check's time limit (a connect, a registry round trip, NVML's start).
    timeout_s: float = 10.0


# A check run in a worker thread (file system, NVML, a registry's blocking HTTP client) or on the loop.
SyncCheck = Callable[[], Finding | list[Finding]]
AsyncCheck = Callable[[], Awaitable[list[Finding]]]


@dataclasses.dataclass(frozen=True)
class Planned:
    """One check as the runner schedules it: the names it reports (for a timeout) and how it runs."""

    names: tuple[str, ...]
    sync: SyncCheck | None = None
    run_async: AsyncCheck | None = None


def exit_code(findings: Sequence[Finding]) -> int:
    statuses = {f.status for f in findings}
    if "fail" in statuses:
        return EXIT_FAIL
    if "warn" in statuses:
        return EXIT_WARN
    return EXIT_OK


def run_checks(options: CheckOptions) -> list[Finding]:
    """Every check, in report order; bounded by ``options.timeout_s`` + :data:`RUN_MARGIN_S` overall."""
    return asyncio.run(_run(options))


async def _run(options: CheckOptions) -> list[Finding]:
    from agent.check import config_checks, local_checks, network_checks

    started = time.monotonic()
    config, config_findings = config_checks.load(options)
    if config is None:
        skipped = [
            Finding(name, "skip", "not checked: the configuration does not load")
            for name in (*local_checks.NAMES, *network_checks.NAMES)
        ]
        return [*config_findings, *skipped]
    plan = [*local_checks.plan(config, options), *network_checks.plan(config, options)]
    # Its own pool: a check stuck in a system call (a hung NFS mount, NVML) must not hold the run's end.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(4, len(plan)), thread_name_prefix="check")
    loop = asyncio.get_running_loop()
    try:
        tasks = [asyncio.create_task(_one(loop, pool, p, options.timeout_s)) for p in plan]
        done, _pending = await asyncio.wait(tasks, timeout=options.timeout_s + RUN_MARGIN_S)
        results: list[Finding] = []
        for task, planned in zip(tasks, plan, strict=True):
            if task in done:
                results.extend(task.result())
            else:
                task.cancel()
                results.extend(_timed_out(planned, time.monotonic() - started))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return [*config_findings, *results]


async def _one(
    loop: asyncio.AbstractEventLoop, pool: concurrent.futures.Executor, planned: Planned, timeout_s: float
) -> list[Finding]:
    t0 = time.monotonic()
    try:
        if planned.sync is not None:
            out = await asyncio.wait_for(loop.run_in_executor(pool, planned.sync), timeout_s)
            found = out if isinstance(out, list) else [out]
        else:
            assert planned.run_async is not None
            found = await asyncio.wait_for(planned.run_async(), timeout_s)
    except TimeoutError:
        return _timed_out(planned, time.monotonic() - t0, timeout_s)
    except Exception as exc:  # noqa: BLE001 - a check's own bug is one failed line, never a crashed report
        return [
            Finding(
                name, "fail", f"the check itself failed: {type(exc).__name__}: {exc}", elapsed_s=time.monotonic() - t0
            )
            for name in planned.names
        ]
    elapsed = time.monotonic() - t0
    return [dataclasses.replace(f, elapsed_s=elapsed) for f in found]


def _timed_out(planned: Planned, elapsed: float, timeout_s: float | None = None) -> list[Finding]:
    limit = f" within {timeout_s:g} s" if timeout_s is not None else ""
    return [
        Finding(name, "fail", f"no answer{limit}", "see why it hangs, or raise --timeout", elapsed)
        for name in planned.names
    ]


# -- reports ---------------------------------------------------------------------------------------
def summary(findings: Sequence[Finding]) -> dict[str, int]:
    return {status: sum(1 for f in findings if f.status == status) for status in STATUSES}


def to_json(findings: Sequence[Finding]) -> str:
    code = exit_code(findings)
    doc = {
        "status": {EXIT_OK: "pass", EXIT_WARN: "warn", EXIT_FAIL: "fail"}[code],
        "exit_code": code,
        "summary": summary(findings),
        "checks": [f.to_dict() for f in findings],
    }
    return json.dumps(doc, indent=2)


def render_table(findings: Sequence[Finding]) -> str:
    """Aligned columns (status, check, finding), each action under its finding, and a summary line."""
    name_w = max((len(f.name) for f in findings), default=5)
    lines = [f"{'STATUS':<6}  {'CHECK':<{name_w}}  FINDING"]
    for f in findings:
        lines.append(f"{f.status.upper():<6}  {f.name:<{name_w}}  {f.finding}")
        if f.action and f.status in ("warn", "fail", "skip"):
            lines.append(f"{'':<6}  {'':<{name_w}}  -> {f.action}")
    counts = summary(findings)
    word = {EXIT_OK: "ok", EXIT_WARN: "warnings", EXIT_FAIL: "failures"}[exit_code(findings)]
    lines.append("")
    lines.append(
        f"{word}: {counts['pass']} passed, {counts['warn']} warning(s), {counts['fail']} failure(s), "
        f"{counts['skip']} skipped"
    )
    return "\n".join(lines)
