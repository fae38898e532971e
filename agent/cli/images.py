"""CLI verbs for model images: image build/push/sign/verify, keygen, pull, cache gc/verify."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import exitcodes, logs
from agent.cli.core import add_config_options, load_config, report_error
from agent.config import Config
from agent.errors import ConfigError, ConversionRefused

if TYPE_CHECKING:
    from agent.images.signing import PasswordFn


def register(sub: argparse._SubParsersAction) -> None:
    image = sub.add_parser(
        "image",
        help="build, push, sign and verify model images",
        description="Model images are OCI artifacts: an OCI manifest whose config is model.json and whose "
        "layers are the wasm module and the weights (docs/IMAGE_FORMAT.md).",
    )
    verbs = image.add_subparsers(dest="image_command", metavar="VERB", required=True)

    p = verbs.add_parser(
        "build",
        help="build an image from a model directory, an ONNX file or an MLflow model into an OCI layout",
        description="Write one model image into an OCI image layout directory, and/or a tar of one for "
        "air-gapped transfer. The source is a model directory (model.json, model.wasm, weights.safetensors, "
        "checked as an import would), an ONNX file (--onnx), or an MLflow model directory (its MLmodel file: "
        "the onnx or sklearn flavor); ONNX and MLflow models are converted to the shared kernel library "
        "(docs/CONVERTER.md). Builds are reproducible: the same source gives the same digest.",
        epilog="examples:\n"
        "  edge-agent image build agent/bundled/digits\n"
        "  edge-agent image build --onnx cnn.onnx --name cnn --version 3\n"
        "  edge-agent image build ./mlruns/0/abc/artifacts/model --name churn --version 7\n\n"
        "exit status: 0 built, 65 the model cannot be converted (every refused node is listed), "
        "66 no such file",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("directory", metavar="DIR", nargs="?", help="model directory or MLflow model directory")
    p.add_argument("--onnx", metavar="MODEL.onnx", help="convert this ONNX model (instead of DIR)")
    p.add_argument("-o", "--output", metavar="LAYOUT", help="layout directory (default: NAME-VERSION.oci)")
    p.add_argument("--tar", metavar="FILE", help="also (or only, without -o) write the layout as a tar")
    p.add_argument(
        "--name",
        help="ONNX and MLflow sources: the model's name (default: from the file or directory name). "
        "A model directory names its model in model.json: there --name is the old spelling of --ref-name",
    )
    p.add_argument("--version", help="ONNX and MLflow sources: the model's version (default: 1)")
    p.add_argument("--ref-name", metavar="NAME", help="the image's name in the layout (default: the model version)")
    p.add_argument(
        "--max-batch",
        type=int,
        metavar="N",
        help="ONNX and MLflow sources: most rows per call (default: up to 64, less for models whose "
        "buffers would exceed 256 MiB)",
    )
    p.add_argument(
        "--model-dir", metavar="DIR", help="ONNX and MLflow sources: also keep the converted model directory here"
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="MLflow sklearn models saved as pickle: load them (a pickle runs code: only for models you trust)",
    )
    p.set_defaults(func=cmd_build)

    p = verbs.add_parser(
        "push",
        help="push an image from an OCI layout to a registry",
        description="Upload an image from a layout (directory or tar; LAYOUT:NAME picks one of several) to "
        "REF, e.g. registry.example.com/models/digits:1. Blobs the repository has are skipped.",
    )
    add_config_options(p, listen=False)
    _add_plain_http(p)
    p.add_argument("layout", metavar="LAYOUT[:NAME]")
    p.add_argument("ref", metavar="REF")
    p.add_argument(
        "--sign-key",
        metavar="KEY",
        help="then sign the pushed image with this private key, as 'image sign REF --key KEY' would",
    )
    p.set_defaults(func=cmd_push)

    p = verbs.add_parser(
        "sign",
        help="sign an image in a registry or in an OCI layout (cosign-compatible)",
        description="Sign the image REF names with an ECDSA P-256 key, storing the signature where cosign "
        "does: the manifest tagged sha256-<hex>.sig in the same repository. For an OCI layout "
        "(oci:DIR[:NAME], oci-archive:TAR[:NAME], or a path) the signature manifest is stored in the layout "
        "under that name, and --identity (host/repository) names the image it vouches for; a tar is "
        "rewritten in place. The key's password comes from COSIGN_PASSWORD or a prompt; with neither "
        "(no terminal) an encrypted key is refused (exit 78).",
    )
    add_config_options(p, listen=False)
    _add_plain_http(p)
    p.add_argument("ref", metavar="REF|LAYOUT")
    p.add_argument("--key", required=True, metavar="KEY", help="private key file (cosign.key or PKCS#8 PEM)")
    p.add_argument(
        "--identity",
        metavar="HOST/REPO",
        help="for a layout: the registry/repository the signature vouches for (cosign's docker-reference)",
    )
    p.set_defaults(func=cmd_sign)

    p = verbs.add_parser(
        "verify",
        help="check an image's signature against the trust policy, without pulling it",
        description="Resolve REF (or read LAYOUT) and verify its signature with the keys the [trust] policy "
        "allows for it (or with --key). Exit 0 when it would be accepted, 65 when it would be refused.",
    )
    add_config_options(p, listen=False)
    _add_plain_http(p)
    p.add_argument("ref", metavar="REF|LAYOUT")
    p.add_argument("--key", action="append", metavar="PUB", help="public key file(s) to use instead of the policy")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "keygen",
        help="generate a signing key pair (cosign format)",
        description="Write PREFIX.key (ECDSA P-256, encrypted as cosign does; password from COSIGN_PASSWORD "
        "or a prompt) and PREFIX.pub (PEM). cosign reads both; --no-password writes a plain PKCS#8 key. "
        "Without a terminal, COSIGN_PASSWORD or --no-password it refuses (exit 78) rather than encrypt "
        "with an empty password.",
    )
    p.add_argument("--output-key-prefix", default="cosign", metavar="PREFIX", help="default: cosign")
    p.add_argument("--no-password", action="store_true", help="write an unencrypted PKCS#8 private key")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser(
        "pull",
        help="pull a signed model image into the local store",
        description="Pull REF (host/repo:tag or host/repo@sha256:...): verify its signature against the "
        "[trust] policy, fetch and check its blobs, and record the model version. It does not change what "
        "is served; deploy it for that. Offline, a tag resolves to its last known digest. "
        "oci:DIR[:NAME] or oci-archive:TAR[:NAME] imports from an OCI layout under the same checks.",
    )
    add_config_options(p, listen=False)
    _add_plain_http(p)
    p.add_argument("ref", metavar="REF|LAYOUT")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_pull)

    cache = sub.add_parser("cache", help="inspect and maintain the local image cache")
    cverbs = cache.add_subparsers(dest="cache_command", metavar="VERB", required=True)
    p = cverbs.add_parser(
        "gc",
        help="remove unreferenced blobs and stale partial downloads, then enforce the size budget",
        description="Remove blobs no model version needs, partial downloads older than "
        "cache.partial_max_age_s, then evict least recently used versions until the store fits "
        "cache.max_size. Active, previous and pinned versions are never evicted.",
    )
    add_config_options(p, listen=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cache_gc)
    p = cverbs.add_parser(
        "verify",
        help="re-hash every blob; quarantine those that fail",
        description="Re-hash every blob in the store. A blob whose content no longer matches its digest is "
        "moved to quarantine/ and the versions that need it are marked broken. Exit 65 when any failed.",
    )
    add_config_options(p, listen=False)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cache_verify)


# -- helpers ------------------------------------------------------------------------------------
def _add_plain_http(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plain-http",
        action="store_true",
        help="reach REF's registry over plain HTTP, for this command only (the config's "
        '[registry.hosts."HOST"] plain_http = true does it for good); for a local or test registry',
    )


def _config(args: argparse.Namespace) -> Config:
    config = load_config(args)
    logs.configure(config.log_level, config.log_format)
    if getattr(args, "plain_http", False):
        ref = getattr(args, "ref", "")
        if _layout_arg(ref) is None:
            _allow_plain_http(config, ref)
    return config


def _allow_plain_http(config: Config, ref_text: str) -> None:
    """``--plain-http``: what ``plain_http = true`` under ``[registry.hosts."HOST"]`` does, for REF's host only."""
    from agent.images.reference import Reference

    host = Reference.parse(ref_text).registry
    registry = config.section("registry")
    hosts = dict(registry.get("hosts") or {})
    hosts[host] = {**dict(hosts.get(host) or {}), "plain_http": True}
    config.sections["registry"] = {**registry, "hosts": hosts}


def _password_for(verb: str) -> PasswordFn:
    """cosign's convention: COSIGN_PASSWORD when set (even empty), else ask on the terminal, else refuse.

    Refusing matters: with no terminal, an empty password used to encrypt a new key
    silently, and a password-protected key failed as if damaged.
    """

    def password(confirm: bool) -> bytes:
        if "COSIGN_PASSWORD" in os.environ:
            return os.environ["COSIGN_PASSWORD"].encode()
        if not sys.stdin.isatty():
            if verb == "keygen":
                raise ConfigError(
                    "no password for the new private key: COSIGN_PASSWORD is not set and there is no terminal "
                    "to ask on; set COSIGN_PASSWORD (to encrypt the key with it), or pass --no-password to "
                    "write an unencrypted key"
                )
            raise ConfigError(
                "the private key is encrypted and there is no password for it: COSIGN_PASSWORD is not set "
                "and there is no terminal to ask on; set COSIGN_PASSWORD to the key's password "
                "(keys written by keygen --no-password need none)"
            )
        return _ask(confirm)

    return password


def _ask(confirm: bool) -> bytes:
    first = getpass.getpass("Enter password for private key: ")
    if confirm and getpass.getpass("Enter password for private key again: ") != first:
        from agent.images.errors import KeyFileError

        raise KeyFileError("passwords do not match")
    return first.encode()


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# -- verbs --------------------------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    import tempfile

    from agent.artefacts import read_model_spec
    from agent.images.layout import build_from_dir, write_tar

    if (args.onnx is None) == (args.directory is None):
        print("edge-agent: give a model directory, an MLflow model directory or --onnx FILE (one)", file=sys.stderr)
        return exitcodes.USAGE
    missing = args.onnx if args.onnx is not None else args.directory
    if not os.path.lexists(missing):
        print(f"edge-agent: {missing} does not exist", file=sys.stderr)
        return exitcodes.NOINPUT
    with tempfile.TemporaryDirectory(prefix="edge-agent-convert-") as scratch:
        if args.onnx is not None or _is_mlflow(args.directory):
            directory = _convert_source(args, Path(scratch) / "model")
            ref_name = args.ref_name
        else:
            directory = Path(args.directory)
            for option in ("version", "max_batch", "model_dir"):
                if getattr(args, option) is not None:
                    flag = "--" + option.replace("_", "-")
                    print(f"edge-agent: {flag} applies to ONNX and MLflow sources only", file=sys.stderr)
                    return exitcodes.USAGE
            ref_name = args.ref_name
            if args.name is not None:
                print("edge-agent: --name for a model directory is deprecated: use --ref-name", file=sys.stderr)
                ref_name = ref_name or args.name
        return _build_layout(args, directory, ref_name, read_model_spec, build_from_dir, write_tar)


def _is_mlflow(directory: str) -> bool:
    from agent.convert.sources import is_mlflow_dir

    return is_mlflow_dir(Path(directory)) and not (Path(directory) / "model.json").exists()


def _convert_source(args: argparse.Namespace, out: Path) -> Path:
    """Convert the ONNX file or MLflow directory into a model directory at ``out``."""
    try:
        from agent.convert.build import convert, write_model_dir
        from agent.convert.sources import from_mlflow_dir, from_onnx_file
    except ImportError as exc:
        raise ConversionRefused(
            f"converting models needs the convert extra: pip install 'edge-agent[convert]' ({exc.name} is missing)"
        ) from exc
    if args.onnx is not None:
        source = from_onnx_file(Path(args.onnx))
    else:
        source = from_mlflow_dir(Path(args.directory), allow_pickle=args.allow_pickle)
    name = args.name or source.name
    version = args.version or "1"

    def progress(message: str) -> None:
        print(f"edge-agent: {message}", file=sys.stderr, flush=True)

    converted = convert(
        source.model,
        name=name,
        version=version,
        max_batch=args.max_batch,
        description=source.description,
        progress=progress,
    )
    write_model_dir(converted, out)
    if args.model_dir:
        write_model_dir(converted, Path(args.model_dir))
        progress(f"model directory written to {args.model_dir}")
    doc = converted.doc
    progress(
        f"converted {len(converted.graph.nodes)} nodes into {len(converted.plan.ops)} kernel calls; "
        f"max batch {doc['max_batch']}, memory limit {doc['resources']['memory_limit_mb']} MiB"
    )
    return out


def _build_layout(
    args: argparse.Namespace,
    directory: Path,
    ref_name: str | None,
    read_model_spec: Any,
    build_from_dir: Any,
    write_tar: Any,
) -> int:
    import tempfile

    if not directory.is_dir():
        print(f"edge-agent: {directory} is not a directory", file=sys.stderr)
        return exitcodes.NOINPUT
    output = Path(args.output) if args.output else None
    if output is None and not args.tar:
        # Read as build_from_dir reads it (size cap, no link followed): a model.json it would
        # refuse is refused here, with the same error, before anything is written.
        named = read_model_spec(directory)
        output = Path(f"{named.name}-{named.version}.oci")
    with tempfile.TemporaryDirectory(prefix="edge-agent-build-") as tmp:
        layout_dir = output if output is not None else Path(tmp) / "layout"
        built = build_from_dir(directory, layout_dir, ref_name)
        if args.tar:
            write_tar(layout_dir, Path(args.tar))
    spec = built.spec
    assert spec is not None
    where = [f"oci:{output}:{built.name}"] if output is not None else []
    if args.tar:
        where.append(f"oci-archive:{args.tar}")
    print(f"built {spec.name}:{spec.version} {built.manifest.digest} -> {', '.join(where)}")
    return exitcodes.OK


def cmd_push(args: argparse.Namespace) -> int:
    from agent.images.layout import open_layout, split_layout_arg
    from agent.images.push import push_layout, sign_image
    from agent.images.settings import RegistrySettings
    from agent.images.signing import load_private_key

    config = _config(args)
    settings = RegistrySettings.from_config(config)
    # The key is read (and its password asked for) before anything is uploaded.
    key = load_private_key(Path(args.sign_key), _password_for("sign")) if args.sign_key else None
    path, name = split_layout_arg(args.layout)
    with open_layout(path.resolve()) as layout:
        result = push_layout(layout, name, args.ref, settings)
    print(
        f"pushed {result.ref} ({result.uploaded} blob(s) uploaded, {result.skipped} already there)"
        + (f"; its signature went along as {result.signature}" if result.signature else "")
    )
    if key is not None:
        digest, tag = sign_image(args.ref, key, settings)
        print(f"signed {args.ref} ({digest}); signature stored at tag {tag}")
    return exitcodes.OK


def _layout_arg(text: str) -> tuple[Path, str | None] | None:
    """``oci:DIR[:NAME]``, ``oci-archive:TAR[:NAME]`` or an existing path: a layout; anything else: a reference."""
    from agent.images.layout import split_layout_arg

    if text.startswith(("oci:", "oci-archive:")) or Path(text).exists():
        path, name = split_layout_arg(text)
        # Layouts are opened without following links (agent/images/layout.py); one the operator
        # names on the command line is theirs to follow, so it is resolved here.
        return path.resolve(), name
    return None


def cmd_sign(args: argparse.Namespace) -> int:
    from agent.images.push import sign_image, sign_layout
    from agent.images.settings import RegistrySettings
    from agent.images.signing import load_private_key

    config = _config(args)
    settings = RegistrySettings.from_config(config)
    layout = _layout_arg(args.ref)
    if layout is not None and not args.identity:
        print(
            "edge-agent: signing a layout needs --identity HOST/REPO: the registry repository the signature "
            "vouches for (what the trust policy's scopes match)",
            file=sys.stderr,
        )
        return exitcodes.USAGE
    key = load_private_key(Path(args.key), _password_for("sign"))
    if layout is not None:
        digest, tag = sign_layout(layout[0], layout[1], key, args.identity, settings.max_signature_bytes)
        print(f"signed {args.ref} ({digest}) as {args.identity}; signature stored in the layout as {tag}")
    else:
        digest, tag = sign_image(args.ref, key, settings)
        print(f"signed {args.ref} ({digest}); signature stored at tag {tag}")
    return exitcodes.OK


def cmd_verify(args: argparse.Namespace) -> int:
    from agent.images.layout import open_layout
    from agent.images.reference import Reference
    from agent.images.registry import RegistryClient
    from agent.images.settings import RegistrySettings, TrustSettings
    from agent.images.trust import TrustPolicy
    from agent.images.verify import ImageVerifier

    config = _config(args)
    registry = RegistrySettings.from_config(config)
    if args.key:
        keys = {f"key{i}": str(Path(k).resolve()) for i, k in enumerate(args.key, 1)}
        trust = TrustPolicy(TrustSettings(True, keys, {"*": tuple(keys)}))
    else:
        trust = TrustPolicy(TrustSettings.from_config(config))
    # The very checks a pull or an import makes before fetching anything large.
    verifier = ImageVerifier(registry, trust)
    layout_arg = _layout_arg(args.ref)
    if layout_arg is not None:
        path, name = layout_arg
        with open_layout(path) as layout:
            digest = layout.resolve(name).digest
            image = f"oci:{path}" + (f":{name}" if name else "")
            verified = verifier.layout_signature(layout, image, digest)
        label = image
    else:
        ref = Reference.parse(args.ref)
        with RegistryClient(ref.registry, registry) as client:
            _raw, _ctype, digest = verifier.manifest(client, ref)
            verified = verifier.signature(client, ref, digest)
        label = ref.name
    who = f"{verified.key.describe()} for {verified.docker_reference}" if verified else "nobody (not required)"
    print(f"{label}@{digest}: signature OK, signed by {who}")
    return exitcodes.OK


def cmd_keygen(args: argparse.Namespace) -> int:
    from agent.images.signing import generate_keypair

    password = None if args.no_password else _password_for("keygen")(True)
    key_path, pub_path = generate_keypair(Path(args.output_key_prefix), password, force=args.force)
    print(f"Private key written to {key_path}")
    print(f"Public key written to {pub_path}")
    return exitcodes.OK


def cmd_pull(args: argparse.Namespace) -> int:
    from agent.images.progress import progress_for
    from agent.images.service import LocalStore, build_puller

    config = _config(args)
    puller = build_puller(config, LocalStore.open(config))
    layout = _layout_arg(args.ref)
    if layout is not None:
        result = puller.import_layout(layout[0], layout[1], progress_for(sys.stderr))
    else:
        result = puller.pull(args.ref, progress_for(sys.stderr))
    rec = result.record
    if args.json:
        _print_json(
            {
                "ref": result.ref,
                "digest": result.digest,
                "model": rec.model,
                "version": rec.version,
                "signed_by": result.signed_by,
                "offline": result.offline,
                "message": result.message,
                "image_bytes": result.image_bytes,
                "fetched_bytes": result.fetched_bytes,
                "seconds": round(result.seconds, 3),
                "blobs": [
                    {
                        "digest": b.digest,
                        "size": b.size,
                        "fetched": b.fetched,
                        "resumed_from": b.resumed_from,
                        "cached": b.cached,
                    }
                    for b in result.blobs
                ],
            }
        )
    elif result.offline:
        report_error(result.message, logged_as=result.message)  # once: the image.offline warning may have said it
        print(f"{rec.model}:{rec.version} {result.digest} (offline, from the local store)")
    else:
        rate = result.fetched_bytes / result.seconds / 1e6 if result.seconds > 0 else 0.0
        print(
            f"pulled {result.ref} -> {rec.model}:{rec.version} ({result.digest}); "
            f"fetched {_mb(result.fetched_bytes)} of {_mb(result.image_bytes)} in {result.seconds:.2f} s "
            f"({rate:.0f} MB/s); signed by {result.signed_by or 'nobody (signatures not required)'}"
        )
        print(f"deploy it with: edge-agent deploy store:{rec.model}:{rec.version}")
    return exitcodes.OK


def _open_cache(args: argparse.Namespace) -> Any:
    from agent.cas import BlobStore
    from agent.images.cache import ImageCache
    from agent.images.settings import CacheSettings
    from agent.state import StateDB

    config = _config(args)
    return ImageCache(
        BlobStore(config.state_dir), StateDB(config.state_dir / "agent.db"), CacheSettings.from_config(config)
    )


def cmd_cache_gc(args: argparse.Namespace) -> int:
    report = _open_cache(args).gc()
    if args.json:
        _print_json(report.to_dict())
        return exitcodes.OK
    budget = _mb(report.budget_bytes) if report.budget_bytes else "no budget"
    print(
        f"removed {len(report.removed_blobs)} unreferenced blob(s) and {len(report.removed_partials)} temporary "
        f"file(s); evicted {len(report.evicted)} version(s)"
        + (f" ({', '.join(f'{m}:{v}' for m, v in report.evicted)})" if report.evicted else "")
        + f"; freed {_mb(report.freed_bytes)}; the store holds {_mb(report.used_bytes)} ({budget})"
    )
    return exitcodes.OK


def cmd_cache_verify(args: argparse.Namespace) -> int:
    report = _open_cache(args).verify()
    if args.json:
        _print_json(report.to_dict())
    else:
        print(f"checked {report.checked} blob(s), {_mb(report.bytes_checked)}")
        for digest in report.quarantined:
            print(f"QUARANTINED {digest}: content does not match its digest (moved to quarantine/)")
        for (model, version), digest in report.missing:
            print(f"MISSING {digest}, needed by {model}:{version}")
        for model, version in report.broken_versions:
            print(f"marked {model}:{version} broken")
        if report.ok:
            print("all blobs match their digests")
    return exitcodes.OK if report.ok else exitcodes.DATAERR
