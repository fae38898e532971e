"""cosign-compatible signatures: simple-signing payloads, ECDSA P-256/SHA-256, PEM keys.

What cosign's key-based mode writes, we write, and the other way round:

- the payload is the simple-signing JSON, serialised as Go's ``json.Marshal``
  does it (``{"critical":{"identity":{"docker-reference":…},"image":
  {"docker-manifest-digest":…},"type":"cosign container image signature"},
  "optional":null}``);
- the signature is ASN.1 DER ECDSA over SHA-256 of the payload, base64;
- it is stored as a layer (media type simplesigning) of the OCI manifest
  tagged ``sha256-<hex>.sig``, the signature in the layer's annotation
  ``dev.cosignproject.cosign/signature``; several signatures are several layers;
- public keys are PEM ``PUBLIC KEY`` (PKIX); private keys are cosign's
  ``ENCRYPTED SIGSTORE PRIVATE KEY`` (scrypt + NaCl secretbox over PKCS#8,
  the go-securesystemslib format) or plain PKCS#8 ``PRIVATE KEY``.

All cryptography is the ``cryptography`` package's, and NaCl's secretbox is
PyNaCl's (libsodium); nothing here implements a primitive.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from agent.cas import sha256_digest
from agent.images import mediatypes as mt
from agent.images.errors import ImageRefused, KeyFileError
from agent.images.manifest import Descriptor, build_manifest, encode

ENCRYPTED_PEM_TYPES = ("ENCRYPTED SIGSTORE PRIVATE KEY", "ENCRYPTED COSIGN PRIVATE KEY")
WRITE_PEM_TYPE = "ENCRYPTED SIGSTORE PRIVATE KEY"
# go-securesystemslib's parameter sets (legacy, standard, OWASP); we write the
# legacy one, which every cosign release reads, and read all three.
SCRYPT_ACCEPTED = {(32768, 8, 1), (65536, 8, 1), (131072, 8, 1)}
SCRYPT_WRITE = (32768, 8, 1)
MAX_SIGNATURE_LAYERS = 64

PasswordFn = Callable[[bool], bytes]  # confirm -> password (cosign's PassFunc)


# -- payload ------------------------------------------------------------------------------------
def simple_signing_payload(docker_reference: str, digest: str, optional: dict[str, Any] | None = None) -> bytes:
    """The payload cosign signs, byte for byte as cosign serialises it."""
    doc = {
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": digest},
            "type": mt.COSIGN_SIGNATURE_TYPE,
        },
        # Go marshals a nil map as null and sorts map keys.
        "optional": dict(sorted(optional.items())) if optional else None,
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True)
class Claims:
    docker_reference: str
    digest: str
    optional: Any


def parse_payload(payload: bytes) -> Claims:
    """The claims of a simple-signing payload; ValueError when it is not one of cosign's."""
    try:
        doc = json.loads(payload)
        critical = doc["critical"]
        kind = critical["type"]
        digest = critical["image"]["docker-manifest-digest"]
        reference = critical.get("identity", {}).get("docker-reference", "")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError("payload is not a simple-signing document") from exc
    if kind != mt.COSIGN_SIGNATURE_TYPE:
        raise ValueError(f"payload type is {kind!r}, not {mt.COSIGN_SIGNATURE_TYPE!r}")
    if not isinstance(digest, str):
        raise ValueError("payload names no manifest digest")
    return Claims(str(reference), digest, doc.get("optional"))


# -- keys ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublicKey:
    name: str
    source: str  # file path or "inline", for messages
    key: Any

    def verify(self, signature_b64: str, payload: bytes) -> bool:
        try:
            signature = base64.b64decode(signature_b64, validate=True)
        except ValueError:
            return False
        try:
            if isinstance(self.key, ec.EllipticCurvePublicKey):
                # cosign hashes with SHA-256 whatever the curve (its default for key files).
                self.key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
            elif isinstance(self.key, rsa.RSAPublicKey):
                self.key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
            elif isinstance(self.key, ed25519.Ed25519PublicKey):
                self.key.verify(signature, payload)
            else:
                return False
        except InvalidSignature:
            return False
        return True

    def describe(self) -> str:
        return f"{self.name} ({self.source})"


def load_public_key(name: str, value: str) -> PublicKey:
    """A PEM public key from a file path, or inline PEM text."""
    if value.lstrip().startswith("-----BEGIN"):
        data, source = value.encode(), "inline"
    else:
        path = Path(value).expanduser()
        try:
            data, source = path.read_bytes(), str(path)
        except OSError as exc:
            raise KeyFileError(f"trust key {name}: cannot read {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"trust key {name} ({source}) is not a PEM public key: {exc}") from exc
    if isinstance(key, ec.EllipticCurvePublicKey) and not isinstance(
        key.curve, (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
    ):
        raise KeyFileError(f"trust key {name} ({source}) uses curve {key.curve.name}, which cosign does not")
    return PublicKey(name, source, key)


def load_private_key(path: Path, password: PasswordFn) -> ec.EllipticCurvePrivateKey:
    """A signing key: cosign's encrypted format, PKCS#8 (plain or encrypted), or SEC1 ``EC PRIVATE KEY``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key {path}: {exc.strerror}") from exc
    pem_type, body = _pem_block(data)
    try:
        if pem_type in ENCRYPTED_PEM_TYPES:
            der = decrypt_cosign_key(body, password(False))
            key = serialization.load_der_private_key(der, password=None)
        elif pem_type == "ENCRYPTED PRIVATE KEY":
            key = serialization.load_pem_private_key(data, password=password(False))
        elif pem_type in ("PRIVATE KEY", "EC PRIVATE KEY"):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            raise KeyFileError(f"{path}: unsupported PEM block {pem_type!r} for a private key")
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"cannot load private key {path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise KeyFileError(f"{path}: signing needs an ECDSA P-256 key (cosign's default)")
    return key


def sign_payload(key: ec.EllipticCurvePrivateKey, payload: bytes) -> str:
    return base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()


def generate_keypair(prefix: Path, password: bytes | None, force: bool = False) -> tuple[Path, Path]:
    """Write ``PREFIX.key`` (encrypted as cosign does, unless ``password`` is None) and ``PREFIX.pub``."""
    key_path, pub_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    if not force:
        for path in (key_path, pub_path):
            if path.exists():
                raise KeyFileError(f"{path} exists; refusing to overwrite it (use --force)")
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    if password is None:
        private_pem = _pem("PRIVATE KEY", der)
    else:
        private_pem = _pem(WRITE_PEM_TYPE, encrypt_cosign_key(der, password))
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    pub_path.write_bytes(public_pem)
    return key_path, pub_path


# -- cosign's encrypted private keys (go-securesystemslib "encrypted") -----------------------------
def encrypt_cosign_key(plaintext: bytes, password: bytes) -> bytes:
    secret = _secretbox()
    n, r, p = SCRYPT_WRITE
    salt = os.urandom(32)
    box_key = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(password)
    nonce = os.urandom(secret.SecretBox.NONCE_SIZE)
    ciphertext = secret.SecretBox(box_key).encrypt(plaintext, nonce).ciphertext
    doc = {
        "kdf": {"name": "scrypt", "params": {"N": n, "r": r, "p": p}, "salt": _b64(salt)},
        "cipher": {"name": "nacl/secretbox", "nonce": _b64(nonce)},
        "ciphertext": _b64(ciphertext),
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def decrypt_cosign_key(blob: bytes, password: bytes) -> bytes:
    try:
        doc = json.loads(blob)
        kdf, cipher = doc["kdf"], doc["cipher"]
        params = (int(kdf["params"]["N"]), int(kdf["params"]["r"]), int(kdf["params"]["p"]))
        salt = base64.b64decode(kdf["salt"])
        nonce = base64.b64decode(cipher["nonce"])
        ciphertext = base64.b64decode(doc["ciphertext"])
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyFileError("encrypted key is not in cosign's format (scrypt + nacl/secretbox JSON)") from exc
    if kdf.get("name") != "scrypt" or cipher.get("name") != "nacl/secretbox":
        raise KeyFileError(f"encrypted key uses {kdf.get('name')}/{cipher.get('name')}, not scrypt/nacl/secretbox")
    # Checking the parameters first stops a crafted file from making scrypt eat the machine.
    if params not in SCRYPT_ACCEPTED:
        raise KeyFileError(f"encrypted key has unsupported scrypt parameters N={params[0]} r={params[1]} p={params[2]}")
    secret = _secretbox()
    n, r, p = params
    box_key = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(password)
    try:
        return bytes(secret.SecretBox(box_key).decrypt(ciphertext, nonce))
    except Exception as exc:
        raise KeyFileError("cannot decrypt the private key: wrong password or damaged file") from exc


def _secretbox() -> Any:
    try:
        import nacl.secret
    except ImportError as exc:  # pragma: no cover - PyNaCl is a dependency
        raise KeyFileError(
            "cosign-format encrypted keys need PyNaCl (pip install pynacl); "
            "or use an unencrypted PKCS#8 key (keygen --no-password)"
        ) from exc
    return nacl.secret


# -- signature manifests ------------------------------------------------------------------------
@dataclass(frozen=True)
class SignatureLayer:
    descriptor: Descriptor
    signature: str  # base64, from the annotation


def parse_signature_manifest(raw: bytes) -> list[SignatureLayer]:
    """The simple-signing layers of a ``.sig`` manifest (OCI or Docker schema 2)."""
    try:
        doc = json.loads(raw)
        layers = doc["layers"]
        if not isinstance(layers, list):
            raise TypeError("layers is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise ImageRefused(f"signature manifest is not an image manifest: {exc}") from exc
    found = []
    for i, entry in enumerate(layers[:MAX_SIGNATURE_LAYERS]):
        try:
            desc = Descriptor.from_json(entry, f"layers[{i}]")
        except ValueError:
            continue
        signature = desc.annotations.get(mt.SIGNATURE_ANNOTATION)
        if desc.media_type == mt.SIMPLE_SIGNING and signature:
            found.append(SignatureLayer(desc, signature))
    return found


def build_signature_manifest(layers: list[tuple[bytes, str]]) -> tuple[bytes, bytes]:
    """(manifest, config) for payload/signature pairs, laid out as cosign lays them out."""
    descriptors = [
        Descriptor(mt.SIMPLE_SIGNING, sha256_digest(payload), len(payload), {mt.SIGNATURE_ANNOTATION: sig})
        for payload, sig in layers
    ]
    # The config go-containerregistry writes for cosign's signature image.
    config = encode(
        {
            "architecture": "",
            "created": "0001-01-01T00:00:00Z",
            "history": [{"created": "0001-01-01T00:00:00Z"}],
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": [d.digest for d in descriptors]},
            "config": {},
        }
    )
    config_desc = Descriptor(mt.OCI_CONFIG, sha256_digest(config), len(config))
    return build_manifest(config_desc, descriptors), config


# -- helpers ------------------------------------------------------------------------------------
def _pem(kind: str, der: bytes) -> bytes:
    body = base64.encodebytes(der).decode().replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (f"-----BEGIN {kind}-----\n" + "\n".join(lines) + f"\n-----END {kind}-----\n").encode()


def _pem_block(data: bytes) -> tuple[str, bytes]:
    text = data.decode("ascii", errors="replace")
    start = text.find("-----BEGIN ")
    if start < 0:
        raise KeyFileError("not a PEM file")
    end_label = text.find("-----", start + 11)
    kind = text[start + 11 : end_label]
    end = text.find(f"-----END {kind}-----", end_label)
    if end < 0:
        raise KeyFileError(f"PEM block {kind!r} is not terminated")
    body = text[end_label + 5 : end]
    try:
        return kind, base64.b64decode("".join(body.split()))
    except ValueError as exc:
        raise KeyFileError(f"PEM block {kind!r} is not base64") from exc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
