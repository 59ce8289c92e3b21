"""Submission, status and wait, measured on the test cluster side by side with their baselines.

    python bench/bench_jobs.py [--repeat 10] [--wait-job-seconds 60]

Baselines, run in the same process and the same minute: raw `ssh` over the same master running `sbatch`; a fresh
ssh connection per call; the status of one job; the end time SLURM itself records.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import time

from common import ROOT, bench_on_cluster, median_seconds, print_table

import sl_forgery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--wait-job-seconds", type=int, default=60)
    args = parser.parse_args()

    env, server, raw_ssh, workdir = bench_on_cluster("bench")
    connection = server.connection

    raw_master = [*raw_ssh, "sbatch --parsable -o /dev/null --wrap true"]
    fresh = [
        "ssh",
        "-o",
        "ControlPath=none",
        "-p",
        env["SLF_CLUSTER_PORT"],
        "-l",
        env["SLF_CLUSTER_USER"],
        "-i",
        env["SLF_CLUSTER_KEY"],
        "-o",
        f"UserKnownHostsFile={env['SLF_CLUSTER_KNOWN_HOSTS']}",
        env["SLF_CLUSTER_HOST"],
        "sbatch --parsable -o /dev/null --wrap true",
    ]

    def api_submit() -> None:
        job = sl_forgery.Job(
            "bench", f"{workdir}/out.txt", f"{workdir}/out.txt", workdir, cpus_to_use=1, ram_gb=0.25, time_limit=5
        )
        job.add_command("true")
        server.submit_job(job)

    script = ROOT / "bench" / ".bench-job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --output=/dev/null\n#SBATCH --mem=256M\ntrue\n")
    cli = [str(ROOT / ".venv" / "bin" / "sl-forgery"), "submit", "--workdir", workdir, str(script)]

    for _ in range(2):  # warm every path once
        subprocess.run(raw_master, capture_output=True, check=True)
        api_submit()
    raw = median_seconds(lambda: subprocess.run(raw_master, capture_output=True, check=True), args.repeat)
    api = median_seconds(api_submit, args.repeat)
    via_cli = median_seconds(lambda: subprocess.run(cli, capture_output=True, check=True), args.repeat)
    fresh_time = median_seconds(
        lambda: subprocess.run(fresh, capture_output=True, check=True), max(3, args.repeat // 2)
    )
    script.unlink()
    print_table(
        "submit latency (median)",
        [
            ("raw ssh over the master + sbatch", raw, "s", 1.0, "itself"),
            ("Server.submit_job (upload + sbatch)", api, "s", api / raw, "raw master (target <= 1.3x)"),
            ("sl-forgery submit (CLI, incl. Python start)", via_cli, "s", via_cli / raw, "raw master"),
            ("fresh ssh connection per call + sbatch", fresh_time, "s", fresh_time / api, "API (target >= 15x)"),
        ],
    )

    ids = connection.run(
        "for i in $(seq 100); do sbatch --parsable -o /dev/null --mem=64M --wrap true; done"
    ).stdout.split()
    server.wait(ids, timeout=300)

    def status_of(count: int) -> float:
        def query() -> None:
            server._final.clear()
            server.job_info(ids[:count])

        query()
        return median_seconds(query, args.repeat)

    one, ten, hundred = status_of(1), status_of(10), status_of(100)
    print_table(
        "status of finished jobs, one batched call (median)",
        [
            ("1 job", one, "s", 1.0, "itself"),
            ("10 jobs", ten, "s", ten / one, "1 job"),
            ("100 jobs", hundred, "s", hundred / one, "1 job (target <= 2x)"),
        ],
    )

    job = sl_forgery.Job(
        "bench-wait", f"{workdir}/wait.txt", f"{workdir}/wait.txt", workdir, cpus_to_use=1, ram_gb=0.25, time_limit=5
    )
    job.add_command(f"sleep {args.wait_job_seconds}")
    job.add_command('date +%s.%N > "$PWD/wait-ended"')
    server.submit_job(job)
    queries_before = server.scheduler_queries
    started = time.time()
    server.wait(job.job_id)
    returned = time.time()
    ended = float(connection.run(f"cat {shlex.quote(workdir)}/wait-ended").stdout)
    queries = server.scheduler_queries - queries_before
    duration = returned - started
    print_table(
        f"wait on a {args.wait_job_seconds} s job",
        [
            ("delay after the job's last command", returned - ended, "s", None, "target <= 1 s"),
            (
                "scheduler queries during the wait",
                queries,
                "calls",
                queries / (duration / 10),
                "per 10 s (target <= 1)",
            ),
        ],
    )


if __name__ == "__main__":
    main()
