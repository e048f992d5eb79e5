"""A real Ray head on loopback, `ray job submit` of jobs/pipeline.py, results at absolute paths.

The head runs as the README says: token auth (a submit without the token is refused) and every
port of every Ray process on loopback (checked from /proc, not assumed from the flags: Ray 2.60
binds GCS and raylet to all interfaces unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes the
node's address 127.0.0.1; `--node-ip-address=127.0.0.1` alone is re-resolved to the LAN IP).

Only processes this test starts are stopped: `ray start --block` runs in its own session and
that process group is terminated in a `finally` (never `ray stop`, which would also end other
Ray instances on the machine).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _jobdata import write_checkpoints

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _wait_http(url: str, timeout: float, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(request, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


def _socket_addresses() -> dict[str, tuple[str, int]]:
    """inode -> (address, port) of every listening TCP socket (IPv4 and IPv6)."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if fields[3] != "0A":  # LISTEN
                    continue
                hex_ip, hex_port = fields[1].split(":")
                raw = bytes.fromhex(hex_ip)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                out[fields[9]] = (str(ipaddress.ip_address(raw)), int(hex_port, 16))
    return out


def _listening(session: int) -> list[tuple[int, str, str, int]]:
    """(pid, command, address, port) of every listening socket of the processes in `session`
    (the head and everything it started: GCS, raylet, dashboard, agents, workers, driver)."""
    sockets = _socket_addresses()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getsid(pid) != session:
                continue
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:60].decode(errors="replace")
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in sockets:
                    found.append((pid, cmd, *sockets[target[8:-1]]))
        except OSError:  # the process ended meanwhile
            continue
    return found


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None
                              and ip.ipv4_mapped.is_loopback)


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM `ray start --block` (it drains and stops its node), then SIGKILL what is left
    of its process group (its own session, so nothing else on the machine is touched)."""
    pgid = head.pid  # start_new_session=True: the group id is the leader's pid
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=30)


@pytest.mark.slow
def test_ray_job_submit_on_loopback_cluster_writes_tables_and_mlflow_runs(tmp_path: Path) -> None:
    manifest = write_checkpoints(tmp_path, 2, corrupt=("truncated",))
    out = tmp_path / "job-out"
    token = secrets.token_hex(32)
    token_file = tmp_path / "ray_auth_token"  # never ~/.ray/auth_token: other Rays use it
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    auth = {"Authorization": f"Bearer {token}"}
    gcs, dash, agent, agent_grpc, node_mgr, obj_mgr, rt_env, metrics, client = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="crj", dir="/tmp")  # short: unix socket path limit
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--node-manager-port={node_mgr}",
         f"--object-manager-port={obj_mgr}", f"--runtime-env-agent-port={rt_env}",
         f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
         "--num-cpus=2", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        env=env, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_http(f"{address}/api/version", 120, auth)
        with pytest.raises(urllib.error.HTTPError) as refused:  # no token, no job
            urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
        assert refused.value.code == 401
        submit = None
        for _ in range(10):  # the job agent can come up a few seconds after the dashboard
            submit = subprocess.run(
                [str(BIN / "ray"), "job", "submit", f"--address={address}",
                 "--submission-id=tiny-job", "--working-dir", str(REPO), "--",
                 "python", "jobs/pipeline.py", "conf/tiny.yaml", f"manifest={manifest}",
                 f"output_dir={out}"],
                env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
            if "tiny-job" in submit.stdout + submit.stderr and "already exists" not in \
                    submit.stderr and submit.returncode == 0:
                break
            if "Failed to connect" not in submit.stderr and "not ready" not in submit.stderr:
                break
            time.sleep(3)
        log = submit.stdout + submit.stderr
        from ray.job_submission import JobStatus, JobSubmissionClient

        status = JobSubmissionClient(address, headers=auth).get_job_status("tiny-job")
        assert status == JobStatus.SUCCEEDED, log[-4000:]
        assert "[plan] 3 checkpoints" in log  # the job's own output came back
        progress = [ln for ln in log.splitlines() if "[discover] 3/3 done (100%)" in ln]
        assert progress and "checkpoints/hour, ETA" in progress[-1], log[-4000:]
        assert "1 failed" in progress[-1]  # the truncated checkpoint, counted as it finished
        assert "[discover ckpt0]" not in log  # workers' per-domain lines are DEBUG
        listening = _listening(head.pid)
        assert len({pid for pid, *_ in listening}) >= 4, listening  # GCS, raylet, dashboard, ...
        exposed = [x for x in listening if not _is_loopback(x[2])]
        assert exposed == [], f"Ray listens beyond loopback: {exposed}"
    finally:
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert head.poll() is not None, "ray start --block is still running"

    from mlflow.tracking import MlflowClient

    from circuitray.runtime.layout import JobLayout
    from circuitray.runtime.plan import read_failures
    from circuitray.tables import EDGE_SCHEMA, OUTPUT_SCHEMA, read_parquet

    layout = JobLayout.of(out)
    edges = read_parquet(layout.edges, EDGE_SCHEMA).to_pandas()
    outputs = read_parquet(layout.outputs, OUTPUT_SCHEMA).to_pandas()
    assert sorted(edges.checkpoint.unique()) == ["ckpt0", "ckpt1"]
    assert sorted(outputs.checkpoint.unique()) == ["ckpt0", "ckpt1"]
    assert read_failures(layout).checkpoint.tolist() == ["truncated"]
    assert (layout.metrics / "depth.parquet").exists()
    assert list(layout.evaluation.glob("*.parquet"))
    db = out / "mlflow.db"
    assert db.exists(), "MLflow store must be at the absolute output path, not the job's cwd"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("circuitray-tiny")
    assert exp.artifact_location == (out / "mlartifacts").as_uri()
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1
    assert parents[0].data.params["data.limit"] == "16"
    assert sorted(r.info.run_name for r in children) == ["ckpt0", "ckpt1", "truncated"]
    assert {r.info.run_name: r.data.params.get("lr") for r in children}["ckpt1"] == "0.001"
