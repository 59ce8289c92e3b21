"""The command line in-process, through `main(argv)` (no subprocess per case), for the paths that need no cluster;
and the pure pieces one request goes through: the table of sbatch options, the #SBATCH reader, the submission plan
and the wait schedule. The last test checks on the real cluster that a dry run shows exactly what is sent."""

from __future__ import annotations

import re
import shlex
import uuid
from pathlib import Path

import pytest

import sl_forgery
from sl_forgery import SBATCH_OPTIONS, Job, UsageError, WaitProgress, WaitSchedule, main


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def lab(home):
    """A profile on a closed port: anything that tried to connect would fail the command."""
    config = sl_forgery.Config(sl_forgery.config_path())
    config.servers["lab"] = sl_forgery.Profile(
        name="lab", host="127.0.0.1", port=1, user="alice", working_root="/work", partition="short", account="acct"
    )
    config.default = "lab"
    config.save()
    return "lab"


# -- the one table of sbatch options ------------------------------------------------------------------------------


def test_every_resource_flag_of_the_table_is_on_run_and_submit(capsys):
    for command in ("run", "submit"):
        code, out, _ = run_main(capsys, command, "--help")
        assert code == 0
        for option in SBATCH_OPTIONS:
            if option.flag:
                assert f"{option.flag} " in out, f"{command} lacks {option.flag}"


def test_the_header_holds_each_job_field_under_its_sbatch_name():
    job = Job("fit", "/w/o", "/w/e", "/w", cpus_to_use=3, ram_gb=1.5, time_limit=7, qos="hi", nodes=2, array="1-3")
    header = sl_forgery.render_sbatch_header(job)
    assert header == [
        "#SBATCH --job-name=fit",
        "#SBATCH --output=/w/o",
        "#SBATCH --error=/w/e",
        "#SBATCH --chdir=/w",
        "#SBATCH --cpus-per-task=3",
        "#SBATCH --mem=1536M",
        "#SBATCH --time=7",
        "#SBATCH --qos=hi",
        "#SBATCH --nodes=2",
        "#SBATCH --array=1-3",
    ]
    # The reader gives back what the renderer wrote.
    directives = sl_forgery.read_sbatch_directives(job.script)
    assert directives["cpus-per-task"] == "3" and directives["chdir"] == "/w" and directives["array"] == "1-3"


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ("--outp=/tmp/x", "--outp (--output) is set by a Job argument"),
        ("--job=x", "--job (--job-name) is set by a Job argument"),
        ("--chd=/", "--chd (--chdir) is set by a Job argument"),
        ("--parsa", "--parsa (--parsable) is set by sl-forgery itself"),
        ("--clusters=other", "--clusters is set by sl-forgery itself"),
        ("--ntasks-per", "is ambiguous"),
        ("--frobnicate=1", "is not an sbatch option"),
    ],
)
def test_extra_options_cannot_set_a_managed_option_through_an_abbreviation(extra, fragment):
    with pytest.raises(UsageError) as error:
        Job("j", "/o", "/e", "/w", sbatch_options=[extra])
    assert fragment in str(error.value)


def test_extra_options_are_written_by_their_full_name():
    job = Job("j", "/o", "/e", "/w", sbatch_options=["--constr=gpu", "--exclusive"])
    assert job.sbatch_options == ["--constraint=gpu", "--exclusive"]


def test_a_value_with_any_blank_stays_one_value_on_its_sbatch_line():
    job = Job("a\tb\x0bc\x0cd", "/o", "/e", "/w")
    line = sl_forgery.render_sbatch_header(job)[0]
    assert sl_forgery.read_sbatch_directives(f"#!/bin/sh\n{line}\n")["job-name"] == "a\tb\x0bc\x0cd"


# -- reading a script's #SBATCH lines as sbatch does ---------------------------------------------------------------


def test_directives_are_read_past_blank_lines_and_comments_up_to_the_first_command():
    script = (
        "#!/bin/bash\n\n# analysis of s1\n#SBATCH -J fit -o /l/%j.out\n\n#SBATCH --array=1-4\necho\n#SBATCH -p late\n"
    )
    assert sl_forgery.read_sbatch_directives(script) == {"job-name": "fit", "output": "/l/%j.out", "array": "1-4"}


def test_a_script_that_picks_another_cluster_is_refused(lab, capsys, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH -M other\necho hi\n")
    code, out, err = run_main(capsys, "submit", "--dry-run", str(script))
    assert code == 2 and out == ""
    assert "(-M/--clusters) is not supported" in err and err.count("\n") == 1


# -- dry runs, in-process ------------------------------------------------------------------------------------------


def test_run_dry_run_applies_flags_over_the_profile_and_connects_to_nothing(lab, capsys):
    code, out, err = run_main(capsys, "run", "--dry-run", "--cpus", "3", "--account", "mine", "--", "echo", "hi")
    assert code == 0, err
    assert "#SBATCH --cpus-per-task=3\n" in out and "#SBATCH --partition=short\n" in out
    assert "#SBATCH --account=mine\n" in out and "acct" not in out
    assert "#SBATCH --chdir=/work/alice/sl-forgery-jobs/echo-" in out
    assert "on alice@127.0.0.1:1" in err


def test_submit_dry_run_keeps_the_scripts_own_partition_and_directory(lab, capsys, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --partition=long\n#SBATCH --chdir=/data/run1\necho hi\n")
    code, out, err = run_main(capsys, "submit", "--dry-run", str(script))
    assert code == 0, err
    command = err.split("# and run there: ", 1)[1].strip()
    argv = shlex.split(command)
    assert "--chdir=/data/run1" in argv and "--account=acct" in argv
    assert not any(arg.startswith("--partition") for arg in argv), "the profile's partition overrode the script's"
    assert argv[-1].startswith("/data/run1/.sl-forgery/job-")


def test_submit_dry_run_gives_the_profiles_partition_to_a_script_without_one(lab, capsys, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\necho hi\n")
    code, _, err = run_main(capsys, "submit", "--dry-run", "--partition", "long", str(script))
    assert code == 0, err
    argv = shlex.split(err.split("# and run there: ", 1)[1])
    assert "--partition=long" in argv and "--partition=short" not in argv and "--job-name=job" in argv


def test_jupyter_dry_run_uses_the_jupyter_defaults_once(lab, capsys):
    code, out, err = run_main(capsys, "jupyter", "--dry-run", "--env", "analysis")
    assert code == 0, err
    defaults = sl_forgery.JUPYTER_DEFAULTS
    assert f"#SBATCH --cpus-per-task={defaults['cpus_to_use']}\n" in out
    assert f"#SBATCH --time={defaults['time_limit']}\n" in out and "--ServerApp.root_dir=/work/alice" in out


def test_a_profile_with_a_working_root_and_no_user_keeps_jobs_under_it(home, capsys):
    config = sl_forgery.Config(sl_forgery.config_path())
    config.servers["lab"] = sl_forgery.Profile(name="lab", host="127.0.0.1", port=1, working_root="/scratch")
    config.default = "lab"
    config.save()
    code, out, err = run_main(capsys, "run", "--dry-run", "--", "true")
    assert code == 0, err
    assert "#SBATCH --chdir=/scratch/sl-forgery-jobs/true-" in out
    code, out, err = run_main(capsys, "jupyter", "--dry-run", "--env", "e")
    assert code == 0, err
    assert "--ServerApp.root_dir=/scratch" in out


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["run", "--dry-run", "--cpus", "0", "--", "true"], "--cpus must be at least 1"),
        (["run", "--dry-run", "--mem", "inf", "--", "true"], "--mem must be a positive number of gigabytes"),
        (["run", "--dry-run", "--mem", "nan", "--", "true"], "--mem must be a positive number of gigabytes"),
        (["run", "--dry-run", "--time", "-5", "--", "true"], "--time (minutes) must be at least 1"),
        (["run", "--dry-run", "--"], "no command given"),
        (["jupyter", "--dry-run", "--cpus", "0", "--env", "e"], "--cpus must be at least 1"),
        (["status", "12x"], "is not a SLURM job id"),
    ],
)
def test_bad_values_are_one_line_usage_errors(lab, capsys, argv, fragment):
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and out == ""
    assert fragment in err and err.count("\n") == 1 and err.startswith("sl-forgery: error: ")


def test_version_and_help_exit_zero(capsys):
    assert run_main(capsys, "--version")[0] == 0
    code, out, _ = run_main(capsys, "--help")
    assert code == 0 and "exit codes:" in out


# -- the submission plan --------------------------------------------------------------------------------------------


def test_the_plan_of_a_job_is_its_script_written_in_its_directory_and_submitted_as_is():
    job = Job("fit", "/w/logs/o.txt", "/w/logs/%j.err", "/w", array="1-2")
    plan = sl_forgery.plan_job(job, "lab", "alice")
    assert plan.script == job.script
    assert plan.script_path.startswith("/w/.sl-forgery/fit-") and plan.script_path.endswith(".sh")
    assert plan.directories == ("/w/.sl-forgery", "/w/logs")
    assert plan.sbatch_argv == ("sbatch", "--parsable", plan.script_path)
    assert plan.record.task_ids == ["_1", "_2"] and plan.record.server == "lab"


def test_the_submit_command_carries_the_script_byte_for_byte_even_with_its_delimiter_inside():
    job = Job("fit", "/w/o", "/w/e", "/w")
    job.add_command("SLF_END")
    command = sl_forgery.submit_command(sl_forgery.plan_job(job))
    assert "<<'SLF_END_1'\n" + job.script + "SLF_END_1\n" in command


@pytest.fixture
def open_directory():
    """A directory an unprivileged user can reach and write (pytest's own are private to root)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="slf-submit-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def test_the_submit_command_refuses_a_directory_it_cannot_write_and_removes_what_it_made(open_directory):
    """The remote half of a submission, run by a real sh as an unprivileged user, with sbatch replaced by echo."""
    import subprocess

    base = open_directory
    readonly = base / "readonly"
    readonly.mkdir(mode=0o555)
    plan = sl_forgery.plan_submission(
        "#!/bin/bash\necho ')'\n",
        name="j",
        working_directory=f"{base}/new/work",
        output_log=f"{base}/new/work/out.txt",
        error_log=f"{readonly}/err.txt",
    )._replace(sbatch_argv=("echo", "4242"))

    def submit(plan: sl_forgery.SubmissionPlan) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["runuser", "-u", "nobody", "--", "/bin/sh", "-s"],
            input=sl_forgery.submit_command(plan),
            capture_output=True,
            text=True,
            timeout=30,
        )

    refused = submit(plan)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr == f"cannot write in {readonly}: Permission denied\n"
    assert sorted(path.name for path in base.iterdir()) == ["readonly"]
    # /dev/null takes writes though its directory takes no file: a log sent there is fine.
    accepted_directories = tuple(d for d in plan.directories if d != str(readonly))
    to_dev_null = plan.record._replace(error_log="/dev/null")
    accepted = submit(plan._replace(directories=(*accepted_directories, "/dev"), record=to_dev_null))
    assert accepted.returncode == 0 and accepted.stdout == "4242\n@@ 0\n", accepted.stderr
    records = base / "new" / "work" / ".sl-forgery"
    assert sorted(path.name for path in records.iterdir()) == sorted(
        [Path(plan.script_path).name, Path(plan.script_path).name + ".submitted"]
    )
    assert Path(plan.script_path).read_text() == plan.script
    # sbatch refuses a second job in the same, existing directories: its exit code, and only its script goes.
    again = plan._replace(script_path=f"{records}/other.sh", sbatch_argv=("false",), record=to_dev_null)
    refused_by_sbatch = submit(again._replace(directories=accepted_directories))
    assert (refused_by_sbatch.returncode, refused_by_sbatch.stdout) == (0, "@@ 1\n"), refused_by_sbatch.stderr
    assert len(list(records.iterdir())) == 2


# -- the wait schedule ----------------------------------------------------------------------------------------------


def test_the_schedule_backs_off_to_its_most():
    schedule = WaitSchedule(now=0, first=10, most=60)
    times, now = [], 0.0
    for _ in range(8):
        now = schedule.asked(now)
        times.append(now)
    gaps = [round(b - a, 2) for a, b in zip([0.0, *times[:-1]], times, strict=True)]
    assert gaps == [10, 15, 22.5, 33.75, 50.62, 60, 60, 60]


def test_a_record_asks_at_once_then_confirms_quickly_then_backs_off_again():
    schedule = WaitSchedule(now=0, first=10, most=60)
    schedule.asked(0)
    schedule.record_arrived(3)
    assert schedule.due(3)
    assert [schedule.asked(t) for t in (3, 3.5, 4.5, 6.5, 10.5)] == [3.5, 4.5, 6.5, 10.5, 25.5]


def info(job_id: str, status: sl_forgery.JobStatus) -> sl_forgery.JobInfo:
    return sl_forgery.JobInfo(job_id, status)


def test_an_array_ends_by_records_only_once_every_task_wrote_one():
    progress = WaitProgress(["7"], {"7": frozenset({"7_1", "7_2"})}, WaitSchedule(0, 10, 60), None)
    progress.update({"7": info("7", sl_forgery.JobStatus.RUNNING)}, 0)
    progress.records_arrived({"7_1": 0}, 1)
    assert not progress.schedule.due(1)
    progress.records_arrived({"7_2": 0}, 2)
    assert progress.schedule.due(2)


def test_a_lost_watcher_leaves_the_scheduler_schedule_running():
    progress = WaitProgress(["8"], {"8": frozenset({"8"})}, WaitSchedule(0, 10, 60), None)
    progress.update({"8": info("8", sl_forgery.JobStatus.PENDING)}, 0)
    assert progress.pause(0) == 10 and progress.pause(9) == 1


def test_unknown_jobs_and_the_deadline_end_the_wait_with_their_own_errors():
    progress = WaitProgress(["1", "2"], {}, WaitSchedule(0, 10, 60), timeout=30)
    changed = progress.update(
        {"1": info("1", sl_forgery.JobStatus.UNKNOWN), "2": info("2", sl_forgery.JobStatus.RUNNING)}, 0
    )
    assert [i.job_id for i in changed] == ["1", "2"]
    with pytest.raises(sl_forgery.UnknownJobError, match="job 1 is unknown"):
        progress.check_known("lab")
    assert progress.pause(5) == 5
    progress.schedule.asked(10)
    progress.schedule.asked(25)
    assert progress.pause(26) == 4  # the deadline comes before the next query
    with pytest.raises(sl_forgery.WaitTimeout):
        progress.check_deadline(30)


def test_waits_share_one_answer_and_a_board_held_by_a_stopped_wait_is_passed_by(monkeypatch):
    """Waits of one server share the scheduler's answers through a board; one whose holder was stopped (Ctrl-Z)
    while it asked would hold every other wait up, so after twice a scheduler call's timeout a wait asks alone."""
    import fcntl
    import os

    monkeypatch.setattr(sl_forgery, "SCHEDULER_CALL_TIMEOUT", 0.2)
    asked: list[list[str]] = []

    def ask(job_ids: list[str]) -> dict[str, sl_forgery.JobInfo]:
        asked.append(job_ids)
        return {job_id: info(job_id, sl_forgery.JobStatus.RUNNING) for job_id in job_ids}

    board_lock = sl_forgery._private_dir(sl_forgery.control_dir()) / "board-lab.lock"
    stopped_wait = os.open(board_lock, os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(stopped_wait, fcntl.LOCK_EX)
    answer, _ = sl_forgery.shared_answer("lab", ["5"], ask)
    assert answer["5"].status is sl_forgery.JobStatus.RUNNING and asked == [["5"]]
    os.close(stopped_wait)
    sl_forgery.shared_answer("lab", ["5"], ask)
    assert asked == [["5"], ["5"]]  # an answer got while passing the board by is not put on it
    answer, _ = sl_forgery.shared_answer("lab", ["5"], ask)
    assert answer["5"].status is sl_forgery.JobStatus.RUNNING and asked == [["5"], ["5"]]


# -- on the real cluster: a dry run shows exactly what is sent ------------------------------------------------------


def _unrandom(text: str) -> str:
    """Without what differs by design between two submissions: the script's unique name, the exit record's nonce."""
    text = re.sub(r"-\d{8}-\d{6}-[0-9a-f]{6}", "-LEAF", text)
    return re.sub(r'(TASK_ID\}" )[0-9a-f]{12}( >)', r"\1NONCE\2", text)


def test_a_dry_run_prints_the_script_and_sbatch_command_a_real_submission_sends(profile_name, remote_dir, capsys):
    name = f"same-{uuid.uuid4().hex[:8]}"
    argv = ["run", "--name", name, "--workdir", remote_dir, "--cpus", "2", "--", "echo", "same"]
    code, dry_script, dry_err = run_main(capsys, *argv[:1], "--dry-run", *argv[1:])
    assert code == 0, dry_err
    dry_command = dry_err.split("# and run there: ", 1)[1].strip()

    code, out, err = run_main(capsys, "-v", *argv)
    assert code == 0, err
    job_id = out.strip()
    sent_command = next(line[4:] for line in err.splitlines() if line.startswith("  | sbatch --parsable "))
    assert _unrandom(sent_command).startswith(_unrandom(dry_command))
    with sl_forgery.Server.from_profile(profile_name) as server:
        uploaded = server.run(f"cat {shlex.quote(remote_dir)}/.sl-forgery/{name}-*.sh").stdout
        assert _unrandom(uploaded) == _unrandom(dry_script)
        assert server.wait([job_id])[job_id].status is sl_forgery.JobStatus.COMPLETED


def test_a_run_directory_someone_else_made_or_could_swap_is_refused(open_directory):
    """TensorBoard's secret goes into its run directory: one planted by another user (here `nobody`), or inside
    a directory every user may write to, must be refused before anything is put in it."""
    import os
    import subprocess

    def accepted(path: Path) -> bool:
        check = subprocess.run(["/bin/sh", "-c", sl_forgery.private_directory_check(str(path))], capture_output=True)
        return check.returncode == 0

    mine = open_directory / "mine"
    mine.mkdir(mode=0o755)
    (mine / "run").mkdir(mode=0o700)
    assert accepted(mine / "run")
    planted = mine / "planted"
    planted.mkdir(mode=0o700)
    os.chown(planted, 65534, 65534)
    assert not accepted(planted)
    (open_directory / "run").mkdir(mode=0o700)
    assert not accepted(open_directory / "run")  # its parent is writable by every user
    (mine / "link").symlink_to(mine / "run")
    assert not accepted(mine / "link")
