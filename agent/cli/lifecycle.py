"""Lifecycle verbs: deploy, rollback, pin, unpin, unload — sent to the running agent's local API."""

from __future__ import annotations

import argparse
import json
from typing import Any

from agent import exitcodes
from agent.cli.core import _client_failure, add_config_options, add_token_option, control_request


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deploy",
        help="load, warm and switch to a model version on the running agent",
        description="Deploy REF on the running agent: an OCI image reference (registry/repo:tag or @sha256:...) "
        "or store:MODEL[:VERSION] for a version already in the local store. The new version takes traffic only "
        "once it is loaded and warm; on any failure the serving version stays.",
    )
    _common(p)
    p.add_argument("ref", metavar="REF")
    p.set_defaults(func=lambda a: _call(a, "/v2/repository/deploy", {"parameters": {"ref": a.ref}}))

    for verb, what in (
        ("rollback", "switch back to the previous version (kept warm for the grace period)"),
        ("pin", "hold the active version against automatic changes"),
        ("unpin", "release a pin"),
        ("unload", "stop serving a model (its blobs stay cached)"),
    ):
        p = sub.add_parser(verb, help=what, description=what[0].upper() + what[1:] + ".")
        _common(p)
        p.add_argument("model", metavar="MODEL")
        action = "unload" if verb == "unload" else verb
        p.set_defaults(func=lambda a, action=action: _call(a, f"/v2/repository/models/{a.model}/{action}", {}))


def _common(p: argparse.ArgumentParser) -> None:
    add_config_options(p)
    p.add_argument("--url", help="agent base URL (default: http://<listen>)")
    add_token_option(p)


def _call(args: argparse.Namespace, path: str, body: dict[str, Any]) -> int:
    status, doc = control_request(args, path, body)
    if status != 200:
        return _client_failure(status, doc)
    print(json.dumps(doc, indent=2))
    return exitcodes.OK
