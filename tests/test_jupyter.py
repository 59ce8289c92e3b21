"""Jupyter Lab as a SLURM job on the real cluster, reached through a tunnel over the shared connection."""

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import jsonschema
import pytest

import sl_forgery
from conftest import ROOT, cli, console_script, own_masters, process_state


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def status_urls(url: str) -> tuple[str, str]:
    """The /api/status address of a printed URL, with and without its token."""
    base, token = url.split("/lab?token=")
    return f"{base}/api/status?token={token}", f"{base}/api/status"


def last_submitted() -> str:
    """The id of the job this test submitted last, from its own private history."""
    return json.loads(cli("history", "--json").stdout)["jobs"][-1]["job_id"]


def test_a_server_answers_with_its_token_only_and_the_token_stays_off_the_server(server, cluster):
    job = server.launch_jupyter_server("notebook", "jupyter", cluster.home, ram_gb=1, time_limit=10)
    try:
        with_token, without = status_urls(job.url)
        assert http_status(with_token) == 200
        assert http_status(without) == 403
        assert job.token and len(job.token) >= 32 and job.host and job.port
        assert job.token not in cluster.ssh("ps -eo args").stdout
        assert job.token not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        leftovers = cluster.ssh(f"grep -rl {job.token} {job.working_directory} || true").stdout
        assert leftovers == ""
        records = sl_forgery.jupyter_records_path()
        assert records.stat().st_mode & 0o777 == 0o600
    finally:
        server.stop_jupyter(job.job_id)
    assert server.wait(job.job_id, timeout=60)[job.job_id].status is sl_forgery.JobStatus.CANCELLED
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(status_urls(job.url)[0], timeout=5)


def test_two_servers_at_once_get_two_working_urls(server, cluster):
    first = server.launch_jupyter_server("one", "jupyter", cluster.home, ram_gb=1, time_limit=10)
    second = server.launch_jupyter_server("two", "jupyter", cluster.home, ram_gb=1, time_limit=10)
    try:
        assert first.local_port != second.local_port and first.token != second.token
        assert http_status(status_urls(first.url)[0]) == 200
        assert http_status(status_urls(second.url)[0]) == 200
    finally:
        server.stop_jupyter(first.job_id)
        server.stop_jupyter(second.job_id)


# Ctrl-C, the terminal closed (SIGHUP) and `timeout` or a session manager (SIGTERM) all mean: stop.
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["ctrl-c", "term", "hangup"])
def test_ctrl_c_cancels_the_job_and_closes_the_tunnel(profile_name, cluster, stop):
    process = subprocess.Popen(
        [console_script("sl-forgery"), "jupyter", "--env", "jupyter", "--mem", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = process.stdout.readline().strip()
    assert url.startswith("http://127.0.0.1:") and "/lab?token=" in url
    assert http_status(status_urls(url)[0]) == 200
    job_id = json.loads(cli("jupyter", "list", "--json").stdout)["servers"][0]["job_id"]
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert f"stopped Jupyter job {job_id}" in stderr
    assert json.loads(cli("wait", "--json", job_id).stdout)["jobs"][0]["state"] == "CANCELLED"
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(status_urls(url)[0], timeout=5)


def test_detach_list_connect_and_stop_with_the_original_command(profile_name, cluster):
    started = subprocess.run(
        [console_script("sl-start-jupyter"), "-e", "jupyter", "-c", "1", "-m", "1", "-t", "10", "-p", "0", "--detach"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert started.returncode == 0, started.stderr
    url = started.stdout.strip()
    document = json.loads(cli("jupyter", "list", "--json").stdout)
    jsonschema.validate(document, sl_forgery.JSON_SCHEMAS["jupyter"])
    listed = document["servers"]
    assert [entry["url"] for entry in listed] == [url] and listed[0]["state"] == "RUNNING"
    job_id = listed[0]["job_id"]
    (master,) = own_masters().values()
    sl_forgery.Server.from_profile(profile_name).connection.disconnect()  # the tunnel goes with the connection
    deadline = time.monotonic() + 30
    while process_state(master) not in ("", "Z"):  # ssh -O exit returns before the master has closed its ports
        assert time.monotonic() < deadline, "the master outlived disconnect"
        time.sleep(0.1)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(status_urls(url)[0], timeout=5)
    reconnected = cli("jupyter", "connect", job_id)
    assert reconnected.returncode == 0, reconnected.stderr
    assert http_status(status_urls(reconnected.stdout.strip())[0]) == 200
    stopped = cli("jupyter", "stop", job_id)
    assert stopped.returncode == 0
    assert json.loads(cli("wait", "--json", "--timeout", "30", job_id).stdout)["jobs"][0]["state"] == "CANCELLED"
    assert json.loads(cli("jupyter", "list", "--json").stdout)["servers"] == []


def test_an_environment_without_jupyterlab_gives_a_clear_error_and_no_running_job(profile_name, cluster):
    result = cli("jupyter", "--env", "analysis", "--mem", "1")
    assert result.returncode == 1
    job_id = last_submitted()
    assert f"Jupyter job {job_id} ended FAILED before its server answered" in result.stderr
    assert "jupyter: command not found" in result.stderr
    assert cluster.job_state(job_id) == "FAILED"


def test_a_job_that_cannot_start_in_time_is_cancelled(profile_name, cluster):
    result = cli("jupyter", "--env", "jupyter", "--mem", "1", "--partition", "long", "--wait-timeout", "0.5")
    assert result.returncode == 124
    job_id = last_submitted()
    assert f"Jupyter job {job_id} did not start within 0.5 s" in result.stderr
    assert cluster.wait_for_state(job_id, {"CANCELLED"}) == "CANCELLED"


# ---- as a user meets it: a kernel through the printed URL, and JupyterLab in a browser ------------------------------

ARTEFACTS = ROOT / "test-artefacts"


@pytest.fixture
def detached_jupyter(profile_name):
    """A Jupyter job started as a user starts it, with the URL the command printed; stopped afterwards."""
    started = cli("jupyter", "--env", "jupyter", "--cpus", "1", "--mem", "1", "--time", "10", "--detach")
    assert started.returncode == 0, started.stderr
    url = started.stdout.strip()
    job_id = next(entry["job_id"] for entry in json.loads(cli("jupyter", "list", "--json").stdout)["servers"])
    yield url, job_id
    cli("jupyter", "stop", job_id)


def run_in_kernel(base: str, token: str, kernel_id: str, code: str, timeout: float = 60) -> str:
    """Execute code in a kernel over its websocket, as JupyterLab does; returns the text of its result."""
    import websocket

    channel = websocket.create_connection(
        f"ws://{base.removeprefix('http://')}/api/kernels/{kernel_id}/channels",
        header=[f"Authorization: token {token}"],
        timeout=timeout,
    )
    try:
        msg_id = uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": "execute_request", "session": uuid.uuid4().hex}
        header.update({"username": "test", "version": "5.3", "date": ""})
        content = {"code": code, "silent": False, "store_history": False, "user_expressions": {}}
        content.update({"allow_stdin": False, "stop_on_error": True})
        message = {"header": header, "parent_header": {}, "metadata": {}, "content": content, "channel": "shell"}
        channel.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = json.loads(channel.recv())
            if reply.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if reply["msg_type"] == "execute_result":
                return reply["content"]["data"]["text/plain"]
            if reply["msg_type"] == "error":
                raise AssertionError(f"the kernel raised: {reply['content']['ename']}: {reply['content']['evalue']}")
        raise AssertionError(f"no result from the kernel within {timeout} s")
    finally:
        channel.close()


def test_a_kernel_made_through_the_printed_url_runs_code_on_the_jobs_node(detached_jupyter, cluster):
    url, job_id = detached_jupyter
    base, token = url.split("/lab?token=")
    request = urllib.request.Request(
        f"{base}/api/kernels",
        data=b"{}",
        headers={"Authorization": f"token {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        kernel_id = json.load(response)["id"]

    hostname = run_in_kernel(base, token, kernel_id, "import socket; socket.gethostname()")
    in_job = run_in_kernel(base, token, kernel_id, "import os; os.environ['SLURM_JOB_ID']")

    node = cluster.ssh(f"squeue -h -j {job_id} -o %N").stdout.strip()
    node_hostname = re.search(r"NodeHostName=(\S+)", cluster.ssh(f"scontrol show node {node}").stdout).group(1)
    assert hostname == repr(node_hostname)
    assert in_job == repr(job_id)


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Debian chromium, as root, with a fresh profile and nothing fetched from the internet."""
    argv = ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    argv += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    argv += [f"--user-data-dir={profile}", "--virtual-time-budget=15000", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)


def test_the_printed_url_opens_jupyterlab_in_a_browser(detached_jupyter, tmp_path):
    url, job_id = detached_jupyter
    page = chromium(tmp_path / "profile-1", "--dump-dom", url)
    assert page.returncode == 0, page.stderr[-2000:]
    assert "<title>JupyterLab</title>" in page.stdout and 'id="jp-main-dock-panel"' in page.stdout
    without_token = chromium(tmp_path / "profile-2", "--dump-dom", url.split("?")[0]).stdout
    assert "jp-main-dock-panel" not in without_token and 'type="password"' in without_token

    ARTEFACTS.mkdir(exist_ok=True)
    screenshot = ARTEFACTS / "jupyterlab.png"
    screenshot.unlink(missing_ok=True)
    shot = chromium(tmp_path / "profile-3", "--window-size=1280,800", f"--screenshot={screenshot}", url)
    assert shot.returncode == 0, shot.stderr[-2000:]
    png = screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[16:24] == (1280).to_bytes(4, "big") + (800).to_bytes(4, "big")
