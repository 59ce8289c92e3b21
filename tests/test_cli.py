"""The command line as a shell user meets it: completion in real shells, --json, doctor, dry runs, exit codes."""

import json
import os
import pty
import signal
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest

import sl_forgery
from conftest import CLUSTER, ROOT, cli, console_script

COMPLETION_FILES = {"bash": "sl-forgery.bash", "zsh": "_sl-forgery", "fish": "sl-forgery.fish"}


@pytest.mark.parametrize("shell", sorted(COMPLETION_FILES))
def test_committed_completions_match_the_parser(shell):
    committed = (ROOT / "completions" / COMPLETION_FILES[shell]).read_text()
    assert sl_forgery.completion_script(shell) == committed, (
        f"completions/{COMPLETION_FILES[shell]} is stale: run 'sl-forgery completion {shell} > "
        f"completions/{COMPLETION_FILES[shell]}'"
    )
    assert cli("completion", shell).stdout == committed


@pytest.fixture
def completion_home(home, tmp_path):
    """Two servers in the config and two jobs in the local history, for the completers to offer."""
    config = sl_forgery.Config(sl_forgery.config_path())
    for name in ("alpha", "beta-2"):
        config.servers[name] = sl_forgery.Profile(name=name, host=f"{name}.example")
    config.default = "alpha"
    config.save()
    for job_id in ("4101", "4102"):
        sl_forgery.record_job(sl_forgery.JobRecord(job_id, "alpha", "n", "/w", "/w/o", "/w/e", time.time()))
    return home


def bash_complete(words: str, cwd: Path | None = None) -> list[str]:
    script = ROOT / "completions" / "sl-forgery.bash"
    program = (
        f"source {script}\n"
        f"COMP_LINE={json.dumps(words)}; COMP_POINT=${{#COMP_LINE}}\n"
        f'read -ra COMP_WORDS <<< "$COMP_LINE"\n'
        + ('COMP_WORDS+=("")\n' if words.endswith(" ") else "")
        + "COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))\n"
        '_shtab_sl_forgery sl-forgery "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        ["bash", "--norc", "-c", program], capture_output=True, text=True, env=os.environ.copy(), check=True, cwd=cwd
    )
    return sorted(set(result.stdout.split()))


def test_bash_completes_subcommands_options_servers_and_job_ids(completion_home, tmp_path):
    (tmp_path / "analysis_job.sh").write_text("#!/bin/bash\n")
    (tmp_path / "notes.txt").write_text("")
    assert bash_complete("sl-forgery submit ana", cwd=tmp_path) == ["analysis_job.sh"]
    assert bash_complete("sl-forgery sta") == ["status"]
    assert {"submit", "wait", "server", "doctor"} <= set(bash_complete("sl-forgery "))
    assert bash_complete("sl-forgery wait --ti") == ["--timeout"]
    assert bash_complete("sl-forgery status --server ") == ["alpha", "beta-2"]
    assert bash_complete("sl-forgery wait 41") == ["4101", "4102"]
    assert bash_complete("sl-forgery server ") == sorted(
        ["add", "list", "show", "remove", "default", "check", "setup-key", "import"]
    )


def test_fish_completes_subcommands_and_servers(completion_home):
    script = ROOT / "completions" / "sl-forgery.fish"

    def fish_complete(words: str) -> list[str]:
        result = subprocess.run(
            ["fish", "--no-config", "-c", f"source {script}; complete -C {json.dumps(words)}"],
            capture_output=True,
            text=True,
            check=True,
        )
        return sorted(line.split("\t")[0] for line in result.stdout.splitlines())

    assert fish_complete("sl-forgery sta") == ["status"]
    assert fish_complete("sl-forgery status --server ") == ["alpha", "beta-2"]
    assert fish_complete("sl-forgery cancel ") == ["4101", "4102"]


def test_zsh_loads_the_completion_without_error(tmp_path):
    assert subprocess.run(["zsh", "-n", str(ROOT / "completions" / "_sl-forgery")]).returncode == 0
    program = (
        f"fpath=({ROOT / 'completions'} $fpath); autoload -U compinit; compinit -u -d {tmp_path}/dump; "
        "print -r -- $_comps[sl-forgery]"
    )
    result = subprocess.run(["zsh", "-f", "-c", program], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "" and result.stdout.strip() == "_sl-forgery"


def test_json_documents_follow_their_schemas(profile_name):
    job_id = cli("run", "--mem", "0.25", "--", "sh", "-c", "exit 5").stdout.strip()
    waited = cli("wait", "--json", job_id)
    assert waited.returncode == 5
    document = json.loads(waited.stdout)
    jsonschema.validate(document, sl_forgery.JSON_SCHEMAS["jobs"])
    assert document["jobs"][0]["state"] == "FAILED" and document["jobs"][0]["exit_code"] == 5
    for argv in (["status", "--json", job_id], ["status", "--json"], ["queue", "--json"]):
        result = cli(*argv)
        assert result.returncode == 0, result.stderr
        jsonschema.validate(json.loads(result.stdout), sl_forgery.JSON_SCHEMAS["jobs"])
    history = json.loads(cli("history", "--json").stdout)
    jsonschema.validate(history, sl_forgery.JSON_SCHEMAS["history"])
    assert history["jobs"][-1]["job_id"] == job_id
    servers = json.loads(cli("server", "list", "--json").stdout)
    jsonschema.validate(servers, sl_forgery.JSON_SCHEMAS["servers"])
    assert servers["default"] == profile_name


def on_terminal(*args: str, env: dict[str, str]) -> str:
    """What sl-forgery prints when its stdout is a terminal, as in an interactive shell."""
    controller, terminal = pty.openpty()
    try:
        subprocess.run(
            [console_script("sl-forgery"), *args],
            stdin=subprocess.DEVNULL,
            stdout=terminal,
            stderr=subprocess.DEVNULL,
            env=env,
            timeout=60,
            check=True,
        )
    finally:
        os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the terminal side is closed and everything has been read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    return b"".join(chunks).decode().replace("\r\n", "\n")


def test_job_states_are_coloured_on_a_terminal_only(profile_name):
    completed = cli("run", "--mem", "0.25", "--", "true").stdout.strip()
    failed = cli("run", "--mem", "0.25", "--", "sh", "-c", "exit 4").stdout.strip()
    assert cli("wait", completed).returncode == 0 and cli("wait", failed).returncode == 4
    terminal_env = {**os.environ, "TERM": "xterm"}
    terminal_env.pop("NO_COLOR", None)

    coloured = on_terminal("status", completed, failed, env=terminal_env)
    assert "\033[32mCOMPLETED\033[0m" in coloured and "\033[31mFAILED\033[0m" in coloured
    plain_lines = [
        line.replace("\033[32m", "").replace("\033[31m", "").replace("\033[0m", "") for line in coloured.splitlines()
    ]
    assert plain_lines == cli("status", completed, failed).stdout.splitlines()  # the same table, aligned alike

    for env in ({**terminal_env, "NO_COLOR": "1"}, {**terminal_env, "TERM": "dumb"}):
        assert "\033[" not in on_terminal("status", completed, failed, env=env)
    piped = cli("status", completed, failed)
    assert "\033[" not in piped.stdout
    assert piped.stdout.splitlines()[0].split() == ["JOBID", "STATE", "EXIT", "NAME", "REASON"]
    listing = cli("server", "list")
    assert "\033[" not in listing.stdout
    assert listing.stdout.splitlines()[0].split() == ["NAME", "DEFAULT", "DESTINATION", "AUTH"]


def test_dry_run_leaves_the_cluster_untouched(profile_name, cluster, tmp_path):
    name = f"dry-{os.getpid()}-{time.time_ns()}"
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --time=1\necho hi\n")
    submitted = cli("submit", "--dry-run", "--name", name, str(script))
    ran = cli("run", "--dry-run", "--name", name, "--env", "analysis", "--", "echo", "hi")
    assert submitted.returncode == 0 and "echo hi" in submitted.stdout and "sbatch --parsable" in submitted.stderr
    assert ran.returncode == 0 and ran.stdout.startswith("#!/bin/bash\n#SBATCH")
    time.sleep(1)
    seen = cluster.ssh(f"sacct -X -n -P -S now-1hour --name={name} -o JobID; squeue -h --name={name} -o %i").stdout
    assert seen == ""
    assert not sl_forgery.history_path().exists()


def test_doctor_passes_on_a_healthy_setup_and_reports_a_broken_keyring(profile_name, secret_service):
    healthy = cli("doctor")
    assert healthy.returncode == 0, healthy.stdout
    assert [line.split("  ")[0] for line in healthy.stdout.splitlines()[1:]] == [
        "openssh",
        "config",
        "keyring",
        "connection",
        "login shell",
        "slurm",
        "accounting",
        "modules",
        "environment",
    ]
    assert all(" ok " in line for line in healthy.stdout.splitlines()[1:])
    # A keyring no profile needs is no failure; one a profile keeps its password in is.
    no_keyring = {**os.environ, "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
    key_only = cli("doctor", env=no_keyring)
    assert key_only.returncode == 0, key_only.stdout
    assert "not needed" in next(line for line in key_only.stdout.splitlines() if line.startswith("keyring"))
    config = sl_forgery.load_config()
    config.servers[profile_name].password_in_keyring = True
    config.save()
    broken = cli("doctor", env=no_keyring)
    assert broken.returncode == 1
    keyring_row = next(line for line in broken.stdout.splitlines() if line.startswith("keyring"))
    assert "FAIL" in keyring_row and "Secret Service" in keyring_row and f"needed for {profile_name}" in keyring_row


def test_doctor_reports_a_stopped_sshd(profile_name, cluster):
    sl_forgery.Server.from_profile(profile_name).connection.disconnect()
    pid = int((cluster.state / "run" / "sshd.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        result = cli("doctor")
        assert result.returncode == 1
        rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
        assert "FAIL" in rows["connection"] and f"{cluster.host}:{cluster.port}" in rows["connection"]
        assert "Connection refused" in rows["connection"]
        assert all("FAIL" in rows[name] for name in ("slurm", "accounting", "environment"))
    finally:
        subprocess.run([str(CLUSTER), "up"], check=True, capture_output=True)


def test_usage_errors_exit_two_with_one_line(home):
    result = cli("wait")
    assert result.returncode == 2 and "required" in result.stderr
    zero_cpus = cli("run", "--dry-run", "--cpus", "0", "--", "true")
    assert zero_cpus.returncode == 2 and "--cpus must be at least 1, not 0" in zero_cpus.stderr
    negative_memory = cli("run", "--dry-run", "--mem", "-3", "--", "true")
    assert negative_memory.returncode == 2 and "--mem must be a positive number of gigabytes" in negative_memory.stderr
    bad_time = cli("submit", "--dry-run", "--time", "0", __file__)
    assert bad_time.returncode == 2 and "--time (minutes) must be at least 1, not 0" in bad_time.stderr
    no_action = cli("server")
    assert no_action.returncode == 2 and no_action.stderr.startswith("usage: sl-forgery server")
    assert "setup-key" in no_action.stderr
    assert cli("frobnicate").returncode == 2
    no_config = cli("status")
    assert no_config.returncode == 2 and no_config.stderr.count("\n") == 1
    assert "sl-forgery server add" in no_config.stderr


def test_help_lists_the_exit_codes_and_environment(home):
    text = cli("--help").stdout
    for fragment in ("124  --timeout reached", "130  interrupted", "255  SSH failure", "SL_FORGERY_CONFIG"):
        assert fragment in text


def test_user_errors_never_show_a_traceback(home, tmp_path):
    not_a_script = tmp_path / "dir-not-script"
    not_a_script.mkdir()
    for argv in (["submit", str(not_a_script)], ["-v", "submit", str(not_a_script)], ["logs", "77"]):
        result = cli(*argv)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.startswith("sl-forgery: error: ")
