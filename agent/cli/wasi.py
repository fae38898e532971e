"""``edge-agent wasi run``: run a WASI-NN command app the way ``wasmedge --nn-preload`` runs it.

Options come before the app; everything after APP.wasm is the app's own argv.
The exit code is the app's (``proc_exit``, 0 when ``_start`` returns); a trap is
134, a timeout 124; bad flags are 64 (EX_USAGE), a missing app or directory 66
(EX_NOINPUT), a file that is not a WASI command 65 (EX_DATAERR).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

from agent import exitcodes, logs
from agent.errors import InvalidModel
from agent.wasinn.backend import BackendRegistry, NamedModel, discover
from agent.wasinn.command import DirMap, named_models, parse_dir, parse_preload, run_command

EX_USAGE = 64
T = TypeVar("T")

DESCRIPTION = """\
Run a WASI command app (APP.wasm, its _start) with the WASI-NN host: wasmedge's
--nn-preload models, environment, preopened directories and this process's
stdin/stdout/stderr. WasmEdge's published WASI-NN example apps run unchanged:

  edge-agent wasi run --dir .:. --nn-preload default:GGML:AUTO:model.gguf \\
      wasmedge-ggml-llama.wasm default 'Once upon a time'

Options go before APP.wasm; everything after it is the app's argv.
Exit code: the app's (proc_exit; 0 when _start returns); 134 when it traps,
124 after --timeout; 64 for bad flags; 66 when APP.wasm or a --dir is missing;
65 when APP.wasm is not a WASI command.
"""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but bad usage is EX_USAGE (64), as the wasmedge/wasmtime runners report it."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def build_run_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="edge-agent wasi run",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--nn-preload",
        action="append",
        default=[],
        type=_arg(parse_preload),
        metavar="NAME:ENCODING:TARGET:PATH",
        help="a named model for load_by_name, e.g. default:GGML:AUTO:llama.gguf (encoding and target in any "
        "case: ggml, onnx, pytorch; cpu, gpu, auto); repeatable",
    )
    p.add_argument(
        "--env", action="append", default=[], type=_arg(_parse_env), metavar="K=V", help="an environment variable"
    )
    p.add_argument(
        "--dir",
        action="append",
        default=[],
        type=_arg(parse_dir),
        metavar="HOST:GUEST",
        help="preopen directory HOST as GUEST (read-only; append :rw for writable); DIR alone maps DIR to itself, "
        "so wasmedge's --dir .:. works as is",
    )
    p.add_argument(
        "--memory-limit-mb", type=int, default=4096, metavar="MB", help="the app's linear memory cap (default 4096)"
    )
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop the app after this long (default: none)")
    p.add_argument(
        "--nn-seed",
        type=int,
        metavar="N",
        help="llama.cpp sampler seed for graphs whose options set no `seed` (default: random, as WasmEdge)",
    )
    p.add_argument(
        "--nn-threads", type=int, metavar="N", help="llama.cpp threads for graphs whose options set no `threads`"
    )
    p.add_argument("app", metavar="APP.wasm", help="the WASI command module")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="the app's arguments")
    return p


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("wasi", help="run WASI-NN command apps", description="WASI-NN command apps.")
    verbs = p.add_subparsers(dest="wasi_command", metavar="VERB", required=True)
    run = verbs.add_parser(
        "run",
        help="run a WASI command app with --nn-preload models, as wasmedge does",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
        usage="edge-agent wasi run [--nn-preload NAME:ENCODING:TARGET:PATH]... [--env K=V]... "
        "[--dir HOST:GUEST]... APP.wasm [ARGS...]",
    )
    # Parsed again by build_run_parser: there, --help is the full one and bad flags exit 64.
    run.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    run.set_defaults(func=lambda a: cmd_run(a.argv))


def cmd_run(argv: Sequence[str]) -> int:
    parser = build_run_parser()
    try:
        args = parser.parse_args(list(argv))
    except _UsageError as exc:
        parser.print_usage(sys.stderr)
        logs.print_error(f"edge-agent wasi run: {exc}")
        return EX_USAGE
    if args.memory_limit_mb <= 0 or (args.timeout is not None and args.timeout <= 0):
        logs.print_error("edge-agent wasi run: --memory-limit-mb and --timeout must be positive")
        return EX_USAGE
    app = Path(args.app)
    if not app.is_file():
        logs.print_error(f"edge-agent wasi run: {app}: no such file")
        return exitcodes.NOINPUT
    dirs: list[DirMap] = args.dir
    for d in dirs:
        if not d.host.is_dir():
            logs.print_error(f"edge-agent wasi run: --dir {d.host}: no such directory")
            return exitcodes.NOINPUT

    llama_options: dict[str, int] = {}
    if args.nn_seed is not None:
        llama_options["seed"] = args.nn_seed
    if args.nn_threads is not None:
        llama_options["threads"] = args.nn_threads
    # The operator names the model files here: an ONNX model may keep its weights beside it (external data).
    # The operator chose this app and its files: ONNX external data and TorchScript from the app's bytes are allowed.
    options = {"llama.cpp": llama_options, "onnxruntime": {"external_data": True}, "torchscript": {"guest_bytes": True}}
    registry = BackendRegistry(available=discover(), options=options)
    preloads: list[NamedModel] = args.nn_preload
    named = named_models(registry, preloads)
    try:
        result = run_command(
            app,
            args=args.args,
            program=args.app,
            env=dict(args.env),
            dirs=dirs,
            named=named,
            registry=registry,
            stdin="inherit",
            stdout="inherit",
            stderr="inherit",
            memory_limit_bytes=args.memory_limit_mb << 20,
            timeout_s=args.timeout,
        )
    except InvalidModel as exc:
        logs.print_error(f"edge-agent wasi run: {app}: {exc}")
        return exitcodes.DATAERR
    finally:
        named.close()
    if result.timed_out:
        logs.print_error(f"edge-agent wasi run: {app}: stopped after --timeout {args.timeout:g}s")
    elif result.trap is not None:
        logs.print_error(f"edge-agent wasi run: {app}: trapped: {result.trap}")
    return result.exit_code


def _parse_env(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--env {text!r}: expected K=V")
    return key, value


def _arg(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse ``type`` whose ValueError message is the usage error shown."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert
