#!/usr/bin/env python3
"""Regenerate agent/server/proto/*_pb2*.py{,i} from inference.proto with grpcio-tools (``make grpc-stubs``).

``--check`` regenerates into a temporary folder and exits 1 when a committed file
differs (tests/test_grpc.py runs it). The output depends on the grpcio-tools
version, pinned in pyproject.toml's dev extra.

One edit follows protoc, always the same: the messages are registered in a
descriptor pool of their own, not protobuf's default one. ``tritonclient.grpc`` and
KServe each register their own copy of the ``inference`` package in the default
pool, and an agent running in a process that imported either (a test, the fleet
simulator) would otherwise fail to import with "duplicate symbol".
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO = Path("agent/server/proto/inference.proto")
OUTPUTS = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
OWN_POOL = "DESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile("


def generate(into: Path) -> dict[str, bytes]:
    """The generated files' contents by name, made from the repository's proto."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{REPO}",
            f"--python_out={into}",
            f"--pyi_out={into}",
            f"--grpc_python_out={into}",
            str(REPO / PROTO),
        ],
        check=True,
    )
    out = into / PROTO.parent
    files = {name: (out / name).read_bytes() for name in OUTPUTS}
    pb2 = files["inference_pb2.py"].decode()
    if pb2.count(DEFAULT_POOL) != 1:
        raise SystemExit("gen_grpc: the generated inference_pb2.py no longer registers its file the expected way")
    files["inference_pb2.py"] = pb2.replace(DEFAULT_POOL, OWN_POOL).encode()
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files; write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
    target = REPO / PROTO.parent
    if args.check:
        stale = [name for name, data in files.items() if (target / name).read_bytes() != data]
        for name in stale:
            print(f"gen_grpc: {PROTO.parent / name} differs from what {PROTO} generates", file=sys.stderr)
        return 1 if stale else 0
    for name, data in files.items():
        (target / name).write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
