"""What a job used of what it asked for (sacct, steps included) and notices when jobs end, on the real cluster."""

import json
import os
import re
import time
from pathlib import Path

import jsonschema
import pytest

import sl_forgery
from conftest import cli
from sl_forgery import JobStatus


def hold(megabytes: int, seconds: float) -> str:
    """A python3 -c program that touches this much memory and keeps a CPU busy for this long."""
    return (
        f"import time; a = bytearray({megabytes} << 20); a[::4096] = b'x' * len(a[::4096]); t = time.time()\n"
        f"while time.time() - t < {seconds}: pass"
    )


def settled_sacct(cluster, job_id: str, steps: int, deadline: float = 60) -> list[list[str]]:
    """Raw sacct rows of a job, read with plain ssh once sacct has recorded the end of the job and its steps."""
    end = time.monotonic() + deadline
    while True:
        output = cluster.ssh(f"sacct -n -P -j {job_id} -o JobID,State,Elapsed,TotalCPU,AllocCPUS,MaxRSS,ReqMem").stdout
        rows = [line.split("|") for line in output.splitlines() if line]
        if len(rows) >= steps + 1 and all(row[1] == "COMPLETED" for row in rows):
            return rows
        assert time.monotonic() < end, f"sacct did not record the end of job {job_id}: {output}"
        time.sleep(0.5)


def seconds(text: str) -> float:
    """sacct's MM:SS.mmm or HH:MM:SS (no days in these short jobs)."""
    total = 0.0
    for part in text.split(":"):
        total = total * 60 + float(part)
    return total


def test_report_matches_sacct_arithmetic_over_every_step(server, cluster, remote_dir):
    # Two srun steps and work in the batch step itself; the largest memory use is in the first srun step.
    # --acctg-freq=1: the cluster samples memory every 30 s by default, longer than these steps last.
    script = (
        "#!/bin/bash\n#SBATCH --cpus-per-task=2\n#SBATCH --mem=512M\n#SBATCH --time=5\n#SBATCH --acctg-freq=1\n"
        f'srun python3 -c "{hold(150, 3)}"\n'
        f'srun python3 -c "{hold(40, 2)}"\n'
        f'python3 -c "{hold(60, 2)}"\n'
    )
    job_id = server.submit_script(script, working_directory=remote_dir, job_name="report-steps")
    assert server.wait(job_id, timeout=120)[job_id].status is JobStatus.COMPLETED
    rows = settled_sacct(cluster, job_id, steps=3)

    job_row = next(row for row in rows if row[0] == job_id)
    step_rows = [row for row in rows if row[0].startswith(f"{job_id}.")]
    by_hand_cpu = sum(seconds(row[3]) for row in step_rows)
    by_hand_peak = max(int(row[5].removesuffix("K")) * 1024 for row in step_rows if row[5])
    by_hand_elapsed = seconds(job_row[2])

    usage = server.report(job_id)[job_id]
    assert usage.steps == len(step_rows) >= 3
    assert usage.total_cpu == pytest.approx(by_hand_cpu, abs=0.002)
    assert usage.total_cpu == pytest.approx(seconds(job_row[3]), abs=0.002)  # sacct's own total agrees
    assert usage.total_cpu > 5  # the srun steps' busy loops, not only the batch step's
    assert usage.peak_memory == by_hand_peak and usage.peak_memory > 150 << 20
    assert usage.requested_memory == 512 << 20 and usage.cpus == 2 == int(job_row[4])
    assert usage.elapsed == by_hand_elapsed and usage.time_limit == 300
    assert usage.cpu_efficiency == pytest.approx(by_hand_cpu / (by_hand_elapsed * 2))
    assert usage.memory_use == pytest.approx(by_hand_peak / (512 << 20))

    printed = cli("report", "--json", job_id)
    assert printed.returncode == 0, printed.stderr
    document = json.loads(printed.stdout)
    jsonschema.validate(document, sl_forgery.JSON_SCHEMAS["report"])
    assert document["jobs"] == [usage.to_json()]


def test_submit_wait_report_prints_what_the_job_used_and_a_suggestion(profile_name, tmp_path):
    script = tmp_path / "light.sh"
    script.write_text(f'#!/bin/bash\n#SBATCH --mem=2G\n#SBATCH --acctg-freq=1\npython3 -c "{hold(100, 3)}"\n')
    result = cli("submit", str(script), "--time", "5", "--wait", "--report")
    assert result.returncode == 0, result.stderr
    job_id, header, row, suggestion = result.stdout.splitlines()
    assert header.split()[:3] == ["JOBID", "STATE", "EXIT"]
    assert row.split()[:3] == [job_id, "COMPLETED", "0"]
    assert re.fullmatch(rf"{job_id}: asked 2 GB, used 1[0-9][0-9] MB: --mem 0\.2 would do", suggestion), suggestion


def test_report_of_an_unknown_job_is_one_line_and_exit_one(profile_name):
    result = cli("report", "999999")
    assert result.returncode == 1
    assert (
        result.stderr == "sl-forgery: error: job 999999 is unknown to sacct on 'test': check the id (a job just "
        "submitted appears within seconds)\n"
    )


@pytest.fixture
def fake_notify_send(tmp_path) -> tuple[dict, Path]:
    """A notify-send first on PATH that records its arguments: it stands in for the desktop."""
    bin_dir, calls = tmp_path / "fake-bin", tmp_path / "notify-send.calls"
    bin_dir.mkdir()
    fake = bin_dir / "notify-send"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" >> {calls}\n")
    fake.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, calls


def test_run_wait_notify_shows_the_jobs_end_on_the_desktop(profile_name, fake_notify_send):
    env, calls = fake_notify_send
    result = cli("run", "--mem", "0.25", "--wait", "--notify", "--", "sh", "-c", "exit 3", env=env)
    assert result.returncode == 3, result.stderr
    job_id = result.stdout.splitlines()[0]
    assert calls.read_text().splitlines() == [
        "--app-name=sl-forgery",
        "--",  # the end of options: a job's name is never read as one
        f"sl-forgery: job {job_id} FAILED",
        "sh on test, exit code 3",
    ]


def test_the_profiles_notify_default_and_no_notify(profile_name, fake_notify_send):
    env, calls = fake_notify_send
    config = sl_forgery.load_config()
    config.servers[profile_name].notify = True
    config.save()
    job_id = cli("run", "--mem", "0.25", "--", "true").stdout.strip()
    assert cli("wait", job_id, env=env).returncode == 0
    assert calls.read_text().splitlines()[1:3] == ["--", f"sl-forgery: job {job_id} COMPLETED"]
    calls.unlink()
    assert cli("wait", "--no-notify", job_id, env=env).returncode == 0
    assert not calls.exists()


def test_without_a_desktop_notifier_a_one_line_note_says_so(profile_name):
    path = os.pathsep.join(
        directory for directory in os.environ["PATH"].split(os.pathsep) if not Path(directory, "notify-send").exists()
    )
    result = cli("run", "--mem", "0.25", "--wait", "--notify", "--", "true", env={**os.environ, "PATH": path})
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.splitlines()[0]
    notes = [line for line in result.stderr.splitlines() if "note:" in line]
    assert notes == [
        "sl-forgery: note: no desktop notifier here (notify-send on Linux, osascript on macOS); "
        f"job {job_id} COMPLETED: true on test, exit code 0"
    ]


def test_on_end_runs_in_the_users_shell_once_per_job_with_its_end(profile_name, tmp_path):
    good = cli("run", "--mem", "0.25", "--", "true").stdout.strip()
    bad = cli("run", "--mem", "0.25", "--", "sh", "-c", "exit 3").stdout.strip()
    ends = tmp_path / "ends"
    # ${BASH_VERSION:+bash} tells that the command ran in the user's shell (bash here), not /bin/sh (dash).
    command = f'echo "$SL_FORGERY_JOB_ID $SL_FORGERY_STATE $SL_FORGERY_EXIT_CODE ${{BASH_VERSION:+bash}}" >> {ends}'
    result = cli("wait", "--on-end", command, good, bad, env={**os.environ, "SHELL": "/bin/bash"})
    assert result.returncode == 3, result.stderr
    assert sorted(ends.read_text().splitlines()) == sorted([f"{good} COMPLETED 0 bash", f"{bad} FAILED 3 bash"])


def test_end_actions_without_wait_are_refused_before_anything_is_submitted(profile_name):
    for flag in (["--notify"], ["--on-end", "true"], ["--report"], ["--timeout", "5"]):
        result = cli("run", "--mem", "0.25", *flag, "--", "true")
        assert result.returncode == 2
        assert result.stderr == f"sl-forgery: error: {flag[0]} acts while the job is followed to its end: add --wait\n"
    assert json.loads(cli("history", "--json").stdout)["jobs"] == []
