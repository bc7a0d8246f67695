"""End to end, as README's "Run on a cluster" does it: a real Ray head, then `ray job submit`.

A head is started with `ray start --head` on loopback, with token authentication, its own temp
dir and free ports, so it never meets the test session's own `ray.init()` Ray nor any other Ray
on the machine. jobs.train and then jobs.infer on the trained model are submitted to it with the
README's `ray job submit --working-dir ... --runtime-env-json ...` command; their artifacts and
logs are checked. Only this head's processes are stopped afterwards: `ray stop` would stop every
Ray on the machine.
"""

import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to stop its head")

REPO = Path(__file__).resolve().parents[1]
# The venv's bin (not resolved: a venv's python is a symlink): `ray`, and the `python` a job runs.
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
RUNTIME_ENV = json.dumps({"env_vars": {"TF_USE_LEGACY_KERAS": "1"}})  # as in the README
JOB_TIMEOUT = 300  # seconds per job; a smoke training takes about a minute on 2 cores


@dataclass
class Head:
    address: str  # the dashboard / job server, http://127.0.0.1:PORT
    env: dict  # what clients of this head run with: its token, the venv first on PATH
    temp_dir: str
    session_id: int  # every process of the head runs in this session (`ray start`'s own pid)


def free_port_range(size, low=20_000, high=32_000):
    """A block of free ports for the head and its workers: outside Ray's default worker range (10002-19999,
    used by every other Ray here) and below Linux's ephemeral ports (32768+), where the other pytest worker's
    Rays bind port 0 and connect out while this head starts."""
    for _ in range(50):
        start = random.randrange(low, high - size)
        sockets = []
        try:
            for port in range(start, start + size):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("", port))
            return start, start + size - 1
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {size} consecutive free ports between {low} and {high}")


def client_env(token_file):
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # so a job's `python` is the venv's
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=token_file,  # this head's own token; ~/.ray is left alone
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


def process_table():
    """{pid: (parent pid, session id, state, command line)} of every process, read from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                stat = file.read()
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                cmdline = file.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        state, ppid, _group, session = stat[stat.rindex(")") + 2:].split()[:4]
        table[int(entry)] = (int(ppid), int(session), state, cmdline)
    return table


def head_processes(head):
    """This head's processes: its session, anything naming its temp dir, and their descendants."""
    table = process_table()
    children = {}
    for pid, (ppid, *_) in table.items():
        children.setdefault(ppid, []).append(pid)
    found = set()
    pending = [pid for pid, (_, session, _, cmdline) in table.items()
               if session == head.session_id or head.temp_dir in cmdline]
    while pending:
        pid = pending.pop()
        if pid not in found:
            found.add(pid)
            pending.extend(children.get(pid, ()))
    found.discard(os.getpid())
    return found


def running(pids):
    table = process_table()
    return [pid for pid in pids if pid in table and table[pid][2] != "Z"]  # zombies are dead


def signal_all(pids, signum):
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def stop_head(head, grace_seconds=3):
    """What `ray stop` does (SIGTERM, then SIGKILL after a grace period), to this head only.

    The grace period is short: this head's state is thrown away, and its GCS and autoscaler
    do not exit on SIGTERM anyway.
    """
    pids = head_processes(head)
    signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while running(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for _ in range(3):  # again: a dying raylet may have started a worker meanwhile
        signal_all(running(pids), signal.SIGKILL)
        time.sleep(0.5)
        pids |= head_processes(head)
    return running(pids)


@pytest.fixture(scope="module")
def ray_head():
    """One head for this module's tests: starting one takes about ten seconds."""
    # Short, under /tmp: Ray's Unix sockets live in here and their paths must stay < 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
    token_file = os.path.join(temp_dir, "auth_token")
    with open(os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as file:
        file.write(secrets.token_hex(32))  # as `ray get-auth-token --generate` makes them
    env = client_env(token_file)
    low, high = free_port_range(9 + 200)
    (gcs, dashboard, client, node_manager, object_manager, agent_listen, agent_grpc, runtime_env_agent,
     metrics) = range(low, low + 9)
    min_worker_port, max_worker_port = low + 9, high
    command = [
        RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--temp-dir", temp_dir,
        "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--ray-client-server-port", str(client), "--node-manager-port", str(node_manager),
        "--object-manager-port", str(object_manager), "--dashboard-agent-listen-port", str(agent_listen),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env_agent),
        "--metrics-export-port", str(metrics),
        "--min-worker-port", str(min_worker_port), "--max-worker-port", str(max_worker_port),
        "--num-cpus", "3", "--num-gpus", "0", "--object-store-memory", str(300 * 1024**2),
        "--disable-usage-stats",
    ]
    log_path = os.path.join(temp_dir, "ray-start.log")
    started = time.monotonic()
    with open(log_path, "w") as log:
        # A new session: every process this head starts can be found (and stopped) by it.
        starter = subprocess.Popen(command, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    head = Head(f"http://127.0.0.1:{dashboard}", env, temp_dir, starter.pid)
    try:
        try:
            returncode = starter.wait(timeout=120)
        except subprocess.TimeoutExpired:
            starter.kill()
            returncode = "timeout"
        if returncode != 0:
            pytest.fail(f"`ray start --head` failed ({returncode}):\n{Path(log_path).read_text()[-5000:]}")
        print(f"[e2e] ray head up in {time.monotonic() - started:.1f}s at {head.address}")
        yield head
    finally:
        survivors = stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"processes of the test's Ray head still running: {survivors}"


def ray_job(head, *args, timeout=60):
    return subprocess.run([RAY, "job", *args, "--address", head.address], env=head.env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def submit(head, name, *entrypoint):
    """`ray job submit` (waiting, logs tailed) as in the README; returns the job's logs."""
    submission_id = f"{name}-{uuid.uuid4().hex[:8]}"
    command = [RAY, "job", "submit", "--address", head.address, "--submission-id", submission_id,
               "--working-dir", str(REPO), "--runtime-env-json", RUNTIME_ENV, "--", *entrypoint]
    started = time.monotonic()
    try:
        submitted = subprocess.run(command, env=head.env, cwd=REPO, capture_output=True, text=True,
                                   timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired as error:
        logs = ray_job(head, "logs", submission_id)
        pytest.fail(f"{submission_id} did not finish within {JOB_TIMEOUT}s.\nray job submit: "
                    f"{error.stdout}{error.stderr}\nray job logs:\n{logs.stdout[-20000:]}{logs.stderr[-5000:]}")
    elapsed = time.monotonic() - started
    status = ray_job(head, "status", submission_id)
    logs = ray_job(head, "logs", submission_id)
    succeeded = f"Job '{submission_id}' succeeded" in status.stdout + status.stderr
    assert submitted.returncode == 0 and succeeded, (
        f"{submission_id} did not succeed (ray job submit exit {submitted.returncode}).\n"
        f"ray job status:\n{status.stdout[-3000:]}{status.stderr[-3000:]}\n"
        f"ray job submit:\n{submitted.stdout[-20000:]}{submitted.stderr[-5000:]}"
    )
    assert logs.returncode == 0, logs.stderr
    print(f"[e2e] {submission_id} SUCCEEDED in {elapsed:.1f}s")
    return logs.stdout


ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Lines Ray forwards from workers and actors, "(RayTrainWorker pid=42) ...": they arrive when
# they arrive, also after the driver's last line.
FORWARDED = re.compile(r"^\(\S+ pid=\d+(, ip=\S+)?\)")


def last_json_line(logs):
    """The driver's last line, parsed: both jobs end by printing a JSON summary."""
    lines = [ANSI.sub("", line).strip() for line in logs.splitlines()]
    lines = [line for line in lines if line and not FORWARDED.match(line)]
    assert lines, "the job printed nothing"
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        pytest.fail("the job's logs do not end with a JSON line; they end with:\n" + "\n".join(lines[-20:]))


def test_head_rejects_clients_without_its_token(ray_head):
    wrong = dict(ray_head.env, RAY_AUTH_TOKEN="0" * 64)  # RAY_AUTH_TOKEN outranks the token file
    listed = subprocess.run([RAY, "job", "list", "--address", ray_head.address], env=wrong, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode != 0 and "AuthenticationError" in listed.stderr + listed.stdout
    assert ray_job(ray_head, "list").returncode == 0


def test_train_then_infer_with_ray_job_submit(ray_head, tmp_path):
    run = tmp_path / "run"  # absolute: a job's working directory is a temporary copy of the repo
    logs = submit(ray_head, "train", "python", "-m", "jobs.train", "--smoke", "--epochs", "1",
                  "--num-workers", "2", "--cpus-per-worker", "1", "--output", str(run))  # the head has 3 CPUs
    assert (run / "model.keras").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics] == [1]
    assert metrics[0]["weights_in_sync"] is True  # both workers trained one model together
    assert last_json_line(logs)["epoch"] == 1
    frames = sorted((run / "scenes" / "CameraRGB").glob("*.png"))
    assert frames

    predicted = tmp_path / "predicted"
    logs = submit(ray_head, "infer", "python", "-m", "jobs.infer", "--model", str(run / "model.keras"),
                  "--input", str(run / "scenes" / "CameraRGB"), "--output", str(predicted))
    assert last_json_line(logs) == {"ok": len(frames), "failed": 0, "skipped": 0}
    parts = sorted((predicted / "predictions").glob("*.parquet"))
    assert parts

    import pyarrow.parquet as pq

    assert sum(pq.read_metadata(part).num_rows for part in parts) == len(frames)


def test_a_relative_output_is_refused_in_the_jobs_copy_of_the_working_dir(ray_head, tmp_path):
    # The job runs in Ray's temporary copy of the checkout: a relative --output would land there and
    # be deleted with it. jobs.evaluate refuses it before loading anything.
    command = [RAY, "job", "submit", "--address", ray_head.address, "--working-dir", str(REPO),
               "--runtime-env-json", RUNTIME_ENV, "--", "python", "-m", "jobs.evaluate", "--model", "m.keras",
               "--data", str(tmp_path), "--output", "runs/report"]
    submitted = subprocess.run(command, env=ray_head.env, cwd=REPO, capture_output=True, text=True,
                               timeout=JOB_TIMEOUT)
    output = ANSI.sub("", submitted.stdout + submitted.stderr)
    assert submitted.returncode != 0, output[-3000:]
    assert re.search(r"error: --output runs/report: a relative path, so inside this job's copy of --working-dir "
                     r"\(\S*/runtime_resources/working_dir_files/\S+\), which Ray deletes", output), output[-3000:]
