"""MLflow logging of a job: one parent run, one child run per checkpoint.

Logged through `MlflowClient` with batched calls (`log_batch`), so hundreds of checkpoints cost
a few round trips, and no global MLflow state (active run, environment URI) leaks between
jobs. URIs and artifact locations are absolute: under `ray job submit` the driver's working
directory is a throwaway copy of the repository.

Every run ends in a status that says what happened: FINISHED, FAILED (an error while
logging, or a child whose checkpoint failed), KILLED (SIGTERM/Ctrl-C). A run whose process
died without a word (SIGKILL, a lost node) stays RUNNING in the store; runs are tagged with
their job key and process (host, pid, start time), so the next `start_job_run`/`log_job` of
the same job finds such runs and marks them KILLED.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from circuitray.errors import CircuitrayError, OutputError, TrackingError, os_error_reason  # noqa: E402
from circuitray.procinfo import ProcessId  # noqa: E402

log = logging.getLogger(__name__)

_MAX_PARAMS = 100  # MLflow's per-batch limits
_MAX_METRICS = 1000
_MAX_VALUE = 6000
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")

JOB_TAG = "circuitray.job"  # which job a run belongs to (by default its output_dir)
HOST_TAG, PID_TAG, PID_START_TAG = "circuitray.host", "circuitray.pid", "circuitray.pid_start"
STATUSES = ("FINISHED", "FAILED", "KILLED")


@dataclass
class ChildRun:
    """What one checkpoint contributes: its manifest hyperparameters and its metrics.

    `status` is how its run ends: FAILED for a checkpoint that failed or was not run, so the
    MLflow UI's status column tells the zoo's broken checkpoints apart.
    """

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    status: str = "FINISHED"

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"child run '{self.name}': status {self.status!r} not in {STATUSES}")


def default_tracking_uri(output_dir: str | os.PathLike) -> str:
    """A sqlite store inside the job's output folder, by absolute path."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the resolved config as MLflow params."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def metric_key(name: str) -> str:
    """MLflow accepts letters, digits, _ - . space and /; anything else becomes '_'."""
    return _KEY_BAD.sub("_", str(name))[:250]


def _params(values: Mapping[str, Any]) -> list[Param]:
    return [Param(metric_key(k), ("None" if v is None else str(v))[:_MAX_VALUE])
            for k, v in values.items()]


def _metrics(values: Mapping[str, Any], ts: int) -> list[Metric]:
    out = []
    for k, v in values.items():
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(x):  # NaN means "not computable" and is reported in tables instead
            out.append(Metric(metric_key(k), x, ts, 0))
    return out


def _log_batched(client: MlflowClient, run_id: str, params: list[Param],
                 metrics: list[Metric], tags: list[RunTag]) -> None:
    for i in range(0, len(params), _MAX_PARAMS):
        client.log_batch(run_id, params=params[i:i + _MAX_PARAMS])
    for i in range(0, len(metrics), _MAX_METRICS):
        client.log_batch(run_id, metrics=metrics[i:i + _MAX_METRICS])
    for i in range(0, len(tags), _MAX_PARAMS):
        client.log_batch(run_id, tags=tags[i:i + _MAX_PARAMS])


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str | os.PathLike) -> str:
    """The experiment's id, creating it with an absolute artifact location when new."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = Path(artifact_root).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def _process_tags(job: str) -> dict[str, str]:
    me = ProcessId.current()
    return {JOB_TAG: job, HOST_TAG: me.host, PID_TAG: str(me.pid),
            PID_START_TAG: me.start or ""}


def close_stale_runs(client: MlflowClient, experiment_id: str, job: str) -> list[str]:
    """Mark KILLED the runs of `job` still RUNNING whose process is gone (a job killed with
    SIGKILL, a lost driver); returns their ids. A run of a live process, or of a process on
    another host (whose liveness cannot be seen from here), is left alone and named. Runs of
    this job without process tags predate them: only a killed job left those RUNNING."""
    closed = []
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                              max_results=10_000)
    for run in runs:
        tags = run.data.tags
        if tags.get(JOB_TAG, tags.get("output_dir")) != job:
            continue
        alive: bool | None = False
        if PID_TAG in tags:
            try:
                owner = ProcessId(tags.get(HOST_TAG, ""), int(tags[PID_TAG]),
                                  tags.get(PID_START_TAG) or None)
            except ValueError:
                continue  # not written by us: not ours to judge
            alive = owner.alive()
            if alive is None:
                log.warning(f"[tracking] run {run.info.run_id} of this job is RUNNING on host "
                            f"{owner.host} (pid {owner.pid}); if that job is dead, end it with "
                            f"MlflowClient().set_terminated('{run.info.run_id}', 'KILLED')")
        if alive is False:
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    if closed:
        log.warning(f"[tracking] marked {len(closed)} run(s) KILLED that a killed earlier run "
                    f"of this job left RUNNING")
    return closed


def _store_file(uri: str) -> str | None:
    """The database file of a local sqlite store (what a full disk cannot grow)."""
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


def _root_cause(exc: BaseException) -> BaseException:
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__
    return seen


def _create_sqlite_store(path: str) -> None:
    """Create a new local sqlite store under a temporary name, then rename it: MLflow builds
    its schema in many steps, and a full disk midway would leave a half-migrated database
    that every later run refuses ("table _alembic_tmp_... already exists")."""
    import uuid

    final = Path(path)
    if final.exists():
        return
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """MLflow or its database failing (a full disk, an unreachable server, a broken schema)
    becomes one CircuitrayError naming the store, not a SQLAlchemy traceback; a full disk
    under a local sqlite store is an OutputError naming the database file. A new local
    sqlite store is created whole or not at all."""
    try:
        path = _store_file(uri)
        if path is not None:
            _create_sqlite_store(path)
        yield
    except CircuitrayError:
        raise
    except Exception as exc:
        cause = _root_cause(exc)
        text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        path = _store_file(uri)
        if isinstance(cause, OSError):
            text = os_error_reason(cause)
        if path is not None and ("disk is full" in text or "disk full" in text):
            raise OutputError(path, "disk full (no space left on the device)") from exc
        raise TrackingError(f"MLflow store {uri}: {type(cause).__name__}: {text}") from exc


def start_job_run(*, tracking_uri: str, experiment: str, artifact_root: str | os.PathLike,
                  run_name: str, params: Mapping[str, Any] | None = None,
                  tags: Mapping[str, str] | None = None, job_key: str | None = None) -> str:
    """Create the job's parent run (RUNNING) with its params, after closing this job's stale
    runs. Call it when the stage starts, so that a job killed midway is visible as such;
    finish with `log_job(..., run_id=)` or `end_job_run`. `job_key` defaults to the
    `output_dir` tag (else the run name)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = ensure_experiment(client, experiment, artifact_root)
    job = job_key or (tags or {}).get("output_dir") or run_name
    close_stale_runs(client, exp_id, job)
    run = client.create_run(exp_id, run_name=run_name,
                            tags={**dict(tags or {}), **_process_tags(job)})
    try:
        _log_batched(client, run.info.run_id, _params(params or {}), [], [])
    except BaseException as exc:
        _terminate_quietly(client, run.info.run_id, _end_status(exc))
        raise
    return run.info.run_id


def end_job_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """End a parent run started by `start_job_run` without `log_job` (e.g. the stage failed)."""
    MlflowClient(tracking_uri=tracking_uri).set_terminated(run_id, status)


def _end_status(exc: BaseException) -> str:
    return "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"


def _terminate_quietly(client: MlflowClient, run_id: str, status: str) -> None:
    """End a run on the way out of an error; a store that fails too must not hide that error
    (the run then stays RUNNING and the next run of the job closes it)."""
    try:
        client.set_terminated(run_id, status)
    except Exception as exc:  # the original error is the one to report
        log.warning(f"[tracking] could not mark run {run_id} {status}: {exc}")


def log_job(*, tracking_uri: str, experiment: str, artifact_root: str | os.PathLike,
            run_name: str, params: Mapping[str, Any], metrics: Mapping[str, float],
            artifacts: Iterable[tuple[str | os.PathLike, str]] = (),
            children: Iterable[ChildRun] = (), tags: Mapping[str, str] | None = None,
            job_key: str | None = None, run_id: str | None = None) -> str:
    """Log a parent run (config params, headline metrics, artifacts) with child runs.

    `artifacts` are (local file or folder, artifact sub-path) pairs. With `run_id` (from
    `start_job_run`) the parent already exists and `params` are added to it; otherwise it is
    created here, after this job's stale RUNNING runs are marked KILLED. Each child ends with
    its `status`; the parent ends FINISHED, FAILED on an error, KILLED on SIGTERM/Ctrl-C.
    Returns the parent run id.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    if run_id is None:
        pid = start_job_run(tracking_uri=tracking_uri, experiment=experiment,
                            artifact_root=artifact_root, run_name=run_name, params=params,
                            tags=tags, job_key=job_key)
        params = {}
    else:
        pid = run_id
    parent = client.get_run(pid)
    exp_id = parent.info.experiment_id
    job = parent.data.tags.get(JOB_TAG) or job_key or (tags or {}).get("output_dir") or run_name
    ts = int(time.time() * 1000)
    late_tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()] if run_id else []
    try:
        _log_batched(client, pid, _params(params), _metrics(metrics, ts), late_tags)
        for local, sub in artifacts:
            local = Path(local)
            if local.is_dir():
                client.log_artifacts(pid, str(local), sub or None)
            elif local.exists():
                client.log_artifact(pid, str(local), sub or None)
        for child in children:
            run = client.create_run(exp_id, run_name=child.name,
                                    tags={"mlflow.parentRunId": pid, **child.tags,
                                          **_process_tags(job)})
            try:
                _log_batched(client, run.info.run_id, _params(child.params),
                             _metrics(child.metrics, ts), [])
            except BaseException as exc:
                _terminate_quietly(client, run.info.run_id, _end_status(exc))
                raise
            client.set_terminated(run.info.run_id, child.status)
    except BaseException as exc:
        _terminate_quietly(client, pid, _end_status(exc))
        raise
    client.set_terminated(pid, "FINISHED")
    return pid
