"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``), and ``grpc.health.v1``.

It runs on ``grpc.aio`` in the agent's own event loop, on a port of its own
(``grpc_listen``), and shares the REST API's inference path: a request is
decoded into NumPy arrays, checked by ``LoadedModel.prepare`` and run by the
:class:`~agent.server.inference.InferenceCore`, which runs a fast model inline
on the loop exactly as it does for REST.

Tensors travel as Triton sends them: ``raw_input_contents`` (one entry per
input, in input order, its size checked against shape and datatype), or the
typed ``contents`` fields; the answer is always ``raw_output_contents``.
Errors carry the gRPC status :data:`GRPC_STATUS` declares for the error's
``http_status``. The repository RPCs drive the node's :class:`Control`
through the REST control API's own object, under the same token rule
(metadata ``authorization: Bearer <token>``).

``grpc.health.v1.Health`` answers SERVING for ``""`` and
``inference.GRPCInferenceService`` while the agent is ready, and NOT_SERVING
before and from the moment it starts stopping, so a Kubernetes gRPC probe
takes the node out of rotation before the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import numpy as np
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent import __version__
from agent.errors import AgentError, BadRequest, ConfigError, ListenError, NotFound, Unavailable
from agent.server.inference import InferenceCore
from agent.server.oip import WASI_NN_EXTENSION
from agent.server.proto import inference_pb2 as pb
from agent.server.proto import inference_pb2_grpc as pb_grpc
from agent.server.repository_api import is_loopback
from agent.server.tensors import input_named, output_named
from agent.spec import ModelSpec, TensorSpec
from agent.wasinn.backend import BackendRegistry

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from agent.config import Config
    from agent.models import ModelManager
    from agent.server.repository_api import RepositoryAPI

log = structlog.get_logger("edge_agent.api")

SERVICE_NAME = "inference.GRPCInferenceService"
# The names grpc.health.v1 answers for: the server as a whole, and the inference service.
HEALTH_SERVICES = ("", SERVICE_NAME)
# How often a health Watch stream looks at readiness.
WATCH_POLL_S = 0.5
# Streams one connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS).
MAX_STREAMS_PER_CONNECTION = 128
# Inputs this small are admitted whatever the byte budget holds (as REST admits bodies up to 64 KiB).
SMALL_INPUT_BYTES = 64 * 1024

# The gRPC status of every error, keyed by the error class's http_status (agent/errors.py):
# declared, not derived, like the error contract itself. A status missing here answers INTERNAL;
# tests/test_grpc.py checks every AgentError's status is in the table.
GRPC_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    422: grpc.StatusCode.FAILED_PRECONDITION,  # an image refused: content, format or signature
    500: grpc.StatusCode.INTERNAL,  # a model's trap, a corrupt blob
    502: grpc.StatusCode.UNAVAILABLE,  # a registry that cannot be reached or answered wrong
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_status(exc: AgentError) -> grpc.StatusCode:
    return GRPC_STATUS.get(exc.http_status, grpc.StatusCode.INTERNAL)


# The typed contents field each datatype's values travel in (FP16 has none: raw only).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
# The NumPy type a contents field's values are exact in.
FIELD_DTYPE: dict[str, np.dtype] = {
    "bool_contents": np.dtype("bool"),
    "int_contents": np.dtype("<i4"),
    "int64_contents": np.dtype("<i8"),
    "uint_contents": np.dtype("<u4"),
    "uint64_contents": np.dtype("<u8"),
    "fp32_contents": np.dtype("<f4"),
    "fp64_contents": np.dtype("<f8"),
}


# -- tensors ----------------------------------------------------------------------------------------
def decode_inputs(request: pb.ModelInferRequest, spec: ModelSpec) -> dict[str, np.ndarray]:
    """The request's input tensors by name; BadRequest naming the tensor and what is wrong."""
    items = request.inputs
    if not items:
        raise BadRequest("request needs at least one input")
    raw = request.raw_input_contents
    if raw and len(raw) != len(items):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(items)} inputs: send one per input, in input order"
        )
    tensors: dict[str, np.ndarray] = {}
    for index, item in enumerate(items):
        name = item.name
        tspec = input_named(spec, name, tensors)
        if item.datatype != tspec.datatype:
            raise BadRequest(f"input {name}: datatype {item.datatype!r} does not match the model's {tspec.datatype}")
        shape = list(item.shape)
        if not shape or any(d < 0 for d in shape):
            raise BadRequest(f"input {name}: shape must be a non-empty list of non-negative integers")
        if len(shape) != len(tspec.shape) or tuple(shape[1:]) != tspec.row_shape:
            raise BadRequest(f"input {name}: shape {shape} does not match the model's {list(tspec.shape)}")
        if raw:
            if item.HasField("contents"):
                raise BadRequest(f"input {name}: send its data in raw_input_contents or in contents, not both")
            tensors[name] = _from_raw(tspec, shape, raw[index], index)
        else:
            tensors[name] = _from_contents(tspec, shape, item.contents)
    return tensors


def _from_raw(tspec: TensorSpec, shape: list[int], data: bytes, index: int) -> np.ndarray:
    dtype = tspec.dtype
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise BadRequest(
            f"input {tspec.name}: raw_input_contents[{index}] holds {len(data)} bytes; "
            f"shape {shape} of {tspec.datatype} needs {expected}"
        )
    if dtype.kind == "b" and data and int(np.frombuffer(data, dtype=np.uint8).max()) > 1:
        raise BadRequest(f"input {tspec.name}: BOOL bytes must be 0 or 1")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _from_contents(tspec: TensorSpec, shape: list[int], contents: pb.InferTensorContents) -> np.ndarray:
    name = tspec.name
    field = CONTENTS_FIELD.get(tspec.datatype)
    if field is None:
        raise BadRequest(f"input {name}: {tspec.datatype} has no typed contents field; send it in raw_input_contents")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise BadRequest(f"input {name}: shape {shape} needs {count} elements, contents.{field} holds {len(values)}")
    wide = np.array(values, dtype=FIELD_DTYPE[field])
    if wide.dtype == tspec.dtype:
        return wide.reshape(shape)
    array = wide.astype(tspec.dtype)  # INT8/16 from int_contents, UINT8/16 from uint_contents
    if not np.array_equal(array, wide):
        raise BadRequest(f"input {name}: values out of range for {tspec.datatype}")
    return array.reshape(shape)


def requested_outputs(request: pb.ModelInferRequest, spec: ModelSpec) -> list[TensorSpec]:
    if not request.outputs:
        return list(spec.outputs)
    wanted = []
    for item in request.outputs:
        tspec = output_named(spec, item.name)
        if "classification" in item.parameters:
            raise BadRequest(f"output {item.name}: the classification extension is not supported")
        wanted.append(tspec)
    return wanted


# -- the inference service --------------------------------------------------------------------------
class CallSlots:
    """The calls that hold something in progress (inference, repository changes, health watches).

    One past ``limit`` is refused at once with RESOURCE_EXHAUSTED. grpc.aio's own
    ``maximum_concurrent_rpcs`` is not used: it makes the extra calls wait, unbounded, in grpc's queue.
    The input tensors inference calls hold at once are bounded by ``byte_limit``
    (``max_inflight_body_bytes``, as REST bodies are): a call that would pass it is refused the same way.
    """

    def __init__(self, *, limit: int, byte_limit: int, what: str = "gRPC calls"):
        self.limit = limit
        self.what = what
        self.active = 0
        self.byte_limit = byte_limit
        self.bytes_held = 0

    async def enter(self, context: grpc.aio.ServicerContext) -> None:
        if self.active >= self.limit:
            await self.refuse(context)
        self.active += 1

    async def refuse(self, context: grpc.aio.ServicerContext) -> NoReturn:
        """Refuse a call that found every slot taken (callers check ``active >= limit``; see ModelInfer)."""
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{self.limit} {self.what} are in progress already (grpc_max_concurrent_rpcs); retry later",
        )
        raise AssertionError("abort returned")  # pragma: no cover - abort always raises

    def over(self, size: int) -> bool:
        """Whether holding ``size`` more input bytes would pass the budget (inputs up to 64 KiB always pass)."""
        return size > SMALL_INPUT_BYTES and self.bytes_held + size > self.byte_limit

    async def refuse_bytes(self, size: int, context: grpc.aio.ServicerContext) -> NoReturn:
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"gRPC calls in progress hold {self.bytes_held} bytes of inputs already; this one's {size} would "
            f"pass max_inflight_body_bytes ({self.byte_limit}); retry later",
        )
        raise AssertionError("abort returned")  # pragma: no cover - abort always raises

    async def hold(self, size: int, context: grpc.aio.ServicerContext) -> None:
        """Count ``size`` input bytes as held (give them back with ``bytes_held -= size``), or refuse the call."""
        if self.over(size):
            await self.refuse_bytes(size, context)
        self.bytes_held += size


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        *,
        models: ModelManager,
        core: InferenceCore,
        is_ready: Callable[[], bool],
        repository: RepositoryAPI | None,
        slots: CallSlots,
        nn_backends: BackendRegistry | None = None,
    ):
        self.models = models
        self.core = core
        self.is_ready = is_ready
        self.repository = repository
        self.slots = slots
        self.nn_backends = nn_backends

    # -- health and metadata --------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.is_ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        # As Triton: a model that is unknown or cannot serve is not ready; that is no error.
        try:
            self.models.get(request.name, request.version or None)
        except (NotFound, Unavailable):
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        extensions = ["model_repository"] if self.repository is not None else []
        # The message has no field for the backend list (REST's GET /v2 carries it): the extension says there are some.
        if self.nn_backends is not None and self.nn_backends.available:
            extensions.append(WASI_NN_EXTENSION)
        return pb.ServerMetadataResponse(name="edge-agent", version=__version__, extensions=extensions)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            loaded = self.models.get(request.name, request.version or None)
        except AgentError as exc:
            await _abort(context, exc)
        spec = loaded.spec
        versions = [loaded.version]
        route = self.models.routes.get(request.name) if not request.version else None
        if route is not None:
            versions = sorted({m.version for m in route.versions()})
        meta = spec.metadata()
        return pb.ModelMetadataResponse(
            name=spec.name,
            versions=versions,
            platform=meta["platform"],
            inputs=[_tensor_metadata(t) for t in spec.inputs],
            outputs=[_tensor_metadata(t) for t in spec.outputs],
        )

    # -- inference ------------------------------------------------------------------------------
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        # The hot path of the gRPC API: one coroutine, no awaits but on the refusal and worker paths
        # (the slot checks are plain comparisons; CallSlots.refuse* only run to abort).
        start = time.perf_counter()
        slots = self.slots
        if slots.active >= slots.limit:
            await slots.refuse(context)
        slots.active += 1
        held = 0
        try:
            loaded = self.models.get(request.model_name, request.model_version or None)
            spec = loaded.spec
            if spec.wasi_nn is not None and spec.wasi_nn.app == "command":
                # A command app takes one BYTES prompt, served over REST JSON only (agent/llm/command_apps.py).
                raise BadRequest(
                    f"model {spec.name}:{spec.version} is a WASI-NN command app: infer over REST "
                    f"(POST /v2/models/{spec.name}/infer, a BYTES prompt), not gRPC"
                )
            tensors = decode_inputs(request, spec)
            size = sum(array.nbytes for array in tensors.values())
            if slots.over(size):
                await slots.refuse_bytes(size, context)
            slots.bytes_held += size
            held = size
            wanted = requested_outputs(request, spec) if request.outputs else None
            arrays, batch = loaded.prepare(tensors)
            result = self.core.infer(loaded, arrays, batch)
            outputs = result if isinstance(result, list) else await result
        except AgentError as exc:
            await _abort(context, exc)
        except grpc.aio.AbortError:
            raise
        except Exception:  # a defect: answered as REST answers one (500 "internal error"), logged; serving goes on
            log.exception("gRPC inference failed unexpectedly", model=request.model_name)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            slots.bytes_held -= held
            slots.active -= 1
        response = pb.ModelInferResponse(model_name=spec.name, model_version=spec.version, id=request.id)
        if wanted is None:
            pairs = zip(spec.outputs, outputs, strict=True)
        else:
            by_name = dict(zip((t.name for t in spec.outputs), outputs, strict=True))
            pairs = zip(wanted, [by_name[t.name] for t in wanted], strict=True)
        raw = response.raw_output_contents
        for tspec, array in pairs:
            dtype = tspec.dtype
            if array.dtype != dtype:
                array = array.astype(dtype)
            response.outputs.add(name=tspec.name, datatype=tspec.datatype, shape=array.shape)
            raw.append(array.tobytes())  # C order whatever the array's layout
        self.core.succeeded(loaded, start)
        return response

    # -- the model repository extension ---------------------------------------------------------
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext) -> Any:
        api = await self._authorized(context)
        rows = api.index()
        if request.ready:
            rows = [row for row in rows if row["state"] == "READY"]
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows])

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        api = await self._authorized(context)
        await self.slots.enter(context)
        try:
            model = _model_name(request)
            params = _repository_params(request.parameters, {"ref": "string_param", "version": "string_param"})
            ref = params.get("ref") or f"store:{model}" + (f":{params['version']}" if params.get("version") else "")
            api.check_trusted(ref)
            await api.control.deploy(ref, source="local", model=model)
        except AgentError as exc:
            await _abort(context, exc)
        finally:
            self.slots.active -= 1
        return pb.RepositoryModelLoadResponse(model_name=model, isLoaded=True)

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        api = await self._authorized(context)
        await self.slots.enter(context)
        try:
            model = _model_name(request)
            # Triton's client always sends unload_dependents; a Wasm model has no dependents.
            _repository_params(request.parameters, {"unload_dependents": "bool_param"})
            await api.control.unload(model, source="local")
        except AgentError as exc:
            await _abort(context, exc)
        finally:
            self.slots.active -= 1
        return pb.RepositoryModelUnloadResponse(model_name=model, isUnloaded=True)

    async def _authorized(self, context: grpc.aio.ServicerContext) -> RepositoryAPI:
        api = self.repository
        if api is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this agent has no control API")
            raise AssertionError("abort returned")  # pragma: no cover - abort always raises
        header = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                header = value
        if not api.authorized(header):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "this call needs the agent's API token (metadata authorization: Bearer <token>); "
                "it is api_token in the config, or the file api-token in the agent's state directory",
            )
        return api


def _tensor_metadata(tspec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=tspec.name, datatype=tspec.datatype, shape=list(tspec.shape))


def _model_name(request: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest) -> str:
    # KServe's client puts the model's name in field 1, Triton's repository_name (see inference.proto).
    name = request.model_name or request.repository_name
    if not name:
        raise BadRequest("model_name is empty")
    return name


def _repository_params(params: Mapping[str, pb.ModelRepositoryParameter], known: Mapping[str, str]) -> dict[str, Any]:
    """The parameters of a load or unload, each of the kind ``known`` says; any other is refused.

    Triton's config and file overrides are among those refused: a model here is an image, not a folder.
    """
    values: dict[str, Any] = {}
    for key, param in params.items():
        kind = known.get(key)
        if kind is None or param.WhichOneof("parameter_choice") != kind:
            allowed = ", ".join(f"{k} ({v.removesuffix('_param')})" for k, v in known.items())
            raise BadRequest(f"parameter {key!r} is not supported here (supported: {allowed})")
        values[key] = getattr(param, kind)
    return values


# The most characters of details an error carries: they travel in a header (grpc-message, UTF-8 then
# percent-encoded: up to 12 bytes a character) that clients cap at 8 KiB (soft) to 16 KiB, and a
# message may echo a name the client sent.
MAX_DETAILS_CHARS = 512


def _details(text: str) -> str:
    return text if len(text) <= MAX_DETAILS_CHARS else text[: MAX_DETAILS_CHARS - 3] + "..."


async def _abort(context: grpc.aio.ServicerContext, exc: AgentError) -> NoReturn:
    await context.abort(grpc_status(exc), _details(str(exc)))
    raise AssertionError("abort returned")  # pragma: no cover - abort always raises


# -- grpc.health.v1 ---------------------------------------------------------------------------------
class HealthServicer(health_pb2_grpc.HealthServicer):
    """SERVING while the agent is ready, NOT_SERVING otherwise; Watch streams end when the server stops."""

    def __init__(self, *, is_ready: Callable[[], bool], slots: CallSlots):
        self.is_ready = is_ready
        self.slots = slots
        self.stopped = asyncio.Event()
        self._watches = 0
        self._no_watches = asyncio.Event()
        self._no_watches.set()

    async def close(self, timeout_s: float) -> None:
        """NOT_SERVING from now on; returns once every Watch stream has said so and ended (or after ``timeout_s``)."""
        self.stopped.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_watches.wait(), timeout_s)

    def _status(self, service: str) -> int:
        if service not in HEALTH_SERVICES:
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        if self.is_ready() and not self.stopped.is_set():
            return health_pb2.HealthCheckResponse.SERVING
        return health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> Any:
        status = self._status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, _details(f"unknown service {request.service!r}"))
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        await self.slots.enter(context)
        self._watches += 1
        self._no_watches.clear()
        try:
            last = None
            while True:
                status = self._status(request.service)
                if status != last:
                    yield health_pb2.HealthCheckResponse(status=status)
                    last = status
                    continue  # look again: the agent may have started stopping during the send
                if self.stopped.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopped.wait(), WATCH_POLL_S)
        finally:
            self.slots.active -= 1
            self._watches -= 1
            if not self._watches:
                self._no_watches.set()


# -- the server -------------------------------------------------------------------------------------
class GrpcServer:
    """A service of the agent (agent/wiring.py): listens in start(), drains in stop()."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        credentials: grpc.ServerCredentials | None,
        servicer: InferenceServicer,
        health: HealthServicer,
        max_message_bytes: int,
        max_metadata_bytes: int,
        max_connections: int,
        drain_timeout_s: float,
        log: FilteringBoundLogger,
    ):
        self.host = host
        self.port = port
        self.credentials = credentials
        self.servicer = servicer
        self.health = health
        self.max_message_bytes = max_message_bytes
        self.max_metadata_bytes = max_metadata_bytes
        self.max_connections = max_connections
        self.drain_timeout_s = drain_timeout_s
        self.log = log
        self.address: tuple[str, int] | None = None
        self._server: grpc.aio.Server | None = None

    @property
    def listen(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_metadata_size", self.max_metadata_bytes),
                ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
                # One more connection is closed at once, as REST's max_connections does: fds are finite.
                ("grpc.max_allowed_incoming_connections", self.max_connections),
                # Else a second agent on the same port would bind it too and take half its calls.
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        try:
            if self.credentials is not None:
                port = server.add_secure_port(self.listen, self.credentials)
            else:
                port = server.add_insecure_port(self.listen)
        except RuntimeError as exc:
            if self.credentials is not None and not await _credentials_usable(self.credentials):
                raise ConfigError(
                    "grpc_tls_cert, grpc_tls_key: gRPC cannot use them: they must be a PEM certificate chain "
                    "and the PEM private key that fits it"
                ) from exc
            what = "the address is in use or not local"
            raise ListenError(f"cannot listen on {self.listen} (grpc_listen): {what}") from exc
        await server.start()
        self._server = server
        self.address = (self.host, port)
        self.log.info("gRPC API listening", listen=f"{self.host}:{port}", tls=self.credentials is not None)

    async def stop(self) -> None:
        """Refuse new calls, let those in flight finish within the drain timeout, end health Watch streams."""
        # Watch streams see NOT_SERVING before the server goes: a stream cut by the stop would not.
        await self.health.close(min(1.0, self.drain_timeout_s))
        server = self._server
        if server is None:
            return
        self._server = None
        await server.stop(self.drain_timeout_s)


async def _credentials_usable(credentials: grpc.ServerCredentials) -> bool:
    """Whether a server can listen with ``credentials`` on a free loopback port (grpc says no more)."""
    probe = grpc.aio.server()
    try:
        probe.add_secure_port("127.0.0.1:0", credentials)
    except RuntimeError:
        return False
    finally:
        await probe.stop(None)
    return True


def build_grpc_server(
    *,
    config: Config,
    models: ModelManager,
    core: InferenceCore,
    is_ready: Callable[[], bool],
    repository: RepositoryAPI | None,
    log: FilteringBoundLogger,
    nn_backends: BackendRegistry | None = None,
) -> GrpcServer | None:
    """The gRPC front end ``config`` asks for, or None when ``grpc_listen`` is off.

    TLS files are read here, at start-up: one that cannot be read is a ConfigError naming it.
    """
    address = config.grpc_host_port
    if address is None:
        return None
    if repository is not None and not is_loopback(address[0]):
        log.warning(
            "the gRPC control RPCs listen beyond loopback: anyone who can reach this address and holds the "
            "API token can change the models this node serves",
            grpc_listen=config.grpc_listen,
        )
    slots = CallSlots(limit=config.grpc_max_concurrent_rpcs, byte_limit=config.max_inflight_body_bytes)
    # Watch streams last as long as their clients like: counted apart, so idle watchers never take inference's slots.
    watch_slots = CallSlots(limit=config.grpc_max_concurrent_rpcs, byte_limit=0, what="health Watch streams")
    credentials = None
    if config.grpc_tls_cert is not None and config.grpc_tls_key is not None:
        cert = _read_pem(config.grpc_tls_cert, "grpc_tls_cert")
        key = _read_pem(config.grpc_tls_key, "grpc_tls_key")
        credentials = grpc.ssl_server_credentials([(key, cert)])
    return GrpcServer(
        host=address[0],
        port=address[1],
        credentials=credentials,
        servicer=InferenceServicer(
            models=models, core=core, is_ready=is_ready, repository=repository, slots=slots, nn_backends=nn_backends
        ),
        health=HealthServicer(is_ready=is_ready, slots=watch_slots),
        max_message_bytes=config.max_body_bytes,
        max_metadata_bytes=config.max_header_bytes,
        max_connections=config.max_connections,
        drain_timeout_s=config.drain_timeout_s,
        log=log,
    )


# A certificate chain or key is a few KiB; this bounds what a misconfigured path makes the agent read.
MAX_PEM_BYTES = 1024 * 1024


def _read_pem(path: Path, key: str) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_PEM_BYTES or b"-----BEGIN " not in data:
        raise ConfigError(f"{key}: {path} is not a PEM file")
    return data
