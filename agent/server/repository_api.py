"""The local control API: Triton's model repository extension, plus this agent's own actions.

``POST /v2/repository/index`` lists stored versions and their state;
``POST /v2/repository/models/<model>/{load,unload,rollback,pin,unpin}`` and
``POST /v2/repository/deploy`` drive the node's :class:`agent.control.Control`
as the ``local`` source.

These endpoints change what a node serves, so every request must clear, in
this order (docs/CONFIG.md, "The control API"):

1. **Same origin.** A browser on the node (or one that can reach it) must not
   drive it: a request whose ``Origin`` is not the agent's own, or whose
   ``Sec-Fetch-Site`` says another site sent it, is refused (403) before
   anything else is looked at.
2. **The token.** ``Authorization: Bearer <token>`` (scheme case-insensitive,
   RFC 7235), compared in constant time; there is always a token — the
   configured ``api_token``, or one the agent made in ``<state_dir>/api-token``.
3. **JSON.** A body must be ``Content-Type: application/json`` (415 otherwise);
   an empty body may come without a Content-Type, but not with another one.
4. **Trusted registries.** A deploy of an image reference pulls only from a
   registry inside a ``[trust.scopes]`` entry (403 otherwise), so the API cannot
   be used to make the node fetch from wherever a caller names.

Inference and health stay open: the token guards control, not serving.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
import structlog

from agent import apitoken
from agent.control import Control
from agent.errors import AgentError, BadRequest, Forbidden
from agent.images.errors import BadReference
from agent.images.reference import Reference
from agent.server.http import Request, Response

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from agent.config import Config
    from agent.images.settings import TrustSettings
    from agent.models import ModelManager
    from agent.state import StateDB

log = structlog.get_logger("edge_agent.api")

# Triton's repository extension has load and unload; the rest are this agent's own.
ACTIONS = ("load", "unload", "rollback", "pin", "unpin")
# What a browser sends when the request came from this very origin, or from the user (address bar).
SAME_ORIGIN_FETCH_SITES = ("same-origin", "none", "")

TrustedScope = Callable[[Reference], "str | None"]


class RepositoryAPI:
    def __init__(
        self,
        *,
        control: Control,
        token: str,
        db: StateDB,
        models: ModelManager,
        trusted_scope: TrustedScope,
    ):
        if not token:
            raise ValueError("the control API needs a token")  # never open: see build_repository_api
        self.control = control
        self._token = token.encode()
        self.db = db
        self.models = models
        self.trusted_scope = trusted_scope

    # -- the gate --------------------------------------------------------------------------------
    def route(self, request: Request, parts: list[str]) -> Response | Awaitable[Response] | None:
        """``parts`` is the path below ``/v2``; None for a path that is not the repository API's."""
        if not parts or parts[0] != "repository":
            return None
        if request.method != "POST":
            resp = Response.error(405, "repository endpoints take POST")
            resp.headers.append(("Allow", "POST"))
            return resp
        refusal = self._cross_origin(request)
        if refusal is not None:
            log.warning("control request refused: cross-origin", path=request.path, reason=refusal)
            return Response.error(403, refusal)
        if not self.authorized(request.header("authorization")):
            resp = Response.error(
                401,
                "this endpoint needs the agent's API token (Authorization: Bearer <token>); "
                "it is api_token in the config, or the file api-token in the agent's state directory",
            )
            resp.headers.append(("WWW-Authenticate", 'Bearer realm="edge-agent"'))
            return resp
        content_type = request.header("content-type")
        if (request.body or content_type) and not _is_json(content_type):
            return Response.error(
                415, f"control requests are JSON: send Content-Type: application/json (got {content_type or 'none'})"
            )
        if parts == ["repository", "index"]:
            return Response.json(200, self.index())
        if parts == ["repository", "deploy"]:
            return self._action(request, None, "deploy")
        if len(parts) == 4 and parts[1] == "models" and parts[3] in ACTIONS:
            return self._action(request, parts[2], parts[3])
        return None

    def authorized(self, header: str) -> bool:
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() != "bearer":  # RFC 7235: the scheme is case-insensitive
            return False
        try:
            offered = credentials.strip().encode("ascii")
        except UnicodeEncodeError:
            return False
        return hmac.compare_digest(offered, self._token)

    @staticmethod
    def _cross_origin(request: Request) -> str | None:
        """Why the request must be refused as coming from another origin, or None."""
        site = request.header("sec-fetch-site").strip().lower()
        if site not in SAME_ORIGIN_FETCH_SITES:
            return f"cross-origin control requests are refused (Sec-Fetch-Site: {site})"
        origin = request.header("origin").strip()
        if "origin" in request.headers and not _own_origin(origin, request.header("host").strip()):
            return f"cross-origin control requests are refused (Origin: {origin or 'empty'})"
        return None

    # -- the endpoints ---------------------------------------------------------------------------
    def index(self) -> list[dict[str, Any]]:
        rows = []
        for mrec in self.db.models():
            # Every loaded version answers requests, the one kept warm for rollback
            # too: all are READY, as Triton reports every loaded version.
            serving = self.models.loaded_versions(mrec.name)
            for rec in self.db.versions(mrec.name):
                if rec.version in serving:
                    state, reason = "READY", ""
                elif rec.status in ("broken", "failed"):
                    state, reason = "UNAVAILABLE", rec.error or rec.status
                else:
                    state, reason = "UNAVAILABLE", "not loaded"
                rows.append({"name": mrec.name, "version": rec.version, "state": state, "reason": reason})
            if mrec.name in self.models.broken and not serving:
                for row in rows:
                    if row["name"] == mrec.name and row["version"] == mrec.active_version:
                        row["reason"] = self.models.broken[mrec.name]
        return rows

    async def _action(self, request: Request, model: str | None, action: str) -> Response:
        try:
            body = orjson.loads(request.body) if request.body else {}
        except orjson.JSONDecodeError:
            return Response.error(400, "request body is not valid JSON")
        params = body.get("parameters", {}) if isinstance(body, dict) else None
        if not isinstance(params, dict):
            return Response.error(400, "'parameters' must be an object")
        control = self.control
        try:
            if model is not None and action == "unload":
                result = await control.unload(model, source="local")
            elif model is not None and action == "rollback":
                result = await control.rollback(model, source="local")
            elif model is not None and action in ("pin", "unpin"):
                result = await control.pin(model, action == "pin", source="local")
            else:
                ref = params.get("ref")
                if ref is None and model is None:
                    return Response.error(400, "deploy needs parameters.ref")
                if ref is None:
                    ref = f"store:{model}" + (f":{params['version']}" if params.get("version") else "")
                if not isinstance(ref, str):
                    return Response.error(400, "parameters.ref must be a string")
                self.check_trusted(ref)
                result = await control.deploy(ref, source="local", model=model)
        except AgentError as exc:
            return Response.error(exc.http_status, str(exc))
        return Response.json(200, result)

    def check_trusted(self, ref: str) -> None:
        """A remote reference must lie in a trust scope: the API never makes the node fetch elsewhere."""
        if ref.startswith("store:"):
            return
        try:
            parsed = Reference.parse(ref)
        except BadReference as exc:
            raise BadRequest(str(exc)) from exc
        if self.trusted_scope(parsed) is None:
            log.warning("control request refused: registry outside the trust scopes", ref=ref)
            raise Forbidden(
                f"refused {ref}: {parsed.name} is outside every trust scope; the control API pulls only "
                "from registries and repositories listed in [trust.scopes]"
            )


def _is_json(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def _own_origin(origin: str, host: str) -> bool:
    """Whether ``origin`` is the agent's own: the very address the client reached it at.

    The agent serves no pages, so no script of its own origin exists; what a same-origin
    request can still come from is a person's browser pointed at the agent. That address
    counts only when it is an IP literal or ``localhost``: a DNS name may be one a hostile
    page rebinds to the node's address, and its Origin would then match its Host.
    """
    if not host or origin.lower() != f"http://{host}".lower():
        return False
    try:
        hostname = urlsplit(origin).hostname
    except ValueError:
        return False
    if hostname is None:
        return False
    if hostname == "localhost":
        return True
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name (or 0.0.0.0 / ::, which parse): it may resolve beyond the node


def build_repository_api(
    *,
    control: Control,
    config: Config,
    db: StateDB,
    models: ModelManager,
    trust: TrustSettings,
    log: FilteringBoundLogger,
) -> RepositoryAPI:
    """The control API over ``control``, with its token resolved (made in the state directory if none is set).

    Called by the wiring, before the agent listens: a token file is created then, and a
    listen address beyond loopback is warned about. Of ``trust`` only the scopes are
    used, to say which registries a deploy may pull from; the keys are the puller's.
    """
    from agent.images.trust import TrustPolicy

    token = config.api_token or apitoken.load_or_create(config.state_dir)
    host, _ = config.host_port
    if not is_loopback(host):
        log.warning(
            "the control API listens beyond loopback: anyone who can reach this address and holds the "
            "API token can change the models this node serves",
            listen=config.listen,
            token_source="api_token" if config.api_token else str(apitoken.token_path(config.state_dir)),
        )
    scopes = TrustPolicy(dataclasses.replace(trust, keys={}))
    return RepositoryAPI(
        control=control,
        token=token,
        db=db,
        models=models,
        trusted_scope=scopes.scope_for,
    )
