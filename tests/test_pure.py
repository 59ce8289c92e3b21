"""Pure builders and parsers: no cluster needed."""

import doctest

import pytest

import sl_forgery
from sl_forgery import Job, JobInfo, JobStatus, UsageError


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
    failures, _ = doctest.testmod(sl_forgery)
    assert failures == 0


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
    merged = sl_forgery.merge_job_info(
        ["1", "2", "3", "4", "5"], squeue, sacct, {"3": 0, "4": 2}, recent_ids=frozenset({"5"})
    )
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
