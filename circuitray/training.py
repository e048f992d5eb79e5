"""Training the demo zoo's small ViTs, and the zoo's typed config (no Ray here).

The zoo exists because nothing can be downloaded: later stages need real trained models
whose OOD accuracies differ for real reasons (spurious strength ρ, fine-tuning regime,
learning rate, training length). Like the paper's zoos, a backbone is pretrained once on a
broad corpus (`pretrain_backbone`) and fine-tuned many ways (`train_one` with a `regime`:
`linear` probe, `last<k>` blocks, `full`); `regime: scratch` trains from random weights.
`runtime/zoo.py` fans `train_one` out as one Ray task per configuration.

Files under the zoo's out_dir:
  backbone/<id>.safetensors           the pretrained backbone; <id> hashes its spec
  backbone/<id>.json                  its spec, training curve and manifest row (written last)
  weights/<id>.safetensors            a model's final weights
  weights/<id>.e<epoch>.safetensors   intermediate checkpoints (training dynamics)
  records/<id>.json                   the spec and one manifest row per saved checkpoint;
                                      written last, so its presence means "done".
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import re
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from circuitray.data.classes import folder_class_map
from circuitray.data.datasets import DomainFolderDataset, eval_transform, load_all
from circuitray.data.demo import (
    DIGIT_TASKS,
    PRETRAIN_TASK,
    PRETRAIN_VERSION,
    task_splits,
    task_version,
)
from circuitray.errors import ConfigError
from circuitray.models import build_model
from circuitray.runtime.files import (  # a leaf module: hashlib + pyarrow
    checksum_file,
    write_text_atomic,
)
from circuitray.torch_utils import eval_mode

Augment = Literal["none", "shift"]
_LAST_K = re.compile(r"last(\d+)$")


@dataclass
class GridConfig:
    """Hyperparameter lists; the zoo is their full product (ρ is ignored by shapes-style)."""

    task: list[str] = field(default_factory=lambda: ["digits-background", "digits-patch"])
    rho: list[float] = field(default_factory=lambda: [0.7])
    lr: list[float] = field(default_factory=lambda: [1e-3])
    epochs: list[int] = field(default_factory=lambda: [20])
    weight_decay: list[float] = field(default_factory=lambda: [0.05])
    augment: list[Augment] = field(default_factory=lambda: ["none"])
    depth: list[int] = field(default_factory=lambda: [8])
    seed: list[int] = field(default_factory=lambda: [0])
    # scratch (random init) | linear (head only) | last<k> (last k blocks + final norm +
    # head) | full; all but scratch start from the pretrained backbone
    regime: list[str] = field(default_factory=lambda: ["scratch"])
    label_smoothing: list[float] = field(default_factory=lambda: [0.0])
    train_fraction: list[float] = field(default_factory=lambda: [1.0])  # of the train domain


@dataclass
class PretrainConfig:
    """The backbone: one model trained on `pretrain-mix` (see circuitray.data.demo)."""

    enabled: bool = False
    epochs: int = 30
    lr: float = 2e-3
    weight_decay: float = 0.05
    batch_size: int = 128
    n_per_shape: int = 400  # training images per shape class (digits: every train digit x2)
    seed: int = 0
    threads: int = 2  # torch threads: the backbone trains alone, before the fine-tunes


@dataclass
class ZooConfig:
    """What to train (conf/zoo-*.yaml); see README "Data, shifts and the demo zoo"."""

    grid: GridConfig = field(default_factory=GridConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    # models per task: a seeded sample of the grid's product, balanced over regimes
    # (None: the whole product)
    sample: int | None = None
    sample_seed: int = 0
    # fraction of the models that save intermediate checkpoints (every model when 1.0)
    intermediate_fraction: float = 1.0
    data_root: Path = Path("runs/data")
    arch: str = "vit_tiny_patch16_224"
    arch_kwargs: dict[str, Any] = field(default_factory=lambda: {
        "img_size": 32, "patch_size": 8, "embed_dim": 64, "num_heads": 4})
    batch_size: int = 64
    warmup_epochs: float = 1.0
    intermediate: int = 2  # intermediate checkpoints per model, evenly spaced in epochs
    data_seed: int = 0
    ood_cues: int = 3  # random cue colours per held-out digit in the digit tasks' ood domain
    num_cpus: int = 2  # Ray tasks at once when Ray is started locally
    threads_per_task: int = 1  # torch threads per task: more was up to 40x slower here
    eval_batch_size: int = 500


def checkpoint_id(spec: dict[str, Any]) -> str:
    """A readable id that names every hyperparameter of the configuration (the fine-tuning
    ones only when they differ from training from scratch on all the data)."""
    rho = f"-rho{spec['rho']:g}" if spec.get("rho") is not None else ""
    regime = spec.get("regime", "scratch")
    head = f"{spec['task']}{rho}" + ("" if regime == "scratch" else f"-{regime}")
    extra = ""
    if spec.get("label_smoothing", 0.0):
        extra += f"-ls{spec['label_smoothing']:g}"
    if spec.get("train_fraction", 1.0) != 1.0:
        extra += f"-f{spec['train_fraction']:g}"
    return (f"{head}-lr{spec['lr']:g}-e{spec['epochs']}-wd{spec['weight_decay']:g}"
            f"-{spec['augment']}{extra}-d{spec['depth']}-s{spec['seed']}")


def check_regime(regime: str, depth: int) -> None:
    """Refuse a regime name this module cannot train, naming the key."""
    m = _LAST_K.match(regime)
    if regime in ("scratch", "linear", "full") or (m and 1 <= int(m.group(1)) <= depth):
        return
    raise ConfigError(f"grid.regime: unknown regime {regime!r} for depth {depth}; use scratch, "
                      f"linear, full or last<k> with 1 <= k <= depth")


def backbone_spec(config: ZooConfig, depth: int) -> dict[str, Any]:
    """The backbone's training spec; its id hashes it, so a changed spec is a new backbone."""
    p = config.pretrain
    spec = {"task": PRETRAIN_TASK, "arch": config.arch,
            "arch_kwargs": {**config.arch_kwargs, "depth": depth}, "epochs": p.epochs,
            "lr": p.lr, "weight_decay": p.weight_decay, "batch_size": p.batch_size,
            "n_per_shape": p.n_per_shape, "corpus_version": PRETRAIN_VERSION, "seed": p.seed,
            "data_seed": config.data_seed,
            "warmup_epochs": config.warmup_epochs, "threads": p.threads,
            "eval_batch_size": config.eval_batch_size}
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    spec["checkpoint_id"] = f"backbone-d{depth}-{digest}"
    return spec


def _sample(specs: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """A seeded sample of `n` specs with the regimes as equal as `n` allows (the grid's
    product can run to thousands; the paper's zoos vary every knob at once)."""
    by_regime: dict[str, list[dict[str, Any]]] = {}
    for spec in specs:
        by_regime.setdefault(spec["regime"], []).append(spec)
    rng = random.Random(seed)
    for group in by_regime.values():
        rng.shuffle(group)
    picked: list[dict[str, Any]] = []
    while len(picked) < min(n, len(specs)):
        for group in by_regime.values():
            if group and len(picked) < n:
                picked.append(group.pop())
    return sorted(picked, key=lambda s: s["checkpoint_id"])


def expand_grid(config: ZooConfig) -> list[dict[str, Any]]:
    """One spec (plain dict, safe to ship to a Ray worker) per configuration to train: the
    grid's product per task, or a regime-balanced sample of `config.sample` per task."""
    g = config.grid
    if config.sample is not None and config.sample < 1:
        raise ConfigError(f"sample: {config.sample} models per task; use a number >= 1, or "
                          "null for the whole grid")
    if not 0.0 <= config.intermediate_fraction <= 1.0:
        raise ConfigError(f"intermediate_fraction: {config.intermediate_fraction} is outside "
                          "[0, 1]")
    by_task: dict[str, list[dict[str, Any]]] = {}
    seen = set()
    for task, rho, regime, lr, epochs, wd, aug, ls, frac, depth, seed in itertools.product(
            g.task, g.rho, g.regime, g.lr, g.epochs, g.weight_decay, g.augment,
            g.label_smoothing, g.train_fraction, g.depth, g.seed):
        check_regime(regime, depth)
        if regime != "scratch" and not config.pretrain.enabled:
            raise ConfigError(f"grid.regime: {regime!r} fine-tunes the pretrained backbone, "
                              "but pretrain.enabled is false")
        if not 0.0 < frac <= 1.0:
            raise ConfigError(f"grid.train_fraction: {frac} is outside (0, 1]")
        rho_v = float(rho) if task in DIGIT_TASKS else None
        splits = task_splits(task, rho_v)
        spec = {"task": task, "rho": rho_v, "regime": regime, "lr": lr, "epochs": epochs,
                "weight_decay": wd, "augment": aug, "label_smoothing": ls,
                "train_fraction": frac, "depth": depth, "seed": seed, "arch": config.arch,
                "arch_kwargs": {**config.arch_kwargs, "depth": depth},
                "batch_size": config.batch_size, "warmup_epochs": config.warmup_epochs,
                "intermediate": config.intermediate, "data_seed": config.data_seed,
                "ood_cues": config.ood_cues, "corpus_version": task_version(task),
                "threads": config.threads_per_task,
                "eval_batch_size": config.eval_batch_size,
                "train_domain": splits["train"], "id_domain": splits["id"],
                "ood_domain": splits["ood"]}
        if regime != "scratch":
            spec["init"] = backbone_spec(config, depth)["checkpoint_id"]
        spec["checkpoint_id"] = checkpoint_id(spec)
        if spec["checkpoint_id"] not in seen:
            seen.add(spec["checkpoint_id"])
            by_task.setdefault(task, []).append(spec)
    specs = []
    for task_specs in by_task.values():
        if config.sample is not None:
            task_specs = _sample(task_specs, config.sample, config.sample_seed)
        specs += task_specs
    _thin_intermediates(specs, config.intermediate_fraction)
    return specs


def _thin_intermediates(specs: list[dict[str, Any]], fraction: float) -> None:
    """Keep intermediate checkpoints for an evenly spread `fraction` of each task's models
    (DDB over training needs some runs, not all; each intermediate costs a discover)."""
    if fraction >= 1.0:
        return
    by_task: dict[str, list[dict[str, Any]]] = {}
    for spec in specs:
        by_task.setdefault(spec["task"], []).append(spec)
    for group in by_task.values():
        keep = max(1, round(fraction * len(group))) if fraction > 0 else 0
        chosen = {round(i * len(group) / keep) for i in range(keep)} if keep else set()
        for i, spec in enumerate(group):
            if i not in chosen:
                spec["intermediate"] = 0


def _shift(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translation by up to ±pad pixels per image (edge-replicated)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    offs = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w]
                        for i, (dy, dx) in enumerate(offs.tolist())])


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 500) -> float:
    """Top-1 accuracy of `model` (in eval mode) on in-memory tensors."""
    correct = 0
    with eval_mode(model):
        for i in range(0, len(images), batch_size):
            correct += (model(images[i:i + batch_size]).argmax(1)
                        == labels[i:i + batch_size]).sum()
    return float(correct) / max(len(images), 1)


def _save(model: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Write safetensors atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _norm_metadata(transform: Any) -> dict[str, str]:
    """The mean/std the model was trained with, in the safetensors header where circuitray
    (and anyone reading the file) finds them: the checkpoint says how to feed it."""
    return {"mean": json.dumps([float(v) for v in transform.mean]),
            "std": json.dumps([float(v) for v in transform.std])}


def _row(spec: dict[str, Any], weights: str, epoch: int, final: bool, id_acc: float,
         ood_acc: float, data_root: str, num_classes: int, seconds: float) -> dict[str, Any]:
    cid = spec["checkpoint_id"] if final else f"{spec['checkpoint_id']}.e{epoch}"
    return {"checkpoint_id": cid, "task": spec["task"], "arch": spec["arch"],
            "arch_kwargs": json.dumps(spec["arch_kwargs"], sort_keys=True), "weights": weights,
            "num_classes": num_classes, "data_root": data_root, "id_domain": spec["id_domain"],
            "ood_domain": spec["ood_domain"], "id_acc": id_acc, "ood_acc": ood_acc,
            "epoch": epoch, "final": final, "parent_id": spec["checkpoint_id"],
            "rho": spec["rho"], "regime": spec.get("regime", "scratch"),
            "init": spec.get("init", "scratch"), "lr": spec["lr"], "epochs": spec["epochs"],
            "weight_decay": spec["weight_decay"], "augment": spec["augment"],
            "label_smoothing": spec.get("label_smoothing", 0.0),
            "train_fraction": spec.get("train_fraction", 1.0),
            "depth": spec["depth"], "seed": spec["seed"], "train_seconds": seconds}


def train_one(spec: dict[str, Any], task_dir: str | os.PathLike,
              out_dir: str | os.PathLike) -> dict[str, Any]:
    """Train one configuration; write its weights and record; return the record.

    Never raises: a failure comes back as {"checkpoint_id", "error"} so one bad
    configuration does not stop the zoo.
    """
    try:
        return _train(spec, Path(task_dir), Path(out_dir))
    except Exception as exc:  # noqa: BLE001 - reported as data by the caller
        return {"checkpoint_id": spec.get("checkpoint_id", "?"),
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=5)}


def trainable(model: torch.nn.Module, regime: str) -> list[torch.nn.Parameter]:
    """Freeze what `regime` keeps from the backbone; return the parameters it trains.

    linear: the classifier head only. last<k>: the last k blocks, the final norm(s) and the
    head. full and scratch: everything. (timm ViT names: blocks, norm, fc_norm, head.)
    """
    n_blocks = len(model.blocks)
    check_regime(regime, n_blocks)
    m = _LAST_K.match(regime)
    prefixes: tuple[str, ...] | None = None  # full, scratch: everything
    if regime == "linear":
        prefixes = ("head.",)
    elif m:
        prefixes = ("head.", "norm.", "fc_norm.",
                    *(f"blocks.{i}." for i in range(n_blocks - int(m.group(1)), n_blocks)))
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(prefixes is None or name.startswith(prefixes))
        if param.requires_grad:
            params.append(param)
    return params


def _load_backbone(model: torch.nn.Module, path: Path) -> None:
    """Copy the backbone's weights into `model`, all but the classifier head (the task's
    class count differs; the head keeps its seeded random init)."""
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(str(path)).items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise ValueError(f"backbone {path} does not fit the model: missing "
                         f"{[k for k in missing if not k.startswith('head.')]}, "
                         f"unexpected {unexpected}")


def _subset(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded `fraction` of the training set (at least one image), in its original order."""
    if fraction >= 1.0:
        return x, y
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    keep = keep[:max(1, round(fraction * len(x)))].sort().values
    return x[keep], y[keep]


def _fit(model: torch.nn.Module, params: list[torch.nn.Parameter], x_tr: torch.Tensor,
         y_tr: torch.Tensor, spec: dict[str, Any], gen: torch.Generator,
         on_epoch: Any) -> None:
    """AdamW with linear warmup then cosine decay; `on_epoch(epoch, mean_loss)` after each."""
    model.train()
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=spec["weight_decay"])
    bs, epochs = int(spec["batch_size"]), int(spec["epochs"])
    steps_per_epoch = math.ceil(len(x_tr) / bs)
    total = steps_per_epoch * epochs
    warmup = max(1, int(spec["warmup_epochs"] * steps_per_epoch))

    def lr_at(step: int) -> float:  # linear warmup, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    smoothing = float(spec.get("label_smoothing", 0.0))
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(x_tr), generator=gen)
        losses = []
        for i in range(0, len(x_tr), bs):
            idx = perm[i:i + bs]
            xb, yb = x_tr[idx], y_tr[idx]
            if spec.get("augment") == "shift":
                xb = _shift(xb, gen)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach())
        mean_loss = float(torch.stack(losses).mean())
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"training loss became {mean_loss} at epoch {epoch}")
        on_epoch(epoch, mean_loss)


def _domain_tensors(task_dir: Path, domains: list[str], transform: Any, classes: list[str]
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each domain's images and labels in memory (the demo's domains are small)."""
    out = []
    for domain in domains:
        x, y, _ = load_all(DomainFolderDataset(task_dir, domain, transform, classes=classes))
        out.append((x, y))
    return out


def _train(spec: dict[str, Any], task_dir: Path, out_dir: Path) -> dict[str, Any]:
    torch.set_num_threads(int(spec.get("threads", 1)))
    start = time.monotonic()
    cid = spec["checkpoint_id"]
    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    probe = build_model(spec["arch"], spec["arch_kwargs"], 2)
    transform = eval_transform(probe)
    # labels: the training domain's class folders; the other domains must use a subset
    classes = folder_class_map(task_dir / spec["train_domain"]).names
    (x_tr, y_tr), (x_id, y_id), (x_ood, y_ood) = _domain_tensors(
        task_dir, [spec["train_domain"], spec["id_domain"], spec["ood_domain"]], transform,
        list(classes))
    x_tr, y_tr = _subset(x_tr, y_tr, float(spec.get("train_fraction", 1.0)), spec["seed"])
    model = build_model(spec["arch"], spec["arch_kwargs"], len(classes))
    regime = spec.get("regime", "scratch")
    init_digest = None
    if regime != "scratch":
        backbone = out_dir / "backbone" / f"{spec['init']}.safetensors"
        init_digest = checksum_file(backbone)
        _load_backbone(model, backbone)
    params = trainable(model, regime)
    epochs = int(spec["epochs"])
    n_mid = int(spec["intermediate"])
    mid_epochs = sorted({round(epochs * k / (n_mid + 1)) for k in range(1, n_mid + 1)} - {0, epochs})
    rel_data = os.path.relpath(task_dir.resolve(), out_dir.resolve())
    rows = []
    meta = {"checkpoint_id": cid, "spec": json.dumps(spec, sort_keys=True),
            **_norm_metadata(transform)}
    eval_bs = int(spec.get("eval_batch_size", 500))

    def save_checkpoint(epoch: int, _loss: float) -> None:
        if epoch not in mid_epochs and epoch != epochs:
            return
        final = epoch == epochs
        name = f"{cid}.safetensors" if final else f"{cid}.e{epoch}.safetensors"
        _save(model, out_dir / "weights" / name, {**meta, "epoch": str(epoch)})
        rows.append(_row(spec, f"weights/{name}", epoch, final,
                         accuracy(model, x_id, y_id, eval_bs),
                         accuracy(model, x_ood, y_ood, eval_bs), rel_data, len(classes),
                         time.monotonic() - start))

    _fit(model, params, x_tr, y_tr, spec, gen, save_checkpoint)
    record = {"checkpoint_id": cid, "spec": spec, "rows": rows, "error": None,
              "init_digest": init_digest}
    write_text_atomic(out_dir / "records" / f"{cid}.json", json.dumps(record, indent=1))
    return record


def pretrain_backbone(spec: dict[str, Any], task_dir: str | os.PathLike,
                      out_dir: str | os.PathLike) -> dict[str, Any]:
    """Train the backbone on the pretraining corpus; write its weights, then its record
    (spec, per-epoch curve, a manifest row). Raises on failure: nothing can fine-tune
    without it."""
    task_dir, out_dir = Path(task_dir), Path(out_dir)
    torch.set_num_threads(int(spec.get("threads", 1)))
    start = time.monotonic()
    cid = spec["checkpoint_id"]
    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    splits = task_splits(spec["task"])
    classes = folder_class_map(task_dir / splits["train"]).names
    transform = eval_transform(build_model(spec["arch"], spec["arch_kwargs"], 2))
    (x_tr, y_tr), (x_val, y_val) = _domain_tensors(
        task_dir, [splits["train"], splits["id"]], transform, list(classes))
    model = build_model(spec["arch"], spec["arch_kwargs"], len(classes))
    eval_bs = int(spec.get("eval_batch_size", 500))
    curve: list[dict[str, float]] = []

    def log_epoch(epoch: int, loss: float) -> None:
        curve.append({"epoch": epoch, "loss": loss, "val_acc": accuracy(model, x_val, y_val,
                                                                       eval_bs),
                      "seconds": time.monotonic() - start})

    _fit(model, trainable(model, "full"), x_tr, y_tr, {**spec, "augment": "shift"}, gen,
         log_epoch)
    weights = f"backbone/{cid}.safetensors"
    _save(model, out_dir / weights, {"checkpoint_id": cid,
                                     "spec": json.dumps(spec, sort_keys=True),
                                     **_norm_metadata(transform)})
    row = {"checkpoint_id": cid, "task": spec["task"], "arch": spec["arch"],
           "arch_kwargs": json.dumps(spec["arch_kwargs"], sort_keys=True), "weights": weights,
           "num_classes": len(classes),
           "data_root": os.path.relpath(task_dir.resolve(), out_dir.resolve()),
           "id_domain": splits["id"], "ood_domain": splits["id"],
           "id_acc": curve[-1]["val_acc"], "epoch": int(spec["epochs"]), "final": True,
           "train_seconds": time.monotonic() - start}
    record = {"checkpoint_id": cid, "spec": spec, "curve": curve, "row": row,
              "digest": checksum_file(out_dir / weights)}
    write_text_atomic(out_dir / "backbone" / f"{cid}.json", json.dumps(record, indent=1))
    return record


def read_backbone(out_dir: str | os.PathLike, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The finished backbone record for `spec`, if it exists, matches and its weights still
    have the recorded digest (a backbone changed on disk must not pass as the old one)."""
    path = Path(out_dir) / "backbone" / f"{spec['checkpoint_id']}.json"
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    weights = Path(out_dir) / record["row"]["weights"]
    if record.get("spec") != json.loads(json.dumps(spec)) or not weights.is_file():
        return None
    return record if checksum_file(weights) == record.get("digest") else None


def read_record(out_dir: str | os.PathLike, spec: dict[str, Any]) -> dict[str, Any] | None:
    """The finished record of `spec` under out_dir, if it exists, matches and its files too."""
    path = Path(out_dir) / "records" / f"{spec['checkpoint_id']}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("spec") != json.loads(json.dumps(spec)):
        return None
    if not all((Path(out_dir) / r["weights"]).is_file() for r in record.get("rows", [])):
        return None
    if spec.get("init"):  # fine-tuned: only from the backbone that is there now
        backbone = Path(out_dir) / "backbone" / f"{spec['init']}.safetensors"
        if not backbone.is_file() or checksum_file(backbone) != record.get("init_digest"):
            return None
    return record
