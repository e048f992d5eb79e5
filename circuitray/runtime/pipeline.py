"""The whole job: discover then reduce, and the paper-style result table it prints.

Shared by `jobs/pipeline.py` (what `ray job submit` runs), `circuitray run` and
`circuitray demo`, so the three cannot drift apart.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import yaml

from circuitray.config import to_dict
from circuitray.job_config import JobConfig, load_job_config
from circuitray.runtime.discover import DiscoverSummary, run_discover
from circuitray.runtime.layout import JobLayout
from circuitray.runtime.reduce import NEAR_CHANCE, ReduceResult, run_reduce

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class PipelineResult:
    config: JobConfig
    discover: DiscoverSummary | None
    reduce: ReduceResult | None


def run_pipeline(cfg: JobConfig, *, force_reduce: bool = False) -> PipelineResult:
    """Run the configured stages; the resolved config is saved beside the tables."""
    layout = JobLayout.of(cfg.output_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    (layout.root / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    print(f"[circuitray] job '{cfg.name}': manifest {cfg.manifest} -> {layout.root}",
          file=sys.stderr, flush=True)
    disc = run_discover(cfg) if "discover" in cfg.stages else None
    red = run_reduce(cfg, force=force_reduce) if "reduce" in cfg.stages else None
    return PipelineResult(cfg, disc, red)


def main(argv: Sequence[str] | None = None) -> int:
    """`python jobs/pipeline.py conf/X.yaml [key=value ...] [--force-reduce]`."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", help="job config YAML (conf/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.limit=64")
    parser.add_argument("--force-reduce", action="store_true",
                        help="recompute the reduce stage even if its inputs are unchanged")
    args = parser.parse_intermixed_args(argv)
    cfg = load_job_config(args.config, args.overrides)
    result = run_pipeline(cfg, force_reduce=args.force_reduce)
    if result.reduce is not None and not result.reduce.skipped:
        print(format_report(result.reduce.frames))
    failed = result.discover.failed if result.discover else []
    print(f"[circuitray] done: tables under {cfg.output_dir}"
          + (f"; {len(failed)} checkpoint(s) failed, see failures/" if failed else ""))
    return 0


# ---------------------------------------------------------------- the paper-style table


def _cell(row: pd.Series, stat: str) -> str:
    v, lo, hi = row.get(stat), row.get(f"{stat}_lo"), row.get(f"{stat}_hi")
    if v is None or not np.isfinite(v):
        return "n/a"
    if lo is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{v:+.3f}"
    return f"{v:+.3f} [{lo:+.2f},{hi:+.2f}]"


def _count(row: pd.Series) -> str:
    n = row.get("n")
    return f"{int(n)}" if n is not None and np.isfinite(n) else "-"


def _stat_block(table: pd.DataFrame, title: str, paper: dict[str, float]) -> list[str]:
    """One line per metric: its statistics, n (the points that entered them) and the paper's
    composite; a metric whose n is below the others' lost points to NaN (see `reason`)."""
    head = (f"  {'metric':<22}{'n':>5}{'R² (signed)':>22}{'SRCC':>22}{'KRCC':>22}"
            f"{'composite':>22}{'paper':>8}")
    lines = [title, head]
    for _, row in table.sort_values("composite", ascending=False,
                                    na_position="last").iterrows():
        ref = paper.get(row["metric"])
        lines.append(f"  {row['metric']:<22}{_count(row):>5}" + "".join(
            f"{_cell(row, s):>22}" for s in ("r2_signed", "srcc", "krcc", "composite"))
            + (f"{ref:>8.3f}" if ref is not None else f"{'':>8}")
            + (f"  ({row['reason']})" if isinstance(row.get("reason"), str) and row["reason"]
               else ""))
    return lines


def _task_order(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Each task, then the mean over tasks ("all") only when there are several."""
    groups = dict(list(table.groupby("task", sort=True)))
    tasks = [t for t in groups if t != "all"]
    return [(t, groups[t]) for t in tasks] + (
        [("all", groups["all"])] if "all" in groups and len(tasks) > 1 else [])


_MAX_LISTED = 20


def _listing(names: Sequence[str]) -> str:
    more = len(names) - _MAX_LISTED
    return ", ".join(names[:_MAX_LISTED]) + (f", … and {more} more" if more > 0 else "")


def _warnings(frames: dict[str, pd.DataFrame]) -> list[str]:
    """What a reader must know before trusting any number below: near-chance checkpoints
    (their proxies say little) and metrics reduce could not compute (NaN in the tables)."""
    out = []
    models = frames.get("models")
    if models is not None and "near_chance" in models and models["near_chance"].any():
        near = models[models["near_chance"]].drop_duplicates("checkpoint")
        names = [f"{r.checkpoint} ({r.id_acc:.3f})" for r in near.itertuples()]
        out.append(f"WARNING: {len(names)} checkpoint(s) with ID accuracy within "
                   f"{NEAR_CHANCE:g} of chance (1/num_classes): {_listing(names)}")
    fails = frames.get("reduce_failures")
    if fails is not None and not fails.empty:
        out.append(f"WARNING: {len(fails)} metric failure(s) in {fails.checkpoint.nunique()} "
                   f"checkpoint(s), NaN with a reason in metrics/ (see failures/reduce/): "
                   f"{_listing(sorted(set(fails.checkpoint)))}")
    return out


def format_report(frames: dict[str, pd.DataFrame]) -> str:
    """Each metric's R²/SRCC/KRCC/composite with 95% CIs and n per task, and alarm F1/AUROC,
    beside the paper's published composites (whatever our numbers say); first the warnings
    (near-chance checkpoints, metrics that could not be computed), and the tasks too small to
    evaluate."""
    from circuitray.evaluation import PAPER_RESULTS

    out: list[str] = _warnings(frames)
    skipped = frames.get("skipped")
    if skipped is not None and not skipped.empty:
        for note in skipped["note"]:
            out.append(f"\nPRE-DEPLOYMENT: not evaluated (too few points): {note}")
    pre = frames.get("pre_deployment")
    if pre is not None and not pre.empty:
        for task, part in _task_order(pre):
            n = int(part["n"].max()) if "n" in part else 0
            label = "mean over tasks" if task == "all" else f"task {task}"
            out += _stat_block(part, f"\nPRE-DEPLOYMENT: metric vs OOD accuracy across the zoo "
                                     f"({label}, n={n} checkpoints)", PAPER_RESULTS["pre"])
    post = frames.get("post_deployment")
    if post is not None and not post.empty:
        means = post[(post.level == "mean") & (post.checkpoint == "all")]
        for task, part in _task_order(means):
            label = "mean over tasks" if task == "all" else f"task {task}"
            out += _stat_block(part, f"\nPOST-DEPLOYMENT: metric vs shifted-domain accuracy, per "
                                     f"model then averaged ({label})", PAPER_RESULTS["post"])
    alarm = frames.get("alarm")
    if alarm is not None and not alarm.empty:
        out.append("\nSILENT-FAILURE ALARM (δ' calibrated on proxy corruptions, mean over δ)")
        out.append(f"  {'task':<26}{'metric':<22}{'F1':>8}{'AUROC':>8}"
                   f"{'failing domains (summed over δ)':>33}")
        mean = alarm[alarm.level == "mean"].sort_values(["task", "f1"], ascending=[True, False])
        for _, row in mean.iterrows():
            f1 = f"{row['f1']:.3f}" if np.isfinite(row["f1"]) else "n/a"
            au = f"{row['auroc']:.3f}" if np.isfinite(row["auroc"]) else "n/a"
            out.append(f"  {row['task']:<26}{row['metric']:<22}{f1:>8}{au:>8}"
                       f"{int(row['n_fail']):>33}")
        out.append("  paper: CSS alarm F1 about 45% above the best output-based baseline")
    motif = frames.get("motif_summary")
    if motif is not None and not motif.empty:
        out.append("\nGENERALIZATION MOTIFS (regularized CCA of vec(Λ) vs OOD accuracy)")
        out.append(f"  {'task':<26}{'models':>8}{'canonical r':>13}{'held-out r':>12}{'reg':>6}")
        for _, row in motif.iterrows():
            out.append(f"  {row['task']:<26}{int(row['n_models']):>8}"
                       f"{row['canonical_corr']:>13.3f}{row['heldout_corr']:>12.3f}"
                       f"{row['reg']:>6.2f}")
    if not any(line.startswith("\n") for line in out):
        out.append("no evaluation tables (too few checkpoints or domains); see "
                   "evaluation/_reduce.json")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
