"""A WASI-NN command app (``wasi_nn.app == "command"``) served per v2 inference request.

Such an app is a WASI command, as WasmEdge's ggml example apps are: it reads its prompt from its
last argument, calls ``wasi_ephemeral_nn`` and prints its answer. A v2 request gives it one BYTES
input (the prompt, ``shape [1]``); the app runs once on a worker thread of its own with
``args = wasi_nn.args + [prompt]`` and its stdout captured (``agent.wasinn.command.run_command``,
on the version's compiled module and named model, loaded once per version and shared), and the
answer is one BYTES output holding that text.

Bounds: the version's admission (``[llm] max_concurrency`` runs at once, ``max_queue`` waiting,
then 503), the prompt's length (``max_prompt_chars``), a run's time (``command_timeout_s``, lowered
by the model's ``timeout_ms``: an expired run is 504) and its captured output
(``command_max_output_bytes``). The app's memory is bounded as a model instance's is
(``memory_limit_mb``). A run that traps or exits non-zero is a 500 naming why, with the tail of its
stderr.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from agent.errors import BadRequest, InferenceTimeout, ModelError, Unavailable
from agent.llm.admission import Admission, Overloaded
from agent.llm.settings import LlmSettings
from agent.server.binary_tensors import INFERENCE_HEADER, bytes_from_json
from agent.server.http import Request, Response

if TYPE_CHECKING:
    from agent.runtime import LoadedModel
    from agent.runtime.engine import WasmRuntime
    from agent.server.inference import InferenceCore
    from agent.wasinn.command import CommandResult

log = structlog.get_logger("edge_agent.llm")
# The end of a failed run's stderr quoted in its error.
_STDERR_TAIL = 400


class CommandApps:
    """Runs command apps per request. Event loop methods, except :meth:`_run` (a worker thread)."""

    def __init__(
        self,
        *,
        runtime: WasmRuntime,
        core: InferenceCore,
        settings: LlmSettings,
        memory_limit_mb: int,
    ):
        self.runtime = runtime
        self.core = core
        self.settings = settings
        self.memory_limit_mb = memory_limit_mb
        # Runs last seconds: threads of their own, not the inference workers fast models need.
        self._executor = ThreadPoolExecutor(settings.command_workers, thread_name_prefix="wasi-cmd")
        self._admissions: dict[int, tuple[LoadedModel, Admission]] = {}
        self._lock = threading.Lock()

    def infer(self, loaded: LoadedModel, request: Request, start: float) -> Response | asyncio.Future[Response]:
        """The v2 inference of a command app: the request checked now, the run on a worker."""
        if request.headers.get(INFERENCE_HEADER) is not None:
            raise BadRequest(f"model {loaded.name} is a command app: send its prompt as JSON (a BYTES string)")
        prompt, request_id = self._prompt(loaded, request.body)
        admission = self._admission(loaded)
        try:
            ticket = admission.reserve(f"model {loaded.name}:{loaded.version}")
        except Overloaded as exc:
            raise Unavailable(str(exc)) from None
        loaded.inflight += 1

        async def run() -> Response:
            try:
                if not await ticket.wait():
                    raise Unavailable("request abandoned")
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._executor, self._run, loaded, prompt)
            finally:
                # The worker returned (or never started): the slot is free for the next run.
                ticket.release()
                loaded.inflight -= 1
            return self._respond(loaded, result, request_id, start)

        return asyncio.ensure_future(run())

    def _admission(self, loaded: LoadedModel) -> Admission:
        key = id(loaded)
        entry = self._admissions.get(key)
        if entry is not None and entry[0] is loaded:
            return entry[1]
        admission = Admission(limit=self.settings.max_concurrency, queue=self.settings.max_queue)
        with self._lock:
            self._admissions[key] = (loaded, admission)
        loaded.closers.append(lambda: self._forget(key, admission))
        return admission

    def _forget(self, key: int, admission: Admission) -> None:
        with self._lock:
            entry = self._admissions.get(key)
            if entry is not None and entry[1] is admission:
                del self._admissions[key]

    def _prompt(self, loaded: LoadedModel, body: bytes) -> tuple[str, Any]:
        """The request's one BYTES input as text, and its id."""
        spec = loaded.spec
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise BadRequest("request body must be a JSON object")
        items = doc.get("inputs")
        want = spec.inputs[0]
        if not isinstance(items, list) or len(items) != 1 or not isinstance(items[0], dict):
            raise BadRequest(f"model {spec.name} is a command app: send exactly one input, {want.name} (BYTES)")
        item = items[0]
        if item.get("name") != want.name:
            raise BadRequest(f"model {spec.name} has no input {item.get('name')!r} (its input: {want.name})")
        if item.get("datatype") != "BYTES":
            raise BadRequest(f"input {want.name}: datatype {item.get('datatype')!r} does not match the model's BYTES")
        if item.get("shape") not in ([1], [1, 1]):
            raise BadRequest(f"input {want.name}: shape must be [1] (one prompt), got {item.get('shape')!r}")
        outputs = doc.get("outputs")
        if outputs is not None:
            wanted = outputs if isinstance(outputs, list) else [None, None]
            if [o.get("name") if isinstance(o, dict) else None for o in wanted] != [spec.outputs[0].name]:
                raise BadRequest(f"model {spec.name} has one output, {spec.outputs[0].name}")
        raw = bytes_from_json(want.name, item.get("data"), 1)[0]
        try:
            prompt = raw.decode()
        except UnicodeDecodeError:
            raise BadRequest(f"input {want.name}: the prompt must be UTF-8 text") from None
        if "\0" in prompt:
            raise BadRequest(f"input {want.name}: the prompt must not hold NUL characters (it is a program argument)")
        limit = self.settings.max_prompt_chars
        if len(prompt) > limit:
            raise BadRequest(f"input {want.name}: the prompt holds {len(prompt)} characters; at most {limit}")
        return prompt, doc.get("id")

    # -- the worker thread ------------------------------------------------------------------------------
    def _run(self, loaded: LoadedModel, prompt: str) -> CommandResult:
        from agent.wasinn.command import run_command

        spec = loaded.spec
        nn = loaded.nn_version
        if nn is None or loaded.module is None or spec.wasi_nn is None:
            raise ModelError(f"{loaded.name}:{loaded.version} is not a loaded command app")
        timeout_ms = self.settings.command_timeout_s * 1000
        if spec.timeout_ms is not None:
            timeout_ms = min(timeout_ms, spec.timeout_ms)
        memory_mb = min(self.memory_limit_mb, spec.memory_limit_mb or self.memory_limit_mb)
        runtime = self.runtime
        runtime.begin_call()  # the epoch ticker runs while wasm does: the deadline below needs it
        try:
            return run_command(
                loaded.module,
                args=[*spec.wasi_nn.args, prompt],
                env=dict(spec.wasi_nn.env),
                program=f"{spec.name}.wasm",
                named=nn.named,
                registry=nn.registry,
                stdout="capture",
                stderr="capture",
                engine=runtime.engine,
                memory_limit_bytes=memory_mb << 20,
                epoch_deadline_ticks=runtime.deadline_ticks(timeout_ms),
                max_capture_bytes=self.settings.command_max_output_bytes,
            )
        finally:
            runtime.end_call()

    def _respond(self, loaded: LoadedModel, result: CommandResult, request_id: Any, start: float) -> Response:
        label = f"{loaded.name}:{loaded.version}"
        error: ModelError | None = None
        if result.timed_out:
            error = InferenceTimeout(f"{label}: the app ran past its time limit")
        elif result.trap is not None or result.exit_code != 0:
            why = f"trapped ({result.trap})" if result.trap is not None else f"exited with {result.exit_code}"
            detail = f"; WASI-NN: {result.last_nn_error}" if result.last_nn_error else ""
            tail = result.stderr[-_STDERR_TAIL:].decode("utf-8", "replace").strip()
            error = ModelError(f"{label}: the app {why}{detail}" + (f"; stderr: {tail}" if tail else ""))
        if error is not None:
            self.core.failed(loaded, error)
            return Response.error(error.http_status, str(error))
        out = loaded.spec.outputs[0]
        body: dict[str, Any] = {"model_name": loaded.name, "model_version": loaded.version}
        if request_id is not None:
            body["id"] = request_id
        text = result.stdout.decode("utf-8", "replace")
        body["outputs"] = [{"name": out.name, "datatype": "BYTES", "shape": [1], "data": [text]}]
        if result.truncated:
            body["parameters"] = {"truncated": True}
        self.core.succeeded(loaded, start)
        log.debug("command app ran", model=label, ms=round((time.perf_counter() - start) * 1000, 1))
        return Response.json(200, body)
