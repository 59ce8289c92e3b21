"""The test bed itself tells the truth: SLURM over SSH with key and password, exit codes, and the conda shim."""

import os
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import bed, console_script, variant


def _sacct_row(cluster, job_id: str, deadline: float = 30) -> str:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        row = cluster.ssh(f"sacct -X -n -P -o JobID,State,ExitCode -j {job_id}").stdout.strip()
        # For a moment after a job fails, sacct may read FAILED 0:0: its exit code has not reached the database.
        if (
            row
            and row.split("|")[1] not in ("PENDING", "RUNNING", "COMPLETING")
            and row.split("|")[1:] != ["FAILED", "0:0"]
        ):
            return row
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end within {deadline} s")


def test_slurm_commands_answer_over_ssh_with_a_key(cluster):
    # Whether the node is idle depends on other tests' jobs: that sinfo names it is what this test needs.
    assert "node1" in cluster.ssh("sinfo -h -o %N").stdout.split()
    job_id = cluster.ssh("sbatch --parsable --wrap 'exit 3'").stdout.strip()
    assert job_id.isdigit()
    # squeue keeps an ended job for minutes (MinJobAge), so a job just submitted is always listed.
    assert cluster.ssh(f"squeue -h --states=all -j {job_id} -o %i").stdout.strip() == job_id
    assert _sacct_row(cluster, job_id) == f"{job_id}|FAILED|3:0"


def test_password_login_through_askpass(cluster, tmp_path):
    helper = tmp_path / "askpass"
    helper.write_text(f"#!/bin/sh\ncat {cluster.password_file}\n")
    helper.chmod(0o700)
    env = {**os.environ, "SSH_ASKPASS": str(helper), "SSH_ASKPASS_REQUIRE": "force"}
    argv = [
        "setsid",
        "ssh",
        "-o",
        "PubkeyAuthentication=no",
        "-o",
        "NumberOfPasswordPrompts=1",
        "-o",
        f"UserKnownHostsFile={cluster.known_hosts}",
        "-p",
        str(cluster.port),
        "-l",
        cluster.user,
        cluster.host,
        "sinfo -h -o %P",
    ]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "debug" in result.stdout


def test_conda_shim_activates_in_a_batch_job_and_a_missing_env_fails_it(cluster):
    def submit(env: str) -> str:
        script = (
            f"#!/bin/bash\n#SBATCH --output=/dev/null\nset -e\n"
            f'eval "$(conda shell.bash hook)"\nconda activate {env}\n'
            f'test "$CONDA_DEFAULT_ENV" = {env}\nsl-verify-session -sp /x\n'
        )
        return cluster.ssh(f"sbatch --parsable <<'EOF'\n{script}EOF").stdout.strip()

    good, bad = submit("analysis"), submit("nope")
    assert _sacct_row(cluster, good) == f"{good}|COMPLETED|0:0"
    assert _sacct_row(cluster, bad) == f"{bad}|FAILED|1:0"


def test_help_and_version_from_the_installed_console_script():
    import sl_forgery

    version = subprocess.run([console_script("sl-forgery"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"sl-forgery {sl_forgery.__version__}"
    usage = subprocess.run([console_script("sl-forgery"), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0
    for word in ("submit", "wait", "status", "cancel", "logs", "exit codes:"):
        assert word in usage.stdout


# ---------------------------------------------------------------------------------------------------------------------
# The harsher set-ups of real sites: other login shells, a module system, venv and uv, and the variants a test
# switches on for itself.


def _ssh_as(cluster, user: str, command: str, *options: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-F", str(cluster.ssh_config), *options, "-l", user, "slfc", command],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_users_with_every_login_shell_log_in_with_the_same_key_and_reach_slurm(cluster):
    shells = dict(entry.split(":", 1)[::-1] for entry in bed()["SLF_CLUSTER_SHELL_USERS"].split(","))
    assert {os.path.basename(shell) for shell in shells} == {"bash", "tcsh", "zsh", "fish", "dash"}
    for shell, user in shells.items():
        # A command every shell parses the same way.
        result = _ssh_as(cluster, user, "echo $SHELL")
        assert result.returncode == 0, (user, result.stderr)
        assert result.stdout.splitlines()[-1] == shell
        assert "debug" in _ssh_as(cluster, user, "sinfo -h -o %P").stdout
    # tcsh really is the shell that runs the command: sh syntax fails there as on a real tcsh account.
    tcsh_user = shells["/usr/bin/tcsh"]
    assert _ssh_as(cluster, tcsh_user, "x=1; echo $x").returncode != 0
    # and its start-up file greets on stdout before every command, as on many sites.
    assert _ssh_as(cluster, tcsh_user, "true").stdout == f"Welcome to slfc, {tcsh_user}\n"


def test_the_module_user_gets_conda_and_uv_only_through_module_load_in_a_batch_job(cluster):
    facts = bed()
    user, module = facts["SLF_CLUSTER_MODULE_USER"], facts["SLF_CLUSTER_MODULE"]
    assert _ssh_as(cluster, user, "command -v conda || command -v uv").returncode != 0
    directory = f"{facts['SLF_CLUSTER_STATE']}/home/{user}/tests/{uuid.uuid4().hex[:8]}"
    script = (
        f"#!/bin/bash\n#SBATCH --output={directory}/out.txt\n#SBATCH --error={directory}/err.txt\nset -e\n"
        "command -v module || . /etc/profile.d/lmod.sh\n"
        f"module load {module}\n"
        'eval "$(conda shell.bash hook)"\nconda activate analysis\nsl-verify-session -sp /m\nuv --version\n'
    )
    submitted = _ssh_as(cluster, user, f"mkdir -p {directory} && sbatch --parsable <<'EOF'\n{script}EOF")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert _sacct_row(cluster, job_id) == f"{job_id}|COMPLETED|0:0"
    output = _ssh_as(cluster, user, f"cat {directory}/out.txt").stdout
    assert "verified session /m with Python 3" in output
    assert re.search(r"^uv \d+\.\d+", output, flags=re.MULTILINE)


def test_the_venv_and_the_uv_project_are_real_environments(cluster):
    facts = bed()
    venv, project = facts["SLF_CLUSTER_VENV"], facts["SLF_CLUSTER_UV_PROJECT"]
    prefix = "python -c 'import sys; print(sys.prefix)'"
    assert cluster.ssh(f". {venv}/bin/activate && {prefix}").stdout.strip() == venv
    in_project = cluster.ssh(f"uv run --project {project} --frozen -- {prefix}")
    assert in_project.stdout.strip() == f"{project}/.venv"
    missing = cluster.ssh(f"uv sync --project {project}-missing --frozen", check=False)
    assert missing.returncode != 0 and "does not exist" in missing.stderr


@pytest.mark.exclusive
def test_maxsessions_variant_refuses_a_second_session_over_one_connection(cluster, tmp_path):
    socket = tmp_path / "m.sock"
    mux = ["-o", f"ControlPath={socket}", "-o", "ProxyCommand=false"]
    with variant("maxsessions"):
        subprocess.run(
            ["ssh", "-F", str(cluster.ssh_config), "-o", "ControlMaster=yes", "-o", f"ControlPath={socket}",
             "-o", "ControlPersist=60", "-fN", "slfc-maxsessions"],
            check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
        )  # fmt: skip
        first = subprocess.Popen(
            ["ssh", "-F", str(cluster.ssh_config), *mux, "slfc-maxsessions", "echo started; sleep 30"],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            assert first.stdout.readline().strip() == "started"
            second = subprocess.run(
                ["ssh", "-F", str(cluster.ssh_config), *mux, "slfc-maxsessions", "echo second"],
                capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30,
            )  # fmt: skip
            assert second.returncode != 0 and "second" not in second.stdout
            assert "refused" in second.stderr
        finally:
            first.kill()
            first.wait()
            subprocess.run(["ssh", "-o", f"ControlPath={socket}", "-O", "exit", "x"], capture_output=True)
    # The main sshd still allows more than one session.
    assert "debug" in cluster.ssh("sinfo -h -o %P").stdout


def _askpass_script(path: Path, code_command: str, prompts: Path) -> Path:
    path.write_text(f'#!/bin/sh\nprintf "%s\\n" "$1" >> {prompts}\n{code_command}\n')
    path.chmod(0o700)
    return path


def unused_code_time(cluster, secret: str) -> int:
    """A time whose 30 s step has a code pam_oath will take: ahead of now, and after the step of the last code used
    (a run just before this one, of this suite or another, may have used the one for now + 60 s)."""
    fields = next(
        line.split()
        for line in (cluster.state / "otp" / "users.oath").read_text().splitlines()
        if line.split()[1:2] == [cluster.user]
    )
    now = int(time.time())
    moment = now + 60
    if len(fields) >= 6:  # pam_oath keeps the last code used
        for offset in range(-90, 121, 30):
            code = subprocess.run(
                ["oathtool", "--totp", "-N", f"@{now + offset}", secret], capture_output=True, text=True
            ).stdout.strip()
            if code == fields[5]:
                moment = max(moment, now + offset + 30)
    # pam_oath looks 3 steps ahead (window=3): a later step's code becomes valid as the clock moves on.
    while moment - time.time() > 85:
        assert moment - time.time() < 200, "the next unused code is too far ahead"
        time.sleep(0.5)
    return moment


@pytest.mark.exclusive
def test_otp_variant_asks_a_one_time_code_after_the_key_and_refuses_a_wrong_one(cluster, tmp_path):
    secret = Path(bed()["SLF_CLUSTER_OTP_SECRET_FILE"]).read_text().strip()
    prompts = tmp_path / "prompts"

    def login(code_command: str) -> subprocess.CompletedProcess:
        helper = _askpass_script(tmp_path / "askpass", code_command, prompts)
        env = {**os.environ, "SSH_ASKPASS": str(helper), "SSH_ASKPASS_REQUIRE": "force"}
        return subprocess.run(
            ["setsid", "ssh", "-F", str(cluster.ssh_config), "-o", "NumberOfPasswordPrompts=1", "slfc-otp",
             "echo logged-in"],
            capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, timeout=30,
        )  # fmt: skip

    with variant("otp"):
        wrong = login("echo 000000")
        assert wrong.returncode == 255 and "Permission denied (keyboard-interactive)" in wrong.stderr
        # A code is accepted once; a code of a later 30 s step is valid already.
        right = login(f"oathtool --totp -N @{unused_code_time(cluster, secret)} {secret}")
        assert right.returncode == 0, right.stderr
        assert right.stdout.strip() == "logged-in"
    assert all("One-time password" in line for line in prompts.read_text().splitlines())


@pytest.mark.exclusive
def test_no_accounting_variant_turns_sacct_off_while_squeue_and_jobs_go_on(cluster):
    with variant("no-accounting"):
        refused = cluster.ssh("sacct -n -X -S now", check=False)
        assert refused.returncode != 0 and "accounting storage is disabled" in refused.stderr
        job_id = cluster.ssh("sbatch --parsable --wrap 'exit 3'").stdout.strip()
        deadline = time.monotonic() + 60
        while (state := cluster.ssh(f"squeue -h --states=all -j {job_id} -o %T").stdout.strip()) != "FAILED":
            assert time.monotonic() < deadline, f"job {job_id} is {state}, not FAILED"
            time.sleep(0.2)
    assert cluster.ssh("sacct -n -X -S now", check=False).returncode == 0


@pytest.mark.exclusive
def test_sacct_hangs_variant_leaves_sacct_without_an_answer(cluster):
    with variant("sacct-hangs"):
        hung = cluster.ssh("timeout 5 sacct -n -X -S now", check=False)
        assert hung.returncode == 124
        assert cluster.ssh("sbatch --parsable --wrap true").stdout.strip().isdigit()
    assert cluster.ssh("timeout 20 sacct -n -X -S now", check=False).returncode == 0


@pytest.mark.exclusive
def test_short_job_age_variant_makes_squeue_forget_an_ended_job(cluster, unique_name):
    with variant("short-job-age"):
        job_id = cluster.ssh(f"sbatch --parsable -J {unique_name} -o /dev/null --wrap true").stdout.strip()
        # slurmctld purges ended jobs older than MinJobAge once a minute.
        deadline = time.monotonic() + 180
        while (state := cluster.job_state(job_id)) != "":
            assert time.monotonic() < deadline, f"squeue still lists job {job_id} ({state})"
            time.sleep(0.5)
    assert re.search(r"^MinJobAge += 300 sec$", cluster.ssh("scontrol show config").stdout, re.MULTILINE)
