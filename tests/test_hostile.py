"""Hostile input and a hostile neighbour: every case is a row of one table (what is prepared, the command, the exit
code, a fragment of the one-line message, and the files that must not change). Other users are real local users
(created here when missing): a neighbour who plants files, and a victim for the cases that need one who is not
root (root ignores file modes, and its /tmp/slf-0 is in use by the running cluster tests)."""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

import sl_forgery
from conftest import cli, console_script

NEIGHBOUR = "slfneighbour"
VICTIM = "slfvictim"
PAYLOAD_MARK = "planted-by-the-neighbour"


@pytest.fixture(scope="session")
def users() -> dict[str, pwd.struct_passwd]:
    """The neighbour (who plants files) and a victim who is not root, as real accounts of this machine."""
    for name in (NEIGHBOUR, VICTIM):
        try:
            pwd.getpwnam(name)
        except KeyError:
            # Another run of the suite may create it at the same moment: its getpwnam below is the check.
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], capture_output=True)
    return {name: pwd.getpwnam(name) for name in (NEIGHBOUR, VICTIM)}


def as_user(account: pwd.struct_passwd, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups", "--", *argv],
        **kwargs,
    )


class World:
    """One case's files: a home with its XDG directories, a short private XDG_RUNTIME_DIR, and whatever the case
    plants; the command runs as root, or as the victim when the case says so."""

    def __init__(self, users: dict[str, pwd.struct_passwd], victim: bool) -> None:
        self.users = users
        self.victim = users[VICTIM] if victim else None
        self.root = Path(tempfile.mkdtemp(prefix="slfh-", dir="/tmp"))  # short: socket paths are limited
        self.root.chmod(0o755)
        self.home = self.root / "home"
        self.runtime = self.root / "run"
        self.mounts: list[Path] = []
        self.cleanups: list[Callable[[], None]] = []
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("SL_FORGERY_", "XDG_")) or key == "XDG_DATA_HOME"
        }
        self.env.update(
            HOME=str(self.home),
            XDG_CONFIG_HOME=str(self.home / "config"),
            XDG_STATE_HOME=str(self.home / "state"),
            XDG_CACHE_HOME=str(self.home / "cache"),
            XDG_RUNTIME_DIR=str(self.runtime),
        )
        for directory in (self.home, self.runtime):
            directory.mkdir(mode=0o700)
        self.theirs = self.root / "theirs"  # the neighbour's own directory, readable by everyone
        self.theirs.mkdir(mode=0o755)
        os.chown(self.theirs, users[NEIGHBOUR].pw_uid, users[NEIGHBOUR].pw_gid)
        if self.victim:
            for path in (self.root, self.home, self.runtime):
                os.chown(path, self.victim.pw_uid, self.victim.pw_gid)
            self.env.pop("XDG_DATA_HOME", None)
            self.env.pop("DBUS_SESSION_BUS_ADDRESS", None)

    # -- well-known places -----------------------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.home / "config" / "sl-forgery" / "servers.yaml"

    @property
    def state(self) -> Path:
        return self.home / "state" / "sl-forgery"

    @property
    def cache(self) -> Path:
        return self.home / "cache" / "sl-forgery"

    def uid(self) -> int:
        return self.victim.pw_uid if self.victim else os.getuid()

    def path(self, template: str) -> Path:
        return Path(
            template.format(
                root=self.root,
                home=self.home,
                config=self.config,
                state=self.state,
                cache=self.cache,
                runtime=self.runtime,
                theirs=self.theirs,
                uid=self.uid(),
            )
        )

    # -- preparing -------------------------------------------------------------------------------------------------

    def own(self, path: Path) -> None:
        """Make a path, and the directories between the world's root and it, belong to whoever runs the command."""
        if self.victim:
            while path != self.root and self.root in path.parents:
                os.lchown(path, self.victim.pw_uid, self.victim.pw_gid)
                path = path.parent

    def write(self, path: Path, data: str | bytes, mode: int = 0o600) -> Path:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        path.chmod(mode)
        self.own(path)
        return path

    def mkdir(self, path: Path, mode: int = 0o700) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
        self.own(path)
        return path

    def neighbour(self, script: str) -> None:
        """Run a shell script as the neighbour (the world's root is readable by everyone)."""
        as_user(self.users[NEIGHBOUR], ["sh", "-euc", script], check=True, cwd="/")

    def mount_tmpfs(self, path: Path, size: str = "64k") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        owner = self.uid()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700,uid={owner}", "tmpfs", str(path)], check=True
        )
        self.mounts.append(path)
        return path

    def fill(self, path: Path) -> None:
        """Fill the file system that holds ``path`` to the last byte."""
        descriptor = os.open(path / ".filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(descriptor, b"\0" * 512):
                pass
        except OSError:
            pass
        finally:
            os.close(descriptor)

    def remount_read_only(self, path: Path) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)

    def close(self) -> None:
        for cleanup in self.cleanups:
            cleanup()
        for mount in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(mount)], check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def snapshot(path: Path) -> object:
    """What a path is: type, owner, mode and content (a directory's, recursively); None if it does not exist."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    head = (stat.S_IFMT(info.st_mode), info.st_uid, stat.S_IMODE(info.st_mode))
    if stat.S_ISLNK(info.st_mode):
        return (*head, os.readlink(path))
    if stat.S_ISDIR(info.st_mode):
        return (*head, {entry: snapshot(path / entry) for entry in sorted(os.listdir(path))})
    if stat.S_ISREG(info.st_mode):
        return (*head, path.read_bytes())
    return head


def mode_of(path: Path) -> object:
    info = os.lstat(path)
    return (stat.S_IFMT(info.st_mode), info.st_uid, stat.S_IMODE(info.st_mode))


@dataclass
class Case:
    name: str
    argv: list[str]
    code: int
    message: str  # in stderr; for a success, in stdout or stderr
    prepare: Callable[[World], None] | None = None
    unchanged: list[str] = field(default_factory=list)  # whole trees that must not change ({config}, {root}/x, ...)
    same_mode: list[str] = field(default_factory=list)  # paths whose type, owner and mode must not change
    victim: bool = False  # run as the victim instead of root
    stdin: str = ""
    program: str = "sl-forgery"
    absent_from_output: str = ""
    env: dict[str, str] = field(default_factory=dict)  # values are templates, as in `unchanged`


# -- preparations ----------------------------------------------------------------------------------------------------


def config(text: str | bytes, mode: int = 0o600) -> Callable[[World], None]:
    return lambda world: world.write(world.config, text, mode) and None


def one_server(settings: str) -> Callable[[World], None]:
    return config(f"servers:\n  a:\n    host: h\n{settings}")


UNREACHABLE = "default: a\nservers:\n  a:\n    host: 127.0.0.1\n    port: 1\n"
BILLION_LAUGHS = "\n".join(
    ["servers:", '  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"  {chr(98 + n)}: &{chr(98 + n)} [{','.join(['*' + chr(97 + n)] * 9)}]" for n in range(8)]
)


def history(*lines: str | bytes) -> Callable[[World], None]:
    data = b"".join(line.encode() if isinstance(line, str) else line for line in lines)
    return lambda world: world.write(world.state / "jobs.jsonl", data) and None


def record(job_id: str, submitted: object = 1700000000.0, **fields: object) -> str:
    import json

    data = {
        "job_id": job_id,
        "server": "a",
        "name": "n",
        "working_directory": "/w",
        "output_log": "/w/o",
        "error_log": "/w/e",
        "submitted": submitted,
        "user": "u",
        "array": "",
    }
    data.update(fields)
    return json.dumps(data) + "\n"


def jupyter_records(text: str) -> Callable[[World], None]:
    def prepare(world: World) -> None:
        world.write(world.config, UNREACHABLE)
        world.write(world.state / "jupyter.json", text)

    return prepare


def both(*steps: Callable[[World], None]) -> Callable[[World], None]:
    def prepare(world: World) -> None:
        for step in steps:
            step(world)

    return prepare


def plant_control_link_to_victims_project(world: World) -> None:
    project = world.mkdir(world.home / "project", 0o755)
    link = Path(f"/tmp/slf-{world.uid()}")
    world.cleanups.append(lambda: link.unlink(missing_ok=True) if link.is_symlink() else shutil.rmtree(link, True))
    world.neighbour(f"ln -s {project} {link}")
    world.write(world.config, UNREACHABLE)


def plant_control_dir_of_neighbour(world: World) -> None:
    directory = Path(f"/tmp/slf-{world.uid()}")
    world.cleanups.append(lambda: shutil.rmtree(directory, ignore_errors=True))
    world.neighbour(f"mkdir -m 777 {directory}")
    world.write(world.config, UNREACHABLE)


def runtime_dir_of(owner: str) -> Callable[[World], None]:
    """XDG_RUNTIME_DIR left from another account (after su): a private directory that is not the user's."""

    def prepare(world: World) -> None:
        directory = world.root / "their-run"
        directory.mkdir(mode=0o700)
        account = world.users[owner] if owner != "root" else pwd.getpwuid(0)
        os.chown(directory, account.pw_uid, account.pw_gid)
        world.env["XDG_RUNTIME_DIR"] = str(directory)
        world.write(world.config, UNREACHABLE)
        if world.victim:
            link = Path(f"/tmp/slf-{world.uid()}")
            world.cleanups.append(lambda: shutil.rmtree(link, ignore_errors=True))

    return prepare


def control_dir_as(kind: str) -> Callable[[World], None]:
    def prepare(world: World) -> None:
        world.write(world.config, UNREACHABLE)
        target = world.runtime / f"slf-{world.uid()}"
        if kind == "world-writable":
            world.mkdir(target, 0o777)
        elif kind == "file":
            world.write(target, "")
        elif kind == "link":
            elsewhere = world.mkdir(world.root / "elsewhere", 0o755)
            target.symlink_to(elsewhere)
        elif kind == "link-to-neighbours":
            target.symlink_to(world.theirs)

    return prepare


def lock_file_link(world: World) -> None:
    world.write(world.config, UNREACHABLE)
    control = world.mkdir(world.runtime / f"slf-{world.uid()}")
    settings = subprocess.run(
        ["ssh", "-G", "-o", f"ControlPath={control}/%C", "-p", "1", "127.0.0.1"], capture_output=True, text=True
    ).stdout
    socket = next(line.split(" ", 1)[1] for line in settings.splitlines() if line.startswith("controlpath "))
    world.write(world.root / "precious", "keep me\n", 0o644)
    Path(f"{socket}.lock").symlink_to(world.root / "precious")


def planted_cache(kind: str) -> Callable[[World], None]:
    """A completion script in the cache with a payload; the name is the one sl-forgery computes (anyone can)."""

    def prepare(world: World) -> None:
        stamp = f"{sl_forgery.__version__}-{os.stat(sl_forgery.__file__).st_mtime_ns}"
        name = f"completion-bash-{stamp}.txt"
        payload = f"touch /tmp/{PAYLOAD_MARK}\n"
        if kind == "shared":  # a cache directory shared by several users, the neighbour came first
            shared = world.mkdir(world.root / "shared-cache", 0o1777)
            world.env["XDG_CACHE_HOME"] = str(shared)
            world.neighbour(f"mkdir -m 755 {shared}/sl-forgery && printf %s '{payload}' > {shared}/sl-forgery/{name}")
        elif kind == "open-dir":  # our own directory, left open to everyone, where the neighbour wrote
            world.env["XDG_CACHE_HOME"] = str(world.mkdir(world.root / "cache-home", 0o755))
            directory = world.mkdir(world.root / "cache-home" / "sl-forgery", 0o777)
            world.neighbour(f"printf %s '{payload}' > {directory}/{name}")
        elif kind == "readable-file":  # our own directory and file, but the file is not private
            world.write(world.cache / name, payload, 0o644)
        elif kind == "link":  # our cache directory is a link to the neighbour's
            world.neighbour(f"printf %s '{payload}' > {world.theirs}/{name}")
            world.mkdir(world.cache.parent)
            world.cache.symlink_to(world.theirs)

    return prepare


def read_only_config_dir(world: World) -> None:
    world.mount_tmpfs(world.config.parent)
    world.write(world.config, "servers:\n  a:\n    host: h\n")
    world.remount_read_only(world.config.parent)


def full_config_dir(world: World) -> None:
    world.mount_tmpfs(world.config.parent, size="16k")
    world.write(world.config, "servers:\n  a:\n    host: h\n")
    world.fill(world.config.parent)


def read_only_cache(world: World) -> None:
    world.mount_tmpfs(world.cache)
    world.remount_read_only(world.cache)


def credentials_file(text: str | bytes) -> Callable[[World], None]:
    return lambda world: world.write(world.root / "server_credentials.yaml", text) and None


def key_without_public_half(world: World) -> None:
    world.write(world.config, UNREACHABLE)
    world.write(world.root / "id_test", "not really a key\n")


def neighbours_servers_file(world: World) -> None:
    world.neighbour(f"printf 'servers: {{}}\\n' > {world.theirs}/s.yaml; chmod 600 {world.theirs}/s.yaml")


def script(text: str | bytes) -> Callable[[World], None]:
    return lambda world: world.write(world.root / "job.sh", text) and None


SCRIPT = "#!/bin/bash\necho hi\n"
LEGACY = "username: u\nhost: h\n"

# fmt: off
CASES = [
    # The servers file: wrong types, bad names, aliases, unreadable.
    Case("config-user-is-a-number", ["server", "list"], 2, ":4: server 'a': user must be text, not int 12345678",
         one_server("    user: 12345678\n"), ["{config}"]),
    Case("config-host-is-a-list", ["server", "list"], 2, ":3: server 'a': host must be text, not list",
         config("servers:\n  a:\n    host: [a, b]\n"), ["{config}"]),
    Case("config-default-is-a-list", ["server", "list"], 2, ":1: 'default' must be the name of a server, not [1]",
         config("default: [1]\nservers:\n  a:\n    host: h\n"), ["{config}"]),
    Case("config-default-is-a-number", ["status"], 2, ":1: 'default' must be the name of a server, not 5",
         config("default: 5\nservers:\n  a:\n    host: h\n"), ["{config}"]),
    Case("config-control-persist-is-text", ["server", "list"], 2,
         ":4: server 'a': control_persist must be a whole number of seconds from 1 (ssh reads 0 as forever), not 'x'",
         one_server("    control_persist: x\n"), ["{config}"]),
    Case("config-control-persist-is-zero", ["server", "list"], 2,
         ":4: server 'a': control_persist must be a whole number of seconds from 1 (ssh reads 0 as forever), not 0",
         one_server("    control_persist: 0\n"), ["{config}"]),
    Case("config-server-given-twice", ["server", "list"], 2, ":4: 'a' is given twice in the same block; keep one",
         config("servers:\n  a:\n    host: h\n  a:\n    host: other\n"), ["{config}"]),
    Case("config-ssh-option-without-a-value", ["server", "list"], 2,
         "each of ssh_options must be an ssh option with its value, such as ProxyJump=gateway, not 'Foo'",
         one_server("    ssh_options: [Foo]\n"), ["{config}"]),
    Case("config-port-is-text", ["server", "list"], 2, ":4: server 'a': port must be a whole number from 1 to 65535",
         one_server("    port: '22'\n"), ["{config}"]),
    Case("config-port-is-negative", ["server", "list"], 2, "port must be a whole number from 1 to 65535, not -22",
         one_server("    port: -22\n"), ["{config}"]),
    Case("config-port-is-zero", ["server", "list"], 2, "port must be a whole number from 1 to 65535, not 0",
         one_server("    port: 0\n"), ["{config}"]),
    Case("config-port-is-too-big", ["server", "list"], 2, "port must be a whole number from 1 to 65535, not 70000",
         one_server("    port: 70000\n"), ["{config}"]),
    Case("config-port-is-a-boolean", ["server", "list"], 2, "port must be a whole number from 1 to 65535, not True",
         one_server("    port: true\n"), ["{config}"]),
    Case("config-ssh-options-is-text", ["server", "list"], 2, ":4: server 'a': ssh_options must be a list",
         one_server("    ssh_options: ProxyJump=gw\n"), ["{config}"]),
    Case("config-ssh-option-is-a-mapping", ["server", "list"], 2, "each of ssh_options must be text, not dict",
         one_server("    ssh_options: [{ProxyJump: gw}]\n"), ["{config}"]),
    Case("config-password-flag-is-text", ["server", "list"], 2, "password_in_keyring must be true or false",
         one_server("    password_in_keyring: 'yes'\n"), ["{config}"]),
    Case("config-identity-file-is-a-number", ["server", "list"], 2, ":4: server 'a': identity_file must be text",
         one_server("    identity_file: 5\n"), ["{config}"]),
    Case("config-working-root-is-a-list", ["server", "list"], 2, ":4: server 'a': working_root must be text",
         one_server("    working_root: [/a]\n"), ["{config}"]),
    Case("config-host-is-empty", ["server", "list"], 2, ":3: server 'a': host must not be empty",
         config("servers:\n  a:\n    host: ''\n"), ["{config}"]),
    Case("config-host-has-a-line-break", ["server", "list"], 2, ":3: server 'a': host must be a single line",
         config('servers:\n  a:\n    host: "h\\nProxyCommand x"\n'), ["{config}"]),
    Case("config-servers-is-a-list", ["server", "list"], 2, ":1: 'servers' must be a mapping",
         config("servers: [a, b]\n"), ["{config}"]),
    Case("config-server-is-a-list", ["server", "list"], 2, ":2: server 'a' must be a mapping of settings",
         config("servers:\n  a: [h]\n"), ["{config}"]),
    Case("config-is-a-list", ["server", "list"], 2, ":1: expected a mapping", config("- a\n- b\n"), ["{config}"]),
    Case("config-name-runs-a-command", ["server", "list"], 2, ":2: server name 'a$(touch /tmp/x)' is not allowed",
         config("servers:\n  'a$(touch /tmp/x)':\n    host: h\n"), ["{config}"]),
    Case("config-name-has-backquotes", ["status"], 2, ":3: server name 'a`id`' is not allowed",
         config("default: a\nservers:\n  'a`id`':\n    host: h\n"), ["{config}"]),
    Case("config-name-has-a-space", ["server", "list"], 2, ":2: server name 'my lab' is not allowed",
         config("servers:\n  my lab:\n    host: h\n"), ["{config}"]),
    Case("config-name-climbs-up", ["server", "list"], 2, ":2: server name '../up' is not allowed",
         config("servers:\n  ../up:\n    host: h\n"), ["{config}"]),
    Case("config-name-starts-with-a-dash", ["server", "list"], 2, ":2: server name '-x' is not allowed",
         config("servers:\n  -x:\n    host: h\n"), ["{config}"]),
    Case("config-billion-laughs", ["server", "list"], 2, ":2: YAML anchors and aliases (&name, *name) are not allowed",
         config(BILLION_LAUGHS), ["{config}"]),
    Case("config-recursive-alias", ["server", "list"], 2, ":1: YAML anchors and aliases",
         config("servers: &s\n  a: *s\n"), ["{config}"]),
    Case("config-merge-key", ["server", "list"], 2, ":2: YAML anchors and aliases",
         config("servers:\n  a: &base\n    host: h\n  b:\n    <<: *base\n"), ["{config}"]),
    Case("config-not-utf8", ["server", "list"], 2, "the servers file is not UTF-8 text",
         config(b"servers:\n  a:\n    host: caf\xe9\n"), ["{config}"]),
    Case("config-is-a-directory", ["server", "list"], 2, "servers.yaml: Is a directory",
         lambda world: world.mkdir(world.config) and None, ["{config}"]),
    Case("config-readable-by-others", ["server", "list"], 2, "is readable by other users (mode 0o644); run 'chmod 600",
         config("servers:\n  a:\n    host: h\n", 0o644), ["{config}"]),
    Case("config-unreadable", ["server", "list"], 2, "servers.yaml: Permission denied",
         config("servers:\n  a:\n    host: h\n", 0o000), ["{config}"], victim=True),
    Case("config-of-the-neighbour", ["server", "list"], 2, "belongs to another user",
         neighbours_servers_file, ["{theirs}"], env={"SL_FORGERY_CONFIG": "{theirs}/s.yaml"}),
    Case("config-link-to-the-neighbours", ["server", "list"], 2, "belongs to another user",
         lambda world: (
             neighbours_servers_file(world), world.mkdir(world.config.parent),
             world.config.symlink_to(world.theirs / "s.yaml"),
         ) and None,
         ["{config}", "{theirs}"]),
    # server add: nothing is saved unless every value is one the file accepts.
    Case("add-max-sessions-zero", ["server", "add", "x", "--host", "h", "--max-sessions", "0"], 2,
         "--max-sessions must be a whole number of sessions (1 or more), not 0", unchanged=["{home}/config"]),
    Case("add-control-persist-zero", ["server", "add", "x", "--host", "h", "--control-persist", "0"], 2,
         "--control-persist must be a whole number of seconds from 1", unchanged=["{home}/config"]),
    Case("add-ssh-option-without-a-value", ["server", "add", "x", "--host", "h", "--ssh-option", "Foo"], 2,
         "each of --ssh-option must be an ssh option with its value", unchanged=["{home}/config"]),
    Case("add-without-host", ["server", "add", "x"], 2,
         "the following arguments are required: --host (see 'sl-forgery server add --help')",
         unchanged=["{home}/config"]),
    Case("add-port-negative", ["server", "add", "x", "--host", "h", "--port", "-22"], 2,
         "--port must be a whole number from 1 to 65535, not -22", unchanged=["{home}/config"]),
    Case("add-port-zero", ["server", "add", "x", "--host", "h", "--port", "0"], 2,
         "--port must be a whole number from 1 to 65535, not 0", unchanged=["{home}/config"]),
    Case("add-port-too-big", ["server", "add", "x", "--host", "h", "--port", "65536"], 2,
         "--port must be a whole number from 1 to 65535, not 65536", unchanged=["{home}/config"]),
    Case("add-name-runs-a-command", ["server", "add", "a$(touch /tmp/x)", "--host", "h"], 2,
         "server name 'a$(touch /tmp/x)' is not allowed", unchanged=["{home}/config"]),
    Case("add-name-has-a-slash", ["server", "add", "a/b", "--host", "h"], 2, "server name 'a/b' is not allowed",
         unchanged=["{home}/config"]),
    Case("add-name-has-a-semicolon", ["server", "add", "a;b", "--host", "h"], 2, "server name 'a;b' is not allowed",
         one_server(""), ["{config}"]),
    Case("add-host-has-a-line-break", ["server", "add", "x", "--host", "h\nProxyCommand evil"], 2,
         "--host must be a single line", unchanged=["{home}/config"]),
    Case("add-host-is-empty", ["server", "add", "x", "--host", ""], 2, "--host must not be empty",
         unchanged=["{home}/config"]),
    Case("add-user-has-a-line-break", ["server", "add", "x", "--host", "h", "--user", "u\nx"], 2,
         "--user must be a single line", unchanged=["{home}/config"]),
    Case("add-ssh-option-has-a-line-break", ["server", "add", "x", "--host", "h", "--ssh-option", "A=b\nC=d"], 2,
         "each of --ssh-option must be a single line", unchanged=["{home}/config"]),
    Case("add-password-without-terminal-or-stdin", ["server", "add", "x", "--host", "h", "--password"], 2,
         "no password given", unchanged=["{home}/config"]),
    Case("add-into-a-read-only-config-dir", ["server", "add", "x", "--host", "h"], 1,
         "servers.yaml: Read-only file system; it was left as it was", read_only_config_dir, ["{config}"]),
    Case("add-into-an-unwritable-config-dir", ["server", "add", "x", "--host", "h"], 1,
         "servers.yaml: Permission denied; it was left as it was",
         lambda world: (world.write(world.config, "servers:\n  a:\n    host: h\n"), world.config.parent.chmod(0o500))
         and None,
         ["{config}/.."], victim=True),
    Case("add-on-a-full-disk", ["server", "add", "x", "--host", "h", "--storage-root", "/s" * 3000], 1,
         "servers.yaml: No space left on device; it was left as it was", full_config_dir, ["{config}/.."]),
    Case("add-keeps-the-home-directory-mode", ["server", "add", "x", "--host", "h"], 0, "added server 'x'",
         lambda world: world.home.chmod(0o755), same_mode=["{home}"], env={"SL_FORGERY_CONFIG": "{home}/servers.yaml"}),
    Case("add-keeps-a-shared-directory-setgid", ["server", "add", "x", "--host", "h"], 0, "added server 'x'",
         lambda world: world.mkdir(world.root / "shared", 0o2775) and None, same_mode=["{root}/shared"],
         env={"SL_FORGERY_CONFIG": "{root}/shared/servers.yaml"}),
    Case("add-refuses-a-directory-anyone-can-write", ["server", "add", "x", "--host", "h"], 2,
         "is writable by every user (mode 0777)", lambda world: world.mkdir(world.root / "open", 0o777) and None,
         ["{root}/open"], env={"SL_FORGERY_CONFIG": "{root}/open/servers.yaml"}),
    # A wrong flag or value: one line naming it, before anything connects or is written.
    Case("run-unknown-flag", ["run", "--bogus", "--", "true"], 2, "unrecognized arguments: --bogus",
         config(UNREACHABLE), ["{state}"]),
    Case("run-cpus-not-a-number", ["run", "--cpus", "x", "--", "true"], 2,
         "argument --cpus: invalid int value: 'x' (see 'sl-forgery run --help')", config(UNREACHABLE), ["{state}"]),
    Case("run-gpus-negative", ["run", "--dry-run", "--gpus", "-2", "--", "true"], 2,
         "--gpus must be a number of GPUs or TYPE:N, such as 2 or a100:2, not '-2'", config(UNREACHABLE)),
    Case("run-sync-up-missing", ["run", "--dry-run", "--sync-up", "{root}/none", "--", "true"], 2,
         "none does not exist; give a local directory or file to send", config(UNREACHABLE)),
    Case("submit-timeout-without-wait", ["submit", "--timeout", "5", "{root}/job.sh"], 2,
         "--timeout acts while the job is followed to its end: add --wait",
         lambda world: (config(UNREACHABLE)(world), script(SCRIPT)(world)) and None,
         ["{state}"]),
    Case("forward-port-too-big", ["forward", "1", "99999"], 2,
         "port must be at most 65535, not 99999", config(UNREACHABLE), ["{state}"]),
    Case("forward-local-port-too-big", ["forward", "1", "80", "--local", "99999"], 2,
         "--local port must be at most 65535, not 99999", config(UNREACHABLE), ["{state}"]),
    Case("tensorboard-local-port-too-big", ["forward", "1", "--tensorboard", "/logs", "--local", "99999"], 2,
         "--local port must be at most 65535, not 99999", config(UNREACHABLE), ["{state}"]),
    # Values that reach SLURM or Jupyter.
    Case("run-mem-inf", ["run", "--dry-run", "--mem", "inf", "--", "true"], 2,
         "--mem must be a positive number of gigabytes, not inf"),
    Case("run-mem-overflows-to-inf", ["run", "--dry-run", "--mem", "1e400", "--", "true"], 2,
         "--mem must be a positive number of gigabytes, not inf"),
    Case("run-mem-nan", ["run", "--dry-run", "--mem", "nan", "--", "true"], 2,
         "--mem must be a positive number of gigabytes, not nan"),
    Case("submit-mem-inf", ["submit", "--dry-run", "--mem", "inf", "{root}/job.sh"], 2,
         "--mem must be a positive number of gigabytes, not inf",
         script(SCRIPT)),
    Case("jupyter-mem-inf", ["jupyter", "--dry-run", "--env", "e", "--mem", "inf"], 2,
         "--mem must be a positive number of gigabytes, not inf"),
    Case("wait-timeout-nan", ["wait", "--timeout", "nan", "1"], 2,
         "--timeout must be a number of seconds (0 or more), not nan", config(UNREACHABLE)),
    Case("wait-timeout-negative", ["wait", "--timeout", "-1", "1"], 2,
         "--timeout must be a number of seconds (0 or more), not -1", config(UNREACHABLE)),
    Case("run-timeout-inf", ["run", "--wait", "--timeout", "inf", "--", "true"], 2,
         "--timeout must be a number of seconds (0 or more), not inf", config(UNREACHABLE), ["{state}"]),
    Case("jupyter-wait-timeout-nan", ["jupyter", "--env", "e", "--wait-timeout", "nan"], 2,
         "--wait-timeout must be a number of seconds (0 or more), not nan", config(UNREACHABLE), ["{state}"]),
    Case("jupyter-port-too-big", ["jupyter", "--dry-run", "--env", "e", "--port", "70000"], 2,
         "port must be at most 65535 (0: any free port), not 70000"),
    Case("jupyter-args-with-an-open-quote", ["jupyter", "--dry-run", "--env", "e", "--jupyter-args", "'"], 2,
         "jupyter_args \"'\" cannot be split into words as a shell would (No closing quotation)"),
    Case("submit-script-not-utf8", ["submit", "--dry-run", "{root}/job.sh"], 2,
         "job.sh is not UTF-8 text (byte 20)",
         script(b"#!/bin/bash\necho caf\xe9 \xff\n")),
    Case("submit-script-not-utf8-for-real", ["submit", "{root}/job.sh"], 2, "job.sh is not UTF-8 text",
         both(script(b"#!/bin/bash\n\xff\n"), config(UNREACHABLE)), ["{state}"]),
    # The control directory: sockets, locks and the askpass helper.
    Case("control-dir-link-planted-in-tmp", ["connect"], 2, "is a symbolic link, not a directory of yours",
         plant_control_link_to_victims_project, same_mode=["{home}/project"], victim=True,
         env={"XDG_RUNTIME_DIR": ""}),
    Case("control-dir-made-by-the-neighbour-in-tmp", ["connect"], 2, "belongs to another user",
         plant_control_dir_of_neighbour, ["/tmp/slf-{uid}"], victim=True, env={"XDG_RUNTIME_DIR": ""}),
    Case("runtime-dir-of-the-neighbour", ["connect"], 255, "ssh to 127.0.0.1:1 failed",
         runtime_dir_of(NEIGHBOUR), ["{root}/their-run"]),
    Case("runtime-dir-of-root-after-su", ["connect"], 255, "ssh to 127.0.0.1:1 failed",
         runtime_dir_of("root"), ["{root}/their-run"], victim=True),
    Case("control-dir-writable-by-all", ["connect"], 2, "is writable by other users (mode 0777)",
         control_dir_as("world-writable"), ["{runtime}"]),
    Case("control-dir-is-a-file", ["connect"], 2, "is not a usable directory", control_dir_as("file"), ["{runtime}"]),
    Case("control-dir-is-a-link", ["connect"], 2, "is a symbolic link", control_dir_as("link"),
         ["{runtime}", "{root}/elsewhere"]),
    Case("control-dir-links-to-the-neighbours", ["connect"], 2, "is a symbolic link",
         control_dir_as("link-to-neighbours"), ["{runtime}", "{theirs}"]),
    Case("lock-file-is-a-link", ["connect"], 2, ".lock is a symbolic link", lock_file_link,
         ["{root}/precious", "{runtime}"]),
    # The help and completion cache: a shell runs what `completion` prints.
    Case("cache-planted-in-a-shared-cache-dir", ["completion", "bash"], 0, "_shtab_sl_forgery",
         planted_cache("shared"), ["{root}/shared-cache"], absent_from_output=PAYLOAD_MARK),
    Case("cache-planted-in-our-open-cache-dir", ["completion", "bash"], 0, "_shtab_sl_forgery",
         planted_cache("open-dir"), ["{root}/cache-home"], absent_from_output=PAYLOAD_MARK),
    Case("cache-file-readable-by-others", ["completion", "bash"], 0, "_shtab_sl_forgery",
         planted_cache("readable-file"), absent_from_output=PAYLOAD_MARK),
    Case("cache-dir-links-to-the-neighbours", ["completion", "bash"], 0, "_shtab_sl_forgery",
         planted_cache("link"), ["{theirs}", "{cache}"], absent_from_output=PAYLOAD_MARK),
    Case("help-with-a-read-only-cache", ["--help"], 0, "exit codes:", read_only_cache, ["{cache}"]),
    Case("help-with-a-cache-that-is-a-file", ["--help"], 0, "exit codes:",
         lambda world: world.write(world.cache, "x") and None, ["{cache}"]),
    # The job history and the Jupyter records.
    Case("history-line-is-a-list", ["history"], 0, "4242", history("[1, 2]\n", record("4242")), ["{state}"]),
    Case("history-submitted-is-text", ["history", "--since", "100000d"], 0, "4242",
         history(record("31337", "yesterday"), record("4242")), ["{state}"], absent_from_output="31337"),
    Case("history-submitted-is-nan", ["history", "--json"], 0, '"job_id": "4242"',
         history('{"job_id": "31337", "submitted": NaN}\n', record("4242")), ["{state}"], absent_from_output="31337"),
    Case("history-submitted-is-a-boolean", ["history"], 0, "4242",
         history(record("31337", True), record("4242")), ["{state}"], absent_from_output="31337"),
    Case("history-field-is-a-number", ["history"], 0, "4242",
         history(record("31337", name=5), record("4242")), ["{state}"], absent_from_output="31337"),
    Case("history-job-id-is-not-one", ["history"], 0, "4242",
         history(record("13; rm -rf ~"), record("4242")), ["{state}"], absent_from_output="rm -rf"),
    Case("history-cut-last-line", ["history"], 0, "4242", history(record("4242"), '{"job_id": "77", "ser'),
         ["{state}"]),
    Case("history-not-utf8", ["history"], 0, "4242", history(record("4242"), b"\xff\xfe\n"), ["{state}"]),
    Case("history-is-a-directory", ["history"], 1, "cannot read the job history",
         lambda world: world.mkdir(world.state / "jobs.jsonl") and None, ["{state}"]),
    Case("history-unreadable", ["history"], 1, "jobs.jsonl: Permission denied",
         lambda world: world.write(world.state / "jobs.jsonl", record("1"), 0o000) and None, ["{state}"],
         victim=True),
    Case("jupyter-records-are-a-list", ["jupyter", "list"], 0, "", jupyter_records("[1, 2]"), ["{state}"]),
    Case("jupyter-records-are-not-json", ["jupyter", "list"], 0, "", jupyter_records("{cut"), ["{state}"]),
    Case("jupyter-record-port-is-text", ["jupyter", "stop", "123"], 2,
         "job 123 is not a Jupyter server started from this machine",
         jupyter_records('{"123": {"server": "a", "working_directory": "/w", "host": "n", "port": "x", "token": "t"}}'),
         ["{state}"]),
    Case("jupyter-record-is-a-list", ["jupyter", "stop", "123"], 2,
         "job 123 is not a Jupyter server started from this machine", jupyter_records('{"123": [1]}'), ["{state}"]),
    Case("jupyter-records-are-a-directory", ["jupyter", "list"], 1, "cannot read the Jupyter records",
         both(config(UNREACHABLE), lambda world: world.mkdir(world.state / "jupyter.json") and None), ["{state}"]),
    # Legacy credentials files.
    Case("create-credentials-without-terminal-or-stdin",
         ["-od", "{root}/out", "-h", "h", "-u", "u"], 2, "no terminal to ask the password on",
         program="sl-create-server-credentials", unchanged=["{root}/out"]),
    Case("create-credentials-into-a-directory-anyone-can-write",
         ["-od", "{root}/open", "-h", "h", "-u", "u"], 2, "is writable by every user (mode 0777)",
         lambda world: world.mkdir(world.root / "open", 0o777) and None, ["{root}/open"], stdin="typed\n",
         program="sl-create-server-credentials"),
    Case("import-aliases", ["server", "import", "{root}/server_credentials.yaml"], 2,
         "server_credentials.yaml:1: YAML anchors and aliases",
         credentials_file("username: &u u\nhost: *u\n"), ["{root}/server_credentials.yaml", "{home}/config"]),
    Case("import-not-utf8", ["server", "import", "{root}/server_credentials.yaml"], 2,
         "the credentials file is not UTF-8 text", credentials_file(b"username: u\nhost: h\xff\n"),
         ["{root}/server_credentials.yaml", "{home}/config"]),
    Case("import-port-is-text", ["server", "import", "{root}/server_credentials.yaml"], 2,
         "port must be a whole number from 1 to 65535, not 'abc'", credentials_file(LEGACY + "port: abc\n"),
         ["{root}/server_credentials.yaml", "{home}/config"]),
    Case("import-host-is-a-list", ["server", "import", "{root}/server_credentials.yaml"], 2,
         "host must be text, not list", credentials_file("username: u\nhost: [a, b]\n"),
         ["{root}/server_credentials.yaml", "{home}/config"]),
    Case("import-name-from-host-not-allowed", ["server", "import", "{root}/server_credentials.yaml"], 2,
         "server name 'h;x' is not allowed", credentials_file("username: u\nhost: h;x\n"),
         ["{root}/server_credentials.yaml", "{home}/config"]),
    Case("setup-key-without-public-key", ["server", "setup-key", "a", "--key", "{root}/id_test"], 2,
         "id_test has no public key", key_without_public_half, ["{config}", "{root}/id_test"]),
]
# fmt: on


@pytest.mark.parametrize("case", [pytest.param(case, id=case.name) for case in CASES])
def test_hostile_input(case: Case, users) -> None:
    # The victim's fallback control directory, /tmp/slf-UID, is the same for every run of the suite: two runs at once
    # take turns at the cases that run as the victim.
    victim_turn = os.open("/tmp/slfh-victim.lock", os.O_RDWR | os.O_CREAT, 0o600) if case.victim else None
    if victim_turn is not None:
        fcntl.flock(victim_turn, fcntl.LOCK_EX)
    world = World(users, victim=case.victim)
    try:
        if case.prepare:
            case.prepare(world)
        for name, value in case.env.items():
            if value:
                world.env[name] = str(world.path(value))
            else:
                world.env.pop(name, None)
        watched = {
            path: snapshot(world.path(path).resolve() if path.endswith("..") else world.path(path))
            for path in case.unchanged
        }
        modes = {path: mode_of(world.path(path)) for path in case.same_mode}
        argv = [console_script(case.program), *(str(world.path(arg)) if "{" in arg else arg for arg in case.argv)]
        if world.victim:
            argv = [
                "setpriv",
                f"--reuid={world.victim.pw_uid}",
                f"--regid={world.victim.pw_gid}",
                "--clear-groups",
                "--",
                *argv,
            ]
        # A session of its own: no controlling terminal, as under cron or CI, whoever runs the tests.
        result = subprocess.run(
            argv,
            input=case.stdin,
            capture_output=True,
            text=True,
            env=world.env,
            timeout=60,
            cwd=world.root,
            start_new_session=True,
        )
        assert result.returncode == case.code, result.stderr
        assert "Traceback" not in result.stderr
        if case.code:
            assert result.stderr.startswith(("sl-forgery: error: ", "sl-create-server-credentials: error: "))
            assert result.stderr.count("\n") == 1, result.stderr
            assert case.message in result.stderr, result.stderr
        else:
            assert case.message in result.stdout + result.stderr, result.stderr
        if case.absent_from_output:
            assert case.absent_from_output not in result.stdout + result.stderr
        for path, before in watched.items():
            after = snapshot(world.path(path).resolve() if path.endswith("..") else world.path(path))
            assert after == before, f"{path} changed"
        for path, before in modes.items():
            assert mode_of(world.path(path)) == before, f"the mode of {path} changed"
    finally:
        try:
            world.close()  # removes what the case planted in /tmp/slf-UID
        finally:
            if victim_turn is not None:
                os.close(victim_turn)


def test_the_table_is_long_enough_and_its_names_unique() -> None:
    names = [case.name for case in CASES]
    assert len(names) >= 60 and len(set(names)) == len(names)


# -- beyond the table: sequences and real shells ---------------------------------------------------------------------


def test_a_cut_last_history_line_does_not_swallow_the_next_record(home):
    path = sl_forgery.history_path()
    path.parent.mkdir(parents=True, mode=0o700)
    path.write_text(record("4101") + '{"job_id": "4102", "server": "a", "na')  # a crash cut this write short
    sl_forgery.record_job(sl_forgery.JobRecord("4103", "a", "n", "/w", "/w/o", "/w/e", 1700000001.0))
    assert sorted(sl_forgery.load_job_records()) == ["4101", "4103"]


def test_output_into_a_pipe_closed_early_ends_quietly(home):
    path = sl_forgery.history_path()
    path.parent.mkdir(parents=True, mode=0o700)
    path.write_text("".join(record(str(1000 + n)) for n in range(4000)))  # far more than a pipe holds
    process = subprocess.Popen(
        [console_script("sl-forgery"), "history"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout.read(100).startswith(b"JOBID")
    process.stdout.close()  # as `| head -1` does
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == sl_forgery.EXIT_BROKEN_PIPE
    assert stderr == b""


def test_removing_a_profile_keeps_the_password_another_profile_uses(secret_service, home):
    config = sl_forgery.Config(sl_forgery.config_path())
    for name in ("first", "second"):
        config.servers[name] = sl_forgery.Profile(name, "shared.example", user="u", password_in_keyring=True)
    config.servers["other"] = sl_forgery.Profile("other", "shared.example", user="u", port=2222)
    config.save()
    account = config.servers["first"].keyring_account
    assert sl_forgery.profiles_sharing_password(config, config.servers["first"]) == ["second"]
    sl_forgery.store_password(account, "shared-secret")
    removed = cli("server", "remove", "first")
    assert removed.returncode == 0 and "its password stays in the keyring for 'second'" in removed.stderr
    assert sl_forgery.get_password(account) == "shared-secret"
    assert cli("server", "remove", "second").returncode == 0
    assert sl_forgery.get_password(account) is None


HOSTILE_NAMES = ("a$(touch {mark}-dollar)", "b`touch {mark}-backquote`", "c;touch {mark}-semicolon", "ok")


@pytest.fixture
def hostile_servers_file(home, tmp_path, monkeypatch) -> Path:
    """A copied servers file (never written by sl-forgery, which refuses such names) whose names are shell code."""
    mark = tmp_path / "ran"
    path = tmp_path / "copied-servers.yaml"
    path.write_text("servers:\n" + "".join(f"  {name.format(mark=mark)}:\n    host: h\n" for name in HOSTILE_NAMES))
    path.chmod(0o600)
    monkeypatch.setenv("SL_FORGERY_CONFIG", str(path))
    return mark


def ran(mark: Path) -> list[str]:
    return sorted(path.name for path in mark.parent.iterdir() if path.name.startswith(mark.name))


def test_bash_completion_never_runs_server_names(hostile_servers_file):
    script = Path(__file__).resolve().parents[1] / "completions" / "sl-forgery.bash"
    program = (
        f"source {script}\nCOMP_WORDS=(sl-forgery status --server '')\nCOMP_CWORD=3\n"
        '_shtab_sl_forgery sl-forgery "" --server\nprintf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["ok"]
    assert ran(hostile_servers_file) == []


def test_zsh_completion_never_runs_server_names(hostile_servers_file):
    script = Path(__file__).resolve().parents[1] / "completions" / "_sl-forgery"
    program = (
        'compadd() { print -rl -- "$@" }\n'
        f"eval \"$(sed -n '/^_sl_forgery_servers()/,/^}}/p' {script})\"\n_sl_forgery_servers\n"
    )
    result = subprocess.run(["zsh", "-f", "-c", program], capture_output=True, text=True, check=True)
    assert [line for line in result.stdout.splitlines() if line != "--"] == ["ok"]
    assert ran(hostile_servers_file) == []


def test_fish_completion_never_runs_server_names(hostile_servers_file):
    script = Path(__file__).resolve().parents[1] / "completions" / "sl-forgery.fish"
    result = subprocess.run(
        ["fish", "--no-config", "-c", f"source {script}; complete -C 'sl-forgery status --server '"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == ["ok"]
    assert ran(hostile_servers_file) == []


def test_sl_forgery_itself_refuses_the_copied_file_naming_the_line(hostile_servers_file):
    result = cli("server", "list")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"copied-servers.yaml:2: server name 'a$(touch {hostile_servers_file}-dollar)' is not allowed" in (
        result.stderr
    )
    assert ran(hostile_servers_file) == []


@pytest.mark.parametrize("obstacle", ["history-is-a-directory", "state-dir-links-to-the-neighbours"])
def test_a_job_whose_history_cannot_be_written_still_gives_its_id(obstacle, profile_name, cluster, users):
    world = World(users, victim=False)  # a place the neighbour can reach
    try:
        check_history_obstacle(obstacle, world, users, cluster)
    finally:
        world.close()


def check_history_obstacle(obstacle: str, world: World, users, cluster) -> None:
    history = sl_forgery.history_path()
    history.parent.parent.mkdir(parents=True, exist_ok=True)
    if obstacle == "history-is-a-directory":
        history.mkdir(parents=True)  # nothing can be appended to it
        reason = "Is a directory"
    else:
        theirs = world.theirs / "state"
        as_user(users[NEIGHBOUR], ["mkdir", "-m", "1777", str(theirs)], check=True)
        history.parent.symlink_to(theirs)
        reason = "is a symbolic link"
    result = cli("run", "--mem", "0.25", "--", "true")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    job_id = result.stdout.strip()
    assert job_id.isdigit(), result.stdout
    assert f"job {job_id} was submitted, but it could not be added to the job history {history}" in result.stderr
    assert reason in result.stderr
    if obstacle != "history-is-a-directory":
        assert os.listdir(theirs) == []
    assert job_id in cluster.ssh(f"squeue -h --states=all -j {job_id} -o %i; sacct -n -X -j {job_id} -o JobID").stdout
