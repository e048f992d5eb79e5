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
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from circuitray.config import to_dict
from circuitray.errors import CircuitrayError, MetricError, StaleResultError
from circuitray.job_config import JobConfig, ReduceConfig
from circuitray.runtime.layout import JobLayout, safe_name
from circuitray.runtime.plan import (
    JobPlan,
    domains_frame,
    is_final,
    manifest_rows,
    plan_job,
    read_failures,
)
from circuitray.tables import read_parquet, write_parquet_atomic

KEYS = ["task", "checkpoint", "domain"]
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
    which checkpoints failed, the manifest (its annotations become columns), and the reduce
    and tracking settings. Equal hashes mean equal tables."""
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
                         "circuitray": circuitray.__version__}, sort_keys=True).encode())
    return h.hexdigest()


_PARTS = ("depth", "shift", "baselines", "detectors", "accuracy")


def read_checkpoint_files(layout: JobLayout, task: str, cid: str,
                          files: Sequence[tuple[str, str, str]], which: str) -> pa.Table:
    """One checkpoint's planned `which` ("edges" | "outputs") files, each parsed from bytes
    whose checksum matches its marker: other domains' files in the folder are never read."""
    from circuitray.runtime.files import read_verified

    path = layout.edges_file if which == "edges" else layout.outputs_file
    index = 1 if which == "edges" else 2
    return pa.concat_tables([read_verified(path(task, cid, f[0]), f[index]) for f in files],
                            promote_options="default")


def checkpoint_metrics(root: str, task: str, cid: str, id_domain: str,
                       files: Sequence[tuple[str, str, str]], r: ReduceConfig,
                       threads: int = 1) -> dict[str, pd.DataFrame]:
    """Depth metrics, CSS, baselines, detectors and accuracy of ONE checkpoint's files.

    `files` lists its planned domains as (domain, edges checksum, outputs checksum). Pure
    (files in, frames out), so it runs inline or as a Ray task next to the data.
    """
    from threadpoolctl import threadpool_limits

    from circuitray.baselines import domain_accuracy, pre_deployment_baselines, shift_detectors
    from circuitray.metrics.depth import depth_metrics
    from circuitray.metrics.shift import shift_scores

    layout = JobLayout.of(root)
    out: dict[str, pd.DataFrame] = {}
    with threadpool_limits(threads):
        n_domains = len(files)
        edges = read_checkpoint_files(layout, task, cid, files, "edges")
        out["depth"] = depth_metrics(edges, taus=tuple(r.taus), targets=tuple(r.targets))
        if n_domains > 1:
            out["shift"] = shift_scores(edges, id_domain=id_domain,
                                        variants=list(r.css_variants), top_n=r.top_n)
        outputs = read_checkpoint_files(layout, task, cid, files, "outputs").to_pandas()
        out["accuracy"] = domain_accuracy(outputs)
        out["baselines"] = pre_deployment_baselines(outputs, id_domain=id_domain)
        if n_domains > 1:
            out["detectors"] = shift_detectors(outputs, id_domain=id_domain, seed=r.seed)
    return out


def _per_checkpoint(layout: JobLayout, domains: pd.DataFrame, cfg: JobConfig
                    ) -> dict[str, pd.DataFrame]:
    """`checkpoint_metrics` for every complete checkpoint: as Ray tasks when a Ray is up
    (the pipeline's, or a cluster's), else inline; memory stays one checkpoint per worker."""
    import ray

    args = []
    for (task, cid), doms in domains.groupby(["task", "checkpoint"], sort=True):
        id_domain = doms.loc[doms.role == "id", "domain"].iloc[0]
        files = list(doms[["domain", "edges_checksum", "outputs_checksum"]]
                     .itertuples(index=False, name=None))
        args.append((str(layout.root), task, cid, id_domain, files, cfg.reduce))
    results: list[dict[str, pd.DataFrame]] = []
    if ray.is_initialized() and len(args) > 1:
        from circuitray.runtime.ray_utils import iter_completed

        task_fn = ray.remote(num_cpus=1, max_retries=cfg.resources.max_retries)(
            checkpoint_metrics)
        refs = [task_fn.remote(*a) for a in args]
        results = [res for _, res in iter_completed(refs, "reduce metrics")]
    else:
        start = time.monotonic()
        for i, a in enumerate(args, 1):
            results.append(checkpoint_metrics(*a))
            if i % 25 == 0 or i == len(args):
                print(f"[reduce] metrics {i}/{len(args)} checkpoints, "
                      f"{time.monotonic() - start:.0f}s", file=sys.stderr, flush=True)
    return {k: pd.concat([res[k] for res in results if k in res], ignore_index=True)
            if any(k in res for res in results) else pd.DataFrame() for k in _PARTS}


def _numeric_metrics(frame: pd.DataFrame, exclude: set[str]) -> list[str]:
    """Columns evaluation knows a direction for (unknown columns are left out, not guessed)."""
    from circuitray.evaluation import direction

    out = []
    for col in frame.columns:
        if (col in exclude or col.endswith(("_lo", "_hi"))
                or not pd.api.types.is_numeric_dtype(frame[col])
                or pd.api.types.is_bool_dtype(frame[col])):
            continue
        try:
            direction(col)
        except MetricError:
            continue
        out.append(col)
    return out


def domain_frame(domains: pd.DataFrame, per: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (task, checkpoint, domain): role, accuracy, DDB/Λ, CSS and baselines."""
    frame = domains[KEYS + ["role", "kind", "severity", "n_examples"]].copy()
    for name in ("accuracy", "depth", "shift", "baselines", "detectors"):
        part = per.get(name)
        if part is None or part.empty:
            continue
        part = part.drop(columns=[c for c in ("method", "note", "n_blocks") if c in part])
        part = part.drop(columns=[c for c in part.columns
                                  if c in frame.columns and c not in KEYS])
        frame = frame.merge(part, on=KEYS, how="left")
    return frame


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
    """Pre-deployment rows: one per final checkpoint × OOD domain, with id_acc and ood_acc.

    Several OOD domains become separate evaluation groups: `domain` is the OOD domain and
    `eval_group` the group's label (`group_labels`); `task` is never rewritten.
    """
    ids = frame[frame.role == "id"][["task", "checkpoint", "accuracy"]].rename(
        columns={"accuracy": "id_acc"})
    ood = frame[frame.role == "ood"].rename(columns={"accuracy": "ood_acc"})
    ood = ood.drop(columns=[c for c in ("id_acc",) if c in ood]).merge(
        ids, on=["task", "checkpoint"], how="left")
    ood["eval_group"] = group_labels(ood)
    hyper = _hyper(manifest).drop(columns=["task"], errors="ignore")
    hyper = hyper.drop(columns=[c for c in hyper.columns if c in ood and c != "checkpoint"])
    return ood.merge(hyper, on="checkpoint", how="left")


def _safe(fn: Any, notes: list[str], what: str) -> Any:
    try:
        return fn()
    except (CircuitrayError, ValueError, np.linalg.LinAlgError) as exc:
        notes.append(f"{what}: {exc}")
        print(f"[reduce] {what} skipped: {exc}", file=sys.stderr, flush=True)
        return None


def evaluate_all(frame: pd.DataFrame, models: pd.DataFrame, cfg: JobConfig,
                 notes: list[str]) -> dict[str, pd.DataFrame]:
    """The paper's protocol (DESIGN §5) over the domain and model frames."""
    from circuitray import evaluation as ev

    r = cfg.reduce
    kw = {"n_boot": r.n_boot, "seed": r.seed}
    keys = set(KEYS) | {"role", "kind", "severity", "n_examples", "accuracy", "ood_acc",
                        "epoch", "final", "rho", "lr", "epochs", "seed"}
    # shift detectors compare a deployment domain with ID data: post-deployment only
    pre_metrics = [m for m in _numeric_metrics(models, keys)
                   if not m.startswith(("lam_", "css_", "bbsd_", "mmd"))]
    out: dict[str, pd.DataFrame] = {}
    if not models.empty:
        # several OOD domains: groups per (task, domain), and "all" still averages tasks
        by = ("task", "domain") if models.groupby("task")["domain"].nunique().gt(1).any() \
            else ("task",)
        pre = _safe(lambda: ev.pre_deployment(models, metrics=pre_metrics, target="ood_acc",
                                              by=by, **kw), notes, "pre-deployment evaluation")
        if pre is not None:
            out["pre_deployment"] = pre
        if r.group_column and r.group_column in models:
            wg = _safe(lambda: ev.within_group(models, metrics=pre_metrics, target="ood_acc",
                                               group_col=r.group_column, by=by, **kw),
                       notes, "within-group evaluation")
            if wg is not None:
                out["within_group"] = wg
        circuit = [m for m in pre_metrics if ev.is_circuit_metric(m)]
        base = [m for m in pre_metrics if not ev.is_circuit_metric(m)]
        if circuit and base:
            pc = _safe(lambda: ev.partial_correlations(models, circuit_metrics=circuit,
                                                       baselines=base, target="ood_acc", by=by,
                                                       **kw),
                       notes, "partial correlations")
            if pc is not None:
                out["partial"] = pc
    shift = frame[frame.role == "shift"]
    proxy = frame[frame.role == "proxy"]
    post_metrics = [m for m in _numeric_metrics(shift, keys | {"id_acc"})
                    if not m.startswith(("lam_", "ddb_"))]
    if not shift.empty and post_metrics:
        post = _safe(lambda: ev.post_deployment(shift, metrics=post_metrics, target="accuracy",
                                                **kw), notes, "post-deployment evaluation")
        if post is not None:
            out["post_deployment"] = post
        if not proxy.empty:
            alarm = _safe(lambda: ev.silent_failure_alarm(shift, proxy, metrics=post_metrics,
                                                          deltas=list(r.deltas)),
                          notes, "silent-failure alarm")
            if alarm is not None:
                out["alarm"] = alarm
    if out:
        out["results"] = ev.result_table(out.get("pre_deployment"), out.get("post_deployment"),
                                         out.get("alarm"))
    return out


def motifs(models: pd.DataFrame, notes: list[str]) -> dict[str, Any]:
    """Per-task CCA motifs of vec(Λ) against OOD accuracy, and the universal motif.

    A task with too few models is noted and left out rather than failing the job.
    """
    from circuitray.metrics.motifs import cca_motif, universal_motif

    lam_cols = [c for c in models.columns if c.startswith("lam_")]
    if models.empty or not lam_cols:
        return {}
    d = int(round(len(lam_cols) ** 0.5))
    names = [f"lam_{i}_{j}" for i in range(d) for j in range(d)]
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


def figures(layout: JobLayout, frame: pd.DataFrame, models: pd.DataFrame,
            evals: Mapping[str, pd.DataFrame], cfg: JobConfig, manifest: pd.DataFrame,
            motif: Mapping[str, Any], notes: list[str]) -> list[Path]:
    """Every figure DESIGN §6 asks for that the data at hand supports.

    `frame` holds all domains of final checkpoints and ID/OOD rows of intermediate ones;
    `models` one row per final checkpoint (× OOD domain). Per-group figures are named by
    the group's label (`group_labels`); file paths use the real task.
    """
    from circuitray import plots

    fig_dir = layout.figures
    paths: list[Path] = []
    tau = 0.3 if 0.3 in cfg.reduce.taus else cfg.reduce.taus[0]  # the paper's τ if computed
    ddb = f"ddb_out_{tau:g}"
    final = models
    results = evals.get("results")
    best = []
    if results is not None and "kind" in results:  # sorted by pre-deployment composite
        best = [m for m in results[results.kind == "baseline"].metric if m in final][:3]
    final = final.assign(eval_group=group_labels(final)) if not final.empty else final
    for task, part in (final.groupby("eval_group") if ddb in final else []):
        # tasks are never pooled: the sign of DDB depends on where the spurious cue lives
        paths.append(plots.scatter_panels(part, [ddb, *best], "ood_acc",
                                          fig_dir / f"ood_vs_ddb_{safe_name(task)}.png",
                                          title=f"{task}: OOD accuracy vs DDB_out (τ={tau:g}) "
                                                "and the best output-based baselines"))
    lam_cols = [c for c in models.columns if c.startswith("lam_")]
    if lam_cols and not final.empty:
        d = int(round(len(lam_cols) ** 0.5))
        names = [f"lam_{i}_{j}" for i in range(d) for j in range(d)]
        for task, part in final.groupby("eval_group"):
            mean = np.nanmean(part[names].to_numpy(float), axis=0).reshape(d, d)
            paths.append(plots.heatmap(mean, fig_dir / f"lambda_{safe_name(task)}.png",
                                       title=f"mean Λ on OOD data, {task}"))
    for name, mat in (motif.get("task_motifs") or {}).items():
        paths.append(plots.heatmap(np.asarray(mat), fig_dir / f"motif_{safe_name(name)}.png",
                                   title=f"CCA motif, {name}", diverging=True))
    if motif.get("universal") is not None:
        paths.append(plots.heatmap(np.asarray(motif["universal"]),
                                   fig_dir / "motif_universal.png",
                                   title="universal motif", diverging=True))
    shift = frame[frame.role == "shift"]
    css = [c for c in shift.columns if c.startswith("css_")]
    if not shift.empty and css:
        paths.append(plots.scatter_panels(shift, css, "accuracy", fig_dir / "css_vs_acc.png",
                                          hue="checkpoint", y_label="domain accuracy",
                                          title="post-deployment: CSS vs domain accuracy "
                                                "(statistics pooled over models; per-model "
                                                "ones in evaluation/post_deployment)"))
        proxy = frame[frame.role == "proxy"]
        metric = "css_srcc" if "css_srcc" in css else css[0]
        if not proxy.empty:
            from circuitray.evaluation import calibrate_threshold

            first = shift.checkpoint.iloc[0]
            p = proxy[proxy.checkpoint == first]
            delta = cfg.reduce.deltas[len(cfg.reduce.deltas) // 2]
            thr = calibrate_threshold(p[metric], p["accuracy"], delta)
            paths.append(plots.alarm_plot(p, shift[shift.checkpoint == first], metric,
                                          fig_dir / "alarm.png", delta=delta, threshold=thr,
                                          title=f"alarm on {metric}, {first}"))
    inter = frame[(frame.role == "ood")].merge(
        _hyper(manifest)[[c for c in ("checkpoint", "epoch", "parent_id")
                          if c in _hyper(manifest)]], on="checkpoint", how="left")
    if {"epoch", "parent_id"} <= set(inter.columns) and ddb in inter and \
            inter.groupby("parent_id").size().gt(1).any():
        inter = inter.assign(eval_group=group_labels(inter))
        for task, part in inter.dropna(subset=["epoch"]).groupby("eval_group"):
            paths.append(plots.trajectories(
                part, "epoch", ddb, "parent_id",
                fig_dir / f"ddb_over_training_{safe_name(task)}.png",
                title=f"{task}: DDB_out (τ={tau:g}) on OOD data over training, one line per run"))
    if not final.empty:
        task, cid, dom = final.iloc[0][["task", "checkpoint", "domain"]]
        edges = read_parquet(layout.edges_file(task, cid, dom)).to_pandas()
        paths.append(plots.circuit_drawing(edges, fig_dir / "circuit.png", top_n=40,
                                           title=f"circuit of {cid} on {dom} (top 40 edges)"))
    return paths


def _headline(evals: Mapping[str, pd.DataFrame]) -> dict[str, float]:
    """Every numeric cell of the side-by-side result table, as metric.<column>."""
    res = evals.get("results")
    if res is None or res.empty:
        return {}
    out = {}
    for _, row in res.iterrows():
        for col, val in row.items():
            if col != "metric" and isinstance(val, (int, float, np.floating)):
                out[f"{row['metric']}.{col}"] = float(val)
    return out


def _log_mlflow(cfg: JobConfig, layout: JobLayout, manifest: pd.DataFrame, frame: pd.DataFrame,
                models: pd.DataFrame, evals: Mapping[str, pd.DataFrame], result: ReduceResult,
                summary: Mapping[str, Any], markers: pd.DataFrame, finals: set[str]) -> str:
    """Parent run: config, headline metrics, tables and figures; a child per manifest row.

    `markers` are the marker rows of the reduced (complete) checkpoints."""
    from circuitray.tracking import ChildRun, default_tracking_uri, flatten, log_job

    uri = cfg.tracking.uri or default_tracking_uri(layout.root)
    per_ckpt = models.groupby("checkpoint").first() if not models.empty else pd.DataFrame()
    children = []
    metric_cols = [c for c in per_ckpt.columns if not c.startswith("lam_")
                   and pd.api.types.is_numeric_dtype(per_ckpt[c])]
    hyper = _hyper(manifest).set_index("checkpoint")
    # where each checkpoint's mean/std and labels came from (its completion marker)
    complete = set(markers.checkpoint)
    prep = (markers.reindex(columns=["checkpoint", "norm_source", "class_source"])
            .groupby("checkpoint").first())
    for cid, hp in hyper.iterrows():
        metrics = per_ckpt.loc[cid, metric_cols].to_dict() if cid in per_ckpt.index else {}
        post = frame[(frame.checkpoint == cid) & (frame.role == "shift")]
        for c in [c for c in post.columns if c.startswith("css_") or c == "accuracy"]:
            metrics[f"shift_mean.{c}"] = float(post[c].mean()) if len(post) else float("nan")
        status = "complete" if cid in complete else "failed or not run"
        tags = {"checkpoint": str(cid), "status": status, "final": str(cid in finals).lower()}
        if cid in prep.index:
            tags |= {k: str(v) for k, v in prep.loc[cid].items() if v is not None}
        children.append(ChildRun(str(cid), params=hp.to_dict(), metrics=metrics, tags=tags))
    artifacts = [(p, "tables/evaluation") for p in result.tables.values()
                 if p.parent == layout.evaluation]
    artifacts += [(p, "figures") for p in result.figures]
    artifacts += [(layout.root / "failures", "tables/failures")]
    params = flatten(to_dict(cfg))
    headline = {**_headline(evals), **{f"job.{k}": v for k, v in summary.items()}}
    return log_job(tracking_uri=uri, experiment=cfg.tracking.experiment,
                   artifact_root=layout.root / "mlartifacts",
                   run_name=cfg.tracking.run_name or cfg.name, params=params,
                   metrics=headline, artifacts=artifacts, children=children,
                   tags={"output_dir": str(layout.root)})


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


def run_reduce(cfg: JobConfig, *, force: bool = False) -> ReduceResult:
    """Compute metrics/ and evaluation/ tables, figures and the MLflow runs of a job."""
    start = time.perf_counter()
    layout = JobLayout.of(cfg.output_dir)
    stamp = layout.evaluation / "_reduce.json"
    plan = plan_job(cfg, validate_images=False)
    failed = set(read_failures(layout).checkpoint) & {c.checkpoint for c in plan.todo}
    check_ready(plan, failed)
    fp = fingerprint(plan, cfg, failed)
    if not force and stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fp:
        print("[reduce] up to date: inputs and config unchanged, nothing recomputed",
              file=sys.stderr, flush=True)
        return ReduceResult(skipped=True, run_id=json.loads(stamp.read_text()).get("run_id"))
    domains = domains_frame(plan)
    if domains.empty:
        raise CircuitrayError(f"{layout.root}: no completed checkpoints to reduce "
                              "(run discover first)")
    manifest = pd.DataFrame(manifest_rows(dataclasses.replace(cfg, checkpoints=None)))
    finals = {r["checkpoint_id"] for r in manifest.to_dict("records") if is_final(r)}
    result = ReduceResult(skipped=False)
    per = _per_checkpoint(layout, domains, cfg)
    frame = domain_frame(domains, per)
    all_models = _model_frame(frame, manifest)
    models = all_models[all_models.checkpoint.isin(finals)].reset_index(drop=True)
    frame = frame[frame.checkpoint.isin(finals) | frame.role.isin(["id", "ood"])]
    for name, df in per.items():
        if not df.empty:
            result.tables[name] = write_parquet_atomic(df, layout.metrics / f"{name}.parquet")
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
    if cfg.reduce.figures:
        result.figures = _safe(lambda: figures(layout, frame, models, evals, cfg, manifest,
                                               motif, result.notes),
                               result.notes, "figures") or []
    result.frames = {"domains": frame, "models": models, **evals}
    if isinstance(motif.get("summary"), pd.DataFrame):
        result.frames["motif_summary"] = motif["summary"]
    failures = read_failures(layout)
    summary = {"checkpoints_complete": int(domains.checkpoint.nunique()),
               "checkpoints_failed": int(len(failures)),
               "domains": int(len(domains))}
    if cfg.tracking.enabled:
        result.run_id = _log_mlflow(cfg, layout, manifest, frame, all_models, evals, result,
                                    summary, domains, finals)
    result.seconds = time.perf_counter() - start
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"fingerprint": fp, "run_id": result.run_id,
                                 "notes": result.notes, "seconds": result.seconds}, indent=1))
    print(f"[reduce] {summary['checkpoints_complete']} checkpoints, {len(result.tables)} tables, "
          f"{len(result.figures)} figures in {result.seconds:.1f}s", file=sys.stderr, flush=True)
    return result
