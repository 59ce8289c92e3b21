"""Real clusters' environments: set-up lines and module systems, every environment manager, every login shell.

The test cluster (scripts/cluster) has Lmod with a `miniconda3` module, a user whose PATH lacks conda, users whose
login shell is tcsh, zsh, fish or dash, a venv and a uv project. conda, mamba and micromamba are the test bed's
stand-ins (none installs offline); no pixi could be installed, so pixi is covered by its script and by the job
failing as it does where pixi is missing.
"""

from __future__ import annotations

import socket
import subprocess
import uuid

import pytest

import sl_forgery
from conftest import bed, cli
from sl_forgery import Job, JobStatus, UsageError

SERVER_PYTHON = subprocess.run(["/usr/bin/python3", "--version"], capture_output=True, text=True).stdout.strip()
PRINT_PREFIX = "python -c 'import sys; print(sys.prefix)'"


def _job(directory: str, activate: str | None = None, **extra) -> Job:
    return Job(
        "envjob",
        f"{directory}/out.txt",
        f"{directory}/err.txt",
        directory,
        conda_environment=activate,
        ram_gb=0.25,
        time_limit=5,
        **extra,
    )


def _run_bash(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, env=env or {"PATH": "/usr/bin:/bin"}, timeout=30
    )


# ---------------------------------------------------------------------------------------------------------------------
# The job script, without a cluster


def test_setup_lines_run_after_the_variables_and_before_the_activation():
    job = _job("/w", "analysis", setup=["module purge", "module load miniconda3"], environment={"A": "1"})
    job.add_command("work")
    script = job.script
    assert (
        script.index("export A=1")
        < script.index("command -v module")
        < script.index("\nmodule purge\n")
        < script.index("\nmodule load miniconda3\n")
        < script.index("conda activate analysis")
        < script.index("\nwork\n")
    )


def test_without_module_lines_the_module_system_is_not_looked_for():
    script = _job("/w", "analysis", setup=["source /etc/profile.d/site.sh", "umask 077"]).script
    assert "command -v module" not in script
    assert "\nsource /etc/profile.d/site.sh\n" in script


@pytest.mark.parametrize(
    ("environment", "manager", "expected"),
    [
        ("analysis", None, ['eval "$__slf_hook"', "conda activate analysis"]),
        ("analysis", "mamba", ["mamba shell hook --shell bash", "mamba activate analysis"]),
        ("analysis", "micromamba", ["micromamba shell hook --shell bash", "micromamba activate analysis"]),
        ("/opt/venv", "venv", [". /opt/venv/bin/activate"]),
        ("~/venv", "venv", ['. "$HOME"/venv/bin/activate']),
        ("/p/proj", "uv", ["uv sync --project /p/proj --frozen", '. "${UV_PROJECT_ENVIRONMENT:-/p/proj/.venv}']),
        ("/p/pix", "pixi", ['"$(pixi shell-hook --shell bash --manifest-path /p/pix)"', 'eval "$__slf_hook"']),
    ],
)
def test_each_manager_gets_its_documented_activation(environment, manager, expected):
    script = _job("/w", environment, env_manager=manager).script
    for fragment in expected:
        assert fragment in script
    assert "conda init" not in script


def test_a_path_without_a_manager_is_told_apart_on_the_node(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    activation = "\n".join(sl_forgery.render_activation(str(venv)))
    ran = _run_bash(f"set -e\n{activation}\n{PRINT_PREFIX}")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == str(venv)
    neither = _run_bash("set -e\n" + "\n".join(sl_forgery.render_activation(str(tmp_path / "empty"))))
    assert neither.returncode == 1
    assert neither.stderr.strip().endswith(f"set env_manager on {socket.gethostname()}")


def test_no_module_system_fails_the_job_with_one_line_naming_the_node(tmp_path):
    lines = sl_forgery.render_setup(["module load miniconda3"], module_inits=[str(tmp_path / "no-such-init")])
    ran = _run_bash("set -e\n" + "\n".join(lines) + "\necho never")
    assert ran.returncode == 1 and ran.stdout == ""
    assert ran.stderr.count("\n") == 1
    assert "sl-forgery: no module system: 'module' is not defined" in ran.stderr
    assert ran.stderr.strip().endswith(f"on {socket.gethostname()}")


def test_a_failing_setup_line_ends_the_job_with_its_code_and_names_the_line():
    lines = sl_forgery.render_setup(["echo first", "false # the site's script", "echo never"])
    ran = _run_bash("set -e\n" + "\n".join(lines))
    assert ran.returncode == 1
    assert ran.stdout == "first\n"
    assert "set-up line failed (exit 1)" in ran.stderr and "false # the site's script" in ran.stderr


def test_bad_setup_and_env_manager_values_are_refused_by_name():
    with pytest.raises(UsageError, match="not one of conda, mamba"):
        _job("/w", "x", env_manager="pip")
    with pytest.raises(UsageError, match="needs an environment"):
        _job("/w", None, env_manager="venv")
    with pytest.raises(UsageError, match="list of shell lines"):
        _job("/w", "x", setup="module load a")
    with pytest.raises(UsageError, match="single line"):
        _job("/w", "x", setup=["module load a\nmodule load b"])


def test_setup_goes_after_a_user_scripts_sbatch_block_and_other_languages_are_refused():
    script = sl_forgery.inject_setup("#!/bin/sh\n#SBATCH -J a\n\nhostname\n", ["module load x"])
    lines = script.splitlines()
    assert lines[:3] == ["#!/bin/sh", "#SBATCH -J a", ""]
    assert lines.index("module load x") < lines.index("hostname")
    with pytest.raises(UsageError, match="sh or bash script"):
        sl_forgery.inject_setup("#!/usr/bin/env python3\nprint(1)\n", ["module load x"])


def test_profile_setup_and_env_manager_are_kept_and_checked(home):
    added = cli(
        "server", "add", "lab", "--host", "h", "--setup", "module load miniconda3", "--setup", "module load cuda",
        "--env-manager", "micromamba", "--conda-env", "analysis",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    profile = sl_forgery.load_config().servers["lab"]
    assert (profile.setup, profile.env_manager) == (["module load miniconda3", "module load cuda"], "micromamba")
    ran = cli("run", "--dry-run", "--setup", "echo extra", "--", "true")
    assert ran.returncode == 0, ran.stderr
    script = ran.stdout
    assert script.index("module load miniconda3") < script.index("module load cuda") < script.index("echo extra")
    assert "micromamba activate analysis" in script
    path = sl_forgery.config_path()
    path.write_text(path.read_text().replace("env_manager: micromamba", "env_manager: pip"))
    broken = cli("run", "--dry-run", "--", "true")
    assert broken.returncode == 2
    assert "env_manager 'pip' is not one of" in broken.stderr and "Traceback" not in broken.stderr


# ---------------------------------------------------------------------------------------------------------------------
# The same job through every manager on the test cluster


def _environments() -> dict[str, tuple[str, str | None, str]]:
    """name -> (environment, env_manager, the sys.prefix the job must see)"""
    facts = bed()
    conda_env = f"{facts['SLF_CLUSTER_CONDA_ENVS']}/analysis"
    venv, project = facts["SLF_CLUSTER_VENV"], facts["SLF_CLUSTER_UV_PROJECT"]
    return {
        "conda": ("analysis", None, conda_env),
        "mamba": ("analysis", "mamba", conda_env),
        "micromamba": ("analysis", "micromamba", conda_env),
        "venv": (venv, "venv", venv),
        "venv-inferred": (venv, None, venv),
        "uv-project": (project, "uv", f"{project}/.venv"),
        "uv-venv": (f"{project}/.venv", "uv", f"{project}/.venv"),
    }


@pytest.mark.parametrize("name", ["conda", "mamba", "micromamba", "venv", "venv-inferred", "uv-project", "uv-venv"])
def test_the_same_job_runs_through_every_env_manager(server, remote_dir, name):
    environment, manager, prefix = _environments()[name]
    job = _job(remote_dir, environment, env_manager=manager)
    job.add_command("sl-verify-session -sp /data/s1")
    job.add_command(PRINT_PREFIX)
    server.submit_job(job)
    final = server.wait(job.job_id, timeout=120)[job.job_id]
    assert (final.status, final.exit_code) == (JobStatus.COMPLETED, 0), server.read_file(f"{remote_dir}/err.txt")
    assert server.read_file(f"{remote_dir}/out.txt").splitlines() == [
        f"verified session /data/s1 with {SERVER_PYTHON}",
        prefix,
    ]


@pytest.mark.parametrize(
    ("environment", "manager", "message"),
    [
        ("no_such_env", "conda", "EnvironmentNameNotFound: Could not find conda environment: no_such_env"),
        ("no_such_env", "micromamba", "critical libmamba Cannot activate, prefix does not exist"),
        ("/nonexistent/venv", "venv", "/nonexistent/venv/bin/activate: No such file or directory"),
        ("/nonexistent/project", "uv", "Project directory `/nonexistent/project` does not exist"),
        ("/nonexistent/pixi-project", "pixi", "pixi: command not found"),
    ],
)
def test_a_missing_manager_or_environment_fails_at_once_with_its_message_and_the_node(
    server, remote_dir, environment, manager, message
):
    job = _job(remote_dir, environment, env_manager=manager)
    job.add_command("echo never")
    server.submit_job(job)
    final = server.wait(job.job_id, timeout=120)[job.job_id]
    assert final.status is JobStatus.FAILED
    errors = server.read_file(f"{remote_dir}/err.txt")
    assert message in errors
    last = errors.strip().splitlines()[-1]
    assert last.startswith("sl-forgery: ") and environment in last and last.endswith(f"on {final.node}")
    assert server.read_file(f"{remote_dir}/out.txt") == ""


# ---------------------------------------------------------------------------------------------------------------------
# A user whose conda comes from a module


@pytest.fixture
def module_user_server(cluster, home):
    facts = bed()
    user = facts["SLF_CLUSTER_MODULE_USER"]
    config = sl_forgery.Config(sl_forgery.config_path())
    config.servers["modules"] = sl_forgery.Profile(
        name="modules",
        host=cluster.host,
        port=cluster.port,
        user=user,
        identity_file=str(cluster.key),
        ssh_options=[f"UserKnownHostsFile={cluster.known_hosts}", "IdentitiesOnly=yes"],
        setup=[f"module load {facts['SLF_CLUSTER_MODULE']}"],
    )
    config.default = "modules"
    config.save()
    with sl_forgery.Server.from_profile("modules") as server:
        yield server, f"{facts['SLF_CLUSTER_STATE']}/home/{user}/tests/{uuid.uuid4().hex[:8]}"


def test_a_job_loads_conda_and_uv_from_a_module_when_the_profile_says_so(module_user_server):
    _, directory = module_user_server
    for manager, environment in (("conda", "analysis"), ("uv", bed()["SLF_CLUSTER_UV_PROJECT"])):
        workdir = f"{directory}/{manager}"
        run = cli("run", "--env", environment, "--env-manager", manager, "--workdir", workdir, "--wait", "--",
                  "sl-verify-session", "-sp", "/m")  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert f"verified session /m with {SERVER_PYTHON}" in run.stdout


def test_without_the_module_the_same_job_fails_with_conda_missing(module_user_server):
    server, directory = module_user_server
    job = _job(directory, "analysis")
    job.add_command("echo never")
    server.submit_job(job)
    final = server.wait(job.job_id, timeout=120)[job.job_id]
    assert final.status is JobStatus.FAILED
    errors = server.read_file(f"{directory}/err.txt")
    assert "conda: command not found" in errors
    assert errors.strip().splitlines()[-1] == (
        f"sl-forgery: conda is not available ('conda shell.bash hook' failed) on {final.node}"
    )


def test_a_module_that_does_not_exist_fails_the_job_naming_the_line(module_user_server):
    server, directory = module_user_server
    job = _job(directory, None, setup=["module load no-such-module/1.0"])
    job.add_command("echo never")
    server.submit_job(job)
    final = server.wait(job.job_id, timeout=120)[job.job_id]
    assert final.status is JobStatus.FAILED
    errors = server.read_file(f"{directory}/err.txt")
    assert '"no-such-module/1.0"' in errors  # Lmod's own message
    assert "set-up line failed" in errors and "module load no-such-module/1.0" in errors.splitlines()[-1]


def test_submit_setup_reaches_a_users_own_script(module_user_server, tmp_path):
    server, directory = module_user_server
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --output={directory}/own.txt\nconda --version\nuv --version\n")
    submitted = cli("submit", "--workdir", directory, "--setup", "module load miniconda3", "--wait", str(script))
    assert submitted.returncode == 0, submitted.stderr
    output = server.read_file(f"{directory}/own.txt")
    assert output.startswith("conda ") and "\nuv " in output
