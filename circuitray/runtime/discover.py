"""Discover (the map stage): one Ray task per checkpoint, all of its domains, Parquet out.

Each task loads its model once, then for every domain (ID, OOD, post-deployment corruptions
of the ID split, alarm proxies) writes the circuit (edges) and the per-example outputs, each
atomically, then a completion marker. A re-run skips checkpoints with a marker and, inside a
retried checkpoint, domains whose two files exist, so a worker killed mid-run costs only the
domain it was on and no file is ever written twice. Errors of a checkpoint (bad weights,
unreadable data) are caught in the task and come back as a failure row: one bad checkpoint
never stops the job. Ray's `max_retries` covers what cannot be caught: a dead worker or node.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from circuitray.job_config import JobConfig
from circuitray.runtime.layout import DOMAIN_SCHEMA, JobLayout
from circuitray.tables import (
    EDGE_SCHEMA,
    FAILURE_SCHEMA,
    OUTPUT_SCHEMA,
    read_parquet_or_empty,
    write_parquet_atomic,
)


@dataclass(frozen=True)
class DomainSpec:
    """One domain a checkpoint is run on, and where its images come from."""

    name: str
    role: str  # id | ood | shift | proxy
    source: str
    kind: str | None = None
    severity: int | None = None


@dataclass
class DiscoverSummary:
    """What a discover run did, for the log, the pipeline and the benchmark."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        return (f"discover: {len(self.done)} computed, {len(self.skipped)} already complete, "
                f"{len(self.failed)} failed in {self.seconds:.1f}s")


class _StageError(Exception):
    """Carries the stage a checkpoint failed in (load, data, outputs, attribute, write)."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(str(error))
        self.stage, self.error = stage, error


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value.item() if hasattr(value, "item") else value


def manifest_rows(cfg: JobConfig) -> list[dict[str, Any]]:
    """The manifest's checkpoints this job covers, as plain dicts (NaN -> None)."""
    from circuitray.models import read_manifest

    df = read_manifest(cfg.manifest)
    if cfg.checkpoints is not None:
        unknown = sorted(set(cfg.checkpoints) - set(df["checkpoint_id"]))
        if unknown:
            from circuitray.errors import ConfigError

            raise ConfigError(f"config key 'checkpoints': {unknown} not in {cfg.manifest}")
        df = df[df["checkpoint_id"].isin(cfg.checkpoints)]
    rows = [{k: _clean(v) for k, v in r.items()} for r in df.to_dict(orient="records")]
    if not cfg.intermediate:
        rows = [r for r in rows if is_final(r)]
    return rows


def is_final(row: Mapping[str, Any]) -> bool:
    """Rows without a `final` column are final; intermediate ones say final = false."""
    value = row.get("final")
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no")
    return bool(value)


def domain_specs(row: Mapping[str, Any], cfg: JobConfig) -> list[DomainSpec]:
    """ID first (the reference circuit for CSS), then OOD, shifts and proxies (final only)."""
    from circuitray.errors import DataError

    d = cfg.data
    id_domain = d.id_domain or row.get("id_domain")
    if not id_domain:
        raise DataError(cfg.manifest, f"checkpoint '{row['checkpoint_id']}' has no id_domain "
                                      "(manifest column or data.id_domain)")
    specs = [DomainSpec(str(id_domain), "id", str(id_domain))]
    oods = list(d.ood_domains) or ([row["ood_domain"]] if row.get("ood_domain") else [])
    specs += [DomainSpec(str(o), "ood", str(o)) for o in oods]
    if not is_final(row):
        return specs
    for role, kinds, sevs in (("shift", d.shift_kinds, d.shift_severities),
                              ("proxy", d.proxy_kinds, d.proxy_severities)):
        specs += [DomainSpec(f"{role}:{k}:{s}", role, str(id_domain), k, s)
                  for k in kinds for s in sevs]
    return specs


def _data_root(row: Mapping[str, Any], cfg: JobConfig) -> str:
    from circuitray.errors import DataError

    root = row.get("data_root") or cfg.data.root
    if not root:
        raise DataError(cfg.manifest, f"checkpoint '{row['checkpoint_id']}' has no data_root "
                                      "(manifest column or data.root)")
    return str(root)


def _device(cfg: JobConfig) -> str:
    if cfg.attribution.device:
        return cfg.attribution.device
    import torch

    return "cuda" if cfg.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu"


def _loaders(spec: DomainSpec, root: str, transform: Any, cfg: JobConfig,
             classes: Any) -> tuple[Any, Any]:
    """(outputs loader, attribution loader) over the same seeded subset of the domain."""
    from circuitray.data.datasets import DomainFolderDataset, make_loader

    d = cfg.data
    base = DomainFolderDataset(root, spec.source, transform=transform, classes=classes)
    data = base
    if spec.kind is not None:
        from circuitray.data.shifts import ShiftedDataset

        data = ShiftedDataset(base, spec.kind, spec.severity, seed=d.seed)
    n_out = d.limit
    n_att = d.attribution_limit if d.attribution_limit is not None else n_out
    if n_out is not None and n_att is not None:
        n_att = min(n_att, n_out)
    out = make_loader(data, d.batch_size, limit=n_out, shuffle=n_out is not None, seed=d.seed)
    att = make_loader(data, d.batch_size, limit=n_att, shuffle=n_att is not None, seed=d.seed)
    return out, att


def _retry_io(fn: Any, attempts: int = 3, wait_s: float = 0.5) -> Any:
    """Retry an OSError (a shared filesystem's hiccup) with backoff; the last one propagates.

    Ray's `max_retries` covers dead workers and nodes; errors inside the task are ours.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(wait_s * 2**attempt)
    return None


def _run_domain(model: Any, spec: DomainSpec, row: Mapping[str, Any], root: str, transform: Any,
                cfg: JobConfig, layout: JobLayout, device: str, classes: Any) -> dict[str, Any]:
    """Write one domain's edges and outputs (atomically); return its DOMAIN_SCHEMA row."""
    import circuitray
    from circuitray.outputs import model_outputs

    task, cid = str(row["task"]), str(row["checkpoint_id"])
    e_path = layout.edges_file(task, cid, spec.name)
    o_path = layout.outputs_file(task, cid, spec.name)
    info = {"task": task, "checkpoint": cid, "domain": spec.name, "role": spec.role,
            "source": spec.source, "kind": spec.kind, "severity": spec.severity}
    if e_path.exists() and o_path.exists():  # written by an attempt that was killed later
        n_out = pq.read_metadata(o_path).num_rows
        n_att = pq.read_table(e_path, columns=["n_examples"]).column(0)[0].as_py()
        return {**info, "n_examples": n_out, "n_attributed": n_att, "seconds": 0.0,
                "resumed": True}
    start = time.perf_counter()
    try:
        out_loader, att_loader = _loaders(spec, root, transform, cfg, classes)
    except Exception as exc:
        raise _StageError("data", exc) from exc
    try:
        outputs = model_outputs(model, out_loader, task=task, checkpoint=cid,
                                domain=spec.name, device=device)
    except Exception as exc:
        raise _StageError("outputs", exc) from exc
    a = cfg.attribution
    try:
        scores = circuitray.attribute(model, att_loader, method=a.method, ablation=a.ablation,
                                      metric=a.metric, steps=a.steps, device=device,
                                      dtype=a.dtype)
        edges = scores.to_table(task, cid, spec.name)
    except Exception as exc:
        raise _StageError("attribute", exc) from exc
    try:
        _retry_io(lambda: write_parquet_atomic(edges, e_path, EDGE_SCHEMA))
        _retry_io(lambda: write_parquet_atomic(outputs, o_path, OUTPUT_SCHEMA))
    except Exception as exc:
        raise _StageError("write", exc) from exc
    return {**info, "n_examples": outputs.num_rows, "n_attributed": int(scores.n_examples),
            "seconds": time.perf_counter() - start, "resumed": False}


def _sweep_temporaries(layout: JobLayout, task: str, cid: str) -> None:
    """Remove half-written files of an earlier attempt of this checkpoint (killed mid-write).

    Safe because Ray runs one attempt of a task at a time; readers ignore them anyway.
    """
    for folder in (layout.edges_file(task, cid, "x").parent,
                   layout.outputs_file(task, cid, "x").parent):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def discover_checkpoint(row: Mapping[str, Any], cfg: JobConfig) -> dict[str, Any]:
    """Everything for one checkpoint; runs inside a Ray task (or inline in tests).

    Returns {"checkpoint", "status": "done" | "skipped" | "failed", "seconds", and for a
    failure "stage", "error_type", "error"}; never raises for a checkpoint's own errors.
    """
    import torch

    torch.set_num_threads(cfg.resources.torch_threads)
    layout = JobLayout.of(cfg.output_dir)
    cid = str(row["checkpoint_id"])
    start = time.perf_counter()
    if layout.is_complete(cid):
        return {"checkpoint": cid, "status": "skipped", "seconds": 0.0}
    _sweep_temporaries(layout, str(row["task"]), cid)
    running = layout.running_file(cid)
    running.parent.mkdir(parents=True, exist_ok=True)
    running.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                   "started": time.time()}))
    try:
        try:
            from circuitray.models import load_checkpoint

            device = _device(cfg)
            model = load_checkpoint(row).to(device)
        except Exception as exc:
            raise _StageError("load", exc) from exc
        try:
            from circuitray.data.classes import resolve_class_map, store_class_map
            from circuitray.data.preprocess import provenance, resolve_preprocessing

            specs = domain_specs(row, cfg)
            root = _data_root(row, cfg)
            classes = resolve_class_map(row, cfg.data, root, specs[0].source,
                                        [s.source for s in specs])
            store_class_map(layout.class_map_file(str(row["task"])), str(row["task"]), classes)
            transform, norm_source = resolve_preprocessing(row, model, cfg.data,
                                                           str(row["weights"]))
            recorded = provenance(transform, norm_source, classes.source)
        except Exception as exc:
            raise _StageError("data", exc) from exc
        rows = []
        for spec in specs:
            rows.append({**_run_domain(model, spec, row, root, transform, cfg, layout, device,
                                       classes), **recorded})
            print(f"[discover {cid}] {spec.name}: {rows[-1]['n_examples']} examples, "
                  f"{rows[-1]['seconds']:.1f}s{' (resumed)' if rows[-1]['resumed'] else ''}",
                  file=sys.stderr, flush=True)
        try:
            write_parquet_atomic(pa.Table.from_pylist(rows, schema=DOMAIN_SCHEMA),
                                 layout.marker(cid))
        except Exception as exc:
            raise _StageError("write", exc) from exc
        return {"checkpoint": cid, "status": "done", "seconds": time.perf_counter() - start}
    except Exception as exc:  # one bad checkpoint never stops the job
        stage, err = (exc.stage, exc.error) if isinstance(exc, _StageError) else ("internal", exc)
        return {"checkpoint": cid, "status": "failed", "stage": stage,
                "error_type": type(err).__name__,
                "error": f"{err}\n{''.join(traceback.format_exception(err)[-3:])}".strip(),
                "seconds": time.perf_counter() - start}
    finally:
        running.unlink(missing_ok=True)


def record_result(layout: JobLayout, result: Mapping[str, Any]) -> None:
    """Failures go to failures/<checkpoint>.parquet; a later success removes that file."""
    path = layout.failure_file(result["checkpoint"])
    if result["status"] == "failed":
        write_parquet_atomic(pa.Table.from_pylist(
            [{k: result[k] for k in FAILURE_SCHEMA.names}], schema=FAILURE_SCHEMA), path)
    else:
        path.unlink(missing_ok=True)


def _check_gpus(num_gpus: float, local: bool) -> None:
    """A GPU share on a Ray without GPUs would wait forever: fail (local) or warn (cluster,
    where an autoscaler may still add GPU nodes)."""
    import ray

    if num_gpus <= 0:
        return
    have = ray.cluster_resources().get("GPU", 0)
    if have >= num_gpus:
        return
    msg = (f"config key 'resources.num_gpus': {num_gpus} GPU per task requested, the Ray "
           f"cluster has {have:g}")
    if local:
        from circuitray.errors import ConfigError

        raise ConfigError(msg + "; use resources.num_gpus=0 on a machine without a GPU")
    print(f"[discover] WARNING {msg}; tasks wait until GPU nodes join", file=sys.stderr,
          flush=True)


def run_discover(cfg: JobConfig, rows: Iterable[Mapping[str, Any]] | None = None
                 ) -> DiscoverSummary:
    """Submit one Ray task per incomplete checkpoint and wait, with counts and ETA."""
    import ray

    from circuitray.runtime.ray_utils import ensure_ray, iter_completed

    start = time.perf_counter()
    layout = JobLayout.of(cfg.output_dir)
    rows = list(manifest_rows(cfg) if rows is None else rows)
    summary = DiscoverSummary()
    todo = []
    for row in rows:
        cid = str(row["checkpoint_id"])
        if layout.is_complete(cid):
            summary.skipped.append(cid)
        else:
            todo.append(row)
    print(f"[discover] {len(rows)} checkpoints: {len(summary.skipped)} already complete, "
          f"{len(todo)} to run", file=sys.stderr, flush=True)
    if todo:
        r = cfg.resources
        ensure_ray(r.address, r.local_num_cpus)
        _check_gpus(r.num_gpus, local=r.address in (None, "local")
                    and not os.environ.get("RAY_ADDRESS"))
        task = ray.remote(num_cpus=r.num_cpus, num_gpus=r.num_gpus,
                          max_retries=r.max_retries)(discover_checkpoint)
        cfg_ref = ray.put(cfg)
        refs = [task.remote(row, cfg_ref) for row in todo]
        for _, result in iter_completed(refs, "discover"):
            record_result(layout, result)
            {"done": summary.done, "skipped": summary.skipped,
             "failed": summary.failed}[result["status"]].append(result["checkpoint"])
            if result["status"] == "failed":
                print(f"[discover] FAILED {result['checkpoint']} at {result['stage']}: "
                      f"{result['error'].splitlines()[0]}", file=sys.stderr, flush=True)
    summary.seconds = time.perf_counter() - start
    print(str(summary), file=sys.stderr, flush=True)
    return summary


def read_domains(layout: JobLayout) -> pd.DataFrame:
    """All completion markers as one DOMAIN_SCHEMA frame (empty if none)."""
    return read_parquet_or_empty(layout.checkpoints, DOMAIN_SCHEMA).to_pandas()


def read_failures(layout: JobLayout) -> pd.DataFrame:
    """The failures table (empty with FAILURE_SCHEMA columns if none)."""
    return read_parquet_or_empty(layout.failures, FAILURE_SCHEMA).to_pandas()
