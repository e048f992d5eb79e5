"""MLflow logging of a finished job: one parent run, one child run per checkpoint.

Everything is logged at the end of the reduce stage through `MlflowClient` with batched calls
(`log_batch`), so hundreds of checkpoints cost a few round trips, and no global MLflow state
(active run, environment URI) leaks between jobs. URIs and artifact locations are absolute:
under `ray job submit` the driver's working directory is a throwaway copy of the repository.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

_MAX_PARAMS = 100  # MLflow's per-batch limits
_MAX_METRICS = 1000
_MAX_VALUE = 6000
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


@dataclass
class ChildRun:
    """What one checkpoint contributes: its manifest hyperparameters and its metrics."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)


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


def log_job(*, tracking_uri: str, experiment: str, artifact_root: str | os.PathLike,
            run_name: str, params: Mapping[str, Any], metrics: Mapping[str, float],
            artifacts: Iterable[tuple[str | os.PathLike, str]] = (),
            children: Iterable[ChildRun] = (), tags: Mapping[str, str] | None = None) -> str:
    """Log a parent run (config params, headline metrics, artifacts) with child runs.

    `artifacts` are (local file or folder, artifact sub-path) pairs. Returns the parent run id.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = ensure_experiment(client, experiment, artifact_root)
    ts = int(time.time() * 1000)
    parent = client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
    pid = parent.info.run_id
    try:
        _log_batched(client, pid, _params(params), _metrics(metrics, ts), [])
        for local, sub in artifacts:
            local = Path(local)
            if local.is_dir():
                client.log_artifacts(pid, str(local), sub or None)
            elif local.exists():
                client.log_artifact(pid, str(local), sub or None)
        for child in children:
            run = client.create_run(exp_id, run_name=child.name,
                                    tags={"mlflow.parentRunId": pid, **child.tags})
            _log_batched(client, run.info.run_id, _params(child.params),
                         _metrics(child.metrics, ts), [])
            client.set_terminated(run.info.run_id, "FINISHED")
    except BaseException:
        client.set_terminated(pid, "FAILED")
        raise
    client.set_terminated(pid, "FINISHED")
    return pid
