"""Serving protocols side by side: REST JSON, REST binary tensors, gRPC — edge-agent beside KServe's ModelServer.

    .venv/bin/python bench/bench_serving.py            # 10 s per row (needs .venv-bench for the KServe rows)
    .venv/bin/python bench/bench_serving.py --quick    # 3 s per row

Every row serves the bundled `digits` model (64 FP32 pixels per row in, `probabilities` [N,10] FP32 and
`label` [N] INT64 out) at batch 1 and batch 32, over three encodings of the Open Inference Protocol v2:

  * REST JSON   `POST /v2/models/digits/infer`, tensors as JSON lists, JSON response;
  * REST binary the same URL with Triton's binary tensor extension: a JSON header whose length is in the
                `Inference-Header-Content-Length` header, then the raw little-endian tensor bytes; outputs
                asked for in binary (`"binary_data_output": true`). The body is exactly what
                `tritonclient.http` sends by default (built with its `generate_request_body`);
  * gRPC        `inference.GRPCInferenceService/ModelInfer` with the input in `raw_input_contents`, as
                `tritonclient.grpc` sends it.

The agent runs `edge-agent run` on its defaults with `--listen` and `--grpc-listen` on free ports; `digits`
declares no `dynamic_batching`, so every request runs alone (merging is the dynamic-batching benchmark's part).

The anchor is KServe's Python ModelServer serving the same graph with onnxruntime (`kserve_digits.py
--serve-grpc`, in `.venv-bench` as in bench_core.py), REST and gRPC on the same process, measured in the same
run under the same load. `KSERVE_PYTHON=/abs/path/to/python` picks another interpreter for it (kserve 0.21 from
`.venv` works too); without either the KServe rows are skipped and the gRPC target reads UNMEASURED.

Load. The clients are C programs, so that on a 2-core machine the load generator does not take the server's CPU
the way a Python client would: `wrk -t1 -c16 --latency` for REST (a Lua script reads the request body from a
file, so binary bodies travel byte for byte) and `h2load -t1 -c16 -m1` for gRPC: a unary gRPC call is an HTTP/2
POST with `content-type: application/grpc`, `te: trailers` and a body of one flag byte 0, a 4-byte big-endian
length and the serialized ModelInferRequest. Both hold 16 requests in flight on one client thread (16
connections, one outstanding request each), the same offered load for every row; -c16 matches bench_core.py.
(A gRPC client would more often multiplex streams on one connection, `-c1 -m16`; one stream per connection
keeps the HTTP/1.1 and HTTP/2 rows comparable.)
Each row gets a 1 s warm-up run of the same tool, discarded, before its measured run.

Errors and correctness. wrk counts non-2xx answers and socket errors. h2load sees the HTTP/2 status only, and a
gRPC failure is an HTTP 200 with `grpc-status` in trailers, so two more checks stand in for it: (1) before and
after each gRPC load a real gRPC client (grpcio) sends the same serialized bytes and parses the answer as a
ModelInferResponse whose outputs must match a NumPy reference of the model; (2) every successful response is a
fixed size (checked in (1)), so responses whose DATA bytes fall short of it (a trailers-only gRPC error carries
none) are counted as errors: `errors = max(non-2xx, failed) + round(missing DATA bytes / response size)`. The REST
rows are checked the same way before and after their load (tritonclient parses the binary answers). A row whose
check fails is not loaded and says why; a target that depends on it reads UNMEASURED.

Targets (issue 13): edge-agent gRPC >= 3x KServe gRPC throughput at each batch; edge-agent binary REST at
batch 32 >= 2x edge-agent JSON REST at batch 32 (rows/s, which at the same batch is req/s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_core import DIGITS, fmt_us, free_port, kserve_python, pct, sample_inputs, wait_ready  # noqa: E402
from digits_onnx import build_onnx  # noqa: E402

BATCHES = (1, 32)
PROTOCOLS = ("REST JSON", "REST binary", "gRPC")
CONNECTIONS = 16
GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"


# -- reference and request bodies -----------------------------------------------------------------
def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = safetensors.numpy.load_file(str(DIGITS / "weights.safetensors"))
    hidden = np.maximum(x @ w["fc1.weight"] + w["fc1.bias"], 0)
    logits = hidden @ w["fc2.weight"] + w["fc2.bias"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32), logits.argmax(axis=1).astype(np.int64)


def check_outputs(x: np.ndarray, probabilities: np.ndarray, label: np.ndarray) -> None:
    want_p, want_l = reference(x)
    probabilities = np.asarray(probabilities, dtype=np.float32).reshape(want_p.shape)
    if not np.allclose(probabilities, want_p, atol=1e-5):
        raise AssertionError(f"probabilities differ from the reference by {np.abs(probabilities - want_p).max()}")
    if not np.array_equal(np.asarray(label).reshape(-1), want_l):
        raise AssertionError(f"label {np.asarray(label).reshape(-1)[:8]} != reference {want_l[:8]}")


def json_body(x: np.ndarray) -> bytes:
    inp = {"name": "pixels", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
    return json.dumps({"inputs": [inp]}).encode()


def binary_body(x: np.ndarray) -> tuple[bytes, int]:
    import tritonclient.http as triton_http

    inp = triton_http.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    body, header_length = triton_http.InferenceServerClient.generate_request_body([inp])
    return bytes(body), int(header_length)


def grpc_messages() -> Any:
    try:
        from tritonclient.grpc import service_pb2
    except ImportError:  # the same messages, as KServe ships them
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as service_pb2
    return service_pb2


def grpc_request(x: np.ndarray) -> bytes:
    pb = grpc_messages()
    request = pb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "pixels", "FP32"
    tensor.shape.extend(x.shape)
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request.SerializeToString()


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass
class Payload:
    protocol: str
    batch: int
    x: np.ndarray
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def payloads(batch: int) -> dict[str, Payload]:
    x = sample_inputs(batch)
    binary, header_length = binary_body(x)
    return {
        "REST JSON": Payload("REST JSON", batch, x, json_body(x), {"Content-Type": "application/json"}),
        "REST binary": Payload(
            "REST binary",
            batch,
            x,
            binary,
            {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)},
        ),
        "gRPC": Payload("gRPC", batch, x, grpc_frame(grpc_request(x))),
    }


# -- one-off correctness checks with real clients -------------------------------------------------
def check_rest(url: str, p: Payload) -> int:
    """POSTs the exact body wrk will send; returns the response size in bytes."""
    request = urllib.request.Request(url, data=p.body, headers=p.headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            raw, header_length = resp.read(), resp.headers.get("Inference-Header-Content-Length")
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"HTTP {exc.code}: {exc.read()[:200].decode(errors='replace')}") from None
    if p.protocol == "REST JSON":
        outputs = {o["name"]: o for o in json.loads(raw)["outputs"]}
        check_outputs(p.x, np.asarray(outputs["probabilities"]["data"]), np.asarray(outputs["label"]["data"]))
    else:
        import tritonclient.http as triton_http

        if header_length is None:
            raise AssertionError("binary request answered without Inference-Header-Content-Length")
        result = triton_http.InferResult.from_response_body(raw, header_length=int(header_length))
        for name in ("probabilities", "label"):
            params = (result.get_output(name) or {}).get("parameters", {})
            if "binary_data_size" not in params:
                raise AssertionError(f"output {name!r} not returned in binary although binary_data_output was set")
        check_outputs(p.x, result.as_numpy("probabilities"), result.as_numpy("label"))
    return len(raw)


def check_grpc(target: str, p: Payload, timeout: float = 10) -> int:
    """Sends the exact message h2load will send with a real gRPC client; returns the response frame size."""
    import grpc

    pb = grpc_messages()
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(GRPC_PATH, request_serializer=None, response_deserializer=None)
        raw = call(p.body[5:], timeout=timeout)
    response = pb.ModelInferResponse.FromString(raw)
    outputs: dict[str, np.ndarray] = {}
    raw_contents = list(response.raw_output_contents)
    for i, out in enumerate(response.outputs):
        dtype = {"FP32": "<f4", "INT64": "<i8"}[out.datatype]
        if raw_contents:
            outputs[out.name] = np.frombuffer(raw_contents[i], dtype=dtype)
        else:
            contents = out.contents.fp32_contents if out.datatype == "FP32" else out.contents.int64_contents
            outputs[out.name] = np.asarray(contents, dtype=dtype)
    if set(outputs) != {"probabilities", "label"}:
        raise AssertionError(f"outputs {sorted(outputs)}")
    check_outputs(p.x, outputs["probabilities"], outputs["label"])
    return 5 + len(raw)


def wait_grpc(target: str, p: Payload, proc: subprocess.Popen, timeout: float = 60) -> None:
    import grpc

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            check_grpc(target, p, timeout=2)
            return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


# -- load generators --------------------------------------------------------------------------------
def run_wrk(url: str, p: Payload, duration: float, workdir: Path) -> dict[str, Any]:
    body_file = workdir / f"body-{p.protocol.replace(' ', '-')}-{p.batch}.bin"
    body_file.write_bytes(p.body)
    headers = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in p.headers.items())
    script = workdir / "post.lua"
    script.write_text(
        f'local f = assert(io.open("{body_file}", "rb"))\nwrk.body = f:read("*a")\nf:close()\n'
        f'wrk.method = "POST"\n{headers}'
    )
    cmd = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration:g}s", "--latency", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    lat = {}
    for q in ("50", "99"):
        m = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)", out, re.M)
        lat[q] = float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(2)] if m else float("nan")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (
        sum(int(g) for g in socket_errors.groups()) if socket_errors else 0
    )
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": lat["50"],
            "p99": lat["99"], "errors": errors}  # fmt: skip


def run_h2load(target: str, p: Payload, duration: float, workdir: Path, frame_size: int) -> dict[str, Any]:
    body_file = workdir / f"body-grpc-{p.batch}.bin"
    body_file.write_bytes(p.body)
    log = workdir / "h2load.log"
    log.unlink(missing_ok=True)
    cmd = [
        "h2load", "-t1", f"-c{CONNECTIONS}", "-m1", f"-D{duration:g}", "-d", str(body_file),
        "-H", "content-type: application/grpc", "-H", "te: trailers", "--log-file", str(log),
        f"http://{target}{GRPC_PATH}",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out)  # fmt: skip
    if m is None:
        raise RuntimeError(f"unexpected h2load output:\n{out}")
    done, failed = int(m.group(3)), int(m.group(5))  # failed includes errored and timed out
    status_2xx = int(re.search(r"status codes: (\d+) 2xx", out).group(1))
    data = int(re.search(r"traffic: .*\((\d+)\) data", out).group(1))
    short = max(0, round((status_2xx * frame_size - data) / frame_size))
    durations = []
    for line in log.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[1] == "200":
            durations.append(int(fields[2]) * 1e-6)
    seconds = float(re.search(r"finished in ([\d.]+)(ms|s),", out).group(1))
    seconds *= 1e-3 if re.search(r"finished in [\d.]+ms,", out) else 1.0
    rps = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out).group(1))
    return {
        "rps": rps,
        "p50": pct(durations, 50) if durations else float("nan"),
        "p99": pct(durations, 99) if durations else float("nan"),
        "errors": max(done - status_2xx, failed) + short,
        "seconds": seconds,
    }


# -- servers -----------------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    http: str
    grpc: str | None
    why_no_grpc: str = ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def agent_has_grpc() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--help"], cwd=REPO, capture_output=True, text=True
    ).stdout
    return "--grpc-listen" in out


def start_agent(workdir: Path, probe: Payload) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    cmd = [sys.executable, "-m", "agent", "run", "--state-dir", str(workdir / "agent-state"),
           "--listen", f"127.0.0.1:{port}", "--log-level", "warning"]  # fmt: skip
    grpc_target, why = None, ""
    if agent_has_grpc():
        grpc_target = f"127.0.0.1:{free_port()}"
        cmd += ["--grpc-listen", grpc_target]
    else:
        why = "this agent has no `run --grpc-listen`"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server("edge-agent", proc, f"127.0.0.1:{port}", grpc_target, why)
    try:
        wait_ready(f"http://{server.http}/v2/models/digits/ready", proc)
        if grpc_target:
            grpc_up(server, probe)
    except BaseException:
        server.stop()
        raise
    return server


def start_kserve(workdir: Path, probe: Payload) -> Server | None:
    python = kserve_python()
    if python is None:
        return None
    onnx_path = workdir / "digits.onnx"
    onnx_path.write_bytes(build_onnx(DIGITS / "weights.safetensors"))
    http_port, grpc_port = free_port(), free_port()
    cmd = [python, str(REPO / "bench" / "kserve_digits.py"), "--model", str(onnx_path),
           "--http_port", str(http_port), "--grpc_port", str(grpc_port), "--serve-grpc"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = Server("KServe+ORT", proc, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    try:
        wait_ready(f"http://{server.http}/v2/models/digits/ready", proc, timeout=120)
        grpc_up(server, probe)
    except BaseException:
        server.stop()
        raise
    return server


def grpc_up(server: Server, probe: Payload) -> None:
    """Waits for the gRPC port; a server whose gRPC never answers keeps its REST rows and says why it has no gRPC."""
    assert server.grpc is not None
    try:
        wait_grpc(server.grpc, probe, server.proc, timeout=30)
    except Exception as exc:  # noqa: BLE001 — reported in the gRPC rows
        details = getattr(exc, "details", None)
        server.why_no_grpc = f"gRPC on {server.grpc} failed: {details() if callable(details) else exc}"
        server.grpc = None


# -- one row ---------------------------------------------------------------------------------------------
def measure(server: Server, p: Payload, duration: float, warmup: float, workdir: Path) -> dict[str, Any]:
    if p.protocol == "gRPC":
        if server.grpc is None:
            return {"skip": server.why_no_grpc}
        target = server.grpc

        def check() -> int:
            return check_grpc(target, p)

        def load(seconds: float, size: int) -> dict[str, Any]:
            return run_h2load(target, p, seconds, workdir, size)
    else:
        url = f"http://{server.http}/v2/models/digits/infer"

        def check() -> int:
            return check_rest(url, p)

        def load(seconds: float, size: int) -> dict[str, Any]:
            return run_wrk(url, p, seconds, workdir)

    try:
        size = check()
    except Exception as exc:  # noqa: BLE001 — the row reports why it was not measured
        return {"skip": f"check failed: {exc}"}
    load(warmup, size)
    result = load(duration, size)
    try:
        check()
    except Exception as exc:  # noqa: BLE001
        result["errors_after"] = f"check after load failed: {exc}"
    return result


def row_line(server: str, p_name: str, batch: int, r: dict[str, Any], anchor: dict[str, Any] | None) -> str:
    head = f"  {server:11} {p_name:12} {batch:>5}"
    if "skip" in r:
        return f"{head}  not measured: {r['skip']}"
    vs = f"{r['rps'] / anchor['rps']:8.2f}x" if anchor and "skip" not in anchor and anchor["rps"] else f"{'':9}"
    line = (
        f"{head} {r['rps']:9.0f} {r['rps'] * batch:10.0f} {fmt_us(r['p50']):>11} {fmt_us(r['p99']):>11} "
        f"{r['errors']:>7} {vs}"
    )
    return line + (f"  {r['errors_after']}" if "errors_after" in r else "")


def ratio_line(label: str, num: dict[str, Any] | None, den: dict[str, Any] | None, target: float) -> str:
    if not num or not den or "skip" in num or "skip" in den or not den["rps"]:
        return f"  {label}: UNMEASURED (target >= {target:g}x)"
    ratio = num["rps"] / den["rps"]
    verdict = "PASS" if ratio >= target else "MISS"
    return f"  {label}: {ratio:.2f}x (target >= {target:g}x) {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 s per row instead of 10 s")
    parser.add_argument("--duration", type=float, help="seconds per measured row (overrides --quick)")
    parser.add_argument("--no-kserve", action="store_true", help="skip the KServe anchor")
    args = parser.parse_args()
    duration = args.duration or (3.0 if args.quick else 10.0)
    warmup = 1.0
    for tool in ("wrk", "h2load"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: `make system-deps` installs it (wrk, nghttp2-client)")
    reproduce = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/bench_serving.py", *sys.argv[1:]])
    bodies = {batch: payloads(batch) for batch in BATCHES}
    workdir = Path(tempfile.mkdtemp(prefix="edge-bench-serving-"))
    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    servers: list[tuple[str, Callable[[Path, Payload], Server | None]]] = [("edge-agent", start_agent)]
    if not args.no_kserve:
        servers.append(("KServe+ORT", start_kserve))
    kserve_note = ""
    try:
        print(f"edge-agent serving benchmark ({os.cpu_count()} CPUs, model: digits MLP 64-64-10)")
        print(f"  REST: wrk -t1 -c{CONNECTIONS} -d{duration:g}s --latency; gRPC: h2load -t1 -c{CONNECTIONS} -m1 "
              f"-D{duration:g}; {warmup:g} s warm-up per row")  # fmt: skip
        load_before = os.getloadavg()[0]
        busy = load_before > 0.5 * (os.cpu_count() or 1)
        note = "  (the machine was already busy: figures are noisy)" if busy else ""
        print(f"  1-min load average before: {load_before:.2f}{note}\n")
        # One server at a time, so the two never share the CPUs during a measurement.
        for name, start in servers:
            server = start(workdir, bodies[1]["gRPC"])
            if server is None:
                kserve_note = "KServe rows skipped: no .venv-bench (`make .venv-bench/.installed` creates it)"
                continue
            try:
                for batch in BATCHES:
                    for protocol in PROTOCOLS:
                        results[(name, protocol, batch)] = measure(
                            server, bodies[batch][protocol], duration, warmup, workdir
                        )
            finally:
                server.stop()

        print(f"  {'server':11} {'protocol':12} {'batch':>5} {'req/s':>9} {'rows/s':>10} {'p50':>11} {'p99':>11} "
              f"{'errors':>7} {'vs KServe':>9}")  # fmt: skip
        for batch in BATCHES:
            for protocol in PROTOCOLS:
                for name, _ in servers:
                    if (name, protocol, batch) in results:
                        anchor = results.get(("KServe+ORT", protocol, batch)) if name == "edge-agent" else None
                        print(row_line(name, protocol, batch, results[(name, protocol, batch)], anchor))
        if kserve_note:
            print(f"  ({kserve_note})")
        print("\nTargets")
        for batch in BATCHES:
            print(
                ratio_line(
                    f"edge-agent gRPC / KServe gRPC, batch {batch:>2}",
                    results.get(("edge-agent", "gRPC", batch)),
                    results.get(("KServe+ORT", "gRPC", batch)),
                    3.0,
                )
            )
        print(
            ratio_line(
                "edge-agent REST binary / REST JSON, batch 32",
                results.get(("edge-agent", "REST binary", 32)),
                results.get(("edge-agent", "REST JSON", 32)),
                2.0,
            )
        )
        print(f"\n1-min load average after: {os.getloadavg()[0]:.2f} (this benchmark's own load included)")
        print(f"reproduce: {reproduce}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
