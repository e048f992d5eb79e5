"""Each checkpoint's mean/std come from the checkpoint, the manifest or the config before timm's
guess, and the source is recorded: a model trained with other normalization must not lose
accuracy without a word."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from _jobdata import write_checkpoints
from safetensors.torch import save_file

from circuitray.data.preprocess import resolve_preprocessing
from circuitray.errors import CheckpointError, ConfigError
from circuitray.job_config import load_job_config
from circuitray.models import build_model, load_checkpoint
from circuitray.runtime.discover import discover_checkpoint
from circuitray.runtime.layout import JobLayout
from circuitray.runtime.plan import manifest_rows

CONF = Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml"
ARCH = "vit_tiny_patch16_224"  # timm default mean/std: 0.5, 0.5
KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
NO_CFG = SimpleNamespace(mean=None, std=None)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(ARCH, KWARGS, 2).eval()


def _row(weights: Path, **extra) -> dict:
    return {"checkpoint_id": "c0", "task": "t", "arch": ARCH, "arch_kwargs": json.dumps(KWARGS),
            "weights": str(weights), "num_classes": 2, **extra}


def _safetensors(model: torch.nn.Module, path: Path, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata=metadata)
    return path


def _timm_train_args(**over) -> argparse.Namespace:
    """What timm's train.py stores as `args` (the fields that matter here, its defaults)."""
    args = dict(model=ARCH, mean=None, std=None, input_size=None, img_size=None,
                interpolation="", crop_pct=None, lr=1e-3, epochs=10)
    return argparse.Namespace(**{**args, **over})


def _resolve(row: dict, model: torch.nn.Module, cfg=NO_CFG):
    return resolve_preprocessing(row, model, cfg, row["weights"])


def test_hub_config_json_beside_the_weights_gives_mean_and_std(tmp_path, model) -> None:
    weights = _safetensors(model, tmp_path / "hub" / "model.safetensors")
    (tmp_path / "hub" / "config.json").write_text(json.dumps({
        "architecture": ARCH, "num_classes": 2,
        "pretrained_cfg": {"mean": IMAGENET[0], "std": IMAGENET[1], "input_size": [3, 32, 32],
                           "interpolation": "bilinear", "crop_pct": 0.875}}))
    tf, source = _resolve(_row(weights), model)
    assert (list(tf.mean), list(tf.std)) == IMAGENET
    assert tf.interpolation == "bilinear" and tf.crop_pct == 0.875 and tf.size == (32, 32)
    assert source == f"checkpoint config.json {tmp_path / 'hub' / 'config.json'}"


@pytest.mark.parametrize("name", ["checkpoint.pth.tar", "model_best.pth"])
def test_timm_train_checkpoint_args_give_mean_and_std(tmp_path, model, name) -> None:
    path = tmp_path / name
    torch.save({"epoch": 9, "arch": ARCH, "state_dict": model.state_dict(), "version": 2,
                "args": _timm_train_args(mean=IMAGENET[0], std=IMAGENET[1],
                                         interpolation="bilinear")}, path)
    loaded = load_checkpoint(_row(path))
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(loaded(x), model(x))
    tf, source = _resolve(_row(path), model)
    assert (list(tf.mean), list(tf.std)) == IMAGENET and tf.interpolation == "bilinear"
    assert source == f"checkpoint training args {path}"


def test_train_args_without_mean_fall_through_to_the_manifest(tmp_path, model) -> None:
    path = tmp_path / "last.pth.tar"
    torch.save({"state_dict": model.state_dict(), "args": _timm_train_args()}, path)
    row = _row(path, mean=json.dumps([0.1, 0.2, 0.3]), std=json.dumps([0.3, 0.3, 0.3]))
    tf, source = _resolve(row, model)
    assert tf.mean == (0.1, 0.2, 0.3) and source == "manifest columns mean, std"


def test_safetensors_metadata_gives_mean_and_std(tmp_path, model) -> None:
    path = _safetensors(model, tmp_path / "m.safetensors",
                        {"mean": json.dumps(IMAGENET[0]), "std": json.dumps(IMAGENET[1])})
    tf, source = _resolve(_row(path), model)
    assert (list(tf.mean), list(tf.std)) == IMAGENET
    assert source == f"checkpoint safetensors metadata {path}"


def test_manifest_mean_std_beat_the_timm_default(tmp_path, model, capsys) -> None:
    path = _safetensors(model, tmp_path / "m.safetensors")
    row = _row(path, mean=json.dumps(IMAGENET[0]), std=json.dumps(IMAGENET[1]),
               crop_pct=0.9)
    tf, source = _resolve(row, model)
    assert (list(tf.mean), list(tf.std)) == IMAGENET and tf.crop_pct == 0.9
    assert source == "manifest columns mean, std"
    assert "timm default" not in capsys.readouterr().err


def test_config_mean_std_are_used_when_checkpoint_and_manifest_say_nothing(tmp_path,
                                                                           model) -> None:
    path = _safetensors(model, tmp_path / "m.safetensors")
    cfg = SimpleNamespace(mean=IMAGENET[0], std=IMAGENET[1])
    tf, source = _resolve(_row(path), model, cfg)
    assert (list(tf.mean), list(tf.std)) == IMAGENET and source == "config data.mean, data.std"
    tf, source = _resolve(_row(path, mean="[0.1, 0.1, 0.1]", std="[0.2, 0.2, 0.2]"), model, cfg)
    assert source == "manifest columns mean, std"


def test_the_timm_default_prints_a_notice_naming_the_source(tmp_path, model, capsys) -> None:
    path = _safetensors(model, tmp_path / "m.safetensors")
    tf, source = _resolve(_row(path), model)
    assert tf.mean == (0.5, 0.5, 0.5) and tf.size == (32, 32)  # built size beats timm's 224
    assert source == f"timm default for arch '{ARCH}'"
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"checkpoint 'c0': normalization mean=[0.5, 0.5, 0.5] std=[0.5, 0.5, 0.5] from timm " \
           f"default for arch '{ARCH}'" in err


def test_the_checkpoint_beats_the_manifest_and_says_so(tmp_path, model, capsys) -> None:
    path = _safetensors(model, tmp_path / "m.safetensors",
                        {"mean": json.dumps(IMAGENET[0]), "std": json.dumps(IMAGENET[1])})
    tf, _ = _resolve(_row(path, mean="[0.1, 0.1, 0.1]", std=json.dumps(IMAGENET[1])), model)
    assert list(tf.mean) == IMAGENET[0]
    assert "mean [0.1, 0.1, 0.1] from manifest columns mean, std ignored" in \
        capsys.readouterr().err


def test_the_built_resolution_beats_a_sources_input_size(tmp_path, model, capsys) -> None:
    path = _safetensors(model, tmp_path / "m.safetensors",
                        {"mean": json.dumps(IMAGENET[0]), "std": json.dumps(IMAGENET[1]),
                         "input_size": "[3, 224, 224]"})
    tf, _ = _resolve(_row(path), model)
    assert tf.size == (32, 32)
    assert "input_size [224, 224]" in capsys.readouterr().err


@pytest.mark.parametrize(("mean", "std", "match"), [
    ([0.5, 0.5, 0.5], [0.5, 0.0, 0.5], "std must be 3 positive numbers"),
    ([0.5, 0.5], [0.5, 0.5, 0.5], "mean must be 3 finite numbers"),
    ([123.7, 116.3, 103.5], [58.4, 57.1, 57.4], "0-255 scale"),
])
def test_bad_values_name_the_checkpoint_and_the_source(tmp_path, model, mean, std,
                                                       match) -> None:
    path = _safetensors(model, tmp_path / "m.safetensors")
    row = _row(path, mean=json.dumps(mean), std=json.dumps(std))
    with pytest.raises(CheckpointError, match=rf"checkpoint 'c0' .*preprocessing from manifest "
                                              rf"columns mean, std: .*{match}"):
        _resolve(row, model)


def test_a_broken_hub_config_names_the_file(tmp_path, model) -> None:
    weights = _safetensors(model, tmp_path / "hub" / "model.safetensors")
    (tmp_path / "hub" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"checkpoint 'c0'.*config.json is not valid JSON"):
        _resolve(_row(weights), model)


def test_config_keys_are_validated_naming_the_key(tmp_path) -> None:
    base = [f"manifest={tmp_path / 'm.csv'}"]
    with pytest.raises(ConfigError, match=r"data.std.*std must be 3 positive"):
        load_job_config(CONF, [*base, "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.5, 0, 0.5]"])
    with pytest.raises(ConfigError, match=r"data.std.*give both or neither"):
        load_job_config(CONF, [*base, "data.mean=[0.5, 0.5, 0.5]"])
    cfg = load_job_config(CONF, [*base, "data.mean=[0.5, 0.5, 0.5]", "data.std=[0.2, 0.2, 0.2]",
                                 "data.class_map=classes.txt"], base=tmp_path)
    assert cfg.data.std == [0.2, 0.2, 0.2] and cfg.data.class_map == str(tmp_path / "classes.txt")


# ------------------------------------------------------------------- end to end


def _hub_config(manifest: Path, mean: list[float], std: list[float]) -> None:
    (manifest.parent / "weights" / "config.json").write_text(json.dumps(
        {"architecture": "vit_tiny_patch16_224", "pretrained_cfg": {"mean": mean, "std": std}}))


def test_discover_uses_and_records_the_checkpoints_normalization(tmp_path: Path) -> None:
    """The outputs are the model's logits on images normalized the checkpoint's way."""
    from circuitray.data.datasets import DomainFolderDataset, ImageTransform

    manifest = write_checkpoints(tmp_path, 1)
    _hub_config(manifest, *IMAGENET)
    cfg = load_job_config(CONF, [f"manifest={manifest}", f"output_dir={tmp_path / 'job'}",
                                 "data.shift_kinds=[]", "data.proxy_kinds=[]",
                                 "data.limit=null", "data.attribution_limit=4"])
    row = manifest_rows(cfg)[0]
    assert discover_checkpoint(row, cfg)["status"] == "done"
    layout = JobLayout.of(cfg.output_dir)
    marker = pq.read_table(layout.marker("ckpt0")).to_pandas()
    assert set(marker.norm_source) == {
        f"checkpoint config.json {manifest.parent / 'weights' / 'config.json'}"}
    assert [list(v) for v in marker["mean"]] == [IMAGENET[0]] * 2
    assert [list(v) for v in marker["std"]] == [IMAGENET[1]] * 2
    out = pq.read_table(layout.outputs_file("toy", "ckpt0", "id")).to_pandas()
    model = load_checkpoint(row)
    tf = ImageTransform(size=(16, 16), mean=tuple(IMAGENET[0]), std=tuple(IMAGENET[1]))
    ds = DomainFolderDataset(row["data_root"], "id", tf, classes=["0", "1"])
    with torch.no_grad():
        expected = model(torch.stack([ds[i][0] for i in range(len(ds))]))
    got = torch.from_numpy(np.stack(out.logits.tolist()))
    assert torch.allclose(got, expected, atol=1e-4)


@pytest.mark.slow
def test_pipeline_records_the_normalization_source_in_markers_and_mlflow(tmp_path: Path) -> None:
    import ray
    from mlflow.tracking import MlflowClient

    from circuitray.runtime.pipeline import run_pipeline

    manifest = write_checkpoints(tmp_path, 2)
    _hub_config(manifest, *IMAGENET)
    cfg = load_job_config(CONF, [f"manifest={manifest}", f"output_dir={tmp_path / 'job'}",
                                 "reduce.figures=false"])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = run_pipeline(cfg)
    finally:
        ray.shutdown()
    assert sorted(result.discover.done) == ["ckpt0", "ckpt1"]
    layout = JobLayout.of(cfg.output_dir)
    source = f"checkpoint config.json {manifest.parent / 'weights' / 'config.json'}"
    for cid in ("ckpt0", "ckpt1"):
        marker = pq.read_table(layout.marker(cid)).to_pandas()
        assert set(marker.norm_source) == {source}
    client = MlflowClient(tracking_uri=f"sqlite:///{layout.root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("circuitray-tiny")
    children = [r for r in client.search_runs([exp.experiment_id])
                if "checkpoint" in r.data.tags]
    assert {r.data.tags["checkpoint"]: r.data.tags["norm_source"] for r in children} == {
        "ckpt0": source, "ckpt1": source}
    assert {r.data.tags["class_source"] for r in children} == {
        f"ID domain folders {Path(manifest_rows(cfg)[0]['data_root']) / 'id'}"}
