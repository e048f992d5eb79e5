"""`circuitray manifest`: timm training runs, hub folders and plain files become a manifest.

The files are written by timm's own code: a tiny ViT trained for two epochs and saved by
`timm.utils.CheckpointSaver` (argparse `args`, optimizer state, EMA), `update_summary`'s
summary.csv, and `timm.models.save_for_hf`'s hub folder; not hand-made dicts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
import yaml
from _jobdata import write_domains
from safetensors.torch import save_file

from circuitray.cli import main
from circuitray.errors import CheckpointError
from circuitray.manifest_scan import format_summary, scan, write_manifest
from circuitray.models import load_checkpoint, read_manifest

ARCH = "vit_tiny_patch16_224"
MODEL_KWARGS = {"img_size": 16, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TRAIN_MEAN, TRAIN_STD = [0.4, 0.45, 0.5], [0.2, 0.25, 0.3]
HUB_MEAN, HUB_STD = [0.1, 0.2, 0.3], [0.3, 0.3, 0.3]


def _args(**over) -> argparse.Namespace:
    """What timm's train.py stores as `args` (the options that matter here)."""
    values = dict(model=ARCH, model_kwargs=dict(MODEL_KWARGS), num_classes=2, img_size=16,
                  input_size=None, in_chans=None, gp=None, mean=TRAIN_MEAN, std=TRAIN_STD,
                  interpolation="", crop_pct=1.0, drop=0.0, drop_path=0.1, drop_block=None,
                  lr=1e-3, weight_decay=0.05, epochs=2, opt="adamw", momentum=0.9,
                  batch_size=8, sched="cosine", warmup_epochs=0, mixup=0.0, cutmix=0.0,
                  smoothing=0.1, aa=None, seed=0, model_ema=True, model_ema_decay=0.5,
                  checkpoint_hist=10, output="", experiment="tiny")
    values.update(over)
    return argparse.Namespace(**values)


def train_run(out: Path, data: Path, *, epochs: int = 2, **args_over) -> dict:
    """Train a tiny ViT the way timm's train.py does and let CheckpointSaver write the run."""
    from timm.data import ImageDataset, create_transform
    from timm.optim import create_optimizer_v2
    from timm.utils import CheckpointSaver, ModelEmaV3, accuracy, update_summary

    args = _args(epochs=epochs, **args_over)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = timm.create_model(args.model, num_classes=args.num_classes, drop_rate=args.drop,
                              drop_path_rate=args.drop_path, **args.model_kwargs)
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr,
                                    weight_decay=args.weight_decay)
    ema = ModelEmaV3(model, decay=args.model_ema_decay)
    saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=ema,
                            checkpoint_dir=str(out), recovery_dir=str(out),
                            max_history=args.checkpoint_hist)
    (out / "args.yaml").write_text(yaml.safe_dump(vars(args)))
    tf = create_transform(16, interpolation="bicubic", mean=tuple(args.mean),
                          std=tuple(args.std), crop_pct=1.0)
    loader = torch.utils.data.DataLoader(ImageDataset(str(data / "id"), transform=tf),
                                         batch_size=args.batch_size, shuffle=True)
    best = None
    for epoch in range(epochs):
        model.train()
        for step, (x, y) in enumerate(loader):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema.update(model, step=epoch * len(loader) + step)
        model.eval()
        with torch.no_grad():
            logits, labels = zip(*[(ema.module(x), y) for x, y in loader], strict=True)
        top1, top5 = accuracy(torch.cat(logits), torch.cat(labels), topk=(1, 2))
        update_summary(epoch, {"loss": loss.item()}, {"top1": float(top1), "top5": float(top5)},
                       str(out / "summary.csv"), write_header=epoch == 0)
        best = saver.save_checkpoint(epoch, metric=float(top1))
    return {"best_epoch": best[1], "model": model, "ema": ema.module}


def write_hub_folder(folder: Path, seed: int = 1) -> torch.nn.Module:
    """A hub-layout folder as timm writes it (config.json with pretrained_cfg, safetensors)."""
    from timm.models import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model(ARCH, num_classes=2, **MODEL_KWARGS)
    save_for_hf(model, str(folder), safe_serialization=True,
                data_config={"mean": tuple(HUB_MEAN), "std": tuple(HUB_STD)},
                model_config={"label_names": ["0", "1"]})
    return model


def write_plain(path: Path, seed: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(ARCH, num_classes=2, **MODEL_KWARGS)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def write_hf_cache(cache: Path, repo: str, source: Path) -> Path:
    """The standard hub cache layout: blobs/<sha256>, snapshots/<rev>/<file> -> blob, refs/main."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    rev = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = folder / "snapshots" / rev
    (folder / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        blob = folder / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(rev)
    return snapshot


class _RunsAShellCommand:
    """Unpickling this calls os.system(...): arbitrary code execution."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch '{self.sentinel}'",))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    """One data folder, one trained timm run, one hub folder and one plain file."""
    root = tmp_path_factory.mktemp("zoo")
    data = write_domains(root / "data", n_per_class=8, size=16)
    start = time.perf_counter()
    run = train_run(root / "runs" / "tiny-run", data)
    hub = write_hub_folder(root / "hub" / "vit-hub")
    plain = write_plain(root / "files" / "plain-vit.safetensors")
    return {"root": root, "data": data, "run": run, "hub": hub, "plain": plain,
            "seconds": time.perf_counter() - start}


def _scan_all(zoo: dict, **kw):
    root = zoo["root"]
    kw = {"task": "toy", "data_root": zoo["data"], "id_domain": "id", "ood_domain": "ood",
          "arch": ARCH, "arch_kwargs": MODEL_KWARGS, **kw}
    return scan([root / "runs", root / "hub", root / "files"], **kw)


def test_a_timm_training_run_becomes_one_row_per_epoch(zoo) -> None:
    result = _scan_all(zoo)
    assert result.unreadable == []
    assert result.counts == {"tiny-run": 2, "vit-hub": 1, "plain-vit": 1}
    rows = result.rows.set_index("checkpoint_id")
    run = rows[rows.parent_id == "tiny-run"].sort_values("epoch")
    assert list(run.index) == ["tiny-run.e0", "tiny-run"]
    assert list(run.epoch) == [0, 1] and list(run.final) == [False, True]
    assert set(run.arch) == {ARCH} and set(run.num_classes) == {2}
    # train.py passes --model-kwargs and --drop/--drop-path to create_model; nothing else
    assert json.loads(run.arch_kwargs.iloc[0]) == {**MODEL_KWARGS, "drop_rate": 0.0,
                                                   "drop_path_rate": 0.1}
    assert run.weights.iloc[0].endswith("tiny-run/checkpoint-0.pth.tar")
    for col, value in (("lr", 1e-3), ("weight_decay", 0.05), ("epochs", 2), ("opt", "adamw"),
                       ("batch_size", 8), ("mixup", 0.0), ("cutmix", 0.0), ("smoothing", 0.1),
                       ("seed", 0), ("drop_path", 0.1)):
        assert set(run[col]) == {value}, col
    summary = pd.read_csv(zoo["root"] / "runs" / "tiny-run" / "summary.csv")
    assert list(run.logged_id_acc) == pytest.approx(list(summary.eval_top1 / 100))
    # the normalization train.py used (its --mean/--std) is in the manifest
    assert [json.loads(v) for v in run["mean"]] == [TRAIN_MEAN] * 2
    assert [json.loads(v) for v in run["std"]] == [TRAIN_STD] * 2
    assert json.loads(run.input_size.iloc[0]) == [3, 16, 16]
    assert set(run.crop_pct) == {1.0}  # --crop-pct, as train.py's eval loader used it
    assert "weights_key" not in rows.columns  # the model's own weights


def test_hub_folder_and_plain_file_rows(zoo) -> None:
    rows = _scan_all(zoo).rows.set_index("checkpoint_id")
    hub = rows.loc["vit-hub"]
    assert hub.arch == ARCH and hub.num_classes == 2 and bool(hub.final)
    assert hub.weights.endswith("vit-hub/model.safetensors")
    assert json.loads(hub["mean"]) == HUB_MEAN and json.loads(hub["std"]) == HUB_STD
    assert json.loads(hub.classes) == ["0", "1"]
    kwargs = json.loads(hub.arch_kwargs)
    assert kwargs["embed_dim"] == 32 and kwargs["depth"] == 2 and "num_classes" not in kwargs
    plain = rows.loc["plain-vit"]
    assert plain.arch == ARCH and json.loads(plain.arch_kwargs) == MODEL_KWARGS
    assert pd.isna(plain["mean"])  # a bare safetensors file says nothing about normalization
    x = torch.randn(2, 3, 16, 16)
    for cid, model in (("vit-hub", zoo["hub"]), ("plain-vit", zoo["plain"])):
        row = {**rows.loc[cid].to_dict(), "checkpoint_id": cid}
        assert torch.allclose(load_checkpoint(row)(x), model.eval()(x), atol=1e-6)


def test_written_manifest_reads_back_and_the_job_uses_the_same_normalization(zoo,
                                                                            tmp_path) -> None:
    from circuitray.data.preprocess import resolve_preprocessing
    from circuitray.job_config import DataConfig

    result = _scan_all(zoo)
    for suffix in (".csv", ".parquet", ".yaml"):
        df = read_manifest(write_manifest(result, tmp_path / f"manifest{suffix}"))
        assert sorted(df.checkpoint_id) == sorted(result.rows.checkpoint_id)
    df = read_manifest(tmp_path / "manifest.csv").set_index("checkpoint_id")
    for cid, (mean, std) in (("tiny-run", (TRAIN_MEAN, TRAIN_STD)),
                             ("vit-hub", (HUB_MEAN, HUB_STD))):
        row = {**df.loc[cid].to_dict(), "checkpoint_id": cid}
        transform, source = resolve_preprocessing(row, load_checkpoint(row), DataConfig(),
                                                  row["weights"])
        assert list(transform.mean) == pytest.approx(mean), cid
        assert list(transform.std) == pytest.approx(std), cid
        assert source.startswith("checkpoint"), source


def test_final_best_picks_model_best(zoo) -> None:
    rows = _scan_all(zoo, final="best").rows
    run = rows[rows.parent_id == "tiny-run"]
    assert list(run[run.final].epoch) == [zoo["run"]["best_epoch"]]
    assert run.final.sum() == 1


def test_ema_rows_load_the_ema_weights(zoo) -> None:
    result = _scan_all(zoo, ema=True)
    run = result.rows[result.rows.weights_key.notna()].set_index("checkpoint_id")
    assert list(run.index) == ["tiny-run-ema.e0", "tiny-run-ema"]
    assert set(run.weights_key) == {"state_dict_ema"}
    row = {**run.loc["tiny-run-ema"].to_dict(), "checkpoint_id": "tiny-run-ema"}
    loaded = load_checkpoint(row)
    ema, own = zoo["run"]["ema"].state_dict(), zoo["run"]["model"].state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema[k]), k
    assert not all(torch.equal(ema[k], own[k]) for k in own)  # EMA really differs
    # the model's own weights without --ema
    plain_row = {**row, "weights_key": None}
    assert all(torch.equal(v, own[k]) for k, v in load_checkpoint(plain_row).state_dict().items())


def test_malicious_pickle_in_a_run_is_listed_and_not_executed(zoo, tmp_path) -> None:
    run = tmp_path / "evil-run"
    shutil.copytree(zoo["root"] / "runs" / "tiny-run", run)
    sentinel, control = tmp_path / "pwned", tmp_path / "control"
    good = torch.load(run / "checkpoint-1.pth.tar", weights_only=False)
    torch.save({**good, "epoch": 7, "args": _RunsAShellCommand(sentinel)},
               run / "checkpoint-7.pth.tar")
    torch.save({**good, "args": _RunsAShellCommand(control)}, tmp_path / "control.pth.tar")
    torch.load(tmp_path / "control.pth.tar", weights_only=False)  # the payload is real
    assert control.exists()
    result = scan([run], task="toy")
    assert not sentinel.exists()
    [(path, reason)] = result.unreadable
    assert path.endswith("checkpoint-7.pth.tar") and reason.startswith("refused")
    assert sorted(result.rows.epoch) == [0, 1]  # the rest of the run is still there


def test_metadata_reader_gives_shapes_without_tensors_and_refuses_other_globals(
        zoo, tmp_path) -> None:
    """The scan's fast path parses data.pkl alone: shapes, epoch and args equal a full safe
    load's; a pickle naming any global outside its allowlist is refused before anything is
    called (the scan then falls back to torch.load(weights_only=True), which refuses it)."""
    from circuitray.checkpoint_meta import NotPlainMetadata, TensorInfo, read_metadata

    path = zoo["root"] / "runs" / "tiny-run" / "checkpoint-1.pth.tar"
    full = torch.load(path, weights_only=False)
    meta = read_metadata(path)
    assert meta["epoch"] == full["epoch"] and vars(meta["args"]) == vars(full["args"])
    for key in ("state_dict", "state_dict_ema"):
        assert {k: v.shape for k, v in meta[key].items()} == {
            k: tuple(v.shape) for k, v in full[key].items()}
        assert all(isinstance(v, TensorInfo) for v in meta[key].values())
    sentinel = tmp_path / "pwned"
    torch.save({**full, "args": _RunsAShellCommand(sentinel)}, tmp_path / "evil.pth.tar")
    with pytest.raises(NotPlainMetadata, match="posix.system|os.system"):
        read_metadata(tmp_path / "evil.pth.tar")
    assert not sentinel.exists()


def test_truncated_checkpoint_is_listed_not_fatal(zoo, tmp_path) -> None:
    run = tmp_path / "broken-run"
    shutil.copytree(zoo["root"] / "runs" / "tiny-run", run)
    data = (run / "checkpoint-0.pth.tar").read_bytes()
    (run / "checkpoint-0.pth.tar").unlink()  # a hard link: write a new file, not through it
    (run / "checkpoint-0.pth.tar").write_bytes(data[: len(data) // 3])
    (run / "garbage.safetensors").write_bytes(b"not a safetensors file")
    result = scan([run, tmp_path / "nowhere"], task="toy", arch=ARCH,
                  arch_kwargs=MODEL_KWARGS)
    reasons = dict(result.unreadable)
    assert set(reasons) == {str(run / "checkpoint-0.pth.tar"), str(tmp_path / "nowhere"),
                            str(run / "garbage.safetensors")}
    assert reasons[str(tmp_path / "nowhere")] == "no such file or folder"
    assert "zip" in reasons[str(run / "checkpoint-0.pth.tar")]
    # the last epoch survives (and epoch 0 too when model_best.pth.tar holds it)
    assert "broken-run" in set(result.rows.checkpoint_id)
    text = format_summary(result)
    assert "checkpoint-0.pth.tar" in text and "garbage.safetensors" in text


def test_a_plain_file_without_arch_and_a_misfit_are_listed(zoo, tmp_path) -> None:
    path = tmp_path / "w" / "plain.safetensors"
    write_plain(path)
    result = scan([path], task="toy")
    assert result.rows.empty
    assert "give --arch" in result.unreadable[0][1]
    result = scan([path], task="toy", arch=ARCH, arch_kwargs={**MODEL_KWARGS, "depth": 3})
    assert "missing tensor(s) ['blocks.2" in result.unreadable[0][1]
    result = scan([path], task="toy", arch=ARCH, arch_kwargs={**MODEL_KWARGS,
                                                              "norm_layer": "x"})
    assert "arch_kwargs key 'norm_layer' is not allowed" in result.unreadable[0][1]


def test_hf_hub_weights_resolve_through_the_local_cache(zoo, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "hf-cache"
    write_hf_cache(cache, "org/vit-hub", zoo["root"] / "hub" / "vit-hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = scan(["hf-hub:org/vit-hub"], task="toy")
    [row] = result.rows.to_dict("records")
    assert row["weights"] == "hf-hub:org/vit-hub" and json.loads(row["mean"]) == HUB_MEAN
    write_manifest(result, tmp_path / "m.csv")
    df = read_manifest(tmp_path / "m.csv")  # the job sees the cached file
    assert Path(df.weights[0]).parent.parent.name == "snapshots"
    x = torch.randn(1, 3, 16, 16)
    for weights in ("hf-hub:org/vit-hub", df.weights[0]):
        loaded = load_checkpoint({**row, "weights": weights})
        assert torch.allclose(loaded(x), zoo["hub"].eval()(x), atol=1e-6)


def test_hf_hub_weights_not_cached_offline_say_so(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    row = {"checkpoint_id": "hub", "task": "t", "arch": ARCH,
           "arch_kwargs": json.dumps(MODEL_KWARGS), "weights": "hf-hub:org/missing",
           "num_classes": 2}
    with pytest.raises(CheckpointError, match=r"org/missing is not in the local Hugging Face "
                                              r"cache .*HF_HUB_OFFLINE is set"):
        load_checkpoint(row)
    pd.DataFrame([row]).to_csv(tmp_path / "m.csv", index=False)
    assert read_manifest(tmp_path / "m.csv").weights[0] == "hf-hub:org/missing"
    result = scan(["hf-hub:org/missing"], task="t")
    assert result.rows.empty and "not in the local Hugging Face cache" in result.unreadable[0][1]


def test_cli_manifest_writes_and_prints_a_summary(zoo, tmp_path, capsys) -> None:
    out = tmp_path / "manifest.csv"
    root = zoo["root"]
    code = main(["manifest", str(root / "runs"), str(root / "hub"), "-o", str(out),
                 "--task", "toy", "--data-root", str(zoo["data"]), "--id-domain", "id",
                 "--ood-domain", "ood", "--final", "best"])
    text = capsys.readouterr().out
    assert code == 0
    assert "timm-run tiny-run: 2 checkpoint(s)" in text and "hub      vit-hub: 1" in text
    assert f"wrote 3 checkpoint(s) of task 'toy' to {out}" in text
    df = read_manifest(out)
    assert set(df.task) == {"toy"} and set(df.id_domain) == {"id"}
    assert set(df.data_root) == {str(zoo["data"].resolve())}


def test_cli_manifest_exits_2_when_nothing_is_usable(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code = main(["manifest", str(tmp_path / "empty"), "-o", str(tmp_path / "m.csv")])
    captured = capsys.readouterr()
    assert code == 2
    assert "no checkpoints found" in captured.out
    assert captured.err.startswith("circuitray: error:") and "no usable checkpoint" in captured.err
    assert not (tmp_path / "m.csv").exists()


@pytest.mark.slow
def test_scanned_checkpoints_run_end_to_end(zoo, tmp_path, local_ray) -> None:
    """`circuitray manifest` -> `circuitray run`: the run's epochs, the hub folder and the
    plain file all complete, with the checkpoints' own normalization."""
    import pyarrow.parquet as pq

    from circuitray.runtime.layout import JobLayout
    from circuitray.runtime.plan import read_failures

    root = zoo["root"]
    manifest = tmp_path / "manifest.csv"
    assert main(["manifest", str(root / "runs"), str(root / "hub"), str(root / "files"),
                 "-o", str(manifest), "--task", "toy", "--data-root", str(zoo["data"]),
                 "--id-domain", "id", "--ood-domain", "ood", "--arch", ARCH,
                 "--arch-kwargs", json.dumps(MODEL_KWARGS)]) == 0
    conf = Path(__file__).resolve().parents[1] / "conf" / "tiny.yaml"
    assert main(["run", str(conf), f"manifest={manifest}", f"output_dir={tmp_path / 'job'}",
                 "reduce.figures=false", "data.shift_severities=[5]",
                 "data.proxy_severities=[5]"]) == 0
    layout = JobLayout.of(tmp_path / "job")
    assert read_failures(layout).empty
    for cid, mean in (("tiny-run", TRAIN_MEAN), ("tiny-run.e0", TRAIN_MEAN),
                      ("vit-hub", HUB_MEAN)):
        marker = pq.read_table(layout.marker(cid)).to_pandas()
        assert [list(v) for v in marker["mean"]] == [pytest.approx(mean)] * len(marker), cid
        assert all(s.startswith("checkpoint") for s in marker.norm_source), cid
    assert layout.marker("plain-vit").exists()
    models = pd.read_parquet(layout.metrics / "models.parquet")
    assert set(models.checkpoint) == {"tiny-run", "tiny-run.e0", "vit-hub", "plain-vit"}
    run = models.set_index("checkpoint").loc["tiny-run"]
    assert run.lr == pytest.approx(1e-3) and run.parent_id == "tiny-run"
    assert 0 <= run.logged_id_acc <= 1 and 0 <= run.id_acc <= 1  # logged beside measured
