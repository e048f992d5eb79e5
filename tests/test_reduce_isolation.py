"""Reduce never stops for one bad checkpoint or domain, and its tables do not depend on luck.

Three small jobs (random-weight 2-block ViTs, see _jobdata.py), each run once per module:
  zeros   — three good checkpoints and one with all-zero weights (RankMe cannot be computed)
  tasks   — a task of three checkpoints and a task of two (too few to evaluate)
  labels  — an ID domain without labels, and a dataset with a class the model head lacks
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _jobdata import write_checkpoints, write_domains
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file, save_file

from circuitray.job_config import JobConfig, load_job_config
from circuitray.report import format_report
from circuitray.runtime.layout import JobLayout
from circuitray.runtime.pipeline import PipelineResult, run_pipeline
from circuitray.runtime.plan import domains_frame, plan_job, read_failures
from circuitray.tables import read_parquet

CONF = Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml"
QUICK = ("reduce.figures=false", "tracking.enabled=false")


def _config(root: Path, manifest: Path, *extra: str) -> JobConfig:
    return load_job_config(CONF, [f"manifest={manifest}", f"output_dir={root / 'job'}", *extra])


def _add_rows(manifest: Path, rows: list[dict]) -> None:
    table = pd.read_csv(manifest)
    pd.concat([table, pd.DataFrame(rows)], ignore_index=True).to_csv(manifest, index=False)


def _copy_row(manifest: Path, source: str, **changes: object) -> dict:
    row = pd.read_csv(manifest).set_index("checkpoint_id").loc[source].to_dict()
    return {"checkpoint_id": source, **row, **changes}


def _table(layout: JobLayout, name: str) -> pd.DataFrame:
    return read_parquet(layout.metrics / f"{name}.parquet").to_pandas()


@pytest.fixture(scope="module")
def zeros_job(tmp_path_factory, local_ray) -> PipelineResult:
    root = tmp_path_factory.mktemp("zeros")
    manifest = write_checkpoints(root, 3)
    weights = load_file(str(root / "weights" / "ckpt0.safetensors"))
    save_file({k: v.zero_() for k, v in weights.items()}, str(root / "weights" / "zeros.safetensors"))
    _add_rows(manifest, [_copy_row(manifest, "ckpt0", checkpoint_id="zeros",
                                   weights="weights/zeros.safetensors", lr=1e-5, seed=9)])
    return run_pipeline(_config(root, manifest))


@pytest.fixture(scope="module")
def tasks_job(tmp_path_factory, local_ray) -> PipelineResult:
    root = tmp_path_factory.mktemp("tasks")
    manifest = write_checkpoints(root, 3)
    _add_rows(manifest, [_copy_row(manifest, f"ckpt{i}", checkpoint_id=f"pair{i}", task="pair")
                         for i in (0, 1)])
    return run_pipeline(_config(root, manifest, *QUICK))


@pytest.fixture(scope="module")
def labels_job(tmp_path_factory, local_ray) -> PipelineResult:
    root = tmp_path_factory.mktemp("labels")
    manifest = write_checkpoints(root, 2)
    unlabeled = write_domains(root / "unlabeled")
    for image in sorted((unlabeled / "id").glob("*/*.png")):  # images straight in the domain
        image.rename(unlabeled / "id" / f"{image.parent.name}_{image.name}")
    for folder in (unlabeled / "id").iterdir():
        if folder.is_dir():
            folder.rmdir()
    three = write_domains(root / "three")
    for domain in ("id", "ood"):  # a class the 2-class heads do not have
        shutil.copytree(three / domain / "0", three / domain / "2")
    # unlabeled ID images need the class list from the manifest (the folders give none)
    _add_rows(manifest, [_copy_row(manifest, f"ckpt{i}", checkpoint_id=f"{kind}{i}", task=kind,
                                   data_root=str(data), classes=classes)
                         for kind, data, classes in (("nolabels", unlabeled, '["0", "1"]'),
                                                     ("badlabels", three, ""))
                         for i in (0, 1)])
    return run_pipeline(_config(root, manifest, *QUICK))


@pytest.mark.slow
def test_all_zero_checkpoint_gets_nan_and_a_reason_while_the_others_are_evaluated(
        zeros_job: PipelineResult) -> None:
    cfg, red = zeros_job.config, zeros_job.reduce
    assert red is not None and not red.skipped
    assert sorted(zeros_job.discover.done) == ["ckpt0", "ckpt1", "ckpt2", "zeros"]
    layout = JobLayout.of(cfg.output_dir)
    models = _table(layout, "models").set_index("checkpoint")
    assert np.isnan(models.loc["zeros", "rankme"])
    assert "RankMe: features are all zero" in models.loc["zeros", "reason"]
    good = models.drop(index="zeros")
    assert np.isfinite(good.rankme).all() and np.isfinite(good.ac).all()
    assert not good.reason.str.contains("RankMe").any()
    assert np.isfinite(models.loc["zeros", ["ac", "ane", "nuclear", "id_acc", "ood_acc"]]
                       .astype(float)).all()  # only what failed is NaN
    failures = read_failures(layout)
    mine = failures[(failures.checkpoint == "zeros") & (failures.stage == "reduce")]
    assert len(mine) and mine.error.str.contains("RankMe").all()
    assert layout.reduce_failure_file("zeros").exists()
    assert not (failures.checkpoint != "zeros").any()
    pre = read_parquet(layout.evaluation / "pre_deployment.parquet").to_pandas()
    toy = pre[pre.task == "toy"].set_index("metric")
    assert toy.loc["ac", "n"] == 4 and toy.loc["rankme", "n"] == 3  # n per metric row
    client = MlflowClient(tracking_uri=f"sqlite:///{layout.root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert red.run_id in {r.info.run_id for r in runs}
    assert len(runs) == 5  # the job and its four checkpoints


@pytest.mark.slow
def test_near_chance_checkpoints_are_flagged_in_models_table_and_report(
        zeros_job: PipelineResult) -> None:
    layout = JobLayout.of(zeros_job.config.output_dir)
    models = _table(layout, "models")
    expected = (models.id_acc - 1.0 / models.num_classes) < 0.05
    assert models.near_chance.dtype == bool
    assert (models.near_chance == expected).all()
    assert models.set_index("checkpoint").loc["zeros", "near_chance"]  # predicts class 0 always
    report = format_report(zeros_job.reduce.frames)
    warning = [line for line in report.splitlines() if "chance" in line and "WARNING" in line]
    assert len(warning) == 1
    for cid in models.loc[models.near_chance, "checkpoint"]:
        assert cid in report


@pytest.mark.slow
def test_an_up_to_date_rerun_prints_the_same_report_warnings_included(
        zeros_job: PipelineResult, capsys) -> None:
    """The report is stored with the tables; a rerun whose reduce is up to date reprints it,
    so the near-chance and metric-failure warnings do not vanish the second time."""
    from circuitray import cli

    cfg = zeros_job.config
    first = format_report(zeros_job.reduce.frames)
    capsys.readouterr()
    assert cli.main(["run", str(CONF), f"manifest={cfg.manifest}",
                     f"output_dir={cfg.output_dir}"]) == 0
    out, err = capsys.readouterr()
    assert "[reduce] up to date" in err
    assert first in out and "WARNING" in first and "zeros" in first


@pytest.mark.slow
def test_task_with_two_usable_checkpoints_is_skipped_and_the_other_task_evaluated(
        tasks_job: PipelineResult) -> None:
    red = tasks_job.reduce
    assert "task pair: only 2 usable checkpoints (need 3)" in red.notes
    layout = JobLayout.of(tasks_job.config.output_dir)
    pre = read_parquet(layout.evaluation / "pre_deployment.parquet").to_pandas()
    assert "toy" in set(pre.task) and "pair" not in set(pre.task)
    assert (pre[pre.metric == "ac"].n == 3).all()
    models = _table(layout, "models")
    assert sorted(models.checkpoint) == ["ckpt0", "ckpt1", "ckpt2", "pair0", "pair1"]
    report = format_report(red.frames)
    assert "task pair: only 2 usable checkpoints (need 3)" in report
    assert "task toy" in report


@pytest.mark.slow
def test_metrics_tables_are_byte_identical_whatever_the_completion_order(
        tasks_job: PipelineResult, monkeypatch) -> None:
    from circuitray.runtime import ray_utils, reduce

    layout = JobLayout.of(tasks_job.config.output_dir)
    before = {p.name: p.read_bytes() for p in sorted(layout.metrics.glob("*.parquet"))}
    assert {"depth", "shift", "baselines", "detectors", "accuracy", "domains", "models"} <= {
        Path(n).stem for n in before}
    real_iter, real_domains = ray_utils.iter_completed, reduce.domains_frame

    def last_first(refs, label, stream=None):
        yield from reversed(list(real_iter(refs, label, stream)))

    monkeypatch.setattr(ray_utils, "iter_completed", last_first)
    monkeypatch.setattr(reduce, "domains_frame",
                        lambda plan: real_domains(plan).iloc[::-1].reset_index(drop=True))
    import ray

    assert ray.is_initialized()  # the per-checkpoint metrics run as Ray tasks
    again = reduce.run_reduce(tasks_job.config, force=True)
    assert not again.skipped
    after = {p.name: p.read_bytes() for p in sorted(layout.metrics.glob("*.parquet"))}
    assert after.keys() == before.keys()
    assert [n for n in before if before[n] != after[n]] == []


@pytest.mark.slow
def test_unlabeled_id_domain_keeps_label_free_baselines_and_detectors(
        labels_job: PipelineResult) -> None:
    red = labels_job.reduce
    assert red is not None and not red.skipped
    layout = JobLayout.of(labels_job.config.output_dir)
    models = _table(layout, "models").set_index("checkpoint")
    rows = models.loc[["nolabels0", "nolabels1"]]
    assert rows.id_acc.isna().all() and rows.atc_mc.isna().all() and rows.doc.isna().all()
    assert np.isfinite(rows[["ac", "ane", "nuclear", "mano", "rankme", "ood_acc"]]
                       .astype(float)).all().all()
    assert rows.reason.str.contains("unlabeled").all()
    assert not rows.near_chance.any()  # unknown ID accuracy is not "near chance"
    domains = _table(layout, "domains")
    shifted = domains[(domains.checkpoint == "nolabels0") & (domains.role == "shift")]
    assert np.isfinite(shifted.bbsd_stat).all() and np.isfinite(shifted.mmd2).all()
    good = models.loc[["ckpt0", "ckpt1"]]
    assert np.isfinite(good[["id_acc", "atc_mc", "rankme"]].astype(float)).all().all()
    failures = read_failures(layout)
    assert set(failures.loc[failures.stage == "reduce", "checkpoint"]) == {
        "nolabels0", "nolabels1"}


@pytest.mark.slow
def test_more_classes_than_the_head_fail_that_checkpoint_naming_it_and_the_rest_go_on(
        labels_job: PipelineResult) -> None:
    """A class folder the head has no output for is refused before any number is computed
    (discover, stage "data"), naming checkpoint, class list and head size; reduce runs on."""
    layout = JobLayout.of(labels_job.config.output_dir)
    models = _table(layout, "models").set_index("checkpoint")
    assert "badlabels1" not in models.index and {"ckpt0", "nolabels0"} <= set(models.index)
    failures = read_failures(layout)
    bad = failures[failures.checkpoint == "badlabels1"]
    assert list(bad.stage) == ["data"]
    error = bad.error.iloc[0]
    assert "checkpoint 'badlabels1'" in error and "3 classes ['0', '1', '2']" in error
    assert "head has 2 outputs" in error


@pytest.mark.slow
def test_unparseable_domain_file_costs_only_that_domain(tasks_job: PipelineResult,
                                                        tmp_path: Path) -> None:
    """A file that is what its marker recorded but cannot be parsed (a writer's bug, not
    damage) makes that domain NaN with a reason; the other domains are computed."""
    from dataclasses import replace

    from circuitray.runtime.files import checksum_file
    from circuitray.runtime.reduce import checkpoint_files, checkpoint_metrics

    layout = JobLayout.of(tasks_job.config.output_dir)
    marker = domains_frame(plan_job(tasks_job.config)).query("checkpoint == 'ckpt0'")
    files = checkpoint_files(layout, marker)
    broken, junk = tmp_path / "broken.parquet", tmp_path / "junk.parquet"
    broken.write_bytes(b"PAR1 not a parquet file")
    junk.write_bytes(b"PAR1 not one either")
    bad = "shift:gaussian_noise:5"
    files = replace(files, edges={**files.edges, bad: str(broken)},
                    outputs={**files.outputs, "ood": str(junk)},
                    checksums={**files.checksums, str(broken): checksum_file(broken),
                               str(junk): checksum_file(junk)})
    out = checkpoint_metrics(files, tasks_job.config.reduce)
    depth = out["depth"].set_index("domain")
    assert np.isnan(depth.loc[bad, "ddb_out_0.5"]) and "read edges" in depth.loc[bad, "reason"]
    assert depth.drop(index=bad)["lam_0_1"].notna().all()
    shift = out["shift"].set_index("domain")
    assert np.isnan(shift.loc[bad, "css_srcc"]) and "read edges" in shift.loc[bad, "reason"]
    assert shift.drop(index=bad)["css_srcc"].notna().all()
    acc = out["accuracy"].set_index("domain")
    assert np.isnan(acc.loc["ood", "accuracy"]) and "read outputs" in acc.loc["ood", "reason"]
    assert acc.drop(index="ood")["accuracy"].notna().all()
    assert np.isfinite(out["baselines"].set_index("domain").drop(index="ood")["atc_mc"]).all()
    failures = out["failures"]
    assert list(failures.stage.unique()) == ["reduce"] and len(failures) == 2
    assert failures.error.str.contains(f"domain '{bad}'").any()
    assert failures.error.str.contains("domain 'ood'").any()


@pytest.mark.slow
def test_damaged_or_missing_domain_file_stops_checkpoint_metrics_naming_it(
        tasks_job: PipelineResult, tmp_path: Path) -> None:
    """Bytes that differ from the marker's checksum are stale or damaged: never NaN, an error
    naming the file and telling the user to run discover."""
    from dataclasses import replace

    from circuitray.errors import StaleResultError
    from circuitray.runtime.reduce import checkpoint_files, checkpoint_metrics

    layout = JobLayout.of(tasks_job.config.output_dir)
    marker = domains_frame(plan_job(tasks_job.config)).query("checkpoint == 'ckpt1'")
    files = checkpoint_files(layout, marker)
    copy = tmp_path / "ood.parquet"
    data = bytearray(Path(files.edges["ood"]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    damaged = replace(files, edges={**files.edges, "ood": str(copy)},
                      checksums={**files.checksums, str(copy): files.checksums[files.edges["ood"]]})
    with pytest.raises(StaleResultError, match=r"ood\.parquet: damaged.*run discover"):
        checkpoint_metrics(damaged, tasks_job.config.reduce)
    gone = tmp_path / "gone.parquet"
    missing = replace(files, outputs={**files.outputs, "id": str(gone)},
                      checksums={**files.checksums, str(gone): "0" * 32})
    with pytest.raises(StaleResultError, match=r"gone\.parquet: missing"):
        checkpoint_metrics(missing, tasks_job.config.reduce)


def test_reduce_failure_files_are_rewritten_each_run_and_left_alone_by_discover(
        tmp_path: Path) -> None:
    from circuitray.runtime.discover import record_result
    from circuitray.runtime.reduce import write_reduce_failures

    layout = JobLayout.of(tmp_path)

    def rows(*cids: str) -> pd.DataFrame:
        return pd.DataFrame([{"checkpoint": c, "stage": "reduce", "error_type": "MetricError",
                              "error": f"baselines.rankme of checkpoint '{c}': zero"}
                             for c in cids])

    write_reduce_failures(layout, rows("a", "b", "b"))
    assert len(read_failures(layout)) == 3
    record_result(layout, {"checkpoint": "a", "status": "done"})  # discover success for 'a'
    assert layout.reduce_failure_file("a").exists()
    write_reduce_failures(layout, rows("b"))  # 'a' reduces cleanly now
    assert not layout.reduce_failure_file("a").exists()
    assert read_failures(layout).checkpoint.tolist() == ["b"]
    assert layout.failure_file("reduce") != layout.reduce_failure_file("reduce")


@pytest.mark.slow
def test_a_killed_reduce_leaves_no_temporary_behind_the_next_one(
        tasks_job: PipelineResult) -> None:
    """SIGKILL mid-write leaves `.<table>.<uuid>.tmp` (bench/faults.py counted one in metrics/
    after the rerun); the next reduce removes them, even when it finds its tables up to date."""
    from circuitray.runtime.reduce import run_reduce

    layout = JobLayout.of(tasks_job.config.output_dir)
    left = [layout.metrics / ".models.parquet.0123.tmp",
            layout.evaluation / ".report.txt.4567.tmp"]
    for tmp in left:
        tmp.write_bytes(b"half")
    again = run_reduce(tasks_job.config)
    assert again.skipped and not any(p.exists() for p in left)


@pytest.mark.slow
def test_circuit_figure_reads_its_edges_only_from_bytes_matching_the_marker(
        tasks_job: PipelineResult, tmp_path: Path) -> None:
    """The circuit drawing is an input read like the metrics': a file whose bytes no longer
    match its marker stops reduce naming it, instead of being drawn as if it were the one."""
    from circuitray.errors import StaleResultError
    from circuitray.runtime.reduce import edges_checksums, figures

    cfg = tasks_job.config
    layout = JobLayout.of(cfg.output_dir)
    models = _table(layout, "models")
    first = models.iloc[0]
    checksums = edges_checksums(plan_job(cfg))
    assert (first["checkpoint"], first["domain"]) in checksums
    drawn = figures(layout, models.iloc[:0], models, {}, cfg, pd.read_csv(cfg.manifest), {},
                    [], fig_dir=tmp_path, edges_checksums=checksums)
    assert tmp_path / "circuit.png" in drawn
    wrong = {key: "0" * 32 for key in checksums}
    with pytest.raises(StaleResultError, match=r"\.parquet: damaged"):
        figures(layout, models.iloc[:0], models, {}, cfg, pd.read_csv(cfg.manifest), {}, [],
                fig_dir=tmp_path, edges_checksums=wrong)
    with pytest.raises(StaleResultError, match=r"\.parquet: no checksum recorded"):
        figures(layout, models.iloc[:0], models, {}, cfg, pd.read_csv(cfg.manifest), {}, [],
                fig_dir=tmp_path, edges_checksums={})


@pytest.mark.slow
def test_an_earlier_runs_evaluation_table_not_written_again_is_removed(
        tasks_job: PipelineResult) -> None:
    """A table this reduce no longer produces (here: the motif of a task gone from the
    manifest) must not stay beside the current ones, where it would read as current."""
    from circuitray.runtime.reduce import run_reduce

    layout = JobLayout.of(tasks_job.config.output_dir)
    gone = layout.evaluation / "motif_weights_gone-task.parquet"
    shutil.copy(next(iter(layout.evaluation.glob("*.parquet"))), gone)
    again = run_reduce(tasks_job.config, force=True)
    assert not gone.exists()
    assert {p.name for p in layout.evaluation.glob("*.parquet")} == {
        Path(p).name for p in again.tables.values() if Path(p).parent == layout.evaluation}
