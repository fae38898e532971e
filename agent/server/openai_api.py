"""The OpenAI-compatible API of the language models a node serves, as LlamaEdge offers it.

``POST /v1/chat/completions`` (messages through the model's chat template), ``POST
/v1/completions`` (a prompt), both with ``stream: true`` as server-sent events (``data: <chunk>``
per piece, then ``data: [DONE]``); ``GET /v1/models`` and ``GET /v1/models/<id>``. The ``model``
field names a language model loaded here (a WASI-NN model whose ``wasi_nn.encoding`` is ``ggml``):
``name``, whose route picks the version as v2 inference does, or ``name:version``.

Bodies are OpenAI's: the completion objects llama-cpp-python makes, and errors as
``{"error": {"message", "type", "param", "code"}}`` — 400 ``invalid_request_error`` for a bad
field (its name in ``param``) or a prompt longer than the context (``context_length_exceeded``),
404 ``model_not_found``, 429 when the model's slots are busy and its queue is full, 503 while a
model cannot be served. The official ``openai`` client works against it unchanged.

Like the inference API, these paths need no token (docs/CONFIG.md: the token guards control, not
serving). A client that goes away stops its generation at the next token (``Request.on_disconnect``
for a plain answer, the stream's cancellation for a streamed one).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from agent.errors import AgentError, GpuBusy, NotFound
from agent.llm.admission import Overloaded
from agent.llm.engine import ContextOverflow
from agent.llm.params import InvalidField, parse_chat, parse_completion
from agent.server.http import Request, Response, StreamingResponse

if TYPE_CHECKING:
    from agent.llm.service import Generation, LlmService

log = structlog.get_logger("edge_agent.openai")

_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error"}
_CODES = {404: "model_not_found", 429: "rate_limit_exceeded", 503: "unavailable"}
_SSE_HEADERS = [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    kind = _TYPES.get(status, "rate_limit_exceeded" if status == 429 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code or _CODES.get(status)}}


def error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> Response:
    response = Response.json(status, error_body(status, message, param=param, code=code))
    if status in (429, 503):
        response.headers.append(("Retry-After", "1"))
    return response


class OpenAIAPI:
    def __init__(self, *, llm: LlmService):
        self.llm = llm

    def route(self, request: Request, parts: list[str]) -> Response | Awaitable[Response] | None:
        """``parts``: the path below ``/v1``. Every path there is answered (404 in OpenAI's format)."""
        method = request.method
        try:
            if parts == ["chat", "completions"]:
                return self._only(method, "POST") or self._generate(request, chat=True)
            if parts == ["completions"]:
                return self._only(method, "POST") or self._generate(request, chat=False)
            if parts == ["models"]:
                return self._only(method, "GET") or Response.json(
                    200, {"object": "list", "data": [self._model(lm.name, lm) for lm in self.llm.listed()]}
                )
            if len(parts) == 2 and parts[0] == "models":
                return self._only(method, "GET") or Response.json(200, self._model(parts[1], self.llm.find(parts[1])))
        except AgentError as exc:
            return error(exc.http_status, str(exc))
        return error(404, f"no such endpoint: {method} {request.path}", code="not_found")

    @staticmethod
    def _only(method: str, allowed: str) -> Response | None:
        if method == allowed:
            return None
        response = error(405, f"method {method} not allowed here; use {allowed}")
        response.headers.append(("Allow", allowed))
        return response

    @staticmethod
    def _model(model_id: str, loaded: Any) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": int(loaded.loaded_at), "owned_by": "edge-agent"}

    # -- completions -------------------------------------------------------------------------------
    def _generate(self, request: Request, *, chat: bool) -> Response | Awaitable[Response]:
        try:
            doc = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            return error(400, f"the request body is not valid JSON: {exc}")
        settings = self.llm.settings
        try:
            wanted = parse_chat(doc, settings) if chat else parse_completion(doc, settings)
        except InvalidField as exc:
            return error(400, str(exc), param=exc.param)
        try:
            loaded = self.llm.find(wanted.model)
            generation = self.llm.start(loaded, wanted)
        except NotFound as exc:
            return error(404, str(exc), param="model")
        except Overloaded as exc:
            return error(429, str(exc))
        request.on_disconnect(generation.abandon)
        if wanted.stream:
            return StreamingResponse(
                200, chunks=self._events(generation), content_type="text/event-stream", headers=list(_SSE_HEADERS)
            )
        return self._answer(generation)

    async def _answer(self, generation: Generation) -> Response:
        try:
            result = await generation.result()
        except Exception as exc:  # noqa: BLE001 - every failure is answered in OpenAI's format
            status, message, code = _failure(generation, exc)
            return error(status, message, code=code)
        if result is None:  # the client left before it began: nobody reads this
            return error(503, "request abandoned")
        return Response.json(200, result)

    async def _events(self, generation: Generation) -> AsyncIterator[bytes]:
        """Server-sent events: each chunk, then ``[DONE]``; a failure mid-stream as an error event."""
        async with contextlib.aclosing(generation.chunks()) as chunks:
            try:
                async for chunk in chunks:
                    yield b"data: " + orjson.dumps(chunk) + b"\n\n"
            except Exception as exc:  # noqa: BLE001 - the head is sent: the error goes as an event
                status, message, code = _failure(generation, exc)
                yield b"data: " + orjson.dumps(error_body(status, message, code=code)) + b"\n\n"
                return
        yield b"data: [DONE]\n\n"


def _failure(generation: Generation, exc: Exception) -> tuple[int, str, str | None]:
    """(status, message, code) of a failed generation."""
    if isinstance(exc, ContextOverflow):
        return 400, str(exc), "context_length_exceeded"
    if isinstance(exc, GpuBusy):
        return exc.http_status, str(exc), exc.wire_code  # "gpu_busy": a client may retry, unlike a broken model
    if isinstance(exc, AgentError):
        return exc.http_status, str(exc), None
    loaded = generation.loaded
    log.error("generation failed", model=loaded.name, version=loaded.version, error=repr(exc))
    return 500, f"{loaded.name}:{loaded.version}: generation failed: {exc}", None
