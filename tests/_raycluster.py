"""Real Ray nodes for the cluster tests: `ray start --block` processes on loopback.

Each node is one `ray start --block` in its own session, on ports picked free (other users
run Ray on this machine: never the default 6379/8265), with its own temp dir. Stopping a
node signals that session alone, never `ray stop` (which would end every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """n distinct ports free on loopback right now (held together so none repeats)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_http(url: str, timeout: float, headers: dict[str, str] | None = None) -> None:
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


def ray_env(**extra: str) -> dict[str, str]:
    """The environment of every `ray` command a test runs: this venv first on PATH, offline,
    no usage stats, and no RAY_ADDRESS / token inherited from the calling shell."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    env.update(extra)
    return env


def session_processes(session: int) -> dict[int, str]:
    """pid -> command line of every live process in `session` (a node and all it started)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != session:
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:  # the process ended meanwhile
            continue
        found[int(entry)] = cmd.decode(errors="replace").strip()
    return found


def pids_running(fragment: str) -> list[int]:
    """pids of the processes whose command line contains `fragment`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if fragment.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                continue
    return found


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


def listening(session: int) -> list[tuple[int, str, str, int]]:
    """(pid, command, address, port) of every listening socket of the processes in `session`
    (a node and everything it started: GCS, raylet, dashboard, agents, workers, driver)."""
    sockets = _socket_addresses()
    found = []
    for pid, cmd in session_processes(session).items():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in sockets:
                    found.append((pid, cmd[:60], *sockets[target[8:-1]]))
        except OSError:
            continue
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None
                              and ip.ipv4_mapped.is_loopback)


@dataclass
class RayNode:
    """One `ray start --block` (head or worker) in its own session."""

    proc: subprocess.Popen
    temp_dir: str
    ip: str

    @classmethod
    def start(cls, env: dict[str, str], *, ip: str, num_cpus: int, head_gcs: int | None = None,
              gcs_address: str | None = None, resources: dict[str, float] | None = None,
              extra: tuple[str, ...] = ()) -> RayNode:
        """A head (`head_gcs` = its GCS port) or a worker joining `gcs_address`."""
        node_mgr, obj_mgr, agent, agent_grpc, rt_env, metrics = free_ports(6)
        temp_dir = tempfile.mkdtemp(prefix="crj", dir="/tmp")  # short: unix socket path limit
        args = [str(BIN / "ray"), "start", "--block", f"--node-ip-address={ip}",
                f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
                f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
                f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
        args += ["--head", f"--port={head_gcs}"] if head_gcs else [f"--address={gcs_address}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        proc = subprocess.Popen([*args, *extra], env=env, cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return cls(proc, temp_dir, ip)

    @property
    def session(self) -> int:
        return self.proc.pid  # start_new_session=True: the leader's pid is the session id

    def pid_of(self, name: str) -> int | None:
        """The pid of this node's process whose executable is `name` (e.g. "raylet")."""
        for pid, cmd in session_processes(self.session).items():
            if cmd and Path(cmd.split()[0]).name == name:
                return pid
        return None

    def runs(self, pid: int) -> bool:
        """Whether `pid` belongs to this node: it or an ancestor is in the node's session (a
        worker is; the job's driver runs in a session of its own under the job's supervisor)."""
        while pid > 1:
            try:
                if os.getsid(pid) == self.session:
                    return True
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:  # ended meanwhile
                return False
            pid = int(stat[stat.rfind(")") + 2:].split()[1])  # the parent
        return False

    def stop(self) -> None:
        """SIGTERM `ray start --block` (it stops its node), then SIGKILL what is left of the
        node (its session, and descendants in sessions of their own such as a job's driver,
        listed before they can be orphaned); nothing else on the machine is touched."""
        members = [int(e) for e in os.listdir("/proc") if e.isdigit() and self.runs(int(e))]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.session, signal.SIGKILL)
        self.proc.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class LoopbackCluster:
    """A head (GCS, dashboard, job agent) and any worker nodes on loopback addresses.

    `token_dir`: turn on Ray's token auth with a fresh token kept there (never
    ~/.ray/auth_token, which other Rays on the machine use). A context manager: every node is
    stopped on exit, workers first.
    """

    def __init__(self, *, head_ip: str = "127.0.0.1", head_cpus: int = 2,
                 head_resources: dict[str, float] | None = None,
                 token_dir: Path | None = None, **env: str) -> None:
        self.head_ip, self.head_cpus, self.head_resources = head_ip, head_cpus, head_resources
        self.headers: dict[str, str] = {}
        auth = {"RAY_AUTH_MODE": "disabled"}
        if token_dir is not None:
            token = secrets.token_hex(32)
            token_file = token_dir / "ray_auth_token"
            token_file.write_text(token)
            token_file.chmod(0o600)
            auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
            self.headers = {"Authorization": f"Bearer {token}"}
        self.env = ray_env(**auth, **env)
        self.gcs, self.dash, self.client = free_ports(3)
        self.nodes: list[RayNode] = []

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dash}"

    @property
    def head(self) -> RayNode:
        return self.nodes[0]

    def __enter__(self) -> LoopbackCluster:
        self.nodes.append(RayNode.start(
            self.env, ip=self.head_ip, num_cpus=self.head_cpus, head_gcs=self.gcs,
            resources=self.head_resources,
            extra=("--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash}",
                   f"--ray-client-server-port={self.client}")))
        return self

    def add_worker(self, ip: str, num_cpus: int,
                   resources: dict[str, float] | None = None) -> RayNode:
        """Start a worker node now; it joins once the head's GCS answers."""
        node = RayNode.start(self.env, ip=ip, num_cpus=num_cpus,
                             gcs_address=f"{self.head_ip}:{self.gcs}", resources=resources)
        self.nodes.append(node)
        return node

    def __exit__(self, *exc: object) -> None:
        for node in reversed(self.nodes):
            node.stop()

    def submit(self, submission_id: str, entrypoint: list[str], extra: tuple[str, ...] = (),
               while_running: Callable[[], None] | None = None, timeout: float = 400) -> str:
        """`ray job submit` (it waits for the job's end and prints its log), retried while
        the job agent is not up yet (it can come a few seconds after the dashboard);
        `while_running` is called every 20 ms meanwhile. Returns the submit's output."""
        with tempfile.TemporaryFile("w+") as log:
            for _ in range(10):
                log.seek(0)
                log.truncate()
                proc = subprocess.Popen(
                    [str(BIN / "ray"), "job", "submit", f"--address={self.address}",
                     f"--submission-id={submission_id}", "--working-dir", str(REPO), *extra,
                     "--", *entrypoint],
                    env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
                deadline = time.monotonic() + timeout
                try:
                    while proc.poll() is None and time.monotonic() < deadline:
                        if while_running is not None:
                            while_running()
                        time.sleep(0.02)
                finally:
                    if proc.poll() is None:
                        proc.kill()
                    proc.wait()
                log.seek(0)
                out = log.read()
                accepted = f"Job '{submission_id}' submitted successfully" in out
                if accepted or ("Failed to connect" not in out and "not ready" not in out):
                    return out
                time.sleep(3)
        return out

    def wait_nodes(self, n: int, timeout: float = 120) -> list[dict]:
        """Wait until `n` nodes are alive (the state API); returns their records."""
        deadline = time.monotonic() + timeout
        alive: list[dict] = []
        while time.monotonic() < deadline:
            try:
                request = urllib.request.Request(f"{self.address}/api/v0/nodes",
                                                 headers=self.headers)
                with urllib.request.urlopen(request, timeout=5) as resp:
                    nodes = json.load(resp)["data"]["result"]["result"]
                alive = [x for x in nodes if x["state"] == "ALIVE"]
                if len(alive) >= n:
                    return alive
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{n} Ray nodes not alive after {timeout}s: {alive}")
