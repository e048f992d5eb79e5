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
from circuitray.runtime.reduce import ReduceResult, run_reduce

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


def _stat_block(table: pd.DataFrame, title: str, paper: dict[str, float]) -> list[str]:
    head = (f"  {'metric':<22}{'R² (signed)':>22}{'SRCC':>22}{'KRCC':>22}{'composite':>22}"
            f"{'paper':>8}")
    lines = [title, head]
    for _, row in table.sort_values("composite", ascending=False,
                                    na_position="last").iterrows():
        ref = paper.get(row["metric"])
        lines.append(f"  {row['metric']:<22}" + "".join(
            f"{_cell(row, s):>22}" for s in ("r2_signed", "srcc", "krcc", "composite"))
            + (f"{ref:>8.3f}" if ref is not None else f"{'':>8}")
            + (f"  ({row['reason']})" if isinstance(row.get("reason"), str) and row["reason"]
               else ""))
    return lines


def _n(part: pd.DataFrame) -> int:
    return int(part["n"].max()) if "n" in part and len(part) else 0


def _task_order(table: pd.DataFrame) -> list[tuple[str, int, pd.DataFrame]]:
    """(label, checkpoints, rows) of each task — or each task × OOD domain, then the task's
    mean over its OOD domains — then the mean over tasks ("all") when there are several.

    "all" averages tasks, each once (evaluation.evaluate); its checkpoint count sums the
    tasks', so checkpoints seen on two OOD domains count once, not twice.
    """
    several = "domain" in table.columns
    tasks = sorted(t for t in table["task"].unique() if t != "all")
    out, total = [], 0
    for t in tasks:
        part = table[table["task"] == t]
        if not several:
            out.append((f"task {t}", _n(part), part))
            total += _n(part)
            continue
        groups = part[part["domain"] != "all"]
        for d, g in groups.groupby("domain", sort=True):
            out.append((f"task {t}, OOD domain {d}", _n(g), g))
        n_domains = groups["domain"].nunique()
        if n_domains > 1:
            out.append((f"task {t}, mean over its {n_domains} OOD domains", _n(groups),
                        part[part["domain"] == "all"]))
        total += _n(groups)
    if (table["task"] == "all").any() and len(tasks) > 1:
        out.append((f"mean over {len(tasks)} tasks, each once", total,
                    table[table["task"] == "all"]))
    return out


def format_report(frames: dict[str, pd.DataFrame]) -> str:
    """Each metric's R²/SRCC/KRCC/composite with 95% CIs per task, and alarm F1/AUROC, beside
    the paper's published composites (whatever our numbers say)."""
    from circuitray.evaluation import PAPER_RESULTS

    out: list[str] = []
    pre = frames.get("pre_deployment")
    if pre is not None and not pre.empty:
        for label, n, part in _task_order(pre):
            out += _stat_block(part, f"\nPRE-DEPLOYMENT: metric vs OOD accuracy across the zoo "
                                     f"({label}, n={n} checkpoints)", PAPER_RESULTS["pre"])
    post = frames.get("post_deployment")
    if post is not None and not post.empty:
        means = post[(post.level == "mean") & (post.checkpoint == "all")]
        for label, _, part in _task_order(means):
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
    if not out:
        return "no evaluation tables (too few checkpoints or domains); see evaluation/_reduce.json"
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
