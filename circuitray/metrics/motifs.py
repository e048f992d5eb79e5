"""Generalization motifs: regularized CCA between vec(Λ) and OOD accuracy (DESIGN §3).

A zoo holds tens of models while vec(Λ) has (L+2)² entries, so plain CCA would fit noise
perfectly. We shrink the Λ covariance toward the identity (on standardized entries), choose
the shrinkage by nested cross-validation, and report the held-out canonical correlation —
the number that says whether the motif is real.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from circuitray.errors import MetricError, TableError
from circuitray.registry import lambda_columns, lambda_size
from circuitray.tables import require_columns

REGS = (0.01, 0.1, 0.3, 0.6, 0.9)


@dataclass
class Motif:
    """One task's motif: canonical Λ weights [D, D] (unit Frobenius norm; positive = more
    dependency there goes with higher OOD accuracy), in-sample and held-out correlations."""

    task: str
    motif: np.ndarray
    canonical_corr: float
    heldout_corr: float
    reg: float
    n_models: int


def _inv_sqrt(c: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(c)
    return (vecs / np.sqrt(np.maximum(vals, 1e-12))) @ vecs.T


def _fit(x: np.ndarray, y: np.ndarray, reg: float) -> tuple[np.ndarray, np.ndarray, tuple]:
    """First canonical pair on training data; weights scaled to unit-variance variates and
    signed so that the variates correlate positively and y's first weight is positive."""
    mx, sx = x.mean(0), x.std(0)
    my, sy = y.mean(0), y.std(0)
    keep = sx > 1e-12
    xs = (x[:, keep] - mx[keep]) / sx[keep]
    ys = (y - my) / np.where(sy > 0, sy, 1.0)
    n = len(x)
    cxx = (1 - reg) * (xs.T @ xs) / n + reg * np.eye(xs.shape[1])
    cyy = (ys.T @ ys) / n + 1e-6 * np.eye(ys.shape[1])
    kx, ky = _inv_sqrt(cxx), _inv_sqrt(cyy)
    u, _, vt = np.linalg.svd(kx @ (xs.T @ ys / n) @ ky)
    wx, wy = kx @ u[:, 0], ky @ vt[0]
    if wy[0] < 0:
        wx, wy = -wx, -wy
    wx /= max(np.std(xs @ wx), 1e-12)
    wy /= max(np.std(ys @ wy), 1e-12)
    full = np.zeros(x.shape[1])
    full[keep] = wx
    return full, wy, (mx, np.where(keep, sx, 1.0), my, np.where(sy > 0, sy, 1.0))


def _project(x: np.ndarray, y: np.ndarray, wx: np.ndarray, wy: np.ndarray, stats: tuple
             ) -> tuple[np.ndarray, np.ndarray]:
    mx, sx, my, sy = stats
    return ((x - mx) / sx) @ wx, ((y - my) / sy) @ wy


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _cv_corr(x: np.ndarray, y: np.ndarray, reg: float, folds: list[np.ndarray]) -> float:
    """Correlation of the pooled held-out canonical variates over the folds."""
    us, vs = [], []
    for test in folds:
        train = np.setdiff1d(np.arange(len(x)), test)
        wx, wy, st = _fit(x[train], y[train], reg)
        u, v = _project(x[test], y[test], wx, wy, st)
        us.append(u)
        vs.append(v)
    return _corr(np.concatenate(us), np.concatenate(vs))


def _folds(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    return np.array_split(rng.permutation(n), k)


def _choose_reg(x: np.ndarray, y: np.ndarray, regs: Sequence[float], k: int,
                rng: np.random.Generator) -> float:
    if len(regs) == 1:
        return float(regs[0])
    folds = _folds(len(x), k, rng)
    scores = [_cv_corr(x, y, r, folds) for r in regs]
    return float(regs[int(np.nanargmax(scores))]) if np.isfinite(scores).any() else regs[-1]


def cca_motif(lam: np.ndarray, ood_acc: np.ndarray, *, task: str = "", regs:
              Sequence[float] = REGS, n_folds: int = 5, seed: int = 0, min_models: int = 10
              ) -> Motif:
    """Regularized CCA of vec(Λ) [n, D, D] against OOD accuracy [n] (or [n, q] domains).

    The shrinkage is chosen among `regs` by cross-validation; the held-out correlation is
    nested (the shrinkage is re-chosen inside each outer training fold), so it is not inflated
    by the choice.
    """
    lam = np.asarray(lam, np.float64)
    y = np.asarray(ood_acc, np.float64)
    y = y[:, None] if y.ndim == 1 else y
    where = f"task '{task}': " if task else ""
    if lam.ndim != 3 or lam.shape[1] != lam.shape[2] or len(lam) != len(y):
        raise MetricError(f"{where}CCA needs Λ as [n, D, D] and accuracy as [n]; got "
                          f"{lam.shape} and {y.shape}")
    ok = np.isfinite(lam).all(axis=(1, 2)) & np.isfinite(y).all(axis=1)
    lam, y = lam[ok], y[ok]
    if len(lam) < max(min_models, 2 * n_folds):
        raise MetricError(f"{where}CCA needs at least {max(min_models, 2 * n_folds)} models "
                          f"with finite Λ and accuracy, got {len(lam)}")
    x = lam.reshape(len(lam), -1)
    if (x.std(0) <= 1e-12).all() or (y.std(0) == 0).all():
        raise MetricError(f"{where}CCA: Λ or accuracy is constant across the zoo")
    rng = np.random.default_rng(seed)
    outer = _folds(len(x), n_folds, rng)
    us, vs = [], []
    for test in outer:
        train = np.setdiff1d(np.arange(len(x)), test)
        reg = _choose_reg(x[train], y[train], regs, n_folds, rng)
        wx, wy, st = _fit(x[train], y[train], reg)
        u, v = _project(x[test], y[test], wx, wy, st)
        us.append(u)
        vs.append(v)
    heldout = _corr(np.concatenate(us), np.concatenate(vs))
    reg = _choose_reg(x, y, regs, n_folds, rng)
    wx, wy, st = _fit(x, y, reg)
    u, v = _project(x, y, wx, wy, st)
    d = lam.shape[1]
    motif = wx.reshape(d, d)
    return Motif(task=task, motif=motif / np.linalg.norm(motif), canonical_corr=_corr(u, v),
                 heldout_corr=heldout, reg=reg, n_models=len(x))


def task_motifs(depth_table: pd.DataFrame, accuracy: pd.DataFrame, *, target: str = "ood_acc",
                **kw) -> dict[str, Motif]:
    """One motif per task from `depth_metrics` rows (one circuit per checkpoint: filter the
    domain and method first) joined with `accuracy` (task, checkpoint, target)."""
    require_columns(accuracy, ["task", "checkpoint", target], "accuracy table")
    require_columns(depth_table, ["task", "checkpoint"], "depth table")
    d = lambda_size(list(depth_table.columns))
    if not d:
        raise TableError("depth table: no lam_{i}_{j} columns (use with_lambda=True)")
    dup = depth_table.duplicated(["task", "checkpoint"])
    if dup.any():
        r = depth_table[dup].iloc[0]
        raise TableError(f"depth table: task '{r.task}', checkpoint '{r.checkpoint}' has "
                         "several circuits; keep one domain and method per checkpoint")
    joined = depth_table.merge(accuracy[["task", "checkpoint", target]],
                               on=["task", "checkpoint"], how="inner")
    names = lambda_columns(d)
    out = {}
    for task, grp in joined.groupby("task", sort=True):
        lam = grp[names].to_numpy(np.float64).reshape(-1, d, d)
        depth = np.isfinite(lam).all(axis=0)  # NaN padding of shallower models: crop
        size = int(depth.all(axis=1).sum())
        out[task] = cca_motif(lam[:, :size, :size], grp[target].to_numpy(float), task=task, **kw)
    return out


def universal_motif(motifs: dict[str, Motif] | Sequence[Motif]) -> np.ndarray:
    """Mean of the tasks' unit-norm motifs: where all tasks agree, it stays large."""
    items = list(motifs.values()) if isinstance(motifs, dict) else list(motifs)
    if not items:
        raise MetricError("universal motif: no task motif given")
    shapes = {m.task: m.motif.shape for m in items}
    if len(set(shapes.values())) > 1:
        raise MetricError(f"universal motif: tasks have different depths {shapes}")
    return np.mean([m.motif / np.linalg.norm(m.motif) for m in items], axis=0)
