"""The llama.cpp (ggml) WASI-NN backend and `edge-agent wasi run`, with WasmEdge's published example apps.

The apps (tests/data/wasmedge-ggml, unmodified binaries) run under the real CLI in
a subprocess, as their READMEs run them under `wasmedge --nn-preload`, against a
tiny seeded GGUF model (tests/ggufkit.py). What they print must be what
llama-cpp-python generates when called directly with the same settings: the
apps' own options (read from each app's main.rs), the same context size and token
count, and the same sampler seed (`--nn-seed`; the apps set none, and WasmEdge
then draws a random one).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: no ggml backend to test")

from ggufkit import make_tiny_llama  # noqa: E402

from agent.wasinn.abi import Errno, ExecutionTarget, TensorType  # noqa: E402
from agent.wasinn.abi import NnError as NnErrorType  # noqa: E402
from agent.wasinn.backend import BackendRegistry, Tensor, discover  # noqa: E402
from agent.wasinn.backends.ggml import GgmlBackend  # noqa: E402
from agent.wasinn.command import named_models, parse_preload, run_command  # noqa: E402

APPS = Path(__file__).parent / "data" / "wasmedge-ggml"
PROMPT = "Once upon a time"
# A hang guard for a loaded 2-core machine, not a speed check.
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ggml-apps")
    make_tiny_llama(d / "tiny.gguf", seed=0)
    # Generation that ends on its own with EOS, within a few tokens (the unload and stream apps).
    make_tiny_llama(d / "tiny-eos.gguf", seed=3, eos_bias=True)
    return d


class Reference:
    """llama-cpp-python on the same model file, one Llama per (model, n_ctx)."""

    def __init__(self, workdir: Path):
        self._workdir = workdir
        self._llms: dict[tuple[str, int], Any] = {}

    def llm(self, model: str, n_ctx: int) -> Any:
        key = (model, n_ctx)
        if key not in self._llms:
            self._llms[key] = llama_cpp.Llama(model_path=str(self._workdir / model), n_ctx=n_ctx, verbose=False)
        return self._llms[key]

    def complete(self, model: str, *, n_ctx: int, max_tokens: int, temp: float, seed: int) -> dict[str, Any]:
        # WasmEdge's sampler defaults (llama.cpp's common_params_sampling), spelled out.
        out: dict[str, Any] = self.llm(model, n_ctx).create_completion(
            PROMPT,
            max_tokens=max_tokens,
            temperature=temp,
            top_k=40,
            top_p=0.95,
            min_p=0.05,
            typical_p=1.0,
            repeat_penalty=1.0,
            seed=seed,
        )
        return {"text": out["choices"][0]["text"], "finish": out["choices"][0]["finish_reason"], **out["usage"]}

    def n_prompt(self, model: str) -> int:
        return len(self.llm(model, 256).tokenize(PROMPT.encode(), add_bos=True, special=True))


@pytest.fixture(scope="module")
def ref(workdir: Path) -> Reference:
    return Reference(workdir)


def wasi_run(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "wasi", "run", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def run_app(
    workdir: Path,
    app: str,
    *app_args: str,
    model: str = "tiny.gguf",
    seed: int | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    flags = ["--dir", ".:.", "--nn-preload", f"default:GGML:AUTO:{model}"]
    if seed is not None:
        flags += ["--nn-seed", str(seed)]
    for k, v in (env or {}).items():
        flags += ["--env", f"{k}={v}"]
    return wasi_run(workdir, *flags, str(APPS / f"{app}.wasm"), "default", *app_args)


def header(n_input: int) -> str:
    # What llama/llama-stream/set-input-twice print before generating.
    return (
        f"Prompt:\n{PROMPT}\nResponse:\n"
        f'[INFO] llama_commit: "{llama_cpp.llama_version().decode()}"\n'
        "[INFO] llama_build_number: 0\n"
        f"[INFO] Number of input tokens: {n_input}\n"
    )


# -- the example apps -------------------------------------------------------------------------


def test_basic_streams_to_stdout_what_llama_cpp_generates(workdir: Path, ref: Reference) -> None:
    # basic/main.rs: ctx-size 512 (env ctx_size), n-predict from env, stream-stdout true, temp 0.1.
    proc = run_app(workdir, "basic", PROMPT, seed=11, env={"n_predict": "24"})
    assert proc.returncode == 0, proc.stderr
    want = ref.complete("tiny.gguf", n_ctx=512, max_tokens=24, temp=0.1, seed=11)
    assert want["completion_tokens"] == 24
    # The streamed pieces come between the app's own "Response:" line and its closing newline.
    assert proc.stdout == f"Prompt:\n{PROMPT}\nResponse:\n{want['text']}\n"


def test_llama_prints_the_same_text_and_token_counts(workdir: Path, ref: Reference) -> None:
    # llama/main.rs: ctx-size 1024, n-predict from env, the sampler's defaults (temp 0.8).
    proc = run_app(workdir, "llama", PROMPT, seed=5, env={"n_predict": "32"})
    assert proc.returncode == 0, proc.stderr
    want = ref.complete("tiny.gguf", n_ctx=1024, max_tokens=32, temp=0.8, seed=5)
    n_in = ref.n_prompt("tiny.gguf")
    assert want["prompt_tokens"] == n_in
    assert proc.stdout == (
        header(n_in)
        + f"{want['text'].strip()}\n"
        + f"[INFO] Number of input tokens: {n_in}\n[INFO] Number of output tokens: 32\n"
    )


def test_llama_stream_runs_to_end_of_sequence(workdir: Path, ref: Reference) -> None:
    # llama-stream/main.rs: compute_single until EndOfSequence; n-predict does not apply to it.
    proc = run_app(workdir, "llama-stream", PROMPT, model="tiny-eos.gguf", seed=2, env={"ctx_size": "256"})
    assert proc.returncode == 0, proc.stderr
    want = ref.complete("tiny-eos.gguf", n_ctx=256, max_tokens=200, temp=0.8, seed=2)
    assert want["finish"] == "stop" and want["completion_tokens"] > 0
    n_in = ref.n_prompt("tiny-eos.gguf")
    # WasmEdge counts the EOS token it sampled (and stopped on) as an output token.
    assert proc.stdout == (
        header(n_in)
        + f"{want['text']}\n"
        + f"[INFO] Number of input tokens: {n_in}\n[INFO] Number of output tokens: {want['completion_tokens'] + 1}\n"
    )


def test_llama_stream_stops_at_a_full_context(workdir: Path, ref: Reference) -> None:
    # The tiny model never samples EOS: streaming goes on until CONTEXT_FULL (101), which the app reports.
    proc = run_app(workdir, "llama-stream", PROMPT, seed=9, env={"ctx_size": "256"})
    assert proc.returncode == 0, proc.stderr
    n_in = ref.n_prompt("tiny.gguf")
    room = 256 - n_in
    want = ref.complete("tiny.gguf", n_ctx=256, max_tokens=room, temp=0.8, seed=9)
    assert want["completion_tokens"] == room
    # The token whose evaluation found the context full was sampled (counted) but not printed.
    assert proc.stdout == (
        header(n_in)
        + want["text"]
        + "\n[INFO] Context full, we'll reset the context and continue.\n\n"
        + f"[INFO] Number of input tokens: {n_in}\n[INFO] Number of output tokens: {room + 1}\n"
    )


def test_embedding_app_gets_llama_cpps_normalised_embedding(workdir: Path, ref: Reference) -> None:
    # embedding/main.rs: "embedding": true, WasmEdge's defaults otherwise (ctx-size 4096).
    proc = run_app(workdir, "embedding", PROMPT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[:3] == ["Prompt:", PROMPT, "Raw Embedding Output:"]
    doc = json.loads(lines[3])
    assert doc["n_embedding"] == 64 and len(doc["embedding"]) == 64
    llm = llama_cpp.Llama(model_path=str(workdir / "tiny.gguf"), embedding=True, n_ctx=4096, verbose=False)
    # A llama model pools nothing: the embedding is the last token's, Euclidean-normalised.
    want = llm.embed(PROMPT, normalize=True)[-1]
    assert doc["embedding"] == pytest.approx(want, rel=1e-8, abs=1e-12)  # printed to 10 significant digits
    assert lines[4:7] == ["Interact with Embedding:", "N_Embd: 64", "Show the first 5 elements:"]


def test_model_not_found_app_gets_errno_103(workdir: Path) -> None:
    # The test app preloads a file that does not exist, as its README does: load_by_name answers ModelNotFound.
    proc = run_app(workdir, "model-not-found", model="model-not-found.gguf")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Model not found\n"


def test_set_input_twice_counts_the_same_input_tokens(workdir: Path, ref: Reference) -> None:
    proc = run_app(workdir, "set-input-twice", PROMPT)
    assert proc.returncode == 0, proc.stderr
    n_in = ref.n_prompt("tiny.gguf")
    assert proc.stdout == header(n_in) + f"[INFO] Number of input tokens: {n_in}\n"


def test_unload_loads_runs_and_unloads_five_times(workdir: Path, ref: Reference) -> None:
    # unload/main.rs sets no ctx-size or n-predict: WasmEdge's defaults (4096, until EOS) apply.
    proc = run_app(workdir, "unload", PROMPT, model="tiny-eos.gguf", seed=4)
    assert proc.returncode == 0, proc.stderr
    want = ref.complete("tiny-eos.gguf", n_ctx=4096, max_tokens=500, temp=0.8, seed=4)
    assert want["finish"] == "stop"
    rounds = proc.stdout.split("----- Test ")[1:]
    assert len(rounds) == 5
    for i, text in enumerate(rounds):
        lines = text.split("\n")
        assert lines[0] == f"{i} -----"
        assert lines[1].startswith("Graph ") and lines[1].endswith(" loaded.")
        # Each compute starts from a reset sampler: the same seed, the same text every round. Like
        # WasmEdge's, compute's output ends with the text of the EOS token it stopped on.
        assert "\n".join(lines[2:]) == f"Prompt:\n{PROMPT}\nResponse:\n{want['text'].lstrip()}</s>\n"


def test_a_full_context_and_a_long_prompt_reach_the_app_as_their_errors(workdir: Path) -> None:
    # basic panics on any compute error ("Failed to compute: ..."): its message names the errno it got.
    proc = run_app(workdir, "basic", PROMPT, seed=1, env={"ctx_size": "256", "n_predict": "1000"})
    assert proc.returncode == 134
    assert "Failed to compute: BackendError(ContextFull)" in proc.stderr
    # What was generated before the context filled was streamed first.
    assert proc.stdout.startswith(f"Prompt:\n{PROMPT}\nResponse:\n ")
    long_prompt = " ".join(["hello world"] * 200)  # 400 words, more than ctx-size 256 less 4
    proc = run_app(workdir, "basic", long_prompt, env={"ctx_size": "256", "n_predict": "4"})
    assert proc.returncode == 134
    assert "Failed to compute: BackendError(PromptTooLong)" in proc.stderr
    assert "trapped: wasm trap" in proc.stderr


def test_captured_stdout_holds_stream_stdout_in_order(workdir: Path, ref: Reference) -> None:
    # The serving path: stdout captured; the backend's stream-stdout pieces land in the same capture.
    registry = BackendRegistry(available=discover(["llama.cpp"]), options={"llama.cpp": {"seed": 11}})
    named = named_models(registry, [parse_preload(f"default:ggml:auto:{workdir / 'tiny.gguf'}")])
    try:
        result = run_command(
            APPS / "basic.wasm",
            args=["default", PROMPT],
            env={"n_predict": "24"},
            named=named,
            registry=registry,
            stdout="capture",
            stderr="capture",
        )
    finally:
        named.close()
    assert result.exit_code == 0, result.stderr
    want = ref.complete("tiny.gguf", n_ctx=512, max_tokens=24, temp=0.1, seed=11)
    assert result.stdout == f"Prompt:\n{PROMPT}\nResponse:\n{want['text']}\n".encode()


# -- the CLI's own contract -------------------------------------------------------------------


def test_cli_usage_errors_and_help(workdir: Path) -> None:
    app = str(APPS / "basic.wasm")
    proc = wasi_run(workdir, "--bogus", app)
    assert proc.returncode == 64 and "--bogus" in proc.stderr
    proc = wasi_run(workdir, "--nn-preload", "default:NOPE:AUTO:x.gguf", app)
    assert proc.returncode == 64 and "unknown encoding" in proc.stderr
    proc = wasi_run(workdir, "--env", "novalue", app)
    assert proc.returncode == 64
    proc = wasi_run(workdir, str(workdir / "missing.wasm"))
    assert proc.returncode == 66
    proc = wasi_run(workdir, "--dir", "/no/such/dir:/x", app)
    assert proc.returncode == 66
    (workdir / "not.wasm").write_bytes(b"not wasm")
    proc = wasi_run(workdir, "not.wasm")
    assert proc.returncode == 65 and "no \\0asm header" in proc.stderr, proc.stderr
    (workdir / "cut.wasm").write_bytes((APPS / "basic.wasm").read_bytes()[:1000])
    proc = wasi_run(workdir, "cut.wasm")
    assert proc.returncode == 65 and "not a valid WebAssembly module: " in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].split("module: ", 1)[1].strip(" |^"), proc.stderr
    proc = wasi_run(workdir, "--help")
    assert proc.returncode == 0 and "NAME:ENCODING:TARGET:PATH" in proc.stdout
    # Everything after APP.wasm is the app's, dashes and all.
    proc = wasi_run(
        workdir, "--nn-preload", "default:GGML:AUTO:nowhere.gguf", str(APPS / "model-not-found.wasm"), "default", "--x"
    )
    assert proc.returncode == 0 and proc.stdout == "Model not found\n"


# -- the backend, below the apps ----------------------------------------------------------------


def _text(data: bytes) -> Tensor:
    return Tensor(dims=(len(data),), type=TensorType.U8, data=data)


@pytest.fixture(scope="module")
def backend() -> GgmlBackend:
    return GgmlBackend(options={"seed": 1})


def test_options_errors_are_wasmedge_errnos(workdir: Path, backend: GgmlBackend) -> None:
    graph = backend.load_file(workdir / "tiny.gguf", ExecutionTarget.AUTO, {"ctx-size": 256})
    try:
        ctx = graph.init_execution_context()
        for body, errno in (
            (b"{not json", Errno.INVALID_ENCODING),
            (b"[1, 2]", Errno.INVALID_ENCODING),
            (b'{"n-predict": "8"}', Errno.INVALID_ARGUMENT),
            (b'{"temp": true}', Errno.INVALID_ARGUMENT),
            (b'{"ctx-size": 1.5}', Errno.INVALID_ARGUMENT),
            (b'{"ctx-size": 100000000}', Errno.INVALID_ARGUMENT),
            (b'{"mmproj": "vision.gguf"}', Errno.UNSUPPORTED_OPERATION),
        ):
            with pytest.raises(NnErrorType) as info:
                ctx.set_input(1, _text(body))
            assert info.value.errno == errno, body
        # Unknown keys are ignored, as WasmEdge ignores them.
        ctx.set_input(1, _text(b'{"no-such-option": 1, "n-predict": 3, "temp": 0}'))
        with pytest.raises(NnErrorType) as info:
            ctx.compute()
        assert info.value.errno == Errno.INVALID_ARGUMENT  # no prompt yet
        ctx.set_input(0, _text(PROMPT.encode()))
        ctx.compute()
        assert b'"output_tokens":3' in ctx.get_output(1)
    finally:
        graph.close()
    with pytest.raises(NnErrorType) as info:
        backend.load_file(workdir / "absent.gguf", ExecutionTarget.AUTO, {})
    assert info.value.errno == Errno.MODEL_NOT_FOUND


def test_reverse_prompt_and_streaming_calls(workdir: Path, backend: GgmlBackend, ref: Reference) -> None:
    graph = backend.load_file(workdir / "tiny.gguf", ExecutionTarget.AUTO, {"ctx-size": 256, "temp": 0})
    try:
        want = ref.complete("tiny.gguf", n_ctx=256, max_tokens=40, temp=0.0, seed=0)["text"].encode()
        ctx = graph.init_execution_context()
        ctx.set_input(0, _text(PROMPT.encode()))
        # compute_single: one token a call, the pieces add up to the whole text.
        pieces = []
        for _ in range(40):
            ctx.compute_single()
            pieces.append(ctx.get_output_single(0))
        assert b"".join(pieces) == want
        assert b'"output_tokens":40' in ctx.get_output_single(1)
        ctx.fini_single()
        assert ctx.get_output_single(0) == b""
        # reverse-prompt: generation stops once the output holds it (the output keeps it).
        stop = want[10:14]
        ctx.set_input(1, _text(b'{"n-predict": 40, "reverse-prompt": "' + stop + b'"}'))
        ctx.compute()
        out = ctx.get_output(0)
        assert out.endswith(stop) or stop in out[-len(stop) - 8 :]
        assert want.startswith(out) and len(out) < len(want)
    finally:
        graph.close()


def test_graph_from_guest_bytes(workdir: Path, backend: GgmlBackend) -> None:
    model = (workdir / "tiny.gguf").read_bytes()
    graph = backend.load_bytes([model, b'{"n-predict": 2, "temp": 0, "ctx-size": 256}'], ExecutionTarget.CPU, {})
    try:
        ctx = graph.init_execution_context()
        ctx.set_input(0, _text(PROMPT.encode()))
        ctx.compute()
        assert b'"output_tokens":2' in ctx.get_output(1)
    finally:
        graph.close()
    # A guest cannot name a host file ("preload:PATH", which WasmEdge reads) nor pass a non-GGUF blob.
    for blob in (b"preload:" + str(workdir / "tiny.gguf").encode(), b"\x00" * 64):
        with pytest.raises(NnErrorType) as info:
            backend.load_bytes([blob], ExecutionTarget.CPU, {})
        assert info.value.errno == Errno.INVALID_ARGUMENT


# -- the command runner -------------------------------------------------------------------------

OPEN_FOR_WRITE_WAT = """
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "made.txt")
  ;; exit with path_open's errno: create made.txt for writing in the first preopened directory (fd 3)
  (func (export "_start")
    (call $exit (call $open (i32.const 3) (i32.const 0) (i32.const 16) (i32.const 8)
                            (i32.const 1) (i64.const 64) (i64.const 0) (i32.const 0) (i32.const 8)))))
"""


def test_dirs_are_read_only_unless_said(tmp_path: Path) -> None:
    import wasmtime

    app = tmp_path / "open.wasm"
    app.write_bytes(wasmtime.wat2wasm(OPEN_FOR_WRITE_WAT))
    out = tmp_path / "out"
    out.mkdir()
    proc = wasi_run(tmp_path, "--dir", f"{out}:/out", str(app))
    assert proc.returncode not in (0, 134), proc.stderr  # a WASI errno
    assert not (out / "made.txt").exists()
    proc = wasi_run(tmp_path, "--dir", f"{out}:/out:rw", str(app))
    assert proc.returncode == 0, proc.stderr
    assert (out / "made.txt").exists()


def test_timeout_stops_a_spinning_app(workdir: Path) -> None:
    # basic without a prompt argument reads stdin lines forever; at EOF it spins.
    flags = ["--timeout", "2", "--nn-preload", "default:GGML:AUTO:tiny.gguf"]
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "wasi", "run", *flags, str(APPS / "basic.wasm"), "default"],
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 124
    assert proc.stdout.startswith("USER:\n")
    assert "stopped after --timeout 2s" in proc.stderr


CAPTURE_AND_EXIT = """
import sys
from pathlib import Path
from agent.wasinn.backend import BackendRegistry, discover
from agent.wasinn.command import named_models, parse_preload, run_command
registry = BackendRegistry(available=discover(["llama.cpp"]), options={})
named = named_models(registry, [parse_preload("default:GGML:AUTO:" + sys.argv[2])])
result = run_command(Path(sys.argv[1]), args=["default", "hi"], env={"n_predict": "3"}, named=named,
                     registry=registry, stdout="capture", stderr="capture")
named.close()
print(result.exit_code, len(result.stdout))
"""


def test_a_process_exiting_right_after_a_captured_run_exits_cleanly(workdir: Path) -> None:
    # Regression: wasmtime released the capture callbacks on its own thread, and a process that exited
    # just after a run sometimes aborted (a Python callback released while the interpreter finalized).
    for _ in range(6):
        proc = subprocess.run(
            [sys.executable, "-c", CAPTURE_AND_EXIT, str(APPS / "llama.wasm"), str(workdir / "tiny.gguf")],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("0 ")
        assert "panicked" not in proc.stderr


def test_llama_contexts_per_graph_are_bounded(workdir: Path) -> None:
    backend = GgmlBackend(options={"max_contexts": 1, "max_ctx_size": 512})
    graph = backend.load_file(workdir / "tiny.gguf", ExecutionTarget.AUTO, {"ctx-size": 256, "n-predict": 1})
    try:
        first, second = graph.init_execution_context(), graph.init_execution_context()
        for ctx in (first, second):
            ctx.set_input(0, _text(PROMPT.encode()))
        first.compute()
        with pytest.raises(NnErrorType) as info:
            second.compute()  # each context's KV cache is its own: one is all this graph may hold
        assert info.value.errno == Errno.BUSY
        first.close()
        second.compute()
        assert b'"output_tokens":1' in second.get_output(1)
        # The operator's bound on ctx-size holds against a guest's options.
        with pytest.raises(NnErrorType) as info:
            second.set_input(1, _text(b'{"ctx-size": 1024}'))
        assert info.value.errno == Errno.INVALID_ARGUMENT
    finally:
        graph.close()


def test_committed_apps_are_the_published_binaries() -> None:
    # tests/data/wasmedge-ggml/README.md names each file's origin and digest: they must still hold.
    import hashlib
    import re

    rows = re.findall(
        r"^\| `([\w-]+\.wasm)` \| `[^`]+` \| `([0-9a-f]{64})` \|$", (APPS / "README.md").read_text(), re.M
    )
    assert sorted(name for name, _ in rows) == sorted(p.name for p in APPS.glob("*.wasm"))
    for name, digest in rows:
        assert hashlib.sha256((APPS / name).read_bytes()).hexdigest() == digest, name


def test_model_json_config_gives_default_graph_options_under_the_guests_own(workdir: Path) -> None:
    """wasi_nn.config reaches the backend as defaults: a guest passing no option gets them, its own win."""
    from agent.wasinn.abi import GraphEncoding
    from agent.wasinn.backend import NamedModel, NamedModels

    registry = BackendRegistry(available=discover(["llama.cpp"]))
    model = NamedModel(
        "default", GraphEncoding.GGML, ExecutionTarget.CPU, workdir / "tiny.gguf", defaults={"n-predict": 3, "temp": 0}
    )
    named = NamedModels(registry=registry, models={"default": model})
    try:
        for config, want in (({}, 3), ({"n-predict": 5}, 5)):
            key = json.dumps(config, sort_keys=True)
            ctx = named.graph("default", config, key).init_execution_context()
            ctx.set_input(0, Tensor(dims=(1,), type=TensorType.U8, data=PROMPT.encode()))
            ctx.compute()
            assert json.loads(ctx.get_output(1))["output_tokens"] == want, config
            ctx.close()
    finally:
        named.close()
