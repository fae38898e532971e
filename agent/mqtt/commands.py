"""Signed fleet commands: the envelope, its checks, and signing (docs/MQTT.md, "Commands").

A command travels as ``{"body": "<JSON text>", "signature": "<base64>",
"key_id": "<hex>"}``. The signature is ECDSA P-256 / SHA-256 (DER, base64)
over the exact UTF-8 bytes of the ``body`` string, not over a re-serialised
object: a fleet tool in any language signs the bytes it sends, and no JSON
canonicalisation rule (key order, float formatting, escapes) can make a
valid command fail or two different commands share a signature.

Every refusal is a :class:`CommandRefused` with a stable ``code`` and, for
malformed input, the ``field`` at fault (``body.args.ref``), so the reply
tells the sender exactly what to fix.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.errors import ConfigError
from agent.images.errors import KeyFileError
from agent.images.signing import PublicKey, load_private_key, load_public_key, sign_payload

ENVELOPE_FIELDS = ("body", "signature", "key_id")
BODY_FIELDS = ("id", "command", "args", "issued_at", "expires_at", "target")
MAX_ID_LENGTH = 128


class CommandRefused(Exception):
    """A command that is not executed; the reply carries ``code``, the message and ``field``."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.code = code
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": str(self)}
        if self.field is not None:
            error["field"] = self.field
        return error


# -- command table --------------------------------------------------------------------------
@dataclass(frozen=True)
class Arg:
    kind: str  # JSON type: string | boolean | object | array
    required: bool = True


@dataclass(frozen=True)
class CommandSpec:
    args: dict[str, Arg] = field(default_factory=dict)
    # Commands that change the node run one at a time, in arrival order; read-only ones run at once.
    mutating: bool = True


COMMANDS: dict[str, CommandSpec] = {
    "deploy": CommandSpec({"ref": Arg("string"), "model": Arg("string", required=False)}),
    "rollback": CommandSpec({"model": Arg("string")}),
    "pin": CommandSpec({"model": Arg("string"), "pinned": Arg("boolean", required=False)}),
    "unload": CommandSpec({"model": Arg("string")}),
    "status": CommandSpec(mutating=False),
    "cache-gc": CommandSpec(),
    "cache-verify": CommandSpec(mutating=False),
    "set-config": CommandSpec({"changes": Arg("object")}),
    "set-desired": CommandSpec({"deployments": Arg("array")}),
}


@dataclass(frozen=True)
class Command:
    id: str
    name: str
    args: dict[str, Any]
    issued_at: float
    expires_at: float
    target: str
    digest: str  # sha256 of the signed body bytes: tells a re-delivery from a reused id
    key: str  # name of the fleet key that signed it

    @property
    def spec(self) -> CommandSpec:
        return COMMANDS[self.name]


# -- keys -------------------------------------------------------------------------------------
def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """First 16 hex digits of the SHA-256 of the key's DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


@dataclass(frozen=True)
class FleetKey:
    name: str  # file the key came from, for logs
    public: PublicKey  # the image tooling's key: one verification path for images and commands
    key_id: str

    def verifies(self, signature_b64: str, payload: bytes) -> bool:
        return self.public.verify(signature_b64, payload)


class FleetKeys:
    def __init__(self, keys: list[FleetKey]):
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def load(cls, paths: tuple[Path, ...] | list[Path]) -> FleetKeys:
        """PEM public keys (as ``edge-agent keygen`` writes) from files, or each ``*.pem``/``*.pub`` in a dir."""
        files: list[Path] = []
        for path in paths:
            if path.is_dir():
                files.extend(sorted(p for p in path.iterdir() if p.suffix in (".pem", ".pub")))
            else:
                files.append(path)
        keys = []
        for path in files:
            try:
                public = load_public_key(path.name, str(path))
            except KeyFileError as exc:
                raise ConfigError(f"mqtt.fleet_keys: {exc}") from exc
            key = public.key
            # Images may be signed with other cosign key types; fleet commands are P-256 only.
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
                raise ConfigError(f"mqtt.fleet_keys: {path} is not an ECDSA P-256 public key")
            keys.append(FleetKey(str(path), public, key_id(key)))
        return cls(keys)

    def verify(self, signature_b64: str, payload: bytes, wanted_id: str | None) -> FleetKey | None:
        candidates = [k for k in self.keys if wanted_id is None or k.key_id == wanted_id]
        for key in candidates:
            if key.verifies(signature_b64, payload):
                return key
        return None


# -- checking an incoming command --------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    max_bytes: int = 64 * 1024
    max_skew_s: float = 300.0
    max_lifetime_s: float = 7 * 86400.0


def claimed_id(payload: bytes) -> str | None:
    """The id a payload claims, however broken the rest is, so even a refusal can name it."""
    try:
        envelope = orjson.loads(payload)
        body = orjson.loads(envelope["body"])
        value = body["id"]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH else None


def claimed_command(payload: bytes) -> str | None:
    try:
        value = orjson.loads(orjson.loads(payload)["body"])["command"]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) and len(value) <= 64 else None


def parse_command(
    payload: bytes, *, keys: FleetKeys, expected_target: str, limits: Limits, now: float | None = None
) -> Command:
    """Check size, envelope, signature, body, target and times; raise CommandRefused on the first fault."""
    now = time.time() if now is None else now
    if len(payload) > limits.max_bytes:
        raise CommandRefused(
            "too_large", f"command is {len(payload)} bytes; this node accepts at most {limits.max_bytes}"
        )
    try:
        envelope = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise CommandRefused("malformed_json", f"payload is not valid JSON: {exc}") from None
    if not isinstance(envelope, dict):
        raise CommandRefused("wrong_type", f"payload must be a JSON object, got {_json_type(envelope)}", "$")
    _no_unknown(envelope, ENVELOPE_FIELDS, "")
    body_text = _field(envelope, "body", "string", "")
    if "signature" not in envelope:
        raise CommandRefused("unsigned", "command carries no signature; fleet commands must be signed", "signature")
    signature_text = _field(envelope, "signature", "string", "")
    wanted_key = _field(envelope, "key_id", "string", "", required=False)

    body_bytes = body_text.encode("utf-8")
    if not len(keys):
        raise CommandRefused(
            "no_fleet_keys", "this node has no fleet public keys configured (mqtt.fleet_keys); it refuses all commands"
        )
    try:
        base64.b64decode(signature_text, validate=True)
    except ValueError:
        raise CommandRefused("bad_signature", "signature is not valid base64", "signature") from None
    signer = keys.verify(signature_text, body_bytes, wanted_key)
    if signer is None:
        if wanted_key and not any(k.key_id == wanted_key for k in keys.keys):
            raise CommandRefused(
                "bad_signature", f"signed by key {wanted_key}, which is not a fleet key of this node", "key_id"
            )
        which = f"fleet key {wanted_key}" if wanted_key else "any fleet key"
        raise CommandRefused("bad_signature", f"signature does not verify with {which}", "signature")

    try:
        body = orjson.loads(body_bytes)
    except orjson.JSONDecodeError as exc:
        raise CommandRefused("malformed_json", f"body is not valid JSON: {exc}", "body") from None
    if not isinstance(body, dict):
        raise CommandRefused("wrong_type", f"body must be a JSON object, got {_json_type(body)}", "body")
    _no_unknown(body, BODY_FIELDS, "body.")
    command_id = _field(body, "id", "string", "body.")
    if not 0 < len(command_id) <= MAX_ID_LENGTH or not command_id.isprintable():
        raise CommandRefused("invalid_value", f"id must be 1-{MAX_ID_LENGTH} printable characters", "body.id")
    name = _field(body, "command", "string", "body.")
    if name not in COMMANDS:
        raise CommandRefused(
            "unknown_command", f"unknown command {name!r} (one of: {', '.join(COMMANDS)})", "body.command"
        )
    target = _field(body, "target", "string", "body.")
    issued_at = _field(body, "issued_at", "number", "body.")
    expires_at = _field(body, "expires_at", "number", "body.")
    args = _field(body, "args", "object", "body.", required=False)
    args = {} if args is None else args

    if target != expected_target:
        raise CommandRefused(
            "wrong_target", f"command is for {target!r} but arrived on the topic of {expected_target!r}", "body.target"
        )
    if expires_at <= issued_at:
        raise CommandRefused("invalid_value", "expires_at must be later than issued_at", "body.expires_at")
    if expires_at - issued_at > limits.max_lifetime_s:
        raise CommandRefused(
            "invalid_value",
            f"command lifetime {expires_at - issued_at:.0f}s exceeds this node's limit of {limits.max_lifetime_s:.0f}s",
            "body.expires_at",
        )
    if issued_at > now + limits.max_skew_s:
        raise CommandRefused(
            "not_yet_valid",
            f"issued {issued_at - now:.0f}s in the future (clock skew allowed: {limits.max_skew_s:.0f}s)",
            "body.issued_at",
        )
    if now > expires_at:
        raise CommandRefused("expired", f"command expired {now - expires_at:.0f}s ago", "body.expires_at")
    check_args(name, args)
    return Command(
        id=command_id,
        name=name,
        args=args,
        issued_at=float(issued_at),
        expires_at=float(expires_at),
        target=target,
        digest=hashlib.sha256(body_bytes).hexdigest(),
        key=signer.name,
    )


def check_args(name: str, args: dict[str, Any]) -> None:
    spec = COMMANDS[name]
    _no_unknown(args, tuple(spec.args), "body.args.")
    for arg_name, arg in spec.args.items():
        _field(args, arg_name, arg.kind, "body.args.", required=arg.required)
    if name == "set-config" and not args["changes"]:
        raise CommandRefused("invalid_value", "changes must name at least one setting", "body.args.changes")
    if name == "set-desired":
        for i, item in enumerate(args["deployments"]):
            where = f"body.args.deployments[{i}]"
            if not isinstance(item, dict):
                raise CommandRefused("wrong_type", f"expected object, got {_json_type(item)}", where)
            _no_unknown(item, ("model", "ref", "pinned", "traffic"), where + ".")
            _field(item, "model", "string", where + ".")
            _field(item, "ref", "string", where + ".")
            _field(item, "pinned", "boolean", where + ".", required=False)
            traffic = _field(item, "traffic", "object", where + ".", required=False) or {}
            for version, weight in traffic.items():
                if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
                    raise CommandRefused(
                        "wrong_type",
                        f"weight must be a non-negative integer, got {weight!r}",
                        f"{where}.traffic.{version}",
                    )


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "number": (int, float),
}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    names: dict[type, str] = {str: "string", dict: "object", list: "array"}
    return names.get(type(value), type(value).__name__)


def _field(doc: dict[str, Any], name: str, kind: str, where: str, required: bool = True) -> Any:
    if name not in doc:
        if required:
            raise CommandRefused("missing_field", f"missing required field {where}{name}", where + name)
        return None
    value = doc[name]
    ok = isinstance(value, _JSON_TYPES[kind]) and not (kind == "number" and isinstance(value, bool))
    if kind == "number" and ok and not math.isfinite(value):
        ok = False
    if not ok:
        raise CommandRefused("wrong_type", f"{where}{name} must be a {kind}, got {_json_type(value)}", where + name)
    return value


def _no_unknown(doc: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for name in doc:
        if name not in known:
            allowed = ", ".join(known) or "none"
            raise CommandRefused("unknown_field", f"unknown field {where}{name} (allowed: {allowed})", where + name)


# -- signing (fleet tools, tests, the benchmark) --------------------------------------------------
def new_command(
    command: str,
    args: dict[str, Any] | None = None,
    *,
    target: str,
    ttl_s: float = 300.0,
    command_id: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """A command body with a fresh id, issued now and expiring after ``ttl_s``."""
    now = time.time() if now is None else now
    return {
        "id": command_id or uuid.uuid4().hex,
        "command": command,
        "args": args or {},
        "issued_at": round(now, 3),
        "expires_at": round(now + ttl_s, 3),
        "target": target,
    }


def sign_command(private_key: ec.EllipticCurvePrivateKey | Path, body: dict[str, Any] | str) -> bytes:
    """The envelope to publish: ``body`` (a dict, or JSON text sent as-is) signed with ``private_key``.

    ``private_key`` is a key object or a key file written by ``edge-agent
    keygen`` (the same tooling as image signatures); an encrypted key file
    takes its password from ``COSIGN_PASSWORD``, as ``edge-agent image sign``
    does.
    """
    if isinstance(private_key, Path):
        private_key = load_private_key(private_key, _password_from_env)
    text = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    envelope = {
        "body": text,
        "signature": sign_payload(private_key, text.encode("utf-8")),
        "key_id": key_id(private_key.public_key()),
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def _password_from_env(_confirm: bool) -> bytes:
    return os.environ.get("COSIGN_PASSWORD", "").encode()
