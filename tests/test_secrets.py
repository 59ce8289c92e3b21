"""Servers and secrets with real components: a Secret Service keyring, the test sshd, and the askpass helper."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import sl_forgery
from conftest import ROOT, bed, cli, client_port, console_script, own_masters, variant


def password_profile(cluster, name="pw", known_hosts=None) -> sl_forgery.Profile:
    return sl_forgery.Profile(
        name=name,
        host=cluster.host,
        port=cluster.port,
        user=cluster.user,
        password_in_keyring=True,
        ssh_options=[f"UserKnownHostsFile={known_hosts or cluster.known_hosts}", "PubkeyAuthentication=no"],
    )


def save_profile(profile: sl_forgery.Profile) -> None:
    config = sl_forgery.load_config()
    config.servers[profile.name] = profile
    config.default = config.default or profile.name
    config.save()


def close_master(profile: sl_forgery.Profile) -> None:
    sl_forgery.SSHConnection(profile).disconnect()


def processes_holding(secret: bytes) -> list[str]:
    """Processes with the secret in their command line or environment, but for those another test started (they
    carry its private runtime directory): a run of the suite beside this one may pass the same test password on a
    command line on purpose."""
    own = f"XDG_RUNTIME_DIR={os.environ['XDG_RUNTIME_DIR']}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"XDG_RUNTIME_DIR=/tmp/slr" in environ and own not in environ:
            continue
        found += [
            f"{entry.name}/{part}" for part, text in (("cmdline", command), ("environ", environ)) if secret in text
        ]
    return found


@contextlib.contextmanager
def processes_seen_holding(secret: bytes):
    """Scans /proc without pause while the block runs; yields the list of processes seen holding ``secret``."""
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.extend(processes_holding(secret))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield seen
    finally:
        done.set()
        watcher.join()


def test_keyring_stores_reads_and_deletes(secret_service):
    backend = sl_forgery.secure_keyring()
    assert type(backend).__module__ == "keyring.backends.SecretService"
    sl_forgery.store_password("someone@example:22", "s3cret value")
    assert sl_forgery.get_password("someone@example:22") == "s3cret value"
    assert sl_forgery.delete_password("someone@example:22")
    assert sl_forgery.get_password("someone@example:22") is None


def test_password_login_through_askpass_leaks_the_password_nowhere(secret_service, cluster, home):
    profile = password_profile(cluster)
    save_profile(profile)
    sl_forgery.store_password(profile.keyring_account, cluster.password)
    close_master(profile)
    secret = cluster.password.encode()
    with processes_seen_holding(secret) as seen:
        connection = sl_forgery.SSHConnection(profile)
        assert connection.connect()
        assert connection.run("whoami").stdout == f"{cluster.user}\n"
    assert seen == []
    assert processes_holding(secret) == []
    for path in home.rglob("*"):
        assert not path.is_file() or secret not in path.read_bytes(), path
    for path in sl_forgery.control_dir().iterdir():
        assert not path.is_file() or secret not in path.read_bytes(), path
    verbose = cli("-v", "-s", "pw", "check")
    assert verbose.returncode == 0, verbose.stderr
    assert "+ ssh" in verbose.stderr and cluster.password not in verbose.stderr + verbose.stdout
    close_master(profile)


def test_a_wrong_password_fails_fast_with_a_clear_error(secret_service, cluster, home):
    profile = password_profile(cluster, name="wrong")
    save_profile(profile)
    sl_forgery.store_password(profile.keyring_account, "not-the-password")
    close_master(profile)
    result = cli("-s", "wrong", "queue")
    assert result.returncode == 255
    assert result.stderr.startswith(
        f"sl-forgery: error: ssh to {cluster.user}@{cluster.host}:{cluster.port} failed: authentication refused"
    )
    assert "not-the-password" not in result.stderr and result.stderr.count("\n") == 1
    sl_forgery.store_password(profile.keyring_account, cluster.password)


def test_an_insecure_keyring_is_refused_and_nothing_is_written(home):
    env = {**os.environ, "PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
    result = cli("server", "add", "x", "--host", "h", "--user", "u", "--password-stdin", input_text="pw\n", env=env)
    assert result.returncode == 1
    assert "no secure keyring is available" in result.stderr and "SSH key" in result.stderr
    assert not sl_forgery.config_path().exists()


def test_askpass_answers_only_the_password_prompt_of_its_own_server(secret_service, monkeypatch, capsys):
    sl_forgery.store_password("u@h:22", "pw-for-askpass")
    monkeypatch.setenv(sl_forgery.ASKPASS_ACCOUNT_VARIABLE, "u@h:22")
    monkeypatch.setenv(sl_forgery.ASKPASS_PROMPT_VARIABLE, "u@h's password: ")
    monkeypatch.delenv(sl_forgery.ASKPASS_TTY_VARIABLE, raising=False)
    assert sl_forgery.askpass_main(["u@h's password: "]) == 0
    assert capsys.readouterr().out == "pw-for-askpass\n"
    # A ProxyJump gateway's own prompt, another user's, a one-time code: never the stored password.
    for prompt in ("u@gateway's password: ", "root@h's password: ", "Verification code: ", "(u@h) Password: "):
        assert sl_forgery.askpass_main([prompt]) == 1
        captured = capsys.readouterr()
        assert captured.out == "" and "no terminal to ask you on" in captured.err
    host_key_prompt = (
        "The authenticity of host '[h]:22' can't be established.\nED25519 key fingerprint is SHA256:x.\n"
        "Are you sure you want to continue connecting (yes/no/[fingerprint])? "
    )
    assert sl_forgery.askpass_main([host_key_prompt]) == 1
    assert capsys.readouterr().out == ""
    sl_forgery.delete_password("u@h:22")


def test_an_unknown_host_key_is_not_confirmed_by_askpass(secret_service, cluster, home, tmp_path):
    profile = password_profile(cluster, name="unknown", known_hosts=tmp_path / "empty_known_hosts")
    save_profile(profile)
    sl_forgery.store_password(profile.keyring_account, cluster.password)
    close_master(profile)
    result = cli("-s", "unknown", "queue")
    assert result.returncode == 255
    assert "host key is unknown" in result.stderr and cluster.host in result.stderr
    assert (
        not (tmp_path / "empty_known_hosts").exists()
        or cluster.host not in (tmp_path / "empty_known_hosts").read_text()
    )


def test_accept_host_key_records_the_key_and_shows_its_fingerprint(cluster, home, tmp_path):
    known = tmp_path / "known_hosts"
    result = cli(
        "server",
        "add",
        "accepted",
        "--host",
        cluster.host,
        "--port",
        str(cluster.port),
        "--user",
        cluster.user,
        "--identity-file",
        str(cluster.key),
        "--ssh-option",
        f"UserKnownHostsFile={known}",
        "--accept-host-key",
    )
    assert result.returncode == 0, result.stderr
    fingerprint = subprocess.run(
        ["ssh-keygen", "-lf", f"{cluster.host_key}.pub"], capture_output=True, text=True
    ).stdout.split()[1]
    assert fingerprint in result.stderr
    assert f"[{cluster.host}]:{cluster.port}" in known.read_text()
    close_master(sl_forgery.load_config().profile("accepted"))
    assert cli("-s", "accepted", "queue").returncode == 0


@pytest.mark.exclusive
def test_a_changed_host_key_is_refused_naming_the_host(cluster, server, tmp_path):
    server.connection.disconnect()
    backup = tmp_path / "host_key_backup"
    shutil.copy(cluster.host_key, backup)
    shutil.copy(f"{cluster.host_key}.pub", f"{backup}.pub")
    original = cluster.served_host_key()
    try:
        cluster.host_key.unlink()
        Path(f"{cluster.host_key}.pub").unlink()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(cluster.host_key)], check=True)
        reload_sshd(cluster, serving=Path(f"{cluster.host_key}.pub").read_text())
        with pytest.raises(sl_forgery.SSHError) as error:
            server.connection.run("true")
        assert "host key has CHANGED" in error.value.summary and cluster.host in error.value.summary
    finally:
        shutil.copy(backup, cluster.host_key)
        shutil.copy(f"{backup}.pub", f"{cluster.host_key}.pub")
        reload_sshd(cluster, serving=original)
    assert server.connection.run("echo back").stdout == "back\n"


def reload_sshd(cluster, serving: str) -> None:
    """SIGHUP the test sshd (it re-executes and reads its host key again); return once it serves that key."""
    os.kill(int((cluster.state / "run" / "sshd.pid").read_text()), signal.SIGHUP)
    wanted = " ".join(serving.split()[:2])
    deadline = time.monotonic() + 30
    while cluster.served_host_key() != wanted:
        assert time.monotonic() < deadline, "sshd does not serve the new host key"
        time.sleep(0.1)


def test_setup_key_installs_a_key_and_forgets_the_password(secret_service, cluster, home, tmp_path):
    profile = password_profile(cluster, name="keyless")
    profile.ssh_options = [f"UserKnownHostsFile={cluster.known_hosts}", "IdentitiesOnly=yes"]
    save_profile(profile)
    sl_forgery.store_password(profile.keyring_account, cluster.password)
    close_master(profile)
    key = tmp_path / "keys" / "id_ed25519"
    result = cli("server", "setup-key", "keyless", "--key", str(key))
    assert result.returncode == 0, result.stderr
    assert key.exists() and "key login works" in result.stderr
    updated = sl_forgery.load_config().profile("keyless")
    assert updated.identity_file == str(key) and not updated.password_in_keyring
    assert sl_forgery.get_password(profile.keyring_account) is None
    close_master(updated)
    assert cli("-s", "keyless", "queue").returncode == 0


def test_config_file_is_private_and_holds_no_secret(secret_service, cluster, home):
    result = cli(
        "server",
        "add",
        "lab",
        "--host",
        cluster.host,
        "--user",
        cluster.user,
        "--password-stdin",
        input_text="typed-secret\n",
    )
    assert result.returncode == 0, result.stderr
    path = sl_forgery.config_path()
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert "typed-secret" not in path.read_text()
    assert sl_forgery.get_password(f"{cluster.user}@{cluster.host}:22") == "typed-secret"
    assert cli("server", "remove", "lab").returncode == 0
    assert sl_forgery.get_password(f"{cluster.user}@{cluster.host}:22") is None


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("servers:\n  a:\n    host: [unclosed\n", ":3: not valid YAML"),
        ("servers:\n  a:\n    host: h\n    colour: blue\n", ":4: unknown key 'colour' in server 'a'"),
        ("servers:\n  a:\n    host: h\n    password: x\n", ":4: passwords do not belong in this file"),
        ("default: b\nservers:\n  a:\n    host: h\n", ":1: default server 'b' is not defined"),
    ],
)
def test_a_bad_config_file_gives_a_one_line_error_with_its_line_and_is_not_rewritten(home, content, fragment):
    path = sl_forgery.config_path()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    path.chmod(0o600)
    result = cli("server", "add", "new", "--host", "h2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"{path}{fragment}" in result.stderr
    assert path.read_text() == content


def test_a_world_readable_config_or_a_missing_profile_is_refused(home, profile_name):
    path = sl_forgery.config_path()
    assert "no server named 'elsewhere'" in cli("-s", "elsewhere", "status").stderr
    path.chmod(0o644)
    result = cli("status")
    assert result.returncode == 2 and f"chmod 600 {path}" in result.stderr


def test_legacy_credentials_from_the_original_command_work(secret_service, cluster, home, tmp_path, password_only_ssh):
    created = subprocess.run(
        [
            console_script("sl-create-server-credentials"),
            "-od",
            str(tmp_path),
            "-h",
            cluster.host,
            "-u",
            cluster.user,
            "-p",
            cluster.password,
            "-sr",
            "/storage",
            "-wr",
            "/work",
            "-sdn",
            "lab",
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert created.returncode == 0, created.stderr
    assert "visible to other users" in created.stderr
    credentials = tmp_path / "server_credentials.yaml"
    text = credentials.read_text()
    assert cluster.password not in text and "password" not in text
    for line in (
        "username: slftest",
        "storage_root: /storage",
        "raw_data_root: /storage/lab",
        "user_working_root: /work/slftest",
    ):
        assert line in text
    again = subprocess.run(
        [console_script("sl-create-server-credentials"), "-od", str(tmp_path), "-h", "x", "-u", "y", "-p", "z"],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "already exists" in again.stderr and credentials.read_text() == text
    server = sl_forgery.Server(credentials_path=credentials)
    close_master(server.profile)
    assert server.connection.run("whoami").stdout == f"{cluster.user}\n"
    assert str(server.user_working_root) == "/work/slftest"
    close_master(server.profile)


def test_import_moves_a_plaintext_password_into_the_keyring(secret_service, cluster, home, tmp_path, password_only_ssh):
    credentials = tmp_path / "server_credentials.yaml"
    original = (
        f"username: {cluster.user}\npassword: {cluster.password}\nhost: {cluster.host}\n"
        "storage_root: /s\nworking_root: /w\nshared_directory_name: lab\n"
    )
    credentials.write_text(original)
    credentials.chmod(0o640)
    legacy = subprocess.run(
        [
            sys_python(),
            "-c",
            "import sl_forgery, sys; "
            f"s = sl_forgery.Server(credentials_path={str(credentials)!r}); "
            "print(s.connection.run('whoami').stdout, end='')",
        ],
        capture_output=True,
        text=True,
    )
    assert legacy.returncode == 0 and legacy.stdout == f"{cluster.user}\n"
    assert "holds a plaintext password" in legacy.stderr and "sl-forgery server import" in legacy.stderr
    result = cli("server", "import", str(credentials), "--name", "imported")
    assert result.returncode == 0, result.stderr
    assert "holds a plaintext password" not in result.stderr
    assert "was rewritten without it; no copy of the old file was kept" in result.stderr
    assert cluster.password not in credentials.read_text() and f"username: {cluster.user}" in credentials.read_text()
    assert credentials.stat().st_mode & 0o777 == 0o600
    # No plaintext copy anywhere beside it or in sl-forgery's files (a .bak kept it at the file's old mode).
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert [path.name for path in files if cluster.password.encode() in path.read_bytes()] == []
    profile = sl_forgery.load_config().profile("imported")
    assert profile.password_in_keyring and sl_forgery.get_password(profile.keyring_account) == cluster.password
    close_master(profile)
    assert cli("-s", "imported", "queue").returncode == 0
    close_master(profile)


def sys_python() -> str:
    import sys

    return sys.executable


def test_proxyjump_from_an_ssh_config_works_and_calls_still_share_one_connection(cluster, home, tmp_path):
    ssh_config = tmp_path / "ssh_config"
    common = (
        f"  HostName {cluster.host}\n  Port {cluster.port}\n  User {cluster.user}\n  IdentityFile {cluster.key}\n"
        f"  IdentitiesOnly yes\n  UserKnownHostsFile {cluster.known_hosts}\n"
    )
    ssh_config.write_text(f"Host gateway\n{common}\nHost behind-gateway\n{common}  ProxyJump gateway\n")
    profile = sl_forgery.Profile(name="jumped", host="behind-gateway", ssh_config=str(ssh_config))
    save_profile(profile)
    connection = sl_forgery.SSHConnection(profile)
    mark = cluster.sshd_log_mark()
    assert connection.connect()
    (master,) = own_masters().values()
    # The gateway's own sshd session opens the inner connection; the server sees it come from 127.0.0.1 too.
    ports = {client_port(connection) for _ in range(10)}
    assert len(ports) == 1 and cluster.logins_from_port(ports.pop(), since=mark) == 1
    assert list(own_masters().values()) == [master]
    # One ssh to the gateway carries it (OpenSSH runs ProxyJump as `ssh -F CONFIG -W HOST:PORT gateway`).
    jump = subprocess.run(["pgrep", "-f", f"ssh -F {ssh_config} .*-W .* gateway"], capture_output=True, text=True)
    assert len(jump.stdout.split()) == 1, subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True).stdout
    connection.disconnect()


def test_a_remote_command_and_tty_in_the_users_ssh_config_do_not_break_calls(cluster, home, tmp_path):
    # Some users start tmux on every login this way; sl-forgery's own commands must still run.
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(
        f"Host cluster\n  HostName {cluster.host}\n  Port {cluster.port}\n  User {cluster.user}\n"
        f"  IdentityFile {cluster.key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {cluster.known_hosts}\n"
        "  RemoteCommand echo hijacked\n  RequestTTY force\n"
    )
    save_profile(sl_forgery.Profile(name="tmux-user", host="cluster", ssh_config=str(ssh_config)))
    server = sl_forgery.Server.from_profile("tmux-user")
    server.connection.disconnect()
    try:
        assert server.connection.run("echo mine").stdout == "mine\n"
        local = tmp_path / "file.txt"
        local.write_text("payload")
        remote = f"{cluster.home}/tmux-user-{os.getpid()}.txt"
        server.push_file(local, remote)
        assert server.read_file(remote) == "payload"
        server.remove(remote)
    finally:
        server.connection.disconnect()


def test_a_key_held_by_an_agent_works_without_naming_it(cluster, home, tmp_path):
    agent = subprocess.run(
        ["ssh-agent", "-s", "-a", str(tmp_path / "agent.sock")], capture_output=True, text=True, check=True
    ).stdout
    pid = int(agent.split("SSH_AGENT_PID=")[1].split(";")[0])
    env = {**os.environ, "SSH_AUTH_SOCK": str(tmp_path / "agent.sock")}
    try:
        subprocess.run(["ssh-add", str(cluster.key)], env=env, check=True, capture_output=True)
        profile = sl_forgery.Profile(
            name="agent",
            host=cluster.host,
            port=cluster.port,
            user=cluster.user,
            ssh_options=[f"UserKnownHostsFile={cluster.known_hosts}", "PasswordAuthentication=no"],
        )
        save_profile(profile)
        close_master(profile)
        without_agent = cli("-s", "agent", "queue", env={k: v for k, v in env.items() if k != "SSH_AUTH_SOCK"})
        assert without_agent.returncode == 255 and "authentication refused" in without_agent.stderr
        result = cli("-s", "agent", "queue", env=env)
        assert result.returncode == 0, result.stderr
        close_master(profile)
    finally:
        os.kill(pid, signal.SIGTERM)


def test_server_check_reports_what_works_on_the_server(profile_name):
    result = cli("server", "check", profile_name)
    assert result.returncode == 0, result.stdout
    rows = dict(re.split(r"\s{2,}", line)[:2] for line in result.stdout.splitlines()[1:])
    checks = ("connection", "login shell", "login output", "slurm", "accounting", "modules", "environment")
    assert rows == dict.fromkeys(checks, "ok")


def test_jupyter_records_written_at_once_by_many_commands_are_all_kept(home):
    # Each process adds its own records; a read-modify-write without the lock loses some of them.
    program = (
        "import sys, sl_forgery\n"
        "for n in range(40):\n"
        "    key = f'{sys.argv[1]}{n:03d}'\n"
        "    details = {'server': 'lab', 'working_directory': '/w', 'host': 'node1', 'port': 8888, 'token': 't',\n"
        "               'local_port': None, 'url': None}\n"
        "    sl_forgery.update_jupyter_records(lambda records: records.update({key: details}))\n"
    )
    writers = [
        subprocess.Popen([sys.executable, "-c", program, f"{index + 1}"], env=os.environ.copy(), cwd=str(ROOT))
        for index in range(6)
    ]
    assert [writer.wait(timeout=120) for writer in writers] == [0] * 6
    assert len(sl_forgery.load_jupyter_records()) == 6 * 40
    assert sl_forgery.jupyter_records_path().stat().st_mode & 0o777 == 0o600


def jump_config(cluster, tmp_path, gateway_auth: str) -> Path:
    """An ssh config: 'target' (the cluster by its address, password only) behind 'gateway' (the same sshd by the
    name localhost, so that its password prompt differs), whose authentication ``gateway_auth`` sets."""
    host_key = Path(f"{cluster.host_key}.pub").read_text().split()[:2]
    known_hosts = tmp_path / "jump_known_hosts"
    known_hosts.write_text(
        "".join(f"[{name}]:{cluster.port} {' '.join(host_key)}\n" for name in (cluster.host, "localhost"))
    )
    path = tmp_path / "jump_ssh_config"
    path.write_text(
        f"Host gateway\n  HostName localhost\n  Port {cluster.port}\n  User {cluster.user}\n  AddressFamily inet\n"
        f"  UserKnownHostsFile {known_hosts}\n{gateway_auth}\n"
        f"Host target\n  HostName {cluster.host}\n  Port {cluster.port}\n  User {cluster.user}\n"
        f"  UserKnownHostsFile {known_hosts}\n  PubkeyAuthentication no\n  ProxyJump gateway\n"
    )
    return path


def test_a_proxyjump_login_with_a_password_leaks_it_nowhere(secret_service, cluster, home, tmp_path):
    ssh_config = jump_config(cluster, tmp_path, f"  IdentityFile {cluster.key}\n  IdentitiesOnly yes\n")
    profile = sl_forgery.Profile(name="jumped-pw", host="target", ssh_config=str(ssh_config), password_in_keyring=True)
    save_profile(profile)
    sl_forgery.store_password(profile.keyring_account, cluster.password)
    connection = sl_forgery.SSHConnection(profile)
    connection.disconnect()
    secret = cluster.password.encode()
    try:
        with processes_seen_holding(secret) as seen:
            assert connection.connect()
            assert connection.run("whoami").stdout == f"{cluster.user}\n"
    finally:
        connection.disconnect()
    assert seen == []


def test_a_proxyjump_gateways_own_password_prompt_never_gets_the_servers_password(
    secret_service, cluster, home, tmp_path
):
    # Same account on both hops here, so an askpass that answered any "password:" prompt would log in.
    ssh_config = jump_config(cluster, tmp_path, "  PubkeyAuthentication no\n")
    profile = sl_forgery.Profile(name="jumped-gw", host="target", ssh_config=str(ssh_config), password_in_keyring=True)
    save_profile(profile)
    sl_forgery.store_password(profile.keyring_account, cluster.password)
    close_master(profile)
    result = cli("-s", "jumped-gw", "connect")
    assert result.returncode == 255 and result.stderr.count("\n") == 1, result.stderr
    assert f'cannot answer "{cluster.user}@localhost\'s password:"' in result.stderr
    assert "no terminal to ask you on" in result.stderr
    close_master(profile)


def test_jupyter_open_keeps_the_token_out_of_every_local_command_line_and_environment(profile_name, cluster, tmp_path):
    browser = tmp_path / "browser"
    opened = tmp_path / "opened"
    # A browser that notes its arguments and the page it was asked to open, as a real one would read it.
    browser.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {opened}.args\ncat "${{1#file://}}" > {opened}.page\n')
    browser.chmod(0o755)
    cluster_uid = int(subprocess.run(["id", "-u", cluster.user], capture_output=True, text=True).stdout)
    seen: set[bytes] = set()
    done = threading.Event()

    def watch() -> None:
        # The token is not known until Jupyter reports it: keep every distinct local command line and environment.
        while not done.is_set():
            for entry in Path("/proc").iterdir():
                try:
                    if not entry.name.isdigit() or entry.stat().st_uid == cluster_uid:
                        continue  # the job's own processes are the server side, where the token lives
                    for part in ("cmdline", "environ"):
                        seen.add((entry / part).read_bytes())
                except OSError:
                    continue

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = cli(
            "jupyter",
            "--env",
            "jupyter",
            "--mem",
            "1",
            "--time",
            "10",
            "--detach",
            "--open",
            env={**os.environ, "BROWSER": str(browser)},
        )
    finally:
        done.set()
        watcher.join()
    assert result.returncode == 0, result.stderr
    url = result.stdout.strip()
    token = url.split("token=")[1]
    job_id = json.loads(cli("jupyter", "list", "--json").stdout)["servers"][0]["job_id"]
    try:
        arguments = Path(f"{opened}.args").read_text()
        assert token not in arguments and arguments.startswith("file:///")
        page = Path(arguments.strip()[len("file://") :])
        assert page.stat().st_mode & 0o777 == 0o600 and page.parent.stat().st_mode & 0o777 == 0o700
        assert f'content="0;url={url}"' in Path(f"{opened}.page").read_text()
        assert [blob for blob in seen if token.encode() in blob] == []
    finally:
        assert cli("jupyter", "stop", job_id).returncode == 0
    assert not page.exists()


@pytest.mark.exclusive
def test_a_one_time_code_is_asked_on_the_users_terminal_and_never_answered_with_the_password(
    secret_service, cluster, home
):
    import pty

    from test_cluster import unused_code_time

    otp_secret = Path(bed()["SLF_CLUSTER_OTP_SECRET_FILE"]).read_text().strip()
    # A password profile on a server that asks a key, then a one-time code (no password prompt at all).
    profile = sl_forgery.Profile(
        name="otp", host="slfc-otp", ssh_config=str(cluster.ssh_config), password_in_keyring=True
    )
    save_profile(profile)
    sl_forgery.store_password(profile.keyring_account, cluster.password)
    close_master(profile)
    with variant("otp"):
        moment = unused_code_time(cluster, otp_secret)
        code = subprocess.run(
            ["oathtool", "--totp", "-N", f"@{moment}", otp_secret], capture_output=True, text=True, check=True
        ).stdout.strip()
        pid, terminal = pty.fork()
        if pid == 0:  # the user's command, on a terminal of its own
            os.execv(console_script("sl-forgery"), ["sl-forgery", "-s", "otp", "connect"])
        seen = b""
        try:
            deadline = time.monotonic() + 60
            while b"One-time password" not in seen:
                assert time.monotonic() < deadline, seen
                seen += os.read(terminal, 1024)
            os.write(terminal, f"{code}\n".encode())
            while True:
                try:
                    chunk = os.read(terminal, 1024)
                except OSError:  # the command ended and its terminal with it
                    break
                if not chunk:
                    break
                seen += chunk
        finally:
            status = os.waitpid(pid, 0)[1]
            os.close(terminal)
        close_master(profile)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    assert b"connected to" in seen and cluster.password.encode() not in seen and code.encode() not in seen
