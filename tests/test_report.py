"""The report prints what the tables hold: partial SRCC beside each circuit metric, the
within-regime block, and the DDB-over-training figures (the paper's Figure 1 layout)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from circuitray import plots
from circuitray.evaluation import pre_deployment, with_partial_given_best, within_group
from circuitray.report import _cell, format_report
from circuitray.runtime.reduce import training_frame, training_runs_table

METRICS = ["ddb_out_0.3", "ac", "atc_mc"]


def _zoo(seed: int = 0) -> pd.DataFrame:
    """Two tasks of 24 models in three regimes (12 full, 8 last2, 4 linear)."""
    rng = np.random.default_rng(seed)
    frames = []
    for task in ("bg", "patch"):
        n = 24
        z, u = rng.normal(size=n), rng.normal(size=n)
        frames.append(pd.DataFrame({
            "task": task, "checkpoint": [f"{task}{i}" for i in range(n)], "ood_acc": z + u,
            "ddb_out_0.3": u + 0.5 * rng.normal(size=n), "ac": z,
            "atc_mc": rng.normal(size=n), "regime": np.repeat(["full", "last2", "linear"],
                                                              [12, 8, 4])}))
    return pd.concat(frames, ignore_index=True)


def _line(report: str, block: str, metric: str) -> str:
    """The line of `metric` in the first block whose title contains `block`."""
    part = report[report.index(block):]
    return next(line for line in part.splitlines() if line.startswith(f"  {metric} "))


def test_partial_srcc_is_printed_beside_circuit_metrics_from_the_table() -> None:
    f = _zoo()
    pre = with_partial_given_best(pre_deployment(f, metrics=METRICS, n_boot=100), f,
                                  target="ood_acc", n_boot=100)
    report = format_report({"pre_deployment": pre})
    g = pre[pre.level == "group"].set_index(["task", "metric"])
    for task in ("bg", "patch"):
        block = f"(task {task}, n=24 checkpoints)"
        title = report[report.index(block):].splitlines()
        assert "given ac" in title[1] and "partial SRCC" in title[2]
        line = _line(report, block, "ddb_out_0.3")
        row = g.loc[(task, "ddb_out_0.3")]
        assert row.partial_given == "ac"
        assert line.rstrip().endswith(_cell(row, "partial_srcc"))  # the table's numbers
        assert line.count("[") == 5  # four statistics and the partial, each with its interval
        assert _line(report, block, "ac").count("[") == 4  # a baseline has no partial
    mean_block = report[report.index("mean over 2 tasks"):].splitlines()
    assert "partial SRCC" not in mean_block[1]  # each task has its own baseline: no mean


def test_within_regime_block_prints_each_regime_and_lists_the_small_ones() -> None:
    f = _zoo()
    within = within_group(f, metrics=METRICS, target="ood_acc", group_col="regime",
                          n_boot=100)
    report = format_report({"within_group": within})
    g = within[within.level == "group"].set_index(["task", "group", "metric"])
    for task in ("bg", "patch"):
        block = f"WITHIN-REGIME: SRCC of each metric vs OOD accuracy among the models of " \
                f"one regime (task {task})"
        part = report[report.index(block):].splitlines()
        assert re.search(r"full \(n=12\)\s+last2 \(n=8\)\s+mean over 2", part[1])
        cells = re.findall(r"[+-]\d\.\d{3} \[[^]]+\]", _line(report, block, "ddb_out_0.3"))
        mean = within[(within.level == "mean") & (within.task == task)
                      & (within.metric == "ddb_out_0.3")].iloc[0]
        assert cells == [_cell(g.loc[(task, "full", "ddb_out_0.3")], "srcc"),
                         _cell(g.loc[(task, "last2", "ddb_out_0.3")], "srcc"),
                         _cell(mean, "srcc")]
        skipped = next(line for line in part if line.startswith("  skipped"))
        assert skipped == "  skipped (fewer than 5 models): linear (n=4)"


def _tiny_job() -> tuple[pd.DataFrame, pd.DataFrame]:
    """What reduce sees for a tiny job with intermediate checkpoints: OOD (and ID) rows of
    3 runs, two with an intermediate checkpoint, and their manifest."""
    rows, manifest = [], []
    for run, accs in (("run-a", [0.6, 0.85]), ("run-b", [0.7, 0.4]), ("run-c", [0.55])):
        for k, acc in enumerate(accs):
            final = k == len(accs) - 1
            cid = run if final else f"{run}.e{k + 1}"
            manifest.append({"checkpoint_id": cid, "task": "toy", "weights": f"w/{cid}",
                             "epoch": k + 1, "final": final, "parent_id": run})
            for role in ("id", "ood"):
                rows.append({"task": "toy", "checkpoint": cid, "domain": role, "role": role,
                             "accuracy": acc + (0.1 if role == "id" else 0.0),
                             "ddb_out_0.5": 0.1 * (k + 1) + acc})
    return pd.DataFrame(rows), pd.DataFrame(manifest)


def test_ddb_over_training_figure_shows_best_and_worst_runs_on_two_axes(
        tmp_path: Path, monkeypatch) -> None:
    from circuitray.job_config import load_job_config

    cfg = load_job_config(Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml",
                          [f"output_dir={tmp_path}"])  # reduce.taus = [0.5]
    frame, manifest = _tiny_job()
    notes: list[str] = []
    runs = training_runs_table(frame, manifest, cfg, notes)
    row = runs.iloc[0]
    assert (row.best_run, row.worst_run, row.n_runs) == ("run-a", "run-b", 2)
    assert (row.best_final_acc, row.worst_final_acc) == (0.85, 0.4) and notes == []
    seen = {}
    save = plots._save

    def spy(fig, path):
        seen["axes"] = [ax.get_ylabel() for ax in fig.axes]
        seen["legend"] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    rows = training_frame(frame, manifest)
    path = plots.ddb_over_training(rows, [("best", row.best_run), ("worst", row.worst_run)],
                                   metric="ddb_out_0.5", path=tmp_path / "fig.png")
    assert path.stat().st_size > 1000
    assert seen["axes"] == ["ddb_out_0.5 (solid)", "OOD accuracy (dashed)"]
    assert seen["legend"] == ["best: run-a — ddb_out_0.5", "best: run-a — OOD accuracy",
                              "worst: run-b — ddb_out_0.5", "worst: run-b — OOD accuracy"]
    report = format_report({"ddb_over_training": runs.assign(figure="figures/x.png")})
    assert "toy: best run-a (0.850), worst run-b (0.400) of 2 runs, ddb_out_0.5: " \
           "figures/x.png" in report


def test_task_without_a_run_of_two_checkpoints_is_skipped_with_a_note(tmp_path: Path) -> None:
    from circuitray.job_config import load_job_config

    cfg = load_job_config(Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml",
                          [f"output_dir={tmp_path}"])
    frame, manifest = _tiny_job()
    finals = manifest[manifest.final]
    notes: list[str] = []
    runs = training_runs_table(frame[frame.checkpoint.isin(finals.checkpoint_id)], finals,
                               cfg, notes)
    assert runs.iloc[0].n_runs == 0
    assert notes == ["DDB over training, toy: skipped (no run with >= 2 checkpoints having "
                     "ddb_out_0.5 and a final OOD accuracy)"]
    assert "  toy: skipped (no run with >= 2 checkpoints" in format_report(
        {"ddb_over_training": runs})


@pytest.mark.parametrize("frames", [{}, {"within_group": pd.DataFrame()}])
def test_report_without_the_new_tables_says_there_is_nothing(frames) -> None:
    assert format_report(frames).startswith("no evaluation tables")


@pytest.mark.slow
def test_tiny_job_with_intermediate_checkpoints_draws_the_figure_and_reports_it(
        tmp_path: Path, local_ray) -> None:
    """End to end: 3 runs × (1 intermediate + final) with a `regime` column, random
    weights. The figure is written, its table names the runs and the report prints both;
    the regimes (by default the manifest's `regime`: 2 and 1 models, < 5) are listed as
    skipped with their n."""
    import shutil

    from _jobdata import write_checkpoints

    from circuitray.job_config import load_job_config
    from circuitray.runtime.pipeline import run_pipeline

    manifest_path = write_checkpoints(tmp_path, 3)
    m = pd.read_csv(manifest_path)
    rows = []
    for _, r in m.iterrows():
        inter = r.copy()
        inter["checkpoint_id"] = f"{r.checkpoint_id}.e1"
        inter["weights"] = r.weights.replace(".safetensors", ".e1.safetensors")
        shutil.copy(tmp_path / r.weights, tmp_path / inter["weights"])
        regime = "linear" if r.seed == 0 else "full"
        rows += [inter.to_dict() | {"epoch": 1, "final": False, "parent_id": r.checkpoint_id,
                                    "regime": regime},
                 r.to_dict() | {"epoch": 2, "final": True, "parent_id": r.checkpoint_id,
                                "regime": regime}]
    pd.DataFrame(rows).to_csv(manifest_path, index=False)
    cfg = load_job_config(Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml", [
        f"manifest={manifest_path}", f"output_dir={tmp_path / 'job'}", "data.shift_kinds=[]",
        "data.proxy_kinds=[]", "tracking.enabled=false"])
    result = run_pipeline(cfg).reduce
    runs = result.frames["ddb_over_training"].iloc[0]
    models = result.frames["models"].set_index("checkpoint")
    assert runs.n_runs == 3 and runs.best_final_acc == models.ood_acc.max()
    assert runs.worst_final_acc == models.ood_acc.min()
    assert models.loc[runs.best_run, "ood_acc"] == runs.best_final_acc
    assert runs.figure == "figures/ddb_over_training_toy.png"
    assert (Path(cfg.output_dir) / runs.figure).stat().st_size > 1000
    report = (Path(cfg.output_dir) / "evaluation" / "report.txt").read_text()
    assert f"toy: best {runs.best_run} ({runs.best_final_acc:.3f})" in report
    assert runs.figure in report
    assert "skipped (fewer than 5 models): full (n=2), linear (n=1)" in report
