"""How fast sl-forgery gives up where it should, and how soon it notices an array's end, beside their baselines.

    python bench/bench_failures.py [--repeat 5]

Baselines, run in the same process and the same minute: a plain `ssh` refused for the same wrong password (one
prompt); `sl-forgery status` of the id a `wait` is given (one scheduler query); the end time of an array's last task
as the task itself wrote it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import tempfile
import time

from common import ROOT, cluster_env, median_seconds, print_table, private_profile

import sl_forgery

CLI = str(ROOT / ".venv" / "bin" / "sl-forgery")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    env = cluster_env()
    # Sockets in a private runtime directory, so that no other run's master is reused or disturbed.
    os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(dir="/tmp", prefix="slb")
    server = private_profile(env)

    # A wrong password, from a legacy credentials file (no keyring needed), against plain ssh refused for it. First,
    # while no master runs: a master for the same user, host and port would be reused without a login.
    scratch = tempfile.mkdtemp(prefix="slf-bench-")
    credentials = os.path.join(scratch, "server_credentials.yaml")
    with open(credentials, "w") as handle:
        handle.write(
            f"username: {env['SLF_CLUSTER_USER']}\npassword: not-the-password\nhost: {env['SLF_CLUSTER_HOST']}\n"
            "storage_root: /s\nworking_root: /w\nshared_directory_name: lab\n"
        )
    os.chmod(credentials, 0o600)
    ssh_config = os.path.join(scratch, "ssh_config")
    with open(ssh_config, "w") as handle:
        handle.write(
            f"Host {env['SLF_CLUSTER_HOST']}\n  Port {env['SLF_CLUSTER_PORT']}\n  PubkeyAuthentication no\n"
            f"  UserKnownHostsFile {env['SLF_CLUSTER_KNOWN_HOSTS']}\n"
        )
    os.environ["SL_FORGERY_SSH_CONFIG"] = ssh_config
    askpass = os.path.join(scratch, "askpass")
    with open(askpass, "w") as handle:
        handle.write("#!/bin/sh\necho not-the-password\n")
    os.chmod(askpass, 0o700)
    plain_ssh = [
        "setsid", "ssh", "-F", ssh_config, "-o", "NumberOfPasswordPrompts=1", "-o", "ControlPath=none",
        "-l", env["SLF_CLUSTER_USER"], env["SLF_CLUSTER_HOST"], "true",
    ]  # fmt: skip
    askpass_env = {**os.environ, "SSH_ASKPASS": askpass, "SSH_ASKPASS_REQUIRE": "force"}

    def refused_by_ssh() -> None:
        subprocess.run(plain_ssh, env=askpass_env, capture_output=True, stdin=subprocess.DEVNULL)

    def refused_by_sl_forgery() -> None:
        try:
            sl_forgery.Server(credentials_path=credentials).connection.run("true")
        except sl_forgery.SSHError:
            return
        raise SystemExit("a wrong password was accepted")

    ssh_refusal = median_seconds(refused_by_ssh, args.repeat)
    refusal = median_seconds(refused_by_sl_forgery, args.repeat)
    del os.environ["SL_FORGERY_SSH_CONFIG"]

    server.connection.ensure_connected()
    home = server.remote_home()
    unknown = "99999999"
    status = median_seconds(lambda: subprocess.run([CLI, "status", unknown], capture_output=True), args.repeat)
    wait = median_seconds(lambda: subprocess.run([CLI, "wait", unknown], capture_output=True), args.repeat)

    # An array's end: the wait returns after the last task wrote its end time.
    workdir = f"{home}/bench-array"
    array = sl_forgery.Job(
        "bench-array", f"{workdir}/t-%a.txt", f"{workdir}/t-%a.txt", workdir, ram_gb=0.25, time_limit=5, array="1-4"
    )
    array.add_command('sleep $((2 * SLURM_ARRAY_TASK_ID)); date +%s.%N > "$PWD/ended-$SLURM_ARRAY_TASK_ID"')
    server.submit_job(array)
    server.wait(array.job_id)
    returned = time.time()
    ended = max(float(line) for line in server.connection.run(f"cat {shlex.quote(workdir)}/ended-*").stdout.split())
    server.connection.disconnect()
    shutil.rmtree(os.environ["XDG_RUNTIME_DIR"], ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)

    print_table(
        "giving up",
        [
            ("sl-forgery status of an unknown id", status, "s", 1.0, "itself"),
            ("sl-forgery wait on an unknown id", wait, "s", wait / status, "status (<= 1.5x)"),
            ("plain ssh refused for a wrong password", ssh_refusal, "s", 1.0, "itself"),
            ("sl-forgery refused for a wrong password", refusal, "s", refusal / ssh_refusal, "plain ssh (<= 2x)"),
        ],
    )
    print_table(
        "wait on a 4-task array",
        [("delay after the last task's last command", returned - ended, "s", None, "target <= 1 s")],
    )


if __name__ == "__main__":
    main()
