"""Incoming fleet commands: check, remember, execute, reply, acknowledge.

For each message, on the receive loop:

1. :func:`parse_command` checks size, envelope, signature, body, target and
   times; any fault is refused with a reply naming the code and field.
2. The id is recorded in the :class:`CommandLog` before anything runs: a
   re-delivery (MQTT's DUP flag) of a known id is answered from the log and
   never runs twice; the same command published again without DUP (a replay)
   and an id reused for another command are refused as ``replayed``.
3. The command runs: read-only ones (status, cache-verify) at once,
   commands that change the node one at a time in arrival order, so a
   deploy followed by a rollback cannot race. Each goes to the node's
   :class:`agent.control.Control` with ``source="mqtt"``.
4. The reply (result, or error code and message) is stored with the id and
   published to the command's MQTT v5 response topic with its correlation
   data, or to ``<prefix>/nodes/<node>/replies`` when it named none or one
   inside the agent's own topic tree (:meth:`Topics.honours_response_topic`).
   A refusal always goes to ``<prefix>/nodes/<node>/replies``: a sender whose
   command fails verification does not get to say where the node speaks.
5. Only then is the command acknowledged (PUBACK) to the broker. If the link
   dropped before the reply could go out, the unacknowledged command comes
   back with DUP after the reconnect (the session is persistent) and gets
   its stored reply: every command is answered even across an outage, and a
   crash mid-command is answered "interrupted" rather than run again.
   Acknowledgements may therefore leave in a different order than the
   commands arrived; brokers accept that, and it is what lets a long deploy
   not hold up the status command behind it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import structlog

from agent.control import Control, ModelDeployment
from agent.errors import AgentError, Unavailable
from agent.events import EventBus
from agent.mqtt.commandlog import CommandLog
from agent.mqtt.commands import Command, CommandRefused, FleetKeys, Limits, claimed_command, claimed_id, parse_command
from agent.mqtt.topics import Topics

# (topic, payload, correlation data) -> False when the link is down and the reply could not go out
# (the command is then left unacknowledged, for the broker to deliver again after the reconnect).
Reply = Callable[[str, bytes, bytes | None], bool]
PRUNE_EVERY_S = 3600.0


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation: bytes | None = None
    # MQTT's DUP flag: the broker delivering the same PUBLISH again (after a lost PUBACK or a reconnect).
    redelivered: bool = False
    ack: Callable[[], None] = lambda: None


class RuntimeSettings(Protocol):
    """The channel's own settings that ``set-config`` may change: keys starting with one of ``prefixes``."""

    # Read-only: the dispatcher only reads it, so a class constant of any tuple length qualifies.
    @property
    def prefixes(self) -> tuple[str, ...]: ...

    def check(self, changes: dict[str, Any]) -> dict[str, Any]: ...

    def apply(self, checked: dict[str, Any]) -> None: ...


class Dispatcher:
    def __init__(
        self,
        *,
        topics: Topics,
        keys: FleetKeys,
        limits: Limits,
        commands: CommandLog,
        control: Callable[[], Control | None],
        events: EventBus,
        reply: Reply,
        runtime_settings: RuntimeSettings | None = None,
        extra_status: Callable[[], dict[str, Any]] | None = None,
        clock: Callable[[], float] = time.time,
        log: Any = None,
    ):
        self.topics = topics
        self.keys = keys
        self.limits = limits
        self.commands = commands
        self._control = control
        self.events = events
        self._reply = reply
        self.runtime_settings = runtime_settings
        self.extra_status = extra_status
        self.clock = clock
        self.log = log or structlog.get_logger("edge_agent.mqtt")
        self._running: dict[str, asyncio.Future[bytes]] = {}
        self._queue: asyncio.Queue[tuple[Command, asyncio.Future[bytes]]] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._last_prune = float("-inf")

    async def start(self) -> None:
        self._worker = asyncio.create_task(self._serial_worker(), name="mqtt-commands")

    async def stop(self) -> None:
        for task in [*self._tasks, *([self._worker] if self._worker else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks, *([self._worker] if self._worker else []), return_exceptions=True)

    # -- receiving ---------------------------------------------------------------------------------
    async def handle(self, msg: Incoming) -> None:
        target = self.topics.target_of(msg.topic)
        if target is None:  # a broker delivering a topic we did not subscribe to
            msg.ack()
            self.log.warning("mqtt message on an unexpected topic ignored", topic=msg.topic)
            return
        now = self.clock()
        try:
            cmd = parse_command(msg.payload, keys=self.keys, expected_target=target, limits=self.limits, now=now)
        except CommandRefused as exc:
            self._refuse(msg, claimed_id(msg.payload), claimed_command(msg.payload), exc)
            return
        if now - self._last_prune >= PRUNE_EVERY_S:
            self._last_prune = now
            await asyncio.to_thread(self.commands.prune, now)
        admission, stored = await asyncio.to_thread(
            self.commands.admit, cmd.id, cmd.digest, cmd.name, cmd.expires_at + self.limits.max_skew_s
        )
        if admission == "conflict":
            refusal = CommandRefused(
                "replayed", f"command id {cmd.id} was already used for a different command", "body.id"
            )
            self._refuse(msg, cmd.id, cmd.name, refusal)
        elif admission != "new" and not msg.redelivered:
            # The same signed command published again (a captured message replayed, or a tool
            # retrying): refused, never run twice; the first outcome is in the reply when known.
            refusal = CommandRefused(
                "replayed", f"command {cmd.id} was already received; a command runs at most once", "body.id"
            )
            self._refuse(msg, cmd.id, cmd.name, refusal, original=stored)
        elif admission == "done":
            assert stored is not None
            self.log.info("mqtt command re-delivered; answered from the log", id=cmd.id, command=cmd.name)
            self._send_reply(msg, stored)
        elif admission == "running":
            future = self._running.get(cmd.id)
            if future is None:  # recorded before a crash, never finished: running it again could do it twice
                reply = self._reply_doc(
                    cmd.id,
                    cmd.name,
                    error={
                        "code": "interrupted",
                        "message": "the agent restarted while this command ran; its outcome is unknown (see status)",
                    },
                )
                await asyncio.to_thread(self.commands.finish, cmd.id, reply)
                self._send_reply(msg, reply)
            else:
                self._spawn(self._reply_when_done(msg, future))
        else:
            future = asyncio.get_running_loop().create_future()
            self._running[cmd.id] = future
            self._spawn(self._reply_when_done(msg, future))
            if cmd.spec.mutating:
                self._queue.put_nowait((cmd, future))
            else:
                self._spawn(self._run(cmd, future))

    # -- executing ---------------------------------------------------------------------------------
    async def _serial_worker(self) -> None:
        while True:
            cmd, future = await self._queue.get()
            await self._run(cmd, future)

    async def _run(self, cmd: Command, future: asyncio.Future[bytes]) -> None:
        t0 = time.perf_counter()
        try:
            result = await self._execute(cmd)
            reply = self._reply_doc(cmd.id, cmd.name, result=result)
            error_code = None
        except CommandRefused as exc:
            reply, error_code = self._reply_doc(cmd.id, cmd.name, error=exc.to_dict()), exc.code
        except AgentError as exc:
            error_code = error_code_of(exc)
            reply = self._reply_doc(cmd.id, cmd.name, error={"code": error_code, "message": str(exc)})
        except asyncio.CancelledError:
            self._running.pop(cmd.id, None)
            raise
        except Exception as exc:  # a bug below us: answer, keep the channel and the agent alive
            self.log.exception("mqtt command failed unexpectedly", id=cmd.id, command=cmd.name)
            error_code = "internal"
            reply = self._reply_doc(cmd.id, cmd.name, error={"code": "internal", "message": repr(exc)})
        ms = round((time.perf_counter() - t0) * 1000, 2)
        await asyncio.to_thread(self.commands.finish, cmd.id, reply)
        self._running.pop(cmd.id, None)
        if not future.done():
            future.set_result(reply)
        self.events.publish(
            "command.executed",
            id=cmd.id,
            command=cmd.name,
            ok=error_code is None,
            **({"code": error_code} if error_code else {}),
            ms=ms,
            source="mqtt",
        )
        self.log.info("mqtt command executed", id=cmd.id, command=cmd.name, ok=error_code is None, ms=ms)

    async def _execute(self, cmd: Command) -> dict[str, Any]:
        control = self._control()
        if control is None:
            raise Unavailable("the agent's control is not ready yet; try again")
        args = cmd.args
        match cmd.name:
            case "deploy":
                return await control.deploy(args["ref"], source="mqtt", model=args.get("model"))
            case "rollback":
                return await control.rollback(args["model"], source="mqtt")
            case "pin":
                return await control.pin(args["model"], args.get("pinned", True), source="mqtt")
            case "unload":
                return await control.unload(args["model"], source="mqtt")
            case "status":
                status = await control.status()
                if self.extra_status is not None:
                    status = {**status, "mqtt": self.extra_status()}
                return status
            case "cache-gc":
                return await control.cache_gc()
            case "cache-verify":
                return await control.cache_verify()
            case "set-config":
                return await self._set_config(control, args["changes"])
            case "set-desired":
                deployments = [ModelDeployment.from_dict(d) for d in args["deployments"]]
                return await control.set_desired("mqtt", deployments)
        raise AssertionError(f"command table and dispatcher disagree about {cmd.name}")

    async def _set_config(self, control: Control, changes: dict[str, Any]) -> dict[str, Any]:
        """The channel's keys (``mqtt.*``, ``telemetry.*``) are checked first; then the agent's change; then ours.

        So a refused value on either side changes nothing.
        """
        prefixes = self.runtime_settings.prefixes if self.runtime_settings is not None else ()
        ours = {k: v for k, v in changes.items() if k.startswith(prefixes)}
        rest = {k: v for k, v in changes.items() if k not in ours}
        checked = self.runtime_settings.check(ours) if ours and self.runtime_settings is not None else {}
        result: dict[str, Any] = await control.set_config(rest) if rest else {"applied": {}}
        if checked:
            assert self.runtime_settings is not None
            self.runtime_settings.apply(checked)
            result = {**result, "applied": {**result.get("applied", {}), **checked}}
        return result

    # -- replying ----------------------------------------------------------------------------------
    def _reply_doc(
        self,
        command_id: str | None,
        command: str | None,
        *,
        result: Any = None,
        error: dict[str, Any] | None = None,
        original: bytes | None = None,
    ) -> bytes:
        doc: dict[str, Any] = {"id": command_id, "node": self.topics.node, "command": command, "ok": error is None}
        if error is None:
            doc["result"] = result
        else:
            doc["error"] = error
        if original is not None:
            doc["original"] = orjson.Fragment(original)
        doc["ts"] = round(time.time(), 3)
        return orjson.dumps(doc, default=str, option=orjson.OPT_NON_STR_KEYS)

    def _send_reply(self, msg: Incoming, payload: bytes, *, refusal: bool = False) -> None:
        """Publish the reply, then acknowledge the command; a reply the link could not take leaves it unacked."""
        if self._reply(self._reply_topic(msg, refusal), payload, msg.correlation):
            msg.ack()

    def _reply_topic(self, msg: Incoming, refusal: bool) -> str:
        wanted = msg.response_topic
        if not wanted or refusal:
            return self.topics.replies
        if not self.topics.honours_response_topic(wanted):
            self.log.warning(
                "mqtt response topic inside the agent's topic tree not honoured; replying on the node's replies topic",
                response_topic=wanted,
                replies=self.topics.replies,
            )
            return self.topics.replies
        return wanted

    async def _reply_when_done(self, msg: Incoming, future: asyncio.Future[bytes]) -> None:
        payload = await asyncio.shield(future)
        self._send_reply(msg, payload)

    def _refuse(
        self,
        msg: Incoming,
        command_id: str | None,
        command: str | None,
        refusal: CommandRefused,
        original: bytes | None = None,
    ) -> None:
        self.log.warning(
            "mqtt command refused",
            id=command_id,
            command=command,
            code=refusal.code,
            reason=str(refusal),
            field=refusal.field,
            topic=msg.topic,
        )
        self.events.publish(
            "command.refused",
            id=command_id,
            command=command,
            code=refusal.code,
            message=str(refusal),
            field=refusal.field,
            topic=msg.topic,
            source="mqtt",
        )
        self._send_reply(
            msg, self._reply_doc(command_id, command, error=refusal.to_dict(), original=original), refusal=True
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def error_code_of(exc: AgentError) -> str:
    """The reply's ``error.code``: the error's declared ``wire_code`` (agent/errors.py holds the table;
    a class's name plays no part, so renaming one does not change the protocol)."""
    return exc.wire_code
