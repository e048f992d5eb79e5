"""Inter-layer dependency matrix Λ and Dependency Depth Bias (DDB), DESIGN §3.

Both are functions of one (L+2)×(L+2) table of |score| sums by (source depth, destination
depth), so the table-level function builds that table for every circuit with one sparse
matrix product and derives every (τ, target) variant from it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from circuitray.errors import MetricError, TableError
from circuitray.metrics.dense import KEYS, edge_blocks
from circuitray.registry import lambda_columns, lambda_size
from circuitray.tables import require_columns

Target = Literal["out", "deep", "global"]
TARGETS: tuple[Target, ...] = ("out", "deep", "global")
_EPS = 1e-9  # τ·L is compared with a tolerance: 0.7·10 is 7.000000000000001 in floats


def ddb_column(target: str, tau: float) -> str:
    """Column name of one DDB variant, e.g. ddb_out_0.3."""
    return f"ddb_{target}_{tau:g}"


def block_masks(n_blocks: int, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Depth masks (length L+2) of low blocks l < τL and high blocks l ≥ (1−τ)L; input excluded."""
    if not 0 < tau <= 0.5:
        raise MetricError(f"DDB: tau must be in (0, 0.5], got {tau}")
    block = np.arange(n_blocks + 2) - 1  # depth d holds block d−1; input −1, logits L
    is_block = (block >= 0) & (block < n_blocks)
    low = is_block & (block < tau * n_blocks - _EPS)
    high = is_block & (block >= (1 - tau) * n_blocks - _EPS)
    return low, high


def target_mask(n_blocks: int, tau: float, target: Target) -> np.ndarray:
    """Destination depths in the target set: logits, high blocks + logits, or everything."""
    depth = np.arange(n_blocks + 2)
    if target == "out":
        return depth == n_blocks + 1
    if target == "deep":
        return block_masks(n_blocks, tau)[1] | (depth == n_blocks + 1)
    if target == "global":
        return depth >= 1
    raise MetricError(f"DDB: unknown target {target!r}; expected one of {TARGETS}")


def ddb_from_sums(sums: np.ndarray, n_blocks: int, tau: float, target: Target) -> np.ndarray:
    """DDB for a stack of |score|-sum tables [..., L+2, L+2]; NaN where a mass is zero."""
    low, high = block_masks(n_blocks, tau)
    into = sums[..., target_mask(n_blocks, tau, target)].sum(axis=-1)  # [..., src depth]
    hi, lo = into[..., high].sum(axis=-1), into[..., low].sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log(hi / lo)
    return np.where((hi > 0) & (lo > 0), out, np.nan)


def _single_sums(edges: pd.DataFrame, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    require_columns(edges, ("src_depth", "dst_depth", "score"), "edges")
    sd = edges["src_depth"].to_numpy(np.int64)
    dd = edges["dst_depth"].to_numpy(np.int64)
    d = n_blocks + 2
    if len(sd) == 0:
        raise MetricError("circuit has no edges")
    if sd.min() < 0 or dd.max() > n_blocks + 1 or (sd > dd).any():
        raise TableError(f"edges: depths outside 0..{n_blocks + 1} or src deeper than dst "
                         f"(n_blocks={n_blocks})")
    cell = sd * d + dd
    w = np.abs(edges["score"].to_numpy(np.float64))
    sums = np.bincount(cell, weights=w, minlength=d * d).reshape(d, d)
    counts = np.bincount(cell, minlength=d * d).reshape(d, d)
    return sums, counts


def dependency_matrix(edges: pd.DataFrame, *, n_blocks: int) -> np.ndarray:
    """Λ[i, j] = mean |score| over edges from depth i to depth j (0 where no edge exists)."""
    sums, counts = _single_sums(edges, n_blocks)
    return np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)


def dependency_depth_bias(edges: pd.DataFrame, *, n_blocks: int, tau: float = 0.3,
                          target: Target = "out") -> float:
    """log(high-block source mass / low-block source mass) over edges into `target`."""
    sums, _ = _single_sums(edges, n_blocks)
    value = float(ddb_from_sums(sums, n_blocks, tau, target))
    if np.isnan(value):
        raise MetricError(f"DDB({target}, tau={tau}): no |score| mass from the low or the "
                          f"high blocks into the target (n_blocks={n_blocks})")
    return value


def block_sums(scores: np.ndarray, src_depth: np.ndarray, dst_depth: np.ndarray,
               n_depths: int) -> tuple[np.ndarray, np.ndarray]:
    """(|score| sums [G, D, D], edge counts [D, D]) for a dense [G, E] score block."""
    cell = src_depth.astype(np.int64) * n_depths + dst_depth.astype(np.int64)
    onehot = sp.csr_matrix((np.ones(len(cell), np.float32), (cell, np.arange(len(cell)))),
                           shape=(n_depths * n_depths, len(cell)))
    sums = np.empty((scores.shape[0], n_depths * n_depths), np.float64)
    step = max(1, int(2**26 // max(scores.shape[1], 1)))  # bound the |scores| temporary
    for i in range(0, scores.shape[0], step):
        sums[i:i + step] = (onehot @ np.abs(scores[i:i + step]).T).T
    counts = np.bincount(cell, minlength=n_depths * n_depths)
    return sums.reshape(-1, n_depths, n_depths), counts.reshape(n_depths, n_depths)


def depth_metrics(edges: pa.Table | pd.DataFrame, *, taus: tuple[float, ...] = (0.3,),
                  targets: tuple[Target, ...] = TARGETS, with_lambda: bool = True
                  ) -> pd.DataFrame:
    """One row per circuit (task, checkpoint, domain, method): n_blocks, every DDB variant
    (`ddb_column(target, tau)`), a `note` saying why any value is NaN, and, with
    `with_lambda`, Λ flattened row-major as lam_{i}_{j} (padded with NaN to the deepest model).
    """
    blocks = edge_blocks(edges)
    n_depths = max(b.n_blocks for b in blocks) + 2
    frames = []
    for b in blocks:
        d = b.n_blocks + 2
        sums, counts = block_sums(b.scores, b.src_depth, b.dst_depth, d)
        out = b.keys.copy()
        out["n_blocks"] = b.n_blocks
        notes = np.full(len(out), "", dtype=object)
        for tau in taus:
            for target in targets:
                col = ddb_column(target, tau)
                out[col] = ddb_from_sums(sums, b.n_blocks, tau, target)
                bad = out[col].isna().to_numpy()
                notes[bad] = notes[bad] + f"{col}: no mass from low or high blocks; "
        out["note"] = notes
        if with_lambda:
            lam = np.full((len(out), n_depths, n_depths), np.nan)
            lam[:, :d, :d] = np.divide(sums, counts, out=np.zeros_like(sums),
                                       where=counts > 0)
            out = pd.concat([out, pd.DataFrame(lam.reshape(len(out), -1),
                                               columns=lambda_columns(n_depths))],
                            axis=1)
        frames.append(out)
    return pd.concat(frames, ignore_index=True).sort_values(list(KEYS), ignore_index=True)


def lambda_matrices(depth_table: pd.DataFrame) -> np.ndarray:
    """Λ back as [n_rows, D, D] from the lam_{i}_{j} columns of `depth_metrics`."""
    d = lambda_size(list(depth_table.columns))
    if not d:
        raise TableError("depth table: no lam_{i}_{j} columns (use with_lambda=True)")
    return depth_table[lambda_columns(d)].to_numpy(np.float64).reshape(-1, d, d)
