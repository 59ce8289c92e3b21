"""What real sites impose, on the test cluster's variants: other login shells, MaxSessions 1, a second factor,
no accounting (or one that never answers)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

import sl_forgery
from conftest import bed, cli, console_script, own_masters, process_state, variant
from test_cluster import unused_code_time
from test_first_contact import Terminal

SERVER_PYTHON = subprocess.run(["/usr/bin/python3", "--version"], capture_output=True, text=True).stdout.strip()


def add_profile(cluster, name: str, user: str | None = None, port: int | None = None, **settings) -> str:
    config = sl_forgery.load_config()
    config.servers[name] = sl_forgery.Profile(
        name=name,
        host=cluster.host,
        port=port or cluster.port,
        user=user or cluster.user,
        identity_file=str(cluster.key),
        ssh_options=[f"UserKnownHostsFile={cluster.known_hosts}", "IdentitiesOnly=yes"],
        **settings,
    )
    config.default = name
    config.save()
    return name


class LogWatch:
    """Lines an sshd log gains from now on: what this test's own connections did."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = path.stat().st_size if path.exists() else 0

    def new_lines(self) -> list[str]:
        with open(self.path, "rb") as log:
            log.seek(self.start)
            return log.read().decode(errors="replace").splitlines()

    def logins(self, user: str) -> int:
        return sum(1 for line in self.new_lines() if re.match(rf"Accepted \S+ for {re.escape(user)} from ", line))


# ---------------------------------------------------------------------------------------------------------------------
# Any login shell


def _shell_users() -> dict[str, str]:
    """login shell name -> user"""
    entries = (entry.split(":", 1) for entry in bed()["SLF_CLUSTER_SHELL_USERS"].split(","))
    return {Path(shell).name: user for user, shell in entries}


@pytest.mark.parametrize("shell", ["bash", "dash", "zsh", "tcsh", "fish"])
def test_the_same_job_runs_end_to_end_whatever_the_login_shell(cluster, home, shell):
    user = _shell_users()[shell]
    add_profile(cluster, f"as-{shell}", user=user)
    workdir = f"{bed()['SLF_CLUSTER_STATE']}/home/{user}/tests/{uuid.uuid4().hex[:8]}"
    ran = cli("run", "--env", "analysis", "--workdir", workdir, "--wait", "--", "sl-verify-session", "-sp", "/data/s1")
    assert ran.returncode == 0, ran.stderr
    job_id, output = ran.stdout.split("\n", 1)
    assert output == f"verified session /data/s1 with {SERVER_PYTHON}\n"
    status = cli("status", "--json", job_id)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["jobs"][0]["state"] == "COMPLETED"
    failing = cli("run", "--workdir", workdir, "--wait", "--", "sh", "-c", "echo oops >&2; exit 7")
    assert failing.returncode == 7, failing.stderr
    logs = cli("logs", "--err", failing.stdout.split()[0])
    assert logs.returncode == 0 and logs.stdout == "oops\n"
    doctor = cli("check")
    assert f"login shell   ok      {'/bin' if shell in ('bash', 'dash') else '/usr/bin'}/{shell}" in doctor.stdout
    # The tcsh user's start-up file greets on stdout at every login; the others print nothing.
    printed = next(line for line in doctor.stdout.splitlines() if line.startswith("login output"))
    greeting = f"Welcome to slfc, {user}"
    if shell == "tcsh":
        assert f"a login prints '{greeting}' on stdout ({len(greeting) + 1} bytes)" in printed
    else:
        assert printed.split(None, 3)[2:] == ["ok", "a login prints nothing on stdout"]


# ---------------------------------------------------------------------------------------------------------------------
# MaxSessions 1


@pytest.mark.exclusive
def test_with_one_session_ten_waits_submits_and_status_all_end_right_over_one_connection(cluster, home, tmp_path):
    facts = bed()
    with variant("maxsessions"):
        add_profile(cluster, "one-session", port=int(facts["SLF_CLUSTER_MAXSESSIONS_PORT"]))
        log = LogWatch(Path(facts["SLF_CLUSTER_MAXSESSIONS_LOG"]))
        workdir = f"{cluster.home}/tests/one-session-{uuid.uuid4().hex[:8]}"
        job_ids = []
        for code in range(10):
            script = tmp_path / f"code{code}.sh"
            script.write_text(f"#!/bin/bash\nsleep 2\nexit {code}\n")
            submitted = cli("submit", "--workdir", f"{workdir}/{code}", str(script))
            assert submitted.returncode == 0, submitted.stderr
            job_ids.append(submitted.stdout.strip())
        waits = [_start("wait", job_id) for job_id in job_ids]
        # More submissions and a status while the ten waits hold their places in the queue for the one session.
        more = [_start("submit", "--workdir", f"{workdir}/more{index}", str(script)) for index in range(3)]
        status = _start("status", "--json", *job_ids)
        for job_id, code, process in zip(job_ids, range(10), waits, strict=True):
            out, err = process.communicate(timeout=300)
            assert process.returncode == code, (job_id, err)
        for process in more:
            out, err = process.communicate(timeout=300)
            assert process.returncode == 0 and out.strip().isdigit(), err
        out, err = status.communicate(timeout=300)
        assert status.returncode == 0, err
        assert {job["job_id"] for job in json.loads(out)["jobs"]} == set(job_ids)
        assert log.logins(cluster.user) == 1, log.new_lines()
        cli("disconnect")


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [console_script("sl-forgery"), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# ---------------------------------------------------------------------------------------------------------------------
# No accounting, or one that never answers


def _submit(server, workdir: str, command: str, **extra) -> str:
    job = sl_forgery.Job(
        "noacct", f"{workdir}/out.txt", f"{workdir}/err.txt", workdir, ram_gb=0.25, time_limit=5, **extra
    )
    job.add_command(command)
    server.submit_job(job)
    return job.job_id


@pytest.mark.exclusive
def test_without_accounting_states_and_exit_codes_come_from_squeue_and_exit_records(server, remote_dir):
    with variant("no-accounting"):
        completed = _submit(server, f"{remote_dir}/ok", "true")
        failed = _submit(server, f"{remote_dir}/bad", "exit 3")
        array = _submit(server, f"{remote_dir}/array", 'exit "$SLURM_ARRAY_TASK_ID"', array="0-2")
        running = _submit(server, f"{remote_dir}/long", "sleep 300")
        finals = server.wait([completed, failed], timeout=120)
        assert (finals[completed].status, finals[completed].exit_code) == (sl_forgery.JobStatus.COMPLETED, 0)
        assert (finals[failed].status, finals[failed].exit_code) == (sl_forgery.JobStatus.FAILED, 3)
        assert server.wait([array], timeout=120)[array].status is sl_forgery.JobStatus.FAILED
        assert server.get_job_status(running) in (sl_forgery.JobStatus.PENDING, sl_forgery.JobStatus.RUNNING)
        server.cancel([running])
        assert server.wait([running], timeout=120)[running].status is sl_forgery.JobStatus.CANCELLED
        statuses = cli("status", "--json", completed, failed)
        assert statuses.returncode == 0, statuses.stderr
        assert [(job["state"], job["exit_code"]) for job in json.loads(statuses.stdout)["jobs"]] == [
            ("COMPLETED", 0),
            ("FAILED", 3),
        ]


@pytest.mark.exclusive
def test_a_sacct_that_never_answers_does_not_hold_up_wait_or_status(server, remote_dir):
    with variant("sacct-hangs"):
        job_id = _submit(server, remote_dir, "exit 4")
        final = server.wait([job_id], timeout=120)[job_id]
        assert (final.status, final.exit_code) == (sl_forgery.JobStatus.FAILED, 4)
        status = cli("status", "--json", job_id, timeout=120)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["jobs"][0]["state"] == "FAILED"


# ---------------------------------------------------------------------------------------------------------------------
# A second factor after the key, asked once


def _code(cluster, secret: str) -> str:
    """A one-time code pam_oath has not taken yet."""
    moment = unused_code_time(cluster, secret)
    return subprocess.run(
        ["oathtool", "--totp", "-N", f"@{moment}", secret], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.exclusive
def test_a_key_logins_one_time_code_is_asked_once_on_its_terminal_then_one_connection_serves_all(cluster, home):
    facts = bed()
    secret = Path(facts["SLF_CLUSTER_OTP_SECRET_FILE"]).read_text().strip()
    with variant("otp"):
        add_profile(cluster, "otp", port=int(facts["SLF_CLUSTER_OTP_PORT"]))
        log = LogWatch(Path(facts["SLF_CLUSTER_OTP_LOG"]))
        # Without a terminal there is no one to ask: one clear line, and how to open the connection first.
        headless = subprocess.run(
            ["setsid", console_script("sl-forgery"), "queue"], capture_output=True, text=True, timeout=120,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert headless.returncode == 255 and headless.stderr.count("\n") == 1, headless.stderr
        assert "second factor" in headless.stderr and "no terminal" in headless.stderr
        assert "'sl-forgery connect -s otp' in a terminal" in headless.stderr
        assert own_masters() == {}

        code = _code(cluster, secret)
        terminal = Terminal([console_script("sl-forgery"), "connect"])
        terminal.expect(r"One-time password \(OATH\) for `slftest': ")
        terminal.type(code + "\n")
        assert terminal.finish() == 0, terminal.screen
        assert terminal.screen.count("One-time password") == 1 and code not in terminal.screen
        assert "connected to" in terminal.screen

        # Everything after rides that one connection, with no terminal and no prompt.
        for _ in range(20):
            assert cli("queue").returncode == 0
        submitted = cli("run", "--", "sh", "-c", "exit 3")
        assert submitted.returncode == 0, submitted.stderr
        assert cli("wait", submitted.stdout.strip()).returncode == 3
        jupyter = cli("jupyter", "--env", "jupyter", "--mem", "1", "--time", "10", "--detach", timeout=300)
        assert jupyter.returncode == 0, jupyter.stderr
        job_id = json.loads(cli("jupyter", "list", "--json").stdout)["servers"][0]["job_id"]
        assert cli("jupyter", "stop", job_id).returncode == 0
        assert log.logins(cluster.user) == 1, log.new_lines()

        # The master dies: the next command asks once more, on its terminal.
        (pid,) = own_masters().values()
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while process_state(pid) not in ("", "Z"):
            assert time.monotonic() < deadline, "the master did not end"
            time.sleep(0.1)
        code = _code(cluster, secret)
        terminal = Terminal([console_script("sl-forgery"), "queue"])
        terminal.expect("One-time password")
        terminal.type(code + "\n")
        assert terminal.finish() == 0, terminal.screen
        assert terminal.screen.count("One-time password") == 1, terminal.screen
        assert log.logins(cluster.user) == 2, log.new_lines()
        assert cli("disconnect").returncode == 0


# ---------------------------------------------------------------------------------------------------------------------
# A directory that cannot be written: read-only, someone else's, a full disk


def _jobs_named(cluster, name: str) -> str:
    """This test's own jobs, by their unique name: squeue keeps ended ones for minutes."""
    return cluster.ssh(f"squeue -h --states=all --name={name} -o %i").stdout.strip()


def _refused_in_one_line(result: subprocess.CompletedProcess, directory: str, reason: str) -> None:
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert directory in result.stderr and reason in result.stderr, result.stderr


def test_a_read_only_log_directory_fails_the_submission_before_sbatch_and_leaves_no_script(cluster, server, remote_dir):
    logs = f"{remote_dir}/logs"
    cluster.ssh(f"mkdir -p {logs} && chmod 555 {logs}")
    try:
        name = f"rolog{uuid.uuid4().hex[:8]}"
        job = sl_forgery.Job(name, f"{logs}/out.txt", f"{logs}/err.txt", remote_dir, ram_gb=0.25, time_limit=5)
        job.add_command("true")
        with pytest.raises(sl_forgery.CommandError) as refused:
            server.submit_job(job)
        summary = refused.value.summary
        assert f"cannot write in {logs}: Permission denied" in summary and "\n" not in summary
        assert job.job_id is None and _jobs_named(cluster, name) == ""
        # Only what was there before: no script, no probe, no outcome file.
        assert cluster.ssh(f"find {remote_dir} -mindepth 1").stdout.split() == [logs]
        assert sl_forgery.load_job_records() == {}
    finally:
        cluster.ssh(f"chmod 755 {logs} && rm -rf {remote_dir}")


def test_a_working_directory_in_someone_elses_directory_fails_in_one_line_and_makes_nothing(cluster, profile_name):
    others = Path(cluster.home) / "tests" / f"root-owned-{uuid.uuid4().hex[:8]}"
    others.mkdir(mode=0o755, parents=True)  # made by root: the test user may read it, not write in it
    try:
        name = f"other{uuid.uuid4().hex[:8]}"
        result = cli("run", "--name", name, "--workdir", f"{others}/work", "--", "true")
        _refused_in_one_line(result, f"{others}/work", "Permission denied")
        # A directory of its own that is read-only: the record directory cannot be made in it.
        readonly = f"{cluster.home}/tests/readonly-{uuid.uuid4().hex[:8]}"
        cluster.ssh(f"mkdir -p {readonly} && chmod 555 {readonly}")
        try:
            own = cli("run", "--name", name, "--workdir", readonly, "--", "true")
            _refused_in_one_line(own, readonly, "Permission denied")
            assert cluster.ssh(f"find {readonly} -mindepth 1").stdout == ""
        finally:
            cluster.ssh(f"chmod 755 {readonly} && rm -rf {readonly}")
        assert _jobs_named(cluster, name) == "" and list(others.iterdir()) == []
        assert json.loads(cli("history", "--json").stdout)["jobs"] == []
    finally:
        others.rmdir()


def test_a_full_disk_fails_the_submission_with_the_servers_message_and_leaves_no_script(cluster, profile_name):
    full = Path(cluster.home) / "tests" / f"full-{uuid.uuid4().hex[:8]}"
    full.mkdir(parents=True)
    # A real filesystem of 64 KiB, the test user's, filled up.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(full)], check=True)
    try:
        records = full / "work" / sl_forgery.REMOTE_RECORD_DIR
        records.mkdir(parents=True)
        subprocess.run(["chown", "-R", f"{cluster.user}:", str(full)], check=True)
        filled = subprocess.run(["dd", "if=/dev/zero", f"of={full}/filler", "bs=4k"], capture_output=True, text=True)
        assert "No space left on device" in filled.stderr
        name = f"full{uuid.uuid4().hex[:8]}"
        result = cli("run", "--name", name, "--workdir", f"{full}/work", "--", "true")
        _refused_in_one_line(result, str(records), "No space left on device")
        assert list(records.iterdir()) == [] and _jobs_named(cluster, name) == ""
    finally:
        subprocess.run(["umount", "-l", str(full)], check=True)
        full.rmdir()
