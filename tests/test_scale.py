"""Thousands of models per node: lazy instances, the idle reaper, the node's instance budget,
weights mapped from the store, compiled code shared by digest, and the bulk import."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import wasmtime
from conftest import REPO, http
from modelkit import SCALE_WAT, make_scale_model, scale_wasm

from agent import exitcodes
from agent.cas import BlobStore
from agent.errors import ModelError, Unavailable
from agent.repository import ModelRepository, bundled_model_dirs
from agent.runtime import InstanceBudget, LoadSettings, WasmRuntime, load_version
from agent.state import StateDB

LAZY = LoadSettings(pool_size=2, memory_limit_mb=64, request_timeout_ms=1000)
DIGITS = next(d for d in bundled_model_dirs() if d.name == "digits")


@pytest.fixture
def env(tmp_path: Path) -> Any:
    blobs = BlobStore(tmp_path / "state")
    db = StateDB(tmp_path / "state" / "agent.db")
    repo = ModelRepository(blobs, db)
    runtime = WasmRuntime(tmp_path / "state" / "compiled", tick_ms=2)
    runtime.start()
    yield tmp_path, repo, runtime
    runtime.close()
    db.close()


def load(env: Any, name: str, budget: InstanceBudget | None = None, scale: float = 1.0, **kwargs: Any) -> Any:
    tmp_path, repo, runtime = env
    directory = make_scale_model(tmp_path / name, name=name, scale=(scale,) * 4, **kwargs)
    record = repo.import_dir(directory)
    return load_version(runtime, repo.blobs, record, LAZY, budget=budget)


def infer(model: Any, value: float) -> list[float]:
    return model.infer({"x": np.float32([[value, 1, 1, 1]])})["y"][0].tolist()


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 60  # hang guard only
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# -- lazy instances ------------------------------------------------------------------------------
def test_a_pool_starts_with_its_warm_up_instance_and_grows_on_demand_up_to_its_size(env: Any) -> None:
    model = load(env, "lazy")
    pool = model.pool
    assert (pool.size, pool.live, pool.idle) == (2, 1, 1)
    first = pool.acquire(timeout=5)
    second = pool.acquire(timeout=5)  # none idle, below its size: built now
    assert second is not first and pool.live == 2 and pool.idle == 0
    with pytest.raises(Unavailable, match="no instance free in time"):
        pool.acquire(timeout=0.05)  # at its size: waits for a release, bounded
    pool.release(first)
    pool.release(second)
    assert pool.idle == pool.live == 2
    assert infer(model, 3) == [3, 1, 1, 1]


def test_a_lazy_version_is_still_checked_against_its_golden_output_before_it_is_ready(env: Any) -> None:
    budget = InstanceBudget(limit=0)
    with pytest.raises(ModelError, match="does not match the golden output"):
        load(env, "golden", budget=budget, golden_override=[9.0, 9.0, 9.0, 9.0])
    assert budget.live == 0 and budget.pools() == []  # the refused version holds nothing


def test_eager_instances_build_the_whole_pool_at_load(env: Any) -> None:
    tmp_path, repo, runtime = env
    record = repo.import_dir(make_scale_model(tmp_path / "eager", name="eager"))
    eager = LoadSettings(pool_size=3, memory_limit_mb=64, request_timeout_ms=1000, eager_instances=True)
    model = load_version(runtime, repo.blobs, record, eager)
    assert model.pool.live == model.pool.idle == 3


# -- the idle reaper -----------------------------------------------------------------------------
def test_reap_drops_idle_instances_but_each_pools_last_and_the_model_still_serves(env: Any) -> None:
    budget = InstanceBudget(limit=0)
    model = load(env, "reaped", budget=budget, scale=2.0)
    pool = model.pool
    held = [pool.acquire(timeout=5), pool.acquire(timeout=5)]
    for instance in held:
        pool.release(instance)
    assert pool.live == 2 and budget.live == 2
    assert budget.reap(idle_s=3600) == 0  # used just now: kept
    assert budget.reap(idle_s=0) == 1  # one dropped, the last one kept warm
    assert pool.live == pool.idle == 1 and budget.live == 1 and budget.reaped == 1
    assert infer(model, 1) == [2, 2, 2, 2]
    assert budget.reap(idle_s=0) == 0 and pool.live == 1


def test_the_agents_reaper_drops_idle_instances_and_the_model_serves_after(make_agent: Any, tmp_path: Path) -> None:
    def setup(agent: Any) -> None:
        agent.repository.import_dir(make_scale_model(tmp_path / "m", scale=(3, 3, 3, 3)))
        agent.db.set_active("scale", "1")

    agent = make_agent(setup=setup, seed_bundled=False, pool_size=2, instance_idle_s=0.2)
    pool = agent.agent.models.get("scale").pool
    held = [pool.acquire(timeout=5), pool.acquire(timeout=5)]
    for instance in held:
        pool.release(instance)
    assert pool.live == 2
    wait_for(lambda: pool.live == 1, "the reaper to drop the idle instance")
    assert agent.agent.models.budget.reaped >= 1
    status, text = http("GET", agent.url + "/metrics")
    assert status == 200
    lines = text.decode().splitlines()
    assert "edge_agent_instances 1.0" in lines and "edge_agent_max_instances 4096.0" in lines
    assert any(line.startswith('edge_agent_instance_drops_total{reason="idle"}') for line in lines)
    status, body = http("POST", agent.url + "/v2/models/scale/infer", x_request(2))
    assert status == 200 and body["outputs"][0]["data"] == [6, 3, 3, 3]


# -- the node's instance budget ------------------------------------------------------------------
def test_the_budget_evicts_the_least_recently_used_idle_instance_of_another_model(env: Any) -> None:
    budget = InstanceBudget(limit=2)
    a = load(env, "a", budget=budget, scale=1.0)
    b = load(env, "b", budget=budget, scale=2.0)
    assert budget.live == 2 and (a.pool.live, b.pool.live) == (1, 1)
    assert infer(b, 1) == [2, 2, 2, 2]  # b used last: a is the least recently used
    c = load(env, "c", budget=budget, scale=3.0)  # at the budget: a's idle instance goes
    assert (a.pool.live, b.pool.live, c.pool.live) == (0, 1, 1)
    assert budget.live == 2 and budget.evicted == 1
    # a still serves: its new instance takes the slot of the least recently used idle one (b's).
    assert infer(a, 1) == [1, 1, 1, 1]
    assert (a.pool.live, b.pool.live, c.pool.live) == (1, 0, 1)
    assert budget.live == 2 and budget.evicted == 2
    for model in (a, b, c):
        model.close()
    assert budget.live == 0 and budget.pools() == []


def test_at_the_budget_with_nothing_idle_a_request_waits_then_gets_503(make_agent: Any, tmp_path: Path) -> None:
    def setup(agent: Any) -> None:
        # busy: -1 spins until its deadline (1 s, the agent's request timeout), holding the one instance.
        agent.repository.import_dir(make_scale_model(tmp_path / "busy", name="busy", timeout_ms=5000))
        # other: waits at most 4 x its 50 ms timeout for an instance.
        agent.repository.import_dir(make_scale_model(tmp_path / "other", name="other", timeout_ms=50))
        agent.db.set_active("busy", "1")
        agent.db.set_active("other", "1")

    agent = make_agent(setup=setup, seed_bundled=False, max_instances=1, inline_threshold_us=0)
    models, budget = agent.agent.models, agent.agent.models.budget
    assert budget.live == 1  # the second load took the first one's slot
    busy = models.get("busy")
    replies: dict[str, tuple[int, Any]] = {}
    spinning = threading.Thread(
        target=lambda: replies.setdefault("busy", http("POST", agent.url + "/v2/models/busy/infer", x_request(-1)))
    )
    spinning.start()
    wait_for(lambda: busy.inflight == 1 and busy.pool.live == 1 and busy.pool.idle == 0, "busy to hold the instance")
    status, body = http("POST", agent.url + "/v2/models/other/infer", x_request(1))
    assert status == 503 and "instance budget (1)" in body["error"], body
    spinning.join(60)
    assert replies["busy"][0] == 504
    # Once busy's instance is idle again, other takes its slot.
    status, body = http("POST", agent.url + "/v2/models/other/infer", x_request(1))
    assert status == 200 and body["outputs"][0]["data"] == [1, 2, 3, 4]
    assert budget.live == 1


# -- weights mapped, code shared -----------------------------------------------------------------
def test_a_versions_weights_are_a_read_only_mapping_of_the_blob_not_a_copy(env: Any) -> None:
    model = load(env, "mapped", scale=5.0)
    _, repo, _ = env
    blob = repo.blobs.path(model.record.weights_digest)
    for array in model.pool.params.values():
        assert not array.flags.owndata and not array.flags.writeable
        with pytest.raises(ValueError):
            array[...] = 0
    maps = Path("/proc/self/maps").read_text()
    assert str(blob) in maps, "the weights blob is mapped into the process"
    assert infer(model, 1) == [5, 5, 5, 5]


def with_custom_section(wasm: bytes, tag: bytes) -> bytes:
    """The same module under another digest: a custom section changes the bytes, not the code."""
    name = b"x"
    payload = bytes([len(name)]) + name + tag
    return wasm + b"\x00" + bytes([len(payload)]) + payload


def test_many_versions_over_few_modules_compile_each_module_once(env: Any) -> None:
    tmp_path, repo, runtime = env
    runtime.MAX_SHARED_MODULES = 1  # far fewer than the modules in use: the LRU alone would thrash
    wasms = [with_custom_section(scale_wasm(), tag) for tag in (b"a", b"b")]
    loaded = []
    for i in range(12):
        directory = make_scale_model(tmp_path / f"v{i}", name=f"m{i}", scale=(i,) * 4, wasm=wasms[i % 2])
        loaded.append(load_version(runtime, repo.blobs, repo.import_dir(directory), LAZY))
    assert runtime.compiled_fresh + runtime.compiled_from_cache == 2
    assert infer(loaded[7], 1) == [7, 7, 7, 7]


# -- bulk import ---------------------------------------------------------------------------------
def digits_copy(directory: Path, name: str, seed: int) -> Path:
    """The bundled digits model under another name, with its own (perturbed) weights and no golden output."""
    directory.mkdir(parents=True)
    meta = json.loads((DIGITS / "model.json").read_text())
    meta["name"] = name
    meta["warmup"].pop("outputs", None)
    (directory / "model.json").write_text(json.dumps(meta))
    shutil.copyfile(DIGITS / "model.wasm", directory / "model.wasm")
    rng = np.random.default_rng(seed)
    weights = safetensors.numpy.load_file(str(DIGITS / "weights.safetensors"))
    perturbed = {k: (v * (1 + 0.05 * rng.standard_normal(v.shape))).astype(v.dtype) for k, v in weights.items()}
    safetensors.numpy.save_file(perturbed, str(directory / "weights.safetensors"))
    return directory


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("EDGE_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )


def x_request(v: float) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [v, 1, 1, 1]}]}


def digits_request() -> dict[str, Any]:
    pixels = np.arange(64, dtype=np.float32) % 17
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": pixels.tolist()}]}


def test_bulk_import_of_a_directory_of_models_keeps_the_good_ones_and_names_the_bad(
    agent_process: Any, tmp_path: Path
) -> None:
    collection = tmp_path / "models"
    for i in range(50):
        digits_copy(collection / f"d{i:02d}", f"digits-{i:02d}", seed=i)
    bad = digits_copy(collection / "d-bad", "digits-bad", seed=99)
    (bad / "weights.safetensors").write_bytes(b"not safetensors")
    single = make_scale_model(tmp_path / "scale")
    state = tmp_path / "state"

    proc = run_cli("import", "--state-dir", str(state), str(collection), str(single))
    assert proc.returncode == exitcodes.DATAERR, proc.stderr
    assert f"cannot import {bad}: digits-bad:1: weights are not valid safetensors" in proc.stderr
    assert "imported 51 of 52 model directories, 1 refused" in proc.stdout
    listing = json.loads(run_cli("models", "--state-dir", str(state), "--json").stdout)
    assert len(listing) == 51 and all(m["active"] for m in listing)
    assert "digits-bad" not in {m["model"] for m in listing}

    # Again, with a path that is not there: the rest is imported (already stored: the same content), exit 66.
    proc = run_cli("import", "--state-dir", str(state), str(single), str(tmp_path / "missing"))
    assert proc.returncode == exitcodes.NOINPUT and "missing is not a directory" in proc.stderr

    agent = agent_process(state, extra=["--no-seed", "--grpc-listen", "off"])
    agent.wait_ready()
    answers = []
    for name in ("digits-00", "digits-17", "digits-49"):
        status, body = http("POST", agent.url + f"/v2/models/{name}/infer", digits_request())
        assert status == 200, body
        answers.append(body["outputs"][0]["data"])
    assert answers[0] != answers[1] != answers[2], "distinct weights give distinct answers"
    assert http("POST", agent.url + "/v2/models/scale/infer", x_request(2))[0] == 200


def test_three_hundred_distinct_models_load_and_each_one_answers(agent_process: Any, tmp_path: Path) -> None:
    count = 300
    collection = tmp_path / "models"
    for i in range(count):
        make_scale_model(collection / f"m{i:03d}", name=f"m{i:03d}", scale=(float(i),) * 4)
    state = tmp_path / "state"
    proc = run_cli("import", "--state-dir", str(state), "--quiet", str(collection))
    assert proc.returncode == exitcodes.OK, proc.stderr
    assert f"imported {count} of {count} model directories" in proc.stdout
    agent = agent_process(state, extra=["--no-seed", "--grpc-listen", "off"])
    agent.wait_ready(timeout=300)
    for i in range(count):
        status, body = http("POST", agent.url + f"/v2/models/m{i:03d}/infer", x_request(1))
        assert status == 200 and body["outputs"][0]["data"] == [float(i)] * 4, (i, body)
    assert '"models loaded"' in agent.log() or "models loaded" in agent.log()


def test_one_import_with_two_directories_of_one_name_and_version_keeps_the_first(env: Any) -> None:
    tmp_path, repo, _ = env
    first = make_scale_model(tmp_path / "a", scale=(1, 1, 1, 1))
    second = make_scale_model(tmp_path / "b", scale=(2, 2, 2, 2))  # scale:1 again, other weights
    outcomes: dict[Path, Any] = {}
    repo.import_dirs([first, second], activate=False, on_each=lambda d, o, active: outcomes.update({d: (o, active)}))
    (record, active), (refusal, _) = outcomes[first], outcomes[second]
    assert record.version == "1" and active
    assert "also in another directory of this import" in str(refusal)
    assert repo.db.get_version("scale", "1").weights_digest == record.weights_digest


def test_the_instance_settings_are_checked(tmp_path: Path) -> None:
    from agent.config import Config
    from agent.errors import ConfigError

    config = Config.load(env={"EDGE_AGENT_MAX_INSTANCES": "10", "EDGE_AGENT_EAGER_INSTANCES": "true"})
    assert config.max_instances == 10 and config.eager_instances and config.instance_idle_s == 600
    for key, value in (("max_instances", -1), ("instance_idle_s", -0.5)):
        with pytest.raises(ConfigError, match="must be 0 or more"):
            Config.load(env={}, overrides={"state_dir": tmp_path, key: value})


def test_a_release_racing_a_close_cannot_make_the_budget_spin(env: Any) -> None:
    """A release that saw the pool open appends its instance after close() cleared the pool but
    before it left the budget: another pool's reserve, at the budget, must not pick that closing
    pool's instance for ever (it held the budget's lock, and close() waits for it: a deadlock)."""
    budget = InstanceBudget(limit=2)
    a = load(env, "a", budget=budget, scale=1.0)
    b = load(env, "b", budget=budget, scale=2.0)
    in_use = a.pool.acquire(timeout=5)
    # The interleaving, one step at a time: close() marks the pool closed and clears it, then the
    # release that checked ``_closed`` before that appends (release has no lock on its fast path).
    with a.pool._cond:
        a.pool._closed = True
        a.pool._idle.clear()
    a.pool._idle.append(in_use)
    outcome: list[BaseException | None] = []

    def grow_b() -> None:
        held = b.pool.acquire(timeout=5)
        try:
            b.pool.acquire(timeout=0.2)  # a second b instance: needs a slot, none can be evicted
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            outcome.append(exc)
        else:
            outcome.append(None)
        b.pool.release(held)

    thread = threading.Thread(target=grow_b, daemon=True)
    thread.start()
    thread.join(60)  # hang guard only
    assert not thread.is_alive(), "reserve spun on a closing pool's instance"
    assert len(outcome) == 1 and isinstance(outcome[0], Unavailable)
    budget.unregister(a.pool, a.pool.live)  # the rest of a's close()
    b.close()
    assert budget.live == 0


@pytest.mark.parametrize("failure", ["corrupt blob", "golden mismatch"])
def test_a_version_that_fails_to_load_at_start_up_leaves_no_mapping_behind(
    make_agent: Any, tmp_path: Path, failure: str
) -> None:
    """Start-up loads with the collector off, then freezes what lives (gc.freeze): a failed load's
    exception, kept with its traceback in a reference cycle, would keep its frames — the mapped
    weights of a corrupt blob, a warm-up's pool and instances — for the agent's whole life."""
    weights: list[Path] = []

    def setup(agent: Any) -> None:
        golden = [9.0] * 4 if failure == "golden mismatch" else None
        directory = make_scale_model(tmp_path / "m", scale=(3, 3, 3, 3), golden_override=golden)
        record = agent.repository.import_dir(directory)
        agent.db.set_active("scale", "1")
        blob = agent.blobs.path(record.weights_digest)
        if failure == "corrupt blob":
            data = bytearray(blob.read_bytes())
            data[-1] ^= 0xFF  # same size, other content: it maps, then fails its hash
            blob.chmod(0o600)
            blob.write_bytes(bytes(data))
        weights.append(blob)

    agent = make_agent(setup=setup, seed_bundled=False)
    assert "scale" in agent.agent.models.broken
    maps = Path("/proc/self/maps").read_text()
    assert str(weights[0]) not in maps, "the corrupt blob is still mapped"


MAPPED_AT_EXIT = """
import sys, threading
import numpy as np
from pathlib import Path
from agent.cas import map_readonly

array = np.frombuffer(map_readonly(Path(sys.argv[1])), np.float32)
reading = threading.Event()

def reader():
    while True:
        reading.set()
        array.sum()

threading.Thread(target=reader, daemon=True).start()
reading.wait()
"""


def test_a_mapping_is_not_unmapped_at_interpreter_exit_under_a_thread_still_reading_it(tmp_path: Path) -> None:
    """Agents on daemon threads (the tests', a simulator's) may still read weights while the
    interpreter exits: the exit must not unmap them from under those threads (a segfault)."""
    blob = tmp_path / "blob"
    blob.write_bytes(np.random.default_rng(1).random(8 << 20, dtype=np.float32).tobytes())
    done = subprocess.run(
        [sys.executable, "-c", MAPPED_AT_EXIT, str(blob)], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])


def test_a_blob_put_without_fsync_is_not_under_its_digest_until_synced_and_published(tmp_path: Path) -> None:
    """A bulk import skips the fsyncs and syncs once: a blob renamed under its digest before its
    data is on disk can be torn by a crash (zero length, holes), and every later import or pull
    of that content would trust it (``has``). It is renamed into place only after the sync."""
    import os

    blobs = BlobStore(tmp_path / "state")
    data = b"weights" * 1000
    digest = blobs.put_bytes(data, durable=False)
    assert not blobs.has(digest), "an unsynced blob is visible under its digest"
    assert blobs.put_bytes(data, durable=False) == digest  # the same content again: one file
    os.sync()
    blobs.publish()
    assert blobs.has(digest) and blobs.read_bytes(digest) == data
    assert list((tmp_path / "state" / "tmp").iterdir()) == []


def test_a_weights_blob_that_cannot_be_mapped_breaks_its_model_not_start_up(make_agent: Any, tmp_path: Path) -> None:
    """mmap can fail where a read would not (ENOMEM past vm.max_map_count or the address space;
    here ENODEV: a directory in the blob's place): that version is broken, the others serve."""

    def setup(agent: Any) -> None:
        for name, scale in (("good", 2.0), ("unmappable", 3.0)):
            record = agent.repository.import_dir(make_scale_model(tmp_path / name, name=name, scale=(scale,) * 4))
            agent.db.set_active(name, "1")
        blob = agent.blobs.path(record.weights_digest)
        blob.unlink()
        blob.mkdir()

    agent = make_agent(setup=setup, seed_bundled=False)
    assert "unmappable" in agent.agent.models.broken
    status, body = http("POST", agent.url + "/v2/models/good/infer", x_request(1))
    assert status == 200 and body["outputs"][0]["data"] == [2, 2, 2, 2]


def test_import_follows_a_link_the_user_typed_but_not_one_inside_a_directory_of_models(tmp_path: Path) -> None:
    # A `current -> release-7` link on the command line is the user's choice (as before bulk import);
    # a link met while listing a directory of models is not followed: it could point anywhere.
    release = make_scale_model(tmp_path / "release-7")
    (tmp_path / "current").symlink_to(release)
    collection = tmp_path / "models"
    collection.mkdir()
    (collection / "linked").symlink_to(make_scale_model(tmp_path / "elsewhere", name="other"))
    state = tmp_path / "state"

    proc = run_cli("import", "--state-dir", str(state), str(tmp_path / "current"))
    assert proc.returncode == exitcodes.OK, proc.stderr
    proc = run_cli("import", "--state-dir", str(state), str(collection))
    assert proc.returncode == exitcodes.DATAERR, proc.stderr
    assert "symbolic link" in proc.stderr
    listing = json.loads(run_cli("models", "--state-dir", str(state), "--json").stdout)
    assert {m["model"] for m in listing} == {"scale"}


# ``scale`` whose first call on each instance spins 2G iterations (about a second) before it
# answers; later calls are microseconds: an instance's first call paying for what is cold.
COLD_FIRST_CALL_WAT = SCALE_WAT.replace(
    "(global $ready (mut i32) (i32.const 0))",
    "(global $ready (mut i32) (i32.const 0)) (global $warm (mut i32) (i32.const 0))",
).replace(
    "(local.set $x (f32.load (i32.const 256)))",
    """(if (i32.eqz (global.get $warm))
      (then
        (global.set $warm (i32.const 1))
        (local.set $i (i32.const 2000000000))
        (loop $cold (local.set $i (i32.sub (local.get $i) (i32.const 1))) (br_if $cold (local.get $i)))))
    (local.set $x (f32.load (i32.const 256)))""",
)


def test_a_lazy_versions_inline_estimate_comes_from_a_warm_call_not_its_first(env: Any) -> None:
    """A version loads with one instance, whose warm-up call is its first: timed alone, that call
    would put every fast model of a 3,000-model node on the worker pool until enough requests
    averaged it away (bench_scale's p99 over all models was 3x the one-model p99)."""
    wasm = wasmtime.wat2wasm(COLD_FIRST_CALL_WAT.replace("(i32.const ABI)", "(i32.const 1)"))
    model = load(env, "cold-first", wasm=wasm, timeout_ms=30_000)
    try:
        assert model.pool.live == 1
        # The first call is about a second; a warm one is microseconds. The bound only needs to sit
        # between the two, far from both (a loaded machine stretches each): the estimate must be the warm call's.
        assert model.pool.ewma_us < 250_000, model.pool.ewma_us
        assert infer(model, 2.0) == [2.0, 1.0, 1.0, 1.0]
    finally:
        model.close()
