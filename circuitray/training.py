"""Training one small ViT of the demo zoo, and the zoo's typed config (no Ray here).

The zoo exists because nothing can be downloaded: later stages need real trained models
whose OOD accuracies differ for real reasons (spurious strength ρ, learning rate, training
length). `runtime/zoo.py` fans `train_one` out as one Ray task per configuration.

Files per configuration (under the zoo's out_dir):
  weights/<id>.safetensors            the final model
  weights/<id>.e<epoch>.safetensors   intermediate checkpoints (training dynamics)
  records/<id>.json                   the spec and one manifest row per saved checkpoint;
                                      written last, so its presence means "done".
"""

from __future__ import annotations

import itertools
import json
import math
import os
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
from circuitray.data.demo import DIGIT_TASKS, task_splits
from circuitray.models import build_model
from circuitray.torch_utils import eval_mode

Augment = Literal["none", "shift"]


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


@dataclass
class ZooConfig:
    """What to train (conf/zoo-*.yaml); see README "Data, shifts and the demo zoo"."""

    grid: GridConfig = field(default_factory=GridConfig)
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
    """A readable id that names every hyperparameter of the configuration."""
    rho = f"-rho{spec['rho']:g}" if spec.get("rho") is not None else ""
    return (f"{spec['task']}{rho}-lr{spec['lr']:g}-e{spec['epochs']}-wd{spec['weight_decay']:g}"
            f"-{spec['augment']}-d{spec['depth']}-s{spec['seed']}")


def expand_grid(config: ZooConfig) -> list[dict[str, Any]]:
    """One spec (plain dict, safe to ship to a Ray worker) per configuration of the grid."""
    g = config.grid
    specs, seen = [], set()
    for task, rho, lr, epochs, wd, aug, depth, seed in itertools.product(
            g.task, g.rho, g.lr, g.epochs, g.weight_decay, g.augment, g.depth, g.seed):
        rho_v = float(rho) if task in DIGIT_TASKS else None
        splits = task_splits(task, rho_v)
        spec = {"task": task, "rho": rho_v, "lr": lr, "epochs": epochs, "weight_decay": wd,
                "augment": aug, "depth": depth, "seed": seed, "arch": config.arch,
                "arch_kwargs": {**config.arch_kwargs, "depth": depth},
                "batch_size": config.batch_size, "warmup_epochs": config.warmup_epochs,
                "intermediate": config.intermediate, "data_seed": config.data_seed,
                "ood_cues": config.ood_cues, "threads": config.threads_per_task,
                "eval_batch_size": config.eval_batch_size,
                "train_domain": splits["train"], "id_domain": splits["id"],
                "ood_domain": splits["ood"]}
        spec["checkpoint_id"] = checkpoint_id(spec)
        if spec["checkpoint_id"] not in seen:
            seen.add(spec["checkpoint_id"])
            specs.append(spec)
    return specs


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


def _row(spec: dict[str, Any], weights: str, epoch: int, final: bool, id_acc: float,
         ood_acc: float, data_root: str, num_classes: int, seconds: float) -> dict[str, Any]:
    cid = spec["checkpoint_id"] if final else f"{spec['checkpoint_id']}.e{epoch}"
    return {"checkpoint_id": cid, "task": spec["task"], "arch": spec["arch"],
            "arch_kwargs": json.dumps(spec["arch_kwargs"], sort_keys=True), "weights": weights,
            "num_classes": num_classes, "data_root": data_root, "id_domain": spec["id_domain"],
            "ood_domain": spec["ood_domain"], "id_acc": id_acc, "ood_acc": ood_acc,
            "epoch": epoch, "final": final, "parent_id": spec["checkpoint_id"],
            "rho": spec["rho"], "lr": spec["lr"], "epochs": spec["epochs"],
            "weight_decay": spec["weight_decay"], "augment": spec["augment"],
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
    x_tr, y_tr, _ = load_all(DomainFolderDataset(task_dir, spec["train_domain"], transform,
                                                 classes=classes))
    x_id, y_id, _ = load_all(DomainFolderDataset(task_dir, spec["id_domain"], transform,
                                                 classes=classes))
    x_ood, y_ood, _ = load_all(DomainFolderDataset(task_dir, spec["ood_domain"], transform,
                                                   classes=classes))
    model = build_model(spec["arch"], spec["arch_kwargs"], len(classes))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["weight_decay"])
    bs, epochs = int(spec["batch_size"]), int(spec["epochs"])
    steps_per_epoch = math.ceil(len(x_tr) / bs)
    total = steps_per_epoch * epochs
    warmup = max(1, int(spec["warmup_epochs"] * steps_per_epoch))

    def lr_at(step: int) -> float:  # linear warmup, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    n_mid = int(spec["intermediate"])
    mid_epochs = sorted({round(epochs * k / (n_mid + 1)) for k in range(1, n_mid + 1)} - {0, epochs})
    rel_data = os.path.relpath(task_dir.resolve(), out_dir.resolve())
    rows = []
    meta = {"checkpoint_id": cid, "spec": json.dumps(spec, sort_keys=True)}
    eval_bs = int(spec.get("eval_batch_size", 500))
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), bs):
            idx = perm[i:i + bs]
            xb, yb = x_tr[idx], y_tr[idx]
            if spec["augment"] == "shift":
                xb = _shift(xb, gen)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch}")
        if epoch in mid_epochs or epoch == epochs:
            final = epoch == epochs
            name = f"{cid}.safetensors" if final else f"{cid}.e{epoch}.safetensors"
            _save(model, out_dir / "weights" / name, {**meta, "epoch": str(epoch)})
            rows.append(_row(spec, f"weights/{name}", epoch, final,
                             accuracy(model, x_id, y_id, eval_bs),
                             accuracy(model, x_ood, y_ood, eval_bs), rel_data, len(classes),
                             time.monotonic() - start))
    record = {"checkpoint_id": cid, "spec": spec, "rows": rows, "error": None}
    rec_path = out_dir / "records" / f"{cid}.json"
    rec_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = rec_path.with_name(f".{rec_path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, rec_path)
    return record


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
    return record
