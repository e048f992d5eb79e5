"""A real Ray head on loopback, `ray job submit` of jobs/pipeline.py, results at absolute paths.

The head runs as the README says: token auth (a submit without the token is refused) and every
port of every Ray process on loopback (checked from /proc, not assumed from the flags: Ray 2.60
binds GCS and raylet to all interfaces unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes the
node's address 127.0.0.1; `--node-ip-address=127.0.0.1` alone is re-resolved to the LAN IP).

Only processes this test starts are stopped (tests/_raycluster.py): `ray start --block` runs in
its own session and that session is ended on exit (never `ray stop`, which would also end
other Ray instances on the machine).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _jobdata import write_checkpoints
from _raycluster import LoopbackCluster, wait_http
from _raycluster import is_loopback as _is_loopback
from _raycluster import listening as _listening

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.slow
def test_ray_job_submit_on_loopback_cluster_writes_tables_and_mlflow_runs(tmp_path: Path) -> None:
    manifest = write_checkpoints(tmp_path, 2, corrupt=("truncated",))
    out = tmp_path / "job-out"
    with LoopbackCluster(token_dir=tmp_path, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0") as cluster:
        address, auth, head = cluster.address, cluster.headers, cluster.head.proc
        wait_http(f"{address}/api/version", 120, auth)
        with pytest.raises(urllib.error.HTTPError) as refused:  # no token, no job
            urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
        assert refused.value.code == 401
        # the commit as the README passes it; the job's env_vars overlap the driver's own
        job_env = {"env_vars": {"CIRCUITRAY_GIT_COMMIT": COMMIT,
                                "MLFLOW_DISABLE_TELEMETRY": "true"}}
        log = cluster.submit("tiny-job", ["python", "jobs/pipeline.py", "conf/tiny.yaml",
                                          f"manifest={manifest}", f"output_dir={out}"],
                             extra=("--runtime-env-json", json.dumps(job_env)))
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
    # the commit passed at submit time (Ray uploads no .git) reaches the MLflow tag
    assert parents[0].data.tags["mlflow.source.git.commit"] == COMMIT
    assert sorted(r.info.run_name for r in children) == ["ckpt0", "ckpt1", "truncated"]
    assert {r.info.run_name: r.data.params.get("lr") for r in children}["ckpt1"] == "0.001"
