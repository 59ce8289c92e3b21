"""First contact with a real cluster: an honest doctor, credentials files for key users, and a terminal for what
only a person can answer."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import subprocess
import termios
import time

import pytest

import sl_forgery
from conftest import CLUSTER, bed, cli, console_script


class Terminal:
    """A program on a real pseudo-terminal that is its controlling terminal, as in an interactive shell."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.controller, terminal = pty.openpty()

        def take_terminal() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.process = subprocess.Popen(
            argv, stdin=terminal, stdout=terminal, stderr=terminal, env=env, start_new_session=True,
            preexec_fn=take_terminal,
        )  # fmt: skip
        os.close(terminal)
        self.screen = ""

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.controller], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.controller, 65536)
        except OSError:  # EIO: the program closed the terminal
            return False
        self.screen += chunk.decode(errors="replace").replace("\r\n", "\n")
        return bool(chunk)

    def expect(self, pattern: str, deadline: float = 60) -> str:
        end = time.monotonic() + deadline
        while not re.search(pattern, self.screen):
            assert time.monotonic() < end and self._read(0.2) or re.search(pattern, self.screen), (
                f"{pattern!r} never appeared; the terminal shows:\n{self.screen}"
            )
        return self.screen

    def type(self, text: str) -> None:
        os.write(self.controller, text.encode())

    def finish(self, deadline: float = 120) -> int:
        end = time.monotonic() + deadline
        while self.process.poll() is None and time.monotonic() < end:
            self._read(0.2)
        # What it printed last: read while anything is waiting, not until the end of file, which never comes while
        # a process it left behind (the connection's master) still holds the terminal.
        while select.select([self.controller], [], [], 0)[0] and self._read(0):
            pass
        os.close(self.controller)
        return self.process.wait(timeout=max(1, end - time.monotonic()))


def _credentials(tmp_path, *extra: str) -> list[str]:
    return [console_script("sl-create-server-credentials"), "-od", str(tmp_path), "-h", "lab.example", "-u", "alice",
            *extra]  # fmt: skip


def test_create_server_credentials_prompts_on_the_terminal(secret_service, home, tmp_path):
    terminal = Terminal(_credentials(tmp_path))
    terminal.expect(r"password for alice@lab\.example \(empty for key login\): ")
    terminal.type("typed at the prompt\n")
    assert terminal.finish() == 0, terminal.screen
    assert "typed at the prompt" not in terminal.screen  # no echo
    assert "typed at the prompt" not in (tmp_path / "server_credentials.yaml").read_text()
    assert sl_forgery.get_password("alice@lab.example:22") == "typed at the prompt"
    sl_forgery.delete_password("alice@lab.example:22")


def test_create_server_credentials_for_key_login_stores_no_password(secret_service, home, tmp_path):
    terminal = Terminal(_credentials(tmp_path / "empty-answer"))
    terminal.expect("empty for key login")
    terminal.type("\n")
    assert terminal.finish() == 0, terminal.screen
    assert "for key login (no password stored)" in terminal.screen
    flagged = subprocess.run(_credentials(tmp_path / "flag", "--no-password"), capture_output=True, text=True)
    assert flagged.returncode == 0, flagged.stderr
    for directory in ("empty-answer", "flag"):
        path = tmp_path / directory / "server_credentials.yaml"
        profile = sl_forgery.profile_from_legacy(path)
        assert (profile.user, profile.host, profile.password_in_keyring) == ("alice", "lab.example", False)
    assert sl_forgery.get_password("alice@lab.example:22") is None
    imported = subprocess.run(
        [console_script("sl-forgery"), "server", "import", str(tmp_path / "flag" / "server_credentials.yaml"),
         "--name", "keyonly"], capture_output=True, text=True,
    )  # fmt: skip
    assert imported.returncode == 0 and "held no password" in imported.stdout + imported.stderr, imported.stderr
    listed = subprocess.run([console_script("sl-forgery"), "server", "list"], capture_output=True, text=True)
    assert "keyonly" in listed.stdout and "keyring" not in listed.stdout, listed.stdout  # a key login, as written


def test_create_server_credentials_without_a_terminal_fails_clearly(secret_service, home, tmp_path):
    result = subprocess.run(
        ["setsid", *_credentials(tmp_path)], input="would be echoed\n", capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no terminal to ask the password on" in result.stderr
    assert "--password-stdin" in result.stderr and "--no-password" in result.stderr
    assert not (tmp_path / "server_credentials.yaml").exists()
    piped = subprocess.run(
        ["setsid", *_credentials(tmp_path, "--password-stdin")], input="from a pipe\n", capture_output=True, text=True
    )
    assert piped.returncode == 0, piped.stderr
    assert sl_forgery.get_password("alice@lab.example:22") == "from a pipe"
    sl_forgery.delete_password("alice@lab.example:22")


# ---------------------------------------------------------------------------------------------------------------------
# doctor


def _doctor_rows(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, list[str]]]:
    result = cli("doctor", *args, env=env)
    rows = {parts[0]: parts[1:] for parts in (re.split(r"\s{2,}", line) for line in result.stdout.splitlines()[1:])}
    return result.returncode, rows


@pytest.fixture
def module_user_profile(cluster, profile_name):
    facts = bed()
    config = sl_forgery.load_config()
    config.servers["modules"] = sl_forgery.Profile(
        name="modules",
        host=cluster.host,
        port=cluster.port,
        user=facts["SLF_CLUSTER_MODULE_USER"],
        identity_file=str(cluster.key),
        ssh_options=[f"UserKnownHostsFile={cluster.known_hosts}", "IdentitiesOnly=yes"],
        conda_environment="analysis",
    )
    config.save()
    return "modules", facts["SLF_CLUSTER_MODULE"]


def test_doctor_checks_the_environment_the_profile_uses_through_its_module(module_user_profile):
    name, module = module_user_profile
    code, rows = _doctor_rows("--server", name)
    assert code == 1
    assert rows["environment"][0] == "FAIL"
    assert "conda: command not found" in rows["environment"][1]
    assert "conda is not available" in rows["environment"][1]
    config = sl_forgery.load_config()
    config.servers[name].setup = [f"module load {module}"]
    config.save()
    code, rows = _doctor_rows("--server", name)
    assert code == 0, rows
    assert rows["modules"][0] == "ok" and "Lua" in rows["modules"][1]
    assert rows["environment"] == ["ok", f"analysis (conda): activates, {_server_python()}"]
    assert rows["login shell"] == ["ok", "/bin/bash (any login shell works)"]
    assert rows["login output"] == ["ok", "a login prints nothing on stdout"]


def test_doctor_fails_on_a_module_line_for_a_module_the_site_lacks(module_user_profile):
    name, _ = module_user_profile
    config = sl_forgery.load_config()
    config.servers[name].setup = ["module load no-such-module"]
    config.save()
    code, rows = _doctor_rows("--server", name)
    assert code == 1
    assert rows["environment"][0] == "FAIL" and "module load no-such-module" in rows["environment"][1]


def test_doctor_needs_no_conda_when_no_environment_is_set(module_user_profile):
    name, _ = module_user_profile
    config = sl_forgery.load_config()
    config.servers[name].conda_environment = None
    config.save()
    code, rows = _doctor_rows("--server", name)
    assert code == 0, rows
    assert rows["environment"] == ["ok", "none set; no conda found; needed only for jobs given --env"]


def _server_python() -> str:
    return subprocess.run(["/usr/bin/python3", "--version"], capture_output=True, text=True).stdout.strip()


@pytest.mark.exclusive
def test_doctor_says_accounting_is_off_and_what_that_changes(profile_name):
    subprocess.run([str(CLUSTER), "variant", "no-accounting", "on"], check=True, capture_output=True)
    try:
        code, rows = _doctor_rows()
    finally:
        subprocess.run([str(CLUSTER), "variant", "no-accounting", "off"], check=True, capture_output=True)
    assert code == 0, rows
    assert rows["accounting"][0] == "ok" and rows["accounting"][1].startswith("off: states come from squeue")


@pytest.mark.exclusive
def test_doctor_fails_on_a_sacct_that_never_answers(profile_name):
    subprocess.run([str(CLUSTER), "variant", "sacct-hangs", "on"], check=True, capture_output=True)
    try:
        code, rows = _doctor_rows()
    finally:
        subprocess.run([str(CLUSTER), "variant", "sacct-hangs", "off"], check=True, capture_output=True)
    assert code == 1
    assert rows["accounting"][:2] == ["FAIL", f"sacct gave no answer within {sl_forgery.ACCOUNTING_CHECK_TIMEOUT:g} s"]
    assert rows["slurm"][0] == "ok"
