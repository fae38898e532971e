"""The object graph of an agent: every optional part, what it is built from, in start order.

:class:`agent.daemon.Agent` is the core (config, blob store, database, model
repository, runtime, models, event bus, metrics, worker pool, HTTP server and
inference API); it serves the stored models and nothing else. ``edge-agent
run`` and the fleet simulator call :func:`attach_services`, which builds the
rest from the core's parts, sets each on the agent's declared attribute and
registers the services. Each service gets exactly what it uses, as keyword
arguments; each config section is parsed once, here::

    agent.puller, agent.cache  attach_images     [registry] [trust] [cache], repository, events, models (in use)
    agent.control              attach_lifecycle  [lifecycle], models, db, repository, events, metrics,
                                                 executor, agent.status, puller, cache
    agent.repository_api         (with it)       control, config (token, listen), db, models, [trust] scopes
    agent.inbox                attach_services   [inbox], state_dir/inbox, puller, control, events
    agent.k8s                  attach_k8s        [k8s] (+ env), control, events
    agent.mqtt                 attach_mqtt       [mqtt] [telemetry], node_id, state_dir, control, events,
                                                 metrics, models, blobs, cache
    agent.grpc                 attach_grpc       grpc_listen, grpc_tls_*, max_body_bytes, models, inference,
                                                 agent.repository_api (token), started/stopping
    agent.sdnotify             attach_sdnotify   NOTIFY_SOCKET (env), models, events, agent.started/stopping

Services start in ``agent.services`` order once the API listens and stop in
reverse: the lifecycle first (crash recovery and the first reconcile, before
anything feeds the reconciler), then image pulls, the drop-in folder,
the gRPC API, Kubernetes, MQTT, and systemd notification last. A subsystem that is switched
off is not built (its attribute stays None); the Kubernetes watcher is always
built, to drop what an earlier, enabled run left behind.

The ``attach_*`` helpers are also how a test gives an in-process agent one
subsystem; they are called in the order above, since each takes the parts
attached before it (a lifecycle attached before the images has no puller).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from agent.images.service import CacheControl, ImageService, build_puller
from agent.images.settings import TrustSettings
from agent.inbox import InboxSettings, InboxWatcher
from agent.k8s.settings import KubeSettings
from agent.k8s.watcher import KubeWatcher
from agent.lifecycle import Lifecycle, LifecycleService
from agent.lifecycle_settings import LifecycleSettings
from agent.mqtt.settings import MqttSettings
from agent.sdnotify import SystemdNotifier
from agent.server.repository_api import build_repository_api
from agent.telemetry.settings import TelemetrySettings

if TYPE_CHECKING:
    from agent.daemon import Agent
    from agent.images.cache import VersionKey
    from agent.mqtt.channel import MqttChannel
    from agent.server.grpc_api import GrpcServer
    from agent.server.openai_api import OpenAIAPI


def attach_services(agent: Agent, *, env: Mapping[str, str] | None = None) -> None:
    """Everything ``edge-agent run`` adds to the core, in start order (see the module's docstring)."""
    config = agent.config
    # Parsed once: the puller verifies signatures with it, the control API checks its scopes.
    trust = TrustSettings.from_config(config)
    attach_images(agent, trust=trust)
    attach_lifecycle(agent, trust=trust)
    # The drop-in folder imports through the puller's trust checks and deploys through the reconciler.
    inbox = InboxSettings.from_config(config)
    if inbox.enabled:
        agent.inbox = InboxWatcher(
            settings=inbox,
            root=config.state_dir / "inbox",
            puller=agent.puller,
            control=_control(agent),
            events=agent.events,
        )
        agent.services.append(agent.inbox)
    attach_llm(agent)
    attach_grpc(agent)
    attach_k8s(agent, env=env)
    attach_mqtt(agent)
    # Last: READY=1 goes out once every other service has started, and since services
    # stop in reverse, STOPPING=1 goes out first.
    attach_sdnotify(agent, env=env)


def attach_images(agent: Agent, *, trust: TrustSettings | None = None) -> ImageService:
    """Image pulls and cache control: ``agent.puller`` and ``agent.cache``."""
    if agent.control is not None or agent.mqtt is not None:
        # They take the puller and the cache when they are built: attached later, these would go unused.
        raise RuntimeError("attach_images must come before attach_lifecycle and attach_mqtt")
    models = agent.models

    def in_use() -> list[VersionKey]:
        # Read from the pull thread; a list() of the dict's keys is atomic under the GIL.
        return list(models.loaded)

    puller = build_puller(agent.config, agent.repository, agent.events, in_use=in_use, trust=trust)
    service = ImageService(puller=puller, events=agent.events, log=agent.log)
    agent.puller = service
    agent.cache = CacheControl(puller.cache)
    agent.services.append(service)
    return service


def attach_lifecycle(
    agent: Agent, *, rollback_grace_s: float | None = None, trust: TrustSettings | None = None
) -> Lifecycle:
    """The reconciler (``agent.control``) and the local control API over it (``agent.repository_api``).

    It pulls through ``agent.puller`` and maintains ``agent.cache`` when they are
    attached already; without them only ``store:`` references resolve.
    ``rollback_grace_s`` overrides ``[lifecycle]`` (tests keep it short).
    """
    if agent.control is not None:
        raise RuntimeError("a lifecycle is attached already: one reconciler per agent")
    config = agent.config
    settings = LifecycleSettings.from_config(config)
    lifecycle = Lifecycle(
        models=agent.models,
        db=agent.db,
        repository=agent.repository,
        events=agent.events,
        metrics=agent.metrics,
        executor=agent.executor,
        node_status=agent.status,
        puller=agent.puller,
        cache=agent.cache,
        rollback_grace_s=settings.rollback_grace_s if rollback_grace_s is None else rollback_grace_s,
        drain_timeout_s=settings.drain_timeout_s,
    )
    agent.control = lifecycle
    # Built before the agent listens: its token file is made here on the first start.
    agent.repository_api = build_repository_api(
        control=lifecycle,
        config=config,
        db=agent.db,
        models=agent.models,
        trust=trust if trust is not None else TrustSettings.from_config(config),
        log=agent.log,
    )
    # First to start, whenever attached: recovery and the first reconcile precede the services that feed it.
    agent.services.insert(0, LifecycleService(lifecycle=lifecycle))
    return lifecycle


# -- agent/llm ---------------------------------------------------------------------------------------
def attach_llm(agent: Agent) -> OpenAIAPI:
    """Language models on the OpenAI-compatible API (``/v1``) and WASI-NN command apps per v2 request.

    ``[llm]`` is parsed here; nothing imports llama.cpp until a language model is first used. The
    versions' engines close with the versions (``LoadedModel.closers``), after the HTTP drain.
    """
    if agent.api.v1_routes is not None:
        raise RuntimeError("the language model API is attached already")
    from agent.llm.command_apps import CommandApps
    from agent.llm.metrics import LlmMetrics
    from agent.llm.service import LlmService
    from agent.llm.settings import LlmSettings
    from agent.server.openai_api import OpenAIAPI

    config = agent.config
    settings = LlmSettings.from_config(config)
    service = LlmService(models=agent.models, settings=settings, metrics=LlmMetrics(registry=agent.metrics.registry))
    api = OpenAIAPI(llm=service)
    agent.api.v1_routes = api.route
    agent.api.command_apps = CommandApps(
        runtime=agent.runtime, core=agent.inference, settings=settings, memory_limit_mb=config.memory_limit_mb
    )
    return api


# -- end agent/llm -----------------------------------------------------------------------------------


def attach_grpc(agent: Agent) -> GrpcServer | None:
    """The gRPC API (``agent.grpc``) on ``grpc_listen``; nothing, and None, when that is off.

    Its repository RPCs use ``agent.repository_api`` (attach the lifecycle first); without it
    they answer UNIMPLEMENTED. Started after the REST API listens; stopped, refusing new calls and
    draining those in flight, once the services attached after it have stopped.
    """
    if agent.grpc is not None:
        raise RuntimeError("a gRPC API is attached already")
    # Imported only when used: grpcio is not loaded by the tools that never serve.
    from agent.server.grpc_api import build_grpc_server

    server = build_grpc_server(
        config=agent.config,
        models=agent.models,
        core=agent.inference,
        is_ready=lambda: agent.started and not agent.stopping,
        repository=agent.repository_api,
        log=agent.log,
        nn_backends=agent.nn_backends,
    )
    if server is None:
        return None
    agent.grpc = server
    agent.services.append(server)
    return server


def attach_k8s(agent: Agent, *, env: Mapping[str, str] | None = None) -> KubeWatcher:
    """The Kubernetes watcher (``agent.k8s``), attached whether ``[k8s] enabled`` or not.

    It talks to a cluster only when enabled (by default: when the agent runs in
    a pod). Disabled, it still runs once at start-up to drop a desired state an
    earlier, enabled run left in SQLite (see :class:`KubeWatcher`).
    """
    watcher = KubeWatcher(
        settings=KubeSettings.from_config(agent.config, env),
        control=_control(agent),
        events=agent.events,
        log=agent.log,
    )
    agent.k8s = watcher
    agent.services.append(watcher)
    return watcher


def attach_mqtt(agent: Agent) -> MqttChannel | None:
    """The fleet channel (``agent.mqtt``) when ``[mqtt] host`` is set; otherwise nothing, and None.

    Settings are parsed (and a bad value refused, naming the key) here, at
    start-up; the broker is not contacted until the agent's services start,
    and then only in the background, so the agent serves whether or not the
    broker is reachable.
    """
    settings = MqttSettings.from_config(agent.config)
    if not settings.enabled:
        return None
    # Imported only when configured: the MQTT client libraries are not loaded otherwise.
    from agent.mqtt.channel import MqttChannel

    config = agent.config
    channel = MqttChannel(
        settings=settings,
        telemetry=TelemetrySettings.from_config(config),
        node_id=config.node_id,
        state_dir=config.state_dir,
        control=_control(agent),
        events=agent.events,
        metrics=agent.metrics,
        models=agent.models,
        blobs=agent.blobs,
        cache=agent.cache,
        log=agent.log,
        nn_backends=agent.nn_backends,
        gpu=agent.gpu,
    )
    agent.mqtt = channel
    agent.services.append(channel)
    return channel


def attach_sdnotify(agent: Agent, *, env: Mapping[str, str] | None = None) -> SystemdNotifier | None:
    """systemd notification (``agent.sdnotify``) when the agent runs under systemd (NOTIFY_SOCKET set).

    Must be the last service attached: see :class:`SystemdNotifier`.
    """
    notifier = SystemdNotifier(
        env=env,
        models=agent.models,
        events=agent.events,
        started=lambda: agent.started,
        stopping=lambda: agent.stopping,
        log=agent.log,
    )
    if not notifier.enabled:
        return None
    agent.sdnotify = notifier
    agent.services.append(notifier)
    return notifier


def _control(agent: Agent) -> Lifecycle:
    if agent.control is None:
        raise RuntimeError("attach_lifecycle(agent) first: this service drives the reconciler")
    return agent.control
