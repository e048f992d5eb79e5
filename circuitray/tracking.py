"""MLflow logging of a job: one parent run, one child run per checkpoint.

Logged through `MlflowClient` with batched calls (`log_batch`), so hundreds of checkpoints cost
a few round trips, and no global MLflow state (active run, environment URI) leaks between
jobs. URIs and artifact locations are absolute: under `ray job submit` the driver's working
directory is a throwaway copy of the repository.

Every run ends in a status that says what happened: FINISHED, FAILED (an error while
logging, or a child whose checkpoint failed), KILLED (SIGTERM/Ctrl-C). A run whose process
died without a word (SIGKILL, a lost node) stays RUNNING in the store; runs are tagged with
their job key and process (host, pid, start time), so the next `start_job_run`/`log_job` of
the same job finds such runs and marks them KILLED. A job logged again (a forced or changed
reduce) replaces its earlier runs: once the new ones are complete the old ones are deleted
(MLflow's soft delete: restorable, hidden from the default view), so the experiment shows
each job once.

`MlflowClient.create_run` fills in none of the tags `mlflow.start_run` would: every run
here gets `mlflow.user`, `mlflow.source.name`/`.type` and, when known,
`mlflow.source.git.commit` (`source_tags`), and its real start and end times.
"""

from __future__ import annotations

import getpass
import logging
import math
import os
import re
import subprocess
import sys
import time
import warnings
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
_MAX_TAG = 8000  # well under MLflow's tag value limit, room for a note
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")

JOB_TAG = "circuitray.job"  # which job a run belongs to (by default its output_dir)
GIT_COMMIT_ENV = "CIRCUITRAY_GIT_COMMIT"  # the commit when the code has no .git (ray job submit)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
NOTE_TAG = "mlflow.note.content"
RUNS_VIEW = "#/experiments/{id}/runs?workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default
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
    start_ms: int | None = None  # when its work ran (epoch ms); None: when it is logged
    end_ms: int | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"child run '{self.name}': status {self.status!r} not in {STATUSES}")


def default_tracking_uri(folder: str | os.PathLike) -> str:
    """A sqlite store in a local folder, by absolute path: the job's output folder, or for
    an object-store output its local folder (`JobLayout.local`): sqlite needs a file system
    with locks, which a bucket is not."""
    from circuitray.storage import as_path

    root = as_path(folder)
    if not isinstance(root, Path):
        raise ValueError(f"{folder}: an MLflow sqlite store needs a local folder")
    return f"sqlite:///{root.resolve() / 'mlflow.db'}"


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


def artifact_location(artifact_root: str | os.PathLike) -> str:
    """The experiment's artifact location as MLflow stores it: an object-store URI
    (`s3://bucket/run/mlartifacts`) as written, a local folder as an absolute `file://` URI."""
    from circuitray.storage import ObjectPath, as_path

    root = as_path(artifact_root)
    return root.uri if isinstance(root, ObjectPath) else root.resolve().as_uri()


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str | os.PathLike) -> str:
    """The experiment's id, creating it with `artifact_root` (a folder or an object-store URI)
    as its artifact location when new. An existing experiment keeps its own location (MLflow
    cannot move one), so a notice says where this job's artifacts go instead. It is tagged as
    a classic ML experiment (`mlflow.experimentKind`) unless someone chose a kind."""
    exp = client.get_experiment_by_name(name)
    wanted = artifact_location(artifact_root)
    if exp is None:
        return client.create_experiment(name, artifact_location=wanted,
                                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if exp.artifact_location.rstrip("/") != wanted:
        log.info(f"[tracking] experiment '{name}' already exists with artifact location "
                 f"{exp.artifact_location}: this job's artifacts go there, not to {wanted} "
                 "(MLflow keeps an experiment's location; set tracking.experiment to a new "
                 "name to have them there)")
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def git_commit(configured: str | None = None, cwd: str | os.PathLike | None = None
               ) -> str | None:
    """The commit the code came from: `configured` (tracking.git_commit), else the
    CIRCUITRAY_GIT_COMMIT environment variable, else `git rev-parse HEAD` in `cwd` when it is
    a git checkout, else None. Ray's `ray job submit` uploads the working tree without
    `.git`, hence the first two."""
    for value in (configured, os.environ.get(GIT_COMMIT_ENV)):
        if value and value.strip():
            return value.strip()
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def source_tags(commit: str | None = None) -> dict[str, str]:
    """The tags `mlflow.start_run` would set and `create_run` does not: who ran it, from
    which entry point, and (when known) at which commit."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry)
        user = "unknown"
    tags = {"mlflow.user": user,
            "mlflow.source.name": sys.argv[0] if sys.argv and sys.argv[0] else "<console>",
            "mlflow.source.type": "LOCAL"}
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def runs_view_link(tracking_uri: str, experiment: str) -> str | None:
    """The MLflow UI address of `experiment`'s runs table (a fresh browser otherwise lands
    on the GenAI overview); None when the experiment or the store is not there. A local
    store's link assumes `mlflow ui` on its default address."""
    path = _store_file(tracking_uri)
    if path is not None and not Path(path).exists():
        return None
    try:
        exp = MlflowClient(tracking_uri=tracking_uri).get_experiment_by_name(experiment)
    except Exception:  # an unreachable server: no link, the job's results stand
        return None
    if exp is None:
        return None
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) \
        else LOCAL_UI
    return f"{base}/{RUNS_VIEW.format(id=exp.experiment_id)}"


_SHORT_PREFIX = {"rho": "ρ"}
_TOKEN = re.compile(r"([A-Za-z]*)(\d+(?:\.\d+)?(?:e-?\d+)?)")


def _short_token(token: str) -> str:
    """rho0.85 -> ρ.85, lr0.002 -> lr2e-3: the same number in fewer characters."""
    match = _TOKEN.fullmatch(token)
    if not match:
        return token
    prefix, number = match[1], match[2]
    value = float(number)
    text = number
    if "." in number or "e" in number:
        plain = f"{value:g}"
        if 0 < abs(value) < 0.01:
            mantissa, exp = f"{value:.0e}".split("e")
            sci = f"{mantissa}e{int(exp)}"
            if float(sci) == value:
                plain = sci
        text = plain[1:] if plain.startswith("0.") else plain
    return f"{_SHORT_PREFIX.get(prefix, prefix)}{text}"


def short_names(ids: Iterable[str], parents: Mapping[str, str] | None = None,
                epochs: Mapping[str, Any] | None = None, limit: int = 40) -> dict[str, str]:
    """Run names that show what differs between checkpoints: the `-`-separated parts of the
    ids (of their training run's id, `parents`) that every one shares are dropped and the
    rest compacted (`digits-patch-rho0.85-lr0.002-e40-wd0.05-…` -> `patch ρ.85 lr2e-3 e40`);
    an intermediate checkpoint of a training run gets `@e<epoch>`. Falls back to the id when
    that would be empty, too long or ambiguous (the full id stays in the `checkpoint` tag)."""
    ids = [str(i) for i in ids]
    parents = dict(parents or {})
    epochs = dict(epochs or {})
    base = {}
    for cid in ids:
        parent = str(parents.get(cid) or cid)
        base[cid] = parent if parent != cid and cid.startswith(parent) else cid
    parts = {cid: re.split(r"[-_\s]+", b) for cid, b in base.items()}
    common = set.intersection(*(set(p) for p in parts.values())) if len(ids) > 1 else set()
    names = {}
    for cid in ids:
        text = " ".join(_short_token(t) for t in parts[cid] if t and t not in common)
        if base[cid] != cid:
            epoch = epochs.get(cid)
            try:
                tail = f"@e{int(float(epoch))}"
            except (TypeError, ValueError):
                tail = "@" + cid[len(base[cid]):].lstrip(".-_")
            text = f"{text}{tail}" if text else tail
        names[cid] = text if text and len(text) <= limit else cid
    seen: dict[str, int] = {}
    for name in names.values():
        seen[name] = seen.get(name, 0) + 1
    return {cid: (name if seen[name] == 1 else cid) for cid, name in names.items()}


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
                  tags: Mapping[str, str] | None = None, job_key: str | None = None,
                  start_ms: int | None = None, commit: str | None = None) -> str:
    """Create the job's parent run (RUNNING) with its params, after closing this job's stale
    runs. Call it when the stage starts, so that a job killed midway is visible as such;
    finish with `log_job(..., run_id=)` or `end_job_run`. `job_key` defaults to the
    `output_dir` tag (else the run name); `start_ms` is when the job's work began (default:
    now); `commit` becomes `mlflow.source.git.commit`."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = ensure_experiment(client, experiment, artifact_root)
    job = job_key or (tags or {}).get("output_dir") or run_name
    close_stale_runs(client, exp_id, job)
    run = client.create_run(exp_id, run_name=run_name, start_time=start_ms,
                            tags={**source_tags(commit), **dict(tags or {}),
                                  **_process_tags(job)})
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


def _dataset_input(frame: Any, source: str, name: str) -> Any:
    """The manifest as an MLflow dataset (name, digest, schema, source), shown in the run's
    Datasets column; columns of lists/dicts become text, which MLflow's schema accepts."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    frame = frame.copy()
    for col in frame.columns:
        if frame[col].dtype == object:
            frame[col] = frame[col].map(lambda v: None if v is None else str(v))
    with warnings.catch_warnings():  # hints about model schemas: not what a manifest is
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(frame, source=source, name=name)
        entity = dataset._to_mlflow_entity()
    return DatasetInput(entity, tags=[InputTag("mlflow.data.context", "manifest")])


def _replace_earlier_runs(client: MlflowClient, experiment_id: str, job: str,
                          keep: set[str]) -> list[str]:
    """Delete (soft: restorable with `mlflow runs restore`) the ended runs an earlier
    logging of `job` left, now that its new runs are complete; RUNNING ones belong to a
    live process or are closed by `close_stale_runs`. Returns the deleted ids."""
    gone = []
    runs = client.search_runs([experiment_id],
                              filter_string="attributes.status != 'RUNNING'",
                              max_results=10_000)
    for run in runs:
        tags = run.data.tags
        if run.info.run_id in keep or tags.get(JOB_TAG, tags.get("output_dir")) != job:
            continue
        client.delete_run(run.info.run_id)
        gone.append(run.info.run_id)
    return gone


def log_job(*, tracking_uri: str, experiment: str, artifact_root: str | os.PathLike,
            run_name: str, params: Mapping[str, Any], metrics: Mapping[str, float],
            artifacts: Iterable[tuple[str | os.PathLike, str]] = (),
            children: Iterable[ChildRun] = (), tags: Mapping[str, str] | None = None,
            job_key: str | None = None, run_id: str | None = None,
            tables: Mapping[str, Any] | None = None, texts: Mapping[str, str] | None = None,
            dataset: tuple[Any, str, str] | None = None, note: str | None = None,
            start_ms: int | None = None, commit: str | None = None,
            replace: bool = True) -> str:
    """Log a parent run (config params, headline metrics, artifacts) with child runs.

    `artifacts` are (local file or folder, artifact sub-path) pairs; `tables` are
    DataFrames logged with `log_table` (`tables/<name>.json`: the UI previews them, unlike
    Parquet), `texts` are (artifact file -> text), `dataset` is (manifest frame, its
    location, name) logged as the run's input dataset, `note` its description
    (`mlflow.note.content`). With `run_id` (from `start_job_run`) the parent already exists
    and `params` are added to it; otherwise it is created here (`start_ms`: when the job's
    work began), after this job's stale RUNNING runs are marked KILLED. Each child ends with
    its `status` at its `end_ms`; the parent ends FINISHED, FAILED on an error, KILLED on
    SIGTERM/Ctrl-C. Then, with `replace`, the runs an earlier logging of the same job left
    are deleted. Returns the parent run id.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    if run_id is None:
        pid = start_job_run(tracking_uri=tracking_uri, experiment=experiment,
                            artifact_root=artifact_root, run_name=run_name, params=params,
                            tags=tags, job_key=job_key, start_ms=start_ms, commit=commit)
        params = {}
    else:
        pid = run_id
    parent = client.get_run(pid)
    exp_id = parent.info.experiment_id
    job = parent.data.tags.get(JOB_TAG) or job_key or (tags or {}).get("output_dir") or run_name
    ts = int(time.time() * 1000)
    late = {**(dict(tags or {}) if run_id else {}), **({NOTE_TAG: note} if note else {})}
    source = source_tags(commit or parent.data.tags.get("mlflow.source.git.commit"))
    keep = {pid}
    try:
        _log_batched(client, pid, _params(params), _metrics(metrics, ts),
                     [RunTag(k, str(v)[:_MAX_TAG]) for k, v in late.items()])
        if dataset is not None:
            client.log_inputs(pid, datasets=[_dataset_input(*dataset)])
        for local, sub in artifacts:
            local = Path(local)
            if local.is_dir():
                client.log_artifacts(pid, str(local), sub or None)
            elif local.exists():
                client.log_artifact(pid, str(local), sub or None)
        for name, frame in (tables or {}).items():
            client.log_table(pid, frame, f"tables/{name}.json")
        for path, text in (texts or {}).items():
            client.log_text(pid, text, path)
        for child in children:
            run = client.create_run(exp_id, run_name=child.name, start_time=child.start_ms,
                                    tags={**source, "mlflow.parentRunId": pid, **child.tags,
                                          **_process_tags(job)})
            keep.add(run.info.run_id)
            try:
                _log_batched(client, run.info.run_id, _params(child.params),
                             _metrics(child.metrics, child.end_ms or ts), [])
            except BaseException as exc:
                _terminate_quietly(client, run.info.run_id, _end_status(exc))
                raise
            client.set_terminated(run.info.run_id, child.status, end_time=child.end_ms)
    except BaseException as exc:
        _terminate_quietly(client, pid, _end_status(exc))
        raise
    client.set_terminated(pid, "FINISHED")
    if replace:
        gone = _replace_earlier_runs(client, exp_id, job, keep)
        if gone:
            log.info(f"[tracking] replaced {len(gone)} run(s) of an earlier logging of this "
                     "job (deleted; `mlflow runs restore --run-id ID` brings one back)")
    return pid
