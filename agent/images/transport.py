"""HTTP(S) to one registry: keep-alive connections, TLS, redirects, auth challenges and retries.

Built on ``http.client`` so the agent needs no HTTP library and controls
every byte: a blob body is handed to the caller as a stream, never buffered
whole. Plain HTTP is used only for a host configured with ``plain_http``;
otherwise TLS is verified against the system store plus the host's
``ca_file``. Connection errors, stalls (no byte for ``stall_timeout_s``),
408, 429 and 5xx answers are retried with exponential backoff and jitter;
other answers are final and reported with the registry's own error text.
Deterministic failures — TLS spoken to a plain-HTTP server, an untrusted
certificate, a login the host has no credentials for, a 404 — are reported at
once, with what to change, never retried (:func:`is_transient` tells callers
that retry whole operations, such as a blob upload, which is which).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urlencode, urljoin, urlsplit

import structlog

from agent.images.auth import TokenCache, basic_header, parse_challenges
from agent.images.backoff import Backoff
from agent.images.errors import AuthError, NotInRegistry, RegistryError, RegistryUnreachable, TooLarge
from agent.images.settings import RegistrySettings

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
ERROR_BODY_LIMIT = 64 * 1024
IO_BLOCK = 1 << 20

Body = bytes | Callable[[], BinaryIO] | None


@dataclass
class Response:
    """A response whose body the caller reads (``read``/``readinto``) and then releases."""

    status: int
    headers: http.client.HTTPMessage
    _resp: http.client.HTTPResponse
    _conn: http.client.HTTPConnection
    url: str

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def readinto(self, buffer: memoryview) -> int:
        return self._resp.readinto(buffer)

    def read_limited(self, limit: int, what: str) -> bytes:
        """The whole body, refusing one longer than ``limit`` before reading it all."""
        length = self.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            self.close()
            raise TooLarge(int(length), limit, what)
        data = self._resp.read(limit + 1)
        if len(data) > limit:
            self.close()
            raise TooLarge(None, limit, what)
        self.close()
        return data

    def close(self) -> None:
        """Release the connection: kept for reuse when the body was read to its end."""
        if not self._resp.isclosed():
            # Unread body bytes would be taken for the next response: drop the connection.
            self._resp.close()
            self._conn.close()


class Transport:
    def __init__(
        self,
        registry: str,
        settings: RegistrySettings,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.registry = registry
        self.settings = settings
        self.host = settings.host(registry)
        self.scheme = "http" if self.host.plain_http else "https"
        self.base = f"{self.scheme}://{registry}"
        self.sleep = sleep
        self.tokens = TokenCache()
        self._basic: str | None = None
        self._conns: dict[tuple[str, str], http.client.HTTPConnection] = {}
        self._ssl: ssl.SSLContext | None = None
        self.log = structlog.get_logger("edge_agent.images").bind(registry=registry)

    # -- public ----------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        scope: str,
        what: str,
        headers: dict[str, str] | None = None,
        body: Body = None,
        ok: tuple[int, ...] = (200,),
        retry: bool = True,
    ) -> Response:
        """Send a request to the registry (``path`` or an absolute URL on it) and return an ``ok`` answer."""
        url = path if "://" in path else self.base + path
        backoff = self._backoff(retry)
        authenticated = False
        while True:
            all_headers = {"User-Agent": self.settings.user_agent, **(headers or {})}
            auth = self._auth_for(scope)
            if auth:
                all_headers["Authorization"] = auth
            try:
                resp = self._send_following_redirects(method, url, all_headers, body)
            except RegistryError:
                raise
            except (OSError, http.client.HTTPException) as exc:
                host = urlsplit(url).netloc
                if _permanent(exc):
                    raise RegistryError(f"{what}: registry {self.registry}: {_describe(exc, host)}") from exc
                self._fail_or_wait(backoff, what, _describe(exc, host), None)
                continue
            if resp.status == 401 and not authenticated:
                challenge = resp.header("WWW-Authenticate") or ""
                resp.read_limited(ERROR_BODY_LIMIT, "error body")
                self._authenticate(challenge, scope, what)
                authenticated = True
                continue
            if resp.status in RETRY_STATUSES and retry:
                detail = _error_text(resp)
                self._fail_or_wait(backoff, what, f"registry answered {resp.status} {detail}".strip(), resp)
                continue
            if resp.status in ok:
                return resp
            raise self._final_error(resp, what)

    def retry_loop(self, what: str) -> Backoff:
        """A fresh backoff for a caller that retries a whole operation (a resumed blob)."""
        return self._backoff(True)

    def wait_or_fail(self, backoff: Backoff, what: str, reason: str) -> None:
        self._fail_or_wait(backoff, what, reason, None)

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    # -- sending ---------------------------------------------------------------------------------
    def _send_following_redirects(self, method: str, url: str, headers: dict[str, str], body: Body) -> Response:
        origin = urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._send(method, url, headers, body)
            if resp.status not in REDIRECT_STATUSES or method not in ("GET", "HEAD"):
                return resp
            location = resp.header("Location")
            resp.read_limited(ERROR_BODY_LIMIT, "redirect body")
            if not location:
                raise RegistryError(f"registry {self.registry} redirected without a Location", resp.status)
            target = urljoin(url, location)
            parts = urlsplit(target)
            if parts.scheme == "http" and self.scheme == "https":
                raise RegistryError(f"registry {self.registry} redirected to plain HTTP ({target}); refused")
            if parts.netloc != origin:
                # Credentials are for the registry only, never for a storage backend it points to.
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = target
        raise RegistryError(f"registry {self.registry}: more than {MAX_REDIRECTS} redirects for {url}")

    def _send(self, method: str, url: str, headers: dict[str, str], body: Body) -> Response:
        parts = urlsplit(url)
        conn = self._connection(parts.scheme, parts.netloc)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        payload: Any = body() if callable(body) else body
        try:
            try:
                conn.request(method, target, body=payload, headers=headers)
                raw = conn.getresponse()
            except (OSError, http.client.HTTPException):
                conn.close()
                raise
        finally:
            if callable(body) and hasattr(payload, "close"):
                payload.close()
        if method == "HEAD":
            raw.read()  # nothing to read, but this marks the response finished for keep-alive
        return Response(raw.status, raw.headers, raw, conn, url)

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        key = (scheme, netloc)
        conn = self._conns.get(key)
        if conn is not None and conn.sock is not None:
            return conn
        if conn is not None:
            conn.close()
        host, port = _split_netloc(netloc, 443 if scheme == "https" else 80)
        timeout = self.settings.connect_timeout_s
        if scheme == "https":
            conn = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=self._ssl_context(), blocksize=IO_BLOCK
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout, blocksize=IO_BLOCK)
        conn.connect()
        # After the connect timeout, every read waits at most the stall timeout.
        assert conn.sock is not None
        conn.sock.settimeout(self.settings.stall_timeout_s)
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conns[key] = conn
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context()
            if self.host.ca_file is not None:
                try:
                    ctx.load_verify_locations(cafile=str(self.host.ca_file))
                except (OSError, ssl.SSLError) as exc:
                    raise RegistryError(
                        f"registry {self.registry}: cannot load ca_file {self.host.ca_file}: {exc}"
                    ) from exc
            self._ssl = ctx
        return self._ssl

    # -- auth ------------------------------------------------------------------------------------
    def _auth_for(self, scope: str) -> str | None:
        token = self.tokens.get(scope)
        if token:
            return f"Bearer {token}"
        return self._basic

    def _authenticate(self, header: str, scope: str, what: str) -> None:
        challenges = parse_challenges(header)
        creds = self.host.credentials()
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is not None:
            self._fetch_token(bearer.params, scope, creds, what)
            return
        if any(c.scheme == "basic" for c in challenges):
            if creds is None:
                raise AuthError(
                    f"{what}: registry {self.registry} requires a login; set username and password "
                    f'(or password_file) under [registry.hosts."{self.registry}"]',
                    401,
                )
            self._basic = basic_header(*creds)
            return
        raise AuthError(f"{what}: registry {self.registry} asked for authentication it does not name ({header!r})", 401)

    def _fetch_token(self, params: dict[str, str], scope: str, creds: tuple[str, str] | None, what: str) -> None:
        realm = params.get("realm")
        if not realm:
            raise AuthError(f"registry {self.registry}: Bearer challenge without a realm", 401)
        parts = urlsplit(realm)
        realm_plain_ok = self.host.plain_http or self.settings.host(parts.netloc).plain_http
        if parts.scheme != "https" and not (parts.scheme == "http" and realm_plain_ok):
            raise AuthError(
                f"registry {self.registry}: token service {realm} is not HTTPS; refused "
                "(configure plain_http for that host to allow it)",
                401,
            )
        query = {"service": params["service"]} if params.get("service") else {}
        query["scope"] = scope
        url = realm + ("&" if parts.query else "?") + urlencode(query)
        headers = {"User-Agent": self.settings.user_agent}
        if creds is not None:
            headers["Authorization"] = basic_header(*creds)
        backoff = self._backoff(True)
        while True:
            try:
                resp = self._send("GET", url, headers, None)
            except (OSError, http.client.HTTPException) as exc:
                if _permanent(exc):
                    raise AuthError(f"token for {what}: token service {realm}: {_describe(exc, parts.netloc)}") from exc
                self._fail_or_wait(backoff, f"token for {what}", _describe(exc, parts.netloc), None)
                continue
            if resp.status in RETRY_STATUSES:
                self._fail_or_wait(backoff, f"token for {what}", f"token service answered {resp.status}", resp)
                continue
            break
        body = resp.read_limited(ERROR_BODY_LIMIT, "token response")
        if resp.status in (401, 403):
            who = f"user {creds[0]!r}" if creds else "anonymous access"
            raise AuthError(f"{what}: token service {realm} refused {who} for {scope} ({resp.status})", resp.status)
        if resp.status != 200:
            raise AuthError(f"{what}: token service {realm} answered {resp.status}", resp.status)
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError) as exc:
            raise AuthError(f"token service {realm} answered something that is not a token", 401) from exc
        if not isinstance(token, str) or not token:
            raise AuthError(f"token service {realm} answered without a token", 401)
        expires_in = doc.get("expires_in")
        self.tokens.put(scope, token, expires_in if isinstance(expires_in, (int, float)) else None)

    # -- failures --------------------------------------------------------------------------------
    def _backoff(self, retry: bool) -> Backoff:
        s = self.settings
        return Backoff(s.attempts if retry else 1, s.backoff_initial_s, s.backoff_max_s, sleep=self.sleep)

    def _fail_or_wait(self, backoff: Backoff, what: str, reason: str, resp: Response | None) -> None:
        retry_after = _retry_after(resp.header("Retry-After")) if resp is not None else None
        if backoff.exhausted:
            status = resp.status if resp is not None else None
            raise RegistryUnreachable(
                f"{what}: registry {self.registry} failed {backoff.attempt + 1} time(s); last: {reason}", status
            )
        delay = backoff.next_delay(retry_after)
        self.log.warning(
            "registry.retry", what=what, reason=reason, attempt=backoff.attempt + 1, delay_s=round(delay, 2)
        )
        backoff.attempt += 1
        backoff.sleep(delay)

    def _final_error(self, resp: Response, what: str) -> RegistryError:
        detail = _error_text(resp)
        message = f"{what}: registry {self.registry} answered {resp.status}" + (f": {detail}" if detail else "")
        if resp.status == 400 and self.scheme == "http" and "HTTPS server" in detail:
            message += f"; it speaks HTTPS: remove plain_http for {self.registry} (and do not pass --plain-http)"
        if resp.status == 404:
            return NotInRegistry(message, 404)
        if resp.status in (401, 403):
            return AuthError(message, resp.status)
        return RegistryError(message, resp.status)


def _error_text(resp: Response) -> str:
    """The distribution spec's ``{"errors": [{"code", "message"}]}`` as one line."""
    try:
        body = resp.read_limited(ERROR_BODY_LIMIT, "error body")
    except (RegistryError, OSError, http.client.HTTPException):
        return ""
    try:
        doc = json.loads(body)
        errors = doc.get("errors") or []
        return "; ".join(f"{e.get('code', '')} {e.get('message', '')}".strip() for e in errors if isinstance(e, dict))
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace").strip()


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the operation that raised ``exc`` later could succeed.

    Unreachable (connection errors, stalls, 5xx after the retries) and 5xx are; a
    protocol mismatch, an untrusted certificate, a refused login or a 4xx are not.
    """
    if isinstance(exc, RegistryUnreachable):
        return True
    if isinstance(exc, RegistryError):
        return exc.status is not None and exc.status >= 500
    return isinstance(exc, OSError) and not _permanent(exc)


def plain_http_hint(host: str) -> str:
    """What to set for a registry that is meant to be reached over plain HTTP, ready to paste."""
    return (
        f"if {host} is meant to be reached over plain HTTP, allow it for that host only in the config:\n"
        f'    [registry.hosts."{host}"]\n'
        "    plain_http = true\n"
        "or pass --plain-http to the edge-agent image push/sign/verify or pull command"
    )


def _describe(exc: BaseException, host: str) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message}); set ca_file for this host"
    if isinstance(exc, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(exc):
        return f"TLS handshake failed: the server speaks plain HTTP; {plain_http_hint(host)}"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out (stalled)"
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


def _permanent(exc: BaseException) -> bool:
    """TLS trust and protocol mismatches: retrying cannot fix them, so say so at once."""
    return isinstance(exc, ssl.SSLCertVerificationError) or (
        isinstance(exc, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(exc)
    )


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return float(value.strip())
    return None


def _split_netloc(netloc: str, default_port: int) -> tuple[str, int]:
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    host, sep, port = netloc.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return netloc, default_port
