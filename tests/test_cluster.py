"""The test bed itself tells the truth: SLURM over SSH with key and password, exit codes, and the conda shim."""

import os
import subprocess
import time

from conftest import console_script


def _sacct_row(cluster, job_id: str, deadline: float = 30) -> str:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        row = cluster.ssh(f"sacct -X -n -P -o JobID,State,ExitCode -j {job_id}").stdout.strip()
        if row and row.split("|")[1] not in ("PENDING", "RUNNING", "COMPLETING"):
            return row
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end within {deadline} s")


def test_slurm_commands_answer_over_ssh_with_a_key(cluster):
    assert "idle" in cluster.ssh("sinfo -h -o %T").stdout
    job_id = cluster.ssh("sbatch --parsable --wrap 'exit 3'").stdout.strip()
    assert job_id.isdigit()
    assert cluster.ssh(f"squeue -h --states=all -j {job_id} -o %i").stdout.strip() in (job_id, "")
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
