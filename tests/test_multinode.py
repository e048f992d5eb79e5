"""A real two-node Ray cluster: `ray job submit` of the pipeline, one node lost mid-discover.

Two `ray start` nodes on this machine stand in for two hosts: the head on 127.0.0.2 and a
worker node on 127.0.0.3 (not 127.0.0.1, which `ray start --address` rewrites to the LAN
address), each with its own CPUs, ports and temp dir. A multi-node Ray binds its ports on
every interface, so the cluster runs with token auth, as the README prescribes for clusters.
The driver is pinned to the head by the README's `driver` resource; checkpoints spill to the
second node once the head's CPU is busy. When a task running on the second node has written
a domain, the test kills that node (its raylet, then its other processes): Ray re-runs the
task on the head (`resources.max_retries`), the retry resumes the domains the lost attempt
wrote, and the job ends with every (checkpoint, domain) written once and the tables a clean
run writes.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _jobdata import write_checkpoints
from _raycluster import LoopbackCluster, RayNode, pids_running, session_processes
from test_pipeline import _assert_each_output_once

from circuitray.job_config import load_job_config
from circuitray.runtime.discover import discover_checkpoint
from circuitray.runtime.layout import JobLayout
from circuitray.runtime.plan import manifest_rows, plan_job
from circuitray.tables import EDGE_SCHEMA, OUTPUT_SCHEMA, read_parquet

CONF = Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml"


class _NodeKiller:
    """Called every 20 ms while the job runs: notes which node each running checkpoint is on
    (the pid in its running note belongs to that node's session), and kills the victim node
    once a checkpoint running there has written a domain: SIGKILL to its raylet, then to every
    other process of the node, as when a machine is lost (a raylet killed alone leaves its
    workers running for up to ~3 s here, long enough to finish a tiny checkpoint)."""

    def __init__(self, layout: JobLayout, nodes: dict[str, RayNode], victim: str) -> None:
        self.layout, self.nodes, self.victim = layout, nodes, victim
        self.ran_on: dict[str, set[str]] = {}  # checkpoint -> nodes it was seen running on
        self.killed: str | None = None  # the checkpoint whose node was killed under it
        self.driver_on: set[str] = set()  # nodes running the job's driver

    def __call__(self) -> None:
        running = self.layout.running
        notes = list(running.glob("*.json")) if running.exists() else []
        if notes and not self.driver_on:  # tasks run: their driver does too
            self.driver_on = {name for name, node in self.nodes.items()
                              for pid in pids_running("jobs/pipeline.py") if node.runs(pid)}
        for note in notes:
            try:
                pid = json.loads(note.read_text())["pid"]
            except (OSError, ValueError, KeyError):
                continue  # being written or removed
            cid = note.stem
            self.ran_on.setdefault(cid, set()).update(
                name for name, node in self.nodes.items() if node.runs(pid))
            written = self.layout.outputs / "toy" / cid  # outputs land after edges
            victim = self.nodes[self.victim]
            if self.killed is None and victim.runs(pid) and written.exists() \
                    and any(written.glob("*.parquet")):
                raylet = victim.pid_of("raylet")
                assert raylet is not None, "the victim node has no raylet"
                os.kill(raylet, signal.SIGKILL)
                for other in session_processes(victim.session):  # the machine's other
                    with contextlib.suppress(ProcessLookupError):  # processes go with it
                        os.kill(other, signal.SIGKILL)
                self.killed = cid


def _table(root: Path, schema: pa.Schema, cid: str) -> pd.DataFrame:
    """One checkpoint's rows of a table, in a fixed order."""
    frame = read_parquet(root, schema).to_pandas()
    keys = [c for c in ("domain", "src", "dst", "example") if c in frame]
    return frame[frame.checkpoint == cid].sort_values(keys).reset_index(drop=True)


@pytest.mark.slow
def test_two_node_job_survives_losing_a_node_mid_discover(tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    manifest = write_checkpoints(tmp_path, 2)
    out = tmp_path / "job-out"
    overrides = [f"manifest={manifest}", "reduce.figures=false", "tracking.enabled=false",
                 "data.shift_severities=[1, 2, 3, 4, 5]"]  # 9 domains: killed between two
    layout = JobLayout.of(out)
    # Ray's health checks give up on the dead node after 3 checks 0.5 s apart (default: 5, 3 s)
    # the head's `driver` resource and the entrypoint flags pin the driver as the README says
    with LoopbackCluster(head_ip="127.0.0.2", head_cpus=1, head_resources={"driver": 1},
                         token_dir=tmp_path,
                         RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="500",
                         RAY_health_check_failure_threshold="3") as cluster:
        node2 = cluster.add_worker("127.0.0.3", num_cpus=1, resources={"node2": 1})
        assert {n["node_ip"] for n in cluster.wait_nodes(2)} == {"127.0.0.2", "127.0.0.3"}
        killer = _NodeKiller(layout, {"head": cluster.head, "node2": node2}, "node2")
        log = cluster.submit("two-nodes", ["python", "jobs/pipeline.py", str(CONF),
                                           f"output_dir={out}", *overrides],
                             extra=("--entrypoint-resources", '{"driver": 1}',
                                    "--entrypoint-memory", "1000000000"),
                             while_running=killer)
        status = JobSubmissionClient(cluster.address, headers=cluster.headers) \
            .get_job_status("two-nodes")
        head_alive = cluster.head.proc.poll() is None
    assert status == JobStatus.SUCCEEDED, log[-4000:]
    assert killer.killed is not None, f"no checkpoint was seen on the second node: {killer.ran_on}"
    assert head_alive
    assert killer.driver_on == {"head"}
    assert set().union(*killer.ran_on.values()) == {"head", "node2"}, killer.ran_on
    assert killer.ran_on[killer.killed] == {"head", "node2"}, "the lost task was not re-run"

    cfg = load_job_config(CONF, [*overrides, f"output_dir={out}"])
    _assert_each_output_once(cfg, ["ckpt0", "ckpt1"])
    assert all(c.complete for c in plan_job(cfg).checkpoints)  # markers verify the files
    marker = pq.read_table(layout.marker(killed := killer.killed)).to_pandas()
    assert marker.resumed.any(), "the retry should resume what the lost attempt wrote"
    assert not marker.resumed.all(), "the lost attempt finished before its node died"

    clean = load_job_config(CONF, [*overrides, f"output_dir={tmp_path / 'clean'}"])
    row = next(r for r in manifest_rows(clean) if r["checkpoint_id"] == killed)
    assert discover_checkpoint(row, clean)["status"] == "done"
    for which, schema in (("edges", EDGE_SCHEMA), ("outputs", OUTPUT_SCHEMA)):
        ours = _table(getattr(layout, which), schema, killed)
        theirs = _table(getattr(JobLayout.of(clean.output_dir), which), schema, killed)
        assert ours.equals(theirs), f"{which} of {killed} differ from a clean run"
