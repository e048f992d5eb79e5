"""The metric registry: one place declares a metric, and every table, the evaluation, the
printed report and MLflow follow from it; an unregistered column is an error, not a drop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _jobdata import write_checkpoints
from mlflow.tracking import MlflowClient

from circuitray import registry
from circuitray.errors import ConfigError, MetricError
from circuitray.job_config import load_job_config
from circuitray.registry import (
    POST,
    PRE,
    MetricSpec,
    direction,
    lambda_cell,
    lambda_column,
    lambda_columns,
    lambda_size,
    metric_columns,
    registered,
    spec_for,
)
from circuitray.report import format_report
from circuitray.runtime.layout import JobLayout
from circuitray.runtime.pipeline import PipelineResult, run_pipeline
from circuitray.tables import read_parquet

CONF = Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml"

# The oracle: each built-in metric's expected direction as evaluation.DIRECTIONS fixed it
# before the registry existed (one example column per pattern).
EXPECTED_DIRECTIONS = {
    "ddb_out_0.3": +1, "ddb_deep_0.5": +1, "ddb_global_0.2": +1,
    "css_srcc": -1, "css_pearson": -1, "css_netlsd": -1, "css_jaccard_weighted": -1,
    "id_acc": +1, "ac": +1, "ac_ts": +1, "ane": +1,
    "atc_mc": +1, "atc_ne": +1, "atc_mc_ts": +1, "atc_ne_ts": +1,
    "doc": +1, "nuclear": +1, "mano": +1, "mde": +1, "energy": -1, "rankme": +1,
    "bbsd_stat": -1, "bbsd_p": +1, "mmd2": -1, "mmd_p": +1,
}
DESCRIPTORS = ("lam_0_1", "lam_3_3", "bbsd_shift", "mmd_shift", "temperature", "nuclear_lo",
               "nuclear_hi", "accuracy", "n", "n_labeled")


def test_every_builtin_direction_equals_the_fixed_oracle() -> None:
    for column, sign in EXPECTED_DIRECTIONS.items():
        assert direction(column) == sign, column
    evaluated = [s for s in registry.specs() if s.compute is None and s.evaluated]
    for spec in evaluated:  # no built-in metric escapes the oracle
        assert any(spec.matches(c) for c in EXPECTED_DIRECTIONS), spec.name


def test_descriptors_and_unknown_columns_have_no_direction() -> None:
    for column in DESCRIPTORS:
        assert spec_for(column).kind == "descriptor"
        with pytest.raises(MetricError, match=f"'{column}' is a descriptor"):
            direction(column)
    for column in ("mystery", "ood_acc", "lr", "n_examples"):
        with pytest.raises(MetricError, match=f"column '{column}' is not a registered metric"):
            spec_for(column)


def test_stages_pick_the_metrics_each_protocol_step_evaluates() -> None:
    columns = ["task", "lr", "accuracy", "ddb_out_0.5", "lam_0_0", "css_srcc", "id_acc", "ac",
               "temperature", "bbsd_stat", "bbsd_shift", "mmd_p"]
    assert metric_columns(columns, stage="pre") == ["ddb_out_0.5", "id_acc", "ac"]
    assert metric_columns(columns, stage="post") == ["css_srcc", "ac", "bbsd_stat", "mmd_p"]
    assert metric_columns(columns, stage="alarm") == metric_columns(columns, stage="post")
    assert metric_columns(columns, kind="circuit") == ["ddb_out_0.5", "css_srcc"]
    assert metric_columns(columns, kind="descriptor") == [
        "accuracy", "lam_0_0", "temperature", "bbsd_shift"]


def test_report_order_is_circuit_then_output_then_detector_whatever_the_input_order() -> None:
    with registered(MetricSpec("late_circuit", "circuit", +1, "toy", PRE,
                               compute=lambda d, i: 0.0)):
        got = registry.ordered(["mmd2", "ac", "unknown", "late_circuit", "css_l2", "ddb_out_0.3",
                                "id_acc"])
    assert got == ["ddb_out_0.3", "css_l2", "late_circuit", "id_acc", "ac", "mmd2", "unknown"]


def test_lambda_column_names_round_trip() -> None:
    for d in (1, 4, 14):
        names = lambda_columns(d)
        assert lambda_size(names) == d and lambda_size(["task", *names, "ddb_out_0.3"]) == d
        assert [lambda_cell(c) for c in names] == [(i, j) for i in range(d) for j in range(d)]
    assert lambda_column(2, 11) == "lam_2_11" and lambda_cell("lam_2_11") == (2, 11)
    assert lambda_cell("lam_x_1") is None and lambda_cell("ddb_out_0.3") is None
    assert lambda_size(["task"]) == 0
    with pytest.raises(MetricError, match="full square"):
        lambda_size(lambda_columns(3)[:-1])


def test_depth_metrics_columns_read_back_through_the_registry_names() -> None:
    from _synthetic import synthetic_edges

    from circuitray.metrics.depth import depth_metrics, lambda_matrices

    table = depth_metrics(synthetic_edges(n_blocks=3, n_heads=2, checkpoints=["c0", "c1"],
                                          domains=["id"]))
    lam = [c for c in table.columns if lambda_cell(c)]
    assert lam == lambda_columns(5)  # 3 blocks + input + logits, row-major
    assert lambda_matrices(table).shape == (len(table), 5, 5)


def test_registering_a_name_already_claimed_or_an_invalid_spec_is_an_error() -> None:
    with pytest.raises(MetricError, match="'ddb_custom' is already claimed by .*'ddb_\\*'"):
        registry.register(MetricSpec("ddb_custom", "circuit", +1, "toy", PRE,
                                     compute=lambda d, i: 0.0))
    with pytest.raises(MetricError, match="descriptor is never evaluated"):
        MetricSpec("x", "descriptor", +1, "toy", family="baselines")
    with pytest.raises(MetricError, match="needs direction"):
        MetricSpec("x", "output", 0, "toy", PRE, family="baselines")
    with pytest.raises(MetricError, match="exact name"):
        MetricSpec("toy_*", "output", 1, "toy", PRE, compute=lambda d, i: 0.0)
    with registered(MetricSpec("toy", "output", 1, "toy", PRE, compute=lambda d, i: 0.0)):
        assert spec_for("toy").family == registry.PLUGINS
    with pytest.raises(MetricError, match="'toy'"):
        spec_for("toy")  # gone again after the with-block


def test_an_unregistered_column_from_a_family_stops_domain_frame_naming_it() -> None:
    from circuitray.runtime.reduce import domain_frame

    keys = {"task": ["t"], "checkpoint": ["c"], "domain": ["ood"]}
    domains = pd.DataFrame(keys | {"role": ["ood"], "kind": [""], "severity": [0],
                                   "n_examples": [8]})
    per = {"baselines": pd.DataFrame(keys | {"ac": [0.5], "mystery": [1.0], "reason": [""]})}
    with pytest.raises(MetricError, match="'mystery'.*register"):
        domain_frame(domains, per)
    per["baselines"] = per["baselines"].drop(columns="mystery")
    assert domain_frame(domains, per)["ac"].tolist() == [0.5]


def test_the_baseline_family_computes_exactly_the_columns_it_declares() -> None:
    from test_baselines import outputs

    from circuitray.baselines import BASELINE_COLUMNS, pre_deployment_baselines

    rng = np.random.default_rng(0)
    frames = [outputs(rng.normal(size=(40, 3)) * 3, rng.integers(0, 3, 40),
                      rng.normal(size=(40, 6)), domain=d) for d in ("id", "ood")]
    table = pre_deployment_baselines(pd.concat(frames, ignore_index=True), id_domain="id")
    assert BASELINE_COLUMNS == registry.family_columns("baselines")
    assert table[list(BASELINE_COLUMNS)].notna().all().all(), table.reason.tolist()


# ---- one toy metric per source, registered in one place, through the whole job ------------

def _toys() -> tuple[MetricSpec, MetricSpec]:
    """Two plug-ins: one from the outputs (pre-deployment), one from the edges (post-
    deployment) that refuses severity-5 domains, to show its failures stay NaN + reason.
    Nested functions: Ray ships them to its workers by value."""
    def mean_max_prob_power(domain: pd.DataFrame, id_table: pd.DataFrame, power: float
                            ) -> float:
        return float((domain["max_prob"] ** power).mean())

    def top_mass_ratio(edges: pd.DataFrame, id_edges: pd.DataFrame, top: int) -> float:
        if str(edges["domain"].iloc[0]).endswith(":5"):
            raise ValueError("toy refuses severity 5")
        mass = edges["score"].abs().nlargest(top).sum()
        return float(mass / id_edges["score"].abs().nlargest(top).sum())

    return (MetricSpec("mean_max_prob_squared", "output", +1, "toy: confidence squared", PRE,
                       compute=mean_max_prob_power, params={"power": 2}),
            MetricSpec("top_mass_ratio", "circuit", -1, "toy: top-edge mass vs ID", POST,
                       source="edges", compute=top_mass_ratio, params={"top": 10}))


@pytest.fixture(scope="module")
def toy_job(tmp_path_factory, local_ray) -> PipelineResult:
    root = tmp_path_factory.mktemp("registry")
    manifest = write_checkpoints(root, 3)
    cfg = load_job_config(CONF, [f"manifest={manifest}", f"output_dir={root / 'job'}",
                                 "reduce.figures=false"])
    with registered(*_toys()):
        return run_pipeline(cfg)


@pytest.mark.slow
def test_a_metric_registered_in_one_place_reaches_tables_evaluation_report_and_mlflow(
        toy_job: PipelineResult) -> None:
    layout = JobLayout.of(toy_job.config.output_dir)
    domains = read_parquet(layout.metrics / "domains.parquet").to_pandas()
    models = read_parquet(layout.metrics / "models.parquet").to_pandas()
    plugins = read_parquet(layout.metrics / "plugins.parquet").to_pandas()
    for table in (domains, models, plugins):
        assert table["mean_max_prob_squared"].between(0.25, 1).all()
    np.testing.assert_allclose(models.mean_max_prob_squared, models.ac ** 2, atol=0.25)

    shift = domains[domains.role == "shift"]
    mild = shift.domain.str.endswith(":1")
    assert shift.loc[mild, "top_mass_ratio"].gt(0).all()
    assert shift.loc[~mild, "top_mass_ratio"].isna().all()
    assert shift.loc[~mild, "reason"].str.contains("top_mass_ratio: toy refuses severity 5").all()

    evaluation = layout.evaluation
    pre = read_parquet(evaluation / "pre_deployment.parquet").to_pandas()
    post = read_parquet(evaluation / "post_deployment.parquet").to_pandas()
    assert (pre.metric == "mean_max_prob_squared").any()
    assert not (pre.metric == "top_mass_ratio").any()  # registered post-deployment only
    assert (post.metric == "top_mass_ratio").any()
    assert not (post.metric == "mean_max_prob_squared").any()

    for report in ((evaluation / "report.txt").read_text(), format_report(toy_job.reduce.frames)):
        lines = [line.strip() for line in report.splitlines()]
        assert any(line.startswith("mean_max_prob_squared ") for line in lines)
        assert any(line.startswith("top_mass_ratio ") for line in lines)

    client = MlflowClient(tracking_uri=f"sqlite:///{layout.root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("circuitray-tiny").experiment_id])
    children = [r for r in runs if r.data.tags.get("checkpoint")]
    assert len(children) == 3
    for run in children:
        keys = set(run.data.metrics)
        assert {"ood/mean_max_prob_squared", "shift_mean/top_mass_ratio", "ood/ddb_out_tau0.5",
                "shift_mean/css_srcc", "ood/accuracy"} <= keys
        assert not [k for k in keys if "lam_" in k or k.split("/")[-1] in ("temperature", "lr",
                                                                           "n")]
    assert registry.plugins() == ()  # the toys left the registry with their with-block

    from circuitray.runtime.reduce import run_reduce

    again = run_reduce(toy_job.config)  # the registered plug-ins are part of reduce's inputs
    assert not again.skipped
    assert "mean_max_prob_squared" not in read_parquet(layout.metrics / "domains.parquet").schema.names
    assert not (layout.metrics / "plugins.parquet").exists()



PLUGIN = '''
from circuitray.registry import PRE, MetricSpec, register


def low_confidence_share(domain, id_table, below):
    return float((domain["max_prob"] < below).mean())


register(MetricSpec("low_confidence_share", "output", -1, "plug-in from a file", PRE,
                    compute=low_confidence_share, params={"below": 0.9}))
'''


@pytest.mark.slow
def test_a_plugin_file_named_in_the_config_reaches_the_tables(tmp_path, local_ray) -> None:
    """`reduce.plugins=[file.py]`: the CLI's job imports it before reduce, and the Ray tasks
    compute the metric although they cannot import the file (pickled by value)."""
    from circuitray import cli

    plugin = tmp_path / "my_metric.py"
    plugin.write_text(PLUGIN)
    manifest = write_checkpoints(tmp_path, 3)
    try:
        assert cli.main(["run", str(CONF), f"manifest={manifest}",
                         f"output_dir={tmp_path / 'job'}", "reduce.figures=false",
                         "tracking.enabled=false", f"reduce.plugins=[{plugin}]"]) == 0
        models = read_parquet(JobLayout.of(tmp_path / "job").metrics / "models.parquet")
        share = models.to_pandas()["low_confidence_share"]
        assert len(share) == 3 and share.between(0, 1).all()
    finally:
        registry.unregister("low_confidence_share")
    with pytest.raises(ConfigError, match=r"reduce.plugins: cannot import 'no_such_module'"):
        from circuitray.runtime.reduce import load_plugins

        load_plugins(["no_such_module"])
