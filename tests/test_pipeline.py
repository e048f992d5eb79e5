"""The job on an embedded local Ray: failures recorded, killed workers survived, re-runs free."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from _jobdata import write_checkpoints
from mlflow.tracking import MlflowClient

from circuitray.job_config import JobConfig, load_job_config
from circuitray.report import format_report
from circuitray.runtime.discover import run_discover
from circuitray.runtime.layout import JobLayout
from circuitray.runtime.pipeline import run_pipeline
from circuitray.runtime.plan import (
    domain_specs,
    domains_frame,
    manifest_rows,
    plan_job,
    read_failures,
)
from circuitray.tables import read_parquet

CONF = Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml"


def _config(tmp: Path, manifest: Path, *extra: str) -> JobConfig:
    return load_job_config(CONF, [f"manifest={manifest}", f"output_dir={tmp / 'job'}", *extra])


def _files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and p.suffix == ".parquet"}


def _assert_each_output_once(cfg: JobConfig, checkpoints: list[str]) -> None:
    layout = JobLayout.of(cfg.output_dir)
    rows = {r["checkpoint_id"]: r for r in manifest_rows(cfg)}
    edges = read_parquet(layout.edges).to_pandas()
    outputs = read_parquet(layout.outputs).to_pandas()
    for cid in checkpoints:
        names = [s.name for s in domain_specs(rows[cid], cfg)]
        e = edges[edges.checkpoint == cid]
        o = outputs[outputs.checkpoint == cid]
        assert sorted(e.domain.unique()) == sorted(names)
        assert sorted(o.domain.unique()) == sorted(names)
        assert not e.duplicated(["domain", "src", "dst"]).any()
        assert not o.duplicated(["domain", "example"]).any()
        assert (o.groupby("domain").size() == cfg.data.limit).all()
        marker = pq.read_table(layout.marker(cid)).to_pandas()
        assert sorted(marker.domain) == sorted(names)
    assert not list(layout.root.rglob("*.tmp")), "a temporary file was left behind"


@pytest.mark.slow
def test_corrupt_checkpoint_lands_in_failures_and_rerun_recomputes_nothing(
        tmp_path: Path, local_ray) -> None:
    manifest = write_checkpoints(tmp_path, 2, corrupt=("truncated",))
    cfg = _config(tmp_path, manifest)
    result = run_pipeline(cfg)
    first = result.discover
    assert sorted(first.done) == ["ckpt0", "ckpt1"] and first.failed == ["truncated"]
    layout = JobLayout.of(cfg.output_dir)
    for name in ("depth", "shift", "baselines", "accuracy", "domains", "models"):
        assert (layout.metrics / f"{name}.parquet").exists(), name
    domains = read_parquet(layout.metrics / "domains.parquet").to_pandas()
    assert domains.accuracy.between(0, 1).all()
    assert domains.loc[domains.role == "shift", "css_srcc"].notna().all()
    assert (layout.evaluation / "results.parquet").exists()
    assert {p.name for p in result.reduce.figures} >= {
        "circuit.png", "css_vs_acc.png", "ood_vs_ddb_toy.png", "alarm.png", "lambda_toy.png"}
    report = format_report(result.reduce.frames)
    assert "PRE-DEPLOYMENT" in report and "task toy" in report and "SILENT-FAILURE" in report
    assert "too few points" in report  # 2 models: no statistic, and the table says why
    client = MlflowClient(tracking_uri=f"sqlite:///{layout.root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("circuitray-tiny")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 4  # the job and its three checkpoints (the failed one included)
    status = {r.data.tags.get("checkpoint"): r.info.status for r in runs}
    assert status == {None: "FINISHED", "ckpt0": "FINISHED", "ckpt1": "FINISHED",
                      "truncated": "FAILED"}  # the UI's status column shows the broken one
    failures = read_failures(JobLayout.of(cfg.output_dir))
    assert failures.to_dict("records")[0] | {"error": ""} == {
        "checkpoint": "truncated", "stage": "load", "error_type": "CheckpointError", "error": ""}
    assert "truncated.safetensors" in failures.error[0]
    _assert_each_output_once(cfg, ["ckpt0", "ckpt1"])
    domains = domains_frame(plan_job(cfg))
    assert set(domains.role) == {"id", "ood", "shift", "proxy"}

    before = _files(Path(cfg.output_dir))
    again = run_pipeline(cfg)
    second = again.discover
    assert sorted(second.skipped) == ["ckpt0", "ckpt1"] and second.done == []
    assert second.failed == ["truncated"]  # retried, still broken, still recorded once
    assert again.reduce.skipped
    after = _files(Path(cfg.output_dir))
    assert {k: v for k, v in after.items() if not k.startswith("failures")} == {
        k: v for k, v in before.items() if not k.startswith("failures")}
    assert len(client.search_runs([exp.experiment_id])) == 4  # no second MLflow job run


@pytest.mark.slow
def test_killed_worker_is_retried_and_every_output_is_written_once(
        tmp_path: Path, local_ray) -> None:
    manifest = write_checkpoints(tmp_path, 2, n_per_class=32)
    # enough domains and examples that the victim is killed between its domains
    cfg = _config(tmp_path, manifest, "data.limit=64", "data.attribution_limit=32",
                  "data.shift_severities=[1, 2, 3, 4, 5]", "data.proxy_severities=[1, 2, 3, 4, 5]")
    layout = JobLayout.of(cfg.output_dir)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("summary", run_discover(cfg)))
    thread.start()
    victim = layout.running_file("ckpt0")
    killed_pid = None
    deadline = time.monotonic() + 120
    while killed_pid is None and time.monotonic() < deadline and thread.is_alive():
        # a domain is complete once its outputs file (written after its edges) exists
        done_domains = list((layout.outputs / "toy" / "ckpt0").glob("*.parquet")) \
            if (layout.outputs / "toy" / "ckpt0").exists() else []
        if victim.exists() and done_domains:
            import json

            pid = json.loads(victim.read_text())["pid"]
            os.kill(pid, signal.SIGKILL)
            killed_pid = pid
        time.sleep(0.01)
    thread.join(timeout=180)
    assert killed_pid is not None, "the discover task finished before it could be killed"
    summary = result["summary"]
    assert sorted(summary.done) == ["ckpt0", "ckpt1"] and summary.failed == []
    _assert_each_output_once(cfg, ["ckpt0", "ckpt1"])
    marker = pq.read_table(layout.marker("ckpt0")).to_pandas()
    assert marker.resumed.any(), "the retry should have reused the killed attempt's domains"
    assert not marker.resumed.all()


def test_cli_config_error_names_the_key_before_any_work(tmp_path: Path, capsys,
                                                        monkeypatch) -> None:
    from circuitray import cli
    from circuitray.runtime import ray_utils

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the config was validated")

    monkeypatch.setattr(ray_utils, "ensure_ray", no_ray)
    code = cli.main(["run", str(CONF), f"output_dir={tmp_path / 'job'}", "data.limt=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.limt" in err and "tiny.yaml" in err
    assert not (tmp_path / "job").exists()


def test_domain_specs_cover_id_ood_shifts_and_proxies_and_intermediates(tmp_path: Path) -> None:
    cfg = load_job_config(CONF, [f"manifest={tmp_path / 'm.csv'}"], base=tmp_path)
    row = {"checkpoint_id": "c", "id_domain": "id-rho0.7", "ood_domain": "ood"}
    specs = domain_specs(row, cfg)
    assert [s.name for s in specs] == [
        "id-rho0.7", "ood", "shift:gaussian_noise:1", "shift:gaussian_noise:5",
        "proxy:brightness:1", "proxy:brightness:5"]
    assert {s.source for s in specs} == {"id-rho0.7", "ood"}  # corruptions of the ID split
    assert [s.name for s in domain_specs({**row, "final": False}, cfg)] == ["id-rho0.7", "ood"]


def test_unreadable_domain_is_a_failure_row_naming_the_path(tmp_path: Path) -> None:
    from circuitray.runtime.discover import discover_checkpoint, record_result

    manifest = write_checkpoints(tmp_path, 1)
    cfg = _config(tmp_path, manifest, "data.id_domain=missing-domain")
    row = manifest_rows(cfg)[0]
    result = discover_checkpoint(row, cfg)
    assert result["status"] == "failed" and result["stage"] == "data"
    assert "missing-domain" in result["error"]
    layout = JobLayout.of(cfg.output_dir)
    record_result(layout, result)
    assert read_failures(layout).checkpoint.tolist() == ["ckpt0"]
    assert not layout.marker("ckpt0").exists() and not layout.running_file("ckpt0").exists()
    record_result(layout, {"checkpoint": "ckpt0", "status": "done"})  # a later success
    assert read_failures(layout).empty


def test_safe_names_never_collide() -> None:
    from circuitray.runtime.layout import safe_name

    assert safe_name("vit-s_lr3e-4.seed2") == "vit-s_lr3e-4.seed2"
    assert safe_name("a/b") != safe_name("a_b") and "/" not in safe_name("a/b")
    assert not safe_name("..").startswith(".")


def test_gpu_share_on_a_local_ray_without_gpus_fails_instead_of_waiting(
        tmp_path: Path, local_ray) -> None:
    from circuitray.errors import ConfigError

    manifest = write_checkpoints(tmp_path, 1)
    cfg = _config(tmp_path, manifest, "resources.num_gpus=0.5")
    with pytest.raises(ConfigError, match="resources.num_gpus"):
        run_discover(cfg)


def test_transient_write_error_is_retried_inside_the_task(tmp_path: Path, monkeypatch) -> None:
    from circuitray.runtime import discover

    manifest = write_checkpoints(tmp_path, 1)
    cfg = _config(tmp_path, manifest, "data.shift_kinds=[]", "data.proxy_kinds=[]")
    real, calls = discover.write_parquet_atomic, []

    def flaky(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 1:
            raise OSError("stale NFS file handle")
        return real(*args, **kwargs)

    monkeypatch.setattr(discover, "write_parquet_atomic", flaky)
    result = discover.discover_checkpoint(manifest_rows(cfg)[0], cfg)
    assert result["status"] == "done"
    assert calls[0] == calls[1]  # the same file, written again after the error


@pytest.mark.slow
def test_two_ood_domains_make_figures_per_group_and_count_each_task_once(
        tmp_path: Path, local_ray) -> None:
    """data.ood_domains=[ood, ood2]: the same 4 checkpoints on two OOD domains. Before, the
    task was rewritten to "toy:ood", edge paths were built from it (figures skipped: "no
    such table") and the mean over "tasks" averaged toy:ood and toy:ood2 (n=8 checkpoints)."""
    import shutil

    import numpy as np

    from circuitray.runtime.layout import safe_name

    manifest = write_checkpoints(tmp_path, 4)
    shutil.copytree(tmp_path / "data" / "ood", tmp_path / "data" / "ood2")
    cfg = _config(tmp_path, manifest, "data.ood_domains=[ood, ood2]", "data.shift_kinds=[]",
                  "data.proxy_kinds=[]", "tracking.enabled=false")
    result = run_pipeline(cfg).reduce
    assert not [n for n in result.notes if "no such table" in n or n.startswith("figures")]
    names = {p.name for p in result.figures}
    for group in ("toy:ood", "toy:ood2"):
        assert f"ood_vs_ddb_{safe_name(group)}.png" in names
        assert f"lambda_{safe_name(group)}.png" in names
    assert "circuit.png" in names

    models = result.frames["models"]
    assert set(models.task) == {"toy"} and len(models) == 8
    assert set(models.eval_group) == {"toy:ood", "toy:ood2"}
    pre = result.frames["pre_deployment"]
    assert set(pre.loc[pre.level == "group", "domain"]) == {"ood", "ood2"}
    task_mean = pre[(pre.level == "mean") & (pre.task == "toy")]
    overall = pre[pre.task == "all"]
    assert (task_mean.domain == "all").all() and (task_mean.n_groups == 2).all()
    assert (overall.n_groups == 1).all()  # one task, however many OOD domains
    pd_all = overall.set_index("metric").composite
    np.testing.assert_allclose(pd_all, task_mean.set_index("metric").composite[pd_all.index])
    report = format_report(result.frames)
    assert "task toy, OOD domain ood2, n=4 checkpoints" in report
    assert "task toy, mean over its 2 OOD domains, n=4 checkpoints" in report
    assert "mean over 2 tasks" not in report and "n=8" not in report


def test_every_printed_estimate_lies_within_its_printed_interval() -> None:
    """n ≥ 10: 2 tasks × 150 models × 10 shifted domains, and 2 tasks × 30 checkpoints.
    Before post-deployment means resampled models, the mean over tasks printed
    '+0.721 [+0.66,+0.71]' here (intervals are printed to 2 decimals: ±0.005 allowed)."""
    import re

    import numpy as np
    import pandas as pd

    from circuitray.evaluation import post_deployment, pre_deployment

    rng = np.random.default_rng(0)
    post_rows, pre_rows = [], []
    for task in ("bg", "patch"):
        for c in range(150):
            noise = rng.uniform(0.02, 0.3)
            for d, a in enumerate(rng.uniform(0.3, 0.95, 10)):
                post_rows.append({"task": task, "checkpoint": f"m{c}", "domain": f"d{d}",
                                  "accuracy": a, "css_srcc": 1 - a + noise * rng.normal(),
                                  "rankme": a + noise * rng.normal()})
        for c in range(30):
            ood = rng.uniform(0.4, 0.9)
            pre_rows.append({"task": task, "checkpoint": f"c{c}", "ood_acc": ood,
                             "ddb_out_0.3": ood + 0.2 * rng.normal(), "ac": rng.normal()})
    frames = {
        "pre_deployment": pre_deployment(pd.DataFrame(pre_rows), metrics=["ddb_out_0.3", "ac"],
                                         n_boot=200),
        "post_deployment": post_deployment(pd.DataFrame(post_rows),
                                           metrics=["css_srcc", "rankme"], n_boot=200)}
    report = format_report(frames)
    cells = re.findall(r"([+-]\d\.\d{3}) \[([+-]\d\.\d\d),([+-]\d\.\d\d)\]", report)
    assert len(cells) == 4 * (3 + 3) * 2  # 4 stats × (2 tasks + mean) × 2 metrics, pre + post
    outside = [c for c in cells if not float(c[1]) - 0.005 <= float(c[0]) <= float(c[2]) + 0.005]
    assert outside == []
