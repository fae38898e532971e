"""The Open Inference Protocol v2 REST API (as KServe and Triton speak it).

Routes are matched on exact path segments. Inference decodes the request,
checks it against the model, and runs it through the shared
:class:`~agent.server.inference.InferenceCore` (which decides between the
event loop and the worker pool); the answer is returned at once when the call
ran inline, so a fast model's request never becomes a task.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from agent import __version__
from agent.errors import AgentError, BadRequest
from agent.server.binary_tensors import INFERENCE_HEADER, ExtendedRequest, decode_request
from agent.server.http import Request, Response
from agent.server.inference import InferenceCore
from agent.server.tensors import decode_inputs, encode_outputs, requested_outputs
from agent.spec import TensorSpec

if TYPE_CHECKING:
    from agent.llm.command_apps import CommandApps  # agent/llm: set by agent/wiring.py attach_llm
    from agent.metrics import Metrics
    from agent.models import ModelManager
    from agent.runtime import LoadedModel
    from agent.wasinn.backend import BackendRegistry

EXTENSIONS = ["model_repository", "metrics", "binary_tensor_data"]
# Listed when the agent has WASI-NN backends; the server metadata then names them under WASI_NN_KEY.
WASI_NN_EXTENSION = "wasi_nn"
WASI_NN_KEY = "wasi_nn_backends"

Handler = Callable[..., "Response | Awaitable[Response]"]
# The route cache's bounds: paths remembered, and the longest path remembered.
_INFER_PATHS = 256
_INFER_PATH_CHARS = 256


class InferenceAPI:
    def __init__(
        self,
        *,
        models: ModelManager,
        metrics: Metrics,
        core: InferenceCore,
        is_ready: Callable[[], bool],
        extra_routes: Callable[[Request, list[str]], Response | Awaitable[Response] | None] | None = None,
        nn_backends: BackendRegistry | None = None,
    ):
        self.models = models
        self.nn_backends = nn_backends
        self.metrics = metrics
        self.core = core
        self.is_ready = is_ready
        self.extra_routes = extra_routes
        # -- agent/llm (set by agent/wiring.py attach_llm; None without it) --
        # The OpenAI-compatible routes: every path below /v1 (agent/server/openai_api.py).
        self.v1_routes: Callable[[Request, list[str]], Response | Awaitable[Response] | None] | None = None
        # WASI-NN command apps (wasi_nn.app "command"): each v2 inference runs the app once.
        self.command_apps: CommandApps | None = None
        # -- end agent/llm --
        # Inference paths already matched, path -> (model, version or None): the hot path skips
        # the split and the segment matching. Bounded: clients choose paths.
        self._infer_paths: dict[str, tuple[str, str | None]] = {}

    def __call__(self, request: Request) -> Response | Awaitable[Response]:
        if request.method == "POST":
            target = self._infer_paths.get(request.path)
            if target is not None:
                try:
                    return self._infer(request, target[0], target[1])
                except AgentError as exc:
                    return Response.error(exc.http_status, str(exc))
        parts = [p for p in request.path.split("/") if p]
        try:
            result = self._route(request, parts)
        except AgentError as exc:
            return Response.error(exc.http_status, str(exc))
        if result is None:
            return Response.error(404, f"no such endpoint: {request.method} {request.path}")
        return result

    def server_metadata(self) -> dict[str, Any]:
        """``GET /v2``: the protocol's fields, and the WASI-NN backends this node offers (an extension)."""
        meta: dict[str, Any] = {"name": "edge-agent", "version": __version__, "extensions": EXTENSIONS}
        backends = self.nn_backends.describe() if self.nn_backends is not None else []
        if backends:
            meta["extensions"] = [*EXTENSIONS, WASI_NN_EXTENSION]
            meta[WASI_NN_KEY] = backends
        return meta

    def _route(self, request: Request, parts: list[str]) -> Response | Awaitable[Response] | None:
        method = request.method
        if parts == ["metrics"]:
            return self._only(method, "GET") or Response(
                200, self.metrics.exposition(), content_type="text/plain; version=0.0.4; charset=utf-8"
            )
        if not parts or parts[0] != "v2":
            if parts and parts[0] == "v1" and self.v1_routes is not None:  # agent/llm: OpenAI-compatible
                return self.v1_routes(request, parts[1:])
            return None
        rest = parts[1:]
        if not rest:
            return self._only(method, "GET") or Response.json(200, self.server_metadata())
        if rest == ["health", "live"]:
            return self._only(method, "GET") or Response.json(200, {"live": True})
        if rest == ["health", "ready"]:
            ready = self.is_ready()
            return self._only(method, "GET") or Response.json(200 if ready else 503, {"ready": ready})
        if rest[0] == "models" and len(rest) >= 2:
            name = rest[1]
            tail = rest[2:]
            version = None
            if len(tail) >= 2 and tail[0] == "versions":
                version = tail[1]
                tail = tail[2:]
            if not tail:
                return self._only(method, "GET") or self._metadata(name, version)
            if tail == ["ready"]:
                return self._only(method, "GET") or self._model_ready(name, version)
            if tail == ["infer"]:
                path = request.path
                if method == "POST" and len(self._infer_paths) < _INFER_PATHS and len(path) <= _INFER_PATH_CHARS:
                    self._infer_paths[path] = (name, version)
                return self._only(method, "POST") or self._infer(request, name, version)
            return None
        if self.extra_routes is not None:
            return self.extra_routes(request, rest)
        return None

    @staticmethod
    def _only(method: str, allowed: str) -> Response | None:
        if method == allowed:
            return None
        resp = Response.error(405, f"method {method} not allowed here; use {allowed}")
        resp.headers.append(("Allow", allowed))
        return resp

    # -- metadata ------------------------------------------------------------------
    def _metadata(self, name: str, version: str | None) -> Response:
        loaded = self.models.get(name, version)
        doc = loaded.spec.metadata()
        if version is None:
            route = self.models.routes.get(name)
            if route is not None:
                doc["versions"] = sorted({m.version for m in route.versions()})
        return Response.json(200, doc)

    def _model_ready(self, name: str, version: str | None) -> Response:
        loaded = self.models.get(name, version)
        return Response.json(200, {"name": name, "version": loaded.version, "ready": True})

    # -- inference --------------------------------------------------------------------
    def _infer(self, request: Request, name: str, version: str | None) -> Response | Awaitable[Response]:
        start = time.perf_counter()
        loaded = self.models.get(name, version)
        nn = loaded.spec.wasi_nn
        if nn is not None and nn.app == "command" and self.command_apps is not None:  # agent/llm: run per request
            return self.command_apps.infer(loaded, request, start)
        header_length = request.headers.get(INFERENCE_HEADER)
        if header_length is not None:  # a binary part follows the JSON (binary_tensors.py)
            return self._infer_extended(loaded, decode_request(loaded.spec, request, header_length), start)
        try:
            doc = orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from exc
        if type(doc) is dict and ("parameters" in doc or "outputs" in doc):  # may ask for binary outputs
            return self._infer_extended(loaded, decode_request(loaded.spec, request, None, doc), start)
        tensors = decode_inputs(doc, loaded.spec)
        outputs_wanted = requested_outputs(doc, loaded.spec)
        arrays, batch = loaded.prepare(tensors)
        request_id = doc.get("id")
        result = self.core.infer(loaded, arrays, batch)  # an AgentError raised here is answered by __call__
        if isinstance(result, list):
            return self._respond(loaded, result, outputs_wanted, request_id, start)
        return self._respond_later(loaded, result, outputs_wanted, request_id, start)

    async def _respond_later(
        self,
        loaded: LoadedModel,
        pending: Awaitable[list[np.ndarray]],
        outputs_wanted: list[TensorSpec],
        request_id: Any,
        start: float,
    ) -> Response:
        try:
            outputs = await pending
        except AgentError as exc:
            return Response.error(exc.http_status, str(exc))
        return self._respond(loaded, outputs, outputs_wanted, request_id, start)

    def _respond(
        self,
        loaded: LoadedModel,
        outputs: list[np.ndarray],
        outputs_wanted: list[TensorSpec],
        request_id: Any,
        start: float,
    ) -> Response:
        by_name = {t.name: o for t, o in zip(loaded.spec.outputs, outputs, strict=True)}
        body: dict[str, Any] = {"model_name": loaded.name, "model_version": loaded.version}
        if request_id is not None:
            body["id"] = request_id
        body["outputs"] = encode_outputs(outputs_wanted, by_name)
        self.core.succeeded(loaded, start)
        return Response.json(200, body)

    # -- Triton's binary tensor data extension -----------------------------------------------
    def _infer_extended(
        self, loaded: LoadedModel, call: ExtendedRequest, start: float
    ) -> Response | Awaitable[Response]:
        arrays, batch = loaded.prepare(call.tensors)
        result = self.core.infer(loaded, arrays, batch)
        if isinstance(result, list):
            return self._respond_extended(loaded, call, result, start)
        return self._respond_extended_later(loaded, call, result, start)

    async def _respond_extended_later(
        self, loaded: LoadedModel, call: ExtendedRequest, pending: Awaitable[list[np.ndarray]], start: float
    ) -> Response:
        try:
            outputs = await pending
        except AgentError as exc:
            return Response.error(exc.http_status, str(exc))
        return self._respond_extended(loaded, call, outputs, start)

    def _respond_extended(
        self, loaded: LoadedModel, call: ExtendedRequest, outputs: list[np.ndarray], start: float
    ) -> Response:
        by_name = {t.name: o for t, o in zip(loaded.spec.outputs, outputs, strict=True)}
        response = call.respond(loaded.name, loaded.version, by_name)
        self.core.succeeded(loaded, start)
        return response
