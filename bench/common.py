"""Shared set-up for the benchmarks: the test cluster's coordinates and a private sl-forgery profile for it."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The CLI is measured as it runs once installed, from cached bytecode (pip compiles it at install); a checkout run
# with this set would compile the whole module on every start.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

import sl_forgery  # noqa: E402


def cluster_env() -> dict[str, str]:
    cluster = ROOT / "scripts" / "cluster"
    if subprocess.run([str(cluster), "status"], capture_output=True).returncode != 0:
        sys.exit("the test cluster is not running: start it with 'scripts/cluster up'")
    output = subprocess.run([str(cluster), "env"], capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def private_profile(env: dict[str, str]) -> sl_forgery.Server:
    """Point sl-forgery at the cluster from a throwaway config home, as the tests do."""
    home = tempfile.mkdtemp(prefix="slf-bench-")
    os.environ["XDG_CONFIG_HOME"] = f"{home}/config"
    os.environ["XDG_STATE_HOME"] = f"{home}/state"
    config = sl_forgery.Config(sl_forgery.config_path())
    config.servers["bench"] = sl_forgery.Profile(
        name="bench",
        host=env["SLF_CLUSTER_HOST"],
        port=int(env["SLF_CLUSTER_PORT"]),
        user=env["SLF_CLUSTER_USER"],
        identity_file=env["SLF_CLUSTER_KEY"],
        ssh_options=[f"UserKnownHostsFile={env['SLF_CLUSTER_KNOWN_HOSTS']}", "IdentitiesOnly=yes"],
    )
    config.default = "bench"
    config.save()
    return sl_forgery.Server.from_profile("bench")


def connected_bench(env: dict[str, str]) -> tuple[sl_forgery.Server, list[str]]:
    """A private profile's server with its master running, and the argv of a raw ``ssh`` over that same master
    (the baseline: the cost of the call itself), to which a remote command is appended."""
    server = private_profile(env)
    server.connection.ensure_connected()
    raw = ["ssh", "-o", f"ControlPath={server.connection.socket_path()}", "-o", "ControlMaster=no"]
    raw += ["-p", env["SLF_CLUSTER_PORT"], "-l", env["SLF_CLUSTER_USER"], env["SLF_CLUSTER_HOST"]]
    return server, raw


def bench_on_cluster(workdir_name: str) -> tuple[dict[str, str], sl_forgery.Server, list[str], str]:
    """What a cluster benchmark starts from: the cluster's coordinates, a connected private server, the raw ``ssh``
    argv over its master (see `connected_bench`), and the benchmark's working directory in the remote home."""
    env = cluster_env()
    server, raw = connected_bench(env)
    return env, server, raw, f"{server.remote_home()}/{workdir_name}"


def median_seconds(action, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def print_table(title: str, rows: list[tuple[str, float, str, float | None, str]]) -> None:
    """rows: (what, value, unit, ratio to its baseline or None, baseline name)."""
    print(f"\n{title}")
    print(f"{'measurement':<48} {'value':>10}  {'ratio':>8}  baseline")
    for what, value, unit, ratio, baseline in rows:
        shown = f"{value * 1000:.1f} ms" if unit == "s" else f"{value:g} {unit}"
        print(f"{what:<48} {shown:>10}  {'' if ratio is None else f'{ratio:.2f}x':>8}  {baseline}")
