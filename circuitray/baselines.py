"""Output-based proxies a user would pick instead of circuits (DESIGN §4).

Everything here reads the `outputs` table (per-example logits, features, labels where known)
and nothing else, so a baseline can never peek at circuits — or at target labels: the only
labels used are those of the ID validation domain (`id_domain`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.optimize
import scipy.special
import scipy.stats

from circuitray.errors import MetricError, TableError
from circuitray.isolation import MetricFailure, attempt, reasons
from circuitray.registry import family_columns
from circuitray.tables import require_columns

OUTPUT_COLUMNS = ("task", "checkpoint", "domain", "label", "pred", "max_prob", "neg_entropy",
                  "energy", "logits", "features")


# ---- per-sample-set primitives ---------------------------------------------------------------

def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return scipy.special.softmax(np.asarray(logits, np.float64) / temperature, axis=1)


def neg_entropy(probs: np.ndarray) -> np.ndarray:
    return (probs * np.log(np.clip(probs, 1e-300, None))).sum(axis=1)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T minimizing the NLL of softmax(logits / T) on labeled ID validation data."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.int64)

    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        return float((scipy.special.logsumexp(z, axis=1) - z[np.arange(len(z)), labels]).mean())

    res = scipy.optimize.minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)),
                                         method="bounded")
    return float(np.exp(res.x))


def atc_threshold(id_scores: np.ndarray, id_correct: np.ndarray) -> float:
    """ATC (Garg 2022): t such that the fraction of ID scores below t equals the ID error."""
    s = np.sort(np.asarray(id_scores, np.float64))
    k = int(round((1.0 - np.mean(id_correct)) * len(s)))
    return float(s[k]) if k < len(s) else np.inf


def atc_predict(scores: np.ndarray, threshold: float) -> float:
    """Predicted accuracy: the fraction of target scores at or above the ID threshold."""
    return float(np.mean(np.asarray(scores) >= threshold))


def doc(id_accuracy: float, id_confidence: float, target_confidence: float) -> float:
    """DoC (Guillory 2021): ID accuracy minus the drop in average confidence."""
    return id_accuracy - (id_confidence - target_confidence)


def nuclear_norm_bounds(n: int, k: int) -> tuple[float, float]:
    """Range of the normalized nuclear norm of an n×k row-stochastic matrix: uniform
    predictions (rank one) give 1/√(k·min(n, k)); confident, class-balanced ones give 1."""
    return 1.0 / np.sqrt(k * min(n, k)), 1.0


def nuclear_norm(probs: np.ndarray) -> float:
    """‖P‖_* / √(n·min(n, k)) (Deng 2023): high when predictions are confident and dispersed."""
    n, k = probs.shape
    return float(np.linalg.svd(probs, compute_uv=False).sum() / np.sqrt(n * min(n, k)))


def mano(logits: np.ndarray, p: float = 4.0) -> float:
    """MaNo (Xie 2024): Lp norm (p = 4) of the softmax-Taylor normalized logits, averaged per
    entry. Always the Taylor normalization (the paper's choice for miscalibrated models);
    its data-dependent switch to plain softmax is not implemented."""
    z = np.asarray(logits, np.float64)
    v = 1.0 + z + z * z / 2.0  # > 0 for every real z
    s = v / v.sum(axis=1, keepdims=True)
    return float(np.mean(np.abs(s) ** p) ** (1.0 / p))


def mde(energy: np.ndarray) -> float:
    """Meta-distribution energy (Peng 2024), as in the authors' code: log(−mean log_softmax(E))
    over the samples = log(logsumexp E − mean E), with E = −logsumexp(logits)."""
    e = np.asarray(energy, np.float64)
    return float(np.log(scipy.special.logsumexp(e) - e.mean()))


def rankme(features: np.ndarray, eps: float = 1e-7) -> float:
    """RankMe (Garrido 2023): exp of the entropy of the normalized singular values."""
    sv = np.linalg.svd(np.asarray(features, np.float64), compute_uv=False)
    if sv.sum() <= 0:
        raise MetricError("RankMe: features are all zero")
    q = sv / sv.sum() + eps
    return float(np.exp(-(q * np.log(q)).sum()))


@dataclass(frozen=True)
class ShiftTest:
    statistic: float
    p_value: float
    shifted: bool


def bbsd(id_probs: np.ndarray, target_probs: np.ndarray, alpha: float = 0.05) -> ShiftTest:
    """BBSD (Lipton 2018 / Rabanser 2019): a KS test per softmax dimension, Bonferroni-corrected.
    statistic = the largest KS distance; p = min(1, k · smallest p)."""
    k = id_probs.shape[1]
    with warnings.catch_warnings():  # scipy falls back to the asymptotic p-value and says so
        warnings.filterwarnings("ignore", "ks_2samp: Exact calculation unsuccessful")
        res = scipy.stats.ks_2samp(id_probs, target_probs, axis=0)
    p = float(min(1.0, k * np.min(res.pvalue)))
    return ShiftTest(float(np.max(res.statistic)), p, p < alpha)


def mmd_test(x: np.ndarray, y: np.ndarray, *, n_perm: int = 200, alpha: float = 0.05,
             max_n: int = 500, seed: int = 0) -> ShiftTest:
    """Kernel two-sample test: biased MMD² with an RBF kernel whose bandwidth is the median
    pairwise distance of the pooled sample; p-value from `n_perm` seeded label permutations.
    Each sample is subsampled to `max_n` (seeded) to bound the O(n²) kernel."""
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if len(x) > max_n:
        x = x[rng.choice(len(x), max_n, replace=False)]
    if len(y) > max_n:
        y = y[rng.choice(len(y), max_n, replace=False)]
    if len(x) < 2 or len(y) < 2:
        raise MetricError(f"MMD: need at least 2 samples per side, got {len(x)} and {len(y)}")
    z = np.vstack([x, y])
    sq = (z * z).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)
    med = np.median(d2[np.triu_indices(len(z), 1)])
    kern = np.exp(-d2 / max(med, 1e-12))  # bandwidth² = median squared distance
    sign = np.concatenate([np.full(len(x), 1.0 / len(x)), np.full(len(y), -1.0 / len(y))])
    perms = np.stack([sign] + [rng.permutation(sign) for _ in range(n_perm)])
    mmd2 = ((perms @ kern) * perms).sum(axis=1)
    p = float((1 + np.sum(mmd2[1:] >= mmd2[0])) / (1 + n_perm))
    return ShiftTest(float(mmd2[0]), p, p < alpha)


# ---- tables -----------------------------------------------------------------------------------

def _frame(outputs: pa.Table | pd.DataFrame) -> pd.DataFrame:
    require_columns(outputs, OUTPUT_COLUMNS, "outputs")
    if isinstance(outputs, pa.Table):
        outputs = outputs.select(list(OUTPUT_COLUMNS)).to_pandas()
    return outputs.sort_values(["task", "checkpoint", "domain"], kind="stable",
                               ignore_index=True)


def _matrix(values: pd.Series, what: str, where: str) -> np.ndarray:
    """A list column as a dense [n, k] array; rows of different lengths are an error."""
    lengths = values.map(len).to_numpy()
    if len(lengths) and (lengths != lengths[0]).any():
        raise TableError(f"outputs: {where}: {what} vectors have different lengths "
                         f"{sorted(set(lengths.tolist()))[:5]}")
    return np.stack([np.asarray(v, np.float64) for v in values]) if len(values) else \
        np.zeros((0, 0))


def check_labels(labels: np.ndarray, n_classes: int, where: str) -> np.ndarray:
    """`labels`, if they all index the model head: a class the head lacks can never be
    predicted, so accuracy, temperature and ATC on such data would be silently wrong (or an
    IndexError deep in scipy). MetricError naming `where` and the bad values otherwise."""
    labels = np.asarray(labels, np.int64)
    bad = np.unique(labels[(labels < 0) | (labels >= n_classes)])
    if len(bad):
        raise MetricError(f"{where}: labels {bad[:10].tolist()} outside the model head's "
                          f"{n_classes} classes (0..{n_classes - 1}); check the class map")
    return labels


def _where(task: str, ckpt: str, domain: str) -> str:
    return f"task '{task}', checkpoint '{ckpt}', domain '{domain}'"


def _head_width(d: pd.DataFrame) -> int:
    widths = d["logits"].map(len)
    return int(widths.iloc[0]) if len(widths) else 0


def domain_accuracy(outputs: pa.Table | pd.DataFrame,
                    failures: list[MetricFailure] | None = None) -> pd.DataFrame:
    """True accuracy per (task, checkpoint, domain) over labeled examples (NaN if none).

    A domain whose labels fall outside the model head gets NaN and a `reason` (and a
    MetricFailure in `failures`): its accuracy would count a class the model cannot predict.
    """
    f = _frame(outputs)
    rows = []
    for (task, ckpt, domain), d in f.groupby(["task", "checkpoint", "domain"], sort=True):
        fails: list[MetricFailure] = []
        labeled = d["label"].notna()
        labels = attempt(partial(check_labels, d.loc[labeled, "label"].to_numpy(np.int64),
                                 _head_width(d), _where(task, ckpt, domain)),
                         fails, "accuracy", task=task, checkpoint=ckpt, domain=domain)
        correct = d.loc[labeled, "pred"].to_numpy(np.int64) == labels
        rows.append({"task": task, "checkpoint": ckpt, "domain": domain,
                     "accuracy": float(correct.mean()) if labels is not None and len(labels)
                     else np.nan,
                     "n": len(d), "n_labeled": int(labeled.sum()),
                     "reason": reasons(fails, domain, "" if labeled.any()
                                       else "accuracy: no labeled examples")})
        if failures is not None:
            failures.extend(fails)
    return pd.DataFrame(rows, columns=["task", "checkpoint", "domain", "accuracy", "n",
                                       "n_labeled", "reason"])


# Baselines that need the ID validation labels (accuracy, temperature, ATC thresholds); the
# others read outputs only and are computed on unlabeled ID data too.
LABELED_BASELINES = ("id_acc", "ac_ts", "atc_mc", "atc_ne", "atc_mc_ts", "atc_ne_ts", "doc",
                     "temperature")
_NEEDS_LABELS = f"baselines needing ID labels ({', '.join(LABELED_BASELINES)})"
# The columns of each family are declared once, with their directions, in the registry.
BASELINE_COLUMNS = family_columns("baselines")


@dataclass
class _Calibration:
    """What the label-needing baselines take from a checkpoint's labeled ID validation data."""

    acc: float
    ac: float
    temp: float
    thr: dict[str, float]


def _calibration(rows: pd.DataFrame, where: str) -> _Calibration:
    if rows.empty:
        raise TableError(f"outputs: {where}: no rows on the ID domain")
    if rows["label"].isna().any():
        raise MetricError(f"{where}: {int(rows['label'].isna().sum())} of {len(rows)} ID "
                          "examples are unlabeled")
    logits = _matrix(rows["logits"], "logits", where)
    labels = rows["label"].to_numpy(np.int64)
    check_labels(labels, logits.shape[1], where)
    correct = rows["pred"].to_numpy() == labels
    temp = fit_temperature(logits, labels)
    p1, pt = softmax(logits), softmax(logits, temp)
    return _Calibration(
        acc=float(correct.mean()), ac=float(rows["max_prob"].mean()), temp=temp,
        thr={"mc": atc_threshold(p1.max(1), correct),
             "ne": atc_threshold(neg_entropy(p1), correct),
             "mc_ts": atc_threshold(pt.max(1), correct),
             "ne_ts": atc_threshold(neg_entropy(pt), correct)})


def _label_free(d: pd.DataFrame, logits: np.ndarray, where: str
                ) -> dict[str, Callable[[], float]]:
    """Each label-free proxy of one domain as a thunk, so one failing never hides the others."""
    p1 = softmax(logits)
    lo, hi = nuclear_norm_bounds(*p1.shape)
    return {
        "ac": lambda: float(d["max_prob"].mean()),
        "ane": lambda: float(d["neg_entropy"].mean()),
        "energy": lambda: float(d["energy"].mean()),
        "nuclear": lambda: nuclear_norm(p1), "nuclear_lo": lambda: lo, "nuclear_hi": lambda: hi,
        "mano": lambda: mano(logits), "mde": lambda: mde(d["energy"].to_numpy()),
        "rankme": lambda: rankme(_matrix(d["features"], "features", where)),
    }


def _labeled(d: pd.DataFrame, logits: np.ndarray, cal: _Calibration
             ) -> dict[str, Callable[[], float]]:
    p1, pt = softmax(logits), softmax(logits, cal.temp)
    mc_ts = pt.max(axis=1)
    return {
        "id_acc": lambda: cal.acc, "ac_ts": lambda: float(mc_ts.mean()),
        "atc_mc": lambda: atc_predict(p1.max(axis=1), cal.thr["mc"]),
        "atc_ne": lambda: atc_predict(neg_entropy(p1), cal.thr["ne"]),
        "atc_mc_ts": lambda: atc_predict(mc_ts, cal.thr["mc_ts"]),
        "atc_ne_ts": lambda: atc_predict(neg_entropy(pt), cal.thr["ne_ts"]),
        "doc": lambda: doc(cal.acc, cal.ac, float(d["max_prob"].mean())),
        "temperature": lambda: cal.temp,
    }


def pre_deployment_baselines(outputs: pa.Table | pd.DataFrame, *, id_domain: str,
                             failures: list[MetricFailure] | None = None) -> pd.DataFrame:
    """One row per (task, checkpoint, domain): every output-based proxy of OOD accuracy.

    Columns: id_acc, ac, ac_ts, ane, energy (mean), atc_{mc,ne}[_ts], doc, nuclear (with
    nuclear_lo / nuclear_hi, its bounds for this n, k), mano, mde, rankme, temperature,
    n_examples, reason. Only ID labels are used; target labels are never read. A proxy that
    cannot be computed is NaN with a `reason` (and a MetricFailure in `failures`); without
    usable ID labels the LABELED_BASELINES are NaN and the label-free ones still computed.
    """
    f = _frame(outputs)
    rows = []
    for (task, ckpt), grp in f.groupby(["task", "checkpoint"], sort=True):
        fails: list[MetricFailure] = []
        where = _where(task, ckpt, id_domain)
        cal = attempt(partial(_calibration, grp[grp.domain == id_domain], where), fails,
                      _NEEDS_LABELS, task=task, checkpoint=ckpt, domain=id_domain)
        no_cal = "" if cal is not None else fails[-1].reason
        for domain, d in grp.groupby("domain", sort=True):
            row: dict[str, object] = {"task": task, "checkpoint": ckpt, "domain": domain,
                                      "n_examples": len(d)} | dict.fromkeys(BASELINE_COLUMNS,
                                                                            np.nan)
            at = _where(task, ckpt, domain)
            logits = attempt(partial(_matrix, d["logits"], "logits", at), fails, "baselines",
                             task=task, checkpoint=ckpt, domain=domain)
            if logits is not None:
                thunks = _label_free(d, logits, at) | (
                    _labeled(d, logits, cal) if cal is not None else {})
                for name, fn in thunks.items():
                    value = attempt(fn, fails, f"baselines.{name}", task=task, checkpoint=ckpt,
                                    domain=domain)
                    row[name] = np.nan if value is None else value
            row["reason"] = reasons(fails, domain, no_cal)
            rows.append(row)
        if failures is not None:
            failures.extend(fails)
    return pd.DataFrame(rows, columns=["task", "checkpoint", "domain", "n_examples",
                                       *BASELINE_COLUMNS, "reason"])


DETECTOR_COLUMNS = family_columns("detectors")


def _id_outputs(rows: pd.DataFrame, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(softmax, features) of the ID data: the detectors' reference, no labels needed."""
    if rows.empty:
        raise TableError(f"outputs: {where}: no rows on the ID domain")
    return (softmax(_matrix(rows["logits"], "logits", where)),
            _matrix(rows["features"], "features", where))


def _bbsd_on(id_probs: np.ndarray, d: pd.DataFrame, where: str, alpha: float) -> ShiftTest:
    return bbsd(id_probs, softmax(_matrix(d["logits"], "logits", where)), alpha)


def _mmd_on(id_features: np.ndarray, d: pd.DataFrame, where: str, **kw) -> ShiftTest:
    return mmd_test(id_features, _matrix(d["features"], "features", where), **kw)


def shift_detectors(outputs: pa.Table | pd.DataFrame, *, id_domain: str, alpha: float = 0.05,
                    n_perm: int = 200, max_n: int = 500, seed: int = 0,
                    failures: list[MetricFailure] | None = None) -> pd.DataFrame:
    """Post-deployment: BBSD (softmax, KS, Bonferroni) and MMD (features) of every domain
    ≠ `id_domain` against the same checkpoint's ID data, with statistics, p-values, and
    the decision at `alpha`. Neither needs labels. A test that cannot run is NaN with a
    `reason` (and a MetricFailure in `failures`)."""
    f = _frame(outputs)
    cols = list(DETECTOR_COLUMNS)
    rows = []
    for (task, ckpt), grp in f.groupby(["task", "checkpoint"], sort=True):
        fails: list[MetricFailure] = []
        ref = attempt(partial(_id_outputs, grp[grp.domain == id_domain],
                              _where(task, ckpt, id_domain)),
                      fails, "detectors (ID reference)", task=task, checkpoint=ckpt,
                      domain=id_domain)
        no_ref = "" if ref is not None else f"detectors: {fails[-1].error}"
        for domain, d in grp.groupby("domain", sort=True):
            if domain == id_domain:
                continue
            row: dict[str, object] = {"task": task, "checkpoint": ckpt, "domain": domain,
                                      **dict.fromkeys(cols, np.nan)}
            at = _where(task, ckpt, domain)
            if ref is not None:
                id_probs, id_feats = ref
                b = attempt(partial(_bbsd_on, id_probs, d, at, alpha), fails, "detectors.bbsd",
                            task=task, checkpoint=ckpt, domain=domain)
                m = attempt(partial(_mmd_on, id_feats, d, at, n_perm=n_perm, alpha=alpha,
                                    max_n=max_n, seed=seed),
                            fails, "detectors.mmd", task=task, checkpoint=ckpt, domain=domain)
                if b is not None:
                    row |= {"bbsd_stat": b.statistic, "bbsd_p": b.p_value, "bbsd_shift": b.shifted}
                if m is not None:
                    row |= {"mmd2": m.statistic, "mmd_p": m.p_value, "mmd_shift": m.shifted}
            row["reason"] = reasons(fails, domain, no_ref)
            rows.append(row)
        if failures is not None:
            failures.extend(fails)
    out = pd.DataFrame(rows, columns=["task", "checkpoint", "domain", *cols, "reason"])
    return out.astype({"bbsd_shift": "boolean", "mmd_shift": "boolean"})
