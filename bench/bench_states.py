"""Status, submission, logs and waits through faults, measured on the test cluster beside their baselines.

    python bench/bench_states.py [--repeat 10] [--log-gb 1]

Baselines, run in the same process and the same minute: raw `ssh` over the same master running `squeue` and
`sacct` (or `sbatch`); the time the job itself wrote when it ended; the peak memory of `cat` of the same log over
the same master. Run as root on the test machine (it kills its own ssh master to drop the connection).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import time

from common import ROOT, bench_on_cluster, median_seconds, print_table

import sl_forgery

CLI = str(ROOT / ".venv" / "bin" / "sl-forgery")


def peak_kilobytes(argv: list[str]) -> int:
    """The peak resident memory of a command (GNU time's %M), its output thrown away."""
    result = subprocess.run(
        ["/usr/bin/time", "-f", "%M", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True
    )
    return int(result.stderr.strip().splitlines()[-1])


def master_pid(raw: list[str]) -> int:
    """The pid of the master that ``raw`` (an ssh argv over it) goes through, as ``ssh -O check`` tells it."""
    check = subprocess.run([raw[0], "-O", "check", *raw[1:]], capture_output=True, text=True)
    return int(re.search(r"pid=(\d+)", check.stderr).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--log-gb", type=float, default=1.0)
    args = parser.parse_args()

    _, server, raw, workdir = bench_on_cluster("bench-states")
    connection = server.connection

    def run(argv: list[str]) -> None:
        subprocess.run(argv, capture_output=True, check=True)

    # -- submit: the CLI against raw ssh + sbatch over the same master ------------------------------------------
    script = ROOT / "bench" / ".bench-states-job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --output=/dev/null\n#SBATCH --mem=64M\ntrue\n")
    submit_raw = [*raw, f"mkdir -p {workdir} && sbatch --parsable -o /dev/null --mem=64M --wrap true"]
    submit_cli = [CLI, "submit", "--workdir", workdir, str(script)]
    for _ in range(2):
        run(submit_raw)
        run(submit_cli)
    raw_submit = median_seconds(lambda: run(submit_raw), args.repeat)
    cli_submit = median_seconds(lambda: run(submit_cli), args.repeat)
    script.unlink()

    # -- status of the recent jobs (all ended by now) and of live ones ---------------------------------------------
    recent = [record.job_id for record in sl_forgery.load_job_records("bench").values()][-10:]
    server.wait(recent, timeout=300)
    ids = ",".join(recent)
    status_raw = [*raw, f"squeue -h --states=all -j {ids}; sacct -X -n -P -j {ids}"]
    run([CLI, "status"])
    raw_status = median_seconds(lambda: run(status_raw), args.repeat)
    cli_status_ended = median_seconds(lambda: run([CLI, "status"]), args.repeat)
    held = connection.run(
        f"cd {workdir} && for i in $(seq 10); do sbatch -H --parsable -o /dev/null --mem=64M --wrap true; done"
    ).stdout.split()
    live_raw = [*raw, f"squeue -h --states=all -j {','.join(held)}; sacct -X -n -P -j {','.join(held)}"]
    raw_live = median_seconds(lambda: run(live_raw), args.repeat)
    cli_live = median_seconds(lambda: run([CLI, "status", *held]), args.repeat)
    server.cancel(held)

    print_table(
        "submit and status, CLI processes against raw ssh over the master (median)",
        [
            ("raw ssh -S + sbatch", raw_submit, "s", 1.0, "itself"),
            ("sl-forgery submit SCRIPT", cli_submit, "s", cli_submit / raw_submit, "raw (target <= 2.5x)"),
            ("raw ssh -S + squeue + sacct, 10 jobs", raw_status, "s", 1.0, "itself"),
            ("sl-forgery status (10 recent, ended)", cli_status_ended, "s", cli_status_ended / raw_status,
             "raw (target <= 1.5x)"),
            ("raw ssh -S + squeue + sacct, 10 live jobs", raw_live, "s", 1.0, "itself"),
            ("sl-forgery status (10 live jobs)", cli_live, "s", cli_live / raw_live, "raw (target <= 1.5x)"),
        ],
    )  # fmt: skip

    # -- logs of a big log: peak memory -----------------------------------------------------------------------------
    job_id = subprocess.run(
        [CLI, "run", "--mem", "0.06", "--workdir", workdir, "--wait", "--", "true"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    log = sl_forgery.load_job_records("bench")[job_id].log_path()
    size = int(args.log_gb * (1 << 30))
    connection.run(f"yes 'a line of a long processing run, as jobs print them' | head -c {size} > {shlex.quote(log)}")
    cat_peak = peak_kilobytes([*raw, f"cat {shlex.quote(log)}"])
    logs_peak = peak_kilobytes([CLI, "logs", job_id])
    connection.run(f"rm -f {shlex.quote(log)}")
    print_table(
        f"peak resident memory printing a {args.log_gb:g} GB log",
        [
            ("ssh -S + cat (baseline)", cat_peak / 1024, "MB", 1.0, "itself"),
            ("sl-forgery logs JOB", logs_peak / 1024, "MB", logs_peak / cat_peak, "ssh + cat (constant in the size)"),
        ],
    )

    # -- a wait through a lost connection ---------------------------------------------------------------------------
    def ended_job(seconds: int) -> sl_forgery.Job:
        job = sl_forgery.Job("bench-wait", f"{workdir}/w.txt", f"{workdir}/w.txt", workdir, ram_gb=0.06)
        job.add_command(f"sleep {seconds}")
        job.add_command('date +%s.%N > "$PWD/wait-ended-$SLURM_JOB_ID"')
        return server.submit_job(job)

    def wait_late(drop_connection: bool) -> tuple[float, str]:
        """How long after the job's last line `wait` returned, and the state it said."""
        job = ended_job(12)
        waiter = subprocess.Popen(
            [CLI, "wait", "--json", job.job_id], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        time.sleep(4)  # the wait has started its watcher
        if drop_connection:
            os.kill(master_pid(raw), signal.SIGKILL)  # the connection drops mid-wait
        waiter.wait(timeout=300)
        returned = time.time()
        state = json.loads(waiter.stdout.read())["jobs"][0]["state"]
        return returned - float(connection.run(f"cat {workdir}/wait-ended-{job.job_id}").stdout), state

    late_plain, _ = wait_late(drop_connection=False)
    late_dropped, state = wait_late(drop_connection=True)

    # -- a pending job cancelled by someone else --------------------------------------------------------------------
    pending = connection.run(f"cd {workdir} && sbatch -H --parsable -o /dev/null --mem=64M --wrap true").stdout.strip()
    waiter = subprocess.Popen([CLI, "wait", pending], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(45)  # long enough for a poll backed off to its longest pause
    cancelled = time.time()
    run([*raw, f"scancel {pending}"])
    waiter.wait(timeout=300)
    noticed = time.time() - cancelled

    # -- a pending job cancelled by sl-forgery cancel from here -------------------------------------------------------
    pending = connection.run(f"cd {workdir} && sbatch -H --parsable -o /dev/null --mem=64M --wrap true").stdout.strip()
    waiter = subprocess.Popen([CLI, "wait", pending], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    cancelled = time.time()
    run([CLI, "cancel", pending])
    waiter.wait(timeout=300)
    noticed_here = time.time() - cancelled
    print_table(
        "waits through faults",
        [
            ("end noticed, connection kept (baseline)", late_plain, "s", 1.0, "itself"),
            (f"end noticed after the connection dropped ({state})", late_dropped, "s", late_dropped / late_plain,
             "kept (target: < 1 s later)"),
            ("pending job cancelled elsewhere: noticed after", noticed, "s", None, "target <= 10 s"),
            ("pending job cancelled by sl-forgery cancel: after", noticed_here, "s", None, "target: at once"),
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
