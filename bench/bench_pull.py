"""Image pull benchmark: a 200 MB signed model image from a loopback registry, against skopeo.

    .venv/bin/python bench/bench_pull.py            # 200 MB image, 5 trials each
    .venv/bin/python bench/bench_pull.py --quick    # 50 MB image, 2 trials each

A real distribution registry (Debian's docker-registry) on a free loopback port
with a temporary storage directory holds an image built from a model whose
weights are random bytes generated here. In the same run, alternating:

  * `edge-agent pull REF` (a fresh state directory each time): manifest, cosign
    signature check, config, blobs streamed to disk while hashed, admission;
  * `skopeo copy docker://REF dir:/tmp/...` of the same image (no signature
    policy, blobs checked against their digests).

Both are timed from process start to exit (wall clock, so both pay their
start-up), and the agent also reports its own pull time. Then the agent pulls
again through a TCP proxy that cuts the connection once half the image has
gone through: printed are the bytes fetched twice (target: under 1% of the
image) and what the proxy carried beyond the image itself. skopeo through the
same cut (with --retry-times 3) is shown for comparison.
Target: the agent at least as fast as skopeo.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the registry, proxy and model helpers the tests use

from images_fixtures import FaultProxy, Registry, make_large_model  # noqa: E402

from agent.images.layout import OciLayout, build_from_dir  # noqa: E402
from agent.images.push import push_layout, sign_image  # noqa: E402
from agent.images.settings import RegistrySettings  # noqa: E402
from agent.images.signing import generate_keypair, load_private_key  # noqa: E402

SKOPEO = shutil.which("skopeo")


def write_config(path: Path, state_dir: Path, hosts: list[str], pub: Path, scope: str) -> None:
    lines = ["[agent]", f'state_dir = "{state_dir}"', 'log_level = "warning"', "", "[registry]"]
    for host in hosts:
        lines += [f'[registry.hosts."{host}"]', "plain_http = true"]
    lines += ["", "[trust.keys]", f'bench = "{pub}"', "", "[trust.scopes]"]
    lines += [f'"{host}/{scope}" = ["bench"]' for host in hosts]
    path.write_text("\n".join(lines) + "\n")


def agent_pull(work: Path, ref: str, config_hosts: list[str], pub: Path) -> dict[str, object]:
    """One `edge-agent pull` in a fresh state directory; returns its --json report plus wall time."""
    state = Path(tempfile.mkdtemp(prefix="state-", dir=work))
    config = work / "agent.toml"
    write_config(config, state, config_hosts, pub, "bench")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_") and k != "PYTHONDONTWRITEBYTECODE"}
    # Byte-compiled, as a pip install leaves it (the untimed first run compiles), into the
    # benchmark's own temporary directory rather than the source tree.
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "agent", "pull", ref, "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        check=False,
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"edge-agent pull failed ({done.returncode}): {done.stderr}")
    doc = json.loads(done.stdout)
    doc["wall_s"] = wall
    shutil.rmtree(state)
    return doc


def skopeo_copy(work: Path, ref: str, extra: tuple[str, ...] = ()) -> float:
    dest = Path(tempfile.mkdtemp(prefix="skopeo-", dir=work))
    t0 = time.perf_counter()
    subprocess.run(
        [SKOPEO, "copy", "-q", "--src-tls-verify=false", *extra, f"docker://{ref}", f"dir:{dest}"],
        check=True,
        capture_output=True,
    )
    wall = time.perf_counter() - t0
    shutil.rmtree(dest)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 50 MB image and 2 trials")
    parser.add_argument("--size-mb", type=int, default=None, help="weights size in MB (default 200)")
    parser.add_argument("--trials", type=int, default=None)
    args = parser.parse_args()
    size = (args.size_mb or (50 if args.quick else 200)) * 1_000_000
    trials = args.trials or (2 if args.quick else 5)
    if SKOPEO is None or not Path("/usr/bin/docker-registry").exists():
        print("bench_pull: needs skopeo and docker-registry (Debian packages); skipped")
        return

    with tempfile.TemporaryDirectory(prefix="bench-pull-") as tmp:
        work = Path(tmp)
        registry = Registry(work / "registry").start()
        try:
            model = make_large_model(work / "model", "bigmodel", "1", size, seed=7)
            built = build_from_dir(model, work / "layout")
            ref = f"{registry.host}/bench/bigmodel:1"
            settings = RegistrySettings.from_table({"hosts": {registry.host: {"plain_http": True}}})
            push_layout(OciLayout(work / "layout"), built.name, ref, settings)
            key_path, pub = generate_keypair(work / "bench", password=None)
            sign_image(ref, load_private_key(key_path, lambda _c: b""), settings)
            image_bytes = OciLayout(work / "layout").manifest().total_size
            shutil.rmtree(work / "layout")
            shutil.rmtree(work / "model")

            # Warm the registry's page cache and both programs' imports once, untimed.
            agent_pull(work, ref, [registry.host], pub)
            skopeo_copy(work, ref)
            agent_runs, skopeo_runs = [], []
            for _ in range(trials):
                # Both fsync each blob before renaming it into place (containers/image's dir: does too);
                # a sync first keeps either from paying for the other's leftover writeback.
                os.sync()
                agent_runs.append(agent_pull(work, ref, [registry.host], pub))
                os.sync()
                skopeo_runs.append(skopeo_copy(work, ref))

            # The cut at 50%: through a proxy that closes every connection once half the image went by.
            proxy = FaultProxy(registry.port)
            proxy_ref = f"{proxy.host}/bench/bigmodel:1"
            proxy.cut_at = image_bytes // 2
            cut = agent_pull(work, proxy_ref, [proxy.host], pub)
            proxy.settle()
            agent_wire = proxy.down_bytes
            proxy.down_bytes, proxy.cut_at = 0, image_bytes // 2
            skopeo_runs_after_cut = 1
            try:
                skopeo_copy(work, proxy_ref, ("--retry-times", "3"))
            except subprocess.CalledProcessError:
                # skopeo gives up on a cut body; running it again is what an operator would do.
                skopeo_runs_after_cut = 2
                skopeo_copy(work, proxy_ref, ("--retry-times", "3"))
            proxy.settle()
            skopeo_wire = proxy.down_bytes
            proxy.close()
        finally:
            registry.stop()

    mb = image_bytes / 1e6
    agent_wall = statistics.median(float(r["wall_s"]) for r in agent_runs)
    agent_own = statistics.median(float(r["seconds"]) for r in agent_runs)
    skopeo_wall = statistics.median(skopeo_runs)
    blobs = cut["blobs"]
    assert isinstance(blobs, list)
    fetched = sum(int(b["fetched"]) for b in blobs) + sum(int(b["resumed_from"]) for b in blobs)
    refetched = fetched - sum(int(b["size"]) for b in blobs if not b["cached"])
    print(f"edge-agent image pull benchmark ({os.cpu_count()} CPUs, image {mb:.1f} MB, loopback registry)\n")
    print(f"  {'':44}{'wall s':>8}{'MB/s':>9}")
    print(f"  {'edge-agent pull (process start to exit)':44}{agent_wall:8.2f}{mb / agent_wall:9.0f}")
    print(f"  {'edge-agent pull (its own pull time)':44}{agent_own:8.2f}{mb / agent_own:9.0f}")
    print(f"  {'skopeo copy docker:// dir: (start to exit)':44}{skopeo_wall:8.2f}{mb / skopeo_wall:9.0f}")
    print(f"  (median of {trials}; agent/skopeo wall-time ratio {agent_wall / skopeo_wall:.2f}, target <= 1.0)\n")
    print("  cut at 50% of the image, then resumed:")
    print(
        f"    bytes fetched twice by edge-agent      {refetched:>12,} "
        f"({100 * refetched / image_bytes:.3f}% of the image)"
    )
    print(
        f"    proxy carried, edge-agent              {agent_wire:>12,} (+{100 * (agent_wire / image_bytes - 1):.3f}% "
        "over the image: headers, manifests, signature)"
    )
    print(
        f"    proxy carried, skopeo --retry-times 3  {skopeo_wire:>12,} (+{100 * (skopeo_wire / image_bytes - 1):.1f}%"
        + (", in 2 runs: the first failed at the cut)" if skopeo_runs_after_cut == 2 else ")")
    )
    print("    target: edge-agent re-fetches under 1% of the image")


if __name__ == "__main__":
    main()
