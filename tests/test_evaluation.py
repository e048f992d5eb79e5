"""Evaluation protocol: signed composite, bootstrap intervals, partial/within-group, alarm."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from circuitray.errors import MetricError
from circuitray.evaluation import (
    PAPER_RESULTS,
    PARTIAL_COLUMNS,
    _partial_replicates,
    _replicates,
    _weights,
    best_and_worst_runs,
    best_baseline,
    calibrate_threshold,
    correlation_stats,
    direction,
    evaluate,
    partial_correlations,
    partial_spearman,
    post_deployment,
    pre_deployment,
    result_table,
    silent_failure_alarm,
    usable_checkpoints,
    with_partial_given_best,
    within_group,
)

X = [1, 2, 3, 4, 5]
Y = [2, 1, 4, 3, 5]  # r = 8/10, ρ = 0.8, τ = (8 − 2)/10 = 0.6 by hand


def test_composite_on_planted_case_equals_hand_computed() -> None:
    st = correlation_stats(X, Y, metric_direction=+1, n_boot=50)
    assert st["r"] == pytest.approx(0.8)
    assert st["r2_signed"] == pytest.approx(0.64)
    assert st["srcc"] == pytest.approx(0.8)
    assert st["krcc"] == pytest.approx(0.6)
    assert st["composite"] == pytest.approx((0.64 + 0.8 + 0.6) / 3)


def test_backwards_proxy_cannot_gain_from_r2() -> None:
    """A metric expected to fall with accuracy (CSS) that rises instead scores −composite:
    R² enters as sign(r)·R², so a plain R² of +0.64 cannot lift it."""
    st = correlation_stats(X, Y, metric_direction=direction("css_srcc"), n_boot=50)
    assert st["r2_signed"] == pytest.approx(-0.64)
    assert st["composite"] == pytest.approx(-(0.64 + 0.8 + 0.6) / 3)


def test_bootstrap_replicates_equal_scipy_on_the_resampled_points() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=25)
    y = np.round(x + rng.normal(size=25))  # ties in y, and resampling ties in x
    w = _weights(25, 3, rng)
    reps = _replicates(x, y, w)
    for b in range(4):
        idx = np.repeat(np.arange(25), w[b].astype(int))
        want = [scipy.stats.pearsonr(x[idx], y[idx]).statistic,
                scipy.stats.spearmanr(x[idx], y[idx]).statistic,
                scipy.stats.kendalltau(x[idx], y[idx]).statistic]
        np.testing.assert_allclose(reps[b, [0, 2, 3]], want, rtol=1e-10)


def test_bootstrap_interval_is_seeded_and_covers_the_truth_about_95_percent() -> None:
    rng = np.random.default_rng(1)
    cov = [[1.0, 0.5], [0.5, 1.0]]
    x, y = rng.multivariate_normal([0, 0], cov, size=40).T
    a = correlation_stats(x, y, n_boot=200, seed=7)
    assert a == correlation_stats(x, y, n_boot=200, seed=7)
    assert a["r_lo"] < a["r"] < a["r_hi"]
    hits = 0
    for _ in range(150):
        x, y = rng.multivariate_normal([0, 0], cov, size=40).T
        st = correlation_stats(x, y, n_boot=300, seed=int(rng.integers(1 << 30)))
        hits += st["r_lo"] <= 0.5 <= st["r_hi"]
    assert 0.85 <= hits / 150 <= 0.99


def test_too_small_or_constant_zoo_gives_nan_with_reason() -> None:
    st = correlation_stats([1, 2, 3], [0.5, 0.6, 0.7])
    assert np.isnan(st["composite"]) and "too few points: n=3 < 4" in st["reason"]
    st = correlation_stats([1, 1, 1, 1, 1], [0.5, 0.6, 0.7, 0.8, 0.9])
    assert np.isnan(st["srcc"]) and "constant" in st["reason"]
    st = correlation_stats([1, 2, np.nan, 4, 5, 6], [1, 2, 3, 4, 5, 7], n_boot=20)
    assert st["n"] == 5 and "1 point(s) with NaN dropped" in st["reason"]


def test_unknown_metric_has_no_silent_direction() -> None:
    with pytest.raises(MetricError, match="'mystery'"):
        direction("mystery")
    assert direction("ddb_out_0.3") == 1 and direction("css_netlsd") == -1
    assert direction("atc_ne_ts") == 1 and direction("energy") == -1


def zoo(seed: int = 0, n: int = 12) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frames = []
    for task, noise in (("bg", 0.05), ("patch", 0.5)):
        ood = rng.uniform(0.4, 0.9, n)
        frames.append(pd.DataFrame({
            "task": task, "checkpoint": [f"c{i}" for i in range(n)], "ood_acc": ood,
            "ddb_out_0.3": ood + noise * rng.normal(size=n),
            "ac": rng.normal(size=n), "setting": np.repeat(["s0", "s1"], n // 2)}))
    return pd.concat(frames, ignore_index=True)


def test_pre_deployment_reports_tasks_separately_and_their_mean() -> None:
    out = pre_deployment(zoo(), metrics=["ddb_out_0.3", "ac"], n_boot=100)
    g = out[out.level == "group"].set_index(["task", "metric"])
    assert g.loc[("bg", "ddb_out_0.3"), "composite"] > g.loc[("patch", "ddb_out_0.3"), "composite"]
    mean = out[(out.level == "mean") & (out.metric == "ddb_out_0.3")].iloc[0]
    assert mean.task == "all" and mean.n_groups == 2
    want = g.xs("ddb_out_0.3", level="metric")["composite"].mean()
    assert mean.composite == pytest.approx(want)
    assert mean.composite_lo < mean.composite < mean.composite_hi


def test_post_deployment_averages_models_within_task() -> None:
    rng = np.random.default_rng(2)
    rows = [{"task": "t", "checkpoint": c, "domain": d, "accuracy": a,
             "css_srcc": (1 - a) + 0.05 * rng.normal()}
            for c in ("m0", "m1", "m2") for d, a in enumerate(rng.uniform(0.3, 0.95, 6))]
    out = post_deployment(pd.DataFrame(rows), metrics=["css_srcc"], n_boot=50)
    assert set(out.level) == {"group", "mean"}
    task_mean = out[(out.level == "mean") & (out.task == "t")].iloc[0]
    assert task_mean.n_groups == 3 and task_mean.srcc > 0.5  # oriented: CSS ↑, accuracy ↓


def test_within_group_removes_between_setting_signal() -> None:
    rng = np.random.default_rng(3)
    n = 20
    setting = np.repeat(["a", "b"], n)
    ood = np.where(setting == "a", 0.5, 0.8) + 0.02 * rng.normal(size=2 * n)
    metric = np.where(setting == "a", 0.0, 1.0) + 0.1 * rng.normal(size=2 * n)  # only setting
    f = pd.DataFrame({"task": "t", "setting": setting, "ood_acc": ood, "ddb_out_0.3": metric})
    pooled = evaluate(f, metrics=["ddb_out_0.3"], target="ood_acc", n_boot=100)
    within = within_group(f, metrics=["ddb_out_0.3"], target="ood_acc", group_col="setting",
                          n_boot=100)
    assert pooled.srcc.iloc[0] > 0.6
    w = within[(within.task == "t") & (within.level == "mean")].iloc[0]
    assert abs(w.srcc) < 0.35 and w.srcc_lo < 0 < w.srcc_hi


def test_within_group_rows_per_setting_and_too_small_settings_keep_their_n() -> None:
    """Per-regime rows beside their mean: a regime of 4 models (< 5) is NaN with its n and
    a reason, and the mean over regimes averages only the evaluated ones."""
    rng = np.random.default_rng(5)
    regime = np.repeat(["full", "last2", "linear"], [12, 8, 4])
    ood = rng.uniform(0.3, 0.9, len(regime))
    f = pd.DataFrame({"task": "t", "regime": regime, "ood_acc": ood,
                      "ddb_out_0.3": ood + 0.05 * rng.normal(size=len(ood))})
    out = within_group(f, metrics=["ddb_out_0.3"], target="ood_acc", group_col="regime",
                       n_boot=100)
    assert set(out.group_column) == {"regime"}
    g = out[out.level == "group"].set_index("group")
    assert g.loc["full", "n"] == 12 and g.loc["last2", "n"] == 8
    assert g.loc["linear", "n"] == 4 and np.isnan(g.loc["linear", "srcc"])
    assert "n=4 < 5" in g.loc["linear", "reason"]
    want = scipy.stats.spearmanr(f.loc[f.regime == "full", "ddb_out_0.3"],
                                 f.loc[f.regime == "full", "ood_acc"]).statistic
    assert g.loc["full", "srcc"] == pytest.approx(want)
    mean = out[(out.level == "mean") & (out.task == "t")].iloc[0]
    assert mean.group == "all" and mean.n_groups == 2
    assert mean.srcc == pytest.approx(g.loc[["full", "last2"], "srcc"].mean())


def test_partial_spearman_equals_rank_residual_correlation_and_detects_added_information() -> None:
    rng = np.random.default_rng(4)
    n = 60
    z, u = rng.normal(size=n), rng.normal(size=n)
    y = z + u
    redundant, informative = z + 0.1 * rng.normal(size=n), u + 0.3 * rng.normal(size=n)
    rx, ry, rz = (scipy.stats.rankdata(v) for v in (informative, y, z))
    design = np.column_stack([np.ones(n), rz])
    res = [v - design @ np.linalg.lstsq(design, v, rcond=None)[0] for v in (rx, ry)]
    assert partial_spearman(informative, y, z) == pytest.approx(np.corrcoef(*res)[0, 1])
    f = pd.DataFrame({"task": "t", "ood_acc": y, "ddb_out_0.3": informative,
                      "ddb_deep_0.3": redundant, "ac": z})
    out = partial_correlations(f, circuit_metrics=["ddb_out_0.3", "ddb_deep_0.3"],
                               baselines=["ac"], target="ood_acc", n_boot=200).set_index("metric")
    assert out.loc["ddb_out_0.3", "partial_srcc_lo"] > 0.3
    assert out.loc["ddb_deep_0.3", "partial_srcc_lo"] < 0 < out.loc["ddb_deep_0.3",
                                                                     "partial_srcc_hi"]


def _rank_residual_partial(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Independent partial Spearman: correlate the residuals of rank(x) and rank(y) after
    a least-squares fit on rank(z)."""
    rx, ry, rz = (scipy.stats.rankdata(v) for v in (x, y, z))
    design = np.column_stack([np.ones(len(x)), rz])
    res = [v - design @ np.linalg.lstsq(design, v, rcond=None)[0] for v in (rx, ry)]
    return float(np.corrcoef(*res)[0, 1])


def test_partial_given_best_baseline_sits_beside_each_circuit_metric() -> None:
    """Per task, conditioned on the output baseline with the highest SRCC (ac, not the
    noise `energy`): a circuit metric that is the baseline plus a little noise has partial
    ≈ 0 (its interval covers 0), one carrying the rest of the signal has partial > 0.3, and
    an exact monotone function of the baseline is NaN with a reason, not a number."""
    rng = np.random.default_rng(6)
    frames = []
    for task in ("a", "b"):
        n = 60
        z, u = rng.normal(size=n), rng.normal(size=n)
        frames.append(pd.DataFrame({
            "task": task, "ood_acc": z + u, "ac": z, "energy": rng.normal(size=n),
            "ddb_out_0.3": u + 0.3 * rng.normal(size=n),
            "ddb_deep_0.3": z + 0.1 * rng.normal(size=n),
            "ddb_global_0.3": np.exp(z)}))
    f = pd.concat(frames, ignore_index=True)
    metrics = ["ddb_out_0.3", "ddb_deep_0.3", "ddb_global_0.3", "ac", "energy"]
    pre = pre_deployment(f, metrics=metrics, n_boot=300)
    out = with_partial_given_best(pre, f, target="ood_acc", n_boot=300)
    assert out.drop(columns=list(PARTIAL_COLUMNS)).equals(pre)  # the statistics unchanged
    g = out[out.level == "group"].set_index(["task", "metric"])
    for task in ("a", "b"):
        part = f[f.task == task]
        row = g.loc[(task, "ddb_out_0.3")]
        assert row.partial_given == "ac" and row.partial_n == 60
        assert row.partial_srcc == pytest.approx(_rank_residual_partial(
            part["ddb_out_0.3"], part["ood_acc"], part["ac"]))
        assert row.partial_srcc_lo > 0.3
        red = g.loc[(task, "ddb_deep_0.3")]
        assert red.partial_srcc_lo < 0 < red.partial_srcc_hi and abs(red.partial_srcc) < 0.3
        same = g.loc[(task, "ddb_global_0.3")]
        assert np.isnan(same.partial_srcc) and "exactly as the baseline" in same.partial_reason
        assert g.loc[(task, "ac"), "partial_given"] == ""  # baselines get no partial
        assert np.isnan(g.loc[(task, "energy"), "partial_srcc"])
    assert (out.loc[out.level == "mean", "partial_given"] == "").all()
    # paired with the metric's own statistics: task b (group 1), metric 0, same seed
    b = f[f.task == "b"]
    w = _weights(60, 300, np.random.default_rng([0, 1, 0]))
    reps = _partial_replicates(b["ddb_out_0.3"].to_numpy(), b["ood_acc"].to_numpy(),
                               b["ac"].to_numpy(), w)
    assert np.percentile(reps[1:], [2.5, 97.5]) == pytest.approx(
        g.loc[("b", "ddb_out_0.3"), ["partial_srcc_lo", "partial_srcc_hi"]].to_numpy(float))
    srcc = _replicates(b["ddb_out_0.3"].to_numpy(), b["ood_acc"].to_numpy(), w)[:, 2]
    assert np.percentile(srcc[1:], [2.5, 97.5]) == pytest.approx(
        g.loc[("b", "ddb_out_0.3"), ["srcc_lo", "srcc_hi"]].to_numpy(float))


def test_best_baseline_is_the_highest_oriented_srcc_among_output_metrics() -> None:
    rows = pd.DataFrame({
        "metric": ["ddb_out_0.3", "id_acc", "ac", "atc_mc", "energy"],
        "srcc": [0.9, np.nan, 0.5, 0.7, -0.8],  # energy ranks backwards: not "best"
        "composite": [0.8, np.nan, 0.4, 0.6, -0.7]})
    assert best_baseline(rows) == "atc_mc"
    tie = rows.assign(srcc=[0.9, np.nan, 0.7, 0.7, -0.8], composite=[0.8, np.nan, 0.5, 0.6, 0])
    assert best_baseline(tie) == "atc_mc"  # equal SRCC: the higher composite
    assert best_baseline(rows[rows.metric == "ddb_out_0.3"]) is None


def test_ddb_figure_runs_are_chosen_by_final_ood_accuracy() -> None:
    """Run r1 peaks at 0.95 mid-training but ends at 0.30: the worst, never the best; r3
    has one checkpoint and r4 no final one: neither is eligible."""
    rows = pd.DataFrame({
        "parent_id": ["r1"] * 3 + ["r2"] * 2 + ["r3"] + ["r4"] * 2,
        "epoch": [1, 2, 3, 1, 3, 3, 1, 2],
        "final": [False, False, True, False, True, True, False, False],
        "accuracy": [0.5, 0.95, 0.30, 0.6, 0.8, 0.99, 0.9, 0.97],
        "ddb_out_0.3": [0.1, 0.2, 0.3, 0.1, 0.2, 0.5, 0.1, 0.2]})
    got = best_and_worst_runs(rows, metric="ddb_out_0.3")
    assert (got["best_run"], got["worst_run"], got["n_runs"]) == ("r2", "r1", 2)
    assert (got["best_final_acc"], got["worst_final_acc"]) == (0.8, 0.3)
    assert got["note"] == ""
    no_flag = best_and_worst_runs(rows.drop(columns="final"), metric="ddb_out_0.3")
    assert (no_flag["best_run"], no_flag["worst_run"]) == ("r4", "r1")  # last epoch is final
    none = best_and_worst_runs(rows[rows.parent_id == "r3"], metric="ddb_out_0.3")
    assert none["n_runs"] == 0 and "no run with >= 2 checkpoints" in none["note"]
    nan_ddb = best_and_worst_runs(rows.assign(**{"ddb_out_0.3": np.nan}), metric="ddb_out_0.3")
    assert nan_ddb["n_runs"] == 0


def test_alarm_threshold_is_metric_at_proxy_accuracy_closest_to_delta() -> None:
    proxy_css, proxy_acc = [0.1, 0.2, 0.35, 0.5], [0.95, 0.88, 0.79, 0.6]
    assert calibrate_threshold(proxy_css, proxy_acc, 0.8) == 0.35
    assert calibrate_threshold(proxy_css, proxy_acc, 0.9) == 0.2
    proxy = pd.DataFrame({"task": "t", "checkpoint": "m", "accuracy": proxy_acc,
                          "css_srcc": proxy_css, "ac": [0.9, 0.8, 0.7, 0.6]})
    deploy = pd.DataFrame({"task": "t", "checkpoint": "m", "accuracy": [0.9, 0.85, 0.82, 0.5],
                           "css_srcc": [0.1, 0.3, 0.4, 0.6], "ac": [0.95, 0.75, 0.65, 0.5]})
    out = silent_failure_alarm(deploy, proxy, metrics=["css_srcc", "ac"], deltas=[0.8])
    css = out[(out.metric == "css_srcc") & (out.level == "delta")].iloc[0]
    # δ'=0.35: alarms on 0.4 and 0.6 (CSS above δ'), only the 0.5-accuracy domain fails
    assert (css.precision, css.recall, css.f1) == pytest.approx((0.5, 1.0, 2 / 3))
    assert css.auroc == pytest.approx(1.0)
    ac = out[(out.metric == "ac") & (out.level == "delta")].iloc[0]
    # AC is a + metric: δ' = 0.7, alarms where AC < 0.7 (0.65, 0.5)
    assert ac.f1 == pytest.approx(2 / 3)


def test_alarm_without_failing_domains_is_nan_with_reason() -> None:
    f = pd.DataFrame({"task": "t", "checkpoint": "m", "accuracy": [0.95, 0.97],
                      "css_srcc": [0.1, 0.2]})
    out = silent_failure_alarm(f, f, metrics=["css_srcc"], deltas=[0.8])
    row = out[out.level == "delta"].iloc[0]
    assert np.isnan(row.f1) and "no deployment domain fails" in row.reason


def test_result_table_puts_circuit_metrics_and_baselines_side_by_side() -> None:
    f = zoo()
    pre = pre_deployment(f, metrics=["ddb_out_0.3", "ac"], n_boot=50)
    table = result_table(pre=pre)
    assert list(table.metric) == ["ddb_out_0.3", "ac"]  # sorted by composite, best first
    assert list(table.kind) == ["circuit", "output"]  # the registry's kinds
    assert table.paper_pre_composite.tolist() == [PAPER_RESULTS["pre"]["ddb_out_0.3"],
                                                  PAPER_RESULTS["pre"]["ac"]]
    for col in ("pre_composite", "pre_composite_lo", "pre_composite_hi", "pre_srcc_lo"):
        assert col in table.columns


def test_metrics_baselines_and_evaluation_never_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, circuitray.metrics, circuitray.baselines, circuitray.evaluation; "
            "print([m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_result_table_joins_pre_post_and_alarm_rows_per_metric() -> None:
    rng = np.random.default_rng(8)
    pre = pre_deployment(zoo(), metrics=["ddb_out_0.3", "ac"], n_boot=50)
    rows = []
    for c in ("m0", "m1", "m2", "m3"):
        for d, a in enumerate(rng.uniform(0.5, 0.99, 6)):
            rows.append({"task": "t", "checkpoint": c, "domain": f"d{d}", "accuracy": a,
                         "css_srcc": 1 - a + 0.05 * rng.normal(), "ac": rng.normal()})
    post_frame = pd.DataFrame(rows)
    post = post_deployment(post_frame, metrics=["css_srcc", "ac"], n_boot=50)
    alarm = silent_failure_alarm(post_frame, post_frame, metrics=["css_srcc", "ac"])
    table = result_table(pre=pre, post=post, alarm=alarm).set_index("metric")
    assert set(table.index) == {"ddb_out_0.3", "ac", "css_srcc"}
    assert np.isnan(table.loc["css_srcc", "pre_composite"])  # not a pre-deployment metric
    assert table.loc["css_srcc", "post_composite"] > 0.5
    assert table.loc["css_srcc", "paper_post_composite"] == PAPER_RESULTS["post"]["css_srcc"]
    assert table.loc["css_srcc", "alarm_auroc"] > table.loc["ac", "alarm_auroc"]
    assert table.loc["css_srcc", "kind"] == "circuit" and table.loc["ac", "kind"] == "output"


def test_direction_patterns_do_not_swallow_other_columns() -> None:
    for name in ("accuracy", "ood_acc", "temperature", "nuclear_lo", "n_examples"):
        with pytest.raises(MetricError):
            direction(name)


def _outside(table: pd.DataFrame) -> list[str]:
    """'<task>/<metric>/<stat>' of every finite estimate outside its finite [lo, hi]."""
    bad = []
    for _, row in table.iterrows():
        for s in ("r", "r2_signed", "srcc", "krcc", "composite"):
            v, lo, hi = row[s], row[f"{s}_lo"], row[f"{s}_hi"]
            if np.isfinite([v, lo, hi]).all() and not lo <= v <= hi:
                bad.append(f"{row.task}/{row.metric}/{s}: {v:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return bad


def shifted_zoo(n_models: int, n_domains: int, seed: int = 0) -> pd.DataFrame:
    """Models × shifted domains whose metrics follow accuracy with model-specific noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for task in ("bg", "patch"):
        for c in range(n_models):
            noise = rng.uniform(0.02, 0.3)
            for d, a in enumerate(rng.uniform(0.3, 0.95, n_domains)):
                rows.append({"task": task, "checkpoint": f"m{c}", "domain": f"d{d}",
                             "accuracy": a, "css_srcc": 1 - a + noise * rng.normal(),
                             "rankme": a + noise * rng.normal()})
    return pd.DataFrame(rows)


def test_post_deployment_mean_estimates_lie_inside_their_intervals() -> None:
    """The per-model statistics' mean is bootstrapped by resampling models. Averaging the
    models' own (small-n, biased) bootstrap replicates instead put 4 of 30 estimates here
    outside their intervals, e.g. the mean over tasks of css_srcc: srcc +0.732 [+0.680, +0.723]."""
    f = shifted_zoo(n_models=150, n_domains=10)
    out = post_deployment(f, metrics=["css_srcc", "rankme"], n_boot=200)
    means = out[out.level == "mean"]
    assert len(means) == 6 and (means.n_groups >= 2).all()
    assert _outside(means) == []
    task = means[(means.task == "bg") & (means.metric == "css_srcc")].iloc[0]
    per_model = out[(out.level == "group") & (out.task == "bg") & (out.metric == "css_srcc")]
    assert task.srcc == pytest.approx(per_model.srcc.mean())
    assert task.srcc_hi - task.srcc_lo < 0.1  # 150 models: a tight interval, not a wide one


def test_pre_deployment_estimates_lie_inside_their_intervals() -> None:
    rng = np.random.default_rng(8)
    frames = []
    for t in range(4):
        ood = rng.uniform(0.4, 0.9, 30)
        frames.append(pd.DataFrame({
            "task": f"t{t}", "checkpoint": [f"c{i}" for i in range(30)], "ood_acc": ood,
            "ddb_out_0.3": ood + rng.uniform(0.01, 0.3) * rng.normal(size=30),
            "id_acc": ood + 0.1 * rng.normal(size=30), "ac": rng.normal(size=30)}))
    out = pre_deployment(pd.concat(frames, ignore_index=True),
                         metrics=["ddb_out_0.3", "id_acc", "ac"], n_boot=200)
    assert len(out[out.level == "mean"]) == 3
    assert _outside(out) == []


def test_post_deployment_all_averages_each_task_once() -> None:
    """'all' is the mean of the per-task means: a task with 3× the models weighs the same."""
    big, small = shifted_zoo(n_models=12, n_domains=6, seed=1), shifted_zoo(4, 6, seed=2)
    f = pd.concat([big[big.task == "bg"], small[small.task == "patch"]], ignore_index=True)
    out = post_deployment(f, metrics=["css_srcc"], n_boot=50)
    means = out[out.level == "mean"].set_index("task")
    assert means.loc["all", "srcc"] == pytest.approx(means.loc[["bg", "patch"], "srcc"].mean())
    assert means.loc["all", "n_groups"] == 2 and means.loc["bg", "n_groups"] == 12
    assert means.loc["all", "n"] == 16 * 6


def test_post_deployment_mean_of_one_model_keeps_that_models_interval() -> None:
    f = shifted_zoo(n_models=1, n_domains=8)
    out = post_deployment(f[f.task == "bg"], metrics=["css_srcc"], n_boot=50)
    group, mean = out[out.level == "group"].iloc[0], out[out.task == "bg"].iloc[-1]
    assert mean.level == "mean"
    assert (mean.srcc_lo, mean.srcc_hi) == pytest.approx((group.srcc_lo, group.srcc_hi))
    assert mean.srcc_lo < mean.srcc_hi


def test_pre_deployment_with_several_ood_domains_counts_each_task_once() -> None:
    """Task 'bg' seen on two OOD domains, 'patch' on one: the mean over tasks is
    mean(mean(bg on d0, bg on d1), patch), not the mean of three groups."""
    f = zoo(n=16)
    f = pd.concat([f.assign(domain="d0"), f[f.task == "bg"].assign(
        domain="d1", ood_acc=lambda d: d.ood_acc[::-1].to_numpy())], ignore_index=True)
    out = pre_deployment(f, metrics=["ddb_out_0.3"], by=("task", "domain"), n_boot=100)
    g = out[out.level == "group"].set_index(["task", "domain"]).composite
    assert len(g) == 3
    per_task = out[(out.level == "mean") & (out.task != "all")].set_index("task")
    assert set(per_task.domain) == {"all"}
    assert per_task.loc["bg", "composite"] == pytest.approx(g["bg"].mean())
    assert per_task.loc["bg", "n_groups"] == 2
    overall = out[out.task == "all"].iloc[0]
    assert overall.domain == "all" and overall.n_groups == 2
    assert overall.composite == pytest.approx((g["bg"].mean() + g[("patch", "d0")]) / 2)
    assert overall.composite != pytest.approx(g.mean())
    assert _outside(out) == []


def test_task_with_fewer_than_three_usable_checkpoints_is_marked_to_skip() -> None:
    nan = np.nan
    frame = pd.DataFrame({
        "task": ["a"] * 4 + ["b"] * 4,
        "ood_acc": [0.5, 0.6, 0.7, 0.8, 0.5, nan, 0.7, 0.8],
        "ac": [0.1, 0.2, 0.3, 0.4, nan, 0.2, 0.3, 0.4],
        "rankme": [nan, 1.0, 2.0, 3.0, nan, 1.0, nan, 3.0],
    })
    out = usable_checkpoints(frame, metrics=["ac", "rankme"], target="ood_acc").set_index("task")
    assert out.n_usable.to_dict() == {"a": 4, "b": 2}  # b: no metric / no target in two rows
    assert out.evaluate.to_dict() == {"a": True, "b": False}
    assert out.note.to_dict() == {"a": "", "b": "task b: only 2 usable checkpoints (need 3)"}


def test_usable_checkpoints_count_checkpoints_not_rows_with_two_ood_domains() -> None:
    """Two OOD domains give two rows per checkpoint, and each domain is evaluated on its
    own: two checkpoints are two, not four, and a domain with fewer decides."""
    frame = pd.DataFrame({
        "task": ["a"] * 4 + ["b"] * 6,
        "checkpoint": ["c0", "c0", "c1", "c1"] + ["c0", "c1", "c2", "c0", "c1", "c2"],
        "domain": ["x", "y", "x", "y"] + ["x", "x", "x", "y", "y", "y"],
        "ood_acc": [0.5, 0.6, 0.7, 0.8] + [0.5, 0.6, 0.7, 0.5, np.nan, 0.7],
        "ac": [0.1, 0.2, 0.3, 0.4] + [0.1, 0.2, 0.3, 0.1, 0.2, 0.3],
    })
    out = usable_checkpoints(frame, metrics=["ac"], target="ood_acc").set_index("task")
    assert out.n_usable.to_dict() == {"a": 2, "b": 2}  # b: domain y lacks c1's target
    assert not out.evaluate.any()
