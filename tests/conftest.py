"""Fixtures over real components: the loopback SLURM cluster from scripts/cluster, a private config home per test,
and a real Secret Service keyring (gnome-keyring on a private D-Bus session)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "cluster"


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

    def sshd_connections(self) -> int:
        """Connections the test sshd has accepted so far."""
        return len(re.findall(r"^Accepted \S+ for ", self.sshd_log.read_text(errors="replace"), flags=re.MULTILINE))


def _cluster_env() -> dict[str, str]:
    output = subprocess.run([str(CLUSTER), "env"], capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    """The running test cluster; started here (and stopped at the end) when pytest runs without scripts/test."""
    started_here = False
    if subprocess.run([str(CLUSTER), "status"], capture_output=True).returncode != 0:
        subprocess.run([str(CLUSTER), "up"], check=True)
        started_here = True
    env = _cluster_env()
    info = Cluster(
        state=Path(env["SLF_CLUSTER_STATE"]),
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
    yield info
    if started_here:
        subprocess.run([str(CLUSTER), "down"], check=True)


@pytest.fixture(scope="session")
def secret_service(tmp_path_factory) -> None:
    """A real Secret Service for the `keyring` library: the one scripts/test started, or our own."""
    if os.environ.get("DBUS_SESSION_BUS_ADDRESS") and os.environ.get("SL_FORGERY_TEST_KEYRING") == "ready":
        yield
        return
    data_home = tmp_path_factory.mktemp("keyring-data")
    bus = subprocess.run(
        ["dbus-daemon", "--session", "--fork", "--print-address=1", "--print-pid=1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    saved = {name: os.environ.get(name) for name in ("DBUS_SESSION_BUS_ADDRESS", "XDG_DATA_HOME")}
    os.environ["DBUS_SESSION_BUS_ADDRESS"] = bus[0]
    os.environ["XDG_DATA_HOME"] = str(data_home)
    daemon = subprocess.run(
        ["gnome-keyring-daemon", "--unlock", "--components=secrets"],
        input=uuid.uuid4().hex,
        capture_output=True,
        text=True,
        check=True,
    )
    for line in daemon.stdout.splitlines():
        name, _, value = line.partition("=")
        if name:
            os.environ[name] = value
    yield
    subprocess.run(["pkill", "-f", f"gnome-keyring-daemon.*{os.getpid()}"], check=False)
    subprocess.run(["kill", bus[1]], check=False)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private config and state home for one test, so nothing touches the real user's files."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in ("SL_FORGERY_CONFIG", "SL_FORGERY_SERVER", "SL_FORGERY_SSH_CONFIG"):
        monkeypatch.delenv(name, raising=False)
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
