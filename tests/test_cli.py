"""The command line as a shell user meets it: completion in real shells, --json, doctor, dry runs, exit codes."""

import json
import os
import pty
import re
import signal
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest

import sl_forgery
from conftest import CLUSTER, ROOT, cli, console_script, own_masters, process_state

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


# Drives an interactive zsh through a pseudo-terminal (zsh/zpty), presses Tab after the words and prints each match
# that the completion system adds, as <<match>>; the null lines mark where completion starts and ends.
ZSH_CAPTURE = r"""
zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z "PROMPT=''; fpath=($1 \$fpath); autoload -U compinit; compinit -u -d $2"
zpty -w z 'bindkey "^I" complete-word
null-line() { echo -E - $'"'"'\0'"'"' }
compprefuncs=(null-line); comppostfuncs=(null-line exit)
compadd() {
  if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then builtin compadd "$@"; return $?; fi
  typeset -a __hits
  builtin compadd -A __hits "$@"
  local hit; for hit in $__hits; do echo -E - "<<$hit>>"; done
}'
zpty -w z "$3"$'\t'
integer marks=0
local line
while zpty -r z line; do
  [[ $line == *$'\0'* ]] && { (( marks++ )) && break || continue }
  (( marks )) && print -r -- "$line"
done
zpty -d z
"""


def zsh_complete(words: str, tmp_path: Path, cwd: Path | None = None) -> list[str]:
    capture = tmp_path / "capture.zsh"
    capture.write_text(ZSH_CAPTURE)
    result = subprocess.run(
        ["zsh", "-f", str(capture), str(ROOT / "completions"), str(tmp_path / "zcompdump"), words],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )
    return sorted(set(re.findall(r"<<(.*?)>>", result.stdout)))


def test_zsh_completes_subcommands_options_files_servers_and_job_ids(completion_home, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    (files / "analysis_job.sh").write_text("#!/bin/bash\n")
    assert zsh_complete("sl-forgery sta", tmp_path) == ["status"]
    assert {"submit", "wait", "server", "doctor"} <= set(zsh_complete("sl-forgery ", tmp_path))
    assert zsh_complete("sl-forgery wait --ti", tmp_path) == ["--timeout"]
    assert zsh_complete("sl-forgery status --server ", tmp_path) == ["alpha", "beta-2"]
    assert zsh_complete("sl-forgery wait 41", tmp_path) == ["4101", "4102"]
    assert zsh_complete("sl-forgery submit ana", tmp_path, cwd=files) == ["analysis_job.sh"]


# The field names the README documents for each --json document (a stable contract: fields may be added, never
# renamed or removed). Pinned here, not read from the code's own schemas, so that a rename fails.
JOB_FIELDS = {"job_id", "state", "finished", "exit_code", "signal", "reason", "name", "node", "time_left"}
HISTORY_FIELDS = {
    "job_id",
    "server",
    "name",
    "working_directory",
    "output_log",
    "error_log",
    "submitted",
    "user",
    "array",
}
SERVER_FIELDS = {"name", "host", "user", "port"}


def test_json_documents_have_the_documented_fields_and_list_the_job(profile_name, cluster):
    failed = cli("run", "--mem", "0.25", "--name", "json-failed", "--", "sh", "-c", "exit 5").stdout.strip()
    live = cli("run", "--mem", "0.25", "--name", "json-live", "--", "sleep", "300").stdout.strip()
    try:
        waited = cli("wait", "--json", failed)
        assert waited.returncode == 5
        (job,) = json.loads(waited.stdout)["jobs"]
        assert set(job) >= JOB_FIELDS
        assert (job["job_id"], job["state"], job["finished"], job["exit_code"], job["signal"], job["name"]) == (
            failed,
            "FAILED",
            True,
            5,
            0,
            "json-failed",
        )
        (job,) = json.loads(cli("status", "--json", failed).stdout)["jobs"]
        assert set(job) >= JOB_FIELDS and (job["job_id"], job["exit_code"]) == (failed, 5)
        recent = json.loads(cli("status", "--json").stdout)["jobs"]  # no ids: the recent jobs from here
        assert {failed, live} <= {entry["job_id"] for entry in recent}
        assert cluster.wait_for_state(live, {"RUNNING"}) == "RUNNING"
        queued = {entry["job_id"]: entry for entry in json.loads(cli("queue", "--json").stdout)["jobs"]}
        assert set(queued[live]) >= JOB_FIELDS
        assert (queued[live]["state"], queued[live]["finished"], queued[live]["name"]) == (
            "RUNNING",
            False,
            "json-live",
        )
        assert queued[live]["exit_code"] is None and queued[live]["node"] and queued[live]["time_left"]
        history = json.loads(cli("history", "--json").stdout)["jobs"]
        assert [entry["job_id"] for entry in history] == [failed, live]  # oldest first
        assert all(set(entry) >= HISTORY_FIELDS for entry in history)
        assert (history[0]["server"], history[0]["name"], history[0]["user"]) == (
            profile_name,
            "json-failed",
            "slftest",
        )
        assert isinstance(history[0]["submitted"], (int, float)) and history[0]["array"] == ""
        servers = json.loads(cli("server", "list", "--json").stdout)
        assert servers["default"] == profile_name
        (entry,) = servers["servers"]
        assert set(entry) >= SERVER_FIELDS
        assert (entry["name"], entry["host"], entry["user"], entry["port"]) == (
            profile_name,
            "127.0.0.1",
            "slftest",
            2222,
        )
        for name, document in (("jobs", waited.stdout), ("servers", json.dumps(servers))):
            jsonschema.validate(json.loads(document), sl_forgery.JSON_SCHEMAS[name])
    finally:
        cli("cancel", live)


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


def test_dry_run_leaves_the_cluster_untouched(profile_name, cluster, tmp_path, unique_name):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --time=1\necho hi\n")
    submitted = cli("-v", "submit", "--dry-run", "--name", unique_name, str(script))
    ran = cli("-v", "run", "--dry-run", "--name", unique_name, "--env", "analysis", "--", "echo", "hi")
    assert submitted.returncode == 0 and "echo hi" in submitted.stdout and "sbatch --parsable" in submitted.stderr
    assert ran.returncode == 0 and ran.stdout.startswith("#!/bin/bash\n#SBATCH")
    # -v shows every ssh command: there is none, and no connection was opened.
    assert "+ ssh" not in submitted.stderr + ran.stderr and own_masters() == {}
    assert cluster.ssh(f"squeue -h --states=all --name={unique_name} -o %i").stdout == ""
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
        "login output",
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


@pytest.mark.exclusive
def test_doctor_reports_a_stopped_sshd(profile_name, cluster):
    pid = int((cluster.state / "run" / "sshd.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    try:
        # Until the listener is gone; an exited daemon may linger as a zombie (state Z) for a while here.
        deadline = time.monotonic() + 10
        while process_state(pid) not in ("", "Z"):
            assert time.monotonic() < deadline, "sshd did not stop"
            time.sleep(0.1)
        result = cli("doctor")
        assert result.returncode == 255  # an SSH failure, as for every command
        rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
        assert "FAIL" in rows["connection"] and f"{cluster.host}:{cluster.port}" in rows["connection"]
        assert "Connection refused" in rows["connection"]
        assert all("not checked: no connection" in rows[name] for name in ("slurm", "accounting", "environment"))
        assert not any("FAIL" in rows[name] for name in ("slurm", "accounting", "environment"))
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
