"""The paper-like demo zoo: a pretrained backbone (cached, reused, never retrained silently)
fine-tuned in regimes that change exactly the parameters they name, and a 3-model zoo through
the whole job."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from circuitray.config import load_config
from circuitray.data import demo
from circuitray.errors import ConfigError
from circuitray.models import read_manifest
from circuitray.runtime.zoo import train_zoo
from circuitray.training import ZooConfig, expand_grid, trainable

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "conf" / "zoo-demo.yaml"
# a 3-block backbone of a few seconds; one task, the three regimes, one model each
MINI = ["arch_kwargs={img_size: 32, patch_size: 8, embed_dim: 32, num_heads: 2}",
        "pretrain.epochs=2", "pretrain.n_per_shape=60", "pretrain.threads=1",
        "grid.task=[shapes-style]", "grid.regime=[linear, last1, full]", "grid.lr=[0.003]",
        "grid.epochs=[2]", "grid.weight_decay=[0.05]", "grid.augment=[none]",
        "grid.label_smoothing=[0.1]", "grid.train_fraction=[0.5]", "grid.depth=[3]",
        "grid.seed=[0]", "sample=null", "intermediate=1", "intermediate_fraction=1.0",
        "batch_size=128"]


@pytest.fixture(scope="module")
def mini_zoo(tmp_path_factory) -> tuple[ZooConfig, Path, str]:
    root = tmp_path_factory.mktemp("finetune")
    config = load_config(ZooConfig, DEMO, [f"data_root={root / 'data'}", *MINI])
    log = io.StringIO()
    train_zoo(config, root / "zoo", executor="inline", stream=log)
    return config, root / "zoo", log.getvalue()


def _weights(zoo: Path, regime: str) -> dict[str, torch.Tensor]:
    manifest = read_manifest(zoo / "manifest.csv")
    row = manifest[manifest["regime"] == regime].iloc[0]
    return load_file(str(zoo / row["weights"]))


def _backbone(zoo: Path) -> dict[str, torch.Tensor]:
    row = read_manifest(zoo / "backbone.csv").iloc[0]
    return load_file(str(zoo / row["weights"]))


def _changed(tuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> set[str]:
    """Names of the tensors (head excluded: its shape differs) that differ from the backbone."""
    return {k for k, v in tuned.items() if not k.startswith("head.") and not torch.equal(v, base[k])}


def test_linear_probe_changes_only_the_head(mini_zoo) -> None:
    _, zoo, _ = mini_zoo
    assert _changed(_weights(zoo, "linear"), _backbone(zoo)) == set()


def test_last_k_changes_only_the_last_k_blocks_and_the_final_norm(mini_zoo) -> None:
    _, zoo, _ = mini_zoo
    changed = _changed(_weights(zoo, "last1"), _backbone(zoo))
    assert changed and all(k.startswith(("blocks.2.", "norm.")) for k in changed)
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in changed if k.startswith("blocks")} \
        == {"blocks.2"}


def test_zoo_checkpoints_carry_their_normalization(mini_zoo) -> None:
    from circuitray.models import read_checkpoint_preprocessing

    _, zoo, _ = mini_zoo
    for csv in ("checkpoints.csv", "backbone.csv"):
        for _, row in read_manifest(zoo / csv).iterrows():
            fields, source = read_checkpoint_preprocessing(str(zoo / row["weights"]))
            assert fields["mean"] == [0.5, 0.5, 0.5] and "safetensors metadata" in source


def test_full_fine_tune_changes_every_block(mini_zoo) -> None:
    _, zoo, _ = mini_zoo
    changed = _changed(_weights(zoo, "full"), _backbone(zoo))
    assert {f"blocks.{i}" for i in range(3)} <= {".".join(k.split(".")[:2]) for k in changed}
    assert {"patch_embed.proj.weight", "pos_embed", "cls_token"} <= changed


def test_backbone_is_cached_with_its_row_and_curve_and_reused(mini_zoo) -> None:
    config, zoo, log = mini_zoo
    assert "pretraining backbone-d3-" in log
    row = read_manifest(zoo / "backbone.csv").iloc[0]
    assert row["task"] == demo.PRETRAIN_TASK and row["num_classes"] == 16
    curve = (zoo / "backbone" / f"{row['checkpoint_id']}.curve.csv").read_text().splitlines()
    assert curve[0].startswith("epoch,loss,val_acc") and len(curve) == 1 + 2
    finals = read_manifest(zoo / "manifest.csv")
    assert set(finals["init"]) == {row["checkpoint_id"]}
    assert sorted(finals["regime"]) == ["full", "last1", "linear"]
    log2 = io.StringIO()
    train_zoo(config, zoo, executor="inline", stream=log2)
    assert f"{row['checkpoint_id']}: reused" in log2.getvalue()
    assert "3 reused, 0 to train" in log2.getvalue()


def test_a_changed_backbone_file_retrains_backbone_and_fine_tunes(mini_zoo, tmp_path) -> None:
    import shutil

    config, zoo, _ = mini_zoo
    copy = tmp_path / "zoo"
    shutil.copytree(zoo, copy)
    row = read_manifest(copy / "backbone.csv").iloc[0]
    state = load_file(str(copy / row["weights"]))
    state["pos_embed"] = state["pos_embed"] + 1.0  # same size, other bytes
    from safetensors.torch import save_file
    save_file(state, str(copy / row["weights"]))
    log = io.StringIO()
    train_zoo(config, copy, executor="inline", stream=log)
    out = log.getvalue()
    assert "pretraining backbone-d3-" in out and "0 reused, 3 to train" in out


def test_a_moved_zoo_lists_its_backbone_with_the_data_as_seen_from_there(mini_zoo,
                                                                        tmp_path) -> None:
    """backbone.csv, like manifest.csv, gives data_root relative to where the zoo is now."""
    import shutil

    config, zoo, _ = mini_zoo
    moved = tmp_path / "deeper" / "zoo"
    shutil.copytree(zoo, moved)
    train_zoo(config, moved, executor="inline", stream=io.StringIO())
    for name in ("backbone.csv", "manifest.csv"):
        row = read_manifest(moved / name).iloc[0]
        assert (moved / row["data_root"]).resolve().is_dir(), name
    backbone = read_manifest(moved / "backbone.csv").iloc[0]
    assert (moved / backbone["data_root"]).resolve() == \
        (Path(config.data_root) / demo.PRETRAIN_TASK).resolve()


def test_backbone_spec_changes_with_the_corpus_rendering(monkeypatch) -> None:
    """A backbone trained on an earlier rendering of pretrain-mix must not be reused."""
    import circuitray.training as training

    config = load_config(ZooConfig, DEMO)
    before = training.backbone_spec(config, 8)["checkpoint_id"]
    monkeypatch.setattr(training, "PRETRAIN_VERSION", demo.PRETRAIN_VERSION + 1)
    assert training.backbone_spec(config, 8)["checkpoint_id"] != before


def test_a_fine_tune_of_an_earlier_task_rendering_is_not_reused(mini_zoo, monkeypatch) -> None:
    """Fine-tunes (and scratch models) record their task's rendering version: a model trained
    on images drawn by an earlier renderer must be retrained, not reused."""
    from circuitray.training import read_record

    config, zoo, _ = mini_zoo
    spec = expand_grid(config)[0]
    assert spec["corpus_version"] == demo.task_version("shapes-style")
    assert read_record(zoo, spec) is not None
    monkeypatch.setattr(demo, "SHAPES_VERSION", demo.SHAPES_VERSION + 1)
    again = {s["checkpoint_id"]: s for s in expand_grid(config)}[spec["checkpoint_id"]]
    assert read_record(zoo, again) is None
    assert {demo.task_version(t) for t in demo.DIGIT_TASKS} == {demo.DIGITS_VERSION}


def test_pretraining_corpus_holds_no_held_out_digit_and_no_striped_shape(monkeypatch,
                                                                         tmp_path) -> None:
    seen_digits, styles = [], []
    real_digits, real_shapes = demo._render_digits, demo._render_shapes

    def digits_spy(kind, digits, cues, rng):
        seen_digits.append(digits.copy())
        return real_digits(kind, digits, cues, rng)

    def shapes_spy(labels, style, rng):
        styles.append(style)
        return real_shapes(labels, style, rng)

    monkeypatch.setattr(demo, "_render_digits", digits_spy)
    monkeypatch.setattr(demo, "_render_shapes", shapes_spy)
    task_dir = demo.build_demo_task(demo.PRETRAIN_TASK, tmp_path, n_per_shape=12)
    assert sorted(p.name for p in (task_dir / "train").iterdir()) == sorted(
        [f"digit{k}" for k in range(10)] + list(demo.SHAPES))
    assert set(styles) == set(demo.TRAIN_STYLES)
    all_digits, _, split = demo._digit_split(0)
    used = {d.tobytes() for d in np.concatenate(seen_digits)}
    train = {d.tobytes() for d in all_digits[split["train"]]}
    held_out = {d.tobytes() for d in all_digits[np.concatenate([split["ood"], split["id"]])]}
    # every rendered digit is a training digit; sklearn has a few exact duplicate images,
    # so "not held out" is checked on the images that are only in the held-out split
    assert used and used <= train
    assert not used & (held_out - train)


def test_demo_zoo_is_48_fine_tunes_per_task_over_every_regime() -> None:
    specs = expand_grid(load_config(ZooConfig, DEMO))
    by_task: dict[str, list[dict]] = {}
    for s in specs:
        by_task.setdefault(s["task"], []).append(s)
    assert set(by_task) == {"digits-background", "digits-patch"}
    for task_specs in by_task.values():
        assert len(task_specs) >= 48
        regimes = [s["regime"] for s in task_specs]
        assert {regimes.count(r) for r in set(regimes)} == {16}  # balanced
        for knob in ("lr", "epochs", "weight_decay", "augment", "label_smoothing",
                     "train_fraction", "seed"):
            assert len({s[knob] for s in task_specs}) >= 2, knob
        assert len({s["lr"] for s in task_specs}) >= 3
        assert any(s["intermediate"] for s in task_specs)
        assert len({s["init"] for s in task_specs}) == 1
        assert len({s["rho"] for s in task_specs}) >= 3
    assert len({s["checkpoint_id"] for s in specs}) == len(specs)


@pytest.mark.parametrize("override, key", [
    ("grid.regime=[last9]", "grid.regime"),
    ("grid.regime=[frozen]", "grid.regime"),
    ("grid.train_fraction=[0]", "grid.train_fraction"),
    ("sample=0", "sample: 0 models per task"),
    ("intermediate_fraction=5", "intermediate_fraction: 5"),
    ("intermediate_fraction=-1", "intermediate_fraction: -1"),
])
def test_bad_fine_tune_settings_name_the_key(override: str, key: str) -> None:
    config = load_config(ZooConfig, DEMO, ["grid.depth=[8]", override])
    with pytest.raises(ConfigError, match=key):
        expand_grid(config)


def test_fine_tune_regime_without_pretraining_is_refused() -> None:
    config = load_config(ZooConfig, DEMO, ["pretrain.enabled=false"])
    with pytest.raises(ConfigError, match="pretrain.enabled"):
        expand_grid(config)


def test_trainable_freezes_everything_but_what_the_regime_names() -> None:
    from circuitray.models import build_model

    model = build_model("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8,
                                                 "embed_dim": 32, "num_heads": 2,
                                                 "depth": 4}, 3)
    for regime, expect in [("linear", ("head.",)),
                           ("last2", ("head.", "norm.", "blocks.2.", "blocks.3."))]:
        params = {id(p) for p in trainable(model, regime)}
        trained = {n for n, p in model.named_parameters() if id(p) in params}
        assert trained and all(n.startswith(expect) for n in trained)
        assert all(p.requires_grad == (id(p) in params) for p in model.parameters())
    assert len(trainable(model, "full")) == len(list(model.parameters()))


@pytest.mark.slow
def test_mini_paper_zoo_runs_through_the_whole_job(mini_zoo, tmp_path, local_ray) -> None:
    from circuitray.job_config import load_job_config
    from circuitray.runtime.pipeline import run_pipeline

    _, zoo, _ = mini_zoo
    cfg = load_job_config(ROOT / "conf" / "tiny.yaml",
                          [f"manifest={zoo / 'checkpoints.csv'}", f"output_dir={tmp_path / 'job'}",
                           "tracking.enabled=false", "reduce.taus=[0.34]"])
    run_pipeline(cfg)
    report = (tmp_path / "job" / "evaluation" / "report.txt").read_text()
    assert "shapes-style" in report
    models = (tmp_path / "job" / "metrics" / "models.parquet")
    import pandas as pd
    table = pd.read_parquet(models)
    assert len(table[table["task"] == "shapes-style"]) >= 3
