"""The demo zoo end to end: a 2-model mini zoo through Ray, reuse, failures, config errors."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
import torch

from circuitray.config import load_config
from circuitray.errors import ConfigError
from circuitray.models import load_checkpoint, read_manifest
from circuitray.runtime.zoo import train_zoo
from circuitray.training import ZooConfig, expand_grid

TINY = Path(__file__).resolve().parents[1] / "conf" / "zoo-tiny.yaml"
SCRATCH = Path(__file__).resolve().parents[1] / "conf" / "zoo-scratch.yaml"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo-data")


@pytest.mark.slow
def test_mini_zoo_trains_end_to_end_through_ray(tmp_path, data_root) -> None:
    import ray

    config = load_config(ZooConfig, TINY, [f"data_root={data_root}"])
    log = io.StringIO()
    try:
        manifest_path = train_zoo(config, tmp_path / "zoo", stream=log)
    finally:
        ray.shutdown()
    assert "[train_zoo] 2/2 done" in log.getvalue()  # progress with counts
    manifest = read_manifest(manifest_path)
    assert sorted(manifest["task"]) == ["digits-background", "digits-patch"]
    assert manifest["final"].all() and (manifest["epoch"] == 2).all()
    assert manifest["id_acc"].between(0, 1).all() and manifest["ood_acc"].between(0, 1).all()
    assert set(manifest["ood_domain"]) == {"ood"} and set(manifest["id_domain"]) == {"id-rho0.8"}
    assert {"rho", "lr", "epochs", "weight_decay", "augment", "depth", "seed"} <= set(manifest)
    every = read_manifest(tmp_path / "zoo" / "checkpoints.csv")
    assert len(every) == 4 and set(every.loc[~every["final"], "epoch"]) == {1}
    for _, row in every.iterrows():
        model = load_checkpoint(row)
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
        assert Path(row["data_root"]).is_dir()
    # a second run reuses everything (no Ray, no training)
    log2 = io.StringIO()
    train_zoo(config, tmp_path / "zoo", stream=log2, executor="inline")
    assert "2 reused, 0 to train" in log2.getvalue()


def test_failed_configuration_is_recorded_and_others_go_on(tmp_path, data_root) -> None:
    config = load_config(ZooConfig, TINY, [f"data_root={data_root}", "grid.task=[digits-patch]",
                                           "grid.epochs=[1]", "intermediate=0"])
    config.grid.lr = [0.002, float("nan"), 0.001]  # a NaN learning rate cannot train
    log = io.StringIO()
    manifest = train_zoo(config, tmp_path, executor="inline", stream=log)
    failures = pd.read_parquet(tmp_path / "failures.parquet")
    assert list(failures["checkpoint"]) == ["digits-patch-rho0.8-lrnan-e1-wd0.05-none-d2-s0"]
    assert failures.loc[0, "stage"] == "train" and "FAILED" in log.getvalue()
    finals = pd.read_csv(manifest)
    assert sorted(finals["lr"]) == [0.001, 0.002]


def test_scratch_config_is_a_real_zoo_over_both_cue_kinds() -> None:
    config = load_config(ZooConfig, SCRATCH)
    specs = expand_grid(config)
    assert len(specs) >= 24
    assert {s["task"] for s in specs} == {"digits-background", "digits-patch"}
    assert min(s["depth"] for s in specs) >= 8
    assert len({s["checkpoint_id"] for s in specs}) == len(specs)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="grid.lrate"):
        load_config(ZooConfig, TINY, ["grid.lrate=[0.1]"])
    with pytest.raises(ConfigError, match=r"grid.augment\[0\]"):
        load_config(ZooConfig, TINY, ["grid.augment=[mixup]"])
    with pytest.raises(ConfigError, match="unknown demo task 'mnist'"):
        expand_grid(load_config(ZooConfig, TINY, ["grid.task=[mnist]"]))


def test_style_task_zoo_trains_one_model_per_non_rho_configuration(tmp_path) -> None:
    config = load_config(ZooConfig, TINY, [f"data_root={tmp_path / 'data'}",
                                           "grid.task=[shapes-style]", "grid.rho=[0.5,0.9]",
                                           "grid.epochs=[1]", "grid.depth=[1]", "intermediate=0"])
    manifest = read_manifest(train_zoo(config, tmp_path / "zoo", executor="inline",
                                       stream=io.StringIO()))
    assert list(manifest["checkpoint_id"]) == ["shapes-style-lr0.002-e1-wd0.05-none-d1-s0"]
    assert manifest.loc[0, "num_classes"] == 6 and manifest.loc[0, "ood_domain"] == "ood"
    assert pd.isna(manifest.loc[0, "rho"])
