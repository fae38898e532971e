"""Hostile wasm modules against the real runtime and a real in-process agent.

Every module is generated from WAT here: one whose run time an input picks
(the event loop must never wait for it), several memories or huge tables
(the instance's whole footprint is capped and over-declaring modules are
refused at import), a wrong export signature, and ``proc_exit`` / traps
whose errors must say what happened.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import wasmtime
from conftest import http
from modelkit import SCALE_WAT, make_scale_model

from agent.artefacts import Artefacts, check_module_file
from agent.cas import BlobStore, sha256_digest
from agent.errors import InferenceTimeout, InvalidModel, ModelError
from agent.repository import ModelRepository
from agent.runtime import LoadSettings, WasmRuntime, load_version
from agent.spec import ModelSpec
from agent.state import StateDB


def scale_wat() -> str:
    return SCALE_WAT.replace("(i32.const ABI)", "(i32.const 1)")


def patch(wat: str, old: str, new: str) -> str:
    assert wat.count(old) == 1, old
    return wat.replace(old, new)


# ea_run first spins x[0] times ~1M iterations (about a millisecond each): the
# input alone decides how long a call takes, as a data-dependent loop bound does.
SPIN_WAT = patch(
    patch(scale_wat(), "(local $i i32) (local $x f32)", "(local $i i32) (local $x f32) (local $n i32)"),
    "(local.set $x (f32.load (i32.const 256)))",
    """(local.set $x (f32.load (i32.const 256)))
    (local.set $n (i32.trunc_sat_f32_u (local.get $x)))
    (block $done
      (loop $outer
        (br_if $done (i32.eqz (local.get $n)))
        (local.set $i (i32.const 1000000))
        (loop $inner (local.set $i (i32.sub (local.get $i) (i32.const 1))) (br_if $inner (local.get $i)))
        (local.set $n (i32.sub (local.get $n) (i32.const 1)))
        (br $outer)))""",
)
ENDLESS = 2_000_000.0  # ~2M ms of spinning: only a deadline ends it


def x_request(row: list[float]) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": row}]}


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture
def env(tmp_path: Path):
    blobs = BlobStore(tmp_path / "state")
    db = StateDB(tmp_path / "state" / "agent.db")
    repo = ModelRepository(blobs, db)
    runtime = WasmRuntime(tmp_path / "state" / "compiled")
    runtime.start()
    yield tmp_path, repo, runtime
    runtime.close()
    db.close()


def load(env, wat: str, settings: LoadSettings | None = None, **model_kwargs):
    tmp_path, repo, runtime = env
    version = model_kwargs.pop("version", "1")
    directory = make_scale_model(
        tmp_path / f"m-{version}", version=version, wasm=wasmtime.wat2wasm(wat), **model_kwargs
    )
    record = repo.import_dir(directory)
    settings = settings or LoadSettings(pool_size=1, memory_limit_mb=64, request_timeout_ms=1000)
    return load_version(runtime, repo.blobs, record, settings)


def store_unchecked(repo: ModelRepository, directory: Path):
    """Record a version the way an older agent did, without today's import checks."""
    art = Artefacts.from_dir(directory)
    spec = ModelSpec.from_bytes(art.config)
    digests = [sha256_digest(b) for b in (art.config, art.module, art.weights)]
    for data, digest in zip((art.config, art.module, art.weights), digests, strict=True):
        repo.blobs.put_bytes(data, expected=digest)
    return repo.db.add_version(spec.name, spec.version, *digests, source="test")


def x(*row: float) -> dict[str, np.ndarray]:
    return {"x": np.asarray([row], dtype=np.float32)}


@pytest.fixture
def hostile_agent(make_agent, tmp_path: Path):
    """``spin`` (fast at warm-up, so it starts inline) and ``scale`` (a bystander) in one agent."""

    def setup(agent):
        agent.repository.import_dir(
            make_scale_model(
                tmp_path / "spin",
                name="spin",
                wasm=wasmtime.wat2wasm(SPIN_WAT),
                warmup_x=(0.0, 1.0, 1.0, 1.0),
                timeout_ms=1500,
            )
        )
        agent.repository.import_dir(make_scale_model(tmp_path / "scale"))
        # Warm-up spins ~30M iterations (modelkit's magic 7): measured slow, so served by workers.
        agent.repository.import_dir(make_scale_model(tmp_path / "slow", name="slow", warmup_x=(7.0, 1.0, 1.0, 1.0)))
        for name in ("spin", "scale", "slow"):
            agent.db.set_active(name, "1")

    return make_agent(setup=setup, seed_bundled=False, request_timeout_ms=5000, pool_size=2, worker_threads=4)


# -- item 1: no request holds the event loop -----------------------------------------------------------
def test_hostile_requests_never_freeze_liveness_or_other_models(hostile_agent):
    agent = hostile_agent
    spin = agent.agent.models.get("spin", None)
    assert spin.pool.ewma_us <= agent.agent.config.inline_threshold_us, "spin must start out as an inline model"
    done: dict[str, list[float]] = {"hostile": [], "live": [], "scale": []}
    statuses: list[tuple[int, str]] = []

    def hostile() -> None:
        status, body = http("POST", agent.url + "/v2/models/spin/infer", x_request([ENDLESS, 1, 1, 1]), timeout=60)
        done["hostile"].append(time.monotonic())
        statuses.append((status, (body or {}).get("error", "")))

    threads = [threading.Thread(target=hostile) for _ in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30  # hang guard only
    while spin.inflight < 1 and not done["hostile"]:
        assert time.monotonic() < deadline, "no hostile request ever started"
        time.sleep(0.001)
    # A hostile request is computing now; it cannot finish before its 1.5 s deadline.
    for _ in range(3):
        assert http("GET", agent.url + "/v2/health/live", timeout=60) == (200, {"live": True})
        done["live"].append(time.monotonic())
        status, body = http("POST", agent.url + "/v2/models/scale/infer", x_request([1, 1, 1, 1]), timeout=60)
        assert status == 200 and body["outputs"][0]["data"] == [1, 2, 3, 4]
        done["scale"].append(time.monotonic())
    for thread in threads:
        thread.join(60)
    assert len(statuses) == 4
    assert all(status == 504 and "1500 ms deadline" in error for status, error in statuses), statuses
    first_hostile_done = min(done["hostile"])
    assert max(done["live"]) < first_hostile_done, "liveness waited for a hostile request"
    assert max(done["scale"]) < first_hostile_done, "another model waited for a hostile request"
    # The model that overran its inline budget is served off the loop from now on, and still serves.
    assert spin.pool.inline_allowed is False
    status, body = http("POST", agent.url + "/v2/models/spin/infer", x_request([1, 1, 1, 1]))
    assert status == 200 and body["outputs"][0]["data"] == [1, 2, 3, 4]
    assert agent.agent.models.get("scale", None).pool.inline_allowed is True


def test_hostile_requests_do_not_starve_models_served_by_workers(hostile_agent):
    agent = hostile_agent
    spin = agent.agent.models.get("spin", None)
    slow = agent.agent.models.get("slow", None)
    assert slow.pool.ewma_us > agent.agent.config.inline_threshold_us, "slow must be served by workers"
    done: list[float] = []
    statuses: list[int] = []

    def hostile() -> None:
        status, _ = http("POST", agent.url + "/v2/models/spin/infer", x_request([ENDLESS, 1, 1, 1]), timeout=60)
        done.append(time.monotonic())
        statuses.append(status)

    # More hostile requests than worker threads: they must not all hold one while they wait.
    threads = [threading.Thread(target=hostile) for _ in range(6)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30  # hang guard only
    while spin.inflight < 6 and not done:
        assert time.monotonic() < deadline, "the hostile requests never all arrived"
        time.sleep(0.001)
    status, body = http("POST", agent.url + "/v2/models/slow/infer", x_request([1, 1, 1, 1]), timeout=60)
    answered = time.monotonic()
    assert status == 200 and body["outputs"][0]["data"] == [1, 2, 3, 4]
    for thread in threads:
        thread.join(60)
    assert statuses == [504] * 6
    assert answered < min(done), "a model served by workers waited for hostile requests to another model"


def test_inline_call_over_its_budget_is_rerun_off_the_loop_with_the_full_timeout(hostile_agent):
    agent = hostile_agent
    spin = agent.agent.models.get("spin", None)
    assert spin.pool.inline_allowed is True
    # ~40 ms: far over the inline budget, well inside the model's 1.5 s timeout. A model is a
    # pure function of its inputs, so re-running it elsewhere gives the client the same answer.
    status, body = http("POST", agent.url + "/v2/models/spin/infer", x_request([40, 1, 1, 1]))
    assert status == 200, body
    assert body["outputs"][0]["data"] == [40, 2, 3, 4]
    assert spin.pool.inline_allowed is False
    # The interrupted instance (its memory maybe half-written) is replaced, on a worker thread.
    deadline = time.monotonic() + 30  # hang guard only
    # (Pools grow on demand: the re-run may have built a second instance; none is left missing.)
    while spin.pool.replaced < 1 or spin.pool.idle < spin.pool.live or spin.pool.live < 1:
        assert time.monotonic() < deadline, "the interrupted instance was never replaced"
        time.sleep(0.005)
    assert spin.pool.replaced == 1 and spin.pool.size == 2
    budget = agent.agent.models.budget
    assert budget.live == sum(pool.live for pool in budget.pools()), "every live instance holds one budget slot"
    status, body = http("POST", agent.url + "/v2/models/spin/infer", x_request([2, 1, 1, 1]))
    assert status == 200 and body["outputs"][0]["data"] == [2, 2, 3, 4]


def test_demotion_stands_when_the_rerun_is_slow_and_is_lifted_when_it_was_a_scheduling_delay(env):
    model = load(env, SPIN_WAT, LoadSettings(2, 64, 5000), warmup_x=(0, 1, 1, 1))
    pool = model.pool
    # An overrun confirmed by the re-run: the same input is slow on a worker too.
    pool.inline_allowed = False
    out = pool.rerun([np.float32([[40, 1, 1, 1]])], 1, None, 2.0)
    np.testing.assert_array_equal(out[0], [[40, 2, 3, 4]])
    assert pool.inline_allowed is False
    # An overrun the re-run does not confirm (the event loop's thread was descheduled).
    out = pool.rerun([np.float32([[0, 1, 1, 1]])], 1, None, 2.0)
    np.testing.assert_array_equal(out[0], [[0, 2, 3, 4]])
    assert pool.inline_allowed is True


def test_model_timeout_hint_may_only_lower_the_agent_request_timeout(env):
    # resources.timeout_ms below request_timeout_ms: the model's own, lower deadline applies.
    lower = load(env, SPIN_WAT, LoadSettings(1, 64, 5000), warmup_x=(0, 1, 1, 1), timeout_ms=150, version="1")
    with pytest.raises(InferenceTimeout, match=r"150 ms deadline"):
        lower.infer(x(ENDLESS, 1, 1, 1))
    # resources.timeout_ms above request_timeout_ms: clamped to the agent's setting.
    higher = load(env, SPIN_WAT, LoadSettings(1, 64, 200), warmup_x=(0, 1, 1, 1), timeout_ms=60_000, version="2")
    with pytest.raises(InferenceTimeout, match=r"200 ms deadline"):
        higher.infer(x(ENDLESS, 1, 1, 1))


def wait_idle(runtime: WasmRuntime) -> None:
    deadline = time.monotonic() + 30  # hang guard only
    while runtime.ticking:
        assert time.monotonic() < deadline, "the epoch ticker never went idle"
        time.sleep(0.01)


def test_calls_after_the_epoch_ticker_went_idle_still_meet_their_deadlines(env):
    tmp_path, repo, runtime = env
    runtime.close()
    runtime = WasmRuntime(tmp_path / "state" / "compiled")
    runtime.IDLE_AFTER_S = 0.05  # the ticker sleeps after 50 ms without wasm running
    runtime.start()
    try:
        model = load((tmp_path, repo, runtime), SPIN_WAT, warmup_x=(0, 1, 1, 1), timeout_ms=150)
        wait_idle(runtime)
        with pytest.raises(InferenceTimeout, match=r"150 ms deadline"):
            model.infer(x(ENDLESS, 1, 1, 1))
        # The inline budget too: the first call after a quiet spell is cut off, not run to its timeout.
        wait_idle(runtime)
        instance = model.pool.acquire()
        assert model.pool.run_inline(instance, [np.float32([[ENDLESS, 1, 1, 1]])], 1, 2.0) is None
        assert model.pool.inline_allowed is False
        # Set-up calls as well: an ea_init that never returns fails the load.
        wait_idle(runtime)
        endless_init = patch(SPIN_WAT, "(global.set $ready (i32.const 1))", "(loop $forever (br $forever))")
        with pytest.raises(ModelError, match=r"in ea_init: .*deadline"):
            load((tmp_path, repo, runtime), endless_init, timeout_ms=150, version="2")
    finally:
        runtime.close()


# -- item 5: the memory cap covers the whole instance ----------------------------------------------------
MULTI_MEMORY_WAT = patch(
    scale_wat(),
    '(memory (export "memory") 1)',
    '(memory (export "memory") 1)' + "".join(f" (memory $m{i} 1)" for i in range(8)),
)
# ea_run grows its table by 8M entries when x[0] == 77 and reports -3 (out of memory) when refused.
TABLE_GROW_WAT = patch(
    patch(scale_wat(), '(memory (export "memory") 1)', '(memory (export "memory") 1) (table $t 1 funcref)'),
    "(if (f32.eq (local.get $x) (f32.const 13)) (then unreachable))",
    """(if (f32.eq (local.get $x) (f32.const 13)) (then unreachable))
    (if (f32.eq (local.get $x) (f32.const 77))
      (then (if (i32.eq (table.grow $t (ref.null func) (i32.const 8000000)) (i32.const -1))
              (then (return (i32.const -3))))))""",
)


def test_module_with_several_memories_is_refused_at_import(env):
    tmp_path, repo, _ = env
    directory = make_scale_model(tmp_path / "multi", wasm=wasmtime.wat2wasm(MULTI_MEMORY_WAT))
    with pytest.raises(InvalidModel, match=r"9 memories.*ABI v1 allows 1"):
        repo.import_dir(directory)
    assert repo.db.get_version("scale", "1") is None


def test_pulled_image_with_several_memories_is_refused_at_admission(tmp_path: Path):
    directory = make_scale_model(tmp_path / "multi", wasm=wasmtime.wat2wasm(MULTI_MEMORY_WAT))
    spec = ModelSpec.from_bytes((directory / "model.json").read_bytes())
    with pytest.raises(InvalidModel, match=r"9 memories"):
        check_module_file(spec, directory / "model.wasm")


@pytest.mark.parametrize(
    ("wat", "message"),
    [
        (MULTI_MEMORY_WAT, r"memories"),
        (patch(scale_wat(), "(memory (export", "(table 1 funcref) (table 1 funcref) (memory (export"), r"2 tables"),
    ],
)
def test_stored_module_declaring_too_much_is_refused_at_load(env, wat: str, message: str):
    tmp_path, repo, runtime = env
    record = store_unchecked(repo, make_scale_model(tmp_path / "multi", wasm=wasmtime.wat2wasm(wat)))
    with pytest.raises(InvalidModel, match=message):
        load_version(runtime, repo.blobs, record, LoadSettings(1, 64, 1000))


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ("(table 10000000 funcref)", r"table of 10000000 elements"),
        ("(table 1 funcref) (table 1 funcref)", r"2 tables.*ABI v1 allows 1"),
    ],
)
def test_modules_declaring_too_many_tables_or_elements_are_refused_at_import(env, tables: str, message: str):
    tmp_path, repo, _ = env
    wat = patch(scale_wat(), '(memory (export "memory") 1)', f'(memory (export "memory") 1) {tables}')
    with pytest.raises(InvalidModel, match=message):
        repo.import_dir(make_scale_model(tmp_path / "tables", wasm=wasmtime.wat2wasm(wat)))


def test_table_growth_is_capped_by_the_store_limits(env):
    model = load(env, TABLE_GROW_WAT)
    with pytest.raises(ModelError, match="out of memory"):
        model.infer(x(77, 0, 0, 0))
    np.testing.assert_array_equal(model.infer(x(1, 1, 1, 1))["y"], [[1, 2, 3, 4]])


# -- item 9: errors that say what happened ---------------------------------------------------------------
def test_wrong_export_signature_is_printed_readably(env):
    wat = patch(
        scale_wat(),
        '(func (export "ea_run") (param $b i32) (result i32)',
        '(func (export "ea_run") (param $b i32) (param $unused f32) (result i32)',
    )
    with pytest.raises(InvalidModel) as info:
        load(env, wat)
    assert "ea_run has type (i32, f32) -> i32, ABI v1 wants (i32) -> i32" in str(info.value)
    assert "object at 0x" not in str(info.value)


PROC_EXIT_WAT = patch(
    patch(
        scale_wat(),
        "(module\n",
        '(module\n  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))\n',
    ),
    "(if (f32.eq (local.get $x) (f32.const 13)) (then unreachable))",
    """(if (f32.eq (local.get $x) (f32.const 13)) (then unreachable))
    (if (f32.eq (local.get $x) (f32.const 21)) (then (call $exit (i32.const 3))))""",
)


def test_proc_exit_in_a_model_names_the_exit_code(env):
    model = load(env, PROC_EXIT_WAT)
    with pytest.raises(ModelError, match=r"proc_exit.*exit code 3"):
        model.infer(x(21, 0, 0, 0))
    assert model.pool.replaced == 1
    np.testing.assert_array_equal(model.infer(x(1, 1, 1, 1))["y"], [[1, 2, 3, 4]])


def test_proc_exit_over_http_says_what_happened(make_agent, tmp_path: Path):
    def setup(agent):
        agent.repository.import_dir(make_scale_model(tmp_path / "exit", wasm=wasmtime.wat2wasm(PROC_EXIT_WAT)))
        agent.db.set_active("scale", "1")

    agent = make_agent(setup=setup, seed_bundled=False)
    status, body = http("POST", agent.url + "/v2/models/scale/infer", x_request([21, 0, 0, 0]))
    assert status == 500
    assert "exit code 3" in body["error"] and "backtrace" not in body["error"]
    assert http("POST", agent.url + "/v2/models/scale/infer", x_request([1, 1, 1, 1]))[0] == 200


def test_trap_while_instantiating_names_its_cause(env):
    wat = patch(scale_wat(), "(module\n", "(module\n  (func $boom unreachable) (start $boom)\n")
    with pytest.raises(ModelError) as info:
        load(env, wat)
    text = str(info.value)
    assert "unreachable" in text and "backtrace" not in text and "\n" not in text


def test_proc_exit_in_ea_init_names_the_exit_code(env):
    wat = patch(PROC_EXIT_WAT, "(global.set $ready (i32.const 1))", "(call $exit (i32.const 5))")
    with pytest.raises(ModelError, match=r"in ea_init: .*exit code 5"):
        load(env, wat)
