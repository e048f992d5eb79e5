"""Output-based baselines against answers known by construction (DESIGN §4)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.special

from circuitray.baselines import (
    LABELED_BASELINES,
    atc_predict,
    atc_threshold,
    bbsd,
    doc,
    domain_accuracy,
    fit_temperature,
    mano,
    mde,
    mmd_test,
    nuclear_norm,
    nuclear_norm_bounds,
    pre_deployment_baselines,
    rankme,
    shift_detectors,
    softmax,
)
from circuitray.errors import TableError


def outputs(logits: np.ndarray, labels: np.ndarray | None, features: np.ndarray, *,
            task: str = "t", checkpoint: str = "c", domain: str = "id") -> pd.DataFrame:
    """An outputs table whose derived columns are computed from the logits."""
    p = softmax(logits)
    return pd.DataFrame({
        "task": task, "checkpoint": checkpoint, "domain": domain,
        "example": np.arange(len(logits)),
        "label": pd.array(labels if labels is not None else [None] * len(logits), "Int64"),
        "pred": p.argmax(1), "max_prob": p.max(1),
        "neg_entropy": (p * np.log(p)).sum(1),
        "energy": -scipy.special.logsumexp(logits, axis=1),
        "logits": list(logits), "features": list(features),
    })


def test_atc_threshold_and_prediction_on_hand_made_scores() -> None:
    scores = np.arange(1, 11) / 10  # 0.1 … 1.0
    correct = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1], bool)  # ID error 0.3
    t = atc_threshold(scores, correct)
    assert t == pytest.approx(0.4)  # exactly 3 of 10 ID scores lie below it
    assert atc_predict(scores, t) == pytest.approx(0.7)  # reproduces ID accuracy
    assert atc_predict([0.35, 0.45, 0.5, 0.2], t) == pytest.approx(0.5)


def test_atc_is_exact_when_correctness_is_a_step_in_the_score() -> None:
    """ATC's identifying case: P(correct | score) is the same step on ID and target data, so
    any shift of the score distribution is read off exactly (here the step is at 0.62)."""
    rng = np.random.default_rng(0)
    conf_id, conf_t = rng.uniform(0.5, 1.0, 4000), rng.beta(2, 3, 4000)
    pred = atc_predict(conf_t, atc_threshold(conf_id, conf_id >= 0.62))
    assert pred == pytest.approx(np.mean(conf_t >= 0.62), abs=2e-3)
    assert abs(np.mean(conf_t >= 0.62) - np.mean(conf_id >= 0.62)) > 0.3  # a real shift


def test_doc_subtracts_the_confidence_drop() -> None:
    assert doc(0.8, 0.9, 0.7) == pytest.approx(0.6)


def test_temperature_scaling_recovers_planted_temperature() -> None:
    rng = np.random.default_rng(1)
    true = rng.normal(size=(3000, 5)) * 1.5
    labels = np.array([rng.choice(5, p=p) for p in softmax(true)])
    assert fit_temperature(true * 3.0, labels) == pytest.approx(3.0, rel=0.1)


def test_nuclear_norm_stays_within_its_bounds_and_attains_them() -> None:
    n, k = 40, 4
    lo, hi = nuclear_norm_bounds(n, k)
    assert nuclear_norm(np.full((n, k), 1 / k)) == pytest.approx(lo)
    assert nuclear_norm(np.eye(k)[np.arange(n) % k]) == pytest.approx(hi)
    rng = np.random.default_rng(2)
    for scale in (0.1, 1.0, 5.0):
        v = nuclear_norm(softmax(rng.normal(size=(n, k)) * scale))
        assert lo - 1e-12 <= v <= hi + 1e-12


def test_mano_mde_rankme_known_values() -> None:
    assert mano(np.zeros((10, 5))) == pytest.approx(1 / 5)  # uniform rows
    e = np.array([-1.0, -2.0, -3.0])
    assert mde(e) == pytest.approx(np.log(np.log(np.exp(e).sum()) + 2.0))
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(50, 3)))
    assert rankme(q * 7.0) == pytest.approx(3.0, rel=1e-4)  # three equal singular values


def test_bbsd_detects_planted_shift_and_stays_quiet_on_null() -> None:
    rng = np.random.default_rng(4)

    def probs(n: int, shift: float) -> np.ndarray:
        z = rng.normal(size=(n, 4))
        z[:, 0] += shift
        return softmax(z)

    assert bbsd(probs(300, 0.0), probs(300, 1.0)).shifted
    alarms = [bbsd(probs(150, 0.0), probs(150, 0.0), alpha=0.05).shifted for _ in range(100)]
    assert np.mean(alarms) <= 0.08  # Bonferroni keeps the family-wise rate ≤ α


def test_mmd_detects_planted_shift_and_stays_quiet_on_null() -> None:
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(80, 6)), rng.normal(size=(80, 6)) + 0.6
    hit = mmd_test(x, y, n_perm=200, seed=0)
    assert hit.shifted and hit.p_value < 0.01
    assert mmd_test(x, y, n_perm=200, seed=0) == hit  # seeded
    null = [mmd_test(rng.normal(size=(40, 6)), rng.normal(size=(40, 6)), n_perm=100,
                     seed=s).shifted for s in range(60)]
    assert np.mean(null) <= 0.12


def make_zoo_outputs() -> pd.DataFrame:
    rng = np.random.default_rng(6)
    frames = []
    for ck in ("c0", "c1"):
        for dom, scale, noise in (("id", 3.0, 0.0), ("ood", 1.0, 1.5)):
            labels = rng.integers(0, 3, 120)
            logits = np.eye(3)[labels] * scale + rng.normal(size=(120, 3)) * (1 + noise)
            feats = rng.normal(size=(120, 8)) + noise
            frames.append(outputs(logits, labels, feats, checkpoint=ck, domain=dom))
    return pd.concat(frames, ignore_index=True)


def test_table_gives_every_proxy_per_domain_using_only_id_labels() -> None:
    f = make_zoo_outputs()
    out = pre_deployment_baselines(f, id_domain="id")
    assert len(out) == 4
    acc = domain_accuracy(f).set_index(["checkpoint", "domain"])["accuracy"]
    for _, r in out.iterrows():
        assert r.id_acc == pytest.approx(acc[(r.checkpoint, "id")])
        assert r.nuclear_lo <= r.nuclear <= r.nuclear_hi
    idr = out[out.domain == "id"]
    # on the ID domain itself ATC and DoC reproduce the ID accuracy
    np.testing.assert_allclose(idr.atc_mc, idr.id_acc, atol=1 / 120)
    np.testing.assert_allclose(idr.doc, idr.id_acc)
    ood = out[out.domain == "ood"].set_index("checkpoint")
    assert (ood.ac < idr.set_index("checkpoint").ac).all()
    # hiding OOD labels changes nothing: baselines never read them
    hidden = f.assign(label=f.label.where(f.domain == "id"))
    pd.testing.assert_frame_equal(pre_deployment_baselines(hidden, id_domain="id"), out)
    assert np.isnan(domain_accuracy(hidden).set_index("domain").loc["ood", "accuracy"]).all()


def test_shift_detectors_flag_the_shifted_domain() -> None:
    out = shift_detectors(make_zoo_outputs(), id_domain="id", n_perm=100)
    assert list(out.domain) == ["ood", "ood"]
    assert out.mmd_shift.all() and out.bbsd_shift.all()


def test_bad_outputs_tables_name_the_problem() -> None:
    f = make_zoo_outputs()
    with pytest.raises(TableError, match="features"):  # a table-level error still raises
        pre_deployment_baselines(f.drop(columns="features"), id_domain="id")
    fails: list = []
    out = pre_deployment_baselines(f[~((f.checkpoint == "c1") & (f.domain == "id"))],
                                   id_domain="id", failures=fails)
    c1 = out[out.checkpoint == "c1"].iloc[0]
    assert np.isnan(c1.atc_mc) and np.isfinite(c1.ac)
    assert "checkpoint 'c1', domain 'id': no rows on the ID domain" in c1.reason
    assert [(x.checkpoint, x.domain) for x in fails] == [("c1", "id")]
    assert (out[out.checkpoint == "c0"].reason == "").all()


def test_unlabeled_id_domain_keeps_label_free_proxies_and_detectors() -> None:
    f = make_zoo_outputs()
    hidden = f.assign(label=f.label.where(f.domain != "id"))
    fails: list = []
    out = pre_deployment_baselines(hidden, id_domain="id", failures=fails)
    full = pre_deployment_baselines(f, id_domain="id")
    assert out[list(LABELED_BASELINES)].isna().all().all()
    free = ["ac", "ane", "energy", "nuclear", "mano", "mde", "rankme"]
    pd.testing.assert_frame_equal(out[free], full[free])  # unchanged by the missing labels
    assert out.reason.str.contains("120 of 120 ID examples are unlabeled").all()
    assert [(x.checkpoint, x.domain) for x in fails] == [("c0", "id"), ("c1", "id")]
    assert all(x.what.startswith("baselines needing ID labels") for x in fails)
    pd.testing.assert_frame_equal(shift_detectors(hidden, id_domain="id", n_perm=50),
                                  shift_detectors(f, id_domain="id", n_perm=50))


def test_labels_outside_the_head_are_named_not_an_index_error() -> None:
    f = make_zoo_outputs()
    bad = f.assign(label=f.label.where(~((f.checkpoint == "c1") & (f.example < 2)), 7))
    fails: list = []
    out = pre_deployment_baselines(bad, id_domain="id", failures=fails).set_index(
        ["checkpoint", "domain"])
    assert out.loc[("c1", "ood"), list(LABELED_BASELINES)].isna().all()
    assert np.isfinite(out.loc[("c0", "ood"), list(LABELED_BASELINES)].astype(float)).all()
    assert "checkpoint 'c1', domain 'id': labels [7] outside the model head's 3 classes" in \
        fails[0].error
    acc = domain_accuracy(bad, failures=fails).set_index(["checkpoint", "domain"])
    assert np.isnan(acc.loc[("c1", "ood"), "accuracy"]) and "labels [7]" in acc.loc[
        ("c1", "ood"), "reason"]
    assert np.isfinite(acc.loc[("c0", "ood"), "accuracy"])


def test_all_zero_features_make_only_rankme_nan() -> None:
    f = make_zoo_outputs()
    zero = f.assign(features=[np.zeros(8)] * len(f))
    fails: list = []
    out = pre_deployment_baselines(zero, id_domain="id", failures=fails)
    assert out.rankme.isna().all() and np.isfinite(out.drop(columns=[
        "task", "checkpoint", "domain", "reason", "rankme"]).astype(float)).all().all()
    assert out.reason.str.fullmatch("baselines.rankme: RankMe: features are all zero").all()
    assert len(fails) == 4 and {x.error_type for x in fails} == {"MetricError"}
