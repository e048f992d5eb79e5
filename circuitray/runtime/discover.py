"""Discover (the map stage): one Ray task per checkpoint, all of its domains, Parquet out.

The driver plans first (circuitray.runtime.plan): which domains of which checkpoints are
complete for the current config, and why the others must run. Each task then loads its model
once and, for every domain still to do (ID, OOD, post-deployment corruptions of the ID split,
alarm proxies), writes the circuit (edges) and the per-example outputs, each atomically and
stamped with the domain's fingerprint, then rewrites the checkpoint's marker (fingerprints,
row counts, sizes, checksums). A retried task resumes the domains its killed attempt wrote
for the same fingerprint, so a dead worker costs only the domain it was on. Errors of a checkpoint (bad weights,
unreadable data) are caught in the task and come back as a failure row: one bad checkpoint
never stops the job. Ray's `max_retries` covers what cannot be caught: a dead worker or node.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import socket
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from circuitray import storage
from circuitray.errors import DataError, OutputError
from circuitray.job_config import JobConfig
from circuitray.runtime.files import FINGERPRINT_KEY, FileRecord, remove_temporaries
from circuitray.runtime.layout import DOMAIN_SCHEMA, JobLayout
from circuitray.runtime.plan import (
    CheckpointPlan,
    DomainPlan,
    DomainSpec,
    data_root,
    domain_inputs,
    fingerprint,
    plan_checkpoint,
    plan_job,
    weights_hash,
    weights_stat,
)
from circuitray.storage import AnyPath
from circuitray.tables import (
    EDGE_SCHEMA,
    FAILURE_SCHEMA,
    OUTPUT_SCHEMA,
    write_parquet_atomic,
)

log = logging.getLogger(__name__)


@dataclass
class DiscoverSummary:
    """What a discover run did, for the log, the pipeline and the benchmark."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    computed: int = 0  # domains computed (not kept, not resumed)
    seconds: float = 0.0

    def __str__(self) -> str:
        return (f"discover: {len(self.done)} checkpoints run ({self.computed} domains "
                f"computed), {len(self.skipped)} already complete, {len(self.failed)} failed "
                f"in {self.seconds:.1f}s")


class _StageError(Exception):
    """Carries the stage a checkpoint failed in (load, data, outputs, attribute, write)."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(str(error))
        self.stage, self.error = stage, error


def _device(cfg: JobConfig) -> str:
    if cfg.attribution.device:
        return cfg.attribution.device
    import torch

    return "cuda" if cfg.resources.num_gpus > 0 and torch.cuda.is_available() else "cpu"


# Decoded images a domain keeps for its second and third reads (attribution after outputs):
# the attribution subset, 64 images by default (38 MiB at 224 px).
REMEMBER_BYTES = 512 * 2**20
# Decoded [0, 1] images a task keeps of a source that several of its domains read (the ID
# split: the ID domain, its corruptions, the alarm's proxies): data.limit images, 256 by
# default (154 MiB at 224 px); a larger limit decodes the overflow again.
SOURCE_BYTES = 512 * 2**20


class _Sources:
    """The base datasets of one task's domains, opened once per source folder; a source that
    more than one pending domain reads keeps its decoded images (`RememberedUnits`) until
    the last of them is done."""

    def __init__(self, root: str, transform: Any, classes: Any, readers: Iterable[str]):
        self.root, self.transform, self.classes = root, transform, classes
        self.pending: dict[str, int] = {}
        for source in readers:
            self.pending[source] = self.pending.get(source, 0) + 1
        self.open: dict[str, Any] = {}

    def get(self, source: str) -> Any:
        from circuitray.data.datasets import RememberedUnits, open_domain

        if source not in self.open:
            base = open_domain(self.root, source, transform=self.transform,
                               classes=self.classes)
            if self.pending.get(source, 0) > 1:
                base = RememberedUnits(base, SOURCE_BYTES)
            self.open[source] = base
        return self.open[source]

    def done(self, source: str) -> None:
        """One reader of `source` finished: the last one frees its images."""
        self.pending[source] = self.pending.get(source, 1) - 1
        if self.pending[source] <= 0:
            self.open.pop(source, None)


def _loaders(spec: DomainSpec, sources: _Sources, cfg: JobConfig) -> tuple[Any, Any, Any]:
    """(outputs loader, attribution loader, their shared dataset) over one domain.

    Both read one `RememberedItems` dataset that keeps the attribution subset once decoded
    (and corrupted): outputs run first and decode every image once; attribution reads its
    subset twice (mean pass, scoring) from memory. The attribution loader yields the same
    batches on both passes, so the mean pass's plain runs are reused by the scoring pass.
    The subsets are the seeded ones of `make_loader` (attribution's is a prefix of the
    outputs' permutation); the outputs order is unchanged. A shifted domain corrupts the
    images its source already decoded for an earlier domain of the task (`_Sources`).
    """
    from circuitray.data.datasets import RememberedItems, make_loader, subset_indices

    d = cfg.data
    base = sources.get(spec.source)
    data = base
    if spec.kind is not None:
        from circuitray.data.shifts import ShiftedDataset

        data = ShiftedDataset(base, spec.kind, spec.severity, seed=d.seed, name=spec.name)
    n_out = d.limit
    n_att = d.attribution_limit if d.attribution_limit is not None else n_out
    if n_out is not None and n_att is not None:
        n_att = min(n_att, n_out)
    keep = subset_indices(len(data), n_att, n_att is not None, d.seed)
    data = RememberedItems(data, keep, REMEMBER_BYTES)
    out = make_loader(data, d.batch_size, limit=n_out, shuffle=n_out is not None, seed=d.seed)
    att = make_loader(data, d.batch_size, limit=n_att, shuffle=n_att is not None, seed=d.seed,
                      fixed_order=True)
    return out, att, data


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


def _stamp(path: AnyPath) -> bytes | None:
    """The fingerprint in a domain file's footer (None when absent or unreadable)."""
    with storage.open_input(path) as fh:
        return (pq.read_schema(fh).metadata or {}).get(FINGERPRINT_KEY)


def _resumable(paths: Iterable[AnyPath], fp: str) -> bool:
    """Both files exist and carry `fp`: written whole (renamed locally, one PUT on an object
    store) by an attempt of this checkpoint that was killed before its marker. Anything
    else under those names (another setting's file, garbage) is overwritten, never read."""
    try:
        return all(_stamp(p) == fp.encode() for p in paths)
    except (OSError, pa.ArrowInvalid):
        return False


def _run_domain(model: Any, dom: DomainPlan, row: Mapping[str, Any], sources: _Sources,
                cfg: JobConfig, layout: JobLayout, device: str) -> dict[str, Any]:
    """Write one domain's edges and outputs (atomically, stamped with its fingerprint) and
    return its marker row."""
    from circuitray.attribution import attribute
    from circuitray.outputs import model_outputs

    spec, fp = dom.spec, str(dom.fingerprint)
    task, cid = str(row["task"]), str(row["checkpoint_id"])
    e_path = layout.edges_file(task, cid, spec.name)
    o_path = layout.outputs_file(task, cid, spec.name)
    info = {"task": task, "checkpoint": cid, "domain": spec.name, "role": spec.role,
            "source": spec.source, "kind": spec.kind, "severity": spec.severity,
            "fingerprint": fp, "inputs": json.dumps(dom.inputs, sort_keys=True, default=str)}
    start = time.perf_counter()
    resumed = _resumable((e_path, o_path), fp)
    reused = None  # unknown for a domain resumed from a killed attempt
    if not resumed:
        try:
            out_loader, att_loader, data = _loaders(spec, sources, cfg)
        except Exception as exc:
            raise _StageError("data", exc) from exc
        try:
            outputs = model_outputs(model, out_loader, task=task, checkpoint=cid,
                                    domain=spec.name, device=device)
        except Exception as exc:
            raise _StageError("outputs", exc) from exc
        a = cfg.attribution
        try:
            scores = attribute(model, att_loader, method=a.method, ablation=a.ablation,
                               metric=a.metric, steps=a.steps, device=device, dtype=a.dtype)
            edges = scores.to_table(task, cid, spec.name)
        except Exception as exc:
            raise _StageError("attribute", exc) from exc
        finally:
            data.forget()
        reused = scores.plain_runs_reused
        stamp = {FINGERPRINT_KEY: fp.encode()}
        try:
            _retry_io(lambda: write_parquet_atomic(edges, e_path,
                                                   EDGE_SCHEMA.with_metadata(stamp)))
            _retry_io(lambda: write_parquet_atomic(outputs, o_path,
                                                   OUTPUT_SCHEMA.with_metadata(stamp)))
        except Exception as exc:
            raise _StageError("write", exc) from exc
    files = {}
    for which, path in (("edges", e_path), ("outputs", o_path)):
        rec = FileRecord.of(path)
        files.update({f"{which}_rows": rec.rows, f"{which}_size": rec.size,
                      f"{which}_mtime_ns": rec.mtime_ns, f"{which}_checksum": rec.checksum})
    with storage.open_input(e_path) as fh:
        n_att = pq.read_table(fh, columns=["n_examples"]).column(0)[0].as_py()
    return {**info, **files, "n_examples": files["outputs_rows"], "n_attributed": n_att,
            "seconds": time.perf_counter() - start, "resumed": resumed,
            "plain_runs_reused": reused}


def _sweep_temporaries(layout: JobLayout, task: str, cid: str) -> None:
    """Remove half-written files of an earlier attempt of this checkpoint (killed mid-write).

    Safe because Ray runs one attempt of a task at a time; readers ignore them anyway.
    """
    remove_temporaries([layout.edges_file(task, cid, "x").parent,
                        layout.outputs_file(task, cid, "x").parent])


def _weights_identity(plan: CheckpointPlan) -> dict[str, Any]:
    """The marker's weights columns; hashes the file when planning did not (a new checkpoint)."""
    weights = str(plan.row["weights"])
    stat = weights_stat(weights)
    return {"weights_hash": plan.weights_hash or weights_hash(weights),
            "weights_size": stat[0] if stat else None,
            "weights_mtime_ns": stat[1] if stat else None}


def discover_checkpoint(row: Mapping[str, Any], cfg: JobConfig,
                        plan: CheckpointPlan | None = None, *,
                        log_level: int | None = None) -> dict[str, Any]:
    """Every planned domain of one checkpoint; runs inside a Ray task (or inline in tests).

    Domains the plan found complete are kept as they are, domains a killed attempt already
    wrote for the same fingerprint are resumed, the rest are computed; then the marker is
    rewritten with one row per planned domain. Returns {"checkpoint", "status": "done" |
    "skipped" | "failed", "seconds", "computed", and for a failure "stage", "error_type",
    "error"}; never raises for a checkpoint's own errors. `log_level`: the driver's, set in
    this worker process (per-domain lines are DEBUG).
    """
    import torch

    from circuitray.log import setup_worker

    setup_worker(log_level)

    torch.set_num_threads(cfg.resources.torch_threads)
    layout = JobLayout.of(cfg.output_dir)
    cid = str(row["checkpoint_id"])
    start = time.perf_counter()
    if plan is None:
        plan = plan_checkpoint(row, cfg, layout)
    if plan.complete:
        return {"checkpoint": cid, "status": "skipped", "seconds": 0.0, "computed": 0}
    running = layout.running_file(cid)
    try:
        try:
            _sweep_temporaries(layout, str(row["task"]), cid)
            storage.write_text(running, json.dumps({"host": socket.gethostname(),
                                                    "pid": os.getpid(), "started": time.time()}))
        except OSError as exc:  # a full or read-only disk: a failure row naming the path
            raise _StageError("write", OutputError.from_os_error(running, exc)) from exc
        if plan.error is not None:  # found while planning: no model is loaded for it
            raise _StageError("data", DataError(str(plan.error_path), plan.error))
        try:
            from circuitray.models import load_checkpoint

            device = _device(cfg)
            model = load_checkpoint(row).to(device)
            identity = _weights_identity(plan)
        except Exception as exc:
            raise _StageError("load", exc) from exc
        try:
            from circuitray.data.classes import resolve_class_map, store_class_map
            from circuitray.data.preprocess import provenance, resolve_preprocessing

            specs = [d.spec for d in plan.domains]
            root = data_root(row, cfg)
            classes = resolve_class_map(row, cfg.data, root, specs[0].source,
                                        [s.source for s in specs])
            store_class_map(layout.class_map_file(str(row["task"])), str(row["task"]), classes)
            transform, norm_source = resolve_preprocessing(row, model, cfg.data,
                                                           str(row["weights"]))
            recorded = provenance(transform, norm_source, classes.source)
        except Exception as exc:
            raise _StageError("data", exc) from exc
        rows, computed = [], 0
        todo = [not (d.complete and d.record is not None) for d in plan.domains]
        sources = _Sources(root, transform, classes,
                           [d.spec.source for d in itertools.compress(plan.domains, todo)])
        for dom, run in zip(plan.domains, todo, strict=True):
            if not run:
                rows.append({**dom.record, "resumed": False, "seconds": 0.0})
                continue
            if dom.fingerprint is None or plan.weights_hash != identity["weights_hash"]:
                dom.inputs = domain_inputs(row, dom.spec, cfg, weights=identity["weights_hash"],
                                           listings=plan.listings)
                dom.fingerprint = fingerprint(dom.inputs)
            try:
                rows.append({**_run_domain(model, dom, row, sources, cfg, layout, device),
                             **identity, **recorded})
            finally:
                sources.done(dom.spec.source)
            computed += not rows[-1]["resumed"]
            log.debug(f"[discover {cid}] {dom.spec.name}: {rows[-1]['n_examples']} examples, "
                      f"{rows[-1]['seconds']:.1f}s{' (resumed)' if rows[-1]['resumed'] else ''}")
        try:
            write_parquet_atomic(pa.Table.from_pylist(rows, schema=DOMAIN_SCHEMA),
                                 layout.marker(cid))
        except Exception as exc:
            raise _StageError("write", exc) from exc
        return {"checkpoint": cid, "status": "done", "seconds": time.perf_counter() - start,
                "computed": computed}
    except Exception as exc:  # one bad checkpoint never stops the job
        stage, err = (exc.stage, exc.error) if isinstance(exc, _StageError) else ("internal", exc)
        return {"checkpoint": cid, "status": "failed", "stage": stage,
                "error_type": type(err).__name__,
                "error": f"{err}\n{''.join(traceback.format_exception(err)[-3:])}".strip(),
                "seconds": time.perf_counter() - start, "computed": 0}
    finally:
        with contextlib.suppress(OSError):  # nothing to remove where it could not be written
            storage.delete(running)


def record_result(layout: JobLayout, result: Mapping[str, Any]) -> None:
    """Failures go to failures/<checkpoint>.parquet; a later success removes that file."""
    path = layout.failure_file(result["checkpoint"])
    if result["status"] == "failed":
        write_parquet_atomic(pa.Table.from_pylist(
            [{k: result[k] for k in FAILURE_SCHEMA.names}], schema=FAILURE_SCHEMA), path)
    else:
        storage.delete(path)


def _stop_if_unwritable(refs: list[Any], result: Mapping[str, Any], layout: JobLayout) -> None:
    """A checkpoint that could not write its tables (disk full, read-only) is not a bad
    checkpoint, and every other one would fail the same way after loading its model: cancel
    the rest and stop the job naming the path. Complete checkpoints keep their markers, so a
    re-run after freeing space resumes."""
    import ray

    if result["status"] != "failed" or result.get("error_type") != "OutputError":
        return
    # cancel only what has not finished: in Ray 2.60 cancelling a task whose reply is in
    # flight or in hand can trip a check in the driver's task manager that aborts the whole
    # process ("Tried to complete task that was not pending", exit 1, seen in the suite)
    _, running = ray.wait(refs, num_returns=len(refs), timeout=0)
    for ref in running:  # running ones are interrupted, queued ones never start
        ray.cancel(ref)
    ray.wait(running, num_returns=len(running), timeout=60)  # every answer in before we go
    first = str(result["error"]).splitlines()[0]
    raise OutputError(layout.root, f"checkpoint '{result['checkpoint']}' could not write its "
                                   f"tables ({first}); the job stopped there: fix that and "
                                   "run again, complete checkpoints are kept")


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
    log.warning(f"[discover] WARNING {msg}; tasks wait until GPU nodes join")


def run_discover(cfg: JobConfig, rows: Iterable[Mapping[str, Any]] | None = None
                 ) -> DiscoverSummary:
    """Plan, print what will be recomputed and why, then one Ray task per checkpoint to run."""
    import ray

    from circuitray.log import current_level
    from circuitray.runtime.ray_utils import ensure_ray, iter_completed

    start = time.perf_counter()
    layout = JobLayout.of(cfg.output_dir)
    plan = plan_job(cfg, rows)
    for line in plan.summary():
        log.info(f"[plan] {line}")
    summary = DiscoverSummary()
    todo = []
    for cp in plan.checkpoints:
        if cp.complete:
            summary.skipped.append(cp.checkpoint)
            storage.delete(layout.failure_file(cp.checkpoint))
        else:
            todo.append(cp)
    if todo:
        r = cfg.resources
        ensure_ray(r.address, r.local_num_cpus)
        _check_gpus(r.num_gpus, local=r.address in (None, "local")
                    and not os.environ.get("RAY_ADDRESS"))
        task = ray.remote(num_cpus=r.num_cpus, num_gpus=r.num_gpus,
                          max_retries=r.max_retries)(discover_checkpoint)
        cfg_ref = ray.put(cfg)
        level = current_level()
        refs = [task.remote(cp.row, cfg_ref, cp, log_level=level) for cp in todo]
        for _, result in iter_completed(refs, "discover", unit="checkpoints",
                                        failed=lambda res: res["status"] == "failed"):
            _stop_if_unwritable(refs, result, layout)
            record_result(layout, result)
            {"done": summary.done, "skipped": summary.skipped,
             "failed": summary.failed}[result["status"]].append(result["checkpoint"])
            summary.computed += result.get("computed", 0)
            if result["status"] == "failed":
                log.warning(f"[discover] FAILED {result['checkpoint']} at {result['stage']}: "
                            f"{result['error'].splitlines()[0]}")
    summary.seconds = time.perf_counter() - start
    log.info(str(summary))
    return summary
