"""Reduce: the discover tables in, metrics/ + evaluation/ tables, figures and MLflow runs out.

Circuit metrics and baselines are computed one checkpoint at a time (its edges and outputs
files only), so memory stays bounded by one checkpoint however large the zoo; the
evaluation then works on small per-checkpoint / per-domain frames. The stage is skipped
when neither its inputs (the completion markers) nor its config changed since its last run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from circuitray import registry, storage
from circuitray.config import to_dict
from circuitray.errors import (
    CircuitrayError,
    ConfigError,
    MetricError,
    OutputError,
    StaleResultError,
    os_error_is_permanent,
)
from circuitray.evaluation import NEAR_CHANCE
from circuitray.isolation import RECOVERABLE, MetricFailure, attempt, reasons
from circuitray.job_config import JobConfig, ReduceConfig, check_tracking_target
from circuitray.registry import (
    PLUGINS,
    SOURCES,
    MetricSpec,
    families,
    family_columns,
    lambda_columns,
    lambda_size,
    metric_columns,
)
from circuitray.report import format_report
from circuitray.runtime.files import remove_temporaries, write_text_atomic
from circuitray.runtime.layout import JobLayout, safe_name
from circuitray.runtime.plan import (
    JobPlan,
    domains_frame,
    is_final,
    manifest_rows,
    plan_job,
    read_failures,
)
from circuitray.tables import FAILURE_SCHEMA, write_parquet_atomic

log = logging.getLogger(__name__)

KEYS = ["task", "checkpoint", "domain"]
REPORT_NAME = "report.txt"  # under evaluation/: the printed report of the last reduce
_MANIFEST_SKIP = {"weights", "arch_kwargs", "data_root"}


@dataclass
class ReduceResult:
    """Paths and frames of one reduce run (frames are None when the stage was up to date)."""

    skipped: bool
    tables: dict[str, Path] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    run_id: str | None = None
    seconds: float = 0.0


def fingerprint(plan: JobPlan, cfg: JobConfig, failed: set[str]) -> str:
    """Hash of every input reduce reads: each planned domain's fingerprint and file checksums,
    which checkpoints failed, the manifest (its annotations become columns), the reduce
    and tracking settings, and the registered plug-in metrics. Equal hashes mean equal
    tables."""
    import circuitray
    from circuitray.runtime.files import checksum_file

    h = hashlib.sha256()
    for cp in plan.checkpoints:
        h.update(f"{cp.checkpoint}:{cp.checkpoint in failed};".encode())
        for d in cp.domains:
            rec = d.record or {}
            h.update(f"{d.spec.name}:{d.fingerprint}:{rec.get('edges_checksum')}:"
                     f"{rec.get('outputs_checksum')};".encode())
    h.update(json.dumps({"reduce": to_dict(cfg.reduce), "tracking": to_dict(cfg.tracking),
                         "manifest": [cfg.manifest, checksum_file(cfg.manifest)],
                         "plugins": [registry.describe(p) for p in registry.plugins()],
                         "circuitray": circuitray.__version__}, sort_keys=True).encode())
    return h.hexdigest()


_SORT_KEYS = ("task", "checkpoint", "domain", "method")


@dataclass(frozen=True)
class CheckpointFiles:
    """The files reduce reads for ONE checkpoint: per domain (ID first), its edges and its
    outputs table. The only input of `checkpoint_metrics`, so where the paths come from (and
    how they are verified) can change without touching any metric."""

    task: str
    checkpoint: str
    id_domain: str
    edges: Mapping[str, str]
    outputs: Mapping[str, str]
    checksums: Mapping[str, str] = field(default_factory=dict)  # path -> marker's checksum


def checkpoint_files(layout: JobLayout, marker: pd.DataFrame) -> CheckpointFiles:
    """The files of the checkpoint whose completion-marker rows (one per domain) are given."""
    task, cid = str(marker["task"].iloc[0]), str(marker["checkpoint"].iloc[0])
    ids = marker.loc[marker.role == "id", "domain"]
    doms = [str(d) for d in marker["domain"]]
    edges = {d: str(layout.edges_file(task, cid, d)) for d in doms}
    outputs = {d: str(layout.outputs_file(task, cid, d)) for d in doms}
    checksums = {}
    for kind, paths in (("edges", edges), ("outputs", outputs)):
        column = f"{kind}_checksum"
        if column in marker:
            checksums |= {paths[str(d)]: str(c) for d, c in zip(marker["domain"], marker[column],
                                                                strict=True)}
    return CheckpointFiles(task=task, checkpoint=cid,
                           id_domain=str(ids.iloc[0]) if len(ids) else "",
                           edges=edges, outputs=outputs, checksums=checksums)


_READ_THREADS = 8  # reads of one checkpoint's files in flight at once (I/O, not compute)


def _read_all(paths: Mapping[str, str], checksums: Mapping[str, str]
              ) -> dict[str, Callable[[], pa.Table]]:
    """Every domain's file of one source read at once in a thread pool (the reads are I/O
    bound: an object store's latency, or a disk; bench/reads.py: 2.3x faster than one by
    one on 2,400 files, and faster than a pyarrow.dataset scan, which cannot check that the
    bytes it parses are the marker's). Per domain, a call that returns the table or raises
    the read's error, so failures are recorded in domain order, as before."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(_READ_THREADS, max(1, len(paths)))) as pool:
        futures = {dom: pool.submit(_read_table, path, checksums[path])
                   for dom, path in paths.items()}
    return {dom: future.result for dom, future in futures.items()}


def _read_table(path: str, checksum: str) -> pa.Table:
    """One input file (the single place reduce reads discover's tables), parsed from bytes
    whose checksum matches its marker; a damaged or missing file raises StaleResultError,
    which stops reduce (it names the file and says to run discover) instead of becoming NaN."""
    from circuitray.runtime.files import read_verified

    return read_verified(path, checksum)


def _keys_row(files: CheckpointFiles, domain: str, reason: str, columns: Sequence[str] = ()
              ) -> dict[str, Any]:
    return {"task": files.task, "checkpoint": files.checkpoint, "domain": domain,
            **dict.fromkeys(columns, np.nan), "reason": reason}


def _with_rows_for(frame: pd.DataFrame | None, files: CheckpointFiles, domains: Sequence[str],
                   why: Mapping[str, str], columns: Sequence[str] = ()) -> pd.DataFrame:
    """`frame` plus a NaN row (keys, `columns`, reason) for each of `domains` it lacks."""
    have = set(frame["domain"]) if frame is not None and len(frame) else set()
    extra = pd.DataFrame([_keys_row(files, d, why.get(d, ""), columns)
                          for d in domains if d not in have])
    parts = [p for p in (frame, extra) if p is not None and len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


@dataclass
class _Source:
    """What the families of one source ("edges" or "outputs") see for ONE checkpoint: per
    domain its table (None where unreadable, with the reason in `read_errors`), the config,
    and the failures list every family appends to."""

    files: CheckpointFiles
    r: ReduceConfig
    tables: dict[str, pa.Table | None]
    read_errors: dict[str, str]
    fails: list[MetricFailure]
    _frame: pd.DataFrame | None = None
    _pandas: dict[str, pd.DataFrame] = field(default_factory=dict)

    def pandas(self, domain: str) -> pd.DataFrame | None:
        """One domain's table as pandas (converted once)."""
        table = self.tables.get(domain)
        if table is None:
            return None
        if domain not in self._pandas:
            self._pandas[domain] = table.to_pandas()
        return self._pandas[domain]

    def frame(self) -> pd.DataFrame | None:
        """Every readable domain's rows in one frame (what baselines.py's functions take)."""
        if self._frame is None:
            parts = [self.pandas(d) for d in self.tables if self.tables[d] is not None]
            self._frame = pd.concat(parts, ignore_index=True) if parts else None
        return self._frame


def _depth_part(src: _Source) -> pd.DataFrame:
    """Λ and DDB of each domain's circuit, one domain at a time."""
    from circuitray.metrics.depth import ddb_column, depth_metrics

    files, r = src.files, src.r
    ddb = [ddb_column(t, tau) for tau in r.taus for t in r.targets]
    frames = []
    for dom, table in src.tables.items():
        local: list[MetricFailure] = []
        res = None if table is None else attempt(
            partial(depth_metrics, table, taus=tuple(r.taus), targets=tuple(r.targets)), local,
            "depth", task=files.task, checkpoint=files.checkpoint, domain=dom)
        if res is None:
            frames.append(pd.DataFrame([_keys_row(
                files, dom, reasons(local, dom, src.read_errors.get(dom, "")), ddb)]))
        else:
            notes = res["note"].fillna("").str.strip("; ")
            res["reason"] = np.where(notes != "", "depth: " + notes, "")
            frames.append(res)
        src.fails.extend(local)
    return pd.concat(frames, ignore_index=True)


def _shift_part(src: _Source) -> pd.DataFrame | None:
    """CSS of each non-ID domain's circuit against the ID circuit, one pair at a time."""
    from circuitray.metrics.shift import css_column, shift_scores

    files, r = src.files, src.r
    cols = [css_column(v) for v in r.css_variants]
    ref = src.tables.get(files.id_domain)
    no_ref = "" if ref is not None else (
        f"css: needs the ID circuit on '{files.id_domain}': "
        f"{src.read_errors.get(files.id_domain, 'not in the marker')}")
    frames = []
    for dom, table in src.tables.items():
        if dom == files.id_domain:
            continue
        local: list[MetricFailure] = []
        res = None
        if table is not None and ref is not None:
            res = attempt(lambda table=table: shift_scores(
                pa.concat_tables([ref, table], promote_options="default"),
                id_domain=files.id_domain, variants=list(r.css_variants), top_n=r.top_n),
                local, "css", task=files.task, checkpoint=files.checkpoint, domain=dom)
        if res is None:
            frames.append(pd.DataFrame([_keys_row(
                files, dom, reasons(local, dom, src.read_errors.get(dom, ""), no_ref), cols)]))
        else:
            frames.append(res.assign(reason=""))
        src.fails.extend(local)
    return pd.concat(frames, ignore_index=True) if frames else None


def _outputs_part(name: str, fn: Any, src: _Source, domains: Sequence[str],
                  columns: Sequence[str]) -> pd.DataFrame:
    """`fn(table, failures)`, a baselines.py table function that isolates each domain and
    metric itself, over the readable outputs; a table-level error makes the family NaN for
    the whole checkpoint, and domains whose outputs were unreadable get NaN rows saying so."""
    files, table = src.files, src.frame()
    local: list[MetricFailure] = []
    why = dict(src.read_errors)
    res = None
    if table is not None:
        res = attempt(partial(fn, table, local), local, name, task=files.task,
                      checkpoint=files.checkpoint, domain="(all)")
        if res is None:
            why = {d: why.get(d) or local[-1].reason for d in domains}
    src.fails.extend(local)
    return _with_rows_for(res, files, domains, why, columns)


def _accuracy_part(src: _Source) -> pd.DataFrame:
    from circuitray.baselines import domain_accuracy

    return _outputs_part("accuracy", domain_accuracy, src, list(src.tables),
                         family_columns("accuracy"))


def _baselines_part(src: _Source) -> pd.DataFrame:
    from circuitray.baselines import BASELINE_COLUMNS, pre_deployment_baselines

    return _outputs_part("baselines", lambda t, f: pre_deployment_baselines(
        t, id_domain=src.files.id_domain, failures=f), src, list(src.tables), BASELINE_COLUMNS)


def _detectors_part(src: _Source) -> pd.DataFrame | None:
    from circuitray.baselines import DETECTOR_COLUMNS, shift_detectors

    others = [d for d in src.tables if d != src.files.id_domain]
    if not others:
        return None
    return _outputs_part("detectors", lambda t, f: shift_detectors(
        t, id_domain=src.files.id_domain, seed=src.r.seed, failures=f),
        src, others, DETECTOR_COLUMNS).astype({"bbsd_shift": "boolean", "mmd_shift": "boolean"})


# The code of each built-in family the registry declares (registry.families()).
_FAMILIES: dict[str, Callable[[_Source], pd.DataFrame | None]] = {
    "accuracy": _accuracy_part, "depth": _depth_part, "shift": _shift_part,
    "baselines": _baselines_part, "detectors": _detectors_part}


def _plugin_value(spec: MetricSpec, table: pd.DataFrame, ref: pd.DataFrame) -> float:
    """`spec.compute` on one domain, checked to be one number."""
    assert spec.compute is not None
    value = np.asarray(spec.compute(table, ref, **spec.params), dtype=np.float64)
    if value.shape != ():
        raise MetricError(f"{spec.name}: compute returned an array of shape {value.shape}, "
                          "expected one number")
    return float(value)


def _plugins_part(src: _Source, specs: Sequence[MetricSpec]) -> pd.DataFrame:
    """Every plug-in metric of this source on every domain: `compute(domain table, ID
    table, **params)`, each value isolated (NaN and a reason when it fails)."""
    files = src.files
    ref = src.pandas(files.id_domain)
    no_ref = "" if ref is not None else (
        f"plug-in metrics need the ID domain '{files.id_domain}': "
        f"{src.read_errors.get(files.id_domain, 'not in the marker')}")
    rows = []
    for dom in src.tables:
        local: list[MetricFailure] = []
        row = _keys_row(files, dom, "", [s.name for s in specs])
        table = src.pandas(dom)
        if table is not None and ref is not None:
            for spec in specs:
                value = attempt(partial(_plugin_value, spec, table, ref), local, spec.name,
                                task=files.task, checkpoint=files.checkpoint, domain=dom)
                row[spec.name] = np.nan if value is None else value
        row["reason"] = reasons(local, dom, src.read_errors.get(dom, ""),
                                no_ref if table is not None else "")
        rows.append(row)
        src.fails.extend(local)
    return pd.DataFrame(rows)


def _merge_parts(a: pd.DataFrame | None, b: pd.DataFrame) -> pd.DataFrame:
    """Two frames of the same family (plug-ins of both sources), one row per domain."""
    if a is None:
        return b
    both = a.merge(b, on=KEYS, how="outer", suffixes=("", "_2"))
    both["reason"] = _join_reasons(both[["reason", "reason_2"]])
    return both.drop(columns="reason_2")


def checkpoint_metrics(files: CheckpointFiles, r: ReduceConfig, threads: int = 1,
                       plugins: Sequence[MetricSpec] | None = None) -> dict[str, pd.DataFrame]:
    """Every registered metric family of ONE checkpoint's files: the built-in families
    (registry.families(): accuracy, depth, CSS, baselines, detectors), then the plug-in
    metrics (`plugins`, by default registry.plugins(); passed explicitly to a Ray task,
    whose process has only the built-ins registered) as the "plugins" frame.

    Pure (files in, frames out), so it runs inline or as a Ray task next to the data. It does
    not raise for its data: every family is computed per domain (CSS and detectors against
    the ID domain); what cannot be computed is NaN with a `reason`, and comes back as rows of
    the "failures" frame (FAILURE_SCHEMA, stage "reduce"), so a Ray task never fails for it.
    Edges are read first and released before the outputs are read: one table kind at a time.
    """
    from threadpoolctl import threadpool_limits

    plugins = registry.plugins() if plugins is None else tuple(plugins)
    fails: list[MetricFailure] = []
    out: dict[str, pd.DataFrame] = {}
    where = {"task": files.task, "checkpoint": files.checkpoint}
    try:
        with threadpool_limits(threads):
            for source in SOURCES:
                paths = files.edges if source == "edges" else files.outputs
                src = _Source(files, r, {}, {}, fails)
                for dom, read in _read_all(paths, files.checksums).items():
                    src.tables[dom] = attempt(read, fails, f"read {source}", domain=dom,
                                              **where)
                    if src.tables[dom] is None:
                        src.read_errors[dom] = fails[-1].reason
                for name in families(source):
                    res = _FAMILIES[name](src)
                    if res is not None:
                        out[name] = res
                mine = [p for p in plugins if p.source == source]
                if mine:
                    out[PLUGINS] = _merge_parts(out.get(PLUGINS), _plugins_part(src, mine))
                del src  # this source's tables go before the next source is read
    except StaleResultError:
        raise
    except Exception as exc:  # a bug must not cost the other checkpoints: record, go on
        fails.append(MetricFailure("reduce (internal error)", files.task, files.checkpoint, "(all)",
                                   type(exc).__name__,
                                   f"{exc}\n{''.join(traceback.format_exception(exc)[-3:])}"))
        out = {k: v for k, v in out.items() if k in _parts()}
    out = {k: _sorted(v) for k, v in out.items()}
    out["failures"] = pd.DataFrame(
        [{"checkpoint": f.checkpoint, "stage": "reduce", "error_type": f.error_type,
          "error": f.describe()} for f in fails], columns=FAILURE_SCHEMA.names)
    return out


def _parts() -> tuple[str, ...]:
    """The metrics/ tables reduce writes per family, in registry order, plug-ins last."""
    return (*families(), PLUGINS)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in key order (task, checkpoint, domain[, method]): never in completion order."""
    keys = [k for k in _SORT_KEYS if k in frame.columns]
    return frame.sort_values(keys, kind="stable", ignore_index=True) if keys else frame


def _per_checkpoint(layout: JobLayout, domains: pd.DataFrame, cfg: JobConfig
                    ) -> dict[str, pd.DataFrame]:
    """`checkpoint_metrics` for every complete checkpoint: as Ray tasks when a Ray is up
    (the pipeline's, or a cluster's), else inline; memory stays one checkpoint per worker.
    Results are assembled in (task, checkpoint) order, so tables never depend on which
    task finished first; "failures" holds every checkpoint's reduce failures."""
    import ray

    args = [checkpoint_files(layout, doms)
            for _, doms in domains.groupby(["task", "checkpoint"], sort=True)]
    results: list[dict[str, pd.DataFrame]] = [{} for _ in args]
    plugins = registry.plugins()  # a Ray worker's registry holds only the built-ins
    if ray.is_initialized() and len(args) > 1:
        from circuitray.runtime.ray_utils import iter_completed

        task_fn = ray.remote(num_cpus=1, max_retries=cfg.resources.max_retries)(
            checkpoint_metrics)
        refs = [task_fn.remote(a, cfg.reduce, 1, plugins) for a in args]
        for i, res in iter_completed(refs, "reduce metrics"):
            results[i] = res
    else:
        start = time.monotonic()
        for i, a in enumerate(args):
            results[i] = checkpoint_metrics(a, cfg.reduce, plugins=plugins)
            if (i + 1) % 25 == 0 or i + 1 == len(args):
                log.info(f"[reduce] metrics {i + 1}/{len(args)} checkpoints, "
                         f"{time.monotonic() - start:.0f}s")
    out = {}
    for k in (*_parts(), "failures"):
        parts = [res[k] for res in results if k in res and not res[k].empty]
        out[k] = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    out = {k: v if k == "failures" else _sorted(v) for k, v in out.items()}
    if out["failures"].empty:
        out["failures"] = pd.DataFrame(columns=FAILURE_SCHEMA.names)
    return out


def _remove_unwritten(folder: storage.AnyPath, written: set[storage.AnyPath]) -> None:
    """Delete the tables in `folder` this run did not write (a motif of a task gone from the
    manifest, DDB over training without OOD rows, ...): an earlier run's table left beside
    this run's would be read as current."""
    for old in storage.list_files(folder, ".parquet"):
        if old not in written:
            storage.delete(old)


def write_reduce_failures(layout: JobLayout, failures: pd.DataFrame) -> None:
    """failures/reduce/<checkpoint>.parquet per checkpoint with a failure in this run; files
    left by earlier runs are removed, so a checkpoint that now reduces cleanly has none."""
    keep = set()
    for cid, rows in failures.groupby("checkpoint", sort=True):
        keep.add(write_parquet_atomic(rows.reset_index(drop=True),
                                      layout.reduce_failure_file(str(cid)), FAILURE_SCHEMA))
        first = rows["error"].iloc[0].splitlines()[0]
        log.warning(f"[reduce] {cid}: {len(rows)} metric failure(s), NaN in metrics/ with a "
                    f"reason; first: {first}")
    _remove_unwritten(layout.reduce_failure_file("-").parent, keep)


def _join_reasons(columns: pd.DataFrame) -> pd.Series:
    """Row-wise "; "-join of reason columns, each fragment once (a read error shows in every
    family that needed the file)."""
    def join(values: Sequence[Any]) -> str:
        parts = [p for v in values if isinstance(v, str) and v for p in v.split("; ") if p]
        return "; ".join(dict.fromkeys(parts))

    if columns.shape[1] == 0:
        return pd.Series("", index=columns.index, dtype=object)
    return pd.Series([join(row) for row in columns.itertuples(index=False)],
                     index=columns.index, dtype=object)


def domain_frame(domains: pd.DataFrame, per: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (task, checkpoint, domain): role, accuracy, DDB/Λ, CSS, baselines,
    detectors and plug-in metrics (families in registry order), and `reason`: why any of its
    values is NaN (every family's reasons, joined).

    Every column a family adds must be registered (registry.spec_for): an unknown one is a
    MetricError naming it, never a column that evaluation silently leaves out."""
    frame = domains[KEYS + ["role", "kind", "severity", "n_examples"]].copy()
    reason_cols = []
    for name in _parts():
        part = per.get(name)
        if part is None or part.empty:
            continue
        part = part.drop(columns=[c for c in ("method", "note", "n_blocks") if c in part])
        if "reason" in part:
            part = part.rename(columns={"reason": f"_reason_{name}"})
            reason_cols.append(f"_reason_{name}")
        part = part.drop(columns=[c for c in part.columns
                                  if c in frame.columns and c not in KEYS])
        registry.check_columns([c for c in part.columns
                                if c not in KEYS and not c.startswith("_reason_")],
                               f"metric family '{name}'")
        frame = frame.merge(part, on=KEYS, how="left")
    frame["reason"] = _join_reasons(frame[reason_cols])
    return _sorted(frame.drop(columns=reason_cols))


def _hyper(manifest: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in manifest.columns if c not in _MANIFEST_SKIP]
    return manifest[keep].rename(columns={"checkpoint_id": "checkpoint"})


def group_labels(rows: pd.DataFrame) -> pd.Series:
    """Label of each row's evaluation group: the task, or "<task>:<domain>" for a task seen
    on several OOD domains. Only a label (figure names, titles): `task` stays the real task,
    which file paths need."""
    several = rows.groupby("task")["domain"].transform("nunique") > 1
    return rows["task"].where(~several, rows["task"] + ":" + rows["domain"])




def _model_frame(frame: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Pre-deployment rows: one per final checkpoint × OOD domain, with id_acc and ood_acc,
    `near_chance` (labelled ID accuracy within NEAR_CHANCE of 1/num_classes, or below it) and
    `reason` (the OOD row's, plus the ID row's when id_acc is NaN).

    Several OOD domains become separate evaluation groups: `domain` is the OOD domain and
    `eval_group` the group's label (`group_labels`); `task` is never rewritten.
    """
    ids = frame[frame.role == "id"][["task", "checkpoint", "accuracy", "reason"]].rename(
        columns={"accuracy": "id_acc", "reason": "_id_reason"})
    ood = frame[frame.role == "ood"].rename(columns={"accuracy": "ood_acc"})
    ood = ood.drop(columns=[c for c in ("id_acc",) if c in ood]).merge(
        ids, on=["task", "checkpoint"], how="left")
    id_why = np.where(ood["id_acc"].isna() & (ood["_id_reason"].fillna("") != ""),
                      "id_acc: " + ood["_id_reason"].fillna(""), "")
    ood["reason"] = _join_reasons(pd.DataFrame({"ood": ood["reason"], "id": id_why}))
    ood = ood.drop(columns="_id_reason")
    ood["eval_group"] = group_labels(ood)
    hyper = _hyper(manifest).drop(columns=["task"], errors="ignore")
    hyper = hyper.drop(columns=[c for c in hyper.columns if c in ood and c != "checkpoint"])
    models = ood.merge(hyper, on="checkpoint", how="left")
    classes = pd.to_numeric(models["num_classes"], errors="coerce") if "num_classes" in models \
        else pd.Series(np.nan, index=models.index)
    models["near_chance"] = ((models["id_acc"] - 1.0 / classes) < NEAR_CHANCE).fillna(
        False).astype(bool)
    return _sorted(models)


def _note(notes: list[str], message: str) -> None:
    notes.append(message)
    log.info(f"[reduce] {message}")  # the report carries the notes too


def _safe(fn: Any, notes: list[str], what: str) -> Any:
    """`fn()`, or None with a note when the data do not allow it; an output that cannot be
    written (disk full, read-only) is not a data problem and stops the job naming the path,
    and neither is an input that no longer matches its marker (StaleResultError)."""
    try:
        return fn()
    except StaleResultError:
        raise
    except OSError as exc:
        if os_error_is_permanent(exc):
            raise OutputError.from_os_error(exc.filename or what, exc) from exc
        _note(notes, f"{what} skipped: {exc}")
        return None
    except RECOVERABLE as exc:
        _note(notes, f"{what} skipped: {exc}")
        return None


def _by_task(fn: Any, frame: pd.DataFrame, notes: list[str], what: str) -> Any:
    """`fn(frame)`; if it fails, find the tasks it fails on, note them and run it on the
    rest: one task's impossibility never costs the other tasks their evaluation."""
    try:
        return fn(frame)
    except RECOVERABLE as exc:
        bad = []
        for task, part in frame.groupby("task", sort=True):
            try:
                fn(part)
            except RECOVERABLE as err:
                bad.append(task)
                _note(notes, f"{what}, task {task} skipped: {err}")
        rest = frame[~frame.task.isin(bad)]
        if not bad:
            _note(notes, f"{what} skipped: {exc}")
        if not bad or rest.empty:
            return None
        return _safe(lambda: fn(rest), notes, what)


def evaluate_all(frame: pd.DataFrame, models: pd.DataFrame, cfg: JobConfig,
                 notes: list[str]) -> dict[str, pd.DataFrame]:
    """The paper's protocol (DESIGN §5) over the domain and model frames.

    Pre-deployment runs per task on the tasks with at least MIN_CHECKPOINTS usable
    checkpoints; the others are noted (and listed in the "skipped" table). A step that fails
    for one task is rerun without it, so the other tasks keep their evaluation.
    """
    from circuitray import evaluation as ev

    r = cfg.reduce
    kw = {"n_boot": r.n_boot, "seed": r.seed}
    # which stage evaluates which metric is the registry's (e.g. CSS and shift detectors
    # compare a deployment domain with ID data: post-deployment only)
    pre_metrics = metric_columns(models.columns, stage="pre")
    out: dict[str, pd.DataFrame] = {}
    if not models.empty and pre_metrics:
        usable = ev.usable_checkpoints(models, metrics=pre_metrics, target="ood_acc")
        skipped = usable[~usable.evaluate]
        for note in skipped.note:
            _note(notes, note)
        if len(skipped):
            out["skipped"] = skipped.assign(stage="pre_deployment", n_needed=ev.MIN_CHECKPOINTS)[
                ["stage", "task", "n_usable", "n_needed", "note"]].reset_index(drop=True)
        ok = models[models.task.isin(usable.task[usable.evaluate])]
        # several OOD domains: groups per (task, domain), and "all" still averages tasks
        by = ("task", "domain") if ok.groupby("task")["domain"].nunique().gt(1).any() \
            else ("task",)
        if not ok.empty:
            # beside each circuit metric: its partial SRCC given the task's best baseline
            pre = _by_task(lambda f: ev.with_partial_given_best(
                ev.pre_deployment(f, metrics=pre_metrics, target="ood_acc", by=by, **kw),
                f, target="ood_acc", by=by, **kw), ok, notes, "pre-deployment evaluation")
            if pre is not None:
                out["pre_deployment"] = pre
            # the configured column, else the fine-tuning regime when the manifest has one
            group_col = r.group_column or ("regime" if "regime" in ok else None)
            if group_col and group_col in ok:
                wg = _by_task(lambda f: ev.within_group(f, metrics=pre_metrics,
                                                        target="ood_acc",
                                                        group_col=group_col, by=by,
                                                        **kw),
                              ok, notes, "within-group evaluation")
                if wg is not None:
                    out["within_group"] = wg
            circuit = metric_columns(pre_metrics, kind="circuit")
            base = [m for m in pre_metrics if m not in circuit]
            if circuit and base:
                pc = _by_task(lambda f: ev.partial_correlations(
                    f, circuit_metrics=circuit, baselines=base, target="ood_acc", by=by, **kw),
                    ok, notes, "partial correlations")
                if pc is not None:
                    out["partial"] = pc
    shift = frame[frame.role == "shift"]
    proxy = frame[frame.role == "proxy"]
    post_metrics = metric_columns(shift.columns, stage="post")
    alarm_metrics = metric_columns(shift.columns, stage="alarm")
    if not shift.empty and post_metrics:
        post = _by_task(lambda f: ev.post_deployment(f, metrics=post_metrics,
                                                     target="accuracy", **kw),
                        shift, notes, "post-deployment evaluation")
        if post is not None:
            out["post_deployment"] = post
        if not proxy.empty and alarm_metrics:
            alarm = _by_task(lambda f: ev.silent_failure_alarm(
                f, proxy[proxy.task.isin(f.task)], metrics=alarm_metrics, deltas=list(r.deltas)),
                shift, notes, "silent-failure alarm")
            if alarm is not None:
                out["alarm"] = alarm
    if {"pre_deployment", "post_deployment", "alarm"} & out.keys():
        res = _safe(lambda: ev.result_table(out.get("pre_deployment"),
                                            out.get("post_deployment"), out.get("alarm")),
                    notes, "result table")
        if res is not None:
            out["results"] = res
    return out


def motifs(models: pd.DataFrame, notes: list[str]) -> dict[str, Any]:
    """Per-task CCA motifs of vec(Λ) against OOD accuracy, and the universal motif.

    A task with too few models is noted and left out rather than failing the job.
    """
    from circuitray.metrics.motifs import cca_motif, universal_motif

    d = lambda_size(list(models.columns))
    if models.empty or not d:
        return {}
    names = lambda_columns(d)
    found, rows, weights = {}, [], []
    label = "eval_group" if "eval_group" in models else "task"
    for task, grp in models.groupby(label, sort=True):
        lam = grp[names].to_numpy(np.float64).reshape(-1, d, d)
        size = int(np.isfinite(lam).all(axis=0).all(axis=1).sum())  # crop NaN padding
        m = _safe(lambda lam=lam, size=size, grp=grp, task=task: cca_motif(
            lam[:, :size, :size], grp["ood_acc"].to_numpy(float), task=task),
            notes, f"CCA motif of task {task}")
        if m is None:
            continue
        found[task] = m
        rows.append({"task": task, "n_models": len(grp), "canonical_corr": m.canonical_corr,
                     "heldout_corr": m.heldout_corr, "reg": m.reg})
        weights += [{"task": task, "src_depth": i, "dst_depth": j, "weight": m.motif[i, j]}
                    for i in range(m.motif.shape[0]) for j in range(m.motif.shape[1])]
    out: dict[str, Any] = {"task_motifs": {t: m.motif for t, m in found.items()}}
    if rows:
        out["summary"] = pd.DataFrame(rows)
        out["weights"] = pd.DataFrame(weights)
        uni = _safe(lambda: universal_motif(found), notes, "universal motif")
        if uni is not None:
            out["universal"] = uni
    return out


def ddb_figure_column(cfg: JobConfig) -> str:
    """The DDB the figures show: DDB_out at the paper's τ = 0.3 if computed, else the first τ."""
    tau = 0.3 if 0.3 in cfg.reduce.taus else cfg.reduce.taus[0]
    return f"ddb_out_{tau:g}"


def training_figure_name(group: str) -> str:
    return f"ddb_over_training_{safe_name(group)}.png"


def training_frame(frame: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """OOD rows of every checkpoint, final and intermediate, with the manifest's `epoch`
    and `parent_id` (where it has them), `final` (plan.is_final) and `eval_group`."""
    hyper = _hyper(manifest)
    hyper = hyper[[c for c in ("checkpoint", "epoch", "parent_id") if c in hyper]].assign(
        final=[is_final(r) for r in manifest.to_dict("records")])
    ood = frame[frame.role == "ood"]
    rows = ood.drop(columns=[c for c in hyper if c in ood and c != "checkpoint"]).merge(
        hyper, on="checkpoint", how="left")
    return rows.assign(eval_group=group_labels(rows)) if len(rows) else rows


def training_runs_table(frame: pd.DataFrame, manifest: pd.DataFrame, cfg: JobConfig,
                        notes: list[str]) -> pd.DataFrame:
    """Per evaluation group, the runs (parent_id) with the best and the worst final OOD
    accuracy that the DDB-over-training figure shows (evaluation.best_and_worst_runs); a
    group without a run of >= 2 checkpoints gets a note, not an error."""
    from circuitray.evaluation import training_runs

    rows = training_frame(frame, manifest)
    if rows.empty:
        return pd.DataFrame()
    out = training_runs(rows, metric=ddb_figure_column(cfg))
    out["figure"] = ""  # set by run_reduce to figures/<name> once the figure is drawn
    if {"epoch", "parent_id"} <= set(manifest.columns):  # training dynamics were expected
        for g, note in zip(out["group"], out["note"], strict=True):
            if note:
                _note(notes, f"DDB over training, {g}: skipped ({note})")
    return out


def figures(layout: JobLayout, frame: pd.DataFrame, models: pd.DataFrame,
            evals: Mapping[str, pd.DataFrame], cfg: JobConfig, manifest: pd.DataFrame,
            motif: Mapping[str, Any], notes: list[str], runs: pd.DataFrame | None = None,
            fig_dir: Path | None = None, edges_checksums: Mapping[tuple[str, str], str] | None
            = None) -> list[Path]:
    """Every figure DESIGN §6 asks for that the data at hand supports; one that cannot be
    drawn (e.g. no proxy domain with a finite metric to calibrate the alarm) is noted and
    the others are still drawn.

    `frame` holds all domains of final checkpoints and ID/OOD rows of intermediate ones;
    `models` one row per final checkpoint (× OOD domain). Per-group figures are named by
    the group's label (`group_labels`); file paths use the real task. The circuit drawing
    reads its edges like every other input: checked against the marker's checksum
    (`edges_checksums`, (checkpoint, domain) -> checksum), so it never draws a file that
    changed after its metrics were computed.
    """
    from circuitray import plots

    fig_dir = fig_dir or layout.figures
    paths: list[Path] = []

    def draw(what: str, fn: Any) -> None:
        path = _safe(fn, notes, f"figure {what}")
        if path is not None:
            paths.append(path)

    ddb = ddb_figure_column(cfg)
    tau = float(ddb.rsplit("_", 1)[1])
    final = models
    results = evals.get("results")
    best = []
    if results is not None and "kind" in results:  # sorted by pre-deployment composite
        best = [m for m in results[results.kind == "output"].metric if m in final][:3]
    final = final.assign(eval_group=group_labels(final)) if not final.empty else final
    for task, part in (final.groupby("eval_group") if ddb in final else []):
        # tasks are never pooled: the sign of DDB depends on where the spurious cue lives
        draw(f"ood_vs_ddb_{task}", lambda part=part, task=task: plots.scatter_panels(
            part, [ddb, *best], "ood_acc", fig_dir / f"ood_vs_ddb_{safe_name(task)}.png",
            title=f"{task}: OOD accuracy vs DDB_out (τ={tau:g}) "
                  "and the best output-based baselines"))
    d = lambda_size(list(models.columns))
    if d and not final.empty:
        names = lambda_columns(d)
        for task, part in final.groupby("eval_group"):
            draw(f"lambda_{task}", lambda part=part, task=task: plots.heatmap(
                np.nanmean(part[names].to_numpy(float), axis=0).reshape(d, d),
                fig_dir / f"lambda_{safe_name(task)}.png", title=f"mean Λ on OOD data, {task}"))
    for name, mat in (motif.get("task_motifs") or {}).items():
        draw(f"motif_{name}", lambda name=name, mat=mat: plots.heatmap(
            np.asarray(mat), fig_dir / f"motif_{safe_name(name)}.png",
            title=f"CCA motif, {name}", diverging=True))
    if motif.get("universal") is not None:
        draw("motif_universal", lambda: plots.heatmap(
            np.asarray(motif["universal"]), fig_dir / "motif_universal.png",
            title="universal motif", diverging=True))
    shift = frame[frame.role == "shift"]
    css = metric_columns(shift.columns, stage="post", kind="circuit")
    if not shift.empty and css:
        draw("css_vs_acc", lambda: plots.scatter_panels(
            shift, css, "accuracy", fig_dir / "css_vs_acc.png", hue="checkpoint",
            y_label="domain accuracy",
            title="post-deployment: CSS vs domain accuracy (statistics pooled over models; "
                  "per-model ones in evaluation/post_deployment)"))
        proxy = frame[frame.role == "proxy"]
        metric = "css_srcc" if "css_srcc" in css else css[0]
        if not proxy.empty:
            from circuitray.evaluation import calibrate_threshold

            first = shift.checkpoint.iloc[0]
            p = proxy[proxy.checkpoint == first]
            delta = cfg.reduce.deltas[len(cfg.reduce.deltas) // 2]
            draw("alarm", lambda: plots.alarm_plot(
                p, shift[shift.checkpoint == first], metric, fig_dir / "alarm.png",
                delta=delta, threshold=calibrate_threshold(p[metric], p["accuracy"], delta),
                title=f"alarm on {metric}, {first}"))
    chosen = runs[runs.n_runs > 0] if runs is not None and not runs.empty else None
    rows = training_frame(frame, manifest) if chosen is not None and len(chosen) else None
    for _, row in chosen.iterrows() if rows is not None else []:
        part = rows[rows.eval_group == row["group"]]
        title = (f"{row['group']}: {ddb} on OOD data over training, the runs with the best "
                 f"and the worst final OOD accuracy (of {row['n_runs']})")
        draw(f"ddb_over_training_{row['group']}", lambda part=part, row=row, title=title:
             plots.ddb_over_training(part, [("best", row["best_run"]),
                                            ("worst", row["worst_run"])], metric=ddb,
                                     path=fig_dir / training_figure_name(row["group"]),
                                     title=title))
    if not final.empty:
        task, cid, dom = final.iloc[0][["task", "checkpoint", "domain"]]

        def circuit_edges() -> pd.DataFrame:
            path = str(layout.edges_file(task, cid, dom))
            checksum = (edges_checksums or {}).get((cid, dom))
            if checksum is None:  # never drawn unverified
                raise StaleResultError(f"{path}: no checksum recorded for it in its "
                                       "checkpoint's marker; run discover again")
            return _read_table(path, checksum).to_pandas()

        draw("circuit", lambda: plots.circuit_drawing(
            circuit_edges(), fig_dir / "circuit.png", top_n=40,
            title=f"circuit of {cid} on {dom} (top 40 edges)"))
    return paths


_TRAIN_COLUMNS = ("id_acc", "ood_acc", "accuracy", "parent_id")  # manifest: from training
_CORR_STATS = ("r", "r2_signed", "srcc", "krcc", "composite")


def _corr_metrics(evals: Mapping[str, pd.DataFrame]) -> dict[str, float]:
    """The result table's statistics as `corr/<metric>/<stat>` (pre_srcc, post_composite,
    alarm_f1, ...). Intervals, counts and the paper's published constants stay in the
    logged table: as metrics they only crowd the UI's picker."""
    res = evals.get("results")
    if res is None or res.empty:
        return {}
    stats = [f"{stage}_{s}" for stage in ("pre", "post") for s in _CORR_STATS]
    stats += ["alarm_f1", "alarm_auroc"]
    out = {}
    for _, row in res.iterrows():
        for stat in stats:
            if stat in row and pd.notna(row[stat]):
                out[registry.tracking_key(str(row["metric"]), "corr", stat)] = float(row[stat])
    return out


def _run_note(evals: Mapping[str, pd.DataFrame], summary: Mapping[str, Any], name: str) -> str:
    """The parent run's description (Markdown): what ran, and the headline of the result
    table — the best circuit metric beside the best output-based baseline, per stage."""
    lines = [f"**{name}**: {summary['checkpoints_complete']} checkpoints reduced, "
             f"{summary['checkpoints_failed']} failed, "
             f"{summary['checkpoints_with_reduce_failures']} with a metric reduce could not "
             "compute."]
    res = evals.get("results")
    for stat, what in (("pre_composite", "pre-deployment composite (vs OOD accuracy)"),
                       ("post_composite", "post-deployment composite (vs shifted accuracy)"),
                       ("alarm_f1", "silent-failure alarm F1")):
        if res is None or stat not in res or "kind" not in res:
            continue
        best = []
        for kind in ("circuit", "output"):
            part = res[(res.kind == kind) & res[stat].notna()]
            if len(part):
                top = part.loc[part[stat].idxmax()]
                best.append(f"{kind} `{top['metric']}` {top[stat]:.3f}")
        lines.append(f"- {what}: " + (", ".join(best) if best else "n/a (too few models)"))
    lines.append("\nTables under Artifacts › tables (evaluation/report.txt in the job folder).")
    return "\n".join(lines)


def _work_intervals(markers: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """When each complete checkpoint's discover work ran, in epoch ms: from the earliest
    domain start (its outputs file's write time recorded in the marker, less the domain's
    `seconds`) to the last domain's write. Model loading before the first domain is not
    in it; a domain kept from an earlier run counts at the time it was computed."""
    need = {"checkpoint", "outputs_mtime_ns", "seconds"}
    if markers.empty or not need <= set(markers.columns):
        return {}
    end = pd.to_numeric(markers["outputs_mtime_ns"], errors="coerce") / 1e6
    start = end - pd.to_numeric(markers["seconds"], errors="coerce").fillna(0) * 1000
    frame = pd.DataFrame({"checkpoint": markers["checkpoint"], "start": start, "end": end})
    out = {}
    for cid, part in frame.dropna().groupby("checkpoint"):
        out[str(cid)] = (int(part.start.min()), int(part.end.max()))
    return out


def _child_params(hp: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's manifest columns as params: what training reported (its accuracies,
    its run's id) under `train.`, so no param shares a name with a measured metric or
    MLflow's own parent link; `final` is a tag, missing values are left out."""
    out = {}
    for key, value in hp.items():
        if key in ("final", "checkpoint") or value is None or \
                (isinstance(value, float) and np.isnan(value)):
            continue
        measured = key in _TRAIN_COLUMNS or registry.is_registered(str(key))
        out[f"train.{key}" if measured else str(key)] = value
    return out


def _config_hash(cfg: JobConfig) -> str:
    """What the job computes: the resolved config without the settings that change where
    and how it runs but not its numbers (tracking, stages, resources), so `circuitray run`
    and `circuitray reduce` of one job, or the same job on another cluster, share it."""
    settings = {k: v for k, v in to_dict(cfg).items()
                if k not in ("tracking", "stages", "resources")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()
                          ).hexdigest()[:12]


def _log_mlflow(cfg: JobConfig, layout: JobLayout, manifest: pd.DataFrame, frame: pd.DataFrame,
                models: pd.DataFrame, evals: Mapping[str, pd.DataFrame], result: ReduceResult,
                summary: Mapping[str, Any], markers: pd.DataFrame, finals: set[str],
                reduce_failures: pd.DataFrame) -> str:
    """Parent run: config, `corr/` statistics, result tables, figures, the manifest as its
    dataset and a note with the headline; a child per manifest row (tagged with its count of
    reduce failures and whether it is near chance) whose metric keys come from the registry
    (`registry.tracking_key`): `id/accuracy`, `ood/accuracy`, `ood/<metric>` for the
    pre-deployment metrics, `shift_mean/<metric>` for those evaluated post-deployment only.

    `markers` are the marker rows of the reduced (complete) checkpoints."""
    import yaml

    from circuitray.tracking import ChildRun, flatten, git_commit, log_job, short_names

    key = registry.tracking_key
    uri = tracking_uri(cfg)
    per_ckpt = models.groupby("checkpoint").first() if not models.empty else pd.DataFrame()
    # metrics at the checkpoint's OOD domain (pre-deployment), and those evaluated
    # post-deployment only (CSS, detectors) as their mean over the shifted domains;
    # descriptors (Λ cells, n, nuclear bounds, …) are never logged.
    pre = [c for c in metric_columns(per_ckpt.columns, stage="pre") if c != "id_acc"]
    post_only = [c for c in metric_columns(frame.columns, stage="post")
                 if c not in metric_columns(frame.columns, stage="pre")]
    hyper = _hyper(manifest).set_index("checkpoint")
    names = short_names(hyper.index, hyper.get("parent_id", pd.Series(dtype=object)).to_dict(),
                        hyper.get("epoch", pd.Series(dtype=object)).to_dict())
    complete = set(markers.checkpoint)
    prep = (markers.reindex(columns=["checkpoint", "norm_source", "class_source"])
            .groupby("checkpoint").first())
    n_failed = reduce_failures.groupby("checkpoint").size()
    failures = read_failures(layout)
    why = failures[failures.stage != "reduce"].groupby("checkpoint").first()
    when = _work_intervals(markers)
    children = []
    for cid, hp in hyper.iterrows():
        metrics: dict[str, float] = {}
        if cid in per_ckpt.index:
            row = per_ckpt.loc[cid]
            metrics[key("accuracy", "id")] = row.get("id_acc", np.nan)
            metrics[key("accuracy", "ood")] = row.get("ood_acc", np.nan)
            metrics |= {key(c, "ood"): row[c] for c in pre}
        shifted = frame[(frame.checkpoint == cid) & (frame.role == "shift")]
        if len(shifted):
            metrics |= {key(c, "shift_mean"): float(shifted[c].mean())
                        for c in (*post_only, "accuracy") if c in shifted}
        status = "complete" if cid in complete else "failed or not run"
        tags = {"checkpoint": str(cid), "status": status, "final": str(cid in finals).lower(),
                "reduce_failures": str(int(n_failed.get(cid, 0)))}
        if cid in per_ckpt.index and "near_chance" in per_ckpt:
            tags["near_chance"] = str(bool(per_ckpt.loc[cid, "near_chance"])).lower()
        if cid in prep.index:
            tags |= {k: str(v) for k, v in prep.loc[cid].items() if v is not None}
        if cid not in complete and cid in why.index:
            tags |= {"error_stage": str(why.loc[cid, "stage"]),
                     "error": f"{why.loc[cid, 'error_type']}: "
                              f"{str(why.loc[cid, 'error']).splitlines()[0]}"[:500]}
        start_ms, end_ms = when.get(str(cid), (None, None))
        children.append(ChildRun(names[cid], params=_child_params(hp.to_dict()),
                                 metrics=metrics, tags=tags,
                                 status="FINISHED" if cid in complete else "FAILED",
                                 start_ms=start_ms, end_ms=end_ms))
    tables = {name: df for name, df in evals.items() if isinstance(df, pd.DataFrame)}
    tables["models"] = models.drop(columns=lambda_columns(lambda_size(list(models.columns))))
    if not failures.empty:
        tables["failures"] = failures
    summary_metrics = {f"job/{k}": v for k, v in summary.items()}
    name = cfg.tracking.run_name or cfg.name
    # MLflow logs local files: figures on an object store are downloaded for the upload
    with storage.local_copies(list(result.figures)) as figures:
        return log_job(tracking_uri=uri, experiment=cfg.tracking.experiment,
                       artifact_root=layout.root / "mlartifacts", run_name=name,
                       params=flatten(to_dict(cfg)),
                       metrics={**_corr_metrics(evals), **summary_metrics},
                       artifacts=[(p, "figures") for p in figures],
                       children=children, tables=tables,
                       texts={"config.yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False)},
                       dataset=(manifest, str(cfg.manifest), Path(str(cfg.manifest)).name),
                       note=_run_note(evals, summary, name),
                       start_ms=min((s for s, _ in when.values()), default=None),
                       commit=git_commit(cfg.tracking.git_commit),
                       tags={"output_dir": str(layout.root), "circuitray.name": cfg.name,
                             "circuitray.config_hash": _config_hash(cfg)})


def tracking_uri(cfg: JobConfig) -> str:
    """The MLflow store a job logs to: `tracking.uri`, else a sqlite file in the job's local
    folder (`JobLayout.local`: the output folder, or for an object-store output
    `~/.cache/circuitray/<uri>/`, since sqlite cannot live in a bucket; the artifacts still
    go to `<output_dir>/mlartifacts` in the store)."""
    from circuitray.tracking import default_tracking_uri

    return cfg.tracking.uri or default_tracking_uri(JobLayout.of(cfg.output_dir).local)


def _drawn_into(layout: JobLayout, draw: Callable[[Path | None], list[Path]]) -> list[Any]:
    """`draw(folder)` into `<out>/figures`; for an object-store output matplotlib draws into
    a local temporary folder and each figure is then uploaded in one PUT."""
    if not layout.remote:
        return draw(None)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="circuitray-figures-") as tmp:
        return [storage.write_bytes(layout.figures / p.name, p.read_bytes())
                for p in draw(Path(tmp))]


def edges_checksums(plan: JobPlan) -> dict[tuple[str, str], str]:
    """(checkpoint, domain) -> the edges file's checksum its marker recorded."""
    return {(cp.checkpoint, d.spec.name): str(d.record["edges_checksum"])
            for cp in plan.checkpoints for d in cp.domains
            if d.record and d.record.get("edges_checksum")}


def check_ready(plan: JobPlan, failed: set[str]) -> None:
    """Refuse to reduce when a planned checkpoint that did not fail has a stale, damaged or
    missing domain: its numbers would be from another setting, or silently absent."""
    stale = [c for c in plan.todo if c.checkpoint not in failed]
    if not stale:
        return
    lines = [f"  {c.checkpoint}: {c.reason()}" for c in stale[:20]]
    more = [f"  ... and {len(stale) - 20} more"] if len(stale) > 20 else []
    raise StaleResultError(
        f"{len(stale)} of {len(plan.checkpoints)} checkpoints are not complete for this "
        "config, so reduce would report stale or missing numbers; run discover first "
        "(`circuitray run` or `circuitray discover` with the same config):\n"
        + "\n".join(lines + more))


_LOADED_PLUGINS: dict[str, Any] = {}


def load_plugins(modules: Sequence[str]) -> None:
    """Import each `reduce.plugins` module (a .py file or a dotted name) once per process;
    importing it registers its metrics. Its functions are then pickled by value, so the Ray
    tasks that compute them need not be able to import the module. A module that cannot be
    imported stops reduce naming it."""
    import importlib
    import importlib.util

    from ray import cloudpickle

    for name in modules:
        key = str(Path(name).resolve()) if name.endswith(".py") else name
        if key in _LOADED_PLUGINS:
            continue
        try:
            if name.endswith(".py"):
                spec = importlib.util.spec_from_file_location(
                    f"circuitray_plugin_{Path(name).stem}", name)
                if spec is None or spec.loader is None:
                    raise ImportError(f"not a Python file: {name}")
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(name)
        except MetricError:
            raise
        except Exception as exc:
            raise ConfigError(f"reduce.plugins: cannot import '{name}': "
                              f"{type(exc).__name__}: {exc}") from exc
        cloudpickle.register_pickle_by_value(module)
        _LOADED_PLUGINS[key] = module


def _sweep_temporaries(layout: JobLayout) -> None:
    """Remove what a killed reduce left half-written (`.<name>.<uuid>.tmp` beside its tables,
    figures and report). Safe: the job lock keeps any other writer out of this folder."""
    remove_temporaries([layout.metrics, layout.evaluation, layout.figures,
                        layout.reduce_failure_file("-").parent])


def run_reduce(cfg: JobConfig, *, force: bool = False) -> ReduceResult:
    """Compute metrics/ and evaluation/ tables, figures and the MLflow runs of a job."""
    start = time.perf_counter()
    load_plugins(cfg.reduce.plugins)
    layout = JobLayout.of(cfg.output_dir)
    check_tracking_target(str(layout.root), cfg.tracking.enabled)
    _sweep_temporaries(layout)
    stamp = layout.evaluation / "_reduce.json"
    plan = plan_job(cfg, validate_images=False)
    discover_failures = read_failures(layout).query("stage != 'reduce'")
    failed = set(discover_failures.checkpoint) & {c.checkpoint for c in plan.todo}
    check_ready(plan, failed)
    fp = fingerprint(plan, cfg, failed)
    last = json.loads(storage.read_text(stamp)) if storage.exists(stamp) else {}
    if not force and last.get("fingerprint") == fp:
        log.info("[reduce] up to date: inputs and config unchanged, nothing recomputed")
        return ReduceResult(skipped=True, run_id=last.get("run_id"))
    domains = domains_frame(plan)
    if domains.empty:
        raise CircuitrayError(f"{layout.root}: no completed checkpoints to reduce "
                              "(run discover first)")
    manifest = pd.DataFrame(manifest_rows(dataclasses.replace(cfg, checkpoints=None)))
    finals = {r["checkpoint_id"] for r in manifest.to_dict("records") if is_final(r)}
    result = ReduceResult(skipped=False)
    per = _per_checkpoint(layout, domains, cfg)
    reduce_failures = per.pop("failures")
    write_reduce_failures(layout, reduce_failures)
    frame = domain_frame(domains, per)
    all_models = _model_frame(frame, manifest)
    models = all_models[all_models.checkpoint.isin(finals)].reset_index(drop=True)
    frame = frame[frame.checkpoint.isin(finals) | frame.role.isin(["id", "ood"])]
    for name, df in per.items():
        if not df.empty:
            result.tables[name] = write_parquet_atomic(df, layout.metrics / f"{name}.parquet")
        else:  # e.g. no plug-in registered any more: no table left from an earlier run
            storage.delete(layout.metrics / f"{name}.parquet")
    result.tables["domains"] = write_parquet_atomic(frame, layout.metrics / "domains.parquet")
    result.tables["models"] = write_parquet_atomic(all_models, layout.metrics / "models.parquet")
    evals = evaluate_all(frame[frame.checkpoint.isin(finals)], models, cfg, result.notes)
    motif = motifs(models, result.notes)
    for name, df in evals.items():
        result.tables[name] = write_parquet_atomic(df, layout.evaluation / f"{name}.parquet")
    for name, val in motif.items():
        if isinstance(val, pd.DataFrame):
            result.tables[f"motif_{name}"] = write_parquet_atomic(
                val, layout.evaluation / f"motif_{name}.parquet")
    runs = _safe(lambda: training_runs_table(frame, manifest, cfg, result.notes),
                 result.notes, "DDB over training")
    if cfg.reduce.figures:
        result.figures = _safe(lambda: _drawn_into(layout, lambda where: figures(
            layout, frame, models, evals, cfg, manifest, motif, result.notes, runs, where,
            edges_checksums(plan))),
            result.notes, "figures") or []
    if runs is not None and not runs.empty:
        drawn = {p.name for p in result.figures}
        runs["figure"] = [f"figures/{training_figure_name(g)}"
                          if training_figure_name(g) in drawn else "" for g in runs["group"]]
        evals = {**evals, "ddb_over_training": runs}
        result.tables["ddb_over_training"] = write_parquet_atomic(
            runs, layout.evaluation / "ddb_over_training.parquet")
    _remove_unwritten(layout.evaluation, set(result.tables.values()))
    result.frames = {"domains": frame, "models": models, **evals,
                     "reduce_failures": reduce_failures}
    if isinstance(motif.get("summary"), pd.DataFrame):
        result.frames["motif_summary"] = motif["summary"]
    failures = read_failures(layout)
    summary = {"checkpoints_complete": int(domains.checkpoint.nunique()),
               "checkpoints_failed": int(failures.loc[failures.stage != "reduce",
                                                      "checkpoint"].nunique()),
               "checkpoints_with_reduce_failures": int(reduce_failures.checkpoint.nunique()),
               "domains": int(len(domains))}
    if cfg.tracking.enabled:
        from circuitray.tracking import store_errors

        with store_errors(tracking_uri(cfg)):
            result.run_id = _log_mlflow(cfg, layout, manifest, frame, all_models, evals, result,
                                        summary, domains, finals, reduce_failures)
    result.seconds = time.perf_counter() - start
    # the report a later up-to-date run reprints, then the stamp: both whole or not at all
    write_text_atomic(layout.evaluation / REPORT_NAME, format_report(result.frames))
    write_text_atomic(stamp, json.dumps({"fingerprint": fp, "run_id": result.run_id,
                                         "notes": result.notes, "seconds": result.seconds},
                                        indent=1))
    log.info(f"[reduce] {summary['checkpoints_complete']} checkpoints, {len(result.tables)} "
             f"tables, {len(result.figures)} figures in {result.seconds:.1f}s")
    return result
