"""Regularized CCA recovers a planted motif, and says so only when it is real."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from circuitray.errors import MetricError, TableError
from circuitray.metrics.motifs import Motif, cca_motif, task_motifs, universal_motif

D = 4  # a 2-block model: Λ is 4×4, 10 entries possibly non-zero (upper triangle + diagonal)


def planted(n: int, seed: int, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.triu(np.ones((D, D), bool))
    lam = np.zeros((n, D, D))
    lam[:, mask] = rng.normal(size=(n, mask.sum()))
    w = np.zeros((D, D))
    w[0, 3], w[2, 3], w[1, 1] = 1.0, 2.0, -1.0  # the motif: reliance on logits inputs
    acc = (lam * w).sum(axis=(1, 2)) + noise * rng.normal(size=n)
    return lam, acc, w / np.linalg.norm(w)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


def test_cca_recovers_planted_motif_with_high_heldout_correlation() -> None:
    lam, acc, w = planted(80, seed=0)
    m = cca_motif(lam, acc, task="t")
    assert cosine(m.motif, w) > 0.95
    assert m.heldout_corr > 0.8 and m.canonical_corr >= m.heldout_corr - 0.05
    assert np.linalg.norm(m.motif) == pytest.approx(1.0)
    assert m.motif[np.tril_indices(D, -1)] == pytest.approx(0.0)  # constant entries get 0


def test_cca_on_unrelated_accuracy_reports_low_heldout_correlation() -> None:
    lam, _, _ = planted(60, seed=1)
    acc = np.random.default_rng(2).normal(size=60)
    m = cca_motif(lam, acc)
    assert m.heldout_corr < 0.4  # in-sample correlation alone would look respectable
    assert m.canonical_corr > m.heldout_corr


def test_too_few_models_is_a_clear_error() -> None:
    lam, acc, _ = planted(6, seed=3)
    with pytest.raises(MetricError, match="task 'tiny': CCA needs at least 10 models.*got 6"):
        cca_motif(lam, acc, task="tiny")


def test_task_and_universal_motifs_from_tables() -> None:
    rows, accs, motifs = [], [], {}
    for task, seed, scale in (("a", 4, 1.0), ("b", 5, 3.0)):
        lam, acc, w = planted(60, seed)
        for i in range(60):
            rows.append({"task": task, "checkpoint": f"c{i}",
                         **{f"lam_{r}_{c}": scale * lam[i, r, c] for r in range(D)
                            for c in range(D)}})
            accs.append({"task": task, "checkpoint": f"c{i}", "ood_acc": acc[i]})
    depth, acc_t = pd.DataFrame(rows), pd.DataFrame(accs)
    motifs = task_motifs(depth, acc_t)
    assert set(motifs) == {"a", "b"}
    uni = universal_motif(motifs)
    assert cosine(uni, w) > 0.95
    with pytest.raises(TableError, match="several circuits"):
        task_motifs(pd.concat([depth, depth.iloc[:1]]), acc_t)
    bad = Motif("c", np.ones((3, 3)), 1.0, 1.0, 0.1, 10)
    with pytest.raises(MetricError, match="different depths"):
        universal_motif([*motifs.values(), bad])
