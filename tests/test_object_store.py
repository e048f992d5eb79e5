"""Output to object storage: the job against a real S3 API (moto's server on loopback).

The same storage operations on a folder and on S3; a job with `output_dir=s3://bucket/run`
whose worker is killed in the middle of a PUT gives, after Ray's retry and a re-run, exactly
the tables of the same job on a local folder; a leftover under a domain's final name is
overwritten, never read; a damaged object is named by reduce.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _jobdata import write_checkpoints

from circuitray import storage
from circuitray.errors import StaleResultError
from circuitray.job_config import JobConfig, load_job_config
from circuitray.runtime.layout import JobLayout
from circuitray.runtime.pipeline import PipelineResult, run_pipeline
from circuitray.runtime.reduce import run_reduce
from circuitray.storage import ObjectPath

pytest.importorskip("moto.moto_server.werkzeug_app")

CONF = Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml"
BUCKET = "circuitray-test"
FAST = ("tracking.enabled=false", "reduce.n_boot=10")
# the killed upload: the second domain's edges of ckpt0 (its ID domain is complete by then)
GATED_KEY = "run/edges/toy/ckpt0/ood.parquet"


class _Gate:
    """WSGI middleware in front of moto: holds the first PUT of `key` until the test says,
    then fails it (the client is dead by then: real S3 never stores a body that was not
    completely received, and neither may this server)."""

    def __init__(self, app: Callable[..., Any], key: str):
        self.app, self.key = app, key
        self.arrived, self.release = threading.Event(), threading.Event()
        self.armed = True

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Any:
        if self.armed and environ["REQUEST_METHOD"] == "PUT" and \
                environ.get("PATH_INFO", "").endswith(self.key):
            self.armed = False
            self.arrived.set()
            self.release.wait(120)
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [b"the client went away"]
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def s3() -> Iterator[_Gate]:
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS_* variables point pyarrow,
    boto3 and the Ray workers (started after this, they inherit the environment) at it."""
    import boto3
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    gate = _Gate(DomainDispatcherApplication(create_backend_app), GATED_KEY)
    server = make_server("127.0.0.1", 0, gate, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_port}",
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    storage._store.cache_clear()
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield gate
    finally:
        gate.release.set()
        server.shutdown()
        thread.join(10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage._store.cache_clear()


@pytest.fixture(scope="module")
def s3_ray(s3: _Gate) -> Iterator[None]:
    """A local Ray started after the S3 variables are set (its workers inherit them)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_storage_operations_mean_the_same_on_a_folder_and_on_s3(
        where: str, tmp_path: Path, s3: _Gate) -> None:
    root = storage.as_path(tmp_path / "st" if where == "folder" else f"s3://{BUCKET}/st")
    assert isinstance(root, Path if where == "folder" else ObjectPath)
    a, hidden = root / "x" / "a.parquet", root / "x" / ".lock"
    assert storage.stat(a) is None and not storage.exists(a)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(a)
    storage.write_bytes(a, b"first")
    storage.write_bytes(a, b"second!")  # a rewrite replaces the whole file
    storage.write_text(hidden, "{}")
    assert storage.read_bytes(a) == b"second!" and storage.stat(a)[0] == 7
    assert storage.list_files(root, ".parquet") == [a]
    assert storage.list_files(root, hidden=True) == [hidden, a]
    assert not storage.exists(root / "x"), "a folder is not a file"
    # one listing gives what a stat per file gives (planning checks files from a LIST)
    assert storage.stat_tree(root) == {a: storage.stat(a), hidden: storage.stat(hidden)}
    with storage.local_copies([a, hidden]) as copies:  # for tools that take local paths
        assert [c.read_bytes() for c in copies] == [b"second!", b"{}"]
        assert [c.name for c in copies] == ["a.parquet", ".lock"]
    assert (copies == [a, hidden]) is (where == "folder")  # downloads are gone, not the files
    assert all(c.exists() for c in copies) is (where == "folder")
    storage.delete(a)
    storage.delete(a)  # deleting what is gone is no error
    assert storage.list_files(root) == [] and storage.exists(hidden)
    if where == "folder":
        assert [p.name for p in (tmp_path / "st" / "x").iterdir()] == [".lock"], \
            "a temporary was left behind"


def test_job_lock_on_s3_is_a_conditional_put_that_a_second_job_cannot_take(s3: _Gate) -> None:
    from circuitray.errors import JobLockedError
    from circuitray.runtime.lock import JobLock

    out = f"s3://{BUCKET}/locked"
    with JobLock(out, "first") as lock:
        assert storage.exists(lock.path)
        with pytest.raises(JobLockedError, match=rf"{out}/.lock is held by job 'first'"):
            JobLock(out, "second").acquire()
    assert not storage.exists(ObjectPath(out) / ".lock")
    with JobLock(out, "second"):  # released: free again
        pass


def test_a_tasks_class_map_on_s3_has_one_first_writer_even_when_two_race(
        s3: _Gate, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two checkpoints of a task that both see no stored map (they checked at once) must not
    both pass: the conditional PUT lets one win and the other compare against it. A damaged
    stored map is an error naming the object."""
    from circuitray.data.classes import ClassMap, read_stored_class_map, store_class_map
    from circuitray.errors import DataError

    path = f"s3://{BUCKET}/maps/classes/toy.json"
    first, other = ClassMap(("cat", "dog"), "manifest"), ClassMap(("dog", "cat"), "folders")
    monkeypatch.setattr(storage, "exists", lambda p: False)  # both looked before either wrote
    store_class_map(path, "toy", first)
    store_class_map(path, "toy", first)  # the same map again is fine
    with pytest.raises(DataError, match=r"toy\.json.*labelled with \['cat', 'dog'\]"):
        store_class_map(path, "toy", other)
    assert read_stored_class_map(storage.as_path(path)) == first
    storage.write_text(storage.as_path(path), "{not json")
    with pytest.raises(DataError, match=r"toy\.json: unreadable stored class map"):
        store_class_map(path, "toy", first)


def test_experiment_takes_an_object_store_artifact_location_and_an_existing_one_is_named(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A URI artifact root is the location itself (not a local `s3:` folder); an experiment
    that exists keeps its location, and a notice says where the artifacts go."""
    from mlflow.tracking import MlflowClient

    from circuitray.tracking import default_tracking_uri, ensure_experiment

    client = MlflowClient(tracking_uri=default_tracking_uri(tmp_path))
    exp = ensure_experiment(client, "exp", f"s3://{BUCKET}/run/mlartifacts/")
    assert client.get_experiment(exp).artifact_location == f"s3://{BUCKET}/run/mlartifacts"
    caplog.set_level("INFO", logger="circuitray")
    assert ensure_experiment(client, "exp", f"s3://{BUCKET}/run/mlartifacts") == exp
    assert "already exists" not in caplog.text
    assert ensure_experiment(client, "exp", f"s3://{BUCKET}/other/mlartifacts") == exp
    assert (f"experiment 'exp' already exists with artifact location s3://{BUCKET}/run/"
            f"mlartifacts: this job's artifacts go there, not to s3://{BUCKET}/other/"
            "mlartifacts") in caplog.text
    with pytest.raises(ValueError, match=r"s3://b/run: an MLflow sqlite store needs a local"):
        default_tracking_uri("s3://b/run")


def _config(manifest: Path, out: str, *extra: str) -> JobConfig:
    return load_job_config(CONF, [f"manifest={manifest}", f"output_dir={out}", *FAST, *extra])


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory, s3: _Gate, s3_ray: None
         ) -> dict[str, Any]:
    """The same job on a local folder and on S3; on S3 a leftover sits under a domain's
    final name beforehand, and ckpt0's worker is killed while uploading its second domain."""
    tmp = tmp_path_factory.mktemp("objstore")
    manifest = write_checkpoints(tmp, 2)
    local = _config(manifest, str(tmp / "job"), "reduce.figures=false")  # figures: S3's only
    remote = _config(manifest, f"s3://{BUCKET}/run")
    run_pipeline(local)
    leftover = JobLayout.of(remote.output_dir).edges_file("toy", "ckpt1", "ood")
    storage.write_bytes(leftover, b"PAR1 a killed attempt of another setting")
    first: dict[str, PipelineResult] = {}
    thread = threading.Thread(target=lambda: first.setdefault("r", run_pipeline(remote)))
    thread.start()
    assert s3.arrived.wait(180), "the gated upload never came"
    running = JobLayout.of(remote.output_dir).running_file("ckpt0")
    pid = json.loads(storage.read_text(running))["pid"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)  # the connection is gone before the server answers
    s3.release.set()
    thread.join(300)
    assert not thread.is_alive() and "r" in first
    again = run_pipeline(remote)  # the re-run: everything is complete
    return {"local": local, "remote": remote, "first": first["r"], "again": again,
            "killed_pid": pid, "leftover": leftover}


@pytest.mark.slow
def test_killed_upload_is_retried_and_the_rerun_finds_everything_complete(jobs) -> None:
    first, again = jobs["first"], jobs["again"]
    assert sorted(first.discover.done) == ["ckpt0", "ckpt1"] and first.discover.failed == []
    assert not first.reduce.skipped and len(first.reduce.figures) >= 4
    assert all(isinstance(p, ObjectPath) for p in first.reduce.figures)
    assert sorted(again.discover.skipped) == ["ckpt0", "ckpt1"] and again.reduce.skipped
    layout = JobLayout.of(jobs["remote"].output_dir)
    marker = pq.read_table(pa.BufferReader(storage.read_bytes(layout.marker("ckpt0"))))
    marker = marker.to_pandas()
    assert marker.set_index("domain").loc["id", "resumed"], \
        "the retry should resume the domain the killed attempt completed"
    assert not marker.set_index("domain").loc["ood", "resumed"]
    names = [str(p) for p in storage.list_files(layout.root, hidden=True)]
    assert not any(".tmp" in n or ".write-probe" in n for n in names), names
    assert not any("/running/" in n or n.endswith("/.lock") for n in names), names


def _files(root: Path | ObjectPath) -> dict[str, bytes]:
    skip = ("_reduce.json", "config.yaml", "report.txt", ".png", "mlflow.db")
    out = {}
    for p in storage.list_files(root):
        rel = p.relative_to(root)
        rel = rel if isinstance(rel, str) else rel.as_posix()
        if rel.startswith(("checkpoints/", "cache/", "mlartifacts/")) or rel.endswith(skip):
            continue
        out[rel] = storage.read_bytes(p)
    return out


@pytest.mark.slow
def test_tables_on_s3_are_byte_identical_to_the_local_folders(jobs) -> None:
    """Edges, outputs (the leftover included: overwritten, not read), metrics, evaluation and
    the class map; the markers differ only in times and sizes-by-mtime, so they are not."""
    local = _files(JobLayout.of(jobs["local"].output_dir).root)
    remote = _files(JobLayout.of(jobs["remote"].output_dir).root)
    assert sorted(remote) == sorted(local)
    assert {"metrics/domains.parquet", "metrics/models.parquet",
            "edges/toy/ckpt1/ood.parquet"} <= set(local)
    assert [k for k in local if local[k] != remote[k]] == []


@pytest.mark.slow
def test_mlflow_of_an_s3_job_keeps_its_store_local_and_its_artifacts_in_the_bucket(
        jobs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Reduce with tracking on: the sqlite store in the output's local folder (none in the
    bucket), the parent's figures, tables and config.yaml under `<output_dir>/mlartifacts`
    on S3, readable through MLflow; a second reduce replaces the first one's runs."""
    import yaml
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    from circuitray.cli import _where
    from circuitray.runtime.reduce import tracking_uri

    monkeypatch.setenv("CIRCUITRAY_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _config(Path(jobs["remote"].manifest), jobs["remote"].output_dir,
                  "tracking.enabled=true")
    first = run_reduce(cfg, force=True)
    uri = tracking_uri(cfg)
    assert uri == f"sqlite:///{JobLayout.of(cfg.output_dir).local / 'mlflow.db'}"
    assert uri.startswith(f"sqlite:///{tmp_path / 'cache'}/") and Path(uri[10:]).is_file()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["job/checkpoints_complete"] == 2
    root = f"{cfg.output_dir}/mlartifacts/{first.run_id}/artifacts"  # the experiment's own
    assert run.info.artifact_uri == root
    top = {a.path for a in client.list_artifacts(first.run_id)}
    assert {"config.yaml", "figures", "tables"} <= top
    drawn = {p.name: p for p in first.figures}
    logged = {Path(a.path).name for a in client.list_artifacts(first.run_id, "figures")}
    assert logged == set(drawn) and len(logged) >= 4
    assert "tables/models.json" in {a.path for a in client.list_artifacts(first.run_id,
                                                                          "tables")}
    # downloaded from the bucket (the artifact URI is s3://), byte for byte what reduce drew
    got = Path(download_artifacts(run_id=first.run_id, tracking_uri=uri, dst_path=str(tmp_path),
                                  artifact_path=f"figures/{sorted(drawn)[0]}"))
    assert got.read_bytes() == storage.read_bytes(drawn[sorted(drawn)[0]])
    conf = download_artifacts(run_id=first.run_id, tracking_uri=uri, dst_path=str(tmp_path),
                              artifact_path="config.yaml")
    assert yaml.safe_load(Path(conf).read_text())["output_dir"] == cfg.output_dir
    models = json.loads(Path(download_artifacts(
        run_id=first.run_id, tracking_uri=uri, dst_path=str(tmp_path),
        artifact_path="tables/models.json")).read_text())
    assert sorted({row[models["columns"].index("checkpoint")] for row in models["data"]}) == \
        ["ckpt0", "ckpt1"]
    assert storage.exists(ObjectPath(root) / "config.yaml")
    assert not [p for p in storage.list_files(cfg.output_dir) if p.name == "mlflow.db"]

    second = run_reduce(cfg, force=True)  # replaces the first logging's runs
    assert client.get_run(first.run_id).info.lifecycle_stage == "deleted"
    live = client.search_runs([run.info.experiment_id])
    assert sorted(r.data.tags.get("mlflow.parentRunId", "parent") for r in live) == \
        sorted(["parent", second.run_id, second.run_id])
    caplog.set_level("INFO", logger="circuitray")
    _where(cfg)
    assert f"--backend-store-uri {uri} (artifacts: {cfg.output_dir}/mlartifacts)" in caplog.text
    assert f"/#/experiments/{run.info.experiment_id}/runs" in caplog.text


@pytest.mark.slow
def test_damaged_object_on_s3_is_named_by_reduce(jobs) -> None:
    cfg = jobs["remote"]
    victim = JobLayout.of(cfg.output_dir).outputs_file("toy", "ckpt1", "id")
    data = storage.read_bytes(victim)
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0xFF  # same size: only the checksum can tell
    storage.write_bytes(victim, bytes(damaged))
    try:
        with pytest.raises(StaleResultError, match=rf"{victim}: damaged"):
            run_reduce(cfg, force=True)
    finally:  # the module's job stays whole for any test after this one
        storage.write_bytes(victim, data)
