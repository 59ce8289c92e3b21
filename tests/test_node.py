"""A compute node that feels local, on the real cluster: a shell in a job through a real terminal, a job's port
forwarded here, files synced around a job, and an editor's ssh reaching the node through the shared connection."""

import json
import os
import pty
import re
import select
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest

import sl_forgery
from conftest import cli, client_port, console_script


def node_hostname(cluster, job_id: str) -> str:
    """The host name of the node a job runs on, asked with plain ssh (no sl-forgery)."""
    node = cluster.ssh(f"squeue -h -j {job_id} -o %N").stdout.strip()
    return re.search(r"NodeHostName=(\S+)", cluster.ssh(f"scontrol show node {node}").stdout).group(1)


@pytest.fixture
def sleeping_job(profile_name, cluster):
    """A running job of our own that sleeps, for commands that attach to a job; cancelled afterwards."""
    job_id = cli("run", "--mem", "0.25", "--time", "10", "--", "sleep", "600").stdout.strip()
    assert cluster.wait_for_state(job_id, {"RUNNING"}) == "RUNNING"
    yield job_id
    cli("cancel", job_id)


class Terminal:
    """A command on a real pseudo-terminal, as a user at a keyboard runs it."""

    def __init__(self, *argv: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execv(argv[0], list(argv))
        self.output = b""

    def read_until(self, pattern: bytes, deadline: float = 60) -> bool:
        end = time.monotonic() + deadline
        while not re.search(pattern, self.output):
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            ready, _, _ = select.select([self.fd], [], [], remaining)
            try:
                chunk = os.read(self.fd, 4096) if ready else b""
            except OSError:  # the other side closed: the command ended
                return bool(re.search(pattern, self.output))
            if ready and not chunk:
                return bool(re.search(pattern, self.output))
            self.output += chunk
        return True

    @property
    def text(self) -> str:
        """What the terminal showed, without carriage returns and terminal escapes (bracketed paste, colours)."""
        text = self.output.decode(errors="replace").replace("\r", "")
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def exit_code(self, deadline: float = 60) -> int:
        self.read_until(rb"(?!)", deadline=deadline)  # a pattern that never matches: read until the end
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def test_shell_in_a_running_job_runs_inside_it_on_its_node(sleeping_job, cluster):
    terminal = Terminal(console_script("sl-forgery"), "shell", sleeping_job)
    assert terminal.read_until(rb"\$ "), terminal.output
    terminal.type('echo "in job $SLURM_JOB_ID"; hostname; tty')
    assert terminal.read_until(rb"/dev/pts/\d+"), terminal.output
    terminal.type("exit 7")
    assert terminal.exit_code() == 7
    assert f"\nin job {sleeping_job}\n{node_hostname(cluster, sleeping_job)}\n" in terminal.text
    assert cluster.job_state(sleeping_job) == "RUNNING"  # the user's own job is left alone


def test_shell_with_an_environment_and_set_up_lines_runs_them_first(sleeping_job):
    terminal = Terminal(
        console_script("sl-forgery"), "shell", sleeping_job, "--env", "analysis", "--setup", "export GREETING=hi"
    )
    assert terminal.read_until(rb"\$ "), terminal.output
    terminal.type('echo "env=$CONDA_DEFAULT_ENV greeting=$GREETING python=$(command -v python)"; exit')
    assert terminal.exit_code() == 0
    assert re.search(r"\nenv=analysis greeting=hi python=\S*/envs/analysis/bin/python\n", terminal.text), terminal.text


@pytest.mark.parametrize("after", ["--cancel", "--keep"])
def test_shell_without_a_job_holds_one_for_itself(profile_name, cluster, after):
    terminal = Terminal(console_script("sl-forgery"), "shell", "--mem", "0.25", "--time", "5", after)
    assert terminal.read_until(rb"\$ "), terminal.output
    job_id = re.search(rb"job (\d+) holds the resources", terminal.output).group(1).decode()
    terminal.type('echo "in job $SLURM_JOB_ID"; exit')
    assert terminal.exit_code() == 0
    assert f"\nin job {job_id}\n" in terminal.text
    if after == "--cancel":
        assert json.loads(cli("wait", "--json", "--timeout", "60", job_id).stdout)["jobs"][0]["state"] == "CANCELLED"
    else:
        assert cluster.job_state(job_id) == "RUNNING"
        cli("cancel", job_id)


@pytest.fixture
def web_job(profile_name, cluster, remote_dir):
    """A job serving a page with python -m http.server on a port it picks on its node; (job id, port)."""
    program = (
        "import socket, http.server, functools; s = socket.socket(); s.bind(('', 0)); port = s.getsockname()[1]; "
        "s.close(); open('index.html', 'w').write('served by job ' + __import__('os').environ['SLURM_JOB_ID']); "
        "open('port.tmp', 'w').write(str(port)); __import__('os').rename('port.tmp', 'port'); "
        "http.server.ThreadingHTTPServer(('', port), http.server.SimpleHTTPRequestHandler).serve_forever()"
    )
    job_id = cli("run", "--mem", "0.25", "--time", "10", "--workdir", remote_dir, "--", "python3", "-c", program)
    job_id = job_id.stdout.strip()
    end = time.monotonic() + 60
    while (port := cluster.ssh(f"cat {remote_dir}/port 2>/dev/null || true").stdout.strip()) == "":
        assert time.monotonic() < end, "the web job never wrote its port"
        time.sleep(0.5)
    yield job_id, port
    cli("cancel", job_id)


def page(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def no_longer_serves(url: str, job_id: str) -> bool:
    """Whether the forward to ``job_id``'s page at ``url`` is gone: nothing answers, or, its local port being free
    again, something else does (another run's forward may take it), but not that job's page."""
    try:
        return page(url) != f"served by job {job_id}"
    except urllib.error.URLError:
        return True


def test_forward_of_a_jobs_web_server_returns_its_page(web_job):
    job_id, port = web_job
    forwarded = cli("forward", job_id, port, "--detach")
    assert forwarded.returncode == 0, forwarded.stderr
    url = forwarded.stdout.strip()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url)
    assert page(url) == f"served by job {job_id}"
    document = json.loads(cli("forward", "--list", "--json").stdout)
    jsonschema.validate(document, sl_forgery.JSON_SCHEMAS["forwards"])
    listed = document["forwards"]
    assert [(entry["job_id"], str(entry["port"]), entry["url"]) for entry in listed] == [(job_id, port, url)]
    assert cli("forward", "--stop", job_id).returncode == 0
    assert no_longer_serves(url, job_id)
    assert json.loads(cli("forward", "--list", "--json").stdout)["forwards"] == []


def test_forward_in_the_foreground_ends_with_ctrl_c_and_takes_the_forward_along(web_job):
    job_id, port = web_job
    for fetch_first in (True, False):  # a Ctrl-C after using the URL, and one the moment it is printed
        process = subprocess.Popen(
            [console_script("sl-forgery"), "forward", job_id, port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        url = process.stdout.readline().strip()
        if fetch_first:
            assert page(url) == f"served by job {job_id}"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 130, stderr
        assert f"removed the forward to job {job_id}" in stderr
        assert json.loads(cli("forward", "--list", "--json").stdout)["forwards"] == []
        assert no_longer_serves(url, job_id)


def test_forward_to_a_port_nobody_listens_on_says_so(sleeping_job):
    result = cli("forward", sleeping_job, "9", "--wait-timeout", "2")
    assert result.returncode == 1
    assert result.stderr.endswith(
        f"nothing answers on port 9 of job {sleeping_job}'s node node1 within 2 s; is the program there listening?\n"
    )
    assert json.loads(cli("forward", "--list", "--json").stdout)["forwards"] == []


def test_a_command_that_needs_a_node_refuses_an_ended_job(profile_name):
    job_id = cli("run", "--mem", "0.25", "--wait", "--", "true").stdout.splitlines()[0]
    for command in (["shell", job_id], ["forward", job_id, "80"], ["code", job_id]):
        result = cli(*command)
        assert result.returncode == 1
        assert result.stderr == f"sl-forgery: error: job {job_id} has ended (COMPLETED): it holds no node any more\n"


# Real event files, written on the server by TensorBoard's own writer, in a job running the test bed's environment.
WRITE_EVENTS = (
    "import os, sys, time; from tensorboard.compat.proto import event_pb2, summary_pb2; "
    "from tensorboard.summary.writer.event_file_writer import EventFileWriter; "
    "os.makedirs(sys.argv[1], exist_ok=True); writer = EventFileWriter(sys.argv[1]); "
    "[writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=["
    "summary_pb2.Summary.Value(tag=sys.argv[2], simple_value=1.0 / (step + 1))]))) for step in range(3)]; "
    "writer.close()"
)


@pytest.fixture
def event_logs(profile_name, remote_dir, unique_name):
    """A log directory on the server holding one run of three steps of one scalar: (logdir, run, tag)."""
    logdir, run, tag = f"{remote_dir}/logs", unique_name, f"loss_{unique_name[-8:]}"
    written = cli(
        "run",
        "--env",
        "tensorboard",
        "--mem",
        "0.5",
        "--wait",
        "--",
        "python",
        "-c",
        WRITE_EVENTS,
        f"{logdir}/{run}",
        tag,
    )
    assert written.returncode == 0, written.stderr
    return logdir, run, tag


def assert_serves(url: str, run: str, tag: str) -> None:
    """TensorBoard at ``url`` shows the run, its scalar and the three values written."""
    assert json.loads(page(url + "data/runs")) == [run]
    assert tag in json.loads(page(url + "data/plugin/scalars/tags"))[run]
    scalars = json.loads(page(url + f"data/plugin/scalars/scalars?run={run}&tag={tag}"))
    assert [(step, value) for _, step, value in scalars] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]


def listening(cluster, port: int) -> list[str]:
    """The local addresses a TCP port is listened on, on the test bed's node (which is its login host)."""
    return cluster.ssh(f"ss -Hltn 'sport = :{port}' | awk '{{print $4}}'").stdout.split()


def wait_until(condition, what: str, deadline: float = 60) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, what
        time.sleep(0.2)


def steps(cluster, job_id: str) -> list[str]:
    return cluster.ssh(f"squeue -h -s -j {job_id} -o %i", check=False).stdout.split()


def test_tensorboard_as_a_step_of_a_running_job_serves_the_runs_to_the_tunnel_only_until_stopped(
    sleeping_job, event_logs, cluster
):
    logdir, run, tag = event_logs
    started = cli("forward", sleeping_job, "--tensorboard", logdir, "--env", "tensorboard", "--detach", "--json")
    assert started.returncode == 0, started.stderr
    record = json.loads(started.stdout)
    url, step, port = record["url"], record["started"], record["port"]
    assert re.fullmatch(rf"http://127\.0\.0\.1:{record['local_port']}/[0-9a-f]{{32}}/", url)
    assert re.fullmatch(rf"{sleeping_job}\.\d+", step) and step in steps(cluster, sleeping_job)
    assert_serves(url, run, tag)

    # What someone else on the node sees: TensorBoard on the node's address (the test bed's NodeAddr is the
    # loopback), answering nothing but its secret path, which no command line shows.
    assert listening(cluster, port) == [f"127.0.0.1:{port}"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        page(f"http://127.0.0.1:{record['local_port']}/data/runs")
    assert refused.value.code == 404
    secret = url.rsplit("/", 2)[1]
    assert secret not in cluster.ssh("ps -eo args").stdout

    document = json.loads(cli("forward", "--list", "--json").stdout)
    jsonschema.validate(document, sl_forgery.JSON_SCHEMAS["forwards"])
    assert [
        (entry["job_id"], entry["tensorboard"], entry["started"], entry["url"]) for entry in document["forwards"]
    ] == [(sleeping_job, logdir, step, url)]
    stopped = cli("forward", "--stop", sleeping_job)
    assert stopped.returncode == 0, stopped.stderr
    assert f"ended step {step}" in stopped.stderr
    with pytest.raises(urllib.error.URLError):
        page(url)
    wait_until(lambda: step not in steps(cluster, sleeping_job), f"step {step} still runs")
    wait_until(lambda: not listening(cluster, port), f"TensorBoard still listens on port {port}")
    assert cluster.job_state(sleeping_job) == "RUNNING"  # the user's own job is left alone
    assert json.loads(cli("forward", "--list", "--json").stdout)["forwards"] == []


def test_tensorboard_in_a_job_of_its_own_is_cancelled_by_stop(event_logs, cluster, unique_name):
    logdir, run, tag = event_logs
    started = cli(
        "forward",
        "--new",
        "--tensorboard",
        logdir,
        "--env",
        "tensorboard",
        "--mem",
        "0.5",
        "--time",
        "10",
        "--name",
        unique_name,
        "--detach",
        "--json",
    )
    assert started.returncode == 0, started.stderr
    record = json.loads(started.stdout)
    job_id = record["job_id"]
    assert record["started"] == job_id
    assert cluster.ssh(f"squeue -h -j {job_id} -o %j").stdout.strip() == unique_name
    assert_serves(record["url"], run, tag)
    stopped = cli("forward", "--stop", job_id)
    assert stopped.returncode == 0, stopped.stderr
    with pytest.raises(urllib.error.URLError):
        page(record["url"])
    assert cluster.wait_for_state(job_id, {"CANCELLED"}) == "CANCELLED"
    wait_until(lambda: not listening(cluster, record["port"]), "TensorBoard still listens")


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_tensorboard_in_the_foreground_ends_its_step_and_tunnel_on_ctrl_c_sigterm_and_sighup(
    sleeping_job, event_logs, cluster, signal_number
):
    logdir, run, tag = event_logs
    process = subprocess.Popen(
        [console_script("sl-forgery"), "forward", sleeping_job, "--tensorboard", logdir, "--env", "tensorboard"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = process.stdout.readline().strip()
    assert url, process.communicate(timeout=60)[1]
    assert_serves(url, run, tag)
    (step,) = [step for step in steps(cluster, sleeping_job) if not step.endswith(".batch")]
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    with pytest.raises(urllib.error.URLError):
        page(url)
    wait_until(lambda: step not in steps(cluster, sleeping_job), f"step {step} still runs")
    assert cluster.job_state(sleeping_job) == "RUNNING"


def test_a_tensorboard_step_cancelled_elsewhere_ends_the_foreground_forward(sleeping_job, event_logs, cluster):
    process = subprocess.Popen(
        [console_script("sl-forgery"), "forward", sleeping_job, "--tensorboard", event_logs[0], "--env", "tensorboard"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = process.stdout.readline().strip()
    assert url, process.communicate(timeout=60)[1]
    (step,) = [step for step in steps(cluster, sleeping_job) if not step.endswith(".batch")]
    cluster.ssh(f"scancel {step}")
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    assert stderr.endswith(f"sl-forgery: TensorBoard's step {step} ended; the forward is gone\n")
    with pytest.raises(urllib.error.URLError):
        page(url)
    assert cluster.job_state(sleeping_job) == "RUNNING"


def test_a_tensorboard_step_cancelled_elsewhere_leaves_the_list_with_its_forward(sleeping_job, event_logs, cluster):
    started = cli("forward", sleeping_job, "--tensorboard", event_logs[0], "--env", "tensorboard", "--detach", "--json")
    assert started.returncode == 0, started.stderr
    record = json.loads(started.stdout)
    cluster.ssh(f"scancel {record['started']}")
    wait_until(lambda: record["started"] not in steps(cluster, sleeping_job), "the step still runs")
    assert json.loads(cli("forward", "--list", "--json").stdout)["forwards"] == []
    with pytest.raises(urllib.error.URLError):
        page(record["url"])


def test_tensorboard_in_an_environment_without_it_says_so_and_leaves_nothing(sleeping_job, event_logs, cluster):
    result = cli("forward", sleeping_job, "--tensorboard", event_logs[0], "--env", "analysis")
    assert result.returncode == 1
    assert re.search(
        rf"sl-forgery: error: TensorBoard did not start: its step in job {sleeping_job} ended \(exit 127\): "
        r".*tensorboard: command not found\n$",
        result.stderr,
    ), result.stderr
    assert [step for step in steps(cluster, sleeping_job) if not step.endswith(".batch")] == []
    assert json.loads(cli("forward", "--list", "--json").stdout)["forwards"] == []


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["12", "6006", "--tensorboard", "runs"], "TensorBoard takes a free port on its node: leave out PORT"),
        (
            ["12", "--new", "--tensorboard", "runs"],
            "--new starts a job of its own: leave out the JOBID, or leave out --new",
        ),
        (
            ["12", "--tensorboard", "runs", "--mem", "2"],
            "--mem is for a new job; add --new (with --tensorboard), or leave it out",
        ),
        (["12", "6006", "--env", "analysis"], "--env is for TensorBoard: add --tensorboard LOGDIR"),
        (["--new"], "--new is for TensorBoard: add --tensorboard LOGDIR"),
    ],
)
def test_forward_refuses_flags_that_do_not_fit_together(profile_name, arguments, message):
    result = cli("forward", *arguments)
    assert (result.returncode, result.stderr) == (2, f"sl-forgery: error: {message}\n")


def test_tensorboard_on_a_directory_that_is_not_there_is_refused_before_anything_starts(sleeping_job, cluster):
    result = cli("forward", sleeping_job, "--tensorboard", "no/such/logs", "--env", "tensorboard")
    assert (result.returncode, result.stderr) == (
        2,
        "sl-forgery: error: LOGDIR no/such/logs is no directory on 'test'; give the runs' log directory\n",
    )
    assert [step for step in steps(cluster, sleeping_job) if not step.endswith(".batch")] == []


def make_tree(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Files of several kinds, modes and ages; returns what must arrive: bytes, mode and mtime by path."""
    files = {
        "data.bin": (os.urandom(70000), 0o640, 1_600_000_000),
        "run.sh": (b"#!/bin/sh\necho run\n", 0o755, 1_650_000_000),
        "sub dir/notes.txt": ("naïve café\n".encode(), 0o600, 1_700_000_000),
        ".gitignore": (b"*.log\nbuild/\n", 0o644, 1_700_000_100),
    }
    ignored = {"debug.log": b"noise\n", "build/out.o": b"\x7fELF", "sub dir/trace.log": b"noise\n"}
    for name, (content, mode, mtime) in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)
        os.utime(path, (mtime, mtime))
    for name, content in ignored.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return files


def remote_listing(cluster, directory: str) -> dict[str, tuple[str, str, str]]:
    """sha256, mode and mtime of every file under a remote directory, read with plain ssh."""
    output = cluster.ssh(
        f"cd {directory} && find . -type f -printf '%P\\t%m\\t%T@\\n' | while IFS=\"$(printf '\\t')\" read -r p m t; "
        f'do printf \'%s\\t%s\\t%s\\t%s\\n\' "$p" "$(sha256sum < "$p" | cut -d\' \' -f1)" "$m" "${{t%%.*}}"; done'
    ).stdout
    return {line.split("\t")[0]: tuple(line.split("\t")[1:]) for line in output.splitlines()}


def test_sync_round_trip_keeps_bytes_modes_and_times_skips_ignored_files_and_deletes_nothing(
    profile_name, cluster, remote_dir, tmp_path
):
    import hashlib

    local = tmp_path / "project"
    files = make_tree(local)
    cluster.ssh(f"mkdir -p {remote_dir} && echo mine > {remote_dir}/already-there.txt")

    sent = cli("sync", "up", str(local), remote_dir)
    assert sent.returncode == 0, sent.stderr
    expected = {
        name: (hashlib.sha256(content).hexdigest(), f"{mode:o}", str(mtime))
        for name, (content, mode, mtime) in files.items()
    }
    listing = remote_listing(cluster, remote_dir)
    assert listing.pop("already-there.txt")[0] == hashlib.sha256(b"mine\n").hexdigest()
    assert listing == expected

    (local / "run.sh").write_bytes(b"#!/bin/sh\necho changed\n")
    dry = cli("sync", "up", "--dry-run", str(local), remote_dir)
    assert dry.returncode == 0 and dry.stdout == "run.sh\n"
    assert remote_listing(cluster, remote_dir)["run.sh"] == expected["run.sh"]

    back = tmp_path / "back"
    back.mkdir()
    (back / "local-only.txt").write_text("stays\n")
    fetched = cli("sync", "down", remote_dir, str(back))
    assert fetched.returncode == 0, fetched.stderr
    for name, (content, mode, mtime) in files.items():
        path = back / name
        assert path.read_bytes() == content and path.stat().st_mode & 0o777 == mode and path.stat().st_mtime == mtime
    assert (back / "already-there.txt").read_text() == "mine\n" and (back / "local-only.txt").read_text() == "stays\n"
    assert not (back / "debug.log").exists() and not (back / "build").exists()


def test_run_syncs_its_input_up_and_its_results_down_around_the_job(profile_name, tmp_path):
    inputs, results = tmp_path / "inputs", tmp_path / "results"
    inputs.mkdir()
    (inputs / "words.txt").write_text("alpha beta\n")
    ran = cli(
        "run",
        "--mem",
        "0.25",
        "--sync-up",
        str(inputs),
        "--sync-down",
        str(results),
        "--wait",
        "--",
        "sh",
        "-c",
        "tr a-z A-Z < words.txt > shouted.txt",
    )
    assert ran.returncode == 0, ran.stderr
    assert (results / "shouted.txt").read_text() == "ALPHA BETA\n"
    assert (results / "words.txt").read_text() == "alpha beta\n"


@pytest.fixture
def editor_ssh_config(profile_name, cluster, tmp_path, monkeypatch) -> Path:
    """The ssh config an editor reads (SL_FORGERY_SSH_CONFIG stands for ~/.ssh/config, which tests must not touch),
    and a profile whose nodes run sshd where the test cluster's node does."""
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text("# the user's own settings\n")
    ssh_config.chmod(0o600)
    monkeypatch.setenv("SL_FORGERY_SSH_CONFIG", str(ssh_config))
    config = sl_forgery.load_config()
    config.servers[profile_name].node_ssh_port = cluster.port
    config.save()
    return ssh_config


def socket_owners(ss_filter: str) -> set[int]:
    """The pids of the processes holding the one established TCP socket that an ss filter selects (sshd's
    privileged monitor and its unprivileged child share a connection's socket)."""
    listed = subprocess.run(["ss", "-Htnp", "state", "established", ss_filter], capture_output=True, text=True)
    assert len(listed.stdout.splitlines()) == 1, listed.stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", listed.stdout)}


def plain_ssh(ssh_config: Path, alias: str, command: str) -> subprocess.CompletedProcess:
    """ssh as an editor runs it: the user's config, the generated Host entry, no sl-forgery."""
    return subprocess.run(
        ["ssh", "-F", str(ssh_config), "-o", "BatchMode=yes", alias, command],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_code_writes_a_host_entry_that_reaches_the_node_through_the_shared_connection(
    sleeping_job, cluster, editor_ssh_config
):
    made = cli("code", sleeping_job, "--include")
    assert made.returncode == 0, made.stderr
    alias = f"slf-{sleeping_job}"
    assert made.stdout == f"{alias}\n"
    entries = sl_forgery.host_entries_path()
    assert editor_ssh_config.read_text().splitlines()[0] == f"Include {entries}"
    assert entries.stat().st_mode & 0o777 == 0o600

    hostname = node_hostname(cluster, sleeping_job)
    master_port = client_port(sl_forgery.Server.from_profile("test").connection)
    session = subprocess.Popen(
        [
            "ssh",
            "-F",
            str(editor_ssh_config),
            "-o",
            "BatchMode=yes",
            alias,
            'echo "$SSH_CONNECTION"; hostname; sleep 30',
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        node_port, reached_host = session.stdout.readline().split()[1], session.stdout.readline().strip()
        assert reached_host == hostname
        # The node here is the login node's own sshd: the connection to it was opened by the sshd process that
        # serves our master, that is, over the existing connection, and not by a login of its own.
        node_side = socket_owners(f"( sport = :{node_port} and dport = :{cluster.port} )")
        master_side = socket_owners(f"( sport = :{cluster.port} and dport = :{master_port} )")
        assert node_side and node_side <= master_side
    finally:
        session.kill()
        session.wait()

    sl_forgery.Server.from_profile("test").connection.disconnect()
    without_master = plain_ssh(editor_ssh_config, alias, "true")
    assert without_master.returncode == 255  # never a connection of its own
    assert any(marker in without_master.stderr for marker in sl_forgery.NO_MASTER_MARKERS), without_master.stderr

    assert cli("code", "--cleanup").stdout == ""
    assert alias in entries.read_text()  # the job still runs
    cli("cancel", sleeping_job)
    assert cluster.wait_for_state(sleeping_job, {"CANCELLED"}) == "CANCELLED"
    assert cli("code", "--cleanup").returncode == 0
    assert alias not in entries.read_text()


def test_code_says_so_when_the_node_refuses_ssh_and_offers_shell(sleeping_job, editor_ssh_config, cluster):
    config = sl_forgery.load_config()
    config.servers["test"].node_ssh_port = sl_forgery.free_local_port()  # no sshd there
    config.save()
    result = cli("code", sleeping_job)
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"sl-forgery: error: ssh to job {sleeping_job}'s node through the connection failed"
    )
    assert result.stderr.endswith(f"'sl-forgery shell {sleeping_job}' gives a shell in the job\n")
    assert "Include" not in editor_ssh_config.read_text()  # no consent, no change
