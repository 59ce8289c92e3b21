"""Pure builders and parsers: no cluster needed."""

import doctest

import jsonschema
import pytest

import sl_forgery
from sl_forgery import ExitRecord, Job, JobInfo, JobStatus, UsageError


def make_job(**overrides) -> Job:
    arguments = dict(
        job_name="fit",
        output_log="/w/out.txt",
        error_log="/w/err.txt",
        working_directory="/w",
        conda_environment="analysis",
        cpus_to_use=4,
        ram_gb=16,
        time_limit=30,
    )
    arguments.update(overrides)
    return Job(**arguments)


def test_doctests_pass():
    failures, attempted = doctest.testmod(sl_forgery)
    assert failures == 0 and attempted > 0


def test_script_has_header_conda_activation_then_commands_in_order():
    job = make_job(partition="gpu", environment={"OMP_NUM_THREADS": "4"})
    job.add_command("sl-verify-session -sp /data/s1")
    job.add_command("echo done")
    script = job.script
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    header = [line for line in lines if line.startswith("#SBATCH")]
    assert header == [
        "#SBATCH --job-name=fit",
        "#SBATCH --output=/w/out.txt",
        "#SBATCH --error=/w/err.txt",
        "#SBATCH --chdir=/w",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=16G",
        "#SBATCH --time=30",
        "#SBATCH --partition=gpu",
    ]
    assert "conda init" not in script
    assert (
        script.index('eval "$__slf_hook"')
        < script.index("conda activate analysis")
        < script.index("sl-verify-session")
        < script.index("echo done")
    )
    assert "export OMP_NUM_THREADS=4" in script
    assert "set -e" in lines


def test_without_conda_environment_there_is_no_activation():
    assert "conda" not in make_job(conda_environment=None).script


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"job_name": "a\nb"}, "job_name must be a single line"),
        ({"cpus_to_use": 0}, "cpus_to_use must be at least 1"),
        ({"time_limit": 0}, "time_limit (minutes) must be at least 1"),
        ({"ram_gb": -1}, "ram_gb must be a positive number"),
        ({"working_directory": "relative/dir"}, "working_directory must be an absolute path"),
        ({"array": "1-3; rm -rf"}, "is not a SLURM array spec"),
        ({"sbatch_options": ["--job-name=x"]}, "--job-name is set by a Job argument"),
        ({"sbatch_options": ["constraint=x"]}, "is not of the form --name"),
        ({"environment": {"BAD NAME": "x"}}, "is not a valid shell name"),
    ],
)
def test_values_that_cannot_be_represented_raise_a_clear_error(overrides, fragment):
    with pytest.raises(UsageError) as error:
        make_job(**overrides)
    assert fragment in str(error.value)


def test_sbatch_values_are_escaped_for_slurms_parser():
    job = make_job(job_name='my "odd" job #1', sbatch_options={"constraint": "a b", "exclusive": True})
    header = [line for line in job.script.splitlines() if line.startswith("#SBATCH")]
    assert '#SBATCH --job-name="my \\"odd\\" job #1"' in header
    assert '#SBATCH --constraint="a b"' in header and "#SBATCH --exclusive" in header


def test_fractional_memory_is_rendered_in_megabytes_and_dependency_lists_become_afterok():
    script = make_job(ram_gb=0.5, dependency=[12, 13]).script
    assert "#SBATCH --mem=512M" in script and "#SBATCH --dependency=afterok:12:13" in script


def test_exit_record_is_injected_after_the_sbatch_block_of_a_shell_script_only():
    script = "#!/bin/bash\n#SBATCH --time=5\n\necho hi\n"
    injected = sl_forgery.inject_exit_record(script).splitlines()
    assert injected[:3] == ["#!/bin/bash", "#SBATCH --time=5", ""]
    assert injected[3].startswith("__slf_record=") and injected[-1] == "echo hi"
    assert sl_forgery.inject_exit_record("#!/usr/bin/python3\nprint()\n") == "#!/usr/bin/python3\nprint()\n"


def test_job_states_parse_including_cancelled_by_uid():
    assert JobStatus.parse("CANCELLED by 1000") is JobStatus.CANCELLED
    assert JobStatus.parse("OUT_OF_MEMORY") is JobStatus.OUT_OF_MEMORY
    assert JobStatus.parse("") is JobStatus.UNKNOWN
    assert JobStatus.TIMEOUT.is_finished and not JobStatus.TIMEOUT.is_success
    assert not JobStatus.COMPLETING.is_finished and JobStatus.COMPLETED.is_success
    for state in (
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "SUSPENDED",
        "COMPLETING",
        "COMPLETED",
        "CANCELLED",
        "FAILED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
        "REQUEUED",
        "RESIZING",
    ):
        assert JobStatus.parse(state).value == state


def test_sbatch_id_is_parsed_strictly():
    assert sl_forgery.parse_sbatch_id("42\n") == "42"
    for bad in ("", "Submitted batch job 42", "42\n43", "sbatch: error"):
        with pytest.raises(ValueError):
            sl_forgery.parse_sbatch_id(bad)


def test_squeue_and_sacct_rows_parse_with_separators_in_names():
    squeue = sl_forgery.parse_squeue("5|RUNNING|None|a|b|node1|3:59:50\n6|PENDING|Resources|x||INVALID\n")
    assert squeue["5"].name == "a|b" and squeue["5"].node == "node1" and squeue["6"].reason == "Resources"
    assert squeue["5"].time_left == "3:59:50" and squeue["6"].time_left == ""
    sacct = sl_forgery.parse_sacct("7|FAILED|3:0|None|n|m|node1\n8|CANCELLED by 0|0:15|None|x|\n")
    assert (sacct["7"].status, sacct["7"].exit_code, sacct["7"].name) == (JobStatus.FAILED, 3, "n|m")
    assert sacct["8"].status is JobStatus.CANCELLED and sacct["8"].signal == 15


def test_merge_prefers_finished_sacct_then_squeue_then_records():
    squeue = {
        "1": JobInfo("1", JobStatus.RUNNING, source="squeue"),
        "2": JobInfo("2", JobStatus.COMPLETING, source="squeue"),
    }
    sacct = {"2": JobInfo("2", JobStatus.FAILED, 3, 0, source="sacct")}
    records = {"3": ExitRecord(0, None, "3", "n"), "4": ExitRecord(2, None, "4", "n")}
    merged = sl_forgery.merge_job_info(["1", "2", "3", "4", "5"], squeue, sacct, records, recent_ids=frozenset({"5"}))
    assert merged["1"].status is JobStatus.RUNNING
    assert (merged["2"].status, merged["2"].exit_code) == (JobStatus.FAILED, 3)
    assert merged["3"].status is JobStatus.COMPLETED
    assert (merged["4"].status, merged["4"].exit_code) == (JobStatus.FAILED, 2)
    assert merged["5"].status is JobStatus.PENDING
    assert sl_forgery.merge_job_info(["9"], {}, {}, {})["9"].status is JobStatus.UNKNOWN


def test_array_tasks_combine_into_one_state():
    tasks = {f"10_{i}": JobInfo(f"10_{i}", JobStatus.COMPLETED, 0, 0, source="sacct") for i in range(3)}
    assert sl_forgery.merge_job_info(["10"], {}, tasks, {})["10"].status is JobStatus.COMPLETED
    tasks["10_1"] = JobInfo("10_1", JobStatus.FAILED, 4, 0, source="sacct")
    combined = sl_forgery.merge_job_info(["10"], {}, tasks, {})["10"]
    assert (combined.status, combined.exit_code) == (JobStatus.FAILED, 4)
    running = {"10_3": JobInfo("10_3", JobStatus.RUNNING, source="squeue")}
    assert sl_forgery.merge_job_info(["10"], running, tasks, {})["10"].status is JobStatus.RUNNING


def test_an_end_is_kept_only_once_squeue_no_longer_lists_the_job_or_any_of_its_parts():
    completed = JobInfo("10", JobStatus.COMPLETED, 0, 0, source="sacct")
    assert sl_forgery.end_settled("10", completed, {})
    # Still held by the controller, which can requeue it: asked about again.
    assert not sl_forgery.end_settled("10", completed, {"10": completed._replace(source="squeue")})
    assert not sl_forgery.end_settled("10", completed, {"10_2": JobInfo("10_2", JobStatus.COMPLETED, source="squeue")})
    assert not sl_forgery.end_settled("10", completed, {"10+1": JobInfo("10+1", JobStatus.FAILED, source="squeue")})
    assert sl_forgery.end_settled("10", completed, {"100": JobInfo("100", JobStatus.RUNNING, source="squeue")})
    # A kill told by the exit record alone (no accounting, squeue has forgotten the job) is an end for good too.
    killed = ExitRecord(None, 15, "10", "n").info("10")
    assert sl_forgery.end_settled("10", killed, {})
    assert not sl_forgery.end_settled("10", JobInfo("10", JobStatus.UNKNOWN, source="none"), {})
    assert not sl_forgery.end_settled("10", JobInfo("10", JobStatus.PENDING, source="squeue"), {})


def test_exit_codes_follow_the_documented_table():
    ok, failed = JobInfo("1", JobStatus.COMPLETED, 0), JobInfo("2", JobStatus.FAILED, 3)
    assert sl_forgery.exit_code_for([ok]) == 0
    assert sl_forgery.exit_code_for([ok, failed]) == 3
    assert sl_forgery.exit_code_for([JobInfo("3", JobStatus.TIMEOUT, 0)]) == 1
    assert sl_forgery.exit_code_for([JobInfo("4", JobStatus.FAILED, 0, 53)]) == 1


def test_command_errors_carry_what_ran_the_exit_code_and_stderr():
    error = sl_forgery.SlurmError(
        ["sbatch", "--partition=nope", "x.sh"],
        1,
        "",
        "sbatch: error: invalid partition specified: nope\n",
        what="sbatch",
    )
    assert error.summary == "sbatch failed with exit code 1: sbatch: error: invalid partition specified: nope"
    text = str(error)
    assert "RAN: sbatch --partition=nope x.sh" in text and "EXIT CODE: 1" in text and "STDERR:" in text


def test_log_patterns_expand_like_slurm():
    assert sl_forgery.expand_log_pattern("/l/%x_%j.%%", "7", "fit") == "/l/fit_7.%"
    assert sl_forgery.expand_log_pattern("/l/%A_%a.out", "7_3") == "/l/7_3.out"


def test_jupyter_script_keeps_the_token_off_the_command_line_and_binds_no_wildcard():
    job = sl_forgery.JupyterJob(
        "lab",
        "/w/o",
        "/w/e",
        "/w",
        "jupyter",
        "/data/notebooks",
        port=0,
        jupyter_args="--ServerApp.shutdown_no_activity_timeout=600",
        cpus_to_use=2,
    )
    lab_line = next(line for line in job.script.splitlines() if line.startswith("jupyter lab"))
    assert "token" not in lab_line.lower() and "0.0.0.0" not in job.script
    assert "--ServerApp.port=0" in lab_line and "--ServerApp.port_retries=0" in lab_line
    assert "--ServerApp.root_dir=/data/notebooks" in lab_line
    assert "--ServerApp.shutdown_no_activity_timeout=600" in lab_line
    assert "disable_check_xsrf" not in job.script and "allow_origin" not in job.script
    assert "export JUPYTER_TOKEN" in job.script and "umask 077" in job.script
    with pytest.raises(UsageError, match="port must be at least 0"):
        sl_forgery.JupyterJob("lab", "/w/o", "/w/e", "/w", "jupyter", "/d", port=-1)


def test_the_original_loop_ends_only_when_a_job_has_ended():
    # `while server.get_job_status(id) in (PENDING, RUNNING)` from the original README.
    for status in JobStatus:
        coarse = sl_forgery.coarse_status(status)
        if status.is_finished or status is JobStatus.UNKNOWN:
            assert coarse is status
        else:
            assert coarse in (JobStatus.PENDING, JobStatus.RUNNING), status


# ---- efficiency report and end notices ------------------------------------------------------------------------------

# What sacct printed on the test cluster for a job with two srun steps and work in its batch step (steps included).
SACCT_MULTI_STEP = """\
76|COMPLETED|0:0|00:00:06|00:05:00|00:04.068|2||300M|1
76.batch|COMPLETED|0:0|00:00:06||00:01.693|2|72544K||1
76.0|COMPLETED|0:0|00:00:03||00:02.373|2|161780K||1
76.1|COMPLETED|0:0|00:00:01||00:00.001|2|1416K||1
77_[2-3]|PENDING|0:0|00:00:00|01:00:00|00:00:00|0||1G|1
77_1|OUT_OF_MEMORY|0:125|00:01:40|01:00:00|01:10.500|1||1G|1
77_1.batch|OUT_OF_MEMORY|0:125|00:01:40||01:10.500|1|1048000K||1
77_1.extern|COMPLETED|0:0|00:01:40||00:00:00|1|0||1
"""


def test_usage_counts_cpu_time_and_peak_memory_over_every_step():
    usages = sl_forgery.parse_sacct_usage(SACCT_MULTI_STEP)
    assert list(usages) == ["76", "77_1"]
    job = usages["76"]
    assert job.steps == 3 and job.cpus == 2 and job.elapsed == 6 and job.time_limit == 300
    assert job.total_cpu == pytest.approx(1.693 + 2.373 + 0.001)
    assert job.peak_memory == 161780 * 1024 and job.requested_memory == 300 * 1024**2
    assert job.cpu_efficiency == pytest.approx(4.067 / (6 * 2))
    assert job.memory_use == pytest.approx(161780 / (300 * 1024))
    task = usages["77_1"]
    assert (task.status, task.exit_code, task.steps) == (JobStatus.OUT_OF_MEMORY, 0, 2)
    assert task.total_cpu == pytest.approx(70.5) and task.peak_memory == 1048000 * 1024
    jsonschema.validate({"jobs": [usage.to_json() for usage in usages.values()]}, sl_forgery.JSON_SCHEMAS["report"])


def test_sacct_times_and_memory_figures_parse():
    assert sl_forgery.parse_slurm_duration("2-00:00:01") == 2 * 86400 + 1
    assert sl_forgery.parse_slurm_duration("01:02:03") == 3723
    assert sl_forgery.parse_slurm_duration("12:34.5") == 754.5
    for no_value in ("", "UNLIMITED", "Partition_Limit", "INVALID"):
        assert sl_forgery.parse_slurm_duration(no_value) is None
    assert sl_forgery.parse_slurm_memory("1.50G") == 3 * 1024**3 // 2
    assert sl_forgery.parse_slurm_memory("500Mn", nodes=2) == 1000 * 1024**2
    assert sl_forgery.parse_slurm_memory("0") == 0 and sl_forgery.parse_slurm_memory("16?") is None


def usage(**fields):
    values = dict(
        job_id="5",
        status=JobStatus.COMPLETED,
        exit_code=0,
        signal=0,
        elapsed=3000.0,
        time_limit=3600.0,
        cpus=1,
        total_cpu=2900.0,
        peak_memory=int(3.6 * 1024**3),
        requested_memory=4 * 1024**3,
        steps=2,
    )
    values.update(fields)
    return sl_forgery.JobUsage(**values)


def test_suggestions_say_what_was_asked_what_was_used_and_what_would_do():
    assert usage().suggestion == "its requests fit what it used"
    assert (
        usage(requested_memory=50 * 1024**3, peak_memory=int(3.1 * 1024**3)).suggestion
        == "asked 50 GB, used 3.1 GB: --mem 4 would do"
    )
    assert usage(peak_memory=int(3.9 * 1024**3)).suggestion == "used 3.9 GB of 4 GB: ask for more (--mem 6)"
    assert usage(status=JobStatus.OUT_OF_MEMORY).suggestion == "ran out of its 4 GB: ask for more (--mem 8)"
    assert usage(status=JobStatus.TIMEOUT, elapsed=3600.0).suggestion == "hit its 1 h limit: ask for more (--time 120)"
    assert usage(elapsed=300.0, total_cpu=290.0).suggestion == "asked 1 h, took 5 min: --time 8 would do"
    assert usage(cpus=8, total_cpu=6000.0).suggestion == "8 CPUs, 25% busy: --cpus 2 would do"
    assert usage(peak_memory=None).suggestion.startswith("sacct recorded no memory figure")
    assert usage(status=JobStatus.RUNNING, cpus=8, total_cpu=10.0).suggestion.startswith("still running")


def test_the_end_notice_names_the_job_its_state_and_exit_code():
    one = [JobInfo("42", JobStatus.FAILED, 3, 0, name="fit")]
    assert sl_forgery.end_notice(one, "lab") == ("sl-forgery: job 42 FAILED", "fit on lab, exit code 3")
    many = [JobInfo("1", JobStatus.COMPLETED, 0), JobInfo("2", JobStatus.COMPLETED, 0), one[0]]
    assert sl_forgery.end_notice(many, "lab") == ("sl-forgery: 3 jobs ended", "2 COMPLETED, 1 FAILED on lab")
    linux = sl_forgery.desktop_notifier_argv("T", "x", "linux", "/usr/bin/notify-send")
    assert linux == ["/usr/bin/notify-send", "--app-name=sl-forgery", "--", "T", "x"]
    # A job's name is the user's to choose (and the scheduler's to report): never an option of notify-send.
    hostile = sl_forgery.desktop_notifier_argv("T", "--icon=/etc/x on lab", "linux", "/usr/bin/notify-send")
    assert hostile.index("--") < hostile.index("--icon=/etc/x on lab")
    assert sl_forgery.desktop_notifier_argv("T", "x", "linux", None) is None
    assert sl_forgery.desktop_notifier_argv("T", "x", "win32", None) is None
    mac = sl_forgery.desktop_notifier_argv('say "hi"', "back\\slash", "darwin", None)
    assert mac == ["osascript", "-e", 'display notification "back\\\\slash" with title "say \\"hi\\""']


def test_a_failed_end_whose_exit_code_has_not_reached_accounting_takes_the_code_from_the_exit_record():
    # Seen on the test cluster with ten jobs ending at once: for a moment sacct read FAILED 0:0 for a job that exited
    # 8, and a wait on it exited 1 after printing "FAILED exit 0".
    squeue = sl_forgery.parse_squeue("9|FAILED|NonZeroExitCode|code8|node1|0:00\n")
    sacct = sl_forgery.parse_sacct("9|FAILED|0:0|NonZeroExitCode|code8|node1\n")
    merged = sl_forgery.merge_job_info(["9"], squeue, sacct, {"9": ExitRecord(8, None, "9", "n")})
    assert (merged["9"].status, merged["9"].exit_code) == (JobStatus.FAILED, 8)
    assert sl_forgery.exit_code_for(merged.values()) == 8
    unknown = sl_forgery.merge_job_info(["9"], squeue, sacct, {})["9"]
    assert (unknown.status, unknown.exit_code, sl_forgery.exit_code_for([unknown])) == (JobStatus.FAILED, None, 1)
    # An array reads as its worst task: a failed task whose code sacct lacks takes it from its own record, and
    # without one the array has no code (not the code of a task that completed).
    array_sacct = sl_forgery.parse_sacct("7_1|COMPLETED|0:0|None|a|node1\n7_2|FAILED|0:0|None|a|node1\n")
    with_record = sl_forgery.merge_job_info(["7"], {}, array_sacct, {"7_2": ExitRecord(8, None, "7_2", "n")})["7"]
    assert (with_record.status, with_record.exit_code) == (JobStatus.FAILED, 8)
    without = sl_forgery.merge_job_info(["7"], {}, array_sacct, {})["7"]
    assert (without.status, without.exit_code, without.code_pending) == (JobStatus.FAILED, None, True)
    # Such an end is not kept as final, so that the code is asked for again.
    assert not sl_forgery.end_settled("9", unknown, {}) and sl_forgery.end_settled("9", merged["9"], {})
    assert not sl_forgery.usage_settled(
        "9|FAILED|0:0|00:00:02|00:05:00|00:00:00|1||1G|1\n9.batch|FAILED|8:0|00:00:02||00:00:00|1|1M||1\n"
    )


def test_a_wait_asks_again_for_the_exit_code_of_a_failed_job_without_a_record_then_takes_the_end_as_it_is():
    without_code = sl_forgery.parse_sacct("9|FAILED|0:0|NonZeroExitCode|py|node1\n")
    progress = sl_forgery.WaitProgress(["9"], {}, sl_forgery.WaitSchedule(0), None)
    progress.update(without_code, 0)
    assert not progress.done() and progress.schedule.next_query == 4
    progress.update(sl_forgery.parse_sacct("9|FAILED|8:0|NonZeroExitCode|py|node1\n"), 4)
    assert progress.done() and sl_forgery.exit_code_for(progress.result().values()) == 8
    never = sl_forgery.WaitProgress(["9"], {}, sl_forgery.WaitSchedule(0), None)
    for now in (0, 4, 8):
        never.update(without_code, now)
        assert not never.done()
    never.update(without_code, sl_forgery.EXIT_CODE_GRACE)
    assert never.done() and sl_forgery.exit_code_for(never.result().values()) == 1
    # The code that comes late is a change the progress shows; a deadline while it is awaited is no time-out.
    late = sl_forgery.WaitProgress(["9"], {}, sl_forgery.WaitSchedule(0), timeout=2)
    late.update(without_code, 0)
    late.check_deadline(2)
    assert late.done() and late.result()["9"].status is JobStatus.FAILED
    changed = late.update(sl_forgery.parse_sacct("9|FAILED|8:0|NonZeroExitCode|py|node1\n"), 3)
    assert [info.exit_code for info in changed] == [8]


def test_a_report_waits_for_sacct_to_record_the_steps_of_a_job_that_ran():
    job_only = "7|COMPLETED|0:0|00:00:03|00:05:00|00:00:00|1||1G|1\n"
    assert not sl_forgery.usage_settled(job_only)
    step_running = job_only + "7.batch|RUNNING|0:0|00:00:03||00:00:00|1|||1\n"
    assert not sl_forgery.usage_settled(step_running)
    assert sl_forgery.usage_settled(step_running.replace("RUNNING", "COMPLETED"))
    assert not sl_forgery.usage_settled(step_running.replace("RUNNING", "COMPLETED").replace("1G", "16?"))
    assert sl_forgery.usage_settled("8|CANCELLED by 0|0:0|00:00:00|00:05:00|00:00:00|0||1G|1\n")
    assert not sl_forgery.usage_settled("")


@pytest.mark.parametrize(
    "text",
    [
        "",
        '{"hostname": "node1", "port": 8888',  # cut short
        "[1, 2]",
        '{"hostname": "node1", "port": "8888", "token": "ab"}',
        '{"hostname": "node1 -oProxyCommand=x", "port": 8888, "token": "ab"}',
        '{"hostname": "node1", "port": 0, "token": "ab"}',
        '{"hostname": "node1", "port": 8888, "token": "a b"}',
        '{"hostname": "node1", "port": 8888}',
    ],
)
def test_a_jupyter_runtime_file_that_jupyter_did_not_write_is_refused_in_one_line(text):
    with pytest.raises(sl_forgery.JupyterError, match="runtime file on the node is not one Jupyter wrote"):
        sl_forgery.parse_jupyter_runtime(text)


# ---- states that are never wrong ------------------------------------------------------------------------------------


def test_a_job_ended_by_a_signal_is_never_completed_and_a_record_of_another_submission_is_not_trusted():
    records = sl_forgery.parse_exit_records(
        "1 signal 15 1 aa\n2 exit 0 2 old\n3 0\n4 exit 0 9 cc\n", {"1": "aa", "2": "new", "3": "x", "4": "cc"}
    )
    assert list(records) == ["1"]
    merged = sl_forgery.merge_job_info(["1", "2", "3", "4"], {}, None, records)
    assert (merged["1"].status, merged["1"].signal, merged["1"].ended) == (JobStatus.UNKNOWN, 15, True)
    assert sl_forgery.exit_code_for([merged["1"]]) == 1
    for job_id in ("2", "3", "4"):
        assert merged[job_id].status is JobStatus.UNKNOWN and not merged[job_id].ended


def test_squeues_live_state_wins_over_an_earlier_runs_end_in_sacct():
    squeue = {"7": JobInfo("7", JobStatus.PENDING, reason="BeginTime", source="squeue")}
    sacct = {"7": JobInfo("7", JobStatus.NODE_FAIL, 0, 0, source="sacct")}
    assert sl_forgery.merge_job_info(["7"], squeue, sacct, {})["7"].status is JobStatus.PENDING
    ended = {"7": JobInfo("7", JobStatus.COMPLETED, source="squeue")}
    assert sl_forgery.merge_job_info(["7"], ended, sacct, {})["7"].status is JobStatus.NODE_FAIL


def test_a_pending_arrays_one_row_answers_for_each_task():
    rows = sl_forgery.parse_squeue("123_[1-3,5%2]|PENDING|JobHeldUser|a||UNLIMITED\n123_4|RUNNING|None|a|n1|1:00\n")
    assert sorted(rows) == ["123_1", "123_2", "123_3", "123_4", "123_5"]
    merged = sl_forgery.merge_job_info(["123_5", "123"], rows, None, {})
    assert merged["123_5"].status is JobStatus.PENDING and merged["123"].status is JobStatus.RUNNING


def test_a_finished_array_nobody_remembers_is_settled_from_every_tasks_record():
    tasks = {"50": ["50_1", "50_2"]}
    one = {"50_1": ExitRecord(0, None, "50_1", "n")}
    assert sl_forgery.merge_job_info(["50"], {}, None, one, tasks=tasks)["50"].status is JobStatus.UNKNOWN
    both = {**one, "50_2": ExitRecord(3, None, "50_2", "n")}
    settled = sl_forgery.merge_job_info(["50"], {}, None, both, tasks=tasks)["50"]
    assert (settled.status, settled.exit_code, settled.ended) == (JobStatus.FAILED, 3, True)


def test_heterogeneous_jobs_and_leading_zeros_read_as_slurm_reads_them():
    assert [sl_forgery.normalize_job_id(x) for x in ("0012", "200+0", "7_03")] == ["12", "200+0", "7_3"]
    for bad in ("12+", "+1", "1_2+3", "1 2"):
        with pytest.raises(UsageError):
            sl_forgery.normalize_job_id(bad)
    rows = sl_forgery.parse_squeue("200+0|RUNNING|None|a|n1|1:00\n200+1|PENDING|Resources|a||1:00\n")
    merged = sl_forgery.merge_job_info(["200", "200+1"], rows, None, {})
    assert merged["200"].status is JobStatus.RUNNING and merged["200+1"].status is JobStatus.PENDING
    assert "-j 200 " in sl_forgery.status_query_command(["200+1"], {})


def test_reasons_that_never_clear_are_told_from_those_that_do():
    assert sl_forgery.never_starts(JobInfo("1", JobStatus.PENDING, reason="DependencyNeverSatisfied"))
    for reason in ("Resources", "Priority", "AssocMaxJobsLimit", "ReqNodeNotAvail, UnavailableNodes:node1", ""):
        assert not sl_forgery.never_starts(JobInfo("1", JobStatus.PENDING, reason=reason))


def test_a_silent_scheduler_is_asked_again_with_back_off_until_the_grace_period_ends():
    progress = sl_forgery.WaitProgress(["1"], {}, sl_forgery.WaitSchedule(0), None)
    busy = sl_forgery.SchedulerBusy(["squeue"], 1, "", "slurm_load_jobs error: Socket timed out", what="squeue")
    pauses = []
    for now in (0, 2, 6, 14, 30, 60, 90, 120, 150, 180, 210, 240, 270):
        progress.scheduler_silent(busy, now, grace=300)
        pauses.append(progress.schedule.next_query - now)
    assert pauses[:5] == [2, 4, 8, 16, 30] and max(pauses) == 30
    with pytest.raises(sl_forgery.SchedulerUnreachable, match="did not answer for 300 s"):
        progress.scheduler_silent(busy, 300, grace=300)
    assert sl_forgery.SchedulerUnreachable.exit_code == 75 and sl_forgery.JobCannotStart.exit_code == 78
