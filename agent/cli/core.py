"""Core verbs: run, models, import, infer, status."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent import apitoken, exitcodes, logs
from agent.config import Config
from agent.errors import AgentError, ClientError, TokenFileError

# edge-agent import: a line per imported version up to this many directories, and progress on
# stderr this often during a long run.
IMPORT_LINES_UP_TO = 20
PROGRESS_EVERY_S = 2.0


def report_error(message: str, logged_as: str | None = None) -> None:
    """A verb's failure as one ``edge-agent: ...`` line on stderr, unless a log line already said it.

    ``logged_as`` is the text a component may have logged the failure with (an
    exception's message): a pull logs its refusal, with the image and digest as
    fields, then raises it, and the person reading stderr should see it once.
    """
    if logged_as is not None and logs.already_logged(logged_as):
        return
    logs.print_error(f"edge-agent: {message}")


def add_config_options(parser: argparse.ArgumentParser, listen: bool = True) -> None:
    """Options every verb shares, so --state-dir/--config mean the same everywhere."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", metavar="FILE", help="TOML config file (env EDGE_AGENT_CONFIG)")
    group.add_argument("--state-dir", metavar="DIR", help="state directory (env EDGE_AGENT_STATE_DIR)")
    if listen:
        group.add_argument("--listen", metavar="HOST:PORT", help="API address (env EDGE_AGENT_LISTEN)")


def load_config(args: argparse.Namespace, **extra: Any) -> Config:
    overrides = {
        "state_dir": getattr(args, "state_dir", None),
        "listen": getattr(args, "listen", None),
        **extra,
    }
    return Config.load(file=getattr(args, "config", None), overrides=overrides)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run the agent in the foreground",
        description="Run the agent: load the active models from the local store, serve the Open Inference "
        "Protocol on --listen, stop cleanly on SIGTERM/SIGINT.",
    )
    add_config_options(p)
    p.add_argument(
        "--grpc-listen",
        metavar="HOST:PORT",
        help="gRPC API address, or off (default 127.0.0.1:8081; env EDGE_AGENT_GRPC_LISTEN)",
    )
    p.add_argument("--node-id", help="node identity (default: host name; env EDGE_AGENT_NODE_ID)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    p.add_argument("--log-format", choices=["auto", "json", "console"], help="default auto")
    p.add_argument("--pool-size", type=int, help="the most instances per model version (default 2)")
    p.add_argument(
        "--eager-instances",
        action="store_true",
        default=None,
        help="build every version's pool_size instances at load instead of on demand",
    )
    p.add_argument("--no-seed", action="store_true", help="do not import the bundled models into an empty store")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "models",
        help="list stored models and versions",
        description="List the models and versions in the local store, which one is active, and their blob digests.",
    )
    add_config_options(p, listen=False)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "import",
        help="add model versions from local directories",
        description="Import model directories (model.json, model.wasm, weights.safetensors) into the local "
        "store, in one process. A PATH holding a model.json is one model; any other PATH is a directory of "
        "model directories, each imported. Each version becomes its model's active version when the model "
        "has none, or with --activate. A directory that is refused is reported and skipped; the others are "
        f"imported. Exit {exitcodes.OK} when all were imported, {exitcodes.DATAERR} when some were refused, "
        f"{exitcodes.NOINPUT} when a PATH is missing or not a directory.",
    )
    add_config_options(p, listen=False)
    p.add_argument("paths", nargs="+", metavar="PATH", help="model directory, or a directory of them")
    p.add_argument("--activate", action="store_true", help="make each imported version the active one")
    p.add_argument("--quiet", "-q", action="store_true", help="no line per imported version, only the summary")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "infer",
        help="send an inference request to the running agent",
        description="POST an inference request to the agent. The input is either a whole Open Inference "
        'Protocol request ({"inputs": [...]}) or a bare JSON array for a single-input model.',
    )
    add_config_options(p)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--input", "-i", required=True, metavar="FILE", help="JSON file, or - for standard input")
    p.add_argument("--model-version", metavar="V", help="address one loaded version")
    p.add_argument("--url", help="agent base URL (default: http://<listen>)")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser(
        "status",
        help="show the running agent's state",
        description="Ask the running agent whether it is live and ready, and what it serves. "
        f"Exit {exitcodes.OK} when ready, {exitcodes.TEMPFAIL} when live but not ready, "
        f"{exitcodes.UNAVAILABLE} when unreachable.",
    )
    add_config_options(p)
    p.add_argument("--url", help="agent base URL (default: http://<listen>)")
    add_token_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)


# -- run ------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon import Agent  # heavy imports only for the daemon itself

    extra: dict[str, Any] = {
        "node_id": args.node_id,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "pool_size": args.pool_size,
        "eager_instances": args.eager_instances,
        "grpc_listen": args.grpc_listen,
    }
    if args.no_seed:
        extra["seed_bundled"] = False
    config = load_config(args, **extra)
    logs.configure(config.log_level, config.log_format)
    # What the systemd unit's UMask=0077 does, for an agent started any other way: nothing the daemon
    # or its services write (state, compile cache, API token, drop-in refusals) is readable by others.
    os.umask(0o077)

    # A model load on a worker thread is mostly Python holding the GIL; at the default 5 ms
    # switch interval the event loop would wait that long for it and a hot swap would show
    # up in the serving p99. 0.5 ms bounds that wait at a negligible cost in throughput.
    sys.setswitchinterval(0.0005)

    async def main() -> int:
        agent = Agent(config)
        from agent.wiring import attach_services

        attach_services(agent)
        return await agent.serve_forever()

    return asyncio.run(main())


# -- models / import ------------------------------------------------------------------------
def _open_store(args: argparse.Namespace) -> Any:
    from agent.cas import BlobStore
    from agent.repository import ModelRepository
    from agent.state import StateDB

    config = load_config(args)
    blobs = BlobStore(config.state_dir)
    return ModelRepository(blobs, StateDB(config.state_dir / "agent.db"))


def cmd_models(args: argparse.Namespace) -> int:
    repo = _open_store(args)
    rows = []
    for mrec in repo.db.models():
        for rec in repo.db.versions(mrec.name):
            rows.append(
                {
                    "model": rec.model,
                    "version": rec.version,
                    "active": rec.version == mrec.active_version,
                    "pinned": mrec.pinned and rec.version == mrec.active_version,
                    "status": rec.status,
                    "source": rec.source,
                    "module": rec.module_digest,
                    "weights": rec.weights_digest,
                    "error": rec.error,
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
        return exitcodes.OK
    if not rows:
        print("no models in the store")
        return exitcodes.OK
    print(f"{'MODEL':<20} {'VERSION':<12} {'ACTIVE':<7} {'STATUS':<8} {'MODULE':<20} SOURCE")
    for r in rows:
        active = "*" if r["active"] else ""
        if r["pinned"]:
            active += " pin"
        print(f"{r['model']:<20} {r['version']:<12} {active:<7} {r['status']:<8} {r['module'][7:19]:<20} {r['source']}")
    return exitcodes.OK


def cmd_import(args: argparse.Namespace) -> int:
    from agent.repository import model_dirs
    from agent.state import VersionRecord

    repo = _open_store(args)
    missing = False
    dirs: list[Path] = []
    for arg in args.paths:
        path = Path(arg)
        try:
            found = model_dirs(path)
        except OSError:
            report_error(f"{path} is not a directory")
            missing = True
            continue
        if not found:
            report_error(f"{path} holds no model.json and no model directories")
            missing = True
        dirs.extend(found)
    # One line per version for a few; past that, progress on stderr every PROGRESS_EVERY_S and the summary.
    verbose = not args.quiet and len(dirs) <= IMPORT_LINES_UP_TO
    imported: list[str] = []
    refused = 0
    start = last = time.monotonic()

    def each(directory: Path, outcome: VersionRecord | AgentError, activated: bool) -> None:
        nonlocal refused, last
        if isinstance(outcome, AgentError):
            report_error(f"cannot import {directory}: {outcome}")
            refused += 1
        else:
            imported.append(f"store:{outcome.model}:{outcome.version}")
            if verbose:
                print(
                    f"imported {outcome.model}:{outcome.version} (module {outcome.module_digest[:19]})"
                    + (", active" if activated else ""),
                    flush=True,
                )
        now = time.monotonic()
        done = len(imported) + refused
        if now - last >= PROGRESS_EVERY_S and done < len(dirs):
            last = now
            logs.print_error(f"edge-agent: import: {done}/{len(dirs)} directories, {refused} refused")

    repo.import_dirs(dirs, activate=args.activate, on_each=each)
    if len(dirs) > 1 or refused or missing:
        print(
            f"imported {len(imported)} of {len(dirs)} model directories"
            + (f", {refused} refused" if refused else "")
            + f" in {time.monotonic() - start:.1f} s"
        )
    if len(imported) == 1:
        print(f"a running agent serves it after `edge-agent deploy {imported[0]}` or a restart")
    elif imported:
        print("a running agent serves the active versions after a restart, or `edge-agent deploy store:NAME:VERSION`")
    if missing:
        return exitcodes.NOINPUT
    return exitcodes.DATAERR if refused else exitcodes.OK


# -- client verbs ---------------------------------------------------------------------------
def base_url(args: argparse.Namespace) -> tuple[str, int]:
    if args.url:
        rest = args.url.split("://", 1)[-1].rstrip("/")
        host, _, port = rest.rpartition(":")
        return host.strip("[]"), int(port)
    host, port = load_config(args).host_port
    return ("127.0.0.1" if host in ("0.0.0.0", "") else host), port


def request(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: Any = None,
    timeout: float = 30.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    host, port = base_url(args)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    payload = json.dumps(body).encode() if body is not None else None
    headers = {**(headers or {}), **({"Content-Type": "application/json"} if payload is not None else {})}
    try:
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    except OSError as exc:
        raise ClientError(f"agent at {host}:{port} is not reachable: {exc}", exitcodes.UNAVAILABLE) from exc
    finally:
        conn.close()
    try:
        doc = json.loads(data) if data else None
    except ValueError:
        doc = data.decode(errors="replace")
    return resp.status, doc


def cmd_infer(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.input == "-" else Path(args.input).read_text()
    except OSError as exc:
        report_error(f"cannot read {args.input}: {exc.strerror}")
        return exitcodes.NOINPUT
    try:
        doc = json.loads(text)
    except ValueError as exc:
        report_error(f"{args.input} is not valid JSON: {exc}")
        return exitcodes.DATAERR
    prefix = f"/v2/models/{args.model}" + (f"/versions/{args.model_version}" if args.model_version else "")
    if not (isinstance(doc, dict) and "inputs" in doc):
        status, meta = request(args, "GET", prefix)
        if status != 200:
            return _client_failure(status, meta)
        if len(meta["inputs"]) != 1:
            report_error('the model has several inputs; give a whole request with "inputs"')
            return exitcodes.DATAERR
        doc = {"inputs": [bare_tensor(doc, meta["inputs"][0])]}
    status, result = request(args, "POST", prefix + "/infer", doc)
    if status != 200:
        return _client_failure(status, result)
    print(json.dumps(result, indent=2))
    return exitcodes.OK


def bare_tensor(data: Any, input_meta: dict[str, Any]) -> dict[str, Any]:
    """Wrap a bare (nested) array as the model's input, adding the batch dimension if missing."""
    array = np.asarray(data)
    row = input_meta["shape"][1:]
    if list(array.shape) == row:
        array = array.reshape([1, *row])
    return {
        "name": input_meta["name"],
        "datatype": input_meta["datatype"],
        "shape": list(array.shape),
        "data": array.ravel().tolist(),
    }


def add_token_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--token",
        help="control API token (default: env EDGE_AGENT_API_TOKEN, api_token in the config, "
        "else the file api-token in the state directory)",
    )


class Token:
    """The control API token a client verb sends, and where it came from (for the error message)."""

    def __init__(self, value: str | None, where: str):
        self.value = value
        self.where = where

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"} if self.value else {}


def control_token(args: argparse.Namespace) -> Token:
    """--token, else $EDGE_AGENT_API_TOKEN, else api_token in the config, else ``<state_dir>/api-token``.

    The last is the token the agent makes on its first start when none is configured; the
    CLI run by the agent's user (or root) on the node finds it with no configuration.
    """
    if getattr(args, "token", None):
        return Token(args.token, "--token")
    if env := os.environ.get("EDGE_AGENT_API_TOKEN"):
        return Token(env, "EDGE_AGENT_API_TOKEN")
    config = load_config(args)
    if config.api_token:
        return Token(config.api_token, "api_token in the config")
    path = apitoken.token_path(config.state_dir)
    try:
        value = apitoken.read_token(config.state_dir)
    except TokenFileError as exc:
        return Token(None, str(exc))
    return Token(value, str(path) if value else f"none: no --token, no api_token, and no {path}")


def control_request(args: argparse.Namespace, path: str, body: Any, timeout: float = 600.0) -> tuple[int, Any]:
    """A POST to the agent's control API with its token; a refusal's message says where the token came from."""
    token = control_token(args)
    status, doc = request(args, "POST", path, body, timeout=timeout, headers=token.headers())
    if status == 401 and isinstance(doc, dict):
        doc = {**doc, "error": f"{doc.get('error')} [token used: {token.where}]"}
    return status, doc


def _client_failure(status: int, doc: Any) -> int:
    message = doc.get("error") if isinstance(doc, dict) else doc
    report_error(f"agent answered {status}: {message}")
    if status in (401, 403):
        return exitcodes.NOPERM
    if status in (400, 413, 415):
        return exitcodes.DATAERR
    if status in (404, 503):
        return exitcodes.UNAVAILABLE
    return exitcodes.SOFTWARE


def cmd_status(args: argparse.Namespace) -> int:
    try:
        _, _live = request(args, "GET", "/v2/health/live", timeout=5)
    except ClientError as exc:
        if args.json:
            print(json.dumps({"live": False, "ready": False, "error": str(exc)}))
        else:
            print(f"agent: not running ({exc})")
        return exitcodes.UNAVAILABLE
    ready_status, _ = request(args, "GET", "/v2/health/ready", timeout=5)
    index_status, index = control_request(args, "/v2/repository/index", {}, timeout=5)
    models = index if index_status == 200 and isinstance(index, list) else []
    ready = ready_status == 200
    models_error = None
    if index_status != 200:
        # Liveness and readiness are open and still decide the exit code; say why the models are missing.
        models_error = f"agent answered {index_status}: {index.get('error') if isinstance(index, dict) else index}"
        report_error(f"cannot list models: {models_error}")
    if args.json:
        doc: dict[str, Any] = {"live": True, "ready": ready, "models": models}
        if models_error is not None:
            doc["models_error"] = models_error
        print(json.dumps(doc, indent=2))
    else:
        host, port = base_url(args)
        print(f"agent: live, {'ready' if ready else 'NOT ready'} at http://{host}:{port}")
        for m in models:
            reason = f"  ({m['reason']})" if m.get("reason") else ""
            print(f"  {m['name']:<20} {m.get('version') or '-':<12} {m['state']}{reason}")
    return exitcodes.OK if ready else exitcodes.TEMPFAIL
