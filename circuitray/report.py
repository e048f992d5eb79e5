"""The paper-style text report: per task, each metric's statistics with 95% intervals and n
beside the paper's published composites (and each circuit metric's partial SRCC given the
task's best output-based baseline), the within-regime correlations and the DDB-over-training
figures, after the warnings a reader needs first.

Pure (tables in, text out): reduce writes it to evaluation/report.txt, and the CLI prints it,
so a re-run that finds reduce up to date prints the very same report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from circuitray.evaluation import MIN_PER_GROUP, NEAR_CHANCE, PAPER_RESULTS
from circuitray.registry import ordered


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


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _partial_note(table: pd.DataFrame) -> list[str]:
    """What the partial column conditions on, when the block has one (group rows only)."""
    if "partial_given" not in table:
        return []
    given = [g for g in dict.fromkeys(table["partial_given"]) if isinstance(g, str) and g]
    if not given:
        return []
    return [f"  partial SRCC: each circuit metric vs OOD accuracy given {', '.join(given)} "
            "(the output-based baseline with the highest SRCC here): > 0 means the circuit "
            "adds information beyond the outputs"]


def _stat_block(table: pd.DataFrame, title: str, paper: dict[str, float]) -> list[str]:
    """One line per metric, in registry order (circuit metrics, then output-based, then
    shift detectors; `registry.ordered`) so every task's block reads the same way and no
    order is chosen after seeing the numbers: its statistics, n (the points that entered
    them), the paper's composite and, for a circuit metric in a per-task block, its partial
    SRCC given the task's best output-based baseline; a metric whose n is below the others'
    lost points to NaN (see `reason`)."""
    partial = _partial_note(table)
    head = (f"  {'metric':<22}{'n':>5}{'R² (signed)':>22}{'SRCC':>22}{'KRCC':>22}"
            f"{'composite':>22}{'paper':>8}" + (f"{'partial SRCC':>22}" if partial else ""))
    lines = [title, *partial, head]
    rank = {m: i for i, m in enumerate(ordered(dict.fromkeys(table["metric"])))}
    for _, row in table.sort_values("metric", key=lambda m: m.map(rank),
                                    kind="stable").iterrows():
        ref = paper.get(row["metric"])
        given = bool(partial) and _text(row.get("partial_given")) != ""
        why = [r for r in (_text(row.get("reason")),
                           f"partial: {_text(row.get('partial_reason'))}"
                           if given and _text(row.get("partial_reason")) else "") if r]
        line = (f"  {row['metric']:<22}{_count(row):>5}" + "".join(
            f"{_cell(row, s):>22}" for s in ("r2_signed", "srcc", "krcc", "composite"))
            + (f"{ref:>8.3f}" if ref is not None else f"{'':>8}")
            + (f"{_cell(row, 'partial_srcc') if given else '':>22}" if partial else "")
            + (f"  ({'; '.join(why)})" if why else ""))
        lines.append(line.rstrip())
    return lines


def _within_blocks(table: pd.DataFrame) -> list[str]:
    """Per task (× OOD domain): each metric's SRCC with its interval within every setting
    (e.g. fine-tuning regime) with at least MIN_PER_GROUP models, and their mean; the
    settings with fewer models are listed as skipped with their n."""
    column = str(table["group_column"].iloc[0])
    keys = [c for c in ("task", "domain") if c in table]
    groups = table[(table.level == "group")]
    groups = groups.assign(group=groups["group"].astype(str))  # a model without one: "nan"
    means = table[(table.level == "mean")]
    out = []
    for key, part in groups.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        label = ", ".join(f"{k} {v}" for k, v in zip(keys, key, strict=True))
        size = part.groupby("group", sort=True)["n"].max()
        kept = [g for g, n in size.items() if n >= MIN_PER_GROUP]
        mean = means[np.logical_and.reduce([means[k] == v for k, v in zip(keys, key,
                                                                           strict=True)])]
        out.append(f"\nWITHIN-{column.upper()}: SRCC of each metric vs OOD accuracy among the "
                   f"models of one {column} ({label}), then the mean over {column}s")
        if kept:
            cols = [f"{g} (n={int(size[g])})" for g in kept]
            out.append(f"  {'metric':<22}" + "".join(f"{c:>22}" for c in cols)
                       + f"{f'mean over {len(kept)}':>22}")
            rank = {m: i for i, m in enumerate(ordered(dict.fromkeys(part["metric"])))}
            for m in sorted(rank, key=rank.get):
                cells = [_cell(part[(part.group == g) & (part.metric == m)].iloc[0], "srcc")
                         for g in kept]
                avg = mean[mean.metric == m]
                cells.append(_cell(avg.iloc[0], "srcc") if len(avg) else "n/a")
                out.append(f"  {m:<22}" + "".join(f"{c:>22}" for c in cells))
        skipped = [f"{g} (n={int(n)})" for g, n in size.items() if n < MIN_PER_GROUP]
        if skipped:
            out.append(f"  skipped (fewer than {MIN_PER_GROUP} models): {', '.join(skipped)}")
    return out


def _training_block(table: pd.DataFrame) -> list[str]:
    """Which runs each DDB-over-training figure shows (best and worst final OOD accuracy),
    and where it is; the groups without a run of >= 2 checkpoints, with the reason."""
    out = ["\nDDB OVER TRAINING (OOD accuracy on a second axis; runs with the best and the "
           "worst final OOD accuracy)"]
    for _, row in table.sort_values("group", kind="stable").iterrows():
        if row["n_runs"] < 1:
            out.append(f"  {row['group']}: skipped ({row['note']})")
            continue
        where = row["figure"] if isinstance(row.get("figure"), str) and row["figure"] else \
            "figure not drawn (reduce.figures off, or see the notes)"
        out.append(f"  {row['group']}: best {row['best_run']} ({row['best_final_acc']:.3f}), "
                   f"worst {row['worst_run']} ({row['worst_final_acc']:.3f}) of "
                   f"{int(row['n_runs'])} runs, {row['metric']}: {where}")
    return out


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
    """Each metric's R²/SRCC/KRCC/composite with 95% CIs and n per task (and each circuit
    metric's partial SRCC given the task's best output-based baseline), the within-regime
    SRCCs, the DDB-over-training figures, and alarm F1/AUROC
    (metrics in registry order, the same in every block),
    beside the paper's published composites (whatever our numbers say); first the warnings
    (near-chance checkpoints, metrics that could not be computed), and the tasks too small to
    evaluate."""
    out: list[str] = _warnings(frames)
    skipped = frames.get("skipped")
    if skipped is not None and not skipped.empty:
        for note in skipped["note"]:
            out.append(f"\nPRE-DEPLOYMENT: not evaluated (too few points): {note}")
    pre = frames.get("pre_deployment")
    if pre is not None and not pre.empty:
        for label, n, part in _task_order(pre):
            out += _stat_block(part, f"\nPRE-DEPLOYMENT: metric vs OOD accuracy across the zoo "
                                     f"({label}, n={n} checkpoints)", PAPER_RESULTS["pre"])
    within = frames.get("within_group")
    if within is not None and not within.empty and "group_column" in within:
        out += _within_blocks(within)
    runs = frames.get("ddb_over_training")
    if runs is not None and not runs.empty:
        out += _training_block(runs)
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
        mean = alarm[alarm.level == "mean"]
        rank = {m: i for i, m in enumerate(ordered(dict.fromkeys(mean["metric"])))}
        mean = mean.assign(_rank=mean["metric"].map(rank)).sort_values(
            ["task", "_rank"], kind="stable")
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
