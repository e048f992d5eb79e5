"""Manifests and safe checkpoint loading: round trips, refused pickles, clear errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from circuitray.errors import CheckpointError, ConfigError, DataError
from circuitray.models import (
    ARCH_KWARGS_ALLOWED,
    ARCH_KWARGS_REFUSED,
    build_model,
    iter_checkpoints,
    load_checkpoint,
    read_manifest,
)

ARCH = "vit_tiny_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _row(weights: Path | str, num_classes: int = 10, cid: str = "m0") -> dict:
    return {"checkpoint_id": cid, "task": "t", "arch": ARCH, "arch_kwargs": json.dumps(KWARGS),
            "weights": str(weights), "num_classes": num_classes}


def _save_safetensors(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture()
def model() -> torch.nn.Module:
    return build_model(ARCH, KWARGS, 10).eval()


def test_safetensors_round_trip_gives_the_same_outputs(tmp_path, model) -> None:
    path = _save_safetensors(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(_row(path))
    x = torch.randn(2, 3, 32, 32)
    assert not loaded.training
    assert torch.allclose(loaded(x), model(x))


def test_plain_state_dict_pt_loads_with_weights_only(tmp_path, model) -> None:
    torch.save({"state_dict": model.state_dict()}, tmp_path / "m.pt")
    loaded = load_checkpoint(_row(tmp_path / "m.pt"))
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(loaded(x), model(x))


class _WritesAFile:
    """Unpickling this calls Path.write_text(target, 'pwned'): arbitrary code execution."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "pwned"))


def test_malicious_pickle_is_not_executed(tmp_path, model) -> None:
    victim, control = tmp_path / "victim.txt", tmp_path / "control.txt"
    state = dict(model.state_dict())
    torch.save({**state, "evil": _WritesAFile(victim)}, tmp_path / "evil.pt")
    torch.save({**state, "evil": _WritesAFile(control)}, tmp_path / "control.pt")
    # the payload is real: an unsafe load would run it
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.read_text() == "pwned"
    with pytest.raises(CheckpointError, match=r"'m0' \(.*evil.pt\): unreadable weights: refused"):
        load_checkpoint(_row(tmp_path / "evil.pt"))
    assert not victim.exists()


def test_raw_pickle_file_with_payload_is_refused(tmp_path) -> None:
    victim = tmp_path / "victim.txt"
    (tmp_path / "raw.pth").write_bytes(pickle.dumps({"w": _WritesAFile(victim)}, protocol=2))
    with pytest.raises(CheckpointError, match="raw.pth"):
        load_checkpoint(_row(tmp_path / "raw.pth"))
    assert not victim.exists()


def test_wrong_shape_names_tensor_and_shapes(tmp_path) -> None:
    other = build_model(ARCH, KWARGS, 7)
    path = _save_safetensors(other, tmp_path / "seven.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_row(path, num_classes=10, cid="vit-7"))
    msg = str(info.value)
    assert "checkpoint 'vit-7'" in msg and "seven.safetensors" in msg
    assert "head.weight has shape (7, 32), architecture expects (10, 32)" in msg


def test_missing_and_unexpected_tensors_are_listed(tmp_path, model) -> None:
    state = {k: v for k, v in model.state_dict().items() if k != "norm.bias"}
    state["extra.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['norm.bias'\].*"
                                              r"unexpected tensor\(s\) \['extra.weight'\]"):
        load_checkpoint(_row(tmp_path / "odd.safetensors"))


def test_truncated_safetensors_gives_a_clear_error(tmp_path, model) -> None:
    path = _save_safetensors(model, tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.safetensors\): unreadable weights"):
        load_checkpoint(_row(path))


def test_missing_file_and_unknown_architecture(tmp_path, model) -> None:
    with pytest.raises(CheckpointError, match="weights file does not exist"):
        load_checkpoint(_row(tmp_path / "nope.safetensors"))
    path = _save_safetensors(model, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="cannot build architecture 'no_such_vit'"):
        load_checkpoint({**_row(path), "arch": "no_such_vit"})


@pytest.mark.parametrize("fmt", ["csv", "parquet", "yaml"])
def test_read_manifest_resolves_relative_paths(tmp_path, model, fmt) -> None:
    (tmp_path / "w").mkdir()
    _save_safetensors(model, tmp_path / "w" / "a.safetensors")
    rows = [{**_row("w/a.safetensors"), "lr": 0.001, "data_root": "data/task"},
            {**_row("s3://bucket/b.safetensors", cid="m1"), "lr": 0.002, "data_root": "/abs"}]
    rows[1]["arch_kwargs"] = KWARGS  # a mapping is accepted too
    path = tmp_path / f"manifest.{fmt}"
    if fmt == "csv":
        pd.DataFrame([{**r, "arch_kwargs": json.dumps(r["arch_kwargs"]) if isinstance(
            r["arch_kwargs"], dict) else r["arch_kwargs"]} for r in rows]).to_csv(path, index=False)
    elif fmt == "parquet":
        pd.DataFrame([{**r, "arch_kwargs": json.dumps(KWARGS)} for r in rows]).to_parquet(path)
    else:
        import yaml

        path.write_text(yaml.safe_dump({"checkpoints": rows}))
    df = read_manifest(path)
    assert list(df["checkpoint_id"]) == ["m0", "m1"]
    assert df.loc[0, "weights"] == str(tmp_path / "w" / "a.safetensors")
    assert df.loc[1, "weights"] == "s3://bucket/b.safetensors"
    assert df.loc[0, "data_root"] == str(tmp_path / "data" / "task")
    assert json.loads(df.loc[1, "arch_kwargs"]) == KWARGS and df.loc[1, "lr"] == 0.002
    assert load_checkpoint(df.iloc[0]) is not None


def test_manifest_errors_name_file_and_columns(tmp_path) -> None:
    pd.DataFrame([{"checkpoint_id": "a", "arch": ARCH}]).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(DataError, match=r"m.csv: manifest misses column\(s\) \['task'"):
        read_manifest(tmp_path / "m.csv")
    pd.DataFrame([_row("x"), _row("y")]).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match=r"duplicate checkpoint_id\(s\) \['m0'\]"):
        read_manifest(tmp_path / "d.csv")


def test_bad_checkpoint_does_not_stop_the_others(tmp_path, model) -> None:
    good = _save_safetensors(model, tmp_path / "good.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    df = pd.DataFrame([_row(good, cid="g1"), _row(tmp_path / "bad.safetensors", cid="b"),
                       _row(good, cid="g2")])
    results = [(row["checkpoint_id"], m is not None, e) for row, m, e in iter_checkpoints(df)]
    assert [r[:2] for r in results] == [("g1", True), ("b", False), ("g2", True)]
    assert results[1][2].checkpoint_id == "b" and "bad.safetensors" in results[1][2].path


def test_weights_from_an_fsspec_uri(tmp_path, model) -> None:
    import fsspec

    path = _save_safetensors(model, tmp_path / "m.safetensors")
    with fsspec.open("memory://zoo/m.safetensors", "wb") as fh:
        fh.write(path.read_bytes())
    loaded = load_checkpoint(_row("memory://zoo/m.safetensors"))
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(loaded(x), model(x))
    with pytest.raises(CheckpointError, match="memory://zoo/missing.safetensors"):
        load_checkpoint(_row("memory://zoo/missing.safetensors"))


def test_arch_kwargs_checkpoint_path_is_refused_before_timm_reads_it(tmp_path, model,
                                                                     monkeypatch) -> None:
    """A manifest's arch_kwargs must not make timm load a file of its choosing."""
    import timm.models._factory as factory

    opened: list[str] = []
    monkeypatch.setattr(factory, "load_checkpoint",
                        lambda model, path, *a, **k: opened.append(str(path)))
    weights = _save_safetensors(model, tmp_path / "m.safetensors")
    torch.save(model.state_dict(), tmp_path / "other.pth")
    row = {**_row(weights, cid="zoo-17"),
           "arch_kwargs": json.dumps({**KWARGS, "checkpoint_path": str(tmp_path / "other.pth")})}
    with pytest.raises(CheckpointError, match=r"checkpoint 'zoo-17' \(.*m.safetensors\): "
                                              r".*arch_kwargs key 'checkpoint_path' is not "
                                              r"allowed"):
        load_checkpoint(row)
    assert opened == [], "the file reached timm's loader"
    for key, value in (("pretrained_cfg_overlay", {"file": str(tmp_path / "other.pth")}),
                       ("cache_dir", str(tmp_path)), ("pretrained", True),
                       ("norm_layer", "layernorm")):
        with pytest.raises(CheckpointError, match=f"arch_kwargs key '{key}' is not allowed"):
            load_checkpoint({**row, "arch_kwargs": json.dumps({**KWARGS, key: value})})
    with pytest.raises(ConfigError, match="architecture 'vit_tiny_patch16_224': arch_kwargs "
                                          "key 'checkpoint_path'"):
        build_model(ARCH, {**KWARGS, "checkpoint_path": "x.pth"}, 10)
    assert opened == []


def test_shape_kwargs_still_build_and_pretrained_false_is_harmless(tmp_path, model) -> None:
    weights = _save_safetensors(model, tmp_path / "m.safetensors")
    extra = {**KWARGS, "pretrained": False, "num_classes": 10, "mlp_ratio": 4.0,
             "qkv_bias": True, "drop_path_rate": 0.0, "global_pool": "token"}
    loaded = load_checkpoint({**_row(weights), "arch_kwargs": json.dumps(extra)})
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(loaded(x), model(x))


def test_timm_train_checkpoint_pth_tar_with_args_namespace_loads(tmp_path, model) -> None:
    """timm's train.py writes checkpoint.pth.tar: state_dict plus its argparse `args`."""
    import argparse

    args = argparse.Namespace(model=ARCH, mean=[0.485, 0.456, 0.406], lr=1e-3)
    torch.save({"epoch": 3, "arch": ARCH, "state_dict": model.state_dict(), "args": args,
                "version": 2}, tmp_path / "checkpoint.pth.tar")
    loaded = load_checkpoint(_row(tmp_path / "checkpoint.pth.tar"))
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(loaded(x), model(x))


def test_every_vision_transformer_argument_is_allowed_or_refused_on_purpose() -> None:
    """A timm upgrade that adds an argument must be classified here, not pass silently."""
    import inspect

    from timm.models.vision_transformer import VisionTransformer

    params = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self", "kwargs"}
    assert not ARCH_KWARGS_ALLOWED & set(ARCH_KWARGS_REFUSED)
    assert params - ARCH_KWARGS_ALLOWED - set(ARCH_KWARGS_REFUSED) == set()
    loaders = {"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"}
    assert loaders <= set(ARCH_KWARGS_REFUSED)


def test_pth_tar_with_a_payload_is_still_refused(tmp_path, model) -> None:
    victim = tmp_path / "victim.txt"
    torch.save({"state_dict": model.state_dict(), "args": _WritesAFile(victim)},
               tmp_path / "evil.pth.tar")
    with pytest.raises(CheckpointError, match=r"evil.pth.tar\): unreadable weights: refused"):
        load_checkpoint(_row(tmp_path / "evil.pth.tar"))
    assert not victim.exists()
    (tmp_path / "x.tar").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"unknown weights format '.tar'"):
        load_checkpoint(_row(tmp_path / "x.tar"))


def test_list_columns_of_a_parquet_manifest_become_json(tmp_path, model) -> None:
    """A Parquet list column (classes, mean, std) reads as JSON text, like arch_kwargs."""
    path = _save_safetensors(model, tmp_path / "a.safetensors")
    pd.DataFrame([{**_row(path), "classes": ["b", "a"], "mean": [0.1, 0.2, 0.3]}]).to_parquet(
        tmp_path / "m.parquet")
    df = read_manifest(tmp_path / "m.parquet")
    assert json.loads(df.loc[0, "classes"]) == ["b", "a"]
    assert json.loads(df.loc[0, "mean"]) == [0.1, 0.2, 0.3]


def test_weights_key_picks_the_state_dict_and_bad_keys_are_refused(tmp_path, model) -> None:
    """timm's CheckpointSaver stores the EMA weights beside the model's as `state_dict_ema`."""
    ema = build_model(ARCH, KWARGS, 10)
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": ema.state_dict(),
                "optimizer": {"state": {}}}, tmp_path / "last.pth.tar")
    x = torch.randn(1, 3, 32, 32)
    row = _row(tmp_path / "last.pth.tar")
    assert torch.allclose(load_checkpoint({**row, "weights_key": "state_dict_ema"})(x),
                          ema.eval()(x))
    assert torch.allclose(load_checkpoint({**row, "weights_key": None})(x), model(x))
    with pytest.raises(CheckpointError, match=r"no state dict 'ema' in the file \(its state "
                                              r"dicts: \['optimizer', 'state_dict'"):
        load_checkpoint({**row, "weights_key": "ema"})
    path = _save_safetensors(model, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="a .safetensors file holds one set of weights"):
        load_checkpoint({**_row(path), "weights_key": "state_dict_ema"})
    pd.DataFrame([{**row, "weights_key": "../etc passwd"}]).to_csv(tmp_path / "m.csv",
                                                                   index=False)
    with pytest.raises(DataError, match="weights_key must name a state dict"):
        read_manifest(tmp_path / "m.csv")
