"""Headless jobs against the real cluster: submission, states, waiting, the CLI and its exit codes."""

import contextlib
import fcntl
import json
import os
import re
import shlex
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

import sl_forgery
from conftest import CLUSTER, cli, client_port, console_script, own_masters, process_state
from sl_forgery import Job, JobStatus, Server, SlurmError, UsageError


# The conda environments on the test cluster are venvs of the server's own Python.
SERVER_PYTHON = subprocess.run(["/usr/bin/python3", "--version"], capture_output=True, text=True).stdout.strip()


def make_job(remote_dir: str, name: str = "job", env: str | None = "analysis", output: str = "out.txt", **extra) -> Job:
    return Job(
        name,
        f"{remote_dir}/{output}",
        f"{remote_dir}/err.txt",
        remote_dir,
        conda_environment=env,
        cpus_to_use=1,
        ram_gb=0.25,
        time_limit=5,
        **extra,
    )


def test_a_job_runs_in_its_conda_environment_and_completes(server, remote_dir):
    job = make_job(remote_dir, environment={"GREETING": "hello there"})
    job.add_command('echo "$GREETING from $CONDA_DEFAULT_ENV"')
    job.add_command("sl-verify-session -sp /data/s1")
    assert server.submit_job(job) is job and job.job_id.isdigit()
    final = server.wait([job.job_id], timeout=60)[job.job_id]
    assert (final.status, final.exit_code) == (JobStatus.COMPLETED, 0)
    assert server.read_file(f"{remote_dir}/out.txt").splitlines() == [
        "hello there from analysis",
        f"verified session /data/s1 with {SERVER_PYTHON}",
    ]
    assert server.get_job_status(int(job.job_id)) is JobStatus.COMPLETED
    assert server.job_complete(job)


def test_the_first_failing_command_ends_the_job_with_its_exit_code(server, remote_dir):
    job = make_job(remote_dir, env=None)
    job.add_command("echo before")
    job.add_command("echo 'boom' >&2; exit 3")
    job.add_command("echo never")
    server.submit_job(job)
    final = server.wait(job.job_id, timeout=60)[job.job_id]
    assert (final.status, final.exit_code) == (JobStatus.FAILED, 3)
    assert server.read_file(f"{remote_dir}/out.txt") == "before\n"
    assert "boom" in server.read_file(f"{remote_dir}/err.txt")


def test_a_missing_conda_environment_fails_with_a_clear_message(server, remote_dir):
    job = make_job(remote_dir, env="no_such_env")
    job.add_command("echo never")
    server.submit_job(job)
    assert server.wait(job.job_id, timeout=60)[job.job_id].status is JobStatus.FAILED
    errors = server.read_file(f"{remote_dir}/err.txt")
    assert "cannot activate conda environment no_such_env" in errors
    assert server.read_file(f"{remote_dir}/out.txt") == ""


def test_submitting_a_job_twice_is_refused(server, remote_dir):
    job = make_job(remote_dir, env=None)
    job.add_command("true")
    server.submit_job(job)
    with pytest.raises(UsageError, match="already submitted"):
        server.submit_job(job)


def test_hostile_names_and_paths_survive_the_round_trip(server, cluster, remote_dir):
    odd = 'we\'ird "name" $HOME `uname` #1 ünï'
    directory = f"{remote_dir}/{odd}"
    job = Job(
        odd,
        f"{directory}/out {odd}.txt",
        f"{directory}/err.txt",
        directory,
        conda_environment="analysis",
        cpus_to_use=1,
        ram_gb=0.25,
        time_limit=5,
        environment={"ODD": odd},
    )
    job.add_command('printf "%s|%s|%s\\n" "$SLURM_JOB_NAME" "$PWD" "$ODD"')
    job.add_command("\t: 'a tab, a backslash \\ and  two spaces'  ")
    server.submit_job(job)
    uploaded = server.connection.run(f"cat {shlex.quote(directory)}/.sl-forgery/*.sh").stdout
    assert uploaded == job.script
    final = server.wait(job.job_id, timeout=60)[job.job_id]
    assert final.status is JobStatus.COMPLETED, server.read_file(f"{directory}/err.txt")
    assert server.read_file(f"{directory}/out {odd}.txt") == f"{odd}|{directory}|{odd}\n"
    # Right after the end sacct may name the job "allocation" for a few seconds: wait for the name it keeps.
    deadline = time.monotonic() + 60
    while (row := sacct_name(cluster, job.job_id)) in ("", "allocation") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert row == odd.replace('"', "`")  # slurmdbd stores double quotes as backticks


def sacct_name(cluster, job_id: str) -> str:
    return cluster.ssh(f"sacct -X -n -P -o JobName -j {job_id}").stdout.strip()


def test_a_bad_sbatch_option_raises_slurms_message_and_leaves_no_job(server, cluster, remote_dir, unique_name):
    job = make_job(remote_dir, unique_name, env=None, partition="no_such_partition")
    job.add_command("true")
    with pytest.raises(SlurmError) as error:
        server.submit_job(job)
    assert "Invalid partition name specified" in error.value.summary
    assert error.value.returncode == 1 and "sbatch" in " ".join(error.value.argv)
    assert job.job_id is None
    # squeue keeps every job it accepted, ended or not, for minutes: a job under this name would show here.
    assert cluster.ssh(f"squeue -h --states=all --name={unique_name} -o %i").stdout == ""
    # Nor the script, nor the directories the submission made for it.
    assert cluster.ssh(f"ls -d {remote_dir}", check=False).returncode != 0


def test_cancelled_job_reads_cancelled(server, remote_dir):
    job = make_job(remote_dir, env=None)
    job.add_command("sleep 300")
    server.submit_job(job)
    server.cancel(job.job_id)
    assert server.wait(job.job_id, timeout=60)[job.job_id].status is JobStatus.CANCELLED


def test_array_and_dependency_jobs(server, remote_dir):
    array = make_job(remote_dir, "array", env=None, output="task-%a.txt", array="1-3")
    array.add_command('echo "task $SLURM_ARRAY_TASK_ID"')
    server.submit_job(array)
    follower = make_job(remote_dir, "after", env=None, output="after.txt", dependency=[array.job_id])
    follower.add_command(f"cat {remote_dir}/task-*.txt")
    server.submit_job(follower)
    finals = server.wait([array.job_id, follower.job_id], timeout=90)
    assert finals[array.job_id].status is JobStatus.COMPLETED
    assert finals[follower.job_id].status is JobStatus.COMPLETED
    assert server.read_file(f"{remote_dir}/after.txt") == "task 1\ntask 2\ntask 3\n"


# The scheduler is asked once at the start of a wait, then only after this long: a wait that returns before it
# was told of the end by the jobs' exit records. (How fast is measured in bench/bench_jobs.py.)
NEVER_POLL = 3600


def test_wait_notices_an_arrays_end_from_its_tasks_records(server, remote_dir):
    array = make_job(remote_dir, "tasks", env=None, output="t-%a.txt", array="1-4")
    array.add_command("sleep 4")
    server.submit_job(array)
    before = server.scheduler_queries
    final = server.wait(array.job_id, timeout=120, poll_first=NEVER_POLL)[array.job_id]
    assert final.status is JobStatus.COMPLETED and final.exit_code == 0
    # The first query, then the confirmations the records asked for: no scheduler polling in between.
    assert server.scheduler_queries - before <= 6


def test_statuses_of_fifty_jobs_come_in_one_round_trip(server, cluster, remote_dir):
    ids = cluster.ssh(
        f"mkdir -p {remote_dir} && for i in $(seq 50); do sbatch --parsable -o /dev/null --wrap 'exit 0'; done"
    ).stdout.split()
    assert len(ids) == 50
    before = server.scheduler_queries
    statuses = server.get_job_statuses(ids)
    assert server.scheduler_queries == before + 1
    assert set(statuses) == set(ids)
    assert all(status is not JobStatus.UNKNOWN for status in statuses.values())
    assert set(server.wait(ids, timeout=120).keys()) == set(ids)


def test_a_job_just_submitted_is_pending_not_unknown(server, remote_dir):
    job = make_job(remote_dir, env=None)
    job.add_command("sleep 2")
    server.submit_job(job)
    assert server.get_job_status(job.job_id) in (JobStatus.PENDING, JobStatus.RUNNING)
    server.wait(job.job_id, timeout=60)


def test_wait_learns_of_the_end_from_the_exit_record_without_polling_the_scheduler(server, remote_dir):
    job = make_job(remote_dir, env=None)
    job.add_command("sleep 6")
    server.submit_job(job)
    before = server.scheduler_queries
    final = server.wait(job.job_id, timeout=120, poll_first=NEVER_POLL)[job.job_id]
    assert (final.status, final.exit_code) == (JobStatus.COMPLETED, 0)
    assert server.scheduler_queries - before <= 6


@contextlib.contextmanager
def accounting_stopped(cluster):
    """slurmdbd stopped, as on a cluster without accounting: sacct fails, squeue alone knows of jobs. Restarted
    (scripts/cluster up starts only what is down) even when the test fails."""
    slurmdbd = int((cluster.state / "run" / "slurmdbd.pid").read_text())
    os.kill(slurmdbd, signal.SIGTERM)
    try:
        deadline = time.monotonic() + 30
        while cluster.ssh("sacct -n -X -S now", check=False).returncode == 0:
            assert time.monotonic() < deadline, "sacct still answers after slurmdbd was stopped"
            time.sleep(0.2)
        yield
    finally:
        subprocess.run([str(CLUSTER), "up"], check=True, capture_output=True)


@pytest.mark.exclusive
def test_statuses_stay_right_without_accounting(cluster, profile_name):
    # squeue shows a FAILED job's state but never its exit code: only the exit record can tell it.
    with accounting_stopped(cluster):
        job_id = cli("run", "--mem", "0.25", "--", "sh", "-c", "exit 4").stdout.strip()
        waited = cli("wait", "--json", job_id)
        assert waited.returncode == 4, waited.stderr
        assert json.loads(waited.stdout)["jobs"][0]["state"] == "FAILED"
        status = json.loads(cli("status", "--json", job_id).stdout)["jobs"][0]
        assert (status["state"], status["exit_code"]) == ("FAILED", 4)


@pytest.mark.slow
def test_a_job_past_its_time_limit_reads_timeout(server, remote_dir):
    job = Job(
        "slow", f"{remote_dir}/out.txt", f"{remote_dir}/err.txt", remote_dir, cpus_to_use=1, ram_gb=0.25, time_limit=1
    )
    job.add_command("sleep 600")
    server.submit_job(job)
    assert server.wait(job.job_id, timeout=240)[job.job_id].status is JobStatus.TIMEOUT


# ---- the connection ----------------------------------------------------------------------------------------------


def test_fifty_calls_use_one_connection(server, cluster):
    mark = cluster.sshd_log_mark()
    ports = {client_port(server.connection) for _ in range(50)}
    assert len(ports) == 1 and len(own_masters()) == 1
    assert cluster.logins_from_port(ports.pop(), since=mark) == 1  # one login, for the master


def test_connect_and_disconnect_open_and_close_the_shared_connection(profile_name):
    connected = cli("connect")
    assert connected.returncode == 0 and connected.stderr.startswith("connected to slftest@127.0.0.1:")
    (pid,) = own_masters().values()
    again = cli("connect")
    assert again.returncode == 0 and again.stderr.startswith("already connected to")
    assert list(own_masters().values()) == [pid]
    assert cli("queue").returncode == 0 and list(own_masters().values()) == [pid]
    disconnected = cli("disconnect")
    assert disconnected.returncode == 0 and disconnected.stderr.startswith("disconnected from")
    assert own_masters() == {} and process_state(pid) in ("", "Z")
    assert cli("disconnect").stderr.startswith("no connection to")


def test_cli_calls_seconds_apart_reuse_one_connection(profile_name, cluster):
    masters = []
    for _ in range(3):
        assert cli("queue").returncode == 0
        masters.append(own_masters())
        time.sleep(1)  # the scenario: commands typed seconds apart
    assert len(masters[0]) == 1 and masters == [masters[0]] * 3


def test_commands_started_together_share_one_connection(profile_name, cluster):
    # A shell loop that puts each submission in the background starts them all before any master exists.
    # -v shows every ssh command, the master's start among them.
    commands = [
        subprocess.Popen(
            [console_script("sl-forgery"), "-v", "queue"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for _ in range(8)
    ]
    errors = [command.communicate(timeout=120)[1].decode() for command in commands]
    assert [command.returncode for command in commands] == [0] * 8, errors
    assert sum(line.startswith("+ ssh -M ") for text in errors for line in text.splitlines()) == 1
    # No master left behind without its socket: the only ssh -M using this test's control directory is the one
    # its socket names.
    pattern = f"ssh -M -N -f .*ControlPath={sl_forgery.control_dir()}/"
    running = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    assert [int(pid) for pid in running] == list(own_masters().values())


def test_more_waits_at_once_than_sshd_allows_sessions_all_see_the_job_end(profile_name, cluster):
    # sshd allows 10 sessions per connection; a shell loop of `run --wait ... &` easily starts more waits than that.
    job_id = cli("run", "--mem", "0.25", "--", "sleep", "5").stdout.strip()
    waits = [
        subprocess.Popen(
            [console_script("sl-forgery"), "wait", "--json", job_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(14)
    ]
    outcomes = [wait.communicate(timeout=180) for wait in waits]
    assert [wait.returncode for wait in waits] == [0] * 14, [stderr.decode() for _, stderr in outcomes]
    assert {json.loads(stdout)["jobs"][0]["state"] for stdout, _ in outcomes} == {"COMPLETED"}
    # Their sessions are free again: the next wait has a watcher, so it learns of the end with no scheduler poll.
    with sl_forgery.Server.from_profile(profile_name) as server:
        next_job = cli("run", "--mem", "0.25", "--", "sleep", "3").stdout.strip()
        final = server.wait(next_job, timeout=120, poll_first=NEVER_POLL)[next_job]
        assert final.status is JobStatus.COMPLETED


def held_lasting_sessions(profile_name: str) -> int:
    """Lasting-session slots of this test's connection held right now (a wait holds one for its watcher)."""
    socket = sl_forgery.Server.from_profile(profile_name).connection.socket_path()
    held = 0
    for slot in range(sl_forgery.LASTING_SESSIONS):
        descriptor = os.open(f"{socket}.session-{slot}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held += 1
        finally:
            os.close(descriptor)
    return held


def test_follow_says_so_when_every_lasting_session_is_taken(profile_name, cluster):
    job_id = cli("run", "--mem", "0.25", "--", "sleep", "300").stdout.strip()
    waits = [
        subprocess.Popen([console_script("sl-forgery"), "wait", job_id], stderr=subprocess.DEVNULL)
        for _ in range(sl_forgery.LASTING_SESSIONS)
    ]
    try:
        deadline = time.monotonic() + 60
        while held_lasting_sessions(profile_name) < sl_forgery.LASTING_SESSIONS:
            assert time.monotonic() < deadline, f"only {held_lasting_sessions(profile_name)} waits have their watcher"
            time.sleep(0.2)
        followed = cli("logs", "--follow", job_id)
        assert followed.returncode == 1 and followed.stderr.count("\n") == 1
        assert "already follow or wait" in followed.stderr and "without --follow" in followed.stderr
    finally:
        cli("cancel", job_id)
        for wait in waits:
            wait.wait(timeout=60)


def test_a_killed_master_is_restarted_once_and_never_bypassed(server, cluster):
    first_port = client_port(server.connection)
    (killed,) = own_masters().values()
    mark = cluster.sshd_log_mark()
    os.kill(killed, signal.SIGKILL)
    # Every call after the kill goes through one new master: a call that bypassed it would show its own port.
    ports = {client_port(server.connection) for _ in range(5)}
    assert len(ports) == 1 and ports != {first_port}
    (restarted,) = own_masters().values()
    assert restarted != killed and cluster.logins_from_port(ports.pop(), since=mark) == 1


def test_a_failed_remote_command_raises_with_command_code_and_stderr(server):
    with pytest.raises(sl_forgery.CommandError) as error:
        server.connection.run("echo oops >&2; exit 7")
    assert error.value.returncode == 7 and "oops" in error.value.stderr and "exit 7" in error.value.script
    assert "SCRIPT:\necho oops >&2; exit 7" in str(error.value)


def test_file_helpers_round_trip(server, remote_dir, tmp_path):
    local = tmp_path / "data"
    (local / "sub").mkdir(parents=True)
    (local / "a.txt").write_text("alpha")
    (local / "sub" / "b.txt").write_text("beta")
    server.push_directory(local, f"{remote_dir}/copy")
    assert server.exists(f"{remote_dir}/copy/sub/b.txt")
    back = tmp_path / "back"
    server.pull_directory(back, f"{remote_dir}/copy")
    assert (back / "a.txt").read_text() == "alpha" and (back / "sub" / "b.txt").read_text() == "beta"
    server.push_file(local / "a.txt", f"{remote_dir}/single.txt")
    server.pull_file(tmp_path / "single.txt", f"{remote_dir}/single.txt")
    assert (tmp_path / "single.txt").read_text() == "alpha"
    server.remove(f"{remote_dir}/copy", recursive=True)
    assert not server.exists(f"{remote_dir}/copy")
    server.create_directory(f"{remote_dir}/new/deeper")
    assert server.exists(f"{remote_dir}/new/deeper")
    with pytest.raises(sl_forgery.CommandError) as error:
        server.pull_file(tmp_path / "never.txt", f"{remote_dir}/missing.txt")
    assert "No such file" in error.value.summary and f"{remote_dir}/missing.txt" in error.value.summary
    assert not [path for path in tmp_path.iterdir() if "never" in path.name]  # nothing half-done


@pytest.fixture
def greeting_sftp_server(cluster, tmp_path):
    """A second sshd for the test cluster, as many sites run it: SFTP through the external sftp-server, which sshd
    starts through the user's login shell, so whatever the shell's start-up files print reaches the SFTP stream. The
    tcsh user's start-up file greets on stdout. Yields a profile for that user; the sshd is ended by its pid."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    directory = tmp_path / "sftp-sshd"
    directory.mkdir()
    config = (cluster.state / "ssh" / "sshd_config").read_text()
    config = re.sub(r"(?m)^Port .*$", f"Port {port}", config)
    config = re.sub(r"(?m)^PidFile .*$", f"PidFile {directory}/sshd.pid", config)
    config = re.sub(r"(?m)^Subsystem sftp .*$", "Subsystem sftp /usr/lib/openssh/sftp-server", config)
    config = re.sub(r"(?m)^AllowUsers .*$", "AllowUsers slftcsh", config)
    (directory / "sshd_config").write_text(config)
    known_hosts = directory / "known_hosts"
    host_key = " ".join(Path(f"{cluster.host_key}.pub").read_text().split()[:2])
    known_hosts.write_text(f"[{cluster.host}]:{port} {host_key}\n")
    subprocess.run(
        ["/usr/sbin/sshd", "-f", str(directory / "sshd_config"), "-E", str(directory / "sshd.log")], check=True
    )
    deadline = time.monotonic() + 10
    while not (directory / "sshd.pid").exists():  # written by the daemon once it has forked
        assert time.monotonic() < deadline, "the second sshd did not start"
        time.sleep(0.05)
    pid = int((directory / "sshd.pid").read_text())
    try:
        profile = sl_forgery.Profile(
            name="greeting",
            host=cluster.host,
            port=port,
            user="slftcsh",
            identity_file=str(cluster.key),
            ssh_options=[f"UserKnownHostsFile={known_hosts}", "IdentitiesOnly=yes"],
        )
        yield profile
    finally:
        os.kill(pid, signal.SIGTERM)


def test_file_helpers_work_when_the_login_shell_prints(greeting_sftp_server, cluster, tmp_path):
    remote = f"{cluster.state}/home/slftcsh/files-{uuid.uuid4().hex[:8]}"
    server = Server(profile=greeting_sftp_server)
    try:
        # The greeting is there: scp (SFTP) would read it as a message and fail.
        profile = greeting_sftp_server
        plain = subprocess.run(
            ["ssh", "-p", str(profile.port), "-l", profile.user, "-i", profile.identity_file]
            + [f"-o{option}" for option in profile.ssh_options]
            + [profile.host, "true"],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        local = tmp_path / "data"
        (local / "sub dir").mkdir(parents=True)
        (local / "binary.bin").write_bytes(bytes(range(256)) * 4)
        (local / "sub dir" / "b c.txt").write_text("beta\n")
        server.push_directory(local, f"{remote}/copy")
        assert server.read_file(f"{remote}/copy/sub dir/b c.txt") == "beta\n"
        back = tmp_path / "back"
        server.pull_directory(back, f"{remote}/copy")
        assert (back / "binary.bin").read_bytes() == bytes(range(256)) * 4
        assert (back / "sub dir" / "b c.txt").read_text() == "beta\n"
        server.push_file(local / "binary.bin", f"{remote}/single.bin")
        server.pull_file(tmp_path / "single.bin", f"{remote}/single.bin")
        assert (tmp_path / "single.bin").read_bytes() == bytes(range(256)) * 4
    finally:
        server.remove(remote, recursive=True)
        server.connection.disconnect()
    assert "Welcome" in plain.stdout


def test_roots_follow_the_original_rules(server, cluster):
    assert str(server.raw_data_root) == f"{cluster.home}/storage/lab_data"
    assert str(server.processed_data_root) == f"{cluster.home}/work/lab_data"
    assert str(server.user_data_root) == f"{cluster.home}/storage/slftest"
    assert str(server.user_working_root) == f"{cluster.home}/work/slftest"


# ---- the command line ----------------------------------------------------------------------------------------------


def test_cli_submit_prints_only_the_id_and_wait_exits_zero(profile_name, cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --job-name=from-file\n#SBATCH --time=5\necho from script\n")
    submitted = cli("submit", str(script), "--mem", "0.25")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert job_id.isdigit() and submitted.stdout == f"{job_id}\n"
    waited = cli("wait", job_id)
    assert waited.returncode == 0, waited.stderr
    assert "COMPLETED" in waited.stderr
    logs = cli("logs", job_id)
    assert logs.stdout == "from script\n"
    assert json.loads(cli("status", "--json", job_id).stdout)["jobs"][0]["name"] == "from-file"
    # SLURM itself ran it under the script's name (squeue keeps ended jobs for minutes).
    assert cluster.ssh(f"squeue -h --states=all -j {job_id} -o %j").stdout.strip() == "from-file"


def test_cli_submit_respects_the_scripts_own_log_lines_and_names_a_nameless_job(profile_name, tmp_path):
    script = tmp_path / "analysis-step.sh"
    script.write_text("#!/bin/bash\n#SBATCH -o custom-%j.log\n#SBATCH --error errors-%j.log\necho out; echo err >&2\n")
    job_id = cli("submit", str(script), "--mem", "0.25", "--wait").stdout.strip()
    assert cli("logs", job_id).stdout == "out\n"
    assert cli("logs", "--err", job_id).stdout == "err\n"
    history = json.loads(cli("history", "--json").stdout)["jobs"][-1]
    assert history["name"] == "analysis-step" and history["output_log"].endswith("/custom-%j.log")


def test_a_script_whose_logs_go_to_dev_null_is_submitted(profile_name, tmp_path):
    script = tmp_path / "quiet.sh"
    script.write_text("#!/bin/bash\n#SBATCH --output=/dev/null\n#SBATCH --error=/dev/null\necho gone\n")
    submitted = cli("submit", str(script), "--mem", "0.25", "--wait")
    assert submitted.returncode == 0, submitted.stderr
    assert cli("status", "--json", submitted.stdout.strip()).stdout.count('"COMPLETED"') == 1


def test_cli_logs_follow_prints_the_output_as_it_comes_and_ends_with_the_job(profile_name):
    job_id = cli("run", "--mem", "0.25", "--", "sh", "-c", "echo first; sleep 3; echo second; exit 4").stdout.strip()
    followed = cli("logs", "--follow", job_id, timeout=120)
    assert followed.stdout == "first\nsecond\n"
    assert followed.returncode == 4
    errors = cli("logs", "--err", job_id)
    assert errors.returncode == 0 and errors.stdout == ""


def test_cli_wait_exits_with_a_failed_jobs_code_and_shows_its_error_log(profile_name):
    ran = cli("run", "--mem", "0.25", "--wait", "--", "sh", "-c", "echo visible; echo 'went wrong' >&2; exit 3")
    assert ran.returncode == 3
    assert ran.stdout.splitlines()[-1] == "visible"
    assert "went wrong" in ran.stderr and "FAILED" in ran.stderr


def test_cli_exit_codes_for_cancelled_timeout_and_interrupt(profile_name):
    job_id = cli("run", "--mem", "0.25", "--", "sleep", "300").stdout.strip()
    timed_out = cli("wait", "--timeout", "2", job_id)
    assert timed_out.returncode == 124 and "still running" in timed_out.stderr
    waiting = subprocess.Popen(
        [console_script("sl-forgery"), "wait", job_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert job_id in waiting.stderr.readline()  # the first progress line: it is waiting
    waiting.send_signal(signal.SIGINT)
    _, stderr = waiting.communicate(timeout=30)
    assert waiting.returncode == 130 and "keep running" in stderr
    assert cli("status", "--json", job_id).returncode == 0
    assert cli("cancel", job_id).returncode == 0
    cancelled = cli("wait", job_id)
    assert cancelled.returncode == 1 and "CANCELLED" in cancelled.stderr


def test_cancel_tells_an_ended_job_from_a_cancelled_one_and_refuses_an_unknown_id(profile_name):
    finished = cli("run", "--mem", "0.25", "--", "true").stdout.strip()
    running = cli("run", "--mem", "0.25", "--", "sleep", "300").stdout.strip()
    assert cli("wait", finished).returncode == 0
    cancelled = cli("cancel", finished, running)
    assert cancelled.returncode == 0
    assert cancelled.stderr.splitlines() == [f"cancelled {running}", f"job {finished} had already ended"]
    assert json.loads(cli("wait", "--json", running).stdout)["jobs"][0]["state"] == "CANCELLED"
    unknown = cli("cancel", "99999999")
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1
    assert "scancel refused" in unknown.stderr and "Invalid job id" in unknown.stderr


def test_logs_of_a_job_that_has_not_started_say_so(profile_name, tmp_path):
    # A job submitted held never starts, so its log is surely missing when asked for.
    script = tmp_path / "held.sh"
    script.write_text("#!/bin/bash\n#SBATCH --hold\n#SBATCH --mem=256M\necho hi\n")
    job_id = cli("submit", str(script)).stdout.strip()
    try:
        logs = cli("logs", job_id)
        assert logs.returncode == 1 and logs.stderr.count("\n") == 1
        assert f"job {job_id} (PENDING) has not written" in logs.stderr and f"logs --follow {job_id}" in logs.stderr
    finally:
        cli("cancel", job_id)
    ended = cli("logs", job_id)
    assert ended.returncode == 1 and f"job {job_id} (CANCELLED) ended without writing" in ended.stderr


@pytest.fixture
def chatty_login(cluster, request):
    """A .bashrc that greets on stdout and stderr, as many do; bash reads it even for commands run over ssh.
    It changes the shared test user's login for every run, so only an exclusive test may use it; removed after."""
    assert request.node.get_closest_marker("exclusive"), "a test that rewrites .bashrc must be marked exclusive"
    try:
        cluster.ssh("printf 'echo Welcome to the cluster\\necho module loaded >&2\\n' > ~/.bashrc")
        assert cluster.ssh("true").stdout == "Welcome to the cluster\n"
        yield
    finally:
        cluster.ssh("rm -f ~/.bashrc")


@pytest.mark.exclusive
def test_a_login_shell_that_prints_changes_no_result(profile_name, chatty_login):
    ran = cli("run", "--mem", "0.25", "--wait", "--", "echo", "only this")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines()[1:] == ["only this"]  # the job id, then the job's output
    job_id = ran.stdout.splitlines()[0]
    assert job_id.isdigit()
    status = json.loads(cli("status", "--json", job_id).stdout)
    assert status["jobs"][0]["state"] == "COMPLETED"
    assert cli("logs", job_id).stdout == "only this\n"
    followed = cli("logs", "--follow", job_id)
    assert followed.returncode == 0 and followed.stdout == "only this\n"
    checked = cli("check")
    assert checked.returncode == 0
    # The greeting is reported as what a login prints, and reaches no other row.
    rows = {line[:14].strip(): line for line in checked.stdout.splitlines()[1:]}
    assert "a login prints 'Welcome to the cluster' on stdout (23 bytes)" in rows["login output"]
    assert [row for name, row in rows.items() if "Welcome" in row and name != "login output"] == []


@pytest.mark.exclusive
def test_the_original_loop_and_wait_outlast_a_completing_job(server, remote_dir, cluster, slow_epilog):
    # With accounting down, nothing but squeue speaks for the job, and squeue says COMPLETING during the epilog.
    with accounting_stopped(cluster):
        job = make_job(remote_dir, env=None)
        job.add_command("sleep 1")
        server.submit_job(job)
        seen = set()
        deadline = time.monotonic() + 120
        # The original README's loop, with the exact state read beside it.
        while server.get_job_status(int(job.job_id)) in (JobStatus.PENDING, JobStatus.RUNNING):
            seen.add(server.job_info([job.job_id])[job.job_id].status)
            assert time.monotonic() < deadline, f"the loop still runs; states seen: {seen}"
            time.sleep(0.2)
        assert JobStatus.COMPLETING in seen
        assert server.get_job_status(int(job.job_id)) is JobStatus.COMPLETED
        waited = cli("run", "--mem", "0.25", "--wait", "--", "echo", "done")
        assert waited.returncode == 0 and waited.stdout.splitlines()[-1] == "done"


def test_waiting_for_a_job_nobody_knows_fails_at_once(profile_name):
    # A mistyped id would otherwise be waited for until --timeout, which exits 124.
    waited = cli("wait", "--timeout", "60", "99999999")
    assert waited.returncode == 1
    assert waited.stderr.splitlines()[-1].startswith("sl-forgery: error: job 99999999 is unknown to squeue and sacct")


def test_cli_bad_input_is_one_line_and_exit_two(profile_name, tmp_path):
    missing = cli("submit", str(tmp_path / "nope.sh"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    bad_id = cli("wait", "12abc")
    assert bad_id.returncode == 2 and "is not a SLURM job id" in bad_id.stderr
    unknown = cli("--server", "nowhere", "status")
    assert unknown.returncode == 2 and "no server named 'nowhere'" in unknown.stderr


def test_cli_ssh_failure_exits_255(home, cluster):
    added = cli("server", "add", "closed", "--host", "127.0.0.1", "--port", "1", "--user", "nobody")
    assert added.returncode == 0, added.stderr
    result = cli("queue")
    assert result.returncode == 255 and result.stderr.startswith("sl-forgery: error: ssh to nobody@127.0.0.1:1")
    assert result.stderr.count("\n") == 1


def test_dry_run_connects_to_nothing(home):
    result = cli("run", "--dry-run", "--env", "analysis", "--", "python", "-c", "print('x y')")
    assert result.returncode == 0
    assert "conda activate analysis" in result.stdout and "python -c 'print('\"'\"'x y'\"'\"')'" in result.stdout


def test_dry_runs_show_the_profiles_defaults_without_connecting(home, tmp_path):
    # The profile points at a closed port: any connection attempt would fail the command.
    config = sl_forgery.Config(sl_forgery.config_path())
    config.servers["lab"] = sl_forgery.Profile(
        name="lab",
        host="127.0.0.1",
        port=1,
        user="alice",
        working_root="/work",
        conda_environment="analysis",
        partition="short",
        account="lab-account",
    )
    config.default = "lab"
    config.save()
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --time=5\necho hi\n")
    # The user's files: sl-forgery's own cache (a parsed copy of the servers file) may be refreshed.
    files_before = sorted(path for path in home.rglob("*") if "cache" not in path.relative_to(home).parts)

    ran = cli("run", "--dry-run", "--", "echo", "hi")
    assert ran.returncode == 0, ran.stderr
    assert "conda activate analysis" in ran.stdout
    assert "#SBATCH --partition=short\n" in ran.stdout and "#SBATCH --account=lab-account\n" in ran.stdout
    assert "#SBATCH --chdir=/work/alice/sl-forgery-jobs/echo-" in ran.stdout
    assert "on alice@127.0.0.1:1" in ran.stderr and "sbatch --parsable /work/alice/sl-forgery-jobs/echo-" in ran.stderr

    submitted = cli("submit", "--dry-run", "--cpus", "3", str(script))
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.startswith("#!/bin/bash\n#SBATCH --time=5\n") and "echo hi" in submitted.stdout
    assert "--chdir=/work/alice/sl-forgery-jobs/job-" in submitted.stderr and "--cpus-per-task=3" in submitted.stderr

    jupyter = cli("jupyter", "--dry-run")
    assert jupyter.returncode == 0, jupyter.stderr
    assert "conda activate analysis" in jupyter.stdout and "--ServerApp.root_dir=/work/alice" in jupyter.stdout

    assert sorted(path for path in home.rglob("*") if "cache" not in path.relative_to(home).parts) == files_before
    assert not sl_forgery.history_path().exists()


def test_original_readme_flow_with_legacy_credentials_works_word_for_word(cluster, home, tmp_path, password_only_ssh):
    # The original README's example, with its paths moved under the test user's home and the password
    # login the legacy file implies.
    credentials = tmp_path / "server_credentials.yaml"
    credentials.write_text(
        f"username: {cluster.user}\npassword: {cluster.password}\nhost: {cluster.host}\n"
        f"storage_root: {cluster.home}/storage\nworking_root: {cluster.home}/work\n"
        "shared_directory_name: sun_data\n"
    )
    credentials.chmod(0o600)
    temp = f"{cluster.home}/temp-{uuid.uuid4().hex[:8]}"

    job = Job(
        job_name="data_integrity_verification",
        output_log=Path(f"{temp}/output.txt"),
        error_log=Path(f"{temp}/errors.txt"),
        working_directory=Path(f"{temp}/test_job"),
        conda_environment="test_environment",
        cpus_to_use=20,
        ram_gb=50,
        time_limit=20,
    )
    job.add_command(f"sl-verify-session -sp {temp}/test_session")

    server = Server(credentials_path=credentials)
    job = server.submit_job(job)

    from sl_forgery.server import JobStatus as OriginalJobStatus

    deadline = time.monotonic() + 180
    while server.get_job_status(int(job.job_id)) in (OriginalJobStatus.PENDING, OriginalJobStatus.RUNNING):
        assert time.monotonic() < deadline, f"job {job.job_id} still reads PENDING or RUNNING"
        time.sleep(0.5)
    final_status = server.get_job_status(int(job.job_id))
    assert final_status == OriginalJobStatus.COMPLETED
    assert server.read_file(f"{temp}/output.txt") == f"verified session {temp}/test_session with {SERVER_PYTHON}\n"
