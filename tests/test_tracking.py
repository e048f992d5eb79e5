"""MLflow: one parent run per job with its config, children per checkpoint, absolute paths."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from circuitray.tracking import (
    HOST_TAG,
    JOB_TAG,
    PID_TAG,
    ChildRun,
    default_tracking_uri,
    ensure_experiment,
    flatten,
    log_job,
    metric_key,
    start_job_run,
)

REPO = Path(__file__).resolve().parents[1]


def test_flatten_and_metric_keys() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1]}) == {
        "a.b": 1, "a.c.d": None, "e": [1]}
    assert metric_key("ddb_out@0.3:ood") == "ddb_out_0.3_ood"


def test_parent_and_children_land_in_sqlite_with_absolute_artifacts(tmp_path: Path,
                                                                    monkeypatch) -> None:
    out = tmp_path / "job"
    out.mkdir()
    (out / "figures").mkdir()
    (out / "figures" / "a.png").write_bytes(b"png")
    (out / "evaluation.csv").write_text("x\n1\n")
    monkeypatch.chdir(tmp_path)  # a relative URI would follow the cwd; ours must not
    uri = default_tracking_uri(out)
    assert uri == f"sqlite:///{out.resolve()}/mlflow.db"
    params = {f"p{i}": i for i in range(150)}  # > one log_batch of params
    children = [ChildRun(f"ckpt{i}", params={"lr": 10.0 ** -i, "seed": i},
                         metrics={"ddb_out": 0.5 * i, "nan_metric": math.nan})
                for i in range(3)]
    pid = log_job(tracking_uri=uri, experiment="exp", artifact_root=out / "mlartifacts",
                  run_name="job", params=params, metrics={"composite": 0.7, "skip": "text"},
                  artifacts=[(out / "figures", "figures"), (out / "evaluation.csv", "")],
                  children=children)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("exp")
    assert exp.artifact_location == (out / "mlartifacts").resolve().as_uri()
    parent = client.get_run(pid)
    assert parent.info.status == "FINISHED"
    assert len(parent.data.params) == 150 and parent.data.params["p149"] == "149"
    assert parent.data.metrics == {"composite": 0.7}
    names = sorted(a.path for a in client.list_artifacts(pid))
    assert names == ["evaluation.csv", "figures"]
    assert (out / "mlartifacts" / pid / "artifacts" / "figures" / "a.png").exists()
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{pid}'")
    assert sorted(r.info.run_name for r in runs) == ["ckpt0", "ckpt1", "ckpt2"]
    by_name = {r.info.run_name: r for r in runs}
    assert by_name["ckpt2"].data.metrics == {"ddb_out": 1.0}
    assert by_name["ckpt1"].data.params == {"lr": "0.1", "seed": "1"}
    # a second job in the same store reuses the experiment
    pid2 = log_job(tracking_uri=uri, experiment="exp", artifact_root=out / "elsewhere",
                   run_name="job2", params={}, metrics={})
    assert client.get_run(pid2).info.experiment_id == exp.experiment_id


def _store(tmp_path: Path) -> tuple[str, Path]:
    out = tmp_path / "job"
    out.mkdir(exist_ok=True)
    return default_tracking_uri(out), out


def test_failed_children_end_failed_and_finished_ones_finished(tmp_path: Path) -> None:
    uri, out = _store(tmp_path)
    children = [ChildRun("good", metrics={"acc": 0.9}, tags={"status": "complete"}),
                ChildRun("broken", tags={"status": "failed or not run"}, status="FAILED")]
    pid = log_job(tracking_uri=uri, experiment="exp", artifact_root=out / "mlartifacts",
                  run_name="job", params={}, metrics={}, children=children,
                  tags={"output_dir": str(out)})
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_run(pid).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{pid}'")
    assert {r.info.run_name: r.info.status for r in runs} == {"good": "FINISHED",
                                                              "broken": "FAILED"}
    assert client.get_run(pid).info.status == "FINISHED"
    with pytest.raises(ValueError, match="child run 'x': status 'DONE'"):
        ChildRun("x", status="DONE")


def test_parent_left_running_by_a_killed_job_is_closed_as_killed_by_the_next_log_job(
        tmp_path: Path) -> None:
    """A run created and never terminated (the job was SIGKILLed in reduce) ends KILLED when
    the same job (same experiment, same output_dir) logs again; other jobs' runs are not
    touched."""
    uri, out = _store(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    exp_id = ensure_experiment(client, "exp", out / "mlartifacts")
    killed = client.create_run(exp_id, run_name="job", tags={"output_dir": str(out)})
    other_job = client.create_run(exp_id, run_name="other",
                                  tags={"output_dir": str(tmp_path / "elsewhere")})
    pid = log_job(tracking_uri=uri, experiment="exp", artifact_root=out / "mlartifacts",
                  run_name="job", params={}, metrics={}, tags={"output_dir": str(out)})
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    assert client.get_run(other_job.info.run_id).info.status == "RUNNING"
    assert client.get_run(pid).info.status == "FINISHED"


_KILLED_IN_REDUCE = """
import sys, time
from circuitray.tracking import start_job_run
run = start_job_run(tracking_uri=sys.argv[1], experiment="exp", artifact_root=sys.argv[2],
                    run_name="job", params={"a": 1}, tags={"output_dir": sys.argv[2]})
print(run, flush=True)
time.sleep(120)
"""


def test_run_of_a_sigkilled_process_is_killed_but_a_live_ones_is_left_running(
        tmp_path: Path) -> None:
    uri, out = _store(tmp_path)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_IN_REDUCE, uri, str(out)], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        dead_run = proc.stdout.readline().strip()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(dead_run).info.status == "RUNNING"
    assert client.get_run(dead_run).data.tags[PID_TAG] == str(proc.pid)
    # a run of this live process (e.g. a concurrent stage) and one on another host stay
    live = start_job_run(tracking_uri=uri, experiment="exp", artifact_root=out,
                         run_name="job", tags={"output_dir": str(out)})
    exp_id = client.get_run(live).info.experiment_id
    remote = client.create_run(exp_id, run_name="job", tags={
        JOB_TAG: str(out), HOST_TAG: "gpu-node-7", PID_TAG: "4242"})
    log_job(tracking_uri=uri, experiment="exp", artifact_root=out, run_name="job",
            params={}, metrics={}, tags={"output_dir": str(out)})
    assert client.get_run(dead_run).info.status == "KILLED"
    assert client.get_run(live).info.status == "RUNNING"
    assert client.get_run(remote.info.run_id).info.status == "RUNNING"
    log_job(tracking_uri=uri, experiment="exp", artifact_root=out, run_name="job",
            params={"late": 1}, metrics={"m": 1.0}, run_id=live)  # finishes the started run
    finished = client.get_run(live)
    assert finished.info.status == "FINISHED" and finished.data.params["late"] == "1"


def test_interrupted_logging_ends_the_parent_killed_and_an_error_failed(tmp_path: Path) -> None:
    uri, out = _store(tmp_path)

    def children(exc: BaseException):
        yield ChildRun("first")
        raise exc

    client = MlflowClient(tracking_uri=uri)
    for exc, status in ((KeyboardInterrupt(), "KILLED"), (RuntimeError("boom"), "FAILED")):
        with pytest.raises(type(exc)):
            log_job(tracking_uri=uri, experiment="exp", artifact_root=out, run_name=status,
                    params={}, metrics={}, children=children(exc))
        exp_id = client.get_experiment_by_name("exp").experiment_id
        parent = [r for r in client.search_runs([exp_id]) if r.info.run_name == status][0]
        assert parent.info.status == status


def test_store_failures_become_errors_naming_the_store(tmp_path) -> None:
    """A full disk under the sqlite store (seen by the fault benchmark as a raw SQLAlchemy
    traceback with exit 1) is an OutputError naming the database; other store failures are
    a TrackingError naming the store."""
    import sqlite3

    from mlflow.exceptions import MlflowException

    from circuitray.errors import OutputError, TrackingError
    from circuitray.tracking import store_errors

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(OutputError, match=rf"cannot write {tmp_path}/mlflow.db: disk full"):
        with store_errors(uri):
            try:
                raise sqlite3.OperationalError("database or disk is full")
            except sqlite3.OperationalError as exc:
                raise MlflowException("could not create table") from exc
    with pytest.raises(TrackingError, match=r"MLflow store http://x:5000: .*refused"):
        with store_errors("http://x:5000"):
            raise MlflowException("API request failed: connection refused")


def test_a_new_sqlite_store_is_created_whole_or_not_at_all(tmp_path, monkeypatch) -> None:
    """A full disk while MLflow builds its schema left a half-migrated mlflow.db that every
    later run refused ("table _alembic_tmp_trace_tags already exists", bench/faults.py)."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    from circuitray.errors import OutputError
    from circuitray.tracking import store_errors

    db = tmp_path / "mlflow.db"
    real = MlflowClient.search_experiments

    def full_disk(self, *args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(MlflowClient, "search_experiments", full_disk)
    with pytest.raises(OutputError, match="disk full"):
        with store_errors(f"sqlite:///{db}"):
            pass
    assert list(tmp_path.iterdir()) == []  # no database, no temporary
    monkeypatch.setattr(MlflowClient, "search_experiments", real)
    with store_errors(f"sqlite:///{db}"):
        assert MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    assert db.exists() and [p.name for p in tmp_path.iterdir()] == ["mlflow.db"]
