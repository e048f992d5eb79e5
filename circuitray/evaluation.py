"""The paper's evaluation protocol (DESIGN §5), stricter: fixed directions, signed R², CIs.

Each metric's expected direction is fixed in advance in `circuitray.registry` (an unknown
metric is an error, never a guess); `direction` is re-exported here.

Every metric — circuit-based or output-based — goes through the same functions, so the one
result table compares like with like. Statistics on a zoo of 16–100 models are noisy, so each
comes with a seeded 95% bootstrap interval; a zoo too small for a statistic yields NaN and a
`reason`, never a number that looks meaningful.

Bootstrap replicates are represented as multinomial count vectors W [B, n] over the original
points: Pearson, Spearman (ranks with ties from W) and Kendall τ_b (½ wᵀQw with
Q_ij = sign(x_i−x_j)·sign(y_i−y_j)) are then matrix algebra over all replicates at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from circuitray import registry
from circuitray.errors import MetricError
from circuitray.registry import direction, is_circuit
from circuitray.tables import require_columns

# The paper's composite scores (R², SRCC, KRCC averaged), for printing beside ours.
PAPER_RESULTS: dict[str, dict[str, float]] = {
    "pre": {"ddb_out_0.3": 0.766, "id_acc": 0.632, "ac": 0.585, "atc_mc": 0.520},
    "post": {"css_srcc": 0.811, "atc_mc": 0.470, "ac": 0.391},
}
STATS = ("r", "r2_signed", "srcc", "krcc", "composite")
DEFAULT_DELTAS = (0.8, 0.825, 0.85, 0.875, 0.9)


def is_circuit_metric(metric: str) -> bool:
    """Computed from circuits (the registry's kind "circuit"), not from the outputs."""
    return is_circuit(metric)


# ---- weighted (bootstrap) statistics ---------------------------------------------------------

def _wcorr(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Pearson correlation of rows of a, b [B, n] (or [n]) under count weights w [B, n]."""
    sw = w.sum(axis=1, keepdims=True)
    da = a - (w * a).sum(axis=1, keepdims=True) / sw
    db = b - (w * b).sum(axis=1, keepdims=True) / sw
    cov = (w * da * db).sum(axis=1)
    den = np.sqrt((w * da * da).sum(axis=1) * (w * db * db).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-12 * np.maximum(1.0, np.abs(cov)), cov / den, np.nan)


def _wranks(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average ranks of x inside each resample described by count weights w [B, n]."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.concatenate([[0], np.flatnonzero(xs[1:] != xs[:-1]) + 1])
    group = np.cumsum(np.isin(np.arange(len(x)), starts)) - 1
    g = np.add.reduceat(w[:, order], starts, axis=1)
    rank_of_group = np.cumsum(g, axis=1) - g + (g + 1) / 2
    ranks = np.empty_like(w, dtype=np.float64)
    ranks[:, order] = rank_of_group[:, group]
    return ranks


def _wkendall(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Kendall τ_b of each resample: (C − D) / sqrt((n0 − n1)(n0 − n2))."""
    n = w.sum(axis=1)
    dt = np.float32 if len(x) < 4096 else np.float64  # integer sums stay exact in float32
    wd = w.astype(dt)
    q = (np.sign(x[:, None] - x[None, :]) * np.sign(y[:, None] - y[None, :])).astype(dt)
    s = ((wd @ q) * wd).sum(axis=1, dtype=np.float64) / 2

    def tied_pairs(v: np.ndarray) -> np.ndarray:
        if len(np.unique(v)) == len(v):
            return ((w * w).sum(axis=1) - n) / 2
        t = (v[:, None] == v[None, :]).astype(dt)
        return (((wd @ t) * wd).sum(axis=1, dtype=np.float64) - n) / 2

    n0 = n * (n - 1) / 2
    den = np.sqrt((n0 - tied_pairs(x)) * (n0 - tied_pairs(y)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, s / den, np.nan)


def _replicates(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """[B, 5]: r, sign(r)·r², SRCC, KRCC, composite for each weight row (x already oriented)."""
    r = _wcorr(np.broadcast_to(x, w.shape), np.broadcast_to(y, w.shape), w)
    srcc = _wcorr(_wranks(x, w), _wranks(y, w), w)
    krcc = _wkendall(x, y, w)
    r2 = np.sign(r) * r * r
    comp = (r2 + srcc + krcc) / 3
    return np.stack([r, r2, srcc, krcc, comp], axis=1)


def _weights(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Row 0: the sample itself; rows 1..B: bootstrap resamples as multinomial counts."""
    boot = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    return np.vstack([np.ones((1, n)), boot])


def correlation_stats(x: Sequence[float], y: Sequence[float], *, metric_direction: int = 1,
                      n_boot: int = 1000, seed: int = 0, ci: float = 0.95, min_n: int = 4
                      ) -> dict[str, float | str]:
    """Oriented r, sign(r)·R², SRCC, KRCC and composite between a metric and accuracy, each
    with a percentile bootstrap interval (keys `<stat>`, `<stat>_lo`, `<stat>_hi`), plus `n`
    and `reason` (non-empty exactly when the statistics are NaN or points were dropped)."""
    out, _ = _stats_with_replicates(np.asarray(x, float), np.asarray(y, float),
                                    metric_direction, n_boot,
                                    np.random.default_rng(seed), ci, min_n)
    return out


def _stats_with_replicates(x: np.ndarray, y: np.ndarray, sign: int, n_boot: int,
                           rng: np.random.Generator, ci: float, min_n: int
                           ) -> tuple[dict[str, float | str], np.ndarray | None]:
    ok = np.isfinite(x) & np.isfinite(y)
    reasons = [f"{(~ok).sum()} point(s) with NaN dropped"] if (~ok).any() else []
    x, y = sign * x[ok], y[ok]
    out: dict[str, float | str] = {"n": int(len(x))}
    if len(x) < min_n:
        reasons.append(f"too few points: n={len(x)} < {min_n}")
    elif np.ptp(x) == 0 or np.ptp(y) == 0:
        reasons.append("metric is constant" if np.ptp(x) == 0 else "accuracy is constant")
    else:
        reasons.append("")  # computable: only the NaN note (if any) remains
    if reasons[-1]:
        for s in STATS:
            out[s] = out[f"{s}_lo"] = out[f"{s}_hi"] = np.nan
        out["reason"] = "; ".join(reasons)
        return out, None
    reasons.pop()
    reps = _replicates(x, y, _weights(len(x), n_boot, rng))
    lo, hi = np.nanpercentile(reps[1:], [50 * (1 - ci), 50 * (1 + ci)], axis=0)
    for i, s in enumerate(STATS):
        out[s], out[f"{s}_lo"], out[f"{s}_hi"] = reps[0, i], lo[i], hi[i]
    out["reason"] = "; ".join(reasons)
    return out, reps


# ---- table-level evaluation ------------------------------------------------------------------

def evaluate(frame: pd.DataFrame, *, metrics: Sequence[str], target: str,
             by: Sequence[str] = ("task",), average_by: Sequence[str] | None = (),
             resample: Literal["points", "groups"] = "points",
             n_boot: int = 1000, seed: int = 0, ci: float = 0.95, min_n: int = 4
             ) -> pd.DataFrame:
    """Statistics of every metric against `target` within each `by` group, then averaged.

    Returns long rows: the `by` columns, `metric`, `level` ("group" for one group, "mean" for
    averages), n / n_groups, each stat with _lo/_hi, and `reason`. Means: per `average_by`
    key over its groups, then "all" (every `by` column "all") = the mean over tasks (the
    first `average_by` column) of each task's mean over its keys, so a task counts once
    however many groups or keys it has; without `average_by`, "all" is the mean over the
    groups. A mean row's n is the rows behind it; n_groups the groups averaged, for "all"
    with `average_by` the tasks. See `_average` and `_mean_replicates` for the intervals.
    """
    by = list(by)
    require_columns(frame, [*by, target, *metrics], "evaluation frame")
    rows, reps = [], {}
    for gi, (key, grp) in enumerate(frame.groupby(by, sort=True, dropna=False)):
        key = key if isinstance(key, tuple) else (key,)
        y = grp[target].to_numpy(float)
        for mi, m in enumerate(metrics):
            rng = np.random.default_rng([seed, gi, mi])
            st, rep = _stats_with_replicates(grp[m].to_numpy(float), y, direction(m), n_boot,
                                             rng, ci, min_n)
            rows.append({**dict(zip(by, key, strict=True)), "metric": m, "level": "group",
                         "n_groups": 1, **st})
            reps[(key, m)] = rep
    table = pd.DataFrame(rows)
    if average_by is None:
        return table
    return pd.concat([table, _average(table, reps, by, list(average_by), ci, resample, seed)],
                     ignore_index=True)


def _nanmean0(stack: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN; NaN (no warning) where every entry is NaN."""
    ok = np.isfinite(stack)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, stack, 0.0).sum(axis=0) / ok.sum(axis=0)


def _mean_replicates(stack: np.ndarray, resample: str, rng: np.random.Generator | None
                     ) -> np.ndarray:
    """[B+1, stats] replicates of the mean over groups, from their [G, B+1, stats] ones.

    "points": average the groups' own replicates index by index (a stratified bootstrap:
    each group's points resampled, its statistic recomputed). "groups": the groups are the
    sampled units (models), so resample them and average their full-sample statistics;
    averaging their replicates instead carries each small group's bootstrap bias into a mean
    whose interval shrinks with the number of groups, and the estimate falls outside it.
    """
    if resample == "points" or len(stack) == 1:  # one model: only its own points vary
        return _nanmean0(stack)
    est = stack[:, 0, :]
    ok = np.isfinite(est)
    w = _weights(len(est), stack.shape[1] - 1, rng)  # [B+1, G]; row 0: the groups themselves
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w @ np.where(ok, est, 0.0)) / (w @ ok)


def _mean_row(label: dict, stacks: list[np.ndarray | None], n: int, resample: str,
              rng: np.random.Generator | None, ci: float, what: str
              ) -> tuple[dict, np.ndarray | None]:
    """One "mean" row over `stacks` (None: a group without a value) and its replicates."""
    good = [s for s in stacks if s is not None]
    row = label | {"level": "mean", "n_groups": len(good), "n": n}
    if not good:
        row |= {f"{s}{x}": np.nan for s in STATS for x in ("", "_lo", "_hi")}
        return row | {"reason": f"no {what} could be evaluated ({len(stacks)} tried)"}, None
    mean = _mean_replicates(np.stack(good), resample, rng)
    lo, hi = np.nanpercentile(mean[1:], [50 * (1 - ci), 50 * (1 + ci)], axis=0)
    for i, s in enumerate(STATS):
        row[s], row[f"{s}_lo"], row[f"{s}_hi"] = mean[0, i], lo[i], hi[i]
    skipped = len(stacks) - len(good)
    row["reason"] = f"{skipped} {what}(s) without a value left out" if skipped else ""
    return row, mean


def _average(table: pd.DataFrame, reps: dict, by: list[str], keep: list[str], ci: float,
             resample: str, seed: int) -> pd.DataFrame:
    """Mean rows per `keep` key, then "all": the mean over `keep[0]` (the task) of each
    task's mean over its keys, so a task with two OOD-domain keys still counts once (the
    replicates average index by index: tasks are disjoint strata). Without `keep`, "all" is
    the mean over the groups, resampled as `resample` says."""
    rows, per_key = [], {}
    metrics = list(dict.fromkeys(table["metric"]))
    keyed = table.groupby(keep, sort=True, dropna=False) if keep else [((), table)]
    for ki, (key, part) in enumerate(keyed):
        key = key if isinstance(key, tuple) else (key,)
        for mi, m in enumerate(metrics):
            grp = part[part.metric == m]
            stacks = [reps[(tuple(r[c] for c in by), m)] for _, r in grp.iterrows()]
            label = {c: "all" for c in by} | dict(zip(keep, key, strict=True)) | {"metric": m}
            row, rep = _mean_row(label, stacks, int(grp["n"].sum()), resample,
                                 np.random.default_rng([seed, ki, mi, 1]), ci, "group")
            rows.append(row)
            per_key.setdefault(m, {}).setdefault(key[0] if key else (), []).append(
                (rep, row["n"]))
    if keep:
        for m, tasks in per_key.items():
            stacks = []
            for parts in tasks.values():  # a task's keys: its mean when any has a value
                good = [p[0] for p in parts if p[0] is not None]
                stacks.append(_nanmean0(np.stack(good)) if good else None)
            n = sum(p[1] for parts in tasks.values() for p in parts)
            row, _ = _mean_row({c: "all" for c in by} | {"metric": m}, stacks, n, "points",
                               None, ci, keep[0])
            rows.append(row)
    return pd.DataFrame(rows)


MIN_CHECKPOINTS = 3  # below this a task's zoo supports no statistic at all: skip, say so
NEAR_CHANCE = 0.05  # ID accuracy less than this above 1/num_classes: the model learned ~nothing


def usable_checkpoints(frame: pd.DataFrame, *, metrics: Sequence[str], target: str,
                       by: str = "task", min_n: int = MIN_CHECKPOINTS) -> pd.DataFrame:
    """Per `by` group, how many checkpoints any statistic could use: a finite target and at
    least one finite metric. A checkpoint counts once however many rows it has; with several
    OOD domains (a `domain` column) a group is evaluated per domain, so its count is that of
    its poorest domain. Columns: `by`, n_usable, evaluate (n_usable ≥ min_n) and note
    ("task X: only n usable checkpoints (need 3)" for the groups to skip)."""
    require_columns(frame, [by, target, *metrics], "evaluation frame")
    target_ok = np.isfinite(frame[target].to_numpy(float))
    metric_ok = (np.isfinite(frame[list(metrics)].to_numpy(float)).any(axis=1) if len(metrics)
                 else np.zeros(len(frame), bool))
    usable = frame.assign(_usable=target_ok & metric_ok)
    if "checkpoint" not in usable:  # one row per checkpoint
        usable = usable.assign(checkpoint=np.arange(len(usable)))
    inner = [by, "domain"] if "domain" in usable and by != "domain" else [by]
    per = (usable[usable["_usable"]].groupby(inner)["checkpoint"].nunique()
           .reindex(usable.groupby(inner).size().index, fill_value=0))
    counts = per.groupby(level=0).min().astype(int) if len(inner) > 1 else per.astype(int)
    out = counts.rename("n_usable").reset_index()
    out["evaluate"] = out["n_usable"] >= min_n
    out["note"] = [
        "" if ok else f"{by} {key}: only {n} usable checkpoints (need {min_n})"
        for key, n, ok in zip(out[by], out["n_usable"], out["evaluate"], strict=True)]
    return out


def pre_deployment(frame: pd.DataFrame, *, metrics: Sequence[str], target: str = "ood_acc",
                   by: Sequence[str] = ("task",), **kw) -> pd.DataFrame:
    """Per task across the zoo (one row per checkpoint), then averaged over tasks.

    With several OOD domains pass by=("task", "domain"): each (task, OOD domain) is a group,
    averaged per task (domain "all"), and "all" is the mean over tasks of those means — the
    same checkpoints seen on two OOD domains make one task, not two. (The per-task mean's
    interval resamples each OOD domain's checkpoints independently although they are the
    same checkpoints, so it is somewhat narrower than a paired resample would give.)"""
    by = tuple(by)
    return evaluate(frame, metrics=metrics, target=target, by=by, average_by=by[:1] if
                    len(by) > 1 else (), **kw)


def post_deployment(frame: pd.DataFrame, *, metrics: Sequence[str], target: str = "accuracy",
                    **kw) -> pd.DataFrame:
    """Per model across its shifted domains (one row per checkpoint × domain), averaged over
    the task's models, then over tasks ("all": each task once). The means' intervals
    resample models: the reported mean of per-model statistics is what is bootstrapped."""
    return evaluate(frame, metrics=metrics, target=target, by=("task", "checkpoint"),
                    average_by=("task",), resample="groups", **kw)


MIN_PER_GROUP = 5  # within-group statistics need at least this many models per group


def within_group(frame: pd.DataFrame, *, metrics: Sequence[str], target: str, group_col: str,
                 by: Sequence[str] = ("task",), min_n: int = MIN_PER_GROUP, **kw
                 ) -> pd.DataFrame:
    """Correlations among models that share a setting (`group_col`: a training regime, a
    data setting), since a setting alone can drive a pooled correlation: a metric that only
    separates settings scores near zero here.

    Rows: each (`by` key, setting) with its statistics (level "group"; a setting with fewer
    than `min_n` models is NaN with a reason and its n), then their means per `by` key and
    over tasks (level "mean", `group` = "all"). The setting's value is in column `group`,
    the column's name in `group_column`, so the table reads the same whatever the column."""
    out = evaluate(frame, metrics=metrics, target=target, by=(*by, group_col),
                   average_by=tuple(by), min_n=min_n, **kw)
    out[group_col] = out[group_col].where(out.level == "group", "all")
    out = out.rename(columns={group_col: "group"})
    out.insert(out.columns.get_loc("group") + 1, "group_column", group_col)
    return out


def _partial_from_corrs(rxy: np.ndarray, rxz: np.ndarray, ryz: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        den = np.sqrt((1 - rxz**2) * (1 - ryz**2))
        return np.where(den > 1e-12, (rxy - rxz * ryz) / den, np.nan)


def _partial_replicates(x: np.ndarray, y: np.ndarray, z: np.ndarray, w: np.ndarray
                        ) -> np.ndarray:
    """Partial Spearman of x and y given z under each count-weight row of w [B, n]."""
    rx, ry, rz = _wranks(x, w), _wranks(y, w), _wranks(z, w)
    return _partial_from_corrs(_wcorr(rx, ry, w), _wcorr(rx, rz, w), _wcorr(ry, rz, w))


def partial_spearman(x: Sequence[float], y: Sequence[float], z: Sequence[float]) -> float:
    """Spearman correlation of x and y with z's (rank-linear) influence removed from both."""
    x, y, z = (np.asarray(v, float) for v in (x, y, z))
    return float(_partial_replicates(x, y, z, np.ones((1, len(x))))[0])


def _partial_stats(metric: np.ndarray, given: np.ndarray, y: np.ndarray, m_dir: int,
                   g_dir: int, n_boot: int, rng: np.random.Generator, ci: float, min_n: int
                   ) -> dict[str, float | str]:
    """Oriented partial SRCC of `metric` with `y` given `given`, its percentile interval,
    n and a reason (non-empty exactly when the value is NaN)."""
    sub = np.column_stack([metric, given, y])
    sub = sub[np.isfinite(sub).all(axis=1)]
    out: dict[str, float | str] = {"n": len(sub), "partial_srcc": np.nan,
                                   "partial_srcc_lo": np.nan, "partial_srcc_hi": np.nan}
    if len(sub) < min_n:
        return out | {"reason": f"too few points: n={len(sub)} < {min_n}"}
    if (np.ptp(sub, axis=0) == 0).any():
        return out | {"reason": "a constant column among metric, baseline and accuracy"}
    one = np.ones((1, len(sub)))
    if abs(_wcorr(_wranks(sub[:, 0], one), _wranks(sub[:, 1], one), one)[0]) > 1 - 1e-12:
        return out | {"reason": "the metric ranks the models exactly as the baseline does: "
                                "no information beyond it (partial undefined)"}
    p = _partial_replicates(m_dir * sub[:, 0], sub[:, 2], g_dir * sub[:, 1],
                            _weights(len(sub), n_boot, rng))
    lo, hi = np.nanpercentile(p[1:], [50 * (1 - ci), 50 * (1 + ci)])
    return out | {"partial_srcc": p[0], "partial_srcc_lo": lo, "partial_srcc_hi": hi,
                  "reason": ""}


def partial_correlations(frame: pd.DataFrame, *, circuit_metrics: Sequence[str],
                         baselines: Sequence[str], target: str, by: Sequence[str] = ("task",),
                         n_boot: int = 1000, seed: int = 0, ci: float = 0.95, min_n: int = 5
                         ) -> pd.DataFrame:
    """Oriented partial Spearman of each circuit metric with `target` given each baseline,
    with bootstrap intervals: does the circuit add information beyond the outputs?"""
    by = list(by)
    require_columns(frame, [*by, target, *circuit_metrics, *baselines], "evaluation frame")
    rows = []
    for gi, (key, grp) in enumerate(frame.groupby(by, sort=True)):
        key = key if isinstance(key, tuple) else (key,)
        y = grp[target].to_numpy(float)
        for mi, m in enumerate(circuit_metrics):
            for bi, b in enumerate(baselines):
                st = _partial_stats(grp[m].to_numpy(float), grp[b].to_numpy(float), y,
                                    direction(m), direction(b), n_boot,
                                    np.random.default_rng([seed, gi, mi, bi]), ci, min_n)
                rows.append({**dict(zip(by, key, strict=True)), "metric": m, "given": b, **st})
    return pd.DataFrame(rows)


def best_baseline(rows: pd.DataFrame) -> str | None:
    """The best output-based baseline among one group's pre-deployment rows: the highest
    oriented SRCC (ties: higher composite, then registry order), None if none is finite.

    SRCC, not the composite, because what is partialled out is the baseline's rank
    information: the baseline whose ranks track OOD accuracy best is the hardest one for a
    circuit metric to add to. Oriented (signed), because directions are fixed in advance:
    "best" is the one a user would pick, not a backwards proxy read the other way round."""
    out = rows[rows.metric.map(lambda m: registry.kind(m) == "output")
               & np.isfinite(rows["srcc"].to_numpy(float))]
    if out.empty:
        return None
    order = {m: i for i, m in enumerate(registry.ordered(list(out.metric)))}
    out = out.assign(_comp=out["composite"].fillna(-np.inf), _order=out.metric.map(order))
    return str(out.sort_values(["srcc", "_comp", "_order"], ascending=[False, False, True],
                               kind="stable").metric.iloc[0])


PARTIAL_COLUMNS = ("partial_given", "partial_srcc", "partial_srcc_lo", "partial_srcc_hi",
                   "partial_n", "partial_reason")


def with_partial_given_best(pre: pd.DataFrame, frame: pd.DataFrame, *, target: str,
                            by: Sequence[str] = ("task",), n_boot: int = 1000, seed: int = 0,
                            ci: float = 0.95, min_n: int = 5) -> pd.DataFrame:
    """`pre` (pre_deployment's table of `frame`) plus, on each group row of a circuit
    metric, its oriented partial SRCC with `target` given the group's best output-based
    baseline (`best_baseline`): PARTIAL_COLUMNS, empty/NaN on every other row.

    Bootstrap: a circuit metric's replicates resample the same models, with the same seed,
    as its own statistics in `pre` (identical whenever the baseline drops no extra NaN row),
    so its SRCC and partial SRCC intervals are paired. Mean rows carry no partial: each task
    conditions on its own baseline, and a mean over different baselines answers nothing."""
    by = list(by)
    out = pre.copy()
    out["partial_given"] = ""
    for c in PARTIAL_COLUMNS[1:-1]:
        out[c] = np.nan
    out["partial_reason"] = ""
    metric_index = {m: i for i, m in enumerate(dict.fromkeys(pre["metric"]))}
    groups = pre[pre.level == "group"]
    for gi, (key, grp) in enumerate(frame.groupby(by, sort=True, dropna=False)):
        key = key if isinstance(key, tuple) else (key,)
        mine = groups[np.logical_and.reduce([groups[c] == k for c, k in zip(by, key,
                                                                             strict=True)])]
        circuit = [m for m in mine.metric if is_circuit(m)]
        if not circuit:
            continue
        base = best_baseline(mine)
        y = grp[target].to_numpy(float)
        for m in circuit:
            idx = mine.index[mine.metric == m]
            if base is None:
                out.loc[idx, "partial_reason"] = "no output-based baseline with a finite SRCC"
                continue
            st = _partial_stats(grp[m].to_numpy(float), grp[base].to_numpy(float), y,
                                direction(m), direction(base), n_boot,
                                np.random.default_rng([seed, gi, metric_index[m]]), ci, min_n)
            out.loc[idx, "partial_given"] = base
            out.loc[idx, "partial_n"] = st["n"]
            for c in ("partial_srcc", "partial_srcc_lo", "partial_srcc_hi"):
                out.loc[idx, c] = st[c]
            out.loc[idx, "partial_reason"] = st["reason"]
    return out


# ---- training dynamics: which runs the DDB-over-training figure shows ---------------------

def best_and_worst_runs(rows: pd.DataFrame, *, metric: str, accuracy: str = "accuracy",
                        run: str = "parent_id", epoch: str = "epoch", final: str = "final",
                        min_checkpoints: int = 2) -> dict[str, Any]:
    """The runs with the best and the worst final OOD accuracy (the paper's Figure 1),
    among the runs (`run` groups, one row per checkpoint on the OOD domain) with at least
    `min_checkpoints` checkpoints having a finite `metric` and `epoch`, and a final
    checkpoint with a finite accuracy. The final checkpoint is the row whose `final` is
    true (without that column: the last epoch), so an intermediate checkpoint's accuracy,
    however high, never chooses a run. Ties go to the first run in sorted order.

    Returns n_runs (eligible), best_run, best_final_acc, worst_run, worst_final_acc and a
    note (non-empty exactly when no run is eligible)."""
    out: dict[str, Any] = {"n_runs": 0, "best_run": "", "best_final_acc": np.nan,
                           "worst_run": "", "worst_final_acc": np.nan, "note": ""}
    missing = [c for c in (run, epoch, metric, accuracy) if c not in rows]
    if missing:
        return out | {"note": f"no training dynamics: column(s) {missing} missing"}
    finals = []
    for rid, part in rows.groupby(run, sort=True):
        ok = np.isfinite(part[metric].to_numpy(float)) & np.isfinite(
            pd.to_numeric(part[epoch], errors="coerce").to_numpy(float))
        if ok.sum() < min_checkpoints:
            continue
        last = (part[part[final].astype(bool)] if final in part else
                part[pd.to_numeric(part[epoch]) == pd.to_numeric(part[epoch]).max()])
        acc = last[accuracy].to_numpy(float)
        if len(acc) == 1 and np.isfinite(acc[0]):
            finals.append((str(rid), float(acc[0])))
    if not finals:
        return out | {"note": f"no run with >= {min_checkpoints} checkpoints having {metric} "
                              "and a final OOD accuracy"}
    best = max(finals, key=lambda r: r[1])  # max/min keep the first of equal values
    worst = min(finals, key=lambda r: r[1])
    return out | {"n_runs": len(finals), "best_run": best[0], "best_final_acc": best[1],
                  "worst_run": worst[0], "worst_final_acc": worst[1]}


def training_runs(rows: pd.DataFrame, *, metric: str, group: str = "eval_group",
                  **kw: Any) -> pd.DataFrame:
    """`best_and_worst_runs` per `group` (task, or task:OOD domain): one row per group with
    its `task`, `metric` and the selection."""
    require_columns(rows, [group, "task"], "training-dynamics frame")
    return pd.DataFrame([{"group": g, "task": str(part["task"].iloc[0]), "metric": metric,
                          **best_and_worst_runs(part, metric=metric, **kw)}
                         for g, part in rows.groupby(group, sort=True)])


# ---- silent-failure alarm --------------------------------------------------------------------

def calibrate_threshold(proxy_metric: Sequence[float], proxy_accuracy: Sequence[float],
                        delta: float) -> float:
    """δ' = the metric's value on the proxy domain whose accuracy is closest to δ (first on
    ties). Proxy domains are corruptions of labeled ID data, so no target label is used."""
    m, a = np.asarray(proxy_metric, float), np.asarray(proxy_accuracy, float)
    ok = np.isfinite(m) & np.isfinite(a)
    if not ok.any():
        raise MetricError("alarm calibration: no proxy domain with a finite metric and accuracy")
    return float(m[ok][np.argmin(np.abs(a[ok] - delta))])


def _auroc(score: np.ndarray, label: np.ndarray) -> float:
    """P(score of a failing domain > score of a healthy one), ties counted half."""
    pos, neg = score[label], score[~label]
    if len(pos) == 0 or len(neg) == 0:
        return np.nan
    ranks = _wranks(np.concatenate([pos, neg]), np.ones((1, len(score))))[0]
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def silent_failure_alarm(deploy: pd.DataFrame, proxy: pd.DataFrame, *, metrics: Sequence[str],
                         deltas: Sequence[float] = DEFAULT_DELTAS, accuracy: str = "accuracy",
                         model: Sequence[str] = ("task", "checkpoint")) -> pd.DataFrame:
    """Alarm F1 and AUROC per (task, metric, δ) over deployment domains, plus the δ-average
    (delta = NaN, level "mean").

    For each model and δ, δ' is calibrated on that model's proxy domains; a deployment domain
    raises the alarm when its metric is on the bad side of δ' (below for + metrics, above for
    − metrics) and truly fails when its accuracy < δ. AUROC ranks domains by the oriented
    metric (−direction·value) against the failure label; it needs no δ'.
    """
    model = list(model)
    for name, f in (("deployment", deploy), ("proxy", proxy)):
        require_columns(f, [*model, accuracy, *metrics], f"alarm {name} frame")
    rows = []
    for m in metrics:
        sign = direction(m)
        for delta in deltas:
            near = proxy.assign(_gap=(proxy[accuracy] - delta).abs())
            near = near[np.isfinite(near[m]) & np.isfinite(near["_gap"])]
            pick = near.loc[near.groupby(model, sort=False)["_gap"].idxmin(), [*model, m]]
            d = deploy.merge(pick.rename(columns={m: "_thr"}), on=model, how="left")
            for task, grp in d.groupby("task", sort=True):
                usable = grp[np.isfinite(grp["_thr"]) & np.isfinite(grp[m])]
                fail = usable[accuracy].to_numpy() < delta
                alarm = sign * usable[m].to_numpy() < sign * usable["_thr"].to_numpy()
                tp, fp = int((alarm & fail).sum()), int((alarm & ~fail).sum())
                fn = int((~alarm & fail).sum())
                reason = []
                if len(usable) < len(grp):
                    reason.append(f"{len(grp) - len(usable)} domain(s) without a calibrated δ'")
                if fail.sum() == 0:
                    reason.append(f"no deployment domain fails at δ={delta:g}")
                f1 = 2 * tp / (2 * tp + fp + fn) if fail.sum() else np.nan
                auroc = _auroc(-sign * usable[m].to_numpy(float), fail)
                if np.isnan(auroc) and fail.sum():
                    reason.append("every deployment domain fails: AUROC undefined")
                rows.append({"task": task, "metric": m, "delta": delta, "level": "delta",
                             "n_domains": len(usable), "n_fail": int(fail.sum()),
                             "precision": tp / (tp + fp) if tp + fp else np.nan,
                             "recall": tp / (tp + fn) if tp + fn else np.nan,
                             "f1": f1, "auroc": auroc, "reason": "; ".join(reason)})
    out = pd.DataFrame(rows)
    mean = out.groupby(["task", "metric"], sort=False).agg(
        n_domains=("n_domains", "max"), n_fail=("n_fail", "sum"), precision=("precision", "mean"),
        recall=("recall", "mean"), f1=("f1", "mean"), auroc=("auroc", "mean")).reset_index()
    mean = mean.assign(delta=np.nan, level="mean",
                       reason=np.where(mean.f1.isna(), "no δ in the grid had a failing domain",
                                       ""))
    return pd.concat([out, mean[out.columns]], ignore_index=True)


# ---- the one table ---------------------------------------------------------------------------

def result_table(pre: pd.DataFrame | None = None, post: pd.DataFrame | None = None,
                 alarm: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every circuit metric and every baseline side by side: one row per metric, columns
    pre_/post_ statistics with their intervals (averages over tasks/models), alarm F1 and
    AUROC (averaged over δ and tasks), the paper's composite where it reported one, and
    `kind` (the registry's: circuit / output / detector). Sorted by pre-deployment
    composite, best first."""
    parts = []
    for prefix, table in (("pre", pre), ("post", post)):
        if table is None:
            continue
        top = table[(table.level == "mean")]
        if "checkpoint" in top.columns:
            top = top[top.checkpoint == "all"]
        top = top[top.task == "all"] if (top.task == "all").any() else top
        if top.empty:  # a single group: its own row is the summary
            top = table
        cols = [f"{s}{x}" for s in STATS for x in ("", "_lo", "_hi")]
        t = top.set_index("metric")[[*cols, "n", "reason"]]
        parts.append(t.add_prefix(f"{prefix}_"))
    if alarm is not None:
        a = alarm[alarm.level == "mean"].groupby("metric")[["f1", "auroc"]].mean()
        parts.append(a.add_prefix("alarm_"))
    if not parts:
        raise MetricError("result_table: give at least one of pre, post, alarm")
    out = pd.concat(parts, axis=1)
    out.index.name = "metric"
    out = out.reset_index()
    out.insert(1, "kind", [registry.kind(m) for m in out.metric])
    out["paper_pre_composite"] = out.metric.map(PAPER_RESULTS["pre"])
    out["paper_post_composite"] = out.metric.map(PAPER_RESULTS["post"])
    key = "pre_composite" if "pre_composite" in out else out.columns[2]
    return out.sort_values(key, ascending=False, na_position="last", ignore_index=True)
