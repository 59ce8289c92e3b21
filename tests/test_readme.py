"""What the README promises, tried as it is written there; and every option of every command is in the README."""

import json
import os
import re
import subprocess
import time
import urllib.request

import pytest
import yaml

import sl_forgery
from conftest import ROOT, cli, console_script
from sl_forgery import Job, JobStatus, SlurmError

README = (ROOT / "README.md").read_text()


def parser_options(parser, path=()) -> dict[str, set[str]]:
    """Every option string of every command and action, by command path ('' for the top level)."""
    import argparse

    found = {" ".join(path): set()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for command, options in parser_options(sub, (*path, name)).items():
                    found.setdefault(command, set()).update(options)
        else:
            found[" ".join(path)].update(option for option in action.option_strings if option not in ("-h", "--help"))
    return found


def test_every_option_of_every_command_and_every_profile_key_is_in_the_readme():
    missing = []
    commands = parser_options(sl_forgery.get_parser())
    common = commands[""]  # -s, -v, -q: every command takes them, the README names them once
    for command, options in commands.items():
        for word in command.split():
            if not re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", README):
                missing.append(f"command {command!r}")
        for option in sorted(options - common if command else options):
            if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", README):
                missing.append(f"{command or 'sl-forgery'} {option}")
    for key in sl_forgery.PROFILE_KEYS:
        if f"| `{key}` |" not in README:
            missing.append(f"servers.yaml key {key!r} (a row of the profile table)")
    assert not missing, "not in README.md: " + ", ".join(sorted(set(missing)))


# ---- servers ---------------------------------------------------------------------------------------------------


def test_server_add_puts_every_profile_flag_in_the_profile(home, tmp_path):
    key, ssh_config = tmp_path / "id_lab", tmp_path / "ssh_config"
    ssh_config.write_text("")
    added = cli(
        "server", "add", "lab", "--host", "cluster.example.edu", "--user", "alice", "--port", "2200",
        "--identity-file", str(key), "--ssh-config", str(ssh_config),
        "--ssh-option", "ProxyJump=gateway", "--ssh-option", "Compression=yes",
        "--storage-root", "/storage", "--working-root", "/work", "--shared-directory-name", "lab_data",
        "--conda-env", "analysis", "--env-manager", "mamba", "--setup", "module load cuda",
        "--partition", "short", "--account", "lab-account", "--control-persist", "3600",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    shown = yaml.safe_load(cli("server", "show", "lab").stdout)
    assert shown == {
        "lab": {
            "host": "cluster.example.edu",
            "user": "alice",
            "port": 2200,
            "identity_file": str(key),
            "ssh_config": str(ssh_config),
            "ssh_options": ["ProxyJump=gateway", "Compression=yes"],
            "storage_root": "/storage",
            "working_root": "/work",
            "shared_directory_name": "lab_data",
            "conda_environment": "analysis",
            "env_manager": "mamba",
            "setup": ["module load cuda"],
            "partition": "short",
            "account": "lab-account",
            "control_persist": 3600,
        }
    }
    # The profile reaches ssh as written: ssh -G resolves what a call would use.
    settings = sl_forgery.SSHConnection(sl_forgery.load_config().profile("lab")).ssh_settings()
    assert (settings["port"], settings["user"], settings["proxyjump"]) == ("2200", "alice", "gateway")
    again = cli("server", "add", "lab", "--host", "other.example")
    assert again.returncode == 2 and "--replace" in again.stderr
    replaced = cli("server", "add", "lab", "--host", "other.example", "--replace")
    assert replaced.returncode == 0 and yaml.safe_load(cli("server", "show", "lab").stdout) == {
        "lab": {"host": "other.example"}
    }
    refused = cli("server", "add", "x", "--host", "h", "--control-persist", "0")
    assert refused.returncode == 2 and "--control-persist must be a whole number of seconds from 1" in refused.stderr


def test_server_show_default_and_remove(home):
    for name in ("alpha", "beta"):
        assert cli("server", "add", name, "--host", f"{name}.example").returncode == 0
    assert json.loads(cli("server", "list", "--json").stdout)["default"] == "alpha"  # the first one added
    assert cli("server", "default", "beta").returncode == 0
    assert json.loads(cli("server", "list", "--json").stdout)["default"] == "beta"
    assert cli("server", "add", "gamma", "--host", "g.example", "--default").returncode == 0
    assert json.loads(cli("server", "list", "--json").stdout)["default"] == "gamma"
    assert yaml.safe_load(cli("server", "show", "alpha").stdout) == {"alpha": {"host": "alpha.example"}}
    unknown = cli("server", "show", "nope")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "no server named 'nope'" in unknown.stderr
    assert cli("server", "default", "nope").returncode == 2
    assert cli("server", "remove", "gamma").returncode == 0
    listed = json.loads(cli("server", "list", "--json").stdout)
    assert listed["default"] is None and [entry["name"] for entry in listed["servers"]] == ["alpha", "beta"]


def test_sl_forgery_config_names_the_servers_file(home, tmp_path):
    elsewhere = tmp_path / "elsewhere" / "servers.yaml"
    env = {**os.environ, "SL_FORGERY_CONFIG": str(elsewhere)}
    assert cli("server", "add", "lab", "--host", "h.example", env=env).returncode == 0
    assert elsewhere.exists() and not sl_forgery.config_path().exists()
    assert [entry["name"] for entry in json.loads(cli("server", "list", "--json", env=env).stdout)["servers"]] == [
        "lab"
    ]
    assert json.loads(cli("server", "list", "--json").stdout)["servers"] == []


def test_sl_forgery_server_picks_the_profile_and_server_overrides_it(profile_name, cluster):
    # The default profile points at a closed port: any command that used it would fail with 255.
    assert cli("server", "add", "closed", "--host", "127.0.0.1", "--port", "1", "--default").returncode == 0
    assert cli("queue").returncode == 255
    env = {**os.environ, "SL_FORGERY_SERVER": profile_name}
    assert cli("queue", env=env).returncode == 0
    assert cli("--server", "closed", "queue", env=env).returncode == 255
    unknown = cli("queue", env={**os.environ, "SL_FORGERY_SERVER": "nowhere"})
    assert unknown.returncode == 2 and "no server named 'nowhere'" in unknown.stderr


def test_history_filters_by_since_server_and_sl_forgery_server(home):
    for name in ("alpha", "beta"):
        assert cli("server", "add", name, "--host", f"{name}.example").returncode == 0
    now = time.time()
    for job_id, server, age in (("11", "alpha", 3 * 86400), ("12", "alpha", 60), ("13", "beta", 60)):
        sl_forgery.record_job(sl_forgery.JobRecord(job_id, server, "n", "/w", "/w/o", "/w/e", now - age))

    def ids(*args: str, env: dict | None = None) -> list[str]:
        result = cli("history", "--json", *args, env=env)
        assert result.returncode == 0, result.stderr
        return [entry["job_id"] for entry in json.loads(result.stdout)["jobs"]]

    assert ids() == ["11", "12", "13"]  # every server's, oldest first
    assert ids("--since", "2d") == ["12", "13"]
    assert ids("-s", "alpha") == ["11", "12"]
    assert ids("--since", "1h", "--server", "alpha") == ["12"]
    assert ids(env={**os.environ, "SL_FORGERY_SERVER": "beta"}) == ["13"]
    unknown = cli("history", "-s", "nowhere")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "no server named 'nowhere'" in unknown.stderr
    assert cli("history", env={**os.environ, "SL_FORGERY_SERVER": "nowhere"}).returncode == 2
    bad = cli("history", "--since", "soon")
    assert bad.returncode == 2 and "soon" in bad.stderr


# ---- jobs from the command line ----------------------------------------------------------------------------------


def scontrol_job(cluster, job_id: str) -> dict[str, str]:
    """The job as slurmctld holds it (scontrol show job -o), as KEY: VALUE."""
    line = cluster.ssh(f"scontrol show job -o {job_id}").stdout
    return dict(re.findall(r"(\w+)=(\S*)", line))


def test_submit_flags_override_the_scripts_sbatch_lines_and_the_rest_hold(profile_name, cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --job-name=from-script\n#SBATCH --time=5\n#SBATCH --cpus-per-task=1\n"
        "#SBATCH --mem=256M\n#SBATCH --comment=kept-from-script\n#SBATCH --hold\necho hi\n"
    )
    workdir = f"{cluster.home}/tests/override-{time.time_ns()}"
    submitted = cli(
        "submit", str(script), "--name", "from-flags", "--time", "7", "--cpus", "2", "--mem", "0.5",
        "--partition", "long", "--qos", "normal", "--account", "lab-account", "--workdir", workdir,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    try:
        job = scontrol_job(cluster, job_id)
        assert (job["JobName"], job["TimeLimit"], job["NumCPUs"], job["MinMemoryNode"]) == (
            "from-flags",
            "00:07:00",
            "2",
            "512M",
        )
        assert (job["Partition"], job["QOS"], job["Account"], job["WorkDir"]) == (
            "long",
            "normal",
            "lab-account",
            workdir,
        )
        assert job["Comment"] == "kept-from-script" and job["JobState"] == "PENDING"  # held, as the script says
    finally:
        cli("cancel", job_id)


def test_timeout_exits_124_for_run_and_submit_and_the_job_keeps_running(profile_name, cluster, tmp_path):
    ran = cli("run", "--mem", "0.25", "--wait", "--timeout", "2", "--", "sleep", "300")
    script = tmp_path / "slow.sh"
    script.write_text("#!/bin/bash\n#SBATCH --mem=256M\nsleep 300\n")
    submitted = cli("submit", str(script), "--wait", "--timeout", "2")
    job_ids = [ran.stdout.split()[0], submitted.stdout.split()[0]]
    try:
        assert (ran.returncode, submitted.returncode) == (124, 124), ran.stderr + submitted.stderr
        assert "still running" in ran.stderr and "still running" in submitted.stderr
        assert {cluster.job_state(job_id) for job_id in job_ids} <= {"PENDING", "RUNNING"}
    finally:
        cli("cancel", *job_ids)


def test_submit_wait_exits_with_a_failed_jobs_own_code(profile_name, tmp_path):
    script = tmp_path / "fails.sh"
    script.write_text("#!/bin/bash\n#SBATCH --mem=256M\necho about to fail\nexit 7\n")
    submitted = cli("submit", str(script), "--wait")
    assert submitted.returncode == 7, submitted.stderr
    assert submitted.stdout.strip().isdigit() and "FAILED" in submitted.stderr


def test_logs_lines_shows_only_the_last_lines(profile_name):
    job_id = cli("run", "--mem", "0.25", "--wait", "-q", "--", "seq", "1", "5").stdout.split()[0]
    assert cli("logs", job_id).stdout == "1\n2\n3\n4\n5\n"
    assert cli("logs", "-n", "2", job_id).stdout == "4\n5\n"


# ---- jobs from Python -------------------------------------------------------------------------------------------


def test_abort_job_cancels_a_running_job(server, remote_dir):
    job = Job("abort", f"{remote_dir}/o", f"{remote_dir}/e", remote_dir, cpus_to_use=1, ram_gb=0.25, time_limit=5)
    job.add_command("sleep 300")
    server.submit_job(job)
    server.abort_job(job)
    assert server.wait(job.job_id, timeout=60)[job.job_id].status is JobStatus.CANCELLED


def test_job_qos_nodes_and_account_reach_slurm_and_gpus_reach_sbatch(server, cluster, remote_dir):
    job = Job(
        "options", f"{remote_dir}/o", f"{remote_dir}/e", remote_dir, cpus_to_use=1, ram_gb=0.25, time_limit=5,
        qos="normal", nodes=1, account="lab-account", sbatch_options=["--hold"],
    )  # fmt: skip
    job.add_command("true")
    server.submit_job(job)
    try:
        held = cluster.ssh(f"squeue -h -j {job.job_id} -o '%q|%D|%a'").stdout.strip()
        assert held == "normal|1|lab-account"
    finally:
        server.cancel([job.job_id])
    # The test cluster has no GPUs: SLURM's own refusal shows that the request reached sbatch.
    gpu_job = Job("gpu", f"{remote_dir}/o", f"{remote_dir}/e", remote_dir, ram_gb=0.25, time_limit=5, gpus=1)
    gpu_job.add_command("true")
    with pytest.raises(SlurmError) as error:
        server.submit_job(gpu_job)
    assert "Invalid generic resource (gres) specification" in error.value.summary


# ---- Jupyter ----------------------------------------------------------------------------------------------------


def test_jupyter_json_and_dir(profile_name, cluster):
    notebooks = f"{cluster.home}/tests/notebooks-{time.time_ns()}"
    cluster.ssh(f"mkdir -p {notebooks} && echo {{}} > {notebooks}/analysis.ipynb")
    started = cli("jupyter", "--env", "jupyter", "--mem", "1", "--time", "10", "--dir", notebooks, "--detach", "--json")
    assert started.returncode == 0, started.stderr
    (server,) = json.loads(started.stdout)["servers"]  # the document `jupyter list --json` prints
    try:
        assert set(server) >= {"job_id", "state", "node", "time_left", "url"} and server["state"] == "RUNNING"
        (listed,) = json.loads(cli("jupyter", "list", "--json").stdout)["servers"]
        assert {**listed, "time_left": ""} == {**server, "time_left": ""}
        base, token = server["url"].split("/lab?token=")
        with urllib.request.urlopen(f"{base}/api/contents?token={token}", timeout=30) as response:
            listing = json.load(response)
        assert [entry["name"] for entry in listing["content"]] == ["analysis.ipynb"]  # Jupyter's root is --dir
    finally:
        cli("jupyter", "stop", server["job_id"])
    dry = cli("jupyter", "--dry-run", "--json", "--env", "jupyter")
    assert dry.returncode == 2 and "leave out --json" in dry.stderr


# ---- the original commands --------------------------------------------------------------------------------------


def test_sl_start_jupyter_speaks_under_its_own_name(home):
    helped = subprocess.run([console_script("sl-start-jupyter"), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: sl-start-jupyter ")
    wrong = subprocess.run([console_script("sl-start-jupyter"), "-c", "many"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "sl-start-jupyter: error: argument -c/--cpus" in wrong.stderr
    unconfigured = subprocess.run(
        [console_script("sl-start-jupyter"), "-e", "jupyter"], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert unconfigured.returncode == 2 and unconfigured.stderr.startswith("sl-start-jupyter: error: ")


def test_create_server_credentials_says_which_host_it_used(home, tmp_path):
    command = [console_script("sl-create-server-credentials"), "-u", "alice", "--no-password"]
    defaulted = subprocess.run([*command, "-od", str(tmp_path / "a")], capture_output=True, text=True)
    assert defaulted.returncode == 0, defaulted.stderr
    assert "no -h given: using cbsuwsun.biohpc.cornell.edu" in defaulted.stderr
    assert "(alice@cbsuwsun.biohpc.cornell.edu)" in defaulted.stderr
    assert yaml.safe_load((tmp_path / "a" / "server_credentials.yaml").read_text())["host"] == (
        "cbsuwsun.biohpc.cornell.edu"
    )
    named = subprocess.run([*command, "-od", str(tmp_path / "b"), "-h", "lab.example"], capture_output=True, text=True)
    assert named.returncode == 0 and "no -h given" not in named.stderr and "(alice@lab.example)" in named.stderr
