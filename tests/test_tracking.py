"""MLflow: one parent run per job with its config, children per checkpoint, absolute paths."""

from __future__ import annotations

import math
from pathlib import Path

from mlflow.tracking import MlflowClient

from circuitray.tracking import ChildRun, default_tracking_uri, flatten, log_job, metric_key


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
