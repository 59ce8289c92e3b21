"""Fixtures over real components: the loopback SLURM cluster from scripts/cluster, private directories per test,
and a real Secret Service keyring (gnome-keyring on a private D-Bus session).

Several runs of the suite may share one cluster (two checkouts, or two copies of the suite at once). Every test
that uses the cluster holds a shared lock on STATE/tests.lock while it runs; a test marked ``exclusive`` (it stops
a daemon, delays the epilog or rewrites the test user's .bashrc) holds it exclusively, so it runs while no other
test of any run does, and no other test runs until it has restored what it changed.
"""

from __future__ import annotations

import fcntl
import json
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "cluster"


def pytest_configure(config) -> None:
    """A suite started in the background by a non-interactive shell or under nohup ignores SIGINT and SIGHUP, and a
    program inherits an ignored signal: the commands the tests interrupt would not hear it. The suite takes both
    with a handler that does nothing instead (so it still outlives a closed terminal), which the programs it
    starts do not inherit: they get the default, as from a terminal."""
    import signal

    for number in (signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(number) is signal.SIG_IGN:
            signal.signal(number, lambda *_: None)


@dataclass(frozen=True)
class Cluster:
    state: Path
    host: str
    port: int
    user: str
    home: str
    key: Path
    known_hosts: Path
    ssh_config: Path
    password_file: Path
    sshd_log: Path
    host_key: Path
    slurm_conf: str

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    def ssh(self, command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Plain ssh (no sl-forgery) as the test user, for checks independent of the code under test."""
        return subprocess.run(
            ["ssh", "-F", str(self.ssh_config), "slfc", command],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def sshd_log_mark(self) -> int:
        """Where the test sshd's log ends now: `logins_from_port` counts only what it logs after this."""
        return self.sshd_log.stat().st_size

    def logins_from_port(self, client_port: int, since: int) -> int:
        """Logins the test sshd accepted from one client port since a mark: the log lines of one connection only,
        whatever other runs do at the same time (a port is used again only after its connection has closed)."""
        with self.sshd_log.open("rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
        pattern = rf"^Accepted \S+ for {re.escape(self.user)} from \S+ port {client_port} "
        return len(re.findall(pattern, text, flags=re.MULTILINE))

    def served_host_key(self) -> str:
        """The host key sshd serves right now, as ssh-keyscan sees it."""
        result = subprocess.run(
            ["ssh-keyscan", "-T", "5", "-t", "ed25519", "-p", str(self.port), self.host],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return " ".join(result.stdout.split()[1:3])

    def job_state(self, job_id: str) -> str:
        """The job's state as squeue shows it (it keeps ended jobs for minutes), or '' when it does not."""
        return self.ssh(f"squeue -h --states=all -j {job_id} -o %T", check=False).stdout.strip()

    def wait_for_state(self, job_id: str, states: set[str], deadline: float = 60) -> str:
        end = time.monotonic() + deadline
        while True:
            state = self.job_state(job_id)
            if state in states or time.monotonic() > end:
                return state
            time.sleep(0.2)


def bed() -> dict[str, str]:
    """The test cluster's facts (users, ports, files of its variants), as `scripts/cluster env` prints them."""
    output = subprocess.run([str(CLUSTER), "env"], capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


# No test of this suite needs the cluster for this long: a lock not had by then is held by a run that hangs.
LOCK_DEADLINE = 900


class LockTimeout(Exception):
    pass


def _locked(path: Path, mode: int) -> int:
    """The lock file, flocked in ``mode``; fails after LOCK_DEADLINE seconds instead of waiting forever."""
    import signal

    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)

    def give_up(*_: object) -> None:
        raise LockTimeout(
            f"{path} was not free within {LOCK_DEADLINE} s: another run of the suite holds it "
            f"(see the FLOCK lines for inode {os.fstat(descriptor).st_ino} in /proc/locks)"
        )

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(LOCK_DEADLINE)
    try:
        fcntl.flock(descriptor, mode)
    except BaseException:
        os.close(descriptor)
        raise
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return descriptor


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    """The running test cluster, started when it is not up. It is never brought down here: other runs of the suite,
    a demo or a benchmark may be using it, and none of them tells this run so. scripts/test, which brought it up,
    brings it down; otherwise `scripts/cluster down` does."""
    env = bed()
    state = Path(env["SLF_CLUSTER_STATE"])
    state.mkdir(parents=True, exist_ok=True)
    # Under a shared test lock, so that a daemon an exclusive test stopped on purpose is not restarted under it.
    test_lock = _locked(state / "tests.lock", fcntl.LOCK_SH)
    try:
        if subprocess.run([str(CLUSTER), "status"], capture_output=True).returncode != 0:
            up_lock = _locked(state / "up.lock", fcntl.LOCK_EX)
            try:
                if subprocess.run([str(CLUSTER), "status"], capture_output=True).returncode != 0:
                    subprocess.run([str(CLUSTER), "up"], check=True)
            finally:
                os.close(up_lock)
    finally:
        os.close(test_lock)
    return Cluster(
        state=state,
        host=env["SLF_CLUSTER_HOST"],
        port=int(env["SLF_CLUSTER_PORT"]),
        user=env["SLF_CLUSTER_USER"],
        home=env["SLF_CLUSTER_HOME"],
        key=Path(env["SLF_CLUSTER_KEY"]),
        known_hosts=Path(env["SLF_CLUSTER_KNOWN_HOSTS"]),
        ssh_config=Path(env["SLF_CLUSTER_SSH_CONFIG"]),
        password_file=Path(env["SLF_CLUSTER_PASSWORD_FILE"]),
        sshd_log=Path(env["SLF_CLUSTER_SSHD_LOG"]),
        host_key=Path(env["SLF_CLUSTER_HOST_KEY"]),
        slurm_conf=env["SLURM_CONF"],
    )


@pytest.fixture(autouse=True)
def cluster_lock(request):
    """A shared lock on the cluster for a test that uses it, exclusive for one marked ``exclusive``."""
    if "cluster" not in request.fixturenames:
        assert not request.node.get_closest_marker("exclusive"), "an exclusive test must use the cluster fixture"
        yield
        return
    cluster = request.getfixturevalue("cluster")
    exclusive = request.node.get_closest_marker("exclusive") is not None
    history = request.getfixturevalue("tmp_path") / "state" / "sl-forgery" / "jobs.jsonl"  # see private_dirs
    descriptor = _locked(cluster.state / "tests.lock", fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    try:
        yield
    finally:
        try:
            _cancel_own_jobs(cluster, history)
        finally:
            os.close(descriptor)


def _cancel_own_jobs(cluster, history: Path) -> None:
    """Cancel, as root, every job the test submitted through sl-forgery (its own job history), so that a test that
    failed half-way leaves no job behind to hold the node's CPUs from the tests after it, of this run or another."""
    if not history.is_file():
        return
    job_ids = set()
    for line in history.read_text().splitlines():
        with contextlib.suppress(ValueError, TypeError, KeyError):
            job_ids.add(str(json.loads(line)["job_id"]))
    if job_ids:
        subprocess.run(
            ["scancel", *sorted(job_ids)],
            env={**os.environ, "SLURM_CONF": cluster.slurm_conf},
            capture_output=True,
            timeout=60,
        )


def _control(socket: Path, operation: str) -> list[str]:
    """``ssh -O operation`` to the master listening on one socket (the host name is needed but not used)."""
    return ["ssh", "-F", "/dev/null", "-o", f"ControlPath={socket}", "-O", operation, "master"]


def _end_masters(control_directory: Path) -> None:
    """End every ssh master listening in one test's own control directory: by ``ssh -O exit`` on its socket, else
    by the pid that socket's master reports."""
    if not control_directory.is_dir():
        return
    for socket in control_directory.iterdir():
        if not socket.is_socket():
            continue
        check = subprocess.run(_control(socket, "check"), capture_output=True, text=True, timeout=10)
        pid = re.search(r"pid=(\d+)", check.stderr)
        ended = subprocess.run(_control(socket, "exit"), capture_output=True, timeout=10).returncode == 0
        if not ended and pid:
            try:
                os.kill(int(pid.group(1)), 15)
            except ProcessLookupError:
                pass


@pytest.fixture(autouse=True)
def private_dirs(tmp_path, monkeypatch) -> Path:
    """Every test gets its own config, state, cache and runtime directories, so that no test reuses another's ssh
    masters or files, and none touches the real user's. The runtime directory is short (sl-forgery keeps its
    sockets there only when XDG_RUNTIME_DIR is under 40 characters) and 0700; its masters end with the test."""
    runtime = Path(tempfile.mkdtemp(dir="/tmp", prefix="slr"))
    runtime.chmod(0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in ("SL_FORGERY_CONFIG", "SL_FORGERY_SERVER", "SL_FORGERY_SSH_CONFIG", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    yield runtime
    _end_masters(runtime / f"slf-{os.getuid()}")
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture(scope="session")
def secret_service(tmp_path_factory) -> None:
    """A real Secret Service for the `keyring` library: the one scripts/test started, or our own,
    ended by its pid when the run ends."""
    if os.environ.get("DBUS_SESSION_BUS_ADDRESS") and os.environ.get("SL_FORGERY_TEST_KEYRING") == "ready":
        yield
        return
    data_home = tmp_path_factory.mktemp("keyring-data")
    bus_address, bus_pid = subprocess.run(
        ["dbus-daemon", "--session", "--fork", "--print-address=1", "--print-pid=1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    saved = {name: os.environ.get(name) for name in ("DBUS_SESSION_BUS_ADDRESS", "XDG_DATA_HOME")}
    os.environ["DBUS_SESSION_BUS_ADDRESS"] = bus_address
    os.environ["XDG_DATA_HOME"] = str(data_home)
    daemon = subprocess.Popen(
        ["gnome-keyring-daemon", "--foreground", "--unlock", "--components=secrets"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        # Its control socket goes to the runtime directory, which must outlive every test's own.
        env={**os.environ, "XDG_RUNTIME_DIR": str(data_home)},
    )
    daemon.stdin.write(uuid.uuid4().hex)
    daemon.stdin.close()
    deadline = time.monotonic() + 30
    while not _bus_name_owner_is(daemon.pid):
        assert daemon.poll() is None and time.monotonic() < deadline, "gnome-keyring-daemon did not start"
        time.sleep(0.1)
    try:
        yield
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        os.kill(int(bus_pid), 15)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _bus_name_owner_is(pid: int) -> bool:
    result = subprocess.run(
        [
            "dbus-send",
            "--session",
            "--print-reply",
            "--dest=org.freedesktop.DBus",
            "/",
            "org.freedesktop.DBus.GetConnectionUnixProcessID",
            "string:org.freedesktop.secrets",
        ],
        capture_output=True,
        text=True,
    )
    return result.returncode == 0 and f"uint32 {pid}" in result.stdout


@pytest.fixture
def home(tmp_path) -> Path:
    """The test's private directory, holding its config (config/), state (state/) and cache (cache/)."""
    return tmp_path


@pytest.fixture
def profile_name(cluster, home) -> str:
    """A default server profile 'test' that reaches the cluster with its SSH key."""
    import sl_forgery

    config = sl_forgery.Config(sl_forgery.config_path())
    config.servers["test"] = sl_forgery.Profile(
        name="test",
        host=cluster.host,
        port=cluster.port,
        user=cluster.user,
        identity_file=str(cluster.key),
        ssh_options=[f"UserKnownHostsFile={cluster.known_hosts}", "IdentitiesOnly=yes"],
        working_root=str(Path(cluster.home) / "work"),
        storage_root=str(Path(cluster.home) / "storage"),
        shared_directory_name="lab_data",
    )
    config.default = "test"
    config.save()
    return "test"


@pytest.fixture
def password_only_ssh(cluster, tmp_path, monkeypatch) -> Path:
    """An ssh config, used for every profile through SL_FORGERY_SSH_CONFIG, that reaches the cluster by its
    address with password authentication only, as a legacy credentials file implies."""
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(
        f"Host {cluster.host}\n  Port {cluster.port}\n  PubkeyAuthentication no\n"
        f"  UserKnownHostsFile {cluster.known_hosts}\n"
    )
    monkeypatch.setenv("SL_FORGERY_SSH_CONFIG", str(ssh_config))
    return ssh_config


@pytest.fixture
def server(profile_name):
    import sl_forgery

    with sl_forgery.Server.from_profile(profile_name) as server:
        yield server


@pytest.fixture
def remote_dir(cluster, request) -> str:
    """A fresh absolute directory on the server for one test."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return f"{cluster.home}/tests/{name}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def unique_name(request) -> str:
    """A job name no other test, run or earlier run uses, for asking SLURM about this test's jobs only."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:24]
    return f"{name}-{uuid.uuid4().hex[:8]}"


def own_masters() -> dict[str, int]:
    """The ssh masters in this test's own control directory: socket path -> pid, as each master reports it."""
    import sl_forgery

    masters = {}
    directory = sl_forgery.control_dir()
    for socket in directory.iterdir() if directory.is_dir() else []:
        if socket.is_socket():
            check = subprocess.run(_control(socket, "check"), capture_output=True, text=True, timeout=10)
            found = re.search(r"pid=(\d+)", check.stderr)
            if check.returncode == 0 and found:
                masters[str(socket)] = int(found.group(1))
    return masters


def process_state(pid: int) -> str:
    """ps's state letter for a process, '' when it is gone (an exited process may linger as a zombie, Z)."""
    return subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()[:1]


def client_port(connection) -> int:
    """The local TCP port of the connection a remote command ran over, as the server saw it."""
    return int(connection.run("echo $SSH_CONNECTION").stdout.split()[1])


@pytest.fixture
def slow_epilog(cluster, request):
    """Every job ending now stays COMPLETING for 3 s, as on clusters whose epilog cleans up after each job. It
    slows every run's jobs, so only an exclusive test may use it; removed after."""
    assert request.node.get_closest_marker("exclusive"), "a test that delays the epilog must be marked exclusive"
    delay = cluster.state / "slurm" / "epilog-delay"
    try:
        delay.write_text("3")
        yield
    finally:
        delay.unlink(missing_ok=True)


@contextlib.contextmanager
def variant(name: str):
    """One of the test cluster's harsher set-ups (see scripts/cluster), switched on for a test and off after it,
    even when the test fails; only a test marked ``exclusive`` may use it (it changes the cluster for every run)."""
    subprocess.run([str(CLUSTER), "variant", name, "on"], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run([str(CLUSTER), "variant", name, "off"], check=True, capture_output=True)


def console_script(name: str) -> str:
    """An installed console script of this package, from the same environment as the running Python."""
    found = shutil.which(name, path=os.path.dirname(sys.executable))
    assert found, f"{name} is not installed next to {sys.executable}: run 'pip install .'"
    return found


def cli(
    *args: str, input_text: str | None = None, timeout: float = 180, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the installed `sl-forgery` command."""
    return subprocess.run(
        [console_script("sl-forgery"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input_text,
        stdin=None if input_text is not None else subprocess.DEVNULL,
        env=env,
    )
