"""Figures of the reduce stage (matplotlib, Agg backend: no display on cluster nodes).

Every function takes tables (pandas) and a path, draws one figure and returns the path, so
the pipeline can log the files to MLflow; statistics shown in titles are recomputed here
from the plotted points, so a title can never disagree with its scatter.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from circuitray.graph import node_of  # noqa: E402


def stats_line(x: Sequence[float], y: Sequence[float]) -> str:
    """'SRCC +0.77 · KRCC +0.60 · R² 0.52 (n=24)' over the finite pairs, or why not."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return f"n={len(x)}: too few distinct points for statistics"
    srcc = stats.spearmanr(x, y).statistic
    krcc = stats.kendalltau(x, y).statistic
    r = stats.pearsonr(x, y).statistic
    return f"SRCC {srcc:+.2f} · KRCC {krcc:+.2f} · R² {r * r:.2f} (n={len(x)})"


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def scatter_panels(df: pd.DataFrame, x_cols: Sequence[str], y_col: str, path: str | os.PathLike,
                   *, hue: str | None = None, title: str = "", y_label: str | None = None
                   ) -> Path:
    """One scatter panel per metric against `y_col`, statistics in each panel's title."""
    n = max(len(x_cols), 1)
    ncols = min(n, 3)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False)
    groups = list(df.groupby(hue)) if hue and hue in df else [(None, df)]
    for ax, col in zip(axes.flat, x_cols, strict=False):
        for name, part in groups:
            ax.scatter(part[col], part[y_col], s=18, alpha=0.8,
                       label=str(name) if name is not None else None)
        ax.set_xlabel(col)
        ax.set_ylabel(y_label or y_col)
        ax.set_title(f"{col}\n{stats_line(df[col], df[y_col])}", fontsize=8)
        if hue and len(groups) > 1:
            ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(x_cols):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def heatmap(matrix: np.ndarray, path: str | os.PathLike, *, title: str,
            labels: Sequence[str] | None = None, diverging: bool = False) -> Path:
    """A (source depth) × (destination depth) matrix such as Λ or a CCA motif."""
    m = np.asarray(matrix, float)
    fig, ax = plt.subplots(figsize=(5, 4.3))
    if diverging:
        lim = np.nanmax(np.abs(m)) or 1.0
        im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
    else:
        im = ax.imshow(m, cmap="viridis")
    labels = list(labels) if labels is not None else (
        ["in"] + [str(i) for i in range(m.shape[0] - 2)] + ["out"])
    ax.set_xticks(range(m.shape[1]), labels[: m.shape[1]], fontsize=7)
    ax.set_yticks(range(m.shape[0]), labels[: m.shape[0]], fontsize=7)
    ax.set_xlabel("destination depth")
    ax.set_ylabel("source depth")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def alarm_plot(proxy: pd.DataFrame, deploy: pd.DataFrame, metric: str, path: str | os.PathLike,
               *, delta: float, threshold: float, title: str = "") -> Path:
    """Metric vs accuracy on proxy domains (calibration) and deployment domains, with δ and δ'."""
    fig, ax = plt.subplots(figsize=(5.2, 4))
    ax.scatter(proxy[metric], proxy["accuracy"], s=18, marker="s", label="proxy (calibration)")
    ax.scatter(deploy[metric], deploy["accuracy"], s=18, alpha=0.7, label="deployment")
    ax.axhline(delta, color="k", ls="--", lw=1, label=f"δ = {delta:g}")
    if np.isfinite(threshold):
        ax.axvline(threshold, color="r", ls=":", lw=1.2, label=f"δ' = {threshold:.3g}")
    ax.set_xlabel(metric)
    ax.set_ylabel("domain accuracy")
    ax.set_title(title or f"silent-failure alarm on {metric}", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def ddb_over_training(rows: pd.DataFrame, runs: Sequence[tuple[str, str]], *, metric: str,
                      path: str | os.PathLike, accuracy: str = "accuracy",
                      run: str = "parent_id", epoch: str = "epoch", title: str = "") -> Path:
    """The paper's Figure 1 layout: `metric` (DDB) over training epochs on the left axis and
    OOD accuracy on a second (right) axis, for the chosen runs, given as (label, run id)
    pairs, e.g. [("best", id), ("worst", id)] from evaluation.best_and_worst_runs. One
    colour per run: solid = DDB, dashed = OOD accuracy; the legend names each run."""
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    acc_ax = ax.twinx()
    handles = []
    seen = []
    for i, (_, rid) in enumerate(runs):
        if rid in seen:  # one eligible run: it is both the best and the worst
            continue
        seen.append(rid)
        both = [lab for lab, r in runs if r == rid]
        part = rows[rows[run].astype(str) == rid].sort_values(epoch)
        colour = f"C{i}"
        name = f"{' and '.join(both)}: {rid}"
        handles += ax.plot(part[epoch], part[metric], color=colour, marker="o", ms=4, lw=1.5,
                           label=f"{name} — {metric}")
        handles += acc_ax.plot(part[epoch], part[accuracy], color=colour, marker="s", ms=4,
                               lw=1.2, ls="--", label=f"{name} — OOD accuracy")
    ax.set_xlabel(epoch)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(f"{metric} (solid)")
    acc_ax.set_ylabel("OOD accuracy (dashed)")
    ax.set_title(title or f"{metric} and OOD accuracy over training", fontsize=9)
    ax.legend(handles=handles, fontsize=6, loc="best")
    return _save(fig, path)


def circuit_drawing(edges: pd.DataFrame, path: str | os.PathLike, *, top_n: int = 60,
                    title: str = "") -> Path:
    """The top-n |score| edges of one circuit, nodes laid out by depth (left to right).

    q/k/v destinations are drawn on their head's node; red = positive, blue = negative score.
    Depths come from the table's src_depth/dst_depth columns: names are only grouped by node.
    """
    top = edges.reindex(edges["score"].abs().sort_values(ascending=False).index).head(top_n)
    n_blocks = int(edges["dst_depth"].max()) - 1
    strip = top["dst"].map(node_of)
    depth = {**dict(zip(top["src"], top["src_depth"].astype(int), strict=True)),
             **dict(zip(strip, top["dst_depth"].astype(int), strict=True))}
    nodes = sorted(depth, key=lambda s: (depth[s], s))
    by_depth: dict[int, list[str]] = {}
    for node in nodes:
        by_depth.setdefault(depth[node], []).append(node)
    pos = {}
    for depth, names in by_depth.items():
        for i, node in enumerate(names):
            pos[node] = (depth, i - (len(names) - 1) / 2)
    fig, ax = plt.subplots(figsize=(1.1 * (n_blocks + 2) + 2, 5))
    wmax = top["score"].abs().max() or 1.0
    for (_, e), dst in zip(top.iterrows(), strip, strict=True):
        (x0, y0), (x1, y1) = pos[e["src"]], pos[dst]
        ax.plot([x0, x1], [y0, y1], color="tab:red" if e["score"] > 0 else "tab:blue",
                lw=0.3 + 3 * abs(e["score"]) / wmax, alpha=0.6)
    for node, (x, y) in pos.items():
        ax.scatter([x], [y], s=40, color="k", zorder=3)
        ax.annotate(node, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xticks(range(n_blocks + 2), ["input"] + [f"b{i}" for i in range(n_blocks)]
                  + ["logits"], fontsize=7)
    ax.set_yticks([])
    ax.set_title(title or f"top {len(top)} edges", fontsize=9)
    return _save(fig, path)
