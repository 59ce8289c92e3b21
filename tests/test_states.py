"""States on the real cluster that must never be wrong: kills, requeues, arrays, heterogeneous jobs, jobs that can
never start and a controller too busy to answer."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import cli, variant
from sl_forgery import Job, JobCannotStart, JobStatus, WaitTimeout


def make_job(remote_dir: str, name: str = "job", cpus: int = 1) -> Job:
    return Job(name, f"{remote_dir}/out.txt", f"{remote_dir}/err.txt", remote_dir, cpus_to_use=cpus, ram_gb=0.25)


def as_root(cluster, *argv: str) -> subprocess.CompletedProcess:
    """A SLURM command run as root here (the test bed is root's), for faults a user cannot cause."""
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env={**os.environ, "SLURM_CONF": cluster.slurm_conf}
    )


def remote_file(cluster, path: str, deadline: float = 60) -> str:
    """The text of a file on the server once it exists."""
    end = time.monotonic() + deadline
    while True:
        result = cluster.ssh(f"cat {path}", check=False)
        if result.returncode == 0 or time.monotonic() > end:
            return result.stdout
        time.sleep(0.2)


def held_jobs(cluster, remote_dir: str, sbatch_args: str, count: int = 1) -> list[str]:
    """Jobs submitted held (they stay PENDING until released or cancelled) straight with sbatch."""
    submit = f"sbatch -H --parsable {sbatch_args}"
    return cluster.ssh(
        f"mkdir -p {remote_dir} && cd {remote_dir} && for i in $(seq {count}); do {submit}; done", timeout=300
    ).stdout.split()


def test_a_cancelled_running_jobs_record_says_which_signal_ended_it(server, cluster, remote_dir):
    job = make_job(remote_dir)
    job.add_command("sleep 300")
    server.submit_job(job)
    assert cluster.wait_for_state(job.job_id, {"RUNNING"}) == "RUNNING"
    server.cancel(job.job_id)
    record = remote_file(cluster, f"{remote_dir}/.sl-forgery/{job.job_id}.exit")
    assert record.split() == ["signal", "15", job.job_id, job.submission_nonce]
    assert server.wait(job.job_id, timeout=60)[job.job_id].status is JobStatus.CANCELLED


def test_an_old_record_in_a_reused_directory_is_not_the_new_jobs_end(server, cluster, remote_dir):
    first = make_job(remote_dir, "first")
    first.add_command("true")
    server.submit_job(first)
    assert server.wait(first.job_id, timeout=60)[first.job_id].status is JobStatus.COMPLETED
    second = make_job(remote_dir, "second")
    second.add_command("sleep 300")
    server.submit_job(second)
    # As after a controller reset that hands out ids again: the old job's record under the new job's id.
    cluster.ssh(f"cp {remote_dir}/.sl-forgery/{first.job_id}.exit {remote_dir}/.sl-forgery/{second.job_id}.exit")
    assert cluster.wait_for_state(second.job_id, {"RUNNING"}) == "RUNNING"
    try:
        assert server.job_info(second.job_id)[second.job_id].status is JobStatus.RUNNING
        with pytest.raises(WaitTimeout):
            server.wait(second.job_id, timeout=3)
    finally:
        server.cancel(second.job_id)


def test_a_requeued_job_reads_pending_not_ended(server, cluster, remote_dir):
    job = make_job(remote_dir)
    job.add_command("sleep 300")
    server.submit_job(job)
    assert cluster.wait_for_state(job.job_id, {"RUNNING"}) == "RUNNING"
    try:
        requeue = as_root(cluster, "scontrol", "requeue", job.job_id)
        assert requeue.returncode == 0, requeue.stderr
        # The first run's end reaches its record and sacct; squeue shows the job waiting to run again.
        remote_file(cluster, f"{remote_dir}/.sl-forgery/{job.job_id}.exit")
        assert cluster.wait_for_state(job.job_id, {"PENDING"}) == "PENDING"
        info = server.job_info(job.job_id)[job.job_id]
        assert info.status is JobStatus.PENDING and not info.ended
    finally:
        server.cancel(job.job_id)


def test_a_finished_job_requeued_reads_pending_and_wait_sees_its_second_end(server, cluster, profile_name, remote_dir):
    job = make_job(remote_dir)
    job.add_command(f"echo run >> {remote_dir}/runs")
    server.submit_job(job)
    # The first end, as a wait learns it: an answer later waits share for a few seconds (see the next wait below).
    assert server.wait(job.job_id, timeout=120)[job.job_id].status is JobStatus.COMPLETED
    ended = cli("status", "--json", job.job_id)
    assert json.loads(ended.stdout)["jobs"][0]["state"] == "COMPLETED", ended.stderr
    # The controller still holds the finished job (squeue lists it), so it can send it back to the queue.
    requeue = as_root(cluster, "scontrol", "requeue", job.job_id)
    assert requeue.returncode == 0, requeue.stderr
    try:
        # SLURM holds a requeued job back for a while (reason BeginTime): both views must say it will run again.
        again = json.loads(cli("status", "--json", job.job_id).stdout)["jobs"][0]
        assert (again["state"], again["finished"]) in {("PENDING", False), ("REQUEUED", False), ("RUNNING", False)}
        assert not server.job_info(job.job_id)[job.job_id].ended
        # A new wait asks anew rather than take the end the first wait saw moments ago: the job is held back.
        held = cli("wait", "--timeout", "3", job.job_id)
        assert held.returncode == 124, (held.returncode, held.stdout, held.stderr)
        release = as_root(cluster, "scontrol", "update", f"JobId={job.job_id}", "StartTime=now")
        assert release.returncode == 0, release.stderr
        waited = cli("wait", "--json", job.job_id, timeout=300)
        assert waited.returncode == 0, waited.stderr
        assert json.loads(waited.stdout)["jobs"][0]["state"] == "COMPLETED"
        assert remote_file(cluster, f"{remote_dir}/runs").split() == ["run", "run"]
        assert server.wait(job.job_id, timeout=60)[job.job_id].status is JobStatus.COMPLETED
    finally:
        server.cancel(job.job_id)


@pytest.mark.exclusive
def test_a_job_preempted_and_requeued_never_reads_ended_while_its_epilog_runs(
    server, cluster, remote_dir, unique_name, slow_epilog
):
    with variant("preemption"):
        job = make_job(remote_dir, unique_name, cpus=32)  # the whole node: an urgent job must preempt it
        job.add_command("sleep 300")
        server.submit_job(job)
        try:
            assert cluster.wait_for_state(job.job_id, {"RUNNING"}) == "RUNNING"
            cluster.ssh(f"sbatch --parsable -p urgent -c 32 --mem=64M -J {unique_name} -o /dev/null --wrap 'sleep 1'")
            # While the epilog runs squeue says COMPLETING and sacct PREEMPTED; then squeue shows it waiting again.
            seen = []
            deadline = time.monotonic() + 120
            while cluster.job_state(job.job_id) != "PENDING":
                info = server.job_info(job.job_id)[job.job_id]
                seen.append(info.status)
                assert not info.ended, seen
                assert time.monotonic() < deadline, seen
            assert JobStatus.COMPLETING in seen
            assert server.job_info(job.job_id)[job.job_id].status is JobStatus.PENDING
            with pytest.raises(WaitTimeout):
                server.wait(job.job_id, timeout=3)
        finally:
            server.cancel(job.job_id)


def test_a_task_of_a_pending_array_and_a_heterogeneous_job_are_known_by_their_own_ids(server, cluster, remote_dir):
    (array,) = held_jobs(cluster, remote_dir, "-a 1-5 -o /dev/null --wrap true")
    components = "#!/bin/sh\\n#SBATCH -o /dev/null\\n#SBATCH hetjob\\n#SBATCH -o /dev/null\\ntrue\\n"
    hetero = cluster.ssh(f"cd {remote_dir} && printf '{components}' | sbatch -H --parsable").stdout.strip()
    try:
        infos = server.job_info([f"{array}_4", array, f"{hetero}+1", f"000{hetero}"])
        assert list(infos) == [f"{array}_4", array, f"{hetero}+1", hetero]
        assert {info.status for info in infos.values()} == {JobStatus.PENDING}
        with pytest.raises(WaitTimeout):
            server.wait(f"{array}_4", timeout=2)
    finally:
        cluster.ssh(f"scancel {array} {hetero}")


def test_a_thousand_jobs_and_a_1001_task_array_are_asked_about_in_one_round_trip(server, cluster, remote_dir):
    jobs = held_jobs(cluster, remote_dir, "-o /dev/null --wrap true", count=1000)
    (array,) = held_jobs(cluster, remote_dir, "-a 0-1000 -o /dev/null --wrap true")
    try:
        tasks = [f"{array}_{task}" for task in range(1001)]
        before = server.scheduler_queries
        infos = server.job_info([*jobs, *tasks])
        assert server.scheduler_queries == before + 1
        assert len(infos) == 2001 and {info.status for info in infos.values()} == {JobStatus.PENDING}
    finally:
        cluster.ssh(f"scancel {' '.join(jobs)} {array}", timeout=120)


def test_wait_ends_for_a_job_that_can_never_start_and_cancels_it_when_asked(server, cluster, profile_name, remote_dir):
    job = make_job(remote_dir, cpus=64)  # more than any node of the partition has: PartitionConfig
    job.add_command("true")
    server.submit_job(job)
    try:
        with pytest.raises(JobCannotStart, match="PartitionConfig"):
            server.wait(job.job_id, poll_first=1, poll_max=1)
        assert cluster.job_state(job.job_id) == "PENDING"
    finally:
        server.cancel(job.job_id)
    waited = cli("run", "--cpus", "64", "--mem", "0.25", "--wait", "--cancel-impossible", "--", "true")
    assert waited.returncode == 78, waited.stderr
    assert "PartitionConfig" in waited.stderr and "cancelled" in waited.stderr
    job_id = waited.stdout.split()[0]
    assert cluster.wait_for_state(job_id, {"CANCELLED"}) == "CANCELLED"


@pytest.mark.exclusive
def test_wait_rides_out_a_controller_that_does_not_answer(server, cluster, remote_dir):
    job = make_job(remote_dir)
    job.add_command("sleep 15")
    server.submit_job(job)
    assert cluster.wait_for_state(job.job_id, {"RUNNING"}) == "RUNNING"
    outcome = {}

    def wait() -> None:
        try:
            outcome["infos"] = server.wait(job.job_id, poll_first=1, poll_max=1)
        except Exception as problem:  # the test reports it below
            outcome["error"] = problem

    waiter = threading.Thread(target=wait, daemon=True)
    controller = int((cluster.state / "run" / "slurmctld.pid").read_text())
    os.kill(controller, signal.SIGSTOP)
    try:
        waiter.start()
        deadline = time.monotonic() + 120
        while server.scheduler_failures == 0 and "error" not in outcome and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.kill(controller, signal.SIGCONT)
    waiter.join(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    assert server.scheduler_failures >= 1
    final = outcome["infos"][job.job_id]
    assert (final.status, final.exit_code) == (JobStatus.COMPLETED, 0)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def newest_process(pattern: str, deadline: float = 30) -> int:
    """The pid of the newest process whose command line matches, once there is one."""
    end = time.monotonic() + deadline
    while True:
        found = subprocess.run(["pgrep", "-n", "-f", pattern], capture_output=True, text=True).stdout.split()
        if found or time.monotonic() > end:
            assert found, f"no process matches {pattern!r}"
            return int(found[0])
        time.sleep(0.05)


@pytest.mark.exclusive
def test_a_connection_lost_while_sbatch_runs_leaves_exactly_one_job(server, cluster, remote_dir, unique_name):
    job = make_job(remote_dir, unique_name)
    job.add_command("true")
    outcome = {}

    def submit() -> None:
        try:
            outcome["job_id"] = server.submit_job(job).job_id
        except Exception as problem:  # the test reports it below
            outcome["error"] = problem

    submitting = threading.Thread(target=submit, daemon=True)
    controller = int((cluster.state / "run" / "slurmctld.pid").read_text())
    os.kill(controller, signal.SIGSTOP)  # sbatch now waits for the controller's answer
    try:
        submitting.start()
        session = parent_of(newest_process(f"sbatch --parsable .*{remote_dir}"))
        while "sshd" not in Path(f"/proc/{session}/comm").read_text():
            session = parent_of(session)
        os.kill(session, signal.SIGKILL)  # the connection drops before the id comes back
    finally:
        os.kill(controller, signal.SIGCONT)
    submitting.join(timeout=180)
    assert "error" not in outcome, outcome.get("error")
    named = cluster.ssh(f"squeue -h --states=all --name={unique_name} -o %i").stdout.split()
    assert named == [outcome["job_id"]]
    assert server.wait(job.job_id, timeout=60)[job.job_id].status is JobStatus.COMPLETED


def test_cancel_from_this_machine_ends_a_wait_on_a_pending_job_at_once(server, cluster, profile_name, remote_dir):
    job = Job(
        "later", f"{remote_dir}/o", f"{remote_dir}/e", remote_dir, ram_gb=0.25, sbatch_options=["--begin=now+3600"]
    )
    job.add_command("true")
    server.submit_job(job)
    outcome = {}
    # The scheduler is asked when the wait starts and then not for an hour: only the cancel can end it sooner.
    waiting = threading.Thread(target=lambda: outcome.update(server.wait(job.job_id, poll_first=3600)), daemon=True)
    waiting.start()
    try:
        deadline = time.monotonic() + 60
        while server.scheduler_queries == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        cancelled = cli("cancel", job.job_id)
        assert cancelled.returncode == 0, cancelled.stderr
        waiting.join(timeout=60)
    finally:
        server.cancel(job.job_id)
    assert not waiting.is_alive()
    assert outcome[job.job_id].status is JobStatus.CANCELLED


def test_waits_of_one_server_share_the_scheduler_answers_and_see_a_cancel_from_elsewhere(
    profile_name, cluster, remote_dir
):
    import sl_forgery

    jobs = held_jobs(cluster, remote_dir, "-o /dev/null --mem=64M --wrap true", count=5)
    servers = [sl_forgery.Server.from_profile(profile_name) for _ in jobs]
    outcomes: dict[str, object] = {}

    def wait(server, job_id: str) -> None:
        try:
            outcomes[job_id] = server.wait(job_id, timeout=300)[job_id]
        except Exception as problem:  # the test reports it below
            outcomes[job_id] = problem

    waits = [threading.Thread(target=wait, args=pair, daemon=True) for pair in zip(servers, jobs, strict=True)]
    started = time.monotonic()
    for waiting in waits:
        waiting.start()
    try:
        time.sleep(25)  # the span over which the waits' scheduler queries are counted
        cluster.ssh(f"scancel {' '.join(jobs)}")  # behind the waits' backs: no record, no notice tells them
        for waiting in waits:
            waiting.join(timeout=60)
    finally:
        cluster.ssh(f"scancel {' '.join(jobs)}", check=False)
    elapsed = time.monotonic() - started
    assert {job_id: getattr(outcomes.get(job_id), "status", outcomes.get(job_id)) for job_id in jobs} == dict.fromkeys(
        jobs, JobStatus.CANCELLED
    )
    # Each wait asks once when it starts; after that the five together ask once per 10 s, not five times.
    queries = sum(server.scheduler_queries for server in servers)
    assert queries <= len(jobs) + elapsed / 10 + 2, (queries, elapsed)


def forgotten_by_squeue(cluster, job_ids: list[str], deadline: float = 300) -> None:
    """Return once squeue lists none of the jobs (the short-job-age variant purges ended jobs once a minute)."""
    end = time.monotonic() + deadline
    while listed := [job_id for job_id in job_ids if cluster.job_state(job_id)]:
        assert time.monotonic() < end, f"squeue still lists jobs {listed}"
        time.sleep(0.5)


@pytest.mark.exclusive
def test_status_of_a_job_squeue_has_forgotten_makes_no_round_trip_and_logs_n_0_prints_nothing(profile_name, cluster):
    with variant("short-job-age"):
        job_id = cli("run", "--mem", "0.25", "--wait", "--", "printf", "one\\ntwo\\n").stdout.split()[0]
        forgotten_by_squeue(cluster, [job_id])
        first = cli("-v", "status", "--json", job_id)
        assert json.loads(first.stdout)["jobs"][0]["state"] == "COMPLETED"
        again = cli("-v", "status", "--json", job_id)
        assert json.loads(again.stdout) == json.loads(first.stdout)
        assert "+ ssh" not in again.stderr, again.stderr
    assert cli("logs", job_id, "-n", "0").stdout == ""
    assert cli("logs", job_id, "-n", "1").stdout == "two\n"


@pytest.mark.exclusive
def test_without_accounting_a_forgotten_job_reads_its_record_and_a_killed_or_never_run_one_is_never_completed(
    server, cluster, remote_dir, unique_name
):
    def submit(command: str, **options) -> str:
        job = Job(unique_name, f"{remote_dir}/o-%j", f"{remote_dir}/e-%j", remote_dir, ram_gb=0.25, **options)
        job.add_command(command)
        return server.submit_job(job).job_id

    with variant("no-accounting"), variant("short-job-age"):
        completed = submit("true")
        cancelled = submit("sleep 300")
        timed_out = submit("sleep 300", time_limit=1)
        never_ran = submit("true", sbatch_options=["--begin=now+3600"])
        assert cluster.wait_for_state(cancelled, {"RUNNING"}) == "RUNNING"
        server.cancel([cancelled, never_ran])
        # SLURM ends a job at its time limit only 80 s or so after submission: wait for its record to say so.
        for job_id in (cancelled, timed_out):
            assert remote_file(cluster, f"{remote_dir}/.sl-forgery/{job_id}.exit", deadline=300).split()[:2] == [
                "signal",
                "15",
            ]
        forgotten_by_squeue(cluster, [completed, cancelled, timed_out, never_ran])
        # Nothing but the exit records is left to tell how each job ended.
        waited = cli("wait", "--json", completed, cancelled, timed_out)
        assert waited.returncode == 1, waited.stderr
        ends = {job["job_id"]: job for job in json.loads(waited.stdout)["jobs"]}
        assert (ends[completed]["state"], ends[completed]["exit_code"]) == ("COMPLETED", 0)
        for job_id in (cancelled, timed_out):
            assert (ends[job_id]["state"], ends[job_id]["signal"], ends[job_id]["finished"]) == ("UNKNOWN", 15, True)
        assert cli("wait", completed).returncode == 0
        # A job cancelled before it ran left no record: nothing knows it, and wait says so instead of waiting on.
        lost = cli("wait", never_ran)
        assert lost.returncode == 1 and "Traceback" not in lost.stderr, lost.stderr
        assert lost.stderr.strip().splitlines()[-1].startswith(f"sl-forgery: error: job {never_ran} is unknown")
        statuses = cli("status", "--json", completed, cancelled, timed_out, never_ran)
        assert statuses.returncode == 0, statuses.stderr
        states = {
            job["job_id"]: (job["state"], job["exit_code"], job["signal"])
            for job in json.loads(statuses.stdout)["jobs"]
        }
        assert states == {
            completed: ("COMPLETED", 0, 0),
            cancelled: ("UNKNOWN", None, 15),
            timed_out: ("UNKNOWN", None, 15),
            never_ran: ("UNKNOWN", None, None),
        }


def test_an_unchanged_servers_file_is_not_parsed_again_and_a_changed_one_is(profile_name, home):
    import sl_forgery

    def server_list() -> subprocess.CompletedProcess:
        argv = [sys.executable, "-X", "importtime", "-c", "import sl_forgery, sys; sys.exit(sl_forgery.main())"]
        return subprocess.run([*argv, "server", "list", "--json"], capture_output=True, text=True, timeout=60)

    server_list()
    unchanged = server_list()
    assert json.loads(unchanged.stdout)["default"] == profile_name
    assert " yaml" not in unchanged.stderr
    path = sl_forgery.config_path()
    path.write_text(path.read_text().replace(f"default: {profile_name}", "default: null"))
    changed = server_list()
    assert json.loads(changed.stdout)["default"] is None and " yaml" in changed.stderr
