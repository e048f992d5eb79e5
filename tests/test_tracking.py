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

from circuitray.errors import MetricError
from circuitray.registry import tracking_key
from circuitray.tracking import (
    GIT_COMMIT_ENV,
    HOST_TAG,
    JOB_TAG,
    PID_TAG,
    ChildRun,
    default_tracking_uri,
    ensure_experiment,
    flatten,
    git_commit,
    log_job,
    metric_key,
    runs_view_link,
    short_names,
    source_tags,
    start_job_run,
)

REPO = Path(__file__).resolve().parents[1]


def test_flatten_and_metric_keys() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1]}) == {
        "a.b": 1, "a.c.d": None, "e": [1]}
    assert metric_key("ddb_out@0.3:ood") == "ddb_out_0.3_ood"


def test_tracking_keys_come_from_the_registry_with_scope_and_named_tau() -> None:
    """`ddb_out_0.2` read as `ddb_out_0` › `2` in the UI, and a job-level `ac.post_srcc` sat
    beside a checkpoint's `ac`: every key is `<scope>/<name>[/<stat>]`."""
    assert tracking_key("ddb_out_0.2", "ood") == "ood/ddb_out_tau0.2"
    assert tracking_key("ddb_global_0.3", "corr", "pre_srcc") == "corr/ddb_global_tau0.3/pre_srcc"
    assert tracking_key("ac", "corr", "post_srcc") == "corr/ac/post_srcc"
    assert tracking_key("css_srcc", "shift_mean") == "shift_mean/css_srcc"
    assert tracking_key("accuracy", "id") == "id/accuracy"
    with pytest.raises(MetricError, match="'lr' is not a registered metric"):
        tracking_key("lr", "ood")  # a hyperparameter is never a metric key


DEMO = "digits-{}-rho{}-lr{}-e{}-wd0.05-none-d8-s0"


def test_short_names_put_what_differs_first() -> None:
    ids = [DEMO.format("patch", 0.85, 0.002, 40), DEMO.format("background", 0.5, 0.001, 20),
           DEMO.format("patch", 0.85, 0.002, 40) + ".e13"]
    names = short_names(ids, parents={ids[2]: ids[0]}, epochs={ids[2]: 13})
    assert names == {ids[0]: "patch ρ.85 lr2e-3 e40", ids[1]: "background ρ.5 lr1e-3 e20",
                     ids[2]: "patch ρ.85 lr2e-3 e40@e13"}
    assert short_names(["ckpt0", "ckpt1"]) == {"ckpt0": "ckpt0", "ckpt1": "ckpt1"}
    # names that would collide (or be empty) keep their ids
    assert short_names(["a-x", "a_x"]) == {"a-x": "a-x", "a_x": "a_x"}
    assert short_names(["only"]) == {"only": "only"}


def test_git_commit_from_config_then_env_then_checkout(tmp_path: Path, monkeypatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    monkeypatch.delenv(GIT_COMMIT_ENV, raising=False)
    assert git_commit(None, cwd=repo) == head
    assert git_commit(None, cwd=tmp_path) is None  # not a checkout (a ray job submit upload)
    monkeypatch.setenv(GIT_COMMIT_ENV, "f00d")
    assert git_commit(None, cwd=repo) == "f00d"
    assert git_commit("c0ffee", cwd=repo) == "c0ffee"
    tags = source_tags("c0ffee")
    assert tags["mlflow.source.git.commit"] == "c0ffee" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] and tags["mlflow.source.name"]
    assert "mlflow.source.git.commit" not in source_tags(None)


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
    """A job folder with an empty store: a copy of one built per session (MLflow's dozens of
    schema migrations take seconds; a copy takes none)."""
    import shutil

    template = tmp_path.parent / "mlflow-template.db"
    if not template.exists():
        MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments(max_results=1)
    out = tmp_path / "job"
    out.mkdir(exist_ok=True)
    shutil.copyfile(template, out / "mlflow.db")
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


def test_a_job_logged_again_replaces_its_runs_and_keeps_other_jobs(tmp_path: Path) -> None:
    """A forced reduce logged a second parent with a second set of children beside the
    first: the experiment showed every checkpoint twice."""
    uri, out = _store(tmp_path)
    client = MlflowClient(tracking_uri=uri)

    def log(job: Path, value: float) -> str:
        return log_job(tracking_uri=uri, experiment="exp", artifact_root=out / "mlartifacts",
                       run_name="job", params={}, metrics={"m": value},
                       children=[ChildRun("c", metrics={"x": value})],
                       tags={"output_dir": str(job)})

    first = log(out, 1.0)
    other = log(tmp_path / "other-job", 1.0)
    second = log(out, 2.0)
    exp_id = client.get_run(second).info.experiment_id
    live = {r.info.run_id: r for r in client.search_runs([exp_id])}
    assert first not in live and second in live and other in live
    assert client.get_run(first).info.lifecycle_stage == "deleted"  # restorable
    kids = [r for r in live.values() if r.data.tags.get("mlflow.parentRunId") == second]
    assert len(live) == 4 and len(kids) == 1 and kids[0].data.metrics == {"x": 2.0}


def test_experiment_is_tagged_as_classic_ml_unless_someone_chose_a_kind(tmp_path: Path) -> None:
    uri, out = _store(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    assert runs_view_link(uri, "exp") is None  # nothing logged yet (and no store created)
    new = ensure_experiment(client, "exp", out)
    assert client.get_experiment(new).tags["mlflow.experimentKind"] == "custom_model_development"
    old = client.create_experiment("old", artifact_location=out.as_uri())
    ensure_experiment(client, "old", out)
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    client.set_experiment_tag(old, "mlflow.experimentKind", "genai_development")
    ensure_experiment(client, "old", out)
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "genai_development"
    assert runs_view_link(uri, "exp") == \
        f"http://127.0.0.1:5000/#/experiments/{new}/runs?workflowType=machine_learning"


CONF = REPO / "conf" / "tiny.yaml"
COMMIT = "ab" * 20


@pytest.fixture(scope="module")
def demo_like_job(tmp_path_factory):
    """A tiny job whose manifest looks like the demo zoo's (ids naming every hyperparameter,
    an intermediate checkpoint, training's own accuracies, a broken file), discovered inline
    and reduced once: what a user opens in the MLflow UI."""
    import pandas as pd
    from _jobdata import write_checkpoints

    from circuitray.job_config import load_job_config
    from circuitray.runtime.discover import discover_checkpoint, record_result
    from circuitray.runtime.layout import JobLayout
    from circuitray.runtime.plan import manifest_rows
    from circuitray.runtime.reduce import run_reduce

    root = tmp_path_factory.mktemp("demo_like")
    manifest = write_checkpoints(root, 3, corrupt=("truncated",))
    table = pd.read_csv(manifest)
    final = [DEMO.format("patch", 0.85, 0.002, 40), DEMO.format("background", 0.5, 0.001, 20),
             DEMO.format("patch", 0.7, 0.002, 40)]
    ids = [final[0], final[1], final[0] + ".e13", final[2]]  # the last is the broken file
    table = table.assign(checkpoint_id=ids, parent_id=[final[0], final[1], final[0], final[2]],
                         epoch=[40, 20, 13, 40], final=[True, True, False, True],
                         id_acc=[0.91, 0.82, 0.7, 0.5], ood_acc=[0.61, 0.42, 0.45, 0.3])
    table.to_csv(manifest, index=False)
    cfg = load_job_config(CONF, [f"manifest={manifest}", f"output_dir={root / 'job'}",
                                 "reduce.figures=false", f"tracking.git_commit={COMMIT}"])
    layout = JobLayout.of(cfg.output_dir)
    for row in manifest_rows(cfg):
        record_result(layout, discover_checkpoint(row, cfg))
    return cfg, layout, ids, run_reduce(cfg)


@pytest.mark.slow
def test_job_reads_back_through_the_client_as_mlflow_users_expect(demo_like_job) -> None:
    import json

    import pandas as pd

    from circuitray import registry
    from circuitray.tables import read_parquet

    cfg, layout, ids, result = demo_like_job
    uri = default_tracking_uri(layout.root)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert runs_view_link(uri, exp.name).endswith(
        f"/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")
    parent = client.get_run(result.run_id)
    tags = parent.data.tags
    for run_tags in [tags] + [r.data.tags for r in client.search_runs([exp.experiment_id])]:
        assert run_tags["mlflow.source.git.commit"] == COMMIT
        assert run_tags["mlflow.user"] and run_tags["mlflow.source.name"]
        assert run_tags["mlflow.source.type"] == "LOCAL"
    assert "**tiny**: 3 checkpoints reduced, 1 failed" in tags["mlflow.note.content"]
    # parent runs are found by job name and config hash; children carry neither
    for key in ("circuitray.name", "circuitray.config_hash"):
        found = client.search_runs([exp.experiment_id],
                                   filter_string=f"tags.`{key}` = '{tags[key]}'")
        assert [r.info.run_id for r in found] == [result.run_id]
    # parent metrics: the result table's statistics under corr/, the job's counts under job/
    keys = set(parent.data.metrics)
    assert keys and all(k.split("/")[0] in ("corr", "job") for k in keys)
    assert "corr/ac/alarm_f1" in keys and parent.data.metrics["job/checkpoints_failed"] == 1
    assert not [k for k in keys if k.endswith(("_lo", "_hi", "_n")) or "paper" in k]
    assert not [k for k in keys if "ddb" in k and "tau" not in k]
    # artifacts a browser previews, the config, and the manifest as the input dataset
    results = json.loads(Path(client.download_artifacts(
        result.run_id, "tables/results.json", str(layout.root / "dl"))).read_text())
    expected = read_parquet(layout.evaluation / "results.parquet").to_pandas()
    assert pd.DataFrame(results["data"], columns=results["columns"]).metric.tolist() == \
        expected.metric.tolist()
    assert {a.path for a in client.list_artifacts(result.run_id)} >= {"config.yaml", "tables"}
    (dataset,) = parent.inputs.dataset_inputs
    assert dataset.dataset.name == "manifest.csv" and cfg.manifest in dataset.dataset.source
    # children: short names, real work intervals, one name per meaning
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'")
    by_id = {r.data.tags["checkpoint"]: r for r in runs}
    assert {c: r.info.run_name for c, r in by_id.items()} == {
        ids[0]: "patch ρ.85 lr2e-3 e40", ids[1]: "background ρ.5 lr1e-3 e20",
        ids[2]: "patch ρ.85 lr2e-3 e40@e13", ids[3]: "patch ρ.7 lr2e-3 e40"}
    broken = by_id[ids[3]]
    assert broken.info.status == "FAILED" and broken.data.tags["error_stage"] == "load"
    assert broken.data.tags["error"].startswith("CheckpointError")
    for cid in ids[:3]:
        run = by_id[cid]
        marker = read_parquet(layout.marker(cid)).to_pandas()
        end = marker.outputs_mtime_ns / 1e6
        assert run.info.start_time == int((end - marker.seconds * 1000).min())
        assert run.info.end_time == int(end.max())
        params, metrics = run.data.params, run.data.metrics
        assert not set(params) & set(metrics)
        assert float(params["train.ood_acc"]) in (0.61, 0.42, 0.45)
        assert {"ood_acc", "id_acc", "parent_id", "final"}.isdisjoint(params)
        assert params["train.parent_id"] == ids[0] if cid == ids[2] else cid
        assert "lr" in params and "lr" not in {k.split("/")[-1] for k in metrics}
        assert metrics["ood/accuracy"] != float(params["train.ood_acc"])  # ours vs training's
        assert {k.split("/")[0] for k in metrics} <= {"id", "ood", "shift_mean"}
        names = {k.split("/", 1)[1] for k in metrics}
        descriptors = {"n", "n_labeled", "nuclear_lo", "nuclear_hi", "temperature",
                       "n_examples"}
        assert not names & descriptors and not [n for n in names if n.startswith("lam_")]
        ddb = registry.tracking_key(f"ddb_out_{cfg.reduce.taus[0]:g}", "ood")
        assert ddb in metrics and "ood/ac" in metrics
    assert parent.info.start_time == min(by_id[c].info.start_time for c in ids[:3])
    assert parent.info.end_time >= max(by_id[c].info.end_time for c in ids[:3])
