"""sl-forgery: run commands on a remote SLURM cluster as if they were local.

A thin layer over the system's OpenSSH (one ControlMaster connection per server, reused by every call) and SLURM
(sbatch, squeue, sacct, scancel). Jobs are rendered by pure functions, submitted in one round trip, and followed to
their true end without hammering the scheduler.

Sections, in the order data flows (each uses only the sections above it):

1. Constants         exit codes, defaults, limits.
2. Errors            SlForgeryError and its tree; `main` maps each to a one-line message and an exit code.
3. Pure              Job, the table of sbatch options, script rendering, the #SBATCH reader, SubmissionPlan,
                     JobStatus, squeue/sacct parsers, WaitSchedule. No I/O: data in, data out.
4. Local state       XDG paths, private files and locks, the servers file, job history, keyring, legacy credentials.
5. Transport         SSHConnection: the ControlMaster and every ssh and ssh-keyscan call; the only code that runs
                     them. Remote scripts go to `exec /bin/sh -s` on stdin, whatever the login shell.
6. SLURM API         Server: submit, status, wait, cancel, logs, keys, Jupyter, files, checks; over one connection.
7. Command line      argument parsing, one Server call per command, printing; `get_parser()`, `main(argv)`.
"""

from __future__ import annotations

__all__ = [
    "__version__",
    "SlForgeryError",
    "UsageError",
    "ConfigError",
    "CredentialError",
    "CommandError",
    "JobNotRecorded",
    "SSHError",
    "SlurmError",
    "TunnelError",
    "SessionsBusy",
    "WaitTimeout",
    "UnknownJobError",
    "JobNotRunning",
    "JupyterError",
    "Job",
    "JupyterJob",
    "JobStatus",
    "JobInfo",
    "JobRecord",
    "JobUsage",
    "Profile",
    "Config",
    "SSHConnection",
    "Server",
    "get_parser",
    "main",
]

__version__ = "0.1.0"

import os
import re
import sys
import enum
import time
import shlex
import stat
import contextlib
import collections
from pathlib import Path, PurePosixPath

# subprocess, json, yaml, keyring and shtab are imported where they are used, so that --help and completion stay
# fast; typing names appear only in annotations, which are never evaluated.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

APP_NAME = "sl-forgery"
KEYRING_SERVICE = "sl-forgery"
DEFAULT_PORT = 22
# What `ssh -G` reads besides the user's file; a file these Include from elsewhere is not watched (see socket_path).
SSH_SYSTEM_CONFIGS = ("/etc/ssh/ssh_config", "/etc/ssh/ssh_config.d")
DEFAULT_CONTROL_PERSIST = 600  # seconds an idle master stays up
DEFAULT_CALL_TIMEOUT = 120.0  # seconds any one ssh call may take
ACCOUNTING_CHECK_TIMEOUT = 15.0  # seconds doctor gives sacct before it calls accounting unresponsive
SERVER_ALIVE_INTERVAL = 15
REMOTE_RECORD_DIR = ".sl-forgery"  # inside a job's working directory: uploaded scripts and exit records
JOBS_ROOT_NAME = "sl-forgery-jobs"  # default parent of job working directories on the server
SCHEDULER_POLL_FIRST = 10.0  # seconds between scheduler queries while waiting, at first...
SCHEDULER_POLL_MAX = 60.0  # ...backing off to this
WANTED_SECONDS = 2 * SCHEDULER_POLL_MAX  # a job another wait asked about this lately is asked about with the others
RECENT_SUBMISSION_GRACE = 120.0  # a job this fresh that no scheduler command shows yet is PENDING, not UNKNOWN
EXIT_CODE_GRACE = 10.0  # how long `wait` asks again for the exit code of a FAILED job whose code sacct lacks
SCHEDULER_CALL_TIMEOUT = 30  # seconds one squeue or sacct may take before it counts as no answer
SUBMISSION_LOOKUP_PATIENCE = 60.0  # seconds a lost submission's sbatch is given to end before squeue is searched
SCHEDULER_GRACE = 300.0  # seconds a wait rides out a controller that does not answer before it fails
# What squeue prints when the controller is overloaded or restarting, rather than when the request is wrong.
SCHEDULER_BUSY_MARKERS = (
    "Socket timed out",
    "Unable to contact slurm controller",
    "Connection refused",
    "Zero Bytes were transmitted or received",
    "Transport endpoint is not connected",
    "Unexpected missing socket error",  # the controller dropped the connection (stopped, restarting)
)
WATCHER_HEARTBEAT = 5  # seconds; a watcher whose client is gone dies on its next heartbeat
WATCHER_RESTART_PAUSE = 1.0  # seconds between starts of a wait's watcher when its connection keeps failing
CANCEL_NOTICE_CHECK = 0.5  # seconds between looks, while waiting, for a cancel from this machine
REPORT_SETTLE = 15.0  # seconds a report after a job's end may wait for sacct to record the end of every step
LASTING_STOP_SECONDS = 3.0  # how long a watcher's or a followed log's ssh is given to end on SIGTERM
LOG_SETTLE_SECONDS = 1.0  # after a job ends, what it wrote last reaches a followed log within this
# sshd allows 10 sessions per connection by default (MaxSessions). Lasting sessions (watchers, logs --follow) take
# at most this many, across local commands, so that short calls always find room; a refused call is retried after
# these pauses.
LASTING_SESSIONS = 5
SSHD_DEFAULT_SESSIONS = 10  # sshd's MaxSessions unless the site changed it
RECORD_POLL_SECONDS = 1.0  # without a watcher, how often `wait` looks for exit records (no scheduler query)
REFUSED_SESSION_RETRY_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
# A call that finds no master falls back to its ProxyCommand, `false`, and OpenSSH reports that pipe, not a host,
# as its peer; which line it prints depends on whether it first reads or writes.
NO_MASTER_MARKERS = ("UNKNOWN port 65535", "kex_exchange_identification")
# Printed by every remote command before its own output: what the login shell's start-up files print (a .bashrc
# that greets, which bash reads even for ssh commands) comes before it and is dropped.
OUTPUT_MARKER = "@@sl-forgery-output@@"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
EXIT_SSH = 255
EXIT_BROKEN_PIPE = 141  # as a shell reports a command ended by SIGPIPE
EXIT_SCHEDULER_UNREACHABLE = 75  # sysexits' EX_TEMPFAIL: try again later
EXIT_CANNOT_START = 78  # sysexits' EX_CONFIG: the job asks for what the cluster never gives

NOT_CHECKED = "-"  # a check's result when what it needs (the connection) failed: that failure is the one to fix

EXIT_CODES_HELP = """\
exit codes:
  0    success (every job COMPLETED)
  1    a job ended badly (CANCELLED, TIMEOUT, OUT_OF_MEMORY, ...) or another error
  2    usage or configuration error
  N    wait, --wait, logs --follow: the exit code of a FAILED job
  75   wait, --wait: the scheduler did not answer for 5 minutes (the jobs may still run)
  78   wait, --wait: a job can never start as submitted (SLURM's reason is shown)
  124  --timeout reached
  130  interrupted (Ctrl-C); the job keeps running, but under jupyter, which cancels it
  141  the reader of the output went away (a pipe into head)
  255  SSH failure (connection, authentication, host key)

environment:
  SL_FORGERY_CONFIG   path of the servers file (default $XDG_CONFIG_HOME/sl-forgery/servers.yaml)
  SL_FORGERY_SERVER   server profile to use when --server is not given
  SL_FORGERY_SSH_CONFIG  ssh config file for servers whose profile names none (default ~/.ssh/config)
  XDG_STATE_HOME      where the local job history lives (sl-forgery/jobs.jsonl)
  XDG_CACHE_HOME      where help and completion text and the parsed servers file are cached
  NO_COLOR            set and not empty: no colour in tables, even on a terminal
"""


# ======================================================================================================================
# Errors
# ======================================================================================================================


class SlForgeryError(Exception):
    """Root of every error sl-forgery raises on purpose; `main` turns each into a one-line message and exit code."""

    exit_code = EXIT_FAILURE


class UsageError(SlForgeryError):
    """A value given by the user cannot be used."""

    exit_code = EXIT_USAGE


class ConfigError(SlForgeryError):
    """The local configuration (servers file, legacy credentials) is missing or malformed."""

    exit_code = EXIT_USAGE


class CredentialError(SlForgeryError):
    """A password cannot be stored or found."""


class JupyterError(SlForgeryError):
    """A Jupyter job ended before its server answered; ``log_tail`` holds the end of its error log."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class TensorBoardError(SlForgeryError):
    """TensorBoard could not start in its job; ``log_tail`` holds the end of its log."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class UnknownJobError(SlForgeryError):
    """No scheduler command, exit record or local submission knows a job: waiting for it would never end."""


class WaitTimeout(SlForgeryError):
    """`wait` gave up before every job ended."""

    exit_code = EXIT_TIMEOUT


class JobNotRunning(SlForgeryError):
    """A command that needs a job's node (shell, forward, code) was given a job that has ended."""


def _truncate(text: str, limit: int = 2000) -> str:
    text = text.rstrip("\n")
    if len(text) <= limit:
        return text
    return text[:limit] + f"... ({len(text) - limit} more characters)"


class CommandError(SlForgeryError):
    """A program exited with a non-zero code: keeps what ran, its exit code, stdout and stderr."""

    def __init__(
        self,
        argv: Sequence[str],
        returncode: int,
        stdout: str = "",
        stderr: str = "",
        what: str = "",
        script: str = "",
    ) -> None:
        self.argv = list(argv)
        self.script = script  # what a remote call sent to the server's sh on stdin
        self.returncode = returncode
        self.stdout = stdout or ""
        self.stderr = stderr or ""
        self.what = what or Path(self.argv[0]).name
        super().__init__(self.summary)

    @property
    def summary(self) -> str:
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        reason = f": {lines[-1]}" if lines else ""
        # Some SLURM commands refuse a request and still exit 0 (scancel for an unknown job id).
        outcome = f"failed with exit code {self.returncode}" if self.returncode else "refused"
        return f"{self.what} {outcome}{reason}"

    def __str__(self) -> str:
        ran = (
            f"{shlex.join(self.argv)}\n\n  SCRIPT:\n{_truncate(self.script)}" if self.script else shlex.join(self.argv)
        )
        return (
            f"{self.summary}\n\n  RAN: {ran}\n\n  EXIT CODE: {self.returncode}"
            f"\n\n  STDOUT:\n{_truncate(self.stdout)}\n\n  STDERR:\n{_truncate(self.stderr)}"
        )


class SSHError(CommandError):
    """ssh failed: no connection, authentication refused, host key rejected, or a timeout."""

    exit_code = EXIT_SSH

    @property
    def summary(self) -> str:
        text = self.stderr
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text or "Host key verification failed" in text:
            changed = "HAS CHANGED" in text
            problem = "its host key has CHANGED (possible man-in-the-middle)" if changed else "its host key is unknown"
            advice = (
                "if the server was reinstalled, remove the old key with ssh-keygen -R and accept the new one"
                if changed
                else "connect once with plain ssh, or use 'sl-forgery server add --accept-host-key'"
            )
            return f"{self.what} refused: {problem}; {advice}"
        # What the askpass helper said (a prompt it would not answer) tells more than how ssh went on afterwards.
        helper = [line for line in text.splitlines() if line.startswith(f"{APP_NAME}: ")]
        if helper:
            return f"{self.what} failed: {helper[-1][len(APP_NAME) + 2 :]}"
        if "Permission denied" in text:
            return (
                f"{self.what} failed: authentication refused ({text.strip().splitlines()[-1]}); check the user "
                "name, your key, or the password in the keyring ('sl-forgery server add NAME ... --password')"
            )
        return super().summary


class TunnelError(SSHError):
    """A port forward over the master could not be made, or nothing answers through it."""


class SessionsBusy(SlForgeryError):
    """Every slot for a lasting session (a watcher, a followed log) on a connection is taken."""


class SlurmError(CommandError):
    """A SLURM command (sbatch, squeue, sacct, scancel) refused or failed."""


class SchedulerBusy(SlurmError):
    """The controller did not answer in time (``Socket timed out``, a hung command): ask again later."""


class SchedulerUnreachable(SlForgeryError):
    """`wait` heard nothing from the scheduler for SCHEDULER_GRACE seconds; the jobs may still be running."""

    exit_code = EXIT_SCHEDULER_UNREACHABLE


class JobCannotStart(SlForgeryError):
    """A job waited for is pending for a reason that never clears by itself (see NEVER_START_REASONS)."""

    exit_code = EXIT_CANNOT_START


# ======================================================================================================================
# Pure functions and data: jobs, scripts, states, parsers (no I/O in this section)
# ======================================================================================================================

# SLURM splits an #SBATCH line on whatever C's isspace() calls blank and treats both quote characters as quotes;
# inside double quotes only a backslash escapes, so that is the one form used.
_SBATCH_SPECIAL = set(" \t\v\f\r\"\\#'")


def sbatch_quote(value: str) -> str:
    r"""Quote a value for an ``#SBATCH`` line, so that it stays one value.

    >>> print(sbatch_quote("my job's \"name\""))
    "my job's \"name\""
    >>> sbatch_quote("plain-name_1"), sbatch_quote("a\vb")
    ('plain-name_1', '"a\x0bb"')
    """
    if not any(char in _SBATCH_SPECIAL for char in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_text(what: str, value: object, *, allow_empty: bool = False) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise UsageError(f"{what} must be text, not {type(value).__name__}")
    if not value and not allow_empty:
        raise UsageError(f"{what} must not be empty")
    if "\n" in value or "\r" in value or "\0" in value:
        raise UsageError(f"{what} must be a single line: {value!r} contains a line break or NUL")
    return value


def _check_int(what: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{what} must be a whole number, not {value!r}")
    if value < minimum:
        raise UsageError(f"{what} must be at least {minimum}, not {value}")
    return value


def _check_port(what: str, value: object, any_free: bool = False) -> int:
    """A TCP port; with ``any_free``, also 0 (any free one)."""
    port = _check_int(what, value, minimum=0 if any_free else 1)
    if port > 65535:
        raise UsageError(f"{what} must be at most 65535{' (0: any free port)' if any_free else ''}, not {port}")
    return port


def _check_minutes(what: str, value: object) -> int:
    return _check_int(f"{what} (minutes)", value)


def _check_gigabytes(what: str, value: object) -> float:
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"{what} must be a positive number of gigabytes, not {value!r}")
    return value


def _remote_path(what: str, value: object) -> str:
    """An absolute path on the server, as POSIX text."""
    path = PurePosixPath(_check_text(what, value))
    if not path.is_absolute():
        raise UsageError(f"{what} must be an absolute path on the server, not {str(path)!r}")
    return str(path)


_ARRAY_RE = re.compile(r"^[0-9]+(-[0-9]+(:[0-9]+)?)?(,[0-9]+(-[0-9]+(:[0-9]+)?)?)*(%[0-9]+)?$")
_DEPENDENCY_RE = re.compile(r"^[a-z_]+(:[0-9_+]+)*([,?][a-z_]+(:[0-9_+]+)*)*$|^singleton$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_array(what: str, value: object) -> str:
    if not _ARRAY_RE.match(_check_text(what, value)):
        raise UsageError(f"{what} {value!r} is not a SLURM array spec such as '1-10', '0-15:4' or '1,3,5%2'")
    return str(value)


def _check_dependency(what: str, value: object) -> str:
    if not isinstance(value, str) and isinstance(value, (list, tuple)):
        value = "afterok:" + ":".join(str(job_id) for job_id in value)
    if not _DEPENDENCY_RE.match(_check_text(what, value)):
        raise UsageError(f"{what} {value!r} is not a SLURM dependency such as 'afterok:123:124'")
    return str(value)


_GPUS_RE = re.compile(r"^([A-Za-z0-9_.-]+:)?[1-9][0-9]*$")


def _check_gpus(what: str, value: object) -> str:
    if not isinstance(value, str):
        return str(_check_int(what, value))
    if not _GPUS_RE.match(_check_text(what, value)):
        raise UsageError(f"{what} must be a number of GPUs or TYPE:N, such as 2 or a100:2, not {value!r}")
    return value


def _mem_option(ram_gb: float) -> str:
    if float(ram_gb).is_integer():
        return f"{int(ram_gb)}G"
    return f"{max(1, round(ram_gb * 1024))}M"


class SbatchOption(
    collections.namedtuple("SbatchOption", "name short field flag kind check render help", defaults=(str, ""))
):
    """One sbatch option that sl-forgery sets itself: from a `Job` field (``field``) and, for the resource flags of
    run, submit and jupyter, from a command-line ``flag`` of type ``kind``; ``check`` validates a value (given what
    to call it in an error), ``render`` writes it as sbatch reads it. Extra options may not set these again."""

    __slots__ = ()


# The one table of managed sbatch options: the job script's header, the #SBATCH reader, the command line's resource
# flags and the guard on extra options all read it.
SBATCH_OPTIONS = (
    SbatchOption("job-name", "J", "job_name", "--name", str, _check_text, help="job name"),
    SbatchOption("output", "o", "output_log", "", str, _remote_path),
    SbatchOption("error", "e", "error_log", "", str, _remote_path),
    SbatchOption(
        "chdir", "D", "working_directory", "--workdir", str, _remote_path,
        help="working directory on the server (created if missing)",
    ),
    SbatchOption("cpus-per-task", "c", "cpus_to_use", "--cpus", int, _check_int, help="CPUs per task"),
    SbatchOption("mem", "", "ram_gb", "--mem", float, _check_gigabytes, _mem_option, "memory in GB"),
    SbatchOption("time", "t", "time_limit", "--time", int, _check_minutes, help="time limit in minutes"),
    SbatchOption("partition", "p", "partition", "--partition", str, _check_text, help="partition"),
    SbatchOption("account", "A", "account", "--account", str, _check_text, help="account to charge"),
    SbatchOption("qos", "q", "qos", "--qos", str, _check_text, help="quality of service"),
    SbatchOption("gpus", "G", "gpus", "--gpus", str, _check_gpus, help="GPUs (a number, or TYPE:N)"),
    SbatchOption("nodes", "N", "nodes", "", int, _check_int),
    SbatchOption("array", "a", "array", "", str, _check_array),
    SbatchOption("dependency", "d", "dependency", "", str, _check_dependency),
    # One cluster per server profile: status and cancel must ask the cluster the job went to.
    SbatchOption("clusters", "M", "", "", str, _check_text),
    SbatchOption("parsable", "", "", "", str, _check_text),
    SbatchOption("wrap", "", "", "", str, _check_text),
)  # fmt: skip
_OPTION_BY_NAME = {option.name: option for option in SBATCH_OPTIONS}

# Every sbatch option SLURM 22.05 knows: sbatch's getopt_long accepts any unique prefix of one (`--outp=` is
# `--output=`), so an option is checked by the full name getopt would give it.
SBATCH_LONG_OPTIONS = frozenset(
    """account acctg-freq array batch bb bbf begin chdir cluster-constraint clusters comment constraint container
    contiguous core-spec cores-per-socket cpu-freq cpus-per-gpu cpus-per-task deadline delay-boot dependency
    distribution error exclude exclusive export export-file extra-node-info get-user-env gid gpu-bind gpu-freq gpus
    gpus-per-node gpus-per-socket gpus-per-task gres gres-flags help hint hold ignore-pbs input job-name
    kill-on-invalid-dep licenses mail-type mail-user mcs-label mem mem-bind mem-per-cpu mem-per-gpu mincpus network
    nice no-kill no-requeue nodefile nodelist nodes ntasks ntasks-per-core ntasks-per-gpu ntasks-per-node
    ntasks-per-socket open-mode output overcommit oversubscribe parsable partition power prefer priority profile
    propagate qos quiet reboot requeue reservation signal sockets-per-node spread-job switches test-only thread-spec
    threads-per-core time time-min tmp uid usage use-min-nodes verbose version wait wait-all-nodes wckey
    wrap""".split()
)
# Options that take no value, or only one joined by "=": the next word is not theirs.
_SBATCH_FLAG_OPTIONS = frozenset(
    """contiguous exclusive get-user-env help hold ignore-pbs no-kill no-requeue overcommit oversubscribe parsable
    quiet reboot requeue spread-job test-only usage use-min-nodes verbose version wait""".split()
)
SBATCH_SHORT_OPTIONS = {
    "a": "array", "A": "account", "b": "begin", "B": "extra-node-info", "c": "cpus-per-task", "C": "constraint",
    "d": "dependency", "D": "chdir", "e": "error", "F": "nodefile", "G": "gpus", "h": "help", "H": "hold",
    "i": "input", "J": "job-name", "k": "no-kill", "L": "licenses", "m": "distribution", "M": "clusters",
    "n": "ntasks", "N": "nodes", "o": "output", "O": "overcommit", "p": "partition", "q": "qos", "Q": "quiet",
    "s": "oversubscribe", "S": "core-spec", "t": "time", "u": "usage", "v": "verbose", "V": "version",
    "w": "nodelist", "W": "wait", "x": "exclude",
}  # fmt: skip


def resolve_sbatch_option(word: str) -> str:
    """The full name sbatch's getopt_long gives a long option written ``--word``: the exact name, else the one
    option it is a prefix of. A prefix of several, or of none, is refused, as sbatch refuses it.

    >>> resolve_sbatch_option("outp"), resolve_sbatch_option("mem")
    ('output', 'mem')
    """
    if word in SBATCH_LONG_OPTIONS:
        return word
    matches = sorted(name for name in SBATCH_LONG_OPTIONS if name.startswith(word))
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise UsageError(f"sbatch option --{word} is ambiguous ({', '.join('--' + m for m in matches[:3])}, ...)")
    raise UsageError(f"--{word} is not an sbatch option (see 'man sbatch')")


def split_sbatch_words(text: str) -> list[str]:
    """The words of an ``#SBATCH`` line as SLURM reads them: split on blanks, quotes grouping, backslash escaping.

    >>> split_sbatch_words('--job-name="a b" -o x')
    ['--job-name=a b', '-o', 'x']
    """
    words, word, quote, started, escaped = [], "", "", False, False
    for char in text:
        if escaped:
            word, escaped = word + char, False
        elif char == "\\":
            escaped = started = True
        elif quote:
            if char == quote:
                quote = ""
            else:
                word += char
        elif char in "\"'":
            quote, started = char, True
        elif char in " \t\v\f\r\n":
            if started:
                words.append(word)
            word, started = "", False
        else:
            word, started = word + char, True
    if started:
        words.append(word)
    return words


def parse_sbatch_words(words: Sequence[str]) -> list[tuple[str, str | None]]:
    """Options as (full long name, value or None), read from sbatch arguments as its getopt_long reads them."""
    options: list[tuple[str, str | None]] = []
    position = 0
    while position < len(words):
        word = words[position]
        position += 1
        if word.startswith("--") and len(word) > 2:
            name, joined, value = word[2:].partition("=")
            name = resolve_sbatch_option(name)
            if not joined and name not in _SBATCH_FLAG_OPTIONS and position < len(words):
                value, position = words[position], position + 1
            options.append((name, value if joined or name not in _SBATCH_FLAG_OPTIONS else None))
        elif word.startswith("-") and len(word) > 1 and word[1] in SBATCH_SHORT_OPTIONS:
            name = SBATCH_SHORT_OPTIONS[word[1]]
            value = word[2:] or None
            if value is None and name not in _SBATCH_FLAG_OPTIONS and position < len(words):
                value, position = words[position], position + 1
            options.append((name, value))
        else:
            raise UsageError(f"{word!r} is not an sbatch option")
    return options


def read_sbatch_directives(script: str) -> dict[str, str | None]:
    """A script's own ``#SBATCH`` options by full name (the last of each wins), read as sbatch reads them: from the
    line after the shebang, past blank lines and comments, up to the first command.

    >>> read_sbatch_directives("#!/bin/bash\\n\\n# fit\\n#SBATCH -J fit\\n#SBATCH --outp=/l/%j.out\\necho\\n#SBATCH -p")
    {'job-name': 'fit', 'output': '/l/%j.out'}
    """
    directives: dict[str, str | None] = {}
    for line in script.split("\n")[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if stripped.startswith("#SBATCH") and stripped[7:8] in (" ", "\t"):
            text = stripped[7:].split(" #", 1)[0]
            directives.update(parse_sbatch_words(split_sbatch_words(text)))
    return directives


def _normalize_sbatch_options(options: Sequence[str] | Mapping[str, object] | None) -> list[str]:
    """Validate extra raw sbatch options: ``["--constraint=x", "--exclusive"]`` or ``{"constraint": "x"}``."""
    from collections.abc import Mapping

    if options is None:
        return []
    if isinstance(options, Mapping):
        items = [f"--{key}" if value is True else f"--{key}={value}" for key, value in options.items()]
    elif isinstance(options, str):
        raise UsageError("sbatch_options must be a list of options such as ['--constraint=gpu'], not one string")
    else:
        items = list(options)
    result = []
    for item in items:
        text = _check_text("an sbatch option", item)
        if not re.match(r"^--[a-z]", text):
            raise UsageError(f"sbatch option {text!r} is not of the form --name or --name=value")
        name, joined, value = text[2:].partition("=")
        full_name = resolve_sbatch_option(name)
        if full_name in _OPTION_BY_NAME:
            option = _OPTION_BY_NAME[full_name]
            given = f"--{full_name}" if name == full_name else f"--{name} (--{full_name})"
            if option.field:
                raise UsageError(f"sbatch option {given} is set by a Job argument; use that argument ({option.field})")
            raise UsageError(f"sbatch option {given} is set by sl-forgery itself and cannot be given")
        result.append(f"--{full_name}{joined}{value}")
    return result


def check_env_manager(env_manager: object) -> str | None:
    if env_manager is None or env_manager in ENV_MANAGERS:
        return env_manager  # type: ignore[return-value]
    raise UsageError(f"env_manager {env_manager!r} is not one of {', '.join(ENV_MANAGERS)}")


class Job:
    """A batch job: SLURM resources, set-up lines, an optional environment, and shell commands run in order.

    ``time_limit`` is in minutes and ``ram_gb`` in GB, as in the original sl-forgery. Paths are absolute paths on
    the server; log paths may use SLURM's patterns (``%j`` is the job id). ``setup`` lines (``module load ...``)
    run before ``conda_environment`` is activated: a conda environment's name, or the path of a venv, a conda
    prefix, a uv or a pixi project; ``env_manager`` (conda, mamba, micromamba, venv, uv or pixi) says which when
    the value alone does not. The first failing command ends the job with that command's exit code.
    """

    def __init__(
        self,
        job_name: str,
        output_log: str | os.PathLike[str],
        error_log: str | os.PathLike[str],
        working_directory: str | os.PathLike[str],
        conda_environment: str | None = None,
        cpus_to_use: int = 1,
        ram_gb: float = 4,
        time_limit: int = 60,
        *,
        partition: str | None = None,
        account: str | None = None,
        qos: str | None = None,
        gpus: int | str | None = None,
        nodes: int | None = None,
        array: str | None = None,
        dependency: str | Sequence[str | int] | None = None,
        environment: Mapping[str, str] | None = None,
        sbatch_options: Sequence[str] | Mapping[str, object] | None = None,
        setup: Sequence[str] | None = None,
        env_manager: str | None = None,
    ) -> None:
        given = dict(locals())
        for option in SBATCH_OPTIONS:
            if option.field:
                value = given[option.field]
                setattr(self, option.field, None if value is None else option.check(option.field, value))
        self.conda_environment = (
            None if conda_environment is None else _check_text("conda_environment", conda_environment)
        )
        self.environment = dict(environment or {})
        for name, value in self.environment.items():
            if not isinstance(name, str) or not _ENV_NAME_RE.match(name):
                raise UsageError(f"environment variable name {name!r} is not a valid shell name")
            _check_text(f"environment variable {name}", value, allow_empty=True)
        self.sbatch_options = _normalize_sbatch_options(sbatch_options)
        if isinstance(setup, str):
            raise UsageError("setup must be a list of shell lines, not one string")
        self.setup = [_check_text("a set-up line", line) for line in setup or []]
        self.env_manager = check_env_manager(env_manager)
        if self.env_manager is not None and self.conda_environment is None:
            raise UsageError(f"env_manager {self.env_manager!r} needs an environment to activate (conda_environment)")
        self.commands: list[str] = []
        self.job_id: str | None = None
        # Ties the job's exit record to this submission (see `render_exit_record`).
        self.submission_nonce = os.urandom(6).hex()

    def add_command(self, command: str) -> None:
        """Append one shell line, verbatim, to the commands the job runs."""
        self.commands.append(_check_text("a command", command))

    @property
    def script(self) -> str:
        """The whole bash script sbatch receives."""
        return render_job_script(self)

    def __repr__(self) -> str:
        return f"Job(job_name={self.job_name!r}, job_id={self.job_id!r}, working_directory={self.working_directory!r})"


def render_sbatch_header(job: Job) -> list[str]:
    """The ``#SBATCH`` lines of a job, every value quoted for SLURM's own parser."""
    lines = [
        f"#SBATCH --{option.name}={sbatch_quote(str(option.render(value)))}"
        for option in SBATCH_OPTIONS
        if option.field and (value := getattr(job, option.field)) is not None
    ]
    for extra in job.sbatch_options:
        name, joined, value = extra.partition("=")
        lines.append(f"#SBATCH {name}={sbatch_quote(value)}" if joined else f"#SBATCH {name}")
    return lines


# Signals that end a batch shell (scancel, a time limit and preemption send TERM), as Linux numbers them. A shell
# runs its EXIT trap with $? = 0 when one of them arrives while a command runs, so each gets a trap of its own that
# records the signal instead: a killed job never reads as a success.
RECORDED_SIGNALS = (("HUP", 1), ("INT", 2), ("USR1", 10), ("USR2", 12), ("TERM", 15))


def render_exit_record(nonce: str = "") -> list[str]:
    """Shell lines that make a job write how it ended into ``.sl-forgery/ID.exit`` under the directory it starts
    in: ``exit RC ID NONCE``, or ``signal N ID NONCE`` when a signal ended it. ``ID`` and the submission's
    ``nonce`` tie the record to this job, so that a reused directory (or a job id the controller hands out again)
    cannot pass an old record off as a new job's.

    ``wait`` notices the end of a job from this file within a second, and statuses stay right on clusters without
    accounting. POSIX sh, so that it also fits a user's own ``#!/bin/sh`` script.
    """
    job_ref = "${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}"
    return [
        f'__slf_record="$PWD/{REMOTE_RECORD_DIR}/{job_ref}.exit"',
        '__slf_end() { mkdir -p "${__slf_record%/*}" && '
        f'printf "%s %s %s %s\\n" "$1" "$2" "{job_ref}" {shlex.quote(nonce or "-")} > "$__slf_record.tmp" && '
        'mv -f "$__slf_record.tmp" "$__slf_record"; }',
        "trap '__slf_rc=$?; __slf_end exit $__slf_rc; exit $__slf_rc' EXIT",
        *(
            f"trap '__slf_end signal {number}; trap - EXIT; exit {128 + number}' {name}"
            for name, number in RECORDED_SIGNALS
        ),
    ]


ENV_MANAGERS = ("conda", "mamba", "micromamba", "venv", "uv", "pixi")

# Each manager's documented shell hook: its output, evaluated, defines the function that activates.
_SHELL_HOOKS = {
    "conda": "conda shell.bash hook",
    "mamba": "mamba shell hook --shell bash",
    "micromamba": "micromamba shell hook --shell bash",
}

# Where module systems keep the init that defines `module` (Lmod on Debian and RHEL, Environment Modules), which a
# batch shell lacks unless the site's login scripts exported it.
MODULE_INIT_SCRIPTS = (
    "/etc/profile.d/lmod.sh",
    "/etc/profile.d/z00_lmod.sh",
    "/etc/profile.d/modules.sh",
    "/usr/share/lmod/lmod/init/bash",
    "/usr/share/Modules/init/bash",
    "/usr/share/modules/init/bash",
)

_MODULE_COMMAND_RE = re.compile(r"(?:^|[;&|({]\s*)(?:module|ml)(?:\s|$)")


def _shell_path(path: str) -> str:
    """A path quoted for the shell, with a leading ``~/`` left to the remote shell's $HOME.

    >>> print(_shell_path("~/envs/my env"))
    "$HOME"/'envs/my env'
    """
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def _is_path(environment: str) -> bool:
    return "/" in environment or environment.startswith(("~", "."))


def infer_env_manager(environment: str, env_manager: str | None = None) -> str | None:
    """The manager that activates ``environment``: the one named, conda for a name, and ``None`` for a path,
    which the job script tells apart on the node (a venv, a conda prefix, a pixi or a uv project).

    >>> infer_env_manager("analysis"), infer_env_manager("/opt/venv"), infer_env_manager("/p", "pixi")
    ('conda', None, 'pixi')
    """
    if env_manager is not None:
        return env_manager
    return None if _is_path(environment) else "conda"


# The node as squeue names it, in a job script.
_NODE_NAME = "${SLURMD_NODENAME:-$(hostname)}"


def _fail(message: str) -> str:
    """A shell group that ends the job with one line on stderr naming the node; ``message`` is shell words."""
    return f'{{ echo "sl-forgery:" {message} "on {_NODE_NAME}" >&2; exit 1; }}'


def render_setup(lines: Sequence[str], module_inits: Sequence[str] = MODULE_INIT_SCRIPTS) -> list[str]:
    """Shell lines for a job's set-up, run in order before its environment is activated.

    A line that uses ``module`` (or Lmod's ``ml``) gets the module system first: its init is sourced when the batch
    shell lacks the ``module`` function, and the job fails with one line when there is none. Each set-up line that
    fails ends the job with its exit code and a line naming it. POSIX sh, so that it also fits a user's own script.
    """
    result: list[str] = []
    if any(_MODULE_COMMAND_RE.search(line.strip()) for line in lines):
        inits = " ".join(shlex.quote(path) for path in module_inits)
        result += [
            "if ! command -v module >/dev/null 2>&1; then",
            "    set +e",  # the init scripts are not written for set -e
            f"    for __slf_init in {inits}; do",
            '        if [ -r "$__slf_init" ]; then . "$__slf_init" >/dev/null; break; fi',
            "    done",
            "    set -e",
            "fi",
            "command -v module >/dev/null 2>&1 || "
            + _fail(f"\"no module system: 'module' is not defined and none of {' '.join(module_inits)} exists\""),
        ]
    for line in lines:
        quoted = shlex.quote(line)
        result += [
            "{",
            line,
            f'}} || {{ __slf_rc=$?; echo "sl-forgery: set-up line failed (exit $__slf_rc) on {_NODE_NAME}:" '
            f"{quoted} >&2; exit $__slf_rc; }}",
        ]
    return result


def _hook_activation(manager: str, environment: str) -> list[str]:
    hook = _SHELL_HOOKS[manager]
    return [
        f'__slf_hook="$({hook})" || ' + _fail(f"\"{manager} is not available ('{hook}' failed)\""),
        'eval "$__slf_hook"',
        f"{manager} activate {_shell_path(environment)} || "
        + _fail(f'"cannot activate {manager} environment" {shlex.quote(environment)}'),
    ]


def _venv_activation(environment: str, manager: str = "venv") -> list[str]:
    return [
        f". {_shell_path(environment)}/bin/activate || "
        + _fail(f'"cannot activate {manager} environment" {shlex.quote(environment)}'),
    ]


def _uv_activation(environment: str) -> list[str]:
    """A venv made by uv is activated as one; a uv project is synced from its lock file (a no-op when it is up to
    date, never a new resolution) and its environment activated."""
    path = _shell_path(environment)
    return [
        f"if [ -f {path}/bin/activate ]; then",
        *("    " + line for line in _venv_activation(environment, "uv")),
        "else",
        f"    uv sync --project {path} --frozen --quiet || "
        + _fail(f'"cannot sync the uv project" {shlex.quote(environment)}'),
        f'    . "${{UV_PROJECT_ENVIRONMENT:-{path}/.venv}}/bin/activate" || '
        + _fail(f'"cannot activate uv environment" {shlex.quote(environment)}'),
        "fi",
    ]


def _pixi_activation(environment: str) -> list[str]:
    path = _shell_path(environment)
    return [
        f'__slf_hook="$(pixi shell-hook --shell bash --manifest-path {path})" || '
        + _fail(f'"cannot activate pixi environment" {shlex.quote(environment)}'),
        'eval "$__slf_hook"',
    ]


def render_activation(environment: str, env_manager: str | None = None) -> list[str]:
    """Activate ``environment`` with its manager's documented activation, never through ``conda init``.

    Without a manager, a name is a conda environment and a path is told apart on the node: a venv (``bin/activate``),
    a conda prefix (``conda-meta``), a pixi project (``pixi.toml``) or a uv project (``pyproject.toml``). A missing
    manager or environment fails the job at once: the manager's own message, then one line naming the node.
    """
    manager = infer_env_manager(environment, env_manager)
    if manager in _SHELL_HOOKS:
        return _hook_activation(manager, environment)
    if manager == "venv":
        return _venv_activation(environment)
    if manager == "uv":
        return _uv_activation(environment)
    if manager == "pixi":
        return _pixi_activation(environment)
    path = _shell_path(environment)
    branches = [
        (f"[ -f {path}/bin/activate ]", _venv_activation(environment)),
        (f"[ -d {path}/conda-meta ]", _hook_activation("conda", environment)),
        (f"[ -f {path}/pixi.toml ]", _pixi_activation(environment)),
        (f"[ -f {path}/pyproject.toml ]", _uv_activation(environment)),
    ]
    lines = []
    for index, (test, body) in enumerate(branches):
        lines += [f"{'elif' if index else 'if'} {test}; then", *("    " + line for line in body)]
    return [
        *lines,
        "else",
        "    "
        + _fail(
            f'{shlex.quote(environment)} "is no venv (bin/activate), conda environment (conda-meta), pixi project '
            '(pixi.toml) or uv project (pyproject.toml); set env_manager"'
        ),
        "fi",
    ]


def render_job_script(job: Job) -> str:
    """The bash script of a job: header, exit record, variables, set-up, activation, then the commands."""
    lines = ["#!/bin/bash", *render_sbatch_header(job), "", *render_exit_record(job.submission_nonce), "set -e"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in job.environment.items()]
    lines += render_setup(job.setup)
    if job.conda_environment is not None:
        lines += render_activation(job.conda_environment, job.env_manager)
    lines += ["", *job.commands, ""]
    return "\n".join(lines)


def choose(value: Any, profile: Profile, field: str) -> Any:
    """The one rule for a job setting: the value given (a flag, an argument), else the server profile's default."""
    return value if value is not None else getattr(profile, field, None)


JUPYTER_RUNTIME_GLOB = "jpserver-*"
# What a Jupyter job asks for unless told otherwise (a notebook needs more than a batch job's defaults).
JUPYTER_DEFAULTS = {"cpus_to_use": 2, "ram_gb": 32, "time_limit": 240}
JUPYTER_RUNTIME_FILE_PATIENCE = 30.0  # seconds Jupyter's runtime file may stay empty or cut short


class JupyterJob(Job):
    """A job whose only command runs Jupyter Lab: on a port free on its node (or ``port``), with a random token
    made on the node and passed through the environment (never in argv), its runtime files in a 0700 directory.

    After `Server.launch_jupyter_server` it also carries where the server listens (``host``, ``port``), its
    ``token``, the local end of the tunnel (``local_port``) and the ``url`` that works in a browser here.
    """

    def __init__(
        self,
        job_name: str,
        output_log: str,
        error_log: str,
        working_directory: str,
        conda_environment: str | None,
        notebook_directory: str,
        port: int = 0,
        jupyter_args: str = "",
        **job_arguments: Any,
    ) -> None:
        super().__init__(job_name, output_log, error_log, working_directory, conda_environment, **job_arguments)
        self.notebook_directory = _remote_path("notebook_directory", notebook_directory)
        self.port = _check_port("port", port, any_free=True)
        try:
            self.jupyter_args = shlex.split(_check_text("jupyter_args", jupyter_args, allow_empty=True))
        except ValueError as error:
            raise UsageError(
                f"jupyter_args {jupyter_args!r} cannot be split into words as a shell would ({error}); close or "
                "escape the quote"
            ) from None
        self.host: str | None = None
        self.token: str | None = None
        self.local_port: int | None = None
        self.url: str | None = None
        self.commands = render_jupyter_commands(self)

    @property
    def runtime_directory(self) -> str:
        return str(PurePosixPath(self.working_directory, REMOTE_RECORD_DIR, "jupyter"))


def render_jupyter_commands(job: JupyterJob) -> list[str]:
    """The commands of a Jupyter job. The token is made on the node and reaches Jupyter through JUPYTER_TOKEN;
    port 0 lets the node pick a free port, which Jupyter writes into its runtime file for the client to read."""
    lab = [
        "jupyter",
        "lab",
        "--no-browser",
        f"--ServerApp.port={job.port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={job.notebook_directory}",
        *job.jupyter_args,
    ]
    return [
        "umask 077",
        f"export JUPYTER_RUNTIME_DIR={shlex.quote(job.runtime_directory)}",
        'mkdir -p "$JUPYTER_RUNTIME_DIR"',
        "JUPYTER_TOKEN=\"$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \\n')\"",
        "export JUPYTER_TOKEN",
        # The node's own name if it resolves, else its first address: reachable from the login node, never 0.0.0.0.
        '__slf_ip=$(hostname); getent hosts "$__slf_ip" >/dev/null 2>&1 || '
        "__slf_ip=$(hostname -I 2>/dev/null | cut -d' ' -f1)",
        f'{shlex.join(lab)} --ServerApp.ip="${{__slf_ip:-127.0.0.1}}"',
    ]


def _shell_script_body_start(lines: Sequence[str]) -> int | None:
    """Where the commands of a sh or bash script start (sbatch stops reading directives at the first command), or
    ``None`` for a script in another language."""
    if not lines or not re.match(r"^#!\s*\S*/(env\s+)?(ba)?sh\b", lines[0]):
        return None
    position = 1
    while position < len(lines) and (lines[position].startswith("#") or not lines[position].strip()):
        position += 1
    return position


def _insert_after_directives(script: str, new_lines: Sequence[str]) -> str | None:
    """``script`` with ``new_lines`` after its ``#SBATCH`` block, or None when it is not a sh or bash script."""
    lines = script.split("\n")
    position = _shell_script_body_start(lines)
    if position is None:
        return None
    lines[position:position] = new_lines
    return "\n".join(lines) + ("" if script.endswith("\n") else "\n")


def inject_setup(script: str, setup: Sequence[str]) -> str:
    """A user's own sh or bash script with set-up lines (see `render_setup`) after its ``#SBATCH`` block."""
    if not setup:
        return script
    result = _insert_after_directives(script, render_setup([_check_text("a set-up line", line) for line in setup]))
    if result is None:
        raise UsageError("--setup needs a sh or bash script (#!/bin/sh or #!/bin/bash); put set-up lines in the script")
    return result


def parse_jupyter_runtime(text: str) -> tuple[str, int, str]:
    """Host, port and token from a Jupyter server's runtime file; a `JupyterError` for anything else (the file
    comes from the node, and a cut or foreign one must not become a traceback or a forward to a strange place).

    >>> parse_jupyter_runtime('{"hostname": "node1", "port": 8888, "token": "ab12"}')
    ('node1', 8888, 'ab12')
    """
    import json

    try:
        details = json.loads(text)
    except ValueError:
        details = None
    if isinstance(details, dict):
        host, port, token = details.get("hostname"), details.get("port"), details.get("token")
        if (
            isinstance(host, str)
            and re.fullmatch(r"[A-Za-z0-9_.:-]+", host)
            and isinstance(port, int)
            and not isinstance(port, bool)
            and 0 < port < 65536
            and isinstance(token, str)
            and re.fullmatch(r"[A-Za-z0-9]+", token)
        ):
            return host, port, token
    raise JupyterError("Jupyter's runtime file on the node is not one Jupyter wrote (no hostname, port and token)")


def inject_exit_record(script: str, nonce: str = "") -> str:
    """Add the exit record to a user's own shell script, after its ``#SBATCH`` block (sbatch stops reading
    directives at the first command). Scripts that are not sh or bash are returned unchanged.

    >>> inject_exit_record("#!/usr/bin/env python3\\nprint(1)\\n")
    '#!/usr/bin/env python3\\nprint(1)\\n'
    """
    return _insert_after_directives(script, render_exit_record(nonce)) or script


def parse_sbatch_id(stdout: str) -> str:
    """The job id from ``sbatch --parsable`` output (``ID`` or ``ID;cluster``), strictly.

    >>> parse_sbatch_id("1234\\n")
    '1234'
    >>> parse_sbatch_id("77;cluster\\n")
    '77'
    """
    match = re.fullmatch(r"\s*([0-9]+)(;[\w.-]+)?\s*", stdout)
    if not match:
        raise ValueError(f"sbatch printed {stdout!r}, not a job id")
    return match.group(1)


class JobStatus(enum.Enum):
    """Every state SLURM reports for a job, plus UNKNOWN for a job no scheduler command knows."""

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    COMPLETING = "COMPLETING"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    REQUEUED = "REQUEUED"
    REQUEUE_FED = "REQUEUE_FED"
    REQUEUE_HOLD = "REQUEUE_HOLD"
    RESIZING = "RESIZING"
    RESV_DEL_HOLD = "RESV_DEL_HOLD"
    REVOKED = "REVOKED"
    SIGNALING = "SIGNALING"
    SPECIAL_EXIT = "SPECIAL_EXIT"
    STAGE_OUT = "STAGE_OUT"
    STOPPED = "STOPPED"
    POWER_UP_NODE = "POWER_UP_NODE"
    UPDATE_DB = "UPDATE_DB"
    LAUNCH_FAILED = "LAUNCH_FAILED"
    UNKNOWN = "UNKNOWN"

    @classmethod
    def parse(cls, text: str) -> JobStatus:
        """A state as squeue or sacct prints it: ``CANCELLED by 1000`` is CANCELLED, ``OUT_OF_ME+`` is not known.

        >>> JobStatus.parse("CANCELLED by 1000")
        <JobStatus.CANCELLED: 'CANCELLED'>
        """
        word = text.strip().split(" ")[0].upper() if text.strip() else ""
        try:
            return cls(word)
        except ValueError:
            return cls.UNKNOWN

    @property
    def is_finished(self) -> bool:
        """The job will not run again by itself."""
        return self in _FINISHED_STATES

    @property
    def is_success(self) -> bool:
        return self is JobStatus.COMPLETED

    def __str__(self) -> str:
        return self.value


_FINISHED_STATES = frozenset(
    {
        JobStatus.COMPLETED,
        JobStatus.CANCELLED,
        JobStatus.FAILED,
        JobStatus.TIMEOUT,
        JobStatus.NODE_FAIL,
        JobStatus.PREEMPTED,
        JobStatus.BOOT_FAIL,
        JobStatus.DEADLINE,
        JobStatus.OUT_OF_MEMORY,
        JobStatus.REVOKED,
        JobStatus.SPECIAL_EXIT,
        JobStatus.LAUNCH_FAILED,
    }
)
# Every state of a job that has not ended, as PENDING (not running yet, or again) or RUNNING (started, not ended):
# the original API's loop `while status in (PENDING, RUNNING)` must end only when the job has (COMPLETING, for
# one, lasts as long as the cluster's epilog).
_COARSE_STATES = {
    **dict.fromkeys(
        [
            JobStatus.CONFIGURING,
            JobStatus.POWER_UP_NODE,
            JobStatus.REQUEUED,
            JobStatus.REQUEUE_FED,
            JobStatus.REQUEUE_HOLD,
            JobStatus.RESV_DEL_HOLD,
        ],
        JobStatus.PENDING,
    ),
    **dict.fromkeys(
        [
            JobStatus.COMPLETING,
            JobStatus.STAGE_OUT,
            JobStatus.SIGNALING,
            JobStatus.RESIZING,
            JobStatus.SUSPENDED,
            JobStatus.STOPPED,
            JobStatus.UPDATE_DB,
        ],
        JobStatus.RUNNING,
    ),
}


def coarse_status(status: JobStatus) -> JobStatus:
    """The state as `Server.get_job_status` reports it: a job that has not ended is PENDING or RUNNING; an ended
    one (and UNKNOWN) as it is.

    >>> coarse_status(JobStatus.COMPLETING), coarse_status(JobStatus.TIMEOUT)
    (<JobStatus.RUNNING: 'RUNNING'>, <JobStatus.TIMEOUT: 'TIMEOUT'>)
    """
    return _COARSE_STATES.get(status, status)


# When the tasks of an array end differently, the array reads as the first of these that any task has.
_SEVERITY = [
    JobStatus.FAILED,
    JobStatus.OUT_OF_MEMORY,
    JobStatus.TIMEOUT,
    JobStatus.NODE_FAIL,
    JobStatus.BOOT_FAIL,
    JobStatus.LAUNCH_FAILED,
    JobStatus.DEADLINE,
    JobStatus.PREEMPTED,
    JobStatus.CANCELLED,
    JobStatus.REVOKED,
    JobStatus.SPECIAL_EXIT,
    JobStatus.COMPLETED,
]


def _outcome_json(job: Any) -> dict[str, Any]:
    """The fields every --json job entry starts with: its id, state, whether it ended, and how."""
    return {
        "job_id": job.job_id,
        "state": job.status.value,
        "finished": getattr(job, "ended", job.status.is_finished),
        "exit_code": job.exit_code,
        "signal": job.signal,
    }


class JobInfo(
    collections.namedtuple(
        "JobInfo",
        "job_id status exit_code signal reason name node source time_left",
        defaults=(None, None, "", "", "", "", ""),
    )
):
    """What the scheduler (or the job's own exit record) says about one job; ``source`` tells which of squeue,
    sacct, record (the job's exit record) or none gave the answer; ``time_left`` is squeue's, while it runs."""

    __slots__ = ()

    @property
    def ended(self) -> bool:
        """The job will not run again by itself: a final state, or an exit record that says a signal ended it
        (state UNKNOWN: a cancellation, a time limit and a preemption all send the same signal)."""
        return self.status.is_finished or (self.source == "record" and self.signal is not None)

    @property
    def code_pending(self) -> bool:
        """sacct says the job FAILED but not yet with which exit code (see `sacct_outcome`): the end is for good,
        the answer not yet whole."""
        return self.source == "sacct" and self.status is JobStatus.FAILED and self.exit_code is None

    def to_json(self) -> dict[str, Any]:
        return {
            **_outcome_json(self),
            **{field: getattr(self, field) for field in ("reason", "name", "node", "time_left")},
        }


# Reasons for which a pending job never starts unless it or the cluster's configuration is changed, with what to
# change. Reasons that clear by themselves (Resources, Priority, ReqNodeNotAvail for a node that is down, limits
# on how many jobs run at once such as AssocMaxJobsLimit or QOSMaxJobsPerUserLimit) are waited out.
NEVER_START_REASONS = {
    "PartitionConfig": "it asks for more CPUs, memory or nodes than its partition's nodes have: ask for less",
    "PartitionTimeLimit": "its --time is over the partition's MaxTime: ask for less time or another partition",
    "PartitionNodeLimit": "it asks for more nodes than the partition allows: ask for fewer",
    "BadConstraints": "no node matches its constraints (--constraint, --gres, --mem): change them",
    "DependencyNeverSatisfied": "a job it depends on ended in a way its dependency rules out",
    "InvalidAccount": "its account does not exist or is not yours: pass another --account",
    "InvalidQOS": "its QOS does not exist or is not allowed to you: pass another --qos",
    "AssocMaxWallDurationPerJobLimit": "its --time is over your association's limit per job: ask for less",
    "QOSMaxWallDurationPerJobLimit": "its --time is over its QOS's limit per job: ask for less or another --qos",
    "AssocMaxCpuPerJobLimit": "it asks for more CPUs than your association allows per job: ask for fewer",
    "QOSMaxCpuPerJobLimit": "it asks for more CPUs than its QOS allows per job: ask for fewer",
    "AssocMaxNodePerJobLimit": "it asks for more nodes than your association allows per job: ask for fewer",
    "QOSMaxNodePerJobLimit": "it asks for more nodes than its QOS allows per job: ask for fewer",
    "QOSMaxMemoryPerJob": "it asks for more memory than its QOS allows per job: ask for less",
}


def never_starts(info: JobInfo) -> bool:
    """The job is pending for a reason in NEVER_START_REASONS.

    >>> never_starts(JobInfo("1", JobStatus.PENDING, reason="PartitionConfig"))
    True
    """
    return info.status is JobStatus.PENDING and info.reason.split(",")[0].strip() in NEVER_START_REASONS


def parse_exit_code(text: str) -> tuple[int | None, int | None]:
    """sacct's ``ExitCode`` (``3:0``) as (exit code, signal).

    >>> parse_exit_code("3:0")
    (3, 0)
    >>> parse_exit_code("")
    (None, None)
    """
    match = re.fullmatch(r"\s*([0-9]+):([0-9]+)\s*", text)
    return (int(match.group(1)), int(match.group(2))) if match else (None, None)


def sacct_outcome(state: str, exit_text: str) -> tuple[JobStatus, int | None, int | None]:
    """sacct's ``State`` and ``ExitCode`` as (status, exit code, signal). SLURM ends a job FAILED only for a
    non-zero exit (a launch failure reads ``1:0``); ``FAILED`` with ``0:0`` is the moment when the accounting
    database made the job's row at its end (it had not heard of the job yet) and the exit code has not reached the
    row: the code is not known yet, and the job's exit record, when it has one, tells it.

    >>> sacct_outcome("FAILED", "0:0"), sacct_outcome("FAILED", "3:0")
    ((<JobStatus.FAILED: 'FAILED'>, None, None), (<JobStatus.FAILED: 'FAILED'>, 3, 0))
    """
    status = JobStatus.parse(state)
    code, signal = parse_exit_code(exit_text)
    if status is JobStatus.FAILED and code == 0 and signal == 0:
        return status, None, None
    return status, code, signal


SQUEUE_FORMAT = "%i|%T|%r|%j|%N|%L"
SACCT_FIELDS = "JobID,State,ExitCode,Reason,JobName,NodeList"


def _split_rows(stdout: str, fields: int) -> Iterable[list[str]]:
    for line in stdout.splitlines():
        if not line.strip():
            continue
        # Names may contain the separator; they sit before the last field, so split from both ends.
        head = line.split("|", 3)
        if len(head) < 4:
            continue
        rest = head[3].rsplit("|", fields - 4)
        yield head[:3] + rest


def parse_squeue(stdout: str) -> dict[str, JobInfo]:
    """Rows of ``squeue -h -o '%i|%T|%r|%j|%N|%L'``, keyed by job id (``123``, an array task ``123_4``, a
    heterogeneous job's component ``200+1``); the one row of an array's pending tasks (``123_[5-9%2]``) becomes a
    row per task.

    >>> sorted(parse_squeue("7_[2-3]|PENDING|JobHeldUser|a||UNLIMITED"))
    ['7_2', '7_3']
    """
    result = {}
    for job_id, state, reason, name, node, left in _split_rows(stdout, 6):
        reason = "" if reason == "None" else reason
        left = "" if left in ("INVALID", "NOT_SET", "UNLIMITED") else left
        info = JobInfo(
            job_id, JobStatus.parse(state), reason=reason, name=name, node=node, source="squeue", time_left=left
        )
        pending_tasks = re.fullmatch(r"([0-9]+)_\[([0-9,:%-]+)\]", job_id)
        if pending_tasks:
            base, spec = pending_tasks.groups()
            for task in expand_array_spec(spec):
                result[f"{base}_{task}"] = info._replace(job_id=f"{base}_{task}")
        else:
            result[job_id] = info
    return result


def parse_sacct(stdout: str) -> dict[str, JobInfo]:
    """Rows of ``sacct -X -n -P -o JobID,State,ExitCode,Reason,JobName,NodeList``, keyed by job id."""
    result = {}
    for job_id, state, exit_text, rest in (row[:3] + ["|".join(row[3:])] for row in _split_rows(stdout, 6)):
        reason, _, tail = rest.partition("|")
        name, _, node = tail.rpartition("|")
        status, code, signal = sacct_outcome(state, exit_text)
        reason = "" if reason == "None" else reason
        result[job_id] = JobInfo(job_id, status, code, signal, reason, name, node, "sacct")
    return result


class ExitRecord(collections.namedtuple("ExitRecord", "exit_code signal job_id nonce")):
    """What a job's exit record says (see `render_exit_record`): its exit code, or the ``signal`` that ended it
    (``exit_code`` None), and the job id and submission nonce it was written for."""

    __slots__ = ()

    def info(self, job_id: str) -> JobInfo:
        """The job's state as the record alone tells it, for when no scheduler command knows the job any more."""
        if self.signal is not None:
            reason = f"ended by signal {self.signal} (cancelled, out of time or preempted: only the scheduler knew)"
            return JobInfo(job_id, JobStatus.UNKNOWN, None, self.signal, reason, source="record")
        status = JobStatus.COMPLETED if self.exit_code == 0 else JobStatus.FAILED
        return JobInfo(job_id, status, self.exit_code, 0, source="record")


def parse_exit_records(stdout: str, nonces: Mapping[str, str] | None = None) -> dict[str, ExitRecord]:
    """Lines ``ID exit RC ID NONCE`` (or ``ID signal N ID NONCE``) printed by the status query and the watcher for
    jobs whose exit record exists. With ``nonces`` (id -> the nonce of its submission from here), a record not
    written by that very submission is left out: it belongs to an older job that ran in the same directory.

    >>> parse_exit_records("4 signal 15 4 ab\\n5 exit 3 5 cd\\n", {"4": "ab", "5": "old"})
    {'4': ExitRecord(exit_code=None, signal=15, job_id='4', nonce='ab')}
    """
    records = {}
    for line in stdout.splitlines():
        match = re.fullmatch(r"(\S+) (exit|signal) ([0-9]+) (\S+) (\S+)", line.strip())
        if not match:
            continue  # a record cut short, or one from a version that could not tell a kill from a success
        job_id, kind, number, written_for, nonce = match.groups()
        if written_for != job_id or (nonces is not None and nonces.get(job_id) != nonce):
            continue
        code, signal = (int(number), None) if kind == "exit" else (None, int(number))
        records[job_id] = ExitRecord(code, signal, written_for, nonce)
    return records


def _task_ids(job_id: str, *sources: Mapping[str, JobInfo]) -> list[str]:
    """The rows that belong to a requested id: itself, the tasks ``ID_N`` of an array, or the components
    ``ID+N`` of a heterogeneous job."""
    if any(job_id in rows for rows in sources):
        return [job_id]
    prefixes = (job_id + "_", job_id + "+")
    return sorted({key for rows in sources for key in rows if key.startswith(prefixes)})


_ENDING_STATES = frozenset({JobStatus.COMPLETING, JobStatus.STAGE_OUT})  # the job's processes have ended
# Ends after which SLURM itself may put the job back in the queue (preemption or a node failure with requeue).
_REQUEUED_AFTER = frozenset({JobStatus.PREEMPTED, JobStatus.NODE_FAIL, JobStatus.BOOT_FAIL})


def _pick(queue_info: JobInfo | None, account_info: JobInfo | None) -> JobInfo | None:
    """squeue's live state wins: a job it shows waiting or running will run (again), whatever sacct says of an
    earlier run (a requeued job). An end comes from sacct when it has one (with the exit code), also while squeue
    still shows the job COMPLETING (its processes are gone; the epilog runs), else from squeue; but not an end
    after which SLURM may requeue the job: while it is COMPLETING, only squeue can tell whether it will run again.

    >>> ending = JobInfo("5", JobStatus.COMPLETING, source="squeue")
    >>> _pick(ending, JobInfo("5", JobStatus.PREEMPTED, 0, 0, source="sacct")).status
    <JobStatus.COMPLETING: 'COMPLETING'>
    """
    if queue_info and not queue_info.status.is_finished and queue_info.status not in _ENDING_STATES:
        return queue_info
    if account_info and account_info.status.is_finished:
        if queue_info and queue_info.status in _ENDING_STATES and account_info.status in _REQUEUED_AFTER:
            return queue_info
        return account_info
    return queue_info or account_info


def _combine_tasks(job_id: str, tasks: list[JobInfo]) -> JobInfo:
    if len(tasks) == 1:
        return tasks[0]._replace(job_id=job_id)
    live = [task for task in tasks if not task.status.is_finished]
    if live:
        running = [task for task in live if task.status is JobStatus.RUNNING]
        chosen = running[0] if running else live[0]
    else:
        chosen = min(tasks, key=lambda task: _SEVERITY.index(task.status) if task.status in _SEVERITY else 99)
    codes = [task.exit_code for task in tasks if task.exit_code is not None]
    code_unknown = any(task.status is JobStatus.FAILED and task.exit_code is None for task in tasks)
    return chosen._replace(job_id=job_id, exit_code=max(codes) if codes and not code_unknown else None)


def merge_job_info(
    job_ids: Sequence[str],
    squeue_rows: Mapping[str, JobInfo],
    sacct_rows: Mapping[str, JobInfo] | None,
    exit_records: Mapping[str, ExitRecord],
    recent_ids: frozenset[str] = frozenset(),
    tasks: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, JobInfo]:
    """Decide each job's state from what squeue, sacct (None when accounting is unavailable) and the exit records
    (only those written by the job itself: see `parse_exit_records`) say. An array or a heterogeneous job reads as
    the combination of its parts; the exit record supplies a missing exit code, or the whole answer when neither
    command knows the job any more: for an array (``tasks``: its task ids) once every task wrote one. A job nobody
    knows is UNKNOWN, never COMPLETED (PENDING when just submitted: the scheduler may not show it yet)."""
    sacct_rows = sacct_rows or {}
    tasks = tasks or {}
    result = {}
    for job_id in job_ids:
        rows = [
            _with_recorded_code(info, exit_records.get(task_id))
            for task_id in _task_ids(job_id, squeue_rows, sacct_rows)
            if (info := _pick(squeue_rows.get(task_id), sacct_rows.get(task_id))) is not None
        ]
        record = exit_records.get(job_id)
        task_records = [exit_records.get(task_id) for task_id in tasks.get(job_id, ())]
        if rows:
            info = _combine_tasks(job_id, rows)
        elif record is not None:
            info = record.info(job_id)
        elif task_records and all(task_records):
            info = _combine_tasks(job_id, [r.info(job_id) for r in task_records if r])._replace(source="record")
        else:
            info = JobInfo(job_id, JobStatus.PENDING if job_id in recent_ids else JobStatus.UNKNOWN, source="none")
        result[job_id] = _with_recorded_code(info, record)
    return result


def _with_recorded_code(info: JobInfo, record: ExitRecord | None) -> JobInfo:
    """An ended job's missing exit code, from its own exit record."""
    if info.exit_code is None and record is not None and record.exit_code is not None and info.status.is_finished:
        return info._replace(exit_code=record.exit_code)
    return info


def end_settled(job_id: str, info: JobInfo, squeue_rows: Mapping[str, JobInfo]) -> bool:
    """The job's end is for good: it ended and squeue lists neither it nor any of its tasks or components. While
    the controller still holds a finished job it can send it back to the queue (``scontrol requeue``, a node
    failure or a preemption with requeue), so its end is asked about again until the controller forgets it.

    >>> done = JobInfo("7", JobStatus.COMPLETED, 0, 0, source="sacct")
    >>> end_settled("7", done, {}), end_settled("7", done, {"7": done._replace(source="squeue")})
    (True, False)
    """
    return info.ended and not info.code_pending and not _task_ids(job_id, squeue_rows)


def normalize_job_id(job_id: object) -> str:
    """A job id as SLURM prints it: ``123``, an array task ``123_4`` or a heterogeneous job's component ``123+1``;
    leading zeros are dropped, as SLURM reads the number.

    >>> normalize_job_id(42), normalize_job_id(" 0012 "), normalize_job_id("200+01")
    ('42', '12', '200+1')
    """
    text = str(job_id).strip()
    match = re.fullmatch(r"([0-9]+)(?:([_+])([0-9]+))?", text)
    if not match:
        raise UsageError(
            f"{job_id!r} is not a SLURM job id (expected a number such as 1234, an array task 1234_5 or a "
            "heterogeneous job's component 1234+1)"
        )
    base, separator, part = match.groups()
    return f"{int(base)}{separator}{int(part)}" if separator else str(int(base))


def expand_log_pattern(path: str, job_id: str, job_name: str = "", user: str = "") -> str:
    """Resolve SLURM's filename patterns (``%j``, ``%x``, ``%u``, ``%A``, ``%a``, ``%%``) in a log path.

    >>> expand_log_pattern("/logs/%x-%j.out", "12", "fit")
    '/logs/fit-12.out'
    """
    base, _, task = job_id.partition("_")
    values = {"j": job_id if not task else base, "x": job_name, "u": user, "A": base, "a": task, "%": "%"}
    return re.sub(r"%(\d*)([jxuAa%])", lambda m: values[m.group(2)].zfill(int(m.group(1) or 0)), path)


def expand_array_spec(spec: str) -> list[int]:
    """The task ids of a SLURM array spec.

    >>> expand_array_spec("1-3,8")
    [1, 2, 3, 8]
    >>> expand_array_spec("0-15:4%2")
    [0, 4, 8, 12]
    """
    tasks = []
    for part in spec.split("%")[0].split(","):
        bounds, _, step = part.partition(":")
        first, _, last = bounds.partition("-")
        tasks += range(int(first), int(last or first) + 1, int(step or 1))
    return tasks


def unique_leaf(name: str) -> str:
    """A file or directory name made from a job name: safe characters, then the time and a random suffix."""
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:40] or "job"
    return f"{safe_name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"


def exit_record_path(working_directory: str, job_id: str) -> str:
    return str(PurePosixPath(working_directory, REMOTE_RECORD_DIR, f"{job_id}.exit"))


def shell_here_document(text: str) -> tuple[str, str]:
    """(the start ``<<'DELIMITER'``, the body with its closing line) of a here-document holding ``text`` verbatim,
    its delimiter chosen so that no line of the text ends it early: data reaches a remote command inside the script
    itself, never in an argv with its length limit.

    >>> shell_here_document("a\\nSLF_END\\n")
    ("<<'SLF_END_1'", 'a\\nSLF_END\\nSLF_END_1\\n')
    """
    lines = set(text.splitlines())
    delimiter, counter = "SLF_END", 0
    while delimiter in lines:
        counter += 1
        delimiter = f"SLF_END_{counter}"
    body = text if text.endswith("\n") or not text else text + "\n"
    return f"<<'{delimiter}'", f"{body}{delimiter}\n"


def status_query_command(job_ids: Sequence[str], record_paths: Mapping[str, str]) -> str:
    """One remote shell script that asks squeue and sacct about every job and prints any exit records.

    Sections are separated by lines ``@@ RC`` carrying the exit code of the command before them.
    """
    ids = ",".join(sorted({re.split(r"[_+]", job_id)[0] for job_id in job_ids}))
    # A controller too busy to answer, or an accounting database that never does, must not hang a wait: each
    # scheduler command gets SCHEDULER_CALL_TIMEOUT seconds (exit 124 after it).
    limit = f"timeout {SCHEDULER_CALL_TIMEOUT:g}"
    squeue = f'{limit} squeue -h --states=all -j {ids} -o {shlex.quote(SQUEUE_FORMAT)} </dev/null 2>&1; echo "@@ $?"'
    sacct = f'{limit} sacct -X -n -P -j {ids} -o {SACCT_FIELDS} 2>&1; echo "@@ $?"'
    # sacct runs while squeue does, its answer waiting in the pipe until squeue's is printed: the query takes as
    # long as the slower of the two, not both.
    return f"{{ {sacct}; }} | {{ {squeue}; cat; }}\n{exit_records_command(record_paths)}"


def exit_records_command(record_paths: Mapping[str, str]) -> str:
    """A remote script that prints ``ID RC`` for each exit record that exists (no scheduler query)."""
    lines = []
    for job_id, path in record_paths.items():
        quoted = shlex.quote(path)
        lines.append(f"if [ -f {quoted} ]; then printf '%s %s\\n' {job_id} \"$(cat {quoted})\"; fi")
    return "\n".join(lines) or "true"


def parse_status_query(stdout: str) -> tuple[str, int, str, int, str]:
    """Split the output of `status_query_command` into (squeue output, rc, sacct output, rc, exit records)."""
    sections = re.split(r"^@@ (\d+)\n", stdout, flags=re.MULTILINE)
    if len(sections) < 5:
        raise ValueError(f"unexpected status output: {stdout[:200]!r}")
    return sections[0], int(sections[1]), sections[2], int(sections[3]), sections[4]


def watcher_command(record_paths: Mapping[str, str], nonces: Mapping[str, str] | None = None) -> str:
    """A remote POSIX sh loop that prints ``ID RECORD`` as each exit record appears: cheap tests of files on the
    server, no scheduler query. With ``nonces``, only a record written by that submission counts (an older job's
    record in the same directory is passed over until the new one replaces it). A ``.`` heartbeat lets it die of
    SIGPIPE soon after its client goes away."""
    nonces = nonces or {}
    start, body = shell_here_document(
        "".join(f"{job_id} {nonces.get(job_id) or '*'} {path}\n" for job_id, path in record_paths.items())
    )
    return (
        "seen=' '; beat=0\n"
        "while :; do\n"
        "  left=0\n"
        "  while read -r id nonce path; do\n"
        '    case $seen in *" $id "*) continue ;; esac\n'
        '    if [ -f "$path" ] && record=$(cat "$path") && case $record in *" "$nonce) true ;; *) false ;; esac; then\n'
        '      printf \'%s %s\\n\' "$id" "$record"; seen="$seen$id "\n'
        "    else left=1; fi\n"
        f"  done {start}\n{body}"
        '  [ "$left" = 0 ] && break\n'
        f"  sleep 0.5; beat=$((beat + 1)); if [ $beat -ge {WATCHER_HEARTBEAT * 2} ]; then echo .; beat=0; fi\n"
        "done"
    )


class WaitSchedule:
    """When `Server.wait` asks the scheduler, as a pure function of time and events: at once; then every ``first``
    seconds, counted from when the answer was had (by this wait, or by another wait of the same server whose answer
    it shares), while a job may end with no exit record to tell (``unwatched``: pending, or submitted elsewhere);
    otherwise backing off (x1.5) from ``first`` to ``most``; and right after an exit record says a job ended, then
    0.5, 1, 2 and 4 s later while the scheduler catches up (it lags the record by seconds). ``fresh_after`` is the
    moment an answer must be newer than: the wait's start, then after an event an older answer cannot reflect (a
    record, a cancel).

    >>> schedule = WaitSchedule(now=0, first=10, most=60)
    >>> schedule.due(0), [schedule.asked(t) for t in (0, 10, 25)]
    (True, [10, 25.0, 47.5])
    >>> schedule.asked(50, unwatched=True, answered_at=47)
    57
    >>> schedule.record_arrived(60); schedule.due(60), [schedule.asked(t) for t in (60, 60.5, 61.5)]
    (True, [60.5, 61.5, 63.5])
    """

    def __init__(self, now: float, first: float = SCHEDULER_POLL_FIRST, most: float = SCHEDULER_POLL_MAX) -> None:
        self.next_query = now
        self.first = first
        self.interval = first
        self.most = most
        self.confirm_delay = 0.0
        # The first answer must be newer than the wait: an end another wait saw moments ago may have been undone
        # since (a requeue), and a wait that ends on it would end on a job that runs again.
        self.fresh_after: float | None = now

    def due(self, now: float) -> bool:
        return now >= self.next_query

    def asked(
        self, now: float, confirming: bool = False, unwatched: bool = False, answered_at: float | None = None
    ) -> float:
        """An answer came (had at ``answered_at``, default ``now``): returns (and keeps) when to ask next; while
        ``confirming`` (a record says a job ended and the scheduler does not say so yet), every 4 s at most."""
        if confirming and not self.confirm_delay:
            self.confirm_delay = 4.0
        if self.confirm_delay:
            self.next_query = now + self.confirm_delay
            self.fresh_after = self.next_query
            self.confirm_delay = self.confirm_delay * 2 if self.confirm_delay < 4 else 0.0
            return self.next_query
        self.fresh_after = None
        if unwatched:
            self.next_query = (now if answered_at is None else answered_at) + self.first
        else:
            self.next_query = now + self.interval
            self.interval = min(self.interval * 1.5, self.most)
        return self.next_query

    def ask_now(self, now: float) -> None:
        """Something happened that the last answer cannot show (a cancel from here, a reconnect): ask for a new one."""
        self.next_query = self.fresh_after = now

    def record_arrived(self, now: float) -> None:
        """An exit record shows that a job ended: ask now, then confirm soon."""
        self.ask_now(now)
        self.confirm_delay = 0.5


class WaitProgress:
    """What `Server.wait` knows of its jobs, with no I/O: the last state of each, the exit records seen (an array
    has ended, as far as records tell, once each of its ``tasks`` wrote one), the schedule, and the deadline.
    ``watched`` are the jobs whose exit records a watcher looks for."""

    def __init__(
        self,
        job_ids: Sequence[str],
        tasks: Mapping[str, frozenset[str]],
        schedule: WaitSchedule,
        timeout: float | None,
        watched: frozenset[str] = frozenset(),
    ) -> None:
        self.job_ids = list(job_ids)
        self.tasks = tasks
        self.watched = watched
        self.schedule = schedule
        self.timeout = timeout
        self.deadline = None if timeout is None else schedule.next_query + timeout
        self.last: dict[str, JobInfo] = {}
        self.recorded: set[str] = set()
        self.code_missing_since: dict[str, float] = {}  # FAILED jobs whose exit code sacct lacks (`sacct_outcome`)
        self.code_awaited: set[str] = set()  # those of them still given EXIT_CODE_GRACE to get it
        self.silent_since: float | None = None  # when the scheduler stopped answering, while it does not
        self.busy_pause = 0.0

    def unfinished(self) -> list[str]:
        return [
            job_id
            for job_id in self.job_ids
            if job_id not in self.last or not self.last[job_id].ended or job_id in self.code_awaited
        ]

    def done(self) -> bool:
        return not self.unfinished()

    def result(self) -> dict[str, JobInfo]:
        return {job_id: self.last[job_id] for job_id in self.job_ids}

    def update(self, infos: Mapping[str, JobInfo], now: float, answered_at: float | None = None) -> list[JobInfo]:
        """Take a scheduler answer (had at ``answered_at``, default ``now``); returns the jobs whose state changed."""
        changed = [
            info
            for info in infos.values()
            if info.job_id not in self.last
            or (self.last[info.job_id].status, self.last[info.job_id].exit_code) != (info.status, info.exit_code)
        ]
        self.last.update(infos)
        for info in infos.values():
            if info.code_pending:
                since = self.code_missing_since.setdefault(info.job_id, now)
                if now - since < EXIT_CODE_GRACE:
                    self.code_awaited.add(info.job_id)
                    continue
            self.code_awaited.discard(info.job_id)
        # A job whose records say it ended while squeue still shows it ending (the epilog runs, sacct lags), or one
        # that failed with its exit code still on its way to sacct.
        confirming = bool(self.code_awaited) or any(
            job_id in self.tasks and self.tasks[job_id] <= self.recorded and self.last[job_id].status in _ENDING_STATES
            for job_id in self.unfinished()
        )
        # Only the scheduler can tell of the end of a job that is not running or whose record nobody watches.
        unwatched = any(
            job_id not in self.watched or self.last[job_id].status is not JobStatus.RUNNING
            for job_id in self.unfinished()
        )
        self.schedule.asked(now, confirming, unwatched, answered_at)
        self.silent_since = None
        return changed

    def scheduler_silent(self, problem: SchedulerBusy, now: float, grace: float = SCHEDULER_GRACE) -> None:
        """The scheduler did not answer: ask again after a pause that doubles (2 s to 30 s), and give up with
        `SchedulerUnreachable` once it has been silent for ``grace`` seconds."""
        if self.silent_since is None:
            self.silent_since, self.busy_pause = now, 2.0
        if now - self.silent_since >= grace:
            raise SchedulerUnreachable(
                f"the scheduler did not answer for {now - self.silent_since:.0f} s ({problem.summary}); the jobs "
                "may still be running: wait for them again later"
            )
        self.schedule.next_query = now + self.busy_pause
        self.busy_pause = min(self.busy_pause * 2, 30.0)

    def never_starting(self) -> list[JobInfo]:
        """The jobs waited for that are pending for a reason that never clears by itself."""
        return [
            self.last[job_id] for job_id in self.unfinished() if job_id in self.last and never_starts(self.last[job_id])
        ]

    def check_known(self, server: str) -> None:
        """Raise `UnknownJobError` for jobs neither squeue, sacct nor a record knows: waiting would never end."""
        unknown = [job_id for job_id in self.unfinished() if self.last[job_id].status is JobStatus.UNKNOWN]
        if unknown:
            jobs = f"jobs {', '.join(unknown)} are" if len(unknown) > 1 else f"job {unknown[0]} is"
            raise UnknownJobError(
                f"{jobs} unknown to squeue and sacct on {server!r}: check the id; a job that ended long ago may be "
                "forgotten by the scheduler"
            )

    def check_deadline(self, now: float) -> None:
        """Raise `WaitTimeout` once the deadline has passed with a job still running; a job that ended and only
        lacks its exit code (`code_awaited`) is taken as it is then."""
        if self.deadline is not None and now >= self.deadline:
            self.code_awaited.clear()
        if self.deadline is not None and now >= self.deadline and not self.done():
            states = ", ".join(
                f"{job_id} {self.last[job_id].status}" for job_id in self.unfinished() if job_id in self.last
            )
            raise WaitTimeout(f"{len(self.unfinished())} job(s) still running after {self.timeout:g} s: {states}")

    def pause(self, now: float) -> float:
        """How long to wait for a record before the next scheduler query (or the deadline)."""
        until = self.schedule.next_query if self.deadline is None else min(self.schedule.next_query, self.deadline)
        return max(until - now, 0.0)

    def records_arrived(self, records: Mapping[str, ExitRecord], now: float) -> None:
        self.recorded |= set(records)
        if any(job_id in self.tasks and self.tasks[job_id] <= self.recorded for job_id in self.unfinished()):
            self.schedule.record_arrived(now)


class JobRecord(
    collections.namedtuple(
        "JobRecord",
        "job_id server name working_directory output_log error_log submitted user array nonce",
        defaults=("", "", ""),
    )
):
    """What this machine remembers of a submitted job, so that later commands know it without the terminal;
    ``array`` is the job's array spec, if it is one; ``nonce`` the one its exit record carries (none: no record
    is trusted)."""

    __slots__ = ()

    @property
    def task_ids(self) -> list[str]:
        """The ids whose exit records tell that this job ended: its own, or each of its array tasks'."""
        if not self.array:
            return [self.job_id]
        return [f"{self.job_id}_{task}" for task in expand_array_spec(self.array)]

    def log_path(self, error: bool = False) -> str:
        return expand_log_pattern(self.error_log if error else self.output_log, self.job_id, self.name, self.user)


class SubmissionPlan(collections.namedtuple("SubmissionPlan", "script script_path directories sbatch_argv record")):
    """Everything a submission will do, decided before anything is sent: the exact ``script`` sbatch receives, the
    ``script_path`` it is written to, the ``directories`` made first (the script's and the logs'), the exact
    ``sbatch_argv``, and the ``record`` this machine keeps (its job id and time filled in once sbatch answers).
    ``--dry-run`` prints it; a real submission sends `submit_command` of it."""

    __slots__ = ()


def default_job_directory(job_name: str, working_root: str | None, user: str | None, home: str) -> str:
    """Where a job made from the command line runs: a new directory under the user's working root (the working root
    itself without a user name), else under the remote home."""
    base = PurePosixPath(working_root, user or "") if working_root else PurePosixPath(home)
    return str(base / JOBS_ROOT_NAME / unique_leaf(job_name))


def plan_submission(
    script: str,
    *,
    name: str,
    working_directory: str,
    output_log: str,
    error_log: str,
    sbatch_args: Sequence[str] = (),
    array: str | None = None,
    server: str = "",
    user: str = "",
    nonce: str = "",
) -> SubmissionPlan:
    """The plan for a script: written under ``working_directory``'s record folder, its log directories made too
    (a directory with a ``%`` pattern has none to make), submitted with ``sbatch --parsable [ARGS] SCRIPT``;
    ``nonce`` is the one the script's exit record carries."""
    script_path = str(PurePosixPath(working_directory, REMOTE_RECORD_DIR, f"{unique_leaf(name)}.sh"))
    parents = [str(PurePosixPath(path).parent) for path in (output_log, error_log)]
    directories = sorted({str(PurePosixPath(script_path).parent), *(p for p in parents if "%" not in p)})
    record = JobRecord("", server, name, working_directory, output_log, error_log, 0.0, user, array or "", nonce)
    argv = ("sbatch", "--parsable", *sbatch_args, script_path)
    return SubmissionPlan(script, script_path, tuple(directories), argv, record)


def plan_job(job: Job, server: str = "", user: str = "") -> SubmissionPlan:
    """The plan for a `Job`: its own script, whose header holds every option."""
    return plan_submission(
        job.script,
        name=job.job_name,
        working_directory=job.working_directory,
        output_log=job.output_log,
        error_log=job.error_log,
        array=job.array,
        server=server,
        user=user,
        nonce=job.submission_nonce,
    )


def plan_script(
    script: str,
    *,
    default_name: str,
    default_directory: Callable[[str], str],
    home: Callable[[], str],
    job_name: str | None = None,
    working_directory: str | None = None,
    sbatch_args: Sequence[str] = (),
    defaults: Mapping[str, object] | None = None,
    server: str = "",
    user: str = "",
) -> SubmissionPlan:
    """The plan for a user's own script, as sbatch will read it: options given here override its ``#SBATCH``
    lines; a profile default (``defaults``: partition, account) applies only where neither sets the option; the
    job runs in ``working_directory``, else the script's own ``--chdir`` (a relative one under the remote ``home()``,
    asked only then), else
    ``default_directory(name)``. The exit record is added to sh and bash scripts (see `inject_exit_record`)."""
    own = read_sbatch_directives(script)
    given = dict(parse_sbatch_words(sbatch_args))
    if "clusters" in own or "clusters" in given:
        raise UsageError(
            "a script that picks a cluster (-M/--clusters) is not supported: status and cancel would ask another "
            "cluster; add a server profile for that cluster instead"
        )
    args = []
    name = job_name or given.get("job-name") or own.get("job-name")
    if not name or job_name:
        name = name or default_name
        args.append(f"--job-name={name}")
    own_directory = own.get("chdir")
    if working_directory is None and own_directory:
        relative = not own_directory.startswith("/")
        working_directory = str(PurePosixPath(home(), own_directory)) if relative else own_directory
    working_directory = _remote_path("the working directory", working_directory or default_directory(name))
    args.append(f"--chdir={working_directory}")
    for field, value in (defaults or {}).items():
        option = next(option for option in SBATCH_OPTIONS if option.field == field)
        if value is not None and option.name not in own and option.name not in given:
            args.append(f"--{option.name}={option.render(value)}")
    args += sbatch_args
    output = given.get("output") or own.get("output") or "slurm-%j.out"
    error = given.get("error") or own.get("error") or output
    nonce = os.urandom(6).hex()
    with_record = inject_exit_record(script, nonce)
    return plan_submission(
        with_record,
        name=name,
        working_directory=working_directory,
        output_log=str(PurePosixPath(working_directory, output)),
        error_log=str(PurePosixPath(working_directory, error)),
        sbatch_args=args,
        array=given.get("array") or own.get("array"),
        server=server,
        user=user,
        nonce=nonce if with_record != script else "",
    )


def submit_command(plan: SubmissionPlan) -> str:
    """Remote script: make the directories, write the job's script, check that each log can be written, sbatch the
    script; on refusal remove the script.

    sbatch's exit code is printed as a last ``@@ N`` line, because sbatch itself may exit 255, which would read as
    a failure of ssh. What it prints is kept in ``SCRIPT.submitted`` first, so that a connection lost while sbatch
    runs loses no job id (see `submission_lookup_command`). A directory that cannot be written (read-only, someone
    else's, a full disk or quota) ends the submission before sbatch, which would accept a job whose log cannot be
    written: exit 1, a last stderr line ``cannot write in DIR: REASON`` (the server's own words), and what this
    submission made (the script, new directories) removed again, so that a lookup finds no script and nothing ran.
    """
    quoted_script = shlex.quote(plan.script_path)
    outcome = shlex.quote(plan.script_path + ".submitted")
    script_directory = shlex.quote(str(PurePosixPath(plan.script_path).parent))
    log_paths = {plan.record.output_log, plan.record.error_log}
    logs = " ".join(shlex.quote(log) for log in sorted(log_paths) if "%" not in str(PurePosixPath(log).parent))
    ancestors = {str(path) for directory in plan.directories for path in PurePosixPath(directory).parents}
    deepest_first = sorted({*plan.directories, *ancestors} - {"/"}, key=lambda path: (-path.count("/"), path))
    start, body = shell_here_document(plan.script)
    undo = f'rm -f -- {quoted_script} 2>/dev/null; rmdir -- "$@" 2>/dev/null; exit 1'
    return (
        # The directories this submission makes, one by one from the top, kept in $@ (deepest first) to remove them
        # again: only those it made itself, never one another process made in between.
        "set --\n"
        f"for d in {' '.join(map(shlex.quote, reversed(deepest_first)))}; do\n"
        '    [ -d "$d" ] && continue\n'
        f'    if mkdir -- "$d"; then set -- "$d" "$@"; elif [ ! -d "$d" ]; then {undo}; fi\n'
        "done\n"
        # Outside the command substitution below, so that the script's text is parsed as a here-document only.
        f"write_script() {{\ncat > {quoted_script} {start}\n{body}}}\n"
        # cat, not a shell builtin, so that a full disk or quota is reported in the server's own words.
        "if ! reason=$(write_script 2>&1); then\n"
        f'    echo "cannot write in "{script_directory}": ${{reason##*: }}" >&2; {undo}\n'
        "fi\n"
        # A log that exists and takes writes (/dev/null, a log appended to) needs nothing of its directory.
        f"for log in {logs}; do\n"
        '    [ -f "$log" ] || [ -c "$log" ] && [ -w "$log" ] && continue\n'
        "    d=${log%/*}; d=${d:-/}\n"
        # A name nobody can guess, made only if it is not there (dd's excl: never through a planted link or
        # fifo), and removed only once made: in a directory others write to, nothing of theirs is touched.
        "    probe=\"$d/.sl-forgery-probe.$(od -An -N8 -tx1 /dev/urandom | tr -d ' \\n')\"\n"
        '    if ! reason=$( { printf x | dd of="$probe" conv=excl status=none; } 2>&1); then\n'
        f'        echo "cannot write in $d: ${{reason##*: }}" >&2\n'
        '        [ -f "$probe" ] && [ ! -L "$probe" ] && [ -O "$probe" ] && rm -f -- "$probe"\n'
        f"        {undo}\n"
        "    fi\n"
        '    rm -f -- "$probe"\n'
        "done\n"
        f"{shlex.join(plan.sbatch_argv)} > {outcome}.tmp; rc=$?\n"
        f'echo "@@ $rc" >> {outcome}.tmp && mv -f -- {outcome}.tmp {outcome}\n'
        f"cat -- {outcome}\n"
        f'if [ $rc != 0 ]; then rm -f -- {quoted_script} {outcome}; rmdir -- "$@" 2>/dev/null || :; fi'
    )


def submission_lookup_command(plan: SubmissionPlan, patience: float = SUBMISSION_LOOKUP_PATIENCE) -> str:
    """Remote script for after a connection was lost during `submit_command`: prints what sbatch printed (as
    `submit_command` does) once it has ended; ``@@ none`` when the script was never written or was refused and
    removed (nothing was submitted); else, after ``patience`` seconds, the id of a job of this user that runs this
    very script, if squeue shows one, and ``@@ unknown``."""
    script = shlex.quote(plan.script_path)
    outcome = shlex.quote(plan.script_path + ".submitted")
    return (
        f"tries={int(patience * 2)}\n"
        "while :; do\n"
        f"  if [ -f {outcome} ]; then cat -- {outcome}; exit 0; fi\n"
        f"  if [ ! -f {script} ]; then echo '@@ none'; exit 0; fi\n"
        '  tries=$((tries - 1)); [ "$tries" -gt 0 ] || break; sleep 0.5\n'
        "done\n"
        f"timeout {SCHEDULER_CALL_TIMEOUT:g} squeue -h --me -o '%i %o' | while read -r id command; do\n"
        f'  [ "$command" = {script} ] && echo "$id"\n'
        "done\n"
        "echo '@@ unknown'"
    )


SCANCEL_ALREADY_ENDED = "Job/step already completing or completed"


def parse_scancel_refusals(stderr: str) -> dict[str, str]:
    r"""What ``scancel -v`` refused, by job id.

    >>> parse_scancel_refusals("scancel: error: Kill job error on job id 7: Invalid job id specified\n")
    {'7': 'Invalid job id specified'}
    """
    return dict(re.findall(r"Kill job error on job id (\S+): (.+)", stderr))


def login_output(stdout: str) -> str:
    """What the login shell's start-up files printed before a remote command's own output ('' when nothing).

    >>> login_output("Welcome to the cluster\\n@@sl-forgery-output@@\\n4242\\n")
    'Welcome to the cluster\\n'
    """
    printed, marker, _ = stdout.partition(f"{OUTPUT_MARKER}\n")
    return printed if marker else ""


def without_login_noise(stdout: str) -> str:
    """A remote command's own output: what follows the OUTPUT_MARKER line, or all of it when there is none.

    >>> without_login_noise("Welcome to the cluster\\n@@sl-forgery-output@@\\n4242\\n")
    '4242\\n'
    """
    _, marker, own_output = stdout.partition(f"{OUTPUT_MARKER}\n")
    return own_output if marker else stdout


def parse_submit_output(stdout: str) -> tuple[str, int]:
    r"""Split what `submit_command` printed into (sbatch's stdout, sbatch's exit code).

    >>> parse_submit_output("42\n@@ 0\n")
    ('42\n', 0)
    """
    match = re.search(r"^@@ (\d+)\n?\Z", stdout, flags=re.MULTILINE)
    if not match:
        raise ValueError(f"unexpected submission output: {stdout[:200]!r}")
    return stdout[: match.start()], int(match.group(1))


_GREEN, _RED, _YELLOW, _CYAN = "32", "31", "33", "36"


def cell_colour(header: str, value: object) -> str | None:
    """The ANSI colour of a table cell on a terminal: a job's state by its outcome, a check's result by pass or fail.

    >>> cell_colour("STATE", JobStatus.FAILED), cell_colour("RESULT", "ok"), cell_colour("NAME", "FAILED")
    ('31', '32', None)
    """
    if header == "STATE" and isinstance(value, JobStatus):
        if value is JobStatus.COMPLETED:
            return _GREEN
        if value.is_finished:
            return _RED
        return _CYAN if value in (JobStatus.RUNNING, JobStatus.COMPLETING) else _YELLOW
    if header == "RESULT" and value != NOT_CHECKED:
        return _GREEN if value == "ok" else _RED
    return None


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], colour: bool = False) -> str:
    """An aligned plain-text table; with ``colour``, cells that ``cell_colour`` knows are painted (widths unchanged)."""
    cells = [[str(value) for value in row] for row in rows]
    widths = [max([len(headers[i])] + [len(row[i]) for row in cells]) for i in range(len(headers))]

    def cell(header: str, value: object, text: str, width: int) -> str:
        code = cell_colour(header, value) if colour else None
        return f"\033[{code}m{text}\033[0m{' ' * (width - len(text))}" if code else text.ljust(width)

    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(cell(*column) for column in zip(headers, row, texts, widths, strict=True)).rstrip()
        for row, texts in zip(rows, cells, strict=True)
    ]
    return "\n".join(lines)


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``3d`` as seconds.

    >>> parse_duration("15m")
    900.0
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise UsageError(f"{text!r} is not a duration such as 90, 90s, 15m, 2h or 3d")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


# -- efficiency report: what a job used of what it asked for, from sacct ------------------------------------------

USAGE_FIELDS = "JobID,State,ExitCode,Elapsed,Timelimit,TotalCPU,AllocCPUS,MaxRSS,ReqMem,NNodes"
_MEMORY_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
GB = 1 << 30  # sbatch's G, which --mem counts in


def parse_slurm_duration(text: str) -> float | None:
    """sacct's times as seconds: ``[D-]HH:MM:SS`` (Elapsed, Timelimit) or ``[[D-]HH:]MM:SS.mmm`` (TotalCPU); None
    for no value or no limit.

    >>> parse_slurm_duration("1-02:03:04"), parse_slurm_duration("00:04.068"), parse_slurm_duration("UNLIMITED")
    (93784.0, 4.068, None)
    """
    match = re.fullmatch(r"\s*(?:([0-9]+)-)?([0-9]+(?::[0-9]+){0,2}(?:\.[0-9]+)?)\s*", text)
    if not match:
        return None
    seconds = 0.0
    for part in match.group(2).split(":"):
        seconds = seconds * 60 + float(part)
    return seconds + int(match.group(1) or 0) * 86400


def parse_slurm_memory(text: str, cpus: int = 1, nodes: int = 1) -> int | None:
    """sacct's memory figures as bytes: ``161780K``, ``300M``, ``1.50G``; an older SLURM's ReqMem ends in ``c``
    (per CPU) or ``n`` (per node). None for no value.

    >>> parse_slurm_memory("161780K"), parse_slurm_memory("2Gc", cpus=4), parse_slurm_memory("")
    (165662720, 8589934592, None)
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)([KMGTP]?)([cn]?)\s*", text)
    if not match:
        return None
    number, unit, per = match.groups()
    factor = {"c": cpus, "n": nodes}.get(per, 1)
    return round(float(number) * _MEMORY_UNITS[unit] * factor)


class JobUsage(
    collections.namedtuple(
        "JobUsage",
        "job_id status exit_code signal elapsed time_limit cpus total_cpu peak_memory requested_memory steps",
    )
):
    """What one job (or array task) used of what it asked for. Times in seconds, memory in bytes; ``peak_memory``
    is the largest MaxRSS of any of its steps (None until a step has ended with a measurement), ``total_cpu`` the
    CPU time of all its steps together; ``steps`` counts them (batch, extern and each srun)."""

    __slots__ = ()

    @property
    def cpu_efficiency(self) -> float | None:
        """TotalCPU / (Elapsed x AllocCPUS): 1.0 when every CPU it held was busy all the time."""
        if not self.elapsed or not self.cpus:
            return None
        return self.total_cpu / (self.elapsed * self.cpus)

    @property
    def memory_use(self) -> float | None:
        """Peak memory as a fraction of the memory asked for."""
        if self.peak_memory is None or not self.requested_memory:
            return None
        return self.peak_memory / self.requested_memory

    @property
    def time_use(self) -> float | None:
        """Elapsed time as a fraction of the time limit."""
        if not self.time_limit:
            return None
        return self.elapsed / self.time_limit

    @property
    def suggestion(self) -> str:
        return usage_suggestion(self)

    def to_json(self) -> dict[str, Any]:
        return {
            **_outcome_json(self),
            "elapsed_seconds": self.elapsed,
            "time_limit_seconds": self.time_limit,
            "time_used": self.time_use,
            "cpus": self.cpus,
            "total_cpu_seconds": self.total_cpu,
            "cpu_efficiency": self.cpu_efficiency,
            "peak_memory_bytes": self.peak_memory,
            "requested_memory_bytes": self.requested_memory,
            "memory_used": self.memory_use,
            "steps": self.steps,
            "suggestion": self.suggestion,
        }


def parse_sacct_usage(stdout: str) -> dict[str, JobUsage]:
    """Rows of ``sacct -n -P -o USAGE_FIELDS`` (steps included, no -X), one `JobUsage` per job or array task, keyed
    by its id, in sacct's order. Its steps (``ID.batch``, ``ID.extern``, ``ID.0``...) give the CPU time and peak
    memory; the job's own row gives the state, the limit and what was asked for."""
    jobs: dict[str, list[str]] = {}
    steps: dict[str, list[list[str]]] = {}
    for line in stdout.splitlines():
        row = line.split("|")
        if len(row) != USAGE_FIELDS.count(",") + 1:
            continue
        job_id, _, step = row[0].partition(".")
        if step:
            steps.setdefault(job_id, []).append(row)
        elif re.fullmatch(r"[0-9]+(_[0-9]+)?", job_id):  # not a pending array's 12_[1-3]
            jobs[job_id] = row
    result = {}
    for job_id, (_, state, exit_text, elapsed, limit, total_cpu, cpus, _, requested, nodes) in jobs.items():
        own_steps = steps.get(job_id, [])
        status, code, signal = sacct_outcome(state, exit_text)
        alloc = int(cpus) if cpus.isdigit() else 0
        peaks = [peak for row in own_steps if (peak := parse_slurm_memory(row[7])) is not None]
        if own_steps:
            cpu_time = sum(parse_slurm_duration(row[5]) or 0.0 for row in own_steps)
        else:
            cpu_time = parse_slurm_duration(total_cpu) or 0.0
        result[job_id] = JobUsage(
            job_id,
            status,
            code,
            signal,
            parse_slurm_duration(elapsed) or 0.0,
            parse_slurm_duration(limit),
            alloc,
            round(cpu_time, 3),
            max(peaks) if peaks else None,
            parse_slurm_memory(requested, cpus=alloc, nodes=int(nodes) if nodes.isdigit() else 1),
            len(own_steps),
        )
    return result


def format_bytes(size: float) -> str:
    """A memory size as people say it, in the units --mem counts (1 GB = 1024 MB).

    >>> format_bytes(3.1 * (1 << 30)), format_bytes(50 * (1 << 30)), format_bytes(165662720), format_bytes(2048)
    ('3.1 GB', '50 GB', '158 MB', '2 KB')
    """
    if size >= 1 << 30:
        return f"{size / (1 << 30):.1f}".removesuffix(".0") + " GB"
    if size >= 1 << 20:
        return f"{size / (1 << 20):.0f} MB"
    return f"{size / 1024:.0f} KB"


def format_seconds(seconds: float) -> str:
    """A duration as people say it.

    >>> format_seconds(6), format_seconds(300), format_seconds(5400), format_seconds(2 * 86400)
    ('6 s', '5 min', '1.5 h', '2 d')
    """
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}".removesuffix(".0") + " h"
    return f"{seconds / 86400:.1f}".removesuffix(".0") + " d"


def _memory_flag(size: float) -> str:
    """A --mem value (GB) a little above ``size`` bytes: whole GB from 1 GB up, tenths below."""
    import math

    gigabytes = size / GB
    return f"{math.ceil(gigabytes)}" if gigabytes >= 1 else f"{math.ceil(gigabytes * 10) / 10:g}"


def usage_suggestion(usage: JobUsage) -> str:
    """One line on how the job's next request could fit what it used, e.g. ``asked 50.0 GB, used 3.1 GB: --mem 4
    would do``. Memory and time keep a margin over what was used; CPUs are judged on their average load."""
    import math

    advice = []
    if usage.status is JobStatus.OUT_OF_MEMORY and usage.requested_memory:
        more = _memory_flag(usage.requested_memory * 2)
        advice.append(f"ran out of its {format_bytes(usage.requested_memory)}: ask for more (--mem {more})")
    elif usage.memory_use is not None and usage.peak_memory is not None and usage.requested_memory:
        asked, used = format_bytes(usage.requested_memory), format_bytes(usage.peak_memory)
        if usage.memory_use >= 0.9:
            advice.append(f"used {used} of {asked}: ask for more (--mem {_memory_flag(usage.peak_memory * 1.5)})")
        elif usage.memory_use < 0.5:
            advice.append(f"asked {asked}, used {used}: --mem {_memory_flag(usage.peak_memory * 1.25)} would do")
    if usage.time_limit:
        asked_time, took = format_seconds(usage.time_limit), format_seconds(usage.elapsed)
        if usage.status is JobStatus.TIMEOUT:
            advice.append(f"hit its {asked_time} limit: ask for more (--time {math.ceil(usage.time_limit / 30)})")
        elif usage.status.is_finished and usage.time_limit >= 600 and usage.elapsed < usage.time_limit / 4:
            advice.append(f"asked {asked_time}, took {took}: --time {math.ceil(usage.elapsed * 1.5 / 60)} would do")
    efficiency = usage.cpu_efficiency
    if usage.status.is_finished and usage.peak_memory is None and usage.steps:
        advice.append("sacct recorded no memory figure (steps shorter than the cluster's sampling interval)")
    if usage.status.is_finished and efficiency is not None and usage.cpus > 1 and efficiency < 0.5:
        busy = max(1, math.ceil(usage.total_cpu / usage.elapsed))
        advice.append(f"{usage.cpus} CPUs, {efficiency:.0%} busy: --cpus {busy} would do")
    if not usage.status.is_finished:
        advice.insert(0, "still running, figures so far")
    return "; ".join(advice) or "its requests fit what it used"


def usage_settled(stdout: str) -> bool:
    r"""Whether sacct has recorded the end of every job and step in its output. Just after a job's end, sacct may
    show it ended without its steps (a job that ran has at least its batch step; one cancelled before it started
    has none), FAILED without its exit code (see `sacct_outcome`), or with its requested memory still unknown
    (``16?``).

    >>> usage_settled("7|COMPLETED|0:0|00:00:03|||||1G|1\n"), usage_settled("8|CANCELLED|0:0|00:00:00|||||1G|1\n")
    (False, True)
    """
    rows = [line.split("|") for line in stdout.splitlines() if line.count("|") == USAGE_FIELDS.count(",")]
    if not rows or not all(JobStatus.parse(row[1]).is_finished for row in rows):
        return False
    with_steps = {row[0].partition(".")[0] for row in rows if "." in row[0]}
    return all(
        (row[0] in with_steps or not parse_slurm_duration(row[3]))
        and parse_slurm_memory(row[8]) is not None
        and sacct_outcome(row[1], row[2]) != (JobStatus.FAILED, None, None)
        for row in rows
        if "." not in row[0]
    )


# -- a job's node: its address, a shell in the job, files around it, an editor on it -------------------------------


def node_query_script(job_id: str) -> str:
    """A remote script printing ``STATE|NODELIST`` of a job (squeue), then ``scontrol show node -o`` of its first
    node once it has one."""
    quoted = shlex.quote(job_id)
    return (
        f"info=$(squeue -h -j {quoted} -o '%T|%N' 2>/dev/null); printf '%s\\n' \"$info\"\n"
        "nodes=${info#*|}\n"
        'if [ -n "$nodes" ]; then scontrol show node -o "$(scontrol show hostnames "$nodes" | head -n 1)"; fi\n'
    )


def parse_node_query(stdout: str) -> tuple[JobStatus, dict[str, str]]:
    r"""The job's state and its first node's ``scontrol show node -o`` fields (empty until it runs somewhere).

    >>> state, node = parse_node_query("RUNNING|node[1-2]\nNodeName=node1 NodeAddr=10.0.0.1 NodeHostName=n1\n")
    >>> state, node["NodeAddr"], node["NodeHostName"]
    (<JobStatus.RUNNING: 'RUNNING'>, '10.0.0.1', 'n1')
    >>> parse_node_query("\n")
    (<JobStatus.UNKNOWN: 'UNKNOWN'>, {})
    """
    first, _, rest = stdout.partition("\n")
    state = JobStatus.parse(first.partition("|")[0])
    fields = dict(re.findall(r"(\w+)=(\S*)", rest)) if first.partition("|")[2] else {}
    return state, fields


def srun_shell_command(job_id: str, prelude: Sequence[str] = ()) -> str:
    """The remote command that opens the user's login shell inside a running job, on its first node, beside what
    the job runs (``--overlap``), with a terminal (``--pty``). With ``prelude`` (set-up and activation lines) the
    shell is an interactive bash that runs them after the user's own ~/.bashrc."""
    srun = ["srun", f"--jobid={job_id}", "--overlap", "--pty"]
    if prelude:
        # The lines are written on the node, where the shell runs; `set +e`, since set-up lines may turn it on.
        rcfile = "\n".join(["[ -f ~/.bashrc ] && . ~/.bashrc", *prelude, "set +e"])
        node_side = "exec bash --rcfile <(printf '%s\\n' \"$1\") -i"
        inner = shlex.join(["exec", *srun, "bash", "-c", node_side, "bash", rcfile])
    else:
        inner = f'exec {shlex.join(srun)} "${{SHELL:-/bin/bash}}" -l'
    # The login shell runs it: sh -c keeps the syntax POSIX whatever that shell is (tcsh, fish).
    return shlex.join(["/bin/sh", "-c", inner])


# What a TensorBoard job asks for unless told otherwise: one viewer, for an afternoon.
TENSORBOARD_DEFAULTS = {"cpus_to_use": 1, "ram_gb": 4, "time_limit": 240}
STEP_POLL_INTERVAL = 5.0  # seconds between squeue's looks at a TensorBoard's step while forward waits on it


def tensorboard_logdir(logdir: str) -> str:
    """A log directory on the server, quoted for the shell: an absolute path, ``~/...``, or a path relative to the
    remote home (where every command over the connection starts).

    >>> print(tensorboard_logdir("runs/exp 1"), tensorboard_logdir("/scratch/runs"))
    "$HOME"/'runs/exp 1' /scratch/runs
    """
    logdir = _check_text("LOGDIR", logdir)
    if not logdir.startswith(("/", "~")):
        logdir = "~/" + logdir
    if logdir.startswith("~") and logdir != "~" and not logdir.startswith("~/"):
        raise UsageError(f"LOGDIR {logdir!r}: another user's ~ is not supported; give the absolute path")
    return _shell_path(logdir)


def render_tensorboard_commands(run_directory: str, logdir: str) -> list[str]:
    """Shell lines that run TensorBoard on a job's node, serving ``logdir`` (already quoted for the shell).

    It listens only on the address the cluster reaches the node by (its NodeAddr, never all interfaces) on a port
    the node picks, and answers only under a random path made on the node (every other path is a 404): TensorBoard
    has no token, and anyone on the node, or who reaches it, could read it otherwise. The path reaches TensorBoard
    through a flag file in a 0700 directory, never a command line (``ps`` shows those to every user), and its own
    info file there tells the client the port. ``--load_fast=false``: the fast loader serves the logs again,
    without any check, from a second server on the node."""
    run = shlex.quote(run_directory)
    tensorboard = [
        "tensorboard",
        f"--flagfile={run_directory}/flags",
        "--port=0",
        "--load_fast=false",
    ]
    return [
        "umask 077",
        f"mkdir -p {run} && {private_directory_check(run_directory)} || exit 1",
        "__slf_addr=$(scontrol show node -o \"$SLURMD_NODENAME\" | sed -n 's/.* NodeAddr=\\([^ ]*\\).*/\\1/p')",
        '[ -n "$__slf_addr" ] || ' + _fail('"cannot read this node\'s NodeAddr from scontrol"'),
        f"printf -- '--path_prefix=/%s\\n' \"$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n')\" > {run}/flags",
        f"export TMPDIR={run}",  # where TensorBoard writes its info file (port, path)
        f'{shlex.join(tensorboard)} --logdir={logdir} --host="$__slf_addr" >> {run}/tensorboard.log 2>&1',
    ]


def tensorboard_step_command(job_id: str, run_directory: str, node_script: str) -> str:
    """The login-node script that starts ``node_script`` as a step of a running job (``srun --overlap``, beside
    what the job runs) and returns at once: srun runs on in its own session, writes its log and, when the step
    ends, its exit code (``ended``) into ``run_directory``. The step's id goes into ``step`` there, for scancel."""
    run = shlex.quote(run_directory)
    on_node = f'printf "%s.%s\\n" "$SLURM_JOB_ID" "$SLURM_STEP_ID" > {run}/step\n{node_script}\n'
    srun = ["srun", f"--jobid={job_id}", "--overlap", "--nodes=1", "--ntasks=1", "--job-name=tensorboard"]
    # The node's script goes in a private file, not on a command line: its set-up lines may hold a token, and
    # argv is shown by ps to every user and kept by SLURM as the step's submit line.
    step = f"{shlex.join(srun)} bash {run}/node.sh; echo $? > {run}/ended"
    start, body = shell_here_document(on_node)
    return (
        f"umask 077 && mkdir -p {run} && {private_directory_check(run_directory)} &&\n"
        f"cat > {run}/node.sh {start}\n{body}"
        f"setsid sh -c {shlex.quote(step)} </dev/null >> {run}/tensorboard.log 2>&1 &"
    )


def private_directory_check(path: str) -> str:
    """A shell test that ``path`` is a real directory of this user nobody else may write to, in a parent of this
    user's that not everyone may write to: one someone else made first, or could swap (in a workdir others write
    to), would hand them what is put in it. A parent the user's group may write to (a lab's umask) is accepted."""
    checks = []
    for directory, others in ((path, "/022"), (str(PurePosixPath(path).parent), "/002")):
        quoted = shlex.quote(directory)
        checks.append(
            f"[ -d {quoted} ] && [ ! -L {quoted} ] && [ -O {quoted} ] && "
            f'[ -z "$(find {quoted} -maxdepth 0 -perm {others})" ]'
        )
    refusal = f"echo sl-forgery: {shlex.quote(path)} or its parent is not a private directory of yours >&2"
    return "{ " + " && ".join(checks) + f" || {{ {refusal}; false; }}; }}"


def tensorboard_poll_command(run_directory: str) -> str:
    """A login-node script printing what a TensorBoard's run directory says so far: ``ended RC`` (its step ended),
    ``step ID``, then ``info`` and TensorBoard's info file."""
    run = shlex.quote(run_directory)
    return (
        f"cd {run} 2>/dev/null || exit 0\n"
        '[ -f ended ] && printf "ended %s\\n" "$(cat ended)"\n'
        '[ -f step ] && printf "step %s\\n" "$(cat step)"\n'
        'for f in .tensorboard-info/pid-*.info; do [ -f "$f" ] && echo info && cat "$f"; break; done\n'
        "true"
    )


def parse_tensorboard_poll(stdout: str) -> tuple[int | None, str | None, int | None, str | None]:
    """``(ended, step, port, path)`` from `tensorboard_poll_command`'s output; each ``None`` until known. A value
    that is not what TensorBoard and srun write (the files come from the node) stays ``None``.

    >>> parse_tensorboard_poll('step 42.3\\ninfo\\n{"port": 41234, "path_prefix": "/' + 32 * 'a' + '"}\\n')[1:3]
    ('42.3', 41234)
    >>> parse_tensorboard_poll("ended 127\\n")
    (127, None, None, None)
    """
    import json

    head, _, info = stdout.partition("info\n")
    fields = dict(line.split(" ", 1) for line in head.splitlines() if " " in line)
    ended = int(fields["ended"]) if re.fullmatch(r"[0-9]+", fields.get("ended", "")) else None
    step = fields.get("step") if re.fullmatch(r"[0-9]+\.[0-9]+", fields.get("step", "")) else None
    try:
        details = json.loads(info) if info else None
    except ValueError:
        details = None  # still being written
    port = path = None
    if isinstance(details, dict):
        candidate_port, candidate_path = details.get("port"), details.get("path_prefix")
        if type(candidate_port) is int and 0 < candidate_port < 65536:
            port = candidate_port
        if isinstance(candidate_path, str) and re.fullmatch(r"/[0-9a-f]{32}", candidate_path):
            path = candidate_path
    return ended, step, port, path


def rsync_argv(
    remote_shell: Sequence[str],
    source: str,
    destination: str,
    *,
    gitignore: bool = True,
    delete: bool = False,
    dry_run: bool = False,
) -> list[str]:
    """An rsync command that copies ``source`` into ``destination`` (one of them ``HOST:PATH``) through
    ``remote_shell`` (an ssh over the master): bytes, modes and times kept, files ignored by any ``.gitignore`` on
    the sending side left out, nothing deleted unless ``delete``; ``dry_run`` lists what would be copied."""
    argv = ["rsync", "--archive", "--protect-args", "--rsh", shlex.join(remote_shell)]
    if gitignore:
        argv += ["--filter", ":- .gitignore"]
    if delete:
        argv.append("--delete")
    if dry_run:
        argv.append("--dry-run")
    return [*argv, "--out-format=%n", "--", source, destination]


def sync_paths(source: str, destination: str) -> tuple[str, str]:
    """rsync copies a directory's contents, not the directory itself, when its path ends in ``/``: sync always
    means contents into the destination directory.

    >>> sync_paths("src", "lab:/w/code")
    ('src/', 'lab:/w/code/')
    """
    return source.rstrip("/") + "/", destination.rstrip("/") + "/"


HOST_ALIAS_PREFIX = "slf-"
_ROUTING_OPTIONS = {
    "hostname",
    "port",
    "proxyjump",
    "proxycommand",
    "controlmaster",
    "controlpath",
    "controlpersist",
    "remotecommand",
    "requesttty",
    "localforward",
    "remoteforward",
    "dynamicforward",
}


def render_host_entry(
    alias: str,
    address: str,
    port: int,
    user: str | None,
    proxy_argv: Sequence[str],
    identity_file: str | None,
    ssh_options: Sequence[str],
    comment: str,
) -> str:
    """An ssh config Host block reaching a node through the master: its ProxyCommand asks the existing connection
    for a channel to the node (``ssh -S SOCKET -W %h:%p``) instead of logging in to the login node again. The
    profile's ssh options that say how to authenticate or check host keys carry over; those that route do not."""
    lines = [f"# {comment}", f"Host {alias}", f"    HostName {address}", f"    Port {port}"]
    if user:
        lines.append(f"    User {user}")
    if identity_file:
        lines.append(f"    IdentityFile {identity_file}")
    for option in ssh_options:
        name, _, value = option.partition("=")
        if name.strip().lower() not in _ROUTING_OPTIONS and value:
            lines.append(f"    {name.strip()} {value.strip()}")
    lines.append(f"    ProxyCommand {shlex.join(proxy_argv)}")
    return "\n".join(lines) + "\n"


def split_host_entries(text: str) -> dict[str, str]:
    r"""The Host blocks of a file written by sl-forgery, keyed by alias (each with its comment line).

    >>> list(split_host_entries("# a\nHost slf-1\n    Port 22\n# b\nHost slf-2\n    Port 22\n"))
    ['slf-1', 'slf-2']
    """
    entries: dict[str, str] = {}
    for block in re.split(r"\n(?=# )", text.strip()):
        match = re.search(r"^Host (\S+)$", block, flags=re.MULTILINE)
        if match:
            entries[match.group(1)] = block.strip() + "\n"
    return entries


def include_line(path: str | os.PathLike[str]) -> str:
    return f"Include {shlex.quote(os.fspath(path))}"


# ======================================================================================================================
# Local state: config file, job history, keyring, legacy credentials
# ======================================================================================================================


def _existing_source(local: str | os.PathLike[str]) -> Path:
    """A local file or directory to send, which must exist."""
    source = Path(local)
    if not source.exists():
        raise UsageError(f"{source} does not exist; give a local directory or file to send")
    return source


def _xdg_dir(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable)
    return Path(value) if value and os.path.isabs(value) else Path.home() / fallback


def config_path() -> Path:
    override = os.environ.get("SL_FORGERY_CONFIG")
    if override:
        return Path(override)
    return _xdg_dir("XDG_CONFIG_HOME", ".config") / APP_NAME / "servers.yaml"


def state_dir() -> Path:
    return _xdg_dir("XDG_STATE_HOME", ".local/state") / APP_NAME


def control_dir() -> Path:
    """A short private directory for ControlMaster sockets (socket paths are limited to about 104 bytes): under
    XDG_RUNTIME_DIR when that is this user's own private directory (after `su` it is still the previous user's),
    else in /tmp, where `_private_dir` refuses whatever another user may have put in its place."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and len(runtime) < 40 and _is_own_private_dir(runtime) else Path("/tmp")
    return base / f"slf-{os.getuid()}"


def _is_own_private_dir(path: str | os.PathLike[str]) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077


def _file_stamp(path: str) -> tuple[int, int, int]:
    """What changes when a file (or a directory's list of files) changes: inode, size and mtime; zeros if none."""
    try:
        info = os.stat(path)
    except OSError:
        return 0, 0, 0
    return info.st_ino, info.st_size, info.st_mtime_ns


def _os_reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def _private_dir(path: Path) -> Path:
    """A directory only this user can use, created 0700 if missing. An existing one must be a real directory (not a
    symbolic link), this user's own and writable by nobody else: anything else may have been put there by another
    user (in /tmp anyone can) and is refused. One of ours that others can merely read is made private."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as error:
        raise SlForgeryError(f"cannot create the directory {path}: {_os_reason(error)}") from None
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if os.path.islink(path):
            raise ConfigError(
                f"{path} is a symbolic link, not a directory of yours (another user may have planted it); "
                "remove it and try again"
            ) from None
        raise ConfigError(f"{path} is not a usable directory ({_os_reason(error)}); remove it and try again") from None
    try:
        info = os.fstat(descriptor)
        if info.st_uid != os.getuid():
            raise ConfigError(
                f"{path} belongs to another user (uid {info.st_uid}), who may have planted it; sl-forgery keeps "
                "private files there: have it removed, or point the XDG_* variable for it elsewhere"
            )
        if info.st_mode & 0o022:
            raise ConfigError(
                f"{path} is writable by other users (mode {stat.S_IMODE(info.st_mode):04o}); check what is in it, "
                f"then 'chmod 700 {path}'"
            )
        if info.st_mode & 0o077:
            os.fchmod(descriptor, stat.S_IMODE(info.st_mode) & 0o700)
    finally:
        os.close(descriptor)
    return path


def _open_own_file(path: str | os.PathLike[str], flags: int) -> int:
    """Open (creating with mode 0600 if ``flags`` ask) a regular file that must be this user's own and writable by
    nobody else; a symbolic link is never followed."""
    try:
        descriptor = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        if os.path.islink(path):
            raise ConfigError(
                f"{path} is a symbolic link (another user may have planted it); remove it and try again"
            ) from None
        raise
    info = os.fstat(descriptor)
    problem = ""
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif info.st_uid != os.getuid():
        problem = f"belongs to another user (uid {info.st_uid})"
    elif info.st_mode & 0o022:
        problem = f"is writable by other users (mode {stat.S_IMODE(info.st_mode):04o})"
    if problem:
        os.close(descriptor)
        raise ConfigError(f"{path} {problem}; remove it and try again")
    return descriptor


def run_exclusively(
    lock_path: str | os.PathLike[str],
    action: Callable[[], Any],
    wait_at_most: float | None = None,
    instead: Callable[[], Any] | None = None,
) -> Any:
    """Run ``action`` while this process holds the lock file, so that commands started together take turns; the
    lock goes with its process, so one that crashes blocks nobody. With ``wait_at_most`` (seconds), a lock held
    longer than that (its holder stopped with Ctrl-Z) is passed by: ``instead`` runs, without the lock."""
    import fcntl

    descriptor = _open_own_file(lock_path, os.O_WRONLY | os.O_CREAT)
    try:
        if wait_at_most is None or instead is None:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            return action()
        deadline = time.monotonic() + wait_at_most
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return instead()
                time.sleep(0.05)
            else:
                return action()
    finally:
        os.close(descriptor)


def check_private_file_parent(path: Path) -> bool:
    """Whether ``path``'s directory exists; a `ConfigError` if it is one where a private file is not safe."""
    parent = path.parent
    try:
        info = os.stat(parent)
    except FileNotFoundError:
        return False
    except OSError as error:
        raise SlForgeryError(f"cannot write {path}: {_os_reason(error)}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"cannot write {path}: {parent} is not a directory")
    if info.st_mode & 0o002 and not info.st_mode & stat.S_ISVTX:
        raise ConfigError(
            f"{parent} is writable by every user (mode {stat.S_IMODE(info.st_mode):04o}), so anyone could "
            f"replace {path.name} there; choose a directory of your own"
        )
    return True


def write_private_file(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace a file atomically by one with ``mode`` (0600: only this user reads it), so that a crash or a full
    disk leaves the old file and no temporary one. A missing directory is created private; an existing one is left
    as it is (a home or a shared project directory keeps its mode), but one that every user may write to, where
    anyone could replace the file, is refused."""
    parent = path.parent
    if not check_private_file_parent(path):
        _private_dir(parent)
    temporary = parent / f".{path.name}.{os.urandom(6).hex()}.tmp"
    descriptor = -1
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        os.fchmod(descriptor, mode)  # whatever the umask
        data = text.encode("utf-8")
        while data:
            data = data[os.write(descriptor, data) :]
        os.fsync(descriptor)
        os.close(descriptor)
        descriptor = -1
        os.replace(temporary, path)
    except OSError as error:
        if descriptor >= 0:
            os.close(descriptor)
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise SlForgeryError(f"cannot write {path}: {_os_reason(error)}; it was left as it was") from None


PROFILE_KEYS = {
    "host": "host name, IP address or ~/.ssh/config Host alias",
    "user": "user name on the server (default: from ~/.ssh/config or your local name)",
    "port": "SSH port",
    "identity_file": "private key file",
    "ssh_config": "an ssh config file to use instead of ~/.ssh/config",
    "ssh_options": "extra ssh -o options, e.g. [ProxyJump=gateway]",
    "password_in_keyring": "true when the password is stored in the OS keyring",
    "storage_root": "slow storage root on the server",
    "working_root": "fast working root on the server",
    "shared_directory_name": "shared lab directory under the roots",
    "conda_environment": "default environment for jobs: a conda environment's name, or a venv, uv or pixi path",
    "env_manager": "conda, mamba, micromamba, venv, uv or pixi (default: conda for a name, found out for a path)",
    "setup": "shell lines every job runs before activating its environment, e.g. [module load miniconda3]",
    "partition": "default partition",
    "account": "default account",
    "control_persist": "seconds an idle connection stays open",
    "notify": "true: a desktop notification when a job waited for ends (as --notify)",
    "node_ssh_port": "port of sshd on the compute nodes, for 'code' (default 22)",
    "max_sessions": "sessions sshd allows per connection (MaxSessions), if not found out by itself",
}


# What `ssh -o` takes: a keyword, then '=' or blanks, then its value.
_SSH_OPTION_RE = re.compile(r"^[A-Za-z]+(\s*=\s*|\s+)\S")

# Profile names reach shells (completion) and file names: letters, digits, '_', '.' and '-', never first a '-'.
_PROFILE_NAME_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")


def profile_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a server profile, or None."""
    if isinstance(name, str) and _PROFILE_NAME_RE.match(name) and len(name) <= 64:
        return None
    return (
        f"server name {name!r} is not allowed: use up to 64 letters, digits, '_', '.' and '-' (not first), "
        "e.g. 'lab' or 'hpc-2'"
    )


def profile_field_problem(key: str, value: object, label: str = "") -> str | None:
    """Why ``value`` cannot be a profile's ``key`` (see PROFILE_KEYS), or None; ``label`` names it in the message."""
    label = label or key
    if key in ("port", "node_ssh_port"):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            return f"{label} must be a whole number from 1 to 65535, not {value!r}"
    elif key == "max_sessions":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"{label} must be a whole number of sessions (1 or more), not {value!r}"
    elif key == "control_persist":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return f"{label} must be a whole number of seconds from 1 (ssh reads 0 as forever), not {value!r}"
    elif key in ("password_in_keyring", "notify"):
        if not isinstance(value, bool):
            return f"{label} must be true or false, not {value!r}"
    elif key in ("ssh_options", "setup"):
        example = "[ProxyJump=gateway]" if key == "ssh_options" else "[module load miniconda3]"
        if not isinstance(value, list):
            return f"{label} must be a list such as {example}, not {value!r}"
        for item in value:
            problem = profile_field_problem("", item, f"each of {label}")
            if problem:
                return problem
            if key == "ssh_options" and not _SSH_OPTION_RE.match(item):
                return f"each of {label} must be an ssh option with its value, such as ProxyJump=gateway, not {item!r}"
    elif key == "env_manager" and value not in ENV_MANAGERS:
        return f"{label} {value!r} is not one of {', '.join(ENV_MANAGERS)}"
    elif not isinstance(value, str):
        return f"{label} must be text, not {type(value).__name__} {value!r} (put it in quotes)"
    elif not value.strip():
        return f"{label} must not be empty"
    elif any(char in value for char in "\n\r\0"):
        return f"{label} must be a single line: {value!r} contains a line break or NUL"
    return None


def profiles_sharing_password(config: Config, profile: Profile) -> list[str]:
    """The other profiles whose password is the same keyring entry (same user@host:port) as ``profile``'s: that
    entry must stay while any of them does."""
    return sorted(
        other.name
        for other in config.servers.values()
        if other.name != profile.name and other.password_in_keyring and other.keyring_account == profile.keyring_account
    )


def keyring_account(user: str | None, host: str, port: int | None) -> str:
    """The name of a server's password entry in the keyring: ``user@host:port``."""
    return f"{user or ''}@{host}:{port or DEFAULT_PORT}"


class Profile:
    """How to reach one server, and its defaults. Never holds a secret."""

    def __init__(
        self,
        name: str,
        host: str,
        user: str | None = None,
        port: int | None = None,
        identity_file: str | None = None,
        ssh_config: str | None = None,
        ssh_options: list[str] | None = None,
        password_in_keyring: bool = False,
        storage_root: str | None = None,
        working_root: str | None = None,
        shared_directory_name: str | None = None,
        conda_environment: str | None = None,
        partition: str | None = None,
        account: str | None = None,
        control_persist: int = DEFAULT_CONTROL_PERSIST,
        legacy_credentials: str | None = None,
        notify: bool = False,
        env_manager: str | None = None,
        setup: list[str] | None = None,
        node_ssh_port: int | None = None,
        max_sessions: int | None = None,
    ) -> None:
        given = dict(locals())
        self.name = name
        for key in PROFILE_KEYS:
            setattr(self, key, given[key])
        self.ssh_options = list(ssh_options or [])
        self.setup = list(setup or [])
        self.max_sessions = max_sessions
        self.legacy_credentials = legacy_credentials  # a legacy file that still holds a plaintext password

    @property
    def keyring_account(self) -> str:
        """The keyring entry name for this server's password (see `keyring_account`)."""
        return keyring_account(self.user, self.host, self.port)

    def to_yaml_dict(self) -> dict[str, Any]:
        data = {}
        for key in PROFILE_KEYS:
            value = getattr(self, key)
            if value not in (None, [], False) and not (key == "control_persist" and value == DEFAULT_CONTROL_PERSIST):
                data[key] = value
        return data


class Config:
    """The servers file: named profiles and which one is the default."""

    def __init__(self, path: Path, servers: dict[str, Profile] | None = None, default: str | None = None) -> None:
        self.path = path
        self.servers = dict(servers or {})
        self.default = default

    def profile(self, name: str | None = None) -> Profile:
        name = name or os.environ.get("SL_FORGERY_SERVER") or self.default
        if not name:
            if not self.servers:
                raise ConfigError(
                    f"no server is configured in {self.path}; add one with "
                    "'sl-forgery server add NAME --host HOST --user USER'"
                )
            raise ConfigError(
                f"no default server in {self.path}; pass --server NAME or run 'sl-forgery server default NAME'"
            )
        if name not in self.servers:
            known = ", ".join(sorted(self.servers)) or "none"
            raise ConfigError(
                f"no server named {name!r} in {self.path} (known: {known}); add it with 'sl-forgery server add'"
            )
        return self.servers[name]

    def dump(self) -> str:
        import yaml

        data: dict[str, Any] = {}
        if self.default:
            data["default"] = self.default
        data["servers"] = {name: profile.to_yaml_dict() for name, profile in sorted(self.servers.items())}
        return "# sl-forgery servers; no secrets here (passwords live in the OS keyring)\n" + yaml.safe_dump(
            data, sort_keys=False, default_flow_style=False
        )

    def save(self) -> None:
        if self.path == config_path() and not os.environ.get("SL_FORGERY_CONFIG"):
            _private_dir(self.path.parent)  # sl-forgery's own directory; one named by the user is left as it is
        write_private_file(self.path, self.dump())


def _yaml_key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Line numbers (1-based) of every mapping key, by its path, for error messages."""
    import yaml

    lines: dict[tuple[str, ...], int] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*prefix, str(key_node.value))
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)

    walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    return lines


def _yaml_error_line(error: Exception) -> str:
    """``:LINE`` of a YAML error: where the broken construct began if known, else where parsing stopped."""
    mark = getattr(error, "context_mark", None) or getattr(error, "problem_mark", None)
    return f":{mark.line + 1}" if mark else ""


def _read_config_text(path: Path, what: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: {what} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {_os_reason(error)}") from None


def _load_yaml(text: str, path: Path, advice: str) -> Any:
    """``yaml.safe_load`` without anchors and aliases (a few hundred bytes of nested aliases expand to gigabytes,
    and a hand-written settings file never needs them) and without a key given twice in one mapping (YAML would
    keep the last silently: a second server of the same name would replace the first). Errors name the file and
    line."""
    import yaml

    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise ConfigError(
                    f"{path}:{event.start_mark.line + 1}: YAML anchors and aliases (&name, *name) are not allowed "
                    "here; write each value out"
                )
        loader = yaml.SafeLoader(text)
        try:
            document = loader.get_single_node()
            nodes = [document] if document is not None else []
            while nodes:
                node = nodes.pop()
                if isinstance(node, yaml.MappingNode):
                    seen = set()
                    for key, value in node.value:
                        if isinstance(key, yaml.ScalarNode) and key.value in seen:
                            raise ConfigError(
                                f"{path}:{key.start_mark.line + 1}: {key.value!r} is given twice in the same block; "
                                "keep one"
                            )
                        seen.add(key.value if isinstance(key, yaml.ScalarNode) else id(key))
                        nodes.append(value)
                elif isinstance(node, yaml.SequenceNode):
                    nodes.extend(node.value)
            return loader.construct_document(document) if document is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        where = _yaml_error_line(error)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem}); {advice}") from None


def load_config(path: Path | None = None) -> Config:
    """Read the servers file; any problem is a one-line `ConfigError` naming the file, the line and the fix."""
    path = path or config_path()
    try:
        info = path.stat()
    except FileNotFoundError:
        return Config(path)
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {_os_reason(error)}") from None
    if info.st_uid not in (os.getuid(), 0):
        # As OpenSSH does for its config: a file someone else can change decides where commands and passwords go.
        raise ConfigError(f"{path} belongs to another user (uid {info.st_uid}); use a servers file of your own")
    if info.st_mode & 0o077:
        mode = info.st_mode & 0o777
        raise ConfigError(f"{path} is readable by other users (mode {oct(mode)}); run 'chmod 600 {path}'")
    # The file as it is now: a cache of it read and checked before serves while this does not change.
    stamp = (
        f"{__version__}-{os.stat(__file__).st_mtime_ns}-{info.st_dev}-{info.st_ino}-{info.st_size}-{info.st_mtime_ns}"
    )
    cached = _cached_config(path, stamp)
    if cached is not None:
        return cached
    text = _read_config_text(path, "the servers file")
    data = _load_yaml(text, path, "fix the file or move it away") or {}
    key_lines = _yaml_key_lines(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping with 'servers:' and 'default:'")

    def fail(key_path: tuple[str, ...], message: str) -> ConfigError:
        line = key_lines.get(key_path)
        return ConfigError(f"{path}{f':{line}' if line else ''}: {message}")

    for key in data:
        if key not in ("servers", "default"):
            raise fail((str(key),), f"unknown key {key!r} (expected 'servers' and 'default')")
    servers_data = data.get("servers") or {}
    if not isinstance(servers_data, dict):
        raise fail(("servers",), "'servers' must be a mapping of server names to settings")
    default = data.get("default")
    if default is not None and not isinstance(default, str):
        raise fail(("default",), f"'default' must be the name of a server, not {default!r}")
    config = Config(path, default=default)
    for name, settings in servers_data.items():
        if isinstance(name, int) and not isinstance(name, bool):
            name = str(name)  # an unquoted number is still a name
        config.servers[name] = _checked_profile(name, settings, fail)
    if config.default is not None and config.default not in config.servers:
        raise fail(("default",), f"default server {config.default!r} is not defined under 'servers'")
    _cache_config(path, stamp, config)
    return config


def _checked_profile(name: Any, settings: Any, fail: Callable[[tuple[str, ...], str], ConfigError]) -> Profile:
    """One server's settings from the servers file as a Profile; ``fail`` makes the error naming its line."""
    problem = profile_name_problem(name)
    if problem:
        raise fail(("servers", str(name)), problem)
    settings = settings or {}
    if not isinstance(settings, dict):
        raise fail(("servers", name), f"server {name!r} must be a mapping of settings")
    if "password" in settings:
        raise fail(
            ("servers", name, "password"),
            "passwords do not belong in this file; use 'sl-forgery server add --password'",
        )
    for key, value in settings.items():
        if key not in PROFILE_KEYS:
            raise fail(
                ("servers", name, str(key)),
                f"unknown key {key!r} in server {name!r} (known: {', '.join(PROFILE_KEYS)})",
            )
        problem = None if value is None and key != "host" else profile_field_problem(key, value)
        if problem:
            raise fail(("servers", name, key), f"server {name!r}: {problem}")
    if not settings.get("host"):
        raise fail(("servers", name), f"server {name!r} has no 'host'")
    settings = {key: value for key, value in settings.items() if value is not None}
    return Profile(name=name, **settings)


def _config_cache_path(path: Path) -> Path:
    import hashlib

    digest = hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:16]
    return _xdg_dir("XDG_CACHE_HOME", ".cache") / APP_NAME / f"servers-{digest}.json"


def _cached_config(path: Path, stamp: str) -> Config | None:
    """The servers file as last read and checked, when it has not changed since (``stamp``): every command reads
    it, and parsing YAML costs more than the rest of a command's start."""
    import json

    text = _read_trusted_cache(_config_cache_path(path))
    try:
        data = json.loads(text) if text else None
        if not data or data["stamp"] != stamp or data["path"] != str(path.absolute()):
            return None
        servers = {name: Profile(name=name, **settings) for name, settings in data["servers"].items()}
        return Config(path, servers, data["default"])
    except (ValueError, KeyError, TypeError):
        return None


def _cache_config(path: Path, stamp: str, config: Config) -> None:
    import json

    document = {
        "stamp": stamp,
        "path": str(path.absolute()),
        "default": config.default,
        "servers": {name: profile.to_yaml_dict() for name, profile in config.servers.items()},
    }
    try:
        _private_dir(_config_cache_path(path).parent)
        write_private_file(_config_cache_path(path), json.dumps(document))
    except (OSError, SlForgeryError):
        pass  # an unusable cache only costs speed


def history_path() -> Path:
    return state_dir() / "jobs.jsonl"


class JobNotRecorded(SlForgeryError):
    """A job was submitted, but the local history could not remember it; ``job_id`` is still the job's."""

    def __init__(self, job_id: str, path: Path, reason: str) -> None:
        self.job_id = job_id
        super().__init__(
            f"job {job_id} was submitted, but it could not be added to the job history {path} ({reason}); "
            "'logs', 'history' and 'status' without ids will not know it"
        )


def _append_lines(path: Path, documents: Iterable[Mapping[str, Any]]) -> None:
    """Append JSON lines to a private state file (created 0600)."""
    import json

    data = "".join(json.dumps(document) + "\n" for document in documents).encode("utf-8")
    _private_dir(path.parent)
    descriptor = _open_own_file(path, os.O_RDWR | os.O_CREAT | os.O_APPEND)
    try:
        size = os.fstat(descriptor).st_size
        # A last line cut short (a crash, a full disk) is ended first, so that it cannot swallow this record.
        if size and os.pread(descriptor, 1, size - 1) != b"\n":
            data = b"\n" + data
        while data:
            data = data[os.write(descriptor, data) :]
    finally:
        os.close(descriptor)


def record_job(record: JobRecord) -> None:
    """Add a job to the local history; `JobNotRecorded` (with its id) when the history cannot be written."""
    path = history_path()
    try:
        _append_lines(path, [record._asdict()])
    except OSError as error:
        raise JobNotRecorded(record.job_id, path, _os_reason(error)) from None
    except SlForgeryError as error:
        raise JobNotRecorded(record.job_id, path, str(error)) from None


def ended_jobs_path() -> Path:
    return state_dir() / "ended.jsonl"


def _job_info_document(info: JobInfo) -> dict[str, Any]:
    return info._replace(status=info.status.value)._asdict()


def _job_info_from_document(data: Mapping[str, Any]) -> JobInfo:
    """A `JobInfo` from `_job_info_document`; ValueError, KeyError or TypeError for one that is not."""
    info = JobInfo(**{field: data[field] for field in JobInfo._fields})
    return info._replace(status=JobStatus(info.status))


def remember_ended(server: str, ended: Iterable[tuple[JobRecord, JobInfo]]) -> None:
    """Keep the final states (`end_settled` ones only) of jobs submitted from here, so that asking again costs no
    round trip. Each is tied to its submission (its time), so that a job id the controller hands out again is asked
    about anew. Best effort: a state that cannot be kept is asked for again next time."""
    documents = [
        {"server": server, "submitted": record.submitted, **_job_info_document(info)} for record, info in ended
    ]
    if documents:
        with contextlib.suppress(OSError, SlForgeryError):
            _append_lines(ended_jobs_path(), documents)


def load_ended(server: str, records: Mapping[str, JobRecord]) -> dict[str, JobInfo]:
    """The kept final states (see `remember_ended`) of this server's jobs that are still the ones in ``records``."""
    import json

    ended = {}
    for line in (_read_state_file(ended_jobs_path(), "the ended jobs") or "").splitlines():
        try:
            data = json.loads(line)
            info = _job_info_from_document(data)
            record = records.get(info.job_id)
            if data["server"] == server and record is not None and record.submitted == data["submitted"]:
                ended[info.job_id] = info
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short or edited: the job is asked about again
    return ended


def shared_answer(
    board: str,
    job_ids: Sequence[str],
    ask: Callable[[list[str]], dict[str, JobInfo]],
    max_age: float = SCHEDULER_POLL_FIRST,
    newer_than: float = 0.0,
) -> tuple[dict[str, JobInfo], float]:
    """The scheduler's answer for ``job_ids`` and its time (`time.time()`, the oldest of theirs), shared by every
    wait of one server on this machine through the board file named ``board``, so that however many there are,
    they ask about once per ``max_age``: the board's answer for each of these jobs, when each is younger than that
    (and, after an event, newer than ``newer_than``); otherwise one query (``ask``) covers these jobs and those
    other waits asked about lately. A scheduler that did not answer is put on the board too (`SchedulerBusy` is
    raised from it), so that the other waits hold off instead of asking it again. A board held for longer than a
    scheduler query can take (a wait stopped with Ctrl-Z while it asked) is passed by: this wait asks alone."""
    import json

    def read_board() -> tuple[dict[str, Any] | None, dict[str, tuple[JobInfo, float]], dict[str, float]]:
        """The scheduler's silence (or None), each job's last answer and its time, and when each job was last
        asked about; an empty board when there is none or it was cut short by a crash."""
        try:
            descriptor = _open_own_file(path, os.O_RDONLY)
        except FileNotFoundError:
            return None, {}, {}
        with os.fdopen(descriptor, "rb") as board_file:
            try:
                data = json.loads(board_file.read())
                answers = {
                    job_id: (_job_info_from_document(document), float(when))
                    for job_id, (document, when) in data["answers"].items()
                }
                wanted = {job_id: float(when) for job_id, when in data["wanted"].items()}
                return data.get("busy"), answers, wanted
            except (ValueError, KeyError, TypeError, AttributeError):
                return None, {}, {}

    def fresh(when: float, now: float) -> bool:
        return newer_than <= when and 0 <= now - when < max_age

    def exchange() -> tuple[dict[str, JobInfo], float]:
        busy, answers, wanted = read_board()
        now = time.time()
        wanted = {job_id: when for job_id, when in wanted.items() if 0 <= now - when < WANTED_SECONDS}
        wanted.update(dict.fromkeys(job_ids, now))
        if busy and fresh(float(busy["asked"]), now):
            raise SchedulerBusy(["squeue"], busy["returncode"], "", busy["stderr"], what="squeue")
        if not all(job_id in answers and fresh(answers[job_id][1], now) for job_id in job_ids):
            # An end on the board is never asked about again by others: only the wait of that job may need it.
            others = [
                job_id
                for job_id in wanted
                if job_id not in job_ids and not (job_id in answers and answers[job_id][0].ended)
            ]
            try:
                answer = ask([*job_ids, *others])
            except SchedulerBusy as silent:
                busy = {"asked": time.time(), "returncode": silent.returncode, "stderr": silent.stderr}
                note(busy, answers, wanted)
                raise
            asked = time.time()
            answers.update((job_id, (info, asked)) for job_id, info in answer.items())
        note(None, answers, wanted)
        return {job_id: answers[job_id][0] for job_id in job_ids}, min(answers[job_id][1] for job_id in job_ids)

    def note(busy: dict[str, Any] | None, answers: Mapping[str, tuple[JobInfo, float]], wanted: dict[str, float]):
        kept = {job: (_job_info_document(info), when) for job, (info, when) in answers.items() if job in wanted}
        with contextlib.suppress(SlForgeryError):
            write_private_file(path, json.dumps({"busy": busy, "answers": kept, "wanted": wanted}))

    directory = _private_dir(control_dir())
    path = directory / f"board-{board}.json"
    return run_exclusively(
        directory / f"board-{board}.lock",
        exchange,
        wait_at_most=2 * SCHEDULER_CALL_TIMEOUT,
        instead=lambda: (ask(list(job_ids)), time.time()),
    )


_JOB_ID_RE = re.compile(r"^[0-9]+(_[0-9]+)?$")


def _job_record(line: str) -> JobRecord | None:
    """A history line as a record, or None for a line that is not one (cut short, edited, from elsewhere)."""
    import json
    import math

    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    values = {field: data.get(field, JobRecord._field_defaults.get(field)) for field in JobRecord._fields}
    submitted = values["submitted"]
    if isinstance(submitted, bool) or not isinstance(submitted, (int, float)) or not math.isfinite(submitted):
        return None
    if not all(isinstance(value, str) for field, value in values.items() if field != "submitted"):
        return None
    if not _JOB_ID_RE.match(values["job_id"]):
        return None
    return JobRecord(**values)


def _read_state_file(path: Path, what: str) -> str | None:
    """A file of the local state as text (bytes that are not UTF-8 replaced), or None when there is none."""
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as error:
        raise SlForgeryError(f"cannot read {what} {path}: {_os_reason(error)}; move it away to start anew") from None


def load_job_records(server: str | None = None) -> dict[str, JobRecord]:
    """Every remembered job (for one server), by id; the latest record of an id wins. Lines that are not records
    are skipped."""
    records: dict[str, JobRecord] = {}
    text = _read_state_file(history_path(), "the job history")
    for line in (text or "").splitlines():
        record = _job_record(line)
        if record is not None and (server is None or record.server == server):
            records[record.job_id] = record
    return records


def jupyter_records_path() -> Path:
    return state_dir() / "jupyter.json"


_JUPYTER_RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "server": (str,),
    "working_directory": (str,),
    "host": (str,),
    "port": (int,),
    "token": (str,),
    "local_port": (int, type(None)),
    "url": (str, type(None)),
}


def load_jupyter_records() -> dict[str, dict[str, Any]]:
    """Running Jupyter servers started from this machine; a private file (0600), since it holds their tokens.
    Entries that are not such records are left out."""
    import json

    text = _read_state_file(jupyter_records_path(), "the Jupyter records")
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        job_id: details
        for job_id, details in data.items()
        if _JOB_ID_RE.match(job_id)
        and isinstance(details, dict)
        and all(
            isinstance(details.get(key), types) and not isinstance(details.get(key), bool)
            for key, types in _JUPYTER_RECORD_TYPES.items()
        )
    }


def _update_records(path: Path, load: Callable[[], dict[str, Any]], change: Callable[[dict[str, Any]], None]) -> None:
    """Read, change and write a private records file as one step under its lock, so that commands started together
    all keep what they added."""
    import json

    def update() -> None:
        records = load()
        change(records)
        write_private_file(path, json.dumps(records, indent=1))

    _private_dir(state_dir())
    run_exclusively(f"{path}.lock", update)


def update_jupyter_records(change: Callable[[dict[str, dict[str, Any]]], None]) -> None:
    """Change the Jupyter records as one step, so that Jupyter servers started together are all kept."""
    _update_records(jupyter_records_path(), load_jupyter_records, change)


def forward_records_path() -> Path:
    return state_dir() / "forwards.json"


def load_forward_records() -> dict[str, dict[str, Any]]:
    """Forwards to jobs' ports made from this machine, keyed by local port."""
    import json

    try:
        records = json.loads(_read_state_file(forward_records_path(), "the forward records") or "{}")
    except ValueError:
        return {}
    return (
        {str(port): details for port, details in records.items() if isinstance(details, dict)}
        if isinstance(records, dict)
        else {}
    )


def update_forward_records(change: Callable[[dict[str, dict[str, Any]]], None]) -> None:
    _update_records(forward_records_path(), load_forward_records, change)


def host_entries_path() -> Path:
    """The ssh config file sl-forgery owns, beside the servers file: one Host entry per job opened with 'code'."""
    return config_path().parent / "nodes.ssh_config"


def update_host_entries(change: Callable[[dict[str, str]], None]) -> None:
    path = host_entries_path()

    def update() -> None:
        entries = split_host_entries(path.read_text(encoding="utf-8")) if path.exists() else {}
        change(entries)
        header = "# Written by sl-forgery ('sl-forgery code'); entries go when their jobs end ('code --cleanup').\n"
        write_private_file(path, header + "".join(f"\n{entry}" for entry in entries.values()))

    _private_dir(path.parent)
    run_exclusively(f"{path}.lock", update)


def user_ssh_config(profile: Profile) -> Path:
    """The ssh config file plain ssh (and so an editor) reads for this server."""
    configured = profile.ssh_config or os.environ.get("SL_FORGERY_SSH_CONFIG")
    return Path(os.path.expanduser(configured or "~/.ssh/config"))


def add_include(ssh_config: Path, included: Path) -> bool:
    """Put an Include of ``included`` at the top of an ssh config file (an Include below a Host line would only
    apply to that host); False when it is there already."""
    line = include_line(included)
    text = ssh_config.read_text(encoding="utf-8") if ssh_config.exists() else ""
    if line in text.splitlines():
        return False
    _private_dir(ssh_config.parent)
    descriptor = os.open(ssh_config, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(descriptor)
    temporary = ssh_config.with_name(f".{ssh_config.name}.{os.getpid()}.tmp")
    temporary.write_text(f"{line}\n{text}", encoding="utf-8")
    os.chmod(temporary, ssh_config.stat().st_mode & 0o777)
    os.replace(temporary, ssh_config)
    return True


_INSECURE_BACKENDS = ("keyring.backends.fail", "keyring.backends.null", "keyrings.alt")


def secure_keyring() -> Any:
    """The keyring backend, refusing one that would not keep a password safe."""
    import keyring

    backend = keyring.get_keyring()
    backends = getattr(backend, "backends", None)
    candidates = backends if backends is not None else [backend]
    if not candidates or all(type(b).__module__.startswith(_INSECURE_BACKENDS) for b in candidates):
        raise CredentialError(
            f"no secure keyring is available (found {type(backend).__module__}.{type(backend).__name__}); "
            "use an SSH key ('sl-forgery server setup-key NAME'), or install a Secret Service (gnome-keyring, "
            "KeePassXC) or macOS Keychain backend"
        )
    return backend


def store_password(account: str, password: str) -> None:
    if not password:
        raise CredentialError("the password is empty; nothing was stored")
    backend = secure_keyring()
    try:
        backend.set_password(KEYRING_SERVICE, account, password)
    except Exception as error:  # keyring raises backend-specific errors
        raise CredentialError(
            f"the keyring refused to store the password for {account}: {type(error).__name__}"
        ) from None


def get_password(account: str) -> str | None:
    import keyring

    try:
        return keyring.get_password(KEYRING_SERVICE, account)
    except Exception:  # a locked or absent keyring is the same as no password here
        return None


def delete_password(account: str) -> bool:
    import keyring
    import keyring.errors

    try:
        keyring.delete_password(KEYRING_SERVICE, account)
        return True
    except keyring.errors.PasswordDeleteError:
        return False
    except Exception:
        return False


LEGACY_FIELDS = (
    "username",
    "password",
    "host",
    "storage_root",
    "working_root",
    "shared_directory_name",
    "raw_data_root",
    "processed_data_root",
    "user_data_root",
    "user_working_root",
)
_warned_plaintext: set[str] = set()


def read_legacy_credentials(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"credentials file {path} does not exist; create it with 'sl-create-server-credentials'")
    text = _read_config_text(path, "the credentials file")
    data = _load_yaml(text, path, "recreate it with 'sl-create-server-credentials'") or {}
    if not isinstance(data, dict) or not data.get("host") or not data.get("username"):
        raise ConfigError(f"{path} is not a server credentials file (it needs at least 'host' and 'username')")
    unknown = set(data) - set(LEGACY_FIELDS) - {"port", "key_login"}
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown, key=str)[0]!r} in a server credentials file")
    for key, value in data.items():
        if key in ("username", "password") and isinstance(value, int) and not isinstance(value, bool):
            continue  # written by hand without quotes; read as the text it was meant to be
        kind = {"port": "port", "key_login": "password_in_keyring"}.get(key, "")  # a number, a flag, else text
        problem = profile_field_problem(kind, value, key)
        if problem and not (value is None and key != "host"):
            raise ConfigError(f"{path}: {problem}")
    return data


def _legacy_profile(data: Mapping[str, Any], name: str | None) -> Profile:
    return Profile(
        name=name or str(data["host"]),
        host=str(data["host"]),
        user=str(data["username"]),
        port=data.get("port"),
        storage_root=data.get("storage_root"),
        working_root=data.get("working_root"),
        shared_directory_name=data.get("shared_directory_name"),
        password_in_keyring=not data.get("password") and not data.get("key_login"),
    )


def profile_from_legacy(path: Path, name: str | None = None) -> Profile:
    """A profile for an original ``server_credentials.yaml``; a plaintext password in it still works, with a
    warning, and reaches ssh through the askpass helper, which reads it from that same file."""
    data = read_legacy_credentials(path)
    profile = _legacy_profile(data, name)
    if data.get("password"):
        profile.legacy_credentials = str(Path(path).resolve())
        if profile.legacy_credentials not in _warned_plaintext:
            _warned_plaintext.add(profile.legacy_credentials)
            print(
                f"{APP_NAME}: warning: {path} holds a plaintext password; move it into the OS keyring with "
                f"'sl-forgery server import {path}'",
                file=sys.stderr,
            )
    return profile


def write_legacy_credentials(path: Path, fields: Mapping[str, Any]) -> None:
    """Write a ``server_credentials.yaml`` in the original layout, without any password."""
    import yaml

    keys = (*LEGACY_FIELDS, "port", "key_login")
    data = {key: fields[key] for key in keys if key != "password" and fields.get(key) is not None}
    write_private_file(path, yaml.safe_dump(data, sort_keys=False))


def legacy_derived_roots(username: str, storage_root: str, working_root: str, shared: str) -> dict[str, str]:
    """The four roots the original derived from the storage and working roots."""
    return {
        "raw_data_root": str(PurePosixPath(storage_root, shared)),
        "processed_data_root": str(PurePosixPath(working_root, shared)),
        "user_data_root": str(PurePosixPath(storage_root, username)),
        "user_working_root": str(PurePosixPath(working_root, username)),
    }


def import_legacy_credentials(path: Path, name: str | None, config: Config) -> Profile:
    """Move a legacy file's password into the keyring, add a profile, and rewrite the file without the password
    (no copy of it is kept: a backup would be one more plaintext password on disk)."""
    data = read_legacy_credentials(path)
    profile = _legacy_profile(data, name)
    problem = profile_name_problem(profile.name)
    if problem:
        raise UsageError(f"{problem}; choose one with --name")
    if data.get("password"):
        store_password(profile.keyring_account, str(data["password"]))
        profile.password_in_keyring = True
    config.servers[profile.name] = profile
    config.default = config.default or profile.name
    config.save()
    if data.get("password"):
        write_legacy_credentials(path, {key: value for key, value in data.items() if key != "password"})
    return profile


def end_notice(infos: Sequence[JobInfo], server_name: str) -> tuple[str, str]:
    """The title and text of the notice that jobs have ended.

    >>> end_notice([JobInfo("42", JobStatus.FAILED, 3, 0, name="fit")], "lab")
    ('sl-forgery: job 42 FAILED', 'fit on lab, exit code 3')
    """
    if len(infos) == 1:
        info = infos[0]
        code = f", exit code {info.exit_code}" if info.exit_code is not None else ""
        return f"{APP_NAME}: job {info.job_id} {info.status}", f"{info.name or 'job'} on {server_name}{code}"
    counts = collections.Counter(str(info.status) for info in infos)
    summary = ", ".join(f"{count} {state}" for state, count in sorted(counts.items()))
    return f"{APP_NAME}: {len(infos)} jobs ended", f"{summary} on {server_name}"


def desktop_notifier_argv(title: str, text: str, platform: str, notify_send: str | None) -> list[str] | None:
    r"""The local command that shows a desktop notification: notify-send on Linux (when installed), osascript on
    macOS, None elsewhere.

    >>> desktop_notifier_argv("T", 'say "hi"', "darwin", None)[-1]
    'display notification "say \\"hi\\"" with title "T"'
    """
    if platform.startswith("linux") and notify_send:
        return [notify_send, f"--app-name={APP_NAME}", "--", title, text]  # a job named "-i x" is still text
    if platform == "darwin":

        def quoted(value: str) -> str:
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

        return ["osascript", "-e", f"display notification {quoted(text)} with title {quoted(title)}"]
    return None


def notify_desktop(title: str, text: str) -> str | None:
    """Show a desktop notification on this machine; None when shown, else why not (for a one-line note)."""
    import shutil

    argv = desktop_notifier_argv(title, text, sys.platform, shutil.which("notify-send"))
    if argv is None:
        return "no desktop notifier here (notify-send on Linux, osascript on macOS)"
    try:
        result = _run(argv, timeout=15, check=False)
    except (OSError, SSHError) as error:
        return f"{argv[0]} failed: {error}"
    if result.returncode != 0:
        return f"{Path(argv[0]).name} exited {result.returncode}: {result.stderr.strip()[:200]}"
    return None


def run_on_end(command: str, info: JobInfo) -> int:
    """Run a user's command through their own shell on this machine, told the job's end in its environment;
    returns its exit code. Its output goes where sl-forgery's goes."""
    import subprocess

    environment = {
        **os.environ,
        "SL_FORGERY_JOB_ID": info.job_id,
        "SL_FORGERY_STATE": info.status.value,
        "SL_FORGERY_EXIT_CODE": "" if info.exit_code is None else str(info.exit_code),
    }
    shell = os.environ.get("SHELL") or "/bin/sh"
    return subprocess.run([shell, "-c", command], env=environment, stdin=subprocess.DEVNULL).returncode


# ======================================================================================================================
# Transport: one OpenSSH ControlMaster per server, every call riding it
# ======================================================================================================================

ASKPASS_ACCOUNT_VARIABLE = "SL_FORGERY_ASKPASS_ACCOUNT"
ASKPASS_FILE_VARIABLE = "SL_FORGERY_ASKPASS_CREDENTIALS"
ASKPASS_PROMPT_VARIABLE = "SL_FORGERY_ASKPASS_PROMPT"  # the one prompt the stored password answers
ASKPASS_TTY_VARIABLE = "SL_FORGERY_ASKPASS_TTY"  # the user's terminal, for every other prompt
ASKPASS_PROFILE_VARIABLE = "SL_FORGERY_ASKPASS_PROFILE"  # named in the advice when no one can answer
# The master's log, where a refusal is noted too: a ProxyJump gateway's ssh (and the helper it runs) writes its
# stderr to /dev/null when ControlPersist is on.
ASKPASS_LOG_VARIABLE = "SL_FORGERY_ASKPASS_LOG"


def _askpass_say(message: str) -> None:
    print(f"{APP_NAME}: {message}", file=sys.stderr)
    log = os.environ.get(ASKPASS_LOG_VARIABLE)
    if log:
        try:
            descriptor = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        with os.fdopen(descriptor, "a", encoding="utf-8") as handle:
            handle.write(f"{APP_NAME}: {message}\n")


def askpass_main(argv: Sequence[str] | None = None) -> int:
    """The SSH_ASKPASS helper. It answers only the exact password prompt of the server being connected to
    (``USER@HOST's password: ``) from the keyring or a legacy credentials file; any other prompt (a one-time code,
    a ProxyJump gateway's own password) goes to the user's terminal, or fails when there is none; it never confirms
    an unknown host key."""
    words = list(sys.argv[1:] if argv is None else argv)
    prompt = words[0] if words else ""
    kind = os.environ.get("SSH_ASKPASS_PROMPT", "")
    if kind == "none":  # a notice, such as a security key's "Confirm user presence": nothing to answer
        _askpass_say(prompt.strip())
        return 0
    if kind == "confirm":
        _askpass_say(f"refusing to confirm {prompt.strip()!r}; answer it with plain ssh in a terminal")
        return 1
    if "authenticity of host" in prompt or "(yes/no" in prompt or "fingerprint" in prompt.lower():
        _askpass_say("refusing to confirm an unknown host key; accept it with plain ssh first")
        return 1
    expected = os.environ.get(ASKPASS_PROMPT_VARIABLE)
    if expected and prompt == expected:
        secret = None
        account = os.environ.get(ASKPASS_ACCOUNT_VARIABLE)
        legacy = os.environ.get(ASKPASS_FILE_VARIABLE)
        if legacy:
            secret = read_legacy_credentials(Path(legacy)).get("password")
        elif account:
            secret = get_password(account)
        if secret:
            sys.stdout.write(str(secret) + "\n")
            return 0
        _askpass_say(f"no password for {account or legacy} is stored")
        return 1
    answer = _ask_on_terminal(prompt, os.environ.get(ASKPASS_TTY_VARIABLE))
    if answer is None:
        if not re.fullmatch(r"\S+@\S+'s password: |Enter passphrase for .*", prompt, flags=re.DOTALL):
            # Neither ssh's password prompt nor a key's passphrase: the server's keyboard-interactive login asks.
            profile = os.environ.get(ASKPASS_PROFILE_VARIABLE)
            connect = f"sl-forgery connect -s {profile}" if profile else "sl-forgery connect"
            _askpass_say(
                f"cannot answer {prompt.strip()!r}: the server asks for a second factor, and there is no terminal "
                f"to ask you on; run '{connect}' in a terminal to open the connection first (later commands reuse "
                "it)"
            )
        elif expected:
            _askpass_say(
                f"cannot answer {prompt.strip()!r}: it is not {expected.strip()!r} (the prompt the stored password "
                "is for) and there is no terminal to ask you on; run the command from a terminal, or use a key"
            )
        else:
            _askpass_say(f"cannot answer {prompt.strip()!r}: there is no terminal to ask you on")
        return 1
    sys.stdout.write(answer + "\n")
    return 0


def _ask_on_terminal(prompt: str, tty_path: str | None) -> str | None:
    """Ask the person at ``tty_path`` (echo off), or None without a terminal. ssh runs this helper in a session of
    its own, without a controlling terminal, so the terminal is named by the command that started ssh."""
    import termios

    if not tty_path:
        return None
    try:
        descriptor = os.open(tty_path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not os.isatty(descriptor):
            return None
        saved = termios.tcgetattr(descriptor)
        quiet = list(saved)
        quiet[3] &= ~termios.ECHO
        # Echo off before the prompt shows, as getpass does: a code typed (or pasted) the moment the prompt appears
        # must be neither shown nor thrown away by the flush, which would leave ssh waiting for it.
        termios.tcsetattr(descriptor, termios.TCSAFLUSH, quiet)
        os.write(descriptor, prompt.encode("utf-8", errors="replace"))
        try:
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = os.read(descriptor, 1024)
                if not chunk:
                    break
                answer += chunk
        finally:
            termios.tcsetattr(descriptor, termios.TCSAFLUSH, saved)
            os.write(descriptor, b"\n")
        return answer.decode("utf-8", errors="replace").rstrip("\r\n")
    except OSError:
        return None
    finally:
        os.close(descriptor)


def _terminal_name() -> str | None:
    """The path of the terminal this command runs on, if any."""
    for stream in (sys.stdin, sys.stderr, sys.stdout):
        try:
            if stream is not None and stream.isatty():
                return os.ttyname(stream.fileno())
        except (OSError, ValueError):
            continue
    return None


def _run(
    argv: Sequence[str],
    *,
    timeout: float | None,
    input_text: str | None = None,
    env: Mapping[str, str] | None = None,
    stdout: Any = None,
    stderr: Any = None,
    check: bool = True,
    error: type[CommandError] = CommandError,
    what: str = "",
) -> subprocess.CompletedProcess:
    """Run a program without a shell, its output captured unless ``stdout``/``stderr`` say where it goes. A
    non-zero exit raises ``error`` (unless ``check`` is false); a timeout raises `SSHError`, after SIGTERM first and
    SIGKILL only if it will not stop."""
    import subprocess

    stdout = subprocess.PIPE if stdout is None else stdout
    stderr = subprocess.PIPE if stderr is None else stderr
    process = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        text=True,
        env=dict(env) if env is not None else None,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(input_text, timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            out, err = process.communicate(timeout=3)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        raise SSHError(argv, -15, out or "", (err or "") + f"\ntimed out after {timeout:g} s", what=what) from None
    except BaseException:
        process.kill()
        process.wait()
        raise
    result = subprocess.CompletedProcess(argv, process.returncode, out or "", err or "")
    if check and result.returncode != 0:
        raise error(argv, result.returncode, result.stdout, result.stderr, what=what)
    return result


def wait_for_port(local_port: int, timeout: float, what: str) -> None:
    """Block until a forwarded local port leads to something that listens: through a forward to a closed port,
    ssh accepts the connection and closes it at once; an open one keeps it (or answers)."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", local_port), timeout=5) as probe:
                probe.settimeout(1.0)
                if probe.recv(1):
                    return
        except TimeoutError:
            return  # still open after a second: a server waiting for its client to speak first
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise SlForgeryError(f"nothing answers on {what} within {timeout:g} s; is the program there listening?")
        time.sleep(0.3)


def free_local_port() -> int:
    """A TCP port free on 127.0.0.1 right now (OpenSSH refuses to forward local port 0)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_http(url: str, timeout: float) -> None:
    """Block until a local URL answers 200; raise TunnelError naming the address (never the token) if it does not.
    No proxy is ever used: the URL is a tunnel on this machine, and the token in it must reach nobody else."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    problem = ""
    while time.monotonic() < deadline:
        try:
            with opener.open(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as error:
            problem = str(getattr(error, "reason", error))
        time.sleep(0.3)
    from urllib.parse import urlsplit

    # The host and port only: a Jupyter token (in the query) and a TensorBoard's secret path are the URL's key.
    address = urlsplit(url)._replace(path="/", query="", fragment="").geturl()
    raise TunnelError(["GET", address], 1, "", f"no answer within {timeout:g} s: {problem}", what="the tunnel")


# What every remote call sends as its command: sshd hands it to the user's login shell, and bash, dash, zsh, tcsh,
# csh and fish all parse it the same way; the real script follows on stdin, read by a POSIX sh.
REMOTE_SHELL = "exec /bin/sh -s"
# The same for a call whose stdin carries data after its script: the script's length comes first, and the script is
# read to that length exactly (a byte at a time), so the data is left for the script's own commands.
REMOTE_SHELL_WITH_DATA = "exec /bin/sh -c 'IFS= read -r n && eval \"$(dd bs=1 count=$n 2>/dev/null)\"'"


def framed_script(script: str) -> str:
    """What a remote call writes to ``exec /bin/sh -s``: the OUTPUT_MARKER line (what the login shell's start-up
    files print comes before it), then the script as one group, so that sh has read all of it before anything runs
    and no command in it can read the rest as its stdin."""
    return f"printf '%s\\n' {OUTPUT_MARKER}\n{{\n{script}\n}} </dev/null\n"


class SSHConnection:
    """One server reached through OpenSSH: an explicit ControlMaster, and every remote call multiplexed over it.

    This class is the only place that runs ssh and ssh-keyscan. A call never falls back to a connection of its
    own: calls carry a ProxyCommand that cannot connect, which OpenSSH only uses when the master is gone. Then the
    master is restarted once, and the call repeated (it never reached the server).
    """

    def __init__(self, profile: Profile, *, timeout: float = DEFAULT_CALL_TIMEOUT, verbose: bool = False) -> None:
        self.profile = profile
        self.timeout = timeout
        self.verbose = verbose
        self.control_path = str(control_dir() / "%C")
        self.master_starts = 0
        self._socket_path: str | None = None
        self._socket_path_to_keep: Path | None = None

    # -- argv -----------------------------------------------------------------------------------------------------

    def _target_args(self, identity: bool = True) -> list[str]:
        profile = self.profile
        args = []
        ssh_config = profile.ssh_config or os.environ.get("SL_FORGERY_SSH_CONFIG")
        if ssh_config:
            args += ["-F", os.path.expanduser(ssh_config)]
        if profile.port:
            args += ["-p", str(profile.port)]
        if profile.user:
            args += ["-l", profile.user]
        if profile.identity_file and identity:
            args += ["-i", os.path.expanduser(profile.identity_file)]
        for option in profile.ssh_options:
            args += ["-o", option]
        return args

    @staticmethod
    def _guard_args() -> list[str]:
        """Options that stop a call from opening a connection of its own when the master is gone, or from running
        a RemoteCommand from the user's ssh config (a tmux on login) instead of its own."""
        return ["-o", "ControlMaster=no", "-o", "ProxyCommand=false", "-o", "RemoteCommand=none"]

    def _mux_args(self) -> list[str]:
        return ["-o", f"ControlPath={self.control_path}"]

    def _call_argv(self) -> list[str]:
        """Argv of every call over the master; what it runs comes on stdin (see `framed_script`)."""
        argv = ["ssh", *self._guard_args(), *self._mux_args(), *self._target_args(), "-T", "--", self.profile.host]
        return [*argv, REMOTE_SHELL]

    def _master_argv(self) -> list[str]:
        options = {
            "ControlMaster": "yes",
            "ControlPersist": self.profile.control_persist,
            "ServerAliveInterval": SERVER_ALIVE_INTERVAL,
            "ServerAliveCountMax": 3,
            "ConnectTimeout": 20,
            "NumberOfPasswordPrompts": 1,
            "RemoteCommand": "none",
            "RequestTTY": "no",
        }
        settings = [arg for name, value in options.items() for arg in ("-o", f"{name}={value}")]
        return ["ssh", "-M", "-N", "-f", *settings, *self._mux_args(), *self._target_args(), "--", self.profile.host]

    def _control_argv(self, operation: str, *extra: str) -> list[str]:
        return ["ssh", *self._mux_args(), *self._target_args(), "-O", operation, *extra, "--", self.profile.host]

    def _log(self, argv: Sequence[str], script: str = "") -> None:
        if self.verbose:
            print("+ " + shlex.join(argv), file=sys.stderr)
            if script:
                print("".join(f"  | {line}\n" for line in script.splitlines()), end="", file=sys.stderr)

    def _askpass_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for name in (
            ASKPASS_ACCOUNT_VARIABLE,
            ASKPASS_FILE_VARIABLE,
            ASKPASS_PROMPT_VARIABLE,
            ASKPASS_TTY_VARIABLE,
            ASKPASS_PROFILE_VARIABLE,
            ASKPASS_LOG_VARIABLE,
        ):
            env.pop(name, None)
        if self.profile.legacy_credentials:
            env[ASKPASS_FILE_VARIABLE] = self.profile.legacy_credentials
        elif self.profile.password_in_keyring:
            env[ASKPASS_ACCOUNT_VARIABLE] = self.profile.keyring_account
        if self.profile.legacy_credentials or self.profile.password_in_keyring:
            # ssh's own password prompt names the user and the host (or HostKeyAlias) as it resolved them; a
            # ProxyJump gateway's ssh inherits this environment and prompts for its own user and host.
            settings = self.ssh_settings()
            env[ASKPASS_PROMPT_VARIABLE] = (
                f"{settings['user']}@{settings.get('hostkeyalias') or settings['hostname']}'s password: "
            )
        # Even with a key alone the helper is needed: the master starts in a session of its own, without the
        # terminal, and a one-time code the server asks after the key reaches the user only through the helper.
        env[ASKPASS_PROFILE_VARIABLE] = self.profile.name
        terminal = _terminal_name()
        if terminal:
            env[ASKPASS_TTY_VARIABLE] = terminal
        env[ASKPASS_LOG_VARIABLE] = str(self._master_log_path())
        env["SSH_ASKPASS"] = self._askpass_helper()
        env["SSH_ASKPASS_REQUIRE"] = "force"
        return env

    def _askpass_helper(self) -> str:
        helper = _private_dir(control_dir()) / "askpass"
        module_dir = os.path.dirname(os.path.abspath(__file__))
        text = (
            f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {module_dir!r})\n"
            "import sl_forgery\nsys.exit(sl_forgery.askpass_main())\n"
        )
        try:
            with os.fdopen(_open_own_file(helper, os.O_RDONLY), encoding="utf-8") as current:
                unchanged = current.read() == text and not os.fstat(current.fileno()).st_mode & 0o077
        except FileNotFoundError:
            unchanged = False
        if not unchanged:
            write_private_file(helper, text, mode=0o700)
        return str(helper)

    def describe(self) -> str:
        profile = self.profile
        user = f"{profile.user}@" if profile.user else ""
        port = f":{profile.port}" if profile.port else ""
        return f"{user}{profile.host}{port}"

    # -- master ---------------------------------------------------------------------------------------------------

    def is_connected(self) -> bool:
        return _run(self._control_argv("check"), timeout=10, check=False).returncode == 0

    def connect(self) -> bool:
        """Start the master unless one is running; True when this call started it."""
        _private_dir(control_dir())
        socket_path = self.socket_path()
        # Commands started together (a shell loop with &) would each start a master, and every master but the last
        # would run on without a socket: one starts it while the others wait for the lock, then find it running.
        return run_exclusively(f"{socket_path}.lock", lambda: self._start_master(socket_path))

    def ensure_connected(self) -> None:
        if not self.is_connected():
            self.connect()

    def _start_master(self, socket_path: str) -> bool:
        if self.is_connected():
            return False
        # A master that died hard leaves its socket behind, and a new master will not listen where a file is.
        Path(socket_path).unlink(missing_ok=True)
        Path(f"{socket_path}.max-sessions").unlink(missing_ok=True)
        argv = self._master_argv()
        self._log(argv)
        log_path = self._master_log_path()
        with open(log_path, "w+", encoding="utf-8", errors="replace") as log:
            # The master keeps the stderr it is given; a pipe would make us wait for it to exit.
            try:
                result = _run(argv, timeout=self.timeout, env=self._askpass_env(), stdout=log, stderr=log, check=False)
            finally:
                log.seek(0)
                message = log.read()
        log_path.unlink(missing_ok=True)
        if result.returncode != 0:
            raise SSHError(argv, result.returncode, "", message, what=f"ssh to {self.describe()}")
        self.master_starts += 1
        if not self.profile.max_sessions:
            self._probe_session_limit()
        return True

    @staticmethod
    def _master_log_path() -> Path:
        return control_dir() / f"master-{os.getpid()}.log"

    def socket_path(self) -> str:
        """The ControlPath with its tokens expanded, as OpenSSH resolves it for this destination. Every call needs
        it (the session limit is kept beside the socket), and ``ssh -G`` costs as much as a call over the master,
        so the answer is kept in a private file named after the question: the ``ssh -G`` argv and the state of the
        ssh config files it reads (a changed file is a new question)."""
        if self._socket_path is None:
            import hashlib

            argv = ["ssh", "-G", *self._mux_args(), *self._target_args(), "--", self.profile.host]
            own = argv[argv.index("-F") + 1] if "-F" in argv else os.path.expanduser("~/.ssh/config")
            stamps = [(path, *_file_stamp(path)) for path in (own, *SSH_SYSTEM_CONFIGS)]
            question = repr((argv, stamps, os.uname().nodename)).encode()  # %C hashes the local host name too
            cache = control_dir() / f"controlpath-{hashlib.sha256(question).hexdigest()[:24]}"
            self._socket_path = _read_trusted_cache(cache)
            if not self._socket_path:
                self._socket_path = self.ssh_settings()["controlpath"]
                self._socket_path_to_keep = cache
        return self._socket_path

    def _keep_socket_path(self) -> None:
        """Keep the resolved ControlPath (see `socket_path`) once a call went through, so that a command that
        fails before it reaches the server leaves nothing behind."""
        if self._socket_path_to_keep is not None and self._socket_path:
            with contextlib.suppress(OSError, SlForgeryError):
                write_private_file(self._socket_path_to_keep, self._socket_path)
            self._socket_path_to_keep = None

    def ssh_settings(self) -> dict[str, str]:
        """The settings as OpenSSH resolves them for this destination (``ssh -G``), e.g. ``userknownhostsfile``."""
        argv = ["ssh", "-G", *self._mux_args(), *self._target_args(), "--", self.profile.host]
        result = _run(argv, timeout=10, error=SSHError, what="ssh -G")
        return dict(line.partition(" ")[::2] for line in result.stdout.splitlines())

    def disconnect(self) -> bool:
        if not self.is_connected():
            return False
        argv = self._control_argv("exit")
        self._log(argv)
        _run(argv, timeout=10, check=False)
        return True

    # -- sessions -------------------------------------------------------------------------------------------------

    def _limit_path(self) -> Path:
        return Path(f"{self.socket_path()}.max-sessions")

    def session_limit(self) -> int:
        """How many sessions the server allows on one connection: the profile's ``max_sessions``, else what was found
        out when the master started (kept beside its socket), else sshd's default."""
        if self.profile.max_sessions:
            return self.profile.max_sessions
        try:
            return int(self._limit_path().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return SSHD_DEFAULT_SESSIONS

    def _probe_session_limit(self) -> None:
        """Find out, once per master, whether the server allows a second session beside a first (sites that set
        MaxSessions 1 refuse it); the answer is kept beside the socket for every process using the master."""
        import subprocess

        argv = self._call_argv()
        holder = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
        )
        import threading

        # A login that never answers must not hold the master's start for ever.
        give_up = threading.Timer(self.timeout, holder.kill)
        give_up.start()
        try:
            assert holder.stdin is not None and holder.stdout is not None
            # Not framed: the session lasts until its stdin closes, so that it ends the moment the probe is done.
            holder.stdin.write(f"printf '%s\\n' {OUTPUT_MARKER} held\nexec cat >/dev/null\n".encode())
            holder.stdin.flush()
            for line in holder.stdout:  # login noise first, then the marker, then ours
                if line == b"held\n":
                    second = _run(argv, input_text=framed_script("true"), timeout=self.timeout, check=False)
                    limit = 1 if self._master_was_missing(second) else SSHD_DEFAULT_SESSIONS
                    break
            else:
                limit = 1  # the first session ended at once: the safest reading
        finally:
            give_up.cancel()
            holder.stdin.close()
            holder.wait()
        write_private_file(self._limit_path(), str(limit))

    @contextlib.contextmanager
    def _call_slot(self) -> Iterator[None]:
        """Where the server allows one session per connection, every call of every local process takes its turn
        (a lock beside the socket); elsewhere calls run side by side."""
        if self.session_limit() > 1:
            yield
            return
        import fcntl

        descriptor = _open_own_file(f"{self.socket_path()}.calls.lock", os.O_WRONLY | os.O_CREAT)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)

    def _refusal(self) -> str:
        limit = self.session_limit()
        allowed = "one session" if limit == 1 else f"{limit} sessions"
        return (
            f" (the server refused a new session; it allows {allowed} per connection: set max_sessions in the "
            "profile if that is wrong)"
        )

    # -- calls ----------------------------------------------------------------------------------------------------

    def run(
        self, script: str, *, check: bool = True, timeout: float | None = None, what: str = ""
    ) -> subprocess.CompletedProcess:
        """Run a remote shell script (POSIX sh, whatever the login shell) over the master and return its output;
        a non-zero exit raises `CommandError` (255: `SSHError`) unless ``check`` is false. The master is started or
        restarted if it is not there, and a session the server refused (too many at once) retried after a pause."""
        argv = self._call_argv()
        framed = framed_script(script)
        pauses = iter(REFUSED_SESSION_RETRY_DELAYS)
        restarted = False
        while True:
            self._log(argv, script)
            with self._call_slot():
                result = _run(argv, input_text=framed, timeout=timeout or self.timeout, check=False)
            if not self._master_was_missing(result):
                break
            if not restarted and self.connect():
                restarted = True  # there was no master: the call never reached the server, so run it again now
                continue
            # The master runs (started by a command beside this one, or refusing sessions): try again shortly.
            pause = next(pauses, None)
            if pause is None:
                what = f"ssh to {self.describe()}{self._refusal() if self.is_connected() else ''}"
                raise SSHError(argv, 255, result.stdout, result.stderr, what=what, script=script)
            time.sleep(pause * (0.5 + os.urandom(1)[0] / 255))  # jittered, so that refused commands spread out
        result.login_output = login_output(result.stdout)  # type: ignore[attr-defined]  # doctor reports it
        result.stdout = without_login_noise(result.stdout)
        if result.returncode != 255:
            self._keep_socket_path()
        if check and result.returncode != 0:
            error = SSHError if result.returncode == 255 else CommandError
            what = what or f"remote command on {self.describe()}"
            raise error(argv, result.returncode, result.stdout, result.stderr, what=what, script=script)
        return result

    @staticmethod
    def _master_was_missing(result: subprocess.CompletedProcess) -> bool:
        return result.returncode == 255 and any(marker in result.stderr for marker in NO_MASTER_MARKERS)

    def _reserve_lasting_session(self) -> int | None:
        """A descriptor holding one of the lasting-session lock files until it is closed; None when all are held.
        There are LASTING_SESSIONS of them, fewer where the server allows fewer sessions (none with one), so that
        short calls always find a session free."""
        import fcntl

        _private_dir(control_dir())
        socket_path = self.socket_path()
        for slot in range(min(LASTING_SESSIONS, self.session_limit() // 2)):
            descriptor = _open_own_file(f"{socket_path}.session-{slot}.lock", os.O_WRONLY | os.O_CREAT)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return descriptor
            except BlockingIOError:
                os.close(descriptor)
        return None

    @contextlib.contextmanager
    def lasting(self, script: str) -> Iterator[subprocess.Popen]:
        """A remote script that runs on (a watcher, a followed log) as a process whose stdout is a pipe, holding one
        of the LASTING_SESSIONS slots for as long as it runs, so that short calls always find a session free.
        Raises `SessionsBusy` when every slot is held. Its stderr is dropped: nothing reads it while it runs."""
        import subprocess

        self.ensure_connected()
        slot = self._reserve_lasting_session()
        if slot is None:
            if self.session_limit() < 2:
                raise SessionsBusy(f"{self.describe()} allows one session per connection, and short calls need it")
            raise SessionsBusy(
                f"{min(LASTING_SESSIONS, self.session_limit() // 2)} sl-forgery commands already follow or wait on "
                f"{self.describe()} from this machine (each holds a session of the shared connection)"
            )
        argv = self._call_argv()
        self._log(argv, script)
        process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            assert process.stdin is not None and process.stdout is not None
            try:
                process.stdin.write(framed_script(script).encode())
                process.stdin.close()
            except BrokenPipeError:
                pass  # ssh ended at once: the caller sees the end of its output
            # Skip the login noise up to the marker a byte at a time, so that none of the script's own output is
            # read ahead of the caller, who may select() on the pipe.
            seen, marker_line = b"", f"{OUTPUT_MARKER}\n".encode()
            while not seen.endswith(marker_line):
                byte = os.read(process.stdout.fileno(), 1)
                if not byte:
                    break
                seen += byte
            yield process
        finally:
            # Ctrl-C comes through here: an ssh that does not end on SIGTERM must not hold the command up.
            process.terminate()
            try:
                process.wait(timeout=LASTING_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            os.close(slot)

    @contextlib.contextmanager
    def _piped_call(self, argv: Sequence[str]) -> Iterator[subprocess.Popen]:
        """A call over the master with all three of its streams piped, in its turn where calls take turns."""
        import subprocess

        with (
            self._call_slot(),
            subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
            ) as process,
        ):
            yield process

    def stream(self, script: str, sink: Callable[[bytes], object], *, what: str = "") -> None:
        """Run a remote script and hand its output to ``sink`` in chunks as it comes, in constant memory (a log of
        any size); a non-zero exit raises as `run` does, with the end of its stderr."""

        self.ensure_connected()
        argv = self._call_argv()
        self._log(argv, script)
        with self._piped_call(argv) as process:
            assert process.stdin and process.stdout and process.stderr
            process.stdin.write(framed_script(script).encode())
            process.stdin.close()
            marker, pending = f"{OUTPUT_MARKER}\n".encode(), b""
            while chunk := process.stdout.read1(1 << 16):
                if marker is not None:
                    pending += chunk
                    position = pending.find(marker)
                    if position < 0:
                        continue
                    chunk, marker = pending[position + len(marker) :], None
                if chunk:
                    sink(chunk)
            stderr = process.stderr.read().decode(errors="replace")
            returncode = process.wait()
        if returncode != 0:
            error = SSHError if returncode == 255 else CommandError
            what = what or f"remote command on {self.describe()}"
            raise error(argv, returncode, "", stderr, what=what, script=script)

    def send(self, script: str, source: Any, *, what: str = "") -> None:
        """Run a remote script with the bytes of ``source`` (a binary file or pipe) as its stdin, streamed in
        constant memory: the script goes first, its length before it, read by a fixed command that every login shell
        parses and that reads no byte past it (``/bin/sh -s`` would read ahead into the data)."""
        import shutil

        self.ensure_connected()
        argv = [*self._call_argv()[:-1], REMOTE_SHELL_WITH_DATA]
        self._log(argv, script)
        framed = f"printf '%s\\n' {OUTPUT_MARKER}\n{script}\n".encode()
        with self._piped_call(argv) as process:
            assert process.stdin and process.stdout and process.stderr
            try:
                process.stdin.write(b"%d\n" % len(framed) + framed)
                shutil.copyfileobj(source, process.stdin)
            except BrokenPipeError:
                pass  # the script ended without reading it all: its exit code says why
            stdout, stderr = process.communicate()  # closes its stdin: the end of the data
        if process.returncode != 0:
            error = SSHError if process.returncode == 255 else CommandError
            what = what or f"remote command on {self.describe()}"
            stdout_text = without_login_noise(stdout.decode(errors="replace"))
            raise error(
                argv, process.returncode, stdout_text, stderr.decode(errors="replace"), what=what, script=script
            )

    # -- tunnels --------------------------------------------------------------------------------------------------

    def _forward_argv(self, operation: str, local_port: int, host: str, port: int) -> list[str]:
        return self._control_argv(operation, "-L", f"127.0.0.1:{local_port}:{host}:{port}")

    def forward(self, local_port: int, host: str, port: int) -> bool:
        """Forward 127.0.0.1:local_port to host:port over the running master; False when the local port is taken,
        `TunnelError` for any other refusal."""
        self.ensure_connected()
        argv = self._forward_argv("forward", local_port, host, port)
        self._log(argv)
        result = _run(argv, timeout=30, check=False)
        if result.returncode == 0:
            return True
        if "Address already in use" in result.stderr or "Port forwarding failed" in result.stderr:
            return False
        raise TunnelError(argv, result.returncode, result.stdout, result.stderr, what="ssh -O forward")

    def cancel_forward(self, local_port: int, host: str, port: int) -> bool:
        """Remove a forward made by `forward`; False when there was none (or no master)."""
        argv = self._forward_argv("cancel", local_port, host, port)
        self._log(argv)
        return _run(argv, timeout=30, check=False).returncode == 0

    def forward_free_port(self, host: str, port: int, preferred: int | None = None) -> int:
        """Forward a local port that is free now (``preferred`` if it still is) to host:port; returns it."""
        candidates = [preferred] if preferred else []
        for local_port in [*candidates, *(free_local_port() for _ in range(5))]:
            if self.forward(local_port, host, port):
                return local_port
        argv = self._forward_argv("forward", 0, host, port)
        raise TunnelError(argv, 255, "", "no free local port could be forwarded", what="ssh -O forward")

    # -- keys -----------------------------------------------------------------------------------------------------

    def accept_host_key(self) -> str:
        """Fetch the server's host key, record it in the known_hosts file ssh uses for it, and return its
        fingerprints. A different key already recorded for that host is never replaced."""
        settings = self.ssh_settings()
        host, port = settings["hostname"], settings["port"]
        known_hosts = Path(os.path.expanduser(settings["userknownhostsfile"].split()[0]))
        name = host if port == "22" else f"[{host}]:{port}"
        what = f"fetching the host key of {name}"
        scan_argv = ["ssh-keyscan", "-p", port, "-t", "ed25519,ecdsa,rsa", "--", host]
        scan = _run(scan_argv, timeout=30, check=False)
        keys = [line for line in scan.stdout.splitlines() if line.strip() and not line.startswith("#")]
        if not keys:
            raise SSHError(scan_argv, scan.returncode, scan.stdout, scan.stderr, what=what)
        keylines = "\n".join(keys) + "\n"
        fingerprints = _run(["ssh-keygen", "-lf", "-"], input_text=keylines, timeout=10, what=what).stdout
        if known_hosts.exists():
            lookup = ["ssh-keygen", "-F", name, "-f", str(known_hosts)]
            recorded = _run(lookup, timeout=10, check=False).stdout
            recorded_keys = {" ".join(line.split()[1:3]) for line in recorded.splitlines() if not line.startswith("#")}
            offered = {" ".join(line.split()[1:3]) for line in keys}
            if recorded_keys and not recorded_keys & offered:
                problem = f"{known_hosts} already holds a different host key for {name}"
                raise SSHError(scan_argv, 0, "", problem, what=f"accepting the host key of {name}")
            if recorded_keys & offered:
                return fingerprints
        known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(known_hosts, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(descriptor, "a", encoding="utf-8") as handle:
            handle.write(keylines)
        return fingerprints

    def prove_key_login(self, key: Path) -> None:
        """Log in on a connection of its own with ``key`` alone (no password, no agent, no other key) and check that
        the server accepted that very key; raise `SSHError` if not."""
        fingerprint = _run(["ssh-keygen", "-lf", f"{key}.pub"], timeout=10, what="ssh-keygen").stdout.split()[1]
        options = {
            "ControlPath": "none",
            "BatchMode": "yes",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            "IdentitiesOnly": "yes",
            "IdentityAgent": "none",
        }
        settings = [arg for name, value in options.items() for arg in ("-o", f"{name}={value}")]
        argv = ["ssh", "-v", *settings, *self._target_args(identity=False), "-i", str(key), "--", self.profile.host]
        result = _run([*argv, "true"], timeout=60, error=SSHError, what="logging in with the new key")
        if f"Server accepts key: {key}" not in result.stderr and fingerprint not in result.stderr:
            raise SSHError(argv, 0, "", f"the server did not accept {key} itself", what="logging in with the new key")

    # -- other programs riding the master -------------------------------------------------------------------------

    def remote_shell_argv(self) -> list[str]:
        """An ssh command without its destination that rides the master and nothing else: rsync's --rsh (rsync adds
        the host and its own remote command)."""
        return ["ssh", *self._guard_args(), *self._mux_args(), *self._target_args(), "-T"]

    def proxy_argv(self) -> list[str]:
        """A ProxyCommand that opens a channel to ``%h:%p`` through the running master: no new login. The socket
        is named by its resolved path, since ssh expands the ``%`` tokens of a ProxyCommand for the other host."""
        argv = ["ssh", *self._guard_args(), "-S", self.socket_path(), *self._target_args()]
        return [arg.replace("%", "%%") for arg in argv] + ["-W", "%h:%p", "--", self.profile.host.replace("%", "%%")]

    def interactive(self, command: str) -> int:
        """Run a remote command on a terminal of its own (``ssh -tt``), wired to this terminal; its exit code."""
        import subprocess

        self.ensure_connected()
        argv = ["ssh", *self._guard_args(), *self._mux_args(), *self._target_args(), "-tt", "--"]
        argv += [self.profile.host, command]
        self._log(argv)
        return subprocess.run(argv).returncode

    def rsync(self, local: str, remote: str, *, upload: bool, **options: bool) -> list[str]:
        """Copy with rsync through the master (see `rsync_argv` for ``options``): a local directory's contents (or a
        file) into the remote directory ``remote``, or with ``upload`` false the other way; returns the files it
        copied (or, with ``dry_run``, would copy). A failure raises `CommandError` with rsync's stderr."""
        remote_spec = f"{self.profile.host}:{remote}"
        if upload:
            source, destination = sync_paths(local, remote_spec)
            if os.path.isfile(local):
                source = local
        else:
            source, destination = sync_paths(remote_spec, local)
        argv = rsync_argv(self.remote_shell_argv(), source, destination, **options)
        self.ensure_connected()
        self._log(argv)
        result = _run(argv, timeout=None, what="rsync")
        return [line for line in result.stdout.splitlines() if line and not line.endswith("/")]

    def probe_host(self, ssh_config: Path, alias: str) -> subprocess.CompletedProcess:
        """Log in to a Host entry of an ssh config file without any prompt, as an editor would, and run ``true``."""
        argv = ["ssh", "-F", str(ssh_config), "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "--", alias, "true"]
        self._log(argv)
        return _run(argv, timeout=60, check=False)


# ======================================================================================================================
# SLURM API
# ======================================================================================================================


def _job_ids(ids: object) -> list[str]:
    if isinstance(ids, (str, int)):
        ids = [ids]
    return [normalize_job_id(getattr(job_id, "job_id", job_id)) for job_id in ids]  # type: ignore[union-attr]


class Server:
    """A SLURM cluster reached over one reused OpenSSH connection.

    ``Server(credentials_path=...)`` reads an original ``server_credentials.yaml``; ``Server.from_profile(name)``
    uses a profile from the servers file.
    """

    def __init__(
        self,
        credentials_path: str | os.PathLike[str] | None = None,
        *,
        profile: Profile | None = None,
        config: Config | None = None,
        verbose: bool = False,
        timeout: float = DEFAULT_CALL_TIMEOUT,
    ) -> None:
        if profile is None:
            if credentials_path is None:
                raise UsageError("Server needs a credentials_path or a profile (see Server.from_profile)")
            profile = profile_from_legacy(Path(credentials_path))
        self.profile = profile
        self.config = config  # the servers file the profile came from, saved when the profile changes
        self.connection = SSHConnection(profile, timeout=timeout, verbose=verbose)
        self.scheduler_queries = 0
        self.scheduler_failures = 0  # scheduler queries that found the controller too busy to answer
        self._final: dict[str, JobInfo] = {}
        self._live: dict[str, JobInfo] = {}

    @classmethod
    def from_profile(cls, name: str | None = None, *, config: Config | None = None, verbose: bool = False) -> Server:
        config = config or load_config()
        return cls(profile=config.profile(name), config=config, verbose=verbose)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Forget this object's state; the shared master stays for ControlPersist so the next command reuses it."""
        self._final.clear()

    # -- connection -------------------------------------------------------------------------------------------------

    @property
    def destination(self) -> str:
        """``user@host:port`` as this server is reached."""
        return self.connection.describe()

    def connect(self) -> bool:
        """Open the shared connection now (asking for a password or second factor once); False if it was open."""
        return self.connection.connect()

    def disconnect(self) -> bool:
        """Close the shared connection; False if there was none."""
        return self.connection.disconnect()

    def run(self, script: str, *, check: bool = True, what: str = "") -> subprocess.CompletedProcess:
        """Run a POSIX sh script on the login node over the shared connection."""
        return self.connection.run(script, check=check, what=what)

    def accept_host_key(self) -> str:
        """Record the server's host key in known_hosts (never replacing a different one); returns its fingerprints."""
        return self.connection.accept_host_key()

    def setup_key(self, key: str | os.PathLike[str] | None = None) -> tuple[Path, bool]:
        """Make key login work: create an ed25519 key without a passphrase if ``key`` (default: the profile's, else
        ~/.ssh/id_ed25519) does not exist, install its public half on the server, prove a login with that key alone,
        then use it in the profile and forget the keyring password unless another profile still needs it. Returns
        (the key, whether it was created)."""
        path = Path(os.path.expanduser(key or self.profile.identity_file or "~/.ssh/id_ed25519"))
        if path.exists() and not Path(f"{path}.pub").is_file():
            raise UsageError(
                f"{path} has no public key {path}.pub beside it; recreate it with "
                f"'ssh-keygen -y -f {path} > {path}.pub'"
            )
        created = not path.exists()
        if created:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # an existing key directory stays as it is
            comment = f"{self.profile.user or APP_NAME}@{APP_NAME}"
            keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]
            _run(keygen, timeout=30, what="ssh-keygen")
        quoted = shlex.quote(Path(f"{path}.pub").read_text(encoding="utf-8").strip())
        self.run(
            "umask 077 && mkdir -p ~/.ssh && touch ~/.ssh/authorized_keys && "
            f"{{ grep -qxF {quoted} ~/.ssh/authorized_keys || printf '%s\\n' {quoted} >> ~/.ssh/authorized_keys; }}",
            what="installing the public key",
        )
        self.connection.prove_key_login(path)
        account = self.profile.keyring_account
        self.profile.identity_file = str(path)
        had_password, self.profile.password_in_keyring = self.profile.password_in_keyring, False
        shared = bool(self.config and profiles_sharing_password(self.config, self.profile))
        if self.config is not None:
            self.config.servers[self.profile.name] = self.profile
            self.config.save()
        if had_password and not shared:
            delete_password(account)
        return path, created

    # -- roots of the original API ---------------------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.profile.host

    @property
    def user(self) -> str:
        return self.profile.user or ""

    def _root(self, root: str | None, leaf: str | None, what: str) -> PurePosixPath:
        if not root or not leaf:
            raise ConfigError(f"server {self.profile.name!r} has no {what}; set it in its profile")
        return PurePosixPath(root, leaf)

    @property
    def raw_data_root(self) -> PurePosixPath:
        return self._root(
            self.profile.storage_root, self.profile.shared_directory_name, "storage_root/shared_directory_name"
        )

    @property
    def processed_data_root(self) -> PurePosixPath:
        return self._root(
            self.profile.working_root, self.profile.shared_directory_name, "working_root/shared_directory_name"
        )

    @property
    def user_data_root(self) -> PurePosixPath:
        return self._root(self.profile.storage_root, self.profile.user, "storage_root")

    @property
    def user_working_root(self) -> PurePosixPath:
        return self._root(self.profile.working_root, self.profile.user, "working_root")

    # -- where jobs run ---------------------------------------------------------------------------------------------

    def _homes_path(self) -> Path:
        return state_dir() / "homes.json"

    def _remembered_homes(self) -> dict[str, Any]:
        """The remote homes remembered on this machine, from a file that must be this user's own (a file another
        user planted, or reached through a link, is not trusted: it would decide where jobs run)."""
        import json

        try:
            descriptor = _open_own_file(self._homes_path(), os.O_RDONLY)
        except (OSError, ConfigError):
            return {}
        with os.fdopen(descriptor, "rb") as handle:
            try:
                homes = json.loads(handle.read().decode("utf-8", errors="replace"))
            except ValueError:
                return {}
        return homes if isinstance(homes, dict) else {}

    def known_home(self) -> str | None:
        """The remote home directory as remembered on this machine, without asking the server."""
        home = self._remembered_homes().get(self.destination)
        return home if isinstance(home, str) and home.startswith("/") else None

    def remote_home(self) -> str:
        """The user's home directory on the server, asked once and remembered on this machine."""
        import json

        home = self.known_home()
        if home is None:
            home = self.run('printf %s "$HOME"', what="reading $HOME").stdout
            if not home.startswith("/"):
                raise SSHError(["printf", "$HOME"], 0, home, "the server did not report an absolute home directory")
            homes = {**self._remembered_homes(), self.destination: home}
            _private_dir(state_dir())
            write_private_file(self._homes_path(), json.dumps(homes))
        return home

    def job_layout(
        self, values: Mapping[str, Any], default_name: str, home: str | None = None
    ) -> tuple[list[str], dict[str, Any]]:
        """A job made here from `Job` keywords (None: not given): its name, output log, error log and working
        directory, in that order, and its other keywords. It is called ``default_name`` unless ``values`` name it,
        and runs in a new job directory (`job_directory`, under ``home`` if given) unless they give one, with the
        profile's partition and account where they give none."""
        values = {key: value for key, value in values.items() if value is not None}
        name = values.pop("job_name", None) or default_name
        directory = values.pop("working_directory", None) or self.job_directory(name, home)
        for field in ("partition", "account"):
            values[field] = choose(values.get(field), self.profile, field)
        return [name, f"{directory}/output.log", f"{directory}/error.log", directory], values

    def job_directory(self, job_name: str, home: str | None = None) -> str:
        """A new directory for a job made from the command line: under the profile's working root (and user), else
        under the remote home (``home``, else asked once)."""
        profile = self.profile
        if profile.working_root:
            return default_job_directory(job_name, profile.working_root, profile.user, "")
        return default_job_directory(job_name, None, None, home or self.remote_home())

    def profile_defaults(self) -> dict[str, str]:
        """The profile's job defaults that a command-line value overrides (see `choose`)."""
        return {"partition": self.profile.partition, "account": self.profile.account}

    def plan_job(self, job: Job) -> SubmissionPlan:
        """What submitting ``job`` will do (see `SubmissionPlan`)."""
        return plan_job(job, self.profile.name, self.user)

    def plan_script(
        self,
        script: str,
        *,
        default_name: str = "script",
        job_name: str | None = None,
        working_directory: str | None = None,
        sbatch_args: Sequence[str] = (),
        home: str | None = None,
    ) -> SubmissionPlan:
        """What submitting a user's own script will do (see `plan_script`); ``home`` stands in for the remote home
        where the server must not be asked (a dry run)."""
        return plan_script(
            script,
            default_name=default_name,
            default_directory=lambda name: self.job_directory(name, home),
            home=lambda: home or self.remote_home(),
            job_name=job_name,
            working_directory=working_directory,
            sbatch_args=sbatch_args,
            defaults=self.profile_defaults(),
            server=self.profile.name,
            user=self.user,
        )

    # -- submission -------------------------------------------------------------------------------------------------

    def submit_plan(self, plan: SubmissionPlan) -> str:
        """Carry out a plan in one round trip (directories, script, sbatch) and remember the job; returns its id.

        Exactly once: when the connection is lost on the way, the job is looked for (`submission_lookup_command`)
        before the plan is carried out again, only if it never reached sbatch."""
        what = f"preparing {plan.record.working_directory}"
        try:
            result = self.run(submit_command(plan), what=what)
        except SSHError as lost:
            found = self.run(submission_lookup_command(plan), what=f"looking for the job of {plan.script_path}")
            if found.stdout.strip() == "@@ none":
                result = self.run(submit_command(plan), what=what)
            elif found.stdout.rstrip().endswith("@@ unknown"):
                job_ids = found.stdout.split()[:-2]
                if len(job_ids) != 1:
                    raise SlForgeryError(
                        f"the connection was lost while sbatch ran ({lost.summary}) and no job running "
                        f"{plan.script_path} can be found; see 'squeue --me' before submitting again"
                    ) from None
                found.stdout = f"{job_ids[0]}\n@@ 0\n"
                result = found
            else:
                result = found
        try:
            sbatch_stdout, sbatch_rc = parse_submit_output(result.stdout)
            if sbatch_rc != 0:
                raise SlurmError(plan.sbatch_argv, sbatch_rc, sbatch_stdout, result.stderr, what="sbatch")
            job_id = parse_sbatch_id(sbatch_stdout)
        except ValueError as problem:
            raise SlurmError(plan.sbatch_argv, 0, result.stdout, f"{result.stderr}\n{problem}", what="sbatch") from None
        record_job(plan.record._replace(job_id=job_id, submitted=time.time()))
        return job_id

    def submit_job(self, job: Job) -> Job:
        """Upload the job's script into its working directory and sbatch it, in one round trip; sets ``job.job_id``."""
        if job.job_id is not None:
            raise UsageError(
                f"job {job.job_name!r} was already submitted as {job.job_id}; create a new Job to run it again"
            )
        job.job_id = self.submit_plan(self.plan_job(job))
        return job

    def submit_script(
        self,
        script: str,
        *,
        working_directory: str | None = None,
        sbatch_args: Sequence[str] = (),
        job_name: str | None = None,
        output_log: str | None = None,
        error_log: str | None = None,
    ) -> str:
        """Submit a user's own script; its ``#SBATCH`` lines hold unless ``sbatch_args`` override them."""
        logs = [f"--output={output_log}"] * bool(output_log) + [f"--error={error_log}"] * bool(error_log)
        plan = self.plan_script(
            script, job_name=job_name, working_directory=working_directory, sbatch_args=[*sbatch_args, *logs]
        )
        return self.submit_plan(plan)

    # -- status -----------------------------------------------------------------------------------------------------

    @staticmethod
    def _record_nonces(job_ids: Sequence[str], records: Mapping[str, JobRecord]) -> dict[str, str]:
        """The nonce each exit record of the jobs submitted from here must carry (each task's, for an array); jobs
        whose records carry none (submitted by an older version) are left out: their records are not trusted."""
        return {
            task_id: records[job_id].nonce
            for job_id in job_ids
            if job_id in records and records[job_id].nonce
            for task_id in records[job_id].task_ids
        }

    def _record_paths(self, job_ids: Sequence[str], records: Mapping[str, JobRecord]) -> dict[str, str]:
        """Where the jobs submitted from here (each task, for an array) write their exit records."""
        return {
            task_id: exit_record_path(records[job_id].working_directory, task_id)
            for job_id in job_ids
            if job_id in records and records[job_id].nonce
            for task_id in records[job_id].task_ids
        }

    def job_info(self, job_ids: object) -> dict[str, JobInfo]:
        """What the scheduler says of any number of jobs, in one round trip; final states are kept (here and in
        the ended jobs file) once `end_settled`, and then cost no round trip."""
        ids = _job_ids(job_ids)
        wanted = [job_id for job_id in ids if job_id not in self._final]
        records = load_job_records(self.profile.name) if wanted else {}
        if wanted:
            self._final.update(load_ended(self.profile.name, records))
            wanted = [job_id for job_id in wanted if job_id not in self._final]
        if wanted:
            command = status_query_command(wanted, self._record_paths(wanted, records))
            result = self.run(command, what="squeue/sacct")
            self.scheduler_queries += 1
            squeue_out, squeue_rc, sacct_out, sacct_rc, records_out = parse_status_query(result.stdout)
            if squeue_rc != 0 and "Invalid job id" not in squeue_out:
                busy = squeue_rc == 124 or any(marker in squeue_out for marker in SCHEDULER_BUSY_MARKERS)
                raise (SchedulerBusy if busy else SlurmError)(["squeue"], squeue_rc, "", squeue_out, what="squeue")
            squeue_rows = parse_squeue(squeue_out) if squeue_rc == 0 else {}
            sacct_rows = parse_sacct(sacct_out) if sacct_rc == 0 else None
            fresh_since = time.time() - RECENT_SUBMISSION_GRACE
            recent = frozenset(
                job_id for job_id in wanted if job_id in records and records[job_id].submitted > fresh_since
            )
            exit_records = parse_exit_records(records_out, self._record_nonces(wanted, records))
            tasks = {job_id: records[job_id].task_ids for job_id in wanted if job_id in records}
            merged = merge_job_info(wanted, squeue_rows, sacct_rows, exit_records, recent, tasks)
            newly_ended: list[tuple[JobRecord, JobInfo]] = []
            for job_id, info in merged.items():
                if job_id in records and info.name in ("", "allocation"):
                    # Just after a job ends, sacct may name it "allocation"; the name it was given is known here.
                    info = info._replace(name=records[job_id].name)
                if end_settled(job_id, info, squeue_rows):
                    self._final[job_id] = info
                    if job_id in records:
                        newly_ended.append((records[job_id], info))
                self._live[job_id] = info
            remember_ended(self.profile.name, newly_ended)
        return {job_id: self._final.get(job_id) or self._live[job_id] for job_id in ids}

    def get_job_status(self, job_id: object) -> JobStatus:
        """The state of one job, as a `JobStatus` (see `coarse_status`; `job_info` has the exact one)."""
        return coarse_status(next(iter(self.job_info([job_id]).values())).status)

    def get_job_statuses(self, job_ids: object) -> dict[str, JobStatus]:
        """The states of any number of jobs, in one round trip, as `get_job_status` reports them."""
        return {job_id: coarse_status(info.status) for job_id, info in self.job_info(job_ids).items()}

    def job_complete(self, job: Job | str | int) -> bool:
        """True once the job has ended, whatever the outcome."""
        return self.get_job_status(getattr(job, "job_id", job)).is_finished

    # -- waiting ----------------------------------------------------------------------------------------------------

    def wait(
        self,
        job_ids: object,
        timeout: float | None = None,
        on_change: Callable[[JobInfo], None] | None = None,
        poll_first: float = SCHEDULER_POLL_FIRST,
        poll_max: float = SCHEDULER_POLL_MAX,
        cancel_impossible: bool = False,
    ) -> dict[str, JobInfo]:
        """Block until every job has ended; returns their final `JobInfo`.

        The end of a job is noticed from its exit record by one remote watcher (no scheduler query); the scheduler
        is asked, for all jobs at once, when `WaitSchedule` says so, for ends no record shows (cancelled while
        pending, node failure) and to confirm each final state. Its answers are shared with every other wait of this
        server on this machine (`shared_answer`), so that together they ask it about once per ``poll_first`` seconds
        (10 at most) however many they are. A scheduler that does not answer is asked again
        for SCHEDULER_GRACE seconds before `SchedulerUnreachable`; a job that can never start (`never_starts`)
        raises `JobCannotStart`, after cancelling it when ``cancel_impossible``.
        """
        ids = _job_ids(job_ids)
        records = load_job_records(self.profile.name)
        record_paths = self._record_paths(ids, records)
        nonces = self._record_nonces(ids, records)
        tasks = {job_id: frozenset(records[job_id].task_ids) for job_id in ids if job_id in records}
        watched = frozenset(job_id for job_id in ids if job_id in records and records[job_id].nonce)
        schedule = WaitSchedule(time.monotonic(), poll_first, poll_max)
        progress = WaitProgress(ids, tasks, schedule, timeout, watched)
        watching = contextlib.ExitStack()

        def start_watcher() -> subprocess.Popen | None:
            """A watcher of the records not seen yet (the last one, if any, is ended first); None when there is
            nothing to watch or no lasting session to spare (the scheduler alone then tells when the jobs end)."""
            watching.close()
            unseen = {job_id: path for job_id, path in record_paths.items() if job_id not in progress.recorded}
            if not unseen:
                return None
            try:
                return watching.enter_context(self.connection.lasting(watcher_command(unseen, nonces)))
            except (SessionsBusy, SSHError):
                return None

        with watching:
            return self._wait_loop(progress, start_watcher, on_change, nonces, cancel_impossible, record_paths)

    def _ask_scheduler(
        self, progress: WaitProgress, on_change: Callable[[JobInfo], None] | None, cancel_impossible: bool
    ) -> bool:
        """One scheduler query for the jobs still waited for; True once every job has ended. A busy controller is
        ridden out (see `WaitProgress.scheduler_silent`); an unknown job or one that can never start raises."""
        schedule = progress.schedule
        newer_than = 0.0 if schedule.fresh_after is None else time.time() - (time.monotonic() - schedule.fresh_after)
        max_age = min(schedule.first, SCHEDULER_POLL_FIRST)
        try:
            board = Path(self.connection.socket_path()).name  # one board per server, however it is named here
            infos, answered = shared_answer(board, progress.unfinished(), self.job_info, max_age, newer_than)
        except SchedulerBusy as busy:
            self.scheduler_failures += 1
            progress.scheduler_silent(busy, time.monotonic())
            return False
        now = time.monotonic()
        for info in progress.update(infos, now, answered_at=now - max(0.0, time.time() - answered)):
            if on_change:
                on_change(info)
        if progress.done():
            return True
        progress.check_known(self.profile.name)
        self._stop_never_starting(progress, cancel_impossible)
        return False

    def _stop_never_starting(self, progress: WaitProgress, cancel: bool) -> None:
        """Raise `JobCannotStart` for jobs pending for a reason that never clears, cancelling them if asked."""
        stuck = progress.never_starting()
        if not stuck:
            return
        ids = [info.job_id for info in stuck]
        if cancel:
            self.cancel(ids)
        reasons = "; ".join(
            f"{info.job_id} ({info.reason}): {NEVER_START_REASONS[info.reason.split(',')[0].strip()]}" for info in stuck
        )
        outcome = (
            "it was cancelled (--cancel-impossible)"
            if cancel
            else f"it stays pending: 'sl-forgery cancel {' '.join(ids)}' removes it"
        )
        raise JobCannotStart(f"{'jobs' if len(ids) > 1 else 'job'} can never start as submitted, {reasons}; {outcome}")

    def _wait_loop(
        self,
        progress: WaitProgress,
        start_watcher: Callable[[], subprocess.Popen | None],
        on_change: Callable[[JobInfo], None] | None,
        nonces: Mapping[str, str] | None = None,
        cancel_impossible: bool = False,
        record_paths: Mapping[str, str] | None = None,
    ) -> dict[str, JobInfo]:
        """The I/O half of `wait`: ask the scheduler when the schedule says, read the watcher in between. A
        watcher that ends before its records came (the connection was lost and its master restarted) is started
        again over the new master, at most every WATCHER_RESTART_PAUSE seconds. Without one (no session to spare:
        a server that allows one session) the records are looked for every RECORD_POLL_SECONDS instead."""
        import select

        watcher = start_watcher()
        watcher_started, watcher_ended = time.monotonic(), False
        buffer = ""
        notice = self._cancel_notice()
        while True:
            now = time.monotonic()
            if self._cancel_notice() != notice:
                notice = self._cancel_notice()
                progress.schedule.ask_now(now)  # a job may have been cancelled from here
            if progress.schedule.due(now) and self._ask_scheduler(progress, on_change, cancel_impossible):
                return progress.result()
            progress.check_deadline(time.monotonic())
            if progress.done():  # the deadline came while ended jobs only waited for their exit codes
                return progress.result()
            pause = min(progress.pause(time.monotonic()), CANCEL_NOTICE_CHECK)
            if watcher is None:
                time.sleep(min(pause, RECORD_POLL_SECONDS) if record_paths else pause)
                if record_paths and not progress.schedule.due(time.monotonic()):
                    records = parse_exit_records(self.run(exit_records_command(record_paths)).stdout, nonces)
                    progress.records_arrived(records, time.monotonic())
                continue
            if watcher_ended:
                if time.monotonic() - watcher_started < WATCHER_RESTART_PAUSE:
                    time.sleep(pause)
                    continue
                watcher, watcher_started, watcher_ended, buffer = start_watcher(), time.monotonic(), False, ""
                if watcher is not None:
                    # Its connection was lost: the end may have come meanwhile, so ask the scheduler now too.
                    progress.schedule.ask_now(time.monotonic())
                continue
            ready, _, _ = select.select([watcher.stdout], [], [], pause)
            if not ready:
                continue
            chunk = os.read(watcher.stdout.fileno(), 4096).decode(errors="replace")
            if not chunk:  # every record seen (no new watcher is needed then), or the connection was lost
                watcher_ended = True
                continue
            *lines, buffer = (buffer + chunk).split("\n")
            progress.records_arrived(parse_exit_records("\n".join(lines), nonces), time.monotonic())

    # -- control ----------------------------------------------------------------------------------------------------

    def cancel(self, job_ids: object) -> list[str]:
        """Cancel jobs (pending or running) in one scancel call; returns the ids of those that had already ended.
        A job SLURM does not know, or will not let this user cancel, raises `SlurmError`."""
        ids = _job_ids(job_ids)
        if not ids:
            return []
        # Without -v, scancel says nothing and exits 0 for a job that has ended or never existed.
        argv = ["scancel", "-v", "--", *ids]
        result = self.run(shlex.join(argv), check=False)
        refusals = parse_scancel_refusals(result.stderr)
        ended = [job_id for job_id, reason in refusals.items() if reason == SCANCEL_ALREADY_ENDED]
        if result.returncode != 0 or len(refusals) > len(ended):
            raise SlurmError(argv, result.returncode, result.stdout, result.stderr, what="scancel")
        # Waits on this server from this machine see the notice change and ask the scheduler at once; a pending
        # job writes no exit record to tell them.
        with contextlib.suppress(SlForgeryError):
            write_private_file(self._cancel_notice_path(), " ".join(ids) + "\n")
        return ended

    def _cancel_notice_path(self) -> Path:
        return control_dir() / f"cancelled-{self.profile.name}"

    def _cancel_notice(self) -> tuple[int, int] | None:
        """Which cancel notice is the last (see `cancel`), to tell when a new one comes."""
        try:
            info = os.stat(self._cancel_notice_path())
        except OSError:
            return None
        return info.st_ino, info.st_mtime_ns

    def abort_job(self, job: Job | str | int) -> None:
        self.cancel([getattr(job, "job_id", job)])

    def queue(self) -> list[JobInfo]:
        """The user's own jobs in the queue."""
        result = self.run(f"squeue -h --me -o {shlex.quote(SQUEUE_FORMAT)}", what="squeue")
        self.scheduler_queries += 1
        return list(parse_squeue(result.stdout).values())

    # -- logs -------------------------------------------------------------------------------------------------------

    def job_record(self, job_id: str | int) -> JobRecord:
        """What this machine remembers of a job it submitted to this server."""
        job_id = normalize_job_id(job_id)
        record = load_job_records(self.profile.name).get(job_id)
        if record is None:
            raise UsageError(
                f"job {job_id} was not submitted from this machine to {self.profile.name!r}; "
                "its log paths are unknown (see 'sl-forgery history')"
            )
        return record

    def write_log(
        self, job_id: str | int, sink: Callable[[bytes], object], *, error: bool = False, lines: int | None = None
    ) -> None:
        """Stream a job's output (or error) log to ``sink`` in constant memory, all of it or its last ``lines``;
        a log the job has not written (yet) raises `SlForgeryError` saying which, with the job's state."""
        record = self.job_record(job_id)
        path = record.log_path(error=error)
        quoted = shlex.quote(path)
        command = f"tail -n {int(lines)} -- {quoted}" if lines is not None else f"cat -- {quoted}"
        try:
            self.connection.stream(f"[ -e {quoted} ] || exit 66\n{command}", sink, what=f"reading {path}")
        except CommandError as failure:
            if failure.returncode != 66:
                raise
            state = self.get_job_status(record.job_id)
            if state.is_finished:
                raise SlForgeryError(f"job {record.job_id} ({state}) ended without writing {path}") from None
            raise SlForgeryError(
                f"job {record.job_id} ({state}) has not written {path} yet; 'sl-forgery logs --follow "
                f"{record.job_id}' shows it as it comes"
            ) from None

    def follow_log(
        self, job_id: str | int, sink: Callable[[bytes], object], *, error: bool = False
    ) -> dict[str, JobInfo]:
        """Stream a job's log to ``sink`` as it grows until the job ends (then what it wrote last); returns its
        final `JobInfo` as `wait` does. Holds one lasting session for the log."""
        import threading

        record = self.job_record(job_id)
        tail = f"exec tail -n +1 -F -- {shlex.quote(record.log_path(error=error))} 2>/dev/null"
        with self.connection.lasting(tail) as process:

            def pump() -> None:
                assert process.stdout is not None
                while chunk := process.stdout.read1(1 << 16):
                    sink(chunk)

            thread = threading.Thread(target=pump, daemon=True)
            thread.start()
            infos = self.wait([record.job_id])
            thread.join(timeout=LOG_SETTLE_SECONDS)  # what the job wrote last reaches tail within a second or so
        return infos

    def read_file(self, path: str, tail_lines: int | None = None) -> str:
        quoted = shlex.quote(path)
        command = f"tail -n {int(tail_lines)} -- {quoted}" if tail_lines else f"cat -- {quoted}"
        return self.run(command, what=f"reading {path}").stdout

    def log_tail(self, path: str, lines: int = 15) -> str:
        """The last lines of a log, or nothing when the job never wrote it."""
        try:
            return self.read_file(path, tail_lines=lines)
        except CommandError as error:
            if isinstance(error, SSHError):
                raise
            return ""

    # -- checks -----------------------------------------------------------------------------------------------------

    def checks(self) -> list[list[str]]:
        """Rows of (check, ok/FAIL, detail, fix) for the connection and what jobs need on the server: SLURM,
        accounting (off is fine), the module system and the environment manager the profile uses (none needed when
        it uses none)."""
        started = time.monotonic()
        try:
            self.connection.ensure_connected()
        except SSHError as error:
            not_checked = [NOT_CHECKED, "not checked: no connection", ""]
            skipped = [[name, *not_checked] for name in SERVER_CHECK_NAMES]
            fix = "check the host, port and user; 'ssh' to it by hand; start its sshd"
            return [["connection", "FAIL", error.summary, fix], *skipped]
        elapsed = time.monotonic() - started
        rows = [["connection", "ok", f"{self.destination} ({elapsed:.2f} s)", ""]]
        checks = (_login_check, _login_output_check, _slurm_check, _accounting_check, _module_check, _environment_check)
        return rows + [check(self) for check in checks]

    # -- Jupyter ----------------------------------------------------------------------------------------------------

    def launch_jupyter_server(
        self,
        job_name: str,
        conda_environment: str,
        notebook_directory: str | os.PathLike[str],
        cpus_to_use: int = JUPYTER_DEFAULTS["cpus_to_use"],
        ram_gb: float = JUPYTER_DEFAULTS["ram_gb"],
        time_limit: int = JUPYTER_DEFAULTS["time_limit"],
        port: int = 0,
        jupyter_args: str = "",
        *,
        partition: str | None = None,
        wait_timeout: float | None = None,
        on_change: Callable[[JobInfo], None] | None = None,
        setup: Sequence[str] = (),
        env_manager: str | None = None,
    ) -> JupyterJob:
        """Run Jupyter Lab as a job, wait until it answers through a tunnel to a free local port, and return the job
        with its ``url``. If it cannot start (no jupyterlab in the environment, the job fails, or it is still
        pending after ``wait_timeout`` seconds) the job is cancelled and the error raised names the cause."""
        job = self.build_jupyter_job(
            job_name,
            conda_environment,
            notebook_directory,
            cpus_to_use=cpus_to_use,
            ram_gb=ram_gb,
            time_limit=time_limit,
            port=port,
            jupyter_args=jupyter_args,
            partition=partition,
            setup=setup,
            env_manager=env_manager,
        )
        return self.start_jupyter(job, wait_timeout=wait_timeout, on_change=on_change)

    def start_jupyter(
        self,
        job: JupyterJob,
        *,
        wait_timeout: float | None = None,
        on_change: Callable[[JobInfo], None] | None = None,
    ) -> JupyterJob:
        """Submit a job from `build_jupyter_job` and see it through as `launch_jupyter_server` does."""
        self.submit_job(job)
        try:
            self._await_jupyter(job, wait_timeout, on_change)
            self.connect_jupyter(job)
        except BaseException:
            self.cancel([job.job_id])
            raise
        return job

    def build_jupyter_job(
        self, job_name: str, conda_environment: str, notebook_directory: str | os.PathLike[str], **options: Any
    ) -> JupyterJob:
        """The job `launch_jupyter_server` submits. ``options``: `JupyterJob` and `Job` keywords (resources, ``port``,
        ``jupyter_args``, ``setup`` after the profile's own; unset ones take JUPYTER_DEFAULTS and the profile's
        partition, account and env_manager), and
        ``working_directory`` (default: a new job directory, under ``home`` if given, where the server must not be
        asked)."""
        home = options.pop("home", None)
        leading, options = self.job_layout({"job_name": job_name, **options}, job_name, home)
        options["env_manager"] = choose(options.get("env_manager"), self.profile, "env_manager")
        options["setup"] = [*self.profile.setup, *options.get("setup", ())]
        return JupyterJob(
            *leading,
            conda_environment,
            os.fspath(notebook_directory),
            **{**JUPYTER_DEFAULTS, **options},
        )

    def _await_jupyter(
        self, job: JupyterJob, wait_timeout: float | None, on_change: Callable[[JobInfo], None] | None
    ) -> None:
        """Wait for Jupyter's runtime file, read it over the master and remove it (it holds the token)."""
        runtime = shlex.quote(job.runtime_directory)
        # Printed, not removed, until it reads whole: Jupyter may be writing it still.
        read = f'for f in {runtime}/{JUPYTER_RUNTIME_GLOB}.json; do [ -f "$f" ] && echo found && cat "$f"; break; done'
        read += "; true"
        deadline = None if wait_timeout is None else time.monotonic() + wait_timeout
        last: JobInfo | None = None
        next_status = 0.0
        unreadable_since: float | None = None
        while True:
            if time.monotonic() >= next_status:
                info = self.job_info([job.job_id])[job.job_id]
                if on_change and (last is None or (last.status, last.reason) != (info.status, info.reason)):
                    on_change(info)
                last = info
                next_status = time.monotonic() + (2.0 if info.status is JobStatus.RUNNING else 5.0)
                if info.status.is_finished:
                    tail = self.log_tail(job.error_log)
                    raise JupyterError(
                        f"Jupyter job {job.job_id} ended {info.status} before its server answered"
                        f"{': ' + tail.strip().splitlines()[-1] if tail.strip() else ''}",
                        tail,
                    )
            if last is not None and last.status is JobStatus.RUNNING:
                text = self.run(read, what="reading Jupyter's runtime file").stdout
                found, _, content = text.partition("\n")
                try:
                    job.host, job.port, job.token = parse_jupyter_runtime(content)
                except JupyterError:
                    if found == "found":  # there, but empty, cut short or not Jupyter's
                        unreadable_since = unreadable_since or time.monotonic()
                        if time.monotonic() - unreadable_since > JUPYTER_RUNTIME_FILE_PATIENCE:
                            raise JupyterError(
                                f"Jupyter job {job.job_id}'s runtime file in {job.runtime_directory} stayed empty, "
                                f"incomplete or foreign for {JUPYTER_RUNTIME_FILE_PATIENCE:g} s; it was cancelled"
                            ) from None
                else:
                    self.run(f"rm -f {runtime}/{JUPYTER_RUNTIME_GLOB}", what="removing Jupyter's runtime file")
                    return
            if deadline is not None and time.monotonic() >= deadline:
                state = f"{last.status}, {last.reason}" if last and last.reason else str(last.status if last else "")
                raise WaitTimeout(
                    f"Jupyter job {job.job_id} did not start within {wait_timeout:g} s ({state}); it was cancelled"
                )
            time.sleep(1.0)

    def connect_jupyter(self, job: JupyterJob | str | int, timeout: float = 60) -> JupyterJob:
        """(Re)create the tunnel to a running Jupyter job on a free local port; wait until /api/status answers."""
        if not isinstance(job, JupyterJob):
            job = self.jupyter_job(job)
        assert job.host and job.port and job.token and job.job_id
        if job.local_port:
            # A forward may survive from before; a new one follows on whatever port is free now.
            self.connection.cancel_forward(job.local_port, job.host, job.port)
        # The same local port as before when it is still free, so that an open browser tab keeps working.
        job.local_port = self.connection.forward_free_port(job.host, job.port, preferred=job.local_port)
        job.url = f"http://127.0.0.1:{job.local_port}/lab?token={job.token}"
        wait_for_http(f"http://127.0.0.1:{job.local_port}/api/status?token={job.token}", timeout)
        self._remember_jupyter(job)
        return job

    def jupyter_job(self, job_id: str | int) -> JupyterJob:
        """A Jupyter job started from this machine, rebuilt from the private local record."""
        job_id = normalize_job_id(job_id)
        details = load_jupyter_records().get(job_id)
        if details is None or details["server"] != self.profile.name:
            raise UsageError(
                f"job {job_id} is not a Jupyter server started from this machine on "
                f"{self.profile.name!r} (see 'sl-forgery jupyter list')"
            )
        job = JupyterJob(
            "jupyter", "/dev/null", "/dev/null", details["working_directory"], None, details["working_directory"]
        )
        job.job_id, job.host, job.port, job.token = job_id, details["host"], details["port"], details["token"]
        job.local_port, job.url = details.get("local_port"), details.get("url")
        return job

    def stop_jupyter(self, job_id: str | int) -> None:
        """Cancel a Jupyter job and remove its tunnel."""
        job = self.jupyter_job(job_id)
        self.cancel([job.job_id])
        if job.local_port:
            self.connection.cancel_forward(job.local_port, job.host, job.port)
        update_jupyter_records(lambda records: records.pop(job.job_id, None))
        browser_redirect_path(job.job_id).unlink(missing_ok=True)

    def list_jupyter(self) -> list[tuple[JupyterJob, JobInfo]]:
        """Jupyter jobs of this server started from here and still alive, with what the scheduler says of them."""
        jobs = [
            self.jupyter_job(job_id)
            for job_id, details in load_jupyter_records().items()
            if details["server"] == self.profile.name
        ]
        if not jobs:
            return []
        infos = self.job_info([job.job_id for job in jobs])
        return [(job, infos[job.job_id]) for job in jobs if not infos[job.job_id].status.is_finished]

    def _remember_jupyter(self, job: JupyterJob) -> None:
        details = {
            "server": self.profile.name,
            "working_directory": job.working_directory,
            "host": job.host,
            "port": job.port,
            "token": job.token,
            "local_port": job.local_port,
            "url": job.url,
        }
        update_jupyter_records(lambda records: records.update({job.job_id: details}))

    # -- files ------------------------------------------------------------------------------------------------------

    # Files travel as the output or input of an ssh call over the master, framed like every other command, not by
    # scp: scp speaks SFTP, which many sites start through the login shell, so a greeting in its start-up files
    # (which sl-forgery's own calls step over) breaks every copy.

    def push_file(self, local_file_path: str | os.PathLike[str], remote_file_path: str | os.PathLike[str]) -> None:
        remote = shlex.quote(os.fspath(remote_file_path))
        with open(local_file_path, "rb") as source:
            self.connection.send(f"cat > {remote}", source, what=f"writing {remote_file_path}")

    def pull_file(self, local_file_path: str | os.PathLike[str], remote_file_path: str | os.PathLike[str]) -> None:
        """Copy a remote file here; the local file is replaced only once the whole of it has arrived."""
        local = Path(local_file_path)
        partial = local.with_name(f".{local.name}.{os.getpid()}.part")
        try:
            with open(partial, "wb") as sink:
                command = f"cat -- {shlex.quote(os.fspath(remote_file_path))}"
                self.connection.stream(command, sink.write, what=f"reading {remote_file_path}")
            os.replace(partial, local)
        finally:
            partial.unlink(missing_ok=True)

    def push_directory(
        self, local_directory_path: str | os.PathLike[str], remote_directory_path: str | os.PathLike[str]
    ) -> None:
        """Copy a local directory's contents into a remote directory (created if missing)."""
        import subprocess

        remote = shlex.quote(os.fspath(remote_directory_path))
        archive = subprocess.Popen(
            ["tar", "-C", os.fspath(local_directory_path), "-cf", "-", "."],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            script = f"mkdir -p -- {remote} && tar -xf - -C {remote}"
            self.connection.send(script, archive.stdout, what=f"writing {remote}")
        finally:
            archive.stdout.close()
            _, errors = archive.communicate()
        if archive.returncode != 0:
            raise CommandError(archive.args, archive.returncode, "", errors.decode(errors="replace"), what="tar")

    def pull_directory(
        self, local_directory_path: str | os.PathLike[str], remote_directory_path: str | os.PathLike[str]
    ) -> None:
        """Copy a remote directory's contents into a local directory (created if missing)."""
        import subprocess

        local = Path(local_directory_path)
        local.mkdir(parents=True, exist_ok=True)
        # Owned by whoever runs this, not by the remote user's numeric id (which tar keeps when run as root).
        archive = subprocess.Popen(
            ["tar", "--no-same-owner", "-xf", "-", "-C", os.fspath(local)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        remote = shlex.quote(os.fspath(remote_directory_path))
        try:
            self.connection.stream(f"tar -C {remote} -cf - .", archive.stdin.write, what=f"reading {remote}")
        finally:
            archive.stdin.close()
            errors = archive.stderr.read()
            archive.wait()
        if archive.returncode != 0:
            raise CommandError(archive.args, archive.returncode, "", errors.decode(errors="replace"), what="tar")

    def exists(self, remote_path: str | os.PathLike[str]) -> bool:
        return self.run(f"test -e {shlex.quote(os.fspath(remote_path))}", check=False).returncode == 0

    def remove(self, remote_path: str | os.PathLike[str], is_dir: bool = False, recursive: bool = False) -> None:
        path = shlex.quote(os.fspath(remote_path))
        command = f"rm -rf -- {path}" if recursive else (f"rmdir -- {path}" if is_dir else f"rm -f -- {path}")
        self.run(command, what=f"removing {remote_path}")

    def create_directory(self, remote_path: str | os.PathLike[str], parents: bool = True) -> None:
        flag = "-p " if parents else ""
        self.run(f"mkdir {flag}-- {shlex.quote(os.fspath(remote_path))}", what=f"creating {remote_path}")

    # -- efficiency report ------------------------------------------------------------------------------------------

    def report(self, job_ids: object, settle: float = 0.0) -> dict[str, JobUsage]:
        """What each job used of what it asked for, from one sacct call that sees every step; an array's id gives
        one entry per task. A job sacct does not know raises `UnknownJobError`. With ``settle`` (seconds), a job
        that has just ended is asked about again, for at most that long, until sacct has recorded each step's end.
        """
        ids = _job_ids(job_ids)
        argv = ["sacct", "-n", "-P", "-j", ",".join(ids), "-o", USAGE_FIELDS]
        deadline = time.monotonic() + settle
        pause = 0.25
        while True:
            result = self.run(shlex.join(argv), check=False, what="sacct")
            self.scheduler_queries += 1
            if result.returncode != 0:
                raise SlurmError(argv, result.returncode, result.stdout, result.stderr, what="sacct")
            if usage_settled(result.stdout) or time.monotonic() + pause > deadline:
                break
            time.sleep(pause)
            pause = min(pause * 2, 2.0)
        usages = parse_sacct_usage(result.stdout)
        unknown = [job_id for job_id in ids if not _task_ids(job_id, usages)]
        if unknown:
            jobs = f"jobs {', '.join(unknown)} are" if len(unknown) > 1 else f"job {unknown[0]} is"
            raise UnknownJobError(
                f"{jobs} unknown to sacct on {self.profile.name!r}: check the id (a job just submitted appears "
                "within seconds)"
            )
        return {task_id: usages[task_id] for job_id in ids for task_id in _task_ids(job_id, usages)}

    # -- a job's node -----------------------------------------------------------------------------------------------

    def job_node(
        self, job_id: str | int, timeout: float | None = None, on_change: Callable[[JobInfo], None] | None = None
    ) -> dict[str, str]:
        """The first node of a running job, as ``scontrol show node`` describes it (``NodeName``, ``NodeAddr``,
        ``NodeHostName``...). A pending job is waited for, at most ``timeout`` seconds (`WaitTimeout`); a job that
        has ended raises `JobNotRunning`."""
        job_id = normalize_job_id(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        while True:
            state, node = parse_node_query(self.connection.run(node_query_script(job_id), what="squeue").stdout)
            if state is JobStatus.RUNNING and node:
                return node
            if state is JobStatus.UNKNOWN or state.is_finished:
                info = self.job_info([job_id])[job_id]
                if info.status is JobStatus.UNKNOWN:
                    raise UnknownJobError(f"job {job_id} is unknown to squeue and sacct on {self.profile.name!r}")
                if info.status.is_finished:
                    raise JobNotRunning(f"job {job_id} has ended ({info.status}): it holds no node any more")
                state = info.status
            if on_change and state is not last:
                on_change(JobInfo(job_id, state))
            last = state
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} is still {state} after {timeout:g} s")
            time.sleep(1.0)

    def start_holding_job(self, name: str = "shell", **resources: Any) -> Job:
        """Submit a job that only holds its resources (sleeps until cancelled or out of time), for a shell or an
        editor to attach to: a batch job, so that a dropped connection does not end it. ``resources``: `Job`
        keywords (``working_directory``, unset ones take Job's defaults and the profile's partition and account)."""
        leading, values = self.job_layout({"job_name": name, **resources}, name)
        job = Job(*leading, **values)
        job.add_command("sleep infinity")
        return self.submit_job(job)

    def shell(
        self,
        job_id: str | int,
        environment: str | None = None,
        env_manager: str | None = None,
        setup: Sequence[str] = (),
        on_change: Callable[[JobInfo], None] | None = None,
    ) -> int:
        """An interactive login shell inside a running job (``srun --overlap --pty`` over the master, on this
        terminal), once the job runs; returns the shell's exit code. With set-up lines or an environment, an
        interactive bash runs them first, as a job's script would."""
        job_id = normalize_job_id(job_id)
        prelude = render_setup(setup) + (render_activation(environment, env_manager) if environment else [])
        self.job_node(job_id, on_change=on_change)
        return self.connection.interactive(srun_shell_command(job_id, prelude))

    # -- ports of a job's node ----------------------------------------------------------------------------------------

    def forward(
        self,
        job_id: str | int,
        port: int,
        local_port: int | None = None,
        *,
        timeout: float = 60,
        on_change: Callable[[JobInfo], None] | None = None,
    ) -> dict[str, Any]:
        """Forward a local port (``local_port``, else a free one) over the master to ``port`` on the job's node,
        once something listens there; returns its record (``local_port``, ``host``, ``url``...)."""
        job_id = normalize_job_id(job_id)
        port = _check_port("port", port)
        if local_port is not None:
            _check_port("--local port", local_port)
        node = self.job_node(job_id, timeout=timeout, on_change=on_change)

        def answered(local_port: int) -> str:
            wait_for_port(local_port, timeout, f"port {port} of job {job_id}'s node {node['NodeName']}")
            return f"http://127.0.0.1:{local_port}/"

        return self._tunnel(job_id, node, port, local_port, answered)

    def _tunnel(
        self,
        job_id: str,
        node: Mapping[str, str],
        port: int,
        local_port: int | None,
        answered: Callable[[int], str],
        **more: Any,
    ) -> dict[str, Any]:
        """Forward a local port (``local_port``, already checked, else a free one) to ``port`` on ``node``; once
        ``answered(local_port)`` returns the URL, record the forward (with ``more``) and return its record. Whatever
        goes wrong before takes the forward away."""
        host = node.get("NodeAddr") or node["NodeName"]
        if local_port is None:
            local_port = self.connection.forward_free_port(host, port)
        elif not self.connection.forward(local_port, host, port):
            raise UsageError(f"local port {local_port} is taken; pick another with --local, or leave it out")
        try:
            url = answered(local_port)
        except BaseException:
            self.connection.cancel_forward(local_port, host, port)
            raise
        record = {
            "server": self.profile.name,
            "job_id": job_id,
            "node": node["NodeName"],
            "host": host,
            "port": port,
            "local_port": local_port,
            "url": url,
            "tensorboard": None,
            "started": None,
            **more,
        }
        update_forward_records(lambda records: records.update({str(local_port): record}))
        return record

    def start_tensorboard(
        self,
        logdir: str,
        job_id: str | int | None = None,
        *,
        local_port: int | None = None,
        timeout: float = 60,
        on_change: Callable[[JobInfo], None] | None = None,
        environment: str | None = None,
        env_manager: str | None = None,
        setup: Sequence[str] = (),
        **resources: Any,
    ) -> dict[str, Any]:
        """TensorBoard on ``logdir`` (a directory on the server), run in ``environment`` after the ``setup`` lines
        as a job's script runs them, forwarded here: as a step of the running job ``job_id``, or without one as a
        job of its own (``resources``: `Job` keywords over TENSORBOARD_DEFAULTS and the profile's partition and
        account). Returns the forward's record once TensorBoard answers through it (``url``, and in ``started``
        the step or job that `stop_forward` ends with the forward). Within ``timeout`` seconds, or the step or job
        is ended and the error raised says why."""
        quoted_logdir = tensorboard_logdir(logdir)
        if local_port is not None:
            _check_port("--local port", local_port)  # before TensorBoard starts, not once it answers
        if job_id is not None and resources:
            raise UsageError(f"{', '.join(resources)}: for a new job; a step in job {job_id} has the job's resources")
        if self.run(f"test -d {quoted_logdir}", check=False, what="test -d").returncode != 0:
            raise UsageError(f"LOGDIR {logdir} is no directory on {self.profile.name!r}; give the runs' log directory")
        deadline = time.monotonic() + timeout
        prelude = render_setup(setup) + (render_activation(environment, env_manager) if environment else [])
        leader = None
        if job_id is not None:
            job_id = normalize_job_id(job_id)
            self.job_node(job_id, timeout=timeout, on_change=on_change)
            directory = self.job_directory("tensorboard")
            run_directory = f"{directory}/{REMOTE_RECORD_DIR}/tensorboard"
            node_script = "\n".join([*prelude, *render_tensorboard_commands(run_directory, quoted_logdir)])
            leader = self.run(tensorboard_step_command(job_id, run_directory, node_script), what="srun").stdout
            started = None
        else:
            job = self._tensorboard_job(quoted_logdir, environment, env_manager, setup, resources)
            run_directory = f"{job.working_directory}/{REMOTE_RECORD_DIR}/tensorboard"
            self.submit_job(job)
            job_id = started = job.job_id
        assert job_id is not None
        try:
            # A step's job runs already, and job_node has shown its states while it was pending.
            as_step = started is None
            step, port, path = self._await_tensorboard(
                job_id, run_directory, deadline, None if as_step else on_change, as_step
            )
            started = started or step
            self.run(f"cd {shlex.quote(run_directory)} && rm -f flags .tensorboard-info/pid-*.info", what="rm")

            def answered(local_port: int) -> str:
                url = f"http://127.0.0.1:{local_port}{path}/"
                wait_for_http(url, max(deadline - time.monotonic(), 5.0))
                return url

            node = self.job_node(job_id)
            return self._tunnel(job_id, node, port, local_port, answered, tensorboard=logdir, started=started)
        except BaseException:
            if started:
                self._end_started(started)
            elif leader and leader.strip().isdigit():
                # The step has no id yet: srun, on the login node this connection reaches, takes it along.
                self.run(f"kill -TERM -- -{leader.strip()} 2>/dev/null; true", what="kill")
            raise

    def _tensorboard_job(
        self,
        quoted_logdir: str,
        environment: str | None,
        env_manager: str | None,
        setup: Sequence[str],
        resources: Mapping[str, Any],
    ) -> Job:
        leading, values = self.job_layout(resources, "tensorboard")
        job = Job(*leading, environment, env_manager=env_manager, setup=setup, **{**TENSORBOARD_DEFAULTS, **values})
        run_directory = f"{job.working_directory}/{REMOTE_RECORD_DIR}/tensorboard"
        for line in render_tensorboard_commands(run_directory, quoted_logdir):
            job.add_command(line)
        return job

    def _await_tensorboard(
        self,
        job_id: str,
        run_directory: str,
        deadline: float,
        on_change: Callable[[JobInfo], None] | None,
        as_step: bool,
    ) -> tuple[str | None, int, str]:
        """Wait until TensorBoard's info file names its port and path; returns ``(step, port, path)``."""
        last: JobInfo | None = None
        next_status = 0.0
        while True:
            if time.monotonic() >= next_status:
                info = self.job_info([job_id])[job_id]
                if on_change and (last is None or (last.status, last.reason) != (info.status, info.reason)):
                    on_change(info)
                last = info
                next_status = time.monotonic() + (2.0 if info.status is JobStatus.RUNNING else 5.0)
                if info.status.is_finished:
                    raise self._tensorboard_failure(f"job {job_id} ended ({info.status})", run_directory)
            if last is not None and last.status is JobStatus.RUNNING:
                polled = self.run(tensorboard_poll_command(run_directory), what="reading TensorBoard's info file")
                ended, step, port, path = parse_tensorboard_poll(polled.stdout)
                if ended is not None:
                    raise self._tensorboard_failure(f"its step in job {job_id} ended (exit {ended})", run_directory)
                if port and path and (step or not as_step):
                    return step, port, path
            if time.monotonic() >= deadline:
                state = f"{last.status}, {last.reason}" if last and last.reason else str(last.status if last else "")
                raise WaitTimeout(
                    f"TensorBoard in job {job_id} did not answer in time ({state}); it was ended: allow more with "
                    "--wait-timeout"
                )
            time.sleep(0.5)

    def _tensorboard_failure(self, what: str, run_directory: str) -> TensorBoardError:
        tail = self.log_tail(f"{run_directory}/tensorboard.log")
        if not tail.strip():
            tail = self.log_tail(f"{run_directory.rsplit('/', 2)[0]}/error.log")
        # srun's own closing words only repeat the exit code; the line before says why.
        lines = [line for line in tail.strip().splitlines() if not line.startswith("srun: ")]
        last = lines[-1] if lines else ""
        return TensorBoardError(f"TensorBoard did not start: {what}{': ' + last if last else ''}", tail)

    def _end_started(self, started: str) -> None:
        """End the step or the job started for a forward (one that has ended already is no error)."""
        if "." in started:
            self.run(f"scancel --quiet -- {shlex.quote(started)}", check=False, what="scancel")
        else:
            self.cancel([started])

    def forwards(self) -> list[dict[str, Any]]:
        """The forwards made from here to this server's jobs that still run (those of ended jobs are removed)."""
        records = [
            {"tensorboard": None, "started": None, **record}  # forwards recorded before TensorBoard came
            for record in load_forward_records().values()
            if record["server"] == self.profile.name
        ]
        if not records:
            return []
        infos = self.job_info(sorted({record["job_id"] for record in records}))
        ended = [record for record in records if infos[record["job_id"]].status.is_finished]
        started_steps = [record["started"] for record in records if "." in (record["started"] or "")]
        if started_steps:
            # A TensorBoard's step may end while its job runs on (it failed, or was cancelled elsewhere).
            running = self.running_steps({step.partition(".")[0] for step in started_steps})
            ended += [
                r for r in records if r not in ended and "." in (r["started"] or "") and r["started"] not in running
            ]
        for record in ended:
            self._cancel_forward(record)
        return [{**record, "state": infos[record["job_id"]].status.value} for record in records if record not in ended]

    def running_steps(self, job_ids: Iterable[str]) -> set[str]:
        """The steps (``JOBID.STEP``) that squeue shows for these jobs, in one call."""
        argv = ["squeue", "-h", "-s", "-o", "%i", "-j", ",".join(sorted(job_ids))]
        result = self.run(shlex.join(argv), check=False, what="squeue")
        if result.returncode != 0 and "Invalid job id" not in result.stderr:
            raise SlurmError(argv, result.returncode, result.stdout, result.stderr, what="squeue")
        return set(result.stdout.split())

    def stop_forward(self, job_id: str | int, port: int | None = None) -> list[dict[str, Any]]:
        """Remove the forwards made from here to a job (to one of its ports, with ``port``); returns them."""
        job_id = normalize_job_id(job_id)
        records = [
            {"tensorboard": None, "started": None, **record}
            for record in load_forward_records().values()
            if record["server"] == self.profile.name
            and record["job_id"] == job_id
            and (port is None or record["port"] == port)
        ]
        for record in records:
            self._cancel_forward(record)
        return records

    def _cancel_forward(self, record: Mapping[str, Any]) -> None:
        self.connection.cancel_forward(record["local_port"], record["host"], record["port"])
        if record.get("started"):
            self._end_started(record["started"])
        update_forward_records(lambda records: records.pop(str(record["local_port"]), None))

    # -- files around a job ---------------------------------------------------------------------------------------

    def sync_up(
        self,
        local: str | os.PathLike[str],
        remote: str,
        *,
        gitignore: bool = True,
        delete: bool = False,
        dry_run: bool = False,
    ) -> list[str]:
        """Copy a local directory's contents (or a file) into a remote directory with rsync over the master, made if
        missing; returns the paths copied (with ``dry_run``, those that would be)."""
        source = _existing_source(local)
        remote = _remote_path("remote directory", remote)
        if not dry_run:
            self.create_directory(remote)
        options = {"gitignore": gitignore, "delete": delete, "dry_run": dry_run}
        return self.connection.rsync(os.fspath(source), remote, upload=True, **options)

    def sync_down(
        self,
        remote: str,
        local: str | os.PathLike[str],
        *,
        gitignore: bool = True,
        delete: bool = False,
        dry_run: bool = False,
    ) -> list[str]:
        """Copy a remote directory's contents into a local directory (made if missing) with rsync over the master;
        returns the paths copied (with ``dry_run``, those that would be)."""
        remote = _remote_path("remote directory", remote)
        destination = Path(local)
        if not dry_run:
            destination.mkdir(parents=True, exist_ok=True)
        options = {"gitignore": gitignore, "delete": delete, "dry_run": dry_run}
        return self.connection.rsync(os.fspath(destination), remote, upload=False, **options)

    # -- an editor on a job's node ------------------------------------------------------------------------------------

    def code_host(
        self, job_id: str | int, timeout: float | None = None, on_change: Callable[[JobInfo], None] | None = None
    ) -> str:
        """Write a Host entry ``slf-JOBID`` for the job's node into `host_entries_path` (entries of this server's
        ended jobs go at the same time); returns the alias. Its ProxyCommand rides the master."""
        job_id = normalize_job_id(job_id)
        self.cleanup_code_hosts()
        node = self.job_node(job_id, timeout=timeout, on_change=on_change)
        alias = f"{HOST_ALIAS_PREFIX}{job_id}"
        entry = render_host_entry(
            alias,
            node.get("NodeAddr") or node["NodeName"],
            self.profile.node_ssh_port or DEFAULT_PORT,
            self.profile.user,
            self.connection.proxy_argv(),
            os.path.expanduser(self.profile.identity_file) if self.profile.identity_file else None,
            self.profile.ssh_options,
            f"sl-forgery: job {job_id} on server {self.profile.name}, node {node['NodeName']}",
        )
        update_host_entries(lambda entries: entries.update({alias: entry}))
        return alias

    def cleanup_code_hosts(self) -> list[str]:
        """Remove the Host entries of this server's jobs that have ended; returns their aliases."""
        path = host_entries_path()
        if not path.exists():
            return []
        owned = {
            alias: alias.removeprefix(HOST_ALIAS_PREFIX)
            for alias, entry in split_host_entries(path.read_text(encoding="utf-8")).items()
            if f" on server {self.profile.name}," in entry.splitlines()[0]
        }
        if not owned:
            return []
        infos = self.job_info(sorted(set(owned.values())))
        gone = [alias for alias, job_id in owned.items() if infos[job_id].status.is_finished]
        if gone:
            update_host_entries(lambda entries: [entries.pop(alias, None) for alias in gone])
        return gone


SERVER_CHECK_NAMES = ("login shell", "login output", "slurm", "accounting", "modules", "environment")
ACCOUNTING_OFF_DETAIL = (
    "off: states come from squeue and the jobs' exit records; a job squeue has forgotten and that left no record "
    "reads UNKNOWN"
)


def _login_check(server: Server) -> list[str]:
    result = server.run("printf '%s\\n' \"$SHELL\"", check=False)
    shell = (result.stdout.strip().splitlines() or ["?"])[-1]
    return ["login shell", "ok", f"{shell or '?'} (any login shell works)", ""]


def _login_output_check(server: Server) -> list[str]:
    """Whether a login prints to stdout: sl-forgery's own calls skip it, but rsync, scp and sftp read it as theirs."""
    printed = getattr(server.run("true", check=False), "login_output", "")
    if not printed:
        return ["login output", "ok", "a login prints nothing on stdout", ""]
    lines = printed.splitlines()
    shown = repr(lines[0]) + (" and more" if len(lines) > 1 else "")
    detail = (
        f"a login prints {shown} on stdout ({len(printed.encode())} bytes): sl-forgery skips it, but sync (rsync), "
        "scp and sftp need a login that prints only in interactive shells"
    )
    return ["login output", "ok", detail, ""]


def _slurm_check(server: Server) -> list[str]:
    result = server.run("sinfo --version", check=False)
    if result.returncode == 0:
        return ["slurm", "ok", (result.stdout.strip().splitlines() or [""])[0], ""]
    fix = "put the SLURM client commands on the PATH of a non-interactive login"
    return ["slurm", "FAIL", (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1], fix]


def _accounting_check(server: Server) -> list[str]:
    name, fix = "accounting", "ask the admins about accounting; statuses use exit records meanwhile"
    try:
        result = server.connection.run("sacct -n -X -S now -o JobID", check=False, timeout=ACCOUNTING_CHECK_TIMEOUT)
    except SSHError as error:
        if error.returncode != -15:
            raise
        return [name, "FAIL", f"sacct gave no answer within {ACCOUNTING_CHECK_TIMEOUT:g} s", fix]
    if result.returncode == 0:
        return [name, "ok", "on", ""]
    if "accounting storage is disabled" in result.stderr:
        return [name, "ok", ACCOUNTING_OFF_DETAIL, ""]
    return [name, "FAIL", (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1], fix]


def _bash_on_server(server: Server, lines: Sequence[str]) -> subprocess.CompletedProcess:
    """Run job-script lines under bash on the login node, as a job would run them on its node."""
    return server.run(shlex.join(["bash", "-c", "\n".join(["set -e", *lines])]), check=False)


def _error_summary(result: subprocess.CompletedProcess) -> str:
    """The first line of a failure's stderr (the failing program's own words) and its last (sl-forgery's line)."""
    lines = [line.strip() for line in result.stderr.strip().splitlines() if line.strip()]
    return " / ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else f"exit code {result.returncode}"


def _module_check(server: Server) -> list[str]:
    setup = server.profile.setup
    needed = bool(setup) and any(_MODULE_COMMAND_RE.search(line.strip()) for line in setup)
    probe = render_setup(["module --version"])
    result = _bash_on_server(server, probe)
    if result.returncode == 0:
        version = " ".join((result.stderr + result.stdout).split()[:8])
        return ["modules", "ok", version or "module is defined", ""]
    if needed:
        fix = "ask the site how jobs load modules, or drop the module lines from the profile's setup"
        return ["modules", "FAIL", _error_summary(result), fix]
    return ["modules", "ok", "none found (not needed: no set-up line uses module)", ""]


def _environment_check(server: Server) -> list[str]:
    profile = server.profile
    environment = profile.conda_environment
    if not environment:
        result = _bash_on_server(server, [*render_setup(profile.setup), "conda --version"])
        conda = result.stdout.strip().splitlines()[-1] if result.returncode == 0 and result.stdout.strip() else ""
        found = f"conda found ({conda})" if conda else "no conda found"
        return ["environment", "ok", f"none set; {found}; needed only for jobs given --env", ""]
    manager = infer_env_manager(environment, profile.env_manager) or "found from the path"
    lines = [*render_setup(profile.setup), *render_activation(environment, profile.env_manager)]
    result = _bash_on_server(server, [*lines, "python --version 2>&1 || true"])
    if result.returncode == 0:
        python = (result.stdout.strip().splitlines() or ["no python"])[-1]
        return ["environment", "ok", f"{environment} ({manager}): activates, {python}", ""]
    fix = "make the environment on the server, or fix env_manager/setup in the profile ('sl-forgery server add')"
    return ["environment", "FAIL", _error_summary(result), fix]


# ======================================================================================================================
# Command line
# ======================================================================================================================


# -- output: JSON schemas, progress, tables ----------------------------------------------------------------------------


_NULLABLE_INT = {"type": ["integer", "null"]}
_JOB_STATE_SCHEMA = {
    "type": "object",
    "required": ["job_id", "state", "finished", "exit_code", "signal", "reason", "name", "node", "time_left"],
    "additionalProperties": False,
    "properties": {
        "job_id": {"type": "string", "pattern": "^[0-9]+(_[0-9]+)?$"},
        "state": {"enum": [status.value for status in JobStatus]},
        "finished": {"type": "boolean"},
        "exit_code": _NULLABLE_INT,
        "signal": _NULLABLE_INT,
        "reason": {"type": "string"},
        "name": {"type": "string"},
        "node": {"type": "string"},
        "time_left": {"type": "string"},
    },
}
_USAGE_FIELD_TYPES = {
    "job_id": "string",
    "state": "string",
    "finished": "boolean",
    "exit_code": ("integer", "null"),
    "signal": ("integer", "null"),
    "elapsed_seconds": "number",
    "time_limit_seconds": ("number", "null"),
    "time_used": ("number", "null"),
    "cpus": "integer",
    "total_cpu_seconds": "number",
    "cpu_efficiency": ("number", "null"),
    "peak_memory_bytes": ("integer", "null"),
    "requested_memory_bytes": ("integer", "null"),
    "memory_used": ("number", "null"),
    "steps": "integer",
    "suggestion": "string",
}


def _entries(properties: Mapping[str, Any], required: Sequence[str] | None = None) -> dict[str, Any]:
    """The JSON Schema of a list of objects with these properties (all required unless said)."""
    required = list(properties) if required is None else list(required)
    return {"type": "array", "items": {"type": "object", "required": required, "properties": dict(properties)}}


def _document(key: str, entries: dict[str, Any], **more: Any) -> dict[str, Any]:
    """The JSON Schema of a document whose ``key`` holds ``entries`` (and ``more`` top-level properties)."""
    return {"type": "object", "required": [*more, key], "properties": {**more, key: entries}}


_STATE = {"enum": [status.value for status in JobStatus]}
_TEXT = {"type": "string"}
_LIVE_JOB = {"job_id": _TEXT, "state": _STATE, "node": _TEXT}  # what forwards and Jupyter servers say of their job
# The documents printed by --json: a stable contract; new fields may be added, none removed or renamed.
JSON_SCHEMAS = {
    "jobs": _document("jobs", {"type": "array", "items": _JOB_STATE_SCHEMA}),  # status, wait, queue
    "history": _document(
        "jobs",
        _entries({**{field: {"type": "string"} for field in JobRecord._fields}, "submitted": {"type": "number"}}),
    ),
    "report": _document(
        "jobs",
        _entries(
            {
                field: {"type": kind} if isinstance(kind, str) else {"type": list(kind)}
                for field, kind in _USAGE_FIELD_TYPES.items()
            }
        ),
    ),
    "forwards": _document(
        "forwards",
        _entries(
            {
                "server": _TEXT,
                **_LIVE_JOB,
                "host": _TEXT,
                "port": {"type": "integer"},
                "local_port": {"type": "integer"},
                # TensorBoard's own secret path follows the port.
                "url": {"type": "string", "pattern": "^http://127\\.0\\.0\\.1:[0-9]+/([0-9a-f]{32}/)?$"},
                "tensorboard": {"type": ["string", "null"]},  # its log directory, for a TensorBoard
                "started": {"type": ["string", "null"]},  # the step or job started for it, which --stop ends
            }
        ),
    ),
    "jupyter": _document(
        "servers",
        _entries(
            {
                **_LIVE_JOB,
                "time_left": _TEXT,
                "url": {"type": "string", "pattern": "^http://127\\.0\\.0\\.1:[0-9]+/lab\\?token="},
            }
        ),
    ),
    "servers": _document(
        "servers",
        _entries(
            {"name": {"type": "string"}, "host": {"type": "string"}, "port": _NULLABLE_INT}, required=["name", "host"]
        ),
        default={"type": ["string", "null"]},
    ),
}


class Progress:
    """Job state changes on stderr: one live line on a terminal, timestamped lines otherwise."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.live = sys.stderr.isatty()
        self.states: dict[str, JobInfo] = {}

    def __call__(self, info: JobInfo) -> None:
        self.states[info.job_id] = info
        if self.quiet:
            return
        if self.live:
            line = "  ".join(f"{job_id} {state.status}" for job_id, state in self.states.items())
            print(
                f"\r\033[K{line}",
                end="" if not all(s.status.is_finished for s in self.states.values()) else "\n",
                file=sys.stderr,
                flush=True,
            )
        else:
            reason = f" ({info.reason})" if info.reason and not info.status.is_finished else ""
            code = f" exit {info.exit_code}" if info.status.is_finished and info.exit_code is not None else ""
            print(f"{time.strftime('%H:%M:%S')} {info.job_id} {info.status}{code}{reason}", file=sys.stderr, flush=True)


def exit_code_for(infos: Iterable[JobInfo]) -> int:
    """0 when every job COMPLETED; a FAILED job's own exit code; 1 for any other bad end."""
    infos = list(infos)
    if all(info.status is JobStatus.COMPLETED for info in infos):
        return EXIT_OK
    for info in infos:
        if info.status is JobStatus.FAILED and info.exit_code and 0 < info.exit_code < 256:
            return info.exit_code
    return EXIT_FAILURE


def _print_json(document: object) -> None:
    import json

    print(json.dumps(document, indent=2, sort_keys=False))


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    # https://no-color.org: any non-empty NO_COLOR turns colour off.
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
    print(format_table(headers, rows, colour=colour))


# -- shared by the job commands ----------------------------------------------------------------------------------------


def _open_server(args: Any) -> Server:
    return Server.from_profile(args.server, verbose=args.verbose)


def _read_script(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(
            f"script {path} is not UTF-8 text (byte {error.start}); convert it, e.g. with iconv -t UTF-8"
        ) from None
    except OSError as error:
        raise UsageError(f"cannot read script {path}: {_os_reason(error)}") from None


def _dry_run_server(args: Any) -> Server:
    """The server a real run would use, read from the config alone; a stand-in named SERVER if none is set up."""
    config = load_config()
    if config.servers or args.server or os.environ.get("SL_FORGERY_SERVER"):
        return Server(profile=config.profile(args.server), config=config)
    return Server(profile=Profile(name="SERVER", host="SERVER"))


# A dry run asks the server nothing: where the remote home has never been read on this machine, this stands for it.
UNKNOWN_HOME = "/~"


def _plan_home(server: Server, dry_run: bool) -> str | None:
    """What stands for the remote home in a dry run (what is known of it); None for a real run, which asks the
    server for it only if a path needs it."""
    return (server.known_home() or UNKNOWN_HOME) if dry_run else None


def _flag_values(args: Any) -> dict[str, Any]:
    """The resource flags given, by Job field, each checked by its own flag's name before anything is sent."""
    values = {}
    for option in SBATCH_OPTIONS:
        value = getattr(args, option.flag.lstrip("-"), None) if option.flag else None
        if value is not None:
            values[option.field] = option.check(option.flag, value)
    return values


def _flag_sbatch_args(values: Mapping[str, Any]) -> list[str]:
    """The resource flags as sbatch options (for a user's own script, where they override its #SBATCH lines)."""
    by_field = {option.field: option for option in SBATCH_OPTIONS if option.field}
    skip = ("job_name", "working_directory")  # a script's name and directory are planned with their own rules
    return [f"--{by_field[f].name}={by_field[f].render(v)}" for f, v in values.items() if f not in skip]


def _show_error_tail(server: Server, infos: Iterable[JobInfo], lines: int = 15) -> None:
    records = load_job_records(server.profile.name)
    for info in infos:
        record = records.get(info.job_id)
        if info.status.is_success or record is None:
            continue
        path = record.log_path(error=True)
        tail = server.log_tail(path, lines)
        if tail.strip():
            print(f"--- last lines of {path} (job {info.job_id}, {info.status}) ---", file=sys.stderr)
            print(tail.rstrip("\n"), file=sys.stderr)


def _check_end_flags(args: Any) -> None:
    """--notify, --on-end and --report act when waited-for jobs end, --timeout ends the waiting: on run and submit
    they need --wait."""
    if getattr(args, "wait", True):
        return
    for flag, value in (
        ("--notify", args.notify),
        ("--on-end", args.on_end),
        ("--report", args.report),
        ("--cancel-impossible", args.cancel_impossible),
        ("--sync-down", getattr(args, "sync_down", None)),
        ("--timeout", args.timeout),
    ):
        if value is not None and value is not False:
            raise UsageError(f"{flag} acts while the job is followed to its end: add --wait")


def _sync_around(server: Server, args: Any, workdir: str, before: bool) -> None:
    """--sync-up DIR into the job's working directory before it is submitted; --sync-down DIR after its end."""
    if before and args.sync_up:
        files = server.sync_up(args.sync_up, workdir)
        _say(args, f"{len(files)} file(s) of {args.sync_up} copied to {workdir}")
    if not before and args.sync_down:
        files = server.sync_down(workdir, args.sync_down)
        _say(args, f"{len(files)} file(s) of {workdir} copied to {args.sync_down}")


def _dry_run_sync_note(args: Any, workdir: str) -> None:
    if args.sync_up:
        _existing_source(args.sync_up)
        print(f"# would first copy {args.sync_up} into {workdir}", file=sys.stderr)
    if args.sync_down:
        print(f"# and after the job's end copy {workdir} into {args.sync_down}", file=sys.stderr)


def _announce_end(server: Server, infos: Sequence[JobInfo], args: Any) -> None:
    """A desktop notification (--notify, or the profile's ``notify``) and the --on-end command, once jobs ended."""
    notify = args.notify if args.notify is not None else server.profile.notify
    if notify:
        title, text = end_notice(infos, server.profile.name)
        problem = notify_desktop(title, text)
        if problem:
            print(f"{APP_NAME}: note: {problem}; {title.removeprefix(APP_NAME + ': ')}: {text}", file=sys.stderr)
    if args.on_end:
        for info in infos:
            code = run_on_end(args.on_end, info)
            if code != 0:
                print(f"{APP_NAME}: warning: the --on-end command exited {code} for job {info.job_id}", file=sys.stderr)


def _print_report(usages: Iterable[JobUsage]) -> None:
    usages = list(usages)
    rows = [
        [
            usage.job_id,
            usage.status,
            "-" if usage.exit_code is None else usage.exit_code,
            format_seconds(usage.elapsed),
            "none" if usage.time_limit is None else format_seconds(usage.time_limit),
            usage.cpus,
            "-" if usage.cpu_efficiency is None else f"{usage.cpu_efficiency:.0%}",
            "-" if usage.peak_memory is None else format_bytes(usage.peak_memory),
            "-" if usage.requested_memory is None else format_bytes(usage.requested_memory),
        ]
        for usage in usages
    ]
    _print_table(["JOBID", "STATE", "EXIT", "ELAPSED", "LIMIT", "CPUS", "CPU USE", "PEAK MEM", "ASKED MEM"], rows)
    for usage in usages:
        print(f"{usage.job_id}: {usage.suggestion}")


def _wait_and_report(
    server: Server, job_ids: Sequence[str], args: Any, show_output: Callable[[], None] | None = None
) -> int:
    progress = Progress(quiet=args.quiet)
    try:
        infos = server.wait(
            job_ids,
            timeout=getattr(args, "timeout", None),
            on_change=progress,
            cancel_impossible=args.cancel_impossible,
        )
    except KeyboardInterrupt:
        print(f"\n{APP_NAME}: interrupted; the job(s) keep running: {' '.join(job_ids)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    _announce_end(server, list(infos.values()), args)
    usages = server.report(job_ids, settle=REPORT_SETTLE) if args.report else None
    if getattr(args, "json", False):
        document: dict[str, Any] = {"jobs": [info.to_json() for info in infos.values()]}
        if usages is not None:
            document["report"] = [usage.to_json() for usage in usages.values()]
        _print_json(document)
    _show_error_tail(server, infos.values())
    if show_output:
        show_output()
    if usages is not None and not getattr(args, "json", False):
        _print_report(usages.values())
    return exit_code_for(infos.values())


def _write_stdout(chunk: bytes) -> None:
    sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()


def _print_dry_run(server: Server, plan: SubmissionPlan) -> int:
    """The script on stdout; on stderr, where it would be written and the sbatch command that would submit it."""
    print(plan.script, end="")
    print(f"# would write this script to {plan.script_path} on {server.destination}", file=sys.stderr)
    print(f"# and run there: {shlex.join(plan.sbatch_argv)}", file=sys.stderr)
    if plan.script_path.startswith(f"{UNKNOWN_HOME}/"):
        print(f"# ({UNKNOWN_HOME} stands for your home directory on the server, not yet known here)", file=sys.stderr)
    return EXIT_OK


# -- jobs -------------------------------------------------------------------------------------------------------------


def cmd_submit(args: Any) -> int:
    path = Path(args.script)
    if not path.is_file():
        raise UsageError(f"script {path} does not exist or is not a file")
    script = inject_setup(_read_script(path), args.setup)
    values = _flag_values(args)
    _check_end_flags(args)
    server = _dry_run_server(args) if args.dry_run else _open_server(args)
    plan = server.plan_script(
        script,
        default_name=path.stem,
        job_name=values.get("job_name"),
        working_directory=values.get("working_directory"),
        sbatch_args=_flag_sbatch_args(values),
        home=_plan_home(server, args.dry_run),
    )
    if args.dry_run:
        _dry_run_sync_note(args, plan.record.working_directory)
        return _print_dry_run(server, plan)
    workdir = plan.record.working_directory
    _sync_around(server, args, workdir, before=True)
    job_id = server.submit_plan(plan)
    print(job_id, flush=True)
    if not args.wait:
        return EXIT_OK
    code = _wait_and_report(server, [job_id], args)
    if code != EXIT_INTERRUPTED:
        _sync_around(server, args, workdir, before=False)
    return code


def _environment_arguments(args: Any, profile: Profile) -> dict[str, Any]:
    """A job's environment, its manager and set-up lines, from the command line over the profile's defaults."""
    environment = choose(args.env, profile, "conda_environment")
    env_manager = choose(args.env_manager, profile, "env_manager")
    if env_manager and not environment:
        raise UsageError(f"--env-manager {env_manager} needs an environment: pass --env ENV")
    return {
        "conda_environment": environment,
        "env_manager": env_manager if environment else None,
        "setup": [*profile.setup, *args.setup],
    }


def _job_from_args(args: Any, server: Server, command: Sequence[str]) -> Job:
    """The job `run` submits: the resource flags, else the profile's defaults, else Job's own."""
    leading, values = server.job_layout(_flag_values(args), Path(command[0]).name, _plan_home(server, args.dry_run))
    job = Job(*leading, **_environment_arguments(args, server.profile), **values)
    job.add_command(shlex.join(command))
    return job


def cmd_run(args: Any) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("no command given; usage: sl-forgery run [OPTIONS] -- COMMAND [ARGS...]")
    _flag_values(args)  # a bad flag is refused before the config is read
    _check_end_flags(args)
    server = _dry_run_server(args) if args.dry_run else _open_server(args)
    job = _job_from_args(args, server, command)
    if args.dry_run:
        _dry_run_sync_note(args, job.working_directory)
        return _print_dry_run(server, server.plan_job(job))
    workdir = job.working_directory
    _sync_around(server, args, workdir, before=True)
    server.submit_job(job)
    assert job.job_id is not None
    print(job.job_id, flush=True)
    if not args.wait:
        return EXIT_OK

    def show_output() -> None:
        try:
            server.write_log(job.job_id or "", _write_stdout)
        except SlForgeryError as error:
            print(f"{APP_NAME}: warning: cannot read the output log: {str(error).splitlines()[0]}", file=sys.stderr)

    code = _wait_and_report(server, [job.job_id], args, show_output)
    if code != EXIT_INTERRUPTED:
        _sync_around(server, args, workdir, before=False)
    return code


def cmd_wait(args: Any) -> int:
    server = _open_server(args)
    return _wait_and_report(server, _job_ids(args.job_ids), args)


def cmd_report(args: Any) -> int:
    server = _open_server(args)
    usages = server.report(args.job_ids)
    if args.json:
        _print_json({"jobs": [usage.to_json() for usage in usages.values()]})
    else:
        _print_report(usages.values())
    return EXIT_OK


def _ask(question: str) -> bool:
    """A yes/no question on the terminal; False (no) when there is no terminal to ask on."""
    if not sys.stdin.isatty():
        return False
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _state_line(args: Any) -> Callable[[JobInfo], None]:
    """Progress while a job needed by an interactive command is pending: one plain line per change."""

    def show(info: JobInfo) -> None:
        if not args.quiet:
            reason = f" ({info.reason})" if info.reason else ""
            print(f"job {info.job_id} is {info.status}{reason}", file=sys.stderr, flush=True)

    return show


def _holding_job(server: Server, args: Any, name: str) -> Job:
    """The job a shell or an editor attaches to when no JOBID is given, from the resource flags."""
    values = _flag_values(args)
    job = server.start_holding_job(values.pop("job_name", None) or name, **values)
    _say(args, f"job {job.job_id} holds the resources for this {name}")
    return job


def _refuse_resources_with_job_id(args: Any, reason: str = "with a JOBID the job's own resources hold") -> None:
    given = [
        f"--{flag}"
        for flag in ("cpus", "mem", "time", "partition", "account", "qos", "gpus", "name", "workdir")
        if getattr(args, flag) is not None
    ]
    if given:
        raise UsageError(f"{given[0]} is for a new job; {reason}")


def cmd_shell(args: Any) -> int:
    _flag_values(args)  # a bad flag is refused before anything is sent
    server = _open_server(args)
    environment = _environment_arguments(args, server.profile)
    shell_options = {
        "environment": environment["conda_environment"],
        "env_manager": environment["env_manager"],
        "setup": environment["setup"],
        "on_change": _state_line(args),
    }
    if args.job_id:
        _refuse_resources_with_job_id(args)
        return server.shell(args.job_id, **shell_options)
    job = _holding_job(server, args, "shell")
    assert job.job_id is not None
    try:
        code = server.shell(job.job_id, **shell_options)
    except BaseException:
        server.cancel([job.job_id])
        raise
    if args.keep or (not args.cancel and _ask(f"keep job {job.job_id} running for later?")):
        _say(
            args,
            f"job {job.job_id} keeps running: 'sl-forgery shell {job.job_id}' attaches again, "
            f"'sl-forgery cancel {job.job_id}' ends it",
        )
    else:
        server.cancel([job.job_id])
        _say(args, f"cancelled job {job.job_id}")
    return code


def _forward_usage(args: Any) -> None:
    """Refuse a combination of forward's flags that does not make sense, before anything is sent."""
    if args.tensorboard is None:
        for flag, given in (("--new", args.new), ("--env", args.env), ("--env-manager", args.env_manager)):
            if given:
                raise UsageError(f"{flag} is for TensorBoard: add --tensorboard LOGDIR")
        if args.setup:
            raise UsageError("--setup is for TensorBoard: add --tensorboard LOGDIR")
    if args.new and args.job_id:
        raise UsageError("--new starts a job of its own: leave out the JOBID, or leave out --new")
    if args.tensorboard is not None and args.port is not None:
        raise UsageError("TensorBoard takes a free port on its node: leave out PORT")
    if not args.new:
        _refuse_resources_with_job_id(args, "add --new (with --tensorboard), or leave it out")


def cmd_forward(args: Any) -> int:
    _flag_values(args)  # a bad flag is refused before anything is sent
    if not args.list:
        _forward_usage(args)
    server = _open_server(args)
    if args.list:
        records = server.forwards()
        if args.json:
            _print_json({"forwards": records})
        else:
            rows = [
                [r["job_id"], JobStatus.parse(r["state"]), r["node"], r["port"], r["tensorboard"] or "", r["url"]]
                for r in records
            ]
            _print_table(["JOBID", "STATE", "NODE", "PORT", "TENSORBOARD", "URL"], rows)
        return EXIT_OK
    if args.stop:
        if not args.job_id:
            raise UsageError("forward --stop needs the JOBID, e.g. 'sl-forgery forward --stop 1234'")
        stopped = server.stop_forward(args.job_id, args.port)
        if not stopped:
            raise UsageError(f"no forward from here to job {args.job_id} (see 'sl-forgery forward --list')")
        ended = [f"ended {'step' if '.' in r['started'] else 'job'} {r['started']}" for r in stopped if r["started"]]
        removed = ", ".join(f"{r['url']} -> {r['node']}:{r['port']}" for r in stopped)
        return _say(args, f"removed {removed}{'; ' + ', '.join(ended) if ended else ''}")
    if not args.job_id and not args.new:
        raise UsageError(
            "forward needs a JOBID and a PORT on its node, e.g. 'sl-forgery forward 1234 6006' (or --tensorboard "
            "LOGDIR with a JOBID or --new)"
        )
    if args.tensorboard is None and args.port is None:
        raise UsageError("forward needs the PORT on the job's node, e.g. 'sl-forgery forward 1234 6006'")
    _interrupt_on_hangup()
    if args.tensorboard is not None:
        environment = _environment_arguments(args, server.profile)
        try:
            record = server.start_tensorboard(
                args.tensorboard,
                None if args.new else args.job_id,
                local_port=args.local,
                timeout=args.wait_timeout,
                on_change=_state_line(args),
                environment=environment["conda_environment"],
                env_manager=environment["env_manager"],
                setup=environment["setup"],
                **(_flag_values(args) if args.new else {}),
            )
        except TensorBoardError as error:
            if error.log_tail.strip():
                print(f"--- last lines of TensorBoard's log ---\n{error.log_tail.rstrip()}", file=sys.stderr)
            raise
    else:
        record = server.forward(
            args.job_id, args.port, args.local, timeout=args.wait_timeout, on_change=_state_line(args)
        )
    job_id = record["job_id"]
    # From here a Ctrl-C, even one that comes the moment the URL is printed, takes the forward away.
    try:
        if args.json:
            _print_json(record)
        else:
            print(record["url"], flush=True)
        if args.detach:
            if record["started"]:
                return _say(
                    args,
                    f"TensorBoard keeps running in job {job_id}, the forward while the shared connection is open; "
                    f"'sl-forgery forward --stop {job_id}' ends both",
                )
            return _say(
                args,
                "the forward lasts while the shared connection is open; "
                f"'sl-forgery forward --stop {job_id}' removes it",
            )
        _say(args, f"forwarding to port {record['port']} of job {job_id} on {record['node']}; Ctrl-C stops")
        step = record["started"] if "." in (record["started"] or "") else None
        if step:
            # The step ends with its job, or before it when TensorBoard fails or is cancelled elsewhere.
            while step in server.running_steps([job_id]):
                time.sleep(STEP_POLL_INTERVAL)
        else:
            infos = server.wait([job_id])
    except KeyboardInterrupt:
        server.stop_forward(job_id, record["port"])
        print(f"\n{APP_NAME}: removed the forward to job {job_id}", file=sys.stderr)
        return EXIT_INTERRUPTED
    server.stop_forward(job_id, record["port"])
    if step:
        print(f"{APP_NAME}: TensorBoard's step {step} ended; the forward is gone", file=sys.stderr)
        return EXIT_FAILURE
    return _say(args, f"job {job_id} ended ({infos[job_id].status}); the forward is gone")


def cmd_sync(args: Any) -> int:
    server = _open_server(args)
    options = {"gitignore": not args.no_gitignore, "delete": args.delete, "dry_run": args.dry_run}
    if args.direction == "up":
        files = server.sync_up(args.source, args.destination, **options)
    else:
        files = server.sync_down(args.source, args.destination, **options)
    if args.dry_run:
        for name in files:
            print(name)
        return _say(args, f"{len(files)} file(s) would be copied to {args.destination}")
    return _say(args, f"{len(files)} file(s) copied to {args.destination}")


def cmd_code(args: Any) -> int:
    import shutil
    import subprocess

    _flag_values(args)  # a bad flag is refused before anything is sent
    server = _open_server(args)
    if args.cleanup:
        gone = server.cleanup_code_hosts()
        return _say(args, f"removed {', '.join(gone)}" if gone else "no Host entry of an ended job to remove")
    if args.job_id:
        _refuse_resources_with_job_id(args)
        job_id = normalize_job_id(args.job_id)
    else:
        job_id = _holding_job(server, args, "editor").job_id or ""
    alias = server.code_host(job_id, on_change=_state_line(args))
    entries, ssh_config = host_entries_path(), user_ssh_config(server.profile)
    line = include_line(entries)
    included = ssh_config.exists() and line in ssh_config.read_text(encoding="utf-8").splitlines()
    if not included and (args.include or _ask(f"add '{line}' at the top of {ssh_config}?")):
        add_include(ssh_config, entries)
        included = True
    probe = server.connection.probe_host(ssh_config if included else entries, alias)
    if probe.returncode != 0:
        problem = (probe.stderr.strip().splitlines() or ["no reason given"])[-1]
        if "Host key verification failed" in probe.stderr:
            hint = f"the node's host key is not known here yet: run 'ssh {alias}' once to check and accept it"
        else:
            hint = (
                f"the site may not allow ssh into compute nodes; 'sl-forgery shell {job_id}' gives a shell in the job"
            )
        raise SlForgeryError(f"ssh to job {job_id}'s node through the connection failed ({problem}): {hint}")
    print(alias, flush=True)
    if not included:
        print(f"for your editor to find {alias}, add this line at the top of {ssh_config}:\n  {line}", file=sys.stderr)
    editor = ["code", "--remote", f"ssh-remote+{alias}", args.path or server.remote_home()]
    if included and shutil.which("code"):
        return subprocess.run(editor).returncode
    return _say(args, f"open it with: {shlex.join(editor)}   (or: ssh {alias})")


def _recent_ids(server: Server, count: int = 10) -> list[str]:
    records = sorted(load_job_records(server.profile.name).values(), key=lambda record: record.submitted)
    return [record.job_id for record in records[-count:]]


def cmd_status(args: Any) -> int:
    server = _open_server(args)
    ids = _job_ids(args.job_ids) if args.job_ids else _recent_ids(server)
    infos = server.job_info(ids) if ids else {}
    if args.json:
        _print_json({"jobs": [info.to_json() for info in infos.values()]})
    elif infos:
        _print_table(
            ["JOBID", "STATE", "EXIT", "NAME", "REASON"],
            [
                [i.job_id, i.status, "" if i.exit_code is None else i.exit_code, i.name, i.reason]
                for i in infos.values()
            ],
        )
    return EXIT_OK


def cmd_cancel(args: Any) -> int:
    server = _open_server(args)
    ids = _job_ids(args.job_ids)
    ended = server.cancel(ids)
    cancelled = [job_id for job_id in ids if job_id not in ended]
    if cancelled:
        _say(args, f"cancelled {' '.join(cancelled)}")
    if ended:
        _say(args, f"{'jobs' if len(ended) > 1 else 'job'} {' '.join(ended)} had already ended")
    return EXIT_OK


def cmd_logs(args: Any) -> int:
    server = _open_server(args)
    if not args.follow:
        server.write_log(args.job_id, _write_stdout, error=args.err, lines=args.lines)
        return EXIT_OK
    try:
        infos = server.follow_log(args.job_id, _write_stdout, error=args.err)
    except SessionsBusy as busy:
        raise SlForgeryError(f"{busy}; try again when one ends, or read the log without --follow") from None
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return exit_code_for(infos.values())


def cmd_queue(args: Any) -> int:
    server = _open_server(args)
    jobs = server.queue()
    if args.json:
        _print_json({"jobs": [info.to_json() for info in jobs]})
    elif jobs:
        _print_table(
            ["JOBID", "STATE", "NAME", "NODE", "TIME LEFT", "REASON"],
            [[i.job_id, i.status, i.name, i.node, i.time_left, i.reason] for i in jobs],
        )
    return EXIT_OK


def cmd_history(args: Any) -> int:
    since = time.time() - parse_duration(args.since) if args.since else 0
    # A server (--server, else SL_FORGERY_SERVER) filters; without one, every server's jobs are listed.
    server = args.server or os.environ.get("SL_FORGERY_SERVER")
    remembered = load_job_records(server)
    if server and not remembered:
        load_config().profile(server)  # a mistyped name fails as it does for every command
    records = [r for r in remembered.values() if r.submitted >= since]
    records.sort(key=lambda record: record.submitted)
    if args.json:
        _print_json({"jobs": [record._asdict() for record in records]})
    elif records:
        _print_table(
            ["JOBID", "SERVER", "SUBMITTED", "NAME", "WORKDIR"],
            [
                [
                    r.job_id,
                    r.server,
                    time.strftime("%Y-%m-%d %H:%M", time.localtime(r.submitted)),
                    r.name,
                    r.working_directory,
                ]
                for r in records
            ],
        )
    return EXIT_OK


# -- connection and checks ---------------------------------------------------------------------------------------------


def cmd_connect(args: Any) -> int:
    server = _open_server(args)
    started = server.connect()
    return _say(args, f"{'connected to' if started else 'already connected to'} {server.destination}")


def cmd_disconnect(args: Any) -> int:
    server = _open_server(args)
    stopped = server.disconnect()
    return _say(args, f"{'disconnected from' if stopped else 'no connection to'} {server.destination}")


def _say(args: Any, message: str) -> int:
    """Report a done action on stderr, unless --quiet."""
    if not args.quiet:
        print(message, file=sys.stderr)
    return EXIT_OK


def _print_checks(rows: list[list[str]]) -> int:
    """The table, and its exit code: 255 when the server cannot be reached (as for every command), 1 when another
    check fails."""
    _print_table(["CHECK", "RESULT", "DETAIL", "FIX"], rows)
    if ["connection", "FAIL"] in (row[:2] for row in rows):
        return EXIT_SSH
    return EXIT_OK if all(row[1] in ("ok", NOT_CHECKED) for row in rows) else EXIT_FAILURE


def cmd_check(args: Any) -> int:
    return _print_checks(_open_server(args).checks())


def _local_checks() -> list[list[str]]:
    rows = []
    version = _run(["ssh", "-V"], timeout=10)
    text = (version.stderr or version.stdout).strip()
    match = re.search(r"OpenSSH_(\d+)\.(\d+)", text)
    if match and (int(match.group(1)), int(match.group(2))) >= (7, 3):
        rows.append(["openssh", "ok", f"{text.split(',')[0]} (ControlMaster, ControlPersist, ProxyJump)", ""])
    else:
        rows.append(["openssh", "FAIL", text or "ssh not found", "install OpenSSH 7.3 or newer"])
    path = config_path()
    config = None
    try:
        config = load_config()
        if config.servers:
            rows.append(["config", "ok", f"{path} ({len(config.servers)} servers, mode 0600)", ""])
        else:
            rows.append(["config", "FAIL", f"no server in {path}", "sl-forgery server add NAME --host H --user U"])
    except ConfigError as error:
        rows.append(["config", "FAIL", str(error), "fix or move the file as the detail says"])
    needing = sorted(p.name for p in config.servers.values() if p.password_in_keyring) if config else []
    try:
        backend = secure_keyring()
        needed = f"for {', '.join(needing)}" if needing else "not needed: no profile keeps a password"
        rows.append(["keyring", "ok", f"{type(backend).__module__}.{type(backend).__name__} ({needed})", ""])
    except CredentialError as error:
        reason = str(error).split(";")[0]
        if needing:
            fix = "use SSH keys ('sl-forgery server setup-key'), or install a Secret Service backend"
            rows.append(["keyring", "FAIL", f"{reason}; needed for {', '.join(needing)}", fix])
        else:
            rows.append(["keyring", "ok", f"not needed: no profile keeps a password ({reason})", ""])
    return rows


def cmd_doctor(args: Any) -> int:
    rows = _local_checks()
    try:
        server = _open_server(args)
    except ConfigError as error:
        rows.append(["server", "FAIL", str(error), "sl-forgery server add NAME --host H --user U"])
    else:
        rows += server.checks()
    return _print_checks(rows)


# -- server profiles ---------------------------------------------------------------------------------------------------


def _read_new_password(args: Any) -> str | None:
    if getattr(args, "password_stdin", False):
        return sys.stdin.readline().rstrip("\n")
    if getattr(args, "password", False):
        return prompt_password(f"password for {args.user}@{args.host}: ")
    return None


def prompt_password(prompt: str) -> str:
    """A password typed at the terminal (not echoed), else a line read from stdin; a `UsageError` when neither
    gives one."""
    import getpass

    try:
        terminal = open("/dev/tty", "rb")  # noqa: SIM115 - only to learn whether there is one
    except OSError:
        password = sys.stdin.readline() if sys.stdin is not None else ""
    else:
        terminal.close()
        try:
            password = getpass.getpass(prompt)
        except EOFError:
            password = ""
    password = password.rstrip("\r\n")
    if not password:
        raise UsageError("no password given: there is no terminal to ask on and stdin gave none; pass it on stdin")
    return password


# A profile key's `server add` flag is its name with dashes, but for these two.
_SERVER_ADD_DESTINATIONS = {"ssh_options": "ssh_option", "conda_environment": "conda_env"}


def _check_new_profile(profile: Profile) -> None:
    """Refuse, before anything is saved, a name or value the servers file would refuse when it is read back."""
    problem = profile_name_problem(profile.name)
    for key in PROFILE_KEYS:
        value = getattr(profile, key)
        if problem is None and value not in (None, []):
            problem = profile_field_problem(key, value, "--" + _SERVER_ADD_DESTINATIONS.get(key, key).replace("_", "-"))
    if problem:
        raise UsageError(problem)


def cmd_server_add(args: Any) -> int:
    config = load_config()
    if args.name in config.servers and not args.replace:
        raise UsageError(f"server {args.name!r} already exists in {config.path}; pass --replace to overwrite it")
    given = {key: getattr(args, _SERVER_ADD_DESTINATIONS.get(key, key), None) for key in PROFILE_KEYS}
    given["ssh_options"] = list(given["ssh_options"] or [])
    given["password_in_keyring"] = False  # set below, once the password is stored
    profile = Profile(name=args.name, **{key: value for key, value in given.items() if value is not None})
    _check_new_profile(profile)
    if args.accept_host_key:
        fingerprints = Server(profile=profile, verbose=args.verbose).accept_host_key()
        print(f"accepted the host key of {profile.host}:\n{fingerprints.rstrip()}", file=sys.stderr)
    password = _read_new_password(args)
    if password is not None:
        store_password(profile.keyring_account, password)
        profile.password_in_keyring = True
    config.servers[profile.name] = profile
    if args.default or not config.default:
        config.default = profile.name
    config.save()
    return _say(args, f"added server {profile.name!r} to {config.path}")


def cmd_server_list(args: Any) -> int:
    config = load_config()
    if args.json:
        _print_json(
            {
                "default": config.default,
                "servers": [{"name": p.name, **p.to_yaml_dict()} for p in config.servers.values()],
            }
        )
    elif config.servers:
        _print_table(
            ["NAME", "DEFAULT", "DESTINATION", "AUTH"],
            [
                [
                    p.name,
                    "*" if p.name == config.default else "",
                    SSHConnection(p).describe(),
                    "keyring password" if p.password_in_keyring else "ssh (keys, agent, config)",
                ]
                for p in config.servers.values()
            ],
        )
    return EXIT_OK


def cmd_server_show(args: Any) -> int:
    config = load_config()
    profile = config.profile(args.name)
    import yaml

    print(yaml.safe_dump({profile.name: profile.to_yaml_dict()}, sort_keys=False), end="")
    return EXIT_OK


def cmd_server_remove(args: Any) -> int:
    config = load_config()
    profile = config.profile(args.name)
    sharing = profiles_sharing_password(config, profile)
    del config.servers[profile.name]
    if config.default == profile.name:
        config.default = None
    config.save()
    if profile.password_in_keyring and sharing:
        return _say(
            args,
            f"removed server {profile.name!r}; its password stays in the keyring for {', '.join(map(repr, sharing))}",
        )
    if profile.password_in_keyring:
        delete_password(profile.keyring_account)
    return _say(args, f"removed server {profile.name!r}")


def cmd_server_default(args: Any) -> int:
    config = load_config()
    config.default = config.profile(args.name).name
    config.save()
    return EXIT_OK


def cmd_server_import(args: Any) -> int:
    config = load_config()
    name = args.name or None
    had_password = bool(read_legacy_credentials(Path(args.file)).get("password"))
    profile = import_legacy_credentials(Path(args.file), name, config)
    if not had_password:
        return _say(args, f"imported {args.file} as server {profile.name!r} (it held no password)")
    return _say(
        args,
        f"imported {args.file} as server {profile.name!r}: its password moved to the OS keyring "
        f"({profile.keyring_account}) and {args.file} was rewritten without it; no copy of the old file was kept",
    )


def cmd_server_setup_key(args: Any) -> int:
    server = Server.from_profile(args.name, verbose=args.verbose)
    key, created = server.setup_key(args.key)
    if created:
        print(f"created {key} (no passphrase; add one with 'ssh-keygen -p -f {key}')", file=sys.stderr)
    return _say(args, f"{server.profile.name}: key login works with {key}; the password is no longer needed or kept")


# -- Jupyter -----------------------------------------------------------------------------------------------------------


def _interrupt_on_hangup() -> None:
    """SIGTERM and SIGHUP (the terminal closed, `timeout`, a logout) act as Ctrl-C does, so that a job and a tunnel
    that only this process would stop are not left running."""
    import signal

    def interrupt(signal_number: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)


def cmd_jupyter(args: Any) -> int:
    values = _flag_values(args)
    server = _dry_run_server(args) if args.dry_run else _open_server(args)
    environment = choose(args.env, server.profile, "conda_environment")
    if not environment:
        raise UsageError("no conda environment with jupyterlab given: pass --env ENV (or set conda_environment)")
    home = _plan_home(server, args.dry_run) if args.dry_run or not server.profile.working_root else None
    if args.dir:
        notebooks = args.dir
    elif server.profile.working_root:
        notebooks = str(PurePosixPath(server.profile.working_root, server.profile.user or ""))
    else:
        notebooks = home or server.remote_home()
    job = server.build_jupyter_job(
        "jupyter",
        environment,
        notebooks,
        home=home,
        setup=args.setup,
        env_manager=args.env_manager,
        port=args.port,
        jupyter_args=args.jupyter_args or "",
        **values,
    )
    if args.dry_run:
        if args.json:
            raise UsageError("--dry-run prints the job script, not JSON: leave out --json")
        return _print_dry_run(server, server.plan_job(job))
    _interrupt_on_hangup()
    try:
        server.start_jupyter(job, wait_timeout=args.wait_timeout, on_change=Progress(quiet=args.quiet))
    except JupyterError as error:
        if error.log_tail.strip():
            print(f"--- last lines of the job's error log ---\n{error.log_tail.rstrip()}", file=sys.stderr)
        raise
    # From here a Ctrl-C, even one that comes while the URL is printed or the browser starts, stops the job.
    try:
        if args.json:
            # The document `jupyter list --json` prints, for this server alone: scripts get the job id to stop it by.
            _print_json({"servers": [_jupyter_entry(job, server.job_info([job.job_id])[job.job_id])]})
            sys.stdout.flush()
        else:
            print(job.url, flush=True)
        if args.open:
            import webbrowser

            webbrowser.open(browser_redirect_file(job).as_uri())
        if args.detach:
            return _say(args, f"Jupyter job {job.job_id} keeps running; 'sl-forgery jupyter stop {job.job_id}' ends it")
        if not args.quiet:
            print(f"Jupyter job {job.job_id} runs on {job.host}; Ctrl-C stops it", file=sys.stderr, flush=True)
        infos = server.wait([job.job_id])
    except KeyboardInterrupt:
        server.stop_jupyter(job.job_id)
        print(f"\n{APP_NAME}: stopped Jupyter job {job.job_id}", file=sys.stderr)
        return EXIT_INTERRUPTED
    server.stop_jupyter(job.job_id)
    return exit_code_for(infos.values())


def browser_redirect_path(job_id: str) -> Path:
    return state_dir() / f"jupyter-{job_id}-open.html"


def browser_redirect_file(job: JupyterJob) -> Path:
    """A private page that sends a browser on to the job's URL: a browser opened on it has no token in its command
    line, which every user can read (ps); Jupyter's own redirect file works the same way."""
    import html

    assert job.job_id and job.url
    url = html.escape(job.url, quote=True)
    path = browser_redirect_path(job.job_id)
    _private_dir(path.parent)
    write_private_file(
        path,
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="0;url={url}">'
        f'</head>\n<body><a href="{url}">Jupyter job {job.job_id}</a></body></html>\n',
    )
    return path


def _jupyter_entry(job: JupyterJob, info: JobInfo) -> dict[str, Any]:
    return {
        "job_id": job.job_id,
        "state": info.status.value,
        "node": info.node or job.host,
        "time_left": info.time_left,
        "url": job.url,
    }


def cmd_jupyter_list(args: Any) -> int:
    server = _open_server(args)
    running = server.list_jupyter()
    if args.json:
        _print_json({"servers": [_jupyter_entry(job, info) for job, info in running]})
    elif running:
        _print_table(
            ["JOBID", "STATE", "NODE", "TIME LEFT", "URL"],
            [[job.job_id, info.status, info.node or job.host, info.time_left, job.url] for job, info in running],
        )
    return EXIT_OK


def cmd_jupyter_connect(args: Any) -> int:
    job = _open_server(args).connect_jupyter(args.job_id)
    print(job.url)
    return EXIT_OK


def cmd_jupyter_stop(args: Any) -> int:
    _open_server(args).stop_jupyter(args.job_id)
    return _say(args, f"stopped Jupyter job {normalize_job_id(args.job_id)}")


# -- completion --------------------------------------------------------------------------------------------------------


def cmd_completion(args: Any) -> int:
    print(completion_script(args.shell), end="")
    return EXIT_OK


def completion_script(shell: str) -> str:
    """The completion script for a shell, generated from `get_parser` (bash and zsh by shtab, fish here)."""
    parser = get_parser()
    if shell == "fish":
        return render_fish_completion(parser)
    import shtab

    return shtab.complete(parser, shell=shell, preamble=_COMPLETION_PREAMBLE[shell]) + "\n"


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def render_fish_completion(parser: Any) -> str:
    """A fish completion script walked from the argparse parser: sub-commands, their options, and the same
    server-name and job-id sources as bash and zsh."""
    import argparse

    lines = [f"# fish completion for {parser.prog}, generated from its argument parser", _COMPLETION_PREAMBLE["fish"]]
    lines.append(f"complete -c {parser.prog} -f")

    def describe(action: Any) -> str:
        return (
            f" -d {_fish_quote(action.help.splitlines()[0])}" if action.help and action.help != "==SUPPRESS==" else ""
        )

    def values(action: Any) -> str:
        source = getattr(action, "complete", {}).get("fish")
        if source == "files":
            return " -F"
        if source:
            return f" -a {_fish_quote(source)}"
        if action.choices:
            return f" -a {_fish_quote(' '.join(action.choices))}"
        return ""

    def walk(current: Any, path: list[str]) -> None:
        tests = [f"__fish_seen_subcommand_from {word}" for word in path] or ["__fish_use_subcommand"]
        condition = f"-n {_fish_quote('; and '.join(tests))}"
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                names = " ".join(action.choices)
                listing = tests if not path else [*tests, f"not __fish_seen_subcommand_from {names}"]
                for choice in action._choices_actions:
                    lines.append(
                        f"complete -c {parser.prog} -n {_fish_quote('; and '.join(listing))} -a {choice.dest}"
                        f"{describe(choice)}"
                    )
                for name, child in action.choices.items():
                    walk(child, [*path, name])
            elif action.option_strings:
                flags = "".join(f" -l {o[2:]}" if o.startswith("--") else f" -s {o[1:]}" for o in action.option_strings)
                # -x: an argument is required and no local file is offered, unless the option names a file.
                value = "" if action.nargs == 0 else f" -{'r' if values(action) == ' -F' else 'x'}{values(action)}"
                lines.append(f"complete -c {parser.prog} {condition}{flags}{value}{describe(action)}")
            elif path and values(action):
                lines.append(f"complete -c {parser.prog} {condition}{values(action)}")

    walk(parser, [])
    return "\n".join(lines) + "\n"


COMPLETION_SHELLS = ("bash", "zsh", "fish")
# Candidates are printed one a line and never expanded again by the shell; and only names sl-forgery itself
# accepts are offered, so that no server name from a copied servers file can become shell code.
_SERVERS_SED = "sed -n 's/^  \\([A-Za-z0-9_.][A-Za-z0-9_.-]*\\):\\( .*\\)\\{0,1\\}$/\\1/p'"
_JOBS_SED = 'sed -n \'s/^{"job_id": "\\([0-9_]*\\)".*/\\1/p\''
_COMPLETION_PREAMBLE = {
    "bash": f"""
_sl_forgery_matching() {{
  local candidate
  while IFS= read -r candidate; do
    [[ "$candidate" == "$1"* ]] && printf '%s\\n' "$candidate"
  done
  return 0
}}
_sl_forgery_servers() {{
  local file="${{SL_FORGERY_CONFIG:-${{XDG_CONFIG_HOME:-$HOME/.config}}/sl-forgery/servers.yaml}}"
  [ -r "$file" ] && {_SERVERS_SED} "$file" | _sl_forgery_matching "$1"
}}
_sl_forgery_jobs() {{
  local file="${{XDG_STATE_HOME:-$HOME/.local/state}}/sl-forgery/jobs.jsonl"
  [ -r "$file" ] && tail -n 50 "$file" | {_JOBS_SED} | _sl_forgery_matching "$1"
}}
""",
    "zsh": f"""
_sl_forgery_servers() {{
  local file="${{SL_FORGERY_CONFIG:-${{XDG_CONFIG_HOME:-$HOME/.config}}/sl-forgery/servers.yaml}}"
  [ -r "$file" ] && compadd -- ${{(f)"$({_SERVERS_SED} "$file")"}}
}}
_sl_forgery_jobs() {{
  local file="${{XDG_STATE_HOME:-$HOME/.local/state}}/sl-forgery/jobs.jsonl"
  [ -r "$file" ] && compadd -- ${{(f)"$(tail -n 50 "$file" | {_JOBS_SED})"}}
}}
""",
    "fish": f"""function __sl_forgery_servers
    set -l config_home $HOME/.config
    set -q XDG_CONFIG_HOME; and set config_home $XDG_CONFIG_HOME
    set -l file $config_home/sl-forgery/servers.yaml
    set -q SL_FORGERY_CONFIG; and set file $SL_FORGERY_CONFIG
    test -r $file; and {_SERVERS_SED} $file
end
function __sl_forgery_jobs
    set -l state_home $HOME/.local/state
    set -q XDG_STATE_HOME; and set state_home $XDG_STATE_HOME
    set -l file $state_home/sl-forgery/jobs.jsonl
    test -r $file; and tail -n 50 $file | {_JOBS_SED}
end""",
}
_COMPLETE_SERVER = {"bash": "_sl_forgery_servers", "zsh": "_sl_forgery_servers", "fish": "(__sl_forgery_servers)"}
_COMPLETE_JOB = {"bash": "_sl_forgery_jobs", "zsh": "_sl_forgery_jobs", "fish": "(__sl_forgery_jobs)"}
_COMPLETE_FILE = {"bash": "_shtab_compgen_files", "zsh": "_files", "fish": "files"}


# -- the parser --------------------------------------------------------------------------------------------------------


def _print_usage(parser: Any) -> int:
    """A command that needs an action was given none: show its help on stderr."""
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _add_resource_options(parser: Any) -> None:
    """The resource flags, from the one table of sbatch options."""
    group = parser.add_argument_group("resources")
    metavars = {"--time": "MIN", "--workdir": "DIR", "--name": "NAME", "--mem": "GB", "--cpus": "N", "--gpus": "N"}
    for option in SBATCH_OPTIONS:
        if option.flag:
            group.add_argument(
                option.flag, type=option.kind, metavar=metavars.get(option.flag, "VALUE"), help=option.help
            )


def _add_setup_option(parser: Any, which: str = "after the profile's own") -> None:
    parser.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help=f"a shell line run before the environment is activated, e.g. 'module load miniconda3' (repeatable; "
        f"{which})",
    )


def _add_environment_options(parser: Any, env_help: str) -> None:
    parser.add_argument("--env", metavar="ENV", help=env_help)
    parser.add_argument(
        "--env-manager", choices=ENV_MANAGERS, help="what ENV is (default: conda for a name, found out for a path)"
    )
    _add_setup_option(parser)


class _Unbuilt:
    """A sub-command's parser that this run does not need (see `get_parser`): it takes every call and builds
    nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self


def _command_word(words: Sequence[str]) -> str | None:
    """The word naming the sub-command, after the options every command takes (``-s NAME``, ``-v``, ``-q``)."""
    takes_value = False
    for word in words:
        if takes_value:
            takes_value = False
        elif word in ("-s", "--server") or (re.fullmatch(r"-[vq]+s", word) is not None):
            takes_value = True
        elif word == "--" or not word.startswith("-"):
            return None if word == "--" else word
    return None


def _one_line_errors_parser() -> Any:
    """argparse's parser, but a wrong flag or value gets one line naming it and where the right ones are, not the
    whole usage block above it."""
    import argparse

    class OneLineErrorsParser(argparse.ArgumentParser):
        def error(self, message: str) -> Any:
            self.exit(EXIT_USAGE, f"{self.prog.split()[0]}: error: {message} (see '{self.prog} --help')\n")

    return OneLineErrorsParser


def get_parser(only: str | None = None) -> Any:
    """The whole command line, built once here; completion scripts are generated from it. With ``only``, the
    sub-commands other than that one are left out (building all of them costs more than a submission's round
    trip)."""
    import argparse

    def common_options(default: Any) -> Any:
        # Sub-commands take the same options, with defaults suppressed, so that "-s NAME status" is not undone
        # by the sub-command's own default.
        options = argparse.ArgumentParser(add_help=False, argument_default=default)
        options.add_argument(
            "-s", "--server", metavar="NAME", help="server profile (default: the configured default)"
        ).complete = _COMPLETE_SERVER  # type: ignore[attr-defined]
        options.add_argument(
            "-v", "--verbose", action="store_true", help="show the ssh commands and full error details"
        )
        options.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
        return options

    common = common_options(argparse.SUPPRESS)
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="one JSON document on stdout")

    parser = _one_line_errors_parser()(
        prog=APP_NAME,
        description="Run commands on a remote SLURM cluster as if they were local.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common_options(None)],
    )
    parser.add_argument("--version", action="version", version=f"{APP_NAME} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, handler: Callable[[Any], int], help_text: str, *parents: Any, **kwargs: Any) -> Any:
        if only is not None and name != only:
            return _Unbuilt()
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[common, *parents], **kwargs)
        sub.set_defaults(handler=handler)
        return sub

    end_options = argparse.ArgumentParser(add_help=False)
    group = end_options.add_argument_group("when the jobs end")
    group.add_argument(
        "--notify",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a desktop notification here (default: the profile's notify setting)",
    )
    group.add_argument(
        "--on-end", metavar="CMD", help="run CMD here through your shell, with SL_FORGERY_JOB_ID, _STATE, _EXIT_CODE"
    )
    group.add_argument("--report", action="store_true", help="print what each job used of what it asked for")
    group.add_argument(
        "--cancel-impossible",
        action="store_true",
        help="cancel a job that can never start as submitted (exit 78 either way)",
    )
    sync_options = argparse.ArgumentParser(add_help=False)
    group = sync_options.add_argument_group("files around the job (rsync over the shared connection)")
    group.add_argument("--sync-up", metavar="DIR", help="copy DIR into the job's working directory before it starts")
    group.add_argument("--sync-down", metavar="DIR", help="with --wait: copy the job's working directory into DIR")

    sub = command("submit", cmd_submit, "submit a local batch script; prints the job id", end_options, sync_options)
    sub.add_argument("script", metavar="SCRIPT").complete = _COMPLETE_FILE  # type: ignore[attr-defined]
    _add_resource_options(sub)
    _add_setup_option(sub, "after the script's #SBATCH lines; the profile's are for the jobs sl-forgery writes")
    sub.add_argument("--wait", action="store_true", help="follow the job to its end and exit with its code")
    sub.add_argument("--timeout", type=float, metavar="SECONDS", help="with --wait: give up after this long (exit 124)")
    sub.add_argument("--dry-run", action="store_true", help="print what would be submitted; connect to nothing")

    sub = command("run", cmd_run, "run a command as a batch job, as if it ran here", end_options, sync_options)
    _add_environment_options(sub, "environment to activate: a conda environment, or a venv, uv or pixi path")
    _add_resource_options(sub)
    sub.add_argument("--wait", action="store_true", help="follow the job, print its output, exit with its code")
    sub.add_argument("--timeout", type=float, metavar="SECONDS", help="with --wait: give up after this long (exit 124)")
    sub.add_argument("--dry-run", action="store_true", help="print the job script; connect to nothing")
    sub.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")

    sub = command("wait", cmd_wait, "wait for jobs to end; exit 0 when all COMPLETED", json_flag, end_options)
    sub.add_argument("job_ids", nargs="+", metavar="JOBID").complete = _COMPLETE_JOB  # type: ignore[attr-defined]
    sub.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this long (exit 124)")

    sub = command("status", cmd_status, "state, exit code and reason of jobs (default: your recent jobs)", json_flag)
    sub.add_argument("job_ids", nargs="*", metavar="JOBID").complete = _COMPLETE_JOB  # type: ignore[attr-defined]

    sub = command(
        "report", cmd_report, "elapsed vs limit, CPU use, peak vs asked memory of jobs, with a suggestion", json_flag
    )
    sub.add_argument("job_ids", nargs="+", metavar="JOBID").complete = _COMPLETE_JOB  # type: ignore[attr-defined]

    sub = command("shell", cmd_shell, "a login shell inside a running job, or in a new job holding resources")
    sub.add_argument("job_id", nargs="?", metavar="JOBID").complete = _COMPLETE_JOB  # type: ignore[attr-defined]
    _add_environment_options(sub, "environment to activate in the shell (which is then bash)")
    _add_resource_options(sub)
    after = sub.add_mutually_exclusive_group()
    after.add_argument("--keep", action="store_true", help="leave a job started for the shell running after it")
    after.add_argument(
        "--cancel",
        action="store_true",
        help="cancel a job started for the shell after it (default without a terminal: asked on one)",
    )

    sub = command("forward", cmd_forward, "forward a local port to a port of a job's node; prints its URL", json_flag)
    sub.add_argument("job_id", nargs="?", metavar="JOBID").complete = _COMPLETE_JOB  # type: ignore[attr-defined]
    sub.add_argument("port", nargs="?", type=int, metavar="PORT", help="the port on the job's node")
    sub.add_argument("--local", type=int, metavar="PORT", help="this local port (default: a free one)")
    sub.add_argument("--list", action="store_true", help="the forwards made from here to running jobs")
    sub.add_argument(
        "--stop", action="store_true", help="remove the forwards to JOBID (to PORT, if given) and what they started"
    )
    sub.add_argument(
        "--tensorboard", metavar="LOGDIR", help="start TensorBoard on LOGDIR (on the server) as a step of JOBID"
    )
    sub.add_argument("--new", action="store_true", help="with --tensorboard: in a job of its own instead")
    _add_environment_options(sub, "environment with tensorboard (default: the profile's)")
    _add_resource_options(sub)
    sub.add_argument("--detach", action="store_true", help="return at once; the forward stays in the connection")
    sub.add_argument(
        "--wait-timeout",
        type=float,
        default=60,
        metavar="SECONDS",
        help="how long the job may take to start and its port (or TensorBoard) to answer (default 60)",
    )

    sub = command("sync", cmd_sync, "copy a directory up to the server or down from it (rsync over the connection)")
    sub.add_argument("direction", choices=("up", "down"))
    sub.add_argument("source", metavar="FROM", help="a local path (up) or a path on the server (down)")
    sub.add_argument("destination", metavar="TO", help="a directory on the server (up) or here (down)")
    sub.add_argument("-n", "--dry-run", action="store_true", help="list the files that would be copied")
    sub.add_argument("--delete", action="store_true", help="also delete files in TO that FROM does not have")
    sub.add_argument("--no-gitignore", action="store_true", help="copy what .gitignore files exclude, too")

    sub = command("code", cmd_code, "VS Code (or any ssh editor) on a job's node, through the shared connection")
    sub.add_argument("job_id", nargs="?", metavar="JOBID").complete = _COMPLETE_JOB  # type: ignore[attr-defined]
    sub.add_argument("path", nargs="?", metavar="PATH", help="folder on the node to open (default: your home)")
    _add_resource_options(sub)
    sub.add_argument(
        "--include", action="store_true", help="add the Include of sl-forgery's Host entries to your ssh config"
    )
    sub.add_argument("--cleanup", action="store_true", help="remove the Host entries of jobs that have ended")

    sub = command("cancel", cmd_cancel, "cancel jobs")
    sub.add_argument("job_ids", nargs="+", metavar="JOBID").complete = _COMPLETE_JOB  # type: ignore[attr-defined]

    sub = command("logs", cmd_logs, "print a job's output log (or error log)")
    sub.add_argument("job_id", metavar="JOBID").complete = _COMPLETE_JOB  # type: ignore[attr-defined]
    sub.add_argument("--err", action="store_true", help="the error log instead of the output log")
    sub.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    sub.add_argument("-n", "--lines", type=int, metavar="N", help="only the last N lines")

    command("queue", cmd_queue, "your jobs in the queue", json_flag)
    sub = command(
        "history", cmd_history, "jobs submitted from this machine, to every server unless -s names one", json_flag
    )
    sub.add_argument("--since", metavar="DURATION", help="only this recent, e.g. 2h or 3d")

    command("connect", cmd_connect, "open the shared connection to the server (later calls reuse it)")
    command("disconnect", cmd_disconnect, "close the shared connection")
    command("check", cmd_check, "check the connection, SLURM, accounting, modules and the environment on the server")
    command("doctor", cmd_doctor, "check OpenSSH, the config file, the keyring, then the server; a fix per failure")

    server_parser = command("server", lambda args: _print_usage(server_parser), "manage server profiles")
    servers = server_parser.add_subparsers(dest="server_command", metavar="ACTION")

    def server_command(name: str, handler: Callable[[Any], int], help_text: str, *parents: Any) -> Any:
        action = servers.add_parser(name, help=help_text, description=help_text, parents=[common, *parents])
        action.set_defaults(handler=handler)
        return action

    add = server_command("add", cmd_server_add, "add a server profile")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--host", required=True, help="host name, address or ~/.ssh/config alias")
    add.add_argument("--user", help="user name on the server")
    add.add_argument("--port", type=int)
    add.add_argument("--identity-file", metavar="KEY").complete = _COMPLETE_FILE  # type: ignore[attr-defined]
    add.add_argument(
        "--ssh-config", metavar="FILE", help="ssh config file to use instead of ~/.ssh/config"
    ).complete = _COMPLETE_FILE  # type: ignore[attr-defined]
    add.add_argument("--ssh-option", action="append", metavar="OPTION", help="extra ssh -o option (repeatable)")
    add.add_argument("--storage-root")
    add.add_argument("--working-root")
    add.add_argument("--shared-directory-name")
    add.add_argument("--conda-env", metavar="ENV", help="default environment (conda name, venv, uv or pixi path)")
    add.add_argument("--env-manager", choices=ENV_MANAGERS, help="what the environments are (default: inferred)")
    add.add_argument("--setup", action="append", metavar="LINE", help="a shell line every job runs first (repeatable)")
    add.add_argument("--partition")
    add.add_argument("--account")
    add.add_argument(
        "--control-persist",
        type=int,
        metavar="SECONDS",
        help=f"how long an idle connection stays open; a password or 2FA is asked again after (default "
        f"{DEFAULT_CONTROL_PERSIST})",
    )
    add.add_argument(
        "--max-sessions", type=int, metavar="N", help="sessions the server allows per connection (default: found out)"
    )
    secret = add.add_mutually_exclusive_group()
    secret.add_argument("--password", action="store_true", help="prompt for a password and keep it in the OS keyring")
    secret.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.add_argument(
        "--accept-host-key",
        action="store_true",
        help="fetch the server's host key, show its fingerprint and record it in known_hosts",
    )
    add.add_argument("--default", action="store_true", help="make it the default server")
    add.add_argument("--replace", action="store_true", help="overwrite a profile of the same name")
    server_command("list", cmd_server_list, "list server profiles", json_flag)
    for name, handler, help_text in (
        ("show", cmd_server_show, "print a profile"),
        ("remove", cmd_server_remove, "remove a profile and its keyring entry"),
        ("default", cmd_server_default, "make a profile the default"),
    ):
        action = server_command(name, handler, help_text)
        action.add_argument("name", metavar="NAME").complete = _COMPLETE_SERVER  # type: ignore[attr-defined]
    action = server_command(
        "check", lambda a: cmd_check(argparse.Namespace(**{**vars(a), "server": a.name})), "check a server"
    )
    action.add_argument("name", metavar="NAME").complete = _COMPLETE_SERVER  # type: ignore[attr-defined]
    action = server_command(
        "setup-key",
        cmd_server_setup_key,
        "create an ed25519 key if needed and install it on the server, so no password is needed",
    )
    action.add_argument("name", metavar="NAME").complete = _COMPLETE_SERVER  # type: ignore[attr-defined]
    action.add_argument(
        "--key", metavar="FILE", help="private key to use or create (default ~/.ssh/id_ed25519)"
    ).complete = _COMPLETE_FILE  # type: ignore[attr-defined]
    action = server_command(
        "import", cmd_server_import, "import a legacy server_credentials.yaml (the password moves to the keyring)"
    )
    action.add_argument("file", metavar="FILE").complete = _COMPLETE_FILE  # type: ignore[attr-defined]
    action.add_argument("--name", help="profile name (default: the host)")

    sub = command("jupyter", cmd_jupyter, "run Jupyter Lab as a job and print a URL that works here", json_flag)
    sub.add_argument("-e", "--env", metavar="ENV", help="environment with jupyterlab (conda name, venv, uv or pixi)")
    sub.add_argument("--env-manager", choices=ENV_MANAGERS, help="what ENV is (default: conda for a name)")
    _add_setup_option(sub)
    cpus, mem, minutes = (JUPYTER_DEFAULTS[field] for field in ("cpus_to_use", "ram_gb", "time_limit"))
    sub.add_argument("-c", "--cpus", type=int, metavar="N", help=f"CPUs (default {cpus})")
    sub.add_argument("-m", "--mem", type=float, metavar="GB", help=f"memory in GB (default {mem})")
    sub.add_argument("-t", "--time", type=int, metavar="MIN", help=f"time limit in minutes (default {minutes})")
    sub.add_argument("-p", "--port", type=int, default=0, help="port on the node (default 0: any free port)")
    sub.add_argument(
        "--dir", metavar="DIR", help="notebook directory on the server (default: working_root/USER, else your home)"
    )
    sub.add_argument("--partition", metavar="P")
    sub.add_argument(
        "--jupyter-args",
        metavar="ARGS",
        help="extra arguments for 'jupyter lab', as one word: --jupyter-args='--ServerApp.x=1 --y'",
    )
    sub.add_argument("--wait-timeout", type=float, metavar="SECONDS", help="cancel if not started by then (exit 124)")
    sub.add_argument("--detach", action="store_true", help="leave it running and return")
    sub.add_argument("--open", action="store_true", help="open the URL in a browser")
    sub.add_argument("--dry-run", action="store_true", help="print the job script; connect to nothing")
    jupyter_actions = sub.add_subparsers(dest="jupyter_command", metavar="ACTION")
    for name, handler, help_text in (
        ("list", cmd_jupyter_list, "running Jupyter servers started from here"),
        ("connect", cmd_jupyter_connect, "re-create the tunnel to a running server"),
        ("stop", cmd_jupyter_stop, "end a Jupyter server"),
    ):
        action = jupyter_actions.add_parser(
            name, help=help_text, description=help_text, parents=[common, *([json_flag] if name == "list" else [])]
        )
        action.set_defaults(handler=handler)
        if name != "list":
            action.add_argument("job_id", metavar="JOBID").complete = _COMPLETE_JOB  # type: ignore[attr-defined]

    sub = command("completion", cmd_completion, "print a shell completion script")
    sub.add_argument("shell", choices=COMPLETION_SHELLS)
    return parser


# -- entry points ------------------------------------------------------------------------------------------------------


def _help_width() -> int:
    """The terminal width argparse will format for, found without importing shutil."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 80


def _check_durations(args: Any) -> None:
    """Refuse a --timeout or --wait-timeout that is not a number of seconds (nan, inf, negative) by its name."""
    for name in ("timeout", "wait_timeout"):
        value = getattr(args, name, None)
        if value is not None and not 0 <= value < float("inf"):
            raise UsageError(f"--{name.replace('_', '-')} must be a number of seconds (0 or more), not {value:g}")


def _cached_text(key: str, produce: Callable[[], str]) -> str:
    """Text that depends only on this file (help, completion scripts), kept in the user's cache directory so that
    shells sourcing ``sl-forgery completion bash`` at start-up do not build the parser every time. Only this user's
    own private file in this user's own private directory is trusted (a shell runs what it prints); anything else
    is ignored and made anew."""
    directory = _xdg_dir("XDG_CACHE_HOME", ".cache") / APP_NAME
    stamp = f"{__version__}-{os.stat(__file__).st_mtime_ns}"
    path = directory / f"{key}-{stamp}.txt"
    text = _read_trusted_cache(path)
    if text is not None:
        return text
    text = produce()
    try:
        _private_dir(directory)
        for old in os.listdir(directory):
            if old.startswith(f"{key}-"):
                os.unlink(directory / old)
        write_private_file(path, text)
    except (OSError, SlForgeryError):
        pass  # an unusable cache only costs speed
    return text


def _read_trusted_cache(path: Path) -> str | None:
    own = os.getuid()
    try:
        directory = os.lstat(path.parent)
        if not stat.S_ISDIR(directory.st_mode) or directory.st_uid != own or directory.st_mode & 0o077:
            return None
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(descriptor, "rb") as cached:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != own or info.st_mode & 0o077:
            return None
        try:
            return cached.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None


def main(argv: Sequence[str] | None = None, *, command_name: str | None = None) -> int:
    """Run the command line; returns the exit code (see EXIT_CODES_HELP). ``command_name`` is the name the first
    word's command goes by when it is installed as a program of its own (``sl-start-jupyter``)."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words in (["--help"], ["-h"]):
        sys.stdout.write(_cached_text(f"help-{_help_width()}", lambda: get_parser().format_help()))
        return EXIT_OK
    if len(words) == 2 and words[0] == "completion" and words[1] in COMPLETION_SHELLS:
        sys.stdout.write(_cached_text(f"completion-{words[1]}", lambda: completion_script(words[1])))
        return EXIT_OK
    import argparse

    parser = get_parser(_command_word(words))
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    if not commands.choices:  # no sub-command named: the whole parser, to list them all
        parser = get_parser()
        commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    if command_name:
        commands.choices[words[0]].prog = command_name
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_USAGE
    if not getattr(args, "handler", None):
        return _print_usage(parser)
    try:
        _check_durations(args)
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"\n{APP_NAME}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SlForgeryError as error:
        if isinstance(error, JobNotRecorded):
            print(error.job_id, flush=True)  # the job exists: its id is still the result, on stdout
        message = str(error) if args.verbose else str(error).splitlines()[0]
        print(f"{command_name or APP_NAME}: error: {message}", file=sys.stderr)
        return error.exit_code


def console_main() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (output piped into head): stop quietly, as other command-line tools do, and keep
        # Python from complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    sys.exit(code)


LEGACY_DEFAULT_HOST = "cbsuwsun.biohpc.cornell.edu"  # the original sl-create-server-credentials' default -h


def _credentials_parser() -> Any:
    """The original ``sl-create-server-credentials`` flags, and the ways to give no password for key login."""
    parser = _one_line_errors_parser()(
        prog="sl-create-server-credentials",
        add_help=False,
        description="Create a server_credentials.yaml (the password goes to the OS keyring).",
    )
    parser.add_argument("--help", action="help", help="show this help and exit")
    parser.add_argument(
        "-od", "--output-directory", required=True, help="directory to write server_credentials.yaml in"
    )
    parser.add_argument("-h", "--host", help=f"server host name (default {LEGACY_DEFAULT_HOST}, the original's)")
    parser.add_argument("-u", "--username", required=True)
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument(
        "-p",
        "--password",
        help="the password (visible to other users and in shell history: leave it out to be prompted)",
    )
    secret.add_argument("--password-stdin", action="store_true", help="read the password from stdin (one line)")
    secret.add_argument(
        "--no-password", action="store_true", help="for key login: store no password (as an empty answer does)"
    )
    parser.add_argument("-sr", "--storage-root", default="/local/storage")
    parser.add_argument("-wr", "--working-root", default="/local/workdir")
    parser.add_argument("-sdn", "--shared-directory-name", default="sun_data")
    return parser


def _new_credentials_password(args: Any) -> str | None:
    """The password to keep for a new credentials file: given, read from stdin, or asked (empty: key login)."""
    if args.password is not None:
        print(
            "sl-create-server-credentials: warning: a password given with -p is visible to other users (ps) and "
            "stays in your shell history; leave -p out to be prompted",
            file=sys.stderr,
        )
        return args.password
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if args.no_password:
        return None
    return _prompt_on_terminal(f"password for {args.username}@{args.host} (empty for key login): ")


def create_server_credentials_main(argv: Sequence[str] | None = None) -> int:
    """The original ``sl-create-server-credentials``: writes server_credentials.yaml, the password to the keyring."""
    try:
        args = _credentials_parser().parse_args(argv)
    except SystemExit as exit_request:
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_USAGE
    target = Path(args.output_directory) / "server_credentials.yaml"
    if args.host is None:
        # The original command's default, kept so that its old invocations still work; a new user must notice it.
        args.host = LEGACY_DEFAULT_HOST
        print(f"sl-create-server-credentials: no -h given: using {LEGACY_DEFAULT_HOST}", file=sys.stderr)
    try:
        if target.exists():
            raise UsageError(f"{target} already exists; remove it first or choose another --output-directory")
        check_private_file_parent(target)  # before the password is stored, so that a refusal leaves nothing half-done
        password = _new_credentials_password(args)
        fields = {
            "username": args.username,
            "host": args.host,
            "storage_root": args.storage_root,
            "working_root": args.working_root,
            "shared_directory_name": args.shared_directory_name,
            **legacy_derived_roots(args.username, args.storage_root, args.working_root, args.shared_directory_name),
        }
        if password:
            store_password(keyring_account(args.username, args.host, None), password)
        else:
            fields["key_login"] = True  # nothing in the keyring to look for
        write_legacy_credentials(target, fields)
    except SlForgeryError as error:
        print(f"sl-create-server-credentials: error: {error}", file=sys.stderr)
        return error.exit_code
    written = f"wrote {target} ({args.username}@{args.host})"
    if password:
        print(f"{written}; the password is in the OS keyring", file=sys.stderr)
    else:
        print(f"{written} for key login (no password stored): ssh keys, agent and config apply", file=sys.stderr)
    return EXIT_OK


def _prompt_on_terminal(prompt: str) -> str:
    """Ask on the controlling terminal without echo, or fail with one line when there is none (getpass would read
    stdin with echo on)."""
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        raise UsageError(
            "no terminal to ask the password on; pass --password-stdin to read it from stdin, "
            "or --no-password for key login"
        ) from None
    import getpass

    return getpass.getpass(prompt)


def start_jupyter_main(argv: Sequence[str] | None = None) -> int:
    """The original ``sl-start-jupyter``: ``sl-forgery jupyter`` under its own name."""
    return main(["jupyter", *(sys.argv[1:] if argv is None else argv)], command_name="sl-start-jupyter")


# ``from sl_forgery.server import JobStatus`` (the original package layout) names this same module.
sys.modules.setdefault(f"{__name__}.server", sys.modules[__name__])

if __name__ == "__main__":
    sys.exit(main())
